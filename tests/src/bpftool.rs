//! Pinned maps and programs as bpftool reports them (bpffs is global, so
//! no namespace is needed).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn bpftool(args: &[&str], path: Option<&Path>) -> Output {
    let mut cmd = Command::new("bpftool");
    cmd.args(args);
    if let Some(path) = path {
        cmd.arg(path);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run bpftool (install bpftool): {e}"))
}

/// Every entry of the map pinned at `path` (`bpftool -j map dump pinned`).
pub fn map_dump(path: &Path) -> Vec<Value> {
    let out = bpftool(&["-j", "map", "dump", "pinned"], Some(path));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool map dump {} failed ({}): {text}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_str(&text) {
        Ok(Value::Array(entries)) => entries,
        other => panic!(
            "bpftool dump of {} is not a JSON array: {other:?}",
            path.display()
        ),
    }
}

/// Id of the program pinned at `path` (`bpftool prog show pinned`).
pub fn pinned_prog_id(path: &Path) -> u64 {
    let out = bpftool(&["-j", "prog", "show", "pinned"], Some(path));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool prog show pinned {}: {e}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id for {}: {v}", path.display()))
}

/// Whether a BPF program with this id still exists in the kernel.
pub fn prog_exists(id: u64) -> bool {
    bpftool(&["prog", "show", "id", &id.to_string()], None)
        .status
        .success()
}

/// Id of the map pinned at `path` (`bpftool map show pinned`).
pub fn pinned_map_id(path: &Path) -> u64 {
    let out = bpftool(&["-j", "map", "show", "pinned"], Some(path));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool map show pinned {}: {e}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id for {}: {v}", path.display()))
}
