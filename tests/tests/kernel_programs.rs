//! The kernel programs as routers: the inner TTL is decremented once per
//! netd hop (on the sending host, for local delivery, direct routing and
//! encapsulation alike) and a packet that would reach TTL 0 is answered
//! with an ICMP time-exceeded from the gateway; ECN crosses the tunnel as
//! RFC 6040 says. Checked on the output bytes of crafted frames
//! (BPF_PROG_TEST_RUN), then live across hosts with captures and a raw
//! ICMP socket in the sending container.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use netd_tests::bpftool::test_run;
use netd_tests::counters::deltas;
use netd_tests::lease::vtep_mac_bytes as vtep_mac;
use netd_tests::links::{Mac, default_gateway, link_mac, parse_mac};
use netd_tests::traffic::udp_drain;
use netd_tests::{
    Capture, Cluster, IcmpError, IcmpSocket, NsRef, SendOpts, VXLAN_PORT, internet_checksum, ping,
    require_root, udp_sender,
};

const CONVERGE: Duration = Duration::from_secs(10);
/// How long a receiving socket stays quiet before it counts as drained.
const QUIET: Duration = Duration::from_millis(500);

const ETH_P_IP: u16 = 0x0800;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

// ---------------------------------------------------------------------------
// Frames

fn eth(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ETH_P_IP.to_be_bytes()[..], payload].concat()
}

/// An IPv4 packet without options; `df` sets Don't Fragment.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, tos: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let check = internet_checksum(&h);
    h[10..12].copy_from_slice(&check.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    [
        &sport.to_be_bytes()[..],
        &dport.to_be_bytes()[..],
        &len.to_be_bytes()[..],
        &[0, 0][..],
        payload,
    ]
    .concat()
}

fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    [
        &[0x08, 0, 0, 0][..],
        &vni.to_be_bytes()[1..],
        &[0][..],
        inner,
    ]
    .concat()
}

/// `ip` (an IPv4 header and what follows) after one router hop.
fn hopped(ip: &[u8]) -> Vec<u8> {
    let mut out = ip.to_vec();
    out[8] -= 1;
    out[10..12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out
}

/// `ip` with another TOS byte and its checksum recomputed.
fn with_tos(ip: &[u8], tos: u8) -> Vec<u8> {
    let mut out = ip.to_vec();
    out[1] = tos;
    out[10..12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------
// Cluster helpers

struct EndpointInfo {
    mac: Mac,
    host_mac: Mac,
    host_ifindex: u32,
}

fn endpoint(cluster: &Cluster, host: usize, ip: Ipv4Addr) -> EndpointInfo {
    let status = cluster.status(host);
    let ep = status["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["ip"] == ip.to_string().as_str())
        .unwrap_or_else(|| panic!("no endpoint {ip} in {status}"))
        .clone();
    let mac = |f: &str| parse_mac(ep[f].as_str().unwrap_or_else(|| panic!("{f} in {ep}")));
    EndpointInfo {
        mac: mac("mac"),
        host_mac: mac("host_mac"),
        host_ifindex: ep["host_ifindex"].as_u64().expect("host_ifindex") as u32,
    }
}

/// Counters that background chatter moves: the hosts' underlay traffic
/// (etcd, ARP) and the containers' own ARP to their gateway. No check here
/// expects either, so a wrong verdict still shows as the expected counter
/// missing.
const NOISY: [&str; 2] = ["underlay_passed", "container_to_stack"];

fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut d = deltas(before, after);
    for noisy in NOISY {
        d.remove(noisy);
    }
    d
}

fn get(d: &BTreeMap<String, u64>, name: &str) -> u64 {
    d.get(name).copied().unwrap_or(0)
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ---------------------------------------------------------------------------
// BPF_PROG_TEST_RUN

/// Runs a host's pinned programs once on crafted input.
struct ProgRun<'a> {
    cluster: &'a Cluster,
    host: usize,
    dir: tempfile::TempDir,
}

impl<'a> ProgRun<'a> {
    fn new(cluster: &'a Cluster, host: usize) -> Self {
        ProgRun {
            cluster,
            host,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn prog(&self, name: &str) -> PathBuf {
        self.cluster
            .host(self.host)
            .pin_path()
            .join(netd_tests::layout_dir())
            .join(format!("prog_{name}"))
    }

    /// Runs `prog` on `data` (a TC program sees `ingress_ifindex`), and
    /// returns the verdict, the output bytes and the counters that moved.
    fn run(
        &self,
        prog: &str,
        data: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> (u32, Vec<u8>, BTreeMap<String, u64>) {
        let before = self.cluster.counters(self.host);
        let run = test_run(
            self.cluster.host(self.host).ns(),
            self.dir.path(),
            &self.prog(prog),
            data,
            ingress_ifindex,
        );
        assert!(run.success, "{prog}: bpftool failed:\n{}", run.text);
        let ret = run
            .ret
            .unwrap_or_else(|| panic!("{prog}: no return value:\n{}", run.text));
        let after = self.cluster.counters(self.host);
        (ret, run.data_out, moved(&before, &after))
    }
}

/// Asserts that `frame` is an ICMP error from `gateway` back to the sender
/// of `original` (an Ethernet frame), quoting its IPv4 header and 8 bytes.
fn assert_icmp_error_frame(
    what: &str,
    frame: &[u8],
    original: &[u8],
    gateway: Ipv4Addr,
    kind: (u8, u8),
    mtu: u16,
) {
    assert_eq!(frame.len(), 14 + 20 + 8 + 28, "{what}: frame length");
    assert_eq!(
        &frame[0..6],
        &original[6..12],
        "{what}: back to the sender's MAC"
    );
    assert_eq!(
        &frame[6..12],
        &original[0..6],
        "{what}: from the gateway's MAC"
    );
    let ip = &frame[14..34];
    assert_eq!(internet_checksum(ip), 0, "{what}: IPv4 checksum");
    assert_eq!(ip[9], ICMP, "{what}: protocol");
    assert_eq!(&ip[12..16], &gateway.octets(), "{what}: from the gateway");
    assert_eq!(&ip[16..20], &original[26..30], "{what}: to the sender");
    let err = IcmpError::parse(&frame[14..]).unwrap_or_else(|| panic!("{what}: not ICMP"));
    assert_eq!((err.kind, err.code), kind, "{what}: type and code");
    assert_eq!(err.mtu, mtu, "{what}: MTU field");
    assert!(err.icmp_checksum_ok, "{what}: ICMP checksum");
    assert_eq!(&err.quote[..], &original[14..42], "{what}: quote");
}

/// Two hosts running netd (TC decap), containers `[c0, c1, c2]` with c0
/// and c2 on host 0 and c1 on host 1, maps converged.
fn two_hosts_three_containers() -> (Cluster, [usize; 3]) {
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c2 = cluster.attach(0);
    let c1 = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    (cluster, [c0, c1, c2])
}

#[test]
fn prog_run_decrements_ttl_answers_expiry_and_carries_ecn() {
    require_root();
    let (mut cluster, [c0, c1, c2]) = two_hosts_three_containers();
    let (ip0, ip1, ip2) = (
        cluster.container(c0).ip,
        cluster.container(c1).ip,
        cluster.container(c2).ip,
    );
    let (host0, host1) = (cluster.host(0).ip(), cluster.host(1).ip());
    let ep0 = endpoint(&cluster, 0, ip0);
    let ep2 = endpoint(&cluster, 0, ip2);
    let gw0 = default_gateway(&cluster.container(c0).ns.handle());
    let eth0_mac = parse_mac(&link_mac(cluster.host(0).ns(), "eth0"));
    let r = ProgRun::new(&cluster, 0);
    let fc = |frame: &[u8]| r.run("from_container", frame, Some(ep0.host_ifindex));
    let from_c0 = |dst: Ipv4Addr, proto: u8, tos: u8, ttl: u8, payload: &[u8]| {
        eth(
            ep0.host_mac,
            ep0.mac,
            &ipv4(ip0, dst, proto, tos, ttl, payload),
        )
    };
    let dgram = udp(40000, 5555, b"ttl");

    // TTL 1, to a remote and to a local container: time-exceeded from the
    // gateway, back into the sender's veth.
    for (dst, label) in [(ip1, "remote"), (ip2, "local")] {
        let frame = from_c0(dst, UDP, 0, 1, &dgram);
        let (ret, out, d) = fc(&frame);
        let what = format!("TTL 1 to a {label} container");
        assert_eq!(ret, TC_ACT_REDIRECT, "{what}");
        assert_eq!(d, counts(&[("ttl_exceeded", 1)]), "{what}: counters");
        assert_icmp_error_frame(&what, &out, &frame, gw0, (11, 0), 0);
    }
    // TTL 0 is expired too.
    let frame = from_c0(ip1, UDP, 0, 0, &dgram);
    let (ret, out, d) = fc(&frame);
    assert_eq!(ret, TC_ACT_REDIRECT, "TTL 0");
    assert_eq!(d, counts(&[("ttl_exceeded", 1)]), "TTL 0: counters");
    assert_icmp_error_frame("TTL 0", &out, &frame, gw0, (11, 0), 0);
    // A packet shorter than the quote: padded with zeros.
    let short = from_c0(ip1, UDP, 0, 1, &[]);
    let (ret, out, d) = fc(&short);
    assert_eq!(ret, TC_ACT_REDIRECT, "TTL 1, bare IPv4 header");
    assert_eq!(d, counts(&[("ttl_exceeded", 1)]));
    let padded = [&short[..], &[0u8; 8][..]].concat();
    assert_icmp_error_frame("bare header", &out, &padded, gw0, (11, 0), 0);

    // No ICMP error about an ICMP error: dropped and counted.
    let unreachable = [&[3u8, 3, 0, 0, 0, 0, 0, 0][..], &[0u8; 28][..]].concat();
    let (ret, _, d) = fc(&from_c0(ip1, ICMP, 0, 1, &unreachable));
    assert_eq!(ret, TC_ACT_SHOT, "TTL 1 on an ICMP error");
    assert_eq!(d, counts(&[("drop_ttl_expired", 1)]));

    // TTL 2 to a remote container: encapsulated with TTL 1. The outer TOS
    // carries the inner ECN bits only (CE as ECT(0)), the inner TOS stays.
    for (tos, outer_tos) in [
        (0x00, 0x00),
        (0x01, 0x01),
        (0x02, 0x02),
        (0x03, 0x02),
        (0xb9, 0x01),
    ] {
        let frame = from_c0(ip1, UDP, tos, 2, &dgram);
        let (ret, out, d) = fc(&frame);
        let what = format!("TTL 2, TOS {tos:#04x}");
        assert_eq!(ret, TC_ACT_REDIRECT, "{what}");
        assert_eq!(d, counts(&[("encapsulated", 1)]), "{what}: counters");
        assert_eq!(out.len(), frame.len() + 50, "{what}: encapsulated length");
        assert_eq!(out[15], outer_tos, "{what}: outer TOS");
        assert_eq!(internet_checksum(&out[14..34]), 0, "{what}: outer checksum");
        assert_eq!(
            &out[64..],
            &hopped(&frame[14..])[..],
            "{what}: inner packet"
        );
        assert_eq!(out[64 + 8], 1, "{what}: inner TTL");
    }
    // Local delivery is a hop too.
    let frame = from_c0(ip2, UDP, 0x02, 64, &dgram);
    let (ret, out, d) = fc(&frame);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(d, counts(&[("local_delivered", 1)]));
    assert_eq!(&out[..12], &[ep2.mac, ep2.host_mac].concat()[..]);
    assert_eq!(
        &out[14..],
        &hopped(&frame[14..])[..],
        "locally delivered packet"
    );

    // Too big for the tunnel with DF: fragmentation-needed with the tunnel
    // MTU, quoting the packet as it arrived (TTL not yet decremented).
    let big = from_c0(ip1, UDP, 0, 64, &udp(40000, 5555, &[0xab; 1472]));
    assert_eq!(big.len(), 14 + 1500);
    let (ret, out, d) = fc(&big);
    assert_eq!(ret, TC_ACT_REDIRECT, "1500-byte DF");
    assert_eq!(d, counts(&[("frag_needed", 1)]));
    assert_icmp_error_frame("1500-byte DF", &out, &big, gw0, (3, 4), 1450);

    // Decapsulation on host 0: outer CE reaches an ECN-capable inner
    // packet; on a not-ECT one it is a drop (RFC 6040). TTL untouched.
    let host1_mac = [0x02, 0, 0, 0, 0, 0x02];
    let inner_ip = |tos: u8| ipv4(ip1, ip0, UDP, tos, 9, &udp(40001, 5555, b"ecn"));
    let frame = |outer_tos: u8, inner_tos: u8| {
        let inner = eth(vtep_mac(host0), vtep_mac(host1), &inner_ip(inner_tos));
        let outer_udp = udp(41000, VXLAN_PORT, &vxlan(1, &inner));
        eth(
            eth0_mac,
            host1_mac,
            &ipv4(host1, host0, UDP, outer_tos, 64, &outer_udp),
        )
    };
    let cases: [(u8, u8, Option<u8>); 7] = [
        (0x03, 0x02, Some(0x03)),
        (0x03, 0x01, Some(0x03)),
        (0x03, 0xb9, Some(0xbb)),
        (0x03, 0x03, Some(0x03)),
        (0x02, 0x00, Some(0x00)),
        (0x01, 0x02, Some(0x02)),
        (0x03, 0x00, None),
    ];
    for (outer_tos, inner_tos, want) in cases {
        let what = format!("outer TOS {outer_tos:#04x}, inner {inner_tos:#04x}");
        let input = frame(outer_tos, inner_tos);
        let (ret, out, d) = r.run("tc_from_underlay", &input, None);
        let (xret, xout, xd) = r.run("xdp_from_underlay", &input, None);
        match want {
            Some(tos) => {
                let delivered = eth(ep0.mac, ep0.host_mac, &with_tos(&inner_ip(inner_tos), tos));
                assert_eq!(ret, TC_ACT_REDIRECT, "tc: {what}");
                assert_eq!(d, counts(&[("decapsulated", 1)]), "tc: {what}");
                assert_eq!(out, delivered, "tc: {what}: delivered frame");
                assert_eq!(xret, XDP_PASS, "xdp: {what}");
                assert_eq!(xd, counts(&[("decapsulated", 1)]), "xdp: {what}");
                // After the 8 bytes of metadata: tag and the veth's ifindex.
                assert_eq!(&xout[4..8], &ep0.host_ifindex.to_ne_bytes(), "xdp: {what}");
                assert_eq!(&xout[8..], &delivered[..], "xdp: {what}: delivered frame");
            }
            None => {
                assert_eq!(ret, TC_ACT_SHOT, "tc: {what}");
                assert_eq!(d, counts(&[("drop_ecn", 1)]), "tc: {what}");
                assert_eq!(xret, XDP_DROP, "xdp: {what}");
                assert_eq!(xd, counts(&[("drop_ecn", 1)]), "xdp: {what}");
            }
        }
    }
    drop(r);
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    assert!(ping(&cluster.container(c0).ns.handle(), ip1, 2));
}

// ---------------------------------------------------------------------------
// Live

/// A UDP socket bound in `ns` for datagrams sent to it.
fn listener(ns: &NsRef, port: u16) -> UdpSocket {
    let sock = ns.run_in_thread(move || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .unwrap_or_else(|e| panic!("bind {port}: {e}"))
    });
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock
}

/// A container's UDP with TTL 9 and each ECN code point crosses to another
/// host: the underlay shows the outer ECN as the kernel's VXLAN sets it and
/// the inner TTL one lower, and the receiver gets TTL 8 and its ECN bits
/// untouched. CE set on the outer header by the underlay (a peer's socket
/// with TOS CE, carrying the inner frame) reaches the container as CE, or
/// is dropped and counted when the inner packet is not ECN-capable.
fn ttl_and_ecn_cross_hosts(decap: &str) {
    require_root();
    let mut cluster = Cluster::up(2, decap);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    cluster.wait_peers_match_etcd(1, CONVERGE);
    let (ip0, ip1) = (cluster.container(c0).ip, cluster.container(c1).ip);
    let (n0, n1) = (
        cluster.container(c0).ns.handle(),
        cluster.container(c1).ns.handle(),
    );
    assert!(ping(&n0, ip1, 2), "[{decap}] overlay is not up");

    let port = 5600;
    let rx = listener(&n1, port);
    let mut wire = Capture::start(cluster.host(0).ns(), "eth0", "udp port 8472");
    let mut at_b = Capture::start(&n1, "eth0", &format!("udp port {port}"));
    let ecns = [0u8, 1, 2, 3];
    for ecn in ecns {
        let tx = udp_sender(
            &n0,
            SocketAddr::from((ip0, 0)),
            SendOpts {
                ttl: 9,
                tos: ecn,
                df: false,
            },
        );
        tx.send_to(format!("ecn{ecn}").as_bytes(), (ip1, port))
            .unwrap();
    }
    let mut got: Vec<String> = udp_drain(&rx, QUIET)
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["ecn0", "ecn1", "ecn2", "ecn3"],
        "[{decap}] datagrams at B"
    );
    // Outer then inner value of each field, comma-joined by tshark.
    let wire_rows = wire.rows_matching(
        &format!("udp.dstport == {port}"),
        &["ip.dsfield.ecn", "ip.ttl"],
    );
    let mut wire_seen: Vec<(String, String)> = wire_rows
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    wire_seen.sort();
    let want_wire: Vec<(String, String)> = [(0, 0), (1, 1), (2, 2), (2, 3)]
        .iter()
        .map(|(o, i)| (format!("{o},{i}"), "64,8".to_string()))
        .collect();
    assert_eq!(
        wire_seen, want_wire,
        "[{decap}] on the underlay (outer,inner ECN; outer,inner TTL)"
    );
    let mut b_seen: Vec<(String, String)> = at_b
        .rows(&["ip.dsfield.ecn", "ip.ttl"])
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    b_seen.sort();
    let want_b: Vec<(String, String)> = ecns
        .iter()
        .map(|e| (e.to_string(), "8".to_string()))
        .collect();
    assert_eq!(b_seen, want_b, "[{decap}] at B's eth0 (ECN, TTL)");

    // CE from the underlay, towards container 0.
    let rx0 = listener(&n0, port);
    let host0 = cluster.host(0).ip();
    let host1 = cluster.host(1).ip();
    let ep0 = endpoint(&cluster, 0, ip0);
    let ce_sock = udp_sender(
        cluster.host(1).ns(),
        SocketAddr::from((host1, 0)),
        SendOpts {
            ttl: 64,
            tos: 0x03,
            df: false,
        },
    );
    let inner = |tos: u8, tag: &[u8]| {
        vxlan(
            1,
            &eth(
                ep0.mac,
                vtep_mac(host1),
                &ipv4(ip1, ip0, UDP, tos, 7, &udp(40001, port, tag)),
            ),
        )
    };
    let mut at_a = Capture::start(&n0, "eth0", &format!("udp port {port}"));
    let before = cluster.counters(0);
    ce_sock
        .send_to(&inner(0x02, b"ect0"), (host0, VXLAN_PORT))
        .unwrap();
    ce_sock
        .send_to(&inner(0x00, b"not-ect"), (host0, VXLAN_PORT))
        .unwrap();
    let got = udp_drain(&rx0, QUIET);
    let d = moved(&before, &cluster.counters(0));
    assert_eq!(
        got,
        vec![b"ect0".to_vec()],
        "[{decap}] container 0 got; counters {d:?}"
    );
    // XDP strips and TC behind it delivers; TC alone does both.
    let delivered_by_tc = u64::from(decap == "xdp");
    for (c, n) in [
        ("decapsulated", 1),
        ("drop_ecn", 1),
        ("underlay_delivered", delivered_by_tc),
        ("drop_malformed", 0),
        ("drop_unknown_peer", 0),
    ] {
        assert_eq!(get(&d, c), n, "[{decap}] host 0 {c}: {d:?}");
    }
    let a_rows = at_a.rows(&["ip.dsfield.ecn", "ip.ttl"]);
    assert_eq!(
        a_rows,
        vec![vec!["3".to_string(), "7".to_string()]],
        "[{decap}] at A's eth0: CE carried in, TTL as sent by the peer"
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}

#[test]
fn ttl_and_ecn_cross_hosts_tc() {
    ttl_and_ecn_cross_hosts("tc");
}

#[test]
fn ttl_and_ecn_cross_hosts_xdp() {
    ttl_and_ecn_cross_hosts("xdp");
}

/// A container's TTL-1 packet, to a remote and to a local container, comes
/// back as a time-exceeded from its gateway that reaches its stack: valid
/// checksums, the original header and ports quoted; nothing crosses.
#[test]
fn ttl_expiry_is_answered_with_time_exceeded() {
    require_root();
    let (mut cluster, [c0, c1, c2]) = two_hosts_three_containers();
    let (ip0, ip1, ip2) = (
        cluster.container(c0).ip,
        cluster.container(c1).ip,
        cluster.container(c2).ip,
    );
    let n0 = cluster.container(c0).ns.handle();
    assert!(ping(&n0, ip1, 2), "overlay is not up");
    let gw = default_gateway(&n0);
    let port = 5601;
    let (rx1, rx2) = (
        listener(&cluster.container(c1).ns.handle(), port),
        listener(&cluster.container(c2).ns.handle(), port),
    );
    let mut icmp = IcmpSocket::open(&n0);
    let tx = udp_sender(
        &n0,
        SocketAddr::from((ip0, 0)),
        SendOpts {
            ttl: 1,
            tos: 0,
            df: false,
        },
    );
    let sport = tx.local_addr().unwrap().port();
    let (b0, b1) = (cluster.counters(0), cluster.counters(1));
    for dst in [ip1, ip2] {
        tx.send_to(b"expire", (dst, port)).unwrap();
    }
    let errors = icmp.errors(Duration::from_millis(700), Duration::from_secs(3));
    let (d0, d1) = (
        moved(&b0, &cluster.counters(0)),
        moved(&b1, &cluster.counters(1)),
    );
    let why = format!("errors {errors:?}\nhost 0 counters {d0:?}\nhost 1 counters {d1:?}");
    assert_eq!(errors.len(), 2, "{why}");
    for dst in [ip1, ip2] {
        let err = errors
            .iter()
            .find(|e| e.quote.get(16..20) == Some(&dst.octets()[..]))
            .unwrap_or_else(|| panic!("no time-exceeded quoting a packet to {dst}\n{why}"));
        assert_eq!(
            (err.kind, err.code),
            (11, 0),
            "time exceeded in transit\n{why}"
        );
        assert_eq!(
            (err.src, err.dst),
            (gw, ip0),
            "from the gateway to A\n{why}"
        );
        assert!(
            err.ip_checksum_ok && err.icmp_checksum_ok,
            "checksums\n{why}"
        );
        let q = &err.quote;
        assert!(q.len() >= 28, "quote length\n{why}");
        assert_eq!(q[0], 0x45, "quoted header\n{why}");
        assert_eq!(q[8], 1, "quoted TTL: as sent\n{why}");
        assert_eq!(q[9], UDP, "quoted protocol\n{why}");
        assert_eq!(
            internet_checksum(&q[..20]),
            0,
            "quoted header intact\n{why}"
        );
        assert_eq!(&q[12..16], &ip0.octets(), "quoted source\n{why}");
        assert_eq!(&q[16..20], &dst.octets(), "quoted destination\n{why}");
        assert_eq!(
            &q[20..24],
            &[&sport.to_be_bytes()[..], &port.to_be_bytes()[..]].concat()[..],
            "quoted ports\n{why}"
        );
    }
    assert_eq!(get(&d0, "ttl_exceeded"), 2, "host 0\n{why}");
    for c in ["encapsulated", "local_delivered", "drop_ttl_expired"] {
        assert_eq!(get(&d0, c), 0, "host 0 {c}\n{why}");
    }
    for c in ["decapsulated", "decap_to_stack"] {
        assert_eq!(get(&d1, c), 0, "host 1 {c}\n{why}");
    }
    assert!(
        udp_drain(&rx1, QUIET).is_empty() && udp_drain(&rx2, QUIET).is_empty(),
        "{why}"
    );
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}
