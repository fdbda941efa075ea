//! What idle HBONE connections' TLS holds in memory, with the reads under TLS buffered by
//! `zmesh_core::socket::buffered` (a buffer taken for a read and given back once drained) and, for comparison in the same run, by tokio's `BufReader` (64 KiB allocated
//! and zeroed when the connection is made, held for its life), as before the twelfth sitting.
//! `cargo bench -p zmesh-core --bench idle_tls`; no privileges, loopback only.
//!
//! Each way runs in a child process of its own, so neither reuses memory the other freed. A
//! child opens `IDLE_TLS_N` (default 2,000) connections over loopback with the real
//! configurations (`hbone_client` as the pool connects, `resuming_server_config` as
//! `hbone_tls_accept` accepts: mutual TLS, ECDSA P-256 certificates from a `LocalCa`), sends
//! 1 KiB each way on each so that both ends have read, holds them all open and idle, and
//! reports its resident memory per connection, both ends counted (a client end and a server
//! end are both in the process). A ztunnel holds one end of each HBONE connection it has.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh_core::identity::SpiffeId;
use zmesh_core::socket::{TLS_READ_BUFFER, buffered};
use zmesh_core::tls::LocalCa;

// ztunnel's and the waypoint's allocator, so memory is held as it is there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODE: &str = "IDLE_TLS_MODE";
const MESSAGE: usize = 1024;

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .expect("a valid SPIFFE id")
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("resident pages in statm");
    // SAFETY: sysconf has no preconditions.
    pages * (unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64) / 1024
}

fn main() {
    let n: usize = std::env::var("IDLE_TLS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    if let Ok(mode) = std::env::var(MODE) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(child(&mode, n));
        return;
    }
    println!("{n} idle HBONE TLS connections over loopback, both ends in one process");
    println!("| reads under TLS | resident memory per connection (both ends) |");
    println!("|---|---|");
    for (mode, what) in [
        ("buffered", "zmesh_core::socket::buffered (now)"),
        ("bufreader", "tokio BufReader, 64 KiB (before)"),
    ] {
        let out = std::process::Command::new(std::env::current_exe().expect("this bench"))
            .env(MODE, mode)
            .output()
            .expect("running a child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("| {what} | {} |", text.trim());
    }
}

async fn child(mode: &str, n: usize) {
    let old = match mode {
        "buffered" => false,
        "bufreader" => true,
        other => panic!("unknown {MODE} {other}"),
    };
    let ca = LocalCa::generate("bench").expect("a CA");
    let server_cert = ca
        .issue(&id("server"), Duration::from_secs(3600))
        .expect("a server certificate");
    let client_cert = ca
        .issue(&id("client"), Duration::from_secs(3600))
        .expect("a client certificate");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let addr = listener.local_addr().expect("its address");
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cert.resuming_server_config());
        loop {
            let (tcp, _) = listener.accept().await.expect("accepting");
            let held = held_tx.clone();
            let acceptor = acceptor.clone();
            let server_cert = server_cert.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; MESSAGE];
                if old {
                    let io = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp);
                    let mut tls = acceptor.accept(io).await.expect("a handshake");
                    tls.read_exact(&mut buf).await.expect("the request");
                    tls.write_all(&buf).await.expect("the answer");
                    held.send(Box::new(tls) as Box<dyn Send>).ok();
                } else {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    let (mut tls, _) = zmesh_core::serve::hbone_tls_accept(
                        &server_cert,
                        tcp,
                        deadline,
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("a handshake");
                    tls.read_exact(&mut buf).await.expect("the request");
                    tls.write_all(&buf).await.expect("the answer");
                    held.send(Box::new(tls) as Box<dyn Send>).ok();
                }
            });
        }
    });
    let open = |count: usize| {
        let client_cert = client_cert.clone();
        async move {
            let mut clients: Vec<Box<dyn Send>> = Vec::with_capacity(count);
            for _ in 0..count {
                let tcp = TcpStream::connect(addr).await.expect("connecting");
                let client = client_cert
                    .hbone_client(addr, &[id("server")])
                    .expect("a client configuration");
                let mut buf = [7u8; MESSAGE];
                if old {
                    let io = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp);
                    let mut tls = client.connect(io).await.expect("a handshake");
                    tls.write_all(&buf).await.expect("the request");
                    tls.read_exact(&mut buf).await.expect("the answer");
                    clients.push(Box::new(tls));
                } else {
                    let mut tls = client.connect(buffered(tcp)).await.expect("a handshake");
                    tls.write_all(&buf).await.expect("the request");
                    tls.read_exact(&mut buf).await.expect("the answer");
                    clients.push(Box::new(tls));
                }
            }
            clients
        }
    };
    // Warm up what every connection shares (configurations, session caches, the runtime).
    let warm = open(50).await;
    let mut servers = Vec::new();
    for _ in 0..50 {
        servers.push(held_rx.recv().await.expect("a server end"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let clients = open(n).await;
    for _ in 0..n {
        servers.push(held_rx.recv().await.expect("a server end"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "{:.1} KiB ({} -> {} KiB for {n})",
        (after.saturating_sub(before)) as f64 / n as f64,
        before,
        after
    );
    drop((warm, clients, servers));
    server.abort();
}
