//! The `waypoint` binary: configuration from the environment, logging (text, or JSON with
//! `LOG_FORMAT=json`; access-log lines have target `access`), drain on SIGTERM/SIGINT.

use std::collections::HashMap;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use zmesh_waypoint::{Config, Waypoint};

/// The waypoint allocates and frees per request (header maps, bodies' buffers, the parser's
/// read buffers, the access-log record): with glibc's allocator that was a fifth of its CPU in
/// `zmesh-bench-waypoint` (`malloc`, `_int_free`, `malloc_consolidate`). mimalloc v2, as
/// ztunnel uses (see `ztunnel/src/main.rs` for why v2).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// zmesh waypoint: the L7 proxy for the Services bound to it (configured by environment
/// variables: POD_NAMESPACE, SERVICE_ACCOUNT, LOCAL_XDS_PATH, LOCAL_CA_CERT, LOCAL_CA_KEY, ...).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {}

/// Logs (one access-log line per request) go to stdout through a writer thread, in batches
/// (`zmesh_core::telemetry::log_writer`), not written from the request's task. The guard
/// writes out what is waiting when dropped at exit.
fn init_logging() -> anyhow::Result<zmesh_core::logsink::LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) =
        zmesh_core::telemetry::log_writer("waypoint-log").context("starting the log writer")?;
    tracing_subscriber::registry()
        .with(filter)
        .with(zmesh_core::telemetry::fmt_layer(writer))
        .init();
    Ok(guard)
}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    // First: on AMD CPUs this starts the program over with glibc tuned.
    let copies = zmesh_core::process::prefer_vector_copies();
    // Before the runtime's threads allocate (see `zmesh_core::process`).
    let thp = zmesh_core::process::disable_transparent_huge_pages();
    zmesh_core::process::raise_fd_limit();
    let _log = init_logging()?;
    if let Err(e) = thp {
        tracing::warn!("cannot turn transparent huge pages off: {e}");
    }
    if let Err(e) = copies {
        tracing::warn!("cannot start over with glibc's vector copies: {e}");
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg = Config::from_env(&env)?;
    let workers = runtime()?.block_on(run(cfg))?;
    // Each worker's runtime writes out, as it is dropped, the request records its tasks had
    // not written yet (`RequestRecord::finish_after_writes`): wait for them before the log
    // guard writes out what is waiting.
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// A worker: a runtime on one thread. A connection, the requests on it and the upstream
/// connections they open stay on their worker's thread; with one multi-threaded runtime,
/// tasks of one request woke each other across threads, which cost about a quarter of the
/// waypoint's CPU on two cores (`docs/bench-waypoint-2026-12-05.md`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")
}

/// The first worker is the main thread, which also runs the control tasks (certificates,
/// config, admin); `WAYPOINT_WORKER_THREADS - 1` more get a thread each, returned once the
/// drain has let the connections finish.
async fn run(cfg: Config) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let workers = cfg.workers;
    let mut threads = Vec::with_capacity(workers);
    let mut running = Waypoint::start(cfg)
        .await
        .context("starting the waypoint")?;
    for i in 1..workers {
        // Each worker's runtime is made and dropped on its own thread (a runtime may not be
        // dropped inside this one's tasks); it hands its handle back, then runs until the
        // drain (started by the main thread) has let its connections finish.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let wp = running.waypoint.clone();
        let thread = std::thread::Builder::new()
            .name(format!("waypoint-worker-{i}"))
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(wp.drained());
                // Its tasks not run yet (records waiting to be written) are dropped now; a
                // blocking task does not hold the exit for more than a second.
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .context("starting a worker thread")?;
        threads.push(thread);
        let handle = rx.recv().context("a worker thread ended at start")??;
        running.serve_on(&handle)?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("draining");
    running.drain().await;
    Ok(threads)
}
