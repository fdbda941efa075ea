//! What a new HBONE connection's TLS 1.3 handshake computes in user space, and the
//! per-connection steps around it, in a plain bench binary (`cargo bench -p zmesh-core --bench
//! handshake`; no criterion in the workspace). Client and server run the real configurations
//! (`WorkloadCertificate::client_config` / `server_config`, or `hbone_client` /
//! `resuming_server_config` as the pool and `hbone_tls_accept` use them: mutual TLS,
//! ECDSA P-256 certificates from a `LocalCa`, the verifiers' remembered chains) over memory,
//! with no sockets, so the figures hold only what the processes themselves compute, on one
//! thread. Prints wall-clock nanoseconds per step, which on an otherwise idle core is that CPU
//! time; run it under `valgrind --tool=callgrind` for instruction counts that a busy machine
//! does not move. `HANDSHAKE_N` sets the number of handshakes (default 2,000; the cheap steps
//! run 100 times as often).
//!
//! Two handshakes: a full one (certificates and signatures both ways), and a resumed one, as
//! the pool makes to a server it had a session with (each uses one ticket and receives the
//! next), with both sides' checks of the resumed peer (`HboneClient::confirm`,
//! `WorkloadCertificate::client_peer`).
//!
//! The full handshake's figure includes building a client configuration, as the pool did for
//! every new connection before it kept them; the line for that step is a part of it, not an
//! addition. The pool's handshake includes finding its kept configuration and naming its
//! tickets (`hbone_client`). The identity lookup's figure is its best case: one remembered
//! chain and a lock nobody else takes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, HandshakeKind, ServerConnection};
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::{LocalCa, WorkloadCertificate, connection_peer};

// ztunnel's and the waypoint's allocator, so allocations cost what they cost there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .expect("a valid SPIFFE id")
}

/// Moves everything `from` has to send into `to` and lets `to` process it.
fn flight(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("writing to memory");
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("reading from memory");
        to.process_new_packets().expect("a valid flight");
    }
}

/// The server's address as the pool would see it (it only keys the client's tickets here).
const PEER: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15008);

/// Both sides of a handshake over memory, to the end of both (the server's ticket included).
fn exchange(
    cfg: std::sync::Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    server: std::sync::Arc<rustls::ServerConfig>,
) -> (rustls::Connection, rustls::Connection) {
    let mut c: rustls::Connection = ClientConnection::new(cfg, name).expect("a client").into();
    let mut s: rustls::Connection = ServerConnection::new(server).expect("a server").into();
    while c.is_handshaking() || s.is_handshaking() {
        flight(&mut c, &mut s);
        flight(&mut s, &mut c);
    }
    (c, s)
}

/// One full TLS 1.3 handshake between `client` and `server` (not inlined: `valgrind
/// --tool=callgrind --toggle-collect='handshake::full_handshake'` counts it alone).
#[inline(never)]
fn full_handshake(
    client: &WorkloadCertificate,
    server: &WorkloadCertificate,
) -> rustls::Connection {
    let cfg = client
        .client_config(vec![server.identity().clone()])
        .expect("a client configuration");
    let name = ServerName::IpAddress(PEER.ip().into());
    exchange(cfg, name, server.server_config()).1
}

/// One handshake as the pool makes it: resumed when `client` holds a ticket from `server`,
/// then both sides' checks of a resumed peer (`--toggle-collect='handshake::pool_handshake'`).
#[inline(never)]
fn pool_handshake(
    client: &WorkloadCertificate,
    server: &WorkloadCertificate,
) -> (rustls::Connection, Option<SpiffeId>) {
    let hbone = client
        .hbone_client(PEER, std::slice::from_ref(server.identity()))
        .expect("a client configuration");
    let (c, s) = exchange(
        hbone.config(),
        hbone.server_name(),
        server.resuming_server_config(),
    );
    hbone.confirm(&c).expect("the server still verifies");
    let peer = server.client_peer(&s).expect("the client still verifies");
    (s, peer)
}

/// Runs `step` `n` times and prints its mean wall time as `what`.
fn report<T>(what: &str, n: u32, mut step: impl FnMut() -> T) {
    let start = Instant::now();
    for _ in 0..n {
        black_box(step());
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!("{what}: {ns:.0} ns");
}

fn main() {
    zmesh_core::tls::install_default_provider();
    let n: u32 = std::env::var("HANDSHAKE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let ca = LocalCa::generate("bench").expect("a CA");
    let day = Duration::from_secs(86_400);
    let client = ca.issue(&id("client"), day).expect("a client certificate");
    let server = ca.issue(&id("server"), day).expect("a server certificate");

    // The first handshake verifies both chains in full; the verifiers remember them, as they
    // do for a peer that connects again.
    let conn = full_handshake(&client, &server);
    assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(client.remembered_chains(), (1, 0));
    assert_eq!(server.remembered_chains(), (0, 1));
    assert_eq!(server.client_peer(&conn), Ok(Some(id("client"))));
    assert_eq!(connection_peer(&conn), Some(id("client")));

    report(
        "TLS 1.3 handshake, full, both sides, chains remembered",
        n,
        || full_handshake(&client, &server),
    );

    // The pool's first handshake is a full one and brings a ticket; every later one resumes.
    let (first, _) = pool_handshake(&client, &server);
    assert_eq!(first.handshake_kind(), Some(HandshakeKind::Full));
    let (resumed, peer) = pool_handshake(&client, &server);
    assert_eq!(resumed.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(peer, Some(id("client")));
    report(
        "TLS 1.3 handshake, resumed, both sides, with both checks of the peer",
        n,
        || pool_handshake(&client, &server),
    );
    let (last, _) = pool_handshake(&client, &server);
    assert_eq!(last.handshake_kind(), Some(HandshakeKind::Resumed));
    // Later handshakes found the chains in memory rather than adding to it.
    assert_eq!(client.remembered_chains(), (1, 0));
    assert_eq!(server.remembered_chains(), (0, 1));

    let m = n * 100;
    report(
        "client configuration for one peer identity (part of the full handshake above)",
        m,
        || {
            client
                .client_config(vec![server.identity().clone()])
                .unwrap()
        },
    );
    report("peer identity read from its certificate", m, || {
        connection_peer(black_box(&conn))
    });
    report("peer identity from the remembered chain", m, || {
        server.client_peer(black_box(&conn)).unwrap()
    });
    report(
        "the same for a resumed session (its chain verified again, from memory)",
        m,
        || server.client_peer(black_box(&last)).unwrap(),
    );
}
