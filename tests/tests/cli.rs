//! Bad input to the CLI: one clear error line and a non-zero exit, never a
//! panic.

use std::process::Output;

use netd_tests::{NetNs, netd_bin, require_root};

fn netd(ns: &NetNs, args: &[&str]) -> Output {
    ns.handle()
        .command(netd_bin())
        .args(args)
        .output()
        .expect("running netd")
}

/// Exactly one line on stderr, starting with "error:", and a failure exit.
fn assert_clear_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "netd panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    assert!(
        lines[0].contains(needle),
        "error {:?} does not mention {needle:?}",
        lines[0]
    );
}

#[test]
fn run_rejects_bad_input_clearly() {
    require_root();
    let ns = NetNs::new();
    let run_dir = tempfile::tempdir().unwrap();
    let run_dir = run_dir.path().to_str().unwrap();
    let pin = format!("/sys/fs/bpf/{}", ns.name());
    let base = ["--run-dir", run_dir, "--pin-path", pin.as_str(), "run"];

    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let call = |args: Vec<String>| netd(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>());

    assert_clear_error(&call(with(&["--decap", "ebpf"])), "ebpf");
    assert_clear_error(&call(with(&["--public-ip", "1.2.3"])), "1.2.3");
    assert_clear_error(
        &call(with(&["--iface", "nosuch0"])),
        "no interface named nosuch0",
    );
    // No default route in a fresh namespace: the underlay cannot be guessed.
    assert_clear_error(&call(with(&[])), "--iface");
    assert_clear_error(&call(with(&["--lease-ttl", "1"])), "lease-ttl");

    // A pin path outside bpffs.
    let out = netd(
        &ns,
        &[
            "--run-dir",
            run_dir,
            "--pin-path",
            run_dir,
            "run",
            "--iface",
            "lo",
        ],
    );
    assert_clear_error(&out, "bpf filesystem");

    // Without root.
    let out = ns
        .handle()
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(netd_bin())
        .args([
            "--run-dir",
            "/tmp",
            "--pin-path",
            pin.as_str(),
            "run",
            "--iface",
            "lo",
        ])
        .output()
        .unwrap();
    assert_clear_error(&out, "root");
    let _ = std::fs::remove_dir_all(&pin);
}

#[test]
fn attach_rejects_bad_input_clearly() {
    require_root();
    let ns = NetNs::new();
    let run_dir = tempfile::tempdir().unwrap();
    let run_dir = run_dir.path().to_str().unwrap();
    // No daemon has written subnet.env here.
    let out = netd(&ns, &["--run-dir", run_dir, "attach", ns.name()]);
    assert_clear_error(&out, "netd run");
    std::fs::write(
        format!("{run_dir}/subnet.env"),
        "NETD_NETWORK=10.244.0.0/16\nNETD_SUBNET=10.244.7.1/24\nNETD_MTU=1450\nNETD_IPMASQ=false\n",
    )
    .unwrap();
    let attach = |target: &str, ip: Option<&str>| {
        let mut args = vec!["--run-dir", run_dir, "attach", target];
        args.extend(ip.map(|ip| ["--ip", ip]).into_iter().flatten());
        netd(&ns, &args)
    };
    assert_clear_error(&attach("no-such-namespace", None), "does not exist");
    assert_clear_error(&attach(ns.name(), Some("10.244.8.2")), "10.244.8.2");
    assert_clear_error(&attach(ns.name(), Some("10.244.7.1")), "gateway");
    assert_clear_error(
        &netd(&ns, &["--run-dir", run_dir, "detach", ns.name()]),
        "not attached",
    );
    assert_clear_error(&netd(&ns, &["--run-dir", run_dir, "status"]), "netd run");
}
