//! The client against the real delta ADS server (`zmesh_controller::ads`) over TLS on
//! 127.0.0.1. The controller runs on its own runtime so a test can stop it outright (every
//! connection dropped) and start it again on the same port with the same cache.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message;
use prost_types::Any;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use xds_proto::istio::security::Authorization;
use xds_proto::istio::workload::{self as pb, Address, address};
use xds_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use zmesh_controller::ads::{AdsServer, Cache};
use zmesh_core::state::State;

use super::*;
use crate::grpc::{AuthHeaders, AuthToken, Target};

/// A CA and a server certificate for 127.0.0.1, as PEM files in a tempdir.
struct Pki {
    dir: tempfile::TempDir,
    cert: String,
    key: String,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["istiod.istio-system.svc".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = p.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.pem"), ca_cert.pem()).unwrap();
        Pki {
            dir,
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }
}

/// A controller on its own runtime.
struct Controller {
    rt: Option<tokio::runtime::Runtime>,
    server: AdsServer,
    addr: SocketAddr,
}

impl Controller {
    fn start(pki: &Pki, cache: Cache, addr: SocketAddr) -> Controller {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = AdsServer::new(cache);
        let svc = server.clone().into_service();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert, &pki.key));
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(l))
                .await
        });
        Controller {
            rt: Some(rt),
            server,
            addr,
        }
    }

    /// Drops the controller and every connection it had.
    fn stop(mut self) -> SocketAddr {
        self.rt.take().unwrap().shutdown_background();
        self.addr
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn any_address(a: address::Type) -> Any {
    Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: Address { r#type: Some(a) }.encode_to_vec(),
    }
}

fn workload(name: &str, ip: &[u8]) -> (String, Any) {
    let uid = format!("Kubernetes//Pod/default/{name}");
    let w = pb::Workload {
        uid: uid.clone(),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "sa".into(),
        ..Default::default()
    };
    (uid, any_address(address::Type::Workload(w)))
}

fn service(name: &str, vip: [u8; 4]) -> (String, Any) {
    let s = pb::Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    (
        format!("default/{name}.default.svc.cluster.local"),
        any_address(address::Type::Service(s)),
    )
}

fn put(cache: &Cache, items: Vec<(String, Any)>, removals: &[&str]) {
    cache
        .apply(
            ADDRESS_TYPE_URL,
            items,
            removals.iter().map(|s| s.to_string()).collect(),
        )
        .unwrap();
}

struct Proxy {
    xds: Xds,
    state: Arc<ArcSwap<State>>,
    publisher: crate::state::Publisher,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn client(addr: SocketAddr, root: PathBuf) -> Proxy {
    zmesh_core::tls::install_default_provider();
    let state = Arc::new(ArcSwap::from_pointee(State::default()));
    let stop = CancellationToken::new();
    let cfg = crate::config::Config {
        pod_name: "ztunnel-test".into(),
        pod_namespace: "istio-system".into(),
        instance_ip: "127.0.0.1".into(),
        node_name: "node-a".into(),
        ..Default::default()
    };
    let publisher = crate::state::Publisher::new(state.clone());
    let xds = Xds::start(
        XdsConfig {
            target: Target {
                var: "XDS_ADDRESS",
                address: format!("https://{addr}"),
                root_ca: root,
                alt_hostname: None,
                root_var: "XDS_ROOT_CA",
            },
            auth: AuthHeaders {
                token: AuthToken::Literal("test-token".into()),
                cluster_id: "Kubernetes".into(),
            },
            node: node(&cfg),
        },
        publisher.clone(),
        stop.clone(),
    )
    .unwrap();
    Proxy {
        xds,
        state,
        publisher,
        stop,
    }
}

/// Polls `f` until it holds, for up to 20 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has_ip(p: &Proxy, ip: [u8; 4]) -> bool {
    p.state.load().workload_by_ip(ip.into()).is_some()
}

fn addr_status(p: &Proxy) -> TypeStatus {
    p.xds
        .status()
        .types
        .get(ADDRESS_TYPE_URL)
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn config_arrives_bad_resources_are_nacked_good_ones_applied() {
    let pki = Pki::new();
    let cache = Cache::new();
    put(
        &cache,
        vec![
            workload("a", &[10, 0, 0, 1]),
            service("echo", [10, 96, 0, 1]),
        ],
        &[],
    );
    let ctl = Controller::start(&pki, cache.clone(), "127.0.0.1:0".parse().unwrap());
    let p = client(ctl.addr, pki.root());
    assert!(
        p.xds.wait_ready(Duration::from_secs(20)).await,
        "{:?}",
        p.xds.status()
    );
    eventually("first config", || has_ip(&p, [10, 0, 0, 1])).await;
    assert!(
        p.state
            .load()
            .service("default/echo.default.svc.cluster.local")
            .is_some()
    );
    // The controller saw our node identity.
    let node = ctl.server.streams()[0].node.clone().unwrap();
    assert_eq!(
        node.id,
        "ztunnel~127.0.0.1~ztunnel-test.istio-system~istio-system.svc.cluster.local"
    );
    assert_eq!(node.node_name.as_deref(), Some("node-a"));

    // One good and one bad resource in one response.
    let updates = p.xds.status().state_updates;
    put(
        &cache,
        vec![workload("b", &[10, 0, 0, 2]), workload("bad", &[1, 2, 3])],
        &[],
    );
    eventually("good resource applied", || has_ip(&p, [10, 0, 0, 2])).await;
    eventually("NACK reached the controller", || {
        ctl.server.nack_count() == 1
    })
    .await;
    let (_, msg) = addr_status(&p).last_nack.unwrap();
    assert!(
        msg.contains("Kubernetes//Pod/default/bad") && msg.contains("3 bytes"),
        "{msg}"
    );
    assert!(
        !msg.contains("default/b\""),
        "the good one is not named: {msg}"
    );
    assert_eq!(
        p.xds.status().state_updates,
        updates + 1,
        "one response, one swap"
    );
    assert_eq!(p.state.load().workloads().len(), 2);

    // Removal.
    put(&cache, vec![], &["Kubernetes//Pod/default/a"]);
    eventually("removal applied", || !has_ip(&p, [10, 0, 0, 1])).await;
    assert!(has_ip(&p, [10, 0, 0, 2]));
    let st = p.xds.status();
    assert!(st.connected && st.first_config_applied, "{st:?}");
    assert!(!addr_status(&p).last_acked_nonce.is_empty());
}

#[tokio::test]
async fn controller_away_keeps_state_and_reconnect_sends_only_changes() {
    let pki = Pki::new();
    let cache = Cache::new();
    put(
        &cache,
        vec![
            workload("a", &[10, 0, 0, 1]),
            workload("b", &[10, 0, 0, 2]),
            service("echo", [10, 96, 0, 1]),
        ],
        &[],
    );
    let ctl = Controller::start(&pki, cache.clone(), "127.0.0.1:0".parse().unwrap());
    let p = client(ctl.addr, pki.root());
    eventually("first config", || p.state.load().workloads().len() == 2).await;
    let before = addr_status(&p);
    assert_eq!(before.resources_received, 3);

    let addr = ctl.stop();
    eventually("disconnect noticed", || !p.xds.status().connected).await;
    // Retries fail for a while; the state stays.
    eventually("a few failed retries", || p.xds.status().failures >= 3).await;
    assert_eq!(p.state.load().workloads().len(), 2);
    assert!(p.xds.is_ready(), "the last good config keeps serving");

    // Changed while the controller was away: a removed, c added.
    put(
        &cache,
        vec![workload("c", &[10, 0, 0, 3])],
        &["Kubernetes//Pod/default/a"],
    );
    let ctl = Controller::start(&pki, cache.clone(), addr);
    eventually("converged after reconnect", || {
        has_ip(&p, [10, 0, 0, 3]) && !has_ip(&p, [10, 0, 0, 1])
    })
    .await;
    assert!(has_ip(&p, [10, 0, 0, 2]));
    let after = addr_status(&p);
    assert_eq!(
        after.resources_received - before.resources_received,
        1,
        "only c is sent again: b and the service were in initial_resource_versions"
    );
    assert_eq!(after.removals_received - before.removals_received, 1);
    assert!(p.xds.status().streams_opened >= 2);
    assert_eq!(ctl.server.nack_count(), 0);
}

fn authorization(name: &str, port: u32) -> (String, Any) {
    use xds_proto::istio::security as sec;
    let policy = Authorization {
        name: name.into(),
        namespace: "prod".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![port],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    (
        format!("prod/{name}"),
        Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: policy.encode_to_vec(),
        },
    )
}

fn policy_keys(p: &Proxy) -> Vec<String> {
    p.state
        .load()
        .policies()
        .policies()
        .map(|p| p.key())
        .collect()
}

#[tokio::test]
async fn authorization_applied_bad_one_nacked_removal_applied() {
    let pki = Pki::new();
    let cache = Cache::new();
    put(&cache, vec![workload("a", &[10, 0, 0, 1])], &[]);
    let (_, mut bad) = authorization("bad", 1);
    bad.value = vec![0xff, 0xff, 0xff];
    cache
        .apply(
            AUTHORIZATION_TYPE_URL,
            vec![authorization("deny-all", 8080), ("prod/bad".into(), bad)],
            vec![],
        )
        .unwrap();
    let ctl = Controller::start(&pki, cache.clone(), "127.0.0.1:0".parse().unwrap());
    let p = client(ctl.addr, pki.root());
    eventually("NACK of the bad policy", || ctl.server.nack_count() >= 1).await;
    eventually("the good policy applied", || {
        policy_keys(&p) == ["prod/deny-all"]
    })
    .await;
    assert!(has_ip(&p, [10, 0, 0, 1]), "addresses unaffected");
    let st = p.xds.status();
    let (_, msg) = st.types[AUTHORIZATION_TYPE_URL].last_nack.clone().unwrap();
    assert!(msg.contains("\"prod/bad\""), "{msg}");
    assert!(!msg.contains("deny-all"), "{msg}");
    assert_eq!(st.types[ADDRESS_TYPE_URL].nacks, 0);
    assert_eq!(st.policies, 1);
    assert!(p.xds.is_ready());

    // An Address change keeps the policies; a policy removal is applied.
    put(&cache, vec![workload("b", &[10, 0, 0, 2])], &[]);
    eventually("b applied", || has_ip(&p, [10, 0, 0, 2])).await;
    assert_eq!(policy_keys(&p), ["prod/deny-all"]);
    cache
        .apply(
            AUTHORIZATION_TYPE_URL,
            vec![authorization("other", 9090)],
            vec!["prod/deny-all".into(), "prod/bad".into()],
        )
        .unwrap();
    eventually("removal applied", || policy_keys(&p) == ["prod/other"]).await;
}

/// A policy pushed by the controller closes an open inbound connection it denies; an Address
/// change alone does not re-check anything.
#[tokio::test]
async fn a_pushed_policy_closes_an_open_connection_it_denies() {
    use crate::proxy::policy::{Peer, Registry, recheck_on_change};
    let pki = Pki::new();
    let cache = Cache::new();
    // The proxied workload lives in namespace prod, where the policies are.
    let (uid, mut any) = workload("server", &[10, 0, 0, 2]);
    let mut w = match Address::decode(any.value.as_slice()).unwrap().r#type {
        Some(address::Type::Workload(w)) => w,
        other => panic!("{other:?}"),
    };
    w.namespace = "prod".into();
    any.value = Address {
        r#type: Some(address::Type::Workload(w)),
    }
    .encode_to_vec();
    put(&cache, vec![(uid, any)], &[]);
    let ctl = Controller::start(&pki, cache.clone(), "127.0.0.1:0".parse().unwrap());
    let p = client(ctl.addr, pki.root());
    eventually("first config", || has_ip(&p, [10, 0, 0, 2])).await;

    let registry = Arc::new(Registry::default());
    tokio::spawn(recheck_on_change(
        p.publisher.clone(),
        registry.clone(),
        p.stop.clone(),
    ));
    let peer = |port: u16| Peer {
        src_ip: "10.0.0.1".parse().unwrap(),
        src_identity: None,
        dst: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
    };
    let key = zmesh_core::state::workload_key("prod", "server", "sa");
    let on_8080 = registry.register(&key, peer(8080));
    let on_9090 = registry.register(&key, peer(9090));

    put(&cache, vec![workload("other", &[10, 0, 0, 3])], &[]);
    eventually("address change applied", || has_ip(&p, [10, 0, 0, 3])).await;
    // Denies port 8080 in prod.
    cache
        .apply(
            AUTHORIZATION_TYPE_URL,
            vec![authorization("deny-8080", 8080)],
            vec![],
        )
        .unwrap();
    let policy = tokio::time::timeout(Duration::from_secs(20), on_8080.revoked())
        .await
        .expect("the denied connection was closed");
    assert_eq!(policy.policy(), Some("prod/deny-8080"));
    assert!(
        !on_9090.is_revoked(),
        "the other connection is still allowed"
    );
}

#[tokio::test]
async fn wrong_root_never_configures_and_keeps_retrying() {
    let pki = Pki::new();
    let other = Pki::new();
    let cache = Cache::new();
    put(&cache, vec![workload("a", &[10, 0, 0, 1])], &[]);
    let ctl = Controller::start(&pki, cache.clone(), "127.0.0.1:0".parse().unwrap());
    let p = client(ctl.addr, other.root());
    eventually("several failed attempts", || p.xds.status().failures >= 3).await;
    let st = p.xds.status();
    let err = st.last_error.unwrap();
    assert!(err.contains("cannot open the delta ADS stream"), "{err}");
    assert!(
        err.to_ascii_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "the reason is the certificate: {err}"
    );
    assert!(!st.connected && !st.first_config_applied);
    assert!(!p.xds.is_ready());
    assert!(p.state.load().workloads().is_empty());
    assert!(ctl.server.streams().is_empty());
}

#[test]
fn repeated_failures_are_rate_limited_and_backoff_grows() {
    let mut log = FailureLog::default();
    let wait = Duration::from_millis(10);
    assert!(log.failed("connection refused", wait));
    assert!(
        !log.failed("connection refused", wait),
        "same reason again: not at warn"
    );
    assert!(
        log.failed("certificate expired", wait),
        "a new reason is logged"
    );
    log.recovered();
    assert!(
        log.failed("certificate expired", wait),
        "after a recovery, logged again"
    );

    let mut b = Backoff::new();
    let waits: Vec<Duration> = (0..15).map(|_| b.next()).collect();
    assert!(waits[0] >= Duration::from_millis(8) && waits[0] <= Duration::from_millis(12));
    assert!(waits[5] > waits[0] * 20, "{waits:?}");
    assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
    assert!(waits[14] >= BACKOFF_MAX.mul_f64(0.8), "{waits:?}");
    b.reset();
    assert!(b.next() <= Duration::from_millis(12));
}
