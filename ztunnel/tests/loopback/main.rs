//! The in-process tier (`tests/README.md`): a whole ztunnel (`ztunnel::app::start`: local CA,
//! local config file, admin, metrics, the dedicated workload's proxy) on loopback inside the
//! test process, driven through its inbound HBONE listener by clients holding certificates.
//! Needs no privileges: no namespaces, no capture rules, no packet mark.

mod harness;

use harness::{Client, WAIT, Ztunnel, cert, echo, eventually, metric, policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh_core::hbone::HboneError;
use zmesh_core::tls::LocalCa;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

#[tokio::test]
async fn a_mesh_client_reaches_the_app_over_hbone_and_the_connection_is_counted() {
    let zt = Ztunnel::start("").await;
    let client = Client::new(&zt, "client");
    let (mut tunnel, _guard) = client.connect(&zt).await.unwrap();
    echo(&mut tunnel, b"hello through hbone").await;
    assert_eq!(zt.app.accepted(), 1);
    let labels = [
        ("reporter", "destination"),
        ("source_principal", CLIENT),
        ("destination_principal", SERVER),
        ("connection_security_policy", "mutual_tls"),
    ];
    let m = zt.metrics().await;
    assert_eq!(
        metric(&m, "istio_tcp_connections_opened_total", &labels),
        1,
        "{m}"
    );
    // Registered with the proxy's metrics (this process made no log writer: nothing dropped).
    assert!(m.contains("\nzmesh_log_lines_dropped_total 0\n"), "{m}");
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tunnel.read_to_end(&mut rest))
        .await
        .expect("the tunnel did not end after both sides closed")
        .unwrap();
    drop(tunnel);
    eventually("the closed connection counted with its bytes", || async {
        let m = zt.metrics().await;
        metric(&m, "istio_tcp_connections_closed_total", &labels) == 1
            && metric(&m, "istio_tcp_received_bytes_total", &labels) == 19
            && metric(&m, "istio_tcp_sent_bytes_total", &labels) == 19
    })
    .await;
    zt.shutdown().await;
}

#[tokio::test]
async fn an_allow_policy_admits_its_principal_and_denies_everyone_else() {
    let zt = Ztunnel::start(&policy("only-client", "Allow", "client")).await;

    let (mut tunnel, _guard) = Client::new(&zt, "client").connect(&zt).await.unwrap();
    echo(&mut tunnel, b"allowed").await;

    match Client::new(&zt, "intruder").refused(&zt).await {
        HboneError::Status { status, .. } => assert_eq!(status, 401),
        other => panic!("a principal no ALLOW policy matches was not denied by policy: {other}"),
    }
    // Decided before the app is connected: it saw only the allowed one.
    assert_eq!(zt.app.accepted(), 1);
    let m = zt.metrics().await;
    let intruder = "spiffe://cluster.local/ns/default/sa/intruder";
    let denied = [
        ("reporter", "destination"),
        ("source_principal", intruder),
        ("response_flags", "DENY"),
    ];
    assert_eq!(
        metric(&m, "istio_tcp_connections_opened_total", &denied),
        1,
        "{m}"
    );
    zt.shutdown().await;
}

#[tokio::test]
async fn a_deny_policy_added_to_the_config_file_closes_the_open_connection_it_denies() {
    let zt = Ztunnel::start("").await;
    let client = Client::new(&zt, "client");
    let (mut tunnel, _guard) = client.connect(&zt).await.unwrap();
    echo(&mut tunnel, b"before").await;
    let (mut other, _other_guard) = Client::new(&zt, "other").connect(&zt).await.unwrap();
    echo(&mut other, b"before").await;

    // The file watch publishes the new state; the re-check closes what it now denies.
    zt.write_local_config(&policy("deny-client", "Deny", "client"));
    let mut b = [0u8; 64];
    let ended = tokio::time::timeout(WAIT, tunnel.read(&mut b))
        .await
        .expect("the connection the new policy denies was kept open");
    assert!(
        matches!(ended, Ok(0) | Err(_)),
        "a denied connection received {ended:?}"
    );
    // Only that one: the other principal's connection still echoes.
    echo(&mut other, b"after").await;
    match client.refused(&zt).await {
        HboneError::Status { status, .. } => assert_eq!(status, 401),
        other => {
            panic!("a new connection of the denied principal was not denied by policy: {other}")
        }
    }
    zt.shutdown().await;
}

#[tokio::test]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let zt = Ztunnel::start("").await;
    // The same kind of certificate, trusting the ztunnel's root, signed by the mesh CA: the
    // control that the construction itself is accepted.
    let (mut tunnel, _guard) = Client::with_cert(cert(&zt.ca, "client", &zt.ca))
        .connect(&zt)
        .await
        .unwrap();
    echo(&mut tunnel, b"mesh ca").await;
    drop(tunnel);

    let other_ca = LocalCa::generate("another-root").unwrap();
    let foreign = Client::with_cert(cert(&other_ca, "client", &zt.ca));
    let refused = foreign.refused(&zt).await;
    assert!(
        matches!(
            refused,
            HboneError::Tls(..)
                | HboneError::H2Handshake(..)
                | HboneError::Request { .. }
                | HboneError::Closed { .. }
        ),
        "a client certificate from another CA was not refused in the handshake: {refused}"
    );
    // Refused before any CONNECT: nothing reached the app after the control.
    assert_eq!(zt.app.accepted(), 1);
    zt.shutdown().await;
}
