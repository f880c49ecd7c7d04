//! The CNI 1.1 contract as plain data: the environment, the network config
//! on stdin, the result and the error JSON, and the versions spoken. No I/O
//! here, so all of it is tested without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use serde_json::{Value, json};

pub const SUPPORTED: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// Error codes: 1-99 as the spec defines them, 100+ this plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const BAD_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// ADD of an attachment or interface name that exists already.
    pub const ALREADY_EXISTS: u32 = 100;
    /// CHECK found the kernel different from what ADD made.
    pub const CHECK_FAILED: u32 = 101;
    pub const INTERNAL: u32 = 999;
}

/// The spec's error: written to stdout as JSON with a failing exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if let Some(d) = &self.details {
            v["details"] = json!(d);
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` variables, checked for the command at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => {
                return Err(CniError::new(
                    code::BAD_ENVIRONMENT,
                    format!("unknown CNI_COMMAND {other:?}"),
                ));
            }
            None => {
                return Err(CniError::new(
                    code::BAD_ENVIRONMENT,
                    "CNI_COMMAND is not set",
                ));
            }
        };
        let required: &[&str] = match command {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Version | Command::Status | Command::Gc => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|n| var(n).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::BAD_ENVIRONMENT,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        }
        let container_id = var("CNI_CONTAINERID").unwrap_or_default();
        if !container_id.is_empty() && !valid_container_id(&container_id) {
            return Err(CniError::new(
                code::BAD_ENVIRONMENT,
                format!(
                    "CNI_CONTAINERID {container_id:?} must be alphanumeric, '_', '.' or '-', starting alphanumeric"
                ),
            ));
        }
        let ifname = var("CNI_IFNAME").unwrap_or_default();
        if !ifname.is_empty() && !crate::endpoint::valid_ifname(&ifname) {
            return Err(CniError::new(
                code::BAD_ENVIRONMENT,
                format!("CNI_IFNAME {ifname:?} must be 1 to 15 bytes without '/', ':' or spaces"),
            ));
        }
        Ok(Env {
            command,
            container_id,
            netns: var("CNI_NETNS"),
            ifname,
            args: parse_cni_args(&var("CNI_ARGS").unwrap_or_default())?,
        })
    }

    /// The endpoint id of this attachment: one per container and interface.
    pub fn endpoint_id(&self) -> String {
        attachment_id(&self.container_id, &self.ifname)
    }

    /// Labels the pod's identity gives: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`.
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        [
            ("K8S_POD_NAMESPACE", "io.kubernetes.pod.namespace"),
            ("K8S_POD_NAME", "io.kubernetes.pod.name"),
        ]
        .into_iter()
        .filter_map(|(arg, label)| Some((label.to_string(), self.args.get(arg)?.clone())))
        .collect()
    }
}

pub fn attachment_id(container_id: &str, ifname: &str) -> String {
    format!("cni/{container_id}/{ifname}")
}

fn valid_container_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `K=V;K=V`; unknown keys are kept (and ignored by the caller).
fn parse_cni_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    text.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CniError::new(
                        code::BAD_ENVIRONMENT,
                        format!("CNI_ARGS entry {kv:?} is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

/// The plugin's view of the network config; unknown keys are ignored, as
/// the spec asks, and `prevResult` is kept whole to pass on.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub run_dir: PathBuf,
    pub pin_path: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub prev_result: Option<Value>,
    /// GC: the ids of the attachments the runtime still knows.
    pub valid_attachments: Option<BTreeSet<String>>,
}

pub const DEFAULT_RUN_DIR: &str = "/run/netd";
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/netd";

/// The cniVersion of a config, for the error JSON, if it can be read.
pub fn version_of(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let version = v.get("cniVersion")?.as_str()?;
    SUPPORTED.contains(&version).then(|| version.to_string())
}

impl NetConf {
    pub fn parse(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "network config on stdin is not JSON")
                .with_details(e.to_string())
        })?;
        let Some(obj) = v.as_object() else {
            return Err(CniError::new(
                code::DECODE,
                "network config on stdin is not a JSON object",
            ));
        };
        let invalid = |msg: String| CniError::new(code::INVALID_CONFIG, msg);
        let string = |key: &str| -> Result<Option<String>, CniError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
            }
        };
        let cni_version =
            string("cniVersion")?.ok_or_else(|| invalid("cniVersion is missing".into()))?;
        if !SUPPORTED.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {cni_version} is not supported (supported: {})",
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if matches!(command, Command::Status | Command::Gc) && cni_version != "1.1.0" {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{command:?} needs cniVersion 1.1.0, the config has {cni_version}"),
            ));
        }
        let name = string("name")?.ok_or_else(|| invalid("name is missing".into()))?;
        if name.is_empty() {
            return Err(invalid("name is empty".into()));
        }
        let run_dir = string("runDir")?.unwrap_or_else(|| DEFAULT_RUN_DIR.into());
        let pin_path = string("pinPath")?.unwrap_or_else(|| DEFAULT_PIN_PATH.into());
        if !run_dir.starts_with('/') || !pin_path.starts_with('/') {
            return Err(invalid("runDir and pinPath must be absolute paths".into()));
        }
        let labels = labels(obj.get("args")).map_err(invalid)?;
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "prevResult must be an object, not {other}"
                )));
            }
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| {
                        let field = |k: &str| item.get(k).and_then(Value::as_str);
                        match (field("containerID"), field("ifname")) {
                            (Some(c), Some(i)) => Ok(attachment_id(c, i)),
                            _ => Err(invalid(format!(
                                "cni.dev/valid-attachments entry {item} needs containerID and ifname"
                            ))),
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(invalid(format!("cni.dev/valid-attachments must be an array, not {other}")));
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            run_dir: run_dir.into(),
            pin_path: pin_path.into(),
            labels,
            prev_result,
            valid_attachments,
        })
    }
}

/// Labels from `args.labels` (an object of strings) and from the CNI
/// conventions' `args.cni.labels` (`[{"key": K, "value": V}]`); a key given
/// twice with different values is refused.
fn labels(args: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut add = |k: &str, v: &str, at: &str| -> Result<(), String> {
        crate::endpoint::labels::check_label(k, v).map_err(|e| format!("{at}: {e}"))?;
        match out.insert(k.to_string(), v.to_string()) {
            Some(old) if old != v => Err(format!("label {k} is given as {old:?} and as {v:?}")),
            _ => Ok(()),
        }
    };
    match args.and_then(|a| a.get("labels")) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(format!("args.labels.{k} must be a string, not {v}"));
                };
                add(k, v, "args.labels")?;
            }
        }
        Some(other) => return Err(format!("args.labels must be an object, not {other}")),
    }
    match args
        .and_then(|a| a.get("cni"))
        .and_then(|c| c.get("labels"))
    {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let field = |k: &str| item.get(k).and_then(Value::as_str);
                let (Some(k), Some(v)) = (field("key"), field("value")) else {
                    return Err(format!(
                        "args.cni.labels entry {item} needs string key and value"
                    ));
                };
                add(k, v, "args.cni.labels")?;
            }
        }
        Some(other) => return Err(format!("args.cni.labels must be an array, not {other}")),
    }
    Ok(out)
}

/// What ADD made, for the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub host_ifname: String,
    pub host_mac: String,
    pub ifname: String,
    pub mac: String,
    pub sandbox: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// The ADD result in `version`, appended to `prev` (a chained plugin's
/// result before this one), whose entries are kept as they are.
pub fn add_result(version: &str, prev: Option<&Value>, added: &Added) -> Value {
    let mut result = prev.cloned().unwrap_or_else(|| json!({}));
    let list = |result: &mut Value, key: &str| -> Vec<Value> {
        result
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut interfaces = list(&mut result, "interfaces");
    let mut ips = list(&mut result, "ips");
    let mut routes = list(&mut result, "routes");
    let mut host = json!({ "name": added.host_ifname, "mac": added.host_mac });
    let mut container = json!({ "name": added.ifname, "mac": added.mac, "sandbox": added.sandbox });
    if version == "1.1.0" {
        host["mtu"] = json!(added.mtu + crate::control::config::VXLAN_OVERHEAD);
        container["mtu"] = json!(added.mtu);
    }
    interfaces.push(host);
    interfaces.push(container);
    let mut ip = json!({
        "address": format!("{}/32", added.ip),
        "gateway": added.gateway.to_string(),
        "interface": interfaces.len() - 1,
    });
    if version == "0.4.0" {
        ip["version"] = json!("4");
    }
    ips.push(ip);
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": added.gateway.to_string() }));
    result["cniVersion"] = json!(version);
    result["interfaces"] = Value::Array(interfaces);
    result["ips"] = Value::Array(ips);
    result["routes"] = Value::Array(routes);
    if result.get("dns").is_none() {
        result["dns"] = json!({});
    }
    result
}

/// The address `prev` gives the container interface `ifname`, if any.
pub fn prev_address(prev: &Value, ifname: &str) -> Option<Ipv4Addr> {
    let interfaces = prev.get("interfaces")?.as_array()?;
    prev.get("ips")?.as_array()?.iter().find_map(|ip| {
        let index = ip.get("interface")?.as_u64()? as usize;
        let iface = interfaces.get(index)?;
        if iface.get("name")?.as_str()? != ifname || iface.get("sandbox").is_none() {
            return None;
        }
        let address = ip.get("address")?.as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

pub fn version_result() -> Value {
    json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| vars.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn environment_is_checked_per_command() {
        let add = env(ADD).unwrap();
        assert_eq!(add.command, Command::Add);
        assert_eq!(add.endpoint_id(), "cni/abc-1/eth0");
        for drop in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            let vars: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != drop).collect();
            let err = env(&vars).unwrap_err();
            assert_eq!(err.code, code::BAD_ENVIRONMENT, "{drop}");
            assert!(err.msg.contains(drop), "{}", err.msg);
        }
        let del: Vec<_> = ADD
            .iter()
            .map(|&(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "DEL")
                } else {
                    (k, v)
                }
            })
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert!(env(&del).is_ok(), "DEL needs no namespace");
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert_eq!(env(&[]).unwrap_err().code, code::BAD_ENVIRONMENT);
        assert_eq!(
            env(&[("CNI_COMMAND", "PUT")]).unwrap_err().code,
            code::BAD_ENVIRONMENT
        );
        let mut bad = ADD.to_vec();
        bad[1] = ("CNI_CONTAINERID", "-x/../y");
        assert_eq!(env(&bad).unwrap_err().code, code::BAD_ENVIRONMENT);
        bad[1] = ("CNI_CONTAINERID", "abc");
        bad[3] = ("CNI_IFNAME", "a/b");
        assert_eq!(env(&bad).unwrap_err().code, code::BAD_ENVIRONMENT);
    }

    #[test]
    fn pod_labels_come_from_cni_args() {
        let mut vars = ADD.to_vec();
        vars.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1",
        ));
        let labels = env(&vars).unwrap().pod_labels();
        assert_eq!(labels["io.kubernetes.pod.namespace"], "shop");
        assert_eq!(labels["io.kubernetes.pod.name"], "cart-1");
        *vars.last_mut().unwrap() = ("CNI_ARGS", "novalue");
        assert_eq!(env(&vars).unwrap_err().code, code::BAD_ENVIRONMENT);
    }

    #[test]
    fn labels_come_from_args_and_the_conventions_args_cni() {
        let parse = |args: &str| {
            let text = format!(r#"{{"cniVersion":"1.0.0","name":"n","args":{args}}}"#);
            NetConf::parse(text.as_bytes(), Command::Add)
        };
        let conf = parse(
            r#"{"labels":{"app":"web"},"cni":{"labels":[{"key":"tier","value":"front"},{"key":"app","value":"web"}]}}"#,
        )
        .unwrap();
        let want = [("app", "web"), ("tier", "front")];
        let got: Vec<(&str, &str)> = conf
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, want);
        for bad in [
            r#"{"labels":{"app":"web"},"cni":{"labels":[{"key":"app","value":"db"}]}}"#,
            r#"{"cni":{"labels":{"app":"web"}}}"#,
            r#"{"cni":{"labels":[{"key":"app"}]}}"#,
            r#"{"labels":{"-app":"web"}}"#,
            r#"{"labels":{"app":"w b"}}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn config_errors_have_the_spec_codes() {
        let parse = |s: &str| NetConf::parse(s.as_bytes(), Command::Add);
        assert_eq!(parse("{").unwrap_err().code, code::DECODE);
        assert_eq!(parse("[]").unwrap_err().code, code::DECODE);
        assert_eq!(
            parse(r#"{"name":"n"}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"0.3.1","name":"n"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0"}"#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","runDir":5}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","args":{"labels":[1]}}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n"}"#, Command::Status)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        let conf = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"netd-cni","unknown":{"x":1},
                "runDir":"/run/n1","args":{"labels":{"app":"web"}}}"#,
        )
        .unwrap();
        assert_eq!(conf.run_dir, PathBuf::from("/run/n1"));
        assert_eq!(conf.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(conf.labels["app"], "web");
        let gc = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
            Command::Gc,
        )
        .unwrap();
        assert_eq!(
            gc.valid_attachments.unwrap(),
            BTreeSet::from(["cni/a/eth0".to_string()])
        );
    }

    fn added() -> Added {
        Added {
            host_ifname: "ndv1".into(),
            host_mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:02".into(),
            sandbox: "/run/netns/x".into(),
            ip: "10.244.3.2".parse().unwrap(),
            gateway: "10.244.3.1".parse().unwrap(),
            mtu: 1450,
        }
    }

    #[test]
    fn results_follow_the_requested_version() {
        let r = add_result("1.0.0", None, &added());
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(r["ips"][0]["address"], "10.244.3.2/32");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["gw"], "10.244.3.1");
        assert_eq!(
            add_result("0.4.0", None, &added())["ips"][0]["version"],
            "4"
        );
        assert_eq!(
            add_result("1.1.0", None, &added())["interfaces"][1]["mtu"],
            1450
        );
        assert_eq!(prev_address(&r, "eth0"), Some(added().ip));
        assert_eq!(prev_address(&r, "eth1"), None);
    }

    #[test]
    fn chained_results_keep_what_came_before() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "x0"}],
            "ips": [{"address": "192.0.2.5/24", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]},
            "custom": true,
        });
        let r = add_result("1.0.0", Some(&prev), &added());
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["ips"][0]["address"], "192.0.2.5/24");
        assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53");
        assert_eq!(r["custom"], true);
    }
}
