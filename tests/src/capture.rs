//! Packet captures with tshark inside a namespace, and decoding them.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::netns::NsRef;
use crate::util::{output_text, poll_until};

/// UDP port netd's VXLAN uses; decoded as VXLAN by [`decode`].
pub const VXLAN_PORT: u16 = 8472;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_GRACE: Duration = Duration::from_millis(600);

/// A running `tshark -i IFACE -w FILE -f FILTER`; stopped on drop.
#[derive(Debug)]
pub struct Capture {
    label: String,
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    file: PathBuf,
    // Holds `file`; removed on drop.
    _dir: TempDir,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` with BPF capture `filter` (may be
    /// empty) and returns once tshark reports it is capturing.
    pub fn start(ns: &NsRef, iface: &str, filter: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("netd-capture-")
            .tempdir()
            .expect("create capture dir");
        let file = dir.path().join(format!("{}-{iface}.pcapng", ns.name()));
        let label = format!("capture on {iface} in {}", ns.name());
        let mut child = spawn_tshark(ns, iface, filter, &file, &label);
        let stderr = collect_stderr(&mut child);
        let mut capture = Self {
            label,
            child: Some(child),
            stderr,
            file,
            _dir: dir,
        };
        capture.wait_capturing();
        capture
    }

    /// The capture file (complete only after [`Capture::stop`]).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Stops tshark and waits until the file is flushed. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // libpcap hands packets over in blocks retired after a 250 ms
        // timeout; packets in an unretired block are lost on SIGINT.
        thread::sleep(FLUSH_GRACE);
        // Signal the group: tshark's dumpcap child must flush too.
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let exited = poll_until(STOP_TIMEOUT, || child.try_wait().ok().flatten().is_some());
        if !exited {
            eprintln!("{} ignored SIGINT; killing", self.label);
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Stops the capture and decodes it: one row per packet, see [`decode`].
    pub fn rows(&mut self, fields: &[&str]) -> Vec<Vec<String>> {
        self.rows_matching("", fields)
    }

    /// Like [`Capture::rows`], only packets matching a display filter
    /// (e.g. `"vxlan && icmp"`; empty for all).
    pub fn rows_matching(&mut self, display_filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
        self.stop();
        decode(&self.file, display_filter, fields)
    }

    /// Copies the capture (after stopping) to `dest`, e.g. to keep it for a
    /// failing test.
    pub fn save(&mut self, dest: &Path) {
        self.stop();
        std::fs::copy(&self.file, dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", self.file.display(), dest.display()));
    }

    fn wait_capturing(&mut self) {
        let child = self.child.as_mut().expect("running");
        let stderr = self.stderr.clone();
        let mut exited = false;
        let ok = poll_until(START_TIMEOUT, || {
            exited = child.try_wait().ok().flatten().is_some();
            exited || stderr.lock().unwrap().contains("Capturing on")
        });
        if !ok || exited {
            let why = if exited { "tshark exited" } else { "timed out" };
            panic!(
                "{}: {why}; stderr:\n{}",
                self.label,
                self.stderr.lock().unwrap()
            );
        }
        // tshark says "Capturing on" a little before its socket sees
        // packets: without a margin the first packets of a burst are lost.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_tshark(ns: &NsRef, iface: &str, filter: &str, file: &Path, label: &str) -> Child {
    let mut cmd = ns.command("tshark");
    cmd.args(["-n", "-i", iface, "-w"]).arg(file);
    if !filter.is_empty() {
        cmd.args(["-f", filter]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{label}: cannot run tshark (install tshark): {e}"))
}

/// Accumulates the child's stderr in the background.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let pipe = child.stderr.take().expect("piped stderr");
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    text
}

/// Decodes a capture with tshark (UDP 8472 as VXLAN), returning one row per
/// packet and one column per field in `fields`.
///
/// Fields present several times in a packet (e.g. `ip.src` in a VXLAN frame:
/// outer, then inner) are joined with commas: `"198.18.0.1,10.244.1.2"`.
/// Missing fields are empty strings. `display_filter` may be empty.
pub fn decode(file: &Path, display_filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let out = decode_command(file, display_filter, fields)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tshark (install tshark): {e}"));
    if !out.status.success() {
        panic!(
            "tshark decode of {} failed ({}):\n{}",
            file.display(),
            out.status,
            output_text(&out)
        );
    }
    parse_rows(&String::from_utf8_lossy(&out.stdout), fields.len())
}

fn decode_command(file: &Path, display_filter: &str, fields: &[&str]) -> Command {
    let mut cmd = Command::new("tshark");
    cmd.arg("-n").arg("-r").arg(file);
    cmd.args(["-d", &format!("udp.port=={VXLAN_PORT},vxlan")]);
    if !display_filter.is_empty() {
        cmd.args(["-Y", display_filter]);
    }
    cmd.args(["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]);
    cmd.args(["-E", "aggregator=,"]);
    for field in fields {
        cmd.args(["-e", field]);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Splits tshark's tab-separated field output into rows of `columns` cells.
pub(crate) fn parse_rows(text: &str, columns: usize) -> Vec<Vec<String>> {
    text.lines()
        .map(|line| {
            let mut row: Vec<String> = line.split('\t').map(str::to_string).collect();
            row.resize(columns.max(1), String::new());
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_field_rows() {
        let text = "198.18.0.1,10.244.1.2\t42\n\t\n198.18.0.2\n";
        assert_eq!(
            parse_rows(text, 2),
            vec![
                vec!["198.18.0.1,10.244.1.2".to_string(), "42".into()],
                vec![String::new(), String::new()],
                vec!["198.18.0.2".into(), String::new()],
            ]
        );
        assert!(parse_rows("", 3).is_empty());
    }
}
