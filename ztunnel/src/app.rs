//! Wiring: certificates (local CA or the controller's), the state source (the local-config
//! watch or the xDS client), listeners, the operator endpoints, and the
//! drain on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use zmesh_core::certs::{CertStore, CertificateSource, LocalCaSource};
use zmesh_core::socket::listen;
use zmesh_core::state::{LocalConfig, State};
use zmesh_core::tls::LocalCa;

use crate::admin::{self, Admin, LogControl};
use crate::ca_client::{RemoteCa, RemoteCaConfig};
use crate::config::{Config, ProxyMode};
use crate::metrics::Metrics;
use crate::proxy::policy::{self, Publisher, recheck_on_change};
use crate::proxy::{Node, Proxy};
use crate::xds::{Xds, XdsConfig};

/// How long proxies wait at start for the controller's first config (their workload's trust
/// domain comes from it); after that they start anyway and readiness keeps waiting.
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// Reads and validates the local-config file into a state snapshot.
pub fn load_state(path: &Path) -> anyhow::Result<State> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read LOCAL_XDS_PATH {}", path.display()))?;
    let cfg = LocalConfig::parse(&text).with_context(|| format!("in {}", path.display()))?;
    State::from_local(cfg).with_context(|| format!("in {}", path.display()))
}

/// The proxies this ztunnel runs: one in dedicated mode, one per enrolled pod in shared mode.
/// Keyed by pod uid (the workload's `<namespace>/<name>` in dedicated mode).
#[derive(Default)]
pub struct Proxies(std::sync::Mutex<std::collections::BTreeMap<String, Arc<Proxy>>>);

impl Proxies {
    pub fn insert(&self, key: String, proxy: Arc<Proxy>) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").insert(key, proxy)
    }

    pub fn remove(&self, key: &str) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").remove(key)
    }

    pub fn get(&self, key: &str) -> Option<Arc<Proxy>> {
        self.0.lock().expect("proxies lock").get(key).cloned()
    }

    pub fn snapshot(&self) -> Vec<(String, Arc<Proxy>)> {
        let map = self.0.lock().expect("proxies lock");
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Runs ztunnel until it has drained after SIGTERM, SIGINT or `/quitquitquit`.
pub async fn run(cfg: Config, log: LogControl) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let state = match &cfg.local_xds_path {
        Some(p) => load_state(p)?,
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
        watch_local_config(path, publisher.clone(), servers_stop.clone())?;
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
            // Ready once the workload's certificate is in hand: the first connection won't wait.
            certs
                .get(&proxy.identity)
                .await
                .with_context(|| format!("cannot obtain a certificate for {}", proxy.identity))?;
            tracing::info!(identity = %proxy.identity, "ztunnel ready (dedicated mode)");
            proxies.insert(format!("{}/{}", workload.namespace, workload.name), proxy);
            ready.store(true, Ordering::Release);
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

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.cancelled() => "/quitquitquit",
    };
    ready.store(false, Ordering::Release);
    // No pod may be added once the drain has taken its list of proxies.
    if let Some(task) = zds_task {
        task.abort();
    }
    drain(&proxies, cfg.drain_deadline, why).await;
    servers_stop.cancel();
    Ok(())
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

/// Reloads the local config when its file changes. A bad edit is logged and ignored: the last
/// good config stays in force.
fn watch_local_config(
    path: PathBuf,
    publisher: Publisher,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only events about our file count, or a ConfigMap's `..data` symlink swap; other
        // files in the directory (logs, say) must not cost a re-read each.
        let ours = ev.is_ok_and(|ev| {
            ev.paths.iter().any(|p| {
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
    let mut last = std::fs::read(&path).ok();
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => if r.is_none() { return },
            }
            // Let a burst of events (write, rename, chmod) settle, then wait until the content
            // holds still: a file rewritten in place is briefly empty or half written, and an
            // empty file is a valid (empty) config that would wipe the state.
            let mut now = None;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                let read = std::fs::read(&path).ok();
                if read == now {
                    break;
                }
                now = read;
            }
            if now == last {
                continue;
            }
            let parsed = match &now {
                // Mid-rewrite, or deleted and not yet replaced: never a reason to forget every
                // workload. Clearing the config is explicit (`workloads: []`).
                Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Err(anyhow::anyhow!(
                    "the file is empty (being rewritten?); write `workloads: []` to clear the config"
                )),
                Some(bytes) => std::str::from_utf8(bytes)
                    .map_err(|e| anyhow::anyhow!("not UTF-8: {e}"))
                    .and_then(|text| {
                        let cfg = LocalConfig::parse(text)?;
                        Ok(State::from_local(cfg)?)
                    }),
                None => Err(anyhow::anyhow!("the file cannot be read")),
            };
            match parsed {
                Ok(st) => {
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
                    tracing::error!(path = %path.display(), error = format!("{e:#}"), "local config change rejected; keeping the previous config");
                }
            }
            last = now;
        }
    });
    Ok(())
}
