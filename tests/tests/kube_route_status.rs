//! Mesh route status in Kubernetes mode, against the API-server double with the install's
//! RBAC: the controller reads HTTPRoutes, GRPCRoutes and ReferenceGrants by list + watch and
//! writes `Accepted`/`ResolvedRefs` per Service parent (controllerName
//! `istio.io/mesh-controller`) through the status subresource, follows changes (a
//! ReferenceGrant appearing), and never loops on its own writes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zmesh_tests::apiserver::ApiServer;
use zmesh_tests::controller::in_process::{self, KubeController};

const ROUTES: &str = "gateway.networking.k8s.io/v1";

struct Setup {
    api: ApiServer,
    /// Kept running for the test; stopped when the test ends.
    _ctl: KubeController,
}

async fn setup() -> Setup {
    zmesh_core::tls::install_default_provider();
    let api = ApiServer::start().await;
    api.install_istio_crds();
    api.install_gateway_api_crds();
    let ctl = in_process::start_kube(&api).await;
    Setup { api, _ctl: ctl }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Our entry for `parent` in the route's `status.parents`.
fn parent_status(api: &ApiServer, kind: &str, ns: &str, name: &str, parent: &str) -> Option<Value> {
    let r = api.get(ROUTES, kind, ns, name)?;
    r["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| {
            p["controllerName"] == "istio.io/mesh-controller" && p["parentRef"]["name"] == parent
        })
        .cloned()
}

fn condition<'a>(entry: &'a Value, kind: &str) -> &'a Value {
    entry["conditions"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {entry}"))
}

fn reason(entry: &Value, kind: &str) -> (String, String) {
    let c = condition(entry, kind);
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn pair(status: &str, reason: &str) -> (String, String) {
    (status.to_owned(), reason.to_owned())
}

#[tokio::test]
async fn route_status_per_service_parent() {
    let s = setup().await;
    let api = &s.api;
    for (ns, labels) in [
        ("shop", json!({"istio.io/use-waypoint": "wp"})),
        ("client", json!({})),
    ] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels}}))
            .unwrap();
    }
    api.apply(json!({"apiVersion": ROUTES, "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}))
        .unwrap();
    for name in ["echo", "echo-v2"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": "10.96.1.1", "ports": [{"name": "http", "port": 80}]}}))
            .unwrap();
    }
    let parent = json!({"group": "", "kind": "Service", "name": "echo", "namespace": "shop"});
    // A consumer route whose backend is in `shop`: not permitted until a ReferenceGrant.
    api.apply(json!({"apiVersion": ROUTES, "kind": "HTTPRoute",
        "metadata": {"name": "consumer", "namespace": "client"},
        "spec": {"parentRefs": [parent],
                 "rules": [{"backendRefs": [{"name": "echo-v2", "namespace": "shop", "port": 80}]}]}}))
        .unwrap();
    // A route with a bad regex: refused whole.
    api.apply(json!({"apiVersion": ROUTES, "kind": "HTTPRoute",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"parentRefs": [parent], "rules": [{"matches": [{"headers": [
            {"type": "RegularExpression", "name": "x", "value": "(["}]}]}]}}))
        .unwrap();
    // A GRPCRoute on a Service port that does not exist, and one with an unknown backend.
    api.apply(json!({"apiVersion": ROUTES, "kind": "GRPCRoute",
        "metadata": {"name": "g", "namespace": "shop"},
        "spec": {"parentRefs": [
                    {"group": "", "kind": "Service", "name": "echo", "port": 7070},
                    {"group": "", "kind": "Service", "name": "echo"}],
                 "rules": [{"backendRefs": [{"name": "nope", "port": 80}]}]}}))
        .unwrap();

    wait_for("every route's status", || {
        parent_status(api, "HTTPRoute", "client", "consumer", "echo").is_some()
            && parent_status(api, "HTTPRoute", "shop", "bad", "echo").is_some()
            && parent_status(api, "GRPCRoute", "shop", "g", "echo").is_some()
    })
    .await;

    let consumer = parent_status(api, "HTTPRoute", "client", "consumer", "echo").unwrap();
    assert_eq!(
        reason(&consumer, "Accepted"),
        pair("True", "Accepted"),
        "{consumer}"
    );
    assert_eq!(
        reason(&consumer, "ResolvedRefs"),
        pair("False", "RefNotPermitted"),
        "{consumer}"
    );
    assert_eq!(condition(&consumer, "Accepted")["observedGeneration"], 1);

    let bad = parent_status(api, "HTTPRoute", "shop", "bad", "echo").unwrap();
    assert_eq!(reason(&bad, "Accepted"), pair("False", "UnsupportedValue"));
    let message = condition(&bad, "Accepted")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("rules[0].matches[0].headers[0]")
            && message.contains("regular expression"),
        "{message}"
    );

    let g = api.get(ROUTES, "GRPCRoute", "shop", "g").unwrap();
    let entries = g["status"]["parents"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{g}");
    assert_eq!(entries[0]["parentRef"]["port"], 7070);
    assert_eq!(
        reason(&entries[0], "Accepted"),
        pair("False", "NoMatchingParent")
    );
    assert_eq!(reason(&entries[1], "Accepted"), pair("True", "Accepted"));
    assert_eq!(
        reason(&entries[1], "ResolvedRefs"),
        pair("False", "BackendNotFound")
    );

    // The backend's namespace grants the reference: ResolvedRefs turns True.
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-client", "namespace": "shop"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                           "namespace": "client"}],
                 "to": [{"group": "", "kind": "Service"}]}}),
    )
    .unwrap();
    wait_for("ResolvedRefs=True on the consumer route", || {
        parent_status(api, "HTTPRoute", "client", "consumer", "echo")
            .is_some_and(|p| reason(&p, "ResolvedRefs") == pair("True", "ResolvedRefs"))
    })
    .await;

    // Written statuses come back as watch events; they must not cause more writes.
    let patches = || {
        api.requests()
            .iter()
            .filter(|r| {
                r.starts_with("PATCH") && (r.contains("httproutes") || r.contains("grpcroutes"))
            })
            .count()
    };
    let settled = patches();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(patches(), settled, "status writes must not loop");
}

/// GEP-1426 route types and a waypoint Gateway parent, written to the API: an HTTPRoute on a
/// Service port a GRPCRoute takes is `Conflicted` until the GRPCRoute goes; its parentRef to
/// the waypoint Gateway is `NotAllowedByListeners`.
#[tokio::test]
async fn conflicted_and_waypoint_gateway_parents() {
    let s = setup().await;
    let api = &s.api;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/use-waypoint": "wp"}}}))
        .unwrap();
    api.apply(json!({"apiVersion": ROUTES, "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "shop"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}))
        .unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.1.1", "ports": [{"name": "grpc", "port": 7070}]}}))
        .unwrap();
    let echo = json!({"group": "", "kind": "Service", "name": "echo"});
    let backends = json!([{"name": "echo", "port": 7070}]);
    api.apply(json!({"apiVersion": ROUTES, "kind": "GRPCRoute",
        "metadata": {"name": "g", "namespace": "shop"},
        "spec": {"parentRefs": [echo], "rules": [{"backendRefs": backends}]}}))
        .unwrap();
    api.apply(json!({"apiVersion": ROUTES, "kind": "HTTPRoute",
        "metadata": {"name": "h", "namespace": "shop"},
        "spec": {"parentRefs": [echo, {"name": "wp"}],
                 "rules": [{"backendRefs": backends}]}}))
        .unwrap();
    wait_for("both routes' status on every parent", || {
        parent_status(api, "HTTPRoute", "shop", "h", "echo").is_some()
            && parent_status(api, "HTTPRoute", "shop", "h", "wp").is_some()
            && parent_status(api, "GRPCRoute", "shop", "g", "echo").is_some()
    })
    .await;
    let h = parent_status(api, "HTTPRoute", "shop", "h", "echo").unwrap();
    assert_eq!(reason(&h, "Accepted"), pair("False", "Conflicted"), "{h}");
    let wp = parent_status(api, "HTTPRoute", "shop", "h", "wp").unwrap();
    assert_eq!(
        reason(&wp, "Accepted"),
        pair("False", "NotAllowedByListeners"),
        "{wp}"
    );
    let g = parent_status(api, "GRPCRoute", "shop", "g", "echo").unwrap();
    assert_eq!(reason(&g, "Accepted"), pair("True", "Accepted"), "{g}");

    // The GRPCRoute goes: the HTTPRoute takes the port.
    api.delete(ROUTES, "GRPCRoute", "shop", "g").unwrap();
    wait_for("the HTTPRoute accepted once the GRPCRoute is gone", || {
        parent_status(api, "HTTPRoute", "shop", "h", "echo")
            .is_some_and(|p| reason(&p, "Accepted") == pair("True", "Accepted"))
    })
    .await;
}
