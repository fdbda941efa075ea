//! Whether a pod belongs in the mesh (docs/CNI.md "Who decides enrolment").
//!
//! In order, the first rule that applies decides:
//!
//! | rule | decision |
//! |---|---|
//! | `spec.nodeName` set and not this node | skip ([`SkipReason::OtherNode`]) |
//! | `spec.hostNetwork` | skip ([`SkipReason::HostNetwork`]) |
//! | namespace [`MESH_NAMESPACE`], or label `app` = `ztunnel` / `zmesh-cni-agent` | skip ([`SkipReason::MeshPod`]) |
//! | pod label `istio.io/dataplane-mode=none` | skip ([`SkipReason::OptedOut`]) |
//! | pod label `istio.io/dataplane-mode=ambient` | **enrol** |
//! | namespace label `istio.io/dataplane-mode=ambient` | **enrol** |
//! | otherwise | skip ([`SkipReason::NotLabelled`]) |
//!
//! An empty `nodeName` is accepted: the agent only decides for pods the runtime is starting
//! on its own node, and hand-written YAML often leaves the field out.

use std::fmt;

use super::cluster::{Namespace, Pod};

/// The label that puts a namespace or pod in the mesh (`ambient`) or a pod out of it (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrols.
pub const MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod out.
pub const MODE_NONE: &str = "none";
/// The namespace the mesh itself runs in; its pods are never enrolled.
pub const MESH_NAMESPACE: &str = "istio-system";
/// Values of the `app` label that mark the mesh's own pods.
pub const MESH_APPS: [&str; 2] = ["ztunnel", "zmesh-cni-agent"];

/// The outcome of [`enrolment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Capture the pod's traffic.
    Enrol,
    /// Leave the pod alone, for this reason.
    Skip(SkipReason),
}

/// Why a pod is not enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The pod is scheduled on another node (named).
    OtherNode(String),
    /// The pod shares the node's network namespace.
    HostNetwork,
    /// The pod is part of the mesh itself.
    MeshPod,
    /// The pod carries `istio.io/dataplane-mode=none`.
    OptedOut,
    /// Neither the pod nor its namespace asks for ambient.
    NotLabelled,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::OtherNode(node) => write!(f, "the pod is scheduled on node {node:?}"),
            SkipReason::HostNetwork => f.write_str("the pod uses the host network"),
            SkipReason::MeshPod => f.write_str("the pod is part of the mesh itself"),
            SkipReason::OptedOut => {
                write!(f, "the pod is labelled {DATAPLANE_MODE_LABEL}={MODE_NONE}")
            }
            SkipReason::NotLabelled => write!(
                f,
                "neither the pod nor its namespace is labelled {DATAPLANE_MODE_LABEL}={MODE_AMBIENT}"
            ),
        }
    }
}

/// Decides whether `pod`, running in `namespace` (`None`: the agent has not seen the
/// namespace object, so it has no labels), should be enrolled on node `node`.
pub fn enrolment(pod: &Pod, namespace: Option<&Namespace>, node: &str) -> Decision {
    if !pod.node_name.is_empty() && pod.node_name != node {
        return Decision::Skip(SkipReason::OtherNode(pod.node_name.clone()));
    }
    if pod.host_network {
        return Decision::Skip(SkipReason::HostNetwork);
    }
    if pod.namespace == MESH_NAMESPACE || pod.label("app").is_some_and(|a| MESH_APPS.contains(&a)) {
        return Decision::Skip(SkipReason::MeshPod);
    }
    match pod.label(DATAPLANE_MODE_LABEL) {
        Some(MODE_NONE) => return Decision::Skip(SkipReason::OptedOut),
        Some(MODE_AMBIENT) => return Decision::Enrol,
        _ => {}
    }
    if namespace.and_then(|n| n.label(DATAPLANE_MODE_LABEL)) == Some(MODE_AMBIENT) {
        return Decision::Enrol;
    }
    Decision::Skip(SkipReason::NotLabelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_rule_in_order() {
        use Decision::*;
        use SkipReason::*;
        const MODE: &str = DATAPLANE_MODE_LABEL;
        struct Case {
            what: &'static str,
            pod_ns: &'static str,
            pod_labels: &'static [(&'static str, &'static str)],
            node: &'static str,
            host_network: bool,
            ns_labels: Option<&'static [(&'static str, &'static str)]>,
            want: Decision,
        }
        let base = || Case {
            what: "",
            pod_ns: "shop",
            pod_labels: &[],
            node: "n1",
            host_network: false,
            ns_labels: Some(&[(MODE, "ambient")]),
            want: Enrol,
        };
        let cases = [
            Case {
                what: "namespace label enrols",
                ..base()
            },
            Case {
                what: "empty nodeName is this node",
                node: "",
                ..base()
            },
            Case {
                what: "other node",
                node: "n2",
                want: Skip(OtherNode("n2".into())),
                ..base()
            },
            Case {
                what: "other node wins over labels",
                node: "n2",
                pod_labels: &[(MODE, "ambient")],
                want: Skip(OtherNode("n2".into())),
                ..base()
            },
            Case {
                what: "host network",
                host_network: true,
                want: Skip(HostNetwork),
                ..base()
            },
            Case {
                what: "host network wins over pod label",
                host_network: true,
                pod_labels: &[(MODE, "ambient")],
                want: Skip(HostNetwork),
                ..base()
            },
            Case {
                what: "mesh namespace",
                pod_ns: "istio-system",
                want: Skip(MeshPod),
                ..base()
            },
            Case {
                what: "ztunnel pod",
                pod_labels: &[("app", "ztunnel"), (MODE, "ambient")],
                want: Skip(MeshPod),
                ..base()
            },
            Case {
                what: "agent pod",
                pod_labels: &[("app", "zmesh-cni-agent")],
                want: Skip(MeshPod),
                ..base()
            },
            Case {
                what: "other app label is fine",
                pod_labels: &[("app", "web")],
                ..base()
            },
            Case {
                what: "pod opts out of an ambient namespace",
                pod_labels: &[(MODE, "none")],
                want: Skip(OptedOut),
                ..base()
            },
            Case {
                what: "pod label enrols without namespace label",
                pod_labels: &[(MODE, "ambient")],
                ns_labels: Some(&[]),
                ..base()
            },
            Case {
                what: "pod label enrols without namespace object",
                pod_labels: &[(MODE, "ambient")],
                ns_labels: None,
                ..base()
            },
            Case {
                what: "unknown pod value defers to the namespace",
                pod_labels: &[(MODE, "sidecar")],
                ..base()
            },
            Case {
                what: "namespace without label",
                ns_labels: Some(&[("team", "a")]),
                want: Skip(NotLabelled),
                ..base()
            },
            Case {
                what: "namespace with another mode",
                ns_labels: Some(&[(MODE, "none")]),
                want: Skip(NotLabelled),
                ..base()
            },
            Case {
                what: "no namespace object",
                ns_labels: None,
                want: Skip(NotLabelled),
                ..base()
            },
        ];
        for c in cases {
            let pod = Pod {
                name: "p".into(),
                namespace: c.pod_ns.into(),
                labels: labels(c.pod_labels),
                node_name: c.node.into(),
                host_network: c.host_network,
                ..Pod::default()
            };
            let ns = c.ns_labels.map(|l| Namespace {
                name: c.pod_ns.into(),
                labels: labels(l),
            });
            assert_eq!(enrolment(&pod, ns.as_ref(), "n1"), c.want, "{}", c.what);
        }
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            SkipReason::OptedOut.to_string(),
            "the pod is labelled istio.io/dataplane-mode=none"
        );
        assert!(
            SkipReason::OtherNode("n2".into())
                .to_string()
                .contains("\"n2\"")
        );
    }
}
