//! JSON Web Key Sets (RFC 7517 §5): parsed into verification keys, inline or fetched from a
//! `jwksUri` over HTTP or HTTPS (the system's roots) by the waypoint itself.
//!
//! A fetched set is fetched on first use (a request waits for it, up to the rule's timeout),
//! then refreshed every [`JwksCache::refresh`] (20 minutes by default, Istio's
//! `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`); a failed refresh keeps the last good set. Until a
//! first fetch succeeds, a token that needs the set is refused (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use zmesh_core::peer_text::{PEER_ERROR_MAX, PeerText};

/// Istio's default JWKS refresh interval.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Why a JWKS could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS (RFC 7517 §5: a JSON object with a `keys` array): {0}")]
    NotJwks(String),
    #[error("no usable key (RSA, EC, OKP or oct with their parameters): {0}")]
    NoUsableKey(String),
    #[error("fetching {uri}: {why} (is the JWKS server up and reachable from the waypoint?)")]
    Fetch { uri: String, why: String },
}

/// One verification key.
struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// A parsed JWKS.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    /// Parses a JWKS document. Keys of types that cannot verify a JWS (or malformed ones)
    /// are skipped; a set with no usable key at all is an error.
    pub fn parse(json: &str) -> Result<KeySet, JwksError> {
        let v: Value = serde_json::from_str(json).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let Some(list) = v.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NotJwks("no `keys` array".into()));
        };
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, k) in list.iter().enumerate() {
            let parsed = serde_json::from_value::<Jwk>(k.clone())
                .map_err(|e| e.to_string())
                .and_then(|jwk| {
                    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                    let alg = jwk
                        .common
                        .key_algorithm
                        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                    Ok(Key {
                        kid: jwk.common.key_id,
                        alg,
                        key,
                    })
                });
            match parsed {
                Ok(k) => keys.push(k),
                Err(e) => skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey(if skipped.is_empty() {
                "the set is empty".into()
            } else {
                skipped.join("; ")
            }));
        }
        if !skipped.is_empty() {
            // The JWKS server's text (serde names an unknown value): escaped, bounded.
            tracing::debug!(
                skipped = %PeerText::display(&skipped.join("; "), PEER_ERROR_MAX),
                "JWKS: keys skipped"
            );
        }
        Ok(KeySet { keys })
    }

    /// The keys that may have signed a token with `kid` and `alg` (Envoy's choice: a key
    /// whose `kid` or `alg` is set and differs is skipped).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a DecodingKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| match (kid, k.kid.as_deref()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .filter(move |k| k.alg.is_none_or(|a| a == alg))
            .map(|k| &k.key)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One fetched URI.
#[derive(Default)]
struct Remote {
    keys: ArcSwapOption<KeySet>,
    /// Serializes first fetches; the bool: the refresher runs.
    first: tokio::sync::Mutex<bool>,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The waypoint's fetched JWKS, by URI, shared by every config (a new config keeps the sets
/// already fetched).
pub struct JwksCache {
    client: Client<Https, Empty<Bytes>>,
    entries: Mutex<HashMap<String, Arc<Remote>>>,
    /// How often a fetched set is fetched again.
    pub refresh: Duration,
    drain: CancellationToken,
}

impl JwksCache {
    /// A cache refreshing every `refresh`, its refreshers stopped by `drain`.
    pub fn new(refresh: Duration, drain: CancellationToken) -> JwksCache {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::debug!("no system CA certificates: https jwksUri cannot be verified");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .expect("aws-lc-rs supports the default protocol versions");
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        JwksCache {
            client: Client::builder(TokioExecutor::new()).build(https),
            entries: Mutex::new(HashMap::new()),
            refresh,
            drain,
        }
    }

    /// The current set of `uri`, fetched now (within `timeout`) if there is none yet; the
    /// first success starts its refresher.
    pub async fn keys(
        self: &Arc<Self>,
        uri: &str,
        timeout: Duration,
    ) -> Result<Arc<KeySet>, JwksError> {
        let remote = {
            let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(uri.to_owned()).or_default().clone()
        };
        if let Some(k) = remote.keys.load_full() {
            return Ok(k);
        }
        let mut refreshing = remote.first.lock().await;
        if let Some(k) = remote.keys.load_full() {
            return Ok(k);
        }
        let keys = Arc::new(self.fetch(uri, timeout).await?);
        remote.keys.store(Some(keys.clone()));
        if !*refreshing {
            *refreshing = true;
            tokio::spawn(
                self.clone()
                    .refresher(uri.to_owned(), timeout, remote.clone()),
            );
        }
        Ok(keys)
    }

    /// Forgets every URI not in `in_use` (no rule of the current config names it): their
    /// refreshers stop.
    pub fn retain<'a>(&self, in_use: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = in_use.into_iter().collect();
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|uri, _| keep.contains(uri.as_str()));
    }

    /// How many URIs are known.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no URI is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn refresher(self: Arc<Self>, uri: String, timeout: Duration, remote: Arc<Remote>) {
        loop {
            tokio::select! {
                _ = self.drain.cancelled() => return,
                _ = tokio::time::sleep(self.refresh) => {}
            }
            let current = {
                let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                m.get(&uri).is_some_and(|r| Arc::ptr_eq(r, &remote))
            };
            if !current {
                tracing::debug!(%uri, "JWKS no longer used: refresh stopped");
                return;
            }
            match self.fetch(&uri, timeout).await {
                Ok(k) => {
                    tracing::debug!(%uri, keys = k.len(), "JWKS refreshed");
                    remote.keys.store(Some(Arc::new(k)));
                }
                Err(e) => {
                    tracing::warn!(
                        error = %PeerText::display(&e, PEER_ERROR_MAX),
                        "JWKS refresh failed; keeping the last good set"
                    )
                }
            }
        }
    }

    /// One GET of `uri`: a 200 with a JWKS, within `timeout`.
    pub async fn fetch(&self, uri: &str, timeout: Duration) -> Result<KeySet, JwksError> {
        let fail = |why: String| JwksError::Fetch {
            uri: uri.to_owned(),
            why,
        };
        let parsed = http::Uri::try_from(uri).map_err(|e| fail(e.to_string()))?;
        let get = async {
            let resp = self
                .client
                .get(parsed)
                .await
                .map_err(|e| fail(format!("{e:?}")))?;
            if resp.status() != http::StatusCode::OK {
                return Err(fail(format!("answered {}", resp.status())));
            }
            let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the body: {e}")))?
                .to_bytes();
            let text = std::str::from_utf8(&body).map_err(|e| fail(e.to_string()))?;
            KeySet::parse(text).map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(timeout, get)
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
    }
}
