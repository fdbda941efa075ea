//! xDS `istio.security.Authorization` resources (L4 AuthorizationPolicy) as ztunnel's ADS
//! client receives them: `decode_authorization(name, bytes)`.
//!
//! Input: see `zmesh_fuzz::split_named` (name length, name, protobuf bytes).
//!
//! Invariants: an accepted policy printed in the local-config shape (`policies:`) parses back
//! equal; evaluated alone for a destination it applies to, it decides exactly as its own
//! `matches` says (a DENY denies what it matches, an ALLOW allows only what it matches, a
//! dry-run policy never decides and is reported).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use zmesh_core::identity::SpiffeId;
use zmesh_core::policy::{Action, Connection, PolicySet};
use zmesh_core::state::LocalConfig;
use zmesh_core::state::xds::decode_authorization;

fuzz_target!(|data: &[u8]| {
    let (name, bytes) = zmesh_fuzz::split_named(data);
    let Ok(policy) = decode_authorization(&name, bytes) else {
        return;
    };
    let cfg = LocalConfig {
        policies: vec![policy.clone()],
        ..LocalConfig::default()
    };
    let printed = serde_yaml::to_string(&cfg).expect("a converted policy prints");
    let again = LocalConfig::parse(&printed)
        .unwrap_or_else(|e| panic!("printed policy does not parse: {e}\n{printed}"));
    assert_eq!(again, cfg, "print -> parse changed the policy:\n{printed}");

    let key = policy.key();
    let set = PolicySet::new([policy.clone()]);
    let p = set.get(&key).expect("the set holds its policy");
    let id = SpiffeId::new("cluster.local", "default", "client").expect("a valid id");
    let peers = [
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), Some(&id)),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), None),
    ];
    for (src_ip, src_identity) in peers {
        let conn = Connection {
            src_ip,
            src_identity,
            dst_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dst_port: 80,
        };
        let matched = p.matches(&conn);
        let verdict = set.evaluate(&p.namespace, std::slice::from_ref(&key), &conn);
        if p.dry_run {
            assert!(verdict.allowed && verdict.policy.is_none());
            assert_eq!(verdict.dry_run.len(), 1);
            assert_eq!(verdict.dry_run[0].1, matched);
        } else {
            let allowed = match p.action {
                Action::Deny => !matched,
                Action::Allow => matched,
            };
            assert_eq!(verdict.allowed, allowed, "{p:?} on {conn:?}");
            assert!(verdict.dry_run.is_empty());
        }
    }
});
