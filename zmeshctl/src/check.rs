//! `check`: one line per check, a hint on each failure, as `linkerd check` and
//! `istioctl x precheck` report. Pre-install checks (`--pre`): the API is reachable, the
//! Kubernetes release is recent enough, the Gateway API CRDs are installed. After an install,
//! also: the AuthorizationPolicy CRD, the controller Deployment ready, and on every node a
//! ready node-agent pod, the CNI plugin chained (the agent's `/readyz`, `chained.rs`) and a
//! ready ztunnel pod; through port-forwards (`mesh.rs`), every ztunnel's workload certificates
//! valid and not near expiry, and every ztunnel's xDS view in sync with the controller's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::error::is_not_found;
use crate::manifests::NAMESPACE;
use crate::progress::Progress;

mod chained;
mod mesh;
mod report;

pub use report::print;

/// The oldest Kubernetes release zmesh supports: the oldest its API types model (the
/// workspace builds k8s-openapi with its earliest feature, `v1_33`).
pub const MIN_VERSION: (u32, u32) = (1, 33);

/// The Gateway API CRDs the controller watches and the GatewayClass needs.
pub const GATEWAY_API_CRDS: [&str; 4] = [
    "gatewayclasses.gateway.networking.k8s.io",
    "gateways.gateway.networking.k8s.io",
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

/// The CRD zmesh installs.
pub const AUTHZ_CRD: &str = "authorizationpolicies.security.istio.io";

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Runs the checks (only the pre-install ones with `pre`). Stops after the first when the
/// API is unreachable, since every other check needs it.
pub async fn run(client: &Client, server: &str, pre: bool) -> Vec<Check> {
    let progress = Progress::start("checking the cluster");
    let mut checks = Vec::new();
    let name = "Kubernetes API reachable";
    let info = match client.apiserver_version().await {
        Ok(info) => {
            checks.push(Check::pass(name, server));
            info
        }
        Err(e) => {
            checks.push(Check::fail(
                name,
                format!("{server}: {e}"),
                "check KUBECONFIG / --kubeconfig and --context, and that \
                 `kubectl version` reaches the cluster",
            ));
            return checks;
        }
    };
    checks.push(version(&info.major, &info.minor, &info.git_version));
    checks.push(
        crds(
            client,
            "Gateway API CRDs installed",
            &GATEWAY_API_CRDS,
            GATEWAY_HINT,
        )
        .await,
    );
    if pre {
        return checks;
    }
    checks.push(
        crds(
            client,
            "AuthorizationPolicy CRD installed",
            &[AUTHZ_CRD],
            "run `zmeshctl install`",
        )
        .await,
    );
    checks.push(controller(client).await);
    let nodes: Result<Vec<String>, String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect()
        })
        .map_err(|e| e.to_string());
    checks.push(daemonset_ready(client, &nodes, "zmesh-cni-agent", "node agent").await);
    progress.set("asking each node's agent whether the CNI plugin is chained");
    checks.push(chained::run(client, &nodes).await);
    checks.push(daemonset_ready(client, &nodes, "ztunnel", "ztunnel").await);
    checks.extend(mesh::run(client, &|m| progress.set(m)).await);
    progress.finish();
    checks
}

const GATEWAY_HINT: &str = "install the Gateway API standard channel, v1.1.0 or later: \
     kubectl apply --server-side -f https://github.com/kubernetes-sigs/gateway-api/releases/\
     download/v1.3.0/standard-install.yaml (manifests/README.md, step 1)";

/// `major`/`minor` against [`MIN_VERSION`] (providers append `+` to the minor, e.g. `33+`).
fn version(major: &str, minor: &str, git: &str) -> Check {
    let name = "Kubernetes version";
    let number = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    let (min_major, min_minor) = MIN_VERSION;
    match (number(major), number(minor)) {
        (Some(a), Some(b)) if (a, b) >= MIN_VERSION => {
            Check::pass(name, format!("{git} (>= {min_major}.{min_minor})"))
        }
        (Some(_), Some(_)) => Check::fail(
            name,
            format!("{git} is older than {min_major}.{min_minor}"),
            format!("upgrade the cluster to Kubernetes {min_major}.{min_minor} or later"),
        ),
        _ => Check::fail(
            name,
            format!("the API server reports an unreadable version {major:?}.{minor:?}"),
            "check `kubectl version`",
        ),
    }
}

async fn crds(client: &Client, name: &str, wanted: &[&str], hint: &str) -> Check {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for crd in wanted {
        match api.get(crd).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => missing.push(*crd),
            Err(e) => {
                return Check::fail(
                    name,
                    format!("reading CRD {crd}: {e}"),
                    "check that your credentials may get customresourcedefinitions",
                );
            }
        }
    }
    if missing.is_empty() {
        let short: Vec<&str> = wanted
            .iter()
            .map(|c| c.split_once('.').map_or(*c, |(plural, _)| plural))
            .collect();
        Check::pass(name, short.join(", "))
    } else {
        Check::fail(name, format!("missing: {}", missing.join(", ")), hint)
    }
}

async fn controller(client: &Client) -> Check {
    let name = "controller ready";
    let deployment = "zmesh-controller";
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let d = match api.get(deployment).await {
        Ok(d) => d,
        Err(e) if is_not_found(&e) => {
            return Check::fail(
                name,
                format!("no Deployment {NAMESPACE}/{deployment}"),
                "run `zmeshctl install`",
            );
        }
        Err(e) => return Check::fail(name, e.to_string(), "check the API access"),
    };
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let detail = format!("{ready}/{wanted} replicas ready, {updated} up to date");
    if wanted > 0 && ready >= wanted && updated >= wanted {
        Check::pass(name, detail)
    } else {
        Check::fail(
            name,
            detail,
            format!(
                "kubectl -n {NAMESPACE} describe deployment {deployment}; \
                 kubectl -n {NAMESPACE} logs deployment/{deployment} (is the cacerts Secret there?)"
            ),
        )
    }
}

/// Every node has a pod of the DaemonSet `name` (by its selector) that is Ready.
async fn daemonset_ready(
    client: &Client,
    nodes: &Result<Vec<String>, String>,
    daemonset: &str,
    what: &str,
) -> Check {
    let name = format!("{what} ready on every node");
    let name = name.as_str();
    let nodes = match nodes {
        Ok(n) => n,
        Err(e) => return Check::fail(name, format!("listing nodes: {e}"), "check the API access"),
    };
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let ds = match api.get(daemonset).await {
        Ok(d) => d,
        Err(e) if is_not_found(&e) => {
            return Check::fail(
                name,
                format!("no DaemonSet {NAMESPACE}/{daemonset}"),
                "run `zmeshctl install`",
            );
        }
        Err(e) => return Check::fail(name, e.to_string(), "check the API access"),
    };
    let selector: Vec<String> = ds
        .spec
        .and_then(|s| s.selector.match_labels)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let pods = match Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
    {
        Ok(l) => l.items,
        Err(e) => return Check::fail(name, format!("listing pods: {e}"), "check the API access"),
    };
    // node -> (pod name, ready)
    let mut by_node: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for p in pods {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let pod = p.metadata.name.unwrap_or_default();
        let entry = by_node.entry(node).or_insert((pod.clone(), ready));
        if ready && !entry.1 {
            *entry = (pod, true);
        }
    }
    let mut problems = Vec::new();
    for node in nodes {
        match by_node.get(node) {
            Some((_, true)) => {}
            Some((pod, false)) => problems.push(format!("{node} (pod {pod} not ready)")),
            None => problems.push(format!("{node} (no pod)")),
        }
    }
    let ready = nodes.len() - problems.len();
    if problems.is_empty() && !nodes.is_empty() {
        Check::pass(name, format!("{ready}/{} nodes", nodes.len()))
    } else if nodes.is_empty() {
        Check::fail(name, "the cluster has no nodes", "add nodes to the cluster")
    } else {
        Check::fail(
            name,
            format!(
                "{ready}/{} nodes; not on {}",
                nodes.len(),
                problems.join(", ")
            ),
            format!(
                "kubectl -n {NAMESPACE} get pods -l {} -o wide; then describe and read the \
                 logs of the pods named",
                selector.join(",")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically_and_tolerate_provider_suffixes() {
        assert!(version("1", "33", "v1.33.0").ok);
        assert!(version("1", "40+", "v1.40.2-gke.1").ok);
        assert!(!version("1", "32", "v1.32.9").ok);
        assert!(!version("1", "9", "v1.9.0").ok);
        let bad = version("", "x", "");
        assert!(!bad.ok && bad.hint.is_some());
    }
}
