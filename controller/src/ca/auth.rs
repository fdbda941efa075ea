//! Who is calling the CA, and may they have the identity they ask for.
//!
//! Authentication is pluggable ([`Authenticator`]): Kubernetes TokenReview
//! ([`super::TokenReviewAuthenticator`]), and for the lab [`NodeTokenAuthenticator`], a
//! per-node secret bearer token. Authorization of
//! impersonation asks a [`PodLocator`] whether a pod with the requested identity runs on the
//! caller's node.

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use tonic::Status;
use tonic::metadata::MetadataMap;
use zmesh_core::identity::SpiffeId;

/// An authenticated caller of the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own identity (for a node's ztunnel, ztunnel's service account).
    pub identity: SpiffeId,
    /// Set when the caller is a node's ztunnel: the node it runs on, as established by the
    /// credential, never by what the caller asserts.
    pub node: Option<String>,
}

/// Establishes who is calling from the request's metadata (headers). Asynchronous: an
/// implementation may ask another service (Kubernetes TokenReview).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Returns the caller, or `Unauthenticated` when the credential is missing or invalid
    /// (`Unavailable` when whoever checks credentials cannot be reached).
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status>;
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization header (Bearer token)"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization header is not 'Bearer <token>'"))
}

/// Knows where pods run.
pub trait PodLocator: Send + Sync + 'static {
    /// Does a pod with this identity (namespace and service account) run on `node`?
    fn pods_on_node(&self, node: &str, identity: &SpiffeId) -> bool;
}

/// The lab's per-node credential: each node's ztunnel holds a random secret token (32 bytes,
/// hex) and presents it as `authorization: Bearer <token>`. Every node authenticates as the
/// same ztunnel identity; the token alone says which node is calling.
#[derive(Debug)]
pub struct NodeTokenAuthenticator {
    ztunnel_identity: SpiffeId,
    /// (token, node, identity when not ztunnel's).
    tokens: Vec<(Vec<u8>, String, Option<SpiffeId>)>,
}

impl NodeTokenAuthenticator {
    /// An authenticator with no nodes; callers authenticate as `ztunnel_identity`.
    pub fn new(ztunnel_identity: SpiffeId) -> Self {
        NodeTokenAuthenticator {
            ztunnel_identity,
            tokens: Vec::new(),
        }
    }

    /// Registers a node with a fresh random token and returns the token (hex).
    pub fn add_node(&mut self, node: &str) -> String {
        let bytes: [u8; 32] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.add_token(&token, node);
        token
    }

    /// Registers a node with a token made elsewhere (e.g. read from the lab's files).
    pub fn add_token(&mut self, token: &str, node: &str) {
        self.tokens.retain(|(_, n, id)| n != node || id.is_some());
        self.tokens
            .push((token.as_bytes().to_vec(), node.to_owned(), None));
    }

    /// Registers another proxy on `node` (a waypoint) that authenticates as `identity` with
    /// `token`. It is not the node's ztunnel: the CA lets it have only its own identity.
    pub fn add_proxy_token(&mut self, token: &str, node: &str, identity: SpiffeId) {
        self.tokens
            .retain(|(_, n, id)| n != node || id.as_ref() != Some(&identity));
        self.tokens
            .push((token.as_bytes().to_vec(), node.to_owned(), Some(identity)));
    }
}

#[tonic::async_trait]
impl Authenticator for NodeTokenAuthenticator {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        // Compare against every token, in constant time per token, so that timing tells
        // nothing about which (or how much of a) token matched.
        let mut found = None;
        for (known, node, identity) in &self.tokens {
            if constant_time_eq(known, token.as_bytes()) {
                found = Some((node, identity));
            }
        }
        let (node, identity) =
            found.ok_or_else(|| Status::unauthenticated("unknown node token"))?;
        Ok(match identity {
            None => Caller {
                identity: self.ztunnel_identity.clone(),
                node: Some(node.clone()),
            },
            Some(identity) => Caller {
                identity: identity.clone(),
                node: None,
            },
        })
    }
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A [`PodLocator`] fed from a list of (node, identity) placements; for the lab and tests, and
/// as the store the Kubernetes watcher can update.
#[derive(Debug, Default)]
pub struct StaticPodLocator {
    placements: RwLock<HashMap<String, BTreeSet<SpiffeId>>>,
}

impl StaticPodLocator {
    /// An empty locator: no pod runs anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a pod with `identity` runs on `node`.
    pub fn add(&self, node: &str, identity: SpiffeId) {
        self.placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(node.to_owned())
            .or_default()
            .insert(identity);
    }

    /// Forgets that a pod with `identity` runs on `node`.
    pub fn remove(&self, node: &str, identity: &SpiffeId) {
        if let Some(ids) = self
            .placements
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(node)
        {
            ids.remove(identity);
        }
    }
}

impl PodLocator for StaticPodLocator {
    fn pods_on_node(&self, node: &str, identity: &SpiffeId) -> bool {
        self.placements
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|ids| ids.contains(identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zt() -> SpiffeId {
        "spiffe://td/ns/istio-system/sa/ztunnel".parse().unwrap()
    }

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[tokio::test]
    async fn tokens_name_their_node() {
        let mut a = NodeTokenAuthenticator::new(zt());
        let t1 = a.add_node("n1");
        let t2 = a.add_node("n2");
        assert_eq!(t1.len(), 64);
        assert_ne!(t1, t2);
        let c = a.authenticate(&md(&format!("Bearer {t2}"))).await.unwrap();
        assert_eq!(c.node.as_deref(), Some("n2"));
        assert_eq!(c.identity, zt());
        for bad in ["Bearer nope", &t1, "Basic abc"] {
            let e = a.authenticate(&md(bad)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
        let e = a.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn locator_tracks_placements() {
        let l = StaticPodLocator::new();
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        assert!(!l.pods_on_node("n1", &id));
        l.add("n1", id.clone());
        assert!(l.pods_on_node("n1", &id));
        assert!(!l.pods_on_node("n2", &id));
        l.remove("n1", &id);
        assert!(!l.pods_on_node("n1", &id));
    }
}
