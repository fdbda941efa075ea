//! "CNI plugin chained on every node": each node's agent pod is asked, through a port-forward,
//! for its `GET /readyz` (cni-plugin/src/agent/health.rs), which re-reads the node's CNI
//! config on every request and says whether `zmesh-cni` is in the file the container runtime
//! loads, and if not, why (no config yet, another CNI rewrote the file, a new file sorts
//! first, the binary is gone, and the error that keeps the agent from putting it back).
//! Istio's CNI agent answers the same question on the same port (8000, `/readyz`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::Check;
use crate::error::Error;
use crate::forward;
use crate::manifests::NAMESPACE;

/// The agent's pods (its DaemonSet's selector in the manifests).
pub const AGENT_SELECTOR: &str = "app=zmesh-cni-agent";
/// The agent's health port when its pod names none (its `--health-addr` default).
pub const DEFAULT_HEALTH_PORT: u16 = 8000;
/// The agent's readiness path.
pub const READYZ_PATH: &str = "/readyz";
/// Port-forwards open at once.
const PARALLEL: usize = 8;

const NAME: &str = "CNI plugin chained on every node";

/// What one node's agent said.
#[derive(Debug)]
pub enum Answer {
    /// No agent pod is running on the node.
    NoPod,
    /// The pod's health port could not be reached.
    Unreachable {
        /// The pod.
        pod: String,
        /// Why.
        error: String,
    },
    /// The agent answered.
    Health {
        /// The pod.
        pod: String,
        /// The HTTP status.
        status: StatusCode,
        /// The body (the agent's JSON health document).
        body: Bytes,
    },
}

/// One node's verdict: `Ok(primary config file)` when chained, else the reason.
pub fn judge(answer: &Answer) -> Result<Option<String>, String> {
    let (pod, status, body) = match answer {
        Answer::NoPod => return Err("no running agent pod".to_owned()),
        Answer::Unreachable { pod, error } => {
            return Err(format!("cannot ask its agent {pod}: {error}"));
        }
        Answer::Health { pod, status, body } => (pod, status, body),
    };
    let health: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text: String = String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(200)
                .collect();
            return Err(format!(
                "its agent {pod} answered {READYZ_PATH} with {status} and no health document \
                 ({text:?}); is it an older agent?"
            ));
        }
    };
    let chain = &health["chain"];
    if chain.is_null() {
        return Err(format!(
            "its agent {pod} does not install the plugin (started without --cni-conf-dir), so \
             it cannot tell"
        ));
    }
    let detail = chain["detail"].as_str().unwrap_or("no detail");
    match chain["chained"].as_bool() {
        Some(true) => Ok(chain["primary"]
            .as_str()
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())),
        Some(false) => Err(detail.to_owned()),
        None => Err(format!(
            "its agent {pod} sent a health document without `chain.chained`"
        )),
    }
}

/// The check over each node's verdict.
pub fn summarize(verdicts: &[(String, Result<Option<String>, String>)]) -> Check {
    if verdicts.is_empty() {
        return Check::fail(NAME, "the cluster has no nodes", "add nodes to the cluster");
    }
    let mut files = BTreeSet::new();
    let mut problems = Vec::new();
    for (node, verdict) in verdicts {
        match verdict {
            Ok(file) => files.extend(file.clone()),
            Err(why) => problems.push(format!("{node} ({why})")),
        }
    }
    let total = verdicts.len();
    let chained = total - problems.len();
    if problems.is_empty() {
        let files: Vec<String> = files.into_iter().collect();
        let detail = if files.is_empty() {
            format!("{chained}/{total} nodes")
        } else {
            format!("{chained}/{total} nodes, in {}", files.join(", "))
        };
        return Check::pass(NAME, detail);
    }
    Check::fail(
        NAME,
        format!("{chained}/{total} nodes; not on {}", problems.join(", ")),
        format!(
            "pods created on a node that is not chained are not captured by the mesh. The agent \
             chains zmesh-cni into the first config in /etc/cni/net.d and puts it back whenever another CNI \
             rewrites it: read its log (kubectl -n {NAMESPACE} logs <agent pod>) for why it \
             cannot (a read-only /etc/cni/net.d; another installer removing foreign entries, \
             e.g. Cilium's cni.exclusive=true; no primary CNI config yet: install the \
             cluster's CNI). `kubectl -n {NAMESPACE} get pods -l {AGENT_SELECTOR} -o wide` \
             lists the agents"
        ),
    )
}

/// The port the pod's readiness probe asks (its `/readyz` probe; a named port resolved
/// against the container's ports), else [`DEFAULT_HEALTH_PORT`].
pub fn health_port(pod: &Pod) -> u16 {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    for c in containers {
        let Some(get) = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
            continue;
        };
        if get.path.as_deref() != Some(READYZ_PATH) {
            continue;
        }
        let port = match &get.port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => c.ports.iter().flatten().find_map(|p| {
                (p.name.as_deref() == Some(name.as_str()))
                    .then(|| u16::try_from(p.container_port).ok())
                    .flatten()
            }),
        };
        if let Some(port) = port {
            return port;
        }
    }
    DEFAULT_HEALTH_PORT
}

/// Asks one pod.
async fn ask(client: &Client, pod: &Pod) -> Answer {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let port = health_port(pod);
    match forward::get(client, NAMESPACE, &name, port, READYZ_PATH).await {
        Ok((status, body)) => Answer::Health {
            pod: name,
            status,
            body,
        },
        Err(Error::Forward { reason, .. }) => Answer::Unreachable {
            pod: name,
            error: format!("port {port}: {reason}"),
        },
        Err(e) => Answer::Unreachable {
            pod: name,
            error: format!("port {port}: {e}"),
        },
    }
}

/// Runs the check on `nodes`.
pub async fn run(client: &Client, nodes: &Result<Vec<String>, String>) -> Check {
    let nodes = match nodes {
        Ok(n) => n,
        Err(e) => return Check::fail(NAME, format!("listing nodes: {e}"), "check the API access"),
    };
    let pods = match Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
    {
        Ok(l) => l.items,
        Err(e) => return Check::fail(NAME, format!("listing pods: {e}"), "check the API access"),
    };
    // node -> its running agent pod (the newest when a rollout has two).
    let mut by_node: BTreeMap<String, Pod> = BTreeMap::new();
    for p in pods {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !running {
            continue;
        }
        let newer = by_node.get(&node).is_none_or(|q| {
            p.metadata.creation_timestamp.as_ref().map(|t| t.0)
                >= q.metadata.creation_timestamp.as_ref().map(|t| t.0)
        });
        if newer {
            by_node.insert(node, p);
        }
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut asks = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let Some(pod) = by_node.get(node).cloned() else {
            continue;
        };
        let (client, limit) = (client.clone(), limit.clone());
        asks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            (i, ask(&client, &pod).await)
        });
    }
    let mut answers: Vec<Answer> = nodes.iter().map(|_| Answer::NoPod).collect();
    while let Some(done) = asks.join_next().await {
        if let Ok((i, answer)) = done {
            answers[i] = answer;
        }
    }
    let verdicts: Vec<(String, Result<Option<String>, String>)> = nodes
        .iter()
        .zip(&answers)
        .map(|(node, answer)| (node.clone(), judge(answer)))
        .collect();
    summarize(&verdicts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn health(status: u16, body: Value) -> Answer {
        Answer::Health {
            pod: "zmesh-cni-agent-x".into(),
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn the_chain_part_decides_not_the_readiness() {
        let chained = json!({"ready": false, "ztunnel_connected": false,
            "chain": {"chained": true, "primary": "/host/etc/cni/net.d/10-a.conflist",
                      "detail": "chained in /host/etc/cni/net.d/10-a.conflist"}});
        assert_eq!(
            judge(&health(503, chained)),
            Ok(Some("10-a.conflist".into()))
        );
        let missing = json!({"ready": false, "chain": {"chained": false, "primary": null,
            "detail": "zmesh-cni missing from 10-a.conflist, ..."}});
        assert_eq!(
            judge(&health(503, missing)),
            Err("zmesh-cni missing from 10-a.conflist, ...".into())
        );
        let unmanaged = json!({"ready": true, "chain": null});
        assert!(
            judge(&health(200, unmanaged))
                .unwrap_err()
                .contains("--cni-conf-dir")
        );
        let text = Answer::Health {
            pod: "p".into(),
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(b"not found"),
        };
        assert!(judge(&text).unwrap_err().contains("404 Not Found"));
        assert_eq!(judge(&Answer::NoPod), Err("no running agent pod".into()));
    }

    #[test]
    fn each_failing_node_is_named_with_its_reason() {
        let c = summarize(&[
            ("n1".into(), Ok(Some("10-a.conflist".into()))),
            (
                "n2".into(),
                Err("zmesh-cni missing from 10-a.conflist".into()),
            ),
            ("n3".into(), Err("no running agent pod".into())),
        ]);
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "1/3 nodes; not on n2 (zmesh-cni missing from 10-a.conflist), n3 (no running agent pod)"
        );
        assert!(c.hint.unwrap().contains("logs <agent pod>"));
        let c = summarize(&[
            ("n1".into(), Ok(Some("10-a.conflist".into()))),
            ("n2".into(), Ok(Some("10-a.conflist".into()))),
        ]);
        assert!(c.ok);
        assert_eq!(c.detail, "2/2 nodes, in 10-a.conflist");
        assert!(!summarize(&[]).ok);
    }

    #[test]
    fn the_health_port_comes_from_the_readiness_probe() {
        let pod = |probe: Value| -> Pod {
            serde_json::from_value(json!({"spec": {"containers": [{"name": "agent",
                "ports": [{"name": "http-health", "containerPort": 9000}],
                "readinessProbe": probe}]}}))
            .unwrap()
        };
        let named = pod(json!({"httpGet": {"path": "/readyz", "port": "http-health"}}));
        assert_eq!(health_port(&named), 9000);
        let number = pod(json!({"httpGet": {"path": "/readyz", "port": 8100}}));
        assert_eq!(health_port(&number), 8100);
        let other = pod(json!({"httpGet": {"path": "/other", "port": 8100}}));
        assert_eq!(health_port(&other), DEFAULT_HEALTH_PORT);
    }
}
