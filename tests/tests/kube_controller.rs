//! The controller in Kubernetes mode, end to end against the API-server double: objects come
//! from list + watch, callers are authenticated with TokenReview, and a node's ztunnel
//! (a projected service-account token bound to its pod on that node) gets certificates only for
//! pods scheduled on its node. Real TLS, real tonic clients, the real kube-rs client over HTTP.

use std::time::{Duration, Instant};

use prost::Message;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{Value, json};
use tonic::Request;
use tonic::transport::Channel;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use xds_proto::istio::workload::{Address, address};
use zmesh_controller::ca::impersonation;
use zmesh_controller::reconcile::ADDRESS_TYPE;
use zmesh_tests::apiserver::{ApiServer, Rbac, TokenInfo};
use zmesh_tests::controller::in_process::{self, KubeController};
use zmesh_tests::controller::{self, SERVER_NAME};
use zmesh_tests::manifests::Manifests;

const ZTUNNEL_N1: &str = "token-of-ztunnel-on-n1";
const STRANGER: &str = "token-of-some-app";

fn pod(name: &str, node: &str, sa: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

struct Setup {
    api: ApiServer,
    ctl: KubeController,
}

async fn setup() -> Setup {
    zmesh_core::tls::install_default_provider();
    let api = ApiServer::start().await;
    api.install_istio_crds();
    api.install_gateway_api_crds();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    api.apply(pod("a", "n1", "sa-a", "10.1.0.1")).unwrap();
    api.apply(pod("b", "n2", "sa-b", "10.1.0.2")).unwrap();
    api.apply(pod("ztunnel-n1", "n1", "ztunnel", "10.1.0.9"))
        .unwrap();
    api.add_token(
        ZTUNNEL_N1,
        TokenInfo::service_account("istio-system", "ztunnel", &["istio-ca"])
            .bound_to_pod("ztunnel-n1", "uid-ztunnel-n1")
            .on_node("n1"),
    );
    api.add_token(
        STRANGER,
        TokenInfo::service_account("shop", "sa-a", &["istio-ca"]).on_node("n1"),
    );

    let ctl = in_process::start_kube(&api).await;
    Setup { api, ctl }
}

async fn channel(s: &Setup) -> Channel {
    let uri = format!("https://127.0.0.1:{}", s.ctl.addr.port());
    controller::endpoint(uri, &s.ctl.root_pem, SERVER_NAME)
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

fn workloads(resp: &DeltaDiscoveryResponse) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = resp
        .resources
        .iter()
        .filter_map(|r| {
            match Address::decode(r.resource.as_ref()?.value.as_slice())
                .ok()?
                .r#type?
            {
                address::Type::Workload(w) => Some((w.name, w.addresses.first()?.clone())),
                address::Type::Service(_) => None,
            }
        })
        .collect();
    v.sort();
    v
}

async fn next(stream: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn kubernetes_objects_reach_ztunnel_over_delta_xds() {
    let s = setup().await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel(&s).await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.1.0.9~ztunnel-n1.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: ADDRESS_TYPE.into(),
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .unwrap();
    let reqs =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut stream = client
        .delta_aggregated_resources(authed(reqs, ZTUNNEL_N1))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    let names: Vec<String> = workloads(&first).into_iter().map(|w| w.0).collect();
    assert_eq!(names, vec!["a", "b", "ztunnel-n1"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        response_nonce: first.nonce,
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .unwrap();

    // A watch event (pod b moves to a new IP) is pushed as exactly that workload.
    s.api.apply(pod("b", "n2", "sa-b", "10.1.0.22")).unwrap();
    let push = next(&mut stream).await;
    assert_eq!(workloads(&push), vec![("b".to_owned(), vec![10, 1, 0, 22])]);

    // A compaction plus a cut watch forces a re-list; a pod deleted meanwhile is removed.
    s.api.compact_all();
    s.api.cut_watches();
    s.api.delete("v1", "Pod", "shop", "a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = next(&mut stream).await;
        if r.removed_resources
            .iter()
            .any(|n| n.ends_with("/Pod/shop/a"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "removal of pod a after the re-list"
        );
    }
}

fn csr(id: &str) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn tokenreview_authenticated_ztunnel_gets_only_its_nodes_certificates() {
    let s = setup().await;
    let mut ca = IstioCertificateServiceClient::new(channel(&s).await);
    let req = |id: &str| IstioCertificateRequest {
        csr: csr(id),
        validity_duration: 3600,
        metadata: Some(impersonation(id)),
    };
    let on_n1 = "spiffe://cluster.local/ns/shop/sa/sa-a";
    let on_n2 = "spiffe://cluster.local/ns/shop/sa/sa-b";
    // The store fills from the watch; until then the CA knows no pod anywhere.
    let deadline = Instant::now() + Duration::from_secs(30);
    let issued = loop {
        match ca.create_certificate(authed(req(on_n1), ZTUNNEL_N1)).await {
            Ok(r) => break r.into_inner(),
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no certificate for a pod on n1: {e}"),
        }
    };
    assert_eq!(
        issued.cert_chain.last().unwrap().trim(),
        s.ctl.root_pem.trim()
    );

    let err = ca
        .create_certificate(authed(req(on_n2), ZTUNNEL_N1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("n1"), "{}", err.message());

    // An app's own token may not impersonate anyone.
    let err = ca
        .create_certificate(authed(req(on_n2), STRANGER))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // An unknown token is not authenticated.
    let err = ca
        .create_certificate(authed(req(on_n1), "forged"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
}

/// Without the install's `create tokenreviews` rule the controller cannot authenticate
/// anyone: the CA fails closed, and the double's refusal is the real server's.
#[tokio::test]
async fn without_the_tokenreview_rule_the_ca_refuses_every_caller() {
    let s = setup().await;
    let mut manifests = Manifests::rendered().unwrap();
    manifests.edit(|o| {
        if o["kind"] == "ClusterRole" && o["metadata"]["name"] == "zmesh-controller" {
            o["rules"]
                .as_array_mut()
                .unwrap()
                .retain(|r| r["resources"][0] != "tokenreviews");
        }
    });
    s.api.set_rbac(Rbac::from_manifests(&manifests));
    let mut ca = IstioCertificateServiceClient::new(channel(&s).await);
    let id = "spiffe://cluster.local/ns/shop/sa/sa-a";
    let req = IstioCertificateRequest {
        csr: csr(id),
        validity_duration: 3600,
        metadata: Some(impersonation(id)),
    };
    let err = ca
        .create_certificate(authed(req, ZTUNNEL_N1))
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let refused = "tokenreviews.authentication.k8s.io is forbidden: User \
                   \"system:serviceaccount:istio-system:zmesh-controller\" cannot create \
                   resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the \
                   cluster scope";
    assert!(
        s.api.denied().iter().any(|d| d == refused),
        "{err}; refusals: {:#?}",
        s.api.denied()
    );
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

fn condition(api: &ApiServer, name: &str) -> Option<Value> {
    let p = api.get("security.istio.io/v1", "AuthorizationPolicy", "shop", name)?;
    p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "ZtunnelAccepted")
        .cloned()
}

#[tokio::test]
async fn policy_status_says_what_ztunnel_enforces() {
    let s = setup().await;
    s.api
        .apply(policy(
            "deny-ssh",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}),
        ))
        .unwrap();
    s.api
        .apply(policy(
            "audit-all",
            json!({"action": "AUDIT", "rules": [{}]}),
        ))
        .unwrap();
    s.api
        .apply(policy(
            "allow-get",
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ["deny-ssh", "audit-all", "allow-get"]
        .iter()
        .any(|n| condition(&s.api, n).is_none())
    {
        assert!(Instant::now() < deadline, "status conditions written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = condition(&s.api, "deny-ssh").unwrap();
    assert_eq!(
        (ok["status"].as_str(), ok["reason"].as_str()),
        (Some("True"), Some("Accepted"))
    );
    assert_eq!(ok["observedGeneration"], 1);
    let audit = condition(&s.api, "audit-all").unwrap();
    assert_eq!(audit["status"], "False");
    assert!(
        audit["message"].as_str().unwrap().contains("AUDIT"),
        "{audit}"
    );
    let l7 = condition(&s.api, "allow-get").unwrap();
    assert_eq!(
        (l7["status"].as_str(), l7["reason"].as_str()),
        (Some("True"), Some("UnsupportedValue"))
    );
    assert!(l7["message"].as_str().unwrap().contains("methods"), "{l7}");

    // Writing a status comes back as a watch event; it must not cause another write.
    let patches = || {
        s.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("PATCH"))
            .count()
    };
    let settled = patches();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(patches(), settled, "status writes must not loop");
    assert_eq!(settled, 3, "{:?}", s.api.requests());

    // A spec change bumps the generation; the condition follows. (The double's `apply`
    // replaces the whole object, status included, so the condition is written afresh.)
    s.api
        .apply(policy(
            "allow-get",
            json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = condition(&s.api, "allow-get");
        if c.as_ref()
            .is_some_and(|c| c["reason"] == "Accepted" && c["observedGeneration"] == 2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "condition after the fix: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gateway(name: &str, listener: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"gatewayClassName": "istio-waypoint", "listeners": [listener]}})
}

fn gateway_condition(api: &ApiServer, name: &str, kind: &str) -> Option<Value> {
    let g = api.get("gateway.networking.k8s.io/v1", "Gateway", "shop", name)?;
    g["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn waypoint_gateway_status_follows_its_listeners_and_service() {
    let s = setup().await;
    let hbone = json!({"name": "mesh", "port": 15008, "protocol": "HBONE"});
    s.api.apply(gateway("wp", hbone)).unwrap();
    s.api
        .apply(gateway(
            "bad",
            json!({"name": "web", "port": 80, "protocol": "HTTP"}),
        ))
        .unwrap();
    wait_for("both Gateways' status", || {
        gateway_condition(&s.api, "wp", "Programmed").is_some()
            && gateway_condition(&s.api, "bad", "Accepted").is_some()
    })
    .await;
    let accepted = gateway_condition(&s.api, "wp", "Accepted").unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");
    // Until its Service (which the controller creates, `tests/tests/kube_waypoint.rs`) has a
    // cluster IP it has no address; that may already be over.
    let programmed = gateway_condition(&s.api, "wp", "Programmed").unwrap();
    assert!(
        programmed["reason"] == "AddressNotAssigned" || programmed["status"] == "True",
        "{programmed}"
    );
    let bad = gateway_condition(&s.api, "bad", "Accepted").unwrap();
    assert_eq!(
        (bad["status"].as_str(), bad["reason"].as_str()),
        (Some("False"), Some("ListenersNotValid"))
    );
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("exactly one listener"),
        "{bad}"
    );

    // The waypoint's Service gets a new VIP: Programmed, with that address.
    s.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "wp", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.5.5", "clusterIPs": ["10.96.5.5"],
                     "ports": [{"name": "mesh", "port": 15008}]}}))
        .unwrap();
    wait_for("the new address", || {
        s.api
            .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")
            .is_some_and(|wp| {
                wp["status"]["addresses"] == json!([{"type": "IPAddress", "value": "10.96.5.5"}])
            })
    })
    .await;
    let programmed = gateway_condition(&s.api, "wp", "Programmed").unwrap();
    assert_eq!(programmed["status"], "True", "{programmed}");

    // Written statuses come back as watch events; they must not cause more writes.
    let patches = || {
        s.api
            .requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("gateways"))
            .count()
    };
    let settled = patches();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(patches(), settled, "status writes must not loop");
}
