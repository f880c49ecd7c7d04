//! The cluster network configuration stored at `<prefix>/config`, with
//! flannel's field names so existing tooling and flannel hosts read it too.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub const DEFAULT_SUBNET_LEN: u8 = 24;
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_PORT: u16 = 8472;
/// Bytes VXLAN adds in front of a container's packet on the underlay.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error(
        "SubnetLen {subnet_len} must be longer than the network's /{network_len} and at most 30"
    )]
    SubnetLen { subnet_len: u8, network_len: u8 },
    #[error("{name} {addr} is not a /{len} subnet inside {network}")]
    Bound {
        name: &'static str,
        addr: Ipv4Addr,
        len: u8,
        network: Ipv4Net,
    },
    #[error("SubnetMin {min} is above SubnetMax {max}")]
    EmptyRange { min: Ipv4Addr, max: Ipv4Addr },
    #[error("backend type {0:?} is not supported (supported: \"vxlan\", \"host-gw\")")]
    Backend(String),
    #[error("VNI {0} does not fit in 24 bits")]
    Vni(u32),
    #[error("Port 0 is not a valid VXLAN port")]
    Port,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    #[serde(default = "default_subnet_len")]
    pub subnet_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_min: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_max: Option<Ipv4Addr>,
    #[serde(default)]
    pub backend: Backend,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    #[serde(rename = "Type", default = "default_backend")]
    pub kind: String,
    #[serde(rename = "VNI", default = "default_vni")]
    pub vni: u32,
    #[serde(rename = "Port", default = "default_port")]
    pub port: u16,
    /// VXLAN only: route directly (no encapsulation) to peers on a
    /// directly connected subnet, as flannel's option of the same name.
    #[serde(
        rename = "DirectRouting",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub direct_routing: bool,
}

/// Backend type names, as flannel spells them.
pub const VXLAN: &str = "vxlan";
pub const HOST_GW: &str = "host-gw";

impl Default for Backend {
    fn default() -> Self {
        Backend {
            kind: default_backend(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            direct_routing: false,
        }
    }
}

fn default_subnet_len() -> u8 {
    DEFAULT_SUBNET_LEN
}
fn default_backend() -> String {
    "vxlan".into()
}
fn default_vni() -> u32 {
    DEFAULT_VNI
}
fn default_port() -> u16 {
    DEFAULT_PORT
}

impl NetworkConfig {
    pub fn new(network: Ipv4Net) -> Self {
        NetworkConfig {
            network: network.trunc(),
            subnet_len: DEFAULT_SUBNET_LEN,
            subnet_min: None,
            subnet_max: None,
            backend: Backend::default(),
        }
    }

    /// Parses and validates the JSON stored in etcd.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let cfg: NetworkConfig =
            serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let network_len = self.network.prefix_len();
        if self.subnet_len <= network_len || self.subnet_len > 30 {
            return Err(ConfigError::SubnetLen {
                subnet_len: self.subnet_len,
                network_len,
            });
        }
        if self.backend.kind != VXLAN && self.backend.kind != HOST_GW {
            return Err(ConfigError::Backend(self.backend.kind.clone()));
        }
        if self.backend.vni >= 1 << 24 {
            return Err(ConfigError::Vni(self.backend.vni));
        }
        if self.backend.port == 0 {
            return Err(ConfigError::Port);
        }
        let (min, max) = (self.first_subnet()?, self.last_subnet()?);
        if min > max {
            return Err(ConfigError::EmptyRange {
                min: min.network(),
                max: max.network(),
            });
        }
        Ok(())
    }

    /// Lowest leasable subnet: `SubnetMin`, or the network's second subnet
    /// (the first one is skipped, as flannel does).
    pub fn first_subnet(&self) -> Result<Ipv4Net, ConfigError> {
        match self.subnet_min {
            Some(addr) => self.bound("SubnetMin", addr),
            None => Ok(self.nth_subnet(1)),
        }
    }

    /// Highest leasable subnet: `SubnetMax`, or the network's last subnet.
    pub fn last_subnet(&self) -> Result<Ipv4Net, ConfigError> {
        match self.subnet_max {
            Some(addr) => self.bound("SubnetMax", addr),
            None => Ok(self.nth_subnet(self.subnet_count() - 1)),
        }
    }

    fn bound(&self, name: &'static str, addr: Ipv4Addr) -> Result<Ipv4Net, ConfigError> {
        let subnet = Ipv4Net::new(addr, self.subnet_len).expect("length checked");
        if subnet.network() != addr || !self.network.contains(&subnet) {
            return Err(ConfigError::Bound {
                name,
                addr,
                len: self.subnet_len,
                network: self.network,
            });
        }
        Ok(subnet)
    }

    fn subnet_count(&self) -> u32 {
        1u32 << (self.subnet_len - self.network.prefix_len())
    }

    fn nth_subnet(&self, n: u32) -> Ipv4Net {
        let base = u32::from(self.network.network());
        let addr = base + (n << (32 - self.subnet_len));
        Ipv4Net::new(Ipv4Addr::from(addr), self.subnet_len).expect("length checked")
    }

    /// How many subnets hosts may lease.
    pub fn leasable_count(&self) -> u32 {
        let step = 32 - self.subnet_len;
        match (self.first_subnet(), self.last_subnet()) {
            (Ok(first), Ok(last)) => {
                ((u32::from(last.network()) - u32::from(first.network())) >> step) + 1
            }
            _ => 0,
        }
    }

    /// The `n`th leasable subnet, counting from `SubnetMin`.
    pub fn nth_leasable(&self, n: u32) -> Option<Ipv4Net> {
        let first = u32::from(self.first_subnet().ok()?.network());
        let addr = first.checked_add(n.checked_shl(32 - self.subnet_len as u32)?)?;
        let subnet = Ipv4Net::new(Ipv4Addr::from(addr), self.subnet_len).ok()?;
        self.is_leasable(&subnet).then_some(subnet)
    }

    /// Whether `subnet` is one this network hands out.
    pub fn is_leasable(&self, subnet: &Ipv4Net) -> bool {
        let (Ok(first), Ok(last)) = (self.first_subnet(), self.last_subnet()) else {
            return false;
        };
        subnet.prefix_len() == self.subnet_len
            && self.network.contains(subnet)
            && subnet.network() >= first.network()
            && subnet.network() <= last.network()
    }
}

/// Options of `netd run` that may come from a TOML file (`--config`);
/// flags and `NETD_*` variables override them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub decap: Option<String>,
    pub lease_ttl: Option<u64>,
    pub ip_masq: Option<bool>,
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_json_with_defaults() {
        let cfg =
            NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
                .unwrap();
        assert_eq!(cfg.subnet_len, 24);
        assert_eq!(cfg.backend.vni, 1);
        assert_eq!(cfg.backend.port, 8472);
        assert_eq!(cfg.first_subnet().unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(cfg.last_subnet().unwrap().to_string(), "10.244.255.0/24");
        assert_eq!(cfg.leasable_count(), 255);
    }

    #[test]
    fn flannel_json_full() {
        let cfg = NetworkConfig::parse(
            br#"{"Network":"10.5.0.0/16","SubnetLen":26,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0",
                 "Backend":{"Type":"vxlan","VNI":42,"Port":4789}}"#,
        )
        .unwrap();
        assert_eq!(cfg.backend.vni, 42);
        assert_eq!(cfg.backend.port, 4789);
        assert_eq!(cfg.leasable_count(), 5);
        assert!(cfg.is_leasable(&"10.5.1.64/26".parse().unwrap()));
        assert!(!cfg.is_leasable(&"10.5.0.64/26".parse().unwrap()));
        assert!(!cfg.is_leasable(&"10.5.1.0/24".parse().unwrap()));
    }

    #[test]
    fn direct_routing_and_host_gw() {
        let cfg = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        )
        .unwrap();
        assert!(cfg.backend.direct_routing);
        assert!(cfg.to_json().contains(r#""DirectRouting":true"#));
        let cfg =
            NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(cfg.backend.kind, HOST_GW);
        assert!(!cfg.to_json().contains("DirectRouting"));
    }

    #[test]
    fn round_trip() {
        let cfg = NetworkConfig::new("10.244.0.0/16".parse().unwrap());
        assert_eq!(NetworkConfig::parse(cfg.to_json().as_bytes()).unwrap(), cfg);
    }

    #[test]
    fn rejects_bad_values() {
        let bad: &[(&[u8], &str)] = &[
            (b"not json", "JSON"),
            (
                br#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
                "SubnetLen",
            ),
            (
                br#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
                "SubnetLen",
            ),
            (
                br#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
                "backend",
            ),
            (
                br#"{"Network":"10.244.0.0/16","Backend":{"VNI":16777216}}"#,
                "VNI",
            ),
            (
                br#"{"Network":"10.244.0.0/16","Backend":{"Port":0}}"#,
                "Port",
            ),
            (
                br#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.5"}"#,
                "SubnetMin",
            ),
            (
                br#"{"Network":"10.244.0.0/16","SubnetMax":"10.9.0.0"}"#,
                "SubnetMax",
            ),
            (
                br#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.2.0"}"#,
                "above",
            ),
        ];
        for (json, needle) in bad {
            let err = NetworkConfig::parse(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn file_config() {
        let cfg = FileConfig::parse(
            "etcd-endpoints = [\"http://198.18.0.254:2379\"]\niface = \"eth0\"\nlease-ttl = 30\n",
        )
        .unwrap();
        assert_eq!(cfg.iface.as_deref(), Some("eth0"));
        assert_eq!(cfg.lease_ttl, Some(30));
        assert!(FileConfig::parse("bogus = 1").is_err());
    }
}
