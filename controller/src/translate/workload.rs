//! Kubernetes Pod to `istio.workload.Workload`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use xds_proto::istio::workload::{TunnelProtocol, Workload, WorkloadStatus, WorkloadType};

use super::service::{SlicePorts, ip_bytes, pod_ports, port_list, selects};
use super::{DATAPLANE_MODE_LABEL, MeshConfig, Target, Waypoints, namespace_of, service_hostname};

/// Labels giving a workload's canonical service name, most specific first.
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Labels giving a workload's canonical revision, most specific first.
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// The workload uid of Pod `name` in `namespace`: `<cluster>//Pod/<namespace>/<name>`.
pub(super) fn pod_uid(namespace: &str, name: &str, mesh: &MeshConfig) -> String {
    format!("{}//Pod/{namespace}/{name}", mesh.cluster_id)
}

/// Translates one Pod, given the Services of its namespace; `None` when it is not a workload (no name or IP, host network,
/// Succeeded or Failed).
#[allow(clippy::too_many_arguments)] // each is a distinct input of the translation
pub(super) fn translate_pod<'a>(
    pod: &Pod,
    ns_labels: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    services: &[&KubeService],
    slice_ports: &SlicePorts,
    objects: &super::Objects,
    waypoints: &Waypoints,
    fallback: &super::waypoint_authz::Fallback,
    mesh: &MeshConfig,
) -> Option<Workload> {
    let name = pod.metadata.name.as_deref()?;
    let namespace = namespace_of(&pod.metadata);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let addresses = pod_ips(pod);
    if addresses.is_empty() {
        return None;
    }
    let labels = pod.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let namespace_labels = ns_labels(namespace);
    let enrolled = match label(DATAPLANE_MODE_LABEL) {
        Some("none") => false,
        Some("ambient") => true,
        _ => {
            namespace_labels
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .map(String::as_str)
                == Some("ambient")
        }
    };
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let first_label = |keys: &[&str]| keys.iter().find_map(|k| label(k).filter(|v| !v.is_empty()));

    let mut bound = std::collections::HashMap::new();
    for svc in services.iter().filter(|svc| selects(svc, pod)) {
        let Some(svc_name) = svc.metadata.name.as_deref() else {
            continue;
        };
        let svc_ns = namespace_of(&svc.metadata);
        let key = format!("{svc_ns}/{}", service_hostname(svc_name, svc_ns, mesh));
        bound.insert(key, port_list(pod_ports(svc, pod)));
    }
    if let Some(from_slices) = slice_ports.get(&(namespace.to_owned(), name.to_owned())) {
        for (key, ports) in from_slices {
            bound
                .entry(key.clone())
                .or_insert_with(|| port_list(ports.clone()));
        }
    }

    Some(Workload {
        authorization_policies: super::authz::selected_policies_with(
            labels, namespace, objects, mesh, fallback,
        ),
        uid: pod_uid(namespace, name, mesh),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        addresses,
        network: String::new(),
        tunnel_protocol: if enrolled {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        trust_domain: mesh.trust_domain.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default")
            .to_owned(),
        waypoint: waypoints.address(labels, namespace, namespace_labels, Target::Workload),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        canonical_name: first_label(&CANONICAL_NAME_LABELS)
            .unwrap_or(name)
            .to_owned(),
        canonical_revision: first_label(&CANONICAL_REVISION_LABELS)
            .unwrap_or("latest")
            .to_owned(),
        workload_type: WorkloadType::Pod as i32,
        workload_name: name.to_owned(),
        services: bound,
        status: if ready {
            WorkloadStatus::Healthy
        } else {
            WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: mesh.cluster_id.clone(),
        ..Workload::default()
    })
}

/// The pod's IPs as raw bytes: `status.podIPs`, else `status.podIP`; unparsable ones and
/// duplicates dropped, order kept.
fn pod_ips(pod: &Pod) -> Vec<Vec<u8>> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    for ip in listed {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            let bytes = ip_bytes(ip);
            if !out.contains(&bytes) {
                out.push(bytes);
            }
        }
    }
    out
}
