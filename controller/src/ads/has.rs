//! What a client has of one resource type, per stream: name → version id.
//!
//! A wildcard subscriber's first push sends it every resource of the type, exactly a cache
//! [`Snapshot`]. Its stream then remembers that snapshot (shared with the cache and with every
//! other such stream) as its *base*, and only what differs from it in an *overlay*: a name's
//! other version, or a base name the client no longer has. So proxies pushed the same
//! generation of 10k workloads share one list instead of keeping 10k names and versions each,
//! and their first push inserts nothing. A base pins the versions of its entries that the
//! cache has since replaced; once the overlay (which names each of them) outgrows a sixteenth
//! of the base, the stream moves to the cache's newest snapshot ([`Has::rebase`]), and a
//! client that still differs from that in more than half as much keeps a plain map.

use std::collections::HashMap;
use std::sync::Arc;

use super::cache::Snapshot;

/// The overlay may hold up to this share of the base (1/n) before the stream rebases.
const OVERLAY_SHARE: usize = 16;

/// A base may collect at least this many overlay names before the stream rebases, so a small
/// type does not rebase on every change.
const OVERLAY_MIN: usize = 64;

/// A map from name to version id, as a shared base plus this stream's differences.
#[derive(Debug, Default)]
pub(super) struct Has {
    base: Option<Arc<Snapshot>>,
    /// Names whose version differs from the base's (`Some`), or base names the client does
    /// not have (`None`). Names not in the base are here with `Some` too.
    overlay: HashMap<Arc<str>, Option<u64>>,
    len: usize,
}

impl FromIterator<(Arc<str>, u64)> for Has {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, u64)>>(iter: I) -> Has {
        let overlay: HashMap<Arc<str>, Option<u64>> =
            iter.into_iter().map(|(n, v)| (n, Some(v))).collect();
        Has {
            len: overlay.len(),
            base: None,
            overlay,
        }
    }
}

impl Has {
    /// Exactly the entries of `snapshot`, at their versions.
    pub(super) fn of(snapshot: Arc<Snapshot>) -> Has {
        Has {
            len: snapshot.len(),
            base: Some(snapshot),
            overlay: HashMap::new(),
        }
    }

    fn base_version(&self, name: &str) -> Option<u64> {
        (self.base.as_ref()?.find(name)).map(|e| e.version_id)
    }

    /// The version the client has of `name`.
    pub(super) fn get(&self, name: &str) -> Option<u64> {
        match self.overlay.get(name) {
            Some(version) => *version,
            None => self.base_version(name),
        }
    }

    pub(super) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that the client has `version` of `name`; returns the version it had.
    pub(super) fn insert(&mut self, name: Arc<str>, version: u64) -> Option<u64> {
        let had = self.get(&name);
        if self.base_version(&name) == Some(version) {
            self.overlay.remove(&name);
        } else {
            self.overlay.insert(name, Some(version));
        }
        if had.is_none() {
            self.len += 1;
        }
        had
    }

    /// Records that the client no longer has `name`; returns the version it had.
    pub(super) fn remove(&mut self, name: &str) -> Option<u64> {
        let had = self.get(name)?;
        match self.base.as_ref().and_then(|b| b.find(name)) {
            Some(entry) => {
                self.overlay.insert(entry.name.clone(), None);
            }
            None => {
                self.overlay.remove(name);
            }
        }
        self.len -= 1;
        Some(had)
    }

    /// Every name the client has (in no particular order).
    pub(super) fn keys(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        let base = self.base.iter().flat_map(|b| b.iter());
        let from_base = base
            .filter(|e| !matches!(self.overlay.get(&*e.name), Some(None)))
            .map(|e| &e.name);
        let only_overlay = (self.overlay.iter())
            .filter(|(n, v)| v.is_some() && self.base_version(n).is_none())
            .map(|(n, _)| n);
        from_base.chain(only_overlay)
    }

    /// Keeps only the names `keep` is true of.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let dropped: Vec<Arc<str>> = self.keys().filter(|n| !keep(n)).cloned().collect();
        for name in dropped {
            self.remove(&name);
        }
    }

    /// The name as this map holds it (shared with the cache where it came from there).
    #[cfg(test)]
    pub(super) fn key(&self, name: &str) -> Option<&Arc<str>> {
        match self.overlay.get_key_value(name) {
            Some((key, Some(_))) => Some(key),
            Some((_, None)) => None,
            None => self.base.as_ref()?.find(name).map(|e| &e.name),
        }
    }

    /// Whether the overlay has outgrown its share of the base (see [`Has::rebase`]).
    pub(super) fn wants_rebase(&self) -> bool {
        self.overlay.len() > self.overlay_max()
    }

    /// The overlay's share of the base (none without a base).
    fn overlay_max(&self) -> usize {
        match &self.base {
            Some(base) => OVERLAY_MIN.max(base.len() / OVERLAY_SHARE),
            None => usize::MAX,
        }
    }

    /// The same map on `newest` (the cache's current snapshot of the type): the overlay keeps
    /// only what differs from it, so a stream that has kept up with the cache drops its
    /// overlay. If the client still differs from `newest` in more than half the overlay's
    /// share (it would soon rebase again), the map becomes a plain one (no base).
    pub(super) fn rebase(&mut self, newest: Arc<Snapshot>) {
        let mut overlay = HashMap::new();
        for entry in newest.iter() {
            let had = self.get(&entry.name);
            if had != Some(entry.version_id) {
                overlay.insert(entry.name.clone(), had);
            }
        }
        for name in self.keys() {
            if newest.find(name).is_none() {
                overlay.insert(name.clone(), self.get(name));
            }
        }
        let rebased = Has {
            base: Some(newest),
            overlay,
            len: self.len,
        };
        *self = if rebased.overlay.len() > rebased.overlay_max() / 2 {
            let plain: Has = (rebased.keys())
                .map(|n| (n.clone(), rebased.get(n).unwrap_or_default()))
                .collect();
            plain
        } else {
            rebased
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::Cache;
    use proptest::prelude::*;
    use prost_types::Any;
    use std::collections::BTreeMap;

    fn any(v: u8) -> Any {
        Any {
            type_url: "t".into(),
            value: vec![v],
        }
    }

    /// The map's contents, sorted, checked against its own `len` and `get`.
    fn contents(has: &Has) -> BTreeMap<String, u64> {
        let out: BTreeMap<String, u64> = has
            .keys()
            .map(|n| (n.to_string(), has.get(n).expect("a key has a version")))
            .collect();
        assert_eq!(out.len(), has.len(), "no name twice, len kept");
        assert_eq!(has.keys().count(), has.len());
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A version of `name`: the one the cache has now (`None`) or another.
        Insert(u8, Option<u64>),
        Remove(u8),
        Retain(u8),
        /// Change the cache (set `name` to a value, or remove it), then rebase on it.
        Rebase(u8, Option<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..40u8, proptest::option::of(0..3u64)).prop_map(|(n, v)| Op::Insert(n, v)),
            (0..40u8).prop_map(Op::Remove),
            (2..5u8).prop_map(Op::Retain),
            (0..40u8, proptest::option::of(0..3u8)).prop_map(|(n, v)| Op::Rebase(n, v)),
        ]
    }

    proptest! {
        /// Whatever the base, the overlay and the rebases, the map behaves as a plain map.
        #[test]
        fn behaves_as_a_plain_map(
            initial in proptest::collection::vec(0..3u8, 30),
            ops in proptest::collection::vec(op(), 0..120),
        ) {
            let cache = Cache::new();
            let upserts = (initial.iter().enumerate())
                .map(|(i, v)| (format!("n{i}"), any(*v)))
                .collect();
            cache.apply("t", upserts, vec![]).unwrap();
            let snapshot = cache.sorted_entries("t");
            let mut model: BTreeMap<String, u64> = snapshot
                .iter()
                .map(|e| (e.name.to_string(), e.version_id))
                .collect();
            let mut has = Has::of(snapshot);
            for op in ops {
                match op {
                    Op::Insert(n, v) => {
                        let name = format!("n{n}");
                        let cached = cache.get("t", &name).map(|e| e.version_id);
                        let version = v.or(cached).unwrap_or(7);
                        let had = has.insert(Arc::from(name.as_str()), version);
                        prop_assert_eq!(had, model.insert(name, version));
                    }
                    Op::Remove(n) => {
                        let name = format!("n{n}");
                        prop_assert_eq!(has.remove(&name), model.remove(&name));
                    }
                    Op::Retain(k) => {
                        let keep = |n: &str| !(n.bytes().map(u32::from).sum::<u32>()).is_multiple_of(u32::from(k));
                        has.retain(keep);
                        model.retain(|n, _| keep(n));
                    }
                    Op::Rebase(n, v) => {
                        let name = format!("n{n}");
                        match v {
                            Some(v) => cache.apply("t", vec![(name, any(v))], vec![]),
                            None => cache.apply("t", vec![], vec![name]),
                        }
                        .unwrap();
                        has.rebase(cache.sorted_entries("t"));
                    }
                }
                prop_assert_eq!(&contents(&has), &model);
                for n in 0..40u8 {
                    let name = format!("n{n}");
                    prop_assert_eq!(has.get(&name), model.get(&name).copied());
                }
            }
        }
    }

    /// A cache of 100 names, and a map of them as a first push leaves it.
    fn hundred() -> (Cache, Has) {
        let cache = Cache::new();
        let upserts = (0..100).map(|i| (format!("n{i:03}"), any(0))).collect();
        cache.apply("t", upserts, vec![]).unwrap();
        let has = Has::of(cache.sorted_entries("t"));
        (cache, has)
    }

    #[test]
    fn a_stream_that_keeps_up_with_the_cache_rebases_to_an_empty_overlay() {
        let (cache, mut has) = hundred();
        // The cache changes 70 names, one at a time, and the client is sent each change.
        for i in 0..70 {
            let name = format!("n{i:03}");
            cache
                .apply("t", vec![(name.clone(), any(1))], vec![])
                .unwrap();
            let entry = cache.get("t", &name).unwrap();
            has.insert(entry.name.clone(), entry.version_id);
            if has.wants_rebase() {
                has.rebase(cache.sorted_entries("t"));
            }
        }
        // The 65th change made the overlay outgrow its minimum: rebased, and emptied; the
        // five changes after it are all it holds.
        assert!(has.base.is_some(), "still on a base");
        assert_eq!(has.overlay.len(), 70 - (OVERLAY_MIN + 1));
        let cached: BTreeMap<String, u64> = (cache.sorted_entries("t").iter())
            .map(|e| (e.name.to_string(), e.version_id))
            .collect();
        assert_eq!(contents(&has), cached);
    }

    #[test]
    fn a_client_far_from_the_cache_gets_a_plain_map() {
        let (cache, mut has) = hundred();
        // The client drops 80 names the cache keeps.
        for i in 0..80 {
            has.remove(&format!("n{i:03}"));
        }
        assert!(has.wants_rebase());
        has.rebase(cache.sorted_entries("t"));
        assert!(has.base.is_none(), "plain map");
        assert_eq!(has.len(), 20);
        assert_eq!(
            has.get("n090"),
            cache.get("t", "n090").map(|e| e.version_id)
        );
    }
}
