//! Numeric identities for the kernel maps: deterministic, so the same
//! endpoints and policies give the same numbers across restarts.
//!
//! An endpoint's identity is its (network, labels), written canonically as
//! `network\0k=v\0k=v...` (labels sorted); its number is FNV-1a 32 of that
//! string mapped to `IDENTITY_FIRST_ASSIGNED..`, collisions resolved by
//! linear probing in sorted canonical order. Ids never leave this host.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnet::Ipv4Net;
use netd_common::policy::IDENTITY_FIRST_ASSIGNED;

/// FNV-1a, 32 bits.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The network id of `name` as the kernel compares it: never 0, which
/// means "no network" (CIDR and host identities).
pub fn network_id(name: &str) -> u32 {
    match fnv1a32(name.as_bytes()) {
        0 => 1,
        id => id,
    }
}

/// The canonical string of an endpoint identity.
pub fn endpoint_canonical(network: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = network.to_string();
    for (k, v) in labels {
        out.push('\0');
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The canonical string of a CIDR identity. It starts with `\0`, which no
/// network name does, so it never equals an endpoint's.
pub fn cidr_canonical(net: Ipv4Net) -> String {
    format!("\0cidr\0{net}")
}

/// Numbers for `canonicals`, all distinct and ≥ `IDENTITY_FIRST_ASSIGNED`.
pub fn assign(canonicals: &BTreeSet<String>) -> BTreeMap<String, u32> {
    let span = u64::from(u32::MAX) - u64::from(IDENTITY_FIRST_ASSIGNED) + 1;
    let first = u64::from(IDENTITY_FIRST_ASSIGNED);
    let mut taken = HashSet::with_capacity(canonicals.len());
    let mut out = BTreeMap::new();
    // BTreeSet iterates in sorted order: who probes is deterministic.
    for canonical in canonicals {
        let mut slot = u64::from(fnv1a32(canonical.as_bytes())) % span;
        // Terminates: there are far fewer identities than slots.
        while taken.contains(&slot) {
            slot = (slot + 1) % span;
        }
        taken.insert(slot);
        out.insert(canonical.clone(), (first + slot) as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_known_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn network_ids_are_the_hash_and_never_zero() {
        assert_eq!(network_id("default"), fnv1a32(b"default"));
        assert_ne!(network_id("default"), network_id("blue"));
        assert_ne!(network_id(""), 0);
    }

    #[test]
    fn canonical_strings_sort_labels() {
        let labels = BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]);
        assert_eq!(endpoint_canonical("blue", &labels), "blue\0a=1\0b=2");
        assert_eq!(endpoint_canonical("blue", &BTreeMap::new()), "blue");
        assert!(cidr_canonical("10.0.0.0/8".parse().unwrap()).starts_with('\0'));
    }

    #[test]
    fn ids_are_deterministic_distinct_and_assigned_range() {
        let set: BTreeSet<String> = (0..2000).map(|i| format!("net\0app=a{i}")).collect();
        let ids = assign(&set);
        assert_eq!(ids, assign(&set));
        let distinct: HashSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), set.len());
        assert!(ids.values().all(|&id| id >= IDENTITY_FIRST_ASSIGNED));
        // Without a collision an id is the hash mapped into the range.
        let one = BTreeSet::from(["default".to_string()]);
        let span = u64::from(u32::MAX) - 255;
        let want = 256 + (u64::from(fnv1a32(b"default")) % span) as u32;
        assert_eq!(assign(&one)["default"], want);
    }

    #[test]
    fn collisions_probe_in_sorted_order() {
        // Find two strings whose hashes land in the same slot.
        let span = u64::from(u32::MAX) - 255;
        let slot = |s: &str| u64::from(fnv1a32(s.as_bytes())) % span;
        let mut seen: BTreeMap<u64, String> = BTreeMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let s = format!("n{i}");
                match seen.insert(slot(&s), s.clone()) {
                    Some(prev) => Some((prev, s)),
                    None => None,
                }
            })
            .unwrap();
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        let ids = assign(&BTreeSet::from([low.clone(), high.clone()]));
        assert_eq!(u64::from(ids[&low]), 256 + slot(&low));
        assert_eq!(u64::from(ids[&high]), 256 + (slot(&low) + 1) % span);
    }
}
