//! The HBONE connection pool. Connections are shared by key (source identity, acceptable
//! destination identities, destination address, source IP); each carries up to
//! `max_streams` CONNECT streams, and an unused one is closed after `idle_timeout` (a few
//! seconds by default).
//! Concurrent first use of a key waits for a single handshake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::StatusCode;

use super::{H2Settings, HboneError, SourceInfo, Tunnel, connect_request, tunnel::keepalive};
use crate::identity::SpiffeId;
use crate::socket::SocketOptions;
use crate::tls::WorkloadCertificate;

/// Who may share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_id: SpiffeId,
    /// Sorted, so that the same set always makes the same key.
    pub dst_ids: Vec<SpiffeId>,
    pub dst: SocketAddr,
    pub src_ip: Option<IpAddr>,
}

impl PoolKey {
    pub fn new(
        src_id: SpiffeId,
        mut dst_ids: Vec<SpiffeId>,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> Self {
        dst_ids.sort();
        dst_ids.dedup();
        PoolKey {
            src_id,
            dst_ids,
            dst,
            src_ip,
        }
    }
}

/// How long a pooled connection may sit unused before it is closed. Short: after a load, the
/// connections (and the buffers each holds on both ends) are given back within seconds, and
/// a new one costs one TLS 1.3 handshake.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct PoolConfig {
    /// Streams one connection carries before another is opened to the same key.
    pub max_streams: usize,
    /// An unused connection is closed after this long. Zero disables pooling: each tunnel
    /// gets its own connection, closed when the tunnel ends.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams: 100,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

struct Conn {
    sender: SendRequest<Bytes>,
    /// Set once the connection's task ended (the peer closed it, it failed, or its keepalive
    /// went unanswered): no new stream is opened on it.
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    /// Milliseconds since the pool's epoch of the last time a stream ended or began.
    last_used: Arc<AtomicU64>,
}

/// The connections of one key, and the last failed attempt to open one.
#[derive(Default)]
struct SlotState {
    conns: Vec<Conn>,
    last_failure: Option<(Instant, String)>,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// Counters for tests and `/config_dump`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    pub connections_opened: u64,
    pub streams_opened: u64,
}

/// The pool. Cheap to share behind an `Arc`.
pub struct Pool {
    cfg: PoolConfig,
    h2: H2Settings,
    sockets: SocketOptions,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    epoch: Instant,
    opened: AtomicU64,
    streams: AtomicU64,
}

/// Held for as long as a tunnel lives: counts the stream against its connection.
pub struct StreamGuard {
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
    epoch: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.last_used
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    pub fn new(cfg: PoolConfig, h2: H2Settings, sockets: SocketOptions) -> Arc<Self> {
        let pool = Arc::new(Pool {
            cfg,
            h2,
            sockets,
            slots: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            opened: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        });
        if !cfg.idle_timeout.is_zero() {
            let weak = Arc::downgrade(&pool);
            // Looked at often enough that an unused connection goes at most a quarter of the
            // timeout (and at most a second) after it expired.
            let period =
                (cfg.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.evict_idle();
                }
            });
        }
        pool
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            connections_opened: self.opened.load(Ordering::Relaxed),
            streams_opened: self.streams.load(Ordering::Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Drops connections that are closed, or unused for longer than the idle timeout.
    pub fn evict_idle(&self) {
        let idle_ms = self.cfg.idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        let mut slots = self.slots.lock().expect("pool lock");
        slots.retain(|_, slot| {
            // A slot locked by a caller is in use; look at it next time.
            let Ok(mut state) = slot.try_lock() else {
                return true;
            };
            state.conns.retain(|c| {
                !c.closed.load(Ordering::Acquire)
                    && (c.streams.load(Ordering::Acquire) > 0
                        || now.saturating_sub(c.last_used.load(Ordering::Relaxed)) < idle_ms)
            });
            !state.conns.is_empty()
        });
    }

    /// Opens a tunnel to `target` through the HBONE peer named by `key.dst`, reusing a pooled
    /// connection when one has room. Returns once the peer answered 200.
    pub async fn connect(
        &self,
        key: PoolKey,
        cert: &WorkloadCertificate,
        target: SocketAddr,
        src: &SourceInfo,
    ) -> Result<(Tunnel, StreamGuard), HboneError> {
        self.connect_with(key, cert, target, src, Bytes::new())
            .await
    }

    /// [`Pool::connect`], sending `first` (bytes the client already wrote) right behind the
    /// CONNECT instead of after the peer's 200: the tunnel's first bytes save the round trip to
    /// the peer and back. RFC 9113 §8.5 lets DATA follow the CONNECT's HEADERS before the
    /// answer. They go only to the peer whose identity the handshake verified, which keeps
    /// them (within the stream's window) and reads them when it would have read them after
    /// its 200: a ztunnel once it has decided and reached the workload; a waypoint once it
    /// has accepted the stream, each request then authorized as it is parsed. A refused stream
    /// drops them. A CONNECT retried on a new connection sends them again.
    pub async fn connect_with(
        &self,
        key: PoolKey,
        cert: &WorkloadCertificate,
        target: SocketAddr,
        src: &SourceInfo,
        first: Bytes,
    ) -> Result<(Tunnel, StreamGuard), HboneError> {
        // A pooled connection the server is closing (idle GOAWAY) may refuse a stream it never
        // processed: that stream is retried once, on a new connection.
        match self
            .try_connect(key.clone(), cert, target, src, false, first.clone())
            .await
        {
            Err(HboneError::Closed { source, .. }) => {
                tracing::debug!(peer = %key.dst, error = %source, "pooled connection closed before the CONNECT was sent; retrying on a new one");
                self.try_connect(key, cert, target, src, true, first).await
            }
            Err(HboneError::Request { source, .. }) if never_processed(&source) => {
                tracing::debug!(peer = %key.dst, error = %source, "stream refused by a closing connection; retrying on a new one");
                self.try_connect(key, cert, target, src, true, first).await
            }
            r => r,
        }
    }

    async fn try_connect(
        &self,
        key: PoolKey,
        cert: &WorkloadCertificate,
        target: SocketAddr,
        src: &SourceInfo,
        fresh: bool,
        first: Bytes,
    ) -> Result<(Tunnel, StreamGuard), HboneError> {
        let peer = key.dst;
        let (sender, guard) = if self.cfg.idle_timeout.is_zero() {
            let (sender, _closed) = Box::pin(self.handshake(&key, cert)).await?;
            let guard = StreamGuard {
                streams: Arc::new(AtomicUsize::new(1)),
                last_used: Arc::new(AtomicU64::new(0)),
                epoch: self.epoch,
            };
            (sender, guard)
        } else {
            self.checkout(key, cert, fresh).await?
        };
        self.streams.fetch_add(1, Ordering::Relaxed);
        let failed = |source| HboneError::Request {
            peer,
            target,
            source,
        };
        // The peer answers once it reached the workload (its own connect is bounded too);
        // a peer that never answers must not hold the client forever.
        let not_sent = |source| HboneError::Closed {
            peer,
            target,
            source,
        };
        let exchange = async {
            let mut sender = sender.ready().await.map_err(not_sent)?;
            let (res, mut send) = sender
                .send_request(connect_request(target, src), false)
                .map_err(not_sent)?;
            if !first.is_empty() {
                // Queued behind the HEADERS; h2 writes both in one flush. A failure here may
                // follow HEADERS already sent: not retried as unsent.
                send.send_data(first, false).map_err(failed)?;
            }
            let res = res.await.map_err(failed)?;
            if res.status() != StatusCode::OK {
                return Err(HboneError::Status {
                    peer,
                    target,
                    status: res.status(),
                });
            }
            Ok(Tunnel::new(send, res.into_body()))
        };
        let wait = self.sockets.connect_timeout * 2;
        let tunnel = tokio::time::timeout(wait, exchange).await.map_err(|_| {
            HboneError::PeerFailed(
                peer,
                format!("no answer to CONNECT {target} within {wait:?}"),
            )
        })??;
        Ok((tunnel, guard))
    }

    async fn checkout(
        &self,
        key: PoolKey,
        cert: &WorkloadCertificate,
        fresh: bool,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), HboneError> {
        let slot: Slot = {
            let mut slots = self.slots.lock().expect("pool lock");
            slots.entry(key.clone()).or_default().clone()
        };
        // Held across the handshake on purpose: concurrent first uses of a key share it.
        // Bounded, and callers that queued behind an attempt that failed fail at once with its
        // reason instead of each retrying a dead peer in turn.
        let queued = Instant::now();
        let peer = key.dst;
        let wait = self.sockets.connect_timeout * 2;
        let mut state = tokio::time::timeout(wait, slot.lock()).await.map_err(|_| {
            HboneError::PeerFailed(
                peer,
                format!("no connection became available within {wait:?}"),
            )
        })?;
        if let Some((at, reason)) = &state.last_failure
            && *at >= queued
        {
            return Err(HboneError::PeerFailed(peer, reason.clone()));
        }
        state.conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let max = self.cfg.max_streams.max(1);
        let reusable = state
            .conns
            .iter()
            .position(|c| c.streams.load(Ordering::Acquire) < max)
            .filter(|_| !fresh);
        // The handshake is boxed (here and above): a new connection's TLS and HTTP/2 handshakes
        // are kilobytes of future state that every caller would otherwise carry (and copy with
        // each move of its future) for the common case of a pooled connection.
        let index = match reusable {
            Some(i) => i,
            None => match Box::pin(self.handshake(&key, cert)).await {
                Ok((sender, closed)) => {
                    state.last_failure = None;
                    state.conns.push(Conn {
                        sender,
                        closed,
                        streams: Arc::new(AtomicUsize::new(0)),
                        last_used: Arc::new(AtomicU64::new(self.now_ms())),
                    });
                    // An eviction may have dropped the slot from the map meanwhile.
                    self.slots
                        .lock()
                        .expect("pool lock")
                        .entry(key.clone())
                        .or_insert_with(|| slot.clone());
                    state.conns.len() - 1
                }
                Err(e) => {
                    state.last_failure = Some((Instant::now(), e.to_string()));
                    return Err(e);
                }
            },
        };
        let conn = &state.conns[index];
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.last_used.store(self.now_ms(), Ordering::Relaxed);
        Ok((
            conn.sender.clone(),
            StreamGuard {
                streams: conn.streams.clone(),
                last_used: conn.last_used.clone(),
                epoch: self.epoch,
            },
        ))
    }

    /// TCP, TLS (verifying the peer is one of `key.dst_ids`) and the HTTP/2 handshake.
    async fn handshake(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
    ) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), HboneError> {
        let peer = key.dst;
        let tcp = crate::socket::connect(peer, key.src_ip, &self.sockets)
            .await
            .map_err(|e| HboneError::Connect(peer, e))?;
        // Resumes a session with this server under the same expectation when it can; HBONE
        // sends no SNI, the name only keys the tickets.
        let client = cert.hbone_client(peer, &key.dst_ids)?;
        // Bounded: the per-key lock is held across this, and a peer that accepts TCP but
        // stalls the handshake must not hang every connection to it.
        let handshake = async {
            // The handshake, and a resumed server verified again.
            let mut tls = client
                .connect(crate::socket::buffered(tcp))
                .await
                .map_err(|e| HboneError::Tls(peer, e))?;
            crate::socket::hold_bulk_records(tls.get_mut().1);
            if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
                return Err(HboneError::Alpn(peer));
            }
            self.h2
                .h2_client()
                .handshake(tls)
                .await
                .map_err(|e| HboneError::H2Handshake(peer, e))
        };
        let (sender, mut conn) = tokio::time::timeout(self.sockets.connect_timeout, handshake)
            .await
            .map_err(|_| {
                HboneError::Tls(
                    peer,
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no TLS/HTTP2 handshake within {:?}",
                            self.sockets.connect_timeout
                        ),
                    ),
                )
            })??;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let alive = keepalive(
            conn.ping_pong(),
            self.h2.keepalive_interval,
            self.h2.keepalive_timeout,
        );
        tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        // A GOAWAY's debug data (up to a frame, 1 MiB) is in the error;
                        // formatted only when debug lines are on.
                        tracing::debug!(
                            %peer,
                            error = %crate::peer_text::PeerText::display(
                                &e,
                                crate::peer_text::PEER_ERROR_MAX,
                            ),
                            "HBONE connection ended"
                        );
                    }
                }
                _ = alive => {
                    tracing::debug!(%peer, "HBONE connection closed: its keepalive went unanswered");
                }
            }
            ended.store(true, Ordering::Release);
        });
        Ok((sender, closed))
    }
}

/// Whether a failed CONNECT was refused before the server processed it (RFC 9113 §8.7: a
/// stream above a GOAWAY's last stream id, or REFUSED_STREAM), so it is safe to send again.
fn never_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
}
