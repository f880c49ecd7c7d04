//! The policy maps (`IDENTITIES`, `LOCAL_POLICY`, `POLICY`, `POLICY_STATE`)
//! kept equal to compiled [`Tables`]: read what the kernel has, write what
//! differs (additions and replacements first, so nothing allowed in both
//! states is denied in between, then removals), and bump the generation
//! only when something changed, which makes the kernel judge every tracked
//! flow again. The difference is a pure function ([`diff`]); the map I/O is
//! a thin layer over it.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use netd_common::{
    names,
    policy::{Identity, LocalPolicy, PolicyEntry, PolicyKey, PolicyState},
};

use super::PinDir;
use crate::policy::Tables;

#[derive(Debug, thiserror::Error)]
pub enum PolicyMapError {
    #[error("opening pinned map {}: is `netd run` up, with a build that has policy maps?", path.display())]
    Open { path: PathBuf, source: MapError },
    #[error("map {map}")]
    Map { map: &'static str, source: MapError },
    #[error("map {map} has an entry that is not an IPv4 prefix (length {len})")]
    BadPrefix { map: &'static str, len: u32 },
}

pub type Result<T> = std::result::Result<T, PolicyMapError>;

/// Entries to write and keys to remove for one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapChanges<K, V> {
    pub upsert: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> Default for MapChanges<K, V> {
    fn default() -> Self {
        Self {
            upsert: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl<K, V> MapChanges<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// What turns the kernel's tables into the desired ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub identities: MapChanges<Ipv4Net, Identity>,
    pub local: MapChanges<Ipv4Addr, LocalPolicy>,
    pub rules: MapChanges<PolicyKey, PolicyEntry>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.local.is_empty() && self.rules.is_empty()
    }

    pub fn upserts(&self) -> usize {
        self.identities.upsert.len() + self.local.upsert.len() + self.rules.upsert.len()
    }

    pub fn removals(&self) -> usize {
        self.identities.remove.len() + self.local.remove.len() + self.rules.remove.len()
    }
}

fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapChanges<K, V> {
    MapChanges {
        upsert: desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        remove: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect(),
    }
}

/// The changes from `current` (what the kernel has) to `desired`.
pub fn diff(current: &Tables, desired: &Tables) -> Changes {
    Changes {
        identities: diff_map(&current.identities, &desired.identities),
        local: diff_map(&current.local, &desired.local),
        rules: diff_map(&current.rules, &desired.rules),
    }
}

/// What one [`PolicyMaps::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries added or replaced.
    pub upserted: usize,
    pub removed: usize,
    /// `POLICY_STATE.generation` after the call.
    pub generation: u32,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.upserted + self.removed > 0
    }
}

pub struct PolicyMaps {
    identities: LpmTrie<MapData, [u8; 4], Identity>,
    local: HashMap<MapData, [u8; 4], LocalPolicy>,
    rules: HashMap<MapData, PolicyKey, PolicyEntry>,
    state: Array<MapData, PolicyState>,
}

fn open(pin: &PinDir, name: &'static str) -> Result<Map> {
    let path = pin.map(name);
    let data = MapData::from_pin(&path).map_err(|source| PolicyMapError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| PolicyMapError::Open { path, source })
}

fn typed<T: TryFrom<Map, Error = MapError>>(pin: &PinDir, name: &'static str) -> Result<T> {
    open(pin, name)?
        .try_into()
        .map_err(|source| PolicyMapError::Map { map: name, source })
}

fn at(map: &'static str) -> impl Fn(MapError) -> PolicyMapError {
    move |source| PolicyMapError::Map { map, source }
}

fn trie_key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

impl PolicyMaps {
    pub fn open(pin: &PinDir) -> Result<Self> {
        Ok(PolicyMaps {
            identities: typed(pin, names::IDENTITIES)?,
            local: typed(pin, names::LOCAL_POLICY)?,
            rules: typed(pin, names::POLICY)?,
            state: typed(pin, names::POLICY_STATE)?,
        })
    }

    /// What the kernel has now (`problems` empty).
    pub fn read(&self) -> Result<Tables> {
        let mut tables = Tables::default();
        for entry in self.identities.iter() {
            let (key, identity) = entry.map_err(at(names::IDENTITIES))?;
            let len = key.prefix_len();
            let net = u8::try_from(len)
                .ok()
                .and_then(|l| Ipv4Net::new(Ipv4Addr::from(key.data()), l).ok())
                .ok_or(PolicyMapError::BadPrefix {
                    map: names::IDENTITIES,
                    len,
                })?;
            tables.identities.insert(net, identity);
        }
        for entry in self.local.iter() {
            let (ip, lp) = entry.map_err(at(names::LOCAL_POLICY))?;
            tables.local.insert(Ipv4Addr::from(ip), lp);
        }
        for entry in self.rules.iter() {
            let (key, value) = entry.map_err(at(names::POLICY))?;
            tables.rules.insert(key, value);
        }
        Ok(tables)
    }

    pub fn generation(&self) -> Result<u32> {
        Ok(self
            .state
            .get(&0, 0)
            .map_err(at(names::POLICY_STATE))?
            .generation)
    }

    /// Makes the maps equal `desired`; idempotent.
    pub fn apply(&mut self, desired: &Tables) -> Result<ApplyStats> {
        let changes = diff(&self.read()?, desired);
        self.write(&changes)?;
        let mut generation = self.generation()?;
        if !changes.is_empty() {
            generation = generation.wrapping_add(1);
            let state = PolicyState {
                generation,
                _pad: 0,
            };
            self.state
                .set(0, state, 0)
                .map_err(at(names::POLICY_STATE))?;
        }
        Ok(ApplyStats {
            upserted: changes.upserts(),
            removed: changes.removals(),
            generation,
        })
    }

    fn write(&mut self, c: &Changes) -> Result<()> {
        for (net, identity) in &c.identities.upsert {
            self.identities
                .insert(&trie_key(net), identity, 0)
                .map_err(at(names::IDENTITIES))?;
        }
        for (ip, lp) in &c.local.upsert {
            self.local
                .insert(ip.octets(), lp, 0)
                .map_err(at(names::LOCAL_POLICY))?;
        }
        for (key, entry) in &c.rules.upsert {
            self.rules
                .insert(key, entry, 0)
                .map_err(at(names::POLICY))?;
        }
        // Removals last: a flow allowed before and after never sees a gap.
        for key in &c.rules.remove {
            remove_ok(self.rules.remove(key)).map_err(at(names::POLICY))?;
        }
        for ip in &c.local.remove {
            remove_ok(self.local.remove(&ip.octets())).map_err(at(names::LOCAL_POLICY))?;
        }
        for net in &c.identities.remove {
            remove_ok(self.identities.remove(&trie_key(net))).map_err(at(names::IDENTITIES))?;
        }
        Ok(())
    }
}

/// A key someone else removed meanwhile is as good as removed.
fn remove_ok(result: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use netd_common::policy::{DIR_INGRESS, IdentityKind, MAX_PORT_RANGES, PortRange};

    use super::*;

    fn identity(id: u32) -> Identity {
        Identity {
            id,
            network: 7,
            kind: IdentityKind::Endpoint as u8,
            _pad: [0; 3],
        }
    }

    fn key(remote: u32) -> PolicyKey {
        PolicyKey {
            local: 300,
            remote,
            proto: 6,
            dir: DIR_INGRESS,
            _pad: [0; 2],
        }
    }

    fn entry(port: u16) -> PolicyEntry {
        let mut ranges = [PortRange::default(); MAX_PORT_RANGES];
        ranges[0] = PortRange {
            first: port,
            last: port,
        };
        PolicyEntry {
            count: 1,
            _pad: [0; 3],
            ranges,
        }
    }

    fn tables(ids: &[(&str, u32)], rules: &[(u32, u16)]) -> Tables {
        Tables {
            identities: ids
                .iter()
                .map(|(n, id)| (n.parse().unwrap(), identity(*id)))
                .collect(),
            local: BTreeMap::from([(
                "10.244.1.2".parse().unwrap(),
                LocalPolicy {
                    identity: 300,
                    network: 7,
                    flags: 5,
                    _pad: [0; 3],
                },
            )]),
            rules: rules.iter().map(|(r, p)| (key(*r), entry(*p))).collect(),
            problems: vec![],
        }
    }

    #[test]
    fn same_tables_no_changes() {
        let t = tables(&[("10.244.1.2/32", 300)], &[(301, 80)]);
        assert!(diff(&t, &t).is_empty());
        // Problems are for the log, not for the kernel.
        let mut with_problem = t.clone();
        with_problem.problems.push("x".into());
        assert!(diff(&t, &with_problem).is_empty());
    }

    #[test]
    fn additions_replacements_and_removals() {
        let current = tables(
            &[("10.244.1.2/32", 300), ("10.244.2.0/24", 400)],
            &[(301, 80), (302, 443)],
        );
        let desired = tables(
            &[
                ("10.244.1.2/32", 300),
                ("10.244.2.0/24", 401),
                ("203.0.113.0/24", 500),
            ],
            &[(301, 8080), (303, 22)],
        );
        let c = diff(&current, &desired);
        assert_eq!(
            c.identities.upsert,
            vec![
                ("10.244.2.0/24".parse().unwrap(), identity(401)),
                ("203.0.113.0/24".parse().unwrap(), identity(500)),
            ]
        );
        assert!(c.identities.remove.is_empty());
        assert_eq!(
            c.rules.upsert,
            vec![(key(301), entry(8080)), (key(303), entry(22))]
        );
        assert_eq!(c.rules.remove, vec![key(302)]);
        assert!(c.local.is_empty());
        assert_eq!((c.upserts(), c.removals()), (4, 1));
        // Everything gone.
        let c = diff(&current, &Tables::default());
        assert_eq!((c.upserts(), c.removals()), (0, 5));
        // Applying the changes to `current` gives `desired`.
        let mut after = current.clone();
        let c = diff(&current, &desired);
        for (k, v) in c.identities.upsert {
            after.identities.insert(k, v);
        }
        for (k, v) in c.rules.upsert {
            after.rules.insert(k, v);
        }
        for k in c.rules.remove {
            after.rules.remove(&k);
        }
        assert_eq!(after, desired);
    }
}
