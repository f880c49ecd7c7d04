//! The VXLAN device that receives what the underlay fragmented.
//!
//! The encapsulation leaves DF clear, so a router whose next link has a
//! smaller MTU fragments our outer packets, as it would a kernel VXLAN
//! device's. The programs on the NIC cannot reassemble; they pass outer
//! fragments from peers to the stack, which reassembles them and hands the
//! datagram to whichever UDP socket holds the VXLAN port. That socket is
//! this device's: external (collect_md) mode, so it takes every VNI and
//! remote, strips the outer headers and keeps them as tunnel metadata for
//! `from_tunnel_device` on its TC ingress, which checks them against the
//! peers and the VNI and delivers into the container.
//!
//! Reassembly rather than path-MTU discovery: containers keep the full
//! MTU (underlay minus 50) whatever the path, no ICMP from the underlay has
//! to reach or be trusted by the host, and a flannel host on the same path
//! behaves the same way.

use std::time::Duration;

use netd_common::names;
use thiserror::Error;
use tracing::{info, warn};

use super::{PinDir, attach_tc};
use crate::netlink::{Netlink, Vxlan};

/// One per host namespace; flannel's is `flannel.1`.
pub const DEVICE: &str = "netd.vx";
/// How often the daemon checks that the device and its program are there.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum TunnelDeviceError {
    #[error("{DEVICE} exists and is not a VXLAN device ({kind}); remove it")]
    NotOurs { kind: String },
    #[error(
        "UDP port {port} is already bound in this namespace (another VXLAN device such as flannel.1?): outer fragments cannot be reassembled for netd"
    )]
    PortInUse { port: u16 },
    #[error("{DEVICE}: {0:#}")]
    Netlink(anyhow::Error),
    #[error("attaching from_tunnel_device to {DEVICE}: {0:#}")]
    Attach(anyhow::Error),
}

/// What [`ensure`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// The device was missing or set up differently: (re-)created.
    Created,
    /// The device was there without our program.
    Attached,
}

/// Makes the kernel have the device (external, on `port`, up) with
/// `from_tunnel_device` on its ingress. `attach` re-attaches the program
/// even when one is there (a new build).
pub async fn ensure(
    nl: &Netlink,
    pin: &PinDir,
    port: u16,
    attach: bool,
) -> Result<Change, TunnelDeviceError> {
    let current = nl.vxlan(DEVICE).await.map_err(TunnelDeviceError::Netlink)?;
    let (index, created) = match current {
        Some((_, Some(vx))) if wanted(&vx, port) => {
            if !vx.up {
                nl.set_up(vx.index, None)
                    .await
                    .map_err(TunnelDeviceError::Netlink)?;
            }
            (vx.index, false)
        }
        Some((_, Some(vx))) => {
            info!(
                device = DEVICE,
                ?vx,
                port,
                "tunnel device set up differently: re-creating"
            );
            nl.delete_link(vx.index)
                .await
                .map_err(TunnelDeviceError::Netlink)?;
            (create(nl, port).await?, true)
        }
        Some((link, None)) => {
            return Err(TunnelDeviceError::NotOurs {
                kind: link.kind.unwrap_or_else(|| "physical".into()),
            });
        }
        None => (create(nl, port).await?, true),
    };
    let missing = !nl
        .has_ingress_bpf(index)
        .await
        .map_err(TunnelDeviceError::Netlink)?;
    if created || attach || missing {
        attach_tc(pin, names::FROM_TUNNEL_DEVICE, DEVICE).map_err(TunnelDeviceError::Attach)?;
    }
    Ok(match (created, missing) {
        (true, _) => Change::Created,
        (false, true) => Change::Attached,
        (false, false) => Change::None,
    })
}

fn wanted(vx: &Vxlan, port: u16) -> bool {
    vx.external && vx.port == Some(port)
}

async fn create(nl: &Netlink, port: u16) -> Result<u32, TunnelDeviceError> {
    if let Err(e) = nl.create_vxlan_external(DEVICE, port).await {
        let in_use = e.downcast_ref::<rtnetlink::Error>().is_some_and(
            |e| matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EADDRINUSE),
        );
        return Err(if in_use {
            TunnelDeviceError::PortInUse { port }
        } else {
            TunnelDeviceError::Netlink(e)
        });
    }
    match nl.vxlan(DEVICE).await.map_err(TunnelDeviceError::Netlink)? {
        Some((link, _)) => Ok(link.index),
        None => Err(TunnelDeviceError::Netlink(anyhow::anyhow!(
            "created but not found"
        ))),
    }
}

/// Puts the device in place (with this build's program). A failure is
/// logged, not fatal: only fragmented VXLAN depends on it. Returns the
/// failure, so [`reconcile`] reports only a new one.
pub async fn start(nl: &Netlink, pin: &PinDir, port: u16) -> Option<String> {
    match ensure(nl, pin, port, true).await {
        Ok(_) => {
            info!(device = DEVICE, port, "tunnel device ready");
            None
        }
        Err(e) => {
            warn!("{e}");
            Some(e.to_string())
        }
    }
}

/// Keeps the device in place for as long as the daemon runs: re-created if
/// someone deletes it, the program re-attached if it goes missing.
pub async fn reconcile(
    pin: PinDir,
    port: u16,
    mut last_error: Option<String>,
) -> anyhow::Result<()> {
    let nl = Netlink::connect()?;
    loop {
        tokio::time::sleep(RECONCILE_EVERY).await;
        match ensure(&nl, &pin, port, false).await {
            Ok(Change::None) => last_error = None,
            Ok(change) => {
                info!(device = DEVICE, ?change, "tunnel device restored");
                last_error = None;
            }
            Err(e) => {
                // Once per distinct failure, not every few seconds.
                let text = e.to_string();
                if last_error.as_ref() != Some(&text) {
                    warn!("{text}");
                    last_error = Some(text);
                }
            }
        }
    }
}

/// Deletes the device if it is there (teardown).
pub async fn remove(nl: &Netlink) -> Result<(), TunnelDeviceError> {
    match nl.vxlan(DEVICE).await.map_err(TunnelDeviceError::Netlink)? {
        Some((_, Some(vx))) => nl
            .delete_link(vx.index)
            .await
            .map_err(TunnelDeviceError::Netlink),
        // Not a VXLAN device: not ours to delete.
        Some((_, None)) | None => Ok(()),
    }
}
