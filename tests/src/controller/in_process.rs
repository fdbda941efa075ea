//! The controller in this process in Kubernetes mode against the API-server double, as the
//! install's service account (so the double enforces the install's RBAC): what the
//! `kube_*` tests start.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zmesh_controller::ca::CaConfig;
use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start_with_client};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

use super::SERVER_NAME;
use crate::apiserver::ApiServer;
use crate::manifests::Component;

/// A running in-process controller; stopped when dropped.
pub struct KubeController {
    /// Its TLS address (ADS and CA), serving [`SERVER_NAME`].
    pub addr: SocketAddr,
    /// The mesh root it signs with (PEM).
    pub root_pem: String,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for KubeController {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the controller on loopback with a fresh mesh CA, watching `api` as the install's
/// controller service account, ztunnels authenticated by TokenReview.
pub async fn start_kube(api: &ApiServer) -> KubeController {
    zmesh_core::tls::install_default_provider();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = LocalCa::generate("k8s-mesh-root").expect("a mesh CA");
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, ca.cert_pem()).expect("writing the CA certificate");
    std::fs::write(&key, ca.key_pem()).expect("writing the CA key");
    let stop = CancellationToken::new();
    let running = start_with_client(
        ControllerConfig {
            listen: "127.0.0.1:0".parse().expect("an address"),
            ca_cert: cert,
            ca_key: key,
            serving_names: vec![SERVER_NAME.into()],
            serving_ttl: Duration::from_secs(3600),
            mesh: MeshConfig::default(),
            ca: CaConfig {
                cluster_id: Some("Kubernetes".into()),
                ..CaConfig::default()
            },
            source: SourceConfig::Kube,
            auth: AuthConfig::TokenReview {
                trusted_node_accounts: vec!["istio-system/ztunnel".into()],
            },
            ztunnel_identity: SpiffeId::new("cluster.local", "istio-system", "ztunnel")
                .expect("ztunnel's identity"),
            debounce: Duration::from_millis(10),
            limits: Default::default(),
            waypoint: Default::default(),
        },
        Some(api.client_for(Component::Controller)),
        stop.clone(),
    )
    .await
    .expect("the controller starts");
    KubeController {
        addr: running.addr,
        root_pem: ca.cert_pem().to_owned(),
        _dir: dir,
        stop,
    }
}
