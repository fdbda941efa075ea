//! The waypoint against the real controller (in process, over its TLS port): its certificate
//! from the controller's CA (authenticated as the Gateway's service account), its bound
//! services and their endpoints over delta ADS, and traffic through it.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio_util::sync::CancellationToken;
use zmesh_controller::ca::CaConfig;
use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::grpc::Target;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;
use zmesh_waypoint::Waypoint;
use zmesh_waypoint::upstream::LbPolicy;

use crate::harness::*;

const WP_TOKEN: &str = "wp-0123456789abcdef0123456789abcdef";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: echo}}}}\n\
         spec: {{nodeName: n1, serviceAccountName: echo, containers: [{{name: app, image: app}}]}}\n\
         status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

fn objects() -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: \
         {istio.io/dataplane-mode: ambient}}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: default}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    y += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default, \
         labels: {{istio.io/use-waypoint: waypoint}}}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: echo}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    );
    y += &pod("echo-a", "127.0.0.11");
    y += &pod("echo-b", "127.0.0.12");
    y
}

/// A controller serving `yaml` (in process, over TLS) and a waypoint configured by it.
struct World {
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
    _controller: zmesh_controller::server::Running,
    mesh: Mesh,
    wp: zmesh_waypoint::Running,
}

async fn world(yaml: String) -> World {
    zmesh_core::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate("mesh-root").unwrap();
    let (cert, key, root) = (
        dir.path().join("ca.pem"),
        dir.path().join("ca.key"),
        dir.path().join("root.pem"),
    );
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    std::fs::write(&root, ca.cert_pem()).unwrap();
    let objects_dir = dir.path().join("objects");
    std::fs::create_dir(&objects_dir).unwrap();
    std::fs::write(objects_dir.join("a.yaml"), yaml).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("n1 {WP_TOKEN} spiffe://cluster.local/ns/default/sa/waypoint\n"),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let controller = start(
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
            source: SourceConfig::Dir(objects_dir),
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

    let mesh = Mesh::with_ca(
        &["echo-a", "echo-b"],
        &[],
        LocalCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap(),
    )
    .await;
    let mut cfg = mesh.config(LbPolicy::RoundRobin);
    let target = |var| Target {
        var,
        address: format!("https://{}", controller.addr),
        root_ca: root.clone(),
        alt_hostname: None,
        root_var: "XDS_ROOT_CA",
    };
    cfg.xds = Some(target("XDS_ADDRESS"));
    cfg.ca = Some(target("CA_ADDRESS"));
    cfg.auth_token = WP_TOKEN.into();
    let wp = Waypoint::start(cfg).await.unwrap();
    eventually("the waypoint is ready", async || {
        admin_get(wp.admin_addr, "/healthz/ready").await.0 == StatusCode::OK
    })
    .await;

    World {
        _dir: dir,
        _stop: _stop_on_drop,
        _controller: controller,
        mesh,
        wp,
    }
}

#[tokio::test]
async fn config_and_certificate_from_the_controller() {
    let World { mesh, wp, .. } = world(objects()).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let mut backends = Vec::new();
    for _ in 0..4 {
        let r = c
            .send_request(
                Request::get("/hello")
                    .header("host", HOST)
                    .body(full(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        backends.push(r.headers()["x-backend"].to_str().unwrap().to_owned());
        text(r).await;
    }
    backends.sort();
    assert_eq!(backends, ["echo-a", "echo-a", "echo-b", "echo-b"]);
    // Upstream: the pods' target port, under the identity the controller's CA signed.
    for (_, c) in mesh.connects() {
        assert!(c.authority.ends_with(":8080"), "{c:?}");
        assert_eq!(c.peer, Some(id("waypoint")));
    }
    // Not bound: the service's other VIP ports, or anything else.
    assert!(
        mesh.tunnel(wp.hbone_addr, 81)
            .await
            .unwrap_err()
            .contains("400")
    );
}

/// L7 AuthorizationPolicies from the controller, enforced by the waypoint: a DENY on the
/// Service (targetRefs Service), an ALLOW on the whole waypoint (targetRefs Gateway) for the
/// client's identity and GET only; a denied request gets Istio's 403 and is counted with flag
/// `RBAC`.
#[tokio::test]
async fn authorization_policies_from_the_controller() {
    let policies = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: deny-admin, namespace: default}\n\
         spec: {action: DENY, targetRefs: [{kind: Service, group: '', name: echo}], \
         rules: [{to: [{operation: {paths: [/admin, '/admin/{**}']}}]}]}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: allow-get, namespace: default}\n\
         spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], \
         rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}], \
         to: [{operation: {methods: [GET]}}]}]}\n";
    let World { mesh, wp, .. } = world(format!("{}{policies}", objects())).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let mut send = async |method: &str, path: &str| {
        let r = c
            .send_request(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .header("host", HOST)
                    .body(full(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, ct, text(r).await)
    };
    // The policies arrive after readiness (they are not waited for).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = send("GET", "/admin/x").await;
        if status == StatusCode::FORBIDDEN {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the DENY never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, ct, body) = send("GET", "/admin/x").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(ct.as_deref(), Some("text/plain"));
    // BASE normalization: `/public/../admin` is `/admin`.
    assert_eq!(
        send("GET", "/public/../admin").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(send("GET", "/hello").await.0, StatusCode::OK);
    // The ALLOW applies and does not match a POST: denied.
    let (status, _, body) = send("POST", "/hello").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    let (_, metrics) = admin_get(wp.admin_addr, "/metrics").await;
    let denied: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"RBAC\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(denied >= 3.0, "{denied} denials counted:\n{metrics}");
}
