//! Kubelet probes and in-pod capture (root, in a sandbox): once the agent's dataplane enrols a
//! pod, node-local TCP to it (the kubelet's probes) leaves the node from 169.254.7.127 and
//! reaches the app directly, while the same port from another host is captured to ztunnel's
//! inbound listener. A prober on the node and a peer host check both.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use zmesh_cni::agent::{Dataplane, PodRecord, RulesAndZds};
use zmesh_cni::rules::{Backend, HostConfig, RuleConfig};
use zmesh_core::zds::{ZdsClient, ZdsServer};
use zmesh_tests::Sandbox;
use zmesh_tests::apps::EchoServer;
use zmesh_tests::lab::Topology;

/// A listener standing in for ztunnel's 15006: answers `ztunnel` and closes.
fn fake_inbound(sb: &Sandbox, host: &str) {
    let l = sb
        .in_netns(host, || TcpListener::bind("0.0.0.0:15006"))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, b"ztunnel\n");
        }
    });
}

/// Connects from `host` to `dst` and returns the first line the server says.
fn hello(sb: &Sandbox, host: &str, dst: SocketAddr) -> String {
    let mut s = sb
        .in_netns(host, || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut s, b"WHO\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_bypass_capture_while_peers_are_captured() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["node", "pod", "peer"]).unwrap();
    let (node_ip, pod_ip) = (topo.host_ip("node"), topo.host_ip("pod"));
    // As on a real node, the pod's replies to the probe address go back through its node.
    sb.run_in(
        "pod",
        &[
            "ip",
            "route",
            "add",
            "169.254.7.127/32",
            "via",
            &node_ip.to_string(),
        ],
    )
    .unwrap();
    let app = EchoServer::start(&sb, "pod", 8080, "app").unwrap();
    fake_inbound(&sb, "pod");

    let uds = sb.dir().join("zds.sock");
    let zds = ZdsServer::bind(&uds, Vec::new).unwrap();
    let mut client = ZdsClient::new(&uds);
    tokio::spawn(async move {
        loop {
            if client.next().await.is_request() {
                client.reply(Ok(())).await;
            }
        }
    });
    zds.wait_connected().await;
    let node_netns: PathBuf = sb.netns_path(Some("node"));
    let dataplane = RulesAndZds::new(zds, Backend::Nftables, RuleConfig::default())
        .with_probe_snat(Some(node_netns), HostConfig::default())
        .unwrap();
    let pod = PodRecord {
        uid: "uid-1".into(),
        name: "app".into(),
        namespace: "default".into(),
        service_account: "app".into(),
        netns: sb.netns_path(Some("pod")),
        ips: vec![IpAddr::V4(pod_ip)],
        container_id: "c1".into(),
        enrolled: true,
    };
    let netns = std::fs::File::open(&pod.netns).unwrap();
    dataplane.enrol(&pod, &netns).await.unwrap();

    let dst = SocketAddr::new(pod_ip.into(), 8080);
    let (sb2, d) = (&sb, dst);
    let (from_node, from_peer) =
        tokio::task::block_in_place(|| (hello(sb2, "node", d), hello(sb2, "peer", d)));
    assert_eq!(
        from_node, "app",
        "the node's probe was captured instead of reaching the app"
    );
    assert_eq!(from_peer, "ztunnel", "a peer's connection was not captured");
    let probe_src: IpAddr = "169.254.7.127".parse().unwrap();
    assert!(
        app.peers().iter().any(|p| p.ip() == probe_src),
        "the probe did not come from the probe address: {:?}",
        app.peers()
    );

    // Un-enrolled: the node's set no longer holds the pod, and the pod's rules are gone.
    dataplane.unenrol(&pod).await.unwrap();
    let set = sb.run_in("node", &["nft", "list", "ruleset"]).unwrap();
    assert!(
        !set.contains(&pod_ip.to_string()),
        "pod still in the probe set:\n{set}"
    );
    let from_peer = tokio::task::block_in_place(|| hello(&sb, "peer", dst));
    assert_eq!(from_peer, "app");
}
