//! The HBONE listener on 15008: mutual TLS 1.3 (the peer must hold a SPIFFE id of our trust
//! domain), HTTP/2 CONNECT whose `:authority` is the original service `VIP:port`. A target not
//! bound to this waypoint is refused with 400, as upstream ztunnel answers a CONNECT for a
//! target it does not serve (istio/ztunnel `src/proxy/inbound.rs`). An accepted tunnel is
//! served by protocol: declared, else sniffed (HTTP/2 preface, HTTP/1 request line, TCP).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use zmesh_core::hbone::{StreamGuard, Tunnel, forwarded_for, parse_connect};
use zmesh_core::identity::SpiffeId;
use zmesh_core::peer_text::PeerText;
use zmesh_core::serve::{
    ActiveGuard, Activity, Listener, ServeError, Tracked, hbone_tls_accept, serve_h2_streams,
};

use crate::app::Waypoint;
use crate::bound::PortProtocol;
use crate::http::{Downstream, proxy};
use crate::sniff::{Detected, detect};
use crate::telemetry::meta_from_baggage;
use crate::upstream::{UpstreamError, Upstreams, endpoints};
use zmesh_core::telemetry::{Label, WorkloadMeta, unknown};

/// Ports a CONNECT may never target (the waypoint's own: a loop).
pub const OWN_PORTS: [u16; 3] = [15008, 15020, 15021];

/// Why an HBONE connection ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no certificate to serve with: {0}")]
    Certificate(#[from] zmesh_core::certs::CertError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Accepts HBONE connections until draining starts (the shared accept path: caps, descriptor
/// headroom, handshake deadline, idle timeout). Runs once per worker runtime, each on its own
/// socket of the HBONE address, its connections served on that runtime and their upstream
/// requests sent through `upstreams`, that runtime's own.
pub async fn serve_hbone(
    wp: Arc<Waypoint>,
    listener: Listener<TcpListener>,
    upstreams: Arc<Upstreams>,
) {
    loop {
        let a = tokio::select! {
            _ = wp.drain.cancelled() => return,
            a = listener.accept() => a,
        };
        let Some(peer) = a.peer else { continue };
        let _ = a.stream.set_nodelay(true);
        let permit = a.permit;
        let w = wp.clone();
        let up = upstreams.clone();
        wp.tracker.spawn(async move {
            let _permit = permit;
            if let Err(e) = hbone_connection(w, up, a.stream, peer).await {
                // A GOAWAY's debug data (up to a frame, 1 MiB) is in the error.
                let error = PeerText::display(&e, zmesh_core::peer_text::PEER_ERROR_MAX);
                tracing::info!(%peer, %error, "HBONE connection failed");
            }
        });
    }
}

async fn hbone_connection(
    wp: Arc<Waypoint>,
    upstreams: Arc<Upstreams>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), ServerError> {
    let cert = wp.certs.get(&wp.cfg.identity).await?;
    let limits = wp.cfg.hbone_limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // The verifier admitted only a SPIFFE id of our trust domain; looked up once per
    // connection, in the chains the verifier remembered.
    let (tls, id) = hbone_tls_accept(&cert, tcp, deadline, limits.handshake_timeout).await?;
    let principal = Arc::new(PeerPrincipal {
        label: id.as_ref().map(|i| i.to_string().into()),
        id,
        upstreams,
    });
    let w = wp.clone();
    // Each CONNECT is served on a task of its own, from the decision to its tunnel's end; the
    // tunnel runs on h2's stream handles (`hbone::H2Tunnel`), not on hyper's upgrade, so its
    // bytes move with no task in between. Tunnels count as in flight while they live.
    serve_h2_streams(
        tls,
        &wp.cfg.h2,
        &limits,
        deadline,
        &wp.drain,
        move |req, respond, busy| {
            let conn = w.clone();
            let principal = principal.clone();
            w.tracker
                .spawn(handle_connect(conn, req, respond, peer, principal, busy));
        },
    )
    .await?;
    Ok(())
}

/// What the CONNECTs of one HBONE connection share: the peer's identity, parsed
/// (authorization) and as text (the access log, the `source_principal` label), and the
/// upstream side of the worker runtime the connection landed on.
struct PeerPrincipal {
    id: Option<SpiffeId>,
    label: Option<Label>,
    upstreams: Arc<Upstreams>,
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// Answers a CONNECT with `code` and no tunnel, and says why in the access log.
fn refuse(
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    principal: Option<&str>,
    code: StatusCode,
    why: &str,
) {
    tracing::info!(
        target: "access",
        reporter = "waypoint",
        src.addr = %peer,
        src.identity = principal.unwrap_or("-"),
        response_code = code.as_u16(),
        error = %why,
        "CONNECT refused"
    );
    // An error means the peer is gone already: nothing is left to tell.
    let _ = respond.send_response(status(code), true);
}

async fn handle_connect(
    wp: Arc<Waypoint>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    principal: Arc<PeerPrincipal>,
    busy: ActiveGuard,
) {
    let _busy = busy;
    // Boxed: the decision's state (the snapshot, the labels, an upstream connect) is freed once
    // it is made instead of staying part of the task for as long as the tunnel lives.
    let Some((req, respond, ds, tcp_upstream)) =
        Box::pin(admit(&wp, req, respond, peer, principal)).await
    else {
        return;
    };
    let mut respond = respond;
    let send = match respond.send_response(status(StatusCode::OK), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "CONNECT not answered: the peer is gone");
            return;
        }
    };
    let io = Tunnel::new(send, req.into_body());
    match tcp_upstream {
        Some(up) => copy_tcp(io, up, &ds).await,
        None => serve_tunnel(wp, ds, io).await,
    }
}

/// An admitted CONNECT: its request, the handle to answer it with, what the waypoint knows of
/// its source and target, and (for opaque TCP) the upstream tunnel already open.
type Admitted = (
    Request<RecvStream>,
    SendResponse<Bytes>,
    Arc<Downstream>,
    Option<(Tunnel, StreamGuard, SocketAddr)>,
);

/// Decides a CONNECT: a refusal is answered (and logged) here and gives `None`.
async fn admit(
    wp: &Arc<Waypoint>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    who: Arc<PeerPrincipal>,
) -> Option<Admitted> {
    let principal = who.label.clone();
    let connect = match parse_connect(&req, &OWN_PORTS) {
        Ok(c) => c,
        Err(e) => {
            refuse(
                respond,
                peer,
                principal.as_deref(),
                StatusCode::BAD_REQUEST,
                &e.to_string(),
            );
            return None;
        }
    };
    let target = connect.target;
    let snap = wp.snapshot.load_full();
    let Some(binding) = snap.binding(target).cloned() else {
        let why = format!("{target} is not a service port bound to this waypoint");
        refuse(
            respond,
            peer,
            principal.as_deref(),
            StatusCode::BAD_REQUEST,
            &why,
        );
        return None;
    };
    // The source's labels: the workload at the peer's address (ztunnel connects from the
    // client pod's IP), else what the client's `baggage` says.
    let mut source = match snap.state.workload_by_ip(peer.ip()) {
        Some(w) => WorkloadMeta::from_workload(w),
        None => req
            .headers()
            .get("baggage")
            .and_then(|v| v.to_str().ok())
            .map(meta_from_baggage)
            .unwrap_or_default(),
    };
    // The client's principal is the one its certificate proves.
    source.principal = who.label.clone().unwrap_or_else(unknown);
    let client = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    let peer_id = who.id.clone();
    let ds = Arc::new(Downstream {
        peer,
        client,
        principal,
        peer_id,
        source,
        target,
        binding,
        upstreams: who.upstreams.clone(),
    });
    // Opaque TCP: authorized first (L7 policies as Istio's network RBAC decides them), then
    // 200 only once an endpoint accepted (ztunnel's semantics for a tunnel).
    let tcp_upstream = if ds.binding.port.protocol == PortProtocol::Tcp {
        if let Err(why) = crate::authz::check_tcp(&snap, &ds) {
            refuse(
                respond,
                peer,
                ds.principal.as_deref(),
                StatusCode::FORBIDDEN,
                &why,
            );
            return None;
        }
        match connect_tcp(wp, &ds).await {
            Ok(u) => Some(u),
            Err(e) => {
                let why = e.to_string();
                let code = StatusCode::SERVICE_UNAVAILABLE;
                refuse(respond, peer, ds.principal.as_deref(), code, &why);
                return None;
            }
        }
    } else {
        None
    };
    Some((req, respond, ds, tcp_upstream))
}

/// An upstream tunnel for opaque TCP: the first endpoint that accepts, in LB order.
async fn connect_tcp(
    wp: &Waypoint,
    ds: &Downstream,
) -> Result<(Tunnel, StreamGuard, SocketAddr), UpstreamError> {
    let snap = wp.snapshot.load_full();
    let eps = endpoints(&snap, &ds.binding);
    if eps.is_empty() {
        return Err(UpstreamError::NoEndpoints(ds.binding.service.key()));
    }
    let mut last = None;
    for ep in ds.upstreams.order(&ds.binding, &eps) {
        match ds
            .upstreams
            .tunnel(ep, ds.client, &ds.binding.service.hostname)
            .await
        {
            Ok((t, g)) => return Ok((t, g, ep.addr)),
            Err(e) => {
                tracing::warn!(endpoint = %ep.addr, error = %e, "upstream connect failed; trying another endpoint");
                last = Some(e);
            }
        }
    }
    Err(UpstreamError::AllFailed(Box::new(
        last.expect("at least one endpoint was tried"),
    )))
}

async fn copy_tcp<S: AsyncRead + AsyncWrite + Unpin>(
    mut down: S,
    up: (Tunnel, StreamGuard, SocketAddr),
    ds: &Downstream,
) {
    let (mut tunnel, _guard, addr) = up;
    let r = tokio::io::copy_bidirectional(&mut down, &mut tunnel).await;
    let (sent, received) = r.as_ref().map_or((0, 0), |&(a, b)| (b, a));
    tracing::info!(
        target: "access",
        reporter = "waypoint",
        src.addr = %ds.client.unwrap_or(ds.peer),
        src.identity = ds.principal.as_deref().unwrap_or("-"),
        dst.service = %ds.binding.service.hostname,
        dst.addr = %addr,
        protocol = "tcp",
        bytes_sent = sent,
        bytes_received = received,
        error = r.err().map(|e| e.to_string()).as_deref().unwrap_or("-"),
        "connection"
    );
}

/// Serves one accepted tunnel by protocol.
async fn serve_tunnel(wp: Arc<Waypoint>, ds: Arc<Downstream>, io: Tunnel) {
    let declared = ds.binding.port.protocol;
    let (detected, io) = match detect(io, wp.cfg.sniff_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(peer = %ds.peer, error = %e, "tunnel closed before its first bytes");
            return;
        }
    };
    let kind = match (declared, detected) {
        (_, Detected::Http2) => Detected::Http2,
        // A declared HTTP port is HTTP: hyper answers what does not parse.
        (PortProtocol::Http | PortProtocol::Http2 | PortProtocol::Grpc, _) => Detected::Http1,
        (_, d) => d,
    };
    // Declared HTTP/2 and gRPC stay HTTP/2 upstream; otherwise the client's protocol.
    let up_h2 =
        matches!(declared, PortProtocol::Http2 | PortProtocol::Grpc) || kind == Detected::Http2;
    let w = wp.clone();
    let d = ds.clone();
    // Requests count as in flight until their response body ends; a connection with none for
    // the HBONE idle timeout is shut down gracefully, so an idle keep-alive connection does not
    // hold its tunnel (and the HBONE connection) forever.
    let activity = Activity::new();
    let svc = Tracked::new(
        service_fn(move |req| {
            let w = w.clone();
            let d = d.clone();
            // Boxed once here: hyper moves the service's future into its dispatcher, and a
            // future moves by copying all of it.
            let f = Box::pin(proxy(w, d, req, up_h2));
            async move { Ok::<_, Infallible>(f.await) }
        }),
        activity.clone(),
    );
    let idle = wp.cfg.hbone_limits.idle_timeout;
    let result = match kind {
        Detected::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(wp.cfg.hbone_limits.handshake_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = wp.drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = activity.idle(idle) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Detected::Http2 => {
            // Boxed: a future is as large as its largest state, and an HTTP/2 server
            // connection is about 1.6 KB larger than an HTTP/1 one; unboxed, every HTTP/1
            // tunnel's task would hold that room for its whole life.
            let mut conn = Box::pin(wp.cfg.h2.server().serve_connection(TokioIo::new(io), svc));
            tokio::select! {
                r = conn.as_mut() => r,
                _ = wp.drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = activity.idle(idle) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Detected::Tcp => {
            if let Err(why) = crate::authz::check_tcp(&wp.snapshot.load(), &ds) {
                tracing::warn!(target: "access", peer = %ds.peer, src.identity = ds.principal.as_deref().unwrap_or("-"),
                    dst.service = %ds.binding.service.hostname, error = %why, "connection refused");
                return;
            }
            match connect_tcp(&wp, &ds).await {
                Ok(up) => copy_tcp(io, up, &ds).await,
                Err(e) => tracing::warn!(peer = %ds.peer, error = %e, "TCP tunnel: no upstream"),
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %ds.peer, error = %e, "tunnel connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, C, R>(_: impl FnOnce(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A served tunnel's task is this future, for as long as its client keeps the connection:
    /// each byte of it is held per open tunnel. 5,440 bytes in a debug build while it held an
    /// HTTP/2 server connection inline (the largest state, so every HTTP/1 tunnel paid for
    /// it); 3,816 with that connection boxed.
    #[test]
    fn a_tunnels_future_does_not_hold_room_for_an_http2_connection() {
        let size = returned_size(serve_tunnel);
        assert!(size <= 4200, "a served tunnel's future is {size} bytes");
    }
}
