//! ztunnel in shared mode, end to end: ztunnel runs in a namespace of its own (as a node's
//! ztunnel pod does); the test plays the node agent and hands it a pod's network namespace
//! over ZDS (real SOCK_SEQPACKET, netns fd by SCM_RIGHTS). The pod's proxy must listen inside
//! the pod's namespace, its traffic must leave from the pod, and Del must take it away.
//! Needs root and `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use zmesh_core::zds::{WorkloadInfo, ZdsServer};
use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, pattern, poll};

fn listening(sb: &Sandbox, host: &str, port: u16) -> bool {
    sb.run_in(host, &["ss", "-Hltn", &format!("sport = :{port}")])
        .map(|out| !out.trim().is_empty())
        .unwrap_or(false)
}

#[test]
fn a_pod_handed_over_zds_is_proxied_inside_its_own_namespace() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["ztn", "pod", "srv"]).unwrap();
    let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
    let pod = WorkloadSpec::new("app", topo.host_ip("pod")).service_account("app");
    let srv = WorkloadSpec::new("srv", topo.host_ip("srv")).service_account("server");
    let xds = sb.dir().join("mesh.yaml");
    LocalConfig::default()
        .workload(pod.clone())
        .workload(srv.clone())
        .write(&xds)
        .unwrap();
    let _app = EchoServer::start(&sb, "srv", 8080, "srv").unwrap();
    let zt_srv = Ztunnel::spawn(
        &sb,
        "srv",
        &mesh::dedicated_env(&srv, &xds, &ca),
        &bin_path("ztunnel"),
    )
    .unwrap();

    // The node agent's side: a ZDS server on a socket the shared ztunnel will dial.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let uds = sb.dir().join("zds.sock");
    let zds = ZdsServer::bind(&uds, Vec::new).unwrap();
    let mut env = mesh::shared_env(&uds, &xds, &ca);
    env.push(("TERMINATION_GRACE_PERIOD_SECONDS".into(), "1".into()));
    // Ready only once the agent's (empty) snapshot arrived.
    let zt = Ztunnel::spawn(&sb, "ztn", &env, &bin_path("ztunnel")).unwrap();
    assert_eq!(zds.connected(), 1);

    // Enrol the pod: its outbound TCP goes to 15001, and ztunnel gets its netns.
    redirect_outbound(&sb, "pod").unwrap();
    let netns = std::fs::File::open(sb.netns_path(Some("pod"))).unwrap();
    let info = WorkloadInfo {
        name: "app".into(),
        namespace: "default".into(),
        service_account: "app".into(),
    };
    rt.block_on(zds.add("uid-app", info, netns.as_fd()))
        .unwrap();

    // The listeners live in the pod's namespace, not in ztunnel's.
    for port in [15001, 15006, 15008] {
        assert!(
            listening(&sb, "pod", port),
            "nothing listens on {port} in the pod"
        );
        assert!(
            !listening(&sb, "ztn", port),
            "{port} is open in ztunnel's own namespace"
        );
    }

    // Traffic: the pod reaches the server through HBONE, leaving from the pod's own link.
    let cap_pod = Capture::start(&sb, &topo.veth("pod")).unwrap();
    let cap_ztn = Capture::start(&sb, &topo.veth("ztn")).unwrap();
    let dst = SocketAddr::new(topo.host_ip("srv").into(), 8080);
    let payload = pattern(512 << 10, 5);
    assert_eq!(transfer(&sb, "pod", dst, &payload).unwrap(), payload);
    assert_eq!(identify(&sb, "pod", dst).unwrap(), "srv");
    let (on_pod, on_ztn) = (cap_pod.stop().unwrap(), cap_ztn.stop().unwrap());
    assert!(
        on_pod.data.len() > payload.len(),
        "the tunnel did not cross the pod's link"
    );
    assert!(
        on_ztn.data.len() < 4096,
        "pod traffic left through ztunnel's namespace ({} bytes)",
        on_ztn.data.len()
    );
    let text = zt_srv.metrics().unwrap();
    let seen = metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/app",
            ),
        ],
    );
    assert!(
        seen >= 2.0,
        "the server did not see the pod's identity:\n{text}"
    );
    let dump = zt.config_dump().unwrap();
    assert!(
        dump.contains("uid-app") && dump.contains("spiffe://cluster.local/ns/default/sa/app"),
        "{dump}"
    );

    // A connection open through the pod's proxy when the pod goes away.
    let mut open = zmesh_tests::apps::connect(&sb, "pod", dst).unwrap();
    std::io::Write::write_all(&mut open, b"hello\n").unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut open, &mut buf).unwrap();

    // Del: the pod's proxy goes away and its listeners close; past the drain deadline (1 s
    // here) the connection still open is closed too, releasing the pod's namespace.
    rt.block_on(zds.del("uid-app")).unwrap();
    poll(
        "the pod's listeners to close",
        Duration::from_secs(10),
        || !listening(&sb, "pod", 15001),
    );
    assert!(!zt.config_dump().unwrap().contains("uid-app"));
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let n = std::io::Read::read(&mut open, &mut buf);
    assert!(
        matches!(n, Ok(0) | Err(_)) && started.elapsed() < Duration::from_secs(4),
        "the connection outlived the drain deadline: {n:?}"
    );
}
