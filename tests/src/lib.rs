//! Test infrastructure for netd: network namespaces, a simulated multi-host
//! underlay with etcd, daemons under guard, traffic checks and captures.
//!
//! Everything is created inside uniquely named network namespaces and torn
//! down by `Drop` guards, also when a test panics. Most of it needs root and
//! panics (never skips) without it.

pub mod bpftool;
pub mod builds;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod counters;
pub mod daemon;
pub mod dockerd;
pub mod etcd;
pub mod flannel;
pub mod http;
pub mod icmp;
pub mod image;
pub mod lease;
pub mod links;
pub mod netns;
pub mod ping_run;
pub mod podman;
pub mod policy;
pub mod prometheus;
pub mod stream;
pub mod topology;
pub mod traffic;
pub mod util;

pub use capture::{Capture, VXLAN_PORT, decode};
pub use cluster::{Cluster, Container};
pub use daemon::{Daemon, netd_bin};
pub use etcd::{Etcd, EtcdTls, Kv};
pub use icmp::{IcmpError, IcmpSocket, SendOpts, internet_checksum, udp_sender};
pub use netns::{NetNs, NsRef, unique_name};
pub use topology::{Host, SWITCH_IP, Topology, TopologyBuilder, host_ip};
pub use traffic::{
    PingStats, Transfer, ping, ping_stats, ping_stats_sized, tcp_transfer, udp_echo,
};
pub use util::{poll_until, require_root, strip_ansi, wait_for};

/// The directory of this build's map layout under a pin path (`v<N>`).
pub fn layout_dir() -> String {
    format!("v{}", netd_common::MAP_LAYOUT_VERSION)
}
