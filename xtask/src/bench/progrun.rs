//! netd's BPF programs timed by the kernel with BPF_PROG_TEST_RUN
//! (`bpftool prog run pinned … repeat N`) on realistic frames, in a
//! running netd testbed (so the maps hold a real peer and endpoint).
//!
//! BPF_PROG_TEST_RUN runs the program `repeat` times on the same buffer:
//! whatever the first run did to the frame, the following runs see. After
//! `from_container` has encapsulated a frame, the next run sees an outer
//! VXLAN frame from the host's own address, not a container packet; after
//! a decapsulation, the next run sees the inner frame. So a loop's average
//! is mostly the cost of that second path. Each case therefore reports:
//! - `loop`: the average over `repeat` runs, with the output size and the
//!   counters the loop moved (which show what the runs did);
//! - `single`: many runs with `repeat 1`, each timed alone (includes the
//!   kernel's clock reads around one run, tens of ns);
//! - a `re-fed` case: the first run's output as input, looped, which is
//!   exactly the path runs 2..N took.
//!
//! And, as the figure that holds for real traffic: the kernel's own
//! run-time accounting of each program (BPF_ENABLE_STATS) over a TCP and a
//! UDP workload: ns per invocation with warm caches and real skbs. The
//! cilium-style mode's programs are accounted the same way, found by the
//! ids its testbed kept when it loaded them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netd_tests::lease::vtep_mac_bytes as vtep_mac;
use netd_tests::{Cluster, NsRef, VXLAN_PORT, internet_checksum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bpf_map::enable_run_time_stats;
use super::report::percentile;
use super::testbed::{Mode, Testbed};
use super::workloads::{self, Workload};
use super::{Plan, check_interrupt, run_bounded, sh};

/// The test runs happen in the first netd mode of the plan (the programs
/// are the same in both); live costs are read in every netd mode.
pub fn runs_in(plan: &Plan, mode: Mode) -> bool {
    plan.modes.iter().find(|m| m.is_netd()) == Some(&mode)
}

/// Modes whose programs' live run time is measured: netd's, and the
/// cilium-style programs for comparison.
pub fn measures_live(mode: Mode) -> bool {
    mode.is_netd() || mode == Mode::CiliumStyle
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgRunResult {
    pub mode: String,
    pub repeat: u32,
    pub single_runs: u32,
    pub cases: Vec<ProgCase>,
    /// Per-program cost in live traffic.
    pub live: Vec<LiveCost>,
}

/// One program's run-time accounting over one workload on one host.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LiveCost {
    pub workload: String,
    pub host: usize,
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    /// The workload's own figure in that run (Gbit/s or kpps).
    pub workload_figure: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgCase {
    pub program: String,
    pub frame: String,
    pub frame_len: usize,
    /// What one run does to this frame: return code, output size, counters.
    pub first_retval: u32,
    pub first_out_len: usize,
    pub first_counters: BTreeMap<String, u64>,
    /// `repeat N` average, ns, and the counters the whole loop moved.
    pub loop_ns: f64,
    pub loop_out_len: usize,
    pub loop_counters: BTreeMap<String, u64>,
    /// `repeat 1` durations, ns (empty for re-fed cases).
    pub single_ns: Vec<f64>,
}

type Mac = [u8; 6];

/// What the frames are built from: host 0's view of the testbed.
struct Scene {
    ip0: Ipv4Addr,
    ip1: Ipv4Addr,
    c0_mac: Mac,
    c0_host_mac: Mac,
    c0_ifindex: u32,
    host0: Ipv4Addr,
    host1: Ipv4Addr,
    eth0_mac: Mac,
    host1_mac: Mac,
}

pub fn run(tb: &Testbed, plan: &Plan) -> Result<ProgRunResult> {
    let mut result = ProgRunResult {
        mode: tb.mode.name().to_string(),
        repeat: plan.prog_repeat,
        single_runs: plan.prog_single_runs,
        cases: Vec::new(),
        live: Vec::new(),
    };
    if runs_in(plan, tb.mode) {
        result.cases = test_runs(tb, plan)?;
    }
    result.live = live_costs(tb, plan)?;
    Ok(result)
}

fn test_runs(tb: &Testbed, plan: &Plan) -> Result<Vec<ProgCase>> {
    let cluster = tb.cluster().context("progrun needs a netd testbed")?;
    let scene = scene(cluster)?;
    let runner = Runner::new(cluster)?;
    let mut result = Vec::new();
    let full = 1450 - 20 - 20; // a full-size segment at the containers' MTU
    let cases = [
        (
            "from_container",
            "TCP segment, 1410 B payload, to a remote container",
            encap_frame(&scene, full),
            true,
        ),
        (
            "from_container",
            "TCP ACK, no payload, to a remote container",
            encap_frame(&scene, 0),
            true,
        ),
        (
            "tc_from_underlay",
            "VXLAN from a peer to a local container, 1410 B TCP inside",
            decap_frame(&scene, full),
            false,
        ),
        (
            "xdp_from_underlay",
            "VXLAN from a peer to a local container, 1410 B TCP inside",
            decap_frame(&scene, full),
            false,
        ),
    ];
    for (prog, label, frame, from_container) in cases {
        check_interrupt()?;
        let ifindex = from_container.then_some(scene.c0_ifindex);
        let case = runner.case(prog, label, &frame, ifindex, plan, true)?;
        let mut out = runner.last_output(prog, &frame, ifindex)?;
        if prog.starts_with("xdp") {
            // The XDP program's metadata (4 bytes) comes first in data_out.
            out.drain(..4.min(out.len()));
        }
        println!(
            "      {prog}: {label}: first run rc {} ({} → {} B), loop {:.1} ns, single median {} ns",
            case.first_retval,
            case.frame_len,
            case.first_out_len,
            case.loop_ns,
            percentile(&case.single_ns, 50.0).map_or("-".into(), |v| format!("{v:.0}"))
        );
        result.push(case);
        let refed = format!("re-fed output of: {label}");
        let case = runner.case(prog, &refed, &out, ifindex, plan, false)?;
        println!(
            "      {prog}: {refed}: loop {:.1} ns, counters {:?}",
            case.loop_ns, case.loop_counters
        );
        result.push(case);
    }
    Ok(result)
}

const PROGRAMS: [&str; 3] = ["from_container", "tc_from_underlay", "xdp_from_underlay"];

/// A program whose run-time accounting the live runs read.
struct Watched {
    host: usize,
    program: String,
    at: ProgRef,
}

/// How bpftool finds a program: netd pins its programs, the testbeds that
/// load their own keep the kernel ids.
enum ProgRef {
    Pinned(PathBuf),
    Id(u32),
}

/// netd's pinned programs on both hosts, or the ones the testbed loaded.
fn watched(tb: &Testbed) -> Result<Vec<Watched>> {
    if let Some(cluster) = tb.cluster() {
        let mut out = Vec::new();
        for host in 0..2 {
            let dir = Runner::prog_dir(cluster, host)?;
            for prog in PROGRAMS {
                out.push(Watched {
                    host,
                    program: prog.to_string(),
                    at: ProgRef::Pinned(dir.join(format!("prog_{prog}"))),
                });
            }
        }
        return Ok(out);
    }
    if tb.programs().is_empty() {
        bail!("{}: no BPF programs to watch", tb.mode.name());
    }
    Ok(tb
        .programs()
        .iter()
        .map(|p| Watched {
            host: p.host,
            program: p.name.to_string(),
            at: ProgRef::Id(p.id),
        })
        .collect())
}

/// `run_cnt`/`run_time_ns` of each watched program, by (host, program).
fn prog_stats(watched: &[Watched]) -> Result<BTreeMap<(usize, String), (u64, u64)>> {
    let mut out = BTreeMap::new();
    for w in watched {
        let mut cmd = std::process::Command::new("bpftool");
        cmd.args(["-j", "prog", "show"]);
        match &w.at {
            ProgRef::Pinned(path) => cmd.arg("pinned").arg(path),
            ProgRef::Id(id) => cmd.arg("id").arg(id.to_string()),
        };
        let out_json = run_bounded(cmd, Duration::from_secs(30))?;
        let v: Value = serde_json::from_slice(&out_json.stdout)?;
        let field = |k: &str| v[k].as_u64().unwrap_or(0);
        out.insert(
            (w.host, w.program.clone()),
            (field("run_cnt"), field("run_time_ns")),
        );
    }
    Ok(out)
}

/// Runs TCP (1 and 4 streams) and UDP workloads with run-time accounting on and reports
/// every program that ran.
fn live_costs(tb: &Testbed, plan: &Plan) -> Result<Vec<LiveCost>> {
    let watched = watched(tb)?;
    let _stats = enable_run_time_stats().context("BPF_ENABLE_STATS")?;
    let mut costs = Vec::new();
    for w in [Workload::Tcp1, Workload::Tcp4, Workload::Udp64] {
        check_interrupt()?;
        let before = prog_stats(&watched)?;
        let sample = workloads::run(tb, w, 1, plan)?;
        let after = prog_stats(&watched)?;
        let figure = match (sample.metrics.get("kpps"), sample.metrics.get("gbps")) {
            (Some(kpps), _) => format!("{kpps:.0} kpps"),
            (None, Some(gbps)) => format!("{gbps:.2} Gbit/s"),
            (None, None) => String::new(),
        };
        for ((host, prog), (runs, ns)) in &after {
            let (runs0, ns0) = before
                .get(&(*host, prog.clone()))
                .copied()
                .unwrap_or((0, 0));
            let (runs, ns) = (runs - runs0, ns - ns0);
            if runs == 0 {
                continue;
            }
            let cost = LiveCost {
                workload: w.name().to_string(),
                host: *host,
                program: prog.clone(),
                runs,
                run_time_ns: ns,
                ns_per_run: ns as f64 / runs as f64,
                workload_figure: figure.clone(),
            };
            println!(
                "      live {}: host {} {}: {} runs, {:.0} ns/run",
                cost.workload, cost.host, cost.program, cost.runs, cost.ns_per_run
            );
            costs.push(cost);
        }
    }
    Ok(costs)
}

fn scene(cluster: &Cluster) -> Result<Scene> {
    let status = cluster.status(0);
    let ep = &status["endpoints"][0];
    let mac = |v: &Value| parse_mac(v.as_str().unwrap_or(""));
    Ok(Scene {
        ip0: cluster.container(0).ip,
        ip1: cluster.container(1).ip,
        c0_mac: mac(&ep["mac"])?,
        c0_host_mac: mac(&ep["host_mac"])?,
        c0_ifindex: ep["host_ifindex"]
            .as_u64()
            .context("endpoint host_ifindex")? as u32,
        host0: cluster.host(0).ip(),
        host1: cluster.host(1).ip(),
        eth0_mac: link_mac(cluster.host(0).ns(), "eth0")?,
        host1_mac: link_mac(cluster.host(1).ns(), "eth0")?,
    })
}

fn link_mac(ns: &NsRef, iface: &str) -> Result<Mac> {
    let v: Value = serde_json::from_str(&sh(ns, &["ip", "-j", "link", "show", iface])?)?;
    parse_mac(v[0]["address"].as_str().unwrap_or(""))
}

fn parse_mac(s: &str) -> Result<Mac> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

struct Runner<'a> {
    cluster: &'a Cluster,
    dir: tempfile::TempDir,
    progs: PathBuf,
}

/// One bpftool run's result.
struct Ran {
    retval: u32,
    ns: f64,
    out: Vec<u8>,
}

impl<'a> Runner<'a> {
    fn new(cluster: &'a Cluster) -> Result<Self> {
        Ok(Runner {
            cluster,
            dir: tempfile::tempdir()?,
            progs: Self::prog_dir(cluster, 0)?,
        })
    }

    /// `<pin-path>/v<layout>/` of host `host`, whatever the layout version.
    fn prog_dir(cluster: &Cluster, host: usize) -> Result<PathBuf> {
        let pin = cluster.host(host).pin_path();
        std::fs::read_dir(pin)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("prog_from_container").exists())
            .with_context(|| format!("no pinned programs under {}", pin.display()))
    }

    fn case(
        &self,
        prog: &str,
        label: &str,
        frame: &[u8],
        ifindex: Option<u32>,
        plan: &Plan,
        singles: bool,
    ) -> Result<ProgCase> {
        let before = self.counters()?;
        let first = self.run(prog, frame, ifindex, 1)?;
        let after_first = self.counters()?;
        let looped = self.run(prog, frame, ifindex, plan.prog_repeat)?;
        let after_loop = self.counters()?;
        let mut single_ns = Vec::new();
        if singles {
            for _ in 0..plan.prog_single_runs {
                check_interrupt()?;
                single_ns.push(self.run(prog, frame, ifindex, 1)?.ns);
            }
        }
        Ok(ProgCase {
            program: prog.to_string(),
            frame: label.to_string(),
            frame_len: frame.len(),
            first_retval: first.retval,
            first_out_len: first.out.len(),
            first_counters: delta(&before, &after_first),
            loop_ns: looped.ns,
            loop_out_len: looped.out.len(),
            loop_counters: delta(&after_first, &after_loop),
            single_ns,
        })
    }

    /// The output of one run on `frame`.
    fn last_output(&self, prog: &str, frame: &[u8], ifindex: Option<u32>) -> Result<Vec<u8>> {
        Ok(self.run(prog, frame, ifindex, 1)?.out)
    }

    /// `bpftool prog run pinned PROG data_in … repeat N` in host 0.
    fn run(&self, prog: &str, frame: &[u8], ifindex: Option<u32>, repeat: u32) -> Result<Ran> {
        let (data_in, data_out) = (self.dir.path().join("in"), self.dir.path().join("out"));
        std::fs::write(&data_in, frame)?;
        let _ = std::fs::remove_file(&data_out);
        let ns = self.cluster.host(0).ns();
        let mut cmd = ns.command("bpftool");
        cmd.args(["prog", "run", "pinned"])
            .arg(self.progs.join(format!("prog_{prog}")))
            .arg("data_in")
            .arg(&data_in)
            .arg("data_out")
            .arg(&data_out)
            .args(["data_size_out", "4096"]);
        if let Some(ifindex) = ifindex {
            // struct __sk_buff up to ingress_ifindex (offset 36): the
            // packet arrives on the container's veth, as the spoofing
            // check requires.
            let mut ctx = vec![0u8; 40];
            ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
            let ctx_in = self.dir.path().join("ctx");
            std::fs::write(&ctx_in, ctx)?;
            cmd.arg("ctx_in").arg(ctx_in);
        }
        cmd.args(["repeat", &repeat.to_string()]);
        let out = run_bounded(cmd, Duration::from_secs(60))?;
        let text = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
        let (retval, ns) =
            parse_bpftool_run(&text).with_context(|| format!("bpftool said: {text}"))?;
        Ok(Ran {
            retval,
            ns,
            out: std::fs::read(&data_out).unwrap_or_default(),
        })
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>> {
        Ok(self.cluster.counters(0))
    }
}

/// `Return value: 7, duration (average): 52ns` → (7, 52.0).
fn parse_bpftool_run(text: &str) -> Result<(u32, f64)> {
    let line = text
        .lines()
        .find(|l| l.contains("Return value:"))
        .context("no 'Return value' line")?;
    let digits = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect()
    };
    let rest = line.split("Return value:").nth(1).unwrap_or("");
    let retval = digits(rest).parse()?;
    let Some(dur) = line.split("duration").nth(1) else {
        bail!("no duration in {line:?}");
    };
    let dur = dur.split(':').nth(1).unwrap_or("");
    Ok((retval, digits(dur).parse()?))
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, d)| *d != 0)
        .collect()
}

// Frames.

const ETH_P_IP: u16 = 0x0800;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn eth(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ETH_P_IP.to_be_bytes(), payload].concat()
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, df: bool, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let frag: u16 = if df { 0x4000 } else { 0 };
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A TCP ACK|PSH segment with `len` payload bytes (checksum left 0: the
/// programs do not read it).
fn tcp(len: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + len);
    t.extend_from_slice(&40000u16.to_be_bytes());
    t.extend_from_slice(&5201u16.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes());
    t.extend_from_slice(&[0x50, 0x18]);
    t.extend_from_slice(&502u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend((0..len).map(|i| i as u8));
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// Container 0 → container 1 (remote): what `from_container` encapsulates.
fn encap_frame(s: &Scene, payload: usize) -> Vec<u8> {
    eth(
        s.c0_host_mac,
        s.c0_mac,
        &ipv4(s.ip0, s.ip1, TCP, true, &tcp(payload)),
    )
}

/// Host 1's VXLAN carrying container 1 → container 0, as it arrives on
/// host 0's eth0: what the underlay programs decapsulate.
fn decap_frame(s: &Scene, payload: usize) -> Vec<u8> {
    let inner = eth(
        vtep_mac(s.host0),
        vtep_mac(s.host1),
        &ipv4(s.ip1, s.ip0, TCP, true, &tcp(payload)),
    );
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vxlan.extend_from_slice(&inner);
    eth(
        s.eth0_mac,
        s.host1_mac,
        &ipv4(
            s.host1,
            s.host0,
            UDP,
            false,
            &udp(41000, VXLAN_PORT, &vxlan),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_prog_run() {
        assert_eq!(
            parse_bpftool_run("Return value: 7, duration (average): 52ns\n").unwrap(),
            (7, 52.0)
        );
        assert_eq!(
            parse_bpftool_run("Return value: 2, duration: 1234ns").unwrap(),
            (2, 1234.0)
        );
        assert!(parse_bpftool_run("Error: failed").is_err());
    }

    fn scene() -> Scene {
        Scene {
            ip0: Ipv4Addr::new(10, 244, 1, 2),
            ip1: Ipv4Addr::new(10, 244, 2, 2),
            c0_mac: [2, 0, 0, 0, 0, 1],
            c0_host_mac: [2, 0, 0, 0, 0, 2],
            c0_ifindex: 5,
            host0: Ipv4Addr::new(198, 18, 0, 1),
            host1: Ipv4Addr::new(198, 18, 0, 2),
            eth0_mac: [2, 0, 0, 0, 0, 3],
            host1_mac: [2, 0, 0, 0, 0, 4],
        }
    }

    #[test]
    fn frames_have_full_size_and_valid_ip_headers() {
        let s = scene();
        let e = encap_frame(&s, 1410);
        assert_eq!(e.len(), 14 + 1450);
        assert_eq!(internet_checksum(&e[14..34]), 0);
        let d = decap_frame(&s, 1410);
        assert_eq!(d.len(), 14 + 1450 + 50);
        assert_eq!(internet_checksum(&d[14..34]), 0);
        assert_eq!(u16::from_be_bytes([d[36], d[37]]), VXLAN_PORT);
        assert_eq!(&d[50..56], &vtep_mac(s.host0));
    }
}
