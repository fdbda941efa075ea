//! Where the agent's pod and namespace facts come from: the [`PodSource`] trait, a directory
//! of YAML watched for changes ([`DirSource`]), and a source set by hand ([`StaticSource`],
//! for tests). The Kubernetes API watch will be another implementation of the same trait.
//!
//! A source publishes whole [`Cluster`] snapshots through a `tokio::sync::watch` channel:
//! readers always see one consistent snapshot, and a reader that cares about changes (label
//! flips) compares the snapshot it last handled with the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::cluster::{self, Cluster, LoadError};

/// How long the directory must be quiet after a change before it is read again (editors and
/// `kubectl cp` write in several steps).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// A supplier of [`Cluster`] snapshots.
pub trait PodSource: Send + Sync + 'static {
    /// The latest snapshot.
    fn current(&self) -> Arc<Cluster> {
        self.subscribe().borrow().clone()
    }

    /// A receiver that sees every new snapshot (starting with the current one, marked seen).
    fn subscribe(&self) -> watch::Receiver<Arc<Cluster>>;
}

/// A source whose snapshot the owner sets ([`StaticSource::set`]).
#[derive(Debug, Clone)]
pub struct StaticSource {
    tx: Arc<watch::Sender<Arc<Cluster>>>,
}

impl StaticSource {
    /// A source that starts with `cluster`.
    pub fn new(cluster: Cluster) -> StaticSource {
        StaticSource {
            tx: Arc::new(watch::Sender::new(Arc::new(cluster))),
        }
    }

    /// Publishes a new snapshot.
    pub fn set(&self, cluster: Cluster) {
        self.tx.send_replace(Arc::new(cluster));
    }
}

impl PodSource for StaticSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        self.tx.subscribe()
    }
}

/// Why a [`DirSource`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The first read of the directory failed.
    #[error("cannot load the pods directory: {0}")]
    Load(#[from] LoadError),
    /// The directory cannot be watched.
    #[error(
        "cannot watch the pods directory {}: {source} (check fs.inotify.max_user_watches and \
         that the directory exists)",
        dir.display()
    )]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// A directory of Kubernetes YAML ([`cluster::load_dir`]), read again whenever it changes.
/// An invalid directory is logged (file and document named) and the last good snapshot
/// stays current. Stops watching when dropped.
pub struct DirSource {
    tx: Arc<watch::Sender<Arc<Cluster>>>,
    last_error: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for DirSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSource").finish_non_exhaustive()
    }
}

impl DirSource {
    /// Loads `dir` (which must be valid now) and starts watching it. Must be called inside a
    /// tokio runtime.
    pub fn start(dir: &Path, debounce: Duration) -> Result<DirSource, SourceError> {
        let first = cluster::load_dir(dir)?;
        info!(
            dir = %dir.display(),
            pods = first.pods().count(),
            namespaces = first.namespaces().count(),
            "loaded the pods directory"
        );
        let tx = Arc::new(watch::Sender::new(Arc::new(first)));
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Only changes count: notify also reports opens and reads (ours, and every other
                // agent's reading the same directory), which would keep reloading it forever.
                if let Ok(ev) = &event
                    && matches!(
                        ev.kind,
                        notify::EventKind::Access(_) | notify::EventKind::Other
                    )
                {
                    return;
                }
                // The receiver goes away only when the source is dropped.
                let _ = events_tx.send(event);
            })
            .map_err(|source| SourceError::Watch {
                dir: dir.to_owned(),
                source,
            })?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| SourceError::Watch {
                dir: dir.to_owned(),
                source,
            })?;
        let last_error = Arc::new(Mutex::new(None));
        let task = tokio::spawn(watch_loop(
            dir.to_owned(),
            debounce,
            watcher,
            events,
            tx.clone(),
            last_error.clone(),
        ));
        Ok(DirSource {
            tx,
            last_error,
            task,
        })
    }

    /// Why the last reload failed, if it did (cleared by the next good one).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for DirSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodSource for DirSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        self.tx.subscribe()
    }
}

async fn watch_loop(
    dir: PathBuf,
    debounce: Duration,
    watcher: notify::RecommendedWatcher,
    mut events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    tx: Arc<watch::Sender<Arc<Cluster>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    // Owned here so that the watch lives as long as this task.
    let _watcher = watcher;
    while let Some(event) = events.recv().await {
        if let Err(e) = event {
            warn!(dir = %dir.display(), "error watching the pods directory: {e}");
        }
        // Debounce: wait until nothing happened for `debounce`.
        loop {
            match tokio::time::timeout(debounce, events.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let loaded = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || cluster::load_dir(&dir)
        })
        .await;
        let mut error = last_error.lock().unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Ok(Ok(new)) => {
                *error = None;
                let changed = tx.send_if_modified(|current| {
                    if **current == new {
                        return false;
                    }
                    *current = Arc::new(new);
                    true
                });
                if changed {
                    info!(dir = %dir.display(), "the pods directory changed");
                }
            }
            Ok(Err(e)) => {
                warn!("keeping the last good pods and namespaces: {e}");
                *error = Some(e.to_string());
            }
            Err(e) => warn!("reading the pods directory panicked: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n";
    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";

    async fn changed(rx: &mut watch::Receiver<Arc<Cluster>>) -> Arc<Cluster> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a new snapshot within 10 s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pods.yaml"), POD).unwrap();
        let source = DirSource::start(dir.path(), Duration::from_millis(50)).unwrap();
        let mut rx = source.subscribe();
        assert!(source.current().pod("shop", "web").is_some());
        assert!(source.current().namespace("shop").is_none());

        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        let c = changed(&mut rx).await;
        assert!(c.namespace("shop").is_some());

        // An invalid file: the error names it, the last good snapshot stays.
        std::fs::write(
            dir.path().join("ns.yaml"),
            "kind: Namespace\napiVersion: v1\n",
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while source.last_error().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "no error reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(source.last_error().unwrap().contains("ns.yaml, document 1"));
        assert!(source.current().namespace("shop").is_some());

        std::fs::remove_file(dir.path().join("ns.yaml")).unwrap();
        let c = changed(&mut rx).await;
        assert!(c.namespace("shop").is_none());
        assert!(source.last_error().is_none());
    }

    #[tokio::test]
    async fn an_invalid_directory_does_not_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: Pod\napiVersion: v1\n").unwrap();
        let err = DirSource::start(dir.path(), DEFAULT_DEBOUNCE).unwrap_err();
        assert!(err.to_string().contains("bad.yaml, document 1"), "{err}");
    }

    #[test]
    fn static_source_publishes() {
        let s = StaticSource::new(Cluster::default());
        let rx = s.subscribe();
        s.set(cluster::parse_text(Path::new("x"), POD).unwrap());
        assert!(rx.has_changed().unwrap());
        assert!(s.current().pod("shop", "web").is_some());
    }
}
