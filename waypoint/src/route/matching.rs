//! Request matching (Gateway API `HTTPRouteMatch` / `GRPCRouteMatch`): path (Exact,
//! segment-wise PathPrefix, anchored RE2 regex), headers, query parameters, method, gRPC
//! service/method. All conditions of one match must hold.

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

/// A string condition.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

impl StrMatch {
    /// Whether `v` satisfies the condition.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => e == v,
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// The prefix without its trailing `/` (`/` itself is the empty prefix: every path).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    /// Whether `path` (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(e) => e == path,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// GRPCRoute method match, against the path `/<service>/<method>`.
#[derive(Debug, Clone, Default)]
pub struct GrpcMatch {
    pub service: Option<StrMatch>,
    pub method: Option<StrMatch>,
}

impl GrpcMatch {
    fn matches(&self, path: &str) -> bool {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return false;
        };
        if method.contains('/') {
            return false;
        }
        self.service.as_ref().is_none_or(|m| m.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
    }
}

/// One compiled match (AND of its conditions).
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub path: Option<PathMatch>,
    pub headers: Vec<(HeaderName, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub method: Option<Method>,
    pub grpc: Option<GrpcMatch>,
}

/// The parts of a request a match looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query (after `?`), if any.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    /// Whether the request satisfies every condition.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(m) = &self.method
            && m != r.method
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(r.path)
        {
            return false;
        }
        if let Some(g) = &self.grpc
            && !g.matches(r.path)
        {
            return false;
        }
        for (name, m) in &self.headers {
            let Some(v) = r.headers.get(name).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            if !m.matches(v) {
                return false;
            }
        }
        for (name, m) in &self.query {
            let Some(v) = query_param(r.query, name) else {
                return false;
            };
            if !m.matches(&v) {
                return false;
            }
        }
        true
    }
}

/// The first value of query parameter `name` (percent-decoded, `+` as space).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        m: &'a Method,
        path: &'a str,
        q: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method: m,
            path,
            query: q,
            headers: h,
        }
    }

    #[test]
    fn path_prefix_is_segment_wise() {
        let p = PathMatch::Prefix("/v2".into());
        assert!(p.matches("/v2"));
        assert!(p.matches("/v2/"));
        assert!(p.matches("/v2/x"));
        assert!(!p.matches("/v2example"));
        assert!(!p.matches("/v"));
        let all = PathMatch::Prefix(String::new());
        assert!(all.matches("/"));
        assert!(all.matches("/anything"));
        assert!(PathMatch::Exact("/a".into()).matches("/a"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
        let r = PathMatch::Regex(Regex::new(r"^(?:/v\d+/.*)$").unwrap());
        assert!(r.matches("/v1/x"));
        assert!(!r.matches("/x/v1/x"));
    }

    #[test]
    fn headers_query_method_and_grpc() {
        let mut h = HeaderMap::new();
        h.insert("x-version", "v2".parse().unwrap());
        let m = Match {
            headers: vec![(
                HeaderName::from_static("x-version"),
                StrMatch::Exact("v2".into()),
            )],
            query: vec![("q".into(), StrMatch::Exact("a b".into()))],
            method: Some(Method::POST),
            ..Default::default()
        };
        assert!(m.matches(&view(&Method::POST, "/", Some("x=1&q=a+b"), &h)));
        assert!(m.matches(&view(&Method::POST, "/", Some("q=a%20b&q=zzz"), &h)));
        assert!(!m.matches(&view(&Method::GET, "/", Some("q=a+b"), &h)));
        assert!(!m.matches(&view(&Method::POST, "/", Some("q=zzz&q=a+b"), &h)));
        assert!(!m.matches(&view(&Method::POST, "/", None, &h)));
        assert!(!m.matches(&view(&Method::POST, "/", Some("q=a+b"), &HeaderMap::new())));
        let g = Match {
            grpc: Some(GrpcMatch {
                service: Some(StrMatch::Exact("test.Echo".into())),
                method: None,
            }),
            ..Default::default()
        };
        assert!(g.matches(&view(&Method::POST, "/test.Echo/Chat", None, &h)));
        assert!(!g.matches(&view(&Method::POST, "/test.Other/Chat", None, &h)));
        assert!(!g.matches(&view(&Method::POST, "/test.Echo/a/b", None, &h)));
        assert_eq!(decode("%zz%41"), "%zzA");
        assert_eq!(decode("%4"), "%4");
    }
}
