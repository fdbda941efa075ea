//! Small real TCP apps for the lab, run as threads whose sockets were opened inside a host
//! netns (no processes to manage).
//!
//! - [`EchoServer`]: echoes everything, and half-closes after the client half-closes (reads to
//!   EOF, then shuts down its write side). A connection whose first bytes are `WHO\n` is
//!   answered with the server's name and a newline instead, then closed: that is how a test
//!   learns which backend answered ([`identify`]).
//! - [`transfer`]: connects, writes a payload, half-closes and reads to EOF, with writes and
//!   reads overlapping on two threads, so multi-megabyte payloads cannot deadlock.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::sandbox::Sandbox;

/// The request that makes an [`EchoServer`] say its name.
pub const WHO: &[u8] = b"WHO\n";

/// How long clients wait to connect, and for each read or write.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// An echo + identify server on `0.0.0.0:<port>` inside a host netns. Stops accepting on drop;
/// connections in progress finish on their own threads.
#[derive(Debug)]
pub struct EchoServer {
    name: String,
    port: u16,
    stopped: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicUsize,
    peers: Mutex<Vec<SocketAddr>>,
}

impl EchoServer {
    /// Binds `0.0.0.0:port` in `netns` (the socket is listening before this returns) and
    /// serves on background threads. `name` is what `WHO\n` answers.
    pub fn start(sandbox: &Sandbox, netns: &str, port: u16, name: &str) -> Result<EchoServer> {
        let listener = sandbox
            .in_netns(netns, || TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding 0.0.0.0:{port} in {netns}"))?;
        let server = EchoServer {
            name: name.to_owned(),
            port,
            stopped: Arc::new(AtomicBool::new(false)),
            listener: Arc::new(listener),
            stats: Arc::default(),
        };
        let (listener, stopped, stats) = (
            server.listener.clone(),
            server.stopped.clone(),
            server.stats.clone(),
        );
        let name = name.to_owned();
        std::thread::Builder::new()
            .name(format!("echo-{name}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    stats.accepted.fetch_add(1, Ordering::SeqCst);
                    if let Ok(peer) = conn.peer_addr() {
                        stats.peers.lock().expect("peers lock").push(peer);
                    }
                    let name = name.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &name);
                    });
                }
            })?;
        Ok(server)
    }

    /// The name `WHO\n` answers.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it has accepted.
    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// The peer address of every connection accepted so far (who the server saw).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.stats.peers.lock().expect("peers lock").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a thread blocked in accept(2) on Linux.
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn serve(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut buf = vec![0u8; 64 * 1024];
    // Read until we can tell an identify request from echo data.
    let mut first = Vec::new();
    while first.len() < WHO.len() && WHO.starts_with(&first) {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&buf[..n]);
    }
    if first == WHO {
        conn.write_all(format!("{name}\n").as_bytes())?;
        return conn.shutdown(Shutdown::Write);
    }
    conn.write_all(&first)?;
    if first.is_empty() {
        return conn.shutdown(Shutdown::Write);
    }
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])?;
    }
    conn.shutdown(Shutdown::Write)
}

/// Connects to `dst` from inside `netns`.
pub fn connect(sandbox: &Sandbox, netns: &str, dst: SocketAddr) -> Result<TcpStream> {
    let stream = sandbox
        .in_netns(netns, || TcpStream::connect_timeout(&dst, IO_TIMEOUT))?
        .with_context(|| format!("connecting from {netns} to {dst}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Connects from `netns` to `dst`, writes `payload`, half-closes and returns everything read
/// until the server closes. Writes run on their own thread, so any size works.
pub fn transfer(
    sandbox: &Sandbox,
    netns: &str,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let stream = connect(sandbox, netns, dst)?;
    exchange(stream, payload).with_context(|| format!("transfer from {netns} to {dst}"))
}

/// Writes `payload` and half-closes on one thread while reading to EOF on this one.
pub fn exchange(stream: TcpStream, payload: &[u8]) -> Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let mut reader = stream;
    std::thread::scope(|s| {
        let w = s.spawn(move || -> std::io::Result<()> {
            writer.write_all(payload)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut got = Vec::with_capacity(payload.len());
        let read = reader.read_to_end(&mut got);
        let wrote = w.join().map_err(|_| anyhow!("writer thread panicked"))?;
        wrote.context("writing the payload")?;
        read.with_context(|| format!("reading the reply (after {} bytes)", got.len()))?;
        Ok(got)
    })
}

/// Asks the server at `dst` (seen from `netns`) for its name: sends `WHO\n`, returns the
/// answer without the newline.
pub fn identify(sandbox: &Sandbox, netns: &str, dst: SocketAddr) -> Result<String> {
    let reply = transfer(sandbox, netns, dst, WHO)?;
    Ok(String::from_utf8_lossy(&reply).trim_end().to_owned())
}
