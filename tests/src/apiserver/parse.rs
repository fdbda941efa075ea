//! The query side of the API-server double: selectors, query strings, continue tokens and
//! timestamps.

use std::collections::HashMap;

use serde_json::Value;

use super::ResourceType;

pub(super) fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}/{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(super) fn decode_continue(token: &str) -> Option<(u64, Option<(String, String)>)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((
        rv,
        Some((parts.next()?.to_owned(), parts.next()?.to_owned())),
    ))
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
pub(super) enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl LabelReq {
    pub(super) fn matches(&self, o: &Value) -> bool {
        let labels = &o["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::Absent(k) => get(k).is_none(),
        }
    }
}

/// Splits at commas outside parentheses.
pub(super) fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

pub(super) fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    let set = |v: &str| -> Result<Vec<String>, String> {
        let inner = v
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("{v:?}: a set must be in parentheses"))?;
        Ok(inner.split(',').map(|x| x.trim().to_owned()).collect())
    };
    split_top(s)
        .into_iter()
        .map(|r| {
            Ok(if let Some(k) = r.strip_prefix('!') {
                LabelReq::Absent(k.trim().to_owned())
            } else if let Some((k, v)) = r.split_once("!=") {
                LabelReq::Ne(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = r.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_owned(), set(v)?)
            } else if let Some((k, v)) = r.split_once(" in ") {
                LabelReq::In(k.trim().to_owned(), set(v)?)
            } else if r
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                LabelReq::Exists(r.to_owned())
            } else {
                return Err(format!("{r:?} is not a label requirement"));
            })
        })
        .collect()
}

/// One requirement of a field selector: (JSON pointer, value, equal?).
#[derive(Debug, Clone)]
pub(super) struct FieldReq {
    pointer: &'static str,
    value: String,
    equal: bool,
}

impl FieldReq {
    pub(super) fn matches(&self, o: &Value) -> bool {
        let v = o
            .pointer(self.pointer)
            .and_then(Value::as_str)
            .unwrap_or("");
        (v == self.value) == self.equal
    }
}

pub(super) fn parse_fields(ty: &ResourceType, s: &str) -> Result<Vec<FieldReq>, String> {
    split_top(s)
        .into_iter()
        .map(|r| {
            let (field, value, equal) = if let Some((f, v)) = r.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid selector: {r:?}; needs =, == or !="));
            };
            let pointer = match (ty.plural.as_str(), field.trim()) {
                (_, "metadata.name") => "/metadata/name",
                (_, "metadata.namespace") => "/metadata/namespace",
                ("pods", "spec.nodeName") => "/spec/nodeName",
                ("pods", "spec.serviceAccountName") => "/spec/serviceAccountName",
                ("pods", "status.phase") => "/status/phase",
                ("pods", "status.podIP") => "/status/podIP",
                (_, f) => return Err(format!("field label not supported: {f}")),
            };
            Ok(FieldReq {
                pointer,
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

pub(super) fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, b[i]) {
            (Some(x), _) => {
                out.push(x);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"nodeName": node}})
    }

    #[test]
    fn label_selectors() {
        let o = pod("a", json!({"app": "web", "tier": "1"}), "n1");
        let m = |s: &str| parse_labels(s).unwrap().iter().all(|r| r.matches(&o));
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, api),!missing"));
        assert!(!m("app notin (web)"));
        assert!(m("missing notin (x)"));
        assert!(!m("tier,missing"));
        assert!(parse_labels("a in b").is_err());
    }

    #[test]
    fn field_selectors() {
        let pods = ResourceType::new("", "v1", "Pod", "pods", true);
        let svcs = ResourceType::new("", "v1", "Service", "services", true);
        let o = pod("a", json!({}), "n1");
        let m = |s: &str| {
            parse_fields(&pods, s)
                .unwrap()
                .iter()
                .all(|r| r.matches(&o))
        };
        assert!(m("spec.nodeName=n1"));
        assert!(!m("spec.nodeName=n2"));
        assert!(m("spec.nodeName!=n2,metadata.name==a"));
        let e = parse_fields(&svcs, "spec.nodeName=n1").unwrap_err();
        assert_eq!(e, "field label not supported: spec.nodeName");
    }

    #[test]
    fn query_and_continue_tokens() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier&limit=5&watch=true&x=a+b");
        assert_eq!(q["labelSelector"], "app=web,tier");
        assert_eq!(q["limit"], "5");
        assert_eq!(q["x"], "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        let t = encode_continue(7, "ns", "a/b");
        assert_eq!(
            decode_continue(&t),
            Some((7, Some(("ns".into(), "a/b".into()))))
        );
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn timestamps_look_like_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
