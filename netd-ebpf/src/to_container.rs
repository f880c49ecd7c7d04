//! Packets the host stack hands to a container (TC egress of its host-side
//! veth): from the outside world or the underlay by plain routing, replies
//! of masqueraded connections after de-NAT, the host's own traffic. They
//! pass no other netd program, so ingress policy is judged here.
//!
//! netd's own deliveries do not come this way: `bpf_redirect_peer` (local
//! delivery, decapsulation, the tunnel device) and an XDP redirect into a
//! veth skip this hook. The one TC redirect to a veth's egress is
//! `from_container` turning a packet into an ICMP error for its sender; it
//! entered on this same veth and is passed unjudged.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netd_common::Counter;

use crate::{
    headers::*,
    maps::count,
    policy::{self, Packet},
};

/// The verdict for one packet: the only exit, where a drop is counted.
#[inline(always)]
pub fn to_container(ctx: &TcContext) -> i32 {
    match judge(ctx) {
        Ok(()) => TC_ACT_OK as i32,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn judge(ctx: &TcContext) -> Result<(), Counter> {
    let (iif, ifindex) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
    // Turned around on this veth by `from_container` (an ICMP error).
    if iif == ifindex {
        return Ok(());
    }
    let Some(eth) = ctx.read::<EthHdr>(0) else {
        return Ok(());
    };
    if eth.proto != ETH_P_IP.to_be() {
        return Ok(());
    }
    // Received on no interface: the host itself sent it.
    if iif == 0 {
        return policy::ingress_from_host(ctx, ETH_HLEN);
    }
    policy::ingress(ctx, ETH_HLEN)
}
