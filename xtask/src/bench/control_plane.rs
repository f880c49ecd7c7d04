//! The control plane at scale: thousands of simulated remote hosts' leases
//! in the testbed's real etcd, one real netd daemon following them.
//!
//! - full sync: leases written first, then the daemon started; time until
//!   its SUBNETS map holds every one (polled with bpf(2), ~1 ms steps);
//! - join-to-programmed: a steady stream of new leases (each with its own
//!   etcd lease, as a joining host has), time from the put until the entry
//!   is in the map;
//! - leave: the same leases revoked, time until the entry is gone;
//! - burst: joins offered at 1,000/s or more over several etcd connections,
//!   timed as above, and the rate at which the daemon programmed them;
//! - the daemon's RSS and CPU time (CPU per join from the scheduler's
//!   nanosecond run time of its threads, taken once the daemon is idle
//!   after the sync), the maps' kernel memory.
//!
//! The network is 10.0.0.0/8 with /26 subnets (262,143 leasable), which
//! exists only as etcd keys and map entries inside the namespaces; the
//! simulated hosts' public IPs are in 198.18.1.0 to 198.19.255.250, off
//! the testbed's underlay 198.18.0.0/24, and never get traffic.

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
const SUBNET_LEN: u8 = 26;
const SUBNETS_PREFIX: &str = "/netd/network/subnets/";
/// Simulated hosts with distinct public IPs (250 per /24 of [`public_ip`]).
const MAX_SIMULATED: usize = 250 * 511;
/// Longest writing the leases into etcd may take, whatever their number.
const ETCD_WRITE_TIMEOUT: Duration = Duration::from_secs(300);
/// etcd connections the burst is offered over: one cannot commit 1,000
/// puts a second on its own (each waits for its commit).
const BURST_CONNECTIONS: usize = 8;
/// The daemon counts as idle when its threads ran less than this in
/// [`SETTLE_WINDOW`].
const SETTLE_CPU: Duration = Duration::from_millis(2);
const SETTLE_WINDOW: Duration = Duration::from_millis(250);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// The daemon's threads' run time (schedstat, ns) once idle after the
    /// sync, and after the steady joins.
    #[serde(default)]
    pub cpu_ns_synced: u64,
    #[serde(default)]
    pub cpu_ns_after_joins: u64,
    /// Sync done to the daemon idle (the sync task's own resync, the
    /// scrape).
    #[serde(default)]
    pub settle_s: f64,
    /// The burst: joins offered, at what rate (per second, nominal).
    #[serde(default)]
    pub burst_joins: usize,
    #[serde(default)]
    pub burst_per_sec: f64,
    /// Put to entry in the map, ms, for the burst's joins.
    #[serde(default)]
    pub burst_ms: Vec<f64>,
    #[serde(default)]
    pub burst_lost: usize,
    /// The puts' actual rate: joins between the first and the last put.
    #[serde(default)]
    pub burst_offered_per_s: f64,
    /// The daemon's rate: joins between the first and the last one seen
    /// in the map.
    #[serde(default)]
    pub burst_absorbed_per_s: f64,
    /// The burst's etcd lease revoked (every key in one revision) to
    /// every entry gone.
    #[serde(default)]
    pub burst_removal_s: f64,
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
    let simulated = count + plan.joins + plan.burst_joins + 1;
    if simulated > MAX_SIMULATED {
        bail!("{simulated} simulated hosts exceed the bench's {MAX_SIMULATED} public IPs");
    }
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
        &SUBNET_LEN.to_string(),
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
    let synced = Instant::now();
    cluster.wait_ready(0);
    status_at_scale(&cluster, &mut r)?;
    scrape_at_scale(&cluster, metrics, &mut r)?;
    let own = own_index(&cluster.subnet(0));
    // CPU per join counts the joins only, not the start's work.
    settle(pid)?;
    r.settle_s = synced.elapsed().as_secs_f64();
    r.daemon_synced = ProcUsage::read(pid)?;
    r.cpu_ns_synced = thread_cpu_ns(pid)?;

    let mut fresh = (count..).filter(move |&i| Some(i) != own);
    let joins: Vec<usize> = fresh.by_ref().take(plan.joins).collect();
    let joined = join_stream(plan, &mut etcd, &map, &joins, &mut r)?;
    r.cpu_ns_after_joins = thread_cpu_ns(pid)?;
    r.daemon_after_joins = ProcUsage::read(pid)?;
    remove_stream(plan, &mut etcd, &map, &joined, &mut r)?;
    let burst: Vec<usize> = fresh.take(plan.burst_joins).collect();
    burst_stream(plan, &cluster, addr, &mut etcd, &map, &burst, &mut r)?;
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

/// Lease `i` of the simulated hosts: the network's (i + 1)th /26 (the
/// first one is not leasable).
fn subnet_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24) + ((i as u32 + 1) << (32 - SUBNET_LEN)))
}

/// Index of a subnet ("10.a.b.c/26") in the scheme of [`subnet_of`].
fn own_index(subnet: &str) -> Option<usize> {
    let ip: Ipv4Addr = subnet.split('/').next()?.parse().ok()?;
    let n = (u32::from(ip).checked_sub(10u32 << 24)? >> (32 - SUBNET_LEN)) as usize;
    n.checked_sub(1)
}

/// Public IP of simulated host `i`: 198.18.(1 + i/250).(1 + i%250),
/// carried on into 198.19.
fn public_ip(i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    Ipv4Addr::from(base + (((1 + i / 250) as u32) << 8) + (1 + i % 250) as u32)
}

/// A flannel lease for simulated host `i`.
fn lease_kv(i: usize) -> (String, String) {
    let subnet = subnet_of(i);
    let ip = public_ip(i);
    let [a, b, c, d] = ip.octets();
    let key = format!("{SUBNETS_PREFIX}{subnet}-{SUBNET_LEN}");
    let value = format!(
        r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:6e:{a:02x}:{b:02x}:{c:02x}:{d:02x}"}}}}"#
    );
    (key, value)
}

/// The simulated hosts' leases, all bound to one long etcd lease, in
/// transactions of etcd's largest size, within [`ETCD_WRITE_TIMEOUT`].
fn write_bulk(etcd: &mut EtcdHttp, count: usize) -> Result<()> {
    let started = Instant::now();
    let lease = etcd.lease_grant(3600)?;
    let mut chunk = Vec::with_capacity(MAX_TXN_OPS);
    for first in (0..count).step_by(MAX_TXN_OPS) {
        check_interrupt()?;
        if started.elapsed() > ETCD_WRITE_TIMEOUT {
            bail!("only {first} of {count} leases written to etcd after {ETCD_WRITE_TIMEOUT:?}");
        }
        chunk.clear();
        chunk.extend((first..count.min(first + MAX_TXN_OPS)).map(lease_kv));
        etcd.put_all(&chunk, lease)?;
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
        // Walking 100,000 keys every 2 ms would take the daemon's CPU:
        // look up the last lease until it is there, then count.
        if let (Some(m), None) = (&map, synced) {
            let last_in = count == 0 || m.map.contains(&key_of(count - 1))?;
            if last_in {
                last = m.map.count()?;
                if last >= count {
                    synced = Some(start.elapsed());
                }
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
    lpm_key(Ipv4Addr::from(u32::from(subnet_of(i)) + 1))
}

/// Puts `plan.joins` new leases at a steady rate; returns (index, lease id)
/// of those that reached the map.
fn join_stream(
    plan: &Plan,
    etcd: &mut EtcdHttp,
    map: &SubnetMap,
    indices: &[usize],
    r: &mut ControlPlaneResult,
) -> Result<Vec<(usize, i64)>> {
    let (tx, rx) = mpsc::channel();
    let watcher = poller(PinnedMap::open(&map.pins.join("SUBNETS"), 8)?, rx);
    let mut joined = Vec::new();
    let mut pace = Pace::new(plan.joins_per_sec);
    for &i in indices {
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
        Pace::starting(Instant::now(), per_sec)
    }

    fn starting(at: Instant, per_sec: f64) -> Self {
        Pace {
            next: at,
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

/// Puts `indices` as new leases at `plan.burst_per_sec`, spread over
/// [`BURST_CONNECTIONS`] connections, each timed until it is in the map;
/// then revokes them all at once and times the map emptying of them. They
/// share one etcd lease, granted first, so a put is the whole join.
fn burst_stream(
    plan: &Plan,
    cluster: &Cluster,
    addr: SocketAddr,
    etcd: &mut EtcdHttp,
    map: &SubnetMap,
    indices: &[usize],
    r: &mut ControlPlaneResult,
) -> Result<()> {
    r.burst_joins = indices.len();
    r.burst_per_sec = plan.burst_per_sec;
    if indices.is_empty() {
        return Ok(());
    }
    let lease = etcd.lease_grant(600)?;
    let (tx, rx) = mpsc::channel();
    let watcher = poller(PinnedMap::open(&map.pins.join("SUBNETS"), 8)?, rx);
    let per_conn = plan.burst_per_sec / BURST_CONNECTIONS as f64;
    let conns = (0..BURST_CONNECTIONS)
        .map(|_| EtcdHttp::connect(cluster.topo.switch(), addr))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now() + Duration::from_millis(20);
    let puts: Vec<Result<Vec<Instant>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(c, mut conn)| {
                let tx = tx.clone();
                let mine: Vec<usize> = indices
                    .iter()
                    .copied()
                    .skip(c)
                    .step_by(BURST_CONNECTIONS)
                    .collect();
                // Connection c is offset by c slots: together they offer
                // one join every 1/burst_per_sec.
                let at = start + Duration::from_secs_f64(c as f64 / plan.burst_per_sec);
                scope.spawn(move || -> Result<Vec<Instant>> {
                    let mut pace = Pace::starting(at, per_conn);
                    let mut sent = Vec::with_capacity(mine.len());
                    for i in mine {
                        check_interrupt()?;
                        pace.wait();
                        let (key, value) = lease_kv(i);
                        let since = Instant::now();
                        let _ = tx.send(Watch {
                            key: key_of(i),
                            present: true,
                            since,
                        });
                        conn.put(&key, &value, lease)?;
                        sent.push(since);
                    }
                    Ok(sent)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("burst thread panicked")))
            .collect()
    });
    drop(tx);
    let seen = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let mut sent = Vec::new();
    for p in puts {
        sent.extend(p?);
    }
    (r.burst_ms, r.burst_lost, _) = tally(&seen);
    r.burst_offered_per_s = rate(sent.iter().copied());
    r.burst_absorbed_per_s = rate(seen.iter().filter_map(|s| Some(s.since + s.after?)));

    let revoked = Instant::now();
    etcd.lease_revoke(lease)?;
    let map = PinnedMap::open(&map.pins.join("SUBNETS"), 8)?;
    let mut left: Vec<[u8; 8]> = indices.iter().map(|&i| key_of(i)).collect();
    while !left.is_empty() && revoked.elapsed() < WATCH_TIMEOUT {
        check_interrupt()?;
        left.retain(|k| map.contains(k).unwrap_or(true));
        std::thread::sleep(Duration::from_millis(1));
    }
    if !left.is_empty() {
        bail!(
            "{} burst entries still in the map {WATCH_TIMEOUT:?} after the revoke",
            left.len()
        );
    }
    r.burst_removal_s = revoked.elapsed().as_secs_f64();
    Ok(())
}

/// Events per second between the first and the last of `times`.
fn rate(times: impl Iterator<Item = Instant>) -> f64 {
    let (mut n, mut first, mut last) = (0usize, None::<Instant>, None::<Instant>);
    for t in times {
        n += 1;
        first = Some(first.map_or(t, |f| f.min(t)));
        last = Some(last.map_or(t, |l| l.max(t)));
    }
    match (first, last) {
        (Some(f), Some(l)) if n > 1 && l > f => (n - 1) as f64 / (l - f).as_secs_f64(),
        _ => 0.0,
    }
}

/// Run time of every thread of `pid` so far, in ns (first field of each
/// `/proc/<pid>/task/<tid>/schedstat`): `/proc/<pid>/stat` counts in
/// 10 ms ticks, too coarse for a fraction of a millisecond per join.
fn thread_cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// Waits until the daemon's threads are idle: less than [`SETTLE_CPU`] of
/// run time in a [`SETTLE_WINDOW`].
fn settle(pid: u32) -> Result<()> {
    let start = Instant::now();
    let mut before = thread_cpu_ns(pid)?;
    while start.elapsed() < SETTLE_TIMEOUT {
        check_interrupt()?;
        std::thread::sleep(SETTLE_WINDOW);
        let now = thread_cpu_ns(pid)?;
        if now.saturating_sub(before) < SETTLE_CPU.as_nanos() as u64 {
            return Ok(());
        }
        before = now;
    }
    bail!("the daemon was still busy {SETTLE_TIMEOUT:?} after the sync")
}

impl ControlPlaneResult {
    /// Daemon CPU per steady join, µs.
    pub fn cpu_us_per_join(&self) -> Option<f64> {
        let ns = self.cpu_ns_after_joins.checked_sub(self.cpu_ns_synced)?;
        (self.cpu_ns_synced > 0 && self.joins > 0).then(|| ns as f64 / 1e3 / self.joins as f64)
    }

    /// The daemon's peak resident memory over the run, MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        [
            &self.daemon_synced,
            &self.daemon_after_joins,
            &self.daemon_after_removals,
        ]
        .iter()
        .map(|u| u.rss_peak_kib.max(u.rss_kib))
        .max()
        .unwrap_or(0) as f64
            / 1024.0
    }
}

/// One row of the goals table: what, the figure, whether it is met
/// (`None`: not measured in this run).
pub struct Goal {
    pub what: &'static str,
    pub value: Option<String>,
    pub met: Option<bool>,
}

fn goal(
    what: &'static str,
    value: Option<f64>,
    fmt: impl Fn(f64) -> String,
    ok: impl Fn(f64) -> bool,
) -> Goal {
    let value = value.filter(|v| v.is_finite());
    Goal {
        what,
        value: value.map(&fmt),
        met: value.map(ok),
    }
}

/// The control plane's goals, from the runs at 1,000, 10,000 and 100,000.
pub fn goals(cps: &[ControlPlaneResult]) -> Vec<Goal> {
    let at = |n: usize| cps.iter().find(|c| c.leases == n);
    let p99 = |v: &[f64]| super::report::percentile(v, 99.0);
    let ms = |x: f64| format!("{x:.1} ms");
    let burst = at(10_000).filter(|c| c.burst_lost == 0 && !c.burst_ms.is_empty());
    let burst_p99 = burst.and_then(|c| p99(&c.burst_ms));
    vec![
        goal(
            "full sync of 100,000 leases < 1 s (daemon start to a full map)",
            at(100_000).map(|c| c.start_to_synced_s),
            |x| format!("{x:.3} s"),
            |x| x < 1.0,
        ),
        goal(
            "join-to-programmed p99 < 10 ms at 100,000 leases",
            at(100_000).and_then(|c| p99(&c.join_ms)),
            ms,
            |x| x < 10.0,
        ),
        goal(
            "daemon CPU per join at 100,000 leases ≤ 2× at 1,000",
            at(100_000)
                .and_then(|c| c.cpu_us_per_join())
                .zip(at(1_000).and_then(|c| c.cpu_us_per_join()))
                .map(|(big, small)| big / small),
            |x| format!("{x:.2}×"),
            |x| x <= 2.0,
        ),
        goal(
            "≥ 1,000 joins/s absorbed at 10,000 leases (none lost)",
            burst.map(|c| c.burst_absorbed_per_s),
            |x| format!("{x:.0}/s"),
            |x| x >= 1000.0,
        ),
        goal("join p99 < 50 ms in that burst", burst_p99, ms, |x| {
            x < 50.0
        }),
        goal(
            "RSS < 100 MiB at 100,000 leases (peak, VmHWM)",
            at(100_000).map(ControlPlaneResult::peak_rss_mib),
            |x| format!("{x:.1} MiB"),
            |x| x < 100.0,
        ),
    ]
}

/// The control-plane table of `report.md`.
pub fn section(s: &mut String, cps: &[ControlPlaneResult]) {
    use std::fmt::Write as _;
    let p = |v: &[f64], q: f64| {
        super::report::percentile(v, q).map_or("-".into(), |x| format!("{x:.2}"))
    };
    let _ = writeln!(
        s,
        "## Control plane (one daemon, simulated remote leases in etcd)\n"
    );
    let _ = writeln!(
        s,
        "| leases | etcd write s | start → running s | start → map full s | join p50 / p99 / max ms (lost) | put p50 ms | removal p50 / p99 ms (lost) | daemon CPU µs per join | burst offered / absorbed per s | burst p50 / p99 / max ms (lost) | burst revoke → gone s | RSS MiB (peak) | SUBNETS / PEERS KiB | status s |"
    );
    let _ = writeln!(
        s,
        "| ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | --- | ---: | --- | --- | ---: |"
    );
    for c in cps {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.3} | {:.3} | {} / {} / {} ({}) | {} | {} / {} ({}) | {} | {:.0} / {:.0} | {} / {} / {} ({}) | {:.3} | {:.1} ({:.1}) | {} / {} | {:.2} |",
            c.leases,
            c.etcd_write_s,
            c.start_to_running_s,
            c.start_to_synced_s,
            p(&c.join_ms, 50.0),
            p(&c.join_ms, 99.0),
            p(&c.join_ms, 100.0),
            c.join_lost,
            p(&c.put_ms, 50.0),
            p(&c.removal_ms, 50.0),
            p(&c.removal_ms, 99.0),
            c.removal_lost,
            c.cpu_us_per_join()
                .map_or("-".into(), |x| format!("{x:.0}")),
            c.burst_offered_per_s,
            c.burst_absorbed_per_s,
            p(&c.burst_ms, 50.0),
            p(&c.burst_ms, 99.0),
            p(&c.burst_ms, 100.0),
            c.burst_lost,
            c.burst_removal_s,
            c.daemon_after_removals.rss_kib as f64 / 1024.0,
            c.peak_rss_mib(),
            c.subnets_memlock / 1024,
            c.peers_memlock / 1024,
            c.status_s
        );
    }
    s.push('\n');
}

/// What a run at `n` leases failed to produce.
pub fn missing(n: usize, c: &ControlPlaneResult) -> Vec<String> {
    let mut missing = Vec::new();
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
    if c.burst_joins > 0 && (c.burst_ms.is_empty() || c.burst_lost > 0) {
        missing.push(format!(
            "control plane at {n}: {} of {} burst joins programmed",
            c.burst_ms.len(),
            c.burst_joins
        ));
    }
    if c.daemon_synced.rss_kib == 0 || c.subnets_memlock == 0 || c.cpu_us_per_join().is_none() {
        missing.push(format!("control plane at {n}: RSS, CPU or map memory"));
    }
    missing
}

fn summary(r: &ControlPlaneResult) -> String {
    let p = |v: &[f64], q: f64| {
        super::report::percentile(v, q).map_or("-".into(), |x| format!("{x:.1}"))
    };
    format!(
        "synced {} in {:.3}s (running at {:.3}s); /metrics {:.3}s ({} bytes); join p50/p99 {}/{} ms, {} µs CPU each; removal p50/p99 {}/{} ms; burst {:.0}/s offered, {:.0}/s absorbed, p99 {} ms, {} lost; RSS {} MiB (peak {:.1})",
        r.map_entries,
        r.start_to_synced_s,
        r.start_to_running_s,
        r.metrics_scrape_s,
        r.metrics_bytes,
        p(&r.join_ms, 50.0),
        p(&r.join_ms, 99.0),
        r.cpu_us_per_join()
            .map_or("-".into(), |x| format!("{x:.0}")),
        p(&r.removal_ms, 50.0),
        p(&r.removal_ms, 99.0),
        r.burst_offered_per_s,
        r.burst_absorbed_per_s,
        p(&r.burst_ms, 99.0),
        r.burst_lost,
        r.daemon_after_removals.rss_kib / 1024,
        r.peak_rss_mib()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_indices_map_to_distinct_subnets_and_back() {
        assert_eq!(subnet_of(0), Ipv4Addr::new(10, 0, 0, 64));
        assert_eq!(subnet_of(257), Ipv4Addr::new(10, 0, 64, 128));
        assert_eq!(own_index("10.0.64.128/26"), Some(257));
        assert_eq!(own_index("10.0.0.0/26"), None);
        assert_eq!(
            own_index(&format!("{}/26", subnet_of(99_999))),
            Some(99_999)
        );
        let (key, value) = lease_kv(251);
        assert_eq!(key, "/netd/network/subnets/10.0.63.0-26");
        assert!(value.contains(r#""PublicIP":"198.18.2.2""#), "{value}");
        assert!(
            value.contains(r#""VtepMAC":"0e:6e:c6:12:02:02""#),
            "{value}"
        );
        // Off the testbed's underlay, distinct up to the last one.
        assert_eq!(public_ip(0), Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(
            public_ip(MAX_SIMULATED - 1),
            Ipv4Addr::new(198, 19, 255, 250)
        );
        assert_ne!(public_ip(249), public_ip(250));
        // The lookup address is inside the lease's own subnet.
        assert_eq!(key_of(2)[4..], [10, 0, 0, 193]);
    }
}
