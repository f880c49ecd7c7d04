//! Subnet leases as plain data: key formatting, the value flannel writes,
//! and the allocation policy. No I/O here, so all of it is unit-tested.

use std::{collections::HashSet, fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::control::config::NetworkConfig;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LeaseError {
    #[error("subnet key {0:?} is not of the form a.b.c.d-len")]
    Key(String),
    #[error("subnet key {0:?} has host bits set")]
    HostBits(String),
    #[error("lease value is not valid JSON: {0}")]
    Json(String),
    #[error("backend type {0:?} is not this network's {1:?}")]
    Backend(String, String),
    #[error("vxlan lease without BackendData.VtepMAC")]
    NoVtep,
    #[error("VtepMAC {0:?} is not a MAC address")]
    Mac(String),
}

/// `10.244.1.0/24` ↔ `10.244.1.0-24`, the key suffix flannel uses.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, LeaseError> {
    let bad = || LeaseError::Key(key.to_string());
    let (addr, len) = key.split_once('-').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Net::new(addr, len).map_err(|_| bad())?;
    if net.network() != addr {
        return Err(LeaseError::HostBits(key.to_string()));
    }
    Ok(net)
}

/// An Ethernet address, written as `0e:6e:c6:12:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A stable, locally administered unicast VTEP MAC derived from the
    /// host's underlay address: there is no VXLAN device to take one from.
    pub fn vtep_for(ip: Ipv4Addr) -> Mac {
        let [a, b, c, d] = ip.octets();
        Mac([0x0e, 0x6e, a, b, c, d])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let bad = || LeaseError::Mac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

/// The lease value, exactly as flannel's vxlan backend writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// Absent (or null) for host-gw.
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<VxlanData>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

impl LeaseValue {
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep: Mac) -> Self {
        LeaseValue {
            public_ip,
            backend_type: crate::control::config::VXLAN.into(),
            backend_data: Some(VxlanData {
                vni,
                vtep_mac: vtep.to_string(),
            }),
        }
    }

    pub fn host_gw(public_ip: Ipv4Addr) -> Self {
        LeaseValue {
            public_ip,
            backend_type: crate::control::config::HOST_GW.into(),
            backend_data: None,
        }
    }

    /// This host's lease for the network's backend.
    pub fn for_backend(cfg: &NetworkConfig, public_ip: Ipv4Addr, vtep: Mac) -> Self {
        if cfg.backend.kind == crate::control::config::HOST_GW {
            Self::host_gw(public_ip)
        } else {
            Self::vxlan(public_ip, cfg.backend.vni, vtep)
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease serialises")
    }

    /// Parses a value from etcd, with its VTEP MAC for vxlan leases.
    pub fn parse(json: &[u8]) -> Result<(Self, Option<Mac>), LeaseError> {
        let value: LeaseValue =
            serde_json::from_slice(json).map_err(|e| LeaseError::Json(e.to_string()))?;
        let mac = match (&value.backend_type[..], &value.backend_data) {
            (crate::control::config::VXLAN, Some(data)) => Some(data.vtep_mac.parse()?),
            (crate::control::config::VXLAN, None) => return Err(LeaseError::NoVtep),
            _ => None,
        };
        Ok((value, mac))
    }

    /// Checks the lease is of the network's backend.
    pub fn expect_backend(&self, kind: &str) -> Result<(), LeaseError> {
        if self.backend_type != kind {
            return Err(LeaseError::Backend(
                self.backend_type.clone(),
                kind.to_string(),
            ));
        }
        Ok(())
    }
}

/// What a host knows when it asks for a subnet.
pub struct Claim<'a> {
    pub public_ip: Ipv4Addr,
    /// Subnet recorded in the run directory by a previous run.
    pub recorded: Option<Ipv4Net>,
    /// Leases in etcd: subnet, and the holder's public IP when it parses.
    pub existing: &'a [(Ipv4Net, Option<Ipv4Addr>)],
}

/// What to try, in order of preference.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// A lease of ours is still in etcd: take it over.
    Reclaim(Ipv4Net),
    /// Create this subnet's lease (only if nobody holds it).
    Create(Ipv4Net),
    Exhausted,
}

/// Allocation policy at start-up, the order README.md describes: the
/// subnet recorded by a previous run (taken back if its lease is ours,
/// created if free), else a lease in etcd that carries our public IP (a run
/// directory that was lost), else a random free one.
pub fn choose(cfg: &NetworkConfig, claim: &Claim<'_>, rng: &mut impl rand::Rng) -> Choice {
    let ours =
        |s: &Ipv4Net, ip: &Option<Ipv4Addr>| *ip == Some(claim.public_ip) && cfg.is_leasable(s);
    let taken: HashSet<Ipv4Net> = claim.existing.iter().map(|(s, _)| *s).collect();
    if let Some(recorded) = claim.recorded.filter(|r| cfg.is_leasable(r)) {
        // The subnet our containers are numbered in comes first.
        if claim
            .existing
            .iter()
            .any(|(s, ip)| *s == recorded && ours(s, ip))
        {
            return Choice::Reclaim(recorded);
        }
        if !taken.contains(&recorded) {
            return Choice::Create(recorded);
        }
    }
    if let Some((subnet, _)) = claim.existing.iter().find(|(s, ip)| ours(s, ip)) {
        return Choice::Reclaim(*subnet);
    }
    random_free(cfg, &taken, rng).map_or(Choice::Exhausted, Choice::Create)
}

/// A uniformly placed probe, then the next free subnet after it: no list of
/// every subnet is built, however large the network.
fn random_free(
    cfg: &NetworkConfig,
    taken: &HashSet<Ipv4Net>,
    rng: &mut impl rand::Rng,
) -> Option<Ipv4Net> {
    let total = cfg.leasable_count();
    let used = taken.iter().filter(|s| cfg.is_leasable(s)).count();
    if total == 0 || used as u64 >= total as u64 {
        return None;
    }
    let start = rng.random_range(0..total) as u64;
    (0..total as u64)
        .filter_map(|k| cfg.nth_leasable(((start + k) % total as u64) as u32))
        .find(|s| !taken.contains(s))
}

/// The gateway address of a host subnet: its first host address.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.3.0"}"#,
        )
        .unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn keys() {
        assert_eq!(subnet_key(net("10.244.1.0/24")), "10.244.1.0-24");
        assert_eq!(
            parse_subnet_key("10.244.1.0-24").unwrap(),
            net("10.244.1.0/24")
        );
        for bad in [
            "10.244.1.0",
            "10.244.1.0-33",
            "x-24",
            "10.244.1.0-",
            "-24",
            "10.244.1.0-24-1",
        ] {
            assert!(
                matches!(parse_subnet_key(bad), Err(LeaseError::Key(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_subnet_key("10.244.1.7-24"),
            Err(LeaseError::HostBits(_))
        ));
    }

    #[test]
    fn macs() {
        let mac: Mac = "0e:6e:c6:12:00:01".parse().unwrap();
        assert_eq!(mac.to_string(), "0e:6e:c6:12:00:01");
        assert_eq!(Mac::vtep_for("198.18.0.1".parse().unwrap()), mac);
        for bad in [
            "",
            "0e:6e:c6:12:00",
            "0e:6e:c6:12:00:01:02",
            "zz:6e:c6:12:00:01",
            "01:00:5e:00:00:01",
            "e:6e:c6:12:00:01",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn value_matches_flannel() {
        let v = LeaseValue::vxlan(
            "198.18.0.1".parse().unwrap(),
            1,
            Mac([0x0e, 0x6e, 198, 18, 0, 1]),
        );
        assert_eq!(
            v.to_json(),
            r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:6e:c6:12:00:01"}}"#
        );
        // flannel adds fields we do not need; they are ignored.
        let flannel = br#"{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"a6:1b:2c:3d:4e:5f"}}"#;
        let (value, mac) = LeaseValue::parse(flannel).unwrap();
        assert_eq!(value.public_ip, "198.18.0.9".parse::<Ipv4Addr>().unwrap());
        assert_eq!(mac.unwrap().to_string(), "a6:1b:2c:3d:4e:5f");
        // host-gw leases carry no BackendData.
        let hostgw = LeaseValue::host_gw("198.18.0.3".parse().unwrap());
        assert_eq!(
            hostgw.to_json(),
            r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw"}"#
        );
        let (parsed, mac) = LeaseValue::parse(
            br#"{"PublicIP":"198.18.0.3","BackendType":"host-gw","BackendData":null}"#,
        )
        .unwrap();
        assert_eq!((parsed, mac), (hostgw, None));
        assert!(matches!(
            LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#),
            Err(LeaseError::NoVtep)
        ));
        assert!(LeaseValue::parse(b"{}").is_err());
        let (udp, _) = LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"udp","BackendData":{"VtepMAC":"a6:1b:2c:3d:4e:5f"}}"#).unwrap();
        assert!(udp.expect_backend("vxlan").is_err());
        assert!(LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VtepMAC":"bogus"}}"#).is_err());
    }

    #[test]
    fn policy_prefers_record_then_own_lease_then_random() {
        let cfg = cfg();
        let me: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let other: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut pick = |existing: &[(Ipv4Net, Option<Ipv4Addr>)], recorded: Option<&str>| {
            let claim = Claim {
                public_ip: me,
                recorded: recorded.map(net),
                existing,
            };
            choose(&cfg, &claim, &mut rng)
        };

        // No record (a lost run directory): our lease in etcd.
        let existing = [
            (net("10.244.2.0/24"), Some(me)),
            (net("10.244.1.0/24"), Some(other)),
        ];
        assert_eq!(pick(&existing, None), Choice::Reclaim(net("10.244.2.0/24")));

        // A lease claiming our IP does not beat the subnet we recorded.
        let existing = [
            (net("10.244.1.0/24"), Some(me)),
            (net("10.244.3.0/24"), Some(me)),
        ];
        assert_eq!(
            pick(&existing, Some("10.244.3.0/24")),
            Choice::Reclaim(net("10.244.3.0/24"))
        );

        // The recorded subnet is free: created again, even if a lease
        // elsewhere claims our IP (an impostor, or a stale run directory).
        let existing = [
            (net("10.244.1.0/24"), Some(other)),
            (net("10.244.2.0/24"), Some(me)),
        ];
        assert_eq!(
            pick(&existing, Some("10.244.3.0/24")),
            Choice::Create(net("10.244.3.0/24"))
        );
        let existing = [(net("10.244.1.0/24"), Some(other))];
        assert_eq!(
            pick(&existing, Some("10.244.3.0/24")),
            Choice::Create(net("10.244.3.0/24"))
        );

        // The recorded subnet was taken meanwhile: a free one instead.
        let existing = [
            (net("10.244.3.0/24"), Some(other)),
            (net("10.244.1.0/24"), None),
        ];
        assert_eq!(
            pick(&existing, Some("10.244.3.0/24")),
            Choice::Create(net("10.244.2.0/24"))
        );

        let existing = [
            (net("10.244.1.0/24"), Some(other)),
            (net("10.244.2.0/24"), None),
            (net("10.244.3.0/24"), Some(other)),
        ];
        assert_eq!(pick(&existing, None), Choice::Exhausted);
    }

    #[test]
    fn random_choice_spreads() {
        let cfg = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let claim = Claim {
            public_ip: "198.18.0.1".parse().unwrap(),
            recorded: None,
            existing: &[],
        };
        let mut rng = StdRng::seed_from_u64(1);
        let picks: HashSet<_> = (0..20)
            .map(|_| match choose(&cfg, &claim, &mut rng) {
                Choice::Create(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(picks.len() > 10);
    }

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(
            gateway(net("10.244.7.0/24")),
            "10.244.7.1".parse::<Ipv4Addr>().unwrap()
        );
    }
}
