//! Checks one route's rules and turns them into the [`Rule`]s and [`Match`]es the waypoint
//! applies. Anything zmesh cannot apply as written (a regular expression that does not
//! compile, a filter it does not implement, a malformed duration, values the Gateway API
//! schema forbids) is an error naming the field: the caller refuses the whole route.
//! Backend references are not resolved here (see [`super::resolve_backend`]).

use std::time::Duration;

use super::spec::{
    GrpcMatch, HeaderModifier, HttpFilter, HttpMatch, PathModifier, Retry, Timeouts, ValueMatch,
};
use super::{
    Filter, GrpcMethod, HeaderOps, Match, PathKind, PathRewrite, RetryPolicy, RouteKind, ValueCond,
    ValueKind,
};

/// Redirect status codes Gateway API allows.
const REDIRECT_CODES: [i32; 5] = [301, 302, 303, 307, 308];

/// The compiled matches of one HTTPRoute rule (`PathPrefix /` when it has none).
pub(super) fn http_matches(at: &str, matches: Option<&[HttpMatch]>) -> Result<Vec<Match>, String> {
    let default = [HttpMatch::default()];
    let list = matches.unwrap_or(&default);
    let list = if list.is_empty() { &default[..] } else { list };
    list.iter()
        .enumerate()
        .map(|(i, m)| http_match(&format!("{at}.matches[{i}]"), m))
        .collect()
}

fn http_match(at: &str, m: &HttpMatch) -> Result<Match, String> {
    let (kind, value) = match &m.path {
        None => (PathKind::Prefix, "/".to_owned()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
            let kind = match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathKind::Exact,
                "PathPrefix" => PathKind::Prefix,
                "RegularExpression" => {
                    check_regex(&format!("{at}.path"), &value)?;
                    PathKind::Regex
                }
                other => {
                    return Err(format!(
                        "{at}.path.type {other:?} is not Exact, PathPrefix or RegularExpression"
                    ));
                }
            };
            if kind != PathKind::Regex && !value.starts_with('/') {
                return Err(format!("{at}.path.value {value:?} must start with `/`"));
            }
            (kind, value)
        }
    };
    let method = match m.method.as_deref() {
        None => None,
        Some(
            method @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH"),
        ) => Some(method.to_owned()),
        Some(other) => {
            return Err(format!(
                "{at}.method {other:?} is not one of GET, HEAD, POST, PUT, DELETE, CONNECT, \
                 OPTIONS, TRACE, PATCH"
            ));
        }
    };
    Ok(Match::Http {
        path_kind: kind,
        path: value,
        headers: values(&format!("{at}.headers"), &m.headers)?,
        query: values(&format!("{at}.queryParams"), &m.query_params)?,
        method,
    })
}

/// The compiled matches of one GRPCRoute rule (one that matches everything when it has none).
pub(super) fn grpc_matches(at: &str, matches: &[GrpcMatch]) -> Result<Vec<Match>, String> {
    if matches.is_empty() {
        return Ok(vec![Match::Grpc {
            method: None,
            headers: Vec::new(),
        }]);
    }
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("{at}.matches[{i}]");
            let method = match &m.method {
                None => None,
                Some(mm) => {
                    let kind = value_kind(&format!("{at}.method"), mm.kind.as_deref())?;
                    if mm.service.is_none() && mm.method.is_none() {
                        return Err(format!("{at}.method needs `service`, `method` or both"));
                    }
                    if kind == ValueKind::Regex {
                        for part in [&mm.service, &mm.method].into_iter().flatten() {
                            check_regex(&format!("{at}.method"), part)?;
                        }
                    }
                    Some(GrpcMethod {
                        kind,
                        service: mm.service.clone(),
                        method: mm.method.clone(),
                    })
                }
            };
            Ok(Match::Grpc {
                method,
                headers: values(&format!("{at}.headers"), &m.headers)?,
            })
        })
        .collect()
}

fn values(at: &str, list: &[ValueMatch]) -> Result<Vec<ValueCond>, String> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("{at}[{i}]");
            let kind = value_kind(&at, v.kind.as_deref())?;
            if kind == ValueKind::Regex {
                check_regex(&at, &v.value)?;
            }
            if v.name.is_empty() {
                return Err(format!("{at}.name is empty"));
            }
            Ok(ValueCond {
                kind,
                name: v.name.clone(),
                value: v.value.clone(),
            })
        })
        .collect()
}

fn value_kind(at: &str, kind: Option<&str>) -> Result<ValueKind, String> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(ValueKind::Exact),
        "RegularExpression" => Ok(ValueKind::Regex),
        other => Err(format!(
            "{at}.type {other:?} is not Exact or RegularExpression"
        )),
    }
}

fn check_regex(at: &str, pattern: &str) -> Result<(), String> {
    regex::Regex::new(pattern).map(drop).map_err(|e| {
        // regex's message spans lines and repeats the pattern: kept on one line.
        let e = zmesh_core::peer_text::PeerText::display(&e, zmesh_core::peer_text::PEER_ERROR_MAX);
        format!("{at}: {pattern:?} is not a valid regular expression: {e}")
    })
}

/// What a filter list compiles to, with the mirror targets left for the caller to resolve
/// (`Filter::Mirror` carries its reference).
pub(super) fn filters(
    at: &str,
    kind: RouteKind,
    list: &[HttpFilter],
) -> Result<Vec<Filter>, String> {
    let mut out = Vec::new();
    let (mut redirect, mut rewrite) = (false, false);
    for (i, f) in list.iter().enumerate() {
        let at = format!("{at}.filters[{i}]");
        let allowed = match kind {
            RouteKind::Http => true,
            RouteKind::Grpc => matches!(
                f.kind.as_str(),
                "RequestHeaderModifier" | "ResponseHeaderModifier" | "RequestMirror"
            ),
        };
        if !allowed {
            return Err(format!(
                "{at}: filter type {:?} is not allowed in a GRPCRoute",
                f.kind
            ));
        }
        let missing = || format!("{at}: filter type {} needs its configuration field", f.kind);
        out.push(match f.kind.as_str() {
            "RequestHeaderModifier" => Filter::RequestHeaders(header_ops(
                &at,
                f.request_header_modifier.as_ref().ok_or_else(missing)?,
            )?),
            "ResponseHeaderModifier" => Filter::ResponseHeaders(header_ops(
                &at,
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
            )?),
            "RequestRedirect" => {
                redirect = true;
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                let status = r.status_code.unwrap_or(302);
                if !REDIRECT_CODES.contains(&status) {
                    return Err(format!(
                        "{at}.requestRedirect.statusCode {status} is not one of 301, 302, 303, \
                         307, 308"
                    ));
                }
                if let Some(s) = r.scheme.as_deref()
                    && s != "http"
                    && s != "https"
                {
                    return Err(format!(
                        "{at}.requestRedirect.scheme {s:?} is not http or https"
                    ));
                }
                Filter::Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(&format!("{at}.requestRedirect.path"), p))
                        .transpose()?,
                    port: r
                        .port
                        .map(|p| port(&format!("{at}.requestRedirect.port"), p))
                        .transpose()?,
                    status: status as u16,
                }
            }
            "URLRewrite" => {
                rewrite = true;
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                Filter::Rewrite {
                    hostname: r.hostname.clone(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(&format!("{at}.urlRewrite.path"), p))
                        .transpose()?,
                }
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let (numerator, denominator) = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(format!(
                            "{at}.requestMirror: set `percent` or `fraction`, not both"
                        ));
                    }
                    (Some(p), None) => (p, 100),
                    (None, Some(f)) => (f.numerator, f.denominator.unwrap_or(100)),
                    (None, None) => (100, 100),
                };
                if denominator < 1 || numerator < 0 || numerator > denominator {
                    return Err(format!(
                        "{at}.requestMirror: the share {numerator}/{denominator} is not between \
                         0 and 1"
                    ));
                }
                Filter::Mirror {
                    backend: m.backend_ref.clone(),
                    numerator: numerator as u32,
                    denominator: denominator as u32,
                    target: None,
                }
            }
            other => {
                return Err(format!(
                    "{at}: filter type {other:?} is not supported by zmesh (supported: \
                     RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, \
                     RequestMirror)"
                ));
            }
        });
    }
    if redirect && rewrite {
        return Err(format!(
            "{at}: RequestRedirect and URLRewrite cannot be used together"
        ));
    }
    Ok(out)
}

fn header_ops(at: &str, m: &HeaderModifier) -> Result<HeaderOps, String> {
    let all = m
        .set
        .iter()
        .map(|h| &h.name)
        .chain(m.add.iter().map(|h| &h.name))
        .chain(&m.remove);
    for name in all {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{at}: {name:?} is not a valid header name"));
        }
    }
    Ok(HeaderOps {
        set: m
            .set
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        remove: m.remove.clone(),
    })
}

fn path_rewrite(at: &str, p: &PathModifier) -> Result<PathRewrite, String> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(full), None) => Ok(PathRewrite::Full(full.clone())),
        ("ReplacePrefixMatch", None, Some(prefix)) => Ok(PathRewrite::Prefix(prefix.clone())),
        (kind @ ("ReplaceFullPath" | "ReplacePrefixMatch"), _, _) => Err(format!(
            "{at}: type {kind} needs exactly its own field (replaceFullPath or \
             replacePrefixMatch)"
        )),
        (other, _, _) => Err(format!(
            "{at}.type {other:?} is not ReplaceFullPath or ReplacePrefixMatch"
        )),
    }
}

/// A port number, 1..=65535.
pub(super) fn port(at: &str, p: i32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{at} {p} is not a port (1-65535)"))
}

/// `(request, backendRequest)` timeouts; `0s` means none.
pub(super) fn timeouts(
    at: &str,
    t: Option<&Timeouts>,
) -> Result<(Option<Duration>, Option<Duration>), String> {
    let Some(t) = t else {
        return Ok((None, None));
    };
    let request = t
        .request
        .as_deref()
        .map(|d| duration(&format!("{at}.timeouts.request"), d))
        .transpose()?
        .filter(|d| !d.is_zero());
    let backend = t
        .backend_request
        .as_deref()
        .map(|d| duration(&format!("{at}.timeouts.backendRequest"), d))
        .transpose()?
        .filter(|d| !d.is_zero());
    if let (Some(r), Some(b)) = (request, backend)
        && b > r
    {
        return Err(format!(
            "{at}.timeouts: backendRequest ({b:?}) is longer than request ({r:?})"
        ));
    }
    Ok((request, backend))
}

/// The retry policy, checked (codes 400-599, attempts >= 0).
pub(super) fn retry(at: &str, r: Option<&Retry>) -> Result<Option<RetryPolicy>, String> {
    let Some(r) = r else {
        return Ok(None);
    };
    let codes = r
        .codes
        .iter()
        .map(|c| {
            u16::try_from(*c)
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| format!("{at}.retry.codes: {c} is not an HTTP status in 400-599"))
        })
        .collect::<Result<Vec<u16>, String>>()?;
    let attempts = match r.attempts {
        None => 1,
        Some(a) => u32::try_from(a).map_err(|_| format!("{at}.retry.attempts {a} is negative"))?,
    };
    let backoff = r
        .backoff
        .as_deref()
        .map(|d| duration(&format!("{at}.retry.backoff"), d))
        .transpose()?;
    Ok(Some(RetryPolicy {
        codes,
        attempts,
        backoff,
    }))
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>` parts, e.g.
/// `1h30m`, `500ms`, `0s`.
pub fn duration(at: &str, text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{at} {text:?} is not a Gateway API duration (e.g. `10s`, `1m30s`, `500ms`: up to \
             four parts of 1-5 digits and h, m, s or ms)"
        )
    };
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}
