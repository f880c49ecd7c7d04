//! CPU time from `/proc/stat` (machine-wide and per CPU: namespaces do not
//! separate it), softirq counts from `/proc/softirqs`, backlog statistics
//! from `/proc/net/softnet_stat`, and of single processes from
//! `/proc/<pid>/stat`.

use std::collections::BTreeMap;
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

    /// Every `cpuN` line, in CPU order.
    pub fn read_per_cpu() -> Result<Vec<Self>> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Ok(parse_stat_per_cpu(&stat))
    }

    pub fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    /// Anything but idle and iowait.
    pub fn busy(&self) -> u64 {
        self.total() - self.idle - self.iowait
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
    parse_cpu_line(stat.lines().find(|l| l.starts_with("cpu "))?)
}

fn parse_stat_per_cpu(stat: &str) -> Vec<CpuTimes> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(parse_cpu_line)
        .collect()
}

fn parse_cpu_line(line: &str) -> Option<CpuTimes> {
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
    parse_softnet(text).iter().map(|c| c.dropped).sum()
}

/// One CPU's line of `/proc/net/softnet_stat` (hex columns): packets its
/// backlog and NAPI polls processed, packets dropped because its backlog
/// was full, and how often a poll ran out of budget or time with work
/// left (`time_squeeze`: the softirq could not keep up).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SoftnetCpu {
    pub processed: u64,
    pub dropped: u64,
    pub time_squeeze: u64,
}

impl SoftnetCpu {
    fn minus(&self, earlier: &Self) -> Self {
        SoftnetCpu {
            processed: self.processed.wrapping_sub(earlier.processed) & 0xffff_ffff,
            dropped: self.dropped.wrapping_sub(earlier.dropped) & 0xffff_ffff,
            time_squeeze: self.time_squeeze.wrapping_sub(earlier.time_squeeze) & 0xffff_ffff,
        }
    }
}

pub fn softnet_per_cpu() -> Vec<SoftnetCpu> {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .map(|t| parse_softnet(&t))
        .unwrap_or_default()
}

fn parse_softnet(text: &str) -> Vec<SoftnetCpu> {
    text.lines()
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .map(|f| u64::from_str_radix(f, 16).unwrap_or(0))
                .collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            SoftnetCpu {
                processed: at(0),
                dropped: at(1),
                time_squeeze: at(2),
            }
        })
        .collect()
}

/// The network softirqs of `/proc/softirqs`, raised per CPU.
const NET_SOFTIRQS: &[&str] = &["NET_RX", "NET_TX"];

/// `NET_RX`/`NET_TX` → count per CPU.
pub fn net_softirqs() -> BTreeMap<String, Vec<u64>> {
    std::fs::read_to_string("/proc/softirqs")
        .map(|t| parse_softirqs(&t))
        .unwrap_or_default()
}

fn parse_softirqs(text: &str) -> BTreeMap<String, Vec<u64>> {
    text.lines()
        .filter_map(|l| {
            let (name, counts) = l.trim().split_once(':')?;
            NET_SOFTIRQS.contains(&name).then(|| {
                let counts = counts
                    .split_whitespace()
                    .map(|c| c.parse().unwrap_or(0))
                    .collect();
                (name.to_string(), counts)
            })
        })
        .collect()
}

/// CPU spent while a workload ran, with the wall time it ran: machine-wide
/// and per CPU, which shows on which core the packet work landed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuDelta {
    pub jiffies: CpuTimes,
    pub wall_s: f64,
    pub ticks_per_sec: f64,
    #[serde(default)]
    pub per_cpu: Vec<CpuTimes>,
    /// `NET_RX`/`NET_TX` softirqs raised per CPU.
    #[serde(default)]
    pub net_softirqs: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    pub softnet: Vec<SoftnetCpu>,
}

impl CpuDelta {
    /// Share of `cpu`'s time spent in softirq (0–1).
    pub fn softirq_share(&self, cpu: usize) -> Option<f64> {
        let t = self.per_cpu.get(cpu)?;
        (t.total() > 0).then(|| t.softirq as f64 / t.total() as f64)
    }

    /// Share of `cpu`'s time spent busy (0–1).
    pub fn busy_share(&self, cpu: usize) -> Option<f64> {
        let t = self.per_cpu.get(cpu)?;
        (t.total() > 0).then(|| t.busy() as f64 / t.total() as f64)
    }

    /// Share of `cpu`'s time in the kernel outside softirq (system + irq).
    pub fn system_share(&self, cpu: usize) -> Option<f64> {
        let t = self.per_cpu.get(cpu)?;
        (t.total() > 0).then(|| (t.system + t.irq) as f64 / t.total() as f64)
    }

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
    per_cpu: Vec<CpuTimes>,
    softirqs: BTreeMap<String, Vec<u64>>,
    softnet: Vec<SoftnetCpu>,
    at: Instant,
}

impl CpuMeter {
    pub fn start() -> Result<Self> {
        Ok(CpuMeter {
            start: CpuTimes::read()?,
            per_cpu: CpuTimes::read_per_cpu()?,
            softirqs: net_softirqs(),
            softnet: softnet_per_cpu(),
            at: Instant::now(),
        })
    }

    pub fn stop(self) -> Result<CpuDelta> {
        let end = CpuTimes::read()?;
        let per_cpu = CpuTimes::read_per_cpu()?
            .iter()
            .zip(&self.per_cpu)
            .map(|(e, s)| e.minus(s))
            .collect();
        let net_softirqs = net_softirqs()
            .into_iter()
            .map(|(name, end)| {
                let start = self.softirqs.get(&name).cloned().unwrap_or_default();
                let d = end
                    .iter()
                    .enumerate()
                    .map(|(i, e)| e.saturating_sub(start.get(i).copied().unwrap_or(0)))
                    .collect();
                (name, d)
            })
            .collect();
        let softnet = softnet_per_cpu()
            .iter()
            .zip(&self.softnet)
            .map(|(e, s)| e.minus(s))
            .collect();
        Ok(CpuDelta {
            jiffies: end.minus(&self.start),
            wall_s: self.at.elapsed().as_secs_f64(),
            ticks_per_sec: ticks_per_sec(),
            per_cpu,
            net_softirqs,
            softnet,
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
    fn parses_per_cpu_lines_only() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\ncpu1 2 0 0 8 0 0 2 0\nintr 5\n";
        let cpus = parse_stat_per_cpu(stat);
        assert_eq!(cpus.len(), 2);
        assert_eq!((cpus[0].softirq, cpus[1].user, cpus[1].total()), (7, 2, 12));
        let d = CpuDelta {
            per_cpu: cpus,
            ..Default::default()
        };
        assert_eq!(d.softirq_share(1), Some(2.0 / 12.0));
        assert_eq!(d.busy_share(1), Some(4.0 / 12.0));
        assert_eq!(d.softirq_share(2), None);
    }

    #[test]
    fn parses_net_softirqs_and_softnet_columns() {
        let text = "                    CPU0       CPU1\n      TIMER:  1 2\n     NET_TX:   13259  12809\n     NET_RX:  139 50\n";
        let s = parse_softirqs(text);
        assert_eq!(s["NET_RX"], vec![139, 50]);
        assert_eq!(s["NET_TX"], vec![13259, 12809]);
        assert!(!s.contains_key("TIMER"));
        let sn = parse_softnet("0000000a 00000002 0000005e 0\n");
        assert_eq!(
            sn,
            vec![SoftnetCpu {
                processed: 10,
                dropped: 2,
                time_squeeze: 0x5e
            }]
        );
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
