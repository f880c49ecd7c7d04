//! `netd policy apply|delete|list` against a real etcd: what apply writes
//! is the document, a malformed one is refused with a message naming the
//! problem and nothing written, delete removes, list shows.

use std::io::Write as _;
use std::process::{Output, Stdio};

use netd_tests::{Host, Topology, netd_bin, require_root};
use serde_json::{Value, json};

const PREFIX: &str = "/policy-test/network";

/// The example of the policy format.
fn web_ingress() -> Value {
    json!({"name": "web-ingress", "network": "default", "selector": {"app": "web"}, "types": ["Ingress"],
           "ingress": [{"from": [{"selector": {"app": "client"}}, {"network": "blue", "selector": {}},
                                 {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}],
                        "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8090}]}],
           "egress": []})
}

fn etcd_args(endpoint: &str) -> Vec<String> {
    ["--etcd-endpoints", endpoint, "--etcd-prefix", PREFIX]
        .map(String::from)
        .to_vec()
}

/// `netd policy ARGS...` with the topology's etcd.
fn policy(topo: &Topology, args: &[&str]) -> Output {
    policy_at(topo.host(0), &topo.etcd_endpoint(), args)
}

fn policy_at(host: &Host, endpoint: &str, args: &[&str]) -> Output {
    let mut all = vec!["policy".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(etcd_args(endpoint));
    host.netd(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn stdout_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "netd failed ({}): {stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failure exit with one error line on stderr that contains `needle`.
fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {stderr}");
    assert!(!stderr.contains("panicked"), "netd panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line: {stderr}");
    assert!(
        errors[0].contains(needle),
        "{:?} does not name {needle:?}",
        errors[0]
    );
}

fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn key(name: &str) -> String {
    format!("{PREFIX}/policies/{name}")
}

fn stored(topo: &Topology) -> Vec<String> {
    topo.etcd()
        .get_prefix(&format!("{PREFIX}/policies/"))
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[test]
fn apply_list_delete() {
    require_root();
    let topo = Topology::builder().hosts(1).build();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(&dir, "web.json", &web_ingress().to_string());

    let out = stdout_ok(&policy(&topo, &["apply", &file]));
    assert_eq!(
        out.trim(),
        format!("created policy web-ingress at {}", key("web-ingress"))
    );
    let value = topo.etcd().get(&key("web-ingress")).expect("key written");
    let value: Value = serde_json::from_str(&value).expect("stored JSON");
    assert_eq!(value, web_ingress());
    let again = stdout_ok(&policy(&topo, &["apply", &file]));
    assert!(again.starts_with("unchanged policy web-ingress"), "{again}");

    // From standard input, with defaults left out.
    let mut child = topo
        .host(0)
        .ns()
        .command(netd_bin())
        .args(["policy", "apply", "-"])
        .args(etcd_args(&topo.etcd_endpoint()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"name": "db-egress", "network": "blue", "egress": [{"to": [{"cidr": "0.0.0.0/0"}]}, {}]}"#)
        .unwrap();
    let out = stdout_ok(&child.wait_with_output().unwrap());
    assert!(out.starts_with("created policy db-egress"), "{out}");
    let db: Value = serde_json::from_str(&topo.etcd().get(&key("db-egress")).unwrap()).unwrap();
    assert_eq!(db["network"], "blue");
    assert_eq!(db["egress"][0]["to"][0]["cidr"], "0.0.0.0/0");

    let list = stdout_ok(&policy(&topo, &["list"]));
    let rows: Vec<Vec<&str>> = list
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{list}");
    assert_eq!(
        rows[0],
        ["NAME", "NETWORK", "SELECTOR", "TYPES", "INGRESS", "EGRESS"]
    );
    assert_eq!(
        rows[1],
        [
            "db-egress",
            "blue",
            "{}",
            "Ingress,Egress",
            "-",
            "2",
            "rules"
        ]
    );
    assert_eq!(
        rows[2],
        [
            "web-ingress",
            "default",
            "app=web",
            "Ingress",
            "1",
            "rules",
            "0",
            "rules"
        ]
    );
    let docs: Value =
        serde_json::from_str(&stdout_ok(&policy(&topo, &["list", "--json"]))).unwrap();
    assert_eq!(docs.as_array().map(Vec::len), Some(2));
    assert_eq!(docs[1], web_ingress());

    // A malformed document put into etcd by hand is listed as invalid.
    topo.etcd().put(&key("broken"), r#"{"name": "other"}"#);
    let list = stdout_ok(&policy(&topo, &["list"]));
    let broken = list.lines().find(|l| l.starts_with("broken")).expect(&list);
    assert!(
        broken.contains("invalid (ignored)") && broken.contains("\"other\""),
        "{broken}"
    );
    topo.etcd().del(&key("broken"));

    let out = stdout_ok(&policy(&topo, &["delete", "web-ingress"]));
    assert_eq!(
        out.trim(),
        format!("deleted policy web-ingress at {}", key("web-ingress"))
    );
    assert_eq!(topo.etcd().get(&key("web-ingress")), None);
    assert_eq!(stored(&topo), [key("db-egress")]);
    assert_refused(
        &policy(&topo, &["delete", "web-ingress"]),
        "no policy named web-ingress",
    );
    assert_refused(&policy(&topo, &["delete", "Bad_Name"]), "Bad_Name");
    assert_eq!(stored(&topo), [key("db-egress")]);
}

#[test]
fn malformed_policies_are_refused_and_nothing_written() {
    require_root();
    let topo = Topology::builder().hosts(1).build();
    let dir = tempfile::tempdir().unwrap();
    let with = |path: &str, value: Value| {
        let mut doc = web_ingress();
        *doc.pointer_mut(path).unwrap_or_else(|| panic!("{path}")) = value;
        doc.to_string()
    };
    let cases = [
        (
            with("/ingress/0/ports/0/port", json!(0)),
            "ingress[0].ports[0].port: port 0",
        ),
        (
            with("/ingress/0/ports/0/protocol", json!("GRE")),
            "unknown protocol \"GRE\"",
        ),
        (
            with("/ingress/0/ports/0/endPort", json!(80)),
            "endPort 80 is below port 8080",
        ),
        (
            with("/ingress/0/from/2/except/0", json!("198.51.100.0/24")),
            "except 198.51.100.0/24 is not inside cidr 203.0.113.0/24",
        ),
        (with("/name", json!("Web_Ingress")), "name \"Web_Ingress\""),
        (
            with("/selector", json!({"app": "-web"})),
            "label \"app\" value \"-web\"",
        ),
        (
            with("/types/0", json!("Sideways")),
            "unknown direction \"Sideways\"",
        ),
        (
            r#"{"name": "x", "egress": [{"from": [{"selector": {}}]}]}"#.to_string(),
            "egress[0]: an egress rule names its peers in \"to\"",
        ),
        (
            String::from("{\"name\": \"x\", \"ingress\": ["),
            "not valid JSON",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let file = write_file(&dir, &format!("bad{i}.json"), text);
        let out = policy(&topo, &["apply", &file]);
        assert_refused(&out, needle);
        assert_refused(&out, &file);
        assert!(
            stored(&topo).is_empty(),
            "case {i} wrote {:?}",
            stored(&topo)
        );
    }
    let out = policy(&topo, &["apply", "/nonexistent/policy.json"]);
    assert_refused(&out, "/nonexistent/policy.json");
}

#[test]
fn unreachable_etcd_is_a_clear_error() {
    require_root();
    let topo = Topology::builder().hosts(1).etcd(false).build();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(&dir, "web.json", &web_ingress().to_string());
    // Nobody listens there on the underlay.
    let endpoint = "http://198.18.0.250:2379";
    assert_refused(
        &policy_at(topo.host(0), endpoint, &["apply", &file]),
        "etcd at http://198.18.0.250:2379",
    );
    assert_refused(
        &policy_at(topo.host(0), endpoint, &["list"]),
        "etcd at http://198.18.0.250:2379",
    );
    assert_refused(
        &policy_at(topo.host(0), endpoint, &["delete", "web-ingress"]),
        "etcd at http://198.18.0.250:2379",
    );
    // Validation comes first: a malformed policy is refused without etcd.
    let bad = write_file(&dir, "bad.json", r#"{"name": ""}"#);
    assert_refused(
        &policy_at(topo.host(0), endpoint, &["apply", &bad]),
        "name: must not be empty",
    );
}
