//! Reads a pinned BPF map with the bpf(2) syscall directly: a lookup
//! takes microseconds where starting bpftool takes milliseconds, which is
//! what lets the control-plane runs time a map change to the millisecond.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;

/// Large enough for any value of netd's maps.
pub const VALUE_BUF: usize = 256;

/// `union bpf_attr`, as 8-byte words (the kernel wants unused bytes zero).
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, fully initialised bpf_attr-sized buffer
    // whose pointers (if any) point into live buffers of the caller.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub struct PinnedMap {
    fd: OwnedFd,
    key_size: usize,
}

impl PinnedMap {
    /// Opens the map pinned at `path`; `key_size` is its key's size.
    pub fn open(path: &Path, key_size: usize) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        let mut attr: Attr = [0; 16];
        attr[0] = c.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PinnedMap { fd, key_size })
    }

    /// Whether a lookup of `key` finds an entry (for an LPM trie: any
    /// prefix covering it).
    pub fn contains(&self, key: &[u8]) -> io::Result<bool> {
        assert_eq!(key.len(), self.key_size, "key size");
        let mut value = [0u8; VALUE_BUF];
        let mut attr: Attr = [0; 16];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value stored under `key` (for an LPM trie: of the longest
    /// prefix covering it), `VALUE_BUF` bytes of which the map's value
    /// size are meaningful.
    pub fn lookup(&self, key: &[u8]) -> io::Result<Option<[u8; VALUE_BUF]>> {
        assert_eq!(key.len(), self.key_size, "key size");
        let mut value = [0u8; VALUE_BUF];
        let mut attr: Attr = [0; 16];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Number of entries, by walking the keys.
    pub fn count(&self) -> io::Result<usize> {
        let mut key = vec![0u8; self.key_size];
        let mut next = vec![0u8; self.key_size];
        let mut first = true;
        let mut n = 0;
        loop {
            let mut attr: Attr = [0; 16];
            attr[0] = self.fd.as_raw_fd() as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
            n += 1;
            first = false;
            std::mem::swap(&mut key, &mut next);
        }
    }
}

/// The key of netd's SUBNETS LPM trie for one address: prefix length 32
/// (host order) then the address (network order).
pub fn lpm_key(ip: std::net::Ipv4Addr) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&32u32.to_ne_bytes());
    k[4..].copy_from_slice(&ip.octets());
    k
}

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u64 = 0;

/// Turns on the kernel's per-program run time and run count accounting
/// (what `bpftool prog show` prints as run_time_ns/run_cnt) for as long as
/// the returned descriptor is open: closing it, also by exiting or
/// crashing, turns it off again, so no global sysctl is left changed.
pub fn enable_run_time_stats() -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 16];
    attr[0] = BPF_STATS_RUN_TIME;
    let fd = bpf(BPF_ENABLE_STATS, &mut attr)?;
    // SAFETY: BPF_ENABLE_STATS returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
