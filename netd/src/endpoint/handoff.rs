//! Endpoints whose container end the runtime moves itself (Docker's
//! libnetwork): the address is reserved first, the veth is made later with
//! both ends in the host namespace, and the runtime moves the container end
//! into its sandbox. All changes happen under the allocator's lock, so these
//! addresses never collide with `netd attach` or the CNI plugin.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use rtnetlink::LinkUnspec;
use tracing::info;

use super::{
    Error, Lock,
    allocator::pick_ip,
    attach::{connect_host_side, free_names},
    record::{self, Phase, Record, all_records},
};
use crate::{
    control::lease::gateway,
    datapath::{Maps, PinDir},
    netlink::Netlink,
    state::SubnetEnv,
};

/// What the runtime needs to move the container end into its sandbox.
#[derive(Debug, Clone)]
pub struct Handoff {
    /// The container end's name in the host namespace.
    pub ifname: String,
    pub gateway: Ipv4Addr,
    pub record: Record,
}

/// The id of the reservation of `ip` made for a runtime: `<runtime>/<ip>`.
pub fn reservation_id(runtime: &str, ip: Ipv4Addr) -> String {
    format!("{runtime}/{ip}")
}

/// Holds an address (the requested one, or the lowest free) with no kernel
/// objects yet; `netd status` does not list it.
pub fn reserve(
    run_dir: &Path,
    runtime: &str,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, Error> {
    let env = SubnetEnv::read(run_dir).map_err(Error::NotReady)?;
    let _lock = Lock::acquire(run_dir)?;
    let existing = all_records(run_dir)?;
    let used = existing.iter().map(|r| r.ip).collect();
    let ip = pick_ip(env.subnet, requested, &used)?;
    let rec = Record {
        id: reservation_id(runtime, ip),
        netns: String::new(),
        netns_path: Default::default(),
        ifname: String::new(),
        host_ifname: String::new(),
        host_ifindex: 0,
        ip,
        mac: String::new(),
        host_mac: String::new(),
        phase: Phase::Reserved,
        network: None,
        container_id: None,
        labels: Default::default(),
    };
    record::write(run_dir, &rec)?;
    info!(id = rec.id, %ip, "address reserved");
    Ok(ip)
}

/// Names the runtime's endpoint and network on the reservation of `ip`.
pub fn bind(
    run_dir: &Path,
    runtime: &str,
    ip: Ipv4Addr,
    endpoint_id: &str,
    network: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Record, Error> {
    let invalid = |e: super::labels::LabelError| Error::InvalidRequest(e.to_string());
    super::labels::check_network(network).map_err(invalid)?;
    super::labels::check_labels(labels).map_err(invalid)?;
    let _lock = Lock::acquire(run_dir)?;
    let id = reservation_id(runtime, ip);
    let mut rec = record::find(run_dir, &id)?
        .filter(|r| r.id == id)
        .ok_or_else(|| Error::Address(format!("{ip} was not handed out by netd on this host")))?;
    match rec.container_id.as_deref() {
        Some(other) if other != endpoint_id => {
            return Err(Error::Address(format!("{ip} belongs to endpoint {other}")));
        }
        _ => {}
    }
    rec.container_id = Some(endpoint_id.to_string());
    rec.network = Some(network.to_string());
    rec.labels = labels.clone();
    record::write(run_dir, &rec)?;
    Ok(rec)
}

/// The record of a runtime's endpoint.
pub fn find_endpoint(
    run_dir: &Path,
    runtime: &str,
    endpoint_id: &str,
) -> Result<Option<Record>, Error> {
    let prefix = format!("{runtime}/");
    Ok(all_records(run_dir)?
        .into_iter()
        .find(|r| r.id.starts_with(&prefix) && r.container_id.as_deref() == Some(endpoint_id)))
}

/// Makes the veth of a bound endpoint, both ends in the host namespace,
/// with its route, TC program and map entry (whose MAC is the container
/// end's, which moving keeps). Idempotent: a joined endpoint answers again.
pub async fn join(
    pin: &PinDir,
    run_dir: &Path,
    runtime: &str,
    endpoint_id: &str,
    sandbox: &str,
) -> Result<Handoff, Error> {
    let env = SubnetEnv::read(run_dir).map_err(Error::NotReady)?;
    let mut maps = Maps::open(pin).map_err(Error::NotReady)?;
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let mut rec = find_endpoint(run_dir, runtime, endpoint_id)?
        .ok_or_else(|| Error::NotAttached(endpoint_id.to_string()))?;
    let existing = all_records(run_dir)?;
    let (host_if, peer_if) = match rec.phase {
        Phase::Ready => container_end(&rec),
        _ => free_names(&nl, &rec.id, &existing).await?,
    };
    if rec.phase != Phase::Ready {
        rec.host_ifname = host_if.clone();
        rec.netns = sandbox.to_string();
        rec.netns_path = sandbox.into();
        if let Err(e) = wire(&nl, pin, &env, &mut rec, &peer_if, &mut maps).await {
            unwire(&nl, Some(&mut maps), &rec).await;
            return Err(e.into());
        }
        rec.phase = Phase::Ready;
        record::write(run_dir, &rec)?;
        info!(id = rec.id, ip = %rec.ip, host_if, "joined");
    }
    Ok(Handoff {
        ifname: peer_if,
        gateway: gateway(env.subnet),
        record: rec,
    })
}

/// The host end and the container end's name before the move.
fn container_end(rec: &Record) -> (String, String) {
    (
        rec.host_ifname.clone(),
        rec.host_ifname.replacen("ndv", "ndt", 1),
    )
}

async fn wire(
    nl: &Netlink,
    pin: &PinDir,
    env: &SubnetEnv,
    rec: &mut Record,
    peer_if: &str,
    maps: &mut Maps,
) -> anyhow::Result<()> {
    nl.create_veth(&rec.host_ifname, peer_if).await?;
    let peer = nl.require_link(peer_if).await?;
    let host = nl.require_link(&rec.host_ifname).await?;
    // As in `attach`: the host end takes the underlay's MTU, the container
    // end the overlay's.
    nl.set_up(
        host.index,
        Some(env.mtu + crate::control::config::VXLAN_OVERHEAD),
    )
    .await?;
    set_mtu(nl, peer.index, env.mtu).await?;
    let mac = peer.mac.context("container interface has no MAC")?;
    connect_host_side(nl, pin, maps, rec, &host, mac).await
}

async fn set_mtu(nl: &Netlink, index: u32, mtu: u32) -> anyhow::Result<()> {
    nl.set_link(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .await
}

/// Removes the map entry (only if it is this endpoint's) and the veth.
async fn unwire(nl: &Netlink, maps: Option<&mut Maps>, rec: &Record) {
    let host = match rec.host_ifname.is_empty() {
        true => None,
        false => nl.link(&rec.host_ifname).await.ok().flatten(),
    };
    if let Some(maps) = maps
        && let Ok(entries) = maps.endpoints()
        && let Some(entry) = entries.get(&rec.ip)
        && (entry.ifindex == rec.host_ifindex
            || host.as_ref().is_some_and(|h| h.index == entry.ifindex))
    {
        let _ = maps.remove_endpoint(rec.ip);
    }
    if let Some(link) = host {
        let _ = nl.delete_link(link.index).await;
    }
    let (_, peer_if) = container_end(rec);
    if !rec.host_ifname.is_empty()
        && let Ok(Some(link)) = nl.link(&peer_if).await
    {
        let _ = nl.delete_link(link.index).await;
    }
}

/// Undoes `join`, keeping the address reserved and bound. Nothing to undo
/// is success.
pub async fn leave(
    pin: &PinDir,
    run_dir: &Path,
    runtime: &str,
    endpoint_id: &str,
) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let Some(rec) = find_endpoint(run_dir, runtime, endpoint_id)? else {
        return Ok(());
    };
    unjoin_locked(&nl, pin, run_dir, rec).await
}

async fn unjoin_locked(
    nl: &Netlink,
    pin: &PinDir,
    run_dir: &Path,
    mut rec: Record,
) -> Result<(), Error> {
    let mut maps = Maps::open(pin).ok();
    unwire(nl, maps.as_mut(), &rec).await;
    if rec.phase != Phase::Reserved {
        rec.phase = Phase::Reserved;
        rec.host_ifname.clear();
        rec.host_ifindex = 0;
        rec.mac.clear();
        rec.host_mac.clear();
        rec.netns.clear();
        rec.netns_path = Default::default();
        record::write(run_dir, &rec)?;
        info!(id = rec.id, ip = %rec.ip, "left");
    }
    Ok(())
}

/// Undoes `join` and `bind`: the address stays reserved for the runtime to
/// release. Nothing to undo is success.
pub async fn unbind(
    pin: &PinDir,
    run_dir: &Path,
    runtime: &str,
    endpoint_id: &str,
) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let Some(mut rec) = find_endpoint(run_dir, runtime, endpoint_id)? else {
        return Ok(());
    };
    unjoin_locked(&nl, pin, run_dir, rec.clone()).await?;
    rec = record::find(run_dir, &rec.id)?.unwrap_or(rec);
    rec.container_id = None;
    rec.network = None;
    rec.labels.clear();
    record::write(run_dir, &rec)?;
    Ok(())
}

/// Frees the address reserved for the runtime, with whatever of its
/// endpoint is left. An address not held is success.
pub async fn unreserve(
    pin: &PinDir,
    run_dir: &Path,
    runtime: &str,
    ip: Ipv4Addr,
) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let _lock = Lock::acquire(run_dir)?;
    let id = reservation_id(runtime, ip);
    let Some(rec) = record::find(run_dir, &id)?.filter(|r| r.id == id) else {
        return Ok(());
    };
    let mut maps = Maps::open(pin).ok();
    unwire(&nl, maps.as_mut(), &rec).await;
    record::remove(run_dir, &id)?;
    info!(id, %ip, "address released");
    Ok(())
}
