//! The pinned conntrack table as userspace sees it: expired entries removed
//! ([`gc`], run periodically by the daemon) and live ones listed ([`dump`]).
//!
//! The kernel programs stamp entries with `bpf_ktime_get_ns`, which is
//! CLOCK_MONOTONIC: the same clock is read here to tell what has expired.
//! The LRU map also evicts on its own when full; `gc` frees the slots of
//! flows that ended, so live flows are not the ones evicted.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use aya::maps::{HashMap, Map, MapData, MapError};
use netd_common::{
    names,
    policy::{CtEntry, CtKey, DIR_INGRESS},
};
use serde::Serialize;

use super::PinDir;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(std::io::Error),
    #[error("reading the conntrack table: {0}")]
    Read(MapError),
    #[error("removing {removed} expired conntrack entries failed for {failed}: {first}")]
    Remove {
        removed: usize,
        failed: usize,
        first: MapError,
    },
}

/// What one [`gc`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GcStats {
    /// Entries still live after the pass.
    pub live: usize,
    /// Expired entries removed.
    pub removed: usize,
}

/// One conntrack entry, for `netd status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// Host byte order; the identifier for ICMP echo.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `"egress"` or `"ingress"`, relative to the local endpoint.
    pub dir: &'static str,
    /// Time left before the entry expires (zero once it has).
    pub expires_in_secs: u64,
    pub generation: u32,
    /// `CT_*` bits.
    pub state: u8,
}

impl Flow {
    fn new(key: &CtKey, entry: &CtEntry, now: u64) -> Self {
        Flow {
            saddr: Ipv4Addr::from(key.saddr),
            daddr: Ipv4Addr::from(key.daddr),
            sport: u16::from_be(key.sport),
            dport: u16::from_be(key.dport),
            proto: key.proto,
            dir: if key.dir == DIR_INGRESS {
                "ingress"
            } else {
                "egress"
            },
            expires_in_secs: Duration::from_nanos(entry.expires.saturating_sub(now)).as_secs(),
            generation: entry.generation,
            state: entry.state,
        }
    }
}

type Table = HashMap<MapData, CtKey, CtEntry>;

fn open(pin: &PinDir) -> Result<Table, ConntrackError> {
    let path = pin.map(names::CONNTRACK);
    let open_err = |source| ConntrackError::Open {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    Table::try_from(Map::from_map_data(data).map_err(open_err)?).map_err(open_err)
}

/// Now on the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> Result<u64, ConntrackError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(ConntrackError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Every entry, with the time it was read at.
fn entries(table: &Table) -> Result<(Vec<(CtKey, CtEntry)>, u64), ConntrackError> {
    let now = monotonic_ns()?;
    let entries = table
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(ConntrackError::Read)?;
    Ok((entries, now))
}

/// Removes the entries whose `expires` has passed. Keys are collected
/// before any is deleted, so the walk is not restarted by its own
/// deletions; one the kernel removed or evicted meanwhile counts as done.
pub fn gc(pin: &PinDir) -> Result<GcStats, ConntrackError> {
    let mut table = open(pin)?;
    let (entries, now) = entries(&table)?;
    let mut stats = GcStats::default();
    let mut failed = Vec::new();
    for (key, entry) in entries {
        if entry.expires > now {
            stats.live += 1;
            continue;
        }
        match table.remove(&key) {
            Ok(()) => stats.removed += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                stats.removed += 1
            }
            Err(e) => failed.push(e),
        }
    }
    let failures = failed.len();
    match failed.into_iter().next() {
        None => Ok(stats),
        Some(first) => Err(ConntrackError::Remove {
            removed: stats.removed,
            failed: failures,
            first,
        }),
    }
}

/// The live entries, sorted by address and port.
pub fn dump(pin: &PinDir) -> Result<Vec<Flow>, ConntrackError> {
    let table = open(pin)?;
    let (entries, now) = entries(&table)?;
    let mut flows: Vec<Flow> = entries
        .iter()
        .filter(|(_, entry)| entry.expires > now)
        .map(|(key, entry)| Flow::new(key, entry, now))
        .collect();
    flows.sort_by_key(|f| (f.saddr, f.daddr, f.proto, f.sport, f.dport, f.dir));
    Ok(flows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netd_common::policy::DIR_EGRESS;

    #[test]
    fn flow_in_host_order_and_time_left() {
        let key = CtKey {
            saddr: [10, 244, 1, 2],
            daddr: [10, 244, 2, 3],
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            proto: 6,
            dir: DIR_EGRESS,
            _pad: [0; 2],
        };
        let entry = CtEntry {
            expires: 70_000_000_000,
            generation: 3,
            state: 3,
            _pad: [0; 3],
        };
        let flow = Flow::new(&key, &entry, 10_000_000_000);
        assert_eq!(flow.sport, 40000);
        assert_eq!(flow.dport, 8080);
        assert_eq!(flow.dir, "egress");
        assert_eq!(flow.expires_in_secs, 60);
        assert_eq!(Flow::new(&key, &entry, 80_000_000_000).expires_in_secs, 0);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns().unwrap();
        let b = monotonic_ns().unwrap();
        assert!(a > 0 && b >= a);
    }
}
