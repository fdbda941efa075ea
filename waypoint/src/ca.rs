//! The waypoint's certificate from the controller's CA (Istio's `IstioCertificateService`):
//! a fresh ECDSA P-256 key and a CSR with the waypoint's SPIFFE id as its only SAN per fetch,
//! no impersonation (the CA signs only the caller's own identity), and the answer checked
//! before use: our key, our identity, a chain to a root we trust (`CA_ROOT_CA`).

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
use zmesh_core::tls::{WorkloadCertificate, certs_from_pem, provider, uri_sans};

use zmesh_core::grpc::{AuthHeaders, GrpcError, Target, channel, describe};

/// How long one CreateCertificate call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The controller's CA as a certificate source.
pub struct RemoteCa {
    client: IstioCertificateServiceClient<InterceptedService<Channel, AuthHeaders>>,
    address: String,
    root_ca: PathBuf,
    ttl: Duration,
}

impl RemoteCa {
    /// Nothing is dialled until the first fetch.
    pub fn new(target: &Target, auth: AuthHeaders, ttl: Duration) -> Result<RemoteCa, GrpcError> {
        Ok(RemoteCa {
            client: IstioCertificateServiceClient::with_interceptor(channel(target)?, auth),
            address: target.address.clone(),
            root_ca: target.root_ca.clone(),
            ttl,
        })
    }

    async fn fetch_checked(&self, id: &SpiffeId) -> Result<WorkloadCertificate, String> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| e.to_string())?;
        let req = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        };
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.create_certificate(req))
            .await
            .map_err(|_| {
                format!(
                    "the CA at {} did not answer within {CALL_TIMEOUT:?}",
                    self.address
                )
            })?
            .map_err(|s| {
                format!(
                    "CreateCertificate at {} failed: {}",
                    self.address,
                    describe(&s)
                )
            })?
            .into_inner();
        let trusted_pem = std::fs::read_to_string(&self.root_ca)
            .map_err(|e| format!("cannot read CA_ROOT_CA {}: {e}", self.root_ca.display()))?;
        let trusted = certs_from_pem("CA_ROOT_CA", &trusted_pem).map_err(|e| e.to_string())?;
        let (chain, roots) = check(id, &key, &answer.cert_chain, &trusted)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(chain, key_der, roots)
            .map_err(|e| format!("the certificate from the CA cannot be used: {e}"))
    }
}

/// Checks `cert_chain` (leaf first, then intermediates; the last element holds the roots).
fn check(
    id: &SpiffeId,
    key: &KeyPair,
    cert_chain: &[String],
    trusted: &[CertificateDer<'static>],
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), String> {
    let mut parts = Vec::with_capacity(cert_chain.len());
    for (i, pem) in cert_chain.iter().enumerate() {
        parts.push(
            certs_from_pem("certificate from the CA", pem)
                .map_err(|e| format!("cert_chain[{i}]: {e}"))?,
        );
    }
    let roots = parts.pop().ok_or("the CA sent an empty cert_chain")?;
    let chain: Vec<CertificateDer<'static>> = parts.into_iter().flatten().collect();
    let leaf = chain
        .first()
        .ok_or("the CA sent no leaf certificate (only roots)")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the leaf is not X.509: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the leaf is not for the key we sent".into());
    }
    let sans = uri_sans(leaf).map_err(|e| e.to_string())?;
    if sans != [id.to_string()] {
        return Err(format!("the leaf names {sans:?}, not {id}"));
    }
    let mut anchors = RootCertStore::empty();
    for r in roots.iter().filter(|r| trusted.contains(r)) {
        anchors.add(r.clone()).map_err(|e| e.to_string())?;
    }
    if anchors.is_empty() {
        return Err("none of the CA's roots is in CA_ROOT_CA".into());
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(anchors), provider())
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(leaf, &chain[1..], UnixTime::now())
        .map_err(|e| format!("the leaf does not chain to a trusted root: {e}"))?;
    Ok((chain, roots))
}

impl CertificateSource for RemoteCa {
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move {
            self.fetch_checked(&id)
                .await
                .map_err(|reason| CertError::Ca {
                    id: id.to_string(),
                    reason,
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zmesh_core::tls::LocalCa;

    fn pem(der: &CertificateDer<'_>) -> String {
        ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
    }

    #[test]
    fn answers_are_checked() {
        let ca = LocalCa::generate("test").unwrap();
        let other = LocalCa::generate("other").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/waypoint"
            .parse()
            .unwrap();
        let not_me: SpiffeId = "spiffe://cluster.local/ns/default/sa/other"
            .parse()
            .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let trusted = vec![ca.root().clone()];
        let ttl = Duration::from_secs(3600);
        let leaf =
            |ca: &LocalCa, id: &SpiffeId, key: &KeyPair| pem(&ca.sign(id, key, ttl).unwrap());
        let root = pem(ca.root());
        let (chain, roots) =
            check(&id, &key, &[leaf(&ca, &id, &key), root.clone()], &trusted).unwrap();
        assert_eq!((chain.len(), roots.len()), (1, 1));
        let bad = [
            (vec![], "empty"),
            (vec![root.clone()], "no leaf"),
            (
                vec![leaf(&ca, &id, &other_key), root.clone()],
                "not for the key",
            ),
            (vec![leaf(&ca, &not_me, &key), root.clone()], "names"),
            (
                vec![leaf(&other, &id, &key), pem(other.root())],
                "CA_ROOT_CA",
            ),
            (
                vec![leaf(&other, &id, &key), root.clone()],
                "does not chain",
            ),
        ];
        for (chain, want) in bad {
            let e = check(&id, &key, &chain, &trusted).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
