//! The HTTP benchmark of the waypoint (`zmesh-bench-waypoint`): the load tools it drives (`wrk`
//! for HTTP/1.1, `h2load` for h2c) and what it reads from them, the nginx configurations of the
//! backend and of the reverse proxy it compares the waypoint with, and the CPU and memory
//! sampling of a proxy's processes over a run.
//!
//! Everything here is plain data in and out, so the parsers are tested on the tools' real
//! output (wrk 4.1, h2load of nghttp2 1.52).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::tools::{Search, Tool};

/// The programs the benchmark runs and the Debian/Ubuntu package of each (`tools.txt` format;
/// not in `scripts/tools.txt`: the lab and CI need none of them).
pub const TOOLS_TXT: &str = "\
wrk     wrk
h2load  nghttp2-client
nginx   nginx-light
curl    curl
";

/// The benchmark's tools.
pub fn tools() -> Vec<Tool> {
    crate::tools::parse(TOOLS_TXT).expect("the benchmark's tool list parses (a unit test)")
}

/// `None` when every tool is there, else what to run to install the missing ones.
pub fn missing_tools(search: &Search) -> Option<String> {
    let report = crate::tools::check(&tools(), search);
    (!report.missing.is_empty()).then(|| {
        let names: Vec<&str> = report.missing.iter().map(|t| t.name.as_str()).collect();
        format!(
            "missing on PATH: {}; install them with: apt-get install {}",
            names.join(", "),
            report.missing_packages().join(" ")
        )
    })
}

/// What one load-tool run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadResult {
    /// Requests completed in the run (the ones `rps` counts).
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Failed requests: socket errors, timeouts, and responses that are not 2xx/3xx.
    pub errors: u64,
}

/// Output a load tool printed that the benchmark cannot read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read {tool}'s output: {what} (is it wrk 4.x / h2load of nghttp2 >= 1.40?)\n{output}"
)]
pub struct ParseError {
    pub tool: &'static str,
    pub what: String,
    /// The output, for the operator to look at.
    pub output: String,
}

fn parse_error(tool: &'static str, what: impl ToString, output: &str) -> ParseError {
    ParseError {
        tool,
        what: what.to_string(),
        output: output.to_owned(),
    }
}

/// A wrk duration: `42.00us`, `2.36ms`, `1.02s`, `1.50m`.
fn wrk_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The numbers after `key` in a line like `Socket errors: connect 0, read 3, write 0, timeout 0`.
fn sum_counts(line: &str) -> u64 {
    line.split([',', ':'])
        .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Reads `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Result<LoadResult, ParseError> {
    let err = |what: &str| parse_error("wrk", what, out);
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut rps = None;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("50%") {
            p50 = wrk_duration(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = wrk_duration(v);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().map_err(|_| err("Non-2xx count"))?;
        } else if line.starts_with("Socket errors:") {
            errors += sum_counts(line.trim_start_matches("Socket errors:"));
        }
    }
    Ok(LoadResult {
        requests: requests.ok_or_else(|| err("no `N requests in` line"))?,
        rps: rps.ok_or_else(|| err("no `Requests/sec:` line"))?,
        p50: p50.ok_or_else(|| err("no 50% line (was --latency given?)"))?,
        p99: p99.ok_or_else(|| err("no 99% line (was --latency given?)"))?,
        errors,
    })
}

/// Reads h2load's summary and its `--log-file` (one request a line: start time in µs, status,
/// duration in µs); the percentiles come from the log, of the requests that got a 2xx/3xx.
pub fn parse_h2load(out: &str, log: &str) -> Result<LoadResult, ParseError> {
    let err = |what: &str| parse_error("h2load", what, out);
    let mut rps = None;
    let mut requests = None;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            rps = rest
                .split(',')
                .nth(1)
                .and_then(|f| f.trim().strip_suffix(" req/s"))
                .and_then(|n| n.parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests:") {
            for field in rest.split(',') {
                let mut words = field.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().map_err(|_| err("the requests: line"))?;
                match what {
                    "succeeded" => requests = Some(n),
                    "failed" | "errored" | "timeout" => errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            for field in rest.split(',') {
                let mut words = field.split_whitespace();
                if let (Some(n), Some("4xx" | "5xx")) = (words.next(), words.next()) {
                    errors += n
                        .parse::<u64>()
                        .map_err(|_| err("the status codes: line"))?;
                }
            }
        }
    }
    let mut durations: Vec<Duration> = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let cols: Vec<&str> = line.split('\t').collect();
        let (Some(status), Some(us)) = (cols.get(1), cols.get(2)) else {
            return Err(err(&format!(
                "log line {} is not `start\\tstatus\\tduration`",
                i + 1
            )));
        };
        let status: u16 = status
            .parse()
            .map_err(|_| err(&format!("log line {}: status {status:?}", i + 1)))?;
        let us: u64 = us
            .trim()
            .parse()
            .map_err(|_| err(&format!("log line {}: duration {us:?}", i + 1)))?;
        if (200..400).contains(&status) {
            durations.push(Duration::from_micros(us));
        }
    }
    if durations.is_empty() {
        return Err(err("the log file has no successful request"));
    }
    let p50 = crate::bench::quantile(&mut durations, 0.50);
    let p99 = crate::bench::quantile(&mut durations, 0.99);
    Ok(LoadResult {
        requests: requests.ok_or_else(|| err("no `requests:` line"))?,
        rps: rps.ok_or_else(|| err("no `finished in` line"))?,
        p50,
        p99,
        errors,
    })
}

/// The temporary directories nginx needs, all under `dir` (Debian's defaults are under
/// `/var/lib/nginx`, which a user without it cannot write).
fn nginx_common(dir: &Path, name: &str, workers: usize) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n\
         pid {d}/{name}.pid;\nerror_log {d}/{name}-error.log warn;\n\
         events {{ worker_connections 8192; }}\n"
    ) + &format!(
        "http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  \
         client_body_temp_path {d}/{name}-tmp; proxy_temp_path {d}/{name}-tmp;\n  \
         fastcgi_temp_path {d}/{name}-tmp; uwsgi_temp_path {d}/{name}-tmp; \
         scgi_temp_path {d}/{name}-tmp;\n"
    )
}

/// The backend: `body` and a newline (`Content-Type: text/plain`) to every request, HTTP/1.1 on
/// `h1_port` and h2c (prior knowledge) on `h2_port` (nginx 1.22 serves one protocol per plain
/// port).
pub fn backend_conf(dir: &Path, workers: usize, h1_port: u16, h2_port: u16, body: &str) -> String {
    assert!(
        !body.contains(['"', '\\', '$', '\n']),
        "the body is written into nginx.conf unquoted"
    );
    nginx_common(dir, "backend", workers)
        + &format!(
            "  default_type text/plain;\n  \
             server {{ listen {h1_port} reuseport; location / {{ return 200 \"{body}\\n\"; }} }}\n  \
             server {{ listen {h2_port} http2 reuseport; location / {{ return 200 \"{body}\\n\"; }} }}\n}}\n"
        )
}

/// The reverse proxy in the waypoint's place: HTTP/1.1 on `h1_port` and h2c on `h2_port`, both
/// passed to `upstream` (ip:port, HTTP/1.1 with a keepalive pool, as nginx proxies HTTP).
pub fn proxy_conf(
    dir: &Path,
    workers: usize,
    h1_port: u16,
    h2_port: u16,
    upstream: &str,
) -> String {
    let location = "location / { proxy_pass http://backend; proxy_http_version 1.1; \
                    proxy_set_header Connection \"\"; }";
    nginx_common(dir, "proxy", workers)
        + &format!(
            "  upstream backend {{ server {upstream}; keepalive 256; \
             keepalive_requests 100000000; keepalive_timeout 300s; }}\n  \
             server {{ listen {h1_port} reuseport; {location} }}\n  \
             server {{ listen {h2_port} http2 reuseport; {location} }}\n}}\n"
        )
}

/// CPU and memory of a set of processes over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// CPU seconds (user + system) used during the run.
    pub cpu: Duration,
    /// The largest sum of VmRSS seen (sampled every 100 ms), in KiB.
    pub rss_max_kib: u64,
    /// The largest sum of RssAnon seen (the same samples; its own largest, which may come
    /// from another sample than `rss_max_kib`'s), in KiB: the heap, stacks and other
    /// private memory, without the file-backed pages (the binary's code, shared libraries),
    /// which the page cache shares between all processes that map the same file.
    pub anon_max_kib: u64,
    /// The sum of VmHWM at the end, in KiB.
    pub hwm_kib: u64,
}

impl Usage {
    /// vCPU per 1000 requests/s: CPU seconds per request, times 1000.
    pub fn vcpu_per_krps(&self, requests: u64) -> f64 {
        if requests == 0 {
            return f64::NAN;
        }
        self.cpu.as_secs_f64() / requests as f64 * 1000.0
    }

    /// The run's largest RSS, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.rss_max_kib as f64 / 1024.0
    }

    /// The run's largest anonymous RSS, in MiB.
    pub fn anon_mib(&self) -> f64 {
        self.anon_max_kib as f64 / 1024.0
    }
}

/// The sums of VmRSS and of RssAnon of `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let kib = |key| crate::bench::status_kib(&s, key);
            Some((kib("VmRSS:")?, kib("RssAnon:")?))
        })
        .fold((0, 0), |(r, a), (pr, pa)| (r + pr, a + pa))
}

/// Samples each group of processes while `run` runs: CPU before and after, VmRSS every
/// 100 ms, VmHWM at the end; one [`Usage`] per group (zeros for an empty group).
pub fn measure<T>(groups: &[Vec<u32>], run: impl FnOnce() -> T) -> (T, Vec<Usage>) {
    let cpu = crate::bench::cpu_of;
    let before: Vec<Duration> = groups.iter().map(|g| cpu(g)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (groups, stop) = (groups.to_vec(), stop.clone());
        std::thread::spawn(move || {
            let mut max = vec![(0, 0); groups.len()];
            loop {
                for (m, g) in max.iter_mut().zip(&groups) {
                    let (rss, anon) = rss_kib(g);
                    *m = (m.0.max(rss), m.1.max(anon));
                }
                if stop.load(Ordering::Relaxed) {
                    return max;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = run();
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap_or_default();
    let usage = groups
        .iter()
        .zip(before)
        .enumerate()
        .map(|(i, (g, before))| Usage {
            cpu: cpu(g).saturating_sub(before),
            rss_max_kib: max.get(i).map_or(0, |m| m.0),
            anon_max_kib: max.get(i).map_or(0, |m| m.1),
            hwm_kib: g
                .iter()
                .filter_map(|p| crate::bench::peak_rss_kib(*p))
                .sum(),
        })
        .collect();
    (out, usage)
}

/// The children of process `pid` (nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_and_its_anonymous_part_of_live_processes_only() {
        let me = std::process::id();
        // Touch 8 MiB of heap so the anonymous part is surely there (other tests of this
        // binary run alongside and allocate too, so only lower bounds are asserted).
        let block = std::hint::black_box(vec![1u8; 8 << 20]);
        let (rss, anon) = rss_kib(&[me]);
        assert!(anon >= 8 << 10, "anonymous {anon} KiB after touching 8 MiB");
        assert!(
            rss > anon,
            "RSS {rss} KiB includes the file-backed code besides {anon}"
        );
        // A process that does not exist adds nothing; the same one twice counts twice.
        assert_eq!(rss_kib(&[u32::MAX]), (0, 0));
        let (_, anon2) = rss_kib(&[me, me, u32::MAX]);
        assert!(anon2 >= 2 * (8 << 10), "{anon2} KiB for this process twice");
        drop(block);
    }

    const WRK: &str = "Running 1s test @ http://127.0.0.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.90ms    2.95ms  31.92ms   94.84%
    Req/Sec    49.51k    25.85k   87.50k    60.00%
  Latency Distribution
     50%   42.00us
     75%  366.00us
     90%    2.36ms
     99%   18.14ms
  49173 requests in 1.01s, 7.17MB read
Requests/sec:  48677.32
Transfer/sec:      7.10MB
";

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Application protocol: h2c

finished in 1.00s, 31276.00 req/s, 2.15MB/s
requests: 31276 total, 31284 started, 31276 done, 31270 succeeded, 6 failed, 0 errored, 0 timeout
status codes: 31270 2xx, 0 3xx, 0 4xx, 6 5xx
traffic: 2.15MB (2251970) total, 1.43MB (1501248) headers (space savings 51.02%), 183.26KB (187656) data
                     min         max         mean         sd        +/- sd
time for request:       26us     11.15ms       232us       645us    97.34%
";

    #[test]
    fn wrk_output_is_read() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 49173);
        assert_eq!(r.rps, 48677.32);
        assert_eq!(r.p50, Duration::from_micros(42));
        assert_eq!(r.p99, Duration::from_micros(18140));
        assert_eq!(r.errors, 0);
        let bad = WRK.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\n  Socket errors: connect 1, read 2, write 0, \
             timeout 4\nRequests/sec",
        );
        assert_eq!(parse_wrk(&bad).unwrap().errors, 19);
        let e = parse_wrk(&WRK.replace("     99%   18.14ms\n", "")).unwrap_err();
        assert!(e.to_string().contains("--latency"), "{e}");
        assert_eq!(wrk_duration("1.50m"), Some(Duration::from_secs(90)));
        assert_eq!(wrk_duration("3furlongs"), None);
    }

    #[test]
    fn h2load_output_and_log_are_read() {
        // 100 requests of 1..=100 µs, one 503 of 10 s that must not count.
        let mut log: String = (1..=100)
            .map(|us| format!("1796472623313152\t200\t{us}\n"))
            .collect();
        log.push_str("1796472623313152\t503\t10000000\n");
        let r = parse_h2load(H2LOAD, &log).unwrap();
        assert_eq!(r.requests, 31270);
        assert_eq!(r.rps, 31276.0);
        assert_eq!(r.p50, Duration::from_micros(51));
        assert_eq!(r.p99, Duration::from_micros(99));
        assert_eq!(r.errors, 12, "6 failed + 6 5xx");
        let e = parse_h2load(H2LOAD, "garbage\n").unwrap_err();
        assert!(e.to_string().contains("log line 1"), "{e}");
        let e = parse_h2load("nothing\n", &log).unwrap_err();
        assert!(e.to_string().contains("requests:"), "{e}");
    }

    #[test]
    fn nginx_configs_name_the_ports_and_the_upstream() {
        let dir = Path::new("/run/zmesh-bench");
        let b = backend_conf(dir, 2, 8080, 8081, "hello");
        assert!(b.contains("listen 8080 reuseport; location / { return 200 \"hello\\n\"; }"));
        assert!(b.contains("listen 8081 http2 reuseport;"));
        assert!(b.contains("pid /run/zmesh-bench/backend.pid;"));
        assert!(b.contains("worker_processes 2;"));
        let p = proxy_conf(dir, 1, 8090, 8091, "10.200.0.3:8080");
        assert!(p.contains("upstream backend { server 10.200.0.3:8080; keepalive 256;"));
        assert!(p.contains("listen 8091 http2 reuseport; location / { proxy_pass http://backend;"));
        assert_eq!(p.matches('{').count(), p.matches('}').count());
        assert_eq!(b.matches('{').count(), b.matches('}').count());
    }

    #[test]
    fn the_tool_list_names_the_debian_packages() {
        let dir = tempfile::tempdir().unwrap();
        let search = Search {
            path: vec![dir.path().to_path_buf()],
            cni_bin: dir.path().to_path_buf(),
        };
        let msg = missing_tools(&search).unwrap();
        assert!(msg.contains("wrk, h2load, nginx, curl"), "{msg}");
        assert!(
            msg.ends_with("apt-get install curl nghttp2-client nginx-light wrk"),
            "{msg}"
        );
        use std::os::unix::fs::PermissionsExt;
        for t in tools() {
            let p = dir.path().join(&t.name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert_eq!(missing_tools(&search), None);
    }

    #[test]
    fn usage_of_this_process() {
        let me = std::process::id();
        let (_, u) = measure(&[vec![me], vec![]], || {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < Duration::from_millis(300) {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            x
        });
        assert_eq!(u[1], Usage::default());
        let u = u[0];
        assert!(u.cpu >= Duration::from_millis(100), "{u:?}");
        assert!(u.rss_max_kib > 0 && u.hwm_kib >= u.rss_max_kib / 2, "{u:?}");
        assert!((u.vcpu_per_krps(1000) - u.cpu.as_secs_f64()).abs() < 1e-9);
    }
}
