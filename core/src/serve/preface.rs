//! The first bytes of an HTTP/2 connection (RFC 9113 §3.4): the client preface followed by a
//! SETTINGS frame. A server reads them under its handshake deadline, then hands the connection
//! to hyper with those bytes put back in front ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The frame type of SETTINGS (RFC 9113 §6.5).
const SETTINGS: u8 = 0x4;
/// The ACK flag of SETTINGS.
const ACK: u8 = 0x1;
/// A client's first SETTINGS larger than this is refused (each setting is 6 bytes; RFC 9113
/// defines six and this leaves room for many more).
const MAX_SETTINGS_LEN: usize = 6 * 64;

/// Why the first bytes were not an HTTP/2 client preface and SETTINGS.
#[derive(Debug, thiserror::Error)]
pub enum PrefaceError {
    /// The connection ended or failed before the preface was complete.
    #[error("reading the HTTP/2 preface: {0}")]
    Io(#[from] io::Error),
    /// The client does not speak HTTP/2 (prior knowledge or ALPN h2).
    #[error("the client did not send the HTTP/2 preface (is it speaking HTTP/2?)")]
    NotHttp2,
    /// The first frame after the preface was not a SETTINGS frame.
    #[error("the first HTTP/2 frame was {0}, not SETTINGS (RFC 9113 §3.4)")]
    NotSettings(String),
}

/// Reads the client preface and the first SETTINGS frame from `io`; returns `io` with them put
/// back in front, for the HTTP/2 server to read again.
pub async fn read_h2_start<S: AsyncRead + Unpin>(mut io: S) -> Result<Prefixed<S>, PrefaceError> {
    let mut head = [0u8; 24 + 9];
    io.read_exact(&mut head).await?;
    if &head[..24] != PREFACE {
        return Err(PrefaceError::NotHttp2);
    }
    let frame = &head[24..];
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    let (kind, flags) = (frame[3], frame[4]);
    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
    if kind != SETTINGS || flags & ACK != 0 || stream != 0 {
        return Err(PrefaceError::NotSettings(format!(
            "type {kind:#x} flags {flags:#x} on stream {stream}"
        )));
    }
    if len % 6 != 0 || len > MAX_SETTINGS_LEN {
        return Err(PrefaceError::NotSettings(format!(
            "a SETTINGS frame of {len} bytes"
        )));
    }
    let mut buf = BytesMut::with_capacity(head.len() + len);
    buf.extend_from_slice(&head);
    buf.resize(head.len() + len, 0);
    io.read_exact(&mut buf[head.len()..]).await?;
    Ok(Prefixed {
        prefix: buf.freeze(),
        inner: io,
    })
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner` with `prefix` (bytes already read from it) put back in front.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn settings(len: usize, flags: u8) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend_from_slice(&[0, 0, len as u8, SETTINGS, flags, 0, 0, 0, 0]);
        v.extend(std::iter::repeat_n(7u8, len));
        v
    }

    #[tokio::test]
    async fn preface_and_settings_are_replayed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut sent = settings(12, 0);
        sent.extend_from_slice(b"next frame");
        client.write_all(&sent).await.unwrap();
        drop(client);
        let mut p = read_h2_start(server).await.unwrap();
        let mut got = Vec::new();
        p.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for (bytes, want) in [
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n..........".to_vec(),
                "preface",
            ),
            (settings(12, ACK), "not SETTINGS"),
            (settings(7, 0), "of 7 bytes"),
            (
                {
                    let mut v = PREFACE.to_vec();
                    v.extend_from_slice(&[0, 0, 0, 0x6, 0, 0, 0, 0, 0]);
                    v
                },
                "type 0x6",
            ),
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(&bytes).await.unwrap();
            let e = read_h2_start(server).await.unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        // A client that stops halfway: an I/O error (EOF), not a hang.
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&PREFACE[..10]).await.unwrap();
        drop(client);
        assert!(matches!(
            read_h2_start(server).await,
            Err(PrefaceError::Io(_))
        ));
    }
}
