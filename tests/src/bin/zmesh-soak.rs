//! `zmesh-soak`: what ztunnel costs per connection and whether it gives it back. In the lab's
//! namespace setup (hosts `cdirect`, `cmesh`, `server`, as `zmesh-bench`), one run measures:
//!
//! 1. N idle connections (default 10,000) opened directly (the plain-TCP baseline), then the
//!    same N through two ztunnels (carried on pooled HBONE connections): each ztunnel's
//!    resident memory and descriptors before, with all N open, and after they close; the
//!    cost per connection (`(with N open - baseline) / N`); how long until the memory is back
//!    near the baseline and the pooled HBONE connections are closed.
//! 2. A connect + 64-byte exchange + close churn, direct then through the mesh (default 10
//!    minutes), sampling the ztunnels as it runs, then the same return to baseline.
//! 3. The time each ztunnel takes to exit after SIGTERM once there is nothing left to drain.
//!
//! ```text
//! cargo build --release -p ztunnel -p zmesh-tests --bins
//! sudo target/release/zmesh-soak                      # --connections 10000 --churn-seconds 600
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use zmesh_tests::bench::ECHO_PORT;
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, WorkloadSpec};
use zmesh_tests::soak::{self, ProcSample};
use zmesh_tests::ztunnel::Ztunnel;
use zmesh_tests::{Sandbox, bin_path};

#[derive(Parser)]
#[command(about = "Soak: idle connections, churn, memory given back, exit time; ztunnel vs direct")]
struct Args {
    /// Idle connections held open at once.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Length of the churn through the mesh, in seconds.
    #[arg(long, default_value_t = 600)]
    churn_seconds: u64,
    /// Length of the direct (baseline) churn, in seconds.
    #[arg(long, default_value_t = 30)]
    direct_churn_seconds: u64,
    /// Concurrent clients in the churn.
    #[arg(long, default_value_t = 4)]
    churn_workers: usize,
    /// Threads opening the idle connections.
    #[arg(long, default_value_t = 8)]
    open_threads: usize,
    /// How long to wait for memory and pooled connections to come back down, in seconds.
    #[arg(long, default_value_t = 60)]
    settle_seconds: u64,
    /// ztunnel worker threads (ZTUNNEL_WORKER_THREADS); ztunnel's default when absent.
    #[arg(long)]
    workers: Option<usize>,
    /// ztunnel's log filter (RUST_LOG); ztunnel's default (`info`) when absent.
    #[arg(long)]
    log: Option<String>,
    /// A ztunnel config file (YAML) given to both ztunnels.
    #[arg(long)]
    ztunnel_config: Option<std::path::PathBuf>,
    /// Where to write the markdown report (also printed).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Internal: run as the echo server (started by the benchmark inside the `server` host,
    /// as its own process so that each side of the N connections has its own descriptors).
    #[arg(long, hide = true)]
    echo_server: bool,
}

/// The echo server process: each connection echoes 64-byte messages until it closes.
fn echo_server() -> Result<()> {
    soak::raise_fd_limit_to_hard()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind(("0.0.0.0", ECHO_PORT)).await?;
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 64];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// "Near the baseline": within a quarter of it, or 4 MiB, whichever is more.
fn near(baseline: u64, now: u64) -> bool {
    now <= baseline + (baseline / 4).max(4 << 10)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn secs(d: Option<Duration>, limit: u64) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| format!("not within {limit} s"))
}

/// The two ztunnels and their baselines.
struct Pair {
    client: Ztunnel,
    server: Ztunnel,
    base_client: ProcSample,
    base_server: ProcSample,
}

/// After a load: how long until each ztunnel's memory is near its baseline and the client's
/// pooled HBONE connections are closed (polled together, each timed on its own).
struct Settled {
    client_rss: Option<Duration>,
    server_rss: Option<Duration>,
    pool_closed: Option<Duration>,
    client_after: ProcSample,
    server_after: ProcSample,
}

impl Pair {
    fn now(&self) -> Result<(ProcSample, ProcSample)> {
        let c = soak::sample(self.client.pid()).context("client ztunnel exited")?;
        let s = soak::sample(self.server.pid()).context("server ztunnel exited")?;
        Ok((c, s))
    }

    /// Where each ztunnel's resident memory is (its largest mappings), for the log.
    fn print_mappings(&self, when: &str) {
        for (who, zt) in [("client", &self.client), ("server", &self.server)] {
            let Ok(maps) = soak::largest_mappings(zt.pid(), 4) else {
                continue;
            };
            let maps: Vec<String> = maps
                .iter()
                .map(|m| format!("{} ({}) {}", m.name, mib(m.size_kib), mib(m.rss_kib)))
                .collect();
            eprintln!(
                "  {when}: {who} ztunnel's largest resident mappings: {}",
                maps.join(", ")
            );
        }
    }

    fn pooled(&self) -> usize {
        soak::established_to_port(self.client.pid(), 15008).unwrap_or(usize::MAX)
    }

    fn settle(&self, limit: Duration) -> Result<Settled> {
        let t0 = Instant::now();
        let (mut c_rss, mut s_rss, mut pool) = (None, None, None);
        loop {
            let (c, s) = self.now()?;
            let el = t0.elapsed();
            if c_rss.is_none() && near(self.base_client.rss_kib, c.rss_kib) {
                c_rss = Some(el);
            }
            if s_rss.is_none() && near(self.base_server.rss_kib, s.rss_kib) {
                s_rss = Some(el);
            }
            if pool.is_none() && self.pooled() == 0 {
                pool = Some(el);
            }
            if (c_rss.is_some() && s_rss.is_some() && pool.is_some()) || el >= limit {
                return Ok(Settled {
                    client_rss: c_rss,
                    server_rss: s_rss,
                    pool_closed: pool,
                    client_after: c,
                    server_after: s,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.echo_server {
        return echo_server();
    }
    let n = args.connections;
    soak::raise_fd_limit(n as u64 + 1024)?;
    let sb = Sandbox::new().context("cannot build the lab sandbox (root needed)")?;
    let topo = Topology::build(&sb, &["server", "cmesh", "cdirect"])?;
    let (server_ip, mesh_ip) = (topo.host_ip("server"), topo.host_ip("cmesh"));
    let ca = mesh::write_ca(sb.dir(), "soak-root")?;
    let server_w = WorkloadSpec::new("server", server_ip).service_account("server");
    let client_w = WorkloadSpec::new("client", mesh_ip).service_account("client");
    let xds = sb.dir().join("mesh.yaml");
    LocalConfig::default()
        .workload(server_w.clone())
        .workload(client_w.clone())
        .write(&xds)?;
    redirect_outbound(&sb, "cmesh")?;
    for host in ["server", "cmesh", "cdirect"] {
        sb.run_in(host, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    }
    let exe = std::env::current_exe()?;
    let echo_proc = sb.spawn(
        "echo-server",
        sb.command(Some("server"), &exe, ["--echo-server"]),
    )?;
    let echo = SocketAddr::new(server_ip.into(), ECHO_PORT);
    echo_proc.wait_until("the echo server", Duration::from_secs(10), || {
        Ok(sb
            .in_netns("server", || std::net::TcpStream::connect(echo).is_ok())
            .unwrap_or(false))
    })?;
    let spawn = |host: &str, w: &WorkloadSpec| {
        let mut env = mesh::dedicated_env(w, &xds, &ca);
        if let Some(l) = &args.log {
            env.push(("RUST_LOG".into(), l.clone()));
        }
        if let Some(k) = args.workers {
            env.push(("ZTUNNEL_WORKER_THREADS".into(), k.to_string()));
        }
        if let Some(c) = &args.ztunnel_config {
            env.push(("ZTUNNEL_CONFIG".into(), c.display().to_string()));
        }
        Ztunnel::spawn(&sb, host, &env, &bin_path("ztunnel"))
    };
    let server = spawn("server", &server_w)?;
    let client = spawn("cmesh", &client_w)?;
    let settle = Duration::from_secs(args.settle_seconds);

    // Warm-up: certificates, the first pooled connection, lazily built state. The baseline is
    // the idle process after that.
    drop(soak::open_idle(&sb, "cmesh", echo, 20, 1)?);
    std::thread::sleep(Duration::from_secs(2));
    let (base_client, base_server) = (
        soak::sample(client.pid()).context("client ztunnel exited")?,
        soak::sample(server.pid()).context("server ztunnel exited")?,
    );
    let pair = Pair {
        client,
        server,
        base_client,
        base_server,
    };
    eprintln!(
        "baseline: client {} ({} fds), server {} ({} fds)",
        mib(base_client.rss_kib),
        base_client.fds,
        mib(base_server.rss_kib),
        base_server.fds
    );

    // 1. Idle connections, direct then through the mesh.
    eprintln!("{n} idle connections, direct...");
    let (conns, t_direct) = soak::open_idle(&sb, "cdirect", echo, n, args.open_threads)?;
    std::thread::sleep(Duration::from_secs(2));
    drop(conns);
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("{n} idle connections through two ztunnels...");
    let (conns, t_mesh) = soak::open_idle(&sb, "cmesh", echo, n, args.open_threads)?;
    std::thread::sleep(Duration::from_secs(3));
    let (held_c, held_s) = pair.now()?;
    let pooled_held = pair.pooled();
    eprintln!(
        "  held: client {} ({} fds), server {} ({} fds), {pooled_held} pooled HBONE connections",
        mib(held_c.rss_kib),
        held_c.fds,
        mib(held_s.rss_kib),
        held_s.fds
    );
    drop(conns);
    let idle_settled = pair.settle(settle)?;
    pair.print_mappings("after the idle connections closed");

    // 2. Churn, direct then through the mesh.
    let direct_dur = Duration::from_secs(args.direct_churn_seconds);
    eprintln!("churn, direct, {direct_dur:?}...");
    let direct_churn = soak::churn(
        &sb,
        "cdirect",
        echo,
        args.churn_workers,
        direct_dur,
        Duration::from_secs(10),
        |_| {},
    )?;
    let mesh_dur = Duration::from_secs(args.churn_seconds);
    eprintln!("churn through two ztunnels, {mesh_dur:?}...");
    let mut peak = (ProcSample::default(), ProcSample::default());
    let mut samples: Vec<(Duration, ProcSample, ProcSample)> = Vec::new();
    let mesh_churn = soak::churn(
        &sb,
        "cmesh",
        echo,
        args.churn_workers,
        mesh_dur,
        Duration::from_secs(5),
        |at| {
            if let Ok((c, s)) = pair.now() {
                peak.0.rss_kib = peak.0.rss_kib.max(c.rss_kib);
                peak.0.fds = peak.0.fds.max(c.fds);
                peak.1.rss_kib = peak.1.rss_kib.max(s.rss_kib);
                peak.1.fds = peak.1.fds.max(s.fds);
                samples.push((at, c, s));
                if samples.len().is_multiple_of(12) {
                    eprintln!(
                        "  {:>4.0} s: client {} ({} fds), server {} ({} fds)",
                        at.as_secs_f64(),
                        mib(c.rss_kib),
                        c.fds,
                        mib(s.rss_kib),
                        s.fds
                    );
                }
            }
        },
    )?;
    let churn_settled = pair.settle(settle)?;
    pair.print_mappings("after the churn");

    // 3. Exit after SIGTERM with nothing left to drain.
    let exit_time = |zt: &Ztunnel| -> Result<Option<Duration>> {
        let t0 = Instant::now();
        zt.process().signal(libc::SIGTERM)?;
        Ok(zt
            .process()
            .wait_timeout(Duration::from_secs(15))
            .map(|_| t0.elapsed()))
    };
    let exit_client = exit_time(&pair.client)?;
    let exit_server = exit_time(&pair.server)?;

    let mut out = String::new();
    let per_conn = |held: u64, base: u64| {
        format!(
            "{:.1} KiB",
            held.saturating_sub(base) as f64 / n.max(1) as f64
        )
    };
    out.push_str(&format!(
        "zmesh-soak: {n} idle connections, churn {} s ({} clients) through the mesh and {} s direct, {}\n\n",
        args.churn_seconds,
        args.churn_workers,
        args.direct_churn_seconds,
        zmesh_tests::bench::machine()
    ));
    out.push_str(
        "| idle connections | direct TCP | client ztunnel | server ztunnel |\n|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| time to open {n} (one 64 B exchange each) | {:.2} s | {:.2} s (through both) | |\n",
        t_direct.as_secs_f64(),
        t_mesh.as_secs_f64()
    ));
    out.push_str(&format!(
        "| RSS baseline (idle, after warm-up) | | {} | {} |\n",
        mib(pair.base_client.rss_kib),
        mib(pair.base_server.rss_kib)
    ));
    out.push_str(&format!(
        "| RSS with {n} open | | {} | {} |\n",
        mib(held_c.rss_kib),
        mib(held_s.rss_kib)
    ));
    out.push_str(&format!(
        "| **per connection** (held - baseline) / N | | **{}** | **{}** |\n",
        per_conn(held_c.rss_kib, pair.base_client.rss_kib),
        per_conn(held_s.rss_kib, pair.base_server.rss_kib)
    ));
    out.push_str(&format!(
        "| descriptors: baseline / with {n} open / after | | {} / {} / {} | {} / {} / {} |\n",
        pair.base_client.fds,
        held_c.fds,
        idle_settled.client_after.fds,
        pair.base_server.fds,
        held_s.fds,
        idle_settled.server_after.fds
    ));
    out.push_str(&format!(
        "| pooled HBONE connections with {n} open | | {pooled_held} | |\n"
    ));
    let settled_rows = |out: &mut String, what: &str, s: &Settled| {
        out.push_str(&format!(
            "| {what}: RSS back near baseline | | {} | {} |\n",
            secs(s.client_rss, args.settle_seconds),
            secs(s.server_rss, args.settle_seconds)
        ));
        out.push_str(&format!(
            "| {what}: RSS when measured | | {} | {} |\n",
            mib(s.client_after.rss_kib),
            mib(s.server_after.rss_kib)
        ));
        out.push_str(&format!(
            "| {what}: pooled HBONE connections closed | | {} | |\n",
            secs(s.pool_closed, args.settle_seconds)
        ));
    };
    settled_rows(&mut out, "after closing", &idle_settled);
    out.push_str("\n| churn (connect + 64 B exchange + close) | direct TCP | client ztunnel | server ztunnel |\n|---|---|---|---|\n");
    out.push_str(&format!(
        "| rate | {:.0} /s ({} errors) | {:.0} /s ({} errors, through both) | |\n",
        direct_churn.rate(),
        direct_churn.errors,
        mesh_churn.rate(),
        mesh_churn.errors
    ));
    let first = samples.first().map(|s| (s.1.rss_kib, s.2.rss_kib));
    let last = samples.last().map(|s| (s.1.rss_kib, s.2.rss_kib));
    if let (Some(f), Some(l)) = (first, last) {
        out.push_str(&format!(
            "| RSS first / last sample of the churn | | {} / {} | {} / {} |\n",
            mib(f.0),
            mib(l.0),
            mib(f.1),
            mib(l.1)
        ));
    }
    out.push_str(&format!(
        "| peak RSS / descriptors during the churn | | {} / {} | {} / {} |\n",
        mib(peak.0.rss_kib),
        peak.0.fds,
        mib(peak.1.rss_kib),
        peak.1.fds
    ));
    settled_rows(&mut out, "after the churn", &churn_settled);
    out.push_str(&format!(
        "| exit after SIGTERM, nothing to drain | | {} | {} |\n",
        secs(exit_client, 15),
        secs(exit_server, 15)
    ));
    out.push_str(&format!(
        "\nNear the baseline = at most a quarter (or 4 MiB) above it. Peak RSS (VmHWM) over the run: client {}, server {}.\n",
        mib(churn_settled.client_after.hwm_kib),
        mib(churn_settled.server_after.hwm_kib)
    ));
    println!("{out}");
    if let Some(p) = args.report {
        std::fs::write(&p, &out).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
