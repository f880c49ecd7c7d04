//! A simulated cluster: hosts on a shared L2 underlay, etcd, empty containers.
//!
//! ```text
//!   switch ns:  br0 198.18.0.254/24 (etcd :2379)
//!                |-- vh0 <-> eth0  host 0: 198.18.0.1/24
//!                |-- vh1 <-> eth0  host 1: 198.18.0.2/24
//! ```
//!
//! Everything lives in namespaces owned by the [`Topology`]; dropping it
//! kills their processes, deletes them and removes pin and run directories.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use tempfile::TempDir;

use crate::daemon::{Daemon, netd_bin};
use crate::etcd::Etcd;
use crate::netns::{NetNs, NsRef, is_stale};
use crate::util::{output_text, output_within};

/// Address of the switch bridge on the underlay; etcd listens here.
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const DEFAULT_MTU: u32 = 1500;
pub const BRIDGE: &str = "br0";
/// Underlay interface name inside every host namespace.
pub const HOST_IFACE: &str = "eth0";
pub const BPFFS: &str = "/sys/fs/bpf";
/// Longest a one-shot `netd` command may run (it must never hang a test).
pub const NETD_CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Underlay address of host `index`: 198.18.0.(index+1).
pub fn host_ip(index: usize) -> Ipv4Addr {
    assert!(index < 253, "at most 253 hosts fit the underlay /24");
    Ipv4Addr::new(198, 18, 0, index as u8 + 1)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is already there.
pub fn ensure_bpffs() {
    let mounted = statfs(BPFFS).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !mounted {
        mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount bpffs at {BPFFS}: {e}"));
    }
}

/// Removes pin directories left by test processes that died before cleanup.
pub fn cleanup_stale_pins() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        if is_stale(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Configures a [`Topology`]; see [`Topology::builder`].
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    hosts: usize,
    etcd: bool,
    mtu: u32,
    ipv6: bool,
    outside: bool,
}

/// The switch's address towards the "outside" namespace.
pub const OUTSIDE_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A host outside the cluster, routed by the switch; see
/// [`TopologyBuilder::outside`].
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

impl TopologyBuilder {
    /// Whether to add an "outside" namespace (default no): 203.0.113.2/24
    /// behind the switch, which routes between it and the underlay
    /// (ip_forward on) and knows nothing of the container network. The
    /// outside's default route and every host's point at the switch.
    pub fn outside(mut self, yes: bool) -> Self {
        self.outside = yes;
        self
    }

    /// Number of hosts (default 2).
    pub fn hosts(mut self, n: usize) -> Self {
        self.hosts = n;
        self
    }

    /// Whether to run etcd on the switch (default yes).
    pub fn etcd(mut self, yes: bool) -> Self {
        self.etcd = yes;
        self
    }

    /// MTU of the underlay links (default 1500).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Whether IPv6 stays enabled in every namespace (default no: it keeps
    /// router solicitations and MLD out of captures).
    pub fn ipv6(mut self, yes: bool) -> Self {
        self.ipv6 = yes;
        self
    }

    /// Creates everything; panics (cleaning up what exists) on failure.
    pub fn build(self) -> Topology {
        let mut topo = Topology {
            containers: Mutex::new(Vec::new()),
            hosts: Vec::new(),
            etcd: None,
            outside: None,
            switch: self.new_ns(),
            ipv6: self.ipv6,
        };
        self.build_switch(&topo.switch);
        for index in 0..self.hosts {
            topo.hosts.push(self.build_host(&topo.switch, index));
        }
        if self.etcd {
            topo.etcd = Some(Etcd::start(&topo.switch, SWITCH_IP));
        }
        if self.outside {
            topo.outside = Some(self.build_outside(&topo.switch, &topo.hosts));
        }
        topo
    }

    fn new_ns(&self) -> NetNs {
        let ns = NetNs::new();
        if !self.ipv6 {
            disable_ipv6(&ns);
        }
        ns
    }

    fn build_switch(&self, switch: &NetNs) {
        let addr = format!("{SWITCH_IP}/{UNDERLAY_PREFIX_LEN}");
        switch.run_ok(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        switch.run_ok(&["ip", "addr", "add", &addr, "dev", BRIDGE]);
        switch.run_ok(&["ip", "link", "set", BRIDGE, "up"]);
    }

    fn build_outside(&self, switch: &NetNs, hosts: &[Host]) -> NetNs {
        let ns = self.new_ns();
        switch.run_ok(&[
            "ip",
            "link",
            "add",
            OUTSIDE_PORT,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFACE,
            "netns",
            ns.name(),
        ]);
        let router = format!("{OUTSIDE_ROUTER_IP}/24");
        switch.run_ok(&["ip", "addr", "add", &router, "dev", OUTSIDE_PORT]);
        switch.run_ok(&["ip", "link", "set", OUTSIDE_PORT, "up"]);
        switch.sysctl("net.ipv4.ip_forward", "1");
        let addr = format!("{OUTSIDE_IP}/24");
        ns.run_ok(&["ip", "addr", "add", &addr, "dev", HOST_IFACE]);
        ns.run_ok(&["ip", "link", "set", HOST_IFACE, "up"]);
        let via = OUTSIDE_ROUTER_IP.to_string();
        ns.run_ok(&["ip", "route", "add", "default", "via", &via]);
        let gw = SWITCH_IP.to_string();
        for host in hosts {
            host.ns()
                .run_ok(&["ip", "route", "replace", "default", "via", &gw]);
        }
        ns
    }

    fn build_host(&self, switch: &NetNs, index: usize) -> Host {
        let ns = self.new_ns();
        let port = switch_port(index);
        let mtu = self.mtu.to_string();
        // Created from the switch side so nothing touches the root namespace.
        switch.run_ok(&[
            "ip",
            "link",
            "add",
            &port,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFACE,
            "mtu",
            &mtu,
            "netns",
            ns.name(),
        ]);
        switch.run_ok(&["ip", "link", "set", &port, "master", BRIDGE, "up"]);
        let ip = host_ip(index);
        let addr = format!("{ip}/{UNDERLAY_PREFIX_LEN}");
        ns.run_ok(&["ip", "addr", "add", &addr, "dev", HOST_IFACE]);
        ns.run_ok(&["ip", "link", "set", HOST_IFACE, "up"]);
        Host::new(index, ns, ip)
    }
}

fn disable_ipv6(ns: &NsRef) {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
}

/// The switch's interface towards the outside namespace.
const OUTSIDE_PORT: &str = "vout";

/// Name of host `index`'s port on the switch bridge.
pub fn switch_port(index: usize) -> String {
    format!("vh{index}")
}

/// The simulated cluster. See the module docs for the layout.
#[derive(Debug)]
pub struct Topology {
    containers: Mutex<Vec<NsRef>>,
    hosts: Vec<Host>,
    etcd: Option<Etcd>,
    outside: Option<NetNs>,
    // Last: etcd and host links live in or point at it.
    switch: NetNs,
    ipv6: bool,
}

impl Topology {
    /// Defaults: 2 hosts, etcd, MTU 1500, no IPv6.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            hosts: 2,
            etcd: true,
            mtu: DEFAULT_MTU,
            outside: false,
            ipv6: false,
        }
    }

    /// `n` hosts with etcd and defaults otherwise.
    pub fn new(hosts: usize) -> Self {
        Self::builder().hosts(hosts).build()
    }

    /// The underlay switch namespace (bridge `br0`, etcd).
    /// The "outside" namespace (built with `.outside(true)`).
    pub fn outside(&self) -> &NetNs {
        self.outside
            .as_ref()
            .expect("topology built without .outside(true)")
    }

    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, index: usize) -> &Host {
        self.hosts
            .get(index)
            .unwrap_or_else(|| panic!("no host {index}: topology has {}", self.hosts.len()))
    }

    /// The etcd server; panics if the topology was built without one.
    pub fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("topology built without etcd")
    }

    /// Mutable access, for [`Etcd::stop`] / [`Etcd::restart`].
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("topology built without etcd")
    }

    /// `http://198.18.0.254:2379`.
    pub fn etcd_endpoint(&self) -> String {
        self.etcd().endpoint()
    }

    /// Creates an empty container namespace (only `lo`, up) meant for host
    /// `host`; wiring it is netd's job. Dropping the topology also deletes it.
    pub fn add_container(&self, host: usize) -> NetNs {
        self.host(host);
        let ns = NetNs::new();
        if !self.ipv6 {
            disable_ipv6(&ns);
        }
        self.containers.lock().unwrap().push(ns.handle());
        ns
    }

    /// Brings host `index`'s switch port up or down (cuts its underlay).
    pub fn set_host_link(&self, index: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        self.switch
            .run_ok(&["ip", "link", "set", &switch_port(index), state]);
    }

    /// Names of every namespace the topology owns (switch, hosts, containers).
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.switch.name().to_string()];
        names.extend(self.hosts.iter().map(|h| h.ns.name().to_string()));
        names.extend(self.outside.iter().map(|o| o.name().to_string()));
        let containers = self.containers.lock().unwrap();
        names.extend(containers.iter().map(|c| c.name().to_string()));
        names
    }
}

/// Bridge of the second underlay segment (see [`Topology::add_routed_segment`]).
pub const SEGMENT_B_BRIDGE: &str = "br1";
/// The router's (switch namespace's) address on the second segment.
pub const SEGMENT_B_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);

/// Address of host `index` once moved to the second segment: 198.18.1.(index+1).
pub fn segment_b_ip(index: usize) -> Ipv4Addr {
    assert!(index < 253, "at most 253 hosts fit the underlay /24");
    Ipv4Addr::new(198, 18, 1, index as u8 + 1)
}

/// Variations on the underlay: a second L2 segment behind a router, and an
/// etcd started by the test (e.g. with TLS).
impl Topology {
    /// Runs `etcd` as this topology's etcd (built with `.etcd(false)`);
    /// replaces (stops) any previous one.
    pub fn set_etcd(&mut self, etcd: Etcd) {
        self.etcd = Some(etcd);
    }

    /// Splits the underlay into two L2 segments joined by a router:
    ///
    /// ```text
    ///   switch ns (router, ip_forward=1):
    ///     br0 198.18.0.254/24  <- the other hosts, 198.18.0.(i+1)/24
    ///     br1 198.18.1.254/24  <- `hosts`, readdressed to 198.18.1.(i+1)/24
    /// ```
    ///
    /// Each host gets a route to the other segment via the router, so etcd
    /// (on 198.18.0.254) stays reachable from both. [`Host::ip`] reports
    /// the new address of a moved host. Call before starting daemons.
    pub fn add_routed_segment(&mut self, hosts: &[usize]) {
        let router_b = format!("{SEGMENT_B_ROUTER_IP}/{UNDERLAY_PREFIX_LEN}");
        let switch = &self.switch;
        switch.run_ok(&["ip", "link", "add", SEGMENT_B_BRIDGE, "type", "bridge"]);
        switch.run_ok(&["ip", "addr", "add", &router_b, "dev", SEGMENT_B_BRIDGE]);
        switch.run_ok(&["ip", "link", "set", SEGMENT_B_BRIDGE, "up"]);
        switch.sysctl("net.ipv4.ip_forward", "1");
        let segment_a = format!("{}/{UNDERLAY_PREFIX_LEN}", segment_network(SWITCH_IP));
        let segment_b = format!(
            "{}/{UNDERLAY_PREFIX_LEN}",
            segment_network(SEGMENT_B_ROUTER_IP)
        );
        for host in &mut self.hosts {
            let (other, via) = if hosts.contains(&host.index) {
                let port = switch_port(host.index);
                switch.run_ok(&["ip", "link", "set", &port, "master", SEGMENT_B_BRIDGE]);
                let ip = segment_b_ip(host.index);
                let addr = format!("{ip}/{UNDERLAY_PREFIX_LEN}");
                host.ns.run_ok(&["ip", "addr", "flush", "dev", HOST_IFACE]);
                host.ns
                    .run_ok(&["ip", "addr", "add", &addr, "dev", HOST_IFACE]);
                host.ip = ip;
                (&segment_a, SEGMENT_B_ROUTER_IP)
            } else {
                (&segment_b, SWITCH_IP)
            };
            let via = via.to_string();
            host.ns.run_ok(&[
                "ip", "route", "replace", other, "via", &via, "dev", HOST_IFACE,
            ]);
        }
    }

    /// Sets the MTU of the router's interface into a segment (`bridge`:
    /// [`BRIDGE`] or [`SEGMENT_B_BRIDGE`]), the hosts' NICs keeping theirs:
    /// packets routed into that segment are fragmented to fit, or refused
    /// with ICMP fragmentation-needed when DF is set.
    pub fn set_router_mtu(&self, bridge: &str, mtu: u32) {
        let mtu = mtu.to_string();
        self.switch
            .run_ok(&["ip", "link", "set", bridge, "mtu", &mtu]);
    }
}

/// `a.b.c.0` of a /24 address.
fn segment_network(ip: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = ip.octets();
    Ipv4Addr::new(a, b, c, 0)
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in self.containers.get_mut().unwrap().drain(..) {
            c.delete();
        }
        self.hosts.clear();
        self.etcd = None;
        self.outside = None;
        // `switch` is deleted by its own drop.
    }
}

/// One simulated host: a namespace with `eth0` on the underlay, plus a
/// private bpffs pin directory and run directory for netd.
#[derive(Debug)]
pub struct Host {
    index: usize,
    ip: Ipv4Addr,
    ns: NetNs,
    pin_path: PathBuf,
    run_dir: TempDir,
    spawned: AtomicU32,
}

impl Host {
    fn new(index: usize, ns: NetNs, ip: Ipv4Addr) -> Self {
        static CLEANUP: Once = Once::new();
        ensure_bpffs();
        CLEANUP.call_once(cleanup_stale_pins);
        let pin_path = Path::new(BPFFS).join(ns.name());
        std::fs::create_dir_all(&pin_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", pin_path.display()));
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("{}-run-", ns.name()))
            .tempdir()
            .expect("create run dir");
        Self {
            index,
            ip,
            ns,
            pin_path,
            run_dir,
            spawned: AtomicU32::new(0),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Underlay address on `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `/sys/fs/bpf/<unique>`: created empty, removed on drop.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// A private temp directory (logs, sockets, state), removed on drop.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// Starts `program args…` in this host, logging to
    /// `run_dir/<program>.<n>.log`.
    pub fn start<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let stem = Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy();
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let log = self.run_dir().join(format!("{stem}.{n}.log"));
        Daemon::start(&self.ns, program, args, &log)
    }

    /// Starts the netd daemon (`NETD_BIN`) in this host with `args`.
    pub fn start_netd<I, S>(&self, args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.start(netd_bin(), args)
    }

    /// Runs a one-shot `netd ARGS…` (e.g. `attach`) in this host; panics if
    /// it runs longer than [`NETD_CLI_TIMEOUT`].
    pub fn netd(&self, args: &[&str]) -> Output {
        let mut cmd = self.ns.command(netd_bin());
        cmd.args(args);
        output_within(&mut cmd, NETD_CLI_TIMEOUT)
    }

    /// Like [`Host::netd`] but panics with output on failure; returns stdout.
    pub fn netd_ok(&self, args: &[&str]) -> String {
        let out = self.netd(args);
        if !out.status.success() {
            panic!(
                "[host {}] netd {args:?} failed ({}):\n{}",
                self.index,
                out.status,
                output_text(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Daemons that need more than arguments.
impl Host {
    /// Like [`Host::start_netd`], with `env` added to the daemon's
    /// environment (e.g. `NETD_ETCD_PASSWORD`, which must not be an argument).
    pub fn start_netd_with_env<I, S>(&self, args: I, env: &[(&str, &str)]) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let log = self.run_dir().join(format!("netd.{n}.log"));
        let mut cmd = self.ns.command(netd_bin());
        cmd.args(args);
        for (key, value) in env {
            cmd.env(key, value);
        }
        Daemon::spawn(cmd, format!("netd in {}", self.ns.name()), &log)
    }

    /// Like [`Host::netd`], with `env` added to the command's environment.
    pub fn netd_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.ns.command(netd_bin());
        cmd.args(args);
        for (key, value) in env {
            cmd.env(key, value);
        }
        output_within(&mut cmd, NETD_CLI_TIMEOUT)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Processes first, so nothing re-pins while the directory goes away.
        self.ns.delete();
        match std::fs::remove_dir_all(&self.pin_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("remove {}: {e}", self.pin_path.display())
            }
            _ => {}
        }
    }
}
