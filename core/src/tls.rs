//! Workload certificates and the HBONE TLS configuration: TLS 1.3 only, AES-GCM suites,
//! ALPN `h2`, no SNI, mutual authentication by SPIFFE identity.
//!
//! HBONE connections resume TLS 1.3 sessions (RFC 8446 §2.2, PSK with (EC)DHE, no early
//! data). A resumed handshake proves that the peer holds the secret of an earlier session in
//! which it authenticated, and skips the certificates and both CertificateVerify signatures,
//! half of a full handshake's cryptography; it still runs X25519 for forward secrecy.
//!
//! Neither side takes the earlier session's word for the peer, though: rustls does not verify
//! a resumed peer's chain again, so both sides do, on the chain the session carries
//! ([`HboneClient::confirm`], [`WorkloadCertificate::client_peer`]), against today's roots,
//! time and expected identities, with the same verifiers and their memory of verified chains
//! (a lookup, no signature check). Each resumption brings a new ticket for the same chain, so
//! one authentication carries across a series of them, bounded by that check of the chain's
//! validity and by the stores' life.
//!
//! Only [`WorkloadCertificate::resuming_server_config`] keeps sessions, and only for clients
//! that ask for tickets (RFC 9149), as [`WorkloadCertificate::hbone_client`] does. A client
//! keeps one resuming configuration per set of identities it expects (rustls resumes a
//! session only with the verifier that verified it) and its tickets per server address and
//! configuration, so a ticket is only ever offered where the same expectation holds. Both
//! stores live with one [`WorkloadCertificate`]: a renewed certificate or new roots start
//! without sessions.

mod ca;
mod hkdf;
mod verified;
mod verify;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{
    ClientSessionMemoryCache, ResolvesClientCert, Resumption, TicketRequest, Tls12Resumption,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::SpiffeId;

pub use ca::{LocalCa, ServerCertificate};
use verified::VerifiedChains;
pub use verify::{
    IdentityMismatch, IdentityServerVerifier, TrustDomainClientVerifier, connection_peer,
    peer_identity, uri_sans,
};

/// ALPN protocol spoken inside HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Sessions a workload certificate's server side keeps for clients to resume (rustls's
/// default size). Each is single-use, a few hundred bytes plus the client's chain; the oldest
/// goes first.
const SERVER_SESSIONS: usize = 256;

/// Server addresses (each with one set of expected identities) a workload certificate's
/// client side keeps tickets for, up to rustls's 8 each; the oldest goes first. (rustls's
/// cache is sized in tickets: `CLIENT_SESSION_PEERS * 8`.)
const CLIENT_SESSION_PEERS: usize = 128;

/// Sets of expected server identities a workload certificate keeps a resuming client
/// configuration for (rustls resumes a session only with the verifier and certificate
/// resolver that made it, so they must outlive a connection). Past this, one is dropped, and
/// its tickets can no longer be used.
const CLIENT_CONFIGS: usize = 1024;

/// Tickets a server sends after each handshake: one replaces the one a resumption used.
const TICKETS_PER_HANDSHAKE: usize = 1;

/// What went wrong with certificates or TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM or holds no {expected}")]
    Pem {
        what: &'static str,
        expected: &'static str,
    },
    #[error(
        "the CA private key does not match the CA certificate, or its type is not supported \
         (supported: ECDSA P-256/P-384 and RSA, as PKCS#8, PKCS#1 or SEC1 PEM)"
    )]
    CaKeyMismatch,
    #[error("the CA certificate is not a CA (basic constraints cA=false or missing)")]
    NotACa,
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate carries no SPIFFE URI SAN")]
    NoIdentity,
}

/// The crypto provider used everywhere in zmesh: aws-lc-rs, restricted to TLS 1.3 AES-GCM suites
/// (FIPS-approved algorithms, as upstream ztunnel restricts them; zmesh does not build
/// aws-lc-rs's FIPS module, and rustls reports these suites as not FIPS: see `tls/hkdf.rs`).
///
/// AES-128-GCM with SHA-256 comes first, so it is what a zmesh client asks for (a server
/// follows its client's order, ours as rustls's). This provider is also the process default
/// ([`install_default_provider`]), so the xDS, CA and Kubernetes API connections prefer it
/// too. The connection's security level is set by
/// its 128-bit parts, the P-256 certificates and X25519, so AES-256 would not raise it, while
/// SHA-256 runs on the CPU's SHA instructions where SHA-384 has none: a resumed handshake costs
/// a third less (`core/benches/handshake.rs`). BoringSSL (Envoy, so Istio's sidecars) and Go
/// order it first too; upstream ztunnel keeps rustls's order, AES-256 first, and our server
/// gives its clients that suite.
///
/// Both suites derive their keys with an HKDF computed from HMAC keys set up once per secret
/// (`tls/hkdf.rs`), where rustls's aws-lc-rs suites extract each secret again for every label
/// they expand from it: the same bytes at less cost.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = vec![
                hkdf::with_hmac_hkdf(
                    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ),
                hkdf::with_hmac_hkdf(
                    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ),
            ];
            Arc::new(p)
        })
        .clone()
}

/// Installs zmesh's provider as the process default. Call once at start of every binary.
pub fn install_default_provider() {
    // An error only means a default is already installed (e.g. by a test); nothing to do then.
    let _ = CryptoProvider::install_default(provider().as_ref().clone());
}

/// A workload's certificate chain and key, with the roots it trusts.
#[derive(Clone)]
pub struct WorkloadCertificate {
    identity: SpiffeId,
    certified: Arc<CertifiedKey>,
    /// Shared: the store hands out a clone of this struct on every connection.
    root_ders: Arc<[CertificateDer<'static>]>,
    not_before: SystemTime,
    /// When this process built it from the CA's answer.
    received: SystemTime,
    not_after: SystemTime,
    /// The TLS side, behind one pointer: a clone is made per connection, and callers' futures
    /// hold one across awaits.
    tls: Arc<TlsState>,
}

/// A [`WorkloadCertificate`]'s configurations and what they remember.
struct TlsState {
    roots: Arc<RootCertStore>,
    /// Full handshakes only.
    server_config: Arc<ServerConfig>,
    /// Also resumes sessions (see the module's text): only with `client_peer`'s check.
    resuming_server_config: Arc<ServerConfig>,
    /// The server side's verifier of clients, kept to check a resumed client again.
    client_verifier: Arc<TrustDomainClientVerifier>,
    /// Peer chains verified against `roots`: servers' by this certificate's client side,
    /// clients' by its server side (two key usages, so two caches).
    server_chains: Arc<VerifiedChains>,
    client_chains: Arc<VerifiedChains>,
    /// The client side's session tickets, keyed by [`Resuming::name`].
    sessions: Arc<ClientSessionMemoryCache>,
    /// The client side's resuming configurations, by the identities they expect.
    resuming: Mutex<ResumingConfigs>,
    /// Presents `certified` to servers; one for every configuration (see `resuming`).
    client_cert: Arc<dyn ResolvesClientCert>,
}

/// A client configuration that resumes sessions, and its verifier (to check a resumed
/// server again).
#[derive(Clone)]
struct Resuming {
    config: Arc<ClientConfig>,
    verifier: Arc<IdentityServerVerifier>,
    /// Never reused within one certificate: names this configuration's tickets.
    serial: u64,
}

impl Resuming {
    /// The name its tickets for `peer` are kept under (never sent: HBONE has no SNI), so a
    /// ticket is only offered to the server it came from under the expectation it was
    /// verified against: `<address family><address in hex>-<port>.<serial>.hbone`.
    fn name(&self, peer: SocketAddr) -> ServerName<'static> {
        let (family, bits) = match peer.ip() {
            std::net::IpAddr::V4(a) => (4, u128::from(u32::from(a))),
            std::net::IpAddr::V6(a) => (6, u128::from(a)),
        };
        let name = format!("{family}{bits:x}-{}.{}.hbone", peer.port(), self.serial);
        ServerName::try_from(name).expect("hex digits, digits and dots make a DNS name")
    }
}

/// The resuming configurations, and the next serial.
#[derive(Default)]
struct ResumingConfigs {
    by_ids: HashMap<Vec<SpiffeId>, Resuming>,
    made: u64,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCertificate {
    /// Assembles a certificate from a chain (leaf first), its key and the trusted roots.
    /// The leaf's first SPIFFE URI SAN is the identity.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        root_ders: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoIdentity)?;
        let identity = uri_sans(leaf)?
            .into_iter()
            .find_map(|u| u.parse::<SpiffeId>().ok())
            .ok_or(TlsError::NoIdentity)?;
        let (not_before, not_after) = validity(leaf)?;
        let mut roots = RootCertStore::empty();
        for r in &root_ders {
            roots.add(r.clone())?;
        }
        let roots = Arc::new(roots);
        let signing = provider().key_provider.load_private_key(key)?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        let client_chains = Arc::<VerifiedChains>::default();
        let client_verifier = Arc::new(TrustDomainClientVerifier::sharing(
            roots.clone(),
            client_chains.clone(),
            identity.trust_domain().to_owned(),
        )?);
        let resuming_server_config =
            server_config(certified.clone(), client_verifier.clone(), true)?;
        let server_config = server_config(certified.clone(), client_verifier.clone(), false)?;
        let client_cert: Arc<dyn ResolvesClientCert> = Arc::new(FixedCert(certified.clone()));
        Ok(WorkloadCertificate {
            identity,
            certified,
            root_ders: root_ders.into(),
            not_before,
            not_after,
            received: SystemTime::now(),
            tls: Arc::new(TlsState {
                roots,
                server_config,
                resuming_server_config,
                client_verifier,
                server_chains: Arc::default(),
                client_chains,
                sessions: Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSION_PEERS * 8)),
                resuming: Mutex::default(),
                client_cert,
            }),
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number in lower-case hex (empty if the leaf cannot be read, which
    /// [`WorkloadCertificate::new`] already refused).
    pub fn serial_hex(&self) -> String {
        self.certified
            .cert
            .first()
            .and_then(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
            .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default()
    }

    /// The leaf and intermediates, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.root_ders
    }

    /// The instant at which a refresh is due: half way through the validity that was left
    /// when it arrived. CAs back-date `not_before` (ours by a minute, for clock skew), so half
    /// of the nominal period could already be over on arrival for a short lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received);
        let life = self
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        start + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// How many peer chains this certificate's verifiers remember as verified: servers'
    /// (its client side) and clients' (its server side).
    pub fn remembered_chains(&self) -> (usize, usize) {
        (self.tls.server_chains.len(), self.tls.client_chains.len())
    }

    /// The SPIFFE identity of a TLS connection's client, the same as [`connection_peer`]
    /// answers for any connection. For a connection accepted with this certificate's
    /// [`server_config`] it is found without parsing a certificate: its verifier remembered
    /// the chain (see `verified.rs`). Otherwise (a chain not remembered, or another
    /// configuration's connection) the leaf is read.
    ///
    /// A resumed session's client chain is verified again first, as a full handshake would
    /// (roots, validity now, trust domain); an error means the connection must be refused.
    ///
    /// [`server_config`]: WorkloadCertificate::server_config
    pub fn client_peer(
        &self,
        conn: &rustls::CommonState,
    ) -> Result<Option<SpiffeId>, rustls::Error> {
        let chain = conn.peer_certificates().and_then(|c| c.split_first());
        if needs_check(conn) {
            // Verified again; the verifier answers with the peer it found.
            let (leaf, intermediates) = chain.ok_or(rustls::Error::NoCertificatesPresented)?;
            let peer =
                self.tls
                    .client_verifier
                    .verified_peer(leaf, intermediates, UnixTime::now())?;
            return Ok(peer.ids.first().cloned());
        }
        let Some((leaf, intermediates)) = chain else {
            return Ok(None);
        };
        Ok(
            match self.tls.client_chains.remembered(leaf, intermediates) {
                Some(peer) => peer.ids.first().cloned(),
                None => peer_identity(leaf),
            },
        )
    }

    /// Server side of HBONE: requires a client certificate of the same trust domain. Every
    /// handshake is a full one.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.tls.server_config.clone()
    }

    /// The same, resuming the sessions of clients that ask for tickets (RFC 9149, as
    /// [`WorkloadCertificate::hbone_client`] does). rustls does not verify a resumed client's
    /// chain again: every connection accepted with this configuration must have its client
    /// read with [`WorkloadCertificate::client_peer`], which does, and be refused when that
    /// fails. `serve::hbone_tls_accept` does both.
    pub fn resuming_server_config(&self) -> Arc<ServerConfig> {
        self.tls.resuming_server_config.clone()
    }

    /// Client side of HBONE: accepts only a peer presenting one of `allowed` identities.
    /// Every handshake is a full one; [`WorkloadCertificate::hbone_client`] resumes.
    pub fn client_config(&self, allowed: Vec<SpiffeId>) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(IdentityServerVerifier::sharing(
            self.tls.roots.clone(),
            self.tls.server_chains.clone(),
            allowed,
        ));
        Ok(Arc::new(
            self.client_config_with(verifier, Resumption::disabled())?,
        ))
    }

    /// The client side of an HBONE connection to `peer`, which must present one of `allowed`
    /// identities: a configuration that resumes this certificate's sessions with that
    /// server under that same expectation, the name to connect with (never sent: HBONE has
    /// no SNI; it keys the tickets), and [`HboneClient::confirm`] for after the handshake.
    /// The configuration is made once per set of identities and kept: rustls resumes a
    /// session only with the verifier that verified it.
    pub fn hbone_client(
        &self,
        peer: SocketAddr,
        allowed: &[SpiffeId],
    ) -> Result<HboneClient, TlsError> {
        let known = self
            .tls
            .resuming
            .lock()
            .expect("resuming configurations")
            .by_ids
            .get(allowed)
            .cloned();
        let resuming = match known {
            Some(r) => r,
            None => {
                let verifier = Arc::new(IdentityServerVerifier::sharing(
                    self.tls.roots.clone(),
                    self.tls.server_chains.clone(),
                    allowed.to_vec(),
                ));
                let resumption = Resumption::store(self.tls.sessions.clone())
                    .tls12_resumption(Tls12Resumption::Disabled);
                let mut config = self.client_config_with(verifier.clone(), resumption)?;
                // Asks for the one ticket that replaces the one a resumption uses (RFC 9149):
                // our servers send tickets only to clients that ask.
                config.send_ticket_request = Some(TicketRequest {
                    new_session_count: 1,
                    resumption_count: 1,
                });
                let mut all = self.tls.resuming.lock().expect("resuming configurations");
                let made = Resuming {
                    config: Arc::new(config),
                    verifier,
                    serial: all.made,
                };
                all.made += 1;
                if all.by_ids.len() >= CLIENT_CONFIGS && !all.by_ids.contains_key(allowed) {
                    let any = all.by_ids.keys().next().cloned().expect("the map is full");
                    all.by_ids.remove(&any);
                }
                all.by_ids.entry(allowed.to_vec()).or_insert(made).clone()
            }
        };
        Ok(HboneClient {
            name: resuming.name(peer),
            config: resuming.config,
            verifier: resuming.verifier,
        })
    }

    fn client_config_with(
        &self,
        verifier: Arc<IdentityServerVerifier>,
        resumption: Resumption,
    ) -> Result<ClientConfig, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.tls.client_cert.clone());
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.enable_sni = false;
        cfg.resumption = resumption;
        Ok(cfg)
    }
}

/// The client side of one HBONE connection (see [`WorkloadCertificate::hbone_client`]).
pub struct HboneClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    verifier: Arc<IdentityServerVerifier>,
}

impl HboneClient {
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The name to connect with: it keys the session tickets and is never sent.
    pub fn server_name(&self) -> ServerName<'static> {
        self.name.clone()
    }

    /// After the handshake: a resumed session's server chain is verified again, as a full
    /// handshake would (roots, validity now, one of the expected identities). An error
    /// means the connection must not be used. [`HboneClient::connect`] does this.
    pub fn confirm(&self, conn: &rustls::CommonState) -> Result<(), rustls::Error> {
        if !needs_check(conn) {
            return Ok(());
        }
        let (leaf, intermediates) = conn
            .peer_certificates()
            .and_then(|c| c.split_first())
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier
            .verify_server_cert(leaf, intermediates, &self.name, &[], UnixTime::now())
            .map(|_| ())
    }

    /// The TLS handshake on `io`, then [`HboneClient::confirm`]: the way to use this client.
    pub async fn connect<IO>(self, io: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), io)
            .await?;
        self.confirm(tls.get_ref().1).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the resumed session's server certificate no longer verifies: {e}"),
            )
        })?;
        Ok(tls)
    }
}

/// Whether a finished handshake's peer must be verified again: anything but a full handshake
/// (in which rustls's verifiers saw the chain) is.
fn needs_check(conn: &rustls::CommonState) -> bool {
    match conn.handshake_kind() {
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest) => false,
        Some(HandshakeKind::Resumed) | None => true,
    }
}

fn server_config(
    certified: Arc<CertifiedKey>,
    verifier: Arc<TrustDomainClientVerifier>,
    resuming: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(certified)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    if resuming {
        // Sessions stay in this process (stateful tickets: the ticket is an id), single-use,
        // and only for clients that ask for tickets (RFC 9149 `ticket_request`, at most one
        // per handshake), so a client that never resumes (upstream ztunnel's) costs none.
        cfg.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
        cfg.send_tls13_tickets = 0;
        cfg.max_tls13_tickets = TICKETS_PER_HANDSHAKE;
    } else {
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
    }
    Ok(Arc::new(cfg))
}

/// Always presents the same certificate, whatever the peer asks for.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let to_sys = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((
        to_sys(cert.validity().not_before),
        to_sys(cert.validity().not_after),
    ))
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            what,
            expected: "CERTIFICATE",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    use super::{LocalCa, WorkloadCertificate};
    use crate::identity::SpiffeId;

    /// Moves what `from` has to send into `to`, as a socket would.
    pub(crate) fn transfer<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
    ) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    const PEER: &str = "10.0.0.2:15008";

    /// Both sides of a handshake over memory, to the end of both (a ticket included).
    fn handshake(
        client: std::sync::Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        server: std::sync::Arc<rustls::ServerConfig>,
    ) -> (ClientConnection, ServerConnection) {
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            transfer(&mut c, &mut s);
            transfer(&mut s, &mut c);
        }
        (c, s)
    }

    fn pair() -> (WorkloadCertificate, WorkloadCertificate) {
        crate::tls::install_default_provider();
        let ca = LocalCa::generate("test").unwrap();
        let day = Duration::from_secs(86_400);
        (
            ca.issue(&id("client"), day).unwrap(),
            ca.issue(&id("server"), day).unwrap(),
        )
    }

    /// The resuming server sends a ticket only to a client that asks for one (RFC 9149), as
    /// the pool's client does; a client that does not (upstream ztunnel's, which never
    /// resumes, or `client_config`'s) costs it no ticket and no stored session.
    #[test]
    fn tickets_go_only_to_clients_that_ask() {
        let (client, server) = pair();
        let peer: SocketAddr = PEER.parse().unwrap();
        let plain = client.client_config(vec![id("server")]).unwrap();
        let name = ServerName::IpAddress(peer.ip().into());
        let (c, _) = handshake(plain, name, server.resuming_server_config());
        assert_eq!(c.tls13_tickets_received(), 0);

        let hbone = client.hbone_client(peer, &[id("server")]).unwrap();
        for kind in [HandshakeKind::Full, HandshakeKind::Resumed] {
            let (c, s) = handshake(
                hbone.config(),
                hbone.server_name(),
                server.resuming_server_config(),
            );
            assert_eq!(c.handshake_kind(), Some(kind));
            assert_eq!(
                c.tls13_tickets_received(),
                1,
                "one ticket replaces the one used"
            );
            hbone.confirm(&c).unwrap();
            assert_eq!(server.client_peer(&s).unwrap(), Some(id("client")));
        }
    }

    /// Application data both ways over a finished handshake: the traffic keys agree.
    fn echo(c: &mut ClientConnection, s: &mut ServerConnection) {
        use std::io::{Read, Write};
        c.writer().write_all(b"ping").unwrap();
        transfer(c, s);
        let mut got = [0u8; 4];
        s.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        s.writer().write_all(b"pong").unwrap();
        transfer(s, c);
        c.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }

    /// Our suites derive keys through their own HKDF (`tls/hkdf.rs`); a peer on rustls's
    /// stock aws-lc-rs suites (upstream ztunnel's) must not see a difference. For each suite,
    /// forced by the stock side: our resuming client against a stock server that keeps
    /// sessions, and a stock client that asks for tickets against our resuming server, each a
    /// full handshake then a resumed one; data flows both ways after each, and our side of
    /// each connection ran our HKDF, not the stock one.
    #[test]
    fn handshakes_with_rustls_stock_suites_both_ways() {
        use rustls::crypto::aws_lc_rs::cipher_suite as stock_suites;
        let (client, server) = pair();
        for suite in [
            stock_suites::TLS13_AES_128_GCM_SHA256,
            stock_suites::TLS13_AES_256_GCM_SHA384,
        ] {
            let mut stock = rustls::crypto::aws_lc_rs::default_provider();
            stock.cipher_suites = vec![suite];
            let stock = std::sync::Arc::new(stock);

            let mut stock_server = rustls::ServerConfig::builder_with_provider(stock.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(server.tls.client_verifier.clone())
                .with_cert_resolver(std::sync::Arc::new(super::FixedCert(
                    server.certified.clone(),
                )));
            stock_server.alpn_protocols = vec![super::ALPN_H2.to_vec()];
            stock_server.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
            let stock_server = std::sync::Arc::new(stock_server);
            // Tickets are kept by server address: one per suite, so each starts without one.
            let peer: SocketAddr = if suite == stock_suites::TLS13_AES_128_GCM_SHA256 {
                "10.0.0.2:15008".parse().unwrap()
            } else {
                "10.0.0.3:15008".parse().unwrap()
            };
            let hbone = client.hbone_client(peer, &[id("server")]).unwrap();
            // Which HKDF a connection's suite derives its keys with.
            let hkdf_of = |s: rustls::SupportedCipherSuite| {
                s.tls13().unwrap().hkdf_provider as *const dyn rustls::crypto::tls13::Hkdf
            };
            let ours = |negotiated: Option<rustls::SupportedCipherSuite>| {
                !std::ptr::addr_eq(hkdf_of(negotiated.unwrap()), hkdf_of(suite))
            };
            for kind in [HandshakeKind::Full, HandshakeKind::Resumed] {
                let (mut c, mut s) =
                    handshake(hbone.config(), hbone.server_name(), stock_server.clone());
                assert_eq!(c.handshake_kind(), Some(kind), "{suite:?}");
                assert_eq!(c.negotiated_cipher_suite(), Some(suite));
                assert!(ours(c.negotiated_cipher_suite()), "our client, {kind:?}");
                assert!(!ours(s.negotiated_cipher_suite()), "the stock server");
                hbone.confirm(&c).unwrap();
                echo(&mut c, &mut s);
            }

            let mut stock_client = rustls::ClientConfig::builder_with_provider(stock)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(
                    super::IdentityServerVerifier::sharing(
                        client.tls.roots.clone(),
                        client.tls.server_chains.clone(),
                        vec![id("server")],
                    ),
                ))
                .with_client_cert_resolver(client.tls.client_cert.clone());
            stock_client.alpn_protocols = vec![super::ALPN_H2.to_vec()];
            stock_client.send_ticket_request = Some(rustls::client::TicketRequest {
                new_session_count: 1,
                resumption_count: 1,
            });
            let stock_client = std::sync::Arc::new(stock_client);
            let name = ServerName::IpAddress(peer.ip().into());
            for kind in [HandshakeKind::Full, HandshakeKind::Resumed] {
                let (mut c, mut s) = handshake(
                    stock_client.clone(),
                    name.clone(),
                    server.resuming_server_config(),
                );
                assert_eq!(c.handshake_kind(), Some(kind), "{suite:?}");
                assert_eq!(s.negotiated_cipher_suite(), Some(suite));
                assert!(ours(s.negotiated_cipher_suite()), "our server, {kind:?}");
                assert!(!ours(c.negotiated_cipher_suite()), "the stock client");
                assert_eq!(server.client_peer(&s).unwrap(), Some(id("client")));
                echo(&mut c, &mut s);
            }
        }
    }

    /// A server that sends tickets but forgets its sessions (rustls's defaults in a server
    /// configuration made per connection, as upstream ztunnel may make them) cannot resume:
    /// the pool's client offers its ticket in vain and gets a full handshake, with the server
    /// verified as always. `server_config` never resumes either.
    #[test]
    fn a_server_that_keeps_no_session_gets_a_full_handshake() {
        let (client, server) = pair();
        let peer: SocketAddr = PEER.parse().unwrap();
        let hbone = client.hbone_client(peer, &[id("server")]).unwrap();
        let forgetful = || {
            let mut cfg = (*server.server_config()).clone();
            cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(256);
            cfg.send_tls13_tickets = 2;
            std::sync::Arc::new(cfg)
        };
        for _ in 0..2 {
            let (c, s) = handshake(hbone.config(), hbone.server_name(), forgetful());
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(c.tls13_tickets_received(), 2);
            hbone.confirm(&c).unwrap();
            assert_eq!(server.client_peer(&s).unwrap(), Some(id("client")));
        }
        for _ in 0..2 {
            let (c, _) = handshake(hbone.config(), hbone.server_name(), server.server_config());
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(c.tls13_tickets_received(), 0);
        }
    }
}
