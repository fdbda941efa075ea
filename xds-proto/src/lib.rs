//! Wire types for zmesh: the .proto files and their generated Rust types, nothing else.
//!
//! The `.proto` sources live in `proto/` and are compiled at build time with
//! [protox](https://crates.io/crates/protox) (pure Rust, no `protoc` needed)
//! and `tonic-prost-build`. Modules mirror protobuf packages:
//!
//! - [`istio::workload`] — `Address`, `Workload`, `Service`, ... (ambient xDS)
//! - [`istio::security`] — `Authorization` (ambient L4 policy)
//! - [`istio::workload::zds`] — node agent to ztunnel messages
//! - [`istio::v1::auth`] — Istio CA `IstioCertificateService`
//! - [`envoy::service::discovery::v3`] — (delta) ADS messages and service
//! - [`envoy::config::core::v3`] — `Node`
//! - [`google::rpc`] — `Status`
//!
//! Well-known types (`google.protobuf.*`) map to [`prost_types`].

/// Type URL of `istio.workload.Address` resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";

/// Type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Istio packages.
pub mod istio {
    /// Package `istio.workload`.
    #[allow(clippy::all)] // generated code
    pub mod workload {
        tonic::include_proto!("istio.workload");

        /// Package `istio.workload.zds`.
        #[allow(clippy::all)] // generated code
        pub mod zds {
            tonic::include_proto!("istio.workload.zds");
        }
    }

    /// Package `istio.security`.
    #[allow(clippy::all)] // generated code
    pub mod security {
        tonic::include_proto!("istio.security");
    }

    /// Package `istio.v1`.
    pub mod v1 {
        /// Package `istio.v1.auth` (Istio CA).
        #[allow(clippy::all)] // generated code
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// Envoy packages (subset).
pub mod envoy {
    /// `envoy.config`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// Package `envoy.config.core.v3`.
            #[allow(clippy::all)] // generated code
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }

    /// `envoy.service`.
    pub mod service {
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// Package `envoy.service.discovery.v3`.
            #[allow(clippy::all)] // generated code
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// Google packages (the well-known `google.protobuf` types come from `prost_types`).
pub mod google {
    /// Package `google.rpc`.
    #[allow(clippy::all)] // generated code
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
