//! Leases as they stand in etcd: flannel's key and value format, and the
//! VTEP MAC netd derives from a public IP.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::Etcd;
use crate::cluster::PREFIX;

/// `0e:6e:` + the four bytes of the public IP, as netd derives VTEP MACs.
pub fn vtep_mac_bytes(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x0e, 0x6e, a, b, c, d]
}

/// [`vtep_mac_bytes`] as `ip` prints a MAC: `0e:6e:c6:12:00:0a`.
pub fn vtep_mac(ip: Ipv4Addr) -> String {
    let m = vtep_mac_bytes(ip);
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `10.244.7.0/24` → `/netd/network/subnets/10.244.7.0-24`.
pub fn lease_key(subnet: &str) -> String {
    format!("{PREFIX}/subnets/{}", subnet.replacen('/', "-", 1))
}

/// A lease value exactly as netd (and flannel) writes it (VNI 1).
pub fn lease_value(public_ip: Ipv4Addr) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        vtep_mac(public_ip)
    )
}

/// Valid leases in `etcd`: subnet (`a.b.c.d/len`) → PublicIP; values that
/// do not parse are left out.
pub fn leases_in(etcd: &Etcd) -> BTreeMap<String, String> {
    etcd.get_prefix(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .filter_map(|kv| {
            let key = kv.key.rsplit('/').next()?.replacen('-', "/", 1);
            let value: Value = serde_json::from_str(&kv.value).ok()?;
            Some((key, value["PublicIP"].as_str()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_key_and_value() {
        let ip = Ipv4Addr::new(198, 18, 0, 10);
        assert_eq!(vtep_mac(ip), "0e:6e:c6:12:00:0a");
        assert_eq!(
            lease_key("10.244.7.0/24"),
            "/netd/network/subnets/10.244.7.0-24"
        );
        assert_eq!(
            lease_value(ip),
            r#"{"PublicIP":"198.18.0.10","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:6e:c6:12:00:0a"}}"#
        );
    }
}
