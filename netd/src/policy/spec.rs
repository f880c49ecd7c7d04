//! The policy format: JSON with the meaning of a Kubernetes NetworkPolicy.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// A policy as stored in etcd and given to `netd policy apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    #[serde(default = "default_network")]
    pub network: String,
    /// Labels an endpoint of `network` must carry to be selected (`{}`: all).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Directions the policy isolates; absent: Ingress, plus Egress when
    /// `egress` is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<Direction>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

fn default_network() -> String {
    super::DEFAULT_NETWORK.into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// One rule: traffic from (ingress) or to (egress) any of `from`/`to` on
/// any of `ports`. An absent or empty peer list means every peer; an absent
/// or empty port list every port of every protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
}

/// Endpoints by labels (of the policy's network unless `network` names
/// another), or addresses by prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

/// A protocol, optionally narrowed to a port or a port range
/// (`port..=endPort`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(rename = "endPort", default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// Why a policy is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy is not valid JSON of the policy format: {0}")]
    Json(String),
}

impl Policy {
    /// Parse and validate; nothing of a policy that fails is used.
    pub fn parse(json: &[u8]) -> Result<Self, PolicyError> {
        serde_json::from_slice(json).map_err(|e| PolicyError::Json(e.to_string()))
    }
}
