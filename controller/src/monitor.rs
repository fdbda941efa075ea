//! The controller's monitoring port (15014 by default, like istiod's): `/ready` for a
//! readiness probe (200 once the first complete config is being served), `/metrics` in
//! Prometheus text, `/debug/status` as JSON (last pass, connected proxies).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use zmesh_core::serve::{Listener, serve_http1};

use crate::server::Running;
use crate::translate::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Renders the metrics from the running controller's current state.
fn metrics(running: &Running) -> String {
    let mut reg = Registry::default();
    let objects = Family::<KindLabel, Gauge>::default();
    {
        let store = running.store.read();
        for kind in Kind::ALL {
            objects
                .get_or_create(&KindLabel {
                    kind: kind.api().1.to_owned(),
                })
                .set(store.count(kind) as i64);
        }
    }
    reg.register(
        "zmesh_controller_objects",
        "Kubernetes objects held, per kind",
        objects,
    );
    let streams = running.ads.streams();
    let gauge = |v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        g
    };
    reg.register(
        "zmesh_controller_xds_streams",
        "Connected delta ADS streams",
        gauge(streams.len() as i64),
    );
    reg.register(
        "zmesh_controller_xds_stream_nacks",
        "NACKs received on the connected streams",
        gauge(streams.iter().map(|s| s.nacks as i64).sum()),
    );
    let stats = running
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    reg.register(
        "zmesh_controller_address_resources",
        "Workload and Service resources served",
        gauge(stats.addresses as i64),
    );
    reg.register(
        "zmesh_controller_authorization_resources",
        "Authorization resources served",
        gauge(stats.authorizations as i64),
    );
    let f: Gauge<f64, AtomicU64> = Gauge::default();
    f.set(stats.translate.as_secs_f64());
    reg.register(
        "zmesh_controller_last_translation_seconds",
        "Duration of the latest full translation",
        f,
    );
    reg.register(
        "zmesh_controller_last_pass_changed_resources",
        "Resources upserted or removed by the latest pass",
        gauge((stats.changed + stats.removed) as i64),
    );
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        warn!(error = %e, "encoding metrics failed");
    }
    out
}

fn status(running: &Running) -> String {
    let stats = running
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let streams: Vec<_> = running
        .ads
        .streams()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "node": s.node.as_ref().map(|n| n.id.clone()),
                "node_name": s.node.as_ref().and_then(|n| n.node_name.clone()),
                "nacks": s.nacks,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "ready": running.ads.cache().is_ready(),
        "generation": stats.generation,
        "addresses": stats.addresses,
        "authorizations": stats.authorizations,
        "last_pass": {
            "changed": stats.changed,
            "removed": stats.removed,
            "translate_ms": stats.translate.as_secs_f64() * 1e3,
            "apply_ms": stats.apply.as_secs_f64() * 1e3,
        },
        "streams": streams,
        "limits": running.limits,
        "listeners": {
            "grpc": running.grpc_listener.stats(),
            "open_descriptors": running.fds.last_count(),
            "descriptor_threshold": running.fds.threshold(),
        },
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

fn respond(running: &Running, path: &str) -> Response<Full<Bytes>> {
    let (code, body) = match path {
        "/ready" if running.ads.cache().is_ready() => (StatusCode::OK, "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the cluster state is still loading\n".to_owned(),
        ),
        "/metrics" => (StatusCode::OK, metrics(running)),
        "/debug/status" => (StatusCode::OK, status(running)),
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /ready, /metrics or /debug/status\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp
}

/// Serves the monitoring port until `stop`.
pub async fn serve(
    addr: SocketAddr,
    running: Running,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let socket = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the monitoring port {addr}: {e}"))?;
    let bound = socket.local_addr()?;
    // Plain HTTP on 0.0.0.0 by default: a request head within the deadline, idle connections
    // closed, connections capped and shed before the process runs out of descriptors.
    let limits = running.limits.monitoring;
    let listener = Listener::new(socket, "monitoring", limits, running.fds.clone());
    tokio::spawn(async move {
        loop {
            let a = tokio::select! {
                a = listener.accept() => a,
                _ = stop.cancelled() => return,
            };
            let (running, stop) = (running.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = a.permit;
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = respond(&running, req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = serve_http1(a.stream, svc, &limits, &stop).await {
                    debug!(peer = ?a.peer, error = %e, "monitoring connection");
                }
            });
        }
    });
    Ok(bound)
}
