//! The `spec` of HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`) and ReferenceGrant
//! (`v1beta1`), as typed structs. Every struct refuses unknown fields, so a field zmesh does
//! not implement (`sessionPersistence`, a newer experimental field, a typo) makes the whole
//! route refused with the field named, never silently ignored.
//!
//! Field names and defaults follow the Gateway API reference
//! (<https://gateway-api.sigs.k8s.io/reference/spec/>): `matches` defaults to one
//! `PathPrefix /` match, a path match to `PathPrefix /`, header/query matches to `Exact`,
//! backend `weight` to 1, `group` to `""` (core) and `kind` to `Service`.

use serde::Deserialize;

/// A reference to the route's parent (GAMMA: a Service).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// API group; `""` or absent for a core Service (Gateway API defaults it to
    /// `gateway.networking.k8s.io`, which the translation treats as a Gateway).
    pub group: Option<String>,
    /// `Service` for a mesh route (absent means `Gateway`).
    pub kind: Option<String>,
    /// The parent's namespace; the route's own when absent.
    pub namespace: Option<String>,
    /// The parent's name.
    pub name: String,
    /// A Gateway listener name; not meaningful for a Service.
    pub section_name: Option<String>,
    /// The Service port the route applies to; every port when absent.
    pub port: Option<i32>,
}

/// HTTPRoute `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Where the route attaches.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names; in a mesh the Service (its name and cluster IP) is the frontend, so
    /// these are read but do not restrict matching (GEP-1426).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<HttpRule>,
}

/// One HTTPRoute rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRule {
    /// Optional rule name (GEP-995).
    pub name: Option<String>,
    /// OR-ed matches; absent means `PathPrefix /`.
    pub matches: Option<Vec<HttpMatch>>,
    /// Filters applied to every request of the rule.
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts (Gateway API durations, e.g. `10s`, `500ms`).
    pub timeouts: Option<Timeouts>,
    /// Retries (GEP-1731).
    pub retry: Option<Retry>,
}

/// One HTTP match: every given condition must hold.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatch {
    /// Path condition (`PathPrefix /` when absent).
    pub path: Option<PathMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// HTTP method, e.g. `GET`.
    pub method: Option<String>,
}

/// A path condition.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The path or pattern (`/` when absent).
    pub value: Option<String>,
}

/// A header or query parameter condition.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Header or parameter name.
    pub name: String,
    /// Value or pattern.
    pub value: String,
}

/// An HTTPRoute filter (`type` names which of the other fields is set).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`,
    /// `RequestMirror` (`ExtensionRef` and `CORS` are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    pub request_redirect: Option<Redirect>,
    /// For `URLRewrite`.
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestMirror`.
    pub request_mirror: Option<Mirror>,
    /// For `ExtensionRef` (refused: zmesh has no extensions).
    pub extension_ref: Option<serde_json::Value>,
    /// For `CORS` (refused: not implemented).
    pub cors: Option<serde_json::Value>,
}

/// Header set/add/remove.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers replaced (or added when absent).
    #[serde(default)]
    pub set: Vec<Header>,
    /// Headers appended.
    #[serde(default)]
    pub add: Vec<Header>,
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// One header name and value.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `RequestRedirect`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// Host of the Location.
    pub hostname: Option<String>,
    /// Path of the Location.
    pub path: Option<PathModifier>,
    /// Port of the Location.
    pub port: Option<i32>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status_code: Option<i32>,
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    /// New Host.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// A path replacement.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `ReplaceFullPath`.
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    pub replace_prefix_match: Option<String>,
}

/// `RequestMirror`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mirror {
    /// Where copies go.
    pub backend_ref: BackendObjectRef,
    /// Share of requests mirrored, 0..=100 (all when neither this nor `fraction` is set).
    pub percent: Option<i32>,
    /// Share of requests mirrored as a fraction.
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator` (denominator 100 when absent).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    /// Numerator.
    pub numerator: i32,
    /// Denominator (default 100).
    pub denominator: Option<i32>,
}

/// A reference to a backend object (a Service).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectRef {
    /// `""` (core) when absent.
    pub group: Option<String>,
    /// `Service` when absent.
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// The route's namespace when absent; another needs a ReferenceGrant.
    pub namespace: Option<String>,
    /// Service port (required for a Service).
    pub port: Option<i32>,
}

/// An HTTPRoute backend.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// `""` (core) when absent.
    pub group: Option<String>,
    /// `Service` when absent.
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// The route's namespace when absent.
    pub namespace: Option<String>,
    /// Service port.
    pub port: Option<i32>,
    /// Relative weight (1 when absent; 0 sends nothing).
    pub weight: Option<i32>,
    /// Filters applied only when this backend is picked.
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
}

/// `timeouts`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole request, from the first byte received to the last byte of the response.
    pub request: Option<String>,
    /// One try to the backend.
    pub backend_request: Option<String>,
}

/// `retry`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// HTTP status codes (400..=599) that are retried; connection errors always are.
    #[serde(default)]
    pub codes: Vec<i32>,
    /// Retries after the first try.
    pub attempts: Option<i32>,
    /// Wait before each retry (a Gateway API duration).
    pub backoff: Option<String>,
}

/// GRPCRoute `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// Where the route attaches.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (read, not used for matching in a mesh).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<GrpcRule>,
}

/// One GRPCRoute rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRule {
    /// Optional rule name.
    pub name: Option<String>,
    /// OR-ed matches; absent or empty matches every request.
    #[serde(default)]
    pub matches: Vec<GrpcMatch>,
    /// Filters (`RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`).
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// One gRPC match.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMatch {
    /// Service/method condition.
    pub method: Option<GrpcMethodMatch>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// A gRPC service/method condition (at least one of the two).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Fully qualified service, e.g. `grpc.health.v1.Health`.
    pub service: Option<String>,
    /// Method, e.g. `Check`.
    pub method: Option<String>,
}

/// ReferenceGrant `spec` (`gateway.networking.k8s.io/v1beta1`), in the namespace of the
/// objects it lets others reference.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReferenceGrantSpec {
    /// Who may reference.
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    /// What they may reference.
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

/// A ReferenceGrant `from` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrantFrom {
    /// `gateway.networking.k8s.io` for routes.
    pub group: String,
    /// `HTTPRoute`, `GRPCRoute`, ...
    pub kind: String,
    /// The referencing object's namespace.
    pub namespace: String,
}

/// A ReferenceGrant `to` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrantTo {
    /// `""` for Services.
    pub group: String,
    /// `Service`.
    pub kind: String,
    /// One object, or every object of the kind when absent.
    pub name: Option<String>,
}
