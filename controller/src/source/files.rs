//! The YAML directory source: every `*.yaml`, `*.yml` and `*.json` file of a directory (not
//! recursive; hidden files and editors' temporaries skipped), each a stream of Kubernetes
//! objects as `kubectl apply -f` takes them, watched for changes.
//!
//! A file that does not parse is reported (with the file, document and reason) and **its last
//! good content stays in force**: one bad edit never removes the objects it held, and the other
//! files are unaffected. A file that was never good contributes nothing. Deleting a file
//! deletes its objects. When two files define the same object, the file sorting last wins and a
//! warning names both.
//!
//! Cost: a re-read stats every file but parses only those whose size or mtime changed, and the
//! store receives only the objects of changed files ([`Delta`]), so one edited file in a
//! directory of 10k costs about as much as in a directory of ten. Only create, modify and
//! remove events of object files trigger a re-read (the source's own reads never do), and the
//! re-read runs on a blocking thread, off the async workers. A change notification names its
//! files, and only those are looked at ([`FileSource::sync_paths`]); the periodic rescan, and
//! a notification without names (or an overflowed watch), stat every file.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::Store;
use crate::translate::{Kind, KubeObject, ObjectKey, Objects, parse_yaml};

/// How long the directory must be quiet after a change before it is re-read (editors and
/// `kubectl`-style writers touch files several times in a row).
pub const SETTLE: Duration = Duration::from_millis(50);
/// Re-read everything this often even without a change notification (a missed inotify event
/// must not leave the controller stale forever).
pub const RESCAN: Duration = Duration::from_secs(30);

/// One file's last good content.
#[derive(Debug, Clone)]
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    objects: Vec<KubeObject>,
}

/// The directory source. [`FileSource::load`] reads once; [`FileSource::run`] keeps the store
/// in step with the directory.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Files whose current content is bad, with the reason (reported once per content).
    bad: BTreeMap<PathBuf, String>,
    /// Which file provides each object in force.
    origin: HashMap<(Kind, ObjectKey), PathBuf>,
}

/// What changed in the directory since the previous read.
#[derive(Debug, Default)]
pub struct Delta {
    /// Objects added or changed.
    pub upserts: Vec<KubeObject>,
    /// Objects no file defines any more.
    pub removals: Vec<(Kind, ObjectKey)>,
}

impl Delta {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// Is this a file we read?
fn is_object_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl FileSource {
    /// A source for `dir` (which must exist and be a directory).
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(dir).map_err(|e| {
            anyhow::anyhow!(
                "the config directory {} cannot be read: {e}; create it or point --config-dir \
                 at the directory holding the YAML objects",
                dir.display()
            )
        })?;
        if !meta.is_dir() {
            anyhow::bail!(
                "--config-dir {} is not a directory; give the directory that holds the YAML \
                 files",
                dir.display()
            );
        }
        Ok(FileSource {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            bad: BTreeMap::new(),
            origin: HashMap::new(),
        })
    }

    /// Re-reads the directory (files whose size and mtime did not change are not re-parsed)
    /// and returns the objects now in force. Errors are logged, never returned: a bad file
    /// keeps its last good content.
    pub fn load(&mut self) -> Objects {
        self.sync();
        self.objects()
    }

    /// Re-reads the directory like [`FileSource::load`] and returns only what changed since
    /// the previous read: the objects to upsert and the keys to remove.
    pub fn sync(&mut self) -> Delta {
        let mut seen = HashSet::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if is_object_file(&path) && path.is_file() {
                        seen.insert(path);
                    }
                }
            }
            Err(e) => {
                // Keep everything: a directory that vanished for a moment (or lost its
                // permissions) is not a reason to delete the cluster.
                error!(dir = %self.dir.display(), error = %e,
                    "cannot list the config directory; keeping the objects read before");
                return Delta::default();
            }
        }
        let mut changed: HashSet<PathBuf> = HashSet::new();
        self.files.retain(|p, _| {
            let keep = seen.contains(p);
            if !keep {
                info!(file = %p.display(), "config file removed; its objects are deleted");
                changed.insert(p.clone());
            }
            keep
        });
        self.bad.retain(|p, _| seen.contains(p));
        let mut sorted: Vec<PathBuf> = seen.into_iter().collect();
        sorted.sort();
        for path in &sorted {
            if self.read_file(path) {
                changed.insert(path.clone());
            }
        }
        if changed.is_empty() {
            return Delta::default();
        }
        self.delta(&changed)
    }

    /// Re-reads only `paths` (the files a change notification named), as [`FileSource::sync`]
    /// would treat them: a changed file is parsed, a file that is gone (or is no longer a
    /// regular file) deletes its objects, other files are not looked at. A path outside the
    /// directory re-reads the whole directory.
    pub fn sync_paths(&mut self, paths: &BTreeSet<PathBuf>) -> Delta {
        if paths.iter().any(|p| p.parent() != Some(self.dir.as_path())) {
            return self.sync();
        }
        let mut changed: HashSet<PathBuf> = HashSet::new();
        for path in paths.iter().filter(|p| is_object_file(p)) {
            if path.is_file() {
                if self.read_file(path) {
                    changed.insert(path.clone());
                }
            } else {
                self.bad.remove(path);
                if self.files.remove(path).is_some() {
                    info!(file = %path.display(), "config file removed; its objects are deleted");
                    changed.insert(path.clone());
                }
            }
        }
        if changed.is_empty() {
            return Delta::default();
        }
        self.delta(&changed)
    }

    /// Recomputes which file provides each object; objects whose provider changed or whose
    /// file changed are upserted, objects no file provides any more are removed.
    fn delta(&mut self, changed: &HashSet<PathBuf>) -> Delta {
        let mut origin: HashMap<(Kind, ObjectKey), (PathBuf, usize)> = HashMap::new();
        for (path, state) in &self.files {
            for (i, object) in state.objects.iter().enumerate() {
                let id = (object.kind(), object.key());
                if let Some((first, _)) = origin.insert(id.clone(), (path.clone(), i))
                    && (changed.contains(path) || changed.contains(&first))
                {
                    warn!(kind = ?id.0, namespace = %id.1.0, name = %id.1.1,
                        first = %first.display(), second = %path.display(),
                        "object defined in two files; the second wins");
                }
            }
        }
        let mut delta = Delta::default();
        for (id, (path, i)) in &origin {
            let moved = self.origin.get(id).is_none_or(|p| p != path);
            if moved || changed.contains(path) {
                delta.upserts.push(self.files[path].objects[*i].clone());
            }
        }
        for id in self.origin.keys() {
            if !origin.contains_key(id) {
                delta.removals.push(id.clone());
            }
        }
        self.origin = origin.into_iter().map(|(id, (p, _))| (id, p)).collect();
        delta
    }

    /// Reads one file if its size or mtime changed; true if its objects changed.
    fn read_file(&mut self, path: &Path) -> bool {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot stat config file");
                return false;
            }
        };
        let (modified, len) = (meta.modified().ok(), meta.len());
        if let Some(old) = self.files.get(path)
            && old.modified == modified
            && old.len == len
            && modified.is_some()
            && !self.bad.contains_key(path)
        {
            return false;
        }
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| parse_yaml(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(objects) => {
                if self.bad.remove(path).is_some() {
                    info!(file = %path.display(), "config file is valid again");
                }
                debug!(file = %path.display(), objects = objects.len(), "config file read");
                self.files.insert(
                    path.to_owned(),
                    FileState {
                        modified,
                        len,
                        objects,
                    },
                );
                true
            }
            Err(reason) => {
                let kept = self.files.get(path).map_or(0, |f| f.objects.len());
                if self.bad.get(path) != Some(&reason) {
                    error!(file = %path.display(), error = %reason, kept_objects = kept,
                        "config file is invalid; fix it. Its last good content (if any) stays \
                         in force");
                }
                self.bad.insert(path.to_owned(), reason);
                false
            }
        }
    }

    /// The union of every file's last good objects (a later file wins a duplicate).
    pub fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for state in self.files.values() {
            for object in &state.objects {
                out.upsert(object.clone());
            }
        }
        out
    }

    /// The files that currently fail to parse, with the reason.
    pub fn errors(&self) -> &BTreeMap<PathBuf, String> {
        &self.bad
    }

    /// Loads the directory into `store` now (marking every kind synced), then keeps it in step
    /// until the task is dropped: a change notification (settled for [`SETTLE`]) or the
    /// periodic [`RESCAN`] re-reads it.
    pub async fn run(self, store: Store) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let touched = match ev {
                Ok(ev) if ev.need_rescan() => Touched::All,
                Ok(ev) if relevant(&ev) => Touched::of(ev.paths),
                Ok(_) => return,
                // The watcher lost track: re-read everything.
                Err(_) => Touched::All,
            };
            let _ = tx.send(touched);
        })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        let (mut src, objects) = tokio::task::spawn_blocking(move || {
            let mut src = self;
            let objects = src.load();
            (src, objects)
        })
        .await?;
        info!(dir = %src.dir.display(), pods = objects.pods.len(),
            services = objects.services.len(), "config directory loaded");
        store.replace_all(objects);
        loop {
            let touched = tokio::select! {
                got = rx.recv() => {
                    let Some(mut touched) = got else {
                        anyhow::bail!("the directory watcher stopped");
                    };
                    // Settle: wait until no event for SETTLE.
                    loop {
                        match tokio::time::timeout(SETTLE, rx.recv()).await {
                            Ok(Some(more)) => touched.merge(more),
                            Ok(None) => anyhow::bail!("the directory watcher stopped"),
                            Err(_) => break,
                        }
                    }
                    touched
                }
                _ = tokio::time::sleep(RESCAN) => Touched::All,
            };
            let (back, delta, took) = tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let delta = match &touched {
                    Touched::All => src.sync(),
                    Touched::Paths(paths) => src.sync_paths(paths),
                };
                (src, delta, start.elapsed())
            })
            .await?;
            src = back;
            if !delta.is_empty() {
                let (upserts, removals) = (delta.upserts.len(), delta.removals.len());
                store.apply(delta.upserts, delta.removals);
                info!(
                    upserts,
                    removals,
                    read_ms = took.as_secs_f64() * 1e3,
                    "config directory changed"
                );
            }
        }
    }
}

/// What change notifications named since the last read.
#[derive(Debug)]
enum Touched {
    /// These files (only object files are kept).
    Paths(BTreeSet<PathBuf>),
    /// Unknown: stat every file.
    All,
}

impl Touched {
    fn of(paths: Vec<PathBuf>) -> Touched {
        if paths.is_empty() {
            return Touched::All;
        }
        Touched::Paths(paths.into_iter().filter(|p| is_object_file(p)).collect())
    }

    fn merge(&mut self, other: Touched) {
        match (&mut *self, other) {
            (Touched::Paths(mine), Touched::Paths(more)) => mine.extend(more),
            (_, _) => *self = Touched::All,
        }
    }
}

/// Does this event change the directory's objects? Creations, modifications (including
/// renames) and removals of object files do; reads (inotify `OPEN`/`ACCESS`, which this
/// source's own reads cause) and hidden temporaries do not.
fn relevant(ev: &notify::Event) -> bool {
    use notify::EventKind;
    matches!(
        ev.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    ) && (ev.paths.is_empty() || ev.paths.iter().any(|p| is_object_file(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\n";

    #[test]
    fn bad_edit_keeps_the_files_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS);
        write(dir.path(), "pod.yaml", POD);
        write(dir.path(), ".hidden.yaml", "garbage: [");
        write(dir.path(), "notes.txt", "not read");
        let mut src = FileSource::new(dir.path()).unwrap();
        let o = src.load();
        assert_eq!((o.namespaces.len(), o.pods.len()), (1, 1));
        assert!(src.errors().is_empty());

        write(
            dir.path(),
            "pod.yaml",
            "apiVersion: v1\nkind: Pod\nspec: {containers: 3}\n",
        );
        let o = src.load();
        assert_eq!(o.pods.len(), 1, "the bad edit must not delete the pod");
        let reason = &src.errors()[&dir.path().join("pod.yaml")];
        assert!(reason.contains("Pod"), "{reason}");

        write(
            dir.path(),
            "pod.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: q, namespace: a}\n",
        );
        let o = src.load();
        assert!(src.errors().is_empty());
        assert_eq!(
            o.pods.keys().cloned().collect::<Vec<_>>(),
            vec![("a".to_owned(), "q".to_owned())]
        );

        std::fs::remove_file(dir.path().join("pod.yaml")).unwrap();
        let o = src.load();
        assert!(o.pods.is_empty(), "a removed file removes its objects");
        assert_eq!(o.namespaces.len(), 1);
    }

    #[test]
    fn a_deeply_nested_file_is_refused_naming_the_limit_and_the_last_good_content_stays() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pod.yaml", POD);
        let mut src = FileSource::new(dir.path()).unwrap();
        assert_eq!(src.load().pods.len(), 1);
        // 100,000 levels cost the YAML parser minutes of CPU before it gave up.
        let deep = format!(
            "{POD}spec: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        write(dir.path(), "pod.yaml", &deep);
        let o = src.load();
        assert_eq!(o.pods.len(), 1, "the refused edit must not delete the pod");
        let reason = &src.errors()[&dir.path().join("pod.yaml")];
        assert!(reason.contains("nested more than 128 levels"), "{reason}");
    }

    #[test]
    fn a_file_never_good_contributes_nothing_and_others_load() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", NS);
        write(dir.path(), "b.yml", "kind: [");
        let mut src = FileSource::new(dir.path()).unwrap();
        let o = src.load();
        assert_eq!(o.namespaces.len(), 1);
        assert_eq!(src.errors().len(), 1);
    }

    #[test]
    fn missing_or_non_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileSource::new(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read"), "{err}");
        write(dir.path(), "f.yaml", NS);
        let err = FileSource::new(&dir.path().join("f.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[tokio::test]
    async fn run_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS);
        let store = Store::new();
        let src = FileSource::new(dir.path()).unwrap();
        let task = tokio::spawn(src.run(store.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.read().namespaces.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "initial load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.is_synced(&crate::translate::Kind::ALL));
        write(dir.path(), "pod.yaml", POD);
        while store.read().pods.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "pod added");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(dir.path().join("pod.yaml")).unwrap();
        while !store.read().pods.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "pod removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }

    #[test]
    fn sync_hands_over_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS);
        write(dir.path(), "a.yaml", POD);
        let mut src = FileSource::new(dir.path()).unwrap();
        let first = src.sync();
        assert_eq!((first.upserts.len(), first.removals.len()), (2, 0));
        assert!(
            src.sync().is_empty(),
            "nothing changed, nothing handed over"
        );

        // b.yaml sorts after a.yaml and redefines the same pod: it wins, once.
        let pod_b =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {from: b}}\n";
        write(dir.path(), "b.yaml", pod_b);
        let d = src.sync();
        assert_eq!((d.upserts.len(), d.removals.len()), (1, 0));
        assert!(
            d.upserts[0]
                .metadata()
                .labels
                .as_ref()
                .is_some_and(|l| l["from"] == "b")
        );
        // Removing b.yaml brings a.yaml's definition back; nothing is removed.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let d = src.sync();
        assert_eq!((d.upserts.len(), d.removals.len()), (1, 0));
        assert!(d.upserts[0].metadata().labels.is_none());
        // Removing a.yaml removes the pod.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let d = src.sync();
        assert_eq!(d.upserts.len(), 0);
        assert_eq!(
            d.removals,
            vec![(Kind::Pod, ("a".to_owned(), "p".to_owned()))]
        );
    }

    /// The objects, errors and deltas of a source, comparable.
    fn state(src: &FileSource) -> String {
        format!("{:?} {:?}", src.objects(), src.errors())
    }

    fn sorted(d: Delta) -> (Vec<String>, Vec<(Kind, ObjectKey)>) {
        let mut upserts: Vec<String> = d.upserts.iter().map(|o| format!("{o:?}")).collect();
        let mut removals = d.removals;
        upserts.sort();
        removals.sort();
        (upserts, removals)
    }

    #[test]
    fn reading_the_named_files_equals_reading_the_directory() {
        let pod = |name: &str, label: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: \
                 {{v: '{label}'}}}}\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS);
        write(dir.path(), "a.yaml", &pod("p", "a1"));
        write(dir.path(), "c.yaml", &pod("q", "c1"));
        let mut named = FileSource::new(dir.path()).unwrap();
        let mut full = FileSource::new(dir.path()).unwrap();
        named.sync();
        full.sync();
        // Each step: what is done to the directory, and the one file a notification names.
        type Step = (&'static str, &'static str, Box<dyn Fn(&Path)>);
        let steps: Vec<Step> = vec![
            (
                "edit",
                "a.yaml",
                Box::new(move |d: &Path| write(d, "a.yaml", &pod("p", "a2"))),
            ),
            (
                "create a duplicate that wins",
                "b.yaml",
                Box::new(move |d: &Path| write(d, "b.yaml", &pod("p", "b1"))),
            ),
            (
                "bad edit",
                "b.yaml",
                Box::new(|d: &Path| write(d, "b.yaml", "kind: [")),
            ),
            (
                "fix it",
                "b.yaml",
                Box::new(move |d: &Path| write(d, "b.yaml", &pod("q", "b2"))),
            ),
            (
                "remove a file",
                "c.yaml",
                Box::new(|d: &Path| std::fs::remove_file(d.join("c.yaml")).unwrap()),
            ),
            (
                "remove the winner",
                "b.yaml",
                Box::new(|d: &Path| std::fs::remove_file(d.join("b.yaml")).unwrap()),
            ),
            (
                "a directory with an object file's name",
                "x.yaml",
                Box::new(|d: &Path| std::fs::create_dir(d.join("x.yaml")).unwrap()),
            ),
            (
                "not an object file",
                "notes.txt",
                Box::new(|d: &Path| write(d, "notes.txt", "x")),
            ),
        ];
        for (what, file, step) in steps {
            // A file's mtime may not move within one clock tick: wait so every edit shows.
            std::thread::sleep(Duration::from_millis(20));
            step(dir.path());
            let paths = BTreeSet::from([dir.path().join(file)]);
            let (a, b) = (named.sync_paths(&paths), full.sync());
            assert_eq!(sorted(a), sorted(b), "{what}: the deltas differ");
            assert_eq!(state(&named), state(&full), "{what}");
        }
        // A path outside the directory (the directory itself) re-reads everything.
        write(dir.path(), "d.yaml", &pod("r", "d1"));
        let outside = BTreeSet::from([dir.path().to_owned()]);
        let d = named.sync_paths(&outside);
        assert_eq!(d.upserts.len(), 1);
        assert!(full.sync().upserts.len() == 1 && state(&named) == state(&full));
    }

    #[test]
    fn reads_do_not_count_as_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, EventKind};
        let ev = |kind, path: &str| notify::Event {
            kind,
            paths: vec![PathBuf::from(path)],
            attrs: Default::default(),
        };
        assert!(!relevant(&ev(
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            "/d/a.yaml"
        )));
        assert!(!relevant(&ev(
            EventKind::Create(CreateKind::File),
            "/d/.a.yaml.tmp"
        )));
        assert!(relevant(&ev(
            EventKind::Create(CreateKind::File),
            "/d/a.yaml"
        )));
    }

    #[tokio::test]
    async fn an_idle_directory_causes_no_work() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS);
        write(dir.path(), "pod.yaml", POD);
        let store = Store::new();
        let task = tokio::spawn(FileSource::new(dir.path()).unwrap().run(store.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.read().pods.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "initial load");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settled = store.generation();
        tokio::time::sleep(SETTLE * 10).await;
        assert_eq!(
            store.generation(),
            settled,
            "the source re-read a directory nobody changed"
        );
        task.abort();
    }
}
