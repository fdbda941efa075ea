//! `zmesh-relay`: the plainest pair of proxies that can stand where two ztunnels stand, for
//! `zmesh-bench --relay`: what any two-proxy data path costs on this machine before TLS,
//! HTTP/2, policy and telemetry. No encryption, no multiplexing: one TCP connection between the
//! relays per connection of the app.
//!
//! - `zmesh-relay outbound LISTEN PEER` (the client's host, where the REDIRECT rules send the
//!   app's connections): accepts, takes the original destination (`SO_ORIGINAL_DST`), connects
//!   to `PEER` with zmesh's mark (so the rules let it pass), sends the destination as 6 bytes
//!   (IPv4 address, port), then copies both ways.
//! - `zmesh-relay inbound LISTEN` (the server's host): accepts, reads the 6 bytes, connects to
//!   that address, then copies both ways.
//!
//! One thread, one current-thread tokio runtime (ztunnel's default on a 2-core machine), the
//! sockets with `TCP_NODELAY`, 64 KiB copy buffers each way.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh_core::socket::{SocketOptions, connect, original_dst};

const COPY_BUFFER: usize = 64 << 10;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["outbound", listen, peer] => {
            let (listen, peer) = (listen.parse()?, peer.parse()?);
            rt.block_on(outbound(listen, peer))
        }
        ["inbound", listen] => rt.block_on(inbound(listen.parse()?)),
        _ => bail!("usage: zmesh-relay outbound LISTEN PEER | inbound LISTEN"),
    }
}

fn options() -> SocketOptions {
    SocketOptions {
        keepalive: None,
        ..SocketOptions::default()
    }
}

async fn outbound(listen: SocketAddr, peer: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (app, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(SocketAddr::V4(dst)) = original_dst(&app) else {
                return;
            };
            if dst.port() == listen.port() {
                return; // addressed to the relay itself (a readiness probe)
            }
            let _ = app.set_nodelay(true);
            let Ok(mut up) = connect(peer, None, &options()).await else {
                return;
            };
            let mut header = [0u8; 6];
            header[..4].copy_from_slice(&dst.ip().octets());
            header[4..].copy_from_slice(&dst.port().to_be_bytes());
            if up.write_all(&header).await.is_ok() {
                relay(app, up).await;
            }
        });
    }
}

async fn inbound(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (mut down, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = down.set_nodelay(true);
            let mut header = [0u8; 6];
            if down.read_exact(&mut header).await.is_err() {
                return;
            }
            let ip = Ipv4Addr::new(header[0], header[1], header[2], header[3]);
            let port = u16::from_be_bytes([header[4], header[5]]);
            let Ok(app) = connect(SocketAddr::new(IpAddr::V4(ip), port), None, &options()).await
            else {
                return;
            };
            relay(down, app).await;
        });
    }
}

async fn relay(mut a: TcpStream, mut b: TcpStream) {
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER, COPY_BUFFER).await;
}
