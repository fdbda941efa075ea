//! Compiles `proto/**/*.proto` with protox (pure Rust, no `protoc` binary) and
//! generates prost messages, plus tonic clients and servers with the `grpc` feature.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/zds/zds.proto",
    "istio/ca/ca.proto",
    "zmesh/waypoint/v1/waypoint.proto",
    "zmesh/waypoint/v1/route.proto",
    "zmesh/waypoint/v1/authn.proto",
    "zmesh/waypoint/v1/authz.proto",
    "google/rpc/status.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/service/discovery/v3/ads.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", root.display());
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    // protox resolves google/protobuf/*.proto from its built-in copies.
    let fds = protox::compile(PROTOS, [&root])?;

    #[cfg(feature = "grpc")]
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    #[cfg(not(feature = "grpc"))]
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
