//! Request authentication (Istio's RequestAuthentication with its JWT rules,
//! <https://istio.io/latest/docs/reference/config/security/request_authentication/>): the
//! first stage of [`crate::http::proxy`], before authorization and routing.
//!
//! The rules come per bound Service in `zmesh.waypoint.v1.ServiceAuthn` (compiled by
//! [`compile`]). Istio's semantics, as Envoy's `jwt_authn` filter enforces them for Istio:
//! - no token in any rule's locations: the request passes unauthenticated (authorization
//!   decides; a policy that needs `requestPrincipals` then denies it);
//! - a token: it is checked against the rules of its issuer (`iss`) that look where it was
//!   found (signature with the rule's JWKS, RFC 7515; `exp`/`nbf` with 60 s of clock skew and
//!   `iss`/`aud`, RFC 7519 §4.1), and passes when one of them accepts it; otherwise 401 with
//!   Envoy's body and `www-authenticate: Bearer realm="<url>", error="invalid_token"`;
//! - accepted: the token's header is removed unless `forwardOriginalToken`, the payload and
//!   claims are copied to the configured headers, and [`RequestAuth`] goes into the request's
//!   extensions for L7 authorization (`requestPrincipals`, `request.auth.*`).
//!
//! JWKS are inline or fetched from `jwksUri` by the waypoint itself ([`jwks::JwksCache`]).

pub mod jwks;
mod rules;
pub mod verify;

#[cfg(test)]
mod tests;

use http::HeaderValue;
use http::header;
use serde_json::{Map, Value};

pub use jwks::{JwksCache, JwksError, KeySet};
pub use rules::{AuthnError, JwtRule, Keys, Location, ServiceAuthn, compile};
pub use verify::Failure;

use crate::app::Waypoint;
use crate::body::ResponseBody;
use crate::bound::Snapshot;
use crate::telemetry::RequestRecord;

/// A validated token's identity and claims.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    /// The `iss` claim.
    pub issuer: String,
    /// The `sub` claim.
    pub subject: String,
    /// The `aud` claim's values (a string or a list of strings in the token).
    pub audiences: Vec<String>,
    /// The `azp` claim, when present.
    pub presenter: Option<String>,
    /// Every claim of the payload, for `request.auth.claims[...]`.
    pub claims: Map<String, Value>,
}

impl RequestAuth {
    /// The outcome for a validated payload.
    pub fn from_claims(claims: Map<String, Value>) -> RequestAuth {
        let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
        let issuer = s("iss").unwrap_or_default();
        let subject = s("sub").unwrap_or_default();
        let audiences = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        RequestAuth {
            principal: format!("{issuer}/{subject}"),
            presenter: s("azp"),
            issuer,
            subject,
            audiences,
            claims,
        }
    }
}

/// A request refused by authentication: answered 401.
#[derive(Debug)]
pub struct Denied {
    pub failure: Failure,
    /// The request's URL without its query (`www-authenticate`'s realm).
    pub realm: String,
    /// A gRPC request: answered as Envoy answers gRPC locally (HTTP 200, `grpc-status: 16`
    /// UNAUTHENTICATED, the reason in `grpc-message`, no body).
    pub grpc: bool,
}

impl Denied {
    /// The 401 Envoy's `jwt_authn` answers (its body and `www-authenticate`), recorded with
    /// the response flag `UAEX` (denied by an authentication filter) and the reason.
    pub fn respond(self, mut record: RequestRecord) -> http::Response<ResponseBody> {
        record.labels.traffic.response_flags = "UAEX";
        record.error = Some(format!(
            "jwt_authn_access_denied{{{}}}: {}",
            self.failure.message().replace(' ', "_"),
            self.failure
        ));
        let body = self.failure.message();
        if self.grpc {
            record.labels.response_code = 200;
            record.labels.grpc_response_status = "16".into();
            let mut r = http::Response::new(ResponseBody::empty(Some(crate::body::Finish {
                record,
                in_flight: None,
                h1: None,
            })));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static("16"));
            h.insert("grpc-message", HeaderValue::from_static(body));
            return r;
        }
        let code = http::StatusCode::UNAUTHORIZED;
        record.labels.response_code = code.as_u16();
        let mut r = http::Response::new(ResponseBody::text(
            body,
            crate::body::Finish {
                record,
                in_flight: None,
                h1: None,
            },
        ));
        *r.status_mut() = code;
        let challenge = format!("Bearer realm=\"{}\", error=\"invalid_token\"", self.realm);
        if let Ok(v) = HeaderValue::try_from(challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }
}

/// Authenticates a request to Service `service` (`<namespace>/<hostname>`): `Ok(None)` when
/// no rule applies or no token was presented, `Ok(Some(_))` for a validated token (the request's
/// headers already changed as its rule says), `Err` for a token that must be refused.
pub async fn authenticate(
    wp: &Waypoint,
    snap: &Snapshot,
    service: &str,
    authority: &str,
    parts: &mut http::request::Parts,
) -> Result<Option<RequestAuth>, Denied> {
    let Some(authn) = snap.authn(service) else {
        return Ok(None);
    };
    // Boxed: verifying (and perhaps fetching a JWKS) is for services with a
    // RequestAuthentication only; inlined, its state would size every request's future.
    Box::pin(verify::authenticate(&authn, &wp.jwks, parts))
        .await
        .map_err(|failure| Denied {
            failure,
            realm: format!("http://{authority}{}", parts.uri.path()),
            grpc: crate::http::is_grpc(&parts.headers),
        })
}
