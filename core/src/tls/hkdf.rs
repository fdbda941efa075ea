//! The TLS 1.3 key schedule's HKDF (RFC 5869) on HMAC keys that are set up once per secret.
//!
//! rustls's aws-lc-rs suites derive their keys with aws-lc-rs's `hkdf` module. Its `Prk` from
//! `Salt::extract` keeps the salt and the secret and runs the whole of HKDF, extract and
//! expand, in each `Okm::fill`: every label the key schedule expands from a secret repeats
//! that secret's extraction, and every HMAC keys itself again (two SHA-256 blocks of padded
//! key before the message's first). A handshake expands about 40 labels on each side.
//!
//! rustls's own [`HkdfUsingHmac`] computes HKDF from an HMAC (its aws-lc-rs HPKE uses it):
//! it extracts once, keys one HMAC with the result, and expands each label from that key.
//! [`HmacHkdf`] uses it for all but the extraction, which it does itself so that the
//! pseudorandom key is not copied into a heap `Vec` freed without zeroing, as `HkdfUsingHmac`
//! does: it goes from aws-lc-rs's `hmac::Tag` (a `Copy` value on the stack, as with the stock
//! suites) into rustls's zeroising `Tag` and `OkmBlock`.
//! Given aws-lc-rs's `hmac::Key`, which holds the key's inner and outer hash states, each
//! expansion of a 32-byte secret is then two SHA-256 blocks: the label and the outer hash.
//! The outputs are the same bytes (RFC 5869 is one function); the tests hold them against
//! aws-lc-rs's HKDF and against handshakes with rustls's stock suites.
//!
//! These suites do not claim FIPS approval (rustls's `fips()` reports false for them); zmesh
//! does not build aws-lc-rs's FIPS module, with which the stock suites would.
//! `docs/bench-2026-12-07.md` (fourteenth sitting) has what it saves.

use rustls::SupportedCipherSuite;
use rustls::Tls13CipherSuite;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::{Hkdf, HkdfExpander, HkdfUsingHmac, OkmBlock};

/// HMAC from aws-lc-rs for rustls's [`Hmac`] interface.
struct AwsLcHmac(aws_lc_rs::hmac::Algorithm);

struct AwsLcHmacKey(aws_lc_rs::hmac::Key);

impl Hmac for AwsLcHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(AwsLcHmacKey(aws_lc_rs::hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

impl Key for AwsLcHmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(first);
        for m in middle {
            ctx.update(m);
        }
        ctx.update(last);
        Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static HMAC_SHA256: AwsLcHmac = AwsLcHmac(aws_lc_rs::hmac::HMAC_SHA256);
static HMAC_SHA384: AwsLcHmac = AwsLcHmac(aws_lc_rs::hmac::HMAC_SHA384);
static HKDF_SHA256: HmacHkdf = HmacHkdf(HkdfUsingHmac(&HMAC_SHA256));
static HKDF_SHA384: HmacHkdf = HmacHkdf(HkdfUsingHmac(&HMAC_SHA384));

/// HKDF from an HMAC: rustls's [`HkdfUsingHmac`], with the extraction's output kept in
/// zeroising types only.
struct HmacHkdf(HkdfUsingHmac<'static>);

impl Hkdf for HmacHkdf {
    fn extract_from_zero_ikm(&self, salt: Option<&[u8]>) -> Box<dyn HkdfExpander> {
        let zeroes = [0u8; Tag::MAX_LEN];
        self.extract_from_secret(salt, &zeroes[..self.0.0.hash_output_len()])
    }

    fn extract_from_secret(&self, salt: Option<&[u8]>, secret: &[u8]) -> Box<dyn HkdfExpander> {
        let zeroes = [0u8; Tag::MAX_LEN];
        let salt = salt.unwrap_or(&zeroes[..self.0.0.hash_output_len()]);
        // RFC 5869 §2.2: PRK = HMAC-Hash(salt, IKM).
        let prk = self.0.0.with_key(salt).sign(&[secret]);
        self.0.expander_for_okm(&OkmBlock::new(prk.as_ref()))
    }

    fn expander_for_okm(&self, okm: &OkmBlock) -> Box<dyn HkdfExpander> {
        self.0.expander_for_okm(okm)
    }

    fn hmac_sign(&self, key: &OkmBlock, message: &[u8]) -> Tag {
        self.0.hmac_sign(key, message)
    }
}

/// `suite` with its key schedule's HKDF computed from set-up HMAC keys; everything else
/// (suite number, hash, AEAD, limits) is the suite's own. A TLS 1.2 suite, or a hash other
/// than SHA-256 and SHA-384, comes back unchanged.
///
/// Called once per suite by the provider, which keeps the result for the process's life.
pub(super) fn with_hmac_hkdf(suite: SupportedCipherSuite) -> SupportedCipherSuite {
    let Some(s) = suite.tls13() else {
        return suite;
    };
    let hkdf: &'static HmacHkdf = match s.common.hash_provider.algorithm() {
        rustls::crypto::hash::HashAlgorithm::SHA256 => &HKDF_SHA256,
        rustls::crypto::hash::HashAlgorithm::SHA384 => &HKDF_SHA384,
        _ => return suite,
    };
    SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite {
        common: rustls::CipherSuiteCommon {
            suite: s.common.suite,
            hash_provider: s.common.hash_provider,
            confidentiality_limit: s.common.confidentiality_limit,
        },
        hkdf_provider: hkdf,
        aead_alg: s.aead_alg,
        quic: s.quic,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    use rustls::crypto::tls13::OkmBlock;

    fn tls13(s: SupportedCipherSuite) -> &'static Tls13CipherSuite {
        s.tls13().expect("a TLS 1.3 suite")
    }

    /// RFC 5869 appendix A.1, test case 1 (SHA-256): extract from a salt and a secret, then
    /// expand 42 bytes.
    #[test]
    fn rfc5869_case_1() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let ikm = [0x0bu8; 22];
        let salt = hex("000102030405060708090a0b0c");
        let info = hex("f0f1f2f3f4f5f6f7f8f9");
        let okm = hex(
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        );
        let suite = tls13(with_hmac_hkdf(TLS13_AES_128_GCM_SHA256));
        let mut out = [0u8; 42];
        suite
            .hkdf_provider
            .extract_from_secret(Some(&salt), &ikm)
            .expand_slice(&[&info[..5], &info[5..]], &mut out)
            .unwrap();
        assert_eq!(out[..], okm[..]);
    }

    /// Every operation rustls's key schedule asks of HKDF gives aws-lc-rs's bytes, for both
    /// suites, with and without a salt, for a block and for other lengths, and for the
    /// Finished message's HMAC.
    #[test]
    fn same_bytes_as_aws_lc_rs_hkdf() {
        for stock in [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384] {
            let ours = tls13(with_hmac_hkdf(stock)).hkdf_provider;
            let theirs = tls13(stock).hkdf_provider;
            assert_eq!(
                tls13(with_hmac_hkdf(stock)).common.suite,
                tls13(stock).common.suite
            );
            let secret: Vec<u8> = (0u8..48).collect();
            let salt: Vec<u8> = (100u8..148).collect();
            let info: [&[u8]; 3] = [b"\x00\x20", b"\x0dtls13 c hs traffic", b"\x20transcript"];
            for (a, b) in [
                (
                    ours.extract_from_zero_ikm(None),
                    theirs.extract_from_zero_ikm(None),
                ),
                (
                    ours.extract_from_zero_ikm(Some(&salt)),
                    theirs.extract_from_zero_ikm(Some(&salt)),
                ),
                (
                    ours.extract_from_secret(None, &secret),
                    theirs.extract_from_secret(None, &secret),
                ),
                (
                    ours.extract_from_secret(Some(&salt), &secret),
                    theirs.extract_from_secret(Some(&salt), &secret),
                ),
                (
                    ours.expander_for_okm(&OkmBlock::new(&secret[..a_len(ours)])),
                    theirs.expander_for_okm(&OkmBlock::new(&secret[..a_len(ours)])),
                ),
            ] {
                assert_eq!(a.hash_len(), b.hash_len());
                assert_eq!(
                    a.expand_block(&info).as_ref(),
                    b.expand_block(&info).as_ref()
                );
                for len in [12, 16, 32, 100] {
                    let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
                    a.expand_slice(&info, &mut x).unwrap();
                    b.expand_slice(&info, &mut y).unwrap();
                    assert_eq!(x, y, "{len} bytes");
                }
                let mut too_long = vec![0u8; 255 * a.hash_len() + 1];
                assert!(a.expand_slice(&info, &mut too_long).is_err());
            }
            let key = OkmBlock::new(&secret[..a_len(ours)]);
            assert_eq!(
                ours.hmac_sign(&key, b"finished").as_ref(),
                theirs.hmac_sign(&key, b"finished").as_ref()
            );
        }
    }

    fn a_len(h: &dyn rustls::crypto::tls13::Hkdf) -> usize {
        h.extract_from_zero_ikm(None).hash_len()
    }
}
