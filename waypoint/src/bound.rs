//! What the waypoint serves: the Services bound to it (`zmesh.waypoint.v1.BoundService`, from
//! xDS or the local config file) and the workloads behind them (Istio's workload model, from
//! `zmesh_core::state`), in one immutable [`Snapshot`] swapped whole on change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_core::state::xds::ResourceError;

use crate::authz::local::LocalPolicy;
use crate::authz::{Policies, Policy};
use crate::route::ServiceRoutes;
use crate::route::local::LocalRoutes;
use zmesh_core::state::{LocalConfig, NetworkAddress, Service, State, Workload};

/// The application protocol of a bound Service port (Istio's protocol selection, done by the
/// controller from `appProtocol` or the port name's prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PortProtocol {
    /// Not declared: the waypoint sniffs HTTP/2 preface vs an HTTP/1 request line, else TCP.
    #[default]
    Unspecified,
    /// HTTP/1.1 (an HTTP/2 preface is still recognised, like Envoy's automatic codec).
    Http,
    /// HTTP/2 (h2c inside the tunnel).
    Http2,
    /// gRPC: HTTP/2 end to end.
    Grpc,
    /// Opaque TCP: bytes copied, no L7 processing.
    Tcp,
}

impl PortProtocol {
    fn from_proto(v: i32) -> Option<PortProtocol> {
        Some(match pb::Protocol::try_from(v).ok()? {
            pb::Protocol::Unspecified => PortProtocol::Unspecified,
            pb::Protocol::Http => PortProtocol::Http,
            pb::Protocol::Http2 => PortProtocol::Http2,
            pb::Protocol::Grpc => PortProtocol::Grpc,
            pb::Protocol::Tcp => PortProtocol::Tcp,
        })
    }
}

/// One port of a bound Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BoundPort {
    /// The Service port (what clients connect to on the VIP).
    pub port: u16,
    /// The port on the pods; 0: the workload's own mapping for this service port.
    #[serde(default)]
    pub target_port: u16,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub app_protocol: String,
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// A Service bound to this waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BoundService {
    pub name: String,
    pub namespace: String,
    /// The Service's FQDN (the HTTP Host it answers to).
    pub hostname: String,
    /// Its cluster IPs.
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    #[serde(default)]
    pub ports: Vec<BoundPort>,
}

impl BoundService {
    /// `<namespace>/<hostname>`: its xDS resource name and the key workloads use for it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Converts the xDS resource named `name`; the error names the field to fix.
    pub fn from_proto(name: &str, s: pb::BoundService) -> Result<BoundService, ResourceError> {
        let err = |field: String, reason: String| ResourceError {
            resource: name.to_owned(),
            field,
            reason,
        };
        if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
            return Err(err(
                "name/namespace/hostname".into(),
                "all three must be set".into(),
            ));
        }
        let mut vips = Vec::with_capacity(s.vips.len());
        for (i, a) in s.vips.iter().enumerate() {
            let ip = match a.address.len() {
                4 => <[u8; 4]>::try_from(a.address.as_slice()).map(std::net::IpAddr::from),
                16 => <[u8; 16]>::try_from(a.address.as_slice()).map(std::net::IpAddr::from),
                n => {
                    return Err(err(
                        format!("vips[{i}].address"),
                        format!("{n} bytes: expected 4 (IPv4) or 16 (IPv6)"),
                    ));
                }
            }
            .map_err(|_| err(format!("vips[{i}].address"), "not an address".into()))?;
            vips.push(NetworkAddress {
                network: a.network.clone(),
                address: ip,
            });
        }
        let mut ports = Vec::with_capacity(s.ports.len());
        for (i, p) in s.ports.iter().enumerate() {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    err(
                        format!("ports[{i}].port"),
                        format!("{} is not 1-65535", p.port),
                    )
                })?;
            let target_port = u16::try_from(p.target_port).map_err(|_| {
                err(
                    format!("ports[{i}].target_port"),
                    format!("{} is not 0-65535", p.target_port),
                )
            })?;
            let protocol = PortProtocol::from_proto(p.protocol).ok_or_else(|| {
                err(
                    format!("ports[{i}].protocol"),
                    format!("unknown protocol {}", p.protocol),
                )
            })?;
            ports.push(BoundPort {
                port,
                target_port,
                name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
                protocol,
            });
        }
        Ok(BoundService {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports,
        })
    }
}

/// The waypoint's local config file (`LOCAL_XDS_PATH`): upstream ztunnel's `workloads` and
/// `services` plus `boundServices`, `serviceRoutes` and `authorizationPolicies`, for running
/// without a controller.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalFile {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub bound_services: Vec<BoundService>,
    /// Routes per Service (`zmesh.waypoint.v1.ServiceRoutes` in YAML, see
    /// [`crate::route::local`]).
    #[serde(default, skip_serializing)]
    pub service_routes: Vec<LocalRoutes>,
    /// L7 AuthorizationPolicies (`zmesh.waypoint.v1.WaypointPolicy` in YAML, see
    /// [`crate::authz::local`]).
    #[serde(default, skip_serializing)]
    pub authorization_policies: Vec<LocalPolicy>,
}

/// Why a configuration was refused (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    #[error("cannot read the local config {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Config(#[from] zmesh_core::state::ConfigError),
    #[error("local config refused before parsing: {0}")]
    Limits(#[from] zmesh_core::yaml::YamlLimitError),
    #[error("local config is not valid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error(
        "bound services {0} and {1} both claim {2}; each VIP and port may be bound to one \
         service only"
    )]
    Duplicate(String, String, SocketAddr),
    #[error("local config: {0}")]
    Routes(#[from] crate::route::RouteError),
    #[error("local config: {0}")]
    Policy(#[from] crate::authz::AuthzError),
}

/// One bound VIP:port (or a route's backend): the service and the port's settings.
#[derive(Clone, Debug)]
pub struct Binding {
    pub service: Arc<BoundService>,
    pub port: BoundPort,
    /// [`BoundService::key`], made once with the binding: a request looks its routes,
    /// policies and endpoints up by it.
    pub key: Arc<str>,
}

impl Binding {
    pub fn new(service: Arc<BoundService>, port: BoundPort) -> Binding {
        Binding {
            key: service.key().into(),
            service,
            port,
        }
    }
}

/// The endpoints of a (service key, port, targetPort), as [`crate::upstream::endpoints`] built them.
pub(crate) type EndpointMemo = HashMap<(Arc<str>, u16, u16), Arc<[crate::upstream::Endpoint]>>;

/// An immutable view of everything the data path needs.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads and services (endpoints, identities, labels).
    pub state: State,
    by_target: HashMap<SocketAddr, Binding>,
    /// Compiled routes by parent Service key (`<namespace>/<hostname>`).
    routes: HashMap<String, Arc<ServiceRoutes>>,
    /// Compiled request authentication rules by Service key.
    authn: HashMap<String, Arc<crate::authn::ServiceAuthn>>,
    /// The endpoints of each (service key, port, targetPort) asked for, built on first use
    /// ([`crate::upstream::endpoints`]); a new snapshot starts empty.
    endpoints: Mutex<EndpointMemo>,
    /// Compiled L7 AuthorizationPolicies.
    policies: Policies,
}

impl Snapshot {
    /// Builds a snapshot; bound services claiming the same VIP:port are refused.
    pub fn new(
        state: State,
        bound: impl IntoIterator<Item = Arc<BoundService>>,
    ) -> Result<Snapshot, BoundError> {
        let mut by_target: HashMap<SocketAddr, Binding> = HashMap::new();
        for svc in bound {
            for vip in &svc.vips {
                for port in &svc.ports {
                    let target = SocketAddr::new(vip.address, port.port);
                    let binding = Binding::new(svc.clone(), port.clone());
                    if let Some(prev) = by_target.insert(target, binding) {
                        return Err(BoundError::Duplicate(prev.service.key(), svc.key(), target));
                    }
                }
            }
        }
        Ok(Snapshot {
            state,
            by_target,
            routes: HashMap::new(),
            authn: HashMap::new(),
            endpoints: Mutex::default(),
            policies: Policies::default(),
        })
    }

    /// This snapshot with `routes` (compiled, keyed by their parent Service).
    pub fn with_routes(mut self, routes: impl IntoIterator<Item = Arc<ServiceRoutes>>) -> Snapshot {
        self.routes = routes.into_iter().map(|r| (r.key.clone(), r)).collect();
        self
    }

    /// This snapshot with request authentication rules (compiled, keyed by their Service).
    pub fn with_authn(
        mut self,
        authn: impl IntoIterator<Item = Arc<crate::authn::ServiceAuthn>>,
    ) -> Snapshot {
        self.authn = authn.into_iter().map(|a| (a.key.clone(), a)).collect();
        self
    }

    /// Every `jwksUri` the request authentication rules name.
    pub fn jwks_uris(&self) -> impl Iterator<Item = &str> {
        self.authn
            .values()
            .flat_map(|a| &a.rules)
            .filter_map(|r| match &r.keys {
                crate::authn::Keys::Remote { uri, .. } => Some(uri.as_str()),
                crate::authn::Keys::Inline(_) => None,
            })
    }

    /// The request authentication rules of the Service `key`, if any.
    pub fn authn(&self, key: &str) -> Option<Arc<crate::authn::ServiceAuthn>> {
        self.authn.get(key).filter(|a| !a.rules.is_empty()).cloned()
    }

    /// The memo of [`crate::upstream::endpoints`].
    pub(crate) fn endpoints_memo(&self) -> std::sync::MutexGuard<'_, EndpointMemo> {
        self.endpoints.lock().expect("endpoints memo lock")
    }

    /// This snapshot with the L7 AuthorizationPolicies `policies`.
    pub fn with_policies(mut self, policies: impl IntoIterator<Item = Arc<Policy>>) -> Snapshot {
        self.policies = Policies::new(policies);
        self
    }

    /// The L7 AuthorizationPolicies.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The routes attached to the Service `key`, if any.
    pub fn routes(&self, key: &str) -> Option<&ServiceRoutes> {
        self.routes.get(key).map(|r| r.as_ref())
    }

    /// Parses and checks a local config file's text.
    pub fn from_yaml(yaml: &str) -> Result<Snapshot, BoundError> {
        let file: LocalFile = if yaml.trim().is_empty() {
            LocalFile::default()
        } else {
            zmesh_core::yaml::check_limits(yaml)?;
            serde_yaml::from_str(yaml)?
        };
        let state = State::from_local(LocalConfig {
            workloads: file.workloads,
            services: file.services,
            policies: Vec::new(),
        })?;
        let mut routes = Vec::with_capacity(file.service_routes.len());
        for r in file.service_routes {
            let key = r.key();
            let proto = r
                .into_proto()
                .map_err(|reason| crate::route::RouteError::Invalid {
                    resource: key.clone(),
                    field: "serviceRoutes".into(),
                    reason,
                })?;
            routes.push(Arc::new(crate::route::compile(&key, &proto)?));
        }
        let mut policies = Vec::with_capacity(file.authorization_policies.len());
        for p in file.authorization_policies {
            let key = p.key();
            let proto = p.into_proto().map_err(|reason| crate::authz::AuthzError {
                resource: key.clone(),
                field: "action".into(),
                reason,
            })?;
            policies.push(Arc::new(Policy::compile(&key, &proto)?));
        }
        Ok(
            Snapshot::new(state, file.bound_services.into_iter().map(Arc::new))?
                .with_routes(routes)
                .with_policies(policies),
        )
    }

    /// Reads a local config file.
    pub fn load(path: &std::path::Path) -> Result<Snapshot, BoundError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| BoundError::Read(path.to_owned(), e))?;
        Snapshot::from_yaml(&text)
    }

    /// The binding of a CONNECT target (`VIP:port`), if that service port is bound here.
    pub fn binding(&self, target: SocketAddr) -> Option<&Binding> {
        self.by_target.get(&target)
    }

    /// Bound VIP:ports, for `/config_dump`-like views and logs.
    pub fn bound_targets(&self) -> usize {
        self.by_target.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
workloads:
- name: echo-1
  namespace: default
  serviceAccount: echo
  workloadIps: [10.0.0.2]
  protocol: HBONE
  services:
    default/echo.default.svc.cluster.local: {80: 8080}
boundServices:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: [/10.96.0.10]
  ports:
  - {port: 80, targetPort: 8080, protocol: HTTP}
  - {port: 9000}
"#;

    #[test]
    fn local_file() {
        let s = Snapshot::from_yaml(YAML).unwrap();
        let b = s.binding("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(b.port.protocol, PortProtocol::Http);
        assert_eq!(b.service.key(), "default/echo.default.svc.cluster.local");
        assert_eq!(&*b.key, "default/echo.default.svc.cluster.local");
        let b = s.binding("10.96.0.10:9000".parse().unwrap()).unwrap();
        assert_eq!(b.port.protocol, PortProtocol::Unspecified);
        assert!(s.binding("10.96.0.10:81".parse().unwrap()).is_none());
        assert_eq!(s.state.endpoints(&b.service.key()).len(), 1);
    }

    /// Endpoints are built once per snapshot and service port, and a new snapshot (a config
    /// change) builds them anew.
    #[test]
    fn endpoints_are_memoised_per_snapshot() {
        let s = Snapshot::from_yaml(YAML).unwrap();
        let b = s.binding("10.96.0.10:80".parse().unwrap()).unwrap();
        let first = crate::upstream::endpoints(&s, b);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].addr, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(
            &*first[0].meta.principal,
            "spiffe://cluster.local/ns/default/sa/echo"
        );
        assert!(Arc::ptr_eq(&first, &crate::upstream::endpoints(&s, b)));
        let other = s.binding("10.96.0.10:9000".parse().unwrap()).unwrap();
        // Port 9000 has no targetPort and the workload maps only 80: no endpoint (its own
        // entry, not port 80's).
        assert!(crate::upstream::endpoints(&s, other).is_empty());

        let two = YAML.replace(
            "boundServices:",
            "- name: echo-2\n  namespace: default\n  serviceAccount: echo\n  workloadIps: [10.0.0.3]\n  \
             protocol: HBONE\n  services:\n    default/echo.default.svc.cluster.local: {80: 8080}\nboundServices:",
        );
        let s2 = Snapshot::from_yaml(&two).unwrap();
        let b2 = s2.binding("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(crate::upstream::endpoints(&s2, b2).len(), 2);
    }

    #[test]
    fn local_routes() {
        let yaml = format!(
            "{YAML}serviceRoutes:\n- namespace: default\n  hostname: echo.default.svc.cluster.local\n  \
             rules:\n  - route: {{name: r}}\n    match: {{path: {{type: PathPrefix, value: /api}}}}\n    \
             filters: [{{urlRewrite: {{path: {{replacePrefixMatch: /v2}}}}}}]\n    \
             backends: [{{service: {{namespace: default, hostname: echo.default.svc.cluster.local, port: 80}}}}]\n    \
             timeouts: {{request: 2s}}\n    retry: {{codes: [503], attempts: 2, backoff: 25ms}}\n"
        );
        let s = Snapshot::from_yaml(&yaml).unwrap();
        let r = s.routes("default/echo.default.svc.cluster.local").unwrap();
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].backends[0].weight, 1, "weight defaults to 1");
        assert_eq!(
            r.rules[0].timeouts.request,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(r.rules[0].retry.as_ref().unwrap().attempts, 2);
        let bad = yaml.replace(
            "type: PathPrefix, value: /api",
            "type: RegularExpression, value: '(x'",
        );
        let e = Snapshot::from_yaml(&bad).unwrap_err().to_string();
        assert!(e.contains("bad regular expression"), "{e}");
        let two = yaml.replace(
            "{urlRewrite:",
            "{requestHeaderModifier: {remove: [x]}, urlRewrite:",
        );
        let e = Snapshot::from_yaml(&two).unwrap_err().to_string();
        assert!(e.contains("rules[0]: a filter needs exactly one of"), "{e}");
    }

    #[test]
    fn local_policies() {
        let yaml = format!(
            "{YAML}authorizationPolicies:\n- namespace: default\n  name: deny-admin\n  \
             services: [default/echo.default.svc.cluster.local]\n  action: DENY\n  \
             rules: [{{to: [{{operation: {{paths: ['/admin/{{**}}']}}}}]}}]\n"
        );
        let s = Snapshot::from_yaml(&yaml).unwrap();
        assert_eq!(s.policies().len(), 1);
        assert!(
            s.policies()
                .any_for("default/echo.default.svc.cluster.local")
        );
        let e = Snapshot::from_yaml(&yaml.replace("action: DENY", "action: CUSTOM"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUSTOM is not supported"), "{e}");
        let e = Snapshot::from_yaml(&yaml.replace("/admin/{**}", "/admin/{**}/{*}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rules[0].to[0].operation.paths[0]"), "{e}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let dup = YAML.replace("{port: 9000}", "{port: 80}");
        let e = Snapshot::from_yaml(&dup).unwrap_err().to_string();
        assert!(e.contains("10.96.0.10:80"), "{e}");
        let e = Snapshot::from_yaml("boundServices: [{name: x}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
        let e = Snapshot::from_yaml(&YAML.replace("protocol: HTTP", "protocol: SMTP"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn proto() {
        let good = pb::BoundService {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            vips: vec![xds_proto::istio::workload::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
                length: None,
            }],
            ports: vec![pb::ServicePort {
                port: 80,
                target_port: 8080,
                name: "http".into(),
                app_protocol: String::new(),
                protocol: pb::Protocol::Grpc as i32,
            }],
            waypoint: None,
        };
        let s = BoundService::from_proto("default/echo", good.clone()).unwrap();
        assert_eq!(s.ports[0].protocol, PortProtocol::Grpc);
        assert_eq!(
            s.vips[0].address,
            "10.96.0.10".parse::<std::net::IpAddr>().unwrap()
        );
        let mut bad = good.clone();
        bad.ports[0].port = 70000;
        let e = BoundService::from_proto("default/echo", bad).unwrap_err();
        assert_eq!(e.field, "ports[0].port");
        let mut bad = good;
        bad.vips[0].address = vec![1, 2, 3];
        let e = BoundService::from_proto("default/echo", bad).unwrap_err();
        assert_eq!(e.field, "vips[0].address");
    }
}
