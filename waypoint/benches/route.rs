//! Routing cost (issue 12), a plain bench binary (`cargo bench -p zmesh-waypoint --bench
//! route`; no criterion in the workspace):
//!
//! 1. the per-request routing decision with 0 (baseline: no routes), 1, 100 and 10k rules on
//!    one Service: the request matching the first rule, the last rule, and none (404);
//! 2. end to end, requests/s through the waypoint over HBONE with no routes and with 100
//!    rules (the request matching the last), and a plain TCP HTTP/1.1 baseline (the same
//!    client and server code, no waypoint) in the same run.
//!
//! `ROUTE_BENCH_REQUESTS` sets the end-to-end request count (default 3000);
//! `ROUTE_BENCH_ONLY=e2e` skips the micro-benchmark (e.g. to profile the request path under
//! `valgrind --tool=callgrind`).

#[allow(dead_code)]
#[path = "../tests/proxy/grpc_app.rs"]
mod grpc_app;
#[allow(dead_code)]
#[path = "../tests/proxy/harness.rs"]
mod harness;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_waypoint::bound::Snapshot;
use zmesh_waypoint::route::matching::RequestView;
use zmesh_waypoint::route::{Decision, ServiceRoutes, compile};
use zmesh_waypoint::upstream::LbPolicy;

/// `n` rules, each `PathPrefix /svc-<i>` AND header `x-user: u-<i>`, to the bound Service.
fn routes(n: usize) -> pb::ServiceRoutes {
    let rules = (0..n)
        .map(|i| pb::RouteRule {
            route: Some(pb::RouteRef {
                kind: pb::RouteKind::HttpRoute as i32,
                namespace: "default".into(),
                name: format!("r{i}"),
                ..Default::default()
            }),
            r#match: Some(pb::RouteMatch {
                path: Some(pb::PathMatch {
                    r#type: pb::MatchType::PathPrefix as i32,
                    value: format!("/svc-{i}"),
                }),
                headers: vec![pb::HeaderMatch {
                    r#type: pb::MatchType::Exact as i32,
                    name: "x-user".into(),
                    value: format!("u-{i}"),
                }],
                ..Default::default()
            }),
            backends: vec![pb::Backend {
                weight: 1,
                target: Some(pb::backend::Target::Service(pb::BackendService {
                    namespace: "default".into(),
                    name: "echo".into(),
                    hostname: harness::HOST.into(),
                    port: 80,
                })),
                filters: Vec::new(),
            }],
            ..Default::default()
        })
        .collect();
    pb::ServiceRoutes {
        namespace: "default".into(),
        name: "echo".into(),
        hostname: harness::HOST.into(),
        rules,
    }
}

fn decision_ns(r: Option<&ServiceRoutes>, i: usize, iters: u32) -> f64 {
    let mut h = HeaderMap::new();
    h.insert("x-user", format!("u-{i}").parse().unwrap());
    let path = format!("/svc-{i}/item");
    let start = Instant::now();
    for _ in 0..iters {
        let view = RequestView {
            method: &Method::GET,
            path: black_box(&path),
            query: None,
            headers: &h,
        };
        let d = match r {
            Some(r) => r.select(80, Some("default"), &view),
            None => Decision::NoRoute,
        };
        black_box(matches!(d, Decision::Rule(_)));
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn micro() {
    println!("routing decision, one Service (ns per request):");
    println!(
        "{:>8} {:>12} {:>12} {:>12}",
        "rules", "first", "last", "no match"
    );
    let snap = Snapshot::default();
    let iters = 200_000;
    // Baseline: the Service has no routes (a map lookup).
    let start = Instant::now();
    for _ in 0..iters {
        black_box(snap.routes(black_box("default/echo.default.svc.cluster.local")));
    }
    let base = start.elapsed().as_nanos() as f64 / f64::from(iters);
    println!("{:>8} {base:>12.0} {base:>12.0} {base:>12.0}", 0);
    for n in [1usize, 100, 10_000] {
        let r = compile("default/echo", &routes(n)).unwrap();
        let iters = (2_000_000 / n as u32).clamp(200, 200_000);
        let first = decision_ns(Some(&r), 0, iters);
        let last = decision_ns(Some(&r), n - 1, iters);
        let miss = decision_ns(Some(&r), n + 1, iters);
        println!("{n:>8} {first:>12.0} {last:>12.0} {miss:>12.0}");
    }
}

async fn rate(what: &str, n: usize, mut send: impl AsyncFnMut() -> bool) -> f64 {
    for _ in 0..50 {
        send().await;
    }
    let start = Instant::now();
    for _ in 0..n {
        assert!(send().await, "{what}: the request did not reach the app");
    }
    let rps = n as f64 / start.elapsed().as_secs_f64();
    println!("{what:>40}: {rps:>8.0} requests/s");
    rps
}

fn get(path: &str, user: &str) -> Request<harness::Body> {
    Request::get(path)
        .header("host", harness::HOST)
        .header("x-user", user)
        .body(harness::full(Bytes::new()))
        .unwrap()
}

async fn end_to_end() {
    let n: usize = std::env::var("ROUTE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    println!("\nend to end, sequential HTTP/1.1 keep-alive GETs, {n} requests each:");
    // Plain TCP baseline: a hyper server and client on loopback, no waypoint, no TLS.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(s),
                hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(harness::full("hello")))
                }),
            ));
        }
    });
    let (mut c, conn) = hyper::client::conn::http1::handshake::<_, harness::Body>(TokioIo::new(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    rate("plain TCP (baseline)", n, async || {
        c.ready().await.unwrap();
        let r = c.send_request(get("/hello", "-")).await.unwrap();
        let ok = r.status().is_success();
        r.into_body().collect().await.unwrap();
        ok
    })
    .await;

    for rules in [0usize, 100] {
        let mesh = harness::Mesh::new(&["echo-a"], &[]).await;
        let compiled = compile("default/echo", &routes(rules)).unwrap();
        let snap = Snapshot::from_yaml(&mesh.yaml).unwrap();
        let snap = if rules == 0 {
            snap
        } else {
            snap.with_routes([Arc::new(compiled)])
        };
        let wp = mesh.waypoint_with(LbPolicy::RoundRobin, snap).await;
        let mut c = harness::h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
        // The last rule matches (the worst case of a first-match scan); the app's catch-all
        // answers (404 naming itself in `x-backend`) in both runs, so the work is the same.
        let last = rules.saturating_sub(1);
        let path = format!("/svc-{last}/item");
        let user = format!("u-{last}");
        rate(
            &format!("waypoint over HBONE, {rules} rules"),
            n,
            async || {
                c.ready().await.unwrap();
                let r = c.send_request(get(&path, &user)).await.unwrap();
                let served = r.headers().contains_key("x-backend");
                r.into_body().collect().await.unwrap();
                served
            },
        )
        .await;
        drop(wp);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    // A subscriber as the binary has one (warn: no access log), so that the libraries' spans
    // cost here what they cost there (with none, `tracing`'s `log` fallback runs for each).
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .init();
    if std::env::var("ROUTE_BENCH_ONLY").as_deref() != Ok("e2e") {
        micro();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(end_to_end());
}
