use http::{HeaderMap, Method};
use xds_proto::zmesh::waypoint::v1 as pb;

use super::*;

pub(crate) fn path(ty: pb::MatchType, v: &str) -> Option<pb::RouteMatch> {
    Some(pb::RouteMatch {
        path: Some(pb::PathMatch {
            r#type: ty as i32,
            value: v.into(),
        }),
        ..Default::default()
    })
}

pub(crate) fn svc_backend(host: &str, weight: u32) -> pb::Backend {
    pb::Backend {
        weight,
        target: Some(pb::backend::Target::Service(pb::BackendService {
            namespace: "default".into(),
            name: host.split('.').next().unwrap().into(),
            hostname: host.into(),
            port: 80,
        })),
        filters: Vec::new(),
    }
}

pub(crate) fn rule(
    name: &str,
    m: Option<pb::RouteMatch>,
    backends: Vec<pb::Backend>,
) -> pb::RouteRule {
    pb::RouteRule {
        route: Some(pb::RouteRef {
            kind: pb::RouteKind::HttpRoute as i32,
            namespace: "default".into(),
            name: name.into(),
            ..Default::default()
        }),
        r#match: m,
        backends,
        ..Default::default()
    }
}

fn routes(rules: Vec<pb::RouteRule>) -> pb::ServiceRoutes {
    pb::ServiceRoutes {
        namespace: "default".into(),
        name: "echo".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        rules,
    }
}

fn pick<'a>(
    r: &'a ServiceRoutes,
    port: u16,
    ns: Option<&str>,
    p: &str,
    h: &HeaderMap,
) -> Option<&'a str> {
    let (path, query) = p.split_once('?').map_or((p, None), |(a, b)| (a, Some(b)));
    let v = RequestView {
        method: &Method::GET,
        path,
        query,
        headers: h,
    };
    match r.select(port, ns, &v) {
        Decision::Rule(rule) => Some(rule.name.split(' ').nth(1).unwrap()),
        Decision::NotFound => Some("404"),
        Decision::NoRoute => None,
    }
}

#[test]
fn first_match_in_the_order_given_wins() {
    let mut hdr = rule("by-header", path(pb::MatchType::PathPrefix, "/"), vec![]);
    hdr.r#match.as_mut().unwrap().headers.push(pb::HeaderMatch {
        r#type: pb::MatchType::Exact as i32,
        name: "X-Version".into(),
        value: "v2".into(),
    });
    let r = compile(
        "default/echo",
        &routes(vec![
            rule("exact", path(pb::MatchType::Exact, "/a"), vec![]),
            rule("prefix", path(pb::MatchType::PathPrefix, "/a/"), vec![]),
            hdr,
            rule(
                "regex",
                path(pb::MatchType::RegularExpression, "/v[0-9]+"),
                vec![],
            ),
        ]),
    )
    .unwrap();
    let none = HeaderMap::new();
    let mut v2 = HeaderMap::new();
    v2.insert("x-version", "v2".parse().unwrap());
    assert_eq!(pick(&r, 80, None, "/a", &none), Some("default/exact"));
    assert_eq!(pick(&r, 80, None, "/a/b", &v2), Some("default/prefix"));
    assert_eq!(pick(&r, 80, None, "/x", &v2), Some("default/by-header"));
    assert_eq!(pick(&r, 80, None, "/v12", &none), Some("default/regex"));
    // Anchored: the whole path must match.
    assert_eq!(pick(&r, 80, None, "/v12/x", &none), Some("404"));
    assert_eq!(pick(&r, 80, None, "/ab", &none), Some("404"));
}

#[test]
fn ports_and_consumer_routes_scope_the_rules() {
    let mut on81 = rule("on81", path(pb::MatchType::PathPrefix, "/"), vec![]);
    on81.port = 81;
    let mut consumer = rule("consumer", path(pb::MatchType::Exact, "/c"), vec![]);
    consumer.consumer_namespace = "client-ns".into();
    let r = compile("default/echo", &routes(vec![consumer, on81])).unwrap();
    let h = HeaderMap::new();
    // Port 80 has no producer rule: plain proxy.
    assert_eq!(pick(&r, 80, Some("default"), "/c", &h), None);
    assert_eq!(
        pick(&r, 81, Some("default"), "/c", &h),
        Some("default/on81")
    );
    // Callers of client-ns see only their consumer rule, on every port.
    assert_eq!(
        pick(&r, 81, Some("client-ns"), "/c", &h),
        Some("default/consumer")
    );
    assert_eq!(pick(&r, 81, Some("client-ns"), "/other", &h), Some("404"));
    assert_eq!(
        pick(&r, 80, Some("client-ns"), "/c", &h),
        Some("default/consumer")
    );
    // No identity: producer rules.
    assert_eq!(pick(&r, 81, None, "/c", &h), Some("default/on81"));
}

#[test]
fn weights_zero_never_and_unresolved_kept() {
    let mut unresolved = svc_backend("x.default.svc.cluster.local", 1);
    unresolved.target = Some(pb::backend::Target::Unresolved("no ReferenceGrant".into()));
    let r = compile(
        "default/echo",
        &routes(vec![rule(
            "w",
            None,
            vec![
                svc_backend("echo-v1.default.svc.cluster.local", 0),
                svc_backend("echo-v2.default.svc.cluster.local", 3),
                unresolved,
            ],
        )]),
    )
    .unwrap();
    let first = &r.rules[0];
    let mut v2 = 0;
    for _ in 0..400 {
        match &first.pick().unwrap().target {
            Ok(b) => {
                assert_eq!(b.service.hostname, "echo-v2.default.svc.cluster.local");
                v2 += 1;
            }
            Err(why) => assert_eq!(why, "no ReferenceGrant"),
        }
    }
    // 3:1, loosely.
    assert!((200..400).contains(&v2), "{v2}");
    let zero = compile(
        "default/echo",
        &routes(vec![rule("z", None, vec![svc_backend("a.b", 0)])]),
    )
    .unwrap();
    assert!(zero.rules[0].pick().is_none());
}

#[test]
fn a_bad_resource_is_refused_whole_naming_the_field() {
    let bad = routes(vec![
        rule("good", path(pb::MatchType::Exact, "/a"), vec![]),
        rule(
            "bad",
            path(pb::MatchType::RegularExpression, "/(unclosed"),
            vec![],
        ),
    ]);
    let e = compile("default/echo", &bad).unwrap_err().to_string();
    assert!(
        e.contains("rules[1]") && e.contains("default/bad") && e.contains("match.path.value"),
        "{e}"
    );
    assert!(e.contains("bad regular expression"), "{e}");
    // The regex crate's error spans lines; the waypoint logs it and NACKs with it.
    assert!(
        !e.contains('\n') && e.contains("unclosed group"),
        "one line: {e}"
    );
    let mut rw = rule("rw", path(pb::MatchType::Exact, "/a"), vec![]);
    rw.filters.push(pb::Filter {
        kind: Some(pb::filter::Kind::UrlRewrite(pb::UrlRewrite {
            hostname: String::new(),
            path: Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/b".into())),
            }),
        })),
    });
    let e = compile("default/echo", &routes(vec![rw]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ReplacePrefixMatch needs a PathPrefix"), "{e}");
    let mut redirect = rule("rd", None, vec![]);
    redirect.filters.push(pb::Filter {
        kind: Some(pb::filter::Kind::RequestRedirect(pb::RequestRedirect {
            status_code: 404,
            ..Default::default()
        })),
    });
    let e = compile("default/echo", &routes(vec![redirect]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("redirect status 404"), "{e}");
    let mut unknown = rule("u", None, vec![]);
    unknown.filters.push(pb::Filter { kind: None });
    assert!(compile("default/echo", &routes(vec![unknown])).is_err());
}

#[test]
fn first_segment_index_keeps_precedence() {
    assert_eq!(super::first_segment("/a/b"), "a");
    assert_eq!(super::first_segment("/a"), "a");
    assert_eq!(super::first_segment("/"), "");
    // A regex rule (unindexed) between two indexed ones keeps its place in the order.
    let r = compile(
        "default/echo",
        &routes(vec![
            rule("p1", path(pb::MatchType::PathPrefix, "/a/b"), vec![]),
            rule(
                "re",
                path(pb::MatchType::RegularExpression, "/a/.*"),
                vec![],
            ),
            rule("p2", path(pb::MatchType::PathPrefix, "/a"), vec![]),
            rule("root", path(pb::MatchType::PathPrefix, "/"), vec![]),
            rule("ex", path(pb::MatchType::Exact, "/"), vec![]),
        ]),
    )
    .unwrap();
    let h = HeaderMap::new();
    assert_eq!(pick(&r, 80, None, "/a/b/c", &h), Some("default/p1"));
    assert_eq!(pick(&r, 80, None, "/a/x", &h), Some("default/re"));
    assert_eq!(pick(&r, 80, None, "/a", &h), Some("default/p2"));
    assert_eq!(pick(&r, 80, None, "/ab", &h), Some("default/root"));
    assert_eq!(pick(&r, 80, None, "/", &h), Some("default/root"));
}
