//! The pin path must be on bpffs. Under `ip netns exec`, which remounts
//! /sys without the bpf filesystem, `netd run` stops with one error line
//! that names the cause and the way out (netd does not mount a bpffs of its
//! own there: it would vanish with that command's mount namespace).

use std::process::Command;

use netd_tests::{NetNs, netd_bin, require_root};

#[test]
fn run_under_ip_netns_exec_explains_the_hidden_bpffs() {
    require_root();
    let ns = NetNs::new();
    let run_dir = tempfile::tempdir().unwrap();
    let pin = format!("/sys/fs/bpf/{}", ns.name());
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(netd_bin())
        .args(["--run-dir"])
        .arg(run_dir.path())
        .args(["--pin-path", &pin, "run", "--iface", "lo"])
        .output()
        .expect("running ip netns exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "netd run succeeded without bpffs: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "netd panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got: {stderr}");
    for needle in [
        "/sys/fs/bpf is not on a bpf filesystem",
        "ip netns exec",
        "nsenter --net=",
    ] {
        assert!(
            errors[0].contains(needle),
            "error {:?} does not mention {needle:?}",
            errors[0]
        );
    }
}
