//! Delta ADS server: serves a [`Cache`] of resources to proxies over
//! `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`.
//!
//! The server does not know where resources come from; the controller fills the [`Cache`]
//! (`Cache::apply`) and every connected stream pushes the changed resources it is subscribed
//! to. State-of-the-world ADS (`StreamAggregatedResources`) is answered with `UNIMPLEMENTED`:
//! ztunnel, like zmesh's own proxies, only speaks delta.
//!
//! Every resource is encoded once per version, in the cache ([`Entry::encoded`]); streams
//! hold shared references to the entries and write those bytes ([`grpc`], [`reply`]).
//!
//! ```no_run
//! # async fn serve() -> anyhow::Result<()> {
//! use zmesh_controller::ads::{AdsServer, Cache};
//! let cache = Cache::new();
//! let ads = AdsServer::new(cache.clone());
//! // Single service; with tonic's `router` feature, `add_service(ads.into_service())` works too.
//! tonic::transport::Server::builder()
//!     .serve("127.0.0.1:15010".parse()?, ads.into_service())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Per-node scoping: [`AdsServer::with_scope`] installs a [`Scope`] that sees the [`Node`]
//! identity (node id and metadata such as `NODE_NAME`) and decides, per resource, whether that
//! proxy gets it, or says once for a whole type that it does. The default sends everything.

pub mod cache;
pub mod grpc;
mod has;
pub mod reply;
pub mod scope;
pub mod stream;

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zmesh_core::identity::SpiffeId;
use zmesh_core::peer_text::PeerText;
use zmesh_core::serve::PerPeer;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tonic::{Request, Status, Streaming};
use tracing::{debug, info, warn};
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

pub use cache::{Cache, Change, Entry};
pub use grpc::AdsService;
pub use reply::Reply;
pub use scope::waypoint_scope;
pub use stream::{Filter, Node, Scope, StreamState, allow_all};

/// Maximum size of a delta xDS response (ztunnel decodes up to the same limit).
pub const MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;

/// Maximum size of a delta xDS request. A request carries subscriptions and, on reconnect, the
/// name and version of each resource the client has, some 80 bytes each: 16 MiB holds about
/// 200,000. Any workload's token can open a stream, so this bounds what one request makes the
/// controller buffer and decode (istiod's default is 4 MiB, `ISTIO_GPRC_MAXRECVMSGSIZE`).
pub const MAX_REQUEST_SIZE: usize = 16 * 1024 * 1024;

/// How long a new stream waits for a cache that is still loading before it is told to retry.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many responses may be queued for a slow client before the stream stops reading.
const RESPONSE_QUEUE: usize = 16;

/// Bytes that the responses queued for one address's streams may hold of their own at once
/// ([`Reply::queued_bytes`]: removal names, a list of the cache's entries, a whole snapshot's
/// joined buffer), unless [`AdsServer::with_queued_bytes_per_peer`] says otherwise. Past it,
/// those streams stop reading until their clients read; a response larger than the whole
/// budget waits for all of it. A client that subscribes to names that do not exist, or
/// leaves and rejoins the wildcard as the cluster changes, and never reads, could otherwise
/// make the controller queue [`RESPONSE_QUEUE`] lists of up to
/// [`stream::MAX_SUBSCRIBED_BYTES`], or a joined buffer of a snapshot the cache has since
/// replaced, per stream.
///
/// One stream's responses hold at most a [`STREAM_SHARE`]th of it (or one response, if
/// larger): a client that does not read stops its own stream first, and the clients that
/// share its address (behind one NAT, or one gateway) are served until that many such
/// streams fill the budget.
pub const DEFAULT_QUEUED_BYTES_PER_PEER: usize = 32 * 1024 * 1024;

/// The part of its address's budget that one stream's queued responses may hold: one
/// [`STREAM_SHARE`]th (4 MiB of the default 32 MiB).
pub const STREAM_SHARE: usize = 8;

/// Delta ADS streams open at once from one client address, unless
/// [`AdsServer::with_max_streams_per_peer`] says otherwise (the controller sets it to its
/// connections per peer: a proxy holds one stream per connection).
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 64;

/// Errors of the ADS server and its cache.
#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    /// A request without `type_url`; aggregated streams must name the type of every request.
    #[error(
        "delta xDS request from node {node:?} has no type_url; the client is not speaking \
         aggregated delta xDS correctly"
    )]
    MissingTypeUrl {
        /// Node id of the client (empty if it never sent one).
        node: String,
    },
    /// A stream asked about more resource types than [`stream::MAX_TYPES_PER_STREAM`].
    #[error(
        "delta xDS stream of node {node:?} asked about more than {max} resource types; the \
         controller serves six, so the client is not a mesh proxy or is broken"
    )]
    TooManyTypes {
        /// Node id of the client (empty if it never sent one).
        node: String,
        /// The limit.
        max: usize,
    },
    /// A stream's subscriptions by name grew past [`stream::MAX_SUBSCRIBED_BYTES`].
    #[error(
        "delta xDS stream of node {node:?} subscribed to {bytes} bytes of resource names by \
         name, more than the {max} one stream may hold; subscribe to the wildcard (`*`) instead"
    )]
    SubscriptionsTooLarge {
        /// Node id of the client (empty if it never sent one).
        node: String,
        /// What its names cost.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A stream's first request of a type says it has more names that do not exist than
    /// [`stream::MAX_SUBSCRIBED_BYTES`] holds (each would be answered as removed).
    #[error(
        "delta xDS stream of node {node:?} says it has {bytes} bytes of names of resources \
         that do not exist, more than the {max} one stream may name; the client should drop \
         its stale resources and reconnect"
    )]
    UnknownResourcesTooLarge {
        /// Node id of the client (empty if it never sent one).
        node: String,
        /// What those names cost.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A request field longer than its limit ([`stream::MAX_NODE_FIELD`] for the node's,
    /// [`stream::MAX_TYPE_URL`] for `type_url`).
    #[error("delta xDS request's {field} is {len} bytes long; at most {max} are accepted")]
    FieldTooLong {
        /// Which field (`node.id`, `node.cluster`, a metadata key, `type_url`).
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A resource given to [`Cache::apply`] under the wrong type URL (a controller bug).
    #[error(
        "resource {name:?} was stored under type {type_url:?} but is packed as {found:?}; \
         the translation producing it is broken"
    )]
    TypeMismatch {
        /// The type URL passed to `apply`.
        type_url: String,
        /// The resource name.
        name: String,
        /// The `Any.type_url` of the resource.
        found: String,
    },
}

impl AdsError {
    /// The gRPC status a stream ends with for this error: `RESOURCE_EXHAUSTED` for a limit,
    /// `INVALID_ARGUMENT` for a malformed request.
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            AdsError::TooManyTypes { .. }
            | AdsError::SubscriptionsTooLarge { .. }
            | AdsError::UnknownResourcesTooLarge { .. } => Status::resource_exhausted(message),
            AdsError::FieldTooLong { .. }
            | AdsError::MissingTypeUrl { .. }
            | AdsError::TypeMismatch { .. } => Status::invalid_argument(message),
        }
    }
}

/// Live facts about one connected stream (for tests, metrics and debugging).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamInfo {
    /// Server-assigned stream id (also the prefix of its nonces).
    pub id: u64,
    /// The client's node identity, once known.
    pub node: Option<Node>,
    /// NACKs received on this stream.
    pub nacks: u64,
}

type Registry = Arc<Mutex<HashMap<u64, StreamInfo>>>;

/// Decides whether a stream may open, from its request metadata (the bearer token and
/// `clusterid` headers), and returns who the caller is (the [`Filter`] sees it as
/// [`Node::identity`]); an `Err` status is returned to the client as is.
pub type StreamAuth = Arc<
    dyn Fn(
            tonic::metadata::MetadataMap,
        ) -> Pin<Box<dyn std::future::Future<Output = Result<SpiffeId, Status>> + Send>>
        + Send
        + Sync,
>;

/// The delta ADS server. Cheap to clone: clones share the cache, filter and the registry
/// of connected streams.
#[derive(Clone)]
pub struct AdsServer {
    cache: Cache,
    filter: Filter,
    auth: Option<StreamAuth>,
    streams: Registry,
    next_id: Arc<AtomicU64>,
    peers: PeerStreams,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl AdsServer {
    /// A server for `cache` that sends every resource to every node.
    pub fn new(cache: Cache) -> Self {
        Self {
            cache,
            filter: allow_all(),
            auth: None,
            streams: Arc::default(),
            // Random start so nonces differ across controller restarts.
            next_id: Arc::new(AtomicU64::new(rand::random::<u32>() as u64)),
            peers: PeerStreams {
                open: Arc::default(),
                max: DEFAULT_MAX_STREAMS_PER_PEER,
                queued_max: DEFAULT_QUEUED_BYTES_PER_PEER,
            },
        }
    }

    /// Caps the delta streams open at once from one client IP address; a stream past it is
    /// refused with `RESOURCE_EXHAUSTED`. Each stream holds its subscriptions (bounded, see
    /// [`stream::MAX_SUBSCRIBED_BYTES`]) and what it was sent, so this bounds what one address
    /// can make the controller hold.
    pub fn with_max_streams_per_peer(mut self, max: usize) -> Self {
        self.peers.max = max;
        self
    }

    /// Caps the bytes the responses queued for one client address's streams hold of their own
    /// (see [`DEFAULT_QUEUED_BYTES_PER_PEER`]).
    pub fn with_queued_bytes_per_peer(mut self, max: usize) -> Self {
        self.peers.queued_max = max.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Replaces the per-node resource filter (applies to streams opened afterwards) with a
    /// closure `(node, type_url, name, resource) -> bool`, asked about every resource.
    pub fn with_filter(
        self,
        filter: impl Fn(&Node, &str, &str, &prost_types::Any) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.with_scope(filter)
    }

    /// Replaces the per-node resource filter (applies to streams opened afterwards) with a
    /// [`Scope`], which may say once for a whole type that a node sees all of it.
    pub fn with_scope(mut self, scope: impl Scope + 'static) -> Self {
        self.filter = Arc::new(scope);
        self
    }

    /// Requires every stream to pass `auth` before anything is read or sent (without it,
    /// every client is served: only for tests and trusted local setups).
    pub fn with_auth(mut self, auth: StreamAuth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The gRPC service with [`MAX_MESSAGE_SIZE`] and [`MAX_REQUEST_SIZE`], ready for `Server::serve` (or
    /// `Server::add_service` when tonic's `router` feature is enabled).
    pub fn into_service(self) -> AdsService {
        AdsService::new(self)
    }

    /// The cache this server serves.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The currently connected streams, by id.
    pub fn streams(&self) -> Vec<StreamInfo> {
        let mut v: Vec<_> = lock(&self.streams).values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// NACKs received on all currently connected streams.
    pub fn nack_count(&self) -> u64 {
        lock(&self.streams).values().map(|s| s.nacks).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AdsServer {
    /// Opens one delta stream: authenticates it, waits for a ready cache, and starts the task
    /// that answers its requests and pushes cache changes; returns what that task sends.
    pub(crate) async fn open(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Opened, Status> {
        let peer = request.remote_addr();
        let mut identity = None;
        if let Some(auth) = &self.auth {
            identity = Some(auth(request.metadata().clone()).await.inspect_err(|status| {
                warn!(?peer, reason = ?PeerText::new(status.message()), "delta ADS stream refused");
            })?);
        }
        let slot = Arc::new(match peer {
            Some(addr) => self.peers.take(addr.ip()).inspect_err(|status| {
                warn!(?peer, reason = status.message(), "delta ADS stream refused");
            })?,
            None => self.peers.unattached(),
        });
        if !self.cache.ready(READY_WAIT).await {
            return Err(Status::unavailable(
                "the controller has not loaded the cluster state yet; retry shortly",
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let requests = request.into_inner();
        // Subscribe before reading anything so no change between now and the first request
        // is missed.
        let changes = self.cache.subscribe();
        let state = StreamState::new(id, self.filter.clone()).with_peer(identity);
        lock(&self.streams).insert(
            id,
            StreamInfo {
                id,
                node: None,
                nacks: 0,
            },
        );
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let driver = StreamDriver {
            id,
            state,
            cache: self.cache.clone(),
            streams: self.streams.clone(),
            slot: slot.clone(),
        };
        debug!(stream = id, ?peer, "delta ADS stream opened");
        tokio::spawn(driver.run(requests, changes, tx));
        Ok(Opened { replies: rx, slot })
    }
}

/// What an opened stream's response body reads, and its place among its address's streams:
/// held by the body as well as by the task that answers requests, so the stream counts (and
/// its queued replies keep their address's budget) until both have ended.
pub(crate) struct Opened {
    pub(crate) replies: mpsc::Receiver<Result<Queued, Status>>,
    pub(crate) slot: Arc<PeerSlot>,
}

/// The delta streams open per client IP address (counted as the gRPC port counts
/// connections), how many one address may have, and the budget of queued bytes they share.
#[derive(Clone)]
struct PeerStreams {
    open: Arc<Mutex<Peers>>,
    max: usize,
    queued_max: usize,
}

#[derive(Default)]
struct Peers {
    count: PerPeer,
    /// Per address with streams open: permits for the bytes its queued responses may hold.
    budgets: HashMap<IpAddr, Arc<Semaphore>>,
}

impl PeerStreams {
    /// A slot for one more stream from `ip`, given back when dropped.
    fn take(&self, ip: IpAddr) -> Result<PeerSlot, Status> {
        let mut open = lock(&self.open);
        let n = open.count.get(ip);
        if n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "{ip} already has {n} delta xDS streams open, the most one address may (the \
                 controller's --max-connections-per-peer); close one first"
            )));
        }
        open.count.add(ip);
        let budget = (open.budgets.entry(ip))
            .or_insert_with(|| Arc::new(Semaphore::new(self.queued_max)))
            .clone();
        Ok(PeerSlot {
            peer: Some((self.open.clone(), ip)),
            budget: Budget::new(budget, self.queued_max),
        })
    }

    /// A slot for a stream whose address is unknown (not over TCP): its own budget.
    fn unattached(&self) -> PeerSlot {
        PeerSlot {
            peer: None,
            budget: Budget::new(Arc::new(Semaphore::new(self.queued_max)), self.queued_max),
        }
    }
}

/// One open stream's place in [`PeerStreams`].
pub(crate) struct PeerSlot {
    peer: Option<(Arc<Mutex<Peers>>, IpAddr)>,
    budget: Budget,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some((open, ip)) = &self.peer {
            let mut open = lock(open);
            if open.count.release(*ip) == 0 {
                open.budgets.remove(ip);
            }
        }
    }
}

/// The queued bytes an address's streams share, and one stream's share of them.
struct Budget {
    /// The address's.
    permits: Arc<Semaphore>,
    max: usize,
    /// This stream's: at most `max / STREAM_SHARE` of the address's at once.
    own: Arc<Semaphore>,
    own_max: usize,
}

impl Budget {
    fn new(permits: Arc<Semaphore>, max: usize) -> Self {
        let own_max = (max / STREAM_SHARE).max(1);
        Self {
            permits,
            max,
            own: Arc::new(Semaphore::new(own_max)),
            own_max,
        }
    }

    /// Waits until `reply`'s own bytes fit in this stream's share, then in its address's
    /// budget; they are held until the reply is written (a reply larger than either waits
    /// for all of it).
    async fn reserve(&self, reply: &Reply, stream: u64) -> Held {
        let bytes = reply.queued_bytes();
        if bytes == 0 {
            return Held::default();
        }
        let own = acquire(&self.own, bytes.min(self.own_max), || {
            info!(
                stream,
                bytes,
                share = self.own_max,
                "delta ADS stream waits for its client to read: its queued responses are at \
                 its share of its address's budget"
            )
        })
        .await;
        let address = acquire(&self.permits, bytes.min(self.max), || {
            info!(
                stream,
                bytes,
                budget = self.max,
                "delta ADS stream waits for its address's clients to read: their queued \
                 responses are at the budget"
            )
        })
        .await;
        Held {
            _own: own,
            _address: address,
        }
    }
}

/// `n` permits of `permits`, at once or after `waiting` says that it waits.
async fn acquire(
    permits: &Arc<Semaphore>,
    n: usize,
    waiting: impl FnOnce(),
) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if let Ok(permit) = permits.clone().try_acquire_many_owned(n) {
        return Some(permit);
    }
    waiting();
    // The semaphores are never closed.
    permits.clone().acquire_many_owned(n).await.ok()
}

/// What a queued reply holds of its stream's share and its address's budget, given back
/// when it is written.
#[derive(Default)]
pub(crate) struct Held {
    _own: Option<OwnedSemaphorePermit>,
    _address: Option<OwnedSemaphorePermit>,
}

/// A reply on its way to the client, with the share of its stream's and its address's budget
/// that it holds until it is written.
pub(crate) struct Queued {
    pub(crate) reply: Reply,
    pub(crate) held: Held,
}

/// Runs one stream: reads requests and cache changes, writes responses.
struct StreamDriver {
    id: u64,
    state: StreamState,
    cache: Cache,
    streams: Registry,
    /// Held while the stream runs (and by its response body).
    slot: Arc<PeerSlot>,
}

type Tx = mpsc::Sender<Result<Queued, Status>>;

impl StreamDriver {
    async fn run(
        mut self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        mut changes: broadcast::Receiver<Arc<Change>>,
        tx: Tx,
    ) {
        let end = loop {
            tokio::select! {
                msg = requests.message() => match msg {
                    Ok(Some(req)) => match self.state.handle_request(req, &self.cache) {
                        Ok(resp) => {
                            self.publish();
                            if !send_all(&tx, resp, &self.slot.budget, self.id).await {
                                break "client went away";
                            }
                        }
                        Err(e) => {
                            warn!(stream = self.id, "closing delta ADS stream: {}", PeerText::display(&e, zmesh_core::peer_text::PEER_ERROR_MAX));
                            let _ = tx.send(Err(e.status())).await;
                            break "invalid request";
                        }
                    },
                    Ok(None) => break "client closed the stream",
                    Err(status) => {
                        let end = if status.code() == tonic::Code::OutOfRange {
                            // A request over MAX_REQUEST_SIZE: the operator is told too (a
                            // legitimate client this large needs the limit raised).
                            warn!(stream = self.id, %status, "delta ADS request refused: too large");
                            "request too large"
                        } else {
                            debug!(stream = self.id, %status, "delta ADS stream error");
                            "stream error"
                        };
                        // The client learns why (a malformed request, one too large); one that
                        // has gone does not mind.
                        let _ = tx.send(Err(status)).await;
                        break end;
                    }
                },
                // The response body ended by itself (a response over its size limit).
                () = tx.closed() => break "response stream ended",
                change = changes.recv() => match change {
                    Ok(change) => {
                        let resp = self.state.handle_change(&change, &self.cache);
                        if !send_all(&tx, resp, &self.slot.budget, self.id).await {
                            break "client went away";
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        info!(stream = self.id, missed = n,
                            "delta ADS stream fell behind cache changes; resynchronising");
                        let resps = self.state.resync(&self.cache);
                        if !send_all(&tx, resps, &self.slot.budget, self.id).await {
                            break "client went away";
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break "cache dropped",
                },
            }
        };
        let node = self.state.node().map(|n| n.id.clone()).unwrap_or_default();
        debug!(stream = self.id, node = ?PeerText::new(&node), reason = end, "delta ADS stream closed");
    }

    /// Copies node identity and NACK count into the shared registry.
    fn publish(&self) {
        if let Some(info) = lock(&self.streams).get_mut(&self.id) {
            info.nacks = self.state.nack_count();
            if info.node.is_none() {
                info.node = self.state.node().cloned();
            }
        }
    }
}

impl Drop for StreamDriver {
    /// The stream leaves the registry however its task ends.
    fn drop(&mut self) {
        lock(&self.streams).remove(&self.id);
    }
}

/// Sends every response, each once its own bytes fit in `budget`; false when the client is
/// gone.
async fn send_all(
    tx: &Tx,
    resps: impl IntoIterator<Item = Reply>,
    budget: &Budget,
    stream: u64,
) -> bool {
    for reply in resps {
        // A client that goes while the stream waits for room ends it, as a send would.
        let held = tokio::select! {
            held = budget.reserve(&reply, stream) => held,
            () = tx.closed() => return false,
        };
        if tx.send(Ok(Queued { reply, held })).await.is_err() {
            return false;
        }
    }
    true
}
