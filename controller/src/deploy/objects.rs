//! The objects a waypoint Gateway gets, shaped as istiod's waypoint template shapes them
//! (istio/istio `manifests/charts/istio-control/istio-discovery/files/waypoint.yaml` and
//! `pilot/pkg/config/kube/gateway/deploymentcontroller.go`): a ServiceAccount, a Deployment
//! and a Service, all named after the Gateway, in its namespace, owned by it (so the garbage
//! collector deletes them with it), labelled `gateway.networking.k8s.io/gateway-name`,
//! `gateway.networking.k8s.io/gateway-class-name` and `gateway.istio.io/managed`, plus the
//! Gateway's `spec.infrastructure.labels`/`annotations` (Gateway API's way to label what an
//! implementation creates).
//!
//! Differences from istiod's, each because the proxy is zmesh's `waypoint`, not Envoy:
//! the container runs the `waypoint` image (environment: `waypoint/src/config.rs`), and its
//! readiness and metrics share one admin port, put on istiod's status port (15021), so the
//! Service's `status-port` and the readiness probe are where Istio's tools expect them.

use serde_json::{Map, Value, json};

use crate::translate::waypoint::WAYPOINT_CLASS;
use crate::translate::{GATEWAY_MANAGED_LABEL, HBONE_PORT, MeshConfig, WAYPOINT_MANAGED_VALUE};

/// Label naming the Gateway an object was made for (Gateway API's).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label naming the GatewayClass of that Gateway.
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// The waypoint's status port: readiness (`/healthz/ready`) and metrics (`/metrics`).
pub const STATUS_PORT: u16 = 15021;
/// Where the pod finds the projected token and the mesh root (the paths ztunnel's manifest
/// uses, and the waypoint's defaults).
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";
/// The ConfigMap holding the mesh root, Istio's name.
pub const ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";

/// What every waypoint's Deployment shares (from the controller's flags; the trust domain
/// and cluster id are the mesh's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointTemplate {
    /// The `waypoint` image.
    pub image: String,
    /// The controller's xDS and CA address (`XDS_ADDRESS`).
    pub xds_address: String,
    /// Audience of the projected token the waypoint authenticates with (the controller's
    /// TokenReview audience, `istio-ca`).
    pub token_audience: String,
}

impl Default for WaypointTemplate {
    fn default() -> Self {
        WaypointTemplate {
            image: default_image(),
            xds_address: "https://istiod.istio-system.svc:15012".into(),
            token_audience: crate::ca::CA_AUDIENCE.into(),
        }
    }
}

/// The release image of this version, named as `scripts/build-images` and
/// `manifests/kustomization.yaml` name the others.
pub fn default_image() -> String {
    format!(
        "localhost/zmesh/zmesh-waypoint:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The Gateway an object is made for: what the objects need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The (single, validated) listener's name and protocol.
    pub listener_name: String,
    pub listener_protocol: String,
    /// `spec.infrastructure.labels` and `.annotations`.
    pub labels: Map<String, Value>,
    pub annotations: Map<String, Value>,
}

impl GatewayInfo {
    /// Reads a (valid waypoint) Gateway; `None` without a name or uid (not yet stored).
    pub fn from_gateway(gw: &kube::api::DynamicObject) -> Option<GatewayInfo> {
        let listener = &gw.data["spec"]["listeners"][0];
        let infra = &gw.data["spec"]["infrastructure"];
        let strings = |v: &Value| -> Map<String, Value> {
            v.as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.is_string())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        Some(GatewayInfo {
            namespace: gw.metadata.namespace.clone()?,
            name: gw.metadata.name.clone()?,
            uid: gw.metadata.uid.clone()?,
            listener_name: listener["name"].as_str().unwrap_or_default().to_owned(),
            listener_protocol: listener["protocol"].as_str().unwrap_or("HBONE").to_owned(),
            labels: strings(&infra["labels"]),
            annotations: strings(&infra["annotations"]),
        })
    }
}

/// The ConfigMap `istio-ca-root-cert` (key `root-cert.pem`: the mesh root) in `namespace`,
/// which the waypoint's pod mounts to verify the controller: istiod publishes it in every
/// namespace (label `istio.io/config`); zmesh in each namespace with a waypoint. Not owned by
/// a Gateway: other waypoints of the namespace (and workloads) use it too.
pub fn root_cert_config_map(namespace: &str, root_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIG_MAP,
            "namespace": namespace,
            "labels": {"istio.io/config": "true"},
        },
        "data": {"root-cert.pem": root_pem},
    })
}

/// The ServiceAccount, Deployment and Service of a waypoint, in that order (the order they
/// are applied: the Deployment's pods need the account).
pub fn waypoint_objects(gw: &GatewayInfo, t: &WaypointTemplate, mesh: &MeshConfig) -> [Value; 3] {
    [service_account(gw), deployment(gw, t, mesh), service(gw)]
}

fn metadata(gw: &GatewayInfo, managed: bool) -> Value {
    let mut labels = gw.labels.clone();
    labels.insert(GATEWAY_NAME_LABEL.into(), json!(gw.name));
    labels.insert(GATEWAY_CLASS_LABEL.into(), json!(WAYPOINT_CLASS));
    if managed {
        labels.insert(GATEWAY_MANAGED_LABEL.into(), json!(WAYPOINT_MANAGED_VALUE));
    }
    let mut m = json!({
        "name": gw.name,
        "namespace": gw.namespace,
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": gw.name,
            "uid": gw.uid,
        }],
    });
    if !gw.annotations.is_empty() {
        m["annotations"] = Value::Object(gw.annotations.clone());
    }
    m
}

fn service_account(gw: &GatewayInfo) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(gw, true),
    })
}

/// A Service port's name from a listener's (istiod's `sanitizeListenerNameForPort`: DNS
/// label characters only), or `<protocol>-0` for an unusable one.
fn port_name(gw: &GatewayInfo) -> String {
    let name: String = gw
        .listener_name
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let name = name.trim_matches('-').to_owned();
    if name.is_empty() || name.len() > 63 {
        format!("{}-0", gw.listener_protocol.to_ascii_lowercase())
    } else {
        name
    }
}

fn service(gw: &GatewayInfo) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(gw, true),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: gw.name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "protocol": "TCP",
                 "appProtocol": "tcp"},
                {"name": port_name(gw), "port": HBONE_PORT, "protocol": "TCP",
                 "appProtocol": gw.listener_protocol.to_ascii_lowercase()},
            ],
        },
    })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

fn deployment(gw: &GatewayInfo, t: &WaypointTemplate, mesh: &MeshConfig) -> Value {
    let mut pod_labels = gw.labels.clone();
    for (k, v) in [
        // Never captured by ztunnel, never given a sidecar: it terminates HBONE itself.
        ("istio.io/dataplane-mode", "none"),
        ("sidecar.istio.io/inject", "false"),
        (GATEWAY_NAME_LABEL, gw.name.as_str()),
        (GATEWAY_CLASS_LABEL, WAYPOINT_CLASS),
        (GATEWAY_MANAGED_LABEL, WAYPOINT_MANAGED_VALUE),
        ("service.istio.io/canonical-name", gw.name.as_str()),
        ("service.istio.io/canonical-revision", "latest"),
    ] {
        pod_labels.insert(k.into(), json!(v));
    }
    let mut pod_annotations = gw.annotations.clone();
    for (k, v) in [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", STATUS_PORT.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
    ] {
        pod_annotations.insert(k.into(), json!(v));
    }
    let grace = 5;
    let root = format!("{ROOT_DIR}/root-cert.pem");
    let env = json!([
        {"name": "XDS_ADDRESS", "value": t.xds_address},
        {"name": "XDS_ROOT_CA", "value": root},
        {"name": "CA_ROOT_CA", "value": root},
        {"name": "AUTH_TOKEN", "value": format!("{TOKEN_DIR}/istio-token")},
        {"name": "TRUST_DOMAIN", "value": mesh.trust_domain},
        {"name": "CLUSTER_ID", "value": mesh.cluster_id},
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "WAYPOINT_HBONE_ADDR", "value": format!("[::]:{HBONE_PORT}")},
        {"name": "WAYPOINT_ADMIN_ADDR", "value": format!("[::]:{STATUS_PORT}")},
        {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": grace.to_string()},
        {"name": "RUST_LOG", "value": "info"},
    ]);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(gw, true),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": gw.name,
                    // It talks to the controller only, with the projected token below.
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": grace,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "waypoint",
                        "image": t.image,
                        "env": env,
                        "ports": [
                            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
                            {"name": "status-port", "containerPort": STATUS_PORT,
                             "protocol": "TCP"},
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
                            "periodSeconds": 5,
                            "failureThreshold": 3,
                        },
                        // istiod's waypoint defaults.
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"cpu": "2", "memory": "1Gi"},
                        },
                        "securityContext": {
                            "runAsUser": 1337,
                            "runAsGroup": 1337,
                            "runAsNonRoot": true,
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true},
                            {"name": "istio-ca-root-cert", "mountPath": ROOT_DIR,
                             "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        // The waypoint's credential for the controller (its Gateway's service
                        // account, audience the controller's), as ztunnel's.
                        {"name": "istio-token", "projected": {"sources": [{
                            "serviceAccountToken": {
                                "audience": t.token_audience,
                                "expirationSeconds": 43200,
                                "path": "istio-token",
                            },
                        }]}},
                        // The mesh root, to verify the controller (Istio's ConfigMap name).
                        {"name": "istio-ca-root-cert",
                         "configMap": {"name": ROOT_CONFIG_MAP}},
                    ],
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> GatewayInfo {
        GatewayInfo {
            namespace: "shop".into(),
            name: "wp".into(),
            uid: "u-1".into(),
            listener_name: "mesh".into(),
            listener_protocol: "HBONE".into(),
            labels: Map::new(),
            annotations: Map::new(),
        }
    }

    #[test]
    fn objects_are_named_owned_and_labelled_like_istiods() {
        let [sa, d, svc] = waypoint_objects(
            &info(),
            &WaypointTemplate::default(),
            &MeshConfig::default(),
        );
        for o in [&sa, &d, &svc] {
            assert_eq!(o["metadata"]["name"], "wp");
            assert_eq!(o["metadata"]["namespace"], "shop");
            assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "u-1");
            assert_eq!(o["metadata"]["labels"][GATEWAY_NAME_LABEL], "wp");
            assert_eq!(
                o["metadata"]["labels"][GATEWAY_MANAGED_LABEL],
                WAYPOINT_MANAGED_VALUE
            );
        }
        let pod = &d["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
        assert_eq!(
            d["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            pod["metadata"]["labels"][GATEWAY_NAME_LABEL]
        );
        assert_eq!(
            svc["spec"]["selector"][GATEWAY_NAME_LABEL],
            pod["metadata"]["labels"][GATEWAY_NAME_LABEL]
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "wp");
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["image"], default_image());
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], STATUS_PORT);
        assert_eq!(
            svc["spec"]["ports"],
            json!([
                {"name": "status-port", "port": 15021, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"},
            ])
        );
    }

    #[test]
    fn infrastructure_labels_are_copied_and_odd_listener_names_sanitized() {
        let mut gw = info();
        gw.labels.insert("team".into(), json!("a"));
        gw.annotations.insert("note".into(), json!("b"));
        gw.listener_name = "Mesh_1".into();
        let [sa, d, svc] =
            waypoint_objects(&gw, &WaypointTemplate::default(), &MeshConfig::default());
        assert_eq!(sa["metadata"]["labels"]["team"], "a");
        assert_eq!(sa["metadata"]["annotations"]["note"], "b");
        assert_eq!(d["spec"]["template"]["metadata"]["labels"]["team"], "a");
        assert_eq!(svc["spec"]["ports"][1]["name"], "mesh1");
        gw.listener_name = "__".into();
        let [_, _, svc] =
            waypoint_objects(&gw, &WaypointTemplate::default(), &MeshConfig::default());
        assert_eq!(svc["spec"]["ports"][1]["name"], "hbone-0");
    }
}
