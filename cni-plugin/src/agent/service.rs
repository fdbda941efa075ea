//! What the agent does for each request of the plugin, and when the pod source changes;
//! transport-free ([`super::server`] puts it on HTTP).
//!
//! - **ADD**: find the pod in the source (retrying while the source lags), decide
//!   ([`enrolment`]), and for a mesh pod: open its netns, record it (the record feeds the ZDS
//!   snapshot, so a ztunnel connecting meanwhile learns of the pod), install the rules, hand it
//!   to ztunnel and wait for the ack, write the state file. Any failure rolls all of it back
//!   (fail closed: the runtime retries, the pod never runs uncaptured).
//! - **DEL**: forget the pod, tell ztunnel, remove the rules if the netns is still there.
//!   A DEL for an older sandbox of a pod (uid matches, sandbox id does not) is ignored.
//! - **Reconcile** on every new source snapshot: an enrolled pod that no longer qualifies
//!   (label removed from it or its namespace) is released; a known, skipped pod that now
//!   qualifies is enrolled with the netns recorded at its ADD. A running pod the agent never
//!   saw an ADD for cannot be enrolled (no netns known): logged.
//!
//! Enrolment changes are serialised by one lock, so ADD, DEL and reconciliation never
//! interleave on a pod.

use std::fs::File;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::cluster::{Cluster, Namespace, Pod};
use super::dataplane::{Dataplane, DataplaneError};
use super::decision::{Decision, enrolment};
use super::source::PodSource;
use super::state::{PodRecord, StateError, StateStore};
use crate::api::{AddRequest, AddResponse, DelRequest};

/// Tunables of [`Agent`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// This node's name (`spec.nodeName` of the pods it serves).
    pub node_name: String,
    /// How often to look a pod up before answering "unknown pod".
    pub lookup_attempts: u32,
    /// The pause between lookups.
    pub lookup_interval: Duration,
}

impl AgentConfig {
    /// Defaults for `node_name`: 10 lookups 100 ms apart.
    pub fn new(node_name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            node_name: node_name.into(),
            lookup_attempts: 10,
            lookup_interval: Duration::from_millis(100),
        }
    }
}

/// Why a request failed; [`AgentError::status`] is the HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is wrong (`400`, the plugin fails with CNI code 7).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The pod is not (yet) in the pod source.
    #[error(
        "pod {namespace}/{name}{} is not known to the node agent after {waited:?} (is the pod \
         source up to date: the pods directory or the API watch?); retry later",
        if uid.is_empty() { String::new() } else { format!(" (uid {uid})") }
    )]
    UnknownPod {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The uid the runtime gave.
        uid: String,
        /// How long the agent waited.
        waited: Duration,
    },
    /// Neither the runtime nor the source gave the pod a uid.
    #[error("pod {0} has no uid (neither K8S_POD_UID nor metadata.uid); cannot name it to ztunnel")]
    NoUid(String),
    /// The pod's netns could not be opened.
    #[error("cannot open the netns {path} of pod {pod}: {source} (is the sandbox still there?)")]
    OpenNetns {
        /// The pod.
        pod: String,
        /// The netns path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Installing the rules or the hand-over to ztunnel failed; rolled back.
    #[error("cannot enrol pod {pod}: {source}; rolled back")]
    Dataplane {
        /// The pod.
        pod: String,
        /// Why.
        source: DataplaneError,
    },
    /// The state file could not be written; the enrolment was rolled back.
    #[error("pod {pod} was rolled back: {source}")]
    State {
        /// The pod.
        pod: String,
        /// Why.
        source: StateError,
    },
}

impl AgentError {
    /// The HTTP status: `400` for bad requests, `503` (retry) for everything else.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::BadRequest(_) => 400,
            _ => 503,
        }
    }
}

/// The node agent's logic.
pub struct Agent<D> {
    config: AgentConfig,
    cluster: watch::Receiver<Arc<Cluster>>,
    dataplane: D,
    state: Arc<StateStore>,
    ops: tokio::sync::Mutex<()>,
}

impl<D> std::fmt::Debug for Agent<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<D: Dataplane> Agent<D> {
    /// An agent deciding from `source`'s snapshots, acting through `dataplane`, recording in
    /// `state` (which should also feed the ZDS server's snapshot).
    pub fn new(
        config: AgentConfig,
        source: &dyn PodSource,
        dataplane: D,
        state: Arc<StateStore>,
    ) -> Agent<D> {
        Agent {
            config,
            cluster: source.subscribe(),
            dataplane,
            state,
            ops: tokio::sync::Mutex::new(()),
        }
    }

    /// The recorded pods.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.state
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// Whether ADDs can be served (`GET /v1/ready`).
    pub fn ready(&self) -> bool {
        self.dataplane.ready()
    }

    /// `POST /v1/cni/add`.
    pub async fn add(&self, req: &AddRequest) -> Result<AddResponse, AgentError> {
        for (field, value) in [
            ("pod_name", &req.pod_name),
            ("pod_namespace", &req.pod_namespace),
            ("netns", &req.netns),
        ] {
            if value.is_empty() {
                return Err(AgentError::BadRequest(format!("{field} is empty")));
            }
        }
        let ips = parse_ips(&req.ips)?;
        let (pod, namespace) = self.lookup(req).await?;
        let uid = if pod.uid.is_empty() {
            &req.pod_uid
        } else {
            &pod.uid
        };
        if uid.is_empty() {
            return Err(AgentError::NoUid(pod.key()));
        }
        let record = PodRecord {
            uid: uid.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            netns: req.netns.clone().into(),
            ips,
            container_id: req.container_id.clone(),
            enrolled: false,
        };
        let _ops = self.ops.lock().await;
        match enrolment(&pod, namespace.as_ref(), &self.config.node_name) {
            Decision::Skip(reason) => {
                info!(pod = %pod.key(), "not enrolling: {reason}");
                if let Some(old) = self.state.get(&record.uid).filter(|r| r.enrolled) {
                    self.release(&old).await;
                }
                self.state.insert(record, None);
                self.persist_best_effort();
                Ok(AddResponse { enrolled: false })
            }
            Decision::Enrol => {
                let file = File::open(&record.netns).map_err(|source| AgentError::OpenNetns {
                    pod: pod.key(),
                    path: req.netns.clone(),
                    source,
                })?;
                self.enrol(record, file).await?;
                info!(pod = %pod.key(), uid, netns = req.netns, "enrolled");
                super::fault::pause_add(super::fault::AddPoint::AfterAck).await;
                Ok(AddResponse { enrolled: true })
            }
        }
    }

    /// `POST /v1/cni/del`: never fails; problems are logged.
    pub async fn del(&self, req: &DelRequest) {
        let _ops = self.ops.lock().await;
        let found = self.state.find(
            &req.pod_uid,
            &req.container_id,
            &req.pod_namespace,
            &req.pod_name,
        );
        let record = match found {
            Some(r)
                if !r.container_id.is_empty()
                    && !req.container_id.is_empty()
                    && r.container_id != req.container_id =>
            {
                info!(
                    pod = %r.key(), sandbox = req.container_id, current = r.container_id,
                    "ignoring DEL of an older sandbox"
                );
                return;
            }
            Some(r) => r,
            // Unknown to us (e.g. the state file was lost): still tell ztunnel, so it lets go
            // of a pod the agent forgot.
            None if !req.pod_uid.is_empty() => PodRecord {
                uid: req.pod_uid.clone(),
                name: req.pod_name.clone(),
                namespace: req.pod_namespace.clone(),
                service_account: String::new(),
                netns: req.netns.clone().into(),
                ips: Vec::new(),
                container_id: req.container_id.clone(),
                enrolled: true,
            },
            None => return,
        };
        self.state.remove(&record.uid);
        self.persist_best_effort();
        if record.enrolled {
            self.release(&record).await;
        }
        info!(pod = %record.key(), uid = record.uid, "released");
    }

    /// Enrols a recorded pod (see the module docs); rolls back on failure.
    async fn enrol(&self, mut record: PodRecord, netns: File) -> Result<(), AgentError> {
        record.enrolled = true;
        let pod = record.key();
        let netns = Arc::new(netns);
        self.state.insert(record.clone(), Some(netns.clone()));
        let outcome = match self.dataplane.enrol(&record, &netns).await {
            Ok(()) => self.state.persist().map_err(|source| AgentError::State {
                pod: pod.clone(),
                source,
            }),
            Err(source) => Err(AgentError::Dataplane {
                pod: pod.clone(),
                source,
            }),
        };
        if outcome.is_err() {
            // Fail closed: nothing of the attempt stays (the caller logs the error).
            self.state.remove(&record.uid);
            self.persist_best_effort();
            self.release(&record).await;
        }
        outcome
    }

    /// Un-enrols a pod, logging failures (there is no one to report them to).
    async fn release(&self, record: &PodRecord) {
        if let Err(e) = self.dataplane.unenrol(record).await {
            warn!(pod = %record.key(), uid = record.uid, "releasing the pod: {e}");
        }
    }

    fn persist_best_effort(&self) {
        if let Err(e) = self.state.persist() {
            warn!("{e}");
        }
    }

    /// Finds the pod in the source, retrying while it is absent or has another uid.
    async fn lookup(&self, req: &AddRequest) -> Result<(Pod, Option<Namespace>), AgentError> {
        let attempts = self.config.lookup_attempts.max(1);
        for attempt in 0..attempts {
            {
                let cluster = self.cluster.borrow().clone();
                let found = cluster
                    .pod(&req.pod_namespace, &req.pod_name)
                    .filter(|p| req.pod_uid.is_empty() || p.uid.is_empty() || p.uid == req.pod_uid);
                if let Some(pod) = found {
                    return Ok((pod.clone(), cluster.namespace(&pod.namespace).cloned()));
                }
            }
            if attempt + 1 < attempts {
                tokio::time::sleep(self.config.lookup_interval).await;
            }
        }
        Err(AgentError::UnknownPod {
            namespace: req.pod_namespace.clone(),
            name: req.pod_name.clone(),
            uid: req.pod_uid.clone(),
            waited: self.config.lookup_interval * (attempts - 1),
        })
    }

    /// Brings the recorded pods in line with `new` (see the module docs); `old` is the
    /// snapshot handled before, to report relabelled namespaces' pods that cannot be enrolled.
    pub async fn reconcile(&self, old: &Cluster, new: &Cluster) {
        let _ops = self.ops.lock().await;
        let node = &self.config.node_name;
        for record in self.state.records() {
            let Some(pod) = new
                .pod(&record.namespace, &record.name)
                .filter(|p| p.uid.is_empty() || p.uid == record.uid)
            else {
                continue; // gone from the source: its CNI DEL releases it
            };
            let decision = enrolment(pod, new.namespace(&pod.namespace), node);
            match (record.enrolled, decision) {
                (true, Decision::Skip(reason)) => {
                    info!(pod = %record.key(), "releasing: {reason}");
                    self.release(&record).await;
                    self.state.insert(
                        PodRecord {
                            enrolled: false,
                            ..record
                        },
                        None,
                    );
                    self.persist_best_effort();
                }
                (false, Decision::Enrol) => match File::open(&record.netns) {
                    Ok(file) => {
                        let key = record.key();
                        match self.enrol(record, file).await {
                            Ok(()) => info!(pod = %key, "enrolled after a label change"),
                            Err(e) => warn!("label change: {e}"),
                        }
                    }
                    Err(e) => warn!(
                        pod = %record.key(), netns = %record.netns.display(),
                        "cannot enrol after a label change: cannot open the netns: {e}"
                    ),
                },
                _ => {}
            }
        }
        for ns in new.namespaces_relabelled(old) {
            for pod in new.pods().filter(|p| p.namespace == ns) {
                let known = self.state.get(&pod.uid).is_some();
                let enrol = enrolment(pod, new.namespace(&ns), node) == Decision::Enrol;
                if enrol && !known && (pod.node_name == *node) {
                    warn!(
                        pod = %pod.key(),
                        "namespace {ns} now asks for ambient, but the agent has no netns for this \
                         pod (started before the agent recorded it); restart the pod to enrol it"
                    );
                }
            }
        }
    }

    /// Reconciles on every new snapshot of the source, starting with the current one.
    pub async fn run_reconciler(self: Arc<Self>) {
        let mut rx = self.cluster.clone();
        let mut old = Arc::new(Cluster::default());
        loop {
            let new = rx.borrow_and_update().clone();
            self.reconcile(&old, &new).await;
            old = new;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Parses the CNI result's addresses (`10.244.1.5/24` or a bare address).
fn parse_ips(ips: &[String]) -> Result<Vec<IpAddr>, AgentError> {
    ips.iter()
        .map(|text| {
            let addr = text.split('/').next().unwrap_or_default();
            addr.parse::<IpAddr>()
                .map_err(|_| AgentError::BadRequest(format!("ips: {text:?} is not an address")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_parse_with_and_without_prefix() {
        let ips = parse_ips(&["10.0.0.1/24".into(), "fd00::1".into()]).unwrap();
        assert_eq!(ips.len(), 2);
        let err = parse_ips(&["x/1".into()]).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn unknown_pod_is_retryable_and_explains() {
        let err = AgentError::UnknownPod {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            waited: Duration::from_millis(900),
        };
        assert_eq!(err.status(), 503);
        let text = err.to_string();
        assert!(
            text.contains("shop/web (uid u1)") && text.contains("retry later"),
            "{text}"
        );
    }
}
