//! The waypoint's upstream side: the endpoints of a bound service port, load balancing (round
//! robin, or least-request by power of two choices), and connections to the chosen pod — a new
//! HBONE tunnel through the shared pool, under the waypoint's own identity and verifying the
//! destination's, carrying HTTP/1.1 (a keep-alive pool per endpoint), HTTP/2 (one multiplexed
//! connection per endpoint) or raw bytes. A failed connect is retried on another endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use zmesh_core::certs::CertStore;
use zmesh_core::hbone::{H2Settings, HboneError, Pool, PoolKey, SourceInfo, Tunnel};
use zmesh_core::identity::SpiffeId;
use zmesh_core::state::{HealthStatus, Workload};

use crate::body::{CountedBody, ReqBody};
use crate::bound::{Binding, Snapshot};
use zmesh_core::telemetry::WorkloadMeta;

/// How long a pooled HTTP/1.1 connection may take to become ready for its next request.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an HTTP/1.1 connection is kept for reuse.
const IDLE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// The request body sent upstream: the client's (streamed, or kept for retries), counted.
pub type UpBody = CountedBody<ReqBody>;

/// How an endpoint is chosen among a service port's healthy endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbPolicy {
    /// In turn, per service port.
    #[default]
    RoundRobin,
    /// Of two endpoints picked at random, the one with fewer requests in flight (P2C).
    LeastRequest,
}

impl std::str::FromStr for LbPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "ROUND_ROBIN" => Ok(LbPolicy::RoundRobin),
            "least-request" | "LEAST_REQUEST" => Ok(LbPolicy::LeastRequest),
            _ => Err(format!(
                "{s:?} is not a load-balancing policy: use round-robin or least-request"
            )),
        }
    }
}

/// One endpoint of a service port. Cheap to clone (shared parts).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// `podIP:targetPort`: the inner CONNECT authority.
    pub addr: SocketAddr,
    /// The identities the endpoint's HBONE server may present.
    pub identities: Arc<[SpiffeId]>,
    /// Its `destination_*` label values (the principal: the workload's own identity, or
    /// `unknown`), made once with the endpoints.
    pub meta: Arc<WorkloadMeta>,
}

/// The healthy endpoints of `binding` (in config order), with the target port resolved: the
/// bound port's `targetPort`, else the workload's own mapping for the service port; each may
/// present its workload's identity or one of the service's `subjectAltNames`. Built once per
/// snapshot and service port (memoised in the snapshot: parsing identities per request cost
/// more than the rest of the endpoint choice).
pub fn endpoints(snap: &Snapshot, binding: &Binding) -> Arc<[Endpoint]> {
    let memo_key = (
        binding.key.clone(),
        binding.port.port,
        binding.port.target_port,
    );
    if let Some(eps) = snap.endpoints_memo().get(&memo_key) {
        return eps.clone();
    }
    let eps = build_endpoints(snap, &memo_key.0, binding);
    snap.endpoints_memo().insert(memo_key, eps.clone());
    eps
}

fn build_endpoints(snap: &Snapshot, key: &str, binding: &Binding) -> Arc<[Endpoint]> {
    let sans: Vec<SpiffeId> = snap
        .state
        .service(key)
        .map(|s| {
            s.subject_alt_names
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    snap.state
        .endpoints(key)
        .iter()
        .filter(|w| w.status == HealthStatus::Healthy)
        .filter_map(|w| {
            let ip = *w.workload_ips.first()?;
            let port = match binding.port.target_port {
                0 => *w.services.get(key)?.get(&binding.port.port)?,
                p => p,
            };
            let port = if port == 0 { binding.port.port } else { port };
            // The workload's identity, or one of the service's SANs (as ztunnel accepts).
            let own = w.identity().ok();
            let identities: Arc<[SpiffeId]> = own.into_iter().chain(sans.iter().cloned()).collect();
            Some(Endpoint {
                identities,
                meta: Arc::new(WorkloadMeta::from_workload(w)),
                workload: w.clone(),
                addr: SocketAddr::new(ip, port),
            })
        })
        .collect()
}

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("service {0} has no healthy endpoint (check its pods and their readiness)")]
    NoEndpoints(String),
    #[error("no certificate for the waypoint's identity: {0}")]
    Certificate(#[from] zmesh_core::certs::CertError),
    #[error("HBONE to {0} failed: {1}")]
    Hbone(SocketAddr, HboneError),
    #[error("HTTP handshake with {0} (inside the tunnel) failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("every endpoint failed; last: {0}")]
    AllFailed(Box<UpstreamError>),
}

/// Per-endpoint connections (of one worker), and the endpoint's requests in flight (the
/// waypoint's count, from [`Balance`]: a request counts itself without the shared lock).
struct EndpointConns {
    h1_idle: Mutex<Vec<(http1::SendRequest<UpBody>, std::time::Instant)>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
    in_flight: Arc<AtomicUsize>,
}

/// A round-robin turn's key: the service's key and port.
type TurnKey = (Arc<str>, u16);

/// The load balancer's state, shared by every worker's [`Upstreams`]: one round-robin turn
/// per service port and one count of requests in flight per endpoint for the whole waypoint,
/// so workers neither start their turns on the same endpoint nor see only their own load.
/// Each worker keeps the counters it has used in maps of its own, so a request takes only its
/// worker's lock and counts with an atomic.
#[derive(Default)]
pub struct Balance {
    rr: Mutex<HashMap<TurnKey, Arc<AtomicUsize>>>,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// The waypoint's counter for `key` in `map`, made on first use.
fn shared_counter<K: Eq + std::hash::Hash>(
    map: &Mutex<HashMap<K, Arc<AtomicUsize>>>,
    key: K,
) -> Arc<AtomicUsize> {
    map.lock()
        .expect("balance lock")
        .entry(key)
        .or_default()
        .clone()
}

/// Counts a request against its endpoint until dropped (least-request).
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/1.1 connection checked out for one request; give it back with
/// [`Upstreams::give_back`] once the response body ended.
pub struct H1Checkout {
    pub sender: http1::SendRequest<UpBody>,
    pub addr: SocketAddr,
}

/// A sender for one request.
pub enum Sender {
    Http1(H1Checkout),
    Http2(http2::SendRequest<UpBody>),
}

/// The upstream side of one worker runtime, shared by the connections it serves.
pub struct Upstreams {
    pool: Arc<Pool>,
    certs: Arc<CertStore>,
    identity: SpiffeId,
    h2: H2Settings,
    lb: LbPolicy,
    /// What the waypoint says about itself on its CONNECTs (`baggage`).
    me: SourceInfo,
    hbone_port: u16,
    conns: Mutex<HashMap<SocketAddr, Arc<EndpointConns>>>,
    /// This worker's handles on the waypoint's round-robin turns ([`Balance::rr`]).
    rr: Mutex<HashMap<TurnKey, Arc<AtomicUsize>>>,
    balance: Arc<Balance>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("identity", &self.identity)
            .field("lb", &self.lb)
            .finish_non_exhaustive()
    }
}

impl Upstreams {
    /// `hbone_port`: where endpoints' node tunnels accept HBONE (15008); `balance`: shared by
    /// the waypoint's workers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: Arc<Pool>,
        certs: Arc<CertStore>,
        identity: SpiffeId,
        h2: H2Settings,
        lb: LbPolicy,
        me: SourceInfo,
        hbone_port: u16,
        balance: Arc<Balance>,
    ) -> Upstreams {
        Upstreams {
            pool,
            certs,
            identity,
            h2,
            lb,
            me,
            hbone_port,
            conns: Mutex::default(),
            rr: Mutex::default(),
            balance,
        }
    }

    fn conns(&self, addr: SocketAddr) -> Arc<EndpointConns> {
        self.conns
            .lock()
            .expect("conns lock")
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointConns {
                    h1_idle: Mutex::default(),
                    h2: Mutex::default(),
                    in_flight: shared_counter(&self.balance.in_flight, addr),
                })
            })
            .clone()
    }

    /// The endpoints in the order to try them: the load balancer's pick first, then the
    /// others (each tried at most once when connects fail). Borrowed: a request clones only
    /// the endpoint it uses.
    pub fn order<'e>(
        &self,
        binding: &Binding,
        eps: &'e [Endpoint],
    ) -> impl Iterator<Item = &'e Endpoint> + use<'e> {
        let n = eps.len();
        let first = match self.lb {
            _ if n < 2 => 0,
            LbPolicy::RoundRobin => {
                let mut rr = self.rr.lock().expect("rr lock");
                let turn = rr
                    .entry((binding.key.clone(), binding.port.port))
                    .or_insert_with_key(|k| shared_counter(&self.balance.rr, k.clone()));
                turn.fetch_add(1, Ordering::Relaxed) % n
            }
            LbPolicy::LeastRequest => {
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let load = |i: usize| self.conns(eps[i].addr).in_flight.load(Ordering::Acquire);
                if load(b) < load(a) { b } else { a }
            }
        };
        (0..n).map(move |i| &eps[(first + i) % n])
    }

    /// Counts a request on `addr` until the guard is dropped.
    pub fn begin(&self, addr: SocketAddr) -> InFlight {
        let c = self.conns(addr).in_flight.clone();
        c.fetch_add(1, Ordering::AcqRel);
        InFlight(c)
    }

    /// Opens a tunnel to `ep` (a new HBONE stream to `podIP:15008`, `:authority` =
    /// `podIP:targetPort`), under the waypoint's identity.
    pub async fn tunnel(
        &self,
        ep: &Endpoint,
        client: Option<SocketAddr>,
        host: &str,
    ) -> Result<(Tunnel, zmesh_core::hbone::StreamGuard), UpstreamError> {
        let cert = self.certs.get(&self.identity).await?;
        let key = PoolKey::new(
            self.identity.clone(),
            ep.identities.to_vec(),
            SocketAddr::new(ep.addr.ip(), self.hbone_port),
            None,
        );
        let mut src = self.me.clone();
        src.addr = client;
        src.service_host = Some(host.to_owned());
        self.pool
            .connect(key, &cert, ep.addr, &src)
            .await
            .map_err(|e| UpstreamError::Hbone(ep.addr, e))
    }

    /// A sender to `ep` for `h2` or HTTP/1.1: a pooled connection when one is ready, else a
    /// new tunnel and handshake.
    pub async fn sender(
        &self,
        ep: &Endpoint,
        h2: bool,
        client: Option<SocketAddr>,
        host: &str,
    ) -> Result<Sender, UpstreamError> {
        let conns = self.conns(ep.addr);
        if h2 {
            if let Some(s) = conns.h2.lock().expect("h2 lock").as_ref()
                && !s.is_closed()
            {
                return Ok(Sender::Http2(s.clone()));
            }
        } else {
            // Connections are put back as soon as their response ended; one becomes ready
            // once its connection task has seen that end (promptly), or fails if it closed
            // meanwhile.
            loop {
                let idle = conns.h1_idle.lock().expect("h1 lock").pop();
                let Some((mut s, since)) = idle else { break };
                if s.is_closed() || since.elapsed() > IDLE_TTL {
                    continue;
                }
                if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, s.ready()).await {
                    return Ok(Sender::Http1(H1Checkout {
                        sender: s,
                        addr: ep.addr,
                    }));
                }
            }
        }
        // Boxed: a new connection (certificate, HBONE tunnel, TLS and HTTP handshakes) is the
        // rare path. Inlined, its state would size every request's future, and a future is
        // copied whole each time it moves (debug build: the send future went 4.9 -> 2.9 KiB).
        Box::pin(self.connect(ep, h2, client, host, &conns)).await
    }

    /// A new connection to `ep`: an HBONE tunnel, then the HTTP/2 or HTTP/1.1 handshake.
    async fn connect(
        &self,
        ep: &Endpoint,
        h2: bool,
        client: Option<SocketAddr>,
        host: &str,
        conns: &EndpointConns,
    ) -> Result<Sender, UpstreamError> {
        let (tunnel, guard) = self.tunnel(ep, client, host).await?;
        if h2 {
            let (sender, conn) = self
                .h2
                .client()
                .handshake(TokioIo::new(tunnel))
                .await
                .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            *conns.h2.lock().expect("h2 lock") = Some(sender.clone());
            return Ok(Sender::Http2(sender));
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tunnel))
            .await
            .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Sender::Http1(H1Checkout {
            sender,
            addr: ep.addr,
        }))
    }

    /// Puts an HTTP/1.1 connection back in its endpoint's keep-alive pool (its response
    /// ended, so it can take another request once its connection task catches up).
    pub fn give_back(&self, c: H1Checkout) {
        if c.sender.is_closed() {
            return;
        }
        let conns = self.conns(c.addr);
        // One clock read for the whole list (not one per idle connection: the pool holds as
        // many as there are client connections, and this runs for every request).
        let now = std::time::Instant::now();
        let mut idle = conns.h1_idle.lock().expect("h1 lock");
        // Unused ones are closed after a while (dropping the sender ends the connection and
        // its tunnel), and only so many are kept.
        idle.retain(|(s, since)| {
            !s.is_closed() && now.saturating_duration_since(*since) <= IDLE_TTL
        });
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push((c.sender, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_names() {
        assert_eq!("round-robin".parse(), Ok(LbPolicy::RoundRobin));
        assert_eq!("LEAST_REQUEST".parse(), Ok(LbPolicy::LeastRequest));
        let e = "random".parse::<LbPolicy>().unwrap_err();
        assert!(e.contains("round-robin or least-request"), "{e}");
    }
}
