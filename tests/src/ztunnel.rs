//! Runs the real `ztunnel` binary inside a host netns (dedicated mode: one ztunnel per host,
//! listening in that host's netns) and talks to its admin, metrics and readiness ports.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::http;
use crate::sandbox::{Netns, Process, Sandbox, TERM_GRACE};

/// Admin port (config dump, log level), on 127.0.0.1.
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics port.
pub const METRICS_PORT: u16 = 15020;
/// Readiness port (`/healthz/ready`).
pub const READY_PORT: u16 = 15021;
/// How long [`Ztunnel::spawn`] waits for readiness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Ztunnel::stop`] waits after SIGTERM (ztunnel drains first).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running ztunnel in one host's netns. Stopped on drop (SIGTERM, SIGKILL after 2 s), and
/// in any case when the sandbox is dropped.
#[derive(Debug)]
pub struct Ztunnel {
    netns: Netns,
    host: String,
    proc: Process,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl Ztunnel {
    /// Starts `ztunnel_bin proxy` in `host`'s netns with a clean environment (`PATH`,
    /// `NO_COLOR=1`, `RUST_LOG=info` and `RUST_BACKTRACE=1` unless the test's environment sets
    /// them, then `env`), output appended to `<sandbox dir>/ztunnel-<host>.log`, and waits until
    /// `/healthz/ready` answers 200. Fails early, with the log's tail, if it exits or is not
    /// ready within 20 s.
    pub fn spawn<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        sandbox: &Sandbox,
        host: &str,
        env: &[(K, V)],
        ztunnel_bin: &Path,
    ) -> Result<Ztunnel> {
        let zt = Self::start(sandbox, host, env, ztunnel_bin)?;
        zt.wait_ready(READY_TIMEOUT)?;
        Ok(zt)
    }

    /// Starts `argv` (a ztunnel under a wrapper, e.g. `setpriv ... -- ztunnel proxy` as
    /// [`crate::manifests::lab::LabValues::argv`] builds it from the install) in `host`'s
    /// netns with exactly `env` (nothing inherited), and waits until it is ready, like
    /// [`Ztunnel::spawn`].
    pub fn spawn_argv(
        sandbox: &Sandbox,
        host: &str,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<Ztunnel> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("an empty command line for ztunnel"))?;
        let mut cmd = sandbox.command(Some(host), program, args);
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let proc = sandbox.spawn(&format!("ztunnel-{host}"), cmd)?;
        let zt = Ztunnel {
            netns: sandbox.netns(Some(host)),
            host: host.to_owned(),
            proc,
        };
        zt.wait_ready(READY_TIMEOUT)?;
        Ok(zt)
    }

    /// [`Ztunnel::spawn`] without waiting for readiness.
    pub fn start<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        sandbox: &Sandbox,
        host: &str,
        env: &[(K, V)],
        ztunnel_bin: &Path,
    ) -> Result<Ztunnel> {
        let mut cmd = sandbox.command(Some(host), ztunnel_bin, ["proxy"]);
        cmd.env_clear();
        for var in ["PATH", "RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        // Plain log files, not terminal colours.
        cmd.env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = sandbox.spawn(&format!("ztunnel-{host}"), cmd)?;
        let zt = Ztunnel {
            netns: sandbox.netns(Some(host)),
            host: host.to_owned(),
            proc,
        };
        Ok(zt)
    }

    /// The HTTP status of `/healthz/ready` (200 ready, 503 not ready).
    pub fn ready_status(&self) -> Result<u16> {
        Ok(http::get(&self.netns, local(READY_PORT), "/healthz/ready")?.status)
    }

    /// Polls `/healthz/ready` until it answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let what = format!("ztunnel in {} to be ready", self.host);
        self.proc.wait_until(&what, timeout, || {
            let r = http::get(&self.netns, local(READY_PORT), "/healthz/ready")?;
            if r.status != 200 {
                bail!("HTTP {}: {}", r.status, r.text().trim());
            }
            Ok(true)
        })
    }

    /// The host whose netns it runs in.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The process (pid, exit status, signals).
    pub fn process(&self) -> &Process {
        &self.proc
    }

    /// Its stdout and stderr so far (appended across restarts on the same host).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    fn get(&self, port: u16, path: &str) -> Result<String> {
        let r = http::get(&self.netns, local(port), path)?;
        if r.status != 200 {
            bail!(
                "GET {path} on ztunnel in {}: HTTP {}: {}",
                self.host,
                r.status,
                r.text()
            );
        }
        Ok(r.text())
    }

    /// The Prometheus text of `127.0.0.1:15020/metrics`.
    pub fn metrics(&self) -> Result<String> {
        self.get(METRICS_PORT, "/metrics")
    }

    /// The JSON of `127.0.0.1:15000/config_dump`.
    pub fn config_dump(&self) -> Result<String> {
        self.get(ADMIN_PORT, "/config_dump")
    }

    /// SIGTERM, then waits for it to drain and exit (SIGKILL after 15 s).
    pub fn stop(&self) -> Result<ExitStatus> {
        self.proc
            .terminate(STOP_TIMEOUT)
            .with_context(|| format!("stopping ztunnel in {}", self.host))
    }

    /// SIGKILL.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.proc.kill()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.proc.terminate(TERM_GRACE);
    }
}

/// Sums the samples of metric `name` (the exact series name, e.g.
/// `istio_tcp_connections_opened_total`) whose labels include every `(key, value)` given.
/// 0 when there is none.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim().rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| series_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `a="x",b="y\"z"` -> pairs (escapes resolved).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim_matches(|c: char| c == ',' || c.is_whitespace())
            .to_owned();
        if key.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let text = "# HELP x\n\
            istio_tcp_connections_opened_total{reporter=\"source\",app=\"a,\\\"b\"} 2\n\
            istio_tcp_connections_opened_total{reporter=\"destination\"} 5\n\
            istio_tcp_connections_opened_total_other 7\n\
            up 1\n";
        let m = |l: &[(&str, &str)]| metric_value(text, "istio_tcp_connections_opened_total", l);
        assert_eq!(m(&[]), 7.0);
        assert_eq!(m(&[("reporter", "source")]), 2.0);
        assert_eq!(m(&[("app", "a,\"b")]), 2.0);
        assert_eq!(m(&[("reporter", "nope")]), 0.0);
        assert_eq!(metric_value(text, "up", &[]), 1.0);
    }
}
