//! Route filters (Gateway API `HTTPRouteFilter`): header modifiers, redirect (with the spec's
//! `Location` composition), URL rewrite (hostname, full path or `ReplacePrefixMatch`), and the
//! mirror's target.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::bound::Binding;

/// Request/ResponseHeaderModifier.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Applies set (replace), add (append), then remove.
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

/// HTTPPathModifier.
#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    /// Replaces the prefix the rule's PathPrefix match matched.
    Prefix(String),
}

impl PathModifier {
    /// The new path for `path`, where `matched` is the rule's PathPrefix (without its trailing
    /// `/`; empty for `/`). Gateway API's `ReplacePrefixMatch` table: `/foo/bar` with prefix
    /// `/foo` and replacement `/xyz` or `/xyz/` gives `/xyz/bar`; with an empty or `/`
    /// replacement gives `/bar`; `/foo` alone gives `/xyz` (or `/`).
    pub fn apply(&self, path: &str, matched: &str) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix(r) => {
                let rest = path.get(matched.len()..).unwrap_or("");
                let mut out = r.trim_end_matches('/').to_owned();
                out.push_str(rest);
                if out.is_empty() { "/".into() } else { out }
            }
        }
    }
}

/// RequestRedirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

impl Redirect {
    /// The `Location` for a request to `host` (its Host, port ignored) on `path` (+ `query`),
    /// received on Service port `svc_port` with `scheme`. Gateway API: an unset port is the
    /// redirect scheme's well-known port when the scheme is set, else the listener's (here the
    /// Service) port; the port is left out when it is the scheme's default (http 80,
    /// https 443).
    pub fn location(
        &self,
        scheme: &str,
        host: &str,
        svc_port: u16,
        path: &str,
        query: Option<&str>,
        matched_prefix: &str,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let host = self.hostname.as_deref().unwrap_or_else(|| strip_port(host));
        let port = self.port.unwrap_or(match self.scheme.as_deref() {
            Some("http") => 80,
            Some("https") => 443,
            _ => svc_port,
        });
        let default = matches!((scheme, port), ("http", 80) | ("https", 443));
        let path = match &self.path {
            Some(m) => m.apply(path, matched_prefix),
            None => path.to_owned(),
        };
        let mut loc = format!("{scheme}://{host}");
        if !default {
            loc.push_str(&format!(":{port}"));
        }
        loc.push_str(&path);
        if let Some(q) = query {
            loc.push('?');
            loc.push_str(q);
        }
        loc
    }
}

/// `host[:port]` without the port (IPv6 literals in brackets kept whole).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// URLRewrite.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// RequestMirror: a share of the requests is copied to `target`.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// None: the mirror's backend did not resolve (nothing is mirrored).
    pub target: Option<Binding>,
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether this request is mirrored (a random draw against the fraction).
    pub fn draw(&self) -> bool {
        self.target.is_some()
            && (self.denominator == 0
                || self.numerator >= self.denominator
                || rand::random_range(0..self.denominator) < self.numerator)
    }
}

/// One filter.
#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_prefix_match_table() {
        // Gateway API HTTPPathModifier examples.
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo", "/", "/bar"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "", "/xyz", "/xyz/foo"),
        ];
        for (path, prefix, repl, want) in cases {
            let got = PathModifier::Prefix(repl.into()).apply(path, prefix);
            assert_eq!(got, want, "{path} prefix {prefix} -> {repl}");
        }
        assert_eq!(
            PathModifier::Full("/new".into()).apply("/old/x", "/old"),
            "/new"
        );
    }

    #[test]
    fn header_modifier() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("b", "1".parse().unwrap());
        h.insert("c", "1".parse().unwrap());
        HeaderModifier {
            set: vec![(HeaderName::from_static("a"), "2".parse().unwrap())],
            add: vec![(HeaderName::from_static("b"), "2".parse().unwrap())],
            remove: vec![HeaderName::from_static("c")],
        }
        .apply(&mut h);
        assert_eq!(h.get_all("a").iter().collect::<Vec<_>>(), ["2"]);
        assert_eq!(h.get_all("b").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert!(!h.contains_key("c"));
    }

    #[test]
    fn redirect_location() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path: None,
            port,
            status: StatusCode::FOUND,
        };
        let loc = |rd: Redirect, svc_port| {
            rd.location("http", "echo:8080", svc_port, "/p", Some("q=1"), "")
        };
        // Scheme change: the well-known port, left out.
        assert_eq!(
            loc(r(Some("https"), None, None), 8080),
            "https://echo/p?q=1"
        );
        // Nothing set: the Service port.
        assert_eq!(loc(r(None, None, None), 8080), "http://echo:8080/p?q=1");
        assert_eq!(loc(r(None, None, None), 80), "http://echo/p?q=1");
        // Hostname and port.
        assert_eq!(
            loc(r(None, Some("example.org"), Some(8443)), 80),
            "http://example.org:8443/p?q=1"
        );
        assert_eq!(
            loc(r(Some("https"), None, Some(443)), 80),
            "https://echo/p?q=1"
        );
        let mut p = r(None, None, None);
        p.path = Some(PathModifier::Prefix("/new".into()));
        assert_eq!(
            p.location("http", "echo", 80, "/old/x", None, "/old"),
            "http://echo/new/x"
        );
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("h"), "h");
    }
}
