//! Keeps the kernel's remote-subnet map equal to the other hosts' valid
//! leases in etcd. Level-triggered: every change recomputes the desired
//! state from the full lease table and applies the difference, and the same
//! code runs at start, after each watch event and after every resync.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Result;
use ipnet::Ipv4Net;
use netd_common::{Peer, PeerMode};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::config::{HOST_GW, NetworkConfig},
    control::lease::{LeaseValue, parse_subnet_key},
    control::registry::{RawLease, Registry, SubnetEvent},
    datapath::Maps,
    state::{EtcdHealth, NodeState},
};

/// This host's own lease, which is never programmed as a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
}

/// Logs each rejected lease once per revision, not on every recompute.
#[derive(Default)]
pub struct Rejections {
    seen: HashSet<(String, i64)>,
}

impl Rejections {
    fn reject(&mut self, lease: &RawLease, why: &str) {
        if self.seen.insert((lease.key.clone(), lease.mod_revision)) {
            warn!(key = %lease.key, revision = lease.mod_revision, "ignoring lease: {why}");
        }
    }
}

/// Subnets directly connected to the underlay NIC: peers inside them can
/// be reached without encapsulation.
#[derive(Debug, Clone, Default)]
pub struct Connected(pub Vec<Ipv4Net>);

impl Connected {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The remote subnets the kernel should know, from every lease in etcd.
pub fn desired<'a>(
    cfg: &NetworkConfig,
    own: Own,
    connected: &Connected,
    leases: impl IntoIterator<Item = &'a RawLease>,
    rejections: &mut Rejections,
) -> BTreeMap<Ipv4Net, Peer> {
    let mut out = BTreeMap::new();
    for lease in leases {
        match peer_of(cfg, own, connected, lease) {
            Ok(Some((subnet, peer))) => {
                if let Some(taken) = overlapping(&out, &subnet) {
                    rejections.reject(lease, &format!("overlaps {taken}"));
                    continue;
                }
                out.insert(subnet, peer);
            }
            Ok(None) => {}
            Err(why) => rejections.reject(lease, &why),
        }
    }
    out
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A subnet of `set` (which holds no overlaps) that overlaps `subnet`: only
/// its neighbours in address order can, so this is two lookups, not a scan.
fn overlapping<V>(set: &BTreeMap<Ipv4Net, V>, subnet: &Ipv4Net) -> Option<Ipv4Net> {
    let before = set.range(..=*subnet).next_back();
    let after = set.range(*subnet..).next();
    [before, after]
        .into_iter()
        .flatten()
        .map(|(s, _)| *s)
        .find(|s| overlaps(s, subnet))
}

/// One lease as a kernel entry; `None` for our own.
fn peer_of(
    cfg: &NetworkConfig,
    own: Own,
    connected: &Connected,
    lease: &RawLease,
) -> Result<Option<(Ipv4Net, Peer)>, String> {
    let subnet = parse_subnet_key(&lease.key).map_err(|e| e.to_string())?;
    if subnet == own.subnet {
        return Ok(None);
    }
    if !cfg.is_leasable(&subnet) {
        return Err(format!(
            "{subnet} is not a /{} subnet within {} (SubnetMin..SubnetMax)",
            cfg.subnet_len, cfg.network
        ));
    }
    if overlaps(&subnet, &own.subnet) {
        return Err(format!("overlaps this host's {}", own.subnet));
    }
    let (value, mac) = LeaseValue::parse(&lease.value).map_err(|e| e.to_string())?;
    value
        .expect_backend(&cfg.backend.kind)
        .map_err(|e| e.to_string())?;
    if value.public_ip == own.public_ip {
        return Err(format!("claims this host's public IP {}", own.public_ip));
    }
    let direct = connected.contains(value.public_ip);
    let mode = if cfg.backend.kind == HOST_GW {
        if !direct {
            return Err(format!(
                "host-gw peer {} is not on a directly connected subnet: it cannot be reached without encapsulation",
                value.public_ip
            ));
        }
        PeerMode::Direct
    } else if cfg.backend.direct_routing && direct {
        PeerMode::Direct
    } else {
        PeerMode::Vxlan
    };
    let peer = Peer {
        public_ip: value.public_ip.octets(),
        vtep_mac: mac.map_or([0; 6], |m| m.0),
        mode: mode as u8,
        _pad: 0,
    };
    Ok(Some((subnet, peer)))
}

/// What one reconciliation changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserted: usize,
    pub removed: usize,
}

/// What this task last wrote to the kernel maps: read from the kernel at
/// every resync, so each change costs syscalls only for what differs.
#[derive(Debug, Default)]
pub struct Programmed {
    subnets: BTreeMap<Ipv4Net, Peer>,
    ips: BTreeSet<Ipv4Addr>,
}

impl Programmed {
    pub fn read(maps: &Maps) -> Result<Self> {
        Ok(Programmed {
            subnets: maps.subnets()?,
            ips: maps.peer_ips()?.into_iter().collect(),
        })
    }
}

/// Applies the difference between `desired` and what is programmed.
pub fn reconcile(
    maps: &mut Maps,
    programmed: &mut Programmed,
    desired: &BTreeMap<Ipv4Net, Peer>,
) -> Result<Changes> {
    let want_ips: BTreeSet<Ipv4Addr> = desired
        .values()
        .map(|p| Ipv4Addr::from(p.public_ip))
        .collect();
    let mut changes = Changes::default();

    // Accept a peer's VXLAN before sending it traffic; forget it last.
    for ip in want_ips.difference(&programmed.ips) {
        maps.insert_peer_ip(*ip)?;
    }
    programmed.ips.extend(want_ips.iter().copied());
    for (subnet, peer) in desired {
        if programmed.subnets.get(subnet) != Some(peer) {
            maps.insert_subnet(*subnet, peer)?;
            programmed.subnets.insert(*subnet, *peer);
            changes.upserted += 1;
        }
    }
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

/// Watches etcd forever, resyncing in full after compaction, cancellation
/// or a lost connection.
/// The kernel keeps the last programmed state while etcd is away, so the
/// data plane goes on forwarding; `state` tells `netd status` about it.
pub async fn run(
    mut registry: Registry,
    cfg: NetworkConfig,
    mut own: watch::Receiver<Own>,
    connected: Connected,
    mut maps: Maps,
    state: watch::Sender<NodeState>,
) {
    let mut rejections = Rejections::default();
    let view = View {
        cfg: &cfg,
        connected: &connected,
    };
    loop {
        let result = sync_once(
            &mut registry,
            view,
            &mut own,
            &mut maps,
            &mut rejections,
            &state,
        )
        .await;
        if let Ok(()) = result {
            return;
        }
        if let Err(e) = result {
            warn!("subnet sync interrupted: {e:#}; resyncing");
            state.send_if_modified(|s| {
                let was = s.etcd.reachable;
                s.etcd.unreachable(&format!("{e:#}"));
                was
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// One full reconciliation, for start-up before the watch begins.
pub async fn once(
    registry: &mut Registry,
    cfg: &NetworkConfig,
    own: Own,
    connected: &Connected,
    maps: &mut Maps,
) -> Result<()> {
    let (list, _) = registry.list_subnets().await?;
    let want = desired(cfg, own, connected, &list, &mut Rejections::default());
    reconcile(maps, &mut Programmed::read(maps)?, &want)?;
    Ok(())
}

/// What lease validation needs besides the leases themselves.
#[derive(Clone, Copy)]
struct View<'a> {
    cfg: &'a NetworkConfig,
    connected: &'a Connected,
}

async fn sync_once(
    registry: &mut Registry,
    view: View<'_>,
    own: &mut watch::Receiver<Own>,
    maps: &mut Maps,
    rejections: &mut Rejections,
    state: &watch::Sender<NodeState>,
) -> Result<()> {
    let (list, revision) = registry.list_subnets().await?;
    state.send_if_modified(|s| {
        let was = s.etcd.reachable;
        if !was {
            info!("etcd reachable again; resynced");
            s.etcd = EtcdHealth::reachable();
        }
        !was
    });
    let mut leases: BTreeMap<String, RawLease> =
        list.into_iter().map(|l| (l.key.clone(), l)).collect();
    let mut programmed = Programmed::read(maps)?;
    apply(
        view,
        *own.borrow(),
        &leases,
        maps,
        &mut programmed,
        rejections,
        "resync",
    )?;

    let mut stream = registry.watch_subnets(revision + 1).await?;
    loop {
        tokio::select! {
            message = stream.message() => {
                let received = std::time::Instant::now();
                let Some(resp) = message? else {
                    anyhow::bail!("watch stream closed");
                };
                if resp.compact_revision() > 0 {
                    anyhow::bail!("watch compacted at revision {}", resp.compact_revision());
                }
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
                for event in registry.events(&resp) {
                    match event {
                        SubnetEvent::Put(lease) => { leases.insert(lease.key.clone(), lease); }
                        SubnetEvent::Delete(key) => { leases.remove(&key); }
                    }
                }
                apply(view, *own.borrow(), &leases, maps, &mut programmed, rejections, "watch")?;
                crate::metrics::observe_sync_latency(received.elapsed());
            }
            changed = own.changed() => {
                // The daemon is shutting down: not an etcd problem.
                if changed.is_err() {
                    return Ok(());
                }
                apply(view, *own.borrow(), &leases, maps, &mut programmed, rejections, "own lease")?;
            }
        }
    }
}

fn apply(
    view: View<'_>,
    own: Own,
    leases: &BTreeMap<String, RawLease>,
    maps: &mut Maps,
    programmed: &mut Programmed,
    rejections: &mut Rejections,
    why: &str,
) -> Result<()> {
    let want = desired(view.cfg, own, view.connected, leases.values(), rejections);
    let changes = reconcile(maps, programmed, &want)?;
    crate::metrics::set_peers(programmed.subnets.len());
    if changes != Changes::default() {
        info!(
            trigger = why,
            peers = want.len(),
            upserted = changes.upserted,
            removed = changes.removed,
            "kernel subnet map updated"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, value: &str) -> RawLease {
        RawLease {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
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
        assert_eq!(rejections.seen.len(), 6);
    }
}

#[cfg(test)]
mod direct {
    use super::*;

    fn lease(key: &str, json: &str) -> RawLease {
        RawLease {
            key: key.into(),
            value: json.as_bytes().to_vec(),
            mod_revision: 1,
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
            rejections.seen.len(),
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
