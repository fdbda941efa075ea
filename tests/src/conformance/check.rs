//! Reading a round's output and judging each answer against its [`Expect`]; weighted shares.

use std::collections::BTreeMap;

use super::script::Sent;
use super::{Expect, Protocol, Redirect, Weights};

/// One answer as the client saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status (gRPC: 200 for `grpc-status: 0`; 0 when nothing came back).
    pub status: u16,
    /// Response headers (lowercase names), in order.
    pub headers: Vec<(String, String)>,
    /// The echo app's `Key=Value` lines, in order.
    pub fields: Vec<(String, String)>,
    /// What the client printed on failure (for the report).
    pub raw: String,
}

impl Answer {
    fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The values of request header `name` the backend saw, joined with `,` (the suite's
    /// comparison), or `None` when it saw none.
    fn request_header(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .fields
            .iter()
            .filter(|(k, _)| k == "RequestHeader")
            .filter_map(|(_, v)| v.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect();
        (!vals.is_empty()).then(|| vals.join(","))
    }

    fn response_header(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!vals.is_empty()).then(|| vals.join(","))
    }
}

/// Cuts a round's output into (case index -> (output, exit code)).
pub fn split(out: &str) -> BTreeMap<usize, (String, i32)> {
    let mut res = BTreeMap::new();
    let mut cur: Option<(usize, String)> = None;
    for line in out.split_inclusive('\n') {
        let t = line.trim_end();
        if let Some(i) = t.strip_prefix("@@case ").and_then(|i| i.parse().ok()) {
            cur = Some((i, String::new()));
        } else if let Some(rest) = t.strip_prefix("@@rc ") {
            let mut it = rest.split(' ');
            if let (Some(i), Some(rc), Some((ci, body))) = (
                it.next().and_then(|i| i.parse::<usize>().ok()),
                it.next().and_then(|r| r.parse::<i32>().ok()),
                cur.take(),
            ) && i == ci
            {
                res.insert(i, (body, rc));
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
        }
    }
    res
}

fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Reads one answer: curl's `-i` output (status line, headers, body) or the gRPC client's
/// report.
pub fn parse(protocol: Protocol, out: &str, rc: i32) -> Answer {
    match protocol {
        Protocol::Grpc => {
            let fields = key_values(out);
            let ok = rc == 0
                && fields
                    .iter()
                    .any(|(k, v)| k == "Trailer" && v == "grpc-status:0");
            Answer {
                status: if ok { 200 } else { 0 },
                headers: vec![],
                fields,
                raw: out.to_owned(),
            }
        }
        Protocol::Http => {
            let mut a = Answer {
                raw: out.to_owned(),
                ..Answer::default()
            };
            if rc != 0 {
                return a;
            }
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out, ""));
            let mut lines = head.lines();
            a.status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            a.headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            a.fields = key_values(body);
            a
        }
    }
}

/// (scheme, host, port, path) of a `Location`; an absolute URL, or a path (then the request's
/// scheme, host and port).
fn location(loc: &str, sent: &Sent) -> (String, String, u16, String) {
    let Some((scheme, rest)) = loc.split_once("://") else {
        let path = loc.split('?').next().unwrap_or_default().to_owned();
        return (
            "http".into(),
            sent.target.name.clone(),
            sent.target.port,
            path,
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default = if scheme == "https" { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().unwrap_or(0)),
        None => (authority, default),
    };
    (
        scheme.to_owned(),
        host.to_owned(),
        port,
        path.split('?').next().unwrap_or_default().to_owned(),
    )
}

fn check_redirect(want: &Redirect, a: &Answer, sent: &Sent) -> Result<(), String> {
    let Some(loc) = a.response_header("location") else {
        return Err("no Location header".into());
    };
    let (scheme, host, port, path) = location(&loc, sent);
    let want_scheme = want.scheme.clone().unwrap_or_else(|| "http".into());
    let want_host = want
        .host
        .clone()
        .unwrap_or_else(|| sent.target.name.clone());
    let want_port = want.port.unwrap_or(match want.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => sent.target.port,
    });
    let want_path = want
        .path
        .clone()
        .unwrap_or_else(|| sent.path.split('?').next().unwrap_or_default().to_owned());
    if (&scheme, &host, port, &path) != (&want_scheme, &want_host, want_port, &want_path) {
        return Err(format!(
            "Location {loc:?} is {scheme}://{host}:{port}{path}, want \
             {want_scheme}://{want_host}:{want_port}{want_path}"
        ));
    }
    Ok(())
}

/// Whether `a` meets `want`; the error says the first thing that differs.
pub fn judge(want: &Expect, a: &Answer, sent: &Sent) -> Result<(), String> {
    if a.status != want.status {
        let tail: String = a.raw.chars().take(300).collect();
        return Err(format!(
            "status {} (want {}): {tail:?}",
            a.status, want.status
        ));
    }
    if let Some(b) = &want.backend {
        let host = a.field("Hostname").unwrap_or_default();
        if !host.starts_with(&format!("{b}-")) {
            return Err(format!("answered by {host:?}, want a pod of {b}"));
        }
    }
    if let Some(ns) = &want.namespace {
        let got = a.field("Namespace").unwrap_or_default();
        if got != ns {
            return Err(format!("backend namespace {got:?}, want {ns:?}"));
        }
    }
    if let Some(p) = &want.backend_path {
        let url = a.field("URL").unwrap_or_default();
        let got = url.split('?').next().unwrap_or_default();
        if got != p {
            return Err(format!("the backend got path {got:?}, want {p:?}"));
        }
    }
    for (k, v) in &want.request_headers {
        match a.request_header(k) {
            Some(got) if &got == v => {}
            got => return Err(format!("backend saw {k}: {got:?}, want {v:?}")),
        }
    }
    for k in &want.absent_request_headers {
        if let Some(got) = a.request_header(k) {
            return Err(format!("backend saw {k}: {got:?}, want it absent"));
        }
    }
    for (k, v) in &want.response_headers {
        match a.response_header(k) {
            Some(got) if &got == v => {}
            got => return Err(format!("response {k}: {got:?}, want {v:?}")),
        }
    }
    for k in &want.absent_response_headers {
        if let Some(got) = a.response_header(k) {
            return Err(format!("response {k}: {got:?}, want it absent"));
        }
    }
    if let Some(r) = &want.redirect {
        check_redirect(r, a, sent)?;
    }
    Ok(())
}

/// Each expected backend's count among `hostnames` (pod names), and the total.
pub fn shares(hostnames: &[String], w: &Weights) -> Result<BTreeMap<String, usize>, String> {
    let mut counts: BTreeMap<String, usize> = w.expect.keys().map(|k| (k.clone(), 0)).collect();
    for h in hostnames {
        match counts
            .iter_mut()
            .find(|(b, _)| h.starts_with(&format!("{b}-")))
        {
            Some((_, n)) => *n += 1,
            None => return Err(format!("an answer from {h:?}, not an expected backend")),
        }
    }
    Ok(counts)
}

/// Whether the observed split is within the tolerance of the weights.
pub fn judge_weights(hostnames: &[String], w: &Weights) -> Result<(), String> {
    let total = hostnames.len();
    if total < w.requests as usize {
        return Err(format!("{total} answers of {} requests", w.requests));
    }
    let counts = shares(hostnames, w)?;
    for (b, want) in &w.expect {
        let got = counts[b] as f64 / total as f64;
        if (got - want).abs() > w.tolerance {
            return Err(format!(
                "{b} got {got:.3} of {total}, want {want} ± {}: {counts:?}",
                w.tolerance
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::script::Target;

    fn sent(path: &str) -> Sent {
        Sent {
            target: Target {
                name: "echo".into(),
                port: 80,
                ip: "10.96.100.10".into(),
                namespace: "gateway-conformance-mesh".into(),
            },
            path: path.into(),
            log_id: None,
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-header-set: set\r\n\r\n\
        URL=/one/two?q=1\nRequestHeader=X-Header-Add:a\nRequestHeader=X-Header-Add:b\n\
        Hostname=echo-v1-abcde\nNamespace=gateway-conformance-mesh\n";

    fn expect(y: &str) -> Expect {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn split_cuts_cases_and_exit_codes() {
        let out =
            "@@case 0\nHTTP/1.1 200 OK\r\n\r\nA=b\n\n@@rc 0 0\n@@case 3\ncurl: (28)\n\n@@rc 3 28\n";
        let m = split(out);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&3].1, 28);
        assert!(m[&0].0.contains("A=b"));
    }

    #[test]
    fn answers_are_judged_like_the_suite_and_beyond() {
        let a = parse(Protocol::Http, OK, 0);
        assert_eq!(a.status, 200);
        let s = sent("/prefix/one/two?q=1");
        let good = expect(
            "backend: echo-v1\nnamespace: gateway-conformance-mesh\nbackendPath: /one/two\n\
             requestHeaders: {x-header-add: 'a,b'}\nabsentRequestHeaders: [X-Gone]\n\
             responseHeaders: {X-Header-Set: set}\n",
        );
        judge(&good, &a, &s).unwrap();
        for (bad, why) in [
            ("status: 404\n", "status 200"),
            ("backend: echo-v2\n", "want a pod of echo-v2"),
            (
                "backend: echo-v1\nbackendPath: /prefix/one/two\n",
                "got path",
            ),
            ("requestHeaders: {X-Header-Add: 'b,a'}\n", "backend saw"),
            ("absentRequestHeaders: [x-header-add]\n", "want it absent"),
            ("absentResponseHeaders: [X-Header-Set]\n", "want it absent"),
            ("redirect: {}\n", "no Location"),
        ] {
            let e = judge(&expect(bad), &a, &s).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse(Protocol::Http, "curl: (7)", 7).status, 0);
    }

    #[test]
    fn redirects_default_to_the_request_and_check_every_part() {
        let r = |loc: &str| {
            parse(
                Protocol::Http,
                &format!("HTTP/1.1 302 Found\r\nlocation: {loc}\r\n\r\n"),
                0,
            )
        };
        let s = sent("/redirect?x=1");
        let e = |y: &str| expect(&format!("status: 302\nredirect: {y}\n"));
        judge(&e("{}"), &r("http://echo/redirect"), &s).unwrap();
        judge(&e("{}"), &r("/redirect"), &s).unwrap();
        judge(
            &e("{host: example.org}"),
            &r("http://example.org/redirect"),
            &s,
        )
        .unwrap();
        judge(&e("{scheme: https}"), &r("https://echo/redirect"), &s).unwrap();
        judge(&e("{scheme: https}"), &r("https://echo:443/redirect"), &s).unwrap();
        judge(&e("{port: 8083}"), &r("http://echo:8083/redirect"), &s).unwrap();
        judge(&e("{path: /new}"), &r("http://echo/new"), &s).unwrap();
        for (want, loc) in [
            ("{scheme: https}", "https://echo:80/redirect"),
            ("{}", "http://example.org/redirect"),
            ("{port: 8083}", "http://echo/redirect"),
            ("{path: /new}", "http://echo/redirect"),
            ("{}", "https://echo/redirect"),
        ] {
            assert!(judge(&e(want), &r(loc), &s).is_err(), "{want} {loc}");
        }
    }

    #[test]
    fn grpc_reports_read_as_answers() {
        let out = "Hostname=echo-v2-x\nRequestHeader=X-Test-Case:multi\nEcho=c\nReplies=1\nTrailer=grpc-status:0\n";
        let a = parse(Protocol::Grpc, out, 0);
        assert_eq!(a.status, 200);
        judge(
            &expect("backend: echo-v2\nrequestHeaders: {x-test-case: multi}\n"),
            &a,
            &sent("/"),
        )
        .unwrap();
        assert_eq!(
            parse(Protocol::Grpc, "Trailer=grpc-status:14\n", 0).status,
            0
        );
        assert_eq!(parse(Protocol::Grpc, out, 1).status, 0);
    }

    #[test]
    fn weights_need_every_share_within_tolerance() {
        let w: Weights = serde_yaml::from_str(
            "request: {}\nexpect: {echo-v1: 0.7, echo-v2: 0.3}\nrequests: 100\n",
        )
        .unwrap();
        let hosts = |v1: usize, v2: usize| {
            let mut h = vec!["echo-v1-a".to_owned(); v1];
            h.extend(vec!["echo-v2-b".to_owned(); v2]);
            h
        };
        judge_weights(&hosts(70, 30), &w).unwrap();
        judge_weights(&hosts(74, 26), &w).unwrap();
        assert!(judge_weights(&hosts(50, 50), &w).is_err());
        assert!(judge_weights(&hosts(70, 20), &w).is_err());
        let mut other = hosts(70, 29);
        other.push("echo-v3-c".into());
        assert!(
            judge_weights(&other, &w)
                .unwrap_err()
                .contains("not an expected")
        );
    }
}
