//! Validation of the certificate signing requests that workloads (through their node's ztunnel)
//! send to the CA: the PEM parses, the signature verifies, the key is of a type and size we sign,
//! and the subject alternative names ask for nothing but (at most) one SPIFFE id of our trust
//! domain. Everything else in the CSR (subject, extensions) is ignored: the CA decides the
//! contents of the certificate it issues.

use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use zmesh_core::identity::SpiffeId;
use zmesh_core::peer_text::{PEER_TEXT_MAX, PeerText};

/// The smallest RSA modulus we sign, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR is refused. Messages are meant for the operator reading the workload's or the
/// ztunnel's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not PEM with a CERTIFICATE REQUEST block")]
    NotPem,
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR has trailing bytes after the PKCS#10 structure")]
    TrailingBytes,
    #[error("CSR signature does not verify (the request was altered or not signed by its key)")]
    BadSignature,
    #[error("CSR signature algorithm is not supported: {}", PeerText::new(.0))]
    UnsupportedSignature(String),
    #[error(
        "CSR key type {0} is not supported (supported: ECDSA P-256, ECDSA P-384, RSA >= 2048 bits)"
    )]
    UnsupportedKey(String),
    #[error("CSR RSA key has {0} bits; at least {MIN_RSA_BITS} are required")]
    WeakRsaKey(usize),
    #[error("CSR asks for a {kind} SAN ({}); only one SPIFFE URI SAN is allowed", PeerText::new(.value))]
    ForbiddenSan { kind: &'static str, value: String },
    #[error("CSR asks for {0} URI SANs; at most one SPIFFE id is allowed")]
    TooManyUris(usize),
    #[error("CSR asks for {:?}, which is not a workload SPIFFE id: {}", PeerText::new(.uri), PeerText::new(.reason))]
    NotSpiffe { uri: String, reason: String },
    #[error("CSR asks for {} but this CA signs trust domain {trust_domain}", PeerText::display(.asked, PEER_TEXT_MAX))]
    WrongTrustDomain {
        asked: SpiffeId,
        trust_domain: String,
    },
    #[error("CSR extensions cannot be parsed: {}", PeerText::new(.0))]
    BadExtension(String),
}

/// The public key of a verified CSR, in the form the signer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey {
    /// The subjectPublicKey bits (an EC point or an RSAPublicKey).
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
    description: &'static str,
}

impl CsrKey {
    /// A short name for logs: "ECDSA P-256", "RSA".
    pub fn description(&self) -> &'static str {
        self.description
    }
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A CSR that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCsr {
    /// The SPIFFE id named in the CSR, if any.
    pub identity: Option<SpiffeId>,
    /// The key the certificate will certify.
    pub key: CsrKey,
}

/// Parses and checks a PEM CSR for a CA of `trust_domain`.
pub fn validate_csr(pem_text: &str, trust_domain: &str) -> Result<ValidCsr, CsrError> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateSigningRequestDer::from_pem_slice(pem_text.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    validate_csr_der(der.as_ref(), trust_domain)
}

/// Like [`validate_csr`], on the DER bytes.
pub fn validate_csr_der(der: &[u8], trust_domain: &str) -> Result<ValidCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes);
    }
    // The key type first: the verifier refuses small RSA keys too, but "signature does not
    // verify" would send the operator looking in the wrong place.
    let key = csr_key(&csr)?;
    csr.verify_signature().map_err(|e| match e {
        x509_parser::error::X509Error::SignatureUnsupportedAlgorithm => {
            CsrError::UnsupportedSignature(csr.signature_algorithm.algorithm.to_id_string())
        }
        _ => CsrError::BadSignature,
    })?;
    let identity = requested_identity(&csr, trust_domain)?;
    Ok(ValidCsr { identity, key })
}

fn csr_key(csr: &X509CertificationRequest<'_>) -> Result<CsrKey, CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let raw = spki.subject_public_key.data.to_vec();
    let alg_oid = &spki.algorithm.algorithm;
    if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC without a named curve".into()))?;
        let (alg, description, len) = if curve == OID_EC_P256 {
            (&rcgen::PKCS_ECDSA_P256_SHA256, "ECDSA P-256", 65)
        } else if curve == OID_NIST_EC_P384 {
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ECDSA P-384", 97)
        } else {
            return Err(CsrError::UnsupportedKey(format!(
                "EC curve {}",
                curve.to_id_string()
            )));
        };
        if raw.len() != len || raw[0] != 4 {
            return Err(CsrError::UnsupportedKey(format!(
                "{description} with a compressed or malformed point"
            )));
        }
        Ok(CsrKey {
            raw,
            alg,
            description,
        })
    } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
            _ => return Err(CsrError::UnsupportedKey("malformed RSA key".into())),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsaKey(bits));
        }
        Ok(CsrKey {
            raw,
            alg: &rcgen::PKCS_RSA_SHA256,
            description: "RSA",
        })
    } else {
        Err(CsrError::UnsupportedKey(alg_oid.to_id_string()))
    }
}

fn modulus_bits(modulus: &[u8]) -> usize {
    let trimmed: &[u8] = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    trimmed.len() * 8 - trimmed[0].leading_zeros() as usize
}

fn requested_identity(
    csr: &X509CertificationRequest<'_>,
    trust_domain: &str,
) -> Result<Option<SpiffeId>, CsrError> {
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push((*u).to_owned()),
                        other => return Err(forbidden_san(other)),
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadExtension(error.to_string()));
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => {
            let id: SpiffeId = uri
                .parse()
                .map_err(
                    |e: zmesh_core::identity::IdentityError| CsrError::NotSpiffe {
                        uri: uri.clone(),
                        reason: e.to_string(),
                    },
                )?;
            if id.trust_domain() != trust_domain {
                return Err(CsrError::WrongTrustDomain {
                    asked: id,
                    trust_domain: trust_domain.to_owned(),
                });
            }
            Ok(Some(id))
        }
        many => Err(CsrError::TooManyUris(many.len())),
    }
}

fn forbidden_san(name: &GeneralName<'_>) -> CsrError {
    let (kind, value) = match name {
        GeneralName::DNSName(d) => ("DNS", (*d).to_owned()),
        GeneralName::IPAddress(ip) => ("IP", format!("{ip:02x?}")),
        GeneralName::RFC822Name(m) => ("email", (*m).to_owned()),
        other => ("non-URI", other.to_string()),
    };
    CsrError::ForbiddenSan { kind, value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn csr(alg: &'static SignatureAlgorithm, sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn accepts_ec_keys_and_reads_the_identity() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let v = validate_csr(
                &csr(alg, vec![uri("spiffe://cluster.local/ns/a/sa/b")]),
                "cluster.local",
            )
            .unwrap();
            assert_eq!(
                v.identity.unwrap().to_string(),
                "spiffe://cluster.local/ns/a/sa/b"
            );
        }
        let v = validate_csr(&csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![]), "td").unwrap();
        assert_eq!(v.identity, None);
        assert_eq!(v.key.description(), "ECDSA P-256");
    }

    #[test]
    fn refuses_other_keys_and_names() {
        let ed = csr(&rcgen::PKCS_ED25519, vec![]);
        assert!(matches!(
            validate_csr(&ed, "td"),
            Err(CsrError::UnsupportedKey(_))
        ));
        let two = csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")],
        );
        assert_eq!(validate_csr(&two, "td"), Err(CsrError::TooManyUris(2)));
        let bad = csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![uri("https://x/y")]);
        assert!(matches!(
            validate_csr(&bad, "td"),
            Err(CsrError::NotSpiffe { .. })
        ));
        let ip = csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec![SanType::IpAddress([10, 0, 0, 1].into())],
        );
        assert!(matches!(
            validate_csr(&ip, "td"),
            Err(CsrError::ForbiddenSan { kind: "IP", .. })
        ));
        assert_eq!(validate_csr("hello", "td"), Err(CsrError::NotPem));
    }

    /// CSRs made by openssl (as operators and other tools make them): small RSA keys and
    /// curves other than P-256/P-384 are refused with the reason.
    #[test]
    fn openssl_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, newkey: &[&str]| -> String {
            let out = dir.path().join(name);
            let mut args = vec!["req", "-new", "-nodes", "-subj", "/CN=x", "-keyout"];
            let key = dir.path().join(format!("{name}.key"));
            args.push(key.to_str().unwrap());
            args.extend_from_slice(newkey);
            args.extend_from_slice(&[
                "-addext",
                "subjectAltName=URI:spiffe://td/ns/a/sa/b",
                "-out",
                out.to_str().unwrap(),
            ]);
            let st = std::process::Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl runs");
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            std::fs::read_to_string(out).unwrap()
        };
        let rsa1024 = make("rsa1024", &["-newkey", "rsa:1024"]);
        assert_eq!(
            validate_csr(&rsa1024, "td"),
            Err(CsrError::WeakRsaKey(1024))
        );
        let rsa2048 = make("rsa2048", &["-newkey", "rsa:2048"]);
        let v = validate_csr(&rsa2048, "td").unwrap();
        assert_eq!(v.identity.unwrap().to_string(), "spiffe://td/ns/a/sa/b");
        let p521 = make(
            "p521",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
        );
        let err = validate_csr(&p521, "td").unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");
        assert!(err.to_string().contains("1.3.132.0.35"), "{err}");
        let p384 = make(
            "p384",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        );
        assert_eq!(
            validate_csr(&p384, "td").unwrap().key.description(),
            "ECDSA P-384"
        );
    }

    #[test]
    fn rsa_size_is_checked() {
        assert_eq!(modulus_bits(&[0, 0x80, 0, 0]), 24);
        assert_eq!(modulus_bits(&[0x01, 0]), 9);
        assert_eq!(modulus_bits(&[]), 0);
        let key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let rsa = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let v = validate_csr(&rsa, "td").unwrap();
        assert_eq!(v.key.description(), "RSA");
    }
}
