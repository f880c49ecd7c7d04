//! Isolation and network policy at local endpoints, as Cilium does it:
//! conntrack first, the policy maps only for a flow not admitted under the
//! current generation.
//!
//! Egress is judged where a packet leaves its container (`from_container`),
//! ingress where it is delivered to one (decapsulation, the tunnel device,
//! local delivery). An endpoint without a `LOCAL_TRACK` entry costs one hash
//! lookup and nothing else; on a host without any, `POLICY_STATE.untracked`
//! says so and not even that. The verdict of one packet:
//! 1. conntrack hit, live, current generation: allow, refresh;
//! 2. hit under an older generation: judge the flow's first packet again,
//!    keep (new generation) or delete and drop;
//! 3. no hit: judge, and admit into conntrack when allowed.
//!
//! L4 ports are read from the packet only for a tracked endpoint. A later
//! fragment (offset ≠ 0) carries no L4 header: it is judged as its own flow
//! with ports 0, so a rule limited to ports above 0 drops it and an
//! all-ports rule passes it.

use aya_ebpf::{
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use netd_common::{
    Counter,
    policy::{
        CtKey, DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, IdentityKind,
        LOCAL_ISOLATED_EGRESS, LOCAL_ISOLATED_INGRESS, LOCAL_TRACK, LocalPolicy, MAX_PORT_RANGES,
        PROTO_ANY, PolicyEntry, PolicyKey,
    },
};

use crate::{
    conntrack,
    headers::*,
    maps::{IDENTITIES, LOCAL_POLICY, POLICY, POLICY_STATE, SUBNETS},
};

const IPPROTO_SCTP: u8 = 132;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const TCP_MIN_HLEN: usize = 20;

/// Reads a `T` at an offset of the packet; `None` past its end.
pub trait Packet {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Packet for TcContext {
    /// In place from the linear area, else copied with
    /// `bpf_skb_load_bytes` (GRO'd packets).
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        match ptr_at::<T>(self.data(), self.data_end(), offset) {
            Some(p) => Some(unsafe { *p }),
            None => self.load::<T>(offset).ok(),
        }
    }
}

impl Packet for XdpContext {
    /// The first buffer only: headers are always there.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        ptr_at::<T>(self.data(), self.data_end(), offset).map(|p| unsafe { *p })
    }
}

/// A local endpoint's policy state, if its flows are tracked. On a host
/// where none is, an array read instead of a hash lookup.
#[inline(always)]
pub fn tracked(ip: [u8; 4]) -> Option<LocalPolicy> {
    if POLICY_STATE.get(0).is_some_and(|s| s.untracked != 0) {
        return None;
    }
    let lp = unsafe { LOCAL_POLICY.get(ip) }?;
    if lp.flags & LOCAL_TRACK == 0 {
        return None;
    }
    Some(*lp)
}

/// The ingress verdict on the IPv4 packet at `ip_off`, about to be
/// delivered to the local endpoint it is addressed to.
#[inline(always)]
pub fn ingress<P: Packet>(pkt: &P, ip_off: usize) -> Result<(), Counter> {
    let ip = pkt.read::<Ipv4Hdr>(ip_off).ok_or(Counter::DropMalformed)?;
    match tracked(ip.daddr) {
        Some(lp) => verdict(pkt, ip_off, &ip, None, Some(lp)),
        None => Ok(()),
    }
}

/// A packet the host itself sends to the local endpoint it is addressed
/// to: always allowed, as the host is, and admitted into conntrack so the
/// endpoint's replies pass its egress check. A stale entry of a flow the
/// endpoint started is left for its next packet to judge again.
#[inline(always)]
pub fn ingress_from_host<P: Packet>(pkt: &P, ip_off: usize) -> Result<(), Counter> {
    let ip = pkt.read::<Ipv4Hdr>(ip_off).ok_or(Counter::DropMalformed)?;
    if tracked(ip.daddr).is_none() {
        return Ok(());
    }
    let flow = parse(pkt, ip_off, &ip)?;
    let now = conntrack::now();
    let generation = POLICY_STATE.get(0).map_or(0, |s| s.generation);
    let mut key = flow.key;
    key.dir = DIR_INGRESS;
    match conntrack::lookup(&key, now) {
        Some(hit) => {
            let admitted = (!hit.reply).then_some(generation);
            conntrack::refresh(&hit, flow.tcp_state, now, admitted);
        }
        None => conntrack::insert(&key, flow.tcp_state, now, generation),
    }
    Ok(())
}

/// A packet's flow, read once for every check it goes through.
struct Flow {
    /// The tuple, with `dir` still to be set.
    key: CtKey,
    /// `CT_*` bits of a TCP packet.
    tcp_state: u8,
    /// An ICMP error: the quoted packet's tuple (`has_quote != 0`). Plain
    /// fields rather than an `Option`, so no path reads undefined bytes.
    quote: CtKey,
    has_quote: u8,
}

/// The verdict on the IPv4 packet whose header `ip` is at `ip_off`, as
/// egress of its source and ingress of its destination (each `Some` when
/// that end is a tracked local endpoint). `Err`: drop, counted with it.
#[inline(always)]
pub fn verdict<P: Packet>(
    pkt: &P,
    ip_off: usize,
    ip: &Ipv4Hdr,
    egress: Option<LocalPolicy>,
    ingress: Option<LocalPolicy>,
) -> Result<(), Counter> {
    if egress.is_none() && ingress.is_none() {
        return Ok(());
    }
    let flow = parse(pkt, ip_off, ip)?;
    let now = conntrack::now();
    let generation = POLICY_STATE.get(0).map_or(0, |s| s.generation);
    if let Some(lp) = egress {
        judge_packet(&flow, &lp, DIR_EGRESS, now, generation)?;
    }
    if let Some(lp) = ingress {
        judge_packet(&flow, &lp, DIR_INGRESS, now, generation)?;
    }
    Ok(())
}

#[inline(always)]
fn tuple(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        dir: 0,
        _pad: [0; 2],
    }
}

/// The flow of a packet: ports (TCP, UDP, SCTP), the echo identifier
/// (ICMP echo, both ports) or the quoted packet (ICMP errors). A header
/// the packet is too short for is malformed.
#[inline(always)]
fn parse<P: Packet>(pkt: &P, ip_off: usize, ip: &Ipv4Hdr) -> Result<Flow, Counter> {
    let ihl = ip.header_len();
    if ihl < IPV4_HLEN {
        return Err(Counter::DropMalformed);
    }
    let l4 = ip_off + (ihl & 0x3c);
    let mut flow = Flow {
        key: tuple(ip.saddr, ip.daddr, 0, 0, ip.proto),
        tcp_state: 0,
        quote: tuple([0; 4], [0; 4], 0, 0, 0),
        has_quote: 0,
    };
    if u16::from_be(ip.frag_off) & IP_OFFSET != 0 {
        return Ok(flow);
    }
    match ip.proto {
        IPPROTO_TCP => {
            let h = pkt
                .read::<[u8; TCP_MIN_HLEN]>(l4)
                .ok_or(Counter::DropMalformed)?;
            flow.key.sport = u16::from_ne_bytes([h[0], h[1]]);
            flow.key.dport = u16::from_ne_bytes([h[2], h[3]]);
            flow.tcp_state = conntrack::tcp_state(h[13]);
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let h = pkt.read::<[u8; 4]>(l4).ok_or(Counter::DropMalformed)?;
            flow.key.sport = u16::from_ne_bytes([h[0], h[1]]);
            flow.key.dport = u16::from_ne_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP => {
            let h = pkt.read::<[u8; 8]>(l4).ok_or(Counter::DropMalformed)?;
            match h[0] {
                ICMP_ECHO | ICMP_ECHO_REPLY => {
                    let id = u16::from_ne_bytes([h[4], h[5]]);
                    flow.key.sport = id;
                    flow.key.dport = id;
                }
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    if let Some(quote) = parse_quote(pkt, l4 + 8) {
                        flow.quote = quote;
                        flow.has_quote = 1;
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(flow)
}

/// The tuple of the packet an ICMP error quotes (its IPv4 header and the
/// first 8 bytes after it); `None` if the quote is cut short.
#[inline(always)]
fn parse_quote<P: Packet>(pkt: &P, offset: usize) -> Option<CtKey> {
    let ip = pkt.read::<Ipv4Hdr>(offset)?;
    let ihl = ip.header_len();
    if ihl < IPV4_HLEN {
        return None;
    }
    let l4 = offset + (ihl & 0x3c);
    let mut key = tuple(ip.saddr, ip.daddr, 0, 0, ip.proto);
    if u16::from_be(ip.frag_off) & IP_OFFSET != 0 {
        return Some(key);
    }
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let h = pkt.read::<[u8; 4]>(l4)?;
            key.sport = u16::from_ne_bytes([h[0], h[1]]);
            key.dport = u16::from_ne_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP => {
            let h = pkt.read::<[u8; 8]>(l4)?;
            if h[0] == ICMP_ECHO || h[0] == ICMP_ECHO_REPLY {
                let id = u16::from_ne_bytes([h[4], h[5]]);
                key.sport = id;
                key.dport = id;
            }
        }
        _ => {}
    }
    Some(key)
}

/// One packet at local endpoint `lp`, in direction `dir`.
#[inline(always)]
fn judge_packet(
    flow: &Flow,
    lp: &LocalPolicy,
    dir: u8,
    now: u64,
    generation: u32,
) -> Result<(), Counter> {
    // An error about a packet that went the other way: related to its flow.
    if flow.has_quote != 0 {
        let mut quote = flow.quote;
        quote.dir = dir ^ 1;
        if conntrack::exists(&quote, now) {
            return Ok(());
        }
    }
    let mut key = flow.key;
    key.dir = dir;
    if let Some(hit) = conntrack::lookup(&key, now) {
        if unsafe { (*hit.entry).generation } == generation {
            conntrack::refresh(&hit, flow.tcp_state, now, None);
            return Ok(());
        }
        // Admitted under older rules: the flow as first seen, judged again.
        if let Err(reason) = judge_flow(lp, &hit.key) {
            conntrack::remove(&hit.key);
            return Err(reason);
        }
        conntrack::refresh(&hit, flow.tcp_state, now, Some(generation));
        return Ok(());
    }
    judge_flow(lp, &key)?;
    conntrack::insert(&key, flow.tcp_state, now, generation);
    Ok(())
}

/// Whether local endpoint `lp` may have the flow `key` (its first packet,
/// in `key.dir`).
#[inline(always)]
fn judge_flow(lp: &LocalPolicy, key: &CtKey) -> Result<(), Counter> {
    let ingress = key.dir == DIR_INGRESS;
    let remote = if ingress { key.saddr } else { key.daddr };
    let (id, network, kind) = remote_identity(remote);
    if id == IDENTITY_HOST {
        return Ok(());
    }
    let isolated = if ingress {
        LOCAL_ISOLATED_INGRESS
    } else {
        LOCAL_ISOLATED_EGRESS
    };
    if lp.flags & isolated != 0 {
        return if allowed(lp.identity, id, key) {
            Ok(())
        } else {
            Err(Counter::DropPolicy)
        };
    }
    if ingress && kind == IdentityKind::Endpoint as u8 && network != lp.network {
        return Err(Counter::DropIsolation);
    }
    Ok(())
}

/// Who `addr` is, as (id, network, kind): a published endpoint or this
/// host (`IDENTITIES`); else, inside a remote host's subnet, a flannel
/// host's container (the foreign identity of `POLICY_STATE`: one value for
/// every such host, so nothing here grows with the cluster); else the
/// `cidr` prefix that holds it; else WORLD.
#[inline(always)]
fn remote_identity(addr: [u8; 4]) -> (u32, u32, u8) {
    let key = Key::new(32, addr);
    let found = IDENTITIES.get(&key).map(|i| (i.id, i.network, i.kind));
    if let Some(named) = found
        && named.2 != IdentityKind::Cidr as u8
    {
        return named;
    }
    if SUBNETS.get(&key).is_some()
        && let Some(state) = POLICY_STATE.get(0)
        && state.foreign_identity != 0
    {
        return (
            state.foreign_identity,
            state.foreign_network,
            IdentityKind::Endpoint as u8,
        );
    }
    found.unwrap_or((IDENTITY_WORLD, 0, IdentityKind::Cidr as u8))
}

/// Whether a `POLICY` entry for (remote | any) × (protocol | any) admits
/// the flow's destination port: at most four lookups.
#[inline(always)]
fn allowed(local: u32, remote: u32, key: &CtKey) -> bool {
    rule_admits(local, remote, key.proto, key)
        || rule_admits(local, remote, PROTO_ANY, key)
        || rule_admits(local, IDENTITY_ANY, key.proto, key)
        || rule_admits(local, IDENTITY_ANY, PROTO_ANY, key)
}

/// One `POLICY` lookup. ICMP has no ports: only an all-ports range admits
/// it.
#[inline(always)]
fn rule_admits(local: u32, remote: u32, proto: u8, key: &CtKey) -> bool {
    let pk = PolicyKey {
        local,
        remote,
        proto,
        dir: key.dir,
        _pad: [0; 2],
    };
    let whole = key.proto == IPPROTO_ICMP;
    unsafe { POLICY.get(pk) }.is_some_and(|entry| admits(entry, u16::from_be(key.dport), whole))
}

/// Whether one of the entry's ranges holds `port` (or, `whole`, is every
/// port). Bounded by [`MAX_PORT_RANGES`] whatever `count` says.
#[inline(always)]
fn admits(entry: &PolicyEntry, port: u16, whole: bool) -> bool {
    let used = (entry.count as usize).min(MAX_PORT_RANGES);
    for range in entry.ranges.iter().take(used) {
        let hit = if whole {
            range.first == 0 && range.last == u16::MAX
        } else {
            range.first <= port && port <= range.last
        };
        if hit {
            return true;
        }
    }
    false
}
