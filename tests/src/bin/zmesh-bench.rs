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
use zmesh_tests::bench::{self, ECHO_PORT, SINK_PORT};
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
    /// Where to write the markdown report (also printed).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

struct Row {
    name: String,
    direct: f64,
    mesh: f64,
    unit: &'static str,
    /// Ratio mesh/direct, or for latency the added time.
    note: String,
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
        if let Some(c) = config.or(self.args.ztunnel_config.as_deref()) {
            env.push(("ZTUNNEL_CONFIG".into(), c.display().to_string()));
        }
        Ztunnel::spawn(self.sb, host, &env, &bin_path("ztunnel"))
    }
}

fn runs<F: FnMut() -> Result<f64>>(n: usize, mut f: F) -> Result<(f64, Vec<f64>)> {
    let mut xs = Vec::new();
    for _ in 0..n {
        xs.push(f()?);
    }
    Ok((bench::median(xs.clone()), xs))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs(args.seconds);
    let sb = Sandbox::new().context("cannot build the lab sandbox (root needed)")?;
    let topo = Topology::build(&sb, &["server", "cmesh", "cdirect"])?;
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
    // Connection-rate runs leave tens of thousands of TIME_WAIT sockets; with the default
    // (reuse on loopback only) connect()'s port search then dominates the direct baseline
    // while the mesh client (whose first hop is local) escapes it. Same rule for all hosts.
    for host in ["server", "cmesh", "cdirect"] {
        sb.run_in(host, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    let launch = Launch {
        sb: &sb,
        xds: &xds,
        ca: &ca,
        args: &args,
    };
    let servers = bench::start_servers(&sb, "server")?;
    let zt_server = launch.ztunnel("server", &server_w, None)?;
    let mut zt_client = launch.ztunnel("cmesh", &client_w, None)?;

    let sink = SocketAddr::new(server_ip.into(), SINK_PORT);
    let echo = SocketAddr::new(server_ip.into(), ECHO_PORT);
    let mut rows = Vec::new();
    let gbit = |b: f64| b * 8.0 / 1e9;
    let want = |what: &str| args.only.is_empty() || args.only.iter().any(|o| o == what);

    for streams in [1usize, 4].into_iter().filter(|_| want("throughput")) {
        eprintln!("throughput, {streams} stream(s)...");
        let (d, dr) = runs(args.repeat, || {
            bench::throughput(&sb, "cdirect", sink, streams, dur, &servers)
        })?;
        let (m, mr) = runs(args.repeat, || {
            bench::throughput(&sb, "cmesh", sink, streams, dur, &servers)
        })?;
        eprintln!(
            "  direct {:?} Gbit/s, hbone {:?} Gbit/s",
            dr.iter().map(|x| gbit(*x)).collect::<Vec<_>>(),
            mr.iter().map(|x| gbit(*x)).collect::<Vec<_>>()
        );
        rows.push(Row {
            name: format!("throughput, {streams} stream(s)"),
            direct: gbit(d),
            mesh: gbit(m),
            unit: "Gbit/s",
            note: format!("{:.2}x", m / d),
        });
    }

    if want("latency") {
        eprintln!("latency, 64-byte request/response...");
        let lat = |host: &str| -> Result<(f64, f64)> {
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for _ in 0..args.repeat {
                let mut rtts = bench::latency(&sb, host, echo, dur)?;
                p50s.push(bench::quantile(&mut rtts, 0.50).as_secs_f64() * 1e6);
                p99s.push(bench::quantile(&mut rtts, 0.99).as_secs_f64() * 1e6);
            }
            Ok((bench::median(p50s), bench::median(p99s)))
        };
        let (d50, d99) = lat("cdirect")?;
        let (m50, m99) = lat("cmesh")?;
        rows.push(Row {
            name: "latency p50".into(),
            direct: d50,
            mesh: m50,
            unit: "us",
            note: format!("+{:.0} us", m50 - d50),
        });
        rows.push(Row {
            name: "latency p99".into(),
            direct: d99,
            mesh: m99,
            unit: "us",
            note: format!("+{:.0} us", m99 - d99),
        });
    }

    let mut rss_client_warm = None;
    if want("crr") {
        eprintln!("connection rate, pool warm...");
        let w = args.crr_workers;
        let (cd, _) = runs(args.repeat, || {
            bench::connection_rate(&sb, "cdirect", echo, w, dur)
        })?;
        let (cm, _) = runs(args.repeat, || {
            bench::connection_rate(&sb, "cmesh", echo, w, dur)
        })?;
        rows.push(Row {
            name: format!("connect+request+close, pool warm ({w} clients)"),
            direct: cd,
            mesh: cm,
            unit: "conn/s",
            note: format!("{:.2}x", cm / cd),
        });

        // Pool disabled: each connection pays TCP + TLS 1.3 + HTTP/2 handshakes, exactly what a
        // new source per connection costs (the pool key includes the source).
        eprintln!("connection rate, no pooling (new handshake per connection)...");
        rss_client_warm = bench::peak_rss_kib(zt_client.pid());
        zt_client.stop()?;
        let cold_cfg = sb.dir().join("cold.yaml");
        std::fs::write(&cold_cfg, "pool:\n  idle_timeout: 0s\n")?;
        zt_client = launch.ztunnel("cmesh", &client_w, Some(&cold_cfg))?;
        let (cc, _) = runs(args.repeat, || {
            bench::connection_rate(&sb, "cmesh", echo, w, dur)
        })?;
        rows.push(Row {
            name: format!("connect+request+close, every connection new ({w} clients)"),
            direct: cd,
            mesh: cc,
            unit: "conn/s",
            note: format!("{:.2}x", cc / cd),
        });
    }

    let mut out = String::new();
    out.push_str(&format!(
        "zmesh-bench: {} s runs, median of {}, {} cores\n\n",
        args.seconds,
        args.repeat,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    ));
    if args.policies > 0 {
        out.push_str(&format!(
            "L4 AuthorizationPolicies in the mesh: {} (3 apply to the server and allow the client)\n\n",
            args.policies
        ));
    }
    out.push_str(
        "| measurement | direct TCP | HBONE (2 ztunnels) | HBONE vs direct |\n|---|---|---|---|\n",
    );
    for r in &rows {
        out.push_str(&format!(
            "| {} | {:.2} {} | {:.2} {} | {} |\n",
            r.name, r.direct, r.unit, r.mesh, r.unit, r.note
        ));
    }
    let kib = |k: Option<u64>| {
        k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or("?".into())
    };
    out.push_str(&format!(
        "\nPeak RSS: server ztunnel {}, client ztunnel {} (warm-pool run), client ztunnel {} (no-pool run)\n",
        kib(bench::peak_rss_kib(zt_server.pid())),
        kib(rss_client_warm),
        kib(bench::peak_rss_kib(zt_client.pid())),
    ));
    println!("{out}");
    if let Some(p) = args.report {
        std::fs::write(&p, &out).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
