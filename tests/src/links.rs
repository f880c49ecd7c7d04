//! Interfaces of a namespace and what is attached to them, as `ip` and `tc`
//! report them.

use std::net::Ipv4Addr;

use serde_json::Value;

use crate::NsRef;

/// Runs `argv` in `ns`, panics on failure, returns stdout parsed as JSON.
pub fn json_in(ns: &NsRef, argv: &[&str]) -> Value {
    let out = ns.run_ok(argv);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: bad JSON ({e}): {out}"))
}

/// MAC address of `iface` in `ns`, as `ip` prints it (`0e:6e:...`).
pub fn link_mac(ns: &NsRef, iface: &str) -> String {
    let v = json_in(ns, &["ip", "-j", "link", "show", "dev", iface]);
    v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {iface} in {}: {v}", ns.name()))
        .to_string()
}

/// Names of every interface in `ns`.
pub fn link_names(ns: &NsRef) -> Vec<String> {
    let v = json_in(ns, &["ip", "-j", "link", "show"]);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// Id of the BPF program of the TC ingress filter on `dev` in `ns`
/// (`tc -j filter show`), `None` if there is none, also when `tc` cannot
/// list the filters (no clsact qdisc, no such device).
pub fn tc_prog_id(ns: &NsRef, dev: &str) -> Option<u64> {
    let out = ns.exec(&["tc", "-j", "filter", "show", "dev", dev, "ingress"]);
    if !out.status.success() {
        return None;
    }
    let filters: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let ids: Vec<u64> = filters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["options"]["prog"]["id"].as_u64())
        .collect();
    assert!(ids.len() <= 1, "several BPF filters on {dev}: {filters}");
    ids.first().copied()
}

/// Whether `dev` in `ns` has a clsact qdisc.
pub fn has_clsact(ns: &NsRef, dev: &str) -> bool {
    let qdiscs = json_in(ns, &["tc", "-j", "qdisc", "show", "dev", dev]);
    qdiscs
        .as_array()
        .into_iter()
        .flatten()
        .any(|q| q["kind"] == "clsact")
}

/// Every TC ingress filter on `dev` in `ns`, BPF or not (`tc -j filter show`).
pub fn tc_filters(ns: &NsRef, dev: &str) -> Vec<Value> {
    let filters = json_in(ns, &["tc", "-j", "filter", "show", "dev", dev, "ingress"]);
    filters.as_array().cloned().unwrap_or_default()
}

/// Id of the XDP program on `dev` in `ns` (`ip -j link show`), if any.
pub fn xdp_prog_id(ns: &NsRef, dev: &str) -> Option<u64> {
    let links = json_in(ns, &["ip", "-j", "link", "show", "dev", dev]);
    let xdp = &links[0]["xdp"];
    xdp["prog"]["id"].as_u64().or_else(|| {
        xdp["attached"]
            .as_array()?
            .iter()
            .find_map(|a| a["prog"]["id"].as_u64())
    })
}

/// A MAC address as six bytes.
pub type Mac = [u8; 6];

/// Parses `0e:6e:...` as `ip` prints a MAC address; panics on anything else.
pub fn parse_mac(s: &str) -> Mac {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("mac {s}: {e}")))
        .collect();
    v.try_into().unwrap_or_else(|_| panic!("mac {s}"))
}

/// The gateway of the default route in `ns` (a container's: where its ICMP
/// errors come from).
pub fn default_gateway(ns: &NsRef) -> Ipv4Addr {
    let out = ns.run_ok(&["ip", "-j", "route", "show", "default"]);
    let v: Value = serde_json::from_str(&out).expect("ip -j route");
    v[0]["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no default gateway: {out}"))
}
