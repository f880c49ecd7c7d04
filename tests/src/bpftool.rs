//! Pinned maps and programs as bpftool reports them (bpffs is global, so
//! no namespace is needed).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::NsRef;

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

/// What one `bpftool prog run` (BPF_PROG_TEST_RUN) of [`test_run`] gave.
pub struct TestRun {
    /// Whether bpftool succeeded (the kernel accepted the input).
    pub success: bool,
    /// bpftool's stdout and stderr, for messages and checks.
    pub text: String,
    /// The program's return value, if bpftool printed one.
    pub ret: Option<u32>,
    /// The packet as the program left it.
    pub data_out: Vec<u8>,
}

/// Runs the program pinned at `prog` once on `data`, in `ns`, with its
/// input and output files in `dir`. A TC program sees `ingress_ifindex` in
/// its `__sk_buff` when given.
pub fn test_run(
    ns: &NsRef,
    dir: &Path,
    prog: &Path,
    data: &[u8],
    ingress_ifindex: Option<u32>,
) -> TestRun {
    let (data_in, data_out, ctx_in) = (dir.join("in"), dir.join("out"), dir.join("ctx"));
    std::fs::write(&data_in, data).unwrap_or_else(|e| panic!("write {}: {e}", data_in.display()));
    let _ = std::fs::remove_file(&data_out);
    let (p, i, o, c) = (
        prog.display().to_string(),
        data_in.display().to_string(),
        data_out.display().to_string(),
        ctx_in.display().to_string(),
    );
    let mut args = vec![
        "bpftool",
        "prog",
        "run",
        "pinned",
        &p,
        "data_in",
        &i,
        "data_out",
        &o,
        "data_size_out",
        "4096",
    ];
    // struct __sk_buff up to ingress_ifindex (offset 36); the rest zero.
    if let Some(ifindex) = ingress_ifindex {
        let mut ctx = vec![0u8; 40];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        std::fs::write(&ctx_in, ctx).unwrap_or_else(|e| panic!("write {c}: {e}"));
        args.extend(["ctx_in", &c]);
    }
    args.extend(["repeat", "1"]);
    let out = ns.exec(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ret = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Return value: "))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|r| r.parse::<u32>().ok());
    TestRun {
        success: out.status.success(),
        text,
        ret,
        data_out: std::fs::read(&data_out).unwrap_or_default(),
    }
}

/// (`run_cnt`, `run_time_ns`) of the program pinned at `path`, as the
/// kernel accounts them while [`enable_run_time_stats`] holds stats on.
pub fn prog_run_stats(path: &Path) -> (u64, u64) {
    let out = bpftool(&["-j", "prog", "show", "pinned"], Some(path));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool prog show {}: {e}", path.display()));
    let field = |k: &str| v[k].as_u64().unwrap_or(0);
    (field("run_cnt"), field("run_time_ns"))
}

/// The kernel's run-time accounting (BPF_ENABLE_STATS), on while the
/// descriptor is open: closing it turns it off, no sysctl is left changed.
pub fn enable_run_time_stats() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let mut attr = [0u64; 16]; // type BPF_STATS_RUN_TIME (0)
    // SAFETY: `attr` is a zeroed bpf_attr of the size passed; the kernel
    // only reads it and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned, owned by no one else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}
