//! ztunnel's local config file (`LOCAL_XDS_PATH`) under an operator's feet: an idle ztunnel
//! does not re-read it, a large reload does not stall traffic, and a document too deeply
//! nested is refused with the limit while the previous config stays in force.
//! Needs root and `cargo build --workspace --bins`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zmesh_tests::apps::{EchoServer, connect, identify};
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, CaFiles, LocalConfig, ServiceSpec, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, poll, write_atomic};

const READS: &str = "ztunnel_local_config_reads_total";
const RELOADS: &str = "ztunnel_local_config_reloads_total";

/// A client and a server host, each with a dedicated ztunnel reading the same config file;
/// `echo` (VIP 10.96.0.10:80) is the server's port 8080.
struct Lab<'s> {
    sb: &'s Sandbox,
    _topo: Topology<'s>,
    ca: CaFiles,
    xds: PathBuf,
    client: WorkloadSpec,
    server: WorkloadSpec,
}

impl<'s> Lab<'s> {
    fn new(sb: &'s Sandbox) -> Lab<'s> {
        let topo = Topology::build(sb, &["client", "server"]).unwrap();
        let ca = mesh::write_ca(sb.dir(), "lab-root").unwrap();
        let client = WorkloadSpec::new("client", topo.host_ip("client")).service_account("client");
        let server = WorkloadSpec::new("server", topo.host_ip("server"))
            .service_account("server")
            .backs("echo", &[(80, 8080)]);
        let xds = sb.dir().join("mesh.yaml");
        let lab = Lab {
            sb,
            _topo: topo,
            ca,
            xds,
            client,
            server,
        };
        lab.write_config(0);
        lab
    }

    /// The two workloads and `echo`, plus `extra` workloads nobody talks to (their only
    /// purpose is to make the file big).
    fn config(&self, extra: usize) -> LocalConfig {
        let mut cfg = LocalConfig::default()
            .workload(self.client.clone())
            .workload(self.server.clone())
            .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080));
        for i in 0..extra {
            let ip = format!("10.{}.{}.{}", 100 + i / 62_500, i / 250 % 250, i % 250 + 1);
            cfg = cfg.workload(WorkloadSpec::new(&format!("filler-{i}"), ip));
        }
        cfg
    }

    fn write_config(&self, extra: usize) {
        write_atomic(&self.xds, &self.config(extra).to_yaml()).unwrap();
    }

    fn ztunnel(&self, host: &str, w: &WorkloadSpec) -> Ztunnel {
        let env = mesh::dedicated_env(w, &self.xds, &self.ca);
        Ztunnel::spawn(self.sb, host, &env, &bin_path("ztunnel")).unwrap()
    }
}

fn counter(zt: &Ztunnel, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&zt.metrics().unwrap(), name, labels)
}

#[test]
fn an_idle_ztunnel_does_not_reread_its_config_and_an_edit_is_read_once() {
    let sb = Sandbox::new().unwrap();
    let lab = Lab::new(&sb);
    let zt = lab.ztunnel("server", &lab.server);
    // Reading the file must not count as a change of it: an idle ztunnel reads nothing.
    let before = counter(&zt, READS, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let idle = counter(&zt, READS, &[]);
    assert_eq!(
        idle,
        before,
        "an idle ztunnel re-read its local config {} times in 3 s",
        idle - before
    );

    // A real edit (an editor's rename over the file) is read and applied once, then quiet.
    let mut cfg = lab
        .config(0)
        .service(ServiceSpec::new("solo", "10.96.0.20").port(80, 8080));
    write_atomic(&lab.xds, &cfg.to_yaml()).unwrap();
    poll("the reload", Duration::from_secs(20), || {
        counter(&zt, RELOADS, &[("result", "applied")]) == 1.0
    });
    let after_edit = counter(&zt, READS, &[]);
    assert!(after_edit > idle, "the edit was applied without a read");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        counter(&zt, READS, &[]),
        after_edit,
        "reads after the edit went on"
    );
    assert_eq!(counter(&zt, RELOADS, &[("result", "applied")]), 1.0);

    // An edit in place (truncate and write) is seen as well.
    cfg = cfg.service(ServiceSpec::new("duo", "10.96.0.30").port(80, 8080));
    std::fs::write(&lab.xds, cfg.to_yaml()).unwrap();
    poll("the in-place edit", Duration::from_secs(20), || {
        zt.config_dump()
            .unwrap()
            .contains("duo.default.svc.cluster.local")
    });
}

#[test]
fn a_deeply_nested_config_is_refused_naming_the_limit_and_the_last_good_one_stays() {
    let sb = Sandbox::new().unwrap();
    let lab = Lab::new(&sb);
    let zt = lab.ztunnel("server", &lab.server);
    let good = lab.config(0).to_yaml();
    // 100,000 nested levels used to cost the parser more than half a minute of CPU.
    let deep = format!(
        "{good}policies: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    write_atomic(&lab.xds, &deep).unwrap();
    poll("the rejection", Duration::from_secs(20), || {
        counter(&zt, RELOADS, &[("result", "rejected")]) == 1.0
    });
    // The log line can reach the file just after the counter moved: poll for it too.
    let named = Instant::now() + Duration::from_secs(20);
    while !zt.log().contains("nested more than 128 levels") && Instant::now() < named {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = zt.log();
    assert!(
        log.contains("nested more than 128 levels"),
        "the rejection does not name the limit:\n{log}"
    );
    let dump = zt.config_dump().unwrap();
    assert!(
        dump.contains("echo.default.svc.cluster.local"),
        "the previous config was dropped:\n{dump}"
    );
}

/// Lines of the log that mark the start and the end of a reload.
fn reload_phase(zt: &Ztunnel) -> (bool, bool) {
    let log = zt.log();
    (
        log.contains("local config changed; parsing it"),
        log.contains("local config reloaded"),
    )
}

#[test]
fn a_large_reload_does_not_stall_an_open_connection() {
    let sb = Sandbox::new().unwrap();
    let lab = Lab::new(&sb);
    let _app = EchoServer::start(&sb, "server", 8080, "server").unwrap();
    let zts = [
        lab.ztunnel("server", &lab.server),
        lab.ztunnel("client", &lab.client),
    ];
    redirect_outbound(&sb, "client").unwrap();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(identify(&sb, "client", vip).unwrap(), "server");
    let conn = connect(&sb, "client", vip).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut echo = |i: usize| {
        let line = format!("ping {i}\n");
        writer.write_all(line.as_bytes()).unwrap();
        let mut back = String::new();
        reader.read_line(&mut back).unwrap();
        assert_eq!(back, line);
    };
    echo(0);

    // Both ztunnels parse a file of 15,000 workloads (seconds of CPU in a debug build)
    // while the connection keeps echoing.
    lab.write_config(15_000);
    let (mut during, mut i) = (0, 1);
    let end = Instant::now() + Duration::from_secs(180);
    loop {
        echo(i);
        i += 1;
        let phases: Vec<_> = zts.iter().map(reload_phase).collect();
        if phases.iter().all(|(_, done)| *done) {
            break;
        }
        if phases.iter().any(|(started, done)| *started && !*done) {
            during += 1;
        }
        assert!(Instant::now() < end, "the reload never finished");
    }
    assert!(
        during >= 5,
        "only {during} echoes made it through while a ztunnel was reloading"
    );
    for zt in &zts {
        poll("the big config", Duration::from_secs(5), || {
            counter(zt, RELOADS, &[("result", "applied")]) == 1.0
        });
    }
    echo(i);
}
