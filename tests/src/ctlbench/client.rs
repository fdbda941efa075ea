//! A delta ADS client as ztunnel uses one: its own TLS connection to the controller (verified
//! against the mesh root), the bearer token and `clusterid` headers, a wildcard subscription to
//! `istio.workload.Address` and `istio.security.Authorization`, and an ACK for every response.
//! It reports a summary of every response (when, what type, how many resources, how many
//! bytes, and for small responses which names and addresses) to the benchmark; [`Fleet`]
//! runs many of them and waits for states and changes across all.
//!
//! The clients stand in for proxies on other nodes but run on the controller's cores, so they
//! do as little as a client can: a response's resources stay slices of the message they came
//! in ([`Received`]), and only the small responses the change measurements read are decoded
//! further. Each connects from its own loopback address ([`source`]), as each proxy would
//! from its node's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::transport::Channel;
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use xds_proto::istio::workload::{Address, address};
use zmesh_controller::reconcile::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// Responses with at most this many resources carry their names (and Workload addresses) in
/// the [`Event`]; the initial state only its counts.
const DETAIL_UP_TO: usize = 16;

/// The fields of an `envoy.service.discovery.v3.DeltaDiscoveryResponse` the benchmark reads
/// (the others are skipped): each resource is kept as the encoded `Resource` it came as, a
/// slice of the received message.
#[derive(Clone, PartialEq, Message)]
pub struct Received {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// Where and how to reach the controller.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The mesh root (PEM) the serving certificate chains to.
    pub root_pem: String,
    /// The name checked in the serving certificate.
    pub server_name: String,
}

/// Who one client is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub index: usize,
    /// The node's credential (`authorization: Bearer <token>`).
    pub token: String,
    pub node: String,
}

/// One response, as a client saw it.
#[derive(Debug, Clone)]
pub struct Event {
    pub client: usize,
    pub at: Instant,
    pub type_url: String,
    pub resources: usize,
    pub removed: usize,
    /// Encoded size of the response message (protobuf, without gRPC/HTTP/2/TLS framing).
    pub bytes: usize,
    /// For small responses: each resource's name and, for a Workload, its first address.
    pub detail: Vec<(String, Option<Ipv4Addr>)>,
}

/// A client that failed.
#[derive(Debug)]
pub struct Failure {
    pub client: usize,
    pub error: String,
}

/// What clients send to the benchmark.
#[derive(Debug)]
pub enum Report {
    Response(Event),
    Failed(Failure),
}

/// The loopback address client `index` connects from: one per client, as each proxy runs on
/// its own node, so the controller's limits per client address see as many addresses as a
/// cluster's nodes would give it.
pub fn source(index: usize) -> IpAddr {
    let [hi, lo] = u16::try_from(index % 0xfffe + 1).unwrap_or(1).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, 2, hi, lo))
}

/// A TLS channel to the controller from client `index` ([`source`], when the controller is
/// on loopback); retried until `deadline` (the controller may still be starting).
pub async fn connect(target: &Target, index: usize, deadline: Instant) -> Result<Channel> {
    let endpoint = crate::controller::endpoint(
        format!("https://{}", target.addr),
        &target.root_pem,
        &target.server_name,
    )?
    .tcp_nodelay(true)
    .local_address(target.addr.ip().is_loopback().then(|| source(index)))
    .connect_timeout(Duration::from_secs(5));
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "controller not reachable yet");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connecting to the controller"),
        }
    }
}

fn node(id: &Identity) -> Node {
    Node {
        id: format!(
            "ztunnel~10.255.{}.{}~ztunnel-{}.istio-system~istio-system.svc.cluster.local",
            id.index / 250,
            1 + id.index % 250,
            id.index
        ),
        cluster: "Kubernetes".to_owned(),
        ..Node::default()
    }
}

fn detail(resp: &Received) -> Result<Vec<(String, Option<Ipv4Addr>)>> {
    if resp.resources.len() > DETAIL_UP_TO {
        return Ok(Vec::new());
    }
    resp.resources
        .iter()
        .map(|r| {
            let r = Resource::decode(r.clone()).context("a resource that does not decode")?;
            let ip = r
                .resource
                .as_ref()
                .filter(|_| resp.type_url == ADDRESS_TYPE)
                .and_then(|any| Address::decode(any.value.as_slice()).ok())
                .and_then(|a| match a.r#type? {
                    address::Type::Workload(w) => {
                        let b: [u8; 4] = w.addresses.first()?.as_slice().try_into().ok()?;
                        Some(Ipv4Addr::from(b))
                    }
                    address::Type::Service(_) => None,
                });
            Ok((r.name, ip))
        })
        .collect()
}

/// Runs one client until the stream ends or the task is aborted; every response is reported
/// (after its ACK is queued). Connection failures are retried until `deadline`.
pub async fn run(
    target: Target,
    id: Identity,
    deadline: Instant,
    reports: mpsc::UnboundedSender<Report>,
) {
    let index = id.index;
    if let Err(e) = run_inner(target, id, deadline, &reports).await {
        let _ = reports.send(Report::Failed(Failure {
            client: index,
            error: format!("{e:#}"),
        }));
    }
}

async fn run_inner(
    target: Target,
    id: Identity,
    deadline: Instant,
    reports: &mpsc::UnboundedSender<Report>,
) -> Result<()> {
    let channel = connect(&target, id.index, deadline).await?;
    let mut client = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(zmesh_controller::ads::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(zmesh_controller::ads::MAX_MESSAGE_SIZE);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node(&id)),
        type_url: ADDRESS_TYPE.to_owned(),
        ..DeltaDiscoveryRequest::default()
    })
    .await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE.to_owned(),
        ..DeltaDiscoveryRequest::default()
    })
    .await?;
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut req = Request::new(requests);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {}", id.token).parse()?);
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse()?);
    client.ready().await.context("the gRPC channel")?;
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, Received>::default();
    let path = http::uri::PathAndQuery::from_static(zmesh_controller::ads::grpc::DELTA_PATH);
    let mut stream = match client.streaming(req, path, codec).await {
        Ok(s) => s.into_inner(),
        // The controller answers UNAVAILABLE while it is still loading; retry as ztunnel
        // does.
        Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
            tracing::debug!(%status, "controller not ready; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Box::pin(run_inner(target, id, deadline, reports)).await;
        }
        Err(status) => return Err(status).context("opening the delta ADS stream"),
    };
    loop {
        let Some(resp) = stream
            .message()
            .await
            .context("reading the delta ADS stream")?
        else {
            bail!("the controller closed the stream");
        };
        let at = Instant::now();
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        };
        if tx.send(ack).await.is_err() {
            bail!("the request stream closed");
        }
        let event = Event {
            client: id.index,
            at,
            bytes: resp.encoded_len(),
            resources: resp.resources.len(),
            removed: resp.removed_resources.len(),
            detail: detail(&resp)?,
            type_url: resp.type_url,
        };
        if reports.send(Report::Response(event)).is_err() {
            return Ok(());
        }
    }
}

/// Per client: what it has received so far.
#[derive(Debug, Clone, Default)]
pub struct ClientState {
    pub addresses: usize,
    pub authorizations: usize,
    pub bytes: usize,
    pub responses: usize,
    pub complete_at: Option<Instant>,
}

/// The time every listed client took to see one change, and what they were sent with it.
#[derive(Debug, Clone)]
pub struct ChangeSeen {
    /// Per client, from the write to its response.
    pub latencies: Vec<Duration>,
    /// Largest number of resources in a response carrying the change (1 is minimal).
    pub max_resources: usize,
    /// Responses carrying the change whose content was wrong (e.g. the old address).
    pub wrong: usize,
    /// Other responses received meanwhile (unrelated pushes).
    pub other: usize,
}

/// All the benchmark's clients and their reports.
#[derive(Debug)]
pub struct Fleet {
    rx: mpsc::UnboundedReceiver<Report>,
    tx: mpsc::UnboundedSender<Report>,
    tasks: BTreeMap<usize, tokio::task::JoinHandle<()>>,
    pub state: BTreeMap<usize, ClientState>,
    pub expected_addresses: usize,
    pub expected_authorizations: usize,
}

impl Fleet {
    pub fn new(expected_addresses: usize, expected_authorizations: usize) -> Fleet {
        let (tx, rx) = mpsc::unbounded_channel();
        Fleet {
            rx,
            tx,
            tasks: BTreeMap::new(),
            state: BTreeMap::new(),
            expected_addresses,
            expected_authorizations,
        }
    }

    /// Starts client `id.index`.
    pub fn start(&mut self, target: Target, id: Identity, deadline: Instant) {
        let index = id.index;
        self.state.insert(index, ClientState::default());
        let task = tokio::spawn(run(target, id, deadline, self.tx.clone()));
        self.tasks.insert(index, task);
    }

    /// Stops client `index` (its stream and connection close).
    pub fn stop(&mut self, index: usize) {
        if let Some(t) = self.tasks.remove(&index) {
            t.abort();
        }
        self.state.remove(&index);
    }

    fn record(&mut self, e: &Event) {
        let Some(s) = self.state.get_mut(&e.client) else {
            return;
        };
        s.bytes += e.bytes;
        s.responses += 1;
        if e.type_url == ADDRESS_TYPE {
            s.addresses += e.resources;
        } else if e.type_url == AUTHORIZATION_TYPE {
            s.authorizations += e.resources;
        }
        if s.complete_at.is_none()
            && s.addresses >= self.expected_addresses
            && s.authorizations >= self.expected_authorizations
        {
            s.complete_at = Some(e.at);
        }
    }

    async fn next(&mut self, deadline: tokio::time::Instant) -> Result<Event> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Err(_) => bail!("timed out waiting for the clients"),
            Ok(None) => bail!("every client is gone"),
            Ok(Some(Report::Failed(f))) => bail!("client {} failed: {}", f.client, f.error),
            Ok(Some(Report::Response(e))) => {
                self.record(&e);
                Ok(e)
            }
        }
    }

    /// Waits until every running client holds the complete initial state.
    pub async fn wait_complete(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.state.values().any(|s| s.complete_at.is_none()) {
            self.next(deadline).await.with_context(|| {
                let done = self
                    .state
                    .values()
                    .filter(|s| s.complete_at.is_some())
                    .count();
                format!("{done} of {} clients complete", self.state.len())
            })?;
        }
        Ok(())
    }

    /// Waits until every running client has received a response of `type_url` naming
    /// `name`; `check` says whether that response's detail for `name` is right.
    pub async fn wait_change(
        &mut self,
        type_url: &str,
        name: &str,
        since: Instant,
        check: impl Fn(&(String, Option<std::net::Ipv4Addr>)) -> bool,
        timeout: Duration,
    ) -> Result<ChangeSeen> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen: BTreeMap<usize, Duration> = BTreeMap::new();
        let mut out = ChangeSeen {
            latencies: Vec::new(),
            max_resources: 0,
            wrong: 0,
            other: 0,
        };
        while seen.len() < self.state.len() {
            let e = self.next(deadline).await.with_context(|| {
                format!("{} of {} clients saw {name}", seen.len(), self.state.len())
            })?;
            let hit = if e.type_url == type_url {
                e.detail.iter().find(|(n, _)| n == name)
            } else {
                None
            };
            match hit {
                Some(d) => {
                    out.max_resources = out.max_resources.max(e.resources + e.removed);
                    if !check(d) {
                        out.wrong += 1;
                    }
                    seen.entry(e.client)
                        .or_insert_with(|| e.at.saturating_duration_since(since));
                }
                None => out.other += 1,
            }
        }
        out.latencies = seen.into_values().collect();
        Ok(out)
    }

    /// Number of running clients.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;
    use zmesh_controller::ca::CaConfig;
    use zmesh_controller::reconcile::ADDRESS_TYPE;
    use zmesh_controller::server::{AuthConfig, ControllerConfig, SourceConfig, start};
    use zmesh_controller::translate::MeshConfig;
    use zmesh_core::identity::SpiffeId;

    use super::{Fleet, Identity, Target};
    use crate::ctlbench::Credentials;
    use crate::ctlbench::cluster::{Cluster, ClusterSpec, node_names};

    /// The fleet against the controller in process: complete initial state on every client,
    /// then one Pod's move arrives everywhere as a response with exactly that Workload.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fleet_sees_the_initial_state_and_one_pod_move() {
        zmesh_core::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let spec = ClusterSpec {
            pods: 40,
            services: 4,
            policies: 6,
            namespaces: 2,
            nodes: 2,
            seed: 3,
        };
        let mut cluster = Cluster::generate(spec, &dir.path().join("cluster")).unwrap();
        let nodes = node_names(spec.nodes);
        let creds = Credentials::generate(dir.path(), &nodes).unwrap();
        let stop = CancellationToken::new();
        let running = start(
            ControllerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ca_cert: creds.ca_cert.clone(),
                ca_key: creds.ca_key.clone(),
                serving_names: vec!["127.0.0.1".into()],
                serving_ttl: Duration::from_secs(3600),
                mesh: MeshConfig::default(),
                ca: CaConfig {
                    cluster_id: Some("Kubernetes".into()),
                    ..CaConfig::default()
                },
                source: SourceConfig::Dir(cluster.dir.clone()),
                auth: AuthConfig::NodeTokens(creds.tokens.file.clone()),
                ztunnel_identity: SpiffeId::new("cluster.local", "istio-system", "ztunnel")
                    .unwrap(),
                debounce: Duration::from_millis(10),
                limits: Default::default(),
                waypoint: Default::default(),
            },
            stop.clone(),
        )
        .await
        .unwrap();
        let target = Target {
            addr: running.addr,
            root_pem: creds.root_pem.clone(),
            server_name: "127.0.0.1".into(),
        };
        let mut fleet = Fleet::new(cluster.expected_addresses(), spec.policies);
        let deadline = Instant::now() + Duration::from_secs(60);
        for index in 0..3 {
            let node = nodes[index % nodes.len()].clone();
            let token = creds.token(&node).unwrap();
            fleet.start(target.clone(), Identity { index, token, node }, deadline);
        }
        fleet.wait_complete(Duration::from_secs(60)).await.unwrap();
        assert!(fleet.state.values().all(|s| s.bytes > 0));

        let since = Instant::now();
        let ip = cluster.move_pod(7).unwrap();
        let seen = fleet
            .wait_change(
                ADDRESS_TYPE,
                &cluster.pods[7].workload_uid(),
                since,
                |(_, got)| *got == Some(ip),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(seen.latencies.len(), 3);
        assert_eq!((seen.max_resources, seen.wrong), (1, 0));
        stop.cancel();
    }
}
