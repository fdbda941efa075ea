//! The translated route model: what a Service's waypoint applies (entries in precedence
//! order, rules, filters, backends) and the status each route should carry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::spec::{BackendObjectRef, ParentRef};

/// Which kind of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// A route object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId {
    /// Kind.
    pub kind: RouteKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for RouteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// How a path is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    /// The whole path.
    Exact,
    /// Whole `/`-separated segments (`/v2` matches `/v2` and `/v2/x`, not `/v2x`).
    Prefix,
    /// A regular expression (Rust `regex` syntax) over the whole path.
    Regex,
}

/// How a header, query parameter or gRPC name is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Equal (header names case-insensitively).
    Exact,
    /// A regular expression.
    Regex,
}

/// One header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueCond {
    /// How.
    pub kind: ValueKind,
    /// Name.
    pub name: String,
    /// Value or pattern.
    pub value: String,
}

/// A gRPC service/method condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcMethod {
    /// How.
    pub kind: ValueKind,
    /// Service (any when `None`).
    pub service: Option<String>,
    /// Method (any when `None`).
    pub method: Option<String>,
}

/// One match (all its conditions must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// An HTTPRoute match.
    Http {
        /// How the path is compared.
        path_kind: PathKind,
        /// Path or pattern.
        path: String,
        /// Header conditions.
        headers: Vec<ValueCond>,
        /// Query parameter conditions.
        query: Vec<ValueCond>,
        /// Method.
        method: Option<String>,
    },
    /// A GRPCRoute match.
    Grpc {
        /// Service/method condition.
        method: Option<GrpcMethod>,
        /// Header conditions.
        headers: Vec<ValueCond>,
    },
}

/// Header set/add/remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    /// Replaced (name, value).
    pub set: Vec<(String, String)>,
    /// Appended (name, value).
    pub add: Vec<(String, String)>,
    /// Removed names.
    pub remove: Vec<String>,
}

/// A path replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// The whole path.
    Full(String),
    /// The part the PathPrefix match matched.
    Prefix(String),
}

/// A filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `RequestHeaderModifier`.
    RequestHeaders(HeaderOps),
    /// `ResponseHeaderModifier`.
    ResponseHeaders(HeaderOps),
    /// `RequestRedirect`.
    Redirect {
        /// New scheme.
        scheme: Option<String>,
        /// New host.
        hostname: Option<String>,
        /// New path.
        path: Option<PathRewrite>,
        /// New port.
        port: Option<u16>,
        /// 301/302/303/307/308.
        status: u16,
    },
    /// `URLRewrite`.
    Rewrite {
        /// New Host.
        hostname: Option<String>,
        /// New path.
        path: Option<PathRewrite>,
    },
    /// `RequestMirror`.
    Mirror {
        /// The reference as written.
        backend: BackendObjectRef,
        /// Share mirrored: numerator.
        numerator: u32,
        /// Share mirrored: denominator.
        denominator: u32,
        /// The resolved target; `None` when it does not resolve (nothing is mirrored).
        target: Option<ServiceTarget>,
    },
}

/// A backend that resolved: a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTarget {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `<name>.<namespace>.svc.<domain>`.
    pub hostname: String,
    /// Service port.
    pub port: u16,
}

/// Why a reference does not resolve: a `ResolvedRefs` reason and what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// `InvalidKind`, `BackendNotFound` or `RefNotPermitted`.
    pub reason: &'static str,
    /// What to fix.
    pub message: String,
}

/// One weighted backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Relative weight (0: never picked).
    pub weight: u32,
    /// The Service port, or why there is none (its share answers 500).
    pub target: Result<ServiceTarget, Unresolved>,
    /// Filters applied when this backend is picked.
    pub filters: Vec<Filter>,
}

/// Retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retried statuses (connection errors are always retried).
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Wait before each retry.
    pub backoff: Option<Duration>,
}

/// One rule: what happens to a request that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `<kind>/<namespace>/<name>/<rule index>` (or `.../<rule name>`), for logs and metrics.
    pub id: String,
    /// The rule's `name` (GEP-995), if set.
    pub name: Option<String>,
    /// Filters.
    pub filters: Vec<Filter>,
    /// Weighted backends (none: every request answers 500, unless a redirect answers).
    pub backends: Vec<Backend>,
    /// Whole-request timeout.
    pub request_timeout: Option<Duration>,
    /// Per-try timeout.
    pub backend_timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<RetryPolicy>,
}

/// One entry of a Service's route table: a match and the rule it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The route it comes from.
    pub route: RouteId,
    /// The rule's index in the route.
    pub rule_index: usize,
    /// The match's index in the rule (0 when the rule has none).
    pub match_index: usize,
    /// Only this Service port (every port when `None`).
    pub port: Option<u16>,
    /// A consumer route: only clients in this namespace.
    pub consumer_namespace: Option<String>,
    /// The match.
    pub matched: Match,
    /// The rule.
    pub rule: Arc<Rule>,
}

/// The routes of one Service bound to a waypoint, in precedence order (first match wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoutes {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service hostname.
    pub hostname: String,
    /// The waypoint (Gateway namespace, name) that serves it.
    pub waypoint: (String, String),
    /// HTTPRoute entries.
    pub http: Vec<Entry>,
    /// GRPCRoute entries.
    pub grpc: Vec<Entry>,
}

/// One condition of a route's parent status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCondition {
    /// `True` or `False`.
    pub status: bool,
    /// The Gateway API reason.
    pub reason: &'static str,
    /// What happened / what to fix.
    pub message: String,
}

/// The status of one Service parentRef.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    /// The parentRef as written.
    pub parent: ParentRef,
    /// `Accepted`.
    pub accepted: RouteCondition,
    /// `ResolvedRefs`.
    pub resolved_refs: RouteCondition,
}

/// The status a route should carry (only its Service parents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Per Service parentRef.
    pub parents: Vec<ParentStatus>,
}

/// Every mesh route, translated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routes {
    /// Route tables keyed like BoundService, `<namespace>/<hostname>`.
    pub services: BTreeMap<String, ServiceRoutes>,
    /// Status per route that has at least one Service parent.
    pub statuses: BTreeMap<RouteId, RouteStatus>,
    /// Routes refused whole, and why.
    pub refused: BTreeMap<RouteId, String>,
}
