//! Processes the lab starts inside a [`crate::Sandbox`]: the program under `nsenter --pid`,
//! signalled directly, with its output in a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

/// The program under a freshly spawned `nsenter --pid`: its forked child, once it exists
/// (normally within a millisecond). Falls back to `nsenter`'s own pid.
fn program_pid(nsenter: &mut Child) -> u32 {
    let id = nsenter.id();
    let path = format!("/proc/{id}/task/{id}/children");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && matches!(nsenter.try_wait(), Ok(None)) {
        let children = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return pid;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    id
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A process started by [`crate::Sandbox::spawn`]: the program, and the `nsenter` that waits for
/// it and exits with its status. Clones share the same process.
#[derive(Clone, Debug)]
pub struct Process(Arc<ProcInner>);

#[derive(Debug)]
struct ProcInner {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    log: PathBuf,
}

impl Process {
    /// Wraps a freshly spawned `nsenter` whose output goes to `log`.
    pub(crate) fn new(name: &str, mut nsenter: Child, log: PathBuf) -> Process {
        let pid = program_pid(&mut nsenter);
        Process(Arc::new(ProcInner {
            name: name.to_owned(),
            pid,
            child: Mutex::new(nsenter),
            log,
        }))
    }

    /// The program's process id, on the host (for `/proc/<pid>`; inside the sandbox's pid
    /// namespace it has another).
    pub fn pid(&self) -> u32 {
        self.0.pid
    }

    /// The name given to [`crate::Sandbox::spawn`].
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.0.log
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.0.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.0.child.lock().ok()?.try_wait().ok().flatten()
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends a signal to the program, unless it has exited (`nsenter` reaps it and exits at
    /// once, and we hold `nsenter` unreaped under the lock while we signal).
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let mut child = self
            .0
            .child
            .lock()
            .map_err(|_| anyhow!("process lock poisoned"))?;
        if child.try_wait()?.is_none() {
            // SAFETY: plain syscall on a pid we own and have not reaped.
            if unsafe { libc::kill(self.0.pid as libc::pid_t, sig) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `ready` every 50 ms for up to `timeout`, failing early (with the log's tail) if
    /// the process exits; on timeout the error names `what`, the last answer and the log's tail.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                bail!(
                    "{} exited ({status}) while waiting for {what}; log tail:\n{}",
                    self.name(),
                    tail(&self.log(), 40)
                );
            }
            let last = match ready() {
                Ok(true) => return Ok(()),
                Ok(false) => String::from("not yet"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what} (last: {last}); {} log tail:\n{}",
                    self.name(),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; returns its exit status.
    pub fn terminate(&self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.wait_timeout(grace) {
            Some(st) => Ok(st),
            None => self.kill(),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Result<ExitStatus> {
        let _ = self.signal(libc::SIGKILL);
        if let Some(st) = self.wait_timeout(Duration::from_secs(1)) {
            return Ok(st);
        }
        let mut child = self
            .0
            .child
            .lock()
            .map_err(|_| anyhow!("process lock poisoned"))?;
        child.kill()?;
        Ok(child.wait()?)
    }
}
