//! Sending a request to a Service: endpoints in load-balancing order (a failed connect moves
//! on to the next endpoint), per-attempt timeout (`backendRequest`), retries on the listed
//! status codes and on connection errors with backoff (only when the body was kept), and
//! fire-and-forget mirrors (a kept body sent again, or a copy streamed alongside the original).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::time::Instant;

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::task::AbortHandle;

use crate::app::Waypoint;
use crate::body::{CountedBody, KeptBody, ReqBody};
use crate::bound::Binding;
use crate::route::Retry;
use crate::upstream::{Endpoint, H1Checkout, InFlight, Sender, Upstreams, endpoints};

/// The request as sent upstream: moved into the last attempt, cloned only for an attempt that
/// may be followed by a retry (and for mirrors).
#[derive(Clone)]
pub struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Outgoing {
    fn request(self, body: ReqBody, bytes: &Arc<AtomicU64>) -> Request<CountedBody<ReqBody>> {
        let mut r = Request::new(CountedBody::new(body, bytes.clone()));
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers;
        r
    }
}

/// A response from an endpoint, with what must live as long as its body.
pub struct Sent {
    pub resp: Response<Incoming>,
    /// When this attempt's `backendRequest` timeout ends (and the timeout), if one applies:
    /// it covers the response body too ("to when the full response has been received").
    pub deadline: Option<(Instant, Duration)>,
    pub ep: Endpoint,
    pub h1: Option<H1Checkout>,
    pub in_flight: InFlight,
}

/// A failure answered locally: status, Envoy-style response flag, why.
pub struct Failed {
    pub code: StatusCode,
    pub flags: &'static str,
    pub why: String,
}

/// Where and how to send.
pub struct Target<'a> {
    pub binding: &'a Binding,
    /// The worker's upstream side (its pool drives the connections on its runtime).
    pub upstreams: &'a Upstreams,
    pub up_h2: bool,
    pub client: Option<SocketAddr>,
}

/// One attempt: the endpoints in order until one connects, then the request.
async fn once(
    wp: &Waypoint,
    t: &Target<'_>,
    out: Outgoing,
    body: ReqBody,
    bytes: &Arc<AtomicU64>,
) -> Result<Sent, Failed> {
    let svc = &t.binding.service;
    let snap = wp.snapshot.load_full();
    let eps = endpoints(&snap, t.binding);
    if eps.is_empty() {
        return Err(Failed {
            code: StatusCode::SERVICE_UNAVAILABLE,
            flags: "UH",
            why: format!("service {} has no healthy endpoint", svc.key()),
        });
    }
    let mut chosen = None;
    let mut why = String::new();
    for ep in t.upstreams.order(t.binding, &eps) {
        match t
            .upstreams
            .sender(ep, t.up_h2, t.client, &svc.hostname)
            .await
        {
            Ok(s) => {
                chosen = Some((ep.clone(), s));
                break;
            }
            Err(e) => {
                tracing::warn!(endpoint = %ep.addr, service = %svc.key(), error = %e, "upstream connect failed; trying another endpoint");
                why = e.to_string();
            }
        }
    }
    let Some((ep, sender)) = chosen else {
        return Err(Failed {
            code: StatusCode::SERVICE_UNAVAILABLE,
            flags: "UF",
            why,
        });
    };
    let in_flight = t.upstreams.begin(ep.addr);
    let req = out.request(body, bytes);
    let sent = match sender {
        Sender::Http1(mut c) => c.sender.send_request(req).await.map(|r| (r, Some(c))),
        Sender::Http2(mut s) => s.send_request(req).await.map(|r| (r, None)),
    };
    match sent {
        Ok((resp, h1)) => Ok(Sent {
            resp,
            deadline: None,
            ep,
            h1,
            in_flight,
        }),
        Err(e) => Err(Failed {
            code: StatusCode::SERVICE_UNAVAILABLE,
            flags: "UC",
            why: format!("upstream {}: {e}", ep.addr),
        }),
    }
}

/// Sends `out` with retries (`retry`, when `kept` holds the body) and a per-attempt
/// timeout. The last response (even a retriable status) is returned when attempts run out.
pub async fn send(
    wp: &Waypoint,
    t: &Target<'_>,
    out: Outgoing,
    mut body: Result<KeptBody, ReqBody>,
    retry: Option<&Retry>,
    per_try: Option<Duration>,
    bytes: &Arc<AtomicU64>,
) -> Result<Sent, Failed> {
    let retries = match (&body, retry) {
        (Ok(_), Some(r)) => r.attempts,
        _ => 0,
    };
    let mut attempt = 0;
    let mut out = Some(out);
    loop {
        // The last attempt takes the request; one that may be retried sends a copy.
        let this_out = if attempt >= retries {
            out.take()
        } else {
            out.clone()
        }
        .expect("the request is taken by the last attempt only");
        // `istio_request_bytes` counts the body once: what the last attempt sent.
        bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        let this = match &mut body {
            Ok(k) => k.body(),
            Err(b) => std::mem::replace(
                b,
                ReqBody::Kept {
                    data: None,
                    trailers: None,
                },
            ),
        };
        let r = match per_try {
            Some(d) => {
                let until = Instant::now() + d;
                tokio::time::timeout_at(until, once(wp, t, this_out, this, bytes))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failed {
                            code: StatusCode::GATEWAY_TIMEOUT,
                            flags: "UT",
                            why: format!("no response within the backend request timeout {d:?}"),
                        })
                    })
                    .map(|s| Sent {
                        deadline: Some((until, d)),
                        ..s
                    })
            }
            None => once(wp, t, this_out, this, bytes).await,
        };
        let retriable = match &r {
            Ok(s) => retry.is_some_and(|rt| rt.codes.contains(&s.resp.status())),
            // No endpoint at all is not a connection error worth waiting for.
            Err(f) => f.flags != "UH",
        };
        if !retriable || attempt >= retries {
            return r;
        }
        attempt += 1;
        match &r {
            Ok(s) => tracing::debug!(status = %s.resp.status(), attempt, "retrying"),
            Err(f) => tracing::debug!(error = %f.why, attempt, "retrying"),
        }
        drop(r);
        if let Some(rt) = retry
            && !rt.backoff.is_zero()
        {
            tokio::time::sleep(rt.backoff).await;
        }
    }
}

/// Sends a copy of the request to `binding`, its response read and dropped (fire and forget).
pub fn mirror(
    wp: Arc<Waypoint>,
    upstreams: Arc<Upstreams>,
    binding: Binding,
    up_h2: bool,
    mut out: Outgoing,
    body: ReqBody,
) -> AbortHandle {
    let task = tokio::spawn(async move {
        let bytes = Arc::default();
        if let Ok(a) = http::uri::Authority::try_from(format!(
            "{}:{}",
            binding.service.hostname, binding.port.port
        )) {
            if up_h2 {
                let mut p = out.uri.clone().into_parts();
                p.authority = Some(a.clone());
                p.scheme.get_or_insert(http::uri::Scheme::HTTP);
                if let Ok(u) = Uri::from_parts(p) {
                    out.uri = u;
                }
            } else if let Ok(v) = http::HeaderValue::try_from(a.as_str()) {
                out.headers.insert(http::header::HOST, v);
            }
        }
        let t = Target {
            binding: &binding,
            upstreams: &upstreams,
            up_h2,
            client: None,
        };
        match once(&wp, &t, out, body, &bytes).await {
            Ok(s) => {
                use http_body_util::BodyExt;
                let _ = s.resp.into_body().collect().await;
            }
            Err(f) => {
                tracing::debug!(service = %binding.service.key(), error = %f.why, "mirror failed")
            }
        }
    });
    task.abort_handle()
}
