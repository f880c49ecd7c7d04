//! Small shared helpers: privilege checks, polling, command output.

use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

/// Panics unless running as root. Privileged tests must fail, not skip.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (network namespaces, veth, bpffs); \
             run it as root, e.g. `sudo -E cargo test -p netd-tests`"
        );
    }
}

/// Polls `cond` every 100 ms until it holds; panics naming `desc` after `timeout`.
pub fn wait_for(desc: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    if !poll_until(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {desc}");
    }
}

/// Polls `cond` every 100 ms; returns whether it held before `timeout`.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Stdout and stderr of `out`, labelled, for panic messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion; panics with its output unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}{}", install_hint(cmd)));
    if !out.status.success() {
        panic!("{cmd:?} failed ({}):\n{}", out.status, output_text(&out));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A hint naming the Debian package for the tools these tests rely on.
pub(crate) fn install_hint(cmd: &Command) -> &'static str {
    match cmd.get_program().to_str().unwrap_or("") {
        "ip" => " (install iproute2)",
        "etcd" => " (install etcd-server)",
        "etcdctl" => " (install etcd-client)",
        "ping" => " (install iputils-ping)",
        "tshark" => " (install tshark)",
        _ => "",
    }
}
