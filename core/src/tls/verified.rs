//! Certificate chains already verified against one set of roots.
//!
//! A peer that opens a second HBONE connection presents the same chain as on the first, and
//! verifying it again costs a signature check per certificate (an ECDSA P-256 verification is
//! ~100 us here, a seventh of a whole new connection's CPU on both ends). The chain's bytes
//! decide the outcome: webpki's verdict depends only on them, the roots, the key usage and
//! the time, and within every certificate's validity period the time does not change it. So
//! a chain that passed is remembered by the SHA-256 of its bytes, with the window in which all
//! of its certificates are valid, and a later handshake with the same bytes inside that window
//! skips the chain's signature checks. The handshake's own signature (CertificateVerify, which
//! proves the peer holds the key) is still checked on every connection, by rustls. A chain
//! that fails verification is never remembered (one that verifies is, even when the identity
//! it names is then refused: identities are checked on every handshake, after the memory),
//! and each cache lives with one root set and one key usage (a
//! [`super::WorkloadCertificate`] and its verifiers), so new roots start from nothing.
//!
//! The memory also answers what a remembered chain's leaf names
//! ([`VerifiedChains::remembered`]), so a server that needs its client's identity after the
//! handshake does not parse the certificate again on every connection.
//!
//! A chain is remembered only when the path webpki built uses every certificate presented:
//! anyone can append certificates webpki ignores to a valid chain (a server's chain is sent to
//! whoever connects), and each variant would otherwise take a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::identity::SpiffeId;

/// At most this many chains are remembered; the ones whose window has passed go first, then
/// any. Only chains of certificates our CA signed, with nothing extra, get in. An entry is a
/// few hundred bytes: about 1 MiB for a full cache, two caches per workload certificate.
const CAPACITY: usize = 4096;

/// What a verified chain says of its peer.
#[derive(Debug)]
pub(crate) struct VerifiedPeer {
    /// The leaf's URI SANs, in order.
    pub sans: Vec<String>,
    /// Those of `sans` that are SPIFFE ids, in order: the first is the peer's identity.
    pub ids: Vec<SpiffeId>,
    /// Seconds since the epoch from which, and until which (both inclusive, as webpki checks
    /// them), every certificate of the chain is valid.
    not_before: i64,
    not_after: i64,
}

impl VerifiedPeer {
    /// Whether `now` (seconds since the epoch) is inside the window.
    fn covers(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

fn unix_secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// Chains verified against one root set for one key usage (see the module's text).
#[derive(Debug)]
pub(crate) struct VerifiedChains {
    chains: Mutex<Chains>,
    capacity: usize,
}

#[derive(Debug)]
struct Chains {
    map: HashMap<[u8; 32], Arc<VerifiedPeer>>,
    /// No entry's window ends before this (seconds since the epoch): until then a full map
    /// has nothing expired to sweep.
    earliest_end: i64,
}

impl Default for Chains {
    fn default() -> Self {
        Chains {
            map: HashMap::new(),
            earliest_end: i64::MAX,
        }
    }
}

impl Default for VerifiedChains {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl VerifiedChains {
    /// Remembers at most `capacity` chains (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        VerifiedChains {
            chains: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// The peer of a chain that verifies: from memory when these bytes verified before and
    /// `now` is inside their window, otherwise after `verify` (the full verification) passes.
    /// `verify` answers whether the verified path used every presented certificate: only
    /// then are the bytes remembered.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<bool, rustls::Error>,
    ) -> Result<Arc<VerifiedPeer>, rustls::Error> {
        let key = chain_digest(end_entity, intermediates);
        let secs = unix_secs(now);
        if let Some(peer) = self.lock().map.get(&key).filter(|p| p.covers(secs)) {
            return Ok(peer.clone());
        }
        if !verify()? {
            // Verified, but with certificates the path did not use: not remembered, and only
            // the leaf is read.
            return Ok(Arc::new(read_peer(end_entity, &[])?));
        }
        let peer = Arc::new(read_peer(end_entity, intermediates)?);
        let mut chains = self.lock();
        if chains.map.len() >= self.capacity && !chains.map.contains_key(&key) {
            if secs > chains.earliest_end {
                chains.map.retain(|_, p| p.covers(secs));
                chains.earliest_end = chains
                    .map
                    .values()
                    .map(|p| p.not_after)
                    .min()
                    .unwrap_or(i64::MAX);
            }
            if chains.map.len() >= self.capacity {
                let any = *chains.map.keys().next().expect("the map is full");
                chains.map.remove(&any);
            }
        }
        chains.earliest_end = chains.earliest_end.min(peer.not_after);
        chains.map.insert(key, peer.clone());
        Ok(peer)
    }

    /// What a remembered chain says of its peer, found by the chain's bytes without reading
    /// the certificates again (`None`: these bytes are not remembered). It is what reading
    /// the leaf would give, whatever else the memory holds and whatever the time: the entry
    /// was read from the very bytes its key is the digest of.
    pub fn remembered(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<Arc<VerifiedPeer>> {
        let key = chain_digest(end_entity, intermediates);
        self.lock().map.get(&key).cloned()
    }

    /// How many chains are remembered.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chains> {
        // The map is valid after any panic (inserts and removes are single calls).
        self.chains.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// SHA-256 over each certificate's length and bytes, leaf first: two chains share a digest
/// only if they are the same certificates in the same order.
fn chain_digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for der in std::iter::once(end_entity).chain(intermediates) {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der.as_ref());
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The leaf's SANs and the window in which every certificate of the chain is valid.
fn read_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<VerifiedPeer, rustls::Error> {
    let mut not_before = i64::MIN;
    let mut not_after = i64::MAX;
    for der in std::iter::once(end_entity).chain(intermediates) {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        not_before = not_before.max(cert.validity().not_before.timestamp());
        not_after = not_after.min(cert.validity().not_after.timestamp());
    }
    let sans = super::uri_sans(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
    let ids = sans.iter().filter_map(|s| s.parse().ok()).collect();
    Ok(VerifiedPeer {
        sans,
        ids,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::tls::LocalCa;

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap()
    }

    fn at(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
    }

    /// A full verification that counts its calls in `full` and answers `all_used`.
    fn counting(
        full: &Cell<u32>,
        all_used: bool,
    ) -> impl Fn() -> Result<bool, rustls::Error> + Copy + '_ {
        move || {
            full.set(full.get() + 1);
            Ok(all_used)
        }
    }

    #[test]
    fn a_chain_is_verified_once_within_its_validity() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let cert = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let cache = VerifiedChains::default();
        let full = Cell::new(0);
        let run = |now| {
            cache.verify(
                &cert.chain()[0],
                &cert.chain()[1..],
                now,
                counting(&full, true),
            )
        };
        let now = at(SystemTime::now());
        let first = run(now).unwrap();
        assert_eq!(first.ids, vec![id("a")]);
        assert_eq!(first.sans, vec![id("a").to_string()]);
        let again = run(now).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(
            full.get(),
            1,
            "the second handshake must not verify the chain again"
        );
        // Past the leaf's not_after (a minute of back-dating plus an hour plus a minute) the
        // memory does not answer: the full verification runs again (and would refuse).
        run(at(cert.not_after() + Duration::from_secs(1))).unwrap();
        assert_eq!(full.get(), 2);
        // Nor before not_before.
        run(at(cert.not_before() - Duration::from_secs(1))).unwrap();
        assert_eq!(full.get(), 3);
        // Inclusive bounds, as webpki's.
        run(at(cert.not_after())).unwrap();
        run(at(cert.not_before())).unwrap();
        assert_eq!(full.get(), 3);
    }

    #[test]
    fn a_remembered_chain_names_its_identity_by_its_bytes() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let a = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let b = ca.issue(&id("b"), Duration::from_secs(3600)).unwrap();
        let cache = VerifiedChains::default();
        let full = Cell::new(0);
        // The identity a remembered chain names: `None` when the chain is not remembered.
        let identity = |ee: &CertificateDer<'_>, rest: &[CertificateDer<'_>]| {
            cache.remembered(ee, rest).map(|p| p.ids.first().cloned())
        };
        assert_eq!(identity(&a.chain()[0], &a.chain()[1..]), None);
        cache
            .verify(
                &a.chain()[0],
                &a.chain()[1..],
                at(SystemTime::now()),
                counting(&full, true),
            )
            .unwrap();
        assert_eq!(
            identity(&a.chain()[0], &a.chain()[1..]),
            Some(Some(id("a")))
        );
        // Other bytes are not answered for: another leaf, or the same leaf in another chain.
        assert_eq!(identity(&b.chain()[0], &b.chain()[1..]), None);
        assert_eq!(identity(&a.chain()[0], &[b.chain()[0].clone()]), None);
        // A chain verified with certificates the path did not use is not remembered, so not
        // answered for either.
        cache
            .verify(
                &b.chain()[0],
                &[a.chain()[0].clone()],
                at(SystemTime::now()),
                counting(&full, false),
            )
            .unwrap();
        assert_eq!(identity(&b.chain()[0], &[a.chain()[0].clone()]), None);
    }

    #[test]
    fn a_failed_verification_is_not_remembered() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let cert = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let cache = VerifiedChains::default();
        let now = at(SystemTime::now());
        let refuse = || Err(rustls::Error::General("refused".into()));
        let e = cache
            .verify(&cert.chain()[0], &[], now, refuse)
            .unwrap_err();
        assert_eq!(e, rustls::Error::General("refused".into()));
        assert!(cache.is_empty());
        // The same bytes are verified afresh, and refused again.
        assert!(cache.verify(&cert.chain()[0], &[], now, refuse).is_err());
        assert!(cache.is_empty());
    }

    #[test]
    fn other_bytes_are_another_chain() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let a = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let b = ca.issue(&id("b"), Duration::from_secs(3600)).unwrap();
        let cache = VerifiedChains::default();
        let now = at(SystemTime::now());
        let full = Cell::new(0);
        let ok = counting(&full, true);
        cache.verify(&a.chain()[0], &[], now, ok).unwrap();
        let peer = cache.verify(&b.chain()[0], &[], now, ok).unwrap();
        assert_eq!(peer.ids, vec![id("b")]);
        // The same leaf with an intermediate appended is not the chain that was verified.
        cache
            .verify(&a.chain()[0], &[b.chain()[0].clone()], now, ok)
            .unwrap();
        assert_eq!(full.get(), 3);
        assert_eq!(cache.len(), 3);
        // The window is every certificate's: a shorter-lived intermediate narrows it. The
        // chain is remembered now, and not once the intermediate has expired (while the leaf
        // alone is still valid).
        let short = ca.issue(&id("c"), Duration::from_secs(60)).unwrap();
        let with_short = [short.chain()[0].clone()];
        cache.verify(&a.chain()[0], &with_short, now, ok).unwrap();
        cache.verify(&a.chain()[0], &with_short, now, ok).unwrap();
        assert_eq!(full.get(), 4);
        let later = at(short.not_after() + Duration::from_secs(1));
        cache.verify(&a.chain()[0], &[], later, ok).unwrap();
        assert_eq!(
            full.get(),
            4,
            "the leaf alone is still valid and remembered"
        );
        cache.verify(&a.chain()[0], &with_short, later, ok).unwrap();
        assert_eq!(full.get(), 5);
    }

    #[test]
    fn a_chain_with_certificates_the_path_did_not_use_is_not_remembered() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let a = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let cache = VerifiedChains::default();
        let now = at(SystemTime::now());
        let full = Cell::new(0);
        let extra = counting(&full, false);
        let junk = [ca.root().clone()];
        let peer = cache.verify(&a.chain()[0], &junk, now, extra).unwrap();
        assert_eq!(peer.ids, vec![id("a")]);
        cache.verify(&a.chain()[0], &junk, now, extra).unwrap();
        assert_eq!(full.get(), 2, "verified in full each time");
        assert!(cache.is_empty());
    }

    #[test]
    fn the_memory_is_bounded() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let long = ca.issue(&id("a"), Duration::from_secs(3600)).unwrap();
        let short = ca.issue(&id("b"), Duration::from_secs(60)).unwrap();
        let cache = VerifiedChains::with_capacity(4);
        let now = at(SystemTime::now());
        // Distinct chains: a leaf followed by a different number of copies of itself.
        let chains = |cert: &crate::tls::WorkloadCertificate, n: usize| {
            (0..n).map(|_| cert.chain()[0].clone()).collect::<Vec<_>>()
        };
        cache
            .verify(&short.chain()[0], &[], now, || Ok(true))
            .unwrap();
        for n in 0..3 {
            let rest = chains(&long, n);
            cache
                .verify(&long.chain()[0], &rest, now, || Ok(true))
                .unwrap();
        }
        assert_eq!(cache.len(), 4);
        // Full, once the short-lived one has expired: it is the one to go.
        let later = at(short.not_after() + Duration::from_secs(1));
        let rest = chains(&long, 3);
        cache
            .verify(&long.chain()[0], &rest, later, || Ok(true))
            .unwrap();
        assert_eq!(cache.len(), 4);
        let full = Cell::new(0);
        let count = counting(&full, true);
        for n in 0..4 {
            let rest = chains(&long, n);
            cache.verify(&long.chain()[0], &rest, later, count).unwrap();
        }
        assert_eq!(
            full.get(),
            0,
            "the four live chains are all still remembered"
        );
        // Full of live chains: one of them makes room, and the size stays put.
        for n in 4..10 {
            let rest = chains(&long, n);
            cache
                .verify(&long.chain()[0], &rest, later, || Ok(true))
                .unwrap();
            assert_eq!(cache.len(), 4);
        }
    }
}
