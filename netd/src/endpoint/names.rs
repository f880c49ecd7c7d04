//! Host-side interface names derived from an attachment's id. They must not
//! change between builds, or an upgrade would orphan attachments, so the hash
//! is FNV-1a (fixed by its definition), not std's `DefaultHasher`.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// The host veth name and the temporary name of its peer (before it moves
/// into the namespace), at most 15 bytes each. `attempt` > 0 salts the hash
/// when another attachment holds the first name.
pub fn host_ifnames(id: &str, attempt: u32) -> (String, String) {
    let mut key = id.as_bytes().to_vec();
    if attempt > 0 {
        key.extend_from_slice(format!("#{attempt}").as_bytes());
    }
    let h = fnv1a(&key);
    let h = (h ^ (h >> 32)) as u32;
    (format!("ndv{h:08x}"), format!("ndt{h:08x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ() {
        let (a, b) = host_ifnames("a-very-long-namespace-name-indeed", 0);
        assert!(a.len() <= 15 && b.len() <= 15 && a != b);
        assert_eq!(host_ifnames("x", 0), host_ifnames("x", 0));
        assert_ne!(host_ifnames("x", 0).0, host_ifnames("y", 0).0);
        assert_ne!(host_ifnames("x", 0).0, host_ifnames("x", 1).0);
    }

    /// Pinned values: a change here renames every existing attachment.
    #[test]
    fn names_are_stable() {
        assert_eq!(fnv1a(b""), FNV_OFFSET);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(host_ifnames("foobar", 0).0, "ndv72ad2699");
    }
}
