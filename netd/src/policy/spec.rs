//! The policy format: JSON with the meaning of a Kubernetes NetworkPolicy.

use std::collections::{BTreeMap, BTreeSet};

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

/// Longest policy or network name (a DNS subdomain's limit).
pub const MAX_NAME_LEN: usize = 253;

/// Why a policy is refused. `at` names the field, e.g.
/// `ingress[0].ports[1].endPort`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy is not valid JSON of the policy format: {0}")]
    Json(String),
    #[error("name: must not be empty")]
    EmptyName,
    #[error("name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "name {in_file:?} in the policy differs from the name {asked:?} it is stored or asked under"
    )]
    NameMismatch { in_file: String, asked: String },
    #[error("{at}: network name {name:?}: {reason}")]
    InvalidNetwork {
        at: String,
        name: String,
        reason: &'static str,
    },
    #[error("{at}: unknown protocol {value}: expected \"TCP\", \"UDP\", \"SCTP\" or \"ICMP\"")]
    UnknownProtocol { at: String, value: String },
    #[error("{at}: port 0 is not a port (omit port for every port)")]
    PortZero { at: String },
    #[error("{at}: endPort needs a port")]
    EndPortWithoutPort { at: String },
    #[error("{at}: endPort {end_port} is below port {port}")]
    EndPortBelowPort {
        at: String,
        port: u16,
        end_port: u16,
    },
    #[error("{at}: ICMP has no ports (omit port and endPort)")]
    PortOnIcmp { at: String },
    #[error("{at}: a peer names either a cidr or a selector/network, not both")]
    PeerMixed { at: String },
    #[error("{at}: a peer needs a selector, a network or a cidr")]
    EmptyPeer { at: String },
    #[error("{at}: except needs a cidr")]
    ExceptWithoutCidr { at: String },
    #[error("{at}: {net} has bits set outside its prefix length (did you mean {trunc}?)")]
    NotAPrefix {
        at: String,
        net: Ipv4Net,
        trunc: Ipv4Net,
    },
    #[error("{at}: except {except} is not inside cidr {cidr}")]
    ExceptOutsideCidr {
        at: String,
        except: Ipv4Net,
        cidr: Ipv4Net,
    },
    #[error("{at}: label key {key:?}: {reason}")]
    InvalidLabelKey {
        at: String,
        key: String,
        reason: &'static str,
    },
    #[error("{at}: label {key:?} value {value:?}: {reason}")]
    InvalidLabelValue {
        at: String,
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("{at}: unknown direction {value}: expected \"Ingress\" or \"Egress\"")]
    UnknownDirection { at: String, value: String },
    #[error("{at}: an egress rule names its peers in \"to\", not \"from\"")]
    FromInEgress { at: String },
    #[error("{at}: an ingress rule names its peers in \"from\", not \"to\"")]
    ToInIngress { at: String },
}

impl Policy {
    /// Parse and validate; nothing of a policy that fails is used.
    pub fn parse(json: &[u8]) -> Result<Self, PolicyError> {
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| PolicyError::Json(e.to_string()))?;
        // Enumerations first, so an unknown protocol or direction gets its
        // own error rather than serde's.
        check_enums(&value)?;
        let policy: Policy =
            serde_json::from_value(value).map_err(|e| PolicyError::Json(e.to_string()))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Like [`Policy::parse`], for a policy stored or asked for under
    /// `name`: the name inside must be the same.
    pub fn parse_named(json: &[u8], name: &str) -> Result<Self, PolicyError> {
        let policy = Self::parse(json)?;
        if policy.name != name {
            return Err(PolicyError::NameMismatch {
                in_file: policy.name,
                asked: name.to_string(),
            });
        }
        Ok(policy)
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_name(&self.name)?;
        validate_network("network", &self.network)?;
        validate_labels("selector", &self.selector)?;
        for (dir, rules) in [
            (Direction::Ingress, &self.ingress),
            (Direction::Egress, &self.egress),
        ] {
            for (i, rule) in rules.iter().flatten().enumerate() {
                rule.validate(dir, &format!("{}[{i}]", dir.field()))?;
            }
        }
        Ok(())
    }

    /// The directions this policy isolates: `types`, or by default Ingress
    /// plus Egress when `egress` is present (an empty `types` is absent, as
    /// in Kubernetes).
    pub fn directions(&self) -> BTreeSet<Direction> {
        match &self.types {
            Some(types) if !types.is_empty() => types.iter().copied().collect(),
            _ => {
                let mut out = BTreeSet::from([Direction::Ingress]);
                if self.egress.is_some() {
                    out.insert(Direction::Egress);
                }
                out
            }
        }
    }

    /// The rules of direction `dir` (none when absent).
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => self.ingress.as_deref().unwrap_or_default(),
            Direction::Egress => self.egress.as_deref().unwrap_or_default(),
        }
    }
}

impl Direction {
    /// The JSON field holding this direction's rules.
    pub fn field(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl Rule {
    /// The peers of this rule in direction `dir`.
    pub fn peers(&self, dir: Direction) -> &[Peer] {
        match dir {
            Direction::Ingress => &self.from,
            Direction::Egress => &self.to,
        }
    }

    fn validate(&self, dir: Direction, at: &str) -> Result<(), PolicyError> {
        match dir {
            Direction::Ingress if !self.to.is_empty() => {
                return Err(PolicyError::ToInIngress { at: at.into() });
            }
            Direction::Egress if !self.from.is_empty() => {
                return Err(PolicyError::FromInEgress { at: at.into() });
            }
            _ => {}
        }
        let field = match dir {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        for (i, peer) in self.peers(dir).iter().enumerate() {
            peer.validate(&format!("{at}.{field}[{i}]"))?;
        }
        for (i, port) in self.ports.iter().enumerate() {
            port.validate(&format!("{at}.ports[{i}]"))?;
        }
        Ok(())
    }
}

impl Peer {
    fn validate(&self, at: &str) -> Result<(), PolicyError> {
        let by_endpoint = self.network.is_some() || self.selector.is_some();
        let Some(cidr) = self.cidr else {
            if !self.except.is_empty() {
                return Err(PolicyError::ExceptWithoutCidr { at: at.into() });
            }
            if !by_endpoint {
                return Err(PolicyError::EmptyPeer { at: at.into() });
            }
            if let Some(network) = &self.network {
                validate_network(&format!("{at}.network"), network)?;
            }
            if let Some(selector) = &self.selector {
                validate_labels(&format!("{at}.selector"), selector)?;
            }
            return Ok(());
        };
        if by_endpoint {
            return Err(PolicyError::PeerMixed { at: at.into() });
        }
        check_prefix(&format!("{at}.cidr"), cidr)?;
        for (i, except) in self.except.iter().enumerate() {
            let at = format!("{at}.except[{i}]");
            check_prefix(&at, *except)?;
            if !cidr.contains(except) {
                return Err(PolicyError::ExceptOutsideCidr {
                    at,
                    except: *except,
                    cidr,
                });
            }
        }
        Ok(())
    }
}

impl Port {
    fn validate(&self, at: &str) -> Result<(), PolicyError> {
        if self.protocol == Protocol::Icmp && (self.port.is_some() || self.end_port.is_some()) {
            return Err(PolicyError::PortOnIcmp { at: at.into() });
        }
        match (self.port, self.end_port) {
            (Some(0), _) => Err(PolicyError::PortZero {
                at: format!("{at}.port"),
            }),
            (None, Some(_)) => Err(PolicyError::EndPortWithoutPort {
                at: format!("{at}.endPort"),
            }),
            (Some(port), Some(end_port)) if end_port < port => Err(PolicyError::EndPortBelowPort {
                at: format!("{at}.endPort"),
                port,
                end_port,
            }),
            _ => Ok(()),
        }
    }

    /// The destination ports this entry allows.
    pub fn range(&self) -> (u16, u16) {
        match self.port {
            None => (0, u16::MAX),
            Some(port) => (port, self.end_port.unwrap_or(port)),
        }
    }
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
        }
    }
}

/// A policy name is an etcd key segment: `[a-z0-9.-]`, starting and ending
/// with a letter or digit, at most 253 characters.
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let invalid = |reason| PolicyError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(PolicyError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("longer than 253 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(invalid(
            "only lowercase letters, digits, '.' and '-' are allowed",
        ));
    }
    if !alnum_ends(name) {
        return Err(invalid("must start and end with a letter or digit"));
    }
    Ok(())
}

/// A network name as Docker and CNI allow them: `[A-Za-z0-9_.-]`, starting
/// with a letter or digit, at most 253 characters.
pub fn validate_network(at: &str, name: &str) -> Result<(), PolicyError> {
    let invalid = |reason| PolicyError::InvalidNetwork {
        at: at.to_string(),
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("longer than 253 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '_', '.' and '-' are allowed",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    Ok(())
}

/// Kubernetes label syntax: key `[prefix/]name` (prefix a DNS subdomain of
/// at most 253, name at most 63 of `[A-Za-z0-9_.-]` with alphanumeric
/// ends), value empty or like a name.
pub fn validate_labels(at: &str, labels: &BTreeMap<String, String>) -> Result<(), PolicyError> {
    for (key, value) in labels {
        if let Err(reason) = label_key(key) {
            return Err(PolicyError::InvalidLabelKey {
                at: at.to_string(),
                key: key.clone(),
                reason,
            });
        }
        if !value.is_empty()
            && let Err(reason) = label_name(value)
        {
            return Err(PolicyError::InvalidLabelValue {
                at: at.to_string(),
                key: key.clone(),
                value: value.clone(),
                reason,
            });
        }
    }
    Ok(())
}

fn label_key(key: &str) -> Result<(), &'static str> {
    let name = match key.split_once('/') {
        None => key,
        Some((prefix, name)) => {
            dns_subdomain(prefix)?;
            name
        }
    };
    label_name(name)
}

fn label_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name part must not be empty");
    }
    if name.len() > 63 {
        return Err("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("only letters, digits, '_', '.' and '-' are allowed");
    }
    if !alnum_ends(name) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn dns_subdomain(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() || prefix.len() > MAX_NAME_LEN {
        return Err("prefix must be a DNS subdomain of 1 to 253 characters");
    }
    for part in prefix.split('.') {
        let ok = !part.is_empty()
            && part.len() <= 63
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && alnum_ends(part);
        if !ok {
            return Err("prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')");
        }
    }
    Ok(())
}

fn alnum_ends(s: &str) -> bool {
    let (first, last) = (s.as_bytes()[0], s.as_bytes()[s.len() - 1]);
    first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric()
}

fn check_prefix(at: &str, net: Ipv4Net) -> Result<(), PolicyError> {
    if net.trunc() != net {
        return Err(PolicyError::NotAPrefix {
            at: at.to_string(),
            net,
            trunc: net.trunc(),
        });
    }
    Ok(())
}

/// Protocols and directions as written, before serde turns an unknown one
/// into a generic error.
fn check_enums(value: &serde_json::Value) -> Result<(), PolicyError> {
    use serde_json::Value;
    if let Some(Value::Array(types)) = value.get("types") {
        for (i, t) in types.iter().enumerate() {
            if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
                return Err(PolicyError::UnknownDirection {
                    at: format!("types[{i}]"),
                    value: t.to_string(),
                });
            }
        }
    }
    for field in ["ingress", "egress"] {
        let Some(Value::Array(rules)) = value.get(field) else {
            continue;
        };
        for (r, rule) in rules.iter().enumerate() {
            let Some(Value::Array(ports)) = rule.get("ports") else {
                continue;
            };
            for (p, port) in ports.iter().enumerate() {
                let Some(protocol) = port.get("protocol") else {
                    continue;
                };
                if !matches!(protocol.as_str(), Some("TCP" | "UDP" | "SCTP" | "ICMP")) {
                    return Err(PolicyError::UnknownProtocol {
                        at: format!("{field}[{r}].ports[{p}].protocol"),
                        value: protocol.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"name": "web-ingress", "network": "default", "selector": {"app": "web"}, "types": ["Ingress"],
        "ingress": [{"from": [{"selector": {"app": "client"}}, {"network": "blue", "selector": {}}, {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}],
                     "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}]}],
        "egress": []}"#;

    /// The example with `field` of the JSON object at `path` set to `value`.
    fn with(path: &[&str], field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut doc: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        let mut at = &mut doc;
        for step in path {
            at = match step.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*step],
            };
        }
        at[field] = value;
        serde_json::to_vec(&doc).unwrap()
    }

    fn refused(json: &[u8]) -> PolicyError {
        Policy::parse(json).expect_err("should be refused")
    }

    #[test]
    fn the_design_example_parses() {
        let policy = Policy::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(policy.name, "web-ingress");
        assert_eq!(policy.directions(), BTreeSet::from([Direction::Ingress]));
        let rule = &policy.rules(Direction::Ingress)[0];
        assert_eq!(rule.peers(Direction::Ingress).len(), 3);
        assert_eq!(rule.ports[0].range(), (8080, 8090));
        assert_eq!(rule.ports[0].protocol.number(), 6);
    }

    #[test]
    fn default_types_follow_the_rules_present() {
        let only_ingress = Policy::parse(br#"{"name":"a","ingress":[{}]}"#).unwrap();
        assert_eq!(
            only_ingress.directions(),
            BTreeSet::from([Direction::Ingress])
        );
        let both = Policy::parse(br#"{"name":"a","egress":[]}"#).unwrap();
        assert_eq!(
            both.directions(),
            BTreeSet::from([Direction::Ingress, Direction::Egress])
        );
        let empty_types = Policy::parse(br#"{"name":"a","types":[],"egress":[{}]}"#).unwrap();
        assert_eq!(empty_types.directions().len(), 2);
        let egress_only = Policy::parse(br#"{"name":"a","types":["Egress"]}"#).unwrap();
        assert_eq!(
            egress_only.directions(),
            BTreeSet::from([Direction::Egress])
        );
        assert_eq!(egress_only.network, "default");
    }

    #[test]
    fn names() {
        use serde_json::json;
        assert_eq!(
            refused(&with(&[], "name", json!(""))),
            PolicyError::EmptyName
        );
        for bad in [
            "Web",
            "web_1",
            "web/x",
            "-web",
            "web.",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(
                matches!(
                    refused(&with(&[], "name", json!(bad))),
                    PolicyError::InvalidName { .. }
                ),
                "{bad}"
            );
        }
        for good in ["a", "web-1.v2", &"a".repeat(253)] {
            Policy::parse(&with(&[], "name", json!(good))).unwrap();
        }
        let e = Policy::parse_named(EXAMPLE.as_bytes(), "other").unwrap_err();
        assert!(matches!(e, PolicyError::NameMismatch { .. }), "{e}");
        Policy::parse_named(EXAMPLE.as_bytes(), "web-ingress").unwrap();
    }

    #[test]
    fn networks() {
        use serde_json::json;
        for bad in ["", "_x", "blue net", "blue/x"] {
            let e = refused(&with(&[], "network", json!(bad)));
            assert!(
                matches!(&e, PolicyError::InvalidNetwork { at, .. } if at == "network"),
                "{e}"
            );
        }
        let e = refused(&with(
            &["ingress", "0", "from", "1"],
            "network",
            json!("bad name"),
        ));
        assert!(
            matches!(&e, PolicyError::InvalidNetwork { at, .. } if at == "ingress[0].from[1].network"),
            "{e}"
        );
        Policy::parse(&with(&[], "network", json!("My_net.1-a"))).unwrap();
    }

    #[test]
    fn ports() {
        use serde_json::json;
        let port = ["ingress", "0", "ports", "0"];
        let e = refused(&with(&port, "protocol", json!("GRE")));
        assert_eq!(
            e,
            PolicyError::UnknownProtocol {
                at: "ingress[0].ports[0].protocol".into(),
                value: "\"GRE\"".into()
            }
        );
        assert!(e.to_string().contains("GRE"));
        let e = refused(&with(&port, "protocol", json!("tcp")));
        assert!(matches!(e, PolicyError::UnknownProtocol { .. }));
        assert!(matches!(
            refused(&with(&port, "port", json!(0))),
            PolicyError::PortZero { .. }
        ));
        assert_eq!(
            refused(&with(&port, "endPort", json!(80))),
            PolicyError::EndPortBelowPort {
                at: "ingress[0].ports[0].endPort".into(),
                port: 8080,
                end_port: 80
            }
        );
        let e = refused(&with(&port, "port", serde_json::Value::Null));
        assert!(matches!(e, PolicyError::EndPortWithoutPort { .. }), "{e}");
        let e = refused(&with(&port, "protocol", json!("ICMP")));
        assert!(matches!(e, PolicyError::PortOnIcmp { .. }), "{e}");
        // Out of u16: serde's own error, naming the value.
        let e = refused(&with(&port, "port", json!(70000)));
        assert!(
            matches!(&e, PolicyError::Json(m) if m.contains("70000")),
            "{e}"
        );
        // ICMP without ports is fine, and so is a port without endPort.
        Policy::parse(br#"{"name":"a","ingress":[{"ports":[{"protocol":"ICMP"},{"port":53,"protocol":"UDP"}]}]}"#).unwrap();
    }

    #[test]
    fn peers() {
        use serde_json::json;
        let peer = ["ingress", "0", "from", "2"];
        let e = refused(&with(&peer, "selector", json!({})));
        assert_eq!(
            e,
            PolicyError::PeerMixed {
                at: "ingress[0].from[2]".into()
            }
        );
        let e = refused(&with(&peer, "except", json!(["198.51.100.0/24"])));
        assert!(matches!(e, PolicyError::ExceptOutsideCidr { .. }), "{e}");
        let e = refused(&with(&peer, "except", json!(["203.0.112.0/23"])));
        assert!(matches!(e, PolicyError::ExceptOutsideCidr { .. }), "{e}");
        let e = refused(&with(&peer, "cidr", json!("203.0.113.1/24")));
        assert!(matches!(e, PolicyError::NotAPrefix { .. }), "{e}");
        let e = refused(&with(&peer, "cidr", json!("203.0.113.0/33")));
        assert!(matches!(e, PolicyError::Json(_)), "{e}");
        let e = refused(br#"{"name":"a","ingress":[{"from":[{}]}]}"#);
        assert!(matches!(e, PolicyError::EmptyPeer { .. }), "{e}");
        let e = refused(br#"{"name":"a","ingress":[{"from":[{"except":["10.0.0.0/8"]}]}]}"#);
        assert!(matches!(e, PolicyError::ExceptWithoutCidr { .. }), "{e}");
        // An except equal to its cidr excludes all of it: allowed.
        Policy::parse(&with(&peer, "except", json!(["203.0.113.0/24"]))).unwrap();
    }

    #[test]
    fn directions_of_rules() {
        let e = refused(br#"{"name":"a","egress":[{"from":[{"selector":{}}]}]}"#);
        assert_eq!(
            e,
            PolicyError::FromInEgress {
                at: "egress[0]".into()
            }
        );
        let e = refused(br#"{"name":"a","ingress":[{"to":[{"selector":{}}]}]}"#);
        assert_eq!(
            e,
            PolicyError::ToInIngress {
                at: "ingress[0]".into()
            }
        );
        let e = refused(br#"{"name":"a","types":["Ingress","Sideways"]}"#);
        assert!(
            matches!(&e, PolicyError::UnknownDirection { at, .. } if at == "types[1]"),
            "{e}"
        );
    }

    #[test]
    fn labels() {
        use serde_json::json;
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "example.com/",
            "/a",
            "Example.com/a",
            &"a".repeat(64),
        ] {
            let e = refused(&with(&[], "selector", json!({ bad: "x" })));
            assert!(
                matches!(e, PolicyError::InvalidLabelKey { .. }),
                "{bad:?}: {e}"
            );
        }
        for bad in ["-x", "x y", &"v".repeat(64)] {
            let e = refused(&with(
                &["ingress", "0", "from", "0"],
                "selector",
                json!({ "app": bad }),
            ));
            assert!(
                matches!(&e, PolicyError::InvalidLabelValue { at, .. } if at == "ingress[0].from[0].selector"),
                "{bad:?}: {e}"
            );
        }
        Policy::parse(&with(
            &[],
            "selector",
            json!({"app.kubernetes.io/name": "web_1.a", "tier": "", "A": "B"}),
        ))
        .unwrap();
    }

    #[test]
    fn unknown_fields_and_bad_json() {
        assert!(matches!(
            refused(br#"{"name":"a","podSelector":{}}"#),
            PolicyError::Json(_)
        ));
        assert!(matches!(refused(b"{"), PolicyError::Json(_)));
        assert!(matches!(refused(b"[]"), PolicyError::Json(_)));
    }
}
