//! ZDS over real `SOCK_SEQPACKET` sockets in a temporary directory: the node agent's server
//! against ztunnel's client, each also against a hand-written peer built on the transport
//! layer, so that both sides' rules are exercised. No privileges needed.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use xds_proto::istio::workload::zds as pb;
use zmesh_core::zds::{
    Backoff, Event, Request, SeqpacketConn, SeqpacketListener, ServerOptions, SnapshotEntry,
    Subject, Violation, WorkloadInfo, ZdsClient, ZdsError, ZdsServer, decode_request,
    decode_response,
};

const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ztunnel.sock")
}

/// Our own network namespace, opened afresh.
fn netns() -> OwnedFd {
    File::open("/proc/self/ns/net").unwrap().into()
}

/// (st_dev, st_ino): what identifies a namespace.
fn ns_id(fd: &OwnedFd) -> (u64, u64) {
    let meta = File::from(fd.try_clone().unwrap()).metadata().unwrap();
    (meta.dev(), meta.ino())
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

fn add(uid: &str) -> SnapshotEntry {
    SnapshotEntry::Add {
        uid: uid.into(),
        info: info(uid),
        netns: netns(),
    }
}

/// A ztunnel run by `ZdsClient`: forwards every event and answers requests with `answer`.
fn spawn_client(
    path: &Path,
    answer: impl Fn(&Event) -> Result<(), String> + Send + 'static,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = ZdsClient::new(path);
    tokio::spawn(async move {
        loop {
            let event = client.next().await;
            let outcome = answer(&event);
            let is_request = event.is_request();
            if tx.send(event).is_err() {
                return;
            }
            if is_request {
                client.reply(outcome).await;
            }
        }
    });
    rx
}

fn ack_all(_: &Event) -> Result<(), String> {
    Ok(())
}

async fn next(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    within(events.recv()).await.expect("client task ended")
}

/// Asserts the next event is `expected` (by its Debug form, which omits the fd number).
async fn expect(events: &mut mpsc::UnboundedReceiver<Event>, expected: &str) -> Event {
    let event = next(events).await;
    let shown = format!("{event:?}");
    assert!(
        shown.starts_with(expected),
        "expected {expected}, got {shown}"
    );
    event
}

async fn expect_add(events: &mut mpsc::UnboundedReceiver<Event>, want: &str) -> OwnedFd {
    match next(events).await {
        Event::Add {
            uid,
            info: i,
            netns,
        } => {
            assert_eq!((uid.as_str(), i), (want, info(want)));
            netns
        }
        other => panic!("expected Add {want}, got {other:?}"),
    }
}

/// A hand-written ztunnel on the raw transport.
struct RawZtunnel(SeqpacketConn);

impl RawZtunnel {
    async fn connect(path: &Path, version: i32) -> RawZtunnel {
        let conn = SeqpacketConn::connect(path).unwrap();
        conn.send(&pb::ZdsHello { version }.encode_to_vec(), None)
            .await
            .unwrap();
        RawZtunnel(conn)
    }

    async fn request(&self) -> Request {
        let (bytes, fds) = within(self.0.recv()).await.unwrap();
        decode_request(&bytes, fds).unwrap()
    }

    async fn answer(&self, error: &str) {
        let ack = pb::WorkloadResponse {
            payload: Some(pb::workload_response::Payload::Ack(pb::Ack {
                error: error.into(),
            })),
        };
        self.0.send(&ack.encode_to_vec(), None).await.unwrap();
    }

    /// Receives the (empty) snapshot and acks it.
    async fn handshake(path: &Path) -> RawZtunnel {
        let z = RawZtunnel::connect(path, pb::Version::V1 as i32).await;
        assert!(matches!(z.request().await, Request::SnapshotSent));
        z.answer("").await;
        z
    }
}

async fn wait_count(server: &ZdsServer, n: usize) {
    let mut rx = server.watch_connected();
    within(rx.wait_for(|c| *c == n)).await.unwrap();
}

#[tokio::test]
async fn snapshot_then_steady_state_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path, || {
        vec![add("a"), add("b"), SnapshotEntry::Keep { uid: "c".into() }]
    })
    .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(server.connected(), 0);

    let mut events = spawn_client(&path, ack_all);
    let sent = netns();
    expect(&mut events, "Connected").await;
    let a = expect_add(&mut events, "a").await;
    let b = expect_add(&mut events, "b").await;
    assert_eq!(ns_id(&a), ns_id(&sent));
    assert_eq!(ns_id(&b), ns_id(&sent));
    expect(&mut events, r#"Keep { uid: "c" }"#).await;
    expect(&mut events, "SnapshotSent").await;
    within(server.wait_connected()).await;
    assert_eq!(server.connected(), 1);

    within(server.add("d", info("d"), sent.as_fd()))
        .await
        .unwrap();
    let d = expect_add(&mut events, "d").await;
    assert_eq!(ns_id(&d), ns_id(&sent));
    within(server.del("a")).await.unwrap();
    expect(&mut events, r#"Del { uid: "a" }"#).await;
    assert!(events.try_recv().is_err(), "nothing else was sent");
}

#[tokio::test]
async fn nack_surfaces_on_the_server_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path, Vec::new).unwrap();
    let mut events = spawn_client(&path, |e| match e {
        Event::Add { uid, .. } if uid == "bad" => Err("proxy failed to start: boom".into()),
        _ => Ok(()),
    });
    expect(&mut events, "Connected").await;
    expect(&mut events, "SnapshotSent").await;

    let ns = netns();
    let err = within(server.add("bad", info("bad"), ns.as_fd()))
        .await
        .unwrap_err();
    match &err {
        ZdsError::Nack { subject, reason } => {
            assert_eq!(subject, &Subject::Add("bad".into()));
            assert_eq!(reason, "proxy failed to start: boom");
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "ztunnel refused pod \"bad\": proxy failed to start: boom"
    );
    // A NACK is an answer: the connection stays up and in step.
    within(server.add("good", info("good"), ns.as_fd()))
        .await
        .unwrap();
    expect_add(&mut events, "bad").await;
    expect_add(&mut events, "good").await;
    assert_eq!(server.connected(), 1);
}

/// One connection from the client to a hand-written agent: the client's hello checked.
async fn raw_agent_session(listener: &SeqpacketListener) -> SeqpacketConn {
    let conn = within(listener.accept()).await.unwrap();
    let (hello, fds) = within(conn.recv()).await.unwrap();
    assert!(fds.is_empty());
    zmesh_core::zds::decode_hello(&hello).unwrap();
    conn
}

fn request(payload: pb::workload_request::Payload) -> Vec<u8> {
    pb::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add_req(uid: &str) -> Vec<u8> {
    request(pb::workload_request::Payload::Add(pb::AddWorkload {
        uid: uid.into(),
        workload_info: Some(info(uid).into()),
    }))
}

fn snapshot_sent() -> Vec<u8> {
    request(pb::workload_request::Payload::SnapshotSent(
        pb::SnapshotSent {},
    ))
}

async fn ack_of(conn: &SeqpacketConn) -> Result<(), String> {
    let (bytes, fds) = within(conn.recv()).await.unwrap();
    assert!(fds.is_empty());
    decode_response(&bytes).unwrap()
}

/// Sends `bytes` (with `fds`), expects a NACK containing `why`, then the client hanging up.
async fn expect_rejected(conn: &SeqpacketConn, bytes: &[u8], fds: &[&OwnedFd], why: &str) {
    let fds: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    conn.send_with_fds(bytes, &fds).await.unwrap();
    let reason = ack_of(conn).await.unwrap_err();
    assert!(reason.contains(why), "NACK {reason:?} should say {why:?}");
    assert!(matches!(within(conn.recv()).await, Err(ZdsError::Closed)));
}

#[tokio::test]
async fn client_rejects_protocol_violations_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = SeqpacketListener::bind(&path).unwrap();
    let mut events = spawn_client(&path, ack_all);
    let (ns1, ns2) = (netns(), netns());

    let conn = raw_agent_session(&listener).await;
    expect_rejected(&conn, &add_req("p"), &[], "carries no network namespace").await;

    let conn = raw_agent_session(&listener).await;
    let why = "carries 2 file descriptors, expected exactly one";
    expect_rejected(&conn, &add_req("p"), &[&ns1, &ns2], why).await;

    let conn = raw_agent_session(&listener).await;
    let del = request(pb::workload_request::Payload::Del(pb::DelWorkload {
        uid: "p".into(),
    }));
    expect_rejected(
        &conn,
        &del,
        &[&ns1],
        "DelWorkload carries 1 file descriptor",
    )
    .await;

    let conn = raw_agent_session(&listener).await;
    conn.send(&snapshot_sent(), None).await.unwrap();
    assert_eq!(ack_of(&conn).await, Ok(()));
    let keep = request(pb::workload_request::Payload::Keep(pb::KeepWorkload {
        uid: "p".into(),
    }));
    expect_rejected(
        &conn,
        &keep,
        &[],
        "KeepWorkload for pod \"p\" after SnapshotSent",
    )
    .await;

    let conn = raw_agent_session(&listener).await;
    conn.send(&snapshot_sent(), None).await.unwrap();
    assert_eq!(ack_of(&conn).await, Ok(()));
    expect_rejected(&conn, &snapshot_sent(), &[], "second SnapshotSent").await;

    let conn = raw_agent_session(&listener).await;
    let empty = pb::WorkloadRequest { payload: None }.encode_to_vec();
    // An empty message reads as end of file, so send one with an unknown field (4) instead.
    assert!(empty.is_empty());
    expect_rejected(&conn, &[0x22, 0x00], &[], "empty or unknown payload").await;

    let conn = raw_agent_session(&listener).await;
    let why = "truncated ZDS message (MSG_TRUNC";
    expect_rejected(&conn, &[0x0a; 2000], &[&ns1], why).await;

    // The caller saw each session start and end with the violation as the reason, and never
    // saw a rejected request.
    let mut reasons = Vec::new();
    while reasons.len() < 7 {
        match next(&mut events).await {
            Event::Connected | Event::SnapshotSent => {}
            Event::Disconnected { reason } => reasons.push(reason),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(reasons[0].contains("no network namespace"), "{reasons:?}");
    assert!(reasons[6].contains("MSG_TRUNC"), "{reasons:?}");
}

#[tokio::test]
async fn unanswered_requests_are_refused_and_next_is_cancel_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = SeqpacketListener::bind(&path).unwrap();
    let mut client = ZdsClient::new(&path);
    assert!(matches!(within(client.next()).await, Event::Connected));
    let conn = raw_agent_session(&listener).await;
    let ns = netns();
    conn.send(&add_req("p"), Some(ns.as_fd())).await.unwrap();
    assert!(matches!(within(client.next()).await, Event::Add { .. }));

    // Asking for the next event without answering refuses the Add; giving up on that call
    // while it waits for a message loses nothing.
    let short = Duration::from_millis(200);
    let (event, ack) = tokio::join!(tokio::time::timeout(short, client.next()), ack_of(&conn));
    assert!(event.is_err(), "no event expected, got {event:?}");
    assert!(ack.unwrap_err().contains("did not process"));
    conn.send(&snapshot_sent(), None).await.unwrap();
    assert!(matches!(within(client.next()).await, Event::SnapshotSent));
    client.reply(Ok(())).await;
    assert_eq!(ack_of(&conn).await, Ok(()));

    let mut b = Backoff::default();
    let delays: Vec<_> = (0..13).map(|_| b.next_delay().as_millis()).collect();
    assert_eq!(delays[..4], [10, 20, 40, 80]);
    assert_eq!(delays[11..], [15_000, 15_000]);
    b.reset();
    assert_eq!(b.next_delay(), Duration::from_millis(10));
}

#[tokio::test]
async fn silent_ztunnel_times_out_and_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let options = ServerOptions {
        ack_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = ZdsServer::bind_with(&path, options, Vec::new).unwrap();
    let z = RawZtunnel::handshake(&path).await;
    wait_count(&server, 1).await;

    let ns = netns();
    let err = within(server.add("slow", info("slow"), ns.as_fd()))
        .await
        .unwrap_err();
    assert!(matches!(err, ZdsError::AckTimeout { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "ztunnel did not acknowledge pod \"slow\" within 300ms"
    );
    // The acks are out of step now, so the agent hangs up; ztunnel will reconnect.
    assert!(matches!(z.request().await, Request::Add { .. }));
    assert!(matches!(within(z.0.recv()).await, Err(ZdsError::Closed)));
    wait_count(&server, 0).await;
    let err = server.add("x", info("x"), ns.as_fd()).await.unwrap_err();
    assert!(matches!(err, ZdsError::NotConnected), "{err:?}");

    assert_eq!(ServerOptions::default().ack_timeout, Duration::from_secs(5));
    let default = ZdsError::AckTimeout {
        subject: Subject::Add("p".into()),
        timeout: ServerOptions::default().ack_timeout,
    };
    assert_eq!(
        default.to_string(),
        "ztunnel did not acknowledge pod \"p\" within 5s"
    );
}

#[tokio::test]
async fn adds_go_to_the_newest_ztunnel_deletes_to_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let server = ZdsServer::bind(&path, Vec::new).unwrap();
    let old = RawZtunnel::handshake(&path).await;
    wait_count(&server, 1).await;
    let new = RawZtunnel::handshake(&path).await;
    wait_count(&server, 2).await;

    let ns = netns();
    let srv = server.clone();
    let dup = ns.try_clone().unwrap();
    let adding = tokio::spawn(async move { srv.add("p", info("p"), dup.as_fd()).await });
    match new.request().await {
        Request::Add { uid, netns, .. } => {
            assert_eq!(uid, "p");
            assert_eq!(ns_id(&netns), ns_id(&ns));
        }
        other => panic!("{other:?}"),
    }
    new.answer("").await;
    within(adding).await.unwrap().unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(200), old.0.recv()).await;
    assert!(quiet.is_err(), "the old ztunnel got {quiet:?}");

    let srv = server.clone();
    let deleting = tokio::spawn(async move { srv.del("p").await });
    for z in [&old, &new] {
        assert!(matches!(z.request().await, Request::Del { uid } if uid == "p"));
        z.answer("").await;
    }
    within(deleting).await.unwrap().unwrap();

    // The newest leaves: Adds go to the remaining one.
    drop(new);
    wait_count(&server, 1).await;
    let srv = server.clone();
    let adding = tokio::spawn(async move { srv.add("q", info("q"), ns.as_fd()).await });
    assert!(matches!(old.request().await, Request::Add { uid, .. } if uid == "q"));
    old.answer("").await;
    within(adding).await.unwrap().unwrap();
}

#[tokio::test]
async fn client_reconnects_after_agent_restart_and_gets_a_fresh_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let first = ZdsServer::bind(&path, || vec![add("a")]).unwrap();
    let mut events = spawn_client(&path, ack_all);
    expect(&mut events, "Connected").await;
    expect_add(&mut events, "a").await;
    expect(&mut events, "SnapshotSent").await;

    within(first.shutdown()).await;
    assert!(!path.exists(), "shutdown removes the socket file");
    expect(&mut events, "Disconnected").await;
    // The client retries (10 ms, 20 ms, ...) while the agent is away.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(events.try_recv().is_err());

    let second = ZdsServer::bind(&path, || {
        vec![SnapshotEntry::Keep { uid: "a".into() }, add("b")]
    })
    .unwrap();
    expect(&mut events, "Connected").await;
    expect(&mut events, r#"Keep { uid: "a" }"#).await;
    expect_add(&mut events, "b").await;
    expect(&mut events, "SnapshotSent").await;
    within(second.wait_connected()).await;
}

#[tokio::test]
async fn oversized_packets_are_rejected_as_truncated() {
    let (a, b) = SeqpacketConn::pair().unwrap();
    let ns = netns();
    a.send(&[7; 1024], None).await.unwrap();
    let (bytes, fds) = b.recv().await.unwrap();
    assert_eq!((bytes.len(), fds.len()), (1024, 0));

    a.send(&[7; 1025], Some(ns.as_fd())).await.unwrap();
    let err = b.recv().await.unwrap_err();
    assert!(matches!(err, ZdsError::Truncated), "{err:?}");
    assert!(err.to_string().contains("MSG_TRUNC"), "{err}");

    // The stream goes on with the next packet.
    a.send(&[1, 2, 3], Some(ns.as_fd())).await.unwrap();
    let (bytes, fds) = b.recv().await.unwrap();
    assert_eq!((bytes, fds.len()), (vec![1, 2, 3], 1));
    drop(a);
    assert!(matches!(b.recv().await, Err(ZdsError::Closed)));
}

#[tokio::test]
async fn agent_rejects_a_wrong_version_and_replaces_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let stale = SeqpacketListener::bind(&path).unwrap();
    let server = ZdsServer::bind(&path, Vec::new).unwrap();
    drop(stale);

    let z = RawZtunnel::connect(&path, 2).await;
    assert!(matches!(within(z.0.recv()).await, Err(ZdsError::Closed)));
    assert_eq!(server.connected(), 0);
    within(server.del("nobody")).await.unwrap();

    server.shutdown().await;
    std::fs::write(&path, "not a socket").unwrap();
    let err = ZdsServer::bind(&path, Vec::new).err().unwrap();
    assert!(matches!(err, ZdsError::Listen { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a socket"), "{err}");
}

#[test]
fn violations_read_as_operator_messages() {
    let v = Violation::AddWithoutFd { uid: "u".into() };
    assert_eq!(
        ZdsError::from(v).to_string(),
        "ZDS protocol violation: AddWorkload for pod \"u\" carries no network namespace file descriptor"
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..1100),
            nfds in 0usize..3,
        ) {
            let fds = (0..nfds).map(|_| File::open("/dev/null").unwrap().into()).collect();
            let _ = decode_request(&bytes, fds);
            let _ = decode_response(&bytes);
            let _ = zmesh_core::zds::decode_hello(&bytes);
        }

        #[test]
        fn arbitrary_packets_through_the_socket_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1100),
            with_fd in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (a, b) = SeqpacketConn::pair().unwrap();
                let ns = netns();
                a.send(&bytes, with_fd.then(|| ns.as_fd())).await.unwrap();
                if let Ok((msg, fds)) = b.recv().await {
                    let _ = decode_request(&msg, fds);
                    let _ = decode_response(&msg);
                }
            });
        }
    }
}

#[tokio::test]
async fn the_mid_snapshot_fault_cuts_one_snapshot_once_and_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let options = ServerOptions {
        fault_drop_mid_snapshot: Some(1),
        ..Default::default()
    };
    let server = ZdsServer::bind_with(&path, options, || vec![add("a"), add("b")]).unwrap();
    let mut events = spawn_client(&path, ack_all);
    expect(&mut events, "Connected").await;
    expect_add(&mut events, "a").await;
    expect(&mut events, "Disconnected").await;
    // The client reconnects and this time gets the whole snapshot.
    expect(&mut events, "Connected").await;
    expect_add(&mut events, "a").await;
    expect_add(&mut events, "b").await;
    expect(&mut events, "SnapshotSent").await;
    within(server.wait_connected()).await;
    assert_eq!(ServerOptions::default().fault_drop_mid_snapshot, None);
}
