//! The underlay and container programs facing hostile or broken input:
//! VXLAN from strangers and with the wrong VNI on the wire, and crafted,
//! truncated and odd frames fed to the pinned programs with
//! `bpftool prog run` (BPF_PROG_TEST_RUN).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netd_tests::bpftool::{TestRun, test_run};
use netd_tests::counters::deltas;
use netd_tests::lease::vtep_mac_bytes as vtep_mac;
use netd_tests::links::{Mac, link_mac, parse_mac};
use netd_tests::traffic::udp_drain;
use netd_tests::{Cluster, NsRef, VXLAN_PORT, internet_checksum, ping, require_root};

/// Counter the host's own underlay chatter (etcd, ARP) keeps moving.
const NOISY: &str = "underlay_passed";

// ---------------------------------------------------------------------------
// Frames

fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet; `options` must be a multiple of 4 bytes.
fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    frag_off: u16,
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let hlen = 20 + options.len();
    let total = (hlen + payload.len()) as u16;
    let mut h = vec![0x40 | (hlen / 4) as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes());
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let check = internet_checksum(&h);
    h[10..12].copy_from_slice(&check.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, &[], 0, payload)
}

/// UDP with checksum 0 (none), which IPv4 allows.
fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn vxlan(flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![flags, 0, 0, 0];
    v.extend_from_slice(&vni.to_be_bytes()[1..]);
    v.push(0);
    v.extend_from_slice(inner);
    v
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const UDP: u8 = 17;

fn arp_request(src_mac: Mac, src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&src.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], src_mac, ETH_P_ARP, &a)
}

/// An IPv6 UDP datagram to port `dport` (fe80::1 → fe80::2).
fn ipv6_udp(dport: u16) -> Vec<u8> {
    let payload = udp(40000, dport, b"v6");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[UDP, 64]);
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[15] = 1;
    p.extend_from_slice(&a);
    a[15] = 2;
    p.extend_from_slice(&a);
    p.extend_from_slice(&payload);
    p
}

// ---------------------------------------------------------------------------
// Cluster helpers

/// An attached container's MAC and its host-side veth MAC, from status.
fn endpoint_macs(cluster: &Cluster, host: usize, ip: Ipv4Addr) -> (Mac, Mac) {
    let status = cluster.status(host);
    let ep = status["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["ip"] == ip.to_string().as_str())
        .unwrap_or_else(|| panic!("no endpoint {ip} in {status}"));
    let mac = |f: &str| parse_mac(ep[f].as_str().unwrap_or_else(|| panic!("{f} in {ep}")));
    (mac("mac"), mac("host_mac"))
}

/// A UDP socket created inside `ns` (it stays there whichever thread uses it).
fn udp_socket_in(ns: &NsRef, bind: SocketAddr) -> UdpSocket {
    ns.run_in_thread(move || UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
}

// ---------------------------------------------------------------------------
// 6. VXLAN on the wire from a stranger, and with a bad VNI from a peer.

fn vxlan_from_strangers_and_bad_vni_are_dropped(decap: &str) {
    require_root();
    let mut cluster = Cluster::up(2, decap);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, Duration::from_secs(5));
    cluster.wait_peers_match_etcd(1, Duration::from_secs(5));
    let (ip0, ip1) = (cluster.container(c0).ip, cluster.container(c1).ip);
    assert!(
        ping(&cluster.container(c1).ns.handle(), ip0, 2),
        "overlay is not up"
    );

    // A listener in the container on host 0 the crafted frames are aimed at.
    let port = 5555;
    let listener = udp_socket_in(
        &cluster.container(c0).ns.handle(),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
    );
    let host0 = cluster.host(0).ip();
    let host1 = cluster.host(1).ip();
    let target = SocketAddr::from((host0, VXLAN_PORT));
    let (c0_mac, _) = endpoint_macs(&cluster, 0, ip0);
    let frame = |flags: u8, vni: u32, tag: &[u8]| {
        let inner = eth(
            c0_mac,
            vtep_mac(host1),
            ETH_P_IP,
            &ipv4(ip1, ip0, UDP, &udp(40001, port, tag)),
        );
        vxlan(flags, vni, &inner)
    };

    // The switch's own address is on the underlay but is not a peer.
    let switch = cluster.topo.switch().handle();
    let rogue = udp_socket_in(&switch, SocketAddr::from((netd_tests::SWITCH_IP, 0)));
    let peer = udp_socket_in(
        cluster.host(1).ns(),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
    );
    let sent = 5u64;

    let before = cluster.counters(0);
    for _ in 0..sent {
        rogue.send_to(&frame(0x08, 1, b"rogue"), target).unwrap();
    }
    let rogue_got = udp_drain(&listener, Duration::from_millis(500));
    let after = cluster.counters(0);
    let d = deltas(&before, &after);
    assert_eq!(
        d.get("drop_unknown_peer").copied(),
        Some(sent),
        "[{decap}] counters moved {d:?}"
    );
    assert!(
        rogue_got.is_empty(),
        "[{decap}] container got {rogue_got:?}"
    );

    // From a real peer: another VNI, and VNI 1 without the I flag.
    let before = cluster.counters(0);
    for _ in 0..sent {
        peer.send_to(&frame(0x08, 2, b"vni2"), target).unwrap();
        peer.send_to(&frame(0x00, 1, b"noflag"), target).unwrap();
    }
    let bad_got = udp_drain(&listener, Duration::from_millis(500));
    let after = cluster.counters(0);
    let d = deltas(&before, &after);
    assert_eq!(
        d.get("drop_bad_vni").copied(),
        Some(2 * sent),
        "[{decap}] counters moved {d:?}"
    );
    assert_eq!(d.get("drop_unknown_peer"), None, "[{decap}] {d:?}");
    assert!(bad_got.is_empty(), "[{decap}] container got {bad_got:?}");

    // Control: the same frame, well-formed, from the peer is delivered, so
    // the listener would have seen the others had they got through.
    let before = cluster.counters(0);
    peer.send_to(&frame(0x08, 1, b"good"), target).unwrap();
    let good = udp_drain(&listener, Duration::from_millis(1000));
    let d = deltas(&before, &cluster.counters(0));
    assert_eq!(good, vec![b"good".to_vec()], "[{decap}] counters {d:?}");
    assert_eq!(d.get("decapsulated").copied(), Some(1), "[{decap}] {d:?}");
    for bad in ["drop_unknown_peer", "drop_bad_vni", "drop_malformed"] {
        assert_eq!(d.get(bad), None, "[{decap}] {d:?}");
    }
    // And real traffic was never disturbed.
    assert!(ping(&cluster.container(c1).ns.handle(), ip0, 2));
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
}

#[test]
fn vxlan_from_non_peer_or_bad_vni_is_dropped_tc() {
    vxlan_from_strangers_and_bad_vni_are_dropped("tc");
}

#[test]
fn vxlan_from_non_peer_or_bad_vni_is_dropped_xdp() {
    vxlan_from_strangers_and_bad_vni_are_dropped("xdp");
}

// ---------------------------------------------------------------------------
// 7. bpftool prog run on the pinned programs.

/// Return codes.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Whether BPF_PROG_TEST_RUN takes `frame` for a TC program. It needs an
/// Ethernet header, and (on this kernel) a whole IPv4 header after one that
/// says IPv4: shorter input fails with EINVAL before the program runs.
fn tc_accepts(frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return false;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frame.len() >= 14 + 20,
        ETH_P_IPV6 => frame.len() >= 14 + 40,
        _ => true,
    }
}

/// Most bpftool runs a test may make.
const MAX_RUNS: u32 = 220;

struct Runner<'a> {
    cluster: &'a Cluster,
    host: usize,
    dir: tempfile::TempDir,
    runs: Cell<u32>,
    counters: BTreeMap<String, u64>,
    /// `ingress_ifindex` given to the program (`__sk_buff` context), so
    /// that a container's packet arrives on its own veth.
    ingress_ifindex: Option<u32>,
}

/// What a run must do.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// bpftool refuses the input (BPF_PROG_TEST_RUN's EINVAL).
    Error,
    /// This return value, and exactly this counter up by one (none: no counter).
    Verdict(u32, Option<&'static str>),
}

struct Ran {
    out: Vec<u8>,
}

impl<'a> Runner<'a> {
    fn new(cluster: &'a Cluster, host: usize) -> Self {
        Runner {
            cluster,
            host,
            dir: tempfile::tempdir().unwrap(),
            runs: Cell::new(0),
            counters: cluster.counters(host),
            ingress_ifindex: None,
        }
    }

    /// `<pin-path>/v<layout>/prog_<name>`, whatever the layout version.
    fn prog(&self, name: &str) -> PathBuf {
        let base = self.cluster.host(self.host).pin_path();
        let versions: Vec<PathBuf> = std::fs::read_dir(base)
            .unwrap_or_else(|e| panic!("read {}: {e}", base.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('v'))
            })
            .collect();
        assert_eq!(versions.len(), 1, "pin directories: {versions:?}");
        versions[0].join(format!("prog_{name}"))
    }

    /// Runs `prog` once on `data` in the host's namespace.
    fn run_raw(&self, prog: &Path, data: &[u8]) -> TestRun {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        assert!(n < MAX_RUNS, "too many bpftool runs");
        test_run(
            self.cluster.host(self.host).ns(),
            self.dir.path(),
            prog,
            data,
            self.ingress_ifindex,
        )
    }

    /// Runs `prog` on `data`, asserting the verdict and the counters.
    fn check(&mut self, label: &str, prog: &str, data: &[u8], want: Want) -> Ran {
        let run = self.run_raw(&self.prog(prog), data);
        let (text, ret) = (&run.text, run.ret);
        let after = self.cluster.counters(self.host);
        let mut moved = deltas(&self.counters, &after);
        self.counters = after;
        let ctx = format!("{prog} on {label} ({} bytes)", data.len());
        match want {
            Want::Error => {
                assert!(!run.success, "{ctx}: bpftool accepted it:\n{text}");
                assert!(
                    text.contains("Invalid argument") && !text.contains("Return value"),
                    "{ctx}: unexpected failure:\n{text}"
                );
            }
            Want::Verdict(code, counter) => {
                assert!(run.success, "{ctx}: bpftool failed:\n{text}");
                assert_eq!(ret, Some(code), "{ctx}: verdict; bpftool said:\n{text}");
                if let Some(c) = counter {
                    let d = moved.remove(c).unwrap_or(0);
                    if c == NOISY {
                        assert!(d >= 1, "{ctx}: {c} did not move");
                    } else {
                        assert_eq!(d, 1, "{ctx}: {c} moved by {d}");
                    }
                }
            }
        }
        moved.remove(NOISY);
        assert!(
            moved.is_empty(),
            "{ctx}: unexpected counters moved: {moved:?}"
        );
        Ran { out: run.data_out }
    }
}

/// Where a well-formed VXLAN frame (outer IPv4 without options) ends each
/// header: outer IPv4, UDP, VXLAN, inner Ethernet, inner IPv4.
const OUTER_IP_END: usize = 14 + 20;
const UDP_END: usize = OUTER_IP_END + 8;
const INNER_IP_END: usize = UDP_END + 8 + 14 + 20;

/// What the underlay programs do with the first `len` bytes of a
/// well-formed VXLAN frame from a peer for a local container: `deliver`,
/// `pass` and `drop` are the hook's return codes.
fn underlay_truncated(len: usize, pass: u32, drop: u32, deliver: u32) -> Want {
    match len {
        0..14 => Want::Error,
        // No whole outer IPv4 or UDP header: nothing to recognise VXLAN by.
        14..UDP_END => Want::Verdict(pass, Some(NOISY)),
        // VXLAN from a peer, cut inside the VXLAN, inner Ethernet or inner
        // IPv4 header.
        UDP_END..INNER_IP_END => Want::Verdict(drop, Some("drop_malformed")),
        _ => Want::Verdict(deliver, Some("decapsulated")),
    }
}

fn tc_underlay_truncated(frame: &[u8], len: usize) -> Want {
    if !tc_accepts(&frame[..len]) {
        return Want::Error;
    }
    underlay_truncated(len, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)
}

/// The verdict of `from_container` on the first `len` bytes of an IPv4
/// packet from a container to a remote container.
fn from_container_truncated(frame: &[u8], len: usize) -> Want {
    if !tc_accepts(&frame[..len]) {
        return Want::Error;
    }
    match len {
        // Unreachable on kernels that insist on a whole IPv4 header.
        0..34 => Want::Verdict(TC_ACT_SHOT, Some("drop_malformed")),
        _ => Want::Verdict(TC_ACT_REDIRECT, Some("encapsulated")),
    }
}

#[test]
fn prog_run_on_crafted_and_truncated_frames() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, Duration::from_secs(5));
    cluster.wait_peers_match_etcd(1, Duration::from_secs(5));
    let (ip0, ip1) = (cluster.container(c0).ip, cluster.container(c1).ip);
    let (host0, host1) = (cluster.host(0).ip(), cluster.host(1).ip());
    let (c0_mac, c0_host_mac) = endpoint_macs(&cluster, 0, ip0);
    let eth0_mac = parse_mac(&link_mac(cluster.host(0).ns(), "eth0"));
    let switch_mac = [0x02, 0, 0, 0, 0, 0xfe];
    let host1_mac = [0x02, 0, 0, 0, 0, 0x02];
    let stranger: Ipv4Addr = "198.18.0.254".parse().unwrap();
    // A subnet address of host 0 that no container holds.
    let no_one = {
        let mut o = ip0.octets();
        o[3] = 250;
        Ipv4Addr::from(o)
    };

    let inner_ip = |dst: Ipv4Addr| ipv4(ip1, dst, UDP, &udp(40001, 5555, &[]));
    let inner = |dst: Ipv4Addr| eth(vtep_mac(host0), vtep_mac(host1), ETH_P_IP, &inner_ip(dst));
    // A frame on host 0's underlay: outer IPv4 (options, fragment offset)
    // carrying UDP to `dport` with VXLAN `flags`/`vni` around `inner`.
    let outer = |src: Ipv4Addr,
                 options: &[u8],
                 frag: u16,
                 dport: u16,
                 flags: u8,
                 vni: u32,
                 inner: &[u8]| {
        let vx = vxlan(flags, vni, inner);
        eth(
            eth0_mac,
            host1_mac,
            ETH_P_IP,
            &ipv4_with(src, host0, UDP, options, frag, &udp(41000, dport, &vx)),
        )
    };
    let good = outer(host1, &[], 0, VXLAN_PORT, 0x08, 1, &inner(ip0));
    assert_eq!(good.len(), 14 + 20 + 8 + 8 + 14 + 20 + 8);

    let mut r = Runner::new(&cluster, 0);
    let tc = "tc_from_underlay";

    // The well-formed frame, then every truncation of it.
    let ran = r.check(
        "well-formed VXLAN",
        tc,
        &good,
        tc_underlay_truncated(&good, good.len()),
    );
    // Decapsulated in place: the container's MACs in front of the inner IPv4.
    let mut want_out = eth(c0_mac, c0_host_mac, ETH_P_IP, &inner_ip(ip0));
    assert_eq!(ran.out, want_out, "decapsulated frame");
    for len in 0..good.len() {
        r.check(
            &format!("VXLAN cut at {len}"),
            tc,
            &good[..len],
            tc_underlay_truncated(&good, len),
        );
    }

    // Same frame for an address of ours no container holds: to the stack.
    let to_stack = outer(host1, &[], 0, VXLAN_PORT, 0x08, 1, &inner(no_one));
    let ran = r.check(
        "VXLAN for no container",
        tc,
        &to_stack,
        Want::Verdict(TC_ACT_OK, Some("decap_to_stack")),
    );
    assert_eq!(
        &ran.out[..6],
        &eth0_mac,
        "inner frame to the stack is addressed to eth0"
    );
    assert_eq!(&ran.out[14..], &inner_ip(no_one)[..]);

    let shot = |c| Want::Verdict(TC_ACT_SHOT, Some(c));
    let pass = Want::Verdict(TC_ACT_OK, Some(NOISY));
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "VXLAN from a non-peer",
            outer(stranger, &[], 0, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            shot("drop_unknown_peer"),
        ),
        (
            "VXLAN with VNI 2",
            outer(host1, &[], 0, VXLAN_PORT, 0x08, 2, &inner(ip0)),
            shot("drop_bad_vni"),
        ),
        (
            "VXLAN without the I flag",
            outer(host1, &[], 0, VXLAN_PORT, 0x00, 1, &inner(ip0)),
            shot("drop_bad_vni"),
        ),
        // Fragments from a peer go to the stack to be reassembled.
        (
            "first fragment (MF)",
            outer(host1, &[], 0x2000, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            Want::Verdict(TC_ACT_OK, Some("underlay_fragment_to_stack")),
        ),
        (
            "later fragment (offset 8)",
            outer(host1, &[], 0x0001, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            Want::Verdict(TC_ACT_OK, Some("underlay_fragment_to_stack")),
        ),
        (
            "DF set, not a fragment",
            outer(host1, &[], 0x4000, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            Want::Verdict(TC_ACT_REDIRECT, Some("decapsulated")),
        ),
        // Outer IPv4 options: netd never sends them; left to the stack.
        (
            "outer IPv4 with options",
            outer(host1, &[1, 1, 1, 0], 0, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            pass,
        ),
        (
            "UDP to another port",
            outer(host1, &[], 0, 4789, 0x08, 1, &inner(ip0)),
            pass,
        ),
        (
            "non-IPv4 inner frame",
            outer(
                host1,
                &[],
                0,
                VXLAN_PORT,
                0x08,
                1,
                &arp_request(vtep_mac(host1), ip1, ip0),
            ),
            shot("drop_not_ipv4"),
        ),
        ("ARP", arp_request(switch_mac, stranger, host0), pass),
        (
            "IPv6 UDP to the VXLAN port",
            eth(eth0_mac, switch_mac, ETH_P_IPV6, &ipv6_udp(VXLAN_PORT)),
            pass,
        ),
        // Unencapsulated: only a directly routed peer may send it, and
        // this network has none.
        (
            "plain IPv4 for a container",
            eth(eth0_mac, host1_mac, ETH_P_IP, &inner_ip(ip0)),
            shot("drop_unknown_peer"),
        ),
        (
            "IPv4 ethertype, no IPv4 header",
            eth(eth0_mac, host1_mac, ETH_P_IP, &[0x45]),
            Want::Error,
        ),
        (
            "first fragment from a non-peer",
            outer(stranger, &[], 0x2000, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            shot("drop_fragment"),
        ),
        // No UDP header to tell the port by: left to the stack, whose
        // reassembly never completes without the first fragment.
        (
            "later fragment from a non-peer",
            outer(stranger, &[], 0x0001, VXLAN_PORT, 0x08, 1, &inner(ip0)),
            pass,
        ),
    ];
    for (label, frame, want) in &cases {
        r.check(label, tc, frame, *want);
    }
    // With options, the truncations that matter still pass cleanly.
    let opts = &cases[6].1;
    for len in [14 + 20, 14 + 24, 14 + 24 + 8, 14 + 24 + 16, opts.len() - 1] {
        r.check(
            &format!("options frame cut at {len}"),
            tc,
            &opts[..len],
            pass,
        );
    }

    // A few of the same through the XDP program.
    let xdp = "xdp_from_underlay";
    let ran = r.check(
        "well-formed VXLAN",
        xdp,
        &good,
        Want::Verdict(XDP_PASS, Some("decapsulated")),
    );
    // BPF_PROG_TEST_RUN returns the XDP metadata too: the tag that tells
    // the TC program behind XDP that this frame was decapsulated, and the
    // container's veth it goes to.
    let c0_ifindex = cluster.status(0)["endpoints"][0]["host_ifindex"]
        .as_u64()
        .expect("endpoint ifindex") as u32;
    want_out = [
        &0x6e65_7464u32.to_ne_bytes()[..],
        &c0_ifindex.to_ne_bytes()[..],
        &eth(c0_mac, c0_host_mac, ETH_P_IP, &inner_ip(ip0)),
    ]
    .concat();
    assert_eq!(ran.out, want_out, "XDP-decapsulated frame, tagged");
    r.check(
        "VXLAN from a non-peer",
        xdp,
        &cases[0].1,
        Want::Verdict(XDP_DROP, Some("drop_unknown_peer")),
    );
    r.check(
        "VXLAN with VNI 2",
        xdp,
        &cases[1].1,
        Want::Verdict(XDP_DROP, Some("drop_bad_vni")),
    );
    // XDP test runs take any frame with an Ethernet header: the truncations
    // TC's test runs refuse reach the program here. One each side of every
    // header boundary.
    for len in [13, 14, 20, 33, 34, 41, 42, 49, 50, 63, 64, 77, 83, 84] {
        let want = underlay_truncated(len, XDP_PASS, XDP_DROP, XDP_PASS);
        r.check(&format!("VXLAN cut at {len}"), xdp, &good[..len], want);
    }
    r.check(
        "ARP",
        xdp,
        &cases[9].1,
        Want::Verdict(XDP_PASS, Some(NOISY)),
    );
    // Passed up uncounted: the TC program behind XDP counts it.
    r.check(
        "first fragment",
        xdp,
        &cases[3].1,
        Want::Verdict(XDP_PASS, None),
    );
    r.check(
        "first fragment from a non-peer",
        xdp,
        &cases[cases.len() - 2].1,
        Want::Verdict(XDP_DROP, Some("drop_fragment")),
    );

    // from_container on host 0: a packet to the container on host 1, and
    // every truncation of it, arriving on container 0's veth.
    let fc = "from_container";
    r.ingress_ifindex = Some(c0_ifindex);
    let packet = eth(
        c0_host_mac,
        c0_mac,
        ETH_P_IP,
        &ipv4(ip0, ip1, UDP, &udp(40002, 5555, &[])),
    );
    let ran = r.check(
        "IPv4 to a remote container",
        fc,
        &packet,
        from_container_truncated(&packet, packet.len()),
    );
    let out = &ran.out;
    assert_eq!(out.len(), packet.len() + 50, "encapsulated length");
    assert_eq!(&out[6..12], &eth0_mac, "outer source MAC");
    assert_eq!(&out[12..14], &ETH_P_IP.to_be_bytes());
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        out.len() - 14,
        "outer tot_len"
    );
    assert_eq!(ip[9], UDP);
    assert_eq!(internet_checksum(ip), 0, "outer IPv4 checksum");
    assert_eq!(&ip[12..16], &host0.octets());
    assert_eq!(&ip[16..20], &host1.octets());
    let u = &out[34..42];
    assert_eq!(u16::from_be_bytes([u[2], u[3]]), VXLAN_PORT);
    assert_eq!(
        u16::from_be_bytes([u[4], u[5]]) as usize,
        out.len() - 34,
        "UDP length"
    );
    let sport = u16::from_be_bytes([u[0], u[1]]);
    assert!((32768..61000).contains(&sport), "source port {sport}");
    assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0], "VXLAN header");
    assert_eq!(
        &out[50..56],
        &vtep_mac(host1),
        "inner destination: peer VTEP"
    );
    assert_eq!(&out[56..62], &vtep_mac(host0), "inner source: our VTEP");
    assert_eq!(&out[62..64], &ETH_P_IP.to_be_bytes());
    // One router hop: the inner TTL down by one, its checksum still valid.
    let mut hop = packet[14..].to_vec();
    hop[8] -= 1;
    hop[10..12].copy_from_slice(&[0, 0]);
    let check = internet_checksum(&hop[..20]);
    hop[10..12].copy_from_slice(&check.to_be_bytes());
    assert_eq!(&out[64..], &hop[..], "inner IPv4 packet, TTL decremented");
    for len in 0..packet.len() {
        r.check(
            &format!("packet cut at {len}"),
            fc,
            &packet[..len],
            from_container_truncated(&packet, len),
        );
    }
    let to = |dst: Ipv4Addr| {
        eth(
            c0_host_mac,
            c0_mac,
            ETH_P_IP,
            &ipv4(ip0, dst, UDP, &udp(40002, 5555, &[])),
        )
    };
    let ran = r.check(
        "IPv4 to a local container",
        fc,
        &to(ip0),
        Want::Verdict(TC_ACT_REDIRECT, Some("local_delivered")),
    );
    assert_eq!(
        &ran.out[..12],
        &[c0_mac, c0_host_mac].concat()[..],
        "local delivery MACs"
    );
    r.check(
        "IPv4 off the overlay",
        fc,
        &to("192.0.2.1".parse().unwrap()),
        Want::Verdict(TC_ACT_OK, Some("container_to_stack")),
    );
    r.check(
        "IPv4 to an unleased subnet",
        fc,
        &to("10.244.0.9".parse().unwrap()),
        Want::Verdict(TC_ACT_OK, Some("container_to_stack")),
    );
    r.check(
        "ARP",
        fc,
        &arp_request(c0_mac, ip0, ip1),
        Want::Verdict(TC_ACT_OK, Some("container_to_stack")),
    );
    r.check(
        "IPv6",
        fc,
        &eth(c0_host_mac, c0_mac, ETH_P_IPV6, &ipv6_udp(53)),
        Want::Verdict(TC_ACT_OK, Some("container_to_stack")),
    );

    // Spoofing: another container's address, another MAC, another veth.
    let from = |src: Ipv4Addr, mac: [u8; 6]| {
        eth(
            c0_host_mac,
            mac,
            ETH_P_IP,
            &ipv4(src, ip1, UDP, &udp(40002, 5555, &[])),
        )
    };
    let spoofed = Want::Verdict(TC_ACT_SHOT, Some("drop_spoofed"));
    r.check(
        "source IP of another container",
        fc,
        &from(ip1, c0_mac),
        spoofed,
    );
    r.check(
        "source IP off the overlay",
        fc,
        &from("192.0.2.7".parse().unwrap(), c0_mac),
        spoofed,
    );
    r.check(
        "own IP, foreign MAC",
        fc,
        &from(ip0, [2, 0, 0, 0, 0, 9]),
        spoofed,
    );
    r.ingress_ifindex = Some(c0_ifindex + 1000);
    r.check(
        "own IP and MAC, another veth",
        fc,
        &from(ip0, c0_mac),
        spoofed,
    );
    r.ingress_ifindex = Some(c0_ifindex);

    let runs = r.runs.get();
    eprintln!("{runs} bpftool runs");
    // Nothing of this disturbed the daemons or real traffic.
    drop(r);
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    assert!(ping(&cluster.container(c0).ns.handle(), ip1, 2));
}

/// A small xorshift generator: the same seed gives the same frames, so a
/// failure names a frame that can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `frame` with a few random bytes changed and a random length (sometimes
/// longer than the original), and sometimes a VLAN tag inserted.
fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len());
        out[at] = rng.next() as u8;
    }
    match rng.below(4) {
        0 => out.truncate(14 + rng.below(out.len() - 14)),
        1 => out.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        2 => {
            // 802.1Q tag after the MACs.
            out.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        }
        _ => {}
    }
    out
}

/// Seeded random mutations of well-formed frames through every program:
/// each run ends in one of the program's defined verdicts (or a clean
/// refusal by BPF_PROG_TEST_RUN), and the daemons and traffic are unharmed.
#[test]
fn prog_run_on_randomised_frames() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    cluster.wait_peers_match_etcd(0, Duration::from_secs(5));
    let (ip0, ip1) = (cluster.container(c0).ip, cluster.container(c1).ip);
    let (host0, host1) = (cluster.host(0).ip(), cluster.host(1).ip());
    let (c0_mac, c0_host_mac) = endpoint_macs(&cluster, 0, ip0);
    let eth0_mac = parse_mac(&link_mac(cluster.host(0).ns(), "eth0"));
    let host1_mac = [0x02, 0, 0, 0, 0, 0x02];
    let inner = eth(
        vtep_mac(host0),
        vtep_mac(host1),
        ETH_P_IP,
        &ipv4(ip1, ip0, UDP, &udp(40001, 5555, &[])),
    );
    let vx = vxlan(0x08, 1, &inner);
    let underlay = eth(
        eth0_mac,
        host1_mac,
        ETH_P_IP,
        &ipv4(host1, host0, UDP, &udp(41000, VXLAN_PORT, &vx)),
    );
    let container = eth(
        c0_host_mac,
        c0_mac,
        ETH_P_IP,
        &ipv4(ip0, ip1, UDP, &udp(40002, 5555, &[])),
    );

    let mut r = Runner::new(&cluster, 0);
    let c0_ifindex = cluster.status(0)["endpoints"][0]["host_ifindex"]
        .as_u64()
        .expect("endpoint ifindex") as u32;
    let cases: [(&str, &[u8], &[u32]); 3] = [
        (
            "tc_from_underlay",
            &underlay,
            &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
        ("xdp_from_underlay", &underlay, &[XDP_DROP, XDP_PASS, 4]),
        (
            "from_container",
            &container,
            &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        ),
    ];
    let mut rng = Rng(0x6e65_7464_5eed);
    for (prog, frame, verdicts) in cases {
        let path = r.prog(prog);
        // Packets from a container arrive on its veth.
        r.ingress_ifindex = (prog == "from_container").then_some(c0_ifindex);
        for i in 0..50 {
            let data = mutate(&mut rng, frame);
            let run = r.run_raw(&path, &data);
            let (text, ret) = (&run.text, run.ret);
            let label = format!("{prog} on mutation {i} ({} bytes: {data:02x?})", data.len());
            if !run.success {
                assert!(
                    text.contains("Invalid argument"),
                    "{label}: bpftool failed:\n{text}"
                );
                continue;
            }
            assert!(
                ret.is_some_and(|v| verdicts.contains(&v)),
                "{label}: verdict {ret:?} is not one of {verdicts:?}:\n{text}"
            );
        }
    }
    drop(r);
    for i in 0..2 {
        cluster.daemons[i].as_mut().unwrap().assert_running();
    }
    assert!(
        ping(&cluster.container(c0).ns.handle(), ip1, 2),
        "traffic after the random frames"
    );
}
