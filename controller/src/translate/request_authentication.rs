//! Istio's `security.istio.io/v1` RequestAuthentication
//! (<https://istio.io/latest/docs/reference/config/security/request_authentication/>) for
//! waypoints: each policy's JWT rules (<https://istio.io/latest/docs/reference/config/security/jwt/>)
//! checked and attached to the bound Services they apply to, as one
//! `zmesh.waypoint.v1.ServiceAuthn` per Service (`xds-proto/proto/zmesh/waypoint/v1/authn.proto`).
//!
//! Attachment (Istio ambient): `targetRefs` to the waypoint Gateway (every Service bound to
//! it) or to a Service (that Service, when it is bound to a waypoint). A policy with a
//! `selector`, or with neither, selects workloads: in ambient their traffic meets only
//! ztunnel, which cannot validate JWTs, so such a policy does not apply without a waypoint;
//! zmesh says so (Istio's "Ambient and Istio's security APIs" note). Checks are strict: a
//! policy with an unknown field or a rule that cannot be applied (no issuer, both or neither
//! of `jwks`/`jwksUri`, a JWKS that is not one, a URI that is not http(s), a bad header name,
//! `fromCookies`, an output header that a rule reads its token from) is refused whole and
//! applies nowhere. A policy whose output headers are where another policy on the same Service
//! reads its tokens, or the other way round, is refused on that Service: the one created later
//! (one without a creation time after those with one, then by namespace and name), so that a
//! policy that worked keeps working.

pub mod crd;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kube::CustomResource;
use kube::api::DynamicObject;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use xds_proto::zmesh::waypoint::v1 as pb;

use super::Age;
use super::authorization_policy::{OpaqueStatus, PolicyTargetReference, WorkloadSelector};

/// Which JWTs a waypoint validates for the Services the policy targets (see
/// <https://istio.io/latest/docs/reference/config/security/request_authentication/>).
///
/// The derive also makes `RequestAuthenticationResource`, the root the CRD is generated from
/// (module `crd`); unknown fields refuse the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, CustomResource, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "RequestAuthentication",
    root = "RequestAuthenticationResource",
    namespaced,
    status = "OpaqueStatus",
    shortname = "ra",
    category = "istio-io",
    category = "security-istio-io",
    doc = "Istio's RequestAuthentication (security.istio.io), as zmesh reads it."
)]
pub struct RequestAuthenticationSpec {
    /// Workloads the policy applies to (not applied in ambient without a waypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The resource the policy attaches to (the waypoint Gateway, or a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Several resources the policy attaches to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The JWTs accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// `spec.jwtRules[]` (Istio's JWTRule).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// Must equal the token's `iss`.
    #[serde(default)]
    pub issuer: String,
    /// One of these must be in the token's `aud` (empty: not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the waypoint fetches the JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWKS itself (RFC 7517 JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers that carry the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters that carry the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies that carry the token (refused: not supported by zmesh's waypoint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// A header that gets the validated payload (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Claims copied to headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long fetching `jwksUri` may take (protobuf duration, e.g. `5s`; default 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// The header's name.
    pub name: String,
    /// What precedes the token in its value (e.g. `Bearer `).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The header.
    pub header: String,
    /// The claim (`a.b` for a nested one).
    pub claim: String,
}

/// Something an operator should know about one RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuthnIssue {
    pub namespace: String,
    pub name: String,
    /// What happened, naming the field.
    pub message: String,
}

impl fmt::Display for AuthnIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RequestAuthentication {}/{}: {}",
            self.namespace, self.name, self.message
        )
    }
}

/// The translation's output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAuthn {
    /// One resource per bound Service with rules, keyed `<namespace>/<hostname>`.
    pub services: BTreeMap<String, pb::ServiceAuthn>,
    /// Policies refused or not applied (and why).
    pub issues: Vec<AuthnIssue>,
}

/// Translates every RequestAuthentication in `policies` for the Services in `bound`.
pub fn translate_request_authn(
    policies: &BTreeMap<(String, String), DynamicObject>,
    bound: &BTreeMap<String, pb::BoundService>,
) -> RequestAuthn {
    let mut out = RequestAuthn::default();
    // Oldest first, then by namespace and name: when two policies clash on a Service, the one
    // created later is refused there, and one that worked keeps working.
    let mut policies: Vec<_> = policies.iter().collect();
    policies.sort_by_key(|&(key, obj)| (Age::of(&obj.metadata), key));
    for ((namespace, name), obj) in policies {
        let issue = |message: String| AuthnIssue {
            namespace: namespace.clone(),
            name: name.clone(),
            message,
        };
        let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let spec: RequestAuthenticationSpec = if spec.is_null() {
            RequestAuthenticationSpec::default()
        } else {
            match serde_json::from_value(spec) {
                Ok(s) => s,
                Err(e) => {
                    // serde names the tenant's unknown variant or field: escaped, bounded.
                    let e = zmesh_core::peer_text::PeerText::display(
                        &e,
                        zmesh_core::peer_text::PEER_ERROR_MAX,
                    );
                    out.issues.push(issue(format!("refused: spec: {e}")));
                    continue;
                }
            }
        };
        let targets: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        if targets.is_empty() {
            out.issues.push(issue(
                "has no targetRefs: it selects workloads, whose traffic in ambient meets only \
                 ztunnel, which cannot validate JWTs, so it does not apply; attach it to a \
                 waypoint Gateway or a Service bound to one with targetRefs"
                    .into(),
            ));
            continue;
        }
        if spec.selector.is_some() {
            out.issues.push(issue(
                "refused: both selector and targetRef(s) are set (Istio rejects this)".into(),
            ));
            continue;
        }
        let rules = match check_rules(namespace, name, &spec.jwt_rules) {
            Ok(r) => r,
            Err(e) => {
                out.issues.push(issue(format!("refused: {e}")));
                continue;
            }
        };
        // Each Service once, however many of the targets name it.
        let mut keys = BTreeSet::new();
        for t in targets {
            keys.extend(
                attached(namespace, t, bound, &mut |m| out.issues.push(issue(m)))
                    .unwrap_or_default(),
            );
        }
        for key in keys {
            let b = &bound[&key];
            let service = out.services.entry(key).or_insert_with(|| pb::ServiceAuthn {
                namespace: b.namespace.clone(),
                name: b.name.clone(),
                hostname: b.hostname.clone(),
                rules: Vec::new(),
            });
            // Another policy's rules on the same Service: this one is refused there.
            let clash = (clash(&rules, &service.rules))
                .or_else(|| clash(&service.rules, &rules))
                .map(|c| c.to_string());
            if let Some(c) = clash {
                out.issues.push(issue(format!(
                    "refused for Service {}/{}: {c}",
                    b.namespace, b.name
                )));
                continue;
            }
            service.rules.extend(rules.iter().cloned());
        }
    }
    out.services.retain(|_, s| !s.rules.is_empty());
    out
}

/// The bound Services a target names, or `None` (with `report` told why) when it names none
/// that zmesh applies policies to.
fn attached(
    namespace: &str,
    t: &PolicyTargetReference,
    bound: &BTreeMap<String, pb::BoundService>,
    report: &mut dyn FnMut(String),
) -> Option<Vec<String>> {
    if t.namespace.as_deref().is_some_and(|ns| ns != namespace) {
        report(format!(
            "targetRef {} {:?} names namespace {:?}: a policy may only target objects in its \
             own namespace, so it is ignored",
            // The tenant's text, not yet matched against the kinds zmesh knows.
            zmesh_core::peer_text::PeerText::new(&t.kind),
            t.name,
            t.namespace.as_deref().unwrap_or_default()
        ));
        return None;
    }
    let keys: Vec<String> = match (t.group.as_str(), t.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => bound
            .iter()
            .filter(|(_, b)| {
                b.waypoint
                    .as_ref()
                    .is_some_and(|w| w.namespace == namespace && w.name == t.name)
            })
            .map(|(k, _)| k.clone())
            .collect(),
        ("" | "core", "Service") => bound
            .iter()
            .filter(|(_, b)| b.namespace == namespace && b.name == t.name)
            .map(|(k, _)| k.clone())
            .collect(),
        (g, k) => {
            report(format!(
                "targetRef kind {k:?} (group {g:?}) is not supported by zmesh (Gateway, Service); \
                 it is ignored"
            ));
            return None;
        }
    };
    if keys.is_empty() {
        report(format!(
            "targetRef {} {:?}: no Service bound to a waypoint is attached there, so nothing \
             validates these tokens yet",
            t.kind, t.name
        ));
    }
    Some(keys)
}

/// Checks every rule; the first bad one refuses the policy.
fn check_rules(namespace: &str, name: &str, rules: &[JwtRule]) -> Result<Vec<pb::JwtRule>, String> {
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        let at = |f: &str| format!("jwtRules[{i}].{f}");
        if r.issuer.is_empty() {
            return Err(format!("{}: must be set (the token's `iss`)", at("issuer")));
        }
        let (jwks, jwks_uri) = match (r.jwks.as_deref(), r.jwks_uri.as_deref()) {
            (Some(j), None) if !j.is_empty() => {
                check_jwks(j).map_err(|e| format!("{}: {e}", at("jwks")))?;
                (j.to_owned(), String::new())
            }
            (None, Some(u)) if !u.is_empty() => {
                check_uri(u).map_err(|e| format!("{}: {e}", at("jwksUri")))?;
                (String::new(), u.to_owned())
            }
            (None, None) => {
                return Err(format!(
                    "{}: neither jwks nor jwksUri is set; OpenID discovery from the issuer is \
                     not supported by zmesh: set jwksUri",
                    at("jwksUri")
                ));
            }
            _ => {
                return Err(format!(
                    "{}: set exactly one of jwks and jwksUri",
                    at("jwks")
                ));
            }
        };
        if !r.from_cookies.is_empty() {
            return Err(format!(
                "{}: not supported by zmesh's waypoint; use fromHeaders or fromParams",
                at("fromCookies")
            ));
        }
        for (j, h) in r.from_headers.iter().enumerate() {
            check_header(&h.name)
                .map_err(|e| format!("{}: {e}", at(&format!("fromHeaders[{j}].name"))))?;
        }
        if let Some(j) = r.from_params.iter().position(String::is_empty) {
            return Err(format!("{}: empty", at(&format!("fromParams[{j}]"))));
        }
        if let Some(h) = &r.output_payload_to_header {
            check_header(h).map_err(|e| format!("{}: {e}", at("outputPayloadToHeader")))?;
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            check_header(&c.header).map_err(|e| {
                format!("{}: {e}", at(&format!("outputClaimToHeaders[{j}].header")))
            })?;
            if c.claim.is_empty() || c.claim.split('.').any(str::is_empty) {
                return Err(format!(
                    "{}: {:?} is not a claim name or `a.b` path",
                    at(&format!("outputClaimToHeaders[{j}].claim")),
                    c.claim
                ));
            }
        }
        let timeout = r
            .timeout
            .as_deref()
            .map(|t| timeout(t).map_err(|e| format!("{}: {e}", at("timeout"))))
            .transpose()?;
        out.push(pb::JwtRule {
            policy: format!("{namespace}/{name}"),
            index: i as u32,
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks,
            jwks_uri,
            from_headers: r
                .from_headers
                .iter()
                .map(|h| pb::JwtHeader {
                    name: h.name.clone(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            from_params: r.from_params.clone(),
            forward_original_token: r.forward_original_token.unwrap_or(false),
            output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| pb::ClaimToHeader {
                    header: c.header.clone(),
                    claim: c.claim.clone(),
                })
                .collect(),
            timeout,
        });
    }
    if let Some(c) = clash(&out, &out) {
        return Err(c.to_string());
    }
    Ok(out)
}

/// A rule's output header that is the header a rule reads its token from. The waypoint
/// removes every rule's output headers from a request before it looks for a token (a client
/// must not send what only a verified token may set), so that token would never be found.
struct Clash<'a> {
    /// The rule that writes the header, and where.
    writer: &'a pb::JwtRule,
    output: Output,
    header: &'a str,
    /// The rule that reads its token from it.
    reader: &'a pb::JwtRule,
}

/// Where a rule writes a header.
#[derive(Clone, Copy)]
enum Output {
    Payload,
    Claim(usize),
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Payload => f.write_str("outputPayloadToHeader"),
            Output::Claim(k) => write!(f, "outputClaimToHeaders[{k}].header"),
        }
    }
}

impl fmt::Display for Clash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, r) = (self.writer, self.reader);
        let by_default = if reads_default_location(r) {
            " by default"
        } else {
            ""
        };
        if w.policy == r.policy {
            write!(
                f,
                "jwtRules[{}].{}: {:?} is the header jwtRules[{}] reads its token from{}",
                w.index, self.output, self.header, r.index, by_default
            )?;
        } else {
            write!(
                f,
                "RequestAuthentication {}'s jwtRules[{}].{} ({:?}) is the header \
                 RequestAuthentication {}'s jwtRules[{}] reads its token from{}",
                w.policy, w.index, self.output, self.header, r.policy, r.index, by_default
            )?;
        }
        write!(
            f,
            "; the waypoint removes the rules' output headers from each request before it looks \
             for a token, so that token would never be found: use different headers"
        )
    }
}

/// The first output header of `writers` that a rule of `readers` reads its token from.
fn clash<'a>(writers: &'a [pb::JwtRule], readers: &'a [pb::JwtRule]) -> Option<Clash<'a>> {
    for writer in writers {
        let payload = Some(writer.output_payload_to_header.as_str())
            .filter(|h| !h.is_empty())
            .map(|h| (Output::Payload, h));
        let claims = (writer.output_claim_to_headers.iter().enumerate())
            .map(|(k, c)| (Output::Claim(k), c.header.as_str()));
        for (output, header) in payload.into_iter().chain(claims) {
            let reads = |r: &&pb::JwtRule| token_headers(r).any(|h| h.eq_ignore_ascii_case(header));
            if let Some(reader) = readers.iter().find(reads) {
                return Some(Clash {
                    writer,
                    output,
                    header,
                    reader,
                });
            }
        }
    }
    None
}

/// Whether a rule names neither headers nor parameters, so that Istio's default locations
/// apply: `Authorization: Bearer`, then the `access_token` parameter.
fn reads_default_location(r: &pb::JwtRule) -> bool {
    r.from_headers.is_empty() && r.from_params.is_empty()
}

/// The headers a rule reads its token from: its `fromHeaders`, or `Authorization` by default.
fn token_headers(r: &pb::JwtRule) -> impl Iterator<Item = &str> {
    let default = reads_default_location(r).then_some("authorization");
    (r.from_headers.iter().map(|h| h.name.as_str())).chain(default)
}

/// A JWKS (RFC 7517 §5): an object with a non-empty `keys` array of objects with a `kty`.
/// The waypoint parses the keys themselves (and refuses a set it cannot use).
fn check_jwks(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS: no `keys` array (RFC 7517 §5)")?;
    if keys.is_empty() {
        return Err("the JWKS has no key".into());
    }
    if let Some(i) = keys
        .iter()
        .position(|k| k.get("kty").and_then(Value::as_str).is_none())
    {
        return Err(format!("keys[{i}] has no `kty` (RFC 7517 §4.1)"));
    }
    Ok(())
}

fn check_uri(uri: &str) -> Result<(), String> {
    let u = http::Uri::try_from(uri).map_err(|e| format!("{uri:?} is not a URI: {e}"))?;
    if !matches!(u.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{uri:?}: only http:// and https:// URIs are fetched"
        ));
    }
    if u.host().is_none_or(str::is_empty) {
        return Err(format!("{uri:?} has no host"));
    }
    Ok(())
}

fn check_header(name: &str) -> Result<(), String> {
    http::HeaderName::try_from(name)
        .map(drop)
        .map_err(|e| format!("{name:?} is not a header name: {e}"))
}

/// A protobuf JSON duration: seconds with an optional fraction and an `s` (`5s`, `1.5s`).
fn timeout(text: &str) -> Result<prost_types::Duration, String> {
    let bad = || format!("{text:?} is not a duration like `5s` or `1.5s`");
    let secs: f64 = text
        .strip_suffix('s')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("{text:?}: must be above 0 and at most an hour"));
    }
    Ok(prost_types::Duration {
        seconds: secs.trunc() as i64,
        nanos: (secs.fract() * 1e9).round() as i32,
    })
}

#[cfg(test)]
mod tests;
