//! The benchmark's `cilium-style` data path: what Cilium's `bpf_lxc` and
//! `bpf_overlay` do for IPv4 in tunnel mode, reduced to forwarding (no
//! policy, conntrack, identities, NAT or load balancing). The kernel's
//! collect_md VXLAN device builds and strips the outer headers; these
//! programs only pick the tunnel endpoint and deliver.
//!
//! ```text
//! from_container (TC ingress, host-side veth)
//!   ENDPOINTS hit → TTL−1, MACs rewritten, bpf_redirect_peer
//!   TUNNELS hit   → bpf_skb_set_tunnel_key(remote, VNI 1), bpf_redirect → VXLAN device
//!   otherwise     → host stack
//! from_overlay (TC ingress, VXLAN device)
//!   tunnel key VNI 1 and ENDPOINTS hit → TTL−1, MACs rewritten, bpf_redirect_peer
//! ```
#![no_std]
#![no_main]

mod deliver;
mod maps;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// TC ingress of a container's host-side veth (Cilium's `cil_from_container`).
#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    deliver::from_container(&ctx)
}

/// TC ingress of the VXLAN device (Cilium's `cil_from_overlay`).
#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    deliver::from_overlay(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
