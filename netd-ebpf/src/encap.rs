//! Packets leaving a container: deliver locally, encapsulate to the host
//! that owns the destination subnet, or hand to the host stack.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
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
    policy,
};

/// Inner Ethernet header length, in the top byte of the adjust_room flags.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

/// What happens to one packet: the TC action, and the counter that says
/// why, counted once when the action is final.
struct Exit {
    action: i32,
    counter: Counter,
}

impl Exit {
    #[inline(always)]
    fn ok(counter: Counter) -> Self {
        Exit {
            action: TC_ACT_OK as i32,
            counter,
        }
    }

    #[inline(always)]
    fn shot(counter: Counter) -> Self {
        Exit {
            action: TC_ACT_SHOT as i32,
            counter,
        }
    }

    /// A redirect helper's result: `done` if the redirect was accepted.
    #[inline(always)]
    fn redirected(rc: i64, done: Counter) -> Self {
        if rc == TC_ACT_REDIRECT as i64 {
            Exit {
                action: TC_ACT_REDIRECT as i32,
                counter: done,
            }
        } else {
            Exit::shot(Counter::DropRedirectFailed)
        }
    }
}

/// Where netd sends a container's packet.
enum Route {
    /// A container on this host.
    Local(&'static Endpoint),
    /// The host that owns the destination's subnet.
    Peer(Peer),
}

/// The verdict for one packet from a container: the only exit, where it
/// is counted.
#[inline(always)]
pub fn from_container(ctx: &TcContext) -> i32 {
    let exit = decide(ctx);
    count(exit.counter);
    exit.action
}

#[inline(always)]
fn decide(ctx: &TcContext) -> Exit {
    let Some(cfg) = maps::config() else {
        return Exit::ok(Counter::NotConfigured);
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return Exit::shot(Counter::DropMalformed);
    };
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return Exit::ok(Counter::ContainerToStack);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        return Exit::shot(Counter::DropMalformed);
    };
    if !is_own_source(ctx, cfg, eth, ip) {
        return Exit::shot(Counter::DropSpoofed);
    }
    let hdr = unsafe { *ip };
    // The remote subnets first: one of them never holds a local endpoint
    // (a lease overlapping this host's is refused), so a hit there saves
    // the endpoint lookup on the most common path.
    let remote = SUBNETS.get(&Key::new(32, hdr.daddr)).copied();
    let local = match remote {
        Some(_) => None,
        None => maps::container(cfg, hdr.daddr),
    };
    // Egress of the source; for local delivery, ingress of the destination.
    let ingress = local.and_then(|_| policy::tracked(hdr.daddr));
    if let Err(reason) = policy::verdict(ctx, ETH_HLEN, &hdr, policy::tracked(hdr.saddr), ingress) {
        return Exit::shot(reason);
    }
    let route = match (local, remote) {
        (Some(ep), _) => Route::Local(ep),
        (None, Some(peer)) => Route::Peer(peer),
        (None, None) => return Exit::ok(Counter::ContainerToStack),
    };
    // From here netd routes the packet: one router hop, whoever is next.
    // As a router: the TTL first, then the MTU, then the hop.
    if unsafe { (*ip).ttl } <= 1 {
        return send_icmp_error(ctx, cfg, IcmpError::TimeExceeded);
    }
    match route {
        Route::Local(ep) => {
            unsafe { (*ip).decrement_ttl() };
            deliver_local(eth, ep)
        }
        Route::Peer(peer) if peer.mode == PeerMode::Direct as u8 => {
            unsafe { (*ip).decrement_ttl() };
            route_direct(cfg, &peer)
        }
        Route::Peer(peer) => {
            if too_big(ctx, cfg) {
                if dont_fragment(ip) {
                    return send_icmp_error(ctx, cfg, IcmpError::FragNeeded);
                }
                return Exit::shot(Counter::DropTooBig);
            }
            let inner_tos = unsafe {
                (*ip).decrement_ttl();
                (*ip).tos
            };
            encapsulate(ctx, cfg, &peer, inner_tos)
        }
    }
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
fn deliver_local(eth: *mut EthHdr, ep: &Endpoint) -> Exit {
    unsafe {
        (*eth).dst = ep.mac;
        (*eth).src = ep.host_mac;
    }
    let rc = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    Exit::redirected(rc, Counter::LocalDelivered)
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

/// The ICMP errors `from_container` answers with, as a router would.
#[derive(Copy, Clone)]
enum IcmpError {
    /// Too big for the tunnel with DF set, so path MTU discovery works.
    FragNeeded,
    /// TTL would reach 0 at the gateway; not sent about an ICMP error or
    /// a later fragment, which die silently.
    TimeExceeded,
}

/// Turns the packet into an ICMP error for its sender, from the gateway
/// address, and sends it back out of the veth it came in on.
#[inline(always)]
fn send_icmp_error(ctx: &TcContext, cfg: &NodeConfig, kind: IcmpError) -> Exit {
    let len = core::mem::size_of::<IcmpErrorFrame>() as u32;
    // A packet shorter than the quote: grow it first, so the quote is its
    // header and payload followed by zeros.
    if (ctx.len() as usize) < ETH_HLEN + ICMP_QUOTE_LEN
        && unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0
    {
        return Exit::shot(Counter::DropAdjustFailed);
    }
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return Exit::shot(Counter::DropMalformed);
    };
    // A fixed-size load: the verifier rejects a length that may be zero.
    let Ok(quote) = ctx.load::<[u8; ICMP_QUOTE_LEN]>(ETH_HLEN) else {
        return Exit::shot(Counter::DropMalformed);
    };
    let (frame, sent) = match kind {
        IcmpError::FragNeeded => (
            frag_needed(&eth, &quote, cfg.gateway, cfg.inner_mtu),
            Counter::FragNeeded,
        ),
        IcmpError::TimeExceeded => {
            if !may_send_icmp_error(&quote) {
                return Exit::shot(Counter::DropTtlExpired);
            }
            (
                time_exceeded(&eth, &quote, cfg.gateway),
                Counter::TtlExceeded,
            )
        }
    };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 || ctx.store(0, &frame, 0).is_err()
    {
        return Exit::shot(Counter::DropAdjustFailed);
    }
    // Back out of the veth it came in on: into the container.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    Exit::redirected(unsafe { bpf_redirect(ingress, 0) }, sent)
}

/// A peer on our L2 segment: no encapsulation, the peer's underlay address
/// is the next hop and the neighbour table supplies its MAC.
#[inline(always)]
fn route_direct(cfg: &NodeConfig, peer: &Peer) -> Exit {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(peer.public_ip),
        },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    let rc = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, &mut nh, size, 0) };
    Exit::redirected(rc, Counter::RoutedDirect)
}

/// Pushes outer Ethernet/IPv4/UDP/VXLAN and an inner Ethernet header, then
/// lets the kernel's FIB and neighbour tables pick the underlay next hop.
/// The outer TOS carries the inner ECN bits, as the kernel's VXLAN sets it.
#[inline(always)]
fn encapsulate(ctx: &TcContext, cfg: &NodeConfig, peer: &Peer, inner_tos: u8) -> Exit {
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
        return Exit::shot(Counter::DropAdjustFailed);
    }

    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    let tos = ecn_encapsulate(inner_tos);
    let hdr = encap_header(cfg, peer, inner_len, src_port, ip_id, tos);
    if ctx.store(0, &hdr, 0).is_err() {
        return Exit::shot(Counter::DropAdjustFailed);
    }
    let rc = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    Exit::redirected(rc, Counter::Encapsulated)
}
