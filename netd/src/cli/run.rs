//! `netd run`: the daemon.

use std::{
    fs,
    future::Future,
    net::Ipv4Addr,
    path::Path,
    pin::Pin,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netd_common::NodeConfig;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinSet,
};
use tracing::{error, info, warn};

use super::RunArgs;
use crate::{
    control::backoff::Backoff,
    control::config::{FileConfig, NetworkConfig, VXLAN, VXLAN_OVERHEAD},
    control::endpoints::Publisher,
    control::lease::{Mac, gateway},
    control::policy_sync::{Host, PolicySync},
    control::registry::{Access, Registry},
    control::subnet::{self, Identity},
    control::sync::{self, Connected, Own},
    datapath::{self, Hook, Maps, PinDir},
    egress::{self, Egress, HostAccess, Masquerade},
    endpoint, metrics,
    netlink::{Link, Netlink},
    policy::ForeignIdentity,
    runtime::docker,
    selfheal,
    state::{EtcdHealth, NodeState, SubnetEnv},
};

/// Holds each host's gateway address (as /32, so no route comes with it):
/// containers ARP for it and the host answers from their veth.
pub(super) const GATEWAY_LINK: &str = "lo";
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
    reconcile_interval: Duration,
    docker_plugin: Option<std::path::PathBuf>,
    ip_masq: bool,
    foreign: ForeignIdentity,
}

impl Options {
    fn resolve(args: RunArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                FileConfig::parse(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Flags and `NETD_*` variables (both in `args`, clap puts the flag
    /// first) over the file over defaults.
    fn merge(args: RunArgs, file: FileConfig) -> Result<Self> {
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
            reconcile_interval: Duration::from_secs(args.reconcile_interval),
            docker_plugin: args.docker_plugin,
            ip_masq: args.ip_masq || file.ip_masq.unwrap_or(false),
            foreign: ForeignIdentity {
                network: args.foreign_network,
                labels: args.foreign_labels.into_iter().collect(),
            },
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
    // etcd is read while the eBPF object loads: at 100,000 leases the two
    // take about as long as each other.
    let etcd = tokio::spawn(open_registry(opts.etcd.clone()));
    let mut pending = datapath::prepare(&pin, run_dir).await?;
    let mut maps = Maps::open(&pin)?;
    endpoint::restore(&mut maps, run_dir).await?;

    let (mut registry, cfg, prefetched) = etcd.await.context("reading etcd")??;

    let me = Identity {
        public_ip,
        vtep_mac,
        ttl_secs: opts.lease_ttl as i64,
    };
    let recorded = SubnetEnv::read(run_dir)
        .ok()
        .filter(|e| e.network == cfg.network)
        .map(|e| e.subnet);
    let (held, listing) = acquire(&mut registry, &cfg, &me, recorded, prefetched).await?;
    let (own_tx, own_rx) = watch::channel(Own {
        subnet: held.subnet,
        public_ip,
    });
    let connected = Connected(nl.ipv4_prefixes(underlay.index).await?);
    // Fill the maps before any attachment runs new programs, and while a
    // fresh build's programs are still being verified.
    let synced = sync::once(
        listing,
        &cfg,
        own_rx.borrow().to_owned(),
        &connected,
        &mut maps,
    )
    .await?;
    if let Some(pending) = &mut pending {
        pending.programs_pinned().await?;
    }
    let hook = datapath::attach_underlay(
        &pin,
        run_dir,
        &underlay.name,
        opts.decap,
        underlay.kind.as_deref(),
    )
    .await?;
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
    let mut tasks = Supervisor::default();
    tasks.restarting("state publisher", {
        let run_dir = run_dir.to_path_buf();
        let state_rx = state_rx.clone();
        move || -> Task {
            let (run_dir, rx) = (run_dir.clone(), state_rx.clone());
            Box::pin(async move {
                publish_state(run_dir, rx).await;
                Ok(())
            })
        }
    });
    if let Some(addr) = opts.metrics_addr {
        // Bound before the daemon reports itself running, so a taken port
        // fails the start instead of a scrape; a restart binds anew.
        let first = std::sync::Mutex::new(Some(metrics::bind(addr).await?));
        let source = metrics::Source {
            pin: pin.clone(),
            run_dir: run_dir.to_path_buf(),
            state: state_rx.clone(),
        };
        tasks.restarting("metrics server", move || -> Task {
            let listener = first.lock().ok().and_then(|mut l| l.take());
            let source = source.clone();
            Box::pin(async move {
                let listener = match listener {
                    Some(l) => l,
                    None => metrics::bind(addr).await?,
                };
                metrics::serve(listener, source).await?;
                Ok(())
            })
        });
    }
    if let Some(path) = opts.docker_plugin.clone() {
        // Bound before the daemon reports itself running; a restart binds
        // anew (replacing the socket file).
        let first = std::sync::Mutex::new(Some(docker::bind(&path)?));
        let driver = std::sync::Arc::new(docker::Driver::new(pin.clone(), run_dir.to_path_buf()));
        tasks.restarting("Docker plugin", move || -> Task {
            let listener = first.lock().ok().and_then(|mut l| l.take());
            let (path, driver) = (path.clone(), driver.clone());
            Box::pin(async move {
                let listener = match listener {
                    Some(l) => l,
                    None => docker::bind(&path)?,
                };
                docker::serve(listener, driver).await
            })
        });
    }

    let egress = Egress {
        host_access: HostAccess {
            network: cfg.network,
            subnet: held.subnet,
            gateway: gateway(held.subnet),
            mtu,
        },
        masquerade: opts.ip_masq.then_some(Masquerade {
            subnet: held.subnet,
            network: cfg.network,
        }),
    };
    egress::reconcile(&nl, &pin, &mut maps, &egress).await?;
    drop(maps);
    if let Some(pending) = pending {
        let containers: Vec<String> = endpoint::records(run_dir)?
            .into_iter()
            .map(|r| r.host_ifname)
            .collect();
        pending.switch_over(&pin, run_dir, &containers).await?;
    }
    tasks.restarting("egress", {
        let pin = pin.clone();
        move || -> Task {
            let (pin, egress) = (pin.clone(), egress.clone());
            Box::pin(async move {
                egress::keep(pin, egress, EGRESS_PERIOD).await;
                Ok(())
            })
        }
    });
    if cfg.backend.kind == VXLAN {
        let port = cfg.backend.port;
        let first_error = datapath::tunnel_device::start(&nl, &pin, port).await;
        tasks.restarting("tunnel device", {
            let pin = pin.clone();
            move || -> Task {
                Box::pin(datapath::tunnel_device::reconcile(
                    pin.clone(),
                    port,
                    first_error.clone(),
                ))
            }
        });
    }
    // The kernel, not a record, says what is attached: put back what is
    // missing before announcing the node, then keep it so.
    let underlay_hook = datapath::Underlay {
        iface: underlay.name.clone(),
        hook,
    };
    let repaired = selfheal::Healer::new(pin.clone(), run_dir.to_path_buf(), underlay_hook.clone())
        .reconcile(&nl)
        .await;
    state_tx.send_modify(|s| s.repairs += repaired);
    tasks.restarting("attachment reconcile", {
        let (pin, run_dir, state) = (pin.clone(), run_dir.to_path_buf(), state_tx.clone());
        let interval = opts.reconcile_interval;
        move || -> Task {
            let healer = selfheal::Healer::new(pin.clone(), run_dir.clone(), underlay_hook.clone());
            Box::pin(selfheal::run(healer, interval, state.clone()))
        }
    });
    tasks.restarting("subnet sync", {
        let (pin, registry, cfg, state) =
            (pin.clone(), registry.clone(), cfg.clone(), state_tx.clone());
        // The first run follows on from the start's sync; a restart lists anew.
        let first = std::sync::Mutex::new(Some(synced));
        move || -> Task {
            let synced = first.lock().ok().and_then(|mut s| s.take());
            let (registry, cfg, own, connected, state) = (
                registry.clone(),
                cfg.clone(),
                own_rx.clone(),
                connected.clone(),
                state.clone(),
            );
            let maps = Maps::open(&pin);
            Box::pin(async move {
                sync::run(registry, cfg, own, connected, maps?, state, synced).await;
                Ok(())
            })
        }
    });
    tasks.restarting("endpoint publisher", {
        let (registry, run_dir, state) =
            (registry.clone(), run_dir.to_path_buf(), state_rx.clone());
        let subnet = held.subnet;
        move || -> Task {
            let publisher = Publisher {
                registry: registry.clone(),
                run_dir: run_dir.clone(),
                subnet,
                state: state.clone(),
            };
            Box::pin(publisher.run())
        }
    });
    tasks.restarting("policy sync", {
        let (registry, pin, run_dir) = (registry.clone(), pin.clone(), run_dir.to_path_buf());
        let host = Host {
            subnet: held.subnet,
            foreign: opts.foreign.clone(),
        };
        move || -> Task {
            let sync = PolicySync {
                registry: registry.clone(),
                pin: pin.clone(),
                run_dir: run_dir.clone(),
                host: host.clone(),
            };
            Box::pin(sync.run())
        }
    });
    // Without the lease keeper nobody renews the lease: its end ends the
    // daemon (below), with the data path disabled.
    tasks.essential("lease keeper", async move {
        anyhow::Error::from(subnet::hold(registry, cfg, me, held, state_tx).await)
    });

    info!(subnet = %held.subnet, %public_ip, iface = %underlay.name, ?hook, "netd running");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; the pinned data path keeps forwarding"),
        _ = int.recv() => info!("SIGINT: stopping; the pinned data path keeps forwarding"),
        ended = tasks.ended() => {
            // Never forward for a subnet this host may no longer hold.
            if let Err(e) = disable_datapath(&pin) {
                error!("could not disable the data path: {e:#}");
            }
            let err = ended.error.context(format!("{} ended", ended.name));
            error!("{err:#}");
            return Err(err);
        }
    }
    // Stop the tasks first, so that none is restarted on the way out.
    drop(tasks);
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

/// Connects, waits for the network config and lists the leases once; a
/// failed listing is left to [`acquire`], which retries.
async fn open_registry(
    access: Access,
) -> Result<(Registry, NetworkConfig, Option<subnet::Listing>)> {
    let mut registry = connect(&access).await?;
    let cfg = network_config(&mut registry).await?;
    let listing = registry
        .list_subnets()
        .await
        .ok()
        .map(|(leases, revision)| subnet::Listing { leases, revision });
    Ok((registry, cfg, listing))
}

/// Connects to etcd, retrying until it answers (hosts may start first);
/// bad credentials or certificates are fatal.
async fn connect(access: &Access) -> Result<Registry> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Registry::connect(access).await {
            Ok(registry) => return Ok(registry),
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => warn!("{:#}; retrying in {delay:?}", anyhow::Error::from(e)),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Takes a subnet, retrying while etcd is away (hosts may start first).
async fn acquire(
    registry: &mut Registry,
    cfg: &NetworkConfig,
    me: &Identity,
    recorded: Option<ipnet::Ipv4Net>,
    mut first: Option<subnet::Listing>,
) -> Result<(subnet::Held, subnet::Listing)> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match subnet::acquire(registry, cfg, me, recorded, first.take()).await {
            Err(subnet::SubnetError::Transient(e)) => {
                let delay = backoff.next_delay();
                warn!(
                    "acquiring a subnet: {:#}; retrying in {delay:?}",
                    anyhow::Error::from(e)
                );
                tokio::time::sleep(delay).await;
            }
            held => return Ok(held?),
        }
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

/// A restartable task's body, made afresh for every start.
type Task = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// A task the daemon cannot run without, and why it ended.
pub struct Ended {
    pub name: &'static str,
    pub error: anyhow::Error,
}

/// Restart delays of a task that failed; a task that ran this long before
/// failing starts again from the first delay.
const RESTART_FIRST: Duration = Duration::from_millis(500);
const RESTART_CAP: Duration = Duration::from_secs(30);
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Owns every long-running task of the daemon. A restartable task that
/// ends or panics is started again with backoff, with one error line each
/// time; an essential task that ends or panics is reported by [`ended`]
/// so the daemon can stop loudly. Dropping the supervisor aborts them.
///
/// [`ended`]: Supervisor::ended
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<Ended>,
}

impl Supervisor {
    pub fn restarting<F>(&mut self, name: &'static str, mut make: F)
    where
        F: FnMut() -> Task + Send + 'static,
    {
        self.tasks.spawn(async move {
            let mut backoff = Backoff::new(RESTART_FIRST, RESTART_CAP);
            loop {
                let started = Instant::now();
                // Its own task, so that a panic is caught here.
                let task = AbortOnDrop(tokio::spawn(make()));
                let why = match task.join().await {
                    Ok(Ok(())) => anyhow::anyhow!("it stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => panicked(e),
                };
                if started.elapsed() >= RESTART_RESET {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                error!("task {name} ended: {why:#}; restarting in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        });
    }

    pub fn essential<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Error> + Send + 'static,
    {
        self.tasks.spawn(async move {
            let error = match AbortOnDrop(tokio::spawn(task)).join().await {
                Ok(error) => error,
                Err(e) => panicked(e),
            };
            Ended { name, error }
        });
    }

    /// The first essential task to end; never, if none does.
    pub async fn ended(&mut self) -> Ended {
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(ended) => return ended,
                // Only the wrappers run here, and they neither panic nor
                // are aborted while the supervisor lives.
                Err(e) => error!("supervisor lost a task: {e}"),
            }
        }
        std::future::pending().await
    }
}

/// A task that is aborted when the supervisor's wrapper around it is.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> std::result::Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panicked(e: tokio::task::JoinError) -> anyhow::Error {
    if !e.is_panic() {
        return anyhow::anyhow!("it was cancelled");
    }
    let payload = e.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".into());
    anyhow::anyhow!("it panicked: {message}")
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from([&["netd", "run"], argv].concat()).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        args
    }

    /// Held by the tests that parse `run` while another sets variables.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(text).unwrap()
    }

    const FILE: &str = "etcd-endpoints = [\"http://file:2379\"]\niface = \"file0\"\n\
                        public-ip = \"198.18.0.9\"\ndecap = \"tc\"\nlease-ttl = 30\n";

    /// One option of each kind: a list, a string, an address, an enum and
    /// a number.
    fn chosen(o: &Options) -> (Vec<String>, Option<String>, Option<Ipv4Addr>, Hook, u64) {
        (
            o.etcd.endpoints.clone(),
            o.iface.clone(),
            o.public_ip,
            o.decap,
            o.lease_ttl,
        )
    }

    #[test]
    fn file_over_defaults_and_flags_over_file() {
        let _env = ENV.lock().unwrap();
        let defaults = Options::merge(run_args(&[]), FileConfig::default()).unwrap();
        assert_eq!(
            chosen(&defaults),
            (
                vec![crate::cli::DEFAULT_ENDPOINT.to_string()],
                None,
                None,
                Hook::Auto,
                DEFAULT_LEASE_TTL
            )
        );
        assert_eq!(defaults.etcd.prefix, crate::cli::DEFAULT_PREFIX);
        let from_file = Options::merge(run_args(&[]), file(FILE)).unwrap();
        assert_eq!(
            chosen(&from_file),
            (
                vec!["http://file:2379".to_string()],
                Some("file0".into()),
                Some(Ipv4Addr::new(198, 18, 0, 9)),
                Hook::Tc,
                30
            )
        );
        let flags = run_args(&[
            "--etcd-endpoints",
            "http://flag:2379",
            "--iface",
            "flag0",
            "--public-ip",
            "198.18.0.1",
            "--decap",
            "xdp",
            "--lease-ttl",
            "10",
        ]);
        let from_flags = Options::merge(flags, file(FILE)).unwrap();
        assert_eq!(
            chosen(&from_flags),
            (
                vec!["http://flag:2379".to_string()],
                Some("flag0".into()),
                Some(Ipv4Addr::new(198, 18, 0, 1)),
                Hook::Xdp,
                10
            )
        );
        assert!(Options::merge(run_args(&[]), file("decap = \"ebpf\"")).is_err());
        assert!(Options::merge(run_args(&["--lease-ttl", "2"]), file(FILE)).is_err());
    }

    /// `NETD_*` variables sit between flags and the file. The only test
    /// that sets them; every other test passes the run options it checks
    /// as flags.
    #[test]
    fn variables_between_flags_and_file() {
        let _env = ENV.lock().unwrap();
        let vars = [
            ("NETD_ETCD_ENDPOINTS", "http://env:2379"),
            ("NETD_IFACE", "env0"),
            ("NETD_PUBLIC_IP", "198.18.0.5"),
            ("NETD_DECAP", "xdp"),
            ("NETD_LEASE_TTL", "20"),
        ];
        for (name, value) in vars {
            // SAFETY: no other test reads these variables or calls into C
            // code that reads the environment.
            unsafe { std::env::set_var(name, value) };
        }
        let from_env = Options::merge(run_args(&[]), file(FILE));
        let flags = run_args(&[
            "--etcd-endpoints",
            "http://flag:2379",
            "--iface",
            "flag0",
            "--public-ip",
            "198.18.0.1",
            "--decap",
            "tc",
            "--lease-ttl",
            "10",
        ]);
        for (name, _) in vars {
            // SAFETY: as above.
            unsafe { std::env::remove_var(name) };
        }
        assert_eq!(
            chosen(&from_env.unwrap()),
            (
                vec!["http://env:2379".to_string()],
                Some("env0".into()),
                Some(Ipv4Addr::new(198, 18, 0, 5)),
                Hook::Xdp,
                20
            )
        );
        let from_flags = Options::merge(flags, file(FILE)).unwrap();
        assert_eq!(
            chosen(&from_flags),
            (
                vec!["http://flag:2379".to_string()],
                Some("flag0".into()),
                Some(Ipv4Addr::new(198, 18, 0, 1)),
                Hook::Tc,
                10
            )
        );
    }

    /// A restartable task that panics is started again; an essential one
    /// that panics is reported, with its name and the panic's message.
    #[tokio::test]
    async fn supervisor_restarts_and_reports() {
        let starts = Arc::new(AtomicUsize::new(0));
        let mut tasks = Supervisor::default();
        tasks.restarting("flaky", {
            let starts = starts.clone();
            move || -> Task {
                let starts = starts.clone();
                Box::pin(async move {
                    if starts.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("flaky failed");
                    }
                    std::future::pending().await
                })
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.essential("keeper", async move {
            let _ = rx.await;
            panic!("keeper failed")
        });
        // The flaky task is restarted after each panic (500 ms, then
        // 1 s at most): the supervisor reports nothing meanwhile.
        let quiet = tokio::time::timeout(Duration::from_secs(3), tasks.ended()).await;
        assert!(quiet.is_err(), "a restartable task was reported as ended");
        assert_eq!(starts.load(Ordering::SeqCst), 3, "flaky task not restarted");
        tx.send(()).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), tasks.ended())
            .await
            .expect("the essential task's panic was not reported");
        assert_eq!(ended.name, "keeper");
        assert_eq!(ended.error.to_string(), "it panicked: keeper failed");
    }

    /// Dropping the supervisor (at shutdown) aborts the tasks themselves,
    /// not only their wrappers, so none is restarted or left running.
    #[tokio::test]
    async fn dropping_the_supervisor_aborts_its_tasks() {
        let alive = Arc::new(());
        let mut tasks = Supervisor::default();
        for name in ["a", "b"] {
            let alive = alive.clone();
            tasks.restarting(name, move || -> Task {
                let alive = alive.clone();
                Box::pin(async move {
                    let _alive = alive;
                    std::future::pending().await
                })
            });
        }
        let held = alive.clone();
        tasks.essential("c", async move {
            let _held = held;
            std::future::pending().await
        });
        // Ours, the two factories, the two tasks they made and the third.
        let started = poll(|| Arc::strong_count(&alive) == 6).await;
        assert!(started, "tasks did not start");
        drop(tasks);
        let stopped = poll(|| Arc::strong_count(&alive) == 1).await;
        assert!(
            stopped,
            "{} tasks still running",
            Arc::strong_count(&alive) - 1
        );
    }

    async fn poll(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// An essential task that returns is reported too.
    #[tokio::test]
    async fn supervisor_reports_an_essential_task_that_returns() {
        let mut tasks = Supervisor::default();
        tasks.essential("keeper", async { anyhow::anyhow!("subnet taken") });
        let ended = tasks.ended().await;
        assert_eq!(
            (ended.name, ended.error.to_string()),
            ("keeper", "subnet taken".to_string())
        );
    }
}
