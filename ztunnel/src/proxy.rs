//! The data path of one proxied workload: outbound capture on 15001 (this file), inbound HBONE
//! on 15008 and inbound plaintext on 15006 (`inbound.rs`). All three share a [`Proxy`].

mod copy;
mod decide;
mod inbound;
pub mod policy;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::future::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zmesh_core::certs::CertStore;
use zmesh_core::hbone::{Pool, PoolKey, SourceInfo, StreamGuard, Tunnel};
use zmesh_core::identity::SpiffeId;
use zmesh_core::netns::Netns;
use zmesh_core::serve::{FdHeadroom, Limits, Listener};
use zmesh_core::socket::{SocketOptions, original_dst};
use zmesh_core::state::{Protocol, Resolved, State, Workload};

use crate::config::{Config, WorkloadInfo};
use crate::metrics::{
    Bytes, ConnectionRecord, Metrics, TrafficLabels, WaypointLabels, connection_failed,
};

pub use copy::{copy, copy_after, copy_until};
pub use inbound::{serve_hbone, serve_plaintext};

/// What every proxy of a node shares.
pub struct Node {
    pub cfg: Arc<Config>,
    pub state: Arc<ArcSwap<State>>,
    pub certs: Arc<CertStore>,
    pub metrics: Metrics,
    /// Every open inbound connection, re-checked when the policies change.
    pub conns: Arc<policy::Registry>,
}

/// Everything the listeners of one workload share.
pub struct Proxy {
    /// What every proxy of the node shares (config, state, certificates, metrics, the
    /// registry of open inbound connections).
    pub node: Arc<Node>,
    pub pool: Arc<Pool>,
    pub workload: WorkloadInfo,
    /// `workload`'s key in [`State`], made once.
    pub workload_key: String,
    pub identity: SpiffeId,
    /// [`Proxy::identity`] as a metrics label value, made once (not per connection).
    pub identity_label: zmesh_core::telemetry::Label,
    /// Cancelled when draining starts: listeners stop accepting.
    pub drain: CancellationToken,
    /// Tracks every open connection, so a drain can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes: connections still open are closed.
    pub force: CancellationToken,
    pub sockets: SocketOptions,
}

/// Why a captured connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read the original destination (is the REDIRECT rule in place?): {0}")]
    OriginalDst(std::io::Error),
    #[error("refused: destination port {0} is one of ztunnel's own ports (a loop)")]
    Loop(u16),
    #[error(
        "refused: {0} is not this workload's address (plaintext inbound serves only its own workload)"
    )]
    NotLocal(SocketAddr),
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {0} has no healthy endpoint")]
    NoEndpoints(String),
    #[error(
        "refused: {destination} is behind waypoint {waypoint}, which cannot be reached ({reason}); \
         check the waypoint's Gateway, Service and pods (traffic is never sent around a waypoint)"
    )]
    WaypointNotReady {
        destination: String,
        waypoint: String,
        reason: &'static str,
    },
    /// The waypoint is published ready but its tunnel could not be opened (its process is
    /// gone, or it refused): as [`ProxyError::WaypointNotReady`], never a bypass.
    #[error(
        "refused: {destination} is behind waypoint {waypoint}, which cannot be reached \
         ({source}); check the waypoint's pods and their logs (traffic is never sent around a \
         waypoint)"
    )]
    WaypointUnreachable {
        destination: String,
        waypoint: String,
        source: Box<ProxyError>,
    },
    #[error("no certificate for {0}: {1}")]
    Certificate(SpiffeId, zmesh_core::certs::CertError),
    #[error(transparent)]
    Hbone(#[from] zmesh_core::hbone::HboneError),
    #[error("cannot connect to {0}: {1}")]
    Upstream(SocketAddr, std::io::Error),
    #[error("workload identity: {0}")]
    Identity(zmesh_core::identity::IdentityError),
    #[error("cannot bind port {0}: {1}")]
    Bind(u16, std::io::Error),
    #[error("copy ended with an error: {source}")]
    Copy {
        bytes: Bytes,
        source: std::io::Error,
    },
    #[error("denied by AuthorizationPolicy: {0}")]
    Denied(policy::Denial),
    #[error("closed by a policy change: {denial}")]
    Revoked {
        bytes: Bytes,
        denial: policy::Denial,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// Istio's `response_flags` for this failure.
    pub fn response_flag(&self) -> &'static str {
        match self {
            ProxyError::Hbone(e) => e.response_flag(),
            ProxyError::WaypointUnreachable { source, .. } => source.response_flag(),
            ProxyError::Certificate(..) => "IDENTITY_ERROR",
            ProxyError::NoPort { .. } => "NR",
            ProxyError::NoEndpoints(_) | ProxyError::WaypointNotReady { .. } => "UH",
            ProxyError::Denied(_) | ProxyError::Revoked { .. } => "DENY",
            ProxyError::Io(_) | ProxyError::Copy { .. } => "-",
            _ => "CONNECT",
        }
    }
}

impl Proxy {
    /// A proxy for `workload` whose sockets are created in `netns` (ztunnel's own when
    /// `None`). Its identity comes from the workload's service account and trust domain.
    pub fn new(
        node: &Arc<Node>,
        workload: WorkloadInfo,
        netns: Option<Netns>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let workload_key = zmesh_core::state::workload_key(
            &workload.namespace,
            &workload.name,
            &workload.service_account,
        );
        let trust_domain = node
            .state
            .load()
            .workload_by_key(&workload_key)
            .map(|w| w.trust_domain.clone())
            .unwrap_or_else(|| node.cfg.trust_domain.clone());
        let identity = SpiffeId::new(
            &trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .map_err(ProxyError::Identity)?;
        let sockets = SocketOptions {
            netns,
            mark: node.cfg.mark(),
            connect_timeout: node.cfg.connect_timeout,
            ..SocketOptions::default()
        };
        Ok(Arc::new(Proxy {
            node: node.clone(),
            pool: Pool::new(node.cfg.pool, node.cfg.h2, sockets.clone()),
            workload,
            workload_key,
            identity_label: identity.to_string().into(),
            identity,
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            force: CancellationToken::new(),
            sockets,
        }))
    }

    /// Binds 15001, 15008 and 15006 (inside the proxy's netns, with SO_REUSEPORT so a new
    /// ztunnel can bind beside a draining one) and serves them until the drain starts.
    pub fn start(self: &Arc<Self>) -> Result<(), ProxyError> {
        let ports = self.node.cfg.ports;
        let bind = |port| {
            zmesh_core::socket::listen(
                self.node.cfg.bind(port),
                true,
                self.node.cfg.mark(),
                self.sockets.netns.as_ref(),
            )
            .map_err(|e| ProxyError::Bind(port, e))
        };
        let (outbound, hbone, plaintext) = (
            bind(ports.outbound)?,
            bind(ports.hbone)?,
            bind(ports.inbound_plaintext)?,
        );
        tokio::spawn(self.clone().serve_outbound(outbound));
        tokio::spawn(serve_hbone(self.clone(), hbone));
        tokio::spawn(serve_plaintext(self.clone(), plaintext));
        Ok(())
    }

    /// Stops accepting and lets open connections finish; returns once they did or the
    /// deadline passed (then they are left to close with the process or the pod).
    pub async fn drain_connections(&self, deadline: std::time::Duration) -> bool {
        self.drain.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        if !drained {
            // Past the deadline: close what is left, so that its sockets (and a removed pod's
            // network namespace, which they keep alive) are released now.
            self.force.cancel();
        }
        drained
    }

    /// Runs a connection's task, tracked for the drain and cut off by the drain deadline
    /// (dropped unrun if that has passed already).
    pub fn spawn_connection<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(until_forced(fut, self.force.clone()));
    }

    fn source_labels(&self, reporter: &'static str, local: Option<&Workload>) -> TrafficLabels {
        TrafficLabels::new(reporter).source_as(local, self.identity_label.clone())
    }

    /// Accepts captured outbound connections until draining starts.
    pub async fn serve_outbound(self: Arc<Self>, listener: TcpListener) {
        let limits = self.node.cfg.listeners.outbound;
        accept_loop(
            self,
            "outbound",
            limits,
            listener,
            |p, s, peer, _| async move { p.outbound(s, peer).await },
        )
        .await
    }

    /// The destination a captured connection was aimed at, unless it cannot be read or would
    /// loop back into ztunnel (then the connection is refused and logged).
    fn captured_destination(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        direction: &'static str,
    ) -> Option<SocketAddr> {
        let orig = match original_dst(stream) {
            Ok(a) => a,
            Err(e) => {
                connection_failed(direction, peer, None, &ProxyError::OriginalDst(e));
                return None;
            }
        };
        if self.node.cfg.illegal_ports().contains(&orig.port()) {
            refuse(stream);
            connection_failed(direction, peer, Some(orig), &ProxyError::Loop(orig.port()));
            return None;
        }
        Some(orig)
    }

    async fn outbound(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Some(orig) = self.captured_destination(&stream, peer, "outbound") else {
            return;
        };
        let (rec, route) = self.outbound_route(orig, peer);
        let res = match route {
            Route::Hbone {
                key,
                target,
                src,
                waypoint,
            } => {
                self.outbound_hbone(stream, key, target, *src, waypoint.as_deref())
                    .await
            }
            Route::Tcp(dst) => self.outbound_tcp(stream, dst).await,
            Route::Refused(e) => {
                refuse(&stream);
                Err(e)
            }
        };
        finish(rec, res);
    }

    /// Decides where a captured connection goes, from one config snapshot (a reload in
    /// between cannot mix two configs). Synchronous on purpose: the snapshot, the workload
    /// records and the labels' sources are dropped here, not held for the connection's life.
    fn outbound_route(&self, orig: SocketAddr, peer: SocketAddr) -> (ConnectionRecord, Route) {
        let state = self.node.state.load();
        let local = state.workload_by_key(&self.workload_key);
        let resolved = state.route(orig, local.map(|w| &**w), |n| rand::random_range(0..n));
        let mut labels = self.source_labels("source", local.map(|w| &**w));
        let open = |labels, dst, hbone| {
            ConnectionRecord::open(&self.node.metrics, labels, "outbound", peer, dst, hbone)
        };
        match resolved {
            Resolved::Upstream(up) => {
                labels = labels.destination(&up.workload);
                if let Some(s) = &up.service {
                    labels = labels.service(s);
                }
                if up.workload.protocol != Protocol::Hbone {
                    return (open(labels, up.address, None), Route::Tcp(up.address));
                }
                labels.connection_security_policy = "mutual_tls";
                let hbone = SocketAddr::new(up.address.ip(), self.node.cfg.ports.hbone);
                let src = self.source_info(peer, up.service.as_deref(), local.map(|w| &**w));
                let key =
                    PoolKey::new(self.identity.clone(), up.identities, hbone, Some(peer.ip()));
                let route = Route::Hbone {
                    key,
                    target: up.address,
                    src: Box::new(src),
                    waypoint: None,
                };
                (open(labels, hbone, Some(up.address)), route)
            }
            Resolved::Waypoint(wp) => {
                // The waypoint is the peer; the destination labels stay the original's.
                labels.connection_security_policy = "mutual_tls";
                if let Some(s) = &wp.service {
                    labels = labels.service(s);
                } else if let Some(w) = state.workload_by_ip(wp.target.ip()) {
                    labels = labels.destination(w);
                }
                let src = self.source_info(peer, wp.service.as_deref(), local.map(|w| &**w));
                let key = PoolKey::new(
                    self.identity.clone(),
                    wp.identities,
                    wp.hbone,
                    Some(peer.ip()),
                );
                // CONNECT names the original destination: the waypoint picks the endpoint.
                let waypoint = WaypointLabels {
                    destination: wp
                        .service
                        .as_ref()
                        .map_or_else(|| wp.target.to_string(), |s| s.key()),
                    waypoint: wp.waypoint.to_string(),
                };
                let route = Route::Hbone {
                    key,
                    target: wp.target,
                    src: Box::new(src),
                    waypoint: Some(Box::new(waypoint)),
                };
                (open(labels, wp.hbone, Some(wp.target)), route)
            }
            Resolved::WaypointNotReady {
                destination,
                waypoint,
                reason,
            } => {
                // The refusal names the Service it was for (`destination` is its key when the
                // traffic was addressed to one).
                if let Some(s) = state.service(&destination) {
                    labels = labels.service(s);
                }
                self.node
                    .metrics
                    .waypoint_unavailable
                    .get_or_create(&WaypointLabels {
                        destination: destination.clone(),
                        waypoint: waypoint.clone(),
                    })
                    .inc();
                let refused = ProxyError::WaypointNotReady {
                    destination,
                    waypoint,
                    reason,
                };
                (open(labels, orig, None), Route::Refused(refused))
            }
            Resolved::Passthrough => (open(labels, orig, None), Route::Tcp(orig)),
            Resolved::NoPort { service, port } => (
                open(labels, orig, None),
                Route::Refused(ProxyError::NoPort { service, port }),
            ),
            Resolved::NoEndpoints { service } => (
                open(labels, orig, None),
                Route::Refused(ProxyError::NoEndpoints(service)),
            ),
        }
    }

    /// What the HBONE request says about the source (headers `forwarded`, `baggage`).
    fn source_info(
        &self,
        peer: SocketAddr,
        service: Option<&zmesh_core::state::Service>,
        local: Option<&Workload>,
    ) -> SourceInfo {
        SourceInfo {
            addr: Some(peer),
            service_host: service.map(|s| s.hostname.clone()),
            cluster: self.node.cfg.cluster_id.clone(),
            namespace: self.workload.namespace.clone(),
            workload_name: self.workload.name.clone(),
            workload_type: local.map(|w| w.workload_type.clone()).unwrap_or_default(),
            canonical_name: local.map(|w| w.canonical_name.clone()).unwrap_or_default(),
            canonical_revision: local
                .map(|w| w.canonical_revision.clone())
                .unwrap_or_default(),
        }
    }

    /// `waypoint`: the waypoint the tunnel goes to, if it does; failing to open it is then
    /// counted and reported as the waypoint's unavailability.
    async fn outbound_hbone(
        &self,
        mut stream: TcpStream,
        key: PoolKey,
        target: SocketAddr,
        src: SourceInfo,
        waypoint: Option<&WaypointLabels>,
    ) -> Result<Bytes, ProxyError> {
        // What the app already wrote (a client-first protocol's request) goes right behind
        // the CONNECT, not a round trip later (`Pool::connect_with`).
        let first = match zmesh_core::socket::already_written(&stream) {
            Ok(b) => b,
            // Reset before its tunnel was asked for: an ordinary end, as in the copy.
            Err(e) if copy::benign(&e) => return Ok(Bytes::default()),
            Err(e) => {
                refuse(&stream);
                return Err(ProxyError::Io(e));
            }
        };
        let early = first.len() as u64;
        // Boxed: the certificate lookup, the pool checkout and the TLS and HTTP/2 handshakes
        // are large futures that live only until the tunnel is up. Inlined, their space would
        // be part of every connection's task for as long as the connection lives.
        let opened = Box::pin(self.open_tunnel(key, target, src, first)).await;
        let (mut tunnel, _guard) = match opened {
            Ok(t) => t,
            Err(e) => {
                refuse(&stream);
                let Some(w) = waypoint else { return Err(e) };
                self.node
                    .metrics
                    .waypoint_unavailable
                    .get_or_create(w)
                    .inc();
                return Err(ProxyError::WaypointUnreachable {
                    destination: w.destination.clone(),
                    waypoint: w.waypoint.clone(),
                    source: Box::new(e),
                });
            }
        };
        copy_after(&mut stream, &mut tunnel, self.node.cfg.copy_buffer, early).await
    }

    async fn open_tunnel(
        &self,
        key: PoolKey,
        target: SocketAddr,
        src: SourceInfo,
        first: bytes::Bytes,
    ) -> Result<(Tunnel, StreamGuard), ProxyError> {
        let cert = self
            .node
            .certs
            .get(&self.identity)
            .await
            .map_err(|e| ProxyError::Certificate(self.identity.clone(), e))?;
        Ok(self
            .pool
            .connect_with(key, &cert, target, &src, first)
            .await?)
    }

    async fn outbound_tcp(
        &self,
        mut stream: TcpStream,
        dst: SocketAddr,
    ) -> Result<Bytes, ProxyError> {
        // Boxed for the same reason as the HBONE connect path.
        let connected = Box::pin(zmesh_core::socket::connect(dst, None, &self.sockets)).await;
        let mut upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                refuse(&stream);
                return Err(ProxyError::Upstream(dst, e));
            }
        };
        copy(&mut stream, &mut upstream, self.node.cfg.copy_buffer).await
    }
}

/// Where a captured outbound connection goes.
enum Route {
    /// Through an HBONE tunnel to `key.dst`, for `target`; `waypoint` when `key.dst` is the
    /// waypoint in front of `target`.
    Hbone {
        key: PoolKey,
        target: SocketAddr,
        src: Box<SourceInfo>,
        waypoint: Option<Box<WaypointLabels>>,
    },
    /// Plain TCP (a destination outside the mesh, or passthrough).
    Tcp(SocketAddr),
    /// Refused, with why.
    Refused(ProxyError),
}

/// Records the end of a connection from the outcome of serving it.
pub fn finish(mut rec: ConnectionRecord, res: Result<Bytes, ProxyError>) {
    match res {
        Ok(b) => rec.finish(b, None),
        Err(e) => {
            let b = match &e {
                ProxyError::Copy { bytes, .. } | ProxyError::Revoked { bytes, .. } => *bytes,
                _ => Bytes::default(),
            };
            if let ProxyError::Denied(d) | ProxyError::Revoked { denial: d, .. } = &e {
                rec.set_policy(d.policy().map(str::to_owned));
            }
            rec.set_response_flag(e.response_flag());
            rec.finish(b, Some(&e));
        }
    }
}

/// Makes the client see a reset rather than a clean close.
pub fn refuse(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// `fut`, cut off when `force` is cancelled. A combinator, not an `async move` block around a
/// `select!`: the block would hold `fut` twice, as its capture and as the select's own
/// (rust-lang/rust#62958), which doubled the memory of every inbound tunnel's task.
fn until_forced<F: std::future::Future>(
    fut: F,
    force: CancellationToken,
) -> impl std::future::Future<Output = Option<F::Output>> {
    fut.with_cancellation_token_owned(force)
}

/// Accepts connections with `limits` (`zmesh_core::serve`: caps, descriptor headroom, backoff
/// on accept errors) until the drain starts, serving each on a tracked task that holds the
/// connection's place under the caps. The handler gets the handshake deadline.
pub async fn accept_loop<F, Fut>(
    proxy: Arc<Proxy>,
    name: &'static str,
    limits: Limits,
    listener: TcpListener,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let fds = FdHeadroom::process(proxy.node.cfg.listeners.fd_headroom);
    let listener = Listener::new(listener, name, limits, fds);
    loop {
        let a = tokio::select! {
            _ = proxy.drain.cancelled() => return,
            a = listener.accept() => a,
        };
        let Some(peer) = a.peer else { continue };
        let _ = a.stream.set_nodelay(true);
        // Boxed: the wrappers around it (the block holding the permit, the drain's cut-off)
        // would each hold the connection's future by value, and their layout keeps room for
        // its arguments beside it (rust-lang/rust#62958): measured 1704 -> 3656 bytes per
        // connection in a debug build. Behind a pointer, they add only their own few bytes.
        let serve = Box::pin(handle(proxy.clone(), a.stream, peer, a.deadline));
        let permit = a.permit;
        proxy.spawn_connection(async move {
            let _permit = permit;
            serve.await
        });
    }
}
