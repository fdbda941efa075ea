//! What the waypoint reads from outside: `zmesh.waypoint.v1.BoundService` resources from its
//! ADS stream (`BoundService::from_proto`, then `Snapshot::new`), the first bytes of a tunnel
//! (`sniff::classify`), and a CONNECT's `baggage` header (`telemetry::meta_from_baggage`).
//!
//! Input: the first byte picks the parser; for BoundService the rest is laid out as
//! `zmesh_fuzz::split_named` (name length, name, protobuf bytes).
//!
//! Invariants: an accepted BoundService has a name, namespace and hostname, only 4- or 16-byte
//! VIPs and non-zero ports, and the snapshot finds it at each VIP:port (or refuses a duplicate);
//! classification of a prefix never contradicts that of the whole input; baggage never panics.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_core::state::State;
use zmesh_waypoint::bound::{BoundService, Snapshot};
use zmesh_waypoint::sniff::classify;
use zmesh_waypoint::telemetry::meta_from_baggage;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let (name, bytes) = zmesh_fuzz::split_named(rest);
            let Ok(msg) = pb::BoundService::decode(bytes) else {
                return;
            };
            let Ok(b) = BoundService::from_proto(&name, msg) else {
                return;
            };
            assert!(!b.name.is_empty() && !b.namespace.is_empty() && !b.hostname.is_empty());
            assert!(b.ports.iter().all(|p| p.port != 0));
            let b = Arc::new(b);
            if let Ok(snap) = Snapshot::new(State::default(), [b.clone()]) {
                for vip in &b.vips {
                    for p in &b.ports {
                        let found = snap
                            .binding(SocketAddr::new(vip.address, p.port))
                            .expect("each VIP:port is bound");
                        assert_eq!(found.service.key(), b.key());
                    }
                }
            }
        }
        1 => {
            // Once decided, more bytes never change the decision.
            if let Some(d) = classify(rest) {
                for n in 1..rest.len() {
                    if let Some(early) = classify(&rest[..n]) {
                        assert_eq!(early, d, "prefix of {n} bytes decided otherwise");
                    }
                }
            }
        }
        _ => {
            let _ = meta_from_baggage(&String::from_utf8_lossy(rest));
        }
    }
});
