//! `/IpamDriver.*`: the pool is this host's leased subnet, addresses come
//! from the host's one allocator (shared with `netd attach` and the CNI
//! plugin), the gateway is the host's gateway address.

use std::{collections::BTreeMap, net::Ipv4Addr};

use axum::{body::Bytes, extract::State, response::Response};
use ipnet::Ipv4Net;

use super::{
    Error, RUNTIME, Shared, parse,
    protocol::{
        AddressReply, AddressSpaces, Empty, GATEWAY_REQUEST, IpamCapabilities, PoolReply,
        REQUEST_ADDRESS_TYPE, ReleaseAddress, ReleasePool, RequestAddress, RequestPool,
    },
    reply,
};
use crate::{control::lease::gateway, endpoint::handoff, state::SubnetEnv};

pub async fn capabilities() -> Response {
    reply(Ok(IpamCapabilities {
        requires_mac_address: false,
        requires_request_replay: false,
    }))
}

pub async fn address_spaces() -> Response {
    reply(Ok(AddressSpaces {
        local_default_address_space: "netd-local".into(),
        global_default_address_space: "netd-global".into(),
    }))
}

fn subnet(run_dir: &std::path::Path) -> Result<Ipv4Net, Error> {
    Ok(SubnetEnv::read(run_dir)
        .map_err(crate::endpoint::Error::NotReady)?
        .subnet)
}

/// An address with or without a prefix length.
fn parse_ip(text: &str) -> Result<Ipv4Addr, Error> {
    let ip = text.split('/').next().unwrap_or_default();
    ip.parse()
        .map_err(|_| Error::BadRequest(format!("{text:?} is not an IPv4 address")))
}

pub async fn request_pool(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: RequestPool = parse(&body)?;
            if req.v6 {
                return Err(Error::BadRequest("netd has no IPv6 pool".into()));
            }
            let subnet = subnet(&d.run_dir)?;
            if !req.pool.is_empty() && req.pool.parse::<Ipv4Net>().ok() != Some(subnet) {
                return Err(Error::BadRequest(format!(
                    "pool {} asked for, but this host's subnet is {subnet}: leave --subnet out",
                    req.pool
                )));
            }
            if !req.sub_pool.is_empty() {
                return Err(Error::BadRequest(
                    "netd hands out the whole host subnet: leave --ip-range out".into(),
                ));
            }
            let id = subnet.to_string();
            *d.pools.lock().await.entry(id.clone()).or_default() += 1;
            Ok(PoolReply {
                pool_id: id.clone(),
                pool: id,
                data: BTreeMap::new(),
            })
        }
        .await,
    )
}

pub async fn release_pool(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: ReleasePool = parse(&body)?;
            let mut pools = d.pools.lock().await;
            if let Some(count) = pools.get_mut(&req.pool_id) {
                *count -= 1;
                if *count == 0 {
                    pools.remove(&req.pool_id);
                }
            }
            Ok(Empty {})
        }
        .await,
    )
}

/// The pool must be this host's subnet: a pool of an earlier lease is not.
fn check_pool(d: &super::Driver, pool_id: &str) -> Result<Ipv4Net, Error> {
    let subnet = subnet(&d.run_dir)?;
    if pool_id != subnet.to_string() {
        return Err(Error::BadRequest(format!(
            "pool {pool_id:?} is not this host's subnet {subnet}"
        )));
    }
    Ok(subnet)
}

pub async fn request_address(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: RequestAddress = parse(&body)?;
            let subnet = check_pool(&d, &req.pool_id)?;
            let requested = match req.address.as_str() {
                "" => None,
                text => Some(parse_ip(text)?),
            };
            let gw = gateway(subnet);
            let is_gateway = req
                .options
                .as_ref()
                .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
                .is_some_and(|t| t == GATEWAY_REQUEST);
            if is_gateway {
                if requested.is_some_and(|ip| ip != gw) {
                    return Err(Error::BadRequest(format!(
                        "the gateway of {subnet} is {gw}: leave --gateway out"
                    )));
                }
                return Ok(AddressReply {
                    address: format!("{gw}/{}", subnet.prefix_len()),
                    data: BTreeMap::new(),
                });
            }
            let _serial = d.serial.lock().await;
            let ip = handoff::reserve(&d.run_dir, RUNTIME, requested)?;
            // A /32, as for every netd container: all traffic goes through
            // the gateway, so containers of one host reach each other too.
            Ok(AddressReply {
                address: format!("{ip}/32"),
                data: BTreeMap::new(),
            })
        }
        .await,
    )
}

pub async fn release_address(State(d): Shared, body: Bytes) -> Response {
    reply(
        async {
            let req: ReleaseAddress = parse(&body)?;
            let ip = parse_ip(&req.address)?;
            if let Ok(subnet) = req.pool_id.parse::<Ipv4Net>()
                && ip == gateway(subnet)
            {
                return Ok(Empty {});
            }
            let _serial = d.serial.lock().await;
            handoff::unreserve(&d.pin, &d.run_dir, RUNTIME, ip).await?;
            Ok(Empty {})
        }
        .await,
    )
}
