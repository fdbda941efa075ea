//! Peer verification by SPIFFE identity. The chain is verified with webpki against the
//! workload's roots; host names are ignored (HBONE sends no SNI); the identity in the URI SAN
//! decides.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::verified::{VerifiedChains, VerifiedPeer};
use super::{TlsError, provider};
use crate::identity::SpiffeId;

/// All URI SANs of a certificate, in order.
pub fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE identity of a verified peer certificate: its first URI SAN that parses.
pub fn peer_identity(der: &CertificateDer<'_>) -> Option<SpiffeId> {
    uri_sans(der)
        .ok()?
        .into_iter()
        .find_map(|u| u.parse::<SpiffeId>().ok())
}

/// The SPIFFE identity of a TLS connection's verified peer: its leaf certificate's
/// ([`peer_identity`]), if it presented one.
pub fn connection_peer(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(peer_identity)
}

fn cert_error(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// Client-side verifier: the server must chain to our roots (checked once per chain, see
/// [`VerifiedChains`]) and present one of `allowed`.
#[derive(Debug)]
pub struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    allowed: Vec<SpiffeId>,
    /// Server chains already verified against `roots` (shared by every verifier of one
    /// workload certificate, see [`VerifiedChains`]).
    chains: Arc<VerifiedChains>,
}

impl IdentityServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, allowed: Vec<SpiffeId>) -> Self {
        Self::sharing(roots, Arc::default(), allowed)
    }

    /// A verifier that remembers verified chains in `chains`, which must only ever have been
    /// used with these `roots`.
    pub(crate) fn sharing(
        roots: Arc<RootCertStore>,
        chains: Arc<VerifiedChains>,
        allowed: Vec<SpiffeId>,
    ) -> Self {
        IdentityServerVerifier {
            roots,
            allowed,
            chains,
        }
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = self.chains.verify(end_entity, intermediates, now, || {
            verify_chain(
                &self.roots,
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
        })?;
        if peer.ids.iter().any(|id| self.allowed.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(IdentityMismatch {
                    presented: peer.sans.clone(),
                    expected: self.allowed.iter().map(|i| i.to_string()).collect(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// webpki's verification of a peer's chain for `usage` against `roots` (no revocation lists:
/// none are configured); whether the path it built used every presented intermediate, i.e.
/// whether the chain's bytes are exactly what was verified ([`VerifiedChains`] remembers only
/// those).
fn verify_chain(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<bool, rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(cert_error)?;
    let path = ee
        .verify_for_usage(
            provider().signature_verification_algorithms.all,
            &roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
    Ok(path.intermediate_certificates().count() == intermediates.len())
}

fn webpki_error(e: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(WebPki(other)))),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WebPki(webpki::Error);

/// The peer proved a valid certificate but not one of the identities we expected.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {presented:?} is not one of the expected {expected:?}")]
pub struct IdentityMismatch {
    pub presented: Vec<String>,
    pub expected: Vec<String>,
}

/// Server-side verifier: standard client-certificate verification (once per chain, see
/// [`VerifiedChains`]), then the client's SPIFFE trust domain must equal ours.
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    /// rustls's verifier, for the handshake signature and its schemes. The chain is verified
    /// with webpki directly, as rustls's verifier does, to see the path it built.
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    /// Client chains already verified against `roots` (see [`VerifiedChains`]).
    chains: Arc<VerifiedChains>,
    roots: Arc<RootCertStore>,
}

impl TrustDomainClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: String) -> Result<Self, TlsError> {
        Self::sharing(roots, Arc::default(), trust_domain)
    }

    /// A verifier that remembers verified chains in `chains`, which must only ever have been
    /// used with these `roots`.
    pub(crate) fn sharing(
        roots: Arc<RootCertStore>,
        chains: Arc<VerifiedChains>,
        trust_domain: String,
    ) -> Result<Self, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Parse(e.to_string()))?;
        Ok(TrustDomainClientVerifier {
            inner,
            trust_domain,
            chains,
            roots,
        })
    }

    /// What [`ClientCertVerifier::verify_client_cert`] decides, with the verified peer: a
    /// chain of our roots (once per chain, see [`VerifiedChains`]) naming our trust domain.
    pub(crate) fn verified_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Arc<VerifiedPeer>, rustls::Error> {
        let peer = self.chains.verify(end_entity, intermediates, now, || {
            verify_chain(
                &self.roots,
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
        })?;
        match peer.ids.first() {
            Some(id) if id.trust_domain() == self.trust_domain => Ok(peer),
            Some(id) => Err(cert_error(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            ))),
            None => Err(cert_error("client certificate has no SPIFFE URI SAN")),
        }
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client always presents its one workload certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verified_peer(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
