//! Turns [`Results`] into `bench.json` (every sample), `report.md` (a
//! table per figure with ratios to bare, routed and kernel-vxlan) and
//! `bench.png`; and says which figures a run failed to produce.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::Plan;
use super::chart;
use super::progrun::{ProgRunResult, measures_live};
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

/// The mode the data-plane goals are about.
const NETD: Mode = Mode::NetdTc;

/// Goal 1: figures (workload, metric) on which netd must be at least as
/// good as each of [`PEERS`]: a ratio of ≥ 1× where higher is better,
/// ≤ 1× where lower is.
const PEER_FIGURES: &[(&str, &str)] = &[
    ("tcp-1", "gbps"),
    ("tcp-4", "gbps"),
    ("udp-64", "kpps"),
    ("udp-1400", "kpps"),
    ("rr", "rr_per_s"),
    ("rr", "p50_us"),
    ("rr", "p99_us"),
    ("tcp-1", "cpu_s_per_gbit"),
    ("tcp-4", "cpu_s_per_gbit"),
    ("udp-64", "cpu_ns_per_packet"),
];
const PEERS: [Mode; 2] = [Mode::KernelVxlan, Mode::CiliumStyle];

/// Goal 2: netd over the bare underlay, (workload, metric, bound); the
/// figure's direction says whether the bound is a floor or a ceiling.
const BARE_GOALS: &[(&str, &str, f64)] = &[
    ("tcp-1", "gbps", 0.97),
    ("udp-64", "kpps", 0.8),
    ("rr", "p50_us", 1.03),
];

/// Goal 3: ns per run of a netd program in live udp-64 traffic, on the
/// host whose copy of it handled (nearly) every packet, with the
/// cilium-style program that does that side's work.
struct LiveGoal {
    what: &'static str,
    program: &'static str,
    host: usize,
    max_ns: f64,
    cilium_program: &'static str,
}

const LIVE_GOALS: [LiveGoal; 2] = [
    LiveGoal {
        what: "encapsulation",
        program: "from_container",
        host: 0,
        max_ns: 150.0,
        cilium_program: "from_container",
    },
    LiveGoal {
        what: "decapsulation",
        program: "tc_from_underlay",
        host: 1,
        max_ns: 100.0,
        cilium_program: "from_overlay",
    },
];

/// A goal's bound on a figure.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    /// `x`'s bound in the figure's better direction.
    fn for_figure(f: &Figure, x: f64) -> Bound {
        if f.higher_is_better {
            Bound::AtLeast(x)
        } else {
            Bound::AtMost(x)
        }
    }

    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtLeast(b) => v >= b,
            Bound::AtMost(b) => v <= b,
        }
    }

    fn label(self, unit: &str) -> String {
        match self {
            Bound::AtLeast(b) => format!("≥ {b}{unit}"),
            Bound::AtMost(b) => format!("≤ {b}{unit}"),
        }
    }
}

/// A goal checked against this run: the value, if measured.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Met(f64),
    Unmet(f64),
    NotMeasured,
}

impl Verdict {
    fn of(value: Option<f64>, bound: Bound) -> Verdict {
        match value {
            Some(v) if v.is_finite() && bound.holds(v) => Verdict::Met(v),
            Some(v) if v.is_finite() => Verdict::Unmet(v),
            _ => Verdict::NotMeasured,
        }
    }

    /// `1.04× ✓`: a ratio with as many digits as it takes for the shown
    /// value to agree with the verdict (0.996 is not `1.00× ✗`).
    fn ratio_cell(self, bound: Bound) -> String {
        match self {
            Verdict::NotMeasured => "not measured".into(),
            Verdict::Met(v) | Verdict::Unmet(v) => {
                let met = matches!(self, Verdict::Met(_));
                let mut shown = format!("{v:.2}");
                if shown.parse().is_ok_and(|x: f64| bound.holds(x) != met) {
                    shown = format!("{v:.3}");
                }
                format!("{shown}× {}", if met { "✓" } else { "✗" })
            }
        }
    }
}

/// How many goals were met, missed and not measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tally {
    met: usize,
    unmet: usize,
    not_measured: usize,
}

impl Tally {
    fn add(&mut self, v: Verdict) -> Verdict {
        match v {
            Verdict::Met(_) => self.met += 1,
            Verdict::Unmet(_) => self.unmet += 1,
            Verdict::NotMeasured => self.not_measured += 1,
        }
        v
    }
}

fn find_figure(workload: &str, metric: &str) -> Option<&'static Figure> {
    FIGURES
        .iter()
        .find(|f| f.workload == workload && f.metric == metric)
}

/// The placements measured, each with the GRO setting of the chart.
fn goal_variants(r: &Results) -> Vec<Variant> {
    let gro = r.primary().gro;
    r.variants().into_iter().filter(|v| v.gro == gro).collect()
}

/// netd's median over `peer`'s in variant `v`.
fn netd_ratio(r: &Results, f: &Figure, peer: Mode, v: Variant) -> Option<f64> {
    let netd = figure_stats(r, NETD, f, v)?.median;
    let peer = figure_stats(r, peer, f, v)?.median;
    (peer != 0.0).then(|| netd / peer)
}

/// `(ns per run, runs)` of `program` on `host` in `mode`'s live runs of
/// `workload`.
fn live_cost(
    r: &Results,
    mode: Mode,
    workload: &str,
    host: usize,
    program: &str,
) -> Option<(f64, u64)> {
    let p = r.modes.iter().find(|m| m.mode == mode)?.progrun.as_ref()?;
    p.live
        .iter()
        .find(|l| l.workload == workload && l.host == host && l.program == program && l.runs > 0)
        .map(|l| (l.ns_per_run, l.runs))
}

fn live_cell(c: Option<(f64, u64)>) -> String {
    c.map_or("not measured".into(), |(ns, runs)| {
        format!("{ns:.0} ns ({runs} runs)")
    })
}

/// The goals, each with the figure from this run and whether it is met.
fn goals_section(s: &mut String, r: &Results) {
    let _ = writeln!(s, "## Goals\n");
    let variants = goal_variants(r);
    let gro = r.primary().gro.name();
    let mut tally = Tally::default();
    let _ = writeln!(
        s,
        "A ratio divides {}'s median by the peer's, in the same placement, GRO {gro} \
         (the chart's), for each placement measured; ✓ met, ✗ not met; a figure the \
         run lacks is not measured, never met.\n",
        NETD.name()
    );
    peer_goals(s, r, &variants, &mut tally);
    bare_goals(s, r, &variants, &mut tally);
    live_goals(s, r, &mut tally);
    let _ = writeln!(
        s,
        "Data-plane goals: {} met, {} not met, {} not measured.\n",
        tally.met, tally.unmet, tally.not_measured
    );
    let _ = writeln!(s, "| goal | this run | met |");
    let _ = writeln!(s, "| --- | --- | --- |");
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

/// Goal 1: a row per figure, a column per (peer, placement).
fn peer_goals(s: &mut String, r: &Results, variants: &[Variant], tally: &mut Tally) {
    let _ = writeln!(
        s,
        "**{} at least as good as {} on every figure**\n",
        NETD.name(),
        PEERS.map(Mode::name).join(" and ")
    );
    let mut head = "| figure | goal |".to_string();
    let mut rule = "| --- | --- |".to_string();
    for peer in PEERS {
        for v in variants {
            let _ = write!(head, " ÷ {}, {} |", peer.name(), v.placement.name());
            rule.push_str(" ---: |");
        }
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for f in PEER_FIGURES.iter().filter_map(|&(w, m)| find_figure(w, m)) {
        let bound = Bound::for_figure(f, 1.0);
        let _ = write!(s, "| {} ({}) | {} |", f.title, f.unit, bound.label("×"));
        for peer in PEERS {
            for &v in variants {
                let verdict = tally.add(Verdict::of(netd_ratio(r, f, peer, v), bound));
                let _ = write!(s, " {} |", verdict.ratio_cell(bound));
            }
        }
        s.push('\n');
    }
    s.push('\n');
}

/// Goal 2: a row per figure, a column per placement.
fn bare_goals(s: &mut String, r: &Results, variants: &[Variant], tally: &mut Tally) {
    let _ = writeln!(
        s,
        "**{} close to the bare underlay (no containers)**\n",
        NETD.name()
    );
    let mut head = "| figure | goal |".to_string();
    let mut rule = "| --- | --- |".to_string();
    for v in variants {
        let _ = write!(head, " ÷ bare, {} |", v.placement.name());
        rule.push_str(" ---: |");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for &(w, m, x) in BARE_GOALS {
        let Some(f) = find_figure(w, m) else { continue };
        let bound = Bound::for_figure(f, x);
        let _ = write!(s, "| {} ({}) | {} |", f.title, f.unit, bound.label("×"));
        for &v in variants {
            let verdict = tally.add(Verdict::of(netd_ratio(r, f, Mode::Bare, v), bound));
            let _ = write!(s, " {} |", verdict.ratio_cell(bound));
        }
        s.push('\n');
    }
    s.push('\n');
}

/// Goal 3: per-run cost in live udp-64 traffic, with tcp-1 and the
/// cilium-style programs as information.
fn live_goals(s: &mut String, r: &Results, tally: &mut Tally) {
    let _ = writeln!(
        s,
        "**Per-packet program cost in live traffic** (BPF_ENABLE_STATS run time, {}; \
         udp-64 on the host that ran its packets: the sender encapsulates, the receiver \
         decapsulates; tcp-1 runs once per GSO/GRO skb, as information)\n",
        NETD.name()
    );
    let _ = writeln!(
        s,
        "| program | goal | udp-64 | met | tcp-1 | cilium-style program | its udp-64 | its tcp-1 |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | --- | ---: | --- | ---: | ---: |");
    for g in &LIVE_GOALS {
        let udp = live_cost(r, NETD, "udp-64", g.host, g.program);
        let verdict = tally.add(Verdict::of(udp.map(|c| c.0), Bound::AtMost(g.max_ns)));
        let met = match verdict {
            Verdict::Met(_) => "✓",
            Verdict::Unmet(_) => "✗",
            Verdict::NotMeasured => "not measured",
        };
        let cilium = |w| live_cell(live_cost(r, Mode::CiliumStyle, w, g.host, g.cilium_program));
        let _ = writeln!(
            s,
            "| {}: `{}` on host {} | {} | {} | {met} | {} | `{}` | {} | {} |",
            g.what,
            g.program,
            g.host,
            Bound::AtMost(g.max_ns).label(" ns"),
            live_cell(udp),
            live_cell(live_cost(r, NETD, "tcp-1", g.host, g.program)),
            g.cilium_program,
            cilium("udp-64"),
            cilium("tcp-1"),
        );
    }
    let _ = writeln!(
        s,
        "\nThe cilium-style programs do less in BPF: their kernel VXLAN device builds and \
         strips the outer headers, and that work is not in their run time.\n"
    );
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
    for m in r.modes.iter().filter(|m| measures_live(m.mode)) {
        let programs = if m.mode.is_netd() {
            ["from_container", "_from_underlay"]
        } else {
            ["from_container", "from_overlay"]
        };
        for prog in programs {
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

    use super::super::progrun::LiveCost;
    use super::super::results::{Meta, ModeResult, PathRecord, Sample};
    use super::super::workloads::{Gro, Placement};

    const PINNED: Variant = Variant {
        placement: Placement::Pinned,
        gro: Gro::On,
    };
    const UNPINNED: Variant = Variant {
        placement: Placement::Unpinned,
        gro: Gro::On,
    };

    fn sample(workload: &str, v: Variant, metric: &str, value: f64) -> Sample {
        Sample {
            workload: workload.into(),
            rep: 1,
            round: 1,
            placement: v.placement.name().into(),
            gro: v.gro.name().into(),
            gro_seen: String::new(),
            metrics: [(metric.to_string(), value)].into(),
            cpu: Default::default(),
            loadavg: String::new(),
            background_cores: 0.0,
            raw: serde_json::Value::Null,
        }
    }

    fn mode(mode: Mode, samples: Vec<Sample>) -> ModeResult {
        let mut m = ModeResult::new(mode, std::time::Duration::ZERO, PathRecord::default());
        m.samples = samples;
        m
    }

    fn live(workload: &str, host: usize, program: &str, ns_per_run: f64) -> LiveCost {
        LiveCost {
            workload: workload.into(),
            host,
            program: program.into(),
            runs: 1000,
            run_time_ns: (ns_per_run * 1000.0) as u64,
            ns_per_run,
            workload_figure: String::new(),
        }
    }

    fn results(modes: Vec<ModeResult>) -> Results {
        Results {
            meta: Meta {
                placements: vec![Placement::Pinned, Placement::Unpinned],
                gro: vec![Gro::On, Gro::Off],
                ..Default::default()
            },
            modes,
            ..Default::default()
        }
    }

    #[test]
    fn peer_ratios_follow_each_figures_direction_per_placement() {
        let tcp = find_figure("tcp-1", "gbps").unwrap();
        let p99 = find_figure("rr", "p99_us").unwrap();
        let r = results(vec![
            mode(
                Mode::NetdTc,
                vec![
                    sample("tcp-1", PINNED, "gbps", 12.0),
                    sample("tcp-1", UNPINNED, "gbps", 9.0),
                    sample("rr", PINNED, "p99_us", 60.0),
                ],
            ),
            mode(
                Mode::KernelVxlan,
                vec![
                    sample("tcp-1", PINNED, "gbps", 10.0),
                    sample("tcp-1", UNPINNED, "gbps", 10.0),
                    sample("rr", PINNED, "p99_us", 50.0),
                ],
            ),
        ]);
        // Only the chart's GRO setting: each placement once.
        assert_eq!(goal_variants(&r), [PINNED, UNPINNED]);
        let verdict = |f, v| {
            let bound = Bound::for_figure(f, 1.0);
            Verdict::of(netd_ratio(&r, f, Mode::KernelVxlan, v), bound)
        };
        assert_eq!(verdict(tcp, PINNED), Verdict::Met(1.2));
        assert_eq!(verdict(tcp, UNPINNED), Verdict::Unmet(0.9));
        assert_eq!(verdict(p99, PINNED), Verdict::Unmet(1.2));
        assert_eq!(verdict(p99, UNPINNED), Verdict::NotMeasured);
        let absent = Verdict::of(
            netd_ratio(&r, tcp, Mode::CiliumStyle, PINNED),
            Bound::AtLeast(1.0),
        );
        assert_eq!(absent, Verdict::NotMeasured);
    }

    #[test]
    fn bare_is_compared_whatever_the_gro_setting() {
        let udp = find_figure("udp-64", "kpps").unwrap();
        let mut bare = sample("udp-64", PINNED, "kpps", 100.0);
        bare.gro.clear();
        let r = results(vec![
            mode(Mode::NetdTc, vec![sample("udp-64", PINNED, "kpps", 85.0)]),
            mode(Mode::Bare, vec![bare]),
        ]);
        let bound = Bound::for_figure(udp, 0.8);
        assert_eq!(bound, Bound::AtLeast(0.8));
        assert_eq!(
            Verdict::of(netd_ratio(&r, udp, Mode::Bare, PINNED), bound),
            Verdict::Met(0.85)
        );
    }

    #[test]
    fn ratio_cells_never_round_into_the_other_verdict() {
        let at_least = Bound::AtLeast(1.0);
        assert_eq!(
            Verdict::of(Some(0.996), at_least).ratio_cell(at_least),
            "0.996× ✗"
        );
        assert_eq!(
            Verdict::of(Some(1.234), at_least).ratio_cell(at_least),
            "1.23× ✓"
        );
        let at_most = Bound::AtMost(1.03);
        assert_eq!(
            Verdict::of(Some(1.0304), at_most).ratio_cell(at_most),
            "1.030× ✗"
        );
        assert_eq!(
            Verdict::of(None, at_most).ratio_cell(at_most),
            "not measured"
        );
        assert_eq!(Verdict::of(Some(f64::NAN), at_most), Verdict::NotMeasured);
    }

    #[test]
    fn goals_section_shows_every_ratio_and_counts_verdicts() {
        let mut netd = mode(
            Mode::NetdTc,
            vec![
                sample("tcp-1", PINNED, "gbps", 12.0),
                sample("tcp-1", UNPINNED, "gbps", 9.0),
            ],
        );
        netd.progrun = Some(ProgRunResult {
            live: vec![
                live("udp-64", 0, "from_container", 120.0),
                live("udp-64", 1, "tc_from_underlay", 130.0),
                live("udp-64", 0, "tc_from_underlay", 900.0),
                live("tcp-1", 0, "from_container", 400.0),
            ],
            ..Default::default()
        });
        let mut cilium = mode(
            Mode::CiliumStyle,
            vec![
                sample("tcp-1", PINNED, "gbps", 15.0),
                sample("tcp-1", UNPINNED, "gbps", 9.0),
            ],
        );
        cilium.progrun = Some(ProgRunResult {
            live: vec![live("udp-64", 1, "from_overlay", 60.0)],
            ..Default::default()
        });
        let r = results(vec![netd, cilium]);
        let mut s = String::new();
        goals_section(&mut s, &r);
        assert!(s.contains(
            "| figure | goal | ÷ kernel-vxlan, pinned | ÷ kernel-vxlan, unpinned \
             | ÷ cilium-style, pinned | ÷ cilium-style, unpinned |"
        ));
        assert!(s.contains(
            "| TCP, 1 stream (Gbit/s) | ≥ 1× | not measured | not measured | 0.80× ✗ | 1.00× ✓ |"
        ));
        assert!(s.contains(
            "| encapsulation: `from_container` on host 0 | ≤ 150 ns | 120 ns (1000 runs) | ✓ \
             | 400 ns (1000 runs) | `from_container` | not measured | not measured |"
        ));
        assert!(s.contains(
            "| decapsulation: `tc_from_underlay` on host 1 | ≤ 100 ns | 130 ns (1000 runs) | ✗ \
             | not measured | `from_overlay` | 60 ns (1000 runs) | not measured |"
        ));
        // 10 figures × 2 peers × 2 placements, 3 × 2 against bare, 2 live.
        assert!(s.contains("Data-plane goals: 2 met, 2 not met, 44 not measured."));
    }

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
