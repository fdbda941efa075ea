//! The node agent's side of ZDS: accept ztunnel connections, send each its snapshot, then
//! deliver Adds (to the newest connection) and Deletes (to all) and wait for their acks.
//!
//! Each connection is served by one task that owns the socket and handles one request at a
//! time, because acks correlate with requests only by their order. [`ZdsServer::add`] and
//! [`ZdsServer::del`] hand their request to that task and wait for its outcome; a caller that
//! gives up early does not desynchronise the connection. Between requests the task watches the
//! socket, so a ztunnel that goes away is dropped from the set at once.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::message::{self, decode_hello, decode_response};
use super::transport::{SeqpacketConn, SeqpacketListener};
use super::{ACK_TIMEOUT, SOCKET_MODE, Subject, Violation, WorkloadInfo, ZdsError};

/// One pod of the snapshot sent to every ztunnel that connects.
#[derive(Debug)]
pub enum SnapshotEntry {
    /// A pod whose network namespace the agent holds: `AddWorkload` with the netns.
    Add {
        /// The pod's uid.
        uid: String,
        /// Who the pod is.
        info: WorkloadInfo,
        /// The pod's network namespace (e.g. `/var/run/netns/...` opened read-only).
        netns: OwnedFd,
    },
    /// A pod that exists but whose netns the agent cannot open (e.g. after an agent restart):
    /// `KeepWorkload`, so that ztunnel keeps serving it.
    Keep {
        /// The pod's uid.
        uid: String,
    },
}

/// Tunables of [`ZdsServer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// How long to wait for ztunnel's hello and for each ack ([`ACK_TIMEOUT`]).
    pub ack_timeout: Duration,
    /// Permissions of the socket file ([`SOCKET_MODE`]).
    pub socket_mode: u32,
    /// Fault injection for tests, `None` (off) by default: `Some(n)` closes the connection
    /// of the first snapshot that has more than `n` pods right after the `n`-th pod's ack,
    /// before `SnapshotSent` (a ZDS socket dropped mid-snapshot). Later snapshots are whole.
    pub fault_drop_mid_snapshot: Option<usize>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            ack_timeout: ACK_TIMEOUT,
            socket_mode: SOCKET_MODE,
            fault_drop_mid_snapshot: None,
        }
    }
}

type SnapshotFn = dyn Fn() -> Vec<SnapshotEntry> + Send + Sync;

/// The ZDS server of the node agent. Cloning is cheap and shares the server; it stops (closing
/// every connection) when [`ZdsServer::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct ZdsServer {
    shared: Arc<Shared>,
    accept: Arc<AcceptTask>,
}

struct Shared {
    /// Connections that said hello, oldest first.
    conns: Mutex<Vec<ConnEntry>>,
    /// The number of entries in `conns`.
    count: watch::Sender<usize>,
    next_id: AtomicU64,
    options: ServerOptions,
    /// Whether [`ServerOptions::fault_drop_mid_snapshot`] has fired.
    fault_fired: AtomicBool,
    snapshot: Box<SnapshotFn>,
    path: PathBuf,
}

struct ConnEntry {
    id: u64,
    tx: mpsc::Sender<Command>,
}

/// A request for a connection task, and where to put its outcome.
struct Command {
    subject: Subject,
    info: Option<WorkloadInfo>,
    netns: Option<OwnedFd>,
    reply: oneshot::Sender<Result<(), ZdsError>>,
}

/// Aborts the accept loop, and with it every connection task, when the last handle goes.
struct AcceptTask(Mutex<Option<JoinHandle<()>>>);

impl Drop for AcceptTask {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.0).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ZdsServer {
    /// Listens on `path` with default options and starts serving. `snapshot` is called for
    /// each ztunnel that connects and returns every pod the agent currently knows; it should
    /// be quick (it runs on the runtime).
    pub fn bind(
        path: impl AsRef<Path>,
        snapshot: impl Fn() -> Vec<SnapshotEntry> + Send + Sync + 'static,
    ) -> Result<ZdsServer, ZdsError> {
        Self::bind_with(path, ServerOptions::default(), snapshot)
    }

    /// Like [`ZdsServer::bind`], with explicit options.
    pub fn bind_with(
        path: impl AsRef<Path>,
        options: ServerOptions,
        snapshot: impl Fn() -> Vec<SnapshotEntry> + Send + Sync + 'static,
    ) -> Result<ZdsServer, ZdsError> {
        let listener = SeqpacketListener::bind_with_mode(path, options.socket_mode)?;
        Ok(Self::serve(listener, options, snapshot))
    }

    /// Serves on an existing listener (its mode is left as it is).
    pub fn serve(
        listener: SeqpacketListener,
        options: ServerOptions,
        snapshot: impl Fn() -> Vec<SnapshotEntry> + Send + Sync + 'static,
    ) -> ZdsServer {
        let shared = Arc::new(Shared {
            conns: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            next_id: AtomicU64::new(0),
            options,
            fault_fired: AtomicBool::new(false),
            snapshot: Box::new(snapshot),
            path: listener.path().to_owned(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        ZdsServer {
            shared,
            accept: Arc::new(AcceptTask(Mutex::new(Some(task)))),
        }
    }

    /// The socket path this server listens on.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// How many ztunnels are connected (have said hello). The agent is ready when this is at
    /// least one.
    pub fn connected(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// A receiver that sees every change of [`ZdsServer::connected`].
    pub fn watch_connected(&self) -> watch::Receiver<usize> {
        self.shared.count.subscribe()
    }

    /// Waits until at least one ztunnel is connected.
    pub async fn wait_connected(&self) {
        let mut rx = self.shared.count.subscribe();
        // The sender lives in `self.shared`, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Hands a pod to the newest ztunnel and waits for its ack. The netns descriptor is
    /// duplicated; the caller keeps its own.
    ///
    /// The ack means the pod's proxy runs. A NACK is [`ZdsError::Nack`] with ztunnel's reason;
    /// no answer within the ack timeout is [`ZdsError::AckTimeout`], after which the connection
    /// is closed (ztunnel reconnects and receives a fresh snapshot). Update the cache that feeds
    /// the snapshot *before* calling this, so a ztunnel connecting meanwhile learns of the pod.
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        let netns = netns.try_clone_to_owned()?;
        let newest = lock(&self.shared.conns).last().map(|c| c.tx.clone());
        let tx = newest.ok_or(ZdsError::NotConnected)?;
        submit(&tx, Subject::Add(uid.to_owned()), Some(info), Some(netns)).await
    }

    /// Tells every connected ztunnel that a pod is gone and waits for all their acks; returns
    /// the first failure. With no ztunnel connected this succeeds: a ztunnel that connects
    /// later gets a snapshot without the pod. Likewise a connection that closes before it acks
    /// counts as done.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let all: Vec<_> = lock(&self.shared.conns)
            .iter()
            .map(|c| c.tx.clone())
            .collect();
        let sends = all
            .iter()
            .map(|tx| submit(tx, Subject::Del(uid.to_owned()), None, None));
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(()) => {}
                Err(ZdsError::ConnectionLost { .. }) => {
                    debug!(uid, "ztunnel went away before acknowledging the removal")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stops accepting, closes every connection and removes the socket file.
    pub async fn shutdown(&self) {
        let task = lock(&self.accept.0).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let mut rx = self.shared.count.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        if let Err(e) = std::fs::remove_file(&self.shared.path) {
            debug!(path = %self.shared.path.display(), "cannot remove the ZDS socket: {e}");
        }
    }
}

/// Queues a request on a connection and waits for its outcome.
async fn submit(
    tx: &mpsc::Sender<Command>,
    subject: Subject,
    info: Option<WorkloadInfo>,
    netns: Option<OwnedFd>,
) -> Result<(), ZdsError> {
    let (reply, outcome) = oneshot::channel();
    let lost = ZdsError::ConnectionLost {
        subject: subject.clone(),
    };
    let cmd = Command {
        subject,
        info,
        netns,
        reply,
    };
    if tx.send(cmd).await.is_err() {
        return Err(lost);
    }
    outcome.await.unwrap_or(Err(lost))
}

async fn accept_loop(listener: SeqpacketListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    conns.spawn(serve_conn(shared.clone(), conn));
                }
                Err(e) => {
                    // E.g. out of descriptors: back off instead of spinning.
                    warn!(path = %shared.path.display(), "cannot accept a ztunnel connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Removes a connection from the set when its task ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Registration {
    fn new(shared: &Arc<Shared>, tx: mpsc::Sender<Command>) -> Registration {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conns = lock(&shared.conns);
        conns.push(ConnEntry { id, tx });
        shared.count.send_replace(conns.len());
        Registration {
            shared: shared.clone(),
            id,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut conns = lock(&self.shared.conns);
        conns.retain(|c| c.id != self.id);
        self.shared.count.send_replace(conns.len());
    }
}

async fn serve_conn(shared: Arc<Shared>, conn: SeqpacketConn) {
    let timeout = shared.options.ack_timeout;
    let hello = match tokio::time::timeout(timeout, conn.recv()).await {
        Err(_) => Err(ZdsError::HelloTimeout(timeout)),
        Ok(Ok((bytes, _fds))) => decode_hello(&bytes),
        Ok(Err(e)) => Err(e),
    };
    if let Err(e) = hello {
        warn!("rejecting a ztunnel connection: {e}");
        return;
    }
    // Registered before the snapshot is taken: a pod added meanwhile is either in the snapshot
    // or queued behind it (a repeated Add of the same netns is a no-op for ztunnel).
    let (tx, rx) = mpsc::channel(16);
    let registration = Registration::new(&shared, tx);
    info!(
        conn = registration.id,
        connected = *shared.count.borrow(),
        "ztunnel connected"
    );
    match send_snapshot(&shared, &conn).await {
        Ok(n) => {
            info!(conn = registration.id, pods = n, "snapshot sent to ztunnel");
            match serve_requests(&conn, rx, timeout).await {
                Ok(()) => info!(conn = registration.id, "ztunnel disconnected"),
                Err(e) => warn!(conn = registration.id, "closing ztunnel connection: {e}"),
            }
        }
        Err(e) => warn!(
            conn = registration.id,
            "closing ztunnel connection while sending the snapshot: {e}"
        ),
    }
}

/// Sends every known pod, then `SnapshotSent`. A pod ztunnel refuses is logged and skipped
/// (ztunnel retries starting it on its own); a refused `SnapshotSent` ends the connection.
async fn send_snapshot(shared: &Shared, conn: &SeqpacketConn) -> Result<usize, ZdsError> {
    let timeout = shared.options.ack_timeout;
    let entries = (shared.snapshot)();
    let n = entries.len();
    let cut = shared
        .options
        .fault_drop_mid_snapshot
        .filter(|&k| n > k && !shared.fault_fired.swap(true, Ordering::SeqCst));
    for (i, entry) in entries.into_iter().enumerate() {
        if cut == Some(i) {
            warn!(
                sent = i,
                pods = n,
                "fault injection: dropping the ZDS connection mid-snapshot"
            );
            return Err(ZdsError::Closed);
        }
        let result = match entry {
            SnapshotEntry::Add { uid, info, netns } => {
                exchange(
                    conn,
                    Subject::Add(uid),
                    Some(info),
                    Some(netns.as_fd()),
                    timeout,
                )
                .await
            }
            SnapshotEntry::Keep { uid } => {
                exchange(conn, Subject::Keep(uid), None, None, timeout).await
            }
        };
        match result {
            Ok(()) => {}
            Err(e) if keeps_connection(&e) => warn!("snapshot: {e}"),
            Err(e) => return Err(e),
        }
    }
    exchange(conn, Subject::SnapshotSent, None, None, timeout).await?;
    Ok(n)
}

/// Steady state: one request at a time; between requests, watch for the peer going away.
/// Returns how the connection ended: `Ok` when ztunnel closed it, else the error (whose
/// description, for a failed request, has also gone to the caller).
async fn serve_requests(
    conn: &SeqpacketConn,
    mut rx: mpsc::Receiver<Command>,
    timeout: Duration,
) -> Result<(), String> {
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                // The registration holds a sender, so the channel stays open.
                let Some(cmd) = cmd else { return Ok(()) };
                let netns = cmd.netns.as_ref().map(|fd| fd.as_fd());
                let result = exchange(conn, cmd.subject, cmd.info, netns, timeout).await;
                let fatal = match &result {
                    Err(e) if !keeps_connection(e) => Some(e.to_string()),
                    _ => None,
                };
                let _ = cmd.reply.send(result);
                if let Some(e) = fatal {
                    return Err(e);
                }
            }
            unsolicited = conn.recv() => return match unsolicited {
                Err(ZdsError::Closed) => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(_) => Err(ZdsError::from(Violation::Unsolicited).to_string()),
            },
        }
    }
}

/// Whether the connection is still in step after this error: a NACK is an answer, and a
/// message too large to send was never sent. Anything else leaves the order of acks unknown.
fn keeps_connection(e: &ZdsError) -> bool {
    matches!(e, ZdsError::Nack { .. } | ZdsError::TooLarge { .. })
}

/// Sends one request and waits for its ack.
async fn exchange(
    conn: &SeqpacketConn,
    subject: Subject,
    info: Option<WorkloadInfo>,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<(), ZdsError> {
    let bytes = message::encode(&message::request(&subject, info))?;
    debug!(%subject, "sending to ztunnel");
    let round_trip = async {
        conn.send(&bytes, netns).await?;
        let (resp, fds) = conn.recv().await?;
        if !fds.is_empty() {
            debug!(
                count = fds.len(),
                "closing descriptors ztunnel sent with an ack"
            );
        }
        decode_response(&resp)
    };
    match tokio::time::timeout(timeout, round_trip).await {
        Err(_) => Err(ZdsError::AckTimeout { subject, timeout }),
        Ok(Err(ZdsError::Closed)) => Err(ZdsError::ConnectionLost { subject }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(reason))) => Err(ZdsError::Nack { subject, reason }),
    }
}
