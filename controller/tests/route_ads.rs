//! `zmesh.waypoint.v1.ServiceRoutes` over the controller's real TLS port: a Service's route
//! table (its HTTPRoutes/GRPCRoutes, GAMMA) goes only to the waypoint the Service is bound
//! to, follows the Service when it moves to another waypoint, and is removed when its routes
//! go away. Ztunnels and other waypoints never see it.

use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use xds_proto::SERVICE_ROUTES_TYPE_URL;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::zmesh::waypoint::v1::{ServiceRoutes, backend};
use zmesh_controller::ca::CaConfig;
use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

const ZTUNNEL: &str = "zt-0123456789abcdef0123456789abcdef";
const WP_A: &str = "wa-0123456789abcdef0123456789abcdef";
const WP_B: &str = "wb-0123456789abcdef0123456789abcdef";
const WP_BAD: &str = "wx-0123456789abcdef0123456789abcdef";

const S1: &str = "app/s1.app.svc.cluster.local";
const S2: &str = "app/s2.app.svc.cluster.local";

fn gateway(name: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: app}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, \
         protocol: HBONE}}]}}\n"
    )
}

fn service(name: &str, labels: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app, labels: \
         {{{labels}}}}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    )
}

fn route(name: &str, parent: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: app}}\n\
         spec: {{parentRefs: [{{group: '', kind: Service, name: {parent}}}], rules: [\
         {{matches: [{{path: {{type: Exact, value: /v2}}}}], backendRefs: [{{name: {parent}, \
         port: 80, weight: 3}}, {{name: missing, port: 80}}]}}]}}\n"
    )
}

/// Namespace `app` binds to `wp-b`; `s1` names `s1_waypoint`; `s3` opts out. Routes `r1`,
/// `r2`, `r3` on `s1`, `s2`, `s3`; `r1` only when `with_r1`.
fn objects(s1_waypoint: &str, with_r1: bool) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: \
         {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp-b}}\n",
    );
    y += &gateway("wp-a");
    y += &gateway("wp-b");
    y += &service(
        "s1",
        &format!("istio.io/use-waypoint: {s1_waypoint}"),
        "10.96.0.1",
    );
    y += &service("s2", "", "10.96.0.2");
    y += &service("s3", "istio.io/use-waypoint: none", "10.96.0.3");
    if with_r1 {
        y += &route("r1", "s1");
    }
    y += &route("r2", "s2");
    y += &route("r3", "s3");
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
    std::fs::write(cfg_dir.join("a.yaml"), objects("wp-a", true)).unwrap();
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
    /// Opens a stream with `token` and subscribes to the wildcard of ServiceRoutes.
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
            type_url: SERVICE_ROUTES_TYPE_URL.into(),
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
                type_url: SERVICE_ROUTES_TYPE_URL.into(),
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
async fn routes_go_only_to_the_waypoint_of_their_service() {
    let c = controller().await;
    let mut a = Client::subscribe(&c, WP_A).await;
    let mut b = Client::subscribe(&c, WP_B).await;
    let mut zt = Client::subscribe(&c, ZTUNNEL).await;
    let mut bad = Client::subscribe(&c, WP_BAD).await;

    let first_a = a.recv().await;
    assert_eq!(names(&first_a), [S1]);
    assert_eq!(
        names(&b.recv().await),
        [S2],
        "s3 opted out: its route is served to nobody"
    );
    assert!(zt.recv().await.resources.is_empty());
    assert!(bad.recv().await.resources.is_empty());

    let s1 = ServiceRoutes::decode(
        first_a.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!((s1.namespace.as_str(), s1.name.as_str()), ("app", "s1"));
    assert_eq!(s1.rules.len(), 1);
    let rule = &s1.rules[0];
    let r = rule.route.as_ref().unwrap();
    assert_eq!((r.name.as_str(), r.rule_index, r.match_index), ("r1", 0, 0));
    assert_eq!(
        rule.r#match.as_ref().unwrap().path.as_ref().unwrap().value,
        "/v2"
    );
    assert_eq!(rule.backends[0].weight, 3);
    assert!(matches!(
        &rule.backends[0].target,
        Some(backend::Target::Service(s)) if s.hostname == "s1.app.svc.cluster.local" && s.port == 80
    ));
    assert_eq!(rule.backends[1].weight, 1);
    assert!(matches!(
        &rule.backends[1].target,
        Some(backend::Target::Unresolved(why)) if why.contains("BackendNotFound")
    ));

    // s1 moves from wp-a to wp-b: wp-a is told its routes are gone, wp-b gets them.
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-b", true)).unwrap();
    let gone = a.recv().await;
    assert!(gone.resources.is_empty());
    assert_eq!(gone.removed_resources, [S1]);
    assert_eq!(names(&b.recv().await), [S1]);

    // Its route is deleted: the table is removed from wp-b.
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-b", false)).unwrap();
    let removed = b.recv().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, [S1]);
}
