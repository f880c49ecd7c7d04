//! Isolation between networks and network policy: endpoints (address,
//! network, labels) and policies in, the kernel's policy tables out.
//!
//! `spec` is the policy format stored at `<prefix>/policies/<name>`;
//! `compile` turns a [`ClusterView`] and the valid policies into [`Tables`],
//! which `datapath::policy_maps` writes to the kernel.

pub mod compile;
pub mod identity;
#[cfg(test)]
mod reference;
pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use netd_common::policy::{Identity, LocalPolicy, PolicyEntry, PolicyKey};
use serde::{Deserialize, Serialize};

pub use compile::compile;
pub use spec::{Policy, PolicyError};

/// The network of an endpoint that names none.
pub const DEFAULT_NETWORK: &str = "default";

/// An endpoint of any host, as published at
/// `<prefix>/endpoints/<subnet key>/<ip>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub ip: Ipv4Addr,
    pub network: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// An endpoint for tests: `("10.244.1.2", "default", &[("app", "web")])`.
#[cfg(test)]
pub fn endpoint_info(ip: &str, network: &str, labels: &[(&str, &str)]) -> EndpointInfo {
    EndpointInfo {
        ip: ip.parse().unwrap(),
        network: network.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Everything the tables are compiled from, as one host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Every endpoint of every host, this one's included.
    pub endpoints: Vec<EndpointInfo>,
    /// Addresses of the endpoints on this host (they get `LOCAL_POLICY`).
    pub local: BTreeSet<Ipv4Addr>,
    /// Who a flannel host's containers are (addresses of a remote host's
    /// subnet that are not published endpoints, told apart by the kernel
    /// from its `SUBNETS`): network `default`, no labels, unless configured.
    pub foreign: ForeignIdentity,
    /// This host's gateway address (identity HOST: always allowed).
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignIdentity {
    pub network: String,
    pub labels: BTreeMap<String, String>,
}

impl Default for ForeignIdentity {
    fn default() -> Self {
        Self {
            network: DEFAULT_NETWORK.into(),
            labels: BTreeMap::new(),
        }
    }
}

/// The desired content of `IDENTITIES`, `LOCAL_POLICY`, `POLICY` and the
/// foreign identity of `POLICY_STATE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub identities: BTreeMap<Ipv4Net, Identity>,
    pub local: BTreeMap<Ipv4Addr, LocalPolicy>,
    pub rules: BTreeMap<PolicyKey, PolicyEntry>,
    /// The identity and network id of a flannel host's containers.
    pub foreign_identity: u32,
    pub foreign_network: u32,
    /// Pairs that needed more port ranges than a `PolicyEntry` holds (their
    /// extra ranges are denied), one line each, for the log and status.
    pub problems: Vec<String>,
}

impl Tables {
    /// Whether any local endpoint's flows are tracked (else the programs
    /// are told to skip `LOCAL_POLICY`).
    pub fn tracks_any(&self) -> bool {
        self.local
            .values()
            .any(|lp| lp.flags & netd_common::policy::LOCAL_TRACK != 0)
    }
}
