//! Kubernetes Service (and EndpointSlice) to `istio.workload.Service`, and the per-workload
//! port lists that bind a Pod to the Services it backs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use xds_proto::istio::workload::{NetworkAddress, Port, PortList, Service};

use super::{MeshConfig, Objects, Target, Waypoints, namespace_of, service_hostname};

/// Label on an EndpointSlice naming the Service it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Port lists learned from EndpointSlices of selector-less Services:
/// (pod namespace, pod name) → service key → ports.
pub(super) type SlicePorts = BTreeMap<(String, String), BTreeMap<String, Vec<Port>>>;

/// Translates one Service; `None` when it has no name.
pub(super) fn translate_service<'a>(
    svc: &KubeService,
    ns_labels: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    waypoints: &Waypoints,
    mesh: &MeshConfig,
) -> Option<Service> {
    let name = svc.metadata.name.as_deref()?;
    let namespace = namespace_of(&svc.metadata);
    let spec = svc.spec.as_ref();
    let cluster_ips = spec
        .and_then(|s| s.cluster_ips.clone())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]))
        .unwrap_or_default();
    let addresses = cluster_ips
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
        .filter_map(|p| {
            Some(Port {
                service_port: u32::try_from(p.port).ok()?,
                target_port: match &p.target_port {
                    None => u32::try_from(p.port).ok()?,
                    Some(IntOrString::Int(t)) => u32::try_from(*t).unwrap_or(0),
                    Some(IntOrString::String(_)) => 0,
                },
                app_protocol: 0,
            })
        })
        .collect();
    Some(Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: service_hostname(name, namespace, mesh),
        addresses,
        ports,
        waypoint: waypoints.address(
            svc.metadata.labels.as_ref(),
            namespace,
            ns_labels(namespace),
            Target::Service,
        ),
        ..Service::default()
    })
}

/// The ports of a Service (empty when it has none).
pub(super) fn service_ports(svc: &KubeService) -> &[ServicePort] {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
}

/// Whether `svc` selects `pod`: same namespace, a non-empty selector, all of it matching.
/// (An empty or missing selector selects nothing, as in Kubernetes.)
pub(super) fn selects(svc: &KubeService, pod: &Pod) -> bool {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    if selector.is_empty() || namespace_of(&svc.metadata) != namespace_of(&pod.metadata) {
        return false;
    }
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The ports `pod` serves for `svc`: numeric target ports as they are, named ones resolved
/// against the pod's container ports (skipped when the pod has no port of that name).
pub(super) fn pod_ports(svc: &KubeService, pod: &Pod) -> Vec<Port> {
    service_ports(svc)
        .iter()
        .filter_map(|p| {
            let service_port = u32::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                None => service_port,
                Some(IntOrString::Int(t)) => u32::try_from(*t).ok()?,
                Some(IntOrString::String(name)) => named_port(pod, name)?,
            };
            Some(Port {
                service_port,
                target_port,
                app_protocol: 0,
            })
        })
        .collect()
}

fn named_port(pod: &Pod, name: &str) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u32::try_from(p.container_port).ok())
}

/// Port lists for Pods behind Services that have no selector, read from the EndpointSlices
/// of those Services: an endpoint whose `targetRef` is a Pod serves each slice port whose
/// name matches a Service port (slice ports carry the resolved target port).
pub(super) fn endpoint_slice_ports(objects: &Objects, mesh: &MeshConfig) -> SlicePorts {
    let mut out = SlicePorts::new();
    for slice in objects.endpoint_slices.values() {
        let namespace = namespace_of(&slice.metadata);
        let Some(svc_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let Some(svc) = objects
            .services
            .get(&(namespace.to_owned(), svc_name.clone()))
        else {
            continue;
        };
        let has_selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| !s.is_empty());
        if has_selector {
            continue;
        }
        let ports: Vec<Port> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                let sp_name = sp.name.as_deref().unwrap_or_default();
                let svc_port = service_ports(svc)
                    .iter()
                    .find(|p| p.name.as_deref().unwrap_or_default() == sp_name)?;
                Some(Port {
                    service_port: u32::try_from(svc_port.port).ok()?,
                    target_port: u32::try_from(sp.port?).ok()?,
                    app_protocol: 0,
                })
            })
            .collect();
        let key = format!(
            "{namespace}/{}",
            service_hostname(svc_name, namespace, mesh)
        );
        for endpoint in &slice.endpoints {
            let Some(target) = endpoint.target_ref.as_ref() else {
                continue;
            };
            if target.kind.as_deref() != Some("Pod") {
                continue;
            }
            let Some(pod_name) = target.name.clone() else {
                continue;
            };
            let pod_ns = target
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.to_owned());
            let list = out
                .entry((pod_ns, pod_name))
                .or_default()
                .entry(key.clone())
                .or_default();
            for port in &ports {
                if !list.contains(port) {
                    list.push(*port);
                }
            }
        }
    }
    out
}

/// The workload API's encoding of an IP: 4 or 16 raw bytes.
pub(super) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Wraps ports into the workload API's list type.
pub(super) fn port_list(ports: Vec<Port>) -> PortList {
    PortList { ports }
}
