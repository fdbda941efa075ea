//! The Deployment the controller creates for a waypoint Gateway (`controller/src/deploy/
//! objects.rs`) and this binary agree: its environment, resolved as kubelet would, loads with
//! the waypoint's own config loader into the Gateway's identity and the controller's
//! address; the probe, the ports and the mounts are where the waypoint serves and reads.

use std::collections::HashMap;

use serde_json::{Map, Value};
use zmesh_controller::deploy::{GatewayInfo, WaypointTemplate, waypoint_objects};
use zmesh_controller::translate::MeshConfig;
use zmesh_waypoint::Config;

fn objects() -> [Value; 3] {
    let gw = GatewayInfo {
        namespace: "shop".into(),
        name: "wp".into(),
        uid: "uid-1".into(),
        listener_name: "mesh".into(),
        listener_protocol: "HBONE".into(),
        labels: Map::new(),
        annotations: Map::new(),
    };
    let mesh = MeshConfig {
        trust_domain: "example.org".into(),
        cluster_id: "east".into(),
        ..MeshConfig::default()
    };
    let template = WaypointTemplate {
        xds_address: "https://istiod.istio-system.svc:15012".into(),
        ..WaypointTemplate::default()
    };
    waypoint_objects(&gw, &template, &mesh)
}

/// The container's environment as kubelet gives it to a pod `wp-abc` of the Deployment.
fn resolved_env(pod: &Value) -> HashMap<String, String> {
    let container = &pod["spec"]["containers"][0];
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "wp-abc".to_owned(),
                Some("metadata.namespace") => "shop".to_owned(),
                Some("spec.serviceAccountName") => pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                Some(other) => panic!("fieldRef {other} not resolved by this test"),
                None => e["value"].as_str().unwrap().to_owned(),
            };
            (name, value)
        })
        .collect()
}

fn port(list: &Value, name: &str, field: &str) -> u64 {
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p[field].as_u64())
        .unwrap_or_else(|| panic!("no port {name} in {list}"))
}

#[test]
fn the_created_deployment_runs_this_waypoint_as_its_gateway() {
    let [sa, deployment, service] = objects();
    let pod = &deployment["spec"]["template"];
    let cfg = Config::from_env(&resolved_env(pod)).unwrap_or_else(|e| panic!("{e}"));

    // Its identity is its Gateway's service account, which the controller serves bound
    // Services to.
    assert_eq!(
        cfg.identity.to_string(),
        format!(
            "spiffe://example.org/ns/shop/sa/{}",
            sa["metadata"]["name"].as_str().unwrap()
        )
    );
    assert_eq!(cfg.cluster_id, "east");
    assert_eq!(cfg.pod_name, "wp-abc");
    let xds = cfg.xds.as_ref().expect("config from the controller");
    assert_eq!(xds.address, "https://istiod.istio-system.svc:15012");
    assert!(
        cfg.local_ca.is_none() && cfg.ca.is_some(),
        "certificates from the controller"
    );

    // Ports: the Service's and the container's are the ones the waypoint listens on.
    let container = &pod["spec"]["containers"][0];
    let ports = &service["spec"]["ports"];
    assert_eq!(
        port(ports, "mesh", "port"),
        u64::from(cfg.hbone_addr.port())
    );
    assert_eq!(
        port(ports, "status-port", "port"),
        u64::from(cfg.admin_addr.port())
    );
    let cports = &container["ports"];
    assert_eq!(
        port(cports, "hbone", "containerPort"),
        u64::from(cfg.hbone_addr.port())
    );
    assert_eq!(
        port(cports, "status-port", "containerPort"),
        u64::from(cfg.admin_addr.port())
    );
    let probe = &container["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz/ready");
    assert_eq!(
        probe["port"].as_u64(),
        Some(u64::from(cfg.admin_addr.port()))
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        cfg.admin_addr.port().to_string()
    );

    // The token and the root it reads are in the mounted volumes.
    let mounts: HashMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        cfg.auth_token.starts_with(mounts["istio-token"]),
        "{}",
        cfg.auth_token
    );
    assert!(
        xds.root_ca.starts_with(mounts["istio-ca-root-cert"]),
        "{}",
        xds.root_ca.display()
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "istio-token").unwrap();
    let source = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], zmesh_controller::ca::CA_AUDIENCE);
    assert!(cfg.auth_token.ends_with(source["path"].as_str().unwrap()));

    // Drained within the pod's grace period.
    assert_eq!(
        pod["spec"]["terminationGracePeriodSeconds"].as_u64(),
        Some(cfg.drain_deadline.as_secs())
    );
}
