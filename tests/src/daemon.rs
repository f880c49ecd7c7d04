//! Long-running processes (netd and friends) inside a namespace, with a log file.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::NsRef;
use crate::util::{install_hint, poll_until};

/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lines of log shown when a guard is dropped during a panic.
const LOG_TAIL_LINES: usize = 200;

/// Path of the netd binary under test, from `NETD_BIN`. Panics if unusable.
pub fn netd_bin() -> PathBuf {
    let Some(path) = std::env::var_os("NETD_BIN") else {
        panic!(
            "NETD_BIN is not set: build netd first and export NETD_BIN=/abs/path/to/netd \
             (e.g. NETD_BIN=$PWD/target/debug/netd)"
        );
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        panic!(
            "NETD_BIN={} does not exist or is not a file",
            path.display()
        );
    }
    path
}

/// A child process killed on drop: SIGTERM, then SIGKILL after [`STOP_GRACE`].
///
/// Stdout and stderr both go to one log file. When dropped while the thread
/// is panicking, the log tail is printed to stderr for context.
#[derive(Debug)]
pub struct Daemon {
    label: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
    dump_on_panic: bool,
}

impl Daemon {
    /// Spawns `program args…` inside `ns`, logging to `log` (appended).
    pub fn start<I, S>(ns: &NsRef, program: impl AsRef<OsStr>, args: I, log: &Path) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = ns.command(program.as_ref());
        cmd.args(args);
        let label = format!("{} in {}", program.as_ref().to_string_lossy(), ns.name());
        Self::spawn(cmd, label, log)
    }

    /// Spawns a prepared command (e.g. from [`NsRef::command`] with env set).
    pub fn spawn(mut cmd: Command, label: impl Into<String>, log: &Path) -> Self {
        let label = label.into();
        let out = open_log(log);
        let err = out.try_clone().expect("clone log fd");
        // Own process group: signals to the test's group do not reach it.
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}{}", install_hint(&cmd)));
        Self {
            label,
            child,
            log: log.to_path_buf(),
            status: None,
            dump_on_panic: true,
        }
    }

    /// Whether dropping during a panic prints the log tail (default: yes).
    pub fn dump_log_on_panic(&mut self, yes: bool) {
        self.dump_on_panic = yes;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Exit status if it has exited (reaps it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited unexpectedly ({status}); log:\n{}",
                self.label,
                self.log()
            );
        }
    }

    /// Sends `sig` if still running.
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || !self.is_running());
        self.exit_status()
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_exit(STOP_GRACE) {
            return status;
        }
        eprintln!("{} ignored SIGTERM for {STOP_GRACE:?}; killing", self.label);
        self.kill()
    }

    /// SIGKILL right away (simulates a crash). Returns the exit status.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        let status = self.child.wait().expect("wait");
        self.status = Some(status);
        status
    }

    /// Waits until the log contains `needle`; panics with the log on timeout
    /// or if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        poll_until(timeout, || {
            self.log().contains(needle) || !self.is_running()
        });
        if self.log().contains(needle) {
            return;
        }
        let why = match self.exit_status() {
            Some(status) => format!("it exited ({status})"),
            None => format!("timed out after {timeout:?}"),
        };
        panic!(
            "{}: {why} before logging {needle:?}; log:\n{}",
            self.label,
            self.log()
        );
    }

    fn print_log_tail(&self) {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        eprintln!(
            "===== {} log ({}) =====\n{}\n===== end of {} log =====",
            self.label,
            self.log.display(),
            tail.join("\n"),
            self.label
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
        if self.dump_on_panic && std::thread::panicking() {
            self.print_log_tail();
        }
    }
}

fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}
