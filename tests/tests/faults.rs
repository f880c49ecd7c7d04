//! Faults around a running cluster: a daemon killed and restarted under
//! live traffic, an upgrade to a new map layout, an etcd outage, etcd
//! members lost from a 3-member cluster, and a host cut off etcd for longer
//! than its lease TTL.
//!
//! The data plane must not notice the first four: pings every 10 ms lose
//! nothing and a TCP stream carries on, while the control plane reports the
//! fault and recovers. The same holds for upgrades, to a new map layout and
//! to a new build of the same layout: the new programs are put behind the
//! attachments only once their maps are filled, so pings lose nothing there
//! either. Waits are generous (the machine is small and shared); timings
//! measured are printed (`--nocapture`) rather than asserted.

// Hosts are numbered; loops over them index per-host arrays.
#![allow(clippy::needless_range_loop)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netd_tests::bpftool::{map_dump, pinned_map_id, pinned_prog_id, prog_exists};
use netd_tests::builds::netd_of_another_build;
use netd_tests::cluster::NETWORK;
use netd_tests::etcd::EtcdCluster;
use netd_tests::lease::{lease_key, lease_value};
use netd_tests::links::{tc_filters, tc_prog_id, xdp_prog_id};
use netd_tests::ping_run::{PingResult, PingRun};
use netd_tests::stream::Stream;
use netd_tests::{Cluster, Etcd, Topology, ping_stats, poll_until, require_root, wait_for};
use serde_json::Value;

/// How long maps may take to converge and paths to start working.
const CONVERGE: Duration = Duration::from_secs(30);
/// A lease nobody holds, as flannel writes it (no host answers at its IP).
const FAKE_SUBNET: &str = "10.244.250.0/24";
const FAKE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// A second fake lease, removed while a daemon is down.
const DOOMED_SUBNET: &str = "10.244.251.0/24";
const DOOMED_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 98);

// ---------------------------------------------------------------- etcd data

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

// ---------------------------------------------------------------- ping

/// Asserts a finished ping run lost nothing; prints what it saw.
fn assert_no_loss(result: &PingResult, what: &str) {
    eprintln!(
        "{what}: {} echo requests every 10 ms, {} answered, {} lost",
        result.transmitted,
        result.received,
        result.lost()
    );
    let tail: Vec<&str> = result.output.lines().rev().take(4).collect();
    assert!(
        result.transmitted > 0 && result.lost() == 0 && result.missing.is_empty(),
        "{what}: pings lost: {} of {} (sequence numbers without reply: {:?});\n\
         summary: {tail:?}",
        result.lost(),
        result.transmitted,
        result.missing
    );
}

// ---------------------------------------------------------------- attachments

/// Program ids behind every attachment of host `i`: (where, id).
fn attachments(cluster: &Cluster, i: usize) -> Vec<(String, Option<u64>)> {
    let ns = cluster.host(i).ns().handle();
    let mut all: Vec<(String, Option<u64>)> = cluster
        .host_veths(i)
        .into_iter()
        .map(|veth| {
            let id = tc_prog_id(&ns, &veth);
            (format!("tc ingress {veth}"), id)
        })
        .collect();
    all.push(("tc ingress eth0".into(), tc_prog_id(&ns, "eth0")));
    all.push(("xdp eth0".into(), xdp_prog_id(&ns, "eth0")));
    all
}

/// Two hosts running netd with `decap`, a container on each (containers 0
/// and 1), maps converged and the containers reaching each other.
fn two_hosts(decap: &str) -> (Cluster, usize, usize) {
    let mut cluster = Cluster::up(2, decap);
    let (c0, c1) = cluster.attach_pair(CONVERGE);
    cluster.assert_ping_both_ways(c0, c1);
    (cluster, c0, c1)
}

// ================================================================ tests

// 1. kill -9 and restart under live traffic.
#[test]
fn restart_under_traffic_is_invisible() {
    require_root();
    let (mut cluster, c0, c1) = two_hosts("tc");
    let etcd = cluster.topo.etcd();
    // A lease that will be deleted while host 1's daemon is down.
    etcd.put(&lease_key(DOOMED_SUBNET), &lease_value(DOOMED_IP));
    wait_for("host 1 to program the doomed lease", CONVERGE, || {
        cluster.peers(1).contains_key(DOOMED_SUBNET)
    });
    let subnet = cluster.subnet(1);
    let before = attachments(&cluster, 1);
    assert!(
        before
            .iter()
            .filter(|(w, _)| w.starts_with("tc"))
            .all(|(_, id)| id.is_some()),
        "host 1 lacks a TC program: {before:?}"
    );

    let (from, to) = (cluster.container(c0), cluster.container(c1));
    let dst = SocketAddr::from((to.ip, 5201));
    let stream = Stream::start(&from.ns.handle(), &to.ns.handle(), dst, 8 << 20);
    // 800 requests: 8 s at the nominal rate, well past the restart.
    let mut ping = PingRun::start(&from.ns.handle(), to.ip, 800, 2);
    thread::sleep(Duration::from_secs(1));
    let at_kill = stream.received();
    assert!(
        at_kill > 0,
        "the TCP stream carried nothing before the kill"
    );

    let status = cluster.daemons[1].as_mut().unwrap().kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    etcd.del(&lease_key(DOOMED_SUBNET));
    etcd.put(&lease_key(FAKE_SUBNET), &lease_value(FAKE_IP));
    thread::sleep(Duration::from_millis(1500));
    let while_down = stream.received() - at_kill;
    assert!(
        while_down > 0,
        "the TCP stream stalled while host 1's daemon was down"
    );

    let restarting = Instant::now();
    cluster.start(1);
    let ready = Instant::now();
    // The leases changed while it was down are in its map right away.
    wait_for(
        "the restarted daemon to reflect the leases changed while it was down",
        Duration::from_secs(3),
        || {
            let peers = cluster.peers(1);
            peers.get(FAKE_SUBNET).map(String::as_str) == Some(&FAKE_IP.to_string())
                && !peers.contains_key(DOOMED_SUBNET)
        },
    );
    let resynced = ready.elapsed();
    let restarted_log = cluster.daemon_log(1);
    assert!(
        ping.is_running(),
        "ping finished before the restart was over: raise its count"
    );
    let ping = ping.finish(Duration::from_secs(60));
    let (sent, received) = stream
        .finish()
        .unwrap_or_else(|e| panic!("TCP stream across the restart failed: {e:#}"));
    eprintln!(
        "restart: ready {:?} after start; map resynced {resynced:?} after ready; \
         TCP {sent} bytes sent, {received} received ({while_down} while the daemon was down)",
        ready - restarting
    );
    assert_eq!(sent, received, "TCP stream: bytes sent != received");
    assert_no_loss(&ping, "kill -9 and restart of host 1");

    assert_eq!(
        cluster.subnet(1),
        subnet,
        "host 1 changed subnet on restart"
    );
    let after = attachments(&cluster, 1);
    assert_eq!(
        before, after,
        "program ids behind host 1's attachments changed across a same-build restart"
    );
    // The guard of the restarted daemon logs this run only.
    assert!(
        restarted_log.contains("reusing pinned data path")
            && !restarted_log.contains("loaded and pinned data path"),
        "the restarted daemon did not reuse the pinned data path; log:\n{restarted_log}"
    );
    let leases = cluster.etcd_leases();
    assert_eq!(
        leases.get(&subnet).map(String::as_str),
        Some(cluster.host(1).ip().to_string().as_str()),
        "host 1's lease in etcd: {leases:?}"
    );
    cluster.wait_peers_match_etcd(1, CONVERGE);
    cluster.daemons[1].as_mut().unwrap().assert_running();
}

/// Stops host `host`'s daemon, lets `simulate` turn its pins into those of
/// an older map layout, and starts it again while container `remote`
/// pings container `local` (on `host`) every 10 ms. Checks the data path
/// kept forwarding while the daemon was down, and that afterwards every
/// attachment runs the newly pinned programs, whose maps hold the
/// endpoints and the peers, and that no ping was lost. `start` starts the
/// daemon again (the same binary, or another build).
fn upgrade(
    cluster: &mut Cluster,
    host: usize,
    local: usize,
    remote: usize,
    simulate: impl FnOnce(&Path),
    start: impl FnOnce(&mut Cluster),
) {
    let pin = cluster.host(host).pin_path().to_path_buf();
    let before = attachments(cluster, host);
    assert!(
        before.iter().all(|(_, id)| id.is_some()),
        "host {host} lacks an attachment (xdp decap: XDP and TC on eth0): {before:?}"
    );
    assert_eq!(
        cluster.stop(host).code(),
        Some(0),
        "SIGTERM exit of host {host}"
    );
    simulate(&pin);
    // The attached programs hold the old maps: forwarding goes on.
    cluster.assert_ping_both_ways(local, remote);

    let (from, to) = (cluster.container(remote), cluster.container(local));
    let ping = PingRun::start(&from.ns.handle(), to.ip, 400, 2);
    start(cluster);
    let log = cluster.daemon_log(host);
    assert!(
        log.contains("loaded and pinned data path")
            && log.contains("attachments now run this build's programs"),
        "host {host} did not load and switch to new programs; log:\n{log}"
    );
    // Endpoints restored into the new ENDPOINTS map, peers from etcd.
    wait_for(
        &format!("host {host}'s container reachable after the upgrade"),
        CONVERGE,
        || {
            let (a, b) = (cluster.container(remote), cluster.container(local));
            ping_stats(&a.ns.handle(), b.ip, 1).all_received()
        },
    );
    cluster.assert_ping_both_ways(local, remote);
    cluster.wait_peers_match_etcd(host, CONVERGE);
    let endpoints = map_dump(&pin.join(netd_tests::layout_dir()).join("ENDPOINTS")).len();
    let containers = cluster.containers.iter().filter(|c| c.host == host).count();
    // Plus the host's own entry (its gateway address, for host access).
    assert_eq!(
        endpoints,
        containers + 1,
        "host {host}'s new ENDPOINTS map vs its containers and host entry"
    );

    let after = attachments(cluster, host);
    let new_ids = [
        pinned_prog_id(
            &pin.join(netd_tests::layout_dir())
                .join("prog_from_container"),
        ),
        pinned_prog_id(
            &pin.join(netd_tests::layout_dir())
                .join("prog_tc_from_underlay"),
        ),
        pinned_prog_id(
            &pin.join(netd_tests::layout_dir())
                .join("prog_xdp_from_underlay"),
        ),
    ];
    for ((what, old), (what_after, new)) in before.iter().zip(&after) {
        assert_eq!(what, what_after);
        let (old, new) = (
            old.unwrap(),
            new.unwrap_or_else(|| panic!("{what}: detached")),
        );
        assert_ne!(old, new, "{what} still runs the old program {old}");
        assert!(
            new_ids.contains(&new),
            "{what} runs program {new}, none of the newly pinned {new_ids:?}"
        );
    }
    // Nothing holds the old programs (and their maps) any more.
    for (what, old) in &before {
        let old = old.unwrap();
        wait_for(
            &format!("the old program {old} ({what}) to be freed"),
            CONVERGE,
            || !prog_exists(old),
        );
    }
    let result = ping.finish(Duration::from_secs(60));
    if result.lost() > 0 {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                [
                    "pinned data path",
                    "endpoints restored",
                    "subnet lease acquired",
                    "kernel subnet map updated",
                    "netd running",
                ]
                .iter()
                .any(|n| l.contains(n))
            })
            .collect();
        eprintln!(
            "upgrade of host {host}: daemon timeline:\n{}",
            lines.join("\n")
        );
        let missing: Vec<&str> = result
            .missing
            .iter()
            .filter_map(|s| {
                let next = format!("icmp_seq={} ", s + 1);
                result.output.lines().find(|l| l.contains(&next))
            })
            .collect();
        eprintln!("replies after each lost one: {missing:?}");
    }
    assert_no_loss(&result, &format!("upgrade of host {host}"));
}

// 2. An upgrade to a new map layout, simulated: the daemon finds no pins of
// its layout and must rebuild the data path behind live attachments.
#[test]
fn upgrade_to_new_map_layout_rebuilds_the_data_path() {
    require_root();
    let (mut cluster, c0, c1) = two_hosts("xdp");

    // Host 1: its layout's pins are gone altogether.
    upgrade(
        &mut cluster,
        1,
        c1,
        c0,
        |pin| {
            std::fs::remove_dir_all(pin.join(netd_tests::layout_dir()))
                .expect("rm -rf the layout dir")
        },
        |cluster| cluster.start(1),
    );
    // Host 0: the pins are those of an older layout (v0), which the new
    // daemon unpins once its own are in place.
    upgrade(
        &mut cluster,
        0,
        c0,
        c1,
        |pin| {
            std::fs::rename(pin.join(netd_tests::layout_dir()), pin.join("v0"))
                .expect("mv the layout dir to v0 on bpffs")
        },
        |cluster| cluster.start(0),
    );
    assert!(
        !cluster.host(0).pin_path().join("v0").exists(),
        "host 0 left the older layout's pins behind"
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}

/// (where, priority, handle) of every TC filter of host `i`'s attachments.
fn tc_slots(cluster: &Cluster, i: usize) -> Vec<(String, u64, String)> {
    let ns = cluster.host(i).ns().handle();
    let mut devs = cluster.host_veths(i);
    devs.push("eth0".into());
    devs.into_iter()
        .flat_map(|dev| {
            tc_filters(&ns, &dev)
                .into_iter()
                .filter(|f| f["options"]["prog"]["id"].is_u64())
                .map(|f| {
                    (
                        dev.clone(),
                        f["pref"].as_u64().unwrap_or_else(|| panic!("no pref: {f}")),
                        f["options"]["handle"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Ids of host `i`'s pinned maps, by name.
fn map_ids(cluster: &Cluster, i: usize) -> Vec<(&'static str, u64)> {
    let dir = cluster.host(i).pin_path().join(netd_tests::layout_dir());
    ["SUBNETS", "PEERS", "ENDPOINTS", "CONFIG", "STATS"]
        .into_iter()
        .map(|name| (name, pinned_map_id(&dir.join(name))))
        .collect()
}

// 3. A new build of the same map layout (another eBPF object, so another
// object hash): the daemon loads it and puts it behind every attachment in
// place, in the same TC slot, keeping the pinned maps.
#[test]
fn upgrade_to_a_new_build_replaces_each_program_in_place() {
    require_root();
    let (mut cluster, c0, c1) = two_hosts("xdp");
    let slots = tc_slots(&cluster, 1);
    assert_eq!(
        slots.len(),
        2,
        "TC filters of host 1 (veth, eth0): {slots:?}"
    );
    let maps = map_ids(&cluster, 1);

    let build_dir = tempfile::tempdir().expect("temp dir for the other build");
    let other = netd_of_another_build(build_dir.path());
    upgrade(
        &mut cluster,
        1,
        c1,
        c0,
        |_| {},
        |cluster| cluster.start_with_bin(1, &other),
    );
    assert_eq!(
        tc_slots(&cluster, 1),
        slots,
        "a TC filter was re-created elsewhere instead of replaced in place"
    );
    assert_eq!(
        map_ids(&cluster, 1),
        maps,
        "the same layout's pinned maps were replaced"
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}

/// `state.etcd` of host `i`'s status: (reachable, since, last_error).
fn etcd_health(cluster: &Cluster, i: usize) -> (bool, u64, String) {
    let status = cluster.status(i);
    let etcd = &status["state"]["etcd"];
    (
        etcd["reachable"]
            .as_bool()
            .unwrap_or_else(|| panic!("no state.etcd.reachable in {status}")),
        etcd["since"]
            .as_u64()
            .unwrap_or_else(|| panic!("no state.etcd.since in {status}")),
        etcd["last_error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Asserts host `i` holds `subnet` in `etcd`: the key carries its public
/// IP and is bound to the etcd lease its state names, which is alive.
fn assert_holds(cluster: &Cluster, etcd: &Etcd, i: usize, subnet: &str) {
    assert_eq!(cluster.subnet(i), subnet, "host {i} changed subnet");
    let kv = etcd
        .get_kv(&lease_key(subnet))
        .unwrap_or_else(|| panic!("host {i}'s lease {subnet} is gone from etcd"));
    let value: Value = serde_json::from_str(&kv.value).expect("lease value is JSON");
    assert_eq!(
        value["PublicIP"].as_str(),
        Some(cluster.host(i).ip().to_string().as_str()),
        "host {i}'s lease {subnet}: {}",
        kv.value
    );
    let lease = cluster.state_lease_id(i);
    assert_eq!(
        kv.lease, lease,
        "host {i}'s key is bound to another lease than its state names"
    );
    assert!(
        etcd.lease_ttl(lease).is_some(),
        "host {i}'s etcd lease {lease:x} is not alive"
    );
}

// 4. etcd stopped for longer than the lease TTL: forwarding goes on, the
// status says since when etcd is unreachable, and on its return the daemon
// keeps its subnet and follows etcd again.
#[test]
fn etcd_outage_keeps_forwarding_and_recovers() {
    require_root();
    const TTL: u64 = 6;
    const OUTAGE: Duration = Duration::from_secs(8);
    let mut cluster = Cluster::new(2, "tc");
    cluster.run_args(&["--lease-ttl", &TTL.to_string()]);
    let (c0, c1) = cluster.start_pair(CONVERGE);
    let subnets = [cluster.subnet(0), cluster.subnet(1)];
    let leases_before = [cluster.state_lease_id(0), cluster.state_lease_id(1)];
    for i in 0..2 {
        assert!(etcd_health(&cluster, i).0, "host {i} before the outage");
    }

    let (from, to) = (cluster.container(c0), cluster.container(c1));
    // 1000 requests: 10 s at the nominal rate, the outage and a bit more.
    let ping = PingRun::start(&from.ns.handle(), to.ip, 1000, 2);
    thread::sleep(Duration::from_millis(300));
    let stopped_unix = unix_now();
    let stopped = Instant::now();
    cluster.topo.etcd_mut().stop();
    let mut noticed = Vec::new();
    for i in 0..2 {
        wait_for(
            &format!("host {i} to report etcd unreachable"),
            Duration::from_secs(TTL * 3),
            || !etcd_health(&cluster, i).0,
        );
        noticed.push(stopped.elapsed());
        let (_, since, error) = etcd_health(&cluster, i);
        let now = unix_now();
        assert!(
            since <= now && since + 1 >= stopped_unix,
            "host {i}: unreachable since {since}, etcd stopped at {stopped_unix}, now {now}"
        );
        assert!(
            !error.is_empty(),
            "host {i}: unreachable without last_error"
        );
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    // `since` is when it first failed: it stays put during the outage.
    let since_first: Vec<u64> = (0..2).map(|i| etcd_health(&cluster, i).1).collect();
    thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
    for i in 0..2 {
        let (reachable, since, _) = etcd_health(&cluster, i);
        assert!(
            !reachable,
            "host {i} says etcd reachable while it is stopped"
        );
        assert_eq!(
            since, since_first[i],
            "host {i}: `since` moved during the outage"
        );
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }

    cluster.topo.etcd_mut().restart();
    let returned = Instant::now();
    let mut recovered = Vec::new();
    for i in 0..2 {
        wait_for(
            &format!("host {i} to report etcd reachable again"),
            CONVERGE,
            || etcd_health(&cluster, i).0,
        );
        recovered.push(returned.elapsed());
    }
    let etcd = cluster.topo.etcd();
    etcd.put(&lease_key(FAKE_SUBNET), &lease_value(FAKE_IP));
    let put = Instant::now();
    for i in 0..2 {
        wait_for(
            &format!("host {i} to program a lease put after etcd returned"),
            CONVERGE,
            || cluster.peers(i).contains_key(FAKE_SUBNET),
        );
    }
    let programmed = put.elapsed();
    let result = ping.finish(Duration::from_secs(60));

    let leases_after = [cluster.state_lease_id(0), cluster.state_lease_id(1)];
    eprintln!(
        "etcd outage of {OUTAGE:?} (TTL {TTL} s): unreachable shown after {noticed:?}, \
         reachable again {recovered:?} after etcd's restart, a new lease programmed \
         {programmed:?} after its put; etcd leases {} (before {leases_before:x?}, after {leases_after:x?})",
        if leases_before == leases_after {
            "kept (etcd extends leases on restart)"
        } else {
            "re-acquired"
        }
    );
    assert_no_loss(&result, "etcd outage");
    for i in 0..2 {
        assert_holds(&cluster, etcd, i, &subnets[i]);
    }
    // The leases are renewed, not just carried over by etcd's restart:
    // past a TTL later they are still held.
    thread::sleep(Duration::from_secs(TTL + 1));
    for i in 0..2 {
        assert_holds(&cluster, etcd, i, &subnets[i]);
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    etcd.del(&lease_key(FAKE_SUBNET));
    for i in 0..2 {
        cluster.wait_peers_match_etcd(i, CONVERGE);
    }
    cluster.assert_ping_both_ways(c0, c1);
}

/// Remote addresses of host `i`'s established TCP connections to etcd's
/// client port (`ss` in the host namespace).
fn etcd_connections(cluster: &Cluster, i: usize) -> Vec<Ipv4Addr> {
    let out =
        cluster
            .host(i)
            .ns()
            .run_ok(&["ss", "-Hnt", "state", "established", "dport", "=", ":2379"]);
    let mut ips: Vec<Ipv4Addr> = out
        .lines()
        .filter_map(|l| {
            let peer = l.split_whitespace().last()?;
            peer.rsplit_once(':')?.0.parse().ok()
        })
        .collect();
    ips.sort();
    ips
}

/// How a member is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    /// The etcd process stops (SIGTERM): its connections close.
    Stop,
    /// Its switch port goes down: it neither answers nor closes anything.
    Cut,
}

/// `etcdctl put` through member `m` with short timeouts; whether it worked.
fn try_put(etcd: &EtcdCluster, m: usize, key: &str, value: &str) -> bool {
    etcd.member(m)
        .etcdctl(&[
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "put",
            "--",
            key,
            value,
        ])
        .status
        .success()
}

/// What losing one member did to the daemons (printed through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
struct Round {
    /// From the loss until a write through the remaining members worked
    /// (an election when the leader went).
    write_ok: Duration,
    /// From the loss until both hosts had programmed a lease put right
    /// after it, and said etcd is reachable: the reconnect time.
    reconnected: Duration,
    /// How long each host said etcd was unreachable, if it ever did.
    unreachable_for: [Option<Duration>; 2],
    pings_lost: u32,
}

/// Loses member `victim` (`how`) while container `c0` pings `c1` every
/// 10 ms, writes lease `subnet` (public IP `ip`) through the remaining
/// members, and waits until both hosts program it and are reachable.
#[allow(clippy::too_many_arguments)]
fn lose_member(
    cluster: &Cluster,
    etcd: &mut EtcdCluster,
    victim: usize,
    how: Loss,
    c0: usize,
    c1: usize,
    subnet: &str,
    ip: Ipv4Addr,
) -> Round {
    let (from, to) = (cluster.container(c0), cluster.container(c1));
    let ping = PingRun::start(&from.ns.handle(), to.ip, 600, 2);
    thread::sleep(Duration::from_millis(200));
    let lost = Instant::now();
    match how {
        Loss::Stop => etcd.member_mut(victim).stop(),
        Loss::Cut => etcd.set_member_link(victim, false),
    }
    let others: Vec<usize> = (0..etcd.len()).filter(|&m| m != victim).collect();
    let (key, value) = (lease_key(subnet), lease_value(ip));
    wait_for(
        "a write through the remaining etcd members",
        CONVERGE,
        || others.iter().any(|&m| try_put(etcd, m, &key, &value)),
    );
    let write_ok = lost.elapsed();
    let mut down_since: [Option<Instant>; 2] = [None, None];
    let mut unreachable_for: [Option<Duration>; 2] = [None, None];
    let mut done = [false, false];
    wait_for(
        &format!("both hosts to follow etcd after member {victim} was lost ({how:?})"),
        Duration::from_secs(60),
        || {
            for i in 0..2 {
                let reachable = etcd_health(cluster, i).0;
                match (reachable, down_since[i]) {
                    (false, None) => down_since[i] = Some(Instant::now()),
                    (true, Some(t)) => {
                        unreachable_for[i] = Some(t.elapsed());
                        down_since[i] = None;
                    }
                    _ => {}
                }
                done[i] = reachable && cluster.peers(i).contains_key(subnet);
            }
            done.iter().all(|&d| d)
        },
    );
    let reconnected = lost.elapsed();
    let result = ping.finish(Duration::from_secs(60));
    let round = Round {
        write_ok,
        reconnected,
        unreachable_for,
        pings_lost: result.lost(),
    };
    eprintln!("member {victim} lost ({how:?}): {round:?}");
    assert_no_loss(&result, &format!("loss of etcd member {victim} ({how:?})"));
    for i in 0..2 {
        cluster.daemons[i].as_ref().map(|_| ()).expect("daemon");
    }
    round
}

/// The current leader, once there is one.
fn wait_leader(etcd: &EtcdCluster) -> usize {
    let mut found = None;
    wait_for("an etcd leader", CONVERGE, || {
        found = etcd.leader();
        found.is_some()
    });
    found.expect("leader")
}

/// Brings member `m` back (`how` undone) and waits until it is healthy.
fn bring_back(etcd: &mut EtcdCluster, m: usize, how: Loss) {
    match how {
        Loss::Stop => etcd.member_mut(m).restart(),
        Loss::Cut => {
            etcd.set_member_link(m, true);
            wait_for(&format!("member {m} healthy again"), CONVERGE, || {
                etcd.member(m).is_healthy()
            });
        }
    }
    wait_leader(etcd);
}

// 5. A 3-member etcd cluster loses members one at a time: the leader, a
// follower, and a leader cut off the network without closing anything.
#[test]
fn etcd_cluster_member_loss() {
    require_root();
    let member_ips = [
        Ipv4Addr::new(198, 18, 0, 251),
        Ipv4Addr::new(198, 18, 0, 252),
        Ipv4Addr::new(198, 18, 0, 253),
    ];
    let topo = Topology::builder().hosts(2).etcd(false).build();
    // Declared before the cluster: dropped after its daemons stop.
    let mut etcd = EtcdCluster::start(&topo.switch().handle(), "br0", &member_ips);
    let endpoints = etcd.endpoints();
    let mut cluster = Cluster::on_topology(topo, "tc");
    cluster.netd_ok(
        0,
        &[
            "network",
            "init",
            "--etcd-endpoints",
            &endpoints,
            "--network",
            NETWORK,
        ],
    );
    // Long enough that the lease outlives a member cut off without a word:
    // netd notices that only through HTTP/2 keep-alive (up to ~8 s). A lease
    // that lapses meanwhile is the partition tests' subject.
    cluster.run_args(&["--lease-ttl", "30"]);
    cluster.start_with_endpoints(0, &endpoints);
    cluster.start_with_endpoints(1, &endpoints);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    for i in 0..2 {
        cluster.wait_peers_match(i, etcd.client(), CONVERGE);
    }
    cluster.assert_ping_both_ways(c0, c1);
    let subnets = [cluster.subnet(0), cluster.subnet(1)];
    let leases = [cluster.state_lease_id(0), cluster.state_lease_id(1)];
    for i in 0..2 {
        eprintln!(
            "host {i} talks to etcd members {:?}",
            etcd_connections(&cluster, i)
        );
    }

    let mut rounds = Vec::new();
    let first = wait_leader(&etcd);
    let follower = (first + 1) % member_ips.len();
    let cases = [
        (
            first,
            Loss::Stop,
            "10.244.241.0/24",
            Ipv4Addr::new(198, 18, 0, 91),
        ),
        (
            follower,
            Loss::Stop,
            "10.244.242.0/24",
            Ipv4Addr::new(198, 18, 0, 92),
        ),
    ];
    for (victim, how, subnet, ip) in cases {
        rounds.push(lose_member(
            &cluster, &mut etcd, victim, how, c0, c1, subnet, ip,
        ));
        bring_back(&mut etcd, victim, how);
    }
    let cut = wait_leader(&etcd);
    let subnet = "10.244.243.0/24";
    rounds.push(lose_member(
        &cluster,
        &mut etcd,
        cut,
        Loss::Cut,
        c0,
        c1,
        subnet,
        Ipv4Addr::new(198, 18, 0, 93),
    ));
    bring_back(&mut etcd, cut, Loss::Cut);

    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
        assert_holds(&cluster, etcd.client(), i, &subnets[i]);
        assert_eq!(
            cluster.state_lease_id(i),
            leases[i],
            "host {i} lost its etcd lease although a quorum was up all along"
        );
        cluster.wait_peers_match(i, etcd.client(), CONVERGE);
    }
    cluster.assert_ping_both_ways(c0, c1);
    eprintln!(
        "etcd member loss: reconnect times (leader stopped, follower stopped, leader cut off) {:?}",
        rounds.iter().map(|r| r.reconnected).collect::<Vec<_>>()
    );
}

/// Two hosts with `--lease-ttl ttl`, a container on each, converged.
fn partition_cluster(ttl: u64) -> (Cluster, usize, usize) {
    let mut cluster = Cluster::new(2, "tc");
    cluster.run_args(&["--lease-ttl", &ttl.to_string()]);
    let (c0, c1) = cluster.start_pair(CONVERGE);
    (cluster, c0, c1)
}

/// Cuts host 1 off etcd until its lease has expired there and host 0 has
/// forgotten it; returns host 1's subnet and its (dead) lease id.
fn partition_until_expired(cluster: &Cluster) -> (String, i64) {
    let subnet = cluster.subnet(1);
    let lease = cluster.state_lease_id(1);
    let cut = Instant::now();
    cluster.partition_from_etcd(1, true);
    // Both at once: which comes first is part of the story.
    let key = lease_key(&subnet);
    let (mut noticed, mut expired) = (None, None);
    wait_for(
        "host 1 to report etcd unreachable and its lease to expire in etcd",
        CONVERGE,
        || {
            if noticed.is_none() && !etcd_health(cluster, 1).0 {
                noticed = Some(cut.elapsed());
            }
            if expired.is_none() && cluster.topo.etcd().get(&key).is_none() {
                expired = Some(cut.elapsed());
            }
            noticed.is_some() && expired.is_some()
        },
    );
    let (noticed, expired) = (noticed.unwrap(), expired.unwrap());
    wait_for("host 0 to forget host 1", CONVERGE, || {
        !cluster.peers(0).contains_key(&subnet)
    });
    eprintln!(
        "partition of host 1 from etcd: unreachable shown after {noticed:?}, \
         lease {lease:x} expired in etcd after {expired:?}"
    );
    cluster.daemons[1].as_ref().expect("daemon");
    (subnet, lease)
}

/// Lines of host `i`'s log with `needle`, for messages.
fn log_lines(cluster: &Cluster, i: usize, needle: &str) -> String {
    let log = cluster.daemon_log(i);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    format!(
        "{} line(s) with {needle:?}, last: {:?}",
        lines.len(),
        lines.last()
    )
}

// 5a. A host cut off etcd for longer than its lease TTL (etcd itself up, so
// the lease does expire): on its return it takes the same subnet back.
#[test]
fn partition_past_the_ttl_takes_the_same_subnet_back() {
    require_root();
    const TTL: u64 = 4;
    let (mut cluster, c0, c1) = partition_cluster(TTL);
    let (subnet, lease) = partition_until_expired(&cluster);

    let healed = Instant::now();
    cluster.partition_from_etcd(1, false);
    let took_back = poll_until(Duration::from_secs(20), || {
        let (reachable, ..) = etcd_health(&cluster, 1);
        reachable
            && cluster.state_lease_id(1) != lease
            && cluster.topo.etcd().get(&lease_key(&subnet)).is_some()
    });
    let (reachable, since, error) = etcd_health(&cluster, 1);
    assert!(
        took_back,
        "host 1 did not take its subnet {subnet} back within 20 s of reaching etcd again \
         (status: reachable={reachable} since={since} last_error={error:?}; etcd subnets: {:?}; \
         log: {})",
        cluster.etcd_leases(),
        log_lines(&cluster, 1, "lease renewal failed")
    );
    eprintln!(
        "partition healed: subnet taken back after {:?}",
        healed.elapsed()
    );
    assert_holds(&cluster, cluster.topo.etcd(), 1, &subnet);
    cluster.daemons[1].as_mut().unwrap().assert_running();
    for i in 0..2 {
        cluster.wait_peers_match_etcd(i, CONVERGE);
    }
    cluster.assert_ping_both_ways(c0, c1);
}

// 5b. As 5a, but another host took the subnet meanwhile: the daemon must
// not share it; it disables its data path and exits with an error.
#[test]
fn partition_past_the_ttl_with_the_subnet_taken_disables_the_host() {
    require_root();
    const TTL: u64 = 4;
    let (mut cluster, c0, c1) = partition_cluster(TTL);
    let (subnet, _) = partition_until_expired(&cluster);
    let usurper = Ipv4Addr::new(198, 18, 0, 77);
    let key = lease_key(&subnet);
    cluster.topo.etcd().put(&key, &lease_value(usurper));

    cluster.partition_from_etcd(1, false);
    let exited = cluster.daemons[1]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(20));
    let (reachable, since, error) = etcd_health(&cluster, 1);
    let status = exited.unwrap_or_else(|| {
        panic!(
            "host 1 still runs 20 s after reaching etcd again, although its subnet {subnet} \
             is now another host's (status: reachable={reachable} since={since} \
             last_error={error:?}; log: {})",
            log_lines(&cluster, 1, "lease renewal failed")
        )
    });
    assert!(!status.success(), "host 1 exited with {status}");
    let log = cluster.daemon_log(1);
    assert!(
        log.contains("now held by another host"),
        "host 1 exited without saying why; log:\n{log}"
    );
    // It left the other host's claim alone.
    let value: Value =
        serde_json::from_str(&cluster.topo.etcd().get(&key).expect("usurper's lease")).unwrap();
    assert_eq!(value["PublicIP"], usurper.to_string());
    // Its data path is disabled: its container no longer reaches host 0's.
    let config = pinned_config(cluster.host(1).pin_path());
    assert_eq!(
        config["enabled"], 0,
        "host 1's data path still enabled: {config}"
    );
    let (from, to) = (cluster.container(c1), cluster.container(c0));
    assert!(
        !ping_stats(&from.ns.handle(), to.ip, 2).all_received(),
        "host 1's container still reaches host 0's through a disabled data path"
    );
}

/// Host's `CONFIG` map entry, decoded through BTF (`formatted.value`).
fn pinned_config(pin: &Path) -> Value {
    let path = pin.join(netd_tests::layout_dir()).join("CONFIG");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool (install bpftool): {e}"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool map dump {}: {e}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let entry = v
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or_else(|| panic!("CONFIG is empty: {v}"));
    entry["formatted"]["value"].clone()
}
