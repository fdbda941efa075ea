//! The per-stream delta xDS state machine, free of gRPC so it can be tested directly.
//!
//! One [`StreamState`] exists per connected proxy. For every type URL the client has asked
//! about it tracks what the client subscribed to (wildcard and/or explicit names), what the
//! client has (name → version), and the nonces of responses that still await an ACK/NACK.
//!
//! Protocol rules implemented (Envoy "xDS REST and gRPC protocol", incremental variant):
//! - The first request of a type with an empty `resource_names_subscribe` is a (legacy)
//!   wildcard subscription; `*` in `resource_names_subscribe` subscribes to the wildcard at any
//!   time, `*` in `resource_names_unsubscribe` leaves it. Within one request subscriptions are
//!   applied before unsubscriptions (ztunnel's on-demand mode sends `*` in both to mean
//!   "nothing").
//! - `initial_resource_versions` (first request of a type only) says what the client already
//!   has, so only what differs is sent, and what no longer exists goes in `removed_resources`.
//! - A request with `response_nonce` is an ACK, or a NACK when `error_detail` is set. After a
//!   NACK the client keeps its last good config; the server does not resend the same versions
//!   (a resource is only sent again when its version changes).
//! - An explicit subscription to a name that does not exist is answered with that name in
//!   `removed_resources`, which is how the incremental protocol says "does not exist".
//! - A newly subscribed name is sent even if the client was sent that version before.
//! - Unsubscribed resources are dropped by the client itself; no removal is sent. Unsubscribing
//!   a name that the wildcard still covers changes nothing.
//! - Every response has a fresh nonce; `system_version_info` (debugging only) is the cache's
//!   generation counter.
//!
//! What one stream makes the controller hold is bounded, since any workload's token opens
//! one: at most [`MAX_TYPES_PER_STREAM`] types of [`MAX_TYPE_URL`] bytes,
//! [`MAX_SUBSCRIBED_BYTES`] of names subscribed to by name (checked as each is added), node
//! fields of [`MAX_NODE_FIELD`] bytes (the rest of the node's metadata is not kept). What the
//! client has is bounded by the cache (as of now, and of the snapshot its [`Has`] rests on,
//! with at most a sixteenth of that snapshot since replaced): names that do not exist are
//! dropped once reported removed (at most [`MAX_SUBSCRIBED_BYTES`] of them on a first
//! request) or when unsubscribed, and the others are keyed by the cache's own names. A
//! stream past a limit ends with the error saying which (`AdsError::status`). Requests are
//! bounded by the gRPC service (`MAX_REQUEST_SIZE`), streams per client address by the
//! server.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use prost_types::Any;
use tracing::{debug, warn};
use xds_proto::envoy::config::core::v3 as core;
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use zmesh_core::identity::SpiffeId;
use zmesh_core::peer_text::PeerText;

use super::AdsError;
use super::cache::{Cache, Change, Entry, Snapshot, version_id};
use super::has::Has;
use super::reply::{Reply, Resources};

/// How much of a NACK's `error_detail.message` the warning keeps: a proxy lists its reasons
/// there (a waypoint, one per resource it refused), so more than a single peer value.
const NACK_MESSAGE_MAX: usize = 1024;

/// The wildcard resource name.
pub const WILDCARD: &str = "*";

/// Responses per type whose ACK we still remember; older nonces are forgotten (and an ACK for
/// them is then treated as stale).
const MAX_PENDING_NONCES: usize = 64;

/// Resource types one stream may ask about. The controller serves six; each type a client
/// names holds state for the stream's life, so a stream naming more is refused.
pub const MAX_TYPES_PER_STREAM: usize = 16;

/// What the names a stream subscribed to by name may hold, summed over its types: each name's
/// bytes plus [`NAME_OVERHEAD`]. About 50,000 names of the `network/IP` form that upstream
/// ztunnel's on-demand mode subscribes to; zmesh's proxies subscribe to the wildcard. A stream
/// past it is refused, so one client cannot make the controller hold names without bound.
pub const MAX_SUBSCRIBED_BYTES: usize = 4 * 1024 * 1024;

/// What each subscribed name costs besides its bytes: its `Arc` (two counters) and its slot
/// in the type's set.
const NAME_OVERHEAD: usize = 48;

/// The longest `node.id`, `node.cluster` or kept metadata value a stream may send. Istio's
/// node ids are some 100 to 200 bytes (`ztunnel~IP~pod.namespace~domain`); Kubernetes names
/// are at most 253.
pub const MAX_NODE_FIELD: usize = 1024;

/// The longest `type_url` a stream may ask about (a key of its state, and copied into every
/// response); the controller's are under 60 bytes.
pub const MAX_TYPE_URL: usize = 512;

/// Decides which resources a node may see.
///
/// A closure `Fn(&Node, type_url, name, &Any) -> bool` is a scope that is asked about every
/// resource.
pub trait Scope: Send + Sync {
    /// Whether `node` may see resource `name` of `type_url`.
    fn sees(&self, node: &Node, type_url: &str, name: &str, resource: &Any) -> bool;

    /// Whether `node` sees every resource of `type_url`, whatever it holds: then
    /// [`sees`](Scope::sees) is not asked about them (a proxy's first push of 10k resources
    /// would otherwise ask 10k times).
    fn sees_all(&self, _node: &Node, _type_url: &str) -> bool {
        false
    }
}

impl<F> Scope for F
where
    F: Fn(&Node, &str, &str, &Any) -> bool + Send + Sync,
{
    fn sees(&self, node: &Node, type_url: &str, name: &str, resource: &Any) -> bool {
        self(node, type_url, name, resource)
    }
}

/// The scope a stream is served with (shared by all streams of a server).
pub type Filter = Arc<dyn Scope>;

/// The default [`Filter`]: every node sees everything.
pub fn allow_all() -> Filter {
    struct All;
    impl Scope for All {
        fn sees(&self, _: &Node, _: &str, _: &str, _: &Any) -> bool {
            true
        }
        fn sees_all(&self, _: &Node, _: &str) -> bool {
            true
        }
    }
    Arc::new(All)
}

/// Who is on the other end of a stream, from the `node` of its first request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// `node.id`, e.g. `ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// Metadata `NODE_NAME` (the Kubernetes node the proxy runs on), if present.
    pub node_name: Option<String>,
    /// Metadata `NAMESPACE`, if present.
    pub namespace: Option<String>,
    /// Metadata `CLUSTER_ID`, if present.
    pub cluster_id: Option<String>,
    /// The identity the stream's credentials authenticated (set by the server, never read from
    /// the request); `None` when the server authenticates no one.
    pub identity: Option<SpiffeId>,
}

impl Node {
    /// Reads the identity out of a protobuf `Node`: its id, cluster and the metadata values
    /// `NODE_NAME`, `NAMESPACE` and `CLUSTER_ID` (the rest of the metadata is not kept). A
    /// field longer than [`MAX_NODE_FIELD`] is refused, naming it.
    pub fn from_proto(node: &core::Node) -> Result<Self, AdsError> {
        let checked = |field: &'static str, value: &str| {
            if value.len() > MAX_NODE_FIELD {
                return Err(AdsError::FieldTooLong {
                    field,
                    len: value.len(),
                    max: MAX_NODE_FIELD,
                });
            }
            Ok(value.to_owned())
        };
        let string = |key: &'static str| {
            let value = node.metadata.as_ref()?.fields.get(key)?;
            match value.kind.as_ref()? {
                prost_types::value::Kind::StringValue(s) => Some(checked(key, s)),
                _ => None,
            }
        };
        Ok(Self {
            id: checked("node.id", &node.id)?,
            cluster: checked("node.cluster", &node.cluster)?,
            node_name: string("NODE_NAME").transpose()?,
            namespace: string("NAMESPACE").transpose()?,
            cluster_id: string("CLUSTER_ID").transpose()?,
            identity: None,
        })
    }
}

/// Per type URL state of one stream.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// What the client has (or was last sent): name → version id (see
    /// [`version_id`](super::cache::version_id)); names are shared with the cache where they
    /// came from it, so a stream holds no copy of the cache's names or version strings, and
    /// a whole type it was sent at once is the cache's shared snapshot ([`Has`]).
    has: Has,
    /// Nonces of responses not yet ACKed/NACKed, oldest first.
    pending: VecDeque<String>,
}

impl TypeState {
    fn interested(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// The names a diff compares: some names, and (with `all`) every cached resource of the type,
/// less the names unsubscribed in the same request.
#[derive(Default)]
struct Candidates {
    names: Vec<Arc<str>>,
    all: bool,
    dropped: HashSet<Arc<str>>,
}

impl Candidates {
    /// Each candidate once, sorted by name, with its cache entry (`None`: not cached). Every
    /// cached resource comes from the cache's shared sorted list, so a wildcard subscription
    /// looks nothing up by name; other names are looked up under one read of the cache.
    fn resolve(mut self, cache: &Cache, type_url: &str) -> Resolved {
        self.names.sort_unstable();
        self.names.dedup();
        let all = self.all.then(|| cache.sorted_entries(type_url));
        if let Some(all) = &all {
            self.names.retain(|n| all.find(n).is_none());
            if self.names.is_empty() && self.dropped.is_empty() {
                return Resolved::Whole(all.clone());
            }
        }
        let entries = cache.get_many(type_url, &self.names);
        let mut out: Vec<_> = self.names.into_iter().zip(entries).collect();
        if let Some(all) = all {
            let merge = !out.is_empty();
            out.extend(all.iter().map(|e| (e.name.clone(), Some(e.clone()))));
            if merge {
                // Two sorted runs: merged in linear time.
                out.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        if !self.dropped.is_empty() {
            out.retain(|(n, _)| !self.dropped.contains(n));
        }
        Resolved::Names(out)
    }
}

/// [`Candidates`] with their cache entries.
enum Resolved {
    /// Exactly every cached resource of the type.
    Whole(Arc<Snapshot>),
    /// Each candidate once, sorted by name, with its cache entry (`None`: not cached).
    Names(Vec<(Arc<str>, Option<Arc<Entry>>)>),
}

impl Resolved {
    /// Calls `f` with each candidate, in name order.
    fn each(&self, mut f: impl FnMut(&Arc<str>, Option<&Arc<Entry>>)) {
        match self {
            Resolved::Whole(snapshot) => snapshot.iter().for_each(|e| f(&e.name, Some(e))),
            Resolved::Names(names) => names.iter().for_each(|(n, e)| f(n, e.as_ref())),
        }
    }
}

/// The delta xDS state of one stream. See the module docs for the rules.
pub struct StreamState {
    node: Option<Node>,
    peer: Option<SpiffeId>,
    types: BTreeMap<String, TypeState>,
    filter: Filter,
    stream_id: u64,
    next_nonce: u64,
    nacks: u64,
    /// What the names subscribed to by name cost, summed over types (see
    /// [`MAX_SUBSCRIBED_BYTES`]).
    subscribed_bytes: usize,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("node", &self.node)
            .field("types", &self.types)
            .field("stream_id", &self.stream_id)
            .field("nacks", &self.nacks)
            .field("subscribed_bytes", &self.subscribed_bytes)
            .finish_non_exhaustive()
    }
}

impl StreamState {
    /// A fresh stream; `stream_id` makes nonces unique across streams.
    pub fn new(stream_id: u64, filter: Filter) -> Self {
        Self {
            node: None,
            peer: None,
            types: BTreeMap::new(),
            filter,
            stream_id,
            next_nonce: 0,
            nacks: 0,
            subscribed_bytes: 0,
        }
    }

    /// Records the identity the stream authenticated as; the filter sees it in
    /// [`Node::identity`].
    pub fn with_peer(mut self, peer: Option<SpiffeId>) -> Self {
        self.peer = peer;
        self
    }

    /// The node identity, once a request carried one.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// How many NACKs the client sent on this stream.
    pub fn nack_count(&self) -> u64 {
        self.nacks
    }

    /// The type URLs the client asked about, sorted.
    pub fn type_urls(&self) -> Vec<String> {
        self.types.keys().cloned().collect()
    }

    /// Whether the client is subscribed to the wildcard of `type_url`.
    pub fn is_wildcard(&self, type_url: &str) -> bool {
        self.types.get(type_url).is_some_and(|t| t.wildcard)
    }

    /// Handles one request: records an ACK/NACK, applies subscription changes, and returns the
    /// response to send (if any). The first request of a type is always answered, even with
    /// nothing, so clients that wait for a first response per type become ready.
    pub fn handle_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        cache: &Cache,
    ) -> Result<Option<Reply>, AdsError> {
        if self.node.is_none()
            && let Some(n) = &req.node
        {
            self.node = Some(Node {
                identity: self.peer.clone(),
                ..Node::from_proto(n)?
            });
        }
        if req.type_url.is_empty() {
            return Err(AdsError::MissingTypeUrl {
                node: self.node_id().to_owned(),
            });
        }
        let type_url = req.type_url;
        if type_url.len() > MAX_TYPE_URL {
            return Err(AdsError::FieldTooLong {
                field: "type_url",
                len: type_url.len(),
                max: MAX_TYPE_URL,
            });
        }
        let first = !self.types.contains_key(&type_url);
        if first && self.types.len() >= MAX_TYPES_PER_STREAM {
            return Err(AdsError::TooManyTypes {
                node: self.node_id().to_owned(),
                max: MAX_TYPES_PER_STREAM,
            });
        }
        let node_id = self.node_id().to_owned();
        let ts = self.types.entry(type_url.clone()).or_default();

        if !req.response_nonce.is_empty() {
            let known = match ts.pending.iter().position(|n| *n == req.response_nonce) {
                Some(i) => {
                    ts.pending.remove(i);
                    true
                }
                None => false,
            };
            match &req.error_detail {
                Some(status) => {
                    self.nacks += 1;
                    warn!(
                        node = ?PeerText::new(&node_id), type_url = ?PeerText::new(&type_url),
                        nonce = ?PeerText::new(&req.response_nonce), known, code = status.code,
                        detail = ?PeerText::with_limit(&status.message, NACK_MESSAGE_MAX),
                        "proxy rejected (NACKed) an xDS response; it keeps its last good config"
                    );
                }
                None if known => debug!(node = ?PeerText::new(&node_id),
                    type_url = ?PeerText::new(&type_url), "ACK"),
                None => debug!(node = ?PeerText::new(&node_id),
                    type_url = ?PeerText::new(&type_url),
                    nonce = ?PeerText::new(&req.response_nonce),
                    "ACK for an unknown or expired nonce"),
            }
        }

        // Subscription changes.
        let mut candidates = Candidates::default();
        let mut newly_named: BTreeSet<Arc<str>> = BTreeSet::new();
        if first {
            if req.resource_names_subscribe.is_empty() {
                ts.wildcard = true;
            }
            ts.has = req
                .initial_resource_versions
                .into_iter()
                .map(|(name, version)| (Arc::from(name), version_id(&version)))
                .collect();
            candidates.names.extend(ts.has.keys().cloned());
        }
        // The budget is checked as names are added, so one request cannot make the stream hold
        // more than what its own unsubscriptions may then free.
        let release: usize = (req.resource_names_unsubscribe.iter())
            .map(|n| n.len() + NAME_OVERHEAD)
            .sum();
        let too_large = |bytes| AdsError::SubscriptionsTooLarge {
            node: node_id.clone(),
            bytes,
            max: MAX_SUBSCRIBED_BYTES,
        };
        for name in req.resource_names_subscribe {
            if name == WILDCARD {
                if !ts.wildcard {
                    ts.wildcard = true;
                    candidates.all = true;
                }
                continue;
            }
            let name: Arc<str> = Arc::from(name);
            let cost = name.len() + NAME_OVERHEAD;
            let added = ts.names.insert(name.clone());
            if added {
                self.subscribed_bytes += cost;
                if self.subscribed_bytes > MAX_SUBSCRIBED_BYTES.saturating_add(release) {
                    return Err(too_large(self.subscribed_bytes));
                }
            }
            if added || first {
                newly_named.insert(name.clone());
                candidates.names.push(name);
            }
        }
        if ts.wildcard && first {
            candidates.all = true;
        }
        for name in req.resource_names_unsubscribe {
            if name == WILDCARD {
                ts.wildcard = false;
                // The client drops what only the wildcard gave it.
                let names = &ts.names;
                ts.has.retain(|n| names.contains(n));
            } else {
                if ts.names.remove(name.as_str()) {
                    self.subscribed_bytes -= name.len() + NAME_OVERHEAD;
                }
                newly_named.remove(name.as_str());
                if !ts.wildcard {
                    ts.has.remove(name.as_str());
                }
                candidates.dropped.insert(Arc::from(name));
            }
        }

        // After the unsubscriptions: a client may move its names in one request.
        if self.subscribed_bytes > MAX_SUBSCRIBED_BYTES {
            return Err(too_large(self.subscribed_bytes));
        }

        // On the first request, `initial_resource_versions` says what the client really has,
        // so only later subscriptions force a resend.
        let nothing = BTreeSet::new();
        let force = if first { &nothing } else { &newly_named };
        // Names it has and unsubscribed while on the wildcard: the wildcard still gives it
        // those that exist, the others it drops itself (and the diff never sees them).
        let unsubscribed_had: Vec<Arc<str>> = match ts.wildcard {
            true => (candidates.dropped.iter())
                .filter(|n| ts.has.contains_key(n))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        let candidates = candidates.resolve(cache, &type_url);
        if !unsubscribed_had.is_empty() {
            let entries = cache.get_many(&type_url, &unsubscribed_had);
            for (name, entry) in unsubscribed_had.iter().zip(entries) {
                if entry.is_none() {
                    ts.has.remove(name);
                }
            }
        }
        if first && !ts.has.is_empty() {
            // What the client has is keyed by the cache's names, not by copies of its own
            // (a reconnecting client names every resource it has; a fresh one names none, and
            // its first request costs no lookup more). What it names that does
            // not exist is answered in one removal list, bounded as subscriptions are.
            let mut unknown = 0usize;
            candidates.each(|name, entry| match entry {
                Some(entry) => {
                    if let Some(version) = ts.has.remove(name) {
                        ts.has.insert(entry.name.clone(), version);
                    }
                }
                None if ts.has.contains_key(name) => unknown += name.len() + NAME_OVERHEAD,
                None => {}
            });
            if unknown > MAX_SUBSCRIBED_BYTES {
                return Err(AdsError::UnknownResourcesTooLarge {
                    node: node_id,
                    bytes: unknown,
                    max: MAX_SUBSCRIBED_BYTES,
                });
            }
        }
        let resp = self.diff(&type_url, candidates, &newly_named, force, cache);
        if resp.is_none() && first {
            return Ok(Some(self.response(
                &type_url,
                Vec::new().into(),
                Vec::new(),
                cache,
            )));
        }
        Ok(resp)
    }

    /// The response for a cache change (only names this stream is subscribed to or has).
    pub fn handle_change(&mut self, change: &Change, cache: &Cache) -> Option<Reply> {
        if !self.types.contains_key(&change.type_url) {
            return None;
        }
        let candidates = Candidates {
            names: change.names.iter().map(|n| Arc::from(n.as_str())).collect(),
            ..Candidates::default()
        };
        self.diff(
            &change.type_url,
            candidates.resolve(cache, &change.type_url),
            &BTreeSet::new(),
            &BTreeSet::new(),
            cache,
        )
    }

    /// Responses that bring every type up to date with the cache (after missed notifications).
    pub fn resync(&mut self, cache: &Cache) -> Vec<Reply> {
        let type_urls = self.type_urls();
        let mut out = Vec::new();
        for type_url in type_urls {
            let ts = &self.types[&type_url];
            let mut candidates = Candidates {
                names: ts.has.keys().cloned().collect(),
                all: ts.wildcard,
                ..Candidates::default()
            };
            candidates.names.extend(ts.names.iter().cloned());
            let candidates = candidates.resolve(cache, &type_url);
            out.extend(self.diff(
                &type_url,
                candidates,
                &BTreeSet::new(),
                &BTreeSet::new(),
                cache,
            ));
        }
        out
    }

    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("", |n| n.id.as_str())
    }

    /// Compares `candidates` between the cache (as visible to this node) and what the client
    /// has; builds a response with the differences, or `None` if there are none. Names in
    /// `newly_named` that do not exist are reported in `removed_resources`; names in `force`
    /// are sent even when the client has their version.
    fn diff(
        &mut self,
        type_url: &str,
        candidates: Resolved,
        newly_named: &BTreeSet<Arc<str>>,
        force: &BTreeSet<Arc<str>>,
        cache: &Cache,
    ) -> Option<Reply> {
        let default_node = Node {
            identity: self.peer.clone(),
            ..Node::default()
        };
        let node = self.node.as_ref().unwrap_or(&default_node);
        let ts = self.types.get_mut(type_url)?;
        let filter = &*self.filter;
        let sees_all = filter.sees_all(node, type_url);
        let sees =
            |name: &str, e: &Entry| sees_all || filter.sees(node, type_url, name, &e.resource);
        let candidates = match candidates {
            // A wildcard subscriber that has nothing and may see every resource of the type
            // (a proxy's first push): it is sent, and then has, the cache's snapshot itself.
            Resolved::Whole(snapshot)
                if ts.wildcard
                    && ts.has.is_empty()
                    && (sees_all || snapshot.iter().all(|e| sees(&e.name, e))) =>
            {
                if snapshot.is_empty() {
                    return None;
                }
                ts.has = Has::of(snapshot.clone());
                let encoded = cache.encoded(type_url, &snapshot);
                let all = Resources::All(snapshot, encoded);
                return Some(self.response(type_url, all, Vec::new(), cache));
            }
            Resolved::Whole(snapshot) => (snapshot.iter())
                .map(|e| (e.name.clone(), Some(e.clone())))
                .collect(),
            Resolved::Names(names) => names,
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for (name, entry) in candidates {
            let interested = ts.interested(&name);
            let visible = entry.filter(|e| sees(&name, e));
            match visible {
                Some(entry) if interested => {
                    // Newly requested names are sent even if the client was sent this version
                    // before (Envoy: "the server must resend any newly requested resources").
                    // One hash of the name: record the version, look at what was there.
                    let had = ts.has.insert(entry.name.clone(), entry.version_id);
                    if had != Some(entry.version_id) || force.contains(&name) {
                        resources.push(entry);
                    }
                }
                _ => {
                    if ts.has.remove(&name).is_some() || newly_named.contains(&name) {
                        removed.push(name.to_string());
                    }
                }
            }
        }
        if ts.has.wants_rebase() {
            ts.has.rebase(cache.sorted_entries(type_url));
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        Some(self.response(type_url, resources.into(), removed, cache))
    }

    fn response(
        &mut self,
        type_url: &str,
        resources: Resources,
        removed_resources: Vec<String>,
        cache: &Cache,
    ) -> Reply {
        self.next_nonce += 1;
        let nonce = format!("{:x}-{}", self.stream_id, self.next_nonce);
        if let Some(ts) = self.types.get_mut(type_url) {
            if ts.pending.len() >= MAX_PENDING_NONCES {
                ts.pending.pop_front();
            }
            ts.pending.push_back(nonce.clone());
        }
        Reply {
            system_version_info: cache.generation().to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce,
            removed_resources,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const T: &str = "type.googleapis.com/test.T";

    fn cache() -> Cache {
        let c = Cache::new();
        let any = |v: &[u8]| Any {
            type_url: T.into(),
            value: v.to_vec(),
        };
        c.apply(
            T,
            vec![("a".into(), any(b"1")), ("b".into(), any(b"2"))],
            vec![],
        )
        .unwrap();
        c
    }

    fn req(sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn names(r: &Reply) -> Vec<&str> {
        r.resources.iter().map(|r| &*r.name).collect()
    }

    #[test]
    fn on_demand_start_subscribes_to_nothing_but_is_answered() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let r = st.handle_request(req(&["*"], &["*"]), &c).unwrap().unwrap();
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert!(!st.is_wildcard(T));
        let r = st.handle_request(req(&["b"], &[]), &c).unwrap().unwrap();
        assert_eq!(names(&r), ["b"]);
    }

    #[test]
    fn explicit_wildcard_and_leaving_it() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let r = st.handle_request(req(&["a"], &[]), &c).unwrap().unwrap();
        assert_eq!(names(&r), ["a"]);
        let r = st.handle_request(req(&["*"], &[]), &c).unwrap().unwrap();
        assert_eq!(names(&r), ["b"], "only what the client lacks");
        assert!(st.is_wildcard(T));
        assert!(st.handle_request(req(&[], &["*"]), &c).unwrap().is_none());
        // `b` came only from the wildcard: the client dropped it, so a change is not pushed.
        let change = Change {
            type_url: T.into(),
            names: vec!["b".into()],
        };
        assert!(st.handle_change(&change, &c).is_none());
    }

    #[test]
    fn initial_versions_and_resubscribe_resend() {
        let c = cache();
        let va = c.get(T, "a").unwrap().version();
        let mut st = StreamState::new(1, allow_all());
        let mut r = req(&["a"], &[]);
        r.initial_resource_versions = HashMap::from([("a".to_string(), va)]);
        let resp = st.handle_request(r, &c).unwrap().unwrap();
        assert!(resp.resources.is_empty(), "client already has a");
        let kept = st.types[T].has.key("a").unwrap();
        assert!(
            Arc::ptr_eq(kept, &c.get(T, "a").unwrap().name),
            "the cache's name is kept"
        );
        assert!(st.handle_request(req(&[], &["a"]), &c).unwrap().is_none());
        let resp = st.handle_request(req(&["a"], &[]), &c).unwrap().unwrap();
        assert_eq!(names(&resp), ["a"], "newly requested names are resent");
    }

    /// A fresh wildcard subscriber is sent the cache's snapshot itself, shared with every
    /// other such stream, and then remembers having it without a copy; a change is pushed as
    /// before. A stream that may not see every resource is sent only what it may.
    #[test]
    fn a_wildcard_streams_first_push_is_the_shared_snapshot() {
        let c = cache();
        let mut one = StreamState::new(1, allow_all());
        let mut two = StreamState::new(2, allow_all());
        let r1 = one.handle_request(req(&[], &[]), &c).unwrap().unwrap();
        let r2 = two.handle_request(req(&[], &[]), &c).unwrap().unwrap();
        let (Resources::All(s1, b1), Resources::All(s2, b2)) = (&r1.resources, &r2.resources)
        else {
            panic!("not the whole snapshot: {r1:?}");
        };
        assert!(Arc::ptr_eq(s1, s2), "one snapshot for both streams");
        assert_eq!(b1.as_ptr(), b2.as_ptr(), "one encoded buffer for both");
        assert_eq!(names(&r1), ["a", "b"]);
        assert_eq!(
            r1.to_proto().resources,
            [
                c.get(T, "a").unwrap().to_proto(),
                c.get(T, "b").unwrap().to_proto()
            ]
        );
        assert!(Arc::ptr_eq(
            one.types[T].has.key("a").unwrap(),
            &c.get(T, "a").unwrap().name
        ));

        // A change: only the changed resource, once; a removal: its name.
        let any = Any {
            type_url: T.into(),
            value: b"3".to_vec(),
        };
        c.apply(T, vec![("a".into(), any)], vec!["b".into()])
            .unwrap();
        let change = Change {
            type_url: T.into(),
            names: vec!["a".into(), "b".into()],
        };
        let r = one.handle_change(&change, &c).unwrap();
        assert_eq!(names(&r), ["a"]);
        assert_eq!(r.resources[0].resource.value, b"3");
        assert_eq!(r.removed_resources, ["b"]);
        assert!(one.handle_change(&change, &c).is_none(), "nothing new");

        // Hidden resources are never part of a shared push.
        let only_a: Filter = Arc::new(|_: &Node, _: &str, name: &str, _: &Any| name == "a");
        let c = cache();
        let mut hidden = StreamState::new(3, only_a);
        let r = hidden.handle_request(req(&[], &[]), &c).unwrap().unwrap();
        assert!(matches!(r.resources, Resources::List(_)));
        assert_eq!(names(&r), ["a"]);
    }

    /// A scope that says it shows a node every resource of a type is not asked about them one
    /// by one, on the first push or a change; one that does not say so is asked about each.
    #[test]
    fn a_scope_that_sees_a_whole_type_is_not_asked_per_resource() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting {
            whole: bool,
            asked: AtomicUsize,
        }
        impl Scope for Counting {
            fn sees(&self, _: &Node, _: &str, _: &str, _: &Any) -> bool {
                self.asked.fetch_add(1, Ordering::Relaxed);
                true
            }
            fn sees_all(&self, _: &Node, _: &str) -> bool {
                self.whole
            }
        }
        for whole in [true, false] {
            let c = cache();
            let scope = Arc::new(Counting {
                whole,
                asked: AtomicUsize::new(0),
            });
            let mut st = StreamState::new(1, scope.clone());
            let r = st.handle_request(req(&[], &[]), &c).unwrap().unwrap();
            assert!(matches!(r.resources, Resources::All(..)), "{whole}");
            assert_eq!(names(&r), ["a", "b"]);
            let any = Any {
                type_url: T.into(),
                value: b"3".to_vec(),
            };
            c.apply(T, vec![("a".into(), any)], Vec::new()).unwrap();
            let change = Change {
                type_url: T.into(),
                names: vec!["a".into()],
            };
            assert_eq!(names(&st.handle_change(&change, &c).unwrap()), ["a"]);
            let asked = scope.asked.load(Ordering::Relaxed);
            assert_eq!(asked, if whole { 0 } else { 3 }, "whole type: {whole}");
        }
    }

    /// A stream may name `MAX_TYPES_PER_STREAM` types; asking about one more ends it with an
    /// error that says so, while the types it has keep being served until then.
    #[test]
    fn a_stream_names_a_bounded_number_of_types() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        for i in 0..MAX_TYPES_PER_STREAM {
            let mut r = req(&[], &[]);
            r.type_url = format!("type.googleapis.com/test.T{i}");
            assert!(
                st.handle_request(r, &c).unwrap().is_some(),
                "type {i} answered"
            );
        }
        let mut again = req(&[], &[]);
        again.type_url = "type.googleapis.com/test.T0".into();
        assert!(
            st.handle_request(again, &c).is_ok(),
            "a type it has is not a new one"
        );
        let err = st.handle_request(req(&[], &[]), &c).unwrap_err();
        assert!(
            matches!(err, AdsError::TooManyTypes { max: 16, .. }),
            "{err}"
        );
        assert_eq!(err.status().code(), tonic::Code::ResourceExhausted);
    }

    /// A name of 976 bytes costs 1 KiB against `MAX_SUBSCRIBED_BYTES`.
    fn kib_name(i: usize) -> String {
        format!("{i:08}{}", "x".repeat(968))
    }

    /// Names subscribed to by name count against `MAX_SUBSCRIBED_BYTES` until unsubscribed; a
    /// name subscribed twice counts once; the limit itself is allowed, a byte past it is not.
    #[test]
    fn subscriptions_by_name_are_counted_until_unsubscribed() {
        assert_eq!(kib_name(0).len() + NAME_OVERHEAD, 1024);
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let fill = MAX_SUBSCRIBED_BYTES / 1024;
        let batch: Vec<String> = (0..fill).map(kib_name).collect();
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        st.handle_request(req(&refs, &[]), &c).unwrap();
        st.handle_request(req(&refs[..10], &[]), &c).unwrap();
        assert_eq!(
            st.subscribed_bytes, MAX_SUBSCRIBED_BYTES,
            "the limit exactly"
        );
        // Moving ten names in one request stays within the limit.
        let moved: Vec<String> = (fill..fill + 10).map(kib_name).collect();
        let moved: Vec<&str> = moved.iter().map(String::as_str).collect();
        st.handle_request(req(&moved, &refs[..10]), &c).unwrap();
        // Unsubscribing what was never subscribed frees nothing.
        st.handle_request(req(&[], &["never", "*"]), &c).unwrap();
        assert_eq!(st.subscribed_bytes, MAX_SUBSCRIBED_BYTES);
        let one_more = kib_name(fill + 10);
        let err = st.handle_request(req(&[&one_more], &[]), &c).unwrap_err();
        assert!(
            matches!(err, AdsError::SubscriptionsTooLarge { .. }),
            "{err}"
        );
        assert_eq!(err.status().code(), tonic::Code::ResourceExhausted);
        assert!(
            err.to_string().contains("wildcard"),
            "says what to do: {err}"
        );
    }

    /// One request cannot carry the stream far past the limit: it is refused as its names are
    /// added, not once all of them are held.
    #[test]
    fn one_large_request_is_refused_as_its_names_come() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let names: Vec<String> = (0..2 * MAX_SUBSCRIBED_BYTES / 1024).map(kib_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let err = st.handle_request(req(&refs, &[]), &c).unwrap_err();
        assert!(
            matches!(err, AdsError::SubscriptionsTooLarge { .. }),
            "{err}"
        );
        assert_eq!(st.subscribed_bytes, MAX_SUBSCRIBED_BYTES + 1024);
        assert_eq!(st.types[T].names.len(), MAX_SUBSCRIBED_BYTES / 1024 + 1);
    }

    /// What a first request says the client has that does not exist is answered as removed,
    /// up to `MAX_SUBSCRIBED_BYTES` of names; more ends the stream.
    #[test]
    fn unknown_names_a_client_says_it_has_are_bounded() {
        let c = cache();
        let versions = |n: usize| -> HashMap<String, String> {
            (0..n).map(|i| (kib_name(i), "v".to_owned())).collect()
        };
        let fill = MAX_SUBSCRIBED_BYTES / 1024;
        let mut st = StreamState::new(1, allow_all());
        let mut r = req(&["a"], &[]);
        r.initial_resource_versions = versions(fill);
        let resp = st.handle_request(r, &c).unwrap().unwrap();
        assert_eq!(resp.removed_resources.len(), fill);
        assert_eq!(st.types[T].has.len(), 1, "only a is kept");

        let mut st = StreamState::new(1, allow_all());
        let mut r = req(&["a"], &[]);
        r.initial_resource_versions = versions(fill + 1);
        let err = st.handle_request(r, &c).unwrap_err();
        assert!(
            matches!(err, AdsError::UnknownResourcesTooLarge { .. }),
            "{err}"
        );
        assert_eq!(err.status().code(), tonic::Code::ResourceExhausted);
    }

    /// On the wildcard, a name the client has and unsubscribes stays if the wildcard gives it
    /// (it exists) and goes if it does not exist, so no stream keeps names of its own choosing
    /// that nothing would ever drop.
    #[test]
    fn unsubscribing_on_the_wildcard_keeps_only_what_exists() {
        let c = cache();
        let va = c.get(T, "a").unwrap().version();
        let mut st = StreamState::new(1, allow_all());
        let mut r = req(&[], &["a", "made-up"]);
        r.initial_resource_versions =
            HashMap::from([("a".to_owned(), va), ("made-up".to_owned(), "1".to_owned())]);
        let resp = st.handle_request(r, &c).unwrap().unwrap();
        assert_eq!(names(&resp), ["b"], "what the wildcard gives and it lacks");
        let mut kept: Vec<&str> = st.types[T].has.keys().map(|k| &**k).collect();
        kept.sort();
        assert_eq!(kept, ["a", "b"]);
        // Later requests do the same.
        st.handle_request(req(&["late"], &[]), &c).unwrap();
        st.handle_request(req(&[], &["late", "b"]), &c).unwrap();
        let mut kept: Vec<&str> = st.types[T].has.keys().map(|k| &**k).collect();
        kept.sort();
        assert_eq!(kept, ["a", "b"]);
        assert_eq!(st.subscribed_bytes, 0);
    }

    /// A `type_url` longer than `MAX_TYPE_URL` is refused before the stream keeps it.
    #[test]
    fn a_long_type_url_is_refused() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let mut r = req(&[], &[]);
        r.type_url = "t".repeat(MAX_TYPE_URL);
        assert!(st.handle_request(r, &c).is_ok());
        let mut r = req(&[], &[]);
        r.type_url = "t".repeat(MAX_TYPE_URL + 1);
        let err = st.handle_request(r, &c).unwrap_err();
        assert!(
            matches!(
                err,
                AdsError::FieldTooLong {
                    field: "type_url",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.status().code(), tonic::Code::InvalidArgument);
        assert_eq!(st.type_urls().len(), 1);
    }

    /// The node's id, cluster and kept metadata values are bounded; the rest of the metadata
    /// is not kept.
    #[test]
    fn node_fields_are_bounded() {
        use prost_types::{Struct, Value, value::Kind};
        let node = |id: &str, node_name: &str| core::Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: [
                    ("NODE_NAME", node_name),
                    ("OTHER", &*"o".repeat(MAX_NODE_FIELD * 4)),
                ]
                .into_iter()
                .map(|(k, v)| {
                    let kind = Some(Kind::StringValue(v.into()));
                    (k.to_owned(), Value { kind })
                })
                .collect(),
            }),
            ..Default::default()
        };
        let at_limit = "n".repeat(MAX_NODE_FIELD);
        let n = Node::from_proto(&node(&at_limit, &at_limit)).unwrap();
        assert_eq!(
            (n.id.len(), n.node_name.unwrap().len()),
            (MAX_NODE_FIELD, MAX_NODE_FIELD)
        );
        let over = "n".repeat(MAX_NODE_FIELD + 1);
        for (n, field) in [
            (node(&over, "a"), "node.id"),
            (node("a", &over), "NODE_NAME"),
        ] {
            let err = Node::from_proto(&n).unwrap_err();
            assert!(
                matches!(err, AdsError::FieldTooLong { field: f, .. } if f == field),
                "{err}"
            );
            let mut st = StreamState::new(1, allow_all());
            let mut r = req(&[], &[]);
            r.node = Some(n);
            let err = st.handle_request(r, &cache()).unwrap_err();
            assert_eq!(err.status().code(), tonic::Code::InvalidArgument, "{err}");
        }
    }

    #[test]
    fn nack_counts_and_unknown_nonces_are_harmless() {
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let first = st.handle_request(req(&[], &[]), &c).unwrap().unwrap();
        let mut nack = req(&[], &[]);
        nack.response_nonce = first.nonce;
        nack.error_detail = Some(xds_proto::google::rpc::Status {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        assert!(st.handle_request(nack.clone(), &c).unwrap().is_none());
        nack.response_nonce = "nope".into();
        assert!(st.handle_request(nack, &c).unwrap().is_none());
        assert_eq!(st.nack_count(), 2);
        assert!(st.resync(&c).is_empty(), "NACKed versions are not resent");
    }

    /// A client's node id, nonce, type URL and NACK message are its own text: each goes into
    /// the warning or the ACK's debug line escaped and bounded, so no client can start a
    /// line of its own in the controller's log, or make one megabytes long.
    #[test]
    fn a_clients_text_cannot_forge_a_log_line() {
        // tracing-subscriber writes to a `File` as it is; the lines are read back from it.
        let mut out = tempfile::tempfile().unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(out.try_clone().unwrap())
            .finish();
        let forged = "x\n2026-01-01T00:00:00Z  INFO forged\r\n";
        let c = cache();
        let mut st = StreamState::new(1, allow_all());
        let mut first = req(&[], &[]);
        first.node = Some(core::Node {
            id: format!("node{forged}"),
            ..Default::default()
        });
        let reply = st.handle_request(first, &c).unwrap().unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let mut nack = req(&[], &[]);
            nack.response_nonce = reply.nonce.clone();
            nack.error_detail = Some(xds_proto::google::rpc::Status {
                code: 3,
                message: format!("bad{forged}{}", "y".repeat(100_000)),
                details: vec![],
            });
            st.handle_request(nack, &c).unwrap();
            let mut ack = req(&[], &[]);
            ack.response_nonce = format!("nonce{forged}");
            st.handle_request(ack, &c).unwrap();
        });
        let mut log = String::new();
        std::io::Seek::rewind(&mut out).unwrap();
        std::io::Read::read_to_string(&mut out, &mut log).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(
            lines.len(),
            2,
            "one line for the NACK, one for the ACK:\n{log}"
        );
        assert!(
            lines[0].contains("rejected (NACKed)") && lines[0].contains("node=\"nodex\\n2026"),
            "{}",
            &lines[0][..200]
        );
        assert!(lines[0].len() < 2_000, "the NACK's message is bounded");
        assert!(
            lines[0].contains(" detail=\"bad"),
            "quoted: {}",
            &lines[0][..200]
        );
        assert!(lines[0].contains("[truncated, 100"), "{}", &lines[0][..200]);
        assert!(
            lines[1].contains("unknown or expired nonce") && lines[1].contains("nonce=\"noncex\\n"),
            "{}",
            lines[1]
        );
    }
}
