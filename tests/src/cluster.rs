//! A netd cluster on a [`Topology`]: the network config in etcd, a daemon per
//! host, containers attached with `netd attach`, and typed views of
//! `netd status --json`.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::Value;

use crate::{Daemon, Host, NetNs, Topology, wait_for};

/// The cluster network every test uses.
pub const NETWORK: &str = "10.244.0.0/16";
pub const PREFIX: &str = "/netd/network";

/// A container attached to a host.
pub struct Container {
    pub ns: NetNs,
    pub host: usize,
    pub ip: Ipv4Addr,
}

/// Fields drop in order: daemons stop cleanly (SIGTERM, logs kept) and
/// containers go before the topology removes the namespaces.
pub struct Cluster {
    pub daemons: Vec<Option<Daemon>>,
    pub containers: Vec<Container>,
    pub topo: Topology,
    decap: String,
    extra_args: Vec<String>,
}

impl Cluster {
    /// `hosts` hosts with etcd and the network config, no daemons yet.
    pub fn new(hosts: usize, decap: &str) -> Self {
        let cluster = Cluster::on_topology(Topology::builder().hosts(hosts).build(), decap);
        cluster.init_network();
        cluster
    }

    /// Writes the network config ([`NETWORK`]) to etcd with
    /// `netd network init` on host 0.
    pub fn init_network(&self) {
        let endpoint = self.topo.etcd_endpoint();
        self.host(0).netd_ok(&[
            "network",
            "init",
            "--etcd-endpoints",
            &endpoint,
            "--network",
            NETWORK,
        ]);
    }

    /// Extra `netd run` flags for daemons started from now on.
    pub fn run_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Started and ready: every host daemon has written its subnet.env.
    pub fn up(hosts: usize, decap: &str) -> Self {
        let mut cluster = Cluster::new(hosts, decap);
        for i in 0..hosts {
            cluster.start(i);
        }
        cluster
    }

    pub fn host(&self, i: usize) -> &Host {
        self.topo.host(i)
    }

    /// Global flags that select host `i`'s node state.
    pub fn node_args(&self, i: usize) -> Vec<String> {
        let host = self.host(i);
        vec![
            "--pin-path".into(),
            host.pin_path().display().to_string(),
            "--run-dir".into(),
            host.run_dir().display().to_string(),
        ]
    }

    /// Runs a one-shot `netd` command on host `i`; panics on failure.
    pub fn netd_ok(&self, i: usize, args: &[&str]) -> String {
        let mut all: Vec<String> = self.node_args(i);
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        self.host(i).netd_ok(&refs)
    }

    pub fn netd(&self, i: usize, args: &[&str]) -> std::process::Output {
        let mut all: Vec<String> = self.node_args(i);
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        self.host(i).netd(&refs)
    }

    /// Starts host `i`'s daemon and waits until it holds a lease.
    pub fn start(&mut self, i: usize) {
        let daemon = self.spawn(i);
        self.daemons[i] = Some(daemon);
        self.wait_ready(i);
    }

    /// Starts host `i`'s daemon without waiting.
    pub fn spawn(&self, i: usize) -> Daemon {
        let args = self.run_argv(i);
        // A fresh start must not be mistaken for ready by a stale file.
        let _ = std::fs::remove_file(self.host(i).run_dir().join("state.json"));
        self.host(i).start_netd(args)
    }

    /// `netd` arguments [`Cluster::spawn`] runs host `i`'s daemon with.
    fn run_argv(&self, i: usize) -> Vec<String> {
        let endpoint = self.topo.etcd_endpoint();
        let mut args = self.node_args(i);
        args.extend([
            "run".into(),
            "--etcd-endpoints".into(),
            endpoint,
            "--iface".into(),
            "eth0".into(),
            "--decap".into(),
            self.decap.clone(),
        ]);
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Waits until host `i`'s daemon has published its state.
    pub fn wait_ready(&mut self, i: usize) {
        let state = self.host(i).run_dir().join("state.json");
        let env = self.host(i).run_dir().join("subnet.env");
        let daemon = self.daemons[i].as_mut();
        if let Some(d) = daemon {
            d.wait_for_log("netd running", Duration::from_secs(30));
        }
        wait_for(&format!("host {i} ready"), Duration::from_secs(30), || {
            state.exists() && env.exists()
        });
    }

    /// Stops host `i`'s daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self, i: usize) -> std::process::ExitStatus {
        self.daemons[i].as_mut().expect("daemon running").stop()
    }

    /// Creates a container on host `i` and attaches it; returns its index.
    pub fn attach(&mut self, host: usize) -> usize {
        let ns = self.topo.add_container(host);
        let out = self.netd_ok(host, &["attach", ns.name()]);
        let ip: Ipv4Addr = out
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("attach printed {out:?}: {e}"));
        self.containers.push(Container { ns, host, ip });
        self.containers.len() - 1
    }

    pub fn container(&self, c: usize) -> &Container {
        &self.containers[c]
    }

    /// `netd status --json` of host `i`.
    pub fn status(&self, i: usize) -> Value {
        let out = self.netd_ok(i, &["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// Host `i`'s counters, by name.
    pub fn counters(&self, i: usize) -> BTreeMap<String, u64> {
        let status = self.status(i);
        status["counters"]
            .as_object()
            .expect("counters object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().expect("counter is a number")))
            .collect()
    }

    /// Host `i`'s own subnet, from its state.
    pub fn subnet(&self, i: usize) -> String {
        self.status(i)["state"]["subnet"]
            .as_str()
            .expect("subnet in state")
            .to_string()
    }

    /// Remote subnets programmed in host `i`'s kernel map: subnet → public IP.
    pub fn peers(&self, i: usize) -> BTreeMap<String, String> {
        self.status(i)["peers"]
            .as_array()
            .expect("peers array")
            .iter()
            .map(|p| {
                (
                    p["subnet"].as_str().unwrap().to_string(),
                    p["public_ip"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Leases in etcd: subnet (a.b.c.d/len) → PublicIP, for valid values.
    pub fn etcd_leases(&self) -> BTreeMap<String, String> {
        crate::lease::leases_in(self.topo.etcd())
    }

    /// Waits until host `i`'s map holds exactly the other hosts' leases.
    pub fn wait_peers_match_etcd(&self, i: usize, timeout: Duration) {
        self.wait_peers_match(i, self.topo.etcd(), timeout);
    }

    /// Like [`Cluster::wait_peers_match_etcd`], with the leases in `etcd`
    /// (e.g. one member of an etcd cluster).
    pub fn wait_peers_match(&self, i: usize, etcd: &crate::Etcd, timeout: Duration) {
        let own = self.subnet(i);
        wait_for(&format!("host {i} map equal to etcd"), timeout, || {
            let mut want = crate::lease::leases_in(etcd);
            want.remove(&own);
            self.peers(i) == want
        });
    }
}

/// Clusters on a topology the test prepared (e.g. etcd with TLS or users),
/// and daemons that take part of their configuration from the environment.
impl Cluster {
    /// A cluster on `topo` (whose etcd runs) with no network config and no
    /// daemons: the test runs `netd network init` with the flags it needs.
    pub fn on_topology(topo: Topology, decap: &str) -> Self {
        let daemons = topo.hosts().iter().map(|_| None).collect();
        Cluster {
            topo,
            daemons,
            containers: Vec::new(),
            decap: decap.into(),
            extra_args: Vec::new(),
        }
    }

    /// Like [`Cluster::spawn`], with `env` added to the daemon's environment.
    pub fn spawn_with_env(&self, i: usize, env: &[(&str, &str)]) -> Daemon {
        let args = self.run_argv(i);
        let _ = std::fs::remove_file(self.host(i).run_dir().join("state.json"));
        self.host(i).start_netd_with_env(args, env)
    }

    /// Like [`Cluster::start`], with `env` added to the daemon's environment.
    pub fn start_with_env(&mut self, i: usize, env: &[(&str, &str)]) {
        let daemon = self.spawn_with_env(i, env);
        self.daemons[i] = Some(daemon);
        self.wait_ready(i);
    }
}

/// Clusters on another network than [`NETWORK`], e.g. a /14 with room for
/// a thousand /24 leases.
impl Cluster {
    /// Like [`Cluster::new`], but `netd network init` gets `init_args`
    /// (e.g. `["--network", "10.244.0.0/14", "--subnet-len", "24"]`).
    pub fn with_network(hosts: usize, decap: &str, init_args: &[&str]) -> Self {
        let topo = Topology::builder().hosts(hosts).build();
        let endpoint = topo.etcd_endpoint();
        let mut args = vec!["network", "init", "--etcd-endpoints", &endpoint];
        args.extend_from_slice(init_args);
        topo.host(0).netd_ok(&args);
        Cluster {
            topo,
            daemons: (0..hosts).map(|_| None).collect(),
            containers: Vec::new(),
            decap: decap.into(),
            extra_args: Vec::new(),
        }
    }

    /// Pid of host `i`'s running daemon.
    pub fn daemon_pid(&self, i: usize) -> u32 {
        self.daemons[i].as_ref().expect("daemon started").pid()
    }
}

/// Daemons that talk to other etcd endpoints than the topology's etcd, e.g.
/// every member of a [`crate::etcd::EtcdCluster`] (the topology may then
/// have been built without an etcd of its own).
impl Cluster {
    /// Like [`Cluster::spawn`], with `--etcd-endpoints endpoints`.
    pub fn spawn_with_endpoints(&self, i: usize, endpoints: &str) -> Daemon {
        let mut args = self.node_args(i);
        args.extend([
            "run".into(),
            "--etcd-endpoints".into(),
            endpoints.into(),
            "--iface".into(),
            crate::topology::HOST_IFACE.into(),
            "--decap".into(),
            self.decap.clone(),
        ]);
        args.extend(self.extra_args.iter().cloned());
        let _ = std::fs::remove_file(self.host(i).run_dir().join("state.json"));
        self.host(i).start_netd(args)
    }

    /// Like [`Cluster::start`], with `--etcd-endpoints endpoints`.
    pub fn start_with_endpoints(&mut self, i: usize, endpoints: &str) {
        let daemon = self.spawn_with_endpoints(i, endpoints);
        self.daemons[i] = Some(daemon);
        self.wait_ready(i);
    }
}

/// What a host's daemon left on disk and logged.
impl Cluster {
    /// Host `i`'s daemon log (every run under the current guard), uncoloured.
    pub fn daemon_log(&self, i: usize) -> String {
        crate::strip_ansi(&self.daemons[i].as_ref().expect("daemon started").log())
    }

    /// Host-side veth names of host `i`'s containers, from netd's records.
    pub fn host_veths(&self, i: usize) -> Vec<String> {
        let dir = self.host(i).run_dir().join("endpoints");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| {
                let record: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap())
                    .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
                record["host_ifname"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no host_ifname in {record}"))
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }
}

/// Daemons of another build than `NETD_BIN` (see [`crate::builds`]).
impl Cluster {
    /// Like [`Cluster::start`], running the netd binary at `program`.
    pub fn start_with_bin(&mut self, i: usize, program: &std::path::Path) {
        let args = self.run_argv(i);
        let _ = std::fs::remove_file(self.host(i).run_dir().join("state.json"));
        self.daemons[i] = Some(self.host(i).start(program, args));
        self.wait_ready(i);
    }
}

/// Reachability between containers, and the lease a host's state names.
impl Cluster {
    /// Asserts container `from` reaches container `to`: `count` pings all
    /// answered, tried again until `timeout` (once when it is zero).
    pub fn assert_ping(&self, from: usize, to: usize, count: u32, timeout: Duration) {
        let (a, b) = (self.container(from), self.container(to));
        let what = format!(
            "container {from} ({} on host {}) -> container {to} ({} on host {})",
            a.ip, a.host, b.ip, b.host
        );
        crate::traffic::assert_ping(&a.ns, b.ip, count, timeout, &what);
    }

    /// Asserts containers `a` and `b` reach each other (3 pings each way,
    /// 200 ms apart; the first echo on a fresh path may wait for ARP, so a
    /// direction is tried twice).
    pub fn assert_ping_both_ways(&self, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let (cf, ct) = (self.container(from), self.container(to));
            let mut stats = crate::ping_stats(&cf.ns, ct.ip, 3);
            if !stats.all_received() {
                stats = crate::ping_stats(&cf.ns, ct.ip, 3);
            }
            assert!(
                stats.all_received(),
                "ping {} (host {}) -> {} (host {}) failed:\n{}",
                cf.ip,
                cf.host,
                ct.ip,
                ct.host,
                stats.output
            );
        }
    }

    /// Host `i`'s etcd lease id, from its state.
    pub fn state_lease_id(&self, i: usize) -> i64 {
        self.status(i)["state"]["lease_id"]
            .as_i64()
            .expect("lease_id in state")
    }
}

/// A converged pair of hosts, and cutting a host off etcd.
impl Cluster {
    /// Starts the daemons of hosts 0 and 1 (with the flags of
    /// [`Cluster::run_args`]), attaches a container to each, waits for both
    /// hosts' maps to match etcd and asserts the containers reach each
    /// other. Returns the two containers.
    pub fn start_pair(&mut self, converge: Duration) -> (usize, usize) {
        self.start(0);
        self.start(1);
        let (c0, c1) = self.attach_pair(converge);
        self.assert_ping_both_ways(c0, c1);
        (c0, c1)
    }

    /// Attaches a container to each of hosts 0 and 1 (running daemons) and
    /// waits for both hosts' maps to match etcd. Returns the containers.
    pub fn attach_pair(&mut self, converge: Duration) -> (usize, usize) {
        let c0 = self.attach(0);
        let c1 = self.attach(1);
        for i in 0..2 {
            self.wait_peers_match_etcd(i, converge);
        }
        (c0, c1)
    }

    /// Cuts host `i` off etcd only (a blackhole route to etcd's address in
    /// its namespace; the underlay to the other hosts stays up), or heals
    /// that.
    pub fn partition_from_etcd(&self, i: usize, cut: bool) {
        let etcd = format!("{}/32", crate::SWITCH_IP);
        let op = if cut { "add" } else { "del" };
        self.host(i)
            .ns()
            .run_ok(&["ip", "route", op, "blackhole", &etcd]);
    }
}
