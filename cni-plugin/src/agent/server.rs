//! The plugin → agent API of docs/CNI.md on HTTP/1.1 over a unix socket (mode 0600: only
//! root, which the plugin runs as, may connect).
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/cni/add` | `200 {"enrolled": bool}`, `503 {"error"}` (retry), `400 {"error"}` |
//! | `POST /v1/cni/del` | `200 {}` always |
//! | `GET /v1/ready` | `200 {}` when a ztunnel is connected, else `503 {"error"}` |
//!
//! Anything else is `404`, a wrong method `405`, a body over 64 KiB `413`.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use zmesh_core::serve::{FdHeadroom, Limits, Listener, serve_http1};

use super::dataplane::Dataplane;
use super::service::Agent;
use crate::api::{
    ADD_PATH, AddRequest, DEL_PATH, DelRequest, DelResponse, ErrorResponse, READY_PATH,
};

/// Permissions of the API socket file.
pub const SOCKET_MODE: u32 = 0o600;
/// The file name of the API socket in the agent's run directory.
pub const SOCKET_FILE: &str = "agent.sock";
/// The largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error(
        "cannot listen on the agent socket {}: {source} (does its directory exist, and is no \
         other agent running?)",
        path.display()
    )]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A running API server; stops accepting (and removes its socket file) when dropped.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Listens on `path` and serves `agent`. A stale socket file is replaced; one that a
    /// process still answers on is an error. Must be called inside a tokio runtime.
    pub fn bind<D: Dataplane>(path: &Path, agent: Arc<Agent<D>>) -> Result<ApiServer, ServerError> {
        let listen = |source| ServerError::Listen {
            path: path.to_owned(),
            source,
        };
        // A socket someone answers on belongs to a running agent: do not steal it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(listen(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is serving on it",
            )));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen(e)),
        }
        let listener = UnixListener::bind(path).map_err(listen)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(listen)?;
        let task = tokio::spawn(accept_loop(listener, agent));
        Ok(ApiServer {
            path: path.to_owned(),
            task,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The limits of the API socket (`zmesh_core::serve`): only root can connect, but a stuck or
/// buggy plugin must not pin the agent's descriptors either.
fn limits() -> Limits {
    Limits {
        max_connections: 256,
        max_connections_per_peer: 256,
        handshake_timeout: std::time::Duration::from_secs(10),
        idle_timeout: std::time::Duration::from_secs(30),
    }
}

async fn accept_loop<D: Dataplane>(listener: UnixListener, agent: Arc<Agent<D>>) {
    let limits = limits();
    let listener = Listener::new(listener, "cni-api", limits, FdHeadroom::process(0.9));
    let never = CancellationToken::new();
    loop {
        let a = listener.accept().await;
        let (agent, never) = (agent.clone(), never.clone());
        tokio::spawn(async move {
            let _permit = a.permit;
            let svc = service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(handle(&agent, req).await) }
            });
            if let Err(e) = serve_http1(a.stream, svc, &limits, &never).await {
                debug!("plugin connection ended: {e}");
            }
        });
    }
}

/// Answers one request.
async fn handle<D: Dataplane>(agent: &Agent<D>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (path.as_str(), method) {
        (ADD_PATH, Method::POST) => {
            let add: AddRequest = match read_json(req).await {
                Ok(a) => a,
                Err(answer) => return answer,
            };
            match agent.add(&add).await {
                Ok(answer) => json(StatusCode::OK, &answer),
                Err(e) => {
                    warn!(pod = %format!("{}/{}", add.pod_namespace, add.pod_name), "ADD failed: {e}");
                    let status =
                        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    error(status, e.to_string())
                }
            }
        }
        (DEL_PATH, Method::POST) => {
            let del: DelRequest = match read_json(req).await {
                Ok(d) => d,
                Err(answer) => return answer,
            };
            agent.del(&del).await;
            json(StatusCode::OK, &DelResponse {})
        }
        (READY_PATH, Method::GET) => {
            if agent.ready() {
                json(StatusCode::OK, &DelResponse {})
            } else {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no ztunnel is connected to the node agent (is ztunnel running on this node?)",
                )
            }
        }
        (ADD_PATH | DEL_PATH | READY_PATH, _) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    }
}

/// Reads and parses a JSON body; the error is the answer to send.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("bad request: invalid JSON body: {e}"),
        )
    })
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &ErrorResponse { error: text.into() })
}
