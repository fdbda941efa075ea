//! Copying a proxied connection both ways, with byte counts that survive errors.
//!
//! Istio's meaning of the byte metrics (Envoy's): `received` is what the downstream (the
//! client) sent towards the destination, `sent` is what went back to it. A connection that
//! ends with a reset or a broken pipe is an ordinary end for TCP proxying: its bytes are
//! counted and it is not logged as an error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ProxyError;
use super::policy::Denial;

/// Bytes of one proxied connection, in Istio's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// From the client towards the destination (request direction).
    pub received: u64,
    /// From the destination back to the client (response direction).
    pub sent: u64,
}

/// Counts what is read through it; everything else passes straight through.
struct Counting<'a, S: ?Sized> {
    inner: &'a mut S,
    read: u64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counting<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        res
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counting<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// How TCP connections normally end, as far as a proxy is concerned.
fn benign(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted
    )
}

/// Copies between the client side and the upstream side until both are done, passing
/// half-closes through. The counts are returned with the error, if any.
pub async fn copy<C, U>(client: &mut C, upstream: &mut U, buf: usize) -> Result<Bytes, ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_until(client, upstream, buf, std::future::pending()).await
}

/// Like [`copy`], but abandons the copy as soon as `revoked` completes (a policy change denies
/// the connection): then the error is [`ProxyError::Revoked`] with the counts so far and the
/// denial that `revoked` returned. The caller closes both sides.
pub async fn copy_until<C, U, R>(
    client: &mut C,
    upstream: &mut U,
    buf: usize,
    revoked: R,
) -> Result<Bytes, ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    R: std::future::Future<Output = Denial>,
{
    let mut c = Counting {
        inner: client,
        read: 0,
    };
    let mut u = Counting {
        inner: upstream,
        read: 0,
    };
    let res = {
        let copying = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, buf, buf);
        tokio::select! {
            r = copying => Ok(r),
            denial = revoked => Err(denial),
        }
    };
    let bytes = Bytes {
        received: c.read,
        sent: u.read,
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    #[test]
    fn resets_are_benign_other_errors_are_not() {
        assert!(benign(&io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(benign(&io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(!benign(&io::Error::from(io::ErrorKind::PermissionDenied)));
    }
}
