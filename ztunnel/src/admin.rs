//! The operator's endpoints: admin on localhost:15000 (`/config_dump`, `/logging`,
//! `/quitquitquit`), Prometheus on 15020 (`/metrics`, `/stats/prometheus`) and readiness on
//! 15021 (`/healthz/ready`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use zmesh_core::serve::{FdHeadroom, Listener, serve_http1};

use crate::config::Listeners;
use crate::proxy::Node;
use crate::registry::Proxies;

/// Changes the log filter at run time (`/logging?level=...`); returns the filter in force.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

type Body = Full<Bytes>;

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn text(code: StatusCode, body: impl Into<String>) -> Response<Body> {
    reply(code, "text/plain; charset=utf-8", body.into())
}

/// Serves HTTP/1.1 with `handler` until `stop` is cancelled, with `limits` (a request head
/// within the handshake timeout, idle connections closed, caps, descriptor headroom).
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    limits: Listeners,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let admin = limits.admin;
    let listener = Listener::new(
        listener,
        name,
        admin,
        FdHeadroom::process(limits.fd_headroom),
    );
    loop {
        let a = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (h, stop) = (handler.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = a.permit;
            let svc = service_fn(move |req| {
                let h = h.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            if let Err(e) = serve_http1(a.stream, svc, &admin, &stop).await {
                tracing::debug!(listener = name, peer = ?a.peer, error = %e, "connection ended");
            }
        });
    }
}

/// The AuthorizationPolicies as `/config_dump` shows them: name, namespace, scope, action,
/// dry run and the number of rules (the rules themselves under `rules_detail`).
fn policies_dump(set: &zmesh_core::policy::PolicySet) -> serde_json::Value {
    set.policies()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "namespace": p.namespace,
                "scope": p.scope,
                "action": p.action,
                "dry_run": p.dry_run,
                "rules": p.rules.len(),
                "rules_detail": p.rules,
            })
        })
        .collect()
}

/// State shown and controlled by the admin endpoints.
pub struct Admin {
    pub node: Arc<Node>,
    pub proxies: Arc<Proxies>,
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    /// The xDS client, when config comes from the controller: readiness also waits for its
    /// first config, and `/config_dump` shows its connection.
    pub xds: Option<crate::xds::Xds>,
    pub log: LogControl,
    /// Cancelled by `/quitquitquit`: starts the drain, as SIGTERM does.
    pub quit: CancellationToken,
}

impl Admin {
    pub async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config_dump") => {
                reply(StatusCode::OK, "application/json", self.config_dump())
            }
            (m, "/logging") if m == Method::GET || m == Method::POST => {
                let level = req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("level="))
                        .map(|l| l.replace("%3D", "=").replace("%2C", ","))
                });
                let reset = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "reset"));
                if *m == Method::GET && (level.is_some() || reset) {
                    return text(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "use POST to change the log level\n",
                    );
                }
                let arg = if reset { Some("") } else { level.as_deref() };
                match (self.log)(arg) {
                    Ok(now) => text(StatusCode::OK, format!("current log level is {now}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid level: {e}\n")),
                }
            }
            (&Method::POST, "/quitquitquit") => {
                self.quit.cancel();
                text(StatusCode::OK, "draining\n")
            }
            (_, "/") => text(
                StatusCode::OK,
                "GET /config_dump\nGET|POST /logging[?level=<filter>|?reset]\nPOST /quitquitquit\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
        }
    }

    fn config_dump(&self) -> String {
        let st = self.node.state.load();
        let proxies: Vec<_> = self
            .proxies
            .snapshot()
            .into_iter()
            .map(|(key, p)| {
                serde_json::json!({
                    "key": key,
                    "workload": &p.workload,
                    "identity": p.identity.to_string(),
                    "netns": p.sockets.netns.as_ref().map(|n| format!("{:?}", n.id())),
                    "open_connections": p.tracker.len(),
                    "pool": p.pool.stats(),
                })
            })
            .collect();
        let dump = serde_json::json!({
            "config": &*self.node.cfg,
            "proxies": proxies,
            "workloads": st.workloads().iter().map(|w| &**w).collect::<Vec<_>>(),
            "services": st.services().map(|s| &**s).collect::<Vec<_>>(),
            "policies": policies_dump(st.policies()),
            "open_inbound_connections": self.node.conns.len(),
            "certificates": self.node.certs.summaries(),
            "xds": self.xds.as_ref().map(|x| x.status()),
            "version": env!("CARGO_PKG_VERSION"),
        });
        serde_json::to_string_pretty(&dump).unwrap_or_default()
    }

    pub async fn stats(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match req.uri().path() {
            "/metrics" | "/stats/prometheus" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "see /metrics\n"),
        }
    }

    /// Proxies started (and, with xDS, the first config from the controller applied).
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.xds.as_ref().is_none_or(|x| x.is_ready())
    }

    pub async fn readiness(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match req.uri().path() {
            "/healthz/ready" if self.is_ready() => text(StatusCode::OK, "ready\n"),
            "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => text(StatusCode::NOT_FOUND, "see /healthz/ready\n"),
        }
    }
}
