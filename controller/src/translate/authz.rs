//! Istio `security.istio.io/v1` AuthorizationPolicy to `istio.security.Authorization`, the L4
//! policy ztunnel enforces (Istio ambient semantics; istio/ztunnel @
//! `62d82653` `proto/authorization.proto` and the AuthorizationPolicy reference,
//! https://istio.io/latest/docs/reference/config/security/authorization-policy/).
//!
//! # Which policies ztunnel gets
//! - `targetRef`/`targetRefs`: a waypoint (L7) policy (`waypoint_authz`), not sent to ztunnel,
//!   except when it targets a Service no waypoint serves: then ztunnel enforces it on the
//!   Service's pods as a `WORKLOAD_SELECTOR` policy ([`translate_policies_with`]), so a
//!   missing waypoint never widens access. A target kind Istio does not define for
//!   AuthorizationPolicy, or a target in another namespace, is reported.
//! - `selector` → scope `WORKLOAD_SELECTOR`; the policy is named in the
//!   `authorization_policies` of every Workload whose Pod carries all `matchLabels` (see
//!   [`selected_policies`]), in the policy's namespace, or in every namespace when the policy
//!   lives in the root namespace ([`MeshConfig::root_namespace`]).
//! - no selector in the root namespace → `GLOBAL` (with `namespace` = the root namespace, as
//!   istiod sends it: ztunnel files GLOBAL policies under the mesh, whatever their namespace);
//!   no selector elsewhere → `NAMESPACE`.
//! - `ALLOW` (the default) and `DENY` are translated. `AUDIT` and `CUSTOM` have no L4 wire form:
//!   nothing is sent and an issue says so; an unknown action likewise. The
//!   `istio.io/dry-run: "true"` annotation sets `dry_run` (ztunnel only logs the decision).
//!
//! # Rules
//! Each rule becomes a [`xds::Rule`] whose clauses are AND-ed: `from` gives one clause with one
//! Match per entry (OR), `to` one clause likewise, and each `when` condition a clause of its own.
//! Strings take Istio's `exact`, `prefix*`, `*suffix` and `*` (presence) forms; principals lose
//! a leading `spiffe://` (ztunnel compares them without it); `serviceAccounts` are `ns/sa`, a
//! plain `sa` meaning the policy's namespace; IP blocks are CIDRs or bare IPs (host bits are
//! cleared); ports are decimal 0–65535. `when` keys enforced at L4: `source.ip`,
//! `source.namespace`, `source.principal`, `destination.ip`, `destination.port`.
//!
//! An empty rule (`{}`) becomes a Rule without clauses, which matches every connection; a
//! policy without rules matches none (an ALLOW without rules denies all, as in Istio).
//!
//! # What ztunnel cannot enforce never widens access
//! ztunnel sees connections, not requests. HTTP and other waypoint-only attributes
//! (`hosts`, `methods`, `paths` and their `not*`, `requestPrincipals`, `remoteIpBlocks`, `when`
//! keys other than the five above), invalid values (a bad CIDR, a non-numeric port, an empty
//! string, a malformed service account, a `when` without values, an empty `source` or
//! `operation`) are all reported, one [`PolicyIssue`] each, and resolved towards denying more:
//! - **ALLOW**: the rule holding them is left out. If every rule goes, the ALLOW keeps zero
//!   rules: ztunnel still counts it as an ALLOW policy for its workloads and it matches nothing,
//!   so it denies all their traffic unless another ALLOW matches — exactly what istiod and
//!   ztunnel do, and what Istio documents ("ztunnel will simply drop all traffic").
//! - **DENY**: the rule is kept with its L4 parts only, so it matches more connections. The
//!   non-L4 parts of an entry are ignored; a `when` condition on a non-L4 key is dropped; in a
//!   positive list (`ipBlocks`, `ports`, ...) with an invalid value the whole list is dropped
//!   (the entry matches any value of that field); in a negative list (`notIpBlocks`, ...) only
//!   the invalid values are dropped (the entry excludes less). An entry left with no condition
//!   matches everything, and so does its clause, which is then left out.
//!
//! ztunnel skips a Match with no field set (it never matches) but treats a Clause without
//! Matches as true, so an unconstrained entry is expressed by leaving its clause out, never by
//! an empty Match: no Match this module emits is empty.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value, json};
use xds_proto::istio::security::{self as xds, string_match::MatchType};

use super::waypoint_authz::Fallback;
use super::{AuthorizationPolicy, Condition, MeshConfig, Objects, Operation, Source};

/// Annotation that puts a policy in dry-run mode (ztunnel logs its decision, enforces nothing).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Something an operator should know about one AuthorizationPolicy: it was not sent to ztunnel,
/// or it was sent narrowed (an ALLOW allowing less, a DENY denying more than written).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PolicyIssue {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// What happened and why, naming the offending field (`rules[0].from[1].source.ipBlocks`).
    pub message: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AuthorizationPolicy {}/{}: {}",
            self.namespace, self.name, self.message
        )
    }
}

/// Translates every AuthorizationPolicy ztunnel enforces, keyed `<namespace>/<name>` (the xDS
/// resource name), and reports every policy that was skipped or narrowed (module docs).
pub fn translate_policies(
    objects: &Objects,
    mesh: &MeshConfig,
) -> (BTreeMap<String, xds::Authorization>, Vec<PolicyIssue>) {
    translate_policies_with(objects, mesh, &Fallback::new())
}

/// [`translate_policies`], plus the targetRef policies ztunnel enforces in place of a missing
/// waypoint (`fallback`, see `waypoint_authz`): those become `WORKLOAD_SELECTOR` policies.
pub(crate) fn translate_policies_with(
    objects: &Objects,
    mesh: &MeshConfig,
    fallback: &Fallback,
) -> (BTreeMap<String, xds::Authorization>, Vec<PolicyIssue>) {
    let mut out = BTreeMap::new();
    let mut issues = Vec::new();
    for ((namespace, name), policy) in &objects.authorization_policies {
        let mut messages = Vec::new();
        let key = (namespace.clone(), name.clone());
        let translated = if fallback.contains_key(&key) {
            // Validity and the L4 reduction as for a selector policy (module docs).
            let mut as_selector = policy.clone();
            as_selector.spec.target_ref = None;
            as_selector.spec.target_refs.clear();
            as_selector.spec.selector = Some(Default::default());
            translate_policy(namespace, name, &as_selector, mesh, &mut messages)
        } else {
            translate_policy(namespace, name, policy, mesh, &mut messages)
        };
        if let Some(auth) = translated {
            out.insert(format!("{namespace}/{name}"), auth);
        }
        issues.extend(messages.into_iter().map(|message| PolicyIssue {
            namespace: namespace.clone(),
            name: name.clone(),
            message,
        }));
    }
    (out, issues)
}

/// The selector-scoped policies (`<namespace>/<name>`, sorted) that apply to a Pod with
/// `pod_labels` in `namespace`: those of its namespace and of the root namespace whose
/// `matchLabels` it all carries, and that [`translate_policies`] sends to ztunnel.
#[cfg(test)]
pub(crate) fn selected_policies(
    pod_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
    objects: &Objects,
    mesh: &MeshConfig,
) -> Vec<String> {
    selected_policies_with(pod_labels, namespace, objects, mesh, &Fallback::new())
}

/// [`selected_policies`], plus the targetRef policies of `namespace` ztunnel enforces for a
/// Service with no waypoint whose selector the pod matches (`fallback`).
pub(crate) fn selected_policies_with(
    pod_labels: Option<&BTreeMap<String, String>>,
    namespace: &str,
    objects: &Objects,
    mesh: &MeshConfig,
    fallback: &Fallback,
) -> Vec<String> {
    let carries = |sel: &BTreeMap<String, String>| {
        sel.iter()
            .all(|(k, v)| pod_labels.and_then(|l| l.get(k)) == Some(v))
    };
    let mut fell_back: Vec<String> = fallback
        .iter()
        .filter(|((ns, _), sels)| ns == namespace && sels.iter().any(carries))
        .map(|((ns, name), _)| format!("{ns}/{name}"))
        .collect();
    let mut namespaces = vec![namespace];
    if mesh.root_namespace != namespace {
        namespaces.push(&mesh.root_namespace);
    }
    let mut out = Vec::new();
    for ns in namespaces {
        let in_namespace = objects
            .authorization_policies
            .range((ns.to_owned(), String::new())..)
            .take_while(|((policy_ns, _), _)| policy_ns == ns);
        for ((policy_ns, name), policy) in in_namespace {
            let Some(selector) = &policy.spec.selector else {
                continue;
            };
            if !sent_to_ztunnel(policy) {
                continue;
            }
            let selects = selector
                .match_labels
                .iter()
                .all(|(k, v)| pod_labels.and_then(|l| l.get(k)) == Some(v));
            if selects {
                out.push(format!("{policy_ns}/{name}"));
            }
        }
    }
    out.append(&mut fell_back);
    out.sort();
    out
}

/// Whether [`translate_policies`] emits an Authorization for `policy` (whatever its rules).
fn sent_to_ztunnel(policy: &AuthorizationPolicy) -> bool {
    let spec = &policy.spec;
    spec.target_ref.is_none()
        && spec.target_refs.is_empty()
        && action(spec.action.as_deref()).is_ok()
}

/// The wire action for the policy's `action`, or why there is none.
fn action(action: Option<&str>) -> Result<xds::Action, String> {
    match action {
        None | Some("" | "ALLOW") => Ok(xds::Action::Allow),
        Some("DENY") => Ok(xds::Action::Deny),
        Some("AUDIT") => Err(
            "action AUDIT is not enforced by ztunnel; the policy is not sent to \
             ztunnel (audit logging of requests needs a waypoint)"
                .to_owned(),
        ),
        Some("CUSTOM") => Err(
            "action CUSTOM is not enforced by ztunnel; the policy is not sent \
             to ztunnel and the external authorizer is not consulted for connections to these \
             workloads (attach the policy to a waypoint with targetRefs)"
                .to_owned(),
        ),
        Some(other) => Err(format!(
            "unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM); the policy is not \
             sent to ztunnel"
        )),
    }
}

/// Target kinds Istio accepts in an AuthorizationPolicy's `targetRef(s)`: `(group, kind)`.
const TARGET_KINDS: [(&str, &str); 5] = [
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
    ("", "Service"),
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
];

fn translate_policy(
    namespace: &str,
    name: &str,
    policy: &AuthorizationPolicy,
    mesh: &MeshConfig,
    issues: &mut Vec<String>,
) -> Option<xds::Authorization> {
    let spec = &policy.spec;
    let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
    if !targets.is_empty() {
        if spec.selector.is_some() {
            issues.push(
                "both selector and targetRef(s) are set (Istio rejects this); the policy is \
                 treated as a waypoint policy and not sent to ztunnel"
                    .to_owned(),
            );
        }
        for target in targets {
            if !TARGET_KINDS.contains(&(target.group.as_str(), target.kind.as_str())) {
                issues.push(format!(
                    "targetRef kind {:?} (group {:?}) is not a supported target (Gateway, \
                     GatewayClass, Service, ServiceEntry), so Istio ignores it; the policy is \
                     not sent to ztunnel either",
                    target.kind, target.group
                ));
            } else if target
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != namespace)
            {
                issues.push(format!(
                    "targetRef {} {:?} names namespace {:?}, but a policy may only target \
                     objects in its own namespace, so Istio ignores it; the policy is not sent \
                     to ztunnel either",
                    target.kind,
                    target.name,
                    target.namespace.as_deref().unwrap_or_default()
                ));
            }
        }
        return None;
    }
    let action = match action(spec.action.as_deref()) {
        Ok(action) => action,
        Err(message) => {
            issues.push(message);
            return None;
        }
    };
    let scope = match (&spec.selector, namespace == mesh.root_namespace) {
        (Some(_), _) => xds::Scope::WorkloadSelector,
        (None, true) => xds::Scope::Global,
        (None, false) => xds::Scope::Namespace,
    };
    let dry_run = match policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
    {
        None => false,
        Some(value) => parse_bool(value).unwrap_or_else(|| {
            issues.push(format!(
                "annotation {DRY_RUN_ANNOTATION}: {value:?} is not a boolean; the policy is \
                 enforced (not dry-run)"
            ));
            false
        }),
    };

    // Fields outside the schema at the top or in the selector change what the policy is or
    // whom it applies to in ways we cannot know: an ALLOW keeps no rules (denies all it
    // applies to), a DENY is enforced as if they were absent (applies at least as widely).
    let unknown_top: Vec<String> = spec
        .unknown
        .keys()
        .map(|k| format!("spec.{k}"))
        .chain(
            spec.selector
                .iter()
                .flat_map(|s| s.unknown.keys().map(|k| format!("spec.selector.{k}"))),
        )
        .collect();
    for field in &unknown_top {
        let consequence = if action == xds::Action::Deny {
            "this DENY is enforced without it (denies at least as much as written)"
        } else {
            "this ALLOW keeps no rules and denies all connections to the workloads it applies to"
        };
        issues.push(format!(
            "{field} is not a field of security.istio.io/v1 AuthorizationPolicy (misspelt, or from a newer Istio); {consequence}"
        ));
    }

    let mut rules = Vec::new();
    for (index, rule) in spec.rules.iter().enumerate() {
        if action == xds::Action::Allow && !unknown_top.is_empty() {
            break;
        }
        let mut cx = RuleCx {
            action,
            namespace,
            rule: index,
            drop: false,
            issues: &mut *issues,
        };
        let translated = cx.rule(rule);
        if !cx.drop || action == xds::Action::Deny {
            let written = !(rule.from.is_empty() && rule.to.is_empty() && rule.when.is_empty());
            if action == xds::Action::Deny && written && translated.clauses.is_empty() {
                issues.push(format!(
                    "rules[{index}]: no condition ztunnel can enforce is left, so this DENY \
                     rule matches every connection to the workloads it applies to"
                ));
            }
            rules.push(translated);
        }
    }
    if action == xds::Action::Allow
        && !spec.rules.is_empty()
        && rules.is_empty()
        && unknown_top.is_empty()
    {
        issues.push(
            "no rule of this ALLOW can be enforced by ztunnel, so it keeps no rules and denies \
             all connections to the workloads it applies to (unless another ALLOW matches)"
                .to_owned(),
        );
    }
    Some(xds::Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run,
        extensions: Vec::new(),
    })
}

/// Go's `strconv.ParseBool`, which istiod uses for annotations.
pub(super) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// `when` keys ztunnel does not enforce but Istio defines (HTTP or waypoint-only attributes).
fn known_non_l4_key(key: &str) -> bool {
    const EXACT: [&str; 5] = [
        "remote.ip",
        "connection.sni",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
    ];
    const PREFIXES: [&str; 4] = [
        "request.headers[",
        "request.auth.",
        "experimental.envoy.filters.",
        "request.regex.headers[",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Translation of one rule, collecting issues; `drop` marks an ALLOW rule that must go.
struct RuleCx<'a> {
    action: xds::Action,
    /// The policy's namespace (for plain service account names).
    namespace: &'a str,
    rule: usize,
    drop: bool,
    issues: &'a mut Vec<String>,
}

impl RuleCx<'_> {
    fn deny(&self) -> bool {
        self.action == xds::Action::Deny
    }

    fn rule(&mut self, rule: &super::Rule) -> xds::Rule {
        let r = self.rule;
        let mut unknown: Vec<String> = rule
            .unknown
            .keys()
            .map(|k| format!("rules[{r}].{k}"))
            .collect();
        for (i, from) in rule.from.iter().enumerate() {
            unknown.extend(
                from.unknown
                    .keys()
                    .map(|k| format!("rules[{r}].from[{i}].{k}")),
            );
            let source = from.source.unknown.keys();
            unknown.extend(source.map(|k| format!("rules[{r}].from[{i}].source.{k}")));
        }
        for (i, to) in rule.to.iter().enumerate() {
            unknown.extend(to.unknown.keys().map(|k| format!("rules[{r}].to[{i}].{k}")));
            let operation = to.operation.unknown.keys();
            unknown.extend(operation.map(|k| format!("rules[{r}].to[{i}].operation.{k}")));
        }
        for (i, when) in rule.when.iter().enumerate() {
            unknown.extend(
                when.unknown
                    .keys()
                    .map(|k| format!("rules[{r}].when[{i}].{k}")),
            );
        }
        for path in unknown {
            self.unknown_field(&path);
        }
        let mut clauses = Vec::new();
        let from: Vec<xds::Match> = rule
            .from
            .iter()
            .enumerate()
            .map(|(i, from)| {
                let path = format!("rules[{}].from[{i}].source", self.rule);
                self.source(&path, &from.source)
            })
            .collect();
        clauses.extend(clause(from));
        let to: Vec<xds::Match> = rule
            .to
            .iter()
            .enumerate()
            .map(|(i, to)| {
                let path = format!("rules[{}].to[{i}].operation", self.rule);
                self.operation(&path, &to.operation)
            })
            .collect();
        clauses.extend(clause(to));
        for (i, condition) in rule.when.iter().enumerate() {
            let path = format!("rules[{}].when[{i}]", self.rule);
            let m = self.condition(&path, condition);
            clauses.extend(clause(vec![m]));
        }
        xds::Rule { clauses }
    }

    fn source(&mut self, path: &str, s: &Source) -> xds::Match {
        let l7 = [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ];
        for (field, values) in l7 {
            if !values.is_empty() {
                self.not_l4(&format!("{path}.{field}"));
            }
        }
        if *s == Source::default() {
            self.invalid(
                path,
                "is empty (Istio requires at least one field)",
                Side::Entry,
            );
        }
        let ns = self.namespace;
        let sa = |v: &str| service_account(v, ns);
        xds::Match {
            principals: self.list(path, "principals", &s.principals, Side::Positive, principal),
            not_principals: self.list(
                path,
                "notPrincipals",
                &s.not_principals,
                Side::Negative,
                principal,
            ),
            namespaces: self.list(path, "namespaces", &s.namespaces, Side::Positive, pattern),
            not_namespaces: self.list(
                path,
                "notNamespaces",
                &s.not_namespaces,
                Side::Negative,
                pattern,
            ),
            service_accounts: self.list(
                path,
                "serviceAccounts",
                &s.service_accounts,
                Side::Positive,
                sa,
            ),
            not_service_accounts: self.list(
                path,
                "notServiceAccounts",
                &s.not_service_accounts,
                Side::Negative,
                sa,
            ),
            source_ips: self.list(path, "ipBlocks", &s.ip_blocks, Side::Positive, address),
            not_source_ips: self.list(
                path,
                "notIpBlocks",
                &s.not_ip_blocks,
                Side::Negative,
                address,
            ),
            ..xds::Match::default()
        }
    }

    fn operation(&mut self, path: &str, o: &Operation) -> xds::Match {
        let l7 = [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ];
        for (field, values) in l7 {
            if !values.is_empty() {
                self.not_l4(&format!("{path}.{field}"));
            }
        }
        if *o == Operation::default() {
            self.invalid(
                path,
                "is empty (Istio requires at least one field)",
                Side::Entry,
            );
        }
        xds::Match {
            destination_ports: self.list(path, "ports", &o.ports, Side::Positive, port),
            not_destination_ports: self.list(path, "notPorts", &o.not_ports, Side::Negative, port),
            ..xds::Match::default()
        }
    }

    fn condition(&mut self, path: &str, c: &Condition) -> xds::Match {
        if c.values.is_empty() && c.not_values.is_empty() {
            self.invalid(
                path,
                &format!("key {:?} has neither values nor notValues", c.key),
                Side::Entry,
            );
            return xds::Match::default();
        }
        let mut m = xds::Match::default();
        let (v, nv) = (&c.values, &c.not_values);
        match c.key.as_str() {
            "source.ip" => {
                m.source_ips = self.list(path, "values", v, Side::Positive, address);
                m.not_source_ips = self.list(path, "notValues", nv, Side::Negative, address);
            }
            "destination.ip" => {
                m.destination_ips = self.list(path, "values", v, Side::Positive, address);
                m.not_destination_ips = self.list(path, "notValues", nv, Side::Negative, address);
            }
            "source.namespace" => {
                m.namespaces = self.list(path, "values", v, Side::Positive, pattern);
                m.not_namespaces = self.list(path, "notValues", nv, Side::Negative, pattern);
            }
            "source.principal" => {
                m.principals = self.list(path, "values", v, Side::Positive, principal);
                m.not_principals = self.list(path, "notValues", nv, Side::Negative, principal);
            }
            "destination.port" => {
                m.destination_ports = self.list(path, "values", v, Side::Positive, port);
                m.not_destination_ports = self.list(path, "notValues", nv, Side::Negative, port);
            }
            key if known_non_l4_key(key) => self.not_l4(&format!("{path}.key {key:?}")),
            key => self.invalid(
                &format!("{path}.key"),
                &format!("{key:?} is not an attribute Istio defines"),
                Side::Entry,
            ),
        }
        m
    }

    /// Parses one list of values; see the module docs for what an invalid value does.
    fn list<T>(
        &mut self,
        path: &str,
        field: &str,
        values: &[String],
        side: Side,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(values.len());
        let mut bad = false;
        for value in values {
            match parse(value) {
                Ok(parsed) => out.push(parsed),
                Err(why) => {
                    bad = true;
                    self.invalid(
                        &format!("{path}.{field}"),
                        &format!("{value:?} {why}"),
                        side,
                    );
                }
            }
        }
        if bad && side == Side::Positive {
            // ALLOW: the rule is dropped anyway. DENY: the field no longer constrains the entry.
            out.clear();
        }
        out
    }

    /// Reports a field ztunnel cannot enforce.
    fn not_l4(&mut self, path: &str) {
        self.drop = true;
        let consequence = self.without_it();
        self.issues.push(format!(
            "{path} is an L7 attribute ztunnel cannot enforce; {consequence}; use a waypoint \
             to enforce it"
        ));
    }

    /// Reports a field outside the schema; resolved like an L7 attribute.
    fn unknown_field(&mut self, path: &str) {
        self.drop = true;
        let consequence = self.without_it();
        self.issues.push(format!(
            "{path} is not a field of security.istio.io/v1 AuthorizationPolicy (misspelt, or \
             from a newer Istio); {consequence}"
        ));
    }

    /// Reports an invalid value or entry.
    fn invalid(&mut self, path: &str, what: &str, side: Side) {
        self.drop = true;
        let consequence = match (self.deny(), side) {
            (false, _) | (true, Side::Entry) => self.without_it(),
            (true, Side::Positive) => {
                "this DENY entry matches any value of that field (denies more than written)"
            }
            (true, Side::Negative) => {
                "the value is left out, so this DENY excludes less (denies more than written)"
            }
        };
        self.issues.push(format!("{path}: {what}; {consequence}"));
    }

    /// What leaving a field or entry out does to this policy.
    fn without_it(&self) -> &'static str {
        if self.deny() {
            "this DENY is enforced without it (denies more than written)"
        } else {
            "the rule is left out of this ALLOW (allows less than written)"
        }
    }
}

/// Which kind of list (or whole entry) an invalid value was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Positive,
    Negative,
    Entry,
}

/// The clause OR-ing `matches`, or `None` when it would match every connection (no entries
/// written, or one entry with nothing left to check): see the module docs on empty Matches.
fn clause(matches: Vec<xds::Match>) -> Option<xds::Clause> {
    if matches.is_empty() || matches.iter().any(is_empty) {
        return None;
    }
    Some(xds::Clause { matches })
}

fn is_empty(m: &xds::Match) -> bool {
    m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.source_ips.is_empty()
        && m.not_source_ips.is_empty()
        && m.destination_ips.is_empty()
        && m.not_destination_ips.is_empty()
        && m.destination_ports.is_empty()
        && m.not_destination_ports.is_empty()
        && m.service_accounts.is_empty()
        && m.not_service_accounts.is_empty()
}

/// Istio's string forms: `*` presence, `*suffix`, `prefix*`, else exact.
fn pattern(value: &str) -> Result<xds::StringMatch, String> {
    let match_type = if value.is_empty() {
        return Err("is empty".to_owned());
    } else if value == "*" {
        MatchType::Presence(())
    } else if let Some(suffix) = value.strip_prefix('*') {
        MatchType::Suffix(suffix.to_owned())
    } else if let Some(prefix) = value.strip_suffix('*') {
        MatchType::Prefix(prefix.to_owned())
    } else {
        MatchType::Exact(value.to_owned())
    };
    Ok(xds::StringMatch {
        match_type: Some(match_type),
    })
}

/// A principal pattern without a leading `spiffe://` (ztunnel strips it from the peer's).
fn principal(value: &str) -> Result<xds::StringMatch, String> {
    let mut m = pattern(value)?;
    if let Some(MatchType::Exact(s) | MatchType::Prefix(s)) = &mut m.match_type
        && let Some(rest) = s.strip_prefix("spiffe://")
    {
        *s = rest.to_owned();
    }
    Ok(m)
}

/// `ns/sa`, or `sa` in the policy's namespace.
fn service_account(value: &str, namespace: &str) -> Result<xds::ServiceAccountMatch, String> {
    let (ns, sa) = value.split_once('/').unwrap_or((namespace, value));
    let valid = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
    if !valid(ns) || !valid(sa) {
        return Err("is not a service account (`namespace/name` or `name`, no wildcards)".into());
    }
    Ok(xds::ServiceAccountMatch {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

/// A bare IP (full length) or a CIDR, host bits cleared.
fn address(value: &str) -> Result<xds::Address, String> {
    let bad = || "is not an IP address or CIDR".to_owned();
    let (ip, len) = match value.split_once('/') {
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().map_err(|_| bad())?;
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
                return Err(bad());
            }
            let len: u32 = len.parse().map_err(|_| bad())?;
            (ip, len)
        }
        None => {
            let ip: IpAddr = value.parse().map_err(|_| bad())?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let mut bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let bits = bytes.len() as u32 * 8;
    if len > bits {
        return Err(format!("has a prefix length over {bits}"));
    }
    for (i, byte) in bytes.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if start >= len {
            *byte = 0;
        } else if len - start < 8 {
            *byte &= 0xffu8 << (8 - (len - start));
        }
    }
    Ok(xds::Address {
        address: bytes,
        length: len,
    })
}

/// A decimal port, 0–65535.
fn port(value: &str) -> Result<u32, String> {
    let bad = || "is not a port number (0-65535)".to_owned();
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse::<u16>().map(u32::from).map_err(|_| bad())
}

/// A readable, stable JSON rendering of one Authorization (enums by name, IPs as CIDR text,
/// only the Match fields that are set), for golden tests and config dumps.
pub fn authorization_json(a: &xds::Authorization) -> Value {
    json!({
        "name": a.name,
        "namespace": a.namespace,
        "scope": xds::Scope::try_from(a.scope)
            .map_or_else(|_| a.scope.to_string(), |s| s.as_str_name().to_owned()),
        "action": xds::Action::try_from(a.action)
            .map_or_else(|_| a.action.to_string(), |s| s.as_str_name().to_owned()),
        "dry_run": a.dry_run,
        "rules": a.rules.iter().map(|r| json!({
            "clauses": r.clauses.iter().map(|c| json!({
                "matches": c.matches.iter().map(match_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn match_json(m: &xds::Match) -> Value {
    let mut out = Map::new();
    let mut put = |key: &str, values: Vec<Value>| {
        if !values.is_empty() {
            out.insert(key.to_owned(), Value::Array(values));
        }
    };
    let strings = |v: &[xds::StringMatch]| v.iter().map(string_match_json).collect::<Vec<_>>();
    let addresses = |v: &[xds::Address]| v.iter().map(address_json).collect::<Vec<_>>();
    let ports = |v: &[u32]| v.iter().map(|p| json!(p)).collect::<Vec<_>>();
    let accounts = |v: &[xds::ServiceAccountMatch]| {
        v.iter()
            .map(|s| json!({ "namespace": s.namespace, "service_account": s.service_account }))
            .collect::<Vec<_>>()
    };
    put("namespaces", strings(&m.namespaces));
    put("not_namespaces", strings(&m.not_namespaces));
    put("principals", strings(&m.principals));
    put("not_principals", strings(&m.not_principals));
    put("source_ips", addresses(&m.source_ips));
    put("not_source_ips", addresses(&m.not_source_ips));
    put("destination_ips", addresses(&m.destination_ips));
    put("not_destination_ips", addresses(&m.not_destination_ips));
    put("destination_ports", ports(&m.destination_ports));
    put("not_destination_ports", ports(&m.not_destination_ports));
    put("service_accounts", accounts(&m.service_accounts));
    put("not_service_accounts", accounts(&m.not_service_accounts));
    Value::Object(out)
}

fn string_match_json(m: &xds::StringMatch) -> Value {
    match &m.match_type {
        Some(MatchType::Exact(s)) => json!({ "exact": s }),
        Some(MatchType::Prefix(s)) => json!({ "prefix": s }),
        Some(MatchType::Suffix(s)) => json!({ "suffix": s }),
        Some(MatchType::Presence(())) => json!({ "presence": {} }),
        None => Value::Null,
    }
}

/// `10.0.0.0/8`, `fd00::/64`; other byte lengths in hex.
fn address_json(a: &xds::Address) -> Value {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(a.address.as_slice()) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(a.address.as_slice()) {
        IpAddr::from(v6).to_string()
    } else {
        let hex: String = a.address.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    };
    json!(format!("{ip}/{}", a.length))
}

#[cfg(test)]
mod tests;
