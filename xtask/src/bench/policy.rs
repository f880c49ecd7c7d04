//! What policy enforcement costs: TCP 1 stream and UDP 64 B across two
//! hosts with no policy, 10 rules and 1,000 rules over 100 label sets, for
//! netd (TC decapsulation) and for the same rules as iptables + ipset the
//! way Calico's iptables mode programs them (on a routed testbed: see
//! `iptables_policy`); and how long a policy change takes to reach the
//! kernel with 1,000 endpoints published.
//!
//! The client and server are real endpoints; the other label sets belong
//! to fake endpoints that exist only in etcd (`<prefix>/endpoints/<fake
//! subnet>/<ip>`), so a host knows 100 identities and the rules name
//! every one. Before a case is measured, a probe to a port no rule allows
//! must be dropped (and counted), so the figures are of a policy in force.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netd_common::names;
use netd_common::policy::{
    DIR_INGRESS, LOCAL_ISOLATED_INGRESS, LocalPolicy, PolicyEntry, PolicyKey,
};
use netd_tests::{Cluster, Container, NsRef, SWITCH_IP, netd_bin};
use serde::{Deserialize, Serialize};

use super::bpf_map::{PinnedMap, lpm_key};
use super::etcd_http::{EtcdHttp, MAX_TXN_OPS};
use super::iptables_policy;
use super::policy_rules::{
    CLIENT_GROUP, DENIED_PORT, FakeEndpoint, GROUP_KEY, POLICY_NAME, Proto, Rule, RuleSet,
    SERVER_LABEL, fake_endpoints, fake_subnets, subnets_for,
};
use super::progress::{self, Progress};
use super::results::Sample;
use super::testbed::{Mode, Testbed};
use super::workloads::{self, Workload};
use super::{Plan, check_interrupt, guarded, interrupted, run_bounded};

/// The measured cases, in order: rules and the label sets they span.
pub const CASES: [RuleSet; 3] = [
    RuleSet::NONE,
    RuleSet {
        rules: 10,
        sets: 10,
    },
    RuleSet {
        rules: 1000,
        sets: 100,
    },
];
/// The workloads of each case.
const WORKLOADS: [Workload; 2] = [Workload::Tcp1, Workload::Udp64];
/// Fake label sets: with the client's, the 100 source label sets of the
/// 1,000-rule case (with the server's, 101 identities per host).
const FAKE_GROUPS: usize = 99;
/// Endpoints in etcd while the apply latency is measured (besides the
/// client and the server).
pub const LATENCY_ENDPOINTS: usize = 1000;
const PREFIX: &str = netd_tests::cluster::PREFIX;
/// Longest wait for the kernel to show a policy or an endpoint.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// First port of the rules added one per apply in the latency runs.
const LATENCY_PORT: u16 = 9000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyResult {
    pub cases: Vec<PolicyCase>,
    pub apply: Option<ApplyLatency>,
    pub errors: Vec<String>,
}

/// One system with one rule set on its testbed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyCase {
    /// `netd-1000`, `iptables-none`, …
    pub name: String,
    pub system: String,
    pub testbed: String,
    pub rules: usize,
    pub label_sets: usize,
    /// Kernel-side size of the rules: netd's POLICY entries, or iptables
    /// rules and ipset members in the filter table.
    pub kernel: String,
    /// The probe to a port no rule allows: `dropped` (with rules) or
    /// `refused` (no policy: nothing listens there).
    pub denied_probe: String,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
}

impl PolicyCase {
    fn new(system: &str, testbed: &str, rs: RuleSet) -> Self {
        PolicyCase {
            name: case_name(system, rs),
            system: system.into(),
            testbed: testbed.into(),
            rules: rs.rules,
            label_sets: rs.sets,
            ..Default::default()
        }
    }

    pub fn values(&self, workload: &str, metric: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.workload == workload)
            .filter_map(|s| s.metrics.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect()
    }
}

pub fn case_name(system: &str, rs: RuleSet) -> String {
    match rs.rules {
        0 => format!("{system}-none"),
        n => format!("{system}-{n}"),
    }
}

/// Time from a policy change to the kernel holding it, on the host whose
/// endpoint the policy selects.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApplyLatency {
    /// Endpoints in etcd (fake ones plus the client and the server).
    pub endpoints: usize,
    pub rules: usize,
    pub applies: usize,
    /// `netd policy apply` run time (parse, validate, etcd put), ms.
    pub cli_ms: Vec<f64>,
    /// `netd policy apply` returned → the new rule in POLICY, ms.
    pub enforced_ms: Vec<f64>,
    /// Applies whose rule did not show within the timeout.
    pub lost: usize,
}

/// Every case of both systems and the apply latency; what fails is
/// recorded, the rest goes on.
pub fn run(plan: &Plan, progress: &mut Progress) -> Result<PolicyResult> {
    let mut r = PolicyResult::default();
    progress.step("policy: iptables + ipset testbed", progress::SETUP_SECS);
    if let Err(e) = guarded("policy iptables", || iptables_cases(plan, progress, &mut r)) {
        if interrupted() {
            return Err(e);
        }
        eprintln!("!!  policy, iptables: {e:#}");
        r.errors.push(format!("iptables: {e:#}"));
    }
    check_interrupt()?;
    progress.step("policy: netd testbed", progress::SETUP_SECS);
    if let Err(e) = guarded("policy netd", || netd_cases(plan, progress, &mut r)) {
        if interrupted() {
            return Err(e);
        }
        eprintln!("!!  policy, netd: {e:#}");
        r.errors.push(format!("netd: {e:#}"));
    }
    Ok(r)
}

/// The workloads of one case, each `plan.reps` times.
fn measure(
    plan: &Plan,
    progress: &mut Progress,
    tb: &Testbed,
    case: &mut PolicyCase,
) -> Result<()> {
    for w in WORKLOADS {
        for rep in 1..=plan.reps {
            check_interrupt()?;
            progress.step(
                &format!("policy {}: {} rep {rep}/{}", case.name, w.name(), plan.reps),
                progress::run_secs(plan),
            );
            match workloads::run(tb, w, rep, plan) {
                Ok(s) => {
                    println!("      {}", s.summary());
                    case.samples.push(s);
                }
                Err(e) if interrupted() => return Err(e),
                Err(e) => case.errors.push(format!("{} rep {rep}: {e:#}", w.name())),
            }
        }
    }
    Ok(())
}

/// What a TCP connection attempt found.
fn probe_tcp(ns: &NsRef, ip: Ipv4Addr, port: u16) -> String {
    let addr = SocketAddr::from((ip, port));
    let r = ns.run_in_thread(move || TcpStream::connect_timeout(&addr, PROBE_TIMEOUT));
    match r {
        Ok(_) => "connected".into(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "dropped".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// Checks the probe to [`DENIED_PORT`] against the case: dropped and
/// counted with rules, refused without.
fn check_probe(case: &mut PolicyCase, outcome: String, counted: u64) -> Result<()> {
    let want = if case.rules > 0 { "dropped" } else { "refused" };
    case.denied_probe = if case.rules > 0 {
        format!("{outcome} (drop counter +{counted})")
    } else {
        outcome.clone()
    };
    if outcome != want || (case.rules > 0 && counted == 0) {
        bail!(
            "{}: probe to port {DENIED_PORT} {}, expected {want}{}",
            case.name,
            case.denied_probe,
            if case.rules > 0 { " and counted" } else { "" }
        );
    }
    Ok(())
}

fn iptables_cases(plan: &Plan, progress: &mut Progress, r: &mut PolicyResult) -> Result<()> {
    let (tb, server_host) = iptables_policy::testbed()?;
    let client_ip = iptables_policy::client_ip();
    let fakes = fake_endpoints(FAKE_GROUPS, FAKE_GROUPS, &fake_subnets(1, &[1, 2]));
    let testbed = "routed (host-gw), Calico-style /32 veths, iptables-nft + ipset";
    for rs in CASES {
        check_interrupt()?;
        let mut case = PolicyCase::new("iptables", testbed, rs);
        let outcome = (|| -> Result<()> {
            let (rules, members) = iptables_policy::program(&server_host, &rs, &fakes, client_ip)?;
            case.kernel = format!("{rules} iptables rules, {members} ipset members");
            let before = iptables_policy::dropped(&server_host).unwrap_or(0);
            let probe = probe_tcp(&tb.client, tb.server_ip, DENIED_PORT);
            let after = iptables_policy::dropped(&server_host).unwrap_or(0);
            check_probe(&mut case, probe, after.saturating_sub(before))?;
            measure(plan, progress, &tb, &mut case)
        })();
        if let Err(e) = outcome {
            if interrupted() {
                return Err(e);
            }
            eprintln!("!!  policy {}: {e:#}", case.name);
            case.errors.push(format!("{e:#}"));
        }
        r.cases.push(case);
    }
    Ok(())
}

/// Whether this netd has the policy commands (`netd policy`, labels).
fn netd_has_policy() -> bool {
    std::process::Command::new(netd_bin())
        .args(["policy", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

type Labels<'a> = &'a [(&'a str, &'a str)];

/// `netd attach` of a new container on `host` with `labels`.
fn attach_labeled(cluster: &mut Cluster, host: usize, labels: Labels) -> Result<usize> {
    let ns = cluster.topo.add_container(host);
    let mut args = vec!["attach".to_string(), ns.name().to_string()];
    for (k, v) in labels {
        args.push("--label".into());
        args.push(format!("{k}={v}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.netd_ok(host, &refs);
    let ip: Ipv4Addr = out
        .trim()
        .parse()
        .with_context(|| format!("attach printed {out:?}"))?;
    cluster.containers.push(Container { ns, host, ip });
    Ok(cluster.containers.len() - 1)
}

/// Two netd hosts (TC decapsulation), the client labelled on host 0 and
/// the server on host 1 (unlabelled when this netd has no labels).
fn netd_testbed(labels: bool) -> Result<Testbed> {
    let mut cluster = Cluster::up(2, "tc");
    let none: Labels = &[];
    let (cl, sl): (Labels, Labels) = if labels {
        (&[(GROUP_KEY, CLIENT_GROUP)], &[SERVER_LABEL])
    } else {
        (none, none)
    };
    let c0 = attach_labeled(&mut cluster, 0, cl)?;
    let c1 = attach_labeled(&mut cluster, 1, sl)?;
    for host in 0..2 {
        cluster.wait_peers_match_etcd(host, Duration::from_secs(15));
    }
    let client = cluster.container(c0).ns.handle();
    let server = cluster.container(c1).ns.handle();
    let server_ip = cluster.container(c1).ip;
    Testbed::assemble(
        Mode::NetdTc,
        client,
        server,
        server_ip,
        Vec::new(),
        Some(cluster),
        None,
    )
}

/// Third octets of the hosts' own subnets.
fn taken_subnets(cluster: &Cluster) -> Vec<u8> {
    (0..2)
        .filter_map(|i| {
            let s = cluster.subnet(i);
            let ip: Ipv4Addr = s.split('/').next()?.parse().ok()?;
            Some(ip.octets()[2])
        })
        .collect()
}

/// Puts the fake endpoints in etcd, bound to one long lease.
fn publish(etcd: &mut EtcdHttp, fakes: &[FakeEndpoint], lease: i64) -> Result<()> {
    let kvs: Vec<(String, String)> = fakes.iter().map(|f| (f.key(PREFIX), f.value())).collect();
    for chunk in kvs.chunks(MAX_TXN_OPS) {
        check_interrupt()?;
        etcd.put_all(chunk, lease)?;
    }
    Ok(())
}

/// The server host's policy maps, read with bpf(2).
struct PolicyMaps {
    identities: PinnedMap,
    local: PinnedMap,
    policy: PinnedMap,
}

/// `<pin-path>/v<layout>/`, the directory holding the policy maps.
fn layout_dir(pin_path: &Path) -> Option<PathBuf> {
    std::fs::read_dir(pin_path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join(names::POLICY).exists())
}

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) map type with its padding spelled out as
    // fields, so every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= size_of::<T>(), "value buffer too small");
    // SAFETY: the buffer holds at least size_of::<T>() bytes and T is a
    // plain repr(C) type for which any bit pattern is valid.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

impl PolicyMaps {
    fn open(pin_path: &Path) -> Result<Self> {
        let dir = layout_dir(pin_path)
            .with_context(|| format!("no {} map under {}", names::POLICY, pin_path.display()))?;
        let open = |name: &str, key: usize| {
            PinnedMap::open(&dir.join(name), key)
                .with_context(|| format!("open {}", dir.join(name).display()))
        };
        Ok(PolicyMaps {
            identities: open(names::IDENTITIES, 8)?,
            local: open(names::LOCAL_POLICY, 4)?,
            policy: open(names::POLICY, size_of::<PolicyKey>())?,
        })
    }

    fn identity(&self, ip: Ipv4Addr) -> Result<Option<u32>> {
        let v = self.identities.lookup(&lpm_key(ip))?;
        Ok(v.map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
    }

    fn local(&self, ip: Ipv4Addr) -> Result<Option<LocalPolicy>> {
        Ok(self.local.lookup(&ip.octets())?.map(|b| from_bytes(&b)))
    }

    /// Whether the server admits `proto`/`port` from `source`'s identity.
    fn allows(&self, server: Ipv4Addr, source: Ipv4Addr, proto: u8, port: u16) -> Result<bool> {
        let (Some(local), Some(remote)) = (self.local(server)?, self.identity(source)?) else {
            return Ok(false);
        };
        let key = PolicyKey {
            local: local.identity,
            remote,
            proto,
            dir: DIR_INGRESS,
            _pad: [0; 2],
        };
        let Some(b) = self.policy.lookup(&bytes_of(&key))? else {
            return Ok(false);
        };
        let e: PolicyEntry = from_bytes(&b);
        let n = usize::from(e.count).min(e.ranges.len());
        Ok(e.ranges[..n]
            .iter()
            .any(|r| r.first <= port && port <= r.last))
    }

    fn isolated(&self, server: Ipv4Addr) -> Result<bool> {
        Ok(self
            .local(server)?
            .is_some_and(|l| l.flags & LOCAL_ISOLATED_INGRESS != 0))
    }
}

/// Polls `f` every millisecond until it is true; the time it took.
fn wait_until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < ENFORCE_TIMEOUT {
        check_interrupt()?;
        if f()? {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("{what}: not seen in the kernel after {ENFORCE_TIMEOUT:?}")
}

/// `netd policy ARGS --etcd-endpoints …` on host 0.
fn netd_policy(cluster: &Cluster, args: &[&str]) -> Result<()> {
    let endpoint = cluster.topo.etcd_endpoint();
    let mut all: Vec<&str> = vec!["policy"];
    all.extend(args);
    all.extend(["--etcd-endpoints", &endpoint]);
    let mut cmd = cluster.host(0).ns().command(netd_bin());
    cmd.args(cluster.node_args(0)).args(&all);
    run_bounded(cmd, Duration::from_secs(60))?;
    Ok(())
}

fn apply(cluster: &Cluster, dir: &Path, policy: &serde_json::Value) -> Result<()> {
    let file = dir.join("policy.json");
    std::fs::write(&file, serde_json::to_vec_pretty(policy)?)?;
    netd_policy(cluster, &["apply", &file.to_string_lossy()])
}

/// The state every netd case shares.
struct NetdBench<'a> {
    tb: &'a Testbed,
    cluster: &'a Cluster,
    maps: Option<PolicyMaps>,
    client: Ipv4Addr,
    /// The fake endpoints published so far.
    fakes: Vec<FakeEndpoint>,
    files: tempfile::TempDir,
}

impl NetdBench<'_> {
    /// An endpoint of label set `group`.
    fn source_of(&self, group: &str) -> Option<Ipv4Addr> {
        if group == CLIENT_GROUP {
            return Some(self.client);
        }
        self.fakes.iter().find(|f| f.group == group).map(|f| f.ip)
    }

    /// Whether the server host's POLICY admits every rule of `rs`: the
    /// whole policy is in force, not only a rule an earlier case had.
    fn enforces(&self, maps: &PolicyMaps, rs: &RuleSet) -> Result<bool> {
        for rule in rs.rules() {
            let source = self
                .source_of(&rule.group)
                .with_context(|| format!("no endpoint of label set {}", rule.group))?;
            for &(proto, port) in &rule.ports {
                if !maps.allows(self.tb.server_ip, source, ip_proto(proto), port)? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

fn ip_proto(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

fn netd_cases(plan: &Plan, progress: &mut Progress, r: &mut PolicyResult) -> Result<()> {
    let supported = netd_has_policy();
    let tb = netd_testbed(supported)?;
    let cluster = tb.cluster().context("netd testbed without a cluster")?;
    let client = cluster.container(0).ip;
    let mut etcd = EtcdHttp::connect(cluster.topo.switch(), SocketAddr::from((SWITCH_IP, 2379)))?;
    let subnets = fake_subnets(subnets_for(LATENCY_ENDPOINTS), &taken_subnets(cluster));
    let fakes = fake_endpoints(LATENCY_ENDPOINTS, FAKE_GROUPS, &subnets);
    let lease = etcd.lease_grant(3600)?;
    publish(&mut etcd, &fakes[..FAKE_GROUPS], lease)?;
    let mut bench = NetdBench {
        tb: &tb,
        cluster,
        maps: None,
        client,
        fakes: fakes[..FAKE_GROUPS].to_vec(),
        files: tempfile::tempdir()?,
    };
    if supported {
        bench.maps = Some(PolicyMaps::open(cluster.host(1).pin_path())?);
        let last = fakes[FAKE_GROUPS - 1].ip;
        let maps = bench.maps.as_ref().context("maps")?;
        wait_until("the fake endpoints in IDENTITIES", || {
            Ok(maps.identity(last)?.is_some() && maps.identity(client)?.is_some())
        })?;
    }
    let testbed = "netd, TC decapsulation (VXLAN)";
    for rs in CASES {
        check_interrupt()?;
        let mut case = PolicyCase::new("netd", testbed, rs);
        let outcome = if rs.rules > 0 && !supported {
            Err(anyhow::anyhow!("this netd has no `netd policy`"))
        } else {
            netd_case(plan, progress, &bench, rs, &mut case)
        };
        if let Err(e) = outcome {
            if interrupted() {
                return Err(e);
            }
            eprintln!("!!  policy {}: {e:#}", case.name);
            case.errors.push(format!("{e:#}"));
        }
        r.cases.push(case);
    }
    if !supported {
        r.errors
            .push("apply latency: this netd has no `netd policy`".into());
        return Ok(());
    }
    check_interrupt()?;
    progress.step(
        &format!("policy: apply latency at {LATENCY_ENDPOINTS} endpoints"),
        latency_secs(plan),
    );
    publish(&mut etcd, &fakes[FAKE_GROUPS..], lease)?;
    let maps = bench.maps.as_ref().context("maps")?;
    let last = fakes[fakes.len() - 1].ip;
    wait_until("every fake endpoint in IDENTITIES", || {
        Ok(maps.identity(last)?.is_some())
    })?;
    r.apply = Some(apply_latency(plan, &bench, fakes.len() + 2)?);
    Ok(())
}

/// Puts `rs` in force (or no policy), checks it with the probe, measures.
fn netd_case(
    plan: &Plan,
    progress: &mut Progress,
    b: &NetdBench,
    rs: RuleSet,
    case: &mut PolicyCase,
) -> Result<()> {
    let server = b.tb.server_ip;
    if let Some(maps) = &b.maps {
        if rs.rules == 0 {
            // Nothing may be left of an earlier case (the first has none).
            if maps.isolated(server)? {
                netd_policy(b.cluster, &["delete", POLICY_NAME])?;
            }
            wait_until("no policy on the server", || Ok(!maps.isolated(server)?))?;
        } else {
            apply(b.cluster, b.files.path(), &rs.policy_json(&[]))?;
            wait_until("every rule in POLICY", || b.enforces(maps, &rs))?;
        }
        case.kernel = format!("{} POLICY entries", maps.policy.count()?);
    }
    let drops = |c: &Cluster| c.counters(1).get("drop_policy").copied().unwrap_or(0);
    let before = drops(b.cluster);
    let probe = probe_tcp(&b.tb.client, server, DENIED_PORT);
    let counted = drops(b.cluster).saturating_sub(before);
    check_probe(case, probe, counted)?;
    measure(plan, progress, b.tb, case)
}

fn latency_applies(plan: &Plan) -> usize {
    if plan.quick { 5 } else { 20 }
}

fn latency_secs(plan: &Plan) -> f64 {
    latency_applies(plan) as f64 * 0.5 + 5.0
}

/// The 1,000-rule policy applied again and again, each time with one more
/// rule for the client (a new port); time until the server's host has it.
fn apply_latency(plan: &Plan, b: &NetdBench, endpoints: usize) -> Result<ApplyLatency> {
    let rs = CASES[2];
    let maps = b.maps.as_ref().context("maps")?;
    let server = b.tb.server_ip;
    let mut r = ApplyLatency {
        endpoints,
        rules: rs.rules + 1,
        applies: latency_applies(plan),
        ..Default::default()
    };
    for i in 0..r.applies {
        check_interrupt()?;
        let port = LATENCY_PORT + 2 * i as u16;
        let extra = Rule {
            group: CLIENT_GROUP.into(),
            ports: vec![(Proto::Tcp, port)],
        };
        let policy = rs.policy_json(&[extra]);
        let t0 = Instant::now();
        apply(b.cluster, b.files.path(), &policy)?;
        r.cli_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        match wait_until("the new rule", || {
            maps.allows(server, b.client, ip_proto(Proto::Tcp), port)
        }) {
            Ok(d) => r.enforced_ms.push(d.as_secs_f64() * 1e3),
            Err(e) if interrupted() => return Err(e),
            Err(_) => r.lost += 1,
        }
    }
    let p = |q| super::report::percentile(&r.enforced_ms, q).unwrap_or(f64::NAN);
    println!(
        "      {} applies at {} endpoints: enforced p50 {:.1} ms, p99 {:.1} ms, lost {}",
        r.applies,
        r.endpoints,
        p(50.0),
        p(99.0),
        r.lost
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_have_the_kernel_layout() {
        let key = PolicyKey {
            local: 0x0102_0304,
            remote: 7,
            proto: 6,
            dir: DIR_INGRESS,
            _pad: [0; 2],
        };
        let b = bytes_of(&key);
        assert_eq!(b.len(), 12);
        assert_eq!(&b[..4], &0x0102_0304u32.to_ne_bytes());
        assert_eq!((b[8], b[9]), (6, 1));
        let mut raw = [0u8; 256];
        raw[0] = 2;
        raw[4..6].copy_from_slice(&5201u16.to_ne_bytes());
        raw[6..8].copy_from_slice(&5201u16.to_ne_bytes());
        let e: PolicyEntry = from_bytes(&raw);
        assert_eq!(
            (e.count, e.ranges[0].first, e.ranges[0].last),
            (2, 5201, 5201)
        );
    }

    #[test]
    fn every_label_set_of_every_case_has_a_published_endpoint() {
        let fakes = fake_endpoints(FAKE_GROUPS, FAKE_GROUPS, &[250]);
        for rs in CASES {
            for g in rs.groups() {
                assert!(
                    g == CLIENT_GROUP || fakes.iter().any(|f| f.group == g),
                    "{} rules: no endpoint of {g}",
                    rs.rules
                );
            }
        }
    }

    #[test]
    fn case_names() {
        assert_eq!(case_name("netd", CASES[0]), "netd-none");
        assert_eq!(case_name("iptables", CASES[2]), "iptables-1000");
    }
}
