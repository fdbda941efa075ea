//! ztunnel's side of ZDS: connect to the node agent (retrying with backoff), say hello, and
//! turn its requests into [`Event`]s that the caller answers.
//!
//! ```no_run
//! # async fn run() {
//! use zmesh_core::zds::{Event, ZdsClient};
//! let mut zds = ZdsClient::new(zmesh_core::zds::DEFAULT_SOCKET_PATH);
//! loop {
//!     match zds.next().await {
//!         Event::Connected => { /* a snapshot follows: start collecting the uids it names */ }
//!         Event::Add { uid, info, netns } => { /* start the proxy */ zds.reply(Ok(())).await }
//!         Event::Keep { uid } => zds.reply(Ok(())).await,
//!         Event::SnapshotSent => { /* drop pods not named */ zds.reply(Ok(())).await }
//!         Event::Del { uid } => { /* stop the proxy */ zds.reply(Ok(())).await }
//!         Event::Disconnected { reason } => { /* not ready until the next snapshot */ }
//!     }
//! }
//! # }
//! ```
//!
//! The client checks every request against the protocol's rules (see the [module
//! docs](super)); on a violation, or a packet it cannot read, it NACKs with the reason, closes
//! the connection and reports [`Event::Disconnected`]; the next call reconnects after the
//! backoff. The caller's own `Err` becomes a NACK and the connection stays up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::OwnedFd;

use tracing::{debug, info, warn};

use super::message::{self, Request, decode_request};
use super::transport::SeqpacketConn;
use super::{Subject, Violation, WorkloadInfo, ZdsError};

/// What the node agent asked, or what happened to the connection.
#[derive(Debug)]
pub enum Event {
    /// A new connection is up and the hello sent; the agent's snapshot follows. Not a request:
    /// no reply.
    Connected,
    /// Run a proxy for this pod inside `netns` (a repeated Add with the same netns is a no-op;
    /// with another netns, the pod's sandbox was recreated). Reply required.
    Add {
        /// The pod's uid.
        uid: String,
        /// Who the pod is.
        info: WorkloadInfo,
        /// The pod's network namespace, now owned by the caller.
        netns: OwnedFd,
    },
    /// Snapshot only: the pod exists, keep its proxy though no netns came. Reply required.
    Keep {
        /// The pod's uid.
        uid: String,
    },
    /// The snapshot is complete: drop every pod it did not name. Reply required.
    SnapshotSent,
    /// The pod is gone: stop its proxy now. Reply required.
    Del {
        /// The pod's uid.
        uid: String,
    },
    /// The connection ended (the reason says why); the next call reconnects. Not a request.
    Disconnected {
        /// Why, for the log.
        reason: String,
    },
}

impl Event {
    /// Whether the node agent waits for a [`ZdsClient::reply`] to this event.
    pub fn is_request(&self) -> bool {
        !matches!(self, Event::Connected | Event::Disconnected { .. })
    }
}

/// Delays between connection attempts: doubling from `initial` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and doubling up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    /// Upstream's: 10 ms doubling to 15 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(10), Duration::from_secs(15))
    }
}

/// ztunnel's ZDS client: one connection at a time, reconnecting forever.
#[derive(Debug)]
pub struct ZdsClient {
    path: PathBuf,
    backoff: Backoff,
    session: Option<Session>,
    /// The last session ended before its snapshot was complete: wait before reconnecting.
    delay_reconnect: bool,
    /// A disconnection not yet reported.
    disconnected: Option<String>,
}

#[derive(Debug)]
struct Session {
    conn: SeqpacketConn,
    snapshot_done: bool,
    /// The request the caller has not answered yet.
    pending: Option<Subject>,
}

impl ZdsClient {
    /// A client for the node agent listening on `path`; it connects on the first
    /// [`ZdsClient::next`].
    pub fn new(path: impl Into<PathBuf>) -> ZdsClient {
        ZdsClient {
            path: path.into(),
            backoff: Backoff::default(),
            session: None,
            delay_reconnect: false,
            disconnected: None,
        }
    }

    /// Replaces the reconnection backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> ZdsClient {
        self.backoff = backoff;
        self
    }

    /// The node agent's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.session.is_some()
    }

    /// The next event, connecting first if needed: attempts are spaced by the backoff, which
    /// is reset once a session has received its whole snapshot. Every request event must be
    /// answered with [`ZdsClient::reply`] before the next call; an unanswered one is NACKed.
    ///
    /// Cancel safe: dropping the future loses no request.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(reason) = self.disconnected.take() {
                return Event::Disconnected { reason };
            }
            let Some(session) = self.session.as_mut() else {
                self.session = Some(self.connect().await);
                return Event::Connected;
            };
            if let Some(subject) = &session.pending {
                warn!(%subject, "ZDS request left unanswered; refusing it");
                let nack = message::ack(Err("ztunnel did not process the request"));
                if let Err(e) = session.conn.send(&nack, None).await {
                    self.end(format!("cannot answer the node agent: {e}"));
                    continue;
                }
                session.pending = None;
            }
            let received = session.conn.recv().await;
            let request = received.and_then(|(bytes, fds)| decode_request(&bytes, fds));
            match request.and_then(|r| session.admit(r).map_err(ZdsError::from)) {
                Ok(event) => return event,
                Err(ZdsError::Closed) => {
                    self.end("the node agent closed the connection".into());
                }
                Err(e) => self.fail(e).await,
            }
        }
    }

    /// Answers the last request event: `Ok` is an ACK, `Err(reason)` a NACK carrying the
    /// reason to the node agent (the connection stays up). Without a pending request (e.g. the
    /// connection has dropped since) this does nothing.
    pub async fn reply(&mut self, outcome: Result<(), String>) {
        let Some(session) = self.session.as_mut() else {
            debug!("ZDS reply dropped: no connection");
            return;
        };
        let Some(subject) = &session.pending else {
            warn!("ZDS reply without a pending request; ignored");
            return;
        };
        if let Err(reason) = &outcome {
            warn!(%subject, "refusing the node agent's request: {reason}");
        }
        let ack = message::ack(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        match session.conn.send(&ack, None).await {
            Ok(()) => session.pending = None,
            Err(e) => {
                self.end(format!("cannot answer the node agent: {e}"));
            }
        }
    }

    async fn connect(&mut self) -> Session {
        if std::mem::take(&mut self.delay_reconnect) {
            tokio::time::sleep(self.backoff.next_delay()).await;
        }
        loop {
            let attempt = match SeqpacketConn::connect(&self.path) {
                Ok(conn) => match conn.send(&message::hello(), None).await {
                    Ok(()) => Ok(conn),
                    Err(e) => Err(format!("cannot send the hello to the node agent: {e}")),
                },
                Err(e) => Err(e.to_string()),
            };
            match attempt {
                Ok(conn) => {
                    info!(path = %self.path.display(), "connected to the node agent");
                    return Session {
                        conn,
                        snapshot_done: false,
                        pending: None,
                    };
                }
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    warn!("{e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Ends the session after a violation or unreadable packet: NACK with the reason (so the
    /// agent's log says why), then close.
    async fn fail(&mut self, e: ZdsError) {
        let reason = e.to_string();
        warn!("{reason}; closing the connection to the node agent");
        // Taken out first, so that a cancelled send still leaves the session closed.
        if let Some(session) = self.end(reason.clone()) {
            let _ = session.conn.send(&message::ack(Err(&reason)), None).await;
        }
    }

    /// Drops the session, choosing how soon to reconnect, and queues the disconnection event.
    fn end(&mut self, reason: String) -> Option<Session> {
        let session = self.session.take();
        if let Some(s) = &session {
            if s.snapshot_done {
                self.backoff.reset();
            } else {
                self.delay_reconnect = true;
            }
        }
        info!("disconnected from the node agent: {reason}");
        self.disconnected = Some(reason);
        session
    }
}

impl Session {
    /// Applies the session's rules to a decoded request.
    fn admit(&mut self, request: Request) -> Result<Event, Violation> {
        let subject = request.subject();
        let event = match request {
            Request::Keep { uid } if self.snapshot_done => {
                return Err(Violation::KeepAfterSnapshot { uid });
            }
            Request::SnapshotSent if self.snapshot_done => return Err(Violation::SecondSnapshot),
            Request::SnapshotSent => {
                self.snapshot_done = true;
                Event::SnapshotSent
            }
            Request::Add { uid, info, netns } => Event::Add { uid, info, netns },
            Request::Keep { uid } => Event::Keep { uid },
            Request::Del { uid } => Event::Del { uid },
        };
        debug!(%subject, "request from the node agent");
        self.pending = Some(subject);
        Ok(event)
    }
}
