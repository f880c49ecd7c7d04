//! `netd teardown` on a host whose daemon ran with containers attached and
//! was stopped: afterwards nothing of netd is left (no veth, no route, no
//! gateway address, no program on the underlay NIC, no pin, no run-directory
//! file), a second teardown succeeds, a host where part of it was removed by
//! hand is cleaned up all the same, and what cannot be removed is reported
//! with a non-zero exit while the rest still goes.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use netd_tests::bpftool::prog_exists;
use netd_tests::links::{json_in, link_names, tc_filters, tc_prog_id, xdp_prog_id};
use netd_tests::util::output_text;
use netd_tests::{Cluster, ping_stats, require_root, wait_for};

const HOST: usize = 0;
const UNDERLAY: &str = "eth0";
/// How long the kernel may take to free a detached program.
const FREED: Duration = Duration::from_secs(30);

/// What netd had made on a host, taken (and checked present) before the
/// teardown, so that each absence afterwards is one of something that was.
#[derive(Debug)]
struct Footprint {
    veths: Vec<String>,
    container_ips: Vec<Ipv4Addr>,
    gateway: Ipv4Addr,
    prog_ids: Vec<u64>,
}

/// The gateway address from `subnet.env` (`NETD_SUBNET=10.244.71.1/24`).
fn gateway_of(run_dir: &Path) -> Ipv4Addr {
    let env = std::fs::read_to_string(run_dir.join("subnet.env")).expect("read subnet.env");
    let value = env
        .lines()
        .find_map(|l| l.strip_prefix("NETD_SUBNET="))
        .unwrap_or_else(|| panic!("no NETD_SUBNET in subnet.env:\n{env}"));
    let ip = value.split('/').next().unwrap_or_default();
    ip.parse()
        .unwrap_or_else(|e| panic!("NETD_SUBNET={value}: {e}"))
}

/// IPv4 addresses on `lo` of the host.
fn lo_addresses(cluster: &Cluster) -> Vec<Ipv4Addr> {
    let ns = cluster.host(HOST).ns().handle();
    json_in(&ns, &["ip", "-j", "-4", "addr", "show", "dev", "lo"])[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

/// (destination, device) of every IPv4 route of the host's main table.
fn routes(cluster: &Cluster) -> Vec<(String, String)> {
    let ns = cluster.host(HOST).ns().handle();
    json_in(&ns, &["ip", "-j", "-4", "route", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_string(),
                r["dev"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A one-host cluster whose daemon decapsulates with XDP (so both XDP and
/// TC are on the underlay) and has two containers that reach each other.
fn cluster_with_two_containers() -> Cluster {
    let mut cluster = Cluster::up(1, "xdp");
    let (a, b) = (cluster.attach(HOST), cluster.attach(HOST));
    let (ca, cb) = (cluster.container(a), cluster.container(b));
    let stats = ping_stats(&ca.ns.handle(), cb.ip, 3);
    assert!(
        stats.all_received(),
        "container {} cannot ping container {} before the teardown:\n{}",
        ca.ip,
        cb.ip,
        stats.output
    );
    cluster
}

/// Records what netd made on the host, asserting each piece is there.
fn footprint(cluster: &Cluster) -> Footprint {
    let ns = cluster.host(HOST).ns().handle();
    let veths = cluster.host_veths(HOST);
    assert_eq!(veths.len(), 2, "endpoint records: {veths:?}");
    let links = link_names(&ns);
    let container_ips: Vec<Ipv4Addr> = cluster.containers.iter().map(|c| c.ip).collect();
    let routes = routes(cluster);
    let mut prog_ids = Vec::new();
    for (veth, ip) in veths.iter().zip(&container_ips) {
        assert!(links.contains(veth), "no {veth} on the host: {links:?}");
        prog_ids.push(tc_prog_id(&ns, veth).unwrap_or_else(|| panic!("no TC program on {veth}")));
        assert!(
            routes.iter().any(|(dst, _)| *dst == ip.to_string()),
            "no host route to {ip}: {routes:?}"
        );
    }
    prog_ids.push(tc_prog_id(&ns, UNDERLAY).expect("TC program on the underlay"));
    prog_ids.push(xdp_prog_id(&ns, UNDERLAY).expect("XDP program on the underlay"));
    let gateway = gateway_of(cluster.host(HOST).run_dir());
    assert!(
        lo_addresses(cluster).contains(&gateway),
        "gateway {gateway} not on lo: {:?}",
        lo_addresses(cluster)
    );
    let pins = std::fs::read_dir(cluster.host(HOST).pin_path().join(netd_tests::layout_dir()))
        .expect("pin directory v1")
        .count();
    assert!(pins > 0, "nothing pinned under v1");
    for file in ["state.json", "subnet.env", "datapath.json", "endpoints"] {
        assert!(
            cluster.host(HOST).run_dir().join(file).exists(),
            "no {file} in the run directory"
        );
    }
    Footprint {
        veths,
        container_ips,
        gateway,
        prog_ids,
    }
}

/// Entries of the run directory other than the test's own daemon logs.
fn run_dir_files(cluster: &Cluster) -> Vec<String> {
    let dir = cluster.host(HOST).run_dir();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Entries left under the pin path (which may itself be gone).
fn pins_left(cluster: &Cluster) -> Vec<String> {
    std::fs::read_dir(cluster.host(HOST).pin_path())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that nothing of `fp` (nor anything else of netd's) is left.
fn assert_nothing_left(cluster: &Cluster, fp: &Footprint) {
    let ns = cluster.host(HOST).ns().handle();
    let links = link_names(&ns);
    assert!(
        links
            .iter()
            .all(|l| !fp.veths.contains(l) && !l.starts_with("ndv") && !l.starts_with("ndt")),
        "container veths left on the host: {links:?}"
    );
    for c in &cluster.containers {
        assert_eq!(
            link_names(&c.ns.handle()),
            ["lo"],
            "container {} still has an interface",
            c.ip
        );
    }
    let routes = routes(cluster);
    assert!(
        routes.iter().all(|(dst, dev)| {
            !fp.container_ips.iter().any(|ip| *dst == ip.to_string()) && !fp.veths.contains(dev)
        }),
        "host routes to containers left: {routes:?}"
    );
    let lo = lo_addresses(cluster);
    assert!(
        !lo.contains(&fp.gateway),
        "gateway {} still on lo: {lo:?}",
        fp.gateway
    );
    let filters = tc_filters(&ns, UNDERLAY);
    assert!(
        filters.is_empty(),
        "TC filters left on {UNDERLAY}: {filters:?}"
    );
    assert_eq!(xdp_prog_id(&ns, UNDERLAY), None, "XDP left on {UNDERLAY}");
    assert_eq!(pins_left(cluster), Vec::<String>::new(), "pins left");
    assert_eq!(
        run_dir_files(cluster),
        Vec::<String>::new(),
        "netd files left in the run directory"
    );
    for id in &fp.prog_ids {
        wait_for(&format!("program {id} to be freed"), FREED, || {
            !prog_exists(*id)
        });
    }
}

/// `netd teardown` on the host; returns its output, whatever the status.
fn teardown(cluster: &Cluster) -> std::process::Output {
    cluster.netd(HOST, &["teardown"])
}

fn assert_teardown_ok(cluster: &Cluster, what: &str) {
    let out = teardown(cluster);
    assert!(
        out.status.success(),
        "{what}: netd teardown failed ({}):\n{}",
        out.status,
        output_text(&out)
    );
}

#[test]
fn teardown_after_a_stopped_daemon_leaves_nothing_and_can_run_again() {
    require_root();
    let mut cluster = cluster_with_two_containers();
    let fp = footprint(&cluster);
    assert_eq!(cluster.stop(HOST).code(), Some(0), "SIGTERM exit");

    assert_teardown_ok(&cluster, "first teardown");
    assert_nothing_left(&cluster, &fp);
    assert_teardown_ok(&cluster, "second teardown");
    assert_nothing_left(&cluster, &fp);
}

#[test]
fn teardown_refuses_while_the_daemon_runs() {
    require_root();
    let cluster = cluster_with_two_containers();
    let pid = cluster.daemon_pid(HOST);
    let out = teardown(&cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("pid {pid}")),
        "teardown with the daemon running: expected a refusal naming pid {pid} ({}):\n{}",
        out.status,
        output_text(&out)
    );
    // Refused before touching anything.
    footprint(&cluster);
}

#[test]
fn teardown_of_a_half_removed_host_removes_the_rest() {
    require_root();
    let mut cluster = cluster_with_two_containers();
    let fp = footprint(&cluster);
    assert_eq!(cluster.stop(HOST).code(), Some(0), "SIGTERM exit");
    // By hand: one container's veth, the underlay's TC filter, and the run
    // files teardown would otherwise take the subnet and the underlay from
    // (state.json still has both).
    let ns = cluster.host(HOST).ns().handle();
    ns.run_ok(&["ip", "link", "del", &fp.veths[0]]);
    ns.run_ok(&["tc", "filter", "del", "dev", UNDERLAY, "ingress"]);
    let run_dir = cluster.host(HOST).run_dir();
    for file in ["subnet.env", "datapath.json"] {
        std::fs::remove_file(run_dir.join(file)).expect("remove run file");
    }

    assert_teardown_ok(&cluster, "teardown of a half-removed host");
    assert_nothing_left(&cluster, &fp);
}

#[test]
fn teardown_reports_what_it_cannot_remove_and_removes_the_rest() {
    require_root();
    let mut cluster = cluster_with_two_containers();
    let fp = footprint(&cluster);
    assert_eq!(cluster.stop(HOST).code(), Some(0), "SIGTERM exit");
    // A subnet.env that is a non-empty directory cannot be removed as a
    // file; the gateway is then found through state.json.
    let env = cluster.host(HOST).run_dir().join("subnet.env");
    std::fs::remove_file(&env).expect("remove subnet.env");
    std::fs::create_dir(&env).expect("subnet.env as a directory");
    std::fs::write(env.join("keep"), "x").expect("file in it");

    let out = teardown(&cluster);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("1 error") && stderr.contains("subnet.env"),
        "teardown with an unremovable subnet.env: expected exit 1 naming it ({}):\n{}",
        out.status,
        output_text(&out)
    );
    assert_eq!(
        run_dir_files(&cluster),
        ["subnet.env"],
        "teardown stopped early or removed the wrong files"
    );
    std::fs::remove_dir_all(&env).expect("remove the subnet.env directory");
    assert_nothing_left(&cluster, &fp);
}
