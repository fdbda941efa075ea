//! `zmesh.waypoint.v1.BoundService` over the controller's real TLS port: each waypoint (a
//! stream authenticated as its Gateway's service account) gets exactly the Services bound to
//! its Gateway, and nobody else gets any.

#[path = "support/waypoint_ads.rs"]
mod support;

use prost::Message;
use support::{Client, WP_A, WP_B, WP_BAD, ZTUNNEL, controller, names};
use xds_proto::BOUND_SERVICE_TYPE_URL;
use xds_proto::zmesh::waypoint::v1::{BoundService, Protocol};

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

#[tokio::test]
async fn each_waypoint_gets_only_its_own_bound_services() {
    let c = controller(objects("wp-a")).await;
    let mut a = Client::subscribe(&c, WP_A, BOUND_SERVICE_TYPE_URL).await;
    let mut b = Client::subscribe(&c, WP_B, BOUND_SERVICE_TYPE_URL).await;
    let mut zt = Client::subscribe(&c, ZTUNNEL, BOUND_SERVICE_TYPE_URL).await;
    let mut bad = Client::subscribe(&c, WP_BAD, BOUND_SERVICE_TYPE_URL).await;

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
