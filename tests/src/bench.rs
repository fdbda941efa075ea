//! Load generators for the HBONE benchmark (`zmesh-bench`): bulk throughput, 64-byte
//! request/response latency, and connect+request+close rate. Everything runs as threads of
//! the benchmark process whose sockets live in lab namespaces, so client, server and the
//! measurement share one clock and one machine.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Sandbox;

pub mod ceiling;

/// Port of the sink (reads and discards) and of the 64-byte echo server.
pub const SINK_PORT: u16 = 5001;
pub const ECHO_PORT: u16 = 5002;
const MSG: usize = 64;

/// The servers, running inside a host netns until the process ends.
pub struct Servers {
    /// Bytes the sink has received, in total.
    pub sunk: Arc<AtomicU64>,
}

/// Starts the sink and the echo server inside `host`, on a two-thread Tokio runtime of their
/// own (a thread per connection costs more than the mesh does, and would be what we measure).
pub fn start_servers(sb: &Sandbox, host: &str) -> Result<Servers> {
    let sunk = Arc::new(AtomicU64::new(0));
    let (sink, echo) = sb.in_netns(host, || -> Result<(TcpListener, TcpListener)> {
        let sink = TcpListener::bind(("0.0.0.0", SINK_PORT))?;
        let echo = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
        sink.set_nonblocking(true)?;
        echo.set_nonblocking(true)?;
        Ok((sink, echo))
    })??;
    let counter = sunk.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-server")
        .enable_io()
        .build()?;
    std::thread::Builder::new()
        .name("bench-servers".into())
        .spawn(move || {
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let sink = tokio::net::TcpListener::from_std(sink).expect("sink listener");
                let echo = tokio::net::TcpListener::from_std(echo).expect("echo listener");
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = sink.accept().await {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 256 << 10];
                            while let Ok(n) = s.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                counter.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        });
                    }
                });
                while let Ok((mut s, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let mut buf = [0u8; MSG];
                        while s.read_exact(&mut buf).await.is_ok() {
                            if s.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            })
        })?;
    Ok(Servers { sunk })
}

/// What a throughput run measured.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub bytes_per_sec: f64,
    /// Busy CPU time of the whole machine (all processes, kernel included) per byte moved.
    pub cpu_ns_per_byte: f64,
    /// CPU time of the metered processes (the proxies) per byte moved: unlike the machine's,
    /// not moved by other load on the machine.
    pub metered_ns_per_byte: f64,
}

/// CPU time (user + system) the processes `pids` have used so far, together.
pub fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p)).sum()
}

/// Bytes per second into the sink over `dur`, from `streams` parallel connections opened in
/// `client`'s netns, and the machine's CPU time per byte. The first second is warm-up and not
/// counted.
pub fn throughput(
    sb: &Sandbox,
    client: &str,
    dst: SocketAddr,
    streams: usize,
    dur: Duration,
    servers: &Servers,
    meter: &[u32],
) -> Result<Throughput> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..streams {
        let stop = stop.clone();
        handles.push(sb.spawn_thread_in_netns(
            Some(client),
            &format!("tput-{i}"),
            move || -> Result<()> {
                let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
                let buf = vec![0x5au8; 256 << 10];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                }
                Ok(())
            },
        )?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let (b0, t0, c0, m0) = (
        servers.sunk.load(Ordering::Relaxed),
        Instant::now(),
        ceiling::cpu_busy()?,
        cpu_of(meter),
    );
    std::thread::sleep(dur);
    let (b1, t1, c1, m1) = (
        servers.sunk.load(Ordering::Relaxed),
        Instant::now(),
        ceiling::cpu_busy()?,
        cpu_of(meter),
    );
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("throughput thread panicked"))???;
    }
    let bytes = (b1 - b0).max(1) as f64;
    Ok(Throughput {
        bytes_per_sec: bytes / (t1 - t0).as_secs_f64(),
        cpu_ns_per_byte: (c1 - c0).as_nanos() as f64 / bytes,
        metered_ns_per_byte: (m1 - m0).as_nanos() as f64 / bytes,
    })
}

/// Round-trip times of 64-byte request/response on one connection, for `dur`, and the CPU
/// time the metered processes used per round trip.
pub fn latency(
    sb: &Sandbox,
    client: &str,
    dst: SocketAddr,
    dur: Duration,
    meter: &[u32],
) -> Result<(Vec<Duration>, Duration)> {
    sb.in_netns(client, || -> Result<(Vec<Duration>, Duration)> {
        let mut s = TcpStream::connect(dst)?;
        s.set_nodelay(true)?;
        let mut buf = [7u8; MSG];
        // Warm-up: connection setup and first-use costs are not latency.
        for _ in 0..200 {
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
        }
        let mut rtts = Vec::with_capacity(200_000);
        let m0 = cpu_of(meter);
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let t = Instant::now();
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            rtts.push(t.elapsed());
        }
        let per = (cpu_of(meter) - m0) / rtts.len().max(1) as u32;
        Ok((rtts, per))
    })?
}

/// Completed connect + 64-byte request/response + close cycles per second, from `workers`
/// concurrent clients, over `dur` (after one second of warm-up), and the CPU time the metered
/// processes used per cycle.
pub fn connection_rate(
    sb: &Sandbox,
    client: &str,
    dst: SocketAddr,
    workers: usize,
    dur: Duration,
    meter: &[u32],
) -> Result<(f64, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..workers {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        handles.push(
            sb.spawn_thread_in_netns(Some(client), &format!("crr-{i}"), move || {
                let mut buf = [3u8; MSG];
                while !stop.load(Ordering::Relaxed) {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(dst)?;
                        s.set_nodelay(true)?;
                        s.write_all(&buf)?;
                        s.read_exact(&mut buf)?;
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let (n0, t0, m0) = (done.load(Ordering::Relaxed), Instant::now(), cpu_of(meter));
    std::thread::sleep(dur);
    let (n1, t1, m1) = (done.load(Ordering::Relaxed), Instant::now(), cpu_of(meter));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("connection thread panicked"))??;
    }
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        eprintln!("  note: {errs} connection attempts failed during the run");
    }
    let per = (m1 - m0) / (n1 - n0).max(1) as u32;
    Ok(((n1 - n0) as f64 / (t1 - t0).as_secs_f64(), per))
}

/// The `q`-quantile (0..=1) of a set of durations.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx]
}

/// The median of a few repeated measurements.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    status_kib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

/// A `kB` field of a `/proc/PID/status` or `/proc/meminfo` text (`key` with its colon, e.g.
/// `"VmRSS:"`), in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The machine, for a report's header: its cores and how its idle CPUs wait (`cpu_idle`).
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores; {}", cpu_idle())
}

/// How this machine's idle CPUs wait: the cpuidle driver and, under the `haltpoll` driver of a
/// KVM guest, how long an idle vCPU polls before it halts. With no polling, waking an idle
/// vCPU is a VM exit and a host wake-up, and any measurement made one request at a time
/// (latency, serial requests) measures mostly those wake-ups: the same build's round trip
/// differed about fivefold with polling on and off (docs/bench-2026-12-06.md).
fn cpu_idle() -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    cpu_idle_text(
        read("/sys/devices/system/cpu/cpuidle/current_driver").as_deref(),
        read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
    )
}

fn cpu_idle_text(driver: Option<&str>, halt_poll_ns: Option<&str>) -> String {
    let driver = driver.unwrap_or("unknown");
    match halt_poll_ns {
        Some("0") => format!("CPU idle: {driver}, guest halt-polling off"),
        Some(ns) => format!("CPU idle: {driver}, guest halt-polling {ns} ns"),
        None => format!("CPU idle: {driver}"),
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / clock_ticks()))
}

/// The kernel's clock ticks per second (`/proc` CPU times are counted in them).
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64
}

/// The name of the selector policy [`policy_mix`] makes for the destination workload (list it
/// with `WorkloadSpec::selected_by`).
pub const MIX_SELECTOR_POLICY: &str = "default/allow-clients";

/// `n` (at least 3) L4 policies as a mesh of many namespaces would have them, for benchmarks:
/// three apply to a destination in namespace `default` and allow a client of `default` (a
/// namespace DENY of another principal, a selector ALLOW from `default` on `ports`, a global
/// DENY of a documentation IP block); the other `n - 3` live in 1000 other namespaces (ALLOW
/// and DENY, namespace and selector scope, several matches each) and apply to nothing here.
pub fn policy_mix(n: usize, ports: &[u16]) -> Vec<crate::mesh::PolicySpec> {
    use crate::mesh::{Action, MatchSpec, PolicySpec, Scope};
    let mut out = vec![
        PolicySpec::new("deny-evil", "default", Action::Deny)
            .when(MatchSpec::default().principal("cluster.local/ns/evil/sa/evil")),
        PolicySpec::new("allow-clients", "default", Action::Allow)
            .scope(Scope::WorkloadSelector)
            .rule(vec![
                vec![MatchSpec::default().namespace("default")],
                ports
                    .iter()
                    .map(|p| MatchSpec::default().port(*p))
                    .collect(),
            ]),
        PolicySpec::new("deny-doc-net", "istio-system", Action::Deny)
            .scope(Scope::Global)
            .when(MatchSpec::default().source_ip("203.0.113.0/24")),
    ];
    for i in 0..n.saturating_sub(3) {
        let ns = format!("ns-{}", i % 1000);
        let action = if i % 3 == 0 {
            Action::Deny
        } else {
            Action::Allow
        };
        let scope = if i % 2 == 0 {
            Scope::Namespace
        } else {
            Scope::WorkloadSelector
        };
        out.push(
            PolicySpec::new(&format!("p-{i}"), &ns, action)
                .scope(scope)
                .rule(vec![
                    vec![
                        MatchSpec::default().principal(&format!("cluster.local/ns/{ns}/sa/a{i}")),
                        MatchSpec::default().namespace(&format!("ns-{}", (i + 1) % 1000)),
                    ],
                    vec![MatchSpec::default().port(8000 + (i % 100) as u16)],
                ])
                .when(MatchSpec::default().source_ip(&format!(
                    "10.{}.{}.0/24",
                    i % 250,
                    i / 250 % 250
                ))),
        );
    }
    out
}

/// A `KEY=VALUE` command-line argument (the benchmarks' `--ztunnel-env` / `--waypoint-env`).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_policy_names_halt_polling_when_the_driver_has_it() {
        assert_eq!(
            cpu_idle_text(Some("haltpoll"), Some("0")),
            "CPU idle: haltpoll, guest halt-polling off"
        );
        assert_eq!(
            cpu_idle_text(Some("haltpoll"), Some("200000")),
            "CPU idle: haltpoll, guest halt-polling 200000 ns"
        );
        assert_eq!(
            cpu_idle_text(Some("intel_idle"), None),
            "CPU idle: intel_idle"
        );
        assert_eq!(cpu_idle_text(None, None), "CPU idle: unknown");
    }

    #[test]
    fn quantiles_and_median() {
        let mut xs: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(quantile(&mut xs, 0.5), Duration::from_micros(51));
        assert_eq!(quantile(&mut xs, 0.99), Duration::from_micros(99));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn the_policy_mix_allows_the_client_on_its_ports_only() {
        use zmesh_core::identity::SpiffeId;
        use zmesh_core::policy::{Connection, PolicySet};
        let mut cfg = crate::mesh::LocalConfig::default();
        for p in policy_mix(50, &[SINK_PORT]) {
            cfg = cfg.policy(p);
        }
        let parsed = zmesh_core::state::LocalConfig::parse(&cfg.to_yaml()).unwrap();
        let set = PolicySet::new(parsed.policies);
        assert_eq!(set.len(), 50);
        let client = SpiffeId::new("cluster.local", "default", "client").unwrap();
        let conn = |port, src: &str| Connection {
            src_ip: src.parse().unwrap(),
            src_identity: Some(&client),
            dst_ip: "10.0.0.1".parse().unwrap(),
            dst_port: port,
        };
        let selected = [MIX_SELECTOR_POLICY.to_owned()];
        assert!(
            set.check("default", &selected, &conn(SINK_PORT, "10.0.0.2"))
                .allowed
        );
        assert!(
            !set.check("default", &selected, &conn(9, "10.0.0.2"))
                .allowed
        );
        assert!(
            !set.check("default", &selected, &conn(SINK_PORT, "203.0.113.9"))
                .allowed
        );
    }
}
