//! Delta ADS server tests: a real tonic client over TCP on 127.0.0.1 against
//! `zmesh_controller::ads::AdsServer`, plus a property test of the per-stream state machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proptest::prelude::*;
use prost::Message;
use prost_types::Any;
use tokio::sync::mpsc;
use tonic::Streaming;
use xds_proto::envoy::config::core::v3::Node as ProtoNode;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use xds_proto::google::rpc::Status as RpcStatus;
use xds_proto::istio::security::Authorization;
use xds_proto::istio::workload::{Address, Workload, address};
use xds_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use zmesh_controller::ads::{AdsServer, Cache, Node, STREAM_SHARE, StreamState, allow_all};

const NODE_ID: &str = "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local";

fn addr_any(uid: &str, name: &str) -> Any {
    let a = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 9]],
            ..Default::default()
        })),
    };
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: a.encode_to_vec(),
    }
}

fn authz_any(name: &str, ns: &str) -> Any {
    let a = Authorization {
        name: name.into(),
        namespace: ns.into(),
        ..Default::default()
    };
    Any {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        value: a.encode_to_vec(),
    }
}

fn put(cache: &Cache, name: &str, pod: &str) {
    cache
        .apply(
            ADDRESS_TYPE_URL,
            vec![(name.into(), addr_any(name, pod))],
            vec![],
        )
        .unwrap();
}

fn proto_node(id: &str, node_name: &str) -> ProtoNode {
    let mut md = prost_types::Struct::default();
    md.fields.insert(
        "NODE_NAME".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(node_name.into())),
        },
    );
    ProtoNode {
        id: id.into(),
        metadata: Some(md),
        ..Default::default()
    }
}

async fn start(server: AdsServer) -> Result<SocketAddr> {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse()?)?;
    let addr = incoming.local_addr()?;
    // The workspace builds tonic without its `router` feature, so serve the one service directly.
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming(server.into_service(), incoming),
    );
    Ok(addr)
}

/// One delta ADS stream: its requests are what `tx` is given, and `pulled` counts those the
/// client library has taken to send.
struct Opened {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    pulled: Arc<AtomicUsize>,
}

/// Opens a delta ADS stream with room for `queue` requests waiting to be sent (responses of
/// any size are read).
async fn open(addr: SocketAddr, queue: usize) -> Result<Opened> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(queue);
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let reqs = futures::stream::unfold(rx, move |mut rx| {
        let counter = counter.clone();
        async move {
            let r = rx.recv().await?;
            counter.fetch_add(1, SeqCst);
            Some((r, rx))
        }
    });
    let rx = client.delta_aggregated_resources(reqs).await?.into_inner();
    Ok(Opened { tx, rx, pulled })
}

/// A test proxy: one delta ADS stream.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node: ProtoNode,
}

impl Client {
    async fn connect(addr: SocketAddr, node: ProtoNode) -> Result<Self> {
        let Opened { tx, rx, .. } = open(addr, 16).await?;
        Ok(Self { tx, rx, node })
    }

    async fn send(&self, mut req: DeltaDiscoveryRequest) -> Result<()> {
        req.node = Some(self.node.clone());
        self.tx.send(req).await.context("request stream closed")
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) -> Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) -> Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    async fn recv(&mut self) -> Result<DeltaDiscoveryResponse> {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(s)) => bail!("stream failed: {s}"),
            Err(_) => bail!("no response within 5s"),
        }
    }

    /// Receives and ACKs one response.
    async fn recv_ack(&mut self) -> Result<DeltaDiscoveryResponse> {
        let r = self.recv().await?;
        self.ack(&r).await?;
        Ok(r)
    }

    async fn expect_silence(&mut self) -> Result<()> {
        match tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await {
            Err(_) => Ok(()),
            Ok(m) => bail!("expected no message, got {m:?}"),
        }
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

fn versions(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

/// `c` subscribed to the wildcard gets both workloads: a stream the server serves.
async fn served(mut c: Client) -> Result<Client> {
    c.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    assert_eq!(names(&c.recv().await?), ["w1", "w2"]);
    Ok(c)
}

fn setup() -> (Cache, AdsServer) {
    let cache = Cache::new();
    put(&cache, "w1", "pod-1");
    put(&cache, "w2", "pod-2");
    (cache.clone(), AdsServer::new(cache))
}

#[tokio::test]
async fn wildcard_gets_all_then_only_changes_and_removals() -> Result<()> {
    let (cache, server) = setup();
    let mut c = Client::connect(start(server).await?, proto_node(NODE_ID, "n1")).await?;
    c.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    let r = c.recv_ack().await?;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&r), ["w1", "w2"]);
    let a = Address::decode(&r.resources[0].resource.as_ref().unwrap().value[..])?;
    assert!(matches!(a.r#type, Some(address::Type::Workload(_))));

    put(&cache, "w1", "pod-1-renamed");
    let r2 = c.recv_ack().await?;
    assert_eq!(names(&r2), ["w1"]);
    assert!(r2.removed_resources.is_empty());
    assert_ne!(r2.nonce, r.nonce, "nonces are unique");

    cache.apply(ADDRESS_TYPE_URL, vec![], vec!["w2".into()])?;
    let r3 = c.recv_ack().await?;
    assert!(r3.resources.is_empty());
    assert_eq!(r3.removed_resources, ["w2"]);

    // Unchanged upsert: no push.
    put(&cache, "w1", "pod-1-renamed");
    c.expect_silence().await
}

#[tokio::test]
async fn nack_is_recorded_and_not_resent() -> Result<()> {
    let (cache, server) = setup();
    let mut c = Client::connect(start(server.clone()).await?, proto_node(NODE_ID, "n1")).await?;
    c.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    c.recv_ack().await?;
    put(&cache, "w1", "bad");
    let r = c.recv().await?;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "w1: invalid workload".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await?;
    c.expect_silence().await?;
    assert_eq!(server.nack_count(), 1);
    let streams = server.streams();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].nacks, 1);
    assert_eq!(streams[0].node.as_ref().unwrap().id, NODE_ID);
    // A later real change is still pushed.
    put(&cache, "w1", "good");
    assert_eq!(names(&c.recv_ack().await?), ["w1"]);
    Ok(())
}

#[tokio::test]
async fn reconnect_sends_only_stale_and_removes_deleted() -> Result<()> {
    let (cache, server) = setup();
    put(&cache, "w3", "pod-3");
    let addr = start(server).await?;
    let had = {
        let mut c = Client::connect(addr, proto_node(NODE_ID, "n1")).await?;
        c.subscribe(ADDRESS_TYPE_URL, &[]).await?;
        let r = c.recv_ack().await?;
        assert_eq!(names(&r), ["w1", "w2", "w3"]);
        versions(&r)
    };
    // While disconnected: w2 changes, w3 is deleted, w1 stays.
    put(&cache, "w2", "pod-2-v2");
    cache.apply(ADDRESS_TYPE_URL, vec![], vec!["w3".into()])?;

    let mut c = Client::connect(addr, proto_node(NODE_ID, "n1")).await?;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        initial_resource_versions: had,
        ..Default::default()
    })
    .await?;
    let r = c.recv_ack().await?;
    assert_eq!(names(&r), ["w2"]);
    assert_eq!(r.removed_resources, ["w3"]);
    c.expect_silence().await
}

#[tokio::test]
async fn named_subscription_and_unsubscribe() -> Result<()> {
    let (cache, server) = setup();
    let mut c = Client::connect(start(server).await?, proto_node(NODE_ID, "n1")).await?;
    c.subscribe(ADDRESS_TYPE_URL, &["w1", "missing"]).await?;
    let r = c.recv_ack().await?;
    assert_eq!(names(&r), ["w1"]);
    assert_eq!(
        r.removed_resources,
        ["missing"],
        "non-existent names are reported"
    );

    put(&cache, "w2", "pod-2-v2");
    c.expect_silence().await?;
    put(&cache, "w1", "pod-1-v2");
    assert_eq!(names(&c.recv_ack().await?), ["w1"]);

    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_unsubscribe: vec!["w1".into()],
        // Also ask for a missing name: its "does not exist" answer tells us the server has
        // processed this request before the cache changes.
        resource_names_subscribe: vec!["missing2".into()],
        ..Default::default()
    })
    .await?;
    let r = c.recv_ack().await?;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["missing2"]);
    put(&cache, "w1", "pod-1-v3");
    c.expect_silence().await?;

    // Subscribing again later delivers it.
    c.subscribe(ADDRESS_TYPE_URL, &["w2"]).await?;
    assert_eq!(names(&c.recv_ack().await?), ["w2"]);
    Ok(())
}

#[tokio::test]
async fn two_types_on_one_stream_are_independent() -> Result<()> {
    let (cache, server) = setup();
    cache.apply(
        AUTHORIZATION_TYPE_URL,
        vec![("default/allow".into(), authz_any("allow", "default"))],
        vec![],
    )?;
    let mut c = Client::connect(start(server).await?, proto_node(NODE_ID, "n1")).await?;
    c.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    c.subscribe(AUTHORIZATION_TYPE_URL, &[]).await?;
    let mut got = HashMap::new();
    for _ in 0..2 {
        let r = c.recv_ack().await?;
        got.insert(r.type_url.clone(), names(&r));
    }
    assert_eq!(got[ADDRESS_TYPE_URL], ["w1", "w2"]);
    assert_eq!(got[AUTHORIZATION_TYPE_URL], ["default/allow"]);

    cache.apply(
        AUTHORIZATION_TYPE_URL,
        vec![("default/deny".into(), authz_any("deny", "default"))],
        vec![],
    )?;
    let r = c.recv_ack().await?;
    assert_eq!(r.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(names(&r), ["default/deny"]);
    put(&cache, "w2", "pod-2-v2");
    let r = c.recv_ack().await?;
    assert_eq!(r.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&r), ["w2"]);
    c.expect_silence().await
}

#[tokio::test]
async fn filter_sees_node_and_hides_resources() -> Result<()> {
    let (cache, server) = setup();
    let seen: Arc<Mutex<Vec<Node>>> = Arc::default();
    let seen2 = seen.clone();
    let server = server.with_filter(move |node, type_url, name, _any| {
        seen2.lock().unwrap().push(node.clone());
        !(type_url == ADDRESS_TYPE_URL
            && name == "w2"
            && node.node_name.as_deref() == Some("node-b"))
    });
    let addr = start(server).await?;
    let mut a = Client::connect(addr, proto_node("ztunnel~10.0.0.1~a.ns~ns.svc", "node-a")).await?;
    let mut b = Client::connect(addr, proto_node("ztunnel~10.0.0.2~b.ns~ns.svc", "node-b")).await?;
    a.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    b.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    assert_eq!(names(&a.recv_ack().await?), ["w1", "w2"]);
    assert_eq!(names(&b.recv_ack().await?), ["w1"]);
    put(&cache, "w2", "pod-2-v2");
    assert_eq!(names(&a.recv_ack().await?), ["w2"]);
    b.expect_silence().await?;

    let seen = seen.lock().unwrap();
    let b_node = seen
        .iter()
        .find(|n| n.node_name.as_deref() == Some("node-b"))
        .expect("filter saw node-b");
    assert_eq!(b_node.id, "ztunnel~10.0.0.2~b.ns~ns.svc");
    Ok(())
}

#[tokio::test]
async fn sotw_is_unimplemented() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server).await?;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?;
    let reqs = futures::stream::iter(vec![DiscoveryRequest::default()]);
    let err = client.stream_aggregated_resources(reqs).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("delta"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn request_without_type_url_closes_stream() -> Result<()> {
    let (_cache, server) = setup();
    let mut c = Client::connect(start(server).await?, proto_node(NODE_ID, "n1")).await?;
    c.subscribe("", &[]).await?;
    let err = c.recv().await.unwrap_err().to_string();
    assert!(err.contains("type_url"), "{err}");
    Ok(())
}

/// A request over `MAX_REQUEST_SIZE` ends its stream with gRPC's limit error before the
/// controller decodes it; one just under it, and other clients, are served.
#[tokio::test]
async fn a_request_over_the_size_limit_ends_its_stream_only() -> Result<()> {
    use zmesh_controller::ads::MAX_REQUEST_SIZE;
    let (_cache, server) = setup();
    let addr = start(server).await?;
    // Each name costs its bytes plus three of framing (a tag, a two-byte length).
    let request_of = |size: usize| {
        let names = size / 1003 + 1;
        vec!["n".repeat(1000); names]
    };
    let subscribe = |names: Vec<String>| DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let mut big = Client::connect(addr, proto_node(NODE_ID, "n1")).await?;
    big.send(subscribe(request_of(MAX_REQUEST_SIZE))).await?;
    let err = big.recv().await.unwrap_err().to_string();
    assert!(err.contains("too large"), "{err}");

    // Just under the limit, in names the stream does not keep (it unsubscribes them): what a
    // stream keeps has a limit of its own (the next test).
    let mut fits = Client::connect(addr, proto_node(NODE_ID, "n1")).await?;
    fits.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["w1".into()],
        resource_names_unsubscribe: request_of(MAX_REQUEST_SIZE - 64 * 1024),
        ..Default::default()
    })
    .await?;
    let r = fits.recv().await?;
    assert_eq!(names(&r), ["w1"], "the known name of the large request");

    served(Client::connect(addr, proto_node(NODE_ID, "n2")).await?).await?;
    Ok(())
}

/// A stream's subscriptions by name stop at `MAX_SUBSCRIBED_BYTES`: the stream that goes past
/// it ends with RESOURCE_EXHAUSTED, saying what to do instead; other streams are served.
#[tokio::test]
async fn subscriptions_by_name_past_the_limit_end_their_stream_only() -> Result<()> {
    use zmesh_controller::ads::stream::MAX_SUBSCRIBED_BYTES;
    let (_cache, server) = setup();
    let addr = start(server).await?;
    let mut greedy = Client::connect(addr, proto_node(NODE_ID, "n1")).await?;
    // Names of 1,000 bytes, at most 100 more each as the server counts them: four requests
    // hold 4/4.5 of the limit, the fifth goes past it.
    let per_request = MAX_SUBSCRIBED_BYTES * 2 / 9 / 1050;
    let mut ended = None;
    for round in 0..6 {
        let names = (0..per_request)
            .map(|i| format!("{round}-{i:06}-{}", "n".repeat(991)))
            .collect();
        greedy
            .send(DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE_URL.into(),
                resource_names_subscribe: names,
                ..Default::default()
            })
            .await?;
        if let Err(e) = greedy.recv().await {
            ended = Some((round, e.to_string()));
            break;
        }
    }
    let (round, err) = ended.expect("the stream ended");
    assert_eq!(
        round, 4,
        "ended on the request that went past the limit: {err}"
    );
    assert!(err.contains("Some resource has been exhausted"), "{err}");
    assert!(err.contains("subscribe to the wildcard"), "{err}");

    served(Client::connect(addr, proto_node(NODE_ID, "n2")).await?).await?;
    Ok(())
}

/// Streams from one address stop at the server's cap; closing one makes room for another.
#[tokio::test]
async fn streams_per_address_are_capped() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server.with_max_streams_per_peer(2)).await?;
    let mut open = Vec::new();
    for n in ["n1", "n2"] {
        open.push(served(Client::connect(addr, proto_node(NODE_ID, n)).await?).await?);
    }
    let err = match Client::connect(addr, proto_node(NODE_ID, "n3")).await {
        Ok(_) => bail!("a third stream from 127.0.0.1 was opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("already has 2 delta xDS streams open"),
        "{err}"
    );

    drop(open.pop());
    let c = connect_when_room(addr, "already has 2").await?;
    served(c).await?;
    Ok(())
}

/// Names of 1,000 bytes that do not exist, [`FLOOD_NAMES`] a round: a request subscribing to
/// them is answered with them all as removed, about 1 MiB.
const FLOOD_NAMES: usize = 1000;
const FLOOD_LIST: usize = FLOOD_NAMES * (1000 + std::mem::size_of::<String>());

fn flood_names(round: usize) -> Vec<String> {
    (0..FLOOD_NAMES)
        .map(|i| format!("{round:03}-{i:04}-{}", "x".repeat(991)))
        .collect()
}

/// A stream that asks for `rounds` rounds of names that do not exist and reads nothing until
/// told to; its request stream ends after the last round.
struct Flood {
    pulled: Arc<AtomicUsize>,
    responses: Streaming<DeltaDiscoveryResponse>,
    rounds: usize,
}

impl Flood {
    async fn start(addr: SocketAddr, rounds: usize) -> Result<Flood> {
        let Opened {
            tx,
            rx: responses,
            pulled,
        } = open(addr, 1).await?;
        tokio::spawn(async move {
            for round in 0..rounds {
                let req = DeltaDiscoveryRequest {
                    node: Some(proto_node(NODE_ID, "n1")),
                    type_url: ADDRESS_TYPE_URL.into(),
                    resource_names_subscribe: flood_names(round),
                    // The round before's names go, so subscriptions stay under their limit.
                    resource_names_unsubscribe: (round.checked_sub(1).map(flood_names))
                        .unwrap_or_default(),
                    ..Default::default()
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
        });
        Ok(Flood {
            pulled,
            responses,
            rounds,
        })
    }

    /// Waits until the client can push no more (or has pushed every round); how many it
    /// pushed.
    async fn stalled(&self) -> usize {
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.pulled.load(SeqCst);
            if now == last || now == self.rounds {
                return now;
            }
            last = now;
        }
    }

    /// Reads every round's response, in order.
    async fn read_all(&mut self) -> Result<()> {
        for round in 0..self.rounds {
            let resp = tokio::time::timeout(Duration::from_secs(10), self.responses.message())
                .await
                .context("a response")??
                .context("the stream ended")?;
            assert_eq!(resp.removed_resources.len(), FLOOD_NAMES, "round {round}");
            assert_eq!(resp.removed_resources[0], flood_names(round)[0]);
        }
        Ok(())
    }
}

/// Connects until a stream opens (a closed stream's place comes back once its tasks see the
/// end), failing after 5 s; `refused` is what each refusal says meanwhile.
async fn connect_when_room(addr: SocketAddr, refused: &str) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Client::connect(addr, proto_node(NODE_ID, "n3")).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(e.to_string().contains(refused), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A client that asks for names that do not exist and never reads: the removal lists queued
/// for it stop at its stream's share of its address's budget, after which its stream stops
/// reading requests. Once it reads, every response comes, in order: nothing is dropped.
#[tokio::test]
async fn queued_removals_stop_at_the_streams_share() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server.with_queued_bytes_per_peer(3 * FLOOD_LIST)).await?;
    let mut flood = Flood::start(addr, 30).await?;
    // One list queued (a stream's share is an eighth of three, so one list at a time), one
    // request waiting for room, and what HTTP/2's windows and the client hold: 7 when this
    // was written, 9 with the address's budget alone (three lists), 23 with neither (the
    // queue of 16 replies alone).
    let stalled_at = flood.stalled().await;
    assert!(stalled_at <= 7, "the client pushed {stalled_at} requests");
    flood.read_all().await
}

/// A client that does not read stops only its own stream: another client from its address
/// (behind the same NAT) is served meanwhile.
#[tokio::test]
async fn a_client_that_does_not_read_stalls_only_its_own_stream() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server.with_queued_bytes_per_peer(3 * FLOOD_LIST)).await?;
    let mut hog = Flood::start(addr, 30).await?;
    hog.stalled().await;
    served(Client::connect(addr, proto_node(NODE_ID, "n2")).await?).await?;
    hog.read_all().await
}

/// A response larger than the whole budget (here any push) waits for all of it, and goes.
#[tokio::test]
async fn a_response_larger_than_the_budget_is_sent() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server.with_queued_bytes_per_peer(1)).await?;
    let mut c = served(Client::connect(addr, proto_node(NODE_ID, "n1")).await?).await?;
    c.subscribe(ADDRESS_TYPE_URL, &["missing"]).await?;
    assert_eq!(c.recv().await?.removed_resources, ["missing"]);
    Ok(())
}

/// A stream whose client ended its requests but has not read its responses still counts
/// against its address, its queued replies against its budget; once it goes, its place does.
#[tokio::test]
async fn a_half_closed_stream_counts_until_its_responses_go() -> Result<()> {
    let (_cache, server) = setup();
    // Room for every list the stream queues, so that nothing but the client stops it.
    let server = server
        .with_max_streams_per_peer(1)
        .with_queued_bytes_per_peer(STREAM_SHARE * 20 * FLOOD_LIST);
    let addr = start(server).await?;
    // Ten lists: more than the client's windows take while it does not read.
    let mut flood = Flood::start(addr, 10).await?;
    assert_eq!(
        flood.stalled().await,
        10,
        "every request sent, then the end"
    );
    match Client::connect(addr, proto_node(NODE_ID, "n2")).await {
        Ok(_) => bail!("a second stream was opened while the first's responses wait"),
        Err(e) => assert!(e.to_string().contains("already has 1"), "{e}"),
    }
    flood.read_all().await?;
    drop(flood);
    served(connect_when_room(addr, "already has 1").await?).await?;
    Ok(())
}

/// One request naming 4,000 names it says it has and 4,000 it subscribes to, none of which
/// exist: one reply of 8,000 removed names (eight lists), which the client does not read.
async fn one_large_removal(
    addr: SocketAddr,
) -> Result<(
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
)> {
    let Opened { tx, rx, .. } = open(addr, 1).await?;
    let names = |from: usize| (from..from + 4).flat_map(flood_names).collect::<Vec<_>>();
    tx.send(DeltaDiscoveryRequest {
        node: Some(proto_node(NODE_ID, "n1")),
        type_url: ADDRESS_TYPE_URL.into(),
        initial_resource_versions: names(100).into_iter().map(|n| (n, "1".into())).collect(),
        resource_names_subscribe: names(200),
        ..Default::default()
    })
    .await?;
    Ok((tx, rx))
}

/// A reply's own bytes count until HTTP/2 takes them from it, a window at a time: one
/// removal list of eight lists that its client does not read holds its address's budget
/// (here one list), and the address's other clients wait until it reads.
#[tokio::test]
async fn a_large_unread_reply_counts_until_its_client_reads_it() -> Result<()> {
    let (_cache, server) = setup();
    let addr = start(server.with_queued_bytes_per_peer(FLOOD_LIST)).await?;
    let (_requests, mut hog) = one_large_removal(addr).await?;
    // Time for the server to answer it (it then holds the budget).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut other = Client::connect(addr, proto_node(NODE_ID, "n2")).await?;
    other.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    other.expect_silence().await?;
    let removed = tokio::time::timeout(Duration::from_secs(10), hog.message())
        .await
        .context("the large reply")??
        .context("the stream ended")?
        .removed_resources;
    assert_eq!(removed.len(), 8 * FLOOD_NAMES);
    assert_eq!(names(&other.recv().await?), ["w1", "w2"]);
    Ok(())
}

/// A stream waiting for room in its address's budget ends when its client goes, giving its
/// place back, though the clients that hold the budget still read nothing. Every response
/// of the address waits while they read nothing, and comes once they read.
#[tokio::test]
async fn a_stream_waiting_for_the_budget_ends_with_its_client() -> Result<()> {
    let (_cache, server) = setup();
    let server = server
        .with_queued_bytes_per_peer(3 * FLOOD_LIST)
        .with_max_streams_per_peer(4);
    let addr = start(server).await?;
    // Each holds one list (its share is smaller): three fill the address's budget.
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let hog = Flood::start(addr, 30).await?;
        hog.stalled().await;
        hogs.push(hog);
    }
    let waiting = Flood::start(addr, 1).await?;
    assert_eq!(waiting.stalled().await, 1);
    drop(waiting);
    let mut next = connect_when_room(addr, "already has 4").await?;
    next.subscribe(ADDRESS_TYPE_URL, &[]).await?;
    next.expect_silence().await?;
    for hog in &mut hogs {
        hog.read_all().await?;
    }
    assert_eq!(names(&next.recv().await?), ["w1", "w2"]);
    Ok(())
}

// ---- property test of the state machine (no gRPC) ----

fn arb_request() -> impl Strategy<Value = DeltaDiscoveryRequest> {
    let type_url = prop_oneof![
        Just(ADDRESS_TYPE_URL.to_string()),
        Just(AUTHORIZATION_TYPE_URL.to_string()),
        Just(String::new()),
        ".{0,12}",
    ];
    let name = prop_oneof![Just("*".to_string()), "w[0-3]", ".{0,6}"];
    let nonce = prop_oneof![Just(String::new()), "[0-9a-f]{1,4}-[0-9]{1,2}", ".{0,6}"];
    let status = proptest::option::of((any::<i32>(), ".{0,10}"));
    (
        type_url,
        proptest::collection::vec(name.clone(), 0..4),
        proptest::collection::vec(name.clone(), 0..4),
        proptest::collection::hash_map(name, ".{0,4}", 0..3),
        nonce,
        status,
        any::<bool>(),
    )
        .prop_map(
            |(type_url, sub, unsub, initial, nonce, status, with_node)| DeltaDiscoveryRequest {
                node: with_node.then(|| proto_node(NODE_ID, "n1")),
                type_url,
                resource_names_subscribe: sub,
                resource_names_unsubscribe: unsub,
                initial_resource_versions: initial,
                response_nonce: nonce,
                error_detail: status.map(|(code, message)| RpcStatus {
                    code,
                    message,
                    details: vec![],
                }),
            },
        )
}

proptest! {
    #[test]
    fn state_machine_never_panics(
        reqs in proptest::collection::vec(arb_request(), 1..20),
        changes in proptest::collection::vec(("w[0-3]", any::<bool>()), 0..10),
    ) {
        let cache = Cache::new();
        put(&cache, "w0", "p0");
        put(&cache, "w1", "p1");
        let mut rx = cache.subscribe();
        let mut st = StreamState::new(7, allow_all());
        let mut nonces = std::collections::HashSet::new();
        let mut changes = changes.into_iter();
        for req in reqs {
            let ty = req.type_url.clone();
            if let Ok(Some(resp)) = st.handle_request(req, &cache) {
                prop_assert_eq!(&resp.type_url, &ty);
                prop_assert!(nonces.insert(resp.nonce.clone()), "nonce reused");
            }
            if let Some((name, remove)) = changes.next() {
                if remove {
                    cache.apply(ADDRESS_TYPE_URL, vec![], vec![name]).unwrap();
                } else {
                    put(&cache, &name, &format!("{ty}{}", nonces.len()));
                }
            }
            while let Ok(change) = rx.try_recv() {
                if let Some(resp) = st.handle_change(&change, &cache) {
                    prop_assert!(nonces.insert(resp.nonce.clone()), "nonce reused");
                }
            }
        }
        for resp in st.resync(&cache) {
            prop_assert!(nonces.insert(resp.nonce.clone()), "nonce reused");
        }
        // After a resync, nothing is left to send.
        prop_assert!(st.resync(&cache).is_empty());
    }
}
