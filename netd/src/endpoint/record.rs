//! The record of each attachment: `<run-dir>/endpoints/<id>.json`.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::state::write_atomic;

/// `pending` from before the first kernel object is made until the last is
/// in place; a pending record seen under the lock is a crashed attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    #[default]
    Ready,
    /// An address held for a runtime that makes the endpoint later (see
    /// `handoff`); no kernel objects exist.
    Reserved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// What the attachment is known by: the namespace for `netd attach`,
    /// `cni/<container id>/<ifname>` for the CNI plugin. Records written
    /// before ids existed take their namespace.
    #[serde(default)]
    pub id: String,
    /// Name under /run/netns, or the path given.
    pub netns: String,
    pub netns_path: PathBuf,
    pub ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub host_mac: String,
    #[serde(default)]
    pub phase: Phase,
    /// The CNI or Docker network name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The CNI container id, or the Docker endpoint id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Labels for policy: the CNI config's `args.labels` and the pod's
    /// namespace and name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

pub(super) fn records_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("endpoints")
}

/// A file name for an id: namespaces may be paths.
fn file_key(id: &str) -> String {
    id.trim_start_matches('/').replace('/', "_")
}

pub(super) fn record_path(run_dir: &Path, id: &str) -> PathBuf {
    records_dir(run_dir).join(format!("{}.json", file_key(id)))
}

/// Every record, pending ones included, sorted by address.
pub fn all_records(run_dir: &Path) -> Result<Vec<Record>> {
    let Ok(entries) = fs::read_dir(records_dir(run_dir)) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match fs::read(&path).map(|b| serde_json::from_slice::<Record>(&b)) {
            Ok(Ok(mut record)) => {
                if record.id.is_empty() {
                    record.id = record.netns.clone();
                }
                out.push(record)
            }
            _ => warn!(file = %path.display(), "skipping unreadable endpoint record"),
        }
    }
    out.sort_by_key(|r| r.ip);
    Ok(out)
}

/// The attachments in place (not pending).
pub fn records(run_dir: &Path) -> Result<Vec<Record>> {
    Ok(all_records(run_dir)?
        .into_iter()
        .filter(|r| r.phase == Phase::Ready)
        .collect())
}

/// The record with this id, or of this namespace (as `netd detach` names it).
pub fn find(run_dir: &Path, key: &str) -> Result<Option<Record>> {
    let all = all_records(run_dir)?;
    Ok(all
        .iter()
        .find(|r| r.id == key)
        .or_else(|| all.iter().find(|r| r.netns == key))
        .cloned())
}

pub(super) fn write(run_dir: &Path, record: &Record) -> Result<()> {
    fs::create_dir_all(records_dir(run_dir))?;
    write_atomic(
        &record_path(run_dir, &record.id),
        &serde_json::to_vec_pretty(record)?,
    )
}

pub(super) fn remove(run_dir: &Path, id: &str) -> Result<()> {
    let path = record_path(run_dir, id);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes the records directory and the lock file once every container
/// is detached; a directory still holding a record is left (and reported)
/// so nothing is forgotten.
pub fn remove_records_dir(run_dir: &Path) -> Result<()> {
    let dir = records_dir(run_dir);
    match fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.display()));
        }
        _ => {}
    }
    let lock = run_dir.join(super::allocator::LOCK_FILE);
    match fs::remove_file(&lock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", lock.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_read_with_defaults() {
        let dir = std::env::temp_dir().join(format!("netd-records-{}", std::process::id()));
        fs::create_dir_all(records_dir(&dir)).unwrap();
        let old = r#"{"netns":"c1","netns_path":"/run/netns/c1","ifname":"eth0",
            "host_ifname":"ndv00000001","host_ifindex":7,"ip":"10.244.3.2",
            "mac":"02:00:00:00:00:01","host_mac":"02:00:00:00:00:02"}"#;
        fs::write(record_path(&dir, "c1"), old).unwrap();
        let all = all_records(&dir).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "c1");
        assert_eq!(all[0].phase, Phase::Ready);
        assert_eq!(find(&dir, "c1").unwrap().unwrap().ip, all[0].ip);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_keys_are_flat() {
        assert_eq!(file_key("/run/netns/x"), "run_netns_x");
        assert_eq!(file_key("cni/abc/eth0"), "cni_abc_eth0");
    }
}
