//! This host's endpoints in etcd, for the other hosts' policy tables:
//! `<prefix>/endpoints/<subnet key>/<ip>` = [`EndpointInfo`] JSON, each key
//! bound to the host's subnet lease, so a dead host's endpoints disappear
//! with its lease.
//!
//! Level-triggered: the desired state is this host's ready records in the
//! run directory, the actual state the keys under this host's directory;
//! missing or changed keys are put, extra ones deleted. The run directory
//! is read every second (cheap, and it sees attachments made while the
//! daemon was down as well as those made by `netd attach`, the CNI plugin
//! and the Docker plugin alike); etcd is written when the records or the
//! lease change, and compared in full every [`RESYNC`].

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use etcd_client::{GetOptions, PutOptions};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::{
        lease::subnet_key,
        registry::{Registry, RegistryError},
    },
    endpoint::{self, Record, labels},
    policy::EndpointInfo,
    state::NodeState,
};

/// Directory of the endpoints under the prefix.
pub const ENDPOINTS_DIR: &str = "endpoints";
/// How often the run directory is read.
pub const POLL: Duration = Duration::from_millis(250);
/// How often etcd is compared with the records even if nothing changed.
pub const RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("reading the endpoint records")]
    Records(#[source] anyhow::Error),
}

/// `<prefix>/endpoints/`.
pub fn endpoints_prefix(registry: &Registry) -> String {
    registry.key(&format!("{ENDPOINTS_DIR}/"))
}

/// `<prefix>/endpoints/<subnet key>/`: one host's directory.
pub fn host_dir(registry: &Registry, subnet: Ipv4Net) -> String {
    format!("{}{}/", endpoints_prefix(registry), subnet_key(subnet))
}

/// What a record publishes; `None` for one whose network or labels are
/// not valid (written by an older build), which is not published.
pub fn info_of(record: &Record) -> Option<EndpointInfo> {
    let network = labels::network_of(record.network.as_deref());
    labels::check_network(network).ok()?;
    labels::check_labels(&record.labels).ok()?;
    Some(EndpointInfo {
        ip: record.ip,
        network: network.to_string(),
        labels: record.labels.clone(),
    })
}

/// A key as etcd holds it: value and the lease it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub value: Vec<u8>,
    pub lease: i64,
}

/// What to write so that etcd holds `desired` bound to `lease`; keys are
/// relative to the host's directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub put: Vec<(String, String)>,
    pub delete: Vec<String>,
}

pub fn plan(
    desired: &BTreeMap<Ipv4Addr, EndpointInfo>,
    actual: &BTreeMap<String, Stored>,
    lease: i64,
) -> Plan {
    let mut out = Plan::default();
    let mut wanted = HashSet::new();
    for (ip, info) in desired {
        let key = ip.to_string();
        // Serialising a map of strings cannot fail.
        let json = serde_json::to_string(info).unwrap_or_default();
        let current = actual.get(&key);
        if current.is_none_or(|s| s.value != json.as_bytes() || s.lease != lease) {
            out.put.push((key.clone(), json));
        }
        wanted.insert(key);
    }
    out.delete = actual
        .keys()
        .filter(|k| !wanted.contains(*k))
        .cloned()
        .collect();
    out
}

/// Publishes the ready records of `run_dir` under `subnet`'s directory.
pub struct Publisher {
    pub registry: Registry,
    pub run_dir: PathBuf,
    pub subnet: Ipv4Net,
    pub state: watch::Receiver<NodeState>,
}

/// What the last successful publication wrote for.
#[derive(Default, PartialEq)]
struct Published {
    desired: BTreeMap<Ipv4Addr, EndpointInfo>,
    lease: i64,
}

impl Publisher {
    /// Runs until the daemon stops; etcd errors are logged and retried.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut last: Option<Published> = None;
        let mut compared = Instant::now();
        let mut unpublishable = HashSet::new();
        let mut failing = false;
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {}
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
            let (lease, lost) = {
                let s = self.state.borrow();
                (s.lease_id, s.lease_lost_since.is_some())
            };
            if lost || lease == 0 {
                // Keys put now would die with the old lease: wait for the new.
                continue;
            }
            let records = endpoint::records(&self.run_dir).map_err(PublishError::Records)?;
            let desired = self.desired(&records, &mut unpublishable);
            let now = Published { desired, lease };
            if last.as_ref() == Some(&now) && compared.elapsed() < RESYNC {
                continue;
            }
            match self.publish(&now.desired, lease).await {
                Ok(plan) => {
                    if failing {
                        info!("endpoints published again");
                        failing = false;
                    }
                    if !plan.put.is_empty() || !plan.delete.is_empty() {
                        info!(
                            lease = format!("{lease:x}"),
                            endpoints = now.desired.len(),
                            put = plan.put.len(),
                            deleted = plan.delete.len(),
                            "endpoints published in etcd"
                        );
                    }
                    last = Some(now);
                    compared = Instant::now();
                }
                Err(e) => {
                    if !failing {
                        warn!(
                            "publishing endpoints: {:#}; retrying",
                            anyhow::Error::from(e)
                        );
                        failing = true;
                    }
                    last = None;
                }
            }
        }
    }

    fn desired(
        &self,
        records: &[Record],
        unpublishable: &mut HashSet<String>,
    ) -> BTreeMap<Ipv4Addr, EndpointInfo> {
        let mut out = BTreeMap::new();
        for record in records {
            match info_of(record) {
                Some(info) => {
                    out.insert(record.ip, info);
                }
                None => {
                    if unpublishable.insert(record.id.clone()) {
                        warn!(id = record.id, ip = %record.ip,
                            "not publishing endpoint: its network or labels are not valid");
                    }
                }
            }
        }
        out
    }

    /// One comparison of etcd with `desired`, and the writes it needs.
    async fn publish(
        &mut self,
        desired: &BTreeMap<Ipv4Addr, EndpointInfo>,
        lease: i64,
    ) -> Result<Plan, PublishError> {
        let dir = host_dir(&self.registry, self.subnet);
        let actual = list(&self.registry, &dir).await?;
        let plan = plan(desired, &actual, lease);
        let mut client = self.registry.client();
        for (key, json) in &plan.put {
            client
                .put(
                    format!("{dir}{key}"),
                    json.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(|e| self.registry.err(e))?;
        }
        for key in &plan.delete {
            client
                .delete(format!("{dir}{key}"), None)
                .await
                .map_err(|e| self.registry.err(e))?;
        }
        Ok(plan)
    }
}

/// The keys under `dir`, relative to it.
async fn list(registry: &Registry, dir: &str) -> Result<BTreeMap<String, Stored>, RegistryError> {
    let resp = registry
        .client()
        .get(dir, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| registry.err(e))?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(dir)?;
            Some((
                key.to_string(),
                Stored {
                    value: kv.value().to_vec(),
                    lease: kv.lease(),
                },
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::endpoint_info as info;

    fn stored(info: &EndpointInfo, lease: i64) -> Stored {
        Stored {
            value: serde_json::to_vec(info).unwrap(),
            lease,
        }
    }

    #[test]
    fn plan_puts_missing_and_changed_and_deletes_extra() {
        let a = info("10.244.1.2", "default", &[("app", "web")]);
        let b = info("10.244.1.3", "blue", &[]);
        let b_old = info("10.244.1.3", "default", &[]);
        let c = info("10.244.1.4", "default", &[]);
        let desired = BTreeMap::from([(a.ip, a.clone()), (b.ip, b.clone()), (c.ip, c.clone())]);
        let actual = BTreeMap::from([
            ("10.244.1.2".to_string(), stored(&a, 7)),     // as wanted
            ("10.244.1.3".to_string(), stored(&b_old, 7)), // changed
            ("10.244.1.9".to_string(), stored(&c, 7)),     // detached
            ("junk".to_string(), stored(&c, 7)),           // not ours to keep
        ]);
        let p = plan(&desired, &actual, 7);
        let put: Vec<&str> = p.put.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(put, ["10.244.1.3", "10.244.1.4"]);
        assert_eq!(p.delete, ["10.244.1.9", "junk"]);
        let back: EndpointInfo = serde_json::from_str(&p.put[0].1).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn a_new_lease_puts_everything_again() {
        let a = info("10.244.1.2", "default", &[]);
        let desired = BTreeMap::from([(a.ip, a.clone())]);
        let actual = BTreeMap::from([("10.244.1.2".to_string(), stored(&a, 7))]);
        assert_eq!(plan(&desired, &actual, 7), Plan::default());
        assert_eq!(plan(&desired, &actual, 8).put.len(), 1);
    }

    #[test]
    fn published_json_is_the_endpoint_info() {
        let a = info("10.244.1.2", "blue", &[("app", "web")]);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"ip":"10.244.1.2","network":"blue","labels":{"app":"web"}}"#
        );
    }
}
