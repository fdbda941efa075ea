//! The node agent with its real dataplane in a private `zmesh_tests::Sandbox` (needs root):
//! a lab host's netns plays the pod, the real nftables rules go into it, a real ZDS server
//! hands it to a test ztunnel (core's `ZdsClient`, acking everything), and the plugin API is
//! spoken over the real unix socket. Also: a restarted agent's state check against the live
//! netns.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use zmesh_cni::agent::cluster::parse_text;
use zmesh_cni::agent::state::netns_addresses;
use zmesh_cni::agent::{Agent, AgentConfig, ApiServer, RulesAndZds, StateStore, StaticSource};
use zmesh_cni::api::{
    ADD_PATH, AddRequest, AddResponse, AgentClient, DEL_PATH, DelRequest, HttpResponse,
};
use zmesh_cni::rules::{Backend, RuleConfig};
use zmesh_core::zds::{Event, ZdsClient, ZdsServer};
use zmesh_tests::Sandbox;
use zmesh_tests::lab::Topology;

const PODS: &str = "apiVersion: v1\nkind: Namespace\n\
    metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: shop, uid: u-app}\n\
    spec: {nodeName: n1, serviceAccountName: app-sa}\n";

/// A test ztunnel: connects, acks every request, and forwards every event.
fn test_ztunnel(socket: &Path) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut client = ZdsClient::new(socket);
    tokio::spawn(async move {
        loop {
            let event = client.next().await;
            let request = event.is_request();
            if tx.send(event).is_err() {
                return;
            }
            if request {
                client.reply(Ok(())).await;
            }
        }
    });
    rx
}

/// The next request event (skipping connection events and the snapshot's end).
async fn next_request(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a ZDS event within 10 s")
            .expect("the test ztunnel is running");
        if !matches!(
            event,
            Event::Connected | Event::SnapshotSent | Event::Disconnected { .. }
        ) {
            return event;
        }
    }
}

async fn post<T: serde::Serialize + Send + 'static>(
    client: &AgentClient,
    path: &'static str,
    body: T,
) -> HttpResponse {
    let client = client.clone();
    tokio::task::spawn_blocking(move || client.post_json(path, &body, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap()
}

fn ruleset(sb: &Sandbox) -> String {
    sb.run_in("pod", &["nft", "list", "ruleset"]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn add_installs_rules_and_hands_the_netns_to_ztunnel_del_undoes_it() {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    let topo = Topology::build(&sb, &["pod"]).unwrap();
    let netns = sb.netns_path(Some("pod"));
    let pod_ip = topo.host_ip("pod");
    let dir = tempfile::tempdir().unwrap();

    let state_path = dir.path().join("pods.json");
    let state = Arc::new(StateStore::open(&state_path).unwrap());
    let zds_socket = dir.path().join("ztunnel.sock");
    let zds = ZdsServer::bind(&zds_socket, {
        let state = state.clone();
        move || state.snapshot()
    })
    .unwrap();
    let mut ztunnel = test_ztunnel(&zds_socket);
    tokio::time::timeout(Duration::from_secs(10), zds.wait_connected())
        .await
        .expect("the test ztunnel connects");

    let source = StaticSource::new(parse_text(Path::new("pods.yaml"), PODS).unwrap());
    let dataplane = RulesAndZds::new(zds.clone(), Backend::Nftables, RuleConfig::default());
    let agent = Arc::new(Agent::new(
        AgentConfig::new("n1"),
        &source,
        dataplane,
        state.clone(),
    ));
    let socket = dir.path().join("agent.sock");
    let _api = ApiServer::bind(&socket, agent).unwrap();
    let client = AgentClient::new(&socket);
    assert!(!ruleset(&sb).contains("zmesh"));

    let add = AddRequest {
        container_id: "c-app".into(),
        netns: netns.display().to_string(),
        ifname: "eth0".into(),
        pod_name: "app".into(),
        pod_namespace: "shop".into(),
        pod_uid: "u-app".into(),
        ips: vec![format!("{pod_ip}/24")],
    };
    let answer = post(&client, ADD_PATH, add).await;
    assert_eq!(answer.status, 200, "{}", answer.error_text());
    let added: AddResponse = serde_json::from_slice(&answer.body).unwrap();
    assert!(added.enrolled);

    let rules = ruleset(&sb);
    assert!(rules.contains("table inet zmesh-nat"), "{rules}");
    assert!(rules.contains("redirect to :15001"), "{rules}");
    match next_request(&mut ztunnel).await {
        Event::Add {
            uid,
            info,
            netns: fd,
        } => {
            assert_eq!(uid, "u-app");
            assert_eq!(
                (info.name.as_str(), info.namespace.as_str()),
                ("app", "shop")
            );
            assert_eq!(info.service_account, "app-sa");
            let sent = nix::sys::stat::fstat(&fd).unwrap();
            assert_eq!(sent.st_ino, std::fs::metadata(&netns).unwrap().ino());
        }
        other => panic!("expected Add, got {other:?}"),
    }

    // A ztunnel that connects now (e.g. a new ztunnel during an upgrade) gets the pod in
    // its snapshot, with the same netns.
    let mut second = test_ztunnel(&zds_socket);
    match next_request(&mut second).await {
        Event::Add { uid, netns: fd, .. } => {
            assert_eq!(uid, "u-app");
            let sent = nix::sys::stat::fstat(&fd).unwrap();
            assert_eq!(sent.st_ino, std::fs::metadata(&netns).unwrap().ino());
        }
        other => panic!("expected the snapshot's Add, got {other:?}"),
    }

    // What a restarted agent would keep: the netns exists and holds the pod's IP.
    let addrs = netns_addresses(&std::fs::File::open(&netns).unwrap()).unwrap();
    assert!(addrs.contains(&pod_ip.into()), "{addrs:?}");
    let copy = dir.path().join("copy.json");
    std::fs::copy(&state_path, &copy).unwrap();
    let restored = StateStore::open(&copy).unwrap();
    assert!(restored.get("u-app").is_some_and(|r| r.enrolled));
    // ... and not when the path now holds another address.
    let text = std::fs::read_to_string(&copy)
        .unwrap()
        .replace(&pod_ip.to_string(), "192.0.2.99");
    std::fs::write(&copy, text).unwrap();
    assert!(StateStore::open(&copy).unwrap().get("u-app").is_none());

    let del = DelRequest {
        container_id: "c-app".into(),
        netns: netns.display().to_string(),
        pod_name: "app".into(),
        pod_namespace: "shop".into(),
        pod_uid: "u-app".into(),
    };
    assert_eq!(post(&client, DEL_PATH, del).await.status, 200);
    assert!(!ruleset(&sb).contains("zmesh"), "{}", ruleset(&sb));
    for zt in [&mut ztunnel, &mut second] {
        match next_request(zt).await {
            Event::Del { uid } => assert_eq!(uid, "u-app"),
            other => panic!("expected Del, got {other:?}"),
        }
    }
    assert!(state.records().is_empty());
    zds.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ztunnel_add_fails_closed_and_leaves_no_rules() {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    let topo = Topology::build(&sb, &["pod"]).unwrap();
    let netns = sb.netns_path(Some("pod"));
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(&dir.path().join("pods.json")).unwrap());
    let zds = ZdsServer::bind(dir.path().join("ztunnel.sock"), {
        let state = state.clone();
        move || state.snapshot()
    })
    .unwrap();
    let source = StaticSource::new(parse_text(Path::new("pods.yaml"), PODS).unwrap());
    let dataplane = RulesAndZds::new(zds.clone(), Backend::Nftables, RuleConfig::default());
    let agent = Arc::new(Agent::new(
        AgentConfig::new("n1"),
        &source,
        dataplane,
        state.clone(),
    ));
    let socket = dir.path().join("agent.sock");
    let _api = ApiServer::bind(&socket, agent).unwrap();

    let add = AddRequest {
        container_id: "c-app".into(),
        netns: netns.display().to_string(),
        ifname: "eth0".into(),
        pod_name: "app".into(),
        pod_namespace: "shop".into(),
        pod_uid: "u-app".into(),
        ips: vec![format!("{}/24", topo.host_ip("pod"))],
    };
    let answer = post(&AgentClient::new(&socket), ADD_PATH, add).await;
    assert_eq!(answer.status, 503);
    let error = answer.error_text();
    assert!(
        error.contains("no ztunnel is connected") && error.contains("rolled back"),
        "{error}"
    );
    let rules = ruleset(&sb);
    assert!(!rules.contains("zmesh"), "rules left behind:\n{rules}");
    let routes = sb.run_in("pod", &["ip", "rule", "show"]).unwrap();
    assert!(!routes.contains("lookup 100"), "{routes}");
    assert!(state.records().is_empty());
    zds.shutdown().await;
}
