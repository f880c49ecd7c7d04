//! A single-member etcd inside a network namespace, plus `etcdctl` helpers;
//! and a multi-member cluster ([`EtcdCluster`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use tempfile::TempDir;

use crate::daemon::Daemon;
use crate::netns::{NsRef, unique_name};
use crate::util::{output_text, poll_until};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// How long `start` waits for etcd to report healthy.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One key-value pair as stored in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    /// Lease id, 0 when the key has none.
    pub lease: i64,
    pub mod_revision: i64,
}

/// An etcd server; killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    // Declared before `dir` so the process is gone before its data dir.
    daemon: Option<Daemon>,
    ns: NsRef,
    ip: Ipv4Addr,
    name: String,
    /// TLS on the client URL (see [`Etcd::start_tls`]); `None`: plain http.
    tls: Option<EtcdTls>,
    /// Credentials etcdctl passes once auth is on (see [`Etcd::enable_auth`]).
    user: Option<(String, String)>,
    /// Membership of a multi-member cluster (see [`EtcdCluster`]); `None`:
    /// a cluster of one.
    membership: Option<Membership>,
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd in `ns` listening on `ip` (which must be configured
    /// there) and waits until it is healthy.
    pub fn start(ns: &NsRef, ip: Ipv4Addr) -> Self {
        Self::start_with(ns, ip, None)
    }

    fn start_with(ns: &NsRef, ip: Ipv4Addr, tls: Option<EtcdTls>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("netd-etcd-")
            .tempdir()
            .expect("create etcd temp dir");
        let mut etcd = Self {
            daemon: None,
            ns: ns.clone(),
            ip,
            name: format!("etcd-{}", unique_name()),
            tls,
            user: None,
            membership: None,
            dir,
        };
        etcd.launch();
        etcd
    }

    /// `http://IP:2379` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{CLIENT_PORT}", self.ip)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The namespace etcd runs in.
    pub fn ns(&self) -> &NsRef {
        &self.ns
    }

    /// etcd's own log output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops etcd (SIGTERM) keeping its data; see [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    /// Starts etcd again on the same data dir (after [`Etcd::stop`]) and
    /// waits until it is healthy.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Whether `endpoint health` succeeds right now.
    pub fn is_healthy(&self) -> bool {
        self.etcdctl(&[
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "endpoint",
            "health",
        ])
        .status
        .success()
    }

    /// Runs `etcdctl --endpoints E ARGS…` in etcd's namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_in(&self.ns, args)
    }

    /// Runs `etcdctl --endpoints E ARGS…` in another namespace (e.g. a host),
    /// which exercises that namespace's path to etcd.
    pub fn etcdctl_in(&self, ns: &NsRef, args: &[&str]) -> Output {
        let endpoint = self.endpoint();
        let access = self.etcdctl_access_args();
        let mut argv = vec!["etcdctl", "--endpoints", &endpoint];
        argv.extend(access.iter().map(String::as_str));
        argv.extend_from_slice(args);
        let mut cmd = ns.command(argv[0]);
        cmd.args(&argv[1..]).env("ETCDCTL_API", "3");
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run etcdctl (install etcd-client): {e}"))
    }

    /// Like [`Etcd::etcdctl`] but panics with output on failure; returns stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        if !out.status.success() {
            panic!(
                "etcdctl {args:?} failed ({}):\n{}",
                out.status,
                output_text(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        // Before the args: they may end with `-- KEY`.
        let mut argv = vec!["-w", "json"];
        argv.extend_from_slice(args);
        let out = self.etcdctl_ok(&argv);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: bad json {e}: {out}"))
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl_ok(&["put", "--", key, value]);
    }

    /// Puts `key` attached to `lease` (as netd's registrations are).
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) {
        let lease = format!("--lease={lease:x}");
        self.etcdctl_ok(&["put", &lease, "--", key, value]);
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.get_kv(key).map(|kv| kv.value)
    }

    pub fn get_kv(&self, key: &str) -> Option<Kv> {
        parse_kvs(&self.json(&["get", "--", key]))
            .into_iter()
            .next()
    }

    /// All pairs whose key starts with `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<Kv> {
        parse_kvs(&self.json(&["get", "--prefix", "--", prefix]))
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub fn del(&self, key: &str) -> u64 {
        deleted_count(&self.json(&["del", "--", key]))
    }

    /// Deletes every key starting with `prefix`; returns the count.
    pub fn del_prefix(&self, prefix: &str) -> u64 {
        deleted_count(&self.json(&["del", "--prefix", "--", prefix]))
    }

    /// Grants a lease of `ttl_secs`; returns its id.
    pub fn lease_grant(&self, ttl_secs: u64) -> i64 {
        let v = self.json(&["lease", "grant", &ttl_secs.to_string()]);
        v["ID"]
            .as_i64()
            .unwrap_or_else(|| panic!("lease grant: no ID in {v}"))
    }

    /// Revokes a lease, deleting every key attached to it.
    pub fn lease_revoke(&self, lease: i64) {
        self.etcdctl_ok(&["lease", "revoke", &format!("{lease:x}")]);
    }

    /// Ids of all live leases.
    pub fn leases(&self) -> Vec<i64> {
        let v = self.json(&["lease", "list"]);
        let ids = v["leases"].as_array().cloned().unwrap_or_default();
        ids.iter().filter_map(|l| l["id"].as_i64()).collect()
    }

    /// Remaining TTL of a lease in seconds, `None` once expired or revoked.
    pub fn lease_ttl(&self, lease: i64) -> Option<i64> {
        let v = self.json(&["lease", "timetolive", &format!("{lease:x}")]);
        v["ttl"].as_i64().filter(|&ttl| ttl >= 0)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn launch(&mut self) {
        self.spawn_process();
        self.wait_healthy();
    }

    /// Starts the etcd process without waiting for it to be healthy (a
    /// cluster member is not until a quorum runs).
    fn spawn_process(&mut self) {
        let mut daemon = Daemon::start(&self.ns, "etcd", self.args(), &self.log_path());
        // Its log is noise in unrelated failures; start-up failures show it.
        daemon.dump_log_on_panic(false);
        self.daemon = Some(daemon);
    }

    fn args(&self) -> Vec<String> {
        let client = self.endpoint();
        let peer = format!("http://{}:{PEER_PORT}", self.ip);
        let data_dir = self.data_dir().to_string_lossy().into_owned();
        let (cluster, token) = match &self.membership {
            Some(m) => (m.initial_cluster.clone(), m.token.clone()),
            None => (format!("{}={peer}", self.name), self.name.clone()),
        };
        [
            ("--name", self.name.as_str()),
            ("--data-dir", &data_dir),
            ("--listen-client-urls", &client),
            ("--advertise-client-urls", &client),
            ("--listen-peer-urls", &peer),
            ("--initial-advertise-peer-urls", &peer),
            ("--initial-cluster", &cluster),
            ("--initial-cluster-token", &token),
            ("--initial-cluster-state", "new"),
        ]
        .iter()
        .map(|(flag, value)| format!("{flag}={value}"))
        .chain(self.tls_server_args())
        .collect()
    }

    fn wait_healthy(&mut self) {
        let (ns, endpoint) = (self.ns.clone(), self.endpoint());
        let access = self.etcdctl_access_args();
        let daemon = self.daemon.as_mut().expect("etcd started");
        let mut exited = false;
        let healthy = poll_until(STARTUP_TIMEOUT, || {
            exited = !daemon.is_running();
            exited || is_healthy_at(&ns, &endpoint, &access)
        });
        if !healthy || exited {
            let why = if exited { "exited" } else { "not healthy" };
            panic!(
                "etcd at {} in {}: {why} after start (timeout {STARTUP_TIMEOUT:?}); log:\n{}",
                self.endpoint(),
                self.ns.name(),
                self.log()
            );
        }
    }
}

fn is_healthy_at(ns: &NsRef, endpoint: &str, access: &[String]) -> bool {
    let mut cmd = ns.command("etcdctl");
    cmd.args([
        "--endpoints",
        endpoint,
        "--dial-timeout=1s",
        "--command-timeout=2s",
    ])
    .args(access)
    .args(["endpoint", "health"])
    .env("ETCDCTL_API", "3");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run etcdctl (install etcd-client): {e}"))
        .status
        .success()
}

fn decode_b64(field: &Value) -> String {
    let bytes = B64
        .decode(field.as_str().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad base64 {field}: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parses `etcdctl get -w json` output.
pub(crate) fn parse_kvs(v: &Value) -> Vec<Kv> {
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| Kv {
            key: decode_b64(&kv["key"]),
            value: decode_b64(&kv["value"]),
            lease: kv["lease"].as_i64().unwrap_or(0),
            mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
        })
        .collect()
}

fn deleted_count(v: &Value) -> u64 {
    v["deleted"].as_u64().unwrap_or(0)
}

/// Certificates for an etcd that serves its clients over TLS (PEM files).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// CA that signed the server and client certificates; etcd also trusts
    /// client certificates signed by it.
    pub ca: PathBuf,
    /// Server certificate (its IP SAN must be etcd's address) and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate and key etcdctl presents (needed with
    /// `client_cert_auth`).
    pub client: Option<(PathBuf, PathBuf)>,
    /// `--client-cert-auth`: refuse clients without a certificate of `ca`.
    pub client_cert_auth: bool,
}

/// TLS and etcd's own user authentication.
impl Etcd {
    /// Starts etcd in `ns` on `ip` with https client URLs and `tls`'s
    /// certificates; waits until it is healthy (etcdctl over TLS).
    pub fn start_tls(ns: &NsRef, ip: Ipv4Addr, tls: EtcdTls) -> Self {
        Self::start_with(ns, ip, Some(tls))
    }

    /// The TLS set-up, if etcd serves TLS.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Creates user `user` (with the root role) and turns authentication
    /// on; from now on every etcdctl call here passes `--user`.
    pub fn enable_auth(&mut self, user: &str, password: &str) {
        self.etcdctl_ok(&["user", "add", user, "--new-user-password", password]);
        // Granting `root` needs no `role add`; auth enable needs a root user
        // holding it.
        self.etcdctl_ok(&["user", "grant-role", user, "root"]);
        self.etcdctl_ok(&["auth", "enable"]);
        self.user = Some((user.to_string(), password.to_string()));
    }

    /// etcdctl flags for TLS and credentials.
    fn etcdctl_access_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(tls) = &self.tls {
            args.push(format!("--cacert={}", tls.ca.display()));
            if let Some((cert, key)) = &tls.client {
                args.push(format!("--cert={}", cert.display()));
                args.push(format!("--key={}", key.display()));
            }
        }
        if let Some((user, password)) = &self.user {
            args.push(format!("--user={user}:{password}"));
        }
        args
    }

    /// etcd server flags for TLS on the client URL.
    fn tls_server_args(&self) -> Vec<String> {
        let Some(tls) = &self.tls else {
            return Vec::new();
        };
        let mut args = vec![
            format!("--cert-file={}", tls.server_cert.display()),
            format!("--key-file={}", tls.server_key.display()),
            format!("--trusted-ca-file={}", tls.ca.display()),
        ];
        if tls.client_cert_auth {
            args.push("--client-cert-auth=true".into());
        }
        args
    }
}

/// How a member joins a multi-member cluster.
#[derive(Clone, Debug)]
struct Membership {
    /// `--initial-cluster`: `m1=http://IP1:2380,…`.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique per cluster.
    token: String,
}

/// Whether a member runs, and single-member helpers for cluster members.
impl Etcd {
    /// Whether the etcd process was started and not stopped since (see
    /// [`Etcd::stop`], [`Etcd::restart`]).
    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    /// `etcdctl endpoint status` of this member (its own endpoint only):
    /// its member id and the id of the leader it knows, if any.
    pub fn member_status(&self) -> Option<(u64, u64)> {
        let out = self.etcdctl(&[
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "-w",
            "json",
            "endpoint",
            "status",
        ]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = &v.as_array()?.first()?["Status"];
        let id = status["header"]["member_id"].as_u64()?;
        let leader = status["leader"].as_u64()?;
        Some((id, leader))
    }
}

/// A multi-member etcd cluster on the underlay switch: member `i` runs in
/// its own namespace, whose `eth0` (address `ips[i]`/24) is a port of the
/// switch bridge, as a host's is.
///
/// ```text
///   switch ns:  br0 ── vm<last octet> <-> eth0  member ns: 198.18.0.251/24 (etcd :2379, :2380)
/// ```
///
/// Dropping it stops every member, then deletes the namespaces.
#[derive(Debug)]
pub struct EtcdCluster {
    // Before `namespaces`: members stop before their namespaces go.
    members: Vec<Etcd>,
    namespaces: Vec<crate::netns::NetNs>,
    switch: NsRef,
}

impl EtcdCluster {
    /// Starts one member per address in `ips` (on the switch's /24), each
    /// in a new namespace plugged into `bridge` of the `switch` namespace,
    /// and waits until every member is healthy.
    pub fn start(switch: &NsRef, bridge: &str, ips: &[Ipv4Addr]) -> Self {
        assert!(!ips.is_empty(), "an etcd cluster needs members");
        let token = format!("etcd-cluster-{}", unique_name());
        let initial_cluster = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("m{}=http://{ip}:{PEER_PORT}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            namespaces: Vec::new(),
            switch: switch.clone(),
        };
        for (i, &ip) in ips.iter().enumerate() {
            let ns = cluster.plug_member_ns(bridge, ip);
            let dir = tempfile::Builder::new()
                .prefix("netd-etcd-")
                .tempdir()
                .expect("create etcd temp dir");
            cluster.members.push(Etcd {
                daemon: None,
                ns: ns.handle(),
                ip,
                name: format!("m{}", i + 1),
                tls: None,
                user: None,
                membership: Some(Membership {
                    initial_cluster: initial_cluster.clone(),
                    token: token.clone(),
                }),
                dir,
            });
            cluster.namespaces.push(ns);
        }
        // All at once: no member is healthy before a quorum runs.
        for member in &mut cluster.members {
            member.spawn_process();
        }
        for member in &mut cluster.members {
            member.wait_healthy();
        }
        cluster
    }

    /// A namespace whose `eth0` (`ip`/24) is a port of `bridge`.
    fn plug_member_ns(&self, bridge: &str, ip: Ipv4Addr) -> crate::netns::NetNs {
        let ns = crate::netns::NetNs::new();
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        let port = member_port(ip);
        // Created from the switch side so nothing touches the root namespace.
        self.switch.run_ok(&[
            "ip",
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.switch
            .run_ok(&["ip", "link", "set", &port, "master", bridge, "up"]);
        let addr = format!("{ip}/24");
        ns.run_ok(&["ip", "addr", "add", &addr, "dev", "eth0"]);
        ns.run_ok(&["ip", "link", "set", "eth0", "up"]);
        ns
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    /// Mutable access, for [`Etcd::stop`] / [`Etcd::restart`] of one member.
    pub fn member_mut(&mut self, i: usize) -> &mut Etcd {
        &mut self.members[i]
    }

    /// Every member's client URL, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A running member to send requests through (any member serves the
    /// whole key space while a quorum runs). Panics if none runs.
    pub fn client(&self) -> &Etcd {
        self.members
            .iter()
            .find(|m| m.is_running())
            .expect("no etcd member is running")
    }

    /// Index of the current leader, as the running members report it
    /// (`None` while there is none or they disagree).
    pub fn leader(&self) -> Option<usize> {
        let statuses: Vec<(usize, u64, u64)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running())
            .filter_map(|(i, m)| m.member_status().map(|(id, leader)| (i, id, leader)))
            .collect();
        let leader = statuses.first()?.2;
        if leader == 0 || statuses.iter().any(|s| s.2 != leader) {
            return None;
        }
        statuses.iter().find(|s| s.1 == leader).map(|s| s.0)
    }

    /// Connects (`up`) or disconnects member `i`'s switch port: a member
    /// cut off this way neither answers nor closes its connections.
    pub fn set_member_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        let port = member_port(self.members[i].ip);
        self.switch.run_ok(&["ip", "link", "set", &port, state]);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // SIGKILL: the data is thrown away, and a member that lost its
        // peers (or the switch) can take long over a graceful stop.
        for member in &mut self.members {
            if let Some(mut daemon) = member.daemon.take() {
                daemon.kill();
            }
        }
    }
}

/// Name of a member's port on the switch bridge: `vm` + the address's last
/// octet (host ports are `vh<index>`).
fn member_port(ip: Ipv4Addr) -> String {
    format!("vm{}", ip.octets()[3])
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Stop before `dir` is removed (field order alone would also do).
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_get_json() {
        let raw = r#"{"header":{"revision":2},"kvs":[{"key":"L2EvYg==","create_revision":2,
            "mod_revision":2,"version":1,"value":"diAx","lease":2324035606169160968}],"count":1}"#;
        let kvs = parse_kvs(&serde_json::from_str(raw).unwrap());
        assert_eq!(
            kvs,
            vec![Kv {
                key: "/a/b".into(),
                value: "v 1".into(),
                lease: 2324035606169160968,
                mod_revision: 2,
            }]
        );
    }

    #[test]
    fn empty_get_and_del_json() {
        let raw: Value = serde_json::from_str(r#"{"header":{"revision":3}}"#).unwrap();
        assert!(parse_kvs(&raw).is_empty());
        assert_eq!(deleted_count(&raw), 0);
    }
}
