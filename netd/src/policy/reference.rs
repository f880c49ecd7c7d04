//! A reference evaluator written from the Kubernetes NetworkPolicy
//! semantics over the policy documents, kept apart from the compiler, and a
//! model of the kernel's lookup over compiled [`Tables`] and the kernel's
//! remote subnets (`SUBNETS`); the property tests check that the two agree.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;

use netd_common::policy::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, Identity, IdentityKind,
    LOCAL_ISOLATED_EGRESS, LOCAL_ISOLATED_INGRESS, LOCAL_TRACK, PROTO_ANY, PolicyKey,
};

use super::{
    ClusterView, Policy, Tables,
    spec::{Direction, Peer, Port},
};

/// Who a remote address is.
enum Remote<'a> {
    Endpoint {
        network: &'a str,
        labels: &'a BTreeMap<String, String>,
        /// Not published: a flannel host's container (the foreign identity).
        foreign: bool,
    },
    Host,
    Outside(Ipv4Addr),
}

/// `subnets`: the remote hosts' subnets; their addresses that are no
/// published endpoint are a flannel host's containers.
fn classify<'a>(view: &'a ClusterView, subnets: &[Ipv4Net], addr: Ipv4Addr) -> Remote<'a> {
    if let Some(e) = view.endpoints.iter().find(|e| e.ip == addr) {
        return Remote::Endpoint {
            network: &e.network,
            labels: &e.labels,
            foreign: false,
        };
    }
    if view.gateway == Some(addr) {
        return Remote::Host;
    }
    if subnets.iter().any(|s| s.contains(&addr)) {
        return Remote::Endpoint {
            network: &view.foreign.network,
            labels: &view.foreign.labels,
            foreign: true,
        };
    }
    Remote::Outside(addr)
}

fn has_labels(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn peer_matches(policy: &Policy, peer: &Peer, remote: &Remote) -> bool {
    match (peer.cidr, remote) {
        (Some(cidr), Remote::Outside(addr)) => {
            cidr.contains(addr) && !peer.except.iter().any(|x| x.contains(addr))
        }
        (Some(_), _) => false,
        (
            None,
            Remote::Endpoint {
                network, labels, ..
            },
        ) => {
            let want = peer.network.as_deref().unwrap_or(&policy.network);
            let all = BTreeMap::new();
            *network == want && has_labels(labels, peer.selector.as_ref().unwrap_or(&all))
        }
        (None, _) => false,
    }
}

fn port_matches(ports: &[Port], proto: u8, port: u16) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            p.protocol.number() == proto
                && match p.port {
                    None => true,
                    Some(first) => (first..=p.end_port.unwrap_or(first)).contains(&port),
                }
        })
}

/// Whether local endpoint `local` may exchange a new flow with `remote` in
/// `dir` (`port`: the destination port, 0 for ICMP).
pub fn allowed(
    view: &ClusterView,
    subnets: &[Ipv4Net],
    policies: &[Policy],
    local: Ipv4Addr,
    remote: Ipv4Addr,
    dir: Direction,
    proto: u8,
    port: u16,
) -> bool {
    let me = view
        .endpoints
        .iter()
        .find(|e| e.ip == local)
        .expect("local endpoint");
    let remote = classify(view, subnets, remote);
    if matches!(remote, Remote::Host) {
        return true;
    }
    let selecting: Vec<&Policy> = policies
        .iter()
        .filter(|p| {
            p.network == me.network
                && has_labels(&me.labels, &p.selector)
                && p.directions().contains(&dir)
        })
        .collect();
    if selecting.is_empty() {
        // Not isolated: within a network everything; across networks
        // nothing arrives (what leaves is judged where it arrives). A
        // flannel host's container is told apart only where flows are
        // tracked: the endpoint is selected in some direction, or the
        // published endpoints span more than one network.
        let tracked = || {
            policies.iter().any(|p| {
                p.network == me.network
                    && has_labels(&me.labels, &p.selector)
                    && !p.directions().is_empty()
            }) || view
                .endpoints
                .iter()
                .any(|e| e.network != view.endpoints[0].network)
        };
        return match (dir, &remote) {
            (
                Direction::Ingress,
                Remote::Endpoint {
                    network, foreign, ..
                },
            ) => *network == me.network || (*foreign && !tracked()),
            _ => true,
        };
    }
    selecting.iter().any(|policy| {
        policy.rules(dir).iter().any(|rule| {
            let peers = rule.peers(dir);
            (peers.is_empty() || peers.iter().any(|p| peer_matches(policy, p, &remote)))
                && port_matches(&rule.ports, proto, port)
        })
    })
}

/// What the kernel decides for a new flow, from the tables and the remote
/// subnets it holds (`SUBNETS`).
pub fn kernel_allows(
    tables: &Tables,
    subnets: &[Ipv4Net],
    local: Ipv4Addr,
    remote: Ipv4Addr,
    dir: Direction,
    proto: u8,
    port: u16,
) -> bool {
    let Some(lp) = tables.local.get(&local) else {
        return true;
    };
    if lp.flags & LOCAL_TRACK == 0 {
        return true;
    }
    let found = remote_identity(tables, subnets, remote);
    let ri = found.map_or(IDENTITY_WORLD, |i| i.id);
    if ri == IDENTITY_HOST {
        return true;
    }
    let (isolated, dir_byte) = match dir {
        Direction::Ingress => (lp.flags & LOCAL_ISOLATED_INGRESS != 0, DIR_INGRESS),
        Direction::Egress => (lp.flags & LOCAL_ISOLATED_EGRESS != 0, DIR_EGRESS),
    };
    if !isolated {
        let other_network = found
            .is_some_and(|i| i.kind == IdentityKind::Endpoint as u8 && i.network != lp.network);
        return dir == Direction::Egress || !other_network;
    }
    [ri, IDENTITY_ANY].iter().any(|&remote| {
        [proto, PROTO_ANY].iter().any(|&proto| {
            let key = PolicyKey {
                local: lp.identity,
                remote,
                proto,
                dir: dir_byte,
                _pad: [0; 2],
            };
            tables.rules.get(&key).is_some_and(|entry| {
                entry.ranges[..usize::from(entry.count)]
                    .iter()
                    .any(|r| (r.first..=r.last).contains(&port))
            })
        })
    })
}

/// The kernel's remote identity lookup: an endpoint or host entry; else,
/// in a remote subnet, the foreign identity; else the longest `cidr`
/// prefix; `None` is WORLD.
fn remote_identity(tables: &Tables, subnets: &[Ipv4Net], remote: Ipv4Addr) -> Option<Identity> {
    let found = tables
        .identities
        .iter()
        .filter(|(net, _)| net.contains(&remote))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, identity)| *identity);
    if let Some(named) = found
        && named.kind != IdentityKind::Cidr as u8
    {
        return Some(named);
    }
    if tables.foreign_identity != 0 && subnets.iter().any(|s| s.contains(&remote)) {
        return Some(Identity {
            id: tables.foreign_identity,
            network: tables.foreign_network,
            kind: IdentityKind::Endpoint as u8,
            _pad: [0; 3],
        });
    }
    found
}

#[cfg(test)]
mod props {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::policy::{
        EndpointInfo, ForeignIdentity, compile,
        spec::{Protocol, Rule},
    };

    const NETWORKS: [&str; 2] = ["default", "blue"];
    /// Prefixes `cidr` peers pick from, with excepts inside each.
    const CIDRS: [(&str, &[&str]); 6] = [
        ("0.0.0.0/0", &["10.244.0.0/16", "203.0.113.128/25"]),
        ("203.0.113.0/24", &["203.0.113.128/25", "203.0.113.7/32"]),
        ("10.244.0.0/16", &["10.244.1.0/24"]),
        ("10.244.3.0/28", &[]),
        ("10.244.1.9/32", &[]),
        ("10.244.2.2/32", &[]),
    ];
    /// Remote addresses probed: endpoints, the gateway, unpublished
    /// addresses of local and remote subnets, outside addresses.
    const PROBES: [&str; 12] = [
        "10.244.1.2",
        "10.244.1.3",
        "10.244.1.4",
        "10.244.2.2",
        "10.244.2.3",
        "10.244.1.1",
        "10.244.1.9",
        "10.244.2.200",
        "10.244.3.5",
        "203.0.113.7",
        "203.0.113.200",
        "8.8.8.8",
    ];
    const FLOWS: [(u8, u16); 8] = [
        (6, 80),
        (6, 8080),
        (6, 8085),
        (6, 9000),
        (17, 53),
        (17, 80),
        (132, 80),
        (1, 0),
    ];

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(
            prop::sample::select(vec!["app", "tier"]).prop_map(String::from),
            prop::sample::select(vec!["a", "b"]).prop_map(String::from),
            0..=2,
        )
    }

    fn network() -> impl Strategy<Value = String> {
        prop::sample::select(NETWORKS.to_vec()).prop_map(String::from)
    }

    fn peer() -> impl Strategy<Value = Peer> {
        let by_labels = (prop::option::of(network()), prop::option::of(labels()))
            .prop_filter("a peer names something", |(n, s)| {
                n.is_some() || s.is_some()
            })
            .prop_map(|(network, selector)| Peer {
                network,
                selector,
                cidr: None,
                except: vec![],
            });
        let by_cidr = (0..CIDRS.len(), any::<u8>()).prop_map(|(i, mask)| {
            let (cidr, excepts) = CIDRS[i];
            Peer {
                network: None,
                selector: None,
                cidr: Some(cidr.parse().unwrap()),
                except: excepts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| mask & (1 << j) != 0)
                    .map(|(_, x)| x.parse().unwrap())
                    .collect(),
            }
        });
        prop_oneof![by_labels, by_cidr]
    }

    fn port() -> impl Strategy<Value = Port> {
        let protocol = prop::sample::select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::Icmp,
        ]);
        let range = prop::option::of((
            prop::sample::select(vec![53u16, 80, 8080]),
            prop::option::of(0u16..=20),
        ));
        (protocol, range).prop_map(|(protocol, range)| match (protocol, range) {
            (Protocol::Icmp, _) | (_, None) => Port {
                protocol,
                port: None,
                end_port: None,
            },
            (_, Some((port, extra))) => Port {
                protocol,
                port: Some(port),
                end_port: extra.map(|e| port + e),
            },
        })
    }

    fn rules(dir: Direction) -> impl Strategy<Value = Option<Vec<Rule>>> {
        let rule = (
            prop::collection::vec(peer(), 0..=2),
            prop::collection::vec(port(), 0..=2),
        )
            .prop_map(move |(peers, ports)| match dir {
                Direction::Ingress => Rule {
                    from: peers,
                    to: vec![],
                    ports,
                },
                Direction::Egress => Rule {
                    from: vec![],
                    to: peers,
                    ports,
                },
            });
        prop::option::of(prop::collection::vec(rule, 0..=2))
    }

    fn policies() -> impl Strategy<Value = Vec<Policy>> {
        let types = prop::option::of(prop::sample::subsequence(
            vec![Direction::Ingress, Direction::Egress],
            0..=2,
        ));
        let policy = (
            network(),
            labels(),
            types,
            rules(Direction::Ingress),
            rules(Direction::Egress),
        );
        prop::collection::vec(policy, 0..=3).prop_map(|ps| {
            ps.into_iter()
                .enumerate()
                .map(|(i, (network, selector, types, ingress, egress))| Policy {
                    name: format!("p{i}"),
                    network,
                    selector,
                    types,
                    ingress,
                    egress,
                })
                .collect()
        })
    }

    /// Three local endpoints, two on a netd host (10.244.2.0/24), a flannel
    /// host (10.244.3.0/24) whose containers may be configured as either
    /// network.
    fn view() -> impl Strategy<Value = (ClusterView, Vec<Ipv4Net>)> {
        let endpoint = (network(), labels());
        (
            prop::collection::vec(endpoint, 5),
            network(),
            labels(),
            any::<bool>(),
        )
            .prop_map(|(eps, foreign_network, foreign_labels, flannel)| {
                let ips = [
                    "10.244.1.2",
                    "10.244.1.3",
                    "10.244.1.4",
                    "10.244.2.2",
                    "10.244.2.3",
                ];
                let endpoints: Vec<EndpointInfo> = ips
                    .iter()
                    .zip(eps)
                    .map(|(ip, (network, labels))| EndpointInfo {
                        ip: ip.parse().unwrap(),
                        network,
                        labels,
                    })
                    .collect();
                let mut remote_subnets: Vec<Ipv4Net> = vec!["10.244.2.0/24".parse().unwrap()];
                if flannel {
                    remote_subnets.push("10.244.3.0/24".parse().unwrap());
                }
                let view = ClusterView {
                    local: endpoints[..3].iter().map(|e| e.ip).collect::<BTreeSet<_>>(),
                    endpoints,
                    foreign: ForeignIdentity {
                        network: foreign_network,
                        labels: foreign_labels,
                    },
                    gateway: Some("10.244.1.1".parse().unwrap()),
                };
                (view, remote_subnets)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A new flow is allowed by the compiled tables iff the reference
        /// evaluator over the policy documents allows it.
        #[test]
        fn tables_agree_with_the_reference((view, subnets) in view(), policies in policies()) {
            for p in &policies {
                prop_assert!(p.validate().is_ok(), "{p:?}");
            }
            let tables = compile(&view, &policies);
            prop_assert!(tables.problems.is_empty(), "{:?}", tables.problems);
            for local in &view.local {
                for remote in PROBES {
                    let remote: Ipv4Addr = remote.parse().unwrap();
                    for dir in [Direction::Ingress, Direction::Egress] {
                        for (proto, port) in FLOWS {
                            let want = allowed(&view, &subnets, &policies, *local, remote, dir, proto, port);
                            let got = kernel_allows(&tables, &subnets, *local, remote, dir, proto, port);
                            prop_assert_eq!(got, want, "{} {} {:?} proto {} port {}", local, remote, dir, proto, port);
                        }
                    }
                }
            }
        }

        /// The same inputs in another order give the same tables.
        #[test]
        fn compile_is_deterministic((view, _) in view(), policies in policies()) {
            let mut reversed = view.clone();
            reversed.endpoints.reverse();
            let mut others = policies.clone();
            others.reverse();
            prop_assert_eq!(compile(&view, &policies), compile(&reversed, &others));
        }

        /// Whatever the document, parsing answers a policy or an error.
        #[test]
        fn parse_never_panics(policies in policies(), cut in any::<prop::sample::Index>(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for p in &policies {
                let json = serde_json::to_vec(p).unwrap();
                prop_assert_eq!(&Policy::parse(&json).unwrap(), p);
                let _ = Policy::parse(&json[..cut.index(json.len() + 1)]);
            }
            let _ = Policy::parse(&bytes);
        }
    }
}
