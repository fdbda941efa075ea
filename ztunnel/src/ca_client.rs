//! ztunnel's client of the controller's CA (`istio.v1.auth.IstioCertificateService`).
//!
//! For each identity, [`RemoteCa`] generates a fresh ECDSA P-256 key and a CSR naming only the
//! identity's SPIFFE URI, asks the CA over the shared gRPC channel (bearer token and
//! `clusterid` headers; in shared mode the `ImpersonatedIdentity` metadata, as upstream
//! ztunnel sends it), and accepts the answer only if it checks out: every PEM parses, the leaf
//! certifies our key and names exactly the identity asked for, and it verifies up to a root
//! that the CA sent *and* that we trust for the CA connection (`CA_ROOT_CA`). Anything else
//! fails closed with a [`CertError::Ca`] that says what was wrong. Refreshing and keeping the
//! old certificate is [`zmesh_core::certs::CertStore`]'s job.

// Until app.rs wires the client in, only the tests use it.
#![cfg_attr(not(test), allow(dead_code))]

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_core::certs::{CertError, CertificateSource};
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::{TlsError, WorkloadCertificate, certs_from_pem, provider, uri_sans};

use crate::grpc::{AuthHeaders, GrpcError, Target};

/// How long one certificate request may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key naming the identity a node's ztunnel asks a certificate for.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How to reach and use the controller's CA.
#[derive(Debug, Clone)]
pub struct RemoteCaConfig {
    /// `CA_ADDRESS`, `CA_ROOT_CA`, `ALT_CA_HOSTNAME`. The roots in `root_ca` are also the
    /// roots an issued certificate must chain to.
    pub target: Target,
    /// The bearer token and cluster id sent on every request.
    pub auth: AuthHeaders,
    /// Shared mode: ask for the pods' identities with `ImpersonatedIdentity` metadata.
    /// Dedicated mode (false): the certificate is for our own token's identity.
    pub impersonate: bool,
    /// The certificate lifetime asked for (`SECRET_TTL`); the CA may clamp it.
    pub ttl: Duration,
    /// Our trust domain: identities of another one are not asked for.
    pub trust_domain: String,
}

/// The controller's CA as a [`CertificateSource`]. One lazily connected channel serves every
/// request.
#[derive(Debug)]
pub struct RemoteCa {
    client: IstioCertificateServiceClient<InterceptedService<Channel, AuthHeaders>>,
    address: String,
    address_var: &'static str,
    root_ca: PathBuf,
    root_var: &'static str,
    impersonate: bool,
    ttl: Duration,
    trust_domain: String,
    timeout: Duration,
}

/// Why one certificate request failed. The text becomes the reason of [`CertError::Ca`].
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{id} is not of our trust domain {trust_domain}; not asking the CA for it")]
    WrongTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("cannot generate the key or the CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("CreateCertificate at the CA {address} failed ({code:?}): {message}{hint}")]
    Refused {
        address: String,
        code: tonic::Code,
        message: String,
        hint: String,
    },
    #[error(
        "no answer from the CA at {address} within {timeout:?} (check {var} and that the \
         controller is running)"
    )]
    Timeout {
        address: String,
        var: &'static str,
        timeout: Duration,
    },
    #[error("the CA answered an empty certificate chain")]
    EmptyChain,
    #[error(
        "the CA answered a chain of {0} element(s); it must hold the leaf and then the root(s)"
    )]
    NoRoot(usize),
    #[error("cert_chain[{index}] from the CA is not PEM certificates: {source}")]
    Pem { index: usize, source: TlsError },
    #[error("the leaf from the CA is not valid X.509: {0}")]
    Leaf(String),
    #[error(
        "the leaf from the CA certifies a different public key than the one in our CSR; \
         refusing it"
    )]
    WrongKey,
    #[error("the leaf from the CA names {got:?} but we asked for {want}; refusing it")]
    WrongIdentity { got: Vec<String>, want: String },
    #[error("cannot read the trusted roots {path} ({var}): {source}")]
    Roots {
        path: PathBuf,
        var: &'static str,
        source: TlsError,
    },
    #[error(
        "none of the {sent} root(s) the CA sent is among the roots in {path} ({var}); \
         refusing a certificate we could not trust"
    )]
    UntrustedRoot {
        sent: usize,
        path: PathBuf,
        var: &'static str,
    },
    #[error("the leaf from the CA does not verify up to the trusted root it sent: {0}")]
    Chain(String),
    #[error("the certificate from the CA cannot be used: {0}")]
    Build(TlsError),
}

impl RemoteCa {
    /// Builds the client. Nothing is dialled until the first request.
    pub fn new(cfg: RemoteCaConfig) -> Result<Self, GrpcError> {
        let channel = crate::grpc::channel(&cfg.target)?;
        Ok(RemoteCa {
            client: IstioCertificateServiceClient::with_interceptor(channel, cfg.auth),
            address: cfg.target.address,
            address_var: cfg.target.var,
            root_ca: cfg.target.root_ca,
            root_var: cfg.target.root_var,
            impersonate: cfg.impersonate,
            ttl: cfg.ttl,
            trust_domain: cfg.trust_domain,
            timeout: FETCH_TIMEOUT,
        })
    }

    async fn fetch_checked(&self, id: &SpiffeId) -> Result<WorkloadCertificate, FetchError> {
        if id.trust_domain() != self.trust_domain {
            return Err(FetchError::WrongTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let req = IstioCertificateRequest {
            csr: csr_pem(id, &key)?,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: self.impersonate.then(|| impersonation(id)),
        };
        let call = async {
            let mut client = self.client.clone();
            client.create_certificate(req).await
        };
        let answer = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                return Err(FetchError::Timeout {
                    address: self.address.clone(),
                    var: self.address_var,
                    timeout: self.timeout,
                });
            }
            Ok(Err(status)) => return Err(self.refused(&status)),
            Ok(Ok(answer)) => answer.into_inner(),
        };
        // Re-read on every request: a rotated root file is honoured without a restart.
        let trusted = TrustedRoots::load(self.root_ca.clone(), self.root_var)?;
        let issued = check_chain(id, &key, &answer.cert_chain, &trusted)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(issued.chain, key_der, issued.roots).map_err(FetchError::Build)
    }

    /// The CA's status, its message (escaped and bounded: whatever answers on the CA's address
    /// wrote it), plus the transport's cause and a hint.
    fn refused(&self, status: &tonic::Status) -> FetchError {
        let mut message = status.message().to_owned();
        let mut source = std::error::Error::source(status);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = s.source();
        }
        let hint = match status.code() {
            tonic::Code::Unauthenticated => {
                " (check AUTH_TOKEN: the controller does not accept our token)".to_owned()
            }
            tonic::Code::Unavailable => format!(
                " (check {} and that the controller's certificate chains to {})",
                self.address_var, self.root_var
            ),
            _ => String::new(),
        };
        FetchError::Refused {
            address: self.address.clone(),
            code: status.code(),
            message: zmesh_core::peer_text::PeerText::display(
                &message,
                zmesh_core::peer_text::PEER_ERROR_MAX,
            )
            .to_string(),
            hint,
        }
    }
}

impl CertificateSource for RemoteCa {
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move {
            self.fetch_checked(&id).await.map_err(|e| CertError::Ca {
                id: id.to_string(),
                reason: e.to_string(),
            })
        })
    }
}

/// A PEM CSR for `id` over `key`: empty subject, the SPIFFE URI as the only SAN.
fn csr_pem(id: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let uri = rcgen::string::Ia5String::try_from(id.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.serialize_request(key)?.pem()
}

/// The request metadata asking for `id`'s certificate on a pod's behalf (the same Struct as
/// the controller's `ca::impersonation`).
fn impersonation(id: &SpiffeId) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        )]
        .into(),
    }
}

/// The roots the CA connection trusts (`CA_ROOT_CA`); an issued certificate must chain to one.
#[derive(Debug)]
struct TrustedRoots {
    certs: Vec<CertificateDer<'static>>,
    path: PathBuf,
    var: &'static str,
}

impl TrustedRoots {
    fn load(path: PathBuf, var: &'static str) -> Result<Self, FetchError> {
        let certs = std::fs::read_to_string(&path)
            .map_err(|source| TlsError::Read {
                what: "trusted roots",
                path: path.display().to_string(),
                source,
            })
            .and_then(|pem| certs_from_pem("trusted roots", &pem));
        match certs {
            Ok(certs) => Ok(TrustedRoots { certs, path, var }),
            Err(source) => Err(FetchError::Roots { path, var, source }),
        }
    }
}

/// A checked answer: the leaf and intermediates, and every root the CA sent.
#[derive(Debug)]
struct Issued {
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

/// Checks the CA's `cert_chain` (leaf first, then intermediates, the last element holding the
/// root(s)) for a request of `id` over `key`, against the roots we `trusted`.
fn check_chain(
    id: &SpiffeId,
    key: &KeyPair,
    cert_chain: &[String],
    trusted: &TrustedRoots,
) -> Result<Issued, FetchError> {
    let mut parsed = Vec::with_capacity(cert_chain.len());
    for (index, pem) in cert_chain.iter().enumerate() {
        let certs = certs_from_pem("certificate from the CA", pem)
            .map_err(|source| FetchError::Pem { index, source })?;
        parsed.push(certs);
    }
    let Some(roots) = parsed.pop() else {
        return Err(FetchError::EmptyChain);
    };
    if parsed.is_empty() {
        return Err(FetchError::NoRoot(cert_chain.len()));
    }
    let chain: Vec<CertificateDer<'static>> = parsed.into_iter().flatten().collect();
    let leaf = &chain[0];

    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| FetchError::Leaf(e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(FetchError::WrongKey);
    }
    let sans = uri_sans(leaf).map_err(|e| FetchError::Leaf(e.to_string()))?;
    if sans != [id.to_string()] {
        return Err(FetchError::WrongIdentity {
            got: sans,
            want: id.to_string(),
        });
    }

    // Verify only against the roots that are both sent and trusted: the leaf must chain to
    // one of those.
    let mut anchors = RootCertStore::empty();
    for root in roots.iter().filter(|r| trusted.certs.contains(r)) {
        anchors
            .add(root.clone())
            .map_err(|e| FetchError::Chain(format!("a root is not a usable anchor: {e}")))?;
    }
    if anchors.is_empty() {
        return Err(FetchError::UntrustedRoot {
            sent: roots.len(),
            path: trusted.path.clone(),
            var: trusted.var,
        });
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(anchors), provider())
        .build()
        .map_err(|e| FetchError::Chain(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &chain[1..], UnixTime::now())
        .map_err(|e| FetchError::Chain(e.to_string()))?;
    Ok(Issued { chain, roots })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Mutex;
    use std::time::{Instant, SystemTime};

    use rcgen::{DnType, ExtendedKeyUsagePurpose, Issuer};
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    use tonic::{Request, Response, Status};
    use xds_proto::istio::v1::auth::IstioCertificateResponse;
    use xds_proto::istio::v1::auth::istio_certificate_service_server::{
        IstioCertificateService, IstioCertificateServiceServer,
    };
    use zmesh_controller::ca::{
        CaConfig, NodeTokenAuthenticator, StaticPodLocator, WorkloadCa, der_to_pem, validate_csr,
    };
    use zmesh_core::certs::CertStore;
    use zmesh_core::tls::{LocalCa, peer_identity};

    use crate::grpc::AuthToken;

    const TD: &str = "cluster.local";
    const HOUR: Duration = Duration::from_secs(3600);

    fn pod(sa: &str) -> SpiffeId {
        SpiffeId::new(TD, "shop", sa).unwrap()
    }

    /// A root CA, written to a file as `CA_ROOT_CA`.
    struct Root {
        ca: LocalCa,
        file: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Root {
        fn new(name: &str) -> Root {
            let ca = LocalCa::generate(name).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("root-cert.pem");
            std::fs::write(&file, ca.cert_pem()).unwrap();
            Root {
                ca,
                file,
                _dir: dir,
            }
        }

        fn signer(&self) -> LocalCa {
            LocalCa::from_pem(self.ca.cert_pem(), self.ca.key_pem()).unwrap()
        }

        /// A serving certificate for 127.0.0.1 signed by this root.
        fn server_identity(&self) -> Identity {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "zmesh-controller");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let ca_key = KeyPair::from_pem(self.ca.key_pem()).unwrap();
            let issuer = Issuer::from_ca_cert_pem(self.ca.cert_pem(), ca_key).unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            Identity::from_pem(cert.pem(), key.serialize_pem())
        }
    }

    async fn serve<S: IstioCertificateService>(
        svc: IstioCertificateServiceServer<S>,
        identity: Identity,
    ) -> SocketAddr {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        addr
    }

    fn client(addr: SocketAddr, root: &Path, token: &str, impersonate: bool) -> RemoteCa {
        RemoteCa::new(RemoteCaConfig {
            target: Target {
                var: "CA_ADDRESS",
                address: format!("https://{addr}"),
                root_ca: root.to_owned(),
                alt_hostname: None,
                root_var: "CA_ROOT_CA",
            },
            auth: AuthHeaders {
                token: AuthToken::Literal(token.to_owned()),
                cluster_id: "Kubernetes".to_owned(),
            },
            impersonate,
            ttl: HOUR,
            trust_domain: TD.to_owned(),
        })
        .unwrap()
    }

    /// The controller's real CA: node tokens for node-a and node-b; `web` runs on node-a,
    /// `db` on node-b.
    struct Controller {
        root: Root,
        addr: SocketAddr,
        token_a: String,
    }

    async fn controller() -> Controller {
        let root = Root::new("mesh-root");
        let ztunnel = SpiffeId::new(TD, "istio-system", "ztunnel").unwrap();
        let mut auth = NodeTokenAuthenticator::new(ztunnel);
        let token_a = auth.add_node("node-a");
        auth.add_node("node-b");
        let pods = StaticPodLocator::new();
        pods.add("node-a", pod("web"));
        pods.add("node-b", pod("db"));
        let ca = WorkloadCa::new(
            root.signer(),
            CaConfig::default(),
            Arc::new(auth),
            Arc::new(pods),
        );
        let addr = serve(ca.into_server(), root.server_identity()).await;
        Controller {
            root,
            addr,
            token_a,
        }
    }

    fn reason(e: CertError) -> String {
        match e {
            CertError::Ca { reason, .. } => reason,
            other => panic!("not the CA's answer: {other}"),
        }
    }

    fn serial(c: &WorkloadCertificate) -> Vec<u8> {
        let (_, leaf) = x509_parser::parse_x509_certificate(c.chain()[0].as_ref()).unwrap();
        leaf.raw_serial().to_vec()
    }

    /// HBONE's own handshake between two certificates: proves each key matches its leaf and
    /// each chain verifies against the other's roots. Returns the identity the server saw.
    async fn mtls(client: &WorkloadCertificate, server: &WorkloadCertificate) -> SpiffeId {
        let (a, b) = tokio::io::duplex(64 << 10);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let connector = tokio_rustls::TlsConnector::from(
            client
                .client_config(vec![server.identity().clone()])
                .unwrap(),
        );
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let (s, c) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
        c.expect("client side of the handshake");
        let s = s.expect("server side of the handshake");
        peer_identity(&s.get_ref().1.peer_certificates().unwrap()[0]).unwrap()
    }

    #[tokio::test]
    async fn issues_for_a_pod_on_our_node() {
        let ctl = controller().await;
        let ca = client(ctl.addr, &ctl.root.file, &ctl.token_a, true);
        let cert = ca.fetch(&pod("web")).await.unwrap();
        assert_eq!(cert.identity(), &pod("web"));
        assert_eq!(
            uri_sans(&cert.chain()[0]).unwrap(),
            vec!["spiffe://cluster.local/ns/shop/sa/web".to_owned()]
        );
        assert_eq!(cert.chain().len(), 1, "a root CA sends no intermediates");
        assert_eq!(cert.roots(), std::slice::from_ref(ctl.root.ca.root()));
        let life = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert!(
            life >= HOUR && life <= HOUR + Duration::from_secs(120),
            "asked for an hour, got {life:?}"
        );
        // Every fetch has its own key; the two certificates authenticate each other.
        let other = ca.fetch(&pod("web")).await.unwrap();
        assert_ne!(serial(&cert), serial(&other));
        assert_eq!(mtls(&cert, &other).await, pod("web"));

        // The store on the remote CA serves it.
        let store = CertStore::new(Arc::new(ca));
        let served = store.get(&pod("web")).await.unwrap();
        assert_eq!(served.identity(), &pod("web"));
        assert_eq!(served.roots(), std::slice::from_ref(ctl.root.ca.root()));
        assert_eq!(store.summaries().len(), 1);
    }

    #[tokio::test]
    async fn refused_for_a_pod_on_another_node_with_the_servers_reason() {
        let ctl = controller().await;
        let ca = client(ctl.addr, &ctl.root.file, &ctl.token_a, true);
        let err = ca.fetch(&pod("db")).await.unwrap_err();
        let CertError::Ca { id, reason } = err else {
            panic!("not the CA's answer: {err}");
        };
        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/db");
        assert!(reason.contains("PermissionDenied"), "{reason}");
        assert!(
            reason.contains(
                "node node-a asked for spiffe://cluster.local/ns/shop/sa/db, \
                 but no pod with that identity runs on node-a"
            ),
            "{reason}"
        );
        // Through the store as well; the failure is not cached as a certificate.
        let store = CertStore::new(Arc::new(ca));
        let err = store.get(&pod("db")).await.unwrap_err().to_string();
        assert!(err.contains("no pod with that identity"), "{err}");
        assert!(store.summaries().is_empty());
    }

    #[tokio::test]
    async fn a_wrong_token_is_unauthenticated() {
        let ctl = controller().await;
        let ca = client(ctl.addr, &ctl.root.file, "not-the-node-token", true);
        let r = reason(ca.fetch(&pod("web")).await.unwrap_err());
        assert!(r.contains("Unauthenticated"), "{r}");
        assert!(r.contains("unknown node token"), "{r}");
        assert!(r.contains("check AUTH_TOKEN"), "{r}");
    }

    #[tokio::test]
    async fn a_server_not_chaining_to_our_root_is_refused() {
        let ctl = controller().await;
        let stranger = Root::new("stranger");
        let ca = client(ctl.addr, &stranger.file, &ctl.token_a, true);
        let r = reason(ca.fetch(&pod("web")).await.unwrap_err());
        assert!(r.contains("Unavailable"), "{r}");
        assert!(r.contains("UnknownIssuer"), "{r}");
        assert!(r.contains("CA_ROOT_CA"), "{r}");
        // Nothing listening: the address is named.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let ca = client(addr, &ctl.root.file, &ctl.token_a, true);
        let r = reason(ca.fetch(&pod("web")).await.unwrap_err());
        assert!(
            r.contains(&addr.to_string()) && r.contains("CA_ADDRESS"),
            "{r}"
        );
    }

    /// What a fake CA answers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// Signs the CSR's key for the CSR's identity with our root.
        Honest,
        /// ... for another identity.
        WrongSan,
        /// ... over a key that is not ours.
        WrongKey,
        /// Signed by a root we do not trust, which it sends as the root.
        ForeignRoot,
        /// Signed by a root we do not trust, but naming our root as the root.
        LyingRoot,
        /// Signed by our root; the last element holds a foreign root and ours.
        TwoRoots,
        Empty,
        LeafOnly,
        Garbage,
        /// Never answers.
        Hang,
    }

    type Seen = Arc<Mutex<Vec<(Option<String>, IstioCertificateRequest)>>>;

    struct FakeCa {
        ours: LocalCa,
        foreign: LocalCa,
        answer: Answer,
        seen: Seen,
    }

    #[tonic::async_trait]
    impl IstioCertificateService for FakeCa {
        async fn create_certificate(
            &self,
            request: Request<IstioCertificateRequest>,
        ) -> Result<Response<IstioCertificateResponse>, Status> {
            let auth = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let req = request.into_inner();
            self.seen.lock().unwrap().push((auth, req.clone()));
            let csr =
                validate_csr(&req.csr, TD).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let asked = csr.identity.expect("our CSRs name the identity");
            let pem = |d: &CertificateDer<'_>| der_to_pem("CERTIFICATE", d.as_ref());
            let leaf = |ca: &LocalCa, id: &SpiffeId| pem(&ca.sign(id, &csr.key, HOUR).unwrap());
            let ours_root = pem(self.ours.root());
            let foreign_root = pem(self.foreign.root());
            let cert_chain = match self.answer {
                Answer::Honest => vec![leaf(&self.ours, &asked), ours_root],
                Answer::WrongSan => vec![leaf(&self.ours, &pod("someone-else")), ours_root],
                Answer::WrongKey => {
                    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                    vec![pem(&self.ours.sign(&asked, &key, HOUR).unwrap()), ours_root]
                }
                Answer::ForeignRoot => vec![leaf(&self.foreign, &asked), foreign_root],
                Answer::LyingRoot => vec![leaf(&self.foreign, &asked), ours_root],
                Answer::TwoRoots => vec![
                    leaf(&self.ours, &asked),
                    format!("{foreign_root}{ours_root}"),
                ],
                Answer::Empty => vec![],
                Answer::LeafOnly => vec![leaf(&self.ours, &asked)],
                Answer::Garbage => vec![
                    leaf(&self.ours, &asked),
                    "-----BEGIN CERTIFICATE-----\nnope\n".into(),
                ],
                Answer::Hang => std::future::pending().await,
            };
            Ok(Response::new(IstioCertificateResponse {
                cert_chain,
                root_cert: None,
            }))
        }
    }

    /// A fake CA giving `answer` behind a server certificate of `root`, and a client (token
    /// `tok`) trusting `root`. Also returns the foreign CA the fake knows.
    async fn fake(answer: Answer, root: &Root, impersonate: bool) -> (RemoteCa, Seen, LocalCa) {
        let foreign = LocalCa::generate("foreign").unwrap();
        let seen = Seen::default();
        let fake = FakeCa {
            ours: root.signer(),
            foreign: LocalCa::from_pem(foreign.cert_pem(), foreign.key_pem()).unwrap(),
            answer,
            seen: seen.clone(),
        };
        let svc = IstioCertificateServiceServer::new(fake);
        let addr = serve(svc, root.server_identity()).await;
        (client(addr, &root.file, "tok", impersonate), seen, foreign)
    }

    #[tokio::test]
    async fn answers_that_do_not_check_out_are_refused() {
        let root = Root::new("mesh-root");
        let wrong_san = "names [\"spiffe://cluster.local/ns/shop/sa/someone-else\"] \
                         but we asked for spiffe://cluster.local/ns/shop/sa/web";
        let roots_file = format!("is among the roots in {} (CA_ROOT_CA)", root.file.display());
        for (answer, want) in [
            (Answer::WrongSan, wrong_san),
            (Answer::WrongKey, "certifies a different public key"),
            (Answer::ForeignRoot, roots_file.as_str()),
            (Answer::LyingRoot, "does not verify up to the trusted root"),
            (Answer::Empty, "empty certificate chain"),
            (Answer::LeafOnly, "chain of 1 element(s)"),
            (Answer::Garbage, "cert_chain[1] from the CA is not PEM"),
        ] {
            let (ca, seen, _) = fake(answer, &root, true).await;
            let r = reason(ca.fetch(&pod("web")).await.unwrap_err());
            assert!(r.contains(want), "{answer:?}: {r}");
            assert_eq!(seen.lock().unwrap().len(), 1, "{answer:?}");
        }
    }

    #[tokio::test]
    async fn all_roots_of_the_last_element_are_trusted() {
        let root = Root::new("mesh-root");
        let (ca, _, foreign) = fake(Answer::TwoRoots, &root, true).await;
        let cert = ca.fetch(&pod("web")).await.unwrap();
        assert_eq!(
            cert.roots(),
            &[foreign.root().clone(), root.ca.root().clone()]
        );
        assert_eq!(cert.chain().len(), 1);
        let (ca, _, _) = fake(Answer::Honest, &root, true).await;
        let peer = ca.fetch(&pod("db")).await.unwrap();
        assert_eq!(mtls(&peer, &cert).await, pod("db"));
    }

    #[tokio::test]
    async fn requests_carry_csr_ttl_token_and_impersonation() {
        let root = Root::new("mesh-root");
        let (ca, seen, _) = fake(Answer::Honest, &root, true).await;
        ca.fetch(&pod("web")).await.unwrap();
        let (auth, req) = seen.lock().unwrap().pop().unwrap();
        assert_eq!(auth.as_deref(), Some("Bearer tok"));
        assert_eq!(req.validity_duration, 3600);
        assert_eq!(
            req.metadata,
            Some(zmesh_controller::ca::impersonation(&pod("web").to_string()))
        );
        // The controller's own CSR checks: one SPIFFE URI SAN and nothing else, P-256.
        let csr = validate_csr(&req.csr, TD).unwrap();
        assert_eq!(csr.identity, Some(pod("web")));
        assert_eq!(csr.key.description(), "ECDSA P-256");

        // Dedicated mode: no impersonation.
        let (ca, seen, _) = fake(Answer::Honest, &root, false).await;
        ca.fetch(&pod("web")).await.unwrap();
        assert_eq!(seen.lock().unwrap()[0].1.metadata, None);

        // Another trust domain is not even asked for.
        let other_td = SpiffeId::new("other.td", "shop", "web").unwrap();
        let err = reason(ca.fetch(&other_td).await.unwrap_err());
        assert!(
            err.contains("not of our trust domain cluster.local"),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_ca_that_does_not_answer_times_out() {
        let root = Root::new("mesh-root");
        let (mut ca, _, _) = fake(Answer::Hang, &root, true).await;
        ca.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let r = reason(ca.fetch(&pod("web")).await.unwrap_err());
        assert!(
            r.contains("no answer from the CA") && r.contains("CA_ADDRESS"),
            "{r}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The CA's shortest lifetime is 10 s (issued from a minute ago): the store renews half
    /// way through the 10 s left on arrival.
    #[tokio::test]
    async fn the_store_renews_at_half_life() {
        let ctl = controller().await;
        let mut ca = client(ctl.addr, &ctl.root.file, &ctl.token_a, true);
        ca.ttl = Duration::from_secs(10);
        let store = CertStore::new(Arc::new(ca));
        let first = store.get(&pod("web")).await.unwrap();
        let half = first.refresh_at();
        assert!(
            half > SystemTime::now(),
            "the first certificate is not due yet"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let renewed = loop {
            let now = store.get(&pod("web")).await.unwrap();
            if serial(&now) != serial(&first) {
                break now;
            }
            assert!(Instant::now() < deadline, "no renewal 30 s after {half:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            SystemTime::now() >= half,
            "renewed before half life ({half:?})"
        );
        assert_eq!(renewed.identity(), &pod("web"));
        assert!(renewed.not_after() > first.not_after());
        assert_eq!(mtls(&renewed, &first).await, pod("web"));
    }
}
