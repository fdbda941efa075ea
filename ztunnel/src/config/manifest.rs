//! The ztunnel DaemonSet in `manifests/` configures this ztunnel: its environment loads, and
//! the paths and ports it names are the ones its volumes and probes use.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize as _;
use serde_yaml::Value;

use super::{Config, ProxyMode};

const DAEMONSET: &str = include_str!("../../../manifests/ztunnel/daemonset.yaml");

fn daemonset() -> Value {
    serde_yaml::Deserializer::from_str(DAEMONSET)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("manifests/ztunnel/daemonset.yaml has a DaemonSet")
}

/// What the kubelet would give the `fieldRef` variables on some node.
fn field(path: &str) -> &'static str {
    match path {
        "spec.nodeName" => "node-1",
        "metadata.name" => "ztunnel-abcde",
        "metadata.namespace" => "istio-system",
        "status.podIP" => "10.244.1.7",
        "spec.serviceAccountName" => "ztunnel",
        other => panic!("the DaemonSet uses fieldRef {other}, which this test does not know"),
    }
}

/// The mount path of volume `name` in the container.
fn mount<'a>(container: &'a Value, name: &str) -> &'a str {
    container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_else(|| panic!("no mount of volume {name}"))
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn the_daemonset_environment_loads_and_matches_its_volumes_and_probes() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: HashMap<String, String> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => field(e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()).into(),
            };
            (name, value)
        })
        .collect();
    let cfg = Config::load(None, &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.proxy_mode, ProxyMode::Shared);
    assert_eq!(cfg.node_name, "node-1");
    assert_eq!(cfg.instance_ip, "10.244.1.7");
    assert_eq!(cfg.xds_address, "https://istiod.istio-system.svc:15012");
    assert_eq!(
        cfg.ca_address(),
        cfg.xds_address,
        "the controller is the CA"
    );

    // The ZDS socket is in the host directory shared with the node agent.
    let socket_dir = mount(container, "ztunnel-socket-dir");
    assert_eq!(cfg.inpod_uds.parent(), Some(Path::new(socket_dir)));
    assert_eq!(
        volume(pod, "ztunnel-socket-dir")["hostPath"]["path"],
        "/var/run/ztunnel"
    );

    // The token is the projected one, for the CA's audience.
    let token =
        volume(pod, "istio-token")["projected"]["sources"][0]["serviceAccountToken"].clone();
    // CA_AUDIENCE in controller/src/ca/tokenreview.rs (ztunnel does not link the controller).
    assert_eq!(token["audience"], "istio-ca");
    let token_path =
        Path::new(mount(container, "istio-token")).join(token["path"].as_str().unwrap());
    assert_eq!(Path::new(&cfg.auth_token), token_path);
    assert_eq!(pod["automountServiceAccountToken"], false);

    // The roots come from the ConfigMap mount.
    let roots = Path::new(mount(container, "istio-ca-root-cert")).join("root-cert.pem");
    assert_eq!(cfg.xds_root_ca, roots);
    assert_eq!(cfg.ca_root_ca, roots);

    // Probes and ports are ztunnel's.
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(u64::from(cfg.ports.readiness))
    );
    let ports: Vec<u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports,
        [u64::from(cfg.ports.stats), u64::from(cfg.ports.readiness)]
    );
    // The drain takes the grace period the kubelet gives.
    assert_eq!(
        pod["terminationGracePeriodSeconds"].as_u64(),
        Some(cfg.drain_deadline.as_secs())
    );
}
