//! xDS `istio.workload.Address` resources (a Workload or a Service) as ztunnel's ADS client
//! receives them: `decode_address(name, bytes)`.
//!
//! Input: see `zmesh_fuzz::split_named` (name length, name, protobuf bytes).
//!
//! Invariants: an accepted workload has a SPIFFE identity and only 4- or 16-byte addresses
//! became IPs; an accepted resource printed in the local-config shape parses back equal (the
//! two config sources build one model); the snapshot built from it finds the workload by each
//! of its IPs and resolves each VIP port without panicking.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use zmesh_core::state::xds::{AddressResource, decode_address};
use zmesh_core::state::{LocalConfig, State};

fuzz_target!(|data: &[u8]| {
    let (name, bytes) = zmesh_fuzz::split_named(data);
    let Ok(resource) = decode_address(&name, bytes) else {
        return;
    };
    let mut cfg = LocalConfig::default();
    match resource {
        AddressResource::Workload(w) => {
            assert!(w.identity().is_ok(), "accepted workload without identity");
            cfg.workloads.push(w);
        }
        AddressResource::Service(s) => cfg.services.push(s),
    }
    let printed = serde_yaml::to_string(&cfg).expect("a converted resource prints");
    let again = LocalConfig::parse(&printed)
        .unwrap_or_else(|e| panic!("printed resource does not parse: {e}\n{printed}"));
    assert_eq!(
        again, cfg,
        "print -> parse changed the resource:\n{printed}"
    );

    let (state, _) = State::from_resources(
        cfg.workloads.into_iter().map(Arc::new),
        cfg.services.into_iter().map(Arc::new),
    );
    for w in state.workloads() {
        for ip in &w.workload_ips {
            assert!(state.workload_by_ip(*ip).is_some());
        }
    }
    for s in state.services() {
        for vip in &s.vips {
            for port in s.ports.keys() {
                let _ = state.resolve(SocketAddr::new(vip.address, *port), |n| n / 2);
            }
        }
    }
});
