//! A small reference evaluator, written from the AuthorizationPolicy reference text
//! (https://istio.io/latest/docs/reference/config/security/authorization-policy/ ) and
//! independent of the waypoint's compiler: it reads the wire policy's strings directly, matches
//! IP blocks with plain integer masks and path templates with a regular expression. Plus the
//! proptest generators of policies and requests over small value sets (so that matches happen).

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use serde_json::json;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_core::identity::SpiffeId;

use super::{Req, SVC};
use crate::authn::RequestAuth;

/// "Exact match: abc matches abc; prefix match: abc* matches abc and abcd; suffix match: *abc
/// matches abc and xabc; presence match: * matches any value but empty."
fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn cidr_contains(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = block.split_once('/').unwrap_or((block, ""));
    let net: IpAddr = addr.parse().unwrap();
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len: u32 = if len.is_empty() {
                32
            } else {
                len.parse().unwrap()
            };
            let shift = 32 - len;
            (u64::from(u32::from(n)) >> shift) == (u64::from(u32::from(i)) >> shift)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len: u32 = if len.is_empty() {
                128
            } else {
                len.parse().unwrap()
            };
            len == 0 || (u128::from(n) >> (128 - len)) == (u128::from(i) >> (128 - len))
        }
        _ => false,
    }
}

/// "{*}" matches a single path segment, "{**}" any text in its place (as Envoy's URI
/// template regex: `[^/]+` and `.*`).
fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains('{') {
        return string_matches(pattern, path);
    }
    let mut re = String::from("^");
    for (i, seg) in pattern.split('/').enumerate() {
        if i > 0 {
            re.push('/');
        }
        match seg {
            "{*}" => re.push_str("[^/]+"),
            "{**}" => re.push_str(".*"),
            s => re.push_str(&regex::escape(s)),
        }
    }
    re.push('$');
    regex::Regex::new(&re).unwrap().is_match(path)
}

/// "If not set, any ... is allowed" for the positive list; the `not` list must not match.
fn list(pos: &[String], neg: &[String], matches: impl Fn(&str) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(|p| matches(p))) && !neg.iter().any(|p| matches(p))
}

fn source_matches(s: &pb::PolicySource, r: &Req) -> bool {
    let principal = r.peer.as_ref().map(|p| {
        format!(
            "{}/ns/{}/sa/{}",
            p.trust_domain(),
            p.namespace(),
            p.service_account()
        )
    });
    let strip = |v: &str| v.trim_start_matches("spiffe://").to_owned();
    list(&s.principals, &s.not_principals, |v| {
        principal
            .as_deref()
            .is_some_and(|p| string_matches(&strip(v), p))
    }) && list(&s.request_principals, &s.not_request_principals, |v| {
        r.auth
            .as_ref()
            .is_some_and(|a| string_matches(v, &a.principal))
    }) && list(&s.namespaces, &s.not_namespaces, |v| {
        r.peer
            .as_ref()
            .is_some_and(|p| string_matches(v, p.namespace()))
    }) && list(&s.ip_blocks, &s.not_ip_blocks, |v| {
        cidr_contains(v, r.source_ip)
    }) && list(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |v| {
        cidr_contains(v, r.source_ip)
    })
}

fn operation_matches(o: &pb::PolicyOperation, r: &Req) -> bool {
    list(&o.hosts, &o.not_hosts, |v| {
        string_matches(&v.to_lowercase(), &r.host.to_lowercase())
    }) && list(&o.ports, &o.not_ports, |v| {
        v == r.destination_port.to_string()
    }) && list(&o.methods, &o.not_methods, |v| string_matches(v, &r.method))
        && list(&o.paths, &o.not_paths, |v| path_matches(v, &r.path))
}

fn condition_matches(c: &pb::PolicyCondition, r: &Req) -> bool {
    let values: Vec<String> = match c.key.as_str() {
        "request.headers[x-k]" => {
            let v: Vec<&str> = r
                .headers
                .get_all("x-k")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            if v.is_empty() {
                vec![]
            } else {
                vec![v.join(",")]
            }
        }
        "source.namespace" => r.peer.iter().map(|p| p.namespace().to_owned()).collect(),
        "request.auth.claims[groups]" => r
            .auth
            .iter()
            .flat_map(|a| a.claims["groups"].as_array().unwrap())
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        "source.ip" => {
            return list(&c.values, &c.not_values, |v| cidr_contains(v, r.source_ip));
        }
        "destination.port" => {
            return list(&c.values, &c.not_values, |v| {
                v == r.destination_port.to_string()
            });
        }
        k => panic!("the generator made key {k}"),
    };
    list(&c.values, &c.not_values, |v| {
        values.iter().any(|x| string_matches(v, x))
    })
}

/// "A match occurs when at least one source, one operation and all conditions matches."
pub fn rule_matches(rule: &pb::PolicyRule, r: &Req) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r)))
        && rule.when.iter().all(|c| condition_matches(c, r))
}

/// "If there are any DENY policies that match the request, deny the request. If there are no
/// ALLOW policies for the workload, allow the request. If any of the ALLOW policies match the
/// request, allow the request. Deny the request." AUDIT and dry-run never decide.
pub fn allowed(policies: &[pb::WaypointPolicy], svc: &str, r: &Req) -> bool {
    let enforced: Vec<&pb::WaypointPolicy> = policies
        .iter()
        .filter(|p| p.all_services || p.services.iter().any(|s| s == svc))
        .filter(|p| !p.dry_run)
        .collect();
    let matches = |p: &pb::WaypointPolicy| p.rules.iter().any(|rule| rule_matches(rule, r));
    let action = |p: &pb::WaypointPolicy| pb::PolicyAction::try_from(p.action).unwrap();
    if enforced
        .iter()
        .any(|p| action(p) == pb::PolicyAction::Deny && matches(p))
    {
        return false;
    }
    let allows: Vec<_> = enforced
        .iter()
        .filter(|p| action(p) == pb::PolicyAction::Allow)
        .collect();
    allows.is_empty() || allows.iter().any(|p| matches(p))
}

/// Mostly nothing (so that sources and operations set few fields and often match), else one
/// or two values of `set`.
fn values(set: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    proptest::option::weighted(0.15, subsequence(set, 1..=2)).prop_map(|v| {
        v.unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect()
    })
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/y",
    "cluster.local/ns/a/*",
    "*/sa/y",
    "*",
];
const NAMESPACES: &[&str] = &["a", "b", "*", "a*"];
const BLOCKS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.0/24",
    "10.1.0.0/16",
    "::1/128",
    "0.0.0.0/0",
];
const REQUEST_PRINCIPALS: &[&str] = &["iss/alice", "iss/*", "*", "other/bob"];
const HOSTS: &[&str] = &["echo.default", "ECHO.default", "*.default", "echo*", "*"];
const PORTS: &[&str] = &["80", "8080"];
const METHODS: &[&str] = &["GET", "POST", "G*", "*"];
const PATHS: &[&str] = &[
    "/a", "/a/*", "/a/{*}", "/a/{**}", "/a/{*}/c", "/{**}/c", "*/c", "*",
];

fn source() -> impl Strategy<Value = pb::PolicySource> {
    (
        (
            values(PRINCIPALS),
            values(PRINCIPALS),
            values(REQUEST_PRINCIPALS),
        ),
        (
            values(REQUEST_PRINCIPALS),
            values(NAMESPACES),
            values(NAMESPACES),
        ),
        (
            values(BLOCKS),
            values(BLOCKS),
            values(BLOCKS),
            values(BLOCKS),
        ),
    )
        .prop_map(|((p, np, rp), (nrp, ns, nns), (ip, nip, rip, nrip))| {
            let mut s = pb::PolicySource {
                principals: p,
                not_principals: np,
                request_principals: rp,
                not_request_principals: nrp,
                namespaces: ns,
                not_namespaces: nns,
                ip_blocks: ip,
                not_ip_blocks: nip,
                remote_ip_blocks: rip,
                not_remote_ip_blocks: nrip,
                ..Default::default()
            };
            if s == pb::PolicySource::default() {
                s.namespaces = vec!["a".into()];
            }
            s
        })
}

fn operation() -> impl Strategy<Value = pb::PolicyOperation> {
    (
        (values(HOSTS), values(HOSTS), values(PORTS), values(PORTS)),
        (
            values(METHODS),
            values(METHODS),
            values(PATHS),
            values(PATHS),
        ),
    )
        .prop_map(|((h, nh, p, np), (m, nm, pa, npa))| {
            let mut o = pb::PolicyOperation {
                hosts: h,
                not_hosts: nh,
                ports: p,
                not_ports: np,
                methods: m,
                not_methods: nm,
                paths: pa,
                not_paths: npa,
            };
            if o == pb::PolicyOperation::default() {
                o.methods = vec!["GET".into()];
            }
            o
        })
}

fn condition() -> impl Strategy<Value = pb::PolicyCondition> {
    let keyed = |key: &'static str, set: &'static [&'static str]| {
        (values(set), values(set)).prop_map(move |(mut v, nv)| {
            if v.is_empty() && nv.is_empty() {
                v.push(set[0].to_owned());
            }
            pb::PolicyCondition {
                key: key.into(),
                values: v,
                not_values: nv,
            }
        })
    };
    prop_oneof![
        keyed("request.headers[x-k]", &["v", "v*", "w", "*"]),
        keyed("source.namespace", NAMESPACES),
        keyed("request.auth.claims[groups]", &["admin", "dev", "ops*"]),
        keyed("source.ip", BLOCKS),
        keyed("destination.port", PORTS),
    ]
}

fn rule() -> impl Strategy<Value = pb::PolicyRule> {
    (
        proptest::collection::vec(source(), 0..3),
        proptest::collection::vec(operation(), 0..3),
        proptest::collection::vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| pb::PolicyRule { from, to, when })
}

/// A random policy, for the whole waypoint or for `SVC` or another Service.
pub fn policy() -> impl Strategy<Value = pb::WaypointPolicy> {
    (
        select(&[0, 1, 2][..]),
        select(&[0, 0, 1, 1, 2][..]),
        any::<bool>(),
        0u32..100,
        proptest::collection::vec(rule(), 0..3),
    )
        .prop_map(|(scope, action, dry, id, rules)| pb::WaypointPolicy {
            waypoint: None,
            namespace: "default".into(),
            name: format!("p{id}"),
            all_services: scope == 0,
            services: match scope {
                0 => vec![],
                1 => vec![SVC.into()],
                _ => vec!["default/other.default.svc.cluster.local".into()],
            },
            action,
            dry_run: dry && id % 3 == 0,
            rules,
        })
}

const HEADERS: &[&[&str]] = &[&[], &["v"], &["w", "v"], &["vv"]];

/// A random request.
pub fn request() -> impl Strategy<Value = Req> {
    (
        (
            select(&[None, Some(("a", "x")), Some(("b", "y")), Some(("c", "z"))][..]),
            select(&["10.0.0.1", "10.0.0.9", "10.1.2.3", "::1"][..]),
            select(&[80u16, 8080][..]),
            select(&["GET", "POST", "PUT"][..]),
        ),
        (
            select(&["echo.default", "Echo.Default", "echo.default:80", "other"][..]),
            select(&["/a", "/a/b", "/a/b/c", "/x/c", "/", "/a/c"][..]),
            select(HEADERS),
            select(&[None, Some("alice"), Some("bob")][..]),
        ),
    )
        .prop_map(|((peer, ip, port, method), (host, path, hdrs, who))| {
            let mut headers = HeaderMap::new();
            for h in hdrs.iter() {
                headers.append("x-k", HeaderValue::from_static(h));
            }
            Req {
                peer: peer.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa).unwrap()),
                source_ip: ip.parse().unwrap(),
                destination_ip: "10.96.0.10".parse().unwrap(),
                destination_port: port,
                method: method.into(),
                host: host.into(),
                path: path.into(),
                headers,
                auth: who.map(|w| RequestAuth {
                    principal: format!("{}/{w}", if w == "alice" { "iss" } else { "other" }),
                    claims: json!({"groups": if w == "alice" { vec!["admin"] } else { vec!["ops1", "dev"] }})
                        .as_object()
                        .unwrap()
                        .clone(),
                    ..Default::default()
                }),
            }
        })
}
