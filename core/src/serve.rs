//! One accept path for every listener of every zmesh binary, with the limits of a public
//! server:
//!
//! - a cap on connections open at once per listener and per peer address: a connection over
//!   a cap is accepted and closed at once (a reset), so it costs nothing lasting;
//! - descriptor headroom ([`FdHeadroom`]): a listener sheds new connections the same way
//!   before the process reaches a fraction of `RLIMIT_NOFILE`, so its own outbound connects,
//!   CA calls and config reads keep working; accept errors (EMFILE) back off instead of
//!   spinning;
//! - a deadline for the TLS handshake and the protocol's first bytes together ([`tls_accept`],
//!   [`serve_h2`] for the HTTP/2 preface and SETTINGS, [`serve_http1`] for a request head);
//! - an idle timeout that applies only while no request or stream is in flight ([`Activity`]):
//!   an HBONE connection carrying tunnels, or a gRPC connection carrying an ADS stream, is never
//!   cut by it; an idle HTTP/2 connection is closed with a graceful GOAWAY.

mod conn;
mod fd;
mod preface;
mod streams;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

pub use conn::{ActiveGuard, Activity, Tracked, TrackedBody, serve_h2, serve_http1};
pub use fd::{FdHeadroom, open_fds};
pub use preface::{PREFACE, PrefaceError, Prefixed, read_h2_start};
pub use streams::serve_h2_streams;

/// The limits of one listener. In config files: `max_connections`, `max_connections_per_peer`,
/// `handshake_timeout` and `idle_timeout` (durations like `10s`).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct Limits {
    /// Connections open at once on the listener; more are refused at accept.
    pub max_connections: usize,
    /// Connections open at once from one peer address; more are refused at accept.
    pub max_connections_per_peer: usize,
    /// Time from accept to the end of the TLS handshake and the protocol's first bytes (the
    /// HTTP/2 preface and SETTINGS, an HTTP/1 request head).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no request or stream in flight for this long is closed; zero: never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16384,
            max_connections_per_peer: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Limits {
    /// Checks the values; the error names the field to fix (prefixed with `what`).
    pub fn validate(&self, what: &str) -> Result<(), ServeError> {
        let bad = |field: &str, why: &str| ServeError::Config(format!("{what}.{field}: {why}"));
        if self.max_connections == 0 {
            return Err(bad("max_connections", "must be at least 1"));
        }
        if self.max_connections_per_peer == 0 {
            return Err(bad("max_connections_per_peer", "must be at least 1"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(bad(
                "handshake_timeout",
                "must be more than zero (a silent client would hold its connection forever)",
            ));
        }
        Ok(())
    }
}

/// Errors of the accept path, each saying what happened to the connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A limit is configured wrong.
    #[error("listener limits: {0}")]
    Config(String),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The TLS handshake did not finish in time.
    #[error("no TLS handshake within {0:?}; closed")]
    TlsTimeout(Duration),
    /// A resumed session's client certificate no longer verifies.
    #[error("the resumed session's client certificate no longer verifies: {0}; closed")]
    ResumedPeer(rustls::Error),
    /// The protocol's first bytes did not arrive in time.
    #[error("no HTTP/2 preface and SETTINGS within {0:?} of accept; closed")]
    FirstBytesTimeout(Duration),
    /// The first bytes were not HTTP/2.
    #[error(transparent)]
    Preface(#[from] PrefaceError),
    /// The HTTP connection failed.
    #[error("HTTP connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The HTTP/2 connection failed (an HBONE server on h2 itself).
    #[error("HTTP/2 connection failed: {0}")]
    H2(#[from] h2::Error),
}

/// Accepts TLS on `stream`, finishing by `deadline`.
pub async fn tls_accept<S>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
    deadline: tokio::time::Instant,
    limit: Duration,
) -> Result<tokio_rustls::server::TlsStream<S>, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(r) => r.map_err(ServeError::Tls),
        Err(_) => Err(ServeError::TlsTimeout(limit)),
    }
}

/// An accepted HBONE connection's TLS stream.
pub type HboneTls = tokio_rustls::server::TlsStream<crate::socket::BufferedStream>;

/// Accepts an HBONE connection's TLS on `tcp` (either proxy's HBONE listener) with `cert`'s
/// server configuration, finishing by `deadline`: its reads buffered
/// ([`crate::socket::buffered`]), up to [`crate::socket::TLS_WRITE_BUFFER`] of records held
/// to send. Answers with the client's SPIFFE identity
/// ([`crate::tls::WorkloadCertificate::client_peer`]; a resumed session's client is verified
/// again, and refused if it no longer verifies).
pub async fn hbone_tls_accept(
    cert: &crate::tls::WorkloadCertificate,
    tcp: tokio::net::TcpStream,
    deadline: tokio::time::Instant,
    limit: Duration,
) -> Result<(HboneTls, Option<crate::identity::SpiffeId>), ServeError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.resuming_server_config());
    let mut tls = tls_accept(&acceptor, crate::socket::buffered(tcp), deadline, limit).await?;
    let peer = cert
        .client_peer(tls.get_ref().1)
        .map_err(ServeError::ResumedPeer)?;
    crate::socket::hold_bulk_records(tls.get_mut().1);
    Ok((tls, peer))
}

/// A socket that accepts connections: tokio's TCP and unix listeners.
pub trait Socket: Send + Sync + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Polls for a connection and its peer address (none for a unix socket).
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Option<SocketAddr>)>>;
    /// Closes `stream` as a refusal (TCP: a reset).
    fn refuse(stream: Self::Stream);
}

impl Socket for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Option<SocketAddr>)>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(s, a)| (s, Some(a)))
    }
    fn refuse(stream: Self::Stream) {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

impl Socket for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Option<SocketAddr>)>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| (s, None))
    }
    fn refuse(_stream: Self::Stream) {}
}

/// What a listener has done, for config dumps and tests.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted and served since start.
    pub accepted: u64,
    /// Refused because the listener was at `max_connections`.
    pub refused_listener_full: u64,
    /// Refused because their peer was at `max_connections_per_peer`.
    pub refused_peer_full: u64,
    /// Refused for descriptor headroom.
    pub refused_descriptors: u64,
    /// Failed accepts (EMFILE and the like).
    pub accept_errors: u64,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    per_peer: PerPeer,
}

/// How many of something (connections, streams) each peer address holds; an address is
/// forgotten when its count comes back to zero, so the map holds only peers with something
/// open.
#[derive(Debug, Default)]
pub struct PerPeer(HashMap<IpAddr, usize>);

impl PerPeer {
    /// What `ip` holds.
    pub fn get(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).copied().unwrap_or(0)
    }

    /// One more for `ip`.
    pub fn add(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_default() += 1;
    }

    /// One fewer for `ip` (one that [`PerPeer::add`] counted); what `ip` holds now.
    pub fn release(&mut self, ip: IpAddr) -> usize {
        let Some(n) = self.0.get_mut(&ip) else {
            return 0;
        };
        *n -= 1;
        let left = *n;
        if left == 0 {
            self.0.remove(&ip);
        }
        left
    }
}

#[derive(Debug)]
struct Shared {
    name: &'static str,
    limits: Limits,
    counts: Mutex<Counts>,
    accepted: AtomicU64,
    listener_full: AtomicU64,
    peer_full: AtomicU64,
    descriptors: AtomicU64,
    errors: AtomicU64,
    /// When a refusal was last logged, ms since `epoch` (refusals are logged once a second).
    logged: AtomicU64,
    epoch: Instant,
}

/// A listener with its limits. Connections come out of [`Listener::accept`] with a [`Permit`]
/// that counts them until dropped.
#[derive(Debug)]
pub struct Listener<L: Socket> {
    socket: L,
    shared: Arc<Shared>,
    fds: Arc<FdHeadroom>,
}

/// An accepted connection.
#[derive(Debug)]
pub struct Accepted<S> {
    /// The connection.
    pub stream: S,
    /// Its peer (none on a unix socket).
    pub peer: Option<SocketAddr>,
    /// Counts it against the listener's caps until dropped; keep it as long as the connection.
    pub permit: Permit,
    /// The handshake deadline: accept time plus the handshake timeout.
    pub deadline: tokio::time::Instant,
}

/// Counts one connection against its listener's caps until dropped.
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Shared>,
    peer: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.open = c.open.saturating_sub(1);
        if let Some(ip) = self.peer {
            c.per_peer.release(ip);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    ListenerFull,
    PeerFull,
    Descriptors,
}

impl<L: Socket> Listener<L> {
    /// `socket` with `limits`; `name` (e.g. `hbone`) appears in logs. `fds` is the process's
    /// descriptor budget, shared by all its listeners.
    pub fn new(socket: L, name: &'static str, limits: Limits, fds: Arc<FdHeadroom>) -> Self {
        Listener {
            socket,
            shared: Arc::new(Shared {
                name,
                limits,
                counts: Mutex::default(),
                accepted: AtomicU64::new(0),
                listener_full: AtomicU64::new(0),
                peer_full: AtomicU64::new(0),
                descriptors: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                logged: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
            fds,
        }
    }

    /// Its caps, counters and descriptor budget, to share with more sockets.
    pub fn group(&self) -> ListenerGroup {
        ListenerGroup {
            shared: self.shared.clone(),
            fds: self.fds.clone(),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &L {
        &self.socket
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// A handle on the counters that outlives the listener's task.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.shared.clone())
    }

    /// The next connection within the limits. Connections over a cap are closed as they come;
    /// accept errors (out of descriptors, ...) are retried with a growing pause (10 ms to 1 s).
    pub async fn accept(&self) -> Accepted<L::Stream> {
        let mut backoff = Duration::from_millis(10);
        loop {
            match std::future::poll_fn(|cx| self.socket.poll_accept(cx)).await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    match self.admit(peer) {
                        Ok(permit) => {
                            self.shared.accepted.fetch_add(1, Ordering::Relaxed);
                            return Accepted {
                                stream,
                                peer,
                                permit,
                                deadline: tokio::time::Instant::now()
                                    + self.shared.limits.handshake_timeout,
                            };
                        }
                        Err(why) => {
                            L::refuse(stream);
                            self.refused(why, peer);
                        }
                    }
                }
                Err(e) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listener = self.shared.name, error = %e, pause = ?backoff,
                        "accept failed (out of file descriptors? see RLIMIT_NOFILE)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn admit(&self, peer: Option<SocketAddr>) -> Result<Permit, Refusal> {
        let limits = &self.shared.limits;
        let ip = peer.map(|p| p.ip());
        let mut c = self.shared.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.open >= limits.max_connections {
            return Err(Refusal::ListenerFull);
        }
        if let Some(ip) = ip
            && c.per_peer.get(ip) >= limits.max_connections_per_peer
        {
            return Err(Refusal::PeerFull);
        }
        if !self.fds.admit() {
            return Err(Refusal::Descriptors);
        }
        c.open += 1;
        if let Some(ip) = ip {
            c.per_peer.add(ip);
        }
        Ok(Permit {
            shared: self.shared.clone(),
            peer: ip,
        })
    }

    fn refused(&self, why: Refusal, peer: Option<SocketAddr>) {
        let s = &self.shared;
        let counter = match why {
            Refusal::ListenerFull => &s.listener_full,
            Refusal::PeerFull => &s.peer_full,
            Refusal::Descriptors => &s.descriptors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = s.epoch.elapsed().as_millis() as u64;
        let last = s.logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && s.logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let reason = match why {
                Refusal::ListenerFull => format!(
                    "the listener holds max_connections ({})",
                    s.limits.max_connections
                ),
                Refusal::PeerFull => format!(
                    "this peer holds max_connections_per_peer ({})",
                    s.limits.max_connections_per_peer
                ),
                Refusal::Descriptors => format!(
                    "the process is near its descriptor limit ({} of {} allowed for accepts)",
                    self.fds.last_count(),
                    self.fds.threshold()
                ),
            };
            tracing::warn!(listener = s.name, ?peer, %reason, "refusing connections (logged at most once a second)");
        }
    }
}

/// The caps, counters and descriptor budget of a listener ([`Listener::group`]), shared by
/// more sockets: the sockets of one address bound with SO_REUSEPORT, one per worker runtime,
/// are one listener to the operator (`max_connections` caps them together).
#[derive(Clone, Debug)]
pub struct ListenerGroup {
    shared: Arc<Shared>,
    fds: Arc<FdHeadroom>,
}

impl ListenerGroup {
    /// A listener on `socket` in this group.
    pub fn listener<L: Socket>(&self, socket: L) -> Listener<L> {
        Listener {
            socket,
            shared: self.shared.clone(),
            fds: self.fds.clone(),
        }
    }
}

/// Reads a listener's counters.
#[derive(Clone, Debug)]
pub struct StatsHandle(Arc<Shared>);

impl StatsHandle {
    /// The counters now.
    pub fn stats(&self) -> ListenerStats {
        let s = &self.0;
        ListenerStats {
            open: s.counts.lock().unwrap_or_else(|e| e.into_inner()).open as u64,
            accepted: s.accepted.load(Ordering::Relaxed),
            refused_listener_full: s.listener_full.load(Ordering::Relaxed),
            refused_peer_full: s.peer_full.load(Ordering::Relaxed),
            refused_descriptors: s.descriptors.load(Ordering::Relaxed),
            accept_errors: s.errors.load(Ordering::Relaxed),
        }
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.0.name
    }
}

#[cfg(test)]
mod tests;
