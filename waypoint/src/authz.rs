//! L7 authorization at the waypoint: Istio's AuthorizationPolicy as a waypoint enforces it
//! (https://istio.io/latest/docs/reference/config/security/authorization-policy/ ,
//! https://istio.io/latest/docs/ambient/usage/l7-features/ ), from the controller's
//! `zmesh.waypoint.v1.WaypointPolicy` resources.
//!
//! # Which policies apply
//! A policy attached to the waypoint (targetRef Gateway or GatewayClass) applies to every
//! request through it; one attached to a Service, to requests to that Service.
//!
//! # Decision (Istio's order: CUSTOM is refused by the controller, then DENY, then ALLOW)
//! - Dry-run policies never decide; their would-be outcome is logged.
//! - AUDIT policies never decide; a match is logged.
//! - Any matching DENY denies. Else, when ALLOW policies apply, a matching one allows and none
//!   matching denies; with no ALLOW policy the request is allowed.
//! - A denied request is answered `403` with body `RBAC: access denied` (Envoy's RBAC filter's
//!   answer), recorded with response flag `RBAC` (Envoy's `RbacAccessDenied`) and the deciding
//!   policy (`<namespace>/<name>` and the rule index) in the access log.
//!
//! # Matching
//! A policy matches when any of its rules does (no rules: never). A rule matches when
//! `from` is empty or one of its sources matches, `to` is empty or one of its operations
//! matches, and every `when` condition holds. A source or operation matches when each field
//! set matches (values OR-ed) and no value of its `not*` twin matches. An attribute the request
//! does not have (no peer identity, no JWT) matches no value: a positive field fails, a
//! negative one excludes nothing (as Istio and ztunnel do).
//!
//! Attributes: principals and namespaces from the HBONE peer's SPIFFE id (the client
//! workload's, `<td>/ns/<ns>/sa/<sa>`, `spiffe://` ignored in policies); `ipBlocks` the
//! client's address (the CONNECT's `forwarded`); `remoteIpBlocks` the same address
//! (X-Forwarded-For is not trusted, as with Istio's default `numTrustedProxies: 0`);
//! `requestPrincipals` the validated JWT's `<iss>/<sub>` ([`RequestAuth`]); `hosts` the
//! `:authority`/Host case-insensitively and as sent (a port in it is part of the value, so
//! Istio's advice applies: list `host` and `host:*`); `ports` the Service port; `methods`
//! as sent; `paths` the path after Istio's default `BASE` normalization, without the query
//! ([`matcher::normalize_path`]), with Istio's `{*}`/`{**}` templates. The normalized path is
//! also what routes match and what is sent upstream, whether or not a policy applies, as in
//! Istio (its `pathNormalization` applies to every request); `hosts`, `request.headers[host]`
//! and the upstream request see the same authority until a route's URLRewrite changes what
//! goes upstream (`crate::http`: the target's or the one `Host`, a `host[:port]`, else 400).
//!
//! # Opaque TCP through the waypoint
//! A connection the waypoint does not see as HTTP (a port declared TCP, or sniffed as not
//! HTTP) is decided once, when it arrives, by [`Policies::evaluate_tcp`], as Istio's network
//! RBAC filter decides it: a rule with an HTTP-only part (`requestPrincipals`, `hosts`,
//! `methods`, `paths` and their `not*`, a `when` on `request.*`) never matches in an ALLOW or
//! AUDIT (it cannot be checked, so it allows nothing) and matches on its other parts in a DENY
//! (so it denies at least as much). A denied connection is refused.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_core::identity::SpiffeId;
use zmesh_core::policy::{IpNet, StringMatch};

use crate::authn::RequestAuth;

pub mod condition;
pub mod local;
pub mod matcher;
mod stage;
#[cfg(test)]
mod tests;

pub use condition::Condition;
pub use matcher::PathMatch;
pub use stage::{FORBIDDEN_BODY, check_tcp, stage};

/// Why a `WaypointPolicy` was refused (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
#[error("WaypointPolicy {resource}: {field}: {reason}")]
pub struct AuthzError {
    /// The xDS resource name.
    pub resource: String,
    /// The offending field (`rules[0].to[1].paths[2]`).
    pub field: String,
    pub reason: String,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Logged only.
    Audit,
}

/// `rules[].from[].source`, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
    /// `(namespace, service account)`.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
}

/// `rules[].to[].operation`, compiled (hosts lowercased).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<PathMatch>,
    pub not_paths: Vec<PathMatch>,
}

/// One rule, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// One policy as this waypoint enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// Applies to every Service of the waypoint.
    pub all_services: bool,
    /// Else to these (`<namespace>/<hostname>`).
    pub services: Vec<String>,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

/// What the policies look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The client's address (also `remote.ip`).
    pub source_ip: IpAddr,
    /// The HBONE peer's identity; `None` if it has none we can read.
    pub peer: Option<&'a SpiffeId>,
    /// The Service VIP and port.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub method: &'a str,
    /// `:authority` / Host as sent.
    pub host: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The validated JWT, if any.
    pub auth: Option<&'a RequestAuth>,
}

/// `positive` is empty or one of its values matches, and no value of `negative` does.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

impl Source {
    pub fn matches(&self, a: &Attributes<'_>) -> bool {
        self.matches_at(a, true)
    }

    /// Whether it has an HTTP-only field.
    fn has_http(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }

    /// `http`: false for opaque TCP, where HTTP-only fields are skipped (module docs).
    fn matches_at(&self, a: &Attributes<'_>, http: bool) -> bool {
        let principal = a.peer.map(SpiffeId::principal);
        let rp = a.auth.map(|r| r.principal.as_str());
        field(&self.principals, &self.not_principals, |m| {
            principal.as_deref().is_some_and(|p| m.matches(p))
        }) && (!http
            || field(
                &self.request_principals,
                &self.not_request_principals,
                |m| rp.is_some_and(|p| m.matches(p)),
            ))
            && field(&self.namespaces, &self.not_namespaces, |m| {
                a.peer.is_some_and(|p| m.matches(p.namespace()))
            })
            && field(&self.ip_blocks, &self.not_ip_blocks, |n| {
                n.contains(a.source_ip)
            })
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, |n| {
                n.contains(a.source_ip)
            })
            && field(
                &self.service_accounts,
                &self.not_service_accounts,
                |(ns, sa)| {
                    a.peer
                        .is_some_and(|p| p.namespace() == ns && p.service_account() == sa)
                },
            )
    }
}

impl Operation {
    pub fn matches(&self, a: &Attributes<'_>) -> bool {
        self.matches_at(a, true)
    }

    /// Whether it has an HTTP-only field (all but ports).
    fn has_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches_at(&self, a: &Attributes<'_>, http: bool) -> bool {
        if !http {
            return field(&self.ports, &self.not_ports, |p| *p == a.destination_port);
        }
        let host = a.host.to_ascii_lowercase();
        field(&self.hosts, &self.not_hosts, |m| m.matches(&host))
            && field(&self.ports, &self.not_ports, |p| *p == a.destination_port)
            && field(&self.methods, &self.not_methods, |m| m.matches(a.method))
            && field(&self.paths, &self.not_paths, |m| m.matches(a.path))
    }
}

impl Rule {
    pub fn matches(&self, a: &Attributes<'_>) -> bool {
        self.matches_at(a, true)
    }

    /// Whether any part of it can only be checked on an HTTP request.
    pub fn has_http(&self) -> bool {
        self.from.iter().any(Source::has_http)
            || self.to.iter().any(Operation::has_http)
            || self.when.iter().any(Condition::is_http)
    }

    fn matches_at(&self, a: &Attributes<'_>, http: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches_at(a, http)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches_at(a, http)))
            && self
                .when
                .iter()
                .all(|c| (!http && c.is_http()) || c.matches(a))
    }
}

impl Policy {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The index of the first matching rule, if any.
    pub fn matching_rule(&self, a: &Attributes<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(a))
    }

    /// [`Policy::matching_rule`] for opaque TCP (module docs): HTTP-only parts never match in
    /// an ALLOW or AUDIT rule and are skipped in a DENY rule.
    pub fn matching_rule_tcp(&self, a: &Attributes<'_>) -> Option<usize> {
        self.rules.iter().position(|r| match self.action {
            Action::Deny => r.matches_at(a, false),
            Action::Allow | Action::Audit => !r.has_http() && r.matches_at(a, false),
        })
    }

    /// Whether it applies to requests to the Service `key`.
    pub fn applies_to(&self, key: &str) -> bool {
        self.all_services || self.services.iter().any(|s| s == key)
    }

    /// Compiles the xDS resource `resource`; the error names the field to fix.
    pub fn compile(resource: &str, p: &pb::WaypointPolicy) -> Result<Policy, AuthzError> {
        let err = |field: String, reason: String| AuthzError {
            resource: resource.to_owned(),
            field,
            reason,
        };
        if p.namespace.is_empty() || p.name.is_empty() {
            return Err(err("namespace/name".into(), "both must be set".into()));
        }
        if !p.all_services && p.services.is_empty() {
            return Err(err(
                "services".into(),
                "no Service and not all_services: the policy would apply nowhere".into(),
            ));
        }
        let action = match pb::PolicyAction::try_from(p.action) {
            Ok(pb::PolicyAction::Allow) => Action::Allow,
            Ok(pb::PolicyAction::Deny) => Action::Deny,
            Ok(pb::PolicyAction::Audit) => Action::Audit,
            Err(_) => return Err(err("action".into(), format!("unknown action {}", p.action))),
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.iter().enumerate() {
            rules.push(compile_rule(r).map_err(|(f, why)| err(format!("rules[{i}].{f}"), why))?);
        }
        Ok(Policy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            all_services: p.all_services,
            services: p.services.clone(),
            action,
            dry_run: p.dry_run,
            rules,
        })
    }
}

type FieldError = (String, String);

fn list<T>(
    name: &str,
    vs: &[String],
    f: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    vs.iter()
        .enumerate()
        .map(|(i, v)| f(v).map_err(|e| (format!("{name}[{i}]"), e)))
        .collect()
}

/// A principal: Istio's forms, `spiffe://` dropped (principals are compared without it).
fn principal(v: &str) -> Result<StringMatch, String> {
    matcher::string_match(v.strip_prefix("spiffe://").unwrap_or(v))
}

fn service_account(v: &str) -> Result<(String, String), String> {
    match v.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!("{v:?} is not <namespace>/<service account>")),
    }
}

fn compile_rule(r: &pb::PolicyRule) -> Result<Rule, FieldError> {
    let sm = matcher::string_match;
    let mut rule = Rule::default();
    for (i, s) in r.from.iter().enumerate() {
        let at = |(f, e): FieldError| (format!("from[{i}].source.{f}"), e);
        let src = Source {
            principals: list("principals", &s.principals, principal).map_err(at)?,
            not_principals: list("notPrincipals", &s.not_principals, principal).map_err(at)?,
            request_principals: list("requestPrincipals", &s.request_principals, sm).map_err(at)?,
            not_request_principals: list("notRequestPrincipals", &s.not_request_principals, sm)
                .map_err(at)?,
            namespaces: list("namespaces", &s.namespaces, sm).map_err(at)?,
            not_namespaces: list("notNamespaces", &s.not_namespaces, sm).map_err(at)?,
            ip_blocks: list("ipBlocks", &s.ip_blocks, matcher::ip_block).map_err(at)?,
            not_ip_blocks: list("notIpBlocks", &s.not_ip_blocks, matcher::ip_block).map_err(at)?,
            remote_ip_blocks: list("remoteIpBlocks", &s.remote_ip_blocks, matcher::ip_block)
                .map_err(at)?,
            not_remote_ip_blocks: list(
                "notRemoteIpBlocks",
                &s.not_remote_ip_blocks,
                matcher::ip_block,
            )
            .map_err(at)?,
            service_accounts: list("serviceAccounts", &s.service_accounts, service_account)
                .map_err(at)?,
            not_service_accounts: list(
                "notServiceAccounts",
                &s.not_service_accounts,
                service_account,
            )
            .map_err(at)?,
        };
        if src == Source::default() {
            return Err((
                format!("from[{i}].source"),
                "an empty source is not valid (Istio refuses it)".into(),
            ));
        }
        rule.from.push(src);
    }
    for (i, o) in r.to.iter().enumerate() {
        let at = |(f, e): FieldError| (format!("to[{i}].operation.{f}"), e);
        let op = Operation {
            hosts: list("hosts", &o.hosts, matcher::string_match_lower).map_err(at)?,
            not_hosts: list("notHosts", &o.not_hosts, matcher::string_match_lower).map_err(at)?,
            ports: list("ports", &o.ports, matcher::port).map_err(at)?,
            not_ports: list("notPorts", &o.not_ports, matcher::port).map_err(at)?,
            methods: list("methods", &o.methods, sm).map_err(at)?,
            not_methods: list("notMethods", &o.not_methods, sm).map_err(at)?,
            paths: list("paths", &o.paths, PathMatch::parse).map_err(at)?,
            not_paths: list("notPaths", &o.not_paths, PathMatch::parse).map_err(at)?,
        };
        if op == Operation::default() {
            return Err((
                format!("to[{i}].operation"),
                "an empty operation is not valid (Istio refuses it)".into(),
            ));
        }
        rule.to.push(op);
    }
    for (i, c) in r.when.iter().enumerate() {
        rule.when.push(
            Condition::compile(&c.key, &c.values, &c.not_values)
                .map_err(|e| (format!("when[{i}]"), e))?,
        );
    }
    Ok(rule)
}

/// The outcome of [`Policies::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The deciding policy and its matching rule: the matching DENY or ALLOW. `None` when no
    /// ALLOW applies (allowed) or when ALLOWs apply and none matched (denied).
    pub policy: Option<(&'a Policy, usize)>,
    /// Matching AUDIT policies (rule index).
    pub audit: Vec<(&'a Policy, usize)>,
    /// Dry-run policies that apply, with their matching rule if any.
    pub dry_run: Vec<(&'a Policy, Option<usize>)>,
}

/// Every policy this waypoint holds, compiled. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    policies: Arc<Vec<Arc<Policy>>>,
}

impl Policies {
    /// The set, sorted by key (the decision does not depend on the order; logs do).
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> Policies {
        let mut v: Vec<_> = policies.into_iter().collect();
        v.sort_by_key(|p| p.key());
        Policies {
            policies: Arc::new(v),
        }
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether any policy applies to the Service `key`.
    pub fn any_for(&self, key: &str) -> bool {
        self.policies.iter().any(|p| p.applies_to(key))
    }

    /// Decides a request to the Service `key` (see the module docs).
    pub fn evaluate(&self, key: &str, a: &Attributes<'_>) -> Verdict<'_> {
        self.decide(key, a, Policy::matching_rule)
    }

    /// Decides an opaque TCP connection to the Service `key` (module docs).
    pub fn evaluate_tcp(&self, key: &str, a: &Attributes<'_>) -> Verdict<'_> {
        self.decide(key, a, Policy::matching_rule_tcp)
    }

    fn decide(
        &self,
        key: &str,
        a: &Attributes<'_>,
        matching_rule: fn(&Policy, &Attributes<'_>) -> Option<usize>,
    ) -> Verdict<'_> {
        let applying = || self.policies.iter().filter(|p| p.applies_to(key));
        let mut v = Verdict {
            allowed: true,
            policy: None,
            audit: Vec::new(),
            dry_run: Vec::new(),
        };
        for p in applying() {
            if p.dry_run {
                v.dry_run.push((p, matching_rule(p, a)));
            } else if p.action == Action::Audit
                && let Some(r) = matching_rule(p, a)
            {
                v.audit.push((p, r));
            }
        }
        let enforced = || applying().filter(|p| !p.dry_run);
        for p in enforced().filter(|p| p.action == Action::Deny) {
            if let Some(r) = matching_rule(p, a) {
                v.allowed = false;
                v.policy = Some((p, r));
                return v;
            }
        }
        let mut any_allow = false;
        for p in enforced().filter(|p| p.action == Action::Allow) {
            any_allow = true;
            if let Some(r) = matching_rule(p, a) {
                v.policy = Some((p, r));
                return v;
            }
        }
        v.allowed = !any_allow;
        v
    }
}
