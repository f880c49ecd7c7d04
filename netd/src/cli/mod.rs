//! Command-line interface: every flag in one place.

pub mod attach;
pub mod network;
pub mod policy;
pub mod run;
pub mod status;
pub mod teardown;

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{control::registry::Access, datapath::Hook};

#[derive(Debug, Parser)]
#[command(
    name = "netd",
    version,
    about = "eBPF VXLAN overlay for containers across hosts"
)]
pub struct Cli {
    /// bpffs directory holding this node's pinned maps, programs and links.
    #[arg(
        long,
        env = "NETD_PIN_PATH",
        default_value = "/sys/fs/bpf/netd",
        global = true
    )]
    pub pin_path: PathBuf,
    /// Directory for this node's lease record, subnet.env and endpoints.
    #[arg(long, env = "NETD_RUN_DIR", default_value = "/run/netd", global = true)]
    pub run_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: lease a subnet, program the data plane, follow etcd.
    Run(RunArgs),
    /// Manage the cluster network configuration in etcd.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Connect a container (network namespace) to the overlay.
    Attach(AttachArgs),
    /// Disconnect a container attached with `netd attach`.
    Detach(DetachArgs),
    /// Show this node's lease, peers, attachments and counters.
    Status(StatusArgs),
    /// Remove everything netd made on this host: containers, programs,
    /// pins, the gateway address and the run-directory files.
    Teardown,
    /// Manage the network policies in etcd.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

#[derive(Debug, Args, Clone)]
pub struct EtcdArgs {
    /// Comma-separated etcd client URLs.
    #[arg(long, env = "NETD_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Key prefix of the network in etcd.
    #[arg(long, env = "NETD_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// CA certificate of the etcd servers (PEM); turns TLS on.
    #[arg(long, env = "NETD_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for client-certificate authentication.
    #[arg(long, env = "NETD_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, env = "NETD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name; the password comes from NETD_ETCD_PASSWORD or
    /// --etcd-password-file, never from a flag value that `ps` shows.
    #[arg(long, env = "NETD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// File whose first line is the etcd password.
    #[arg(long, env = "NETD_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_PREFIX: &str = "/netd/network";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Optional TOML file with the same options (flags win).
    #[arg(long, env = "NETD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Underlay interface [default: the interface of the default route].
    #[arg(long, env = "NETD_IFACE")]
    pub iface: Option<String>,
    /// Underlay address announced to peers [default: first IPv4 of --iface].
    #[arg(long, env = "NETD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Hook for decapsulation on the underlay NIC [default: auto].
    #[arg(long, env = "NETD_DECAP", value_enum)]
    pub decap: Option<Hook>,
    /// Lifetime of the subnet lease in seconds; renewed every third of it.
    #[arg(long, env = "NETD_LEASE_TTL")]
    pub lease_ttl: Option<u64>,
    /// Serve Prometheus `/metrics` and `/healthz` on this address, e.g.
    /// 198.18.0.1:9101 [default: off].
    #[arg(long, env = "NETD_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between checks that every program is still attached (link
    /// and TC changes trigger a check at once too).
    #[arg(long, env = "NETD_RECONCILE_INTERVAL", default_value_t = crate::selfheal::DEFAULT_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub reconcile_interval: u64,
    /// Serve Docker's network and IPAM driver protocols on this unix socket,
    /// e.g. /run/docker/plugins/netd.sock (the file name is the driver
    /// name) [default: off].
    #[arg(long, env = "NETD_DOCKER_PLUGIN")]
    pub docker_plugin: Option<std::path::PathBuf>,
    /// Masquerade traffic from this host's containers to destinations
    /// outside the cluster network behind the host's address.
    #[arg(long, env = "NETD_IP_MASQ")]
    pub ip_masq: bool,
    /// Network of the containers of flannel hosts (which publish no
    /// endpoints), for isolation and policy.
    #[arg(long, env = "NETD_FOREIGN_NETWORK", default_value = crate::policy::DEFAULT_NETWORK, value_parser = parse_network)]
    pub foreign_network: String,
    /// A label of the containers of flannel hosts, KEY=VALUE (repeatable).
    #[arg(long = "foreign-label", value_name = "KEY=VALUE", value_parser = crate::endpoint::labels::parse_label)]
    pub foreign_labels: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Write the network config, refusing to replace a different one.
    Init(NetworkInitArgs),
    /// Print the network config.
    Show(EtcdArgs),
}

#[derive(Debug, Args)]
pub struct NetworkInitArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Cluster network, e.g. 10.244.0.0/16.
    #[arg(long)]
    pub network: ipnet::Ipv4Net,
    #[arg(long, default_value_t = crate::control::config::DEFAULT_SUBNET_LEN)]
    pub subnet_len: u8,
    #[arg(long)]
    pub subnet_min: Option<Ipv4Addr>,
    #[arg(long)]
    pub subnet_max: Option<Ipv4Addr>,
    #[arg(long, default_value_t = crate::control::config::DEFAULT_VNI)]
    pub vni: u32,
    #[arg(long, default_value_t = crate::control::config::DEFAULT_PORT)]
    pub port: u16,
    /// Backend: vxlan, or host-gw (direct routing to every peer).
    #[arg(long, default_value = crate::control::config::VXLAN, value_parser = [crate::control::config::VXLAN, crate::control::config::HOST_GW])]
    pub backend: String,
    /// VXLAN: route directly to peers on a directly connected subnet.
    #[arg(long)]
    pub direct_routing: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Network namespace: a name under /run/netns or a path.
    pub netns: String,
    /// Address to give the container [default: the next free one].
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    /// Interface name inside the container.
    #[arg(long, default_value = "eth0")]
    pub ifname: String,
    /// A label for policy, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::endpoint::labels::parse_label)]
    pub labels: Vec<(String, String)>,
    /// The network the endpoint belongs to: endpoints of different
    /// networks are isolated unless a policy allows them.
    #[arg(long, default_value = crate::policy::DEFAULT_NETWORK, value_parser = parse_network)]
    pub network: String,
}

fn parse_network(name: &str) -> Result<String, crate::endpoint::labels::LabelError> {
    crate::endpoint::labels::check_network(name).map(|()| name.to_string())
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    pub netns: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

impl EtcdArgs {
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()])
    }

    pub fn prefix(&self) -> String {
        self.etcd_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string())
    }

    /// Endpoints, prefix and credentials; a user needs a password.
    pub fn access(&self) -> anyhow::Result<Access> {
        let user = match &self.etcd_username {
            None => None,
            Some(user) => Some((user.clone(), password(self.etcd_password_file.as_deref())?)),
        };
        Ok(Access {
            endpoints: self.endpoints(),
            prefix: self.prefix(),
            ca_cert: self.etcd_cacert.clone(),
            client_cert: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            user,
        })
    }
}

fn password(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    use anyhow::Context as _;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading etcd password file {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    std::env::var("NETD_ETCD_PASSWORD")
        .context("--etcd-username needs a password: set NETD_ETCD_PASSWORD or --etcd-password-file")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run_flags() {
        let cli = Cli::try_parse_from([
            "netd",
            "--pin-path",
            "/sys/fs/bpf/x",
            "run",
            "--etcd-endpoints",
            "http://a:2379,http://b:2379",
            "--iface",
            "eth1",
            "--public-ip",
            "198.18.0.1",
            "--decap",
            "xdp",
            "--lease-ttl",
            "10",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.etcd.endpoints(), ["http://a:2379", "http://b:2379"]);
        assert_eq!(run.decap, Some(Hook::Xdp));
        assert_eq!(cli.pin_path, PathBuf::from("/sys/fs/bpf/x"));
    }

    #[test]
    fn attach_takes_labels_and_a_network() {
        let cli = Cli::try_parse_from([
            "netd",
            "attach",
            "c1",
            "--label",
            "app=web",
            "--label",
            "tier=",
            "--network",
            "blue",
        ])
        .unwrap();
        let Command::Attach(args) = cli.command else {
            panic!("not attach")
        };
        assert_eq!(
            args.labels,
            [
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), String::new())
            ]
        );
        assert_eq!(args.network, "blue");
        let Command::Attach(args) = Cli::try_parse_from(["netd", "attach", "c1"])
            .unwrap()
            .command
        else {
            panic!("not attach")
        };
        assert_eq!((args.labels.len(), args.network.as_str()), (0, "default"));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["netd", "run", "--public-ip", "1.2.3"][..],
            &["netd", "run", "--decap", "ebpf"],
            &["netd", "run", "--lease-ttl", "-1"],
            &["netd", "attach", "ns", "--ip", "10.244.1"],
            &["netd", "attach", "ns", "--label", "app"],
            &["netd", "attach", "ns", "--label", "-app=web"],
            &["netd", "attach", "ns", "--label", "app=w b"],
            &["netd", "attach", "ns", "--network", ""],
            &["netd", "attach", "ns", "--network", "a/b"],
            &["netd", "network", "init", "--network", "10.244.0.0/33"],
            &[
                "netd",
                "network",
                "init",
                "--network",
                "10.244.0.0/16",
                "--port",
                "70000",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
