//! Socket helpers for transparent proxying: the original destination after a kernel REDIRECT,
//! the packet mark that keeps zmesh's own traffic out of the capture rules, outbound sockets.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Netns;

/// The mark zmesh puts on its own sockets (Istio's 0x539), so capture rules skip them.
pub const ZMESH_MARK: u32 = 0x539;

/// The destination a connection was addressed to before a REDIRECT sent it to us.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        let sa = getsockopt(&stream.as_fd(), sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port)))
    } else {
        let sa = getsockopt(&stream.as_fd(), sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        let addr = SocketAddr::new(IpAddr::V6(ip), u16::from_be(sa.sin6_port));
        // An IPv4 connection on a dual-stack socket reports a v4-mapped address.
        Ok(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        })
    }
}

/// The most a proxy takes of what a client wrote before its tunnel is open
/// ([`already_written`]).
pub const FIRST_BYTES: usize = 4 << 10;

/// What the client already wrote on `stream`, up to [`FIRST_BYTES`], taken without waiting:
/// empty when it wrote nothing yet (a server-first protocol) or closed its side. Read with the
/// socket's own call rather than tokio's, whose readiness for a just-accepted socket is not
/// known until its reactor's next turn; tokio learns of anything left at that turn as usual.
pub fn already_written(stream: &TcpStream) -> io::Result<bytes::Bytes> {
    use std::io::Read;
    let mut buf = [0u8; FIRST_BYTES];
    match (&*socket2::SockRef::from(stream)).read(&mut buf) {
        Ok(n) => Ok(bytes::Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(bytes::Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Size of the read buffer under TLS. rustls asks the socket for 4 KiB beyond what it holds at
/// a time (at most a record's 18 KiB, or 64 KiB - 1 while it joins a large handshake message);
/// reading the kernel in larger pieces saves most of those system calls.
pub const TLS_READ_BUFFER: usize = 64 << 10;

/// A TCP stream whose reads are buffered (writes pass straight through), to put under TLS.
///
/// Unlike tokio's `BufReader`, which allocates and zeroes its whole buffer when the stream is
/// made and keeps it for the stream's life, the buffer is taken only when a read finds nothing
/// buffered, is never zeroed (the kernel writes the bytes read), and is given back as soon as
/// it is drained, and when the socket has nothing to read, fails or is closed, to the thread's
/// spares ([`crate::spare`]), which the next read takes from. A connection between reads holds
/// no read buffer, and a new one costs no 64 KiB `memset`.
pub struct BufferedStream {
    tcp: TcpStream,
    buf: bytes::BytesMut,
}

impl BufferedStream {
    /// Bytes read from the socket and not yet read from this stream, with the room after them:
    /// 0 whenever nothing is buffered (no buffer is held then).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl AsyncRead for BufferedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use bytes::Buf;
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut read = Poll::Ready(Ok(()));
        if this.buf.is_empty() {
            this.buf = crate::spare::take(TLS_READ_BUFFER);
            read = tokio_util::io::poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.buf)
                .map_ok(drop);
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        // Drained, or nothing came (not yet, an error, the peer's close): hold no buffer.
        if this.buf.is_empty() {
            crate::spare::give_back(std::mem::take(&mut this.buf), TLS_READ_BUFFER);
        }
        read
    }
}

impl AsyncWrite for BufferedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The most TLS records an HBONE connection holds to send (rustls's own default is 64 KiB).
/// tokio-rustls writes out what is held after each write of plaintext, so this is the most one
/// `writev(2)` sends: with 64 KiB, bulk data went out four 16 KiB records per system call.
/// Held while a write is sealed and sent, and across polls only while the socket takes less
/// ([`hold_bulk_records`]): at most 256 KiB per HBONE connection whose peer stops reading.
pub const TLS_WRITE_BUFFER: usize = 256 << 10;

/// Lets a TLS connection that carries bulk data (HBONE, either end) hold up to
/// [`TLS_WRITE_BUFFER`] of records to send.
pub(crate) fn hold_bulk_records<T>(conn: &mut rustls::ConnectionCommon<T>) {
    conn.set_buffer_limit(Some(TLS_WRITE_BUFFER));
}

/// `tcp` with its reads buffered, to put under TLS.
pub fn buffered(tcp: TcpStream) -> BufferedStream {
    BufferedStream {
        tcp,
        buf: bytes::BytesMut::new(),
    }
}

/// Options for sockets zmesh opens towards peers and applications.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// Create the sockets inside this network namespace (a pod's, in shared mode).
    pub netns: Option<Netns>,
    /// SO_MARK to set; `None` where marking is not wanted (tests without CAP_NET_ADMIN).
    pub mark: Option<u32>,
    pub connect_timeout: Duration,
    pub keepalive: Option<Duration>,
    /// Allow binding a source address that is not local (IP_TRANSPARENT): in a pod, the
    /// client's address, so the app sees who really called. Replies find their way back to
    /// ztunnel through the pod's connmark rules and table 100.
    pub transparent: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            netns: None,
            mark: Some(ZMESH_MARK),
            connect_timeout: Duration::from_secs(10),
            keepalive: Some(Duration::from_secs(180)),
            transparent: false,
        }
    }
}

/// A TCP socket, created inside `netns` when given (it stays there for life).
fn new_socket(v4: bool, netns: Option<&Netns>) -> io::Result<TcpSocket> {
    let make = || {
        if v4 {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    match netns {
        Some(ns) => ns.run(make)?,
        None => make(),
    }
}

/// Opens a TCP connection to `dst`, optionally from `src`, marked and with Nagle off.
pub async fn connect(
    dst: SocketAddr,
    src: Option<IpAddr>,
    opts: &SocketOptions,
) -> io::Result<TcpStream> {
    let sock = new_socket(dst.is_ipv4(), opts.netns.as_ref())?;
    let sref = socket2::SockRef::from(&sock);
    if let Some(mark) = opts.mark {
        sref.set_mark(mark)?;
    }
    if let Some(idle) = opts.keepalive {
        sref.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(idle),
        )?;
    }
    sock.set_nodelay(true)?;
    if let Some(src) = src
        && src.is_ipv4() == dst.is_ipv4()
    {
        if opts.transparent {
            if src.is_ipv4() {
                sref.set_ip_transparent_v4(true)?;
            } else {
                sref.set_ip_transparent_v6(true)?;
            }
        }
        sock.bind(SocketAddr::new(src, 0))?;
    }
    match tokio::time::timeout(opts.connect_timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connect to {dst} timed out after {:?}",
                opts.connect_timeout
            ),
        )),
    }
}

/// Binds a listener with SO_REUSEADDR (and SO_REUSEPORT when asked, so a new process can
/// start beside a draining one).
pub fn listen(
    addr: SocketAddr,
    reuse_port: bool,
    mark: Option<u32>,
    netns: Option<&Netns>,
) -> io::Result<tokio::net::TcpListener> {
    let sock = new_socket(addr.is_ipv4(), netns)?;
    sock.set_reuseaddr(true)?;
    if reuse_port {
        sock.set_reuseport(true)?;
    }
    if let Some(mark) = mark {
        socket2::SockRef::from(&sock).set_mark(mark)?;
    }
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use rustls::pki_types::ServerName;

    use super::*;
    use crate::identity::SpiffeId;
    use crate::tls::LocalCa;

    use crate::tls::tests::transfer;

    /// An HBONE connection takes 256 KiB of data in one write, sealed and held for one
    /// `writev`; rustls's default takes 64 KiB.
    #[test]
    fn an_hbone_connection_holds_four_times_rustls_default_to_send() {
        let ca = LocalCa::generate("test").unwrap();
        let id = |sa: &str| SpiffeId::new("cluster.local", "default", sa).unwrap();
        let server_cert = ca.issue(&id("server"), Duration::from_secs(600)).unwrap();
        let client_cert = ca.issue(&id("client"), Duration::from_secs(600)).unwrap();
        let taken = |hold: bool| {
            let cfg = client_cert.client_config(vec![id("server")]).unwrap();
            let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
            let mut client = rustls::ClientConnection::new(cfg, name).unwrap();
            let mut server = rustls::ServerConnection::new(server_cert.server_config()).unwrap();
            while client.is_handshaking() || server.is_handshaking() {
                transfer(&mut client, &mut server);
                transfer(&mut server, &mut client);
            }
            if hold {
                hold_bulk_records(&mut client);
            }
            client.writer().write(&vec![0u8; 1 << 20]).unwrap()
        };
        assert_eq!(taken(false), 64 << 10);
        assert_eq!(taken(true), TLS_WRITE_BUFFER);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Reads come out of the buffer in the pieces asked for (rustls asks for 4 KiB), in order;
    /// the buffer is held while it has bytes and given back once they are read or the socket
    /// has nothing; a read with no room reads nothing; writes pass through; the peer's close is
    /// an end of file.
    #[tokio::test]
    async fn a_buffered_stream_holds_its_buffer_only_while_it_has_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        crate::spare::release();
        let (mut c, s) = pair().await;
        let mut s = buffered(s);
        assert_eq!(s.buffer_capacity(), 0, "no buffer before the first read");
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&sent).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.read(&mut []).await.unwrap(), 0, "no room: nothing read");
        assert_eq!(s.buffer_capacity(), 0, "and no buffer taken");
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        let mut held_between_pieces = false;
        while got.len() < sent.len() {
            let n = s.read(&mut piece).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
            held_between_pieces |= s.buffer_capacity() > 0;
        }
        assert_eq!(got, sent);
        assert!(held_between_pieces, "10,000 bytes came in one socket read");
        assert_eq!(s.buffer_capacity(), 0, "drained: the buffer is given back");
        assert_eq!(
            crate::spare::sizes(),
            [TLS_READ_BUFFER],
            "kept as the thread's spare"
        );
        c.write_all(b"again").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut two = [0u8; 2];
        s.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ag");
        assert!(
            crate::spare::sizes().is_empty(),
            "the read took the spare while the stream holds bytes"
        );
        let mut rest = [0u8; 3];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"ain");
        assert_eq!(
            crate::spare::sizes().len(),
            1,
            "drained again: given back as the spare"
        );
        crate::spare::release();
        let idle = tokio::time::timeout(Duration::from_millis(50), s.read(&mut piece)).await;
        assert!(idle.is_err(), "nothing more was sent");
        assert_eq!(
            s.buffer_capacity(),
            0,
            "an idle stream holds no read buffer"
        );

        s.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        c.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");

        drop(c);
        assert_eq!(s.read(&mut piece).await.unwrap(), 0, "the peer's close");
        assert_eq!(s.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn what_a_client_already_wrote_is_taken_without_waiting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, s) = pair().await;
        assert_eq!(already_written(&s).unwrap(), "", "nothing written yet");
        let mut req = vec![b'a'; FIRST_BYTES];
        req.extend_from_slice(b"tail");
        c.write_all(&req).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // At most FIRST_BYTES; the rest stays for the socket's next read.
        assert_eq!(already_written(&s).unwrap(), req[..FIRST_BYTES]);
        let mut s = s;
        let mut rest = [0u8; 16];
        let n = s.read(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], b"tail");
        // Taken behind tokio's back, everything there was: tokio still wakes for what comes.
        c.write_all(b"now").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(already_written(&s).unwrap(), "now");
        let later = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            c.write_all(b"later").await.unwrap();
            c
        });
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut rest))
            .await
            .expect("no wake-up for bytes written after the socket was read directly")
            .unwrap();
        assert_eq!(&rest[..n], b"later");
        let c = later.await.unwrap();
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(already_written(&s).unwrap(), "", "closed: nothing");
    }
}
