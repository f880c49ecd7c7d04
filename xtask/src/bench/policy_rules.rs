//! The rule sets the policy runs measure, as one description that both
//! sides render: netd's policy JSON and the iptables + ipset rules Calico's
//! iptables mode would program for the same policy.
//!
//! A rule set of `rules` rules spreads over `sets` source label sets,
//! `rules / sets` rules each. Every set but the last is a fake one
//! (`group=sNNN`) whose endpoints exist only as etcd entries; the last is
//! the client's (`group=client`). The measured flow (client to the server's
//! port 5201, TCP and UDP: iperf3's control connection and its data) is
//! allowed by exactly one rule, the last one; every other rule names a port
//! of 7000 and up.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// The label key that tells the source sets apart.
pub const GROUP_KEY: &str = "group";
/// The client's label set.
pub const CLIENT_GROUP: &str = "client";
/// The server's labels: what the policy selects.
pub const SERVER_LABEL: (&str, &str) = ("app", "bench-server");
/// The port the measured flow goes to (iperf3's).
pub const MEASURED_PORT: u16 = 5201;
/// A port no rule allows: probes there must be dropped.
pub const DENIED_PORT: u16 = 5202;
/// The first port of the filler rules.
const FILLER_PORT: u16 = 7000;
/// The policy's name in etcd.
pub const POLICY_NAME: &str = "bench-server-ingress";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    pub fn iptables(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One ingress rule: from every endpoint of a label set, to these ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub group: String,
    pub ports: Vec<(Proto, u16)>,
}

/// `rules` rules over `sets` source label sets (the client's among them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: usize,
    pub sets: usize,
}

/// Name of fake label set `i`.
pub fn fake_group(i: usize) -> String {
    format!("s{i:03}")
}

impl RuleSet {
    pub const NONE: RuleSet = RuleSet { rules: 0, sets: 0 };

    /// The label sets the rules allow, in rule order: the fake ones, then
    /// the client's.
    pub fn groups(&self) -> Vec<String> {
        if self.sets == 0 {
            return Vec::new();
        }
        let mut g: Vec<String> = (0..self.sets - 1).map(fake_group).collect();
        g.push(CLIENT_GROUP.into());
        g
    }

    /// The rules in evaluation order, the measured flow's rule last.
    pub fn rules(&self) -> Vec<Rule> {
        if self.rules == 0 {
            return Vec::new();
        }
        let per_set = (self.rules / self.sets.max(1)).max(1);
        let mut out = Vec::with_capacity(self.rules);
        for group in self.groups() {
            let fillers = if group == CLIENT_GROUP {
                per_set - 1
            } else {
                per_set
            };
            for j in 0..fillers {
                // TCP and UDP alternate; ports two apart never merge into
                // one range, so each rule is a range of its own in netd too.
                let proto = if j % 2 == 0 { Proto::Tcp } else { Proto::Udp };
                out.push(Rule {
                    group: group.clone(),
                    ports: vec![(proto, FILLER_PORT + 2 * j as u16)],
                });
            }
        }
        out.push(Rule {
            group: CLIENT_GROUP.into(),
            ports: vec![(Proto::Tcp, MEASURED_PORT), (Proto::Udp, MEASURED_PORT)],
        });
        out
    }

    /// netd's policy: the server selected for ingress, one rule per rule;
    /// `extra` appends rules (the apply-latency runs).
    pub fn policy_json(&self, extra: &[Rule]) -> Value {
        let rule = |r: &Rule| {
            let ports: Vec<Value> = r
                .ports
                .iter()
                .map(|(p, port)| json!({ "protocol": p.k8s(), "port": port }))
                .collect();
            json!({ "from": [{ "selector": { GROUP_KEY: r.group } }], "ports": ports })
        };
        let ingress: Vec<Value> = self.rules().iter().chain(extra).map(rule).collect();
        json!({
            "name": POLICY_NAME,
            "network": "default",
            "selector": { SERVER_LABEL.0: SERVER_LABEL.1 },
            "types": ["Ingress"],
            "ingress": ingress,
        })
    }
}

/// A fake endpoint as netd publishes one in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeEndpoint {
    pub ip: Ipv4Addr,
    /// flannel's key of its subnet, e.g. `10.244.240.0-24`.
    pub subnet_key: String,
    pub group: String,
}

impl FakeEndpoint {
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}/endpoints/{}/{}", self.subnet_key, self.ip)
    }

    pub fn value(&self) -> String {
        json!({ "ip": self.ip, "network": "default", "labels": { GROUP_KEY: self.group } })
            .to_string()
    }
}

/// Addresses per fake /24 (.2 to .251).
const PER_SUBNET: usize = 250;

/// `count` fake endpoints spread over the fake label sets `s000..` in turn
/// (`groups` of them), 250 per /24 of `subnets` (third octets).
pub fn fake_endpoints(count: usize, groups: usize, subnets: &[u8]) -> Vec<FakeEndpoint> {
    (0..count)
        .filter_map(|k| {
            let third = *subnets.get(k / PER_SUBNET)?;
            Some(FakeEndpoint {
                ip: Ipv4Addr::new(10, 244, third, (k % PER_SUBNET) as u8 + 2),
                subnet_key: format!("10.244.{third}.0-24"),
                group: fake_group(k % groups.max(1)),
            })
        })
        .collect()
}

/// Third octets of `n` fake /24s of 10.244.0.0/16 from 255 down, none of
/// them a real host's (`taken`).
pub fn fake_subnets(n: usize, taken: &[u8]) -> Vec<u8> {
    (0..=255u8)
        .rev()
        .filter(|t| !taken.contains(t))
        .take(n)
        .collect()
}

/// Fake /24s needed for `count` endpoints.
pub fn subnets_for(count: usize) -> usize {
    count.div_ceil(PER_SUBNET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousand_rules_over_a_hundred_sets_with_the_measured_rule_last() {
        let rs = RuleSet {
            rules: 1000,
            sets: 100,
        };
        let rules = rs.rules();
        assert_eq!(rules.len(), 1000);
        let groups: std::collections::BTreeSet<_> = rules.iter().map(|r| &r.group).collect();
        assert_eq!(groups.len(), 100);
        let last = rules.last().unwrap();
        assert_eq!(last.group, CLIENT_GROUP);
        assert_eq!(
            last.ports,
            vec![(Proto::Tcp, MEASURED_PORT), (Proto::Udp, MEASURED_PORT)]
        );
        // No other rule allows the measured or the denied port.
        assert!(rules[..999].iter().all(|r| {
            r.ports
                .iter()
                .all(|&(_, p)| p != MEASURED_PORT && p != DENIED_PORT)
        }));
        // The client's set has ten rules in all, as every other set.
        assert_eq!(rules.iter().filter(|r| r.group == CLIENT_GROUP).count(), 10);
    }

    #[test]
    fn ten_rules_are_one_per_set() {
        let rules = RuleSet {
            rules: 10,
            sets: 10,
        }
        .rules();
        assert_eq!(rules.len(), 10);
        assert_eq!(rules[0].group, "s000");
        assert_eq!(rules[8].group, "s008");
        assert_eq!(rules[9].group, CLIENT_GROUP);
        assert!(RuleSet::NONE.rules().is_empty());
    }

    #[test]
    fn policy_json_has_the_design_format() {
        let p = RuleSet { rules: 2, sets: 2 }.policy_json(&[]);
        assert_eq!(p["name"], POLICY_NAME);
        assert_eq!(p["selector"]["app"], "bench-server");
        assert_eq!(p["types"], json!(["Ingress"]));
        assert_eq!(p["ingress"].as_array().unwrap().len(), 2);
        assert_eq!(p["ingress"][0]["from"][0]["selector"]["group"], "s000");
        assert_eq!(
            p["ingress"][1]["ports"],
            json!([{"protocol": "TCP", "port": 5201}, {"protocol": "UDP", "port": 5201}])
        );
    }

    #[test]
    fn fake_endpoints_fill_distinct_subnets() {
        let subnets = fake_subnets(subnets_for(1000), &[255, 3]);
        assert_eq!(subnets, vec![254, 253, 252, 251]);
        let eps = fake_endpoints(1000, 99, &subnets);
        assert_eq!(eps.len(), 1000);
        let ips: std::collections::BTreeSet<_> = eps.iter().map(|e| e.ip).collect();
        assert_eq!(ips.len(), 1000);
        assert_eq!(eps[0].ip, Ipv4Addr::new(10, 244, 254, 2));
        assert_eq!(eps[250].ip, Ipv4Addr::new(10, 244, 253, 2));
        assert_eq!(eps[99].group, "s000");
        assert_eq!(
            eps[0].key("/netd/network"),
            "/netd/network/endpoints/10.244.254.0-24/10.244.254.2"
        );
        let v: Value = serde_json::from_str(&eps[1].value()).unwrap();
        assert_eq!(
            v,
            json!({"ip": "10.244.254.3", "network": "default", "labels": {"group": "s001"}})
        );
    }
}
