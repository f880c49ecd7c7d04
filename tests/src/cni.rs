//! Calling the `netd-cni` plugin as a runtime does (environment in, config
//! on stdin, JSON out), and reading what it left in the kernel maps.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{Host, netd_bin};

/// The plugin under test: `NETD_CNI_BIN`, or `netd-cni` next to `NETD_BIN`.
pub fn cni_bin() -> PathBuf {
    let path = match std::env::var_os("NETD_CNI_BIN") {
        Some(p) => PathBuf::from(p),
        None => netd_bin().with_file_name("netd-cni"),
    };
    assert!(
        path.is_file(),
        "{} does not exist: build it with `cargo build --release -p netd` (or set NETD_CNI_BIN)",
        path.display()
    );
    path
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// Stdout as JSON; panics with the whole output if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The spec's error code, asserting a failure with error JSON.
    pub fn error_code(&self) -> u64 {
        assert!(!self.success, "expected a failure, got {:?}", self.stdout);
        let v = self.json();
        assert!(v["msg"].is_string(), "error JSON without msg: {v}");
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error JSON without code: {v}"))
    }

    /// Stdout as JSON of a success; panics with the output otherwise.
    pub fn ok(&self) -> Value {
        assert!(
            self.success,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
}

/// Runs the plugin in `host`'s namespace with exactly `env` (plus PATH) and
/// `stdin`.
pub fn cni(host: &Host, env: &[(&str, &str)], stdin: &str) -> CniOutput {
    let mut cmd: Command = host.ns().handle().command(cni_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning netd-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting for netd-cni");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "netd-cni panicked: {stderr}");
    CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// A netd-cni network config for `host`, with `extra` keys merged in.
pub fn netconf(host: &Host, version: &str, extra: Value) -> Value {
    let mut conf = json!({
        "cniVersion": version,
        "name": "netd-test",
        "type": "netd-cni",
        "runDir": host.run_dir(),
        "pinPath": host.pin_path(),
    });
    if let (Some(obj), Value::Object(extra)) = (conf.as_object_mut(), extra) {
        obj.extend(extra);
    }
    conf
}

/// The environment of a verb for container `id` in `netns`.
pub fn cni_env<'a>(
    command: &'static str,
    id: &'a str,
    netns: &'a str,
    ifname: &'a str,
) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ]
}

/// The ENDPOINTS map under `pin`: container address → host ifindex.
pub fn endpoint_map(pin: &Path) -> BTreeMap<Ipv4Addr, u64> {
    let path = pin.join(crate::layout_dir()).join("ENDPOINTS");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool: {e}"));
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    entries
        .iter()
        .filter_map(|e| {
            let e = e.get("formatted").unwrap_or(e);
            let key: Vec<u8> = e["key"]
                .as_array()
                .unwrap_or_else(|| panic!("key of {e}"))
                .iter()
                .map(|b| byte(b))
                .collect();
            let ip = Ipv4Addr::new(key[0], key[1], key[2], key[3]);
            // The host's own entry, its gateway (the /24's first address),
            // is there for host access, not for a container.
            if key[3] == 1 {
                return None;
            }
            let ifindex = e["value"]["ifindex"]
                .as_u64()
                .unwrap_or_else(|| panic!("ifindex of {e}"));
            Some((ip, ifindex))
        })
        .collect()
}

/// A byte as bpftool prints it: a number, or a hex string without BTF.
fn byte(v: &Value) -> u8 {
    match v {
        Value::Number(n) => n.as_u64().and_then(|b| u8::try_from(b).ok()).expect("byte"),
        Value::String(s) => u8::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex byte"),
        other => panic!("not a byte: {other}"),
    }
}

/// The records in `host`'s run directory, by id.
pub fn records(host: &Host) -> BTreeMap<String, Value> {
    let dir = host.run_dir().join("endpoints");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            if path.extension()? != "json" {
                return None;
            }
            let v: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            let id = v["id"].as_str().or(v["netns"].as_str())?.to_string();
            Some((id, v))
        })
        .collect()
}

/// Whether `iface` exists in `host`'s namespace.
pub fn host_link_exists(host: &Host, iface: &str) -> bool {
    host.ns()
        .exec(&["ip", "link", "show", "dev", iface])
        .status
        .success()
}
