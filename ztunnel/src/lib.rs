//! ztunnel, zmesh's node tunnel, as a library: the `ztunnel` binary (`main.rs`) is the CLI,
//! logging, allocator and runtime around [`app::run`]; tests and embedders start one with
//! [`app::start`] and stop it with [`app::Running::shutdown`].
//!
//! Module dependencies point one way: `app` wires everything and nothing imports it; `admin`
//! and `inpod` use the proxy registry (`registry`); the config sources (`xds`,
//! `local_config`) publish through `state`, which the proxies (`proxy`) read.

pub mod admin;
pub mod app;
pub mod ca_client;
pub mod config;
pub mod inpod;
pub mod local_config;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod state;
pub mod xds;

// The gRPC channel to the controller lives in zmesh-core (the waypoint uses it too).
use zmesh_core::grpc;
