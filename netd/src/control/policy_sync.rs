//! Keeps the kernel's policy tables equal to etcd: every host's published
//! endpoints (`<prefix>/endpoints/`) and the policies
//! (`<prefix>/policies/<name>`), with this host's own records, the foreign
//! identity (a flannel host's containers, which the kernel tells by its
//! `SUBNETS`) and this host's gateway, are compiled into [`Tables`] and
//! written to the kernel.
//!
//! Level-triggered: one list of both prefixes at one revision, then a watch
//! of both from the next revision (a compaction, cancellation or error means
//! a full list again). Nothing here reads the subnets or watches the leases,
//! so the work does not grow with the number of hosts: tables are compiled
//! again only when the watched state changed (bursts coalesced over
//! [`COALESCE`]) or this host's records did (read every [`RECHECK`]), and
//! the last compiled tables are applied again every [`REAPPLY`] (the apply
//! compares with the kernel and writes only the difference). Invalid
//! endpoint or policy values are ignored with one log line per key and
//! revision; the others are kept.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use etcd_client::{EventType, GetOptions, WatchOptions};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    control::{
        endpoints::{ENDPOINTS_DIR, info_of},
        lease::{gateway, parse_subnet_key},
        registry::{Registry, RegistryError},
    },
    datapath::{PinDir, conntrack, policy_maps::PolicyMaps},
    endpoint::{self, labels},
    policy::{self, ClusterView, EndpointInfo, ForeignIdentity, Policy, Tables},
    state::{now, write_atomic},
};

/// Directory of the policies under the prefix.
pub const POLICIES_DIR: &str = "policies";
/// Watch events closer together than this are applied as one change.
pub const COALESCE: Duration = Duration::from_millis(50);
/// How often this host's endpoint records are read.
pub const RECHECK: Duration = Duration::from_secs(1);
/// How often the last compiled tables are written again (only where the
/// kernel differs).
pub const REAPPLY: Duration = Duration::from_secs(5);
/// How often expired conntrack entries are deleted.
pub const CONNTRACK_GC: Duration = Duration::from_secs(30);
/// What the task last applied, for `netd status`.
pub const SUMMARY_FILE: &str = crate::state::POLICY_SUMMARY;

/// Writes compiled tables into the kernel's `IDENTITIES`, `LOCAL_POLICY`
/// and `POLICY` maps and bumps the generation (a trait so the task can be
/// exercised without a kernel).
pub trait KernelTables: Send {
    fn apply(&mut self, tables: &Tables) -> anyhow::Result<()>;
}

impl KernelTables for PolicyMaps {
    fn apply(&mut self, tables: &Tables) -> anyhow::Result<()> {
        PolicyMaps::apply(self, tables)?;
        Ok(())
    }
}

pub fn open_kernel_tables(pin: &PinDir) -> anyhow::Result<Box<dyn KernelTables>> {
    let mut maps = PolicyMaps::open(pin)?;
    maps.clear_untracked()?;
    Ok(Box::new(maps))
}

/// Deletes expired conntrack entries; how many.
pub fn conntrack_gc(pin: &PinDir) -> anyhow::Result<usize> {
    Ok(conntrack::gc(pin)?.removed)
}

/// Why a value under the watched prefixes is ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("endpoint key is not <a.b.c.d-len>/<ip>")]
    EndpointKey,
    #[error("endpoint value is not EndpointInfo JSON: {0}")]
    EndpointJson(String),
    #[error("endpoint {ip} is published under the key of {key}")]
    EndpointIpMismatch { ip: Ipv4Addr, key: Ipv4Addr },
    #[error("endpoint {0} is outside the subnet it is published under")]
    EndpointOutsideSubnet(Ipv4Addr),
    #[error(transparent)]
    EndpointLabels(#[from] labels::LabelError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("policy named {0:?} is stored under another name")]
    PolicyName(String),
}

/// Parses `<subnet key>/<ip>` = [`EndpointInfo`] JSON.
pub fn parse_endpoint(key: &str, value: &[u8]) -> Result<(Ipv4Net, EndpointInfo), Rejection> {
    let (subnet, ip) = key.split_once('/').ok_or(Rejection::EndpointKey)?;
    let subnet = parse_subnet_key(subnet).map_err(|_| Rejection::EndpointKey)?;
    let key_ip: Ipv4Addr = ip.parse().map_err(|_| Rejection::EndpointKey)?;
    let info: EndpointInfo =
        serde_json::from_slice(value).map_err(|e| Rejection::EndpointJson(e.to_string()))?;
    if info.ip != key_ip {
        return Err(Rejection::EndpointIpMismatch {
            ip: info.ip,
            key: key_ip,
        });
    }
    if !subnet.contains(&info.ip) {
        return Err(Rejection::EndpointOutsideSubnet(info.ip));
    }
    labels::check_network(&info.network)?;
    labels::check_labels(&info.labels)?;
    Ok((subnet, info))
}

/// Parses `<name>` = policy JSON.
pub fn parse_policy(name: &str, value: &[u8]) -> Result<Policy, Rejection> {
    let policy = Policy::parse(value)?;
    if policy.name != name {
        return Err(Rejection::PolicyName(policy.name));
    }
    Ok(policy)
}

/// The raw etcd state under both prefixes: key (relative) → value and
/// revision.
#[derive(Debug, Default, Clone)]
pub struct Raw {
    pub endpoints: BTreeMap<String, (Vec<u8>, i64)>,
    pub policies: BTreeMap<String, (Vec<u8>, i64)>,
}

/// The valid part of [`Raw`], and what was ignored and why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Endpoints by the subnet directory they are published in.
    pub endpoints: Vec<(Ipv4Net, EndpointInfo)>,
    pub policies: Vec<Policy>,
    pub rejected: BTreeMap<String, String>,
}

/// Logs each ignored key once per revision, not on every recompute.
#[derive(Default)]
pub struct Rejections {
    seen: HashSet<(String, i64)>,
}

impl Rejections {
    fn reject(&mut self, key: &str, revision: i64, why: &Rejection) {
        if self.seen.insert((key.to_string(), revision)) {
            warn!(key, revision, "ignoring: {why}");
        }
    }
}

pub fn parse(raw: &Raw, rejections: &mut Rejections) -> Parsed {
    let mut out = Parsed::default();
    for (key, (value, revision)) in &raw.endpoints {
        match parse_endpoint(key, value) {
            Ok(endpoint) => out.endpoints.push(endpoint),
            Err(why) => {
                let full = format!("{ENDPOINTS_DIR}/{key}");
                rejections.reject(&full, *revision, &why);
                out.rejected.insert(full, why.to_string());
            }
        }
    }
    for (name, (value, revision)) in &raw.policies {
        match parse_policy(name, value) {
            Ok(policy) => out.policies.push(policy),
            Err(why) => {
                let full = format!("{POLICIES_DIR}/{name}");
                rejections.reject(&full, *revision, &why);
                out.rejected.insert(full, why.to_string());
            }
        }
    }
    out
}

/// What this host contributes to the view.
#[derive(Debug, Clone)]
pub struct Host {
    pub subnet: Ipv4Net,
    pub foreign: ForeignIdentity,
}

/// The view as this host sees it: its own endpoints from its records (the
/// etcd copy of its directory may lag), every other host's from etcd.
pub fn view(host: &Host, parsed: &Parsed, local: &[EndpointInfo]) -> ClusterView {
    let mut by_ip: BTreeMap<Ipv4Addr, EndpointInfo> = BTreeMap::new();
    for (subnet, info) in &parsed.endpoints {
        if *subnet != host.subnet && !host.subnet.contains(&info.ip) {
            by_ip.entry(info.ip).or_insert_with(|| info.clone());
        }
    }
    for info in local {
        by_ip.insert(info.ip, info.clone());
    }
    ClusterView {
        endpoints: by_ip.into_values().collect(),
        local: local.iter().map(|e| e.ip).collect::<BTreeSet<_>>(),
        foreign: host.foreign.clone(),
        gateway: Some(gateway(host.subnet)),
    }
}

/// What was applied, in `<run-dir>/policy.json` for `netd status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Unix time of the last apply.
    pub applied_at: u64,
    pub policies: Vec<String>,
    pub endpoints: Vec<EndpointInfo>,
    pub local: Vec<Ipv4Addr>,
    /// Identity and network id of a flannel host's containers.
    #[serde(default)]
    pub foreign_identity: u32,
    #[serde(default)]
    pub foreign_network: u32,
    pub identities: Vec<IdentityRow>,
    pub local_policy: Vec<LocalRow>,
    pub rules: usize,
    pub problems: Vec<String>,
    /// Keys ignored, with why.
    pub rejected: BTreeMap<String, String>,
    /// The last apply's error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRow {
    pub prefix: Ipv4Net,
    pub id: u32,
    pub network: u32,
    pub kind: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRow {
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub network: u32,
    pub flags: u8,
}

impl Summary {
    fn of(view: &ClusterView, parsed: &Parsed, tables: &Tables) -> Self {
        Summary {
            applied_at: now(),
            policies: parsed.policies.iter().map(|p| p.name.clone()).collect(),
            endpoints: view.endpoints.clone(),
            local: view.local.iter().copied().collect(),
            foreign_identity: tables.foreign_identity,
            foreign_network: tables.foreign_network,
            identities: tables
                .identities
                .iter()
                .map(|(prefix, i)| IdentityRow {
                    prefix: *prefix,
                    id: i.id,
                    network: i.network,
                    kind: i.kind,
                })
                .collect(),
            local_policy: tables
                .local
                .iter()
                .map(|(ip, l)| LocalRow {
                    ip: *ip,
                    identity: l.identity,
                    network: l.network,
                    flags: l.flags,
                })
                .collect(),
            rules: tables.rules.len(),
            problems: tables.problems.clone(),
            rejected: parsed.rejected.clone(),
            error: None,
        }
    }

    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(SUMMARY_FILE)
    }

    pub fn read(run_dir: &Path) -> Option<Summary> {
        serde_json::from_slice(&std::fs::read(Self::path(run_dir)).ok()?).ok()
    }
}

/// The task: everything it needs to build the view and write the tables.
pub struct PolicySync {
    pub registry: Registry,
    pub pin: PinDir,
    pub run_dir: PathBuf,
    pub host: Host,
}

/// The last compiled tables and what they were compiled from.
struct Compiled {
    local: Vec<EndpointInfo>,
    view: ClusterView,
    policies: Vec<Policy>,
    tables: Tables,
    summary: Summary,
}

/// One session's loop state.
struct Session {
    raw: Raw,
    /// `raw` changed since the last compile.
    dirty: bool,
    rejections: Rejections,
    compiled: Option<Compiled>,
    /// The last apply of `compiled.tables` succeeded.
    applied: bool,
    applied_at: Instant,
    problems_logged: Vec<String>,
}

impl PolicySync {
    /// Runs until the daemon stops; etcd errors mean a full list again.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut kernel = open_kernel_tables(&self.pin)?;
        let mut rejections = Rejections::default();
        let mut last_error: Option<String> = None;
        loop {
            let error = match self.session(kernel.as_mut(), &mut rejections).await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if last_error.as_deref() != Some(error.as_str()) {
                warn!("policy sync interrupted: {error}; listing again");
            }
            last_error = Some(error);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A full list, then the watch until it fails.
    async fn session(
        &self,
        kernel: &mut dyn KernelTables,
        rejections: &mut Rejections,
    ) -> anyhow::Result<()> {
        let (raw, revision) = self.list().await?;
        let mut s = Session {
            raw,
            dirty: true,
            rejections: std::mem::take(rejections),
            compiled: None,
            applied: false,
            applied_at: Instant::now(),
            problems_logged: Vec::new(),
        };
        let result = self.follow(kernel, &mut s, revision).await;
        *rejections = s.rejections;
        result
    }

    async fn follow(
        &self,
        kernel: &mut dyn KernelTables,
        s: &mut Session,
        revision: i64,
    ) -> anyhow::Result<()> {
        self.recompute_aside(kernel, s);
        let prefix = self.registry.key("");
        // Both directories on one stream, from the listed revision on; the
        // leases (`subnets/`) are not watched: their churn is not ours.
        let options = || {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1)
        };
        let dir = |d: &str| self.registry.key(&format!("{d}/"));
        let mut stream = self
            .registry
            .client()
            .watch(dir(ENDPOINTS_DIR), Some(options()))
            .await
            .map_err(|e| self.registry.err(e))?;
        stream
            .watch(dir(POLICIES_DIR), Some(options()))
            .await
            .map_err(|e| self.registry.err(e))?;
        let mut recheck = tokio::time::interval(RECHECK);
        let mut gc = tokio::time::interval(CONNTRACK_GC);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let deadline = due.unwrap_or_else(|| tokio::time::Instant::now() + REAPPLY);
            tokio::select! {
                message = stream.message() => {
                    let resp = message.map_err(|e| self.registry.err(e))?
                        .ok_or_else(|| anyhow::anyhow!("watch stream closed"))?;
                    if resp.compact_revision() > 0 {
                        anyhow::bail!("watch compacted at revision {}", resp.compact_revision());
                    }
                    if resp.canceled() {
                        anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                    }
                    if self.absorb(&mut s.raw, &prefix, &resp) {
                        s.dirty = true;
                        if due.is_none() {
                            due = Some(tokio::time::Instant::now() + COALESCE);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if due.is_some() => {
                    due = None;
                    self.recompute_aside(kernel, s);
                }
                _ = recheck.tick() => self.recompute_aside(kernel, s),
                _ = gc.tick() => match conntrack_gc(&self.pin) {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "expired conntrack entries deleted"),
                    Err(e) => warn!("conntrack clean-up: {e:#}"),
                },
            }
        }
    }

    /// Folds a watch response into `raw`; whether anything changed.
    fn absorb(&self, raw: &mut Raw, prefix: &str, resp: &etcd_client::WatchResponse) -> bool {
        let mut relevant = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(prefix))
            else {
                continue;
            };
            let (table, rest) = if let Some(rest) = key.strip_prefix(&format!("{ENDPOINTS_DIR}/")) {
                (&mut raw.endpoints, rest)
            } else if let Some(rest) = key.strip_prefix(&format!("{POLICIES_DIR}/")) {
                (&mut raw.policies, rest)
            } else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    table.insert(rest.to_string(), (kv.value().to_vec(), kv.mod_revision()));
                }
                EventType::Delete => {
                    table.remove(rest);
                }
            }
            relevant = true;
        }
        relevant
    }

    /// Both prefixes at one revision.
    async fn list(&self) -> Result<(Raw, i64), RegistryError> {
        let mut client = self.registry.client();
        let mut raw = Raw::default();
        let mut revision = 0;
        for (dir, table) in [
            (ENDPOINTS_DIR, &mut raw.endpoints),
            (POLICIES_DIR, &mut raw.policies),
        ] {
            let prefix = self.registry.key(&format!("{dir}/"));
            let mut options = GetOptions::new().with_prefix();
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = client
                .get(prefix.as_str(), Some(options))
                .await
                .map_err(|e| self.registry.err(e))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                if let Some(key) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                {
                    table.insert(key.to_string(), (kv.value().to_vec(), kv.mod_revision()));
                }
            }
        }
        Ok((raw, revision))
    }

    /// [`Self::recompute`] with the worker thread handed over: compiling a
    /// large policy set is synchronous and must not hold up the tasks
    /// queued behind it (the subnet sync's watch, the etcd connection).
    /// Needs the multi-threaded runtime.
    fn recompute_aside(&self, kernel: &mut dyn KernelTables, s: &mut Session) {
        tokio::task::block_in_place(|| self.recompute(kernel, s));
    }

    /// Compiles again when the watched state or this host's records
    /// changed, and applies when that changed the tables or [`REAPPLY`]
    /// is due (or the last apply failed).
    fn recompute(&self, kernel: &mut dyn KernelTables, s: &mut Session) {
        let local = match endpoint::records(&self.run_dir) {
            Ok(records) => records.iter().filter_map(info_of).collect::<Vec<_>>(),
            Err(e) => {
                warn!("reading the endpoint records: {e:#}");
                return;
            }
        };
        let unchanged = !s.dirty && s.compiled.as_ref().is_some_and(|c| c.local == local);
        if !unchanged {
            self.compile(s, local);
        }
        if s.applied && s.applied_at.elapsed() < REAPPLY {
            return;
        }
        let Some(c) = s.compiled.as_mut() else { return };
        c.summary.applied_at = now();
        match kernel.apply(&c.tables) {
            Ok(()) => {
                if !s.applied {
                    info!(
                        endpoints = c.view.endpoints.len(),
                        local = c.view.local.len(),
                        policies = c.policies.len(),
                        identities = c.tables.identities.len(),
                        rules = c.tables.rules.len(),
                        "policy tables applied"
                    );
                }
                c.summary.error = None;
                s.applied = true;
            }
            Err(e) => {
                warn!("writing the policy tables: {e:#}");
                c.summary.error = Some(format!("{e:#}"));
                s.applied = false;
            }
        }
        s.applied_at = Instant::now();
        if let Ok(json) = serde_json::to_vec_pretty(&c.summary)
            && let Err(e) = write_atomic(&Summary::path(&self.run_dir), &json)
        {
            warn!("{e:#}");
        }
    }

    /// Parses the watched state, builds the view and compiles it; marks the
    /// tables for an apply when the view or the policies changed.
    fn compile(&self, s: &mut Session, local: Vec<EndpointInfo>) {
        let parsed = parse(&s.raw, &mut s.rejections);
        s.dirty = false;
        let view = view(&self.host, &parsed, &local);
        if let Some(c) = s.compiled.as_mut()
            && c.view == view
            && c.policies == parsed.policies
        {
            // Same inputs, same tables; only what is ignored may differ.
            c.local = local;
            c.summary.rejected = parsed.rejected;
            return;
        }
        let tables = policy::compile(&view, &parsed.policies);
        for problem in &tables.problems {
            if !s.problems_logged.contains(problem) {
                warn!("policy: {problem}");
            }
        }
        s.problems_logged = tables.problems.clone();
        let summary = Summary::of(&view, &parsed, &tables);
        s.compiled = Some(Compiled {
            local,
            view,
            policies: parsed.policies,
            tables,
            summary,
        });
        s.applied = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::endpoint_info as info;

    fn json(i: &EndpointInfo) -> Vec<u8> {
        serde_json::to_vec(i).unwrap()
    }

    #[test]
    fn endpoints_are_checked_against_their_key() {
        let good = info("10.244.2.5", "blue", &[("app", "web")]);
        assert_eq!(
            parse_endpoint("10.244.2.0-24/10.244.2.5", &json(&good)),
            Ok(("10.244.2.0/24".parse().unwrap(), good.clone()))
        );
        let cases: [(&str, Vec<u8>); 6] = [
            ("10.244.2.5", json(&good)),
            ("10.244.2.0-24/10.244.2.6", json(&good)),
            ("10.244.3.0-24/10.244.2.5", json(&good)),
            ("10.244.2.0-24/10.244.2.5", b"{not json".to_vec()),
            (
                "10.244.2.0-24/10.244.2.5",
                json(&info("10.244.2.5", "a/b", &[])),
            ),
            (
                "10.244.2.0-24/10.244.2.5",
                json(&info("10.244.2.5", "x", &[("-k", "v")])),
            ),
        ];
        for (key, value) in cases {
            assert!(parse_endpoint(key, &value).is_err(), "{key}");
        }
    }

    #[test]
    fn bad_values_are_ignored_and_the_rest_kept() {
        let mut raw = Raw::default();
        let a = info("10.244.2.5", "default", &[]);
        raw.endpoints
            .insert("10.244.2.0-24/10.244.2.5".into(), (json(&a), 3));
        raw.endpoints
            .insert("10.244.2.0-24/10.244.2.6".into(), (b"[]".to_vec(), 4));
        raw.policies.insert(
            "web".into(),
            (br#"{"name":"web","selector":{"app":"web"}}"#.to_vec(), 5),
        );
        raw.policies
            .insert("other".into(), (br#"{"name":"web"}"#.to_vec(), 6));
        raw.policies
            .insert("bad".into(), (br#"{"name":"bad","nope":1}"#.to_vec(), 7));
        let mut rejections = Rejections::default();
        let parsed = parse(&raw, &mut rejections);
        assert_eq!(parsed.endpoints.len(), 1);
        assert_eq!(
            parsed
                .policies
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["web"]
        );
        let rejected: Vec<&str> = parsed.rejected.keys().map(String::as_str).collect();
        assert_eq!(
            rejected,
            [
                "endpoints/10.244.2.0-24/10.244.2.6",
                "policies/bad",
                "policies/other"
            ]
        );
        // Logged once per key and revision.
        parse(&raw, &mut rejections);
        assert_eq!(rejections.seen.len(), 3);
    }

    #[test]
    fn the_view_takes_own_endpoints_from_the_records() {
        let host = Host {
            subnet: "10.244.1.0/24".parse().unwrap(),
            foreign: ForeignIdentity::default(),
        };
        let remote = info("10.244.2.5", "blue", &[]);
        let stale_own = info("10.244.1.9", "default", &[]);
        let parsed = Parsed {
            endpoints: vec![
                ("10.244.2.0/24".parse().unwrap(), remote.clone()),
                ("10.244.1.0/24".parse().unwrap(), stale_own),
            ],
            ..Default::default()
        };
        let local = [info("10.244.1.2", "default", &[("app", "web")])];
        let v = view(&host, &parsed, &local);
        assert_eq!(v.endpoints, [local[0].clone(), remote]);
        assert_eq!(v.local, BTreeSet::from([local[0].ip]));
        assert_eq!(v.gateway, Some("10.244.1.1".parse().unwrap()));
    }
}
