//! The shared core of zmesh: SPIFFE identities and workload certificates, the HBONE client
//! (with its connection pool) and server pieces, the workload model that ztunnel and the
//! waypoint route on, socket helpers and Istio-compatible telemetry. Binaries (`ztunnel`,
//! later the waypoint and controller) are thin wiring around these pieces.

pub mod certs;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod logline;
pub mod logsink;
pub mod netns;
pub mod peer_text;
pub mod policy;
pub mod process;
pub mod serve;
pub mod socket;
pub mod spare;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod yaml;
pub mod zds;
