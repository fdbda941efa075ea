//! A private user + network + mount + pid namespace per test, anchored by one child process,
//! so that everything a test builds (named netns, veths, bridges, nftables rules, the tmpfs
//! `/run`, every process started inside) lives and dies with it.
//!
//! The anchor is `unshare --user --map-root-user --net --mount --pid --fork --kill-child=SIGTERM
//! --propagation private -- sh -c <script>`; the script is pid 1 of the new pid namespace. It
//! mounts a tmpfs on `/run` (so `ip netns add` can create `/run/netns` and iptables its
//! `/run/xtables.lock`), brings `lo` up, prints `ready` and waits on a `cat` of a pipe from
//! the test process. The anchor ends
//! - when the [`Sandbox`] is dropped (EOF on the pipe; SIGKILL if it takes over 2 s),
//! - when the thread that created the sandbox exits (`PR_SET_PDEATHSIG` on `unshare`, which
//!   passes SIGTERM on to the script; note the Linux semantics: it is the *thread*, not the
//!   process, whose death counts),
//! - when the test process exits in any way, even SIGKILL (the pipe reaches EOF).
//!
//! When pid 1 of a pid namespace exits, the kernel SIGKILLs every other process in it, so
//! whatever the lab started, and whatever those forked, cannot outlive the sandbox. On its way
//! out the script also removes the sandbox's temporary directory on the host, so not even the
//! configs and logs outlive a test process that was killed. With the processes gone, the
//! kernel frees the namespaces and with them every interface and rule. Named netns are bind
//! mounts inside the sandbox's *own* `/run`, so the host's `ip netns list` never shows them.
//!
//! Commands run inside through `nsenter --target <anchor> --user --net --mount --pid
//! --preserve-credentials` (plus `ip netns exec <ns>` for a host's netns). Entering a pid
//! namespace makes `nsenter` fork: the [`Process`] handle therefore signals the program (the
//! forked child, found through `/proc/<nsenter>/task/<nsenter>/children`), not `nsenter`.
//! (Joining only the pid namespace *for children* before `exec`, which would avoid the fork,
//! does not work: the kernel then refuses `clone(CLONE_THREAD)`, so no program could start a
//! thread.)
//!
//! Rust code runs inside a netns on a thread that `setns()`es into
//! `/proc/<anchor>/root/run/netns/<name>` (see [`Sandbox::in_netns`]). That needs real root
//! (`CAP_SYS_ADMIN` in the initial user namespace): joining a *network* namespace checks the
//! capability in the caller's own user namespace too, so a rootless test process could build
//! the lab but not join it from a thread. The sandbox refuses to start without root.
//!
//! `ZMESH_LAB_USERNS=0` drops the user namespace (net + mount + pid only); `ZMESH_LAB_KEEP=1`
//! keeps the sandbox's temporary directory (configs, logs) after the test.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use crate::process::{Process, tail};

/// How long a process gets between SIGTERM and SIGKILL when the sandbox tears down.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// The anchor: sets up `/run`, says `ready`, then waits for EOF on stdin (the test process
/// is gone or the sandbox dropped) or SIGTERM (`PR_SET_PDEATHSIG`: the creating thread is
/// gone). Either way it removes the sandbox's host directory (`$ZMESH_LAB_RMDIR`) on the way
/// out, so that not even the temporary files outlive a test process killed by SIGKILL.
const ANCHOR_SCRIPT: &str = r#"set -e
mount -t tmpfs -o mode=0755 zmesh-lab /run
mkdir -p /run/netns
ip link set lo up
set +e
cleanup() {
    [ -n "$waiter" ] && kill "$waiter" 2>/dev/null
    [ -n "$ZMESH_LAB_RMDIR" ] && rm -rf -- "$ZMESH_LAB_RMDIR"
    exit 0
}
trap cleanup TERM HUP INT
# An asynchronous command's stdin is /dev/null unless redirected: hand it ours explicitly.
exec 3<&0
cat <&3 >/dev/null 3<&- &
waiter=$!
exec 3<&-
echo ready
wait "$waiter"
cleanup
"#;

/// A private namespace sandbox for one test. See the module docs for the cleanup guarantees.
///
/// Create it on the test's own thread and drop it there (the usual case): the anchor carries
/// `PR_SET_PDEATHSIG` bound to the creating thread.
pub struct Sandbox {
    /// The `unshare` process.
    anchor: Child,
    /// The script: pid 1 of the sandbox's pid namespace; its host pid.
    init_pid: u32,
    /// The write end of the anchor's stdin; EOF on it ends the anchor.
    anchor_stdin: Option<ChildStdin>,
    userns: bool,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    procs: Mutex<Vec<Process>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("anchor_pid", &self.init_pid)
            .field("userns", &self.userns)
            .field("dir", &self.dir_path)
            .finish_non_exhaustive()
    }
}

/// Makes the child get `sig` when the thread that spawned it exits.
fn set_pdeathsig(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Sandbox {
    /// Starts the anchor and waits until its namespaces are ready. Needs root.
    pub fn new() -> Result<Sandbox> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "the namespace lab needs root (CAP_SYS_ADMIN in the initial user namespace, to \
                 join the lab's network namespaces from test threads); run the tests as root"
            );
        }
        let userns = std::env::var("ZMESH_LAB_USERNS").map_or(true, |v| v != "0");
        let dir = tempfile::Builder::new()
            .prefix("zmesh-lab-")
            .tempdir()
            .context("creating the sandbox's temporary directory")?;
        let dir_path = dir.path().to_path_buf();
        let anchor_log = dir_path.join("anchor.log");
        let keep = std::env::var("ZMESH_LAB_KEEP").is_ok_and(|v| v == "1");

        let mut cmd = Command::new("unshare");
        if userns {
            cmd.args(["--user", "--map-root-user"]);
        }
        cmd.args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGTERM",
        ])
        .args(["--propagation", "private", "--"])
        .args(["sh", "-c", ANCHOR_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&anchor_log).context("creating anchor.log")?);
        if !keep {
            cmd.env("ZMESH_LAB_RMDIR", &dir_path);
        }
        set_pdeathsig(&mut cmd, libc::SIGKILL);
        let mut anchor = cmd
            .spawn()
            .context("spawning `unshare` (util-linux); is util-linux installed?")?;
        let anchor_stdin = anchor.stdin.take();
        let stdout = anchor.stdout.take().expect("anchor stdout is piped");

        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let ready = rx.recv_timeout(Duration::from_secs(10));
        let mut sandbox = Sandbox {
            anchor,
            init_pid: 0,
            anchor_stdin,
            userns,
            dir: Some(dir),
            dir_path,
            procs: Mutex::new(Vec::new()),
        };
        match ready {
            Ok(Ok(line)) if line.trim() == "ready" => {
                let unshare = sandbox.anchor.id();
                let children =
                    std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                        .unwrap_or_default();
                sandbox.init_pid = children
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .context("finding the anchor script under `unshare --fork`")?;
            }
            other => {
                let _ = sandbox.anchor.kill();
                let _ = sandbox.anchor.wait();
                let log = std::fs::read_to_string(&anchor_log).unwrap_or_default();
                bail!("the sandbox anchor did not come up ({other:?}); its stderr:\n{log}");
            }
        }
        if keep && let Some(dir) = sandbox.dir.take() {
            eprintln!("zmesh-lab: keeping {}", dir.keep().display());
        }
        Ok(sandbox)
    }

    /// The anchor's host pid (pid 1 of the sandbox's pid namespace): `nsenter --target <pid>`
    /// enters the sandbox, `/proc/<pid>/root` shows its files.
    pub fn pid(&self) -> u32 {
        self.init_pid
    }

    /// Whether the sandbox has its own user namespace (the default).
    pub fn userns(&self) -> bool {
        self.userns
    }

    /// The sandbox's temporary directory on the host, for configs, certificates and logs.
    /// Removed on drop unless `ZMESH_LAB_KEEP=1`.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The `nsenter` command line that enters the sandbox (for logs and humans).
    pub fn nsenter_args(&self) -> Vec<String> {
        let mut v = vec![
            "nsenter".to_owned(),
            "--target".to_owned(),
            self.pid().to_string(),
        ];
        if self.userns {
            v.push("--user".to_owned());
        }
        v.extend(["--net", "--mount", "--pid"].map(str::to_owned));
        if self.userns {
            // The anchor's userns denies setgroups(2), which nsenter would otherwise call.
            v.push("--preserve-credentials".to_owned());
        }
        v
    }

    /// A command that runs `program args` inside the sandbox: in its root netns, or with
    /// `netns` inside that named netns (`ip netns exec`, which `exec`s). The spawned process is
    /// `nsenter`, whose forked child is the program, in the sandbox's pid namespace; `nsenter`
    /// exits with the program's status, and gets SIGKILL when the spawning thread exits (the
    /// program then lives on until the sandbox ends). Its stdin is null and its working
    /// directory the caller's. Spawn long-running ones through [`Sandbox::spawn`], which finds
    /// the program's pid and stops it on drop.
    pub fn command<I, S>(&self, netns: Option<&str>, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("nsenter");
        cmd.args(&self.nsenter_args()[1..]);
        // Entering the mount namespace resets the working directory to its root; keep ours.
        if let Ok(cwd) = std::env::current_dir() {
            let mut wd = std::ffi::OsString::from("--wd=");
            wd.push(cwd);
            cmd.arg(wd);
        }
        cmd.arg("--");
        if let Some(ns) = netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        cmd.arg(program).args(args).stdin(Stdio::null());
        set_pdeathsig(&mut cmd, libc::SIGKILL);
        cmd
    }

    /// Runs a command in the sandbox's root netns and returns its stdout; fails with its
    /// stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.run_stdin(None, args, None)
    }

    /// Runs a command inside the named netns and returns its stdout.
    pub fn run_in(&self, netns: &str, args: &[&str]) -> Result<String> {
        self.run_stdin(Some(netns), args, None)
    }

    /// Runs a command (in the root netns, or in `netns`), feeding it `input` on stdin.
    pub fn run_stdin(
        &self,
        netns: Option<&str>,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String> {
        let (program, rest) = args.split_first().context("empty command")?;
        let mut cmd = self.command(netns, program, rest);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let shown = || {
            format!(
                "`{}`{}",
                args.join(" "),
                netns.map(|n| format!(" in netns {n}")).unwrap_or_default()
            )
        };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", shown()))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("writing the stdin of {}", shown()))?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                shown(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Spawns a long-running process built with [`Sandbox::command`], its stdout and stderr
    /// appended to `<dir>/<name>.log`. The sandbox stops it on drop (SIGTERM, then SIGKILL
    /// after [`TERM_GRACE`]).
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<Process> {
        let log = self.dir_path.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let proc = Process::new(name, child, log);
        self.procs.lock().expect("procs lock").push(proc.clone());
        Ok(proc)
    }

    /// The netns file for `netns` (or the sandbox's root netns for `None`), as seen from the
    /// host: named netns are bind mounts in the sandbox's mount namespace, reachable through
    /// the anchor's `/proc/<pid>/root`.
    pub fn netns_path(&self, netns: Option<&str>) -> PathBuf {
        match netns {
            Some(ns) => PathBuf::from(format!("/proc/{}/root/run/netns/{ns}", self.pid())),
            None => PathBuf::from(format!("/proc/{}/ns/net", self.pid())),
        }
    }

    /// A handle on one of the sandbox's network namespaces (`None`: its root netns) that
    /// does not borrow the sandbox. It stops working when the sandbox is dropped.
    pub fn netns(&self, netns: Option<&str>) -> Netns {
        Netns {
            name: netns.map(str::to_owned),
            path: self.netns_path(netns),
        }
    }

    /// Runs `f` on a fresh thread inside the named netns and returns its result. Sockets
    /// created there stay in that netns wherever they are used later, so this is how tests
    /// bind servers and connect clients "inside a host" without spawning processes.
    /// A panic in `f` propagates.
    ///
    /// Only the network namespace is joined: a multithreaded process cannot `setns()` into a
    /// user namespace at all (EINVAL), and does not need to, because root in the initial user
    /// namespace holds `CAP_SYS_ADMIN` over the sandbox's (child) user namespace.
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, netns: &str, f: F) -> Result<T> {
        self.netns(Some(netns)).run(f)
    }

    /// Like [`Sandbox::in_netns`], in the sandbox's root netns (where the bridge is).
    pub fn in_root_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        self.netns(None).run(f)
    }

    /// Spawns a long-lived thread inside a netns (`None`: the sandbox's root netns), for code
    /// that keeps opening sockets there (load generators, servers that dial out).
    pub fn spawn_thread_in_netns<T, F>(
        &self,
        netns: Option<&str>,
        name: &str,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.netns(netns).spawn_thread(name, f)
    }

    /// Stops every tracked process that still runs: SIGTERM to all, SIGKILL after the grace.
    fn stop_all(&self) {
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|e| e.into_inner()));
        for p in &procs {
            let _ = p.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline && procs.iter().any(Process::is_running) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &procs {
            let _ = p.kill();
        }
        if std::thread::panicking() {
            for p in &procs {
                eprintln!(
                    "---- {} (pid {}) log tail, {} ----\n{}",
                    p.name(),
                    p.pid(),
                    p.log_path().display(),
                    tail(&p.log(), 40)
                );
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_all();
        // EOF lets the anchor remove the directory and exit; SIGKILL if it dawdles.
        drop(self.anchor_stdin.take());
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline && matches!(self.anchor.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.anchor.kill();
        let _ = self.anchor.wait();
    }
}

/// One of a sandbox's network namespaces, by the path of its netns file as seen from the host
/// (see [`Sandbox::netns_path`]). Joining it needs root.
#[derive(Clone, Debug)]
pub struct Netns {
    name: Option<String>,
    path: PathBuf,
}

impl Netns {
    /// The netns name (`None`: the sandbox's root netns).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The netns file on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path)
            .with_context(|| format!("opening netns file {}", self.path.display()))
    }

    /// Runs `f` on a fresh thread inside this netns; see [`Sandbox::in_netns`].
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            let h = s.spawn(move || -> Result<T> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("setns(CLONE_NEWNET)")?;
                Ok(f())
            });
            match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a named thread inside this netns; see [`Sandbox::spawn_thread_in_netns`].
    pub fn spawn_thread<T, F>(&self, name: &str, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.open()?;
        Ok(std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || -> Result<T> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("setns(CLONE_NEWNET)")?;
                drop(file);
                Ok(f())
            })?)
    }
}
