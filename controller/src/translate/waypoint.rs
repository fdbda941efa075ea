//! Waypoints: which Gateways are waypoints, what is bound to them, and the `BoundService`
//! resources a waypoint is served.
//!
//! Rules (Istio's, so users' YAML works unchanged; see istio.io "Configure waypoint proxies"
//! and istio/istio `pilot/pkg/serviceregistry/ambient/waypoints.go`):
//! - a waypoint is a Gateway API `Gateway` of class `istio-waypoint` with exactly one listener,
//!   `port: 15008, protocol: HBONE`; any other Gateway of that class is rejected (its status
//!   says why) and nothing binds to it. Gateways of other classes are not ours;
//! - `istio.io/use-waypoint` on the Pod or Service wins over the one on its Namespace; `none`
//!   (or an empty value) opts the object out; `istio.io/use-waypoint-namespace` on the same
//!   object names the waypoint's namespace (default: the object's own);
//! - `istio.io/waypoint-for` on the Gateway says what it accepts: `service` (the default),
//!   `workload`, `all` or `none`. A Service binds only to a `service`/`all` waypoint, a Pod only
//!   to a `workload`/`all` one; an object label naming a waypoint that does not accept it does
//!   not fall back to the namespace's;
//! - a binding is published only to a Gateway that exists and is a valid waypoint; waypoints
//!   themselves (`gateway.istio.io/managed=istio.io-mesh-controller`) are never bound;
//! - the waypoint's address is the VIP of its Service (`<gateway name>` in the Gateway's
//!   namespace, which istiod, and zmesh's controller in Kubernetes mode, create for it); until
//!   that Service has a cluster IP the binding names the Service's hostname, which ztunnel
//!   cannot resolve yet, so traffic to what the waypoint fronts is refused, never sent around
//!   it.
//!
//! `istio.io/waypoint-for` on a GatewayClass is not read (only the Gateway's label counts).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use kube::api::DynamicObject;
use xds_proto::istio::workload::gateway_address::Destination;
use xds_proto::istio::workload::{GatewayAddress, NamespacedHostname, NetworkAddress};
use xds_proto::zmesh::waypoint::v1::{BoundService, GatewayRef, Protocol, ServicePort};

use super::service::{ip_bytes, service_ports};
use super::{
    GATEWAY_MANAGED_LABEL, HBONE_PORT, MeshConfig, Objects, USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_MANAGED_VALUE, namespace_of, service_hostname,
};

/// Istio's GatewayClass for waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on a Gateway saying which traffic its waypoint takes (`service`, `workload`, `all`,
/// `none`; default `service`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The listener protocol of a waypoint.
pub const HBONE_PROTOCOL: &str = "HBONE";

type Labels = BTreeMap<String, String>;

/// Which traffic a waypoint accepts (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to the Services bound to it (the default).
    Service,
    /// Traffic addressed to the workloads bound to it.
    Workload,
    /// Both.
    All,
    /// Nothing (the Gateway is a waypoint, but nothing binds to it).
    None,
}

impl WaypointFor {
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("service") => Ok(WaypointFor::Service),
            Some("workload") => Ok(WaypointFor::Workload),
            Some("all") => Ok(WaypointFor::All),
            Some("none") => Ok(WaypointFor::None),
            Some(other) => Err(format!(
                "label {WAYPOINT_FOR_LABEL}={other:?} is not one of service, workload, all, none"
            )),
        }
    }

    fn accepts(self, target: Target) -> bool {
        matches!(
            (self, target),
            (WaypointFor::All, _)
                | (WaypointFor::Service, Target::Service)
                | (WaypointFor::Workload, Target::Workload)
        )
    }
}

/// What is being bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A Service (its VIP traffic).
    Service,
    /// A Pod (traffic addressed to its IP).
    Workload,
}

/// A valid waypoint Gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Waypoint {
    /// Which traffic it accepts.
    pub traffic: WaypointFor,
    /// Where ztunnel sends traffic for it: its Service's VIP, or its hostname until the
    /// Service has one.
    pub address: GatewayAddress,
    /// The cluster IPs of its Service (empty while it has none): the Gateway's status
    /// addresses.
    pub vips: Vec<IpAddr>,
}

/// Every `istio-waypoint` Gateway, judged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Waypoints {
    /// Valid waypoints keyed by (namespace, name).
    pub valid: BTreeMap<(String, String), Waypoint>,
    /// Rejected Gateways of class `istio-waypoint`: (namespace, name) -> what to fix.
    pub rejected: BTreeMap<(String, String), String>,
}

impl Waypoints {
    /// Judges every Gateway of class `istio-waypoint` in `objects`.
    pub fn new(objects: &Objects, mesh: &MeshConfig) -> Self {
        let mut out = Waypoints::default();
        for gw in objects.gateways.values() {
            let Some(name) = gw.metadata.name.clone() else {
                continue;
            };
            if gw.data["spec"]["gatewayClassName"].as_str() != Some(WAYPOINT_CLASS) {
                continue;
            }
            let namespace = namespace_of(&gw.metadata).to_owned();
            let labels = gw.metadata.labels.as_ref();
            let verdict = check_listeners(gw).and_then(|()| {
                WaypointFor::parse(
                    labels
                        .and_then(|l| l.get(WAYPOINT_FOR_LABEL))
                        .map(String::as_str),
                )
            });
            match verdict {
                Ok(traffic) => {
                    let vips = service_vips(objects, &namespace, &name);
                    let address = gateway_address(&namespace, &name, &vips, mesh);
                    out.valid.insert(
                        (namespace, name),
                        Waypoint {
                            traffic,
                            address,
                            vips,
                        },
                    );
                }
                Err(reason) => {
                    out.rejected.insert((namespace, name), reason);
                }
            }
        }
        out
    }

    /// The waypoint `own` (an object in `namespace`, with its namespace's labels `ns_labels`)
    /// is bound to, as a `target`; see the module docs for the rules.
    pub fn bind(
        &self,
        own: Option<&Labels>,
        namespace: &str,
        ns_labels: Option<&Labels>,
        target: Target,
    ) -> Option<(&(String, String), &Waypoint)> {
        if own
            .and_then(|l| l.get(GATEWAY_MANAGED_LABEL))
            .map(String::as_str)
            == Some(WAYPOINT_MANAGED_VALUE)
        {
            return None;
        }
        let (name, ns) =
            waypoint_label(own, namespace).or_else(|| waypoint_label(ns_labels, namespace))?;
        if name.is_empty() || name == "none" {
            return None;
        }
        let (key, waypoint) = self
            .valid
            .get_key_value(&(ns.to_owned(), name.to_owned()))?;
        waypoint.traffic.accepts(target).then_some((key, waypoint))
    }

    /// The address of the waypoint `own` is bound to (see [`Waypoints::bind`]).
    pub fn address(
        &self,
        own: Option<&Labels>,
        namespace: &str,
        ns_labels: Option<&Labels>,
        target: Target,
    ) -> Option<GatewayAddress> {
        self.bind(own, namespace, ns_labels, target)
            .map(|(_, w)| w.address.clone())
    }
}

/// Ok when the Gateway has exactly one listener, on 15008 with protocol HBONE.
fn check_listeners(gw: &DynamicObject) -> Result<(), String> {
    const EXPECTED: &str = "a waypoint needs exactly one listener, `port: 15008, protocol: HBONE`";
    let listeners = gw.data["spec"]["listeners"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    match listeners {
        [one] => {
            let port = one["port"].as_u64();
            let protocol = one["protocol"].as_str().unwrap_or_default();
            if port == Some(u64::from(HBONE_PORT)) && protocol == HBONE_PROTOCOL {
                Ok(())
            } else {
                Err(format!(
                    "{EXPECTED}; listener {:?} has port {} and protocol {protocol:?}",
                    one["name"].as_str().unwrap_or_default(),
                    port.map_or_else(|| "(none)".to_owned(), |p| p.to_string()),
                ))
            }
        }
        _ => Err(format!("{EXPECTED}; it has {}", listeners.len())),
    }
}

/// The cluster IPs of Service `name` in `namespace` (empty when it is missing or headless).
fn service_vips(objects: &Objects, namespace: &str, name: &str) -> Vec<IpAddr> {
    let Some(spec) = objects
        .services
        .get(&(namespace.to_owned(), name.to_owned()))
        .and_then(|s| s.spec.as_ref())
    else {
        return Vec::new();
    };
    spec.cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn gateway_address(
    namespace: &str,
    name: &str,
    vips: &[IpAddr],
    mesh: &MeshConfig,
) -> GatewayAddress {
    let destination = match vips.first() {
        Some(ip) => Destination::Address(NetworkAddress {
            network: String::new(),
            address: ip_bytes(*ip),
            length: None,
        }),
        None => Destination::Hostname(NamespacedHostname {
            namespace: namespace.to_owned(),
            hostname: service_hostname(name, namespace, mesh),
        }),
    };
    GatewayAddress {
        hbone_mtls_port: HBONE_PORT,
        destination: Some(destination),
    }
}

/// The waypoint name and namespace named by one object's labels.
fn waypoint_label<'a>(
    labels: Option<&'a Labels>,
    namespace: &'a str,
) -> Option<(&'a str, &'a str)> {
    let labels = labels?;
    let name = labels.get(USE_WAYPOINT_LABEL)?;
    let ns = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .map_or(namespace, String::as_str);
    Some((name.as_str(), ns))
}

/// The `BoundService` of `svc` when it is bound to a valid waypoint that takes Service
/// traffic; keyed like the workload API's Service, `<namespace>/<hostname>`.
pub(super) fn bound_service(
    svc: &KubeService,
    waypoints: &Waypoints,
    ns_labels: Option<&Labels>,
    mesh: &MeshConfig,
) -> Option<BoundService> {
    let name = svc.metadata.name.as_deref()?;
    let namespace = namespace_of(&svc.metadata);
    let ((gw_ns, gw_name), _) = waypoints.bind(
        svc.metadata.labels.as_ref(),
        namespace,
        ns_labels,
        Target::Service,
    )?;
    let spec = svc.spec.as_ref();
    let vips = spec
        .and_then(|s| s.cluster_ips.clone())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect();
    let ports = service_ports(svc)
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u32::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                None => port,
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                    u32::try_from(*t).unwrap_or(0)
                }
                Some(_) => 0,
            };
            let port_name = p.name.clone().unwrap_or_default();
            let app_protocol = p.app_protocol.clone().unwrap_or_default();
            Some(ServicePort {
                port,
                target_port,
                protocol: select_protocol(&app_protocol, &port_name) as i32,
                name: port_name,
                app_protocol,
            })
        })
        .collect();
    Some(BoundService {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: service_hostname(name, namespace, mesh),
        vips,
        ports,
        waypoint: Some(GatewayRef {
            namespace: gw_ns.clone(),
            name: gw_name.clone(),
        }),
    })
}

/// Istio's protocol selection for a Service port (istio.io "Protocol Selection"):
/// `appProtocol` when set, else the port name's prefix (`<protocol>[-<suffix>]`, with
/// `grpc-web` matched before the split), case-insensitive. Unknown: sniffed by the waypoint.
pub fn select_protocol(app_protocol: &str, port_name: &str) -> Protocol {
    if !app_protocol.is_empty() {
        return protocol_named(app_protocol);
    }
    let name = port_name.to_ascii_lowercase();
    if name == "grpc-web" || name.starts_with("grpc-web-") {
        return Protocol::Http;
    }
    protocol_named(name.split('-').next().unwrap_or_default())
}

fn protocol_named(value: &str) -> Protocol {
    match value.to_ascii_lowercase().as_str() {
        "http" | "grpc-web" | "kubernetes.io/ws" => Protocol::Http,
        "http2" | "kubernetes.io/h2c" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
            Protocol::Tcp
        }
        _ => Protocol::Unspecified,
    }
}

#[cfg(test)]
mod tests;
