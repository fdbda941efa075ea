//! The HBONE data path end to end, with real ztunnel processes in dedicated mode, one per host
//! namespace, a real nftables REDIRECT in the client's namespace, and a shared local CA:
//! integrity with half-close, identities, ciphertext on the wire (with a plaintext control),
//! foreign roots, VIP load balancing, loop protection, config reload and drain.
//! Needs root and `cargo build --workspace --bins`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zmesh_tests::apps::{EchoServer, connect, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::lab::{Topology, redirect_inbound, redirect_outbound};
use zmesh_tests::mesh::{self, CaFiles, LocalConfig, ServiceSpec, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, pattern, poll_some, unique_marker};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// A client and two servers, each with its own ztunnel; `echo` (VIP 10.96.0.10:80) is backed
/// by both servers' port 8080.
struct Mesh<'s> {
    sb: &'s Sandbox,
    topo: Topology<'s>,
    ca: CaFiles,
    xds: PathBuf,
    client: WorkloadSpec,
    servers: Vec<WorkloadSpec>,
    zt: Vec<Ztunnel>,
}

impl<'s> Mesh<'s> {
    fn up(sb: &'s Sandbox, extra_hosts: &[&str]) -> Mesh<'s> {
        let mut hosts = vec!["client", "s1", "s2"];
        hosts.extend_from_slice(extra_hosts);
        let topo = Topology::build(sb, &hosts).unwrap();
        let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
        let client = WorkloadSpec::new("client", topo.host_ip("client")).service_account("client");
        let servers: Vec<_> = ["s1", "s2"]
            .iter()
            .map(|h| {
                WorkloadSpec::new(h, topo.host_ip(h))
                    .service_account("server")
                    .backs("echo", &[(80, 8080)])
            })
            .collect();
        let xds = sb.dir().join("mesh.yaml");
        let mut m = Mesh {
            sb,
            topo,
            ca,
            xds,
            client,
            servers,
            zt: Vec::new(),
        };
        m.write_config(&[]);
        for (i, w) in m.servers.clone().iter().enumerate() {
            m.zt.push(m.ztunnel(["s1", "s2"][i], w, &[]));
        }
        let c = m.client.clone();
        m.zt.insert(0, m.ztunnel("client", &c, &[]));
        redirect_outbound(sb, "client").unwrap();
        m
    }

    fn write_config(&self, extra: &[ServiceSpec]) {
        let mut cfg = LocalConfig::default()
            .workload(self.client.clone())
            .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080));
        for s in &self.servers {
            cfg = cfg.workload(s.clone());
        }
        for s in extra {
            cfg = cfg.service(s.clone());
        }
        cfg.write(&self.xds).unwrap();
    }

    fn ztunnel(&self, host: &str, w: &WorkloadSpec, extra_env: &[(&str, &str)]) -> Ztunnel {
        let mut env = mesh::dedicated_env(w, &self.xds, &self.ca);
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Ztunnel::spawn(self.sb, host, &env, &bin_path("ztunnel")).unwrap()
    }

    fn ip(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.host_ip(host).into(), port)
    }
}

/// A TCP server on `host:port` that runs `serve` for each connection, on a thread of its own.
fn serve_each(sb: &Sandbox, host: &str, port: u16, serve: fn(TcpStream)) {
    let l = sb
        .in_netns(host, || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
}

/// A server that reads to EOF *before* answering, then sends everything back and closes:
/// a client gets its answer only if its half-close crossed both ztunnels.
fn store_and_return(sb: &Sandbox, host: &str, port: u16) {
    serve_each(sb, host, port, |mut s| {
        let mut all = Vec::new();
        if s.read_to_end(&mut all).is_ok() {
            all.reverse();
            let _ = s.write_all(&all);
        }
    });
}

#[test]
fn megabytes_both_ways_with_half_close_and_the_client_identity() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    store_and_return(&sb, "s1", 9000);
    let payload = pattern(6 << 20, 42);
    let back = transfer(&sb, "client", m.ip("s1", 9000), &payload).unwrap();
    assert_eq!(
        back.len(),
        payload.len(),
        "short answer: half-close lost on the way?"
    );
    let mut expected = payload.clone();
    expected.reverse();
    assert!(back == expected, "payload corrupted through the mesh");

    // The destination saw the client's SPIFFE identity, in metrics and in the access log.
    let metrics = m.zt[1].metrics().unwrap();
    let opened = metric_value(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", CLIENT_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        opened >= 1.0,
        "server ztunnel did not count the client's identity:\n{metrics}"
    );
    let received = metric_value(
        &metrics,
        "istio_tcp_received_bytes_total",
        &[("reporter", "destination"), ("source_principal", CLIENT_ID)],
    );
    assert!(received >= (6 << 20) as f64, "received bytes {received}");
    let log = poll_some("the access log line", Duration::from_secs(5), || {
        let l = m.zt[1].log();
        l.contains("connection complete").then_some(l)
    });
    assert!(
        log.contains(&format!("src.identity={CLIENT_ID}")),
        "access log:\n{log}"
    );
    poll_some(
        "the client's access log line",
        Duration::from_secs(5),
        || {
            m.zt[0]
                .log()
                .contains("dst.identity=spiffe://cluster.local/ns/default/sa/server")
                .then_some(())
        },
    );
}

#[test]
fn payload_is_ciphertext_on_the_wire_and_plaintext_on_the_control() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    let _app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(1 << 20, 7));
    payload.extend(marker.as_bytes());

    let cap = Capture::start(&sb, &m.topo.veth("client")).unwrap();
    assert_eq!(
        transfer(&sb, "client", m.ip("s1", 8080), &payload).unwrap(),
        payload
    );
    let meshed = cap.stop().unwrap();
    // The payload crossed the link both ways, as ciphertext no shorter than it. (A count of
    // frames said less: with GSO one frame carries up to 64 KiB, and 99 frames once held it all.)
    let carried: usize = meshed.tcp_segments().iter().map(|s| s.payload_len).sum();
    assert!(
        carried >= 2 * payload.len(),
        "the capture saw the transfer: {carried} bytes of TCP payload in {} frames, for {} \
         bytes each way",
        meshed.frames,
        payload.len()
    );
    assert_eq!(
        meshed.drops, 0,
        "capture dropped frames: the check would be void"
    );
    assert!(
        !meshed.contains(marker.as_bytes()),
        "plaintext left the client through the mesh"
    );

    // Control: the same check, on the same link, finds the marker of a connection that the
    // REDIRECT skips (a socket carrying ztunnel's mark), so the capture does see payloads.
    let cap = Capture::start(&sb, &m.topo.veth("client")).unwrap();
    let dst = m.ip("s1", 8080);
    let stream = sb
        .in_netns("client", || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_mark(0x539).unwrap();
            s.connect(&dst.into()).unwrap();
            std::net::TcpStream::from(s)
        })
        .unwrap();
    assert!(stream.as_raw_fd() > 0);
    assert_eq!(
        zmesh_tests::apps::exchange(stream, &payload).unwrap(),
        payload
    );
    let plain = cap.stop().unwrap();
    assert_eq!(plain.drops, 0);
    assert!(
        plain.contains(marker.as_bytes()),
        "control: plaintext marker not found"
    );
}

#[test]
fn a_ztunnel_of_another_root_is_refused() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &["rogue"]);
    let app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    // A workload the mesh knows, whose ztunnel holds a CA of its own.
    std::fs::create_dir_all(sb.dir().join("other")).unwrap();
    let other = mesh::write_ca(&sb.dir().join("other"), "other-root").unwrap();
    let rogue = WorkloadSpec::new("rogue", m.topo.host_ip("rogue")).service_account("client");
    let mut env = mesh::dedicated_env(&rogue, &m.xds, &other);
    env.push(("RUST_LOG".into(), "info".into()));
    let zt_rogue = Ztunnel::spawn(&sb, "rogue", &env, &bin_path("ztunnel")).unwrap();
    redirect_outbound(&sb, "rogue").unwrap();

    let before = app.accepted();
    let res = transfer(&sb, "rogue", m.ip("s1", 8080), b"let me in");
    assert!(
        res.is_err() || res.as_ref().is_ok_and(|b| b.is_empty()),
        "rogue got an answer: {res:?}"
    );
    assert_eq!(
        app.accepted(),
        before,
        "the app saw a connection from the rogue ztunnel"
    );
    let rogue_log = poll_some("the rogue's failure", Duration::from_secs(5), || {
        let l = zt_rogue.log();
        l.contains("TLS").then_some(l)
    });
    assert!(rogue_log.contains("TLS handshake with"), "{rogue_log}");
    let s1_log = poll_some("s1's failure", Duration::from_secs(5), || {
        let l = m.zt[1].log();
        l.contains("TLS handshake failed").then_some(l)
    });
    assert!(!s1_log.contains("connection complete"), "{s1_log}");
    // The legitimate client still gets through.
    assert_eq!(identify(&sb, "client", m.ip("s1", 8080)).unwrap(), "s1");
}

#[test]
fn vip_connections_spread_over_both_endpoints() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    let _a = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let _b = EchoServer::start(&sb, "s2", 8080, "s2").unwrap();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *seen
            .entry(identify(&sb, "client", vip).unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["s1".to_string(), "s2".to_string()],
        "{seen:?}"
    );
    // Each server's ztunnel reports the service.
    for zt in &m.zt[1..] {
        let text = zt.metrics().unwrap();
        assert!(
            metric_value(
                &text,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("destination_service", "echo.default.svc.cluster.local"),
                    ("destination_service_name", "echo"),
                ]
            ) >= 1.0,
            "inbound metrics do not name the service:\n{text}"
        );
    }
    let text = m.zt[0].metrics().unwrap();
    let svc = metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_service", "echo.default.svc.cluster.local"),
        ],
    );
    assert_eq!(svc, 30.0, "{text}");
}

#[test]
fn connections_aimed_at_ztunnel_ports_are_refused() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    for dst in [
        m.ip("client", 15001),
        m.ip("s1", 15008),
        m.ip("s1", 15006),
        m.ip("s1", 15001),
    ] {
        let outcome = connect(&sb, "client", dst).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let _ = s.write_all(b"loop?\n");
            let mut buf = [0u8; 16];
            Ok(s.read(&mut buf)?)
        });
        assert!(
            matches!(outcome, Err(_) | Ok(0)),
            "a connection to {dst} was served: {outcome:?}"
        );
    }
    // The access log is written by a background thread: wait for the line.
    poll_some(
        "the loop refusal in the log",
        Duration::from_secs(5),
        || {
            m.zt[0]
                .log()
                .contains("one of ztunnel's own ports")
                .then_some(())
        },
    );
}

#[test]
fn local_config_is_reloaded_and_a_bad_edit_keeps_the_last_good_one() {
    let sb = Sandbox::new().unwrap();
    let mut m = Mesh::up(&sb, &[]);
    let _a = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let _b = EchoServer::start(&sb, "s2", 8080, "s2").unwrap();
    let dump = m.zt[0].config_dump().unwrap();
    assert!(!dump.contains("solo"), "{dump}");

    // A service only s2 backs appears; traffic to its VIP follows without a restart.
    let new_vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    m.servers[1] = m.servers[1].clone().backs("solo", &[(80, 8080)]);
    m.write_config(&[ServiceSpec::new("solo", "10.96.0.20").port(80, 8080)]);
    poll_some("the reload", Duration::from_secs(15), || {
        m.zt[0]
            .config_dump()
            .ok()
            .filter(|d| d.contains("solo.default.svc.cluster.local"))
    });
    for _ in 0..5 {
        assert_eq!(identify(&sb, "client", new_vip).unwrap(), "s2");
    }

    // A slow writer: the file is truncated, stays empty for longer than the watcher's
    // debounce, then gets its content back. The empty moment must never be applied.
    let good = std::fs::read(&m.xds).unwrap();
    {
        let mut f = std::fs::File::create(&m.xds).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        std::io::Write::write_all(&mut f, &good).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(identify(&sb, "client", new_vip).unwrap(), "s2");
    let log = m.zt[0].log();
    assert!(
        !log.contains("workloads=0"),
        "an empty, half-written file was applied:\n{log}"
    );

    // A broken edit is refused with a reason naming the field; the last good config stays.
    std::fs::write(
        &m.xds,
        "workloads:\n- name: x\n  namespace: default\n  workloadIPs: []\n",
    )
    .unwrap();
    poll_some(
        "the rejection naming the field",
        Duration::from_secs(15),
        || {
            let l = m.zt[0].log();
            (l.contains("local config change rejected") && l.contains("workloadIPs")).then_some(())
        },
    );
    assert_eq!(identify(&sb, "client", new_vip).unwrap(), "s2");
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    let _app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let dst = m.ip("s1", 8080);
    let mut open = connect(&sb, "client", dst).unwrap();
    let mut buf = [0u8; 6];
    open.write_all(b"hello\n").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\n");

    let started = Instant::now();
    m.zt[1].process().signal(libc::SIGTERM).unwrap();
    poll_some("readiness to drop", Duration::from_secs(5), || {
        zmesh_tests::http::get(
            &sb.netns(Some("s1")),
            "127.0.0.1:15021".parse().unwrap(),
            "/healthz/ready",
        )
        .ok()
        .filter(|r| r.status == 503)
    });
    // New connections are refused while draining...
    assert!(
        identify(&sb, "client", dst).is_err(),
        "a new connection was accepted while draining"
    );
    // ...while the open one keeps working.
    open.write_all(b"still\n").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still\n");
    assert!(
        m.zt[1].process().is_running(),
        "ztunnel exited with a connection open"
    );
    drop(open);
    // Once it closes, ztunnel exits, well before the 5 s deadline.
    let status = m.zt[1].process().wait_timeout(Duration::from_secs(4));
    assert!(
        status.is_some_and(|s| s.success()),
        "ztunnel did not exit cleanly after draining: {status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = m.zt[1].log();
    assert!(log.contains("drained: all connections finished"), "{log}");
}

#[test]
fn plaintext_inbound_on_15006_and_passthrough_for_outsiders() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &["ext"]);
    let _app = EchoServer::start(&sb, "s1", 8080, "s1").unwrap();
    let _ext = EchoServer::start(&sb, "ext", 8080, "ext").unwrap();
    // s1 captures inbound TCP to 15006, except HBONE and ztunnel's own (marked) traffic.
    redirect_inbound(&sb, "s1").unwrap();

    // A client outside the mesh reaches s1's app through ztunnel's plaintext listener.
    let payload = pattern(256 << 10, 9);
    assert_eq!(
        transfer(&sb, "ext", m.ip("s1", 8080), &payload).unwrap(),
        payload
    );
    let text = m.zt[1].metrics().unwrap();
    let plain = metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "unknown"),
            ("destination_workload", "s1"),
        ],
    );
    assert!(
        plain >= 1.0,
        "no plaintext inbound connection counted:\n{text}"
    );
    // Meshed traffic still arrives over HBONE, not through 15006.
    assert_eq!(identify(&sb, "client", m.ip("s1", 8080)).unwrap(), "s1");

    // The mesh client reaching a host unknown to the mesh: passthrough, in plain TCP.
    let marker = unique_marker();
    let cap = Capture::start(&sb, &m.topo.veth("client")).unwrap();
    assert_eq!(
        transfer(&sb, "client", m.ip("ext", 8080), marker.as_bytes()).unwrap(),
        marker.as_bytes()
    );
    let seen = cap.stop().unwrap();
    assert!(
        seen.contains(marker.as_bytes()),
        "passthrough traffic should be plain TCP"
    );
    let text = m.zt[0].metrics().unwrap();
    assert!(
        metric_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "unknown")]
        ) >= 1.0,
        "{text}"
    );
}

#[test]
fn admin_changes_the_log_level_and_dumps_config() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &[]);
    let ns = sb.netns(Some("client"));
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let r = zmesh_tests::http::get(&ns, admin, "/logging").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("current log level is"), "{}", r.text());
    let r = zmesh_tests::http::post(&ns, admin, "/logging?level=debug").unwrap();
    assert_eq!(
        (r.status, r.text().trim()),
        (200, "current log level is debug")
    );
    let r = zmesh_tests::http::post(&ns, admin, "/logging?level=nonsense=%3D%3D").unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = zmesh_tests::http::post(&ns, admin, "/logging?reset").unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("debug"), "{}", r.text());
    // GET may not change anything.
    assert_eq!(
        zmesh_tests::http::get(&ns, admin, "/logging?level=trace")
            .unwrap()
            .status,
        405
    );
    let dump: serde_json::Value = serde_json::from_str(&m.zt[0].config_dump().unwrap()).unwrap();
    assert_eq!(dump["proxies"][0]["identity"], CLIENT_ID);
    assert_eq!(dump["proxies"][0]["workload"]["name"], "client");
    assert_eq!(dump["config"]["proxy_mode"], "dedicated");
    assert_eq!(dump["certificates"][0]["identity"], CLIENT_ID);
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 3);
}

#[test]
fn plaintext_inbound_is_not_an_open_relay() {
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &["ext"]);
    let s2_app = EchoServer::start(&sb, "s2", 8080, "s2").unwrap();
    redirect_inbound(&sb, "s1").unwrap();
    // An outsider sends traffic for s2 to s1's MAC: s1's capture redirects it to 15006.
    let (s1_ip, s2_ip) = (m.topo.host_ip("s1"), m.topo.host_ip("s2"));
    sb.run_in(
        "ext",
        &[
            "ip",
            "route",
            "add",
            &format!("{s2_ip}/32"),
            "via",
            &s1_ip.to_string(),
        ],
    )
    .unwrap();
    let res = transfer(&sb, "ext", m.ip("s2", 8080), b"relay me");
    assert!(
        res.as_ref().map_or(true, |b| b.is_empty()),
        "relayed: {res:?}"
    );
    assert_eq!(
        s2_app.accepted(),
        0,
        "s1's ztunnel relayed the outsider to s2"
    );
    poll_some("the refusal in s1's log", Duration::from_secs(5), || {
        m.zt[1]
            .log()
            .contains("is not this workload's address")
            .then_some(())
    });
}

/// A server that reads to EOF and answers with the count it read (8 bytes, big endian): an
/// upload, with a small fixed answer, as iperf3's data connection is.
fn upload_sink(sb: &Sandbox, host: &str, port: u16) {
    serve_each(sb, host, port, |mut s| {
        let n = std::io::copy(&mut s, &mut std::io::sink()).unwrap_or(0);
        let _ = s.write_all(&n.to_be_bytes());
    });
}

/// The value of `key=` in an access-log line, as a number.
fn log_number(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Waits for the `connection complete` line of `direction` that names `needle`, and returns
/// its `(bytes_sent, bytes_recv)`.
fn logged_bytes(zt: &Ztunnel, direction: &str, needle: &str) -> (u64, u64) {
    poll_some(
        &format!("the {direction} access-log line for {needle}"),
        Duration::from_secs(20),
        || {
            let log = zt.log();
            let line = log.lines().find(|l| {
                l.contains("connection complete")
                    && l.contains(&format!("direction=\"{direction}\""))
                    && l.contains(needle)
            })?;
            Some((
                log_number(line, "bytes_sent").expect(line),
                log_number(line, "bytes_recv").expect(line),
            ))
        },
    )
}

/// Waits until a connection matching `labels` has closed, and returns its
/// `(istio_tcp_sent_bytes_total, istio_tcp_received_bytes_total)`.
fn counted_bytes(zt: &Ztunnel, labels: &[(&str, &str)]) -> (u64, u64) {
    poll_some(
        "the closed connection's counters",
        Duration::from_secs(20),
        || {
            let text = zt.metrics().unwrap();
            (metric_value(&text, "istio_tcp_connections_closed_total", labels) >= 1.0).then(|| {
                (
                    metric_value(&text, "istio_tcp_sent_bytes_total", labels) as u64,
                    metric_value(&text, "istio_tcp_received_bytes_total", labels) as u64,
                )
            })
        },
    )
}

/// Issue 14: byte directions as upstream ztunnel has them. The `istio_tcp_*` counters keep
/// Envoy's direction for both reporters (`received` = from the client towards the server,
/// `sent` = back), and the access log flips only on the source side: the outbound line's
/// `bytes_sent` is what the client uploaded, the inbound line's `bytes_recv` is. Checked for an
/// upload of N bytes answered by 8, through HBONE (both ztunnels) and through plaintext
/// inbound.
#[test]
fn an_upload_is_counted_in_upstreams_directions_by_both_reporters() {
    const UP: u64 = 3 << 20;
    const BACK: u64 = 8;
    let sb = Sandbox::new().unwrap();
    let m = Mesh::up(&sb, &["ext"]);
    upload_sink(&sb, "s1", 9001);
    let dst = m.ip("s1", 9001).to_string();

    let back = transfer(&sb, "client", m.ip("s1", 9001), &pattern(UP as usize, 3)).unwrap();
    assert_eq!(back, UP.to_be_bytes(), "the server did not read the upload");
    let source = [("reporter", "source"), ("destination_workload", "s1")];
    assert_eq!(
        counted_bytes(&m.zt[0], &source),
        (BACK, UP),
        "source reporter: (sent, received)"
    );
    let destination = [("reporter", "destination"), ("source_workload", "client")];
    assert_eq!(
        counted_bytes(&m.zt[1], &destination),
        (BACK, UP),
        "destination reporter: (sent, received)"
    );
    assert_eq!(
        logged_bytes(&m.zt[0], "outbound", &format!("dst.hbone_addr=\"{dst}\"")),
        (UP, BACK),
        "outbound access log: (bytes_sent, bytes_recv)"
    );
    assert_eq!(
        logged_bytes(&m.zt[1], "inbound", &format!("dst.addr={dst}")),
        (BACK, UP),
        "inbound access log: (bytes_sent, bytes_recv)"
    );

    // Plaintext inbound: a client outside the mesh, captured on s1.
    redirect_inbound(&sb, "s1").unwrap();
    let back = transfer(&sb, "ext", m.ip("s1", 9001), &pattern(UP as usize, 4)).unwrap();
    assert_eq!(back, UP.to_be_bytes());
    let outsider = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("destination_workload", "s1"),
    ];
    assert_eq!(
        counted_bytes(&m.zt[1], &outsider),
        (BACK, UP),
        "plaintext inbound: (sent, received)"
    );
    let ext = m.topo.host_ip("ext").to_string();
    assert_eq!(
        logged_bytes(&m.zt[1], "inbound", &format!("src.addr={ext}:")),
        (BACK, UP),
        "plaintext inbound access log: (bytes_sent, bytes_recv)"
    );
}
