//! `netd run`: the daemon.

use std::{fs, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use netd_common::NodeConfig;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use super::RunArgs;
use crate::{
    control::config::{FileConfig, NetworkConfig, VXLAN_OVERHEAD},
    control::lease::{Mac, gateway},
    control::registry::{Access, Registry},
    control::subnet::{self, Identity},
    control::sync::{self, Connected, Own},
    datapath::{self, Hook, Maps, PinDir},
    egress::{self, Egress, HostAccess, Masquerade},
    endpoint, metrics,
    netlink::{Link, Netlink},
    state::{EtcdHealth, NodeState, SubnetEnv},
};

/// Holds each host's gateway address (as /32, so no route comes with it):
/// containers ARP for it and the host answers from their veth.
const GATEWAY_LINK: &str = "lo";
const DEFAULT_LEASE_TTL: u64 = 60;
/// How often the egress state is checked against the kernel.
const EGRESS_PERIOD: Duration = Duration::from_secs(10);

/// Flags over `NETD_*` variables over the config file over defaults.
struct Options {
    etcd: Access,
    iface: Option<String>,
    public_ip: Option<Ipv4Addr>,
    decap: Hook,
    lease_ttl: u64,
    metrics_addr: Option<std::net::SocketAddr>,
    ip_masq: bool,
}

impl Options {
    fn resolve(args: RunArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                FileConfig::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let decap = match (args.decap, file.decap.as_deref()) {
            (Some(hook), _) => hook,
            (None, Some("xdp")) => Hook::Xdp,
            (None, Some("tc")) => Hook::Tc,
            (None, Some("auto") | None) => Hook::Auto,
            (None, Some(other)) => {
                bail!("decap {other:?} in config file: expected xdp, tc or auto")
            }
        };
        let lease_ttl = args
            .lease_ttl
            .or(file.lease_ttl)
            .unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < 3 {
            bail!("--lease-ttl must be at least 3 seconds");
        }
        let mut etcd_args = args.etcd;
        etcd_args.etcd_endpoints = etcd_args.etcd_endpoints.or(file.etcd_endpoints);
        etcd_args.etcd_prefix = etcd_args.etcd_prefix.or(file.etcd_prefix);
        Ok(Options {
            etcd: etcd_args.access()?,
            iface: args.iface.or(file.iface),
            public_ip: args.public_ip.or(file.public_ip),
            decap,
            lease_ttl,
            metrics_addr: args.metrics_addr,
            ip_masq: args.ip_masq || file.ip_masq.unwrap_or(false),
        })
    }
}

pub async fn run(pin_path: &Path, run_dir: &Path, args: RunArgs) -> Result<()> {
    let opts = Options::resolve(args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("netd run needs root (CAP_NET_ADMIN and CAP_BPF)");
    }
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let pin = PinDir::new(pin_path);
    pin.create()?;

    let nl = Netlink::connect()?;
    let underlay = underlay_link(&nl, opts.iface.as_deref()).await?;
    let public_ip = match opts.public_ip {
        Some(ip) => ip,
        None => nl
            .first_ipv4(underlay.index)
            .await?
            .with_context(|| format!("{} has no IPv4 address: pass --public-ip", underlay.name))?,
    };
    let vtep_mac = Mac::vtep_for(public_ip);
    let pending = datapath::prepare(&pin, run_dir).await?;
    let mut maps = Maps::open(&pin)?;
    endpoint::restore(&mut maps, run_dir).await?;

    let mut registry = connect(&opts).await?;
    let cfg = network_config(&mut registry).await?;
    let hook = datapath::attach_underlay(
        &pin,
        run_dir,
        &underlay.name,
        opts.decap,
        underlay.kind.as_deref(),
    )
    .await?;

    let me = Identity {
        public_ip,
        vtep_mac,
        ttl_secs: opts.lease_ttl as i64,
    };
    let recorded = SubnetEnv::read(run_dir)
        .ok()
        .filter(|e| e.network == cfg.network)
        .map(|e| e.subnet);
    let held = subnet::acquire(&mut registry, &cfg, &me, recorded).await?;
    let mtu = underlay.mtu.unwrap_or(1500) - VXLAN_OVERHEAD;
    maps.set_config(&NodeConfig {
        vni: cfg.backend.vni,
        underlay_ifindex: underlay.index,
        public_ip: public_ip.octets(),
        port: cfg.backend.port,
        enabled: 1,
        // Only a physical NIC's frames arrive with complete checksums.
        xdp_redirect: underlay.kind.is_none() as u8,
        underlay_mac: underlay.mac.context("underlay interface has no MAC")?,
        vtep_mac: vtep_mac.0,
        inner_mtu: mtu as u16,
        _pad2: [0; 2],
        gateway: gateway(held.subnet).octets(),
    })?;

    let gw = nl.require_link(GATEWAY_LINK).await?;
    nl.add_address(gw.index, gateway(held.subnet), 32).await?;
    SubnetEnv {
        network: cfg.network,
        subnet: held.subnet,
        mtu,
        ipmasq: opts.ip_masq,
    }
    .write(run_dir)?;

    let mut initial = NodeState {
        pid: std::process::id(),
        network: Some(cfg.network),
        subnet: Some(held.subnet),
        public_ip: Some(public_ip),
        vtep_mac: vtep_mac.to_string(),
        lease_id: held.lease_id,
        etcd: EtcdHealth::reachable(),
        underlay: Some(datapath::Underlay {
            iface: underlay.name.clone(),
            hook,
        }),
        ..Default::default()
    };
    initial.renewed(me.ttl_secs);
    let (state_tx, state_rx) = watch::channel(initial);
    if let Some(addr) = opts.metrics_addr {
        let source = metrics::Source {
            pin: pin.clone(),
            run_dir: run_dir.to_path_buf(),
            state: state_rx.clone(),
        };
        // Bound before the daemon reports itself running, so a taken port
        // fails the start instead of a scrape.
        let listener = metrics::bind(addr).await?;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, source).await {
                error!("{e}");
            }
        });
    }
    tokio::spawn(publish_state(run_dir.to_path_buf(), state_rx));

    let (own_tx, own_rx) = watch::channel(Own {
        subnet: held.subnet,
        public_ip,
    });
    let connected = Connected(nl.ipv4_prefixes(underlay.index).await?);
    // Fill the new maps before the attachments run the new programs.
    sync::once(
        &mut registry,
        &cfg,
        own_rx.borrow().to_owned(),
        &connected,
        &mut maps,
    )
    .await?;
    if let Some(pending) = pending {
        let containers: Vec<String> = endpoint::records(run_dir)?
            .into_iter()
            .map(|r| r.host_ifname)
            .collect();
        pending.switch_over(&pin, run_dir, &containers).await?;
    }
    let egress = Egress {
        host_access: HostAccess {
            network: cfg.network,
            gateway: gateway(held.subnet),
            mtu,
        },
        masquerade: opts.ip_masq.then_some(Masquerade {
            subnet: held.subnet,
            network: cfg.network,
        }),
    };
    egress::reconcile(&nl, &pin, &mut maps, &egress).await?;
    tokio::spawn(egress::keep(pin.clone(), egress, EGRESS_PERIOD));
    tokio::spawn(sync::run(
        registry.clone(),
        cfg.clone(),
        own_rx,
        connected,
        maps,
        state_tx.clone(),
    ));
    let mut holder = tokio::spawn(subnet::hold(registry, cfg, me, held, state_tx));

    info!(subnet = %held.subnet, %public_ip, iface = %underlay.name, ?hook, "netd running");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; the pinned data path keeps forwarding"),
        _ = int.recv() => info!("SIGINT: stopping; the pinned data path keeps forwarding"),
        result = &mut holder => {
            let err = match result {
                Ok(Ok(())) => anyhow::anyhow!("lease holder stopped"),
                Ok(Err(e)) => e,
                Err(e) => e.into(),
            };
            // Never forward for a subnet this host no longer holds.
            if let Err(e) = disable_datapath(&pin) {
                error!("could not disable the data path: {e:#}");
            }
            error!("{err:#}");
            return Err(err);
        }
    }
    // Closing the channel tells the sync task to stop quietly.
    drop(own_tx);
    Ok(())
}

/// Makes the kernel programs pass everything to the stack untouched.
fn disable_datapath(pin: &PinDir) -> Result<()> {
    let mut maps = Maps::open(pin)?;
    let mut config = maps.config()?;
    config.enabled = 0;
    maps.set_config(&config)
}

async fn underlay_link(nl: &Netlink, iface: Option<&str>) -> Result<Link> {
    match iface {
        Some(name) => nl.require_link(name).await,
        None => nl
            .default_route_link()
            .await?
            .context("no IPv4 default route to take the underlay interface from: pass --iface"),
    }
}

/// Connects to etcd, retrying until it answers (hosts may start first);
/// bad credentials or certificates are fatal.
async fn connect(opts: &Options) -> Result<Registry> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Registry::connect(&opts.etcd).await {
            Ok(registry) => return Ok(registry),
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => warn!("{:#}; retrying in {delay:?}", anyhow::Error::from(e)),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Waits for the network config to exist; an invalid one is fatal, and so
/// is an etcd that refuses our certificate or credentials.
async fn network_config(registry: &mut Registry) -> Result<NetworkConfig> {
    let mut logged = false;
    loop {
        match registry.get_config().await {
            Err(e) if e.is_permanent() => return Err(e.into()),
            Ok(Some(json)) => {
                return NetworkConfig::parse(&json).with_context(|| {
                    format!("invalid network config at {}", registry.config_key())
                });
            }
            Ok(None) if !logged => {
                warn!(
                    "no network config at {} yet (netd network init); waiting",
                    registry.config_key()
                );
                logged = true;
            }
            Ok(None) => {}
            Err(e) => warn!("{:#}", anyhow::Error::from(e)),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn publish_state(run_dir: std::path::PathBuf, mut rx: watch::Receiver<NodeState>) {
    loop {
        let state = rx.borrow_and_update().clone();
        if let Err(e) = state.write(&run_dir) {
            warn!("{e:#}");
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
