//! Istio's workload xDS resources (`istio.workload.Address`: a `Workload` or a `Service`)
//! converted to the model, one resource at a time, so that a bad resource can be refused
//! (NACKed, by name and field) while the good ones of the same response are applied.
//!
//! What the model does not carry yet is dropped here: a workload's `network_gateway`,
//! `application_tunnel`, `locality`, a service's weighted (canary) waypoints, load-balancing
//! preferences and extensions. `waypoint` is kept (a bad one refuses the resource: traffic
//! must never skip a waypoint because its address could not be read).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use prost::Message;
use xds_proto::istio::workload as pb;

use super::{
    GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname, NetworkAddress, PortMap,
    Protocol, Service, SmallMap, Workload,
};

/// Trust domain of a workload that names none (Istio's default).
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account of a workload that names none (Kubernetes' default).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// One resource refused: which resource, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {resource:?}: {field}: {reason}")]
pub struct ResourceError {
    /// The xDS resource name (a workload's uid, a service's `<namespace>/<hostname>`).
    pub resource: String,
    /// The offending field, e.g. `addresses[1]` or `services["ns/h"].ports[0].service_port`.
    pub field: String,
    pub reason: String,
}

/// A converted `istio.workload.Address`.
// Short-lived (one resource at a time, unpacked at once): boxing would only cost a move.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

/// Decodes and converts the bytes of an `istio.workload.Address` named `name`.
pub fn decode_address(name: &str, bytes: &[u8]) -> Result<AddressResource, ResourceError> {
    let addr = pb::Address::decode(bytes).map_err(|e| ResourceError {
        resource: name.to_owned(),
        field: "(message)".into(),
        reason: format!("not an istio.workload.Address: {e}"),
    })?;
    convert_address(name, addr)
}

/// Decodes and converts the bytes of an `istio.security.Authorization` named `name` (its
/// key, `<namespace>/<name>`).
pub fn decode_authorization(
    name: &str,
    bytes: &[u8],
) -> Result<crate::policy::Policy, ResourceError> {
    let a =
        xds_proto::istio::security::Authorization::decode(bytes).map_err(|e| ResourceError {
            resource: name.to_owned(),
            field: "(message)".into(),
            reason: format!("not an istio.security.Authorization: {e}"),
        })?;
    crate::policy::Policy::try_from_proto(&a).map_err(|e| err(name, e.field, e.reason))
}

/// Converts an `istio.workload.Address` named `name`.
pub fn convert_address(name: &str, addr: pb::Address) -> Result<AddressResource, ResourceError> {
    match addr.r#type {
        Some(pb::address::Type::Workload(w)) => {
            convert_workload(name, w).map(AddressResource::Workload)
        }
        Some(pb::address::Type::Service(s)) => {
            convert_service(name, s).map(AddressResource::Service)
        }
        None => Err(ResourceError {
            resource: name.to_owned(),
            field: "type".into(),
            reason: "neither a workload nor a service".into(),
        }),
    }
}

fn err(resource: &str, field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError {
        resource: resource.to_owned(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// An IP address from its raw network-order bytes (4 or 16).
fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

fn port(res: &str, field: String, v: u32, zero_ok: bool) -> Result<u16, ResourceError> {
    match u16::try_from(v) {
        Ok(0) if !zero_ok => Err(err(res, field, "port 0 is not a port")),
        Ok(p) => Ok(p),
        Err(_) => Err(err(res, field, format!("{v} is not a port (1-65535)"))),
    }
}

fn ports(res: &str, field: &str, list: &[pb::Port]) -> Result<PortMap, ResourceError> {
    let mut out = PortMap::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let sp = port(
            res,
            format!("{field}[{i}].service_port"),
            p.service_port,
            false,
        )?;
        // Target 0: the endpoint's own mapping (services), or the service port.
        let tp = port(
            res,
            format!("{field}[{i}].target_port"),
            p.target_port,
            true,
        )?;
        if out.insert(sp, tp).is_some_and(|prev| prev != tp) {
            return Err(err(
                res,
                format!("{field}[{i}].service_port"),
                format!("service port {sp} is listed twice with different target ports"),
            ));
        }
    }
    Ok(out)
}

/// Converts a waypoint's `GatewayAddress` (`field` names it in errors).
fn gateway(res: &str, field: &str, g: pb::GatewayAddress) -> Result<GatewayAddress, ResourceError> {
    use pb::gateway_address::Destination;
    let destination = match g.destination {
        Some(Destination::Address(a)) => {
            let address = ip_from_bytes(&a.address).ok_or_else(|| {
                err(
                    res,
                    format!("{field}.address.address"),
                    format!(
                        "{} bytes; an address is 4 (IPv4) or 16 (IPv6) bytes",
                        a.address.len()
                    ),
                )
            })?;
            GatewayDestination::Address(NetworkAddress {
                network: a.network,
                address,
            })
        }
        Some(Destination::Hostname(h)) if !h.namespace.is_empty() && !h.hostname.is_empty() => {
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace,
                hostname: h.hostname,
            })
        }
        Some(Destination::Hostname(_)) => {
            return Err(err(
                res,
                format!("{field}.hostname"),
                "needs both namespace and hostname",
            ));
        }
        None => {
            return Err(err(
                res,
                format!("{field}.destination"),
                "missing; a waypoint needs an address or a hostname",
            ));
        }
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: port(
            res,
            format!("{field}.hbone_mtls_port"),
            g.hbone_mtls_port,
            false,
        )?,
    })
}

/// Converts a `Workload` named `name` (its uid).
pub fn convert_workload(name: &str, w: pb::Workload) -> Result<Workload, ResourceError> {
    for (field, v) in [
        ("uid", &w.uid),
        ("name", &w.name),
        ("namespace", &w.namespace),
    ] {
        if v.is_empty() {
            return Err(err(
                name,
                field,
                "empty; a workload needs uid, name and namespace",
            ));
        }
    }
    let mut workload_ips = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        let ip = ip_from_bytes(a).ok_or_else(|| {
            err(
                name,
                format!("addresses[{i}]"),
                format!(
                    "{} bytes; an address is 4 (IPv4) or 16 (IPv6) bytes",
                    a.len()
                ),
            )
        })?;
        workload_ips.push(ip);
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => Protocol::Tcp,
        Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            return Err(err(
                name,
                "tunnel_protocol",
                "LEGACY_ISTIO_MTLS (sidecar mTLS) is not supported by ztunnel; \
                 only HBONE or NONE",
            ));
        }
        Err(_) => {
            return Err(err(
                name,
                "tunnel_protocol",
                format!("unknown value {}", w.tunnel_protocol),
            ));
        }
    };
    let status = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(err(name, "status", format!("unknown value {}", w.status))),
    };
    let workload_type = pb::WorkloadType::try_from(w.workload_type)
        .map(|t| t.as_str_name().to_ascii_lowercase())
        .map_err(|_| {
            err(
                name,
                "workload_type",
                format!("unknown value {}", w.workload_type),
            )
        })?;
    let mut services = SmallMap::with_capacity(w.services.len());
    for (key, list) in &w.services {
        let field = format!("services[{key:?}]");
        match key.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {}
            _ => {
                return Err(err(name, field, "the key must be <namespace>/<hostname>"));
            }
        }
        services.insert(
            key.clone(),
            ports(name, &format!("{field}.ports"), &list.ports)?,
        );
    }
    let waypoint = w
        .waypoint
        .map(|g| gateway(name, "waypoint", g).map(Box::new))
        .transpose()?;
    let or = |v: String, d: &str| if v.is_empty() { d.to_owned() } else { v };
    let out = Workload {
        waypoint,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or(w.service_account, DEFAULT_SERVICE_ACCOUNT),
        trust_domain: or(w.trust_domain, DEFAULT_TRUST_DOMAIN),
        workload_ips,
        protocol,
        node: w.node,
        network: w.network,
        cluster_id: w.cluster_id,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_name: w.workload_name,
        workload_type,
        status,
        services,
        authorization_policies: w.authorization_policies.into(),
    };
    out.identity().map_err(|e| {
        err(
            name,
            "trust_domain/namespace/service_account",
            format!("no valid SPIFFE identity: {e}"),
        )
    })?;
    Ok(out)
}

/// Converts a `Service` named `name` (`<namespace>/<hostname>`).
pub fn convert_service(name: &str, s: pb::Service) -> Result<Service, ResourceError> {
    for (field, v) in [
        ("name", &s.name),
        ("namespace", &s.namespace),
        ("hostname", &s.hostname),
    ] {
        if v.is_empty() {
            return Err(err(
                name,
                field,
                "empty; a service needs name, namespace and hostname",
            ));
        }
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        let field = format!("addresses[{i}]");
        let ip = ip_from_bytes(&a.address).ok_or_else(|| {
            err(
                name,
                format!("{field}.address"),
                format!(
                    "{} bytes; an address is 4 (IPv4) or 16 (IPv6) bytes",
                    a.address.len()
                ),
            )
        })?;
        let full = if ip.is_ipv4() { 32 } else { 128 };
        if let Some(len) = a.length
            && len != full
        {
            return Err(err(
                name,
                format!("{field}.length"),
                format!("prefix VIPs (/{len}) are not supported; only single addresses"),
            ));
        }
        vips.push(NetworkAddress {
            network: a.network.clone(),
            address: ip,
        });
    }
    Ok(Service {
        waypoint: s
            .waypoint
            .map(|g| gateway(name, "waypoint", g))
            .transpose()?,
        ports: ports(name, "ports", &s.ports)?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        subject_alt_names: s.subject_alt_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> pb::Workload {
        pb::Workload {
            uid: "Kubernetes//Pod/default/server-1".into(),
            name: "server-1".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 2], Ipv6Addr::LOCALHOST.octets().to_vec()],
            network: "net1".into(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            trust_domain: "corp.example".into(),
            service_account: "server".into(),
            node: "node-a".into(),
            canonical_name: "server".into(),
            canonical_revision: "v1".into(),
            workload_type: pb::WorkloadType::Pod as i32,
            status: pb::WorkloadStatus::Unhealthy as i32,
            services: [(
                "default/echo.default.svc.cluster.local".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]
            .into(),
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(
                    pb::NetworkAddress {
                        network: String::new(),
                        address: vec![10, 96, 0, 99],
                        length: None,
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            authorization_policies: vec!["default/allow-client".into()],
            ..Default::default()
        }
    }

    fn service() -> pb::Service {
        pb::Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: "".into(),
                address: vec![10, 96, 0, 10],
                length: None,
            }],
            ports: vec![
                pb::Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: 0,
                },
                pb::Port {
                    service_port: 90,
                    target_port: 9090,
                    app_protocol: 0,
                },
            ],
            subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/extra".into()],
            ..Default::default()
        }
    }

    #[test]
    fn good_workload_converts() {
        let w = convert_workload("uid-1", workload()).unwrap();
        assert_eq!(w.uid, "Kubernetes//Pod/default/server-1");
        assert_eq!(
            w.workload_ips,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(w.protocol, Protocol::Hbone);
        assert_eq!(w.network, "net1");
        assert_eq!(w.node, "node-a");
        assert_eq!(w.status, HealthStatus::Unhealthy);
        assert_eq!(w.workload_type, "pod");
        assert_eq!(
            (w.canonical_name.as_str(), w.canonical_revision.as_str()),
            ("server", "v1")
        );
        assert_eq!(
            w.identity().unwrap().to_string(),
            "spiffe://corp.example/ns/default/sa/server"
        );
        assert_eq!(
            w.services.get("default/echo.default.svc.cluster.local"),
            Some(&PortMap::from_iter([(80, 8080)]))
        );
        assert_eq!(*w.authorization_policies, ["default/allow-client"]);
        assert_eq!(
            w.waypoint.as_deref(),
            Some(&GatewayAddress {
                destination: GatewayDestination::Address("/10.96.0.99".parse().unwrap()),
                hbone_mtls_port: 15008,
            })
        );
        // Defaults for the empty strings, NONE is plain TCP.
        let mut bare = workload();
        bare.trust_domain.clear();
        bare.service_account.clear();
        bare.tunnel_protocol = pb::TunnelProtocol::None as i32;
        let w = convert_workload("uid-1", bare).unwrap();
        assert_eq!(w.protocol, Protocol::Tcp);
        assert_eq!(
            w.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
    }

    #[test]
    fn authorization_decodes_or_names_the_field() {
        use xds_proto::istio::security as sec;
        let a = sec::Authorization {
            name: "deny-8080".into(),
            namespace: "default".into(),
            scope: sec::Scope::Namespace as i32,
            action: sec::Action::Deny as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        destination_ports: vec![8080],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let p = decode_authorization("default/deny-8080", &a.encode_to_vec()).unwrap();
        assert_eq!(p.key(), "default/deny-8080");
        assert_eq!(p.action, crate::policy::Action::Deny);
        assert_eq!(p.rules[0].clauses[0].matches[0].destination_ports, [8080]);

        let mut bad = a.clone();
        bad.rules[0].clauses[0].matches[0].destination_ports = vec![65536];
        let e = decode_authorization("default/deny-8080", &bad.encode_to_vec()).unwrap_err();
        assert_eq!(e.resource, "default/deny-8080");
        assert_eq!(
            e.field,
            "rules[0].clauses[0].matches[0].destination_ports[0]"
        );
        assert!(e.reason.contains("65536"), "{e}");

        let e = decode_authorization("x", &[0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e.field, "(message)");
    }

    #[test]
    fn good_service_converts() {
        let any = pb::Address {
            r#type: Some(pb::address::Type::Service(service())),
        }
        .encode_to_vec();
        let AddressResource::Service(s) =
            decode_address("default/echo.default.svc.cluster.local", &any).unwrap()
        else {
            panic!("a service")
        };
        assert_eq!(s.key(), "default/echo.default.svc.cluster.local");
        assert_eq!(s.vips, vec!["/10.96.0.10".parse().unwrap()]);
        assert_eq!(s.ports, PortMap::from_iter([(80, 0), (90, 9090)]));
        assert_eq!(s.subject_alt_names.len(), 1);
    }

    #[test]
    fn bad_resources_name_resource_and_field() {
        type Edit = fn(&mut pb::Workload);
        let cases: &[(Edit, &str, &str)] = &[
            (
                |w| w.addresses[1] = vec![1, 2, 3],
                "addresses[1]",
                "3 bytes",
            ),
            (
                |w| w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32,
                "tunnel_protocol",
                "LEGACY_ISTIO_MTLS",
            ),
            (
                |w| w.tunnel_protocol = 9,
                "tunnel_protocol",
                "unknown value 9",
            ),
            (|w| w.status = 7, "status", "unknown"),
            (|w| w.uid.clear(), "uid", "empty"),
            (|w| w.namespace.clear(), "namespace", "empty"),
            (
                |w| w.service_account = "a b".into(),
                "service_account",
                "SPIFFE",
            ),
            (
                |w| w.trust_domain = "Bad TD".into(),
                "trust_domain",
                "SPIFFE",
            ),
            (
                |w| {
                    w.services.insert("nohost".into(), pb::PortList::default());
                },
                "services[\"nohost\"]",
                "<namespace>/<hostname>",
            ),
            (
                |w| {
                    let l = w.services.values_mut().next().unwrap();
                    l.ports[0].service_port = 70000;
                },
                "ports[0].service_port",
                "70000",
            ),
            (
                |w| w.waypoint = Some(pb::GatewayAddress::default()),
                "waypoint.destination",
                "an address or a hostname",
            ),
            (
                |w| w.waypoint.as_mut().unwrap().hbone_mtls_port = 0,
                "waypoint.hbone_mtls_port",
                "port 0",
            ),
            (
                |w| {
                    w.waypoint.as_mut().unwrap().destination = Some(
                        pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                            namespace: String::new(),
                            hostname: "wp".into(),
                        }),
                    );
                },
                "waypoint.hostname",
                "namespace and hostname",
            ),
            (
                |w| {
                    w.waypoint.as_mut().unwrap().destination = Some(
                        pb::gateway_address::Destination::Address(pb::NetworkAddress {
                            network: String::new(),
                            address: vec![1, 2],
                            length: None,
                        }),
                    );
                },
                "waypoint.address.address",
                "2 bytes",
            ),
        ];
        for (edit, field, reason) in cases {
            let mut w = workload();
            edit(&mut w);
            let e = convert_workload("the-uid", w).unwrap_err();
            assert_eq!(e.resource, "the-uid");
            assert!(e.field.contains(field), "{field}: {e}");
            assert!(e.to_string().contains(reason), "{reason}: {e}");
        }

        type SEdit = fn(&mut pb::Service);
        let cases: &[(SEdit, &str, &str)] = &[
            (|s| s.hostname.clear(), "hostname", "empty"),
            (
                |s| s.addresses[0].address = vec![0; 5],
                "addresses[0].address",
                "5 bytes",
            ),
            (
                |s| s.addresses[0].length = Some(24),
                "addresses[0].length",
                "/24",
            ),
            (
                |s| s.ports[0].service_port = 0,
                "ports[0].service_port",
                "port 0",
            ),
            (
                |s| s.ports[1].target_port = 65536,
                "ports[1].target_port",
                "65536",
            ),
            (
                |s| s.ports[1].service_port = 80,
                "ports[1].service_port",
                "twice",
            ),
        ];
        for (edit, field, reason) in cases {
            let mut s = service();
            edit(&mut s);
            let e = convert_service("ns/svc", s).unwrap_err();
            assert_eq!(e.resource, "ns/svc");
            assert_eq!(e.field, *field, "{e}");
            assert!(e.reason.contains(reason), "{reason}: {e}");
        }

        let e = decode_address("x", &[0xff, 0xff]).unwrap_err();
        assert!(
            e.to_string().contains("not an istio.workload.Address"),
            "{e}"
        );
        let e = convert_address("x", pb::Address { r#type: None }).unwrap_err();
        assert_eq!(e.field, "type");
    }
}

#[cfg(test)]
mod state_tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::{Resolved, State};

    #[test]
    fn converted_resources_route_and_later_wins_on_conflict() {
        let mut a = convert_workload("a", tests_workload("a", [10, 0, 0, 2])).unwrap();
        a.services
            .insert("default/echo".into(), PortMap::from_iter([(80, 8080)]));
        let b = convert_workload("b", tests_workload("b", [10, 0, 0, 2])).unwrap();
        let svc = Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo".into(),
            vips: vec!["/10.96.0.1".parse().unwrap()],
            ports: PortMap::from_iter([(80, 0)]),
            subject_alt_names: vec![],
            waypoint: None,
        };
        let (st, conflicts) = State::from_resources([Arc::new(a), Arc::new(b)], [Arc::new(svc)]);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("10.0.0.2"), "{conflicts:?}");
        assert_eq!(
            st.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap().uid,
            "b"
        );
        match st.resolve("10.96.0.1:80".parse().unwrap(), |_| 0) {
            Resolved::Upstream(u) => assert_eq!(u.address, "10.0.0.2:8080".parse().unwrap()),
            other => panic!("{other:?}"),
        }
    }

    /// Issue 11: a Service's `waypoint` from xDS must survive conversion, so its VIP traffic
    /// goes to the waypoint instead of silently straight to a pod.
    #[test]
    fn an_xds_waypoint_is_kept_and_routes_to_the_waypoint() {
        let mut server = convert_workload("s", tests_workload("s", [10, 0, 0, 2])).unwrap();
        server
            .services
            .insert("default/echo".into(), PortMap::from_iter([(80, 8080)]));
        let mut wp = convert_workload("wp", tests_workload("wp", [10, 0, 0, 9])).unwrap();
        wp.services
            .insert("default/wp".into(), PortMap::from_iter([(15008, 15008)]));
        let vip = |ip: [u8; 4]| pb::NetworkAddress {
            network: String::new(),
            address: ip.to_vec(),
            length: None,
        };
        let port = |p| pb::Port {
            service_port: p,
            target_port: p,
            app_protocol: 0,
        };
        let echo = pb::Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo".into(),
            addresses: vec![vip([10, 96, 0, 1])],
            ports: vec![port(80)],
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Address(vip([
                    10, 96, 0, 9,
                ]))),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        let wp_svc = pb::Service {
            name: "wp".into(),
            namespace: "default".into(),
            hostname: "wp".into(),
            addresses: vec![vip([10, 96, 0, 9])],
            ports: vec![port(15008)],
            ..Default::default()
        };
        let services = [
            convert_service("default/echo", echo).unwrap(),
            convert_service("default/wp", wp_svc).unwrap(),
        ];
        let (st, _) = State::from_resources(
            [Arc::new(server), Arc::new(wp)],
            services.into_iter().map(Arc::new),
        );
        match st.route("10.96.0.1:80".parse().unwrap(), None, |_| 0) {
            Resolved::Waypoint(w) => {
                assert_eq!(w.hbone, "10.0.0.9:15008".parse().unwrap());
                assert_eq!(w.target, "10.96.0.1:80".parse().unwrap());
            }
            other => panic!("traffic to a bound Service must go to its waypoint: {other:?}"),
        }
    }

    fn tests_workload(uid: &str, ip: [u8; 4]) -> pb::Workload {
        pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "default".into(),
            addresses: vec![ip.to_vec()],
            ..Default::default()
        }
    }
}
