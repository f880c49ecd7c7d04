//! Leases as they stand in etcd: flannel's key and value format, and the
//! VTEP MAC netd derives from a public IP.

use std::net::Ipv4Addr;

use crate::cluster::PREFIX;

/// `0e:6e:` + the four bytes of the public IP, as netd derives VTEP MACs.
pub fn vtep_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("0e:6e:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
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
