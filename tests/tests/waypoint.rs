//! ztunnel's path to a waypoint, in the lab: a real dedicated-mode ztunnel for the client, and
//! a stand-in HBONE server with a certificate from the lab's CA playing the waypoint
//! (`zmesh_tests::hbone_peer`). Service-addressed traffic to a bound Service goes over HBONE to
//! the waypoint with `:authority` = the original VIP:port, only to a waypoint presenting the
//! waypoint's identity; workload-addressed traffic goes to the workload's waypoint; while the
//! waypoint cannot be reached the connection is refused and counted, never sent around it.
//! Needs root and `cargo build --workspace --bins`.

use std::time::Duration;

use zmesh_core::identity::SpiffeId;
use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::hbone_peer::{HbonePeer, Tunnel};
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, Protocol, ServiceSpec, WaypointSpec, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, poll_some};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const ECHO_VIP: &str = "10.96.0.10";
const PLAIN_VIP: &str = "10.96.0.11";
const WAYPOINT_VIP: &str = "10.96.0.99";

/// Which waypoint the lab has.
#[derive(Clone, Copy, PartialEq)]
enum Waypoint {
    /// Healthy, its certificate of the waypoint's identity.
    Good,
    /// Healthy, but its certificate is of another identity.
    Impostor,
    /// Its only endpoint is unhealthy.
    NotReady,
}

struct Lab<'s> {
    sb: &'s Sandbox,
    topo: Topology<'s>,
    peer: Option<HbonePeer>,
    /// The destination pod's app: reached only when traffic bypasses the waypoint.
    server: EchoServer,
    zt: Ztunnel,
}

/// Hosts `client` (with its ztunnel and the outbound redirect), `server` (plain TCP, outside
/// the mesh: whatever reaches it came straight from the client's ztunnel) and `wp` (the
/// waypoint's pod). Service `echo` (bound to the waypoint) and `plain` (not bound) are backed
/// by `server`; pod `server` itself is bound to the waypoint for workload-addressed traffic.
fn lab(sb: &Sandbox, waypoint: Waypoint) -> Lab<'_> {
    let topo = Topology::build(sb, &["client", "server", "wp"]).unwrap();
    let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
    let client = WorkloadSpec::new("client", topo.host_ip("client")).service_account("client");
    let server = WorkloadSpec::new("server", topo.host_ip("server"))
        .protocol(Protocol::Tcp)
        .backs("echo", &[(80, 8080)])
        .backs("plain", &[(80, 8080)])
        .waypoint(WaypointSpec::vip(WAYPOINT_VIP));
    let mut wp = WorkloadSpec::new("waypoint-0", topo.host_ip("wp"))
        .service_account("waypoint")
        .backs("waypoint", &[(15008, 15008)]);
    if waypoint == Waypoint::NotReady {
        wp = wp.unhealthy();
    }
    let xds = sb.dir().join("mesh.yaml");
    LocalConfig::default()
        .workload(client.clone())
        .workload(server)
        .workload(wp)
        .service(
            ServiceSpec::new("echo", ECHO_VIP)
                .port(80, 8080)
                .waypoint(WaypointSpec::vip(WAYPOINT_VIP)),
        )
        .service(ServiceSpec::new("plain", PLAIN_VIP).port(80, 8080))
        .service(ServiceSpec::new("waypoint", WAYPOINT_VIP).port(15008, 15008))
        .write(&xds)
        .unwrap();
    let sa = if waypoint == Waypoint::Impostor {
        "impostor"
    } else {
        "waypoint"
    };
    let cert = ca
        .ca
        .issue(
            &SpiffeId::new("cluster.local", "default", sa).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let peer = (waypoint != Waypoint::NotReady)
        .then(|| HbonePeer::start(sb, "wp", 15008, cert, "waypoint").unwrap());
    let server = EchoServer::start(sb, "server", 8080, "server").unwrap();
    let zt = Ztunnel::spawn(
        sb,
        "client",
        &mesh::dedicated_env(&client, &xds, &ca),
        &bin_path("ztunnel"),
    )
    .unwrap();
    redirect_outbound(sb, "client").unwrap();
    Lab {
        sb,
        topo,
        peer,
        server,
        zt,
    }
}

impl Lab<'_> {
    fn send(&self, dst: &str) -> anyhow::Result<String> {
        let reply = transfer(self.sb, "client", dst.parse().unwrap(), b"hello\n")?;
        Ok(String::from_utf8_lossy(&reply).trim_end().to_owned())
    }
}

#[test]
fn service_traffic_goes_to_the_waypoint_with_the_original_vip() {
    let sb = Sandbox::new().unwrap();
    let lab = lab(&sb, Waypoint::Good);
    let peer = lab.peer.as_ref().unwrap();

    let reply = lab.send(&format!("{ECHO_VIP}:80")).unwrap();
    assert_eq!(reply, format!("waypoint {ECHO_VIP}:80"));
    // Workload-addressed traffic to a pod bound to the waypoint: through it too, naming the pod.
    let pod = format!("{}:8080", lab.topo.host_ip("server"));
    assert_eq!(lab.send(&pod).unwrap(), format!("waypoint {pod}"));
    let id: SpiffeId = CLIENT_ID.parse().unwrap();
    assert_eq!(
        peer.tunnels(),
        [
            Tunnel {
                peer: Some(id.clone()),
                authority: format!("{ECHO_VIP}:80"),
            },
            Tunnel {
                peer: Some(id),
                authority: pod,
            },
        ]
    );
    // Control: a Service without a waypoint goes straight to the pod.
    assert_eq!(
        identify(&sb, "client", format!("{PLAIN_VIP}:80").parse().unwrap()).unwrap(),
        "server"
    );
    assert_eq!(peer.tunnels().len(), 2);
    assert_eq!(lab.server.accepted(), 1);
}

#[test]
fn a_waypoint_with_the_wrong_identity_is_refused() {
    let sb = Sandbox::new().unwrap();
    let lab = lab(&sb, Waypoint::Impostor);
    let peer = lab.peer.as_ref().unwrap();
    let result = lab.send(&format!("{ECHO_VIP}:80"));
    assert!(
        result.as_ref().is_err() || result.as_ref().is_ok_and(String::is_empty),
        "the client must get nothing from an impostor: {result:?}"
    );
    let log = poll_some(
        "the refusal in ztunnel's log",
        Duration::from_secs(20),
        || {
            let log = lab.zt.log();
            log.contains("spiffe://cluster.local/ns/default/sa/impostor")
                .then_some(log)
        },
    );
    assert!(log.contains("outbound"), "{log}");
    assert!(peer.tunnels().is_empty(), "{:?}", peer.tunnels());
    assert_eq!(lab.server.accepted(), 0, "traffic went around the waypoint");
}

#[test]
fn a_waypoint_that_is_not_ready_refuses_and_counts_never_bypasses() {
    let sb = Sandbox::new().unwrap();
    let lab = lab(&sb, Waypoint::NotReady);
    let result = lab.send(&format!("{ECHO_VIP}:80"));
    assert!(
        result.as_ref().is_err() || result.as_ref().is_ok_and(String::is_empty),
        "{result:?}"
    );
    let metrics = poll_some("the refusal counted", Duration::from_secs(20), || {
        let m = lab.zt.metrics().ok()?;
        (metric_value(
            &m,
            "zmesh_waypoint_unavailable_total",
            &[
                ("destination", "default/echo.default.svc.cluster.local"),
                ("waypoint", &format!("/{WAYPOINT_VIP}:15008")),
            ],
        ) == 1.0)
            .then_some(m)
    });
    assert!(metrics.contains("response_flags=\"UH\""), "{metrics}");
    // The log is written in batches, just after the counter moved.
    let log = poll_some("the refusal in the log", Duration::from_secs(20), || {
        let l = lab.zt.log();
        l.contains("never sent around a waypoint").then_some(l)
    });
    assert!(log.contains("no healthy endpoint"), "{log}");
    assert!(log.contains("never sent around a waypoint"), "{log}");
    assert_eq!(lab.server.accepted(), 0, "traffic went around the waypoint");
}
