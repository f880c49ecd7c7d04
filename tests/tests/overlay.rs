//! Containers on different hosts reach each other over netd's VXLAN.

use std::time::Duration;

use netd_tests::{Cluster, ping, require_root};

#[test]
fn two_hosts_ping_tc() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, Duration::from_secs(5));
    cluster.wait_peers_match_etcd(1, Duration::from_secs(5));
    let (ca, cb) = (cluster.container(a), cluster.container(b));
    assert!(
        ping(&ca.ns.handle(), cb.ip, 3),
        "ping {} -> {}",
        ca.ip,
        cb.ip
    );
    assert!(cluster.counters(0)["encapsulated"] >= 3);
    assert!(cluster.counters(1)["decapsulated"] >= 3);
}
