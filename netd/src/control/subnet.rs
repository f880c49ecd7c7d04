//! Acquiring and holding this host's subnet lease in etcd.
//!
//! A starting host may take any free subnet ([`acquire`]). A running host
//! that lost its etcd lease only ever takes the *same* subnet back
//! ([`hold`]): its containers are numbered in it. etcd being away, slow or
//! between leaders is retried with backoff while the kernel keeps
//! forwarding; the one fatal case is the subnet now belonging to another
//! host.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::backoff::Backoff,
    control::config::NetworkConfig,
    control::lease::{Choice, Claim, LeaseValue, Mac, choose, parse_subnet_key, subnet_key},
    control::registry::{Failure, RawLease, Registry, RegistryError},
    state::{EtcdHealth, NodeState, now},
};

/// Attempts before giving up when other hosts keep winning the same subnet.
const MAX_RACES: usize = 16;
/// Retry delays while etcd is away during re-acquisition.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    /// The one case that must end the data path: never share a subnet.
    #[error("lease for {subnet} was lost and the subnet is now held by another host ({by})")]
    Taken { subnet: Ipv4Net, by: String },
    #[error(
        "no free subnet left in {network} (/{len} subnets between SubnetMin and SubnetMax are all leased)"
    )]
    Exhausted { network: Ipv4Net, len: u8 },
    #[error("could not acquire a subnet: lost {MAX_RACES} races in a row")]
    Races,
    /// etcd away, slow or between leaders: worth retrying.
    #[error("etcd unavailable")]
    Transient(#[source] RegistryError),
    /// etcd refused us (credentials, certificates): retrying cannot help.
    #[error("etcd refused the request")]
    Refused(#[source] RegistryError),
}

impl From<RegistryError> for SubnetError {
    fn from(e: RegistryError) -> Self {
        if e.failure().is_transient() {
            SubnetError::Transient(e)
        } else {
            SubnetError::Refused(e)
        }
    }
}

type Result<T> = std::result::Result<T, SubnetError>;

/// The registry operations leases need: a trait so that the policy can be
/// tested against an etcd that fails on cue.
pub trait Store {
    /// Every lease and the revision the list was read at.
    async fn list_subnets(&mut self) -> std::result::Result<Listing, RegistryError>;
    async fn grant(&mut self, ttl_secs: i64) -> std::result::Result<i64, RegistryError>;
    async fn revoke(&mut self, lease: i64) -> std::result::Result<(), RegistryError>;
    async fn create_subnet(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> std::result::Result<bool, RegistryError>;
    async fn reclaim_subnet(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> std::result::Result<bool, RegistryError>;
    /// Renews `lease` once; its remaining TTL, 0 if etcd no longer has it.
    async fn renew_once(&mut self, lease: i64) -> std::result::Result<i64, RegistryError>;
}

impl Store for Registry {
    async fn list_subnets(&mut self) -> std::result::Result<Listing, RegistryError> {
        let (leases, revision) = Registry::list_subnets(self).await?;
        Ok(Listing { leases, revision })
    }
    async fn grant(&mut self, ttl_secs: i64) -> std::result::Result<i64, RegistryError> {
        Registry::grant(self, ttl_secs).await
    }
    async fn revoke(&mut self, lease: i64) -> std::result::Result<(), RegistryError> {
        Registry::revoke(self, lease).await
    }
    async fn create_subnet(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> std::result::Result<bool, RegistryError> {
        Registry::create_subnet(self, key, value, lease).await
    }
    async fn reclaim_subnet(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> std::result::Result<bool, RegistryError> {
        Registry::reclaim_subnet(self, key, value, lease, mod_revision).await
    }
    async fn renew_once(&mut self, lease: i64) -> std::result::Result<i64, RegistryError> {
        Registry::renew_once(self, lease).await
    }
}

/// Every lease in etcd as one read saw it, and that read's revision: the
/// list an acquisition read is what the first sync starts from, so a
/// start lists the leases once, not once per step.
#[derive(Debug, Default)]
pub struct Listing {
    pub leases: Vec<RawLease>,
    pub revision: i64,
}

/// The lease this host holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub subnet: Ipv4Net,
    pub lease_id: i64,
}

pub struct Identity {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub ttl_secs: i64,
}

/// Takes a subnet at start-up, as [`choose`] orders them; each in a
/// transaction so no two hosts share one. Returns the listing of the
/// winning attempt too.
///
/// The first attempt decides from `first` (a listing read while the data
/// path loaded) when given, instead of listing again. A listing grown stale
/// is safe: the create and the reclaim are transactions that fail on a
/// changed key, and the next attempt lists afresh.
pub async fn acquire(
    store: &mut impl Store,
    cfg: &NetworkConfig,
    me: &Identity,
    recorded: Option<Ipv4Net>,
    mut first: Option<Listing>,
) -> Result<(Held, Listing)> {
    let value = LeaseValue::for_backend(cfg, me.public_ip, me.vtep_mac).to_json();
    for _ in 0..MAX_RACES {
        let listing = match first.take() {
            Some(listing) => listing,
            None => store.list_subnets().await?,
        };
        let (choice, rev) = decide(cfg, me, recorded, &listing.leases);
        let subnet = match choice {
            Choice::Reclaim(subnet) | Choice::Create(subnet) => subnet,
            Choice::Exhausted => {
                return Err(SubnetError::Exhausted {
                    network: cfg.network,
                    len: cfg.subnet_len,
                });
            }
        };
        let lease_id = store.grant(me.ttl_secs).await?;
        let key = subnet_key(subnet);
        let won = match choice {
            Choice::Reclaim(_) => store.reclaim_subnet(&key, &value, lease_id, rev).await,
            _ => store.create_subnet(&key, &value, lease_id).await,
        };
        if won.as_ref().is_ok_and(|won| *won) {
            info!(%subnet, lease = lease_id, ttl = me.ttl_secs, "subnet lease acquired");
            return Ok((Held { subnet, lease_id }, listing));
        }
        let _ = store.revoke(lease_id).await;
        won?;
        info!(?choice, "another host won the subnet; retrying");
    }
    Err(SubnetError::Races)
}

/// What to try and, for a reclaim, the revision the lease was read at.
/// The recorded subnet is decided from its own leases alone (what
/// [`choose`] looks at first): only when it cannot be had is every value
/// decoded, to find a lease carrying our IP or a free subnet.
fn decide(
    cfg: &NetworkConfig,
    me: &Identity,
    recorded: Option<Ipv4Net>,
    leases: &[RawLease],
) -> (Choice, i64) {
    let ip_text = me.public_ip.to_string();
    let choose_from = |leases: &mut dyn Iterator<Item = (Ipv4Net, &RawLease)>| {
        let existing: Vec<(Ipv4Net, Option<Ipv4Addr>, i64)> = leases
            .map(|(subnet, l)| (subnet, holder_if_ours(l, &ip_text), l.mod_revision))
            .collect();
        let pairs: Vec<(Ipv4Net, Option<Ipv4Addr>)> =
            existing.iter().map(|(s, ip, _)| (*s, *ip)).collect();
        let claim = Claim {
            public_ip: me.public_ip,
            recorded,
            existing: &pairs,
        };
        let choice = choose(cfg, &claim, &mut rand::rng());
        let rev = match choice {
            Choice::Reclaim(subnet) => existing
                .iter()
                .find(|(s, ..)| *s == subnet)
                .map_or(0, |e| e.2),
            _ => 0,
        };
        (choice, rev)
    };
    if let Some(recorded) = recorded {
        let mut own = leases
            .iter()
            .filter_map(keyed)
            .filter(|(s, _)| *s == recorded);
        let (choice, rev) = choose_from(&mut own);
        if matches!(choice, Choice::Reclaim(s) | Choice::Create(s) if s == recorded) {
            return (choice, rev);
        }
    }
    choose_from(&mut leases.iter().filter_map(keyed))
}

/// A lease with the subnet its key names; `None` for a malformed key.
fn keyed(lease: &RawLease) -> Option<(Ipv4Net, &RawLease)> {
    Some((parse_subnet_key(&lease.key).ok()?, lease))
}

/// [`holder`] where the value may name `ip` (its dotted text), `None`
/// where it cannot: [`choose`] only asks whether a lease is ours, and a
/// fresh start would otherwise decode every value once here and once more
/// for the kernel. A JSON string spells the address out unless escaped.
fn holder_if_ours(lease: &RawLease, ip: &str) -> Option<Ipv4Addr> {
    let v = &lease.value;
    let may_name = v.contains(&b'\\') || v.windows(ip.len()).any(|w| w == ip.as_bytes());
    if may_name { holder(lease) } else { None }
}

/// The public IP a lease names, if its value parses.
fn holder(lease: &RawLease) -> Option<Ipv4Addr> {
    LeaseValue::parse(&lease.value)
        .ok()
        .map(|(v, _)| v.public_ip)
}

/// One attempt at holding `held.subnet` again, never another subnet: our
/// key still bound to our live lease is kept as it is; our key on another
/// (or a dead) lease is rebound to a new one; an absent key is created.
/// `None`: a race was lost, look again.
pub async fn retake(
    store: &mut impl Store,
    cfg: &NetworkConfig,
    me: &Identity,
    held: Held,
) -> Result<Option<Held>> {
    let key = subnet_key(held.subnet);
    let leases = store.list_subnets().await?.leases;
    let ours = match leases.into_iter().find(|l| l.key == key) {
        Some(lease) => match holder(&lease) {
            Some(ip) if ip == me.public_ip => Some(lease),
            other => {
                return Err(SubnetError::Taken {
                    subnet: held.subnet,
                    by: other.map_or_else(|| "unreadable lease value".into(), |ip| ip.to_string()),
                });
            }
        },
        None => None,
    };
    if let Some(lease) = &ours
        && lease.lease == held.lease_id
        // etcd extends leases when it restarts: ours may still be alive.
        && store.renew_once(held.lease_id).await? > 0
    {
        return Ok(Some(held));
    }
    let value = LeaseValue::for_backend(cfg, me.public_ip, me.vtep_mac).to_json();
    let lease_id = store.grant(me.ttl_secs).await?;
    let won = match &ours {
        Some(lease) => {
            store
                .reclaim_subnet(&key, &value, lease_id, lease.mod_revision)
                .await
        }
        None => store.create_subnet(&key, &value, lease_id).await,
    };
    if won.as_ref().is_ok_and(|won| *won) {
        return Ok(Some(Held {
            subnet: held.subnet,
            lease_id,
        }));
    }
    let _ = store.revoke(lease_id).await;
    won?;
    Ok(None)
}

/// Takes the same subnet back, retrying with backoff while etcd is away;
/// fails only if another host holds the subnet now (or etcd refuses us).
pub async fn reacquire(
    store: &mut impl Store,
    cfg: &NetworkConfig,
    me: &Identity,
    held: Held,
    state: &watch::Sender<NodeState>,
) -> Result<Held> {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CAP);
    let mut races = 0;
    state.send_modify(|s| {
        s.lease_lost_since.get_or_insert(now());
    });
    loop {
        match retake(store, cfg, me, held).await {
            Ok(Some(again)) => {
                info!(subnet = %again.subnet, lease = again.lease_id, "subnet taken back");
                state.send_modify(|s| {
                    s.lease_id = again.lease_id;
                    s.lease_lost_since = None;
                    s.etcd = EtcdHealth::reachable();
                    s.renewed(me.ttl_secs);
                });
                return Ok(again);
            }
            Ok(None) => {
                races += 1;
                if races >= MAX_RACES {
                    return Err(SubnetError::Races);
                }
            }
            Err(SubnetError::Transient(e)) => {
                let delay = backoff.next_delay();
                let error = format!("{:#}", anyhow::Error::from(e));
                warn!(subnet = %held.subnet, "taking the subnet back: {error}; retrying in {delay:?}");
                state.send_modify(|s| s.etcd.unreachable(&error));
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How renewing ended.
#[derive(Debug)]
enum Interrupted {
    /// etcd no longer has the lease.
    Lost,
    Etcd(RegistryError),
    /// No keep-alive reply within the renewal interval.
    NoReply,
}

/// Keeps the lease alive, renewing at a third of the TTL. A lost lease is
/// taken back (the same subnet); an unreachable etcd is retried with
/// backoff, and past the TTL without a renewal the lease is treated as
/// lost. Returns only with an error that must end the data path.
pub async fn hold(
    mut registry: Registry,
    cfg: NetworkConfig,
    me: Identity,
    mut held: Held,
    state: watch::Sender<NodeState>,
) -> SubnetError {
    let interval = Duration::from_secs((me.ttl_secs as u64 / 3).max(1));
    let ttl = Duration::from_secs(me.ttl_secs as u64);
    let mut backoff = Backoff::new(RETRY_FIRST, interval.min(RETRY_CAP));
    let mut renewed = Instant::now();
    loop {
        let before = renewed;
        let interrupted =
            renew_until_lost(&mut registry, held, interval, &state, &mut renewed).await;
        if renewed != before {
            backoff.reset();
        }
        let lost = match interrupted {
            Interrupted::Lost => {
                warn!(subnet = %held.subnet, "lease expired in etcd; taking the subnet back");
                true
            }
            Interrupted::Etcd(e) if e.failure() == Failure::LeaseNotFound => {
                warn!(subnet = %held.subnet, "lease expired while etcd was unreachable; taking the subnet back");
                true
            }
            Interrupted::Etcd(e) if !e.is_permanent() => {
                note_unreachable(&state, &format!("{:#}", anyhow::Error::from(e)));
                renewed.elapsed() >= ttl
            }
            Interrupted::Etcd(e) => return SubnetError::Refused(e),
            Interrupted::NoReply => {
                note_unreachable(
                    &state,
                    "keep-alive stream ended or no reply within the renewal interval",
                );
                renewed.elapsed() >= ttl
            }
        };
        if lost {
            match reacquire(&mut registry, &cfg, &me, held, &state).await {
                Ok(again) => {
                    held = again;
                    renewed = Instant::now();
                    backoff.reset();
                }
                Err(e) => return e,
            }
        } else {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

fn note_unreachable(state: &watch::Sender<NodeState>, error: &str) {
    warn!("lease renewal failed: {error}");
    state.send_modify(|s| s.etcd.unreachable(error));
}

/// Renews until etcd reports the lease gone or the connection fails.
async fn renew_until_lost(
    registry: &mut Registry,
    held: Held,
    interval: Duration,
    state: &watch::Sender<NodeState>,
    renewed: &mut Instant,
) -> Interrupted {
    let (mut keeper, mut stream) = match registry.keep_alive(held.lease_id).await {
        Ok(pair) => pair,
        Err(e) => return Interrupted::Etcd(e),
    };
    loop {
        if let Err(e) = keeper.keep_alive().await {
            return Interrupted::Etcd(registry.err(e));
        }
        // A silently lost connection must not outlast the lease: give up
        // on a reply after one renewal interval and reconnect.
        let resp = match tokio::time::timeout(interval, stream.message()).await {
            Err(_) | Ok(Ok(None)) => return Interrupted::NoReply,
            Ok(Err(e)) => return Interrupted::Etcd(registry.err(e)),
            Ok(Ok(Some(resp))) => resp,
        };
        if resp.ttl() <= 0 {
            return Interrupted::Lost;
        }
        *renewed = Instant::now();
        state.send_modify(|s| {
            s.etcd = EtcdHealth::reachable();
            s.renewed(resp.ttl());
        });
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn only_values_that_may_name_our_ip_are_decoded() {
        let lease = |value: &str| RawLease {
            key: "10.244.2.0-24".into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
            lease: 0,
        };
        let ours: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let plain = lease(r#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#);
        let escaped = lease(r#"{"PublicIP":"198.18.0.\u0031","BackendType":"host-gw"}"#);
        let longer = lease(r#"{"PublicIP":"198.18.0.10","BackendType":"host-gw"}"#);
        let other = lease(r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#);
        let ip = ours.to_string();
        assert_eq!(holder_if_ours(&plain, &ip), Some(ours));
        assert_eq!(holder_if_ours(&escaped, &ip), Some(ours));
        assert_eq!(
            holder_if_ours(&longer, &ip),
            Some("198.18.0.10".parse().unwrap())
        );
        assert_eq!(holder_if_ours(&other, &ip), None);
    }

    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    /// An etcd in memory that fails the operations numbered in `fail`
    /// (counted from 1) as a stopped etcd does.
    #[derive(Default)]
    struct FakeEtcd {
        keys: BTreeMap<String, RawLease>,
        alive: BTreeSet<i64>,
        next_lease: i64,
        revision: i64,
        ops: usize,
        fail: BTreeSet<usize>,
        refuse: bool,
        created: Vec<String>,
    }

    fn unavailable() -> RegistryError {
        let source = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcd stopped"));
        RegistryError::Etcd {
            endpoints: "http://198.18.0.254:2379".into(),
            failure: Failure::of(&source),
            hint: "",
            source,
        }
    }

    impl FakeEtcd {
        fn op(&mut self) -> std::result::Result<(), RegistryError> {
            self.ops += 1;
            if self.refuse {
                let source = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
                    "etcdserver: permission denied",
                ));
                return Err(RegistryError::Etcd {
                    endpoints: String::new(),
                    failure: Failure::of(&source),
                    hint: "",
                    source,
                });
            }
            if self.fail.contains(&self.ops) {
                return Err(unavailable());
            }
            Ok(())
        }

        fn put(&mut self, key: &str, ip: Ipv4Addr, lease: i64) {
            self.revision += 1;
            let value = LeaseValue::vxlan(ip, 1, Mac::vtep_for(ip)).to_json();
            self.keys.insert(
                key.to_string(),
                RawLease {
                    key: key.to_string(),
                    value: value.into_bytes(),
                    mod_revision: self.revision,
                    lease,
                },
            );
        }

        fn bound(&self, key: &str) -> Option<(Ipv4Addr, i64)> {
            let lease = self.keys.get(key)?;
            Some((holder(lease)?, lease.lease))
        }
    }

    impl Store for FakeEtcd {
        async fn list_subnets(&mut self) -> std::result::Result<Listing, RegistryError> {
            self.op()?;
            Ok(Listing {
                leases: self.keys.values().cloned().collect(),
                revision: self.revision,
            })
        }
        async fn grant(&mut self, _ttl: i64) -> std::result::Result<i64, RegistryError> {
            self.op()?;
            self.next_lease += 1;
            self.alive.insert(self.next_lease);
            Ok(self.next_lease)
        }
        async fn revoke(&mut self, lease: i64) -> std::result::Result<(), RegistryError> {
            self.op()?;
            self.alive.remove(&lease);
            self.keys.retain(|_, l| l.lease != lease);
            Ok(())
        }
        async fn create_subnet(
            &mut self,
            key: &str,
            value: &str,
            lease: i64,
        ) -> std::result::Result<bool, RegistryError> {
            self.op()?;
            if self.keys.contains_key(key) {
                return Ok(false);
            }
            let ip = LeaseValue::parse(value.as_bytes()).unwrap().0.public_ip;
            self.put(key, ip, lease);
            self.created.push(key.to_string());
            Ok(true)
        }
        async fn reclaim_subnet(
            &mut self,
            key: &str,
            value: &str,
            lease: i64,
            mod_revision: i64,
        ) -> std::result::Result<bool, RegistryError> {
            self.op()?;
            if self.keys.get(key).map(|l| l.mod_revision) != Some(mod_revision) {
                return Ok(false);
            }
            let ip = LeaseValue::parse(value.as_bytes()).unwrap().0.public_ip;
            self.put(key, ip, lease);
            Ok(true)
        }
        async fn renew_once(&mut self, lease: i64) -> std::result::Result<i64, RegistryError> {
            self.op()?;
            Ok(if self.alive.contains(&lease) { 60 } else { 0 })
        }
    }

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    fn me() -> Identity {
        Identity {
            public_ip: ME,
            vtep_mac: Mac::vtep_for(ME),
            ttl_secs: 60,
        }
    }

    fn held() -> Held {
        Held {
            subnet: "10.244.7.0/24".parse().unwrap(),
            lease_id: 1000,
        }
    }

    const KEY: &str = "10.244.7.0-24";

    fn state() -> watch::Sender<NodeState> {
        watch::channel(NodeState::default()).0
    }

    /// etcd stopped at each step of re-acquiring an expired lease, for
    /// one call or for several: the same subnet comes back, on a live
    /// lease, and no other subnet key is ever created.
    #[tokio::test]
    async fn reacquire_survives_etcd_stopping_at_any_step() {
        for first in 1..=4 {
            for len in [1, 3] {
                let mut etcd = FakeEtcd {
                    next_lease: 2000,
                    fail: (first..first + len).collect(),
                    ..Default::default()
                };
                // Another host's lease, so the list is not empty.
                etcd.put("10.244.9.0-24", OTHER, 1);
                let tx = state();
                let again = reacquire(&mut etcd, &cfg(), &me(), held(), &tx)
                    .await
                    .unwrap_or_else(|e| panic!("failing ops {first}..+{len}: {e}"));
                let what = format!("failing ops {first}..+{len}");
                assert_eq!(again.subnet, held().subnet, "{what}");
                assert_eq!(etcd.created, [KEY], "{what}");
                assert_eq!(etcd.bound(KEY), Some((ME, again.lease_id)), "{what}");
                assert!(etcd.alive.contains(&again.lease_id), "{what}");
                let published = tx.borrow();
                assert_eq!(published.lease_id, again.lease_id, "{what}");
                assert_eq!(published.lease_lost_since, None, "{what}");
                assert!(published.etcd.reachable, "{what}");
            }
        }
    }

    /// etcd restarted with our lease extended: kept as it is.
    #[tokio::test]
    async fn a_live_lease_is_kept() {
        let mut etcd = FakeEtcd::default();
        etcd.alive.insert(held().lease_id);
        etcd.put(KEY, ME, held().lease_id);
        let again = retake(&mut etcd, &cfg(), &me(), held()).await.unwrap();
        assert_eq!(again, Some(held()));
        assert_eq!(etcd.next_lease, 0, "granted a lease it did not need");
    }

    /// Our key on a dead lease is rebound to a new one, not recreated.
    #[tokio::test]
    async fn our_key_on_a_dead_lease_is_rebound() {
        let mut etcd = FakeEtcd {
            next_lease: 2000,
            ..Default::default()
        };
        etcd.put(KEY, ME, 77);
        let again = retake(&mut etcd, &cfg(), &me(), held())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.lease_id, 2001);
        assert_eq!(etcd.bound(KEY), Some((ME, 2001)));
        assert!(etcd.created.is_empty());
    }

    /// The subnet held by another host: the one fatal case; nothing written.
    #[tokio::test]
    async fn a_subnet_taken_by_another_host_is_fatal() {
        let mut etcd = FakeEtcd::default();
        etcd.put(KEY, OTHER, 5);
        let err = reacquire(&mut etcd, &cfg(), &me(), held(), &state())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SubnetError::Taken { by, .. } if by == "198.18.0.2"),
            "{err}"
        );
        assert!(err.to_string().contains("now held by another host"));
        assert_eq!(etcd.bound(KEY), Some((OTHER, 5)));
        assert_eq!(etcd.next_lease, 0);
    }

    /// etcd refusing us is not retried for ever.
    #[tokio::test]
    async fn refusal_is_not_retried() {
        let mut etcd = FakeEtcd {
            refuse: true,
            ..Default::default()
        };
        let err = reacquire(&mut etcd, &cfg(), &me(), held(), &state())
            .await
            .unwrap_err();
        assert!(matches!(err, SubnetError::Refused(_)), "{err}");
        assert_eq!(etcd.ops, 1);
    }

    /// The recorded subnet is decided from its own lease: free, or ours,
    /// it is taken whatever the other values hold; held by another host,
    /// the full policy runs (here: our lease elsewhere is reclaimed).
    #[test]
    fn the_recorded_subnet_is_decided_from_its_own_lease() {
        let lease = |key: &str, value: &[u8], rev| RawLease {
            key: key.into(),
            value: value.to_vec(),
            mod_revision: rev,
            lease: 1,
        };
        let ours = LeaseValue::vxlan(ME, 1, Mac::vtep_for(ME)).to_json();
        let other = LeaseValue::vxlan(OTHER, 1, Mac::vtep_for(OTHER)).to_json();
        let recorded = Some(held().subnet);
        let mut leases = vec![lease("10.244.9.0-24", b"{not json", 3)];
        let (choice, _) = decide(&cfg(), &me(), recorded, &leases);
        assert_eq!(choice, Choice::Create(held().subnet));
        leases.push(lease(KEY, ours.as_bytes(), 7));
        assert_eq!(
            decide(&cfg(), &me(), recorded, &leases),
            (Choice::Reclaim(held().subnet), 7)
        );
        leases[1] = lease(KEY, other.as_bytes(), 8);
        leases.push(lease("10.244.5.0-24", ours.as_bytes(), 9));
        assert_eq!(
            decide(&cfg(), &me(), recorded, &leases),
            (Choice::Reclaim("10.244.5.0/24".parse().unwrap()), 9)
        );
    }

    /// At start-up a transient failure is reported as such (the caller
    /// retries), and a failed write leaves no granted lease behind.
    #[tokio::test]
    async fn acquire_reports_transient_failures() {
        let mut etcd = FakeEtcd {
            fail: [3].into(),
            ..Default::default()
        };
        let err = acquire(&mut etcd, &cfg(), &me(), Some(held().subnet), None)
            .await
            .unwrap_err();
        assert!(matches!(err, SubnetError::Transient(_)), "{err}");
        assert!(etcd.alive.is_empty(), "granted lease left alive");
        let (got, _) = acquire(&mut etcd, &cfg(), &me(), Some(held().subnet), None)
            .await
            .unwrap();
        assert_eq!(got.subnet, held().subnet);
    }
}
