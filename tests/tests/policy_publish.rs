//! Endpoints with labels and networks: each host publishes its own in etcd
//! under its subnet's directory, bound to its lease, and every host's policy
//! view holds the endpoints of all hosts.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use netd_tests::cluster::{Container, PREFIX};
use netd_tests::{Cluster, require_root, wait_for};
use serde_json::{Value, json};

/// How long publication or a host's view may take to follow a change.
const SYNC: Duration = Duration::from_secs(10);

/// Attaches a new container on `host` with `args` after the namespace;
/// returns its address.
fn attach(cluster: &mut Cluster, host: usize, args: &[&str]) -> (String, Ipv4Addr) {
    let ns = cluster.topo.add_container(host);
    let name = ns.name().to_string();
    let mut argv = vec!["attach", name.as_str()];
    argv.extend_from_slice(args);
    let out = cluster.netd_ok(host, &argv);
    let ip: Ipv4Addr = out
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("attach printed {out:?}: {e}"));
    cluster.containers.push(Container { ns, host, ip });
    (name, ip)
}

/// `<prefix>/endpoints/<subnet key>/<ip>` of host `i`.
fn endpoint_key(cluster: &Cluster, i: usize, ip: Ipv4Addr) -> String {
    let subnet = cluster.subnet(i).replace('/', "-");
    format!("{PREFIX}/endpoints/{subnet}/{ip}")
}

fn info(ip: Ipv4Addr, network: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({"ip": ip.to_string(), "network": network, "labels": labels})
}

/// Waits until `key` holds `want` bound to host `i`'s lease.
fn wait_published(cluster: &Cluster, i: usize, key: &str, want: &Value) {
    wait_published_within(cluster, i, key, want, SYNC);
}

fn wait_published_within(cluster: &Cluster, i: usize, key: &str, want: &Value, timeout: Duration) {
    let lease = cluster.state_lease_id(i);
    assert_ne!(lease, 0, "host {i} has no lease id");
    wait_for(
        &format!("{key} = {want} on lease {lease:x}"),
        timeout,
        || {
            cluster.topo.etcd().get_kv(key).is_some_and(|kv| {
                serde_json::from_str::<Value>(&kv.value).ok().as_ref() == Some(want)
                    && kv.lease == lease
            })
        },
    );
}

/// Host `i`'s policy view: its endpoints, as `netd status --json` shows
/// what the policy sync last applied.
fn view_endpoints(cluster: &Cluster, i: usize) -> Vec<Value> {
    let status = cluster.status(i);
    let mut out: Vec<Value> = status["policy"]["tables"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.sort_by_key(|e| e["ip"].as_str().unwrap_or("").parse::<Ipv4Addr>().ok());
    out
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(|e| e["ip"].as_str().unwrap_or("").parse::<Ipv4Addr>().ok());
    v
}

/// Endpoints of two hosts appear in etcd with their network and labels,
/// under their host's subnet and lease; both hosts' views hold all of
/// them, each host's own as local; a detached endpoint's key goes, and so
/// does it from the views.
#[test]
fn endpoints_are_published_and_every_host_sees_them() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let (_, a) = attach(
        &mut cluster,
        0,
        &["--label", "app=web", "--network", "blue"],
    );
    let (b_ns, b) = attach(
        &mut cluster,
        0,
        &["--label", "app=db", "--label", "tier=back"],
    );
    let (_, c) = attach(
        &mut cluster,
        1,
        &["--label", "app=web", "--network", "blue"],
    );
    let want = [
        (0, a, info(a, "blue", &[("app", "web")])),
        (0, b, info(b, "default", &[("app", "db"), ("tier", "back")])),
        (1, c, info(c, "blue", &[("app", "web")])),
    ];
    for (host, ip, value) in &want {
        wait_published(&cluster, *host, &endpoint_key(&cluster, *host, *ip), value);
    }
    let everything = sorted(want.iter().map(|(_, _, v)| v.clone()).collect());
    for i in 0..2 {
        wait_for(&format!("host {i}'s view holds all three"), SYNC, || {
            view_endpoints(&cluster, i) == everything
        });
        let local: Vec<String> = cluster.status(i)["policy"]["tables"]["local"]
            .as_array()
            .expect("local endpoints in the view")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let own: Vec<String> = want
            .iter()
            .filter(|(h, _, _)| *h == i)
            .map(|(_, ip, _)| ip.to_string())
            .collect();
        assert_eq!(local, own, "host {i}'s local endpoints");
    }
    // Only the host's own endpoints are under its directory.
    let subnet0 = cluster.subnet(0).replace('/', "-");
    let dir0: Vec<String> = cluster
        .topo
        .etcd()
        .get_prefix(&format!("{PREFIX}/endpoints/{subnet0}/"))
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        dir0,
        [endpoint_key(&cluster, 0, a), endpoint_key(&cluster, 0, b)]
    );

    cluster.netd_ok(0, &["detach", &b_ns]);
    let key = endpoint_key(&cluster, 0, b);
    wait_for(&format!("{key} deleted after detach"), SYNC, || {
        cluster.topo.etcd().get(&key).is_none()
    });
    let left = sorted(vec![want[0].2.clone(), want[2].2.clone()]);
    for i in 0..2 {
        wait_for(&format!("host {i}'s view without {b}"), SYNC, || {
            view_endpoints(&cluster, i) == left
        });
    }
}

/// A key removed or changed behind the daemon's back is put back
/// (level-triggered against etcd, not only on record changes).
#[test]
fn a_removed_or_changed_key_is_put_back() {
    require_root();
    let mut cluster = Cluster::up(1, "tc");
    let (_, a) = attach(&mut cluster, 0, &["--label", "app=web"]);
    let key = endpoint_key(&cluster, 0, a);
    let value = info(a, "default", &[("app", "web")]);
    wait_published(&cluster, 0, &key, &value);
    // Found at the next full comparison (every 10 s).
    let resync = Duration::from_secs(20);
    cluster.topo.etcd().del(&key);
    wait_published_within(&cluster, 0, &key, &value, resync);
    cluster
        .topo
        .etcd()
        .put(&key, &info(a, "default", &[("app", "evil")]).to_string());
    wait_published_within(&cluster, 0, &key, &value, resync);
}

/// Attach refuses a malformed label or network with a clear error and
/// leaves nothing behind.
#[test]
fn attach_refuses_bad_labels_and_networks() {
    require_root();
    let cluster = Cluster::up(1, "tc");
    let ns = cluster.topo.add_container(0);
    for (args, says) in [
        (&["--label", "app"][..], "is not KEY=VALUE"),
        (&["--label", "app=w b"], "label value"),
        (&["--network", "a/b"], "network name"),
        (&["--label", "app=a", "--label", "app=b"], "given twice"),
    ] {
        let mut argv = vec!["attach", ns.name()];
        argv.extend_from_slice(args);
        let out = cluster.netd(0, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "attach {args:?} succeeded");
        assert!(stderr.contains(says), "attach {args:?}: {stderr}");
    }
    let records = cluster.status(0)["endpoints"].as_array().unwrap().len();
    assert_eq!(records, 0, "a refused attach left a record");
}

/// A host whose daemon dies stops renewing its lease: its endpoints vanish
/// from etcd with it, and from the other host's view.
#[test]
fn a_dead_hosts_endpoints_expire_with_its_lease() {
    require_root();
    let mut cluster = Cluster::new(2, "tc");
    cluster.run_args(&["--lease-ttl", "4"]);
    cluster.start(0);
    cluster.start(1);
    let (_, a) = attach(&mut cluster, 0, &["--label", "app=web"]);
    let (_, c) = attach(&mut cluster, 1, &["--label", "app=db"]);
    let key = endpoint_key(&cluster, 1, c);
    wait_published(&cluster, 1, &key, &info(c, "default", &[("app", "db")]));
    let both = sorted(vec![
        info(a, "default", &[("app", "web")]),
        info(c, "default", &[("app", "db")]),
    ]);
    wait_for("host 0 sees both", SYNC, || {
        view_endpoints(&cluster, 0) == both
    });

    cluster.daemons[1].as_mut().expect("host 1's daemon").kill();
    // TTL 4 s; etcd checks expiry about every 500 ms.
    wait_for(
        &format!("{key} gone with the lease"),
        Duration::from_secs(15),
        || cluster.topo.etcd().get(&key).is_none(),
    );
    let only_a = vec![info(a, "default", &[("app", "web")])];
    wait_for("host 0's view without host 1's endpoint", SYNC, || {
        view_endpoints(&cluster, 0) == only_a
    });
}

/// Identities as compiled on each host: every endpoint of both hosts as a
/// /32, the same network id for the same network on both hosts, and
/// distinct ids for distinct (network, labels).
#[test]
fn identities_agree_across_hosts() {
    require_root();
    let mut cluster = Cluster::up(2, "tc");
    let (_, a) = attach(
        &mut cluster,
        0,
        &["--label", "app=web", "--network", "blue"],
    );
    let (_, b) = attach(&mut cluster, 0, &["--label", "app=db"]);
    let (_, c) = attach(
        &mut cluster,
        1,
        &["--label", "app=web", "--network", "blue"],
    );
    let (_, d) = attach(&mut cluster, 1, &["--label", "app=db", "--network", "blue"]);
    let identities = |i: usize| -> BTreeMap<Ipv4Addr, (u64, u64)> {
        cluster.status(i)["policy"]["tables"]["identities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| {
                let prefix = row["prefix"].as_str()?;
                let ip = prefix.strip_suffix("/32")?.parse().ok()?;
                Some((ip, (row["id"].as_u64()?, row["network"].as_u64()?)))
            })
            .collect()
    };
    for i in 0..2 {
        wait_for(&format!("host {i} has all four identities"), SYNC, || {
            let got = identities(i);
            [a, b, c, d].iter().all(|ip| got.contains_key(ip))
        });
    }
    let (h0, h1) = (identities(0), identities(1));
    for ip in [a, b, c, d] {
        assert_eq!(h0[&ip], h1[&ip], "{ip}: same identity on both hosts");
    }
    assert_eq!(h0[&a], h0[&c], "same network and labels, same identity");
    assert_eq!(h0[&a].1, h0[&d].1, "same network, same network id");
    assert_ne!(h0[&a].1, h0[&b].1, "blue and default have distinct ids");
    assert_ne!(h0[&a].0, h0[&d].0, "distinct labels, distinct identities");
    assert_ne!(h0[&b].0, h0[&d].0, "distinct networks, distinct identities");
}
