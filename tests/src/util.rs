//! Small shared helpers: privilege checks, polling, command output.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

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

/// Runs `cmd` to completion like `Command::output`, but kills it and panics
/// with what it printed if it takes longer than `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    // Own process group, so a timeout kills any children holding the pipes.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}{}", install_hint(cmd)));
    // Drain both pipes concurrently so a chatty child cannot block on them.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let finished = poll_until(timeout, || child.try_wait().ok().flatten().is_some());
    if !finished {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let status = child.wait().expect("wait");
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !finished {
        panic!(
            "{cmd:?} still running after {timeout:?}; killed:\n{}",
            output_text(&out)
        );
    }
    out
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_returns_output() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    #[should_panic(expected = "still running after")]
    fn output_within_kills_a_hung_command() {
        output_within(
            Command::new("sh").args(["-c", "echo started; sleep 30; echo never"]),
            Duration::from_millis(300),
        );
    }
}

/// `s` without ANSI escape sequences (the daemon's log may be coloured).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
