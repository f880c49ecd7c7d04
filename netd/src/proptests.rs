//! Property tests of every parser of outside data: whatever etcd, a config
//! file or a command line holds, parsing returns a value or an error and
//! never panics; what netd writes parses back to the same value.

use std::net::Ipv4Addr;

use clap::Parser as _;
use ipnet::Ipv4Net;
use proptest::prelude::*;

use crate::{
    cli::Cli,
    control::config::{FileConfig, NetworkConfig},
    control::lease::{LeaseValue, Mac, parse_subnet_key, subnet_key},
    state::SubnetEnv,
};

fn json_fragment() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[ -~]{0,12}\"",
        Just("\"vxlan\"".to_string()),
        Just("\"10.244.0.0/16\"".to_string()),
        Just("\"0e:6e:c6:12:00:01\"".to_string()),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let key = prop_oneof![
            Just("Network"),
            Just("SubnetLen"),
            Just("SubnetMin"),
            Just("SubnetMax"),
            Just("Backend"),
            Just("Type"),
            Just("VNI"),
            Just("Port"),
            Just("PublicIP"),
            Just("BackendType"),
            Just("BackendData"),
            Just("VtepMAC"),
            Just("x"),
        ];
        prop::collection::vec((key, inner), 0..5).prop_map(|fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        })
    })
}

proptest! {
    #[test]
    fn lease_values_never_panic(json in json_fragment(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = LeaseValue::parse(json.as_bytes());
        let _ = LeaseValue::parse(&bytes);
    }

    #[test]
    fn network_configs_never_panic(json in json_fragment(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(cfg) = NetworkConfig::parse(json.as_bytes()) {
            // A config that validates can be enumerated without overflow.
            let first = cfg.nth_leasable(0);
            prop_assert!(first.is_some_and(|s| cfg.is_leasable(&s)));
            prop_assert!(cfg.nth_leasable(cfg.leasable_count() - 1).is_some());
            prop_assert!(cfg.nth_leasable(cfg.leasable_count()).is_none());
        }
        let _ = NetworkConfig::parse(&bytes);
    }

    #[test]
    fn allocation_stays_in_range(prefix in 0u8..=28, extra in 1u8..=8, seed in any::<u64>(), taken in 0usize..6) {
        use rand::SeedableRng as _;
        let len = (prefix + extra).min(30);
        prop_assume!(len > prefix);
        let json = format!(r#"{{"Network":"10.0.0.0/{prefix}","SubnetLen":{len}}}"#);
        let cfg = NetworkConfig::parse(json.as_bytes()).unwrap();
        let existing: Vec<(Ipv4Net, Option<Ipv4Addr>)> =
            (0..taken as u32).filter_map(|n| cfg.nth_leasable(n)).map(|s| (s, None)).collect();
        let claim = crate::control::lease::Claim { public_ip: Ipv4Addr::LOCALHOST, recorded: None, existing: &existing };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        match crate::control::lease::choose(&cfg, &claim, &mut rng) {
            crate::control::lease::Choice::Create(s) => {
                prop_assert!(cfg.is_leasable(&s));
                prop_assert!(!existing.iter().any(|(e, _)| *e == s));
            }
            crate::control::lease::Choice::Exhausted => prop_assert!(cfg.leasable_count() as usize <= existing.len()),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn subnet_keys_never_panic(key in "[0-9.\\-a-z]{0,24}") {
        if let Ok(net) = parse_subnet_key(&key) {
            prop_assert_eq!(parse_subnet_key(&subnet_key(net)).unwrap(), net);
        }
    }

    #[test]
    fn subnet_keys_round_trip(addr in any::<u32>(), len in 0u8..=32) {
        let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
        prop_assert_eq!(parse_subnet_key(&subnet_key(net)).unwrap(), net);
    }

    #[test]
    fn lease_values_round_trip(ip in any::<u32>(), vni in 0u32..(1 << 24), mac in any::<[u8; 6]>()) {
        let mac = Mac([mac[0] & 0xfe, mac[1], mac[2], mac[3], mac[4], mac[5]]);
        let value = LeaseValue::vxlan(Ipv4Addr::from(ip), vni, mac);
        let (parsed, parsed_mac) = LeaseValue::parse(value.to_json().as_bytes()).unwrap();
        prop_assert_eq!(parsed, value);
        prop_assert_eq!(parsed_mac, Some(mac));
    }

    #[test]
    fn macs_never_panic(text in "[0-9a-fA-F:xz]{0,20}") {
        if let Ok(mac) = text.parse::<Mac>() {
            prop_assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        }
    }

    #[test]
    fn config_files_never_panic(text in "[a-z\\-=\\[\\]\"0-9.:/ \\n]{0,80}") {
        let _ = FileConfig::parse(&text);
    }

    #[test]
    fn subnet_env_never_panics(text in "(NETD_[A-Z]{2,8}=[0-9./a-z]{0,18}\\n){0,5}") {
        let _ = SubnetEnv::parse(&text);
    }

    #[test]
    fn cli_never_panics(args in prop::collection::vec(prop_oneof![
        Just("run".to_string()), Just("attach".to_string()), Just("status".to_string()),
        Just("network".to_string()), Just("init".to_string()), Just("--ip".to_string()),
        Just("--decap".to_string()), Just("--lease-ttl".to_string()), Just("--network".to_string()),
        Just("--etcd-endpoints".to_string()), Just("--port".to_string()), "[ -~]{0,12}",
    ], 0..6)) {
        let _ = Cli::try_parse_from(std::iter::once("netd".to_string()).chain(args));
    }
}
