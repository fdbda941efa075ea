//! Faults end to end on the lab [`Cluster`]: the controller killed (SIGKILL) and restarted
//! under traffic, a node's ztunnel killed with SIGKILL in shared mode, a node's link down and
//! up, and the controller unreachable (blackholed, not killed). Each checks what must hold
//! while the fault lasts and that the mesh comes back on its own once it ends. Needs root,
//! containernetworking-plugins and `cargo build --workspace --bins`.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zmesh_tests::apps::{EchoServer, connect, transfer};
use zmesh_tests::capture::{Capture, Captured, TcpSegment};
use zmesh_tests::cluster::{Cluster, Pod};
use zmesh_tests::probe::{self, ECHO_PORT, echo_on, mtls_from, put_web_service, vip, who};
use zmesh_tests::process::tail;
use zmesh_tests::{Sandbox, pattern, poll, unique_marker};

const HBONE_PORT: u16 = 15008;
const AMBIENT: Option<&str> = Some("ambient");
/// Generous: a push crosses a file watch, a debounce, gRPC and a config swap, on a loaded
/// machine, possibly after a reconnect backoff (at most 15 s).
const CONVERGE: Duration = Duration::from_secs(60);
/// Long enough for HTTP/2 keepalive (a PING every 10 s on HBONE, 30 s on the controller
/// channel, then 20 s / 10 s for the answer) to declare a silent peer dead, with margin.
const KEEPALIVE_DEATH: Duration = Duration::from_secs(120);

/// The JSON of a node's ztunnel `/config_dump`.
fn dump(cluster: &Cluster<'_>, node: &str) -> serde_json::Value {
    let text = cluster.ztunnel(node).unwrap().config_dump().unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A node's xDS client status: (connected, streams opened so far).
fn xds(cluster: &Cluster<'_>, node: &str) -> (bool, u64) {
    let x = &dump(cluster, node)["xds"];
    (
        x["connected"].as_bool().unwrap(),
        x["streams_opened"].as_u64().unwrap(),
    )
}

/// `not_before` of the certificate `node`'s ztunnel holds for `identity`.
fn cert_not_before(cluster: &Cluster<'_>, node: &str, identity: &str) -> Option<String> {
    dump(cluster, node)["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["not_before"].as_str().map(str::to_owned))
}

/// HBONE connections the pool of `pod`'s proxy (on its node's ztunnel) has opened so far.
fn pool_opened(cluster: &Cluster<'_>, pod: &Pod) -> u64 {
    dump(cluster, &pod.node)["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["workload"]["name"] == pod.name.as_str())
        .unwrap_or_else(|| panic!("no proxy for {} on {}", pod.name, pod.node))["pool"]
        ["connections_opened"]
        .as_u64()
        .unwrap()
}

/// An open connection that sends a numbered line and reads its echo every 20 ms on its own
/// thread until stopped, counting round trips and ending at the first failure.
struct Chatter {
    name: String,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Chatter {
    fn start(mut conn: TcpStream, name: &str) -> Chatter {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (stop2, rounds2, name2) = (stop.clone(), rounds.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let line = format!("{name2} {i}\n");
                match echo_on(&mut conn, line.as_bytes()) {
                    Ok(got) if got == line.as_bytes() => {}
                    Ok(got) => return Err(format!("round {i}: echo {got:?} for {line:?}")),
                    Err(e) => return Err(format!("round {i}: {e}")),
                }
                rounds2.fetch_add(1, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        Chatter {
            name: name.to_owned(),
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Waits until `more` round trips have completed from now: the connection carries data
    /// at this moment. Panics with the thread's error if it has ended.
    fn wait_rounds(&mut self, more: usize) {
        let target = self.rounds.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.rounds.load(Ordering::SeqCst) < target {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let res = self.thread.take().unwrap().join().unwrap();
                panic!("connection {} ended: {res:?}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "connection {} stalled at {} round trips",
                self.name,
                self.rounds.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it; the number of round trips, or the failure that ended it.
    fn finish(mut self) -> Result<usize, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()?;
        Ok(self.rounds.load(Ordering::SeqCst))
    }
}

/// `shop` enrolled; `client` on n1; `web-a` (app=web) on n2 with its echo app; Service
/// `web` at `vip(60):80` routing to it.
fn shop(cluster: &Cluster<'_>) -> (Pod, Pod, EchoServer) {
    let (client, web_a, app) = probe::shop(cluster);
    put_web_service(cluster, "web", vip(60), 80).unwrap();
    let dst = SocketAddr::new(vip(60), 80);
    poll("the Service to route to web-a", CONVERGE, || {
        who(cluster, &client, dst).as_deref() == Ok("web-a")
    });
    (client, web_a, app)
}

/// Service `old` at `vip(62):82` (to web-a), routed from `client`: the fault tests delete
/// it while a ztunnel cannot hear about it, and check the removal arrives afterwards.
fn old_service(cluster: &Cluster<'_>, client: &Pod) -> SocketAddr {
    put_web_service(cluster, "old", vip(62), 82).unwrap();
    let dst = SocketAddr::new(vip(62), 82);
    poll("Service old to route", CONVERGE, || {
        who(cluster, client, dst).as_deref() == Ok("web-a")
    });
    dst
}

#[test]
fn the_controller_killed_under_traffic_loses_no_connection_and_resumes_when_back() {
    let sb = Sandbox::new().unwrap();
    // Certificates asked for 90 s fall due for refresh half way through the life left when
    // they arrive (about 45 s after issue), so a rotation is attempted during the outage,
    // and they expire long after the controller is back.
    let mut cluster = Cluster::up_with(&sb, &["n1", "n2"], &[("SECRET_TTL", "90s")]).unwrap();
    let (client, web_a, _app) = shop(&cluster);
    let svc = SocketAddr::new(vip(60), 80);
    let mut chatters: Vec<Chatter> = [("via-vip", svc), ("direct", web_a.addr(ECHO_PORT))]
        .into_iter()
        .map(|(name, dst)| Chatter::start(connect(&sb, &client.netns, dst).unwrap(), name))
        .collect();
    let old = old_service(&cluster, &client);
    chatters.iter_mut().for_each(|c| c.wait_rounds(5));
    let (_, streams_before) = xds(&cluster, "n1");
    let client_id = client.spiffe_id();

    cluster.kill_controller().unwrap();
    for node in ["n1", "n2"] {
        poll(
            &format!("{node}'s ztunnel to see its xDS stream end"),
            CONVERGE,
            || !xds(&cluster, node).0,
        );
    }
    // Open connections keep echoing through the outage; new ones work on the last config.
    chatters.iter_mut().for_each(|c| c.wait_rounds(20));
    for _ in 0..3 {
        assert_eq!(who(&cluster, &client, svc).as_deref(), Ok("web-a"));
        assert_eq!(
            who(&cluster, &client, web_a.addr(ECHO_PORT)).as_deref(),
            Ok("web-a")
        );
    }
    // A certificate refresh falls due and fails; the current certificate keeps serving.
    let held = cert_not_before(&cluster, "n1", &client_id).expect("n1 holds the client's cert");
    let zt1 = cluster.ztunnel("n1").unwrap();
    poll("a certificate refresh to fail on n1", CONVERGE, || {
        zt1.log().contains("certificate refresh failed")
    });
    assert_eq!(
        cert_not_before(&cluster, "n1", &client_id).as_deref(),
        Some(held.as_str()),
        "a certificate was issued while the CA was down"
    );
    assert_eq!(who(&cluster, &client, svc).as_deref(), Ok("web-a"));
    // A change made while the controller is down reaches nobody yet.
    let svc2 = SocketAddr::new(vip(61), 81);
    put_web_service(&cluster, "web2", vip(61), 81).unwrap();
    cluster.delete_service("shop", "old").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(who(&cluster, &client, svc2).is_err());
    assert_eq!(who(&cluster, &client, old).as_deref(), Ok("web-a"));
    chatters.iter_mut().for_each(|c| c.wait_rounds(5));

    cluster.start_controller().unwrap();
    poll(
        "the Service added during the outage to arrive",
        CONVERGE,
        || who(&cluster, &client, svc2).as_deref() == Ok("web-a"),
    );
    poll(
        "the Service deleted during the outage to go",
        CONVERGE,
        || who(&cluster, &client, old).is_err(),
    );
    let (connected, streams_after) = xds(&cluster, "n1");
    assert!(connected && streams_after > streams_before);
    poll("the client's certificate to rotate again", CONVERGE, || {
        cert_not_before(&cluster, "n1", &client_id).is_some_and(|nb| nb != held)
    });
    // A new identity gets its first certificate from the restarted CA.
    let client2 = cluster
        .create_pod("n1", "shop", "client2", "client2", &[])
        .unwrap();
    assert_eq!(
        who(&cluster, &client2, web_a.addr(ECHO_PORT)).as_deref(),
        Ok("web-a")
    );
    assert!(cert_not_before(&cluster, "n1", &client2.spiffe_id()).is_some());
    // Not one open connection was lost.
    chatters.iter_mut().for_each(|c| c.wait_rounds(5));
    for c in chatters {
        let name = c.name.clone();
        let rounds = c.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(rounds >= 35, "{name}: {rounds} round trips");
    }
}

/// Whether the error chain of a failed transfer holds `kind`.
fn has_io_kind(e: &anyhow::Error, kind: ErrorKind) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
    })
}

/// A recognisable payload: a fresh marker then 16 KiB.
fn marked_payload() -> (String, Vec<u8>) {
    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(16 << 10, 7));
    (marker, payload)
}

/// Sends a marked payload from `client` to `server`'s echo app while capturing on the node
/// link of `node`; checks the echo and returns what the capture saw and the marker.
fn captured_transfer(
    cluster: &Cluster<'_>,
    node: &str,
    client: &Pod,
    server: &Pod,
) -> (Captured, String) {
    let sb = cluster.sandbox();
    let (marker, payload) = marked_payload();
    let cap = Capture::start(sb, &cluster.node_link(node)).unwrap();
    let got = transfer(sb, &client.netns, server.addr(ECHO_PORT), &payload).unwrap();
    let seen = cap.stop().unwrap();
    assert!(got == payload, "the echo came back altered");
    assert_eq!(seen.drops, 0, "the capture dropped frames");
    (seen, marker)
}

#[test]
fn ztunnel_killed_in_shared_mode_fails_closed_and_resumes_when_back() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let pod = |node, name: &str, sa| cluster.create_pod(node, "shop", name, sa, &[]).unwrap();
    let (client_a, echo_a) = (pod("n1", "client-a", "client"), pod("n1", "echo-a", "echo"));
    let (client_b, echo_b) = (pod("n2", "client-b", "client"), pod("n2", "echo-b", "echo"));
    let plain_a = cluster
        .create_pod("n1", "legacy", "plain-a", "default", &[])
        .unwrap();
    let plain_b = cluster
        .create_pod("n2", "legacy", "plain-b", "default", &[])
        .unwrap();
    assert!(client_a.enrolled && echo_a.enrolled && !plain_a.enrolled && !plain_b.enrolled);
    let _apps: Vec<EchoServer> = [
        (&echo_a, "echo-a"),
        (&echo_b, "echo-b"),
        (&plain_b, "plain"),
    ]
    .iter()
    .map(|(p, n)| EchoServer::start(&sb, &p.netns, ECHO_PORT, n).unwrap())
    .collect();
    // Both directions across n1's link work (and leave pooled HBONE connections behind).
    for (c, s) in [(&client_a, &echo_b), (&client_b, &echo_a)] {
        let (seen, marker) = captured_transfer(&cluster, "n1", c, s);
        assert!(
            !seen.contains(marker.as_bytes()),
            "plaintext before the kill"
        );
    }
    let mut open = connect(&sb, &client_a.netns, echo_b.addr(ECHO_PORT)).unwrap();
    assert_eq!(echo_on(&mut open, b"before").unwrap(), b"before");

    cluster.kill_ztunnel("n1").unwrap();
    // The rules stay, the listeners went with the process.
    assert!(cluster.has_rules(&client_a.netns).unwrap());
    assert!(!cluster.listening(&client_a.netns, 15001).unwrap());
    assert!(!cluster.listening(&echo_a.netns, HBONE_PORT).unwrap());

    let cap = Capture::start(&sb, &cluster.node_link("n1")).unwrap();
    let mut markers = Vec::new();
    // The connection open through the dead ztunnel: the app's next bytes go nowhere.
    let (marker, payload) = marked_payload();
    let echoed = echo_on(&mut open, &payload);
    assert!(
        echoed.is_err(),
        "an echo through a dead ztunnel: {echoed:?}"
    );
    markers.push(marker);
    for _ in 0..3 {
        // Out of an enrolled pod on n1: refused inside the pod, nothing leaves it.
        let (marker, payload) = marked_payload();
        let err = transfer(&sb, &client_a.netns, echo_b.addr(ECHO_PORT), &payload).unwrap_err();
        assert!(
            has_io_kind(&err, ErrorKind::ConnectionRefused),
            "not refused in the pod: {err:#}"
        );
        markers.push(marker);
        // Into an enrolled pod on n1, from n2's (live) ztunnel: its HBONE attempt is refused,
        // and the app's bytes are not sent in plaintext instead.
        let (marker, payload) = marked_payload();
        let got = transfer(&sb, &client_b.netns, echo_a.addr(ECHO_PORT), &payload);
        assert!(
            got.as_ref().map_or(true, |g| g.is_empty()),
            "echo-a answered without its ztunnel: {:?}",
            got.map(|g| g.len())
        );
        markers.push(marker);
    }
    // Positive control, in the same capture: unenrolled pods' plaintext is seen.
    let (plain_marker, payload) = marked_payload();
    let got = transfer(&sb, &plain_a.netns, plain_b.addr(ECHO_PORT), &payload).unwrap();
    assert!(got == payload, "the plaintext echo came back altered");
    let seen = cap.stop().unwrap();
    assert_eq!(seen.drops, 0, "the capture dropped frames");
    assert!(
        seen.contains(plain_marker.as_bytes()),
        "the capture missed plaintext"
    );
    for m in &markers {
        assert!(
            !seen.contains(m.as_bytes()),
            "plaintext of an enrolled pod on the wire"
        );
    }
    let segments = seen.tcp_segments();
    let mesh_ips: Vec<IpAddr> = [&client_a, &echo_a, &client_b, &echo_b]
        .iter()
        .map(|p| p.ip)
        .collect();
    // Not one segment of a mesh pod outside HBONE: none to or from its app port (not even a
    // SYN), and no payload on any other port than 15008.
    let plaintext = |s: &&TcpSegment| {
        let mesh = |a: &SocketAddrV4| mesh_ips.contains(&IpAddr::V4(*a.ip()));
        let hbone = s.src.port() == HBONE_PORT || s.dst.port() == HBONE_PORT;
        let app = [s.src, s.dst]
            .iter()
            .any(|a| a.port() == ECHO_PORT && mesh(a));
        app || ((mesh(&s.src) || mesh(&s.dst)) && s.payload_len > 0 && !hbone)
    };
    let leaked: Vec<&TcpSegment> = segments.iter().filter(plaintext).collect();
    assert!(
        leaked.is_empty(),
        "mesh pods' plaintext on the wire: {leaked:?}"
    );
    let plain_dst = match plain_b.addr(ECHO_PORT) {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("the lab is IPv4"),
    };
    assert!(
        segments
            .iter()
            .any(|s| s.dst == plain_dst && s.payload_len > 0),
        "the unenrolled pods' payload segments were not parsed"
    );
    // The capture saw the attempts: n2's HBONE connection attempts to echo-a, refused.
    let hbone_a = match echo_a.addr(HBONE_PORT) {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("the lab is IPv4"),
    };
    assert!(
        segments.iter().any(|s| s.dst == hbone_a && s.is_syn()),
        "no HBONE attempt to {hbone_a} on the wire ({} segments)",
        segments.len()
    );
    assert!(
        segments.iter().any(|s| s.src == hbone_a && s.is_rst()),
        "no refusal from {hbone_a} on the wire"
    );

    // Once ztunnel is back, traffic resumes, over HBONE only.
    cluster.start_ztunnel("n1").unwrap();
    let before = mtls_from(&cluster, "n2", &client_a);
    for (c, s) in [(&client_a, &echo_b), (&client_b, &echo_a)] {
        let (seen, marker) = captured_transfer(&cluster, "n1", c, s);
        assert!(
            !seen.contains(marker.as_bytes()),
            "plaintext after the restart"
        );
        assert!(
            seen.tcp_segments()
                .iter()
                .any(|t| t.dst.port() == HBONE_PORT && t.payload_len > 0),
            "no HBONE traffic after the restart"
        );
    }
    poll("n2 to count the client's mTLS connection", CONVERGE, || {
        mtls_from(&cluster, "n2", &client_a) > before
    });
}

/// Sets the bridge side of `node`'s link down or up (the node sees its carrier go).
fn set_link(cluster: &Cluster<'_>, node: &str, up: bool) {
    let state = if up { "up" } else { "down" };
    cluster
        .sandbox()
        .run(&["ip", "link", "set", &cluster.node_link(node), state])
        .unwrap();
}

#[test]
fn the_node_link_down_and_up() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    cluster.set_namespace_label("shop", AMBIENT).unwrap();
    let client = cluster
        .create_pod("n1", "shop", "client", "client", &[])
        .unwrap();
    let echo = cluster
        .create_pod("n2", "shop", "echo", "echo", &[])
        .unwrap();
    let _app = EchoServer::start(&sb, &echo.netns, ECHO_PORT, "echo").unwrap();
    let dst = echo.addr(ECHO_PORT);
    let mut open = connect(&sb, &client.netns, dst).unwrap();
    assert_eq!(echo_on(&mut open, b"before").unwrap(), b"before");

    // A short outage: the open connection survives (TCP retransmits what was sent during it).
    set_link(&cluster, "n1", false);
    open.write_all(b"during").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    set_link(&cluster, "n1", true);
    let mut got = [0u8; 6];
    open.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"during");
    assert_eq!(echo_on(&mut open, b"after").unwrap(), b"after");
    assert_eq!(who(&cluster, &client, dst).as_deref(), Ok("echo"));

    // A long outage: HTTP/2 keepalive declares the pooled HBONE connection dead, and the
    // connection it carried fails cleanly (closed or reset, not hung).
    let opened = pool_opened(&cluster, &client);
    set_link(&cluster, "n1", false);
    open.set_read_timeout(Some(KEEPALIVE_DEATH)).unwrap();
    open.write_all(b"lost").unwrap();
    let mut buf = [0u8; 64];
    let ended = open.read(&mut buf);
    assert!(
        matches!(&ended, Ok(0))
            || ended
                .as_ref()
                .is_err_and(|e| !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the connection did not end cleanly while the link was down: {ended:?}"
    );
    set_link(&cluster, "n1", true);
    // For a moment after the carrier returns, n1 still answers "no route to host" (its ARP
    // entry for n2 failed during the outage): wait until the nodes reach each other again
    // outside the mesh.
    let probe = SocketAddr::from((cluster.node_ip("n2"), 9999));
    let _listener = sb
        .in_netns("n2", move || std::net::TcpListener::bind(probe))
        .unwrap()
        .unwrap();
    poll("n1 to reach n2 outside the mesh", CONVERGE, || {
        sb.in_netns("n1", move || {
            TcpStream::connect_timeout(&probe, Duration::from_secs(2)).is_ok()
        })
        .unwrap()
    });
    // Then new connections work at the first attempt, on a freshly dialled HBONE
    // connection: the pool did not hand out the dead one.
    for i in 0..5 {
        let answer = who(&cluster, &client, dst);
        assert_eq!(
            answer.as_deref(),
            Ok("echo"),
            "connection {i} after the link came back; n1's ztunnel:\n{}",
            tail(&cluster.ztunnel("n1").unwrap().log(), 20)
        );
    }
    assert!(pool_opened(&cluster, &client) > opened);
    let mut fresh = connect(&sb, &client.netns, dst).unwrap();
    assert_eq!(echo_on(&mut fresh, b"fresh").unwrap(), b"fresh");
}

#[test]
fn the_controller_unreachable_ztunnel_serves_its_last_config_and_reconnects() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, web_a, _app) = shop(&cluster);
    // A control on n2, whose route to the controller stays.
    let client_b = cluster
        .create_pod("n2", "shop", "client-b", "client", &[])
        .unwrap();
    let svc = SocketAddr::new(vip(60), 80);
    let old = old_service(&cluster, &client);
    let mut open = connect(&sb, &client.netns, web_a.addr(ECHO_PORT)).unwrap();
    assert_eq!(echo_on(&mut open, b"before").unwrap(), b"before");
    let (_, streams_before) = xds(&cluster, "n1");

    // n1 loses its route to the controller, both ways: packets vanish silently.
    let controller_ip = cluster.controller_access().address;
    let controller_ip = controller_ip
        .trim_start_matches("https://")
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    let ztunnel_ip = cluster.ztunnel_pod("n1").unwrap().ip.to_string();
    let routes = [format!("{controller_ip}/32"), format!("{ztunnel_ip}/32")];
    for r in &routes {
        sb.run_in("n1", &["ip", "route", "add", "blackhole", r])
            .unwrap();
    }
    poll(
        "n1's ztunnel to find the controller gone",
        KEEPALIVE_DEATH,
        || !xds(&cluster, "n1").0,
    );
    assert!(xds(&cluster, "n2").0, "n2 lost the controller too");
    // n1 keeps serving with its last config, old and new connections alike.
    assert_eq!(echo_on(&mut open, b"during").unwrap(), b"during");
    assert_eq!(who(&cluster, &client, svc).as_deref(), Ok("web-a"));
    // A change reaches n2, not n1.
    let svc2 = SocketAddr::new(vip(61), 81);
    put_web_service(&cluster, "web2", vip(61), 81).unwrap();
    cluster.delete_service("shop", "old").unwrap();
    poll(
        "n2 to get the new Service and lose the old one",
        CONVERGE,
        || {
            who(&cluster, &client_b, svc2).as_deref() == Ok("web-a")
                && who(&cluster, &client_b, old).is_err()
        },
    );
    assert!(who(&cluster, &client, svc2).is_err());
    assert_eq!(who(&cluster, &client, old).as_deref(), Ok("web-a"));
    assert!(!xds(&cluster, "n1").0);

    for r in &routes {
        sb.run_in("n1", &["ip", "route", "del", "blackhole", r])
            .unwrap();
    }
    poll("n1 to reconnect and get the changes", CONVERGE, || {
        who(&cluster, &client, svc2).as_deref() == Ok("web-a")
            && who(&cluster, &client, old).is_err()
    });
    let (connected, streams_after) = xds(&cluster, "n1");
    assert!(connected && streams_after > streams_before);
    assert_eq!(echo_on(&mut open, b"after").unwrap(), b"after");
    assert_eq!(who(&cluster, &client, svc).as_deref(), Ok("web-a"));
}
