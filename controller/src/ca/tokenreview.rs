//! Kubernetes authentication of CA callers: the bearer token (a projected service-account
//! token for audience `istio-ca`, as ztunnel sends it) is checked with a `TokenReview`.
//!
//! - The caller's identity is its service account: `system:serviceaccount:<ns>:<sa>` becomes
//!   `spiffe://<trust domain>/ns/<ns>/sa/<sa>`. Any other user is refused.
//! - The API server must confirm the audience we asked for (`status.audiences`); an
//!   authenticator that does not is refused, since it would accept tokens minted for others.
//! - A trusted node account (by default `istio-system/ztunnel`) acts for its node. The node
//!   comes from the token itself, never from the caller: the API server's bound
//!   `authentication.kubernetes.io/node-name` extra, or else the pod the token is bound to
//!   (`.../pod-name`, checked against `.../pod-uid`) looked up through the API. A node
//!   account's token bound to neither is refused.
//! - Accepted tokens are cached for [`TokenReviewConfig::cache_ttl`] (60 s), keyed by the
//!   token's SHA-256 (the tokens themselves are not kept). Refusals are not cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tonic::Status;
use tonic::metadata::MetadataMap;
use zmesh_core::identity::SpiffeId;

use super::auth::{Authenticator, Caller, bearer_token};

/// The audience ztunnel's CA token is minted for.
pub const CA_AUDIENCE: &str = "istio-ca";
/// The service account trusted to act for its node unless configured otherwise.
pub const DEFAULT_NODE_ACCOUNT: &str = "istio-system/ztunnel";
/// The `user.extra` key naming the node of the pod a token is bound to.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The `user.extra` key naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The `user.extra` key with the uid of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Settings of the [`TokenReviewAuthenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewConfig {
    /// Trust domain of the identities (`cluster.local`).
    pub trust_domain: String,
    /// The audience tokens must be minted for.
    pub audience: String,
    /// Service accounts (`namespace/name`) that act for their node.
    pub trusted_node_accounts: Vec<String>,
    /// How long an accepted token is remembered.
    pub cache_ttl: Duration,
    /// How long one authentication may wait for the API server (the TokenReview and the pod
    /// lookup together). kube's client retries `429`/`503`/`504` for minutes on its own; a
    /// caller of the CA gets `Unavailable` after this instead.
    pub review_timeout: Duration,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        TokenReviewConfig {
            trust_domain: "cluster.local".to_owned(),
            audience: CA_AUDIENCE.to_owned(),
            trusted_node_accounts: vec![DEFAULT_NODE_ACCOUNT.to_owned()],
            cache_ttl: Duration::from_secs(60),
            review_timeout: Duration::from_secs(10),
        }
    }
}

/// A configuration the authenticator cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum TokenReviewConfigError {
    /// A trusted node account is not `namespace/name`.
    #[error(
        "trusted node account {0:?} must be written namespace/name (e.g. istio-system/ztunnel)"
    )]
    BadAccount(String),
}

/// Authenticates CA callers with Kubernetes `TokenReview` (see the module docs).
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    config: TokenReviewConfig,
    node_accounts: Vec<(String, String)>,
    /// SHA-256 of the token -> (expiry, caller).
    cache: Mutex<HashMap<Vec<u8>, (Instant, Caller)>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Above this many cached tokens, expired entries are swept on insert.
const CACHE_SWEEP_AT: usize = 1024;

impl TokenReviewAuthenticator {
    /// An authenticator asking the API server behind `client`.
    pub fn new(
        client: kube::Client,
        config: TokenReviewConfig,
    ) -> Result<Self, TokenReviewConfigError> {
        let node_accounts = config
            .trusted_node_accounts
            .iter()
            .map(|a| match a.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_owned(), sa.to_owned()))
                }
                _ => Err(TokenReviewConfigError::BadAccount(a.clone())),
            })
            .collect::<Result<_, _>>()?;
        Ok(TokenReviewAuthenticator {
            client,
            config,
            node_accounts,
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                Status::unavailable(format!(
                    "cannot review the token with the Kubernetes API: {e} (check that the API \
                     server is reachable and the controller may create tokenreviews)"
                ))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".to_owned());
            return Err(Status::unauthenticated(format!(
                "the Kubernetes API rejected the token: {why}"
            )));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.config.audience) {
            return Err(Status::unauthenticated(format!(
                "the token review did not confirm audience {:?} (got {audiences:?}); the \
                 token must be a projected service account token for that audience",
                self.config.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (ns, sa) = service_account(&username).ok_or_else(|| {
            Status::unauthenticated(format!(
                "{username:?} is not a service account (system:serviceaccount:<ns>:<name>)"
            ))
        })?;
        let identity = SpiffeId::new(&self.config.trust_domain, ns, sa)
            .map_err(|e| Status::unauthenticated(format!("service account {ns}/{sa}: {e}")))?;
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| -> Option<&str> {
            match extra.get(key).map(Vec::as_slice) {
                Some([one]) if !one.is_empty() => Some(one.as_str()),
                _ => None,
            }
        };
        let trusted = self.node_accounts.iter().any(|(n, s)| n == ns && s == sa);
        let node = if !trusted {
            None
        } else if let Some(node) = single(EXTRA_NODE_NAME) {
            Some(node.to_owned())
        } else if let Some(pod) = single(EXTRA_POD_NAME) {
            Some(self.node_of_pod(ns, sa, pod, single(EXTRA_POD_UID)).await?)
        } else {
            return Err(Status::unauthenticated(format!(
                "the token of node account {ns}/{sa} is bound to no pod, so its node is \
                 unknown; use a projected service account token (audience {:?})",
                self.config.audience
            )));
        };
        Ok(Caller { identity, node })
    }

    /// The node the pod `ns/name` (bound to the token) runs on, after checking it is the pod
    /// the token was issued for and runs as the token's service account.
    async fn node_of_pod(
        &self,
        ns: &str,
        sa: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<String, Status> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot look up pod {ns}/{name} (the token's pod) in the Kubernetes API: {e}"
                ))
            })?
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "the token is bound to pod {ns}/{name}, which does not exist"
                ))
            })?;
        if let Some(uid) = uid
            && pod.metadata.uid.as_deref() != Some(uid)
        {
            return Err(Status::unauthenticated(format!(
                "the token is bound to pod {ns}/{name} uid {uid}, but that pod is now another \
                 one (uid {:?})",
                pod.metadata.uid
            )));
        }
        let spec = pod.spec.unwrap_or_default();
        let pod_sa = spec.service_account_name.as_deref().unwrap_or("default");
        if pod_sa != sa {
            return Err(Status::unauthenticated(format!(
                "pod {ns}/{name} runs as service account {pod_sa}, not {sa}"
            )));
        }
        match spec.node_name {
            Some(node) if !node.is_empty() => Ok(node),
            _ => Err(Status::unauthenticated(format!(
                "pod {ns}/{name} (the token's pod) is not scheduled to a node"
            ))),
        }
    }

    fn cached(&self, key: &[u8]) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(expiry, _)| Instant::now() < *expiry)
            .map(|(_, caller)| caller.clone())
    }

    fn remember(&self, key: Vec<u8>, caller: &Caller) {
        if self.config.cache_ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SWEEP_AT {
            cache.retain(|_, (expiry, _)| now < *expiry);
        }
        cache.insert(key, (now + self.config.cache_ttl, caller.clone()));
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        let key = sha256(token.as_bytes());
        if let Some(caller) = self.cached(&key) {
            return Ok(caller);
        }
        let timeout = self.config.review_timeout;
        let caller = tokio::time::timeout(timeout, self.review(token))
            .await
            .map_err(|_| {
                tracing::warn!(?timeout, "TokenReview timed out");
                Status::unavailable(format!(
                    "cannot review the token: the Kubernetes API did not answer within \
                     {timeout:?}"
                ))
            })??;
        tracing::debug!(identity = %caller.identity, node = ?caller.node, "token reviewed");
        self.remember(key, &caller);
        Ok(caller)
    }
}

/// `(namespace, name)` of `system:serviceaccount:<namespace>:<name>`.
fn service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then_some((ns, sa))
}

/// SHA-256 through the TLS stack's own provider (aws-lc-rs), so no other hash crate is needed.
fn sha256(data: &[u8]) -> Vec<u8> {
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider
        .hash(data)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            service_account("system:serviceaccount:istio-system:ztunnel"),
            Some(("istio-system", "ztunnel"))
        );
        for bad in [
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
            "system:serviceaccount:ns:",
            "system:serviceaccount:ns:sa:x",
            "admin",
            "system:node:n1",
        ] {
            assert_eq!(service_account(bad), None, "{bad}");
        }
    }

    #[test]
    fn sha256_is_sha256() {
        let hex: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
