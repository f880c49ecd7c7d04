//! `BPF_MAP_UPDATE_BATCH`: many entries of one map written in one bpf(2)
//! call. A full sync of 100,000 leases otherwise makes 200,000 syscalls
//! (SUBNETS and PEERS), which is most of the time the kernel side takes.
//! aya 0.14 has no wrapper, so this calls bpf(2) itself with the kernel's
//! `bpf_attr` batch layout. Hash maps support the command since 5.6, LPM
//! tries through `generic_map_update_batch`; a kernel without it answers
//! EINVAL or ENOTSUPP and [`update`] writes the entries one by one.

use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_MAP_UPDATE_BATCH` in `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's `ENOTSUPP` (not exported to userspace headers).
const ENOTSUPP: i32 = 524;
/// Entries per call: bounds the kernel's time in one syscall and the
/// number of entries a failed call leaves to retry.
pub const CHUNK: usize = 16_384;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries in `keys`/`values`; out: entries written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{keys} keys but {values} values")]
    Mismatch { keys: usize, values: usize },
    /// The kernel has no batch update for this map: write one by one.
    #[error("batch update not supported by this kernel for this map")]
    Unsupported,
    #[error("BPF_MAP_UPDATE_BATCH wrote {written} of {count} entries")]
    Failed {
        written: usize,
        count: usize,
        #[source]
        error: std::io::Error,
    },
}

/// Writes `keys[i] -> values[i]` into the map behind `fd` (with flags
/// `BPF_ANY`) in calls of at most [`CHUNK`] entries. `K` and `V` must be
/// the map's exact key and value layouts (the `Pod` types aya uses).
/// [`BatchError::Unsupported`] comes only from the first call, and the
/// caller then writes every entry one by one.
pub fn update<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    if keys.len() != values.len() {
        return Err(BatchError::Mismatch {
            keys: keys.len(),
            values: values.len(),
        });
    }
    for (i, (k, v)) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)).enumerate() {
        update_chunk(fd, k, v).map_err(|e| match e {
            // A later chunk cannot be unsupported when the first was not.
            BatchError::Unsupported if i > 0 => BatchError::Failed {
                written: i * CHUNK,
                count: keys.len(),
                error: std::io::Error::from_raw_os_error(libc::EINVAL),
            },
            BatchError::Failed { written, error, .. } => BatchError::Failed {
                written: i * CHUNK + written,
                count: keys.len(),
                error,
            },
            e => e,
        })?;
    }
    Ok(())
}

fn update_chunk<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is the kernel's batch layout and lives across the
    // call; `keys` and `values` hold `count` entries of the map's key and
    // value sizes, which the kernel only reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    let written = attr.count as usize;
    match error.raw_os_error() {
        // A kernel without the command (EINVAL) or without the map type's
        // batch operation (ENOTSUPP) returns before writing `count` back,
        // so it still says what was given. Whatever it did write, the
        // one-by-one updates that follow write again, to the same values.
        Some(libc::EINVAL | ENOTSUPP) => Err(BatchError::Unsupported),
        _ => Err(BatchError::Failed {
            written,
            count: keys.len(),
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    /// The layout include/uapi/linux/bpf.h gives the batch attributes.
    #[test]
    fn attr_matches_the_kernel_layout() {
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(offset_of!(BatchAttr, in_batch), 0);
        assert_eq!(offset_of!(BatchAttr, out_batch), 8);
        assert_eq!(offset_of!(BatchAttr, keys), 16);
        assert_eq!(offset_of!(BatchAttr, values), 24);
        assert_eq!(offset_of!(BatchAttr, count), 32);
        assert_eq!(offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(offset_of!(BatchAttr, elem_flags), 40);
        assert_eq!(offset_of!(BatchAttr, flags), 48);
    }

    #[test]
    fn mismatched_lengths_are_refused_before_any_call() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        let err = update(fd.as_fd(), &[1u32, 2], &[1u32]).unwrap_err();
        assert!(matches!(err, BatchError::Mismatch { keys: 2, values: 1 }));
    }

    use std::os::fd::AsFd;
}
