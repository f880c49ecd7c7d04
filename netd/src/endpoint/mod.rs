//! Containers on this host: `netd attach` wires a network namespace to the
//! data plane, `netd detach` undoes it. Each attachment is recorded in
//! `<run-dir>/endpoints/<name>.json` so it is found again after restarts.

use std::{
    collections::BTreeSet,
    fs,
    hash::{Hash as _, Hasher as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use netd_common::Endpoint;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    control::lease::{Mac, gateway},
    datapath::{self, Maps, PinDir},
    netlink::{self, Netlink},
    state::{SubnetEnv, write_atomic},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Name under /run/netns, or the path given.
    pub netns: String,
    pub netns_path: PathBuf,
    pub ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub host_mac: String,
}

pub struct AttachRequest {
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    pub ifname: String,
}

fn records_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("endpoints")
}

/// A file name for a namespace given by name or by path.
fn record_key(netns: &str) -> String {
    netns.trim_start_matches('/').replace('/', "_")
}

fn record_path(run_dir: &Path, netns: &str) -> PathBuf {
    records_dir(run_dir).join(format!("{}.json", record_key(netns)))
}

pub fn records(run_dir: &Path) -> Result<Vec<Record>> {
    let Ok(entries) = fs::read_dir(records_dir(run_dir)) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        match fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
            Ok(Ok(record)) => out.push(record),
            _ => warn!(file = %path.display(), "skipping unreadable endpoint record"),
        }
    }
    out.sort_by_key(|r| r.ip);
    Ok(out)
}

fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        Path::new("/run/netns").join(netns)
    }
}

/// Host-side interface names derived from the namespace, at most 15 bytes.
fn host_ifnames(netns: &str) -> (String, String) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    netns.hash(&mut hasher);
    let h = hasher.finish() as u32;
    (format!("ndv{h:08x}"), format!("ndt{h:08x}"))
}

/// The requested address, or the lowest free one after the gateway.
pub fn pick_ip(
    subnet: Ipv4Net,
    requested: Option<Ipv4Addr>,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr> {
    let gw = gateway(subnet);
    let usable = |ip: &Ipv4Addr| {
        subnet.contains(ip) && *ip != subnet.network() && *ip != subnet.broadcast() && *ip != gw
    };
    match requested {
        Some(ip) if !usable(&ip) => {
            bail!(
                "{ip} is not a usable container address in this host's subnet {subnet} (gateway {gw})"
            )
        }
        Some(ip) if used.contains(&ip) => bail!("{ip} is already used by another container"),
        Some(ip) => Ok(ip),
        None => subnet
            .hosts()
            .find(|ip| usable(ip) && !used.contains(ip))
            .with_context(|| format!("no free address left in {subnet}")),
    }
}

pub async fn attach(pin: &PinDir, run_dir: &Path, req: AttachRequest) -> Result<Record> {
    let env = SubnetEnv::read(run_dir)?;
    let path = netns_path(&req.netns);
    if !path.exists() {
        bail!("network namespace {} does not exist", path.display());
    }
    if req.ifname.is_empty() || req.ifname.len() > 15 {
        bail!("interface name {:?} must be 1 to 15 bytes", req.ifname);
    }
    let existing = records(run_dir)?;
    if existing.iter().any(|r| r.netns == req.netns) {
        bail!("{} is already attached (netd detach it first)", req.netns);
    }
    let used: BTreeSet<Ipv4Addr> = existing.iter().map(|r| r.ip).collect();
    let ip = pick_ip(env.subnet, req.ip, &used)?;
    let mut maps = Maps::open(pin)?;

    let nl = Netlink::connect()?;
    let (host_if, tmp_if) = host_ifnames(&req.netns);
    if nl.link(&host_if).await?.is_some() {
        bail!(
            "interface {host_if} already exists: a stale attachment of {}?",
            req.netns
        );
    }
    nl.create_veth(&host_if, &tmp_if).await?;
    let record = wire(
        &nl, pin, &env, &req, &path, &host_if, &tmp_if, ip, &mut maps,
    )
    .await;
    match record {
        Ok(record) => {
            fs::create_dir_all(records_dir(run_dir))?;
            write_atomic(
                &record_path(run_dir, &req.netns),
                &serde_json::to_vec_pretty(&record)?,
            )?;
            info!(netns = %req.netns, %ip, host_if, "attached");
            Ok(record)
        }
        Err(e) => {
            // Leave nothing half-done behind.
            if let Ok(Some(link)) = nl.link(&host_if).await {
                let _ = nl.delete_link(link.index).await;
            }
            let _ = maps.remove_endpoint(ip);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn wire(
    nl: &Netlink,
    pin: &PinDir,
    env: &SubnetEnv,
    req: &AttachRequest,
    path: &Path,
    host_if: &str,
    tmp_if: &str,
    ip: Ipv4Addr,
    maps: &mut Maps,
) -> Result<Record> {
    let peer = nl.require_link(tmp_if).await?;
    let netns_file = fs::File::open(path)?;
    nl.move_to_netns(peer.index, &netns_file).await?;
    let host = nl.require_link(host_if).await?;
    // The host side takes the underlay's MTU: a packet from a container
    // that raised its own MTU then reaches from_container, which answers it
    // with ICMP fragmentation-needed instead of a silent local drop.
    nl.set_up(
        host.index,
        Some(env.mtu + crate::control::config::VXLAN_OVERHEAD),
    )
    .await?;

    let (ifname, mtu, gw) = (req.ifname.clone(), env.mtu, gateway(env.subnet));
    let tmp = tmp_if.to_string();
    let mac = netlink::in_netns(path, async move |nl: Netlink| {
        let lo = nl.require_link("lo").await?;
        nl.set_up(lo.index, None).await?;
        let link = nl.require_link(&tmp).await?;
        nl.rename(link.index, &ifname).await?;
        nl.set_up(link.index, Some(mtu)).await?;
        netlink::enable_gro(&ifname)?;
        nl.add_address(link.index, ip, 32).await?;
        nl.replace_route("0.0.0.0/0".parse()?, link.index, Some(gw))
            .await?;
        link.mac.context("container interface has no MAC")
    })
    .await?;

    // The host stack reaches the container (and answers its ARP for the
    // gateway) through this route.
    nl.replace_route(Ipv4Net::new(ip, 32)?, host.index, None)
        .await?;
    let host_mac = host.mac.context("host interface has no MAC")?;
    datapath::attach_tc(pin, netd_common::names::FROM_CONTAINER, host_if)?;
    maps.insert_endpoint(
        ip,
        &Endpoint {
            ifindex: host.index,
            mac,
            host_mac,
        },
    )?;
    Ok(Record {
        netns: req.netns.clone(),
        netns_path: path.to_path_buf(),
        ifname: req.ifname.clone(),
        host_ifname: host_if.to_string(),
        host_ifindex: host.index,
        ip,
        mac: Mac(mac).to_string(),
        host_mac: Mac(host_mac).to_string(),
    })
}

/// Makes the ENDPOINTS map equal to the attachment records whose host veth
/// still exists: after a restart, and after an upgrade that brought fresh
/// maps. Records of containers deleted meanwhile are dropped.
pub async fn restore(maps: &mut Maps, run_dir: &Path) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut want = std::collections::BTreeMap::new();
    for record in records(run_dir)? {
        match nl.link(&record.host_ifname).await? {
            Some(link) if link.index == record.host_ifindex => {
                let mac: Mac = record.mac.parse()?;
                let host_mac: Mac = record.host_mac.parse()?;
                want.insert(
                    record.ip,
                    Endpoint {
                        ifindex: link.index,
                        mac: mac.0,
                        host_mac: host_mac.0,
                    },
                );
            }
            _ => {
                warn!(netns = %record.netns, ip = %record.ip, "container is gone; forgetting it");
                let _ = fs::remove_file(record_path(run_dir, &record.netns));
            }
        }
    }
    let have = maps.endpoints()?;
    for (ip, endpoint) in &want {
        if have.get(ip) != Some(endpoint) {
            maps.insert_endpoint(*ip, endpoint)?;
        }
    }
    for ip in have.keys().filter(|ip| !want.contains_key(ip)) {
        maps.remove_endpoint(*ip)?;
    }
    info!(containers = want.len(), "endpoints restored");
    Ok(())
}

/// Undoes `attach`; keeps going past errors and reports them together.
pub async fn detach(pin: &PinDir, run_dir: &Path, netns: &str) -> Result<Record> {
    let file = record_path(run_dir, netns);
    let record: Record = serde_json::from_slice(
        &fs::read(&file).with_context(|| format!("{netns} is not attached on this host"))?,
    )
    .with_context(|| format!("reading {}", file.display()))?;
    let mut errors = Vec::new();
    match Maps::open(pin) {
        Ok(mut maps) => {
            if let Err(e) = maps.remove_endpoint(record.ip) {
                errors.push(format!("removing map entry: {e:#}"));
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    let nl = Netlink::connect()?;
    // Deleting the veth removes its TC filter and route too; it is gone
    // already when the namespace was deleted first.
    if let Ok(Some(link)) = nl.link(&record.host_ifname).await
        && let Err(e) = nl.delete_link(link.index).await
    {
        errors.push(format!("{e:#}"));
    }
    fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    if !errors.is_empty() {
        bail!("detached {netns} with errors: {}", errors.join("; "));
    }
    info!(netns, ip = %record.ip, "detached");
    Ok(record)
}

/// Removes the records directory once every container is detached; one
/// still holding a record is left (and reported) so nothing is forgotten.
pub fn remove_records_dir(run_dir: &Path) -> Result<()> {
    let dir = records_dir(run_dir);
    match fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_lowest_free_after_gateway() {
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(
            pick_ip(subnet, None, &used).unwrap(),
            "10.244.3.2".parse::<Ipv4Addr>().unwrap()
        );
        used.insert("10.244.3.2".parse().unwrap());
        assert_eq!(
            pick_ip(subnet, None, &used).unwrap(),
            "10.244.3.3".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn checks_requested_address() {
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = ["10.244.3.9".parse().unwrap()].into();
        assert!(pick_ip(subnet, Some("10.244.3.7".parse().unwrap()), &used).is_ok());
        for bad in [
            "10.244.3.9",
            "10.244.3.1",
            "10.244.3.0",
            "10.244.3.255",
            "10.244.4.7",
        ] {
            assert!(
                pick_ip(subnet, Some(bad.parse().unwrap()), &used).is_err(),
                "{bad}"
            );
        }
        let tiny: Ipv4Net = "10.244.3.0/30".parse().unwrap();
        let full: BTreeSet<Ipv4Addr> = ["10.244.3.2".parse().unwrap()].into();
        assert!(pick_ip(tiny, None, &full).is_err());
    }

    #[test]
    fn host_names_fit() {
        let (a, b) = host_ifnames("a-very-long-namespace-name-indeed");
        assert!(a.len() <= 15 && b.len() <= 15 && a != b);
        assert_eq!(host_ifnames("x"), host_ifnames("x"));
        assert_ne!(host_ifnames("x").0, host_ifnames("y").0);
    }
}
