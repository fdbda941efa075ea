//! The byte stream of one HBONE CONNECT, on h2's own stream handles, and the HTTP/2 keepalive
//! both ends run.
//!
//! Why not hyper's upgrade: hyper's HTTP/2 `Upgraded` hands every write to a task of its own
//! through a channel, copying it into a new allocation on the way (hyper 1.x,
//! `src/proto/h2/upgrade.rs`, `UpgradedSendStreamTask`): one more task wake-up and one more
//! allocation per write, on every hop of every tunnel. Here a write goes to h2 from the
//! writer's own task, and its bytes are staged in a buffer whose allocation comes back as soon
//! as h2 has written the previous chunk out.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The byte stream of one CONNECT, after the 200: reads are the peer's DATA frames, writes
/// become ours, and shutting down sends END_STREAM.
pub struct H2Tunnel {
    send: SendStream<Bytes>,
    /// Taken only by `Drop` (see there).
    recv: Option<RecvStream>,
    /// Received and not yet read.
    rbuf: Bytes,
    /// Where a write's bytes are staged for h2; its allocation is reused once h2 has dropped
    /// the previous chunk (`BytesMut::reserve` reclaims a uniquely owned buffer).
    wbuf: BytesMut,
    /// END_STREAM was sent.
    shut: bool,
}

impl std::fmt::Debug for H2Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Tunnel")
            .field("stream", &self.send.stream_id())
            .field("unread", &self.rbuf.len())
            .field("shut", &self.shut)
            .finish()
    }
}

impl H2Tunnel {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Tunnel {
        H2Tunnel {
            send,
            recv: Some(recv),
            rbuf: Bytes::new(),
            wbuf: BytesMut::new(),
            shut: false,
        }
    }

    /// The error a write gets once the peer reset the stream, or the connection went away.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => Poll::Ready(reset_error(reason)),
            Err(e) => Poll::Ready(h2_error(e)),
        }
    }
}

/// A reset from the peer, as the writer sees it: the peer is gone.
fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("the peer reset the tunnel ({reason})"),
    )
}

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl H2Tunnel {
    /// Waits until some of the peer's bytes are at hand (`rbuf` not empty); `false`: the peer
    /// ended the stream (or it was taken apart by `Drop`).
    fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        while self.rbuf.is_empty() {
            match ready!(recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(false)),
                Some(Ok(data)) => self.rbuf = data,
                Some(Err(e)) => {
                    // As hyper's upgrade reads it: a peer that ended the stream with NO_ERROR
                    // or CANCEL closed it; STREAM_CLOSED is a broken pipe.
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(false),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(h2_error(e)),
                    });
                }
            }
        }
        Poll::Ready(Ok(true))
    }

    /// The application has taken `n` received bytes: the peer may send that much more.
    fn release(&mut self, n: usize) {
        if let Some(recv) = self.recv.as_mut() {
            let _ = recv.flow_control().release_capacity(n);
        }
    }

    /// The peer's next bytes as h2 received them, at most `max` of a DATA frame's (empty: the
    /// peer ended the stream). For a copy that writes them on: it needs no buffer of its own
    /// and does not copy them into one. Their window is released as they are handed out, as
    /// `poll_read` does once it has copied them, and no more than `max` at a time: what the
    /// copy holds released stays within what a copy buffer of `max` would hold.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>> {
        if !ready!(self.poll_received(cx))? {
            return Poll::Ready(Ok(Bytes::new()));
        }
        let chunk = if self.rbuf.len() <= max {
            std::mem::take(&mut self.rbuf)
        } else {
            self.rbuf.split_to(max.max(1))
        };
        self.release(chunk.len());
        Poll::Ready(Ok(chunk))
    }

    /// Waits for room to send (the peer's windows and h2's send buffer); returns how many
    /// bytes may be sent now, at most `want`.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.send.capacity() == 0 {
            self.send.reserve_capacity(want);
            while self.send.capacity() == 0 {
                match self.send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_error(e))),
                    Poll::Ready(None) => return self.poll_send_error(cx).map(Err),
                    Poll::Pending => {
                        // Waiting for window: a reset must still wake us.
                        if let Poll::Ready(e) = self.poll_send_error(cx) {
                            return Poll::Ready(Err(e));
                        }
                        return Poll::Pending;
                    }
                }
            }
        }
        Poll::Ready(Ok(self.send.capacity().min(want)))
    }

    /// Sends from the front of `chunk` as much as flow control allows, handing those bytes to
    /// h2 as they are (no copy); returns how many were sent and leaves the rest in `chunk`.
    pub fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_room(cx, chunk.len()))?;
        match self.send.send_data(chunk.split_to(n), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(h2_error(e))),
        }
    }
}

impl AsyncRead for H2Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !ready!(me.poll_received(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = me.rbuf.len().min(buf.remaining());
        buf.put_slice(&me.rbuf[..n]);
        me.rbuf.advance(n);
        if me.rbuf.is_empty() {
            // An empty view still holds h2's whole read chunk alive: let it go while idle.
            me.rbuf = Bytes::new();
        }
        me.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(me.poll_room(cx, buf.len()))?;
        me.wbuf.reserve(n);
        me.wbuf.extend_from_slice(&buf[..n]);
        let chunk = me.wbuf.split().freeze();
        match me.send.send_data(chunk, false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(h2_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was sent; there is nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.shut {
            me.shut = true;
            // The staging buffer is not needed any more.
            me.wbuf = BytesMut::new();
            if let Err(e) = me.send.send_data(Bytes::new(), true) {
                return Poll::Ready(Err(h2_error(e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// How long a tunnel dropped after it sent END_STREAM keeps the stream open for the peer's end.
const LINGER: Duration = Duration::from_secs(2);

impl Drop for H2Tunnel {
    fn drop(&mut self) {
        // Dropped before END_STREAM (an error, a revocation, a drain deadline): the peer
        // learns at once, as with hyper's upgrade, instead of waiting for the connection.
        if !self.shut {
            self.send.send_reset(Reason::CANCEL);
            return;
        }
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        if recv.is_end_stream() {
            return;
        }
        // Our side ended, the peer's has not. Dropping every handle now would make h2 cancel
        // the stream, and a cancelled stream's queued DATA and END_STREAM are discarded (h2
        // `Prioritize::pop_frame`): what was written before the close could be lost, where a
        // closed TCP socket still delivers it. So the receiving half lingers on a task of its
        // own, reading and discarding the peer's rest, until the peer ends too or `LINGER`.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let rest = async {
                while let Some(Ok(data)) = std::future::poll_fn(|cx| recv.poll_data(cx)).await {
                    let _ = recv.flow_control().release_capacity(data.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, rest).await;
        });
    }
}

/// HTTP/2 keepalive for one connection: a PING every `interval`; a connection whose peer does
/// not answer one within `timeout` is dead. Returns only then (the caller closes it); runs
/// forever when `interval` is zero or the connection offers no ping handle.
pub async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping.filter(|_| !interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 keepalive ping failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?timeout, "no answer to an HTTP/2 keepalive ping");
                return;
            }
        }
    }
}
