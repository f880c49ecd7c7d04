//! Ingress policy for packets the host stack delivers to a container
//! (`to_container`, TC egress of its host-side veth), with the daemon
//! writing the tables from `netd policy apply` and labelled endpoints.
//!
//! Plain IPv4 from the underlay NIC to a container is dropped there unless
//! its source is a direct-routing peer, so the outside namespace reaches
//! host 0's containers by routing over a link of its own, `ext0` ⇄ `ext1`,
//! from 203.0.113.66 (inside the allowed prefix) and 203.0.113.200 (inside
//! its `except`). Masqueraded egress goes out through the underlay and its
//! replies come back through conntrack de-NAT.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use netd::datapath::{PinDir, conntrack};
use netd_tests::bpftool::{enable_run_time_stats, prog_run_stats};
use netd_tests::counters::{Counters, delta};
use netd_tests::topology::OUTSIDE_IP;
use netd_tests::traffic::ping_args;
use netd_tests::{
    Cluster, Container, NetNs, Topology, ping, poll_until, require_root, tcp_transfer, udp_echo,
    wait_for,
};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);
const APPLIED: Duration = Duration::from_secs(15);
const REPAIR_BOUND: Duration = Duration::from_secs(10);
const TCP_BYTES: usize = 1 << 20;
const NETWORK: &str = "10.244.0.0/16";

/// The outside's end of its own link to host 0.
const EXT_ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
/// Inside the `except` of the allowed prefix.
const EXT_EXCEPTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// Host 0's end of that link.
const EXT_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 65);

/// `LOCAL_ISOLATED_INGRESS`, `LOCAL_ISOLATED_EGRESS`, `LOCAL_TRACK`.
const ISOLATED_INGRESS: u64 = 1;
const ISOLATED_EGRESS: u64 = 2;
const TRACK: u64 = 4;

struct Setup {
    cluster: Cluster,
    /// Labelled app=web: the ingress-isolated server.
    web: usize,
    /// Labelled app=client: isolated both ways, egress allowed outside.
    client: usize,
}

impl Setup {
    /// Two hosts with `--ip-masq` and the outside namespace, linked to host 0
    /// directly too; `web` and `client` on host 0.
    fn new() -> Self {
        require_root();
        let topo = Topology::builder().hosts(2).outside(true).build();
        let endpoint = topo.etcd_endpoint();
        topo.host(0).netd_ok(&[
            "network",
            "init",
            "--etcd-endpoints",
            &endpoint,
            "--network",
            NETWORK,
        ]);
        let mut cluster = Cluster::on_topology(topo, "tc");
        cluster.run_args(&["--ip-masq"]);
        for i in 0..2 {
            cluster.start(i);
        }
        for i in 0..2 {
            cluster.wait_peers_match_etcd(i, CONVERGE);
        }
        let web = attach_labelled(&mut cluster, 0, "app=web");
        let client = attach_labelled(&mut cluster, 0, "app=client");
        link_outside(&cluster);
        Setup {
            cluster,
            web,
            client,
        }
    }

    fn c(&self, c: usize) -> &Container {
        self.cluster.container(c)
    }

    fn outside(&self) -> &NetNs {
        self.cluster.topo.outside()
    }

    fn counters(&self) -> Counters {
        self.cluster.counters(0)
    }

    /// `netd policy apply -` of `doc`, then waits until host 0's tables
    /// give `c` exactly `flags`.
    fn apply(&self, doc: Value, c: usize, flags: u64) {
        let file = self.cluster.host(0).run_dir().join("policy-input.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        let endpoint = self.cluster.topo.etcd_endpoint();
        self.cluster.netd_ok(
            0,
            &[
                "policy",
                "apply",
                file.to_str().unwrap(),
                "--etcd-endpoints",
                &endpoint,
            ],
        );
        let ip = self.c(c).ip.to_string();
        let name = doc["name"].as_str().unwrap().to_string();
        wait_for(
            &format!("{name} in host 0's tables ({ip} flags {flags})"),
            APPLIED,
            || {
                let summary = policy_summary(&self.cluster);
                let listed = summary["policies"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|n| n == name.as_str()));
                let row = summary["local_policy"]
                    .as_array()
                    .and_then(|rows| rows.iter().find(|r| r["ip"] == ip.as_str()).cloned());
                listed && row.is_some_and(|r| r["flags"].as_u64() == Some(flags))
            },
        );
    }
}

/// `netd attach --label` of a new container on `host`; its index.
fn attach_labelled(cluster: &mut Cluster, host: usize, label: &str) -> usize {
    let ns = cluster.topo.add_container(host);
    let out = cluster.netd_ok(host, &["attach", ns.name(), "--label", label]);
    let ip: Ipv4Addr = out.trim().parse().unwrap();
    cluster.containers.push(Container { ns, host, ip });
    cluster.containers.len() - 1
}

/// `ext0` (host 0, 203.0.113.65) ⇄ `ext1` (outside, .66 and .200), the
/// outside routing host 0's subnet over it.
fn link_outside(cluster: &Cluster) {
    let host = cluster.host(0).ns();
    let outside = cluster.topo.outside();
    host.run_ok(&[
        "ip",
        "link",
        "add",
        "ext0",
        "type",
        "veth",
        "peer",
        "name",
        "ext1",
        "netns",
        outside.name(),
    ]);
    host.run_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{EXT_HOST}/32"),
        "dev",
        "ext0",
    ]);
    host.run_ok(&["ip", "link", "set", "ext0", "up"]);
    for ip in [EXT_ALLOWED, EXT_EXCEPTED] {
        host.run_ok(&["ip", "route", "add", &format!("{ip}/32"), "dev", "ext0"]);
        outside.run_ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "ext1"]);
    }
    outside.run_ok(&["ip", "link", "set", "ext1", "up"]);
    outside.run_ok(&[
        "ip",
        "route",
        "add",
        &format!("{EXT_HOST}/32"),
        "dev",
        "ext1",
    ]);
    let subnet = cluster.subnet(0);
    outside.run_ok(&[
        "ip",
        "route",
        "add",
        &subnet,
        "via",
        &EXT_HOST.to_string(),
        "dev",
        "ext1",
        "src",
        &EXT_ALLOWED.to_string(),
    ]);
}

fn policy_summary(cluster: &Cluster) -> Value {
    let path = cluster.host(0).run_dir().join("policy.json");
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Pings from the outside's link address `src`: how many were answered.
fn ping_from(outside: &NetNs, src: Ipv4Addr, dst: Ipv4Addr, count: u32) -> u32 {
    let (count, src) = (count.to_string(), src.to_string());
    let args = ["-c", &count, "-W", "1", "-i", "0.2", "-I", &src];
    ping_args(outside, &args, dst).received
}

/// TCP of `TCP_BYTES` from `from` to `to` at `port`: every byte arrived.
fn assert_tcp(from: &NetNs, to: &NetNs, ip: Ipv4Addr, port: u16, what: &str) {
    let t = tcp_transfer(from, to, SocketAddr::from((ip, port)), TCP_BYTES)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(t.bytes, TCP_BYTES, "{what}");
}

fn assert_counted(before: &Counters, after: &Counters, name: &str, at_least: u64, what: &str) {
    let grew = delta(before, after, name);
    assert!(
        grew >= at_least,
        "{what}: {name} on host 0 grew by {grew}, want at least {at_least}"
    );
}

/// The isolation cases in order: open, isolated, a `cidr` rule with an
/// `except`, the host, masqueraded egress, then the repair of a deleted
/// `to_container` filter.
#[test]
fn host_stack_deliveries_are_judged() {
    let s = Setup::new();
    let web = s.c(s.web).ip;
    let outside = s.outside();

    // No policy: the routed path works from both outside addresses.
    assert_eq!(
        ping_from(outside, EXT_ALLOWED, web, 3),
        3,
        "open: .66 -> web"
    );
    assert_eq!(
        ping_from(outside, EXT_EXCEPTED, web, 3),
        3,
        "open: .200 -> web"
    );

    // Isolated with no rule: nothing from outside.
    s.apply(
        json!({"name": "web-isolated", "selector": {"app": "web"}, "types": ["Ingress"], "ingress": []}),
        s.web,
        ISOLATED_INGRESS | TRACK,
    );
    let before = s.counters();
    assert_eq!(
        ping_from(outside, EXT_ALLOWED, web, 5),
        0,
        "isolated: .66 -> web"
    );
    assert_counted(&before, &s.counters(), "drop_policy", 5, "isolated web");

    // The host itself still reaches it: ping and TCP from host 0.
    let host = s.cluster.host(0).ns();
    assert!(ping(host, web, 3), "host 0 could not ping isolated web");
    assert_tcp(host, &s.c(s.web).ns, web, 7700, "host 0 -> isolated web");

    // A cidr rule admits the prefix but not its except.
    s.apply(
        json!({"name": "web-outside", "selector": {"app": "web"}, "types": ["Ingress"],
               "ingress": [{"from": [{"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}]}]}),
        s.web,
        ISOLATED_INGRESS | TRACK,
    );
    assert_eq!(
        ping_from(outside, EXT_ALLOWED, web, 3),
        3,
        "cidr rule: .66 -> web"
    );
    assert_tcp(
        outside,
        &s.c(s.web).ns,
        web,
        7701,
        "cidr rule: .66 -> web TCP",
    );
    let before = s.counters();
    assert_eq!(
        ping_from(outside, EXT_EXCEPTED, web, 5),
        0,
        "except: .200 -> web"
    );
    assert_counted(&before, &s.counters(), "drop_policy", 5, "except");

    // Isolated both ways, egress allowed to the outside prefix: its own
    // connections through --ip-masq get their replies, new ones from
    // outside do not get in, the host does.
    let client = s.c(s.client);
    s.apply(
        json!({"name": "client-out", "selector": {"app": "client"}, "types": ["Ingress", "Egress"],
               "ingress": [], "egress": [{"to": [{"cidr": "203.0.113.0/24"}]}]}),
        s.client,
        ISOLATED_INGRESS | ISOLATED_EGRESS | TRACK,
    );
    assert!(
        ping(&client.ns, OUTSIDE_IP, 3),
        "client could not ping the outside"
    );
    assert_tcp(
        &client.ns,
        outside,
        OUTSIDE_IP,
        7702,
        "client -> outside TCP",
    );
    udp_echo(
        &client.ns,
        outside,
        SocketAddr::from((OUTSIDE_IP, 7703)),
        &[32, 1000],
    )
    .unwrap_or_else(|e| panic!("client -> outside UDP echo: {e:#}"));
    let before = s.counters();
    assert_eq!(
        ping_from(outside, EXT_ALLOWED, client.ip, 5),
        0,
        ".66 -> client"
    );
    assert_counted(&before, &s.counters(), "drop_policy", 5, "isolated client");
    assert!(ping(host, client.ip, 3), "host 0 could not ping client");
    assert_tcp(host, &client.ns, client.ip, 7704, "host 0 -> client");

    // The repair of a deleted to_container filter.
    let veth = host_veth(&s.cluster, s.web);
    let repairs = |c: &Cluster| c.status(0)["state"]["repairs"].as_u64().unwrap();
    let repairs_before = repairs(&s.cluster);
    host.run_ok(&["tc", "filter", "del", "dev", &veth, "egress"]);
    assert!(
        !has_egress_filter(host, &veth),
        "the egress filter of {veth} is still there"
    );
    assert!(
        poll_until(REPAIR_BOUND, || has_egress_filter(host, &veth)),
        "to_container not back on {veth} within {REPAIR_BOUND:?}; log:\n{}",
        s.cluster.daemon_log(0)
    );
    wait_for("the repair to be counted", REPAIR_BOUND, || {
        repairs(&s.cluster) > repairs_before
    });
    assert_eq!(
        repairs(&s.cluster),
        repairs_before + 1,
        "one filter, one repair"
    );
    let before = s.counters();
    assert_eq!(
        ping_from(outside, EXT_EXCEPTED, web, 3),
        0,
        "after repair: .200 -> web"
    );
    assert_counted(&before, &s.counters(), "drop_policy", 3, "after repair");
    assert_eq!(
        ping_from(outside, EXT_ALLOWED, web, 3),
        3,
        "after repair: .66 -> web"
    );
}

/// Host-side veth of container `c`, from its host's status.
fn host_veth(cluster: &Cluster, c: usize) -> String {
    let container = cluster.container(c);
    let status = cluster.status(container.host);
    status["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["ip"] == container.ip.to_string())
        .and_then(|e| e["host_ifname"].as_str())
        .unwrap_or_else(|| panic!("container {} not in status: {status}", container.ip))
        .to_string()
}

/// Whether a BPF filter named `to_container` is on `dev`'s egress.
fn has_egress_filter(ns: &NetNs, dev: &str) -> bool {
    let out = ns.exec(&["tc", "filter", "show", "dev", dev, "egress"]);
    String::from_utf8_lossy(&out.stdout).contains("to_container")
}

// ---------------------------------------------------------------- cost

/// (`run_cnt`, `run_time_ns`) of host 0's pinned `to_container`.
fn to_container_stats(cluster: &Cluster) -> (u64, u64) {
    let path = cluster
        .host(0)
        .pin_path()
        .join(netd_tests::layout_dir())
        .join("prog_to_container");
    prog_run_stats(&path)
}

/// Outside (.66) -> web over the routed link: a TCP stream, then a burst
/// of pings; prints ns per run of `to_container` for each.
fn measure(s: &Setup, what: &str) {
    let web = s.c(s.web);
    let dst = SocketAddr::from((web.ip, 7800));
    let stream = || {
        let t = tcp_transfer(s.outside(), &web.ns, dst, 16 << 20).expect("cost: TCP");
        assert_eq!(t.bytes, 16 << 20, "cost: TCP");
    };
    let pings = || {
        let src = EXT_ALLOWED.to_string();
        let args = ["-q", "-c", "500", "-i", "0.002", "-W", "1", "-I", &src];
        let got = ping_args(s.outside(), &args, web.ip).received;
        assert_eq!(got, 500, "cost: pings lost");
    };
    // GRO hands the routed stream over in aggregates: fewer runs than
    // segments.
    let workloads: [(&str, &dyn Fn(), u64); 2] =
        [("tcp 16 MiB", &stream, 10), ("ping 500", &pings, 500)];
    for (workload, run, min_runs) in workloads {
        let (runs0, ns0) = to_container_stats(&s.cluster);
        run();
        let (runs, ns) = to_container_stats(&s.cluster);
        let (runs, ns) = (runs - runs0, ns - ns0);
        assert!(
            runs >= min_runs,
            "{workload}: to_container ran {runs} times"
        );
        println!(
            "cost {what}, {workload}: to_container {runs} runs, {:.1} ns/run",
            ns as f64 / runs as f64
        );
    }
}

/// `to_container` per packet on the routed path, with the destination
/// untracked (one hash lookup) and isolated with a `cidr` rule (conntrack);
/// netd's own deliveries do not run it.
/// Figures are printed, not asserted; what is asserted is that the tracked
/// run admitted the flows into conntrack.
#[test]
fn to_container_cost_on_routed_path() {
    let mut s = Setup::new();
    let _stats = enable_run_time_stats();
    // netd's own deliveries (decapsulation, local delivery) use
    // bpf_redirect_peer, which skips the veth's egress hook: 40 of them
    // must not run to_container 40 times (a few runs are the host's ARP
    // replies to the containers).
    let remote = s.cluster.attach(1);
    let web = s.c(s.web).ip;
    let (runs0, _) = to_container_stats(&s.cluster);
    for from in [remote, s.client] {
        let stats = ping_args(&s.c(from).ns, &["-q", "-c", "20", "-i", "0.01"], web);
        assert_eq!(stats.received, 20, "ping {} -> web", s.c(from).ip);
    }
    let (runs, _) = to_container_stats(&s.cluster);
    println!("40 deliveries by netd: to_container {} runs", runs - runs0);
    assert!(
        runs - runs0 < 10,
        "40 deliveries by netd ran to_container {} times",
        runs - runs0
    );
    measure(&s, "untracked");
    s.apply(
        json!({"name": "web-outside", "selector": {"app": "web"}, "types": ["Ingress"],
               "ingress": [{"from": [{"cidr": "203.0.113.0/24"}]}]}),
        s.web,
        ISOLATED_INGRESS | TRACK,
    );
    measure(&s, "tracked");
    let pin = PinDir::new(s.cluster.host(0).pin_path());
    let flows = conntrack::dump(&pin).unwrap_or_else(|e| panic!("conntrack dump: {e}"));
    for proto in [6, 1] {
        assert!(
            flows.iter().any(|f| f.daddr == s.c(s.web).ip
                && f.saddr == EXT_ALLOWED
                && f.proto == proto
                && f.dir == "ingress"),
            "no ingress entry of proto {proto} for web: {flows:?}"
        );
    }
}
