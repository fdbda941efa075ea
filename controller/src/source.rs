//! Where the controller's Kubernetes objects come from, and the [`Store`] they land in.
//!
//! Two sources fill the same store: the Kubernetes API through kube-rs watchers
//! (`source::kube`) and a directory of YAML files (`source::files`). Whatever the source, the
//! store holds the current objects per kind, counts changes, and says when every kind has had
//! its initial list, so the controller never serves a half-loaded cluster (which would tell
//! every ztunnel that most workloads are gone).

pub mod files;
pub mod kube;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use tokio::sync::watch;

use crate::translate::{Kind, KubeObject, ObjectKey, Objects};

/// The current Kubernetes objects, shared by sources (writers) and the reconciler (reader).
/// Cheap to clone: clones share the same state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    objects: RwLock<Objects>,
    /// Kinds that have had their initial list.
    synced: RwLock<BTreeSet<Kind>>,
    /// Bumped on every effective change and on every newly synced kind.
    generation: watch::Sender<u64>,
    /// What changed since the last [`Store::read_changes`] (updated under the objects' write
    /// lock, so a reader holding the read lock sees a journal that matches the objects).
    changes: Mutex<Changes>,
}

/// Beyond this many keys, the journal just says "everything" ([`Changes::All`]).
const MAX_JOURNAL: usize = 4096;

/// Which objects changed since the last [`Store::read_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Exactly these objects were upserted or removed (nothing else changed).
    Keys(BTreeSet<(Kind, ObjectKey)>),
    /// Anything may have changed (a replace, a touch, or too many keys to track).
    All,
}

impl Changes {
    fn add(&mut self, keys: impl IntoIterator<Item = (Kind, ObjectKey)>) {
        if let Changes::Keys(set) = self {
            set.extend(keys);
            if set.len() > MAX_JOURNAL {
                *self = Changes::All;
            }
        }
    }

    /// Were only Pods upserted or removed?
    pub fn only_pods(&self) -> bool {
        matches!(self, Changes::Keys(set) if set.iter().all(|(kind, _)| *kind == Kind::Pod))
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("generation", &*self.inner.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// An empty store with no kind synced.
    pub fn new() -> Self {
        Store {
            inner: Arc::new(Inner {
                objects: RwLock::default(),
                synced: RwLock::default(),
                generation: watch::Sender::new(0),
                changes: Mutex::new(Changes::All),
            }),
        }
    }

    /// Read access to the objects (hold it briefly: writers wait).
    pub fn read(&self) -> RwLockReadGuard<'_, Objects> {
        self.inner.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Read access to the objects together with what changed since the previous call (which
    /// starts a new journal). For the one reader that translates incrementally.
    pub fn read_changes(&self) -> (RwLockReadGuard<'_, Objects>, Changes) {
        let objects = self.read();
        let mut journal = self.inner.changes.lock().unwrap_or_else(|e| e.into_inner());
        let changes = std::mem::replace(&mut *journal, Changes::Keys(BTreeSet::new()));
        (objects, changes)
    }

    /// Runs `f` on the objects; `keys` are what it touches (`None`: anything).
    fn write(&self, keys: Option<Vec<(Kind, ObjectKey)>>, f: impl FnOnce(&mut Objects) -> bool) {
        let changed = {
            let mut objects = self
                .inner
                .objects
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let changed = f(&mut objects);
            if changed {
                let mut journal = self.inner.changes.lock().unwrap_or_else(|e| e.into_inner());
                match keys {
                    Some(keys) => journal.add(keys),
                    None => *journal = Changes::All,
                }
            }
            changed
        };
        if changed {
            self.inner.generation.send_modify(|g| *g += 1);
        }
    }

    /// Counts a change without changing any object, so the reconciler runs a pass (an
    /// outcome outside the store that a status shows, e.g. a waypoint's failed apply).
    pub fn touch(&self) {
        *self.inner.changes.lock().unwrap_or_else(|e| e.into_inner()) = Changes::All;
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Inserts or replaces one object (a watch `Apply`).
    pub fn upsert(&self, object: KubeObject) {
        let key = vec![(object.kind(), object.key())];
        self.write(Some(key), |o| {
            o.upsert(object);
            true
        });
    }

    /// Removes one object (a watch `Delete`); nothing happens if it was not there.
    pub fn remove(&self, kind: Kind, key: &ObjectKey) {
        self.write(Some(vec![(kind, key.clone())]), |o| o.remove(kind, key));
    }

    /// Upserts and removes many objects as one change (one notification).
    pub fn apply(&self, upserts: Vec<KubeObject>, removals: Vec<(Kind, ObjectKey)>) {
        let keys = (upserts.len() + removals.len() <= MAX_JOURNAL).then(|| {
            let upserted = upserts.iter().map(|o| (o.kind(), o.key()));
            removals.iter().cloned().chain(upserted).collect()
        });
        self.write(keys, |o| {
            let changed = !upserts.is_empty() || !removals.is_empty();
            for (kind, key) in &removals {
                o.remove(*kind, key);
            }
            for object in upserts {
                o.upsert(object);
            }
            changed
        });
    }

    /// Replaces every object of `kind` with `objects` (a complete list: the initial list, a
    /// re-list after `410 Gone`) and marks `kind` synced.
    pub fn replace(&self, kind: Kind, objects: Vec<KubeObject>) {
        self.write(None, |o| {
            o.clear(kind);
            for object in objects.into_iter().filter(|x| x.kind() == kind) {
                o.upsert(object);
            }
            true
        });
        self.mark_synced(kind);
    }

    /// Replaces everything with `objects` and marks every kind synced (the YAML directory).
    pub fn replace_all(&self, objects: Objects) {
        self.write(None, |o| {
            *o = objects;
            true
        });
        for kind in Kind::ALL {
            self.mark_synced(kind);
        }
    }

    /// Records that `kind` has had its initial list.
    pub fn mark_synced(&self, kind: Kind) {
        let newly = self
            .inner
            .synced
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind);
        if newly {
            self.inner.generation.send_modify(|g| *g += 1);
        }
    }

    /// Has every kind in `kinds` had its initial list?
    pub fn is_synced(&self, kinds: &[Kind]) -> bool {
        let synced = self.inner.synced.read().unwrap_or_else(|e| e.into_inner());
        kinds.iter().all(|k| synced.contains(k))
    }

    /// Change notifications: the value is a counter bumped on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// The current change counter.
    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }
}

/// The CA's [`PodLocator`](crate::ca::PodLocator) over the store: a pod with identity
/// `ns/sa` runs on `node` when the store has a pod in `ns` with that service account (default
/// `default`), `spec.nodeName == node`, and it is neither finished (`Succeeded`/`Failed`) nor
/// being deleted.
#[derive(Debug, Clone)]
pub struct StorePods {
    store: Store,
}

impl StorePods {
    /// A locator reading `store`.
    pub fn new(store: Store) -> Self {
        StorePods { store }
    }
}

impl crate::ca::PodLocator for StorePods {
    fn pods_on_node(&self, node: &str, identity: &zmesh_core::identity::SpiffeId) -> bool {
        let objects = self.store.read();
        let ns = identity.namespace().to_owned();
        // Pods are keyed (namespace, name): scan only this namespace.
        objects
            .pods
            .range((ns.clone(), String::new())..)
            .take_while(|((pod_ns, _), _)| *pod_ns == ns)
            .any(|(_, pod)| {
                let Some(spec) = pod.spec.as_ref() else {
                    return false;
                };
                let sa = spec.service_account_name.as_deref().unwrap_or("default");
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                spec.node_name.as_deref() == Some(node)
                    && sa == identity.service_account()
                    && !matches!(phase, Some("Succeeded" | "Failed"))
                    && pod.metadata.deletion_timestamp.is_none()
            })
    }
}
