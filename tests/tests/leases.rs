//! Subnet leases over the life of a cluster: hosts joining late, leaving
//! (lease expiry and revocation), racing for subnets at start-up, restarting
//! (gracefully and after a crash) and ignoring garbage in etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netd_tests::cluster::{NETWORK, PREFIX};
use netd_tests::lease::{lease_key, lease_value};
use netd_tests::{Cluster, ping, poll_until, require_root, wait_for};

/// How long a host may take to see a change in etcd (watch-driven).
const SYNC: Duration = Duration::from_secs(5);

fn subnets_prefix() -> String {
    format!("{PREFIX}/subnets/")
}

/// `10.244.7.0/24` → `10.244.7.1/24`, as NETD_SUBNET carries it.
fn gateway_cidr(subnet: &str) -> String {
    let (net, len) = subnet.split_once('/').expect("subnet has a length");
    let mut octets = net.parse::<Ipv4Addr>().expect("subnet address").octets();
    octets[3] += 1;
    format!("{}/{len}", Ipv4Addr::from(octets))
}

/// The variables of host `i`'s subnet.env.
fn subnet_env(cluster: &Cluster, i: usize) -> BTreeMap<String, String> {
    let path = cluster.host(i).run_dir().join("subnet.env");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asserts host `i`'s subnet.env describes `subnet` in the cluster network.
fn assert_subnet_env(cluster: &Cluster, i: usize, subnet: &str) {
    let env = subnet_env(cluster, i);
    assert_eq!(
        env.get("NETD_NETWORK").map(String::as_str),
        Some(NETWORK),
        "host {i}: {env:?}"
    );
    assert_eq!(
        env.get("NETD_SUBNET"),
        Some(&gateway_cidr(subnet)),
        "host {i} subnet.env does not match its lease {subnet}: {env:?}"
    );
    assert_eq!(
        env.get("NETD_MTU").map(String::as_str),
        Some("1450"),
        "host {i}: {env:?}"
    );
}

/// Waits until every host in `hosts` has exactly the other hosts' leases in
/// its kernel map; returns how long that took.
fn wait_all_match_etcd(cluster: &Cluster, hosts: &[usize], timeout: Duration) -> Duration {
    let started = Instant::now();
    for &i in hosts {
        let left = timeout.saturating_sub(started.elapsed());
        cluster.wait_peers_match_etcd(i, left.max(Duration::from_millis(100)));
    }
    started.elapsed()
}

/// Lines of `log` that reject the lease whose key suffix is `key`.
fn rejection_lines<'a>(log: &'a str, key: &str) -> Vec<&'a str> {
    let needle = format!("key={key}");
    log.lines()
        .filter(|l| l.contains("ignoring lease"))
        .filter(|l| l.split_whitespace().any(|w| w == needle))
        .collect()
}

// 1. A host joining a running cluster.
#[test]
fn late_join_syncs_everywhere_and_traffic_flows() {
    require_root();
    let mut cluster = Cluster::new(3, "tc");
    cluster.start(0);
    cluster.start(1);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    cluster.assert_ping_both_ways(c0, c1);

    let joined = Instant::now();
    cluster.start(2);
    let c2 = cluster.attach(2);
    wait_all_match_etcd(&cluster, &[0, 1, 2], SYNC);
    eprintln!(
        "late join: all maps equal etcd {:?} after the new daemon started",
        joined.elapsed()
    );

    let leases = cluster.etcd_leases();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for i in 0..3 {
        let subnet = cluster.subnet(i);
        assert_eq!(
            leases.get(&subnet).map(String::as_str),
            Some(cluster.host(i).ip().to_string().as_str()),
            "host {i}'s lease {subnet} in etcd: {leases:?}"
        );
        let peers = cluster.peers(i);
        assert_eq!(peers.len(), 2, "host {i} peers: {peers:?}");
    }
    // The old hosts learnt the new one: its containers are reachable both ways.
    cluster.assert_ping_both_ways(c2, c0);
    cluster.assert_ping_both_ways(c2, c1);
    for i in 0..3 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}

// 2a. A host stops and its lease expires.
#[test]
fn leave_lease_expiry_removes_the_host_everywhere() {
    require_root();
    let mut cluster = Cluster::new(3, "tc");
    cluster.run_args(&["--lease-ttl", "4"]);
    for i in 0..3 {
        cluster.start(i);
    }
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    wait_all_match_etcd(&cluster, &[0, 1, 2], SYNC);
    assert_eq!(cluster.status(2)["state"]["lease_ttl"].as_i64(), Some(4));
    let gone = cluster.subnet(2);
    let key = lease_key(&gone);
    let kv = cluster.topo.etcd().get_kv(&key).expect("host 2's lease");
    assert_ne!(kv.lease, 0, "host 2's key is not bound to an etcd lease");
    let ttl = cluster
        .topo
        .etcd()
        .lease_ttl(kv.lease)
        .expect("lease alive");
    assert!(ttl <= 4, "etcd lease TTL {ttl} > --lease-ttl 4");

    let status = cluster.stop(2);
    let stopped = Instant::now();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(status.code(), Some(0));
    assert!(
        cluster.daemon_log(2).contains("SIGTERM"),
        "{}",
        cluster.daemon_log(2)
    );
    // SIGTERM does not revoke: the lease is still there right after the stop.
    assert!(
        cluster.topo.etcd().get(&key).is_some(),
        "lease revoked on SIGTERM"
    );
    assert!(cluster.peers(0).contains_key(&gone));
    assert!(cluster.peers(1).contains_key(&gone));

    // Expiry: gone from etcd within the TTL (plus etcd's expiry granularity),
    // then from every remaining host's map.
    wait_for(
        "host 2's lease to expire in etcd",
        Duration::from_secs(10),
        || cluster.topo.etcd().get(&key).is_none(),
    );
    let expired_after = stopped.elapsed();
    assert!(
        expired_after >= Duration::from_secs(2),
        "lease vanished {expired_after:?} after SIGTERM: revoked rather than expired?"
    );
    for i in [0, 1] {
        wait_for(&format!("host {i} to forget {gone}"), SYNC, || {
            !cluster.peers(i).contains_key(&gone)
        });
    }
    eprintln!(
        "leave: lease expired {expired_after:?} after SIGTERM, maps cleaned {:?} after",
        stopped.elapsed()
    );
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    assert_eq!(cluster.etcd_leases().len(), 2);
    // The stopped host's own map is frozen, not torn down (pinned data path).
    assert!(!cluster.peers(2).is_empty());
    // Survivors still talk, and renew: their leases outlive several TTLs.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        cluster.etcd_leases().len(),
        2,
        "a live host's lease expired"
    );
    cluster.assert_ping_both_ways(c0, c1);
}

// 2b. A stopped host's lease is revoked by an operator: removal is prompt.
#[test]
fn leave_revoked_lease_is_removed_quickly() {
    require_root();
    // Default TTL (60 s): only the revocation can remove the lease in time.
    let mut cluster = Cluster::up(3, "tc");
    wait_all_match_etcd(&cluster, &[0, 1, 2], SYNC);
    let gone = cluster.subnet(1);
    let key = lease_key(&gone);
    let lease = cluster
        .topo
        .etcd()
        .get_kv(&key)
        .expect("host 1's lease")
        .lease;
    assert_eq!(lease, cluster.state_lease_id(1));

    let status = cluster.stop(1);
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        cluster.topo.etcd().get(&key).is_some(),
        "lease gone without revoke"
    );
    assert!(cluster.peers(0).contains_key(&gone));
    assert!(cluster.peers(2).contains_key(&gone));
    let status1 = cluster.status(1);
    assert_eq!(status1["daemon_running"], false, "{status1}");

    cluster.topo.etcd().lease_revoke(lease);
    let revoked = Instant::now();
    assert!(cluster.topo.etcd().get(&key).is_none());
    for i in [0, 2] {
        wait_for(
            &format!("host {i} to forget {gone}"),
            Duration::from_secs(2),
            || !cluster.peers(i).contains_key(&gone),
        );
    }
    eprintln!(
        "revoke: maps cleaned {:?} after lease revoke",
        revoked.elapsed()
    );
    wait_all_match_etcd(&cluster, &[0, 2], SYNC);
    assert_eq!(cluster.etcd_leases().len(), 2);
}

/// Spawns every daemon first, then waits for each: they race for subnets.
fn start_all_at_once(cluster: &mut Cluster) {
    let n = cluster.daemons.len();
    let spawned: Vec<_> = (0..n).map(|i| cluster.spawn(i)).collect();
    for (i, d) in spawned.into_iter().enumerate() {
        cluster.daemons[i] = Some(d);
    }
    for i in 0..n {
        cluster.wait_ready(i);
    }
}

/// Every host holds a distinct subnet, its own key in etcd bound to the
/// lease in its state, and a subnet.env that says the same.
fn assert_distinct_consistent_leases(cluster: &Cluster) -> BTreeSet<String> {
    let n = cluster.daemons.len();
    let kvs = cluster.topo.etcd().get_prefix(&subnets_prefix());
    let keys: BTreeSet<String> = kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys.len(), n, "keys in etcd: {keys:?}");
    let mut subnets = BTreeSet::new();
    for i in 0..n {
        let subnet = cluster.subnet(i);
        assert!(subnets.insert(subnet.clone()), "{subnet} held twice");
        let kv = kvs
            .iter()
            .find(|kv| kv.key == lease_key(&subnet))
            .unwrap_or_else(|| panic!("host {i}'s {subnet} not in etcd: {keys:?}"));
        assert_eq!(
            kv.value,
            lease_value(cluster.host(i).ip()),
            "host {i}'s lease"
        );
        assert_eq!(
            kv.lease,
            cluster.state_lease_id(i),
            "host {i}'s etcd lease id"
        );
        assert_subnet_env(cluster, i, &subnet);
    }
    subnets
}

// 3. Four daemons started at the same instant.
#[test]
fn concurrent_start_gives_distinct_subnets() {
    require_root();
    let mut cluster = Cluster::new(4, "tc");
    start_all_at_once(&mut cluster);
    let subnets = assert_distinct_consistent_leases(&cluster);
    eprintln!("concurrent start: {subnets:?}");
    wait_all_match_etcd(&cluster, &[0, 1, 2, 3], SYNC);
}

// 3b. The same race with exactly as many subnets as hosts: every host must
// win one, none may share.
#[test]
fn concurrent_start_with_exactly_enough_subnets() {
    require_root();
    let mut cluster = Cluster::new(4, "tc");
    let config = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.4.0","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
    cluster.topo.etcd().put(&format!("{PREFIX}/config"), config);
    start_all_at_once(&mut cluster);
    let subnets = assert_distinct_consistent_leases(&cluster);
    let all: BTreeSet<String> = (1..=4).map(|x| format!("10.244.{x}.0/24")).collect();
    assert_eq!(subnets, all);
    wait_all_match_etcd(&cluster, &[0, 1, 2, 3], SYNC);
    let races: usize = (0..4)
        .map(|i| cluster.daemon_log(i).matches("another host won").count())
        .sum();
    eprintln!("tight pool: {races} lost races");
}

/// While host `down`'s daemon is not running, a remote container still
/// reaches a container on it (and gets the replies back).
fn assert_data_path_survives(cluster: &mut Cluster, down: usize, local: usize, remote: usize) {
    assert!(!cluster.daemons[down].as_mut().unwrap().is_running());
    let status = cluster.status(down);
    assert_eq!(status["daemon_running"], false, "{status}");
    let before = cluster.counters(down);
    cluster.assert_ping_both_ways(remote, local);
    let after = cluster.counters(down);
    assert!(
        after["decapsulated"] >= before["decapsulated"] + 3,
        "host {down} did not decapsulate while down: {before:?} -> {after:?}"
    );
    assert!(after["encapsulated"] >= before["encapsulated"] + 3);
}

/// Restarts host `i` and checks it kept `subnet` on a fresh etcd lease.
fn restart_and_check_subnet(cluster: &mut Cluster, i: usize, subnet: &str, old_lease: i64) -> i64 {
    cluster.start(i);
    let lease = check_kept_subnet(cluster, i, subnet, old_lease);
    assert_eq!(cluster.etcd_leases().len(), cluster.daemons.len());
    lease
}

/// Host `i`, just restarted, holds `subnet` again on a new etcd lease.
fn check_kept_subnet(cluster: &Cluster, i: usize, subnet: &str, old_lease: i64) -> i64 {
    assert_eq!(
        cluster.subnet(i),
        subnet,
        "host {i} changed subnet on restart"
    );
    assert_subnet_env(cluster, i, subnet);
    let kv = cluster
        .topo
        .etcd()
        .get_kv(&lease_key(subnet))
        .expect("lease back in etcd");
    let lease = cluster.state_lease_id(i);
    assert_eq!(
        kv.lease, lease,
        "key bound to another lease than the state says"
    );
    assert_ne!(lease, old_lease, "restart reused the old etcd lease id");
    lease
}

// 4. SIGTERM and SIGKILL: the data path keeps forwarding, the subnet is kept.
#[test]
fn restart_keeps_subnet_and_data_path_survives() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    cluster.assert_ping_both_ways(c0, c1);
    let subnet = cluster.subnet(1);
    let lease = cluster.state_lease_id(1);

    // Graceful stop.
    let status = cluster.stop(1);
    assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
    assert_data_path_survives(&mut cluster, 1, c1, c0);
    let lease = restart_and_check_subnet(&mut cluster, 1, &subnet, lease);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    cluster.assert_ping_both_ways(c0, c1);

    // Crash.
    let status = cluster.daemons[1].as_mut().unwrap().kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    assert_data_path_survives(&mut cluster, 1, c1, c0);
    restart_and_check_subnet(&mut cluster, 1, &subnet, lease);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    cluster.assert_ping_both_ways(c0, c1);
    // Old etcd leases were not revoked by the restarts but hold no key.
    let keys = cluster.topo.etcd().get_prefix(&subnets_prefix());
    assert_eq!(keys.len(), 2, "{keys:?}");
}

// 4b. Down longer than the TTL: the lease expired, the recorded subnet is
// still free and is taken again.
#[test]
fn restart_after_lease_expired_reuses_recorded_subnet() {
    require_root();
    let mut cluster = Cluster::new(2, "tc");
    cluster.run_args(&["--lease-ttl", "3"]);
    cluster.start(0);
    cluster.start(1);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    let subnet = cluster.subnet(1);
    let lease = cluster.state_lease_id(1);
    assert_eq!(cluster.stop(1).code(), Some(0));
    let key = lease_key(&subnet);
    wait_for(
        "the stopped host's lease to expire",
        Duration::from_secs(10),
        || cluster.topo.etcd().get(&key).is_none(),
    );
    wait_for("host 0 to forget host 1", SYNC, || {
        cluster.peers(0).is_empty()
    });
    restart_and_check_subnet(&mut cluster, 1, &subnet, lease);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    cluster.assert_ping_both_ways(c0, c1);
}

/// Third octets of /24s in 10.244.0.0/16 no host holds, from 240 down.
fn free_octets(cluster: &Cluster, n: usize) -> Vec<u8> {
    let held: BTreeSet<String> = cluster.etcd_leases().into_keys().collect();
    (1..=254u8)
        .rev()
        .filter(|x| !held.contains(&format!("10.244.{x}.0/24")))
        .take(n)
        .collect()
}

// 5. Garbage and conflicting values under the subnets prefix.
#[test]
fn malformed_and_conflicting_leases_are_ignored() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    let (s0, s1) = (cluster.subnet(0), cluster.subnet(1));
    let (ip0, ip1) = (cluster.host(0).ip(), cluster.host(1).ip());
    let fake_ip: Ipv4Addr = "198.18.0.99".parse().unwrap();
    let x = free_octets(&cluster, 12);
    let k = |i: usize| format!("10.244.{}.0-24", x[i]);
    let valid = format!("10.244.{}.0/24", x[0]);

    let bad_backend = r#"{"PublicIP":"198.18.0.97","BackendType":"udp","BackendData":{"VNI":1,"VtepMAC":"0e:6e:c6:12:00:61"}}"#;
    let bad_mac = r#"{"PublicIP":"198.18.0.96","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"bogus"}}"#;
    let multicast_mac = r#"{"PublicIP":"198.18.0.95","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}}"#;
    let bad_ip = r#"{"PublicIP":"not-an-ip","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:6e:c6:12:00:5e"}}"#;
    let other = lease_value("198.18.0.98".parse().unwrap());
    // (key suffix, value, hosts that must ignore it)
    let invalid: Vec<(String, String, Vec<usize>)> = vec![
        (k(1), "{not json".into(), vec![0, 1]),
        (k(2), "{}".into(), vec![0, 1]),
        ("garbage".into(), other.clone(), vec![0, 1]),
        (format!("10.244.{}.7-24", x[3]), other.clone(), vec![0, 1]),
        ("10.245.1.0-24".into(), other.clone(), vec![0, 1]),
        (format!("10.244.{}.0-25", x[4]), other.clone(), vec![0, 1]),
        (
            format!("10.244.{}.0-23", x[5] & !1),
            other.clone(),
            vec![0, 1],
        ),
        ("10.244.0.0-24".into(), other.clone(), vec![0, 1]),
        (k(6), bad_backend.into(), vec![0, 1]),
        (k(7), bad_mac.into(), vec![0, 1]),
        (k(8), multicast_mac.into(), vec![0, 1]),
        (k(9), bad_ip.into(), vec![0, 1]),
        // Conflicts: a subnet claiming a real host's public IP is rejected by
        // that host (it is not its lease) but is a plain peer to the others.
        (k(10), lease_value(ip0), vec![0]),
        (k(11), lease_value(ip1), vec![1]),
    ];
    let etcd = cluster.topo.etcd();
    for (key, value, _) in &invalid {
        etcd.put(&format!("{}{key}", subnets_prefix()), value);
    }
    etcd.put(
        &format!("{}{}", subnets_prefix(), k(0)),
        &lease_value(fake_ip),
    );

    let sub = |key: &str| key.replacen('-', "/", 1);
    let want0: BTreeMap<String, String> = [
        (s1.clone(), ip1.to_string()),
        (valid.clone(), fake_ip.to_string()),
        (sub(&k(11)), ip1.to_string()),
    ]
    .into();
    let want1: BTreeMap<String, String> = [
        (s0.clone(), ip0.to_string()),
        (valid.clone(), fake_ip.to_string()),
        (sub(&k(10)), ip0.to_string()),
    ]
    .into();
    for (i, want) in [(0, &want0), (1, &want1)] {
        let ok = poll_until(SYNC, || cluster.peers(i) == *want);
        assert!(
            ok,
            "host {i} peers {:?}, want {want:?}; log:\n{}",
            cluster.peers(i),
            cluster.daemon_log(i)
        );
    }
    // The valid fake peer is programmed with its VTEP MAC.
    let status0 = cluster.status(0);
    let fake = status0["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["subnet"] == valid.as_str())
        .expect("fake peer in status");
    assert_eq!(fake["vtep_mac"], "0e:6e:c6:12:00:63", "{fake}");
    assert_eq!(fake["mode"], "vxlan", "{fake}");

    // Each invalid key is logged, once, by each host that must ignore it.
    wait_for("rejections to be logged", SYNC, || {
        invalid.iter().all(|(key, _, hosts)| {
            hosts
                .iter()
                .all(|&i| !rejection_lines(&cluster.daemon_log(i), key).is_empty())
        })
    });
    for i in [0, 1] {
        let log = cluster.daemon_log(i);
        for (key, _, hosts) in &invalid {
            let lines = rejection_lines(&log, key);
            let want = usize::from(hosts.contains(&i));
            assert_eq!(lines.len(), want, "host {i}, key {key}: {lines:#?}");
            if want == 1 {
                assert!(lines[0].contains("WARN"), "{}", lines[0]);
            }
        }
        assert!(
            rejection_lines(&log, &k(0)).is_empty(),
            "valid lease rejected by host {i}"
        );
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }

    // Real containers are unaffected.
    cluster.assert_ping_both_ways(c0, c1);

    // Deleting the garbage changes nothing; deleting the fake peer removes it.
    for (key, _, _) in &invalid {
        cluster
            .topo
            .etcd()
            .del(&format!("{}{key}", subnets_prefix()));
    }
    cluster
        .topo
        .etcd()
        .del(&format!("{}{}", subnets_prefix(), k(0)));
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    assert_eq!(cluster.peers(0).len(), 1);
    assert_eq!(cluster.peers(1).len(), 1);
    assert!(ping(
        &cluster.container(c0).ns.handle(),
        cluster.container(c1).ip,
        2
    ));
}

// 5b. A conflicting lease claiming a host's public IP exists when that host
// restarts: the host keeps its own subnet rather than adopting the impostor.
#[test]
fn restart_ignores_an_impostor_lease_with_our_public_ip() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    wait_all_match_etcd(&cluster, &[0, 1], SYNC);
    let subnet = cluster.subnet(1);
    let lease = cluster.state_lease_id(1);
    // Impostors whose keys sort before and after the real one (etcd lists
    // keys in byte order).
    let impostors = impostor_keys(&cluster, &subnet);
    let etcd = cluster.topo.etcd();
    for key in &impostors {
        etcd.put(&lease_key(key), &lease_value(cluster.host(1).ip()));
    }
    // While running, host 1 already refuses them as peers.
    wait_for("host 1 to reject the impostors", SYNC, || {
        let log = cluster.daemon_log(1);
        impostors
            .iter()
            .all(|k| !rejection_lines(&log, &k.replacen('/', "-", 1)).is_empty())
    });
    assert_eq!(cluster.stop(1).code(), Some(0));
    cluster.start(1);
    let got = cluster.subnet(1);
    if got != subnet {
        let acquired: Vec<String> = cluster
            .daemon_log(1)
            .lines()
            .filter(|l| l.contains("subnet lease acquired"))
            .map(str::to_string)
            .collect();
        let kvs: Vec<String> = cluster
            .topo
            .etcd()
            .get_prefix(&subnets_prefix())
            .iter()
            .map(|kv| format!("{} lease={:x} {}", kv.key, kv.lease, kv.value))
            .collect();
        panic!(
            "host 1 held {subnet} (recorded in its subnet.env, lease still alive) but \
             after a restart took {got}, an impostor claiming its public IP;\n\
             acquisitions:\n{}\netcd:\n{}",
            acquired.join("\n"),
            kvs.join("\n")
        );
    }
    check_kept_subnet(&cluster, 1, &subnet, lease);
    for key in &impostors {
        assert!(
            cluster
                .topo
                .etcd()
                .get_kv(&lease_key(key))
                .is_some_and(|kv| kv.lease == 0),
            "impostor {key} was taken over"
        );
        assert!(!cluster.peers(1).contains_key(key.as_str()));
    }
    cluster.assert_ping_both_ways(c0, c1);
}

/// Free subnets whose etcd keys sort first and last, around `subnet`'s.
fn impostor_keys(cluster: &Cluster, subnet: &str) -> Vec<String> {
    let held: BTreeSet<String> = cluster.etcd_leases().into_keys().collect();
    let own = lease_key(subnet);
    let free: Vec<String> = (1..=254u8)
        .map(|x| format!("10.244.{x}.0/24"))
        .filter(|s| !held.contains(s))
        .collect();
    let lo = free
        .iter()
        .filter(|s| lease_key(s) < own)
        .min_by_key(|s| lease_key(s));
    let hi = free
        .iter()
        .filter(|s| lease_key(s) > own)
        .max_by_key(|s| lease_key(s));
    lo.into_iter().chain(hi).cloned().collect()
}
