//! `cargo xtask demo --docker`: two netd hosts, each with its own Docker
//! engine using netd as network and IPAM driver; a container on each host,
//! pinging the other by its own address.

use std::time::Duration;

use anyhow::{Context as _, Result};
use netd_tests::{
    Cluster,
    dockerd::{Dockerd, IMAGE},
};
use nix::sys::signal::{SigSet, Signal};

const HOSTS: usize = 2;
const NETWORK: &str = "netd";

pub fn run(decap: &str, seconds: Option<u64>) -> Result<()> {
    println!("==> {HOSTS} hosts on 198.18.0.0/24, etcd on 198.18.0.254, a dockerd on each");
    let mut cluster = Cluster::new(HOSTS, decap);
    let mut engines = Vec::new();
    for i in 0..HOSTS {
        let engine = Dockerd::start(cluster.host(i));
        let socket = engine.plugin_socket().display().to_string();
        cluster.start_with_env(i, &[("NETD_DOCKER_PLUGIN", &socket)]);
        netd_tests::wait_for("plugin socket", Duration::from_secs(10), || {
            engine.plugin_socket().exists()
        });
        let create = [
            "network",
            "create",
            "-d",
            "netd",
            "--ipam-driver",
            "netd",
            NETWORK,
        ];
        println!("    host {i}: docker {}", create.join(" "));
        engine.run_ok(&create);
        let name = format!("web{i}");
        engine.run_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            NETWORK,
            IMAGE,
            "sleep",
            "3600",
        ]);
        println!(
            "    host {i} ({}): docker run --network {NETWORK} --name {name} -> {}",
            cluster.host(i).ip(),
            engine.ip(&name, NETWORK)
        );
        engines.push(engine);
    }
    for host in 0..HOSTS {
        cluster.wait_peers_match_etcd(host, Duration::from_secs(10));
    }

    println!("\n==> docker exec ping across hosts, container address to container address");
    for (from, to) in [(0, 1), (1, 0)] {
        let target = engines[to].ip(&format!("web{to}"), NETWORK).to_string();
        let out = engines[from].run(&["exec", &format!("web{from}"), "ping", "-c", "3", &target]);
        print!(
            "    web{from} (host {from}) -> web{to} (host {to}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        if !out.status.success() {
            anyhow::bail!("ping from web{from} to web{to} failed");
        }
    }
    println!("\n==> netd status on host 0");
    print!("{}", cluster.netd_ok(0, &["status"]));

    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking signals")?;
    crate::demo::wait(seconds, &signals);
    println!("==> removing the demo cluster and its engines");
    drop(engines);
    drop(cluster);
    println!("==> done");
    Ok(())
}
