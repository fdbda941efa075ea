//! In-pod capture under faults of the CNI side, end to end on a two-node [`Cluster`]:
//!
//! - the node agent killed (SIGKILL) in the middle of a CNI ADD, at the two points where a
//!   half-done enrolment could let a pod start uncaptured: after its rules are installed but
//!   before ztunnel knows it, and after ztunnel's ack but before the plugin has its answer;
//! - the ZDS connection dropped mid-snapshot, between the agent's snapshot messages and
//!   `SnapshotSent`.
//!
//! The timing is made deterministic by the agent's fault injection
//! (`cni-plugin/src/agent/fault.rs`, off unless its environment variable is set). Needs root,
//! containernetworking-plugins and `cargo build --workspace --bins`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use zmesh_tests::apps::{EchoServer, connect, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::cluster::{Cluster, Pod};
use zmesh_tests::probe::mtls_from;
use zmesh_tests::runtime::PluginError;
use zmesh_tests::{Sandbox, pattern, poll, unique_marker};

const ECHO_PORT: u16 = 8080;
const AMBIENT: Option<&str> = Some("ambient");
/// The agent's fault variables (`cni-plugin/src/agent/fault.rs`).
const PAUSE_ADD: &str = "ZMESH_AGENT_FAULT_PAUSE_ADD";
const ZDS_DROP_AFTER: &str = "ZMESH_AGENT_FAULT_ZDS_DROP_AFTER";
/// Generous: the machine is shared and the agent, ztunnel and the runtime all restart.
const CONVERGE: Duration = Duration::from_secs(60);

/// `shop/echo` on n2 with an echo app: the peer every checked connection goes to.
fn echo_server(cluster: &Cluster<'_>) -> (Pod, EchoServer) {
    let server = cluster
        .create_pod("n2", "shop", "echo", "echo", &[])
        .unwrap();
    assert!(server.enrolled);
    let app = EchoServer::start(cluster.sandbox(), &server.netns, ECHO_PORT, "echo").unwrap();
    (server, app)
}

/// One connection from `client` to `server`'s app carried over HBONE: echoed intact, its
/// plaintext marker absent from the node link while the capture saw frames and dropped none,
/// and counted by n2's ztunnel as mutual TLS from the client's identity.
fn over_hbone(cluster: &Cluster<'_>, client: &Pod, server: &Pod) {
    let sb = cluster.sandbox();
    let mtls = || mtls_from(cluster, "n2", client);
    let before = mtls();
    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(32 << 10, 7));
    let cap = Capture::start(sb, &cluster.node_link(&client.node)).unwrap();
    let got = transfer(sb, &client.netns, server.addr(ECHO_PORT), &payload).unwrap();
    let seen = cap.stop().unwrap();
    assert_eq!(got, payload, "{}: the echo came back altered", client.name);
    assert_eq!(seen.drops, 0, "the capture dropped frames");
    assert!(seen.frames > 0, "nothing crossed the node link");
    assert!(
        !seen.contains(marker.as_bytes()),
        "{}: plaintext on the node link",
        client.name
    );
    poll(
        &format!("n2 to count {}'s connection as mutual TLS", client.name),
        CONVERGE,
        || mtls() > before,
    );
}

/// The in-pod proxies of `node`'s ztunnel, as (pod uid, netns id), from its config dump.
fn proxies(cluster: &Cluster<'_>, node: &str) -> Vec<(String, String)> {
    let dump: serde_json::Value =
        serde_json::from_str(&cluster.ztunnel(node).unwrap().config_dump().unwrap()).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let mut all: Vec<_> = dump["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (text(&p["key"]), text(&p["netns"])))
        .collect();
    all.sort();
    all
}

/// The uids `node`'s ztunnel serves, sorted, each as often as it has a proxy.
fn served(cluster: &Cluster<'_>, node: &str) -> Vec<String> {
    proxies(cluster, node)
        .into_iter()
        .map(|(uid, _)| uid)
        .collect()
}

/// How many sockets listen on TCP `port` in a netns (one per proxy serving the pod).
fn listeners(cluster: &Cluster<'_>, netns: &str, port: u16) -> usize {
    cluster
        .sandbox()
        .run_in(netns, &["ss", "-Hltn", &format!("sport = :{port}")])
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Asserts the pod is served by exactly one proxy: one listener on each of ztunnel's ports.
fn served_once(cluster: &Cluster<'_>, pod: &Pod) {
    for port in [15001, 15006, 15008] {
        assert_eq!(
            listeners(cluster, &pod.netns, port),
            1,
            "{}: listeners on {port}",
            pod.name
        );
    }
}

fn netns_exists(sb: &Sandbox, netns: &str) -> bool {
    sb.run(&["ip", "netns", "list"])
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(netns))
}

fn ztunnel_log(cluster: &Cluster<'_>) -> String {
    cluster.ztunnel("n1").unwrap().log()
}

/// The lines of a ztunnel log that say `what` about the pod `uid` (field `uid="<uid>"`).
fn log_lines(log: &str, what: &str, uid: &str) -> usize {
    let field = format!("uid={uid:?}");
    log.lines()
        .filter(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
        .count()
}

fn occurrences(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn an_agent_killed_during_add_never_leaves_the_pod_running_uncaptured() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let (server, _app) = echo_server(&cluster);
    let mut enrolled = Vec::new();
    for point in ["after-rules", "after-ack"] {
        let name = format!("web-{point}");
        let netns = format!("pod-{name}");
        cluster.stop_agent("n1").unwrap();
        cluster
            .start_agent_with("n1", &[(PAUSE_ADD, point)])
            .unwrap();
        let agent = cluster.agent("n1").unwrap().unwrap().clone();
        let paused = format!("fault injection: ADD paused at {point}");
        let before = occurrences(&agent.log(), &paused);

        let outcome = std::thread::scope(|s| {
            let add = s.spawn(|| cluster.try_create_pod("n1", "shop", &name, "web", &[]));
            poll(
                &format!("the agent to pause the ADD {point}"),
                CONVERGE,
                || occurrences(&agent.log(), &paused) > before,
            );
            // The kill lands where it should: rules in, and ztunnel told only after the ack.
            assert!(cluster.has_rules(&netns).unwrap(), "{point}: no rules yet");
            assert_eq!(
                cluster.listening(&netns, 15001).unwrap(),
                point == "after-ack",
                "{point}: ztunnel's listener"
            );
            agent.kill().unwrap();
            add.join().unwrap()
        });
        let err = outcome
            .expect_err("ADD succeeded although the agent died before answering")
            .downcast::<PluginError>()
            .unwrap();
        assert_eq!((err.plugin.as_str(), err.code), ("zmesh-cni", 11), "{err}");
        // The runtime tore the sandbox down: no pod runs, captured or not.
        assert!(!netns_exists(&sb, &netns), "{point}: the sandbox survived");

        // Back without the fault, the retried ADD (a new sandbox, as kubelet makes) enrols it.
        cluster.stop_agent("n1").unwrap();
        cluster.start_agent("n1").unwrap();
        let pod = cluster.create_pod("n1", "shop", &name, "web", &[]).unwrap();
        assert!(pod.enrolled && cluster.has_rules(&pod.netns).unwrap());
        enrolled.push(pod.sandbox.uid.clone());
        enrolled.sort();
        poll(
            &format!("n1's ztunnel to serve exactly {enrolled:?}"),
            CONVERGE,
            || served(&cluster, "n1") == enrolled,
        );
        served_once(&cluster, &pod);
        over_hbone(&cluster, &pod, &server);
    }
}

/// Writes `data` on an established connection and reads the echo back.
fn echo_on(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).unwrap();
    let mut got = vec![0; data.len()];
    stream.read_exact(&mut got).unwrap();
    got
}

#[test]
fn a_zds_connection_dropped_mid_snapshot_leaves_every_pod_served_exactly_once() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let (server, _app) = echo_server(&cluster);
    let pods: Vec<Pod> = ["a", "b", "c"]
        .iter()
        .map(|n| cluster.create_pod("n1", "shop", n, "web", &[]).unwrap())
        .collect();
    let (kept, gone) = (&pods[..2], &pods[2]);
    let mut open: Vec<TcpStream> = kept
        .iter()
        .map(|p| connect(&sb, &p.netns, server.addr(ECHO_PORT)).unwrap())
        .collect();
    for s in &mut open {
        assert_eq!(echo_on(s, b"before"), b"before");
    }
    let before = proxies(&cluster, "n1");
    assert_eq!(before.len(), 3, "{before:?}");

    // While the agent is down, pod c goes away (its DEL cannot reach the agent): only a
    // complete snapshot may tell ztunnel to let go of it.
    let lost_before = occurrences(&ztunnel_log(&cluster), "lost the node agent");
    let applied_before = occurrences(&ztunnel_log(&cluster), "snapshot applied");
    cluster.stop_agent("n1").unwrap();
    cluster.delete_pod(gone).unwrap();

    // The new agent cuts its first snapshot (a, b) after one pod.
    cluster
        .start_agent_with("n1", &[(ZDS_DROP_AFTER, "1")])
        .unwrap();
    let agent = cluster.agent("n1").unwrap().unwrap().clone();
    poll("the agent to drop ZDS mid-snapshot", CONVERGE, || {
        agent
            .log()
            .contains("fault injection: dropping the ZDS connection mid-snapshot")
    });
    poll("ztunnel to apply a complete snapshot", CONVERGE, || {
        occurrences(&ztunnel_log(&cluster), "snapshot applied") > applied_before
    });
    // ztunnel lost the agent twice (its stop, then the cut) and applied one snapshot since:
    // the cut one was never applied.
    let log = ztunnel_log(&cluster);
    assert!(
        occurrences(&log, "lost the node agent") >= lost_before + 2,
        "ztunnel did not see the drop:\n{log}"
    );
    assert_eq!(occurrences(&log, "snapshot applied"), applied_before + 1);
    let agent_log = agent.log();
    let cut = agent_log
        .rfind("dropping the ZDS connection mid-snapshot")
        .unwrap();
    assert!(
        agent_log[cut..]
            .lines()
            .any(|l| l.contains("snapshot sent to ztunnel") && l.contains("pods=2")),
        "no complete snapshot after the cut:\n{agent_log}"
    );

    // None lost, none duplicated, the stale one dropped: a and b keep their first proxies.
    let want: Vec<_> = before
        .iter()
        .filter(|(uid, _)| *uid != gone.sandbox.uid)
        .cloned()
        .collect();
    poll("n1's ztunnel to drop the deleted pod", CONVERGE, || {
        proxies(&cluster, "n1") == want
    });
    for pod in kept {
        served_once(&cluster, pod);
    }
    // ztunnel started one proxy per pod for the whole run and drained only c's.
    let log = ztunnel_log(&cluster);
    for pod in &pods {
        assert_eq!(
            log_lines(&log, "pod enrolled: proxy listening", &pod.sandbox.uid),
            1,
            "{}: proxies started:\n{log}",
            pod.name
        );
        let drained = log_lines(&log, "draining its proxy", &pod.sandbox.uid);
        assert_eq!(
            drained,
            usize::from(pod.name == gone.name),
            "{}:\n{log}",
            pod.name
        );
    }
    assert!(!log.contains("restarting its proxy"), "{log}");
    // Their open connections were never cut, and new ones still go over HBONE.
    for s in &mut open {
        assert_eq!(echo_on(s, b"after"), b"after");
    }
    for pod in kept {
        over_hbone(&cluster, pod, &server);
    }
    // The agent serves ADDs again.
    assert_eq!(cluster.agent_ready("n1").unwrap(), 200);
    let d = cluster.create_pod("n1", "shop", "d", "web", &[]).unwrap();
    assert!(d.enrolled);
    served_once(&cluster, &d);
    over_hbone(&cluster, &d, &server);
    assert_eq!(served(&cluster, "n1").len(), 3);
}
