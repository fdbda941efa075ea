//! AuthorizationPolicies attached with `targetRef(s)`: L7 policies enforced by waypoints
//! (`zmesh.waypoint.v1.WaypointPolicy`), as Istio ambient attaches them
//! (https://istio.io/latest/docs/ambient/usage/l7-features/ ,
//! https://istio.io/latest/docs/reference/config/security/authorization-policy/ ).
//!
//! # Attachment
//! - `Gateway` (group `gateway.networking.k8s.io`) naming a valid waypoint in the policy's
//!   namespace: every request through that waypoint.
//! - `GatewayClass` `istio-waypoint`, from a policy in the root namespace: every request through
//!   every waypoint.
//! - `Service` (group `""`/`core`) in the policy's namespace: requests to that Service through
//!   the waypoint it is bound to.
//! - Anything else (another kind, another namespace, a GatewayClass outside the root namespace
//!   or of another name, `ServiceEntry`, which zmesh does not read) is reported and not enforced.
//!
//! `selector` policies stay at ztunnel ([`super::authz`]). Behind a waypoint ztunnel sees the
//! waypoint's connection, so its identity is the waypoint's, not the client's: as Istio
//! documents, a selector policy on a waypoint-fronted workload must allow the waypoint's
//! identity, and policies about callers belong on the waypoint (targetRefs).
//!
//! # A target with no waypoint: enforced by ztunnel, never dropped
//! A policy on a Service that no waypoint serves is sent to ztunnel for the Service's pods (a
//! `WORKLOAD_SELECTOR` policy with the Service's selector), translated exactly as a `selector`
//! policy would be: a DENY keeps its L4 parts and so denies at least as much as written; an
//! ALLOW keeps only its L4-only rules and so allows at most what is written. Either way access
//! never widens because a waypoint is missing (Istio itself would silently not enforce it).
//! AUDIT has no L4 form. The status says which it was.
//!
//! # Values ([`validate`])
//! Every value is checked as the waypoint will check it. A rule with an invalid value is
//! resolved towards denying more: an ALLOW or AUDIT rule is left out (an ALLOW left with no rule
//! matches nothing, i.e. denies every request it applies to); a DENY rule is replaced by the
//! empty rule, which matches every request. `CUSTOM` is refused (zmesh has no external
//! authorizer): nothing is enforced and the status says so. Unknown fields at the top of the
//! spec: an ALLOW keeps no rules, a DENY is enforced without them.

use std::collections::BTreeMap;

use serde::Serialize;
use xds_proto::zmesh::waypoint::v1 as pb;

use super::authorization_policy::{Operation, Rule, Source};
use super::{AuthorizationPolicy, MeshConfig, Objects, Waypoints, service_hostname};

#[cfg(test)]
mod tests;
mod validate;

/// Where a targetRef policy is enforced, and what of it is not honoured (for its status).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Waypoints (`namespace/name`) that enforce it.
    pub waypoints: Vec<String>,
    /// ztunnel enforces it (a Service target with no waypoint).
    pub ztunnel: bool,
    /// What an operator should know, one message each.
    pub messages: Vec<String>,
}

/// The waypoint side of every targetRef policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaypointAuthz {
    /// Resources by name `<gateway ns>/<gateway>/<policy ns>/<policy>`.
    pub resources: BTreeMap<String, pb::WaypointPolicy>,
    /// Every targetRef policy, keyed (namespace, name).
    pub placements: BTreeMap<(String, String), Placement>,
    /// Policies ztunnel enforces in place of a missing waypoint: (namespace, name) -> the
    /// selectors of their Service targets (a pod matching any one is covered).
    pub ztunnel_fallback: Fallback,
}

/// (namespace, name) -> the `matchLabels` of the Services it targets that have no waypoint.
pub type Fallback = BTreeMap<(String, String), Vec<BTreeMap<String, String>>>;

/// Translates every targetRef policy. `bound`: the `BoundService`s by `<ns>/<hostname>`.
pub fn translate(
    objects: &Objects,
    mesh: &MeshConfig,
    waypoints: &Waypoints,
    bound: &BTreeMap<String, pb::BoundService>,
) -> WaypointAuthz {
    let mut out = WaypointAuthz::default();
    for ((ns, name), policy) in &objects.authorization_policies {
        let spec = &policy.spec;
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        if targets.is_empty() {
            continue;
        }
        let mut place = Placement::default();
        let action = match spec.action.as_deref() {
            None | Some("" | "ALLOW") => pb::PolicyAction::Allow,
            Some("DENY") => pb::PolicyAction::Deny,
            Some("AUDIT") => pb::PolicyAction::Audit,
            Some("CUSTOM") => {
                place.messages.push(
                    "action CUSTOM is not supported: zmesh has no external authorizer; the \
                     policy is not enforced anywhere"
                        .into(),
                );
                out.placements.insert((ns.clone(), name.clone()), place);
                continue;
            }
            Some(other) => {
                place.messages.push(format!(
                    "unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM); the \
                     policy is not enforced"
                ));
                out.placements.insert((ns.clone(), name.clone()), place);
                continue;
            }
        };
        // Which waypoints, for all or some Services.
        let mut at: BTreeMap<(String, String), (bool, Vec<String>)> = BTreeMap::new();
        let mut fallback = Vec::new();
        for t in targets {
            // The kind is the tenant's text until it is matched below: escaped and bounded.
            let kind = zmesh_core::peer_text::PeerText::new(&t.kind);
            let what = format!("targetRef {kind} {:?}", t.name);
            if t.namespace.as_deref().is_some_and(|n| n != ns) {
                place.messages.push(format!(
                    "{what}: a policy may only target objects of its own namespace; ignored"
                ));
                continue;
            }
            match (t.group.as_str(), t.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => {
                    let key = (ns.clone(), t.name.clone());
                    if waypoints.valid.contains_key(&key) {
                        at.entry(key).or_default().0 = true;
                    } else {
                        place.messages.push(format!(
                            "{what} is not a valid waypoint: no traffic goes through it; not \
                             enforced for it"
                        ));
                    }
                }
                ("gateway.networking.k8s.io", "GatewayClass") => {
                    if t.name != "istio-waypoint" || *ns != mesh.root_namespace {
                        place.messages.push(format!(
                            "{what}: only GatewayClass istio-waypoint, from a policy in the root \
                             namespace {:?}, applies to waypoints; ignored",
                            mesh.root_namespace
                        ));
                        continue;
                    }
                    for key in waypoints.valid.keys() {
                        at.entry(key.clone()).or_default().0 = true;
                    }
                }
                ("" | "core", "Service") => {
                    let host = service_hostname(&t.name, ns, mesh);
                    let key = format!("{ns}/{host}");
                    match bound.get(&key).and_then(|b| b.waypoint.as_ref()) {
                        Some(gw) => {
                            let e = at
                                .entry((gw.namespace.clone(), gw.name.clone()))
                                .or_default();
                            e.1.push(key);
                        }
                        None => {
                            let selector = objects
                                .services
                                .get(&(ns.clone(), t.name.clone()))
                                .and_then(|s| s.spec.as_ref()?.selector.clone())
                                .filter(|s| !s.is_empty());
                            match (selector, action) {
                                (_, pb::PolicyAction::Audit) => place.messages.push(format!(
                                    "{what} has no waypoint; AUDIT has no L4 form: not enforced"
                                )),
                                (Some(sel), _) => {
                                    fallback.push(sel);
                                    place.messages.push(format!(
                                        "{what} has no waypoint: enforced by ztunnel on its pods \
                                         as an L4 policy ({})",
                                        if action == pb::PolicyAction::Deny {
                                            "a DENY keeps its L4 parts: it denies at least as much"
                                        } else {
                                            "an ALLOW keeps its L4-only rules: it allows at most as much"
                                        }
                                    ));
                                }
                                (None, _) => place.messages.push(format!(
                                    "{what} has no waypoint and no pod selector (or does not \
                                     exist): nothing to enforce it on"
                                )),
                            }
                        }
                    }
                }
                (g, k) => place.messages.push(format!(
                    "targetRef kind {k:?} (group {g:?}) is not supported (Gateway, GatewayClass \
                     istio-waypoint, Service); ignored"
                )),
            }
        }
        if !fallback.is_empty() {
            place.ztunnel = true;
            out.ztunnel_fallback
                .insert((ns.clone(), name.clone()), fallback);
        }
        if !at.is_empty() {
            let (dry_run, rules) = wire_rules(ns, policy, action, &mut place.messages);
            for ((gw_ns, gw), (all, mut services)) in at {
                services.sort();
                services.dedup();
                place.waypoints.push(format!("{gw_ns}/{gw}"));
                out.resources.insert(
                    format!("{gw_ns}/{gw}/{ns}/{name}"),
                    pb::WaypointPolicy {
                        waypoint: Some(pb::GatewayRef {
                            namespace: gw_ns,
                            name: gw,
                        }),
                        namespace: ns.clone(),
                        name: name.clone(),
                        all_services: all,
                        services: if all { Vec::new() } else { services },
                        action: action as i32,
                        dry_run,
                        rules: rules.clone(),
                    },
                );
            }
        }
        out.placements.insert((ns.clone(), name.clone()), place);
    }
    out
}

/// The dry-run flag and the rules as the waypoint gets them (module docs: invalid rules).
fn wire_rules(
    ns: &str,
    policy: &AuthorizationPolicy,
    action: pb::PolicyAction,
    messages: &mut Vec<String>,
) -> (bool, Vec<pb::PolicyRule>) {
    let dry_run = match policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::DRY_RUN_ANNOTATION))
    {
        None => false,
        Some(v) => super::authz::parse_bool(v).unwrap_or_else(|| {
            messages.push(format!(
                "annotation {}: {v:?} is not a boolean; the policy is enforced (not dry-run)",
                super::DRY_RUN_ANNOTATION
            ));
            false
        }),
    };
    let spec = &policy.spec;
    if !spec.unknown.is_empty() {
        let fields: Vec<String> = spec.unknown.keys().map(|k| format!("spec.{k}")).collect();
        if action == pb::PolicyAction::Deny {
            messages.push(format!(
                "{} not fields of AuthorizationPolicy; this DENY is enforced without them",
                fields.join(", ")
            ));
        } else {
            messages.push(format!(
                "{} not fields of AuthorizationPolicy; the policy keeps no rules (an ALLOW then \
                 denies every request it applies to)",
                fields.join(", ")
            ));
            return (dry_run, Vec::new());
        }
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let problems = validate::rule(r);
        if problems.is_empty() {
            rules.push(wire_rule(ns, r));
            continue;
        }
        let at = |p: &String| format!("rules[{i}].{p}");
        let listed = problems.iter().map(at).collect::<Vec<_>>().join("; ");
        if action == pb::PolicyAction::Deny {
            messages.push(format!(
                "{listed}: this DENY rule is enforced as matching every request"
            ));
            rules.push(pb::PolicyRule::default());
        } else {
            messages.push(format!("{listed}: the rule is left out"));
        }
    }
    (dry_run, rules)
}

fn wire_rule(ns: &str, r: &Rule) -> pb::PolicyRule {
    pb::PolicyRule {
        from: r.from.iter().map(|f| wire_source(ns, &f.source)).collect(),
        to: r.to.iter().map(|t| wire_operation(&t.operation)).collect(),
        when: r
            .when
            .iter()
            .map(|c| pb::PolicyCondition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect(),
    }
}

/// `serviceAccounts` as `ns/sa` (a plain `sa` is the policy's namespace).
fn service_accounts(ns: &str, v: &[String]) -> Vec<String> {
    v.iter()
        .map(|sa| {
            if sa.contains('/') {
                sa.clone()
            } else {
                format!("{ns}/{sa}")
            }
        })
        .collect()
}

fn wire_source(ns: &str, s: &Source) -> pb::PolicySource {
    pb::PolicySource {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        request_principals: s.request_principals.clone(),
        not_request_principals: s.not_request_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        ip_blocks: s.ip_blocks.clone(),
        not_ip_blocks: s.not_ip_blocks.clone(),
        remote_ip_blocks: s.remote_ip_blocks.clone(),
        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
        service_accounts: service_accounts(ns, &s.service_accounts),
        not_service_accounts: service_accounts(ns, &s.not_service_accounts),
    }
}

fn wire_operation(o: &Operation) -> pb::PolicyOperation {
    pb::PolicyOperation {
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: o.paths.clone(),
        not_paths: o.not_paths.clone(),
    }
}
