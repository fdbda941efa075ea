//! The Gateway API mesh (GAMMA) conformance suite as data (`tests/conformance/`): one YAML file
//! per upstream test of kubernetes-sigs/gateway-api `conformance/tests/mesh/` at the pinned
//! commit ([`PIN`]), holding the manifests it applies and its table of request -> expectation,
//! plus the Gateway HTTPRoute tests the mesh suite lacks (method matching, timeouts, retries)
//! re-attached to a Service (`tests/conformance/service/`).
//!
//! This module is the data and its judgement, without the lab: [`load`] reads and checks the
//! files, [`script`] turns a round of requests into one shell script run in a client pod
//! (curl for HTTP, `zmesh-echo-client` for gRPC), [`check`] reads the answers (the echo app's
//! `Key=Value` lines, curl's status line and headers) and says why a case fails. The lab test
//! `tests/tests/gamma_conformance.rs` drives them through the real waypoint.
//!
//! What a case asserts follows the upstream assertion model (`conformance/utils/http`
//! `ExpectedResponse`): status, backend (pod name prefix) and namespace, request headers seen
//! by the backend (present with a value, or absent), response headers, the redirect target;
//! and beyond it, what the upstream mesh harness does not check: the path the backend received
//! after a rewrite, and every part of the redirect `Location` (scheme, host, port, path) with
//! the defaults the Gateway API spec gives them.

pub mod check;
pub mod script;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// The kubernetes-sigs/gateway-api commit the transcription is pinned to.
pub const PIN: &str = "6099e466b2adf8f5bfc0324bcd8532d1ab76c3a7";

/// The mesh namespace of the fixture.
pub const MESH_NS: &str = crate::gamma::fixture::MESH_NS;

/// The consumer namespace of the fixture.
pub const CONSUMER_NS: &str = crate::gamma::fixture::CONSUMER_NS;

/// One transcribed test.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Test {
    /// The upstream `ShortName` (ours for the Service-attached extras: `Service` + upstream's).
    pub short_name: String,
    /// The upstream Go file the table comes from.
    pub source: String,
    /// The upstream commit of `source`.
    pub commit: String,
    /// The upstream feature names the test needs.
    pub features: Vec<String>,
    /// Where `manifests` comes from: the upstream YAML path, or `reconstructed: <why>`.
    pub manifest_source: String,
    /// Kubernetes YAML applied before the requests and deleted after (empty: none).
    #[serde(default)]
    pub manifests: String,
    /// Expected to pass with the waypoint unbound too, and why (pure reachability).
    #[serde(default)]
    pub passes_without_waypoint: Option<String>,
    /// What differs from upstream, if anything.
    #[serde(default)]
    pub note: Option<String>,
    /// The request -> expectation table.
    #[serde(default)]
    pub cases: Vec<Case>,
    /// A weighted distribution to observe.
    #[serde(default)]
    pub weights: Option<Weights>,
}

/// Which pod sends: `echo-v1`'s pod in the mesh or the consumer namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Client {
    /// `gateway-conformance-mesh/echo-v1-*`, the suite's default client.
    #[default]
    Mesh,
    /// `gateway-conformance-mesh-consumer/echo-v1-*`.
    Consumer,
}

impl Client {
    /// The client pod's namespace.
    pub fn namespace(self) -> &'static str {
        match self {
            Client::Mesh => MESH_NS,
            Client::Consumer => CONSUMER_NS,
        }
    }
}

/// HTTP (curl) or gRPC (`zmesh-echo-client`, `proto.EchoTestService/Echo`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// gRPC over h2c.
    Grpc,
}

/// One request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// `name[.namespace][:port]` of a Service (the client's namespace by default), or
    /// `{pod:<deployment>}[:port]` for the first pod of a mesh Deployment.
    #[serde(default = "default_host")]
    pub host: String,
    /// Path and query; `{uuid}` becomes a fresh id per request.
    #[serde(default = "default_path")]
    pub path: String,
    /// The method (GET by default).
    #[serde(default)]
    pub method: Option<String>,
    /// Request headers (`Host` overrides the Host header).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// HTTP or gRPC.
    #[serde(default)]
    pub protocol: Protocol,
}

fn default_host() -> String {
    "echo".into()
}

fn default_path() -> String {
    "/".into()
}

/// The redirect an answer must carry; unset parts default as the Gateway API spec says (the
/// request's scheme, host, port and path; the scheme's well-known port when only the scheme
/// changes).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// The host.
    #[serde(default)]
    pub host: Option<String>,
    /// The port.
    #[serde(default)]
    pub port: Option<u16>,
    /// The path.
    #[serde(default)]
    pub path: Option<String>,
}

/// What the answer to one request must be.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expect {
    /// The status (gRPC: 200 for `grpc-status: 0`).
    #[serde(default = "default_status")]
    pub status: u16,
    /// The backend: its pods' name prefix (`echo-v1` matches `echo-v1-xxxxx`).
    #[serde(default)]
    pub backend: Option<String>,
    /// The backend pod's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The path (without query) the backend received (ours: upstream does not check it).
    #[serde(default)]
    pub backend_path: Option<String>,
    /// Request headers the backend saw, values joined with `,`.
    #[serde(default)]
    pub request_headers: BTreeMap<String, String>,
    /// Request headers the backend must not have seen.
    #[serde(default)]
    pub absent_request_headers: Vec<String>,
    /// Response headers.
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    /// Response headers that must be absent.
    #[serde(default)]
    pub absent_response_headers: Vec<String>,
    /// The redirect (`Location`).
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// A mesh Deployment whose pod must also receive the request (a mirror).
    #[serde(default)]
    pub mirrored_to: Option<String>,
}

fn default_status() -> u16 {
    200
}

/// One row of a test's table.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Case {
    /// A name for the table (else its index).
    #[serde(default)]
    pub name: Option<String>,
    /// The client pod.
    #[serde(default)]
    pub from: Client,
    /// The request.
    pub request: Request,
    /// The expectation.
    pub expect: Expect,
}

/// A weighted split to observe: `requests` answers, each backend's share within `tolerance`
/// of its expected fraction (the suite's `conformance/utils/weight`: 500 requests, 0.05).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Weights {
    /// The request.
    pub request: Request,
    /// Backend (pod name prefix) -> expected fraction.
    pub expect: BTreeMap<String, f64>,
    /// How many requests.
    #[serde(default = "default_requests")]
    pub requests: u32,
    /// The allowed absolute deviation of each share.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_requests() -> u32 {
    500
}

fn default_tolerance() -> f64 {
    0.05
}

/// The directory of the transcribed suite.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// The upstream list at the pin: the `SUITE` file's ShortNames (one per line, `#` comments).
pub fn suite_list(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("SUITE");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Reads every `*.yaml` of `dir` (sorted by file name) and checks each test is well formed:
/// it asserts something, a weight split sums to 1, the manifests parse, the commit is a full
/// hash.
pub fn load(dir: &Path) -> Result<Vec<Test>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut tests = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p)?;
        let t: Test = serde_yaml::from_str(&text)
            .with_context(|| format!("{}: not a conformance test file", p.display()))?;
        validate(&t).with_context(|| format!("{}", p.display()))?;
        tests.push(t);
    }
    Ok(tests)
}

fn validate(t: &Test) -> Result<()> {
    ensure!(
        t.commit.len() == 40 && t.commit.chars().all(|c| c.is_ascii_hexdigit()),
        "commit {:?} is not a full 40-hex commit",
        t.commit
    );
    ensure!(
        !t.cases.is_empty() || t.weights.is_some(),
        "{}: no cases and no weights: the test would assert nothing",
        t.short_name
    );
    for doc in serde_yaml::Deserializer::from_str(&t.manifests) {
        let v = serde_yaml::Value::deserialize(doc)
            .with_context(|| format!("{}: manifests are not YAML", t.short_name))?;
        if !v.is_null() {
            ensure!(
                v.get("kind").is_some(),
                "{}: a manifest has no kind",
                t.short_name
            );
        }
    }
    if let Some(w) = &t.weights {
        let sum: f64 = w.expect.values().sum();
        ensure!(
            (sum - 1.0).abs() < 1e-9,
            "{}: weights sum to {sum}, not 1",
            t.short_name
        );
        ensure!(w.requests > 0, "{}: weights with 0 requests", t.short_name);
    }
    Ok(())
}

/// Checks the transcribed set equals the upstream list: every listed test has exactly one
/// file, and no file is outside the list.
pub fn same_set(listed: &[String], tests: &[Test]) -> Result<()> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tests {
        *seen.entry(t.short_name.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = listed
        .iter()
        .filter(|n| !seen.contains_key(n.as_str()))
        .collect();
    let extra: Vec<&&str> = seen
        .keys()
        .filter(|n| !listed.iter().any(|l| l == *n))
        .collect();
    let twice: Vec<&&str> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    if !missing.is_empty() || !extra.is_empty() || !twice.is_empty() {
        bail!(
            "the transcribed tests differ from the list: missing {missing:?}, not listed \
             {extra:?}, transcribed twice {twice:?}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transcribed_mesh_suite_is_the_upstream_list_at_the_pin() {
        let dir = data_dir().join("mesh");
        let listed = suite_list(&dir).unwrap();
        let tests = load(&dir).unwrap();
        same_set(&listed, &tests).unwrap();
        for t in &tests {
            assert_eq!(
                t.commit, PIN,
                "{}: transcribed from another commit",
                t.short_name
            );
            assert!(
                t.source.starts_with("conformance/tests/mesh/"),
                "{}: {}",
                t.short_name,
                t.source
            );
        }
    }

    #[test]
    fn the_service_attached_extras_load_and_attach_to_a_service() {
        let dir = data_dir().join("service");
        let tests = load(&dir).unwrap();
        same_set(&suite_list(&dir).unwrap(), &tests).unwrap();
        for t in &tests {
            assert!(
                t.manifests.contains("kind: Service\n") && t.manifests.contains("group: \"\""),
                "{}: the route must have a Service parentRef",
                t.short_name
            );
        }
    }

    #[test]
    fn the_set_check_names_what_differs() {
        let t = |n: &str| Test {
            short_name: n.into(),
            source: String::new(),
            commit: PIN.into(),
            features: vec![],
            manifest_source: String::new(),
            manifests: String::new(),
            passes_without_waypoint: None,
            note: None,
            cases: vec![],
            weights: None,
        };
        let listed = vec!["A".to_owned(), "B".to_owned()];
        assert!(same_set(&listed, &[t("A"), t("B")]).is_ok());
        let e = same_set(&listed, &[t("A"), t("C"), t("C")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing [\"B\"]") && e.contains("not listed [\"C\"]"),
            "{e}"
        );
        assert!(e.contains("twice [\"C\"]"), "{e}");
    }
}
