//! What the waypoint's request authentication reads from outside: a client's token (from
//! `Authorization: Bearer` or `?access_token=`, checked by `authn::verify::authenticate`
//! against a rule with an inline HS256 JWKS) and `zmesh.waypoint.v1.ServiceAuthn` resources
//! from its ADS stream (`authn::compile`).
//!
//! Input: the first byte picks the parser; the rest is the token text, or name length + name +
//! protobuf bytes (`zmesh_fuzz::split_named`).
//!
//! Invariants: a token is accepted only with the rule's issuer, and then its header is gone
//! from the request forwarded; no token found means the request had none where the rule looks;
//! a refusal has one of Envoy's messages. An accepted resource has an issuer and at least one token
//! location per rule.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use xds_proto::zmesh::waypoint::v1 as pb;
use zmesh_waypoint::authn::{JwksCache, ServiceAuthn, compile, verify};

const ISS: &str = "testing@secure.istio.io";
/// An HS256 key, `k` = base64url("zmesh-fuzz-secret").
const JWKS: &str =
    r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"fuzz","k":"em1lc2gtZnV6ei1zZWNyZXQ"}]}"#;

fn rules() -> &'static (ServiceAuthn, Arc<JwksCache>) {
    static R: OnceLock<(ServiceAuthn, Arc<JwksCache>)> = OnceLock::new();
    R.get_or_init(|| {
        let p = pb::ServiceAuthn {
            rules: vec![pb::JwtRule {
                issuer: ISS.into(),
                jwks: JWKS.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let cache = JwksCache::new(Duration::from_secs(3600), Default::default());
        (
            compile("fuzz/s", &p).expect("the fuzz rule compiles"),
            Arc::new(cache),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let token = String::from_utf8_lossy(rest);
        let Ok(bearer) = http::HeaderValue::try_from(format!("Bearer {token}")) else {
            return;
        };
        let mut parts = http::Request::get("/").body(()).unwrap().into_parts().0;
        parts.headers.insert(http::header::AUTHORIZATION, bearer);
        let (authn, cache) = rules();
        match futures::executor::block_on(verify::authenticate(authn, cache, &mut parts)) {
            Ok(Some(auth)) => {
                assert_eq!(auth.issuer, ISS);
                assert_eq!(auth.principal, format!("{ISS}/{}", auth.subject));
                assert!(!parts.headers.contains_key(http::header::AUTHORIZATION));
            }
            // No token: none after the prefix, or a header value that is not text.
            Ok(None) => assert!(
                token.trim().is_empty()
                    || parts.headers[http::header::AUTHORIZATION].to_str().is_err(),
                "a token was there: {token:?}"
            ),
            Err(f) => assert!(["Jwt ", "Jwks "].iter().any(|p| f.message().starts_with(p))),
        }
    } else {
        let (name, bytes) = zmesh_fuzz::split_named(rest);
        let Ok(msg) = pb::ServiceAuthn::decode(bytes) else {
            return;
        };
        if let Ok(a) = compile(&name, &msg) {
            assert_eq!(a.key, name);
            assert!(
                a.rules
                    .iter()
                    .all(|r| !r.issuer.is_empty() && !r.locations.is_empty())
            );
        }
    }
});
