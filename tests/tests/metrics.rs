//! `netd run --metrics-addr`: `/metrics` in the Prometheus text format that
//! `promtool` accepts, scraped by a real Prometheus, and `/healthz`.
//!
//! ```text
//!   switch ns (Prometheus on 127.0.0.1:9090, scraping host 0) ── host 0 (metrics on :9101), host 1
//! ```

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use netd_tests::prometheus::{Prometheus, promtool_check};
use netd_tests::{Cluster, VXLAN_PORT, http, ping, require_root, wait_for};

const METRICS_PORT: u16 = 9101;

fn metrics_addr(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from((cluster.host(0).ip(), METRICS_PORT))
}

/// A two-host cluster whose host 0 serves metrics, a container on each,
/// traffic across so the counters have moved.
fn cluster() -> Cluster {
    require_root();
    let mut cluster = Cluster::new(2, "tc");
    let addr = SocketAddr::from((netd_tests::host_ip(0), METRICS_PORT)).to_string();
    cluster.run_args(&["--metrics-addr", &addr]);
    cluster.start(0);
    cluster.run_args(&[]);
    cluster.start(1);
    cluster.wait_peers_match_etcd(0, Duration::from_secs(10));
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    let to = cluster.container(c1).ip;
    assert!(
        ping(&cluster.container(c0).ns.handle(), to, 3),
        "ping across"
    );
    cluster
}

/// The value of the one sample whose line starts with `series ` (name and
/// labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// VXLAN from the switch, which is on the underlay but holds no lease.
fn send_spoofed_vxlan(cluster: &Cluster, count: usize) {
    let target = SocketAddr::from((cluster.host(0).ip(), VXLAN_PORT));
    cluster.topo.switch().handle().run_in_thread(move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind in switch");
        // VXLAN header (I flag, VNI 1) and an inner Ethernet frame's worth.
        let mut frame = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        frame.extend_from_slice(&[0u8; 60]);
        for _ in 0..count {
            socket.send_to(&frame, target).expect("send spoofed VXLAN");
        }
    });
}

#[test]
fn metrics_pass_promtool_and_name_what_happened() {
    let cluster = cluster();
    let switch = cluster.topo.switch().handle();
    let response = http::get(&switch, metrics_addr(&cluster), "/metrics").expect("GET /metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    let text = response.body;
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool rejects /metrics: {e}\n{text}"));

    assert_eq!(sample(&text, "netd_peers"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "netd_endpoints"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "netd_etcd_reachable"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "netd_build_info{version=\"0.1.0\"}"),
        Some(1.0),
        "{text}"
    );
    let encapsulated = sample(&text, "netd_packets_total{verdict=\"encapsulated\"}");
    assert!(encapsulated.is_some_and(|n| n >= 3.0), "{text}");
    let decapsulated = sample(&text, "netd_packets_total{verdict=\"decapsulated\"}");
    assert!(decapsulated.is_some_and(|n| n >= 3.0), "{text}");
    let expiry = sample(&text, "netd_lease_expiry_timestamp_seconds").expect("expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now && expiry <= now + 61.0,
        "expiry {expiry}, now {now}"
    );
    // Host 1's lease reached host 0 through the watch.
    let synced = sample(&text, "netd_sync_event_to_programmed_seconds_count").expect("histogram");
    assert!(synced >= 1.0, "{text}");

    let health = http::get(&switch, metrics_addr(&cluster), "/healthz").expect("GET /healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let missing = http::get(&switch, metrics_addr(&cluster), "/nope").expect("GET /nope");
    assert_eq!(missing.status, 404);
}

#[test]
fn prometheus_scrapes_the_daemon_and_sees_spoofed_vxlan_dropped() {
    let cluster = cluster();
    let switch = cluster.topo.switch().handle();
    let prom = Prometheus::start(&switch, metrics_addr(&cluster));
    wait_for("prometheus: up == 1", Duration::from_secs(30), || {
        prom.query_one("up{job=\"netd\"}") == Some(1.0)
    });
    let query = "netd_drop_count_total{reason=\"unknown_peer\"}";
    let mut before = None;
    wait_for("a scraped drop counter", Duration::from_secs(30), || {
        before = prom.query_one(query);
        before.is_some()
    });
    let before = before.unwrap();

    let sent = 7;
    send_spoofed_vxlan(&cluster, sent);
    let mut now = before;
    let moved = netd_tests::poll_until(Duration::from_secs(30), || {
        now = prom.query_one(query).unwrap_or(before);
        now >= before + sent as f64
    });
    assert!(
        moved,
        "{query}: {before} before, {now} after {sent} spoofed frames"
    );
    assert_eq!(
        now,
        before + sent as f64,
        "only the spoofed frames were dropped"
    );
}
