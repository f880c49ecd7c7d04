//! Acquiring and holding this host's subnet lease in etcd.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::config::NetworkConfig,
    control::lease::{Choice, Claim, LeaseValue, Mac, choose, parse_subnet_key, subnet_key},
    control::registry::Registry,
    state::{EtcdHealth, NodeState},
};

/// Attempts before giving up when other hosts keep winning the same subnet.
const MAX_RACES: usize = 16;

/// The lease this host holds.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub subnet: Ipv4Net,
    pub lease_id: i64,
}

pub struct Identity {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub ttl_secs: i64,
}

/// Takes a subnet: our own existing lease, else the recorded one if free,
/// else a random free one; each in a transaction so no two hosts share one.
pub async fn acquire(
    registry: &mut Registry,
    cfg: &NetworkConfig,
    me: &Identity,
    recorded: Option<Ipv4Net>,
) -> Result<Held> {
    let value = LeaseValue::for_backend(cfg, me.public_ip, me.vtep_mac).to_json();
    for _ in 0..MAX_RACES {
        let (leases, _) = registry.list_subnets().await?;
        let existing: Vec<(Ipv4Net, Option<Ipv4Addr>, i64)> = leases
            .iter()
            .filter_map(|l| {
                let subnet = parse_subnet_key(&l.key).ok()?;
                let ip = LeaseValue::parse(&l.value).ok().map(|(v, _)| v.public_ip);
                Some((subnet, ip, l.mod_revision))
            })
            .collect();
        let pairs: Vec<(Ipv4Net, Option<Ipv4Addr>)> =
            existing.iter().map(|(s, ip, _)| (*s, *ip)).collect();
        let claim = Claim {
            public_ip: me.public_ip,
            recorded,
            existing: &pairs,
        };
        let choice = choose(cfg, &claim, &mut rand::rng());
        let lease_id = registry.grant(me.ttl_secs).await?;
        let won = match choice {
            Choice::Reclaim(subnet) => {
                let rev = existing
                    .iter()
                    .find(|(s, ..)| *s == subnet)
                    .map(|e| e.2)
                    .unwrap_or(0);
                registry
                    .reclaim_subnet(&subnet_key(subnet), &value, lease_id, rev)
                    .await?
                    .then_some(subnet)
            }
            Choice::Create(subnet) => registry
                .create_subnet(&subnet_key(subnet), &value, lease_id)
                .await?
                .then_some(subnet),
            Choice::Exhausted => {
                let _ = registry.revoke(lease_id).await;
                bail!(
                    "no free subnet left in {} (/{} subnets between SubnetMin and SubnetMax are all leased)",
                    cfg.network,
                    cfg.subnet_len
                );
            }
        };
        match won {
            Some(subnet) => {
                info!(%subnet, lease = lease_id, ttl = me.ttl_secs, "subnet lease acquired");
                return Ok(Held { subnet, lease_id });
            }
            None => {
                let _ = registry.revoke(lease_id).await;
                info!(?choice, "another host won the subnet; retrying");
            }
        }
    }
    bail!("could not acquire a subnet: lost {MAX_RACES} races in a row")
}

/// Keeps the lease alive, renewing at a third of the TTL. If etcd lost the
/// lease, takes the same subnet back; if another host holds it by then,
/// fails loudly rather than share it.
pub async fn hold(
    mut registry: Registry,
    cfg: NetworkConfig,
    me: Identity,
    mut held: Held,
    state: watch::Sender<NodeState>,
) -> Result<()> {
    let interval = Duration::from_secs((me.ttl_secs as u64 / 3).max(1));
    loop {
        match renew_until_lost(&mut registry, held, interval, &state).await {
            Ok(()) => {
                warn!(subnet = %held.subnet, "lease expired in etcd; taking the subnet back");
                held = reacquire(&mut registry, &cfg, &me, held).await?;
                state.send_modify(|s| s.lease_id = held.lease_id);
            }
            // etcd answers, but our lease expired while we could not reach
            // it: take the subnet back like any lost lease.
            Err(e) if lease_not_found(&e) => {
                warn!(subnet = %held.subnet, "lease expired while etcd was unreachable; taking the subnet back");
                held = reacquire(&mut registry, &cfg, &me, held).await?;
                state.send_modify(|s| {
                    s.lease_id = held.lease_id;
                    s.etcd = EtcdHealth::reachable();
                });
            }
            Err(e) => {
                state.send_modify(|s| s.etcd.unreachable(&format!("{e:#}")));
                warn!("lease renewal failed: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes the same subnet again after losing its lease; fails if another
/// host holds it now, rather than share it.
async fn reacquire(
    registry: &mut Registry,
    cfg: &NetworkConfig,
    me: &Identity,
    held: Held,
) -> Result<Held> {
    let again = acquire(registry, cfg, me, Some(held.subnet)).await?;
    if again.subnet != held.subnet {
        let _ = registry.revoke(again.lease_id).await;
        bail!(
            "lease for {} was lost and the subnet is now held by another host",
            held.subnet
        );
    }
    Ok(again)
}

fn lease_not_found(e: &anyhow::Error) -> bool {
    format!("{e:?}").contains("lease not found")
}

/// Renews until etcd reports the lease gone (`Ok`) or the connection fails.
async fn renew_until_lost(
    registry: &mut Registry,
    held: Held,
    interval: Duration,
    state: &watch::Sender<NodeState>,
) -> Result<()> {
    let (mut keeper, mut stream) = registry.keep_alive(held.lease_id).await?;
    loop {
        keeper.keep_alive().await.context("sending keep-alive")?;
        // A silently lost connection must not outlast the lease: give up
        // on a reply after one renewal interval and reconnect.
        let resp = tokio::time::timeout(interval, stream.message())
            .await
            .context("no keep-alive reply within the renewal interval")?
            .context("keep-alive reply")?
            .context("keep-alive stream closed")?;
        if resp.ttl() <= 0 {
            return Ok(());
        }
        state.send_modify(|s| {
            s.etcd = EtcdHealth::reachable();
            s.renewed(resp.ttl());
        });
        tokio::time::sleep(interval).await;
    }
}
