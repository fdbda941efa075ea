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

/// Logs (one access-log line per request) go to stdout through a writer thread
/// (`zmesh_core::telemetry::log_writer`), not written from the request's task. The guard
/// flushes what is queued when dropped at exit.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = zmesh_core::telemetry::log_writer("waypoint-log");
    tracing_subscriber::registry()
        .with(filter)
        .with(zmesh_core::telemetry::fmt_layer(writer))
        .init();
    guard
}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    // Before the runtime's threads allocate (see `zmesh_core::process`).
    let thp = zmesh_core::process::disable_transparent_huge_pages();
    zmesh_core::process::raise_fd_limit();
    let _log = init_logging();
    if let Err(e) = thp {
        tracing::warn!("cannot turn transparent huge pages off: {e}");
    }
    // One worker per core, or `TOKIO_WORKER_THREADS`.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg = Config::from_env(&env)?;
    let running = Waypoint::start(cfg)
        .await
        .context("starting the waypoint")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("draining");
    running.drain().await;
    Ok(())
}
