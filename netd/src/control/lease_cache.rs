//! The other hosts' leases as last seen in etcd, each parsed once, and the
//! kernel entries they call for. A put parses one value and changes at
//! most one SUBNETS entry and one or two PEERS entries; a delete likewise:
//! the work of a watch event does not grow with the cluster. Plain data,
//! no I/O: the sync task applies the [`Op`]s it returns.
//!
//! Every leasable subnet has the network's subnet length, so two leases
//! overlap only when two keys name the same subnet (`10.244.2.0-24` and
//! `10.244.2.0-024`). The lowest key wins, as a scan of the leases in key
//! order would have it, whatever order the events came in; when it goes,
//! the next one takes its place.

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use netd_common::{Peer, PeerMode};
use tracing::warn;

use crate::control::{
    config::{HOST_GW, NetworkConfig},
    lease::{LeaseError, LeaseValue, parse_subnet_key},
    registry::RawLease,
};

/// This host's own lease, which is never programmed as a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
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

/// Why a lease is not programmed.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("{subnet} is not a /{len} subnet within {network} (SubnetMin..SubnetMax)")]
    OutsideNetwork {
        subnet: Ipv4Net,
        len: u8,
        network: Ipv4Net,
    },
    #[error("overlaps this host's {0}")]
    OverlapsOwn(Ipv4Net),
    #[error("claims this host's public IP {0}")]
    ClaimsOwnIp(Ipv4Addr),
    #[error(
        "host-gw peer {0} is not on a directly connected subnet: it cannot be reached without encapsulation"
    )]
    HostGwNotDirect(Ipv4Addr),
    #[error("overlaps {subnet}, held by the lease {holder:?}")]
    Overlaps { subnet: Ipv4Net, holder: String },
}

/// What a lease is checked against: the network, this host, the underlay.
#[derive(Debug, Clone)]
pub struct Validator {
    pub cfg: NetworkConfig,
    pub own: Own,
    pub connected: Connected,
}

impl Validator {
    /// One lease as a kernel entry; `None` for our own. Looks at this lease
    /// only: overlaps with other leases are the cache's business.
    pub fn peer_of(&self, lease: &RawLease) -> Result<Option<(Ipv4Net, Peer)>, Rejection> {
        let (cfg, own) = (&self.cfg, self.own);
        let subnet = parse_subnet_key(&lease.key)?;
        if subnet == own.subnet {
            return Ok(None);
        }
        if !cfg.is_leasable(&subnet) {
            return Err(Rejection::OutsideNetwork {
                subnet,
                len: cfg.subnet_len,
                network: cfg.network,
            });
        }
        if overlaps(&subnet, &own.subnet) {
            return Err(Rejection::OverlapsOwn(own.subnet));
        }
        let (value, mac) = LeaseValue::parse(&lease.value)?;
        value.expect_backend(&cfg.backend.kind)?;
        if value.public_ip == own.public_ip {
            return Err(Rejection::ClaimsOwnIp(own.public_ip));
        }
        let direct = self.connected.contains(value.public_ip);
        let mode = if cfg.backend.kind == HOST_GW {
            if !direct {
                return Err(Rejection::HostGwNotDirect(value.public_ip));
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
}

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A key of `set` (which holds no overlaps) other than `subnet` that
/// overlaps it: only its neighbours in address order can, so this is two
/// lookups, not a scan.
pub fn overlapping<V>(set: &BTreeMap<Ipv4Net, V>, subnet: &Ipv4Net) -> Option<Ipv4Net> {
    let before = set.range(..*subnet).next_back();
    let after = set.range(*subnet..).find(|(s, _)| *s != subnet);
    [before, after]
        .into_iter()
        .flatten()
        .map(|(s, _)| *s)
        .find(|s| overlaps(s, subnet))
}

/// Most rejected leases remembered: past that, a rejected lease is still
/// logged but not remembered, so a full resync logs it again.
pub const MAX_REMEMBERED_REJECTIONS: usize = 4096;

/// The rejected leases already logged, by key with the revision logged:
/// one line per lease and revision. An entry goes when its key is deleted,
/// replaced by a valid lease, or missing from a full resync.
#[derive(Debug, Default)]
pub struct Rejections {
    seen: HashMap<String, i64>,
}

impl Rejections {
    pub fn reject(&mut self, key: &str, revision: i64, why: &Rejection) {
        if self.seen.get(key) == Some(&revision) {
            return;
        }
        warn!(key = %key, revision, "ignoring lease: {why}");
        if self.seen.len() < MAX_REMEMBERED_REJECTIONS || self.seen.contains_key(key) {
            self.seen.insert(key.to_owned(), revision);
        }
    }

    pub fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }

    /// Keeps only the keys `keep` says still exist.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.seen.contains_key(key)
    }
}

/// One change to the kernel maps, in the order the ops come: a peer's
/// VXLAN is accepted before traffic is sent to it and forgotten last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AddPeerIp(Ipv4Addr),
    Upsert(Ipv4Net, Peer),
    Remove(Ipv4Net),
    RemovePeerIp(Ipv4Addr),
}

/// What a lease key last said.
#[derive(Debug)]
enum Outcome {
    /// A valid peer lease; programmed if it wins its subnet.
    Peer(Ipv4Net, Peer),
    /// This host's own.
    Own,
    Rejected,
}

#[derive(Debug)]
struct Cached {
    revision: i64,
    outcome: Outcome,
}

/// The parsed leases and the kernel state they call for.
#[derive(Debug)]
pub struct LeaseCache {
    check: Validator,
    leases: HashMap<String, Cached>,
    /// Keys of the valid leases of each subnet, sorted: the first wins.
    claims: BTreeMap<Ipv4Net, Vec<String>>,
    /// Programmed subnets per public IP: a host may hold several.
    peer_refs: HashMap<Ipv4Addr, u32>,
}

impl LeaseCache {
    pub fn new(check: Validator) -> Self {
        LeaseCache {
            check,
            leases: HashMap::new(),
            claims: BTreeMap::new(),
            peer_refs: HashMap::new(),
        }
    }

    /// A cache of every lease in `list`, as a full resync builds it.
    pub fn from_list<'a>(
        check: Validator,
        list: impl IntoIterator<Item = &'a RawLease>,
        rejections: &mut Rejections,
    ) -> Self {
        let list = list.into_iter();
        let mut cache = LeaseCache::new(check);
        // Sized once: growing a map of 100,000 leases rehashes it ~17 times.
        cache.leases.reserve(list.size_hint().0);
        cache.peer_refs.reserve(list.size_hint().0);
        let mut scratch = Vec::new();
        for lease in list {
            cache.put(lease, rejections, &mut scratch);
            scratch.clear();
        }
        rejections.retain(|k| cache.leases.contains_key(k));
        cache
    }

    pub fn validator(&self) -> &Validator {
        &self.check
    }

    /// Leases known, valid or not.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Subnets the kernel should hold.
    pub fn programmed(&self) -> usize {
        self.claims.len()
    }

    /// A put of `lease` seen by the watch: the kernel changes it calls for
    /// are appended to `ops`.
    pub fn put(&mut self, lease: &RawLease, rejections: &mut Rejections, ops: &mut Vec<Op>) {
        let revision = lease.mod_revision;
        if let Some(c) = self.leases.get(&lease.key)
            && c.revision == revision
        {
            return;
        }
        let subnet = parse_subnet_key(&lease.key).ok();
        let before = subnet.and_then(|s| self.winner(&s).map(|(_, p)| p));
        self.unclaim(&lease.key);
        let outcome = match self.check.peer_of(lease) {
            Ok(None) => {
                rejections.forget(&lease.key);
                Outcome::Own
            }
            Ok(Some((subnet, peer))) => match self.claim(subnet, &lease.key) {
                Ok(()) => Outcome::Peer(subnet, peer),
                Err(why) => {
                    rejections.reject(&lease.key, revision, &why);
                    Outcome::Rejected
                }
            },
            Err(why) => {
                rejections.reject(&lease.key, revision, &why);
                Outcome::Rejected
            }
        };
        self.leases
            .insert(lease.key.clone(), Cached { revision, outcome });
        if let Some(subnet) = subnet {
            self.settle(subnet, before, rejections, ops);
        }
    }

    /// A delete of `key` seen by the watch.
    pub fn delete(&mut self, key: &str, rejections: &mut Rejections, ops: &mut Vec<Op>) {
        rejections.forget(key);
        let Some(subnet) = self.claimed(key) else {
            self.leases.remove(key);
            return;
        };
        let before = self.winner(&subnet).map(|(_, p)| p);
        self.unclaim(key);
        self.leases.remove(key);
        self.settle(subnet, before, rejections, ops);
    }

    /// The kernel's SUBNETS as they should be.
    pub fn desired(&self) -> BTreeMap<Ipv4Net, Peer> {
        self.claims
            .keys()
            .filter_map(|s| Some((*s, self.winner(s)?.1)))
            .collect()
    }

    /// The subnet `key` claims, if it is a valid peer lease.
    fn claimed(&self, key: &str) -> Option<Ipv4Net> {
        match self.leases.get(key)?.outcome {
            Outcome::Peer(subnet, _) => Some(subnet),
            _ => None,
        }
    }

    /// The lease that holds `subnet` and its entry.
    fn winner(&self, subnet: &Ipv4Net) -> Option<(&str, Peer)> {
        let key = self.claims.get(subnet)?.first()?;
        match self.leases.get(key)?.outcome {
            Outcome::Peer(_, peer) => Some((key, peer)),
            _ => None,
        }
    }

    /// Adds `key` to the claimants of `subnet`, unless `subnet` overlaps
    /// another claimed subnet (it cannot while every leasable subnet has
    /// the same length: kept so the LPM trie never gets nested entries).
    fn claim(&mut self, subnet: Ipv4Net, key: &str) -> Result<(), Rejection> {
        if !self.claims.contains_key(&subnet)
            && let Some(other) = overlapping(&self.claims, &subnet)
        {
            let holder = self.claims[&other].first().cloned().unwrap_or_default();
            return Err(Rejection::Overlaps {
                subnet: other,
                holder,
            });
        }
        let keys = self.claims.entry(subnet).or_default();
        if let Err(at) = keys.binary_search_by(|k| k.as_str().cmp(key)) {
            keys.insert(at, key.to_owned());
        }
        Ok(())
    }

    fn unclaim(&mut self, key: &str) {
        let Some(subnet) = self.claimed(key) else {
            return;
        };
        if let Some(keys) = self.claims.get_mut(&subnet) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.claims.remove(&subnet);
            }
        }
    }

    /// The ops that take the kernel from `before` (the entry of `subnet`
    /// before a change) to its holder's now; logs the leases that lost it.
    fn settle(
        &mut self,
        subnet: Ipv4Net,
        before: Option<Peer>,
        rejections: &mut Rejections,
        ops: &mut Vec<Op>,
    ) {
        let after = self.winner(&subnet);
        if let Some((holder, _)) = after {
            rejections.forget(holder);
            for loser in &self.claims[&subnet][1..] {
                let revision = self.leases.get(loser).map_or(0, |c| c.revision);
                let why = Rejection::Overlaps {
                    subnet,
                    holder: holder.to_owned(),
                };
                rejections.reject(loser, revision, &why);
            }
        }
        let (old, new) = (before, after.map(|(_, p)| p));
        if old == new {
            return;
        }
        if let Some(peer) = new {
            self.hold_ip(Ipv4Addr::from(peer.public_ip), ops);
            ops.push(Op::Upsert(subnet, peer));
        } else {
            ops.push(Op::Remove(subnet));
        }
        if let Some(peer) = old {
            self.release_ip(Ipv4Addr::from(peer.public_ip), ops);
        }
    }

    fn hold_ip(&mut self, ip: Ipv4Addr, ops: &mut Vec<Op>) {
        let refs = self.peer_refs.entry(ip).or_insert(0);
        if *refs == 0 {
            ops.push(Op::AddPeerIp(ip));
        }
        *refs += 1;
    }

    fn release_ip(&mut self, ip: Ipv4Addr, ops: &mut Vec<Op>) {
        if let Entry::Occupied(mut refs) = self.peer_refs.entry(ip) {
            *refs.get_mut() -= 1;
            if *refs.get() == 0 {
                refs.remove();
                ops.push(Op::RemovePeerIp(ip));
            }
        }
    }
}
