//! Keeping our entry chained while other components rewrite the conf dir.
//!
//! The primary CNI may rewrite or replace its file at any time (an upgrade, its agent
//! restarting) and another installer may delete foreign configs (Cilium with
//! `cni.exclusive=true`). [`watch_and_repair`] watches the conf dir with inotify and, after a
//! short debounce, runs [`chain`] again: a no-op when our entry is still in the file a
//! runtime loads, a repair otherwise (including when a new primary that sorts first appears).
//! A periodic resync covers missed events. Repairs are counted in [`RepairStats`]; more than
//! `fight_threshold` of them within `fight_window` log a warning naming the likely cause.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{ChainChange, InstallError, chain};

/// Timings of [`watch_and_repair`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet time after a change before re-checking, so a file written in several steps is
    /// read once complete.
    pub debounce: Duration,
    /// Re-check this often even without events.
    pub resync: Duration,
    /// Window over which repairs are counted for the fight warning.
    pub fight_window: Duration,
    /// More repairs than this within `fight_window` log a warning.
    pub fight_threshold: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(30),
            fight_window: Duration::from_secs(60),
            fight_threshold: 5,
        }
    }
}

/// Counters of a running [`watch_and_repair`], shared with whoever started it (readiness,
/// metrics, tests).
#[derive(Debug, Clone, Default)]
pub struct RepairStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    repairs: AtomicU64,
    fight_warnings: AtomicU64,
    errors: AtomicU64,
    /// Why the last check could not chain our entry (cleared by the next success).
    last_error: Mutex<Option<String>>,
}

impl RepairStats {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Times our entry had to be written again after the initial install.
    pub fn repairs(&self) -> u64 {
        self.0.repairs.load(Ordering::Relaxed)
    }

    /// Times the "someone keeps removing our entry" warning was logged.
    pub fn fight_warnings(&self) -> u64 {
        self.0.fight_warnings.load(Ordering::Relaxed)
    }

    /// Checks that failed for another reason than "no primary config yet".
    pub fn errors(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }

    /// Why the last check could not chain our entry (it could not write the file, the file
    /// does not parse, ...); `None` after a check that succeeded or found no config at all.
    pub fn last_error(&self) -> Option<String> {
        self.0
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.0.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

/// Chains `entry` into `conf_dir` now and again whenever it goes missing, until `stop` turns
/// `true` or its sender is dropped. Fails only if the directory cannot be watched; chaining
/// errors are logged and retried on the next change or resync.
pub async fn watch_and_repair(
    conf_dir: PathBuf,
    entry: Value,
    options: WatchOptions,
    stats: RepairStats,
    mut stop: watch::Receiver<bool>,
) -> Result<(), InstallError> {
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // Any event or watcher error means "look again".
        let _ = tx.send(());
    })
    .map_err(|source| InstallError::Watch {
        dir: conf_dir.clone(),
        source,
    })?;
    watcher
        .watch(&conf_dir, RecursiveMode::NonRecursive)
        .map_err(|source| InstallError::Watch {
            dir: conf_dir.clone(),
            source,
        })?;

    let mut fights = FightDetector::new(&options);
    let mut resync = tokio::time::interval(options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    // Until the first success there is nothing to repair: changes are the initial install.
    let mut installed = false;
    loop {
        match check(&conf_dir, &entry, &stats).await {
            Some(ChainChange::Unchanged { .. }) => installed = true,
            Some(change) if !installed => {
                installed = true;
                tracing::info!(?change, "chained zmesh-cni into the primary CNI config");
            }
            Some(change) => repaired(&change, &stats, &mut fights),
            None => {}
        }
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            event = events.recv() => {
                if event.is_none() {
                    break;
                }
                tokio::time::sleep(options.debounce).await;
                while events.try_recv().is_ok() {}
            }
            _ = resync.tick() => {}
        }
    }
    drop(watcher);
    Ok(())
}

/// Resolves once `stop` is `true` or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The returned guard is not `Send`: drop it here, not across the `select!`.
    let _ = stop.wait_for(|stopped| *stopped).await.map(drop);
}

/// Runs [`chain`] once off the async threads; logs and counts failures.
async fn check(conf_dir: &Path, entry: &Value, stats: &RepairStats) -> Option<ChainChange> {
    let (dir, value) = (conf_dir.to_owned(), entry.clone());
    let result = match tokio::task::spawn_blocking(move || chain(&dir, value)).await {
        Ok(result) => result,
        Err(join) => {
            tracing::error!(error = %join, "CNI config check panicked");
            stats.0.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    match result {
        Ok(change) => {
            stats.set_last_error(None);
            Some(change)
        }
        Err(error @ InstallError::NoPrimary { .. }) => {
            stats.set_last_error(None);
            tracing::info!(%error, "waiting for the primary CNI config");
            None
        }
        Err(error) => {
            stats.set_last_error(Some(error.to_string()));
            stats.0.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "cannot chain zmesh-cni; retrying on the next change");
            None
        }
    }
}

/// Accounts for a repair and warns when they come too often.
fn repaired(change: &ChainChange, stats: &RepairStats, fights: &mut FightDetector) {
    stats.0.repairs.fetch_add(1, Ordering::Relaxed);
    tracing::info!(?change, "zmesh-cni entry was missing: chained it again");
    let Some(count) = fights.record(Instant::now()) else {
        return;
    };
    stats.0.fight_warnings.fetch_add(1, Ordering::Relaxed);
    let file = match change {
        ChainChange::Appended { path, .. } | ChainChange::Unchanged { path } => path,
        ChainChange::Wrapped { to, .. } => to,
    };
    tracing::warn!(
        file = %file.display(),
        repairs = count,
        window_s = fights.window.as_secs(),
        "our CNI entry keeps being removed: another installer is rewriting this file (e.g. \
         Cilium with cni.exclusive=true deletes foreign CNI configs: set it to false), or the \
         primary CNI's agent regenerates it in a loop"
    );
}

/// Counts repairs in a sliding window and says when to warn (at most once per window).
struct FightDetector {
    window: Duration,
    threshold: usize,
    recent: VecDeque<Instant>,
    last_warning: Option<Instant>,
}

impl FightDetector {
    fn new(options: &WatchOptions) -> Self {
        Self {
            window: options.fight_window,
            threshold: options.fight_threshold,
            recent: VecDeque::new(),
            last_warning: None,
        }
    }

    /// Records a repair at `now`; returns the count in the window when a warning is due.
    fn record(&mut self, now: Instant) -> Option<usize> {
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        let quiet = self
            .last_warning
            .is_none_or(|t| now.duration_since(t) > self.window);
        if self.recent.len() > self.threshold && quiet {
            self.last_warning = Some(now);
            return Some(self.recent.len());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_after_more_than_threshold_repairs_in_window_once() {
        let mut detector = FightDetector::new(&WatchOptions::default());
        let start = Instant::now();
        let warnings: Vec<_> = (0..12u64)
            .map(|i| detector.record(start + Duration::from_secs(i)))
            .collect();
        assert_eq!(warnings[..5], [None; 5]);
        assert_eq!(warnings[5], Some(6));
        assert!(warnings[6..].iter().all(Option::is_none));
    }

    #[test]
    fn slow_repairs_never_warn() {
        let mut detector = FightDetector::new(&WatchOptions::default());
        let start = Instant::now();
        for i in 0..20u64 {
            assert_eq!(detector.record(start + Duration::from_secs(i * 20)), None);
        }
    }
}
