//! Bounds-checked access to packet headers (the headers themselves are in
//! `netd_common::headers`).

pub use netd_common::headers::*;

/// A pointer to a `T` at `offset` in `[start, end)`, or `None` when the
/// packet is too short. Every header access goes through here.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
