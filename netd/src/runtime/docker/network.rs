//! `/NetworkDriver.*`: a Docker network on netd is this host's share of the
//! overlay; each endpoint is a veth whose container end Docker moves into
//! the container at Join.

use std::{collections::BTreeMap, fs};

use axum::{body::Bytes, extract::State, response::Response};
use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::info;

use super::{
    Driver, Error, RUNTIME, Shared, parse,
    protocol::{
        CreateEndpoint, CreateEndpointReply, CreateNetwork, Empty, EndpointRef, GENERIC_OPTIONS,
        Interface, InterfaceName, Join, JoinReply, NetworkCapabilities, NetworkRef, OperInfo,
        ROUTE_CONNECTED, StaticRoute,
    },
    reply,
};
use crate::{endpoint::handoff, state::SubnetEnv, state::write_atomic};

/// `docker network create -o netd.network=NAME` names the network for
/// policy. Docker does not tell a remote driver the name it gave the
/// network, and each engine gives "the same" network its own id, so
/// without this option the network is `default`: a network created on
/// every host alike then reaches across hosts, as before networks existed.
pub const NETWORK_OPTION: &str = "netd.network";

/// `--driver-opt netd.label.KEY=VALUE` on `docker network connect` (or in
/// `docker run --network name=NET,driver-opt=...`) labels the endpoint for
/// policy: Docker hands endpoint driver options to CreateEndpoint as
/// top-level `Options`.
pub const LABEL_OPTION_PREFIX: &str = "netd.label.";

/// The endpoint's labels from its driver options; a label option that is
/// not a string is refused.
fn endpoint_labels(req: &CreateEndpoint) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (key, value) in req.options.iter().flatten() {
        let Some(label) = key.strip_prefix(LABEL_OPTION_PREFIX) else {
            continue;
        };
        let Value::String(value) = value else {
            return Err(Error::BadRequest(format!(
                "option {key} must be a string, not {value}"
            )));
        };
        out.insert(label.to_string(), value.clone());
    }
    Ok(out)
}

pub async fn capabilities() -> Response {
    reply(Ok(NetworkCapabilities {
        scope: "local",
        connectivity_scope: "local",
    }))
}

/// The name endpoints record as their network.
fn network_name(req: &CreateNetwork) -> String {
    let generic = req.options.as_ref().and_then(|o| o.get(GENERIC_OPTIONS));
    let option = |key: &str| {
        generic
            .and_then(|g| g.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    option(NETWORK_OPTION).unwrap_or_else(|| crate::policy::DEFAULT_NETWORK.to_string())
}

pub async fn create_network(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: CreateNetwork = parse(&body)?;
            let file = d.network_file(&req.network_id)?;
            if req.ipv6_data.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(Error::BadRequest(
                    "netd has no IPv6: leave --ipv6 out".into(),
                ));
            }
            let subnet = SubnetEnv::read(&d.run_dir)
                .map_err(crate::endpoint::Error::NotReady)?
                .subnet;
            let pools: Vec<_> = req.ipv4_data.iter().flatten().collect();
            if pools.len() != 1 || pools[0].pool.parse::<Ipv4Net>().ok() != Some(subnet) {
                return Err(Error::BadRequest(format!(
                    "a netd network takes this host's subnet {subnet} as its one pool: \
                     create it with --ipam-driver netd"
                )));
            }
            let name = network_name(&req);
            crate::endpoint::labels::check_network(&name)
                .map_err(|e| Error::BadRequest(format!("-o {NETWORK_OPTION}: {e}")))?;
            if let Some(dir) = file.parent() {
                fs::create_dir_all(dir).map_err(anyhow::Error::from)?;
            }
            write_atomic(&file, name.as_bytes())?;
            info!(id = req.network_id, name, %subnet, "Docker network created");
            Ok(Empty {})
        }
        .await,
    )
}

pub async fn delete_network(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: NetworkRef = parse(&body)?;
            let file = d.network_file(&req.network_id)?;
            match fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(anyhow::Error::from(e).into());
                }
                _ => {}
            }
            Ok(Empty {})
        }
        .await,
    )
}

fn known_network(d: &Driver, network_id: &str) -> Result<String, Error> {
    let file = d.network_file(network_id)?;
    fs::read_to_string(&file)
        .map_err(|_| Error::BadRequest(format!("network {network_id} is not a netd network")))
}

fn check_endpoint_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(Error::BadRequest(format!(
            "EndpointID {id:?} must be a non-empty alphanumeric id"
        )));
    }
    Ok(())
}

pub async fn create_endpoint(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: CreateEndpoint = parse(&body)?;
            check_endpoint_id(&req.endpoint_id)?;
            let name = known_network(&d, &req.network_id)?;
            let address = req
                .interface
                .as_ref()
                .map(|i| i.address.as_str())
                .filter(|a| !a.is_empty())
                .ok_or_else(|| {
                    Error::BadRequest(
                        "no address given: the network must use --ipam-driver netd".into(),
                    )
                })?;
            let ip = address
                .split('/')
                .next()
                .and_then(|ip| ip.parse().ok())
                .ok_or_else(|| Error::BadRequest(format!("{address:?} is not an IPv4 address")))?;
            let _serial = d.serial.lock().await;
            let labels = endpoint_labels(&req)?;
            handoff::bind(&d.run_dir, RUNTIME, ip, &req.endpoint_id, &name, &labels)?;
            Ok(CreateEndpointReply {
                interface: Interface::default(),
            })
        }
        .await,
    )
}

pub async fn endpoint_oper_info(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: EndpointRef = parse(&body)?;
            let mut value = BTreeMap::new();
            if let Some(rec) = handoff::find_endpoint(&d.run_dir, RUNTIME, &req.endpoint_id)? {
                value.insert("ip".into(), rec.ip.to_string());
                if !rec.host_ifname.is_empty() {
                    value.insert("host_ifname".into(), rec.host_ifname);
                }
            }
            Ok(OperInfo { value })
        }
        .await,
    )
}

pub async fn delete_endpoint(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: EndpointRef = parse(&body)?;
            let _serial = d.serial.lock().await;
            handoff::unbind(&d.pin, &d.run_dir, RUNTIME, &req.endpoint_id).await?;
            Ok(Empty {})
        }
        .await,
    )
}

pub async fn join(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: Join = parse(&body)?;
            check_endpoint_id(&req.endpoint_id)?;
            let _serial = d.serial.lock().await;
            let handoff = handoff::join(
                &d.pin,
                &d.run_dir,
                RUNTIME,
                &req.endpoint_id,
                &req.sandbox_key,
            )
            .await?;
            let gw = handoff.gateway;
            Ok(JoinReply {
                interface_name: InterfaceName {
                    src_name: handoff.ifname,
                    dst_prefix: "eth".into(),
                },
                gateway: gw.to_string(),
                // The container holds a /32: the gateway is on the link.
                static_routes: vec![StaticRoute {
                    destination: format!("{gw}/32"),
                    route_type: ROUTE_CONNECTED,
                    next_hop: None,
                }],
                disable_gateway_service: false,
            })
        }
        .await,
    )
}

pub async fn leave(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: EndpointRef = parse(&body)?;
            let _serial = d.serial.lock().await;
            handoff::leave(&d.pin, &d.run_dir, RUNTIME, &req.endpoint_id).await?;
            Ok(Empty {})
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_come_from_driver_options() {
        let req: CreateEndpoint = serde_json::from_str(
            r#"{"NetworkID":"n1","EndpointID":"e1","Options":{
                "com.docker.network.endpoint.exposedports":[],
                "netd.label.app":"web","netd.label.tier":"front"}}"#,
        )
        .unwrap();
        let labels = endpoint_labels(&req).unwrap();
        assert_eq!(
            labels,
            BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "front".to_string())
            ])
        );
        let bad: CreateEndpoint =
            serde_json::from_str(r#"{"Options":{"netd.label.app":1}}"#).unwrap();
        assert!(endpoint_labels(&bad).is_err());
        let none: CreateEndpoint = serde_json::from_str(r#"{"Options":null}"#).unwrap();
        assert!(endpoint_labels(&none).unwrap().is_empty());
    }
}
