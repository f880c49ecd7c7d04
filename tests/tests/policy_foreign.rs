//! A flannel host's containers have one identity, the foreign identity,
//! written into the kernel's policy state: the identity trie holds this
//! cluster's endpoints and the gateway whatever the number of hosts, and
//! lease churn does not make the policy sync compile or apply anything.

use std::{net::Ipv4Addr, time::Duration};

use netd::datapath::{PinDir, policy_maps::PolicyMaps};
use netd::policy::identity::network_id;
use netd_tests::lease::{lease_key, lease_value};
use netd_tests::{Cluster, require_root, wait_for};

const CONVERGE: Duration = Duration::from_secs(20);
/// Leases of hosts that publish no endpoints (flannel hosts).
const FOREIGN_HOSTS: u8 = 100;
/// What the daemon logs each time it writes changed tables.
const APPLIED: &str = "policy tables applied";

fn applied_count(cluster: &Cluster, i: usize) -> usize {
    cluster.daemon_log(i).matches(APPLIED).count()
}

#[test]
fn identities_and_policy_sync_do_not_grow_with_the_hosts() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    let (ip_a, ip_b) = (cluster.container(a).ip, cluster.container(b).ip);
    let pin = PinDir::new(cluster.host(0).pin_path());
    let trie = |pin: &PinDir| PolicyMaps::open(pin).expect("policy maps").read().unwrap();
    wait_for("host 0's trie holds both endpoints", CONVERGE, || {
        let t = trie(&pin);
        [ip_a, ip_b]
            .iter()
            .all(|ip| t.identities.keys().any(|n| n.addr() == *ip))
    });
    let before = applied_count(&cluster, 0);
    assert!(before >= 1, "no apply logged: {}", cluster.daemon_log(0));

    // 100 more hosts' leases, in subnets the two daemons do not hold.
    let own = [cluster.subnet(0), cluster.subnet(1)];
    let etcd = cluster.topo.etcd();
    let lease = etcd.lease_grant(600);
    // 10.244.0.0/24 is not leasable (below SubnetMin).
    let subnets: Vec<String> = (1..=254u8)
        .map(|n| format!("10.244.{n}.0/24"))
        .filter(|s| !own.contains(s))
        .take(usize::from(FOREIGN_HOSTS))
        .collect();
    for (n, subnet) in subnets.iter().enumerate() {
        let public = Ipv4Addr::new(198, 18, 200, 10 + n as u8);
        etcd.put_with_lease(&lease_key(subnet), &lease_value(public), lease);
    }
    cluster.wait_peers_match_etcd(0, CONVERGE);
    assert_eq!(cluster.peers(0).len(), usize::from(FOREIGN_HOSTS) + 1);
    // The coalescing delay and a recheck, twice over.
    std::thread::sleep(Duration::from_secs(3));

    // The trie: the two endpoints and the gateway, all /32, no subnet.
    let t = trie(&pin);
    assert_eq!(t.identities.len(), 3, "{:?}", t.identities);
    assert!(
        t.identities.keys().all(|n| n.prefix_len() == 32),
        "{:?}",
        t.identities
    );
    // The foreign identity (network default, no labels) in the state.
    assert!(t.foreign_identity >= 256, "{}", t.foreign_identity);
    assert_eq!(t.foreign_network, network_id("default"));
    let status = cluster.status(0);
    let tables = &status["policy"]["tables"];
    assert_eq!(
        tables["foreign_identity"].as_u64(),
        Some(u64::from(t.foreign_identity))
    );
    // 100 new leases changed nothing the sync computes from.
    assert_eq!(
        applied_count(&cluster, 0),
        before,
        "lease churn made the policy sync apply: {}",
        cluster.daemon_log(0)
    );
    etcd.lease_revoke(lease);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    assert_eq!(applied_count(&cluster, 0), before);
}
