//! Long-running and edge-of-the-envelope behaviour: lease churn under live
//! traffic (maps stay equal to etcd, no packet lost, no fd or memory
//! growth), the overlay MTU (1450 inside, learnt by senders, never a TCP
//! stall, oversized DF packets answered with ICMP fragmentation-needed,
//! oversized others delivered or counted, never lost silently), live
//! spoofing from inside a running container, and a quiet clean stop.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use netd_tests::bpftool::map_dump;
use netd_tests::counters::{delta, deltas};
use netd_tests::lease::{lease_key, lease_value, vtep_mac};
use netd_tests::links::default_gateway;
use netd_tests::strip_ansi;
use netd_tests::traffic::{Pattern, ping_args};
use netd_tests::util::output_text;
use netd_tests::{
    Cluster, Etcd, IcmpSocket, NsRef, SendOpts, internet_checksum, require_root, tcp_transfer,
    udp_sender, wait_for,
};
use serde_json::Value;

/// How long a host may take to follow etcd once churn pauses.
const CONVERGE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// `ip -j link show dev IFACE` in `ns`, parsed (with `-s`, statistics too).
fn link_json(ns: &NsRef, iface: &str, stats: bool) -> Value {
    let mut argv = vec!["ip", "-j"];
    if stats {
        argv.push("-s");
    }
    argv.extend(["link", "show", "dev", iface]);
    let out = ns.run_ok(&argv);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j link: {e}: {out}"));
    v[0].clone()
}

/// The bytes of a BTF-formatted `u8` array (`[198, 19, 0, 1]`).
fn btf_ip(v: &Value, what: &str) -> String {
    let bytes: Vec<u8> = v
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not a BTF-formatted array: {v}"))
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).expect("byte"))
        .collect();
    assert_eq!(bytes.len(), 4, "{what}: {v}");
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()
}

/// Underlay addresses in host `i`'s `PEERS` map (bpftool, through BTF).
fn peers_map(cluster: &Cluster, i: usize) -> BTreeSet<String> {
    map_dump(
        &cluster
            .host(i)
            .pin_path()
            .join(netd_tests::layout_dir())
            .join("PEERS"),
    )
    .iter()
    .map(|e| {
        let key = e
            .get("formatted")
            .map(|f| &f["key"])
            .unwrap_or_else(|| panic!("PEERS entry without BTF formatting: {e}"));
        btf_ip(key, "PEERS key")
    })
    .collect()
}

/// Number of entries in host `i`'s `SUBNETS` map (bpftool).
fn subnets_map_len(cluster: &Cluster, i: usize) -> usize {
    map_dump(
        &cluster
            .host(i)
            .pin_path()
            .join(netd_tests::layout_dir())
            .join("SUBNETS"),
    )
    .len()
}

/// Host `i`'s peers from `netd status`: subnet → (public IP, VTEP MAC).
fn status_peers(cluster: &Cluster, i: usize) -> BTreeMap<String, (String, String)> {
    cluster.status(i)["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .map(|p| {
            (
                p["subnet"].as_str().unwrap().to_string(),
                (
                    p["public_ip"].as_str().unwrap().to_string(),
                    p["vtep_mac"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// Waits until every host's maps equal etcd exactly: status peers (subnet,
/// public IP, VTEP MAC) == etcd leases minus its own, `SUBNETS` has as many
/// entries, and `PEERS` == the distinct public IPs of those leases. Returns
/// the number of other-host leases each host holds and how long it took.
///
/// Leases with a TTL may expire while the maps are read, so a comparison
/// only counts when etcd read the same before and after the kernel maps.
fn assert_maps_equal_etcd(cluster: &Cluster, what: &str) -> (Vec<usize>, Duration) {
    let started = Instant::now();
    let hosts = cluster.topo.hosts().len();
    let own: Vec<String> = (0..hosts).map(|i| cluster.subnet(i)).collect();
    let mut sizes = Vec::new();
    for (i, own) in own.iter().enumerate() {
        let want = || -> BTreeMap<String, (String, String)> {
            let mut leases = cluster.etcd_leases();
            leases.remove(own);
            leases
                .into_iter()
                .map(|(s, ip)| {
                    let mac = vtep_mac(ip.parse().expect("PublicIP"));
                    (s, (ip, mac))
                })
                .collect()
        };
        let mut mismatch = String::new();
        let mut size = 0;
        let ok = netd_tests::poll_until(CONVERGE, || {
            let etcd = want();
            let status = status_peers(cluster, i);
            let subnets = subnets_map_len(cluster, i);
            let peers = peers_map(cluster, i);
            if want() != etcd {
                mismatch = "etcd kept changing (leases expiring)".into();
                return false;
            }
            let ips: BTreeSet<String> = etcd.values().map(|(ip, _)| ip.clone()).collect();
            mismatch = if status != etcd {
                let missing: Vec<_> = etcd.keys().filter(|k| !status.contains_key(*k)).collect();
                let stale: Vec<_> = status.keys().filter(|k| !etcd.contains_key(*k)).collect();
                format!(
                    "status peers != etcd: {} in etcd, {} in map; missing from map \
                     {missing:?}, stale in map {stale:?}",
                    etcd.len(),
                    status.len()
                )
            } else if subnets != etcd.len() {
                format!(
                    "SUBNETS (bpftool) has {subnets} entries, etcd {} other leases",
                    etcd.len()
                )
            } else if peers != ips {
                format!(
                    "PEERS (bpftool) != distinct public IPs of the other leases: \
                     missing {:?}, extra {:?}",
                    ips.difference(&peers).collect::<Vec<_>>(),
                    peers.difference(&ips).collect::<Vec<_>>()
                )
            } else {
                size = etcd.len();
                return true;
            };
            false
        });
        assert!(
            ok,
            "{what}: host {i}'s maps != etcd after {CONVERGE:?}: {mismatch}"
        );
        sizes.push(size);
    }
    (sizes, started.elapsed())
}

// ---------------------------------------------------------------------------
// 1. Churn soak
// ---------------------------------------------------------------------------

/// Simulated peers that join and leave over the soak.
const CYCLES: usize = 1000;
/// Peers per etcd transaction.
const BATCH: usize = 10;
/// Most simulated peers present at once.
const MAX_PRESENT: usize = 80;
/// The churn is paced over about this long.
const CHURN_FOR: Duration = Duration::from_secs(45);
/// TTL of the etcd leases of peers that leave by expiry.
const EXPIRE_TTL: u64 = 3;
/// Bounds on the daemon's resources after the soak.
const MAX_FD_GROWTH: usize = 10;
const MAX_RSS_KIB: u64 = 64 * 1024;

/// How a batch of simulated peers leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leave {
    /// Plain keys, deleted in one transaction.
    Delete,
    /// Keys bound to an etcd lease, which is revoked.
    Revoke,
    /// Keys bound to a short etcd lease that is never renewed.
    Expire,
}

struct Batch {
    peers: Vec<usize>,
    leave: Leave,
    lease: i64,
}

/// Every leasable /24 of 10.244.0.0/14 except the hosts' own, in a
/// scattered (but fixed) order.
fn sim_subnets(taken: &[String]) -> Vec<String> {
    // 1023 leasable subnets: 10.244.1.0 .. 10.247.255.0 (SubnetMin is the
    // second subnet); 389 is coprime with 1023, so this is a permutation.
    (0..1023u32)
        .map(|j| (j * 389) % 1023 + 1)
        .map(|n| format!("10.{}.{}.0/24", 244 + n / 256, n % 256))
        .filter(|s| !taken.contains(s))
        .collect()
}

/// Public IP of simulated peer `p` (198.19.0.0/16). Every tenth peer shares
/// the IP of a peer from an earlier batch, so one underlay address backs two
/// subnets for a while and must stay in PEERS until both are gone.
fn sim_ip(p: usize) -> Ipv4Addr {
    let owner = if p % 10 == 9 && p >= 15 { p - 15 } else { p };
    Ipv4Addr::new(198, 19, (owner / 200) as u8, (owner % 200) as u8 + 1)
}

/// Runs `etcdctl ARGS…` in etcd's namespace with `input` on stdin.
fn etcdctl_stdin(etcd: &Etcd, args: &[&str], input: &str) -> String {
    let mut cmd = etcd.ns().command("etcdctl");
    cmd.args(["--endpoints", &etcd.endpoint()])
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run etcdctl (install etcd-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .expect("write etcdctl stdin");
    let out = child.wait_with_output().expect("etcdctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("FAILURE"),
        "etcdctl {args:?} failed ({}):\n{}\ninput:\n{input}",
        out.status,
        output_text(&out)
    );
    text
}

/// One transaction with `ops` (`put …` / `del …` lines) and no conditions.
fn etcd_txn(etcd: &Etcd, ops: &[String]) {
    // Empty compares, the ops, empty failure ops; every section ends with
    // an empty line (etcdctl 3.4 treats EOF inside a section as an error).
    let input = format!("\n{}\n\n\n", ops.join("\n"));
    let out = etcdctl_stdin(etcd, &["txn"], &input);
    assert!(out.contains("SUCCESS"), "txn did not succeed: {out}");
}

/// Puts `batch`'s leases, bound to its etcd lease unless it leaves by delete.
fn join(etcd: &Etcd, subnets: &[String], batch: &Batch) {
    let lease = if batch.lease != 0 {
        format!("--lease={:x} ", batch.lease)
    } else {
        String::new()
    };
    let ops: Vec<String> = batch
        .peers
        .iter()
        .map(|&p| {
            // etcdctl unquotes Go-style double-quoted strings; Rust's Debug
            // formatting of ASCII strings is compatible.
            format!(
                "put {lease}{} {:?}",
                lease_key(&subnets[p]),
                lease_value(sim_ip(p))
            )
        })
        .collect();
    etcd_txn(etcd, &ops);
}

/// Removes `batch`'s leases from etcd the way it was made to leave.
fn leave(etcd: &Etcd, subnets: &[String], batch: &Batch) {
    match batch.leave {
        Leave::Delete => {
            let ops: Vec<String> = batch
                .peers
                .iter()
                .map(|&p| format!("del {}", lease_key(&subnets[p])))
                .collect();
            etcd_txn(etcd, &ops);
        }
        Leave::Revoke => etcd.lease_revoke(batch.lease),
        Leave::Expire => wait_for(
            &format!("etcd lease {:x} (TTL {EXPIRE_TTL}s) to expire", batch.lease),
            Duration::from_secs(20),
            || etcd.lease_ttl(batch.lease).is_none(),
        ),
    }
}

/// Each host's map holds the other real host plus the simulated peers
/// present (those leaving by expiry may already have expired).
fn assert_present(sizes: &[usize], present: &VecDeque<Batch>) {
    let max = present.len() * BATCH + 1;
    let min = present.iter().filter(|b| b.leave != Leave::Expire).count() * BATCH + 1;
    for (h, &n) in sizes.iter().enumerate() {
        assert!(
            (min..=max).contains(&n),
            "host {h} holds {n} peers; {min}..={max} expected"
        );
    }
}

/// Open file descriptors and resident memory (KiB) of process `pid`.
fn resources(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    (fds, rss)
}

/// Pings `to` from `from` at least every 10 ms in back-to-back runs of 250
/// until
/// `stop`; returns (transmitted, received, outputs of runs that lost any,
/// how long it pinged).
fn ping_loop(
    from: NsRef,
    to: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(u64, u64, Vec<String>, Duration)> {
    thread::spawn(move || {
        let started = Instant::now();
        let (mut sent, mut got, mut bad) = (0u64, 0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            // `-i 0.01` comes out at one per 16 ms (ping's timer rounding);
            // `-i 0.008` gives one per 8 ms.
            let s = ping_args(&from, &["-q", "-i", "0.008", "-W", "2", "-c", "250"], to);
            sent += u64::from(s.transmitted);
            got += u64::from(s.received);
            if s.transmitted == 0 || s.received != s.transmitted {
                bad.push(s.output);
            }
        }
        (sent, got, bad, started.elapsed())
    })
}

/// A TCP connection from `from` to `to` carrying a paced pattern stream
/// (about 1.6 MB/s) until `stop`, checked byte by byte on arrival. Returns
/// handles yielding the bytes sent and the bytes received intact.
fn tcp_stream(
    from: &NsRef,
    to: &NsRef,
    dst: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> (JoinHandle<u64>, JoinHandle<Result<u64, String>>) {
    let port = dst.port();
    let listener = to.run_in_thread(move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind stream listener")
    });
    let receiver = thread::spawn(move || -> Result<u64, String> {
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut pattern = Pattern::new(0x50a_c0de);
        let (mut buf, mut want) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut count = 0u64;
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) => return Ok(count),
                Ok(n) => n,
                Err(e) => return Err(format!("read after {count} bytes: {e}")),
            };
            pattern.fill(&mut want[..n]);
            if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
                return Err(format!("corrupted byte at offset {}", count + i as u64));
            }
            count += n as u64;
        }
    });
    let mut conn = from.run_in_thread(move || {
        TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(10))
            .expect("connect stream")
    });
    let sender = thread::spawn(move || {
        conn.set_write_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut pattern = Pattern::new(0x50a_c0de);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            pattern.fill(&mut chunk);
            conn.write_all(&chunk)
                .unwrap_or_else(|e| panic!("stream write after {sent} bytes: {e}"));
            sent += chunk.len() as u64;
            thread::sleep(Duration::from_millis(10));
        }
        conn.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        sent
    });
    (sender, receiver)
}

#[test]
fn churn_soak_keeps_maps_exact_traffic_lossless_and_daemon_bounded() {
    require_root();
    let mut cluster = Cluster::with_network(
        2,
        "tc",
        &["--network", "10.244.0.0/14", "--subnet-len", "24"],
    );
    cluster.start(0);
    cluster.start(1);
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    let (sizes, _) = assert_maps_equal_etcd(&cluster, "before churn");
    assert_eq!(sizes, [1, 1]);
    cluster.assert_ping(a, b, 3, Duration::ZERO);
    cluster.assert_ping(b, a, 3, Duration::ZERO);

    let own = [cluster.subnet(0), cluster.subnet(1)];
    let subnets = sim_subnets(&own);
    assert!(subnets.len() >= CYCLES, "{} free subnets", subnets.len());
    let pids = [cluster.daemon_pid(0), cluster.daemon_pid(1)];
    let before = [resources(pids[0]), resources(pids[1])];

    // Traffic for the whole soak: a ping at least every 10 ms and a checked
    // TCP stream.
    let stop = Arc::new(AtomicBool::new(false));
    let (ca, cb) = (cluster.container(a), cluster.container(b));
    let pinger = ping_loop(ca.ns.handle(), cb.ip, stop.clone());
    let (stream_tx, stream_rx) = tcp_stream(
        &ca.ns.handle(),
        &cb.ns.handle(),
        SocketAddrV4::new(cb.ip, 5201),
        stop.clone(),
    );

    let etcd = cluster.topo.etcd();
    let batches = CYCLES / BATCH;
    let pace = CHURN_FOR / batches as u32;
    let mut present: VecDeque<Batch> = VecDeque::new();
    let (mut joined, mut left, mut peak) = (0usize, 0usize, 0usize);
    let mut peak_rss = [0u64; 2];
    let churn_start = Instant::now();
    for n in 0..batches {
        while present.len() * BATCH + BATCH > MAX_PRESENT {
            let old = present.pop_front().unwrap();
            leave(etcd, &subnets, &old);
            left += old.peers.len();
        }
        let leave_by = [Leave::Delete, Leave::Revoke, Leave::Expire][n % 3];
        let lease = match leave_by {
            Leave::Delete => 0,
            Leave::Revoke => etcd.lease_grant(120),
            Leave::Expire => etcd.lease_grant(EXPIRE_TTL),
        };
        let batch = Batch {
            peers: (n * BATCH..(n + 1) * BATCH).collect(),
            leave: leave_by,
            lease,
        };
        join(etcd, &subnets, &batch);
        joined += batch.peers.len();
        present.push_back(batch);
        peak = peak.max(present.len() * BATCH);
        if n % 10 == 0 {
            for h in 0..2 {
                peak_rss[h] = peak_rss[h].max(resources(pids[h]).1);
            }
        }
        // Halfway: pause and check that the maps caught up exactly.
        if n == batches / 2 {
            let (sizes, took) = assert_maps_equal_etcd(&cluster, "halfway through the churn");
            eprintln!("soak: halfway, maps equal etcd after {took:?} ({sizes:?} peers)");
            assert_present(&sizes, &present);
        }
        let due = churn_start + pace * (n as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let churn_time = churn_start.elapsed();

    // With the last batches still present, then after every peer left.
    let (sizes, took) = assert_maps_equal_etcd(&cluster, "after the last join");
    eprintln!("soak: after the last join, maps equal etcd after {took:?} ({sizes:?} peers)");
    assert_present(&sizes, &present);
    while let Some(old) = present.pop_front() {
        leave(etcd, &subnets, &old);
        left += old.peers.len();
    }
    let total_time = churn_start.elapsed();
    let (sizes, took) = assert_maps_equal_etcd(&cluster, "after every simulated peer left");
    assert_eq!(sizes, [1, 1], "only the other real host is left");
    assert_eq!((joined, left), (CYCLES, CYCLES));

    stop.store(true, Ordering::Relaxed);
    let (sent, received, lossy, pinged) = pinger.join().expect("ping thread");
    let stream_sent = stream_tx.join().expect("stream sender");
    let stream_got = stream_rx.join().expect("stream receiver");
    let after = [resources(pids[0]), resources(pids[1])];
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }

    let log_warnings: Vec<String> = (0..2)
        .flat_map(|i| {
            let log = strip_ansi(&cluster.daemons[i].as_ref().unwrap().log());
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(|l| format!("host {i}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();

    eprintln!(
        "soak: {CYCLES} join/leave cycles in {} batches of {BATCH} (≤{MAX_PRESENT} present, peak {peak}), \
         churn {churn_time:.1?} ({:.1} cycles/s), all left after {total_time:.1?}; \
         final convergence {took:?}",
        batches,
        CYCLES as f64 / total_time.as_secs_f64()
    );
    for h in 0..2 {
        eprintln!(
            "soak: host {h} daemon pid {}: fds {} -> {}, RSS {} KiB -> {} KiB (peak sampled {} KiB)",
            pids[h],
            before[h].0,
            after[h].0,
            before[h].1,
            after[h].1,
            peak_rss[h].max(after[h].1)
        );
    }
    eprintln!(
        "soak: ping -i 0.008 for {pinged:.1?} (one per {:.1} ms on average): {sent} sent, \
         {received} received, {} lost; TCP stream: {stream_sent} bytes sent, \
         {stream_got:?} received intact",
        pinged.as_secs_f64() * 1000.0 / sent.max(1) as f64,
        sent - received
    );

    assert!(
        sent >= 1000,
        "too few pings sent ({sent}): the ping loop did not run"
    );
    assert_eq!(
        received,
        sent,
        "pings between the stable containers were lost during churn:\n{}",
        lossy.join("\n---\n")
    );
    assert_eq!(
        stream_got,
        Ok(stream_sent),
        "the TCP stream across the churn was cut or corrupted"
    );
    for h in 0..2 {
        let ((fd0, _), (fd1, rss1)) = (before[h], after[h]);
        assert!(
            fd1 <= fd0 + MAX_FD_GROWTH,
            "host {h}: daemon fds grew from {fd0} to {fd1} over {CYCLES} cycles (leak?)"
        );
        assert!(
            rss1 < MAX_RSS_KIB && peak_rss[h] < MAX_RSS_KIB,
            "host {h}: daemon RSS {rss1} KiB (peak {} KiB) >= {MAX_RSS_KIB} KiB",
            peak_rss[h]
        );
    }
    assert!(
        log_warnings.is_empty(),
        "valid leases and a healthy etcd produced warnings:\n{}",
        log_warnings.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 2. MTU
// ---------------------------------------------------------------------------

/// The overlay MTU: underlay 1500 minus 50 bytes of VXLAN.
const OVERLAY_MTU: u64 = 1450;

/// TCP_MAXSEG of a fresh connection from `from` to a listener in `to`
/// (client side, server side).
fn connection_mss(from: &NsRef, to: &NsRef, dst: SocketAddrV4) -> (i32, i32) {
    fn mss(sock: &impl AsRawFd) -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                &mut v as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt TCP_MAXSEG");
        v
    }
    let port = dst.port();
    let listener =
        to.run_in_thread(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind"));
    let client = from.run_in_thread(move || {
        TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(10)).expect("connect")
    });
    let (server, _) = listener.accept().expect("accept");
    // Exchange a byte each way so both ends have settled their MSS.
    let (mut c, mut s) = (&client, &server);
    c.write_all(b"x").unwrap();
    let mut byte = [0u8];
    s.read_exact(&mut byte).unwrap();
    s.write_all(b"y").unwrap();
    c.read_exact(&mut byte).unwrap();
    (mss(&client), mss(&server))
}

#[test]
fn overlay_mtu_is_learnt_tcp_never_stalls_and_oversized_df_gets_frag_needed() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    cluster.assert_ping(a, b, 2, Duration::ZERO);
    let (ca, cb) = (cluster.container(a), cluster.container(b));
    let (na, nb) = (ca.ns.handle(), cb.ns.handle());
    for (c, ns) in [(ca, &na), (cb, &nb)] {
        assert_eq!(
            link_json(ns, "eth0", false)["mtu"].as_u64(),
            Some(OVERLAY_MTU),
            "container {} eth0 MTU",
            c.ip
        );
    }

    // (a) 1450-byte DF packets cross; 1451 bytes fail at the sender, which
    // knows the MTU.
    for (from, dst) in [(&na, cb.ip), (&nb, ca.ip)] {
        let fit = ping_args(
            from,
            &["-M", "do", "-s", "1422", "-c", "3", "-i", "0.2", "-W", "2"],
            dst,
        );
        assert!(
            fit.all_received(),
            "1450-byte DF pings to {dst} were not all answered:\n{}",
            fit.output
        );
        let over = ping_args(from, &["-M", "do", "-s", "1423", "-c", "1", "-W", "1"], dst);
        let text = over.output.to_lowercase();
        assert!(
            over.received == 0 && text.contains("message too long") && text.contains("mtu=1450"),
            "a 1451-byte DF ping to {dst} should fail locally with 'message too long, mtu=1450':\n{}",
            over.output
        );
    }

    // (b) Bulk TCP both ways completes, with segments that fit the overlay.
    for (from, to, dst) in [(&na, &nb, cb.ip), (&nb, &na, ca.ip)] {
        let started = Instant::now();
        let t = tcp_transfer(from, to, SocketAddr::new(dst.into(), 5301), 8 << 20)
            .unwrap_or_else(|e| panic!("8 MiB TCP to {dst} failed: {e:#}"));
        assert_eq!(t.bytes, 8 << 20);
        eprintln!("mtu: 8 MiB TCP to {dst} in {:?}", started.elapsed());
        let (client, server) = connection_mss(from, to, SocketAddrV4::new(dst, 5302));
        eprintln!("mtu: TCP_MAXSEG to {dst}: client {client}, server {server}");
        assert!(
            client <= 1410 && server <= 1410 && client > 1000 && server > 1000,
            "MSS to {dst}: client {client}, server {server}; want 1000 < mss <= 1410"
        );
    }

    // (c) Container A raises its own MTU to 1500 and sends 1500-byte DF
    // packets: each is answered with an ICMP fragmentation-needed from A's
    // gateway carrying the overlay MTU, which reaches A's stack (a raw
    // ICMP socket in A sees it) and teaches A the path MTU.
    na.run_ok(&["ip", "link", "set", "eth0", "mtu", "1500"]);
    let gw = default_gateway(&na);
    let mut icmp = IcmpSocket::open(&na);
    let tx = udp_sender(
        &na,
        SocketAddr::from((ca.ip, 0)),
        SendOpts {
            ttl: 64,
            tos: 0,
            df: true,
        },
    );
    let (sport, dport) = (tx.local_addr().unwrap().port(), 5303u16);
    let (h0, h1) = (cluster.counters(0), cluster.counters(1));
    let sent = 3;
    for _ in 0..sent {
        tx.send_to(&[0x5a; 1472], (cb.ip, dport))
            .expect("a 1500-byte DF datagram leaves A (its MTU is 1500)");
    }
    let errors = icmp.errors(Duration::from_millis(700), Duration::from_secs(5));
    let (g0, g1) = (cluster.counters(0), cluster.counters(1));
    let evidence = format!(
        "{sent} 1500-byte DF datagrams from {} to {}: ICMP errors at A {errors:?}\n\
         host 0 counters changed: {:?}\nhost 1 counters changed: {:?}",
        ca.ip,
        cb.ip,
        deltas(&h0, &g0),
        deltas(&h1, &g1),
    );
    assert_eq!(
        errors.len(),
        sent,
        "one ICMP error per datagram\n{evidence}"
    );
    for e in &errors {
        assert_eq!((e.kind, e.code), (3, 4), "fragmentation needed\n{evidence}");
        assert_eq!(
            (e.src, e.dst),
            (gw, ca.ip),
            "from A's gateway to A\n{evidence}"
        );
        assert_eq!(u64::from(e.mtu), OVERLAY_MTU, "next-hop MTU\n{evidence}");
        assert!(e.ip_checksum_ok, "IPv4 checksum\n{evidence}");
        assert!(e.icmp_checksum_ok, "ICMP checksum\n{evidence}");
        // The original header, as A sent it, and its UDP header.
        let q = &e.quote;
        assert!(q.len() >= 28, "quote length\n{evidence}");
        assert_eq!(q[0], 0x45, "quoted version and length\n{evidence}");
        assert_eq!(
            u16::from_be_bytes([q[2], q[3]]),
            1500,
            "quoted length\n{evidence}"
        );
        assert_eq!(q[6] & 0x40, 0x40, "quoted DF\n{evidence}");
        assert_eq!(
            (q[8], q[9]),
            (64, 17),
            "quoted TTL and protocol\n{evidence}"
        );
        assert_eq!(
            internet_checksum(&q[..20]),
            0,
            "quoted checksum\n{evidence}"
        );
        assert_eq!(&q[12..16], &ca.ip.octets(), "quoted source\n{evidence}");
        assert_eq!(
            &q[16..20],
            &cb.ip.octets(),
            "quoted destination\n{evidence}"
        );
        let ports = [sport.to_be_bytes(), dport.to_be_bytes()].concat();
        assert_eq!(&q[20..24], &ports[..], "quoted ports\n{evidence}");
        assert_eq!(
            u16::from_be_bytes([q[24], q[25]]),
            1480,
            "quoted UDP length\n{evidence}"
        );
    }
    assert_eq!(
        delta(&h0, &g0, "frag_needed"),
        sent as u64,
        "one frag_needed count per ICMP sent\n{evidence}"
    );
    assert_eq!(
        delta(&h1, &g1, "decapsulated"),
        0,
        "something oversized reached host 1\n{evidence}"
    );
    let learnt = ping_args(
        &na,
        &["-M", "do", "-s", "1472", "-c", "1", "-W", "1"],
        cb.ip,
    );
    let out = learnt.output.to_lowercase();
    assert!(
        learnt.received == 0 && (out.contains("mtu=1450") || out.contains("mtu = 1450")),
        "after a frag-needed A should know the path MTU 1450:\n{}\n{evidence}",
        learnt.output
    );
    // Back to the overlay MTU: normal traffic still flows.
    na.run_ok(&["ip", "link", "set", "eth0", "mtu", "1450"]);
    cluster.assert_ping(a, b, 2, Duration::ZERO);
}

/// A container that raised its MTU to 1500 sends 1500-byte packets without
/// DF: a router would fragment them (as the kernel does before a flannel
/// vxlan device of MTU 1450). netd must deliver them somehow or drop and
/// count them; it must not count them as encapsulated and hand the
/// underlay a 1550-byte frame it cannot send.
#[test]
fn oversized_non_df_from_a_raised_mtu_is_delivered_or_counted() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    cluster.assert_ping(a, b, 2, Duration::ZERO);
    let (ca, cb) = (cluster.container(a), cluster.container(b));
    let na = ca.ns.handle();
    na.run_ok(&["ip", "link", "set", "eth0", "mtu", "1500"]);
    let underlay = cluster.host(0).ns().handle();
    let (h0, h1) = (cluster.counters(0), cluster.counters(1));
    let tx0 = link_json(&underlay, "eth0", true)["stats64"]["tx"].clone();
    let big = ping_args(
        &na,
        &[
            "-M", "dont", "-s", "1472", "-c", "3", "-i", "0.3", "-W", "1",
        ],
        cb.ip,
    );
    let (g0, g1) = (cluster.counters(0), cluster.counters(1));
    let tx1 = link_json(&underlay, "eth0", true)["stats64"]["tx"].clone();
    let evidence = format!(
        "1500-byte non-DF ping from {} (eth0 MTU raised to 1500) to {}:\n{}\n\
         host 0 counters changed {:?}\nhost 1 counters changed {:?}\n\
         host 0 underlay eth0 tx before {tx0}\nafter {tx1}",
        ca.ip,
        cb.ip,
        big.output,
        deltas(&h0, &g0),
        deltas(&h1, &g1)
    );
    eprintln!("non-DF: {evidence}");
    assert_eq!(big.transmitted, 3, "{evidence}");
    if big.received != big.transmitted {
        let dropped: u64 = g0
            .keys()
            .filter(|k| k.starts_with("drop_") || k.as_str() == "frag_needed")
            .map(|k| delta(&h0, &g0, k))
            .sum();
        assert!(
            dropped == u64::from(big.transmitted) && delta(&h0, &g0, "encapsulated") == 0,
            "oversized non-DF packets were neither delivered nor dropped and counted by \
             netd (counted as encapsulated, then lost on the underlay?)\n{evidence}"
        );
    }
    na.run_ok(&["ip", "link", "set", "eth0", "mtu", "1450"]);
    cluster.assert_ping(a, b, 2, Duration::ZERO);
}

// ---------------------------------------------------------------------------
// 3. Live spoofing
// ---------------------------------------------------------------------------

/// Pings `dst` five times from container namespace `from` (on host 0)
/// with extra ping `args`, and asserts that all five were dropped by host
/// 0 as spoofed: no reply, no encapsulation, no local delivery.
fn assert_spoof_dropped(cluster: &Cluster, from: &NsRef, args: &[&str], dst: Ipv4Addr, what: &str) {
    let (h0, h1) = (cluster.counters(0), cluster.counters(1));
    let mut argv = args.to_vec();
    argv.extend(["-c", "5", "-i", "0.2", "-W", "1"]);
    let spoofed = ping_args(from, &argv, dst);
    let (g0, g1) = (cluster.counters(0), cluster.counters(1));
    let why = format!(
        "{what}: ping {args:?} {dst}:\n{}\nhost 0 changed {:?}, host 1 changed {:?}",
        spoofed.output,
        deltas(&h0, &g0),
        deltas(&h1, &g1)
    );
    assert_eq!(spoofed.transmitted, 5, "{why}");
    assert_eq!(spoofed.received, 0, "spoofed packets got replies\n{why}");
    assert_eq!(
        delta(&h0, &g0, "drop_spoofed"),
        5,
        "one drop_spoofed per packet sent\n{why}"
    );
    for forwarded in ["encapsulated", "local_delivered", "routed_direct"] {
        assert_eq!(delta(&h0, &g0, forwarded), 0, "{why}");
    }
    assert_eq!(delta(&h1, &g1, "decapsulated"), 0, "{why}");
}

#[test]
fn live_spoofed_address_and_mac_are_dropped_and_counted() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    let c = cluster.attach(0);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    cluster.assert_ping(a, b, 3, Duration::ZERO);
    cluster.assert_ping(a, c, 3, Duration::ZERO);
    let (ca, cb, cc) = (
        cluster.container(a),
        cluster.container(b),
        cluster.container(c),
    );
    let na = ca.ns.handle();
    let [x, y, z, _] = ca.ip.octets();
    let alias = Ipv4Addr::new(x, y, z, 77);
    let alias_arg = alias.to_string();

    // A second address inside the container: used as a source, dropped,
    // towards a remote container and towards one on the same host.
    na.run_ok(&["ip", "addr", "add", &format!("{alias}/32"), "dev", "eth0"]);
    assert_spoof_dropped(&cluster, &na, &["-I", &alias_arg], cb.ip, "alias, remote");
    assert_spoof_dropped(&cluster, &na, &["-I", &alias_arg], cc.ip, "alias, local");
    // Its own address still works while the alias is there.
    cluster.assert_ping(a, b, 3, Duration::ZERO);
    na.run_ok(&["ip", "addr", "del", &format!("{alias}/32"), "dev", "eth0"]);

    // A foreign MAC on the container's eth0: dropped and counted.
    let mac = link_json(&na, "eth0", false)["address"]
        .as_str()
        .expect("eth0 MAC")
        .to_string();
    na.run_ok(&["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"]);
    assert_spoof_dropped(&cluster, &na, &[], cb.ip, "MAC 02:00:00:00:00:99, remote");
    assert_spoof_dropped(&cluster, &na, &[], cc.ip, "MAC 02:00:00:00:00:99, local");

    // Its own MAC back: traffic flows again, nothing more is dropped.
    na.run_ok(&["ip", "link", "set", "eth0", "address", &mac]);
    let h0 = cluster.counters(0);
    cluster.assert_ping(a, b, 5, Duration::ZERO);
    cluster.assert_ping(b, a, 5, Duration::ZERO);
    cluster.assert_ping(a, c, 5, Duration::ZERO);
    let g0 = cluster.counters(0);
    assert_eq!(delta(&h0, &g0, "drop_spoofed"), 0, "{:?}", deltas(&h0, &g0));
}

// ---------------------------------------------------------------------------
// 4. Clean stop
// ---------------------------------------------------------------------------

/// SIGTERM with a healthy etcd: exit 0, nothing logged as a warning, and
/// the state left for `netd status` does not claim etcd is unreachable.
#[test]
fn sigterm_with_healthy_etcd_is_quiet_and_leaves_etcd_reachable_in_state() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    assert!(cluster.topo.etcd().is_healthy());
    let mut problems = Vec::new();
    for i in 0..2 {
        let status = cluster.stop(i);
        assert_eq!(status.code(), Some(0), "host {i}: SIGTERM exit {status}");
        let log = strip_ansi(&cluster.daemons[i].as_ref().unwrap().log());
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        if !warnings.is_empty() {
            problems.push(format!("host {i} logged on SIGTERM: {warnings:?}"));
        }
        let state = cluster.status(i)["state"].clone();
        if state["etcd"]["reachable"] != true {
            problems.push(format!(
                "host {i}: after a clean stop `netd status` says etcd is unreachable: {}",
                state["etcd"]
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
