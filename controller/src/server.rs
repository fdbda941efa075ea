//! The controller process: a source fills the [`Store`], the [`Reconciler`] translates it into
//! the xDS [`Cache`], and one gRPC server over TLS (15012 by default, like istiod) serves delta
//! ADS and the CA to ztunnels. Both services authenticate the caller the same way (bearer token
//! + `clusterid`), so an unmodified upstream ztunnel can use this controller.
//!
//! The server's own certificate is issued by the mesh CA for the configured names (ztunnel
//! verifies it against the mesh root, `XDS_ROOT_CA`/`CA_ROOT_CA`) and re-issued in process at
//! half its life, so a long-running controller never serves an expired certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zmesh_core::identity::SpiffeId;
use zmesh_core::peer_text::{PEER_ERROR_MAX, PeerText};
use zmesh_core::serve::{Activity, FdHeadroom, Limits, Listener, StatsHandle};
use zmesh_core::tls::LocalCa;

use crate::ads::{AdsServer, Cache, StreamAuth};
use crate::ca::{Authenticator, CaConfig, NodeTokenAuthenticator, WorkloadCa};
use crate::deploy::{WaypointDeployer, WaypointTemplate};
use crate::reconcile::{PassStats, Reconciler};
use crate::source::files::FileSource;
use crate::source::{Store, StorePods};
use crate::translate::{Kind, MeshConfig};

/// Where objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of YAML objects, watched.
    Dir(PathBuf),
    /// The Kubernetes API (in-cluster config or `KUBECONFIG`).
    Kube,
}

/// How callers (ztunnels) are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// The lab's per-node credentials: a file of `<node> <token>` lines.
    NodeTokens(PathBuf),
    /// Kubernetes TokenReview of the projected service-account token.
    TokenReview {
        /// Service accounts (`namespace/name`) trusted to act for their node.
        trusted_node_accounts: Vec<String>,
    },
}

/// Everything the controller process needs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// gRPC listen address (xDS + CA), `0.0.0.0:15012`.
    pub listen: SocketAddr,
    /// The CA certificate (root, or intermediate followed by its chain) PEM.
    pub ca_cert: PathBuf,
    /// The CA key PEM.
    pub ca_key: PathBuf,
    /// Names (DNS or IP) in the controller's serving certificate.
    pub serving_names: Vec<String>,
    /// Lifetime of the serving certificate (re-issued at half life).
    pub serving_ttl: Duration,
    pub mesh: MeshConfig,
    pub ca: CaConfig,
    pub source: SourceConfig,
    pub auth: AuthConfig,
    /// Identity ztunnels authenticate as (`spiffe://<td>/ns/istio-system/sa/ztunnel`).
    pub ztunnel_identity: SpiffeId,
    /// Quiet time before a change is translated and pushed.
    pub debounce: Duration,
    /// The limits of the gRPC and monitoring ports.
    pub limits: ControllerLimits,
    /// What the waypoints' Deployments run (Kubernetes source only: `crate::deploy`).
    pub waypoint: WaypointTemplate,
}

/// The limits of the controller's ports against clients that hold connections (see
/// `zmesh_core::serve`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ControllerLimits {
    /// The gRPC port (15012): TLS handshake + HTTP/2 preface deadline, caps, idle timeout
    /// (an ADS stream is never idle).
    pub grpc: Limits,
    /// The monitoring port (15014), plain HTTP/1.1.
    pub monitoring: Limits,
    /// Listeners stop accepting at this fraction of `RLIMIT_NOFILE`.
    pub fd_headroom: f64,
}

impl Default for ControllerLimits {
    fn default() -> Self {
        ControllerLimits {
            grpc: Limits {
                max_connections: 8192,
                max_connections_per_peer: 64,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(300),
            },
            monitoring: Limits {
                max_connections: 256,
                max_connections_per_peer: 16,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
            },
            fd_headroom: 0.9,
        }
    }
}

/// Reads a `<node> <token> [<spiffe id>]` file (blank lines and `#` comments allowed). A line
/// without an identity is a node's ztunnel (it authenticates as `ztunnel`); a line with one is
/// another proxy on that node that authenticates as that identity (a waypoint: its Gateway's
/// service account).
pub fn read_node_tokens(path: &PathBuf, ztunnel: SpiffeId) -> Result<NodeTokenAuthenticator> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the node token file {}", path.display()))?;
    let mut auth = NodeTokenAuthenticator::new(ztunnel);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(node), Some(token), None, None) if token.len() >= 32 => {
                auth.add_token(token, node)
            }
            (Some(node), Some(token), Some(id), None) if token.len() >= 32 => {
                let identity: SpiffeId = id.parse().with_context(|| {
                    format!(
                        "{}:{}: the third field must be a SPIFFE id \
                         (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)",
                        path.display(),
                        n + 1
                    )
                })?;
                auth.add_proxy_token(token, node, identity);
            }
            (Some(_), Some(_), _, None) => anyhow::bail!(
                "{}:{}: the token is shorter than 32 characters; use a random secret",
                path.display(),
                n + 1
            ),
            _ => anyhow::bail!(
                "{}:{}: expected `<node-name> <token> [<spiffe id>]`",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(auth)
}

/// A running controller's handles (for the binary's admin output and for tests).
#[derive(Clone)]
pub struct Running {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    pub store: Store,
    pub ads: AdsServer,
    pub stats: Arc<Mutex<PassStats>>,
    /// The limits in force.
    pub limits: ControllerLimits,
    /// The process's descriptor budget, shared by its listeners.
    pub fds: Arc<FdHeadroom>,
    /// The gRPC listener's counters.
    pub grpc_listener: StatsHandle,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Serving certificate that re-issues itself at half life.
struct RotatingCert {
    ca: LocalCa,
    names: Vec<String>,
    ttl: Duration,
    current: Mutex<(Arc<CertifiedKey>, SystemTime)>,
}

impl std::fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl RotatingCert {
    fn new(ca: LocalCa, names: Vec<String>, ttl: Duration) -> Result<Self> {
        let (key, refresh) = Self::issue(&ca, &names, ttl)?;
        Ok(RotatingCert {
            ca,
            names,
            ttl,
            current: Mutex::new((key, refresh)),
        })
    }

    fn issue(
        ca: &LocalCa,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Arc<CertifiedKey>, SystemTime)> {
        let cert = ca
            .issue_server(names, ttl)
            .context("issuing the controller's serving certificate")?;
        let key = zmesh_core::tls::provider()
            .key_provider
            .load_private_key(cert.key.into())
            .context("loading the serving key")?;
        let refresh = SystemTime::now() + ttl / 2;
        Ok((Arc::new(CertifiedKey::new(cert.chain, key)), refresh))
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if SystemTime::now() >= cur.1 {
            match Self::issue(&self.ca, &self.names, self.ttl) {
                Ok(next) => {
                    info!("controller serving certificate re-issued");
                    *cur = next;
                }
                // Keep serving the old one (valid until its end) and retry on the next hello.
                Err(e) => warn!(error = %e, "re-issuing the serving certificate failed"),
            }
        }
        Some(cur.0.clone())
    }
}

/// Starts the controller: the source, the reconciler and the gRPC server. Returns once the
/// server is listening; everything stops when `stop` is cancelled. Kubernetes (for `--kube`
/// and `--token-review`) is reached with the in-cluster config or `KUBECONFIG`.
pub async fn start(cfg: ControllerConfig, stop: CancellationToken) -> Result<Running> {
    start_with_client(cfg, None, stop).await
}

/// [`start`] with the Kubernetes client given (tests, embedding).
pub async fn start_with_client(
    cfg: ControllerConfig,
    kube: Option<kube::Client>,
    stop: CancellationToken,
) -> Result<Running> {
    let kube_client = || {
        let given = kube.clone();
        async move {
            match given {
                Some(c) => Ok(c),
                None => kube_client().await,
            }
        }
    };
    let ca = LocalCa::load(&cfg.ca_cert, &cfg.ca_key).with_context(|| {
        format!(
            "loading the CA from {} and {}",
            cfg.ca_cert.display(),
            cfg.ca_key.display()
        )
    })?;
    let serving = RotatingCert::new(
        LocalCa::from_pem(ca.cert_pem(), ca.key_pem())?,
        cfg.serving_names.clone(),
        cfg.serving_ttl,
    )?;
    let mut tls = rustls::ServerConfig::builder_with_provider(zmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(serving));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let store = Store::new();
    match &cfg.source {
        SourceConfig::Dir(dir) => {
            let src = FileSource::new(dir)?;
            let store = store.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = src.run(store) => if let Err(e) = r {
                        error!(error = %e, "the config directory source stopped");
                    },
                    _ = stop.cancelled() => {}
                }
            });
        }
        SourceConfig::Kube => {
            let client = kube_client().await?;
            let store = store.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = crate::source::kube::run(client, store, &Kind::ALL) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }

    let authenticator: Arc<dyn Authenticator> = match &cfg.auth {
        AuthConfig::NodeTokens(path) => {
            Arc::new(read_node_tokens(path, cfg.ztunnel_identity.clone())?)
        }
        AuthConfig::TokenReview {
            trusted_node_accounts,
        } => Arc::new(crate::ca::TokenReviewAuthenticator::new(
            kube_client().await?,
            crate::ca::TokenReviewConfig {
                trust_domain: cfg.mesh.trust_domain.clone(),
                trusted_node_accounts: trusted_node_accounts.clone(),
                ..crate::ca::TokenReviewConfig::default()
            },
        )?),
    };
    let cache = Cache::not_ready();
    let mut reconciler =
        Reconciler::new(store.clone(), cache.clone(), cfg.mesh.clone()).with_debounce(cfg.debounce);
    if cfg.source == SourceConfig::Kube {
        let client = kube_client().await?;
        reconciler = reconciler
            .with_status(crate::status::StatusWriter::spawn(client.clone()))
            .with_deployer(WaypointDeployer::spawn(
                client,
                cfg.waypoint.clone(),
                cfg.mesh.clone(),
                crate::ca::der_to_pem("CERTIFICATE", ca.root()),
                store.clone(),
            ));
    }
    let stats = reconciler.stats();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = reconciler.run() => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    let stream_auth: StreamAuth = {
        let authenticator = authenticator.clone();
        let cluster = cfg.ca.cluster_id.clone();
        Arc::new(move |md: tonic::metadata::MetadataMap| {
            let authenticator = authenticator.clone();
            let cluster = cluster.clone();
            Box::pin(async move {
                let caller = authenticator.authenticate(&md).await?;
                crate::ca::check_cluster(cluster.as_deref(), &md).map_err(|e| e.status())?;
                Ok(caller.identity)
            })
        })
    };
    let scope = crate::ads::waypoint_scope(cfg.mesh.trust_domain.clone(), cache.clone());
    // A proxy holds one delta stream per connection.
    let ads = AdsServer::new(cache)
        .with_auth(stream_auth)
        .with_scope(scope)
        .with_max_streams_per_peer(cfg.limits.grpc.max_connections_per_peer);
    let workload_ca = WorkloadCa::new(
        ca,
        cfg.ca.clone(),
        authenticator,
        Arc::new(StorePods::new(store.clone())),
    );

    cfg.limits
        .grpc
        .validate("grpc")
        .and_then(|()| cfg.limits.monitoring.validate("monitoring"))?;
    let fds = Arc::new(FdHeadroom::new(cfg.limits.fd_headroom));
    let socket = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = socket.local_addr()?;
    let listener = Listener::new(socket, "grpc", cfg.limits.grpc, fds.clone());
    let grpc_listener = listener.stats_handle();
    let routes = tonic::service::Routes::new(ads.clone().into_service()).add_service(
        workload_ca
            .into_server()
            .max_decoding_message_size(1024 * 1024),
    );
    tokio::spawn(serve_grpc(listener, acceptor, routes, stop.clone()));
    info!(%addr, "controller serving delta xDS and the CA over TLS");
    Ok(Running {
        addr,
        store,
        ads,
        stats,
        limits: cfg.limits,
        fds,
        grpc_listener,
    })
}

async fn kube_client() -> Result<kube::Client> {
    let mut config = kube::Config::infer().await.context(
        "finding the Kubernetes API (in-cluster config or KUBECONFIG); use --config-dir to run \
         without a cluster",
    )?;
    // The watchers and the CA have their own backoff and deadlines; kube's built-in retry of
    // 429/503/504 (minutes in total) would only hide an outage under them.
    config.default_retry = false;
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Accepts gRPC connections until `stop`, each served on its own task: TLS and the HTTP/2
/// preface + SETTINGS within the handshake deadline, then hyper's HTTP/2 server over the tonic
/// routes, with keepalive PINGs and a graceful GOAWAY once no call or stream has been in flight
/// for the idle timeout.
async fn serve_grpc(
    listener: Listener<TcpListener>,
    acceptor: tokio_rustls::TlsAcceptor,
    routes: tonic::service::Routes,
    stop: CancellationToken,
) {
    let mut h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    h2.timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let limits = *listener.limits();
    loop {
        let a = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (acceptor, routes, stop, h2) =
            (acceptor.clone(), routes.clone(), stop.clone(), h2.clone());
        tokio::spawn(async move {
            let _permit = a.permit;
            let peer = a.peer;
            let _ = a.stream.set_nodelay(true);
            // What tonic's own server puts in each request (`Request::remote_addr`).
            let info = tonic::transport::server::TcpConnectInfo {
                local_addr: a.stream.local_addr().ok(),
                remote_addr: peer,
            };
            let tls = match zmesh_core::serve::tls_accept(
                &acceptor,
                a.stream,
                a.deadline,
                limits.handshake_timeout,
            )
            .await
            {
                Ok(tls) => tls,
                Err(e) => {
                    debug!(?peer, error = ?PeerText::display(&e, PEER_ERROR_MAX),
                        "gRPC connection closed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info.clone());
                    let mut routes = routes.clone();
                    tonic::codegen::Service::call(&mut routes, req)
                },
            );
            if let Err(e) = zmesh_core::serve::serve_h2(
                tls,
                &h2,
                svc,
                Activity::new(),
                &limits,
                a.deadline,
                &stop,
            )
            .await
            {
                // A GOAWAY's debug data (up to a frame, 1 MiB) is in the error.
                debug!(?peer, error = ?PeerText::display(&e, PEER_ERROR_MAX),
                    "gRPC connection closed");
            }
        });
    }
}
