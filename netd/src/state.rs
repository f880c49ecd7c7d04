//! What a running daemon publishes in its run directory for `netd status`,
//! `netd attach` and other tools: `state.json` and flannel-style `subnet.env`.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::datapath::Underlay;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdHealth {
    pub reachable: bool,
    /// Unix time of the last change between reachable and unreachable.
    pub since: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl EtcdHealth {
    pub fn reachable() -> Self {
        EtcdHealth {
            reachable: true,
            since: now(),
            last_error: None,
        }
    }

    /// Marks etcd unreachable, keeping the time it first became so.
    pub fn unreachable(&mut self, error: &str) {
        if self.reachable || self.since == 0 {
            self.since = now();
        }
        self.reachable = false;
        self.last_error = Some(error.to_string());
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    pub pid: u32,
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub public_ip: Option<Ipv4Addr>,
    pub vtep_mac: String,
    pub lease_id: i64,
    pub lease_ttl: i64,
    /// Unix time at which etcd drops the lease unless renewed.
    pub lease_expires_at: u64,
    /// Unix time since which the lease is lost and being taken back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_lost_since: Option<u64>,
    pub etcd: EtcdHealth,
    pub underlay: Option<Underlay>,
    /// Attachments found missing in the kernel and put back since start.
    #[serde(default)]
    pub repairs: u64,
}

impl NodeState {
    pub fn renewed(&mut self, ttl: i64) {
        self.lease_ttl = ttl;
        self.lease_expires_at = now() + ttl.max(0) as u64;
    }

    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("state.json")
    }

    pub fn read(run_dir: &Path) -> Option<NodeState> {
        serde_json::from_slice(&fs::read(Self::path(run_dir)).ok()?).ok()
    }

    /// Written to a temporary file and renamed, so readers never see half.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_atomic(&Self::path(run_dir), &serde_json::to_vec_pretty(self)?)
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// `subnet.env`, with flannel's meaning: NETD_SUBNET is the gateway address
/// with the subnet's length (as FLANNEL_SUBNET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("subnet.env")
    }

    pub fn render(&self) -> String {
        // The gateway, the subnet's first host address, stands in for the
        // subnet as flannel writes it.
        let gw = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "NETD_NETWORK={}\nNETD_SUBNET={}/{}\nNETD_MTU={}\nNETD_IPMASQ={}\n",
            self.network,
            gw,
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    pub fn parse(text: &str) -> Result<Self> {
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .with_context(|| format!("{name} missing"))
        };
        Ok(SubnetEnv {
            network: get("NETD_NETWORK")?.parse()?,
            subnet: get("NETD_SUBNET")?.parse::<Ipv4Net>()?.trunc(),
            mtu: get("NETD_MTU")?.parse()?,
            ipmasq: get("NETD_IPMASQ")?.parse()?,
        })
    }

    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = Self::path(run_dir);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: is `netd run` up with this --run-dir?",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_atomic(&Self::path(run_dir), self.render().as_bytes())
    }
}

/// The policy sync's record of what it applied (`control::policy_sync`).
pub const POLICY_SUMMARY: &str = "policy.json";

/// Removes what the daemon published here (`state.json`, `subnet.env`,
/// `policy.json` and a temporary file a write may have left); what is
/// absent is fine.
pub fn remove_published(run_dir: &Path) -> Vec<anyhow::Error> {
    let files = [
        NodeState::path(run_dir),
        SubnetEnv::path(run_dir),
        run_dir.join(POLICY_SUMMARY),
    ];
    let tmps = files.clone().map(|f| f.with_extension("tmp"));
    files
        .iter()
        .chain(&tmps)
        .filter_map(|path| match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Some(anyhow::Error::new(e).context(format!("removing {}", path.display())))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_round_trip() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: false,
        };
        let text = env.render();
        assert_eq!(
            text,
            "NETD_NETWORK=10.244.0.0/16\nNETD_SUBNET=10.244.3.1/24\nNETD_MTU=1450\nNETD_IPMASQ=false\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        assert!(SubnetEnv::parse("NETD_NETWORK=10.244.0.0/16\n").is_err());
    }

    #[test]
    fn etcd_outage_keeps_first_time() {
        let mut health = EtcdHealth::reachable();
        health.since = 5;
        health.unreachable("down");
        let first = health.since;
        assert!(first >= 5 && !health.reachable);
        health.since = 7;
        health.unreachable("still down");
        assert_eq!(health.since, 7);
    }
}
