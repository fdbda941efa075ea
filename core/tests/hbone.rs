//! In-process HBONE: the pool as client against a minimal HBONE server on loopback, with real
//! certificates, TLS 1.3 and HTTP/2 CONNECT.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response};
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zmesh_core::hbone::{H2Settings, HboneError, Pool, PoolConfig, PoolKey, SourceInfo};
use zmesh_core::identity::SpiffeId;
use zmesh_core::socket::SocketOptions;
use zmesh_core::tls::{LocalCa, WorkloadCertificate, connection_peer};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn cert(ca: &LocalCa, sa: &str) -> WorkloadCertificate {
    ca.issue(&id(sa), Duration::from_secs(3600)).unwrap()
}

/// What the server saw of each CONNECT.
#[derive(Default, Debug)]
struct Seen {
    peers: Vec<Option<SpiffeId>>,
    /// The same peers read from their certificates (`connection_peer`).
    certificate_peers: Vec<Option<SpiffeId>>,
    authorities: Vec<String>,
    headers: Vec<http::HeaderMap>,
    /// TLS connections open now.
    open: usize,
    /// Every connection whose handshake finished: full or resumed, and its suite.
    handshakes: Vec<HandshakeKind>,
    suites: Vec<rustls::CipherSuite>,
    /// Connections refused after their handshake (`client_peer` failed), with the reason.
    refused: Vec<String>,
}

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A server on loopback that accepts mTLS with `config` (a workload certificate's) and gives
/// each connection whose handshake succeeded to `serve`, in a task of its own.
async fn tls_server<F, Fut>(config: Arc<rustls::ServerConfig>, serve: F) -> SocketAddr
where
    F: Fn(ServerTls) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    zmesh_core::tls::install_default_provider();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// An HBONE server that echoes every tunnel (reading to EOF, then closing its side). It
/// resumes sessions as ztunnel's inbound does (`resuming_server_config`), records each
/// client's identity as the inbound reads it (`client_peer`: from the chain its verifier
/// remembered, verified again for a resumed session), which must be what the certificate
/// itself names, and closes a connection for which `client_peer` fails, as the inbound does.
async fn server(cert: WorkloadCertificate) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let ours = cert.clone();
    let addr = tls_server(cert.resuming_server_config(), move |tls| {
        let seen = s2.clone();
        let conns = s2.clone();
        let conn = tls.get_ref().1;
        let kind = conn.handshake_kind().expect("the handshake is over");
        let suite = conn.negotiated_cipher_suite().expect("a suite").suite();
        let peer = ours.client_peer(tls.get_ref().1);
        let certificate_peer = connection_peer(tls.get_ref().1);
        async move {
            {
                let mut s = conns.lock().unwrap();
                s.handshakes.push(kind);
                s.suites.push(suite);
            }
            let peer = match peer {
                Ok(peer) => peer,
                Err(e) => {
                    conns.lock().unwrap().refused.push(e.to_string());
                    return;
                }
            };
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                let peer = peer.clone();
                let certificate_peer = certificate_peer.clone();
                async move {
                    assert_eq!(req.method(), Method::CONNECT);
                    {
                        let mut s = seen.lock().unwrap();
                        s.peers.push(peer);
                        s.certificate_peers.push(certificate_peer);
                        s.authorities
                            .push(req.uri().authority().unwrap().to_string());
                        s.headers.push(req.headers().clone());
                    }
                    tokio::spawn(async move {
                        let up = hyper::upgrade::on(req).await.unwrap();
                        let mut io = TokioIo::new(up);
                        let mut buf = Vec::new();
                        io.read_to_end(&mut buf).await.unwrap();
                        io.write_all(&buf).await.unwrap();
                        io.shutdown().await.unwrap();
                    });
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                }
            });
            conns.lock().unwrap().open += 1;
            let _ = H2Settings::default()
                .server()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
            conns.lock().unwrap().open -= 1;
        }
    })
    .await;
    (addr, seen)
}

fn pool(max_streams: usize, idle: Duration) -> Arc<Pool> {
    let sockets = SocketOptions {
        mark: None,
        ..Default::default()
    };
    Pool::new(
        PoolConfig {
            max_streams,
            idle_timeout: idle,
        },
        H2Settings::default(),
        sockets,
    )
}

async fn echo_through(
    pool: &Pool,
    key: PoolKey,
    c: &WorkloadCertificate,
    payload: &[u8],
) -> Result<Vec<u8>, HboneError> {
    let src = SourceInfo {
        addr: Some("10.1.1.1:5555".parse().unwrap()),
        namespace: "default".into(),
        workload_name: "client".into(),
        ..Default::default()
    };
    let (mut t, _guard) = pool
        .connect(key, c, "10.9.9.9:8080".parse().unwrap(), &src)
        .await?;
    t.write_all(payload).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    Ok(back)
}

#[tokio::test]
async fn tunnel_carries_bytes_with_half_close_and_identities() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let p = pool(100, Duration::from_secs(60));
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let back = echo_through(
        &p,
        PoolKey::new(id("client"), vec![id("server")], addr, None),
        &client,
        &payload,
    )
    .await
    .unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "payload corrupted");
    let s = seen.lock().unwrap();
    assert_eq!(s.peers, vec![Some(id("client"))]);
    assert_eq!(s.certificate_peers, s.peers);
    assert_eq!(s.authorities, vec!["10.9.9.9:8080".to_string()]);
    assert_eq!(s.headers[0]["forwarded"], "for=\"10.1.1.1:5555\"");
    assert!(
        s.headers[0]["baggage"]
            .to_str()
            .unwrap()
            .contains("k8s.namespace.name=default")
    );
    assert!(
        s.headers[0]["traceparent"]
            .to_str()
            .unwrap()
            .starts_with("00-")
    );
}

#[tokio::test]
async fn pool_reuses_connections_up_to_the_stream_limit() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, _) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);

    let p = pool(100, Duration::from_secs(60));
    for _ in 0..5 {
        echo_through(&p, key.clone(), &client, b"x").await.unwrap();
    }
    assert_eq!(
        p.stats().connections_opened,
        1,
        "sequential tunnels share one connection"
    );

    // Concurrent first uses share one handshake.
    let p = pool(100, Duration::from_secs(60));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (p, key, client) = (p.clone(), key.clone(), client.clone());
            tokio::spawn(async move { echo_through(&p, key, &client, b"y").await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), b"y");
    }
    assert_eq!(p.stats().connections_opened, 1);

    // A stream limit of 1 opens a second connection while the first stream is open.
    let p = pool(1, Duration::from_secs(60));
    let src = SourceInfo::default();
    let target = "10.9.9.9:1".parse().unwrap();
    let (_t1, _g1) = p.connect(key.clone(), &client, target, &src).await.unwrap();
    let (_t2, _g2) = p.connect(key.clone(), &client, target, &src).await.unwrap();
    assert_eq!(p.stats().connections_opened, 2);

    // A different key (another source IP) never shares.
    let p = pool(100, Duration::from_secs(60));
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let k = PoolKey::new(
            id("client"),
            vec![id("server")],
            addr,
            Some(ip.parse().unwrap()),
        );
        echo_through(&p, k, &client, b"z").await.unwrap();
    }
    assert_eq!(p.stats().connections_opened, 2);

    // Idle timeout zero: no pooling at all.
    let p = pool(100, Duration::ZERO);
    for _ in 0..3 {
        echo_through(&p, key.clone(), &client, b"w").await.unwrap();
    }
    assert_eq!(p.stats().connections_opened, 3);
}

#[tokio::test]
async fn idle_connections_are_evicted() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, _) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let p = pool(100, Duration::from_millis(200));
    echo_through(&p, key.clone(), &client, b"a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    echo_through(&p, key, &client, b"b").await.unwrap();
    assert_eq!(
        p.stats().connections_opened,
        2,
        "idle connection was closed and replaced"
    );
}

/// After a load the pool gives its connections back: with the default settings a connection
/// nobody uses is closed within seconds (the server sees it end), not kept for minutes.
#[tokio::test]
async fn an_unused_connection_is_closed_within_seconds_by_default() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let sockets = SocketOptions {
        mark: None,
        ..Default::default()
    };
    let p = Pool::new(PoolConfig::default(), H2Settings::default(), sockets);
    echo_through(&p, key, &client, b"a").await.unwrap();
    assert_eq!(seen.lock().unwrap().open, 1);
    let t0 = std::time::Instant::now();
    while seen.lock().unwrap().open > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the pooled connection is still open after 30 s unused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn unexpected_server_identity_is_refused() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "impostor")).await;
    let client = cert(&ca, "client");
    let p = pool(100, Duration::from_secs(60));
    let err = echo_through(
        &p,
        PoolKey::new(id("client"), vec![id("server")], addr, None),
        &client,
        b"secret",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    assert!(
        err.to_string().contains("impostor"),
        "error names the presented identity: {err}"
    );
    assert_eq!(err.response_flag(), "TLS_FAILURE");
    assert!(
        seen.lock().unwrap().authorities.is_empty(),
        "no CONNECT reached the impostor"
    );
}

#[tokio::test]
async fn peers_of_another_root_are_refused_both_ways() {
    let ca = LocalCa::generate("root").unwrap();
    let other = LocalCa::generate("other-root").unwrap();
    // Client chains to another root: the server refuses it.
    let (addr, seen) = server(cert(&ca, "server")).await;
    let p = pool(100, Duration::from_secs(60));
    let res = echo_through(
        &p,
        PoolKey::new(id("client"), vec![id("server")], addr, None),
        &cert(&other, "client"),
        b"x",
    )
    .await;
    assert!(res.is_err(), "a client of a foreign root got through");
    assert!(seen.lock().unwrap().authorities.is_empty());
    // Server chains to another root: the client refuses it, even with the right identity.
    let (addr, seen) = server(cert(&other, "server")).await;
    let err = echo_through(
        &p,
        PoolKey::new(id("client"), vec![id("server")], addr, None),
        &cert(&ca, "client"),
        b"x",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    assert!(seen.lock().unwrap().authorities.is_empty());
}

#[tokio::test]
async fn other_trust_domain_is_refused_by_the_server() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let foreign = ca
        .issue(
            &SpiffeId::new("evil.example", "default", "client").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let p = pool(100, Duration::from_secs(60));
    let res = echo_through(
        &p,
        PoolKey::new(foreign.identity().clone(), vec![id("server")], addr, None),
        &foreign,
        b"x",
    )
    .await;
    assert!(res.is_err());
    assert!(seen.lock().unwrap().authorities.is_empty());
}

#[tokio::test]
async fn unreachable_peer_names_the_port() {
    let ca = LocalCa::generate("root").unwrap();
    let client = cert(&ca, "client");
    let free = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let p = pool(100, Duration::from_secs(60));
    let err = echo_through(
        &p,
        PoolKey::new(id("client"), vec![id("server")], free, None),
        &client,
        b"x",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HboneError::Connect(..)), "{err}");
    assert!(err.to_string().contains("15008"), "{err}");
}

/// A peer that accepts TCP and never says a TLS word, and a pool with a 300 ms timeout.
async fn stalling_peer() -> (SocketAddr, Arc<Pool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let sockets = SocketOptions {
        mark: None,
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    (
        addr,
        Pool::new(PoolConfig::default(), H2Settings::default(), sockets),
    )
}

#[tokio::test]
async fn a_peer_that_stalls_the_handshake_times_out() {
    let ca = LocalCa::generate("root").unwrap();
    let client = cert(&ca, "client");
    let (addr, p) = stalling_peer().await;
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let started = std::time::Instant::now();
    let err = echo_through(&p, key.clone(), &client, b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    assert!(err.to_string().contains("handshake within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The key is not wedged: the next attempt fails the same way instead of hanging.
    let err = tokio::time::timeout(Duration::from_secs(3), echo_through(&p, key, &client, b"y"))
        .await
        .expect("second attempt did not hang")
        .unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
}

#[tokio::test]
async fn callers_queued_behind_a_failed_handshake_fail_together() {
    let ca = LocalCa::generate("root").unwrap();
    let client = cert(&ca, "client");
    let (addr, p) = stalling_peer().await;
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (p, key, client) = (p.clone(), key.clone(), client.clone());
            tokio::spawn(async move { echo_through(&p, key, &client, b"x").await })
        })
        .collect();
    let mut shared = 0;
    for t in tasks {
        match t.await.unwrap().unwrap_err() {
            HboneError::PeerFailed(_, reason) => {
                assert!(reason.contains("handshake within"), "{reason}");
                shared += 1;
            }
            HboneError::Tls(..) => {}
            other => panic!("{other}"),
        }
    }
    assert_eq!(shared, 7, "one caller tried, the others shared its failure");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "callers retried in turn: {:?}",
        started.elapsed()
    );
}

/// A server whose first connection refuses every stream unprocessed (REFUSED_STREAM, as a
/// connection being closed for idleness does) and whose later connections echo.
async fn refusing_first_connection(cert: WorkloadCertificate) -> SocketAddr {
    let (echo, _) = server(cert.clone()).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
        let (tcp, _) = l.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(tls).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        });
        // Later connections: relayed to the echoing server.
        loop {
            let (mut tcp, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut up = tokio::net::TcpStream::connect(echo).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stream_refused_by_a_closing_connection_is_retried_on_a_new_one() {
    let ca = LocalCa::generate("root").unwrap();
    let addr = refusing_first_connection(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let p = pool(100, Duration::from_secs(60));
    let back = echo_through(&p, key, &client, b"retried").await.unwrap();
    assert_eq!(back, b"retried");
    assert_eq!(
        p.stats().connections_opened,
        2,
        "the retry used a new connection"
    );
}

/// `cert`'s chain with a key that is not the one it was issued for: what a thief of the
/// certificate (but not the key) could present.
fn stolen(cert: &WorkloadCertificate) -> WorkloadCertificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    WorkloadCertificate::new(cert.chain().to_vec(), key, cert.roots().to_vec()).unwrap()
}

#[tokio::test]
async fn a_remembered_chain_still_needs_its_key_and_the_expected_identity() {
    let ca = LocalCa::generate("root").unwrap();
    let server_cert = cert(&ca, "server");
    let (addr, seen) = server(server_cert.clone()).await;
    let client = cert(&ca, "client");
    // No pooling: every tunnel is a new TLS connection (resumed after the first).
    let p = pool(100, Duration::ZERO);
    let key = || PoolKey::new(id("client"), vec![id("server")], addr, None);
    for _ in 0..3 {
        assert_eq!(echo_through(&p, key(), &client, b"x").await.unwrap(), b"x");
    }
    assert_eq!(seen.lock().unwrap().authorities.len(), 3);
    assert_eq!(p.stats().connections_opened, 3);
    // Each side verified the other's chain once and remembers it.
    assert_eq!(client.remembered_chains(), (1, 0));
    assert_eq!(server_cert.remembered_chains(), (0, 1));

    // A second client: its chain is remembered beside the first one's, and the server reads
    // each connection's own identity from the memory.
    let client2 = cert(&ca, "client2");
    let key2 = || PoolKey::new(id("client2"), vec![id("server")], addr, None);
    for _ in 0..2 {
        assert_eq!(
            echo_through(&p, key2(), &client2, b"z").await.unwrap(),
            b"z"
        );
    }
    assert_eq!(server_cert.remembered_chains(), (0, 2));

    // The same chain with a certificate the path does not use appended (anyone can make such
    // variants of a chain they have seen): accepted, as before, but not remembered, so
    // variants cannot fill the memory.
    let padded = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = ca
            .sign(&id("client"), &key, Duration::from_secs(3600))
            .unwrap();
        let extra = cert(&ca, "bystander").chain()[0].clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        WorkloadCertificate::new(vec![leaf, extra], key, vec![ca.root().clone()]).unwrap()
    };
    for _ in 0..2 {
        assert_eq!(
            echo_through(&p, key(), &padded(), b"y").await.unwrap(),
            b"y"
        );
    }
    assert_eq!(server_cert.remembered_chains(), (0, 2));

    // The client's chain without its key: the server refuses it although it knows the chain.
    let res = echo_through(&p, key(), &stolen(&client), b"x").await;
    assert!(res.is_err(), "a stolen client certificate got through");
    assert_eq!(seen.lock().unwrap().authorities.len(), 7);
    // Remembered (the first five) or not (the padded two), the server read each peer's own
    // identity, the one its certificate names.
    let mut expected = vec![Some(id("client")); 3];
    expected.extend(vec![Some(id("client2")); 2]);
    expected.extend(vec![Some(id("client")); 2]);
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.peers, expected);
        assert_eq!(s.certificate_peers, expected);
    }

    // The server's chain without its key: the client refuses it although it knows the chain.
    let (fake, fake_seen) = server(stolen(&server_cert)).await;
    let fake_key = PoolKey::new(id("client"), vec![id("server")], fake, None);
    let err = echo_through(&p, fake_key, &client, b"x").await.unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    assert!(fake_seen.lock().unwrap().authorities.is_empty());

    // A known chain of another identity than the one expected is refused, naming it.
    let other = PoolKey::new(id("client"), vec![id("someone-else")], addr, None);
    let err = echo_through(&p, other, &client, b"x").await.unwrap_err();
    assert!(err.to_string().contains("sa/server"), "{err}");
    assert_eq!(seen.lock().unwrap().authorities.len(), 7);
    assert_eq!(client.remembered_chains(), (1, 0));
}

/// A new connection to a server this certificate's client side connected to before resumes
/// the TLS session (no certificates, no signatures), and each side still knows the other as
/// a full handshake would have told it.
#[tokio::test]
async fn a_new_connection_to_the_same_server_resumes_its_session() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let p = pool(100, Duration::ZERO);
    let key = || PoolKey::new(id("client"), vec![id("server")], addr, None);
    for _ in 0..3 {
        assert_eq!(echo_through(&p, key(), &client, b"r").await.unwrap(), b"r");
    }
    // Another client certificate (a renewed one, or another workload) has no session yet.
    let renewed = cert(&ca, "client");
    assert_eq!(echo_through(&p, key(), &renewed, b"n").await.unwrap(), b"n");
    let s = seen.lock().unwrap();
    use HandshakeKind::{Full, Resumed};
    assert_eq!(s.handshakes, vec![Full, Resumed, Resumed, Full]);
    // Between zmesh peers, AES-128-GCM with SHA-256 (the client's first choice).
    assert_eq!(
        s.suites,
        vec![rustls::CipherSuite::TLS13_AES_128_GCM_SHA256; 4]
    );
    assert_eq!(s.peers, vec![Some(id("client")); 4]);
    assert_eq!(s.certificate_peers, s.peers);
    assert!(s.refused.is_empty(), "{:?}", s.refused);
}

/// A ticket is kept for the server address and the identities expected of it together: a
/// connection to the same address that expects someone else gets a full handshake (and
/// refuses the server's certificate), never the session verified for the first expectation.
#[tokio::test]
async fn a_session_is_offered_only_under_the_expectation_it_was_verified_for() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let p = pool(100, Duration::ZERO);
    let expecting = |who: &str| PoolKey::new(id("client"), vec![id(who)], addr, None);
    echo_through(&p, expecting("server"), &client, b"a")
        .await
        .unwrap();
    let err = echo_through(&p, expecting("someone-else"), &client, b"b")
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    assert!(err.to_string().contains("sa/server"), "{err}");
    // The refused attempt never finished a handshake (the client gave up on the server's
    // certificate), and the ticket for the first expectation is still there.
    echo_through(&p, expecting("server"), &client, b"c")
        .await
        .unwrap();
    let s = seen.lock().unwrap();
    assert_eq!(
        s.handshakes,
        vec![HandshakeKind::Full, HandshakeKind::Resumed]
    );
    assert_eq!(s.authorities.len(), 2);
}

/// rustls does not verify a resumed server's chain again; the client does: a session with a
/// server whose certificate has expired since is refused, although the server resumed it.
#[tokio::test]
async fn a_resumed_server_whose_certificate_expired_since_is_refused() {
    let ca = LocalCa::generate("root").unwrap();
    let short = ca.issue(&id("server"), Duration::from_secs(2)).unwrap();
    let (addr, seen) = server(short).await;
    let client = cert(&ca, "client");
    let p = pool(100, Duration::ZERO);
    let key = || PoolKey::new(id("client"), vec![id("server")], addr, None);
    echo_through(&p, key(), &client, b"a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let err = echo_through(&p, key(), &client, b"b").await.unwrap_err();
    assert!(matches!(err, HboneError::Tls(..)), "{err}");
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("resumed session's server certificate no longer verifies")
            && text.contains("expired"),
        "{err}"
    );
    // (Whether the server saw its side of the resumed handshake finish depends on how soon
    // the client's close reaches it; only the first handshake is certain.)
    let s = seen.lock().unwrap();
    assert_eq!(s.handshakes[0], HandshakeKind::Full);
    assert_eq!(
        s.authorities.len(),
        1,
        "no CONNECT went over the refused session"
    );
}

/// The server's side of the same: a client whose certificate has expired since its session
/// began is refused when it resumes, and no CONNECT of its is served.
#[tokio::test]
async fn a_resumed_client_whose_certificate_expired_since_is_refused() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, seen) = server(cert(&ca, "server")).await;
    let short = ca.issue(&id("client"), Duration::from_secs(2)).unwrap();
    let p = pool(100, Duration::ZERO);
    let key = || PoolKey::new(id("client"), vec![id("server")], addr, None);
    echo_through(&p, key(), &short, b"a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert!(echo_through(&p, key(), &short, b"b").await.is_err());
    let s = seen.lock().unwrap();
    assert_eq!(
        s.handshakes,
        vec![HandshakeKind::Full, HandshakeKind::Resumed]
    );
    assert_eq!(s.refused.len(), 1);
    assert!(
        s.refused[0].to_lowercase().contains("expired"),
        "{:?}",
        s.refused
    );
    assert_eq!(
        s.authorities.len(),
        1,
        "no CONNECT went over the refused session"
    );
}

/// An HBONE server that reads a CONNECT's first DATA before it answers, records it (`None`
/// when none came within a few seconds), then answers 200 and echoes the rest after it.
async fn reading_before_answering(
    cert: WorkloadCertificate,
) -> (SocketAddr, Arc<Mutex<Vec<Option<Bytes>>>>) {
    let firsts = Arc::new(Mutex::new(Vec::new()));
    let seen = firsts.clone();
    let addr = tls_server(cert.server_config(), move |tls| {
        let seen = seen.clone();
        async move {
            let mut conn = h2::server::handshake(tls).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let first = tokio::time::timeout(Duration::from_secs(3), body.data())
                        .await
                        .ok()
                        .flatten()
                        .map(Result::unwrap);
                    seen.lock().unwrap().push(first.clone());
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    if let Some(b) = first {
                        let _ = body.flow_control().release_capacity(b.len());
                        send.send_data(b, false).unwrap();
                    }
                    while let Some(Ok(b)) = body.data().await {
                        let _ = body.flow_control().release_capacity(b.len());
                        send.send_data(b, false).unwrap();
                    }
                    send.send_data(Bytes::new(), true).unwrap();
                });
            }
        }
    })
    .await;
    (addr, firsts)
}

/// Opens a tunnel with `first` sent along, writes `rest`, half-closes and reads to the end.
async fn through_with_first(
    pool: &Pool,
    key: PoolKey,
    c: &WorkloadCertificate,
    first: &'static [u8],
    rest: &[u8],
) -> Vec<u8> {
    let (mut t, _guard) = pool
        .connect_with(
            key,
            c,
            "10.9.9.9:8080".parse().unwrap(),
            &SourceInfo::default(),
            Bytes::from_static(first),
        )
        .await
        .unwrap();
    t.write_all(rest).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn bytes_already_written_go_with_the_connect_before_its_answer() {
    let ca = LocalCa::generate("root").unwrap();
    let (addr, firsts) = reading_before_answering(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let p = pool(100, Duration::from_secs(60));
    let back = through_with_first(&p, key.clone(), &client, b"GET / ", b"HTTP/1.1").await;
    assert_eq!(back, b"GET / HTTP/1.1");
    // Without them, the server has nothing before it answers.
    let back = echo_through(&p, key, &client, b"later").await.unwrap();
    assert_eq!(back, b"later");
    assert_eq!(
        *firsts.lock().unwrap(),
        vec![Some(Bytes::from_static(b"GET / ")), None],
    );
}

#[tokio::test]
async fn bytes_already_written_reach_a_hyper_server_through_its_upgrade() {
    // hyper's CONNECT upgrade is what upstream ztunnel serves HBONE with.
    let ca = LocalCa::generate("root").unwrap();
    let (addr, _) = server(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let p = pool(100, Duration::from_secs(60));
    let back = through_with_first(&p, key, &client, b"first, ", b"then the rest").await;
    assert_eq!(back, b"first, then the rest");
}

#[tokio::test]
async fn bytes_already_written_are_sent_again_when_the_connect_is_retried() {
    let ca = LocalCa::generate("root").unwrap();
    let addr = refusing_first_connection(cert(&ca, "server")).await;
    let client = cert(&ca, "client");
    let key = PoolKey::new(id("client"), vec![id("server")], addr, None);
    let p = pool(100, Duration::from_secs(60));
    let back = through_with_first(&p, key, &client, b"early ", b"and late").await;
    assert_eq!(back, b"early and late");
    assert_eq!(
        p.stats().connections_opened,
        2,
        "the retry used a new connection"
    );
}
