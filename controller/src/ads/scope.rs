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
//! (`zmesh.waypoint.v1.ServiceAuthn`, same resource name) follow the same rule. A waypoint's
//! L7 AuthorizationPolicy (`zmesh.waypoint.v1.WaypointPolicy`) goes only to the waypoint it
//! names.
//! Istio's workload API resources (`Address`, `Authorization`) go to every authenticated
//! stream, waypoints included (a waypoint needs the endpoints of the Services it fronts).

use prost::Message;
use prost_types::Any;
use xds_proto::zmesh::waypoint::v1::{BoundService, WaypointPolicy};
use xds_proto::{
    BOUND_SERVICE_TYPE_URL, SERVICE_AUTHN_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
};
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
            WAYPOINT_POLICY_TYPE_URL => {
                let gw = WaypointPolicy::decode(resource.value.as_slice())
                    .ok()
                    .and_then(|p| p.waypoint);
                return match (&node.identity, gw) {
                    (Some(identity), Some(gw)) => {
                        waypoint_identity(&trust_domain, &gw.namespace, &gw.name).as_ref()
                            == Some(identity)
                    }
                    _ => false,
                };
            }
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

#[cfg(test)]
mod tests {
    use prost::Message;
    use xds_proto::zmesh::waypoint::v1::GatewayRef;

    use super::*;

    fn node(identity: Option<&str>) -> Node {
        Node {
            id: "waypoint~x.ns".into(),
            cluster: String::new(),
            node_name: None,
            namespace: None,
            cluster_id: None,
            identity: identity.map(|i| i.parse().unwrap()),
        }
    }

    #[test]
    fn a_waypoint_policy_goes_only_to_the_waypoint_it_names() {
        let scope = waypoint_scope("cluster.local".into(), Cache::new());
        let p = WaypointPolicy {
            waypoint: Some(GatewayRef {
                namespace: "app".into(),
                name: "waypoint".into(),
            }),
            namespace: "app".into(),
            name: "deny".into(),
            all_services: true,
            ..Default::default()
        };
        let any = Any {
            type_url: WAYPOINT_POLICY_TYPE_URL.into(),
            value: p.encode_to_vec(),
        };
        let sees = |id: Option<&str>| {
            scope(
                &node(id),
                WAYPOINT_POLICY_TYPE_URL,
                "app/waypoint/app/deny",
                &any,
            )
        };
        assert!(sees(Some("spiffe://cluster.local/ns/app/sa/waypoint")));
        assert!(!sees(Some("spiffe://cluster.local/ns/app/sa/other")));
        assert!(!sees(Some(
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        )));
        assert!(!sees(None));
        let no_gateway = Any {
            type_url: WAYPOINT_POLICY_TYPE_URL.into(),
            value: WaypointPolicy::default().encode_to_vec(),
        };
        assert!(!scope(
            &node(Some("spiffe://cluster.local/ns/app/sa/waypoint")),
            WAYPOINT_POLICY_TYPE_URL,
            "x",
            &no_gateway
        ));
    }
}
