//! `zmesh.waypoint.v1.ServiceAuthn` compiled: header names parsed, inline JWKS parsed, URIs
//! checked, defaults filled in (Istio's: `Authorization: Bearer` then `access_token`, 5 s fetch
//! timeout). A resource with any bad rule is refused whole.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use xds_proto::zmesh::waypoint::v1 as pb;

use super::jwks::KeySet;

/// Istio's `JWTRule.timeout` default for fetching `jwksUri`.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a `ServiceAuthn` resource was refused (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error("authentication {resource}: {field}: {reason}")]
    Invalid {
        resource: String,
        /// The field, e.g. `rules[0].jwks_uri`.
        field: String,
        reason: String,
    },
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header, after a prefix (e.g. `Bearer `, compared without case).
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
}

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum Keys {
    Inline(Arc<KeySet>),
    /// Fetched by the waypoint (and refreshed) from an `http`/`https` URI.
    Remote {
        uri: String,
        timeout: Duration,
    },
}

/// One compiled JWT rule.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `RequestAuthentication <ns>/<name> jwtRules[<i>]`, for logs.
    pub name: Arc<str>,
    pub issuer: String,
    /// Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    pub keys: Keys,
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
    /// (header, claim path split on `.`).
    pub output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
}

/// The compiled rules of one Service.
#[derive(Debug, Clone, Default)]
pub struct ServiceAuthn {
    /// `<namespace>/<hostname>`.
    pub key: String,
    pub rules: Vec<JwtRule>,
}

/// Compiles resource `resource` (its xDS name).
pub fn compile(resource: &str, p: &pb::ServiceAuthn) -> Result<ServiceAuthn, AuthnError> {
    let err = |field: String, reason: String| AuthnError::Invalid {
        resource: resource.to_owned(),
        field,
        reason,
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let f = |name: &str| format!("rules[{i}].{name}");
        if r.issuer.is_empty() {
            return Err(err(f("issuer"), "must be set (the token's `iss`)".into()));
        }
        let keys = match (r.jwks.is_empty(), r.jwks_uri.is_empty()) {
            (false, true) => Keys::Inline(Arc::new(
                KeySet::parse(&r.jwks).map_err(|e| err(f("jwks"), e.to_string()))?,
            )),
            (true, false) => {
                check_uri(&r.jwks_uri).map_err(|why| err(f("jwks_uri"), why))?;
                let timeout = match &r.timeout {
                    None => DEFAULT_FETCH_TIMEOUT,
                    Some(d) => Duration::try_from(*d)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| err(f("timeout"), "must be positive".into()))?,
                };
                Keys::Remote {
                    uri: r.jwks_uri.clone(),
                    timeout,
                }
            }
            _ => {
                return Err(err(
                    f("jwks"),
                    "exactly one of `jwks` and `jwks_uri` must be set".into(),
                ));
            }
        };
        let mut locations = Vec::new();
        for (j, h) in r.from_headers.iter().enumerate() {
            let name = HeaderName::try_from(h.name.as_str()).map_err(|e| {
                err(
                    f(&format!("from_headers[{j}].name")),
                    format!("{:?} is not a header name: {e}", h.name),
                )
            })?;
            locations.push(Location::Header {
                name,
                prefix: h.prefix.clone(),
            });
        }
        for (j, q) in r.from_params.iter().enumerate() {
            if q.is_empty() {
                return Err(err(f(&format!("from_params[{j}]")), "empty name".into()));
            }
            locations.push(Location::Param(q.clone()));
        }
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: http::header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ];
        }
        let header = |field: String, v: &str| {
            HeaderName::try_from(v)
                .map_err(|e| err(field, format!("{v:?} is not a header name: {e}")))
        };
        let output_payload_to_header = match r.output_payload_to_header.as_str() {
            "" => None,
            h => Some(header(f("output_payload_to_header"), h)?),
        };
        let mut output_claim_to_headers = Vec::new();
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            let h = header(
                f(&format!("output_claim_to_headers[{j}].header")),
                &c.header,
            )?;
            if c.claim.is_empty() || c.claim.split('.').any(str::is_empty) {
                return Err(err(
                    f(&format!("output_claim_to_headers[{j}].claim")),
                    format!("{:?} is not a claim name or `a.b` path", c.claim),
                ));
            }
            output_claim_to_headers.push((h, c.claim.split('.').map(str::to_owned).collect()));
        }
        rules.push(JwtRule {
            name: format!("RequestAuthentication {} jwtRules[{}]", r.policy, r.index).into(),
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            keys,
            locations,
            forward_original_token: r.forward_original_token,
            output_payload_to_header,
            output_claim_to_headers,
        });
    }
    Ok(ServiceAuthn {
        key: resource.to_owned(),
        rules,
    })
}

/// An absolute `http` or `https` URI with a host.
pub fn check_uri(uri: &str) -> Result<(), String> {
    let u = http::Uri::try_from(uri).map_err(|e| format!("{uri:?} is not a URI: {e}"))?;
    match u.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{uri:?}: only http:// and https:// are fetched")),
    }
    if u.host().is_none_or(str::is_empty) {
        return Err(format!("{uri:?} has no host"));
    }
    Ok(())
}
