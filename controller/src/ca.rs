//! The workload CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! A request goes through four steps, each failing with its own gRPC status:
//! 1. authenticate the caller ([`Authenticator`]; `Unauthenticated`), and check the `clusterid`
//!    header against ours (`PermissionDenied`);
//! 2. validate the CSR ([`csr::validate_csr`]; `InvalidArgument`): signature, key type, SANs;
//! 3. decide the identity (`PermissionDenied`): a node's ztunnel may impersonate identity X
//!    (metadata `ImpersonatedIdentity`, as upstream ztunnel sends it in shared mode) only if a
//!    pod with X runs on its node ([`PodLocator`]); a node's ztunnel without impersonation
//!    (dedicated mode) may have the CSR's identity X under the same condition; otherwise the
//!    caller gets its own identity;
//! 4. sign a leaf for that identity over the CSR's key with the [`LocalCa`], for the requested
//!    validity clamped to `[1 min, max]`, and answer `[leaf, intermediates..., root]` in PEM.

mod auth;
pub mod csr;
mod tokenreview;

use std::sync::Arc;
use std::time::Duration;
use zmesh_core::peer_text::{PEER_TEXT_MAX, PeerText};

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use xds_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use xds_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::{LocalCa, TlsError};

pub use auth::{
    Authenticator, Caller, NodeTokenAuthenticator, PodLocator, StaticPodLocator, bearer_token,
    constant_time_eq,
};
pub use csr::{CsrError, ValidCsr, validate_csr};
pub use tokenreview::{
    CA_AUDIENCE, DEFAULT_NODE_ACCOUNT, TokenReviewAuthenticator, TokenReviewConfig,
    TokenReviewConfigError,
};

/// The metadata key (in the request's `metadata` Struct) naming the identity a node's ztunnel
/// asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The request metadata with which a node's ztunnel asks for a certificate of `identity` (a
/// `spiffe://` id), as upstream ztunnel sends it.
pub fn impersonation(identity: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
            },
        )]
        .into(),
    }
}
/// The shortest certificate lifetime we issue.
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// The default (and default maximum) certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Settings of the workload CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain this CA signs identities of (`cluster.local`).
    pub trust_domain: String,
    /// When set, requests carrying a different `clusterid` header are refused.
    pub cluster_id: Option<String>,
    /// Lifetime when the request asks for none (`validity_duration` 0); capped at `max_ttl`.
    pub default_ttl: Duration,
    /// The longest lifetime issued; longer requests are capped.
    pub max_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: "cluster.local".to_owned(),
            cluster_id: None,
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_TTL,
        }
    }
}

/// Why the CA refused a request. Each maps to one gRPC status (see [`CaError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("validity_duration is {0} s; it must be 0 (default) or positive")]
    NegativeTtl(i64),
    #[error("metadata {IMPERSONATED_IDENTITY} is not a string")]
    ImpersonationNotString,
    #[error("metadata {IMPERSONATED_IDENTITY} {:?} is not a workload SPIFFE id: {}", PeerText::new(.value), PeerText::new(.reason))]
    ImpersonationNotSpiffe { value: String, reason: String },
    #[error("impersonation asks for {} but this CA signs trust domain {trust_domain}", PeerText::display(.asked, PEER_TEXT_MAX))]
    ImpersonationWrongTrustDomain {
        asked: SpiffeId,
        trust_domain: String,
    },
    #[error("caller {caller} asked for {}, but only a node's ztunnel may impersonate", PeerText::display(.asked, PEER_TEXT_MAX))]
    NotANode { caller: String, asked: SpiffeId },
    #[error("node {node} asked for {}, but no pod with that identity runs on {node}", PeerText::display(.asked, PEER_TEXT_MAX))]
    NoPodOnNode { node: String, asked: SpiffeId },
    #[error("CSR asks for {} but the caller is only authorized for {authorized}", PeerText::new(.csr))]
    CsrIdentityMismatch { csr: String, authorized: SpiffeId },
    #[error("caller identity {0} is not of this CA's trust domain {1}")]
    CallerWrongTrustDomain(SpiffeId, String),
    #[error("request is for cluster {:?} but this controller serves cluster {ours:?}", PeerText::new(.asked))]
    WrongCluster { asked: String, ours: String },
    #[error("signing failed: {0}")]
    Sign(#[from] TlsError),
}

impl CaError {
    /// The gRPC status for this error, its message being the error's text.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            CaError::Csr(_)
            | CaError::NegativeTtl(_)
            | CaError::ImpersonationNotString
            | CaError::ImpersonationNotSpiffe { .. }
            | CaError::ImpersonationWrongTrustDomain { .. } => Status::invalid_argument(msg),
            CaError::NotANode { .. }
            | CaError::NoPodOnNode { .. }
            | CaError::CsrIdentityMismatch { .. }
            | CaError::CallerWrongTrustDomain(..)
            | CaError::WrongCluster { .. } => Status::permission_denied(msg),
            CaError::Sign(_) => Status::internal(msg),
        }
    }
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        e.status()
    }
}

/// The workload CA service: a signing CA, its chain, and the pluggable authentication and
/// pod placement.
pub struct WorkloadCa {
    ca: LocalCa,
    /// The CA's chain as separate PEM blocks: the signing certificate first, the root last.
    chain_pem: Vec<String>,
    config: CaConfig,
    authenticator: Arc<dyn Authenticator>,
    pods: Arc<dyn PodLocator>,
}

impl std::fmt::Debug for WorkloadCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCa")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl WorkloadCa {
    /// Builds the service. `ca` is a root or an intermediate whose PEM carries its chain up to
    /// the root.
    pub fn new(
        ca: LocalCa,
        config: CaConfig,
        authenticator: Arc<dyn Authenticator>,
        pods: Arc<dyn PodLocator>,
    ) -> Self {
        let chain_pem = pem_blocks(ca.cert_pem());
        WorkloadCa {
            ca,
            chain_pem,
            config,
            authenticator,
            pods,
        }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> IstioCertificateServiceServer<WorkloadCa> {
        IstioCertificateServiceServer::new(self)
    }

    /// Handles one request: authenticate, validate, authorize, sign.
    #[allow(clippy::result_large_err)] // tonic's Status is what the service returns anyway
    pub async fn handle(
        &self,
        metadata: &MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let caller = self
            .authenticator
            .authenticate(metadata)
            .await
            .inspect_err(|s| {
                tracing::debug!(error = ?PeerText::new(s.message()), "certificate request not authenticated");
            })?;
        self.check_cluster(metadata)?;
        self.sign_for(&caller, req).map_err(|e| {
            tracing::warn!(caller = %caller.identity, node = ?caller.node,
                error = ?PeerText::display(&e, zmesh_core::peer_text::PEER_ERROR_MAX),
                "certificate request refused");
            e.status()
        })
    }

    fn check_cluster(&self, metadata: &MetadataMap) -> Result<(), CaError> {
        let asked = metadata.get("clusterid").and_then(|v| v.to_str().ok());
        tracing::debug!(clusterid = ?asked.map(PeerText::new), "certificate request");
        check_cluster(self.config.cluster_id.as_deref(), metadata)
    }

    /// Validates and signs for an authenticated caller.
    pub fn sign_for(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, CaError> {
        let td = &self.config.trust_domain;
        let ttl = self.ttl(req.validity_duration)?;
        let csr = validate_csr(&req.csr, td)?;
        let mut asked = impersonated(req, td)?;
        // A dedicated-mode ztunnel (ours or upstream's) sends no impersonation: it asks for
        // its workload's identity in the CSR, with its node's credential. The same rule as
        // impersonation applies: only for a pod of that identity on the caller's node.
        if asked.is_none()
            && caller.node.is_some()
            && let Some(in_csr) = &csr.identity
            && *in_csr != caller.identity
        {
            asked = Some(in_csr.clone());
        }
        let identity = self.authorize(caller, asked)?;
        if let Some(asked) = csr.identity
            && asked != identity
        {
            return Err(CaError::CsrIdentityMismatch {
                csr: asked.to_string(),
                authorized: identity,
            });
        }
        let leaf = self.ca.sign(&identity, &csr.key, ttl)?;
        tracing::info!(%identity, node = ?caller.node, key = csr.key.description(),
            ttl_s = ttl.as_secs(), "issued workload certificate");
        let mut cert_chain = vec![der_to_pem("CERTIFICATE", leaf.as_ref())];
        cert_chain.extend(self.chain_pem.iter().cloned());
        Ok(IstioCertificateResponse {
            cert_chain,
            root_cert: None,
        })
    }

    /// The identity the caller may have a certificate for.
    fn authorize(
        &self,
        caller: &Caller,
        impersonated: Option<SpiffeId>,
    ) -> Result<SpiffeId, CaError> {
        let Some(asked) = impersonated else {
            if caller.identity.trust_domain() != self.config.trust_domain {
                return Err(CaError::CallerWrongTrustDomain(
                    caller.identity.clone(),
                    self.config.trust_domain.clone(),
                ));
            }
            return Ok(caller.identity.clone());
        };
        let Some(node) = &caller.node else {
            return Err(CaError::NotANode {
                caller: caller.identity.to_string(),
                asked,
            });
        };
        if !self.pods.pods_on_node(node, &asked) {
            return Err(CaError::NoPodOnNode {
                node: node.clone(),
                asked,
            });
        }
        Ok(asked)
    }

    /// The lifetime to issue for a requested `validity_duration` (seconds).
    pub fn ttl(&self, requested: i64) -> Result<Duration, CaError> {
        let max = self.config.max_ttl.max(MIN_TTL);
        let ttl = match requested {
            r if r < 0 => return Err(CaError::NegativeTtl(r)),
            0 => self.config.default_ttl,
            r => Duration::from_secs(r as u64),
        };
        Ok(ttl.clamp(MIN_TTL, max))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for WorkloadCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.handle(request.metadata(), request.get_ref())
            .await
            .map(Response::new)
    }
}

/// The `ImpersonatedIdentity` of the request's metadata, if any.
fn impersonated(
    req: &IstioCertificateRequest,
    trust_domain: &str,
) -> Result<Option<SpiffeId>, CaError> {
    use prost_types::value::Kind;
    let Some(value) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    let Some(Kind::StringValue(s)) = &value.kind else {
        return Err(CaError::ImpersonationNotString);
    };
    let id: SpiffeId = s
        .parse()
        .map_err(
            |e: zmesh_core::identity::IdentityError| CaError::ImpersonationNotSpiffe {
                value: s.clone(),
                reason: e.to_string(),
            },
        )?;
    if id.trust_domain() != trust_domain {
        return Err(CaError::ImpersonationWrongTrustDomain {
            asked: id,
            trust_domain: trust_domain.to_owned(),
        });
    }
    Ok(Some(id))
}

/// Refuses a call whose `clusterid` header names another cluster than `ours` (a call without
/// the header, or a controller without a cluster id, passes). ADS streams are checked the same.
pub(crate) fn check_cluster(ours: Option<&str>, metadata: &MetadataMap) -> Result<(), CaError> {
    let asked = metadata.get("clusterid").and_then(|v| v.to_str().ok());
    match (asked, ours) {
        (Some(asked), Some(ours)) if asked != ours => Err(CaError::WrongCluster {
            asked: asked.to_owned(),
            ours: ours.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The `CERTIFICATE` blocks of a PEM text, each as its own PEM string, in order.
fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else { break };
        let end = b + e + END.len();
        out.push(format!("{}\n", &rest[b..end]));
        rest = &rest[end..];
    }
    out
}

/// PEM-encodes DER bytes (base64, 64-character lines) under `-----BEGIN <label>-----`.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = der_to_pem("CERTIFICATE", &der);
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
                assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
            }
        }
        assert_eq!(
            der_to_pem("X", b"Man"),
            "-----BEGIN X-----\nTWFu\n-----END X-----\n"
        );
        assert_eq!(
            der_to_pem("X", b"Ma"),
            "-----BEGIN X-----\nTWE=\n-----END X-----\n"
        );
    }

    fn ca() -> WorkloadCa {
        let pods = StaticPodLocator::new();
        pods.add("n1", "spiffe://cluster.local/ns/a/sa/b".parse().unwrap());
        WorkloadCa::new(
            LocalCa::generate("root").unwrap(),
            CaConfig::default(),
            Arc::new(NodeTokenAuthenticator::new(
                "spiffe://cluster.local/ns/x/sa/y".parse().unwrap(),
            )),
            Arc::new(pods),
        )
    }

    fn req(impersonate: Option<&str>) -> IstioCertificateRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let metadata = impersonate.map(impersonation);
        IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata,
        }
    }

    #[test]
    fn only_node_callers_impersonate() {
        let ca = ca();
        let workload = Caller {
            identity: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
            node: None,
        };
        // A workload gets its own identity...
        ca.sign_for(&workload, &req(None)).unwrap();
        // ...but cannot ask for another, even one that runs on some node.
        let other = "spiffe://cluster.local/ns/a/sa/c";
        let err = ca.sign_for(&workload, &req(Some(other))).unwrap_err();
        assert!(matches!(err, CaError::NotANode { .. }), "{err}");
        assert_eq!(err.status().code(), tonic::Code::PermissionDenied);
        let node = Caller {
            identity: "spiffe://cluster.local/ns/x/sa/y".parse().unwrap(),
            node: Some("n1".to_owned()),
        };
        ca.sign_for(&node, &req(Some("spiffe://cluster.local/ns/a/sa/b")))
            .unwrap();
        for bad in ["spiffe://other/ns/a/sa/b", "not-an-id"] {
            let err = ca.sign_for(&node, &req(Some(bad))).unwrap_err();
            assert_eq!(err.status().code(), tonic::Code::InvalidArgument, "{err}");
        }
        let foreign = Caller {
            identity: "spiffe://other/ns/a/sa/b".parse().unwrap(),
            node: None,
        };
        let err = ca.sign_for(&foreign, &req(None)).unwrap_err();
        assert!(matches!(err, CaError::CallerWrongTrustDomain(..)), "{err}");
    }

    /// A refused request is logged with its reason: the caller's own text in it (an
    /// impersonated identity, a CSR's SAN, a cluster id) must not make a 20 KB log line.
    #[test]
    fn a_refusal_echoes_a_bounded_part_of_the_callers_text() {
        let ca = ca();
        let node = Caller {
            identity: "spiffe://cluster.local/ns/x/sa/y".parse().unwrap(),
            node: Some("n1".to_owned()),
        };
        let long = format!("not-an-id-{}", "x".repeat(20_000));
        let err = ca.sign_for(&node, &req(Some(&long))).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.len() < 1024 && shown.contains("truncated"),
            "the refusal carries {} bytes of the caller's text",
            shown.len()
        );
        let long_id = format!("spiffe://cluster.local/ns/{}/sa/b", "n".repeat(20_000));
        let err = ca.sign_for(&node, &req(Some(&long_id))).unwrap_err();
        assert!(
            err.to_string().len() < 1024,
            "{} bytes",
            err.to_string().len()
        );
    }

    fn req_for(san: &str) -> IstioCertificateRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        }
    }

    #[test]
    fn a_dedicated_ztunnel_gets_the_csr_identity_only_for_a_pod_on_its_node() {
        let ca = ca();
        // A dedicated-mode ztunnel sends no impersonation; its token names its node.
        let node = Caller {
            identity: "spiffe://cluster.local/ns/x/sa/y".parse().unwrap(),
            node: Some("n1".to_owned()),
        };
        ca.sign_for(&node, &req_for("spiffe://cluster.local/ns/a/sa/b"))
            .unwrap();
        // Not on its node: refused, and the reason names the node.
        let err = ca
            .sign_for(&node, &req_for("spiffe://cluster.local/ns/a/sa/c"))
            .unwrap_err();
        assert!(matches!(err, CaError::NoPodOnNode { .. }), "{err}");
        assert_eq!(err.status().code(), tonic::Code::PermissionDenied);
        // A pod of that identity elsewhere does not help.
        let n2 = Caller {
            node: Some("n2".to_owned()),
            ..node.clone()
        };
        let err = ca
            .sign_for(&n2, &req_for("spiffe://cluster.local/ns/a/sa/b"))
            .unwrap_err();
        assert!(matches!(err, CaError::NoPodOnNode { .. }), "{err}");
        // Its own identity it still gets.
        ca.sign_for(&node, &req_for("spiffe://cluster.local/ns/x/sa/y"))
            .unwrap();
        // A caller bound to no node gets only its own identity.
        let workload = Caller {
            identity: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
            node: None,
        };
        let err = ca
            .sign_for(&workload, &req_for("spiffe://cluster.local/ns/a/sa/c"))
            .unwrap_err();
        assert!(matches!(err, CaError::CsrIdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn ttl_is_clamped() {
        let ca = ca();
        assert_eq!(ca.ttl(0).unwrap(), DEFAULT_TTL);
        assert_eq!(ca.ttl(1).unwrap(), MIN_TTL);
        assert_eq!(ca.ttl(20).unwrap(), Duration::from_secs(20));
        assert_eq!(ca.ttl(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(ca.ttl(i64::MAX).unwrap(), DEFAULT_TTL);
        assert!(matches!(ca.ttl(-1), Err(CaError::NegativeTtl(-1))));
    }

    #[test]
    fn splits_chain_blocks() {
        let one = der_to_pem("CERTIFICATE", b"abc");
        let two = der_to_pem("CERTIFICATE", b"defg");
        let text = format!("# intermediate\n{one}junk\n{two}");
        assert_eq!(pem_blocks(&text), vec![one, two]);
    }
}
