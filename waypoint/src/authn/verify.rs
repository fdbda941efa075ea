//! Finding the token and checking it against the rules of its issuer.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};

use super::RequestAuth;
use super::jwks::{JwksCache, KeySet};
use super::rules::{JwtRule, Keys, Location, ServiceAuthn};

/// Clock skew allowed on `exp` and `nbf` (Envoy's `clock_skew_seconds` default).
const CLOCK_SKEW_SECS: u64 = 60;

/// Why a token was refused; [`Failure::message`] is Envoy's `jwt_authn` answer body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("not a JWS compact serialization: {0}")]
    Malformed(String),
    #[error("no rule for issuer {0:?} looks where the token was found")]
    UnknownIssuer(String),
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("audiences {0:?} not allowed")]
    Audience(Vec<String>),
    #[error("no key of the JWKS matches the token's kid/alg")]
    NoKey,
    #[error("signature does not verify with any key of the JWKS")]
    Signature,
    #[error("{0}")]
    Jwks(String),
}

impl Failure {
    /// Envoy's text for this failure (`jwt_authn`'s status strings).
    pub fn message(&self) -> &'static str {
        match self {
            Failure::Malformed(_) => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Failure::UnknownIssuer(_) => "Jwt issuer is not configured",
            Failure::Expired => "Jwt is expired",
            Failure::NotYetValid => "Jwt not yet valid",
            Failure::Audience(_) => "Audiences in Jwt are not allowed",
            Failure::NoKey => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::Signature => "Jwt verification fails",
            Failure::Jwks(_) => "Jwks remote fetch is failed",
        }
    }
}

/// The first token found, in rule order then each rule's location order.
fn find(authn: &ServiceAuthn, parts: &http::request::Parts) -> Option<(String, Location)> {
    for rule in &authn.rules {
        for loc in &rule.locations {
            if let Some(t) = extract(loc, parts) {
                return Some((t, loc.clone()));
            }
        }
    }
    None
}

fn extract(loc: &Location, parts: &http::request::Parts) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => parts.headers.get_all(name).iter().find_map(|v| {
            let v = v.to_str().ok()?;
            let head = v.get(..prefix.len())?;
            head.eq_ignore_ascii_case(prefix)
                .then(|| v[prefix.len()..].trim().to_owned())
                .filter(|t| !t.is_empty())
        }),
        Location::Param(p) => parts.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p && !v.is_empty()).then(|| v.to_owned())
        }),
    }
}

/// The payload segment, decoded without verification (to pick the rules of its issuer).
fn unverified_payload(token: &str) -> Result<(&str, Map<String, Value>), Failure> {
    let mut it = token.split('.');
    let (Some(_), Some(p), Some(_), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(Failure::Malformed("not three dot-separated parts".into()));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(p.trim_end_matches('='))
        .map_err(|e| Failure::Malformed(format!("payload: {e}")))?;
    let claims = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Malformed(format!("payload is not a JSON object: {e}")))?;
    Ok((p, claims))
}

/// Checks `token` with one rule's keys: the payload's claims when it verifies.
pub fn validate(token: &str, rule: &JwtRule, keys: &KeySet) -> Result<Map<String, Value>, Failure> {
    let header = decode_header(token).map_err(|e| Failure::Malformed(e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.required_spec_claims.clear();
    v.leeway = CLOCK_SKEW_SECS;
    v.validate_nbf = true;
    v.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rule.audiences);
    }
    let mut tried = false;
    for key in keys.candidates(header.kid.as_deref(), header.alg) {
        tried = true;
        match decode::<Map<String, Value>>(token, key, &v) {
            Ok(d) => return Ok(d.claims),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => return Err(Failure::Expired),
                ErrorKind::ImmatureSignature => return Err(Failure::NotYetValid),
                ErrorKind::InvalidAudience => {
                    let aud = unverified_payload(token)
                        .ok()
                        .map(|(_, c)| RequestAuth::from_claims(c).audiences)
                        .unwrap_or_default();
                    return Err(Failure::Audience(aud));
                }
                ErrorKind::InvalidIssuer => {
                    return Err(Failure::UnknownIssuer(rule.issuer.clone()));
                }
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) => {
                    return Err(Failure::Malformed(e.to_string()));
                }
                // A bad signature, or a key of another family: the next key.
                _ => {}
            },
        }
    }
    Err(if tried {
        Failure::Signature
    } else {
        Failure::NoKey
    })
}

async fn keys_of(rule: &JwtRule, cache: &Arc<JwksCache>) -> Result<Arc<KeySet>, Failure> {
    match &rule.keys {
        Keys::Inline(k) => Ok(k.clone()),
        Keys::Remote { uri, timeout } => cache.keys(uri, *timeout).await.map_err(|e| {
            tracing::warn!(
                rule = %rule.name,
                error = %zmesh_core::peer_text::PeerText::display(
                    &e,
                    zmesh_core::peer_text::PEER_ERROR_MAX
                ),
                "JWKS unavailable: token refused"
            );
            Failure::Jwks(e.to_string())
        }),
    }
}

/// The authentication stage for one request (see the module documentation of `authn`).
pub async fn authenticate(
    authn: &ServiceAuthn,
    cache: &Arc<JwksCache>,
    parts: &mut http::request::Parts,
) -> Result<Option<RequestAuth>, Failure> {
    // The headers the rules write are theirs alone: what the client sent under those names
    // goes, token or not, so a backend never takes a client's value for a verified claim
    // (Envoy's jwt_authn sanitizes them; istio/istio#53212).
    for rule in &authn.rules {
        if let Some(h) = &rule.output_payload_to_header {
            parts.headers.remove(h);
        }
        for (h, _) in &rule.output_claim_to_headers {
            parts.headers.remove(h);
        }
    }
    let Some((token, loc)) = find(authn, parts) else {
        return Ok(None);
    };
    let (payload, unverified) = unverified_payload(&token)?;
    let iss = unverified
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut failure = None;
    for rule in authn
        .rules
        .iter()
        .filter(|r| r.issuer == iss && r.locations.contains(&loc))
    {
        let keys = match keys_of(rule, cache).await {
            Ok(k) => k,
            Err(f) => {
                failure.get_or_insert(f);
                continue;
            }
        };
        match validate(&token, rule, &keys) {
            Ok(claims) => {
                apply_outputs(rule, &loc, payload, &claims, parts);
                return Ok(Some(RequestAuth::from_claims(claims)));
            }
            Err(f) => {
                failure.get_or_insert(f);
            }
        }
    }
    Err(failure.unwrap_or_else(|| Failure::UnknownIssuer(iss.to_owned())))
}

/// What an accepted token's rule does to the request forwarded upstream.
fn apply_outputs(
    rule: &JwtRule,
    loc: &Location,
    payload: &str,
    claims: &Map<String, Value>,
    parts: &mut http::request::Parts,
) {
    // Envoy removes a token found in a header; one in a query parameter stays.
    if !rule.forward_original_token
        && let Location::Header { name, .. } = loc
    {
        parts.headers.remove(name);
    }
    if let Some(h) = &rule.output_payload_to_header
        && let Ok(v) = HeaderValue::try_from(payload.trim_end_matches('='))
    {
        parts.headers.insert(h.clone(), v);
    }
    for (h, path) in &rule.output_claim_to_headers {
        let mut v = claims.get(&path[0]);
        for seg in &path[1..] {
            v = v.and_then(|o| o.get(seg));
        }
        let text = match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => continue,
        };
        if let Ok(v) = HeaderValue::try_from(text) {
            parts.headers.insert(h.clone(), v);
        }
    }
}
