//! The local config file's `serviceRoutes:` (running without a controller): the same model as
//! `zmesh.waypoint.v1.ServiceRoutes`, in YAML with camelCase names, converted to the proto and
//! compiled like a resource from xDS. Example:
//!
//! ```yaml
//! serviceRoutes:
//! - namespace: default
//!   name: echo
//!   hostname: echo.default.svc.cluster.local
//!   rules:
//!   - route: {kind: HTTPRoute, namespace: default, name: split}
//!     match: {path: {type: PathPrefix, value: /api}, headers: [{name: x-version, value: v2}]}
//!     filters: [{urlRewrite: {path: {replacePrefixMatch: /v2}}}]
//!     backends: [{weight: 1, service: {namespace: default, name: echo-v2,
//!                 hostname: echo-v2.default.svc.cluster.local, port: 80}}]
//!     timeouts: {request: 2s}
//!     retry: {codes: [503], attempts: 2, backoff: 25ms}
//! ```

use std::time::Duration;

use serde::Deserialize;
use xds_proto::zmesh::waypoint::v1 as pb;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRoutes {
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    pub hostname: String,
    #[serde(default)]
    pub rules: Vec<LocalRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRule {
    #[serde(default)]
    route: Option<LocalRef>,
    #[serde(default)]
    port: u32,
    #[serde(default)]
    consumer_namespace: String,
    #[serde(default, rename = "match")]
    matches: Option<LocalMatch>,
    #[serde(default)]
    filters: Vec<LocalFilter>,
    #[serde(default)]
    backends: Vec<LocalBackend>,
    #[serde(default)]
    timeouts: Option<LocalTimeouts>,
    #[serde(default)]
    retry: Option<LocalRetry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalRef {
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    rule_index: u32,
    #[serde(default)]
    match_index: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
enum Kind {
    #[default]
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
enum MatchType {
    #[default]
    Exact,
    PathPrefix,
    RegularExpression,
}

impl MatchType {
    fn pb(self) -> i32 {
        (match self {
            MatchType::Exact => pb::MatchType::Exact,
            MatchType::PathPrefix => pb::MatchType::PathPrefix,
            MatchType::RegularExpression => pb::MatchType::RegularExpression,
        }) as i32
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalMatch {
    #[serde(default)]
    path: Option<Cond>,
    #[serde(default)]
    headers: Vec<Cond>,
    #[serde(default)]
    query_params: Vec<Cond>,
    #[serde(default)]
    method: String,
    #[serde(default)]
    grpc: Option<GrpcCond>,
}

/// A path (no `name`), header or query parameter condition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cond {
    #[serde(default, rename = "type")]
    ty: MatchType,
    #[serde(default)]
    name: String,
    value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcCond {
    #[serde(default, rename = "type")]
    ty: MatchType,
    #[serde(default)]
    service: String,
    #[serde(default)]
    method: String,
}

/// One filter: exactly one of the fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalFilter {
    request_header_modifier: Option<Headers>,
    response_header_modifier: Option<Headers>,
    request_redirect: Option<Redirect>,
    url_rewrite: Option<Rewrite>,
    request_mirror: Option<Box<Mirror>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: String,
    value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Headers {
    #[serde(default)]
    set: Vec<Header>,
    #[serde(default)]
    add: Vec<Header>,
    #[serde(default)]
    remove: Vec<String>,
}

/// A path modifier: one of the fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PathMod {
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Redirect {
    #[serde(default)]
    scheme: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    path: Option<PathMod>,
    #[serde(default)]
    port: u32,
    #[serde(default)]
    status_code: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rewrite {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    path: Option<PathMod>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mirror {
    backend: LocalBackend,
    #[serde(default)]
    numerator: u32,
    #[serde(default)]
    denominator: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalBackend {
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    service: Option<BackendService>,
    #[serde(default)]
    unresolved: Option<String>,
    #[serde(default)]
    filters: Vec<LocalFilter>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendService {
    namespace: String,
    #[serde(default)]
    name: String,
    hostname: String,
    port: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalTimeouts {
    #[serde(default, with = "humantime_serde")]
    request: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    backend_request: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRetry {
    #[serde(default)]
    codes: Vec<u32>,
    #[serde(default)]
    attempts: u32,
    #[serde(default, with = "humantime_serde")]
    backoff: Option<Duration>,
}

fn dur(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.map(|d| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    })
}

fn path_mod(p: Option<PathMod>) -> Option<pb::PathModifier> {
    use pb::path_modifier::Kind as K;
    // Neither set: a modifier of no kind, which changes nothing.
    p.map(|p| pb::PathModifier {
        kind: p
            .replace_full_path
            .map(K::ReplaceFullPath)
            .or(p.replace_prefix_match.map(K::ReplacePrefixMatch)),
    })
}

fn headers(h: Headers) -> pb::HeaderModifier {
    let pairs = |v: Vec<Header>| {
        v.into_iter()
            .map(|h| pb::Header {
                name: h.name,
                value: h.value,
            })
            .collect()
    };
    pb::HeaderModifier {
        set: pairs(h.set),
        add: pairs(h.add),
        remove: h.remove,
    }
}

/// The filter's kind; exactly one must be set.
fn filter(f: LocalFilter) -> Result<pb::Filter, String> {
    use pb::filter::Kind as K;
    let set = [
        f.request_header_modifier.is_some(),
        f.response_header_modifier.is_some(),
        f.request_redirect.is_some(),
        f.url_rewrite.is_some(),
        f.request_mirror.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err("a filter needs exactly one of requestHeaderModifier, \
                    responseHeaderModifier, requestRedirect, urlRewrite, requestMirror"
            .into());
    }
    let kind = if let Some(h) = f.request_header_modifier {
        Some(K::RequestHeaderModifier(headers(h)))
    } else if let Some(h) = f.response_header_modifier {
        Some(K::ResponseHeaderModifier(headers(h)))
    } else if let Some(r) = f.request_redirect {
        Some(K::RequestRedirect(pb::RequestRedirect {
            scheme: r.scheme,
            hostname: r.hostname,
            path: path_mod(r.path),
            port: r.port,
            status_code: r.status_code,
        }))
    } else if let Some(r) = f.url_rewrite {
        Some(K::UrlRewrite(pb::UrlRewrite {
            hostname: r.hostname,
            path: path_mod(r.path),
        }))
    } else {
        match f.request_mirror {
            Some(m) => Some(K::RequestMirror(pb::RequestMirror {
                backend: Some(backend(m.backend)?),
                numerator: m.numerator,
                denominator: m.denominator,
            })),
            None => None,
        }
    };
    Ok(pb::Filter { kind })
}

fn filters(fs: Vec<LocalFilter>) -> Result<Vec<pb::Filter>, String> {
    fs.into_iter().map(filter).collect()
}

fn backend(b: LocalBackend) -> Result<pb::Backend, String> {
    use pb::backend::Target;
    let target = match (b.service, b.unresolved) {
        (Some(s), _) => Some(Target::Service(pb::BackendService {
            namespace: s.namespace,
            name: s.name,
            hostname: s.hostname,
            port: s.port,
        })),
        (None, Some(why)) => Some(Target::Unresolved(why)),
        (None, None) => None,
    };
    Ok(pb::Backend {
        weight: b.weight,
        target,
        filters: filters(b.filters)?,
    })
}

impl LocalRoutes {
    /// The resource name, `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The same routes as the xDS resource; the error says what to fix.
    pub fn into_proto(self) -> Result<pb::ServiceRoutes, String> {
        let rules = self
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| -> Result<pb::RouteRule, String> {
                let at = |e: String| format!("rules[{i}]: {e}");
                let m = r.matches.map(|m| pb::RouteMatch {
                    path: m.path.map(|p| pb::PathMatch {
                        r#type: p.ty.pb(),
                        value: p.value,
                    }),
                    headers: m
                        .headers
                        .into_iter()
                        .map(|h| pb::HeaderMatch {
                            r#type: h.ty.pb(),
                            name: h.name,
                            value: h.value,
                        })
                        .collect(),
                    query_params: m
                        .query_params
                        .into_iter()
                        .map(|q| pb::QueryParamMatch {
                            r#type: q.ty.pb(),
                            name: q.name,
                            value: q.value,
                        })
                        .collect(),
                    method: m.method,
                    grpc: m.grpc.map(|g| pb::GrpcMethodMatch {
                        r#type: g.ty.pb(),
                        service: g.service,
                        method: g.method,
                    }),
                });
                Ok(pb::RouteRule {
                    route: r.route.map(|x| pb::RouteRef {
                        kind: match x.kind {
                            Kind::Http => pb::RouteKind::HttpRoute,
                            Kind::Grpc => pb::RouteKind::GrpcRoute,
                        } as i32,
                        namespace: x.namespace,
                        name: x.name,
                        rule_index: x.rule_index,
                        match_index: x.match_index,
                        rule_name: String::new(),
                    }),
                    port: r.port,
                    consumer_namespace: r.consumer_namespace,
                    r#match: m,
                    filters: filters(r.filters).map_err(at)?,
                    backends: r
                        .backends
                        .into_iter()
                        .map(backend)
                        .collect::<Result<_, _>>()
                        .map_err(at)?,
                    timeouts: r.timeouts.map(|t| pb::Timeouts {
                        request: dur(t.request),
                        backend_request: dur(t.backend_request),
                    }),
                    retry: r.retry.map(|t| pb::Retry {
                        codes: t.codes,
                        attempts: t.attempts,
                        backoff: dur(t.backoff),
                    }),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(pb::ServiceRoutes {
            namespace: self.namespace,
            name: self.name,
            hostname: self.hostname,
            rules,
        })
    }
}
