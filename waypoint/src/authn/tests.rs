//! Request authentication with keys made here (ECDSA P-256 from aws-lc-rs, RFC 7518 §3.4)
//! and a JWKS server on loopback for `jwksUri`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use xds_proto::zmesh::waypoint::v1 as pb;

use super::*;

const ISS: &str = "testing@secure.istio.io";

/// An EC P-256 signing key and its public JWK.
struct Signer {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

impl Signer {
    fn new(kid: &str) -> Signer {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        Signer {
            kid: kid.into(),
            pkcs8: doc.as_ref().to_vec(),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

fn jwks(signers: &[&Signer]) -> String {
    json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({ "iss": ISS, "sub": ISS, "exp": now() + 3600, "groups": ["group1", "group2"],
            "org": { "team": "mesh" } })
}

fn rule(jwks: &str) -> pb::JwtRule {
    pb::JwtRule {
        policy: "foo/jwt".into(),
        issuer: ISS.into(),
        jwks: jwks.into(),
        ..Default::default()
    }
}

fn authn(rules: Vec<pb::JwtRule>) -> ServiceAuthn {
    compile(
        "foo/httpbin.foo.svc.cluster.local",
        &pb::ServiceAuthn {
            namespace: "foo".into(),
            name: "httpbin".into(),
            hostname: "httpbin.foo.svc.cluster.local".into(),
            rules,
        },
    )
    .unwrap()
}

fn cache() -> Arc<JwksCache> {
    Arc::new(JwksCache::new(
        Duration::from_millis(100),
        CancellationToken::new(),
    ))
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

async fn run(
    a: &ServiceAuthn,
    p: &mut http::request::Parts,
) -> Result<Option<RequestAuth>, Failure> {
    verify::authenticate(a, &cache(), p).await
}

#[tokio::test]
async fn a_good_token_authenticates_and_is_removed_before_forwarding() {
    let s = Signer::new("k1");
    let a = authn(vec![rule(&jwks(&[&s]))]);
    let bearer = format!("Bearer {}", s.sign(&claims()));
    let mut p = parts("/headers", &[("authorization", &bearer)]);
    let auth = run(&a, &mut p).await.unwrap().expect("authenticated");
    assert_eq!(auth.principal, format!("{ISS}/{ISS}"));
    assert_eq!(auth.issuer, ISS);
    assert_eq!(auth.claims["groups"], json!(["group1", "group2"]));
    assert!(
        p.headers.get("authorization").is_none(),
        "the token is removed by default (forwardOriginalToken: false)"
    );
}

#[tokio::test]
async fn forward_original_token_keeps_it() {
    let s = Signer::new("k1");
    let mut r = rule(&jwks(&[&s]));
    r.forward_original_token = true;
    let a = authn(vec![r]);
    let bearer = format!("Bearer {}", s.sign(&claims()));
    let mut p = parts("/", &[("authorization", &bearer)]);
    assert!(run(&a, &mut p).await.unwrap().is_some());
    assert_eq!(p.headers["authorization"], bearer.as_str());
}

#[tokio::test]
async fn no_token_passes_unauthenticated() {
    let s = Signer::new("k1");
    let a = authn(vec![rule(&jwks(&[&s]))]);
    let mut p = parts("/", &[("authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(run(&a, &mut p).await.unwrap(), None);
}

#[tokio::test]
async fn expired_bad_signature_wrong_audience_and_issuer_are_refused() {
    let s = Signer::new("k1");
    let impostor = Signer::new("k1");
    let mut r = rule(&jwks(&[&s]));
    r.audiences = vec!["httpbin".into()];
    let a = authn(vec![r]);
    let with = |c: Value, by: &Signer| {
        let mut c2 = c;
        c2["aud"] = json!("httpbin");
        by.sign(&c2)
    };
    let check = async |token: String| {
        let bearer = format!("Bearer {token}");
        run(&a, &mut parts("/", &[("authorization", &bearer)])).await
    };
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    assert!(matches!(
        check(with(expired, &s)).await,
        Err(Failure::Expired)
    ));
    assert!(matches!(
        check(with(claims(), &impostor)).await,
        Err(Failure::Signature)
    ));
    let mut other_aud = claims();
    other_aud["aud"] = json!(["bookinfo"]);
    assert!(matches!(
        check(s.sign(&other_aud)).await,
        Err(Failure::Audience(a)) if a == ["bookinfo"]
    ));
    let mut other_iss = claims();
    other_iss["iss"] = json!("someone@else");
    let e = check(with(other_iss, &s)).await.unwrap_err();
    assert!(matches!(e, Failure::UnknownIssuer(_)), "{e:?}");
    assert_eq!(e.message(), "Jwt issuer is not configured");
    let mut not_yet = claims();
    not_yet["nbf"] = json!(now() + 3600);
    assert!(matches!(
        check(with(not_yet, &s)).await,
        Err(Failure::NotYetValid)
    ));
    assert!(matches!(
        check("abc.def".into()).await,
        Err(Failure::Malformed(_))
    ));
    // The right token passes the same rule.
    assert!(check(with(claims(), &s)).await.unwrap().is_some());
}

#[tokio::test]
async fn from_headers_with_prefix_and_from_params() {
    let s = Signer::new("k1");
    let mut r = rule(&jwks(&[&s]));
    r.from_headers = vec![pb::JwtHeader {
        name: "x-jwt-assertion".into(),
        prefix: "Token ".into(),
    }];
    r.from_params = vec!["my_token".into()];
    let a = authn(vec![r]);
    let t = s.sign(&claims());
    let mut p = parts("/", &[("x-jwt-assertion", &format!("Token {t}"))]);
    assert!(run(&a, &mut p).await.unwrap().is_some());
    assert!(p.headers.get("x-jwt-assertion").is_none());
    // The default locations are not looked at once locations are given.
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(run(&a, &mut p).await.unwrap(), None);
    let mut p = parts(&format!("/get?a=1&my_token={t}"), &[]);
    assert!(run(&a, &mut p).await.unwrap().is_some());
    // A token in a parameter stays in the URI (as with Envoy).
    assert!(p.uri.query().unwrap().contains(&t));
    // Default locations: `access_token`.
    let a = authn(vec![rule(&jwks(&[&s]))]);
    let mut p = parts(&format!("/get?access_token={t}"), &[]);
    assert!(run(&a, &mut p).await.unwrap().is_some());
    let mut bad = t.clone();
    bad.push('x');
    let mut p = parts(&format!("/get?access_token={bad}"), &[]);
    assert!(run(&a, &mut p).await.is_err());
}

#[tokio::test]
async fn payload_and_claims_are_copied_to_headers() {
    let s = Signer::new("k1");
    let mut r = rule(&jwks(&[&s]));
    r.output_payload_to_header = "x-jwt-payload".into();
    r.output_claim_to_headers = vec![
        pb::ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
        pb::ClaimToHeader {
            header: "x-team".into(),
            claim: "org.team".into(),
        },
    ];
    let a = authn(vec![r]);
    let c = claims();
    let bearer = format!("Bearer {}", s.sign(&c));
    let mut p = parts("/", &[("authorization", &bearer)]);
    assert!(run(&a, &mut p).await.unwrap().is_some());
    let payload = URL_SAFE_NO_PAD
        .decode(p.headers["x-jwt-payload"].as_bytes())
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), c);
    assert_eq!(p.headers["x-sub"], ISS);
    assert_eq!(p.headers["x-team"], "mesh");
}

#[tokio::test]
async fn a_token_is_checked_by_the_rule_of_its_issuer() {
    let s1 = Signer::new("k1");
    let s2 = Signer::new("k2");
    let mut other = rule(&jwks(&[&s2]));
    other.issuer = "other@example.com".into();
    let a = authn(vec![rule(&jwks(&[&s1])), other]);
    let mut c = claims();
    c["iss"] = json!("other@example.com");
    let bearer = format!("Bearer {}", s2.sign(&c));
    let auth = run(&a, &mut parts("/", &[("authorization", &bearer)]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(auth.issuer, "other@example.com");
    // Signed by the first issuer's key but claiming the second issuer: refused.
    let bearer = format!("Bearer {}", s1.sign(&c));
    assert!(matches!(
        run(&a, &mut parts("/", &[("authorization", &bearer)])).await,
        Err(Failure::NoKey | Failure::Signature)
    ));
}

#[test]
fn bad_rules_are_refused_with_the_field_named() {
    let s = Signer::new("k1");
    let res = |r: pb::JwtRule| {
        compile(
            "foo/h",
            &pb::ServiceAuthn {
                rules: vec![r],
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string()
    };
    let mut r = rule(&jwks(&[&s]));
    r.issuer.clear();
    assert!(res(r).contains("rules[0].issuer"));
    let mut r = rule(&jwks(&[&s]));
    r.jwks_uri = "http://jwks/keys".into();
    assert!(res(r).contains("exactly one of"));
    let mut r = rule("");
    r.jwks_uri = "file:///etc/keys".into();
    assert!(res(r).contains("rules[0].jwks_uri"));
    let e = res(rule(r#"{"keys":[{"kty":"EC","crv":"P-256"}]}"#));
    assert!(
        e.contains("rules[0].jwks") && e.contains("no usable key"),
        "{e}"
    );
    assert!(res(rule("{not json")).contains("not a JWKS"));
    let mut r = rule(&jwks(&[&s]));
    r.output_payload_to_header = "bad header".into();
    assert!(res(r).contains("output_payload_to_header"));
}

/// A JWKS server on loopback answering the current `body` (or 500 when `None`).
async fn jwks_server(body: Arc<Mutex<Option<String>>>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let resp = match body {
                    Some(b) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    ),
                    None => {
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                    }
                };
                let _ = c.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn jwks_uri_is_fetched_rotated_on_refresh_and_kept_on_failure() {
    let old = Signer::new("old");
    let new = Signer::new("new");
    let body = Arc::new(Mutex::new(Some(jwks(&[&old]))));
    let uri = jwks_server(body.clone()).await;
    let mut r = rule("");
    r.jwks_uri = uri;
    let a = authn(vec![r]);
    let cache = cache();
    let check = async |s: &Signer| {
        let bearer = format!("Bearer {}", s.sign(&claims()));
        verify::authenticate(&a, &cache, &mut parts("/", &[("authorization", &bearer)])).await
    };
    assert!(check(&old).await.unwrap().is_some());
    assert!(matches!(check(&new).await, Err(Failure::NoKey)));
    // The server rotates its keys; a refresh (every 100 ms here) picks them up.
    *body.lock().unwrap() = Some(jwks(&[&new]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while check(&new).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(check(&old).await, Err(Failure::NoKey)));
    // The server fails: the last good set keeps validating.
    *body.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(check(&new).await.unwrap().is_some());
    // No rule names the URI any more: it is forgotten (and its refresher stops); a rule
    // naming it again needs a fresh fetch, which now fails.
    assert_eq!(cache.len(), 1);
    cache.retain([]);
    assert!(cache.is_empty());
    assert!(matches!(check(&new).await, Err(Failure::Jwks(_))));
}

#[tokio::test]
async fn an_unreachable_jwks_uri_refuses_tokens() {
    // A port nothing listens on (bound, then closed).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let s = Signer::new("k1");
    let mut r = rule("");
    r.jwks_uri = format!("http://{addr}/jwks.json");
    r.timeout = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    let a = authn(vec![r]);
    let bearer = format!("Bearer {}", s.sign(&claims()));
    let e = run(&a, &mut parts("/", &[("authorization", &bearer)]))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "Jwks remote fetch is failed");
}

#[tokio::test]
async fn a_refusal_is_envoys_401_and_is_counted() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(crate::telemetry::Metrics::new(&mut registry));
    let record = crate::telemetry::RequestRecord::new(
        metrics,
        crate::telemetry::RequestLabels::default(),
        "10.0.0.1:1234".parse().unwrap(),
        "GET",
        "/headers",
        "httpbin.foo:8000",
    );
    let d = Denied {
        failure: Failure::Expired,
        realm: "http://httpbin.foo:8000/headers".into(),
        grpc: false,
    };
    let r = d.respond(record);
    assert_eq!(r.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="http://httpbin.foo:8000/headers", error="invalid_token""#
    );
    use http_body_util::BodyExt;
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Jwt is expired");
    // The body's end records the request once this task yields.
    crate::telemetry::counted_after_yields(&registry, 1).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("counted");
    assert!(
        line.contains(r#"response_code="401""#) && line.contains(r#"response_flags="UAEX""#),
        "{line}"
    );
}

#[tokio::test]
async fn a_grpc_refusal_is_unauthenticated_in_grpc_terms() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(crate::telemetry::Metrics::new(&mut registry));
    let record = crate::telemetry::RequestRecord::new(
        metrics,
        crate::telemetry::RequestLabels::default(),
        "10.0.0.1:1234".parse().unwrap(),
        "POST",
        "/echo.Echo/Call",
        "echo:7070",
    );
    let d = Denied {
        failure: Failure::Signature,
        realm: "http://echo:7070/echo.Echo/Call".into(),
        grpc: true,
    };
    let r = d.respond(record);
    assert_eq!(r.status(), http::StatusCode::OK);
    assert_eq!(r.headers()["grpc-status"], "16");
    assert_eq!(r.headers()["grpc-message"], "Jwt verification fails");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains(r#"grpc_response_status="16""#)
            && l.contains(r#"response_flags="UAEX""#)),
        "{text}"
    );
}

/// A header a rule writes (`outputClaimToHeaders`, `outputPayloadToHeader`) never carries the
/// client's own value: it is removed when no token comes, when the token lacks the claim, and
/// replaced when the token has it (Envoy's jwt_authn sanitizes them, istio/istio#53212).
#[tokio::test]
async fn headers_the_rules_write_never_carry_the_clients_value() {
    let s = Signer::new("k1");
    let mut r = rule(&jwks(&[&s]));
    r.output_payload_to_header = "x-jwt-payload".into();
    r.output_claim_to_headers = vec![
        pb::ClaimToHeader {
            header: "x-role".into(),
            claim: "role".into(),
        },
        pb::ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
    ];
    let a = authn(vec![r]);
    let forged = [
        ("x-role", "admin"),
        ("x-jwt-payload", "forged"),
        ("x-sub", "forged"),
    ];
    let get = |p: &http::request::Parts, h: &str| {
        p.headers.get(h).map(|v| v.to_str().unwrap().to_owned())
    };

    let mut p = parts("/", &forged);
    assert!(run(&a, &mut p).await.unwrap().is_none(), "no token");
    for (h, _) in forged {
        assert_eq!(get(&p, h), None, "{h} without a token");
    }

    let bearer = format!("Bearer {}", s.sign(&claims()));
    let mut with_token = forged.to_vec();
    with_token.push(("authorization", bearer.as_str()));
    let mut p = parts("/", &with_token);
    assert!(run(&a, &mut p).await.unwrap().is_some(), "a valid token");
    assert_eq!(get(&p, "x-role"), None, "the token has no role claim");
    let sub = claims()["sub"].as_str().unwrap().to_owned();
    assert_eq!(get(&p, "x-sub"), Some(sub), "the token's sub");
    let payload = get(&p, "x-jwt-payload").unwrap();
    assert_ne!(payload, "forged");
    assert_eq!(p.headers.get_all("x-jwt-payload").iter().count(), 1);
}

/// Every rule's output headers are the waypoint's to write, whichever issuer the token names:
/// a token of one issuer does not leave the client's value under another rule's header.
#[tokio::test]
async fn output_headers_of_every_rule_are_removed() {
    let s = Signer::new("k1");
    let mut mine = rule(&jwks(&[&s]));
    mine.output_claim_to_headers = vec![pb::ClaimToHeader {
        header: "x-sub".into(),
        claim: "sub".into(),
    }];
    let mut other = rule(&jwks(&[&s]));
    other.issuer = "https://other.example".into();
    other.output_payload_to_header = "x-other-payload".into();
    let a = authn(vec![mine, other]);
    let bearer = format!("Bearer {}", s.sign(&claims()));
    let mut p = parts(
        "/",
        &[
            ("authorization", bearer.as_str()),
            ("x-other-payload", "forged"),
        ],
    );
    assert!(run(&a, &mut p).await.unwrap().is_some());
    assert!(
        p.headers.get("x-other-payload").is_none(),
        "{:?}",
        p.headers
    );
    assert!(p.headers.get("x-sub").is_some());
}
