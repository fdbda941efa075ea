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
//! stream, waypoints included (a waypoint needs the endpoints of the Services it fronts); the
//! scope says so once per type ([`Scope::sees_all`]), so they are not looked at one by one.
//! A type the scope does not name goes to no one: a new resource type is served only once
//! the scope says to whom.

use prost::Message;
use prost_types::Any;
use xds_proto::zmesh::waypoint::v1::{BoundService, GatewayRef, WaypointPolicy};
use xds_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, BOUND_SERVICE_TYPE_URL, SERVICE_AUTHN_TYPE_URL,
    SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL,
};
use zmesh_core::identity::SpiffeId;

use super::cache::Cache;
use super::{Node, Scope};

/// The identity a waypoint for Gateway `namespace/name` runs as.
pub fn waypoint_identity(trust_domain: &str, namespace: &str, name: &str) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, namespace, name).ok()
}

/// The controller's filter: `BoundService` resources only to their waypoint's identity (in
/// `trust_domain`), `ServiceRoutes` and `ServiceAuthn` only where the `BoundService` of the same name (in
/// `cache`) goes, `WaypointPolicy` only to the waypoint it names, `Address` and `Authorization`
/// to everyone (without looking at them), any other type to no one.
pub fn waypoint_scope(trust_domain: String, cache: Cache) -> WaypointScope {
    WaypointScope {
        trust_domain,
        cache,
    }
}

/// See [`waypoint_scope`].
pub struct WaypointScope {
    trust_domain: String,
    cache: Cache,
}

impl WaypointScope {
    fn is_waypoint(&self, node: &Node, gw: Option<GatewayRef>) -> bool {
        match (&node.identity, gw) {
            (Some(identity), Some(gw)) => {
                waypoint_identity(&self.trust_domain, &gw.namespace, &gw.name).as_ref()
                    == Some(identity)
            }
            _ => false,
        }
    }
}

/// The types every node sees all of: Istio's workload API. The four waypoint types are
/// looked into; any other type is seen by no one (a type added to the cache is served only
/// once this scope says to whom).
fn open(type_url: &str) -> bool {
    matches!(type_url, ADDRESS_TYPE_URL | AUTHORIZATION_TYPE_URL)
}

impl Scope for WaypointScope {
    fn sees(&self, node: &Node, type_url: &str, name: &str, resource: &Any) -> bool {
        let gw = match type_url {
            BOUND_SERVICE_TYPE_URL => BoundService::decode(resource.value.as_slice())
                .ok()
                .and_then(|b| b.waypoint),
            SERVICE_ROUTES_TYPE_URL | SERVICE_AUTHN_TYPE_URL => self
                .cache
                .get(BOUND_SERVICE_TYPE_URL, name)
                .and_then(|e| BoundService::decode(e.resource.value.as_slice()).ok())
                .and_then(|b| b.waypoint),
            WAYPOINT_POLICY_TYPE_URL => WaypointPolicy::decode(resource.value.as_slice())
                .ok()
                .and_then(|p| p.waypoint),
            _ => return open(type_url),
        };
        self.is_waypoint(node, gw)
    }

    fn sees_all(&self, _node: &Node, type_url: &str) -> bool {
        open(type_url)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

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

    /// The four waypoint types are looked at one by one; every node sees every resource of
    /// the workload API's types, so the stream need not ask; no node sees a type the scope
    /// does not know.
    #[test]
    fn only_the_waypoint_types_are_scoped() {
        let scope = waypoint_scope("cluster.local".into(), Cache::new());
        let ztunnel = node(Some("spiffe://cluster.local/ns/istio-system/sa/ztunnel"));
        for t in [
            BOUND_SERVICE_TYPE_URL,
            SERVICE_ROUTES_TYPE_URL,
            SERVICE_AUTHN_TYPE_URL,
            WAYPOINT_POLICY_TYPE_URL,
        ] {
            assert!(!scope.sees_all(&ztunnel, t), "{t}");
            let any = Any {
                type_url: t.into(),
                value: Vec::new(),
            };
            assert!(!scope.sees(&ztunnel, t, "ns/svc", &any), "{t}");
        }
        for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
            assert!(scope.sees_all(&ztunnel, t), "{t}");
            assert!(scope.sees_all(&node(None), t), "{t}");
        }
        // A type the scope does not know goes to no one.
        let other = "type.googleapis.com/zmesh.example.v1.New";
        let any = Any {
            type_url: other.into(),
            value: Vec::new(),
        };
        assert!(!scope.sees_all(&ztunnel, other));
        assert!(!scope.sees(&ztunnel, other, "ns/x", &any));
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
            scope.sees(
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
        assert!(!scope.sees(
            &node(Some("spiffe://cluster.local/ns/app/sa/waypoint")),
            WAYPOINT_POLICY_TYPE_URL,
            "x",
            &no_gateway
        ));
    }
}
