//! Pieces of the soak benchmark (`zmesh-soak`): many idle connections held open at once, a
//! connect/close churn, and what a process costs while they run (resident memory, open
//! descriptors, pooled HBONE connections), read from `/proc` like an operator would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Sandbox;

/// Bytes each connection exchanges with the echo server (`bench::ECHO_PORT`).
const MSG: usize = 64;

/// What a process holds at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident memory (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident memory so far (VmHWM), KiB.
    pub hwm_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads a process's resident memory and open descriptors; `None` once it has exited.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key| crate::bench::status_kib(&status, key);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(ProcSample {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
        fds,
    })
}

/// Established TCP connections in `pid`'s network namespace whose remote port is `port` (for
/// a client ztunnel and 15008: its pooled HBONE connections).
pub fn established_to_port(pid: u32, port: u16) -> Result<usize> {
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        n += count_established(&text, port);
    }
    Ok(n)
}

/// Counts the rows of a `/proc/net/tcp` table in state ESTABLISHED (01) with remote `port`.
fn count_established(table: &str, port: u16) -> usize {
    let want = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "01" && f[2].rsplit_once(':').is_some_and(|(_, p)| p == want)
        })
        .count()
}

/// One echo exchange on a connection: proves it reached the server (through the mesh, the
/// tunnel is then fully set up on both ztunnels).
fn exchange(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [5u8; MSG];
    s.write_all(&buf)?;
    s.read_exact(&mut buf)
}

/// Opens `n` connections from `host` to the echo server at `dst`, each after one exchange,
/// from `threads` threads, and returns them open (idle) with the time it took.
pub fn open_idle(
    sb: &Sandbox,
    host: &str,
    dst: SocketAddr,
    n: usize,
    threads: usize,
) -> Result<(Vec<TcpStream>, Duration)> {
    let t0 = Instant::now();
    let threads = threads.clamp(1, n.max(1));
    let mut handles = Vec::new();
    for i in 0..threads {
        let count = n / threads + usize::from(i < n % threads);
        handles.push(sb.spawn_thread_in_netns(
            Some(host),
            &format!("soak-open-{i}"),
            move || -> Result<Vec<TcpStream>> {
                let mut out = Vec::with_capacity(count);
                for j in 0..count {
                    let mut s = TcpStream::connect(dst)
                        .with_context(|| format!("connection {j} of thread {i} to {dst}"))?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    exchange(&mut s).with_context(|| format!("echo on connection {j} to {dst}"))?;
                    out.push(s);
                }
                Ok(out)
            },
        )?);
    }
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("opening thread panicked"))???,
        );
    }
    Ok((all, t0.elapsed()))
}

/// Result of a churn run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Churn {
    /// Completed connect + exchange + close cycles.
    pub cycles: u64,
    /// Failed attempts.
    pub errors: u64,
    pub elapsed: Duration,
}

impl Churn {
    /// Cycles per second.
    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Connect + one exchange + close, in a loop, from `workers` threads in `host`, for `dur`.
/// `every` is called on the calling thread about each `period` while it runs (for sampling).
pub fn churn(
    sb: &Sandbox,
    host: &str,
    dst: SocketAddr,
    workers: usize,
    dur: Duration,
    period: Duration,
    mut every: impl FnMut(Duration),
) -> Result<Churn> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..workers.max(1) {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        handles.push(sb.spawn_thread_in_netns(
            Some(host),
            &format!("soak-churn-{i}"),
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = TcpStream::connect(dst).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        exchange(&mut s)
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            },
        )?);
    }
    let t0 = Instant::now();
    let end = t0 + dur;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(period.min(end - now));
        every(t0.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    }
    Ok(Churn {
        cycles: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
    })
}

/// Polls `done` every 100 ms for up to `timeout`; the time it took to become true.
pub fn time_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if done() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Raises this process's descriptor limit to at least `want` (the benchmark holds the client
/// end of every connection), beyond the hard limit if allowed.
pub fn raise_fd_limit(want: u64) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).with_context(|| {
        format!(
            "cannot raise RLIMIT_NOFILE to {want} (hard limit {hard}): raise the hard limit \
             (ulimit -Hn) or lower --connections"
        )
    })
}

/// Raises the soft descriptor limit to the hard one.
pub fn raise_fd_limit_to_hard() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_rows_by_remote_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 0200000A:D431 0300000A:3AA0 01 00000000:00000000\n\
            1: 0200000A:D432 0300000A:3AA0 06 00000000:00000000\n\
            2: 0200000A:D433 0300000A:138A 01 00000000:00000000\n\
            3: 0200000A:3AA0 0300000A:D433 01 00000000:00000000\n";
        assert_eq!(count_established(table, 15008), 1);
        assert_eq!(count_established(table, 5002), 1);
        assert_eq!(count_established(table, 80), 0);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib && s.fds > 0);
        assert!(sample(u32::MAX).is_none());
    }
}

/// One memory mapping of a process and how much of it is resident (from `/proc/<pid>/smaps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The mapped file, `[heap]`, `[stack]`, or `anon` for an anonymous mapping.
    pub name: String,
    /// The mapping's size, KiB.
    pub size_kib: u64,
    /// Resident, KiB.
    pub rss_kib: u64,
}

/// The `n` mappings of `pid` with the most resident memory: where a process keeps what it did
/// not give back (an allocator's arenas are large anonymous mappings; glibc's main heap,
/// which C libraries such as aws-lc allocate from, is `[heap]`).
pub fn largest_mappings(pid: u32, n: usize) -> Result<Vec<Mapping>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(top_mappings(&text, n))
}

fn top_mappings(smaps: &str, n: usize) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            let name = f.nth(4).unwrap_or("anon").to_owned();
            maps.push(Mapping {
                name,
                size_kib: (hi - lo) / 1024,
                rss_kib: 0,
            });
        } else if first == "Rss:"
            && let (Some(m), Some(v)) = (maps.last_mut(), f.next().and_then(|v| v.parse().ok()))
        {
            m.rss_kib = v;
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.rss_kib));
    maps.truncate(n);
    maps
}

#[cfg(test)]
mod mapping_tests {
    use super::*;

    #[test]
    fn reads_resident_memory_per_mapping() {
        let smaps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  80 kB
7f0000000000-7f0040000000 rw-p 00000000 00:00 0 
Size:            1048576 kB
Rss:                9000 kB
7f1000000000-7f1000001000 r-xp 00000000 fd:01 123                        /usr/bin/ztunnel
Size:                  4 kB
Rss:                   4 kB
";
        let top = top_mappings(smaps, 2);
        assert_eq!(
            top,
            vec![
                Mapping {
                    name: "anon".into(),
                    size_kib: 1 << 20,
                    rss_kib: 9000
                },
                Mapping {
                    name: "[heap]".into(),
                    size_kib: 132,
                    rss_kib: 80
                },
            ]
        );
    }
}
