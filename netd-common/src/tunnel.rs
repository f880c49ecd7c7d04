//! The host-subnet map's value and this node's tunnel configuration.

/// How packets reach a remote host's subnet.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PeerMode {
    /// Encapsulate in VXLAN to the peer's public IP.
    Vxlan = 0,
    /// Route the inner packet directly (peer on the same L2 segment).
    Direct = 1,
}

/// Value of the `SUBNETS` LPM trie: the remote host that owns a subnet.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The host's underlay address, network byte order.
    pub public_ip: [u8; 4],
    /// MAC of the host's VTEP: the inner destination MAC.
    pub vtep_mac: [u8; 6],
    /// A [`PeerMode`] as `u8`.
    pub mode: u8,
    pub _pad: u8,
}

/// The single entry of the `CONFIG` array: what this node encapsulates with.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub vni: u32,
    /// The underlay NIC that encapsulated packets leave through.
    pub underlay_ifindex: u32,
    /// This host's underlay address, network byte order.
    pub public_ip: [u8; 4],
    /// VXLAN UDP port, host byte order.
    pub port: u16,
    /// 1 once the daemon has written a complete configuration.
    pub enabled: u8,
    /// 1 when XDP may redirect decapsulated frames straight to containers.
    /// 0 on virtual underlays, whose skbs may carry partial checksums that
    /// an XDP redirect would lose: XDP then strips and TC delivers.
    pub xdp_redirect: u8,
    pub underlay_mac: [u8; 6],
    /// This host's VTEP MAC: the inner source MAC of what it sends.
    pub vtep_mac: [u8; 6],
    /// Largest IPv4 packet a container may send through the tunnel
    /// (underlay MTU minus 50), host byte order.
    pub inner_mtu: u16,
    pub _pad2: [u8; 2],
    /// The containers' gateway address: the source of ICMP errors netd
    /// sends them.
    pub gateway: [u8; 4],
}

/// XDP metadata in front of a frame the XDP program decapsulated and
/// passed up: the TC program behind it delivers to `ifindex` with no
/// lookup of its own.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DecapMeta {
    /// [`DecapMeta::TAG`]: anything else is not ours.
    pub tag: u32,
    /// The container's host-side veth (the endpoint XDP found).
    pub ifindex: u32,
}

impl DecapMeta {
    pub const TAG: u32 = 0x6e65_7464;
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Peer {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for NodeConfig {}
