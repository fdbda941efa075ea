//! `zmesh.waypoint.v1.ServiceAuthn` over the controller's real TLS port: a
//! RequestAuthentication targeting a waypoint Gateway reaches only that waypoint, with one
//! resource per Service bound to it; it follows a Service that moves to another waypoint and
//! is removed when the policy goes. Ztunnels and other waypoints never see it.

#[path = "support/waypoint_ads.rs"]
mod support;

use prost::Message;
use support::{
    Client, WP_A, WP_B, WP_BAD, ZTUNNEL, controller, http_service, names, waypoint_gateway,
};
use xds_proto::SERVICE_AUTHN_TYPE_URL;
use xds_proto::zmesh::waypoint::v1::ServiceAuthn;

const S1: &str = "app/s1.app.svc.cluster.local";
const S2: &str = "app/s2.app.svc.cluster.local";

/// A RequestAuthentication on Gateway `wp-a` and one on Gateway `wp-b`.
fn policy(name: &str, gateway: &str, issuer: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: {name}, namespace: app}}\n\
         spec: {{targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: \
         {gateway}}}], jwtRules: [{{issuer: {issuer}, jwksUri: 'http://10.1.0.9:8000/jwks.json'}}]}}\n"
    )
}

/// Namespace `app` binds to `wp-b`; `s1` names `s1_waypoint`. Policies on both Gateways,
/// the one on `wp-a` only when `with_a`.
fn objects(s1_waypoint: &str, with_a: bool) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app, labels: \
         {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp-b}}\n",
    );
    y += &waypoint_gateway("wp-a");
    y += &waypoint_gateway("wp-b");
    y += &http_service(
        "s1",
        &format!("istio.io/use-waypoint: {s1_waypoint}"),
        "10.96.0.1",
    );
    y += &http_service("s2", "", "10.96.0.2");
    if with_a {
        y += &policy("on-a", "wp-a", "a@example.com");
    }
    y += &policy("on-b", "wp-b", "b@example.com");
    y
}

fn decode(r: &xds_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse) -> ServiceAuthn {
    ServiceAuthn::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap()
}

#[tokio::test]
async fn jwt_rules_go_only_to_the_waypoint_they_target() {
    let c = controller(objects("wp-a", true)).await;
    let mut a = Client::subscribe(&c, WP_A, SERVICE_AUTHN_TYPE_URL).await;
    let mut b = Client::subscribe(&c, WP_B, SERVICE_AUTHN_TYPE_URL).await;
    let mut zt = Client::subscribe(&c, ZTUNNEL, SERVICE_AUTHN_TYPE_URL).await;
    let mut bad = Client::subscribe(&c, WP_BAD, SERVICE_AUTHN_TYPE_URL).await;

    let first_a = a.recv().await;
    assert_eq!(names(&first_a), [S1]);
    let s1 = decode(&first_a);
    assert_eq!((s1.namespace.as_str(), s1.name.as_str()), ("app", "s1"));
    assert_eq!(s1.rules.len(), 1);
    assert_eq!(s1.rules[0].issuer, "a@example.com");
    assert_eq!(s1.rules[0].policy, "app/on-a");
    assert_eq!(s1.rules[0].jwks_uri, "http://10.1.0.9:8000/jwks.json");
    let first_b = b.recv().await;
    assert_eq!(names(&first_b), [S2]);
    assert_eq!(decode(&first_b).rules[0].issuer, "b@example.com");
    assert!(zt.recv().await.resources.is_empty());
    assert!(bad.recv().await.resources.is_empty());

    // s1 moves to wp-b: wp-a loses it, wp-b gets s1 with wp-b's rules.
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-b", true)).unwrap();
    let gone = a.recv().await;
    assert_eq!(gone.removed_resources, [S1]);
    let moved = b.recv().await;
    assert_eq!(names(&moved), [S1]);
    assert_eq!(decode(&moved).rules[0].issuer, "b@example.com");

    // s1 goes back to wp-a, then wp-a's policy is deleted: its resource is removed.
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-a", true)).unwrap();
    assert_eq!(names(&a.recv().await), [S1]);
    std::fs::write(c.dir.path().join("objects/a.yaml"), objects("wp-a", false)).unwrap();
    let removed = a.recv().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, [S1]);
}
