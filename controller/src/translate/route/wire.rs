//! The route model on the wire: [`ServiceRoutes`] as `zmesh.waypoint.v1.ServiceRoutes`
//! (`xds-proto/proto/zmesh/waypoint/v1/route.proto`), one `RouteRule` per entry, in the
//! table's order (the waypoint takes the first match and never re-sorts). GRPCRoute entries
//! come first: a gRPC request is matched by service/method before any HTTPRoute path rule;
//! each carries a `content-type` match ([`GRPC_CONTENT_TYPE`]) so it applies to gRPC requests
//! only and never takes plain HTTP meant for an HTTPRoute on the same Service.

use xds_proto::zmesh::waypoint::v1 as pb;

use super::{
    Backend, Entry, Filter, HeaderOps, Match, PathKind, PathRewrite, RouteKind, ServiceRoutes,
    ServiceTarget, ValueCond, ValueKind,
};

/// The `content-type` of gRPC requests (`application/grpc`, `+proto`, `;charset=...`),
/// anchored as every wire regex is.
pub const GRPC_CONTENT_TYPE: &str = "application/grpc([+;].*)?";

/// The resource a waypoint receives for one Service.
pub fn service_routes(s: &ServiceRoutes) -> pb::ServiceRoutes {
    pb::ServiceRoutes {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        hostname: s.hostname.clone(),
        rules: s.grpc.iter().chain(&s.http).map(rule).collect(),
    }
}

fn rule(e: &Entry) -> pb::RouteRule {
    pb::RouteRule {
        route: Some(pb::RouteRef {
            kind: match e.route.kind {
                RouteKind::Http => pb::RouteKind::HttpRoute,
                RouteKind::Grpc => pb::RouteKind::GrpcRoute,
            } as i32,
            namespace: e.route.namespace.clone(),
            name: e.route.name.clone(),
            rule_index: e.rule_index as u32,
            match_index: e.match_index as u32,
            rule_name: e.rule.name.clone().unwrap_or_default(),
        }),
        port: e.port.map_or(0, u32::from),
        consumer_namespace: e.consumer_namespace.clone().unwrap_or_default(),
        r#match: Some(matched(&e.matched)),
        filters: e.rule.filters.iter().map(filter).collect(),
        backends: e.rule.backends.iter().map(backend).collect(),
        timeouts: (e.rule.request_timeout.is_some() || e.rule.backend_timeout.is_some()).then(
            || pb::Timeouts {
                request: e.rule.request_timeout.map(duration),
                backend_request: e.rule.backend_timeout.map(duration),
            },
        ),
        retry: e.rule.retry.as_ref().map(|r| pb::Retry {
            codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
            attempts: r.attempts,
            backoff: r.backoff.map(duration),
        }),
    }
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn kind(k: ValueKind) -> i32 {
    let t = match k {
        ValueKind::Exact => pb::MatchType::Exact,
        ValueKind::Regex => pb::MatchType::RegularExpression,
    };
    t as i32
}

fn matched(m: &Match) -> pb::RouteMatch {
    let header = |v: &ValueCond| pb::HeaderMatch {
        r#type: kind(v.kind),
        name: v.name.clone(),
        value: v.value.clone(),
    };
    match m {
        Match::Http {
            path_kind,
            path,
            headers,
            query,
            method,
        } => pb::RouteMatch {
            path: Some(pb::PathMatch {
                r#type: match path_kind {
                    PathKind::Exact => pb::MatchType::Exact,
                    PathKind::Prefix => pb::MatchType::PathPrefix,
                    PathKind::Regex => pb::MatchType::RegularExpression,
                } as i32,
                value: path.clone(),
            }),
            headers: headers.iter().map(header).collect(),
            query_params: query
                .iter()
                .map(|v| pb::QueryParamMatch {
                    r#type: kind(v.kind),
                    name: v.name.clone(),
                    value: v.value.clone(),
                })
                .collect(),
            method: method.clone().unwrap_or_default(),
            grpc: None,
        },
        Match::Grpc { method, headers } => pb::RouteMatch {
            path: None,
            headers: std::iter::once(pb::HeaderMatch {
                r#type: pb::MatchType::RegularExpression as i32,
                name: "content-type".to_owned(),
                value: GRPC_CONTENT_TYPE.to_owned(),
            })
            .chain(headers.iter().map(header))
            .collect(),
            query_params: Vec::new(),
            method: String::new(),
            grpc: method.as_ref().map(|m| pb::GrpcMethodMatch {
                r#type: kind(m.kind),
                service: m.service.clone().unwrap_or_default(),
                method: m.method.clone().unwrap_or_default(),
            }),
        },
    }
}

fn headers(h: &HeaderOps) -> pb::HeaderModifier {
    let list = |l: &[(String, String)]| {
        l.iter()
            .map(|(name, value)| pb::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    pb::HeaderModifier {
        set: list(&h.set),
        add: list(&h.add),
        remove: h.remove.clone(),
    }
}

fn path(p: &PathRewrite) -> pb::PathModifier {
    pb::PathModifier {
        kind: Some(match p {
            PathRewrite::Full(v) => pb::path_modifier::Kind::ReplaceFullPath(v.clone()),
            PathRewrite::Prefix(v) => pb::path_modifier::Kind::ReplacePrefixMatch(v.clone()),
        }),
    }
}

fn filter(f: &Filter) -> pb::Filter {
    use pb::filter::Kind;
    let kind = match f {
        Filter::RequestHeaders(h) => Kind::RequestHeaderModifier(headers(h)),
        Filter::ResponseHeaders(h) => Kind::ResponseHeaderModifier(headers(h)),
        Filter::Redirect {
            scheme,
            hostname,
            path: p,
            port,
            status,
        } => Kind::RequestRedirect(pb::RequestRedirect {
            scheme: scheme.clone().unwrap_or_default(),
            hostname: hostname.clone().unwrap_or_default(),
            path: p.as_ref().map(path),
            port: port.map_or(0, u32::from),
            status_code: u32::from(*status),
        }),
        Filter::Rewrite { hostname, path: p } => Kind::UrlRewrite(pb::UrlRewrite {
            hostname: hostname.clone().unwrap_or_default(),
            path: p.as_ref().map(path),
        }),
        Filter::Mirror {
            backend,
            numerator,
            denominator,
            target,
        } => Kind::RequestMirror(pb::RequestMirror {
            backend: Some(pb::Backend {
                weight: 1,
                target: Some(match target {
                    Some(t) => pb::backend::Target::Service(service(t)),
                    None => pb::backend::Target::Unresolved(format!(
                        "mirror backendRef {:?} did not resolve",
                        backend.name
                    )),
                }),
                filters: Vec::new(),
            }),
            numerator: *numerator,
            denominator: *denominator,
        }),
    };
    pb::Filter { kind: Some(kind) }
}

fn service(t: &ServiceTarget) -> pb::BackendService {
    pb::BackendService {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        hostname: t.hostname.clone(),
        port: u32::from(t.port),
    }
}

fn backend(b: &Backend) -> pb::Backend {
    pb::Backend {
        weight: b.weight,
        target: Some(match &b.target {
            Ok(t) => pb::backend::Target::Service(service(t)),
            Err(u) => pb::backend::Target::Unresolved(format!("{}: {}", u.reason, u.message)),
        }),
        filters: b.filters.iter().map(filter).collect(),
    }
}
