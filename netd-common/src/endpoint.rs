//! Local containers, keyed by their IPv4 address in the `ENDPOINTS` map.

/// A container attached on this host.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side veth: packets for the container are redirected to its peer.
    pub ifindex: u32,
    /// The container's own MAC (destination of delivered frames).
    pub mac: [u8; 6],
    /// MAC of the host-side veth (source of delivered frames).
    pub host_mac: [u8; 6],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint {}
