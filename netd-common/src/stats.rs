//! Per-CPU packet counters: one slot per verdict and per drop reason, so an
//! operator can always tell where a packet went and why it died.

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal => $label:literal,)*) => {
        #[repr(u32)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$doc])* $name = $idx,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Stable name used by `netd status`.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// From a container to a container on this host.
    LocalDelivered = 0 => "local_delivered",
    /// From a container, encapsulated to a remote host.
    Encapsulated = 1 => "encapsulated",
    /// From a container, not for the overlay: handed to the host stack.
    ContainerToStack = 2 => "container_to_stack",
    /// VXLAN from a peer, decapsulated and delivered to a container.
    Decapsulated = 3 => "decapsulated",
    /// VXLAN from a peer for a non-container address: inner frame to the stack.
    DecapToStack = 4 => "decap_to_stack",
    /// Underlay traffic that is not VXLAN on our port: untouched.
    UnderlayPassed = 5 => "underlay_passed",
    /// Dropped: VXLAN from a source that is not a known peer.
    DropUnknownPeer = 6 => "drop_unknown_peer",
    /// Dropped: VXLAN with another VNI or without the I flag.
    DropBadVni = 7 => "drop_bad_vni",
    /// Dropped: headers shorter than they claim.
    DropMalformed = 8 => "drop_malformed",
    /// Dropped: first outer fragment to the VXLAN port from a source that
    /// is not a known peer.
    DropFragment = 9 => "drop_fragment",
    /// Dropped: the kernel refused to grow or shrink the packet.
    DropAdjustFailed = 10 => "drop_adjust_failed",
    /// Dropped: redirect to the underlay or a container failed.
    DropRedirectFailed = 11 => "drop_redirect_failed",
    /// Passed: no node configuration yet (daemon not ready).
    NotConfigured = 12 => "not_configured",
    /// Plain IPv4 from the underlay for a local container (direct routing,
    /// or a frame XDP already decapsulated): delivered by TC.
    UnderlayDelivered = 13 => "underlay_delivered",
    /// From a container, routed to a peer on the same L2 segment without
    /// encapsulation (host-gw, or VXLAN with DirectRouting).
    RoutedDirect = 14 => "routed_direct",
    /// Dropped: IPv4 from a container with a source address or MAC that is
    /// not its own.
    DropSpoofed = 15 => "drop_spoofed",
    /// Too big for the tunnel with DF set: dropped, and an ICMP
    /// fragmentation-needed sent back to the container.
    FragNeeded = 16 => "frag_needed",
    /// Dropped: too big for the tunnel without DF; the kernel programs
    /// cannot fragment (only a container that raised its MTU sends these).
    DropTooBig = 17 => "drop_too_big",
    // Routing as a router does: TTL, ECN, inner protocol.
    /// TTL would reach 0 at the gateway: dropped, and an ICMP time-exceeded
    /// sent back to the container.
    TtlExceeded = 18 => "ttl_exceeded",
    /// TTL would reach 0 on an ICMP error or a later fragment: dropped
    /// without an ICMP reply (RFC 1812).
    DropTtlExpired = 19 => "drop_ttl_expired",
    /// Dropped: VXLAN from a peer carrying something other than IPv4.
    DropNotIpv4 = 20 => "drop_not_ipv4",
    /// Dropped: outer CE on an inner packet that is not ECN-capable
    /// (RFC 6040).
    DropEcn = 21 => "drop_ecn",
    // Underlay paths with a smaller MTU: outer fragments reassembled.
    /// Outer IPv4 UDP fragment from a peer to this host (a router on the
    /// path fragmented VXLAN): passed to the stack to be reassembled.
    UnderlayFragmentToStack = 22 => "underlay_fragment_to_stack",
    /// VXLAN reassembled by the stack, delivered to a container by the
    /// tunnel device's program.
    ReassembledDelivered = 23 => "reassembled_delivered",
    // Isolation and policy.
    /// Dropped: a policy isolates the endpoint in this direction and none
    /// allows the flow.
    DropPolicy = 24 => "drop_policy",
    /// Dropped: from an endpoint of another network, and no policy of the
    /// destination's network allows it.
    DropIsolation = 25 => "drop_isolation",
}

impl Counter {
    pub const COUNT: u32 = 26;
}
