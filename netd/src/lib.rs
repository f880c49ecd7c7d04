//! netd: an eBPF VXLAN overlay for containers across hosts. The library
//! behind the `netd` daemon and CLI and the `netd-cni` plugin.

pub mod cli;
pub mod control;
pub mod datapath;
pub mod egress;
pub mod endpoint;
pub mod metrics;
pub mod netlink;
pub mod policy;
#[cfg(test)]
mod proptests;
pub mod runtime;
pub mod selfheal;
pub mod state;
