//! One testbed per mode: two hosts on the simulated underlay and, except
//! for `bare`, a container on each. Built from the tests crate's guards
//! (Topology, Cluster, NetNs), so every namespace and process goes away
//! when the testbed is dropped, also while a panic unwinds.
//!
//! ```text
//!   bare:          host0 eth0 ─ br0 ─ eth0 host1
//!   routed:        c0 ─ cni0 ⇢ route via 198.18.0.2 ⇢ eth0 ─ br0 ─ eth0 ⇢ cni0 ─ c1
//!   kernel-vxlan:  c0 ─ cni0 ⇢ flannel.1 (VXLAN) ⇢ eth0 ─ br0 ─ eth0 ⇢ flannel.1 ⇢ cni0 ─ c1
//!   netd-vxlan-*:  c0 ─ veth (TC from_container) ⇢ eth0 ─ br0 ─ eth0 (XDP/TC decap) ⇢ c1
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netd_tests::flannel::{self, VXLAN_MTU as FLANNEL_MTU};
use netd_tests::{Cluster, NetNs, NsRef, Topology, host_ip, ping};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::results::{IfaceRecord, PathRecord};
use super::sh;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Bare,
    Routed,
    KernelVxlan,
    NetdTc,
    NetdXdp,
    EgressPlain,
    EgressNat,
    CiliumStyle,
}

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::Bare,
        Mode::Routed,
        Mode::KernelVxlan,
        Mode::NetdTc,
        Mode::NetdXdp,
        Mode::EgressPlain,
        Mode::EgressNat,
        Mode::CiliumStyle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::Routed => "routed",
            Mode::KernelVxlan => "kernel-vxlan",
            Mode::NetdTc => "netd-vxlan-tc",
            Mode::NetdXdp => "netd-vxlan-xdp",
            Mode::EgressPlain => "netd-egress-plain",
            Mode::EgressNat => "netd-egress-nat",
            Mode::CiliumStyle => "cilium-style",
        }
    }

    pub fn parse(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode {s:?} (one of {})", names.join(", "))
            })
    }

    pub fn description(self) -> &'static str {
        match self {
            Mode::Bare => "host to host on the underlay, no containers",
            Mode::Routed => "flannel host-gw: cni0 bridge, kernel routes via the peer host",
            Mode::KernelVxlan => "flannel vxlan: cni0 bridge, flannel.1 VXLAN device",
            Mode::NetdTc => "netd, TC decapsulation",
            Mode::NetdXdp => "netd, XDP decapsulation",
            Mode::EgressPlain => {
                "netd container to a host outside the cluster, routed back by the switch, no NAT"
            }
            Mode::EgressNat => "netd container to a host outside the cluster, --ip-masq",
            Mode::CiliumStyle => {
                "Cilium tunnel mode: TC programs, collect_md VXLAN device, bpf_redirect_peer"
            }
        }
    }

    pub fn is_netd(self) -> bool {
        matches!(self, Mode::NetdTc | Mode::NetdXdp)
    }
}

/// Host side of a flannel-style container's veth.
const HOST_VETH: &str = "vethc0";

/// The pod subnet of host `i` in the flannel-style modes: 10.244.(i+1).0/24.
fn pod_subnet(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 0)
}

/// [`pod_subnet`] with its length, as flannel writes a lease's subnet.
fn pod_net(i: usize) -> String {
    format!("{}/24", pod_subnet(i))
}

fn with_last(ip: Ipv4Addr, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = ip.octets();
    Ipv4Addr::new(a, b, c, last)
}

/// A BPF program a testbed loaded itself (netd's are found by their pins),
/// by its kernel id: what the live run-time figures are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedProgram {
    pub host: usize,
    pub name: &'static str,
    pub id: u32,
}

pub struct Testbed {
    pub mode: Mode,
    /// Where the clients run and where the servers listen.
    pub client: NsRef,
    pub server: NsRef,
    pub server_ip: Ipv4Addr,
    pub path: PathRecord,
    programs: Vec<LoadedProgram>,
    // Dropped in this order: containers, daemons, then the underlay.
    containers: Vec<NetNs>,
    cluster: Option<Cluster>,
    topo: Option<Topology>,
}

impl Testbed {
    /// Builds `mode`'s testbed and checks that the client reaches the server.
    pub fn build(mode: Mode) -> Result<Testbed> {
        let mut tb = match mode {
            Mode::Bare => bare(),
            Mode::Routed | Mode::KernelVxlan => flannel_style(mode)?,
            Mode::NetdTc => netd("tc")?,
            Mode::NetdXdp => netd("xdp")?,
            Mode::EgressPlain => egress(false)?,
            Mode::EgressNat => egress(true)?,
            Mode::CiliumStyle => super::cilium_style::testbed()?,
        };
        if !ping(&tb.client, tb.server_ip, 3) {
            bail!("{}: {} does not answer ping", mode.name(), tb.server_ip);
        }
        tb.path = tb.record_path()?;
        Ok(tb)
    }

    /// A testbed of containers on `topo` wired by a mode's own module.
    pub(super) fn with_containers(
        mode: Mode,
        topo: Topology,
        containers: Vec<NetNs>,
        server_ip: Ipv4Addr,
    ) -> Testbed {
        Testbed {
            mode,
            client: containers[0].handle(),
            server: containers[1].handle(),
            server_ip,
            path: PathRecord::default(),
            programs: Vec::new(),
            containers,
            cluster: None,
            topo: Some(topo),
        }
    }

    /// A testbed wired elsewhere (the policy runs label their containers
    /// and wire Calico-style ones); checked and recorded as [`Testbed::build`]
    /// does.
    pub fn assemble(
        mode: Mode,
        client: NsRef,
        server: NsRef,
        server_ip: Ipv4Addr,
        containers: Vec<NetNs>,
        cluster: Option<Cluster>,
        topo: Option<Topology>,
    ) -> Result<Testbed> {
        let mut tb = Testbed {
            mode,
            client,
            server,
            server_ip,
            path: PathRecord::default(),
            programs: Vec::new(),
            containers,
            cluster,
            topo,
        };
        if !ping(&tb.client, tb.server_ip, 3) {
            bail!("{}: {} does not answer ping", mode.name(), tb.server_ip);
        }
        tb.path = tb.record_path()?;
        Ok(tb)
    }

    /// With the programs the mode's own module loaded.
    pub(super) fn with_programs(mut self, programs: Vec<LoadedProgram>) -> Testbed {
        self.programs = programs;
        self
    }

    /// Programs the testbed loaded itself (none in the netd modes).
    pub fn programs(&self) -> &[LoadedProgram] {
        &self.programs
    }

    /// The netd cluster, in the netd modes.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    pub fn describe_path(&self) -> Result<PathRecord> {
        Ok(self.path.clone())
    }

    /// MTU of the client's interface.
    pub fn path_mtu(&self) -> u64 {
        self.path
            .interfaces
            .iter()
            .find(|i| i.ns == self.client.name())
            .map_or(0, |i| i.mtu)
    }

    fn topology(&self) -> &Topology {
        match (&self.cluster, &self.topo) {
            (Some(c), _) => &c.topo,
            (None, Some(t)) => t,
            (None, None) => unreachable!("a testbed always has a topology"),
        }
    }

    /// Every namespace with its role in the path.
    fn roles(&self) -> Vec<(String, NsRef)> {
        let topo = self.topology();
        let mut roles = vec![("switch".to_string(), topo.switch().handle())];
        for host in topo.hosts() {
            roles.push((format!("host{}", host.index()), host.ns().handle()));
        }
        let containers: Vec<NsRef> = match &self.cluster {
            Some(c) => c.containers.iter().map(|c| c.ns.handle()).collect(),
            None => self.containers.iter().map(|c| c.handle()).collect(),
        };
        for (i, ns) in containers.into_iter().enumerate() {
            roles.push((format!("container{i}"), ns));
        }
        roles
    }

    /// MTU, link details and offloads of every interface, and the sysctls
    /// that change the path, in every namespace of the testbed.
    fn record_path(&self) -> Result<PathRecord> {
        let mut path = PathRecord::default();
        for (role, ns) in self.roles() {
            let links: Vec<Value> =
                serde_json::from_str(&sh(&ns, &["ip", "-j", "-d", "link", "show"])?)
                    .context("ip -j -d link show")?;
            for link in links {
                let ifname = link["ifname"].as_str().unwrap_or_default().to_string();
                if ifname == "lo" {
                    continue;
                }
                let offloads = parse_ethtool_k(&sh(&ns, &["ethtool", "-k", &ifname])?);
                path.interfaces.push(IfaceRecord {
                    role: role.clone(),
                    ns: ns.name().to_string(),
                    mtu: link["mtu"].as_u64().unwrap_or(0),
                    kind: link["linkinfo"]["info_kind"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    xdp: link.get("xdp").cloned(),
                    ifname,
                    offloads,
                });
            }
            path.sysctls.insert(role, read_sysctls(&ns));
        }
        Ok(path)
    }
}

/// `feature: on|off [fixed]` lines of `ethtool -k`.
pub fn parse_ethtool_k(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/rp_filter",
    "net/bridge/bridge-nf-call-iptables",
    "net/core/rmem_max",
    "net/core/wmem_max",
];

/// Per-namespace sysctls, read from a thread inside the namespace.
fn read_sysctls(ns: &NsRef) -> BTreeMap<String, String> {
    ns.run_in_thread(|| {
        SYSCTLS
            .iter()
            .map(|key| {
                let value = std::fs::read_to_string(format!("/proc/sys/{key}"))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_else(|_| "-".into());
                (key.replace('/', "."), value)
            })
            .collect()
    })
}

fn plain_topology() -> Topology {
    Topology::builder().hosts(2).etcd(false).build()
}

fn bare() -> Testbed {
    let topo = plain_topology();
    Testbed {
        mode: Mode::Bare,
        client: topo.host(0).ns().handle(),
        server: topo.host(1).ns().handle(),
        server_ip: host_ip(1),
        path: PathRecord::default(),
        programs: Vec::new(),
        containers: Vec::new(),
        cluster: None,
        topo: Some(topo),
    }
}

/// flannel's host-gw (routed) or vxlan backend, set up as flannel and its
/// bridge CNI plugin do it.
fn flannel_style(mode: Mode) -> Result<Testbed> {
    let topo = plain_topology();
    let mtu = if mode == Mode::KernelVxlan {
        FLANNEL_MTU
    } else {
        1500
    };
    let mut containers = Vec::new();
    for i in 0..2 {
        containers.push(cni_container(&topo, i, mtu)?);
    }
    if mode == Mode::KernelVxlan {
        flannel_vxlan(&topo)?;
    } else {
        host_gw_routes(&topo)?;
    }
    Ok(Testbed {
        mode,
        client: containers[0].handle(),
        server: containers[1].handle(),
        server_ip: with_last(pod_subnet(1), 2),
        path: PathRecord::default(),
        programs: Vec::new(),
        containers,
        cluster: None,
        topo: Some(topo),
    })
}

/// Host `i`: a container on the flannel CNI plugin's bridge, at .2 of the
/// host's pod subnet (see [`flannel::add_cni_container`]).
fn cni_container(topo: &Topology, i: usize, mtu: u32) -> Result<NetNs> {
    let ns = topo.add_container(i);
    flannel::add_cni_container(topo.host(i).ns(), &ns, HOST_VETH, &pod_net(i), mtu);
    Ok(ns)
}

/// host-gw: each host routes the other's subnet via its underlay address.
fn host_gw_routes(topo: &Topology) -> Result<()> {
    for (i, j) in [(0, 1), (1, 0)] {
        flannel::add_direct_peer(topo.host(i).ns(), &pod_net(j), &host_ip(j).to_string());
    }
    Ok(())
}

/// flannel's vxlan backend: flannel.1 with the subnet's .0/32, and per
/// remote host an onlink route, a permanent ARP entry and an FDB entry.
fn flannel_vxlan(topo: &Topology) -> Result<()> {
    let vtep_macs: Vec<String> = (0..2)
        .map(|i| flannel::add_vxlan_device(topo.host(i).ns(), host_ip(i), &pod_net(i)))
        .collect();
    for (i, j) in [(0, 1), (1, 0)] {
        flannel::add_vxlan_peer(
            topo.host(i).ns(),
            &pod_net(j),
            &vtep_macs[j],
            &host_ip(j).to_string(),
        );
    }
    Ok(())
}

/// A netd host whose container sends to the outside namespace behind the
/// switch: masqueraded with `--ip-masq`, otherwise with its own address
/// and a route on the switch that brings the replies back. No VXLAN is
/// involved, so the decap filter comes off the underlay in both (it would
/// drop the plain replies as unknown-peer traffic), with the daemon
/// stopped so that it does not put the filter back; the two then differ
/// only by conntrack and the NAT.
fn egress(masquerade: bool) -> Result<Testbed> {
    let topo = Topology::builder().hosts(1).outside(true).build();
    let endpoint = topo.etcd_endpoint();
    topo.host(0).netd_ok(&[
        "network",
        "init",
        "--etcd-endpoints",
        &endpoint,
        "--network",
        "10.244.0.0/16",
    ]);
    let mut cluster = Cluster::on_topology(topo, "tc");
    if masquerade {
        cluster.run_args(&["--ip-masq"]);
    }
    cluster.start(0);
    let c0 = cluster.attach(0);
    if !masquerade {
        let subnet = cluster.subnet(0);
        let via = host_ip(0).to_string();
        sh(
            cluster.topo.switch(),
            &["ip", "route", "add", &subnet, "via", &via],
        )?;
    }
    // Stopped first: a running daemon puts a missing attachment back at
    // once. The pinned data path and the nftables table stay and forward.
    cluster.stop(0);
    sh(
        cluster.host(0).ns(),
        &["tc", "filter", "del", "dev", "eth0", "ingress"],
    )?;
    Ok(Testbed {
        mode: if masquerade {
            Mode::EgressNat
        } else {
            Mode::EgressPlain
        },
        client: cluster.container(c0).ns.handle(),
        server: cluster.topo.outside().handle(),
        server_ip: netd_tests::topology::OUTSIDE_IP,
        path: PathRecord::default(),
        programs: Vec::new(),
        containers: Vec::new(),
        cluster: Some(cluster),
        topo: None,
    })
}

/// netd daemons on both hosts, a container attached on each.
fn netd(decap: &str) -> Result<Testbed> {
    let mut cluster = Cluster::up(2, decap);
    let c0 = cluster.attach(0);
    let c1 = cluster.attach(1);
    for host in 0..2 {
        cluster.wait_peers_match_etcd(host, Duration::from_secs(15));
    }
    let mode = if decap == "xdp" {
        Mode::NetdXdp
    } else {
        Mode::NetdTc
    };
    Ok(Testbed {
        mode,
        client: cluster.container(c0).ns.handle(),
        server: cluster.container(c1).ns.handle(),
        server_ip: cluster.container(c1).ip,
        path: PathRecord::default(),
        programs: Vec::new(),
        containers: Vec::new(),
        cluster: Some(cluster),
        topo: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()), Ok(m));
        }
        assert!(Mode::parse("flannel").is_err());
    }

    #[test]
    fn parses_ethtool_features() {
        let text = "Features for eth0:\nrx-checksumming: on\ntx-checksumming: on\n\
                    \ttx-checksum-ipv4: off [fixed]\ngeneric-receive-offload: off\n";
        let f = parse_ethtool_k(text);
        assert_eq!(f["tx-checksum-ipv4"], "off [fixed]");
        assert_eq!(f["generic-receive-offload"], "off");
        assert!(!f.contains_key("Features for eth0"));
    }
}
