//! Other builds of netd for upgrade tests: a copy of `NETD_BIN` whose
//! embedded eBPF object differs, so a daemon started from it finds pinned
//! programs of another build with the same map layout.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::netd_bin;

/// ELF magic, 64-bit class, little-endian data, version 1.
const ELF64_LE: [u8; 7] = [0x7f, b'E', b'L', b'F', 2, 1, 1];
const EM_BPF: [u8; 2] = [0xf7, 0x00];
/// `e_ident[EI_PAD]`: reserved bytes every ELF reader ignores.
const EI_PAD: usize = 9;

/// Writes to `dir` a copy of `NETD_BIN` whose embedded eBPF object has one
/// ignored ELF header byte changed: the same programs and map layout, but
/// another object hash, i.e. another build. Returns its path.
pub fn netd_of_another_build(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(netd_bin()).expect("read NETD_BIN");
    let object = find_bpf_object(&bytes).expect("no eBPF ELF object embedded in NETD_BIN");
    bytes[object + EI_PAD] ^= 0x5a;
    let path = dir.join("netd-another-build");
    std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the copy executable");
    path
}

/// Offset of the embedded BPF object: an ELF header whose machine is BPF.
fn find_bpf_object(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len().saturating_sub(20))
        .find(|&i| bytes[i..].starts_with(&ELF64_LE) && bytes[i + 18..i + 20] == EM_BPF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bpf_object_not_the_host_binary() {
        let mut bytes = vec![0u8; 64];
        bytes[..7].copy_from_slice(&ELF64_LE);
        bytes[18..20].copy_from_slice(&[0x3e, 0]);
        let mut object = vec![0u8; 64];
        object[..7].copy_from_slice(&ELF64_LE);
        object[18..20].copy_from_slice(&EM_BPF);
        bytes.extend(object);
        assert_eq!(find_bpf_object(&bytes), Some(64));
        assert_eq!(find_bpf_object(&bytes[..64]), None);
    }
}
