//! Packets arriving on the underlay NIC: VXLAN from known peers is stripped
//! and delivered to the container; everything else is left alone.
//!
//! Classification is shared and runs in two steps: the outer Ethernet,
//! IPv4 and UDP headers (42 bytes) tell VXLAN on our port from the rest,
//! and only then are the VXLAN and inner headers read. The XDP and TC entry
//! points differ in how they read, strip 50 bytes and redirect. Each has
//! one exit, where the verdict is counted once it is final.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use netd_common::{Counter, DecapMeta, Endpoint, NodeConfig, PeerMode};

use crate::{
    headers::*,
    maps::{self, SUBNETS, count},
    policy,
};

/// Offset of the inner Ethernet header in a VXLAN frame.
const INNER_ETH: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
/// Offset of the inner IPv4 header.
const INNER_IP: usize = INNER_ETH + ETH_HLEN;
/// Bytes that must be readable to classify a VXLAN frame.
const DECAP_PROBE_LEN: usize = INNER_IP + IPV4_HLEN;

/// The outer headers, copied out of the packet.
struct Outer {
    ip: Ipv4Hdr,
    /// The UDP destination port (network order); 0, which is never the
    /// VXLAN port, when the packet ends before a whole UDP header. A plain
    /// number rather than an `Option<UdpHdr>`: LLVM compares an absent
    /// header's undefined bytes speculatively, which the verifier rejects
    /// as a read of a register never written.
    udp_dest: u16,
}

/// What the outer headers say.
enum Outcome {
    /// Not ours: leave it to the stack untouched.
    Pass,
    Drop(Counter),
    /// Plain IPv4 for a local container: rewrite Ethernet and deliver.
    DeliverPlain(Endpoint),
    /// VXLAN from a peer, to our port: look inside.
    Vxlan,
    /// An outer fragment from a peer: to the stack, to be reassembled.
    Reassemble,
}

/// What to do with a VXLAN frame from a peer.
enum Inner {
    Drop(Counter),
    /// Strip and hand to this container (`None`: to the host stack).
    /// `ip`: the inner IPv4 header, when decapsulation rewrote it (ECN).
    Decap {
        to: Option<Endpoint>,
        ip: Option<Ipv4Hdr>,
    },
}

/// Plain IPv4 from the underlay may reach a container only from a subnet
/// routed directly (host-gw or DirectRouting): anything else is a spoofing
/// attempt.
#[inline(always)]
fn plain_allowed(src: [u8; 4]) -> bool {
    SUBNETS
        .get(&Key::new(32, src))
        .is_some_and(|peer| peer.mode == PeerMode::Direct as u8)
}

/// Plain IPv4 for a local container, if `ip` is for one.
#[inline(always)]
fn plain(cfg: &NodeConfig, ip: &Ipv4Hdr) -> Option<Outcome> {
    let ep = maps::container(cfg, ip.daddr)?;
    if !plain_allowed(ip.saddr) {
        return Some(Outcome::Drop(Counter::DropUnknownPeer));
    }
    Some(Outcome::DeliverPlain(*ep))
}

/// The first step: VXLAN on our port from a peer, plain IPv4 for a local
/// container, or neither.
#[inline(always)]
fn classify_outer(cfg: &NodeConfig, outer: &Outer) -> Outcome {
    let ip = &outer.ip;
    if ip.proto == IPPROTO_UDP && u16::from_be(ip.frag_off) & IP_MF_OFFSET != 0 {
        return fragment(cfg, outer);
    }
    // Options on the outer header: not something we ever send.
    let vxlan_port = ip.proto == IPPROTO_UDP
        && ip.header_len() == IPV4_HLEN
        && outer.udp_dest == cfg.port.to_be();
    if !vxlan_port {
        return plain(cfg, ip).unwrap_or(Outcome::Pass);
    }
    if maps::is_peer(ip.saddr) {
        return Outcome::Vxlan;
    }
    // Plain UDP to a container on the VXLAN port from a directly routed
    // peer, or VXLAN from a stranger.
    plain(cfg, ip).unwrap_or(Outcome::Drop(Counter::DropUnknownPeer))
}

/// An outer IPv4 UDP fragment. Only the first one carries the UDP header,
/// and these programs cannot reassemble: fragments from a peer to this host
/// go to the stack, which reassembles them and hands the VXLAN datagram to
/// netd's tunnel device (see `tunnel_device`), where the peer and VNI are
/// checked again. A first fragment to the VXLAN port from anyone else is
/// dropped as its whole datagram would be.
#[inline(always)]
fn fragment(cfg: &NodeConfig, outer: &Outer) -> Outcome {
    let ip = &outer.ip;
    if maps::is_peer(ip.saddr) {
        return if ip.daddr == cfg.public_ip {
            Outcome::Reassemble
        } else {
            Outcome::Pass
        };
    }
    // Later fragments carry no UDP header: nothing to tell them by.
    if u16::from_be(ip.frag_off) & IP_OFFSET != 0 {
        return Outcome::Pass;
    }
    if outer.udp_dest == cfg.port.to_be() {
        Outcome::Drop(Counter::DropFragment)
    } else {
        Outcome::Pass
    }
}

/// The second step, on a frame in `[start, end)` known to be VXLAN from a
/// peer: our VNI, an inner IPv4 packet, and RFC 6040 for ECN.
#[inline(always)]
fn classify_inner(cfg: &NodeConfig, outer_tos: u8, start: usize, end: usize) -> Inner {
    let Some(vxlan) = ptr_at::<VxlanHdr>(start, end, ETH_HLEN + IPV4_HLEN + UDP_HLEN) else {
        return Inner::Drop(Counter::DropMalformed);
    };
    let vxlan = unsafe { &*vxlan };
    if vxlan.flags & VXLAN_FLAG_VNI == 0 || vxlan.vni() != cfg.vni {
        return Inner::Drop(Counter::DropBadVni);
    }
    let Some(inner_eth) = ptr_at::<EthHdr>(start, end, INNER_ETH) else {
        return Inner::Drop(Counter::DropMalformed);
    };
    if unsafe { (*inner_eth).proto } != ETH_P_IP.to_be() {
        return Inner::Drop(Counter::DropNotIpv4);
    }
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(start, end, INNER_IP) else {
        return Inner::Drop(Counter::DropMalformed);
    };
    let mut ip = unsafe { *inner_ip };
    let rewritten = match ecn_decapsulate(outer_tos, ip.tos) {
        None => return Inner::Drop(Counter::DropEcn),
        Some(tos) if tos != ip.tos => {
            ip.set_tos(tos);
            Some(ip)
        }
        Some(_) => None,
    };
    Inner::Decap {
        to: maps::container(cfg, ip.daddr).copied(),
        ip: rewritten,
    }
}

/// An XDP verdict and its counter (`None`: TC counts it, behind XDP).
struct XdpExit {
    action: u32,
    counter: Option<Counter>,
}

impl XdpExit {
    #[inline(always)]
    fn new(action: u32, counter: Counter) -> Self {
        XdpExit {
            action,
            counter: Some(counter),
        }
    }
}

/// XDP: rewrite the inner Ethernet header, move the start of the frame past
/// the outer headers and redirect to the container's veth, or (on virtual
/// underlays) pass the inner frame on for TC to deliver.
#[inline(always)]
pub fn xdp_from_underlay(ctx: &XdpContext) -> u32 {
    let exit = xdp_decide(ctx);
    if let Some(counter) = exit.counter {
        count(counter);
    }
    exit.action
}

/// The outer headers of an XDP frame (all in the first buffer).
#[inline(always)]
fn xdp_outer(ctx: &XdpContext) -> Option<Outer> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN)?;
    let udp_dest =
        ptr_at::<UdpHdr>(start, end, ETH_HLEN + IPV4_HLEN).map_or(0, |u| unsafe { (*u).dest });
    Some(Outer {
        ip: unsafe { *ip },
        udp_dest,
    })
}

#[inline(always)]
fn xdp_decide(ctx: &XdpContext) -> XdpExit {
    use xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT};
    let Some(cfg) = maps::config() else {
        return XdpExit::new(XDP_PASS, Counter::NotConfigured);
    };
    let Some(outer) = xdp_outer(ctx) else {
        return XdpExit::new(XDP_PASS, Counter::UnderlayPassed);
    };
    match classify_outer(cfg, &outer) {
        Outcome::Pass => return XdpExit::new(XDP_PASS, Counter::UnderlayPassed),
        Outcome::Drop(reason) => return XdpExit::new(XDP_DROP, reason),
        // TC delivers plain frames; XDP has nothing to strip.
        Outcome::DeliverPlain(_) => {
            return XdpExit {
                action: XDP_PASS,
                counter: None,
            };
        }
        // TC behind counts it.
        Outcome::Reassemble => {
            return XdpExit {
                action: XDP_PASS,
                counter: None,
            };
        }
        Outcome::Vxlan => {}
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let (to, new_ip) = match classify_inner(cfg, outer.ip.tos, start, end) {
        Inner::Drop(reason) => return XdpExit::new(XDP_DROP, reason),
        Inner::Decap { to, ip } => (to, ip),
    };
    // Judged here whether XDP redirects or TC delivers what it passes up.
    if to.is_some()
        && let Err(reason) = policy::ingress(ctx, INNER_IP)
    {
        return XdpExit::new(XDP_DROP, reason);
    }
    let (dst, src) = match &to {
        Some(ep) => (ep.mac, ep.host_mac),
        None => (cfg.underlay_mac, [0; 6]),
    };
    let (Some(inner_eth), Some(inner_ip)) = (
        ptr_at::<EthHdr>(start, end, INNER_ETH),
        ptr_at::<Ipv4Hdr>(start, end, INNER_IP),
    ) else {
        return XdpExit::new(XDP_DROP, Counter::DropMalformed);
    };
    unsafe {
        (*inner_eth).dst = dst;
        (*inner_eth).src = src;
        if let Some(ip) = new_ip {
            *inner_ip = ip;
        }
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, INNER_ETH as i32) } != 0 {
        return XdpExit::new(XDP_DROP, Counter::DropAdjustFailed);
    }
    match to {
        Some(ep) if cfg.xdp_redirect != 0 => {
            if unsafe { bpf_redirect(ep.ifindex, 0) } == XDP_REDIRECT as i64 {
                XdpExit::new(XDP_REDIRECT, Counter::Decapsulated)
            } else {
                XdpExit::new(XDP_DROP, Counter::DropRedirectFailed)
            }
        }
        Some(ep) => {
            if !mark_decapsulated(ctx, ep.ifindex) {
                return XdpExit::new(XDP_DROP, Counter::DropAdjustFailed);
            }
            XdpExit::new(XDP_PASS, Counter::Decapsulated)
        }
        None => XdpExit::new(XDP_PASS, Counter::DecapToStack),
    }
}

/// A TC verdict and its counter.
struct TcExit {
    action: i32,
    counter: Counter,
}

impl TcExit {
    #[inline(always)]
    fn ok(counter: Counter) -> Self {
        TcExit {
            action: TC_ACT_OK as i32,
            counter,
        }
    }

    #[inline(always)]
    fn shot(counter: Counter) -> Self {
        TcExit {
            action: TC_ACT_SHOT as i32,
            counter,
        }
    }

    #[inline(always)]
    fn redirect_peer(ifindex: u32, done: Counter) -> Self {
        if unsafe { bpf_redirect_peer(ifindex, 0) } == TC_ACT_REDIRECT as i64 {
            TcExit {
                action: TC_ACT_REDIRECT as i32,
                counter: done,
            }
        } else {
            TcExit::shot(Counter::DropRedirectFailed)
        }
    }
}

/// TC: the same decisions, for drivers where XDP costs more than it saves
/// (veth) or cannot see whole GSO packets.
#[inline(always)]
pub fn tc_from_underlay(ctx: &TcContext) -> i32 {
    let exit = tc_decide(ctx);
    count(exit.counter);
    exit.action
}

/// A `T` at `offset`: read in place when it is in the linear area, else
/// copied with `bpf_skb_load_bytes`, which neither pulls nor unclones.
#[inline(always)]
fn tc_read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    match ptr_at::<T>(ctx.data(), ctx.data_end(), offset) {
        Some(p) => Some(unsafe { *p }),
        None => ctx.load::<T>(offset).ok(),
    }
}

#[inline(always)]
fn tc_outer(ctx: &TcContext) -> Option<Outer> {
    let eth = tc_read::<EthHdr>(ctx, 0)?;
    if eth.proto != ETH_P_IP.to_be() {
        return None;
    }
    Some(Outer {
        ip: tc_read::<Ipv4Hdr>(ctx, ETH_HLEN)?,
        udp_dest: tc_udp_dest(ctx),
    })
}

/// The outer UDP destination port, 0 when the packet is too short: read
/// into zeroed memory, so no path leaves it undefined.
#[inline(always)]
fn tc_udp_dest(ctx: &TcContext) -> u16 {
    const OFFSET: usize = ETH_HLEN + IPV4_HLEN;
    if let Some(udp) = ptr_at::<UdpHdr>(ctx.data(), ctx.data_end(), OFFSET) {
        return unsafe { (*udp).dest };
    }
    // The whole UDP header, as the in-place read above requires.
    let mut udp = [0u8; UDP_HLEN];
    let read = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            OFFSET as u32,
            udp.as_mut_ptr() as *mut _,
            udp.len() as u32,
        )
    };
    if read == 0 {
        u16::from_ne_bytes([udp[2], udp[3]])
    } else {
        0
    }
}

#[inline(always)]
fn tc_decide(ctx: &TcContext) -> TcExit {
    let Some(cfg) = maps::config() else {
        return TcExit::ok(Counter::NotConfigured);
    };
    if let Some(ifindex) = xdp_decapsulated(ctx) {
        return TcExit::redirect_peer(ifindex, Counter::UnderlayDelivered);
    }
    let Some(outer) = tc_outer(ctx) else {
        return TcExit::ok(Counter::UnderlayPassed);
    };
    match classify_outer(cfg, &outer) {
        Outcome::Pass => return TcExit::ok(Counter::UnderlayPassed),
        Outcome::Drop(reason) => return TcExit::shot(reason),
        Outcome::DeliverPlain(ep) => return deliver_plain(ctx, &ep),
        Outcome::Reassemble => return TcExit::ok(Counter::UnderlayFragmentToStack),
        Outcome::Vxlan => {}
    }
    // VXLAN from a peer, about to be rewritten anyway: headers of a GRO'd
    // packet may sit partly outside the linear area.
    let want = (ctx.len() as usize).min(DECAP_PROBE_LEN);
    if ctx.data() + want > ctx.data_end() {
        let _ = ctx.pull_data(want as u32);
    }
    let (to, new_ip) = match classify_inner(cfg, outer.ip.tos, ctx.data(), ctx.data_end()) {
        Inner::Drop(reason) => return TcExit::shot(reason),
        Inner::Decap { to, ip } => (to, ip),
    };
    if to.is_some()
        && let Err(reason) = policy::ingress(ctx, INNER_IP)
    {
        return TcExit::shot(reason);
    }
    // Written with a helper, not in place: a direct write would make the
    // verifier unclone every skb this program sees.
    if let Some(ip) = new_ip
        && ctx.store(INNER_IP, &ip, 0).is_err()
    {
        return TcExit::shot(Counter::DropAdjustFailed);
    }
    // Removes outer IPv4/UDP/VXLAN and the inner Ethernet header; the outer
    // Ethernet header stays in front and is rewritten below.
    let shrink = -((INNER_ETH - ETH_HLEN + ETH_HLEN) as i32);
    if ctx
        .adjust_room(shrink, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64)
        .is_err()
    {
        return TcExit::shot(Counter::DropAdjustFailed);
    }
    let (dst, src) = match &to {
        Some(ep) => (ep.mac, ep.host_mac),
        None => (cfg.underlay_mac, [0; 6]),
    };
    let eth = EthHdr {
        dst,
        src,
        proto: ETH_P_IP.to_be(),
    };
    if ctx.store(0, &eth, 0).is_err() {
        return TcExit::shot(Counter::DropAdjustFailed);
    }
    match to {
        Some(ep) => TcExit::redirect_peer(ep.ifindex, Counter::Decapsulated),
        None => TcExit::ok(Counter::DecapToStack),
    }
}

/// A plain IPv4 frame for a local container: new MACs, into its namespace.
#[inline(always)]
fn deliver_plain(ctx: &TcContext, ep: &Endpoint) -> TcExit {
    if let Err(reason) = policy::ingress(ctx, ETH_HLEN) {
        return TcExit::shot(reason);
    }
    let eth = EthHdr {
        dst: ep.mac,
        src: ep.host_mac,
        proto: ETH_P_IP.to_be(),
    };
    if ctx.store(0, &eth, 0).is_err() {
        return TcExit::shot(Counter::DropAdjustFailed);
    }
    TcExit::redirect_peer(ep.ifindex, Counter::UnderlayDelivered)
}

/// Tags a frame passed up after decapsulation with the container's veth
/// (see [`DecapMeta`]); false if the driver has no room for metadata.
#[inline(always)]
fn mark_decapsulated(ctx: &XdpContext, ifindex: u32) -> bool {
    let len = core::mem::size_of::<DecapMeta>() as i32;
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return false;
    }
    let Some(meta) = ptr_at::<DecapMeta>(ctx.metadata(), ctx.data(), 0) else {
        return false;
    };
    unsafe {
        *meta = DecapMeta {
            tag: DecapMeta::TAG,
            ifindex,
        }
    };
    true
}

/// The container's veth, if XDP tagged this skb as already decapsulated
/// (its MACs already rewritten).
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext) -> Option<u32> {
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let meta = ptr_at::<DecapMeta>(meta, ctx.data(), 0)?;
    let meta = unsafe { *meta };
    (meta.tag == DecapMeta::TAG).then_some(meta.ifindex)
}
