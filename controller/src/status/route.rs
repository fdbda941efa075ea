//! Status of mesh routes (HTTPRoute, GRPCRoute on Services), as Gateway API defines it
//! (<https://gateway-api.sigs.k8s.io/reference/spec/#routeparentstatus>): one entry in
//! `status.parents` per Service parentRef (and per parentRef naming a waypoint Gateway), with
//! `controllerName` [`CONTROLLER_NAME`] and two conditions, `Accepted` (`Accepted`, or
//! `False` with `NoMatchingParent` / `UnsupportedValue` / `Conflicted` /
//! `NotAllowedByListeners` and what to fix) and `ResolvedRefs` (`ResolvedRefs`, or `False` with
//! `BackendNotFound` / `RefNotPermitted` / `InvalidKind`), each with the route's
//! `observedGeneration`.
//!
//! Entries written by other controllers (a Gateway's, for another parent) are kept as they
//! are: a JSON merge patch replaces the whole `parents` list, so the patch carries them too.
//! As for Gateways, only routes whose entries must change are written.

use serde_json::{Value, json};

use super::condition_json;
use crate::translate::route::{ParentStatus, RouteCondition, RouteId, RouteKind, Routes};
use crate::translate::{Objects, route::spec::ParentRef};

/// The `controllerName` of our entries: Istio's for mesh (GAMMA) routes, so tools that read
/// Istio's route status read ours.
pub const CONTROLLER_NAME: &str = "istio.io/mesh-controller";

/// A route whose `status.parents` must change.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteUpdate {
    /// The route.
    pub id: RouteId,
    /// Our entries (possibly none: the route no longer has a Service parent).
    pub generation: Option<i64>,
    /// Per Service parentRef.
    pub parents: Vec<ParentStatus>,
}

/// The routes whose status differs from what the translation says.
pub fn desired_route_updates(objects: &Objects, routes: &Routes) -> Vec<RouteUpdate> {
    let all = objects
        .http_routes
        .iter()
        .map(|(k, r)| (RouteKind::Http, k, r))
        .chain(
            objects
                .grpc_routes
                .iter()
                .map(|(k, r)| (RouteKind::Grpc, k, r)),
        );
    let mut out = Vec::new();
    for (kind, (namespace, name), route) in all {
        let id = RouteId {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let (generation, parents) = match routes.statuses.get(&id) {
            Some(s) => (s.generation, s.parents.clone()),
            None => (route.metadata.generation, Vec::new()),
        };
        let update = RouteUpdate {
            id,
            generation,
            parents,
        };
        if !same(&route.data["status"], &update) {
            out.push(update);
        }
    }
    out
}

/// Our current entries equal the wanted ones (ignoring transition times).
fn same(current: &Value, want: &RouteUpdate) -> bool {
    let ours: Vec<&Value> = current["parents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    ours.len() == want.parents.len()
        && want.parents.iter().zip(&ours).all(|(w, c)| {
            c["parentRef"] == parent_ref(&w.parent)
                && [
                    ("Accepted", &w.accepted),
                    ("ResolvedRefs", &w.resolved_refs),
                ]
                .iter()
                .all(|(kind, cond)| {
                    c["conditions"].as_array().is_some_and(|list| {
                        list.iter().any(|e| {
                            e["type"] == *kind
                                && e["status"] == status(cond)
                                && e["reason"] == cond.reason
                                && e["message"] == cond.message.as_str()
                                && e["observedGeneration"].as_i64() == want.generation
                        })
                    })
                })
        })
}

fn status(c: &RouteCondition) -> &'static str {
    if c.status { "True" } else { "False" }
}

/// A parentRef as status echoes it (the fields that were set).
fn parent_ref(p: &ParentRef) -> Value {
    let mut v = json!({"name": p.name});
    for (key, value) in [
        ("group", &p.group),
        ("kind", &p.kind),
        ("namespace", &p.namespace),
        ("sectionName", &p.section_name),
    ] {
        if let Some(value) = value {
            v[key] = json!(value);
        }
    }
    if let Some(port) = p.port {
        v["port"] = json!(port);
    }
    v
}

/// The merge patch: other controllers' entries as they are, then ours; a condition keeps its
/// transition time when its status did not flip.
pub fn route_patch(existing: &Value, update: &RouteUpdate, now: &str) -> Value {
    let current = existing["parents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut parents: Vec<Value> = current
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    for p in &update.parents {
        let parent = parent_ref(&p.parent);
        let previous = current
            .iter()
            .find(|c| c["controllerName"] == CONTROLLER_NAME && c["parentRef"] == parent)
            .and_then(|c| c["conditions"].as_array())
            .map_or(&[][..], Vec::as_slice);
        let conditions: Vec<Value> = [
            ("Accepted", &p.accepted),
            ("ResolvedRefs", &p.resolved_refs),
        ]
        .iter()
        .map(|(kind, c)| {
            condition_json(
                previous,
                kind,
                status(c),
                c.reason,
                &c.message,
                update.generation,
                now,
            )
        })
        .collect();
        parents.push(json!({
            "parentRef": parent,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    json!({"status": {"parents": parents}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{MeshConfig, translate};

    const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop, generation: 2}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}, {name: ingress}]
  rules: [{backendRefs: [{name: missing, port: 80}]}]
status:
  parents:
  - parentRef: {name: ingress}
    controllerName: example.com/gateway
    conditions: [{type: Accepted, status: 'True', reason: Accepted, message: ok}]
";

    #[test]
    fn entries_are_written_once_and_others_are_kept() {
        let mut objects = Objects::from_yaml(WORLD).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let updates = desired_route_updates(&objects, &t.routes);
        assert_eq!(updates.len(), 1);
        let route = objects
            .http_routes
            .get_mut(&("shop".to_owned(), "r".to_owned()))
            .unwrap();
        let body = route_patch(&route.data["status"], &updates[0], "2026-01-01T00:00:00Z");
        let parents = body["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], CONTROLLER_NAME);
        assert_eq!(
            ours["parentRef"],
            json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
        );
        assert_eq!(ours["conditions"][0]["type"], "Accepted");
        assert_eq!(ours["conditions"][0]["status"], "True");
        assert_eq!(ours["conditions"][1]["reason"], "BackendNotFound");
        assert_eq!(ours["conditions"][1]["status"], "False");
        assert_eq!(ours["conditions"][1]["observedGeneration"], 2);
        // Applied as the API server would: nothing more to write.
        route.data["status"] = body["status"].clone();
        assert!(desired_route_updates(&objects, &t.routes).is_empty());
        // The Service parentRef goes away: our entry is removed, the other kept.
        let route = objects
            .http_routes
            .get_mut(&("shop".to_owned(), "r".to_owned()))
            .unwrap();
        route.data["spec"]["parentRefs"] = json!([{"name": "ingress"}]);
        let t = translate(&objects, &MeshConfig::default());
        let updates = desired_route_updates(&objects, &t.routes);
        assert_eq!(updates.len(), 1);
        let route = &objects.http_routes[&("shop".to_owned(), "r".to_owned())];
        let body = route_patch(&route.data["status"], &updates[0], "2026-02-01T00:00:00Z");
        let parents = body["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 1);
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
    }
}
