//! Attach, detach, check and garbage-collect endpoints; one code path for
//! `netd attach`/`detach` and the CNI plugin.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use netd_common::Endpoint;
use tracing::{info, warn};

use super::{
    Error, Lock,
    allocator::pick_ip,
    labels,
    names::host_ifnames,
    record::{self, Phase, Record, all_records},
};
use crate::{
    control::lease::{Mac, gateway},
    datapath::{self, Maps, PinDir},
    netlink::{self, Netlink},
    state::SubnetEnv,
};

/// Salted name attempts before giving up on a hash collision.
const NAME_ATTEMPTS: u32 = 8;

pub struct AttachRequest {
    /// Defaults to the namespace.
    pub id: Option<String>,
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    pub ifname: String,
    pub network: Option<String>,
    pub container_id: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl AttachRequest {
    /// What `netd attach NETNS` asks for.
    pub fn for_netns(netns: String, ip: Option<Ipv4Addr>, ifname: String) -> Self {
        AttachRequest {
            id: None,
            netns,
            ip,
            ifname,
            network: None,
            container_id: None,
            labels: BTreeMap::new(),
        }
    }
}

/// The network and labels every runtime hands in, checked the same way.
fn check_policy_identity(req: &AttachRequest) -> Result<(), Error> {
    let invalid = |e: labels::LabelError| Error::InvalidRequest(e.to_string());
    if let Some(network) = &req.network {
        labels::check_network(network).map_err(invalid)?;
    }
    labels::check_labels(&req.labels).map_err(invalid)
}

pub fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        Path::new("/run/netns").join(netns)
    }
}

/// A valid Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

pub async fn attach(pin: &PinDir, run_dir: &Path, req: AttachRequest) -> Result<Record, Error> {
    let env = SubnetEnv::read(run_dir).map_err(Error::NotReady)?;
    let path = netns_path(&req.netns);
    if !path.exists() {
        return Err(Error::NoNamespace(path));
    }
    if !valid_ifname(&req.ifname) {
        return Err(Error::InvalidRequest(format!(
            "interface name {:?} must be 1 to 15 bytes without '/', ':' or spaces",
            req.ifname
        )));
    }
    check_policy_identity(&req)?;
    let id = req.id.clone().unwrap_or_else(|| req.netns.clone());
    let nl = Netlink::connect()?;

    let _lock = Lock::acquire(run_dir)?;
    recover_locked(&nl, pin, run_dir).await;
    let existing = all_records(run_dir)?;
    if existing.iter().any(|r| r.id == id) {
        return Err(Error::AlreadyAttached(id));
    }
    let ifname = req.ifname.clone();
    if netlink::in_netns(&path, async move |nl: Netlink| nl.link(&ifname).await)
        .await?
        .is_some()
    {
        return Err(Error::InterfaceExists {
            ifname: req.ifname,
            netns: path,
        });
    }
    let used: BTreeSet<Ipv4Addr> = existing.iter().map(|r| r.ip).collect();
    let ip = pick_ip(env.subnet, req.ip, &used)?;
    let mut maps = Maps::open(pin).map_err(Error::NotReady)?;
    let (host_if, tmp_if) = free_names(&nl, &id, &existing).await?;

    // The intent first: a crash from here on leaves a pending record that
    // the next holder of the lock rolls back.
    let mut rec = Record {
        id: id.clone(),
        netns: req.netns.clone(),
        netns_path: path.clone(),
        ifname: req.ifname.clone(),
        host_ifname: host_if.clone(),
        host_ifindex: 0,
        ip,
        mac: String::new(),
        host_mac: String::new(),
        phase: Phase::Pending,
        network: req.network.clone(),
        container_id: req.container_id.clone(),
        labels: req.labels.clone(),
    };
    record::write(run_dir, &rec)?;
    match wire(&nl, pin, &env, &mut rec, &tmp_if, &mut maps).await {
        Ok(()) => {
            rec.phase = Phase::Ready;
            record::write(run_dir, &rec)?;
            info!(id, %ip, host_if, "attached");
            Ok(rec)
        }
        Err(e) => {
            roll_back(&nl, Some(&mut maps), run_dir, &rec, &tmp_if).await;
            Err(e.into())
        }
    }
}

/// Host-side names no other record holds; a leftover interface of that
/// name with no record (an attach that crashed before recording) is removed.
pub(super) async fn free_names(
    nl: &Netlink,
    id: &str,
    existing: &[Record],
) -> Result<(String, String), Error> {
    for attempt in 0..NAME_ATTEMPTS {
        let (host_if, tmp_if) = host_ifnames(id, attempt);
        if existing.iter().any(|r| r.host_ifname == host_if) {
            continue;
        }
        for name in [&host_if, &tmp_if] {
            if let Some(link) = nl.link(name).await? {
                warn!(name, "removing a leftover interface with no record");
                nl.delete_link(link.index).await?;
            }
        }
        return Ok((host_if, tmp_if));
    }
    Err(Error::InvalidRequest(format!(
        "no free host interface name for {id}"
    )))
}

async fn wire(
    nl: &Netlink,
    pin: &PinDir,
    env: &SubnetEnv,
    rec: &mut Record,
    tmp_if: &str,
    maps: &mut Maps,
) -> anyhow::Result<()> {
    nl.create_veth(&rec.host_ifname, tmp_if).await?;
    let peer = nl.require_link(tmp_if).await?;
    let netns_file = fs::File::open(&rec.netns_path)?;
    nl.move_to_netns(peer.index, &netns_file).await?;
    let host = nl.require_link(&rec.host_ifname).await?;
    // The host side takes the underlay's MTU: a packet from a container
    // that raised its own MTU then reaches from_container, which answers it
    // with ICMP fragmentation-needed instead of a silent local drop.
    nl.set_up(
        host.index,
        Some(env.mtu + crate::control::config::VXLAN_OVERHEAD),
    )
    .await?;

    let (ifname, mtu, gw, ip) = (rec.ifname.clone(), env.mtu, gateway(env.subnet), rec.ip);
    let tmp = tmp_if.to_string();
    let mac = netlink::in_netns(&rec.netns_path, async move |nl: Netlink| {
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

    connect_host_side(nl, pin, maps, rec, &host, mac).await
}

/// The host side of a wired veth, shared by `attach` and the Docker
/// handoff: the /32 route through which the host stack reaches the
/// container (and answers its ARP for the gateway), `from_container` and
/// `to_container` on the host end, the map entry, and the record's interface fields.
pub(super) async fn connect_host_side(
    nl: &Netlink,
    pin: &PinDir,
    maps: &mut Maps,
    rec: &mut Record,
    host: &crate::netlink::Link,
    mac: [u8; 6],
) -> anyhow::Result<()> {
    nl.replace_route(Ipv4Net::new(rec.ip, 32)?, host.index, None)
        .await?;
    let host_mac = host.mac.context("host interface has no MAC")?;
    datapath::attach_container(pin, &rec.host_ifname)?;
    maps.insert_endpoint(
        rec.ip,
        &Endpoint {
            ifindex: host.index,
            mac,
            host_mac,
        },
    )?;
    rec.host_ifindex = host.index;
    rec.mac = Mac(mac).to_string();
    rec.host_mac = Mac(host_mac).to_string();
    Ok(())
}

/// Undoes whatever part of an attach exists: the map entry (only if it is
/// this attachment's), the veth (host side, or its peer not yet moved) and
/// the record.
async fn roll_back(
    nl: &Netlink,
    maps: Option<&mut Maps>,
    run_dir: &Path,
    rec: &Record,
    tmp_if: &str,
) {
    let host = nl.link(&rec.host_ifname).await.ok().flatten();
    if let Some(maps) = maps
        && let Ok(entries) = maps.endpoints()
        && let Some(entry) = entries.get(&rec.ip)
        && host.as_ref().is_none_or(|h| h.index == entry.ifindex)
    {
        let _ = maps.remove_endpoint(rec.ip);
    }
    if let Some(link) = host {
        let _ = nl.delete_link(link.index).await;
    }
    if let Ok(Some(link)) = nl.link(tmp_if).await {
        let _ = nl.delete_link(link.index).await;
    }
    if let Err(e) = record::remove(run_dir, &rec.id) {
        warn!(id = rec.id, "{e:#}");
    }
}

/// Rolls back pending records: attaches that died half-way. Takes the lock.
pub async fn recover(pin: &PinDir, run_dir: &Path) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    recover_locked(&nl, pin, run_dir).await;
    Ok(())
}

async fn recover_locked(nl: &Netlink, pin: &PinDir, run_dir: &Path) {
    let Ok(all) = all_records(run_dir) else {
        return;
    };
    let mut maps = Maps::open(pin).ok();
    for rec in all.iter().filter(|r| r.phase == Phase::Pending) {
        warn!(id = rec.id, ip = %rec.ip, "rolling back an attach that did not finish");
        let tmp_if = rec.host_ifname.replacen("ndv", "ndt", 1);
        roll_back(nl, maps.as_mut(), run_dir, rec, &tmp_if).await;
    }
}

/// Makes the ENDPOINTS map equal to the attachment records whose host veth
/// still exists: after a restart, and after an upgrade that brought fresh
/// maps. Records of containers deleted meanwhile are dropped.
pub async fn restore(maps: &mut Maps, run_dir: &Path) -> anyhow::Result<()> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let mut want = BTreeMap::new();
    for rec in all_records(run_dir)? {
        if rec.phase == Phase::Reserved {
            continue;
        }
        let link = nl.link(&rec.host_ifname).await?;
        match link {
            Some(link) if rec.phase == Phase::Ready && link.index == rec.host_ifindex => {
                let mac: Mac = rec.mac.parse()?;
                let host_mac: Mac = rec.host_mac.parse()?;
                want.insert(
                    rec.ip,
                    Endpoint {
                        ifindex: link.index,
                        mac: mac.0,
                        host_mac: host_mac.0,
                    },
                );
            }
            link => {
                warn!(id = rec.id, ip = %rec.ip, phase = ?rec.phase, "container is gone or half-made; forgetting it");
                if let Some(link) = link.filter(|_| rec.phase == Phase::Pending) {
                    let _ = nl.delete_link(link.index).await;
                }
                record::remove(run_dir, &rec.id)?;
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

/// Undoes `attach` for an id or namespace; an unknown one is an error.
pub async fn detach(pin: &PinDir, run_dir: &Path, key: &str) -> Result<Record, Error> {
    release(pin, run_dir, key)
        .await?
        .ok_or_else(|| Error::NotAttached(key.to_string()))
}

/// Undoes `attach` if there is anything to undo (CNI DEL): the map entry,
/// the veth (which takes its TC filter and route along) and the record.
/// Keeps going past errors and reports them together.
pub async fn release(pin: &PinDir, run_dir: &Path, key: &str) -> Result<Option<Record>, Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let Some(rec) = record::find(run_dir, key)? else {
        return Ok(None);
    };
    release_locked(&nl, pin, run_dir, &rec).await?;
    Ok(Some(rec))
}

async fn release_locked(
    nl: &Netlink,
    pin: &PinDir,
    run_dir: &Path,
    rec: &Record,
) -> Result<(), Error> {
    let mut errors = Vec::new();
    // A reserved address has no interface yet.
    let host = match rec.host_ifname.is_empty() {
        true => None,
        false => nl.link(&rec.host_ifname).await?,
    };
    // No pins: the data path is torn down, and the entry with it.
    if let Ok(mut maps) = Maps::open(pin)
        && let Ok(entries) = maps.endpoints()
        && let Some(entry) = entries.get(&rec.ip)
        && (entry.ifindex == rec.host_ifindex
            || host.as_ref().is_some_and(|h| h.index == entry.ifindex))
        && let Err(e) = maps.remove_endpoint(rec.ip)
    {
        errors.push(format!("removing map entry: {e:#}"));
    }
    // Gone already when the namespace was deleted first.
    if let Some(link) = host
        && let Err(e) = nl.delete_link(link.index).await
    {
        errors.push(format!("{e:#}"));
    }
    record::remove(run_dir, &rec.id)?;
    if !errors.is_empty() {
        return Err(
            anyhow::anyhow!("detached {} with errors: {}", rec.id, errors.join("; ")).into(),
        );
    }
    info!(id = rec.id, ip = %rec.ip, "detached");
    Ok(())
}

/// Detaches every attachment of this host, reporting every failure.
pub async fn detach_all(pin: &PinDir, run_dir: &Path) -> Result<(), Error> {
    let mut errors = Vec::new();
    for rec in all_records(run_dir)? {
        if let Err(e) = release(pin, run_dir, &rec.id).await {
            errors.push(format!("{e:#}"));
        }
    }
    if !errors.is_empty() {
        return Err(anyhow::anyhow!("{}", errors.join("; ")).into());
    }
    Ok(())
}

/// Removes the CNI attachments of `network` whose id is not in `keep`, and
/// any half-made attachment. Returns the ids removed. Endpoints made by
/// `netd attach` or the Docker driver are not the runtime's to collect,
/// even when they carry the same network name.
pub async fn gc(
    pin: &PinDir,
    run_dir: &Path,
    network: &str,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    recover_locked(&nl, pin, run_dir).await;
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for rec in all_records(run_dir)? {
        let cni = rec.id.starts_with("cni/");
        if !cni || rec.network.as_deref() != Some(network) || keep.contains(&rec.id) {
            continue;
        }
        match release_locked(&nl, pin, run_dir, &rec).await {
            Ok(()) => removed.push(rec.id),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        return Err(anyhow::anyhow!("{}", errors.join("; ")).into());
    }
    Ok(removed)
}

/// Compares the kernel with the record of `id`: the host veth, its TC
/// filter, the map entry, and inside the namespace the interface, its
/// address and the default route via the gateway.
pub async fn check(pin: &PinDir, run_dir: &Path, id: &str) -> Result<Record, Error> {
    let env = SubnetEnv::read(run_dir).map_err(Error::NotReady)?;
    let maps = Maps::open(pin).map_err(Error::NotReady)?;
    let rec = record::find(run_dir, id)?
        .filter(|r| r.id == id)
        .ok_or_else(|| Error::NotAttached(id.to_string()))?;
    let bad = |what: String| Error::Mismatch {
        id: id.to_string(),
        what,
    };
    if rec.phase != Phase::Ready {
        return Err(bad("attachment did not finish".into()));
    }
    let nl = Netlink::connect()?;
    let host = nl
        .link(&rec.host_ifname)
        .await?
        .filter(|l| l.index == rec.host_ifindex)
        .ok_or_else(|| bad(format!("host interface {} is gone", rec.host_ifname)))?;
    if !datapath::container_attached(&host.name) {
        return Err(bad(format!("TC programs missing on {}", host.name)));
    }
    let want = Endpoint {
        ifindex: host.index,
        mac: rec.mac.parse::<Mac>().map_err(anyhow::Error::from)?.0,
        host_mac: rec.host_mac.parse::<Mac>().map_err(anyhow::Error::from)?.0,
    };
    if maps.endpoints()?.get(&rec.ip) != Some(&want) {
        return Err(bad(format!(
            "map entry of {} differs from the record",
            rec.ip
        )));
    }
    if !rec.netns_path.exists() {
        return Err(Error::NoNamespace(rec.netns_path.clone()));
    }
    let (ifname, ip, gw) = (rec.ifname.clone(), rec.ip, gateway(env.subnet));
    let problem = netlink::in_netns(&rec.netns_path, async move |nl: Netlink| {
        let Some(link) = nl.link(&ifname).await? else {
            return Ok(Some(format!("no interface {ifname} in the namespace")));
        };
        if !nl
            .ipv4_prefixes(link.index)
            .await?
            .contains(&Ipv4Net::new(ip, 32)?)
        {
            return Ok(Some(format!("{ifname} does not hold {ip}/32")));
        }
        if nl.default_gateway().await? != Some((link.index, Some(gw))) {
            return Ok(Some(format!("no default route via {gw} on {ifname}")));
        }
        Ok(None)
    })
    .await?;
    match problem {
        Some(what) => Err(bad(what)),
        None => Ok(rec),
    }
}
