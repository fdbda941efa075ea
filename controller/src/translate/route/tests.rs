//! Route translation: precedence, producer/consumer, refusal, backend resolution, status.

use std::time::Duration;

use super::*;
use crate::translate::{MeshConfig, translate};

/// A world: namespace `shop` bound to waypoint `wp`; Services `echo` (80, 8080),
/// `echo-v1`, `echo-v2` (80) in `shop`; `other` in `far` (80, not bound); namespace `client`.
const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: client}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: far}
spec: {clusterIP: 10.96.0.13, ports: [{name: http, port: 80}]}
";

fn routes(extra: &str) -> Routes {
    let objects = Objects::from_yaml(&format!("{WORLD}---\n{extra}")).unwrap();
    translate(&objects, &MeshConfig::default()).routes
}

fn id(kind: RouteKind, ns: &str, name: &str) -> RouteId {
    RouteId {
        kind,
        namespace: ns.into(),
        name: name.into(),
    }
}

const ECHO: &str = "shop/echo.shop.svc.cluster.local";

fn http_route(ns: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, \
         namespace: {ns}, creationTimestamp: '{created}', generation: 4}}\nspec: {spec}\n---\n"
    )
}

const PARENT: &str = "parentRefs: [{group: '', kind: Service, name: echo, namespace: shop}]";

/// The (route name, rule index, path) of each HTTP entry, in table order.
fn order(r: &Routes) -> Vec<(String, usize, String)> {
    r.services[ECHO]
        .http
        .iter()
        .map(|e| {
            let Match::Http { path, .. } = &e.matched else {
                panic!("http entry with a grpc match")
            };
            (e.route.name.clone(), e.rule_index, path.clone())
        })
        .collect()
}

#[test]
fn http_precedence_follows_the_spec() {
    let be = "backendRefs: [{name: echo-v1, port: 80}]";
    let yaml = [
        // Newest route: its catch-all and its long prefix.
        http_route(
            "shop",
            "new",
            "2026-03-01T00:00:00Z",
            &format!(
                "{{{PARENT}, rules: [{{{be}}}, {{matches: [{{path: {{type: PathPrefix, value: \
                 /api/v1/long}}}}], {be}}}]}}"
            ),
        ),
        // Older route: exact, shorter prefix, prefix + method, prefix + 2 headers,
        // prefix + 1 header + 1 query, regex.
        http_route(
            "shop",
            "old",
            "2026-01-01T00:00:00Z",
            &format!(
                "{{{PARENT}, rules: [\
                 {{matches: [{{path: {{type: PathPrefix, value: /api}}}}], {be}}},\
                 {{matches: [{{path: {{type: RegularExpression, value: '/re/.*'}}}}], {be}}},\
                 {{matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: a, \
                 value: x}}, {{name: b, value: y}}]}}], {be}}},\
                 {{matches: [{{path: {{type: PathPrefix, value: /api}}, method: GET}}], {be}}},\
                 {{matches: [{{path: {{type: Exact, value: /x}}}}], {be}}},\
                 {{matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: a, \
                 value: x}}], queryParams: [{{name: q, value: z}}]}}], {be}}}]}}"
            ),
        ),
        // Same age and specificity as `old`'s bare /api: name order decides (`aaa` first).
        http_route(
            "shop",
            "aaa",
            "2026-01-01T00:00:00Z",
            &format!(
                "{{{PARENT}, rules: [{{matches: [{{path: {{type: PathPrefix, value: /api}}}}], \
                 {be}}}]}}"
            ),
        ),
    ]
    .concat();
    let r = routes(&yaml);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    let got = order(&r);
    let want: Vec<(String, usize, String)> = [
        ("old", 4, "/x"),           // Exact
        ("new", 1, "/api/v1/long"), // longest prefix, though the newest route
        ("old", 3, "/api"),         // method
        ("old", 2, "/api"),         // 2 headers
        ("old", 5, "/api"),         // 1 header + 1 query
        ("aaa", 0, "/api"),         // tie: same age, `shop/aaa` < `shop/old`
        ("old", 0, "/api"),
        ("new", 0, "/"),      // catch-all prefix
        ("old", 1, "/re/.*"), // regex last
    ]
    .into_iter()
    .map(|(n, i, p)| (n.to_owned(), i, p.to_owned()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn older_route_wins_a_tie_and_rule_order_breaks_the_rest() {
    let spec = format!(
        "{{{PARENT}, rules: [{{matches: [{{path: {{value: /a}}}}, {{path: {{value: /b}}}}], \
         backendRefs: [{{name: echo-v1, port: 80}}]}}, {{matches: [{{path: {{value: /a}}}}]}}]}}"
    );
    let yaml = [
        http_route("shop", "zzz", "2025-01-01T00:00:00Z", &spec),
        http_route("shop", "aaa", "2026-01-01T00:00:00Z", &spec),
    ]
    .concat();
    let got = order(&routes(&yaml));
    let names: Vec<(&str, usize, &str)> = got
        .iter()
        .map(|(n, i, p)| (n.as_str(), *i, p.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("zzz", 0, "/a"),
            ("zzz", 0, "/b"),
            ("zzz", 1, "/a"),
            ("aaa", 0, "/a"),
            ("aaa", 0, "/b"),
            ("aaa", 1, "/a"),
        ]
    );
}

#[test]
fn grpc_precedence_and_consumer_routes() {
    let grpc = |ns: &str, name: &str, created: &str, matches: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}, \
             namespace: {ns}, creationTimestamp: '{created}'}}\nspec: {{{PARENT}, rules: \
             [{{matches: {matches}, backendRefs: [{{name: echo-v1, namespace: shop, port: 80}}]}}]}}\n---\n"
        )
    };
    let yaml = [
        grpc(
            "shop",
            "svc",
            "2026-01-01T00:00:00Z",
            "[{method: {service: a.B}}]",
        ),
        grpc(
            "shop",
            "both",
            "2026-02-01T00:00:00Z",
            "[{method: {service: a.B, method: Get}}]",
        ),
        grpc("shop", "any", "2025-01-01T00:00:00Z", "[]"),
        grpc("client", "mine", "2026-05-01T00:00:00Z", "[]"),
    ]
    .concat();
    let r = routes(&yaml);
    let t = &r.services[ECHO];
    let names: Vec<&str> = t.grpc.iter().map(|e| e.route.name.as_str()).collect();
    assert_eq!(names, ["mine", "both", "svc", "any"]);
    assert_eq!(t.grpc[0].consumer_namespace.as_deref(), Some("client"));
    assert!(t.grpc[1..].iter().all(|e| e.consumer_namespace.is_none()));
    // The consumer route's backend is in `shop`, another namespace, without a grant.
    let mine = &r.statuses[&id(RouteKind::Grpc, "client", "mine")].parents[0];
    assert!(mine.accepted.status, "{:?}", mine.accepted);
    assert!(mine.accepted.message.contains("consumer"));
    assert_eq!(
        (mine.resolved_refs.status, mine.resolved_refs.reason),
        (false, "RefNotPermitted")
    );
    assert_eq!(
        t.grpc[0].rule.backends[0]
            .target
            .as_ref()
            .unwrap_err()
            .reason,
        "RefNotPermitted"
    );
}

/// GEP-1426 "Namespace boundaries": mesh routes need no ReferenceGrant where they reach no
/// broader scope. A consumer route whose backendRef is its own parent Service sends its
/// namespace's clients where they were going anyway (upstream's MeshConsumerRoute manifest
/// has no grant); another Service of that namespace still needs one (see below).
#[test]
fn consumer_route_to_its_own_parent_needs_no_reference_grant() {
    let route = http_route(
        "client",
        "r",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [{{backendRefs: [{{name: echo, namespace: shop, port: 80}}, \
             {{name: echo-v2, namespace: shop, port: 80}}]}}]}}"
        ),
    );
    let r = routes(&route);
    let backends = &r.services[ECHO].http[0].rule.backends;
    assert_eq!(
        backends[0].target.as_ref().map(|t| t.hostname.as_str()),
        Ok("echo.shop.svc.cluster.local"),
    );
    assert_eq!(
        backends[1].target.as_ref().unwrap_err().reason,
        "RefNotPermitted"
    );
}

#[test]
fn reference_grant_permits_cross_namespace_backends() {
    let route = http_route(
        "client",
        "r",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [{{backendRefs: [{{name: echo-v2, namespace: shop, port: 80}}]}}]}}"
        ),
    );
    let grant = |from_kind: &str, to_name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: \
             {{name: g, namespace: shop}}\nspec: {{from: [{{group: gateway.networking.k8s.io, \
             kind: {from_kind}, namespace: client}}], to: [{{group: '', kind: Service{to_name}}}]}}\n"
        )
    };
    let target = |r: &Routes| r.services[ECHO].http[0].rule.backends[0].target.clone();
    assert_eq!(
        target(&routes(&route)).unwrap_err().reason,
        "RefNotPermitted"
    );
    let ok = routes(&format!("{route}{}", grant("HTTPRoute", "")));
    assert_eq!(
        target(&ok).unwrap().hostname,
        "echo-v2.shop.svc.cluster.local"
    );
    let status = &ok.statuses[&id(RouteKind::Http, "client", "r")].parents[0];
    assert_eq!(status.resolved_refs.reason, "ResolvedRefs");
    // A grant for another kind, or another Service, permits nothing.
    for g in [
        grant("GRPCRoute", ""),
        grant("HTTPRoute", ", name: echo-v1"),
    ] {
        let r = routes(&format!("{route}{g}"));
        assert_eq!(target(&r).unwrap_err().reason, "RefNotPermitted", "{g}");
    }
}

#[test]
fn unresolved_backends_are_kept_with_their_reason_and_weights() {
    let r = routes(&http_route(
        "shop",
        "r",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [{{backendRefs: [{{name: echo-v1, port: 80, weight: 0}}, \
             {{name: nope, port: 80, weight: 3}}, {{name: echo-v2, port: 81}}, \
             {{group: example.com, kind: Bucket, name: b}}, {{name: echo-v2, port: 80}}]}}]}}"
        ),
    ));
    let b = &r.services[ECHO].http[0].rule.backends;
    assert_eq!(
        b.iter().map(|b| b.weight).collect::<Vec<_>>(),
        [0, 3, 1, 1, 1]
    );
    let reasons: Vec<&str> = b
        .iter()
        .map(|b| b.target.as_ref().map_or_else(|u| u.reason, |_| "ok"))
        .collect();
    assert_eq!(
        reasons,
        [
            "ok",
            "BackendNotFound",
            "BackendNotFound",
            "InvalidKind",
            "ok"
        ]
    );
    let s = &r.statuses[&id(RouteKind::Http, "shop", "r")].parents[0];
    assert!(s.accepted.status);
    assert_eq!(
        (s.resolved_refs.status, s.resolved_refs.reason),
        (false, "BackendNotFound")
    );
    assert!(
        s.resolved_refs.message.contains("shop/nope"),
        "{}",
        s.resolved_refs.message
    );
}

#[test]
fn a_route_that_cannot_be_applied_is_refused_whole() {
    let cases = [
        (
            "{type: RegularExpression, value: '/a(['}",
            "not a valid regular expression",
        ),
        (
            "{type: Suffix, value: /a}",
            "is not Exact, PathPrefix or RegularExpression",
        ),
    ];
    for (path, why) in cases {
        let r = routes(&http_route(
            "shop",
            "bad",
            "2026-01-01T00:00:00Z",
            &format!(
                "{{{PARENT}, rules: [{{backendRefs: [{{name: echo-v1, port: 80}}]}}, \
                 {{matches: [{{path: {path}}}]}}]}}"
            ),
        ));
        assert!(!r.services.contains_key(ECHO), "nothing of it is served");
        let s = &r.statuses[&id(RouteKind::Http, "shop", "bad")].parents[0];
        assert_eq!(
            (s.accepted.status, s.accepted.reason),
            (false, "UnsupportedValue")
        );
        assert!(s.accepted.message.contains(why), "{}", s.accepted.message);
        // The regex crate's error spans lines; the controller logs this message.
        assert!(
            !s.accepted.message.contains('\n'),
            "one line: {}",
            s.accepted.message
        );
        assert!(
            s.accepted.message.contains("rules[1].matches[0].path"),
            "{}",
            s.accepted.message
        );
    }
    let refused = |rule: &str| {
        let r = routes(&http_route(
            "shop",
            "bad",
            "2026-01-01T00:00:00Z",
            &format!("{{{PARENT}, rules: [{rule}]}}"),
        ));
        assert!(!r.services.contains_key(ECHO), "{rule}");
        r.refused[&id(RouteKind::Http, "shop", "bad")].clone()
    };
    let msg =
        refused("{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]}");
    assert!(msg.contains("\"ExtensionRef\" is not supported"), "{msg}");
    let msg = refused("{sessionPersistence: {sessionName: s}}");
    assert!(msg.contains("sessionPersistence"), "{msg}");
    let msg = refused("{timeouts: {request: 10 s}}");
    assert!(msg.contains("timeouts.request"), "{msg}");
    let msg = refused("{timeouts: {request: 1s, backendRequest: 2s}}");
    assert!(msg.contains("longer than request"), "{msg}");
    let msg = refused("{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}");
    assert!(msg.contains("305"), "{msg}");
    let msg = refused(
        "{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: \
         {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}",
    );
    assert!(msg.contains("ReplacePrefixMatch"), "{msg}");
    let msg = refused("{retry: {codes: [200]}}");
    assert!(msg.contains("retry.codes"), "{msg}");
}

#[test]
fn parents_not_bound_missing_or_with_a_wrong_port_are_not_accepted() {
    let spec = "{parentRefs: [{group: '', kind: Service, name: other, namespace: far}, \
                {group: '', kind: Service, name: echo, port: 9999}, \
                {group: '', kind: Service, name: echo, port: 8080}, \
                {name: some-gateway}, {kind: Service, name: echo}], \
                rules: [{backendRefs: [{name: echo-v1, port: 80}]}]}";
    let r = routes(&http_route("shop", "r", "2026-01-01T00:00:00Z", spec));
    let s = &r.statuses[&id(RouteKind::Http, "shop", "r")];
    assert_eq!(s.generation, Some(4));
    assert_eq!(s.parents.len(), 4, "the Gateway parent is not ours");
    assert_eq!(s.parents[3].accepted.reason, "UnsupportedValue");
    assert!(
        s.parents[3].accepted.message.contains("group: \"\""),
        "{}",
        s.parents[3].accepted.message
    );
    assert_eq!(s.parents[0].accepted.reason, "NoMatchingParent");
    assert!(
        s.parents[0]
            .accepted
            .message
            .contains("istio.io/use-waypoint")
    );
    assert_eq!(s.parents[1].accepted.reason, "NoMatchingParent");
    assert!(s.parents[1].accepted.message.contains("no port 9999"));
    assert_eq!(s.parents[2].accepted.reason, "Accepted");
    let e = &r.services[ECHO].http;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].port, Some(8080));
    assert!(!r.services.contains_key("far/other.far.svc.cluster.local"));
}

#[test]
fn filters_timeouts_and_retries_are_compiled() {
    let r = routes(&http_route(
        "shop",
        "r",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [{{\
             filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x, \
             value: '1'}}], remove: [y]}}}}, {{type: RequestMirror, requestMirror: {{backendRef: \
             {{name: echo-v2, port: 80}}, percent: 25}}}}], \
             backendRefs: [{{name: echo-v1, port: 80, filters: [{{type: ResponseHeaderModifier, \
             responseHeaderModifier: {{add: [{{name: z, value: v}}]}}}}]}}], \
             timeouts: {{request: 1m30s, backendRequest: 500ms}}, \
             retry: {{codes: [503], attempts: 3, backoff: 100ms}}}}]}}"
        ),
    ));
    let rule = &r.services[ECHO].http[0].rule;
    assert_eq!(rule.request_timeout, Some(Duration::from_secs(90)));
    assert_eq!(rule.backend_timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        rule.retry,
        Some(RetryPolicy {
            codes: vec![503],
            attempts: 3,
            backoff: Some(Duration::from_millis(100))
        })
    );
    assert!(matches!(&rule.filters[0], Filter::RequestHeaders(h) if h.remove == ["y"]));
    let Filter::Mirror {
        numerator,
        denominator,
        target,
        ..
    } = &rule.filters[1]
    else {
        panic!("{:?}", rule.filters[1])
    };
    assert_eq!((*numerator, *denominator), (25, 100));
    assert_eq!(target.as_ref().unwrap().name, "echo-v2");
    assert!(matches!(&rule.backends[0].filters[0], Filter::ResponseHeaders(h) if h.add.len() == 1));
}

#[test]
fn durations_follow_gep_2257() {
    let ok = [
        ("0s", 0),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("250ms", 250),
        ("1m1s1ms", 61_001),
    ];
    for (text, ms) in ok {
        assert_eq!(
            duration("d", text).unwrap(),
            Duration::from_millis(ms),
            "{text}"
        );
    }
    for bad in ["", "1", "s", "1.5s", "123456s", "1d", "1s1s1s1s1s", "-1s"] {
        assert!(duration("d", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_wire_keeps_the_order_and_says_everything() {
    use xds_proto::zmesh::waypoint::v1 as pb;
    let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, \
                namespace: shop}\nspec: {parentRefs: [{group: '', kind: Service, name: echo, \
                port: 80}], rules: [{name: health, matches: [{method: {service: \
                grpc.health.v1.Health}}], backendRefs: [{name: echo-v1, port: 80}]}]}\n---\n";
    let http = http_route(
        "shop",
        "h",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [{{matches: [{{path: {{type: PathPrefix, value: /old}}}}], \
             filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, port: 8443, \
             statusCode: 301, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]}}, \
             {{backendRefs: [{{name: echo-v2, port: 80, weight: 0}}], timeouts: {{request: \
             1500ms}}, retry: {{codes: [502], attempts: 2}}}}]}}"
        ),
    );
    let r = routes(&format!("{grpc}{http}"));
    let wire = service_routes(&r.services[ECHO]);
    assert_eq!(
        (wire.namespace.as_str(), wire.name.as_str()),
        ("shop", "echo")
    );
    let refs: Vec<(String, u32)> = wire
        .rules
        .iter()
        .map(|r| {
            let r = r.route.as_ref().unwrap();
            (r.name.clone(), r.rule_index)
        })
        .collect();
    assert_eq!(
        refs,
        [
            ("g".to_owned(), 0),
            ("h".to_owned(), 0),
            ("h".to_owned(), 1)
        ],
        "gRPC first, then HTTP in precedence order"
    );
    let g = &wire.rules[0];
    assert_eq!(g.port, 80);
    assert_eq!(g.route.as_ref().unwrap().rule_name, "health");
    let m = g.r#match.as_ref().unwrap();
    assert_eq!(
        m.headers[0].name, "content-type",
        "gRPC rules take gRPC only"
    );
    assert_eq!(m.grpc.as_ref().unwrap().service, "grpc.health.v1.Health");
    let redirect = &wire.rules[1].filters[0];
    let Some(pb::filter::Kind::RequestRedirect(rd)) = &redirect.kind else {
        panic!("{redirect:?}")
    };
    assert_eq!(
        (rd.scheme.as_str(), rd.port, rd.status_code),
        ("https", 8443, 301)
    );
    assert_eq!(
        rd.path.as_ref().unwrap().kind,
        Some(pb::path_modifier::Kind::ReplacePrefixMatch("/new".into()))
    );
    let last = &wire.rules[2];
    // The GRPCRoute takes port 80 (GEP-1426 route types): the HTTPRoute is on 8080 only.
    assert_eq!(last.port, 8080);
    assert_eq!(wire.rules[1].port, 8080);
    assert_eq!(last.backends[0].weight, 0);
    let t = last.timeouts.as_ref().unwrap();
    assert_eq!(
        t.request,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
    assert!(t.backend_request.is_none());
    assert_eq!(last.retry.as_ref().unwrap().codes, [502]);
    assert_eq!(last.retry.as_ref().unwrap().attempts, 2);
}

/// GEP-1426 "Route types": on one Service port, a GRPCRoute takes precedence over an
/// HTTPRoute; the HTTPRoute is not applied there and its parent says `Conflicted`. Only
/// routes of one group conflict (a consumer HTTPRoute is not beaten by a producer
/// GRPCRoute), and a refused GRPCRoute takes no port.
#[test]
fn grpc_route_beats_http_route_on_the_same_service_port() {
    let grpc = |name: &str, port: &str, extra: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}, \
             namespace: shop, creationTimestamp: '2026-06-01T00:00:00Z'}}\nspec: {{parentRefs: \
             [{{group: '', kind: Service, name: echo, {port}}}], rules: [{{{extra}backendRefs: \
             [{{name: echo-v1, port: 80}}]}}]}}\n---\n"
        )
    };
    let be = "backendRefs: [{name: echo-v1, port: 80}]";
    let on = |port: &str| {
        format!(
            "{{parentRefs: [{{group: '', kind: Service, name: echo, namespace: shop{port}}}], \
             rules: [{{{be}}}]}}"
        )
    };
    let yaml = [
        grpc("g", "port: 80", ""),
        // Refused (an unknown field): takes nothing.
        grpc("bad", "port: 8080", "bogus: 1, "),
        // Older than the GRPCRoute: age does not matter between route types in a mesh.
        http_route("shop", "on-80", "2020-01-01T00:00:00Z", &on(", port: 80")),
        http_route("shop", "all-ports", "2020-01-01T00:00:00Z", &on("")),
        http_route(
            "client",
            "consumer",
            "2020-01-01T00:00:00Z",
            &on(", port: 80"),
        ),
    ]
    .concat();
    let r = routes(&yaml);
    let accepted =
        |kind, ns: &str, name: &str| r.statuses[&id(kind, ns, name)].parents[0].accepted.clone();
    let c = accepted(RouteKind::Http, "shop", "on-80");
    assert_eq!((c.status, c.reason), (false, "Conflicted"), "{c:?}");
    assert!(c.message.contains("GRPCRoute shop/g"), "{}", c.message);
    let c = accepted(RouteKind::Http, "shop", "all-ports");
    assert_eq!((c.status, c.reason), (true, "Accepted"), "{c:?}");
    assert!(c.message.contains("not on port 80"), "{}", c.message);
    assert!(accepted(RouteKind::Http, "client", "consumer").status);
    assert!(accepted(RouteKind::Grpc, "shop", "g").status);
    assert!(!accepted(RouteKind::Grpc, "shop", "bad").status);
    // What is served: the GRPCRoute on 80; `all-ports` on 8080 only; the consumer's on 80.
    let t = &r.services[ECHO];
    let grpc: Vec<(&str, Option<u16>)> = t
        .grpc
        .iter()
        .map(|e| (e.route.name.as_str(), e.port))
        .collect();
    assert_eq!(grpc, [("g", Some(80))]);
    let http: Vec<(&str, Option<u16>)> = t
        .http
        .iter()
        .map(|e| (e.route.name.as_str(), e.port))
        .collect();
    assert_eq!(http, [("consumer", Some(80)), ("all-ports", Some(8080))]);
}

/// GEP-1426 "`hostnames` field": "GAMMA implementations SHOULD NOT infer any functionality
/// from the `hostnames` field". A route on a Service applies whatever its hostnames say, and
/// its status says they were ignored.
#[test]
fn hostnames_are_ignored_on_a_service_parent() {
    let spec = format!(
        "{{{PARENT}, hostnames: [elsewhere.example.com], rules: [{{backendRefs: [{{name: \
         echo-v1, port: 80}}]}}]}}"
    );
    let r = routes(&http_route("shop", "h", "2026-01-01T00:00:00Z", &spec));
    let c = &r.statuses[&id(RouteKind::Http, "shop", "h")].parents[0].accepted;
    assert!(c.status, "{c:?}");
    assert!(
        c.message.contains("spec.hostnames is ignored"),
        "{}",
        c.message
    );
    assert_eq!(r.services[ECHO].http.len(), 1);
    // Without hostnames, no such note.
    let r = routes(&http_route(
        "shop",
        "h",
        "2026-01-01T00:00:00Z",
        &format!("{{{PARENT}, rules: [{{backendRefs: [{{name: echo-v1, port: 80}}]}}]}}"),
    ));
    let c = &r.statuses[&id(RouteKind::Http, "shop", "h")].parents[0].accepted;
    assert!(!c.message.contains("hostnames"), "{}", c.message);
}

/// A parentRef to the waypoint Gateway: zmesh attaches routes to Services only, and the
/// waypoint's HBONE listener allows no route kinds, so that parent says
/// `NotAllowedByListeners` and what to write instead; another Gateway is not ours.
#[test]
fn a_waypoint_gateway_parent_is_not_allowed_by_its_listener() {
    let spec = "{parentRefs: [{name: wp}, {name: ingress}, {group: '', kind: Service, name: \
                echo}], rules: [{backendRefs: [{name: echo-v1, port: 80}]}]}";
    let r = routes(&http_route("shop", "r", "2026-01-01T00:00:00Z", spec));
    let s = &r.statuses[&id(RouteKind::Http, "shop", "r")];
    let parents: Vec<(&str, bool, &str)> = s
        .parents
        .iter()
        .map(|p| (p.parent.name.as_str(), p.accepted.status, p.accepted.reason))
        .collect();
    assert_eq!(
        parents,
        [
            ("echo", true, "Accepted"),
            ("wp", false, "NotAllowedByListeners")
        ]
    );
    assert!(
        s.parents[1].accepted.message.contains("kind: Service"),
        "{}",
        s.parents[1].accepted.message
    );
    // A route whose only parent is the waypoint Gateway gets that status too, and no table.
    let r = routes(&http_route(
        "shop",
        "only-wp",
        "2026-01-01T00:00:00Z",
        "{parentRefs: [{name: wp}], rules: [{backendRefs: [{name: echo-v1, port: 80}]}]}",
    ));
    let s = &r.statuses[&id(RouteKind::Http, "shop", "only-wp")];
    assert_eq!(s.parents[0].accepted.reason, "NotAllowedByListeners");
    assert!(r.services.is_empty(), "{:?}", r.services.keys());
}
