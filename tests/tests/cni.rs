//! The `netd-cni` plugin as the CNI spec describes each verb (environment
//! in, JSON out, exit codes) against a running daemon, and the shared
//! allocator under concurrent `netd attach` and CNI ADD.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use netd_tests::{
    Cluster,
    cni::{cni, cni_env, endpoint_map, host_link_exists, netconf, records},
    ping, require_root,
};
use serde_json::{Value, json};

fn conf_text(v: &Value) -> String {
    v.to_string()
}

/// One row of the verb table: environment and config in, outcome out.
struct Case {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    stdin: String,
    /// `None`: success; `Some(code)`: the spec's error code.
    code: Option<u64>,
}

#[test]
fn plugin_errors_follow_the_spec() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let host = cluster.host(0);
    let ns = cluster.topo.add_container(0);
    let netns = ns.path().display().to_string();
    let good = conf_text(&netconf(host, "1.0.0", json!({})));
    let add = |extra: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
        let mut env: Vec<(&'static str, String)> = cni_env("ADD", "c1", &netns, "eth0")
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            if !v.is_empty() {
                env.push((k, v.to_string()));
            }
        }
        env
    };
    let cases = vec![
        Case {
            name: "no CNI_COMMAND",
            env: vec![],
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "unknown verb",
            env: add(&[("CNI_COMMAND", "PUT")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD without CNI_NETNS",
            env: add(&[("CNI_NETNS", "")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD without CNI_CONTAINERID",
            env: add(&[("CNI_CONTAINERID", "")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD without CNI_IFNAME",
            env: add(&[("CNI_IFNAME", "")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD without CNI_PATH",
            env: add(&[("CNI_PATH", "")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD with a bad ifname",
            env: add(&[("CNI_IFNAME", "eth/0")]),
            stdin: good.clone(),
            code: Some(4),
        },
        Case {
            name: "ADD with config not JSON",
            env: add(&[]),
            stdin: "{cniVersion".into(),
            code: Some(6),
        },
        Case {
            name: "ADD with an old version",
            env: add(&[]),
            stdin: conf_text(&netconf(host, "0.3.1", json!({}))),
            code: Some(1),
        },
        Case {
            name: "ADD without a name",
            env: add(&[]),
            stdin: r#"{"cniVersion":"1.0.0","type":"netd-cni"}"#.into(),
            code: Some(7),
        },
        Case {
            name: "ADD with labels not an object",
            env: add(&[]),
            stdin: conf_text(&netconf(host, "1.0.0", json!({"args": {"labels": "x"}}))),
            code: Some(7),
        },
        Case {
            name: "ADD into a missing namespace",
            env: add(&[("CNI_NETNS", "/run/netns/netd-no-such-ns")]),
            stdin: good.clone(),
            code: Some(3),
        },
        Case {
            name: "STATUS with a 1.0.0 config",
            env: vec![("CNI_COMMAND", "STATUS".into())],
            stdin: good.clone(),
            code: Some(1),
        },
        Case {
            name: "GC without valid-attachments",
            env: vec![("CNI_COMMAND", "GC".into())],
            stdin: conf_text(&netconf(host, "1.1.0", json!({}))),
            code: Some(7),
        },
        Case {
            name: "CHECK without prevResult",
            env: add(&[("CNI_COMMAND", "CHECK")]),
            stdin: good.clone(),
            code: Some(7),
        },
        Case {
            name: "DEL of an unknown container",
            env: add(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")]),
            stdin: good.clone(),
            code: None,
        },
        Case {
            name: "STATUS of a running daemon",
            env: vec![("CNI_COMMAND", "STATUS".into())],
            stdin: conf_text(&netconf(host, "1.1.0", json!({}))),
            code: None,
        },
    ];
    for case in cases {
        let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = cni(host, &env, &case.stdin);
        match case.code {
            None => {
                out.ok();
            }
            Some(code) => assert_eq!(out.error_code(), code, "{}: {}", case.name, out.stdout),
        }
        assert!(
            out.stdout.is_empty() || out.stdout.trim_start().starts_with('{'),
            "{}: stdout carries only JSON: {:?}",
            case.name,
            out.stdout
        );
    }
    assert!(records(host).is_empty(), "no failed call left a record");
    assert!(endpoint_map(host.pin_path()).is_empty());
}

#[test]
fn version_lists_every_supported_version() {
    require_root();
    let cluster = Cluster::new(1, "tc");
    let out = cni(
        cluster.host(0),
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.1.0"}"#,
    );
    let v = out.ok();
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    assert_eq!(v["cniVersion"], "1.1.0");
    // An empty stdin is allowed for VERSION.
    assert!(
        cni(cluster.host(0), &[("CNI_COMMAND", "VERSION")], "").ok()["supportedVersions"]
            .is_array()
    );
}

#[test]
fn add_check_gc_del_do_what_the_spec_says() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let host = cluster.host(0);
    let subnet: ipnet_like::Net = cluster.subnet(0).parse().expect("subnet");
    let mut results = Vec::new();
    let mut spaces = Vec::new();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let ns = cluster.topo.add_container(0);
        let netns = ns.path().display().to_string();
        let id = format!("ctr{i}");
        let conf = netconf(
            host,
            version,
            json!({"args": {"labels": {"app": "web"}}, "somethingUnknown": [1]}),
        );
        let mut env = cni_env("ADD", &id, &netns, "eth0");
        env.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1",
        ));
        let r = cni(host, &env, &conf.to_string()).ok();
        assert_eq!(r["cniVersion"], version, "result in the config's version");
        let ip: Ipv4Addr = r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .parse()
            .unwrap();
        assert!(subnet.contains(ip), "{ip} in {}", cluster.subnet(0));
        assert_eq!(r["ips"][0]["gateway"], subnet.gateway().to_string());
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0].get("version").is_some(), version == "0.4.0");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], netns);
        assert!(r["interfaces"][0].get("sandbox").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        let host_if = r["interfaces"][0]["name"].as_str().unwrap().to_string();
        // Kernel state: the address in the namespace, the map entry, the
        // TC filter on the host veth, the record with labels and network.
        let addr = ns.run_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addr.contains(&format!("{ip}/32")), "{addr}");
        let route = ns.run_ok(&["ip", "route", "show", "default"]);
        assert!(
            route.contains(&format!("via {}", subnet.gateway())),
            "{route}"
        );
        // Not /sys: that shows the namespace it was mounted in.
        let link = ns.run_ok(&["ip", "-o", "link", "show", "dev", "eth0"]);
        let mtu = word_after(&link, "mtu");
        let env = std::fs::read_to_string(host.run_dir().join("subnet.env")).unwrap();
        let want = env
            .lines()
            .find_map(|l| l.strip_prefix("NETD_MTU="))
            .unwrap();
        assert_eq!(mtu, want, "MTU as attach sets it: NETD_MTU");
        let link = host
            .ns()
            .run_ok(&["ip", "-o", "link", "show", "dev", &host_if]);
        let ifindex: u64 = link.split(':').next().unwrap().trim().parse().unwrap();
        assert_eq!(
            endpoint_map(host.pin_path()).get(&ip).copied(),
            Some(ifindex)
        );
        let filters = host
            .ns()
            .run_ok(&["tc", "filter", "show", "dev", &host_if, "ingress"]);
        assert!(filters.contains("from_container"), "{filters}");
        let rec = &records(host)[&format!("cni/{id}/eth0")];
        assert_eq!(rec["network"], "netd-test");
        assert_eq!(rec["labels"]["app"], "web");
        assert_eq!(rec["labels"]["io.kubernetes.pod.namespace"], "shop");
        assert_eq!(rec["labels"]["io.kubernetes.pod.name"], "cart-1");
        assert_eq!(rec["ip"], ip.to_string());
        results.push((id, netns, version, r, ip, host_if));
        spaces.push(ns);
    }
    // Containers added by the plugin forward to each other.
    assert!(ping(&spaces[0].handle(), results[1].4, 3), "ctr0 → ctr1");
    assert!(ping(&spaces[2].handle(), results[0].4, 3), "ctr2 → ctr0");

    // ADD of an interface name already in the namespace fails clearly.
    let (_, netns0, _, _, _, _) = &results[0];
    let out = cni(
        host,
        &cni_env("ADD", "other", netns0, "eth0"),
        &netconf(host, "1.0.0", json!({})).to_string(),
    );
    assert_eq!(out.error_code(), 100);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("eth0 already exists"),
        "{}",
        out.stdout
    );

    // CHECK against prevResult: fine as added, failing once the route goes.
    for (id, netns, version, r, _, _) in &results {
        let conf = netconf(host, version, json!({"prevResult": r}));
        cni(
            host,
            &cni_env("CHECK", id, netns, "eth0"),
            &conf.to_string(),
        )
        .ok();
    }
    let (id1, netns1, v1, r1, _, _) = &results[1];
    spaces[1].run_ok(&["ip", "route", "del", "default"]);
    let conf = netconf(host, v1, json!({"prevResult": r1}));
    let out = cni(
        host,
        &cni_env("CHECK", id1, netns1, "eth0"),
        &conf.to_string(),
    );
    assert_eq!(out.error_code(), 101, "{}", out.stdout);

    // Chaining: a prevResult before us is kept, our entries appended.
    let chained_ns = cluster.topo.add_container(0);
    let chained = chained_ns.path().display().to_string();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "dummy"}], "ips": [], "dns": {"nameservers": ["192.0.2.53"]}});
    let conf = netconf(host, "1.0.0", json!({"prevResult": prev}));
    let r = cni(
        host,
        &cni_env("ADD", "chained", &chained, "eth0"),
        &conf.to_string(),
    )
    .ok();
    assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(r["interfaces"][0]["name"], "dummy");
    assert_eq!(r["ips"][0]["interface"], 2);
    assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53");

    // GC keeps the valid attachments and removes the rest of its network.
    let keep: Vec<Value> = results[..2]
        .iter()
        .map(|(id, ..)| json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    let conf = netconf(host, "1.1.0", json!({"cni.dev/valid-attachments": keep}));
    cni(
        host,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        &conf.to_string(),
    )
    .ok();
    let ids: BTreeSet<String> = records(host).into_keys().collect();
    assert_eq!(
        ids,
        BTreeSet::from(["cni/ctr0/eth0".to_string(), "cni/ctr1/eth0".to_string()])
    );
    assert!(
        !host_link_exists(host, &results[2].5),
        "GC removed ctr2's veth"
    );
    assert!(!endpoint_map(host.pin_path()).contains_key(&results[2].4));

    // DEL: removes everything, is idempotent, and works once the namespace
    // is gone too.
    let (id0, netns0, v0, _, ip0, host_if0) = &results[0];
    let conf = netconf(host, v0, json!({}));
    for _ in 0..2 {
        cni(
            host,
            &cni_env("DEL", id0, netns0, "eth0"),
            &conf.to_string(),
        )
        .ok();
    }
    assert!(!host_link_exists(host, host_if0));
    assert!(!endpoint_map(host.pin_path()).contains_key(ip0));
    drop(spaces.remove(1));
    let (_, _, _, _, ip1, host_if1) = &results[1];
    cni(
        host,
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "ctr1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        &conf.to_string(),
    )
    .ok();
    assert!(!host_link_exists(host, host_if1));
    assert!(!endpoint_map(host.pin_path()).contains_key(ip1));
    cni(
        host,
        &cni_env("DEL", "chained", &chained, "eth0"),
        &conf.to_string(),
    )
    .ok();
    assert!(records(host).is_empty(), "{:?}", records(host));
    assert!(endpoint_map(host.pin_path()).is_empty());
}

#[test]
fn status_and_add_while_the_daemon_is_not_up() {
    require_root();
    let mut cluster = Cluster::up(1, "tc");
    let ns = cluster.topo.add_container(0);
    let netns = ns.path().display().to_string();
    cluster.stop(0);
    let host = cluster.host(0);
    let out = cni(
        host,
        &[("CNI_COMMAND", "STATUS")],
        &netconf(host, "1.1.0", json!({})).to_string(),
    );
    assert_eq!(out.error_code(), 50, "stopped daemon");

    // A node whose daemon never ran: STATUS 50, ADD try again later.
    let fresh = Cluster::new(1, "tc");
    let host = fresh.host(0);
    let out = cni(
        host,
        &[("CNI_COMMAND", "STATUS")],
        &netconf(host, "1.1.0", json!({})).to_string(),
    );
    assert_eq!(out.error_code(), 50, "no daemon yet");
    let out = cni(
        host,
        &cni_env("ADD", "early", &netns, "eth0"),
        &netconf(host, "1.0.0", json!({})).to_string(),
    );
    assert_eq!(out.error_code(), 11, "{}", out.stdout);
    assert!(records(host).is_empty());
}

/// `n` containers on host 0 attached by `n` `netd attach` started at once;
/// every one gets its own address and reaches a container on host 1.
fn attach_at_once(cluster: &mut Cluster, n: usize, remote: Ipv4Addr) {
    let spaces: Vec<_> = (0..n).map(|_| cluster.topo.add_container(0)).collect();
    let barrier = Arc::new(Barrier::new(n));
    let args = cluster.node_args(0);
    let threads: Vec<_> = spaces
        .iter()
        .map(|ns| {
            let (barrier, name, args, hostns) = (
                barrier.clone(),
                ns.name().to_string(),
                args.clone(),
                cluster.host(0).ns().handle(),
            );
            std::thread::spawn(move || {
                let mut cmd = hostns.command(netd_tests::netd_bin());
                cmd.args(&args).args(["attach", &name]);
                barrier.wait();
                cmd.output().expect("netd attach")
            })
        })
        .collect();
    let ips: Vec<Ipv4Addr> = threads
        .into_iter()
        .map(|t| {
            let out = t.join().unwrap();
            assert!(
                out.status.success(),
                "attach failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("address")
        })
        .collect();
    let distinct: BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), n, "{n} attaches at once got {ips:?}");
    let map = endpoint_map(cluster.host(0).pin_path());
    for ip in &ips {
        assert!(map.contains_key(ip), "{ip} in the map");
    }
    for (ns, ip) in spaces.iter().zip(&ips) {
        assert!(
            ping(&ns.handle(), remote, 2),
            "{ip} reaches {remote} on host 1"
        );
    }
    // Detach all at once: every address and record released.
    let threads: Vec<_> = spaces
        .iter()
        .map(|ns| {
            let (name, args, hostns) = (
                ns.name().to_string(),
                args.clone(),
                cluster.host(0).ns().handle(),
            );
            std::thread::spawn(move || {
                let mut cmd = hostns.command(netd_tests::netd_bin());
                cmd.args(&args).args(["detach", &name]);
                cmd.output().expect("netd detach")
            })
        })
        .collect();
    for t in threads {
        let out = t.join().unwrap();
        assert!(
            out.status.success(),
            "detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(records(cluster.host(0)).is_empty());
    assert!(endpoint_map(cluster.host(0).pin_path()).is_empty());
}

#[test]
fn concurrent_attaches_get_distinct_addresses_and_forward() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let remote = cluster.attach(1);
    let remote_ip = cluster.container(remote).ip;
    attach_at_once(&mut cluster, 8, remote_ip);
    attach_at_once(&mut cluster, 32, remote_ip);
}

#[test]
fn concurrent_cni_adds_get_distinct_addresses() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let host = cluster.host(0);
    const N: usize = 64;
    let spaces: Vec<_> = (0..N).map(|_| cluster.topo.add_container(0)).collect();
    let barrier = Arc::new(Barrier::new(N));
    let conf = netconf(host, "1.1.0", json!({})).to_string();
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = spaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (barrier, conf, netns) = (
                    barrier.clone(),
                    conf.clone(),
                    ns.path().display().to_string(),
                );
                s.spawn(move || {
                    let id = format!("par{i}");
                    barrier.wait();
                    cni(host, &cni_env("ADD", &id, &netns, "eth0"), &conf)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: BTreeSet<String> = outs
        .iter()
        .map(|o| o.ok()["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), N, "{N} concurrent ADDs got distinct addresses");
    assert_eq!(endpoint_map(host.pin_path()).len(), N);
    assert!(ping(
        &spaces[0].handle(),
        ips.iter()
            .last()
            .unwrap()
            .trim_end_matches("/32")
            .parse::<Ipv4Addr>()
            .unwrap(),
        2
    ));
    println!("concurrent CNI ADDs on one host: {N}, all distinct and in the map");
}

/// What a crash between the intent and the last kernel object leaves: a
/// pending record and a veth. The next attach rolls it back and reuses the
/// address.
#[test]
fn crashed_attach_is_rolled_back() {
    require_root();
    let mut cluster = Cluster::up(1, "tc");
    let host = cluster.host(0);
    let subnet: ipnet_like::Net = cluster.subnet(0).parse().unwrap();
    let ip = subnet.first_free();
    let dir = host.run_dir().join("endpoints");
    std::fs::create_dir_all(&dir).unwrap();
    let pending = json!({
        "id": "crashed", "netns": "crashed", "netns_path": "/run/netns/crashed",
        "ifname": "eth0", "host_ifname": "ndvdeadbeef", "host_ifindex": 0,
        "ip": ip.to_string(), "mac": "", "host_mac": "", "phase": "pending"
    });
    std::fs::write(dir.join("crashed.json"), pending.to_string()).unwrap();
    host.ns().run_ok(&[
        "ip",
        "link",
        "add",
        "ndvdeadbeef",
        "type",
        "veth",
        "peer",
        "name",
        "ndtdeadbeef",
    ]);
    let c = cluster.attach(0);
    assert_eq!(
        cluster.container(c).ip,
        ip,
        "the crashed attach's address is free again"
    );
    let host = cluster.host(0);
    assert!(
        !host_link_exists(host, "ndvdeadbeef"),
        "leftover veth removed"
    );
    let ids: Vec<String> = records(host).into_keys().collect();
    assert_eq!(ids, vec![cluster.container(c).ns.name().to_string()]);
}

/// Time of one CNI ADD and one DEL, over 100 of each; every one must
/// leave the kernel and the records as the verb says.
#[test]
fn hundred_add_del_cycles_leave_nothing_behind() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let host = cluster.host(0);
    let conf = netconf(host, "1.1.0", json!({})).to_string();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..100 {
        let ns = cluster.topo.add_container(0);
        let netns = ns.path().display().to_string();
        let id = format!("cycle{i}");
        let start = Instant::now();
        let r = cni(host, &cni_env("ADD", &id, &netns, "eth0"), &conf).ok();
        adds.push(start.elapsed());
        let host_if = r["interfaces"][0]["name"].as_str().unwrap().to_string();
        assert_eq!(endpoint_map(host.pin_path()).len(), 1);
        let start = Instant::now();
        cni(host, &cni_env("DEL", &id, &netns, "eth0"), &conf).ok();
        dels.push(start.elapsed());
        assert!(!host_link_exists(host, &host_if));
        assert!(endpoint_map(host.pin_path()).is_empty());
    }
    assert!(records(host).is_empty());
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)]
    };
    println!(
        "CNI ADD p50 {:?} p99 {:?}; DEL p50 {:?} p99 {:?} (100 each)",
        pct(&mut adds, 50),
        pct(&mut adds, 99),
        pct(&mut dels, 50),
        pct(&mut dels, 99)
    );
}

/// The word after `key` in `ip -o` output ("mtu 1450" → "1450").
fn word_after(text: &str, key: &str) -> String {
    let mut words = text.split_whitespace().skip_while(|w| *w != key);
    words.nth(1).unwrap_or_default().to_string()
}

/// Just enough IPv4 prefix arithmetic for the assertions above.
mod ipnet_like {
    use std::net::Ipv4Addr;

    pub struct Net {
        base: u32,
        len: u32,
    }

    impl std::str::FromStr for Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (ip, len) = s.split_once('/').ok_or("no prefix length")?;
            let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{e}"))?;
            let len: u32 = len.parse().map_err(|e| format!("{e}"))?;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok(Net {
                base: u32::from(ip) & mask,
                len,
            })
        }
    }

    impl Net {
        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            let mask = if self.len == 0 {
                0
            } else {
                u32::MAX << (32 - self.len)
            };
            u32::from(ip) & mask == self.base
        }
        pub fn gateway(&self) -> Ipv4Addr {
            Ipv4Addr::from(self.base + 1)
        }
        pub fn first_free(&self) -> Ipv4Addr {
            Ipv4Addr::from(self.base + 2)
        }
    }
}

/// Interfaces of the host whose names netd gives host veths and their
/// temporary peers.
fn netd_links(cluster: &Cluster) -> BTreeSet<String> {
    let out = cluster.host(0).ns().run_ok(&["ip", "-o", "link", "show"]);
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or("").to_string())
        .filter(|name| name.starts_with("ndv") || name.starts_with("ndt"))
        .collect()
}

/// `netd attach` processes killed at staggered moments: whatever each had
/// made, the next attach leaves only whole attachments, each with its veth
/// and map entry, and no interface without a record.
#[test]
fn killed_attaches_leave_nothing_half_made() {
    require_root();
    let mut cluster = Cluster::up(1, "tc");
    let args = cluster.node_args(0);
    let spaces: Vec<_> = (0..16).map(|_| cluster.topo.add_container(0)).collect();
    let mut children: Vec<_> = spaces
        .iter()
        .map(|ns| {
            let mut cmd = cluster.host(0).ns().command(netd_tests::netd_bin());
            cmd.args(&args).args(["attach", ns.name()]);
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            cmd.spawn().expect("netd attach")
        })
        .collect();
    for (i, child) in children.iter_mut().enumerate() {
        std::thread::sleep(Duration::from_millis(3 * i as u64));
        let _ = child.kill();
    }
    for child in &mut children {
        let _ = child.wait();
    }
    // The next attach takes the lock and rolls back what the dead left.
    let c = cluster.attach(0);
    let host = cluster.host(0);
    let recs = records(host);
    assert!(recs.values().all(|r| r["phase"] == "ready"), "{recs:?}");
    let veths: BTreeSet<String> = recs
        .values()
        .map(|r| r["host_ifname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(netd_links(&cluster), veths, "interfaces equal the records");
    let ips: BTreeSet<Ipv4Addr> = recs
        .values()
        .map(|r| r["ip"].as_str().unwrap().parse().unwrap())
        .collect();
    let map: BTreeSet<Ipv4Addr> = endpoint_map(host.pin_path()).into_keys().collect();
    assert_eq!(map, ips, "map entries equal the records");
    assert!(ips.contains(&cluster.container(c).ip));
    println!("{} of 16 killed attaches had finished", recs.len() - 1);
    for r in recs.values() {
        cluster.netd_ok(0, &["detach", r["netns"].as_str().unwrap()]);
    }
    assert!(netd_links(&cluster).is_empty());
    assert!(endpoint_map(cluster.host(0).pin_path()).is_empty());
}
