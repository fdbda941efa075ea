//! The running lab's control socket, and the client side of `zmesh-lab
//! apply|delete|get|exec|waypoint`.
//!
//! The lab listens on a Unix socket (`--socket`, default [`DEFAULT_SOCKET`], mode 0600: only
//! root drives it). A client connects, writes one JSON request and half-closes; the lab
//! answers one JSON object and closes: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
//! Requests: `{"op": "apply"|"delete", "yaml": TEXT}`, `{"op": "get", "what":
//! "pods"|"services"}`, `{"op": "exec", "pod": "NS/NAME"}`, `{"op": "waypoint", "action":
//! "stop"|"start"}`. The lab serves them one at a time
//! on its main thread (the thread that owns the sandbox), between checks for SIGINT/SIGTERM.
//!
//! `exec` does not stream through the lab: the lab answers where the pod is (the sandbox's
//! anchor pid, whether it has a user namespace, the pod's netns, the hosts file), and the
//! client `exec`s `nsenter` into the sandbox's user, mount, net and pid namespaces, running
//! `zmesh-lab pod-exec`, which takes a private mount and UTS namespace, mounts the lab's hosts
//! file on `/etc/hosts`, sets the hostname to the pod's name, joins the pod's netns and
//! `exec`s the command: no shell, the client's own stdio, and the command's exit status.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::World;

/// Where `zmesh-lab up --world gamma` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/zmesh-lab/lab.sock";

/// How long the lab waits for a client's request, and a client for the answer (an `apply`
/// that creates pods takes a while on a loaded machine).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the flag [`stop_requested`] reads.
pub fn install_stop_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing the SIGINT/SIGTERM handler")?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The lab's end of the control socket; removes the socket file on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (creating its directory). Fails if another lab answers there; a stale
    /// socket file (no one listening) is replaced.
    pub fn bind(path: &Path) -> Result<ControlServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "a lab is already running at {}: stop it, or give this one another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves requests against `world` until SIGINT/SIGTERM ([`stop_requested`]).
    pub fn serve(&self, world: &mut World<'_, '_>) -> Result<()> {
        while !stop_requested() {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_one(stream, world) {
                        eprintln!("control: {e:#}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).context("accepting on the control socket"),
            }
        }
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(mut stream: UnixStream, world: &mut World<'_, '_>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let answer = match serde_json::from_str::<Value>(&text)
        .context("the request is not JSON")
        .and_then(|req| handle(&req, world))
    {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
    };
    stream.write_all(answer.to_string().as_bytes())?;
    Ok(())
}

fn handle(req: &Value, world: &mut World<'_, '_>) -> Result<Value> {
    let text = |k: &str| {
        req[k]
            .as_str()
            .ok_or_else(|| anyhow!("the request has no string {k:?}"))
    };
    match text("op")? {
        "apply" => Ok(json!({"lines": world.apply(text("yaml")?)?})),
        "delete" => Ok(json!({"lines": world.delete(text("yaml")?)?})),
        "get" => match text("what")? {
            "pods" | "pod" | "po" => Ok(json!({"items": world.pods_json()})),
            "services" | "service" | "svc" => Ok(json!({"items": world.services_json()})),
            other => bail!("cannot get {other:?}: pods or services"),
        },
        "waypoint" => match text("action")? {
            "stop" => Ok(json!({"line": world.stop_waypoint()?})),
            "start" => Ok(json!({"line": world.restart_waypoint()?})),
            other => bail!("cannot {other:?} the waypoint: stop or start"),
        },
        "exec" => {
            let (ns, name) = split_pod(text("pod")?)?;
            let sb = world.cluster().sandbox();
            Ok(json!({
                "anchorPid": sb.pid(),
                "userns": sb.userns(),
                "netns": world.pod_netns(ns, name)?,
                "hosts": world.hosts_file(),
                "hostname": name,
            }))
        }
        other => bail!("unknown op {other:?}"),
    }
}

/// `NS/POD` -> (NS, POD).
pub fn split_pod(target: &str) -> Result<(&str, &str)> {
    target
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| anyhow!("{target:?}: name the pod as NAMESPACE/POD"))
}

/// Sends one request to the lab at `socket` and returns its answer (an error with the lab's
/// message when it refused).
pub fn request(socket: &Path, req: &Value) -> Result<Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "no lab answers at {}: start one with `zmesh-lab up --world gamma` (or pass the \
             same --socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(req.to_string().as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("reading the lab's answer")?;
    let answer: Value = serde_json::from_str(&text).context("the lab's answer is not JSON")?;
    if answer["ok"] != json!(true) {
        bail!("{}", answer["error"].as_str().unwrap_or("the lab refused"));
    }
    Ok(answer)
}

/// The `nsenter` command that runs `cmd` in the pod `target` (`NS/POD`) of the lab at
/// `socket`; see the module docs.
pub fn exec_command(socket: &Path, target: &str, cmd: &[String]) -> Result<Command> {
    split_pod(target)?;
    if cmd.is_empty() {
        bail!("no command: zmesh-lab exec NS/POD -- CMD [ARGS...]");
    }
    let a = request(socket, &json!({"op": "exec", "pod": target}))?;
    let field = |k: &str| {
        a[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the lab's exec answer lacks {k:?}"))
    };
    let pid = a["anchorPid"]
        .as_u64()
        .context("the lab's exec answer lacks anchorPid")?;
    let userns = a["userns"].as_bool().unwrap_or(true);
    let me = std::env::current_exe().context("the path of zmesh-lab")?;
    let mut c = Command::new("nsenter");
    c.args(["--target", &pid.to_string()]);
    if userns {
        c.arg("--user");
    }
    c.args(["--net", "--mount", "--pid"]);
    if userns {
        c.arg("--preserve-credentials");
    }
    if let Ok(cwd) = std::env::current_dir() {
        let mut wd = std::ffi::OsString::from("--wd=");
        wd.push(cwd);
        c.arg(wd);
    }
    c.arg("--")
        .arg(me)
        .arg("pod-exec")
        .args(["--netns", &field("netns")?])
        .args(["--hosts", &field("hosts")?])
        .args(["--hostname", &field("hostname")?])
        .arg("--")
        .args(cmd);
    Ok(c)
}

/// Inside the sandbox: a private mount and UTS namespace, `hosts` on `/etc/hosts`, the pod's
/// name as hostname, the pod's netns; then `exec`s `cmd` (returns only on failure).
pub fn pod_exec(netns: &str, hosts: &Path, hostname: &str, cmd: &[String]) -> anyhow::Error {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, setns, unshare};
    use std::os::unix::process::CommandExt;
    let setup = || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
            .context("unsharing the mount and UTS namespaces")?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        mount(
            Some(hosts),
            "/etc/hosts",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("mounting {} on /etc/hosts", hosts.display()))?;
        // SAFETY: the pointer and length describe `hostname`'s bytes, alive for the call.
        let rc = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the hostname");
        }
        let path = format!("/run/netns/{netns}");
        let f = std::fs::File::open(&path)
            .with_context(|| format!("opening {path}: is the pod still there?"))?;
        setns(f, CloneFlags::CLONE_NEWNET).with_context(|| format!("joining {path}"))?;
        Ok(())
    };
    if let Err(e) = setup() {
        return e;
    }
    let Some((program, args)) = cmd.split_first() else {
        return anyhow!("no command");
    };
    let err = Command::new(program).args(args).exec();
    anyhow!(err).context(format!("running {program:?} in the pod"))
}
