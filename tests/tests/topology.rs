//! Smoke test of the simulated cluster itself (no netd involved).

use std::path::{Path, PathBuf};

use netd_tests::{SWITCH_IP, Topology, ping, require_root};

#[test]
fn two_hosts_share_an_underlay_and_reach_etcd() {
    require_root();
    let topo = Topology::new(2);
    let (h0, h1) = (topo.host(0), topo.host(1));

    assert!(
        ping(h0.ns(), h1.ip(), 3),
        "host 0 cannot ping host 1 at {}",
        h1.ip()
    );
    assert!(
        ping(h1.ns(), SWITCH_IP, 1),
        "host 1 cannot reach the switch"
    );

    // Through host 1's own path to 198.18.0.254:2379.
    let etcd = topo.etcd();
    let put = etcd.etcdctl_in(h1.ns(), &["put", "/smoke/key", "hello"]);
    assert!(put.status.success(), "put from host 1: {put:?}");
    let got = etcd.etcdctl_in(h1.ns(), &["get", "--print-value-only", "/smoke/key"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "hello");
    assert_eq!(etcd.get("/smoke/key").as_deref(), Some("hello"));

    let namespaces = topo.namespace_names();
    let dirs: Vec<PathBuf> = topo
        .hosts()
        .iter()
        .flat_map(|h| [h.pin_path().to_path_buf(), h.run_dir().to_path_buf()])
        .collect();
    assert!(
        dirs.iter().all(|d| d.is_dir()),
        "missing pin or run dir: {dirs:?}"
    );
    let container = topo.add_container(1);
    let container_name = container.name().to_string();

    drop(topo);

    for name in namespaces.iter().chain([&container_name]) {
        let path = Path::new("/run/netns").join(name);
        assert!(!path.exists(), "{} survived the topology", path.display());
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} survived the topology", dir.display());
    }
    drop(container); // Already deleted; must not panic.
}
