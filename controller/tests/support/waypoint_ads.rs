//! What the waypoint ADS tests share: a controller on loopback TLS fed from a YAML directory,
//! the node tokens of a ztunnel and three waypoints, and a delta ADS client subscribed to one
//! type's wildcard.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use zmesh_controller::ca::CaConfig;
use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

/// The ztunnel's token.
pub const ZTUNNEL: &str = "zt-0123456789abcdef0123456789abcdef";
/// Authenticates as Gateway `wp-a`'s service account.
pub const WP_A: &str = "wa-0123456789abcdef0123456789abcdef";
/// Authenticates as Gateway `wp-b`'s service account.
pub const WP_B: &str = "wb-0123456789abcdef0123456789abcdef";
/// Authenticates as the rejected Gateway's service account.
pub const WP_BAD: &str = "wx-0123456789abcdef0123456789abcdef";

/// A running controller; stopped when dropped.
pub struct Controller {
    addr: std::net::SocketAddr,
    root_pem: String,
    /// Holds the CA files and the YAML directory (`objects/`).
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the controller on loopback TLS with `objects` as its YAML directory's `a.yaml` and the
/// node tokens of [`ZTUNNEL`], [`WP_A`], [`WP_B`] and [`WP_BAD`].
pub async fn controller(objects: String) -> Controller {
    zmesh_core::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate("mesh-root").unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    let cfg_dir = dir.path().join("objects");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("a.yaml"), objects).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "n1 {ZTUNNEL}\nn1 {WP_A} spiffe://cluster.local/ns/app/sa/wp-a\n\
             n1 {WP_B} spiffe://cluster.local/ns/app/sa/wp-b\n\
             n1 {WP_BAD} spiffe://cluster.local/ns/app/sa/bad\n"
        ),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let running = start(
        ControllerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ca_cert: cert,
            ca_key: key,
            serving_names: vec!["127.0.0.1".into()],
            serving_ttl: Duration::from_secs(3600),
            mesh: MeshConfig::default(),
            ca: CaConfig {
                cluster_id: Some("Kubernetes".into()),
                ..CaConfig::default()
            },
            source: SourceConfig::Dir(cfg_dir),
            auth: AuthConfig::NodeTokens(tokens),
            ztunnel_identity: SpiffeId::new("cluster.local", "istio-system", "ztunnel").unwrap(),
            debounce: Duration::from_millis(10),
            limits: Default::default(),
            waypoint: Default::default(),
        },
        stop.clone(),
    )
    .await
    .unwrap();
    Controller {
        addr: running.addr,
        root_pem: ca.cert_pem().to_owned(),
        dir,
        stop,
    }
}

/// A waypoint's delta ADS stream subscribed to one type's wildcard.
pub struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    stream: tonic::Streaming<DeltaDiscoveryResponse>,
    type_url: &'static str,
}

impl Client {
    /// Opens a stream with `token` and subscribes to the wildcard of `type_url`.
    pub async fn subscribe(c: &Controller, token: &str, type_url: &'static str) -> Client {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&c.root_pem))
            .domain_name("127.0.0.1");
        let channel = Channel::from_shared(format!("https://{}", c.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "waypoint~10.0.0.9~wp.app~app.svc.cluster.local".into(),
                ..Node::default()
            }),
            type_url: type_url.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .unwrap();
        let out =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut req = Request::new(out);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.metadata_mut()
            .insert("clusterid", "Kubernetes".parse().unwrap());
        let stream = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(req)
            .await
            .unwrap()
            .into_inner();
        Client {
            tx,
            stream,
            type_url,
        }
    }

    /// The next response, ACKed.
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(20), self.stream.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap();
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: self.type_url.into(),
                response_nonce: r.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            })
            .await
            .unwrap();
        r
    }
}

/// The resource names of a response.
pub fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

/// Gateway `name` in namespace `app`: a waypoint (class `istio-waypoint`, one HBONE listener
/// on 15008).
#[allow(dead_code)] // not every test including this module uses it
pub fn waypoint_gateway(name: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: app}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, \
         protocol: HBONE}}]}}\n"
    )
}

/// Service `name` in namespace `app` with `labels`, cluster IP `ip` and one port, `http` 80.
#[allow(dead_code)] // not every test including this module uses it
pub fn http_service(name: &str, labels: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app, labels: \
         {{{labels}}}}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )
}
