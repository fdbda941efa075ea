//! Translation of Kubernetes objects into Istio's workload API (`istio.workload.Workload` and
//! `istio.workload.Service`), the resources ztunnel subscribes to as
//! `type.googleapis.com/istio.workload.Address`.
//!
//! Everything here is a pure function of its input: [`Objects`] (Namespaces, Pods, Services,
//! EndpointSlices, usually loaded from YAML with [`Objects::from_yaml`]) and a [`MeshConfig`]
//! go in, a [`Translated`] set of resources keyed by their xDS names comes out. The watch and
//! the file source feed the same function, so a directory of YAML behaves like a cluster.
//!
//! Rules (Istio ambient semantics, see istio/ztunnel @ `62d82653`
//! `proto/workload.proto`):
//! - a Pod becomes a Workload when it has an IP, is not `hostNetwork` and not terminal;
//!   it tunnels HBONE when enrolled (`istio.io/dataplane-mode=ambient` on its Namespace or
//!   itself; `none` on the Pod opts out);
//! - a Service becomes a Service resource (VIPs from `clusterIPs`, none when headless);
//! - a Pod's `services` map lists every Service whose selector matches it, with named target
//!   ports resolved against the Pod's container ports. Services without a selector take their
//!   endpoints from EndpointSlices whose endpoints reference Pods (`targetRef`);
//! - waypoints come from `istio.io/use-waypoint` (+ `istio.io/use-waypoint-namespace`) on the
//!   Pod or Service, else on the Namespace, and are published only for a valid waypoint
//!   Gateway that accepts that kind of traffic (rules in [`waypoint`]); each Service bound to a
//!   waypoint also becomes a `zmesh.waypoint.v1.BoundService` for that waypoint;
//! - HTTPRoutes and GRPCRoutes whose parent is such a Service become its route table, in the
//!   precedence order Gateway API defines (rules in [`route`]);
//! - RequestAuthentications attached to such a Service (or its waypoint) become its JWT
//!   rules (rules in [`request_authentication`]).

mod authorization_policy;
mod authz;
mod json;
mod objects;
pub mod request_authentication;
pub mod route;
mod service;
pub mod waypoint;
pub mod waypoint_authz;
mod workload;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use xds_proto::istio::security::Authorization;
use xds_proto::istio::workload::{Service, Workload};
use xds_proto::zmesh::waypoint::v1::BoundService;

pub use authorization_policy::crd as authorization_policy_crd;
pub use authorization_policy::{
    AuthorizationPolicy, AuthorizationPolicyResource, AuthorizationPolicySpec, Condition,
    OpaqueStatus, Operation, PolicyTargetReference, Rule, RuleFrom, RuleTo, Source,
    WorkloadSelector,
};
pub use authz::{DRY_RUN_ANNOTATION, PolicyIssue, authorization_json, translate_policies};
pub use json::{service_json, to_json, workload_json};
pub use objects::{Kind, KubeObject, ObjectKey, Objects, TranslateError, key_of, parse_yaml};
pub use request_authentication::crd as request_authentication_crd;
pub use request_authentication::{AuthnIssue, RequestAuthn, translate_request_authn};
pub use route::{RouteId, RouteKind, Routes, translate_routes};
pub use waypoint::{Rejection, Target, Waypoint, WaypointFor, Waypoints};

/// Label that enrols a Namespace or Pod in the mesh (`ambient`), or opts a Pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Label that binds a Namespace, Service or Pod to a waypoint (by Gateway name).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label naming the waypoint's namespace when it differs from the object's.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label Istio puts on waypoint Pods and Services; a waypoint never gets a waypoint itself.
pub const GATEWAY_MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// Value of [`GATEWAY_MANAGED_LABEL`] on waypoints.
pub const WAYPOINT_MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// The HBONE port a waypoint listens on.
pub const HBONE_PORT: u32 = 15008;

/// Mesh-wide settings the translation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// SPIFFE trust domain of workloads, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Cluster id, the first segment of workload uids, e.g. `Kubernetes`.
    pub cluster_id: String,
    /// DNS suffix of Service hostnames, e.g. `cluster.local`.
    pub domain_suffix: String,
    /// Istio's root namespace, e.g. `istio-system`: its AuthorizationPolicies without a
    /// selector apply mesh-wide, and those with one select workloads in every namespace.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            cluster_id: "Kubernetes".to_owned(),
            domain_suffix: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// The translated resources, keyed by their xDS resource names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    /// Workloads keyed by uid, `<cluster>//Pod/<namespace>/<name>`.
    pub workloads: BTreeMap<String, Workload>,
    /// Services keyed by `<namespace>/<hostname>`.
    pub services: BTreeMap<String, Service>,
    /// Authorizations (`type.googleapis.com/istio.security.Authorization`) keyed by
    /// `<namespace>/<name>` of their AuthorizationPolicy.
    pub authorizations: BTreeMap<String, Authorization>,
    /// AuthorizationPolicies that were not sent to ztunnel, or were sent narrowed.
    pub issues: Vec<PolicyIssue>,
    /// Services bound to a valid waypoint, keyed by `<namespace>/<hostname>`
    /// (`type.googleapis.com/zmesh.waypoint.v1.BoundService`, served to that waypoint only).
    pub bound_services: BTreeMap<String, BoundService>,
    /// Every Gateway of class `istio-waypoint`, judged (for status and logs).
    pub waypoints: Waypoints,
    /// HTTPRoutes and GRPCRoutes on Services (GAMMA): the route table of each Service bound
    /// to a waypoint, and every route's status (rules in [`route`]).
    pub routes: Routes,
    /// RequestAuthentications attached to bound Services (`zmesh.waypoint.v1.ServiceAuthn`,
    /// served where the Service's `BoundService` goes), and the policies not applied.
    pub request_authn: RequestAuthn,
    /// AuthorizationPolicies attached with targetRefs: the waypoints' L7 policies
    /// (`type.googleapis.com/zmesh.waypoint.v1.WaypointPolicy`) and where each is enforced.
    pub waypoint_authz: waypoint_authz::WaypointAuthz,
}

/// Each Namespace's labels, by name (Namespaces without labels are left out).
fn namespace_labels(objects: &Objects) -> BTreeMap<&str, &BTreeMap<String, String>> {
    objects
        .namespaces
        .values()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, ns.metadata.labels.as_ref()?)))
        .collect()
}

/// Translates `objects` into workload API resources. Never fails: objects that cannot be
/// represented (no IP, unparsable addresses, ...) are left out.
pub fn translate(objects: &Objects, mesh: &MeshConfig) -> Translated {
    let namespaces = namespace_labels(objects);
    let ns_labels = |ns: &str| namespaces.get(ns).copied();
    let waypoints = Waypoints::new(objects, mesh);

    let mut services = BTreeMap::new();
    let mut bound_services = BTreeMap::new();
    for svc in objects.services.values() {
        if let Some(out) = service::translate_service(svc, ns_labels, &waypoints, mesh) {
            services.insert(format!("{}/{}", out.namespace, out.hostname), out);
        }
        let ns = namespace_of(&svc.metadata);
        if let Some(out) = waypoint::bound_service(svc, &waypoints, ns_labels(ns), mesh) {
            bound_services.insert(format!("{}/{}", out.namespace, out.hostname), out);
        }
    }
    let waypoint_authz = waypoint_authz::translate(objects, mesh, &waypoints, &bound_services);
    let slice_ports = service::endpoint_slice_ports(objects, mesh);
    let services_by_ns = services_by_namespace(objects);

    let mut workloads = BTreeMap::new();
    for pod in objects.pods.values() {
        let candidates = services_by_ns
            .get(namespace_of(&pod.metadata))
            .map_or(&[][..], Vec::as_slice);
        if let Some(out) = workload::translate_pod(
            pod,
            ns_labels,
            candidates,
            &slice_ports,
            objects,
            &waypoints,
            &waypoint_authz.ztunnel_fallback,
            mesh,
        ) {
            workloads.insert(out.uid.clone(), out);
        }
    }
    let (authorizations, issues) =
        authz::translate_policies_with(objects, mesh, &waypoint_authz.ztunnel_fallback);
    let routes = route::translate_routes(objects, &bound_services, mesh);
    let request_authn = translate_request_authn(&objects.request_authentications, &bound_services);
    Translated {
        workloads,
        services,
        authorizations,
        issues,
        bound_services,
        waypoints,
        routes,
        request_authn,
        waypoint_authz,
    }
}

/// Re-translates only the Pods `pods` (present or removed) after a change that touched
/// nothing but Pods, given `previous`, the translation of the objects before that change.
///
/// Pods feed only the workloads: every other part of the translation reads no Pod, so it is
/// still `previous`'s. Returns, per Pod, its workload uid and its new Workload (`None`: no
/// longer a workload). Applying these to `previous.workloads` gives exactly
/// `translate(objects, mesh).workloads` (see the reconciler's tests).
pub fn translate_pods<'k>(
    objects: &Objects,
    mesh: &MeshConfig,
    previous: &Translated,
    pods: impl IntoIterator<Item = &'k ObjectKey>,
) -> Vec<(String, Option<Workload>)> {
    let namespaces = namespace_labels(objects);
    let ns_labels = |ns: &str| namespaces.get(ns).copied();
    let slice_ports = service::endpoint_slice_ports(objects, mesh);
    let services_by_ns = services_by_namespace(objects);
    let mut out = Vec::new();
    for key in pods {
        let (namespace, name) = key;
        let uid = workload::pod_uid(namespace, name, mesh);
        let workload = objects.pods.get(key).and_then(|pod| {
            let candidates = services_by_ns
                .get(namespace_of(&pod.metadata))
                .map_or(&[][..], Vec::as_slice);
            workload::translate_pod(
                pod,
                ns_labels,
                candidates,
                &slice_ports,
                objects,
                &previous.waypoints,
                &previous.waypoint_authz.ztunnel_fallback,
                mesh,
            )
        });
        debug_assert!(workload.as_ref().is_none_or(|w| w.uid == uid));
        out.push((uid, workload));
    }
    out
}

/// The Services of each namespace, in key order (a Pod's candidate Services).
fn services_by_namespace(objects: &Objects) -> BTreeMap<&str, Vec<&KubeService>> {
    let mut services_by_ns: BTreeMap<&str, Vec<&KubeService>> = BTreeMap::new();
    for svc in objects.services.values() {
        services_by_ns
            .entry(namespace_of(&svc.metadata))
            .or_default()
            .push(svc);
    }
    services_by_ns
}

/// The DNS name of Service `name` in `namespace`.
pub fn service_hostname(name: &str, namespace: &str, mesh: &MeshConfig) -> String {
    format!("{name}.{namespace}.svc.{}", mesh.domain_suffix)
}

/// An object's namespace; Kubernetes' `default` when the document leaves it out.
fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// When an object was created, ranked oldest first and an object without a creation time
/// after every dated one: of two objects that conflict, the older wins (Gateway API's rule for
/// routes, which RequestAuthentications follow too).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Age(bool, Option<Time>);

impl Age {
    fn of(meta: &ObjectMeta) -> Age {
        let created = meta.creation_timestamp.clone();
        Age(created.is_none(), created)
    }
}
