//! Packets leaving a container: deliver locally, encapsulate to the host
//! that owns the destination subnet, or hand to the host stack.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{
        bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_skb_change_tail,
    },
    maps::lpm_trie::Key,
    programs::TcContext,
};
use netd_common::{Counter, Endpoint, NodeConfig, Peer, PeerMode};

/// `AF_INET`, for the next-hop family.
const AF_INET: u32 = 2;

use crate::{
    headers::*,
    maps::{self, SUBNETS, count},
};

/// Inner Ethernet header length, in the top byte of the adjust_room flags.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

/// The verdict for one packet from a container.
#[inline(always)]
pub fn from_container(ctx: &TcContext) -> i32 {
    let Some(cfg) = maps::config() else {
        count(Counter::NotConfigured);
        return TC_ACT_OK as i32;
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT as i32;
    };
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        count(Counter::ContainerToStack);
        return TC_ACT_OK as i32;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT as i32;
    };
    if !is_own_source(ctx, cfg, eth, ip) {
        count(Counter::DropSpoofed);
        return TC_ACT_SHOT as i32;
    }
    let dst = unsafe { (*ip).daddr };

    if let Some(ep) = maps::container(dst) {
        return deliver_local(eth, ep);
    }
    if let Some(peer) = SUBNETS.get(&Key::new(32, dst)) {
        let peer = *peer;
        if peer.mode == PeerMode::Direct as u8 {
            return route_direct(cfg, &peer);
        }
        if too_big(ctx, cfg) {
            if dont_fragment(ip) {
                return send_frag_needed(ctx, cfg);
            }
            count(Counter::DropTooBig);
            return TC_ACT_SHOT as i32;
        }
        return encapsulate(ctx, cfg, &peer);
    }
    count(Counter::ContainerToStack);
    TC_ACT_OK as i32
}

/// A container may only send from the address and MAC it was given, on its
/// own veth: no spoofing another container or host. The host's own veth
/// (the entry of its gateway address) also carries the host's replies from
/// its other addresses, e.g. to a remote container that reached the host's
/// underlay address.
#[inline(always)]
fn is_own_source(
    ctx: &TcContext,
    cfg: &NodeConfig,
    eth: *const EthHdr,
    ip: *const Ipv4Hdr,
) -> bool {
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    match maps::endpoint(unsafe { (*ip).saddr }) {
        Some(ep) => ep.ifindex == ingress && ep.mac == unsafe { (*eth).src },
        None => maps::endpoint(cfg.gateway).is_some_and(|host| host.ifindex == ingress),
    }
}

/// Container to container on this host: straight into the peer namespace.
#[inline(always)]
fn deliver_local(eth: *mut EthHdr, ep: &Endpoint) -> i32 {
    unsafe {
        (*eth).dst = ep.mac;
        (*eth).src = ep.host_mac;
    }
    count(Counter::LocalDelivered);
    unsafe { bpf_redirect_peer(ep.ifindex, 0) as i32 }
}

/// Whether the packet (for a GSO packet, each segment) would not fit the
/// underlay once encapsulated: only a container that raised its own MTU
/// sends such packets.
#[inline(always)]
fn too_big(ctx: &TcContext, cfg: &NodeConfig) -> bool {
    if cfg.inner_mtu == 0 {
        return false;
    }
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    let len = if gso_size == 0 {
        ctx.len() as usize - ETH_HLEN
    } else {
        match ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) {
            Some(ip) => gso_size + segment_headers(ctx, ip),
            None => return false,
        }
    };
    len > cfg.inner_mtu as usize
}

#[inline(always)]
fn dont_fragment(ip: *const Ipv4Hdr) -> bool {
    u16::from_be(unsafe { (*ip).frag_off }) & IP_DF != 0
}

/// IPv4 plus TCP (or UDP) header bytes in front of each GSO segment.
#[inline(always)]
fn segment_headers(ctx: &TcContext, ip: *const Ipv4Hdr) -> usize {
    let ip_len = unsafe { (*ip).header_len() } & 0x3c;
    if unsafe { (*ip).proto } != IPPROTO_TCP {
        return ip_len + UDP_HLEN;
    }
    // Data offset: the high nibble of byte 12 of the TCP header.
    match ptr_at::<u8>(ctx.data(), ctx.data_end(), ETH_HLEN + ip_len + 12) {
        Some(doff) => ip_len + ((unsafe { *doff } >> 4) as usize) * 4,
        None => ip_len + 20,
    }
}

/// Turns the packet into an ICMP fragmentation-needed for its sender (as
/// a router on the path would), so path MTU discovery works.
#[inline(always)]
fn send_frag_needed(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    count(Counter::FragNeeded);
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return TC_ACT_SHOT as i32;
    };
    // A fixed-size load: the verifier rejects a length that may be zero.
    let Ok(quote) = ctx.load::<[u8; ICMP_QUOTE_LEN]>(ETH_HLEN) else {
        return TC_ACT_SHOT as i32;
    };
    let frame = frag_needed(&eth, &quote, cfg.gateway, cfg.inner_mtu);
    let len = core::mem::size_of::<FragNeededFrame>() as u32;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 || ctx.store(0, &frame, 0).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    // Back out of the veth it came in on: into the container.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    unsafe { bpf_redirect(ingress, 0) as i32 }
}

/// A peer on our L2 segment: no encapsulation, the peer's underlay address
/// is the next hop and the neighbour table supplies its MAC.
#[inline(always)]
fn route_direct(cfg: &NodeConfig, peer: &Peer) -> i32 {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(peer.public_ip),
        },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    let rc = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, &mut nh, size, 0) };
    if rc < 0 {
        count(Counter::DropRedirectFailed);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::RoutedDirect);
    rc as i32
}

/// Pushes outer Ethernet/IPv4/UDP/VXLAN and an inner Ethernet header, then
/// lets the kernel's FIB and neighbour tables pick the underlay next hop.
#[inline(always)]
fn encapsulate(ctx: &TcContext, cfg: &NodeConfig, peer: &Peer) -> i32 {
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let src_port = flow_src_port(unsafe { bpf_get_hash_recalc(ctx.skb.skb) });

    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
        | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | ENCAP_L2_ETH_LEN;
    if ctx
        .adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        count(Counter::DropAdjustFailed);
        return TC_ACT_SHOT as i32;
    }

    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    let hdr = encap_header(cfg, peer, inner_len, src_port, ip_id);
    if ctx.store(0, &hdr, 0).is_err() {
        count(Counter::DropAdjustFailed);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::Encapsulated);
    let rc = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if rc < 0 {
        count(Counter::DropRedirectFailed);
        return TC_ACT_SHOT as i32;
    }
    rc as i32
}
