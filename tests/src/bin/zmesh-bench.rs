//! `zmesh-bench`: direct TCP vs HBONE through two ztunnels, in one run, in the lab's namespace
//! setup. Hosts: `cdirect` (plain client, no ztunnel), `cmesh` (client whose TCP is redirected
//! to its ztunnel) and `server` (sink and echo apps, with its ztunnel). Each figure is the median
//! of 3 runs of `--seconds` (default 10). Build with the benchmark profile first:
//!
//! ```text
//! cargo build --profile bench-lto -p ztunnel -p zmesh-tests --bins
//! target/bench-lto/zmesh-bench
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use zmesh_tests::bench::{self, ECHO_PORT, SINK_PORT, ceiling};
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, WorkloadSpec};
use zmesh_tests::ztunnel::Ztunnel;
use zmesh_tests::{Sandbox, bin_path};

#[derive(Parser)]
#[command(about = "Benchmark HBONE through ztunnel against direct TCP, in one run")]
struct Args {
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Concurrent clients in the connection-rate test.
    #[arg(long, default_value_t = 4)]
    crr_workers: usize,
    /// ztunnel worker threads (ZTUNNEL_WORKER_THREADS); ztunnel's default when absent.
    #[arg(long)]
    workers: Option<usize>,
    /// Run only these measurements (throughput, latency, crr); all when absent.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A ztunnel config file (YAML) given to both ztunnels, e.g. to compare tunings (the
    /// no-pooling run replaces it with its own).
    #[arg(long)]
    ztunnel_config: Option<std::path::PathBuf>,
    /// ztunnel's log filter (RUST_LOG); ztunnel's default (`info`, access log on) when absent.
    #[arg(long)]
    log: Option<String>,
    /// L4 AuthorizationPolicies in the mesh config (`bench::policy_mix`: three apply to the
    /// server and allow the client, the rest are other namespaces'); 0 = none.
    #[arg(long, default_value_t = 0)]
    policies: usize,
    /// Extra environment for both ztunnels, `KEY=VALUE` (repeatable), e.g. to compare
    /// allocator settings in one build.
    #[arg(long = "ztunnel-env", value_parser = bench::parse_env)]
    ztunnel_env: Vec<(String, String)>,
    /// The ztunnel binary to run (default: the one beside this benchmark), e.g. to compare two
    /// builds in the same run of the machine.
    #[arg(long)]
    ztunnel_bin: Option<std::path::PathBuf>,
    /// Where to write the markdown report (also printed).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Also run every load through two plain TCP relays (`zmesh-relay`) standing where the
    /// ztunnels stand (a client host `crelay` with the same REDIRECT rules): no TLS, no HTTP/2,
    /// one relay-to-relay connection per app connection. What any pair of proxies costs on
    /// this machine before the mesh's own work.
    #[arg(long)]
    relay: bool,
}

struct Row {
    name: String,
    direct: f64,
    mesh: f64,
    unit: &'static str,
    /// Ratio mesh/direct, or for latency the added time.
    note: String,
    /// CPU time both ztunnels used per unit of work (byte, round trip, connection).
    cpu: String,
    /// Through the two plain relays (`--relay`): the figure, its ratio (or added time) and
    /// both relays' CPU per unit of work.
    relay: Option<(f64, String, String)>,
}

/// The server side's relay port (the client side's is the REDIRECT target, 15001).
const RELAY_PORT: u16 = 15018;

/// Starts both relays of `--relay` and waits until each accepts connections.
fn start_relays(sb: &Sandbox, server_ip: std::net::Ipv4Addr) -> Result<[u32; 2]> {
    let bin = bin_path("zmesh-relay");
    let listen = format!("0.0.0.0:{RELAY_PORT}");
    let inbound = sb.spawn(
        "relay-server",
        sb.command(Some("server"), &bin, ["inbound", listen.as_str()]),
    )?;
    let peer = format!("{server_ip}:{RELAY_PORT}");
    let outbound = sb.spawn(
        "relay-crelay",
        sb.command(
            Some("crelay"),
            &bin,
            ["outbound", "0.0.0.0:15001", peer.as_str()],
        ),
    )?;
    for (host, port) in [("server", RELAY_PORT), ("crelay", 15001)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sb.in_netns(host, || {
            std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).is_err()
        })? {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "zmesh-relay in {host} is not listening on {port} after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok([inbound.pid(), outbound.pid()])
}

/// What every ztunnel of the run shares.
struct Launch<'a> {
    sb: &'a Sandbox,
    xds: &'a Path,
    ca: &'a mesh::CaFiles,
    args: &'a Args,
}

impl Launch<'_> {
    fn ztunnel(&self, host: &str, w: &WorkloadSpec, config: Option<&Path>) -> Result<Ztunnel> {
        let mut env = mesh::dedicated_env(w, self.xds, self.ca);
        if let Some(l) = &self.args.log {
            env.push(("RUST_LOG".into(), l.clone()));
        }
        if let Some(n) = self.args.workers {
            env.push(("ZTUNNEL_WORKER_THREADS".into(), n.to_string()));
        }
        env.extend(self.args.ztunnel_env.iter().cloned());
        if let Some(c) = config.or(self.args.ztunnel_config.as_deref()) {
            env.push(("ZTUNNEL_CONFIG".into(), c.display().to_string()));
        }
        let bin = self
            .args
            .ztunnel_bin
            .clone()
            .unwrap_or_else(|| bin_path("ztunnel"));
        Ztunnel::spawn(self.sb, host, &env, &bin)
    }
}

/// Like [`runs`], for throughput: the run with the median rate, and all of them.
fn tput_runs<F: FnMut() -> Result<bench::Throughput>>(
    n: usize,
    mut f: F,
) -> Result<(bench::Throughput, Vec<bench::Throughput>)> {
    let mut xs = Vec::new();
    for _ in 0..n {
        xs.push(f()?);
    }
    let mut sorted = xs.clone();
    sorted.sort_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    Ok((sorted[sorted.len() / 2], xs))
}

/// The ceiling section of the report (see `zmesh_tests::bench::ceiling`): for each stream
/// count, the hop cost measured on the direct run, the AES-GCM rates, the ceiling, and how
/// close HBONE came to it.
fn ceiling_report(
    rows: &[(usize, bench::Throughput, bench::Throughput)],
    aead: &[(&str, f64, f64)],
    cores: usize,
    workers: usize,
) -> String {
    let gbit = |b: f64| b * 8.0 / 1e9;
    let mut out = format!(
        "\n## Throughput ceiling ({cores} cores, {workers} ztunnel worker(s))\n\n\
         One AES-GCM pass over 16 KiB records, one core:\n\n\
         | suite | seal | open |\n|---|---|---|\n"
    );
    for (name, seal, open) in aead {
        out.push_str(&format!(
            "| {name} | {seal:.3} ns/B ({:.2} GB/s) | {open:.3} ns/B ({:.2} GB/s) |\n",
            1.0 / seal,
            1.0 / open.max(1e-9)
        ));
    }
    out.push_str(
        "\n| streams | hop cost (direct run) | HBONE CPU per byte | suite | ceiling | ceiling vs direct | HBONE vs ceiling |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (streams, d, m) in rows {
        for (name, seal, open) in aead {
            let c = ceiling::Ceiling {
                cores: cores as f64,
                hop: d.cpu_ns_per_byte,
                seal: *seal,
                open: *open,
            };
            let top = c.bytes_per_sec(workers);
            out.push_str(&format!(
                "| {streams} | {:.3} ns/B | {:.3} ns/B | {name} | {:.2} Gbit/s | {:.2}x | {:.0}% |\n",
                d.cpu_ns_per_byte,
                m.cpu_ns_per_byte,
                gbit(top),
                top / d.bytes_per_sec,
                100.0 * m.bytes_per_sec / top
            ));
        }
    }
    out
}

/// Connection-rate runs: the median rate, and the median CPU per connection in microseconds.
fn crr_runs<F: FnMut() -> Result<(f64, Duration)>>(n: usize, mut f: F) -> Result<(f64, f64)> {
    let (mut rates, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (r, c) = f()?;
        rates.push(r);
        cpus.push(c.as_secs_f64() * 1e6);
    }
    Ok((bench::median(rates), bench::median(cpus)))
}

/// The process ids of both ztunnels, whose CPU time the mesh runs meter.
fn zt_pids(zt: &(Ztunnel, Ztunnel)) -> [u32; 2] {
    [zt.0.pid(), zt.1.pid()]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs(args.seconds);
    let sb = Sandbox::new().context("cannot build the lab sandbox (root needed)")?;
    let hosts: &[&str] = if args.relay {
        &["server", "cmesh", "cdirect", "crelay"]
    } else {
        &["server", "cmesh", "cdirect"]
    };
    let topo = Topology::build(&sb, hosts)?;
    let (server_ip, mesh_ip) = (topo.host_ip("server"), topo.host_ip("cmesh"));
    let ca = mesh::write_ca(sb.dir(), "bench-root")?;
    let mut server_w = WorkloadSpec::new("server", server_ip).service_account("server");
    let client_w = WorkloadSpec::new("client", mesh_ip).service_account("client");
    let xds = sb.dir().join("mesh.yaml");
    let mut config = LocalConfig::default();
    if args.policies > 0 {
        anyhow::ensure!(args.policies >= 3, "--policies: 0, or at least 3");
        server_w = server_w.selected_by(bench::MIX_SELECTOR_POLICY);
        for p in bench::policy_mix(args.policies, &[SINK_PORT, ECHO_PORT]) {
            config = config.policy(p);
        }
    }
    config
        .workload(server_w.clone())
        .workload(client_w.clone())
        .write(&xds)?;
    redirect_outbound(&sb, "cmesh")?;
    if args.relay {
        redirect_outbound(&sb, "crelay")?;
    }
    // Connection-rate runs leave tens of thousands of TIME_WAIT sockets; with the default
    // (reuse on loopback only) connect()'s port search then dominates the direct baseline
    // while the mesh client (whose first hop is local) escapes it. Same rule for all hosts.
    for host in hosts {
        sb.run_in(host, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    let launch = Launch {
        sb: &sb,
        xds: &xds,
        ca: &ca,
        args: &args,
    };
    let servers = bench::start_servers(&sb, "server")?;
    let relays = if args.relay {
        Some(start_relays(&sb, server_ip)?)
    } else {
        None
    };
    // (server, client)
    let mut zt = (
        launch.ztunnel("server", &server_w, None)?,
        launch.ztunnel("cmesh", &client_w, None)?,
    );

    let sink = SocketAddr::new(server_ip.into(), SINK_PORT);
    let echo = SocketAddr::new(server_ip.into(), ECHO_PORT);
    let mut rows = Vec::new();
    let gbit = |b: f64| b * 8.0 / 1e9;
    let want = |what: &str| args.only.is_empty() || args.only.iter().any(|o| o == what);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // ztunnel's own default when --workers is absent (a quarter of the cores, at least one).
    let workers = args.workers.unwrap_or((cores / 4).max(1));
    let mut ceiling_rows = Vec::new();
    for streams in [1usize, 4].into_iter().filter(|_| want("throughput")) {
        eprintln!("throughput, {streams} stream(s)...");
        let (d, dr) = tput_runs(args.repeat, || {
            bench::throughput(&sb, "cdirect", sink, streams, dur, &servers, &[])
        })?;
        let (m, mr) = tput_runs(args.repeat, || {
            bench::throughput(&sb, "cmesh", sink, streams, dur, &servers, &zt_pids(&zt))
        })?;
        let relay = match &relays {
            Some(pids) => {
                let (r, _) = tput_runs(args.repeat, || {
                    bench::throughput(&sb, "crelay", sink, streams, dur, &servers, pids)
                })?;
                Some((
                    gbit(r.bytes_per_sec),
                    format!("{:.2}x", r.bytes_per_sec / d.bytes_per_sec),
                    format!("{:.3} ns/B", r.metered_ns_per_byte),
                ))
            }
            None => None,
        };
        eprintln!(
            "  direct {:?} Gbit/s, hbone {:?} Gbit/s",
            dr.iter().map(|x| gbit(x.bytes_per_sec)).collect::<Vec<_>>(),
            mr.iter().map(|x| gbit(x.bytes_per_sec)).collect::<Vec<_>>()
        );
        rows.push(Row {
            name: format!("throughput, {streams} stream(s)"),
            direct: gbit(d.bytes_per_sec),
            mesh: gbit(m.bytes_per_sec),
            unit: "Gbit/s",
            note: format!("{:.2}x", m.bytes_per_sec / d.bytes_per_sec),
            cpu: format!("{:.3} ns/B", m.metered_ns_per_byte),
            relay,
        });
        ceiling_rows.push((streams, d, m));
    }
    let ceiling = if ceiling_rows.is_empty() {
        None
    } else {
        eprintln!("AES-GCM rates (one core)...");
        let mut aead = Vec::new();
        for (name, alg) in ceiling::suites() {
            let (seal, open) = ceiling::aead_ns_per_byte(alg, Duration::from_secs(1))?;
            aead.push((name, seal, open));
        }
        Some(ceiling_report(&ceiling_rows, &aead, cores, workers))
    };

    if want("latency") {
        eprintln!("latency, 64-byte request/response...");
        let lat = |host: &str, meter: &[u32]| -> Result<(f64, f64, f64)> {
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            let mut cpus = Vec::new();
            for _ in 0..args.repeat {
                let (mut rtts, cpu) = bench::latency(&sb, host, echo, dur, meter)?;
                p50s.push(bench::quantile(&mut rtts, 0.50).as_secs_f64() * 1e6);
                p99s.push(bench::quantile(&mut rtts, 0.99).as_secs_f64() * 1e6);
                cpus.push(cpu.as_secs_f64() * 1e6);
            }
            Ok((
                bench::median(p50s),
                bench::median(p99s),
                bench::median(cpus),
            ))
        };
        let (d50, d99, _) = lat("cdirect", &[])?;
        let (m50, m99, mcpu) = lat("cmesh", &zt_pids(&zt))?;
        let relay = match &relays {
            Some(pids) => Some(lat("crelay", pids)?),
            None => None,
        };
        rows.push(Row {
            name: "latency p50".into(),
            direct: d50,
            mesh: m50,
            unit: "us",
            note: format!("{:+.0} us", m50 - d50),
            cpu: format!("{mcpu:.1} us per round trip"),
            relay: relay.map(|(r50, _, rcpu)| {
                (
                    r50,
                    format!("{:+.0} us", r50 - d50),
                    format!("{rcpu:.1} us per round trip"),
                )
            }),
        });
        rows.push(Row {
            name: "latency p99".into(),
            direct: d99,
            mesh: m99,
            unit: "us",
            note: format!("{:+.0} us", m99 - d99),
            cpu: String::new(),
            relay: relay.map(|(_, r99, _)| (r99, format!("{:+.0} us", r99 - d99), String::new())),
        });
    }

    let mut rss_client_warm = None;
    if want("crr") {
        eprintln!("connection rate, pool warm...");
        let w = args.crr_workers;
        let (cd, _) = crr_runs(args.repeat, || {
            bench::connection_rate(&sb, "cdirect", echo, w, dur, &[])
        })?;
        let (cm, cm_cpu) = crr_runs(args.repeat, || {
            bench::connection_rate(&sb, "cmesh", echo, w, dur, &zt_pids(&zt))
        })?;
        // The relays keep no connections between them: one run serves both rows.
        let relay = match &relays {
            Some(pids) => {
                let (cr, cr_cpu) = crr_runs(args.repeat, || {
                    bench::connection_rate(&sb, "crelay", echo, w, dur, pids)
                })?;
                Some((
                    cr,
                    format!("{:.2}x", cr / cd),
                    format!("{cr_cpu:.1} us per connection"),
                ))
            }
            None => None,
        };
        rows.push(Row {
            name: format!("connect+request+close, pool warm ({w} clients)"),
            direct: cd,
            mesh: cm,
            unit: "conn/s",
            note: format!("{:.2}x", cm / cd),
            cpu: format!("{cm_cpu:.1} us per connection"),
            relay: relay.clone(),
        });

        // Pool disabled: each connection pays TCP + TLS 1.3 + HTTP/2 handshakes, what a new
        // source per connection costs (the pool key includes the source). After the first, the
        // TLS handshakes resume the source certificate's session with the server, as those of
        // a source that connected before do; `core/benches/handshake.rs` counts a full one.
        eprintln!("connection rate, no pooling (new handshake per connection)...");
        rss_client_warm = bench::peak_rss_kib(zt.1.pid());
        zt.1.stop()?;
        let cold_cfg = sb.dir().join("cold.yaml");
        std::fs::write(&cold_cfg, "pool:\n  idle_timeout: 0s\n")?;
        zt.1 = launch.ztunnel("cmesh", &client_w, Some(&cold_cfg))?;
        let (cc, cc_cpu) = crr_runs(args.repeat, || {
            bench::connection_rate(&sb, "cmesh", echo, w, dur, &zt_pids(&zt))
        })?;
        rows.push(Row {
            name: format!("connect+request+close, every connection new ({w} clients)"),
            direct: cd,
            mesh: cc,
            unit: "conn/s",
            note: format!("{:.2}x", cc / cd),
            cpu: format!("{cc_cpu:.1} us per connection"),
            relay,
        });
    }

    let mut out = String::new();
    out.push_str(&format!(
        "zmesh-bench: {} s runs, median of {}, {}\n\n",
        args.seconds,
        args.repeat,
        bench::machine()
    ));
    if args.policies > 0 {
        out.push_str(&format!(
            "L4 AuthorizationPolicies in the mesh: {} (3 apply to the server and allow the client)\n\n",
            args.policies
        ));
    }
    if args.relay {
        out.push_str(
            "| measurement | direct TCP | HBONE (2 ztunnels) | HBONE vs direct | ztunnel CPU (both) | 2 plain TCP relays | relays vs direct | relay CPU (both) |\n|---|---|---|---|---|---|---|---|\n",
        );
    } else {
        out.push_str(
            "| measurement | direct TCP | HBONE (2 ztunnels) | HBONE vs direct | ztunnel CPU (both) |\n|---|---|---|---|---|\n",
        );
    }
    for r in &rows {
        out.push_str(&format!(
            "| {} | {:.2} {} | {:.2} {} | {} | {} |",
            r.name, r.direct, r.unit, r.mesh, r.unit, r.note, r.cpu
        ));
        if let Some((v, note, cpu)) = &r.relay {
            out.push_str(&format!(" {v:.2} {} | {note} | {cpu} |", r.unit));
        }
        out.push('\n');
    }
    let kib = |k: Option<u64>| {
        k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or("?".into())
    };
    out.push_str(&format!(
        "\nPeak RSS: server ztunnel {}, client ztunnel {} (warm-pool run), client ztunnel {} (no-pool run)\n",
        kib(bench::peak_rss_kib(zt.0.pid())),
        kib(rss_client_warm),
        kib(bench::peak_rss_kib(zt.1.pid())),
    ));
    if let Some(c) = &ceiling {
        out.push_str(c);
    }
    println!("{out}");
    if let Some(p) = args.report {
        std::fs::write(&p, &out).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
