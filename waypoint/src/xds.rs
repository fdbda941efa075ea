//! The waypoint's delta ADS client: one `DeltaAggregatedResources` stream to the controller,
//! subscribed (wildcard) to `istio.workload.Address` (the endpoints of the services it fronts,
//! as ztunnel) and `zmesh.waypoint.v1.BoundService` (which services it fronts; the controller
//! sends only those bound to the Gateway the caller's credential names), and
//! `zmesh.waypoint.v1.ServiceRoutes` (the HTTPRoute/GRPCRoute rules of those services, compiled
//! by [`crate::route::compile`]; not needed for readiness) and `zmesh.waypoint.v1.WaypointPolicy`
//! (the L7 AuthorizationPolicies this waypoint enforces, compiled by
//! [`crate::authz::Policy::compile`]; also not waited for: until the first response the
//! waypoint is not ready anyway, as readiness needs the Address and BoundService types, which
//! the controller sends in the same pass), and `zmesh.waypoint.v1.ServiceAuthn` (the
//! RequestAuthentication JWT rules of those services, compiled by [`crate::authn::compile`];
//! not waited for either).
//!
//! On every (re)connect each type's first request carries `initial_resource_versions`, so only
//! changes are sent. Each response is applied resource by resource and ACKed, or NACKed naming
//! each bad resource (the good ones still applied), then published as one new [`Snapshot`].
//! Ready once Address and BoundService were applied once. After a failure the stream is re-opened with
//! backoff (10 ms doubling to 15 s); the last good snapshot keeps serving meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::google::rpc::Status as RpcStatus;
use xds_proto::{
    ADDRESS_TYPE_URL, BOUND_SERVICE_TYPE_URL, SERVICE_AUTHN_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
};
use zmesh_core::state::xds::{AddressResource, decode_address};
use zmesh_core::state::{Service, State, Workload};

use crate::app::Waypoint;
use crate::authn::ServiceAuthn;
use crate::authz::Policy;
use crate::bound::{BoundService, Snapshot};
use crate::route::ServiceRoutes;
use xds_proto::zmesh::waypoint::v1::{
    ServiceAuthn as ServiceAuthnProto, ServiceRoutes as ServiceRoutesProto,
    WaypointPolicy as WaypointPolicyProto,
};
use zmesh_core::grpc::{AuthHeaders, GrpcError, Target, channel, describe};

const TYPES: [&str; 5] = [
    ADDRESS_TYPE_URL,
    BOUND_SERVICE_TYPE_URL,
    SERVICE_ROUTES_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
    SERVICE_AUTHN_TYPE_URL,
];
/// The types that must have been applied once for the waypoint to be ready (a Service
/// without routes is served as a plain L7 proxy, so routes are not waited for).
const READY_TYPES: [&str; 2] = [ADDRESS_TYPE_URL, BOUND_SERVICE_TYPE_URL];
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Largest response accepted (upstream ztunnel's limit).
const MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;

type Rpc = AggregatedDiscoveryServiceClient<InterceptedService<Channel, AuthHeaders>>;

/// What the client holds, by resource name, with versions.
#[derive(Default)]
struct Store {
    workloads: BTreeMap<String, (String, Arc<Workload>)>,
    services: BTreeMap<String, (String, Arc<Service>)>,
    bound: BTreeMap<String, (String, Arc<BoundService>)>,
    routes: BTreeMap<String, (String, Arc<ServiceRoutes>)>,
    policies: BTreeMap<String, (String, Arc<Policy>)>,
    authn: BTreeMap<String, (String, Arc<ServiceAuthn>)>,
}

impl Store {
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        let v = |m: &BTreeMap<String, (String, _)>| -> Vec<(String, String)> {
            m.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
        };
        let mut out = HashMap::new();
        if type_url == ADDRESS_TYPE_URL {
            out.extend(v(&self.workloads));
            out.extend(
                self.services
                    .iter()
                    .map(|(k, (ver, _))| (k.clone(), ver.clone())),
            );
        } else if type_url == WAYPOINT_POLICY_TYPE_URL {
            out.extend(
                self.policies
                    .iter()
                    .map(|(k, (ver, _))| (k.clone(), ver.clone())),
            );
        } else if type_url == SERVICE_AUTHN_TYPE_URL {
            out.extend(
                self.authn
                    .iter()
                    .map(|(k, (ver, _))| (k.clone(), ver.clone())),
            );
        } else if type_url == SERVICE_ROUTES_TYPE_URL {
            out.extend(
                self.routes
                    .iter()
                    .map(|(k, (ver, _))| (k.clone(), ver.clone())),
            );
        } else {
            out.extend(
                self.bound
                    .iter()
                    .map(|(k, (ver, _))| (k.clone(), ver.clone())),
            );
        }
        out
    }

    /// Applies a response; returns the errors of the resources refused.
    fn apply(&mut self, r: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        let address = r.type_url == ADDRESS_TYPE_URL;
        if r.type_url == SERVICE_ROUTES_TYPE_URL {
            return apply_compiled(
                &mut self.routes,
                r,
                "ServiceRoutes",
                |name, m: ServiceRoutesProto| {
                    crate::route::compile(name, &m).map_err(|e| e.to_string())
                },
            );
        }
        if r.type_url == SERVICE_AUTHN_TYPE_URL {
            return apply_compiled(
                &mut self.authn,
                r,
                "ServiceAuthn",
                |name, m: ServiceAuthnProto| {
                    crate::authn::compile(name, &m).map_err(|e| e.to_string())
                },
            );
        }
        if r.type_url == WAYPOINT_POLICY_TYPE_URL {
            return apply_compiled(
                &mut self.policies,
                r,
                "WaypointPolicy",
                |name, m: WaypointPolicyProto| Policy::compile(name, &m).map_err(|e| e.to_string()),
            );
        }
        for name in &r.removed_resources {
            if address {
                self.workloads.remove(name);
                self.services.remove(name);
            } else {
                self.bound.remove(name);
            }
        }
        for res in &r.resources {
            let Some(any) = &res.resource else {
                errors.push(format!("resource {:?}: no body", res.name));
                continue;
            };
            if address {
                match decode_address(&res.name, &any.value) {
                    Ok(AddressResource::Workload(w)) => {
                        self.services.remove(&res.name);
                        self.workloads
                            .insert(res.name.clone(), (res.version.clone(), Arc::new(w)));
                    }
                    Ok(AddressResource::Service(s)) => {
                        self.workloads.remove(&res.name);
                        self.services
                            .insert(res.name.clone(), (res.version.clone(), Arc::new(s)));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            } else {
                let decoded = xds_proto::zmesh::waypoint::v1::BoundService::decode(&any.value[..])
                    .map_err(|e| format!("resource {:?}: not a BoundService: {e}", res.name))
                    .and_then(|b| {
                        BoundService::from_proto(&res.name, b).map_err(|e| e.to_string())
                    });
                match decoded {
                    Ok(b) => {
                        self.bound
                            .insert(res.name.clone(), (res.version.clone(), Arc::new(b)));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        errors
    }

    fn snapshot(&self) -> Result<Snapshot, String> {
        let (state, conflicts) = State::from_resources(
            self.workloads.values().map(|(_, w)| w.clone()),
            self.services.values().map(|(_, s)| s.clone()),
        );
        for c in conflicts {
            tracing::warn!(conflict = %c, "xDS: address conflict");
        }
        Snapshot::new(state, self.bound.values().map(|(_, b)| b.clone()))
            .map(|s| {
                s.with_routes(self.routes.values().map(|(_, r)| r.clone()))
                    .with_policies(self.policies.values().map(|(_, p)| p.clone()))
                    .with_authn(self.authn.values().map(|(_, a)| a.clone()))
            })
            .map_err(|e| e.to_string())
    }
}

/// Applies a response of one compiled kind (`ServiceRoutes`, `WaypointPolicy`, `ServiceAuthn`)
/// to `map`: removals, then each resource decoded as `M` and compiled. A resource that does not
/// decode or compile is refused whole and named in the NACK; its previous version, if any,
/// keeps applying (a policy is never dropped into a silent allow).
fn apply_compiled<M: Message + Default, T>(
    map: &mut BTreeMap<String, (String, Arc<T>)>,
    r: &DeltaDiscoveryResponse,
    kind: &str,
    compile: impl Fn(&str, M) -> Result<T, String>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for name in &r.removed_resources {
        map.remove(name);
    }
    for res in &r.resources {
        let compiled = res
            .resource
            .as_ref()
            .ok_or_else(|| format!("resource {:?}: no body", res.name))
            .and_then(|any| {
                M::decode(&any.value[..])
                    .map_err(|e| format!("resource {:?}: not a {kind}: {e}", res.name))
            })
            .and_then(|m| compile(&res.name, m));
        match compiled {
            Ok(t) => {
                map.insert(res.name.clone(), (res.version.clone(), Arc::new(t)));
            }
            Err(e) => {
                tracing::warn!(resource = %res.name, kind, error = %e, "resource refused whole; its previous version (if any) keeps applying");
                errors.push(e);
            }
        }
    }
    errors
}

/// The node this waypoint announces: `waypoint~<pod>.<namespace>`, its cluster, and its
/// identity in the metadata (informational: the controller scopes by the credential).
pub fn node(cfg: &crate::config::Config) -> Node {
    let ns = cfg.identity.namespace();
    let pod = if cfg.pod_name.is_empty() {
        "waypoint"
    } else {
        &cfg.pod_name
    };
    let field = |v: String| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v)),
    };
    Node {
        id: format!("waypoint~{pod}.{ns}"),
        cluster: cfg.cluster_id.clone(),
        metadata: Some(prost_types::Struct {
            fields: [
                ("NAMESPACE".to_owned(), field(ns.to_owned())),
                (
                    "SERVICE_ACCOUNT".to_owned(),
                    field(cfg.identity.service_account().to_owned()),
                ),
                ("CLUSTER_ID".to_owned(), field(cfg.cluster_id.clone())),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

/// Starts the client; it runs until the waypoint drains. Fails only on a bad target.
pub fn start(
    wp: Arc<Waypoint>,
    target: &Target,
    auth: AuthHeaders,
    node: Node,
) -> Result<(), GrpcError> {
    let rpc = AggregatedDiscoveryServiceClient::with_interceptor(channel(target)?, auth)
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
    let address = target.address.clone();
    tokio::spawn(async move {
        let mut store = Store::default();
        let mut seen = HashSet::new();
        let mut backoff = BACKOFF_MIN;
        loop {
            let r = tokio::select! {
                _ = wp.drain.cancelled() => return,
                r = stream(&rpc, &node, &mut store, &mut seen, &wp) => r,
            };
            match r {
                Ok(()) => backoff = BACKOFF_MIN,
                Err((delivered, e)) => {
                    if delivered {
                        backoff = BACKOFF_MIN;
                    }
                    tracing::warn!(%address, error = %e, retry_in = ?backoff, "xDS: stream failed; serving the last good config");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    Ok(())
}

/// One stream, until it fails; the error says whether it delivered config first.
async fn stream(
    rpc: &Rpc,
    node: &Node,
    store: &mut Store,
    seen: &mut HashSet<String>,
    wp: &Waypoint,
) -> Result<(), (bool, String)> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    for (i, ty) in TYPES.iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: (*ty).to_owned(),
            initial_resource_versions: store.versions(ty),
            ..Default::default()
        };
        tx.send(req).await.map_err(|e| (false, e.to_string()))?;
    }
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut rpc = rpc.clone();
    let mut inbound = rpc
        .delta_aggregated_resources(outbound)
        .await
        .map_err(|s| (false, describe(&s)))?
        .into_inner();
    let mut delivered = false;
    loop {
        let resp = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err((delivered, "the controller closed the stream".into())),
            Err(s) => return Err((delivered, describe(&s))),
        };
        let mut errors = store.apply(&resp);
        match store.snapshot() {
            Ok(s) => {
                wp.jwks.retain(s.jwks_uris());
                wp.snapshot.store(Arc::new(s));
                delivered = true;
            }
            Err(e) => errors.push(e),
        }
        seen.insert(resp.type_url.clone());
        if READY_TYPES.iter().all(|t| seen.contains(*t)) {
            wp.config_ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let error_detail = (!errors.is_empty()).then(|| {
            let message = zmesh_core::grpc::nack_detail(&errors);
            tracing::warn!(type_url = %resp.type_url, errors = %message, "xDS: NACK");
            RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }
        });
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        };
        tx.send(ack).await.map_err(|e| (delivered, e.to_string()))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Any;
    use xds_proto::envoy::service::discovery::v3::Resource;
    use xds_proto::zmesh::waypoint::v1 as pb;

    fn bound(name: &str, port: u32) -> Resource {
        let b = pb::BoundService {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            vips: vec![xds_proto::istio::workload::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, if name == "a" { 1 } else { 2 }],
                length: None,
            }],
            ports: vec![pb::ServicePort {
                port,
                ..Default::default()
            }],
            waypoint: None,
        };
        Resource {
            name: format!("default/{name}"),
            version: "1".into(),
            resource: Some(Any {
                type_url: BOUND_SERVICE_TYPE_URL.into(),
                value: b.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn bad_resources_are_named_and_good_ones_applied() {
        let mut store = Store::default();
        let resp = DeltaDiscoveryResponse {
            type_url: BOUND_SERVICE_TYPE_URL.into(),
            resources: vec![bound("a", 80), bound("b", 0)],
            nonce: "n1".into(),
            ..Default::default()
        };
        let errors = store.apply(&resp);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("default/b") && errors[0].contains("ports[0].port"),
            "{errors:?}"
        );
        let snap = store.snapshot().unwrap();
        assert!(snap.binding("10.96.0.1:80".parse().unwrap()).is_some());
        assert_eq!(
            store.versions(BOUND_SERVICE_TYPE_URL),
            HashMap::from([("default/a".to_owned(), "1".to_owned())])
        );
        // Removal.
        let resp = DeltaDiscoveryResponse {
            type_url: BOUND_SERVICE_TYPE_URL.into(),
            removed_resources: vec!["default/a".into()],
            ..Default::default()
        };
        assert!(store.apply(&resp).is_empty());
        assert_eq!(store.snapshot().unwrap().bound_targets(), 0);
    }

    fn routes(version: &str, regex: &str) -> Resource {
        let r = pb::ServiceRoutes {
            namespace: "default".into(),
            name: "echo".into(),
            hostname: "a.default.svc.cluster.local".into(),
            rules: vec![pb::RouteRule {
                r#match: Some(pb::RouteMatch {
                    path: Some(pb::PathMatch {
                        r#type: pb::MatchType::RegularExpression as i32,
                        value: regex.into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        Resource {
            name: "default/a.default.svc.cluster.local".into(),
            version: version.into(),
            resource: Some(Any {
                type_url: SERVICE_ROUTES_TYPE_URL.into(),
                value: r.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn routes_that_do_not_compile_are_refused_and_the_last_good_ones_kept() {
        let mut store = Store::default();
        let resp = |r: Resource| DeltaDiscoveryResponse {
            type_url: SERVICE_ROUTES_TYPE_URL.into(),
            resources: vec![r],
            ..Default::default()
        };
        assert!(store.apply(&resp(routes("1", "/v[0-9]+"))).is_empty());
        let errors = store.apply(&resp(routes("2", "/v[0-9")));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("bad regular expression"), "{errors:?}");
        assert_eq!(
            store.versions(SERVICE_ROUTES_TYPE_URL),
            HashMap::from([(
                "default/a.default.svc.cluster.local".to_owned(),
                "1".to_owned()
            )])
        );
        let snap = store.snapshot().unwrap();
        let r = snap.routes("default/a.default.svc.cluster.local").unwrap();
        assert_eq!(r.rules.len(), 1);
    }
    fn waypoint_policy(version: &str, path: &str) -> Resource {
        let p = pb::WaypointPolicy {
            waypoint: None,
            namespace: "default".into(),
            name: "deny-admin".into(),
            all_services: true,
            services: vec![],
            action: pb::PolicyAction::Deny as i32,
            dry_run: false,
            rules: vec![pb::PolicyRule {
                to: vec![pb::PolicyOperation {
                    paths: vec![path.into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        Resource {
            name: "default/waypoint/default/deny-admin".into(),
            version: version.into(),
            resource: Some(Any {
                type_url: WAYPOINT_POLICY_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn policies_that_do_not_compile_are_refused_and_the_last_good_ones_kept() {
        let mut store = Store::default();
        let resp = |r: Resource| DeltaDiscoveryResponse {
            type_url: WAYPOINT_POLICY_TYPE_URL.into(),
            resources: vec![r],
            ..Default::default()
        };
        assert!(
            store
                .apply(&resp(waypoint_policy("1", "/admin")))
                .is_empty()
        );
        let errors = store.apply(&resp(waypoint_policy("2", "/admin/{**}/{*}")));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("rules[0].to[0].operation.paths[0]"),
            "{errors:?}"
        );
        assert_eq!(
            store.versions(WAYPOINT_POLICY_TYPE_URL),
            HashMap::from([(
                "default/waypoint/default/deny-admin".to_owned(),
                "1".to_owned()
            )])
        );
        let snap = store.snapshot().unwrap();
        assert_eq!(
            snap.policies().len(),
            1,
            "the last good version is enforced"
        );
        let resp = DeltaDiscoveryResponse {
            type_url: WAYPOINT_POLICY_TYPE_URL.into(),
            removed_resources: vec!["default/waypoint/default/deny-admin".into()],
            ..Default::default()
        };
        assert!(store.apply(&resp).is_empty());
        assert!(store.snapshot().unwrap().policies().is_empty());
    }
    fn authn(version: &str, jwks_uri: &str) -> Resource {
        let a = pb::ServiceAuthn {
            namespace: "default".into(),
            name: "echo".into(),
            hostname: "a.default.svc.cluster.local".into(),
            rules: vec![pb::JwtRule {
                issuer: "issuer@example.com".into(),
                jwks_uri: jwks_uri.into(),
                ..Default::default()
            }],
        };
        Resource {
            name: "default/a.default.svc.cluster.local".into(),
            version: version.into(),
            resource: Some(Any {
                type_url: SERVICE_AUTHN_TYPE_URL.into(),
                value: a.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn authn_that_does_not_compile_is_refused_and_the_last_good_kept() {
        let mut store = Store::default();
        let resp = |r: Resource| DeltaDiscoveryResponse {
            type_url: SERVICE_AUTHN_TYPE_URL.into(),
            resources: vec![r],
            ..Default::default()
        };
        assert!(
            store
                .apply(&resp(authn("1", "https://idp.example.com/jwks.json")))
                .is_empty()
        );
        let errors = store.apply(&resp(authn("2", "file:///jwks.json")));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("rules[0].jwks_uri"), "{errors:?}");
        assert_eq!(
            store.versions(SERVICE_AUTHN_TYPE_URL),
            HashMap::from([(
                "default/a.default.svc.cluster.local".to_owned(),
                "1".to_owned()
            )])
        );
        let snap = store.snapshot().unwrap();
        let a = snap.authn("default/a.default.svc.cluster.local").unwrap();
        assert!(
            matches!(&a.rules[0].keys, crate::authn::Keys::Remote { uri, .. } if uri == "https://idp.example.com/jwks.json")
        );
    }
}
