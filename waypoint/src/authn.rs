//! Request authentication's outcome for one request: what a validated JWT says about the
//! caller (Istio's RequestAuthentication). L7 authorization reads it for `requestPrincipals`
//! and the `request.auth.*` conditions. The authentication stage puts it in the request's
//! extensions; a request without one is unauthenticated (a missing token passes as such, as in
//! Istio; an invalid one never gets this far).

use serde_json::{Map, Value};

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
