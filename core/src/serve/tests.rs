//! The accept path's limits, each shown failing a connection that breaks it and serving one
//! that keeps it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

const WAIT: Duration = Duration::from_secs(20);

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// A listener whose accepted connections are kept open (with their permits) in a channel.
async fn holding(
    limits: Limits,
    fds: FdHeadroom,
) -> (
    SocketAddr,
    StatsHandle,
    mpsc::UnboundedReceiver<Accepted<TcpStream>>,
) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let l = Listener::new(socket, "test", limits, Arc::new(fds));
    let stats = l.stats_handle();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            if tx.send(l.accept().await).is_err() {
                return;
            }
        }
    });
    (addr, stats, rx)
}

async fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((src, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the server closed the connection (EOF or reset) within `WAIT`.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Polls `f` until it holds, failing after `WAIT`.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn per_peer_and_listener_caps() {
    let l = limits(|l| {
        l.max_connections = 3;
        l.max_connections_per_peer = 2;
    });
    let (addr, stats, mut held) = holding(l, FdHeadroom::with_threshold(u64::MAX)).await;
    let _a = connect_from([127, 0, 0, 1], addr).await;
    let _b = connect_from([127, 0, 0, 1], addr).await;
    let first = held.recv().await.unwrap();
    let _second = held.recv().await.unwrap();
    // A third from the same peer is closed at once.
    let mut c = connect_from([127, 0, 0, 1], addr).await;
    assert!(
        closed(&mut c).await,
        "a third connection from one peer was kept"
    );
    assert_eq!(stats.stats().refused_peer_full, 1);
    // Another peer still gets in, up to the listener's cap.
    let _d = connect_from([127, 0, 0, 2], addr).await;
    let _third = held.recv().await.unwrap();
    let mut e = connect_from([127, 0, 0, 3], addr).await;
    assert!(
        closed(&mut e).await,
        "a connection over the listener's cap was kept"
    );
    assert_eq!(stats.stats().refused_listener_full, 1);
    assert_eq!(stats.stats().open, 3);
    // A closed connection frees its place (for its peer and the listener).
    drop(first);
    let mut f = connect_from([127, 0, 0, 1], addr).await;
    let accepted = tokio::time::timeout(WAIT, held.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.peer.unwrap().ip(), f.local_addr().unwrap().ip());
    f.write_all(b"x").await.unwrap();
    assert_eq!(stats.stats().accepted, 4);
}

#[tokio::test]
async fn grouped_listeners_share_one_cap() {
    // Two sockets, one listener to the operator: the cap counts both, as do the stats.
    let l = limits(|l| l.max_connections = 2);
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let first = Listener::new(a, "test", l, Arc::new(FdHeadroom::with_threshold(u64::MAX)));
    let second = first.group().listener(b);
    let stats = first.stats_handle();
    let (tx, mut held) = mpsc::unbounded_channel();
    for l in [first, second] {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                if tx.send(l.accept().await).is_err() {
                    return;
                }
            }
        });
    }
    let _a = connect_from([127, 0, 0, 1], addr_a).await;
    let _b = connect_from([127, 0, 0, 2], addr_b).await;
    let one = held.recv().await.unwrap();
    let _two = held.recv().await.unwrap();
    for to in [addr_a, addr_b] {
        let mut c = connect_from([127, 0, 0, 3], to).await;
        assert!(
            closed(&mut c).await,
            "a connection over the shared cap was kept"
        );
    }
    let s = stats.stats();
    assert_eq!((s.open, s.accepted, s.refused_listener_full), (2, 2, 2));
    // A place freed on one socket is free for the other.
    drop(one);
    let _c = connect_from([127, 0, 0, 3], addr_b).await;
    tokio::time::timeout(WAIT, held.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.stats().accepted, 3);
}

#[tokio::test]
async fn descriptor_headroom_sheds_connections() {
    // No descriptors to spare: every connection is refused, and the listener keeps going.
    let (addr, stats, mut held) = holding(Limits::default(), FdHeadroom::with_threshold(0)).await;
    for _ in 0..3 {
        let mut c = connect_from([127, 0, 0, 1], addr).await;
        assert!(closed(&mut c).await);
    }
    assert_eq!(stats.stats().refused_descriptors, 3);
    assert!(held.try_recv().is_err());
    // With room, the same listener code serves.
    let (addr, stats, mut held) =
        holding(Limits::default(), FdHeadroom::with_threshold(u64::MAX)).await;
    let _c = connect_from([127, 0, 0, 1], addr).await;
    held.recv().await.unwrap();
    assert_eq!(stats.stats().accepted, 1);
}

#[test]
fn bad_limits_are_refused_with_the_field_named() {
    let e = limits(|l| l.handshake_timeout = Duration::ZERO)
        .validate("listeners.hbone")
        .unwrap_err();
    assert!(
        e.to_string().contains("listeners.hbone.handshake_timeout"),
        "{e}"
    );
    assert!(limits(|l| l.max_connections = 0).validate("x").is_err());
    assert!(Limits::default().validate("x").is_ok());
}

/// Serves HTTP/2 on every accepted connection; each request's response body stays open until
/// the test sends on the channel the service hands out.
async fn h2_server(
    limits: Limits,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<(), ServeError>>,
    mpsc::UnboundedReceiver<mpsc::Sender<()>>,
) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let l = Listener::new(
        socket,
        "h2",
        limits,
        Arc::new(FdHeadroom::with_threshold(u64::MAX)),
    );
    let (done_tx, done) = mpsc::unbounded_channel();
    let (body_tx, bodies) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let a = l.accept().await;
            let (done_tx, body_tx) = (done_tx.clone(), body_tx.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (tx, mut rx) = mpsc::channel::<()>(1);
                    let _ = body_tx.send(tx);
                    let body = StreamBody::new(futures::stream::poll_fn(move |cx| {
                        rx.poll_recv(cx).map(|m| {
                            m.map(|()| Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x"))))
                        })
                    }));
                    async move { Ok::<_, Infallible>(Response::new(body)) }
                });
                let b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let stop = CancellationToken::new();
                let r = serve_h2(
                    a.stream,
                    &b,
                    svc,
                    Activity::new(),
                    &limits,
                    a.deadline,
                    &stop,
                )
                .await;
                let _ = done_tx.send(r);
            });
        }
    });
    (addr, done, bodies)
}

#[tokio::test]
async fn h2_preface_deadline() {
    let l = limits(|l| l.handshake_timeout = Duration::from_millis(300));
    let (addr, mut done, _) = h2_server(l).await;
    // Connected, silent: closed at the deadline.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut silent).await);
    let r = done.recv().await.unwrap();
    assert!(matches!(r, Err(ServeError::FirstBytesTimeout(_))), "{r:?}");
    // The preface alone, no SETTINGS: closed too.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(PREFACE).await.unwrap();
    assert!(closed(&mut half).await);
    assert!(matches!(
        done.recv().await.unwrap(),
        Err(ServeError::FirstBytesTimeout(_))
    ));
}

#[tokio::test]
async fn h2_idle_timeout_spares_connections_with_streams() {
    let idle = Duration::from_millis(400);
    let (addr, mut done, mut bodies) = h2_server(limits(|l| l.idle_timeout = idle)).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(Request::new(Empty::new()))
        .await
        .unwrap();
    let more = bodies.recv().await.unwrap();
    let mut body = resp.into_body();
    // A stream open for many idle timeouts: the connection stays, and still carries data.
    tokio::time::sleep(idle * 5).await;
    assert!(
        !sender.is_closed(),
        "a connection with a stream in flight was closed as idle"
    );
    more.send(()).await.unwrap();
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "x");
    // The stream ends: idle from now, closed with a GOAWAY after the timeout.
    drop(more);
    // (hyper may end the stream with an empty DATA frame.)
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap();
    assert!(rest.to_bytes().is_empty());
    let ended = tokio::time::timeout(WAIT, conn)
        .await
        .expect("the idle connection was not closed");
    assert!(
        ended.unwrap().is_ok(),
        "closed gracefully (GOAWAY), not reset"
    );
    assert!(done.recv().await.unwrap().is_ok());
}

#[tokio::test]
async fn h2_without_streams_is_closed_after_the_idle_timeout() {
    let (addr, mut done, _) =
        h2_server(limits(|l| l.idle_timeout = Duration::from_millis(300))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    tokio::time::timeout(WAIT, conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    until("the client to see the close", || sender.is_closed()).await;
    assert!(done.recv().await.unwrap().is_ok());
}

#[tokio::test]
async fn http1_head_deadline_and_idle() {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let l = limits(|l| {
        l.handshake_timeout = Duration::from_millis(300);
        l.idle_timeout = Duration::from_millis(300);
    });
    let listener = Listener::new(
        socket,
        "http1",
        l,
        Arc::new(FdHeadroom::with_threshold(u64::MAX)),
    );
    tokio::spawn(async move {
        loop {
            let a = listener.accept().await;
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = serve_http1(a.stream, svc, &l, &CancellationToken::new()).await;
                drop(a.permit);
            });
        }
    });
    // Silent: closed at the deadline.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut silent).await);
    // Half a request head: closed too.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed(&mut slow).await);
    // A whole request is answered; the kept-alive connection is then closed when idle.
    let mut ok = TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, ok.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(read.is_ok());
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
}

#[tokio::test]
async fn tls_handshake_deadline() {
    crate::tls::install_default_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let limit = Duration::from_millis(300);
    let l = Listener::new(
        socket,
        "tls",
        limits(|l| l.handshake_timeout = limit),
        Arc::new(FdHeadroom::with_threshold(u64::MAX)),
    );
    let server = tokio::spawn(async move {
        let a = l.accept().await;
        tls_accept(&acceptor, a.stream, a.deadline, limit)
            .await
            .map(|_| ())
    });
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut silent).await);
    let r = server.await.unwrap();
    assert!(matches!(r, Err(ServeError::TlsTimeout(_))), "{r:?}");
}
