//! Copying a proxied connection both ways, with byte counts that survive errors.
//!
//! Istio's meaning of the byte metrics (Envoy's): `received` is what the downstream (the
//! client: the app outbound, the tunnel or the plaintext peer inbound) sent towards the
//! destination, `sent` is what went back to it. The counters keep it for both reporters; the
//! source side's access log flips it (`crate::metrics`). A connection that
//! ends with a reset or a broken pipe is an ordinary end for TCP proxying: its bytes are
//! counted and it is not logged as an error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use zmesh_core::hbone::Tunnel;
use zmesh_core::spare;

use super::ProxyError;
use super::policy::Denial;
use crate::metrics::Bytes;

/// One side of a proxied connection, as the copy moves bytes through it. By default through
/// `AsyncRead` and `AsyncWrite`, with the copy's own buffer in between. An HBONE tunnel's
/// bytes are already in shared chunks (h2's `Bytes`): it hands over what it received and
/// takes what it sends as chunks, so a byte crossing the proxy is not copied between h2's
/// buffers and the copy's.
pub trait Side: AsyncRead + AsyncWrite + Unpin {
    /// The next received bytes (empty: the peer ended): by default read into the direction's
    /// buffer `reads` and split off it.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        reads: &mut Reads,
    ) -> Poll<io::Result<bytes::Bytes>> {
        reads.poll_read_from(cx, self)
    }

    /// Writes from the front of `chunk`, returning how many bytes were taken from it.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }
}

impl Side for tokio::net::TcpStream {}

impl Side for Tunnel {
    /// h2's received chunks as they are, at most a read's maximum at a time; `reads` never
    /// takes a buffer.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        reads: &mut Reads,
    ) -> Poll<io::Result<bytes::Bytes>> {
        Tunnel::poll_chunk(self, cx, reads.max)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_send_chunk(cx, chunk)
    }
}

/// How TCP connections normally end, as far as a proxy is concerned.
pub(crate) fn benign(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted
    )
}

/// The smallest and the middle step of a direction's buffer. A direction starts at
/// [`SMALL`], steps up each time a read fills its buffer (bulk: 1 KiB -> 16 KiB -> the
/// configured maximum) and back down when reads come in far below its size.
const SMALL: usize = 1 << 10;
/// The middle step, 16 KiB: the smallest buffer the thread's spares keep, so that every buffer a
/// bulk read takes from them can go back.
const MEDIUM: usize = spare::SMALLEST;

/// A direction's read buffer. It holds memory only while its direction moves bytes: taken
/// when the reader has something to read, given back as soon as the reader has nothing more
/// and everything read was written, so an idle connection holds none.
pub struct Reads {
    /// No allocation at all while idle, and none ever for a tunnel's reads.
    buf: BytesMut,
    /// Capacity of `buf` when it was taken (it shrinks as reads are split off it).
    full: usize,
    /// Size of the next read.
    size: usize,
    max: usize,
}

impl Reads {
    fn new(max: usize) -> Reads {
        Reads {
            buf: BytesMut::new(),
            full: 0,
            size: SMALL.min(max),
            max,
        }
    }

    fn adapt(&mut self, n: usize) {
        if n >= self.size {
            self.size = if self.size < MEDIUM { MEDIUM } else { self.max }.min(self.max);
        } else if n < self.size / 16 {
            self.size = if self.size > MEDIUM { MEDIUM } else { SMALL }.min(self.max);
        }
    }

    /// Lets go of the buffer (see [`spare::give_back`]).
    fn give_back(&mut self) {
        spare::give_back(std::mem::take(&mut self.buf), self.full);
        self.full = 0;
    }

    /// Reads from `r` into the buffer; returns what was read, split off it (empty: `r` ended).
    fn poll_read_from<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<io::Result<bytes::Bytes>> {
        // Empty: take back the whole allocation (or a new one of today's size) and read at
        // most today's size into its spare capacity (not zeroed first: a bulk read must not
        // pay a memset of the whole buffer).
        self.buf.clear();
        if !self.buf.try_reclaim(self.size) {
            if self.size >= MEDIUM {
                self.give_back();
                self.buf = spare::take(self.size);
            } else {
                self.buf.reserve(self.size);
            }
            self.full = self.buf.capacity();
        }
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(r),
            cx,
            &mut bytes::BufMut::limit(&mut self.buf, self.size),
        ))?;
        let n = self.buf.len();
        if n == 0 {
            // Not a view of the buffer: nothing then points into it but `buf` itself.
            return Poll::Ready(Ok(bytes::Bytes::new()));
        }
        self.adapt(n);
        Poll::Ready(Ok(self.buf.split().freeze()))
    }
}

/// One direction of a proxied connection.
struct Half {
    reads: Reads,
    /// Read and not yet written: split off the read buffer, or a chunk the reader handed
    /// over. A tunnel keeps what it took until h2 has sent it; the buffer is reused once
    /// nothing points into it.
    out: bytes::Bytes,
    /// Bytes read so far.
    read: u64,
    read_done: bool,
    done: bool,
    need_flush: bool,
}

impl Half {
    fn new(max: usize) -> Half {
        Half {
            reads: Reads::new(max),
            out: bytes::Bytes::new(),
            read: 0,
            read_done: false,
            done: false,
            need_flush: false,
        }
    }

    /// Bytes of buffer this direction holds now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.reads.buf.capacity() + self.out.len()
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down) or one side waits.
    fn poll_copy<R: Side + ?Sized, W: Side + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if !self.out.is_empty() {
                let n = ready!(w.poll_write_chunk(cx, &mut self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.need_flush = true;
                if self.out.is_empty() {
                    // Let go of the read buffer's last view, so it can be read into again.
                    self.out = bytes::Bytes::new();
                }
                continue;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match r.poll_chunk(cx, &mut self.reads) {
                Poll::Pending => {
                    // Nothing to read and nothing unwritten: give the memory back while the
                    // peer is quiet.
                    self.reads.give_back();
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(read)) if read.is_empty() => {
                    self.read_done = true;
                    self.reads.give_back();
                }
                Poll::Ready(Ok(read)) => {
                    self.read += read.len() as u64;
                    self.out = read;
                }
            }
        }
    }
}

/// Copies between the client side and the upstream side until both are done, passing
/// half-closes through. Each direction's buffer grows for bulk up to `max_buf` and is given
/// back while the direction is idle. The counts are returned with the error, if any.
pub async fn copy<C, U>(
    client: &mut C,
    upstream: &mut U,
    max_buf: usize,
) -> Result<Bytes, ProxyError>
where
    C: Side + ?Sized,
    U: Side + ?Sized,
{
    copy_after(client, upstream, max_buf, 0).await
}

/// Like [`copy`], for a client whose first `received` bytes were read before the copy and sent
/// on ahead of it (with the CONNECT): they count as received from it, however the copy ends.
pub async fn copy_after<C, U>(
    client: &mut C,
    upstream: &mut U,
    max_buf: usize,
    received: u64,
) -> Result<Bytes, ProxyError>
where
    C: Side + ?Sized,
    U: Side + ?Sized,
{
    copying(client, upstream, max_buf, received, std::future::pending()).await
}

/// Like [`copy`], but abandons the copy as soon as `revoked` completes (a policy change denies
/// the connection): then the error is [`ProxyError::Revoked`] with the counts so far and the
/// denial that `revoked` returned. The caller closes both sides.
pub async fn copy_until<C, U, R>(
    client: &mut C,
    upstream: &mut U,
    max_buf: usize,
    revoked: R,
) -> Result<Bytes, ProxyError>
where
    C: Side + ?Sized,
    U: Side + ?Sized,
    R: std::future::Future<Output = Denial>,
{
    copying(client, upstream, max_buf, 0, revoked).await
}

/// The copy, its client count starting at `received`.
async fn copying<C, U, R>(
    client: &mut C,
    upstream: &mut U,
    max_buf: usize,
    received: u64,
    revoked: R,
) -> Result<Bytes, ProxyError>
where
    C: Side + ?Sized,
    U: Side + ?Sized,
    R: std::future::Future<Output = Denial>,
{
    let (mut to_upstream, mut to_client) = (Half::new(max_buf), Half::new(max_buf));
    to_upstream.read = received;
    let res = {
        let copying = std::future::poll_fn(|cx| {
            let up = to_upstream.poll_copy(cx, client, upstream)?;
            let down = to_client.poll_copy(cx, upstream, client)?;
            if up.is_ready() && down.is_ready() {
                Poll::Ready(Ok::<(), io::Error>(()))
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            r = copying => Ok(r),
            denial = revoked => Err(denial),
        }
    };
    let bytes = Bytes {
        received: to_upstream.read,
        sent: to_client.read,
    };
    match res {
        Ok(Ok(_)) => Ok(bytes),
        Ok(Err(e)) if benign(&e) => Ok(bytes),
        Ok(Err(source)) => Err(ProxyError::Copy { bytes, source }),
        Err(denial) => Err(ProxyError::Revoked { bytes, denial }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    impl Side for tokio::io::DuplexStream {}
    impl<S: AsyncRead + AsyncWrite + Unpin> Side for Offered<S> {}
    impl Side for Refusing {}

    /// Records the size of every read buffer it is offered.
    struct Offered<S> {
        inner: S,
        sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Offered<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.sizes.lock().unwrap().push(buf.remaining());
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Offered<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// An interactive connection reads into a small buffer; bulk grows it to the maximum.
    #[tokio::test]
    async fn reads_start_small_and_grow_for_bulk() {
        const MAX: usize = 256 << 10;
        let (mut client, client_side) = tokio::io::duplex(1 << 20);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1 << 20);
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut client_side = Offered {
            inner: client_side,
            sizes: sizes.clone(),
        };
        let proxy =
            tokio::spawn(async move { copy(&mut client_side, &mut upstream_side, MAX).await });
        client.write_all(&[1; 64]).await.unwrap();
        let mut got = [0u8; 64];
        upstream.read_exact(&mut got).await.unwrap();
        let first = sizes.lock().unwrap()[0];
        assert!(
            first <= 1024,
            "an interactive connection's first read was offered {first} bytes"
        );
        let bulk = 8usize << 20;
        let writer = tokio::spawn(async move {
            client.write_all(&vec![2u8; bulk]).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut n = 0;
        let mut chunk = vec![0u8; 64 << 10];
        while n < bulk {
            n += upstream.read(&mut chunk).await.unwrap();
        }
        let max = sizes.lock().unwrap().iter().copied().max().unwrap();
        assert_eq!(max, MAX, "bulk reads never grew to the maximum buffer");
        drop(upstream);
        drop(writer.await.unwrap());
        let bytes = proxy.await.unwrap().unwrap();
        assert_eq!(bytes.received, 64 + bulk as u64);
    }
    /// A direction holds a buffer only while it moves bytes: once the reader has nothing more
    /// and everything read was written, the buffer is given back, even after bulk grew it.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (mut a, mut a_side) = tokio::io::duplex(1 << 20);
        let (mut b_side, mut b) = tokio::io::duplex(1 << 20);
        let mut half = Half::new(256 << 10);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(half.held(), 0);
        a.write_all(&vec![7u8; 600 << 10]).await.unwrap();
        let r = half.poll_copy(&mut cx, &mut a_side, &mut b_side);
        assert!(r.is_pending());
        assert_eq!(half.held(), 0, "an idle direction kept its buffer");
        assert_eq!(half.reads.size, 256 << 10, "bulk did not grow the reads");
        let mut got = vec![0u8; 600 << 10];
        b.read_exact(&mut got).await.unwrap();
        // Small reads after the bulk bring the size back down.
        a.write_all(&[1u8; 10]).await.unwrap();
        let r = half.poll_copy(&mut cx, &mut a_side, &mut b_side);
        assert!(r.is_pending());
        assert_eq!(half.reads.size, MEDIUM);
        assert_eq!(half.held(), 0);
    }

    /// A bulk direction that goes quiet leaves its buffer to the thread's spares (at most
    /// `SPARES`, never small ones); the next bulk read takes a spare instead of a fresh
    /// allocation; the spares go when the thread releases them.
    #[tokio::test]
    async fn quiet_bulk_buffers_are_reused_and_bounded() {
        let spares = spare::sizes;
        spare::release();
        spare::give_back(BytesMut::with_capacity(SMALL), SMALL);
        assert!(spares().is_empty(), "a small buffer was kept");
        for _ in 0..spare::SPARES + 2 {
            spare::give_back(BytesMut::with_capacity(256 << 10), 256 << 10);
        }
        assert_eq!(spares().len(), spare::SPARES, "the spares are not bounded");
        spare::release();
        assert!(spares().is_empty());

        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let (mut a, mut a_side) = tokio::io::duplex(1 << 20);
        let (mut b_side, _b) = tokio::io::duplex(4 << 20);
        a.write_all(&vec![7u8; 600 << 10]).await.unwrap();
        let mut quiet = Half::new(256 << 10);
        let r = quiet.poll_copy(&mut cx, &mut a_side, &mut b_side);
        assert!(r.is_pending());
        assert_eq!(quiet.held(), 0, "a quiet direction kept its buffer");
        let before = spares();
        assert!(
            before.contains(&(256 << 10)),
            "the bulk buffer was not kept: {before:?}"
        );
        // A bulk read whose writer is blocked holds its buffer: the spare one.
        let (mut c, mut c_side) = tokio::io::duplex(1 << 20);
        let (mut d_side, _d) = tokio::io::duplex(1 << 10);
        let mut bulk = Half::new(256 << 10);
        bulk.reads.size = 256 << 10;
        c.write_all(&vec![8u8; 300 << 10]).await.unwrap();
        let r = bulk.poll_copy(&mut cx, &mut c_side, &mut d_side);
        assert!(r.is_pending());
        assert!(
            bulk.held() > MEDIUM,
            "the blocked bulk read holds no buffer"
        );
        assert_eq!(
            spares().len(),
            before.len() - 1,
            "the bulk read allocated instead of taking the spare"
        );
        spare::release();
        assert!(spares().is_empty());
    }

    /// An HBONE tunnel over memory: h2's client and server on a duplex pipe, one CONNECT
    /// stream open and answered. h2's own defaults (16 KiB frames, 64 KiB windows) exercise
    /// flow control; `zmesh_core`'s (1 MiB frames) the large frames real tunnels carry.
    async fn tunnel_pair(production: bool) -> (Tunnel, Tunnel) {
        let settings = zmesh_core::hbone::H2Settings::default();
        let (client_b, server_b) = if production {
            (settings.h2_client(), settings.h2_server())
        } else {
            (h2::client::Builder::new(), h2::server::Builder::new())
        };
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut conn = server_b.handshake(server_io).await.unwrap();
            let stream = conn.accept().await.unwrap().unwrap();
            let _ = tx.send(stream);
            while conn.accept().await.is_some() {}
        });
        let (client, conn) = client_b.handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let connect = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = client.send_request(connect, false).unwrap();
        let (request, mut respond) = rx.await.unwrap();
        let server_send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let response = response.await.unwrap();
        (
            Tunnel::new(send, response.into_body()),
            Tunnel::new(server_send, request.into_body()),
        )
    }

    /// A tunnel's reads take no buffer of the copy's, and a large frame is handed out no more
    /// than the copy's maximum at a time: what the copy holds while its writer is blocked stays
    /// within what its buffer would have held.
    #[tokio::test]
    async fn a_tunnel_read_holds_no_more_than_the_copy_maximum() {
        const MAX: usize = 64 << 10;
        let (mut near, mut far) = tunnel_pair(true).await;
        // One write of 1 MiB: one DATA frame (the frames go up to 1 MiB).
        far.write_all(&vec![9u8; 1 << 20]).await.unwrap();
        let (mut app_side, _app) = tokio::io::duplex(1 << 10);
        let mut half = Half::new(MAX);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        while half.read == 0 {
            polls += 1;
            assert!(polls < 10_000, "the frame never arrived");
            assert!(
                half.poll_copy(&mut cx, &mut near, &mut app_side)
                    .is_pending()
            );
            tokio::task::yield_now().await;
        }
        assert!(
            half.poll_copy(&mut cx, &mut near, &mut app_side)
                .is_pending()
        );
        assert_eq!(
            half.read, MAX as u64,
            "a chunk larger than the maximum was taken"
        );
        assert_eq!(half.reads.buf.capacity(), 0, "a tunnel read took a buffer");
        assert_eq!(
            half.out.len(),
            MAX - (1 << 10),
            "the blocked writer took more than it could"
        );
    }

    /// A bulk read handed to a tunnel is h2's to send: when the reader goes quiet before h2
    /// has written it out, the buffer is not kept as a spare (nothing may read into it).
    #[tokio::test]
    async fn a_buffer_h2_still_holds_is_not_kept_as_a_spare() {
        spare::release();
        let (mut near, _far) = tunnel_pair(false).await;
        let (mut app, mut app_side) = tokio::io::duplex(1 << 20);
        app.write_all(&[5u8; 32 << 10]).await.unwrap();
        let mut half = Half::new(256 << 10);
        half.reads.size = 256 << 10;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // h2's connection task has not run since: the chunk is still in its send queue.
        assert!(
            half.poll_copy(&mut cx, &mut app_side, &mut near)
                .is_pending()
        );
        assert_eq!(half.read, 32 << 10);
        assert_eq!(half.held(), 0, "a quiet direction kept its buffer");
        // The empty read after it took a fresh buffer, which is kept; the rest of the one h2
        // holds (224 KiB of capacity behind the chunk) is not.
        let spares = spare::sizes();
        assert_eq!(
            spares,
            [256 << 10],
            "a buffer h2 still holds was kept as a spare"
        );
        spare::release();
    }

    /// A peer that drops its tunnel unfinished (h2 resets the stream with CANCEL) has closed
    /// it, as far as the copy's reads are concerned: the app sees the close.
    #[tokio::test]
    async fn a_cancelled_tunnel_reads_as_a_close() {
        let (mut near, far) = tunnel_pair(false).await;
        let (mut app, mut app_side) = tokio::io::duplex(1 << 10);
        let proxy = tokio::spawn(async move { copy(&mut app_side, &mut near, 1 << 10).await });
        drop(far);
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            app.read_to_end(&mut got),
        );
        assert_eq!(read.await.expect("no close reached the app").unwrap(), 0);
        drop(app);
        let done = tokio::time::timeout(std::time::Duration::from_secs(30), proxy);
        let bytes = match done.await.expect("the copy did not end").unwrap() {
            Ok(bytes) | Err(ProxyError::Copy { bytes, .. }) => bytes,
            Err(e) => panic!("{e}"),
        };
        assert_eq!((bytes.received, bytes.sent), (0, 0));
    }

    /// With a tunnel on either side, the copy takes h2's chunks and hands its reads to h2
    /// without a buffer in between: megabytes each way (many windows' worth) arrive whole
    /// and in order, each end's close passes through, and the counts are Istio's.
    #[tokio::test]
    async fn bulk_through_a_tunnel_on_either_side_arrives_whole() {
        let up: Vec<u8> = (0..3usize << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2usize << 20).map(|i| (i % 241) as u8).collect();
        for tunnel_is_client in [false, true] {
            let (mut near, mut far) = tunnel_pair(false).await;
            let (mut app, mut app_side) = tokio::io::duplex(64 << 10);
            let proxy = tokio::spawn(async move {
                if tunnel_is_client {
                    copy(&mut near, &mut app_side, 256 << 10).await
                } else {
                    copy(&mut app_side, &mut near, 256 << 10).await
                }
            });
            let (up2, down2) = (up.clone(), down.clone());
            let app_end = tokio::spawn(async move {
                app.write_all(&up2).await.unwrap();
                app.shutdown().await.unwrap();
                let mut got = Vec::new();
                app.read_to_end(&mut got).await.unwrap();
                got
            });
            let far_end = tokio::spawn(async move {
                let mut got = Vec::new();
                far.read_to_end(&mut got).await.unwrap();
                far.write_all(&down2).await.unwrap();
                far.shutdown().await.unwrap();
                got
            });
            let ends = tokio::time::timeout(std::time::Duration::from_secs(60), async {
                (far_end.await.unwrap(), app_end.await.unwrap())
            });
            let (at_far, at_app) = ends.await.expect("the copy stalled");
            assert!(
                at_far == up,
                "the far end got {} bytes, not the app's",
                at_far.len()
            );
            assert!(
                at_app == down,
                "the app got {} bytes, not the far end's",
                at_app.len()
            );
            let bytes = proxy.await.unwrap().unwrap();
            let (from_client, from_upstream) = if tunnel_is_client {
                (down.len(), up.len())
            } else {
                (up.len(), down.len())
            };
            assert_eq!(
                bytes.received, from_client as u64,
                "tunnel is client: {tunnel_is_client}"
            );
            assert_eq!(
                bytes.sent, from_upstream as u64,
                "tunnel is client: {tunnel_is_client}"
            );
        }
    }

    #[tokio::test]
    async fn counts_each_direction_and_treats_a_reset_as_an_end() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1024);
        let proxy =
            tokio::spawn(async move { copy(&mut client_side, &mut upstream_side, 64).await });
        client.write_all(&[1; 300]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 300);
        upstream.write_all(&[2; 70]).await.unwrap();
        drop(upstream);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 70);
        let bytes = proxy.await.unwrap().unwrap();
        assert_eq!(
            bytes,
            Bytes {
                received: 300,
                sent: 70
            }
        );
    }

    #[tokio::test]
    async fn revocation_stops_the_copy_and_keeps_the_counts() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let proxy = tokio::spawn(async move {
            let revoked = async move {
                let _ = rx.await;
                Denial::Policy("default/deny".to_owned())
            };
            copy_until(&mut client_side, &mut upstream_side, 64, revoked).await
        });
        client.write_all(&[1; 10]).await.unwrap();
        let mut got = [0u8; 10];
        upstream.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        match proxy.await.unwrap() {
            Err(ProxyError::Revoked { bytes, denial }) => {
                assert_eq!(bytes.received, 10);
                assert_eq!(denial.policy(), Some("default/deny"));
            }
            other => panic!("{other:?}"),
        }
        // The proxy's ends are gone: both sides see the connection end.
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(upstream.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// Reads nothing and refuses every write.
    struct Refusing;

    impl AsyncRead for Refusing {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Refusing {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::PermissionDenied.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Bytes an app wrote before its tunnel was open went with the CONNECT, outside the copy:
    /// they count as received however the copy ends.
    #[tokio::test]
    async fn bytes_sent_ahead_count_as_received_however_the_copy_ends() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(1024);
        let proxy =
            tokio::spawn(
                async move { copy_after(&mut client_side, &mut upstream_side, 64, 5).await },
            );
        client.write_all(&[1; 10]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        upstream.write_all(&[2; 3]).await.unwrap();
        drop(upstream);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            proxy.await.unwrap().unwrap(),
            Bytes {
                received: 15,
                sent: 3
            }
        );

        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let proxy =
            tokio::spawn(async move { copy_after(&mut client_side, &mut Refusing, 64, 5).await });
        client.write_all(&[1; 10]).await.unwrap();
        match proxy.await.unwrap() {
            Err(ProxyError::Copy { bytes, .. }) => assert_eq!(bytes.received, 15),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resets_are_benign_other_errors_are_not() {
        assert!(benign(&io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(benign(&io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(!benign(&io::Error::from(io::ErrorKind::PermissionDenied)));
    }
}
