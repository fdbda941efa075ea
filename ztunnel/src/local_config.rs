//! The local config file (`LOCAL_XDS_PATH`): loaded at start, then watched and reloaded when it
//! changes. A bad edit is logged and ignored: the last good config stays in force. Reads and
//! reloads are counted (`ztunnel_local_config_reads_total`,
//! `ztunnel_local_config_reloads_total{result}`) so an operator can see the file is read only
//! when it changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use zmesh_core::state::{LocalConfig, State};

use crate::state::Publisher;

/// Reads and validates the local-config file into a state snapshot.
pub fn load_state(path: &Path) -> anyhow::Result<State> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read LOCAL_XDS_PATH {}", path.display()))?;
    let cfg = LocalConfig::parse(&text).with_context(|| format!("in {}", path.display()))?;
    State::from_local(cfg).with_context(|| format!("in {}", path.display()))
}

/// Label of a reload: `applied` or `rejected`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Counters of the watcher.
#[derive(Clone, Default)]
pub struct Counters {
    reads: Counter,
    reloads: Family<ResultLabel, Counter>,
}

impl Counters {
    /// Registers `ztunnel_local_config_reads_total` and `ztunnel_local_config_reloads_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let c = Counters::default();
        let zt = registry.sub_registry_with_prefix("ztunnel");
        zt.register(
            "local_config_reads",
            "Reads of the local config file (LOCAL_XDS_PATH) after a change was seen",
            c.reads.clone(),
        );
        zt.register(
            "local_config_reloads",
            "Changed local config files applied or rejected",
            c.reloads.clone(),
        );
        c
    }

    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        self.reads.inc();
        std::fs::read(path).ok()
    }
}

/// Watches the file and publishes each good new version.
pub fn watch(
    path: PathBuf,
    publisher: Publisher,
    stop: CancellationToken,
    counters: Counters,
) -> anyhow::Result<()> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only changes count (not our own reads: those would wake us forever), and only
        // about our file or a ConfigMap's `..data` symlink swap; other files in the
        // directory (logs, say) must not cost a re-read each.
        let ours = ev.is_ok_and(|ev| {
            is_change(&ev.kind)
                && ev.paths.iter().any(|p| {
                    p.file_name().is_some_and(|f| {
                        Some(f) == name.as_deref() || f.to_string_lossy().starts_with("..")
                    })
                })
        });
        if ours {
            let _ = tx.send(());
        }
    })
    .context("cannot watch LOCAL_XDS_PATH")?;
    // Watch the directory: editors and Kubernetes ConfigMaps replace the file rather than
    // writing it in place.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let mut last = counters.read(&path);
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => if r.is_none() { return },
            }
            // Let a burst of events (write, rename, chmod) settle, then wait until the content
            // holds still: a file rewritten in place is briefly empty or half written, and an
            // empty file is a valid (empty) config that would wipe the state. Reads run on a
            // blocking thread: a big file must not hold up the threads that carry traffic.
            let mut now = None;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                let (c, p) = (counters.clone(), path.clone());
                let read = tokio::task::spawn_blocking(move || c.read(&p))
                    .await
                    .unwrap_or(None);
                if read == now {
                    break;
                }
                now = read;
            }
            if now == last {
                continue;
            }
            tracing::info!(path = %path.display(), bytes = now.as_ref().map(Vec::len), "local config changed; parsing it");
            // Parsing and indexing a large config takes seconds: off the runtime's threads,
            // then one pointer swap.
            let (parsed, bytes) = match tokio::task::spawn_blocking(move || {
                let parsed = parse(now.as_deref());
                (parsed, now)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => (Err(anyhow::anyhow!("the parser failed: {e}")), None),
            };
            now = bytes;
            match parsed {
                Ok(st) => {
                    counters
                        .reloads
                        .get_or_create(&ResultLabel { result: "applied" })
                        .inc();
                    tracing::info!(
                        path = %path.display(),
                        workloads = st.workloads().len(),
                        policies = st.policies().len(),
                        "local config reloaded"
                    );
                    // The publisher compares the policies and, if they changed, open inbound
                    // connections are re-checked.
                    publisher.publish(st, None);
                }
                Err(e) => {
                    counters
                        .reloads
                        .get_or_create(&ResultLabel { result: "rejected" })
                        .inc();
                    tracing::error!(path = %path.display(), error = format!("{e:#}"), "local config change rejected; keeping the previous config");
                }
            }
            last = now;
        }
    });
    Ok(())
}

/// Does a watch event say something changed (not merely that someone read the file)?
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        // Timestamps and permissions alone (a `touch`, `chmod`) do not change the config.
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        // Closing a file written to ends an in-place rewrite; opening, reading and closing
        // a file read are our own reads.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

/// Parses a new version of the file (`None`: it cannot be read) into a state snapshot.
fn parse(bytes: Option<&[u8]>) -> anyhow::Result<State> {
    match bytes {
        // Mid-rewrite, or deleted and not yet replaced: never a reason to forget every
        // workload. Clearing the config is explicit (`workloads: []`).
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Err(anyhow::anyhow!(
            "the file is empty (being rewritten?); write `workloads: []` to clear the config"
        )),
        Some(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|e| anyhow::anyhow!("not UTF-8: {e}"))?;
            Ok(State::from_local(LocalConfig::parse(text)?)?)
        }
        None => Err(anyhow::anyhow!("the file cannot be read")),
    }
}
