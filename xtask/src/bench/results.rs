//! Everything a run measured, as written to `bench.json`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Plan;
use super::control_plane::ControlPlaneResult;
use super::cpu::CpuDelta;
use super::policy::PolicyResult;
use super::progrun::ProgRunResult;
use super::testbed::Mode;
use super::workloads::{Gro, Placement, Variant};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub modes: Vec<ModeResult>,
    pub control_plane: Vec<ControlPlaneResult>,
    #[serde(default)]
    pub policy: Option<PolicyResult>,
    pub errors: Vec<String>,
}

impl Results {
    pub fn new(plan: &Plan, args: Vec<String>) -> Self {
        Results {
            meta: Meta::collect(plan, args),
            ..Default::default()
        }
    }

    pub fn finish(&mut self) {
        self.meta.finished_unix = unix_now();
    }

    /// Every (GRO, placement) variant the run measured, in plan order;
    /// results from before variants were pinned with GRO as netd set it.
    pub fn variants(&self) -> Vec<Variant> {
        let placements = if self.meta.placements.is_empty() {
            vec![Placement::Pinned]
        } else {
            self.meta.placements.clone()
        };
        let gro = if self.meta.gro.is_empty() {
            vec![Gro::On]
        } else {
            self.meta.gro.clone()
        };
        gro.iter()
            .flat_map(|&gro| {
                placements
                    .iter()
                    .map(move |&placement| Variant { placement, gro })
            })
            .collect()
    }

    /// The variant of the chart and the goals.
    pub fn primary(&self) -> Variant {
        self.variants().first().copied().unwrap_or(Variant::DEFAULT)
    }

    /// The mode whose BPF_PROG_TEST_RUN cases were run.
    pub fn progrun(&self) -> Option<&ProgRunResult> {
        self.modes
            .iter()
            .filter_map(|m| m.progrun.as_ref())
            .find(|p| !p.cases.is_empty())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub command: String,
    pub quick: bool,
    /// Rounds: each ran every mode once, in a rotated order.
    #[serde(default)]
    pub rounds: u32,
    /// Mode order of each round.
    #[serde(default)]
    pub round_orders: Vec<Vec<String>>,
    #[serde(default)]
    pub placements: Vec<Placement>,
    #[serde(default)]
    pub gro: Vec<Gro>,
    /// Repetitions of each workload per variant within a round.
    pub reps: u32,
    pub seconds: u32,
    pub omit_seconds: u32,
    pub started_unix: u64,
    pub finished_unix: u64,
    pub machine: Machine,
    pub tools: BTreeMap<String, String>,
    pub netd_commit: String,
}

impl Meta {
    fn collect(plan: &Plan, args: Vec<String>) -> Self {
        Meta {
            command: format!("cargo xtask {}", args.join(" ")),
            quick: plan.quick,
            rounds: plan.rounds,
            round_orders: Vec::new(),
            placements: plan.placements.clone(),
            gro: plan.gro.clone(),
            reps: plan.reps,
            seconds: plan.seconds,
            omit_seconds: plan.omit,
            started_unix: unix_now(),
            finished_unix: 0,
            machine: Machine::read(),
            tools: tool_versions(),
            netd_commit: git_commit(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of `/proc/cpuinfo`.
    pub cpu_model: String,
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    pub mem_total_kib: u64,
    pub load_avg_at_start: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        Machine {
            cpu_model,
            cores,
            kernel: read("/proc/sys/kernel/osrelease"),
            mem_total_kib,
            load_avg_at_start: read("/proc/loadavg"),
        }
    }
}

fn tool_versions() -> BTreeMap<String, String> {
    let first_line = |argv: &[&str]| {
        std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                let text = String::from_utf8_lossy(&text);
                super::workloads::strip_ansi(text.lines().next().unwrap_or(""))
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    [
        ("iperf3", &["iperf3", "--version"][..]),
        ("sockperf", &["sockperf", "--version"]),
        ("bpftool", &["bpftool", "--version"]),
        ("etcd", &["etcd", "--version"]),
    ]
    .into_iter()
    .map(|(name, argv)| (name.to_string(), first_line(argv)))
    .collect()
}

fn git_commit() -> String {
    let root = crate::util::workspace_root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--",
        "netd",
        "netd-ebpf",
        "netd-common",
    ])
    .is_empty();
    if dirty {
        format!("{commit} (netd sources modified)")
    } else {
        commit
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One mode's testbed and samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub description: String,
    /// Testbed build time of the first round.
    pub setup_s: f64,
    /// Testbed build time of every round.
    #[serde(default)]
    pub setups_s: Vec<f64>,
    pub path: PathRecord,
    pub samples: Vec<Sample>,
    pub progrun: Option<ProgRunResult>,
    pub errors: Vec<String>,
}

impl ModeResult {
    pub fn new(mode: Mode, setup: Duration, path: PathRecord) -> Self {
        ModeResult {
            mode,
            description: mode.description().to_string(),
            setup_s: setup.as_secs_f64(),
            setups_s: vec![setup.as_secs_f64()],
            path,
            samples: Vec::new(),
            progrun: None,
            errors: Vec::new(),
        }
    }

    pub fn failed(mode: Mode, e: &anyhow::Error) -> Self {
        let mut r = ModeResult::new(mode, Duration::ZERO, PathRecord::default());
        r.errors.push(format!("{e:#}"));
        r
    }

    /// The samples of `workload` run as `variant`. GRO is ignored in a
    /// mode without containers (it runs once, whatever the setting).
    pub fn samples_in<'a>(
        &'a self,
        workload: &'a str,
        variant: Variant,
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        let any_gro = !has_containers(self.mode);
        self.samples.iter().filter(move |s| {
            s.workload == workload
                && s.placement_or_default() == variant.placement.name()
                && (any_gro || s.gro_or_default() == variant.gro.name())
        })
    }

    /// Every sample of `metric` in `workload`'s runs as `variant`.
    pub fn values_in(&self, workload: &str, metric: &str, variant: Variant) -> Vec<f64> {
        self.samples_in(workload, variant)
            .filter_map(|s| s.metrics.get(metric).copied())
            .filter(|v| v.is_finite())
            .collect()
    }
}

/// Whether `mode`'s testbed has containers whose GRO the bench sets.
pub fn has_containers(mode: Mode) -> bool {
    mode != Mode::Bare
}

/// One measured run of a workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub workload: String,
    pub rep: u32,
    /// The round it ran in (1-based).
    #[serde(default)]
    pub round: u32,
    /// `pinned` or `unpinned`; empty in results from before placements
    /// (which were pinned).
    #[serde(default)]
    pub placement: String,
    /// GRO on the containers' `eth0` as read back before the run; empty in
    /// results from before the setting (netd's on, the others off).
    #[serde(default)]
    pub gro: String,
    /// What `ethtool -k` showed on each container's `eth0`.
    #[serde(default)]
    pub gro_seen: String,
    /// Named figures, e.g. `gbps`, `pps`, `rr_per_s`, `p99_us`.
    pub metrics: BTreeMap<String, f64>,
    pub cpu: CpuDelta,
    /// `/proc/loadavg` when the run started: the machine is shared.
    #[serde(default)]
    pub loadavg: String,
    /// Cores busy just before the run, with nothing of ours running:
    /// someone else's load that the run competed with.
    #[serde(default)]
    pub background_cores: f64,
    /// The tool's own summary (iperf3's `end` object, sockperf's lines).
    pub raw: Value,
}

impl Sample {
    pub fn placement_or_default(&self) -> &str {
        if self.placement.is_empty() {
            Placement::Pinned.name()
        } else {
            &self.placement
        }
    }

    pub fn gro_or_default(&self) -> &str {
        if self.gro.is_empty() {
            Gro::On.name()
        } else {
            &self.gro
        }
    }

    pub fn summary(&self) -> String {
        let figures: Vec<String> = self
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={}", short(*v)))
            .collect();
        format!(
            "{} round {} rep {}: {}",
            self.workload,
            self.round,
            self.rep,
            figures.join(" ")
        )
    }
}

fn short(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PathRecord {
    pub interfaces: Vec<IfaceRecord>,
    /// role → sysctl → value.
    pub sysctls: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IfaceRecord {
    pub role: String,
    pub ns: String,
    pub ifname: String,
    pub kind: String,
    pub mtu: u64,
    /// XDP attachment as `ip -d link` reports it, if any.
    pub xdp: Option<Value>,
    /// `ethtool -k`: feature → `on`/`off`, with ` [fixed]` where fixed.
    pub offloads: BTreeMap<String, String>,
}
