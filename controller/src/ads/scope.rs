//! Which stream sees which resource: the [`Filter`](super::Filter) the controller serves with.
//!
//! Waypoints (zmesh's own resources, `zmesh.waypoint.v1.BoundService`) are scoped by the
//! identity the stream authenticated as, never by what the client says about itself: a
//! waypoint runs as its Gateway's service account (Istio names it after the Gateway), so the
//! stream of `spiffe://<trust domain>/ns/<gateway namespace>/sa/<gateway name>` gets exactly
//! the Services bound to that Gateway, and every other stream (ztunnels included) gets none.
//! A Service's routes (`zmesh.waypoint.v1.ServiceRoutes`, same resource name) go exactly where
//! its `BoundService` goes: the scope reads the cached `BoundService` of that name (a route
//! table without one is served to nobody). A Service's JWT rules
//! (`zmesh.waypoint.v1.ServiceAuthn`, same resource name) follow the same rule.
//! Istio's workload API resources (`Address`, `Authorization`) go to every authenticated
//! stream, waypoints included (a waypoint needs the endpoints of the Services it fronts).

use prost::Message;
use prost_types::Any;
use xds_proto::zmesh::waypoint::v1::BoundService;
use xds_proto::{BOUND_SERVICE_TYPE_URL, SERVICE_AUTHN_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use zmesh_core::identity::SpiffeId;

use super::Node;
use super::cache::Cache;

/// The identity a waypoint for Gateway `namespace/name` runs as.
pub fn waypoint_identity(trust_domain: &str, namespace: &str, name: &str) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, namespace, name).ok()
}

/// The controller's filter: `BoundService` resources only to their waypoint's identity (in
/// `trust_domain`), `ServiceRoutes` and `ServiceAuthn` only where the `BoundService` of the same name (in
/// `cache`) goes, everything else to everyone.
pub fn waypoint_scope(
    trust_domain: String,
    cache: Cache,
) -> impl Fn(&Node, &str, &str, &Any) -> bool + Send + Sync + 'static {
    move |node, type_url, name, resource| {
        let bound = match type_url {
            BOUND_SERVICE_TYPE_URL => BoundService::decode(resource.value.as_slice()).ok(),
            SERVICE_ROUTES_TYPE_URL | SERVICE_AUTHN_TYPE_URL => cache
                .get(BOUND_SERVICE_TYPE_URL, name)
                .and_then(|e| BoundService::decode(e.resource.value.as_slice()).ok()),
            _ => return true,
        };
        let (Some(identity), Some(bound)) = (&node.identity, bound) else {
            return false;
        };
        bound.waypoint.is_some_and(|gw| {
            waypoint_identity(&trust_domain, &gw.namespace, &gw.name).as_ref() == Some(identity)
        })
    }
}
