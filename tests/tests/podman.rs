//! podman 4 with its CNI backend, on two netd hosts: a conflist of
//! `netd-cni` followed by Debian's `tuning`, containers reaching each other
//! across hosts by TCP, six `podman run -d` at once, and `podman rm`.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Barrier},
};

use netd_tests::{
    Cluster, NsRef,
    cni::{cni_bin, endpoint_map, host_link_exists, records},
    podman::{IMAGE, Podman},
    require_root, tcp_transfer,
};
use serde_json::{Value, json};

const NETWORK: &str = "netd";
const SOMAXCONN: &str = "1234";

/// netd-cni for host `i`'s node, then tuning setting a namespaced sysctl
/// (its effect shows the chain ran past netd-cni with its result).
fn conflist(cluster: &Cluster, i: usize) -> Value {
    let host = cluster.host(i);
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "netd-cni",
                "runDir": host.run_dir(),
                "pinPath": host.pin_path(),
                "args": {"labels": {"team": "podman-test"}}
            },
            {"type": "tuning", "sysctl": {"net.core.somaxconn": SOMAXCONN}}
        ]
    })
}

/// Bytes of `seq 1 200000`: what the client container sends.
const SEQ_BYTES: usize = {
    let (mut n, mut total) = (1usize, 0usize);
    while n <= 200_000 {
        let mut digits = 1;
        let mut m = n;
        while m >= 10 {
            m /= 10;
            digits += 1;
        }
        total += digits + 1;
        n += 1;
    }
    total
};

/// Bytes the server container has received so far.
fn received(p: &Podman) -> usize {
    let out = p.run(&["exec", "server", "wc", "-c", "/tmp/got"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn podman_on(cluster: &Cluster, i: usize) -> Podman {
    let plugin_dir = cni_bin().parent().unwrap().to_path_buf();
    Podman::new(
        cluster.host(i),
        &conflist(cluster, i),
        &[&plugin_dir, Path::new("/usr/lib/cni")],
    )
}

fn run_d(podman: &Podman, name: &str, cmd: &str) {
    podman.run_ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        NETWORK,
        "--cap-add",
        "NET_RAW",
        IMAGE,
        "sh",
        "-c",
        cmd,
    ]);
}

#[test]
fn podman_containers_reach_across_hosts() {
    require_root();
    let cluster = Cluster::up(2, "tc");
    let p0 = podman_on(&cluster, 0);
    let p1 = podman_on(&cluster, 1);
    run_d(&p1, "server", "sleep 600 | nc -l -p 5000 > /tmp/got");
    run_d(&p0, "idle", "sleep 600");
    let server_ip = p1.ip("server", NETWORK);
    let idle_ip = p0.ip("idle", NETWORK);
    for (ip, i) in [(server_ip, 1), (idle_ip, 0)] {
        let subnet = cluster.subnet(i);
        let prefix = subnet.rsplit_once('.').unwrap().0;
        assert!(
            ip.to_string().starts_with(&format!("{prefix}.")),
            "{ip} from host {i}'s {subnet}"
        );
    }

    // The chained tuning plugin ran inside the container's namespace.
    assert_eq!(
        p0.run_ok(&["exec", "idle", "cat", "/proc/sys/net/core/somaxconn"]),
        SOMAXCONN
    );
    // The endpoint carries the config's labels and the network name.
    let recs = records(cluster.host(0));
    let rec = recs.values().next().expect("a record on host 0");
    assert_eq!(rec["network"], NETWORK);
    assert_eq!(rec["labels"]["team"], "podman-test");

    let ping = p0.run(&[
        "exec",
        "idle",
        "ping",
        "-c",
        "3",
        "-W",
        "2",
        &server_ip.to_string(),
    ]);
    assert!(
        ping.status.success(),
        "ping across hosts: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // TCP across hosts between the containers' namespaces, 4 MiB checked
    // byte for byte.
    let sandbox = |p: &Podman, name: &str| {
        let key = p.inspect(name)["NetworkSettings"]["SandboxKey"]
            .as_str()
            .unwrap()
            .to_string();
        NsRef::new(Path::new(&key).file_name().unwrap().to_str().unwrap())
    };
    let (idle_ns, server_ns) = (sandbox(&p0, "idle"), sandbox(&p1, "server"));
    let sent = tcp_transfer(&idle_ns, &server_ns, (server_ip, 6000).into(), 4 << 20)
        .expect("TCP from host 0's container to host 1's");
    assert_eq!(sent.bytes, 4 << 20);

    // TCP across hosts, container to container; the bytes must match. The
    // server's input stays open (busybox nc quits once its input ends and
    // the peer's data pauses), and the test waits for the whole size.
    let script = format!(
        "seq 1 200000 > /tmp/data && md5sum /tmp/data > /tmp/sum && nc {server_ip} 5000 < /tmp/data; sleep 600"
    );
    run_d(&p0, "client", &script);
    netd_tests::wait_for(
        "server received",
        std::time::Duration::from_secs(30),
        || received(&p1) >= SEQ_BYTES,
    );
    let sent = p0.run_ok(&["exec", "client", "cat", "/tmp/sum"]);
    let got = p1.run_ok(&["exec", "server", "md5sum", "/tmp/got"]);
    let digest = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    let size = p1.run_ok(&["exec", "server", "wc", "-c", "/tmp/got"]);
    assert_eq!(
        digest(&got),
        digest(&sent),
        "bytes across hosts (received {size})"
    );
    assert!(!digest(&sent).is_empty());
    let back = p1.run(&[
        "exec",
        "server",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        &idle_ip.to_string(),
    ]);
    assert!(
        back.status.success(),
        "ping back: {}",
        String::from_utf8_lossy(&back.stdout)
    );
}

#[test]
fn six_podman_runs_at_once_and_rm() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let podman = Arc::new(podman_on(&cluster, 0));
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let (podman, barrier) = (podman.clone(), barrier.clone());
            std::thread::spawn(move || {
                let name = format!("par{i}");
                let mut cmd = podman.command(&[
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
                let out = cmd.output().expect("podman run");
                assert!(
                    out.status.success(),
                    "podman run {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                name
            })
        })
        .collect();
    let names: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ips: BTreeSet<_> = names.iter().map(|n| podman.ip(n, NETWORK)).collect();
    assert_eq!(ips.len(), 6, "six distinct addresses: {ips:?}");
    let host = cluster.host(0);
    let map = endpoint_map(host.pin_path());
    assert_eq!(
        map.keys().copied().collect::<BTreeSet<_>>(),
        ips,
        "map holds exactly the six"
    );
    assert_eq!(records(host).len(), 6);

    // podman rm: the veth, the map entry and the record go.
    let victim = &names[0];
    let ip = podman.ip(victim, NETWORK);
    let recs = records(host);
    let rec = recs
        .values()
        .find(|r| r["ip"] == ip.to_string())
        .expect("record of the victim");
    let host_if = rec["host_ifname"].as_str().unwrap().to_string();
    assert!(host_link_exists(host, &host_if));
    podman.run_ok(&["rm", "-f", "-t", "0", victim]);
    assert!(!host_link_exists(host, &host_if), "veth removed");
    assert!(
        !endpoint_map(host.pin_path()).contains_key(&ip),
        "map entry removed"
    );
    assert_eq!(records(host).len(), 5, "record removed");
    assert!(records(host).values().all(|r| r["ip"] != ip.to_string()));
}
