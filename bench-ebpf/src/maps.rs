//! Every map of the mode, declared in one place; the bench fills them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use netd_common::Endpoint;

/// Remote container subnets → the owning host's underlay IPv4 (Cilium's
/// ipcache entry with its tunnel endpoint).
#[btf_map]
pub static TUNNELS: LpmTrie<[u8; 4], [u8; 4], 1024> = LpmTrie::new();

/// Containers on this host by IPv4 (Cilium's endpoints map).
#[btf_map]
pub static ENDPOINTS: HashMap<[u8; 4], Endpoint, 1024> = HashMap::new();

/// Ifindex of the VXLAN device, at index 0 (Cilium's `ENCAP_IFINDEX`).
#[btf_map]
pub static TUNNEL_DEVICE: Array<u32, 1> = Array::new();

/// Why each packet ended where it did, indexed by [`Counter`].
#[btf_map]
pub static STATS: PerCpuArray<u64, { Counter::COUNT }> = PerCpuArray::new();

/// Counter slots; the bench reads them by these indices.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Counter {
    Encapsulated = 0,
    DeliveredFromOverlay = 1,
    DeliveredLocal = 2,
    ToStack = 3,
    DropMalformed = 4,
    DropBadVni = 5,
    DropTtl = 6,
    DropRedirectFailed = 7,
    DropNoTunnelDevice = 8,
}

impl Counter {
    pub const COUNT: usize = 9;
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
}
