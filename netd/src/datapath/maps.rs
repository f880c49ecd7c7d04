//! Typed access to the pinned maps.

use std::{collections::BTreeMap, net::Ipv4Addr, os::fd::AsFd as _};

use anyhow::{Context as _, Result};
use aya::maps::{
    Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use netd_common::{Counter, Endpoint, NodeConfig, Peer, names};

use super::{
    PinDir,
    batch::{self, BatchError},
};

/// `SUBNETS`' key of a subnet: its prefix length and network address.
fn subnet_key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

pub struct Maps {
    subnets: LpmTrie<MapData, [u8; 4], Peer>,
    peers: HashMap<MapData, [u8; 4], u32>,
    endpoints: HashMap<MapData, [u8; 4], Endpoint>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, u64>,
}

fn open(pin: &PinDir, name: &str) -> Result<Map> {
    let path = pin.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}: is `netd run` up?", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Maps {
    pub fn open(pin: &PinDir) -> Result<Self> {
        Ok(Maps {
            subnets: open(pin, names::SUBNETS)?.try_into()?,
            peers: open(pin, names::PEERS)?.try_into()?,
            endpoints: open(pin, names::ENDPOINTS)?.try_into()?,
            config: open(pin, names::CONFIG)?.try_into()?,
            stats: open(pin, names::STATS)?.try_into()?,
        })
    }

    pub fn set_config(&mut self, config: &NodeConfig) -> Result<()> {
        Ok(self.config.set(0, config, 0)?)
    }

    pub fn config(&self) -> Result<NodeConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Remote subnets currently programmed.
    pub fn subnets(&self) -> Result<BTreeMap<Ipv4Net, Peer>> {
        let mut out = BTreeMap::new();
        for entry in self.subnets.iter() {
            let (key, peer) = entry?;
            let subnet = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)?;
            out.insert(subnet, peer);
        }
        Ok(out)
    }

    /// Underlay addresses accepted as VXLAN sources.
    pub fn peer_ips(&self) -> Result<Vec<Ipv4Addr>> {
        let mut out = Vec::new();
        for key in self.peers.keys() {
            out.push(Ipv4Addr::from(key?));
        }
        out.sort();
        Ok(out)
    }

    pub fn insert_subnet(&mut self, subnet: Ipv4Net, peer: &Peer) -> Result<()> {
        let key = subnet_key(subnet);
        Ok(self.subnets.insert(&key, peer, 0)?)
    }

    /// Many subnets in as few bpf(2) calls as the kernel allows: one per
    /// [`batch::CHUNK`], or one per entry where batches are unsupported.
    pub fn insert_subnets(&mut self, entries: &[(Ipv4Net, Peer)]) -> Result<()> {
        let keys: Vec<Key<[u8; 4]>> = entries.iter().map(|(s, _)| subnet_key(*s)).collect();
        let values: Vec<Peer> = entries.iter().map(|(_, p)| *p).collect();
        match batch::update(self.subnets.map().fd().as_fd(), &keys, &values) {
            Err(BatchError::Unsupported) => {
                for (subnet, peer) in entries {
                    self.insert_subnet(*subnet, peer)?;
                }
                Ok(())
            }
            other => Ok(other.context("writing SUBNETS")?),
        }
    }

    pub fn remove_subnet(&mut self, subnet: Ipv4Net) -> Result<()> {
        let key = subnet_key(subnet);
        Ok(self.subnets.remove(&key)?)
    }

    pub fn insert_peer_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        Ok(self.peers.insert(ip.octets(), 1, 0)?)
    }

    /// Many peers at once, as [`Maps::insert_subnets`] writes subnets.
    pub fn insert_peer_ips(&mut self, ips: &[Ipv4Addr]) -> Result<()> {
        let keys: Vec<[u8; 4]> = ips.iter().map(|ip| ip.octets()).collect();
        let values = vec![1u32; keys.len()];
        match batch::update(self.peers.map().fd().as_fd(), &keys, &values) {
            Err(BatchError::Unsupported) => {
                for ip in ips {
                    self.insert_peer_ip(*ip)?;
                }
                Ok(())
            }
            other => Ok(other.context("writing PEERS")?),
        }
    }

    pub fn remove_peer_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        Ok(self.peers.remove(&ip.octets())?)
    }

    pub fn insert_endpoint(&mut self, ip: Ipv4Addr, endpoint: &Endpoint) -> Result<()> {
        Ok(self.endpoints.insert(ip.octets(), endpoint, 0)?)
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        Ok(self.endpoints.remove(&ip.octets())?)
    }

    pub fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, Endpoint>> {
        let mut out = BTreeMap::new();
        for entry in self.endpoints.iter() {
            let (ip, endpoint) = entry?;
            out.insert(Ipv4Addr::from(ip), endpoint);
        }
        Ok(out)
    }

    /// Counters summed over CPUs, by label.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let values = self.stats.get(&(*counter as u32), 0)?;
            out.insert(counter.label(), values.iter().sum());
        }
        Ok(out)
    }
}
