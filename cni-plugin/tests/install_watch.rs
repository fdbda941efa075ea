//! `watch_and_repair` against a temp conf dir: our entry comes back after the primary CNI
//! rewrites its file, follows a new primary that sorts first, and a rewrite loop trips the
//! fight warning (observed through the returned counters, not the logs).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zmesh_cni::install::{
    InstallError, PLUGIN_TYPE, RepairStats, WatchOptions, is_chained, watch_and_repair,
};

const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"containerd-net","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]]}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

const CALICO: &str = r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico","ipam":{"type":"calico-ipam"}}]}"#;

fn entry() -> Value {
    json!({"type": PLUGIN_TYPE, "agent_socket": "/var/run/zmesh/agent.sock"})
}

struct Running {
    stats: RepairStats,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), InstallError>>,
}

impl Running {
    fn start(dir: &Path, options: WatchOptions) -> Self {
        let stats = RepairStats::new();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(watch_and_repair(
            dir.to_owned(),
            entry(),
            options,
            stats.clone(),
            stopped,
        ));
        Self { stats, stop, task }
    }

    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        result.expect("watcher stops").unwrap().unwrap();
    }
}

/// Polls `cond` every 20 ms for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn setup(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::write(&path, text).unwrap();
    (dir, path)
}

#[tokio::test]
async fn puts_the_entry_back_after_the_primary_rewrites_its_file() {
    let (dir, path) = setup("10-containerd-net.conflist", BRIDGE);
    let running = Running::start(dir.path(), WatchOptions::default());
    eventually("initial install", || is_chained(dir.path())).await;
    assert_eq!(
        running.stats.repairs(),
        0,
        "the first install is not a repair"
    );

    fs::write(&path, BRIDGE).unwrap();
    assert!(!is_chained(dir.path()));
    eventually("entry restored", || is_chained(dir.path())).await;
    eventually("repair counted", || running.stats.repairs() == 1).await;
    assert_eq!(running.stats.fight_warnings(), 0);
    assert_eq!(running.stats.errors(), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn waits_for_a_primary_then_follows_one_that_sorts_first() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), WatchOptions::default());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!is_chained(dir.path()));

    fs::write(dir.path().join("20-bridge.conflist"), BRIDGE).unwrap();
    eventually("chained into the first primary", || is_chained(dir.path())).await;
    assert_eq!(running.stats.repairs(), 0);

    fs::write(dir.path().join("10-calico.conflist"), CALICO).unwrap();
    eventually("chained into the new primary", || is_chained(dir.path())).await;
    let calico = fs::read_to_string(dir.path().join("10-calico.conflist")).unwrap();
    assert!(calico.contains(PLUGIN_TYPE));
    running.shutdown().await;
}

#[tokio::test]
async fn a_rewrite_loop_trips_the_fight_warning() {
    let (dir, path) = setup("10-containerd-net.conflist", BRIDGE);
    let options = WatchOptions {
        debounce: Duration::from_millis(20),
        ..WatchOptions::default()
    };
    let running = Running::start(dir.path(), options);
    eventually("initial install", || is_chained(dir.path())).await;
    for round in 1..=6 {
        fs::write(&path, BRIDGE).unwrap();
        eventually("entry restored", || is_chained(dir.path())).await;
        eventually("repair counted", || running.stats.repairs() == round).await;
        if round <= 5 {
            assert_eq!(running.stats.fight_warnings(), 0, "round {round}");
        }
    }
    eventually("fight warning", || running.stats.fight_warnings() == 1).await;
    running.shutdown().await;
}

#[tokio::test]
async fn stops_when_the_sender_is_dropped_and_fails_on_a_missing_dir() {
    let dir = tempfile::tempdir().unwrap();
    let Running { stop, task, .. } = Running::start(dir.path(), WatchOptions::default());
    drop(stop);
    let result = tokio::time::timeout(Duration::from_secs(5), task).await;
    result.expect("watcher stops").unwrap().unwrap();

    let (_stop, stopped) = watch::channel(false);
    let missing = dir.path().join("missing");
    let result = watch_and_repair(
        missing,
        entry(),
        WatchOptions::default(),
        RepairStats::new(),
        stopped,
    )
    .await;
    assert!(
        matches!(result, Err(InstallError::Watch { .. })),
        "{result:?}"
    );
}
