//! The L7 proxy on a tunnel: hyper serves HTTP/1.1 (keep-alive, upgrades) or HTTP/2 to the
//! client; each request goes to an endpoint of the bound service in the same protocol (or
//! HTTP/2 on ports declared `http2`/`grpc`), bodies and trailers streamed frame by frame.
//! With no route configured every request goes to the service, as a plain L7 proxy; with
//! routes ([`crate::route`]) the first matching rule's filters, backend, timeouts and retries
//! apply (`http/attempt.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use zmesh_core::identity::SpiffeId;

use crate::app::Waypoint;
use crate::body::{Finish, ResponseBody};
use crate::body::{Keep, KeptBody, ReqBody};
use crate::bound::Binding;
use crate::route::filter::{Filter, HeaderModifier};
use crate::route::matching::RequestView;
use crate::route::{Decision, Retry, Rule, Timeouts};
use crate::telemetry::{RequestLabels, RequestRecord};
use crate::upstream::Upstreams;
use attempt::{Failed, Outgoing, Sent, Target};
use zmesh_core::telemetry::WorkloadMeta;

mod attempt;

/// Who is on the other end of a tunnel, and which service port it asked for.
#[derive(Debug)]
pub struct Downstream {
    /// The HBONE peer (the client's node tunnel, from the client pod's address).
    pub peer: SocketAddr,
    /// The client, as the CONNECT's `forwarded` header names it (informational).
    pub client: Option<SocketAddr>,
    /// The peer's SPIFFE id, from its certificate.
    pub principal: Option<zmesh_core::telemetry::Label>,
    /// [`Downstream::principal`] parsed (once per tunnel, not per request).
    pub peer_id: Option<SpiffeId>,
    pub source: WorkloadMeta,
    /// The CONNECT target, `VIP:port`.
    pub target: SocketAddr,
    pub binding: Binding,
    /// The upstream side of the worker runtime serving this tunnel.
    pub upstreams: Arc<Upstreams>,
}

/// Connection-specific headers (RFC 9110 §7.6.1), never forwarded; `te: trailers` is kept.
/// Typed names: removing by `&str` parsed each name again for every request. A `static`, so
/// that looking through them makes no array of names each time.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    HeaderName::from_static("http2-settings"),
];

/// A transfer coding of the request other than `chunked`, if any.
fn other_transfer_coding(h: &HeaderMap) -> Option<String> {
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(v.as_bytes());
        let mut codings = text.split(',').map(str::trim);
        if let Some(c) = codings.find(|c| !c.eq_ignore_ascii_case("chunked")) {
            return Some(c.to_owned());
        }
    }
    None
}

fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Which of them are there (bit i for `HOP_BY_HOP[i]`), in one pass over the names: removing
    // a name is a lookup whether it is there or not, and most messages have none of them, or
    // only `connection: keep-alive`. With none there is no `connection` either, so no header it
    // names.
    let mut present = 0u8;
    for k in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
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
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0 || (upgrade && (n == header::CONNECTION || n == header::UPGRADE))
        {
            continue;
        }
        h.remove(n);
        // RFC 9112 §6.3: with `transfer-encoding`, a `content-length` is removed before
        // forwarding (the message is framed again on the other side).
        if n == header::TRANSFER_ENCODING {
            h.remove(header::CONTENT_LENGTH);
        }
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// What an HTTP/1.1 request asks to upgrade to.
#[derive(Debug, PartialEq)]
enum Upgrade {
    /// Nothing (or `h2c` only, which Envoy ignores: the request goes on as HTTP/1.1 with its
    /// upgrade headers removed).
    No,
    /// WebSocket, the one upgrade Istio enables: spliced once both sides have upgraded.
    WebSocket,
    /// Anything else: refused (403), as Envoy refuses an upgrade its route does not enable.
    Other(String),
}

fn upgrade_of(req: &Request<Incoming>) -> Upgrade {
    let h = req.headers();
    let mut upgrades = h.get_all(header::UPGRADE).iter();
    let Some(to) = upgrades.next() else {
        return Upgrade::No;
    };
    let asked = (h.get_all(header::CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if !asked {
        return Upgrade::No;
    }
    let to = String::from_utf8_lossy(to.as_bytes());
    // One `Upgrade` naming WebSocket alone: from a list the backend could pick another.
    let one = upgrades.next().is_none();
    if one && to.trim().eq_ignore_ascii_case("websocket") {
        Upgrade::WebSocket
    } else if one && to.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")) {
        Upgrade::No
    } else {
        Upgrade::Other(to.into_owned())
    }
}

/// Whether the request is gRPC (by its content type).
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Sets `Host` to `authority` unless it already is (most requests: one lookup, no copy).
/// (A route filter may have added a second `Host`: then it is replaced too.)
fn set_host(h: &mut HeaderMap, authority: &str) -> Result<(), http::header::InvalidHeaderValue> {
    let mut hosts = h.get_all(header::HOST).iter();
    let already = matches!((hosts.next(), hosts.next()),
        (Some(v), None) if v.as_bytes() == authority.as_bytes());
    if !already {
        h.insert(header::HOST, HeaderValue::try_from(authority)?);
    }
    Ok(())
}

/// Why a request's authority is refused (400), and what the access log shows for it.
#[derive(Debug)]
struct BadAuthority {
    why: &'static str,
    shown: String,
}

/// The request's authority: an absolute-form target's or HTTP/2's `:authority`, else its one
/// `Host` header; for an HTTP/1.0 request without either, `fallback` (the service's
/// `host:port`). Refused (RFC 9112 §3.2, RFC 9110 §4.2.4): none in HTTP/1.1 or HTTP/2, more
/// than one `Host`, or a value that is not `host[:port]` (userinfo included).
fn request_authority(
    req: &Request<Incoming>,
    fallback: impl FnOnce() -> String,
) -> Result<String, BadAuthority> {
    let bad = |why, shown: &str| BadAuthority {
        why,
        shown: shown.to_owned(),
    };
    let checked = |a: &http::uri::Authority| {
        let text = a.as_str();
        if text.as_bytes().contains(&b'@') {
            return Err(bad("the request's authority carries userinfo", text));
        }
        // After the host (an IPv6 literal keeps its brackets): nothing, or `:` and a port.
        let port = &text[a.host().len()..];
        let valid_port = port.is_empty()
            || port.strip_prefix(':').is_some_and(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
            });
        if !valid_port {
            return Err(bad("the request's authority has an invalid port", text));
        }
        Ok(text.to_owned())
    };
    if let Some(a) = req.uri().authority() {
        return checked(a);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() < http::Version::HTTP_11 => Ok(fallback()),
        (None, _) => Err(bad("the request has no Host header", "")),
        (Some(_), Some(_)) => Err(bad("the request has more than one Host header", "")),
        (Some(h), None) => match h.to_str().map(str::parse::<http::uri::Authority>) {
            Ok(Ok(a)) if a.as_str().len() == h.len() => checked(&a),
            _ => Err(bad(
                "the Host header is not a host[:port]",
                &String::from_utf8_lossy(h.as_bytes()),
            )),
        },
    }
}

/// The request's path and query, its path `BASE`-normalized as Istio's default path
/// normalization does before anything matches it, the same for routing and upstream whether
/// or not a policy applies (see [`crate::authz::matcher::normalize_path`]).
fn normalized(
    method: &http::Method,
    path_and_query: &str,
) -> Result<String, crate::authz::matcher::BadPath> {
    // The asterisk form names no path, and is for OPTIONS only (RFC 9112 §3.2.4).
    if path_and_query == "*" {
        if method == http::Method::OPTIONS {
            return Ok(path_and_query.to_owned());
        }
        return Err(crate::authz::matcher::BadPath(
            "the asterisk form is for OPTIONS only",
        ));
    }
    let (p, q) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut out = crate::authz::matcher::normalize_path(p)?;
    if let Some(q) = q {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// A local answer (no upstream response): the record finished with `flags`.
fn local(
    mut record: RequestRecord,
    code: StatusCode,
    flags: &'static str,
) -> Response<ResponseBody> {
    record.labels.response_code = code.as_u16();
    record.labels.traffic.response_flags = flags;
    let mut r = Response::new(ResponseBody::empty(Some(Finish {
        record,
        in_flight: None,
        h1: None,
    })));
    *r.status_mut() = code;
    r
}

/// What routing decided to do with a request.
struct Plan {
    /// The Service it goes to.
    binding: Binding,
    /// The authority (Host) sent upstream.
    authority: String,
    /// Path and query sent upstream.
    path: String,
    mirrors: Vec<Binding>,
    response_headers: Vec<HeaderModifier>,
    timeouts: Timeouts,
    retry: Option<Retry>,
}

/// Applies a rule's filters, then a backend's; `Err` is a local answer (redirect, 500).
fn plan(
    rule: &Rule,
    req: &mut http::request::Parts,
    authority: &str,
    path: &str,
    svc_port: u16,
) -> Result<Plan, (StatusCode, &'static str, String, Option<String>)> {
    let (mut p, q) = path
        .split_once('?')
        .map_or((path.to_owned(), None), |(a, b)| {
            (a.to_owned(), Some(b.to_owned()))
        });
    let mut host = authority.to_owned();
    let mut mirrors = Vec::new();
    let mut response_headers = Vec::new();
    let mut apply = |filters: &[Filter],
                     req: &mut http::request::Parts|
     -> Result<(), (StatusCode, &'static str, String, Option<String>)> {
        for f in filters {
            match f {
                Filter::RequestHeaders(m) => m.apply(&mut req.headers),
                Filter::ResponseHeaders(m) => response_headers.push(m.clone()),
                Filter::Redirect(r) => {
                    let scheme = req.uri.scheme_str().unwrap_or("http");
                    let loc = r.location(
                        scheme,
                        &host,
                        svc_port,
                        &p,
                        q.as_deref(),
                        rule.matched_prefix(),
                    );
                    return Err((r.status, "-", String::new(), Some(loc)));
                }
                Filter::Rewrite(rw) => {
                    if let Some(h) = &rw.hostname {
                        host = h.clone();
                    }
                    if let Some(m) = &rw.path {
                        p = m.apply(&p, rule.matched_prefix());
                    }
                }
                Filter::Mirror(m) => {
                    if m.draw()
                        && let Some(t) = &m.target
                    {
                        mirrors.push(t.clone());
                    }
                }
            }
        }
        Ok(())
    };
    apply(&rule.filters, req)?;
    let Some(backend) = rule.pick() else {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "NC",
            format!("{}: no backend with a weight above 0", rule.name),
            None,
        ));
    };
    let binding = match &backend.target {
        Ok(b) => b.clone(),
        Err(why) => {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "NC",
                format!("{}: backend did not resolve: {why}", rule.name),
                None,
            ));
        }
    };
    apply(&backend.filters, req)?;
    let path = match q {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    Ok(Plan {
        binding,
        authority: host,
        path,
        mirrors,
        response_headers,
        timeouts: rule.timeouts,
        retry: rule.retry.clone(),
    })
}

/// The namespace of a SPIFFE id (`spiffe://<td>/ns/<ns>/sa/<sa>`).
/// Proxies one request. `up_h2`: speak HTTP/2 to the endpoint.
pub async fn proxy(
    wp: Arc<Waypoint>,
    ds: Arc<Downstream>,
    mut req: Request<Incoming>,
    up_h2: bool,
) -> Response<ResponseBody> {
    // The route's request timeout runs from here (Gateway API HTTPRouteTimeouts.request: "as
    // close to the whole request-response transaction as possible").
    let received = tokio::time::Instant::now();
    let svc = &ds.binding.service;
    // One authority and one path for the whole request: what authentication, authorization
    // and routing see is what goes upstream.
    let authority = request_authority(&req, || {
        format!("{}:{}", svc.hostname, ds.binding.port.port)
    });
    let raw_path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = normalized(req.method(), raw_path);
    let mut labels = RequestLabels::default();
    labels.source(&ds.source);
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
        path.as_deref().unwrap_or(raw_path),
        authority.as_deref().unwrap_or_else(|bad| &bad.shown),
    );
    let (authority, path) = match (authority, path) {
        (Ok(a), Ok(p)) => (a, p),
        (Err(bad), _) => {
            record.error = Some(bad.why.to_owned());
            return local(record, StatusCode::BAD_REQUEST, "DPE");
        }
        (_, Err(why)) => {
            record.error = Some(format!("request path refused: {}", why.0));
            return local(record, StatusCode::BAD_REQUEST, "DPE");
        }
    };
    // Until an answer is chosen, the request ends only when the client goes away (hyper drops
    // this future: the stream was reset or the connection closed): Envoy's `DC`, code 0.
    record.labels.traffic.response_flags = "DC";
    // HTTP/1.1 upgrades (WebSocket): both sides are upgraded, then bytes are copied.
    let down_upgrade = match upgrade_of(&req) {
        Upgrade::No => None,
        Upgrade::WebSocket => Some(hyper::upgrade::on(&mut req)),
        Upgrade::Other(to) => {
            record.error = Some(format!("upgrade to {to:?} is not enabled"));
            return local(record, StatusCode::FORBIDDEN, "-");
        }
    };
    let (mut parts, body) = req.into_parts();
    // A coding other than `chunked` would be lost when the body is framed again upstream
    // (RFC 9112 §6.1: 501 for a transfer coding not understood).
    if let Some(te) = other_transfer_coding(&parts.headers) {
        record.error = Some(format!("transfer coding {te:?} is not supported"));
        return local(record, StatusCode::NOT_IMPLEMENTED, "DPE");
    }
    // Connection-specific headers go before anything reads the request, so a client cannot
    // name (and so remove) a header that a route filter or authentication adds.
    strip_hop_by_hop(&mut parts.headers, down_upgrade.is_some());
    // `Host` is the authority (RFC 9112 §3.2.2: a proxy replaces it with the target's), so
    // header conditions and matches see what `hosts` and the backend see, over HTTP/2 too.
    // (A checked authority is a valid header value.)
    let _ = set_host(&mut parts.headers, &authority);

    // One config for the whole request: authentication, authorization and routing.
    let snap = wp.snapshot.load_full();
    let key = &*ds.binding.key;
    // Authentication (RequestAuthentication): an invalid token is 401; a valid one's
    // outcome goes into the extensions for authorization.
    match crate::authn::authenticate(&wp, &snap, key, &authority, &mut parts).await {
        Ok(Some(auth)) => drop(parts.extensions.insert(auth)),
        Ok(None) => {}
        Err(denied) => return denied.respond(record),
    }
    // Authorization (after authentication, before routing): DENY, then ALLOW; 403 if denied.
    let mut record = match crate::authz::stage(&snap, &ds, key, &parts, &authority, &path, record) {
        Ok(r) => r,
        Err(answer) => return answer,
    };

    // A CONNECT inside the tunnel is not proxied: no route matches one (Envoy answers 404
    // without a `connect_matcher`, "Why is Envoy sending 404s to CONNECT requests?").
    if parts.method == http::Method::CONNECT {
        record.error = Some("CONNECT requests are not proxied".to_owned());
        return local(record, StatusCode::NOT_FOUND, "NR");
    }
    // Routing: the first applying rule that matches, or the Service itself.
    let decision = match snap.routes(key) {
        None => Decision::NoRoute,
        Some(routes) => {
            let (p, q) = path
                .split_once('?')
                .map_or((path.as_str(), None), |(a, b)| (a, Some(b)));
            let view = RequestView {
                method: &parts.method,
                path: p,
                query: q,
                headers: &parts.headers,
            };
            routes.select(
                ds.binding.port.port,
                ds.peer_id.as_ref().map(SpiffeId::namespace),
                &view,
            )
        }
    };
    let plan = match decision {
        Decision::NoRoute => Plan {
            binding: ds.binding.clone(),
            authority: authority.clone(),
            path: path.clone(),
            mirrors: Vec::new(),
            response_headers: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
        },
        Decision::NotFound => {
            record.error = Some(format!("no route rule of {key} matches"));
            return local(record, StatusCode::NOT_FOUND, "NR");
        }
        Decision::Rule(rule) => {
            match plan(rule, &mut parts, &authority, &path, ds.binding.port.port) {
                Ok(p) => p,
                Err((code, flags, why, location)) => {
                    if !why.is_empty() {
                        tracing::warn!(service = %key, error = %why, "route answered {code}");
                        record.error = Some(why);
                    }
                    let mut r = local(record, code, flags);
                    if let Some(l) = location.and_then(|l| HeaderValue::try_from(l).ok()) {
                        r.headers_mut().insert(header::LOCATION, l);
                    }
                    return r;
                }
            }
        }
    };
    drop(snap);
    let target = &plan.binding;
    if !Arc::ptr_eq(&target.service, svc) {
        let t = &target.service;
        record.labels.service(&t.hostname, &t.name, &t.namespace);
    }
    let authority = plan.authority;
    let path = plan.path;

    let uri = if up_h2 {
        parts.headers.remove(header::HOST);
        // Built from its parts: an authority never spills into the path.
        Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
    } else {
        if set_host(&mut parts.headers, &authority).is_err() {
            record.error = Some(format!("{authority:?} is not a valid Host"));
            return local(record, StatusCode::BAD_REQUEST, "DPE");
        }
        Uri::try_from(path.as_str()).map_err(http::Error::from)
    };
    let uri = match uri {
        Ok(u) => u,
        Err(e) => {
            record.error = Some(format!("cannot rebuild the request URI: {e}"));
            return local(record, StatusCode::BAD_REQUEST, "DPE");
        }
    };
    let out = Outgoing {
        method: parts.method,
        uri,
        version: if up_h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        },
        headers: parts.headers,
    };
    // The body is kept (read whole) only when a retry or a mirror needs it again.
    let wants_copy =
        plan.retry.as_ref().is_some_and(|r| r.attempts > 0) || !plan.mirrors.is_empty();
    let body = if wants_copy {
        match KeptBody::keep(body).await {
            Keep::Whole(k) => Ok(k),
            Keep::Streamed(b) => Err(ReqBody::Stream(b)),
            Keep::Aborted(e) => {
                // The client reset the stream or closed the connection mid-body: nothing goes
                // upstream (a truncated body must never be sent, retried or mirrored).
                tracing::info!(service = %key, error = %e, "client ended the request body early; request dropped");
                record.error = Some(format!("client ended the request body early: {e}"));
                // Recorded as Envoy does for a client gone before the answer: code 0, `DC`.
                drop(record);
                let mut r = Response::new(ResponseBody::empty(None));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
        }
    } else {
        Err(ReqBody::Stream(body))
    };
    let body = match body {
        Ok(kept) => {
            for m in plan.mirrors {
                attempt::mirror(
                    wp.clone(),
                    ds.upstreams.clone(),
                    m,
                    up_h2,
                    out.clone(),
                    kept.body(),
                );
            }
            Ok(kept)
        }
        // Too large or of unknown length (a gRPC call) to keep: each mirror gets a copy of the
        // frames as they stream to the backend.
        Err(ReqBody::Stream(inner)) if !plan.mirrors.is_empty() => {
            let copies = crate::body::Copies(
                plan.mirrors
                    .into_iter()
                    .map(|m| {
                        let (tx, rx) = tokio::sync::mpsc::channel(crate::body::TEE_FRAMES);
                        let abort = attempt::mirror(
                            wp.clone(),
                            ds.upstreams.clone(),
                            m,
                            up_h2,
                            out.clone(),
                            ReqBody::Copy(rx),
                        );
                        (tx, abort)
                    })
                    .collect(),
            );
            Err(ReqBody::Tee { inner, copies })
        }
        other => other,
    };
    let t = Target {
        binding: target,
        upstreams: &ds.upstreams,
        up_h2,
        client: ds.client,
    };
    let sending = attempt::send(
        &wp,
        &t,
        out,
        body,
        plan.retry.as_ref(),
        plan.timeouts.backend_request,
        &record.request_bytes,
    );
    let request_deadline = plan.timeouts.request.map(|d| (received + d, d));
    let sent = match request_deadline {
        Some((at, d)) => tokio::time::timeout_at(at, sending)
            .await
            .unwrap_or_else(|_| {
                Err(Failed {
                    code: StatusCode::GATEWAY_TIMEOUT,
                    flags: "UT",
                    why: format!("no response within the request timeout {d:?}"),
                })
            }),
        None => sending.await,
    };
    let Sent {
        mut resp,
        deadline,
        ep,
        h1,
        in_flight,
    } = match sent {
        Ok(s) => s,
        Err(f) => {
            record.error = Some(f.why);
            return local(record, f.code, f.flags);
        }
    };
    record.error = None;
    record.labels.traffic.response_flags = "-";
    record.upstream = Some(ep.addr);
    record.labels.destination(&ep);
    record.labels.response_code = resp.status().as_u16();
    if let Some(s) = resp
        .headers()
        .get("grpc-status")
        .and_then(crate::telemetry::grpc_status_label)
    {
        // A trailers-only gRPC answer.
        record.labels.grpc_response_status = s;
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
    for m in &plan.response_headers {
        m.apply(&mut parts.headers);
    }
    let finish = Finish {
        record,
        in_flight: Some(in_flight),
        h1: h1.map(|c| (ds.upstreams.clone(), c)),
    };
    // Both timeouts cover the response body (HTTPRouteTimeouts: `request` until the gateway
    // has responded, `backendRequest` "to when the full response has been received"): the
    // earlier of the two ends a body still streaming.
    let deadline = match (request_deadline, deadline) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    Response::from_parts(parts, ResponseBody::upstream(body, finish, deadline))
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
        // Each hop-by-hop header alone, without `connection`, goes (`te` but for `trailers`).
        for (name, value, kept) in [
            ("transfer-encoding", "chunked", None),
            ("proxy-connection", "keep-alive", None),
            ("keep-alive", "timeout=5", None),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA", None),
            ("upgrade", "websocket", None),
            ("te", "gzip", None),
            ("te", "trailers, gzip", Some("trailers")),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(
                h.get(name).map(|v| v.to_str().unwrap()),
                kept,
                "{name}: {h:?}"
            );
            assert_eq!(h["x-kept"], "1");
        }
        // A `content-length` beside `transfer-encoding` goes too (RFC 9112 §6.3).
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        // Nothing hop-by-hop: nothing changes, repeated values included.
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        // An upgrade keeps `upgrade` and `connection`, and still loses the rest.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, x-secret"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(
            h.contains_key("upgrade") && h.contains_key("connection"),
            "{h:?}"
        );
    }
}
