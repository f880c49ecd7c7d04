//! Policy tests' tools: endpoints attached with labels and a network,
//! policies applied and deleted with `netd policy` against the test etcd,
//! bounded probes ("does A reach B on this protocol and port, bytes
//! intact?"), a table runner over such probes, and a ticker of one-datagram
//! flows for timing how fast a policy change takes effect.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, Container, PREFIX};
use crate::counters::{Counters, delta};
use crate::netns::NsRef;
use crate::traffic::{Pattern, ping_stats};
use crate::wait_for;

/// How long a probe waits for a connection, a datagram or its echo. A
/// denied probe takes this long; an allowed one returns as soon as its
/// bytes are back. Two seconds leave room for one lost SYN (resent at 1 s).
pub const PROBE_WINDOW: Duration = Duration::from_secs(2);
/// Bytes a TCP probe sends (and the server echoes).
pub const TCP_PROBE_BYTES: usize = 16 * 1024;
/// Datagrams a UDP probe sends, 100 ms apart.
pub const UDP_PROBES: usize = 3;
const UDP_PROBE_BYTES: usize = 512;
const PROBE_SEED: u64 = 0x0b0e_5eed_0000_0004;

/// Drop counters of policy enforcement.
pub const DROP_POLICY: &str = "drop_policy";
pub const DROP_ISOLATION: &str = "drop_isolation";

// ------------------------------------------------------------ endpoints

/// Attaches a new container on `host` with `netd attach NETNS [--network
/// NAME] [--label K=V]...`; returns its index in `cluster.containers`.
pub fn attach(
    cluster: &mut Cluster,
    host: usize,
    network: Option<&str>,
    labels: &[(&str, &str)],
) -> usize {
    let ns = cluster.topo.add_container(host);
    let mut args: Vec<String> = vec!["attach".into(), ns.name().into()];
    if let Some(network) = network {
        args.extend(["--network".into(), network.into()]);
    }
    for (k, v) in labels {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.netd_ok(host, &refs);
    let ip: Ipv4Addr = out
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("attach printed {out:?}: {e}"));
    cluster.containers.push(Container { ns, host, ip });
    cluster.containers.len() - 1
}

/// Endpoint publications in etcd (`<prefix>/endpoints/<subnet>/<ip>`), by
/// address.
pub fn published_endpoints(cluster: &Cluster) -> BTreeMap<Ipv4Addr, Value> {
    cluster
        .topo
        .etcd()
        .get_prefix(&format!("{PREFIX}/endpoints/"))
        .into_iter()
        .filter_map(|kv| {
            let v: Value = serde_json::from_str(&kv.value).ok()?;
            let ip = v.get("ip")?.as_str()?.parse().ok()?;
            Some((ip, v))
        })
        .collect()
}

/// Waits until every address in `ips` is published in etcd with the
/// network and labels it was attached with (`want`: ip → (network,
/// labels)).
pub fn wait_published(
    cluster: &Cluster,
    want: &BTreeMap<Ipv4Addr, (String, BTreeMap<String, String>)>,
    timeout: Duration,
) {
    let mut last = BTreeMap::new();
    let ok = crate::poll_until(timeout, || {
        last = published_endpoints(cluster);
        want.iter().all(|(ip, (network, labels))| {
            last.get(ip).is_some_and(|v| {
                v["network"] == network.as_str()
                    && labels.iter().all(|(k, val)| v["labels"][k] == val.as_str())
            })
        })
    });
    assert!(
        ok,
        "endpoints not published in etcd within {timeout:?}: want {want:?}, have {last:?}"
    );
}

// ------------------------------------------------------------- policies

/// `netd policy` against the cluster's etcd, run on host `host`.
pub struct PolicyCli<'a> {
    cluster: &'a Cluster,
    host: usize,
    dir: tempfile::TempDir,
}

impl<'a> PolicyCli<'a> {
    pub fn new(cluster: &'a Cluster, host: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("policies-")
            .tempdir_in(cluster.host(host).run_dir())
            .expect("policy dir");
        PolicyCli { cluster, host, dir }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let endpoint = self.cluster.topo.etcd_endpoint();
        let mut all: Vec<&str> = vec!["policy"];
        all.extend_from_slice(args);
        all.extend(["--etcd-endpoints", &endpoint]);
        self.cluster.netd(self.host, &all)
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "netd policy {args:?} failed ({}):\n{}",
            out.status,
            crate::util::output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `policy` to a file and runs `netd policy apply FILE`; panics
    /// on failure.
    pub fn apply(&self, policy: &Value) {
        let out = self.try_apply(policy);
        assert!(
            out.status.success(),
            "netd policy apply {policy} failed ({}):\n{}",
            out.status,
            crate::util::output_text(&out)
        );
    }

    /// Like [`PolicyCli::apply`], returning the command's output whatever
    /// its status.
    pub fn try_apply(&self, policy: &Value) -> std::process::Output {
        let name = policy["name"].as_str().unwrap_or("unnamed");
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(policy).unwrap())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.run(&["apply", path.to_str().unwrap()])
    }

    /// `netd policy delete NAME`; panics on failure.
    pub fn delete(&self, name: &str) {
        self.run_ok(&["delete", name]);
    }

    /// `netd policy list`'s output.
    pub fn list(&self) -> String {
        self.run_ok(&["list"])
    }
}

/// The policy stored in etcd under `name`, if any.
pub fn stored_policy(cluster: &Cluster, name: &str) -> Option<Value> {
    let value = cluster
        .topo
        .etcd()
        .get(&format!("{PREFIX}/policies/{name}"))?;
    Some(serde_json::from_str(&value).unwrap_or_else(|e| panic!("policy {name} ({e}): {value}")))
}

// --------------------------------------------------------------- probes

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// What one probe saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Units that reached the server intact: a TCP connection with all of
    /// its bytes, UDP datagrams, or (ICMP) echo replies received.
    pub delivered: usize,
    /// Units that reached the server altered (must never happen).
    pub corrupt: usize,
    /// Whether the reply came back to the client: the TCP echo of every
    /// byte, an echoed datagram, an echo reply.
    pub replied: bool,
    /// What failed, for messages.
    pub note: String,
}

impl Outcome {
    /// Allowed: bytes delivered intact and the reply came back.
    pub fn allowed(&self) -> bool {
        self.delivered > 0 && self.corrupt == 0 && self.replied
    }

    /// Denied: nothing reached the server and nothing came back.
    pub fn denied(&self) -> bool {
        self.delivered == 0 && self.corrupt == 0 && !self.replied
    }
}

/// One probe from `from` to `dst:port` served in `to` (for ICMP `to` and
/// `port` are unused: the kernel answers the echo).
pub fn probe(from: &NsRef, to: &NsRef, dst: Ipv4Addr, proto: Proto, port: u16) -> Outcome {
    match proto {
        Proto::Tcp => tcp_probe(from, to, SocketAddr::from((dst, port))),
        Proto::Udp => udp_probe(from, to, SocketAddr::from((dst, port))),
        Proto::Icmp => icmp_probe(from, dst),
    }
}

fn probe_bytes(len: usize, salt: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Pattern::new(PROBE_SEED ^ salt).fill(&mut buf);
    buf
}

/// A server thread that gives up once `stop` is set or the window passed.
fn serve<T: Send + 'static>(
    to: &NsRef,
    f: impl FnOnce(mpsc::Sender<std::io::Result<()>>, Arc<AtomicBool>) -> T + Send + 'static,
) -> (JoinHandle<T>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = {
        let stop = stop.clone();
        to.spawn_thread(move || f(ready_tx, stop))
    };
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("probe server in {}: {e}", to.name()),
        Err(_) => panic!("probe server in {} never became ready", to.name()),
    }
    (handle, stop)
}

fn tcp_probe(from: &NsRef, to: &NsRef, dst: SocketAddr) -> Outcome {
    let want = probe_bytes(TCP_PROBE_BYTES, dst.port() as u64);
    let expected = want.clone();
    let (server, stop) = serve(to, move |ready, stop| {
        let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, dst.port())) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return (0, 0, String::from("bind failed"));
            }
        };
        listener.set_nonblocking(true).unwrap();
        let _ = ready.send(Ok(()));
        let deadline = Instant::now() + PROBE_WINDOW * 2;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return (0, 0, String::from("no connection"));
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return (0, 0, format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(PROBE_WINDOW)).unwrap();
        stream.set_write_timeout(Some(PROBE_WINDOW)).unwrap();
        let mut got = Vec::new();
        if let Err(e) = stream.read_to_end(&mut got) {
            return (0, usize::from(!got.is_empty()), format!("server read: {e}"));
        }
        if got != expected {
            return (
                0,
                1,
                format!("server got {} bytes, not the probe", got.len()),
            );
        }
        let echoed = stream
            .write_all(&got)
            .and_then(|_| stream.shutdown(Shutdown::Write));
        match echoed {
            Ok(()) => (1, 0, String::new()),
            Err(e) => (1, 0, format!("server echo: {e}")),
        }
    });
    let client = from.spawn_thread(move || -> Result<bool, String> {
        let mut s =
            TcpStream::connect_timeout(&dst, PROBE_WINDOW).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(PROBE_WINDOW)).unwrap();
        s.set_write_timeout(Some(PROBE_WINDOW)).unwrap();
        s.write_all(&want).map_err(|e| format!("write: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .map_err(|e| format!("read echo: {e}"))?;
        Ok(back == want)
    });
    let client = client.join().expect("TCP probe client panicked");
    // A connection may still be on its way (a resent SYN): a short grace.
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let (delivered, corrupt, server_note) = server.join().expect("TCP probe server panicked");
    let (replied, client_note) = match client {
        Ok(same) => (
            same,
            if same {
                String::new()
            } else {
                "echo differs".into()
            },
        ),
        Err(e) => (false, e),
    };
    Outcome {
        delivered,
        corrupt,
        replied,
        note: join_notes(&[&server_note, &client_note]),
    }
}

fn udp_probe(from: &NsRef, to: &NsRef, dst: SocketAddr) -> Outcome {
    let datagrams: Vec<Vec<u8>> = (0..UDP_PROBES)
        .map(|i| probe_bytes(UDP_PROBE_BYTES, (dst.port() as u64) << 8 | i as u64))
        .collect();
    let expected = datagrams.clone();
    let (server, stop) = serve(to, move |ready, stop| {
        let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, dst.port())) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return (0, 0);
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let _ = ready.send(Ok(()));
        let deadline = Instant::now() + PROBE_WINDOW * 2;
        let (mut ok, mut bad) = (0, 0);
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if expected.iter().any(|d| d[..] == buf[..n]) {
                ok += 1;
                let _ = sock.send_to(&buf[..n], peer);
            } else {
                bad += 1;
            }
        }
        (ok, bad)
    });
    let client = from.spawn_thread(move || -> Result<usize, String> {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut echoed = 0;
        let mut buf = vec![0u8; 2048];
        for d in &datagrams {
            sock.send_to(d, dst).map_err(|e| format!("send: {e}"))?;
            if let Ok(n) = sock.recv(&mut buf) {
                echoed += usize::from(datagrams.iter().any(|x| x[..] == buf[..n]));
            }
        }
        let deadline = Instant::now() + PROBE_WINDOW;
        while echoed < datagrams.len() && Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                echoed += usize::from(datagrams.iter().any(|x| x[..] == buf[..n]));
            }
        }
        Ok(echoed)
    });
    let client = client.join().expect("UDP probe client panicked");
    stop.store(true, Ordering::Relaxed);
    let (delivered, corrupt) = server.join().expect("UDP probe server panicked");
    let (replied, note) = match client {
        Ok(n) => (n > 0, format!("{n} of {UDP_PROBES} echoed")),
        Err(e) => (false, e),
    };
    Outcome {
        delivered,
        corrupt,
        replied,
        note: format!("{delivered} of {UDP_PROBES} datagrams arrived; {note}"),
    }
}

fn icmp_probe(from: &NsRef, dst: Ipv4Addr) -> Outcome {
    let stats = ping_stats(from, dst, 3);
    Outcome {
        delivered: stats.received as usize,
        corrupt: 0,
        replied: stats.received > 0,
        note: stats.output,
    }
}

fn join_notes(notes: &[&str]) -> String {
    notes
        .iter()
        .filter(|n| !n.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------- table

/// Where a probe is answered: a container of the cluster, or a namespace
/// outside the cluster with an address of its own.
#[derive(Clone, Debug)]
pub struct Peer {
    pub ns: NsRef,
    pub ip: Ipv4Addr,
    /// The netd host the peer is attached to (None: not a netd endpoint).
    pub host: Option<usize>,
}

impl Peer {
    pub fn of(cluster: &Cluster, c: usize) -> Self {
        let c = cluster.container(c);
        Peer {
            ns: c.ns.handle(),
            ip: c.ip,
            host: Some(c.host),
        }
    }
}

/// Which host must count a denied probe: the destination's (ingress) or
/// the source's (egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Destination,
    Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    /// Denied, and the named drop counter of the host `At` moved.
    Denied(At, &'static str),
}

/// One row: the policies in force, a probe, what must happen.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    /// Names of the policies (from the table's library) in force.
    pub policies: &'static [&'static str],
    pub from: &'static str,
    pub to: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub expect: Expect,
}

/// Runs cases on one cluster: applies and deletes policies between cases
/// (only the difference), probes, checks bytes and drop counters, and
/// collects every failing case instead of stopping at the first.
pub struct Table<'a> {
    cluster: &'a Cluster,
    cli: PolicyCli<'a>,
    peers: BTreeMap<&'static str, Peer>,
    library: BTreeMap<&'static str, Value>,
    applied: BTreeSet<&'static str>,
    /// How long to wait after a policy change before probing.
    settle: Duration,
}

impl<'a> Table<'a> {
    pub fn new(
        cluster: &'a Cluster,
        peers: BTreeMap<&'static str, Peer>,
        library: BTreeMap<&'static str, Value>,
        settle: Duration,
    ) -> Self {
        Table {
            cluster,
            cli: PolicyCli::new(cluster, 0),
            peers,
            library,
            applied: BTreeSet::new(),
            settle,
        }
    }

    fn set_policies(&mut self, want: &[&'static str]) {
        let want: BTreeSet<&'static str> = want.iter().copied().collect();
        if want == self.applied {
            return;
        }
        for name in self.applied.difference(&want) {
            let policy = &self.library[name];
            self.cli.delete(policy["name"].as_str().unwrap());
        }
        for name in want.difference(&self.applied) {
            let policy = self
                .library
                .get(name)
                .unwrap_or_else(|| panic!("no policy {name} in the table's library"));
            self.cli.apply(policy);
        }
        self.applied = want;
        thread::sleep(self.settle);
    }

    fn peer(&self, name: &str) -> &Peer {
        self.peers
            .get(name)
            .unwrap_or_else(|| panic!("no endpoint {name} in the table"))
    }

    /// Runs one case; returns a description of the failure, if any.
    pub fn run_case(&mut self, case: &Case) -> Option<String> {
        self.set_policies(case.policies);
        let (from, to) = (self.peer(case.from).clone(), self.peer(case.to).clone());
        let counting = match case.expect {
            Expect::Allowed => None,
            Expect::Denied(At::Destination, counter) => Some((to.host, counter)),
            Expect::Denied(At::Source, counter) => Some((from.host, counter)),
        };
        let counting = counting.map(|(host, counter)| {
            let host = host.unwrap_or_else(|| {
                panic!("case {}: the counting side is not a netd host", case.name)
            });
            (host, counter)
        });
        let before: Option<Counters> = counting.map(|(h, _)| self.cluster.counters(h));
        let started = Instant::now();
        let outcome = probe(&from.ns, &to.ns, to.ip, case.proto, case.port);
        let took = started.elapsed();
        let what = format!(
            "case {:?}: {} ({}) -> {} ({}) {:?}/{} with {:?}",
            case.name, case.from, from.ip, case.to, to.ip, case.proto, case.port, case.policies
        );
        eprintln!(
            "{what}: expected {:?}, delivered {} replied {} in {:.0} ms",
            case.expect,
            outcome.delivered,
            outcome.replied,
            took.as_secs_f64() * 1000.0
        );
        match (case.expect, counting, before) {
            (Expect::Allowed, _, _) => (!outcome.allowed()).then(|| {
                format!("{what}: expected allowed (bytes intact both ways), observed {outcome:?}")
            }),
            (Expect::Denied(..), Some((host, counter)), Some(before)) => {
                let after = self.cluster.counters(host);
                let moved = delta(&before, &after, counter);
                let mut problems = Vec::new();
                if !outcome.denied() {
                    problems.push(format!("traffic passed: {outcome:?}"));
                }
                if moved == 0 {
                    let others = crate::counters::deltas(&before, &after);
                    problems.push(format!(
                        "host {host}'s {counter} did not move (counters that moved: {others:?})"
                    ));
                }
                (!problems.is_empty())
                    .then(|| format!("{what}: expected denied; {}", problems.join("; ")))
            }
            _ => unreachable!("denied cases read counters"),
        }
    }

    /// Runs every case; panics listing every failing case.
    pub fn run(&mut self, cases: &[Case]) {
        let started = Instant::now();
        let failures: Vec<String> = cases.iter().filter_map(|c| self.run_case(c)).collect();
        self.set_policies(&[]);
        eprintln!(
            "figure: {} policy cases in {:.1} s",
            cases.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(
            failures.is_empty(),
            "{} of {} policy cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

// --------------------------------------------------------------- ticker

/// One-datagram flows from a client to a server, every `interval`, each
/// from a fresh socket (so each is a new flow for conntrack); the server
/// notes which arrived. For timing when a policy change takes effect.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    arrived: Arc<Mutex<BTreeSet<u64>>>,
    client: JoinHandle<()>,
    server: JoinHandle<()>,
}

impl Ticker {
    pub fn start(from: &NsRef, to: &NsRef, dst: SocketAddr, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Mutex::new(BTreeSet::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = {
            let (stop, arrived) = (stop.clone(), arrived.clone());
            to.spawn_thread(move || {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, dst.port())).expect("bind");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf)
                        && n == 8
                    {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        arrived.lock().unwrap().insert(seq);
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("ticker server ready");
        let client = {
            let (stop, sent) = (stop.clone(), sent.clone());
            from.spawn_thread(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                    sent.lock().unwrap().push(Instant::now());
                    let _ = sock.send_to(&seq.to_be_bytes(), dst);
                    seq += 1;
                    thread::sleep(interval);
                }
            })
        };
        Ticker {
            stop,
            sent,
            arrived,
            client,
            server,
        }
    }

    /// Send times and whether each flow arrived, so far.
    pub fn record(&self) -> Vec<(Instant, bool)> {
        let sent = self.sent.lock().unwrap().clone();
        let arrived = self.arrived.lock().unwrap();
        sent.into_iter()
            .enumerate()
            .map(|(i, t)| (t, arrived.contains(&(i as u64))))
            .collect()
    }

    pub fn stop(self) -> Vec<(Instant, bool)> {
        // Late datagrams still on their way.
        thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.client.join().expect("ticker client");
        self.server.join().expect("ticker server");
        let sent = self.sent.lock().unwrap().clone();
        let arrived = self.arrived.lock().unwrap();
        sent.into_iter()
            .enumerate()
            .map(|(i, t)| (t, arrived.contains(&(i as u64))))
            .collect()
    }
}

/// In `record` (send time, arrived), restricted to flows sent in
/// `[from, until)`: how long after `from` the flows start to be `arrived
/// == state` for good (every later flow in the window too). None if the
/// last flow of the window is not in that state.
pub fn settled_after(
    record: &[(Instant, bool)],
    from: Instant,
    until: Instant,
    state: bool,
) -> Option<Duration> {
    let window: Vec<&(Instant, bool)> = record
        .iter()
        .filter(|(t, _)| *t >= from && *t < until)
        .collect();
    let last_other = window.iter().rposition(|(_, a)| *a != state);
    let first = match last_other {
        None => window.first()?,
        Some(i) => window.get(i + 1)?,
    };
    Some(first.0.duration_since(from))
}

/// Waits until a ticker's last `n` flows are all in `state`.
pub fn wait_ticker(ticker: &Ticker, state: bool, n: usize, timeout: Duration, what: &str) {
    wait_for(what, timeout, || {
        let record = ticker.record();
        // The newest flows may still be on their way: skip the last 100 ms.
        let now = Instant::now();
        let done: Vec<_> = record
            .iter()
            .filter(|(t, _)| now.duration_since(*t) > Duration::from_millis(100))
            .collect();
        done.len() >= n && done[done.len() - n..].iter().all(|(_, a)| *a == state)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_after_the_last_flow_in_the_other_state() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let record = vec![
            (at(0), true),
            (at(10), true),
            (at(20), false),
            (at(30), true),
            (at(40), false),
            (at(50), false),
        ];
        let end = at(100);
        assert_eq!(
            settled_after(&record, at(5), end, false),
            Some(Duration::from_millis(35))
        );
        assert_eq!(settled_after(&record, at(5), end, true), None);
        assert_eq!(
            settled_after(&record, at(0), at(15), true),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn outcomes_are_allowed_or_denied_not_both() {
        let allowed = Outcome {
            delivered: 1,
            replied: true,
            ..Outcome::default()
        };
        assert!(allowed.allowed() && !allowed.denied());
        let denied = Outcome::default();
        assert!(denied.denied() && !denied.allowed());
        let one_way = Outcome {
            delivered: 1,
            ..Outcome::default()
        };
        assert!(!one_way.allowed() && !one_way.denied());
    }
}
