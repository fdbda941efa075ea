//! The node agent's health endpoint: `GET /readyz` on `--health-addr` (default
//! `0.0.0.0:8000`, the port and path of Istio's CNI node agent readiness probe), served on the
//! shared accept path (`zmesh_core::serve`). The DaemonSet's readinessProbe and
//! `zmeshctl check` ("CNI plugin chained on every node") read it.
//!
//! Ready (200) only while both hold, each re-checked on every request:
//!
//! - the plugin is chained ([`chain_state`]): the file a container runtime loads from the conf
//!   dir (the lexicographically first valid config, see [`crate::install`]) has our
//!   `zmesh-cni` entry, and the plugin binary is in the bin dir. An agent started without
//!   `--cni-conf-dir` installs nothing and skips this part ([`Health::chain`] is `null`);
//! - a ztunnel is connected over ZDS (as the plugin API's `GET /v1/ready`).
//!
//! Otherwise 503. Both answers carry a [`Health`] document (JSON) whose `reasons` say what is
//! wrong and what to check, e.g. `zmesh-cni missing from 10-calico.conflist, the file the
//! container runtime loads from /etc/cni/net.d`, followed by the installer's last error when
//! it could not put the entry back ([`RepairStats::last_error`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zmesh_core::serve::{FdHeadroom, Limits, Listener, serve_http1};

use crate::install::{self, PLUGIN_TYPE, RepairStats};

/// The default listen address: all addresses (the kubelet probes the pod IP, which is the
/// node's: the agent runs in the host network), port 8000 like Istio's CNI agent.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8000";
/// The readiness path.
pub const READYZ_PATH: &str = "/readyz";

/// What `GET /readyz` answers (JSON), with 200 when `ready` and 503 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The chain is in place (or not managed here) and a ztunnel is connected.
    pub ready: bool,
    /// Whether the plugin is chained; `None` when the agent does not install it (no
    /// `--cni-conf-dir`).
    pub chain: Option<ChainState>,
    /// Whether a ztunnel is connected over ZDS.
    pub ztunnel_connected: bool,
    /// Why not ready, each naming what to check; empty when ready.
    pub reasons: Vec<String>,
}

/// The plugin's place in the node's CNI configuration, as a container runtime would see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    /// Our entry is in the file the runtime loads and the plugin binary is installed.
    pub chained: bool,
    /// The file the runtime loads, if there is one.
    pub primary: Option<PathBuf>,
    /// `chained in <file>`, or what is wrong (the reasons joined with `; `).
    pub detail: String,
}

/// Where the chain is checked: the agent's `--cni-conf-dir` and `--cni-bin-dir`, and its
/// installer's counters (for the reason it could not repair the entry).
#[derive(Debug, Clone)]
pub struct ChainSource {
    /// The CNI configuration directory.
    pub conf_dir: PathBuf,
    /// The CNI plugin binary directory.
    pub bin_dir: PathBuf,
    /// The running installer's counters.
    pub repairs: RepairStats,
}

/// Reads the CNI configuration now and says whether our plugin is chained. `repair_error` (the
/// installer's last failure) is added to the reasons when it is not.
pub fn chain_state(conf_dir: &Path, bin_dir: &Path, repair_error: Option<String>) -> ChainState {
    let mut problems = Vec::new();
    let mut primary_path = None;
    match install::scan(conf_dir) {
        Err(e) => problems.push(e.to_string()),
        Ok(scan) => match scan.primary() {
            None => {
                let skipped: Vec<String> = scan.skipped.iter().map(ToString::to_string).collect();
                let mut p = format!(
                    "no CNI network config in {} (a *.conflist, *.conf or *.json): the primary \
                     CNI has not written one on this node; check its pods",
                    conf_dir.display()
                );
                if !skipped.is_empty() {
                    p.push_str(&format!(" (skipped as invalid: {})", skipped.join(" | ")));
                }
                problems.push(p);
            }
            Some(primary) => {
                primary_path = Some(primary.path.clone());
                if !primary.has_entry() {
                    let mut p = format!(
                        "{PLUGIN_TYPE} missing from {}, the file the container runtime loads \
                         from {}",
                        file_name(&primary.path),
                        conf_dir.display()
                    );
                    if let Some(other) = scan.valid.iter().skip(1).find(|f| f.has_entry()) {
                        p.push_str(&format!(
                            " (it is in {}, which sorts after it and is not loaded)",
                            file_name(&other.path)
                        ));
                    }
                    problems.push(p);
                }
            }
        },
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match std::fs::metadata(&binary) {
        Ok(m)
            if m.is_file()
                && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0 => {}
        Ok(_) => problems.push(format!("{} is not an executable file", binary.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
            "the plugin binary {PLUGIN_TYPE} is missing from {} (restart the agent to install it \
             again)",
            bin_dir.display()
        )),
        Err(e) => problems.push(format!("cannot read {}: {e}", binary.display())),
    }
    if problems.is_empty() {
        let detail = match &primary_path {
            Some(p) => format!("chained in {}", p.display()),
            None => "chained".to_owned(),
        };
        return ChainState {
            chained: true,
            primary: primary_path,
            detail,
        };
    }
    if let Some(e) = repair_error {
        problems.push(format!("the agent cannot put it back: {e}"));
    }
    ChainState {
        chained: false,
        primary: primary_path,
        detail: problems.join("; "),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The facts behind [`Health`], read on each request.
#[derive(Clone)]
pub struct HealthSource {
    /// The chain to check; `None` when the agent does not install the plugin.
    pub chain: Option<ChainSource>,
    /// Whether a ztunnel is connected (the agent's `ready`).
    pub ztunnel_connected: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for HealthSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthSource")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl HealthSource {
    /// The health now (the configuration is read off the async threads).
    pub async fn health(&self) -> Health {
        let chain = match self.chain.clone() {
            None => None,
            Some(c) => {
                let read = tokio::task::spawn_blocking(move || {
                    chain_state(&c.conf_dir, &c.bin_dir, c.repairs.last_error())
                });
                Some(read.await.unwrap_or_else(|e| ChainState {
                    chained: false,
                    primary: None,
                    detail: format!("the CNI config check failed: {e}"),
                }))
            }
        };
        let ztunnel_connected = (self.ztunnel_connected)();
        let mut reasons = Vec::new();
        if let Some(c) = chain.as_ref().filter(|c| !c.chained) {
            reasons.push(c.detail.clone());
        }
        if !ztunnel_connected {
            reasons.push(
                "ztunnel not connected: no ztunnel is connected to the agent's ZDS socket (is \
                 the ztunnel pod on this node running?)"
                    .to_owned(),
            );
        }
        Health {
            ready: reasons.is_empty(),
            chain,
            ztunnel_connected,
            reasons,
        }
    }
}

/// Why the health endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The address could not be bound.
    #[error(
        "cannot listen on the health address {addr}: {source}; free the port or choose another \
         with --health-addr (and the DaemonSet's readinessProbe port)"
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running health endpoint; stops when dropped.
#[derive(Debug)]
pub struct HealthServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HealthServer {
    /// Listens on `addr` and answers from `source`. Must be called inside a tokio runtime.
    pub async fn bind(addr: SocketAddr, source: HealthSource) -> Result<HealthServer, HealthError> {
        let listen = |source| HealthError::Listen { addr, source };
        let socket = TcpListener::bind(addr).await.map_err(listen)?;
        let addr = socket.local_addr().map_err(listen)?;
        let task = tokio::spawn(accept_loop(socket, source));
        Ok(HealthServer { addr, task })
    }

    /// The bound address (the actual port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A probe endpoint: few connections, short-lived.
fn limits() -> Limits {
    Limits {
        max_connections: 64,
        max_connections_per_peer: 16,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
    }
}

async fn accept_loop(socket: TcpListener, source: HealthSource) {
    let limits = limits();
    let listener = Listener::new(socket, "health", limits, FdHeadroom::process(0.9));
    let never = CancellationToken::new();
    loop {
        let a = listener.accept().await;
        let (source, never) = (source.clone(), never.clone());
        tokio::spawn(async move {
            let _permit = a.permit;
            let svc = service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(handle(&source, &req).await) }
            });
            if let Err(e) = serve_http1(a.stream, svc, &limits, &never).await {
                tracing::debug!("health connection ended: {e}");
            }
        });
    }
}

async fn handle(source: &HealthSource, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.uri().path(), req.method()) {
        (READYZ_PATH, &Method::GET) => {
            let health = source.health().await;
            let status = if health.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::to_vec_pretty(&health).unwrap_or_default();
            body.push(b'\n');
            answer(status, "application/json", body)
        }
        (READYZ_PATH, _) => answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"method not allowed: GET /readyz\n".to_vec(),
        ),
        (path, _) => answer(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint {path}: GET {READYZ_PATH}\n").into_bytes(),
        ),
    }
}

fn answer(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests;
