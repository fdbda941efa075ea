//! `zmesh-bench-waypoint`: HTTP through the waypoint against the same traffic without it, in
//! one run, in the lab's namespace setup. Hosts (one netns each, on one bridge):
//!
//! - `server`: the backend (Debian's nginx returning a small body; HTTP/1.1 on 8080, h2c on
//!   8081) and its ztunnel;
//! - `cmesh`: the mesh client (outbound TCP redirected to its ztunnel);
//! - `wp`: the waypoint (terminates HBONE on 15008 itself, no ztunnel), and nginx as a plain
//!   reverse proxy (HTTP/1.1 on 8090, h2c on 8091, `proxy_pass` with a keepalive upstream);
//! - `cdirect`: a client outside the mesh.
//!
//! Paths, the same backend for each: direct (`cdirect` -> backend), ztunnel only (`cmesh` ->
//! ztunnel -> HBONE -> ztunnel -> backend, a Service with no waypoint), ztunnel + waypoint
//! (`cmesh` -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel -> backend, a Service bound to
//! the waypoint) and nginx (`cdirect` -> nginx on `wp` -> backend, plain TCP, no ztunnel).
//! Loads: `wrk` (HTTP/1.1, 32 connections), `h2load` (h2c), and `serial` (wrk with one
//! connection: each path's own latency, no request queued behind another). Each path is
//! measured `--repeat` times for `--seconds`, the paths interleaved; figures are medians. The
//! proxy's CPU is its utime+stime over the run (the waypoint process; nginx's workers), its
//! memory VmRSS and RssAnon (the private part: heap, stacks; the rest is the binary's code and
//! shared libraries, file pages shared through the page cache) sampled every 100 ms. Build
//! with the benchmark profile first:
//!
//! ```text
//! apt-get install wrk nghttp2-client nginx-light curl
//! cargo build --profile bench-lto -p ztunnel -p zmesh-waypoint -p zmesh-tests --bins
//! target/bench-lto/zmesh-bench-waypoint
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use zmesh_tests::l7bench::{self, LoadResult, Usage};
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, ServiceSpec, WaypointSpec, WorkloadSpec};
use zmesh_tests::process::Process;
use zmesh_tests::tools::Search;
use zmesh_tests::ztunnel::Ztunnel;
use zmesh_tests::{Sandbox, bench, bin_path};

const BOUND_VIP: &str = "10.96.0.10";
const PLAIN_VIP: &str = "10.96.0.11";
const WAYPOINT_VIP: &str = "10.96.0.99";
const BACKEND_H1: u16 = 8080;
const BACKEND_H2: u16 = 8081;
const PROXY_H1: u16 = 8090;
const PROXY_H2: u16 = 8091;
/// The backend's response body (64 bytes with the newline nginx adds).
const BODY: &str = "zmesh waypoint benchmark: a small static body, 64 bytes long...";

#[derive(Parser)]
#[command(about = "Benchmark HTTP through the waypoint against ztunnel only, direct and nginx")]
struct Args {
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each path (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// wrk connections (HTTP/1.1: one request in flight on each).
    #[arg(long, default_value_t = 32)]
    wrk_connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
    /// h2load clients (connections).
    #[arg(long, default_value_t = 4)]
    h2_clients: usize,
    /// h2load concurrent streams per client.
    #[arg(long, default_value_t = 8)]
    h2_streams: usize,
    /// Worker processes of the backend nginx and of the proxy nginx (the waypoint and the
    /// ztunnels use their defaults: one worker thread per core).
    #[arg(long, default_value_t = default_workers())]
    nginx_workers: usize,
    /// The waypoint's log filter (RUST_LOG); its default (`info`: one access-log line per
    /// request) when absent.
    #[arg(long)]
    waypoint_log: Option<String>,
    /// ztunnel's log filter (RUST_LOG); its default when absent.
    #[arg(long)]
    ztunnel_log: Option<String>,
    /// Extra environment for the waypoint, `KEY=VALUE` (repeatable), e.g.
    /// `WAYPOINT_WORKER_THREADS=1`.
    #[arg(long = "waypoint-env", value_parser = bench::parse_env)]
    waypoint_env: Vec<(String, String)>,
    /// Run only these loads: `wrk` (HTTP/1.1, `--wrk-connections`), `h2load` (h2c), `serial`
    /// (wrk with one connection: each path's latency with no queueing); all three when absent.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The waypoint binary to measure (default: the one next to this benchmark), e.g. an
    /// older build, to compare builds in the same sitting against the same nginx.
    #[arg(long)]
    waypoint_bin: Option<PathBuf>,
    /// Where to write the markdown report (also printed).
    #[arg(long)]
    report: Option<PathBuf>,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PathKind {
    Direct,
    Ztunnel,
    Waypoint,
    Nginx,
}

const PATHS: [PathKind; 4] = [
    PathKind::Direct,
    PathKind::Ztunnel,
    PathKind::Waypoint,
    PathKind::Nginx,
];

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ztunnel => "ztunnel -> ztunnel",
            PathKind::Waypoint => "ztunnel -> waypoint -> ztunnel",
            PathKind::Nginx => "nginx reverse proxy (plain TCP)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Wrk,
    H2load,
    /// wrk with one connection: one request at a time, so the latency is the path's own, with
    /// no request queued behind another (the loaded runs' p50 is mostly queueing: about
    /// connections / throughput).
    Serial,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Wrk => "wrk",
            Tool::H2load => "h2load",
            Tool::Serial => "serial",
        }
    }
}

/// Where each path's client runs and what it asks for.
struct Lab {
    server_ip: Ipv4Addr,
    wp_ip: Ipv4Addr,
}

impl Lab {
    fn client_and_url(&self, path: PathKind, tool: Tool) -> (&'static str, String) {
        let h2 = tool == Tool::H2load;
        let (host, ip, port) = match path {
            PathKind::Direct => (
                "cdirect",
                self.server_ip.to_string(),
                if h2 { BACKEND_H2 } else { BACKEND_H1 },
            ),
            PathKind::Ztunnel => ("cmesh", PLAIN_VIP.to_owned(), if h2 { 81 } else { 80 }),
            PathKind::Waypoint => ("cmesh", BOUND_VIP.to_owned(), if h2 { 81 } else { 80 }),
            PathKind::Nginx => (
                "cdirect",
                self.wp_ip.to_string(),
                if h2 { PROXY_H2 } else { PROXY_H1 },
            ),
        };
        (host, format!("http://{ip}:{port}/"))
    }
}

/// One measured run.
struct Run {
    load: LoadResult,
    /// The proxy of the path (waypoint, or nginx's workers), both ztunnels, the backend's workers.
    proxy: Usage,
    ztunnels: Usage,
    backend: Usage,
}

/// The processes whose usage a run records.
struct Pids {
    waypoint: u32,
    proxy_master: u32,
    ztunnels: [u32; 2],
    backend_master: u32,
}

fn run_tool(
    sb: &Sandbox,
    args: &Args,
    tool: Tool,
    host: &str,
    url: &str,
    secs: u64,
) -> Result<LoadResult> {
    let (out, log) = match tool {
        Tool::Wrk | Tool::Serial => {
            let (threads, connections) = match tool {
                Tool::Serial => (1, 1),
                _ => (args.wrk_threads, args.wrk_connections),
            };
            let a = [
                "-t".to_owned(),
                threads.to_string(),
                "-c".into(),
                connections.to_string(),
                "-d".into(),
                format!("{secs}s"),
                "--latency".into(),
                url.to_owned(),
            ];
            (capture(sb, host, "wrk", &a)?, None)
        }
        Tool::H2load => {
            // Not next to the config files (see `main`).
            let log = sb.dir().join("h2load-requests.log");
            let a = [
                "-t".to_owned(),
                "1".into(),
                "-c".into(),
                args.h2_clients.to_string(),
                "-m".into(),
                args.h2_streams.to_string(),
                "-D".into(),
                secs.to_string(),
                format!("--log-file={}", log.display()),
                url.to_owned(),
            ];
            let out = capture(sb, host, "h2load", &a)?;
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("reading h2load's log {}", log.display()))?;
            let _ = std::fs::remove_file(&log);
            (out, Some(text))
        }
    };
    Ok(match log {
        None => l7bench::parse_wrk(&out)?,
        Some(log) => l7bench::parse_h2load(&out, &log)?,
    })
}

/// Runs `program args` in `host` and returns its stdout; fails with its output.
fn capture(sb: &Sandbox, host: &str, program: &str, args: &[String]) -> Result<String> {
    let out = sb
        .command(Some(host), program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {program} in {host}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{program} {} in {host} failed ({}): {}{}",
        args.join(" "),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Polls `curl` until the path answers with the backend's body (HTTP/1.1 and h2c).
fn wait_path(sb: &Sandbox, lab: &Lab, path: PathKind) -> Result<()> {
    for tool in [Tool::Wrk, Tool::H2load] {
        let (host, url) = lab.client_and_url(path, tool);
        let mut a = vec!["-sS", "-m", "5"];
        if tool == Tool::H2load {
            a.push("--http2-prior-knowledge");
        }
        a.push(&url);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut argv = vec!["curl"];
            argv.extend(&a);
            match sb.run_in(host, &argv) {
                Ok(body) if body.strip_suffix('\n') == Some(BODY) => break,
                r if std::time::Instant::now() > deadline => {
                    bail!(
                        "{} ({url} from {host}) does not answer: {r:?}",
                        path.label()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    Ok(())
}

fn spawn_nginx(sb: &Sandbox, host: &str, name: &str, conf: &str) -> Result<Process> {
    let dir = sb.dir();
    std::fs::create_dir_all(dir.join(format!("{name}-tmp")))?;
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let err = dir.join(format!("{name}-error.log"));
    let cmd = sb.command(
        Some(host),
        "nginx",
        [
            "-c".as_ref(),
            path.as_os_str(),
            "-e".as_ref(),
            err.as_os_str(),
        ],
    );
    sb.spawn(&format!("nginx-{name}"), cmd)
}

/// The waypoint in `wp`, configured by a local file (no controller) and the lab's CA.
fn spawn_waypoint(sb: &Sandbox, args: &Args, config: &Path, ca: &mesh::CaFiles) -> Result<Process> {
    let bin = args
        .waypoint_bin
        .clone()
        .unwrap_or_else(|| bin_path("waypoint"));
    let mut cmd = sb.command(Some("wp"), bin, std::iter::empty::<&str>());
    cmd.env_remove("XDS_ADDRESS")
        .env_remove("CA_ADDRESS")
        .env("POD_NAMESPACE", "default")
        .env("POD_NAME", "waypoint-0")
        .env("SERVICE_ACCOUNT", "waypoint")
        .env("TRUST_DOMAIN", mesh::TRUST_DOMAIN)
        .env("LOCAL_XDS_PATH", config)
        .env("LOCAL_CA_CERT", &ca.cert)
        .env("LOCAL_CA_KEY", &ca.key);
    match &args.waypoint_log {
        Some(l) => cmd.env("RUST_LOG", l),
        None => cmd.env_remove("RUST_LOG"),
    };
    cmd.envs(args.waypoint_env.iter().cloned());
    sb.spawn("waypoint", cmd)
}

/// The ztunnels' config, and the waypoint's (the same workloads and services plus the bound
/// Service: `echo` ports 80 (HTTP/1.1 -> 8080) and 81 (HTTP/2 -> 8081)).
fn write_configs(
    dir: &Path,
    topo: &Topology<'_>,
) -> Result<(PathBuf, PathBuf, WorkloadSpec, WorkloadSpec)> {
    let ports = [(80, BACKEND_H1), (81, BACKEND_H2)];
    let client = WorkloadSpec::new("client", topo.host_ip("cmesh")).service_account("client");
    let server = WorkloadSpec::new("server", topo.host_ip("server"))
        .service_account("server")
        .backs("echo", &ports)
        .backs("plain", &ports);
    let wp = WorkloadSpec::new("waypoint-0", topo.host_ip("wp"))
        .service_account("waypoint")
        .backs("waypoint", &[(15008, 15008)]);
    let svc = |name: &str, vip: &str| {
        ServiceSpec::new(name, vip)
            .port(80, BACKEND_H1)
            .port(81, BACKEND_H2)
    };
    let config = LocalConfig::default()
        .workload(client.clone())
        .workload(server.clone())
        .workload(wp)
        .service(svc("echo", BOUND_VIP).waypoint(WaypointSpec::vip(WAYPOINT_VIP)))
        .service(svc("plain", PLAIN_VIP))
        .service(ServiceSpec::new("waypoint", WAYPOINT_VIP).port(15008, 15008));
    let zt = dir.join("mesh.yaml");
    config.write(&zt)?;
    let host = mesh::service_hostname("echo", "default");
    let wp_yaml = format!(
        "{}boundServices:\n- name: echo\n  namespace: default\n  hostname: {host}\n  \
         vips: [/{BOUND_VIP}]\n  ports:\n  - {{port: 80, targetPort: {BACKEND_H1}, protocol: HTTP}}\n  \
         - {{port: 81, targetPort: {BACKEND_H2}, protocol: HTTP2}}\n",
        config.to_yaml()
    );
    let wp_path = dir.join("waypoint.yaml");
    zmesh_tests::write_atomic(&wp_path, &wp_yaml)?;
    Ok((zt, wp_path, client, server))
}

/// `istio_requests_total{reporter="waypoint"}` summed, from the waypoint's admin port.
fn waypoint_requests(sb: &Sandbox) -> Result<f64> {
    let m = sb.run_in(
        "wp",
        &["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"],
    )?;
    Ok(m.lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"waypoint\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn first_line(program: &str, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.repeat >= 1 && args.seconds >= 1,
        "--repeat and --seconds: at least 1"
    );
    let search = Search::from_env(Path::new("/usr/lib/cni"));
    if let Some(msg) = l7bench::missing_tools(&search) {
        bail!("{msg}");
    }
    for bin in ["ztunnel", "waypoint"] {
        if bin == "waypoint" && args.waypoint_bin.is_some() {
            continue;
        }
        if zmesh_tests::gamma::sibling_binary(bin).is_none() {
            bail!(
                "{bin} is not next to this benchmark: cargo build --profile bench-lto -p ztunnel \
                 -p zmesh-waypoint -p zmesh-tests --bins (or set ZMESH_BIN_DIR)"
            );
        }
    }
    let tools: Vec<Tool> = [Tool::Wrk, Tool::H2load, Tool::Serial]
        .into_iter()
        .filter(|t| args.only.is_empty() || args.only.iter().any(|o| o == t.name()))
        .collect();
    ensure!(
        !tools.is_empty(),
        "--only: one or more of wrk, h2load, serial"
    );
    let load_before = loadavg();

    let sb = Sandbox::new().context("cannot build the lab sandbox (root needed)")?;
    let topo = Topology::build(&sb, &["server", "cmesh", "wp", "cdirect"])?;
    let lab = Lab {
        server_ip: topo.host_ip("server"),
        wp_ip: topo.host_ip("wp"),
    };
    // The config files in a directory of their own: ztunnel watches its file's directory, and
    // would wake up for every line the processes' logs (in `sb.dir()`) get.
    let conf_dir = sb.dir().join("config");
    std::fs::create_dir_all(&conf_dir)?;
    let ca = mesh::write_ca(&conf_dir, "bench-root")?;
    let (zt_yaml, wp_yaml, client_w, server_w) = write_configs(&conf_dir, &topo)?;
    redirect_outbound(&sb, "cmesh")?;

    let backend = spawn_nginx(
        &sb,
        "server",
        "backend",
        &l7bench::backend_conf(sb.dir(), args.nginx_workers, BACKEND_H1, BACKEND_H2, BODY),
    )?;
    let proxy = spawn_nginx(
        &sb,
        "wp",
        "proxy",
        &l7bench::proxy_conf(
            sb.dir(),
            args.nginx_workers,
            PROXY_H1,
            PROXY_H2,
            &format!("{}:{BACKEND_H1}", lab.server_ip),
        ),
    )?;
    let zt = |host: &str, w: &WorkloadSpec| -> Result<Ztunnel> {
        let mut env = mesh::dedicated_env(w, &zt_yaml, &ca);
        if let Some(l) = &args.ztunnel_log {
            env.push(("RUST_LOG".into(), l.clone()));
        }
        Ztunnel::spawn(&sb, host, &env, &bin_path("ztunnel"))
    };
    let zt_server = zt("server", &server_w)?;
    let zt_client = zt("cmesh", &client_w)?;
    let waypoint = spawn_waypoint(&sb, &args, &wp_yaml, &ca)?;
    for p in PATHS {
        wait_path(&sb, &lab, p).with_context(|| {
            format!(
                "waiting for the {} path; logs in {}",
                p.label(),
                sb.dir().display()
            )
        })?;
    }
    let pids = Pids {
        waypoint: waypoint.pid(),
        proxy_master: proxy.pid(),
        ztunnels: [zt_client.pid(), zt_server.pid()],
        backend_master: backend.pid(),
    };
    let proxy_workers = l7bench::children(pids.proxy_master);
    let backend_workers = l7bench::children(pids.backend_master);
    ensure!(
        !proxy_workers.is_empty() && !backend_workers.is_empty(),
        "nginx runs no worker process (see {})",
        sb.dir().display()
    );

    let mut report = String::new();
    let mut raw = String::new();
    for &tool in &tools {
        eprintln!("{}: warm-up...", tool.name());
        for p in PATHS {
            let (host, url) = lab.client_and_url(p, tool);
            run_tool(&sb, &args, tool, host, &url, 2)?;
        }
        let mut runs: Vec<(PathKind, Run)> = Vec::new();
        for rep in 0..args.repeat {
            for p in PATHS {
                let (host, url) = lab.client_and_url(p, tool);
                let proxy_pids: Vec<u32> = match p {
                    PathKind::Waypoint => vec![pids.waypoint],
                    PathKind::Nginx => proxy_workers.clone(),
                    _ => Vec::new(),
                };
                let groups = [proxy_pids, pids.ztunnels.to_vec(), backend_workers.clone()];
                let before = (p == PathKind::Waypoint)
                    .then(|| waypoint_requests(&sb))
                    .transpose()?;
                let (load, usage) = l7bench::measure(&groups, || {
                    run_tool(&sb, &args, tool, host, &url, args.seconds)
                });
                let load = load?;
                if let Some(before) = before {
                    // The waypoint path must really cross the waypoint: it counted each request.
                    let counted = waypoint_requests(&sb)? - before;
                    ensure!(
                        counted >= load.requests as f64,
                        "the waypoint counted {counted} requests of the {} wrk/h2load made: \
                         traffic did not go through it",
                        load.requests
                    );
                }
                let line = format!(
                    "| {} | {} | {} | {:.0} | {} | {} | {} | {:.2} s | {:.1} | {:.1} | {:.2} s | {:.2} s |\n",
                    tool.name(),
                    rep + 1,
                    p.label(),
                    load.rps,
                    load.p50.as_micros(),
                    load.p99.as_micros(),
                    load.errors,
                    usage[0].cpu.as_secs_f64(),
                    usage[0].rss_mib(),
                    usage[0].anon_mib(),
                    usage[1].cpu.as_secs_f64(),
                    usage[2].cpu.as_secs_f64(),
                );
                eprint!("{line}");
                raw.push_str(&line);
                runs.push((
                    p,
                    Run {
                        load,
                        proxy: usage[0],
                        ztunnels: usage[1],
                        backend: usage[2],
                    },
                ));
            }
        }
        report.push_str(&table(&args, tool, &runs));
    }
    let mut out = format!(
        "zmesh-bench-waypoint: {} s runs, median of {}, {}; load average {} before / {} after\n\
         {}; {}; {}\n\
         wrk: {} connections, {} thread(s); h2load: {} clients x {} streams, 1 thread; \
         nginx: {} worker(s) (backend and proxy); waypoint log: {}{}\n\n",
        args.seconds,
        args.repeat,
        zmesh_tests::bench::machine(),
        load_before,
        loadavg(),
        first_line("nginx", "-v"),
        first_line("wrk", "-v"),
        first_line("h2load", "--version"),
        args.wrk_connections,
        args.wrk_threads,
        args.h2_clients,
        args.h2_streams,
        args.nginx_workers,
        args.waypoint_log
            .as_deref()
            .unwrap_or("default (info, access log on)"),
        args.waypoint_env
            .iter()
            .map(|(k, v)| format!("; waypoint env {k}={v}"))
            .collect::<String>(),
    );
    out.push_str(&report);
    out.push_str(
        "\nEvery run (CPU = utime+stime over the run; proxy = the waypoint process or nginx's \
         workers; RSS and its anonymous part are the largest sums seen over the run, so what \
         nginx's workers share, code and what they inherited from the master, counts once per \
         worker):\n\n| tool | run | path | req/s | p50 us | p99 us | errors | proxy CPU | \
         proxy RSS MiB | of it anonymous | ztunnels CPU | backend CPU |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    out.push_str(&raw);
    out.push_str(&format!(
        "\nPeak RSS (VmHWM): waypoint {:.1} MiB, nginx proxy workers {:.1} MiB, ztunnels {:.1} MiB \
         (client) and {:.1} MiB (server)\n",
        bench::peak_rss_kib(pids.waypoint).unwrap_or(0) as f64 / 1024.0,
        proxy_workers
            .iter()
            .filter_map(|p| bench::peak_rss_kib(*p))
            .sum::<u64>() as f64
            / 1024.0,
        bench::peak_rss_kib(pids.ztunnels[0]).unwrap_or(0) as f64 / 1024.0,
        bench::peak_rss_kib(pids.ztunnels[1]).unwrap_or(0) as f64 / 1024.0,
    ));
    println!("{out}");
    if let Some(p) = &args.report {
        std::fs::write(p, &out).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The summary table of one tool: medians per path, ratios to direct, and the hop costs.
fn table(args: &Args, tool: Tool, runs: &[(PathKind, Run)]) -> String {
    let med = |p: PathKind, f: &dyn Fn(&Run) -> f64| -> f64 {
        bench::median(
            runs.iter()
                .filter(|(k, _)| *k == p)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    let rps = |p| med(p, &|r| r.load.rps);
    let p50 = |p| med(p, &|r| r.load.p50.as_secs_f64() * 1e6);
    let p99 = |p| med(p, &|r| r.load.p99.as_secs_f64() * 1e6);
    let vcpu = |p, u: &dyn Fn(&Run) -> Usage| med(p, &|r| u(r).vcpu_per_krps(r.load.requests));
    let errors = |p| -> u64 {
        runs.iter()
            .filter(|(k, _)| *k == p)
            .map(|(_, r)| r.load.errors)
            .sum()
    };
    let load = match tool {
        Tool::Wrk => format!("{} connections", args.wrk_connections),
        Tool::H2load => format!("{} clients x {} streams", args.h2_clients, args.h2_streams),
        Tool::Serial => "1 connection, one request at a time".to_owned(),
    };
    let mut out = format!(
        "## {} ({}, {load})\n\n| path | req/s | vs direct | p50 us | p99 us | proxy vCPU per \
         1000 req/s | proxy RSS MiB (max) | of it anonymous | proxy MiB per 1000 req/s | \
         ztunnels vCPU per 1000 req/s | errors |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        tool.name(),
        match tool {
            Tool::Wrk | Tool::Serial => "HTTP/1.1",
            Tool::H2load => "h2c",
        }
    );
    let direct = rps(PathKind::Direct);
    for p in PATHS {
        let has_proxy = matches!(p, PathKind::Waypoint | PathKind::Nginx);
        let has_zt = matches!(p, PathKind::Ztunnel | PathKind::Waypoint);
        let rss = med(p, &|r| r.proxy.rss_mib());
        let anon = med(p, &|r| r.proxy.anon_mib());
        let dash = |b: bool, s: String| if b { s } else { "-".into() };
        out.push_str(&format!(
            "| {} | {:.0} | {:.2}x | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            p.label(),
            rps(p),
            rps(p) / direct,
            p50(p),
            p99(p),
            dash(has_proxy, format!("{:.3}", vcpu(p, &|r| r.proxy))),
            dash(has_proxy, format!("{rss:.1}")),
            dash(has_proxy, format!("{anon:.1}")),
            dash(has_proxy, format!("{:.2}", rss / (rps(p) / 1000.0))),
            dash(has_zt, format!("{:.3}", vcpu(p, &|r| r.ztunnels))),
            errors(p),
        ));
    }
    let backend = med(PathKind::Direct, &|r| {
        r.backend.vcpu_per_krps(r.load.requests)
    });
    out.push_str(&format!(
        "\nL7 hop: the waypoint adds {:+.0} us p50 / {:+.0} us p99 to ztunnel -> ztunnel and \
         costs {:.3} vCPU per 1000 req/s; nginx adds {:+.0} us p50 / {:+.0} us p99 to direct and \
         costs {:.3} vCPU per 1000 req/s (waypoint/nginx CPU: {:.2}x). Backend: {:.3} vCPU per \
         1000 req/s.\n\n",
        p50(PathKind::Waypoint) - p50(PathKind::Ztunnel),
        p99(PathKind::Waypoint) - p99(PathKind::Ztunnel),
        vcpu(PathKind::Waypoint, &|r| r.proxy),
        p50(PathKind::Nginx) - p50(PathKind::Direct),
        p99(PathKind::Nginx) - p99(PathKind::Direct),
        vcpu(PathKind::Nginx, &|r| r.proxy),
        vcpu(PathKind::Waypoint, &|r| r.proxy) / vcpu(PathKind::Nginx, &|r| r.proxy),
        backend,
    ));
    out
}
