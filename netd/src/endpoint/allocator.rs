//! The one address allocator of a host. `netd attach`, `netd detach`, the
//! CNI plugin and the daemon's restore all change the records under one
//! exclusive `flock` on `<run-dir>/endpoints.lock`. A file lock rather than
//! requests to the daemon: attach and DEL keep working while the daemon
//! restarts, and the kernel drops the lock of a process that dies, so a
//! crash never leaves the host locked.

use std::{collections::BTreeSet, fs, net::Ipv4Addr, os::fd::AsRawFd as _, path::Path};

use anyhow::Context as _;
use ipnet::Ipv4Net;

use super::Error;
use crate::control::lease::gateway;

/// The lock file in the run directory.
pub(super) const LOCK_FILE: &str = "endpoints.lock";

/// Held while records are read and changed; released on drop (or death).
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    /// Blocks until this process holds the host's endpoint lock.
    pub fn acquire(run_dir: &Path) -> Result<Lock, Error> {
        fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(anyhow::Error::new(err)
                    .context(format!("locking {}", path.display()))
                    .into());
            }
        }
    }
}

/// The requested address, or the lowest free one after the gateway.
pub fn pick_ip(
    subnet: Ipv4Net,
    requested: Option<Ipv4Addr>,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, Error> {
    let gw = gateway(subnet);
    let usable = |ip: &Ipv4Addr| {
        subnet.contains(ip) && *ip != subnet.network() && *ip != subnet.broadcast() && *ip != gw
    };
    match requested {
        Some(ip) if !usable(&ip) => Err(Error::Address(format!(
            "{ip} is not a usable container address in this host's subnet {subnet} (gateway {gw})"
        ))),
        Some(ip) if used.contains(&ip) => Err(Error::Address(format!(
            "{ip} is already used by another container"
        ))),
        Some(ip) => Ok(ip),
        None => subnet
            .hosts()
            .find(|ip| usable(ip) && !used.contains(ip))
            .ok_or_else(|| Error::Address(format!("no free address left in {subnet}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_lowest_free_after_gateway() {
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(
            pick_ip(subnet, None, &used).unwrap(),
            "10.244.3.2".parse::<Ipv4Addr>().unwrap()
        );
        used.insert("10.244.3.2".parse().unwrap());
        assert_eq!(
            pick_ip(subnet, None, &used).unwrap(),
            "10.244.3.3".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn checks_requested_address() {
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = ["10.244.3.9".parse().unwrap()].into();
        assert!(pick_ip(subnet, Some("10.244.3.7".parse().unwrap()), &used).is_ok());
        for bad in [
            "10.244.3.9",
            "10.244.3.1",
            "10.244.3.0",
            "10.244.3.255",
            "10.244.4.7",
        ] {
            assert!(
                pick_ip(subnet, Some(bad.parse().unwrap()), &used).is_err(),
                "{bad}"
            );
        }
        let tiny: Ipv4Net = "10.244.3.0/30".parse().unwrap();
        let full: BTreeSet<Ipv4Addr> = ["10.244.3.2".parse().unwrap()].into();
        assert!(pick_ip(tiny, None, &full).is_err());
    }

    /// Two holders in one process exclude each other like two processes.
    #[test]
    fn lock_excludes() {
        let dir = std::env::temp_dir().join(format!("netd-lock-{}", std::process::id()));
        let first = Lock::acquire(&dir).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        let t = std::thread::spawn(move || {
            let _second = Lock::acquire(&d).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
