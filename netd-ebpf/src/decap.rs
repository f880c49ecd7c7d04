//! Packets arriving on the underlay NIC: VXLAN from known peers is stripped
//! and delivered to the container; everything else is left alone.
//!
//! The classification is shared; the XDP and TC entry points only differ in
//! how they strip 50 bytes and redirect.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action,
    },
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use netd_common::{Counter, Endpoint, PeerMode};

use crate::{
    headers::*,
    maps::{self, SUBNETS, count},
};

/// Offset of the inner Ethernet header in a VXLAN frame.
const INNER_ETH: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
/// Bytes that must be readable to classify a frame.
pub const DECAP_PROBE_LEN: usize = INNER_ETH + ETH_HLEN + IPV4_HLEN;

pub enum Verdict {
    /// Not ours: leave it to the stack untouched.
    Pass,
    Drop(Counter),
    /// Plain IPv4 for a local container: rewrite Ethernet and deliver.
    DeliverPlain(Endpoint),
    /// Strip and hand to this container.
    Deliver(Endpoint),
    /// Strip and hand the inner frame to the host stack, addressed to the
    /// underlay NIC's MAC.
    ToStack([u8; 6]),
}

/// Written in front of a frame (XDP metadata) that the XDP program has
/// already decapsulated, for the TC program behind it to deliver.
const META_DECAPSULATED: u32 = 0x6e65_7464;

/// Plain IPv4 from the underlay may reach a container only when XDP has
/// just stripped it from a peer's VXLAN, or it comes from a subnet routed
/// directly (host-gw or DirectRouting): anything else is a spoofing attempt.
#[inline(always)]
fn plain_allowed(decapsulated: bool, src: [u8; 4]) -> bool {
    decapsulated
        || SUBNETS
            .get(&Key::new(32, src))
            .is_some_and(|peer| peer.mode == PeerMode::Direct as u8)
}

/// Decides what to do with a frame in `[start, end)`; `decapsulated` says
/// the XDP program already stripped its VXLAN headers.
#[inline(always)]
pub fn classify(start: usize, end: usize, decapsulated: bool) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return Verdict::Pass;
    };
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return Verdict::Pass;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return Verdict::Pass;
    };
    let ip = unsafe { &*ip };
    if let Some(ep) = maps::container(ip.daddr) {
        if !plain_allowed(decapsulated, ip.saddr) {
            return Verdict::Drop(Counter::DropUnknownPeer);
        }
        return Verdict::DeliverPlain(*ep);
    }
    // Options on the outer header: not something we ever send.
    if ip.proto != IPPROTO_UDP || ip.header_len() != IPV4_HLEN {
        return Verdict::Pass;
    }
    let Some(udp) = ptr_at::<UdpHdr>(start, end, ETH_HLEN + IPV4_HLEN) else {
        return Verdict::Pass;
    };
    let Some(cfg) = maps::config() else {
        return Verdict::Pass;
    };
    if unsafe { (*udp).dest } != cfg.port.to_be() {
        return Verdict::Pass;
    }
    if u16::from_be(ip.frag_off) & IP_MF_OFFSET != 0 {
        return Verdict::Drop(Counter::DropFragment);
    }
    if !maps::is_peer(ip.saddr) {
        return Verdict::Drop(Counter::DropUnknownPeer);
    }
    let Some(vxlan) = ptr_at::<VxlanHdr>(start, end, ETH_HLEN + IPV4_HLEN + UDP_HLEN) else {
        return Verdict::Drop(Counter::DropMalformed);
    };
    let vxlan = unsafe { &*vxlan };
    if vxlan.flags & VXLAN_FLAG_VNI == 0 || vxlan.vni() != cfg.vni {
        return Verdict::Drop(Counter::DropBadVni);
    }
    let Some(inner_eth) = ptr_at::<EthHdr>(start, end, INNER_ETH) else {
        return Verdict::Drop(Counter::DropMalformed);
    };
    if unsafe { (*inner_eth).proto } != ETH_P_IP.to_be() {
        return Verdict::Drop(Counter::DropMalformed);
    }
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(start, end, INNER_ETH + ETH_HLEN) else {
        return Verdict::Drop(Counter::DropMalformed);
    };
    match maps::container(unsafe { (*inner_ip).daddr }) {
        Some(ep) => Verdict::Deliver(*ep),
        None => Verdict::ToStack(cfg.underlay_mac),
    }
}

/// XDP: rewrite the inner Ethernet header, move the start of the frame past
/// the outer headers and redirect to the container's veth, or (on virtual
/// underlays) pass the inner frame on for TC to deliver.
#[inline(always)]
pub fn xdp_from_underlay(ctx: &XdpContext) -> u32 {
    let (dst, src, deliver) = match classify(ctx.data(), ctx.data_end(), false) {
        Verdict::Pass => {
            count(Counter::UnderlayPassed);
            return xdp_action::XDP_PASS;
        }
        // TC delivers plain frames; XDP has nothing to strip.
        Verdict::DeliverPlain(_) => return xdp_action::XDP_PASS,
        Verdict::Drop(reason) => {
            count(reason);
            return xdp_action::XDP_DROP;
        }
        Verdict::Deliver(ep) => (ep.mac, ep.host_mac, Some(ep.ifindex)),
        Verdict::ToStack(mac) => (mac, [0; 6], None),
    };
    let redirect = maps::config().is_some_and(|c| c.xdp_redirect != 0);
    let Some(inner) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), INNER_ETH) else {
        count(Counter::DropMalformed);
        return xdp_action::XDP_DROP;
    };
    unsafe {
        (*inner).dst = dst;
        (*inner).src = src;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, INNER_ETH as i32) } != 0 {
        count(Counter::DropAdjustFailed);
        return xdp_action::XDP_DROP;
    }
    match deliver {
        Some(ifindex) if redirect => {
            count(Counter::Decapsulated);
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
        Some(_) => {
            count(Counter::Decapsulated);
            mark_decapsulated(ctx);
            xdp_action::XDP_PASS
        }
        None => {
            count(Counter::DecapToStack);
            xdp_action::XDP_PASS
        }
    }
}

/// TC: the same decisions, for drivers where XDP costs more than it saves
/// (veth) or cannot see whole GSO packets.
#[inline(always)]
pub fn tc_from_underlay(ctx: &TcContext) -> i32 {
    // Headers of a GRO'd packet may sit partly outside the linear area.
    if ctx.data() + DECAP_PROBE_LEN > ctx.data_end() && ctx.len() as usize >= DECAP_PROBE_LEN {
        let _ = ctx.pull_data(DECAP_PROBE_LEN as u32);
    }
    let (dst, src, deliver) = match classify(ctx.data(), ctx.data_end(), xdp_decapsulated(ctx)) {
        Verdict::Pass => {
            count(Counter::UnderlayPassed);
            return TC_ACT_OK as i32;
        }
        Verdict::Drop(reason) => {
            count(reason);
            return TC_ACT_SHOT as i32;
        }
        Verdict::DeliverPlain(ep) => return deliver_plain(ctx, &ep),
        Verdict::Deliver(ep) => (ep.mac, ep.host_mac, Some(ep.ifindex)),
        Verdict::ToStack(mac) => (mac, [0; 6], None),
    };
    // Removes outer IPv4/UDP/VXLAN and the inner Ethernet header; the outer
    // Ethernet header stays in front and is rewritten below.
    let shrink = -((INNER_ETH - ETH_HLEN + ETH_HLEN) as i32);
    if ctx
        .adjust_room(shrink, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64)
        .is_err()
    {
        count(Counter::DropAdjustFailed);
        return TC_ACT_SHOT as i32;
    }
    let eth = EthHdr {
        dst,
        src,
        proto: ETH_P_IP.to_be(),
    };
    if ctx.store(0, &eth, 0).is_err() {
        count(Counter::DropAdjustFailed);
        return TC_ACT_SHOT as i32;
    }
    match deliver {
        Some(ifindex) => {
            count(Counter::Decapsulated);
            unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
        }
        None => {
            count(Counter::DecapToStack);
            TC_ACT_OK as i32
        }
    }
}

/// A plain IPv4 frame for a local container: new MACs, into its namespace.
#[inline(always)]
fn deliver_plain(ctx: &TcContext, ep: &Endpoint) -> i32 {
    let eth = EthHdr {
        dst: ep.mac,
        src: ep.host_mac,
        proto: ETH_P_IP.to_be(),
    };
    if ctx.store(0, &eth, 0).is_err() {
        count(Counter::DropAdjustFailed);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::UnderlayDelivered);
    unsafe { bpf_redirect_peer(ep.ifindex, 0) as i32 }
}

/// Tags a frame passed up after decapsulation (see [`META_DECAPSULATED`]).
#[inline(always)]
fn mark_decapsulated(ctx: &XdpContext) {
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return;
    }
    if let Some(meta) = ptr_at::<u32>(ctx.metadata(), ctx.data(), 0) {
        unsafe { *meta = META_DECAPSULATED };
    }
}

/// Whether XDP tagged this skb as already decapsulated.
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext) -> bool {
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    match ptr_at::<u32>(meta, ctx.data(), 0) {
        Some(tag) => (unsafe { *tag }) == META_DECAPSULATED,
        None => false,
    }
}
