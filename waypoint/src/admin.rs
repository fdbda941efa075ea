//! Metrics (`/metrics`, `/stats/prometheus`) and readiness (`/healthz/ready`: the certificate
//! is at hand and the config known) on one HTTP/1.1 listener (15020), on the shared accept path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use zmesh_core::serve::{FdHeadroom, Listener, serve_http1};

use crate::app::Waypoint;

fn text(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(wp: Arc<Waypoint>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &wp.registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/healthz/ready" => {
            let ready = wp
                .certs
                .summaries()
                .iter()
                .any(|c| c.identity == wp.cfg.identity.to_string());
            let config = wp.config_ready.load(std::sync::atomic::Ordering::Acquire);
            match (ready, config) {
                (true, true) => text(StatusCode::OK, "text/plain", "ready\n".into()),
                (false, _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no certificate yet\n".into(),
                ),
                (true, false) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no config from the controller yet\n".into(),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin listener until draining.
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener) {
    let limits = wp.cfg.admin_limits;
    let listener = Listener::new(
        listener,
        "admin",
        limits,
        FdHeadroom::process(wp.cfg.fd_headroom),
    );
    loop {
        let a = tokio::select! {
            _ = wp.drain.cancelled() => return,
            a = listener.accept() => a,
        };
        let w = wp.clone();
        let permit = a.permit;
        tokio::spawn(async move {
            let _permit = permit;
            let stop = w.drain.clone();
            let svc = service_fn(move |req| {
                let w = w.clone();
                async move { Ok::<_, Infallible>(handle(w, req).await) }
            });
            if let Err(e) = serve_http1(a.stream, svc, &limits, &stop).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}
