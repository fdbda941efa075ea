//! The plugin's commands (docs/CNI.md "Who decides enrolment").
//!
//! The plugin decides nothing beyond skipping pods in `exclude_namespaces` and
//! invocations that are not for a Kubernetes pod; everything else is asked of the node
//! agent:
//!
//! | command | what it does |
//! |---|---|
//! | ADD | `POST /v1/cni/add`; `200 {"enrolled": bool}` as JSON → echo `prevResult`; `400` → code 7; anything else (unreachable, `503`, a garbled or unexpected answer) → code 11 |
//! | DEL | `POST /v1/cni/del`, best-effort: always succeeds (netns and agent may be gone) |
//! | CHECK | `GET /v1/ready` must be `200` (code 11 otherwise), except for skipped pods |
//! | STATUS | `GET /v1/ready`: `200` → success, otherwise code 50 |
//! | GC | nothing to collect: the plugin keeps no state |
//! | VERSION | the requested version (when supported) and [`SUPPORTED_VERSIONS`](crate::spec::SUPPORTED_VERSIONS) |
//!
//! [`run`] is the whole binary minus the process plumbing: it takes the environment and
//! stdin, and returns what to print on stdout and the exit code.

mod log;

use std::ffi::OsString;
use std::io::Read;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value};

pub use self::log::{Logger, Record, timestamp};
use crate::api::{
    ADD_PATH, ADD_TIMEOUT, AddRequest, AddResponse, AgentClient, ClientError, DEFAULT_TIMEOUT,
    DEL_PATH, DelRequest, HttpResponse, READY_PATH,
};
use crate::spec::{
    CniEnv, CniError, CniVersion, Command, ErrorResult, NetConf, PodRef, PrevResult, VersionInfo,
};

/// What the process prints on stdout and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The result JSON, the error JSON, or nothing.
    pub stdout: Vec<u8>,
    /// 0 on success, 1 with an error result.
    pub exit_code: u8,
}

impl Output {
    fn json(value: &impl Serialize, exit_code: u8) -> Self {
        // Serialising a `Value` or our plain structs cannot fail.
        let mut stdout = serde_json::to_vec(value).unwrap_or_default();
        stdout.push(b'\n');
        Self { stdout, exit_code }
    }

    /// The error result for `error`, labelled with `cni_version`.
    pub fn error(cni_version: &str, error: &CniError) -> Self {
        Self::json(&ErrorResult::new(cni_version, error), 1)
    }
}

/// Runs one invocation: `lookup` reads the environment, `stdin` is the request.
/// Logs one line: at info, error for failures, warn for ignored problems; successful
/// STATUS polls only at debug; VERSION not at all (its stdin names no log file).
pub fn run(lookup: impl Fn(&str) -> Option<OsString>, stdin: &mut impl Read) -> Output {
    let started = Instant::now();
    let mut raw = Vec::new();
    let parsed = stdin
        .read_to_end(&mut raw)
        .map_err(CniError::Io)
        .and_then(|_| crate::spec::parse_object(&raw));
    // Error results carry the version the configuration supplied (SPEC.md §5).
    let label = parsed
        .as_ref()
        .ok()
        .and_then(crate::spec::declared_version)
        .unwrap_or(CniVersion::LATEST.as_str())
        .to_owned();
    let command = match Command::from_env(&lookup) {
        Ok(Command::Version) => {
            let requested = parsed.as_ref().ok().and_then(crate::spec::declared_version);
            return Output::json(&VersionInfo::answering(requested), 0);
        }
        Ok(command) => Ok(command),
        Err(e) => Err(e),
    };
    let mut logger = match &parsed {
        Ok(map) => Logger::from_stdin(map),
        // Undecodable stdin: the runtime reports the error result; we cannot know
        // where the operator wants our log.
        Err(_) => Logger::disabled(),
    };
    let mut record = Record::default();
    let result = command.and_then(|command| {
        record.command = Some(command);
        execute(command, &lookup, parsed, &mut record)
    });
    let output = match &result {
        Ok(Some(value)) => Output::json(value, 0),
        Ok(None) => Output {
            stdout: Vec::new(),
            exit_code: 0,
        },
        Err(e) => Output::error(&label, e),
    };
    logger.invocation(&record, result.as_ref().err(), started.elapsed());
    output
}

/// Validates the invocation in the reference order (environment, configuration,
/// version) and dispatches it. `Some(result)` is printed on stdout.
fn execute(
    command: Command,
    lookup: &impl Fn(&str) -> Option<OsString>,
    parsed: Result<Map<String, Value>, CniError>,
    record: &mut Record,
) -> Result<Option<Value>, CniError> {
    let env = CniEnv::from_env(command, lookup)?;
    record.container_id.clone_from(&env.container_id);
    record.netns.clone_from(&env.netns);
    record.ifname.clone_from(&env.ifname);
    record.pod = env
        .args
        .pod()
        .map(|p| format!("{}/{}", p.namespace, p.name));
    let conf = NetConf::from_object(&parsed?)?;
    let version = command.negotiate(conf.cni_version.as_deref())?;
    match command {
        Command::Add => add(&env, &conf, version, record).map(Some),
        Command::Del => {
            del(&env, &conf, record);
            Ok(None)
        }
        Command::Check => check(&env, &conf, record).map(|()| None),
        Command::Status => status(&conf, record).map(|()| None),
        Command::Gc => {
            let valid = conf.valid_attachments.as_ref().map_or(0, Vec::len);
            record.outcome = format!("nothing to collect ({valid} valid attachments)");
            Ok(None)
        }
        // Answered by `run` before any logging; kept for an exhaustive match.
        Command::Version => {
            let info = VersionInfo::answering(Some(version.as_str()));
            Ok(Some(serde_json::to_value(info).unwrap_or_default()))
        }
    }
}

/// The pod to ask the agent about, or `None` (with the reason recorded) when the
/// invocation is not for a pod or the pod's namespace is excluded.
fn pod_for_agent<'e>(env: &'e CniEnv, conf: &NetConf, record: &mut Record) -> Option<PodRef<'e>> {
    match env.args.pod() {
        None => {
            record.outcome = "skipped: not a Kubernetes pod (no K8S_POD_* in CNI_ARGS)".into();
            None
        }
        Some(pod) if conf.plugin.is_excluded(pod.namespace) => {
            record.outcome = format!("skipped: namespace {} is excluded", pod.namespace);
            None
        }
        Some(pod) => Some(pod),
    }
}

/// Sends a request, noting the exchange for the debug log.
fn exchange(
    client: &AgentClient,
    record: &mut Record,
    what: &str,
    send: impl FnOnce(&AgentClient) -> Result<HttpResponse, ClientError>,
) -> Result<HttpResponse, ClientError> {
    let result = send(client);
    record.debug.push(match &result {
        Ok(r) => format!("agent {what} -> {} {}", r.status, r.body_text()),
        Err(e) => format!("agent {what} -> {e}"),
    });
    result
}

fn unreachable(client: &AgentClient, error: &ClientError) -> CniError {
    CniError::AgentUnreachable {
        socket: client.socket().display().to_string(),
        reason: error.to_string(),
    }
}

/// ADD: enrol through the agent, then echo `prevResult` in the requested version.
fn add(
    env: &CniEnv,
    conf: &NetConf,
    version: CniVersion,
    record: &mut Record,
) -> Result<Value, CniError> {
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::InvalidConfig(
            "no prevResult: zmesh-cni must be chained after the primary CNI plugin".into(),
        )
    })?;
    let prev = PrevResult::parse(prev)?;
    let result = prev.to_version(version);
    let Some(pod) = pod_for_agent(env, conf, record) else {
        return Ok(result);
    };
    let request = AddRequest {
        container_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        pod_name: pod.name.to_owned(),
        pod_namespace: pod.namespace.to_owned(),
        pod_uid: pod.uid.to_owned(),
        ips: prev.addresses(),
    };
    let client = AgentClient::new(&conf.plugin.agent_socket);
    let response = exchange(&client, record, "POST /v1/cni/add", |c| {
        c.post_json(ADD_PATH, &request, ADD_TIMEOUT)
    })
    .map_err(|e| unreachable(&client, &e))?;
    // Fail closed: only a well-formed positive answer lets the pod start.
    let bad_answer = |reason: String| CniError::AgentBadAnswer {
        socket: client.socket().display().to_string(),
        status: response.status,
        reason,
    };
    match response.status {
        200 => {
            let answer = response.json::<AddResponse>().map_err(|reason| {
                bad_answer(format!(
                    "{reason}; expected exactly {{\"enrolled\": true|false}} as application/json"
                ))
            })?;
            record.outcome = if answer.enrolled {
                "enrolled".into()
            } else {
                "not enrolled (agent: not a mesh pod)".into()
            };
            Ok(result)
        }
        400 => Err(CniError::AgentRejected {
            reason: response.error_text(),
        }),
        503 => Err(CniError::AgentNotReady {
            status: 503,
            reason: response.error_text(),
        }),
        status => Err(bad_answer(format!(
            "unexpected status {status} (the agent answers ADD with 200, 400 or 503): {}",
            response.error_text()
        ))),
    }
}

/// DEL: tell the agent, ignoring every failure (DEL must be idempotent and succeed
/// when the netns or the agent are gone; the agent also cleans up from its pod watch).
fn del(env: &CniEnv, conf: &NetConf, record: &mut Record) {
    let Some(pod) = pod_for_agent(env, conf, record) else {
        return;
    };
    let request = DelRequest {
        container_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone().unwrap_or_default(),
        pod_name: pod.name.to_owned(),
        pod_namespace: pod.namespace.to_owned(),
        pod_uid: pod.uid.to_owned(),
    };
    let client = AgentClient::new(&conf.plugin.agent_socket);
    let sent = exchange(&client, record, "POST /v1/cni/del", |c| {
        c.post_json(DEL_PATH, &request, DEFAULT_TIMEOUT)
    });
    record.outcome = match sent {
        Ok(r) if r.status == 200 => "released".into(),
        Ok(r) => {
            record.warning = true;
            format!(
                "agent answered {} ({}); ignored, DEL is best-effort",
                r.status,
                r.error_text()
            )
        }
        Err(e) => {
            record.warning = true;
            format!(
                "{}; ignored, DEL is best-effort",
                unreachable(&client, &e).details()
            )
        }
    };
}

/// Asks `GET /v1/ready`: `Ok(())` on 200, otherwise the answer or the failure.
fn probe_ready(conf: &NetConf, record: &mut Record) -> Result<(), Result<HttpResponse, String>> {
    let client = AgentClient::new(&conf.plugin.agent_socket);
    match exchange(&client, record, "GET /v1/ready", |c| {
        c.get(READY_PATH, DEFAULT_TIMEOUT)
    }) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(Ok(r)),
        Err(e) => Err(Err(e.to_string())),
    }
}

/// CHECK: the agent must be able to serve this pod; skipped pods always pass.
fn check(env: &CniEnv, conf: &NetConf, record: &mut Record) -> Result<(), CniError> {
    if pod_for_agent(env, conf, record).is_none() {
        return Ok(());
    }
    let socket = conf.plugin.agent_socket.display().to_string();
    match probe_ready(conf, record) {
        Ok(()) => {
            record.outcome = "agent ready".into();
            Ok(())
        }
        Err(Ok(r)) => Err(CniError::AgentNotReady {
            status: r.status,
            reason: r.error_text(),
        }),
        Err(Err(reason)) => Err(CniError::AgentUnreachable { socket, reason }),
    }
}

/// STATUS: code 50 until the agent answers ready.
fn status(conf: &NetConf, record: &mut Record) -> Result<(), CniError> {
    let socket = conf.plugin.agent_socket.display().to_string();
    match probe_ready(conf, record) {
        Ok(()) => {
            record.outcome = "available".into();
            record.routine = true;
            Ok(())
        }
        Err(Ok(r)) => Err(CniError::NotAvailable {
            socket,
            reason: format!("agent not ready (HTTP {}): {}", r.status, r.error_text()),
        }),
        Err(Err(reason)) => Err(CniError::NotAvailable { socket, reason }),
    }
}
