//! The peer the policy runs compare netd against: the same rules as
//! iptables + ipset, programmed the way Calico's iptables mode programs a
//! policy, on a Calico-style routed testbed (no encapsulation, like
//! flannel's host-gw).
//!
//! ```text
//!   c0 eth0 ─ cali0 (host0) ⇢ route via 198.18.0.2 ⇢ eth0 ─ br0 ─ eth0 (host1) ⇢ /32 route ⇢ cali0 ─ eth0 c1
//! ```
//!
//! Each container has its /32 on `eth0` and a default route via
//! 169.254.1.1, which resolves to the host's `cali0` (proxy ARP in Calico); the host
//! routes the container's /32 to `cali0` and the peer's pod subnet via the
//! peer. Policy sits in the server host's FORWARD chain:
//!
//! ```text
//!   FORWARD → cali-FORWARD: -o cali0 → cali-tw-cali0 (to workload)
//!     ESTABLISHED,RELATED accept; INVALID drop; clear the accept mark;
//!     → cali-pi-<policy>: per rule `-p P -m set --match-set <set> src --dport N`
//!        sets the accept mark, then `-m mark → RETURN`;
//!     mark set → RETURN (accepted in cali-FORWARD); otherwise drop.
//! ```
//!
//! with one `hash:net` ipset per selector holding the source addresses of
//! the endpoints it selects (the real client and the etcd-only fake ones).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netd_tests::links::link_mac;
use netd_tests::{NetNs, NsRef, Topology, flannel, host_ip};

use super::policy_rules::{CLIENT_GROUP, FakeEndpoint, RuleSet};
use super::testbed::{Mode, Testbed};
use super::{run_bounded, sh};

/// The host side of each container's veth.
pub const WORKLOAD_IFACE: &str = "cali0";
/// The next hop every Calico container routes to (answered by proxy ARP).
const LINK_LOCAL_GW: &str = "169.254.1.1";
/// The accept mark Calico's policy chains set (its `0x10000` bit).
const ACCEPT_MARK: &str = "0x10000/0x10000";
const POLICY_CHAIN: &str = "cali-pi-bench-server-ingress";

/// The pod subnet of host `i`: 10.244.(i+1).0/24, the container at .2.
fn pod_net(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

fn container_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 2)
}

/// The client's address (host 0's container).
pub fn client_ip() -> Ipv4Addr {
    container_ip(0)
}

/// Two hosts with a Calico-style routed container each, the client on
/// host 0 and the server on host 1; with the server's host, where the
/// policy goes.
pub fn testbed() -> Result<(Testbed, NsRef)> {
    let topo = Topology::builder().hosts(2).etcd(false).build();
    let mut containers = Vec::new();
    for i in 0..2 {
        containers.push(routed_container(&topo, i)?);
    }
    for (i, j) in [(0, 1), (1, 0)] {
        flannel::add_direct_peer(topo.host(i).ns(), &pod_net(j), &host_ip(j).to_string());
    }
    let (client, server) = (containers[0].handle(), containers[1].handle());
    let server_host = topo.host(1).ns().handle();
    let tb = Testbed::assemble(
        Mode::Routed,
        client,
        server,
        container_ip(1),
        containers,
        None,
        Some(topo),
    )?;
    Ok((tb, server_host))
}

/// What Calico's CNI plugin does for a pod: a veth whose host side has no
/// address and answers ARP for the gateway, a /32 route to the pod.
fn routed_container(topo: &Topology, i: usize) -> Result<NetNs> {
    let host = topo.host(i).ns().handle();
    let ns = topo.add_container(i);
    let c = ns.handle();
    let ip = container_ip(i).to_string();
    host.sysctl("net.ipv4.ip_forward", "1");
    sh(
        &host,
        &[
            "ip",
            "link",
            "add",
            WORKLOAD_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            c.name(),
        ],
    )?;
    host.sysctl(&format!("net.ipv4.conf.{WORKLOAD_IFACE}.proxy_arp"), "1");
    host.sysctl(&format!("net.ipv4.neigh.{WORKLOAD_IFACE}.proxy_delay"), "0");
    sh(&host, &["ip", "link", "set", WORKLOAD_IFACE, "up"])?;
    let host32 = format!("{ip}/32");
    sh(
        &host,
        &[
            "ip",
            "route",
            "add",
            &host32,
            "dev",
            WORKLOAD_IFACE,
            "scope",
            "link",
        ],
    )?;
    sh(&c, &["ip", "addr", "add", &host32, "dev", "eth0"])?;
    sh(&c, &["ip", "link", "set", "eth0", "up"])?;
    sh(
        &c,
        &[
            "ip",
            "route",
            "add",
            LINK_LOCAL_GW,
            "dev",
            "eth0",
            "scope",
            "link",
        ],
    )?;
    sh(
        &c,
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            LINK_LOCAL_GW,
            "dev",
            "eth0",
        ],
    )?;
    // Proxy ARP answers only for a target the host has a route to, and the
    // testbed's hosts have no default route: the gateway's neighbour entry
    // is set instead, to the host veth's MAC (what proxy ARP would answer).
    let mac = link_mac(&host, WORKLOAD_IFACE);
    sh(
        &c,
        &[
            "ip",
            "neigh",
            "replace",
            LINK_LOCAL_GW,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    Ok(ns)
}

/// The ipset of a label-set selector.
fn set_name(group: &str) -> String {
    // ipset names are at most 31 bytes; Calico hashes the selector into
    // `cali40s:<hash>`, a readable name does the same job here.
    format!("cali40s:{group}")
}

/// `ipset restore` input: one set per source label set with the addresses
/// of its endpoints (the client's set holds the real client).
pub fn ipset_script(rs: &RuleSet, fakes: &[FakeEndpoint], client: Ipv4Addr) -> String {
    let mut members: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for g in rs.groups() {
        members.insert(g, Vec::new());
    }
    for f in fakes {
        if let Some(m) = members.get_mut(&f.group) {
            m.push(f.ip);
        }
    }
    if let Some(m) = members.get_mut(CLIENT_GROUP) {
        m.push(client);
    }
    let mut s = String::new();
    for (g, ips) in &members {
        let name = set_name(g);
        let _ = writeln!(
            s,
            "create {name} hash:net family inet hashsize 1024 maxelem 1048576"
        );
        for ip in ips {
            let _ = writeln!(s, "add {name} {ip}");
        }
    }
    s
}

/// `iptables-restore --noflush` input for the server's endpoint.
pub fn iptables_script(rs: &RuleSet) -> String {
    let tw = format!("cali-tw-{WORKLOAD_IFACE}");
    let mut s = String::from("*filter\n");
    for chain in ["cali-FORWARD", &tw, POLICY_CHAIN] {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    let _ = writeln!(s, "-A FORWARD -j cali-FORWARD");
    let _ = writeln!(s, "-A cali-FORWARD -o {WORKLOAD_IFACE} -j {tw}");
    let _ = writeln!(s, "-A cali-FORWARD -m mark --mark {ACCEPT_MARK} -j ACCEPT");
    let _ = writeln!(
        s,
        "-A {tw} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    let _ = writeln!(s, "-A {tw} -m conntrack --ctstate INVALID -j DROP");
    let _ = writeln!(s, "-A {tw} -j MARK --set-xmark 0x0/0x10000");
    let _ = writeln!(s, "-A {tw} -j {POLICY_CHAIN}");
    let _ = writeln!(s, "-A {tw} -m mark --mark {ACCEPT_MARK} -j RETURN");
    let _ = writeln!(
        s,
        "-A {tw} -m comment --comment \"Drop if no policies passed packet\" -j DROP"
    );
    for rule in rs.rules() {
        let set = set_name(&rule.group);
        for (proto, port) in &rule.ports {
            let _ = writeln!(
                s,
                "-A {POLICY_CHAIN} -p {} -m set --match-set {set} src -m {} --dport {port} -j MARK --set-xmark {ACCEPT_MARK}",
                proto.iptables(),
                proto.iptables()
            );
        }
        let _ = writeln!(
            s,
            "-A {POLICY_CHAIN} -m mark --mark {ACCEPT_MARK} -j RETURN"
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// An empty filter table: `iptables-restore` without `--noflush` flushes
/// the built-in chains and deletes every other one.
const EMPTY_FILTER: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

/// Runs `argv` in `ns` with `input` in a file named by the last argument.
fn restore(ns: &NsRef, argv: &[&str], input: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules");
    std::fs::write(&file, input)?;
    let mut cmd = ns.command(argv[0]);
    cmd.args(&argv[1..]).arg(&file);
    run_bounded(cmd, Duration::from_secs(60))
        .with_context(|| format!("[{}] {}", ns.name(), argv.join(" ")))?;
    Ok(())
}

/// Replaces the server host's policy with `rs` (nothing for no rules);
/// returns the number of iptables rules and ipset members in force.
pub fn program(
    host: &NsRef,
    rs: &RuleSet,
    fakes: &[FakeEndpoint],
    client: Ipv4Addr,
) -> Result<(usize, usize)> {
    restore(host, &["iptables-restore"], EMPTY_FILTER)?;
    sh(host, &["ipset", "destroy"])?;
    if rs.rules > 0 {
        restore(
            host,
            &["ipset", "restore", "-file"],
            &ipset_script(rs, fakes, client),
        )?;
        restore(
            host,
            &["iptables-restore", "--noflush"],
            &iptables_script(rs),
        )?;
    }
    let rules = sh(host, &["iptables-save", "-t", "filter"])?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count();
    let members = sh(host, &["ipset", "list"])?
        .lines()
        .filter(|l| l.parse::<Ipv4Addr>().is_ok())
        .count();
    Ok((rules, members))
}

/// Packets the endpoint chain's final drop has counted.
pub fn dropped(host: &NsRef) -> Result<u64> {
    let save = sh(host, &["iptables-save", "-c", "-t", "filter"])?;
    let line = save.lines().find(|l| {
        l.contains(&format!("-A cali-tw-{WORKLOAD_IFACE}"))
            && l.ends_with("-j DROP")
            && l.contains("no policies")
    });
    let Some(line) = line else {
        bail!("no drop rule in cali-tw-{WORKLOAD_IFACE}");
    };
    // `[packets:bytes] -A ...`
    let packets = line
        .trim_start_matches('[')
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no counter in {line:?}"))?;
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::policy_rules::fake_endpoints;

    #[test]
    fn renders_calico_style_chains_with_the_measured_rule_last() {
        let rs = RuleSet {
            rules: 10,
            sets: 10,
        };
        let s = iptables_script(&rs);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert!(s.contains("-A cali-FORWARD -o cali0 -j cali-tw-cali0\n"));
        let ct = lines
            .iter()
            .position(|l| l.contains("RELATED,ESTABLISHED"))
            .unwrap();
        let jump = lines
            .iter()
            .position(|l| l.ends_with(&format!("-j {POLICY_CHAIN}")))
            .unwrap();
        assert!(ct < jump, "conntrack accept comes before the policy");
        let matches: Vec<&&str> = lines.iter().filter(|l| l.contains("--match-set")).collect();
        // Nine one-port rules and the measured rule's two protocols.
        assert_eq!(matches.len(), 11);
        assert!(matches[9].contains("cali40s:client src -m tcp --dport 5201"));
        assert!(
            matches[10]
                .contains("-p udp -m set --match-set cali40s:client src -m udp --dport 5201")
        );
        assert_eq!(lines[lines.len() - 1], "COMMIT");
    }

    #[test]
    fn ipsets_hold_the_selected_addresses() {
        let rs = RuleSet {
            rules: 10,
            sets: 10,
        };
        let fakes = fake_endpoints(18, 9, &[250]);
        let client = Ipv4Addr::new(10, 244, 1, 2);
        let s = ipset_script(&rs, &fakes, client);
        assert_eq!(s.matches("create ").count(), 10);
        assert_eq!(s.matches("add ").count(), 19);
        assert!(s.contains("add cali40s:client 10.244.1.2\n"));
        assert!(s.contains("add cali40s:s000 10.244.250.2\nadd cali40s:s000 10.244.250.11\n"));
    }
}
