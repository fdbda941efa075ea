//! The driver of `zmesh-bench-controller` (the binary is `main` below): generates the
//! cluster, runs the in-process timings, the controller binary with its clients and the ztunnel
//! comparison, and renders the report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::client::{ChangeSeen, Fleet, Identity, Target};
use super::cluster::{Cluster, ClusterSpec, Rng, node_names};
use crate::bin_path;
use crate::ctlbench::{
    self, Credentials, HostController, InProcess, Machine, Mem, quantile, ztunnel_mem,
};
use anyhow::{Context, Result};
use clap::Parser;
use zmesh_controller::reconcile::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use zmesh_controller::translate::MeshConfig;

/// Command line of `zmesh-bench-controller`.
#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the zmesh controller: translation, push to many delta ADS \
                   clients, change latency, memory; and ztunnel memory per workload"
)]
pub struct Args {
    /// Pods in the synthetic cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Services (each selects about pods/services Pods).
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// AuthorizationPolicies.
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Namespaces (even ones enrolled in ambient).
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Nodes Pods are spread over (one credential each).
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Concurrent delta ADS clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Repetitions of the in-process translation (median reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// One-Pod changes timed (and as many policy changes, at most 20).
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// The controller's debounce (its default is 100ms).
    #[arg(long, default_value = "100ms", value_parser = humantime_ms)]
    debounce: Duration,
    /// Seed of the synthetic cluster.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pods of the small cluster the ztunnel memory is compared against.
    #[arg(long, default_value_t = 10)]
    small_pods: usize,
    /// Extra environment for ztunnel in the memory part, `KEY=VALUE` (repeatable), e.g.
    /// `MIMALLOC_PURGE_DELAY=0`.
    #[arg(long = "ztunnel-env", value_parser = crate::bench::parse_env)]
    ztunnel_env: Vec<(String, String)>,
    /// Skip the ztunnel memory part (which needs root).
    #[arg(long)]
    no_ztunnel: bool,
    /// Record the controller with `perf record -g` during the push and during the changes,
    /// into `<dir>/push.data` and `<dir>/changes.data` (figures are then perturbed).
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Keep the generated directories (their path is printed).
    #[arg(long)]
    keep: bool,
    /// Where to write the markdown report (also printed).
    #[arg(long)]
    report: Option<PathBuf>,
}

fn humantime_ms(s: &str) -> Result<Duration, String> {
    let ms = s
        .strip_suffix("ms")
        .ok_or_else(|| format!("{s:?}: give milliseconds, e.g. 100ms"))?;
    ms.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("{s:?}: {e}"))
}

fn cpu(pid: u32) -> Duration {
    crate::bench::cpu_time(pid).unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Latency figures of one kind of change.
struct Changes {
    /// Per change: until every client had it.
    all: Vec<Duration>,
    /// Per change: median over clients.
    median_client: Vec<Duration>,
    max_resources: usize,
    wrong: usize,
    other: usize,
    /// The controller's `translate_ms` log lines of those passes.
    translate_ms: Vec<f64>,
    /// Per change, where the time went (from the controller's log; see [`Split`]).
    split: Vec<Split>,
}

/// One change's latency, split at the controller's log lines: the write → the directory
/// source has updated the store ("config directory changed": inotify, the source's settle
/// and its directory read, `read_ms`) → the reconciler's pass starts (its debounce) → the last
/// client has the change (the pass: translate, diff, cache, and the push).
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Write → store updated (settle + directory read).
    to_store: Duration,
    /// Of which the directory read (stat pass, parse of the changed file, delta).
    read: Duration,
    /// Store updated → the pass starts.
    debounce: Duration,
    /// The pass: translate + diff + cache apply.
    pass: Duration,
    /// Pass start → the last client has the change (the pass and the push).
    after_debounce: Duration,
}

/// A log line's timestamp (the default `tracing` format starts with RFC 3339 time).
fn log_time(line: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(line.split_whitespace().next()?).ok()
}

/// The number after `key=` in a log line.
fn log_field(line: &str, key: &str) -> Option<f64> {
    let v = line.split(&format!("{key}=")).nth(1)?;
    v.split_whitespace().next()?.parse().ok()
}

/// Splits one change's latency using the controller's log lines written since the change.
fn split(lines: &[&str], written: std::time::SystemTime, all: Duration) -> Option<Split> {
    let dir = lines
        .iter()
        .find(|l| l.contains("config directory changed"))?;
    let pushed = lines.iter().find(|l| l.contains("config pushed"))?;
    let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
    let read = ms(log_field(dir, "read_ms")?);
    let store_at = log_time(dir)?;
    let pass = ms(log_field(pushed, "translate_ms")? + log_field(pushed, "apply_ms")?);
    let pass_start = log_time(pushed)?.checked_sub(pass)?;
    let to_store = store_at.duration_since(written).ok()?;
    let debounce = pass_start.duration_since(store_at).ok()?;
    let after_debounce = all.checked_sub(pass_start.duration_since(written).ok()?)?;
    Some(Split {
        to_store,
        read,
        debounce,
        pass,
        after_debounce,
    })
}

impl Changes {
    fn new() -> Changes {
        Changes {
            all: Vec::new(),
            median_client: Vec::new(),
            max_resources: 0,
            wrong: 0,
            other: 0,
            translate_ms: Vec::new(),
            split: Vec::new(),
        }
    }

    fn add(&mut self, seen: ChangeSeen) {
        self.all
            .push(seen.latencies.iter().copied().max().unwrap_or_default());
        self.median_client.push(quantile(&seen.latencies, 0.5));
        self.max_resources = self.max_resources.max(seen.max_resources);
        self.wrong += seen.wrong;
        self.other += seen.other;
    }
}

/// What the run against the controller binary measured.
struct Served {
    startup: Duration,
    /// Time to the first TCP connection accepted (controller listening).
    first_connect: Duration,
    mem_one_client: Option<Mem>,
    push_all: Duration,
    push_median: Duration,
    bytes_per_client: usize,
    bytes_total: usize,
    mem_after_push: Option<Mem>,
    pod: Changes,
    policy: Changes,
    mem_end: Option<Mem>,
    initial_translate_ms: Option<f64>,
    /// CPU time of the controller: from spawn to the first client complete, during the push
    /// to all clients, and per change (Pod and policy changes together).
    cpu_startup: Duration,
    cpu_push: Duration,
    cpu_per_change: Duration,
    /// CPU time of this process (the clients) during the push.
    bench_cpu_push: Duration,
}

async fn serve_and_measure(
    args: &Args,
    cluster: &mut Cluster,
    creds: &Credentials,
    expected_auth: usize,
    work: &std::path::Path,
) -> Result<Served> {
    let [addr, monitoring] = crate::free_loopback_ports()?;
    let ctl_args = ctlbench::controller_args(&cluster.dir, addr, monitoring, creds, args.debounce);
    let mut ctl = HostController::spawn(
        &bin_path("zmesh-controller"),
        &ctl_args,
        addr,
        &work.join("controller.log"),
    )?;
    let target = Target {
        addr,
        root_pem: creds.root_pem.clone(),
        server_name: addr.ip().to_string(),
    };
    let nodes = node_names(args.nodes);
    let identity = |i: usize| -> Result<Identity> {
        let node = nodes[i % nodes.len()].clone();
        Ok(Identity {
            index: i,
            token: creds.token(&node)?,
            node,
        })
    };
    let mut fleet = Fleet::new(cluster.expected_addresses(), expected_auth);
    let long = Duration::from_secs(300);

    // 1. Startup: from spawn to the first client's complete state.
    eprintln!("controller: startup...");
    let first_connect = {
        let t = Instant::now();
        ctlbench::client::connect(&target, 0, t + Duration::from_secs(60)).await?;
        ctl.spawned_at.elapsed()
    };
    fleet.start(target.clone(), identity(0)?, Instant::now() + long);
    fleet
        .wait_complete(long)
        .await
        .inspect_err(|_| eprintln!("{}", crate::process::tail(&ctl.log_text(), 20)))?;
    let startup = fleet.state[&0]
        .complete_at
        .context("client 0 complete")?
        .saturating_duration_since(ctl.spawned_at);
    ctl.check_alive()?;
    let cpu_startup = cpu(ctl.pid());
    let initial_translate_ms = ctl.translate_ms().first().copied();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem_one_client = ctlbench::mem(ctl.pid());
    fleet.stop(0);

    // 2. Push to N clients at once.
    eprintln!("controller: initial push to {} clients...", args.clients);
    let perf_dir = args.perf.as_deref();
    let perf = perf_dir.and_then(|d| ctlbench::Perf::attach(ctl.pid(), &d.join("push.data")));
    let (cpu0, bench0) = (cpu(ctl.pid()), cpu(std::process::id()));
    let t0 = Instant::now();
    for i in 1..=args.clients {
        fleet.start(target.clone(), identity(i)?, t0 + long);
    }
    fleet.wait_complete(long).await?;
    let (cpu_push, bench_cpu_push) = (
        cpu(ctl.pid()).saturating_sub(cpu0),
        cpu(std::process::id()).saturating_sub(bench0),
    );
    let done: Vec<Duration> = fleet
        .state
        .values()
        .filter_map(|s| s.complete_at.map(|at| at.saturating_duration_since(t0)))
        .collect();
    let bytes_total: usize = fleet.state.values().map(|s| s.bytes).sum();
    if let Some(p) = perf {
        p.stop();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mem_after_push = ctlbench::mem(ctl.pid());

    // 3. One Pod changes, then one policy.
    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let perf = perf_dir.and_then(|d| ctlbench::Perf::attach(ctl.pid(), &d.join("changes.data")));
    let cpu_changes = cpu(ctl.pid());
    let mut pod = Changes::new();
    eprintln!("controller: {} one-Pod changes...", args.changes);
    for _ in 0..args.changes {
        let logged = ctl.translate_ms().len();
        let log_lines = ctl.log_text().lines().count();
        let i = rng.below(cluster.pods.len());
        let (since, written) = (Instant::now(), std::time::SystemTime::now());
        let ip = cluster.move_pod(i)?;
        let uid = cluster.pods[i].workload_uid();
        let seen = fleet
            .wait_change(ADDRESS_TYPE, &uid, since, |(_, got)| *got == Some(ip), long)
            .await?;
        let all = seen.latencies.iter().copied().max().unwrap_or_default();
        pod.add(seen);
        pod.translate_ms
            .extend(ctl.translate_ms().into_iter().skip(logged));
        let text = ctl.log_text();
        let new: Vec<&str> = text.lines().skip(log_lines).collect();
        pod.split.extend(split(&new, written, all));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut policy = Changes::new();
    let policy_changes = args.changes.min(cluster.policies.len());
    eprintln!("controller: {policy_changes} one-policy changes...");
    for _ in 0..policy_changes {
        let logged = ctl.translate_ms().len();
        let log_lines = ctl.log_text().lines().count();
        let j = rng.below(cluster.policies.len());
        let (since, written) = (Instant::now(), std::time::SystemTime::now());
        cluster.edit_policy(j)?;
        let name = cluster.policies[j].resource_name();
        let seen = fleet
            .wait_change(AUTHORIZATION_TYPE, &name, since, |_| true, long)
            .await?;
        let all = seen.latencies.iter().copied().max().unwrap_or_default();
        policy.add(seen);
        let text = ctl.log_text();
        let new: Vec<&str> = text.lines().skip(log_lines).collect();
        policy.split.extend(split(&new, written, all));
        policy
            .translate_ms
            .extend(ctl.translate_ms().into_iter().skip(logged));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(p) = perf {
        p.stop();
    }
    let changes_done = (pod.all.len() + policy.all.len()).max(1) as u32;
    let cpu_per_change = cpu(ctl.pid()).saturating_sub(cpu_changes) / changes_done;
    let mem_end = ctlbench::mem(ctl.pid());
    ctl.check_alive()?;
    Ok(Served {
        startup,
        first_connect,
        mem_one_client,
        push_all: done.iter().copied().max().unwrap_or_default(),
        push_median: quantile(&done, 0.5),
        bytes_per_client: bytes_total / fleet.len().max(1),
        bytes_total,
        mem_after_push,
        pod,
        policy,
        mem_end,
        initial_translate_ms,
        cpu_startup,
        cpu_push,
        cpu_per_change,
        bench_cpu_push,
    })
}

/// Parses the command line and runs the benchmark.
pub fn main() -> Result<()> {
    let args = Args::parse();
    zmesh_core::tls::install_default_provider();
    let machine = Machine::now();
    let work = tempfile::Builder::new()
        .prefix("zmesh-bench-controller-")
        .tempdir()?;
    let work_path = if args.keep {
        work.keep()
    } else {
        work.path().to_owned()
    };
    eprintln!("working directory: {}", work_path.display());
    let spec = ClusterSpec {
        pods: args.pods,
        services: args.services,
        policies: args.policies,
        namespaces: args.namespaces,
        nodes: args.nodes,
        seed: args.seed,
    };
    eprintln!(
        "generating {} pods, {} services, {} policies...",
        spec.pods, spec.services, spec.policies
    );
    let t = Instant::now();
    let mut cluster = Cluster::generate(spec, &work_path.join("cluster"))?;
    eprintln!(
        "  {} files, {:.1} MiB of YAML in {:.1} s",
        cluster.files,
        cluster.yaml_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let mesh = MeshConfig::default();

    eprintln!(
        "in process: load, translate x{}, reconciler passes...",
        args.repeat
    );
    let inproc = ctlbench::in_process(&mut cluster, &mesh, args.repeat)?;
    anyhow::ensure!(
        inproc.workloads + inproc.services == cluster.expected_addresses(),
        "translation produced {} workloads and {} services, expected {} addresses",
        inproc.workloads,
        inproc.services,
        cluster.expected_addresses()
    );

    let creds = Credentials::generate(&work_path, &node_names(args.nodes))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(serve_and_measure(
        &args,
        &mut cluster,
        &creds,
        inproc.authorizations,
        &work_path,
    ))?;
    drop(rt);

    let zt = if args.no_ztunnel {
        None
    } else if !nix::unistd::geteuid().is_root() {
        eprintln!("ztunnel memory: skipped (needs root for its private network namespace)");
        None
    } else {
        eprintln!(
            "ztunnel memory: small cluster ({} pods), then the full one...",
            args.small_pods
        );
        let services = (args.small_pods * args.services / args.pods.max(1)).max(1);
        let small_spec = ClusterSpec {
            pods: args.small_pods,
            services,
            policies: (args.small_pods * args.policies / args.pods.max(1)).max(1),
            namespaces: args.namespaces.min(services),
            ..spec
        };
        let small = Cluster::generate(small_spec, &work_path.join("small"))?;
        let r = ztunnel_mem::compare(
            &cluster.dir,
            &small.dir,
            &creds,
            ztunnel_mem::Programs {
                controller: &bin_path("zmesh-controller"),
                ztunnel: &bin_path("ztunnel"),
                ztunnel_env: &args.ztunnel_env,
            },
        )?;
        Some((small_spec, r))
    };

    let report = render(&args, &machine, &cluster, &inproc, &served, zt.as_ref());
    println!("{report}");
    if let Some(p) = &args.report {
        std::fs::write(p, &report).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn render(
    args: &Args,
    machine: &Machine,
    cluster: &Cluster,
    ip: &InProcess,
    s: &Served,
    zt: Option<&(
        ClusterSpec,
        (ztunnel_mem::ZtunnelRun, ztunnel_mem::ZtunnelRun),
    )>,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## zmesh-bench-controller: {} pods, {} services, {} policies, {} clients\n",
        args.pods, args.services, args.policies, args.clients
    );
    let _ = writeln!(
        o,
        "Machine: {} cores ({}), {} MiB RAM, kernel {}; build profile `{}`; load average {} at \
         start, {} at the end. Cluster: {} namespaces (half ambient), {} nodes, seed {}; {} \
         YAML files, {:.1} MiB. Controller debounce {} ms (+ the directory source's 50 ms \
         settle).\n",
        machine.cores,
        machine.cpu,
        machine.mem_total_mib,
        machine.kernel,
        ctlbench::build_profile(),
        machine.load,
        ctlbench::load_average(),
        args.namespaces,
        args.nodes,
        args.seed,
        cluster.files,
        cluster.yaml_bytes as f64 / 1048576.0,
        args.debounce.as_millis(),
    );
    let _ = writeln!(o, "| measurement | value |\n|---|---|");
    let mut row = |k: String, v: String| {
        let _ = writeln!(o, "| {k} | {v} |");
    };
    row(
        "resources".into(),
        format!(
            "{} workloads + {} services ({:.1} MiB encoded), {} authorizations ({:.2} MiB)",
            ip.workloads,
            ip.services,
            ip.address_bytes as f64 / 1048576.0,
            ip.authorizations,
            ip.authorization_bytes as f64 / 1048576.0
        ),
    );
    row(
        "memory in process: objects loaded (file source's copy + returned set) / first pass".into(),
        format!(
            "+{:.0} MiB / +{:.0} MiB (RSS growth of this process)",
            ip.rss_load_kib as f64 / 1024.0,
            ip.rss_pass_kib as f64 / 1024.0
        ),
    );
    row(
        "load + parse the directory (in process)".into(),
        format!("{:.0} ms", ms(ip.load)),
    );
    row(
        format!(
            "`translate()` (in process, median of {})",
            ip.translate.len()
        ),
        format!(
            "{:.1} ms (runs: {})",
            ms(quantile(&ip.translate, 0.5)),
            ip.translate
                .iter()
                .map(|d| format!("{:.1}", ms(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row(
        "reconciler first pass (translate + encode + cache apply)".into(),
        format!(
            "{:.1} ms (translate {:.1} + encode/diff/apply {:.1})",
            ms(ip.first_pass_total),
            ms(ip.first_pass.translate),
            ms(ip.first_pass.apply)
        ),
    );
    row(
        "one Pod changed, in process: directory re-read / store update / pass".into(),
        format!(
            "{:.1} ms / {:.1} ms / {:.1} ms (translate {:.1} + diff/apply {:.1}; {} changed)",
            ms(ip.reload_one_file),
            ms(ip.store_replace),
            ms(ip.one_pod_pass.translate + ip.one_pod_pass.apply),
            ms(ip.one_pod_pass.translate),
            ms(ip.one_pod_pass.apply),
            ip.one_pod_pass.changed
        ),
    );
    row(
        "controller startup: spawn to listening / to first client's complete state".into(),
        format!(
            "{:.0} ms / {:.0} ms (first translate in the binary {})",
            ms(s.first_connect),
            ms(s.startup),
            s.initial_translate_ms
                .map_or("?".into(), |t| format!("{t:.0} ms"))
        ),
    );
    row(
        format!(
            "initial push to {} clients (all complete / median client)",
            args.clients
        ),
        format!("{:.0} ms / {:.0} ms", ms(s.push_all), ms(s.push_median)),
    );
    row(
        "controller CPU: startup / push to all clients / per change".into(),
        format!(
            "{:.2} s / {:.2} s / {:.0} ms (the clients used {:.2} s during the push, on the same cores)",
            s.cpu_startup.as_secs_f64(),
            s.cpu_push.as_secs_f64(),
            ms(s.cpu_per_change),
            s.bench_cpu_push.as_secs_f64()
        ),
    );
    row(
        "bytes received (protobuf, per client / total)".into(),
        format!(
            "{:.2} MiB / {:.0} MiB",
            s.bytes_per_client as f64 / 1048576.0,
            s.bytes_total as f64 / 1048576.0
        ),
    );
    let m = |x: Option<Mem>| {
        x.map_or("?".into(), |m| {
            format!("{:.0} MiB (peak {:.0} MiB)", mib(m.rss_kib), mib(m.hwm_kib))
        })
    };
    row("controller RSS, 1 client".into(), m(s.mem_one_client));
    row(
        format!("controller RSS, {} clients after the push", args.clients),
        m(s.mem_after_push),
    );
    if let (Some(a), Some(b)) = (s.mem_one_client, s.mem_after_push) {
        row(
            "controller RSS per connected client".into(),
            format!(
                "{:.0} KiB",
                (b.rss_kib as f64 - a.rss_kib as f64)
                    / (args.clients.saturating_sub(1).max(1)) as f64
            ),
        );
    }
    row("controller RSS at the end".into(), m(s.mem_end));
    for (what, c) in [("one Pod's IP", &s.pod), ("one policy's rule", &s.policy)] {
        if c.all.is_empty() {
            continue;
        }
        row(
            format!(
                "{what} changed → all {} clients have it ({} changes)",
                args.clients,
                c.all.len()
            ),
            format!(
                "median {:.0} ms, p99 {:.0} ms, max {:.0} ms (median client: {:.0} ms)",
                ms(quantile(&c.all, 0.5)),
                ms(quantile(&c.all, 0.99)),
                ms(quantile(&c.all, 1.0)),
                ms(quantile(&c.median_client, 0.5)),
            ),
        );
        let tr = if c.translate_ms.is_empty() {
            "?".to_owned()
        } else {
            let mut v = c.translate_ms.clone();
            v.sort_by(f64::total_cmp);
            format!("{:.0} ms", v[v.len() / 2])
        };
        row(
            "… of which translate in the controller (median), response size".into(),
            format!(
                "{tr}; {} resource(s) per response at most{}{}",
                c.max_resources,
                if c.wrong > 0 {
                    format!(", {} WRONG content", c.wrong)
                } else {
                    String::new()
                },
                if c.other > 0 {
                    format!(", {} unrelated responses", c.other)
                } else {
                    String::new()
                },
            ),
        );
        if !c.split.is_empty() {
            let med = |f: fn(&Split) -> Duration| {
                ms(quantile(&c.split.iter().map(f).collect::<Vec<_>>(), 0.5))
            };
            let p99 = |f: fn(&Split) -> Duration| {
                ms(quantile(&c.split.iter().map(f).collect::<Vec<_>>(), 0.99))
            };
            row(
                format!(
                    "… split (median of {}): write → store updated (inotify + settle + directory \
                     read) / of which directory read / debounce / pass",
                    c.split.len()
                ),
                format!(
                    "{:.0} ms / {:.1} ms / {:.0} ms / {:.1} ms",
                    med(|s| s.to_store),
                    med(|s| s.read),
                    med(|s| s.debounce),
                    med(|s| s.pass)
                ),
            );
            row(
                format!(
                    "**… after the debounce: pass start → all {} clients have it**",
                    args.clients
                ),
                format!(
                    "**median {:.1} ms**, p99 {:.1} ms",
                    med(|s| s.after_debounce),
                    p99(|s| s.after_debounce)
                ),
            );
        }
    }
    if let Some((small_spec, (small, full))) = zt {
        let per = (full.mem.rss_kib as f64 - small.mem.rss_kib as f64)
            / (args.pods as f64 - small_spec.pods as f64);
        row(
            format!("ztunnel RSS, {} pods / {} pods", small_spec.pods, args.pods),
            format!(
                "{:.1} MiB / {:.1} MiB (holds {} / {} workloads, {} / {} services; ready after {:.0} / {:.0} ms)",
                mib(small.mem.rss_kib),
                mib(full.mem.rss_kib),
                small.workloads,
                full.workloads,
                small.services,
                full.services,
                ms(small.ready_after),
                ms(full.ready_after)
            ),
        );
        row(
            "**ztunnel memory per known workload**".into(),
            format!("**{per:.2} KiB** (upstream ztunnel: about 17 KB per pod at 30k pods)"),
        );
        if !args.ztunnel_env.is_empty() {
            row(
                "ztunnel's extra environment".into(),
                args.ztunnel_env
                    .iter()
                    .map(|(k, v)| format!("`{k}={v}`"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    o
}
