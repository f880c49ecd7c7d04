//! Every map of the data plane, declared in one place. All are BTF maps so
//! `bpftool map dump` shows their field names.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use netd_common::{
    Counter, Endpoint, MAX_ENDPOINTS, MAX_PEERS, MAX_SUBNETS, NodeConfig, Peer,
    policy::{
        CtEntry, CtKey, Identity, LocalPolicy, MAX_CONNTRACK, MAX_IDENTITIES, MAX_POLICY,
        PolicyEntry, PolicyKey, PolicyState,
    },
};

/// Remote hosts' subnets (prefix → owner).
#[btf_map]
pub static SUBNETS: LpmTrie<[u8; 4], Peer, { MAX_SUBNETS as usize }> = LpmTrie::new();

/// Underlay addresses of known peers: VXLAN from anywhere else is dropped.
/// Allocated on demand: preallocating the capacity would cost every host
/// megabytes for peers it does not have.
#[btf_map]
pub static PEERS: HashMap<[u8; 4], u32, { MAX_PEERS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Containers attached on this host, by IPv4 address.
#[btf_map]
pub static ENDPOINTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// This node's tunnel parameters (one entry).
#[btf_map]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// Packet counters, indexed by [`Counter`].
#[btf_map]
pub static STATS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Who an address is (prefix → identity); a miss is the world.
#[btf_map]
pub static IDENTITIES: LpmTrie<[u8; 4], Identity, { MAX_IDENTITIES as usize }> = LpmTrie::new();

/// Local endpoints' isolation flags and identities. No entry: not tracked.
#[btf_map]
pub static LOCAL_POLICY: HashMap<[u8; 4], LocalPolicy, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Allowed (local, remote, protocol, direction) and their port ranges.
/// Allocated on demand, as most hosts hold far fewer rules than it admits.
#[btf_map]
pub static POLICY: HashMap<
    PolicyKey,
    PolicyEntry,
    { MAX_POLICY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The policy generation (one entry).
#[btf_map]
pub static POLICY_STATE: Array<PolicyState, 1> = Array::new();

/// Flows admitted at a local endpoint, per direction.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, { MAX_CONNTRACK as usize }> = LruHashMap::new();

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.enabled != 0 => Some(cfg),
        _ => None,
    }
}

#[inline(always)]
pub fn endpoint(ip: [u8; 4]) -> Option<&'static Endpoint> {
    unsafe { ENDPOINTS.get(ip) }
}

/// An endpoint to deliver to: the host's own entry (its gateway address, on
/// the host-access veth) is there only to check sources, and packets for it
/// belong to the host stack.
#[inline(always)]
pub fn container(cfg: &NodeConfig, ip: [u8; 4]) -> Option<&'static Endpoint> {
    if cfg.gateway == ip {
        return None;
    }
    endpoint(ip)
}

#[inline(always)]
pub fn is_peer(ip: [u8; 4]) -> bool {
    unsafe { PEERS.get(ip) }.is_some()
}
