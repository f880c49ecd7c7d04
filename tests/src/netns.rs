//! Named network namespaces and ways to run code inside them.
//!
//! Commands enter a namespace with `setns(2)` only. `ip netns exec` is avoided
//! on purpose: it also unshares the mount namespace and remounts `/sys`, which
//! hides the bpffs mounted at `/sys/fs/bpf`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{install_hint, output_text, require_root, run_checked};

/// Directory where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Prefix of every namespace (and pin directory) this crate creates.
pub const NAME_PREFIX: &str = "nd";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns a name unique to this process and call: `nd{pid}x{n}`.
///
/// The pid lets [`cleanup_stale`] recognise leftovers of dead test runs.
pub fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}x{n}", std::process::id())
}

/// A non-owning reference to a named network namespace.
///
/// Cheap to clone; used by guards (etcd, daemons, captures) that run
/// processes in a namespace they do not own.
#[derive(Clone, Debug)]
pub struct NsRef {
    name: String,
}

impl NsRef {
    /// Refers to the namespace `/run/netns/NAME`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Whether the namespace mount still exists.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    fn open(&self) -> File {
        let path = self.path();
        File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    }

    /// A `Command` for `program` whose child enters this namespace before exec.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let ns = self.open();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe and the closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output, whatever the status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let (program, args) = argv.split_first().expect("exec: empty argv");
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        cmd.output().unwrap_or_else(|e| {
            panic!(
                "[{}] cannot run {argv:?}: {e}{}",
                self.name,
                install_hint(&cmd)
            )
        })
    }

    /// Runs `argv` inside the namespace, panics with its output on failure,
    /// returns its stdout.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        if !out.status.success() {
            panic!(
                "[{}] {argv:?} failed ({}):\n{}",
                self.name,
                out.status,
                output_text(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Moves the calling thread into this namespace (only this thread).
    pub fn enter_current_thread(&self) {
        setns(self.open(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
    }

    /// Spawns a thread that runs `f` inside this namespace.
    pub fn spawn_thread<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = self.clone();
        thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                ns.enter_current_thread();
                f()
            })
            .expect("spawn thread")
    }

    /// Runs `f` inside this namespace on a helper thread and returns its
    /// result; a panic in `f` is propagated.
    pub fn run_in_thread<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self.spawn_thread(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Sets a per-namespace sysctl, e.g. `net.ipv4.ip_forward`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let ns = self.name.clone();
        // /proc/sys/net resolves against the writing thread's namespace.
        self.run_in_thread(move || {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("[{ns}] write {path}: {e}"))
        });
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("run ip netns pids");
        let me = std::process::id() as i32;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect()
    }

    /// SIGKILLs every process inside and waits (briefly) until they are gone.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills everything inside, then removes the namespace. Idempotent.
    pub fn delete(&self) {
        if !self.exists() {
            return;
        }
        self.kill_all();
        let out = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() || !self.exists() => {}
            Ok(o) => eprintln!("ip netns delete {}: {}", self.name, output_text(&o)),
            Err(e) => eprintln!("ip netns delete {}: {e}", self.name),
        }
    }
}

/// An owned network namespace, deleted (with every process in it) on drop.
///
/// Dereferences to [`NsRef`] for running commands and threads inside.
#[derive(Debug)]
pub struct NetNs {
    r: NsRef,
}

impl NetNs {
    /// Creates a namespace with a unique name and brings `lo` up.
    ///
    /// Panics if not root.
    pub fn new() -> Self {
        require_root();
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(cleanup_stale);

        let name = unique_name();
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            r: NsRef::new(name),
        };
        ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A non-owning reference to this namespace.
    pub fn handle(&self) -> NsRef {
        self.r.clone()
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for NetNs {
    type Target = NsRef;
    fn deref(&self) -> &NsRef {
        &self.r
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.r.delete();
    }
}

/// Parses `nd{pid}x{n}` and returns the pid.
pub(crate) fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, n) = rest.split_once('x')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Whether `name` belongs to a test process that no longer runs.
pub(crate) fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Deletes namespaces left behind by test processes that were killed before
/// their guards could run.
pub fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_stale(&name) {
            NsRef::new(name).delete();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_parse() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id() as i32));
        assert!(a.len() <= 15, "{a} too long for an interface name");
    }

    #[test]
    fn foreign_names_are_never_stale() {
        for name in [
            "default", "nd", "ndx1", "nd12x", "nd12y3", "ndabcx1", "cni-123",
        ] {
            assert_eq!(owner_pid(name), None, "{name}");
            assert!(!is_stale(name), "{name}");
        }
        assert!(!is_stale(&unique_name()));
    }
}
