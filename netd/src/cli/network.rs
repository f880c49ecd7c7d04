//! `netd network init|show`.

use anyhow::{Result, bail};

use super::{EtcdArgs, NetworkInitArgs};
use crate::{
    control::config::{Backend, NetworkConfig},
    control::registry::Registry,
};

pub async fn init(args: NetworkInitArgs) -> Result<()> {
    let cfg = NetworkConfig {
        subnet_len: args.subnet_len,
        subnet_min: args.subnet_min,
        subnet_max: args.subnet_max,
        backend: Backend {
            kind: args.backend,
            vni: args.vni,
            port: args.port,
            direct_routing: args.direct_routing,
        },
        ..NetworkConfig::new(args.network)
    };
    cfg.validate()?;
    let mut registry = Registry::connect(&args.etcd.access()?).await?;
    let same = |existing: &[u8]| NetworkConfig::parse(existing).is_ok_and(|e| e == cfg);
    if registry.init_config(&cfg.to_json(), same).await? {
        println!("wrote {}: {}", registry.config_key(), cfg.to_json());
    } else {
        println!("{} already holds this config", registry.config_key());
    }
    Ok(())
}

pub async fn show(args: EtcdArgs) -> Result<()> {
    let mut registry = Registry::connect(&args.access()?).await?;
    match registry.get_config().await? {
        Some(json) => println!("{}", String::from_utf8_lossy(&json)),
        None => bail!("no network config at {}", registry.config_key()),
    }
    Ok(())
}
