//! Istio's task "Authorization with JWT"
//! (<https://istio.io/latest/docs/tasks/security/authorization/authz-jwt/>), its ambient form
//! (the RequestAuthentication attached to the waypoint with `targetRefs`), through the real
//! waypoint of `zmesh-lab up --world gamma`, driven as a user would from another shell.
//!
//! The task's `httpbin` in `foo` is the fixture's `echo` Service in the mesh namespace (it
//! answers with the request headers it saw, as httpbin's `/headers` does), its `curl` pod the
//! consumer namespace's pod. The task fetches its JWKS from Istio's repository; here the lab
//! has no Internet, so a lab pod outside the mesh serves a JWKS made by the test over
//! `jwksUri`, and the tokens are signed with its key, with the task's claims (issuer and
//! subject `testing@secure.istio.io`; the "group" token adds `groups: [group1, group2]`).
//!
//! Steps of the task asserted here (authentication, which this waypoint enforces):
//! - with the RequestAuthentication `jwt-example` applied, a request with an invalid token is
//!   401 (Envoy's body and `www-authenticate`), one without a token is 200;
//! - a valid token is 200, and the token is not forwarded to the backend
//!   (`forwardOriginalToken` defaults to false); an expired one is 401 "Jwt is expired";
//! - every 401 is counted in the waypoint's `istio_requests_total` with `response_flags="UAEX"`.
//!
//! Beyond the task: `outputPayloadToHeader` puts the validated payload (base64url) on the
//! request the backend receives.
//!
//! Then the task's authorization steps, with its "require-jwt" AuthorizationPolicy on the
//! waypoint: without a token 403, with the token 200; with the `request.auth.claims[groups]`
//! condition only the group token is 200.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use zmesh_tests::gamma::driver::RunningLab;

const LAB: &str = env!("CARGO_BIN_EXE_zmesh-lab");
const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
/// The fixture's waypoint Gateway.
const WAYPOINT: &str = "namespace";
/// The task's issuer (and subject).
const ISSUER: &str = "testing@secure.istio.io";
const UP_DEADLINE: Duration = Duration::from_secs(300);
/// A config change reaching the waypoint; the JWKS server starting.
const PUSH_DEADLINE: Duration = Duration::from_secs(90);

/// Polls `f` until it returns `Some`, failing with `what` after `PUSH_DEADLINE`.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PUSH_DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The test's issuer key: ES256 (RFC 7518 §3.4), its public half as a JWKS (RFC 7517).
struct Issuer {
    pkcs8: Vec<u8>,
    jwks: String,
}

impl Issuer {
    fn new() -> Issuer {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let p = pair.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "lab",
            "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65]),
        }]});
        Issuer {
            pkcs8: doc.as_ref().to_vec(),
            jwks: jwks.to_string(),
        }
    }

    /// A token with the task's claims, `exp` from now, and `extra` claims.
    fn token(&self, exp_from_now: i64, extra: Value) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut claims =
            json!({"iss": ISSUER, "sub": ISSUER, "iat": now, "exp": now + exp_from_now});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("lab".into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .unwrap()
    }
}

/// The task's RequestAuthentication, attached to the waypoint (ambient), with `extra` rule
/// fields.
fn request_authentication(jwks_uri: &str, extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: \
         jwt-example\n  namespace: {MESH}\nspec:\n  targetRefs:\n  - kind: Gateway\n    group: \
         gateway.networking.k8s.io\n    name: {WAYPOINT}\n  jwtRules:\n  - issuer: \"{ISSUER}\"\n    \
         jwksUri: \"{jwks_uri}\"\n{extra}"
    )
}

/// The sum of `istio_requests_total{reporter="waypoint"}` samples with every label of `want`.
fn counted(metrics: &str, want: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| l.contains("reporter=\"waypoint\""))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn authz_jwt_task_authentication_through_the_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    let lab = RunningLab::start(Path::new(LAB), dir.path(), UP_DEADLINE);
    let pods = lab_pods(&lab);
    let name_of = |pred: &dyn Fn(&Value) -> bool| -> String {
        let p = pods
            .iter()
            .find(|p| pred(p))
            .unwrap_or_else(|| panic!("pod missing: {pods:#?}"));
        format!(
            "{}/{}",
            p["namespace"].as_str().unwrap(),
            p["name"].as_str().unwrap()
        )
    };
    let from = name_of(&|p| p["namespace"] == CONSUMER);
    let waypoint =
        name_of(&|p| p["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller");
    let url = format!("http://echo.{MESH}:80/headers");
    // `curl` from the consumer pod: (status, headers + body).
    let curl = |headers: &[&str]| -> (u16, String) {
        let mut args = vec![
            "curl",
            "-sS",
            "-m",
            "60",
            "-D",
            "-",
            "-w",
            "\nStatus=%{http_code}",
        ];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let out = lab.exec(&from, &args);
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let code = text
            .lines()
            .find_map(|l| l.strip_prefix("Status=")?.parse().ok())
            .unwrap_or_else(|| panic!("no status in:\n{text}"));
        (code, text)
    };
    let metrics = || {
        let out = lab.exec(
            &waypoint,
            &["curl", "-sS", "-m", "10", "http://127.0.0.1:15020/metrics"],
        );
        String::from_utf8(out.stdout).unwrap()
    };
    poll("a first request through the waypoint", || {
        (curl(&[]).0 == 200 && counted(&metrics(), &[]) >= 1.0).then_some(())
    });

    // The JWKS server: a pod outside the mesh serving the test's JWKS over HTTP.
    let issuer = Issuer::new();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("jwks.json"), &issuer.jwks).unwrap();
    lab.ok(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: jwks\n  namespace: jwks-server\nspec:\n  \
             containers:\n  - name: jwks\n    image: python\n",
        ),
    );
    let jwks_ip = lab_pods(&lab)
        .into_iter()
        .find(|p| p["name"] == "jwks")
        .and_then(|p| p["ip"].as_str().map(str::to_owned))
        .expect("the jwks pod has an IP");
    let serve = format!(
        "setsid python3 -m http.server 8000 --bind 0.0.0.0 --directory {} </dev/null \
         >{}/http.log 2>&1 &",
        www.display(),
        dir.path().display()
    );
    let out = lab.exec("jwks-server/jwks", &["sh", "-c", &serve]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks_uri = format!("http://{jwks_ip}:8000/jwks.json");
    poll("the JWKS server", || {
        let out = lab.exec("jwks-server/jwks", &["curl", "-sf", "-m", "5", &jwks_uri]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout) == issuer.jwks).then_some(())
    });

    // The task: "a request with an invalid JWT is denied" once the policy is applied.
    lab.ok(
        &["apply", "-f", "-"],
        Some(&request_authentication(&jwks_uri, "")),
    );
    let (_, denied) = poll("the RequestAuthentication at the waypoint", || {
        let r = curl(&["Authorization: Bearer invalidToken"]);
        (r.0 == 401).then_some(r)
    });
    assert!(
        denied.contains(
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
        ),
        "{denied}"
    );
    // The realm is the request's URL (curl may leave the default port out of Host).
    let challenge = denied
        .lines()
        .find_map(|l| l.strip_prefix("www-authenticate: "))
        .unwrap_or_else(|| panic!("no www-authenticate:\n{denied}"))
        .trim();
    assert!(
        [":80", ""].iter().any(|port| challenge
            == format!(
                "Bearer realm=\"http://echo.{MESH}{port}/headers\", error=\"invalid_token\""
            )),
        "{challenge}"
    );
    // "a request without a JWT is allowed because there is no authorization policy".
    assert_eq!(curl(&[]).0, 200);

    // A valid token (the task's `TOKEN`, fetched here from our JWKS over jwksUri): 200, and
    // the backend never sees it (forwardOriginalToken defaults to false).
    let token = issuer.token(3600, json!({}));
    let (code, body) = curl(&[&format!("Authorization: Bearer {token}")]);
    assert_eq!(code, 200, "{body}");
    assert!(
        !body
            .to_ascii_lowercase()
            .contains("requestheader=authorization:"),
        "the token reached the backend:\n{body}"
    );
    // The task's group token is valid too.
    let group = issuer.token(3600, json!({"groups": ["group1", "group2"]}));
    assert_eq!(curl(&[&format!("Authorization: Bearer {group}")]).0, 200);
    // Expired: 401 with Envoy's reason.
    let expired = issuer.token(-3600, json!({}));
    let (code, body) = curl(&[&format!("Authorization: Bearer {expired}")]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Jwt is expired"), "{body}");
    // Both 401s counted by the waypoint, with the authentication flag.
    let m = metrics();
    assert_eq!(
        counted(&m, &[("response_code", "401"), ("response_flags", "UAEX")]),
        2.0,
        "{m}"
    );

    // Beyond the task: outputPayloadToHeader. The backend sees the validated payload.
    lab.ok(
        &["apply", "-f", "-"],
        Some(&request_authentication(
            &jwks_uri,
            "    outputPayloadToHeader: x-jwt-payload\n",
        )),
    );
    let body = poll("outputPayloadToHeader at the waypoint", || {
        let (code, body) = curl(&[&format!("Authorization: Bearer {group}")]);
        (code == 200 && body.contains("RequestHeader=X-Jwt-Payload:")).then_some(body)
    });
    let payload = body
        .lines()
        .find_map(|l| l.strip_prefix("RequestHeader=X-Jwt-Payload:"))
        .unwrap();
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim()).unwrap()).unwrap();
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["groups"], json!(["group1", "group2"]));

    // The task's "require-jwt" AuthorizationPolicy (on the waypoint): only the request
    // principal `testing@secure.istio.io/testing@secure.istio.io` is allowed.
    let require_jwt = |when: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: \
             require-jwt\n  namespace: {MESH}\nspec:\n  targetRefs:\n  - kind: Gateway\n    \
             group: gateway.networking.k8s.io\n    name: {WAYPOINT}\n  action: ALLOW\n  rules:\n  \
             - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/{ISSUER}\"]\n{when}"
        )
    };
    lab.ok(&["apply", "-f", "-"], Some(&require_jwt("")));
    poll("require-jwt at the waypoint", || {
        (curl(&[]).0 == 403).then_some(())
    });
    assert_eq!(curl(&[&format!("Authorization: Bearer {token}")]).0, 200);
    // "request.auth.claims[groups]" must contain group1: the group token only.
    lab.ok(
        &["apply", "-f", "-"],
        Some(&require_jwt(
            "    when:\n    - key: request.auth.claims[groups]\n      values: [\"group1\"]\n",
        )),
    );
    poll("the groups condition at the waypoint", || {
        (curl(&[&format!("Authorization: Bearer {token}")]).0 == 403).then_some(())
    });
    assert_eq!(curl(&[&format!("Authorization: Bearer {group}")]).0, 200);
    assert_eq!(curl(&[]).0, 403);
}

fn lab_pods(lab: &RunningLab) -> Vec<Value> {
    let v: Value = serde_json::from_str(&lab.ok(&["get", "pods", "-o", "json"], None)).unwrap();
    v["items"].as_array().unwrap().clone()
}
