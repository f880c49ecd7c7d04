//! Containers on this host: `netd attach` and the CNI plugin wire a network
//! namespace to the data plane through the same code, and undo it the same
//! way. Each attachment is recorded in `<run-dir>/endpoints/<id>.json` so it
//! is found again after restarts.
//!
//! Every change to the records, and so every address handed out, happens
//! under one `flock` on `<run-dir>/endpoints.lock` (see [`allocator`]). A
//! record is written as `pending` before any kernel object is made and
//! turned `ready` once all exist; whoever takes the lock next rolls back a
//! pending record left by a process that died half-way.

mod allocator;
mod attach;
mod error;
pub mod handoff;
pub mod labels;
mod names;
mod record;

pub use allocator::{Lock, pick_ip};
pub use attach::{
    AttachRequest, attach, check, detach, detach_all, gc, netns_path, recover, release, restore,
    valid_ifname,
};
pub use error::Error;
pub use names::host_ifnames;
pub use record::{Phase, Record, all_records, find, records, remove_records_dir};
