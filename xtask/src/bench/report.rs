//! Turns [`Results`] into `bench.json` (every sample), `report.md` (a
//! table per figure with ratios to bare, routed and kernel-vxlan) and
//! `bench.png`; and says which figures a run failed to produce.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::Plan;
use super::chart;
use super::control_plane::ControlPlaneResult;
use super::progrun::ProgRunResult;
use super::results::{ModeResult, Results};
use super::testbed::Mode;

/// One reported figure: a metric of a workload.
pub struct Figure {
    pub workload: &'static str,
    pub metric: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Must be above zero: proof that the mode moved traffic.
    pub traffic: bool,
}

const fn fig(
    workload: &'static str,
    metric: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    traffic: bool,
) -> Figure {
    Figure {
        workload,
        metric,
        title,
        unit,
        higher_is_better,
        traffic,
    }
}

pub const FIGURES: &[Figure] = &[
    fig("tcp-1", "gbps", "TCP, 1 stream", "Gbit/s", true, true),
    fig(
        "tcp-1",
        "cpu_s_per_gbit",
        "CPU per Gbit/s, TCP 1 stream",
        "cores per Gbit/s",
        false,
        false,
    ),
    fig("tcp-4", "gbps", "TCP, 4 streams", "Gbit/s", true, true),
    fig(
        "tcp-4",
        "cpu_s_per_gbit",
        "CPU per Gbit/s, TCP 4 streams",
        "cores per Gbit/s",
        false,
        false,
    ),
    fig("udp-64", "kpps", "UDP 64 B, delivered", "kpps", true, true),
    fig(
        "udp-64",
        "cpu_ns_per_packet",
        "CPU per packet, UDP 64 B",
        "ns",
        false,
        false,
    ),
    fig(
        "udp-1400",
        "kpps",
        "UDP 1400 B, delivered",
        "kpps",
        true,
        true,
    ),
    fig(
        "udp-1400",
        "cpu_ns_per_packet",
        "CPU per packet, UDP 1400 B",
        "ns",
        false,
        false,
    ),
    fig(
        "rr",
        "rr_per_s",
        "TCP request/response, 64 B, one in flight",
        "transactions/s",
        true,
        true,
    ),
    fig("rr", "p50_us", "Round trip p50", "µs", false, true),
    fig("rr", "p99_us", "Round trip p99", "µs", false, true),
    fig(
        "rr",
        "cpu_us_per_rr",
        "CPU per transaction",
        "µs",
        false,
        false,
    ),
];

/// Median, min and max of a figure's samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(values: &[f64]) -> Option<Stats> {
    Some(Stats {
        median: percentile(values, 50.0)?,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        n: values.len(),
    })
}

/// Nearest-rank percentile (the median of an even count averages the two
/// middle values).
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    if p == 50.0 && v.len().is_multiple_of(2) {
        let i = v.len() / 2;
        return Some((v[i - 1] + v[i]) / 2.0);
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn figure_stats(results: &Results, mode: Mode, f: &Figure) -> Option<Stats> {
    let m = results.modes.iter().find(|m| m.mode == mode)?;
    stats(&m.values(f.workload, f.metric))
}

pub fn write(out: &Path, results: &Results, font: &'static [u8]) -> Result<()> {
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(out.join("bench.json"), json).context("write bench.json")?;
    std::fs::write(out.join("report.md"), markdown(results)).context("write report.md")?;
    if !results.modes.is_empty() {
        chart::draw(&out.join("bench.png"), results, font).context("draw bench.png")?;
    }
    Ok(())
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# netd benchmark results\n");
    machine_section(&mut s, r);
    goals_section(&mut s, r);
    for f in FIGURES {
        figure_table(&mut s, r, f);
    }
    if let Some(p) = r.progrun() {
        progrun_section(&mut s, p);
    }
    for p in r.modes.iter().filter_map(|m| m.progrun.as_ref()) {
        live_section(&mut s, p);
    }
    if let Some(p) = &r.policy {
        super::policy_report::markdown(&mut s, p);
    }
    if !r.control_plane.is_empty() {
        control_plane_section(&mut s, &r.control_plane);
    }
    path_section(&mut s, &r.modes);
    if !r.errors.is_empty() || r.modes.iter().any(|m| !m.errors.is_empty()) {
        let _ = writeln!(s, "## Errors\n");
        for e in &r.errors {
            let _ = writeln!(s, "- {e}");
        }
        for m in &r.modes {
            for e in &m.errors {
                let _ = writeln!(s, "- {}: {e}", m.mode.name());
            }
        }
        s.push('\n');
    }
    s
}

fn machine_section(s: &mut String, r: &Results) {
    let m = &r.meta.machine;
    let _ = writeln!(
        s,
        "- machine: {} × {}, {:.1} GiB, kernel {}; load average at start {}",
        m.cores,
        m.cpu_model,
        m.mem_total_kib as f64 / 1048576.0,
        m.kernel,
        m.load_avg_at_start
    );
    let tools: Vec<String> = r
        .meta
        .tools
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(s, "- tools: {}", tools.join("; "));
    let _ = writeln!(s, "- netd commit: {}", r.meta.netd_commit);
    let _ = writeln!(
        s,
        "- command: `{}`; {} repetition(s) of {} s per workload (iperf3 omits the first {} s)",
        r.meta.command, r.meta.reps, r.meta.seconds, r.meta.omit_seconds
    );
    let _ = writeln!(
        s,
        "- ratios divide medians; \"other load\" is the most cores found busy with \
         other work just before a run of that workload (full runs wait up to 30 s for \
         it to drop below 0.25): the machine is shared, so high values mark figures \
         measured against competing load\n"
    );
}

fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: Option<Stats>, b: Option<Stats>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => format!("{:.2}×", a.median / b.median),
        _ => "-".into(),
    }
}

fn figure_table(s: &mut String, r: &Results, f: &Figure) {
    let better = if f.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let _ = writeln!(s, "## {} ({}; {better})\n", f.title, f.unit);
    let _ = writeln!(
        s,
        "| mode | median | min | max | n | ÷ bare | ÷ routed | ÷ kernel-vxlan | other load |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let base = |m| figure_stats(r, m, f);
    let (bare, routed, kvx) = (
        base(Mode::Bare),
        base(Mode::Routed),
        base(Mode::KernelVxlan),
    );
    for m in &r.modes {
        let st = figure_stats(r, m.mode, f);
        let cell = |pick: fn(&Stats) -> f64| st.as_ref().map_or("-".into(), |x| fmt_value(pick(x)));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.mode.name(),
            cell(|x| x.median),
            cell(|x| x.min),
            cell(|x| x.max),
            st.map_or(0, |x| x.n),
            ratio(st, bare),
            ratio(st, routed),
            ratio(st, kvx),
            other_load(m, f.workload)
        );
    }
    s.push('\n');
}

/// The most background load (cores busy before a run) any of the
/// workload's runs started with.
fn other_load(m: &ModeResult, workload: &str) -> String {
    m.samples
        .iter()
        .filter(|s| s.workload == workload)
        .map(|s| s.background_cores)
        .fold(None, |acc: Option<f64>, x| {
            Some(acc.map_or(x, |a| a.max(x)))
        })
        .map_or("-".into(), |x| format!("{x:.2}"))
}

/// The goals, each with the figure from this run and whether it is met.
fn goals_section(s: &mut String, r: &Results) {
    let _ = writeln!(s, "## Goals\n");
    let _ = writeln!(s, "| goal | this run | met |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let get = |mode, workload, metric| {
        let f = FIGURES
            .iter()
            .find(|f| f.workload == workload && f.metric == metric)?;
        figure_stats(r, mode, f).map(|x| x.median)
    };
    for netd in [Mode::NetdTc, Mode::NetdXdp] {
        let n = netd.name();
        let q = |w, m, base: Mode| Some(get(netd, w, m)? / get(base, w, m)?);
        goal(
            s,
            &format!("{n}: TCP 1 stream ≥ 0.95× routed"),
            q("tcp-1", "gbps", Mode::Routed),
            |x| x >= 0.95,
        );
        goal(
            s,
            &format!("{n}: TCP 1 stream ≥ 1.3× kernel-vxlan"),
            q("tcp-1", "gbps", Mode::KernelVxlan),
            |x| x >= 1.3,
        );
        goal(
            s,
            &format!("{n}: RR rate ≥ 1.5× kernel-vxlan"),
            q("rr", "rr_per_s", Mode::KernelVxlan),
            |x| x >= 1.5,
        );
        goal(
            s,
            &format!("{n}: RR p99 ≤ 1.10× routed"),
            q("rr", "p99_us", Mode::Routed),
            |x| x <= 1.10,
        );
        goal(
            s,
            &format!("{n}: CPU per Gbit/s (TCP 1) ≤ 1.1× routed"),
            q("tcp-1", "cpu_s_per_gbit", Mode::Routed),
            |x| x <= 1.1,
        );
    }
    let at = |n: usize| r.control_plane.iter().find(|c| c.leases == n);
    let join99 = at(5000).and_then(|c| percentile(&c.join_ms, 99.0));
    goal_abs(
        s,
        "join-to-programmed p99 < 100 ms at 5,000 hosts",
        join99,
        "ms",
        |x| x < 100.0,
    );
    let sync = at(10000).map(|c| c.start_to_synced_s);
    goal_abs(
        s,
        "full sync of 10,000 leases < 1 s (daemon start to a full map)",
        sync,
        "s",
        |x| x < 1.0,
    );
    let rss = at(10000)
        .map(|c| c.daemon_after_removals.rss_kib.max(c.daemon_synced.rss_kib) as f64 / 1024.0);
    goal_abs(s, "RSS < 50 MiB at 10,000 peers", rss, "MiB", |x| x < 50.0);
    s.push('\n');
}

fn goal(s: &mut String, what: &str, ratio: Option<f64>, ok: fn(f64) -> bool) {
    let (value, met) = match ratio {
        Some(x) if x.is_finite() => (format!("{x:.2}×"), if ok(x) { "yes" } else { "no" }),
        _ => ("-".into(), "not measured"),
    };
    let _ = writeln!(s, "| {what} | {value} | {met} |");
}

fn goal_abs(s: &mut String, what: &str, v: Option<f64>, unit: &str, ok: fn(f64) -> bool) {
    let (value, met) = match v {
        Some(x) if x.is_finite() => (
            format!("{} {unit}", fmt_value(x)),
            if ok(x) { "yes" } else { "no" },
        ),
        _ => ("-".into(), "not measured"),
    };
    let _ = writeln!(s, "| {what} | {value} | {met} |");
}

fn progrun_section(s: &mut String, p: &ProgRunResult) {
    let _ = writeln!(
        s,
        "## BPF_PROG_TEST_RUN ({}; loop = `repeat {}` average, single = {} runs of `repeat 1`)\n",
        p.mode, p.repeat, p.single_runs
    );
    let _ = writeln!(
        s,
        "| program | frame | first run: rc, bytes in → out, counters | loop ns | loop: counters | single ns median (min) |"
    );
    let _ = writeln!(s, "| --- | --- | --- | ---: | --- | ---: |");
    for c in &p.cases {
        let single = match (
            percentile(&c.single_ns, 50.0),
            percentile(&c.single_ns, 0.0),
        ) {
            (Some(med), Some(min)) => format!("{med:.0} ({min:.0})"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}, {} → {}, {} | {:.1} | {} | {} |",
            c.program,
            c.frame,
            c.first_retval,
            c.frame_len,
            c.first_out_len,
            counters(&c.first_counters),
            c.loop_ns,
            counters(&c.loop_counters),
            single
        );
    }
    s.push('\n');
}

fn live_section(s: &mut String, p: &ProgRunResult) {
    if p.live.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### Programs in live traffic (BPF_ENABLE_STATS run time, {})\n",
        p.mode
    );
    let _ = writeln!(s, "| workload | host | program | runs | ns per run |");
    let _ = writeln!(s, "| --- | ---: | --- | ---: | ---: |");
    for l in &p.live {
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {:.0} |",
            l.workload, l.workload_figure, l.host, l.program, l.runs, l.ns_per_run
        );
    }
    s.push('\n');
}

fn counters(c: &std::collections::BTreeMap<String, u64>) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k} +{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn control_plane_section(s: &mut String, cps: &[ControlPlaneResult]) {
    let _ = writeln!(
        s,
        "## Control plane (one daemon, simulated remote leases in etcd)\n"
    );
    let _ = writeln!(
        s,
        "| leases | etcd write s | start → running s | start → map full s | join p50 / p99 / max ms (lost) | joins/s kept up | put p50 ms | removal p50 / p99 ms (lost) | RSS MiB (peak) | daemon CPU s at sync | CPU ms per join | SUBNETS / PEERS KiB | status s |"
    );
    let _ = writeln!(
        s,
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | --- | ---: |"
    );
    for c in cps {
        let p = |v: &[f64], q: f64| percentile(v, q).map_or("-".into(), fmt_value);
        let join_cpu =
            (c.daemon_after_joins.cpu_s - c.daemon_synced.cpu_s) * 1e3 / c.joins.max(1) as f64;
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.3} | {:.3} | {} / {} / {} ({}) | {:.1} | {} | {} / {} ({}) | {:.1} ({:.1}) | {:.2} | {:.1} | {} / {} | {:.2} |",
            c.leases,
            c.etcd_write_s,
            c.start_to_running_s,
            c.start_to_synced_s,
            p(&c.join_ms, 50.0),
            p(&c.join_ms, 99.0),
            p(&c.join_ms, 100.0),
            c.join_lost,
            c.join_ms.len() as f64 / c.joins_drained_s.max(1e-9),
            p(&c.put_ms, 50.0),
            p(&c.removal_ms, 50.0),
            p(&c.removal_ms, 99.0),
            c.removal_lost,
            c.daemon_after_removals.rss_kib as f64 / 1024.0,
            c.daemon_after_removals.rss_peak_kib as f64 / 1024.0,
            c.daemon_synced.cpu_s,
            join_cpu,
            c.subnets_memlock / 1024,
            c.peers_memlock / 1024,
            c.status_s
        );
    }
    s.push('\n');
}

/// Offloads worth a glance; `bench.json` has every one.
const KEY_OFFLOADS: &[(&str, &str)] = &[
    ("tcp-segmentation-offload", "tso"),
    ("generic-segmentation-offload", "gso"),
    ("generic-receive-offload", "gro"),
    ("tx-checksumming", "tx-csum"),
    ("tx-udp_tnl-segmentation", "udp-tnl-seg"),
];

fn path_section(s: &mut String, modes: &[ModeResult]) {
    let _ = writeln!(
        s,
        "## Interfaces per mode (MTU, key offloads; all of `ethtool -k` in bench.json)\n"
    );
    for m in modes {
        let _ = writeln!(s, "- **{}** ({}):", m.mode.name(), m.description);
        for i in &m.path.interfaces {
            let offloads: Vec<String> = KEY_OFFLOADS
                .iter()
                .map(|(k, short)| {
                    let v = i
                        .offloads
                        .get(*k)
                        .map_or("-", |v| v.split_whitespace().next().unwrap_or("-"));
                    format!("{short} {v}")
                })
                .collect();
            let xdp = if i.xdp.is_some() { ", xdp" } else { "" };
            let _ = writeln!(
                s,
                "  - {} {} ({}{xdp}) mtu {}: {}",
                i.role,
                i.ifname,
                if i.kind.is_empty() { "-" } else { &i.kind },
                i.mtu,
                offloads.join(", ")
            );
        }
    }
    s.push('\n');
}

/// Every figure the plan asked for that is missing, or zero where it
/// proves traffic moved.
pub fn missing_figures(plan: &Plan, r: &Results) -> Vec<String> {
    let mut missing = Vec::new();
    for &mode in &plan.modes {
        let Some(m) = r.modes.iter().find(|m| m.mode == mode) else {
            missing.push(format!("{}: not measured", mode.name()));
            continue;
        };
        for f in FIGURES {
            let v = m.values(f.workload, f.metric);
            let ok = !v.is_empty() && (!f.traffic || v.iter().any(|&x| x > 0.0));
            if !ok {
                missing.push(format!("{}: {} {}", mode.name(), f.workload, f.metric));
            }
        }
    }
    if plan.modes.iter().any(|m| m.is_netd()) {
        match r.progrun() {
            None => missing.push("BPF_PROG_TEST_RUN figures".into()),
            Some(p) => {
                for c in p
                    .cases
                    .iter()
                    .filter(|c| c.loop_ns <= 0.0 || c.first_out_len == 0)
                {
                    missing.push(format!("prog run {}: {}", c.program, c.frame));
                }
                if p.cases.len() < 8 {
                    missing.push(format!("prog run: {} of 8 cases", p.cases.len()));
                }
            }
        }
    }
    for m in r.modes.iter().filter(|m| m.mode.is_netd()) {
        for prog in ["from_container", "_from_underlay"] {
            let live = m.progrun.as_ref().map_or(&[][..], |p| &p.live[..]);
            if !live
                .iter()
                .any(|l| l.program.contains(prog) && l.ns_per_run > 0.0)
            {
                missing.push(format!("{}: live run time of {prog}", m.mode.name()));
            }
        }
    }
    if plan.policy {
        missing.extend(super::policy_report::missing(r.policy.as_ref()));
    }
    for &n in &plan.lease_counts {
        match r.control_plane.iter().find(|c| c.leases == n) {
            None => missing.push(format!("control plane at {n} leases")),
            Some(c) => {
                if c.map_entries != n || c.status_peers != n {
                    missing.push(format!(
                        "control plane at {n}: map {} / status {} entries",
                        c.map_entries, c.status_peers
                    ));
                }
                if c.join_ms.is_empty() || c.join_lost > 0 {
                    missing.push(format!(
                        "control plane at {n}: {} of {} joins programmed",
                        c.join_ms.len(),
                        c.joins
                    ));
                }
                if c.removal_ms.is_empty() || c.removal_lost > 0 {
                    missing.push(format!(
                        "control plane at {n}: {} of {} removals seen",
                        c.removal_ms.len(),
                        c.joins
                    ));
                }
                if c.daemon_synced.rss_kib == 0 || c.subnets_memlock == 0 {
                    missing.push(format!("control plane at {n}: RSS or map memory"));
                }
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_median() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.5));
        assert_eq!(percentile(&v, 99.0), Some(5.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let st = stats(&v).unwrap();
        assert_eq!((st.min, st.max, st.n), (1.0, 5.0, 5));
    }

    #[test]
    fn ratios_need_both_sides() {
        let a = stats(&[2.0]);
        assert_eq!(ratio(a, stats(&[4.0])), "0.50×");
        assert_eq!(ratio(a, None), "-");
    }
}
