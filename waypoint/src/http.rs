//! The L7 proxy on a tunnel: hyper serves HTTP/1.1 (keep-alive, upgrades) or HTTP/2 to the
//! client; each request goes to an endpoint of the bound service in the same protocol (or
//! HTTP/2 on ports declared `http2`/`grpc`), bodies and trailers streamed frame by frame.
//! With no route configured every request goes to the service, as a plain L7 proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::app::Waypoint;
use crate::body::{CountedBody, Finish, ResponseBody};
use crate::bound::Binding;
use crate::telemetry::{RequestLabels, RequestRecord, SourceMeta};
use crate::upstream::{Sender, endpoints};

/// Who is on the other end of a tunnel, and which service port it asked for.
#[derive(Debug)]
pub struct Downstream {
    /// The HBONE peer (the client's node tunnel, from the client pod's address).
    pub peer: SocketAddr,
    /// The client, as the CONNECT's `forwarded` header names it (informational).
    pub client: Option<SocketAddr>,
    /// The peer's SPIFFE id, from its certificate.
    pub principal: Option<String>,
    pub source: SourceMeta,
    /// The CONNECT target, `VIP:port`.
    pub target: SocketAddr,
    pub binding: Binding,
}

/// Connection-specific headers (RFC 9110 §7.6.1), never forwarded; `te: trailers` is kept.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "http2-settings",
];

fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        if upgrade && (n == "connection" || n == "upgrade") {
            continue;
        }
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A local answer (no upstream response): the record finished with `flags`.
fn local(
    mut record: RequestRecord,
    code: StatusCode,
    flags: &'static str,
) -> Response<ResponseBody> {
    record.labels.response_code = code.as_u16().to_string();
    record.labels.traffic.response_flags = flags;
    let mut r = Response::new(ResponseBody::empty(Some(Finish {
        record,
        in_flight: None,
        h1: None,
    })));
    *r.status_mut() = code;
    r
}

/// Proxies one request. `up_h2`: speak HTTP/2 to the endpoint.
pub async fn proxy(
    wp: Arc<Waypoint>,
    ds: Arc<Downstream>,
    mut req: Request<Incoming>,
    up_h2: bool,
) -> Response<ResponseBody> {
    let svc = &ds.binding.service;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{}:{}", svc.hostname, ds.binding.port.port));
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut labels = RequestLabels::default();
    labels.source(&ds.source, ds.principal.clone());
    labels.service(&svc.hostname, &svc.name, &svc.namespace);
    labels.traffic.request_protocol = if is_grpc(req.headers()) {
        "grpc"
    } else {
        "http"
    };
    let src = ds.client.unwrap_or(ds.peer);
    let mut record = RequestRecord::new(
        wp.metrics.clone(),
        labels,
        src,
        req.method().as_str(),
        &path,
        &authority,
    );
    // HTTP/1.1 upgrades (WebSocket): both sides are upgraded, then bytes are copied.
    let down_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));

    let snap = wp.snapshot.load_full();
    let eps = endpoints(&snap, &ds.binding);
    if eps.is_empty() {
        record.error = Some(format!("service {} has no healthy endpoint", svc.key()));
        return local(record, StatusCode::SERVICE_UNAVAILABLE, "UH");
    }
    // A failed connect is retried on each other endpoint once.
    let mut chosen = None;
    for ep in wp.upstreams.order(&ds.binding, eps) {
        match wp
            .upstreams
            .sender(&ep, up_h2, ds.client, &svc.hostname)
            .await
        {
            Ok(s) => {
                chosen = Some((ep, s));
                break;
            }
            Err(e) => {
                tracing::warn!(endpoint = %ep.addr, service = %svc.key(), error = %e, "upstream connect failed; trying another endpoint");
                record.error = Some(e.to_string());
            }
        }
    }
    let Some((ep, sender)) = chosen else {
        return local(record, StatusCode::SERVICE_UNAVAILABLE, "UF");
    };
    record.error = None;
    record.upstream = Some(ep.addr);
    record.labels.destination(&ep.workload);
    let in_flight = wp.upstreams.begin(ep.addr);

    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, down_upgrade.is_some());
    let uri = if up_h2 {
        parts.headers.remove(header::HOST);
        Uri::try_from(format!("http://{authority}{path}"))
    } else {
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::try_from(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        Uri::try_from(path.as_str())
    };
    match uri {
        Ok(u) => parts.uri = u,
        Err(e) => {
            record.error = Some(format!("cannot rebuild the request URI: {e}"));
            return local(record, StatusCode::BAD_REQUEST, "DPE");
        }
    }
    if up_h2 {
        parts.version = http::Version::HTTP_2;
    } else {
        parts.version = http::Version::HTTP_11;
    }
    let up_req = Request::from_parts(parts, CountedBody::new(body, record.request_bytes.clone()));
    let sent = match sender {
        Sender::Http1(mut c) => c.sender.send_request(up_req).await.map(|r| (r, Some(c))),
        Sender::Http2(mut s) => s.send_request(up_req).await.map(|r| (r, None)),
    };
    let (mut resp, h1) = match sent {
        Ok(r) => r,
        Err(e) => {
            record.error = Some(format!("upstream {}: {e}", ep.addr));
            return local(record, StatusCode::SERVICE_UNAVAILABLE, "UC");
        }
    };
    record.labels.response_code = resp.status().as_u16().to_string();
    if let Some(s) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        // A trailers-only gRPC answer.
        record.labels.grpc_response_status = s.to_owned();
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = down_upgrade
    {
        let up = hyper::upgrade::on(&mut resp);
        let (parts, _) = resp.into_parts();
        let peer = ep.addr;
        // The upgraded connection is part of the request, as Envoy records an upgrade: the
        // record (bytes both ways, duration) is made when the connection ends.
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut record = record;
            match tokio::try_join!(down, up) {
                Ok((d, u)) => {
                    let r =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u))
                            .await;
                    match r {
                        Ok((to_upstream, to_client)) => {
                            record
                                .request_bytes
                                .fetch_add(to_upstream, std::sync::atomic::Ordering::Relaxed);
                            record.response_bytes += to_client;
                        }
                        Err(e) => record.error = Some(format!("upgraded connection: {e}")),
                    }
                    tracing::debug!(upstream = %peer, "upgraded connection ended");
                }
                Err(e) => {
                    tracing::debug!(upstream = %peer, error = %e, "upgrade failed");
                    record.error = Some(format!("upgrade failed: {e}"));
                }
            }
            record.finish();
        });
        return Response::from_parts(parts, ResponseBody::empty(None));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let finish = Finish {
        record,
        in_flight: Some(in_flight),
        h1: h1.map(|c| (wp.upstreams.clone(), c)),
    };
    Response::from_parts(parts, ResponseBody::upstream(body, finish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
    }
}
