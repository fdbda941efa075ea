//! The resource cache behind the delta ADS server.
//!
//! The cache holds, per type URL, a map from resource name to `(version, Any)`. Versions are
//! assigned by the cache from a hash of the encoded resource, so upserting an unchanged resource
//! is a no-op: nothing is recorded as changed and no stream pushes anything.
//!
//! Each entry is encoded once, when its version is stored, as the `resources` field of a
//! `DeltaDiscoveryResponse` ([`Entry::encoded`]); every stream sends those shared bytes, so a
//! push to many streams neither copies nor re-encodes a resource per stream.
//!
//! Every effective change is broadcast as a [`Change`] (type URL + the names that changed, both
//! upserts and removals). Streams re-read the cache for exactly those names. **Debouncing is the
//! caller's business**: every call to [`Cache::apply`] that changes something is one
//! notification, so a producer that sees bursts (e.g. a Kubernetes watch after a restart) should
//! batch them into one `apply` per type.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use prost::Message;
use prost_types::Any;
use tokio::sync::broadcast;
use xds_proto::envoy::service::discovery::v3::Resource;

use super::AdsError;

/// How many change notifications a slow stream may fall behind before it resynchronises
/// everything it is subscribed to (see [`broadcast::error::RecvError::Lagged`]).
const CHANGE_CHANNEL_CAPACITY: usize = 1024;

/// Field number of `resources` in `envoy.service.discovery.v3.DeltaDiscoveryResponse`.
pub(crate) const RESOURCES_FIELD: u32 = 2;

/// One cached resource: its name, its cache-assigned version, the resource itself, and its
/// encoding as sent to every stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The resource name (shared with the cache's index and the streams' bookkeeping).
    pub name: Arc<str>,
    /// The version as a number (what streams remember; see [`version_id`]); its text is
    /// [`Entry::version`].
    pub version_id: u64,
    /// The resource, packed as `google.protobuf.Any`.
    pub resource: Any,
    /// `Resource { name, version, resource }` encoded as one `resources` field (tag and length
    /// included) of a `DeltaDiscoveryResponse`: appended as is to every response carrying it.
    pub encoded: Bytes,
}

impl Entry {
    fn new(name: Arc<str>, resource: Any) -> Entry {
        let version_id = version_hash(&resource);
        let proto = Resource {
            name: name.to_string(),
            version: version_text(version_id),
            resource: Some(resource),
            ..Default::default()
        };
        let mut buf = Vec::with_capacity(proto.encoded_len() + 8);
        prost::encoding::message::encode(RESOURCES_FIELD, &proto, &mut buf);
        Entry {
            name,
            version_id,
            resource: proto.resource.unwrap_or_default(),
            encoded: Bytes::from(buf),
        }
    }

    /// The version string sent with the resource (hex hash of the encoded resource).
    pub fn version(&self) -> String {
        version_text(self.version_id)
    }

    /// The entry as the protobuf `Resource` it is sent as (copies it; for tests and tools).
    pub fn to_proto(&self) -> Resource {
        Resource {
            name: self.name.to_string(),
            version: self.version(),
            resource: Some(self.resource.clone()),
            ..Default::default()
        }
    }
}

/// The numeric form of a version string: cache versions are 16 lowercase hex digits, read back
/// exactly; anything else (a version another server gave the client) is [`UNKNOWN_VERSION`],
/// which no cache entry has.
pub fn version_id(version: &str) -> u64 {
    let ours = version.len() == 16
        && version
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ours {
        return UNKNOWN_VERSION;
    }
    u64::from_str_radix(version, 16).unwrap_or(UNKNOWN_VERSION)
}

/// The version id no cache entry has (see [`version_id`]).
pub const UNKNOWN_VERSION: u64 = u64::MAX;

/// What one effective [`Cache::apply`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Type URL of the changed resources.
    pub type_url: String,
    /// Names that were added, updated or removed (sorted, no duplicates).
    pub names: Vec<String>,
}

#[derive(Default)]
struct Inner {
    /// Entries are shared with the streams that read them, so a read copies no resource.
    types: HashMap<String, HashMap<Arc<str>, Arc<Entry>>>,
    /// Incremented on every effective change; sent as `system_version_info` (debugging only).
    generation: u64,
}

/// A shared, versioned resource cache. Cheap to clone (all clones share the same state).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<RwLock<Inner>>,
    changes: broadcast::Sender<Arc<Change>>,
    /// False until the producer has filled the cache once ([`Cache::not_ready`]); streams do
    /// not answer before, so no proxy mistakes a controller that is still loading for an
    /// empty cluster.
    ready: Arc<tokio::sync::watch::Sender<bool>>,
    /// Per type, its entries sorted by name, as of a generation ([`Cache::sorted_entries`]).
    sorted: Arc<Mutex<SortedEntries>>,
}

/// Per type: the generation its snapshot was built at, the snapshot, and (once a stream has
/// sent the whole type) the snapshot's entries encoded as one buffer.
type SortedEntries = HashMap<String, (u64, Arc<Snapshot>, Option<Bytes>)>;

/// Every entry of one type as of one cache generation, sorted by name
/// ([`Cache::sorted_entries`]). Shared by every stream that is sent the whole type or
/// remembers having it, so a wildcard subscriber's first push copies no list.
#[derive(Debug, Default)]
pub struct Snapshot {
    entries: Box<[Arc<Entry>]>,
}

impl Snapshot {
    /// The entry named `name`.
    pub fn find(&self, name: &str) -> Option<&Arc<Entry>> {
        (self.entries.binary_search_by(|e| (*e.name).cmp(name)).ok()).map(|i| &self.entries[i])
    }

    /// Every entry's [`Entry::encoded`], in order, in one buffer.
    fn join(&self) -> Bytes {
        let len = self.entries.iter().map(|e| e.encoded.len()).sum();
        let mut buf = Vec::with_capacity(len);
        for e in self.entries.iter() {
            buf.extend_from_slice(&e.encoded);
        }
        Bytes::from(buf)
    }
}

impl std::ops::Deref for Snapshot {
    type Target = [Arc<Entry>];

    fn deref(&self) -> &[Arc<Entry>] {
        &self.entries
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.read();
        f.debug_struct("Cache")
            .field("generation", &inner.generation)
            .field("types", &inner.types.len())
            .finish()
    }
}

/// Version of a resource: a hash of its type URL and encoded bytes, as 16 hex digits.
///
/// `DefaultHasher::new()` uses fixed keys, so the version is stable for a given build, which
/// lets a client that reconnects to a restarted controller skip unchanged resources.
pub fn version_of(resource: &Any) -> String {
    version_text(version_hash(resource))
}

/// A version id as its string: 16 lowercase hex digits (what [`version_id`] reads back).
fn version_text(id: u64) -> String {
    format!("{id:016x}")
}

/// The hash behind [`version_of`]; never [`UNKNOWN_VERSION`].
fn version_hash(resource: &Any) -> u64 {
    let mut h = DefaultHasher::new();
    resource.type_url.hash(&mut h);
    resource.value.hash(&mut h);
    h.finish().min(UNKNOWN_VERSION - 1)
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Self {
            inner: Arc::new(RwLock::new(Inner::default())),
            changes,
            ready: Arc::new(tokio::sync::watch::Sender::new(true)),
            sorted: Arc::default(),
        }
    }

    /// An empty cache that is not ready: streams wait (see [`Cache::ready`]) until
    /// [`Cache::mark_ready`] says it holds the complete state once.
    pub fn not_ready() -> Self {
        let cache = Self::new();
        cache.ready.send_replace(false);
        cache
    }

    /// Declares the cache complete (idempotent).
    pub fn mark_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Is the cache ready (see [`Cache::not_ready`])?
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the cache is ready; false if it did not become ready within `limit`.
    pub async fn ready(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole controller, so recover from poisoning.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts/updates `upserts` and deletes `removals` for `type_url`, then notifies the
    /// subscribers of the names that really changed (nothing if none did).
    ///
    /// Returns the changed names. Fails, changing nothing, when a resource's `Any.type_url`
    /// differs from `type_url`.
    pub fn apply(
        &self,
        type_url: &str,
        upserts: Vec<(String, Any)>,
        removals: Vec<String>,
    ) -> Result<Vec<String>, AdsError> {
        if let Some((name, any)) = upserts.iter().find(|(_, a)| a.type_url != type_url) {
            return Err(AdsError::TypeMismatch {
                type_url: type_url.to_owned(),
                name: name.clone(),
                found: any.type_url.clone(),
            });
        }
        let mut changed = BTreeSet::new();
        {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            let map = inner.types.entry(type_url.to_owned()).or_default();
            for (name, resource) in upserts {
                let version = version_hash(&resource);
                if map
                    .get(name.as_str())
                    .is_some_and(|e| e.version_id == version)
                {
                    continue;
                }
                let key: Arc<str> = Arc::from(name.as_str());
                map.insert(key.clone(), Arc::new(Entry::new(key, resource)));
                changed.insert(name);
            }
            for name in removals {
                if map.remove(name.as_str()).is_some() {
                    changed.insert(name);
                }
            }
            if !changed.is_empty() {
                inner.generation += 1;
            }
        }
        let names: Vec<String> = changed.into_iter().collect();
        if !names.is_empty() {
            // No receivers is fine: nobody is connected.
            let _ = self.changes.send(Arc::new(Change {
                type_url: type_url.to_owned(),
                names: names.clone(),
            }));
        }
        Ok(names)
    }

    /// The resource `name` of `type_url`, if cached (shared, not copied).
    pub fn get(&self, type_url: &str, name: &str) -> Option<Arc<Entry>> {
        self.read().types.get(type_url)?.get(name).cloned()
    }

    /// All resource names of `type_url` (sorted).
    pub fn names(&self, type_url: &str) -> Vec<String> {
        let inner = self.read();
        let mut names: Vec<String> = inner
            .types
            .get(type_url)
            .map(|m| m.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Every entry of `type_url`, sorted by name: built once per cache generation and shared
    /// by every stream that needs the whole type (a wildcard subscription, a resync).
    pub(crate) fn sorted_entries(&self, type_url: &str) -> Arc<Snapshot> {
        let inner = self.read();
        let mut memo = self.sorted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, entries, _)) = memo.get(type_url)
            && *generation == inner.generation
        {
            return entries.clone();
        }
        let mut entries: Vec<Arc<Entry>> = inner
            .types
            .get(type_url)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let entries = Arc::new(Snapshot {
            entries: entries.into_boxed_slice(),
        });
        memo.insert(
            type_url.to_owned(),
            (inner.generation, entries.clone(), None),
        );
        entries
    }

    /// The `resources` fields of a response carrying all of `snapshot`, in one buffer: every
    /// entry's [`Entry::encoded`] in order. Joined once for the newest snapshot of a type and
    /// shared by every stream that sends it, until the next snapshot of the type replaces it;
    /// an older snapshot's is joined for the caller alone. The join runs outside the memo's
    /// lock, so no stream waits on it for a copy of the whole type.
    pub(crate) fn encoded(&self, type_url: &str, snapshot: &Arc<Snapshot>) -> Bytes {
        let memo = || self.sorted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, newest, Some(encoded))) = memo().get(type_url)
            && Arc::ptr_eq(newest, snapshot)
        {
            return encoded.clone();
        }
        let joined = snapshot.join();
        match memo().get_mut(type_url) {
            Some((_, newest, encoded)) if Arc::ptr_eq(newest, snapshot) => {
                encoded.get_or_insert(joined).clone()
            }
            _ => joined,
        }
    }

    /// The entries of `names` (in order; `None` where absent), under one read of the cache.
    pub(crate) fn get_many<'a>(
        &self,
        type_url: &str,
        names: impl IntoIterator<Item = &'a Arc<str>>,
    ) -> Vec<Option<Arc<Entry>>> {
        let inner = self.read();
        let map = inner.types.get(type_url);
        names
            .into_iter()
            .map(|n| map.and_then(|m| m.get(&**n)).cloned())
            .collect()
    }

    /// Counter of effective changes since the cache was created.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Subscribes to change notifications (only changes after this call are seen).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: v.to_vec(),
        }
    }

    #[test]
    fn unchanged_upsert_is_a_no_op() {
        let c = Cache::new();
        let mut rx = c.subscribe();
        assert_eq!(
            c.apply("t", vec![("a".into(), any(b"1"))], vec![]).unwrap(),
            ["a"]
        );
        assert_eq!(rx.try_recv().unwrap().names, ["a"]);
        assert!(
            c.apply("t", vec![("a".into(), any(b"1"))], vec![])
                .unwrap()
                .is_empty()
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(c.generation(), 1);
        assert!(c.apply("t", vec![], vec!["zz".into()]).unwrap().is_empty());
        assert_eq!(c.apply("t", vec![], vec!["a".into()]).unwrap(), ["a"]);
        assert!(c.get("t", "a").is_none());
    }

    #[test]
    fn type_mismatch_is_rejected() {
        let c = Cache::new();
        let err = c
            .apply("other", vec![("a".into(), any(b"1"))], vec![])
            .unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
        assert!(c.names("other").is_empty());
    }

    #[test]
    fn entry_encoding_is_the_resource_as_a_response_field() {
        use prost::Message;
        use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
        let c = Cache::new();
        c.apply("t", vec![("a".into(), any(b"1"))], vec![]).unwrap();
        let e = c.get("t", "a").unwrap();
        let decoded = DeltaDiscoveryResponse::decode(e.encoded.clone()).unwrap();
        assert_eq!(decoded.resources, [e.to_proto()]);
        assert_eq!(decoded.resources[0].name, "a");
        assert_eq!(decoded.resources[0].version, version_of(&any(b"1")));
        assert_eq!(version_id(&e.version()), e.version_id);
    }

    #[test]
    fn the_sorted_entries_follow_every_change() {
        let c = Cache::new();
        let names = |c: &Cache| -> Vec<String> {
            c.sorted_entries("t")
                .iter()
                .map(|e| e.name.to_string())
                .collect()
        };
        assert!(names(&c).is_empty());
        c.apply(
            "t",
            vec![("b".into(), any(b"1")), ("a".into(), any(b"2"))],
            vec![],
        )
        .unwrap();
        assert_eq!(names(&c), ["a", "b"]);
        c.apply("t", vec![("c".into(), any(b"3"))], vec!["a".into()])
            .unwrap();
        assert_eq!(names(&c), ["b", "c"]);
        c.apply("t", vec![("b".into(), any(b"4"))], vec![]).unwrap();
        assert_eq!(c.sorted_entries("t")[0].resource.value, b"4");
    }

    #[test]
    fn foreign_versions_never_match_an_entry() {
        assert_eq!(version_id("1"), UNKNOWN_VERSION);
        assert_eq!(version_id("00000000000000AB"), UNKNOWN_VERSION);
        assert_eq!(version_id("00000000000000ab"), 0xab);
        assert_eq!(version_id("ffffffffffffffff"), UNKNOWN_VERSION);
    }
}
