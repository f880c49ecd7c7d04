//! netd's kernel programs: one per hook, each a thin wrapper around the
//! module that does the work.
#![no_std]
#![no_main]

mod conntrack;
mod decap;
mod encap;
mod headers;
mod maps;
mod policy;
mod to_container;
mod tunnel_device;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// TC ingress of a container's host-side veth: packets leaving the container.
#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    encap::from_container(&ctx)
}

/// TC egress of a container's host-side veth: packets the host stack
/// delivers to the container, judged as its ingress.
#[classifier]
pub fn to_container(ctx: TcContext) -> i32 {
    to_container::to_container(&ctx)
}

/// XDP on the underlay NIC. Frags-aware: only the first buffer (headers) is
/// read or written, so frames larger than a page are handled too.
#[xdp(frags)]
pub fn xdp_from_underlay(ctx: XdpContext) -> u32 {
    decap::xdp_from_underlay(&ctx)
}

/// TC ingress of the underlay NIC: the same decapsulation as the XDP program.
#[classifier]
pub fn tc_from_underlay(ctx: TcContext) -> i32 {
    decap::tc_from_underlay(&ctx)
}

/// TC ingress of netd's collect_md VXLAN device: VXLAN datagrams the stack
/// reassembled from outer fragments.
#[classifier]
pub fn from_tunnel_device(ctx: TcContext) -> i32 {
    tunnel_device::from_tunnel_device(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
