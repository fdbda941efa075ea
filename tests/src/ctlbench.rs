//! The control-plane benchmark (`zmesh-bench-controller`): a synthetic cluster as a YAML
//! directory ([`cluster`]), the translation timed in process, the real `zmesh-controller`
//! binary serving it to many delta ADS clients over TLS (`client`, its `Fleet`; the driver is
//! `run`), and the real `ztunnel` holding it ([`ztunnel_mem`]). Results and method:
//! `docs/bench-controller-2026-11-23.md`.
//!
//! The in-process figures mirror what the controller does on a change: the directory source
//! re-reads the directory (stats every file, parses only changed ones) and hands the store only
//! the changed objects, the reconciler translates everything and hands the cache only what
//! changed, and every stream pushes the changed names.

pub mod client;
pub mod cluster;
pub mod run;
pub mod ztunnel_mem;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use zmesh_controller::ads::Cache;
use zmesh_controller::reconcile::{ADDRESS_TYPE, AUTHORIZATION_TYPE, PassStats, Reconciler};
use zmesh_controller::source::Store;
use zmesh_controller::source::files::FileSource;
use zmesh_controller::translate::{MeshConfig, translate};

use self::cluster::Cluster;
use crate::bench::status_kib;

/// Facts about the machine a run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub mem_total_mib: u64,
    /// `/proc/loadavg` (1, 5, 15 minutes).
    pub load: String,
}

impl Machine {
    pub fn now() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_else(|| "?".into()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            mem_total_mib: status_kib(&read("/proc/meminfo"), "MemTotal:").unwrap_or(0) / 1024,
            load: load_average(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Resident memory of a process, in KiB: current (`VmRSS`) and peak (`VmHWM`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The process's memory from `/proc/<pid>/status`.
pub fn mem(pid: u32) -> Option<Mem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Mem {
        rss_kib: status_kib(&s, "VmRSS:")?,
        hwm_kib: status_kib(&s, "VmHWM:")?,
    })
}

/// The build profile of the running binary (`target/<profile>/zmesh-bench-controller`).
pub fn build_profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_str()?.to_owned()))
        .unwrap_or_else(|| "?".into())
}

/// The `q` quantile (nearest rank) of `xs`: [`crate::bench::quantile`] on a copy.
pub fn quantile(xs: &[Duration], q: f64) -> Duration {
    crate::bench::quantile(&mut xs.to_vec(), q)
}

/// What the in-process measurements found.
#[derive(Debug, Clone)]
pub struct InProcess {
    /// Reading and parsing the whole directory (cold).
    pub load: Duration,
    /// `translate(&objects, &mesh)`, once per repetition.
    pub translate: Vec<Duration>,
    /// The reconciler's first pass into an empty cache (translate + encode + apply).
    pub first_pass: PassStats,
    pub first_pass_total: Duration,
    /// Re-reading the directory after one Pod file changed (`FileSource::sync`, what the
    /// file source does on a change).
    pub reload_one_file: Duration,
    /// `Store::apply` of what changed.
    pub store_replace: Duration,
    /// The reconciler's pass after that change (full translate, diff, apply of one resource).
    pub one_pod_pass: PassStats,
    pub workloads: usize,
    pub services: usize,
    pub authorizations: usize,
    /// Encoded bytes of all Address resources, and of all Authorization resources.
    pub address_bytes: usize,
    pub authorization_bytes: usize,
    /// This process's RSS growth (KiB): loading the directory (the file source's copy and the
    /// objects it returns), then the reconciler's first pass (translated set + cache).
    pub rss_load_kib: i64,
    pub rss_pass_kib: i64,
}

/// Times the translation path in process on `cluster` (moves one Pod to time a change).
pub fn in_process(cluster: &mut Cluster, mesh: &MeshConfig, repeat: usize) -> Result<InProcess> {
    let rss = || mem(std::process::id()).map_or(0, |m| m.rss_kib as i64);
    let rss0 = rss();
    let mut src = FileSource::new(&cluster.dir)?;
    let t = Instant::now();
    let objects = src.load();
    let load = t.elapsed();
    let rss_load_kib = rss() - rss0;
    if let Some((path, e)) = src.errors().iter().next() {
        bail!("generated file {} does not load: {e}", path.display());
    }

    let mut translate_times = Vec::new();
    let mut translated = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = translate(&objects, mesh);
        translate_times.push(t.elapsed());
        translated = Some(out);
    }
    let translated = translated.expect("at least one repetition");
    if !translated.issues.is_empty() {
        eprintln!(
            "note: {} policy issues, e.g. {:?}",
            translated.issues.len(),
            translated.issues[0]
        );
    }

    let store = Store::new();
    store.replace_all(objects);
    let cache = Cache::new();
    let mut reconciler = Reconciler::new(store.clone(), cache.clone(), mesh.clone());
    let t = Instant::now();
    let rss1 = rss();
    let first_pass = reconciler.pass();
    let first_pass_total = t.elapsed();
    let rss_pass_kib = rss() - rss1;
    let bytes = |type_url: &str| -> usize {
        cache
            .names(type_url)
            .iter()
            .filter_map(|n| cache.get(type_url, n))
            .map(|e| e.resource.value.len())
            .sum()
    };

    let i = cluster.pods.len() / 2;
    cluster.move_pod(i)?;
    let t = Instant::now();
    let delta = src.sync();
    let reload_one_file = t.elapsed();
    let t = Instant::now();
    store.apply(delta.upserts, delta.removals);
    let store_replace = t.elapsed();
    let one_pod_pass = reconciler.pass();
    if one_pod_pass.changed != 1 || one_pod_pass.removed != 0 {
        eprintln!(
            "note: one Pod's move changed {} and removed {} resources (expected 1 and 0)",
            one_pod_pass.changed, one_pod_pass.removed
        );
    }
    Ok(InProcess {
        load,
        translate: translate_times,
        first_pass_total,
        first_pass,
        reload_one_file,
        store_replace,
        one_pod_pass,
        workloads: translated.workloads.len(),
        services: translated.services.len(),
        authorizations: translated.authorizations.len(),
        address_bytes: bytes(ADDRESS_TYPE),
        authorization_bytes: bytes(AUTHORIZATION_TYPE),
        rss_load_kib,
        rss_pass_kib,
    })
}

/// Files the controller needs: the mesh CA and the per-node credentials.
#[derive(Debug)]
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub root_pem: String,
    pub tokens: crate::controller::NodeTokens,
}

impl Credentials {
    /// A fresh CA and one token per node, under `dir`.
    pub fn generate(dir: &Path, nodes: &[String]) -> Result<Credentials> {
        let ca = crate::mesh::write_ca(dir, "bench-root")?;
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let tokens = crate::controller::NodeTokens::generate(&dir.join("tokens"), &names)?;
        Ok(Credentials {
            root_pem: ca.ca.cert_pem().to_owned(),
            ca_cert: ca.cert,
            ca_key: ca.key,
            tokens,
        })
    }

    /// The token of `node`.
    pub fn token(&self, node: &str) -> Result<String> {
        let path = self.tokens.of(node)?;
        Ok(std::fs::read_to_string(path)?.trim().to_owned())
    }
}

/// The arguments of `zmesh-controller` for this benchmark.
/// `monitoring` is the address of its plain-HTTP `/ready` port.
pub fn controller_args(
    config_dir: &Path,
    listen: SocketAddr,
    monitoring: SocketAddr,
    creds: &Credentials,
    debounce: Duration,
) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    vec![
        "--config-dir".into(),
        p(config_dir),
        "--listen".into(),
        listen.to_string(),
        "--ca-cert".into(),
        p(&creds.ca_cert),
        "--ca-key".into(),
        p(&creds.ca_key),
        "--serving-name".into(),
        listen.ip().to_string(),
        "--node-tokens".into(),
        p(&creds.tokens.file),
        "--monitoring".into(),
        monitoring.to_string(),
        "--debounce".into(),
        format!("{}ms", debounce.as_millis()),
        // Every simulated ztunnel connects from the same loopback address.
        "--max-connections-per-peer".into(),
        "1000000".into(),
        "--max-connections".into(),
        "1000000".into(),
    ]
}

/// The controller binary, run directly on the host (loopback); killed on drop.
#[derive(Debug)]
pub struct HostController {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub spawned_at: Instant,
}

impl HostController {
    /// Spawns `bin` with `args` (which must listen on `addr`), output to `log`.
    pub fn spawn(bin: &Path, args: &[String], addr: SocketAddr, log: &Path) -> Result<Self> {
        let file = std::fs::File::create(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("ZMESH_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(HostController {
            child,
            addr,
            log: log.to_owned(),
            spawned_at,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the controller exited ({status}); log tail:\n{}",
                crate::process::tail(&self.log_text(), 30)
            );
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `translate_ms` of every "config pushed" line logged so far.
    pub fn translate_ms(&self) -> Vec<f64> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("config pushed"))
            .filter_map(|l| {
                let v = l.split("translate_ms=").nth(1)?;
                v.split_whitespace().next()?.parse().ok()
            })
            .collect()
    }
}

impl Drop for HostController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `perf record` attached to one process for one phase of the benchmark; stopped (SIGINT,
/// so it writes its data) by [`Perf::stop`] or on drop.
#[derive(Debug)]
pub struct Perf {
    child: Option<Child>,
}

impl Perf {
    /// Starts `perf record -F 999 -g -p <pid> -o <out>`; `None` (with a note) when perf cannot
    /// run.
    pub fn attach(pid: u32, out: &Path) -> Option<Perf> {
        let spawned = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "999",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                // perf needs a moment to attach to every thread.
                std::thread::sleep(Duration::from_millis(300));
                Some(Perf { child: Some(child) })
            }
            Err(e) => {
                eprintln!("note: perf record not started: {e}");
                None
            }
        }
    }

    /// Stops recording and waits for the data to be written.
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        self.finish();
    }
}
