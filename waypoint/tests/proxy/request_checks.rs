//! What the waypoint refuses, or settles, about a request before anything acts on it: one
//! authority (`host[:port]` from the target or the one `Host`), one normalized path for
//! authorization, routing and the backend alike, headers a client names in `Connection`,
//! transfer codings, CONNECT, upgrades. Requests are written byte for byte on a tunnel.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_waypoint::upstream::LbPolicy;

use crate::harness::*;
use crate::routes::{backend, filter, mesh, prefix, rule};

/// Denies `/admin` and below on the bound service.
const DENY_ADMIN: &str = "authorizationPolicies:\n- namespace: default\n  name: deny-admin\n  \
    services: [default/echo.default.svc.cluster.local]\n  action: DENY\n  \
    rules: [{to: [{operation: {paths: ['/admin', '/admin/{**}']}}]}]\n";

/// A response head as read off the tunnel: its status and header lines.
struct Head(String);

impl Head {
    fn status(&self) -> u16 {
        self.0
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {:?}", self.0))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.0.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Whether the backend answered (the test app names itself in `x-backend`).
    fn reached_backend(&self) -> bool {
        self.header("x-backend").is_some()
    }
}

/// Writes `request` as it is on a new tunnel to `VIP:port` and reads the response head.
async fn send_raw(mesh: &Mesh, wp: SocketAddr, port: u16, request: &str) -> Head {
    let mut t = mesh.tunnel(wp, port).await.unwrap();
    t.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut chunk))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "the tunnel closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&chunk[..n]);
    }
    Head(String::from_utf8_lossy(&head).into_owned())
}

/// A `Host` that is not `host[:port]` is refused before authorization, on a port proxied as
/// HTTP/1.1 (80) and on one proxied as HTTP/2 (81, gRPC), where the waypoint builds the
/// upstream `:path` and `:authority` itself: a `Host` of `svc/admin/x?` must not become the
/// path `/admin/x` at the backend after the DENY policy saw `/public`. So are a missing
/// `Host` (HTTP/1.1), two of them, and userinfo; HTTP/1.0 without a `Host` goes to the
/// service's own name.
#[tokio::test]
async fn the_authority_is_one_host_port_or_the_request_is_refused() {
    let mut mesh = Mesh::new(&["echo-a"], &[]).await;
    mesh.yaml.push_str(DENY_ADMIN);
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let a = wp.hbone_addr;
    for port in [80, 81] {
        let get = |target: &str, headers: &str| {
            format!("GET {target} HTTP/1.1\r\n{headers}connection: close\r\n\r\n")
        };
        let h = send_raw(
            &mesh,
            a,
            port,
            &get("/admin/x", &format!("host: {HOST}\r\n")),
        )
        .await;
        assert_eq!(h.status(), 403, "port {port}: the policy applies: {}", h.0);

        let h = send_raw(
            &mesh,
            a,
            port,
            &get("/public", &format!("host: {HOST}\r\n")),
        )
        .await;
        assert_eq!(h.status(), 404, "port {port}: {}", h.0);
        assert_eq!(h.header("x-seen-path"), Some("/public"), "port {port}");

        // `{H}` stands for the service's host name.
        for (what, target, host_lines) in [
            ("a path in Host", "/public", "host: {H}/admin/x?\r\n"),
            ("a query in Host", "/public", "host: {H}?/admin\r\n"),
            ("userinfo in Host", "/public", "host: x@{H}\r\n"),
            ("no Host", "/public", ""),
            ("two Hosts", "/public", "host: {H}\r\nhost: other\r\n"),
            ("an empty Host", "/public", "host: \r\n"),
            ("a port that is not one", "/public", "host: {H}:abc\r\n"),
            ("an empty port", "/public", "host: {H}:\r\n"),
            ("a port past 65535", "/public", "host: {H}:99999\r\n"),
            ("a signed port", "/public", "host: {H}:+80\r\n"),
            ("GET *", "*", "host: {H}\r\n"),
            (
                "userinfo in the target",
                "http://x@{H}/public",
                "host: {H}\r\n",
            ),
        ] {
            let request = get(
                &target.replace("{H}", HOST),
                &host_lines.replace("{H}", HOST),
            );
            let h = send_raw(&mesh, a, port, &request).await;
            assert_eq!(h.status(), 400, "port {port}, {what}: {}", h.0);
            assert!(!h.reached_backend(), "port {port}, {what}: {}", h.0);
        }

        let h = send_raw(&mesh, a, port, "GET /public HTTP/1.0\r\n\r\n").await;
        assert_eq!(h.status(), 404, "port {port}, HTTP/1.0: {}", h.0);
        assert_eq!(h.header("x-seen-host"), Some(&*format!("{HOST}:{port}")));

        // An absolute-form target's authority is the request's: the backend sees it, not
        // the `Host` beside it (RFC 9112 §3.2.2), and so does everything before.
        let target = format!("http://{HOST}:{port}/public");
        let h = send_raw(&mesh, a, port, &get(&target, "host: other.example\r\n")).await;
        assert_eq!(h.status(), 404, "port {port}: {}", h.0);
        assert_eq!(h.header("x-seen-host"), Some(&*format!("{HOST}:{port}")));
    }
    let h = send_raw(
        &mesh,
        a,
        80,
        &format!("OPTIONS * HTTP/1.1\r\nhost: {HOST}\r\n\r\n"),
    )
    .await;
    assert!(h.reached_backend(), "OPTIONS * is proxied: {}", h.0);
    assert_eq!(h.header("x-seen-path"), Some("*"), "{}", h.0);
}

/// Over HTTP/2, `:authority` is the request's authority: a `host` header beside it naming
/// another is replaced, so a header condition cannot see one host and `hosts` another.
#[tokio::test]
async fn over_http2_the_authority_is_the_host() {
    use http::Request;
    let mut mesh = Mesh::new(&["echo-a"], &[]).await;
    // Denies requests whose `host` header is the service's: over HTTP/2 that is `:authority`.
    mesh.yaml.push_str(&format!(
        "authorizationPolicies:\n- namespace: default\n  name: deny-by-header\n  \
         services: [default/{HOST}]\n  action: DENY\n  \
         rules: [{{when: [{{key: 'request.headers[host]', values: ['{HOST}:81']}}]}}]\n"
    ));
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h2(mesh.tunnel(wp.hbone_addr, 81).await.unwrap()).await;
    for host in [None, Some("other.example")] {
        let mut b = Request::get(format!("http://{HOST}:81/public"));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        let r = c
            .send_request(b.body(full(bytes::Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "host header {host:?}");
    }
}

/// With routes and no policy at all, routes match the `BASE`-normalized path, which is also
/// what the backend gets: `/api/../secret` is `/secret`, which no rule matches (404, `NR`),
/// not a request under `/api`. A header a route adds stays even when the client names it in
/// `Connection`.
#[tokio::test]
async fn routes_see_the_normalized_path_and_keep_the_headers_they_add() {
    let add = filter(pb::filter::Kind::RequestHeaderModifier(
        pb::HeaderModifier {
            add: vec![pb::Header {
                name: "x-added".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        },
    ));
    let api = pb::RouteRule {
        filters: vec![add],
        ..rule(prefix("/api"), vec![backend(HOST, 1)])
    };
    let (m, wp) = mesh(vec![api]).await;
    let a = wp.hbone_addr;
    let get =
        |path: &str, headers: &str| format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n{headers}\r\n");

    let h = send_raw(&m, a, 80, &get("/api/x", "")).await;
    assert_eq!(h.header("x-seen-added"), Some("yes"), "{}", h.0);
    let h = send_raw(&m, a, 80, &get("/api/x", "connection: x-added\r\n")).await;
    assert_eq!(h.header("x-seen-added"), Some("yes"), "{}", h.0);

    let h = send_raw(&m, a, 80, &get("/api/../secret", "")).await;
    assert_eq!(h.status(), 404, "{}", h.0);
    assert!(!h.reached_backend(), "routed as /api: {}", h.0);
    let h = send_raw(&m, a, 80, &get("/api/./%79?q=%2e", "")).await;
    assert_eq!(h.header("x-seen-path"), Some("/api/y?q=%2e"), "{}", h.0);
    let h = send_raw(&m, a, 80, &get("/api/%00", "")).await;
    assert_eq!(h.status(), 400, "{}", h.0);
    assert!(!h.reached_backend(), "{}", h.0);
}

/// A CONNECT inside a tunnel is answered by the waypoint (404, as Envoy without a
/// `connect_matcher`), and a transfer coding other than `chunked` with 501: neither reaches
/// the backend.
#[tokio::test]
async fn connect_and_unknown_transfer_codings_are_answered_locally() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let a = wp.hbone_addr;
    for port in [80, 81] {
        let h = send_raw(
            &mesh,
            a,
            port,
            "CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        )
        .await;
        assert_eq!(h.status(), 404, "port {port}: {}", h.0);
        assert!(!h.reached_backend(), "port {port}: {}", h.0);

        let h = send_raw(
            &mesh,
            a,
            port,
            &format!(
                "POST /count HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: gzip, chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(h.status(), 501, "port {port}: {}", h.0);
        assert!(!h.reached_backend(), "port {port}: {}", h.0);

        let h = send_raw(
            &mesh,
            a,
            port,
            &format!(
                "POST /count HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(
            h.status(),
            200,
            "port {port}: chunked alone is proxied: {}",
            h.0
        );
    }
}

/// Upgrades: WebSocket is spliced (the WebSocket tests), `h2c` is ignored as Envoy ignores it
/// (the request is proxied as HTTP/1.1 without its upgrade headers), any other is refused
/// with 403 (lists and a second `Upgrade` too), as Envoy refuses an upgrade its route does
/// not enable: the backend never gets to take the connection out of HTTP.
#[tokio::test]
async fn only_websocket_upgrades_are_spliced() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let upgrade = |to: &str| {
        format!(
            "GET /public HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade, HTTP2-Settings\r\n\
             upgrade: {to}\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
    };
    let h = send_raw(&mesh, wp.hbone_addr, 80, &upgrade("h2c")).await;
    assert_eq!(h.status(), 404, "{}", h.0);
    assert!(h.reached_backend(), "h2c is proxied as HTTP/1.1: {}", h.0);
    for to in [
        "foo",
        "TLS/1.2, h2c",
        "h2c, foo/2",
        "foo, websocket",
        "websocket, h2c",
    ] {
        let h = send_raw(&mesh, wp.hbone_addr, 80, &upgrade(to)).await;
        assert_eq!(h.status(), 403, "{to}: {}", h.0);
        assert!(!h.reached_backend(), "{to}: {}", h.0);
    }
    // Two `Upgrade` headers are not a WebSocket upgrade either.
    let two = upgrade("websocket\r\nupgrade: foo");
    let h = send_raw(&mesh, wp.hbone_addr, 80, &two).await;
    assert_eq!(h.status(), 403, "{}", h.0);
    assert!(!h.reached_backend(), "{}", h.0);
}
