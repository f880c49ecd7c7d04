//! Checks of the test helpers themselves: namespaces, daemons, traffic,
//! captures and etcd, on a plain underlay without netd.

use std::net::SocketAddr;
use std::time::Duration;

use netd_tests::{NetNs, Topology, VXLAN_PORT, ping, require_root, tcp_transfer, wait_for};

fn underlay(hosts: usize) -> Topology {
    require_root();
    Topology::builder().hosts(hosts).etcd(false).build()
}

#[test]
fn threads_and_commands_run_inside_the_namespace() {
    require_root();
    let ns = NetNs::new();
    ns.run_ok(&[
        "ip", "link", "add", "probe0", "type", "veth", "peer", "probe1",
    ]);
    // /proc/thread-self/net reflects the calling thread's namespace.
    let dev = ns.run_in_thread(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
    assert!(
        dev.contains("probe0:"),
        "thread is not in the namespace:\n{dev}"
    );
    assert!(
        !dev.contains("eth0:"),
        "thread sees the root namespace:\n{dev}"
    );
    let links = ns.run_ok(&["ip", "-o", "link"]);
    assert!(
        links.contains("probe0") && !links.contains("eth0"),
        "{links}"
    );
}

#[test]
fn dropping_a_namespace_kills_its_processes() {
    require_root();
    let ns = NetNs::new();
    let mut child = ns.command("sleep").arg("1000").spawn().unwrap();
    wait_for(
        "sleep to appear in the namespace",
        Duration::from_secs(5),
        || ns.pids().contains(&(child.id() as i32)),
    );
    let path = ns.path();
    drop(ns);
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep was not killed: {status}");
    assert!(!path.exists());
}

#[test]
fn daemon_logs_and_stops_on_sigterm() {
    let topo = underlay(1);
    let script = "echo ready; trap 'echo bye; exit 0' TERM; while :; do sleep 0.1; done";
    let mut daemon = topo.host(0).start("sh", ["-c", script]);
    daemon.wait_for_log("ready", Duration::from_secs(5));
    daemon.assert_running();
    assert!(daemon.log_path().starts_with(topo.host(0).run_dir()));
    let status = daemon.stop();
    assert!(status.success(), "{status}; log:\n{}", daemon.log());
    assert!(daemon.log().contains("bye"), "{}", daemon.log());
}

#[test]
fn tcp_transfer_delivers_exact_bytes() {
    let topo = underlay(2);
    let (h0, h1) = (topo.host(0), topo.host(1));
    let dst = SocketAddr::new(h1.ip().into(), 5001);
    let t = tcp_transfer(h0.ns(), h1.ns(), dst, 4 << 20).expect("transfer");
    assert_eq!(t.bytes, 4 << 20);

    // Nobody listens on host 0's address: must fail, and fast.
    let wrong = SocketAddr::new(h0.ip().into(), 5002);
    let started = std::time::Instant::now();
    let err = tcp_transfer(h0.ns(), h1.ns(), wrong, 1000).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(format!("{err:#}").contains("connect"), "{err:#}");
}

#[test]
fn link_down_cuts_a_host_off() {
    let topo = underlay(2);
    let (h0, h1) = (topo.host(0), topo.host(1));
    assert!(ping(h0.ns(), h1.ip(), 1));
    topo.set_host_link(1, false);
    assert!(!ping(h0.ns(), h1.ip(), 1));
    topo.set_host_link(1, true);
    wait_for("host 1 reachable again", Duration::from_secs(5), || {
        ping(h0.ns(), h1.ip(), 1)
    });
}

/// Kernel VXLAN between two hosts stands in for netd's encapsulation.
fn kernel_vxlan(topo: &Topology, host: usize, peer: usize, inner: &str) {
    let h = topo.host(host);
    let (local, remote) = (h.ip().to_string(), topo.host(peer).ip().to_string());
    let port = VXLAN_PORT.to_string();
    h.ns().run_ok(&[
        "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "local", &local, "remote",
        &remote, "dstport", &port, "dev", "eth0",
    ]);
    h.ns().run_ok(&["ip", "addr", "add", inner, "dev", "vx0"]);
    h.ns().run_ok(&["ip", "link", "set", "vx0", "up"]);
}

#[test]
fn capture_decodes_vxlan_outer_and_inner_headers() {
    let topo = underlay(2);
    kernel_vxlan(&topo, 0, 1, "10.244.250.1/24");
    kernel_vxlan(&topo, 1, 0, "10.244.250.2/24");
    let mut cap = netd_tests::Capture::start(topo.host(0).ns(), "eth0", "udp port 8472");
    assert!(ping(topo.host(0).ns(), [10, 244, 250, 2], 3));
    let rows = cap.rows_matching("icmp", &["ip.src", "ip.dst", "vxlan.vni", "icmp.type"]);
    let request = vec![
        "198.18.0.1,10.244.250.1".to_string(),
        "198.18.0.2,10.244.250.2".into(),
        "42".into(),
        "8".into(),
    ];
    assert_eq!(
        rows.iter().filter(|r| **r == request).count(),
        3,
        "{rows:#?}"
    );
    assert_eq!(
        rows.len(),
        6,
        "3 requests and 3 replies expected: {rows:#?}"
    );
}

#[test]
fn etcd_helpers_leases_and_restart() {
    require_root();
    let mut topo = Topology::new(1);
    let etcd = topo.etcd();
    let lease = etcd.lease_grant(60);
    assert!(etcd.leases().contains(&lease));
    assert!(etcd.lease_ttl(lease).is_some_and(|t| t > 0 && t <= 60));
    etcd.put_with_lease("/t/a", "1", lease);
    etcd.put("/t/b", "2");
    let kvs = etcd.get_prefix("/t/");
    assert_eq!(kvs.len(), 2, "{kvs:?}");
    assert_eq!((kvs[0].key.as_str(), kvs[0].lease), ("/t/a", lease));

    etcd.lease_revoke(lease);
    assert_eq!(etcd.get("/t/a"), None);
    assert_eq!(etcd.lease_ttl(lease), None);

    topo.etcd_mut().stop();
    assert!(!topo.etcd().is_healthy());
    topo.etcd_mut().restart();
    assert_eq!(
        topo.etcd().get("/t/b").as_deref(),
        Some("2"),
        "data lost on restart"
    );
    assert_eq!(topo.etcd().del_prefix("/t/"), 1);
}
