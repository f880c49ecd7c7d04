//! Types shared by the kernel programs and the daemon.
//!
//! Every map key and value is `#[repr(C)]` with its padding spelled out, so
//! the layout is the same on both sides and in BTF. The `user` feature
//! implements `aya::Pod` for userspace.
#![no_std]

pub mod endpoint;
pub mod headers;
pub mod policy;
pub mod stats;
pub mod tunnel;

pub use endpoint::Endpoint;
pub use stats::Counter;
pub use tunnel::{DecapMeta, NodeConfig, Peer, PeerMode};

/// Version of the pinned map layout. Bumped whenever a map type changes, so a
/// new daemon never reads maps written with another layout.
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// Names of the maps and programs, as pinned under `<pin-path>/v<N>/`.
pub mod names {
    pub const SUBNETS: &str = "SUBNETS";
    pub const PEERS: &str = "PEERS";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const IDENTITIES: &str = "IDENTITIES";
    pub const LOCAL_POLICY: &str = "LOCAL_POLICY";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_STATE: &str = "POLICY_STATE";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FROM_CONTAINER: &str = "from_container";
    pub const TO_CONTAINER: &str = "to_container";
    pub const XDP_FROM_UNDERLAY: &str = "xdp_from_underlay";
    pub const TC_FROM_UNDERLAY: &str = "tc_from_underlay";
    pub const FROM_TUNNEL_DEVICE: &str = "from_tunnel_device";
}

/// Capacity of the host-subnet LPM trie (remote hosts): 100,000 hosts with
/// room to spare. An LPM trie allocates on demand, so unused capacity
/// costs nothing.
pub const MAX_SUBNETS: u32 = 131_072;
/// Capacity of the peer (underlay address) set. Allocated on demand
/// (`BPF_F_NO_PREALLOC`): a host pays for the peers it has.
pub const MAX_PEERS: u32 = 131_072;
/// Capacity of the local endpoint map.
pub const MAX_ENDPOINTS: u32 = 4096;

#[cfg(test)]
mod layout {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn peer_layout() {
        assert_eq!(size_of::<Peer>(), 12);
        assert_eq!(align_of::<Peer>(), 1);
        assert_eq!(offset_of!(Peer, public_ip), 0);
        assert_eq!(offset_of!(Peer, vtep_mac), 4);
        assert_eq!(offset_of!(Peer, mode), 10);
        assert_eq!(offset_of!(Peer, _pad), 11);
    }

    #[test]
    fn endpoint_layout() {
        assert_eq!(size_of::<Endpoint>(), 16);
        assert_eq!(align_of::<Endpoint>(), 4);
        assert_eq!(offset_of!(Endpoint, ifindex), 0);
        assert_eq!(offset_of!(Endpoint, mac), 4);
        assert_eq!(offset_of!(Endpoint, host_mac), 10);
    }

    #[test]
    fn node_config_layout() {
        assert_eq!(size_of::<NodeConfig>(), 36);
        assert_eq!(align_of::<NodeConfig>(), 4);
        assert_eq!(offset_of!(NodeConfig, vni), 0);
        assert_eq!(offset_of!(NodeConfig, underlay_ifindex), 4);
        assert_eq!(offset_of!(NodeConfig, public_ip), 8);
        assert_eq!(offset_of!(NodeConfig, port), 12);
        assert_eq!(offset_of!(NodeConfig, enabled), 14);
        assert_eq!(offset_of!(NodeConfig, xdp_redirect), 15);
        assert_eq!(offset_of!(NodeConfig, underlay_mac), 16);
        assert_eq!(offset_of!(NodeConfig, vtep_mac), 22);
        assert_eq!(offset_of!(NodeConfig, inner_mtu), 28);
        assert_eq!(offset_of!(NodeConfig, _pad2), 30);
        assert_eq!(offset_of!(NodeConfig, gateway), 32);
    }

    #[test]
    fn decap_meta_layout() {
        assert_eq!(size_of::<DecapMeta>(), 8);
        assert_eq!(align_of::<DecapMeta>(), 4);
        assert_eq!(offset_of!(DecapMeta, tag), 0);
        assert_eq!(offset_of!(DecapMeta, ifindex), 4);
    }

    #[test]
    fn policy_layouts() {
        use crate::policy::*;
        assert_eq!(size_of::<Identity>(), 12);
        assert_eq!(size_of::<LocalPolicy>(), 12);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, proto), 8);
        assert_eq!(offset_of!(PolicyKey, dir), 9);
        assert_eq!(size_of::<PolicyEntry>(), 4 + 4 * MAX_PORT_RANGES);
        assert_eq!(size_of::<PolicyState>(), 16);
        assert_eq!(offset_of!(PolicyState, foreign_identity), 4);
        assert_eq!(offset_of!(PolicyState, foreign_network), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(offset_of!(CtKey, sport), 8);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, dir), 13);
        assert_eq!(size_of::<CtEntry>(), 16);
        assert_eq!(offset_of!(CtEntry, generation), 8);
    }

    #[test]
    fn counters_are_dense() {
        assert_eq!(Counter::ALL.len(), Counter::COUNT as usize);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
