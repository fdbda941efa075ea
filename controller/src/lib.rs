//! The zmesh controller: watches Kubernetes objects (or a directory of the same objects as
//! YAML), translates them into Istio's workload API, serves them to ztunnels and waypoints over
//! delta ADS (gRPC), and is the CA that signs workload certificates
//! (`istio.v1.auth.IstioCertificateService`). Pieces land one by one; see `docs/ARCHITECTURE.md`.

pub mod ads;
pub mod ca;
pub mod deploy;
pub mod monitor;
pub mod reconcile;
pub mod server;
pub mod source;
pub mod status;
pub mod translate;
