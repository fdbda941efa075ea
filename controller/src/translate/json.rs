//! A readable, stable JSON rendering of translated resources, for golden tests and config
//! dumps: IPs as text, enums by name, maps sorted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value, json};
use xds_proto::istio::workload::gateway_address::Destination;
use xds_proto::istio::workload::{
    AppProtocol, GatewayAddress, Port, Service, TunnelProtocol, Workload, WorkloadStatus,
    WorkloadType,
};

use super::Translated;

/// Renders all workloads and services, keyed by resource name.
pub fn to_json(translated: &Translated) -> Value {
    let workloads: Map<String, Value> = translated
        .workloads
        .iter()
        .map(|(k, w)| (k.clone(), workload_json(w)))
        .collect();
    let services: Map<String, Value> = translated
        .services
        .iter()
        .map(|(k, s)| (k.clone(), service_json(s)))
        .collect();
    json!({ "workloads": workloads, "services": services })
}

/// Renders one Workload (fields the translation sets, plus any non-default extras).
pub fn workload_json(w: &Workload) -> Value {
    let mut services: Vec<(&String, Value)> = w
        .services
        .iter()
        .map(|(k, list)| (k, ports_json(&list.ports)))
        .collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    let services: Map<String, Value> = services.into_iter().map(|(k, v)| (k.clone(), v)).collect();
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "addresses": w.addresses.iter().map(|a| ip_text(a)).collect::<Vec<_>>(),
        "hostname": w.hostname,
        "network": w.network,
        "tunnel_protocol": TunnelProtocol::try_from(w.tunnel_protocol)
            .map_or_else(|_| w.tunnel_protocol.to_string(), |p| p.as_str_name().to_owned()),
        "trust_domain": w.trust_domain,
        "service_account": w.service_account,
        "waypoint": w.waypoint.as_ref().map(gateway_json),
        "node": w.node,
        "canonical_name": w.canonical_name,
        "canonical_revision": w.canonical_revision,
        "workload_type": WorkloadType::try_from(w.workload_type)
            .map_or_else(|_| w.workload_type.to_string(), |t| t.as_str_name().to_owned()),
        "workload_name": w.workload_name,
        "services": services,
        "authorization_policies": w.authorization_policies,
        "status": WorkloadStatus::try_from(w.status)
            .map_or_else(|_| w.status.to_string(), |s| s.as_str_name().to_owned()),
        "cluster_id": w.cluster_id,
    })
}

/// Renders one Service.
pub fn service_json(s: &Service) -> Value {
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "addresses": s.addresses.iter().map(|a| json!({
            "network": a.network,
            "address": ip_text(&a.address),
        })).collect::<Vec<_>>(),
        "ports": ports_json(&s.ports),
        "subject_alt_names": s.subject_alt_names,
        "waypoint": s.waypoint.as_ref().map(gateway_json),
    })
}

fn ports_json(ports: &[Port]) -> Value {
    ports
        .iter()
        .map(|p| {
            let mut port = json!({ "service_port": p.service_port, "target_port": p.target_port });
            if p.app_protocol != 0 {
                port["app_protocol"] = AppProtocol::try_from(p.app_protocol)
                    .map_or_else(
                        |_| p.app_protocol.to_string(),
                        |a| a.as_str_name().to_owned(),
                    )
                    .into();
            }
            port
        })
        .collect()
}

fn gateway_json(g: &GatewayAddress) -> Value {
    let destination = match &g.destination {
        Some(Destination::Hostname(h)) => {
            json!({ "hostname": { "namespace": h.namespace, "hostname": h.hostname } })
        }
        Some(Destination::Address(a)) => {
            json!({ "address": { "network": a.network, "address": ip_text(&a.address) } })
        }
        None => Value::Null,
    };
    json!({ "destination": destination, "hbone_mtls_port": g.hbone_mtls_port })
}

/// `10.0.0.1` / `fd00::1` for 4 / 16 bytes, else the bytes in hex (`0x...`).
fn ip_text(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::V4(Ipv4Addr::from(v4)).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::V6(Ipv6Addr::from(v6)).to_string()
    } else {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}
