//! The waypoint end to end on loopback, with real certificates, TLS 1.3 and HTTP/2 CONNECT:
//! a client's HBONE (hand-built as upstream ztunnel sends it, and zmesh's own pool) to the
//! waypoint, which proxies to fake node tunnels serving a test app.

mod controller;
mod grpc_app;
mod grpc_tonic;
mod harness;
mod large;
mod request_checks;
mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh_waypoint::upstream::LbPolicy;

use harness::*;

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", HOST)
        .body(full(Bytes::new()))
        .unwrap()
}

fn backend(r: &http::Response<hyper::body::Incoming>) -> String {
    r.headers()["x-backend"].to_str().unwrap().to_owned()
}

/// Exactly what upstream ztunnel sends (istio/ztunnel `src/proxy/outbound.rs`): TLS 1.3 with
/// ALPN h2 and the client's SPIFFE certificate, then an HTTP/2 CONNECT with only `:method`
/// and `:authority` (the service VIP:port) and `forwarded`, `baggage`, `traceparent`. Built
/// here with the h2 crate directly, not with zmesh's client.
#[tokio::test]
async fn hand_built_connect_as_upstream_ztunnel_sends_it() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let tcp = tokio::net::TcpStream::connect(wp.hbone_addr).await.unwrap();
    let tls_cfg = mesh.client.client_config(vec![id("waypoint")]).unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_cfg)
        .connect(
            rustls::pki_types::ServerName::IpAddress(wp.hbone_addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{VIP}:80"))
        .header("forwarded", format!("for=\"127.0.0.1:40000\";host={HOST}"))
        .header(
            "baggage",
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,\
             k8s.deployment.name=client,service.name=client,service.version=v1",
        )
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        )
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut recv = resp.into_body();
    send.send_data(
        Bytes::from(format!("GET /hello HTTP/1.1\r\nhost: {HOST}\r\n\r\n")),
        false,
    )
    .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hello from echo-a") {
        let chunk = recv.data().await.expect("tunnel ended early").unwrap();
        recv.flow_control().release_capacity(chunk.len()).unwrap();
        got.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    // The waypoint opened its own HBONE to the pod: `:authority` = podIP:targetPort, under
    // the waypoint's identity.
    let seen = mesh.connects();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1.authority, "127.0.0.11:8080");
    assert_eq!(seen[0].1.peer, Some(id("waypoint")));
    // Counted once, with Istio's labels.
    let labels = [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
        "destination_workload=\"echo-a\"",
        "destination_service=\"echo.default.svc.cluster.local\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/echo\"",
        "response_code=\"200\"",
        "request_protocol=\"http\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    eventually("the request counted", async || {
        requests_total(&admin_get(wp.admin_addr, "/metrics").await.1, &labels) == 1
    })
    .await;
}

#[tokio::test]
async fn connects_for_unbound_targets_are_refused() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let tunnel = |ip: &'static str, port: u16| {
        let mesh = &mesh;
        async move {
            let key = zmesh_core::hbone::PoolKey::new(
                id("client"),
                vec![id("waypoint")],
                wp.hbone_addr,
                None,
            );
            let target: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            mesh.pool
                .connect(key, &mesh.client, target, &Default::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    // A VIP not bound here, a bound VIP on a port it does not expose, the waypoint's own port.
    for (ip, port) in [("10.96.0.99", 80), (VIP, 8080), (VIP, 15008)] {
        let e = tunnel(ip, port).await.unwrap_err();
        assert!(e.contains("400"), "{ip}:{port}: {e}");
    }
    assert!(tunnel(VIP, 80).await.is_ok());
    assert!(mesh.connects().is_empty(), "nothing reached an endpoint");
}

#[tokio::test]
async fn http1_keep_alive_and_round_robin() {
    let mesh = Mesh::new(&["echo-a", "echo-b"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let mut backends = Vec::new();
    for _ in 0..6 {
        let r = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        backends.push(backend(&r));
        assert!(text(r).await.contains("HTTP/1.1"));
    }
    assert_eq!(
        backends,
        ["echo-a", "echo-b", "echo-a", "echo-b", "echo-a", "echo-b"]
    );
    // One upstream connection per endpoint, kept alive across requests.
    let mut seen: Vec<String> = mesh.connects().into_iter().map(|c| c.1.authority).collect();
    seen.sort();
    assert_eq!(seen, ["127.0.0.11:8080", "127.0.0.12:8080"]);
}

/// With three worker runtimes, each on a thread of its own, the kernel spreads the HBONE
/// connections of many client nodes over their sockets, and each worker reaches an endpoint
/// through its own upstream pool: as many upstream HBONE connections to it as workers that
/// served (one pool would make one). Round robin stays one turn for the whole waypoint. A
/// fourth `serve_on` is refused; the drain closes every socket.
#[tokio::test]
async fn worker_runtimes_share_the_port_each_with_its_own_pool() {
    let mesh = Mesh::new(&["echo-a", "echo-b"], &[]).await;
    let mut cfg = mesh.config(LbPolicy::RoundRobin);
    cfg.workers = 3;
    let mut wp = mesh.waypoint_cfg(cfg).await;
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let mut threads = Vec::new();
    for _ in 0..2 {
        let rt = runtime();
        wp.serve_on(rt.handle()).unwrap();
        let w = wp.waypoint.clone();
        threads.push(std::thread::spawn(move || rt.block_on(w.drain.cancelled())));
    }
    let rt = runtime();
    let err = wp.serve_on(rt.handle()).unwrap_err().to_string();
    assert!(err.contains("WAYPOINT_WORKER_THREADS"), "{err}");
    // (A runtime is dropped outside of any runtime.)
    std::thread::spawn(move || drop(rt)).join().unwrap();
    // 24 client nodes (pools), one HBONE connection and one request each.
    let mut backends = Vec::new();
    for _ in 0..24 {
        let pool = client_pool();
        let mut c = h1(mesh.tunnel_on(&pool, wp.hbone_addr, 80).await.unwrap()).await;
        let r = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        backends.push(backend(&r));
        text(r).await;
    }
    // One turn shared by the workers: alternate endpoints, whichever worker served.
    let a = backends.iter().filter(|b| *b == "echo-a").count();
    assert_eq!(a, 12, "{backends:?}");
    for node in &mesh.nodes {
        let mut upstream: Vec<SocketAddr> = node
            .connects
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.conn)
            .collect();
        upstream.sort();
        upstream.dedup();
        // All 24 on one of three sockets has odds of 3 in 3^24; 12 requests to this endpoint
        // all from one worker, about 3 in 3^12.
        assert!(
            (2..=3).contains(&upstream.len()),
            "upstream HBONE connections to {}: {upstream:?}",
            node.ip
        );
    }
    wp.drain().await;
    for t in threads {
        t.join().unwrap();
    }
    eventually("every HBONE socket closed", async || {
        tokio::net::TcpStream::connect(wp.hbone_addr).await.is_err()
    })
    .await;
}

/// gRPC over a port declared GRPC: unary and bidirectional streaming, with trailers. Each
/// streamed message is echoed before the next is sent, so neither direction is buffered.
#[tokio::test]
async fn grpc_unary_and_streaming_with_trailers() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h2(mesh.tunnel(wp.hbone_addr, 81).await.unwrap()).await;
    let grpc = |path: &str, body: Body| {
        Request::post(format!("http://{HOST}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap()
    };
    // Unary.
    let r = c
        .send_request(grpc("/test.Echo/Unary", full(grpc_frame(b"hi"))))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let all = r.into_body().collect().await.unwrap();
    let trailers = all.trailers().cloned().expect("trailers");
    let mut data = BytesMut::from(&all.to_bytes()[..]);
    assert_eq!(grpc_messages(&mut data), [Bytes::from("echo:hi")]);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-trailer"], "done");
    // Bidirectional streaming.
    let (tx, body) = channel_body();
    let r = c.send_request(grpc("/test.Echo/Chat", body)).await.unwrap();
    let mut rb = r.into_body();
    let mut buf = BytesMut::new();
    for i in 0..5 {
        let msg = format!("m{i}");
        tx.send(Frame::data(grpc_frame(msg.as_bytes())))
            .await
            .unwrap();
        let got = loop {
            let f = rb.frame().await.expect("stream ended").unwrap();
            buf.extend_from_slice(&f.into_data().unwrap());
            let mut m = grpc_messages(&mut buf);
            if !m.is_empty() {
                break m.remove(0);
            }
        };
        assert_eq!(got, Bytes::from(format!("echo:{msg}")));
    }
    drop(tx);
    let rest = rb.collect().await.unwrap();
    assert_eq!(rest.trailers().expect("trailers")["grpc-status"], "0");
    let m = admin_get(wp.admin_addr, "/metrics").await.1;
    eventually("both gRPC calls counted", async || {
        let m = admin_get(wp.admin_addr, "/metrics").await.1;
        requests_total(
            &m,
            &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""],
        ) == 2
    })
    .await;
    drop(m);
}

/// HTTP/2 on a port with no declared protocol: sniffed, and HTTP/2 to the endpoint too.
#[tokio::test]
async fn sniffed_http2_and_http1() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h2(mesh.tunnel(wp.hbone_addr, 82).await.unwrap()).await;
    let r = c
        .send_request(
            Request::get(format!("http://{HOST}/hello"))
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text(r).await, "hello from echo-a via HTTP/2.0");
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 82).await.unwrap()).await;
    let r = c.send_request(get("/hello")).await.unwrap();
    assert_eq!(text(r).await, "hello from echo-a via HTTP/1.1");
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let req = Request::get("/chat")
        .header("host", HOST)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(Bytes::new()))
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(r.headers()["upgrade"], "websocket");
    let mut io = TokioIo::new(hyper::upgrade::on(r).await.unwrap());
    for msg in [&b"\x81\x05hello"[..], b"\x81\x05again"] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn tcp_ports_copy_bytes() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    // 83 is declared TCP; 82 is sniffed, and these bytes are no HTTP.
    for port in [83, 82] {
        let mut t = mesh.tunnel(wp.hbone_addr, port).await.unwrap();
        t.write_all(b"\x16\x03\x01 not http").await.unwrap();
        let mut back = [0; 12];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"\x16\x03\x01 not http", "port {port}");
    }
    let mut seen: Vec<String> = mesh.connects().into_iter().map(|c| c.1.authority).collect();
    seen.sort();
    assert_eq!(seen, ["127.0.0.11:8082", "127.0.0.11:8083"]);
}

/// L7 policies on opaque TCP (Istio's network RBAC): an ALLOW whose only rule needs HTTP
/// (`methods`) allows no TCP connection, so the declared-TCP port's CONNECT is refused with
/// 403 and the sniffed one is closed without reaching the endpoint; HTTP on port 80 is allowed.
#[tokio::test]
async fn l7_policies_on_tcp_ports_as_network_rbac() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let yaml = format!(
        "{}authorizationPolicies:\n- namespace: default\n  name: allow-get\n  allServices: true\n  \
         rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n",
        mesh.yaml
    );
    let snapshot = zmesh_waypoint::bound::Snapshot::from_yaml(&yaml).unwrap();
    let wp = mesh.waypoint_with(LbPolicy::RoundRobin, snapshot).await;
    let e = mesh.tunnel(wp.hbone_addr, 83).await.unwrap_err();
    assert!(e.contains("403"), "{e}");
    let mut t = mesh.tunnel(wp.hbone_addr, 82).await.unwrap();
    t.write_all(b"\x16\x03\x01 not http").await.unwrap();
    let mut back = Vec::new();
    let n = t.read_to_end(&mut back).await.unwrap_or(0);
    assert_eq!(n, 0, "the sniffed TCP connection is closed unanswered");
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c.send_request(get("/hello")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    text(r).await;
    let seen: Vec<String> = mesh.connects().into_iter().map(|c| c.1.authority).collect();
    assert_eq!(
        seen,
        ["127.0.0.11:8080"],
        "only the HTTP request reached the endpoint"
    );
}

/// An endpoint whose node refuses connections: each request is retried on the other.
#[tokio::test]
async fn failed_connect_is_retried_on_another_endpoint() {
    let mesh = Mesh::new(&["echo-a", "echo-dead"], &["echo-dead"]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    for _ in 0..4 {
        let r = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(backend(&r), "echo-a");
        text(r).await;
    }
    eventually("4 requests counted 200", async || {
        let m = admin_get(wp.admin_addr, "/metrics").await.1;
        requests_total(
            &m,
            &["response_code=\"200\"", "destination_workload=\"echo-a\""],
        ) == 4
    })
    .await;
}

/// Least-request (P2C): with two endpoints both are candidates every time, so requests go to
/// the one without a request in flight.
#[tokio::test]
async fn least_request_avoids_the_busy_endpoint() {
    let mesh = Mesh::new(&["echo-a", "echo-b"], &[]).await;
    let wp = mesh.waypoint(LbPolicy::LeastRequest).await;
    let mut slow = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let held = tokio::spawn(async move { slow.send_request(get("/slow")).await.unwrap() });
    eventually("the slow request reached an endpoint", async || {
        mesh.connects().len() == 1
    })
    .await;
    let busy = mesh.connects()[0].0;
    let idle_name = if busy == endpoint_ip(0) {
        "echo-b"
    } else {
        "echo-a"
    };
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    for _ in 0..6 {
        let r = c.send_request(get("/hello")).await.unwrap();
        assert_eq!(backend(&r), idle_name);
        text(r).await;
    }
    mesh.release.notify_one();
    let r = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text(r).await, "slow");
}

#[tokio::test]
async fn every_endpoint_refusing_is_503_uf() {
    let mesh = Mesh::new(&["echo-dead"], &["echo-dead"]).await;
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    let r = c.send_request(get("/hello")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    text(r).await;
    eventually("the failure counted with UF", async || {
        let m = admin_get(wp.admin_addr, "/metrics").await.1;
        requests_total(&m, &["response_code=\"503\"", "response_flags=\"UF\""]) == 1
    })
    .await;
    let (code, _) = admin_get(wp.admin_addr, "/healthz/ready").await;
    assert_eq!(code, StatusCode::OK);
}

/// An idle keep-alive connection inside a tunnel is closed after the HBONE idle timeout (so
/// the tunnel, and the client's HBONE connection, can go), never while a request is open.
#[tokio::test]
async fn idle_connection_in_a_tunnel_is_closed() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let snapshot = zmesh_waypoint::bound::Snapshot::from_yaml(&mesh.yaml).unwrap();
    let mut cfg = mesh.config(LbPolicy::RoundRobin);
    cfg.hbone_limits.idle_timeout = Duration::from_secs(1);
    // Longer than the wait below: only the idle timeout may close the connection.
    cfg.hbone_limits.handshake_timeout = Duration::from_secs(120);
    let source = std::sync::Arc::new(zmesh_core::certs::LocalCaSource {
        ca: zmesh_core::tls::LocalCa::from_pem(mesh.ca.cert_pem(), mesh.ca.key_pem()).unwrap(),
        ttl: Duration::from_secs(3600),
    });
    let wp = zmesh_waypoint::Waypoint::start_with(cfg, source, snapshot)
        .await
        .unwrap();
    let mut c = h1(mesh.tunnel(wp.hbone_addr, 80).await.unwrap()).await;
    // A request slower than the idle timeout is not cut.
    let slow = c.send_request(get("/slow"));
    let release = mesh.release.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        release.notify_one();
    });
    let r = slow.await.unwrap();
    assert_eq!(text(r).await, "slow");
    assert!(!c.is_closed());
    eventually("the idle connection closed", async || c.is_closed()).await;
}
