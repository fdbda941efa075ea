//! A certificate authority held in process: signs workload certificates from a root (or
//! intermediate) given as PEM files. Used for development, tests and the lab; the controller's
//! CA builds on the same signing code.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{TlsError, WorkloadCertificate, certs_from_pem};
use crate::identity::SpiffeId;

/// Signature algorithms a CA key may use, tried in this order against the certificate's key.
const CA_ALGORITHMS: &[&SignatureAlgorithm] = &[
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_RSA_SHA256,
];

/// A signing CA: its certificate chain (the signing cert first, the root last) and key.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads a CA from PEM files: the certificate (optionally followed by its chain up to the
    /// root) and its private key (PKCS#8, PKCS#1 or SEC1; ECDSA or RSA).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let read = |what, p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                what,
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(
            &read("CA certificate", cert_path)?,
            &read("CA key", key_path)?,
        )
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let chain = certs_from_pem("CA certificate", cert_pem)?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::Pem {
                what: "CA key",
                expected: "PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY",
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map_err(|e| TlsError::Parse(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(TlsError::NotACa);
        }
        let cert_key = parsed.public_key().subject_public_key.data.to_vec();
        let key = CA_ALGORITHMS
            .iter()
            .filter_map(|alg| KeyPair::from_der_and_sign_algo(&key_der, alg).ok())
            .find(|k| k.der_bytes() == cert_key.as_slice())
            .ok_or(TlsError::CaKeyMismatch)?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
        Ok(LocalCa {
            issuer,
            chain,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// Generates a fresh self-signed ECDSA P-256 root, valid for ten years.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zmesh");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time_from(SystemTime::now() - Duration::from_secs(3600));
        params.not_before = now;
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// The CA certificate chain as PEM, as it was loaded or generated.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key as PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The root this CA chains to (the last certificate of its chain).
    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().expect("a CA chain is never empty")
    }

    /// Issues a workload certificate: a fresh ECDSA P-256 key, the SPIFFE id as the only SAN,
    /// valid from a minute ago for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCertificate, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign(id, &key, ttl)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut chain = vec![leaf];
        // Intermediates between the signing cert and the root travel with the leaf.
        chain.extend(self.chain.iter().take(self.chain.len() - 1).cloned());
        WorkloadCertificate::new(chain, key_der, vec![self.root().clone()])
    }

    /// Signs a leaf for `id` over the given public key.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| TlsError::Parse(e.to_string()))?;
        let mut params = CertificateParams::default();
        // Empty subject, as Istio's workload certificates: the identity lives in the SAN only
        // (rcgen then marks the SAN extension critical, per RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let start = SystemTime::now() - Duration::from_secs(60);
        params.not_before = time_from(start);
        params.not_after = time_from(start + ttl + Duration::from_secs(60));
        params.serial_number = Some(random_serial());
        Ok(params.signed_by(public_key, &self.issuer)?.der().clone())
    }
}

/// A TLS server certificate: leaf (then intermediates) and its key.
#[derive(Debug)]
pub struct ServerCertificate {
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

impl LocalCa {
    /// Issues a server certificate (the controller's own, on 15012) for DNS names and IP
    /// addresses: a fresh ECDSA P-256 key, `names` as SANs (IPs as IP SANs), server auth only.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<ServerCertificate, TlsError> {
        if names.is_empty() {
            return Err(TlsError::Parse(
                "a server certificate needs at least one name".into(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => rcgen::string::Ia5String::try_from(n.clone())
                    .map(SanType::DnsName)
                    .map_err(|e| TlsError::Parse(format!("server name {n:?}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let start = SystemTime::now() - Duration::from_secs(60);
        let not_after = start + ttl + Duration::from_secs(60);
        params.not_before = time_from(start);
        params.not_after = time_from(not_after);
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(&key, &self.issuer)?.der().clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().take(self.chain.len() - 1).cloned());
        Ok(ServerCertificate {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn time_from(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn generated_ca_issues_spiffe_leaf() {
        let ca = LocalCa::generate("test").unwrap();
        let cert = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.identity(), &id("a"));
        let sans = super::super::uri_sans(&cert.chain()[0]).unwrap();
        assert_eq!(
            sans,
            vec!["spiffe://cluster.local/ns/default/sa/a".to_string()]
        );
        let life = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert!(life >= Duration::from_secs(3600) && life < Duration::from_secs(3800));
        assert!(cert.refresh_at() > cert.not_before() && cert.refresh_at() < cert.not_after());
    }

    fn openssl(args: &[&str], dir: &Path) {
        let st = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            st.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }

    /// Real organisations' roots come as RSA or ECDSA keys, in PKCS#8 or traditional PEM.
    #[test]
    fn loads_rsa_and_ecdsa_roots_in_both_pem_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(&["genrsa", "-traditional", "-out", "rsa1.pem", "2048"], d);
        openssl(
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "rsa1.pem", "-out", "rsa8.pem",
            ],
            d,
        );
        openssl(
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "ec1.pem",
            ],
            d,
        );
        openssl(
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "ec1.pem", "-out", "ec8.pem",
            ],
            d,
        );
        for (key, traditional_header) in [
            ("rsa1.pem", Some("BEGIN RSA PRIVATE KEY")),
            ("rsa8.pem", None),
            ("ec1.pem", Some("BEGIN EC PRIVATE KEY")),
            ("ec8.pem", None),
        ] {
            let crt = format!("{key}.crt");
            openssl(
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-key",
                    key,
                    "-out",
                    &crt,
                    "-days",
                    "30",
                    "-subj",
                    "/O=corp/CN=root",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
                d,
            );
            let key_pem = std::fs::read_to_string(d.join(key)).unwrap();
            if let Some(h) = traditional_header {
                assert!(key_pem.contains(h), "{key} is not in traditional form");
            }
            let ca =
                LocalCa::load(&d.join(&crt), &d.join(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
            let cert = ca.issue(&id("x"), Duration::from_secs(600)).unwrap();
            // The leaf verifies against the root with webpki.
            let ee = webpki::EndEntityCert::try_from(&cert.chain()[0]).unwrap();
            let anchor = webpki::anchor_from_trusted_cert(ca.root()).unwrap();
            ee.verify_for_usage(
                crate::tls::provider().signature_verification_algorithms.all,
                &[anchor],
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .unwrap_or_else(|e| panic!("{key}: leaf does not verify: {e}"));
        }
    }

    #[test]
    fn rejects_mismatched_key_and_non_ca() {
        let a = LocalCa::generate("a").unwrap();
        let b = LocalCa::generate("b").unwrap();
        let err = LocalCa::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMismatch), "{err}");
        // A leaf certificate is not a CA.
        let leaf = a.issue(&id("a"), Duration::from_secs(60)).unwrap();
        let leaf_pem = pem_of(&leaf.chain()[0]);
        let err = LocalCa::from_pem(&leaf_pem, a.key_pem()).unwrap_err();
        assert!(matches!(err, TlsError::NotACa), "{err}");
        let err = LocalCa::from_pem("not pem", a.key_pem()).unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err}");
    }

    fn pem_of(der: &CertificateDer<'_>) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
    }
}
