//! Isolation and network policy: who an address is, what each local
//! endpoint accepts, and the connections already admitted.
//!
//! The daemon compiles endpoints (address, network, labels) and policies into
//! three maps; the kernel programs look a flow up in `CONNTRACK` first and
//! consult `IDENTITIES` and `POLICY` only for a flow they have not admitted
//! under the current policy generation.

/// Identity 0 in a [`PolicyKey`]: any remote address.
pub const IDENTITY_ANY: u32 = 0;
/// This host (its gateway address and the host stack).
pub const IDENTITY_HOST: u32 = 1;
/// An address no entry of `IDENTITIES` covers.
pub const IDENTITY_WORLD: u32 = 2;
/// Identities the daemon assigns start here.
pub const IDENTITY_FIRST_ASSIGNED: u32 = 256;

/// What kind of address an [`Identity`] describes.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// A container of a netd or flannel host: has a network.
    Endpoint = 0,
    /// A prefix named by a policy's `cidr` peer (no network).
    Cidr = 1,
    /// This host.
    Host = 2,
}

/// Value of the `IDENTITIES` LPM trie (IPv4 prefix → identity): every
/// endpoint as a /32, this host's gateway, and the prefixes of `cidr` peers.
/// An endpoint or host entry is the answer; else an address in a remote
/// host's subnet is the foreign identity ([`PolicyState`]); only then a
/// `cidr` prefix, so a `cidr` peer never covers a container.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
    /// Network of an endpoint (a hash of its name); 0 for the others.
    pub network: u32,
    /// An [`IdentityKind`] as `u8`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// `LocalPolicy::flags`: a policy selects the endpoint for ingress.
pub const LOCAL_ISOLATED_INGRESS: u8 = 1;
/// `LocalPolicy::flags`: a policy selects the endpoint for egress.
pub const LOCAL_ISOLATED_EGRESS: u8 = 2;
/// `LocalPolicy::flags`: flows of this endpoint need conntrack (it is
/// isolated in some direction, or more than one network exists, so replies
/// must be told from new flows).
pub const LOCAL_TRACK: u8 = 4;

/// Value of the `LOCAL_POLICY` hash (local endpoint IPv4 → its policy
/// state). An endpoint without an entry is not tracked and not isolated.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LocalPolicy {
    /// The endpoint's own identity (the `local` of its `POLICY` keys).
    pub identity: u32,
    pub network: u32,
    /// `LOCAL_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Direction of a flow relative to the local endpoint it concerns.
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

/// Protocol 0 in a [`PolicyKey`]: any protocol.
pub const PROTO_ANY: u8 = 0;

/// Key of the `POLICY` hash: may `local` talk with `remote` over `proto` in
/// direction `dir`? Looked up with the remote's identity and with
/// [`IDENTITY_ANY`], each with the protocol and with [`PROTO_ANY`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub local: u32,
    pub remote: u32,
    /// IP protocol number, or [`PROTO_ANY`].
    pub proto: u8,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// An inclusive destination port range, host byte order. `0..=65535` is
/// every port (and the only range that admits ICMP, which has none).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Port ranges one [`PolicyKey`] can hold. The compiler merges overlapping
/// and adjacent ranges; a pair needing more is refused loudly (fail closed).
pub const MAX_PORT_RANGES: usize = 16;

/// Value of the `POLICY` hash: the destination ports allowed.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// Ranges used, at most [`MAX_PORT_RANGES`].
    pub count: u8,
    pub _pad: [u8; 3],
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

/// The single entry of `POLICY_STATE`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct PolicyState {
    /// Bumped by the daemon after each change of `IDENTITIES`, `LOCAL_POLICY`
    /// or `POLICY`. A conntrack entry admitted under another generation is
    /// judged again on its next packet: a policy change applies to
    /// established connections too.
    pub generation: u32,
    /// Who an address inside a remote host's subnet (a `SUBNETS` hit) that
    /// `IDENTITIES` does not name as an endpoint is: a flannel host's
    /// container, one identity for them all, so the trie does not grow with
    /// the number of hosts. 0 until the daemon writes it (then such an
    /// address is judged like any other).
    pub foreign_identity: u32,
    /// The network of [`PolicyState::foreign_identity`].
    pub foreign_network: u32,
    /// 1 when no local endpoint is tracked: the programs then skip their
    /// `LOCAL_POLICY` lookups, so a host without policy pays nothing for
    /// it. 0, as before the daemon's first write, means look them up.
    pub untracked: u32,
}

/// Key of the `CONNTRACK` LRU hash: a flow as first seen at a local
/// endpoint, in that direction. Ports are network byte order; ICMP echo uses
/// the identifier for both.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`DIR_EGRESS`]: `saddr` is the local endpoint; [`DIR_INGRESS`]:
    /// `daddr` is.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// `CtEntry::state` bits (TCP); other protocols keep 0.
pub const CT_SYN_SEEN: u8 = 1;
pub const CT_REPLY_SEEN: u8 = 2;
pub const CT_FIN_SEEN: u8 = 4;
pub const CT_RST_SEEN: u8 = 8;

/// Value of the `CONNTRACK` map.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` after which the entry is dead (per-state timeout).
    pub expires: u64,
    /// [`PolicyState::generation`] the flow was last admitted under.
    pub generation: u32,
    /// `CT_*` bits.
    pub state: u8,
    pub _pad: [u8; 3],
}

/// Conntrack timeouts, seconds (Cilium's defaults).
pub const CT_TIMEOUT_TCP_ESTABLISHED: u64 = 21_600;
pub const CT_TIMEOUT_TCP_SYN: u64 = 60;
pub const CT_TIMEOUT_TCP_CLOSE: u64 = 10;
pub const CT_TIMEOUT_OTHER: u64 = 60;

/// Capacity of the conntrack table (LRU: the least recently used entry goes
/// when it is full).
pub const MAX_CONNTRACK: u32 = 131_072;
/// Capacity of the identity trie.
pub const MAX_IDENTITIES: u32 = 65_536;
/// Capacity of the policy hash.
pub const MAX_POLICY: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Identity {}
    unsafe impl aya::Pod for LocalPolicy {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PortRange {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
}
