//! Status of waypoint Gateways (class `istio-waypoint`), as Gateway API defines it and istiod
//! writes it: `Accepted` (`True`/`Accepted`, or `False` with `ListenersNotValid`/`Invalid`
//! and what to fix), `Programmed` (`True` once the waypoint's Service has a cluster IP,
//! `False`/`AddressNotAssigned` until then, `False`/`Invalid` when not accepted, and
//! `False` with the [`DeployError`]'s reason and message while the controller cannot create
//! the waypoint's objects) and
//! `addresses` (the Service's cluster IPs, type `IPAddress`).
//!
//! As for policies, only Gateways whose status must change are written, so the write (which
//! comes back as a watch event) never loops.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::condition_json;
use crate::deploy::DeployError;
use crate::translate::{Objects, Waypoints};

/// Waypoints whose objects could not be applied, by (namespace, name).
pub type Failures = BTreeMap<(String, String), DeployError>;

/// One Gateway condition (without its transition time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayCondition {
    pub kind: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// The status a waypoint Gateway should carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUpdate {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub conditions: Vec<GatewayCondition>,
    pub addresses: Vec<String>,
}

/// The status every Gateway of class `istio-waypoint` should carry.
pub fn gateway_statuses(
    objects: &Objects,
    waypoints: &Waypoints,
    failures: &Failures,
) -> Vec<GatewayUpdate> {
    let mut out = Vec::new();
    for (key, gw) in &objects.gateways {
        let generation = gw.metadata.generation;
        let (conditions, addresses) = if let Some(r) = waypoints.rejected.get(key) {
            (
                vec![
                    cond("Accepted", "False", r.reason, r.message.clone()),
                    cond("Programmed", "False", "Invalid", "not accepted".to_owned()),
                ],
                Vec::new(),
            )
        } else if let Some(w) = waypoints.valid.get(key) {
            let addresses: Vec<String> = w.vips.iter().map(ToString::to_string).collect();
            let programmed = if let Some(e) = failures.get(key) {
                cond("Programmed", "False", e.reason(), e.to_string())
            } else if addresses.is_empty() {
                cond(
                    "Programmed",
                    "False",
                    "AddressNotAssigned",
                    format!(
                        "waiting for Service {}/{} to have a cluster IP; until then traffic \
                         to what this waypoint fronts is refused",
                        key.0, key.1
                    ),
                )
            } else {
                cond(
                    "Programmed",
                    "True",
                    "Programmed",
                    "bound Services and workloads are sent to this waypoint".to_owned(),
                )
            };
            (
                vec![
                    cond("Accepted", "True", "Accepted", "a waypoint".to_owned()),
                    programmed,
                ],
                addresses,
            )
        } else {
            continue; // another class: not ours
        };
        out.push(GatewayUpdate {
            namespace: key.0.clone(),
            name: key.1.clone(),
            generation,
            conditions,
            addresses,
        });
    }
    out
}

fn cond(
    kind: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
) -> GatewayCondition {
    GatewayCondition {
        kind,
        status,
        reason,
        message,
    }
}

/// The updates needed: Gateways whose current status differs from what it should be.
pub fn desired_gateway_updates(
    objects: &Objects,
    waypoints: &Waypoints,
    failures: &Failures,
) -> Vec<GatewayUpdate> {
    gateway_statuses(objects, waypoints, failures)
        .into_iter()
        .filter(|u| {
            let current = objects
                .gateways
                .get(&(u.namespace.clone(), u.name.clone()))
                .map(|g| &g.data["status"]);
            !current.is_some_and(|s| same(s, u))
        })
        .collect()
}

fn same(current: &Value, want: &GatewayUpdate) -> bool {
    let conditions = current["conditions"].as_array();
    let conditions_same = want.conditions.iter().all(|c| {
        conditions.is_some_and(|list| {
            list.iter().any(|e| {
                e["type"] == c.kind
                    && e["status"] == c.status
                    && e["reason"] == c.reason
                    && e["message"] == c.message.as_str()
                    && e["observedGeneration"].as_i64() == want.generation
            })
        })
    });
    let addresses: Vec<&str> = current["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v["value"].as_str()).collect())
        .unwrap_or_default();
    conditions_same && addresses == want.addresses
}

/// The merge patch that sets the status, keeping each condition's transition time when its
/// status did not flip.
pub fn gateway_patch(existing: &Value, update: &GatewayUpdate, now: &str) -> Value {
    let previous = existing["conditions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let conditions: Vec<Value> = update
        .conditions
        .iter()
        .map(|c| {
            condition_json(
                previous,
                c.kind,
                c.status,
                c.reason,
                &c.message,
                update.generation,
                now,
            )
        })
        .collect();
    let addresses: Vec<Value> = update
        .addresses
        .iter()
        .map(|a| json!({"type": "IPAddress", "value": a}))
        .collect();
    json!({"status": {"conditions": conditions, "addresses": addresses}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{MeshConfig, translate};

    const GATEWAYS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ready, namespace: a, generation: 2}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: ready, namespace: a}
spec: {clusterIP: 10.96.0.7, ports: [{port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pending, namespace: a}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: http, namespace: a}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: web, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: a}
spec: {gatewayClassName: istio, listeners: [{name: web, port: 80, protocol: HTTP}]}
";

    fn find<'a>(u: &'a [GatewayUpdate], name: &str) -> &'a GatewayUpdate {
        u.iter().find(|u| u.name == name).unwrap()
    }

    #[test]
    fn accepted_programmed_and_addresses() {
        let objects = Objects::from_yaml(GATEWAYS).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let u = gateway_statuses(&objects, &t.waypoints, &Failures::new());
        assert_eq!(u.len(), 3, "the `istio` class Gateway is not ours");
        let ready = find(&u, "ready");
        assert_eq!(ready.addresses, ["10.96.0.7"]);
        assert_eq!(ready.generation, Some(2));
        assert_eq!(
            (ready.conditions[0].kind, ready.conditions[0].status),
            ("Accepted", "True")
        );
        assert_eq!(ready.conditions[1].reason, "Programmed");
        let pending = find(&u, "pending");
        assert!(pending.addresses.is_empty());
        assert_eq!(pending.conditions[1].reason, "AddressNotAssigned");
        let http = find(&u, "http");
        assert_eq!(
            (http.conditions[0].status, http.conditions[0].reason),
            ("False", "ListenersNotValid")
        );
        assert!(http.conditions[0].message.contains("exactly one listener"));
    }

    #[test]
    fn a_failed_deployment_is_programmed_false_with_what_to_fix() {
        let objects = Objects::from_yaml(GATEWAYS).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let mut failures = Failures::new();
        failures.insert(
            ("a".to_owned(), "ready".to_owned()),
            DeployError::Forbidden {
                kind: "Deployment".into(),
                name: "a/ready".into(),
                message: "forbidden".into(),
            },
        );
        let u = gateway_statuses(&objects, &t.waypoints, &failures);
        let ready = find(&u, "ready");
        assert_eq!(
            (ready.conditions[0].status, ready.conditions[1].status),
            ("True", "False")
        );
        assert_eq!(ready.conditions[1].reason, "NoResources");
        assert!(
            ready.conditions[1]
                .message
                .contains("manifests/controller/rbac.yaml"),
            "{}",
            ready.conditions[1].message
        );
        assert_eq!(
            find(&u, "pending").conditions[1].reason,
            "AddressNotAssigned"
        );
    }

    #[test]
    fn only_changes_are_written_and_transition_times_kept() {
        let mut objects = Objects::from_yaml(GATEWAYS).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let updates = desired_gateway_updates(&objects, &t.waypoints, &Failures::new());
        assert_eq!(updates.len(), 3);
        for u in &updates {
            let gw = objects
                .gateways
                .get_mut(&(u.namespace.clone(), u.name.clone()))
                .unwrap();
            let body = gateway_patch(&gw.data["status"], u, "2026-01-01T00:00:00Z");
            gw.data["status"] = body["status"].clone();
        }
        assert!(desired_gateway_updates(&objects, &t.waypoints, &Failures::new()).is_empty());
        let ready = &objects.gateways[&("a".to_owned(), "ready".to_owned())];
        let mut u = find(&updates, "ready").clone();
        u.conditions[1].message = "changed".into();
        let body = gateway_patch(&ready.data["status"], &u, "2030-01-01T00:00:00Z");
        assert_eq!(
            body["status"]["conditions"][1]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        u.conditions[1].status = "False";
        let body = gateway_patch(&ready.data["status"], &u, "2030-01-01T00:00:00Z");
        assert_eq!(
            body["status"]["conditions"][1]["lastTransitionTime"],
            "2030-01-01T00:00:00Z"
        );
    }
}
