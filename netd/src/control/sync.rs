//! Keeps the kernel's remote-subnet map equal to the other hosts' valid
//! leases in etcd. A full level-triggered resync (list every lease, compare
//! with what the kernel has, apply the difference) runs at start, after
//! the watch is compacted, cancelled or lost, when this host's own lease
//! changes, and every [`RESYNC_PERIOD`]. Between resyncs each watch event
//! is applied by itself through the [`LeaseCache`]: one value parsed, one
//! entry written, whatever the size of the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use netd_common::Peer;
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::control::lease_cache::{Connected, Own};
use crate::{
    control::config::NetworkConfig,
    control::lease_cache::{LeaseCache, Op, Rejections, Validator},
    control::registry::{RawLease, Registry, RegistryError, SubnetEvent},
    control::subnet::Listing,
    datapath::Maps,
    state::{EtcdHealth, NodeState},
};

/// How often the kernel maps are compared with a fresh list from etcd even
/// when the watch reports nothing wrong: a lost event or an entry changed
/// behind the daemon's back is repaired within this.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Etcd(#[from] RegistryError),
    #[error("watch {0}")]
    Watch(String),
    #[error("programming the kernel maps")]
    Kernel(#[source] anyhow::Error),
}

impl SyncError {
    /// Whether the error says etcd is away (not the kernel refusing).
    fn is_etcd(&self) -> bool {
        !matches!(self, SyncError::Kernel(_))
    }
}

/// The writes the sync task makes: the pinned maps, or a mirror in tests.
pub trait KernelMaps {
    fn insert_subnet(&mut self, subnet: Ipv4Net, peer: &Peer) -> anyhow::Result<()>;
    fn remove_subnet(&mut self, subnet: Ipv4Net) -> anyhow::Result<()>;
    fn insert_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()>;
    fn remove_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()>;

    /// Many subnets at once (a full resync): the kernel maps batch them.
    fn insert_subnets(&mut self, entries: &[(Ipv4Net, Peer)]) -> anyhow::Result<()> {
        entries
            .iter()
            .try_for_each(|(subnet, peer)| self.insert_subnet(*subnet, peer))
    }
    fn insert_peer_ips(&mut self, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
        ips.iter().try_for_each(|ip| self.insert_peer_ip(*ip))
    }
}

impl KernelMaps for Maps {
    fn insert_subnet(&mut self, subnet: Ipv4Net, peer: &Peer) -> anyhow::Result<()> {
        Maps::insert_subnet(self, subnet, peer)
    }
    fn remove_subnet(&mut self, subnet: Ipv4Net) -> anyhow::Result<()> {
        Maps::remove_subnet(self, subnet)
    }
    fn insert_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        Maps::insert_peer_ip(self, ip)
    }
    fn remove_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        Maps::remove_peer_ip(self, ip)
    }
    fn insert_subnets(&mut self, entries: &[(Ipv4Net, Peer)]) -> anyhow::Result<()> {
        Maps::insert_subnets(self, entries)
    }
    fn insert_peer_ips(&mut self, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
        Maps::insert_peer_ips(self, ips)
    }
}

/// What one reconciliation changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserted: usize,
    pub removed: usize,
}

/// What the kernel maps hold, read at a full resync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Programmed {
    pub subnets: BTreeMap<Ipv4Net, Peer>,
    pub ips: BTreeSet<Ipv4Addr>,
}

impl Programmed {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        Ok(Programmed {
            subnets: maps.subnets()?,
            ips: maps.peer_ips()?.into_iter().collect(),
        })
    }
}

/// Applies the difference between `desired` and what is programmed.
pub fn reconcile(
    maps: &mut impl KernelMaps,
    programmed: &mut Programmed,
    desired: &BTreeMap<Ipv4Net, Peer>,
) -> anyhow::Result<Changes> {
    let want_ips: BTreeSet<Ipv4Addr> = desired
        .values()
        .map(|p| Ipv4Addr::from(p.public_ip))
        .collect();
    let mut changes = Changes::default();

    // Accept a peer's VXLAN before sending it traffic; forget it last.
    let new_ips: Vec<Ipv4Addr> = want_ips.difference(&programmed.ips).copied().collect();
    maps.insert_peer_ips(&new_ips)?;
    programmed.ips.extend(new_ips);
    let upserts: Vec<(Ipv4Net, Peer)> = desired
        .iter()
        .filter(|(subnet, peer)| programmed.subnets.get(subnet) != Some(peer))
        .map(|(subnet, peer)| (*subnet, *peer))
        .collect();
    maps.insert_subnets(&upserts)?;
    changes.upserted = upserts.len();
    programmed.subnets.extend(upserts);
    let stale: Vec<Ipv4Net> = programmed
        .subnets
        .keys()
        .filter(|s| !desired.contains_key(s))
        .copied()
        .collect();
    for subnet in stale {
        maps.remove_subnet(subnet)?;
        programmed.subnets.remove(&subnet);
        changes.removed += 1;
    }
    let gone: Vec<Ipv4Addr> = programmed.ips.difference(&want_ips).copied().collect();
    for ip in gone {
        maps.remove_peer_ip(ip)?;
        programmed.ips.remove(&ip);
    }
    Ok(changes)
}

/// Applies the ops of one or more watch events, in order.
pub fn apply_ops(maps: &mut impl KernelMaps, ops: &[Op]) -> anyhow::Result<Changes> {
    let mut changes = Changes::default();
    for op in ops {
        match *op {
            Op::AddPeerIp(ip) => maps.insert_peer_ip(ip)?,
            Op::Upsert(subnet, peer) => {
                maps.insert_subnet(subnet, &peer)?;
                changes.upserted += 1;
            }
            Op::Remove(subnet) => {
                maps.remove_subnet(subnet)?;
                changes.removed += 1;
            }
            Op::RemovePeerIp(ip) => maps.remove_peer_ip(ip)?,
        }
    }
    Ok(changes)
}

/// Why [`follow`] returned without an error.
enum Stop {
    Shutdown,
    Resync(&'static str),
}

/// Watches etcd forever, resyncing in full after compaction, cancellation
/// or a lost connection, when this host's lease changes and periodically.
/// The kernel keeps the last programmed state while etcd is away, so the
/// data plane goes on forwarding; `state` tells `netd status` about it.
pub async fn run(
    mut registry: Registry,
    cfg: NetworkConfig,
    mut own: watch::Receiver<Own>,
    connected: Connected,
    mut maps: Maps,
    state: watch::Sender<NodeState>,
    first: Option<Synced>,
) {
    let mut rejections = Rejections::default();
    let mut start = None;
    if let Some(first) = first {
        rejections = first.rejections;
        start = Some((first.cache, first.revision));
    }
    loop {
        let check = Validator {
            cfg: cfg.clone(),
            own: *own.borrow_and_update(),
            connected: connected.clone(),
        };
        let result = follow(
            &mut registry,
            check,
            start.take(),
            &mut own,
            &mut maps,
            &mut rejections,
            &state,
        )
        .await;
        match result {
            Ok(Stop::Shutdown) => return,
            Ok(Stop::Resync(why)) => info!("full resync of the subnet map: {why}"),
            Err(e) => {
                let etcd = e.is_etcd();
                let e = anyhow::Error::from(e);
                warn!("subnet sync interrupted: {e:#}; resyncing");
                if etcd {
                    state.send_if_modified(|s| {
                        let was = s.etcd.reachable;
                        s.etcd.unreachable(&format!("{e:#}"));
                        was
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The first sync's result, handed to the sync task so that it follows
/// the watch from there instead of listing everything again.
pub struct Synced {
    cache: LeaseCache,
    revision: i64,
    rejections: Rejections,
}

/// One full reconciliation, for start-up before the watch begins, from
/// the listing the subnet acquisition read (this host's own lease, written
/// after it, comes with the watch).
pub async fn once(
    listing: Listing,
    cfg: &NetworkConfig,
    own: Own,
    connected: &Connected,
    maps: &mut Maps,
) -> anyhow::Result<Synced> {
    let check = Validator {
        cfg: cfg.clone(),
        own,
        connected: connected.clone(),
    };
    let mut rejections = Rejections::default();
    let cache = apply_listing(listing.leases, check, maps, &mut rejections, "start")?;
    Ok(Synced {
        cache,
        revision: listing.revision,
        rejections,
    })
}

/// Lists every lease, rebuilds the cache from them and applies the
/// difference with what the kernel holds; returns the cache and the
/// revision the list was read at.
async fn resync(
    registry: &mut Registry,
    check: Validator,
    maps: &mut Maps,
    rejections: &mut Rejections,
    why: &str,
) -> Result<(LeaseCache, i64), SyncError> {
    let started = Instant::now();
    let (list, revision) = registry.list_subnets().await?;
    info!(leases = list.len(), elapsed = ?started.elapsed(), "leases listed");
    let cache = apply_listing(list, check, maps, rejections, why).map_err(SyncError::Kernel)?;
    Ok((cache, revision))
}

/// Parses `list` into a cache and makes the kernel maps agree with it,
/// timing each phase.
fn apply_listing(
    list: Vec<RawLease>,
    check: Validator,
    maps: &mut Maps,
    rejections: &mut Rejections,
    why: &str,
) -> anyhow::Result<LeaseCache> {
    let started = Instant::now();
    let cache = LeaseCache::from_list(check, &list, rejections);
    drop(list);
    let parsed = started.elapsed();
    let mut programmed = Programmed::read(maps)?;
    let read = started.elapsed();
    let changes = reconcile(maps, &mut programmed, &cache.desired())?;
    info!(
        trigger = why,
        leases = cache.len(),
        parse = ?parsed,
        read_kernel = ?(read - parsed),
        write_kernel = ?(started.elapsed() - read),
        "full resync applied"
    );
    report(why, &cache, &changes);
    Ok(cache)
}

fn report(why: &str, cache: &LeaseCache, changes: &Changes) {
    crate::metrics::set_peers(cache.programmed());
    if *changes != Changes::default() {
        info!(
            trigger = why,
            peers = cache.programmed(),
            upserted = changes.upserted,
            removed = changes.removed,
            "kernel subnet map updated"
        );
    }
}

/// A full resync (unless `start` holds the one just made and its
/// revision, for the same lease of this host), then the watch from the
/// revision it read, applying each event by itself, until something calls
/// for another resync.
async fn follow(
    registry: &mut Registry,
    check: Validator,
    start: Option<(LeaseCache, i64)>,
    own: &mut watch::Receiver<Own>,
    maps: &mut Maps,
    rejections: &mut Rejections,
    state: &watch::Sender<NodeState>,
) -> Result<Stop, SyncError> {
    let (mut cache, revision) = match start {
        Some((cache, revision)) if cache.validator().own == check.own => (cache, revision),
        _ => resync(registry, check, maps, rejections, "resync").await?,
    };
    state.send_if_modified(|s| {
        let was = s.etcd.reachable;
        if !was {
            info!("etcd reachable again; resynced");
            s.etcd = EtcdHealth::reachable();
        }
        !was
    });
    let mut stream = registry.watch_subnets(revision + 1).await?;
    let next_resync = tokio::time::Instant::now() + RESYNC_PERIOD;
    let mut ops = Vec::new();
    loop {
        tokio::select! {
            message = stream.message() => {
                let received = std::time::Instant::now();
                let Some(resp) = message.map_err(|e| registry.err(e))? else {
                    return Err(SyncError::Watch("stream closed".into()));
                };
                if resp.compact_revision() > 0 {
                    return Ok(Stop::Resync("watch compacted"));
                }
                if resp.canceled() {
                    return Err(SyncError::Watch(format!("canceled: {}", resp.cancel_reason())));
                }
                ops.clear();
                for event in registry.events(&resp) {
                    match event {
                        SubnetEvent::Put(lease) => cache.put(&lease, rejections, &mut ops),
                        SubnetEvent::Delete(key) => cache.delete(&key, rejections, &mut ops),
                    }
                }
                let changes = apply_ops(maps, &ops).map_err(SyncError::Kernel)?;
                report("watch", &cache, &changes);
                crate::metrics::observe_sync_latency(received.elapsed());
            }
            changed = own.changed() => {
                // The daemon is shutting down: not an etcd problem.
                if changed.is_err() {
                    return Ok(Stop::Shutdown);
                }
                return Ok(Stop::Resync("this host's lease changed"));
            }
            () = tokio::time::sleep_until(next_resync) => {
                return Ok(Stop::Resync("periodic"));
            }
        }
    }
}
/// The kernel's SUBNETS for `leases`, as a full resync computes it.
#[cfg(test)]
fn desired<'a>(
    cfg: &NetworkConfig,
    own: Own,
    connected: &Connected,
    leases: impl IntoIterator<Item = &'a crate::control::registry::RawLease>,
    rejections: &mut Rejections,
) -> BTreeMap<Ipv4Net, Peer> {
    let check = Validator {
        cfg: cfg.clone(),
        own,
        connected: connected.clone(),
    };
    LeaseCache::from_list(check, leases, rejections).desired()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::registry::RawLease;

    fn lease(key: &str, value: &str) -> RawLease {
        RawLease {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        }
    }

    fn value(ip: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:6e:00:00:00:01"}}}}"#
        )
    }

    #[test]
    fn desired_keeps_valid_peers_only() {
        let cfg = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let own = Own {
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
        };
        let leases = [
            lease("10.244.1.0-24", &value("198.18.0.1")), // ours
            lease("10.244.2.0-24", &value("198.18.0.2")), // good
            lease("10.244.3.0-24", "{not json"),          // malformed
            lease("10.245.0.0-24", &value("198.18.0.4")), // outside
            lease("10.244.4.0-25", &value("198.18.0.5")), // wrong length
            lease("10.244.5.0-24", &value("198.18.0.1")), // our IP
            lease("bogus", &value("198.18.0.7")),         // bad key
            lease("10.244.0.0-24", &value("198.18.0.8")), // below SubnetMin
            lease("10.244.6.0-24", &value("198.18.0.6")), // good
        ];
        let mut rejections = Rejections::default();
        let want = desired(&cfg, own, &Connected::default(), &leases, &mut rejections);
        let subnets: Vec<String> = want.keys().map(|s| s.to_string()).collect();
        assert_eq!(subnets, ["10.244.2.0/24", "10.244.6.0/24"]);
        assert_eq!(
            want[&"10.244.2.0/24".parse().unwrap()].public_ip,
            [198, 18, 0, 2]
        );
        assert_eq!(rejections.len(), 6);
    }
}

#[cfg(test)]
mod direct {
    use super::*;
    use crate::control::registry::RawLease;
    use netd_common::PeerMode;

    fn lease(key: &str, json: &str) -> RawLease {
        RawLease {
            key: key.into(),
            value: json.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        }
    }

    fn own() -> Own {
        Own {
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
        }
    }

    fn modes(cfg: &str, leases: &[RawLease]) -> (Vec<(String, u8)>, usize) {
        let cfg = NetworkConfig::parse(cfg.as_bytes()).unwrap();
        let connected = Connected(vec!["198.18.0.0/24".parse().unwrap()]);
        let mut rejections = Rejections::default();
        let want = desired(&cfg, own(), &connected, leases, &mut rejections);
        (
            want.iter().map(|(s, p)| (s.to_string(), p.mode)).collect(),
            rejections.len(),
        )
    }

    const VTEP: &str = r#""BackendData":{"VNI":1,"VtepMAC":"0e:6e:00:00:00:01"}"#;

    #[test]
    fn vxlan_direct_routing_picks_per_peer() {
        let near = lease(
            "10.244.2.0-24",
            &format!(r#"{{"PublicIP":"198.18.0.2","BackendType":"vxlan",{VTEP}}}"#),
        );
        let far = lease(
            "10.244.3.0-24",
            &format!(r#"{{"PublicIP":"198.19.5.3","BackendType":"vxlan",{VTEP}}}"#),
        );
        let leases = [near, far];
        let direct =
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
        let (got, rejected) = modes(direct, &leases);
        let want = [
            ("10.244.2.0/24".to_string(), PeerMode::Direct as u8),
            ("10.244.3.0/24".to_string(), PeerMode::Vxlan as u8),
        ];
        assert_eq!(got, want);
        assert_eq!(rejected, 0);
        let (got, _) = modes(r#"{"Network":"10.244.0.0/16"}"#, &leases);
        assert!(got.iter().all(|(_, m)| *m == PeerMode::Vxlan as u8));
    }

    #[test]
    fn host_gw_rejects_peers_behind_a_router() {
        let leases = [
            lease(
                "10.244.2.0-24",
                r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#,
            ),
            lease(
                "10.244.3.0-24",
                r#"{"PublicIP":"198.19.5.3","BackendType":"host-gw"}"#,
            ),
            lease(
                "10.244.4.0-24",
                &format!(r#"{{"PublicIP":"198.18.0.4","BackendType":"vxlan",{VTEP}}}"#),
            ),
        ];
        let (got, rejected) = modes(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
            &leases,
        );
        assert_eq!(got, [("10.244.2.0/24".to_string(), PeerMode::Direct as u8)]);
        assert_eq!(rejected, 2, "the routed peer and the vxlan lease");
    }
}

#[cfg(test)]
mod overlap {
    use super::*;
    use crate::control::lease_cache::overlapping;

    #[test]
    fn finds_containing_and_contained_neighbours() {
        let set: BTreeMap<Ipv4Net, ()> = ["10.0.0.0/24", "10.0.2.0/23", "10.1.0.0/16"]
            .iter()
            .map(|s| (s.parse().unwrap(), ()))
            .collect();
        let hit = |s: &str| overlapping(&set, &s.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(hit("10.0.0.128/25").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(hit("10.0.3.0/24").as_deref(), Some("10.0.2.0/23"));
        assert_eq!(hit("10.0.0.0/22").as_deref(), Some("10.0.0.0/24"));
        assert_eq!(hit("10.1.200.0/24").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(hit("10.0.1.0/24"), None);
        assert_eq!(hit("10.2.0.0/24"), None);
    }
}

/// The incremental apply against a full resync: after any sequence of
/// puts, deletes and resyncs, the kernel holds what a full resync of the
/// same etcd state computes, and what an independent scan of the leases in
/// key order (the reference) says it should.
#[cfg(test)]
mod incremental {
    use super::*;
    use crate::control::{lease_cache::overlapping, registry::RawLease};
    use proptest::prelude::*;

    /// The kernel maps as plain data, refusing what the kernel would
    /// refuse and what the data path must never see.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    struct Mirror {
        subnets: BTreeMap<Ipv4Net, Peer>,
        ips: BTreeSet<Ipv4Addr>,
    }

    impl KernelMaps for Mirror {
        fn insert_subnet(&mut self, subnet: Ipv4Net, peer: &Peer) -> anyhow::Result<()> {
            let ip = Ipv4Addr::from(peer.public_ip);
            anyhow::ensure!(self.ips.contains(&ip), "{subnet} before its peer {ip}");
            self.subnets.insert(subnet, *peer);
            Ok(())
        }
        fn remove_subnet(&mut self, subnet: Ipv4Net) -> anyhow::Result<()> {
            self.subnets
                .remove(&subnet)
                .map(drop)
                .ok_or_else(|| anyhow::anyhow!("no entry {subnet}"))
        }
        fn insert_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
            self.ips.insert(ip);
            Ok(())
        }
        fn remove_peer_ip(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
            let used = self.subnets.values().any(|p| p.public_ip == ip.octets());
            anyhow::ensure!(!used, "peer {ip} removed while a subnet uses it");
            anyhow::ensure!(self.ips.remove(&ip), "no peer {ip}");
            Ok(())
        }
    }

    impl Mirror {
        fn programmed(&self) -> Programmed {
            Programmed {
                subnets: self.subnets.clone(),
                ips: self.ips.clone(),
            }
        }
    }

    const KEYS: &[&str] = &[
        "10.244.2.0-24",
        "10.244.2.0-024", // the same subnet as the first: overlaps it
        "10.244.3.0-24",
        "10.244.4.0-24",
        "10.244.5.0-24",
        "10.244.1.0-24", // this host's
        "10.244.6.0-25", // wrong length
        "10.245.0.0-24", // outside the network
        "10.244.7.1-24", // host bits
        "bogus",
    ];

    fn vxlan(ip: &str, mac: u8) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:6e:00:00:00:{mac:02x}"}}}}"#
        )
    }

    fn values() -> Vec<String> {
        vec![
            vxlan("198.18.0.2", 2),
            vxlan("198.18.0.2", 9), // same host, new VTEP MAC
            vxlan("198.18.0.3", 3),
            vxlan("198.18.0.4", 4),
            vxlan("198.19.5.5", 5), // behind a router
            vxlan("198.18.0.1", 1), // this host's IP
            "{not json".into(),
            r#"{"PublicIP":"198.18.0.6","BackendType":"host-gw"}"#.into(),
            r#"{"PublicIP":"198.18.0.7","BackendType":"vxlan"}"#.into(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put(usize, usize),
        Delete(usize),
        Resync,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..KEYS.len(), 0..9usize).prop_map(|(k, v)| Step::Put(k, v)),
            3 => (0..KEYS.len()).prop_map(Step::Delete),
            1 => Just(Step::Resync),
        ]
    }

    fn check(direct_routing: bool) -> Validator {
        let cfg = if direct_routing {
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#
        } else {
            r#"{"Network":"10.244.0.0/16"}"#
        };
        Validator {
            cfg: NetworkConfig::parse(cfg.as_bytes()).unwrap(),
            own: Own {
                subnet: "10.244.1.0/24".parse().unwrap(),
                public_ip: "198.18.0.1".parse().unwrap(),
            },
            connected: Connected(vec!["198.18.0.0/24".parse().unwrap()]),
        }
    }

    /// The reference: every lease in key order, the first of overlapping
    /// ones kept, as the resync computed it before the cache existed.
    fn reference(check: &Validator, etcd: &BTreeMap<String, RawLease>) -> Mirror {
        let mut out = Mirror::default();
        for lease in etcd.values() {
            if let Ok(Some((subnet, peer))) = check.peer_of(lease)
                && !out.subnets.contains_key(&subnet)
                && overlapping(&out.subnets, &subnet).is_none()
            {
                out.subnets.insert(subnet, peer);
            }
        }
        out.ips = out
            .subnets
            .values()
            .map(|p| Ipv4Addr::from(p.public_ip))
            .collect();
        out
    }

    fn full_resync(
        check: &Validator,
        etcd: &BTreeMap<String, RawLease>,
        kernel: &mut Mirror,
        rejections: &mut Rejections,
    ) -> (LeaseCache, Changes) {
        let cache = LeaseCache::from_list(check.clone(), etcd.values(), rejections);
        let changes = reconcile(kernel, &mut kernel.programmed(), &cache.desired()).unwrap();
        (cache, changes)
    }

    fn run_steps(steps: &[Step], direct_routing: bool) -> Result<(), TestCaseError> {
        let check = check(direct_routing);
        let values = values();
        let mut etcd: BTreeMap<String, RawLease> = BTreeMap::new();
        let mut kernel = Mirror::default();
        let mut rejections = Rejections::default();
        let mut cache = LeaseCache::new(check.clone());
        let mut ops = Vec::new();
        for (revision, step) in (1..).zip(steps) {
            ops.clear();
            match *step {
                Step::Put(k, v) => {
                    let lease = RawLease {
                        key: KEYS[k].into(),
                        value: values[v].clone().into_bytes(),
                        mod_revision: revision,
                        lease: 0,
                    };
                    cache.put(&lease, &mut rejections, &mut ops);
                    etcd.insert(lease.key.clone(), lease);
                }
                Step::Delete(k) => {
                    cache.delete(KEYS[k], &mut rejections, &mut ops);
                    etcd.remove(KEYS[k]);
                }
                Step::Resync => {
                    (cache, _) = full_resync(&check, &etcd, &mut kernel, &mut rejections);
                }
            }
            apply_ops(&mut kernel, &ops).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;

            let want = reference(&check, &etcd);
            prop_assert_eq!(&kernel, &want, "after {:?}", step);
            prop_assert_eq!(cache.programmed(), want.subnets.len());
            // A full resync from the same etcd state finds nothing to do.
            let mut again = kernel.clone();
            let (_, changes) = full_resync(&check, &etcd, &mut again, &mut Rejections::default());
            prop_assert_eq!(changes, Changes::default());
            prop_assert_eq!(&again, &kernel);
            // Only leases still in etcd are remembered as rejected.
            prop_assert!(
                KEYS.iter()
                    .all(|k| !rejections.contains(k) || etcd.contains_key(*k))
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn incremental_apply_equals_a_full_resync(
            steps in prop::collection::vec(step(), 1..80),
            direct_routing in any::<bool>(),
        ) {
            run_steps(&steps, direct_routing)?;
        }
    }

    /// Puts `key` at a new revision (a repeated revision is a no-op).
    fn put(cache: &mut LeaseCache, rejections: &mut Rejections, key: &str, value: &str) -> Vec<Op> {
        static REVISION: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
        let mut ops = Vec::new();
        let lease = RawLease {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: REVISION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            lease: 0,
        };
        cache.put(&lease, rejections, &mut ops);
        ops
    }

    #[test]
    fn a_put_or_delete_touches_one_entry() {
        let mut rejections = Rejections::default();
        let mut cache = LeaseCache::new(check(false));
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let ops = put(
            &mut cache,
            &mut rejections,
            "10.244.2.0-24",
            &vxlan("198.18.0.2", 2),
        );
        assert!(
            matches!(ops[..], [Op::AddPeerIp(a), Op::Upsert(s, _)] if a == ip("198.18.0.2") && s == net("10.244.2.0/24"))
        );
        // A second subnet of the same host shares its PEERS entry.
        let ops = put(
            &mut cache,
            &mut rejections,
            "10.244.3.0-24",
            &vxlan("198.18.0.2", 2),
        );
        assert!(matches!(ops[..], [Op::Upsert(s, _)] if s == net("10.244.3.0/24")));
        let mut ops = Vec::new();
        cache.delete("10.244.2.0-24", &mut rejections, &mut ops);
        assert_eq!(ops, [Op::Remove(net("10.244.2.0/24"))]);
        ops.clear();
        cache.delete("10.244.3.0-24", &mut rejections, &mut ops);
        assert_eq!(
            ops,
            [
                Op::Remove(net("10.244.3.0/24")),
                Op::RemovePeerIp(ip("198.18.0.2"))
            ]
        );
        // Deleting what is not there changes nothing.
        ops.clear();
        cache.delete("10.244.3.0-24", &mut rejections, &mut ops);
        assert!(ops.is_empty());
    }

    #[test]
    fn rejected_leases_are_forgotten_when_deleted_or_replaced() {
        let mut rejections = Rejections::default();
        let mut cache = LeaseCache::new(check(false));
        put(&mut cache, &mut rejections, "10.244.2.0-24", "{not json");
        put(&mut cache, &mut rejections, "10.244.3.0-24", "{not json");
        assert_eq!(rejections.len(), 2);
        put(
            &mut cache,
            &mut rejections,
            "10.244.2.0-24",
            &vxlan("198.18.0.2", 2),
        );
        assert!(!rejections.contains("10.244.2.0-24"));
        cache.delete("10.244.3.0-24", &mut rejections, &mut Vec::new());
        assert!(rejections.is_empty());
        // The loser of an overlap is remembered until it wins.
        put(
            &mut cache,
            &mut rejections,
            "10.244.2.0-024",
            &vxlan("198.18.0.3", 3),
        );
        assert!(rejections.contains("10.244.2.0-24"), "the lower key wins");
        cache.delete("10.244.2.0-024", &mut rejections, &mut Vec::new());
        assert!(rejections.is_empty());
        assert_eq!(cache.desired().len(), 1);
    }

    #[test]
    fn remembered_rejections_are_capped() {
        use crate::control::lease_cache::MAX_REMEMBERED_REJECTIONS;
        let mut rejections = Rejections::default();
        let mut cache = LeaseCache::new(check(false));
        for i in 0..MAX_REMEMBERED_REJECTIONS + 100 {
            let key = format!("10.244.{}.{}-32", i / 256, i % 256);
            put(&mut cache, &mut rejections, &key, "{not json");
        }
        assert_eq!(rejections.len(), MAX_REMEMBERED_REJECTIONS);
    }
}
