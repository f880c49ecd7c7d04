//! Interfaces of a namespace and what is attached to them, as `ip` and `tc`
//! report them.

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
/// (`tc -j filter show`), `None` if there is none.
pub fn tc_prog_id(ns: &NsRef, dev: &str) -> Option<u64> {
    let filters = json_in(ns, &["tc", "-j", "filter", "show", "dev", dev, "ingress"]);
    let ids: Vec<u64> = filters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["options"]["prog"]["id"].as_u64())
        .collect();
    assert!(ids.len() <= 1, "several BPF filters on {dev}: {filters}");
    ids.first().copied()
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
