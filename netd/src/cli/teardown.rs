//! `netd teardown`: removes everything netd made on this host. It keeps
//! going past each failure and reports them all at the end; what is already
//! gone is not a failure, so a second teardown succeeds.
//!
//! The etcd lease is not revoked (teardown has no etcd access): it expires
//! after its TTL, as it does when a stopped daemon stops renewing it.

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{Result, bail};

use super::run::GATEWAY_LINK;
use crate::{
    control::lease::gateway,
    datapath::{self, PinDir},
    endpoint,
    netlink::Netlink,
    state::{self, NodeState, SubnetEnv},
};

pub async fn teardown(pin: &PinDir, run_dir: &Path) -> Result<()> {
    let node = NodeState::read(run_dir);
    if let Some(pid) = node.as_ref().map(|n| n.pid).filter(|p| daemon_alive(*p)) {
        bail!(
            "netd run (pid {pid}) is still running with run directory {}: stop it first",
            run_dir.display()
        );
    }
    let mut errors: Vec<anyhow::Error> = Vec::new();
    if let Err(e) = endpoint::detach_all(pin, run_dir).await {
        errors.push(e.into());
    }
    if let Err(e) = endpoint::remove_records_dir(run_dir) {
        errors.push(e);
    }
    // What the Docker driver keeps of its networks (names by id).
    let docker = run_dir.join("docker");
    match fs::remove_dir_all(&docker) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            errors.push(anyhow::Error::from(e).context(format!("removing {}", docker.display())));
        }
        _ => {}
    }
    if let Some(gw) = gateway_address(run_dir, node.as_ref())
        && let Err(e) = remove_gateway(gw).await
    {
        errors.push(e);
    }
    // Before the data path: it reads subnet.env for the gateway address.
    errors.extend(
        crate::egress::teardown(pin, run_dir)
            .await
            .into_iter()
            .map(anyhow::Error::msg),
    );
    if let Err(e) = remove_tunnel_device().await {
        errors.push(e);
    }
    let underlay = node.and_then(|n| n.underlay);
    errors.extend(datapath::teardown(pin, run_dir, underlay).await);
    errors.extend(state::remove_published(run_dir));
    // Only an empty run directory goes: others may keep files in it.
    let _ = fs::remove_dir(run_dir);
    if !errors.is_empty() {
        let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        bail!(
            "teardown finished with {} error(s): {}",
            all.len(),
            all.join("; ")
        );
    }
    Ok(())
}

/// The gateway of the subnet this node last held, from `subnet.env` or,
/// when that is gone, `state.json`.
fn gateway_address(run_dir: &Path, node: Option<&NodeState>) -> Option<Ipv4Addr> {
    SubnetEnv::read(run_dir)
        .ok()
        .map(|env| env.subnet)
        .or(node.and_then(|n| n.subnet))
        .map(gateway)
}

/// `netd.vx`, the device that receives reassembled VXLAN.
async fn remove_tunnel_device() -> Result<()> {
    let nl = Netlink::connect()?;
    Ok(datapath::tunnel_device::remove(&nl).await?)
}

async fn remove_gateway(gw: Ipv4Addr) -> Result<()> {
    let nl = Netlink::connect()?;
    if let Some(lo) = nl.link(GATEWAY_LINK).await? {
        nl.remove_address(lo.index, gw, 32).await?;
    }
    Ok(())
}

/// Whether `pid` is a live netd process (not a pid reused by another).
fn daemon_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with("netd"))
}
