//! The authorization stage of [`crate::http::proxy`]: after request authentication, before
//! routing.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::{Action, Attributes, Verdict};
use crate::authn::RequestAuth;
use crate::body::{Finish, ResponseBody};
use crate::bound::Snapshot;
use crate::http::Downstream;
use crate::telemetry::RequestRecord;

/// The body of a denied request, as Envoy's RBAC filter sends it.
pub const FORBIDDEN_BODY: &str = "RBAC: access denied";

/// Authorizes one request with the policies of `snap` that apply to its Service. `host` is
/// the request's authority and `path` its path and query, `BASE`-normalized (both as
/// [`crate::http::proxy`] routes and sends them). Returns the record to continue with, or the
/// local answer: 403 (denied, flag `RBAC`).
#[allow(clippy::result_large_err)]
pub fn stage(
    snap: &Snapshot,
    ds: &Downstream,
    key: &str,
    parts: &http::request::Parts,
    host: &str,
    path: &str,
    mut record: RequestRecord,
) -> Result<RequestRecord, Response<ResponseBody>> {
    let policies = snap.policies();
    if !policies.any_for(key) {
        return Ok(record);
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let attrs = Attributes {
        source_ip: ds.client.unwrap_or(ds.peer).ip(),
        peer: ds.peer_id.as_ref(),
        destination_ip: ds.target.ip(),
        destination_port: ds.binding.port.port,
        method: parts.method.as_str(),
        host,
        path,
        headers: &parts.headers,
        auth: parts.extensions.get::<RequestAuth>(),
    };
    let verdict = policies.evaluate(key, &attrs);
    log_shadow(&verdict, &record);
    let decided = verdict
        .policy
        .map(|(p, r)| format!("{}:rules[{r}]", p.key()));
    if verdict.allowed {
        record.policy = decided;
        return Ok(record);
    }
    record.error = Some(match &decided {
        Some(p) => format!("denied by AuthorizationPolicy {p}"),
        None => "denied: no ALLOW AuthorizationPolicy matches".to_owned(),
    });
    record.policy = decided;
    Err(answer(
        record,
        StatusCode::FORBIDDEN,
        "RBAC",
        Some(FORBIDDEN_BODY),
    ))
}

/// Authorizes an opaque TCP connection (module docs of [`super`]); `Err` says why it is
/// refused (logged by the caller, the deciding policy named).
pub fn check_tcp(snap: &Snapshot, ds: &Downstream) -> Result<(), String> {
    let key = &*ds.binding.key;
    let policies = snap.policies();
    if !policies.any_for(key) {
        return Ok(());
    }
    let headers = http::HeaderMap::new();
    let attrs = Attributes {
        source_ip: ds.client.unwrap_or(ds.peer).ip(),
        peer: ds.peer_id.as_ref(),
        destination_ip: ds.target.ip(),
        destination_port: ds.binding.port.port,
        method: "",
        host: "",
        path: "",
        headers: &headers,
        auth: None,
    };
    let v = policies.evaluate_tcp(key, &attrs);
    let decided = v.policy.map(|(p, r)| format!("{}:rules[{r}]", p.key()));
    if v.allowed {
        return Ok(());
    }
    Err(match decided {
        Some(p) => format!("TCP connection denied by AuthorizationPolicy {p}"),
        None => "TCP connection denied: no ALLOW AuthorizationPolicy matches".to_owned(),
    })
}

/// AUDIT matches and dry-run outcomes, one log line each (target `access`, like the request
/// line).
fn log_shadow(v: &Verdict<'_>, record: &RequestRecord) {
    for (p, r) in &v.audit {
        tracing::info!(
            target: "access",
            policy = %format!("{}:rules[{r}]", p.key()),
            method = %record.method,
            authority = %record.authority,
            path = %record.path,
            src.addr = %record.src,
            "AUDIT AuthorizationPolicy matched"
        );
    }
    for (p, r) in &v.dry_run {
        let would = match (p.action, r) {
            (Action::Deny, Some(_)) => "deny",
            (Action::Allow, Some(_)) => "allow",
            (Action::Audit, Some(_)) => "audit",
            (Action::Allow, None) => "not allow (no rule matched)",
            (_, None) => "nothing (no rule matched)",
        };
        tracing::info!(
            target: "access",
            policy = %p.key(),
            rule = r.map(|r| r as i64).unwrap_or(-1),
            would,
            method = %record.method,
            authority = %record.authority,
            path = %record.path,
            src.addr = %record.src,
            "dry-run AuthorizationPolicy"
        );
    }
}

/// A local answer with an optional text body.
fn answer(
    mut record: RequestRecord,
    code: StatusCode,
    flags: &'static str,
    body: Option<&'static str>,
) -> Response<ResponseBody> {
    record.labels.response_code = code.as_u16();
    record.labels.traffic.response_flags = flags;
    let finish = Finish {
        record,
        in_flight: None,
        h1: None,
    };
    let mut r = match body {
        Some(text) => {
            let mut r = Response::new(ResponseBody::text(text, finish));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        None => Response::new(ResponseBody::empty(Some(finish))),
    };
    *r.status_mut() = code;
    r
}
