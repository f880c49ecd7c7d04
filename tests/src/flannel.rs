//! A host set up the way flannel sets up a node, without flanneld: its
//! vxlan backend's `flannel.1` and the routes, neighbour and FDB entries it
//! programs per peer, its host-gw routes, and the flannel CNI plugin's
//! `cni0` bridge with a container on it. Interop tests put such a host next
//! to netd hosts; the benchmarks measure it against netd.

use std::net::Ipv4Addr;

use crate::NsRef;
use crate::links::link_mac;

/// flannel's VXLAN device.
pub const VXLAN_DEV: &str = "flannel.1";
/// The flannel CNI plugin's bridge.
pub const CNI_BRIDGE: &str = "cni0";
/// The underlay's 1500 minus the 50 bytes of VXLAN encapsulation.
pub const VXLAN_MTU: u32 = 1450;

/// Runs a command line (split on whitespace) in `ns`; returns stdout.
fn sh(ns: &NsRef, cmd: &str) -> String {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    ns.run_ok(&argv)
}

/// `a.b.c.0/24` → `a.b.c.<last>`.
pub fn subnet_addr(subnet: &str, last: u8) -> Ipv4Addr {
    let net: Ipv4Addr = subnet
        .split_once('/')
        .map_or(subnet, |(a, _)| a)
        .parse()
        .unwrap_or_else(|e| panic!("subnet {subnet}: {e}"));
    let [a, b, c, _] = net.octets();
    Ipv4Addr::new(a, b, c, last)
}

/// flanneld's vxlan backend on a host holding `subnet`: `flannel.1` (VNI 1,
/// port 8472, `local` the host's public IP, no learning), MTU 1450, up, with
/// the subnet's `.0/32`. Returns its MAC, which flannel publishes as the
/// lease's VtepMAC.
pub fn add_vxlan_device(host: &NsRef, public_ip: Ipv4Addr, subnet: &str) -> String {
    sh(
        host,
        &format!(
            "ip link add {VXLAN_DEV} type vxlan id 1 dstport 8472 local {public_ip} dev eth0 \
             nolearning"
        ),
    );
    sh(host, &format!("ip link set {VXLAN_DEV} mtu {VXLAN_MTU}"));
    sh(host, &format!("ip link set {VXLAN_DEV} up"));
    let net0 = subnet_addr(subnet, 0);
    sh(host, &format!("ip addr add {net0}/32 dev {VXLAN_DEV}"));
    link_mac(host, VXLAN_DEV)
}

/// What the flannel CNI plugin (bridge) does for a pod of `subnet`: `cni0`
/// with `.1/24`, a veth `host_veth` on it whose peer is `eth0` of
/// `container` with `.2/24` and a default route via `.1`, all with `mtu`;
/// and `ip_forward=1`. Returns the container's address.
pub fn add_cni_container(
    host: &NsRef,
    container: &NsRef,
    host_veth: &str,
    subnet: &str,
    mtu: u32,
) -> Ipv4Addr {
    let gw = subnet_addr(subnet, 1);
    let ip = subnet_addr(subnet, 2);
    host.sysctl("net.ipv4.ip_forward", "1");
    sh(
        host,
        &format!("ip link add {CNI_BRIDGE} mtu {mtu} type bridge"),
    );
    sh(host, &format!("ip addr add {gw}/24 dev {CNI_BRIDGE}"));
    sh(host, &format!("ip link set {CNI_BRIDGE} up"));
    sh(
        host,
        &format!(
            "ip link add {host_veth} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {}",
            container.name()
        ),
    );
    sh(
        host,
        &format!("ip link set {host_veth} master {CNI_BRIDGE} up"),
    );
    sh(container, &format!("ip addr add {ip}/24 dev eth0"));
    sh(container, "ip link set eth0 up");
    sh(container, &format!("ip route add default via {gw}"));
    ip
}

/// What flanneld's vxlan backend does for a peer's lease: a route to its
/// subnet via the subnet's `.0` on-link on `flannel.1`, a permanent
/// neighbour entry for that `.0` with the peer's VtepMAC, and an FDB entry
/// sending that MAC to the peer's public IP.
pub fn add_vxlan_peer(host: &NsRef, subnet: &str, vtep_mac: &str, public_ip: &str) {
    let net0 = subnet_addr(subnet, 0);
    sh(
        host,
        &format!("ip route replace {subnet} via {net0} dev {VXLAN_DEV} onlink"),
    );
    sh(
        host,
        &format!("ip neigh replace {net0} lladdr {vtep_mac} dev {VXLAN_DEV} nud permanent"),
    );
    sh(
        host,
        &format!("bridge fdb append {vtep_mac} dev {VXLAN_DEV} dst {public_ip}"),
    );
}

/// What flannel's host-gw backend (and vxlan's DirectRouting for a peer on
/// the same segment) does for a peer: a route to its subnet via its public
/// IP on eth0.
pub fn add_direct_peer(host: &NsRef, subnet: &str, public_ip: &str) {
    sh(
        host,
        &format!("ip route replace {subnet} via {public_ip} dev eth0"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_a_subnet() {
        assert_eq!(
            subnet_addr("10.244.200.0/24", 0),
            Ipv4Addr::new(10, 244, 200, 0)
        );
        assert_eq!(
            subnet_addr("10.244.200.0/24", 2),
            Ipv4Addr::new(10, 244, 200, 2)
        );
        assert_eq!(subnet_addr("10.244.7.0", 1), Ipv4Addr::new(10, 244, 7, 1));
    }
}
