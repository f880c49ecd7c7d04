//! `cargo xtask demo`: a three-host cluster in network namespaces, with a
//! private etcd, a netd daemon per host and two containers on each; shows a
//! cross-host ping and every host's `netd status`, then removes everything
//! on Enter, Ctrl-C or after `--seconds`.

use std::{io::IsTerminal as _, time::Duration};

use anyhow::{Result, bail};
use clap::Args;
use netd_tests::{Cluster, ping_stats};
use nix::sys::signal::{SigSet, Signal};

use crate::{setup, util};

#[derive(Args)]
pub struct Options {
    /// Decapsulation hook on the hosts' underlay NICs: tc, xdp or auto.
    #[arg(long, default_value = "auto")]
    decap: String,
    /// Keep the cluster up this long instead of waiting for Enter/Ctrl-C.
    #[arg(long)]
    seconds: Option<u64>,
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,
    /// Two hosts with a Docker engine each, netd as their network and
    /// IPAM driver, a container per host pinging the other.
    #[arg(long)]
    docker: bool,
}

const HOSTS: usize = 3;
const CONTAINERS_PER_HOST: usize = 2;

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask demo` must run as root: it creates network namespaces and loads eBPF programs"
        );
    }
    if !opts.skip_setup {
        setup::run(&setup::Options::default())?;
    }
    println!("==> build netd");
    util::run(util::cargo().args(["build", "--release", "-p", "netd"]))?;
    let netd_bin = util::target_dir().join("release").join("netd");
    // SAFETY: single-threaded here; the test infra reads it later.
    unsafe { std::env::set_var("NETD_BIN", &netd_bin) };
    if opts.docker {
        return crate::demo_docker::run(&opts.decap, opts.seconds);
    }

    println!(
        "==> {HOSTS} hosts on 198.18.0.0/24, etcd on 198.18.0.254, decap {}",
        opts.decap
    );
    let mut cluster = Cluster::up(HOSTS, &opts.decap);
    for host in 0..HOSTS {
        for _ in 0..CONTAINERS_PER_HOST {
            let c = cluster.attach(host);
            println!(
                "    host {host} ({}): container {} at {}",
                cluster.host(host).ip(),
                cluster.container(c).ns.name(),
                cluster.container(c).ip
            );
        }
    }
    for host in 0..HOSTS {
        cluster.wait_peers_match_etcd(host, Duration::from_secs(10));
    }

    println!("\n==> cross-host pings over netd's VXLAN");
    let last = cluster.containers.len() - 1;
    for (from, to) in [(0, 2), (2, 4), (4, 0), (1, last)] {
        let (a, b) = (cluster.container(from), cluster.container(to));
        let stats = ping_stats(&a.ns.handle(), b.ip, 3);
        let rtt = stats
            .output
            .lines()
            .find(|l| l.contains("rtt"))
            .unwrap_or("")
            .trim()
            .to_string();
        println!(
            "    {} (host {}) -> {} (host {}): {}/{} replies  {rtt}",
            a.ip, a.host, b.ip, b.host, stats.received, stats.transmitted
        );
    }

    for host in 0..HOSTS {
        println!("\n==> netd status on host {host}");
        print!("{}", cluster.netd_ok(host, &["status"]));
    }
    let pin = cluster
        .host(0)
        .pin_path()
        .join(netd_tests::layout_dir())
        .join("SUBNETS");
    println!(
        "\n==> inspect a map: bpftool map dump pinned {}",
        pin.display()
    );
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pin)
        .output()?;
    print!("{}", String::from_utf8_lossy(&dump.stdout));

    // From here Ctrl-C must reach the cleanup below, not kill the process:
    // take SIGINT/SIGTERM synchronously. Blocked only now, so the daemons
    // started above do not inherit the mask and stop on SIGTERM.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;
    wait(opts.seconds, &signals);
    println!("==> removing the demo cluster");
    drop(cluster);
    println!("==> done");
    Ok(())
}

/// Waits for the deadline, Enter on a terminal, or SIGINT/SIGTERM; the
/// first two raise SIGTERM so one `sigwait` covers all three.
pub(crate) fn wait(seconds: Option<u64>, signals: &SigSet) {
    let wake = || {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
    };
    match seconds {
        Some(secs) => {
            println!("\n==> up for {secs}s (Ctrl-C ends it sooner)");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(secs));
                wake();
            });
        }
        None if std::io::stdin().is_terminal() => {
            println!("\n==> cluster is up: press Enter or Ctrl-C to remove it");
            std::thread::spawn(move || {
                let _ = std::io::stdin().read_line(&mut String::new());
                wake();
            });
        }
        None => return,
    }
    let _ = signals.wait();
}
