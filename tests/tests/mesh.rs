//! End-to-end through the real `ztunnel` binary in dedicated mode: a client host whose TCP is
//! redirected to its ztunnel reaches a service VIP, carried in HBONE to the server host's
//! ztunnel and on to the app; the wire between them shows no plaintext. Needs root and the
//! binaries (`cargo build --workspace --bins`).

use std::net::SocketAddr;

use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, ServiceSpec, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, pattern, unique_marker};

#[test]
fn vip_over_hbone_is_encrypted_on_the_wire() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["client", "server"]).unwrap();
    let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
    let client = WorkloadSpec::new("client", topo.host_ip("client"));
    let server = WorkloadSpec::new("echo", topo.host_ip("server")).backs("echo", &[(80, 8080)]);
    let xds = sb.dir().join("mesh.yaml");
    LocalConfig::default()
        .workload(client.clone())
        .workload(server.clone())
        .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080))
        .write(&xds)
        .unwrap();

    let _app = EchoServer::start(&sb, "server", 8080, "echo-1").unwrap();
    let bin = bin_path("ztunnel");
    let zt_server = Ztunnel::spawn(
        &sb,
        "server",
        &mesh::dedicated_env(&server, &xds, &ca),
        &bin,
    )
    .unwrap();
    let zt_client = Ztunnel::spawn(
        &sb,
        "client",
        &mesh::dedicated_env(&client, &xds, &ca),
        &bin,
    )
    .unwrap();
    redirect_outbound(&sb, "client").unwrap();
    assert!(zt_client.config_dump().unwrap().contains("echo"));

    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(identify(&sb, "client", vip).unwrap(), "echo-1");

    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(256 << 10, 3));
    payload.extend(marker.as_bytes());
    let cap = Capture::start(&sb, &topo.veth("client")).unwrap();
    let got = transfer(&sb, "client", vip, &payload).unwrap();
    let seen = cap.stop().unwrap();
    assert!(
        got == payload,
        "the echo through the mesh came back altered"
    );
    assert!(seen.frames > 0);
    assert_eq!(
        seen.drops, 0,
        "the capture dropped frames; the check below would be void"
    );
    assert!(
        !seen.contains(marker.as_bytes()),
        "plaintext marker seen on the wire"
    );

    let m = zt_client.metrics().unwrap();
    let opened = metric_value(&m, "istio_tcp_connections_opened_total", &[]);
    assert!(opened >= 2.0, "client ztunnel metrics:\n{m}");
    drop(zt_server);
}
