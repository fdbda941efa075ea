//! The Gateway API mesh conformance fixture (kubernetes-sigs/gateway-api
//! `conformance/base/mesh/manifests.yaml`, Apache-2.0), as the lab applies it: the namespaces,
//! the Services with the upstream ports, target ports and app protocols, and the echo
//! Deployments (whose pods run `zmesh-echo`), plus the waypoint Istio's wrapper adds
//! (istio/istio `tests/integration/ambient/gateway_conformance_test.go`: a waypoint named
//! `namespace` in the mesh namespace).

/// The mesh namespace, where the echo Services live and the waypoint is bound.
pub const MESH_NS: &str = "gateway-conformance-mesh";

/// The consumer namespace (routes and clients outside the producer namespace).
pub const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";

/// The waypoint Gateway's name (as Istio's conformance wrapper names it).
pub const WAYPOINT_NAME: &str = "namespace";

/// The Service ports of every echo Service: (name, port, target port, appProtocol).
pub const ECHO_PORTS: [(&str, u16, u16, Option<&str>); 5] = [
    ("http", 80, 8080, Some("http")),
    ("http-alt", 8080, 8080, Some("http")),
    ("https", 443, 8443, None),
    ("tcp", 9090, 9090, None),
    ("grpc", 7070, 7070, Some("grpc")),
];

/// The echo app's listeners in every echo pod: plain HTTP, HTTPS, TCP, gRPC.
pub const ECHO_HTTP_PORT: u16 = 8080;
/// See [`ECHO_HTTP_PORT`].
pub const ECHO_TLS_PORT: u16 = 8443;
/// See [`ECHO_HTTP_PORT`].
pub const ECHO_TCP_PORT: u16 = 9090;
/// See [`ECHO_HTTP_PORT`].
pub const ECHO_GRPC_PORT: u16 = 7070;

fn service(name: &str, selector: &[(&str, &str)]) -> String {
    let mut s = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {MESH_NS}\n\
         spec:\n  selector:\n"
    );
    for (k, v) in selector {
        s.push_str(&format!("    {k}: {v}\n"));
    }
    s.push_str("  ports:\n");
    for (port_name, port, target, app) in ECHO_PORTS {
        s.push_str(&format!(
            "  - name: {port_name}\n    port: {port}\n    targetPort: {target}\n"
        ));
        if let Some(app) = app {
            s.push_str(&format!("    appProtocol: {app}\n"));
        }
    }
    s
}

fn deployment(namespace: &str, name: &str, version: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: \
         {namespace}\n  labels:\n    app: echo\nspec:\n  replicas: 1\n  selector:\n    \
         matchLabels:\n      app: echo\n      version: {version}\n  template:\n    metadata:\n      \
         labels:\n        app: echo\n        version: {version}\n    spec:\n      containers:\n      \
         - name: echo\n        image: zmesh-lab/echo\n"
    )
}

/// The fixture as Kubernetes YAML (several documents).
pub fn manifests() -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESH_NS}\n  labels:\n    \
         gateway-conformance: mesh\n    istio.io/dataplane-mode: ambient\n---\napiVersion: v1\n\
         kind: Namespace\nmetadata:\n  name: {CONSUMER_NS}\n  labels:\n    gateway-conformance: \
         mesh-consumer\n    istio.io/dataplane-mode: ambient\n"
    );
    y.push_str(&service("echo", &[("app", "echo")]));
    y.push_str(&service("echo-v1", &[("app", "echo"), ("version", "v1")]));
    y.push_str(&service("echo-v2", &[("app", "echo"), ("version", "v2")]));
    y.push_str(&deployment(MESH_NS, "echo-v1", "v1"));
    y.push_str(&deployment(MESH_NS, "echo-v2", "v2"));
    y.push_str(&deployment(CONSUMER_NS, "echo-v1", "v1"));
    y
}

/// The waypoint Gateway of the mesh namespace: class `istio-waypoint`, one HBONE listener on
/// 15008.
pub fn waypoint_gateway() -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: \
         {WAYPOINT_NAME}\n  namespace: {MESH_NS}\n  labels:\n    istio.io/waypoint-for: service\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    \
         protocol: HBONE\n"
    )
}
