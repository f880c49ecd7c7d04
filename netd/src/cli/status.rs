//! `netd status`: what this node holds, knows and has counted.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use serde_json::json;

use super::StatusArgs;
use crate::{
    control::lease::Mac,
    datapath::{self, Maps, PinDir},
    endpoint,
    state::{NodeState, now},
};

pub fn status(pin: &PinDir, run_dir: &Path, args: StatusArgs) -> Result<()> {
    let state = NodeState::read(run_dir);
    let maps = Maps::open(pin)?;
    let peers: Vec<_> = maps
        .subnets()?
        .into_iter()
        .map(|(subnet, p)| {
            json!({
                "subnet": subnet.to_string(),
                "public_ip": std::net::Ipv4Addr::from(p.public_ip).to_string(),
                "vtep_mac": Mac(p.vtep_mac).to_string(),
                "mode": if p.mode == 0 { "vxlan" } else { "direct" },
            })
        })
        .collect();
    let counters: BTreeMap<_, _> = maps.counters()?;
    let endpoints = endpoint::records(run_dir)?;
    let daemon_alive = state
        .as_ref()
        .is_some_and(|s| Path::new(&format!("/proc/{}", s.pid)).exists());
    let report = json!({
        "daemon_running": daemon_alive,
        "state": state,
        "lease_expires_in_secs": state.as_ref().map(|s| s.lease_expires_at as i64 - now() as i64),
        "underlay": datapath::underlay(run_dir),
        "peers": peers,
        "endpoints": endpoints,
        "counters": counters,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

/// A JSON value as plain text: strings unquoted, null as "-".
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_human(r: &serde_json::Value) {
    let s = &r["state"];
    let running = r["daemon_running"].as_bool() == Some(true);
    println!(
        "daemon:   {}",
        if running {
            "running"
        } else {
            "not running (data path stays pinned)"
        }
    );
    println!(
        "network:  {}   subnet: {}   public ip: {}   vtep mac: {}",
        text(&s["network"]),
        text(&s["subnet"]),
        text(&s["public_ip"]),
        text(&s["vtep_mac"])
    );
    println!(
        "lease:    id {:x}   expires in {}s",
        s["lease_id"].as_i64().unwrap_or(0),
        text(&r["lease_expires_in_secs"])
    );
    if let Some(since) = s["lease_lost_since"].as_u64() {
        println!("          LOST since unix time {since}: taking the same subnet back");
    }
    let etcd = &s["etcd"];
    if etcd["reachable"].as_bool() == Some(true) {
        println!("etcd:     reachable");
    } else {
        println!(
            "etcd:     UNREACHABLE since unix time {} ({})",
            text(&etcd["since"]),
            text(&etcd["last_error"])
        );
    }
    println!(
        "underlay: {} (decap on {})",
        text(&r["underlay"]["iface"]),
        text(&r["underlay"]["hook"])
    );
    println!(
        "repairs:  {} attachments put back since the daemon started",
        text(&s["repairs"])
    );
    println!("peers:");
    for p in r["peers"].as_array().into_iter().flatten() {
        println!(
            "  {:<18} via {:<15} vtep {} [{}]",
            text(&p["subnet"]),
            text(&p["public_ip"]),
            text(&p["vtep_mac"]),
            text(&p["mode"])
        );
    }
    println!("containers:");
    for e in r["endpoints"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {} ({} on host, TC ingress from_container)",
            text(&e["ip"]),
            text(&e["netns"]),
            text(&e["host_ifname"])
        );
    }
    println!("counters:");
    for (name, value) in r["counters"].as_object().into_iter().flatten() {
        println!("  {name:<22} {value}");
    }
}
