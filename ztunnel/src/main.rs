//! `ztunnel`: zmesh's node tunnel. Captures a workload's TCP and carries it to the destination
//! over HBONE (HTTP/2 CONNECT over mutual TLS 1.3 with SPIFFE identities), wire- and
//! configuration-compatible with Istio's ztunnel. Started as `ztunnel proxy`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};
use ztunnel::{admin, app, config};

/// Proxies allocate and free large buffers per connection; glibc maps and unmaps them each
/// time (page faults on the data path). mimalloc keeps them.
///
/// mimalloc v2 (the `mimalloc` crate's `v2` feature), not the crate's default v3: measured with
/// `zmesh-soak` (10,000 idle connections, then a connect/close churn), a server ztunnel on v3
/// grew during the churn and kept it (26.4-40.9 MiB after it, against 21.3-23.0 MiB baselines,
/// in 9 of 11 runs) although mimalloc's heap held about 6.5 MiB of pages: v3 abandons
/// full pages to share them between threads, and what it kept resident was outside the heap's
/// pages. On v2 the same runs end the churn at their baseline (22.1 and 23.1 MiB against 22.4
/// and 22.3), with the same cost per idle connection and churn rate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ztunnel", about = "zmesh node tunnel (HBONE)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Proxy {
        /// Typed config file (YAML); environment variables override it.
        #[arg(long, env = "ZTUNNEL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the version.
    Version,
}

/// Logs go to stdout through a writer thread, in batches (`zmesh_core::telemetry::log_writer`);
/// the guard writes out what is waiting when dropped at exit.
fn init_logging() -> anyhow::Result<(admin::LogControl, zmesh_core::logsink::LogGuard)> {
    let default = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&default).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let (writer, guard) =
        zmesh_core::telemetry::log_writer("ztunnel-log").context("starting the log writer")?;
    tracing_subscriber::registry()
        .with(filter)
        .with(zmesh_core::telemetry::fmt_layer(writer))
        .init();
    let current = Arc::new(std::sync::Mutex::new(default.clone()));
    let control: admin::LogControl = Arc::new(move |level: Option<&str>| {
        let mut cur = current.lock().expect("log level lock");
        if let Some(level) = level {
            let wanted = if level.is_empty() {
                default.as_str()
            } else {
                level
            };
            let f = EnvFilter::try_new(wanted).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())?;
            *cur = wanted.to_owned();
        }
        Ok(cur.clone())
    });
    Ok((control, guard))
}

// mimalloc's own collection entry point (part of the library the `mimalloc` crate links in;
// the crate exposes it only with its `extended` feature).
unsafe extern "C" {
    fn mi_collect(force: bool);
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h` (`enum mi_option_e`; v3 numbers it the
/// same).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// How long mimalloc keeps freed pages before giving them back to the OS, in milliseconds.
///
/// Measured with `zmesh-bench` (throughput through two ztunnels, same run): with 0 (pages
/// back at once) every buffer a bulk transfer frees and allocates again is mapped afresh, a
/// page fault per 4 KiB, and page faults and page clearing were a quarter of ztunnel's CPU:
/// 4.6 Gbit/s at 2.2 ns of ztunnel CPU per byte, against 8.4 Gbit/s at 1.3 ns/B with 1000 ms.
/// A load's pages still go back soon after it: the idle heartbeat forces a collection every
/// second (`collect_freed_memory`).
const PURGE_DELAY_MS: std::ffi::c_long = 250;

/// Sets mimalloc's purge delay ([`PURGE_DELAY_MS`]); mimalloc's own `MIMALLOC_PURGE_DELAY`
/// (milliseconds) wins when set.
fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a global option before any thread of ours allocates much; takes no pointers.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// How often each runtime thread offers mimalloc a chance to give freed memory back.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Run by each runtime thread as it goes idle, at most once per [`COLLECT_EVERY`]: mimalloc
/// returns freed pages to the OS only when it looks at its heap again, which a thread that
/// has gone quiet after a load never does by itself, so RSS would stay at its peak.
fn collect_freed_memory() {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= COLLECT_EVERY)
        {
            last.set(Some(now));
            // This thread's spare bulk buffers (the copy loops' and the TLS reads') go first,
            // so that mimalloc can give their pages back too.
            zmesh_core::spare::release();
            // SAFETY: mi_collect takes no pointers. Forced: it also purges (madvise) free
            // ranges at once rather than after mimalloc's purge delay, and on the main thread
            // (the single-threaded runtime) reclaims the pages of threads that exited, so a
            // thread that parks after a load gives back all it can, not only what has aged.
            unsafe { mi_collect(true) };
        }
    });
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ztunnel (zmesh) {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Proxy { config } => {
            // First: on AMD CPUs this starts the program over with glibc tuned.
            let copies = zmesh_core::process::prefer_vector_copies();
            set_purge_delay();
            let thp = zmesh_core::process::disable_transparent_huge_pages();
            let (log, _log_guard) = init_logging()?;
            if let Err(e) = thp {
                tracing::warn!("cannot turn transparent huge pages off: {e}");
            }
            if let Err(e) = copies {
                tracing::warn!("cannot start over with glibc's vector copies: {e}");
            }
            zmesh_core::tls::install_default_provider();
            zmesh_core::process::raise_fd_limit();
            let env: HashMap<String, String> = std::env::vars().collect();
            let cfg = config::Config::load(config.as_deref(), &env)?;
            // One worker: a current-thread runtime, with no cross-thread wake-ups on the path.
            let mut builder = if cfg.worker_threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(cfg.worker_threads);
                b
            };
            let rt = builder
                .thread_name("ztunnel-worker")
                .enable_all()
                .on_thread_park(collect_freed_memory)
                .build()
                .context("cannot start the runtime")?;
            // A heartbeat, so that every idle thread parks again now and then after a load and
            // gives its freed memory back (see `collect_freed_memory`).
            rt.spawn(async {
                let mut tick = tokio::time::interval(COLLECT_EVERY);
                loop {
                    tick.tick().await;
                }
            });
            rt.block_on(app::run(cfg, log))
        }
    }
}
