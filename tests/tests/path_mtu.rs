//! An underlay path whose MTU is below the NICs': three hosts with 1500-byte
//! NICs, hosts 0 and 1 on one segment, host 2 on a second one behind a
//! router whose link into host 2's segment has MTU 1400.
//!
//! netd's outer packets leave with DF clear, so the router fragments them;
//! the receiving host passes the outer fragments to its stack
//! (`underlay_fragment_to_stack`), which reassembles them for netd's
//! collect_md VXLAN device, whose program delivers the inner frame into the
//! container (`reassembled_delivered`). Containers keep their full MTU.

use netd_tests::counters::{Counters, assert_grew, delta};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use netd_tests::topology::{BRIDGE, SEGMENT_B_BRIDGE, segment_b_ip};
use netd_tests::{
    Cluster, NsRef, Topology, VXLAN_PORT, host_ip, ping_stats_sized, poll_until, require_root,
    tcp_transfer, udp_echo, wait_for,
};

/// MTU of the router's link into a segment.
const PATH_MTU: u32 = 1400;
/// Largest ICMP payload a container sends unfragmented (its MTU is the
/// NIC's 1500 minus 50): 1450 - 20 - 8.
const BIG_PING: usize = 1422;
/// Echo requests per big ping run.
const PINGS: u32 = 3;
/// UDP payloads: one inner packet of full size whose outer packet the
/// router must split, and datagrams the container itself fragments too.
const UDP_SIZES: [usize; 4] = [1400, 1422, 4000, 9000];
/// Bytes of each verified TCP transfer.
const TCP_BYTES: usize = 4 << 20;
const CONVERGE: Duration = Duration::from_secs(30);
/// Name of netd's tunnel device in each host namespace.
const DEVICE: &str = "netd.vx";
/// `from_tunnel_device` as `tc filter show` names it (the kernel keeps 15
/// characters of a program name).
const PROGRAM: &str = "from_tunnel_dev";
const DROPS: [&str; 6] = [
    "drop_unknown_peer",
    "drop_bad_vni",
    "drop_malformed",
    "drop_fragment",
    "drop_adjust_failed",
    "drop_redirect_failed",
];

/// The topology, daemons running with `decap`, one container per host
/// (container i on host i).
fn routed_cluster(decap: &str) -> Cluster {
    let mut topo = Topology::new(3);
    topo.add_routed_segment(&[2]);
    topo.set_router_mtu(SEGMENT_B_BRIDGE, PATH_MTU);
    let mut cluster = Cluster::on_topology(topo, decap);
    cluster.init_network();
    for h in 0..3 {
        cluster.start(h);
    }
    for h in 0..3 {
        cluster.attach(h);
    }
    for h in 0..3 {
        cluster.wait_peers_match_etcd(h, CONVERGE);
    }
    cluster
}

/// A TCP transfer of [`TCP_BYTES`] towards host `h` crossed the path as
/// fragments: every data segment's outer packet in two at least. The
/// tunnel device's GRO merges the reassembled segments before its program
/// sees them, so deliveries are fewer than segments.
fn assert_tcp_reassembled(h: usize, before: &Counters, after: &Counters, why: &str) {
    let segments = (TCP_BYTES / 1448) as u64;
    assert_grew(
        h,
        before,
        after,
        "underlay_fragment_to_stack",
        2 * segments,
        why,
    );
    assert_grew(h, before, after, "reassembled_delivered", 1, why);
}

/// `PINGS` echo requests of `BIG_PING` bytes from container `from` to
/// container `to`, every one answered (retried until [`CONVERGE`] only
/// for the first run after a change).
fn assert_big_ping(cluster: &Cluster, from: usize, to: usize) {
    let (f, t) = (cluster.container(from), cluster.container(to));
    let mut last = None;
    let ok = poll_until(CONVERGE, || {
        let stats = ping_stats_sized(&f.ns, t.ip, PINGS, BIG_PING);
        let ok = stats.all_received();
        last = Some(stats);
        ok
    });
    assert!(
        ok,
        "{BIG_PING}-byte pings container {from} -> container {to} ({}): not all answered within {CONVERGE:?}:\n{}",
        t.ip,
        last.map(|s| s.output).unwrap_or_default()
    );
}

/// Big pings from `from` to `to`, and what the receiving host `rx` counted
/// for them: every request (and reply) arrived as outer fragments that the
/// stack reassembled for the tunnel device.
fn big_ping_reassembled(cluster: &Cluster, from: usize, to: usize, rx: usize) {
    assert_big_ping(cluster, from, to);
    let before = cluster.counters(rx);
    let stats = ping_stats_sized(
        &cluster.container(from).ns,
        cluster.container(to).ip,
        PINGS,
        BIG_PING,
    );
    let after = cluster.counters(rx);
    assert!(
        stats.all_received(),
        "big pings {from} -> {to}:\n{}",
        stats.output
    );
    let why = format!(
        "{PINGS} pings of {BIG_PING} bytes between containers {from} and {to}, host {rx} receiving fragments"
    );
    let n = PINGS as u64;
    assert_grew(
        rx,
        &before,
        &after,
        "underlay_fragment_to_stack",
        2 * n,
        &why,
    );
    assert_grew(rx, &before, &after, "reassembled_delivered", n, &why);
    assert_eq!(
        delta(&before, &after, "drop_fragment"),
        0,
        "host {rx} dropped fragments: {after:?}"
    );
}

/// The underlay itself: host 0 reaches host 2 with 1372-byte DF pings and
/// is told "frag needed" for 1472 bytes, so the path MTU really is 1400.
fn assert_path_mtu(cluster: &Cluster, from: usize, to: Ipv4Addr) {
    let ns = cluster.host(from).ns();
    let ping = |size: usize| {
        let size = size.to_string();
        let to = to.to_string();
        ns.exec(&[
            "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", &size, &to,
        ])
    };
    let small = ping(PATH_MTU as usize - 28);
    assert!(
        small.status.success(),
        "underlay DF ping of the path MTU from host {from} to {to}: {small:?}"
    );
    let big = ping(1472);
    assert!(
        !big.status.success(),
        "a 1500-byte DF packet from host {from} crossed to {to}: the path MTU is not below 1500"
    );
}

/// netd's device is a collect_md VXLAN device on the VXLAN port with
/// `from_tunnel_device` on its ingress.
fn assert_tunnel_device(cluster: &Cluster, h: usize) {
    let ns = cluster.host(h).ns();
    let link = ns.run_ok(&["ip", "-d", "link", "show", DEVICE]);
    assert!(
        link.contains("vxlan external")
            && link.contains(&format!("dstport {VXLAN_PORT}"))
            && link.contains(",UP"),
        "host {h}: {DEVICE} is not an external VXLAN device on port {VXLAN_PORT}, up:\n{link}"
    );
    let filters = ns.run_ok(&["tc", "filter", "show", "dev", DEVICE, "ingress"]);
    assert!(
        filters.contains(PROGRAM),
        "host {h}: no from_tunnel_device on {DEVICE}'s ingress:\n{filters}"
    );
}

fn tcp_ok(cluster: &Cluster, from: usize, to: usize, port: u16) {
    let (f, t) = (cluster.container(from), cluster.container(to));
    let dst = SocketAddr::new(t.ip.into(), port);
    let transfer = tcp_transfer(&f.ns, &t.ns, dst, TCP_BYTES)
        .unwrap_or_else(|e| panic!("TCP container {from} -> container {to} ({dst}): {e:#}"));
    assert_eq!(transfer.bytes, TCP_BYTES, "TCP {from} -> {to}: byte count");
}

/// Throughput of `iperf3 -t 3` from container `from` to container `to`,
/// for the log only (never asserted: the machine is shared).
fn iperf3_mbit(cluster: &Cluster, from: usize, to: usize, port: u16) -> f64 {
    let (f, t) = (cluster.container(from), cluster.container(to));
    let port = port.to_string();
    let mut server =
        t.ns.command("iperf3")
            .args(["-s", "-1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
    let ip = t.ip.to_string();
    let mut out = None;
    // The server needs a moment to listen.
    let ran = poll_until(Duration::from_secs(5), || {
        let o =
            f.ns.exec(&["iperf3", "-c", &ip, "-p", &port, "-t", "3", "-J"]);
        // With -J, a refused connection may still exit 0: look for the
        // error in the report.
        let ok = o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("\"error\"");
        out = Some(o);
        ok
    });
    let _ = server.kill();
    let _ = server.wait();
    let out = out.expect("iperf3 ran");
    assert!(ran, "iperf3 {from} -> {to}: {out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let bits = json["end"]["sum_received"]["bits_per_second"].as_f64();
    bits.unwrap_or_else(|| panic!("iperf3 {from} -> {to}: no throughput in {json}")) / 1e6
}

fn udp_ok(cluster: &Cluster, from: usize, to: usize, port: u16) {
    let (f, t) = (cluster.container(from), cluster.container(to));
    let dst = SocketAddr::new(t.ip.into(), port);
    udp_echo(&f.ns, &t.ns, dst, &UDP_SIZES).unwrap_or_else(|e| {
        panic!("UDP {UDP_SIZES:?} container {from} -> container {to} and back: {e:#}")
    });
}

fn assert_no_drops(cluster: &Cluster) {
    for h in 0..3 {
        let c = cluster.counters(h);
        for drop in DROPS {
            assert_eq!(c[drop], 0, "host {h} counted {drop}: {c:?}");
        }
    }
}

/// Pings, UDP and TCP across the 1400 path both ways; first with only the
/// link into host 2's segment at 1400 (host 2 reassembles), then with the
/// router's link into host 0's segment at 1400 too (host 0 reassembles).
fn across_the_smaller_path(decap: &str) {
    let cluster = routed_cluster(decap);
    assert_path_mtu(&cluster, 0, segment_b_ip(2));
    for h in 0..3 {
        assert_tunnel_device(&cluster, h);
    }

    // Towards host 2: fragmented by the router.
    big_ping_reassembled(&cluster, 0, 2, 2);
    let before = cluster.counters(2);
    udp_ok(&cluster, 0, 2, 7100);
    udp_ok(&cluster, 2, 0, 7101);
    let after = cluster.counters(2);
    // Each run sends host 2 one datagram of each size (there, or echoed
    // back): 1400 and 1422 bytes are one inner packet each, 4000 and 9000
    // are 3 and 7 inner fragments of which the last (1230 and 534 bytes
    // outside) fits the path; every other outer packet is cut in two.
    let reassembled = 1 + 1 + 2 + 6;
    let why = format!("UDP {UDP_SIZES:?} to container 2 and echoed to it");
    assert_grew(
        2,
        &before,
        &after,
        "reassembled_delivered",
        2 * reassembled,
        &why,
    );
    assert_grew(
        2,
        &before,
        &after,
        "underlay_fragment_to_stack",
        4 * reassembled,
        &why,
    );

    let before = cluster.counters(2);
    tcp_ok(&cluster, 0, 2, 7200);
    tcp_ok(&cluster, 2, 0, 7201);
    let after = cluster.counters(2);
    assert_tcp_reassembled(2, &before, &after, "TCP to container 2");
    let fragmented = iperf3_mbit(&cluster, 0, 2, 7300);
    let back = iperf3_mbit(&cluster, 2, 0, 7301);
    let same_segment = iperf3_mbit(&cluster, 0, 1, 7302);
    eprintln!(
        "decap {decap}: iperf3 -t 3 container 0 -> 2 across the {PATH_MTU} path: \
         {fragmented:.0} Mbit/s; 2 -> 0: {back:.0} Mbit/s; 0 -> 1 on a 1500 path: \
         {same_segment:.0} Mbit/s"
    );
    assert_no_drops(&cluster);

    // Towards host 0 as well.
    cluster.topo.set_router_mtu(BRIDGE, PATH_MTU);
    assert_path_mtu(&cluster, 2, host_ip(0));
    big_ping_reassembled(&cluster, 2, 0, 0);
    let before = cluster.counters(0);
    udp_ok(&cluster, 2, 0, 7102);
    tcp_ok(&cluster, 2, 0, 7203);
    tcp_ok(&cluster, 0, 2, 7204);
    let after = cluster.counters(0);
    let why = "UDP and TCP to container 0 with both router links at 1400";
    assert_tcp_reassembled(0, &before, &after, why);
    let both = iperf3_mbit(&cluster, 2, 0, 7303);
    eprintln!(
        "decap {decap}: both router links at {PATH_MTU}: iperf3 -t 3 container 2 -> 0: {both:.0} Mbit/s"
    );
    assert_no_drops(&cluster);

    // For comparison, the same route with nothing to fragment.
    cluster.topo.set_router_mtu(BRIDGE, 1500);
    cluster.topo.set_router_mtu(SEGMENT_B_BRIDGE, 1500);
    let unfragmented = iperf3_mbit(&cluster, 0, 2, 7304);
    eprintln!(
        "decap {decap}: both router links at 1500: iperf3 -t 3 container 0 -> 2: {unfragmented:.0} Mbit/s"
    );
}

#[test]
fn fragmented_underlay_path_tc() {
    require_root();
    across_the_smaller_path("tc");
}

#[test]
fn fragmented_underlay_path_xdp() {
    require_root();
    across_the_smaller_path("xdp");
}

/// Sends one UDP datagram of `len` bytes to `dst` on the VXLAN port from
/// `from`'s namespace: a VXLAN header with `vni` in front of an inner
/// IPv4 frame for `inner_dst`, big enough that the sender's own stack
/// fragments it.
fn send_vxlan(from: &NsRef, dst: Ipv4Addr, vni: u32, inner_dst: Ipv4Addr, len: usize) {
    let mut packet = vec![0x08, 0, 0, 0];
    packet.extend_from_slice(&(vni << 8).to_be_bytes());
    // Inner Ethernet: any MACs, IPv4.
    packet.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let total = (len - packet.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 244, 250, 1];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&inner_dst.octets());
    packet.extend_from_slice(&ip);
    packet.resize(len, 0xab);
    from.run_in_thread(move || {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        socket
            .send_to(&packet, (dst, VXLAN_PORT))
            .expect("send crafted VXLAN");
    });
}

/// The reassembly path keeps the decapsulation's rules: a reassembled
/// datagram from a peer with another VNI is dropped (`drop_bad_vni`), a
/// first fragment from an address that is not a peer is dropped
/// (`drop_fragment`) and nothing of it is delivered. The device is put
/// back when deleted, its program when detached, and `netd teardown`
/// removes it.
#[test]
fn tunnel_device_rules_and_reconciliation() {
    require_root();
    let mut cluster = routed_cluster("tc");
    let far = segment_b_ip(2);
    let c2 = cluster.container(2).ip;

    // From peer host 0 with VNI 77.
    let before = cluster.counters(2);
    send_vxlan(cluster.host(0).ns(), far, 77, c2, 3000);
    std::thread::sleep(Duration::from_millis(500));
    let after = cluster.counters(2);
    assert_eq!(
        delta(&before, &after, "drop_bad_vni"),
        1,
        "wrong VNI: {after:?}"
    );
    assert!(
        delta(&before, &after, "underlay_fragment_to_stack") >= 2,
        "{after:?}"
    );
    assert_eq!(
        delta(&before, &after, "reassembled_delivered"),
        0,
        "{after:?}"
    );

    // From the router's own address on host 2's segment: not a peer.
    let before = cluster.counters(2);
    let router = cluster.topo.switch().handle();
    send_vxlan(&router, far, 1, c2, 3000);
    std::thread::sleep(Duration::from_millis(500));
    let after = cluster.counters(2);
    assert_eq!(
        delta(&before, &after, "drop_fragment"),
        1,
        "first fragment from a non-peer: {after:?}"
    );
    assert_eq!(
        delta(&before, &after, "underlay_fragment_to_stack"),
        0,
        "{after:?}"
    );
    assert_eq!(
        delta(&before, &after, "reassembled_delivered"),
        0,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "drop_bad_vni"), 0, "{after:?}");

    // Deleted: back within 10 s, and big packets cross again.
    let ns = cluster.host(2).ns().handle();
    ns.run_ok(&["ip", "link", "del", DEVICE]);
    wait_for(
        &format!("{DEVICE} re-created on host 2"),
        Duration::from_secs(10),
        || {
            let filters = ns.exec(&["tc", "filter", "show", "dev", DEVICE, "ingress"]);
            String::from_utf8_lossy(&filters.stdout).contains(PROGRAM)
        },
    );
    assert_tunnel_device(&cluster, 2);
    big_ping_reassembled(&cluster, 0, 2, 2);

    // Program detached: re-attached within 10 s.
    ns.run_ok(&["tc", "filter", "del", "dev", DEVICE, "ingress"]);
    wait_for(
        &format!("from_tunnel_device back on {DEVICE}"),
        Duration::from_secs(10),
        || {
            let filters = ns.exec(&["tc", "filter", "show", "dev", DEVICE, "ingress"]);
            String::from_utf8_lossy(&filters.stdout).contains(PROGRAM)
        },
    );
    big_ping_reassembled(&cluster, 0, 2, 2);

    // Teardown removes it.
    cluster.stop(2);
    cluster.netd_ok(2, &["teardown"]);
    let gone = ns.exec(&["ip", "link", "show", DEVICE]);
    assert!(
        !gone.status.success(),
        "{DEVICE} still there after teardown"
    );
}

/// A host namespace whose VXLAN port is already bound by another VXLAN
/// device (a flannel `flannel.1` left in place): netd cannot create its
/// tunnel device, says so once, and runs; unfragmented traffic works.
#[test]
fn vxlan_port_taken_by_another_device() {
    require_root();
    let topo = Topology::new(2);
    let ns = topo.host(1).ns().handle();
    let port = VXLAN_PORT.to_string();
    ns.run_ok(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        &port,
        "nolearning",
    ]);
    ns.run_ok(&["ip", "link", "set", "flannel.1", "up"]);
    let mut cluster = Cluster::on_topology(topo, "tc");
    cluster.init_network();
    for h in 0..2 {
        cluster.start(h);
        cluster.attach(h);
    }
    for h in 0..2 {
        cluster.wait_peers_match_etcd(h, CONVERGE);
    }
    assert_tunnel_device(&cluster, 0);
    assert!(
        !ns.exec(&["ip", "link", "show", DEVICE]).status.success(),
        "host 1 has {DEVICE} although {VXLAN_PORT} was taken"
    );
    let log = cluster.daemons[1].as_ref().expect("daemon 1").log();
    let said = log.matches("is already bound in this namespace").count();
    assert_eq!(said, 1, "host 1 should name the taken port once:\n{log}");
    assert_big_ping(&cluster, 0, 1);
    assert_big_ping(&cluster, 1, 0);
    // Still once, after a few reconciliation rounds.
    std::thread::sleep(Duration::from_secs(7));
    let log = cluster.daemons[1].as_ref().expect("daemon 1").log();
    assert_eq!(
        log.matches("is already bound in this namespace").count(),
        1,
        "host 1 repeated the taken-port warning:\n{log}"
    );
}
