//! A real Prometheus server in a namespace, scraping one target, and its
//! query API. Storage lives in a temporary directory removed on drop; the
//! process is stopped on drop (and dies with its namespace).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::{Daemon, NsRef, http, wait_for};

/// Prometheus listens on the namespace's loopback only.
pub const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

pub struct Prometheus {
    ns: NsRef,
    // Stopped before its storage goes.
    _daemon: Daemon,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, scraping `target` every second, and
    /// waits until its API answers.
    pub fn start(ns: &NsRef, target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("prometheus temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(target)).expect("write prometheus.yml");
        let daemon = Daemon::start(
            ns,
            "prometheus",
            [
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address={LISTEN}"),
            ],
            &dir.path().join("prometheus.log"),
        );
        let prom = Prometheus {
            ns: ns.clone(),
            _daemon: daemon,
            _dir: dir,
        };
        wait_for("prometheus ready", Duration::from_secs(60), || {
            http::get(&prom.ns, LISTEN, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        prom
    }

    /// The value of an instant query that returns one sample, if any.
    pub fn query_one(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", encode(query));
        let response = http::get(&self.ns, LISTEN, &path).ok()?;
        let json: Value = serde_json::from_str(&response.body).ok()?;
        let result = json["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

fn scrape_config(target: SocketAddr) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: netd\n    static_configs:\n      - targets: ['{target}']\n"
    )
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    let mut out = String::new();
    for b in query.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Runs `promtool check metrics` on `text`; Ok or its complaints.
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e} (Debian package prometheus)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn encodes_queries() {
        assert_eq!(
            encode("netd_drop_count_total{reason=\"unknown_peer\"}"),
            "netd_drop_count_total%7Breason%3D%22unknown_peer%22%7D"
        );
    }
}
