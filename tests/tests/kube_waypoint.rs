//! The controller in Kubernetes mode creates each waypoint's ServiceAccount, Deployment and
//! Service, as istiod does for a Gateway of class `istio-waypoint`, against the API-server
//! double (server-side apply as the install's service account, so the double's RBAC holds
//! the controller to `manifests/controller/rbac.yaml`).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use zmesh_tests::apiserver::{ApiServer, Rbac};
use zmesh_tests::controller::in_process::{self, KubeController};
use zmesh_tests::manifests::{Component, Manifests};

struct Setup {
    api: ApiServer,
    ctl: KubeController,
}

async fn setup() -> Setup {
    setup_with(Rbac::install()).await
}

/// The controller as the install's service account, the double enforcing `rbac`.
async fn setup_with(rbac: Rbac) -> Setup {
    zmesh_core::tls::install_default_provider();
    let api = ApiServer::start().await;
    api.set_rbac(rbac);
    api.install_istio_crds();
    api.install_gateway_api_crds();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    let ctl = in_process::start_kube(&api).await;
    Setup { api, ctl }
}

fn gateway(name: &str, class: &str, listener: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"gatewayClassName": class, "listeners": [listener]}})
}

fn hbone() -> Value {
    json!({"name": "mesh", "port": 15008, "protocol": "HBONE"})
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_waypoint_gateway_gets_its_service_account_deployment_and_service() {
    let s = setup().await;
    s.api
        .apply(gateway("wp", "istio-waypoint", hbone()))
        .unwrap();
    let gw = s
        .api
        .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")
        .unwrap();
    let uid = gw["metadata"]["uid"].clone();
    let deployment = wait_for("the waypoint's Deployment", || {
        s.api.get("apps/v1", "Deployment", "shop", "wp")
    })
    .await;
    let sa = wait_for("the waypoint's ServiceAccount", || {
        s.api.get("v1", "ServiceAccount", "shop", "wp")
    })
    .await;
    let service = wait_for("the waypoint's Service", || {
        s.api.get("v1", "Service", "shop", "wp")
    })
    .await;
    for o in [&deployment, &sa, &service] {
        assert_eq!(
            o["metadata"]["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "name": "wp", "uid": uid}]),
            "{o}"
        );
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["gateway.networking.k8s.io/gateway-name"], "wp",
            "{o}"
        );
        assert_eq!(
            labels["gateway.istio.io/managed"], "istio.io-mesh-controller",
            "{o}"
        );
        let managers: Vec<&str> = o["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["zmesh-controller"], "server-side applied: {o}");
    }
    // The mesh root its pod mounts, in its namespace.
    let root = wait_for("the root ConfigMap", || {
        s.api.get("v1", "ConfigMap", "shop", "istio-ca-root-cert")
    })
    .await;
    assert_eq!(
        root["data"]["root-cert.pem"].as_str().map(str::trim),
        Some(s.ctl.root_pem.trim())
    );
    assert!(
        root["metadata"]["ownerReferences"].is_null(),
        "shared: {root}"
    );
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        zmesh_controller::deploy::default_image(),
        "{container}"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    assert_eq!(
        service["spec"]["ports"],
        json!([
            {"name": "status-port", "port": 15021, "protocol": "TCP", "appProtocol": "tcp"},
            {"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"},
        ])
    );

    // The Service got a cluster IP from the API server: the Gateway's status follows it.
    let vip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();
    let gw = wait_for("Programmed=True with the Service's address", || {
        let gw = s
            .api
            .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")?;
        (condition(&gw, "Programmed")?["status"] == "True").then_some(gw)
    })
    .await;
    assert_eq!(
        gw["status"]["addresses"],
        json!([{"type": "IPAddress", "value": vip}])
    );

    // Deleting the Gateway deletes what it owns (the garbage collector's work).
    s.api
        .delete("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")
        .unwrap();
    assert!(s.api.get("apps/v1", "Deployment", "shop", "wp").is_none());
    assert!(s.api.get("v1", "Service", "shop", "wp").is_none());
    assert!(s.api.get("v1", "ServiceAccount", "shop", "wp").is_none());
}

fn condition(gw: &Value, kind: &str) -> Option<Value> {
    gw["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

fn applies(api: &ApiServer, what: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with("PATCH") && r.contains(what))
        .count()
}

#[tokio::test]
async fn a_changed_gateway_is_re_applied_and_an_unchanged_one_is_not() {
    let s = setup().await;
    s.api
        .apply(gateway("wp", "istio-waypoint", hbone()))
        .unwrap();
    wait_for("the waypoint's Service", || {
        s.api.get("v1", "Service", "shop", "wp")
    })
    .await;
    // Status writes and unrelated changes come back as watch events: no new apply.
    s.api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        applies(&s.api, "/deployments/wp"),
        1,
        "{:?}",
        s.api.requests()
    );

    // New infrastructure labels and a renamed listener: all three objects follow.
    let mut changed = gateway(
        "wp",
        "istio-waypoint",
        json!({"name": "tunnel", "port": 15008, "protocol": "HBONE"}),
    );
    changed["spec"]["infrastructure"] = json!({"labels": {"team": "payments"}});
    s.api.apply(changed).unwrap();
    let service = wait_for("the re-applied Service", || {
        let svc = s.api.get("v1", "Service", "shop", "wp")?;
        (svc["spec"]["ports"][1]["name"] == "tunnel").then_some(svc)
    })
    .await;
    assert_eq!(service["metadata"]["labels"]["team"], "payments");
    let d = s.api.get("apps/v1", "Deployment", "shop", "wp").unwrap();
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["team"],
        "payments"
    );
    assert_eq!(d["metadata"]["generation"], 2, "the pod template changed");
}

#[tokio::test]
async fn only_accepted_waypoint_gateways_get_objects() {
    let s = setup().await;
    s.api
        .apply(gateway(
            "ingress",
            "istio",
            json!({"name": "web", "port": 80, "protocol": "HTTP"}),
        ))
        .unwrap();
    s.api
        .apply(gateway(
            "bad",
            "istio-waypoint",
            json!({"name": "web", "port": 80, "protocol": "HTTP"}),
        ))
        .unwrap();
    s.api
        .apply(gateway("wp", "istio-waypoint", hbone()))
        .unwrap();
    // The valid waypoint's objects show the controller has acted on all three Gateways
    // (one pass translates them together).
    wait_for("the valid waypoint's Deployment", || {
        s.api.get("apps/v1", "Deployment", "shop", "wp")
    })
    .await;
    wait_for("the rejected Gateway's status", || {
        let gw = s
            .api
            .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "bad")?;
        condition(&gw, "Accepted")
    })
    .await;
    for name in ["ingress", "bad"] {
        assert!(s.api.get("apps/v1", "Deployment", "shop", name).is_none());
        assert!(s.api.get("v1", "Service", "shop", name).is_none());
        assert!(s.api.get("v1", "ServiceAccount", "shop", name).is_none());
        assert_eq!(applies(&s.api, &format!("/{name}?")), 0);
    }
}

/// Without the install's `create` on Deployments, the waypoint cannot be made: the Gateway
/// says so (what to grant, where), the double's refusal is the real server's, and once the
/// grant is back the retry succeeds.
#[tokio::test]
async fn a_missing_grant_is_reported_on_the_gateway_until_it_is_fixed() {
    let mut manifests = Manifests::rendered().unwrap();
    manifests.edit(|o| {
        if o["kind"] == "ClusterRole" && o["metadata"]["name"] == "zmesh-controller" {
            o["rules"]
                .as_array_mut()
                .unwrap()
                .retain(|r| r["resources"][0] != "deployments");
        }
    });
    let s = setup_with(Rbac::from_manifests(&manifests)).await;
    s.api
        .apply(gateway("wp", "istio-waypoint", hbone()))
        .unwrap();
    let programmed = wait_for("Programmed=False/NoResources", || {
        let gw = s
            .api
            .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")?;
        condition(&gw, "Programmed").filter(|c| c["reason"] == "NoResources")
    })
    .await;
    assert_eq!(programmed["status"], "False");
    let message = programmed["message"].as_str().unwrap();
    for needle in [
        "Deployment shop/wp",
        "cannot patch resource \"deployments\" in API group \"apps\"",
        "manifests/controller/rbac.yaml",
    ] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    let refused = "deployments.apps \"wp\" is forbidden: User \
                   \"system:serviceaccount:istio-system:zmesh-controller\" cannot patch \
                   resource \"deployments\" in API group \"apps\" in the namespace \"shop\"";
    assert!(
        s.api.denied().iter().any(|d| d == refused),
        "{:#?}",
        s.api.denied()
    );
    assert!(s.api.get("apps/v1", "Deployment", "shop", "wp").is_none());

    // `patch` alone is not enough to create: the API server asks for `create` too.
    let mut patch_only = Manifests::rendered().unwrap();
    patch_only.edit(|o| {
        if o["kind"] == "ClusterRole" && o["metadata"]["name"] == "zmesh-controller" {
            for r in o["rules"].as_array_mut().unwrap() {
                if r["resources"][0] == "deployments" {
                    r["verbs"] = json!(["patch"]);
                }
            }
        }
    });
    s.api.set_rbac(Rbac::from_manifests(&patch_only));
    wait_for("the refusal of the create", || {
        s.api
            .denied()
            .iter()
            .any(|d| d.contains("cannot create resource \"deployments\""))
            .then_some(())
    })
    .await;
    assert!(s.api.get("apps/v1", "Deployment", "shop", "wp").is_none());

    // The install's rules: the retry creates it and the condition clears.
    s.api.set_rbac(Rbac::install());
    wait_for("the Deployment after the grant", || {
        s.api.get("apps/v1", "Deployment", "shop", "wp")
    })
    .await;
    wait_for("Programmed=True", || {
        let gw = s
            .api
            .get("gateway.networking.k8s.io/v1", "Gateway", "shop", "wp")?;
        condition(&gw, "Programmed").filter(|c| c["status"] == "True")
    })
    .await;
}

/// The double's create, as kube-rs sees the real server's: `201` with a cluster IP, `409
/// AlreadyExists` the second time, and RBAC's `create` for a service account.
#[tokio::test]
async fn the_double_creates_like_the_real_server() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, PostParams};
    let api = ApiServer::start().await;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "echo", "namespace": "shop"},
        "spec": {"ports": [{"port": 80}]}}))
    .unwrap();
    let services: Api<Service> = Api::namespaced(api.client(), "shop");
    let created = services.create(&PostParams::default(), &svc).await.unwrap();
    let spec = created.spec.unwrap();
    let ip = spec.cluster_ip.unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    assert_eq!(spec.cluster_ips, Some(vec![ip]));
    match services.create(&PostParams::default(), &svc).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
            assert_eq!(s.message, "services \"echo\" already exists");
        }
        other => panic!("a second create: {other:?}"),
    }
    // The node agent's service account may not create anything.
    let agent: Api<Service> = Api::namespaced(api.client_for(Component::Agent), "shop");
    match agent.create(&PostParams::default(), &svc).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("the agent's create: {other:?}"),
    }
}
