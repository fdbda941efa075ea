//! The zmesh waypoint: a per-namespace L7 proxy in the Istio ambient style. It terminates
//! HBONE for the Services bound to it, proxies HTTP/1.1, HTTP/2, gRPC and WebSocket (or
//! opaque TCP) to their pods over new HBONE tunnels under its own identity, and reports
//! Istio's request metrics with `reporter="waypoint"`.

pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod body;
pub mod bound;
pub mod ca;
pub mod config;
pub mod http;
pub mod route;
pub mod server;
pub mod sniff;
pub mod telemetry;
pub mod upstream;
pub mod xds;

pub use app::{Running, Waypoint};
pub use config::Config;
