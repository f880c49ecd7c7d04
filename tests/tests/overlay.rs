//! Containers on different hosts reach each other over netd's VXLAN: full
//! mesh ping and verified TCP in both decap modes, the wire format netd
//! builds, kernel maps equal to the etcd leases, and detach.
//!
//! Every check waits with generous timeouts (the machine is small and
//! shared) and never asserts on speed; traffic is kept to a few MiB.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use netd_tests::bpftool::map_dump;
use netd_tests::counters::{Counters, assert_grew, delta};
use netd_tests::lease::vtep_mac;
use netd_tests::links::link_mac;
use netd_tests::{
    Capture, Cluster, NsRef, VXLAN_PORT, ping, ping_stats, require_root, tcp_transfer, wait_for,
};
use serde_json::Value;

/// How long maps may take to converge on etcd and paths to start working.
const CONVERGE: Duration = Duration::from_secs(30);
/// Echo requests per ordered container pair in a mesh.
const MESH_PINGS: u32 = 2;
/// Bytes of each cross-host TCP transfer.
const TCP_BYTES: usize = 4 << 20;
/// Counters that count dropped packets.
const DROPS: &[&str] = &[
    "drop_unknown_peer",
    "drop_bad_vni",
    "drop_malformed",
    "drop_fragment",
    "drop_adjust_failed",
    "drop_redirect_failed",
    "drop_not_ipv4",
    "drop_ecn",
    "drop_ttl_expired",
];

// ---------------------------------------------------------------- helpers

/// Waits until every host's map holds exactly the other hosts' leases.
fn converge(cluster: &Cluster) {
    for i in 0..cluster.topo.hosts().len() {
        cluster.wait_peers_match_etcd(i, CONVERGE);
    }
}

fn all_counters(cluster: &Cluster) -> Vec<Counters> {
    (0..cluster.topo.hosts().len())
        .map(|i| cluster.counters(i))
        .collect()
}

/// Asserts that no host dropped a packet, and none routed one around the
/// tunnel (the network is plain VXLAN, without DirectRouting, even though
/// the hosts share an L2 segment).
fn assert_no_drops(cluster: &Cluster) {
    for (i, c) in all_counters(cluster).iter().enumerate() {
        for d in DROPS {
            assert_eq!(c[*d], 0, "host {i} dropped packets ({d}); counters {c:?}");
        }
        let direct = c.get("routed_direct").copied().unwrap_or(0);
        assert_eq!(direct, 0, "host {i} routed without VXLAN; counters {c:?}");
    }
}

/// Pings every ordered pair of containers, then checks each host's counters
/// against the number of echo requests and replies that had to cross it.
///
/// `decap_counters` are the counters that must count every packet a host
/// received from a remote host (e.g. `decapsulated`).
fn mesh(cluster: &Cluster, decap_counters: &[&str]) {
    let n = cluster.containers.len();
    let before = all_counters(cluster);
    for from in 0..n {
        for to in 0..n {
            if from != to {
                cluster.assert_ping(from, to, MESH_PINGS, CONVERGE);
            }
        }
    }
    let after = all_counters(cluster);
    for h in 0..cluster.topo.hosts().len() {
        let local = cluster.containers.iter().filter(|c| c.host == h).count() as u64;
        let remote = n as u64 - local;
        let pings = MESH_PINGS as u64;
        // Requests to and replies from remote containers, both directions.
        let crossing = 2 * pings * local * remote;
        // Ordered local pairs: a request and a reply each.
        let same_host = 2 * pings * local * local.saturating_sub(1);
        let (b, a) = (&before[h], &after[h]);
        let why = format!("{local} local and {remote} remote containers, {pings} pings a pair");
        assert_grew(h, b, a, "encapsulated", crossing, &why);
        for c in decap_counters {
            assert_grew(h, b, a, c, crossing, &why);
        }
        assert_grew(h, b, a, "local_delivered", same_host, &why);
    }
}

/// Sends [`TCP_BYTES`] from container `from` to container `to` (verified
/// byte for byte) and checks that the overlay carried it: the sender's host
/// encapsulated and the receiver's host counted `decap_counters`, both ways
/// (data one way, ACKs the other).
fn tcp_across(cluster: &Cluster, from: usize, to: usize, port: u16, decap_counters: &[&str]) {
    let (a, b) = (cluster.container(from), cluster.container(to));
    assert_ne!(
        a.host, b.host,
        "tcp_across wants containers on different hosts"
    );
    let before = all_counters(cluster);
    let dst = SocketAddr::new(b.ip.into(), port);
    let t = tcp_transfer(&a.ns, &b.ns, dst, TCP_BYTES).unwrap_or_else(|e| {
        panic!(
            "TCP {} (host {}) -> {dst} (host {}) failed: {e:#}",
            a.ip, a.host, b.host
        )
    });
    assert_eq!(t.bytes, TCP_BYTES, "TCP {} -> {dst} byte count", a.ip);
    let after = all_counters(cluster);
    // An skb (GSO or GRO'd) carries at most 64 KiB, so the data needs at
    // least this many; the ACKs coming back at least one.
    let data_packets = TCP_BYTES.div_ceil(65536) as u64;
    let why = format!("TCP {} -> {dst}, data", a.ip);
    let ack = format!("TCP {} -> {dst}, ACKs", a.ip);
    for (s, r, min, why) in [
        (a.host, b.host, data_packets, &why),
        (b.host, a.host, 1, &ack),
    ] {
        assert_grew(s, &before[s], &after[s], "encapsulated", min, why);
        for c in decap_counters {
            assert_grew(r, &before[r], &after[r], c, min, why);
        }
    }
}

fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `iface` exists in `ns`.
fn link_exists(ns: &NsRef, iface: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", iface])
        .status
        .success()
}

/// The bytes of a BTF-formatted `u8` array field (`[10, 244, 1, 0]`).
fn btf_bytes(v: &Value, what: &str) -> Vec<u8> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a BTF-formatted array: {v}"))
        .iter()
        .map(|b| {
            b.as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .unwrap_or_else(|| panic!("{what}: {b} is not a byte"))
        })
        .collect()
}

/// A remote subnet as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Route {
    subnet: String,
    public_ip: String,
    vtep_mac: String,
}

/// `SUBNETS` of `pin`, decoded through the BTF field names.
fn subnets_map(pin: &Path) -> BTreeSet<Route> {
    let path = pin.join(netd_tests::layout_dir()).join("SUBNETS");
    map_dump(&path)
        .iter()
        .map(|entry| {
            let f = entry.get("formatted").unwrap_or_else(|| {
                panic!("SUBNETS entry without BTF formatting (no field names): {entry}")
            });
            let key = &f["key"];
            let len = key
                .get("prefix_len")
                .or_else(|| key.get("prefixlen"))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("SUBNETS key has no prefix length field: {key}"));
            let data = btf_bytes(&key["data"], "SUBNETS key.data");
            let value = &f["value"];
            for field in ["public_ip", "vtep_mac", "mode"] {
                assert!(
                    value.get(field).is_some(),
                    "SUBNETS value lacks BTF field {field}: {value}"
                );
            }
            assert_eq!(value["mode"], 0, "SUBNETS mode is not vxlan (0): {entry}");
            let ip = btf_bytes(&value["public_ip"], "public_ip");
            let mac = btf_bytes(&value["vtep_mac"], "vtep_mac");
            assert_eq!(
                (data.len(), ip.len(), mac.len()),
                (4, 4, 6),
                "field sizes in {entry}"
            );
            Route {
                subnet: format!("{}.{}.{}.{}/{len}", data[0], data[1], data[2], data[3]),
                public_ip: format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
                vtep_mac: mac_string(&mac),
            }
        })
        .collect()
}

/// Every lease in etcd as a [`Route`], checking the flannel value format.
fn etcd_routes(cluster: &Cluster) -> BTreeSet<Route> {
    cluster
        .topo
        .etcd()
        .get_prefix("/netd/network/subnets/")
        .into_iter()
        .map(|kv| {
            let subnet = kv.key.rsplit('/').next().unwrap().replacen('-', "/", 1);
            let v: Value = serde_json::from_str(&kv.value)
                .unwrap_or_else(|e| panic!("lease {} is not JSON ({e}): {}", kv.key, kv.value));
            assert_eq!(v["BackendType"], "vxlan", "lease {}: {}", kv.key, kv.value);
            assert_eq!(v["BackendData"]["VNI"], 1, "lease {}: {}", kv.key, kv.value);
            let public_ip = v["PublicIP"].as_str().expect("PublicIP").to_string();
            let mac = v["BackendData"]["VtepMAC"].as_str().expect("VtepMAC");
            let ip: Ipv4Addr = public_ip.parse().expect("PublicIP is an IPv4 address");
            assert_eq!(mac, vtep_mac(ip), "VtepMAC of lease {}", kv.key);
            Route {
                subnet,
                public_ip,
                vtep_mac: mac.to_string(),
            }
        })
        .collect()
}

/// Peers in host `i`'s status.
fn status_routes(cluster: &Cluster, i: usize) -> BTreeSet<Route> {
    cluster.status(i)["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .map(|p| {
            assert_eq!(p["mode"], "vxlan", "host {i} peer {p}");
            Route {
                subnet: p["subnet"].as_str().unwrap().to_string(),
                public_ip: p["public_ip"].as_str().unwrap().to_string(),
                vtep_mac: p["vtep_mac"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// Whether `ip` (a.b.c.d) lies in `subnet` (a.b.c.0/24).
fn in_subnet24(ip: Ipv4Addr, subnet: &str) -> bool {
    let net: Ipv4Addr = subnet
        .strip_suffix("/24")
        .unwrap_or_else(|| panic!("subnet {subnet} is not a /24"))
        .parse()
        .expect("subnet address");
    ip.octets()[..3] == net.octets()[..3]
}

// ------------------------------------------------------------------ tests

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

/// 3 hosts × 2 containers with TC decap: every ordered pair pings, 4 MiB
/// cross TCP both ways intact, and a same-host pair talks without the tunnel.
#[test]
fn three_hosts_mesh_and_tcp_tc() {
    require_root();
    let mut cluster = Cluster::up(3, "tc");
    for h in 0..3 {
        cluster.attach(h);
        cluster.attach(h);
    }
    converge(&cluster);
    for (i, c) in cluster.containers.iter().enumerate() {
        let subnet = cluster.subnet(c.host);
        assert!(
            in_subnet24(c.ip, &subnet),
            "container {i} got {} outside host {}'s subnet {subnet}",
            c.ip,
            c.host
        );
    }

    mesh(&cluster, &["decapsulated"]);

    // Containers 0, 1 are on host 0; 2, 3 on host 1; 4, 5 on host 2.
    tcp_across(&cluster, 0, 3, 5001, &["decapsulated"]);
    tcp_across(&cluster, 3, 0, 5002, &["decapsulated"]);
    tcp_across(&cluster, 5, 1, 5003, &["decapsulated"]);

    // Same host: delivered by from_container straight into the peer, never
    // encapsulated (nothing else sends while this runs).
    let before = cluster.counters(0);
    cluster.assert_ping(0, 1, 3, CONVERGE);
    let local = (cluster.container(0), cluster.container(1));
    let dst = SocketAddr::new(local.1.ip.into(), 5004);
    tcp_transfer(&local.0.ns, &local.1.ns, dst, 1 << 20)
        .unwrap_or_else(|e| panic!("same-host TCP {} -> {dst} failed: {e:#}", local.0.ip));
    let after = cluster.counters(0);
    assert_grew(
        0,
        &before,
        &after,
        "local_delivered",
        6,
        "same-host ping and TCP",
    );
    assert_eq!(
        delta(&before, &after, "encapsulated"),
        0,
        "same-host traffic went into the tunnel: before {before:?}, after {after:?}"
    );

    assert_no_drops(&cluster);
}

/// XDP decap (XDP strips, TC behind it delivers on veth): mesh and TCP
/// across 2 hosts × 2 containers, and the XDP counters account for it.
#[test]
fn two_hosts_mesh_and_tcp_xdp() {
    require_root();
    let mut cluster = Cluster::up(2, "xdp");
    for h in 0..2 {
        cluster.attach(h);
        cluster.attach(h);
    }
    converge(&cluster);
    for h in 0..2 {
        let status = cluster.status(h);
        assert_eq!(
            status["underlay"]["hook"], "xdp",
            "host {h} status: {status}"
        );
        let link = cluster
            .host(h)
            .ns()
            .run_ok(&["ip", "-d", "link", "show", "dev", "eth0"]);
        assert!(
            link.contains("prog/xdp"),
            "host {h}: no XDP program on eth0:\n{link}"
        );
    }

    let decap = ["decapsulated", "underlay_delivered"];
    mesh(&cluster, &decap);
    // Containers 0, 1 are on host 0; 2, 3 on host 1.
    tcp_across(&cluster, 0, 2, 5001, &decap);
    tcp_across(&cluster, 3, 1, 5002, &decap);
    assert_no_drops(&cluster);
}

/// One row of the capture, decoded by tshark with IPv4 checksum validation.
/// Multi-occurrence fields are split: `[outer, inner]`.
struct Frame {
    fields: BTreeMap<&'static str, Vec<String>>,
}

impl Frame {
    fn all(&self, f: &str) -> &[String] {
        &self.fields[f]
    }
    fn outer(&self, f: &str) -> &str {
        self.fields[f].first().map(String::as_str).unwrap_or("")
    }
    fn num(&self, f: &str) -> u32 {
        let s = self.outer(f);
        let parsed = match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        };
        parsed.unwrap_or_else(|e| panic!("field {f} = {s:?} is not a number: {e}"))
    }
}

const FRAME_FIELDS: &[&str] = &[
    "frame.len",
    "eth.src",
    "eth.dst",
    "ip.version",
    "ip.hdr_len",
    "ip.dsfield",
    "ip.len",
    "ip.id",
    "ip.flags",
    "ip.frag_offset",
    "ip.ttl",
    "ip.proto",
    "ip.checksum",
    "ip.checksum.status",
    "ip.src",
    "ip.dst",
    "udp.dstport",
    "udp.length",
    "udp.checksum",
    "vxlan.flags",
    "vxlan.vni",
    "icmp.type",
];

/// Decodes VXLAN+ICMP frames of `file` with tshark, validating IPv4 header
/// checksums (`capture::decode` has no way to pass `-o`).
fn decode_frames(file: &Path) -> Vec<Frame> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-n").arg("-r").arg(file);
    cmd.args(["-o", "ip.check_checksum:TRUE"]);
    cmd.args(["-d", &format!("udp.port=={VXLAN_PORT},vxlan")]);
    cmd.args(["-Y", "vxlan && icmp"]);
    cmd.args(["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]);
    cmd.args(["-E", "aggregator=,"]);
    for f in FRAME_FIELDS {
        cmd.args(["-e", f]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run tshark (install tshark): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tshark decode failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|line| {
            let cells: Vec<&str> = line.split('\t').collect();
            let fields = FRAME_FIELDS
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let cell = cells.get(i).copied().unwrap_or("");
                    let values = if cell.is_empty() {
                        Vec::new()
                    } else {
                        cell.split(',').map(str::to_string).collect()
                    };
                    (*f, values)
                })
                .collect();
            Frame { fields }
        })
        .collect()
}

/// RFC 1071 sum over the outer IPv4 header rebuilt from tshark's fields
/// (including the checksum): 0xffff iff the checksum is right.
fn outer_ipv4_sum(f: &Frame) -> u16 {
    assert_eq!(f.num("ip.version"), 4);
    assert_eq!(f.num("ip.hdr_len"), 20, "outer IPv4 header has options");
    let ip = |s: &str| -> u32 { u32::from(s.parse::<Ipv4Addr>().expect("IPv4 address")) };
    let (src, dst) = (ip(f.outer("ip.src")), ip(f.outer("ip.dst")));
    let words = [
        0x4500 | f.num("ip.dsfield"),
        f.num("ip.len"),
        f.num("ip.id"),
        // ip.flags is the 3 flag bits, shifted down.
        (f.num("ip.flags") << 13) | f.num("ip.frag_offset"),
        (f.num("ip.ttl") << 8) | f.num("ip.proto"),
        f.num("ip.checksum"),
        src >> 16,
        src & 0xffff,
        dst >> 16,
        dst & 0xffff,
    ];
    let mut sum: u32 = words.iter().sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The packets on the wire are netd's: a capture on host 0's underlay shows
/// VXLAN (VNI 1, port 8472, zero UDP checksum, valid outer IPv4 checksum)
/// between the hosts' addresses and VTEP MACs around the containers' ICMP.
#[test]
fn vxlan_on_the_wire_is_built_by_netd() {
    require_root();
    const PINGS: u32 = 4;
    let mut cluster = Cluster::up(2, "tc");
    let a = cluster.attach(0);
    let b = cluster.attach(1);
    converge(&cluster);
    let hosts = [cluster.host(0), cluster.host(1)];
    let underlay_macs = [
        link_mac(hosts[0].ns(), "eth0"),
        link_mac(hosts[1].ns(), "eth0"),
    ];
    let host_ips = [hosts[0].ip(), hosts[1].ip()];
    let vteps = [vtep_mac(host_ips[0]), vtep_mac(host_ips[1])];
    for (h, vtep) in vteps.iter().enumerate() {
        assert_eq!(
            cluster.status(h)["state"]["vtep_mac"],
            vtep.as_str(),
            "host {h} VTEP MAC"
        );
    }
    let (ca, cb) = (cluster.container(a), cluster.container(b));

    let mut cap = Capture::start(hosts[0].ns(), "eth0", &format!("udp port {VXLAN_PORT}"));
    let before = all_counters(&cluster);
    let stats = ping_stats(&ca.ns, cb.ip, PINGS);
    let after = all_counters(&cluster);
    cap.stop();
    assert!(
        stats.all_received(),
        "ping {} -> {} across hosts:\n{}",
        ca.ip,
        cb.ip,
        stats.output
    );
    let frames = decode_frames(cap.path());
    let keep = std::env::temp_dir().join("netd-overlay-vxlan.pcapng");
    let dump = |msg: String| -> String {
        let _ = std::fs::copy(cap.path(), &keep);
        format!("{msg} (capture kept at {})", keep.display())
    };

    let (mut requests, mut replies) = (0, 0);
    for (i, f) in frames.iter().enumerate() {
        // Direction: request host 0 -> host 1, reply host 1 -> host 0.
        let icmp = f.all("icmp.type").join(",");
        let (s, d, inner_src, inner_dst) = match icmp.as_str() {
            "8" => {
                requests += 1;
                (0, 1, ca.ip, cb.ip)
            }
            "0" => {
                replies += 1;
                (1, 0, cb.ip, ca.ip)
            }
            other => panic!("{}", dump(format!("frame {i}: ICMP type {other:?}"))),
        };
        let expect = |field: &str, want: Vec<String>| {
            assert_eq!(
                f.all(field),
                want.as_slice(),
                "{}",
                dump(format!("frame {i} (icmp {icmp}): {field}"))
            );
        };
        // Outer Ethernet: underlay NICs; inner: the hosts' VTEP MACs.
        expect("eth.src", vec![underlay_macs[s].clone(), vteps[s].clone()]);
        expect("eth.dst", vec![underlay_macs[d].clone(), vteps[d].clone()]);
        expect(
            "ip.src",
            vec![host_ips[s].to_string(), inner_src.to_string()],
        );
        expect(
            "ip.dst",
            vec![host_ips[d].to_string(), inner_dst.to_string()],
        );
        expect("ip.proto", vec!["17".into(), "1".into()]);
        expect("udp.dstport", vec![VXLAN_PORT.to_string()]);
        expect("udp.checksum", vec!["0x0000".into()]);
        expect("vxlan.vni", vec!["1".into()]);
        // Only the I flag: a valid VNI.
        expect("vxlan.flags", vec!["0x0800".into()]);
        // tshark's checksum status: 0 Bad, 1 Good, 2 Unverified.
        assert_eq!(
            f.outer("ip.checksum.status"),
            "1",
            "{}",
            dump(format!(
                "frame {i}: tshark does not find the outer IPv4 checksum {} Good",
                f.outer("ip.checksum")
            ))
        );
        assert_eq!(
            outer_ipv4_sum(f),
            0xffff,
            "{}",
            dump(format!(
                "frame {i}: outer IPv4 checksum {} is wrong",
                f.outer("ip.checksum")
            ))
        );
        // Lengths describe the frame: 14 outer Ethernet, 20 IPv4.
        let frame_len = f.num("frame.len");
        assert_eq!(
            f.num("ip.len"),
            frame_len - 14,
            "frame {i}: outer IPv4 length"
        );
        assert_eq!(
            f.num("udp.length"),
            frame_len - 14 - 20,
            "frame {i}: UDP length"
        );
        assert_eq!(
            f.num("ip.frag_offset"),
            0,
            "frame {i}: outer fragment offset"
        );
    }
    // TC decap runs after the capture tap, so host 0 sees its own requests
    // leave and the replies arrive still encapsulated.
    assert!(
        requests >= PINGS && replies >= PINGS,
        "{}",
        dump(format!(
            "expected >= {PINGS} encapsulated requests and replies, got {requests} and {replies}"
        ))
    );

    let pings = PINGS as u64;
    assert_grew(
        0,
        &before[0],
        &after[0],
        "encapsulated",
        pings,
        "echo requests",
    );
    assert_grew(
        1,
        &before[1],
        &after[1],
        "decapsulated",
        pings,
        "echo requests",
    );
    assert_grew(
        1,
        &before[1],
        &after[1],
        "encapsulated",
        pings,
        "echo replies",
    );
    assert_grew(
        0,
        &before[0],
        &after[0],
        "decapsulated",
        pings,
        "echo replies",
    );
    assert_no_drops(&cluster);
}

/// Every host's kernel map holds exactly the other hosts' etcd leases (also
/// as bpftool decodes them through BTF), and follows etcd when a lease
/// appears or goes away.
#[test]
fn kernel_maps_equal_etcd_leases() {
    require_root();
    let cluster = Cluster::up(3, "tc");
    converge(&cluster);
    let hosts = cluster.topo.hosts().len();

    let leases = etcd_routes(&cluster);
    assert_eq!(
        leases.len(),
        hosts,
        "one lease per host in etcd: {leases:#?}"
    );
    let subnets: BTreeSet<_> = leases.iter().map(|r| &r.subnet).collect();
    assert_eq!(subnets.len(), hosts, "hosts share a subnet: {leases:#?}");

    let expect_maps = |leases: &BTreeSet<Route>| {
        for h in 0..hosts {
            let host = cluster.host(h);
            let own = cluster.subnet(h);
            let own_lease = leases
                .iter()
                .find(|r| r.subnet == own)
                .unwrap_or_else(|| panic!("host {h}'s subnet {own} has no lease: {leases:#?}"));
            assert_eq!(
                own_lease.public_ip,
                host.ip().to_string(),
                "host {h}'s lease"
            );
            let want: BTreeSet<Route> =
                leases.iter().filter(|r| r.subnet != own).cloned().collect();
            let map = subnets_map(host.pin_path());
            assert_eq!(
                map, want,
                "host {h}: SUBNETS (bpftool) != etcd leases minus its own"
            );
            assert_eq!(
                status_routes(&cluster, h),
                want,
                "host {h}: status peers != etcd"
            );
            // PEERS: the underlay addresses VXLAN is accepted from.
            let peers: BTreeSet<String> =
                map_dump(&host.pin_path().join(netd_tests::layout_dir()).join("PEERS"))
                    .iter()
                    .map(|e| {
                        let ip = btf_bytes(&e["formatted"]["key"], "PEERS key");
                        format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
                    })
                    .collect();
            let want_peers: BTreeSet<String> = want.iter().map(|r| r.public_ip.clone()).collect();
            assert_eq!(peers, want_peers, "host {h}: PEERS map");
        }
    };
    expect_maps(&leases);

    // A lease written by someone else (a host netd has never seen) is
    // programmed everywhere, and removed when its lease is revoked.
    let etcd = cluster.topo.etcd();
    let ghost_ip = Ipv4Addr::new(198, 18, 0, 99);
    // 10.244.0.0/24 is not leasable (flannel's SubnetMin is the 2nd subnet).
    let ghost_subnet = (1..=254u8)
        .map(|x| format!("10.244.{x}.0/24"))
        .find(|s| !subnets.contains(s))
        .expect("a free subnet");
    let key = format!(
        "/netd/network/subnets/{}",
        ghost_subnet.replacen('/', "-", 1)
    );
    let value = format!(
        r#"{{"PublicIP":"{ghost_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        vtep_mac(ghost_ip)
    );
    let lease = etcd.lease_grant(120);
    etcd.put_with_lease(&key, &value, lease);
    for h in 0..hosts {
        cluster.wait_peers_match_etcd(h, CONVERGE);
    }
    let with_ghost = etcd_routes(&cluster);
    assert!(
        with_ghost.iter().any(|r| r.subnet == ghost_subnet),
        "{with_ghost:#?}"
    );
    expect_maps(&with_ghost);

    etcd.lease_revoke(lease);
    for h in 0..hosts {
        let host = cluster.host(h);
        wait_for(
            &format!("host {h} to drop {ghost_subnet} from SUBNETS"),
            CONVERGE,
            || {
                subnets_map(host.pin_path())
                    .iter()
                    .all(|r| r.subnet != ghost_subnet)
            },
        );
    }
    expect_maps(&etcd_routes(&cluster));
}

/// After `netd detach`, the container has no eth0, its host-side veth and
/// endpoint are gone, and it is unreachable, while its neighbour still works.
#[test]
fn detach_removes_container_from_overlay() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let gone = cluster.attach(0);
    let stays = cluster.attach(0);
    let remote = cluster.attach(1);
    converge(&cluster);
    cluster.assert_ping(remote, gone, 2, CONVERGE);
    cluster.assert_ping(remote, stays, 2, CONVERGE);

    let status = cluster.status(0);
    let c = cluster.container(gone);
    let endpoint = status["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .find(|e| e["netns"] == c.ns.name())
        .unwrap_or_else(|| panic!("no endpoint for {} in status: {status}", c.ns.name()))
        .clone();
    assert_eq!(endpoint["ip"], c.ip.to_string(), "endpoint {endpoint}");
    let host_if = endpoint["host_ifname"]
        .as_str()
        .expect("host_ifname")
        .to_string();
    let host_ns = cluster.host(0).ns();
    assert!(
        link_exists(host_ns, &host_if),
        "{host_if} missing before detach"
    );
    assert!(link_exists(&c.ns, "eth0"));

    cluster.netd_ok(0, &["detach", c.ns.name()]);

    assert!(
        !link_exists(&c.ns, "eth0"),
        "eth0 still in the detached container:\n{}",
        c.ns.run_ok(&["ip", "addr"])
    );
    assert!(
        !link_exists(host_ns, &host_if),
        "host-side veth {host_if} survived detach:\n{}",
        host_ns.run_ok(&["ip", "link"])
    );
    let status = cluster.status(0);
    let endpoints = status["endpoints"].as_array().expect("endpoints array");
    assert!(
        endpoints
            .iter()
            .all(|e| e["netns"] != c.ns.name() && e["ip"] != c.ip.to_string()),
        "detached container still in status: {endpoints:#?}"
    );
    assert!(
        endpoints
            .iter()
            .any(|e| e["ip"] == cluster.container(stays).ip.to_string()),
        "the other container's endpoint went too: {endpoints:#?}"
    );
    let map_ips: BTreeSet<String> = map_dump(
        &cluster
            .host(0)
            .pin_path()
            .join(netd_tests::layout_dir())
            .join("ENDPOINTS"),
    )
    .iter()
    .map(|e| {
        let ip = btf_bytes(&e["formatted"]["key"], "ENDPOINTS key");
        format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
    })
    .collect();
    // The host's own entry (its gateway address, for host access) stays.
    let subnet = cluster.subnet(0);
    let network = subnet.split('/').next().unwrap();
    let gateway = format!("{}.1", network.rsplit_once('.').unwrap().0);
    assert_eq!(
        map_ips,
        BTreeSet::from([cluster.container(stays).ip.to_string(), gateway]),
        "ENDPOINTS map after detaching {}",
        c.ip
    );

    // Still tunnelled to host 0 (host 1 keeps its subnet), which now hands
    // it to its own stack instead of any container.
    let before = all_counters(&cluster);
    let r = cluster.container(remote);
    let stats = ping_stats(&r.ns, c.ip, 3);
    assert_eq!(
        stats.received, 0,
        "detached {} still answers pings:\n{}",
        c.ip, stats.output
    );
    let after = all_counters(&cluster);
    let why = "pings to the detached address";
    assert_grew(1, &before[1], &after[1], "encapsulated", 3, why);
    assert_grew(0, &before[0], &after[0], "decap_to_stack", 3, why);
    assert_eq!(
        delta(&before[0], &after[0], "decapsulated"),
        0,
        "host 0 delivered VXLAN to a container after detach: {:?} -> {:?}",
        before[0],
        after[0]
    );
    cluster.assert_ping(remote, stays, 2, CONVERGE);
}
