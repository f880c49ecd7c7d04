//! Endpoints and policies → the kernel's policy tables.
//!
//! `IDENTITIES` gets every endpoint as a /32, this host's gateway as HOST
//! and every prefix a `cidr` peer or `except` names as a CIDR identity; the
//! foreign identity (a flannel host's containers) is one value in
//! `POLICY_STATE`, which the kernel gives any address of a remote host's
//! subnet that is not a published endpoint, before it tries `cidr` prefixes,
//! so a `cidr` peer never covers a container and nothing here grows with
//! the number of hosts. `LOCAL_POLICY` gets every local endpoint with its
//! isolation flags; `POLICY` the allowed (remote, protocol, ports) of each
//! local identity and direction.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use netd_common::policy::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, Identity, IdentityKind,
    LOCAL_ISOLATED_EGRESS, LOCAL_ISOLATED_INGRESS, LOCAL_TRACK, LocalPolicy, MAX_PORT_RANGES,
    PROTO_ANY, PolicyEntry, PolicyKey, PortRange,
};

use super::{
    ClusterView, EndpointInfo, Policy, Tables,
    identity::{self, network_id},
    spec::{Direction, Peer},
};

/// The tables for `view` under `policies` (all already valid).
pub fn compile(view: &ClusterView, policies: &[Policy]) -> Tables {
    let ids = Ids::new(view, policies);
    let foreign = &view.foreign;
    let mut tables = Tables {
        identities: ids.trie(view),
        foreign_identity: ids.endpoint(&foreign.network, &foreign.labels),
        foreign_network: network_id(&foreign.network),
        ..Tables::default()
    };
    let networks = networks(view);
    let mut wanted: BTreeMap<PolicyKey, Vec<PortRange>> = BTreeMap::new();
    for ip in &view.local {
        let Some(local) = view.endpoints.iter().find(|e| e.ip == *ip) else {
            tables.problems.push(format!(
                "local endpoint {ip} is not among the published endpoints"
            ));
            continue;
        };
        let id = ids.endpoint(&local.network, &local.labels);
        let mut flags = 0;
        for policy in policies.iter().filter(|p| selects(p, local)) {
            for dir in policy.directions() {
                flags |= match dir {
                    Direction::Ingress => LOCAL_ISOLATED_INGRESS,
                    Direction::Egress => LOCAL_ISOLATED_EGRESS,
                };
                add_rules(&ids, policy, dir, id, &mut wanted);
            }
        }
        if flags != 0 || networks.len() > 1 {
            flags |= LOCAL_TRACK;
        }
        tables.local.insert(
            *ip,
            LocalPolicy {
                identity: id,
                network: network_id(&local.network),
                flags,
                _pad: [0; 3],
            },
        );
    }
    for (key, ranges) in wanted {
        let (entry, dropped) = entry(ranges);
        if dropped > 0 {
            tables.problems.push(format!(
                "identity {} {} identity {} protocol {}: {} port ranges after merging, {} kept, the rest denied",
                key.local,
                if key.dir == DIR_INGRESS { "from" } else { "to" },
                key.remote,
                key.proto,
                MAX_PORT_RANGES + dropped,
                MAX_PORT_RANGES
            ));
        }
        tables.rules.insert(key, entry);
    }
    tables
}

/// Whether `policy` selects endpoint `e`.
pub fn selects(policy: &Policy, e: &EndpointInfo) -> bool {
    policy.network == e.network && contains(&e.labels, &policy.selector)
}

/// Whether `labels` carry every label of `selector`.
pub fn contains(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Networks of the published endpoints. The foreign network does not count:
/// an address of a netd host whose endpoint is not published yet (a
/// container in its first moments) also resolves to the foreign identity,
/// and tracking every endpoint for it would drop those first packets in a
/// cluster of one named network. A flannel host's containers are isolated
/// from a network once a second network or a policy is in force.
fn networks(view: &ClusterView) -> BTreeSet<&str> {
    view.endpoints.iter().map(|e| e.network.as_str()).collect()
}

/// Union of one policy's rules in `dir` for local identity `local`.
fn add_rules(
    ids: &Ids,
    policy: &Policy,
    dir: Direction,
    local: u32,
    wanted: &mut BTreeMap<PolicyKey, Vec<PortRange>>,
) {
    let dir_byte = match dir {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    };
    for rule in policy.rules(dir) {
        let peers = rule.peers(dir);
        let remotes: BTreeSet<u32> = if peers.is_empty() {
            BTreeSet::from([IDENTITY_ANY])
        } else {
            peers.iter().flat_map(|p| ids.peer(policy, p)).collect()
        };
        let ports: Vec<(u8, PortRange)> = if rule.ports.is_empty() {
            vec![(
                PROTO_ANY,
                PortRange {
                    first: 0,
                    last: u16::MAX,
                },
            )]
        } else {
            rule.ports
                .iter()
                .map(|p| {
                    let (first, last) = p.range();
                    (p.protocol.number(), PortRange { first, last })
                })
                .collect()
        };
        for &remote in &remotes {
            for &(proto, range) in &ports {
                let key = PolicyKey {
                    local,
                    remote,
                    proto,
                    dir: dir_byte,
                    _pad: [0; 2],
                };
                wanted.entry(key).or_default().push(range);
            }
        }
    }
}

/// Merged ranges as an entry, and how many did not fit.
fn entry(ranges: Vec<PortRange>) -> (PolicyEntry, usize) {
    let merged = merge(ranges);
    let mut entry = PolicyEntry {
        count: merged.len().min(MAX_PORT_RANGES) as u8,
        _pad: [0; 3],
        ranges: [PortRange::default(); MAX_PORT_RANGES],
    };
    for (slot, range) in entry.ranges.iter_mut().zip(&merged) {
        *slot = *range;
    }
    (entry, merged.len().saturating_sub(MAX_PORT_RANGES))
}

/// Sorted, with overlapping and adjacent ranges joined.
pub fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// The identities of a view and its policies.
struct Ids {
    ids: BTreeMap<String, u32>,
    /// Endpoint identities: (network, labels) → id.
    endpoints: BTreeMap<(String, BTreeMap<String, String>), u32>,
    /// CIDR identities of the prefixes that get an `IDENTITIES` entry.
    cidrs: BTreeMap<Ipv4Net, u32>,
}

impl Ids {
    fn new(view: &ClusterView, policies: &[Policy]) -> Self {
        let mut endpoints: BTreeSet<(String, BTreeMap<String, String>)> = view
            .endpoints
            .iter()
            .map(|e| (e.network.clone(), e.labels.clone()))
            .collect();
        endpoints.insert((view.foreign.network.clone(), view.foreign.labels.clone()));
        let cidrs: BTreeSet<Ipv4Net> = policy_prefixes(policies)
            .into_iter()
            .filter(|p| !shadowed(view, *p))
            .collect();
        let mut canonicals: BTreeSet<String> = endpoints
            .iter()
            .map(|(n, l)| identity::endpoint_canonical(n, l))
            .collect();
        canonicals.extend(cidrs.iter().map(|p| identity::cidr_canonical(*p)));
        let ids = identity::assign(&canonicals);
        let endpoints = endpoints
            .into_iter()
            .map(|(n, l)| {
                let id = ids[&identity::endpoint_canonical(&n, &l)];
                ((n, l), id)
            })
            .collect();
        let cidrs = cidrs
            .into_iter()
            .map(|p| (p, ids[&identity::cidr_canonical(p)]))
            .collect();
        Ids {
            ids,
            endpoints,
            cidrs,
        }
    }

    fn endpoint(&self, network: &str, labels: &BTreeMap<String, String>) -> u32 {
        self.ids[&identity::endpoint_canonical(network, labels)]
    }

    /// The remote identities a peer of `policy` allows.
    fn peer(&self, policy: &Policy, peer: &Peer) -> Vec<u32> {
        if let Some(cidr) = peer.cidr {
            let mut out: Vec<u32> = self
                .cidrs
                .iter()
                .filter(|(p, _)| cidr.contains(*p) && !peer.except.iter().any(|x| x.contains(*p)))
                .map(|(_, id)| *id)
                .collect();
            // Addresses no entry covers look up as WORLD.
            if cidr.prefix_len() == 0 {
                out.push(IDENTITY_WORLD);
            }
            return out;
        }
        let network = peer.network.as_deref().unwrap_or(&policy.network);
        let empty = BTreeMap::new();
        let selector = peer.selector.as_ref().unwrap_or(&empty);
        self.endpoints
            .iter()
            .filter(|((n, labels), _)| n == network && contains(labels, selector))
            .map(|(_, id)| *id)
            .collect()
    }

    /// The `IDENTITIES` trie: CIDR prefixes, then the gateway and
    /// endpoints over them where a key is the same.
    fn trie(&self, view: &ClusterView) -> BTreeMap<Ipv4Net, Identity> {
        let mut out = BTreeMap::new();
        for (prefix, id) in &self.cidrs {
            out.insert(*prefix, identity(*id, 0, IdentityKind::Cidr));
        }
        if let Some(gateway) = view.gateway {
            out.insert(
                host_net(gateway),
                identity(IDENTITY_HOST, 0, IdentityKind::Host),
            );
        }
        for e in &view.endpoints {
            let id = self.endpoint(&e.network, &e.labels);
            let net = network_id(&e.network);
            out.insert(host_net(e.ip), identity(id, net, IdentityKind::Endpoint));
        }
        out
    }
}

/// Every prefix a `cidr` peer or an `except` names.
fn policy_prefixes(policies: &[Policy]) -> BTreeSet<Ipv4Net> {
    let mut out = BTreeSet::new();
    for policy in policies {
        for dir in [Direction::Ingress, Direction::Egress] {
            for rule in policy.rules(dir) {
                for peer in rule.peers(dir) {
                    if let Some(cidr) = peer.cidr {
                        out.insert(cidr.trunc());
                        out.extend(peer.except.iter().map(|x| x.trunc()));
                    }
                }
            }
        }
    }
    out
}

/// The /32 of an endpoint or the gateway: its entry names that, so the
/// prefix gets no CIDR identity. (A prefix inside a remote host's subnet
/// keeps one: the kernel tries `SUBNETS` first, so it covers only addresses
/// no host holds.)
fn shadowed(view: &ClusterView, prefix: Ipv4Net) -> bool {
    prefix.prefix_len() == 32
        && (view.gateway == Some(prefix.addr())
            || view.endpoints.iter().any(|e| e.ip == prefix.addr()))
}

fn host_net(ip: std::net::Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("32 is a valid prefix length")
}

fn identity(id: u32, network: u32, kind: IdentityKind) -> Identity {
    Identity {
        id,
        network,
        kind: kind as u8,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netd_common::policy::IDENTITY_FIRST_ASSIGNED;

    use super::*;
    use crate::policy::reference;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ep(ip: &str, network: &str, pairs: &[(&str, &str)]) -> EndpointInfo {
        EndpointInfo {
            ip: ip.parse().unwrap(),
            network: network.into(),
            labels: labels(pairs),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn policy(json: &str) -> Policy {
        Policy::parse(json.as_bytes()).unwrap()
    }

    /// web and client on this host (10.244.1.0/24), db on a netd host
    /// (10.244.2.0/24), blue on this host, a flannel host at 10.244.3.0/24.
    fn view() -> ClusterView {
        ClusterView {
            endpoints: vec![
                ep("10.244.1.2", "default", &[("app", "web")]),
                ep("10.244.1.3", "default", &[("app", "client")]),
                ep("10.244.1.4", "blue", &[("app", "web")]),
                ep("10.244.2.2", "default", &[("app", "db")]),
            ],
            local: [ip("10.244.1.2"), ip("10.244.1.3"), ip("10.244.1.4")].into(),
            foreign: Default::default(),
            gateway: Some(ip("10.244.1.1")),
        }
    }

    /// The remote subnets the kernel holds (`SUBNETS`) for [`view`].
    fn subnets() -> Vec<Ipv4Net> {
        vec![net("10.244.2.0/24"), net("10.244.3.0/24")]
    }

    fn tcp(port: u16) -> (u8, u16) {
        (6, port)
    }

    fn allows(
        t: &Tables,
        local: &str,
        remote: &str,
        dir: Direction,
        (proto, port): (u8, u16),
    ) -> bool {
        reference::kernel_allows(t, &subnets(), ip(local), ip(remote), dir, proto, port)
    }

    const WEB: &str = "10.244.1.2";
    const CLIENT: &str = "10.244.1.3";
    const BLUE: &str = "10.244.1.4";
    const DB: &str = "10.244.2.2";
    const FLANNEL: &str = "10.244.3.7";

    #[test]
    fn identities_hold_endpoints_gateway_and_cidrs_not_subnets() {
        let p = policy(
            r#"{"name":"a","ingress":[{"from":[{"cidr":"203.0.113.0/24","except":["203.0.113.128/25"]},{"cidr":"10.244.3.0/28"}]}]}"#,
        );
        let t = compile(&view(), &[p]);
        let id = |s: &str| t.identities[&net(s)];
        assert_eq!(id("10.244.1.1/32").id, IDENTITY_HOST);
        assert_eq!(id("10.244.1.1/32").kind, IdentityKind::Host as u8);
        for e in view().endpoints {
            let entry = id(&format!("{}/32", e.ip));
            assert!(entry.id >= IDENTITY_FIRST_ASSIGNED);
            assert_eq!(entry.network, network_id(&e.network));
            assert_eq!(entry.kind, IdentityKind::Endpoint as u8);
        }
        // Same network and labels: same id; different labels: another.
        assert_ne!(id("10.244.1.2/32").id, id("10.244.1.3/32").id);
        // web in blue is not web in default.
        assert_ne!(id("10.244.1.2/32").id, id("10.244.1.4/32").id);
        // Remote subnets get no entry: the foreign identity (default, no
        // labels) is one value for the kernel's `SUBNETS` hits.
        assert!(!t.identities.contains_key(&net("10.244.2.0/24")));
        assert!(!t.identities.contains_key(&net("10.244.3.0/24")));
        let default_no_labels = compile(
            &ClusterView {
                endpoints: vec![ep("10.244.1.5", "default", &[])],
                ..Default::default()
            },
            &[],
        );
        assert_eq!(
            t.foreign_identity,
            default_no_labels.identities[&net("10.244.1.5/32")].id
        );
        assert!(t.foreign_identity >= IDENTITY_FIRST_ASSIGNED);
        assert_eq!(t.foreign_network, network_id("default"));
        let cidr = id("203.0.113.0/24");
        assert_eq!((cidr.kind, cidr.network), (IdentityKind::Cidr as u8, 0));
        assert_ne!(cidr.id, id("203.0.113.128/25").id);
        // A prefix inside a remote subnet keeps its entry: the kernel tries
        // `SUBNETS` first, so it covers only addresses no host holds.
        assert_eq!(id("10.244.3.0/28").kind, IdentityKind::Cidr as u8);
        assert_eq!(t.identities.len(), 5 + 3);
        let ing = Direction::Ingress;
        assert!(!allows(&t, WEB, FLANNEL, ing, tcp(80)));
        assert!(reference::kernel_allows(
            &t,
            &[net("10.244.2.0/24")],
            ip(WEB),
            ip(FLANNEL),
            ing,
            6,
            80
        ));
        // Deterministic: the same inputs, the same tables.
        assert_eq!(
            t,
            compile(
                &view(),
                &[policy(
                    r#"{"name":"a","ingress":[{"from":[{"cidr":"203.0.113.0/24","except":["203.0.113.128/25"]},{"cidr":"10.244.3.0/28"}]}]}"#
                )]
            )
        );
    }

    #[test]
    fn isolation_flags_and_tracking() {
        let single = ClusterView {
            endpoints: vec![
                ep(WEB, "default", &[("app", "web")]),
                ep(CLIENT, "default", &[]),
            ],
            local: [ip(WEB), ip(CLIENT)].into(),
            ..Default::default()
        };
        // One network, no policy: entries with no flag (untracked).
        let t = compile(&single, &[]);
        assert_eq!(t.local.len(), 2);
        assert!(t.local.values().all(|lp| lp.flags == 0));
        assert!(t.rules.is_empty());
        // An ingress policy selecting web: web isolated and tracked only.
        let t = compile(
            &single,
            &[policy(r#"{"name":"a","selector":{"app":"web"}}"#)],
        );
        assert_eq!(
            t.local[&ip(WEB)].flags,
            LOCAL_ISOLATED_INGRESS | LOCAL_TRACK
        );
        assert_eq!(t.local[&ip(CLIENT)].flags, 0);
        let t = compile(&single, &[policy(r#"{"name":"a","types":["Egress"]}"#)]);
        assert_eq!(
            t.local[&ip(CLIENT)].flags,
            LOCAL_ISOLATED_EGRESS | LOCAL_TRACK
        );
        // A policy of another network selects nothing here.
        let t = compile(&single, &[policy(r#"{"name":"a","network":"blue"}"#)]);
        assert!(t.local.values().all(|lp| lp.flags == 0));
        // Two networks: everyone tracked, so replies are told from new flows.
        let t = compile(&view(), &[]);
        assert!(t.local.values().all(|lp| lp.flags == LOCAL_TRACK));
        assert_eq!(t.local[&ip(BLUE)].network, network_id("blue"));
        // The foreign network alone does not make a second network.
        let with_foreign = ClusterView {
            foreign: crate::policy::ForeignIdentity {
                network: "legacy".into(),
                labels: BTreeMap::new(),
            },
            ..single
        };
        assert!(
            compile(&with_foreign, &[])
                .local
                .values()
                .all(|lp| lp.flags == 0)
        );
    }

    #[test]
    fn isolation_between_networks() {
        let t = compile(&view(), &[]);
        assert!(allows(&t, WEB, CLIENT, Direction::Ingress, tcp(80)));
        assert!(allows(&t, WEB, DB, Direction::Ingress, tcp(80)));
        assert!(allows(&t, WEB, FLANNEL, Direction::Ingress, tcp(80)));
        assert!(!allows(&t, WEB, BLUE, Direction::Ingress, tcp(80)));
        assert!(!allows(&t, BLUE, WEB, Direction::Ingress, tcp(80)));
        assert!(allows(&t, BLUE, "10.244.1.1", Direction::Ingress, tcp(80)));
        assert!(allows(&t, BLUE, "203.0.113.9", Direction::Ingress, tcp(80)));
        // Egress is judged where it arrives.
        assert!(allows(&t, WEB, BLUE, Direction::Egress, tcp(80)));
    }

    #[test]
    fn the_design_example() {
        let p = policy(
            r#"{"name": "web-ingress", "network": "default", "selector": {"app": "web"}, "types": ["Ingress"],
                "ingress": [{"from": [{"selector": {"app": "client"}}, {"network": "blue", "selector": {}}, {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}],
                             "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}]}],
                "egress": []}"#,
        );
        let t = compile(&view(), &[p]);
        let ing = Direction::Ingress;
        assert!(allows(&t, WEB, CLIENT, ing, tcp(8080)));
        assert!(allows(&t, WEB, CLIENT, ing, tcp(8090)));
        assert!(!allows(&t, WEB, CLIENT, ing, tcp(8091)));
        assert!(!allows(&t, WEB, CLIENT, ing, (17, 8080)));
        assert!(allows(&t, WEB, BLUE, ing, tcp(8085)));
        assert!(!allows(&t, WEB, DB, ing, tcp(8085)));
        assert!(!allows(&t, WEB, FLANNEL, ing, tcp(8085)));
        assert!(allows(&t, WEB, "203.0.113.5", ing, tcp(8085)));
        assert!(!allows(&t, WEB, "203.0.113.200", ing, tcp(8085)));
        assert!(!allows(&t, WEB, "198.51.100.1", ing, tcp(8085)));
        // The gateway always; web's egress is not isolated.
        assert!(allows(&t, WEB, "10.244.1.1", ing, tcp(22)));
        assert!(allows(&t, WEB, "198.51.100.1", Direction::Egress, tcp(22)));
        // client is not selected.
        assert!(allows(&t, CLIENT, DB, ing, tcp(22)));
        // Keys: client and blue web by identity, the cidr by its identity.
        let web = t.local[&ip(WEB)].identity;
        let keys: Vec<&PolicyKey> = t.rules.keys().collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(
            keys.iter()
                .all(|k| k.local == web && k.proto == 6 && k.dir == DIR_INGRESS)
        );
        let entry = t.rules.values().next().unwrap();
        assert_eq!(
            (entry.count, entry.ranges[0]),
            (
                1,
                PortRange {
                    first: 8080,
                    last: 8090
                }
            )
        );
    }

    #[test]
    fn empty_peers_and_ports_are_wildcards() {
        let p = policy(
            r#"{"name":"a","selector":{"app":"web"},"ingress":[{}],"egress":[{"ports":[{"protocol":"UDP","port":53}]}]}"#,
        );
        let t = compile(&view(), &[p]);
        let web = t.local[&ip(WEB)].identity;
        let any = PolicyKey {
            local: web,
            remote: IDENTITY_ANY,
            proto: PROTO_ANY,
            dir: DIR_INGRESS,
            _pad: [0; 2],
        };
        assert_eq!(
            t.rules[&any].ranges[0],
            PortRange {
                first: 0,
                last: u16::MAX
            }
        );
        let dns = PolicyKey {
            proto: 17,
            dir: DIR_EGRESS,
            ..any
        };
        assert_eq!(
            t.rules[&dns].ranges[0],
            PortRange {
                first: 53,
                last: 53
            }
        );
        assert_eq!(t.rules.len(), 2);
        // Ingress from anyone, even another network, once a rule allows it.
        assert!(allows(&t, WEB, BLUE, Direction::Ingress, tcp(1)));
        assert!(allows(&t, WEB, "8.8.8.8", Direction::Egress, (17, 53)));
        assert!(!allows(&t, WEB, "8.8.8.8", Direction::Egress, tcp(53)));
        // Isolated with no rule at all: nothing but the host.
        let t = compile(
            &view(),
            &[policy(r#"{"name":"a","types":["Ingress","Egress"]}"#)],
        );
        assert!(!allows(&t, WEB, CLIENT, Direction::Ingress, tcp(80)));
        assert!(!allows(&t, WEB, CLIENT, Direction::Egress, tcp(80)));
        assert!(allows(&t, WEB, "10.244.1.1", Direction::Egress, tcp(80)));
    }

    #[test]
    fn a_peer_with_a_network_and_no_selector_is_all_of_it() {
        let p =
            policy(r#"{"name":"a","network":"blue","ingress":[{"from":[{"network":"default"}]}]}"#);
        let t = compile(&view(), &[p]);
        for remote in [WEB, CLIENT, DB, FLANNEL] {
            assert!(
                allows(&t, BLUE, remote, Direction::Ingress, tcp(80)),
                "{remote}"
            );
        }
        assert!(!allows(
            &t,
            BLUE,
            "203.0.113.1",
            Direction::Ingress,
            tcp(80)
        ));
    }

    #[test]
    fn zero_cidr_allows_the_world_except() {
        let p = policy(
            r#"{"name":"a","types":["Egress"],"egress":[{"to":[{"cidr":"0.0.0.0/0","except":["10.0.0.0/8"]}]}]}"#,
        );
        let t = compile(&view(), &[p]);
        let eg = Direction::Egress;
        assert!(allows(&t, WEB, "8.8.8.8", eg, tcp(443)));
        assert!(!allows(&t, WEB, "10.1.2.3", eg, tcp(443)));
        // Endpoints are never covered by cidr peers.
        assert!(!allows(&t, WEB, CLIENT, eg, tcp(443)));
        assert!(!allows(&t, WEB, FLANNEL, eg, tcp(443)));
        assert!(t.local[&ip(WEB)].flags & LOCAL_ISOLATED_EGRESS != 0);
    }

    #[test]
    fn ranges_are_merged_and_overflow_is_reported() {
        assert_eq!(
            merge(vec![
                PortRange {
                    first: 90,
                    last: 100
                },
                PortRange {
                    first: 10,
                    last: 20
                },
                PortRange {
                    first: 21,
                    last: 30
                },
                PortRange {
                    first: 15,
                    last: 25
                },
                PortRange {
                    first: 101,
                    last: 101
                },
                PortRange {
                    first: 65535,
                    last: 65535
                },
                PortRange {
                    first: 0,
                    last: 65535
                },
            ]),
            vec![PortRange {
                first: 0,
                last: 65535
            }]
        );
        assert_eq!(
            merge(vec![
                PortRange { first: 5, last: 6 },
                PortRange { first: 8, last: 9 },
                PortRange { first: 7, last: 7 }
            ]),
            vec![PortRange { first: 5, last: 9 }]
        );
        // Two policies' rules for the same key are one union.
        let ports = |ps: &[u16]| {
            ps.iter()
                .map(|p| format!(r#"{{"port":{p}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        };
        let a = policy(&format!(
            r#"{{"name":"a","ingress":[{{"ports":[{}]}}]}}"#,
            ports(&[80, 81])
        ));
        let b = policy(&format!(
            r#"{{"name":"b","ingress":[{{"ports":[{}]}}]}}"#,
            ports(&[82, 443])
        ));
        let t = compile(&view(), &[a, b]);
        let web = t.local[&ip(WEB)].identity;
        let key = PolicyKey {
            local: web,
            remote: IDENTITY_ANY,
            proto: 6,
            dir: DIR_INGRESS,
            _pad: [0; 2],
        };
        let e = t.rules[&key];
        assert_eq!(e.count, 2);
        assert_eq!(
            &e.ranges[..2],
            &[
                PortRange {
                    first: 80,
                    last: 82
                },
                PortRange {
                    first: 443,
                    last: 443
                }
            ]
        );
        assert!(e.ranges[2..].iter().all(|r| *r == PortRange::default()));
        assert!(t.problems.is_empty());
        // 20 separate ports: 16 kept, the rest denied, one problem line
        // per local identity.
        let many: Vec<u16> = (0..20).map(|i| 1000 + 2 * i).collect();
        let c = policy(&format!(
            r#"{{"name":"c","selector":{{"app":"web"}},"ingress":[{{"ports":[{}]}}]}}"#,
            ports(&many)
        ));
        let t = compile(&view(), &[c]);
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert!(
            t.problems[0].contains("20 port ranges"),
            "{}",
            t.problems[0]
        );
        assert!(allows(&t, WEB, CLIENT, Direction::Ingress, tcp(1030)));
        assert!(!allows(&t, WEB, CLIENT, Direction::Ingress, tcp(1032)));
    }

    #[test]
    fn a_local_address_without_an_endpoint_is_a_problem() {
        let mut v = view();
        v.local.insert(ip("10.244.1.99"));
        let t = compile(&v, &[]);
        assert!(!t.local.contains_key(&ip("10.244.1.99")));
        assert_eq!(t.problems.len(), 1);
    }

    #[test]
    fn tables_agree_with_the_reference_on_the_fixed_view() {
        let p = policy(
            r#"{"name": "web-ingress", "selector": {"app": "web"},
                "ingress": [{"from": [{"selector": {"app": "client"}}, {"network": "blue", "selector": {}}, {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}],
                             "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}]}]}"#,
        );
        let (v, ps) = (view(), vec![p]);
        let t = compile(&v, &ps);
        for local in &v.local {
            for remote in [
                WEB,
                CLIENT,
                BLUE,
                DB,
                FLANNEL,
                "10.244.1.1",
                "203.0.113.1",
                "203.0.113.129",
                "1.1.1.1",
            ] {
                for dir in [Direction::Ingress, Direction::Egress] {
                    for (proto, port) in [tcp(8080), tcp(80), (17, 8080), (1, 0)] {
                        assert_eq!(
                            reference::kernel_allows(
                                &t,
                                &subnets(),
                                *local,
                                ip(remote),
                                dir,
                                proto,
                                port
                            ),
                            reference::allowed(
                                &v,
                                &subnets(),
                                &ps,
                                *local,
                                ip(remote),
                                dir,
                                proto,
                                port
                            ),
                            "{local} {remote} {dir:?} {proto} {port}"
                        );
                    }
                }
            }
        }
    }
}
