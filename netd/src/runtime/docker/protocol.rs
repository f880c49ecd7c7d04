//! The libnetwork remote driver and remote IPAM protocols: JSON bodies of
//! HTTP POSTs, field names as Docker spells them. Fields Docker may leave
//! out default, unknown ones are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// The type of the address request Docker makes for a network's gateway.
pub const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// Where Docker puts `docker network create -o` options.
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Activate {
    pub implements: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ErrorReply {
    #[serde(rename = "Err")]
    pub err: String,
}

/// `{}`: the answer of calls that return nothing.
#[derive(Debug, Default, Serialize)]
pub struct Empty {}

// --- IpamDriver ---

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    pub requires_request_replay: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpaces {
    pub local_default_address_space: String,
    pub global_default_address_space: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPool {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    pub options: Option<BTreeMap<String, String>>,
    #[serde(rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Serialize)]
pub struct PoolReply {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressReply {
    /// CIDR notation.
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
}

// --- NetworkDriver ---

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkCapabilities {
    pub scope: &'static str,
    pub connectivity_scope: &'static str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    pub address_space: String,
    pub pool: String,
    pub gateway: String,
    pub aux_addresses: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Interface {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(rename = "AddressIPv6", skip_serializing_if = "String::is_empty")]
    pub address_ipv6: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface")]
    pub interface: Option<Interface>,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointReply {
    /// Empty when Docker supplied the interface, as the protocol requires.
    pub interface: Interface,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct OperInfo {
    pub value: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
    #[serde(rename = "Options")]
    pub options: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

/// `RouteType` 1: the destination is on the link, no next hop.
pub const ROUTE_CONNECTED: u8 = 1;

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StaticRoute {
    pub destination: String,
    pub route_type: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinReply {
    pub interface_name: InterfaceName,
    pub gateway: String,
    pub static_routes: Vec<StaticRoute>,
    pub disable_gateway_service: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_requests() {
        let req: CreateEndpoint = serde_json::from_str(
            r#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.244.3.2/32","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":[]}}"#,
        )
        .unwrap();
        assert_eq!(req.endpoint_id, "e1");
        assert_eq!(req.interface.unwrap().address, "10.244.3.2/32");
        let req: RequestPool = serde_json::from_str(
            r#"{"AddressSpace":"netd-local","Pool":"","SubPool":"","Options":null,"V6":false}"#,
        )
        .unwrap();
        assert!(!req.v6 && req.pool.is_empty());
        let req: RequestAddress = serde_json::from_str(
            r#"{"PoolID":"10.244.3.0/24","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        )
        .unwrap();
        assert_eq!(req.options.unwrap()[REQUEST_ADDRESS_TYPE], GATEWAY_REQUEST);
    }

    #[test]
    fn writes_docker_field_names() {
        let reply = JoinReply {
            interface_name: InterfaceName {
                src_name: "ndt1".into(),
                dst_prefix: "eth".into(),
            },
            gateway: "10.244.3.1".into(),
            static_routes: vec![StaticRoute {
                destination: "10.244.3.1/32".into(),
                route_type: ROUTE_CONNECTED,
                next_hop: None,
            }],
            disable_gateway_service: false,
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"InterfaceName":{"SrcName":"ndt1","DstPrefix":"eth"},"Gateway":"10.244.3.1","StaticRoutes":[{"Destination":"10.244.3.1/32","RouteType":1}],"DisableGatewayService":false}"#
        );
        let caps = IpamCapabilities {
            requires_mac_address: false,
            requires_request_replay: false,
        };
        assert_eq!(
            serde_json::to_string(&caps).unwrap(),
            r#"{"RequiresMACAddress":false,"RequiresRequestReplay":false}"#
        );
        let reply = CreateEndpointReply {
            interface: Interface::default(),
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"Interface":{}}"#
        );
    }
}
