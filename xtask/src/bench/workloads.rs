//! The data-plane workloads, each one bounded run from the client
//! namespace to a server started for it in the server namespace.
//!
//! Pinned, client and server run on different cores (iperf3 -A, taskset),
//! so the two ends do not share a core with each other; unpinned, the
//! scheduler places them. The kernel's packet work lands where the
//! softirqs run, which is why CPU cost is read machine-wide and per CPU
//! from /proc/stat.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netd_tests::{Daemon, NsRef};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cpu::{CpuDelta, CpuMeter, busy_cores, softnet_drops};
use super::results::Sample;
use super::testbed::{Testbed, parse_ethtool_k};
use super::{Plan, run_bounded, sh};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Tcp1,
    Tcp4,
    Udp64,
    Udp1400,
    Rr,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Tcp1,
        Workload::Tcp4,
        Workload::Udp64,
        Workload::Udp1400,
        Workload::Rr,
    ];

    pub fn parse(s: &str) -> Result<Workload, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {s:?} (one of {})", names.join(", "))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Tcp1 => "tcp-1",
            Workload::Tcp4 => "tcp-4",
            Workload::Udp64 => "udp-64",
            Workload::Udp1400 => "udp-1400",
            Workload::Rr => "rr",
        }
    }
}

/// Where the client and the server run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Client on core 0, server on core 1.
    Pinned,
    /// Wherever the scheduler puts them.
    Unpinned,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Unpinned => "unpinned",
        }
    }
}

/// GRO on every container's `eth0`, set the same in every container mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Gro {
    On,
    Off,
}

impl Gro {
    pub fn name(self) -> &'static str {
        match self {
            Gro::On => "on",
            Gro::Off => "off",
        }
    }
}

/// How one run is set up, besides the mode and the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub placement: Placement,
    pub gro: Gro,
}

impl Variant {
    pub const DEFAULT: Variant = Variant {
        placement: Placement::Pinned,
        gro: Gro::On,
    };

    pub fn label(self) -> String {
        format!("{}, GRO {}", self.placement.name(), self.gro.name())
    }
}

/// Sets GRO on `eth0` of every container of the testbed and reads it back:
/// what the run then measured, as `container0 on, container1 on`. The
/// container namespaces are the ones the testbed recorded in its path.
pub fn set_container_gro(tb: &Testbed, gro: Gro) -> Result<String> {
    let mut seen = Vec::new();
    for i in tb.path.interfaces.iter() {
        if !i.role.starts_with("container") || i.ifname != "eth0" {
            continue;
        }
        let ns = NsRef::new(i.ns.clone());
        sh(&ns, &["ethtool", "-K", "eth0", "gro", gro.name()])?;
        let now = parse_ethtool_k(&sh(&ns, &["ethtool", "-k", "eth0"])?);
        let actual = now
            .get("generic-receive-offload")
            .map_or("-", |v| v.split_whitespace().next().unwrap_or("-"));
        if actual != gro.name() {
            bail!(
                "{}: GRO is {actual} after setting it {}",
                i.role,
                gro.name()
            );
        }
        seen.push(format!("{} {actual}", i.role));
    }
    Ok(if seen.is_empty() {
        "n/a".to_string()
    } else {
        seen.join(", ")
    })
}

const IPERF_PORT: &str = "5201";
const SOCKPERF_PORT: &str = "11111";
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";
/// Request and response size of the ping-pong test.
const RR_MSG_BYTES: &str = "64";
/// Slack over a run's own duration before it is killed.
const SLACK: Duration = Duration::from_secs(30);

/// Background load (cores) below which a run starts right away.
const QUIET_CORES: f64 = 0.25;
/// Longest wait for the machine to quiet down before a run. Short: rounds
/// already spread other load over all modes, and a long wait per run
/// would multiply a full run's length on a busy machine.
const QUIET_WAIT: Duration = Duration::from_secs(1);

/// Waits (bounded) until little else runs on the machine; returns the
/// background load the run starts with. The quick run does not wait.
fn wait_quiet(plan: &Plan) -> Result<f64> {
    let window = Duration::from_millis(if plan.quick { 100 } else { 300 });
    let deadline = std::time::Instant::now() + QUIET_WAIT;
    let mut said = false;
    loop {
        super::check_interrupt()?;
        let busy = busy_cores(window)?;
        if plan.quick || busy < QUIET_CORES || std::time::Instant::now() > deadline {
            return Ok(busy);
        }
        if !said {
            println!(
                "      waiting up to {QUIET_WAIT:?} for other load to pass ({busy:.2} cores busy)"
            );
            said = true;
        }
    }
}

/// One run pinned, with whatever GRO the containers have.
pub fn run(tb: &Testbed, w: Workload, rep: u32, plan: &Plan) -> Result<Sample> {
    run_variant(tb, w, rep, Placement::Pinned, plan)
}

pub fn run_variant(
    tb: &Testbed,
    w: Workload,
    rep: u32,
    placement: Placement,
    plan: &Plan,
) -> Result<Sample> {
    let background_cores = wait_quiet(plan)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let drops_before = softnet_drops();
    let (mut metrics, cpu, raw) = match w {
        Workload::Tcp1 => iperf_tcp(tb, plan, placement, 1)?,
        Workload::Tcp4 => iperf_tcp(tb, plan, placement, 4)?,
        Workload::Udp64 => iperf_udp(tb, plan, placement, 64)?,
        Workload::Udp1400 => iperf_udp(tb, plan, placement, 1400)?,
        Workload::Rr => sockperf_rr(tb, plan, placement)?,
    };
    let drops = softnet_drops().saturating_sub(drops_before);
    metrics.insert("softnet_drops".into(), drops as f64);
    for (i, _) in cpu.per_cpu.iter().enumerate() {
        if let Some(x) = cpu.softirq_share(i) {
            metrics.insert(format!("cpu{i}_softirq_pct"), x * 100.0);
        }
        if let Some(x) = cpu.busy_share(i) {
            metrics.insert(format!("cpu{i}_busy_pct"), x * 100.0);
        }
    }
    Ok(Sample {
        workload: w.name().to_string(),
        rep,
        round: 0,
        placement: placement.name().to_string(),
        gro: String::new(),
        gro_seen: String::new(),
        metrics,
        cpu,
        loadavg,
        background_cores,
        raw,
    })
}

type Measured = (BTreeMap<String, f64>, CpuDelta, Value);

fn iperf_tcp(tb: &Testbed, plan: &Plan, placement: Placement, streams: u32) -> Result<Measured> {
    let streams = streams.to_string();
    let (client0, server0) = (tcp_counters(&tb.client), tcp_counters(&tb.server));
    let (mut end, cpu) = iperf(tb, plan, placement, &["-P", &streams])?;
    // Why segments were retransmitted: each end's TcpExt counters.
    end["tcp_counters"] = json!({
        "client": counter_delta(&client0, &tcp_counters(&tb.client)),
        "server": counter_delta(&server0, &tcp_counters(&tb.server)),
    });
    let gbps = num(&end["sum_received"]["bits_per_second"])? / 1e9;
    if gbps <= 0.0 {
        bail!("no TCP payload received");
    }
    let mut m = BTreeMap::new();
    m.insert("gbps".into(), gbps);
    m.insert(
        "retransmits".into(),
        num(&end["sum_sent"]["retransmits"]).unwrap_or(f64::NAN),
    );
    m.insert("cpu_kernel_cores".into(), cpu.kernel_cores());
    // Cores busy per Gbit/s, i.e. CPU-seconds per Gbit moved.
    m.insert("cpu_s_per_gbit".into(), cpu.kernel_cores() / gbps);
    iperf_cpu(&end, &mut m);
    Ok((m, cpu, end))
}

fn iperf_udp(tb: &Testbed, plan: &Plan, placement: Placement, len: u32) -> Result<Measured> {
    let len = len.to_string();
    // -b 0: as fast as the sender can; what arrives is the figure.
    let (end, cpu) = iperf(tb, plan, placement, &["-u", "-l", &len, "-b", "0"])?;
    let recv = &end["sum_received"];
    let delivered = num(&recv["packets"])? - num(&recv["lost_packets"]).unwrap_or(0.0);
    let secs = num(&recv["seconds"])?;
    if delivered <= 0.0 || secs <= 0.0 {
        bail!("no UDP datagram received");
    }
    let pps = delivered / secs;
    let sent = &end["sum_sent"];
    let mut m = BTreeMap::new();
    m.insert("kpps".into(), pps / 1e3);
    m.insert(
        "sent_kpps".into(),
        num(&sent["packets"])? / num(&sent["seconds"])? / 1e3,
    );
    m.insert(
        "lost_percent".into(),
        num(&recv["lost_percent"]).unwrap_or(f64::NAN),
    );
    m.insert("gbps".into(), num(&recv["bits_per_second"])? / 1e9);
    m.insert("cpu_kernel_cores".into(), cpu.kernel_cores());
    m.insert("cpu_ns_per_packet".into(), cpu.kernel_cores() * 1e9 / pps);
    iperf_cpu(&end, &mut m);
    Ok((m, cpu, end))
}

/// The `TcpExt` and `Tcp` counters of `ns` (`/proc/net/netstat`, `snmp`),
/// read from a thread inside it.
fn tcp_counters(ns: &NsRef) -> BTreeMap<String, u64> {
    ns.run_in_thread(|| {
        let mut all = BTreeMap::new();
        for file in ["netstat", "snmp"] {
            // thread-self: /proc/self/net would show the main thread's namespace.
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_default();
            all.extend(parse_proc_net_counters(&text, &["TcpExt:", "Tcp:"]));
        }
        all
    })
}

/// `Prefix: name…` / `Prefix: value…` line pairs, as `Prefix.name` → value.
fn parse_proc_net_counters(text: &str, prefixes: &[&str]) -> BTreeMap<String, u64> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = BTreeMap::new();
    for pair in lines.chunks_exact(2) {
        let Some(prefix) = prefixes.iter().find(|p| pair[0].starts_with(**p)) else {
            continue;
        };
        let names = pair[0].split_whitespace().skip(1);
        let values = pair[1].split_whitespace().skip(1);
        for (n, v) in names.zip(values) {
            if let Ok(v) = v.parse() {
                out.insert(format!("{}.{n}", prefix.trim_end_matches(':')), v);
            }
        }
    }
    out
}

/// The counters that moved.
fn counter_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Value {
    let moved: serde_json::Map<String, Value> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), json!(d)))
        })
        .collect();
    Value::Object(moved)
}

/// iperf3's own view of its processes' CPU (user + system, per end).
fn iperf_cpu(end: &Value, m: &mut BTreeMap<String, f64>) {
    let cpu = &end["cpu_utilization_percent"];
    for (key, field) in [
        ("iperf_client_cpu_pct", "host_total"),
        ("iperf_server_cpu_pct", "remote_total"),
    ] {
        if let Ok(v) = num(&cpu[field]) {
            m.insert(key.into(), v);
        }
    }
}

/// One iperf3 client run against a one-off server; returns its `end`
/// object and the machine's CPU time over the run.
fn iperf(
    tb: &Testbed,
    plan: &Plan,
    placement: Placement,
    extra: &[&str],
) -> Result<(Value, CpuDelta)> {
    let logs = tempfile::tempdir()?;
    let pinned = placement == Placement::Pinned;
    let mut server_args = vec!["-s", "-1", "-p", IPERF_PORT];
    if pinned {
        server_args.extend(["-A", SERVER_CPU]);
    }
    let _server = Daemon::start(
        &tb.server,
        "iperf3",
        server_args,
        &logs.path().join("iperf3-server.log"),
    );
    wait_listening(&tb.server, IPERF_PORT)?;
    let (secs, omit) = (plan.seconds.to_string(), plan.omit.to_string());
    let affinity = format!("{CLIENT_CPU},{SERVER_CPU}");
    let ip = tb.server_ip.to_string();
    let mut cmd = tb.client.command("iperf3");
    cmd.args(["-c", &ip, "-p", IPERF_PORT, "-t", &secs, "-O", &omit, "-J"]);
    if pinned {
        cmd.args(["-A", &affinity]);
    }
    cmd.args(extra);
    let timeout = Duration::from_secs(u64::from(plan.seconds + plan.omit)) + SLACK;
    let meter = CpuMeter::start()?;
    let out = run_bounded(cmd, timeout);
    let cpu = meter.stop()?;
    let out = out?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J printed no JSON")?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    let mut end = v["end"].clone();
    if let Some(end) = end.as_object_mut() {
        // Per-stream detail repeats the sums; the sums are the samples.
        end.remove("streams");
    }
    Ok((end, cpu))
}

/// TCP ping-pong with one message in flight: the transaction rate and the
/// round-trip percentiles.
/// `argv` under `taskset -c cpu` when pinned, as is otherwise.
fn placed<'a>(placement: Placement, cpu: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
    match placement {
        Placement::Pinned => [&["taskset", "-c", cpu][..], argv].concat(),
        Placement::Unpinned => argv.to_vec(),
    }
}

fn sockperf_rr(tb: &Testbed, plan: &Plan, placement: Placement) -> Result<Measured> {
    let logs = tempfile::tempdir()?;
    let server = placed(
        placement,
        SERVER_CPU,
        &[
            "sockperf",
            "sr",
            "--tcp",
            "-i",
            "0.0.0.0",
            "-p",
            SOCKPERF_PORT,
        ],
    );
    let _server = Daemon::start(
        &tb.server,
        server[0],
        &server[1..],
        &logs.path().join("sockperf-server.log"),
    );
    wait_listening(&tb.server, SOCKPERF_PORT)?;
    let ip = tb.server_ip.to_string();
    let secs = (plan.seconds + plan.omit).to_string();
    let client = placed(
        placement,
        CLIENT_CPU,
        &["sockperf", "pp", "--tcp", "-i", &ip, "-p", SOCKPERF_PORT],
    );
    let mut cmd = tb.client.command(client[0]);
    cmd.args(&client[1..]);
    cmd.args(["-t", &secs, "-m", RR_MSG_BYTES, "--full-rtt"]);
    let timeout = Duration::from_secs(u64::from(plan.seconds + plan.omit)) + SLACK;
    let meter = CpuMeter::start()?;
    let out = run_bounded(cmd, timeout);
    let cpu = meter.stop()?;
    let out = out?;
    let text = strip_ansi(&String::from_utf8_lossy(&[out.stdout, out.stderr].concat()));
    let pp = parse_sockperf(&text).with_context(|| format!("sockperf output:\n{text}"))?;
    let mut m = BTreeMap::new();
    m.insert("rr_per_s".into(), pp.rate);
    m.insert("avg_us".into(), pp.avg_us);
    m.insert("p50_us".into(), pp.p50_us);
    m.insert("p99_us".into(), pp.p99_us);
    m.insert("p999_us".into(), pp.p999_us);
    m.insert("cpu_kernel_cores".into(), cpu.kernel_cores());
    m.insert("cpu_us_per_rr".into(), cpu.kernel_cores() * 1e6 / pp.rate);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("RunTime") || l.contains("percentile") || l.contains("avg-rtt"))
        .collect();
    Ok((m, cpu, json!({ "sockperf": summary })))
}

#[derive(Debug, PartialEq)]
struct PingPong {
    rate: f64,
    avg_us: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

/// Reads sockperf's summary: the `[Valid Duration]` line (warm-up
/// excluded), `avg-rtt` and the percentile lines.
fn parse_sockperf(text: &str) -> Result<PingPong> {
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .context("no [Valid Duration] line")?;
    let runtime: f64 = field_after(valid, "RunTime=")?;
    let received: f64 = field_after(valid, "ReceivedMessages=")?;
    if runtime <= 0.0 || received <= 0.0 {
        bail!("no round trips completed");
    }
    let avg_line = text
        .lines()
        .find(|l| l.contains("avg-rtt="))
        .context("no avg-rtt")?;
    let percentile = |p: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .with_context(|| format!("no percentile {p}"))?;
        let v = line.rsplit('=').next().unwrap_or("").trim();
        v.parse().with_context(|| format!("percentile {p}: {v:?}"))
    };
    Ok(PingPong {
        rate: received / runtime,
        avg_us: field_after(avg_line, "avg-rtt=")?,
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        p999_us: percentile("99.900")?,
    })
}

/// The number right after `key` in `line` (up to a space, `;` or `(`).
fn field_after(line: &str, key: &str) -> Result<f64> {
    let rest = &line[line
        .find(key)
        .with_context(|| format!("no {key} in {line:?}"))?
        + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}

/// Removes terminal colour sequences (`ESC [ … m`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn num(v: &Value) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("expected a number, got {v}"))
}

/// Waits until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &NsRef, port: &str) -> Result<()> {
    let filter = format!("sport = :{port}");
    for _ in 0..250 {
        super::check_interrupt()?;
        if !sh(ns, &["ss", "-Hltn", &filter])?.trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} in {} after 5 s", ns.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF: &str = "sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=99096; ReceivedMessages=99095
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=69157; ReceivedMessages=69157
sockperf: \u{1b}[2;35m====> avg-rtt=22.377 (std-dev=32.367)\u{1b}[0m
sockperf: ---> percentile 99.900 =  309.660
sockperf: ---> percentile 99.000 =   91.980
sockperf: ---> percentile 50.000 =    4.724
";

    #[test]
    fn parses_sockperf_summary() {
        let pp = parse_sockperf(&strip_ansi(SOCKPERF)).unwrap();
        assert!((pp.rate - 69157.0 / 1.55).abs() < 1e-6);
        assert_eq!(
            (pp.avg_us, pp.p50_us, pp.p99_us, pp.p999_us),
            (22.377, 4.724, 91.98, 309.66)
        );
    }

    #[test]
    fn parses_proc_net_counter_pairs() {
        let text = "TcpExt: SyncookiesSent TCPTimeouts\nTcpExt: 0 7\nIpExt: InNoRoutes\nIpExt: 3\n";
        let c = parse_proc_net_counters(text, &["TcpExt:"]);
        assert_eq!(c.get("TcpExt.TCPTimeouts"), Some(&7));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn strips_colour() {
        assert_eq!(strip_ansi("a\u{1b}[2;35mb\u{1b}[0mc"), "abc");
    }
}
