//! Wiring: the certificate store, the config snapshot (and its reload), the HBONE listener
//! (one socket and one upstream pool per worker runtime), the admin listener; drain on stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zmesh_core::certs::{CertStore, CertificateSource, LocalCaSource};
use zmesh_core::hbone::{Pool, SourceInfo};
use zmesh_core::serve::{FdHeadroom, Listener, ListenerGroup};
use zmesh_core::tls::LocalCa;

use crate::bound::{BoundError, Snapshot};
use crate::ca::RemoteCa;
use crate::config::Config;
use crate::telemetry::Metrics;
use crate::upstream::Upstreams;

/// The running waypoint's shared state.
pub struct Waypoint {
    pub cfg: Config,
    /// What it serves, swapped whole on change.
    pub snapshot: ArcSwap<Snapshot>,
    pub certs: Arc<CertStore>,
    /// Round-robin turns and requests in flight, shared by the workers' upstream sides.
    pub balance: Arc<crate::upstream::Balance>,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    /// JWKS fetched from `jwksUri`s (request authentication), kept across configs.
    pub jwks: Arc<crate::authn::JwksCache>,
    /// Whether the config is known (always with a local file; with xDS once both types
    /// arrived): readiness waits for it.
    pub config_ready: std::sync::atomic::AtomicBool,
    /// Cancelled to drain: listeners stop, connections shut down gracefully.
    pub drain: CancellationToken,
    /// Every connection's task.
    pub tracker: TaskTracker,
}

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load the local CA: {0}")]
    Ca(#[from] zmesh_core::tls::TlsError),
    #[error("no certificate source: set LOCAL_CA_CERT and LOCAL_CA_KEY")]
    NoCertificateSource,
    #[error(transparent)]
    Config(#[from] BoundError),
    #[error(transparent)]
    Control(#[from] zmesh_core::grpc::GrpcError),
    #[error("cannot listen on {0}: {1} (is another process using the port?)")]
    Listen(SocketAddr, std::io::Error),
    #[error(
        "all {0} worker runtimes the config asked for (WAYPOINT_WORKER_THREADS) already serve HBONE"
    )]
    Workers(usize),
}

/// A started waypoint.
pub struct Running {
    pub waypoint: Arc<Waypoint>,
    /// Where HBONE and admin listen (the real ports when `:0` was asked).
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HBONE listeners' shared caps and counters, and how many sockets serve it.
    hbone: ListenerGroup,
    workers: usize,
}

impl Running {
    /// Serves HBONE on the runtime `rt` too (another worker): a socket of its own on the HBONE
    /// address (SO_REUSEPORT: the kernel spreads new connections over the sockets by their
    /// addresses), under the same connection caps, and an upstream pool of its own, so each
    /// connection, its requests and their upstream connections stay on `rt`'s thread. At most
    /// `Config::workers - 1` times: the first worker is the runtime that started the waypoint.
    pub fn serve_on(&mut self, rt: &tokio::runtime::Handle) -> Result<(), StartError> {
        if self.workers >= self.waypoint.cfg.workers {
            return Err(StartError::Workers(self.waypoint.cfg.workers));
        }
        // The socket registers with `rt`'s reactor, the pool's sweeper runs on it.
        let _in_rt = rt.enter();
        let socket = zmesh_core::socket::listen(self.hbone_addr, true, None, None)
            .map_err(|e| StartError::Listen(self.hbone_addr, e))?;
        rt.spawn(crate::server::serve_hbone(
            self.waypoint.clone(),
            self.hbone.listener(socket),
            self.waypoint.upstreams(),
        ));
        self.workers += 1;
        Ok(())
    }

    /// Stops accepting, lets connections finish (up to the drain deadline).
    pub async fn drain(&self) {
        let wp = &self.waypoint;
        wp.drain.cancel();
        wp.tracker.close();
        wp.drained().await;
    }
}

impl Waypoint {
    /// Starts with the certificate source and config named by `cfg`: the controller's CA or a
    /// local one; the controller's delta ADS or a local file.
    pub async fn start(cfg: Config) -> Result<Running, StartError> {
        let source: Arc<dyn CertificateSource> = match (&cfg.local_ca, &cfg.ca) {
            (Some((cert, key)), _) => Arc::new(LocalCaSource {
                ca: LocalCa::load(cert, key)?,
                ttl: cfg.cert_ttl,
            }),
            (None, Some(target)) => Arc::new(RemoteCa::new(target, cfg.auth(), cfg.cert_ttl)?),
            (None, None) => return Err(StartError::NoCertificateSource),
        };
        let snapshot = match &cfg.local_config {
            Some(p) => Snapshot::load(p)?,
            None => Snapshot::default(),
        };
        let xds = cfg.xds.clone();
        let running = Waypoint::start_with(cfg, source, snapshot).await?;
        if let Some(target) = xds {
            let wp = running.waypoint.clone();
            let node = crate::xds::node(&wp.cfg);
            crate::xds::start(wp.clone(), &target, wp.cfg.auth(), node)?;
        }
        Ok(running)
    }

    /// Starts with a given certificate source and first snapshot (tests, embedders).
    pub async fn start_with(
        cfg: Config,
        source: Arc<dyn CertificateSource>,
        snapshot: Snapshot,
    ) -> Result<Running, StartError> {
        zmesh_core::tls::install_default_provider();
        let from_xds = cfg.xds.is_some();
        let certs = CertStore::new(source);
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        zmesh_core::telemetry::DroppedLogLines::register(&mut registry);
        // Shared by the worker runtimes' sockets when there is more than one.
        let hbone = zmesh_core::socket::listen(cfg.hbone_addr, cfg.workers > 1, None, None)
            .map_err(|e| StartError::Listen(cfg.hbone_addr, e))?;
        let admin = TcpListener::bind(cfg.admin_addr)
            .await
            .map_err(|e| StartError::Listen(cfg.admin_addr, e))?;
        let hbone_addr = hbone
            .local_addr()
            .map_err(|e| StartError::Listen(cfg.hbone_addr, e))?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| StartError::Listen(cfg.admin_addr, e))?;
        let drain = CancellationToken::new();
        let jwks = Arc::new(crate::authn::JwksCache::new(
            crate::authn::jwks::DEFAULT_REFRESH,
            drain.clone(),
        ));
        let wp = Arc::new(Waypoint {
            cfg,
            snapshot: ArcSwap::from_pointee(snapshot),
            certs,
            balance: Arc::default(),
            metrics,
            registry,
            jwks,
            config_ready: std::sync::atomic::AtomicBool::new(!from_xds),
            drain,
            tracker: TaskTracker::new(),
        });
        // The first certificate now: readiness waits for it.
        let w = wp.clone();
        tokio::spawn(async move {
            if let Err(e) = w.certs.get(&w.cfg.identity).await {
                tracing::error!(error = %e, "cannot get the waypoint's certificate");
            }
        });
        let hbone = Listener::new(
            hbone,
            "hbone",
            wp.cfg.hbone_limits,
            FdHeadroom::process(wp.cfg.fd_headroom),
        );
        let group = hbone.group();
        tokio::spawn(crate::server::serve_hbone(
            wp.clone(),
            hbone,
            wp.upstreams(),
        ));
        tokio::spawn(crate::admin::serve(wp.clone(), admin));
        if let Some(path) = wp.cfg.local_config.clone() {
            tokio::spawn(watch_local(wp.clone(), path));
        }
        tracing::info!(%hbone_addr, %admin_addr, identity = %wp.cfg.identity, "waypoint started");
        Ok(Running {
            waypoint: wp,
            hbone_addr,
            admin_addr,
            hbone: group,
            workers: 1,
        })
    }

    /// Once draining has started: until every connection has finished, or the drain
    /// deadline.
    pub async fn drained(&self) {
        self.drain.cancelled().await;
        let _ = tokio::time::timeout(self.cfg.drain_deadline, self.tracker.wait()).await;
    }

    /// A worker runtime's upstream side: a pool of its own (call it on that runtime: the
    /// pool's idle sweeper runs there), the shared certificates.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        let cfg = &self.cfg;
        let me = SourceInfo {
            cluster: cfg.cluster_id.clone(),
            namespace: cfg.identity.namespace().to_owned(),
            workload_name: cfg.pod_name.clone(),
            canonical_name: cfg.identity.service_account().to_owned(),
            ..Default::default()
        };
        Arc::new(Upstreams::new(
            Pool::new(cfg.pool, cfg.h2, cfg.sockets.clone()),
            self.certs.clone(),
            cfg.identity.clone(),
            cfg.h2,
            cfg.lb,
            me,
            cfg.upstream_hbone_port,
            self.balance.clone(),
        ))
    }
}

/// Reloads the local config file when its modification time changes (checked every second);
/// a bad edit is logged and the last good snapshot kept.
async fn watch_local(wp: Arc<Waypoint>, path: std::path::PathBuf) {
    let mtime = |p: &std::path::Path| -> Option<SystemTime> {
        std::fs::metadata(p).and_then(|m| m.modified()).ok()
    };
    let mut last = mtime(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = wp.drain.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = mtime(&path);
        if now == last {
            continue;
        }
        last = now;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || Snapshot::load(&p)).await {
            Ok(Ok(s)) => {
                tracing::info!(path = %path.display(), bound = s.bound_targets(), "local config reloaded");
                wp.snapshot.store(Arc::new(s));
            }
            Ok(Err(e)) => {
                tracing::error!(path = %path.display(), error = %e, "local config refused; keeping the last good one")
            }
            Err(e) => tracing::error!(error = %e, "local config reload task failed"),
        }
    }
}
