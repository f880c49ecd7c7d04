//! The `cilium-style` mode: Cilium's tunnel-mode data path as its
//! `bpf_lxc` and `bpf_overlay` programs build it, reduced to forwarding.
//!
//! ```text
//!   c0 eth0 ─ lxc0 (TC from_container: set tunnel key, bpf_redirect)
//!     ⇢ cilium_vxlan (external, kernel builds VXLAN) ⇢ eth0 ─ br0 ─ eth0
//!     ⇢ cilium_vxlan (kernel strips VXLAN; TC from_overlay: bpf_redirect_peer) ⇢ c1
//! ```
//!
//! Each host has a collect_md VXLAN device on port 8472 and a container
//! on a veth at `.2/32` of the host's subnet, whose gateway is a
//! permanent neighbour entry with the host veth's MAC (Cilium answers the
//! container's ARP from its program; the entry saves that program). The
//! programs are `bench-ebpf`, built here with the nightly toolchain and
//! loaded with aya; the maps are filled once, as the agent would from its
//! ipcache and endpoint manager. The TC filters are netlink ones and stay
//! with their devices, which go away with the testbed's namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::programs::tc::{self, NlOptions, TcAttachOptions, TcAttachType, TcHandle};
use netd_common::Endpoint;
use netd_tests::links::{link_mac, parse_mac};
use netd_tests::{NetNs, Topology, host_ip, ping};

use super::sh;
use super::testbed::{LoadedProgram, Mode, Testbed};
use crate::util;

/// Cilium's name for its tunnel device.
const TUNNEL_DEV: &str = "cilium_vxlan";
/// Host side of each container's veth (Cilium names them `lxc…`).
const HOST_VETH: &str = "lxc0";
/// The underlay's 1500 minus 50 bytes of VXLAN, as Cilium sets routes.
const CONTAINER_MTU: u32 = 1450;
/// The object's file name: the bench-ebpf binary.
const OBJECT: &str = "cilium-style";
/// Its programs and the device each is attached to: the container's veth
/// (sets the tunnel key) and the tunnel device (delivers with
/// bpf_redirect_peer).
const PROGRAMS: [(&str, &str); 2] = [("from_container", HOST_VETH), ("from_overlay", TUNNEL_DEV)];

/// Counter slots of `bench-ebpf`'s `STATS` (its `maps::Counter`).
const ENCAPSULATED: u32 = 0;
const DELIVERED_FROM_OVERLAY: u32 = 1;
const COUNTER_NAMES: [&str; 9] = [
    "encapsulated",
    "delivered_from_overlay",
    "delivered_local",
    "to_stack",
    "drop_malformed",
    "drop_bad_vni",
    "drop_ttl",
    "drop_redirect_failed",
    "drop_no_tunnel_device",
];

/// Host `i`'s container subnet: 10.244.(i+1).0/24, as the other modes.
fn subnet(i: usize) -> [u8; 4] {
    [10, 244, i as u8 + 1, 0]
}

fn with_last([a, b, c, _]: [u8; 4], last: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, last)
}

/// Container of host `i`: `.2` of its subnet.
fn container_ip(i: usize) -> Ipv4Addr {
    with_last(subnet(i), 2)
}

/// The container's gateway, `.1` (Cilium's `cilium_host` address).
fn gateway_ip(i: usize) -> Ipv4Addr {
    with_last(subnet(i), 1)
}

/// Two hosts, a container on each, the programs attached and the maps
/// filled; checked to carry a ping through both programs each way.
pub fn testbed() -> Result<Testbed> {
    let object = object()?;
    let topo = Topology::builder().hosts(2).etcd(false).build();
    let mut containers = Vec::new();
    for i in 0..2 {
        containers.push(wire_container(&topo, i)?);
    }
    let mut hosts = Vec::new();
    let mut programs = Vec::new();
    for (i, container) in containers.iter().enumerate() {
        sh(
            topo.host(i).ns(),
            &[
                "ip", "link", "add", TUNNEL_DEV, "type", "vxlan", "external", "dstport", "8472",
            ],
        )?;
        sh(topo.host(i).ns(), &["ip", "link", "set", TUNNEL_DEV, "up"])?;
        let (ebpf, ids) = load(&topo, i, container, &object)?;
        hosts.push(ebpf);
        programs.extend(ids);
    }
    check_path(&containers[0], &hosts)?;
    Ok(
        Testbed::with_containers(Mode::CiliumStyle, topo, containers, container_ip(1))
            .with_programs(programs),
    )
}

/// A veth from host `i` into a new container: `.2/32` inside, a link
/// route to the gateway and the gateway's MAC as a permanent entry.
fn wire_container(topo: &Topology, i: usize) -> Result<NetNs> {
    let host = topo.host(i).ns().handle();
    let ns = topo.add_container(i);
    let c = ns.handle();
    let mtu = CONTAINER_MTU.to_string();
    sh(
        &host,
        &[
            "ip",
            "link",
            "add",
            HOST_VETH,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu,
            "netns",
            c.name(),
        ],
    )?;
    sh(&host, &["ip", "link", "set", HOST_VETH, "up"])?;
    let ip = format!("{}/32", container_ip(i));
    let gw = gateway_ip(i).to_string();
    let host_mac = link_mac(&host, HOST_VETH);
    sh(&c, &["ip", "addr", "add", &ip, "dev", "eth0"])?;
    sh(&c, &["ip", "link", "set", "eth0", "up"])?;
    sh(
        &c,
        &["ip", "route", "add", &gw, "dev", "eth0", "scope", "link"],
    )?;
    sh(
        &c,
        &["ip", "route", "add", "default", "via", &gw, "dev", "eth0"],
    )?;
    sh(
        &c,
        &[
            "ip",
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    Ok(ns)
}

/// What one host's maps hold.
struct HostMaps {
    tunnel_ifindex: u32,
    endpoint: ([u8; 4], Endpoint),
    /// Remote subnets (/24) → the owner's underlay address.
    tunnels: Vec<([u8; 4], [u8; 4])>,
}

/// Loads the object in host `i`, attaches both programs and fills the
/// maps. The returned object keeps the maps open for [`counters`]; the
/// ids are those of the attached programs, which outlive it.
fn load(
    topo: &Topology,
    i: usize,
    container: &NetNs,
    object: &Path,
) -> Result<(Ebpf, Vec<LoadedProgram>)> {
    let host = topo.host(i).ns().handle();
    let maps = HostMaps {
        tunnel_ifindex: 0,
        endpoint: (
            container_ip(i).octets(),
            Endpoint {
                ifindex: 0,
                mac: parse_mac(&link_mac(&container.handle(), "eth0")),
                host_mac: parse_mac(&link_mac(&host, HOST_VETH)),
            },
        ),
        tunnels: (0..2)
            .filter(|&j| j != i)
            .map(|j| (subnet(j), host_ip(j).octets()))
            .collect(),
    };
    let object = object.to_path_buf();
    // Interface names and netlink resolve in the calling thread's namespace.
    let (ebpf, ids) = host
        .run_in_thread(move || load_here(&object, maps))
        .with_context(|| format!("cilium-style programs on host {i}"))?;
    let programs = PROGRAMS
        .iter()
        .zip(ids)
        .map(|(&(name, _), id)| LoadedProgram { host: i, name, id })
        .collect();
    Ok((ebpf, programs))
}

fn load_here(object: &Path, mut maps: HostMaps) -> Result<(Ebpf, Vec<u32>)> {
    maps.tunnel_ifindex = ifindex(TUNNEL_DEV)?;
    maps.endpoint.1.ifindex = ifindex(HOST_VETH)?;
    let mut ebpf =
        Ebpf::load_file(object).with_context(|| format!("loading {}", object.display()))?;
    fill_maps(&mut ebpf, &maps)?;
    let ids = PROGRAMS
        .iter()
        .map(|&(program, iface)| attach(&mut ebpf, program, iface))
        .collect::<Result<_>>()?;
    Ok((ebpf, ids))
}

fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("no interface {name}"))
}

fn fill_maps(ebpf: &mut Ebpf, maps: &HostMaps) -> Result<()> {
    let mut dev: Array<_, u32> = Array::try_from(map(ebpf, "TUNNEL_DEVICE")?)?;
    dev.set(0, maps.tunnel_ifindex, 0)?;
    let mut endpoints: HashMap<_, [u8; 4], Endpoint> = HashMap::try_from(map(ebpf, "ENDPOINTS")?)?;
    endpoints.insert(maps.endpoint.0, maps.endpoint.1, 0)?;
    let mut tunnels: LpmTrie<_, [u8; 4], [u8; 4]> = LpmTrie::try_from(map(ebpf, "TUNNELS")?)?;
    for (net, remote) in &maps.tunnels {
        tunnels.insert(&Key::new(24, *net), *remote, 0)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

/// `program` on `iface`'s TC ingress as a netlink filter, which stays when
/// this process lets go of it; returns the program's kernel id.
fn attach(ebpf: &mut Ebpf, program: &str, iface: &str) -> Result<u32> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("program {program} missing from the object"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("loading program {program}"))?;
    let id = prog
        .info()
        .with_context(|| format!("id of program {program}"))?
        .id();
    tc::qdisc_add_clsact(iface).with_context(|| format!("clsact on {iface}"))?;
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: 1,
        handle: TcHandle::new(0, 1),
        classid: None,
    });
    let link = prog
        .attach_with_options(iface, TcAttachType::Ingress, options)
        .with_context(|| format!("attaching {program} to {iface}"))?;
    // Dropping the link would detach it: the device keeps it instead.
    std::mem::forget(prog.take_link(link)?);
    Ok(id)
}

/// The counters of one host, summed over CPUs, by slot.
fn counters(ebpf: &Ebpf) -> Result<Vec<u64>> {
    let stats = ebpf
        .map("STATS")
        .ok_or_else(|| anyhow!("map STATS missing from the object"))?;
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(stats)?;
    (0..COUNTER_NAMES.len() as u32)
        .map(|slot| Ok(stats.get(&slot, 0)?.iter().sum()))
        .collect()
}

fn describe(counters: &[u64]) -> String {
    COUNTER_NAMES
        .iter()
        .zip(counters)
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A ping from container 0 to container 1 must be encapsulated by the
/// programs of one host and delivered by the other's, both ways: nothing
/// else routes the containers' subnets, but a mode that only seems to
/// work is worse than one that fails.
fn check_path(client: &NetNs, hosts: &[Ebpf]) -> Result<()> {
    let before: Vec<Vec<u64>> = hosts.iter().map(counters).collect::<Result<_>>()?;
    if !ping(&client.handle(), container_ip(1), 3) {
        bail!(
            "{} does not answer ping; counters: host0 {}; host1 {}",
            container_ip(1),
            describe(&before[0]),
            describe(&before[1])
        );
    }
    let after: Vec<Vec<u64>> = hosts.iter().map(counters).collect::<Result<_>>()?;
    let grew = |h: usize, slot: u32| after[h][slot as usize] > before[h][slot as usize];
    for (from, to) in [(0, 1), (1, 0)] {
        if !grew(from, ENCAPSULATED) || !grew(to, DELIVERED_FROM_OVERLAY) {
            bail!(
                "ping from host{from}'s container to host{to}'s did not go through the programs; \
                 counters: host0 {}; host1 {}",
                describe(&after[0]),
                describe(&after[1])
            );
        }
    }
    Ok(())
}

/// The object, built once per run with the toolchain netd's eBPF crate
/// uses (nightly, `-Z build-std=core`, bpf-linker): as aya-build does, but
/// from here, so that it stays out of netd's build.
fn object() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_object().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building bench-ebpf: {e}"))
}

fn build_object() -> Result<PathBuf> {
    if util::which("bpf-linker").is_none() {
        bail!("bpf-linker not found: run `cargo xtask setup`");
    }
    let target_dir = util::target_dir().join("bench-ebpf");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(util::workspace_root())
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "bench-ebpf",
        ])
        .args(["-Z", "build-std=core", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        // The outer cargo's compiler is stable's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    println!("==> build bench-ebpf (cilium-style programs)");
    util::run(&mut cmd)?;
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join(OBJECT);
    if !object.is_file() {
        bail!("{} was not built", object.display());
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_other_modes() {
        assert_eq!(container_ip(1), Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(gateway_ip(0), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(subnet(1), [10, 244, 2, 0]);
    }

    #[test]
    fn counters_are_described_by_name_when_nonzero() {
        let mut c = vec![0; COUNTER_NAMES.len()];
        c[ENCAPSULATED as usize] = 3;
        c[DELIVERED_FROM_OVERLAY as usize] = 2;
        assert_eq!(describe(&c), "encapsulated 3, delivered_from_overlay 2");
    }
}
