//! The controller's Kubernetes source (`zmesh_controller::source::kube`) against the
//! API-server double (`zmesh_tests::apiserver`), through the real kube-rs client over HTTP:
//! the initial list, live changes, bookmarks, `410 Gone` and re-list, CRDs that are not
//! installed, an unreadable object, streaming lists, and a node's field-selected pod watch.
//! Also checks of the double itself, so a passing source test means something; the CA's
//! TokenReview authenticator (`token_review`); and the node agent's Kubernetes pod source and
//! binary (`agent`, `the_agent_binary_...`).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use zmesh_controller::source::Store;
use zmesh_controller::source::kube::{KubeSource, Options};
use zmesh_controller::translate::{Kind, Objects};
use zmesh_tests::apiserver::{ApiServer, Options as ApiOptions, Rbac};
use zmesh_tests::manifests::{Component, Manifests};

/// The components run as the service accounts the install gives them, so the double's RBAC
/// (the install's rules) applies to them.
const CONTROLLER: Component = Component::Controller;
const AGENT: Component = Component::Agent;

const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `cond` on the store until it holds, or fails naming `what`.
async fn until(store: &Store, what: &str, cond: impl Fn(&Objects) -> bool) {
    let start = tokio::time::Instant::now();
    loop {
        if cond(&store.read()) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_synced(store: &Store, kinds: &[Kind]) {
    let start = tokio::time::Instant::now();
    while !store.is_synced(kinds) {
        assert!(
            start.elapsed() < DEADLINE,
            "kinds {kinds:?} not all synced after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ns(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}], "serviceAccountName": "sa"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}});
    if !node.is_empty() {
        p["spec"]["nodeName"] = json!(node);
    }
    p
}

fn service(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80}],
                    "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}})
}

fn slice(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]})
}

fn policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}})
}

fn gateway_kind(kind: &str, ns: &str, name: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": ns}, "spec": {}})
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

fn pod_label<'a>(o: &'a Objects, ns: &str, name: &str, label: &str) -> Option<&'a str> {
    o.pods
        .get(&key(ns, name))?
        .metadata
        .labels
        .as_ref()?
        .get(label)
        .map(String::as_str)
}

/// A double with one object of every kind (CRDs installed), and a source watching them all.
async fn full_cluster(bookmarks: Duration) -> (ApiServer, Store, KubeSource) {
    let api = ApiServer::start_with(ApiOptions {
        bookmark_interval: bookmarks,
    })
    .await;
    api.install_istio_crds();
    api.install_gateway_api_crds();
    for o in [
        ns("shop", json!({"istio.io/dataplane-mode": "ambient"})),
        ns("other", json!({})),
        pod("shop", "a", "n1", json!({"app": "web"})),
        pod("shop", "b", "n1", json!({"app": "web"})),
        pod("shop", "c", "n2", json!({"app": "web"})),
        pod("other", "d", "n2", json!({})),
        pod("other", "e", "n1", json!({})),
        service("shop", "web"),
        slice("shop", "web-abc"),
        policy("shop", "deny-evil"),
        gateway_kind("Gateway", "shop", "waypoint"),
        gateway_kind("HTTPRoute", "shop", "route"),
        gateway_kind("GRPCRoute", "shop", "grpc"),
        json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                "name": "waypoint"}], "jwtRules": [{"issuer": "me@example.com",
                "jwksUri": "https://idp.example.com/jwks.json"}]}}),
    ] {
        api.apply(o).unwrap();
    }
    let store = Store::new();
    // Pages of 2 pods, so the initial list needs continue tokens.
    let options = Options::default().config(Kind::Pod, watcher::Config::default().page_size(2));
    let source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &Kind::ALL,
        &options,
    );
    (api, store, source)
}

#[tokio::test]
async fn initial_list_fills_the_store_and_marks_every_kind_synced() {
    let (api, store, _source) = full_cluster(Duration::from_secs(60)).await;
    until_synced(&store, &Kind::ALL).await;
    let o = store.read();
    assert_eq!(o.count(Kind::Namespace), 2);
    assert_eq!(o.count(Kind::Pod), 5);
    assert_eq!(o.count(Kind::Service), 1);
    assert_eq!(o.count(Kind::EndpointSlice), 1);
    assert_eq!(o.count(Kind::AuthorizationPolicy), 1);
    assert_eq!(o.count(Kind::Gateway), 1);
    assert_eq!(o.count(Kind::HttpRoute), 1);
    assert_eq!(o.count(Kind::GrpcRoute), 1);
    assert_eq!(o.count(Kind::RequestAuthentication), 1);
    assert_eq!(
        o.request_authentications[&key("shop", "jwt")].data["spec"]["jwtRules"][0]["issuer"],
        "me@example.com"
    );
    assert!(o.namespaces.contains_key(&key("", "shop")));
    assert_eq!(
        o.authorization_policies[&key("shop", "deny-evil")]
            .spec
            .action
            .as_deref(),
        Some("DENY")
    );
    assert_eq!(pod_label(&o, "shop", "a", "app"), Some("web"));
    drop(o);
    // The pods came in three pages of at most 2.
    let pages: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .collect();
    assert_eq!(pages.len(), 3, "{pages:#?}");
    assert!(pages.iter().all(|p| p.contains("limit=2")), "{pages:#?}");
    assert_eq!(
        pages.iter().filter(|p| p.contains("continue=")).count(),
        2,
        "{pages:#?}"
    );
}

#[tokio::test]
async fn changes_propagate_and_bookmarks_do_not_disturb() {
    let (api, store, _source) = full_cluster(Duration::from_millis(50)).await;
    until_synced(&store, &Kind::ALL).await;

    api.apply(pod("shop", "new", "n1", json!({"app": "web"})))
        .unwrap();
    until(&store, "pod shop/new added", |o| {
        o.pods.contains_key(&key("shop", "new"))
    })
    .await;
    api.apply(pod("shop", "new", "n1", json!({"app": "api"})))
        .unwrap();
    until(&store, "pod shop/new relabelled", |o| {
        pod_label(o, "shop", "new", "app") == Some("api")
    })
    .await;
    api.delete("v1", "Pod", "shop", "new").unwrap();
    until(&store, "pod shop/new deleted", |o| {
        !o.pods.contains_key(&key("shop", "new"))
    })
    .await;
    api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "shop",
        "deny-evil",
    )
    .unwrap();
    until(&store, "policy deleted", |o| {
        o.authorization_policies.is_empty()
    })
    .await;
    api.apply(ns("other", json!({"istio.io/dataplane-mode": "ambient"})))
        .unwrap();
    until(&store, "namespace other relabelled", |o| {
        o.namespaces[&key("", "other")]
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("istio.io/dataplane-mode"))
    })
    .await;

    // Bookmarks (every 50 ms, and some on demand) change nothing in the store and cause no
    // re-list: the next change is the only one the store sees.
    let lists = api.lists_of("/api/v1/pods");
    for _ in 0..5 {
        api.bookmark_now();
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // let several periodic ones flow
    let generation = store.generation();
    api.apply(pod("shop", "after-bookmarks", "n1", json!({})))
        .unwrap();
    until(&store, "pod after the bookmarks", |o| {
        o.pods.contains_key(&key("shop", "after-bookmarks"))
    })
    .await;
    assert_eq!(store.generation(), generation + 1, "one change, one bump");
    assert_eq!(
        api.lists_of("/api/v1/pods"),
        lists,
        "bookmarks caused a re-list"
    );

    // A bookmark moves the watcher's resourceVersion past changes of other kinds: when its
    // connection is cut, the pod watch resumes from the bookmark's version (not from its
    // last pod event's), so it survives a compaction that only bookmarks let it skip.
    api.apply(service("shop", "other-kind")).unwrap();
    let bookmark_rv = api.resource_version();
    let start = tokio::time::Instant::now();
    loop {
        api.bookmark_now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = api.requests().len();
        api.cut_watches();
        let resumed = loop {
            let watch = api.requests()[seen..]
                .iter()
                .find(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
                .cloned();
            if let Some(w) = watch {
                break w;
            }
            assert!(start.elapsed() < DEADLINE, "the pod watch never resumed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if resumed.contains(&format!("resourceVersion={bookmark_rv}&"))
            || resumed.ends_with(&format!("resourceVersion={bookmark_rv}"))
        {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the pod watch never resumed from the bookmark's version {bookmark_rv}: {resumed}"
        );
    }
    assert_eq!(api.lists_of("/api/v1/pods"), lists, "no re-list was needed");
}

#[tokio::test]
async fn expired_watch_relists_and_the_store_converges() {
    let (api, store, _source) = full_cluster(Duration::from_secs(60)).await;
    until_synced(&store, &Kind::ALL).await;
    let lists = api.lists_of("/api/v1/pods");

    // The API server goes away (watches cut, requests refused); meanwhile objects change
    // and the history is compacted, so the watchers' resourceVersions are too old.
    api.set_unavailable(true);
    api.cut_watches();
    api.delete("v1", "Pod", "shop", "b").unwrap();
    api.apply(pod("shop", "a", "n1", json!({"app": "changed"})))
        .unwrap();
    api.apply(pod("shop", "z", "n2", json!({}))).unwrap();
    api.delete("v1", "Service", "shop", "web").unwrap();
    api.compact_all();
    // Give the watchers time to hit the 503s (they back off, then retry).
    let start = tokio::time::Instant::now();
    while !api
        .requests()
        .iter()
        .rev()
        .take(50)
        .any(|r| r.contains("watch=true"))
    {
        assert!(start.elapsed() < DEADLINE, "no watcher retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.set_unavailable(false);

    until(&store, "the store converged after the re-list", |o| {
        !o.pods.contains_key(&key("shop", "b"))
            && o.pods.contains_key(&key("shop", "z"))
            && pod_label(o, "shop", "a", "app") == Some("changed")
            && o.services.is_empty()
    })
    .await;
    assert!(
        api.lists_of("/api/v1/pods") > lists,
        "pods were re-listed after 410 Gone"
    );
    assert_eq!(store.read().count(Kind::Pod), 5);
    // And the watch is live again.
    api.apply(pod("shop", "later", "n1", json!({}))).unwrap();
    until(&store, "a pod after the re-list", |o| {
        o.pods.contains_key(&key("shop", "later"))
    })
    .await;
}

#[tokio::test]
async fn missing_crds_are_synced_empty_and_the_rest_works() {
    let api = ApiServer::start().await;
    api.apply(ns("shop", json!({}))).unwrap();
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    let store = Store::new();
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &Kind::ALL,
        &Options::default(),
    );
    until_synced(&store, &Kind::ALL).await;
    {
        let o = store.read();
        assert_eq!(o.count(Kind::Pod), 1);
        assert_eq!(o.count(Kind::AuthorizationPolicy), 0);
        assert_eq!(o.count(Kind::Gateway), 0);
    }
    // The other kinds stay live.
    api.apply(pod("shop", "b", "n1", json!({}))).unwrap();
    until(&store, "pod b", |o| o.pods.contains_key(&key("shop", "b"))).await;
    // Once the CRD is installed, its objects arrive (the watcher kept retrying).
    api.install_istio_crds();
    api.apply(policy("shop", "deny-evil")).unwrap();
    until(&store, "the policy, after its CRD was installed", |o| {
        o.authorization_policies
            .contains_key(&key("shop", "deny-evil"))
    })
    .await;
    assert_eq!(store.read().count(Kind::Gateway), 0);
}

#[tokio::test]
async fn a_policy_with_fields_outside_the_schema_still_loads() {
    let api = ApiServer::start().await;
    api.install_istio_crds();
    let mut newer = policy("shop", "from-a-newer-istio");
    newer["spec"]["someFutureField"] = json!({"x": 1});
    api.apply(newer).unwrap();
    let store = Store::new();
    let kinds = [Kind::AuthorizationPolicy];
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &kinds,
        &Options::default(),
    );
    until_synced(&store, &kinds).await;
    let objects = store.read();
    let p = &objects.authorization_policies[&key("shop", "from-a-newer-istio")];
    assert!(p.spec.unknown.contains_key("someFutureField"));
}

#[tokio::test]
async fn an_unreadable_policy_keeps_its_kind_unsynced_until_fixed() {
    let api = ApiServer::start().await;
    api.install_istio_crds();
    // A field of the wrong type cannot be read at all (a field the schema does not know can:
    // see the next test).
    let mut bad = policy("shop", "deny-evil");
    bad["spec"]["rules"] = json!("not a list");
    api.apply(bad).unwrap();
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    let store = Store::new();
    let kinds = [Kind::Pod, Kind::AuthorizationPolicy];
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &kinds,
        &Options::default(),
    );
    until_synced(&store, &[Kind::Pod]).await;
    // The list was answered (twice: a retry) and still the kind is not synced: a controller
    // never serves a policy set with a policy missing (fail closed).
    let path = "/apis/security.istio.io/v1/authorizationpolicies";
    let start = tokio::time::Instant::now();
    while api.lists_of(path) < 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "the policy list was not retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store.is_synced(&[Kind::AuthorizationPolicy]));
    // Fixed: the next retry lists it.
    api.apply(policy("shop", "deny-evil")).unwrap();
    until_synced(&store, &kinds).await;
    assert_eq!(store.read().count(Kind::AuthorizationPolicy), 1);
}

/// The install's RBAC with `verb` taken out of the controller's rule on `resource`.
fn install_without(resource: &str, verb: &str) -> Rbac {
    let mut m = Manifests::rendered().unwrap();
    m.edit(|o| {
        if o["kind"] != "ClusterRole" || o["metadata"]["name"] != "zmesh-controller" {
            return;
        }
        for rule in o["rules"].as_array_mut().unwrap() {
            if rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == resource)
            {
                rule["verbs"].as_array_mut().unwrap().retain(|v| v != verb);
            }
        }
    });
    Rbac::from_manifests(&m)
}

/// A rule missing from the install fails the controller: without `watch` on pods its pod
/// watch is refused as the real API server refuses it, so it never sees a change; without
/// `list` it never syncs.
#[tokio::test]
async fn a_rule_missing_from_the_install_fails_the_controller() {
    let api = ApiServer::start().await;
    api.set_rbac(install_without("pods", "watch"));
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    let store = Store::new();
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &[Kind::Pod],
        &Options::default(),
    );
    let refused = "pods is forbidden: User \"system:serviceaccount:istio-system:zmesh-controller\" \
                   cannot watch resource \"pods\" in API group \"\" at the cluster scope";
    let start = tokio::time::Instant::now();
    while !api.denied().iter().any(|d| d == refused) {
        assert!(
            start.elapsed() < DEADLINE,
            "no refusal: {:#?}",
            api.denied()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        api.denied()
            .iter()
            .all(|d| d.contains("cannot watch resource \"pods\"")),
        "{:#?}",
        api.denied()
    );

    let api = ApiServer::start().await;
    api.set_rbac(install_without("pods", "list"));
    let store = Store::new();
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &[Kind::Pod],
        &Options::default(),
    );
    let start = tokio::time::Instant::now();
    while !api
        .denied()
        .iter()
        .any(|d| d.contains("cannot list resource \"pods\""))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "no refusal: {:#?}",
            api.denied()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store.is_synced(&[Kind::Pod]));
}

#[tokio::test]
async fn a_node_watch_sees_only_its_pods() {
    let api = ApiServer::start().await;
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    api.apply(pod("shop", "b", "n2", json!({}))).unwrap();
    let store = Store::new();
    let options = Options::default().pods_on_node("n1");
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &[Kind::Pod],
        &options,
    );
    until_synced(&store, &[Kind::Pod]).await;
    assert_eq!(
        store.read().pods.keys().cloned().collect::<Vec<_>>(),
        [key("shop", "a")]
    );
    // Changes on n2 never show; a pod bound to n1 later appears (it enters the selection).
    api.apply(pod("shop", "c", "n2", json!({}))).unwrap();
    api.apply(pod("shop", "pending", "", json!({}))).unwrap();
    api.apply(pod("shop", "pending", "n1", json!({}))).unwrap();
    until(&store, "pod pending bound to n1", |o| {
        o.pods.contains_key(&key("shop", "pending"))
    })
    .await;
    api.delete("v1", "Pod", "shop", "b").unwrap();
    api.delete("v1", "Pod", "shop", "a").unwrap();
    until(&store, "pod a deleted", |o| {
        !o.pods.contains_key(&key("shop", "a"))
    })
    .await;
    assert_eq!(
        store.read().pods.keys().cloned().collect::<Vec<_>>(),
        [key("shop", "pending")]
    );
    // The watch asked the server for n1's pods only.
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dn1")),
        "{:#?}",
        api.requests()
    );
}

#[tokio::test]
async fn streaming_lists_fill_the_store_too() {
    // kube's `StreamingList` strategy: one watch with sendInitialEvents=true, whose end the
    // server marks with a bookmark annotated k8s.io/initial-events-end.
    let api = ApiServer::start().await;
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    api.apply(pod("shop", "b", "n2", json!({}))).unwrap();
    let store = Store::new();
    let options =
        Options::default().config(Kind::Pod, watcher::Config::default().streaming_lists());
    let _source = KubeSource::spawn(
        api.client_for(CONTROLLER),
        store.clone(),
        &[Kind::Pod],
        &options,
    );
    until_synced(&store, &[Kind::Pod]).await;
    assert_eq!(store.read().count(Kind::Pod), 2);
    assert_eq!(api.lists_of("/api/v1/pods"), 0, "no LIST in streaming mode");
    api.delete("v1", "Pod", "shop", "a").unwrap();
    until(&store, "pod a deleted", |o| o.count(Kind::Pod) == 1).await;
}

// The double itself, through kube's plain Api, so the tests above rest on a server that
// answers like the real one.

#[tokio::test]
async fn double_pages_lists_on_a_snapshot_and_expires_old_versions() {
    let api = ApiServer::start().await;
    for name in ["a", "b", "c"] {
        api.apply(pod("shop", name, "n1", json!({}))).unwrap();
    }
    let pods: Api<Pod> = Api::all(api.client());
    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("a continue token");
    // A change after the first page does not leak into the second (same snapshot).
    api.apply(pod("shop", "bb", "n1", json!({}))).unwrap();
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<_> = second
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["c"]);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // Once the history is compacted, the token is too old.
    api.compact_all();
    let err = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err}"
    );

    // A watch from a compacted version gets one 410 ERROR event and ends.
    let mut stream = pods
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(s))) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.next().await.is_none(),
        "the watch must end after 410"
    );

    // A watch from the current version sees later changes, and timeoutSeconds ends it.
    let rv = api.resource_version().to_string();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    api.delete("v1", "Pod", "shop", "a").unwrap();
    match stream.next().await {
        Some(Ok(WatchEvent::Deleted(p))) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("expected DELETED, got {other:?}"),
    }
    // Only bookmarks until timeoutSeconds ends it.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = stream.next().await {
            assert!(
                matches!(event, Ok(WatchEvent::Bookmark(_))),
                "unexpected {event:?}"
            );
        }
    })
    .await;
    assert!(end.is_ok(), "timeoutSeconds=1 must end the watch");

    // Unknown resources are 404 with a Status.
    let ap: Api<zmesh_controller::translate::AuthorizationPolicy> = Api::all(api.client());
    let err = ap.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err}"
    );
}

// The CA's TokenReview authenticator against the double.

mod token_review {
    use std::sync::Arc;

    use tonic::Code;
    use tonic::metadata::MetadataMap;
    use zmesh_controller::ca::{
        Authenticator, Caller, TokenReviewAuthenticator, TokenReviewConfig,
    };
    use zmesh_core::identity::SpiffeId;
    use zmesh_tests::apiserver::TokenInfo;

    use super::*;

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn reviews(api: &ApiServer) -> usize {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"))
            .count()
    }

    fn ztunnel_pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "istio-system", "uid": format!("uid-{name}")},
               "spec": {"nodeName": node, "serviceAccountName": "ztunnel",
                        "containers": [{"name": "z", "image": "z"}]}})
    }

    async fn setup(ttl: Duration) -> (ApiServer, Arc<dyn Authenticator>) {
        let api = ApiServer::start().await;
        let config = TokenReviewConfig {
            cache_ttl: ttl,
            review_timeout: Duration::from_secs(2),
            ..TokenReviewConfig::default()
        };
        let auth = TokenReviewAuthenticator::new(api.client_for(CONTROLLER), config).unwrap();
        (api, Arc::new(auth))
    }

    async fn refused(auth: &Arc<dyn Authenticator>, token: &str, code: Code, needle: &str) {
        let err = auth.authenticate(&md(token)).await.unwrap_err();
        assert_eq!(err.code(), code, "{token}: {err:?}");
        assert!(err.message().contains(needle), "{token}: {}", err.message());
    }

    #[tokio::test]
    async fn workloads_get_their_service_account_and_no_node() {
        let (api, auth) = setup(Duration::from_secs(60)).await;
        api.add_token(
            "w",
            TokenInfo::service_account("shop", "web", &["istio-ca"])
                .bound_to_pod("web-1", "u1")
                .on_node("n1"),
        );
        let caller = auth.authenticate(&md("w")).await.unwrap();
        // A workload's bound node is not trusted: only node accounts act for nodes.
        assert_eq!(
            caller,
            Caller {
                identity: id("shop", "web"),
                node: None
            }
        );
    }

    #[tokio::test]
    async fn the_node_comes_from_the_token_or_its_pod_never_from_the_caller() {
        let (api, auth) = setup(Duration::from_secs(60)).await;
        // The API server put the node into the token.
        api.add_token(
            "z1",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
                .bound_to_pod("ztunnel-a", "uid-ztunnel-a")
                .on_node("n1"),
        );
        let c = auth.authenticate(&md("z1")).await.unwrap();
        assert_eq!(c.identity, id("istio-system", "ztunnel"));
        assert_eq!(c.node.as_deref(), Some("n1"));

        // Only the pod: its node is looked up.
        api.apply(ztunnel_pod("ztunnel-b", "n2")).unwrap();
        api.add_token(
            "z2",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
                .bound_to_pod("ztunnel-b", "uid-ztunnel-b"),
        );
        let mut asserted = md("z2");
        asserted.insert("node-name", "n1".parse().unwrap()); // ignored
        let c = auth.authenticate(&asserted).await.unwrap();
        assert_eq!(c.node.as_deref(), Some("n2"));

        // The pod was replaced by another of the same name: the token is not its.
        api.add_token(
            "z3",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
                .bound_to_pod("ztunnel-b", "uid-of-an-older-pod"),
        );
        refused(&auth, "z3", Code::Unauthenticated, "now another one").await;
        // The pod is gone.
        api.add_token(
            "z4",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
                .bound_to_pod("ztunnel-gone", "u"),
        );
        refused(&auth, "z4", Code::Unauthenticated, "does not exist").await;
        // A node account's token bound to nothing says nothing about the node.
        api.add_token(
            "z5",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"]),
        );
        refused(&auth, "z5", Code::Unauthenticated, "bound to no pod").await;
    }

    #[tokio::test]
    async fn bad_tokens_fail_closed() {
        let (api, auth) = setup(Duration::from_secs(60)).await;
        api.add_token(
            "other-audience",
            TokenInfo::service_account("shop", "web", &["https://kubernetes.default.svc"]),
        );
        api.add_token(
            "user",
            TokenInfo {
                username: "alice".into(),
                audiences: vec!["istio-ca".into()],
                ..TokenInfo::default()
            },
        );
        refused(
            &auth,
            "unknown",
            Code::Unauthenticated,
            "rejected the token",
        )
        .await;
        refused(&auth, "other-audience", Code::Unauthenticated, "audience").await;
        refused(
            &auth,
            "user",
            Code::Unauthenticated,
            "not a service account",
        )
        .await;
        let err = auth.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        // The API server cannot be asked: unavailable, not accepted.
        api.add_token(
            "w",
            TokenInfo::service_account("shop", "web", &["istio-ca"]),
        );
        api.set_unavailable(true);
        // (kube's client retries 503s for minutes; the authenticator gives up after its
        // review timeout.)
        let started = tokio::time::Instant::now();
        refused(&auth, "w", Code::Unavailable, "cannot review").await;
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    /// The CA with everything from Kubernetes: callers by TokenReview, pod placement from
    /// the store that the Kubernetes source fills.
    #[tokio::test]
    async fn a_node_gets_certificates_for_its_pods_only() {
        use xds_proto::istio::v1::auth::IstioCertificateRequest;
        use zmesh_controller::ca::{CaConfig, WorkloadCa, impersonation};
        use zmesh_controller::source::StorePods;
        use zmesh_core::tls::LocalCa;

        let (api, auth) = setup(Duration::from_secs(60)).await;
        let mut a = pod("default", "a", "n1", json!({}));
        a["spec"]["serviceAccountName"] = json!("a");
        let mut b = pod("default", "b", "n2", json!({}));
        b["spec"]["serviceAccountName"] = json!("b");
        api.apply(a).unwrap();
        api.apply(b).unwrap();
        api.add_token(
            "ztunnel-n1",
            TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
                .bound_to_pod("ztunnel-x", "uid-x")
                .on_node("n1"),
        );
        let store = Store::new();
        let _source = KubeSource::spawn(
            api.client_for(CONTROLLER),
            store.clone(),
            &[Kind::Pod],
            &Options::default(),
        );
        until_synced(&store, &[Kind::Pod]).await;
        let ca = WorkloadCa::new(
            LocalCa::generate("root").unwrap(),
            CaConfig::default(),
            auth,
            Arc::new(StorePods::new(store)),
        );
        let request = |identity: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            IstioCertificateRequest {
                csr: rcgen::CertificateParams::default()
                    .serialize_request(&key)
                    .unwrap()
                    .pem()
                    .unwrap(),
                validity_duration: 3600,
                metadata: Some(impersonation(identity)),
            }
        };
        let chain = ca
            .handle(
                &md("ztunnel-n1"),
                &request("spiffe://cluster.local/ns/default/sa/a"),
            )
            .await
            .unwrap()
            .cert_chain;
        assert!(chain.len() >= 2, "leaf and root");
        let err = ca
            .handle(
                &md("ztunnel-n1"),
                &request("spiffe://cluster.local/ns/default/sa/b"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let err = ca
            .handle(
                &md("nobody"),
                &request("spiffe://cluster.local/ns/default/sa/a"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }

    #[tokio::test]
    async fn accepted_tokens_are_cached_refusals_are_not() {
        let (api, auth) = setup(Duration::from_secs(60)).await;
        refused(&auth, "w", Code::Unauthenticated, "rejected").await;
        api.add_token(
            "w",
            TokenInfo::service_account("shop", "web", &["istio-ca"]),
        );
        auth.authenticate(&md("w")).await.unwrap();
        let asked = reviews(&api);
        assert_eq!(asked, 2, "one refusal, one acceptance");
        // Within the TTL the API server is not asked again, even when it would say no now.
        api.remove_token("w");
        for _ in 0..3 {
            auth.authenticate(&md("w")).await.unwrap();
        }
        assert_eq!(reviews(&api), asked);

        // Without a cache every call is reviewed.
        let (api, auth) = setup(Duration::ZERO).await;
        api.add_token(
            "w",
            TokenInfo::service_account("shop", "web", &["istio-ca"]),
        );
        auth.authenticate(&md("w")).await.unwrap();
        api.remove_token("w");
        refused(&auth, "w", Code::Unauthenticated, "rejected").await;
        assert_eq!(reviews(&api), 2);
    }
}

// The node agent's Kubernetes pod source against the double.

mod agent {
    use std::sync::Arc;

    use zmesh_cni::agent::{Cluster, KubePodSource, PodSource};

    use super::*;

    async fn next(rx: &mut tokio::sync::watch::Receiver<Arc<Cluster>>, what: &str) -> Arc<Cluster> {
        tokio::time::timeout(DEADLINE, rx.changed())
            .await
            .unwrap_or_else(|_| panic!("no new snapshot within {DEADLINE:?}: {what}"))
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn the_agent_sees_its_nodes_pods_and_every_namespace() {
        let api = ApiServer::start().await;
        api.apply(ns("shop", json!({}))).unwrap();
        api.apply(pod("shop", "here", "n1", json!({"app": "web"})))
            .unwrap();
        api.apply(pod("shop", "there", "n2", json!({}))).unwrap();
        let source = KubePodSource::start(api.client_for(AGENT), "n1").await;
        let c = source.current();
        let names: Vec<String> = c.pods().map(|p| p.key()).collect();
        assert_eq!(names, ["shop/here"]);
        let here = c.pod("shop", "here").unwrap();
        assert_eq!(here.node_name, "n1");
        assert_eq!(here.service_account, "sa");
        assert_eq!(here.ips, ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert!(!here.uid.is_empty(), "the API server's uid is kept");
        assert!(c.namespace("shop").is_some());

        // A namespace enrolled: a new snapshot with the label.
        let mut rx = source.subscribe();
        api.apply(ns("shop", json!({"istio.io/dataplane-mode": "ambient"})))
            .unwrap();
        let c = next(&mut rx, "namespace labelled").await;
        assert_eq!(
            c.namespace("shop")
                .unwrap()
                .label("istio.io/dataplane-mode"),
            Some("ambient")
        );
        // Pods elsewhere never appear; this node's come and go.
        api.apply(pod("shop", "there-2", "n2", json!({}))).unwrap();
        api.apply(pod("shop", "here-2", "n1", json!({}))).unwrap();
        let mut c = next(&mut rx, "pod here-2").await;
        while c.pod("shop", "here-2").is_none() {
            c = next(&mut rx, "pod here-2").await;
        }
        assert!(c.pod("shop", "there-2").is_none());
        api.delete("v1", "Pod", "shop", "here").unwrap();
        while c.pod("shop", "here").is_some() {
            c = next(&mut rx, "pod here deleted").await;
        }
        assert_eq!(c.pods().count(), 1);
    }
}

/// The `zmesh-cni-agent` binary with `--kube --kubeconfig`: it lists this node's pods from
/// the API server and only then serves the plugin API. (Needs the workspace binaries built:
/// `cargo build --workspace --bins`.)
#[tokio::test]
async fn the_agent_binary_reads_pods_from_the_api_server() {
    use std::process::{Command, Stdio};

    let api = ApiServer::start().await;
    api.apply(ns("shop", json!({}))).unwrap();
    api.apply(pod("shop", "a", "n1", json!({}))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: double, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: test, user: {{token: \"{}\"}}}}]\n\
             contexts: [{{name: test, context: {{cluster: double, user: test}}}}]\n\
             current-context: test\n",
            api.url(),
            api.service_account_token("istio-system", "zmesh-cni-agent"),
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    // Unavailable first: the agent must wait for its initial list before serving.
    api.set_unavailable(true);
    let child = Command::new(zmesh_tests::bin_path("zmesh-cni-agent"))
        .arg("--kube")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--node-name")
        .arg("n1")
        .arg("--run-dir")
        .arg(&run)
        .arg("--ztunnel-socket")
        .arg(dir.path().join("ztunnel.sock"))
        .arg("--no-probe-snat")
        .arg("--health-addr=127.0.0.1:0")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);
    let socket = run.join("agent.sock");
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let start = tokio::time::Instant::now();
    // Waits until `done`, failing with the agent's log if it exits or `DEADLINE` passes.
    let mut wait_agent = async |never: &str, done: &dyn Fn() -> bool| {
        while !done() {
            assert!(
                start.elapsed() < DEADLINE,
                "the agent never {never}:\n{}",
                agent_log()
            );
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the agent exited:\n{}",
                agent_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_agent("listed pods", &|| api.lists_of("/api/v1/pods") > 0).await;
    assert!(!socket.exists(), "the agent served before its initial list");
    api.set_unavailable(false);
    wait_agent("served its API", &|| socket.exists()).await;
    assert!(
        agent_log().contains("listed this node's pods"),
        "{}",
        agent_log()
    );
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dn1")),
        "{:#?}",
        api.requests()
    );
}
