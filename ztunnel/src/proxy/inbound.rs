//! Inbound: HBONE on 15008 (mutual TLS, HTTP/2 CONNECT to the local workload) and plaintext
//! on 15006 (clients outside the mesh; no peer identity).
//!
//! Waypoints: inbound only ever delivers to the local workload, so a tunnel from the
//! workload's waypoint (its identity, from one of its endpoints: `State::from_waypoint`) is
//! delivered and never sent back to the waypoint. A tunnel to a waypoint-bound workload that
//! did not come through the waypoint is delivered too, as upstream ztunnel does (istio/ztunnel
//! @ `62d82653` `src/proxy/inbound.rs`); it is logged at debug level. To make traversal
//! mandatory, allow only the waypoint's identity with an AuthorizationPolicy (Istio's
//! documented pattern).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use zmesh_core::hbone::Tunnel;
use zmesh_core::identity::SpiffeId;
use zmesh_core::serve::{ActiveGuard, ServeError, hbone_tls_accept, serve_h2_streams};

use super::decide::{InboundFacts, Outcome, decide, log_dry_run};
use super::policy::{self, Peer};
use super::{Proxy, ProxyError, accept_loop, copy_until, finish, refuse};
use crate::metrics::{ConnectionRecord, TrafficLabels, connection_failed};
use futures::FutureExt as _;
use futures::future::Either;
use zmesh_core::telemetry::{Label, unknown};

/// Accepts HBONE connections until draining starts.
pub async fn serve_hbone(proxy: Arc<Proxy>, listener: TcpListener) {
    let limits = proxy.node.cfg.listeners.hbone;
    accept_loop(
        proxy,
        "hbone",
        limits,
        listener,
        |p, s, peer, _| async move {
            if let Err(e) = hbone_connection(p, s, peer).await {
                connection_failed("inbound", peer, None, &e);
            }
        },
    )
    .await
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("no certificate to serve with: {0}")]
    Certificate(zmesh_core::certs::CertError),
    #[error("cannot read the local address: {0}")]
    Local(std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

async fn hbone_connection(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(), InboundError> {
    let local_addr = tcp.local_addr().map_err(InboundError::Local)?;
    let cert = proxy
        .node
        .certs
        .get(&proxy.identity)
        .await
        .map_err(InboundError::Certificate)?;
    let limits = proxy.node.cfg.listeners.hbone;
    // One deadline for the TLS handshake and the HTTP/2 preface + SETTINGS, from the moment a
    // certificate is at hand (a slow CA is not the client's fault).
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // The verifier admitted only a certificate with a SPIFFE id of our trust domain.
    let (tls, peer_id) = hbone_tls_accept(&cert, tcp, deadline, limits.handshake_timeout).await?;
    let peer_id = Arc::new(peer_id);
    let p = proxy.clone();
    // Each CONNECT is served on a task of its own (tracked for the drain), from the answer to
    // the end of its tunnel. Tunnels count as in flight for as long as they live (`busy`): a
    // connection carrying one is never idle; one carrying none is closed (GOAWAY) after the
    // idle timeout.
    serve_h2_streams(
        tls,
        &proxy.node.cfg.h2,
        &limits,
        deadline,
        &proxy.drain,
        move |req, respond, busy| {
            let connect =
                p.clone()
                    .handle_connect(req, respond, peer, local_addr, peer_id.clone(), busy);
            p.spawn_connection(connect);
        },
    )
    .await?;
    Ok(())
}

/// An admitted CONNECT: what its tunnel needs, and the handle to answer it with.
struct Admitted {
    upstream: TcpStream,
    rec: ConnectionRecord,
    registration: policy::Registration,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// Answers a CONNECT with `code` and no tunnel.
fn answer(mut respond: SendResponse<Bytes>, code: StatusCode) {
    // An error means the peer is gone already: nothing is left to tell.
    let _ = respond.send_response(status(code), true);
}

impl Proxy {
    /// Serves one CONNECT from the decision to the tunnel's end, as two futures one after the
    /// other (`then`), so that the task holds only the phase it is in. The decision (its
    /// config snapshot, labels and the app connect) is boxed and freed once it is made; the
    /// tunnel's future starts from what the decision admitted. As one `async fn`, the request,
    /// the answer handle and the addresses it was called with would stay part of the task for
    /// as long as the tunnel lives (measured per idle connection: 5.4 -> 8.7 KiB with the
    /// decision inlined).
    fn handle_connect(
        self: Arc<Self>,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: SocketAddr,
        local_addr: SocketAddr,
        peer_id: Arc<Option<SpiffeId>>,
        busy: ActiveGuard,
    ) -> impl Future<Output = ()> + Send + 'static {
        let decided = Box::pin(async move {
            let admitted = self.admit(req, respond, peer, local_addr, peer_id).await;
            admitted.map(|a| (self, a))
        });
        decided.then(move |admitted| match admitted {
            Some((proxy, admitted)) => Either::Left(proxy.tunnel(busy, admitted)),
            None => Either::Right(std::future::ready(())),
        })
    }

    /// Answers an admitted CONNECT and copies until the tunnel ends. `admitted` is used in
    /// place, not taken apart into locals (a second copy in the future). Parameters drop in
    /// reverse order: `_busy` after what `admitted` still holds, so the tunnel counts as in
    /// flight until all of it is gone.
    async fn tunnel(self: Arc<Self>, _busy: ActiveGuard, mut admitted: Admitted) {
        let res = match admitted
            .respond
            .send_response(status(StatusCode::OK), false)
        {
            Ok(send) => {
                let mut tunnel = Tunnel::new(send, admitted.recv);
                // On revocation the tunnel is dropped unfinished: the client gets a stream
                // reset, the app a close.
                copy_until(
                    &mut tunnel,
                    &mut admitted.upstream,
                    self.node.cfg.copy_buffer,
                    admitted.registration.revoked(),
                )
                .await
            }
            Err(e) => Err(ProxyError::Io(std::io::Error::other(e))),
        };
        finish(admitted.rec, res);
    }

    /// Decides a CONNECT: checks it, asks the policies and connects to the app. A refusal is
    /// answered (and recorded) here; an admitted CONNECT is answered by the caller.
    async fn admit(
        &self,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: SocketAddr,
        local_addr: SocketAddr,
        peer_id: Arc<Option<SpiffeId>>,
    ) -> Option<Admitted> {
        let reject = |respond, code, why: String| {
            connection_failed(
                "inbound",
                peer,
                None,
                &format!("CONNECT refused with {code}: {why}"),
            );
            answer(respond, code)
        };
        let connect = match zmesh_core::hbone::parse_connect(&req, &self.node.cfg.illegal_ports()) {
            Ok(c) => c,
            Err(e) => {
                reject(respond, StatusCode::BAD_REQUEST, e.to_string());
                return None;
            }
        };
        let target = connect.target;
        // The source is who connected, not what the client's `forwarded` header claims:
        // that header is informational and any mesh workload could forge it.
        let src_addr = peer;
        // Registered before the config is read: a policy change published from here on
        // re-checks this connection.
        let registration = self.node.conns.register(
            &self.workload_key,
            Peer {
                src_ip: src_addr.ip(),
                src_identity: peer_id.as_ref().clone(),
                dst: target,
            },
        );
        // One config snapshot for the whole decision (`decide`: only this workload, at its own
        // address, if the mesh knows it, and as its policies say).
        let state = self.node.state.load_full();
        let facts = InboundFacts {
            workload_key: &self.workload_key,
            arrived_on: Some(local_addr.ip()),
            peer: registration.peer(),
        };
        let decision = decide(&facts, &state);
        log_dry_run(&decision, registration.peer(), "inbound");
        let (local_w, allowed_by) = match decision.outcome {
            Outcome::Admit { workload, policy } => (workload, Ok(policy)),
            Outcome::Deny {
                workload: Some(workload),
                denial,
            } => (workload, Err(denial)),
            Outcome::Deny { workload: None, .. } => {
                reject(
                    respond,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "this proxy's workload {} is not in the mesh config",
                        self.workload_key
                    ),
                );
                return None;
            }
            Outcome::NotLocal => {
                reject(
                    respond,
                    StatusCode::BAD_REQUEST,
                    format!(
                        "target {target} is not this workload (connection arrived on {local_addr})"
                    ),
                );
                return None;
            }
        };
        // Log only: not worked out unless the debug line is enabled.
        if local_w.waypoint.is_some() && tracing::enabled!(tracing::Level::DEBUG) {
            let from_waypoint = peer_id
                .as_ref()
                .as_ref()
                .is_some_and(|id| state.from_waypoint(local_w, id, src_addr.ip()));
            tracing::debug!(%target, %src_addr, from_waypoint,
                "tunnel to a waypoint-bound workload: delivered to the workload only");
        }
        let principal: Label = peer_id
            .as_ref()
            .as_ref()
            .map_or_else(unknown, |i| i.to_string().into());
        let mut labels = TrafficLabels::new("destination")
            .source_as(state.workload_by_ip(src_addr.ip()).map(|w| &**w), principal)
            .destination_as(Some(local_w), self.identity_label.clone());
        let host_hint = connect.host_hint;
        if let Some(svc) = state.inbound_service(local_w, host_hint.as_deref()) {
            labels = labels.service(svc);
        }
        labels.connection_security_policy = "mutual_tls";
        // AuthorizationPolicy, before the app is connected.
        let allowed_by = match allowed_by {
            Ok(p) => p,
            Err(denial) => {
                labels.response_flags = "DENY";
                let rec = ConnectionRecord::open(
                    &self.node.metrics,
                    labels,
                    "inbound",
                    src_addr,
                    target,
                    None,
                );
                finish(rec, Err(ProxyError::Denied(denial)));
                answer(respond, StatusCode::UNAUTHORIZED);
                return None;
            }
        };
        let mut rec = ConnectionRecord::open(
            &self.node.metrics,
            labels,
            "inbound",
            src_addr,
            target,
            None,
        );
        rec.set_policy(allowed_by);
        // Answer 200 only once the workload accepted the connection.
        let upstream = match self.connect_as(target, src_addr).await {
            Ok(s) => s,
            Err(e) => {
                rec.set_response_flag("CONNECT");
                rec.finish(Default::default(), Some(&ProxyError::Upstream(target, e)));
                answer(respond, StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        // A policy change while connecting: the client is told, the app connection dropped.
        if registration.is_revoked() {
            let denial = registration.revoked().await;
            finish(
                rec,
                Err(ProxyError::Revoked {
                    bytes: Default::default(),
                    denial,
                }),
            );
            answer(respond, StatusCode::UNAUTHORIZED);
            return None;
        }
        // Only the body stream goes on: the config snapshot and the request's headers are
        // dropped with this future.
        Some(Admitted {
            upstream,
            rec,
            registration,
            recv: req.into_body(),
            respond,
        })
    }
}

impl Proxy {
    /// Connects to the local app. In a pod (shared mode), from the client's own address, as
    /// upstream ztunnel does, so the app sees who called; elsewhere, or if the kernel refuses
    /// the transparent bind, from the pod's address.
    async fn connect_as(
        &self,
        target: SocketAddr,
        client: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        if self.sockets.netns.is_some() && client.ip() != target.ip() {
            let opts = zmesh_core::socket::SocketOptions {
                transparent: true,
                ..self.sockets.clone()
            };
            match zmesh_core::socket::connect(target, Some(client.ip()), &opts).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(e),
                Err(e) => {
                    tracing::debug!(%client, error = %e, "cannot connect from the client's address; using the pod's")
                }
            }
        }
        zmesh_core::socket::connect(target, None, &self.sockets).await
    }
}

/// Accepts plaintext inbound connections (redirected to 15006) until draining starts.
pub async fn serve_plaintext(proxy: Arc<Proxy>, listener: TcpListener) {
    let limits = proxy.node.cfg.listeners.inbound_plaintext;
    accept_loop(
        proxy,
        "inbound_plaintext",
        limits,
        listener,
        |p, s, peer, _| async move { p.plaintext(s, peer).await },
    )
    .await
}

impl Proxy {
    async fn plaintext(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let Some(orig) = self.captured_destination(&stream, peer, "inbound") else {
            return;
        };
        // Registered before the config is read: a policy change published from here on
        // re-checks this connection.
        let registration = self.node.conns.register(
            &self.workload_key,
            Peer {
                src_ip: peer.ip(),
                src_identity: None,
                dst: orig,
            },
        );
        // One config snapshot for the decision (`decide`), dropped once it is made. Only this
        // workload is served here: the capture rule matches any destination, and relaying
        // elsewhere would let an outsider use the pod as a plaintext TCP relay. An unknown
        // destination workload is denied; policies see no peer identity.
        let (mut labels, allowed_by) = {
            let state = self.node.state.load_full();
            let facts = InboundFacts {
                workload_key: &self.workload_key,
                arrived_on: stream.local_addr().map(|a| a.ip()).ok(),
                peer: registration.peer(),
            };
            let decision = decide(&facts, &state);
            log_dry_run(&decision, registration.peer(), "inbound");
            let (local, allowed_by) = match decision.outcome {
                Outcome::Admit { workload, policy } => (Some(workload), Ok(policy)),
                Outcome::Deny { workload, denial } => (workload, Err(denial)),
                Outcome::NotLocal => {
                    refuse(&stream);
                    connection_failed("inbound", peer, Some(orig), &ProxyError::NotLocal(orig));
                    return;
                }
            };
            // A plaintext peer proves no identity, whatever its address claims.
            let mut labels = TrafficLabels::new("destination")
                .source_as(state.workload_by_ip(peer.ip()).map(|w| &**w), unknown());
            if let Some(w) = local {
                labels = labels.destination(w);
            }
            (labels, allowed_by)
        };
        let allowed_by = match allowed_by {
            Ok(p) => p,
            Err(denial) => {
                refuse(&stream);
                labels.response_flags = "DENY";
                let rec =
                    ConnectionRecord::open(&self.node.metrics, labels, "inbound", peer, orig, None);
                finish(rec, Err(ProxyError::Denied(denial)));
                return;
            }
        };
        let mut rec =
            ConnectionRecord::open(&self.node.metrics, labels, "inbound", peer, orig, None);
        rec.set_policy(allowed_by);
        let res = match zmesh_core::socket::connect(orig, None, &self.sockets).await {
            Ok(mut upstream) => {
                copy_until(
                    &mut stream,
                    &mut upstream,
                    self.node.cfg.copy_buffer,
                    registration.revoked(),
                )
                .await
            }
            Err(e) => {
                refuse(&stream);
                Err(ProxyError::Upstream(orig, e))
            }
        };
        if matches!(res, Err(ProxyError::Revoked { .. })) {
            // Closed by a policy change: a reset, not a clean end.
            refuse(&stream);
        }
        finish(rec, res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, C, D, E, F, G, R>(_: impl FnOnce(A, B, C, D, E, F, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// An open tunnel's task is this future: each byte of it is held per open connection.
    /// 2,056 bytes when the decision's arguments stayed in it for the tunnel's life; about
    /// 1,400 in a debug build since.
    #[test]
    fn an_inbound_connects_future_holds_the_tunnel_not_the_decision() {
        let size = returned_size(Proxy::handle_connect);
        assert!(size <= 1600, "an inbound CONNECT's future is {size} bytes");
    }

    /// A refused CONNECT's reason goes into a log line: a peer's 20 KB authority or method
    /// must not make a 20 KB line.
    #[test]
    fn a_refused_connect_names_a_bounded_authority() {
        let long = format!("{}.example:80", "a".repeat(20_000));
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(long.as_str())
            .body(())
            .unwrap();
        let why = zmesh_core::hbone::parse_connect(&req, &[])
            .unwrap_err()
            .to_string();
        assert!(
            why.len() < 600 && why.contains("truncated, 20011 bytes"),
            "the log line would carry {} bytes of the peer's authority",
            why.len()
        );
        let method = Method::from_bytes("X".repeat(5000).as_bytes()).unwrap();
        let req = Request::builder()
            .method(method)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let why = zmesh_core::hbone::parse_connect(&req, &[])
            .unwrap_err()
            .to_string();
        assert!(why.len() < 600, "{} bytes", why.len());
        let ok = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        assert_eq!(
            zmesh_core::hbone::parse_connect(&ok, &[]).unwrap().target,
            "10.0.0.1:80".parse().unwrap()
        );
    }
}
