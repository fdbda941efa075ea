//! A stand-in HBONE peer for lab tests (a waypoint, say): mTLS 1.3 with a real certificate
//! from the lab's CA, HTTP/2 CONNECT, and for each tunnel a record of who asked for what
//! (the client's SPIFFE identity and the CONNECT `:authority`). Every accepted tunnel answers
//! `200` and then replies to each chunk with `<name> <authority>\n`, so a client behind the mesh
//! can tell it reached this peer and for which target.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use http::{Method, Response, StatusCode};
use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::{WorkloadCertificate, connection_peer};

use crate::Sandbox;

/// One CONNECT the peer received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// The client's identity (its certificate's SPIFFE id).
    pub peer: Option<SpiffeId>,
    /// The CONNECT `:authority`.
    pub authority: String,
}

/// A running stand-in HBONE server; stops when dropped.
pub struct HbonePeer {
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    handshakes: Arc<Mutex<usize>>,
    stop: tokio_util::sync::CancellationToken,
}

impl HbonePeer {
    /// Listens on `0.0.0.0:port` in `netns` (listening before this returns) with `cert`, and
    /// answers as `name`.
    pub fn start(
        sandbox: &Sandbox,
        netns: &str,
        port: u16,
        cert: WorkloadCertificate,
        name: &str,
    ) -> Result<HbonePeer> {
        zmesh_core::tls::install_default_provider();
        let listener = sandbox
            .in_netns(netns, || TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding 0.0.0.0:{port} in {netns}"))?;
        listener.set_nonblocking(true)?;
        let peer = HbonePeer {
            tunnels: Arc::default(),
            handshakes: Arc::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let (tunnels, handshakes, stop) = (
            peer.tunnels.clone(),
            peer.handshakes.clone(),
            peer.stop.clone(),
        );
        let name = name.to_owned();
        std::thread::Builder::new()
            .name(format!("hbone-peer-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
                    loop {
                        let tcp = tokio::select! {
                            _ = stop.cancelled() => return,
                            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                        };
                        let (acceptor, tunnels, handshakes, name) = (
                            acceptor.clone(),
                            tunnels.clone(),
                            handshakes.clone(),
                            name.clone(),
                        );
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            *handshakes.lock().expect("lock") += 1;
                            let peer = connection_peer(tls.get_ref().1);
                            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                                let (tunnels, peer, name) =
                                    (tunnels.clone(), peer.clone(), name.clone());
                                async move { Ok::<_, std::convert::Infallible>(tunnel(req, peer, &tunnels, name)) }
                            });
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                });
            })?;
        Ok(peer)
    }

    /// Every CONNECT received so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().expect("lock").clone()
    }

    /// How many TLS handshakes completed (a client that refused the certificate completes
    /// none).
    pub fn handshakes(&self) -> usize {
        *self.handshakes.lock().expect("lock")
    }
}

impl Drop for HbonePeer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Records one CONNECT and serves its tunnel.
fn tunnel(
    req: http::Request<hyper::body::Incoming>,
    peer: Option<SpiffeId>,
    tunnels: &Mutex<Vec<Tunnel>>,
    name: String,
) -> Response<Empty<bytes::Bytes>> {
    let authority = req
        .uri()
        .authority()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut status = Response::new(Empty::new());
    if req.method() != Method::CONNECT {
        *status.status_mut() = StatusCode::BAD_REQUEST;
        return status;
    }
    tunnels.lock().expect("lock").push(Tunnel {
        peer,
        authority: authority.clone(),
    });
    tokio::spawn(async move {
        let Ok(up) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut io = TokioIo::new(up);
        let mut buf = [0u8; 4096];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let line = format!("{name} {authority}\n");
            if io.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
        let _ = io.shutdown().await;
    });
    status
}
