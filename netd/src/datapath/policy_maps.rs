//! The policy maps (`IDENTITIES`, `LOCAL_POLICY`, `POLICY`, `POLICY_STATE`)
//! kept equal to compiled [`Tables`]: read what the kernel has, write what
//! differs (additions and replacements first, then the foreign identity, so
//! nothing allowed in both states is denied in between, then removals), and
//! bump the generation only when something changed, which makes the kernel
//! judge every tracked flow again. The difference is a pure function ([`diff`]); the map I/O is
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
    /// The foreign identity and network to write, when they differ.
    pub foreign: Option<(u32, u32)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self.local.is_empty()
            && self.rules.is_empty()
            && self.foreign.is_none()
    }

    pub fn upserts(&self) -> usize {
        self.identities.upsert.len()
            + self.local.upsert.len()
            + self.rules.upsert.len()
            + usize::from(self.foreign.is_some())
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
        foreign: Some(foreign(desired)).filter(|want| foreign(current) != *want),
    }
}

fn foreign(t: &Tables) -> (u32, u32) {
    (t.foreign_identity, t.foreign_network)
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
        let state = self.state()?;
        let mut tables = Tables {
            foreign_identity: state.foreign_identity,
            foreign_network: state.foreign_network,
            ..Tables::default()
        };
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
        Ok(self.state()?.generation)
    }

    pub fn state(&self) -> Result<PolicyState> {
        self.state.get(&0, 0).map_err(at(names::POLICY_STATE))
    }

    fn set_state(&mut self, state: PolicyState) -> Result<()> {
        self.state.set(0, state, 0).map_err(at(names::POLICY_STATE))
    }

    /// Makes the programs look `LOCAL_POLICY` up until the next `apply`
    /// says otherwise: an `untracked` an earlier run left is not trusted.
    pub fn clear_untracked(&mut self) -> Result<()> {
        let mut state = self.state()?;
        if state.untracked != 0 {
            state.untracked = 0;
            self.set_state(state)?;
        }
        Ok(())
    }

    /// Makes the maps equal `desired`; idempotent.
    pub fn apply(&mut self, desired: &Tables) -> Result<ApplyStats> {
        let changes = diff(&self.read()?, desired);
        // Tracking on before the writes, so whatever of them lands is
        // enforced even when a later one fails; off only after all landed.
        let untracked = u32::from(!desired.tracks_any());
        if untracked == 0 {
            self.clear_untracked()?;
        }
        self.write(&changes)?;
        let mut state = self.state()?;
        if !changes.is_empty() || state.untracked != untracked {
            if !changes.is_empty() {
                state.generation = state.generation.wrapping_add(1);
            }
            state.untracked = untracked;
            self.set_state(state)?;
        }
        let generation = state.generation;
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
        // The foreign identity once its rules are in, under the old
        // generation: the bump comes after the removals.
        if let Some((identity, network)) = c.foreign {
            let mut state = self.state()?;
            state.foreign_identity = identity;
            state.foreign_network = network;
            self.set_state(state)?;
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
            foreign_identity: 400,
            foreign_network: 7,
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
        assert!(c.foreign.is_none());
        assert_eq!((c.upserts(), c.removals()), (4, 1));
        // Everything gone, the foreign identity cleared.
        let c = diff(&current, &Tables::default());
        assert_eq!((c.upserts(), c.removals()), (1, 5));
        assert_eq!(c.foreign, Some((0, 0)));
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

    #[test]
    fn a_new_foreign_identity_is_a_change() {
        let current = tables(&[("10.244.1.2/32", 300)], &[(301, 80)]);
        let mut desired = current.clone();
        desired.foreign_identity = 402;
        let c = diff(&current, &desired);
        assert_eq!(c.foreign, Some((402, 7)));
        assert!(!c.is_empty());
        assert_eq!((c.upserts(), c.removals()), (1, 0));
        desired.foreign_network = 8;
        assert_eq!(diff(&current, &desired).foreign, Some((402, 8)));
    }

    /// Maps of the kernel's layout, created and pinned here (the programs'
    /// object need not have them), removed on drop.
    struct PinnedMaps {
        base: PathBuf,
        pin: PinDir,
    }

    impl PinnedMaps {
        fn create() -> Self {
            use aya_obj::{
                EbpfSectionKind,
                maps::{LegacyMap, PinningType, bpf_map_def},
            };
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test creates BPF maps: run it as root"
            );
            let base = PathBuf::from(format!(
                "/sys/fs/bpf/netd-unit-policy-{}",
                std::process::id()
            ));
            let pin = PinDir::new(&base);
            pin.create().expect("pin directory on bpffs at /sys/fs/bpf");
            let size = |n: usize| n as u32;
            // (name, type, key size, value size, entries, flags): 11 LPM
            // trie (no-prealloc), 1 hash, 2 array.
            let maps = [
                (names::IDENTITIES, 11, 8, size(size_of::<Identity>()), 64, 1),
                (
                    names::LOCAL_POLICY,
                    1,
                    4,
                    size(size_of::<LocalPolicy>()),
                    64,
                    0,
                ),
                (
                    names::POLICY,
                    1,
                    size(size_of::<PolicyKey>()),
                    size(size_of::<PolicyEntry>()),
                    64,
                    0,
                ),
                (
                    names::POLICY_STATE,
                    2,
                    4,
                    size(size_of::<PolicyState>()),
                    1,
                    0,
                ),
            ];
            for (name, map_type, key_size, value_size, max_entries, map_flags) in maps {
                let obj = aya_obj::Map::Legacy(LegacyMap {
                    def: bpf_map_def {
                        map_type,
                        key_size,
                        value_size,
                        max_entries,
                        map_flags,
                        id: 0,
                        pinning: PinningType::None,
                    },
                    inner_def: None,
                    section_index: 0,
                    section_kind: EbpfSectionKind::Maps,
                    symbol_index: None,
                    data: Vec::new(),
                });
                let map =
                    MapData::create(obj, name, None).unwrap_or_else(|e| panic!("{name}: {e}"));
                map.pin(pin.map(name))
                    .unwrap_or_else(|e| panic!("pin {name}: {e}"));
            }
            PinnedMaps { base, pin }
        }
    }

    impl Drop for PinnedMaps {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    #[test]
    fn apply_makes_the_maps_equal_and_bumps_the_generation_on_change() {
        use crate::policy::{ClusterView, EndpointInfo, Policy, compile};
        let pinned = PinnedMaps::create();
        let mut maps = PolicyMaps::open(&pinned.pin).unwrap();
        assert_eq!(maps.read().unwrap(), Tables::default());
        assert_eq!(maps.generation().unwrap(), 0);

        let ep = |ip: &str, app: &str| EndpointInfo {
            ip: ip.parse().unwrap(),
            network: "default".into(),
            labels: BTreeMap::from([("app".into(), app.into())]),
        };
        let mut view = ClusterView {
            endpoints: vec![ep("10.244.1.2", "web"), ep("10.244.1.3", "client")],
            local: ["10.244.1.2".parse().unwrap(), "10.244.1.3".parse().unwrap()].into(),
            gateway: Some("10.244.1.1".parse().unwrap()),
            ..Default::default()
        };
        let web = Policy::parse(
            br#"{"name":"web","selector":{"app":"web"},"ingress":[{"from":[{"selector":{"app":"client"}},{"cidr":"203.0.113.0/24"}],"ports":[{"port":80},{"port":443}]}]}"#,
        )
        .unwrap();
        let first = compile(&view, std::slice::from_ref(&web));
        assert!(!first.rules.is_empty());
        let stats = maps.apply(&first).unwrap();
        // The foreign identity is one more write.
        let total = first.identities.len() + first.local.len() + first.rules.len() + 1;
        assert_eq!(
            (stats.upserted, stats.removed, stats.generation),
            (total, 0, 1)
        );
        assert_eq!(maps.read().unwrap(), first);
        assert!(first.tracks_any());
        assert_eq!(maps.state().unwrap().untracked, 0, "web is tracked");

        // The same tables again: nothing written, the generation stays.
        let stats = maps.apply(&first).unwrap();
        assert!(!stats.changed());
        assert_eq!(maps.generation().unwrap(), 1);

        // An endpoint gone and the policy removed: stale entries deleted.
        view.endpoints.pop();
        view.local.remove(&"10.244.1.3".parse().unwrap());
        let second = compile(&view, &[]);
        let stats = maps.apply(&second).unwrap();
        assert!(stats.removed >= first.rules.len() + 2, "{stats:?}");
        assert_eq!(stats.generation, 2);
        assert_eq!(maps.read().unwrap(), second);
        assert!(!second.tracks_any());
        assert_eq!(maps.state().unwrap().untracked, 1, "nothing tracked");

        // Another foreign identity: written with the generation bumped.
        view.foreign.labels.insert("flannel".into(), "yes".into());
        let third = compile(&view, &[]);
        assert_ne!(third.foreign_identity, second.foreign_identity);
        let stats = maps.apply(&third).unwrap();
        assert_eq!(stats.generation, 3);
        let state = maps.state().unwrap();
        assert_eq!(
            (state.foreign_identity, state.foreign_network),
            (third.foreign_identity, third.foreign_network)
        );
        assert_eq!(maps.read().unwrap(), third);
        let second = third;

        // What another writer left behind is removed too (level-triggered).
        maps.rules.insert(key(999), entry(1), 0).unwrap();
        let stats = maps.apply(&second).unwrap();
        assert_eq!((stats.upserted, stats.removed, stats.generation), (0, 1, 4));
        assert_eq!(maps.read().unwrap(), second);

        // A cleared `untracked` is set again, with nothing else to bump for.
        let mut state = maps.state().unwrap();
        state.untracked = 0;
        maps.set_state(state).unwrap();
        let stats = maps.apply(&second).unwrap();
        assert_eq!((stats.upserted, stats.removed, stats.generation), (0, 0, 4));
        assert_eq!(maps.state().unwrap().untracked, 1);

        // Tracked endpoints again: looked up from this apply on.
        maps.apply(&first).unwrap();
        assert_eq!(maps.state().unwrap().untracked, 0);
        assert_eq!(maps.read().unwrap(), first);
    }
}
