//! etcd blips around the re-acquisition of a lease: the daemon must keep
//! running and forwarding, take back the *same* subnet once etcd answers,
//! and never create another subnet key.
//!
//! 1. etcd stopped for longer than the lease TTL: each daemon counts its
//!    lease as lost and starts taking it back while etcd is still down;
//!    etcd is restarted while that runs.
//! 2. A host cut off etcd until its lease expires there (etcd up, so the
//!    key is really gone), then etcd stopped while the host takes its
//!    subnet back, and restarted.
//!
//! The figures (pings lost, time to take the subnet back) are printed
//! (`--nocapture`).

// Hosts are numbered; loops over them index per-host arrays.
#![allow(clippy::needless_range_loop)]

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use netd_tests::cluster::PREFIX;
use netd_tests::lease::lease_key;
use netd_tests::ping_run::PingRun;
use netd_tests::{Cluster, Etcd, require_root, strip_ansi, wait_for};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);
/// Once etcd is back, the subnet must be held again within this.
const RESTORE: Duration = Duration::from_secs(15);

/// etcd's current revision.
fn revision(etcd: &Etcd) -> i64 {
    let out = etcd.etcdctl_ok(&["-w", "json", "get", "--", "/netd-blip/none"]);
    let v: Value = serde_json::from_str(&out).expect("etcdctl json");
    v["header"]["revision"].as_i64().expect("header.revision")
}

/// Every subnet key put since `rev`, from etcd's history (a watch from
/// that revision replays every event; tests never compact).
fn subnet_keys_put_since(etcd: &Etcd, rev: i64) -> BTreeSet<String> {
    let endpoint = etcd.endpoint();
    let from = format!("--rev={rev}");
    let prefix = format!("{PREFIX}/subnets/");
    let out = etcd
        .ns()
        .command("timeout")
        .args([
            "3",
            "etcdctl",
            "--endpoints",
            &endpoint,
            "watch",
            "--prefix",
        ])
        .args([from.as_str(), prefix.as_str()])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("run etcdctl watch");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PUT"),
        "etcdctl watch from revision {rev} replayed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "PUT")
        .map(|w| w[1].to_string())
        .collect()
}

fn state(cluster: &Cluster, i: usize) -> Value {
    cluster.status(i)["state"].clone()
}

fn lease_lost(cluster: &Cluster, i: usize) -> bool {
    state(cluster, i)["lease_lost_since"].is_u64()
}

fn etcd_reachable(cluster: &Cluster, i: usize) -> bool {
    state(cluster, i)["etcd"]["reachable"]
        .as_bool()
        .expect("state.etcd.reachable")
}

/// Host `i` holds `subnet`: the key carries its IP and is bound to the
/// live etcd lease its state names, and it is no longer re-acquiring.
fn holds(cluster: &Cluster, i: usize, subnet: &str) -> bool {
    let s = state(cluster, i);
    let Some(kv) = cluster.topo.etcd().get_kv(&lease_key(subnet)) else {
        return false;
    };
    let value: Value = serde_json::from_str(&kv.value).unwrap_or_default();
    s["subnet"].as_str() == Some(subnet)
        && !s["lease_lost_since"].is_u64()
        && value["PublicIP"].as_str() == Some(cluster.host(i).ip().to_string().as_str())
        && s["lease_id"].as_i64() == Some(kv.lease)
        && cluster.topo.etcd().lease_ttl(kv.lease).is_some()
}

fn daemon_log(cluster: &Cluster, i: usize) -> String {
    strip_ansi(&cluster.daemons[i].as_ref().expect("daemon").log())
}

fn retries_logged(cluster: &Cluster, i: usize) -> usize {
    daemon_log(cluster, i)
        .lines()
        .filter(|l| l.contains("taking the subnet back:") && l.contains("retrying in"))
        .count()
}

/// Restarts etcd and waits for each host to hold its subnet again; returns
/// when etcd was restarted and how long that took.
fn restart_etcd_until_held(cluster: &mut Cluster, subnets: &[String; 2]) -> (Instant, Duration) {
    cluster.topo.etcd_mut().restart();
    let restarted = Instant::now();
    for i in 0..2 {
        wait_for(
            &format!("host {i} to hold {} again", subnets[i]),
            RESTORE,
            || holds(cluster, i, &subnets[i]),
        );
    }
    (restarted, restarted.elapsed())
}

/// Two hosts with `--lease-ttl ttl` and a container each, converged.
fn cluster(ttl: u64) -> (Cluster, usize, usize, [String; 2], i64) {
    let mut cluster = Cluster::new(2, "tc");
    let rev = revision(cluster.topo.etcd());
    cluster.run_args(&["--lease-ttl", &ttl.to_string()]);
    let (c0, c1) = cluster.start_pair(CONVERGE);
    let subnets = [cluster.subnet(0), cluster.subnet(1)];
    (cluster, c0, c1, subnets, rev)
}

fn assert_only_own_keys(cluster: &Cluster, rev: i64, subnets: &[String; 2]) {
    let put = subnet_keys_put_since(cluster.topo.etcd(), rev);
    let want: BTreeSet<String> = subnets.iter().map(|s| lease_key(s)).collect();
    assert_eq!(put, want, "subnet keys written since the hosts started");
}

// 1. etcd stopped past the TTL, restarted while re-acquisition runs.
#[test]
fn etcd_restarted_while_the_lease_is_taken_back() {
    require_root();
    const TTL: u64 = 4;
    let (mut cluster, c0, c1, subnets, rev) = cluster(TTL);
    let (from, to) = (cluster.container(c0), cluster.container(c1));
    // 25 s at the nominal rate: the outage and the recovery fit in it.
    let ping = PingRun::start(&from.ns.handle(), to.ip, 2500, 2);
    thread::sleep(Duration::from_millis(300));

    cluster.topo.etcd_mut().stop();
    let stopped = Instant::now();
    for i in 0..2 {
        wait_for(
            &format!("host {i} to count its lease as lost and take it back"),
            Duration::from_secs(TTL * 4),
            || lease_lost(&cluster, i) && !etcd_reachable(&cluster, i),
        );
    }
    let noticed = stopped.elapsed();
    // Let re-acquisition fail against the stopped etcd a few times.
    wait_for("retries logged while etcd is stopped", CONVERGE, || {
        (0..2).all(|i| retries_logged(&cluster, i) >= 2)
    });
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }

    let (restarted, restored) = restart_etcd_until_held(&mut cluster, &subnets);
    let result = ping.finish(Duration::from_secs(60));
    let (sent, received) = (result.transmitted, result.received);
    let lost = sent - received;
    eprintln!(
        "etcd stopped {:?} (TTL {TTL} s): lease counted lost after {noticed:?}, \
         held again {restored:?} after etcd's restart; pings {sent} sent, {lost} lost",
        restarted - stopped
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
        assert!(
            etcd_reachable(&cluster, i),
            "host {i} etcd still unreachable"
        );
    }
    // The kernel kept forwarding throughout: both maps kept each other.
    assert!(sent > 0 && lost <= 10, "{lost} of {sent} pings lost");
    assert_only_own_keys(&cluster, rev, &subnets);
    // Renewed, not just carried by etcd's restart: still held a TTL later.
    thread::sleep(Duration::from_secs(TTL + 1));
    for i in 0..2 {
        assert!(
            holds(&cluster, i, &subnets[i]),
            "host {i} lost its lease again"
        );
    }
    cluster.assert_ping_both_ways(c0, c1);
}

// 2. The lease expired in etcd (host cut off), then etcd stopped while the
// host takes its subnet back: re-acquisition runs against a stopped etcd,
// and completes with the same subnet once etcd is back.
#[test]
fn etcd_stopped_while_an_expired_lease_is_taken_back() {
    require_root();
    const TTL: u64 = 4;
    let (mut cluster, c0, c1, subnets, rev) = cluster(TTL);
    let key = lease_key(&subnets[1]);

    cluster.partition_from_etcd(1, true);
    wait_for(
        "host 1's lease to expire in etcd while host 1 takes it back",
        CONVERGE,
        || cluster.topo.etcd().get(&key).is_none() && lease_lost(&cluster, 1),
    );
    cluster.topo.etcd_mut().stop();
    let before = retries_logged(&cluster, 1);
    cluster.partition_from_etcd(1, false);
    // Host 1 now reaches etcd's address, where nothing listens.
    wait_for(
        "re-acquisition to fail against the stopped etcd",
        CONVERGE,
        || retries_logged(&cluster, 1) >= before + 2,
    );
    cluster.daemons[1].as_mut().unwrap().assert_running();
    assert!(lease_lost(&cluster, 1), "host 1 no longer re-acquiring");

    // Host 1's traffic to host 0 (whose map still has host 0's lease)
    // flows while host 0 has forgotten host 1: counted, not asserted.
    let (restarted, restored) = restart_etcd_until_held(&mut cluster, &subnets);
    wait_for("host 0 to program host 1 again", RESTORE, || {
        cluster.peers(0).contains_key(&subnets[1])
    });
    let relearned = restarted.elapsed();
    eprintln!(
        "expired lease taken back {restored:?} after etcd's restart \
         (retries while stopped: {}); host 0 programmed it after {relearned:?}",
        retries_logged(&cluster, 1) - before
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    assert_only_own_keys(&cluster, rev, &subnets);
    // From now on nothing is lost.
    let (from, to) = (cluster.container(c1), cluster.container(c0));
    let result = PingRun::start(&from.ns.handle(), to.ip, 300, 2).finish(Duration::from_secs(30));
    let (sent, received) = (result.transmitted, result.received);
    eprintln!("after recovery: {sent} pings, {} lost", sent - received);
    assert_eq!(sent, received, "pings lost after recovery");
    cluster.assert_ping_both_ways(c0, c1);
}
