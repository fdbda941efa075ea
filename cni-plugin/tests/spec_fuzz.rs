//! Property tests of the parsers that take a container runtime's input (stdin JSON, CNI_ARGS,
//! prevResult): whatever arrives, they answer with a value or a CNI error, never a panic, and
//! an accepted prevResult converts to every version and back without losing its addresses.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use zmesh_cni::spec::{CniArgs, CniVersion, NetConf, PrevResult};

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("0.3.1"),
            Just("0.4.0"),
            Just("1.0.0"),
            Just("1.1.0"),
            Just("10.244.1.5/24")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("cniVersion".to_string()),
                    Just("ips".to_string()),
                    Just("address".to_string()),
                    Just("interfaces".to_string()),
                    Just("prevResult".to_string()),
                    Just("exclude_namespaces".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #[test]
    fn stdin_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = NetConf::decode(&bytes);
    }

    #[test]
    fn stdin_json_never_panics(v in json_value()) {
        let _ = NetConf::decode(v.to_string().as_bytes());
    }

    #[test]
    fn cni_args_never_panic(raw in "[A-Za-z0-9_=;.-]{0,80}") {
        let _ = CniArgs::parse(&raw);
    }

    #[test]
    fn prev_result_never_panics_and_keeps_addresses(v in json_value()) {
        if let Value::Object(map) = v
            && let Ok(prev) = PrevResult::parse(map)
        {
            let addrs = prev.addresses();
            for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
                let version = CniVersion::from_declared(version).unwrap();
                let out = prev.to_version(version);
                let back = PrevResult::parse(out.as_object().unwrap().clone()).unwrap();
                prop_assert_eq!(back.addresses(), addrs.clone());
            }
        }
    }
}

/// A valid prevResult in any version's shape, with arbitrary extra keys.
fn prev_result() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("0.3.0"), Just("0.3.1"), Just("0.4.0"), Just("1.0.0"), Just("1.1.0")],
        prop::collection::vec((any::<[u8; 4]>(), 8u8..=32, any::<bool>()), 1..4),
        json_value(),
    )
        .prop_map(|(version, ips, extra)| {
            let legacy = version.starts_with("0.");
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(a, len, gw)| {
                    let mut ip = json!({"address": format!("{}.{}.{}.{}/{len}", a[0], a[1], a[2], a[3]), "interface": 0});
                    if legacy {
                        ip["version"] = json!("4");
                    }
                    if gw {
                        ip["gateway"] = json!("10.0.0.1");
                    }
                    ip
                })
                .collect();
            json!({
                "cniVersion": version,
                "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
                "ips": ips,
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {},
                "x-extra": extra,
            })
        })
}

proptest! {
    #[test]
    fn valid_prev_results_convert_to_every_version_losslessly(v in prev_result()) {
        let prev = PrevResult::parse(v.as_object().unwrap().clone()).expect("a valid prevResult is accepted");
        let addrs = prev.addresses();
        prop_assert!(!addrs.is_empty());
        for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let version = CniVersion::from_declared(version).unwrap();
            let out = prev.to_version(version);
            prop_assert_eq!(&out["x-extra"], &v["x-extra"], "unknown keys are kept");
            let back = PrevResult::parse(out.as_object().unwrap().clone()).unwrap();
            prop_assert_eq!(back.addresses(), addrs.clone());
        }
    }
}
