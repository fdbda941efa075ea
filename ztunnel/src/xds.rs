//! The delta ADS client: one `DeltaAggregatedResources` stream to the controller, subscribed
//! (wildcard) to `istio.workload.Address` and `istio.security.Authorization`.
//!
//! - On every (re)connect one request per type carries the node and, in
//!   `initial_resource_versions`, what the client already holds, so only changes are sent.
//! - Every response is ACKed, or NACKed with a message naming each bad resource and why,
//!   while the good resources of that response are applied. Removals are applied.
//! - A response that changes anything is published as one new `Arc<State>` into the
//!   `ArcSwap<State>` the data path reads; one that changes the AuthorizationPolicies also
//!   has the open inbound connections re-checked (see `proxy::policy`).
//! - Authorization resources become the state's policies (`Policy::from_proto`); one that
//!   does not convert is NACKed with its reason, its previous version (if any) staying.
//! - Ready once the first response of each type was applied: no connection is served before
//!   the policies are known.
//! - The stream is re-opened after any failure with exponential backoff (10 ms doubling to
//!   15 s, jittered, back to 10 ms after a stream that delivered config); the last good config
//!   keeps serving meanwhile. Repeated failures are logged at warn once, then rate-limited.

mod node;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::grpc::{self, AuthHeaders, GrpcError, Target};
use crate::state::Publisher;
pub use node::node;
use serde::Serialize;
use store::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use xds_proto::google::rpc::Status as RpcStatus;
use xds_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Largest response accepted (upstream ztunnel's limit).
const MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;
/// The types subscribed to, in the order the first requests are sent.
const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A failure that repeats with the same reason is logged at warn at most this often.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What the client needs: where the controller is, how to authenticate, who we are.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    pub target: Target,
    pub auth: AuthHeaders,
    pub node: Node,
}

/// Why a stream ended. Each says what went wrong, for the log and `/config_dump`.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("cannot open the delta ADS stream to {address}: {reason}")]
    Open { address: String, reason: String },
    #[error("the delta ADS stream to {address} failed: {reason}")]
    Stream { address: String, reason: String },
    #[error("the controller at {address} closed the delta ADS stream")]
    Closed { address: String },
}

/// A gRPC status with the chain of causes a transport error hides (TLS, DNS, refused).
fn describe(s: &Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let e_str = e.to_string();
        if !out.contains(&e_str) {
            out.push_str(": ");
            out.push_str(&e_str);
        }
        src = e.source();
    }
    out
}

/// Per type, what `/config_dump` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// `system_version_info` of the last ACKed response (the controller's generation).
    pub last_acked_version: String,
    pub last_acked_nonce: String,
    /// The last NACK sent: its nonce and message.
    pub last_nack: Option<(String, String)>,
    pub acks: u64,
    pub nacks: u64,
    /// Resources and removals received, over all streams.
    pub resources_received: u64,
    pub removals_received: u64,
}

/// The connection's state, as `/config_dump` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct XdsStatus {
    pub address: String,
    pub connected: bool,
    /// Streams opened so far.
    pub streams_opened: u64,
    /// Failed or ended streams (including failed attempts).
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Whether the first response of each type (Address and Authorization) was applied
    /// (readiness waits for it).
    pub first_config_applied: bool,
    /// New `State` snapshots published (one per response that changed something).
    pub state_updates: u64,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub types: BTreeMap<String, TypeStatus>,
}

/// A running client: its status and readiness. Cheap to clone.
#[derive(Clone)]
pub struct Xds {
    status: Arc<Mutex<XdsStatus>>,
    ready: watch::Receiver<bool>,
}

impl Xds {
    /// Starts the client; it runs until `stop` is cancelled and publishes through `publisher`.
    /// Fails only on a bad target (address, root certificate), before anything is dialled.
    pub fn start(
        cfg: XdsConfig,
        publisher: Publisher,
        stop: CancellationToken,
    ) -> Result<Xds, GrpcError> {
        let channel = grpc::channel(&cfg.target)?;
        let status = Arc::new(Mutex::new(XdsStatus {
            address: cfg.target.address.clone(),
            ..Default::default()
        }));
        let (ready_tx, ready) = watch::channel(false);
        let client = Client {
            rpc: AggregatedDiscoveryServiceClient::with_interceptor(channel, cfg.auth)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            address: cfg.target.address,
            node: cfg.node,
            store: Store::default(),
            publisher,
            status: status.clone(),
            ready: ready_tx,
            first_seen: HashSet::new(),
            conflicts: HashSet::new(),
        };
        tokio::spawn(client.run(stop));
        Ok(Xds { status, ready })
    }

    /// Whether the first response of each type has been applied.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the first response of each type is applied, at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn status(&self) -> XdsStatus {
        lock(&self.status).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Rpc = AggregatedDiscoveryServiceClient<InterceptedService<Channel, AuthHeaders>>;

struct Client {
    rpc: Rpc,
    address: String,
    node: Node,
    store: Store,
    publisher: Publisher,
    status: Arc<Mutex<XdsStatus>>,
    ready: watch::Sender<bool>,
    /// The types a response was applied for (ready once it holds all of `TYPES`).
    first_seen: HashSet<String>,
    /// IP/VIP conflicts already logged.
    conflicts: HashSet<String>,
}

/// 10 ms doubling to 15 s, each wait jittered by ±20%.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::random_range(0.8..1.2)).min(BACKOFF_MAX)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Logs a failure at warn when it is new, or when the same one has repeated for a while;
/// the retries in between go to debug.
#[derive(Default)]
struct FailureLog {
    last: Option<(String, Instant)>,
    suppressed: u64,
}

impl FailureLog {
    /// Returns whether this one was logged at warn.
    fn failed(&mut self, reason: &str, retry_in: Duration) -> bool {
        let now = Instant::now();
        let repeat = self
            .last
            .as_ref()
            .is_some_and(|(r, at)| r == reason && now.duration_since(*at) < REPEAT_LOG_INTERVAL);
        if repeat {
            self.suppressed += 1;
            tracing::debug!(error = reason, ?retry_in, "xDS: still failing");
            false
        } else {
            tracing::warn!(
                error = reason,
                ?retry_in,
                failed_retries_since_last_warning = self.suppressed,
                "xDS: no config from the controller; serving the last good config and retrying"
            );
            self.last = Some((reason.to_owned(), now));
            self.suppressed = 0;
            true
        }
    }

    fn recovered(&mut self) {
        if self.last.take().is_some() {
            tracing::info!("xDS: receiving config from the controller again");
        }
        self.suppressed = 0;
    }
}

impl Client {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut log = FailureLog::default();
        loop {
            let mut delivered = false;
            let err = tokio::select! {
                _ = stop.cancelled() => return,
                e = self.stream(&mut delivered, &mut log) => e,
            };
            if delivered {
                backoff.reset();
            }
            let wait = backoff.next();
            {
                let mut st = lock(&self.status);
                st.connected = false;
                st.failures += 1;
                st.last_error = Some(err.to_string());
                st.last_error_at = Some(
                    humantime_serde::re::humantime::format_rfc3339_seconds(SystemTime::now())
                        .to_string(),
                );
            }
            log.failed(&err.to_string(), wait);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One stream, from open to failure. `delivered` is set once a response was applied.
    async fn stream(&mut self, delivered: &mut bool, log: &mut FailureLog) -> XdsError {
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for type_url in TYPES {
            let req = DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.to_owned(),
                initial_resource_versions: self.store.versions(type_url),
                ..Default::default()
            };
            // The channel has room for both first requests; the receiver is alive.
            let _ = tx.try_send(req);
        }
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut responses = match self.rpc.delta_aggregated_resources(requests).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return XdsError::Open {
                    address: self.address.clone(),
                    reason: describe(&s),
                };
            }
        };
        {
            let mut st = lock(&self.status);
            st.connected = true;
            st.streams_opened += 1;
        }
        tracing::debug!(address = %self.address, "xDS stream open");
        loop {
            match responses.message().await {
                Ok(Some(resp)) => {
                    let ack = self.handle(resp);
                    if !*delivered {
                        *delivered = true;
                        log.recovered();
                    }
                    if tx.send(ack).await.is_err() {
                        return XdsError::Closed {
                            address: self.address.clone(),
                        };
                    }
                }
                Ok(None) => {
                    return XdsError::Closed {
                        address: self.address.clone(),
                    };
                }
                Err(s) => {
                    return XdsError::Stream {
                        address: self.address.clone(),
                        reason: describe(&s),
                    };
                }
            }
        }
    }

    /// Applies one response and returns its ACK or NACK.
    fn handle(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            nonce,
            removed_resources,
            ..
        } = resp;
        let (received, removals) = (resources.len() as u64, removed_resources.len() as u64);
        let out = self.store.apply(&type_url, resources, &removed_resources);
        if out.changed {
            let (state, conflicts) = self.store.state();
            let now: HashSet<String> = conflicts.into_iter().collect();
            for c in now.difference(&self.conflicts) {
                tracing::warn!("xDS: {c}");
            }
            self.conflicts = now;
            tracing::info!(
                workloads = state.workloads().len(),
                services = state.services().count(),
                policies = state.policies().len(),
                type_url = %type_url, received, removals,
                "xDS: config applied"
            );
            self.publisher
                .publish(state, Some(type_url == AUTHORIZATION_TYPE_URL));
        }
        let nack = out.nack_message();
        if TYPES.contains(&type_url.as_str()) {
            self.first_seen.insert(type_url.clone());
        }
        let ready = TYPES.iter().all(|t| self.first_seen.contains(*t));
        {
            let (w, s) = self.store.counts();
            let mut st = lock(&self.status);
            st.workloads = w;
            st.services = s;
            st.policies = self.store.policy_count();
            st.state_updates += u64::from(out.changed);
            let ts = st.types.entry(type_url.clone()).or_default();
            ts.resources_received += received;
            ts.removals_received += removals;
            match &nack {
                None => {
                    ts.acks += 1;
                    ts.last_acked_version = system_version_info.clone();
                    ts.last_acked_nonce = nonce.clone();
                }
                Some(m) => {
                    ts.nacks += 1;
                    ts.last_nack = Some((nonce.clone(), m.clone()));
                }
            }
            st.first_config_applied = ready;
        }
        if ready && !*self.ready.borrow() {
            self.ready.send_replace(true);
        }
        if let Some(m) = &nack {
            tracing::warn!(type_url = %type_url, error = %m, "xDS: resources rejected (NACK); the rest applied");
        }
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail: nack.map(|message| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }
}
