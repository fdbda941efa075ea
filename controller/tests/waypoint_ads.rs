//! `zmesh.waypoint.v1.BoundService` over the controller's real TLS port: each waypoint (a
//! stream authenticated as its Gateway's service account) gets exactly the Services bound to
//! its Gateway, and nobody else gets any.

use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use xds_proto::BOUND_SERVICE_TYPE_URL;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::zmesh::waypoint::v1::{BoundService, Protocol};
use zmesh_controller::ca::CaConfig;
use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

const ZTUNNEL: &str = "zt-0123456789abcdef0123456789abcdef";
const WP_A: &str = "wa-0123456789abcdef0123456789abcdef";
const WP_B: &str = "wb-0123456789abcdef0123456789abcdef";
/// Authenticates as the rejected Gateway's service account.
const WP_BAD: &str = "wx-0123456789abcdef0123456789abcdef";

fn gateway(name: &str, listeners: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: app}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{listeners}]}}\n"
    )
}

fn service(name: &str, labels: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app, labels: {{{labels}}}}}\n\
         spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [\
         {{name: http-web, port: 80, targetPort: 8080}}, \
         {{name: grpc, port: 7070}}, \
         {{name: db, port: 5432, appProtocol: tcp}}, \
         {{name: other, port: 9000, targetPort: named}}]}}\n"
    )
}

/// Namespace `app` binds to `wp-b`; `s1` names `wp-a` itself; `s3` opts out; `s4` names the
/// rejected Gateway `bad`.
fn objects(s1_waypoint: &str) -> String {
    let mesh = "{name: mesh, port: 15008, protocol: HBONE}";
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: \
         {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp-b}}\n",
    );
    y += &gateway("wp-a", mesh);
    y += &gateway("wp-b", mesh);
    y += &gateway(
        "bad",
        &format!("{mesh}, {{name: http, port: 80, protocol: HTTP}}"),
    );
    y += &service(
        "s1",
        &format!("istio.io/use-waypoint: {s1_waypoint}"),
        "10.96.0.1",
    );
    y += &service("s2", "", "10.96.0.2");
    y += &service("s3", "istio.io/use-waypoint: none", "10.96.0.3");
    y += &service("s4", "istio.io/use-waypoint: bad", "10.96.0.4");
    y
}

struct Controller {
    addr: std::net::SocketAddr,
    root_pem: String,
    dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn controller() -> Controller {
    zmesh_core::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate("mesh-root").unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    let cfg_dir = dir.path().join("objects");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("a.yaml"), objects("wp-a")).unwrap();
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

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    stream: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    /// Opens a stream with `token` and subscribes to the wildcard of BoundService.
    async fn subscribe(c: &Controller, token: &str) -> Client {
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
            type_url: BOUND_SERVICE_TYPE_URL.into(),
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
        Client { tx, stream }
    }

    /// The next response, ACKed.
    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(20), self.stream.message())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap();
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: BOUND_SERVICE_TYPE_URL.into(),
                response_nonce: r.nonce.clone(),
                ..DeltaDiscoveryRequest::default()
            })
            .await
            .unwrap();
        r
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn each_waypoint_gets_only_its_own_bound_services() {
    let c = controller().await;
    let mut a = Client::subscribe(&c, WP_A).await;
    let mut b = Client::subscribe(&c, WP_B).await;
    let mut zt = Client::subscribe(&c, ZTUNNEL).await;
    let mut bad = Client::subscribe(&c, WP_BAD).await;

    let first_a = a.recv().await;
    assert_eq!(names(&first_a), ["app/s1.app.svc.cluster.local"]);
    assert_eq!(names(&b.recv().await), ["app/s2.app.svc.cluster.local"]);
    // The first answer comes even when empty: ztunnel and the rejected Gateway get nothing.
    assert!(zt.recv().await.resources.is_empty());
    assert!(bad.recv().await.resources.is_empty());

    let s1 = BoundService::decode(
        first_a.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!((s1.name.as_str(), s1.namespace.as_str()), ("s1", "app"));
    assert_eq!(s1.hostname, "s1.app.svc.cluster.local");
    assert_eq!(s1.vips[0].address, [10, 96, 0, 1]);
    let gw = s1.waypoint.unwrap();
    assert_eq!((gw.namespace.as_str(), gw.name.as_str()), ("app", "wp-a"));
    let ports: Vec<(u32, u32, Protocol)> = s1
        .ports
        .iter()
        .map(|p| (p.port, p.target_port, p.protocol()))
        .collect();
    assert_eq!(
        ports,
        [
            (80, 8080, Protocol::Http),
            (7070, 7070, Protocol::Grpc),
            (5432, 5432, Protocol::Tcp),
            (9000, 0, Protocol::Unspecified),
        ]
    );

    // s1 moves from wp-a to wp-b: wp-a is told it is gone, wp-b gets it.
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-b")).unwrap();
    let gone = a.recv().await;
    assert!(gone.resources.is_empty());
    assert_eq!(gone.removed_resources, ["app/s1.app.svc.cluster.local"]);
    let moved = b.recv().await;
    assert_eq!(names(&moved), ["app/s1.app.svc.cluster.local"]);
}
