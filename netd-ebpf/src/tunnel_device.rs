//! VXLAN datagrams the host stack reassembled from outer fragments.
//!
//! A router on the underlay path with a smaller MTU fragments our outer
//! packets (the encapsulation leaves DF clear). The programs on the NIC
//! cannot reassemble, so they pass the fragments up; the stack reassembles
//! them and hands the datagram to the socket of netd's collect_md VXLAN
//! device, which strips the outer headers and records them as tunnel
//! metadata. This program, on that device's TC ingress, applies the same
//! rules as the decapsulation on the NIC (a known peer, our VNI) and
//! delivers the inner frame into the container.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_redirect_peer, bpf_skb_change_type, bpf_skb_get_tunnel_key},
    programs::TcContext,
};
use netd_common::Counter;

use crate::{
    headers::*,
    maps::{self, count},
    policy,
};

/// `PACKET_HOST`: the inner frame is for this host, whatever its MAC says.
const PACKET_HOST: u32 = 0;

#[inline(always)]
pub fn from_tunnel_device(ctx: &TcContext) -> i32 {
    match try_deliver(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn try_deliver(ctx: &TcContext) -> Result<i32, Counter> {
    let cfg = maps::config().ok_or(Counter::NotConfigured)?;
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    let size = core::mem::size_of::<bpf_tunnel_key>() as u32;
    // Fails on a frame that did not come out of the tunnel socket.
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size, 0) } != 0 {
        return Err(Counter::DropMalformed);
    }
    // Both in host byte order.
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
    if !maps::is_peer(remote.to_be_bytes()) {
        return Err(Counter::DropUnknownPeer);
    }
    if key.tunnel_id != cfg.vni {
        return Err(Counter::DropBadVni);
    }
    // The first fragment's payload heads the linear area; make sure.
    const PROBE: usize = ETH_HLEN + IPV4_HLEN;
    if ctx.data() + PROBE > ctx.data_end() && ctx.len() as usize >= PROBE {
        let _ = ctx.pull_data(PROBE as u32);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0).ok_or(Counter::DropMalformed)?;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return Err(Counter::DropMalformed);
    }
    let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN).ok_or(Counter::DropMalformed)?;
    let Some(ep) = maps::container(cfg, unsafe { (*ip).daddr }) else {
        // For the host itself, as the NIC path's decap_to_stack.
        unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
        count(Counter::DecapToStack);
        return Ok(TC_ACT_OK as i32);
    };
    let ep = *ep;
    policy::ingress(ctx, ETH_HLEN)?;
    let eth = EthHdr {
        dst: ep.mac,
        src: ep.host_mac,
        proto: ETH_P_IP.to_be(),
    };
    ctx.store(0, &eth, 0)
        .map_err(|_| Counter::DropAdjustFailed)?;
    count(Counter::ReassembledDelivered);
    Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}
