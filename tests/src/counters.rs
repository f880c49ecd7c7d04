//! netd's counters (`netd status --json`) and how they moved between two
//! readings.

use std::collections::BTreeMap;

/// Counters by name, as [`crate::Cluster::counters`] reads them.
pub type Counters = BTreeMap<String, u64>;

/// How much counter `name` grew from `before` to `after`; panics if it is
/// unknown or went backwards.
pub fn delta(before: &Counters, after: &Counters, name: &str) -> u64 {
    let read = |c: &Counters| {
        *c.get(name)
            .unwrap_or_else(|| panic!("no counter named {name} in {c:?}"))
    };
    let (b, a) = (read(before), read(after));
    assert!(a >= b, "counter {name} went backwards: {b} -> {a}");
    a - b
}

/// Asserts that host `host`'s counter `name` grew by at least `min`.
pub fn assert_grew(
    host: usize,
    before: &Counters,
    after: &Counters,
    name: &str,
    min: u64,
    why: &str,
) {
    let d = delta(before, after, name);
    assert!(
        d >= min,
        "host {host}: counter {name} grew by {d}, expected >= {min} ({why}); \
         before {before:?}, after {after:?}"
    );
}

/// Every counter that moved, with how much.
pub fn deltas(before: &Counters, after: &Counters) -> Counters {
    after
        .keys()
        .map(|name| (name.clone(), delta(before, after, name)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_of_moved_counters() {
        let before: Counters = [("a".into(), 1), ("b".into(), 5)].into();
        let after: Counters = [("a".into(), 4), ("b".into(), 5)].into();
        assert_eq!(delta(&before, &after, "a"), 3);
        assert_eq!(deltas(&before, &after), [("a".to_string(), 3)].into());
    }
}
