//! The host's own way into the overlay, Cilium's `cilium_host` in spirit: a
//! veth pair `netd.host` ⇄ `netd.net` in the host namespace. The host routes
//! the cluster network out of `netd.host` with its gateway address as
//! source (the /32 routes to local containers are more specific and still
//! win); the frames come in on `netd.net`, where `from_container` checks
//! and encapsulates them exactly like a container's, against an ENDPOINTS
//! entry for the gateway address bound to `netd.net` and `netd.host`'s MAC,
//! so no container can send from the host's address. Replies for the
//! gateway address arrive by VXLAN and the decap programs hand them to the
//! host stack.
//!
//! `netd.host` is NOARP: nothing answers ARP behind it, and the frames'
//! destination MAC is never looked at, since they are encapsulated.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netd_common::{Endpoint, names::FROM_CONTAINER};
use rtnetlink::LinkUnspec;
use tracing::info;

use crate::{
    datapath::{self, Maps, PinDir},
    netlink::{Link, Netlink},
};

/// The host's end: routes to the cluster network point here.
pub const HOST_IF: &str = "netd.host";
/// The overlay's end: `from_container` runs on its ingress.
pub const NET_IF: &str = "netd.net";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("host access: {0:#}")]
    Kernel(#[from] anyhow::Error),
}

/// What the host should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAccess {
    pub network: Ipv4Net,
    /// This host's own subnet: not routed to `netd.host`.
    pub subnet: Ipv4Net,
    /// This host's gateway address, the source of its overlay traffic.
    pub gateway: Ipv4Addr,
    /// The overlay's MTU (underlay minus VXLAN overhead).
    pub mtu: u32,
}

/// The cluster network less this host's own subnet, in the fewest
/// prefixes (one per bit between the two lengths). No route then overlaps
/// the host's subnet, which Docker's IPAM checks a pool against: a route
/// for the whole network would make it refuse the host's subnet as a pool.
fn remote_prefixes(network: Ipv4Net, own: Ipv4Net) -> Vec<Ipv4Net> {
    if !network.contains(&own) || own.prefix_len() <= network.prefix_len() {
        return vec![network];
    }
    let own_addr = u32::from(own.network());
    (network.prefix_len() + 1..=own.prefix_len())
        .filter_map(|len| {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let sibling = (own_addr & mask) ^ (1u32 << (32 - u32::from(len)));
            Ipv4Net::new(Ipv4Addr::from(sibling), len).ok()
        })
        .collect()
}

/// Makes the veth pair, its route, its filter and its ENDPOINTS entry what
/// `want` says; each step is a no-op when already in place.
pub async fn reconcile(
    nl: &Netlink,
    pin: &PinDir,
    maps: &mut Maps,
    want: &HostAccess,
) -> Result<(), Error> {
    let (host, net) = veth_pair(nl).await?;
    let msg = LinkUnspec::new_with_index(host.index)
        .up()
        .arp(false)
        .mtu(want.mtu)
        .build();
    nl.set_link(msg).await?;
    nl.set_up(net.index, Some(want.mtu)).await?;
    for prefix in remote_prefixes(want.network, want.subnet) {
        nl.replace_route_from(prefix, host.index, want.gateway)
            .await?;
    }
    datapath::attach_tc(pin, FROM_CONTAINER, NET_IF)?;
    let entry = Endpoint {
        ifindex: net.index,
        mac: host
            .mac
            .ok_or_else(|| anyhow::anyhow!("{HOST_IF} has no MAC"))?,
        host_mac: net
            .mac
            .ok_or_else(|| anyhow::anyhow!("{NET_IF} has no MAC"))?,
    };
    if maps.endpoints()?.get(&want.gateway) != Some(&entry) {
        maps.insert_endpoint(want.gateway, &entry)?;
        info!(gateway = %want.gateway, "host access entry programmed");
    }
    Ok(())
}

/// Both ends, created when either is missing.
async fn veth_pair(nl: &Netlink) -> anyhow::Result<(Link, Link)> {
    match (nl.link(HOST_IF).await?, nl.link(NET_IF).await?) {
        (Some(host), Some(net)) => return Ok((host, net)),
        (Some(one), None) | (None, Some(one)) => nl.delete_link(one.index).await?,
        (None, None) => {}
    }
    nl.create_veth(HOST_IF, NET_IF).await?;
    info!("created {HOST_IF}/{NET_IF}");
    Ok((
        nl.require_link(HOST_IF).await?,
        nl.require_link(NET_IF).await?,
    ))
}

/// Removes the pair (and with it the route and the filter) and the entry.
pub async fn remove(nl: &Netlink, pin: &PinDir, gateway: Option<Ipv4Addr>) -> Result<(), Error> {
    if let (Some(gw), Ok(mut maps)) = (gateway, Maps::open(pin)) {
        let _ = maps.remove_endpoint(gw);
    }
    if let Some(link) = nl.link(HOST_IF).await? {
        nl.delete_link(link.index).await?;
        info!("removed {HOST_IF}/{NET_IF}");
    }
    Ok(())
}

#[cfg(test)]
mod prefix_tests {
    use super::remote_prefixes;

    #[test]
    fn remote_prefixes_cover_the_network_but_the_own_subnet() {
        let network = "10.244.0.0/16".parse().unwrap();
        let own: ipnet::Ipv4Net = "10.244.178.0/24".parse().unwrap();
        let prefixes = remote_prefixes(network, own);
        assert_eq!(prefixes.len(), 8);
        let total: u64 = prefixes.iter().map(|p| 1u64 << (32 - p.prefix_len())).sum();
        assert_eq!(total, (1 << 16) - (1 << 8));
        for p in &prefixes {
            assert!(network.contains(p));
            assert!(!p.contains(&own) && !own.contains(p), "{p} overlaps {own}");
        }
        assert!(prefixes.contains(&"10.244.0.0/17".parse().unwrap()));
        assert!(prefixes.contains(&"10.244.179.0/24".parse().unwrap()));
    }
}
