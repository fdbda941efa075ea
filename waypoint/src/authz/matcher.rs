//! The value matchers of L7 authorization: Istio's string forms, IP blocks, ports, path
//! templates and path normalization
//! (https://istio.io/latest/docs/reference/config/security/authorization-policy/ ,
//! https://istio.io/latest/docs/reference/config/security/normalization/ ).

use std::net::IpAddr;

use zmesh_core::policy::{IpNet, StringMatch};

/// Istio's string forms: `exact`, `prefix*`, `*suffix`, `*` (any non-empty value). An empty
/// string is refused (it would match nothing, or everything, depending on the reader).
pub fn string_match(v: &str) -> Result<StringMatch, String> {
    if v.is_empty() {
        return Err("an empty string is not a valid value".into());
    }
    Ok(if v == "*" {
        StringMatch::Presence
    } else if let Some(s) = v.strip_prefix('*') {
        StringMatch::Suffix(s.to_owned())
    } else if let Some(p) = v.strip_suffix('*') {
        StringMatch::Prefix(p.to_owned())
    } else {
        StringMatch::Exact(v.to_owned())
    })
}

/// Like [`string_match`], lowercased: for values compared case-insensitively (hosts).
pub fn string_match_lower(v: &str) -> Result<StringMatch, String> {
    string_match(&v.to_ascii_lowercase())
}

/// A CIDR (`10.0.0.0/8`) or a bare address (one host).
pub fn ip_block(v: &str) -> Result<IpNet, String> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (
            a,
            Some(
                l.parse::<u8>()
                    .map_err(|_| format!("{v:?}: the prefix length is not a number"))?,
            ),
        ),
        None => (v, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{v:?} is not an IP address or CIDR block"))?;
    let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
    IpNet::new(addr, len).map_err(|e| format!("{v:?}: {e}"))
}

/// A port: decimal 0-65535.
pub fn port(v: &str) -> Result<u16, String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a port number"));
    }
    v.parse()
        .map_err(|_| format!("{v:?} is not a port number (0-65535)"))
}

/// One element of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{*}`: exactly one non-empty path segment.
    One,
    /// `{**}`: any text, `/` included; only as the last operator.
    Rest,
}

/// A `paths` value: a string form, or (containing `{*}` or `{**}`) a path template in the
/// style of Envoy's URI templates, as the AuthorizationPolicy reference describes: `{*}`
/// matches a single (non-empty) path segment, `{**}` the rest of the path, `/` included, and
/// must be the last operator;
/// each operator is a whole segment (`/a/{*}/b`, `/a/{**}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `exact`, `prefix*`, `*suffix`, `*`.
    String(StringMatch),
    /// `{*}` / `{**}` segments.
    Template(Vec<Segment>),
}

impl PathMatch {
    /// Parses a `paths` value; the error says what is wrong with it.
    pub fn parse(v: &str) -> Result<PathMatch, String> {
        if !v.contains('{') && !v.contains('}') {
            return string_match(v).map(PathMatch::String);
        }
        let Some(rest) = v.strip_prefix('/') else {
            return Err(format!("path template {v:?} must start with '/'"));
        };
        let mut segs = Vec::new();
        let mut seen_rest = false;
        for s in rest.split('/') {
            let seg = match s {
                "{*}" => Segment::One,
                "{**}" => Segment::Rest,
                s if s.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "path template {v:?}: segment {s:?} mixes an operator with text (use \
                         {{*}} or {{**}} as a whole segment)"
                    ));
                }
                s => Segment::Literal(s.to_owned()),
            };
            if seen_rest && matches!(seg, Segment::One | Segment::Rest) {
                return Err(format!(
                    "path template {v:?}: {{**}} must be the last operator"
                ));
            }
            seen_rest |= seg == Segment::Rest;
            segs.push(seg);
        }
        Ok(PathMatch::Template(segs))
    }

    /// Whether the (normalized, query-less) `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(segs) => match path.strip_prefix('/') {
                Some(rest) => template_matches(segs, &rest.split('/').collect::<Vec<_>>()),
                None => false,
            },
        }
    }
}

fn template_matches(segs: &[Segment], parts: &[&str]) -> bool {
    match segs.split_first() {
        None => parts.is_empty(),
        Some((Segment::Literal(l), tail)) => {
            parts.first().is_some_and(|p| p == l) && template_matches(tail, &parts[1..])
        }
        Some((Segment::One, tail)) => {
            parts.first().is_some_and(|p| !p.is_empty()) && template_matches(tail, &parts[1..])
        }
        // `{**}` stands for any text, `/` included, in place of one segment: it takes one or
        // more of the `/`-separated parts (one may be empty: `/a/{**}` matches `/a/` but not
        // `/a`), as Envoy's URI template turns it into a regex.
        Some((Segment::Rest, tail)) => {
            (1..=parts.len()).any(|n| template_matches(tail, &parts[n..]))
        }
    }
}

/// Why a request path cannot be authorized (Istio answers 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath(pub &'static str);

/// Istio's default (`BASE`) path normalization, applied before policies see the path and to
/// the path sent upstream: the query is left out of matching; `%00` is refused; the
/// percent-encoded unreserved characters (`%2d` `-`, `%2e` `.`, `%30`-`%39`, `%41`-`%5a`,
/// `%5f` `_`, `%61`-`%7a`, `%7e` `~`, case-insensitive) are decoded once; `\` becomes `/`; `.`
/// and `..` segments are resolved as RFC 3986 §5.2.4 says. `%2f`, `%5c` stay encoded and
/// repeated slashes are kept (the `DECODE_AND_MERGE_SLASHES` options, not the default).
pub fn normalize_path(path: &str) -> Result<String, BadPath> {
    // Most paths have nothing to decode, no backslash and no dot segment: they are normal as
    // they are (what the full pass below would give, a property test says).
    if path.starts_with('/')
        && !path.bytes().any(|b| b == b'%' || b == b'\\')
        && !path.contains("/.")
    {
        return Ok(path.to_owned());
    }
    normalize_in_full(path)
}

fn normalize_in_full(path: &str) -> Result<String, BadPath> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' && i + 2 < b.len() {
            let hex = |x: u8| (x as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let d = (h * 16 + l) as u8;
                if d == 0 {
                    return Err(BadPath("the path contains %00"));
                }
                if d.is_ascii_alphanumeric() || matches!(d, b'-' | b'.' | b'_' | b'~') {
                    out.push(d as char);
                } else {
                    out.push_str(&path[i..i + 3]);
                }
                i += 3;
                continue;
            }
        }
        let ch = path[i..].chars().next().expect("i is on a char boundary");
        out.push(if ch == '\\' { '/' } else { ch });
        i += ch.len_utf8();
    }
    Ok(remove_dot_segments(&out))
}

/// RFC 3986 §5.2.4 on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = segs.len() - 1;
    for (i, s) in segs.iter().enumerate() {
        match *s {
            "." | ".." => {
                if *s == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The shortcut for paths already normal gives what the full pass gives.
        #[test]
        fn the_shortcut_agrees_with_the_full_pass(path in "/[a-z./%2eE\\\\]{0,12}") {
            proptest::prop_assert_eq!(normalize_path(&path), normalize_in_full(&path));
        }
    }

    #[test]
    fn string_forms() {
        assert_eq!(string_match("*").unwrap(), StringMatch::Presence);
        assert_eq!(string_match("a*").unwrap(), StringMatch::Prefix("a".into()));
        assert_eq!(string_match("*a").unwrap(), StringMatch::Suffix("a".into()));
        assert_eq!(string_match("a").unwrap(), StringMatch::Exact("a".into()));
        assert!(string_match("").is_err());
        assert_eq!(
            string_match_lower("Foo.COM").unwrap(),
            StringMatch::Exact("foo.com".into())
        );
    }

    #[test]
    fn ips_and_ports() {
        assert!(
            ip_block("10.0.0.0/8")
                .unwrap()
                .contains("10.1.2.3".parse().unwrap())
        );
        assert!(
            !ip_block("10.0.0.1")
                .unwrap()
                .contains("10.0.0.2".parse().unwrap())
        );
        assert!(ip_block("10.0.0.0/33").is_err());
        assert!(ip_block("nope").is_err());
        assert_eq!(port("8080"), Ok(8080));
        assert!(port("80a").is_err());
        assert!(port("70000").is_err());
        assert!(port("").is_err());
    }

    #[test]
    fn templates() {
        let t = PathMatch::parse("/foo/{*}/bar").unwrap();
        assert!(t.matches("/foo/x/bar"));
        assert!(!t.matches("/foo/x/y/bar"));
        assert!(!t.matches("/foo//bar"));
        let t = PathMatch::parse("/foo/{**}").unwrap();
        assert!(t.matches("/foo/"));
        assert!(t.matches("/foo/a/b/c"));
        assert!(!t.matches("/foobar"));
        assert!(!t.matches("/bar/foo/a"));
        assert!(!t.matches("/foo"));
        let t = PathMatch::parse("/foo/{**}/x.txt").unwrap();
        assert!(!t.matches("/foo/x.txt"));
        assert!(t.matches("/foo/a/x.txt"));
        assert!(t.matches("/foo/a/b/x.txt"));
        assert!(!t.matches("/foo/a/b/y.txt"));
        let t = PathMatch::parse("/{*}").unwrap();
        assert!(t.matches("/a"));
        assert!(!t.matches("/a/b"));
        assert!(!t.matches("/"));
        for bad in [
            "/foo{*}",
            "/a/{**}/{*}",
            "/a/{**}/{**}",
            "foo/{*}",
            "/a/{x}",
            "/a/b*/{*}",
        ] {
            assert!(PathMatch::parse(bad).is_err(), "{bad}");
        }
        let s = PathMatch::parse("/api/*").unwrap();
        assert!(s.matches("/api/x/y"));
    }

    #[test]
    fn base_normalization() {
        let n = |p: &str| normalize_path(p).unwrap();
        assert_eq!(n("/some%2fdata/%61%62%63"), "/some%2fdata/abc");
        assert_eq!(n("/%2E%2e/admin"), "/admin");
        assert_eq!(n("/some\\data"), "/some/data");
        assert_eq!(n("/public/./data/abc/../xyz"), "/public/data/xyz");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/some//data"), "/some//data");
        assert_eq!(n("/%7e%5F%2D"), "/~_-");
        assert_eq!(n("/%zz%4"), "/%zz%4");
        assert_eq!(n("/é"), "/é");
        assert_eq!(
            normalize_path("/a%00b"),
            Err(BadPath("the path contains %00"))
        );
    }
}
