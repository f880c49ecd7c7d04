//! `ping` running in the background while a test breaks and repairs
//! things: which echo requests went unanswered, and when replies came.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::netns::NsRef;
use crate::poll_until;

/// `ping -D -i 0.01 -c COUNT` running in a namespace, output to a file;
/// killed on drop.
pub struct PingRun {
    child: Child,
    out: tempfile::NamedTempFile,
    what: String,
}

/// What a finished [`PingRun`] saw.
#[derive(Debug)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    /// Sequence numbers (1-based) without a reply.
    pub missing: Vec<u32>,
    /// ping's stdout and stderr.
    pub output: String,
}

impl PingResult {
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }
}

impl PingRun {
    /// Starts `count` echo requests from `from` to `ip`, 10 ms apart, each
    /// waiting at most `reply_wait` seconds for its reply.
    pub fn start(from: &NsRef, ip: Ipv4Addr, count: u32, reply_wait: u32) -> Self {
        let out = tempfile::NamedTempFile::new().expect("ping output file");
        let stdout = out.reopen().expect("reopen ping output");
        let stderr = stdout.try_clone().expect("clone ping output fd");
        let child = from
            .command("ping")
            .args(["-n", "-D", "-W"])
            .arg(reply_wait.to_string())
            .args(["-i", "0.01", "-c"])
            .arg(count.to_string())
            .arg(ip.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ping (install iputils-ping): {e}"));
        PingRun {
            child,
            out,
            what: format!("ping {ip} from {}", from.name()),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait ping").is_none()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }

    /// Unix times (`-D`) of the replies so far.
    pub fn replies(&self) -> Vec<f64> {
        self.output()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect()
    }

    /// Waits for ping to finish (at most `timeout`) and parses its output.
    pub fn finish(mut self, timeout: Duration) -> PingResult {
        let done = poll_until(timeout, || !self.is_running());
        let output = self.output();
        assert!(
            done,
            "{} still running after {timeout:?}:\n{output}",
            self.what
        );
        let summary = output
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("{}: no summary in its output:\n{output}", self.what));
        let mut fields = summary
            .split(',')
            .map(|f| f.split_whitespace().next().and_then(|n| n.parse().ok()));
        let transmitted: u32 = fields.next().flatten().expect("transmitted count");
        let received: u32 = fields.next().flatten().expect("received count");
        let answered: BTreeSet<u32> = output
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                let seq = l.split("icmp_seq=").nth(1)?;
                seq.split_whitespace().next()?.parse().ok()
            })
            .collect();
        let missing = (1..=transmitted)
            .filter(|s| !answered.contains(s))
            .collect();
        PingResult {
            transmitted,
            received,
            missing,
            output,
        }
    }
}

impl Drop for PingRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
