//! `zmeshctl` (the binary, as an operator runs it) against the API-server double: install
//! (dry run = the checked-in rendered manifests; server-side apply), uninstall, enrol and
//! unenrol, and check on a healthy cluster and on one with a node's agent not ready.
//! Needs `cargo build --workspace --bins` first (the binary is found next to the tests).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use zmesh_tests::apiserver::ApiServer;
use zmesh_tests::bin_path;

#[path = "zmeshctl/fakes.rs"]
mod fakes;
use fakes::{agent_port, fake_port, ztunnel_dump};

const NS: &str = "istio-system";

fn rendered_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/rendered/zmesh.yaml")
}

fn rendered_objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// A kubeconfig for the double.
fn kubeconfig(server: &ApiServer) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("a temporary kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
         users:\n- name: tester\n  user: {{}}\ncontexts:\n- name: double\n  context:\n    \
         cluster: double\n    user: tester\ncurrent-context: double\n",
        server.url()
    );
    std::fs::write(file.path(), text).expect("write the kubeconfig");
    file
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn zmeshctl(kubeconfig: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(bin_path("zmeshctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NO_COLOR")
        .output()
        .await
        .expect("run zmeshctl");
    let run = Run {
        code: out.status.code().expect("zmeshctl exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ zmeshctl {}  (exit {})\n{}{}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    run
}

/// The Gateway API CRDs, stored as the upstream install stores them (cluster-scoped
/// GatewayClass, namespaced routes), so the double serves their kinds.
fn install_gateway_api(server: &ApiServer) {
    for (kind, plural, scope) in [
        ("GatewayClass", "gatewayclasses", "Cluster"),
        ("Gateway", "gateways", "Namespaced"),
        ("HTTPRoute", "httproutes", "Namespaced"),
        ("GRPCRoute", "grpcroutes", "Namespaced"),
    ] {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.gateway.networking.k8s.io")},
            "spec": {"group": "gateway.networking.k8s.io", "scope": scope,
                     "names": {"kind": kind, "plural": plural},
                     "versions": [{"name": "v1", "served": true, "storage": true}]},
        });
        server.apply(crd).expect("store a Gateway API CRD");
    }
}

/// Plays the kubelet and the workload controllers after an install: `nodes` exist, the
/// controller Deployment is rolled out (one pod, its monitoring port serving `/debug/status`:
/// 3 addresses, no policies), and each DaemonSet has a pod on each node, Ready except the
/// (DaemonSet, node) pairs in `not_ready`; each ztunnel pod's admin port serves
/// `dump(node)` as `/config_dump`.
fn roll_out_with(
    server: &ApiServer,
    nodes: &[&str],
    not_ready: &[(&str, &str)],
    dump: &dyn Fn(&str) -> Value,
) {
    for node in nodes {
        server
            .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
            .expect("a node");
    }
    let mut d = server
        .get("apps/v1", "Deployment", NS, "zmesh-controller")
        .expect("the controller Deployment was installed");
    d["status"] = json!({"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                         "availableReplicas": 2});
    server.apply(d).expect("the Deployment's status");
    let controller = fake_port(
        15014,
        vec![(
            "/debug/status",
            200,
            json!({"ready": true, "addresses": 3, "authorizations": 0}),
        )],
    );
    server
        .apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "zmesh-controller-0", "namespace": NS,
                         "labels": {"app": "zmesh-controller"}},
            "spec": {"nodeName": nodes[0], "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": controller.ip,
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("the controller pod");
    for ds in ["zmesh-cni-agent", "ztunnel"] {
        assert!(
            server.get("apps/v1", "DaemonSet", NS, ds).is_some(),
            "{ds} installed"
        );
        for node in nodes {
            let ready = if not_ready.contains(&(ds, node)) {
                "False"
            } else {
                "True"
            };
            let ip = if ds == "ztunnel" {
                fake_port(15000, vec![("/config_dump", 200, dump(node))]).ip
            } else {
                // A not-ready agent here is one whose ztunnel is away; it is still chained.
                let ztunnel = !not_ready.contains(&(ds, node));
                agent_port(true, ztunnel).ip
            };
            server
                .apply(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{ds}-{node}"), "namespace": NS,
                                 "labels": {"app": ds}},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
                    "status": {"phase": "Running", "podIP": ip,
                               "conditions": [{"type": "Ready", "status": ready}]},
                }))
                .expect("a DaemonSet pod");
        }
    }
}

/// [`roll_out_with`] healthy ztunnels (fresh certificates, in sync).
fn roll_out(server: &ApiServer, nodes: &[&str], not_ready: &[(&str, &str)]) {
    let fresh = |n: &str| ztunnel_dump(n, std::time::Duration::from_secs(3600), 2);
    roll_out_with(server, nodes, not_ready, &fresh);
}

#[tokio::test]
async fn install_dry_run_is_the_rendered_manifests_and_hub_tag_change_only_images() {
    // No cluster: a dry run must not need one.
    let nowhere = Path::new("/nonexistent/kubeconfig");
    let file = std::fs::read_to_string(rendered_path()).expect("the rendered manifests");
    let run = zmeshctl(nowhere, &["install", "--dry-run"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout == file,
        "install --dry-run differs from manifests/rendered/zmesh.yaml"
    );

    let run = zmeshctl(
        nowhere,
        &[
            "install",
            "--dry-run",
            "--hub",
            "registry.example:5000/mesh",
            "--tag",
            "1.2.3",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (old, new): (Vec<&str>, Vec<&str>) = (file.lines().collect(), run.stdout.lines().collect());
    assert_eq!(old.len(), new.len());
    let mut images = Vec::new();
    for (o, n) in old.iter().zip(&new) {
        if o == n {
            continue;
        }
        // The images, and the controller's flag naming the waypoints' image.
        assert!(
            o.trim_start().starts_with("image: ")
                || o.trim_start().starts_with("- --waypoint-image="),
            "a non-image line changed: {o:?} -> {n:?}"
        );
        images.push(n.trim().to_owned());
    }
    images.sort();
    let mut expected: Vec<String> = ["zmesh-cni", "zmesh-controller", "zmesh-ztunnel"]
        .map(|i| format!("image: registry.example:5000/mesh/{i}:1.2.3"))
        .to_vec();
    expected.insert(
        0,
        "- --waypoint-image=registry.example:5000/mesh/zmesh-waypoint:1.2.3".to_owned(),
    );
    assert_eq!(images, expected);

    let run = zmeshctl(nowhere, &["install", "--dry-run", "--tag", "1.2:3"]).await;
    assert_eq!(run.code, 2);
    assert!(run.stdout.is_empty() && run.stderr.contains("--tag \"1.2:3\" is not an image tag"));
}

#[tokio::test(flavor = "multi_thread")]
async fn install_applies_every_object_server_side_and_again_changes_nothing() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    let kc = kubeconfig(&server);
    let run = zmeshctl(
        kc.path(),
        &["install", "--hub", "reg.example/m", "--tag", "9.9.9"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let file = std::fs::read_to_string(rendered_path()).expect("the rendered manifests");
    for o in rendered_objects(&file) {
        let (v, k) = (
            o["apiVersion"].as_str().unwrap(),
            o["kind"].as_str().unwrap(),
        );
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
        let name = o["metadata"]["name"].as_str().unwrap();
        let stored = server
            .get(v, k, ns, name)
            .unwrap_or_else(|| panic!("{k} {name} missing"));
        let managers = &stored["metadata"]["managedFields"];
        assert!(
            managers.as_array().is_some_and(|m| m
                .iter()
                .any(|e| e["manager"] == "zmeshctl" && e["operation"] == "Apply")),
            "{k} {name} not applied by zmeshctl: {managers}"
        );
        assert_eq!(stored["spec"].is_null(), o["spec"].is_null(), "{k} {name}");
    }
    let d = server
        .get("apps/v1", "Deployment", NS, "zmesh-controller")
        .unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "reg.example/m/zmesh-controller:9.9.9"
    );
    let patches: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH "))
        .collect();
    assert!(!patches.is_empty());
    assert!(
        patches
            .iter()
            .all(|r| r.contains("fieldManager=zmeshctl") && r.contains("force=true")),
        "{patches:?}"
    );
    // The CRD it applied is served: AuthorizationPolicies can be stored.
    server
        .apply(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": "p", "namespace": "default"}, "spec": {}}),
        )
        .expect("the installed CRD serves AuthorizationPolicy");

    let rv = server.resource_version();
    let run = zmeshctl(
        kc.path(),
        &["install", "--hub", "reg.example/m", "--tag", "9.9.9"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        server.resource_version(),
        rv,
        "a second identical install changed objects"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn install_without_gateway_api_says_so_and_applies_nothing() {
    let server = ApiServer::start().await;
    let kc = kubeconfig(&server);
    let run = zmeshctl(kc.path(), &["install"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("install the Gateway API CRDs first"),
        "{}",
        run.stderr
    );
    assert!(!server.requests().iter().any(|r| r.starts_with("PATCH ")));
    assert!(server.get("v1", "Namespace", "", NS).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn uninstall_deletes_what_install_created_keeping_namespace_and_crd_unless_purged() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    let kc = kubeconfig(&server);
    assert_eq!(zmeshctl(kc.path(), &["install"]).await.code, 0);
    let crd = (
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "",
        "authorizationpolicies.security.istio.io",
    );

    let run = zmeshctl(kc.path(), &["uninstall", "--dry-run"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("would delete Deployment istio-system/zmesh-controller")
    );
    assert!(!server.requests().iter().any(|r| r.starts_with("DELETE ")));

    let run = zmeshctl(kc.path(), &["uninstall"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (v, k, ns, n) in [
        ("apps/v1", "Deployment", NS, "zmesh-controller"),
        ("apps/v1", "DaemonSet", NS, "ztunnel"),
        ("apps/v1", "DaemonSet", NS, "zmesh-cni-agent"),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "",
            "zmesh-controller",
        ),
        (
            "gateway.networking.k8s.io/v1",
            "GatewayClass",
            "",
            "istio-waypoint",
        ),
    ] {
        assert!(server.get(v, k, ns, n).is_none(), "{k} {n} left behind");
    }
    assert!(
        server.get("v1", "Namespace", "", NS).is_some(),
        "namespace deleted without --purge"
    );
    assert!(
        server.get(crd.0, crd.1, crd.2, crd.3).is_some(),
        "CRD deleted without --purge"
    );

    let run = zmeshctl(kc.path(), &["uninstall", "--purge"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(server.get("v1", "Namespace", "", NS).is_none());
    assert!(server.get(crd.0, crd.1, crd.2, crd.3).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn enrol_and_unenrol_set_and_remove_only_the_dataplane_label() {
    let server = ApiServer::start().await;
    server
        .apply(json!({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "demo", "labels": {"team": "a"}}}))
        .unwrap();
    let kc = kubeconfig(&server);
    let labels =
        || server.get("v1", "Namespace", "", "demo").unwrap()["metadata"]["labels"].clone();

    assert_eq!(zmeshctl(kc.path(), &["enrol", "demo"]).await.code, 0);
    assert_eq!(
        labels(),
        json!({"team": "a", "istio.io/dataplane-mode": "ambient"})
    );
    assert_eq!(zmeshctl(kc.path(), &["unenrol", "demo"]).await.code, 0);
    assert_eq!(labels(), json!({"team": "a"}));

    let run = zmeshctl(kc.path(), &["enrol", "nope"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("namespace \"nope\" not found"),
        "{}",
        run.stderr
    );
    let rv = server.resource_version();
    let run = zmeshctl(kc.path(), &["enrol", "istio-system"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("excludes kube-system and istio-system"),
        "{}",
        run.stderr
    );
    assert_eq!(server.resource_version(), rv);
}

fn checks_of(stdout: &str) -> Vec<Value> {
    let doc: Value = serde_json::from_str(stdout).expect("check -o json prints JSON");
    doc["checks"].as_array().expect("a list of checks").clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_healthy_cluster_and_names_a_node_whose_agent_is_not_ready() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    let kc = kubeconfig(&server);
    assert_eq!(zmeshctl(kc.path(), &["install"]).await.code, 0);
    roll_out(&server, &["node-a", "node-b"], &[]);

    let run = zmeshctl(kc.path(), &["check"]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let lines: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with('✔')).collect();
    assert_eq!(lines.len(), 10, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("✔ CNI plugin chained on every node: 2/2 nodes, in 10-calico.conflist\n"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains('✘') && !run.stdout.contains("\x1b["),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("✔ ztunnel ready on every node: 2/2 nodes")
    );
    assert!(
        run.stdout.contains(
            "✔ workload certificates valid: 2 certificates on 2 ztunnels, none near expiry"
        ) && run
            .stdout
            .contains("✔ ztunnel xDS in sync with the controller: 2 ztunnels"),
        "{}",
        run.stdout
    );
    let run = zmeshctl(kc.path(), &["check", "-o", "json"]).await;
    assert_eq!(run.code, 0);
    assert!(checks_of(&run.stdout).iter().all(|c| c["ok"] == true));

    // The agent on node-b stops being ready.
    roll_out(
        &server,
        &["node-a", "node-b"],
        &[("zmesh-cni-agent", "node-b")],
    );
    let run = zmeshctl(kc.path(), &["check"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains(
            "✘ node agent ready on every node: 1/2 nodes; not on node-b \
             (pod zmesh-cni-agent-node-b not ready)\n    hint: kubectl -n istio-system get pods"
        ),
        "{}",
        run.stdout
    );
    let run = zmeshctl(kc.path(), &["check", "-o", "json"]).await;
    assert_eq!(run.code, 1);
    let checks = checks_of(&run.stdout);
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["node agent ready on every node"]);

    // node-b's agent runs, but another CNI rewrote the conflist without our entry and the
    // agent could not put it back: its readiness says why, and check repeats it.
    roll_out(&server, &["node-a", "node-b"], &[]);
    let mut pod = server
        .get("v1", "Pod", NS, "zmesh-cni-agent-node-b")
        .unwrap();
    pod["status"]["podIP"] = json!(agent_port(false, true).ip);
    pod["status"]["conditions"][0]["status"] = json!("False");
    server.apply(pod).unwrap();
    let run = zmeshctl(kc.path(), &["check"]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "✘ CNI plugin chained on every node: 1/2 nodes; not on node-b (zmesh-cni missing \
             from 10-calico.conflist, the file the container runtime loads from \
             /host/etc/cni/net.d)\n    hint: "
        ),
        "{}",
        run.stdout
    );
    let run = zmeshctl(kc.path(), &["check", "-o", "json"]).await;
    let failed: Vec<String> = checks_of(&run.stdout)
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        failed,
        [
            "node agent ready on every node",
            "CNI plugin chained on every node"
        ]
    );

    // A node with no ztunnel pod at all.
    roll_out(&server, &["node-a", "node-b", "node-c"], &[]);
    server.delete("v1", "Pod", NS, "ztunnel-node-c");
    let run = zmeshctl(kc.path(), &["check"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("✘ ztunnel ready on every node: 2/3 nodes; not on node-c (no pod)")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_install_check_finds_an_old_release_and_missing_gateway_api() {
    let server = ApiServer::start().await;
    server.set_version("1", "32");
    let kc = kubeconfig(&server);
    let run = zmeshctl(kc.path(), &["check", "--pre", "-o", "json"]).await;
    assert_eq!(run.code, 1);
    let checks = checks_of(&run.stdout);
    let oks: Vec<(&str, bool)> = checks
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        oks,
        [
            ("Kubernetes API reachable", true),
            ("Kubernetes version", false),
            ("Gateway API CRDs installed", false)
        ]
    );
    assert!(checks[2]["hint"].as_str().unwrap().contains("gateway-api"));

    server.set_version("1", "33+");
    install_gateway_api(&server);
    let run = zmeshctl(kc.path(), &["check", "--pre"]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);

    // An unreachable API: one failed line, the rest not attempted.
    drop(server);
    let run = zmeshctl(kc.path(), &["check", "-o", "json"]).await;
    assert_eq!(run.code, 1);
    let checks = checks_of(&run.stdout);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0]["ok"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_on_near_expiry_certificates_and_a_ztunnel_out_of_sync() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    let kc = kubeconfig(&server);
    assert_eq!(zmeshctl(kc.path(), &["install"]).await.code, 0);
    // node-b's ztunnel: a certificate with 2 of its 24 hours left (renewals failing) and one
    // workload fewer than the controller serves.
    let dump = |node: &str| {
        let hours = if node == "node-b" { 22 } else { 1 };
        let workloads = if node == "node-b" { 1 } else { 2 };
        ztunnel_dump(
            node,
            std::time::Duration::from_secs(hours * 3600),
            workloads,
        )
    };
    roll_out_with(&server, &["node-a", "node-b"], &[], &dump);
    let run = zmeshctl(kc.path(), &["check", "-o", "json"]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let checks = checks_of(&run.stdout);
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] == false).collect();
    assert_eq!(failed.len(), 2, "{}", run.stdout);
    let certs = failed[0];
    assert_eq!(certs["name"], "workload certificates valid");
    let detail = certs["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("ztunnel-node-b: spiffe://cluster.local/ns/demo/sa/app expires in")
            && detail.contains("% of its life left")
            && !detail.contains("node-a"),
        "{detail}"
    );
    assert!(
        certs["hint"]
            .as_str()
            .unwrap()
            .contains("renews at half-life")
    );
    let xds = failed[1];
    assert_eq!(xds["name"], "ztunnel xDS in sync with the controller");
    assert_eq!(
        xds["detail"],
        "ztunnel-node-b has 2 addresses and 0 policies, the controller serves 3 and 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ztunnel_config_reads_the_admin_port_through_a_port_forward() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    let kc = kubeconfig(&server);
    assert_eq!(zmeshctl(kc.path(), &["install"]).await.code, 0);
    roll_out(&server, &["node-a", "node-b"], &[]);

    let run = zmeshctl(
        kc.path(),
        &["ztunnel-config", "workloads", "--node", "node-b"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "POD",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL"
        ]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [
            "demo",
            "app-node-b",
            "10.244.1.5",
            "node-b",
            "None",
            "HBONE"
        ]
    );
    assert!(
        server.requests().iter().any(|r| r
            == "GET /api/v1/namespaces/istio-system/pods/ztunnel-node-b/portforward?&ports=15000"),
        "{:?}",
        server.requests()
    );

    let run = zmeshctl(kc.path(), &["ztunnel-config", "services", "ztunnel-node-a"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["demo", "web", "10.96.0.10", "None", "1/1"]
    );
    let run = zmeshctl(kc.path(), &["ztunnel-config", "certificates", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let certs: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        certs[0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/app"
    );
    let run = zmeshctl(kc.path(), &["ztunnel-config", "certificates"]).await;
    assert!(
        run.stdout
            .lines()
            .nth(1)
            .unwrap()
            .contains("Leaf   Available   true")
    );

    // No ztunnel on that node; a pod the forward cannot reach.
    let run = zmeshctl(
        kc.path(),
        &["ztunnel-config", "workloads", "--node", "nope"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("no running ztunnel pod on node nope"),
        "{}",
        run.stderr
    );
    let run = zmeshctl(kc.path(), &["ztunnel-config", "policies", "ztunnel-gone"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("port-forward to istio-system/ztunnel-gone port 15000")
            && run.stderr.contains("not found"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waypoints_are_applied_listed_bound_and_deleted() {
    let server = ApiServer::start().await;
    install_gateway_api(&server);
    for (name, labels) in [
        ("shop", json!({"istio.io/dataplane-mode": "ambient"})),
        ("plain", json!({})),
    ] {
        server
            .apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }
    let kc = kubeconfig(&server);

    let run = zmeshctl(
        kc.path(),
        &[
            "waypoint",
            "apply",
            "-n",
            "shop",
            "--for",
            "all",
            "--enroll-namespace",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let gw = server
        .get(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            "shop",
            "waypoint",
        )
        .expect("the Gateway was created");
    assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        gw["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    assert_eq!(gw["metadata"]["labels"]["istio.io/waypoint-for"], "all");
    let ns = server.get("v1", "Namespace", "", "shop").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/use-waypoint"],
        "waypoint"
    );
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );

    let run = zmeshctl(
        kc.path(),
        &["waypoint", "apply", "-n", "plain", "--name", "wp2"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("namespace plain is not enrolled"),
        "{}",
        run.stderr
    );
    // A Gateway of another class is not a waypoint.
    server
        .apply(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                      "metadata": {"name": "ingress", "namespace": "plain"},
                      "spec": {"gatewayClassName": "other", "listeners": []}}),
        )
        .unwrap();
    let run = zmeshctl(kc.path(), &["waypoint", "list", "-A", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let list: Value = serde_json::from_str(&run.stdout).unwrap();
    let names: Vec<(&str, &str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["namespace"].as_str().unwrap(),
                w["name"].as_str().unwrap(),
                w["traffic_type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("plain", "wp2", "service"), ("shop", "waypoint", "all")]
    );

    // What binds to them: the namespace label, a Service and a pod label.
    server
        .apply(json!({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "web", "namespace": "plain",
                                   "labels": {"istio.io/use-waypoint": "wp2"}}}))
        .unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": "cart", "namespace": "shop",
                                   "labels": {"istio.io/use-waypoint": "wp2",
                                              "istio.io/use-waypoint-namespace": "plain"}},
                      "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}}))
        .unwrap();
    let run = zmeshctl(kc.path(), &["status", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let status: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(status["namespaces"], json!(["shop"]));
    assert_eq!(status["pods"][0]["name"], "cart");
    assert_eq!(status["pods"][0]["mode"], "enrolled");
    let bound = |i: usize| status["waypoints"][i]["bound"].clone();
    assert_eq!(status["waypoints"][0]["name"], "wp2");
    assert_eq!(bound(0), json!(["service/plain/web", "pod/shop/cart"]));
    assert_eq!(bound(1), json!(["namespace/shop"]));
    let run = zmeshctl(kc.path(), &["status"]).await;
    assert!(
        run.stdout.contains("Enrolled namespaces: shop"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("namespace/shop"), "{}", run.stdout);

    // Delete: a name that is not a waypoint changes nothing; --all removes the rest.
    let rv = server.resource_version();
    let run = zmeshctl(kc.path(), &["waypoint", "delete", "-n", "plain", "ingress"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("waypoint plain/ingress not found"),
        "{}",
        run.stderr
    );
    assert_eq!(server.resource_version(), rv);
    let run = zmeshctl(kc.path(), &["waypoint", "apply", "--name", "Bad_Name"]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("not a DNS-1123 label"),
        "{}",
        run.stderr
    );
    let run = zmeshctl(kc.path(), &["waypoint", "delete", "-n", "shop", "waypoint"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = zmeshctl(kc.path(), &["waypoint", "delete", "-n", "plain", "--all"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        server
            .get("gateway.networking.k8s.io/v1", "Gateway", "plain", "wp2")
            .is_none()
    );
    assert!(
        server
            .get(
                "gateway.networking.k8s.io/v1",
                "Gateway",
                "plain",
                "ingress"
            )
            .is_some()
    );
    let run = zmeshctl(kc.path(), &["waypoint", "list", "-A"]).await;
    assert_eq!(run.stdout, "no waypoints\n");
}
