//! Docker (Debian's docker.io) with netd as its network and IPAM driver on
//! two netd hosts: one engine per host finds its host's netd at
//! `/run/docker/plugins/netd.sock`; `docker network create -d netd
//! --ipam-driver netd netd`, then containers reach each other across hosts
//! by their own addresses, ten `docker run`s at once get ten addresses,
//! `docker rm -f` releases everything, and restarts of dockerd or of netd
//! keep running containers connected. The protocol itself, refusals and
//! Docker's rollback order are checked against the socket directly.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use netd_tests::{
    Cluster,
    cni::{endpoint_map, host_link_exists, records},
    dockerd::{ContainerNs, Dockerd, IMAGE, plugin_call},
    ping_stats, require_root, tcp_transfer, wait_for,
};
use serde_json::json;

const NETWORK: &str = "netd";

fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// A cluster of `hosts` whose daemons serve the plugin where each host's
/// engine looks for it, and the network made on each engine with `extra`
/// options.
fn docker_cluster(hosts: usize, extra: &[&str]) -> (Cluster, Vec<Dockerd>) {
    let mut cluster = Cluster::new(hosts, "tc");
    let mut engines = Vec::new();
    for i in 0..hosts {
        let engine = Dockerd::start(cluster.host(i));
        start_netd(&mut cluster, i, &engine);
        let mut args = vec!["network", "create", "-d", "netd", "--ipam-driver", "netd"];
        args.extend(extra);
        args.push(NETWORK);
        engine.run_ok(&args);
        engines.push(engine);
    }
    (cluster, engines)
}

fn start_netd(cluster: &mut Cluster, i: usize, engine: &Dockerd) {
    let socket = engine.plugin_socket().display().to_string();
    cluster.start_with_env(i, &[("NETD_DOCKER_PLUGIN", &socket)]);
    wait_for("plugin socket", Duration::from_secs(10), || {
        engine.plugin_socket().exists()
    });
}

fn run_d(engine: &Dockerd, name: &str, cmd: &str) {
    engine.run_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        NETWORK,
        IMAGE,
        "sh",
        "-c",
        cmd,
    ]);
}

fn ping_from(engine: &Dockerd, name: &str, ip: Ipv4Addr, count: u32) -> String {
    let out = engine.run(&[
        "exec",
        name,
        "ping",
        "-c",
        &count.to_string(),
        "-W",
        "2",
        &ip.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{name} pinging {ip}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Bytes the server container has received so far.
fn received(engine: &Dockerd, name: &str) -> usize {
    let out = engine.run(&["exec", name, "wc", "-c", "/tmp/got"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `seq 1 200000` from a client container on one host to a server
/// container on the other, checked by digest.
fn tcp_bytes_match(client_engine: &Dockerd, server_engine: &Dockerd, server: &str, client: &str) {
    let server_ip = server_engine.ip(server, NETWORK);
    let script = format!(
        "seq 1 200000 > /tmp/data && md5sum /tmp/data > /tmp/sum && nc {server_ip} 5000 < /tmp/data; sleep 600"
    );
    run_d(client_engine, client, &script);
    wait_for("sum written", Duration::from_secs(30), || {
        client_engine
            .run(&["exec", client, "cat", "/tmp/sum"])
            .status
            .success()
    });
    let sent = client_engine.run_ok(&["exec", client, "wc", "-c", "/tmp/data"]);
    let want: usize = sent.split_whitespace().next().unwrap().parse().unwrap();
    wait_for("server received", Duration::from_secs(30), || {
        received(server_engine, server) >= want
    });
    let digest = |s: String| s.split_whitespace().next().unwrap_or("").to_string();
    let sent = digest(client_engine.run_ok(&["exec", client, "cat", "/tmp/sum"]));
    let got = digest(server_engine.run_ok(&["exec", server, "md5sum", "/tmp/got"]));
    assert!(!sent.is_empty());
    assert_eq!(got, sent, "bytes across hosts");
}

fn avg_rtt_ms(ping_output: &str) -> f64 {
    // busybox: "round-trip min/avg/max = 0.061/0.083/0.120 ms"
    let line = ping_output
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| panic!("no RTT summary in {ping_output}"));
    line.split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn docker_containers_reach_across_hosts() {
    require_root();
    let (cluster, engines) = docker_cluster(2, &["-o", "netd.network=netd"]);
    let (e0, e1) = (&engines[0], &engines[1]);
    run_d(e1, "server", "sleep 600 | nc -l -p 5000 > /tmp/got");
    run_d(e0, "idle", "sleep 600");
    let server_ip = e1.ip("server", NETWORK);
    let idle_ip = e0.ip("idle", NETWORK);
    for (ip, i) in [(idle_ip, 0), (server_ip, 1)] {
        let subnet: Ipv4Net = cluster.subnet(i).parse().unwrap();
        assert!(
            subnet.contains(&ip),
            "{ip} from host {i}'s {}",
            cluster.subnet(i)
        );
        assert_ne!(ip, gateway(subnet), "not the gateway");
    }
    // The network's gateway is the host's gateway address.
    let gw = e0.run_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
        NETWORK,
    ]);
    let subnet0: Ipv4Net = cluster.subnet(0).parse().unwrap();
    assert_eq!(gw, format!("{} {}", gateway(subnet0), cluster.subnet(0)));

    // The endpoint is in the map with the container's MAC, and its record
    // names the Docker network.
    let mac = e0.run_ok(&["exec", "idle", "cat", "/sys/class/net/eth0/address"]);
    let recs = records(cluster.host(0));
    let rec = recs
        .values()
        .find(|r| r["ip"] == idle_ip.to_string())
        .unwrap_or_else(|| panic!("record of {idle_ip}: {recs:?}"));
    assert_eq!(rec["network"], NETWORK, "{rec}");
    assert_eq!(rec["mac"], mac.as_str(), "{rec}");
    assert!(endpoint_map(cluster.host(0).pin_path()).contains_key(&idle_ip));

    ping_from(e0, "idle", server_ip, 3);
    ping_from(e1, "server", idle_ip, 3);
    tcp_bytes_match(e0, e1, "server", "client");

    // Figures: ping RTT and TCP throughput between containers across hosts,
    // and `docker run` until its first reply from the other host.
    let rtt = avg_rtt_ms(&ping_from(e0, "idle", server_ip, 20));
    eprintln!("figure: ping RTT container to container across hosts: {rtt:.3} ms avg of 20");
    let idle_ns = ContainerNs::attach(e0, "idle");
    let server_ns = ContainerNs::attach(e1, "server");
    let size = 256 << 20;
    let sent = tcp_transfer(&idle_ns.ns, &server_ns.ns, (server_ip, 6000).into(), size)
        .expect("TCP from host 0's container to host 1's");
    assert_eq!(sent.bytes, size);
    let gbit = sent.bytes as f64 * 8.0 / sent.elapsed.as_secs_f64() / 1e9;
    eprintln!(
        "figure: TCP throughput container to container across hosts: {gbit:.2} Gbit/s (256 MiB, one stream)"
    );
    let start = Instant::now();
    e0.run_ok(&[
        "run",
        "--rm",
        "--network",
        NETWORK,
        IMAGE,
        "ping",
        "-c",
        "1",
        "-W",
        "5",
        &server_ip.to_string(),
    ]);
    eprintln!(
        "figure: docker run to first reply across hosts: {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
}

#[test]
fn ten_docker_runs_at_once_and_rm() {
    require_root();
    let (cluster, mut engines) = docker_cluster(1, &[]);
    let engine = Arc::new(engines.remove(0));
    let barrier = Arc::new(Barrier::new(10));
    let start = Instant::now();
    let threads: Vec<_> = (0..10)
        .map(|i| {
            let (engine, barrier) = (engine.clone(), barrier.clone());
            std::thread::spawn(move || {
                let name = format!("par{i}");
                let mut cmd = engine.command(&[
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "--network",
                    NETWORK,
                    IMAGE,
                    "sleep",
                    "600",
                ]);
                barrier.wait();
                let out = cmd.output().expect("docker run");
                assert!(
                    out.status.success(),
                    "docker run {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                name
            })
        })
        .collect();
    let names: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!(
        "figure: ten concurrent docker run -d: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let ips: BTreeSet<_> = names.iter().map(|n| engine.ip(n, NETWORK)).collect();
    assert_eq!(ips.len(), 10, "ten distinct addresses: {ips:?}");
    let host = cluster.host(0);
    let map = endpoint_map(host.pin_path());
    assert_eq!(
        map.keys().copied().collect::<BTreeSet<_>>(),
        ips,
        "map holds exactly the ten"
    );
    assert_eq!(records(host).len(), 10);
    // Without `-o netd.network`, endpoints are in network `default`.
    assert!(records(host).values().all(|r| r["network"] == "default"));
    // Same host, container to container, through the gateway.
    let mut it = ips.iter();
    ping_from(&engine, &names[0], *it.nth(1).unwrap(), 1);

    let victim = &names[0];
    let ip = engine.ip(victim, NETWORK);
    let recs = records(host);
    let rec = recs
        .values()
        .find(|r| r["ip"] == ip.to_string())
        .expect("record of the victim");
    let host_if = rec["host_ifname"].as_str().unwrap().to_string();
    assert!(host_link_exists(host, &host_if));
    engine.run_ok(&["rm", "-f", victim]);
    assert!(!host_link_exists(host, &host_if), "veth removed");
    assert!(
        !endpoint_map(host.pin_path()).contains_key(&ip),
        "map entry removed"
    );
    assert_eq!(records(host).len(), 9, "record removed");
    assert!(records(host).values().all(|r| r["ip"] != ip.to_string()));
    // The address is free again: the next container takes it.
    engine.run_ok(&[
        "run",
        "-d",
        "--name",
        "again",
        "--network",
        NETWORK,
        IMAGE,
        "sleep",
        "600",
    ]);
    assert_eq!(engine.ip("again", NETWORK), ip, "released address reused");
}

/// Pings from a container's namespace entered from outside: `docker exec`
/// into a container started before an engine restart is not what is tested.
fn ns_ping(from: &ContainerNs, ip: Ipv4Addr) {
    let stats = ping_stats(&from.ns, ip, 3);
    if !stats.all_received() {
        let addrs = from.ns.exec(&["ip", "addr"]);
        let routes = from.ns.exec(&["ip", "route"]);
        panic!(
            "ping {ip}: {}\n{}{}",
            stats.output,
            String::from_utf8_lossy(&addrs.stdout),
            String::from_utf8_lossy(&routes.stdout)
        );
    }
}

#[test]
fn dockerd_and_netd_restarts_keep_containers_connected() {
    require_root();
    let (mut cluster, mut engines) = docker_cluster(2, &[]);
    run_d(&engines[0], "one", "sleep 600");
    run_d(&engines[1], "two", "sleep 600");
    let one_ip = engines[0].ip("one", NETWORK);
    let two_ip = engines[1].ip("two", NETWORK);
    let one = ContainerNs::attach(&engines[0], "one");
    let two = ContainerNs::attach(&engines[1], "two");
    ns_ping(&one, two_ip);

    // dockerd restart (live restore): the containers keep their addresses
    // and reach each other; the engine runs new ones on the same network.
    engines[0].restart();
    assert_eq!(engines[0].ip("one", NETWORK), one_ip);
    ns_ping(&one, two_ip);
    ns_ping(&two, one_ip);
    run_d(&engines[0], "three", "sleep 600");
    let three_ip = engines[0].ip("three", NETWORK);
    assert_ne!(three_ip, one_ip);
    ping_from(&engines[0], "three", two_ip, 2);

    // netd restart: the map is restored from the records, and the engine
    // talks to the new daemon.
    cluster.stop(0);
    start_netd(&mut cluster, 0, &engines[0]);
    ns_ping(&one, two_ip);
    ns_ping(&two, three_ip);
    run_d(&engines[0], "four", "sleep 600");
    ping_from(&engines[0], "four", two_ip, 2);
    let map = endpoint_map(cluster.host(0).pin_path());
    let want: BTreeSet<_> = ["one", "three", "four"]
        .iter()
        .map(|n| engines[0].ip(n, NETWORK))
        .collect();
    assert_eq!(map.keys().copied().collect::<BTreeSet<_>>(), want);
    let size = 16 << 20;
    let sent = tcp_transfer(&two.ns, &one.ns, (one_ip, 6000).into(), size)
        .expect("TCP to a container that outlived both restarts");
    assert_eq!(sent.bytes, size);
}

/// The protocol without an engine: what Docker would send, including the
/// malformed and the out-of-order, and that a refused call leaves nothing.
#[test]
fn plugin_answers_and_refuses_like_a_remote_driver() {
    require_root();
    let mut cluster = Cluster::new(1, "tc");
    let socket = cluster.host(0).run_dir().join("plugins/netd.sock");
    cluster.start_with_env(0, &[("NETD_DOCKER_PLUGIN", socket.to_str().unwrap())]);
    let call = |method: &str, body: &str| plugin_call(&socket, method, body);
    let subnet: Ipv4Net = cluster.subnet(0).parse().unwrap();
    let host = cluster.host(0);

    let (status, v) = call("Plugin.Activate", "");
    assert_eq!(
        (status, v.clone()),
        (200, json!({"Implements": ["NetworkDriver", "IpamDriver"]}))
    );
    assert_eq!(
        call("NetworkDriver.GetCapabilities", "{}").1["Scope"],
        "local"
    );
    let (status, v) = call("NetworkDriver.ProgramExternalConnectivity", "{}");
    assert_eq!(status, 404, "{v}");

    // Refusals name the reason.
    let (status, v) = call("IpamDriver.RequestPool", r#"{"V6":true}"#);
    assert_eq!(status, 400);
    assert!(v["Err"].as_str().unwrap().contains("IPv6"), "{v}");
    let (status, v) = call("IpamDriver.RequestPool", "{not json");
    assert_eq!(status, 400);
    assert!(
        v["Err"].as_str().unwrap().starts_with("malformed request"),
        "{v}"
    );
    let (status, v) = call(
        "NetworkDriver.CreateNetwork",
        r#"{"NetworkID":"n1","IPv4Data":[{"Pool":"172.16.0.0/24"}]}"#,
    );
    assert_eq!(status, 400);
    assert!(
        v["Err"].as_str().unwrap().contains("--ipam-driver netd"),
        "{v}"
    );

    // Pool, gateway and one address, as `docker network create` and
    // `docker run` ask for them.
    let (status, pool) = call(
        "IpamDriver.RequestPool",
        r#"{"AddressSpace":"netd-local","Pool":""}"#,
    );
    assert_eq!(status, 200, "{pool}");
    assert_eq!(pool["Pool"], subnet.to_string());
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    let (_, gw) = call(
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool_id, "Options": {"RequestAddressType": "com.docker.network.gateway"}}).to_string(),
    );
    assert_eq!(
        gw["Address"],
        format!("{}/{}", gateway(subnet), subnet.prefix_len())
    );
    let (_, addr) = call(
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool_id}).to_string(),
    );
    let ip: Ipv4Addr = addr["Address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    assert!(subnet.contains(&ip) && ip != gateway(subnet), "{addr}");
    assert_eq!(records(host)[&format!("docker/{ip}")]["phase"], "reserved");
    // Not a status entry: nothing is attached yet.
    assert!(!endpoint_map(host.pin_path()).contains_key(&ip));
    assert_eq!(cluster.status(0)["endpoints"], json!([]));
    // A restart of netd keeps the reservation: the next address differs.
    cluster.stop(0);
    cluster.start_with_env(0, &[("NETD_DOCKER_PLUGIN", socket.to_str().unwrap())]);
    let host = cluster.host(0);
    assert_eq!(records(host)[&format!("docker/{ip}")]["phase"], "reserved");
    let (_, next) = call(
        "IpamDriver.RequestAddress",
        &json!({"PoolID": pool_id}).to_string(),
    );
    assert_ne!(next["Address"], addr["Address"]);
    let next_release = json!({"PoolID": pool_id, "Address": next["Address"]}).to_string();
    assert_eq!(
        call("IpamDriver.ReleaseAddress", &next_release),
        (200, json!({}))
    );

    let pool_json = json!({"NetworkID": "n1", "IPv4Data": [{"Pool": subnet.to_string()}],
        "Options": {"com.docker.network.generic": {"netd.network": "web"}}});
    assert_eq!(
        call("NetworkDriver.CreateNetwork", &pool_json.to_string()).0,
        200
    );
    // An endpoint on a network netd never made, or with an address it
    // never handed out, is refused.
    let (status, v) = call(
        "NetworkDriver.CreateEndpoint",
        &json!({"NetworkID": "n9", "EndpointID": "e1", "Interface": {"Address": format!("{ip}/32")}}).to_string(),
    );
    assert_eq!(status, 400, "{v}");
    let other = Ipv4Addr::from(u32::from(ip) + 50);
    let (status, v) = call(
        "NetworkDriver.CreateEndpoint",
        &json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": format!("{other}/32")}}).to_string(),
    );
    assert_eq!(status, 400, "{v}");
    // Join before CreateEndpoint: refused, and no veth left behind.
    let links_before = host.ns().run_ok(&["ip", "-o", "link"]);
    let (status, v) = call(
        "NetworkDriver.Join",
        r#"{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/nowhere"}"#,
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(host.ns().run_ok(&["ip", "-o", "link"]), links_before);

    let (status, v) = call(
        "NetworkDriver.CreateEndpoint",
        &json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": format!("{ip}/32")}}).to_string(),
    );
    assert_eq!((status, v), (200, json!({"Interface": {}})));
    let rec = &records(host)[&format!("docker/{ip}")];
    assert_eq!(rec["network"], "web");
    assert_eq!(rec["container_id"], "e1");
    let (status, join) = call(
        "NetworkDriver.Join",
        r#"{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/nowhere"}"#,
    );
    assert_eq!(status, 200, "{join}");
    let src = join["InterfaceName"]["SrcName"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(join["InterfaceName"]["DstPrefix"], "eth");
    assert_eq!(join["Gateway"], gateway(subnet).to_string());
    assert_eq!(
        join["StaticRoutes"],
        json!([{"Destination": format!("{}/32", gateway(subnet)), "RouteType": 1}])
    );
    // The map entry carries the container end's MAC (Docker moves it,
    // keeping its MAC).
    let link = host.ns().run_ok(&["ip", "-o", "link", "show", "dev", &src]);
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {link}"))
        .to_string();
    assert_eq!(records(host)[&format!("docker/{ip}")]["mac"], mac.as_str());
    assert!(endpoint_map(host.pin_path()).contains_key(&ip));
    let host_if = records(host)[&format!("docker/{ip}")]["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();

    // Docker's rollback and removal: Leave, DeleteEndpoint, ReleaseAddress,
    // each twice, every one answered {}; nothing is left.
    for _ in 0..2 {
        assert_eq!(
            call(
                "NetworkDriver.Leave",
                r#"{"NetworkID":"n1","EndpointID":"e1"}"#
            ),
            (200, json!({}))
        );
    }
    assert!(!host_link_exists(host, &host_if) && !host_link_exists(host, &src));
    assert!(!endpoint_map(host.pin_path()).contains_key(&ip));
    for _ in 0..2 {
        assert_eq!(
            call(
                "NetworkDriver.DeleteEndpoint",
                r#"{"NetworkID":"n1","EndpointID":"e1"}"#
            ),
            (200, json!({}))
        );
    }
    let release = json!({"PoolID": pool_id, "Address": format!("{ip}/32")}).to_string();
    for _ in 0..2 {
        assert_eq!(
            call("IpamDriver.ReleaseAddress", &release),
            (200, json!({}))
        );
    }
    assert!(records(host).is_empty(), "{:?}", records(host));
    assert_eq!(
        call("NetworkDriver.DeleteNetwork", r#"{"NetworkID":"n1"}"#),
        (200, json!({}))
    );
    assert_eq!(
        call(
            "IpamDriver.ReleasePool",
            &json!({"PoolID": pool_id}).to_string()
        ),
        (200, json!({}))
    );
}
