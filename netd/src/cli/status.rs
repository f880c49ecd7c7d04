//! `netd status`: what this node holds, knows and has counted.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use serde_json::json;

use super::StatusArgs;
use aya::maps::{Array, HashMap, Map, MapData};
use netd_common::{
    names,
    policy::{CtEntry, CtKey, PolicyState},
};

use crate::{
    control::{lease::Mac, policy_sync::Summary},
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
    let policy = policy_report(pin, run_dir, &counters);
    let report = json!({
        "daemon_running": daemon_alive,
        "state": state,
        "lease_expires_in_secs": state.as_ref().map(|s| s.lease_expires_at as i64 - now() as i64),
        "underlay": datapath::underlay(run_dir),
        "peers": peers,
        "endpoints": endpoints,
        "counters": counters,
        "policy": policy,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

/// What the policy sync applied (`policy.json`), the kernel's generation
/// and conntrack size (absent maps: null), and the policy drop counters.
fn policy_report(
    pin: &PinDir,
    run_dir: &Path,
    counters: &BTreeMap<&'static str, u64>,
) -> serde_json::Value {
    let summary = Summary::read(run_dir);
    json!({
        "in_force": summary.as_ref().map(|s| s.policies.clone()),
        "identities": summary.as_ref().map(|s| s.identities.len()),
        "rules": summary.as_ref().map(|s| s.rules),
        "problems": summary.as_ref().map(|s| s.problems.clone()),
        "rejected": summary.as_ref().map(|s| s.rejected.clone()),
        "error": summary.as_ref().and_then(|s| s.error.clone()),
        "applied_at": summary.as_ref().map(|s| s.applied_at),
        "generation": generation(pin),
        "conntrack_entries": conntrack_entries(pin),
        "drop_policy": counters.get("drop_policy"),
        "drop_isolation": counters.get("drop_isolation"),
        "tables": summary,
    })
}

fn pinned(pin: &PinDir, name: &str) -> Option<Map> {
    let data = MapData::from_pin(pin.map(name)).ok()?;
    Map::from_map_data(data).ok()
}

fn generation(pin: &PinDir) -> Option<u32> {
    let state: Array<MapData, PolicyState> = pinned(pin, names::POLICY_STATE)?.try_into().ok()?;
    state.get(&0, 0).ok().map(|s| s.generation)
}

fn conntrack_entries(pin: &PinDir) -> Option<usize> {
    let ct: HashMap<MapData, CtKey, CtEntry> = pinned(pin, names::CONNTRACK)?.try_into().ok()?;
    Some(ct.keys().filter(Result::is_ok).count())
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
    print_policy(&r["policy"]);
    println!("counters:");
    for (name, value) in r["counters"].as_object().into_iter().flatten() {
        println!("  {name:<22} {value}");
    }
}

fn print_policy(p: &serde_json::Value) {
    let names: Vec<String> = p["in_force"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    println!(
        "policy:   {} in force{}{}",
        names.len(),
        if names.is_empty() { "" } else { ": " },
        names.join(", ")
    );
    println!(
        "          identities {}   rules {}   generation {}   conntrack entries {}",
        text(&p["identities"]),
        text(&p["rules"]),
        text(&p["generation"]),
        text(&p["conntrack_entries"])
    );
    println!(
        "          drop_policy {}   drop_isolation {}",
        text(&p["drop_policy"]),
        text(&p["drop_isolation"])
    );
    for problem in p["problems"].as_array().into_iter().flatten() {
        println!("          problem: {}", text(problem));
    }
    for (key, why) in p["rejected"].as_object().into_iter().flatten() {
        println!("          ignored {key}: {}", text(why));
    }
    if !p["error"].is_null() {
        println!("          LAST APPLY FAILED: {}", text(&p["error"]));
    }
}
