//! Connection tracking at local endpoints: a flow is admitted once, then
//! its packets in both directions pass on one lookup until the entry
//! expires or the policy generation changes.
//!
//! An entry is keyed by the flow as first seen and the direction it was
//! seen in (relative to the local endpoint), so local delivery, judged
//! both as egress of the source and ingress of the destination, keeps two.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use netd_common::policy::{
    CT_FIN_SEEN, CT_REPLY_SEEN, CT_RST_SEEN, CT_SYN_SEEN, CT_TIMEOUT_OTHER, CT_TIMEOUT_TCP_CLOSE,
    CT_TIMEOUT_TCP_ESTABLISHED, CT_TIMEOUT_TCP_SYN, CtEntry, CtKey,
};

use crate::{headers::IPPROTO_TCP, maps::CONNTRACK};

const NS_PER_SEC: u64 = 1_000_000_000;

/// TCP header flag bits (byte 13).
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// A live entry found for a packet.
pub struct Hit {
    pub entry: *mut CtEntry,
    /// The entry's key: the flow as first seen.
    pub key: CtKey,
    /// The packet goes the other way than the flow's first packet.
    pub reply: bool,
}

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The same flow seen from the other end, in the opposite direction.
#[inline(always)]
pub fn reversed(key: &CtKey) -> CtKey {
    CtKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        dir: key.dir ^ 1,
        _pad: [0; 2],
    }
}

/// `CT_*` bits a TCP packet with `flags` sets.
#[inline(always)]
pub fn tcp_state(flags: u8) -> u8 {
    let mut state = 0;
    if flags & TCP_SYN != 0 {
        state |= CT_SYN_SEEN;
    }
    if flags & TCP_FIN != 0 {
        state |= CT_FIN_SEEN;
    }
    if flags & TCP_RST != 0 {
        state |= CT_RST_SEEN;
    }
    state
}

/// How long an entry in `state` lives after its last packet.
#[inline(always)]
fn timeout_ns(proto: u8, state: u8) -> u64 {
    let secs = if proto != IPPROTO_TCP {
        CT_TIMEOUT_OTHER
    } else if state & (CT_FIN_SEEN | CT_RST_SEEN) != 0 {
        CT_TIMEOUT_TCP_CLOSE
    } else if state & CT_REPLY_SEEN != 0 {
        CT_TIMEOUT_TCP_ESTABLISHED
    } else {
        CT_TIMEOUT_TCP_SYN
    };
    secs * NS_PER_SEC
}

/// The live entry of `key`'s flow, the key as given (a packet of the flow's
/// first direction) or reversed (a reply). An expired entry is removed.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<Hit> {
    let (entry, key, reply) = match CONNTRACK.get_ptr_mut(key) {
        Some(entry) => (entry, *key, false),
        None => {
            let rev = reversed(key);
            (CONNTRACK.get_ptr_mut(&rev)?, rev, true)
        }
    };
    if unsafe { (*entry).expires } <= now {
        let _ = CONNTRACK.remove(&key);
        return None;
    }
    Some(Hit { entry, key, reply })
}

/// Whether `key`'s flow (either way) has a live entry, whatever its
/// generation: the flow an ICMP error quotes.
#[inline(always)]
pub fn exists(key: &CtKey, now: u64) -> bool {
    lookup(key, now).is_some()
}

/// Records a packet of a live flow: new state bits and expiry, written only
/// when the state changes or the expiry moves by more than a second (most
/// packets of a busy flow write nothing). `generation`: admitted again.
#[inline(always)]
pub fn refresh(hit: &Hit, packet_state: u8, now: u64, generation: Option<u32>) {
    let entry = unsafe { &mut *hit.entry };
    let mut state = entry.state;
    if hit.key.proto == IPPROTO_TCP {
        state |= packet_state;
        if hit.reply {
            state |= CT_REPLY_SEEN;
        }
    }
    let expires = now + timeout_ns(hit.key.proto, state);
    if state != entry.state || expires > entry.expires + NS_PER_SEC {
        entry.state = state;
        entry.expires = expires;
    }
    if let Some(generation) = generation {
        entry.generation = generation;
    }
}

/// Admits a new flow under `generation`.
#[inline(always)]
pub fn insert(key: &CtKey, packet_state: u8, now: u64, generation: u32) {
    let state = if key.proto == IPPROTO_TCP {
        packet_state
    } else {
        0
    };
    let entry = CtEntry {
        expires: now + timeout_ns(key.proto, state),
        generation,
        state,
        _pad: [0; 3],
    };
    // A full LRU map evicts; an error leaves the flow untracked, and its
    // next packet is judged again.
    let _ = CONNTRACK.insert(key, entry, 0);
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}
