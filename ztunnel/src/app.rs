//! Wiring: certificates (local CA or the controller's), the state source (the local-config
//! watch or the xDS client), listeners, the operator endpoints, and the
//! drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use zmesh_core::certs::{CertStore, CertificateSource, LocalCaSource};
use zmesh_core::identity::SpiffeId;
use zmesh_core::socket::listen;
use zmesh_core::state::State;
use zmesh_core::tls::LocalCa;

use crate::admin::{self, Admin, LogControl};
use crate::ca_client::{RemoteCa, RemoteCaConfig};
use crate::config::{Config, ProxyMode};
use crate::local_config;
use crate::metrics::Metrics;
use crate::proxy::policy::{self, recheck_on_change};
use crate::proxy::{Node, Proxy};
use crate::registry::Proxies;
use crate::state::Publisher;
use crate::xds::{Xds, XdsConfig};

/// How long proxies wait at start for the controller's first config (their workload's trust
/// domain comes from it); after that they start anyway and readiness keeps waiting.
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// Runs ztunnel until it has drained after SIGTERM, SIGINT or `/quitquitquit`.
pub async fn run(cfg: Config, log: LogControl) -> anyhow::Result<()> {
    let running = start(cfg, log).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = running.quit_requested() => "/quitquitquit",
    };
    running.shutdown(why).await;
    Ok(())
}

/// A started ztunnel: its listeners serve until [`Running::shutdown`].
pub struct Running {
    cfg: Arc<Config>,
    proxies: Arc<Proxies>,
    ready: Arc<AtomicBool>,
    quit: CancellationToken,
    servers_stop: CancellationToken,
    zds_task: Option<tokio::task::JoinHandle<()>>,
    /// Where the admin endpoints listen (`/config_dump`, `/quitquitquit`, ...).
    pub admin_addr: SocketAddr,
    /// Where Prometheus metrics are served (`/metrics`).
    pub stats_addr: SocketAddr,
    /// Where readiness is served (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
}

impl Running {
    /// Completes when `/quitquitquit` was asked for.
    pub async fn quit_requested(&self) {
        self.quit.cancelled().await
    }

    /// Not ready, no new connections, open ones drained (up to the drain deadline); then the
    /// operator endpoints and the config sources stop. `why` is logged.
    pub async fn shutdown(mut self, why: &str) {
        self.ready.store(false, Ordering::Release);
        // No pod may be added once the drain has taken its list of proxies.
        if let Some(task) = self.zds_task.take() {
            task.abort();
        }
        drain(&self.proxies, self.cfg.drain_deadline, why).await;
        self.servers_stop.cancel();
    }
}

impl Drop for Running {
    /// Dropped without [`Running::shutdown`] (a test that failed): everything stops at once,
    /// open connections included.
    fn drop(&mut self) {
        if let Some(task) = self.zds_task.take() {
            task.abort();
        }
        for (_, p) in self.proxies.snapshot() {
            p.drain.cancel();
            p.force.cancel();
        }
        self.servers_stop.cancel();
    }
}

/// Starts ztunnel: certificates, the state source, the operator endpoints and the proxies (the
/// dedicated workload's, or the ZDS client that makes one per pod). If it fails, whatever it
/// had started is stopped again.
pub async fn start(cfg: Config, log: LogControl) -> anyhow::Result<Running> {
    zmesh_core::tls::install_default_provider();
    let cfg = Arc::new(cfg);
    let state = match &cfg.local_xds_path {
        Some(p) => local_config::load_state(p)?,
        None => State::default(),
    };
    if !state.policies().is_empty() {
        tracing::info!(
            policies = state.policies().len(),
            "AuthorizationPolicies from the local config enforced on inbound connections"
        );
    }
    let state = Arc::new(ArcSwap::from_pointee(state));
    // Every new config goes through the publisher, which wakes the policy re-check.
    let publisher = Publisher::new(state.clone());
    let source: Arc<dyn CertificateSource> = match cfg.ca_target() {
        Some(target) => Arc::new(
            RemoteCa::new(RemoteCaConfig {
                target,
                auth: cfg.auth_headers(),
                // In shared mode ztunnel asks for its pods' certificates.
                impersonate: cfg.proxy_mode == ProxyMode::Shared,
                ttl: cfg.cert_ttl,
                trust_domain: cfg.trust_domain.clone(),
            })
            .context("cannot set up the CA client (CA_ADDRESS, CA_ROOT_CA)")?,
        ),
        None => {
            let (ca_cert, ca_key) = (
                cfg.local_ca_cert.as_deref().expect("validated"),
                cfg.local_ca_key.as_deref().expect("validated"),
            );
            let ca = LocalCa::load(ca_cert, ca_key)
                .context("cannot load the local CA (LOCAL_CA_CERT, LOCAL_CA_KEY)")?;
            Arc::new(LocalCaSource {
                ca,
                ttl: cfg.cert_ttl,
            })
        }
    };
    let certs = CertStore::new(source);
    let mut registry = Registry::default();
    zmesh_core::telemetry::DroppedLogLines::register(&mut registry);
    let local_counters = local_config::Counters::register(&mut registry);
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        metrics: Metrics::register(&mut registry),
        conns: Arc::new(policy::Registry::default()),
    });
    let proxies = Arc::new(Proxies::default());

    let admin_l = listen(([127, 0, 0, 1], cfg.ports.admin).into(), false, None, None)
        .context("cannot bind admin port")?;
    let bind = |port, what: &str| {
        listen(cfg.bind(port), true, None, None)
            .with_context(|| format!("cannot bind the {what} listener on port {port}"))
    };
    let stats_l = bind(cfg.ports.stats, "metrics")?;
    let ready_l = bind(cfg.ports.readiness, "readiness")?;
    let ready = Arc::new(AtomicBool::new(false));
    let quit = CancellationToken::new();
    let servers_stop = CancellationToken::new();
    // Until start succeeds: an error stops what was started so far.
    let started = servers_stop.clone().drop_guard();
    let (admin_addr, stats_addr, readiness_addr) = (
        admin_l.local_addr()?,
        stats_l.local_addr()?,
        ready_l.local_addr()?,
    );
    // The controller replaces the local file as the source of the state.
    let xds = match cfg.xds_target() {
        Some(target) => Some(
            Xds::start(
                XdsConfig {
                    target,
                    auth: cfg.auth_headers(),
                    node: crate::xds::node(&cfg),
                },
                publisher.clone(),
                servers_stop.clone(),
            )
            .context("cannot start the xDS client (XDS_ADDRESS, XDS_ROOT_CA)")?,
        ),
        None => None,
    };
    let admin = Arc::new(Admin {
        node: node.clone(),
        proxies: proxies.clone(),
        registry: Arc::new(registry),
        ready: ready.clone(),
        xds: xds.clone(),
        log,
        quit: quit.clone(),
    });
    let a = admin.clone();
    tokio::spawn(admin::serve(
        admin_l,
        "admin",
        cfg.listeners,
        servers_stop.clone(),
        move |r| a.clone().admin(r),
    ));
    let a = admin.clone();
    tokio::spawn(admin::serve(
        stats_l,
        "stats",
        cfg.listeners,
        servers_stop.clone(),
        move |r| a.clone().stats(r),
    ));
    let a = admin.clone();
    tokio::spawn(admin::serve(
        ready_l,
        "readiness",
        cfg.listeners,
        servers_stop.clone(),
        move |r| a.clone().readiness(r),
    ));
    if let Some(path) = cfg.local_xds_path.clone() {
        local_config::watch(
            path,
            publisher.clone(),
            servers_stop.clone(),
            local_counters,
        )?;
    }
    tokio::spawn(recheck_on_change(
        publisher.clone(),
        node.conns.clone(),
        servers_stop.clone(),
    ));

    if let Some(xds) = &xds
        && !xds.wait_ready(FIRST_CONFIG_WAIT).await
    {
        tracing::warn!(
            address = %cfg.xds_address,
            "no config from the controller yet; starting anyway, not ready until it arrives"
        );
    }

    let mut zds_task = None;
    match cfg.proxy_mode {
        ProxyMode::Dedicated => {
            let workload = cfg
                .workload
                .clone()
                .expect("validated: dedicated mode has a workload");
            let proxy = Proxy::new(&node, workload.clone(), None)?;
            proxy.start()?;
            let identity = proxy.identity.clone();
            proxies.insert(format!("{}/{}", workload.namespace, workload.name), proxy);
            // Ready once the workload's certificate is in hand: the first connection won't
            // wait. A refusal keeps ztunnel up (xDS, admin, metrics), not ready, retrying.
            tokio::spawn(first_certificate(certs.clone(), identity, ready.clone()));
        }
        ProxyMode::Shared => {
            let uds = cfg.inpod_uds.clone();
            zds_task = Some(tokio::spawn(crate::inpod::run(
                node.clone(),
                proxies.clone(),
                ready.clone(),
                uds,
            )));
        }
    }

    started.disarm();
    Ok(Running {
        cfg,
        proxies,
        ready,
        quit,
        servers_stop,
        zds_task,
        admin_addr,
        stats_addr,
        readiness_addr,
    })
}

/// Stops accepting everywhere, then lets open connections finish until the deadline.
async fn drain(proxies: &Proxies, deadline: Duration, why: &str) {
    let all = proxies.snapshot();
    let open: usize = all.iter().map(|(_, p)| p.tracker.len()).sum();
    tracing::info!(
        reason = why,
        proxies = all.len(),
        open,
        ?deadline,
        "draining: no new connections, waiting for open ones"
    );
    let drained =
        futures::future::join_all(all.iter().map(|(_, p)| p.drain_connections(deadline))).await;
    if drained.iter().all(|d| *d) {
        tracing::info!("drained: all connections finished");
    } else {
        let open: usize = all.iter().map(|(_, p)| p.tracker.len()).sum();
        tracing::warn!(
            open,
            "drain deadline passed; closing the remaining connections"
        );
    }
}

/// Fetches the dedicated workload's first certificate, retrying with backoff (1 s doubling to
/// 30 s) while the CA refuses or cannot be reached, and marks ztunnel ready once it is in hand.
async fn first_certificate(certs: Arc<CertStore>, identity: SpiffeId, ready: Arc<AtomicBool>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match certs.get(&identity).await {
            Ok(_) => {
                tracing::info!(%identity, "ztunnel ready (dedicated mode)");
                ready.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::error!(%identity, error = %e, retry_in = ?backoff,
                    "no certificate for the workload; not ready, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
