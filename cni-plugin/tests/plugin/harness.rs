//! The harness: executes the plugin like a runtime and plays the node agent.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

pub const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const CONTAINER: &str = "4a2b8c0d9e1f4a2b8c0d9e1f4a2b8c0d";
pub const NETNS: &str = "/var/run/netns/cni-7d3e1c2a-0b5f-4e8d-9a61-2f4c8b7e5d10";
pub const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
    K8S_POD_INFRA_CONTAINER_ID=4a2b8c0d9e1f4a2b8c0d9e1f4a2b8c0d;K8S_POD_UID=0e9c3c1a-5b7d-4f2e-8a6b-1d2c3e4f5a6b";
pub const SYSTEM_POD_ARGS: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=u-2";

/// What one execution printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The single JSON value on stdout (fails if there is anything else).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not exactly one JSON value ({e}): {self:?}"))
    }

    /// Asserts success with nothing on stdout (DEL, CHECK, STATUS, GC).
    pub fn assert_empty_success(&self) {
        assert_eq!(self.code, Some(0), "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
    }

    /// Asserts a CNI error result with `code` on stdout and a non-zero exit; returns it.
    pub fn assert_error(&self, code: u64) -> Value {
        assert_ne!(self.code, Some(0), "{self:?}");
        let err = self.json();
        assert_eq!(err["code"], code, "{self:?}");
        for key in ["cniVersion", "msg", "details"] {
            assert!(err[key].is_string(), "{key} in {err}");
        }
        assert_eq!(err.as_object().map(|o| o.len()), Some(4), "{err}");
        err
    }
}

/// Executes the plugin with exactly `env` (+ `PATH`) and `stdin`.
pub fn exec(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zmesh-cni"))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zmesh-cni");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let out = child.wait_with_output().expect("wait");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    };
    assert_eq!(run.stderr, "", "stderr is for catastrophes only: {run:?}");
    run
}

/// A node: a temporary directory holding the agent socket path and the log file.
pub struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/zmesh-cni.log")).unwrap_or_default()
    }

    /// The request configuration as a runtime builds it from our conflist entry.
    pub fn conf(&self, version: &str, prev: Option<Value>) -> Value {
        let mut conf = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "zmesh-cni",
            "agent_socket": self.socket(),
            "log_file": self.dir.path().join("log/zmesh-cni.log"),
            "log_level": "debug",
            "runtimeConfig": {"portMappings": []},
            "someoneElsesKey": {"kept": true},
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev;
        }
        conf
    }

    /// Runs `command` for the pod described by `args` with this node's config.
    pub fn run(&self, command: &str, args: &str, conf: &Value) -> Run {
        exec(&attachment_env(command, args), &conf.to_string())
    }
}

pub fn attachment_env<'a>(command: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", CONTAINER),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

/// What a bridge + host-local primary returns, in the layout of `version`
/// (`mtu`: whether the 1.1.0 interface keys are present).
pub fn bridge_result(version: &str, mtu: bool) -> Value {
    let legacy = version.starts_with("0.");
    let mut r = json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "8e:2f:61:0a:11:01"},
            {"name": "veth3f2a91c4", "mac": "a2:55:0c:7b:3e:9d"},
            {"name": "eth0", "mac": "d6:41:9b:02:7c:aa", "sandbox": NETNS}
        ],
        "ips": [
            {"interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
        "dns": {}
    });
    if legacy {
        r["ips"][0]["version"] = json!("4");
        r["ips"][1]["version"] = json!("6");
    }
    if mtu {
        r["interfaces"][2]["mtu"] = json!(1450);
    }
    r
}

/// A request the fake agent received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// A fake node agent; `respond` maps a request to (status, body). `None` never answers.
pub struct FakeAgent {
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    socket: PathBuf,
}

/// Maps a request to the raw bytes of the answer; `None` never answers.
pub type Responder = dyn Fn(&Received) -> Option<Vec<u8>> + Send + Sync;

impl FakeAgent {
    /// An agent answering `(status, JSON body)` with a well-formed HTTP/1.1 head.
    pub fn start(
        socket: &Path,
        respond: impl Fn(&Received) -> Option<(u16, String)> + Send + Sync + 'static,
    ) -> Self {
        Self::raw(socket, move |req| {
            let (status, body) = respond(req)?;
            Some(
                format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        })
    }

    /// An agent writing exactly the bytes `respond` returns, then closing the connection.
    pub fn raw(
        socket: &Path,
        respond: impl Fn(&Received) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        let listener = UnixListener::bind(socket).expect("bind agent socket");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let respond: Arc<Responder> = Arc::new(respond);
        let (rx, st) = (received.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (rx, respond) = (rx.clone(), respond.clone());
                thread::spawn(move || serve(conn, &rx, &*respond));
            }
        });
        Self {
            received,
            stop,
            socket: socket.to_owned(),
        }
    }

    /// The agent answering ready and enrolling everything.
    pub fn ready(socket: &Path) -> Self {
        Self::start(socket, |req| {
            Some(match req.path.as_str() {
                "/v1/ready" => (200, "{}".to_owned()),
                "/v1/cni/add" => (200, r#"{"enrolled": true}"#.to_owned()),
                _ => (200, "{}".to_owned()),
            })
        })
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket); // wake the accept loop
    }
}

pub fn serve(conn: UnixStream, received: &Mutex<Vec<Received>>, respond: &Responder) {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).expect("header");
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    let req = Received {
        method,
        path,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    received.lock().expect("lock").push(req.clone());
    let Some(answer) = respond(&req) else {
        thread::sleep(Duration::from_secs(60)); // a hung agent
        return;
    };
    let _ = reader.get_mut().write_all(&answer);
}
