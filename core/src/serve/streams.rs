//! An HTTP/2 server on h2 itself, for HBONE: each stream (a CONNECT) is handed to the caller
//! with its response handle, so a tunnel's bytes move between h2 and the caller's task with no
//! task in between (see `hbone::H2Tunnel` for why not hyper's upgrade).
//!
//! The connection keeps [`serve_h2`](super::serve_h2)'s rules: the preface and SETTINGS by the
//! handshake deadline, a GOAWAY after `idle_timeout` with no stream open, a GOAWAY when `stop`
//! is cancelled (open streams finish), and a keepalive PING that a dead peer fails.

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{goaway_grace, h2_start};
use super::{ActiveGuard, Activity, Limits, ServeError};
use crate::hbone::{H2Settings, keepalive};

/// Serves one HTTP/2 connection until it ends: every stream the peer opens goes to `handle`
/// with a guard that counts it in flight (drop it when the stream is done). `handle` returns at
/// once (it spawns what takes time).
pub async fn serve_h2_streams<I, H>(
    io: I,
    settings: &H2Settings,
    limits: &Limits,
    deadline: tokio::time::Instant,
    stop: &CancellationToken,
    mut handle: H,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: FnMut(Request<RecvStream>, SendResponse<Bytes>, ActiveGuard),
{
    let io = h2_start(io, limits, deadline).await?;
    let mut conn = match tokio::time::timeout_at(deadline, settings.h2_server().handshake(io)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(ServeError::H2(e)),
        Err(_) => return Err(ServeError::FirstBytesTimeout(limits.handshake_timeout)),
    };
    let activity = Activity::new();
    let alive = keepalive(
        conn.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(alive);
    // Made once: a stream accepted does not re-arm their timers.
    let idle = activity.idle(limits.idle_timeout);
    tokio::pin!(idle);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => handle(req, respond, activity.begin()),
                Some(Err(e)) if benign(&e) => return Ok(()),
                Some(Err(e)) => return Err(ServeError::H2(e)),
                None => return Ok(()),
            },
            _ = &mut stopped, if !draining => {
                // Open streams finish; accept() ends once they did.
                draining = true;
                conn.graceful_shutdown();
            }
            _ = &mut idle, if !draining => {
                // Nothing in flight: the GOAWAY exchange is all that is left, bounded.
                tracing::debug!(idle = ?limits.idle_timeout, "closing an idle HTTP/2 connection");
                conn.graceful_shutdown();
                let rest = async {
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        handle(req, respond, activity.begin());
                    }
                };
                let _ = tokio::time::timeout(goaway_grace(limits), rest).await;
                return Ok(());
            }
            _ = &mut alive => {
                tracing::debug!("closing an HTTP/2 connection whose peer stopped answering pings");
                return Ok(());
            }
        }
    }
}

/// How a peer normally goes away: it closed the TCP connection, or said GOAWAY NO_ERROR.
fn benign(e: &h2::Error) -> bool {
    if let Some(io) = e.get_io() {
        return matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        );
    }
    e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR)
}
