//! `zmesh.waypoint.v1.ServiceRoutes` over the controller's real TLS port: a Service's route
//! table (its HTTPRoutes/GRPCRoutes, GAMMA) goes only to the waypoint the Service is bound
//! to, follows the Service when it moves to another waypoint, and is removed when its routes
//! go away. Ztunnels and other waypoints never see it.

#[path = "support/waypoint_ads.rs"]
mod support;

use prost::Message;
use support::{
    Client, WP_A, WP_B, WP_BAD, ZTUNNEL, controller, http_service, names, waypoint_gateway,
};
use xds_proto::SERVICE_ROUTES_TYPE_URL;
use xds_proto::zmesh::waypoint::v1::{ServiceRoutes, backend};

const S1: &str = "app/s1.app.svc.cluster.local";
const S2: &str = "app/s2.app.svc.cluster.local";

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
    y += &waypoint_gateway("wp-a");
    y += &waypoint_gateway("wp-b");
    y += &http_service(
        "s1",
        &format!("istio.io/use-waypoint: {s1_waypoint}"),
        "10.96.0.1",
    );
    y += &http_service("s2", "", "10.96.0.2");
    y += &http_service("s3", "istio.io/use-waypoint: none", "10.96.0.3");
    if with_r1 {
        y += &route("r1", "s1");
    }
    y += &route("r2", "s2");
    y += &route("r3", "s3");
    y
}

#[tokio::test]
async fn routes_go_only_to_the_waypoint_of_their_service() {
    let c = controller(objects("wp-a", true)).await;
    let mut a = Client::subscribe(&c, WP_A, SERVICE_ROUTES_TYPE_URL).await;
    let mut b = Client::subscribe(&c, WP_B, SERVICE_ROUTES_TYPE_URL).await;
    let mut zt = Client::subscribe(&c, ZTUNNEL, SERVICE_ROUTES_TYPE_URL).await;
    let mut bad = Client::subscribe(&c, WP_BAD, SERVICE_ROUTES_TYPE_URL).await;

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
