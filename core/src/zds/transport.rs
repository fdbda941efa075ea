//! The ZDS transport: unix `SOCK_SEQPACKET` sockets driven by tokio.
//!
//! tokio has no seqpacket type, so the sockets are non-blocking file descriptors (made with
//! socket2) registered with the reactor through [`AsyncFd`]; `sendmsg`/`recvmsg` come from nix.
//! A seqpacket socket keeps message boundaries: one `send` is one `recv` on the other side, and
//! each carries one bare protobuf message. File descriptors travel as `SCM_RIGHTS`.
//!
//! [`SeqpacketConn::recv`] reads into a [`MAX_MESSAGE_SIZE`] buffer, as upstream ztunnel does,
//! and rejects a packet that did not fit (`MSG_TRUNC`). Its ancillary buffer has room for the
//! most descriptors the kernel passes in one message (`SCM_MAX_FD`), so every descriptor that
//! arrives is owned by the caller (and closed when dropped) rather than leaked; received
//! descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`). Both `send` and `recv` are cancel safe.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::debug;

use super::{MAX_MESSAGE_SIZE, SOCKET_MODE, ZdsError};

/// The most descriptors Linux passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Backlog of the listening socket.
const BACKLOG: i32 = 128;

/// A listening ZDS socket (the node agent's side).
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl SeqpacketListener {
    /// Listens on `path` with [`SOCKET_MODE`] (0600). See [`SeqpacketListener::bind_with_mode`].
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        Self::bind_with_mode(path, SOCKET_MODE)
    }

    /// Listens on `path`, first removing a socket file left there by an earlier run (any other
    /// kind of file is an error, never deleted). The file gets `mode` before the socket starts
    /// listening, so nobody can connect while it still has the umask's permissions. Must be
    /// called within a tokio runtime.
    pub fn bind_with_mode(path: impl AsRef<Path>, mode: u32) -> Result<Self, ZdsError> {
        let path = path.as_ref();
        let listen = || -> io::Result<AsyncFd<OwnedFd>> {
            remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            socket.listen(BACKLOG)?;
            register(OwnedFd::from(socket))
        };
        let fd = listen().map_err(|source| ZdsError::Listen {
            path: path.to_owned(),
            source,
        })?;
        Ok(SeqpacketListener {
            fd,
            path: path.to_owned(),
        })
    }

    /// The path this listener is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<SeqpacketConn> {
        let (socket, _peer) = self
            .fd
            .async_io(Interest::READABLE, |fd| SockRef::from(fd).accept())
            .await?;
        SeqpacketConn::from_socket(socket)
    }
}

/// Removes a socket file left behind by an earlier listener; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; remove it by hand if it is not needed",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One ZDS connection: message-oriented, with file descriptor passing.
#[derive(Debug)]
pub struct SeqpacketConn {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketConn {
    /// Connects to the listener at `path` (ztunnel's side). A unix socket connects at once or
    /// fails (no listener: `ECONNREFUSED`; backlog full: `EAGAIN`), so this does not wait.
    /// Must be called within a tokio runtime.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref();
        let connect = || -> io::Result<SeqpacketConn> {
            let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
            socket.connect(&SockAddr::unix(path)?)?;
            SeqpacketConn::from_socket(socket)
        };
        connect().map_err(|source| ZdsError::Connect {
            path: path.to_owned(),
            source,
        })
    }

    /// A connected pair of sockets, for tests and in-process use.
    pub fn pair() -> io::Result<(SeqpacketConn, SeqpacketConn)> {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
        Ok((Self::from_socket(a)?, Self::from_socket(b)?))
    }

    fn from_socket(socket: Socket) -> io::Result<SeqpacketConn> {
        socket.set_nonblocking(true)?;
        Ok(SeqpacketConn {
            fd: register(OwnedFd::from(socket))?,
        })
    }

    /// Sends one message, with `fd` attached as `SCM_RIGHTS` if given. The descriptor stays
    /// open here; the peer receives its own copy.
    pub async fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        match fd {
            Some(fd) => self.send_with_fds(msg, &[fd]).await,
            None => self.send_with_fds(msg, &[]).await,
        }
    }

    /// Sends one message with any number of descriptors attached (ZDS itself never needs more
    /// than one; this exists to test how a receiver copes with more).
    pub async fn send_with_fds(&self, msg: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ZdsError> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(msg)];
        let sent = self
            .fd
            .async_io(Interest::WRITABLE, |sock| {
                sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await
            .map_err(closed_or_io)?;
        if sent != msg.len() {
            // Seqpacket sends are atomic; this would be a kernel bug.
            return Err(ZdsError::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes of a ZDS message", msg.len()),
            )));
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it.
    ///
    /// End of file is [`ZdsError::Closed`]. A message larger than [`MAX_MESSAGE_SIZE`] is
    /// [`ZdsError::Truncated`] and consumed; its descriptors are closed.
    pub async fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let (len, flags, fds) = self
            .fd
            .async_io(Interest::READABLE, |sock| {
                recv_once(sock.as_fd(), &mut buf, &mut cmsg)
            })
            .await
            .map_err(closed_or_io)?;
        // Checked after taking ownership of the descriptors, so that they are closed on error.
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(ZdsError::Truncated);
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(ZdsError::ControlTruncated);
        }
        if len == 0 && fds.is_empty() {
            // An empty seqpacket read is end of file (an empty message looks the same, but no
            // ZDS message encodes to nothing that would matter: upstream reads it as EOF too).
            return Err(ZdsError::Closed);
        }
        buf.truncate(len);
        Ok((buf, fds))
    }
}

/// One non-blocking `recvmsg`: the length, the flags and the received descriptors, owned.
fn recv_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<(usize, MsgFlags, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    // `cmsgs()` fails only on MSG_CTRUNC, which the caller reports. With room for SCM_MAX_FD
    // descriptors that cannot happen for SCM_RIGHTS, the only ancillary data we can receive.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            match cmsg {
                ControlMessageOwned::ScmRights(raw) => {
                    fds.extend(raw.into_iter().map(|fd| {
                        // SAFETY: the kernel installed these descriptors in our table for this
                        // recvmsg call; nothing else refers to them, so we are their only owner.
                        unsafe { OwnedFd::from_raw_fd(fd) }
                    }));
                }
                other => debug!(?other, "ignoring unexpected control message on ZDS socket"),
            }
        }
    }
    Ok((msg.bytes, msg.flags, fds))
}

/// Registers a non-blocking descriptor with the tokio reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that nothing else closes, and its `as_raw_fd`
    // always returns that same descriptor; the `AsyncFd` owns it until dropped and never hands
    // out mutable access to it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// A peer that went away mid-call is [`ZdsError::Closed`]; anything else is I/O.
fn closed_or_io(e: io::Error) -> ZdsError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ZdsError::Closed,
        _ => ZdsError::Io(e),
    }
}
