//! Paths of pinned objects, and the check that they are on a bpf filesystem.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use netd_common::MAP_LAYOUT_VERSION;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// `<pin-path>/v<layout>`: a new map layout gets a new directory, so a daemon
/// never reads maps written with another layout.
#[derive(Debug, Clone)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    pub fn new(base: &Path) -> Self {
        PinDir {
            dir: base.join(format!("v{MAP_LAYOUT_VERSION}")),
        }
    }

    /// Creates the directory, refusing anything that is not on bpffs. No
    /// bpffs is mounted here: under `ip netns exec` (the usual way to find
    /// /sys/fs/bpf missing) the mount would live in that command's private
    /// mount namespace and vanish with it, pins and all, so the next
    /// `netd` would not find them.
    pub fn create(&self) -> Result<()> {
        let base = self.dir.parent().expect("versioned dir has a parent");
        let mount = base
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !on_bpffs(mount)? {
            bail!(
                "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --pin-path; \
                 under `ip netns exec`, which remounts /sys without it, enter the namespace with \
                 `nsenter --net=/run/netns/NAME` instead",
                mount.display()
            );
        }
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))
    }

    /// Unpins maps and programs of other layout versions once nothing
    /// attached uses them any more (the kernel frees them then).
    pub fn remove_other_versions(&self) {
        let (Some(base), Some(ours)) = (self.dir.parent(), self.dir.file_name()) else {
            return;
        };
        let Ok(entries) = fs::read_dir(base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if is_version_dir(&name) && name != ours {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        tracing::info!(dir = %entry.path().display(), "removed pins of an older layout")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %entry.path().display(), "could not remove old pins: {e}")
                    }
                }
            }
        }
    }

    /// Removes the pins of every layout version, then the pin path itself
    /// when nothing else is left in it. Tries every version before
    /// reporting the first failure.
    pub fn remove_all_versions(&self) -> Result<()> {
        let Some(base) = self.dir.parent() else {
            return Ok(());
        };
        let entries = match fs::read_dir(base) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", base.display())),
        };
        let mut failed = Vec::new();
        for entry in entries.flatten() {
            if is_version_dir(&entry.file_name())
                && let Err(e) = fs::remove_dir_all(entry.path())
            {
                failed.push(format!("{}: {e}", entry.path().display()));
            }
        }
        if !failed.is_empty() {
            bail!("removing pins: {}", failed.join("; "));
        }
        // Only an empty directory goes; a mount point or one holding
        // others' pins stays.
        let _ = fs::remove_dir(base);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(format!("prog_{name}"))
    }
}

fn on_bpffs(path: &Path) -> Result<bool> {
    let stat =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// `v1`, `v2`, ...: a directory of one map layout version.
fn is_version_dir(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.len() > 1 && n.starts_with('v') && n[1..].parse::<u32>().is_ok())
}
