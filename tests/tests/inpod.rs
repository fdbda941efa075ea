//! In-pod capture end to end, on a two-node [`Cluster`] built as a real cluster is: the node
//! agents chain `zmesh-cni` into each node's primary CNI config, each node's ztunnel is a pod
//! of `istio-system` running in shared mode, and app pods are created through the node's CNI
//! runtime (Debian's bridge + host-local, then `zmesh-cni`). Needs root,
//! containernetworking-plugins and `cargo build --workspace --bins`.

use std::io::Read;
use std::net::Shutdown;
use std::time::Duration;

use zmesh_tests::apps::{EchoServer, connect, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::cluster::{Cluster, Pod};
use zmesh_tests::probe::{echo_on, mtls_from};
use zmesh_tests::runtime::PluginError;
use zmesh_tests::ztunnel::metric_value;
use zmesh_tests::{Sandbox, pattern, poll, unique_marker};

const ECHO_PORT: u16 = 8080;
const AMBIENT: Option<&str> = Some("ambient");

/// Sends `marker` + 64 KiB from `client` to `server`'s echo app while capturing on the node
/// link of `client`'s node; checks the echo and returns whether the marker was on the wire.
fn marker_on_the_wire(cluster: &Cluster<'_>, client: &Pod, server: &Pod) -> bool {
    let sb = cluster.sandbox();
    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(64 << 10, 3));
    let cap = Capture::start(sb, &cluster.node_link(&client.node)).unwrap();
    let got = transfer(sb, &client.netns, server.addr(ECHO_PORT), &payload).unwrap();
    let seen = cap.stop().unwrap();
    assert_eq!(got, payload, "the echo came back altered");
    assert_eq!(seen.drops, 0, "the capture dropped frames");
    assert!(seen.frames > 0, "nothing crossed the node link");
    seen.contains(marker.as_bytes())
}

/// The enrolled pair: `shop/client` on n1 (sa `client`) and `shop/echo` on n2 (sa `echo`).
fn enrolled_pair(cluster: &Cluster<'_>) -> (Pod, Pod, EchoServer) {
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let client = cluster
        .create_pod("n1", "shop", "client", "client", &[])
        .unwrap();
    let server = cluster
        .create_pod("n2", "shop", "echo", "echo", &[])
        .unwrap();
    assert!(client.enrolled && server.enrolled);
    let app = EchoServer::start(cluster.sandbox(), &server.netns, ECHO_PORT, "echo").unwrap();
    (client, server, app)
}

#[test]
fn enrolled_pods_talk_mtls_across_nodes_and_unenrolled_ones_in_plaintext() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, server, app) = enrolled_pair(&cluster);
    for port in [15001, 15006, 15008] {
        assert!(cluster.listening(&client.netns, port).unwrap(), "{port}");
    }

    assert!(
        !marker_on_the_wire(&cluster, &client, &server),
        "plaintext of an enrolled pair on the node link"
    );
    let seen = mtls_from(&cluster, "n2", &client);
    assert!(
        seen >= 1.0,
        "n2's ztunnel did not see {}",
        client.spiffe_id()
    );
    // The tunnel was opened from inside the client pod: its TCP peer is the pod's own IP.
    let from_pod = format!("src.addr={}:", client.ip);
    poll(
        "n2's access log line for the client",
        Duration::from_secs(5),
        || cluster.ztunnel("n2").unwrap().log().contains(&from_pod),
    );
    // And the app sees the client's own address, not its ztunnel's (original source).
    assert!(
        app.peers().iter().any(|p| p.ip() == client.ip),
        "the app saw {:?}, not the client {}",
        app.peers(),
        client.ip
    );

    // Positive control: the same check sees the marker between unenrolled pods.
    let plain_client = cluster
        .create_pod("n1", "legacy", "plain-client", "default", &[])
        .unwrap();
    let plain_server = cluster
        .create_pod("n2", "legacy", "plain-echo", "default", &[])
        .unwrap();
    assert!(!plain_client.enrolled && !plain_server.enrolled);
    let _plain = EchoServer::start(&sb, &plain_server.netns, ECHO_PORT, "plain").unwrap();
    assert!(
        marker_on_the_wire(&cluster, &plain_client, &plain_server),
        "the capture missed the plaintext marker of an unenrolled pair"
    );
}

#[test]
fn unenrolled_pods_are_left_untouched() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1"]).unwrap();
    let pod = cluster
        .create_pod("n1", "legacy", "plain", "default", &[])
        .unwrap();
    assert!(!pod.enrolled);
    assert!(
        !cluster.has_rules(&pod.netns).unwrap(),
        "rules in an unenrolled pod"
    );
    assert!(!cluster.listening(&pod.netns, 15001).unwrap());
    // An opted-out pod of an enrolled namespace is left alone too.
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let out = cluster
        .create_pod(
            "n1",
            "shop",
            "opted-out",
            "default",
            &[("istio.io/dataplane-mode", "none")],
        )
        .unwrap();
    assert!(!out.enrolled);
    assert!(!cluster.has_rules(&out.netns).unwrap());
    assert!(!cluster.listening(&out.netns, 15001).unwrap());
}

#[test]
fn a_mesh_pod_cannot_start_while_the_agent_is_down() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1"]).unwrap();
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    cluster.stop_agent("n1").unwrap();
    let err = cluster
        .try_create_pod("n1", "shop", "web", "web", &[])
        .unwrap_err();
    let err = err.downcast::<PluginError>().unwrap();
    assert_eq!((err.plugin.as_str(), err.code), ("zmesh-cni", 11), "{err}");
    assert!(
        !sb.run(&["ip", "netns", "list"])
            .unwrap()
            .contains("pod-web")
    );

    cluster.start_agent("n1").unwrap();
    let pod = cluster.create_pod("n1", "shop", "web", "web", &[]).unwrap();
    assert!(pod.enrolled);
    assert!(cluster.has_rules(&pod.netns).unwrap());
    assert!(cluster.listening(&pod.netns, 15001).unwrap());

    // Deleting the pod releases it: ztunnel lets go of it, and its netns is gone.
    let ztunnel = cluster.ztunnel("n1").unwrap();
    assert!(ztunnel.config_dump().unwrap().contains(&pod.sandbox.uid));
    cluster.delete_pod(&pod).unwrap();
    poll("ztunnel to drop the pod", Duration::from_secs(10), || {
        !ztunnel.config_dump().unwrap().contains(&pod.sandbox.uid)
    });
    assert!(
        !sb.run(&["ip", "netns", "list"])
            .unwrap()
            .contains("pod-web")
    );
}

#[test]
fn labelling_a_namespace_enrols_its_running_pods_and_unlabelling_releases_them() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1"]).unwrap();
    let pods: Vec<Pod> = ["a", "b"]
        .iter()
        .map(|n| cluster.create_pod("n1", "shop", n, "default", &[]).unwrap())
        .collect();
    for p in &pods {
        assert!(!p.enrolled && !cluster.has_rules(&p.netns).unwrap());
    }
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    for p in &pods {
        poll(
            &format!("{} to be enrolled", p.name),
            Duration::from_secs(30),
            || cluster.has_rules(&p.netns).unwrap() && cluster.listening(&p.netns, 15001).unwrap(),
        );
    }
    cluster.set_namespace_label("shop", None).unwrap();
    for p in &pods {
        poll(
            &format!("{} to be released", p.name),
            Duration::from_secs(30),
            || {
                !cluster.has_rules(&p.netns).unwrap()
                    && !cluster.listening(&p.netns, 15001).unwrap()
            },
        );
    }
}

/// One more connection of the enrolled pair: echoed intact, no plaintext on the node link,
/// and counted by n2's ztunnel as mutual TLS from the client's identity.
fn still_captured(cluster: &Cluster<'_>, client: &Pod, server: &Pod) {
    let before = mtls_from(cluster, "n2", client);
    assert!(
        !marker_on_the_wire(cluster, client, server),
        "plaintext on the node link"
    );
    poll(
        "n2 to count the connection",
        Duration::from_secs(10),
        || mtls_from(cluster, "n2", client) > before,
    );
}

#[test]
fn enrolment_survives_agent_and_ztunnel_restarts() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, server, _app) = enrolled_pair(&cluster);
    still_captured(&cluster, &client, &server);

    cluster.restart_agent("n1").unwrap();
    assert!(cluster.has_rules(&client.netns).unwrap());
    still_captured(&cluster, &client, &server);

    cluster.restart_ztunnel("n1").unwrap();
    still_captured(&cluster, &client, &server);
    cluster.restart_ztunnel("n2").unwrap();
    still_captured(&cluster, &client, &server);
}

#[test]
fn a_ztunnel_upgrade_keeps_open_connections_until_they_close() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, server, _app) = enrolled_pair(&cluster);
    let mut open = connect(&sb, &client.netns, server.addr(ECHO_PORT)).unwrap();
    assert_eq!(echo_on(&mut open, b"before").unwrap(), b"before");

    // The new ztunnel comes up beside the old one; then the old one is told to go.
    let old = cluster.upgrade_ztunnel("n1").unwrap();
    assert!(cluster.listening(&client.netns, 15001).unwrap());
    old.process().signal(libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(old.process().is_running(), "the old ztunnel did not drain");

    // The established connection still works through the draining ztunnel ...
    assert_eq!(echo_on(&mut open, b"during").unwrap(), b"during");
    // ... while new connections go to the new one, still over mutual TLS.
    still_captured(&cluster, &client, &server);
    let new_source = metric_value(
        &cluster.ztunnel("n1").unwrap().metrics().unwrap(),
        "istio_tcp_connections_opened_total",
        &[("reporter", "source")],
    );
    assert!(new_source >= 1.0, "the new ztunnel carried no connection");

    // Once the connection closes, the old ztunnel exits, within its drain deadline (5 s).
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let status = old.process().wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "old ztunnel: {status:?}"
    );
    assert!(
        old.log().contains("drained: all connections finished"),
        "the old ztunnel cut the connection at its deadline:\n{}",
        old.log()
    );
    still_captured(&cluster, &client, &server);
}
