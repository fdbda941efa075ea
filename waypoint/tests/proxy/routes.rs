//! Routes end to end: HTTPRoute rules (as the controller sends them in `ServiceRoutes`) on the
//! waypoint, over real HBONE, to the fake node tunnels' app. `echo-v1` backs the bound
//! Service `echo`; `echo-v2` backs a second Service `echo-v2`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use prost_types::Duration as PbDuration;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_waypoint::bound::Snapshot;
use zmesh_waypoint::upstream::LbPolicy;

use crate::harness::*;

const V2: &str = "echo-v2.default.svc.cluster.local";

pub(crate) fn backend(host: &str, weight: u32) -> pb::Backend {
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

pub(crate) fn prefix(p: &str) -> Option<pb::RouteMatch> {
    Some(pb::RouteMatch {
        path: Some(pb::PathMatch {
            r#type: pb::MatchType::PathPrefix as i32,
            value: p.into(),
        }),
        ..Default::default()
    })
}

pub(crate) fn rule(m: Option<pb::RouteMatch>, backends: Vec<pb::Backend>) -> pb::RouteRule {
    pb::RouteRule {
        route: Some(pb::RouteRef {
            kind: pb::RouteKind::HttpRoute as i32,
            namespace: "default".into(),
            name: "r".into(),
            ..Default::default()
        }),
        r#match: m,
        backends,
        ..Default::default()
    }
}

pub(crate) fn filter(kind: pb::filter::Kind) -> pb::Filter {
    pb::Filter { kind: Some(kind) }
}

/// A mesh with `echo-v1` (Service `echo`) and `echo-v2` (Service `echo-v2`), and a waypoint
/// with `rules` on `echo`.
pub(crate) async fn mesh(rules: Vec<pb::RouteRule>) -> (Mesh, zmesh_waypoint::Running) {
    let mut mesh = Mesh::new(&["echo-v1", "echo-v2"], &[]).await;
    mesh.yaml = mesh.yaml.replace(
        &format!("workloadName: echo-v2\n  services:\n    default/{HOST}"),
        &format!("workloadName: echo-v2\n  services:\n    default/{V2}"),
    );
    let routes = pb::ServiceRoutes {
        namespace: "default".into(),
        name: "echo".into(),
        hostname: HOST.into(),
        rules,
    };
    let compiled = zmesh_waypoint::route::compile("default/echo", &routes).unwrap();
    let snap = Snapshot::from_yaml(&mesh.yaml)
        .unwrap()
        .with_routes([Arc::new(compiled)]);
    let wp = mesh.waypoint_with(LbPolicy::RoundRobin, snap).await;
    (mesh, wp)
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", HOST)
        .body(full(Bytes::new()))
        .unwrap()
}

fn header(r: &http::Response<hyper::body::Incoming>, h: &str) -> String {
    r.headers()
        .get(h)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn header_match_picks_v2_and_weight_zero_never_gets_traffic() {
    let mut by_header = rule(prefix("/"), vec![backend(V2, 1)]);
    by_header
        .r#match
        .as_mut()
        .unwrap()
        .headers
        .push(pb::HeaderMatch {
            r#type: pb::MatchType::Exact as i32,
            name: "x-version".into(),
            value: "v2".into(),
        });
    // Everything else: v1 weight 0, v2 weight 100 -> all to v2 ... except /v1, always v1.
    let weighted = rule(prefix("/w"), vec![backend(HOST, 0), backend(V2, 100)]);
    let v1 = rule(prefix("/"), vec![backend(HOST, 1)]);
    let (mesh, wp) = mesh(vec![by_header, weighted, v1]).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    for _ in 0..3 {
        let r = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(header(&r, "x-backend"), "echo-v1");
        let mut req = get("/hello");
        req.headers_mut().insert("x-version", "v2".parse().unwrap());
        let r = c.send_request(req).await.unwrap();
        assert_eq!(header(&r, "x-backend"), "echo-v2");
    }
    for _ in 0..20 {
        let r = c.send_request(get("/w/x")).await.unwrap();
        assert_eq!(header(&r, "x-backend"), "echo-v2");
    }
}

#[tokio::test]
async fn redirect_rewrite_and_header_filters() {
    let mut redirect = rule(prefix("/old"), vec![]);
    redirect
        .filters
        .push(filter(pb::filter::Kind::RequestRedirect(
            pb::RequestRedirect {
                scheme: "https".into(),
                path: Some(pb::PathModifier {
                    kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/new".into())),
                }),
                status_code: 301,
                ..Default::default()
            },
        )));
    let mut rewrite = rule(prefix("/api"), vec![backend(HOST, 1)]);
    rewrite
        .filters
        .push(filter(pb::filter::Kind::UrlRewrite(pb::UrlRewrite {
            hostname: "rewritten.example".into(),
            path: Some(pb::PathModifier {
                kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/v2".into())),
            }),
        })));
    rewrite
        .filters
        .push(filter(pb::filter::Kind::RequestHeaderModifier(
            pb::HeaderModifier {
                add: vec![pb::Header {
                    name: "x-added".into(),
                    value: "yes".into(),
                }],
                ..Default::default()
            },
        )));
    rewrite
        .filters
        .push(filter(pb::filter::Kind::ResponseHeaderModifier(
            pb::HeaderModifier {
                set: vec![pb::Header {
                    name: "x-resp".into(),
                    value: "set".into(),
                }],
                remove: vec!["x-seen-added".into()],
                ..Default::default()
            },
        )));
    let (mesh, wp) = mesh(vec![redirect, rewrite]).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;

    let r = c.send_request(get("/old/page?x=1")).await.unwrap();
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        header(&r, "location"),
        format!("https://{HOST}/new/page?x=1")
    );
    assert!(mesh.connects().is_empty(), "a redirect reaches no backend");

    let r = c.send_request(get("/api/items?q=2")).await.unwrap();
    assert_eq!(header(&r, "x-backend"), "echo-v1");
    assert_eq!(header(&r, "x-seen-path"), "/v2/items?q=2");
    assert_eq!(header(&r, "x-seen-host"), "rewritten.example");
    assert_eq!(header(&r, "x-resp"), "set");
    assert!(
        r.headers().get("x-seen-added").is_none(),
        "removed from the response"
    );

    // No rule matches: 404 from the waypoint itself (no backend header).
    let r = c.send_request(get("/elsewhere")).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&r, "x-backend"), "");
}

#[tokio::test]
async fn unresolved_backend_is_500_timeout_504_and_retry_on_503() {
    let mut unresolved = rule(prefix("/unresolved"), vec![backend(HOST, 1)]);
    unresolved.backends[0].target = Some(pb::backend::Target::Unresolved(
        "Service other/x: no ReferenceGrant allows it".into(),
    ));
    let mut slow = rule(prefix("/slow"), vec![backend(HOST, 1)]);
    slow.timeouts = Some(pb::Timeouts {
        request: Some(PbDuration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        backend_request: None,
    });
    let mut retried = rule(prefix("/flaky/retried"), vec![backend(HOST, 1)]);
    retried.retry = Some(pb::Retry {
        codes: vec![503],
        attempts: 2,
        backoff: Some(PbDuration {
            seconds: 0,
            nanos: 10_000_000,
        }),
    });
    let plain = rule(prefix("/"), vec![backend(HOST, 1)]);
    let (mesh, wp) = mesh(vec![unresolved, slow, retried, plain]).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;

    let r = c.send_request(get("/unresolved")).await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);

    let started = std::time::Instant::now();
    let r = c.send_request(get("/slow")).await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(300));
    mesh.release.notify_waiters();

    // Without a retry the first 503 is the answer; with one, the second attempt's 200.
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c.send_request(get("/flaky/plain")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = c.send_request(get("/flaky/retried")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A GRPCRoute rule on the gRPC port: `test.Echo/Chat` to echo-v2, with a retry; a streamed
/// request (no declared length) still goes through once, the body not kept.
#[tokio::test]
async fn grpc_method_match_on_the_grpc_port() {
    let mut chat = rule(None, vec![backend(V2, 1)]);
    chat.route.as_mut().unwrap().kind = pb::RouteKind::GrpcRoute as i32;
    chat.port = 81;
    chat.r#match = Some(pb::RouteMatch {
        grpc: Some(pb::GrpcMethodMatch {
            r#type: pb::MatchType::Exact as i32,
            service: "test.Echo".into(),
            method: "Chat".into(),
        }),
        ..Default::default()
    });
    chat.backends[0].target = Some(pb::backend::Target::Service(pb::BackendService {
        namespace: "default".into(),
        name: "echo-v2".into(),
        hostname: V2.into(),
        port: 81,
    }));
    chat.retry = Some(pb::Retry {
        codes: vec![503],
        attempts: 1,
        backoff: None,
    });
    let mut unary = chat.clone();
    unary
        .r#match
        .as_mut()
        .unwrap()
        .grpc
        .as_mut()
        .unwrap()
        .method = "Unary".into();
    unary.backends[0].target = Some(pb::backend::Target::Service(pb::BackendService {
        namespace: "default".into(),
        name: "echo".into(),
        hostname: HOST.into(),
        port: 81,
    }));
    let (mesh, wp) = mesh(vec![chat, unary]).await;
    let mut c = h2(mesh.tunnel(wp.hbone_addr, 81).await.unwrap()).await;
    let grpc = |path: &str, body: Body| {
        Request::post(format!("http://{HOST}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap()
    };
    let r = c
        .send_request(grpc("/test.Echo/Unary", full(grpc_frame(b"hi"))))
        .await
        .unwrap();
    assert_eq!(header(&r, "x-backend"), "echo-v1");
    let (tx, body) = channel_body();
    let r = c.send_request(grpc("/test.Echo/Chat", body)).await.unwrap();
    assert_eq!(header(&r, "x-backend"), "echo-v2");
    tx.send(hyper::body::Frame::data(grpc_frame(b"m")))
        .await
        .unwrap();
    drop(tx);
    use http_body_util::BodyExt;
    let all = r.into_body().collect().await.unwrap();
    assert_eq!(all.trailers().expect("trailers")["grpc-status"], "0");
    // Port 80 has no rule for gRPC methods: no rule applies there, plain proxying.
    let mut c1 = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c1.send_request(get("/hello")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// RequestMirror: the client's answer comes from echo-v1; a copy reaches echo-v2 (its node
/// tunnel sees a CONNECT), its response ignored.
#[tokio::test]
async fn mirror_copies_to_another_service() {
    let mut m = rule(prefix("/"), vec![backend(HOST, 1)]);
    m.filters
        .push(filter(pb::filter::Kind::RequestMirror(pb::RequestMirror {
            backend: Some(backend(V2, 1)),
            numerator: 0,
            denominator: 0,
        })));
    let (mesh, wp) = mesh(vec![m]).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c.send_request(get("/hello")).await.unwrap();
    assert_eq!(header(&r, "x-backend"), "echo-v1");
    let v2 = mesh.nodes[1].ip;
    eventually("the mirror reaches echo-v2", async || {
        mesh.connects().iter().any(|(ip, _)| *ip == v2)
    })
    .await;
}

/// RequestMirror of a request whose body has no declared length (a gRPC call, a chunked
/// upload): the copy still reaches echo-v2, streamed alongside the original, and the client's
/// answer still comes from echo-v1 (found by the GAMMA conformance run:
/// `MeshGRPCRouteRequestMirror`).
#[tokio::test]
async fn mirror_copies_a_body_of_unknown_length() {
    let mut m = rule(prefix("/"), vec![backend(HOST, 1)]);
    m.filters
        .push(filter(pb::filter::Kind::RequestMirror(pb::RequestMirror {
            backend: Some(backend(V2, 1)),
            numerator: 0,
            denominator: 0,
        })));
    let (mesh, wp) = mesh(vec![m]).await;
    let mut c = h2(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let (tx, body) = channel_body();
    let req = Request::post(format!("http://{HOST}/upload"))
        .body(body)
        .unwrap();
    let sending = tokio::spawn(async move { c.send_request(req).await });
    tx.send(hyper::body::Frame::data(Bytes::from_static(b"part one")))
        .await
        .unwrap();
    tx.send(hyper::body::Frame::data(Bytes::from_static(b"part two")))
        .await
        .unwrap();
    drop(tx);
    let r = sending.await.unwrap().unwrap();
    assert_eq!(header(&r, "x-backend"), "echo-v1");
    let v2 = mesh.nodes[1].ip;
    eventually("the mirror reaches echo-v2", async || {
        mesh.connects().iter().any(|(ip, _)| *ip == v2)
    })
    .await;
}

/// A rule with a retry keeps the request body (read whole before the first attempt). A client
/// that goes away mid-body (here: the declared 1000 bytes, 10 sent, then the connection
/// closed) fails the request: nothing goes upstream (no truncated body sent as complete, no
/// retry, no mirror), and the request is counted with `DC` (downstream connection
/// termination, code 0 as Envoy records it).
#[tokio::test]
async fn client_aborting_a_kept_body_sends_nothing_upstream() {
    use tokio::io::AsyncWriteExt;
    let mut r = rule(prefix("/"), vec![backend(HOST, 1)]);
    r.retry = Some(pb::Retry {
        codes: vec![503],
        attempts: 1,
        backoff: None,
    });
    r.filters
        .push(filter(pb::filter::Kind::RequestMirror(pb::RequestMirror {
            backend: Some(backend(V2, 1)),
            numerator: 0,
            denominator: 0,
        })));
    let (mesh, wp) = mesh(vec![r]).await;
    let mut t = mesh.tunnel(wp.hbone_addr, 80).await.unwrap();
    t.write_all(
        format!("POST /count HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 1000\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    t.shutdown().await.unwrap();
    drop(t);
    let metrics = async || admin_get(wp.admin_addr, "/metrics").await.1;
    eventually("the request counted or sent upstream", async || {
        requests_total(&metrics().await, &[]) == 1 || !mesh.connects().is_empty()
    })
    .await;
    let m = metrics().await;
    assert_eq!(
        requests_total(&m, &["response_code=\"0\"", "response_flags=\"DC\""]),
        1,
        "{}",
        m.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        mesh.connects().is_empty(),
        "nothing goes upstream: {:?}",
        mesh.connects()
    );
}

/// The same over HTTP/2, the connection kept: a client that resets its stream mid-body
/// (`RST_STREAM CANCEL`), and one that ends its stream 990 bytes short of its
/// `content-length` (a malformed request: hyper's body ends in an error while the request is
/// still being handled). Nothing goes upstream, both are counted `DC`, and the next request
/// on the connection is served.
#[tokio::test]
async fn client_ending_a_kept_body_early_over_h2_sends_nothing_upstream() {
    let mut r = rule(prefix("/"), vec![backend(HOST, 1)]);
    r.retry = Some(pb::Retry {
        codes: vec![503],
        attempts: 1,
        backoff: None,
    });
    let (mesh, wp) = mesh(vec![r]).await;
    let t = mesh.tunnel(wp.hbone_addr, 80).await.unwrap();
    let (client, conn) = h2::client::handshake(t).await.unwrap();
    tokio::spawn(conn);
    let metrics = async || admin_get(wp.admin_addr, "/metrics").await.1;
    let post = || {
        Request::post(format!("http://{HOST}/count"))
            .header("content-length", "1000")
            .body(())
            .unwrap()
    };
    for (n, reset) in [(1, false), (2, true)] {
        let mut client = client.clone().ready().await.unwrap();
        let (_resp, mut send) = client.send_request(post(), false).unwrap();
        send.send_data(Bytes::from_static(b"0123456789"), !reset)
            .unwrap();
        if reset {
            send.send_reset(h2::Reason::CANCEL);
        }
        eventually("the request counted or sent upstream", async || {
            requests_total(&metrics().await, &[]) == n || !mesh.connects().is_empty()
        })
        .await;
        let m = metrics().await;
        assert_eq!(
            requests_total(&m, &["response_code=\"0\"", "response_flags=\"DC\""]),
            n,
            "reset: {reset}\n{m}"
        );
        assert!(mesh.connects().is_empty(), "{:?}", mesh.connects());
    }
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{HOST}/hello"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
}

fn stall_rule(path: &str, request_ms: i32, backend_ms: i32) -> pb::RouteRule {
    let ms = |n: i32| {
        (n > 0).then_some(PbDuration {
            seconds: (n / 1000).into(),
            nanos: (n % 1000) * 1_000_000,
        })
    };
    let mut r = rule(prefix(path), vec![backend(HOST, 1)]);
    r.timeouts = Some(pb::Timeouts {
        request: ms(request_ms),
        backend_request: ms(backend_ms),
    });
    r
}

/// Reads a body until it ends; `Err` when it ends in an error (the response cut short).
async fn body_outcome(r: http::Response<hyper::body::Incoming>) -> Result<Bytes, String> {
    use http_body_util::BodyExt;
    tokio::time::timeout(Duration::from_secs(20), r.into_body().collect())
        .await
        .expect("the response body is still open 20 s later: the route's timeout did not end it")
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}

/// HTTPRouteTimeouts cover the whole response: a backend that sends its head and a first
/// chunk, then stalls, is cut at `timeouts.request` (HTTP/1.1: the connection closed) and at
/// `timeouts.backendRequest` (HTTP/2: the stream reset, the connection kept), counted `UT`
/// with the status the client saw. A body that completes in time is not cut.
#[tokio::test]
async fn timeouts_cover_the_response_body() {
    let (mesh, wp) = mesh(vec![
        stall_rule("/stall/request", 300, 0),
        stall_rule("/stall/backend", 0, 300),
        stall_rule("/", 60_000, 0),
    ])
    .await;

    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c.send_request(get("/stall/request")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the head arrives in time");
    let cut = body_outcome(r).await;
    assert!(cut.is_err(), "HTTP/1.1 body not cut: {cut:?}");

    let mut c = h2(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c
        .send_request(
            Request::get(format!("http://{HOST}/stall/backend"))
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cut = body_outcome(r).await;
    assert!(cut.is_err(), "HTTP/2 body not cut: {cut:?}");
    // The connection lives on; a body that ends in time is whole.
    let r = c
        .send_request(
            Request::get(format!("http://{HOST}/hello"))
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let whole = body_outcome(r).await.unwrap();
    assert!(whole.starts_with(b"hello from echo-v1"), "{whole:?}");

    eventually("both cut responses counted UT", async || {
        let m = admin_get(wp.admin_addr, "/metrics").await.1;
        requests_total(&m, &["response_code=\"200\"", "response_flags=\"UT\""]) == 2
    })
    .await;
    mesh.release.notify_waiters();
}
