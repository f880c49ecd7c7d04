//! Progress lines: what runs now, time spent, and an estimate of what is
//! left from the plan (each step's expected duration, not a measurement).

use std::time::Instant;

use super::Plan;
use super::testbed::Mode;

/// Building and removing a testbed, attaching containers, pings.
pub const SETUP_SECS: f64 = 8.0;
/// Starting servers, connection setup and parsing, per measured run.
const RUN_OVERHEAD_SECS: f64 = 1.5;

pub fn run_secs(plan: &Plan) -> f64 {
    f64::from(plan.seconds + plan.omit) + RUN_OVERHEAD_SECS
}

/// Live costs (three workloads) in every netd mode and cilium-style; test
/// runs in one netd mode.
pub fn progrun_secs(plan: &Plan, mode: Mode) -> f64 {
    let live = 3.0 * run_secs(plan);
    if super::progrun::runs_in(plan, mode) {
        // Four frames, a loop and single runs each; bpftool starts in ~10 ms.
        live + 4.0 * (2.0 + f64::from(plan.prog_single_runs) * 0.02)
    } else {
        live
    }
}

pub fn control_plane_secs(plan: &Plan, leases: usize) -> f64 {
    let joins = 2.0 * plan.joins as f64 / plan.joins_per_sec;
    let burst = plan.burst_joins as f64 / plan.burst_per_sec;
    SETUP_SECS + 3.0 + leases as f64 / 2000.0 + joins + burst
}

/// One mode in one round: its testbed and every variant of every workload.
fn mode_secs(plan: &Plan) -> f64 {
    let variants = plan.placements.len() * plan.gro.len();
    let runs = (plan.workloads.len() * variants) as f64 * f64::from(plan.reps);
    SETUP_SECS + runs * run_secs(plan)
}

pub struct Progress {
    start: Instant,
    total: f64,
    done: f64,
}

impl Progress {
    pub fn new(plan: &Plan) -> Self {
        let mut total = f64::from(plan.rounds) * plan.modes.len() as f64 * mode_secs(plan);
        for &m in plan
            .modes
            .iter()
            .filter(|m| super::progrun::measures_live(**m))
        {
            total += progrun_secs(plan, m);
        }
        total += plan
            .lease_counts
            .iter()
            .map(|&n| control_plane_secs(plan, n))
            .sum::<f64>();
        Progress {
            start: Instant::now(),
            total,
            done: 0.0,
        }
    }

    pub fn total(&self) -> f64 {
        self.total
    }

    /// Announces a step expected to take `secs`.
    pub fn step(&mut self, what: &str, secs: f64) {
        let left = (self.total - self.done).max(0.0);
        println!(
            "--> [{} elapsed, ~{} left] {what}",
            clock(self.start.elapsed().as_secs_f64()),
            clock(left)
        );
        self.done += secs;
    }
}

/// `m:ss`.
pub fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}
