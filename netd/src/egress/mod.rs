//! Traffic between the overlay and the rest of the world: containers
//! reaching outside the cluster network (masquerading) and hosts reaching
//! remote containers (host access). Both are level-triggered: `reconcile`
//! runs at start and on a timer and puts back whatever is missing.

pub mod host_access;
pub mod masquerade;

use std::{fs, net::Ipv4Addr, path::Path};

use tracing::{error, info, warn};

use crate::{
    datapath::{Maps, PinDir},
    netlink::Netlink,
};
pub use host_access::HostAccess;
pub use masquerade::Masquerade;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    HostAccess(#[from] host_access::Error),
    #[error(transparent)]
    Masquerade(#[from] masquerade::Error),
    #[error("enabling IPv4 forwarding ({IP_FORWARD}): {0}")]
    Forwarding(std::io::Error),
}

/// The desired egress state of this host.
#[derive(Debug, Clone, Copy)]
pub struct Egress {
    pub host_access: HostAccess,
    /// `None` when `--ip-masq` is off: netd's table must then be absent.
    pub masquerade: Option<Masquerade>,
}

pub async fn reconcile(
    nl: &Netlink,
    pin: &PinDir,
    maps: &mut Maps,
    want: &Egress,
) -> Result<(), Error> {
    // Containers' traffic to other hosts' own addresses and to the
    // outside is forwarded by the host stack.
    enable_forwarding()?;
    host_access::reconcile(nl, pin, maps, &want.host_access).await?;
    match &want.masquerade {
        Some(masq) => masquerade::reconcile(masq)?,
        // A kernel without nftables has no table of ours to remove either.
        None => {
            if let Err(e) = masquerade::remove() {
                warn!("checking for a leftover masquerading table: {e}");
            }
        }
    }
    Ok(())
}

/// Runs `reconcile` every `period`, logging failures and trying again.
pub async fn keep(pin: PinDir, want: Egress, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tick.tick().await;
        let result = async {
            let nl = Netlink::connect().map_err(host_access::Error::from)?;
            let mut maps = Maps::open(&pin).map_err(host_access::Error::from)?;
            reconcile(&nl, &pin, &mut maps, &want).await
        };
        if let Err(e) = result.await {
            warn!("egress: {e}");
        }
    }
}

fn enable_forwarding() -> Result<(), Error> {
    let on = fs::read_to_string(IP_FORWARD).map_err(Error::Forwarding)?;
    if on.trim() != "1" {
        fs::write(IP_FORWARD, "1").map_err(Error::Forwarding)?;
        info!("enabled IPv4 forwarding ({IP_FORWARD}) for containers' traffic off the overlay");
    }
    Ok(())
}

/// Removes the veth pair, its entry and netd's nftables table; keeps going
/// past a failure and reports every one.
pub async fn teardown(pin: &PinDir, run_dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let gateway: Option<Ipv4Addr> = crate::state::SubnetEnv::read(run_dir)
        .ok()
        .map(|env| crate::control::lease::gateway(env.subnet));
    match Netlink::connect() {
        Ok(nl) => {
            if let Err(e) = host_access::remove(&nl, pin, gateway).await {
                errors.push(e.to_string());
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    if let Err(e) = masquerade::remove() {
        errors.push(e.to_string());
    }
    for e in &errors {
        error!("{e}");
    }
    errors
}
