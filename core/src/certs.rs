//! The certificate store: one certificate per identity, fetched from a certificate source on
//! first use, refreshed in the background at half its life (with backoff on failure), and the
//! old certificate kept until it expires if a refresh keeps failing.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::identity::SpiffeId;
use crate::tls::{LocalCa, TlsError, WorkloadCertificate};

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("the certificate authority refused or failed to sign for {id}: {reason}")]
    Ca { id: String, reason: String },
    #[error(transparent)]
    Expired(Box<Expired>),
}

/// A certificate past its `not_after` that the CA has not renewed (boxed in [`CertError`] to
/// keep the error small).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the certificate for {id} expired at {not_after} and the certificate authority has not renewed it (is the CA reachable? see the refresh warnings)"
)]
pub struct Expired {
    pub id: String,
    pub not_after: String,
}

/// Where certificates come from: the local CA today; the controller's CA is another source.
pub trait CertificateSource: Send + Sync + 'static {
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>>;
}

/// The in-process CA as a source, issuing certificates of the given lifetime.
pub struct LocalCaSource {
    pub ca: LocalCa,
    pub ttl: Duration,
}

impl CertificateSource for LocalCaSource {
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>> {
        let res = self
            .ca
            .issue(id, self.ttl)
            .map_err(|e: TlsError| CertError::Ca {
                id: id.to_string(),
                reason: e.to_string(),
            });
        Box::pin(async move { res })
    }
}

type Cell = Arc<tokio::sync::OnceCell<Arc<Mutex<WorkloadCertificate>>>>;

/// The store. Share it behind an `Arc`.
pub struct CertStore {
    source: Arc<dyn CertificateSource>,
    certs: Mutex<HashMap<SpiffeId, Cell>>,
}

/// What `/config_dump` shows of a certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertSummary {
    pub identity: String,
    /// The leaf's serial number, lower-case hex (`istioctl ztunnel-config certificates`
    /// shows it).
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub refresh_at: String,
}

impl CertStore {
    pub fn new(source: Arc<dyn CertificateSource>) -> Arc<Self> {
        Arc::new(CertStore {
            source,
            certs: Mutex::new(HashMap::new()),
        })
    }

    /// The current certificate for `id`, fetching it on first use. Concurrent first uses
    /// share one fetch.
    pub async fn get(self: &Arc<Self>, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        let cell = {
            let mut certs = self.certs.lock().expect("cert store lock");
            certs.entry(id.clone()).or_default().clone()
        };
        let slot = cell
            .get_or_try_init(|| async {
                let cert = self.source.fetch(id).await?;
                let slot = Arc::new(Mutex::new(cert));
                self.spawn_refresh(id.clone(), slot.clone());
                Ok::<_, CertError>(slot)
            })
            .await;
        match slot {
            Ok(slot) => {
                let cert = slot.lock().expect("cert lock").clone();
                // Fail closed and say why, rather than handing a peer a certificate it refuses.
                if cert.is_expired(SystemTime::now()) {
                    return Err(CertError::Expired(Box::new(Expired {
                        id: id.to_string(),
                        not_after: rfc3339(cert.not_after()),
                    })));
                }
                Ok(cert)
            }
            Err(e) => {
                // Let the next caller try again rather than caching the failure, but only
                // drop the cell that failed (another caller may have replaced it meanwhile).
                let mut certs = self.certs.lock().expect("cert store lock");
                if certs.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    certs.remove(id);
                }
                Err(e)
            }
        }
    }

    /// Forgets an identity: its certificate is no longer refreshed.
    pub fn forget(&self, id: &SpiffeId) {
        self.certs.lock().expect("cert store lock").remove(id);
    }

    pub fn summaries(&self) -> Vec<CertSummary> {
        let certs = self.certs.lock().expect("cert store lock");
        let mut out: Vec<CertSummary> = certs
            .values()
            .filter_map(|c| c.get())
            .map(|slot| {
                let c = slot.lock().expect("cert lock");
                CertSummary {
                    identity: c.identity().to_string(),
                    serial: c.serial_hex(),
                    not_before: rfc3339(c.not_before()),
                    not_after: rfc3339(c.not_after()),
                    refresh_at: rfc3339(c.refresh_at()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn spawn_refresh(self: &Arc<Self>, id: SpiffeId, slot: Arc<Mutex<WorkloadCertificate>>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let due = slot.lock().expect("cert lock").refresh_at();
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait).await;
                let Some(store) = weak.upgrade() else { return };
                if !store.is_tracked(&id, &slot) {
                    return;
                }
                match store.source.fetch(&id).await {
                    Ok(cert) => {
                        tracing::info!(identity = %id, not_after = %rfc3339(cert.not_after()), "certificate refreshed");
                        *slot.lock().expect("cert lock") = cert;
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        let (expired, cap) = {
                            let c = slot.lock().expect("cert lock");
                            (c.is_expired(SystemTime::now()), retry_cap(&c))
                        };
                        if expired {
                            tracing::error!(identity = %id, error = %e, retry_in = ?backoff, "certificate expired and its refresh failed; connections with this identity fail until the CA answers");
                        } else {
                            tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate refresh failed; keeping the current one");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(cap);
                    }
                }
            }
        });
    }

    fn is_tracked(&self, id: &SpiffeId, slot: &Arc<Mutex<WorkloadCertificate>>) -> bool {
        let certs = self.certs.lock().expect("cert store lock");
        certs
            .get(id)
            .and_then(|c| c.get())
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }
}

/// The longest wait between refresh attempts: an eighth of the certificate's remaining life
/// at arrival (at least 1 s, at most 150 s as upstream ztunnel), so that a short-lived
/// certificate is retried several times before it expires and soon after the CA returns.
pub fn retry_cap(cert: &WorkloadCertificate) -> Duration {
    let half = cert
        .not_after()
        .duration_since(cert.refresh_at())
        .unwrap_or(Duration::ZERO);
    (half / 4).clamp(Duration::from_secs(1), Duration::from_secs(150))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        ca: LocalCa,
        ttl: Duration,
        calls: AtomicUsize,
        fail_after: usize,
    }

    impl CertificateSource for Counting {
        fn fetch(
            &self,
            id: &SpiffeId,
        ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>>
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let res = if n >= self.fail_after {
                Err(CertError::Ca {
                    id: id.to_string(),
                    reason: "down".into(),
                })
            } else {
                Ok(self.ca.issue(id, self.ttl).unwrap())
            };
            Box::pin(async move { res })
        }
    }

    #[tokio::test]
    async fn one_fetch_per_identity_and_refresh_at_half_life() {
        let src = Arc::new(Counting {
            ca: LocalCa::generate("t").unwrap(),
            // Refresh half way through the 12 s left on arrival. Certificate times are whole
            // seconds, so a leaf may end up to 1 s before its nominal end; the steps below
            // keep 2 s or more from every deadline, for a loaded 2-core machine.
            ttl: Duration::from_secs(12),
            calls: AtomicUsize::new(0),
            fail_after: 2,
        });
        let store = CertStore::new(src.clone());
        let id = SpiffeId::new("cluster.local", "ns", "a").unwrap();
        let (a, b) = tokio::join!(store.get(&id), store.get(&id));
        let first = a.unwrap();
        assert_eq!(first.chain(), b.unwrap().chain());
        assert_eq!(
            src.calls.load(Ordering::SeqCst),
            1,
            "concurrent gets share one fetch"
        );
        // The refresh is due at 5.5–6 s.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let second = store.get(&id).await.unwrap();
        assert_ne!(first.chain(), second.chain(), "certificate was refreshed");
        assert!(src.calls.load(Ordering::SeqCst) >= 2);
        // Further refreshes fail (the next at about 11–12 s): the store keeps serving the last
        // good certificate until it expires (16.5 s or later).
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(store.get(&id).await.unwrap().chain(), second.chain());
        let summaries = store.summaries();
        assert_eq!(summaries.len(), 1);
        // The serial shown is the leaf's, in hex.
        let (_, leaf) = x509_parser::parse_x509_certificate(second.chain()[0].as_ref()).unwrap();
        let hex: String = leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!hex.is_empty());
        assert_eq!(summaries[0].serial, hex);
    }

    struct Switch {
        ca: LocalCa,
        up: std::sync::atomic::AtomicBool,
    }

    impl CertificateSource for Switch {
        fn fetch(
            &self,
            id: &SpiffeId,
        ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + '_>>
        {
            let res = if self.up.load(Ordering::SeqCst) {
                Ok(self.ca.issue(id, Duration::from_secs(2)).unwrap())
            } else {
                Err(CertError::Ca {
                    id: id.to_string(),
                    reason: "unreachable".into(),
                })
            };
            Box::pin(async move { res })
        }
    }

    #[tokio::test]
    async fn an_expired_certificate_is_an_error_until_the_ca_answers_again() {
        let src = Arc::new(Switch {
            ca: LocalCa::generate("t").unwrap(),
            up: true.into(),
        });
        let store = CertStore::new(src.clone());
        let id = SpiffeId::new("cluster.local", "ns", "a").unwrap();
        let first = store.get(&id).await.unwrap();
        // Back-dated by a minute, yet refreshed half way through what was left on arrival.
        let left = first.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(first.refresh_at() > SystemTime::now() + left / 4);
        src.up.store(false, Ordering::SeqCst);
        // Past half life the CA is away: the old certificate is still served...
        tokio::time::sleep(left / 2 + Duration::from_millis(300)).await;
        assert_eq!(store.get(&id).await.unwrap().chain(), first.chain());
        // ...until it expires: then a clear error, never the expired certificate.
        tokio::time::sleep(left / 2 + Duration::from_millis(200)).await;
        let err = store.get(&id).await.unwrap_err();
        assert!(matches!(err, CertError::Expired(_)), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
        // The CA returns: the retries (at most a second apart for this lifetime) recover.
        src.up.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let renewed = loop {
            if let Ok(c) = store.get(&id).await {
                break c;
            }
            assert!(tokio::time::Instant::now() < deadline, "never renewed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_ne!(renewed.chain(), first.chain());
    }
}
