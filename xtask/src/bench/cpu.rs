//! CPU time from `/proc/stat` (machine-wide: namespaces do not separate it)
//! and of single processes from `/proc/<pid>/stat`.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Jiffies per second (`USER_HZ`) for `/proc/stat` and `/proc/<pid>/stat`.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The machine-wide `cpu` line of `/proc/stat`, in jiffies.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        parse_stat(&stat).context("no cpu line in /proc/stat")
    }

    fn minus(&self, earlier: &Self) -> Self {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

fn parse_stat(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(CpuTimes {
        user: at(0),
        nice: at(1),
        system: at(2),
        idle: at(3),
        iowait: at(4),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
    })
}

/// Cores busy (anything but idle and iowait) over `window`, machine-wide.
pub fn busy_cores(window: std::time::Duration) -> Result<f64> {
    let start = CpuTimes::read()?;
    std::thread::sleep(window);
    let d = CpuTimes::read()?.minus(&start);
    let busy = d.user + d.nice + d.system + d.irq + d.softirq + d.steal;
    Ok(busy as f64 / ticks_per_sec() / window.as_secs_f64())
}

/// Packets dropped because a CPU's backlog queue was full (second column
/// of `/proc/net/softnet_stat`, summed over CPUs; machine-wide). veth
/// hands every packet to such a queue, so this is where a veth path drops.
pub fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .map(|t| parse_softnet_drops(&t))
        .unwrap_or(0)
}

fn parse_softnet_drops(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// CPU spent while a workload ran, with the wall time it ran.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuDelta {
    pub jiffies: CpuTimes,
    pub wall_s: f64,
    pub ticks_per_sec: f64,
}

impl CpuDelta {
    /// Kernel-side packet work: system + softirq + irq, in CPU seconds.
    pub fn kernel_s(&self) -> f64 {
        let j = &self.jiffies;
        (j.system + j.softirq + j.irq) as f64 / self.ticks_per_sec
    }

    /// Average cores busy in the kernel over the window.
    pub fn kernel_cores(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.kernel_s() / self.wall_s
        } else {
            f64::NAN
        }
    }
}

/// Measures the machine's CPU time over a window.
pub struct CpuMeter {
    start: CpuTimes,
    at: Instant,
}

impl CpuMeter {
    pub fn start() -> Result<Self> {
        Ok(CpuMeter {
            start: CpuTimes::read()?,
            at: Instant::now(),
        })
    }

    pub fn stop(self) -> Result<CpuDelta> {
        let end = CpuTimes::read()?;
        Ok(CpuDelta {
            jiffies: end.minus(&self.start),
            wall_s: self.at.elapsed().as_secs_f64(),
            ticks_per_sec: ticks_per_sec(),
        })
    }
}

/// A process's resident memory and CPU time so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcUsage {
    pub rss_kib: u64,
    /// Peak resident memory (VmHWM).
    pub rss_peak_kib: u64,
    /// utime + stime, in seconds.
    pub cpu_s: f64,
}

impl ProcUsage {
    pub fn read(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        Ok(ProcUsage {
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            rss_peak_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
            cpu_s: stat_cpu_ticks(&stat).unwrap_or(0) as f64 / ticks_per_sec(),
        })
    }
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`; the command
/// name in parentheses may contain spaces, so count from the last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_cpu_line() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let t = parse_stat(stat).unwrap();
        assert_eq!((t.user, t.system, t.softirq, t.steal), (10, 20, 6, 7));
    }

    #[test]
    fn sums_softnet_drops() {
        let text = "0000a000 00000010 00000000\n0000b000 00000001 00000000\n";
        assert_eq!(parse_softnet_drops(text), 17);
    }

    #[test]
    fn parses_pid_stat_with_spaces_in_name() {
        let stat = "42 (net d) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 9 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(22));
    }

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\tnetd\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
    }
}
