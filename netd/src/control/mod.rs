//! The control plane: etcd. The network config, raw registry I/O, lease
//! allocation policy, acquiring and renewing this host's subnet, and
//! following the other hosts' leases into the kernel maps.

pub mod backoff;
pub mod config;
pub mod endpoints;
pub mod lease;
pub mod policy_sync;
pub mod registry;
pub mod subnet;
pub mod sync;
