//! XDP attachment through rtnetlink (IFLA_XDP), which the kernel keeps after
//! this process exits, unlike a bpf_link owned by it.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Context as _, Result};
use netlink_packet_route::link::{LinkAttribute, LinkXdp};
use rtnetlink::LinkUnspec;

use super::PinDir;
use crate::netlink::Netlink;

const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpFlags {
    /// Native if the driver supports it, generic otherwise.
    Any,
    /// Native only: fails where the driver has no XDP support.
    Driver,
}

impl XdpFlags {
    fn bits(self) -> u32 {
        match self {
            XdpFlags::Any => 0,
            XdpFlags::Driver => XDP_FLAGS_DRV_MODE,
        }
    }
}

/// Attaches (or replaces) the pinned XDP program on `iface`.
pub async fn attach(pin: &PinDir, iface: &str, flags: XdpFlags) -> Result<()> {
    let prog = super::pinned_xdp(pin)?;
    let fd = prog.fd()?.as_fd().as_raw_fd();
    set(iface, fd, flags)
        .await
        .with_context(|| format!("attaching XDP to {iface} ({flags:?})"))
}

pub async fn detach(iface: &str) -> Result<()> {
    set(iface, -1, XdpFlags::Any)
        .await
        .with_context(|| format!("detaching XDP from {iface}"))
}

async fn set(iface: &str, fd: i32, flags: XdpFlags) -> Result<()> {
    let nl = Netlink::connect()?;
    let link = nl.require_link(iface).await?;
    let msg = LinkUnspec::new_with_index(link.index)
        .append_extra_attribute(LinkAttribute::Xdp(vec![
            LinkXdp::Fd(fd),
            LinkXdp::Flags(flags.bits()),
        ]))
        .build();
    nl.set_link(msg).await
}
