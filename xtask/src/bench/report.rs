//! Turns [`Results`] into `bench.json` (every sample), `report.md` (a
//! table per figure with ratios to bare, routed and kernel-vxlan) and
//! `bench.png`; and says which figures a run failed to produce.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::Plan;
use super::chart;
use super::progrun::ProgRunResult;
use super::results::{ModeResult, Results};
use super::testbed::Mode;
use super::workloads::Variant;

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

/// Median, p10, p90, min and max of a figure's samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(values: &[f64]) -> Option<Stats> {
    Some(Stats {
        median: percentile(values, 50.0)?,
        p10: percentile(values, 10.0)?,
        p90: percentile(values, 90.0)?,
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

pub fn figure_stats(results: &Results, mode: Mode, f: &Figure, v: Variant) -> Option<Stats> {
    metric_stats(results, mode, f.workload, f.metric, v)
}

pub fn metric_stats(
    results: &Results,
    mode: Mode,
    workload: &str,
    metric: &str,
    v: Variant,
) -> Option<Stats> {
    let m = results.modes.iter().find(|m| m.mode == mode)?;
    stats(&m.values_in(workload, metric, v))
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
    for w in ["tcp-1", "tcp-4", "udp-64"] {
        per_cpu_section(&mut s, r, w);
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
        super::control_plane::section(&mut s, &r.control_plane);
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
        "- command: `{}`; {} round(s), each mode once per round in a rotated order, \
         {} run(s) of {} s per workload and variant per round (iperf3 omits the first {} s); \
         took {}",
        r.meta.command,
        r.meta.rounds.max(1),
        r.meta.reps,
        r.meta.seconds,
        r.meta.omit_seconds,
        super::progress::clock(r.meta.finished_unix.saturating_sub(r.meta.started_unix) as f64)
    );
    for (i, order) in r.meta.round_orders.iter().enumerate() {
        let _ = writeln!(s, "  - round {}: {}", i + 1, order.join(" → "));
    }
    let _ = writeln!(
        s,
        "- variants: placement pinned (client on core 0, server on core 1) or unpinned \
         (the scheduler's choice); GRO on or off on every container's `eth0` in every \
         container mode (bare has no containers)"
    );
    let _ = writeln!(
        s,
        "- spread: p10–p90 and min–max across rounds; ratios divide medians of the same \
         variant; \"cpuN busy / softirq\" is the median share of each core busy and in \
         softirq over the runs (machine-wide, other load included); \"backlog drops\" \
         sums `/proc/net/softnet_stat` drops over the runs; \"other load\" is the most \
         cores found busy with other work just before a run (full runs wait up to 1 s \
         for it to drop below 0.25)\n"
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
    if !r
        .modes
        .iter()
        .any(|m| m.samples.iter().any(|x| x.workload == f.workload))
    {
        return;
    }
    let _ = writeln!(s, "## {} ({}; {better})\n", f.title, f.unit);
    let _ = writeln!(
        s,
        "| mode | variant | median | p10–p90 | min–max | n | ÷ routed | ÷ kernel-vxlan | cpu busy % | cpu softirq % | backlog drops | other load |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for v in r.variants() {
        let base = |m| figure_stats(r, m, f, v);
        let (routed, kvx) = (base(Mode::Routed), base(Mode::KernelVxlan));
        for m in &r.modes {
            let st = figure_stats(r, m.mode, f, v);
            let range = |a: fn(&Stats) -> f64, b: fn(&Stats) -> f64| {
                st.as_ref().map_or("-".into(), |x| {
                    format!("{}–{}", fmt_value(a(x)), fmt_value(b(x)))
                })
            };
            let drops: f64 = m
                .samples_in(f.workload, v)
                .filter_map(|x| x.metrics.get("softnet_drops"))
                .sum();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
                m.mode.name(),
                variant_label(m.mode, v),
                st.as_ref().map_or("-".into(), |x| fmt_value(x.median)),
                range(|x| x.p10, |x| x.p90),
                range(|x| x.min, |x| x.max),
                st.map_or(0, |x| x.n),
                ratio(st, routed),
                ratio(st, kvx),
                per_cpu(r, m, f.workload, v, "busy"),
                per_cpu(r, m, f.workload, v, "softirq"),
                drops,
                other_load(m, f.workload, v)
            );
        }
    }
    s.push('\n');
}

/// `placement, GRO x`, or only the placement where there are no containers.
fn variant_label(mode: Mode, v: Variant) -> String {
    if super::results::has_containers(mode) {
        v.label()
    } else {
        format!("{}, no containers", v.placement.name())
    }
}

/// Median `cpuN_<what>_pct` of each CPU over the runs, as `a / b`.
fn per_cpu(r: &Results, m: &ModeResult, workload: &str, v: Variant, what: &str) -> String {
    let cpus = r.meta.machine.cores.max(1);
    let cells: Vec<String> = (0..cpus)
        .map(|i| {
            metric_stats(r, m.mode, workload, &format!("cpu{i}_{what}_pct"), v)
                .map_or("-".into(), |x| format!("{:.0}", x.median))
        })
        .collect();
    cells.join(" / ")
}

/// The most background load (cores busy before a run) any of the
/// workload's runs started with.
fn other_load(m: &ModeResult, workload: &str, v: Variant) -> String {
    m.samples_in(workload, v)
        .map(|s| s.background_cores)
        .fold(None, |acc: Option<f64>, x| {
            Some(acc.map_or(x, |a| a.max(x)))
        })
        .map_or("-".into(), |x| format!("{x:.2}"))
}

/// Where a workload's work landed, per CPU: busy, system (+irq) and
/// softirq shares of each core, network softirqs raised and packets the
/// backlog and NAPI polls processed per second, polls squeezed, drops.
fn per_cpu_section(s: &mut String, r: &Results, workload: &str) {
    if !r
        .modes
        .iter()
        .any(|m| m.samples.iter().any(|x| x.workload == workload))
    {
        return;
    }
    let cpus = r.meta.machine.cores.max(1);
    let _ = writeln!(
        s,
        "## Where the work lands, {workload} (medians over the runs; per CPU `cpu0 / cpu1 …`)\n"
    );
    let _ = writeln!(
        s,
        "| mode | variant | busy % | system+irq % | softirq % | NET_RX k/s | softnet processed k/s | squeezed/s | backlog drops | receiver skbs per ACK |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: |"
    );
    for v in r.variants() {
        for m in &r.modes {
            let samples: Vec<_> = m.samples_in(workload, v).collect();
            if samples.is_empty() {
                continue;
            }
            let col = |f: &dyn Fn(&super::cpu::CpuDelta, usize) -> Option<f64>, digits: usize| {
                (0..cpus)
                    .map(|i| {
                        let vals: Vec<f64> = samples.iter().filter_map(|x| f(&x.cpu, i)).collect();
                        percentile(&vals, 50.0).map_or("-".into(), |x| format!("{x:.digits$}"))
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let rate = |c: &super::cpu::CpuDelta, x: u64| {
                (c.wall_s > 0.0).then(|| x as f64 / c.wall_s / 1e3)
            };
            let drops: u64 = samples
                .iter()
                .flat_map(|x| x.cpu.softnet.iter().map(|c| c.dropped))
                .sum();
            let per_ack: Vec<f64> = samples
                .iter()
                .filter_map(|x| skbs_per_ack(&x.raw))
                .collect();
            let per_ack = percentile(&per_ack, 50.0).map_or("-".into(), |x| format!("{x:.1}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {drops} | {per_ack} |",
                m.mode.name(),
                variant_label(m.mode, v),
                col(&|c, i| c.busy_share(i).map(|x| x * 100.0), 0),
                col(&|c, i| c.system_share(i).map(|x| x * 100.0), 0),
                col(&|c, i| c.softirq_share(i).map(|x| x * 100.0), 0),
                col(&|c, i| rate(c, *c.net_softirqs.get("NET_RX")?.get(i)?), 1),
                col(&|c, i| rate(c, c.softnet.get(i)?.processed), 0),
                col(
                    &|c, i| rate(c, c.softnet.get(i)?.time_squeeze).map(|x| x * 1e3),
                    0
                ),
            );
        }
    }
    s.push('\n');
}

/// TCP segments (skbs, after GRO) the receiver took in per segment it sent
/// back, from its `Tcp` counters: how often it acknowledged. Every ACK
/// crosses the whole path in the other direction.
fn skbs_per_ack(raw: &serde_json::Value) -> Option<f64> {
    let server = &raw["tcp_counters"]["server"];
    let (data, acks) = (
        server["Tcp.InSegs"].as_f64()?,
        server["Tcp.OutSegs"].as_f64()?,
    );
    (acks > 0.0).then(|| data / acks)
}

/// The goals, each with the figure from this run and whether it is met.
fn goals_section(s: &mut String, r: &Results) {
    let _ = writeln!(s, "## Goals\n");
    let primary = r.primary();
    let _ = writeln!(s, "Figures of the {} runs.\n", primary.label());
    let _ = writeln!(s, "| goal | this run | met |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let get = |mode, workload, metric| {
        let f = FIGURES
            .iter()
            .find(|f| f.workload == workload && f.metric == metric)?;
        figure_stats(r, mode, f, primary).map(|x| x.median)
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
    for g in super::control_plane::goals(&r.control_plane) {
        let met = match g.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        let value = g.value.as_deref().unwrap_or("-");
        let _ = writeln!(s, "| {} | {value} | {met} |", g.what);
    }
    s.push('\n');
}

fn goal(s: &mut String, what: &str, ratio: Option<f64>, ok: fn(f64) -> bool) {
    let (value, met) = match ratio {
        Some(x) if x.is_finite() => (format!("{x:.2}×"), if ok(x) { "yes" } else { "no" }),
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
        let ran = |w: &str| plan.workloads.iter().any(|x| x.name() == w);
        for variant in plan.variants(0) {
            for f in FIGURES.iter().filter(|f| ran(f.workload)) {
                let v = m.values_in(f.workload, f.metric, variant);
                let ok = !v.is_empty() && (!f.traffic || v.iter().any(|&x| x > 0.0));
                if !ok {
                    missing.push(format!(
                        "{} ({}): {} {}",
                        mode.name(),
                        variant.label(),
                        f.workload,
                        f.metric
                    ));
                }
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
            Some(c) => missing.extend(super::control_plane::missing(n, c)),
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
        assert_eq!((st.p10, st.p90), (1.0, 5.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let st = stats(&ten).unwrap();
        assert_eq!((st.p10, st.median, st.p90), (1.0, 5.5, 9.0));
    }

    #[test]
    fn ratios_need_both_sides() {
        let a = stats(&[2.0]);
        assert_eq!(ratio(a, stats(&[4.0])), "0.50×");
        assert_eq!(ratio(a, None), "-");
    }
}
