//! Inbound HBONE (15008) against clients that hold connections (issue 9, problem 2): served
//! in process on loopback by a real `Proxy`, with a real mTLS client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh_core::certs::{CertStore, LocalCaSource};
use zmesh_core::identity::SpiffeId;
use zmesh_core::state::{LocalConfig, State};
use zmesh_core::tls::LocalCa;

use super::{Node, Proxy, serve_hbone};
use crate::config::{Config, WorkloadInfo};
use crate::metrics::Metrics;

/// Generous: the machine is shared and loaded.
const WAIT: Duration = Duration::from_secs(30);

struct Server {
    hbone: SocketAddr,
    ca: LocalCa,
    server_id: SpiffeId,
}

/// A proxy for the workload `default/server` (127.0.0.1), and the CA its certificates come from.
fn proxy(tune: impl FnOnce(&mut Config)) -> (Arc<Proxy>, LocalCa) {
    zmesh_core::tls::install_default_provider();
    let mut cfg = Config {
        workload: Some(WorkloadInfo {
            namespace: "default".into(),
            name: "server".into(),
            service_account: "server".into(),
        }),
        ..Config::default()
    };
    tune(&mut cfg);
    let state = State::from_local(
        LocalConfig::parse(
            "workloads:\n- {name: server, namespace: default, serviceAccount: server, workloadIps: [127.0.0.1]}\n",
        )
        .unwrap(),
    )
    .unwrap();
    let ca = LocalCa::generate("test-root").unwrap();
    let certs = CertStore::new(Arc::new(LocalCaSource {
        ca: LocalCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap(),
        ttl: Duration::from_secs(3600),
    }));
    let node = Arc::new(Node {
        cfg: Arc::new(cfg.clone()),
        state: Arc::new(ArcSwap::from_pointee(state)),
        certs,
        metrics: Metrics::register(&mut Registry::default()),
        conns: Arc::default(),
    });
    let proxy = Proxy::new(&node, cfg.workload.clone().unwrap(), None).unwrap();
    (proxy, ca)
}

async fn server(tune: impl FnOnce(&mut Config)) -> Server {
    let (proxy, ca) = proxy(tune);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    tokio::spawn(serve_hbone(proxy, listener));
    Server {
        hbone,
        ca,
        server_id: SpiffeId::new("cluster.local", "default", "server").unwrap(),
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// An mTLS connection to 15008 as a mesh workload (`client`), handshake done.
async fn mtls(s: &Server) -> Tls {
    let me = SpiffeId::new("cluster.local", "default", "client").unwrap();
    let cert = s.ca.issue(&me, Duration::from_secs(3600)).unwrap();
    let cfg = cert.client_config(vec![s.server_id.clone()]).unwrap();
    let tcp = TcpStream::connect(s.hbone).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(s.hbone.ip().into()), tcp)
        .await
        .unwrap()
}

/// An echo server on loopback; returns its address.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn closed_within(s: &mut Tls, limit: Duration) -> bool {
    // Whatever the server sends (its own HTTP/2 SETTINGS) is read past: only the end counts.
    let mut b = [0u8; 256];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn an_mtls_connection_without_the_http2_preface_is_closed_at_the_deadline() {
    let s = server(|c| c.listeners.hbone.handshake_timeout = Duration::from_millis(500)).await;
    let mut silent = mtls(&s).await;
    // The deadline covers the TLS handshake and the HTTP/2 preface.
    assert!(
        closed_within(&mut silent, WAIT).await,
        "an mTLS connection that never sent the HTTP/2 preface was kept open"
    );
}

#[tokio::test]
async fn a_connect_stream_keeps_its_connection_past_the_idle_timeout() {
    let s = server(|c| c.listeners.hbone.idle_timeout = Duration::from_millis(300)).await;
    let app = echo().await;
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(mtls(&s).await))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = zmesh_core::hbone::connect_request(app, &Default::default());
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    tunnel.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    tunnel.read_exact(&mut b).await.unwrap();
    // Idle far longer than the idle timeout, with the stream open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !conn.is_finished(),
        "an HBONE connection carrying a tunnel was closed"
    );
    tunnel.write_all(b"after!").await.unwrap();
    tunnel.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"after!");
}

#[tokio::test]
async fn an_hbone_connection_without_streams_is_closed_after_the_idle_timeout() {
    let s = server(|c| c.listeners.hbone.idle_timeout = Duration::from_millis(300)).await;
    let app = echo().await;
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(mtls(&s).await))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // One tunnel, closed: then nothing is in flight.
    let resp = sender
        .send_request(zmesh_core::hbone::connect_request(app, &Default::default()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(TokioIo::new(hyper::upgrade::on(resp).await.unwrap()));
    let ended = tokio::time::timeout(WAIT, conn)
        .await
        .expect("an HBONE connection with no streams was kept past the idle timeout");
    assert!(ended.unwrap().is_ok(), "closed with a GOAWAY, not reset");
}

/// Every open connection's task is allocated at the size of its future, for the connection's
/// whole life: the connect path (pool checkout, TLS and HTTP/2 handshakes, about 8 KiB of
/// future) must not be part of it (issue 9: idle connections cost 24-54 KiB on the client).
#[tokio::test]
async fn an_outbound_connection_task_does_not_carry_the_handshake() {
    let (proxy, _ca) = proxy(|_| {});
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let captured = TcpStream::connect(addr).await.unwrap();
    let task = proxy.clone().outbound(captured, addr);
    let size = std::mem::size_of_val(&task);
    assert!(
        size <= 4096,
        "an outbound connection's task holds a {size}-byte future for its whole life"
    );
}

#[test]
fn the_drain_cut_off_holds_a_connection_future_once() {
    // A future that keeps 4 KiB across its await, as a tunnel keeps its state.
    let fut = async {
        let state = [1u8; 4096];
        std::future::pending::<()>().await;
        state
    };
    let alone = std::mem::size_of_val(&fut);
    let cut_off = super::until_forced(fut, tokio_util::sync::CancellationToken::new());
    let wrapped = std::mem::size_of_val(&cut_off);
    assert!(
        wrapped <= alone + 256,
        "the cut-off makes a {alone}-byte future {wrapped} bytes"
    );
}
