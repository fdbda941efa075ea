//! The workload CA over real gRPC on loopback: a node's ztunnel asks for its pods'
//! certificates with a plaintext tonic client, and every refusal comes back with the right
//! status and an operator-readable message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use rustls::server::danger::ClientCertVerifier;
use tonic::Code;
use tonic::transport::{Channel, Server};
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_controller::ca::{
    CaConfig, NodeTokenAuthenticator, StaticPodLocator, WorkloadCa, der_to_pem, impersonation,
    validate_csr,
};
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::{LocalCa, TrustDomainClientVerifier, WorkloadCertificate, certs_from_pem};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

struct Lab {
    addr: SocketAddr,
    n1: String,
    n2: String,
    root: CertificateDer<'static>,
}

/// Starts the CA with nodes n1 and n2; pod default/a runs on n1, pod default/b on n2.
async fn start(ca: LocalCa, config: CaConfig) -> Lab {
    let root = ca.root().clone();
    let mut auth = NodeTokenAuthenticator::new(id("istio-system", "ztunnel"));
    let n1 = auth.add_node("n1");
    let n2 = auth.add_node("n2");
    let pods = StaticPodLocator::new();
    pods.add("n1", id("default", "a"));
    pods.add("n2", id("default", "b"));
    let svc = WorkloadCa::new(ca, config, Arc::new(auth), Arc::new(pods)).into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // One service per server (the `router` feature is not enabled), so no `add_service`.
    tokio::spawn(
        Server::builder()
            .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(listener)),
    );
    Lab { addr, n1, n2, root }
}

async fn lab() -> Lab {
    start(LocalCa::generate("root").unwrap(), CaConfig::default()).await
}

async fn client(lab: &Lab) -> IstioCertificateServiceClient<Channel> {
    IstioCertificateServiceClient::connect(format!("http://{}", lab.addr))
        .await
        .unwrap()
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

fn request(csr: String, ttl: i64, impersonate: Option<&str>) -> IstioCertificateRequest {
    let metadata = impersonate.map(impersonation);
    IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata,
    }
}

async fn call(
    lab: &Lab,
    token: Option<&str>,
    req: IstioCertificateRequest,
) -> Result<Vec<String>, tonic::Status> {
    let mut r = tonic::Request::new(req);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    client(lab)
        .await
        .create_certificate(r)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Checks the chain and returns the leaf's lifetime.
fn check_chain(lab: &Lab, chain: &[String], key: &KeyPair, want: &SpiffeId) -> Duration {
    let ders: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|p| certs_from_pem("chain", p).unwrap().remove(0))
        .collect();
    assert!(
        ders.len() >= 2,
        "leaf and root expected, got {}",
        ders.len()
    );
    assert_eq!(ders.last().unwrap(), &lab.root, "root must come last");
    let leaf = &ders[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "leaf must certify the CSR's key"
    );
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let cert = WorkloadCertificate::new(
        ders[..ders.len() - 1].to_vec(),
        key_der,
        vec![lab.root.clone()],
    )
    .unwrap();
    assert_eq!(cert.identity(), want);
    let mut roots = RootCertStore::empty();
    roots.add(lab.root.clone()).unwrap();
    let verifier = TrustDomainClientVerifier::new(Arc::new(roots), TD.to_owned()).unwrap();
    verifier
        .verify_client_cert(leaf, &ders[1..ders.len() - 1], UnixTime::now())
        .expect("leaf verifies against the root");
    cert.not_after().duration_since(cert.not_before()).unwrap()
}

#[tokio::test]
async fn node_gets_certificates_for_its_pods() {
    let lab = lab().await;
    let a = id("default", "a");
    // With the identity in the CSR, and without (then it comes from the impersonation).
    for sans in [vec![uri(&a.to_string())], vec![]] {
        let key = KeyPair::generate().unwrap();
        let req = request(csr_with(&key, sans), 3600, Some(&a.to_string()));
        let chain = call(&lab, Some(&lab.n1), req).await.unwrap();
        assert_eq!(chain.len(), 2);
        let life = check_chain(&lab, &chain, &key, &a);
        assert_eq!(life, Duration::from_secs(3600 + 60));
    }
    // P-384 and RSA keys are certified as they are.
    let keys = [
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap(),
    ];
    for key in keys {
        let req = request(csr_with(&key, vec![]), 600, Some(&a.to_string()));
        let chain = call(&lab, Some(&lab.n1), req).await.unwrap();
        check_chain(&lab, &chain, &key, &a);
    }
}

#[tokio::test]
async fn intermediate_ca_sends_the_whole_chain() {
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let issuer = rcgen::Issuer::new(rp, root_key);
    let int = ip.signed_by(&int_key, &issuer).unwrap();
    let ca = LocalCa::from_pem(
        &format!("{}{}", int.pem(), root.pem()),
        &int_key.serialize_pem(),
    )
    .unwrap();
    let lab = start(ca, CaConfig::default()).await;
    let key = KeyPair::generate().unwrap();
    let b = id("default", "b");
    let req = request(csr_with(&key, vec![]), 0, Some(&b.to_string()));
    let chain = call(&lab, Some(&lab.n2), req).await.unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let life = check_chain(&lab, &chain, &key, &b);
    assert_eq!(life, Duration::from_secs(24 * 3600 + 60), "default TTL");
}

#[tokio::test]
async fn impersonation_needs_a_pod_on_the_node() {
    let lab = lab().await;
    let key = KeyPair::generate().unwrap();
    let nobody = id("default", "nobody");
    let req = request(csr_with(&key, vec![]), 0, Some(&nobody.to_string()));
    let err = call(&lab, Some(&lab.n1), req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("n1"), "{}", err.message());
    assert!(
        err.message().contains(&nobody.to_string()),
        "{}",
        err.message()
    );
    // n2's token cannot get n1's pod identity, whatever the CSR says.
    let a = id("default", "a").to_string();
    for sans in [vec![], vec![uri(&a)]] {
        let req = request(csr_with(&key, sans), 0, Some(&a));
        let err = call(&lab, Some(&lab.n2), req).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("n2"), "{}", err.message());
    }
    // A CSR naming another identity than the impersonated one is refused too.
    let req = request(
        csr_with(&key, vec![uri(&id("default", "b").to_string())]),
        0,
        Some(&a),
    );
    let err = call(&lab, Some(&lab.n1), req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn missing_or_invalid_token_is_unauthenticated() {
    let lab = lab().await;
    let key = KeyPair::generate().unwrap();
    let a = id("default", "a").to_string();
    let forged = "00".repeat(32);
    for token in [None, Some("not-a-token"), Some(forged.as_str())] {
        let req = request(csr_with(&key, vec![]), 0, Some(&a));
        let err = call(&lab, token, req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
}

#[tokio::test]
async fn bad_csrs_are_invalid_arguments() {
    let lab = lab().await;
    let key = KeyPair::generate().unwrap();
    let a = id("default", "a").to_string();
    // Tamper with the last byte of the signature.
    let good = csr_with(&key, vec![]);
    let mut der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    *der.last_mut().unwrap() ^= 0x01;
    let tampered = der_to_pem("CERTIFICATE REQUEST", &der);
    let cases = [
        (tampered, "signature does not verify"),
        (
            csr_with(&key, vec![uri("spiffe://other.td/ns/default/sa/a")]),
            "other.td",
        ),
        (
            csr_with(
                &key,
                vec![uri(&a), SanType::DnsName("a.default".try_into().unwrap())],
            ),
            "DNS",
        ),
        ("garbage".to_owned(), "PEM"),
    ];
    for (csr, want) in cases {
        let err = call(&lab, Some(&lab.n1), request(csr, 0, Some(&a)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    let err = call(&lab, Some(&lab.n1), request(good, -5, Some(&a)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn validity_is_honoured_and_capped() {
    let config = CaConfig {
        max_ttl: Duration::from_secs(7200),
        ..CaConfig::default()
    };
    let lab = start(LocalCa::generate("root").unwrap(), config).await;
    let a = id("default", "a");
    for (asked, want) in [(600, 600), (10 * 24 * 3600, 7200), (1, 10), (0, 7200)] {
        let key = KeyPair::generate().unwrap();
        let req = request(csr_with(&key, vec![]), asked, Some(&a.to_string()));
        let chain = call(&lab, Some(&lab.n1), req).await.unwrap();
        let life = check_chain(&lab, &chain, &key, &a);
        assert_eq!(life, Duration::from_secs(want + 60), "asked {asked}");
    }
}

#[tokio::test]
async fn other_cluster_is_refused_and_own_identity_without_impersonation() {
    let config = CaConfig {
        cluster_id: Some("east".to_owned()),
        ..CaConfig::default()
    };
    let east = start(LocalCa::generate("root").unwrap(), config).await;
    let key = KeyPair::generate().unwrap();
    // `call` sends clusterid Kubernetes.
    let err = call(
        &east,
        Some(&east.n1),
        request(csr_with(&key, vec![]), 0, None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("east"), "{}", err.message());

    let plain = lab().await;
    let chain = call(
        &plain,
        Some(&plain.n1),
        request(csr_with(&key, vec![]), 0, None),
    )
    .await
    .unwrap();
    check_chain(&plain, &chain, &key, &id("istio-system", "ztunnel"));
}

proptest::proptest! {
    #[test]
    fn arbitrary_csr_text_never_panics(s in ".*") {
        let _ = validate_csr(&s, TD);
    }

    #[test]
    fn arbitrary_csr_der_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let _ = validate_csr(&der_to_pem("CERTIFICATE REQUEST", &bytes), TD);
        let _ = zmesh_controller::ca::csr::validate_csr_der(&bytes, TD);
    }

    /// A valid CSR with one byte changed is refused or accepted, never a panic; and whatever
    /// is accepted still has a SPIFFE id of our trust domain or none.
    #[test]
    fn mutated_csr_never_panics(pos in 0usize..4096, xor in 1u8..=255) {
        let key = KeyPair::generate().unwrap();
        let pem = csr_with(&key, vec![uri("spiffe://cluster.local/ns/default/sa/a")]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let i = pos % der.len();
        der[i] ^= xor;
        if let Ok(v) = zmesh_controller::ca::csr::validate_csr_der(&der, TD) {
            proptest::prop_assert!(v.identity.is_none_or(|id| id.trust_domain() == TD));
        }
    }
}
