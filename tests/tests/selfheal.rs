//! The data path heals itself: TC filters, a clsact qdisc and XDP removed
//! by hand from a host are put back by its running daemon within seconds
//! (under a ping every 10 ms and a TCP stream, whose outage is measured and
//! printed with `--nocapture`), and by a daemon started afterwards before
//! it reports ready. Every repair is counted in the published state and
//! logged, and what comes back runs the pinned programs.

use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netd_tests::bpftool::pinned_prog_id as pinned_prog_id_at;
use netd_tests::links::{has_clsact, json_in, tc_prog_id, xdp_prog_id};
use netd_tests::ping_run::PingRun;
use netd_tests::stream::Stream;
use netd_tests::topology::{BRIDGE, HOST_IFACE, UNDERLAY_PREFIX_LEN, switch_port};
use netd_tests::{Cluster, NsRef, ping_stats, poll_until, require_root, strip_ansi, wait_for};

/// Maps may take this long to converge on the shared machine.
const CONVERGE: Duration = Duration::from_secs(30);
/// The bound a running daemon has to put an attachment back.
const REPAIR_BOUND: Duration = Duration::from_secs(10);
/// What the log says for each repair.
const REPAIRED: &str = "attachment was missing in the kernel; restored";
const FROM_CONTAINER: &str = "from_container";
const TC_FROM_UNDERLAY: &str = "tc_from_underlay";
const XDP_FROM_UNDERLAY: &str = "xdp_from_underlay";
/// Bytes per second of the TCP stream kept open across the faults.
const STREAM_RATE: u64 = 4_000_000;

// ------------------------------------------------------------ kernel state

/// Id of the program pinned under host `i`'s pin path.
fn pinned_prog_id(cluster: &Cluster, i: usize, program: &str) -> u64 {
    let path = cluster
        .host(i)
        .pin_path()
        .join(netd_tests::layout_dir())
        .join(format!("prog_{program}"));
    pinned_prog_id_at(&path)
}

/// Host-side veth of container `c`, from its host's status.
fn host_veth(cluster: &Cluster, c: usize) -> String {
    let container = cluster.container(c);
    let status = cluster.status(container.host);
    status["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["ip"] == container.ip.to_string())
        .and_then(|e| e["host_ifname"].as_str())
        .unwrap_or_else(|| panic!("container {} not in status: {status}", container.ip))
        .to_string()
}

fn repairs(cluster: &Cluster, i: usize) -> u64 {
    let status = cluster.status(i);
    status["state"]["repairs"]
        .as_u64()
        .unwrap_or_else(|| panic!("no repair counter in status: {status}"))
}

fn daemon_log(cluster: &Cluster, i: usize) -> String {
    strip_ansi(&cluster.daemons[i].as_ref().expect("daemon").log())
}

/// Log lines of repairs of `hook` on `iface`.
fn repair_lines(log: &str, iface: &str, hook: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains(REPAIRED)
                && l.contains(&format!("iface={iface} "))
                && l.contains(&format!("hook={hook} "))
        })
        .count()
}

// ---------------------------------------------------------------- traffic

/// `ping -D` every 10 ms in the background, bounded: 6000 requests, one
/// minute at most.
fn ping_run(from: &NsRef, ip: Ipv4Addr) -> PingRun {
    PingRun::start(from, ip, 6000, 1)
}

/// Waits for a reply sent well after `since` (unix seconds): forwarding
/// works again. Returns the longest gap between replies from `since` on,
/// i.e. how long forwarding was interrupted.
fn wait_resumed(ping: &PingRun, since: f64, what: &str) -> Duration {
    wait_for(
        &format!("pings to flow again after {what}"),
        REPAIR_BOUND,
        || ping.replies().last().is_some_and(|t| *t > since + 0.5),
    );
    let replies = ping.replies();
    let from = replies.iter().rposition(|t| *t <= since).unwrap_or(0);
    let gap = replies[from..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max);
    Duration::from_secs_f64(gap)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

// ---------------------------------------------------------------- set-up

/// Two hosts, a container on each, maps converged, pings answered.
fn two_hosts(decap: &str) -> (Cluster, usize, usize) {
    let mut cluster = Cluster::up(2, decap);
    let (c0, c1) = cluster.attach_pair(CONVERGE);
    cluster.assert_ping(c0, c1, 2, CONVERGE);
    cluster.assert_ping(c1, c0, 2, CONVERGE);
    (cluster, c0, c1)
}

/// Runs `break_it` on host `i` (a `tc`/`ip` command line), then waits for
/// the running daemon to put `program` back on `dev` at `hook` and for
/// pings to flow again; checks the counter and the log line. Returns the
/// time to the restored attachment (polled) and the longest ping silence.
fn break_and_wait(
    cluster: &Cluster,
    ping: &PingRun,
    i: usize,
    break_it: &[&str],
    dev: &str,
    hook: &str,
    program: &str,
) -> (Duration, Duration) {
    let ns = cluster.host(i).ns().handle();
    let ours = pinned_prog_id(cluster, i, program);
    let attached = |ns: &NsRef| match hook {
        "xdp" => xdp_prog_id(ns, dev),
        _ => tc_prog_id(ns, dev),
    };
    assert_eq!(
        attached(&ns),
        Some(ours),
        "{program} not on {dev} {hook} before the fault"
    );
    let repairs_before = repairs(cluster, i);
    let lines_before = repair_lines(&daemon_log(cluster, i), dev, hook);

    let since = unix_now();
    let started = Instant::now();
    ns.run_ok(break_it);
    let what = break_it.join(" ");
    let back = poll_until(REPAIR_BOUND, || attached(&ns) == Some(ours));
    let restored = started.elapsed();
    assert!(
        back,
        "`{what}` on host {i}: {program} not back on {dev} {hook} within {REPAIR_BOUND:?} \
         (now {:?}, ours {ours}); log:\n{}",
        attached(&ns),
        daemon_log(cluster, i)
    );
    let silence = wait_resumed(ping, since, &what);
    if hook != "xdp" {
        assert!(
            has_clsact(&ns, dev),
            "no clsact qdisc on {dev} after the repair"
        );
    }
    wait_for("the repair to be counted", REPAIR_BOUND, || {
        repairs(cluster, i) > repairs_before
    });
    assert_eq!(
        repairs(cluster, i),
        repairs_before + 1,
        "`{what}`: one attachment missing, one repair"
    );
    assert_eq!(
        repair_lines(&daemon_log(cluster, i), dev, hook),
        lines_before + 1,
        "`{what}`: no single log line for the repair of {dev} {hook}; log:\n{}",
        daemon_log(cluster, i)
    );
    eprintln!(
        "`{what}` on host {i}: {program} back after {restored:?} (polled every 100 ms), \
         longest ping silence {silence:?}"
    );
    (restored, silence)
}

// ================================================================ tests

#[test]
fn running_daemon_restores_deleted_tc_filters_and_clsact() {
    require_root();
    let (mut cluster, c0, c1) = two_hosts("tc");
    let veth0 = host_veth(&cluster, c0);
    let (from, to) = (cluster.container(c0), cluster.container(c1));
    let ping = ping_run(&from.ns.handle(), to.ip);
    let stream = Stream::start(
        &from.ns.handle(),
        &to.ns.handle(),
        SocketAddr::from((to.ip, 5301)),
        STREAM_RATE,
    );
    thread::sleep(Duration::from_millis(500));
    assert!(
        stream.received() > 0,
        "the TCP stream carried nothing before the faults"
    );

    let faults: [(usize, Vec<&str>, &str, &str); 3] = [
        (
            0,
            vec!["tc", "filter", "del", "dev", &veth0, "ingress"],
            &veth0,
            FROM_CONTAINER,
        ),
        (
            1,
            vec!["tc", "filter", "del", "dev", "eth0", "ingress"],
            "eth0",
            TC_FROM_UNDERLAY,
        ),
        (
            1,
            vec!["tc", "qdisc", "del", "dev", "eth0", "clsact"],
            "eth0",
            TC_FROM_UNDERLAY,
        ),
    ];
    for (host, argv, dev, program) in &faults {
        let at = stream.received();
        break_and_wait(&cluster, &ping, *host, argv, dev, "tc ingress", program);
        wait_for("the TCP stream to move on", REPAIR_BOUND, || {
            stream.received() > at
        });
    }
    let (sent, received) = stream
        .finish()
        .unwrap_or_else(|e| panic!("TCP stream across the faults failed: {e:#}"));
    assert_eq!(sent, received, "TCP stream: bytes sent != received");
    eprintln!("TCP stream: {sent} bytes sent and received intact across the faults");
    for daemon in cluster.daemons.iter_mut().flatten() {
        daemon.assert_running();
    }
}

#[test]
fn running_daemon_restores_xdp_turned_off() {
    require_root();
    let (cluster, c0, c1) = two_hosts("xdp");
    let (from, to) = (cluster.container(c0), cluster.container(c1));
    let ping = ping_run(&from.ns.handle(), to.ip);
    break_and_wait(
        &cluster,
        &ping,
        1,
        &["ip", "link", "set", "dev", "eth0", "xdp", "off"],
        "eth0",
        "xdp",
        XDP_FROM_UNDERLAY,
    );
    // With the TC program behind XDP gone too nothing decapsulates.
    break_and_wait(
        &cluster,
        &ping,
        1,
        &["tc", "filter", "del", "dev", "eth0", "ingress"],
        "eth0",
        "tc ingress",
        TC_FROM_UNDERLAY,
    );
    assert_eq!(
        xdp_prog_id(&cluster.host(1).ns().handle(), "eth0"),
        Some(pinned_prog_id(&cluster, 1, XDP_FROM_UNDERLAY)),
        "XDP changed while TC was repaired"
    );
}

#[test]
fn restarted_daemon_restores_everything_before_ready() {
    require_root();
    let (mut cluster, c0, c1) = two_hosts("xdp");
    let veth1 = host_veth(&cluster, c1);
    let ns = cluster.host(1).ns().handle();
    cluster.stop(1);
    ns.run_ok(&["ip", "link", "set", "dev", "eth0", "xdp", "off"]);
    ns.run_ok(&["tc", "qdisc", "del", "dev", "eth0", "clsact"]);
    ns.run_ok(&["tc", "filter", "del", "dev", &veth1, "ingress"]);
    let (a, b) = (cluster.container(c0), cluster.container(c1));
    let broken = ping_stats(&a.ns.handle(), b.ip, 3);
    assert_eq!(
        broken.received, 0,
        "pings crossed with host 1's programs detached: the faults broke nothing\n{}",
        broken.output
    );

    cluster.start(1);
    let (a, b) = (cluster.container(c0), cluster.container(c1));
    // Ready means forwarding: no waiting for a timer.
    for (from, to) in [(a, b), (b, a)] {
        let stats = ping_stats(&from.ns.handle(), to.ip, 3);
        assert!(
            stats.all_received(),
            "ping {} -> {} right after the restart:\n{}",
            from.ip,
            to.ip,
            stats.output
        );
    }
    assert_eq!(repairs(&cluster, 1), 3, "three attachments were missing");
    let log = daemon_log(&cluster, 1);
    for (dev, hook) in [
        ("eth0", "xdp"),
        ("eth0", "tc ingress"),
        (veth1.as_str(), "tc ingress"),
    ] {
        assert_eq!(
            repair_lines(&log, dev, hook),
            1,
            "repair of {dev} {hook} not logged once:\n{log}"
        );
    }
    let ready = log.find("netd running").expect("ready line");
    assert!(
        log.rfind(REPAIRED).is_some_and(|last| last < ready),
        "repairs logged after ready:\n{log}"
    );
    assert_eq!(
        tc_prog_id(&ns, &veth1),
        Some(pinned_prog_id(&cluster, 1, FROM_CONTAINER))
    );
    assert_eq!(
        tc_prog_id(&ns, "eth0"),
        Some(pinned_prog_id(&cluster, 1, TC_FROM_UNDERLAY))
    );
    assert_eq!(
        xdp_prog_id(&ns, "eth0"),
        Some(pinned_prog_id(&cluster, 1, XDP_FROM_UNDERLAY))
    );
}

#[test]
fn vanished_container_is_reported_once_not_repaired() {
    require_root();
    let mut cluster = Cluster::new(1, "tc");
    cluster.run_args(&["--reconcile-interval", "1"]);
    cluster.start(0);
    let c = cluster.attach(0);
    let veth = host_veth(&cluster, c);
    cluster.containers[c].ns.delete();
    let gone = |log: &str| {
        log.lines()
            .filter(|l| l.contains("interface is gone") && l.contains(&format!("iface={veth} ")))
            .count()
    };
    wait_for("the vanished veth to be reported", REPAIR_BOUND, || {
        gone(&daemon_log(&cluster, 0)) > 0
    });
    // Several timer passes later: still one line, nothing counted.
    thread::sleep(Duration::from_millis(3500));
    let log = daemon_log(&cluster, 0);
    assert_eq!(
        gone(&log),
        1,
        "vanished veth reported more than once:\n{log}"
    );
    assert_eq!(
        repairs(&cluster, 0),
        0,
        "a vanished container counted as a repair"
    );
    cluster.daemons[0].as_mut().unwrap().assert_running();
}

#[test]
fn recreated_underlay_nic_is_followed() {
    require_root();
    let (cluster, c0, c1) = two_hosts("tc");
    let host = cluster.host(1);
    let ns = host.ns().handle();
    let link = |ns: &NsRef| json_in(ns, &["ip", "-j", "link", "show", "dev", HOST_IFACE]);
    let before = link(&ns);
    let old_index = before[0]["ifindex"].as_u64().expect("ifindex");
    let mac = before[0]["address"].as_str().expect("MAC").to_string();
    let repairs_before = repairs(&cluster, 1);
    let (from, to) = (cluster.container(c0), cluster.container(c1));
    let ping = ping_run(&from.ns.handle(), to.ip);
    thread::sleep(Duration::from_millis(300));

    // As a driver reload does: a new link under the old name, same MAC and
    // address, new index, no programs.
    let since = unix_now();
    let switch = cluster.topo.switch().handle();
    let port = switch_port(1);
    switch.run_ok(&["ip", "link", "del", &port]);
    switch.run_ok(&[
        "ip",
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        HOST_IFACE,
        "address",
        &mac,
        "netns",
        ns.name(),
    ]);
    switch.run_ok(&["ip", "link", "set", &port, "master", BRIDGE, "up"]);
    let addr = format!("{}/{UNDERLAY_PREFIX_LEN}", host.ip());
    ns.run_ok(&["ip", "addr", "add", &addr, "dev", HOST_IFACE]);
    ns.run_ok(&["ip", "link", "set", HOST_IFACE, "up"]);
    let new_index = link(&ns)[0]["ifindex"].as_u64().expect("ifindex");
    assert_ne!(new_index, old_index, "the link was not re-created");

    // Replies to c0 leave host 1 through from_container's redirect to the
    // underlay index: they only flow once the daemon follows the new link.
    let silence = wait_resumed(&ping, since, "re-creating host 1's eth0");
    assert_eq!(
        tc_prog_id(&ns, HOST_IFACE),
        Some(pinned_prog_id(&cluster, 1, TC_FROM_UNDERLAY)),
        "tc_from_underlay not on the re-created eth0"
    );
    let log = daemon_log(&cluster, 1);
    assert_eq!(
        repair_lines(&log, HOST_IFACE, "tc ingress"),
        1,
        "log:\n{log}"
    );
    assert!(
        log.contains("underlay interface was re-created")
            && log.contains(&format!("new_index={new_index}")),
        "the new underlay index is not logged:\n{log}"
    );
    // The filter and the node configuration's index.
    assert_eq!(repairs(&cluster, 1), repairs_before + 2);
    eprintln!(
        "re-created eth0 on host 1 (index {old_index} -> {new_index}): longest ping silence {silence:?}"
    );
}

#[test]
fn timer_pass_restores_what_no_notification_announced() {
    require_root();
    let mut cluster = Cluster::new(1, "tc");
    cluster.run_args(&["--reconcile-interval", "1"]);
    cluster.start(0);
    let ns = cluster.host(0).ns().handle();
    let veth = "ndvtimer0";
    // A veth the daemon is told about (a link notification) while no
    // record wants it...
    ns.run_ok(&[
        "ip",
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "ndttimer0",
    ]);
    let index = json_in(&ns, &["ip", "-j", "link", "show", "dev", veth])[0]["ifindex"]
        .as_u64()
        .expect("ifindex");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        tc_prog_id(&ns, veth),
        None,
        "a veth nobody recorded got a program"
    );
    // ...then a record of it, written with no link or TC change after it:
    // only the timer's pass can find the program missing.
    let dir = cluster.host(0).run_dir().join("endpoints");
    std::fs::create_dir_all(&dir).expect("endpoints dir");
    let record = serde_json::json!({
        "netns": "selfheal-timer",
        "netns_path": "/run/netns/selfheal-timer",
        "ifname": "eth0",
        "host_ifname": veth,
        "host_ifindex": index,
        "ip": "10.244.250.9",
        "mac": "02:00:00:00:00:09",
        "host_mac": "02:00:00:00:00:0a",
    });
    std::fs::write(dir.join("selfheal-timer.json"), record.to_string()).expect("record");
    let ours = pinned_prog_id(&cluster, 0, FROM_CONTAINER);
    let started = Instant::now();
    wait_for(
        "the timer pass to attach from_container",
        REPAIR_BOUND,
        || tc_prog_id(&ns, veth) == Some(ours),
    );
    eprintln!(
        "timer pass (--reconcile-interval 1): attached after {:?}",
        started.elapsed()
    );
    // from_container and to_container: two attachments, two repairs.
    wait_for("both repairs to be counted", REPAIR_BOUND, || {
        repairs(&cluster, 0) >= 2
    });
    assert_eq!(repairs(&cluster, 0), 2);
    let log = daemon_log(&cluster, 0);
    assert_eq!(repair_lines(&log, veth, "tc ingress"), 1);
    assert_eq!(repair_lines(&log, veth, "tc egress"), 1);
}
