//! The control plane at scale: thousands of simulated remote hosts' leases
//! in the testbed's real etcd, one real netd daemon following them.
//!
//! - full sync: leases written first, then the daemon started; time until
//!   its SUBNETS map holds every one (polled with bpf(2), ~1 ms steps);
//! - join-to-programmed: a steady stream of new leases (each with its own
//!   etcd lease, as a joining host has), time from the put until the entry
//!   is in the map;
//! - leave: the same leases revoked, time until the entry is gone;
//! - the daemon's RSS and CPU time, the maps' kernel memory.
//!
//! The network is 10.0.0.0/8 with /24 subnets (65,535 leasable), which
//! exists only as etcd keys and map entries inside the namespaces; the
//! simulated hosts' public IPs are in 198.19.0.0/16 and never get traffic.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netd_tests::{Cluster, SWITCH_IP, Topology};
use serde::{Deserialize, Serialize};

use super::bpf_map::{PinnedMap, lpm_key};
use super::cpu::ProcUsage;
use super::etcd_http::{EtcdHttp, MAX_TXN_OPS};
use super::{Plan, check_interrupt, run_bounded};

const NETWORK: &str = "10.0.0.0/8";
const SUBNETS_PREFIX: &str = "/netd/network/subnets/";
/// Longest a sync, a join or a removal may take before it counts as lost.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const WATCH_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_micros(500);
/// Where the daemon serves `/metrics` during the run.
const METRICS_PORT: u16 = 9101;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPlaneResult {
    pub leases: usize,
    /// Writing the leases into etcd (transactions of 128 puts).
    pub etcd_write_s: f64,
    /// Daemon start to its "netd running" log line (BPF load, own lease;
    /// in builds that fill the map before going live, also the sync).
    pub start_to_running_s: f64,
    /// Daemon start to a SUBNETS map with every lease.
    pub start_to_synced_s: f64,
    pub map_entries: usize,
    pub peer_entries: usize,
    /// `netd status --json` at this size: its run time and peer count.
    pub status_s: f64,
    pub status_peers: usize,
    /// One `GET /metrics` at this size: its time and the body's size.
    #[serde(default)]
    pub metrics_scrape_s: f64,
    #[serde(default)]
    pub metrics_bytes: usize,
    pub joins: usize,
    /// Put to entry in the map, ms; a lost one is not in here (see `join_lost`).
    pub join_ms: Vec<f64>,
    pub join_lost: usize,
    /// First put to the last join seen in the map: with `joins`, the rate
    /// the daemon kept up with.
    pub joins_drained_s: f64,
    /// The put's own round trip (etcd commit), ms.
    pub put_ms: Vec<f64>,
    /// Revoke to entry gone from the map, ms.
    pub removal_ms: Vec<f64>,
    /// Revocations not seen (including joins that never reached the map).
    pub removal_lost: usize,
    pub removals_drained_s: f64,
    pub daemon_synced: ProcUsage,
    pub daemon_after_joins: ProcUsage,
    pub daemon_after_removals: ProcUsage,
    /// `bpftool map show` bytes_memlock of SUBNETS and PEERS.
    pub subnets_memlock: u64,
    pub peers_memlock: u64,
}

pub fn run(plan: &Plan, count: usize, out: &Path) -> Result<ControlPlaneResult> {
    let mut r = ControlPlaneResult {
        leases: count,
        joins: plan.joins,
        ..Default::default()
    };
    let topo = Topology::builder().hosts(1).build();
    let mut cluster = Cluster::on_topology(topo, "tc");
    let metrics = SocketAddr::from((netd_tests::host_ip(0), METRICS_PORT));
    cluster.run_args(&["--metrics-addr", &metrics.to_string()]);
    let endpoint = cluster.topo.etcd_endpoint();
    cluster.host(0).netd_ok(&[
        "network",
        "init",
        "--etcd-endpoints",
        &endpoint,
        "--network",
        NETWORK,
        "--subnet-len",
        "24",
    ]);
    let addr = SocketAddr::from((SWITCH_IP, 2379));
    let mut etcd = EtcdHttp::connect(cluster.topo.switch(), addr)?;

    let started = Instant::now();
    write_bulk(&mut etcd, count)?;
    r.etcd_write_s = started.elapsed().as_secs_f64();
    let keys = etcd.count_prefix(SUBNETS_PREFIX)?;
    println!("      {keys} leases in etcd after {:.2}s", r.etcd_write_s);

    let map = start_and_sync(&mut cluster, count, &mut r)?;
    let pid = cluster.daemons[0].as_ref().context("daemon")?.pid();
    r.daemon_synced = ProcUsage::read(pid)?;
    cluster.wait_ready(0);
    status_at_scale(&cluster, &mut r)?;
    scrape_at_scale(&cluster, metrics, &mut r)?;
    let own = own_index(&cluster.subnet(0));

    let joined = join_stream(plan, &mut etcd, &map, count, own, &mut r)?;
    r.daemon_after_joins = ProcUsage::read(pid)?;
    remove_stream(plan, &mut etcd, &map, &joined, &mut r)?;
    r.daemon_after_removals = ProcUsage::read(pid)?;
    let pins = map.pins.clone();
    r.subnets_memlock = memlock(&pins.join("SUBNETS"))?;
    r.peers_memlock = memlock(&pins.join("PEERS"))?;
    // The daemon's log (one line per map update) stays for a closer look.
    let log = out.join(format!("netd-{count}-leases.log"));
    std::fs::copy(
        cluster.daemons[0].as_ref().context("daemon")?.log_path(),
        &log,
    )
    .with_context(|| format!("copy the daemon log to {}", log.display()))?;
    println!("      {}", summary(&r));
    Ok(r)
}

/// Lease `i` of the simulated hosts: subnet 10.(1 + i/256).(i%256).0/24.
fn subnet_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24) + ((i as u32 + 256) << 8))
}

/// Index of a subnet ("10.a.b.0/24") in the scheme of [`subnet_of`].
fn own_index(subnet: &str) -> Option<usize> {
    let ip: Ipv4Addr = subnet.split('/').next()?.parse().ok()?;
    let [_, a, b, _] = ip.octets();
    (a >= 1).then(|| (usize::from(a) - 1) * 256 + usize::from(b))
}

/// A flannel lease for simulated host `i`, public IP 198.19.x.y.
fn lease_kv(i: usize) -> (String, String) {
    let subnet = subnet_of(i);
    let ip = Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250) as u8 + 1);
    let [a, b, c, d] = ip.octets();
    let key = format!("{SUBNETS_PREFIX}{subnet}-24");
    let value = format!(
        r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:6e:{a:02x}:{b:02x}:{c:02x}:{d:02x}"}}}}"#
    );
    (key, value)
}

/// The simulated hosts' leases, all bound to one long etcd lease.
fn write_bulk(etcd: &mut EtcdHttp, count: usize) -> Result<()> {
    let lease = etcd.lease_grant(3600)?;
    let all: Vec<(String, String)> = (0..count).map(lease_kv).collect();
    for chunk in all.chunks(MAX_TXN_OPS) {
        check_interrupt()?;
        etcd.put_all(chunk, lease)?;
    }
    Ok(())
}

/// The pinned SUBNETS map, once the daemon created it.
struct SubnetMap {
    map: PinnedMap,
    pins: PathBuf,
}

/// `<pin-path>/v<layout>/`, whatever the layout version.
fn layout_dir(pin_path: &Path) -> Option<PathBuf> {
    std::fs::read_dir(pin_path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('v'))
                && p.join("SUBNETS").exists()
        })
}

fn open_subnets(pin_path: &Path) -> Option<SubnetMap> {
    let pins = layout_dir(pin_path)?;
    let map = PinnedMap::open(&pins.join("SUBNETS"), 8).ok()?;
    Some(SubnetMap { map, pins })
}

/// Starts the daemon and polls until its map holds `count` entries and it
/// has logged "netd running" (either may come first).
fn start_and_sync(
    cluster: &mut Cluster,
    count: usize,
    r: &mut ControlPlaneResult,
) -> Result<SubnetMap> {
    let pin_path = cluster.host(0).pin_path().to_path_buf();
    let start = Instant::now();
    let daemon = cluster.spawn(0);
    cluster.daemons[0] = Some(daemon);
    let mut map = None;
    let mut running = None;
    let mut synced = None;
    let mut last = 0;
    while start.elapsed() < SYNC_TIMEOUT && (running.is_none() || synced.is_none()) {
        check_interrupt()?;
        let d = cluster.daemons[0].as_mut().context("daemon")?;
        if !d.is_running() {
            bail!("netd exited during sync; log:\n{}", d.log());
        }
        if running.is_none() && d.log().contains("netd running") {
            running = Some(start.elapsed());
        }
        if map.is_none() {
            map = open_subnets(&pin_path);
        }
        if let (Some(m), None) = (&map, synced) {
            last = m.map.count()?;
            if last >= count {
                synced = Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (Some(m), Some(synced), Some(running)) = (map, synced, running) else {
        bail!(
            "after {SYNC_TIMEOUT:?}: map holds {last} of {count} leases; running logged: {running:?}"
        );
    };
    r.start_to_synced_s = synced.as_secs_f64();
    r.start_to_running_s = running.as_secs_f64();
    r.map_entries = last;
    r.peer_entries = PinnedMap::open(&m.pins.join("PEERS"), 4)?.count()?;
    Ok(m)
}

fn scrape_at_scale(cluster: &Cluster, addr: SocketAddr, r: &mut ControlPlaneResult) -> Result<()> {
    let t = Instant::now();
    let response = netd_tests::http::get(cluster.host(0).ns(), addr, "/metrics")
        .with_context(|| format!("GET http://{addr}/metrics"))?;
    r.metrics_scrape_s = t.elapsed().as_secs_f64();
    if response.status != 200 {
        bail!("GET /metrics answered {}", response.status);
    }
    r.metrics_bytes = response.body.len();
    Ok(())
}

fn status_at_scale(cluster: &Cluster, r: &mut ControlPlaneResult) -> Result<()> {
    let t = Instant::now();
    let status = cluster.status(0);
    r.status_s = t.elapsed().as_secs_f64();
    r.status_peers = status["peers"].as_array().map_or(0, Vec::len);
    Ok(())
}

/// One entry to watch: until `key` is in the map (`present`) or gone.
struct Watch {
    key: [u8; 8],
    present: bool,
    since: Instant,
}

/// When a watched change was seen: `None` if not within [`WATCH_TIMEOUT`].
struct Seen {
    since: Instant,
    after: Option<Duration>,
}

/// Polls the map for each watched entry until the channel closes and
/// every watch is seen or timed out.
fn poller(map: PinnedMap, rx: mpsc::Receiver<Watch>) -> JoinHandle<Vec<Seen>> {
    std::thread::spawn(move || {
        let mut pending: Vec<Watch> = Vec::new();
        let mut done = Vec::new();
        let mut open = true;
        while open || !pending.is_empty() {
            loop {
                match rx.try_recv() {
                    Ok(w) => pending.push(w),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            pending.retain(|w| {
                let seen = map
                    .contains(&w.key)
                    .map(|found| found == w.present)
                    .unwrap_or(false);
                let age = w.since.elapsed();
                if seen || age > WATCH_TIMEOUT {
                    let after = seen.then_some(age);
                    done.push(Seen {
                        since: w.since,
                        after,
                    });
                    return false;
                }
                true
            });
            std::thread::sleep(POLL);
        }
        done
    })
}

/// Latencies in ms, how many were never seen, and the time from the first
/// change to the last one seen (the daemon's backlog drained).
fn tally(seen: &[Seen]) -> (Vec<f64>, usize, f64) {
    let ms = seen
        .iter()
        .filter_map(|s| s.after)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let lost = seen.iter().filter(|s| s.after.is_none()).count();
    let first = seen.iter().map(|s| s.since).min();
    let last = seen.iter().filter_map(|s| Some(s.since + s.after?)).max();
    let span = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    (ms, lost, span)
}

/// An address inside lease `i`'s subnet, as the map lookup key.
fn key_of(i: usize) -> [u8; 8] {
    let mut ip = subnet_of(i).octets();
    ip[3] = 1;
    lpm_key(Ipv4Addr::from(ip))
}

/// Puts `plan.joins` new leases at a steady rate; returns (index, lease id)
/// of those that reached the map.
fn join_stream(
    plan: &Plan,
    etcd: &mut EtcdHttp,
    map: &SubnetMap,
    count: usize,
    own: Option<usize>,
    r: &mut ControlPlaneResult,
) -> Result<Vec<(usize, i64)>> {
    let (tx, rx) = mpsc::channel();
    let watcher = poller(PinnedMap::open(&map.pins.join("SUBNETS"), 8)?, rx);
    let indices = (count..).filter(|&i| Some(i) != own).take(plan.joins);
    let mut joined = Vec::new();
    let mut pace = Pace::new(plan.joins_per_sec);
    for i in indices {
        check_interrupt()?;
        pace.wait();
        let lease = etcd.lease_grant(600)?;
        let (key, value) = lease_kv(i);
        let since = Instant::now();
        let _ = tx.send(Watch {
            key: key_of(i),
            present: true,
            since,
        });
        etcd.put(&key, &value, lease)?;
        r.put_ms.push(since.elapsed().as_secs_f64() * 1e3);
        joined.push((i, lease));
    }
    drop(tx);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    (r.join_ms, r.join_lost, r.joins_drained_s) = tally(&seen);
    let map = PinnedMap::open(&map.pins.join("SUBNETS"), 8)?;
    Ok(joined
        .into_iter()
        .filter(|&(i, _)| map.contains(&key_of(i)).unwrap_or(false))
        .collect())
}

/// Revokes the joined leases at the same rate, timing each removal.
fn remove_stream(
    plan: &Plan,
    etcd: &mut EtcdHttp,
    map: &SubnetMap,
    joined: &[(usize, i64)],
    r: &mut ControlPlaneResult,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let watcher = poller(PinnedMap::open(&map.pins.join("SUBNETS"), 8)?, rx);
    let mut pace = Pace::new(plan.joins_per_sec);
    for &(i, lease) in joined {
        check_interrupt()?;
        pace.wait();
        let since = Instant::now();
        let _ = tx.send(Watch {
            key: key_of(i),
            present: false,
            since,
        });
        etcd.lease_revoke(lease)?;
    }
    drop(tx);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    (r.removal_ms, r.removal_lost, r.removals_drained_s) = tally(&seen);
    r.removal_lost += plan.joins - joined.len();
    Ok(())
}

/// A fixed-rate schedule.
struct Pace {
    next: Instant,
    every: Duration,
}

impl Pace {
    fn new(per_sec: f64) -> Self {
        Pace {
            next: Instant::now(),
            every: Duration::from_secs_f64(1.0 / per_sec),
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next += self.every;
    }
}

/// `bytes_memlock` of a pinned map, from bpftool.
fn memlock(pin: &Path) -> Result<u64> {
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["-j", "map", "show", "pinned"]).arg(pin);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool -j map show")?;
    v["bytes_memlock"]
        .as_u64()
        .or_else(|| v["bytes_memlock"].as_str()?.parse().ok())
        .with_context(|| format!("no bytes_memlock in {v}"))
}

fn summary(r: &ControlPlaneResult) -> String {
    let p = |v: &[f64], q: f64| {
        super::report::percentile(v, q).map_or("-".into(), |x| format!("{x:.1}"))
    };
    format!(
        "synced {} in {:.3}s (running at {:.3}s); /metrics {:.3}s ({} bytes); join p50/p99 {}/{} ms; removal p50/p99 {}/{} ms; RSS {} MiB",
        r.map_entries,
        r.start_to_synced_s,
        r.start_to_running_s,
        r.metrics_scrape_s,
        r.metrics_bytes,
        p(&r.join_ms, 50.0),
        p(&r.join_ms, 99.0),
        p(&r.removal_ms, 50.0),
        p(&r.removal_ms, 99.0),
        r.daemon_after_removals.rss_kib / 1024
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_indices_map_to_distinct_subnets_and_back() {
        assert_eq!(subnet_of(0), Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(subnet_of(257), Ipv4Addr::new(10, 2, 1, 0));
        assert_eq!(own_index("10.2.1.0/24"), Some(257));
        assert_eq!(own_index("10.0.5.0/24"), None);
        let (key, value) = lease_kv(251);
        assert_eq!(key, "/netd/network/subnets/10.1.251.0-24");
        assert!(value.contains(r#""PublicIP":"198.19.1.2""#), "{value}");
        assert!(
            value.contains(r#""VtepMAC":"0e:6e:c6:13:01:02""#),
            "{value}"
        );
    }
}
