//! `zmesh.waypoint.v1.ServiceRoutes` -> [`ServiceRoutes`]: every field checked, regexes
//! compiled (RE2 syntax with the `regex` crate, anchored); the first problem refuses the whole
//! resource, naming the field and the route it came from.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use xds_proto::zmesh::waypoint::v1 as pb;

use super::filter::{Filter, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite};
use super::matching::{GrpcMatch, Match, PathMatch, StrMatch};
use super::{Backend, Retry, RouteError, Rule, ServiceRoutes, Timeouts};
use crate::bound::{Binding, BoundPort, BoundService};

/// Largest compiled regex accepted (bytes of the regex crate's program).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

struct Ctx<'a> {
    resource: &'a str,
    at: String,
}

impl Ctx<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> RouteError {
        RouteError::Invalid {
            resource: self.resource.to_owned(),
            field: format!("{}{field}", self.at),
            reason: reason.into(),
        }
    }

    fn regex(&self, field: &str, re: &str) -> Result<Regex, RouteError> {
        regex::RegexBuilder::new(&format!("^(?:{re})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                // regex's message spans lines and repeats the pattern: kept on one line.
                let e = zmesh_core::peer_text::PeerText::display(
                    &e,
                    zmesh_core::peer_text::PEER_ERROR_MAX,
                );
                self.err(field, format!("bad regular expression {re:?}: {e}"))
            })
    }

    fn str_match(&self, field: &str, ty: i32, v: &str) -> Result<StrMatch, RouteError> {
        match pb::MatchType::try_from(ty) {
            Ok(pb::MatchType::Exact) => Ok(StrMatch::Exact(v.to_owned())),
            Ok(pb::MatchType::RegularExpression) => Ok(StrMatch::Regex(self.regex(field, v)?)),
            _ => Err(self.err(
                field,
                format!("match type {ty} is not Exact or RegularExpression"),
            )),
        }
    }

    fn header_name(&self, field: &str, n: &str) -> Result<HeaderName, RouteError> {
        HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| self.err(field, format!("{n:?} is not a header name")))
    }

    fn header_value(&self, field: &str, v: &str) -> Result<HeaderValue, RouteError> {
        HeaderValue::from_str(v)
            .map_err(|_| self.err(field, format!("{v:?} is not a header value")))
    }

    fn duration(
        &self,
        field: &str,
        d: &Option<prost_types::Duration>,
    ) -> Result<Option<Duration>, RouteError> {
        let Some(d) = d else { return Ok(None) };
        if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
            return Err(self.err(field, format!("{d:?} is not a positive duration")));
        }
        Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
    }
}

/// Compiles the resource named `name`.
pub fn compile(name: &str, s: &pb::ServiceRoutes) -> Result<ServiceRoutes, RouteError> {
    let mut cx = Ctx {
        resource: name,
        at: String::new(),
    };
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(cx.err("namespace/hostname", "both must be set"));
    }
    let mut rules = Vec::with_capacity(s.rules.len());
    for (i, r) in s.rules.iter().enumerate() {
        let route = r.route.clone().unwrap_or_default();
        let kind = match pb::RouteKind::try_from(route.kind) {
            Ok(pb::RouteKind::GrpcRoute) => "GRPCRoute",
            _ => "HTTPRoute",
        };
        let label = format!(
            "{kind} {}/{} rule {} match {}",
            route.namespace, route.name, route.rule_index, route.match_index
        );
        cx.at = format!("rules[{i}] ({label}).");
        rules.push(rule(&cx, label, r)?);
    }
    Ok(ServiceRoutes::new(
        format!("{}/{}", s.namespace, s.hostname),
        rules,
    ))
}

fn rule(cx: &Ctx<'_>, label: String, r: &pb::RouteRule) -> Result<Rule, RouteError> {
    let port =
        u16::try_from(r.port).map_err(|_| cx.err("port", format!("{} is not 0-65535", r.port)))?;
    let m = r.r#match.clone().unwrap_or_default();
    let mut matcher = Match::default();
    if let Some(p) = &m.path {
        matcher.path = Some(match pb::MatchType::try_from(p.r#type) {
            Ok(pb::MatchType::Exact) => PathMatch::Exact(p.value.clone()),
            Ok(pb::MatchType::PathPrefix) => {
                if !p.value.starts_with('/') {
                    return Err(cx.err(
                        "match.path.value",
                        format!("prefix {:?} does not start with /", p.value),
                    ));
                }
                PathMatch::Prefix(p.value.trim_end_matches('/').to_owned())
            }
            Ok(pb::MatchType::RegularExpression) => {
                PathMatch::Regex(cx.regex("match.path.value", &p.value)?)
            }
            Err(_) => {
                return Err(cx.err(
                    "match.path.type",
                    format!("unknown match type {}", p.r#type),
                ));
            }
        });
    }
    for (j, h) in m.headers.iter().enumerate() {
        let f = format!("match.headers[{j}]");
        matcher.headers.push((
            cx.header_name(&f, &h.name)?,
            cx.str_match(&f, h.r#type, &h.value)?,
        ));
    }
    for (j, q) in m.query_params.iter().enumerate() {
        let f = format!("match.query_params[{j}]");
        if q.name.is_empty() {
            return Err(cx.err(&f, "empty parameter name"));
        }
        matcher
            .query
            .push((q.name.clone(), cx.str_match(&f, q.r#type, &q.value)?));
    }
    if !m.method.is_empty() {
        matcher.method = Some(
            Method::from_bytes(m.method.as_bytes())
                .map_err(|_| cx.err("match.method", format!("{:?} is not a method", m.method)))?,
        );
    }
    if let Some(g) = &m.grpc {
        let part = |f: &str, v: &str| -> Result<Option<StrMatch>, RouteError> {
            if v.is_empty() {
                Ok(None)
            } else {
                cx.str_match(f, g.r#type, v).map(Some)
            }
        };
        matcher.grpc = Some(GrpcMatch {
            service: part("match.grpc.service", &g.service)?,
            method: part("match.grpc.method", &g.method)?,
        });
    }
    let filters = filters(cx, "filters", &r.filters, &matcher)?;
    let mut backends = Vec::with_capacity(r.backends.len());
    for (j, b) in r.backends.iter().enumerate() {
        let f = format!("backends[{j}]");
        backends.push(Backend {
            weight: b.weight,
            target: target(cx, &f, b)?,
            filters: filters_of_backend(cx, &format!("{f}.filters"), &b.filters, &matcher)?,
        });
    }
    let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
    let t = r.timeouts.unwrap_or_default();
    let timeouts = Timeouts {
        // A zero duration disables the timeout (HTTPRouteTimeouts).
        request: cx
            .duration("timeouts.request", &t.request)?
            .filter(|d| !d.is_zero()),
        backend_request: cx
            .duration("timeouts.backend_request", &t.backend_request)?
            .filter(|d| !d.is_zero()),
    };
    let retry = match &r.retry {
        None => None,
        Some(rt) => {
            let mut codes = Vec::new();
            for c in &rt.codes {
                codes.push(
                    u16::try_from(*c)
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .filter(|c| c.as_u16() >= 400)
                        .ok_or_else(|| {
                            cx.err("retry.codes", format!("{c} is not a 4xx/5xx status code"))
                        })?,
                );
            }
            Some(Retry {
                codes,
                attempts: rt.attempts,
                backoff: cx
                    .duration("retry.backoff", &rt.backoff)?
                    .unwrap_or_default(),
            })
        }
    };
    Ok(Rule {
        name: Arc::from(label),
        port,
        consumer_namespace: (!r.consumer_namespace.is_empty())
            .then(|| r.consumer_namespace.clone()),
        matcher,
        filters,
        backends,
        total_weight,
        timeouts,
        retry,
    })
}

fn target(cx: &Ctx<'_>, f: &str, b: &pb::Backend) -> Result<Result<Binding, String>, RouteError> {
    Ok(match &b.target {
        Some(pb::backend::Target::Service(s)) => {
            let port = u16::try_from(s.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    cx.err(
                        &format!("{f}.service.port"),
                        format!("{} is not 1-65535", s.port),
                    )
                })?;
            if s.namespace.is_empty() || s.hostname.is_empty() {
                return Err(cx.err(
                    &format!("{f}.service"),
                    "namespace and hostname must be set",
                ));
            }
            let bp = BoundPort {
                port,
                target_port: 0,
                name: String::new(),
                app_protocol: String::new(),
                protocol: Default::default(),
            };
            Ok(Binding::new(
                Arc::new(BoundService {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    hostname: s.hostname.clone(),
                    vips: Vec::new(),
                    ports: vec![bp.clone()],
                }),
                bp,
            ))
        }
        Some(pb::backend::Target::Unresolved(why)) => Err(why.clone()),
        None => Err("the backend names no target".to_owned()),
    })
}

fn filters_of_backend(
    cx: &Ctx<'_>,
    f: &str,
    fs: &[pb::Filter],
    m: &Match,
) -> Result<Vec<Filter>, RouteError> {
    let out = filters(cx, f, fs, m)?;
    if out.iter().any(|x| matches!(x, Filter::Redirect(_))) {
        return Err(cx.err(f, "a backendRef filter cannot redirect"));
    }
    Ok(out)
}

fn filters(
    cx: &Ctx<'_>,
    at: &str,
    fs: &[pb::Filter],
    m: &Match,
) -> Result<Vec<Filter>, RouteError> {
    use pb::filter::Kind;
    let mut out = Vec::with_capacity(fs.len());
    for (k, f) in fs.iter().enumerate() {
        let field = format!("{at}[{k}]");
        out.push(match &f.kind {
            Some(Kind::RequestHeaderModifier(h)) => Filter::RequestHeaders(headers(cx, &field, h)?),
            Some(Kind::ResponseHeaderModifier(h)) => {
                Filter::ResponseHeaders(headers(cx, &field, h)?)
            }
            Some(Kind::RequestRedirect(r)) => {
                let status = match r.status_code {
                    0 => StatusCode::FOUND,
                    c @ (301 | 302 | 303 | 307 | 308) => {
                        StatusCode::from_u16(c as u16).expect("valid")
                    }
                    c => {
                        return Err(cx.err(
                            &field,
                            format!("redirect status {c} is not 301, 302, 303, 307 or 308"),
                        ));
                    }
                };
                if !matches!(r.scheme.as_str(), "" | "http" | "https") {
                    return Err(cx.err(
                        &field,
                        format!("redirect scheme {:?} is not http or https", r.scheme),
                    ));
                }
                let port = match r.port {
                    0 => None,
                    p => Some(
                        u16::try_from(p)
                            .map_err(|_| cx.err(&field, format!("port {p} is not 1-65535")))?,
                    ),
                };
                Filter::Redirect(Redirect {
                    scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
                    hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
                    path: path_modifier(cx, &field, &r.path, m)?,
                    port,
                    status,
                })
            }
            Some(Kind::UrlRewrite(u)) => {
                if !u.hostname.is_empty() {
                    cx.header_value(&field, &u.hostname)?;
                }
                Filter::Rewrite(Rewrite {
                    hostname: (!u.hostname.is_empty()).then(|| u.hostname.clone()),
                    path: path_modifier(cx, &field, &u.path, m)?,
                })
            }
            Some(Kind::RequestMirror(mr)) => {
                let b = mr.backend.clone().unwrap_or_default();
                Filter::Mirror(Mirror {
                    target: target(cx, &format!("{field}.backend"), &b)?.ok(),
                    numerator: mr.numerator,
                    denominator: mr.denominator,
                })
            }
            None => return Err(cx.err(&field, "a filter of a kind this waypoint does not know")),
        });
    }
    Ok(out)
}

fn headers(cx: &Ctx<'_>, f: &str, h: &pb::HeaderModifier) -> Result<HeaderModifier, RouteError> {
    let pairs = |v: &[pb::Header]| -> Result<Vec<(HeaderName, HeaderValue)>, RouteError> {
        v.iter()
            .map(|h| Ok((cx.header_name(f, &h.name)?, cx.header_value(f, &h.value)?)))
            .collect()
    };
    Ok(HeaderModifier {
        set: pairs(&h.set)?,
        add: pairs(&h.add)?,
        remove: h
            .remove
            .iter()
            .map(|n| cx.header_name(f, n))
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(
    cx: &Ctx<'_>,
    f: &str,
    p: &Option<pb::PathModifier>,
    m: &Match,
) -> Result<Option<PathModifier>, RouteError> {
    use pb::path_modifier::Kind;
    Ok(match p.as_ref().and_then(|p| p.kind.as_ref()) {
        None => None,
        Some(Kind::ReplaceFullPath(v)) => Some(PathModifier::Full(v.clone())),
        Some(Kind::ReplacePrefixMatch(v)) => {
            if matches!(m.path, Some(PathMatch::Exact(_) | PathMatch::Regex(_))) {
                return Err(cx.err(f, "ReplacePrefixMatch needs a PathPrefix match on the rule"));
            }
            Some(PathModifier::Prefix(v.clone()))
        }
    })
}
