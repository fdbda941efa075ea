//! The controller as ztunnel sees it: one TLS port serving delta ADS and the CA, fed from a
//! directory of YAML, with per-node credentials. Real tonic clients over TLS verified against
//! the mesh root.

use std::time::{Duration, Instant};

use prost::Message;
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use xds_proto::istio::workload::{Address, address};
use zmesh_controller::ca::{CaConfig, impersonation};
use zmesh_controller::reconcile::ADDRESS_TYPE;
use zmesh_controller::server::{AuthConfig, ControllerConfig, Running, SourceConfig, start};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

const TOKEN_N1: &str = "n1-0123456789abcdef0123456789abcdef";
const TOKEN_N2: &str = "n2-0123456789abcdef0123456789abcdef";

fn objects(pods: &[(&str, &str, &str, &str)]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for (name, node, sa, ip) in pods {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, uid: u-{name}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n"
        ));
    }
    y
}

struct Controller {
    running: Running,
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
    std::fs::write(
        cfg_dir.join("a.yaml"),
        objects(&[
            ("p1", "n1", "sa1", "10.0.0.1"),
            ("p2", "n2", "sa2", "10.0.0.2"),
        ]),
    )
    .unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("n1 {TOKEN_N1}\nn2 {TOKEN_N2}\n")).unwrap();
    let stop = CancellationToken::new();
    let running = start(
        ControllerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ca_cert: cert,
            ca_key: key,
            serving_names: vec!["istiod.istio-system.svc".into(), "127.0.0.1".into()],
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
        running,
        root_pem: ca.cert_pem().to_owned(),
        dir,
        stop,
    }
}

async fn channel(c: &Controller, name: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.root_pem))
        .domain_name(name);
    Channel::from_shared(format!("https://127.0.0.1:{}", c.running.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    r
}

fn subscribe() -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: ADDRESS_TYPE.into(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn workload_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = resp
        .resources
        .iter()
        .filter_map(|r| {
            let a = Address::decode(r.resource.as_ref()?.value.as_slice()).ok()?;
            match a.r#type? {
                address::Type::Workload(w) => Some(w.name),
                address::Type::Service(_) => None,
            }
        })
        .collect();
    v.sort();
    v
}

async fn next(stream: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn ads_over_tls_serves_the_directory_and_follows_edits() {
    let c = controller().await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel(&c, "127.0.0.1").await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(subscribe()).await.unwrap();
    let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut stream = client
        .delta_aggregated_resources(authed(out, TOKEN_N1))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(workload_names(&first), vec!["p1", "p2"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        response_nonce: first.nonce.clone(),
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .unwrap();

    // Edit the directory: p2 moves to a new IP, p3 appears. Only those two are pushed.
    std::fs::write(
        c.dir.path().join("objects/a.yaml"),
        objects(&[
            ("p1", "n1", "sa1", "10.0.0.1"),
            ("p2", "n2", "sa2", "10.0.0.20"),
            ("p3", "n1", "sa1", "10.0.0.3"),
        ]),
    )
    .unwrap();
    let push = next(&mut stream).await;
    assert_eq!(workload_names(&push), vec!["p2", "p3"]);
    assert!(push.removed_resources.is_empty());
}

#[tokio::test]
async fn ads_refuses_unauthenticated_streams() {
    let c = controller().await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel(&c, "127.0.0.1").await);
    let reqs = futures::stream::iter(vec![subscribe()]);
    let err = client
        .delta_aggregated_resources(authed(reqs, "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = client
        .delta_aggregated_resources(Request::new(futures::stream::iter(vec![subscribe()])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
}

#[tokio::test]
async fn the_serving_certificate_is_checked_by_name() {
    let c = controller().await;
    // A name the certificate does not carry: the TLS handshake fails.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.root_pem))
        .domain_name("evil.example.com");
    let r = Channel::from_shared(format!("https://127.0.0.1:{}", c.running.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    assert!(r.is_err(), "a certificate for other names must not verify");
    // The DNS name istiod is known by works.
    let _ = channel(&c, "istiod.istio-system.svc").await;
}

fn csr(id: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

async fn wait_for_pods(c: &Controller) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.running.store.read().pods.len() < 2 {
        assert!(Instant::now() < deadline, "objects loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ca_signs_only_for_pods_on_the_callers_node() {
    let c = controller().await;
    wait_for_pods(&c).await;
    let mut ca = IstioCertificateServiceClient::new(channel(&c, "127.0.0.1").await);
    let p1 = "spiffe://cluster.local/ns/a/sa/sa1";
    let p2 = "spiffe://cluster.local/ns/a/sa/sa2";
    let req = |id: &str| IstioCertificateRequest {
        csr: csr(id),
        validity_duration: 3600,
        metadata: Some(impersonation(id)),
    };
    let ok = ca
        .create_certificate(authed(req(p1), TOKEN_N1))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.cert_chain.len() >= 2);
    assert_eq!(ok.cert_chain.last().unwrap().trim(), c.root_pem.trim());

    // n1's credential cannot get p2's identity: p2 runs on n2.
    let err = ca
        .create_certificate(authed(req(p2), TOKEN_N1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("no pod with that identity runs on n1"),
        "{}",
        err.message()
    );
    // n2's can.
    ca.create_certificate(authed(req(p2), TOKEN_N2))
        .await
        .unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    (code, out)
}

#[tokio::test]
async fn monitoring_port_reports_readiness_and_metrics() {
    let c = controller().await;
    let mon = zmesh_controller::monitor::serve(
        "127.0.0.1:0".parse().unwrap(),
        c.running.clone(),
        c.stop.clone(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(mon, "/ready").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "ready after the first translation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, metrics) = http_get(mon, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("zmesh_controller_objects{kind=\"Pod\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zmesh_controller_address_resources 2"),
        "{metrics}"
    );
    let (code, status) = http_get(mon, "/debug/status").await;
    assert_eq!(code, 200);
    assert!(status.contains("\"ready\": true"), "{status}");
    assert_eq!(http_get(mon, "/nope").await.0, 404);
}
