//! AuthorizationPolicy status, as istiod reports it for ambient: a `ZtunnelAccepted` condition
//! on every policy meant for ztunnel (no `targetRef`):
//!
//! - `True` / `Accepted`: sent to ztunnel as written;
//! - `True` / `UnsupportedValue`: sent, but narrowed (L7 attributes, invalid values, unknown
//!   fields: the message lists each and says what ztunnel enforces instead);
//! - `False` / `UnsupportedValue`: not sent (AUDIT, CUSTOM, an unknown action): the message
//!   says so.
//!
//! and a `WaypointAccepted` condition on every targetRefs policy, whose message starts with
//! where it is enforced (`enforced at: waypoint (<ns>/<gateway>)`, `ztunnel (no waypoint)`,
//! `both (...)`, or `nowhere`, then status `False`) and lists what is not honoured (reason
//! `UnsupportedValue`), see `translate::waypoint_authz`.
//!
//! [`desired_updates`] compares what the translation says with the condition the object
//! already carries (as last seen by the watch) and returns only the policies whose condition
//! must change, so writing a status (which comes back as a watch event) never loops. The
//! [`StatusWriter`] patches them through the status subresource (Kubernetes source only; a
//! YAML directory is the user's, and is never written to: there the log says the same).
//!
//! Waypoint Gateways get their status the same way ([`gateway`]).

pub mod gateway;
pub mod route;

use std::collections::BTreeMap;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::translate::{AuthorizationPolicy, Objects, PolicyIssue, Translated};

/// The condition type istiod uses for ztunnel's view of a policy.
pub const CONDITION_TYPE: &str = "ZtunnelAccepted";
/// The condition type istiod uses for a waypoint (targetRefs) policy.
pub const WAYPOINT_CONDITION_TYPE: &str = "WaypointAccepted";

/// One policy's `ZtunnelAccepted` (or, for a targetRefs policy, `WaypointAccepted`)
/// condition (without its transition time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// [`CONDITION_TYPE`] or [`WAYPOINT_CONDITION_TYPE`].
    pub kind: &'static str,
    /// `"True"` or `"False"`.
    pub status: &'static str,
    /// `Accepted` or `UnsupportedValue`.
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: Option<i64>,
}

/// A status to write: the policy and its new condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub namespace: String,
    pub name: String,
    pub condition: Condition,
}

/// The condition the translation implies for every ztunnel policy.
pub fn conditions(
    objects: &Objects,
    translated: &Translated,
) -> BTreeMap<(String, String), Condition> {
    let mut issues: BTreeMap<(String, String), Vec<&PolicyIssue>> = BTreeMap::new();
    for issue in &translated.issues {
        issues
            .entry((issue.namespace.clone(), issue.name.clone()))
            .or_default()
            .push(issue);
    }
    let mut out = BTreeMap::new();
    for (key, policy) in &objects.authorization_policies {
        if policy.spec.target_ref.is_some() || !policy.spec.target_refs.is_empty() {
            if let Some(place) = translated.waypoint_authz.placements.get(key) {
                let l4 = issues.get(key).map(Vec::as_slice).unwrap_or_default();
                out.insert(key.clone(), waypoint_condition(policy, place, l4));
            }
            continue;
        }
        let sent = translated
            .authorizations
            .contains_key(&format!("{}/{}", key.0, key.1));
        let found = issues.get(key).map(Vec::as_slice).unwrap_or_default();
        let messages: Vec<&str> = found.iter().map(|i| i.message.as_str()).collect();
        let condition = match (sent, messages.is_empty()) {
            (true, true) => Condition {
                kind: CONDITION_TYPE,
                status: "True",
                reason: "Accepted",
                message: "attached to ztunnel".to_owned(),
                observed_generation: policy.metadata.generation,
            },
            (true, false) => Condition {
                kind: CONDITION_TYPE,
                status: "True",
                reason: "UnsupportedValue",
                message: format!("attached to ztunnel, narrowed: {}", messages.join("; ")),
                observed_generation: policy.metadata.generation,
            },
            (false, _) => Condition {
                kind: CONDITION_TYPE,
                status: "False",
                reason: "UnsupportedValue",
                message: if messages.is_empty() {
                    "not enforced by ztunnel".to_owned()
                } else {
                    format!("not enforced by ztunnel: {}", messages.join("; "))
                },
                observed_generation: policy.metadata.generation,
            },
        };
        out.insert(key.clone(), condition);
    }
    out
}

/// A targetRefs policy's `WaypointAccepted`: where it is enforced (`waypoint`, `ztunnel`,
/// `both`, or nowhere: status `False`) and what of it is not honoured.
fn waypoint_condition(
    policy: &AuthorizationPolicy,
    place: &crate::translate::waypoint_authz::Placement,
    l4: &[&PolicyIssue],
) -> Condition {
    let at = match (place.waypoints.is_empty(), place.ztunnel) {
        (false, false) => format!("enforced at: waypoint ({})", place.waypoints.join(", ")),
        (true, true) => "enforced at: ztunnel (no waypoint)".to_owned(),
        (false, true) => format!(
            "enforced at: both (waypoint {}; ztunnel for targets with no waypoint)",
            place.waypoints.join(", ")
        ),
        (true, false) => "enforced at: nowhere".to_owned(),
    };
    let notes: Vec<&str> = place
        .messages
        .iter()
        .map(String::as_str)
        .chain(l4.iter().map(|i| i.message.as_str()))
        .collect();
    let enforced = !place.waypoints.is_empty() || place.ztunnel;
    Condition {
        kind: WAYPOINT_CONDITION_TYPE,
        status: if enforced { "True" } else { "False" },
        reason: if notes.is_empty() {
            "Accepted"
        } else {
            "UnsupportedValue"
        },
        message: if notes.is_empty() {
            at
        } else {
            format!("{at}; {}", notes.join("; "))
        },
        observed_generation: policy.metadata.generation,
    }
}

/// The condition of type `kind` a policy object carries now, if any.
fn current<'a>(policy: &'a AuthorizationPolicy, kind: &str) -> Option<&'a Value> {
    policy.status.as_ref()?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn same(existing: &Value, want: &Condition) -> bool {
    existing["status"] == want.status
        && existing["reason"] == want.reason
        && existing["message"] == want.message.as_str()
        && existing["observedGeneration"].as_i64() == want.observed_generation
}

/// The updates needed so every ztunnel policy carries the condition the translation implies.
pub fn desired_updates(objects: &Objects, translated: &Translated) -> Vec<StatusUpdate> {
    conditions(objects, translated)
        .into_iter()
        .filter(|(key, want)| {
            let policy = &objects.authorization_policies[key];
            !current(policy, want.kind).is_some_and(|c| same(c, want))
        })
        .map(|((namespace, name), condition)| StatusUpdate {
            namespace,
            name,
            condition,
        })
        .collect()
}

/// The merge patch that sets `condition`, keeping the policy's other conditions and the
/// transition time when the status did not flip.
pub fn patch_body(existing: Option<&Value>, update: &StatusUpdate, now: &str) -> Value {
    let mut conditions: Vec<Value> = existing
        .and_then(|s| s["conditions"].as_array())
        .cloned()
        .unwrap_or_default();
    let c = &update.condition;
    let previous = conditions.iter().position(|e| e["type"] == c.kind);
    let condition = condition_json(
        &conditions,
        c.kind,
        c.status,
        c.reason,
        &c.message,
        c.observed_generation,
        now,
    );
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
    json!({"status": {"conditions": conditions}})
}

/// One condition as the API server stores it. Its `lastTransitionTime` is kept from the
/// condition of the same type in `previous` when that one has the same status, else `now`.
/// (AuthorizationPolicy, Gateway and route status all write conditions this way.)
pub(crate) fn condition_json(
    previous: &[Value],
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) -> Value {
    let transition = previous
        .iter()
        .find(|e| e["type"] == kind && e["status"] == status)
        .and_then(|e| e["lastTransitionTime"].as_str())
        .unwrap_or(now);
    let mut v = json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    });
    if let Some(g) = generation {
        v["observedGeneration"] = json!(g);
    }
    v
}

/// Writes policy statuses through the Kubernetes API, one patch per changed policy.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::UnboundedSender<(StatusUpdate, Option<Value>)>,
    gateways: mpsc::UnboundedSender<(gateway::GatewayUpdate, Value)>,
    routes: mpsc::UnboundedSender<(route::RouteUpdate, Value)>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter").finish_non_exhaustive()
    }
}

impl StatusWriter {
    /// Starts the writer task on `client`.
    pub fn spawn(client: kube::Client) -> StatusWriter {
        let (tx, mut rx) = mpsc::unbounded_channel::<(StatusUpdate, Option<Value>)>();
        let (gateways, gw_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_gateways(client.clone(), gw_rx));
        let (routes, route_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_routes(client.clone(), route_rx));
        tokio::spawn(async move {
            while let Some((update, existing)) = rx.recv().await {
                let api: Api<AuthorizationPolicy> =
                    Api::namespaced(client.clone(), &update.namespace);
                let now = now_rfc3339();
                let body = patch_body(existing.as_ref(), &update, &now);
                match api
                    .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                {
                    Ok(_) => debug!(policy = %format!("{}/{}", update.namespace, update.name),
                        reason = update.condition.reason, "policy status written"),
                    // The next pass retries: the object still shows the old condition.
                    Err(e) => warn!(policy = %format!("{}/{}", update.namespace, update.name),
                        error = %e, "writing the policy status failed"),
                }
            }
        });
        StatusWriter {
            tx,
            gateways,
            routes,
        }
    }

    /// Queues the mesh routes (HTTPRoute, GRPCRoute) whose status must change.
    pub fn write_routes(&self, objects: &Objects, routes: &crate::translate::Routes) {
        for update in route::desired_route_updates(objects, routes) {
            let map = match update.id.kind {
                crate::translate::RouteKind::Http => &objects.http_routes,
                crate::translate::RouteKind::Grpc => &objects.grpc_routes,
            };
            let existing = map
                .get(&(update.id.namespace.clone(), update.id.name.clone()))
                .map(|r| r.data["status"].clone())
                .unwrap_or_default();
            let _ = self.routes.send((update, existing));
        }
    }

    /// Queues the waypoint Gateways whose status must change (`failures`: the waypoints
    /// whose objects could not be applied, `crate::deploy`).
    pub fn write_gateways(
        &self,
        objects: &Objects,
        waypoints: &crate::translate::Waypoints,
        failures: &BTreeMap<(String, String), crate::deploy::DeployError>,
    ) {
        for update in gateway::desired_gateway_updates(objects, waypoints, failures) {
            let existing = objects
                .gateways
                .get(&(update.namespace.clone(), update.name.clone()))
                .map(|g| g.data["status"].clone())
                .unwrap_or_default();
            let _ = self.gateways.send((update, existing));
        }
    }

    /// Queues the updates (each with the policy's current status, to merge into).
    pub fn write(&self, objects: &Objects, updates: Vec<StatusUpdate>) {
        for update in updates {
            let existing = objects
                .authorization_policies
                .get(&(update.namespace.clone(), update.name.clone()))
                .and_then(|p| p.status.clone());
            let _ = self.tx.send((update, existing));
        }
    }
}

/// Patches each queued Gateway status through the status subresource.
async fn write_gateways(
    client: kube::Client,
    mut rx: mpsc::UnboundedReceiver<(gateway::GatewayUpdate, Value)>,
) {
    let gvk = kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
    let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, "gateways");
    while let Some((update, existing)) = rx.recv().await {
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &update.namespace, &resource);
        let body = gateway::gateway_patch(&existing, &update, &now_rfc3339());
        let name = format!("{}/{}", update.namespace, update.name);
        match api
            .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => debug!(gateway = %name, "waypoint Gateway status written"),
            // The next pass retries: the object still shows the old status.
            Err(e) => warn!(gateway = %name, error = %e, "writing the Gateway status failed"),
        }
    }
}

/// Patches each queued route status through the status subresource.
async fn write_routes(
    client: kube::Client,
    mut rx: mpsc::UnboundedReceiver<(route::RouteUpdate, Value)>,
) {
    while let Some((update, existing)) = rx.recv().await {
        let (kind, plural) = match update.id.kind {
            crate::translate::RouteKind::Http => ("HTTPRoute", "httproutes"),
            crate::translate::RouteKind::Grpc => ("GRPCRoute", "grpcroutes"),
        };
        let gvk = kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind);
        let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &update.id.namespace, &resource);
        let body = route::route_patch(&existing, &update, &now_rfc3339());
        match api
            .patch_status(
                &update.id.name,
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
        {
            Ok(_) => debug!(route = %update.id, "route status written"),
            // The next pass retries: the object still shows the old status.
            Err(e) => warn!(route = %update.id, error = %e, "writing the route status failed"),
        }
    }
}

/// Now as RFC 3339 (UTC, seconds), as Kubernetes writes times.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::{MeshConfig, translate};

    const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: a, generation: 3}
spec: {action: DENY, rules: [{to: [{operation: {ports: ['22']}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: a, generation: 1}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: a}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: a}
spec: {targetRefs: [{kind: Service, group: '', name: s}], rules: [{}]}
";

    #[test]
    fn conditions_follow_the_translation() {
        let objects = Objects::from_yaml(POLICIES).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let c = conditions(&objects, &t);
        let k = |n: &str| ("a".to_owned(), n.to_owned());
        assert_eq!(c[&k("ok")].reason, "Accepted");
        assert_eq!(c[&k("ok")].observed_generation, Some(3));
        assert_eq!(
            (c[&k("l7")].status, c[&k("l7")].reason),
            ("True", "UnsupportedValue")
        );
        assert!(
            c[&k("l7")].message.contains("methods"),
            "{}",
            c[&k("l7")].message
        );
        assert_eq!(
            (c[&k("audit")].status, c[&k("audit")].reason),
            ("False", "UnsupportedValue")
        );
        assert!(
            c[&k("audit")].message.contains("AUDIT"),
            "{}",
            c[&k("audit")].message
        );
        // A targetRefs policy gets `WaypointAccepted`; Service `s` does not exist.
        let w = &c[&k("waypoint")];
        assert_eq!((w.kind, w.status), ("WaypointAccepted", "False"));
        assert!(
            w.message.starts_with("enforced at: nowhere")
                && w.message.contains("targetRef Service \"s\""),
            "{}",
            w.message
        );
        assert_eq!(c[&k("ok")].kind, "ZtunnelAccepted");
    }

    #[test]
    fn only_changed_conditions_are_written_and_transition_time_is_kept() {
        let mut objects = Objects::from_yaml(POLICIES).unwrap();
        let t = translate(&objects, &MeshConfig::default());
        let updates = desired_updates(&objects, &t);
        assert_eq!(updates.len(), 4);
        // Apply the patches as the API server would, then nothing is left to write.
        for u in &updates {
            let p = objects
                .authorization_policies
                .get_mut(&(u.namespace.clone(), u.name.clone()))
                .unwrap();
            let body = patch_body(p.status.as_ref(), u, "2026-01-01T00:00:00Z");
            p.status = Some(body["status"].clone());
        }
        assert!(desired_updates(&objects, &t).is_empty());
        // Same status, new message: the transition time stays.
        let ok = &objects.authorization_policies[&("a".to_owned(), "ok".to_owned())];
        let mut u = updates.iter().find(|u| u.name == "ok").unwrap().clone();
        u.condition.message = "changed".into();
        let body = patch_body(ok.status.as_ref(), &u, "2030-01-01T00:00:00Z");
        assert_eq!(
            body["status"]["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        // A flip updates it.
        u.condition.status = "False";
        let body = patch_body(ok.status.as_ref(), &u, "2030-01-01T00:00:00Z");
        assert_eq!(
            body["status"]["conditions"][0]["lastTransitionTime"],
            "2030-01-01T00:00:00Z"
        );
    }
}
