//! Driving `zmesh-lab up --world gamma` from a test, as a user does from another shell: the
//! lab process (SIGKILLed on drop; its sandbox, and everything in it, dies with it) and the
//! `zmesh-lab --socket S ...` commands that talk to it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running gamma lab.
pub struct RunningLab {
    lab: PathBuf,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RunningLab {
    /// Starts `lab --socket DIR/lab.sock up --world gamma` with `env`, its output in
    /// `DIR/lab.log`; returns at once (see [`RunningLab::wait_answering`]).
    pub fn spawn(lab: &Path, dir: &Path, env: &[(&str, &Path)]) -> RunningLab {
        let socket = dir.join("lab.sock");
        let log = dir.join("lab.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(lab)
            .envs(env.iter().copied())
            .arg("--socket")
            .arg(&socket)
            .args(["up", "--world", "gamma"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        RunningLab {
            lab: lab.to_owned(),
            child,
            socket,
            log,
        }
    }

    /// [`RunningLab::spawn`], then [`RunningLab::wait_answering`].
    pub fn start(lab: &Path, dir: &Path, deadline: Duration) -> RunningLab {
        let mut running = RunningLab::spawn(lab, dir, &[]);
        running.wait_answering(deadline);
        running
    }

    /// Waits until the lab answers `get pods`; panics with its log if it exits first or
    /// `deadline` passes.
    pub fn wait_answering(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the lab exited ({status}) before answering:\n{}",
                    self.log()
                );
            }
            if self
                .cli(&["get", "pods", "-o", "json"], None)
                .status
                .success()
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "the lab never answered:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The lab process (e.g. to signal it).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The lab's own output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The directory of the lab's files (its processes' logs among them), as it printed it.
    pub fn files(&self) -> PathBuf {
        let log = self.log();
        let dir = log
            .split("files in ")
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap_or_else(|| panic!("the lab did not say where its files are:\n{log}"));
        PathBuf::from(dir.trim())
    }

    /// The logs of the lab's processes whose file name starts with `prefix` (e.g. `waypoint`),
    /// concatenated.
    pub fn process_logs(&self, prefix: &str) -> String {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.files())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".log"))
            })
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// `zmesh-lab --socket S ARGS...` with `stdin`, as from another shell.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(&self.lab)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// [`RunningLab::cli`] that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "zmesh-lab {args:?} failed ({}): {}\nstdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `exec POD -- ARGS...`.
    pub fn exec(&self, pod: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", pod, "--"];
        all.extend_from_slice(args);
        self.cli(&all, None)
    }

    /// [`RunningLab::exec`] that must succeed; returns stdout.
    pub fn exec_ok(&self, pod: &str, args: &[&str]) -> String {
        let mut all = vec!["exec", pod, "--"];
        all.extend_from_slice(args);
        self.ok(&all, None)
    }
}
