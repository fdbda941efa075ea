//! Gateway API routes in the mesh (GAMMA, GEP-1426): HTTPRoutes and GRPCRoutes whose
//! `parentRefs` name a Service, turned into the ordered route table the Service's waypoint
//! applies, plus the status each route should carry.
//!
//! Rules (<https://gateway-api.sigs.k8s.io/mesh/> and the HTTPRoute/GRPCRoute reference):
//! - a parentRef with `group: ""` (or `core`) and `kind: Service` attaches the route to that
//!   Service (namespace: the parentRef's, else the route's), to one port when `port` is set,
//!   else to all of them (`kind: Service` with another group is not accepted: the message
//!   says to write `group: ""`). Other parentRefs (Gateways) are not ours and get no status;
//! - a route in the Service's namespace is a *producer* route (every client); one in another
//!   namespace is a *consumer* route: it applies only to clients in the route's namespace,
//!   and for them it replaces the producer routes (GEP-1426; the waypoint applies only the
//!   consumer rules when one exists for the caller's namespace);
//! - only a Service bound to a valid waypoint gets routes (they are served to that waypoint
//!   alone); a route on any other Service is not accepted for it (`NoMatchingParent`, the
//!   message names the missing `istio.io/use-waypoint` binding);
//! - a route zmesh cannot apply as written (unknown field, bad regular expression,
//!   unsupported filter, malformed duration) is refused whole: `Accepted=False`
//!   (`UnsupportedValue`) on every Service parent, a log line, nothing served;
//! - backendRefs name Services (`group: ""`, `kind: Service`, with a port); another kind is
//!   `InvalidKind`, a missing Service or port `BackendNotFound`, a Service in another
//!   namespace without a ReferenceGrant there `RefNotPermitted` — except the route's own
//!   parent Service: GEP-1426 ("Namespace boundaries") needs no ReferenceGrant for mesh routes
//!   that reach no broader scope, and a route sending to its parent Service sends clients
//!   where they were going anyway, while another Service could be reached through the
//!   waypoint's identity by clients its policy refuses. Such a backend stays in the
//!   table as unresolved, so its share of the traffic gets a 500 (the spec's rule), and the
//!   route's `ResolvedRefs` is `False` with that reason;
//! - precedence (HTTPRoute): Exact path, then the longest PathPrefix, then RegularExpression
//!   (implementation-specific; Istio's order), then a method match, then more header matches,
//!   then more query param matches; ties go to the oldest route (`creationTimestamp`), then
//!   `namespace/name` alphabetically, then rule order, then match order. GRPCRoute: more
//!   characters in the service, then in the method, then more header matches, then the same
//!   tie-breakers. Hostnames do not take part: in a mesh the Service is the frontend;
//! - `spec.hostnames` is ignored on a Service parent (GEP-1426 "`hostnames` field": GAMMA
//!   implementations "SHOULD NOT infer any functionality from the `hostnames` field"); the
//!   `Accepted` message says so when a route has some (a Host header match does the job);
//! - route types on one Service port (GEP-1426 "Route types"): a GRPCRoute takes precedence
//!   over an HTTPRoute of the same group (producer, or one namespace's consumer routes) on
//!   the same Service port. The HTTPRoute is not applied there: `Accepted=False`
//!   (`Conflicted`) when that leaves it no port, else applied on its other ports with the
//!   message naming the ports it lost. Never both on one port;
//! - `allowedRoutes` and `NotAllowedByListeners` do not apply: they are Listener fields and
//!   reasons (HTTPRoute/GRPCRoute reference, `Hostnames`; Gateway `allowedRoutes`), and a
//!   Service parent has no listener. Who may attach to a Service is GEP-1426's namespace rule
//!   above (a route elsewhere only ever affects its own namespace's clients). A parentRef to
//!   a waypoint Gateway (GEP-1426 allows a Gateway as a mesh parent, "if an implementation
//!   wishes to do so"; zmesh does not): its one listener is HBONE and allows no route kinds,
//!   so that parent gets `Accepted=False` with `NotAllowedByListeners` (the Gateway API reason
//!   for a Gateway with no listener whose `allowedRoutes` permit the route) and what to write
//!   instead. Parents naming other Gateways are not ours and get no status.

mod compile;
mod model;
pub mod spec;
mod wire;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::DynamicObject;
use xds_proto::zmesh::waypoint::v1::BoundService;

pub use compile::duration;
pub use model::*;
use spec::{BackendObjectRef, GrpcRouteSpec, HttpBackendRef, HttpRouteSpec, ParentRef};
pub use wire::service_routes;

use super::waypoint::WAYPOINT_CLASS;
use super::{Age, MeshConfig, Objects, namespace_of, service_hostname};

/// A rule compiled, with the (OR-ed) matches that lead to it.
struct CompiledRule {
    matches: Vec<Match>,
    rule: Arc<Rule>,
}

/// One route read: its rules, or why it is refused; and its first unresolved reference.
struct Compiled {
    rules: Result<Vec<CompiledRule>, String>,
    unresolved: Option<Unresolved>,
}

/// Translates every HTTPRoute and GRPCRoute in `objects` against the Services bound to a
/// waypoint (`bound`, keyed `<namespace>/<hostname>`).
pub fn translate_routes(
    objects: &Objects,
    bound: &BTreeMap<String, BoundService>,
    mesh: &MeshConfig,
) -> Routes {
    let mut out = Routes::default();
    let mut order: BTreeMap<String, Vec<(SortKey, Entry)>> = BTreeMap::new();
    // GRPCRoutes first: on a Service port they take, HTTPRoutes of the same group conflict.
    let mut grpc_ports = GrpcPorts::new();
    let all = objects
        .grpc_routes
        .values()
        .map(|r| (RouteKind::Grpc, r))
        .chain(objects.http_routes.values().map(|r| (RouteKind::Http, r)));
    for (kind, route) in all {
        let Some(name) = route.metadata.name.clone() else {
            continue;
        };
        let id = RouteId {
            kind,
            namespace: namespace_of(&route.metadata).to_owned(),
            name,
        };
        let parents = service_parents(route);
        let waypoints = waypoint_parents(route, &id.namespace, objects);
        if parents.is_empty() && waypoints.is_empty() {
            continue; // a route for other Gateways only: not ours
        }
        let compiled = compile(&id, route, objects, mesh);
        if let Err(why) = &compiled.rules {
            out.refused.insert(id.clone(), why.clone());
        }
        let resolved_refs = match &compiled.unresolved {
            None => condition(true, "ResolvedRefs", "every reference resolved".to_owned()),
            Some(u) => condition(false, u.reason, u.message.clone()),
        };
        let mut statuses = Vec::new();
        for parent in parents {
            let accepted = attach(
                &id,
                route,
                &parent,
                &compiled,
                bound,
                mesh,
                &mut order,
                &mut grpc_ports,
            );
            statuses.push(ParentStatus {
                parent,
                accepted,
                resolved_refs: resolved_refs.clone(),
            });
        }
        for parent in waypoints {
            let ns = parent.namespace.as_deref().unwrap_or(&id.namespace);
            let accepted = condition(
                false,
                "NotAllowedByListeners",
                format!(
                    "Gateway {ns}/{} is a waypoint: its one listener (HBONE) allows no route \
                     kinds; attach the route to the Services it is for (parentRef group: \"\", \
                     kind: Service), GEP-1426",
                    parent.name
                ),
            );
            statuses.push(ParentStatus {
                parent,
                accepted,
                resolved_refs: resolved_refs.clone(),
            });
        }
        out.statuses.insert(
            id,
            RouteStatus {
                generation: route.metadata.generation,
                parents: statuses,
            },
        );
    }
    for (key, mut entries) in order {
        let Some(svc) = bound.get(&key) else {
            continue;
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let (grpc, http): (Vec<Entry>, Vec<Entry>) = entries
            .into_iter()
            .map(|(_, e)| e)
            .partition(|e| e.route.kind == RouteKind::Grpc);
        let waypoint = svc.waypoint.clone().unwrap_or_default();
        out.services.insert(
            key,
            ServiceRoutes {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                hostname: svc.hostname.clone(),
                waypoint: (waypoint.namespace, waypoint.name),
                http,
                grpc,
            },
        );
    }
    out
}

fn condition(status: bool, reason: &'static str, message: String) -> RouteCondition {
    RouteCondition {
        status,
        reason,
        message,
    }
}

/// The parentRefs of kind Service, read one by one from the raw object (so a route whose
/// spec is refused still gets a status on each of its Service parents). One with a group
/// other than core is reported, not attached (see [`attach`]).
fn service_parents(route: &DynamicObject) -> Vec<ParentRef> {
    route.data["spec"]["parentRefs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| serde_json::from_value::<ParentRef>(p.clone()).ok())
        .filter(|p| p.kind.as_deref() == Some("Service"))
        .collect()
}

/// The parentRefs naming a waypoint Gateway (class `istio-waypoint`, group
/// `gateway.networking.k8s.io`, the default, and kind `Gateway`, the default). Routes do not
/// attach to it (see the module doc), and the parent says so rather than nothing.
fn waypoint_parents(route: &DynamicObject, route_ns: &str, objects: &Objects) -> Vec<ParentRef> {
    route.data["spec"]["parentRefs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| serde_json::from_value::<ParentRef>(p.clone()).ok())
        .filter(|p| {
            matches!(p.kind.as_deref(), None | Some("Gateway"))
                && matches!(p.group.as_deref(), None | Some("gateway.networking.k8s.io"))
        })
        .filter(|p| {
            let ns = p.namespace.as_deref().unwrap_or(route_ns);
            objects
                .gateways
                .get(&(ns.to_owned(), p.name.clone()))
                .is_some_and(|g| g.data["spec"]["gatewayClassName"] == WAYPOINT_CLASS)
        })
        .collect()
}

/// The Service ports GRPCRoutes took, per Service table key and route group (`None`: the
/// producer routes; `Some(ns)`: the consumer routes of `ns`), each with the first GRPCRoute
/// that took it.
type GrpcPorts = BTreeMap<(String, Option<String>), BTreeMap<u16, RouteId>>;

/// Decides one Service parent, adding the route's entries to that Service's table when
/// accepted.
#[allow(clippy::too_many_arguments)]
fn attach(
    id: &RouteId,
    route: &DynamicObject,
    parent: &ParentRef,
    compiled: &Compiled,
    bound: &BTreeMap<String, BoundService>,
    mesh: &MeshConfig,
    order: &mut BTreeMap<String, Vec<(SortKey, Entry)>>,
    grpc_ports: &mut GrpcPorts,
) -> RouteCondition {
    let svc_ns = parent
        .namespace
        .clone()
        .unwrap_or_else(|| id.namespace.clone());
    let svc_name = format!("{svc_ns}/{}", parent.name);
    if !matches!(parent.group.as_deref(), Some("" | "core")) {
        return condition(
            false,
            "UnsupportedValue",
            format!(
                "parentRef kind Service needs `group: \"\"` (the core group); it has {:?} \
                 (Gateway API's default is gateway.networking.k8s.io)",
                parent.group.as_deref().unwrap_or("")
            ),
        );
    }
    let rules = match &compiled.rules {
        Ok(rules) => rules,
        Err(why) => return condition(false, "UnsupportedValue", format!("refused: {why}")),
    };
    if parent.section_name.is_some() {
        return condition(
            false,
            "UnsupportedValue",
            "sectionName has no meaning for a Service parent; use `port` to pick a port".into(),
        );
    }
    let key = format!("{svc_ns}/{}", service_hostname(&parent.name, &svc_ns, mesh));
    let Some(svc) = bound.get(&key) else {
        return condition(
            false,
            "NoMatchingParent",
            format!(
                "Service {svc_name} does not exist or is not bound to a waypoint (label \
                 istio.io/use-waypoint on it or its namespace); only a waypoint applies routes"
            ),
        );
    };
    let port = match parent.port {
        None => None,
        Some(p) => match u32::try_from(p)
            .ok()
            .filter(|p| svc.ports.iter().any(|sp| sp.port == *p))
        {
            Some(p) => Some(p as u16),
            None => {
                return condition(
                    false,
                    "NoMatchingParent",
                    format!("Service {svc_name} has no port {p}"),
                );
            }
        },
    };
    let consumer_namespace = (id.namespace != svc_ns).then(|| id.namespace.clone());
    // Route types on one Service port (GEP-1426 "Route types": "If multiple routes with
    // different types both bind to the same Service and Port pair, only a single route type
    // should be applied. The rejected routes should be ignored and have the
    // `RouteConditionAccepted` status set to the (new) reason `RouteReasonConflicted`", with
    // GRPCRoute first in the order of specificity). The GRPCRoute reference's listener rule
    // (oldest route wins on intersecting hostnames) is for Gateway listeners: a Service parent
    // has none, and in a mesh hostnames are not used (see `ignored_hostnames`). Conflicts are
    // within one group of routes (producer, or one namespace's consumer routes: GEP-1426
    // "Multiple routes for a Service", merging happens only within a group).
    let svc_ports: Vec<u16> = match port {
        Some(p) => vec![p],
        None => svc
            .ports
            .iter()
            .filter_map(|p| u16::try_from(p.port).ok())
            .collect(),
    };
    let taken = grpc_ports
        .entry((key.clone(), consumer_namespace.clone()))
        .or_default();
    let mut conflicted = Vec::new();
    let ports: Vec<Option<u16>> = match id.kind {
        RouteKind::Grpc => {
            for p in &svc_ports {
                taken.entry(*p).or_insert_with(|| id.clone());
            }
            vec![port]
        }
        RouteKind::Http => {
            let (lost, kept): (Vec<u16>, Vec<u16>) =
                svc_ports.iter().partition(|p| taken.contains_key(p));
            conflicted = lost
                .iter()
                .map(|p| format!("port {p} ({})", taken[p]))
                .collect();
            if kept.is_empty() {
                return condition(
                    false,
                    "Conflicted",
                    format!(
                        "a GRPCRoute takes precedence over an HTTPRoute on the same Service                          port (GEP-1426): Service {svc_name} {}; this route is not applied",
                        conflicted.join(", ")
                    ),
                );
            }
            if conflicted.is_empty() {
                vec![port]
            } else {
                kept.into_iter().map(Some).collect()
            }
        }
    };
    let created = Age::of(&route.metadata);
    let list = order.entry(key).or_default();
    for port in ports {
        attach_rules(id, rules, port, &consumer_namespace, &created, list);
    }
    let kind = if consumer_namespace.is_some() {
        "consumer"
    } else {
        "producer"
    };
    let not_on = if conflicted.is_empty() {
        String::new()
    } else {
        format!(
            "; not on {}: a GRPCRoute takes precedence there (GEP-1426)",
            conflicted.join(", ")
        )
    };
    // GEP-1426 "`hostnames` field": "GAMMA implementations SHOULD NOT infer any
    // functionality from the `hostnames` field on `xRoute`s"; the status says so.
    let hostnames = if route.data["spec"]["hostnames"]
        .as_array()
        .is_some_and(|h| !h.is_empty())
    {
        "; spec.hostnames is ignored for a Service parent (GEP-1426: match the Host header          with a header match instead)"
    } else {
        ""
    };
    condition(
        true,
        "Accepted",
        format!(
            "{kind} route on Service {svc_name}, applied by waypoint {}/{}{not_on}{hostnames}",
            svc.waypoint.as_ref().map_or("", |w| w.namespace.as_str()),
            svc.waypoint.as_ref().map_or("", |w| w.name.as_str()),
        ),
    )
}

/// Adds the entries of `rules` (one per match) on `port` (`None`: every port).
fn attach_rules(
    id: &RouteId,
    rules: &[CompiledRule],
    port: Option<u16>,
    consumer_namespace: &Option<String>,
    created: &Age,
    list: &mut Vec<(SortKey, Entry)>,
) {
    for (rule_index, rule) in rules.iter().enumerate() {
        for (match_index, matched) in rule.matches.iter().enumerate() {
            let key = SortKey {
                producer: consumer_namespace.is_none(),
                specificity: specificity(matched),
                created: created.clone(),
                route: (id.namespace.clone(), id.name.clone()),
                rule: rule_index,
                matched: match_index,
            };
            list.push((
                key,
                Entry {
                    route: id.clone(),
                    rule_index,
                    match_index,
                    port,
                    consumer_namespace: consumer_namespace.clone(),
                    matched: matched.clone(),
                    rule: rule.rule.clone(),
                },
            ));
        }
    }
}

/// Sort key of an entry: smaller comes first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    /// Consumer routes (false) before producer routes (true).
    producer: bool,
    specificity: Specificity,
    created: Age,
    route: (String, String),
    rule: usize,
    matched: usize,
}

/// The spec's precedence criteria, ordered so that the more specific match is smaller.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    Http {
        path_kind: PathKind,
        path_len: Reverse<usize>,
        method: Reverse<bool>,
        headers: Reverse<usize>,
        query: Reverse<usize>,
    },
    Grpc {
        service_len: Reverse<usize>,
        method_len: Reverse<usize>,
        headers: Reverse<usize>,
    },
}

fn specificity(m: &Match) -> Specificity {
    match m {
        Match::Http {
            path_kind,
            path,
            headers,
            query,
            method,
        } => Specificity::Http {
            path_kind: *path_kind,
            path_len: Reverse(path.len()),
            method: Reverse(method.is_some()),
            headers: Reverse(headers.len()),
            query: Reverse(query.len()),
        },
        Match::Grpc { method, headers } => {
            let len = |s: Option<&String>| s.map_or(0, String::len);
            Specificity::Grpc {
                service_len: Reverse(len(method.as_ref().and_then(|m| m.service.as_ref()))),
                method_len: Reverse(len(method.as_ref().and_then(|m| m.method.as_ref()))),
                headers: Reverse(headers.len()),
            }
        }
    }
}

/// Reads and checks one route; backends are resolved (unresolved ones kept, see the module
/// docs).
fn compile(id: &RouteId, route: &DynamicObject, objects: &Objects, mesh: &MeshConfig) -> Compiled {
    let mut unresolved = None;
    let refs = Refs {
        id,
        objects,
        mesh,
        frontends: service_parents(route)
            .into_iter()
            .filter(|p| matches!(p.group.as_deref(), Some("" | "core")))
            .map(|p| (p.namespace.unwrap_or_else(|| id.namespace.clone()), p.name))
            .collect(),
    };
    let rules = match id.kind {
        RouteKind::Http => serde_json::from_value::<HttpRouteSpec>(route.data["spec"].clone())
            .map_err(|e| format!("spec: {e}"))
            .and_then(|spec| {
                spec.rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let at = format!("rules[{i}]");
                        let matches = compile::http_matches(&at, r.matches.as_deref())?;
                        let (request_timeout, backend_timeout) =
                            compile::timeouts(&at, r.timeouts.as_ref())?;
                        let retry = compile::retry(&at, r.retry.as_ref())?;
                        let rule = rule(
                            &refs,
                            i,
                            r.name.as_deref(),
                            &at,
                            &r.filters,
                            &r.backend_refs,
                            &mut unresolved,
                        )?;
                        check_prefix_rewrite(&at, &matches, &rule)?;
                        Ok(CompiledRule {
                            matches,
                            rule: Arc::new(Rule {
                                request_timeout,
                                backend_timeout,
                                retry,
                                ..rule
                            }),
                        })
                    })
                    .collect()
            }),
        RouteKind::Grpc => serde_json::from_value::<GrpcRouteSpec>(route.data["spec"].clone())
            .map_err(|e| format!("spec: {e}"))
            .and_then(|spec| {
                spec.rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let at = format!("rules[{i}]");
                        let matches = compile::grpc_matches(&at, &r.matches)?;
                        let rule = rule(
                            &refs,
                            i,
                            r.name.as_deref(),
                            &at,
                            &r.filters,
                            &r.backend_refs,
                            &mut unresolved,
                        )?;
                        Ok(CompiledRule {
                            matches,
                            rule: Arc::new(rule),
                        })
                    })
                    .collect()
            }),
    };
    Compiled { rules, unresolved }
}

/// `ReplacePrefixMatch` replaces what a PathPrefix match matched: every match of the rule
/// must be a PathPrefix one (Gateway API `HTTPPathModifier`).
fn check_prefix_rewrite(at: &str, matches: &[Match], rule: &Rule) -> Result<(), String> {
    let filters = rule
        .filters
        .iter()
        .chain(rule.backends.iter().flat_map(|b| &b.filters));
    let prefix_rewrite = filters.into_iter().any(|f| {
        matches!(
            f,
            Filter::Redirect {
                path: Some(PathRewrite::Prefix(_)),
                ..
            } | Filter::Rewrite {
                path: Some(PathRewrite::Prefix(_)),
                ..
            }
        )
    });
    let all_prefix = matches.iter().all(|m| {
        matches!(
            m,
            Match::Http {
                path_kind: PathKind::Prefix,
                ..
            }
        )
    });
    if prefix_rewrite && !all_prefix {
        return Err(format!(
            "{at}: a ReplacePrefixMatch path modifier needs every match of the rule to be a \
             PathPrefix match"
        ));
    }
    Ok(())
}

/// What resolving route `id`'s backendRefs needs: the objects, the mesh, and the route's
/// own parent Services (namespace, name), which it may name as backends without a grant.
struct Refs<'a> {
    id: &'a RouteId,
    objects: &'a Objects,
    mesh: &'a MeshConfig,
    frontends: Vec<(String, String)>,
}

fn rule(
    refs: &Refs<'_>,
    index: usize,
    name: Option<&str>,
    at: &str,
    filters: &[spec::HttpFilter],
    backend_refs: &[HttpBackendRef],
    unresolved: &mut Option<Unresolved>,
) -> Result<Rule, String> {
    let id = refs.id;
    let mut filters = compile::filters(at, id.kind, filters)?;
    resolve_mirrors(refs, &mut filters, unresolved);
    let mut backends = Vec::new();
    for (j, b) in backend_refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{j}]");
        let weight = match b.weight {
            None => 1,
            Some(w) => u32::try_from(w).map_err(|_| format!("{at}.weight {w} is negative"))?,
        };
        let mut bfilters = compile::filters(&at, id.kind, &b.filters)?;
        if bfilters
            .iter()
            .any(|f| matches!(f, Filter::Redirect { .. }))
        {
            return Err(format!(
                "{at}.filters: RequestRedirect is not allowed on a backendRef"
            ));
        }
        resolve_mirrors(refs, &mut bfilters, unresolved);
        let object_ref = BackendObjectRef {
            group: b.group.clone(),
            kind: b.kind.clone(),
            name: b.name.clone(),
            namespace: b.namespace.clone(),
            port: b.port,
        };
        let target = resolve_backend(refs, &object_ref);
        if let Err(u) = &target
            && unresolved.is_none()
        {
            *unresolved = Some(u.clone());
        }
        backends.push(Backend {
            weight,
            target,
            filters: bfilters,
        });
    }
    let rule_id = match name {
        Some(n) => format!("{}/{}/{}/{n}", id.kind.as_str(), id.namespace, id.name),
        None => format!("{}/{}/{}/{index}", id.kind.as_str(), id.namespace, id.name),
    };
    Ok(Rule {
        id: rule_id,
        name: name.map(str::to_owned),
        filters,
        backends,
        request_timeout: None,
        backend_timeout: None,
        retry: None,
    })
}

fn resolve_mirrors(refs: &Refs<'_>, filters: &mut [Filter], unresolved: &mut Option<Unresolved>) {
    for f in filters {
        if let Filter::Mirror {
            backend, target, ..
        } = f
        {
            match resolve_backend(refs, backend) {
                Ok(t) => *target = Some(t),
                Err(u) => {
                    if unresolved.is_none() {
                        *unresolved = Some(u);
                    }
                }
            }
        }
    }
}

/// Resolves a backend reference of route `refs.id` to a Service port.
fn resolve_backend(refs: &Refs<'_>, r: &BackendObjectRef) -> Result<ServiceTarget, Unresolved> {
    let (id, objects, mesh) = (refs.id, refs.objects, refs.mesh);
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err(Unresolved {
            reason: "InvalidKind",
            message: format!(
                "backendRef {:?} has group {group:?} kind {kind:?}; zmesh routes only to \
                 Services (group \"\", kind Service)",
                r.name
            ),
        });
    }
    let namespace = r.namespace.clone().unwrap_or_else(|| id.namespace.clone());
    let full = format!("{namespace}/{}", r.name);
    let own_parent = refs
        .frontends
        .iter()
        .any(|(ns, name)| *ns == namespace && *name == r.name);
    if namespace != id.namespace && !own_parent && !granted(objects, id, &namespace, &r.name) {
        return Err(Unresolved {
            reason: "RefNotPermitted",
            message: format!(
                "backendRef Service {full} is in another namespace and no ReferenceGrant in \
                 {namespace:?} allows {} from {:?} to reference it",
                id.kind.as_str(),
                id.namespace
            ),
        });
    }
    let Some(svc) = objects.services.get(&(namespace.clone(), r.name.clone())) else {
        return Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("backendRef Service {full} does not exist"),
        });
    };
    let Some(port) = r.port else {
        return Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("backendRef Service {full} needs a `port`"),
        });
    };
    let has_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ports| ports.iter().any(|p| p.port == port));
    if !has_port {
        return Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("backendRef Service {full} has no port {port}"),
        });
    }
    Ok(ServiceTarget {
        hostname: service_hostname(&r.name, &namespace, mesh),
        namespace,
        name: r.name.clone(),
        port: port as u16,
    })
}

/// Does a ReferenceGrant in `namespace` let route `id` reference Service `name` there?
/// A grant whose spec does not parse grants nothing.
fn granted(objects: &Objects, id: &RouteId, namespace: &str, name: &str) -> bool {
    objects
        .reference_grants
        .range((namespace.to_owned(), String::new())..)
        .take_while(|((ns, _), _)| ns == namespace)
        .filter_map(|(_, g)| {
            serde_json::from_value::<spec::ReferenceGrantSpec>(g.data["spec"].clone()).ok()
        })
        .any(|g| {
            g.from.iter().any(|f| {
                f.group == "gateway.networking.k8s.io"
                    && f.kind == id.kind.as_str()
                    && f.namespace == id.namespace
            }) && g.to.iter().any(|t| {
                matches!(t.group.as_str(), "" | "core")
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == name)
            })
        })
}
