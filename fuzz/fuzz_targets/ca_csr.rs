//! Certificate signing requests as the controller's CA receives them
//! (`IstioCertificateRequest.csr`): `validate_csr` on PEM, `validate_csr_der` on DER.
//!
//! Input: a PEM text (starts with `-----BEGIN`) or the DER bytes of a PKCS#10 request.
//!
//! Invariants: an accepted CSR asks for an identity of the CA's trust domain only (or none);
//! the PEM and DER paths agree; the CA can sign the accepted key, and the leaf it issues
//! certifies exactly that key and the asked identity.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rcgen::PublicKeyData;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use zmesh_controller::ca::csr::{ValidCsr, validate_csr, validate_csr_der};
use zmesh_controller::ca::der_to_pem;
use zmesh_core::identity::SpiffeId;
use zmesh_core::tls::LocalCa;

const TRUST_DOMAIN: &str = "cluster.local";

fn ca() -> &'static LocalCa {
    static CA: OnceLock<LocalCa> = OnceLock::new();
    CA.get_or_init(|| LocalCa::generate("fuzz root").expect("generate a root"))
}

fn check_accepted(csr: &ValidCsr, der: Option<&[u8]>) {
    if let Some(id) = &csr.identity {
        assert_eq!(id.trust_domain(), TRUST_DOMAIN);
    }
    if let Some(der) = der {
        // The PEM form of the same request reaches the same verdict.
        let pem = der_to_pem("CERTIFICATE REQUEST", der);
        assert_eq!(validate_csr(&pem, TRUST_DOMAIN).as_ref(), Ok(csr));
    }
    let id = csr.identity.clone().unwrap_or_else(|| {
        SpiffeId::new(TRUST_DOMAIN, "default", "default").expect("a valid identity")
    });
    let leaf = ca()
        .sign(&id, &csr.key, Duration::from_secs(3600))
        .expect("the CA signs an accepted key");
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(leaf.as_ref()).expect("leaf parses");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        csr.key.der_bytes(),
        "the leaf certifies another key"
    );
    let san = cert
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("leaf has a SAN");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [id.to_string()]);
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"-----BEGIN") {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(csr) = validate_csr(text, TRUST_DOMAIN) {
            check_accepted(&csr, None);
        }
    } else if let Ok(csr) = validate_csr_der(data, TRUST_DOMAIN) {
        check_accepted(&csr, Some(data));
    }
});
