//! Egress and host access: containers on two hosts reach an "outside"
//! namespace routed by the underlay switch (which knows nothing of the
//! container network) behind their host's address with `--ip-masq`, and
//! not without it; container-to-container sources are kept; hosts reach
//! remote containers and containers reach other hosts' own addresses;
//! open connections survive a daemon restart; teardown removes it all.
//! Every scenario runs with both decap hooks.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use netd_tests::topology::OUTSIDE_IP;
use netd_tests::{Capture, Cluster, NsRef, Topology, ping, require_root, tcp_transfer};

const CONVERGE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_BYTES: usize = 1 << 20;
const NETWORK: &str = "10.244.0.0/16";

// ---------------------------------------------------------------- helpers

/// Two hosts with the outside namespace, daemons started with `args`, one
/// container on each host.
fn cluster(decap: &str, args: &[&str]) -> Cluster {
    require_root();
    let topo = Topology::builder().hosts(2).outside(true).build();
    let endpoint = topo.etcd_endpoint();
    topo.host(0).netd_ok(&[
        "network",
        "init",
        "--etcd-endpoints",
        &endpoint,
        "--network",
        NETWORK,
    ]);
    let mut cluster = Cluster::on_topology(topo, decap);
    cluster.run_args(args);
    for i in 0..2 {
        cluster.start(i);
    }
    for i in 0..2 {
        cluster.wait_peers_match_etcd(i, CONVERGE);
        cluster.attach(i);
    }
    cluster
}

fn gateway(cluster: &Cluster, host: usize) -> Ipv4Addr {
    let subnet = cluster.subnet(host);
    let network: Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    let [a, b, c, d] = network.octets();
    Ipv4Addr::new(a, b, c, d + 1)
}

/// A TCP server in `server` that echoes one connection and reports the
/// peer address it saw; the client in `client` checks the echoed bytes.
fn tcp_echo(client: &NsRef, server: &NsRef, dst: SocketAddr, payload: &[u8]) -> Ipv4Addr {
    let (ready_tx, ready_rx) = mpsc::channel();
    let port = dst.port();
    let srv = server.spawn_thread(move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
        ready_tx.send(()).unwrap();
        let (mut stream, peer) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("server read");
        stream.write_all(&got).expect("server write");
        peer
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("server ready");
    let payload = payload.to_vec();
    let echoed = client
        .spawn_thread(move || {
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT).expect("connect");
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.write_all(&payload).expect("client write");
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).expect("client read");
            back == payload
        })
        .join()
        .expect("client thread");
    let peer = srv.join().expect("server thread");
    assert!(echoed, "TCP bytes to {dst} did not come back intact");
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("peer {other}"),
    }
}

/// One UDP datagram from `client` to a server in `server` that echoes it:
/// the source the server saw, and whether the echo came back.
fn udp_echo(client: &NsRef, server: &NsRef, dst: SocketAddr) -> (Option<Ipv4Addr>, bool) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let port = dst.port();
    let srv = server.spawn_thread(move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind udp");
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        let (n, peer) = sock.recv_from(&mut buf).ok()?;
        // Without a way back the echo is lost on the way: the client sees it.
        let _ = sock.send_to(&buf[..n], peer);
        match peer.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            _ => None,
        }
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("udp server ready");
    let back = client
        .spawn_thread(move || {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.send_to(b"netd-egress", dst).expect("udp send");
            let mut buf = [0u8; 64];
            matches!(sock.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"netd-egress")
        })
        .join()
        .unwrap();
    (srv.join().unwrap(), back)
}

fn outside(port: u16) -> SocketAddr {
    SocketAddr::from((OUTSIDE_IP, port))
}

fn nft_tables(cluster: &Cluster, host: usize) -> String {
    cluster.host(host).ns().run_ok(&["nft", "list", "tables"])
}

fn link_exists(cluster: &Cluster, host: usize, name: &str) -> bool {
    cluster
        .host(host)
        .ns()
        .exec(&["ip", "link", "show", name])
        .status
        .success()
}

// ---------------------------------------------------------------- scenarios

/// Containers on both hosts ping and open TCP and UDP to the outside, which
/// sees only the hosts' addresses; container-to-container keeps sources.
fn masquerades(decap: &str) {
    let cluster = cluster(decap, &["--ip-masq"]);
    for i in 0..2 {
        let env = std::fs::read_to_string(cluster.host(i).run_dir().join("subnet.env")).unwrap();
        assert!(
            env.contains("NETD_IPMASQ=true"),
            "host {i} subnet.env: {env}"
        );
        assert!(
            nft_tables(&cluster, i).contains("table ip netd"),
            "host {i} has no netd table"
        );
    }
    let outside_ns = cluster.topo.outside();
    let mut icmp = Capture::start(outside_ns, "eth0", "icmp");
    for c in &cluster.containers {
        assert!(
            ping(&c.ns, OUTSIDE_IP, 3),
            "container {} could not ping the outside",
            c.ip
        );
    }
    let sources: Vec<Vec<String>> = icmp.rows_matching("icmp.type == 8", &["ip.src"]);
    let hosts: Vec<String> = (0..2).map(|i| cluster.host(i).ip().to_string()).collect();
    assert!(
        sources.len() >= 6,
        "echo requests seen outside: {sources:?}"
    );
    for row in &sources {
        assert!(hosts.contains(&row[0]), "outside saw source {row:?}");
    }
    for (n, c) in cluster.containers.iter().enumerate() {
        let host_ip = cluster.host(c.host).ip();
        let payload: Vec<u8> = (0..TCP_BYTES).map(|i| (i * 7 + n) as u8).collect();
        let seen = tcp_echo(&c.ns, outside_ns, outside(7000 + n as u16), &payload);
        assert_eq!(seen, host_ip, "TCP from {} seen outside as {seen}", c.ip);
        let (seen, back) = udp_echo(&c.ns, outside_ns, outside(7100 + n as u16));
        assert_eq!(seen, Some(host_ip), "UDP from {} seen outside", c.ip);
        assert!(back, "UDP reply from the outside did not reach {}", c.ip);
    }
    let (a, b) = (&cluster.containers[0], &cluster.containers[1]);
    let seen = tcp_echo(&a.ns, &b.ns, SocketAddr::from((b.ip, 7200)), b"kept");
    assert_eq!(seen, a.ip, "container-to-container source rewritten");
    let (seen, back) = udp_echo(&b.ns, &a.ns, SocketAddr::from((a.ip, 7201)));
    assert_eq!(
        seen,
        Some(b.ip),
        "container-to-container UDP source rewritten"
    );
    assert!(back);
    host_access(&cluster);
}

/// Without `--ip-masq` traffic to the outside leaves with the container's
/// own address, and the reply is lost at the switch (no route back): what
/// `--ip-masq` fixes.
fn leaves_unrewritten_without_masquerade(decap: &str) {
    let cluster = cluster(decap, &[]);
    assert!(!nft_tables(&cluster, 0).contains("netd"));
    let c = &cluster.containers[0];
    let (seen, back) = udp_echo(&c.ns, cluster.topo.outside(), outside(7300));
    assert_eq!(
        seen,
        Some(c.ip),
        "outside saw {seen:?}, not the container's own address"
    );
    assert!(!back, "a reply reached {} with no route back to it", c.ip);
    host_access(&cluster);
}

/// Host 0 pings and opens TCP to the container on host 1 and back; each
/// container reaches the other host's own address and gets its replies.
fn host_access(cluster: &Cluster) {
    for (h, other) in [(0usize, 1usize), (1, 0)] {
        let host = cluster.host(h).ns();
        let remote = cluster.containers.iter().find(|c| c.host == other).unwrap();
        assert!(
            ping(host, remote.ip, 3),
            "host {h} could not ping remote container {}",
            remote.ip
        );
        let t = tcp_transfer(
            host,
            &remote.ns,
            SocketAddr::from((remote.ip, 7400)),
            TCP_BYTES,
        )
        .unwrap_or_else(|e| panic!("host {h} -> {}: {e:#}", remote.ip));
        assert_eq!(t.bytes, TCP_BYTES);
        // The container sees the host's gateway address, not a rewritten one.
        let seen = tcp_echo(
            host,
            &remote.ns,
            SocketAddr::from((remote.ip, 7401)),
            b"host",
        );
        assert_eq!(
            seen,
            gateway(cluster, h),
            "host {h}'s source seen by {}",
            remote.ip
        );
        let host_ip = cluster.host(h).ip();
        assert!(
            ping(&remote.ns, host_ip, 3),
            "container {} could not ping host {h} at {host_ip}",
            remote.ip
        );
        let t = tcp_transfer(
            &remote.ns,
            host,
            SocketAddr::from((host_ip, 7402)),
            TCP_BYTES,
        )
        .unwrap_or_else(|e| panic!("{} -> host {h}: {e:#}", remote.ip));
        assert_eq!(t.bytes, TCP_BYTES);
    }
}

/// An open TCP connection to the outside keeps working across a restart of
/// its host's daemon; egress and host access still work afterwards.
fn survives_restart(decap: &str) {
    let mut cluster = cluster(decap, &["--ip-masq"]);
    let c = &cluster.containers[0];
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = cluster.topo.outside().spawn_thread(move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 7500)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 5];
        // Echo two messages, before and after the restart.
        for _ in 0..2 {
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
        peer.ip()
    });
    ready_rx.recv_timeout(IO_TIMEOUT).unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let client = c.ns.spawn_thread(move || {
        let mut s = TcpStream::connect_timeout(&outside(7500), IO_TIMEOUT).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"first").unwrap();
        s.read_exact(&mut buf).unwrap();
        let first = &buf == b"first";
        done_tx.send(first).unwrap();
        go_rx.recv().unwrap();
        s.write_all(b"again").unwrap();
        s.read_exact(&mut buf).unwrap();
        first && &buf == b"again"
    });
    assert!(done_rx.recv_timeout(IO_TIMEOUT).unwrap(), "first echo");
    cluster.stop(0);
    cluster.start(0);
    cluster.wait_peers_match_etcd(0, CONVERGE);
    go_tx.send(()).unwrap();
    assert!(
        client.join().unwrap(),
        "connection broke across the restart"
    );
    assert_eq!(server.join().unwrap(), cluster.host(0).ip());
    let c = &cluster.containers[0];
    let (seen, back) = udp_echo(&c.ns, cluster.topo.outside(), outside(7501));
    assert_eq!(seen, Some(cluster.host(0).ip()));
    assert!(back);
    host_access(&cluster);
}

/// Teardown removes the nftables table, the veth pair and the route.
fn teardown_removes_it(decap: &str) {
    let mut cluster = cluster(decap, &["--ip-masq"]);
    assert!(link_exists(&cluster, 0, "netd.host"));
    cluster.stop(0);
    cluster.netd_ok(0, &["teardown"]);
    assert!(!nft_tables(&cluster, 0).contains("netd"), "table left");
    assert!(!link_exists(&cluster, 0, "netd.host"), "netd.host left");
    assert!(!link_exists(&cluster, 0, "netd.net"), "netd.net left");
    let routes = cluster
        .host(0)
        .ns()
        .run_ok(&["ip", "route", "show", "root", NETWORK]);
    assert!(routes.trim().is_empty(), "route left: {routes}");
}

/// Deleting the table or the veth pair behind the daemon's back: both are
/// back within the reconcile period.
fn restores_removed_state(decap: &str) {
    let cluster = cluster(decap, &["--ip-masq"]);
    let host = cluster.host(0).ns();
    host.run_ok(&["nft", "delete", "table", "ip", "netd"]);
    host.run_ok(&["ip", "link", "del", "netd.host"]);
    netd_tests::wait_for("egress state restored", Duration::from_secs(30), || {
        nft_tables(&cluster, 0).contains("table ip netd") && link_exists(&cluster, 0, "netd.host")
    });
    let c = &cluster.containers[0];
    let (seen, back) = udp_echo(&c.ns, cluster.topo.outside(), outside(7600));
    assert_eq!(seen, Some(cluster.host(0).ip()));
    assert!(back);
    host_access(&cluster);
}

/// Sends `count` ICMP echo requests from `src` to `dst` on a raw socket
/// (the header written by hand, so no local address is needed).
const SPOOF_PING: &str = r#"
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for seq in range(count):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x6e64, seq) + b"spoofed!"
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    sock.sendto(ip + icmp, (dst, 0))
"#;

/// A container still cannot send from another address: not from its host's
/// gateway address (the host-access entry), nor from its host's underlay
/// address (which the host itself may send from over its own veth).
fn container_cannot_take_host_addresses(decap: &str) {
    let cluster = cluster(decap, &["--ip-masq"]);
    let (c, remote) = (&cluster.containers[0], &cluster.containers[1]);
    for source in [gateway(&cluster, 0), cluster.host(0).ip()] {
        let before = cluster.counters(0)["drop_spoofed"];
        let mut capture = Capture::start(&remote.ns, "eth0", "icmp");
        c.ns.run_ok(&[
            "python3",
            "-c",
            SPOOF_PING,
            &source.to_string(),
            &remote.ip.to_string(),
            "3",
        ]);
        let after = cluster.counters(0)["drop_spoofed"];
        assert!(
            after >= before + 3,
            "drop_spoofed moved {before} -> {after} for source {source}"
        );
        let seen = capture.rows(&["ip.src"]);
        assert!(
            seen.is_empty(),
            "spoofed packets from {source} arrived: {seen:?}"
        );
    }
}

macro_rules! both_hooks {
    ($($name:ident),*) => {
        mod tc { $( #[test] fn $name() { super::$name("tc") } )* }
        mod xdp { $( #[test] fn $name() { super::$name("xdp") } )* }
    };
}

both_hooks!(
    masquerades,
    leaves_unrewritten_without_masquerade,
    survives_restart,
    teardown_removes_it,
    restores_removed_state,
    container_cannot_take_host_addresses
);
