//! `cargo xtask bench`: netd's data plane side by side with flannel-style
//! kernel VXLAN, plain routing (flannel host-gw) and the bare underlay, all
//! in one run on the same namespace testbed; the BPF programs' cost per
//! packet with BPF_PROG_TEST_RUN; and the control plane at thousands of
//! leases against the testbed's etcd. Writes every sample as JSON, a
//! Markdown report and a PNG chart.
//!
//! A run is a number of rounds, each of which builds every mode's testbed
//! once (in an order that rotates from round to round) and runs all of its
//! workloads in every placement and GRO setting: slow drifts of a shared
//! machine then spread over all modes instead of landing on whichever ran
//! last, and the spread across rounds is reported with each median.
//!
//! Nothing here asserts a timing: the machine is shared and noisy. A run
//! fails only when a mode moved no traffic or a figure is missing.

mod bpf_map;
mod chart;
mod cilium_style;
mod control_plane;
mod cpu;
mod etcd_http;
mod iptables_policy;
mod policy;
mod policy_report;
mod policy_rules;
mod progress;
mod progrun;
mod report;
mod results;
mod testbed;
mod workloads;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use netd_tests::NsRef;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, killpg, sigaction};
use nix::unistd::Pid;

use crate::{setup, util};
use progress::Progress;
use results::{ModeResult, Results};
use testbed::{Mode, Testbed};
use workloads::{Gro, Placement, Variant, Workload};

#[derive(Args)]
pub struct Options {
    /// A short run for CI: one round, pinned, one 1-second run per
    /// workload and 200 leases; checks only that every mode moved traffic
    /// and that every figure was produced.
    #[arg(long)]
    quick: bool,
    /// Directory for bench.json, report.md and bench.png.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Data-plane modes to measure, comma separated (default: all of
    /// bare,routed,kernel-vxlan,netd-vxlan-tc,netd-vxlan-xdp,
    /// netd-egress-plain,netd-egress-nat,cilium-style).
    #[arg(long, value_delimiter = ',', value_parser = Mode::parse)]
    modes: Option<Vec<Mode>>,
    /// Workloads to run, comma separated (default: all of
    /// tcp-1,tcp-4,udp-64,udp-1400,rr).
    #[arg(long, value_delimiter = ',', value_parser = Workload::parse)]
    workloads: Option<Vec<Workload>>,
    /// Rounds; each builds every mode's testbed once and runs all its
    /// workloads, the mode order rotated by one from round to round
    /// (default 5; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Where client and server run: pinned to cores 0 and 1, unpinned, or
    /// both (default both; pinned with --quick).
    #[arg(long, value_enum)]
    placement: Option<Choice<Placement>>,
    /// GRO on every container's eth0, the same in every container mode:
    /// on, off, or both (default on).
    #[arg(long, value_enum)]
    gro: Option<Choice<Gro>>,
    /// Repetitions of each workload per round (default 1).
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds each measured run lasts (default 3; 1 with --quick).
    #[arg(long)]
    seconds: Option<u32>,
    /// Simulated remote leases for the control-plane runs, comma separated
    /// (default 1000,10000,100000; 200 with --quick).
    #[arg(long, value_delimiter = ',')]
    leases: Option<Vec<usize>>,
    /// Skip the control-plane runs.
    #[arg(long)]
    no_control_plane: bool,
    /// Skip the data-plane modes (and the BPF program runs).
    #[arg(long)]
    no_data_plane: bool,
    /// Skip the policy runs (netd and iptables + ipset at 0, 10 and 1,000
    /// rules; apply latency at 1,000 endpoints).
    #[arg(long)]
    no_policy: bool,
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,
    /// Measure nothing: rewrite report.md and bench.png in --out from this
    /// bench.json.
    #[arg(long, value_name = "BENCH_JSON")]
    report_from: Option<PathBuf>,
}

/// One setting, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice<T> {
    One(T),
    Both,
}

impl<T: clap::ValueEnum + Clone + Send + Sync + 'static> clap::ValueEnum for Choice<T> {
    fn value_variants<'a>() -> &'a [Self] {
        // Leaked once per type: clap asks for a 'static list.
        let mut all: Vec<Self> = T::value_variants()
            .iter()
            .cloned()
            .map(Choice::One)
            .collect();
        all.push(Choice::Both);
        all.leak()
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self {
            Choice::One(t) => t.to_possible_value(),
            Choice::Both => Some(clap::builder::PossibleValue::new("both")),
        }
    }
}

impl<T: clap::ValueEnum + Copy> Choice<T> {
    fn expand(self) -> Vec<T> {
        match self {
            Choice::One(t) => vec![t],
            Choice::Both => T::value_variants().to_vec(),
        }
    }
}

/// What one invocation measures, with the defaults filled in.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub modes: Vec<Mode>,
    pub workloads: Vec<Workload>,
    pub rounds: u32,
    pub placements: Vec<Placement>,
    pub gro: Vec<Gro>,
    pub reps: u32,
    pub seconds: u32,
    /// Seconds iperf3 runs before it starts counting (slow start, ARP).
    pub omit: u32,
    pub lease_counts: Vec<usize>,
    /// Joins (and as many revocations) per control-plane run.
    pub joins: usize,
    pub joins_per_sec: f64,
    /// Joins of the burst after them, and the rate they are offered at: a
    /// little above 1,000/s, so a daemon that keeps up shows at least that.
    pub burst_joins: usize,
    pub burst_per_sec: f64,
    /// `repeat` of the BPF_PROG_TEST_RUN loop, and how many single runs.
    pub prog_repeat: u32,
    pub prog_single_runs: u32,
    /// Measure policy enforcement (see `policy`).
    pub policy: bool,
}

impl Plan {
    fn from(opts: &Options) -> Self {
        let quick = opts.quick;
        let default_placement = if quick {
            Choice::One(Placement::Pinned)
        } else {
            Choice::Both
        };
        Plan {
            quick,
            modes: match (&opts.modes, opts.no_data_plane) {
                (_, true) => Vec::new(),
                (Some(modes), _) => modes.clone(),
                (None, _) => Mode::ALL.to_vec(),
            },
            workloads: opts
                .workloads
                .clone()
                .unwrap_or_else(|| Workload::ALL.to_vec()),
            rounds: opts.rounds.unwrap_or(if quick { 1 } else { 5 }).max(1),
            placements: opts.placement.unwrap_or(default_placement).expand(),
            gro: opts.gro.unwrap_or(Choice::One(Gro::On)).expand(),
            reps: opts.reps.unwrap_or(1).max(1),
            seconds: opts.seconds.unwrap_or(if quick { 1 } else { 3 }).max(1),
            omit: if quick { 0 } else { 1 },
            lease_counts: match (&opts.leases, opts.no_control_plane) {
                (_, true) => Vec::new(),
                (Some(list), _) => list.clone(),
                (None, _) if quick => vec![200],
                (None, _) => vec![1000, 10000, 100000],
            },
            joins: if quick { 10 } else { 200 },
            joins_per_sec: 20.0,
            burst_joins: if quick { 100 } else { 3000 },
            burst_per_sec: 1100.0,
            prog_repeat: if quick { 10_000 } else { 1_000_000 },
            prog_single_runs: if quick { 5 } else { 100 },
            policy: !opts.no_policy,
        }
    }

    /// Round `round`'s mode order (0-based): the list rotated by one per
    /// round, so that no mode always runs first, last or after the same
    /// neighbour.
    pub fn round_order(&self, round: u32) -> Vec<Mode> {
        let mut order = self.modes.clone();
        if !order.is_empty() {
            let by = round as usize % order.len();
            order.rotate_left(by);
        }
        order
    }

    /// Every (GRO, placement) combination, placements rotated per round.
    pub fn variants(&self, round: u32) -> Vec<Variant> {
        let mut placements = self.placements.clone();
        if !placements.is_empty() {
            let by = round as usize % placements.len();
            placements.rotate_left(by);
        }
        self.gro
            .iter()
            .flat_map(|&gro| {
                placements
                    .iter()
                    .map(move |&placement| Variant { placement, gro })
            })
            .collect()
    }

    /// The variant the chart and the goals use: the first of each setting.
    pub fn primary(&self) -> Variant {
        Variant {
            placement: self
                .placements
                .first()
                .copied()
                .unwrap_or(Placement::Pinned),
            gro: self.gro.first().copied().unwrap_or(Gro::On),
        }
    }
}

/// Programs the bench runs, each with the Debian package that has it.
const TOOLS: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("taskset", "util-linux"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("ip", "iproute2"),
    ("bridge", "iproute2"),
    ("ss", "iproute2"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("iptables-restore", "iptables"),
    ("ipset", "ipset"),
];

pub fn run(opts: &Options) -> Result<()> {
    if let Some(json) = &opts.report_from {
        return rewrite_report(json, &util::workspace_root().join(&opts.out));
    }
    if !util::is_root() {
        bail!(
            "`cargo xtask bench` must run as root: it creates network namespaces and loads eBPF programs"
        );
    }
    if !opts.skip_setup {
        setup::run(&setup::Options::default())?;
    }
    check_tools()?;
    let font = chart::load_font()?;
    println!("==> build netd");
    util::run(util::cargo().args(["build", "--release", "-p", "netd"]))?;
    let built = util::target_dir().join("release").join("netd");
    // A private copy: a rebuild of target/release/netd by anyone else
    // during the run must not change the binary under test.
    let bin_dir = tempfile::Builder::new()
        .prefix("netd-bench-bin-")
        .tempdir()?;
    let netd_bin = bin_dir.path().join("netd");
    std::fs::copy(&built, &netd_bin).with_context(|| format!("copy {}", built.display()))?;
    // SAFETY: single-threaded here; the test infrastructure reads it later.
    unsafe { std::env::set_var("NETD_BIN", &netd_bin) };
    watch_signals()?;

    let plan = Plan::from(opts);
    let out = util::workspace_root().join(&opts.out);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let mut results = Results::new(&plan, std::env::args().skip(1).collect());
    let mut progress = Progress::new(&plan);
    println!(
        "==> bench: modes {}, {} round(s), placement {}, GRO {}, {} × {}s per workload{}; about {} in all",
        plan.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        plan.rounds,
        names(plan.placements.iter().map(|p| p.name())),
        names(plan.gro.iter().map(|g| g.name())),
        plan.reps,
        plan.seconds,
        if plan.quick { " (quick)" } else { "" },
        progress::clock(progress.total())
    );

    let outcome = measure(&plan, &out, &mut progress, &mut results);
    results.finish();
    report::write(&out, &results, font)?;
    println!("==> results in {}", out.display());
    outcome?;
    let missing = report::missing_figures(&plan, &results);
    if !missing.is_empty() {
        bail!(
            "{} figure(s) missing or zero:\n  {}",
            missing.len(),
            missing.join("\n  ")
        );
    }
    println!("==> every mode moved traffic and every figure was produced");
    Ok(())
}

fn rewrite_report(json: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let results: Results = serde_json::from_str(&text).context("parse bench.json")?;
    std::fs::create_dir_all(out)?;
    report::write(out, &results, chart::load_font()?)?;
    println!("==> report.md and bench.png rewritten in {}", out.display());
    Ok(())
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(",")
}

/// Rounds of every mode, then the control plane; stops early only when
/// interrupted.
fn measure(plan: &Plan, out: &Path, progress: &mut Progress, results: &mut Results) -> Result<()> {
    for round in 0..plan.rounds {
        let order = plan.round_order(round);
        results
            .meta
            .round_orders
            .push(order.iter().map(|m| m.name().to_string()).collect());
        for (i, &mode) in order.iter().enumerate() {
            check_interrupt()?;
            let at = Step {
                round: round + 1,
                index: i + 1,
                of: order.len(),
            };
            progress.step(
                &format!("{} {}: build testbed", at.label(plan), mode.name()),
                progress::SETUP_SECS,
            );
            let first = results.modes.iter().all(|m| m.mode != mode);
            let result = guarded(mode.name(), || {
                measure_mode(plan, mode, progress, at, first)
            });
            match result {
                Ok(r) => merge(results, r),
                Err(e) if interrupted() => return Err(e),
                Err(e) => {
                    eprintln!("!!  round {} mode {}: {e:#}", at.round, mode.name());
                    let mut failed = ModeResult::failed(mode, &e);
                    failed.errors = vec![format!("round {}: {e:#}", at.round)];
                    failed.setups_s.clear();
                    merge(results, failed);
                }
            }
        }
    }
    if plan.policy {
        check_interrupt()?;
        results.policy = Some(policy::run(plan, progress)?);
    }
    for &count in &plan.lease_counts {
        check_interrupt()?;
        progress.step(
            &format!("control plane: {count} leases"),
            progress::control_plane_secs(plan, count),
        );
        match guarded("control plane", || control_plane::run(plan, count, out)) {
            Ok(r) => results.control_plane.push(r),
            Err(e) if interrupted() => return Err(e),
            Err(e) => {
                eprintln!("!!  control plane at {count} leases: {e:#}");
                results
                    .errors
                    .push(format!("control plane at {count} leases: {e:#}"));
            }
        }
    }
    Ok(())
}

/// A mode's place in the run, for progress lines.
#[derive(Clone, Copy)]
struct Step {
    round: u32,
    index: usize,
    of: usize,
}

impl Step {
    fn label(self, plan: &Plan) -> String {
        format!(
            "round {}/{} mode {}/{}",
            self.round, plan.rounds, self.index, self.of
        )
    }
}

/// Adds one round's result of a mode to that mode's result: the first
/// round's path record and program runs, every round's samples.
fn merge(results: &mut Results, r: ModeResult) {
    match results.modes.iter_mut().find(|m| m.mode == r.mode) {
        None => results.modes.push(r),
        Some(m) => {
            if m.path.interfaces.is_empty() {
                m.path = r.path;
            }
            if m.progrun.is_none() {
                m.progrun = r.progrun;
            }
            m.setups_s.extend(r.setups_s);
            m.samples.extend(r.samples);
            m.errors.extend(r.errors);
        }
    }
}

/// One mode on a fresh testbed, torn down before returning: every variant
/// of every workload; the program runs only the first time the mode runs.
fn measure_mode(
    plan: &Plan,
    mode: Mode,
    progress: &mut Progress,
    at: Step,
    first: bool,
) -> Result<ModeResult> {
    let started = Instant::now();
    let tb = Testbed::build(mode)?;
    let mut result = ModeResult::new(mode, started.elapsed(), tb.describe_path()?);
    if first {
        println!(
            "    {} → {} ({}), path MTU {}",
            tb.client.name(),
            tb.server_ip,
            mode.description(),
            tb.path_mtu()
        );
    }
    for variant in plan.variants(at.round - 1) {
        // GRO has nothing to act on without containers: one setting only.
        if !results::has_containers(mode) && variant.gro != plan.gro[0] {
            continue;
        }
        let gro_seen = workloads::set_container_gro(&tb, variant.gro)?;
        for &workload in &plan.workloads {
            for rep in 1..=plan.reps {
                check_interrupt()?;
                progress.step(
                    &format!(
                        "{} {}: {} {}{}",
                        at.label(plan),
                        mode.name(),
                        workload.name(),
                        variant.label(),
                        if plan.reps > 1 {
                            format!(" rep {rep}/{}", plan.reps)
                        } else {
                            String::new()
                        }
                    ),
                    progress::run_secs(plan),
                );
                match workloads::run_variant(&tb, workload, rep, variant.placement, plan) {
                    Ok(mut sample) => {
                        sample.round = at.round;
                        sample.gro = variant.gro.name().to_string();
                        sample.gro_seen = gro_seen.clone();
                        println!("      {}", sample.summary());
                        result.samples.push(sample);
                    }
                    Err(e) if interrupted() => return Err(e),
                    Err(e) => {
                        eprintln!("!!  {} {}: {e:#}", mode.name(), workload.name());
                        result.errors.push(format!(
                            "round {} {} {} rep {rep}: {e:#}",
                            at.round,
                            workload.name(),
                            variant.label()
                        ));
                    }
                }
            }
        }
    }
    if progrun::measures_live(mode) && first {
        // Program costs with the first variant's GRO, as the figures.
        workloads::set_container_gro(&tb, plan.primary().gro)?;
        let what = if progrun::runs_in(plan, mode) {
            "BPF_PROG_TEST_RUN and live program costs"
        } else {
            "live program costs"
        };
        progress.step(what, progress::progrun_secs(plan, mode));
        match progrun::run(&tb, plan) {
            Ok(p) => result.progrun = Some(p),
            Err(e) if interrupted() => return Err(e),
            Err(e) => result.errors.push(format!("progrun: {e:#}")),
        }
    }
    drop(tb);
    Ok(result)
}

/// Runs `f`, turning a panic of the test infrastructure (which panics on
/// any failed setup command) into an error; guards clean up as it unwinds.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(anyhow!("{what} panicked: {msg}"))
        }
    }
}

fn check_tools() -> Result<()> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(cmd, _)| util::which(cmd).is_none())
        .map(|(cmd, pkg)| format!("{cmd} ({pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// SIGINT/SIGTERM only set a flag: every step checks it and returns an
/// error, so the namespace guards run as the stack unwinds. A handler, not
/// a blocked mask: children inherit the mask (and would ignore the SIGTERM
/// that stops them), while handlers are reset by exec.
fn watch_signals() -> Result<()> {
    extern "C" fn on_signal(_: libc::c_int) {
        if INTERRUPTED.swap(true, Ordering::Relaxed) {
            const MSG: &[u8] = b"==> interrupted again: still removing the testbed, please wait\n";
            // SAFETY: write(2) is async-signal-safe; MSG is a static buffer.
            unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        } else {
            const MSG: &[u8] = b"==> interrupted: stopping and removing the testbed\n";
            // SAFETY: as above.
            unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls write(2).
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Runs `cmd` (in its own process group) to completion, killing the group
/// after `timeout` or on interrupt. Fails unless it exits 0.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    use std::os::unix::process::CommandExt as _;
    let line = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {line}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline || interrupted() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status: status.unwrap_or_default(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    match status {
        None if interrupted() => bail!("interrupted: {line}"),
        None => bail!("{line} still running after {timeout:?}; killed"),
        Some(s) if !s.success() => bail!(
            "{line} failed ({s}): {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Some(_) => Ok(out),
    }
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs a short configuration command (`ip`, `bridge`, `ethtool`) in `ns`.
pub fn sh(ns: &NsRef, argv: &[&str]) -> Result<String> {
    let mut cmd = ns.command(argv[0]);
    cmd.args(&argv[1..]);
    let out = run_bounded(cmd, Duration::from_secs(30))
        .with_context(|| format!("[{}] {}", ns.name(), argv.join(" ")))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            opts: Options,
        }
        let cli = <Cli as clap::Parser>::parse_from([&["bench"][..], args].concat());
        Plan::from(&cli.opts)
    }

    #[test]
    fn rounds_rotate_the_mode_order() {
        let p = plan(&["--modes", "bare,routed,kernel-vxlan"]);
        assert_eq!(p.rounds, 5);
        let names = |r| -> Vec<&str> { p.round_order(r).iter().map(|m| m.name()).collect() };
        assert_eq!(names(0), ["bare", "routed", "kernel-vxlan"]);
        assert_eq!(names(1), ["routed", "kernel-vxlan", "bare"]);
        assert_eq!(names(3), names(0));
    }

    #[test]
    fn full_run_measures_both_placements_quick_only_pinned() {
        let full = plan(&[]);
        assert_eq!(full.placements, [Placement::Pinned, Placement::Unpinned]);
        assert_eq!(full.gro, [Gro::On]);
        assert_eq!(full.variants(1)[0].placement, Placement::Unpinned);
        let quick = plan(&["--quick"]);
        assert_eq!((quick.rounds, quick.seconds), (1, 1));
        assert_eq!(quick.variants(0), [Variant::DEFAULT]);
        let both = plan(&["--gro", "both", "--placement", "unpinned"]);
        assert_eq!(both.gro, [Gro::On, Gro::Off]);
        assert_eq!(both.variants(0).len(), 2);
    }
}
