//! The lab cluster's "API server": the Pod, Namespace and Service objects as Kubernetes YAML
//! in the shared pods directory, which every node agent and the controller watch (the
//! controller derives its xDS from them), and the workloads the ztunnels should end up with.
//!
//! One file per object (`ns-<namespace>.yaml`, `pod-<namespace>-<name>.yaml`), each written
//! atomically (a hidden temporary file renamed over it), so an agent never reads half an
//! object.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use crate::mesh::{LocalConfig, Protocol, WorkloadSpec};

/// The label that enrols a namespace or pod (`ambient`) or opts a pod out (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The namespace of the mesh's own pods (ztunnels); never enrolled, excluded from the plugin.
pub const MESH_NAMESPACE: &str = "istio-system";

/// A pod as the API server knows it.
#[derive(Clone, Debug)]
pub(crate) struct PodObject {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIP`, once the runtime has set the pod up.
    pub ip: Option<IpAddr>,
    /// The `Ready` condition, as kubelet reports it (its containers run and pass their
    /// readiness probes); only meaningful once the pod has an IP.
    pub ready: bool,
}

impl PodObject {
    /// The uid the lab runtime gives the same pod (`K8S_POD_UID`), see
    /// [`crate::runtime::PodSandbox::new`].
    pub fn uid(&self) -> String {
        format!("uid-{}-{}", self.namespace, self.name)
    }
}

/// Every object of the cluster, and where they are written.
#[derive(Debug)]
pub(crate) struct Objects {
    pods_dir: PathBuf,
    /// Namespace name -> its labels.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// (namespace, name) -> pod.
    pods: BTreeMap<(String, String), PodObject>,
}

impl Objects {
    /// An empty cluster writing into `pods_dir` (created).
    pub fn new(pods_dir: &Path) -> Result<Objects> {
        std::fs::create_dir_all(pods_dir)
            .with_context(|| format!("creating {}", pods_dir.display()))?;
        Ok(Objects {
            pods_dir: pods_dir.to_owned(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
        })
    }

    /// Creates the namespace (unlabelled) unless it exists.
    pub fn ensure_namespace(&mut self, ns: &str) -> Result<()> {
        if !self.namespaces.contains_key(ns) {
            self.set_namespace_mode(ns, None)?;
        }
        Ok(())
    }

    /// Writes the namespace with `istio.io/dataplane-mode=<mode>` (or without that label),
    /// keeping its other labels.
    pub fn set_namespace_mode(&mut self, ns: &str, mode: Option<&str>) -> Result<()> {
        self.set_namespace_label(ns, DATAPLANE_MODE, mode)
    }

    /// Writes the namespace (created if new) with label `key=value`, or without `key` for
    /// `None`, keeping its other labels.
    pub fn set_namespace_label(&mut self, ns: &str, key: &str, value: Option<&str>) -> Result<()> {
        let labels = self.namespaces.entry(ns.to_owned()).or_default();
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        let labels = labels.clone();
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels},
        });
        write_yaml(&self.pods_dir.join(format!("ns-{ns}.yaml")), &doc)
    }

    /// Whether the agents enrol this pod (the rules of docs/CNI.md "Who decides enrolment").
    pub fn enrolled(&self, pod: &PodObject) -> bool {
        if pod.namespace == MESH_NAMESPACE {
            return false;
        }
        match pod.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => self
                .namespaces
                .get(&pod.namespace)
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient"),
        }
    }

    /// Writes (creates or replaces) the pod's object.
    pub fn put_pod(&mut self, pod: PodObject) -> Result<()> {
        self.ensure_namespace(&pod.namespace)?;
        let mut status = json!({});
        if let Some(ip) = pod.ip {
            // As kubelet reports a running pod (the lab's apps have no readiness probes, so
            // they are ready unless the lab said otherwise, see `Cluster::set_pod_ready`).
            let ready = if pod.ready { "True" } else { "False" };
            status = json!({
                "phase": "Running",
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "Ready", "status": ready}],
            });
        }
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "uid": pod.uid(),
                "labels": pod.labels,
            },
            "spec": {
                "nodeName": pod.node,
                "serviceAccountName": pod.service_account,
                "containers": [{"name": "app", "image": "zmesh-lab/app"}],
            },
            "status": status,
        });
        write_yaml(&self.pod_file(&pod.namespace, &pod.name), &doc)?;
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
        Ok(())
    }

    /// The pod `namespace/name`, if it exists.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodObject> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Deletes the pod's object.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        self.pods.remove(&(namespace.to_owned(), name.to_owned()));
        remove(&self.pod_file(namespace, name))
    }

    /// Writes (creates or replaces) a Service: `selector` picks its pods, `vip` is its
    /// cluster IP, `ports` are (port, target port).
    pub fn put_service(
        &self,
        namespace: &str,
        name: &str,
        selector: &BTreeMap<String, String>,
        vip: IpAddr,
        ports: &[(u16, u16)],
    ) -> Result<()> {
        let ports: Vec<_> = ports
            .iter()
            .map(|(port, target)| {
                json!({"name": format!("p{port}"), "port": port, "targetPort": target, "protocol": "TCP"})
            })
            .collect();
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "selector": selector,
                "clusterIP": vip.to_string(),
                "clusterIPs": [vip.to_string()],
                "ports": ports,
            },
        });
        write_yaml(&self.service_file(namespace, name), &doc)
    }

    /// Deletes a Service's object.
    pub fn delete_service(&self, namespace: &str, name: &str) -> Result<()> {
        remove(&self.service_file(namespace, name))
    }

    /// Writes any Kubernetes YAML (one or more documents) as `<stem>.yaml` in the objects
    /// directory, atomically, as `kubectl apply -f` of that file would.
    pub fn put_yaml(&self, stem: &str, text: &str) -> Result<()> {
        crate::write_atomic(&self.pods_dir.join(format!("{stem}.yaml")), text)
    }

    /// Deletes `<stem>.yaml` (and so its objects).
    pub fn delete_yaml(&self, stem: &str) -> Result<()> {
        remove(&self.pods_dir.join(format!("{stem}.yaml")))
    }

    fn service_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.pods_dir.join(format!("svc-{namespace}-{name}.yaml"))
    }

    fn pod_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.pods_dir.join(format!("pod-{namespace}-{name}.yaml"))
    }

    /// The workloads every ztunnel should know, as a local config: one per pod with an IP,
    /// HBONE when enrolled, plain TCP otherwise (the controller's translation of the objects).
    pub fn local_config(&self) -> LocalConfig {
        self.pods
            .values()
            .filter_map(|p| {
                let ip = p.ip?;
                let protocol = if self.enrolled(p) {
                    Protocol::Hbone
                } else {
                    Protocol::Tcp
                };
                Some(
                    WorkloadSpec::new(&p.name, ip)
                        .namespace(&p.namespace)
                        .service_account(&p.service_account)
                        .node(&p.node)
                        .protocol(protocol),
                )
            })
            .fold(LocalConfig::default(), LocalConfig::workload)
    }
}

fn remove(file: &Path) -> Result<()> {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", file.display()))
        }
        _ => Ok(()),
    }
}

/// Writes `doc` as YAML to `path`, atomically ([`crate::write_atomic`]).
fn write_yaml(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let text = serde_yaml::to_string(doc).context("rendering YAML")?;
    crate::write_atomic(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_expected_workloads_follow_the_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Objects::new(&dir.path().join("pods")).unwrap();
        o.set_namespace_mode("shop", Some("ambient")).unwrap();
        let pod = PodObject {
            namespace: "shop".into(),
            name: "web".into(),
            node: "n1".into(),
            service_account: "web".into(),
            labels: BTreeMap::new(),
            ip: Some("10.244.1.5".parse().unwrap()),
            ready: true,
        };
        o.put_pod(pod.clone()).unwrap();
        let yaml = std::fs::read_to_string(dir.path().join("pods/pod-shop-web.yaml")).unwrap();
        assert!(yaml.contains("uid: uid-shop-web") && yaml.contains("podIP: 10.244.1.5"));
        assert!(o.local_config().to_yaml().contains("HBONE"));
        o.set_namespace_mode("shop", None).unwrap();
        assert!(!o.enrolled(&pod));
        let text = o.local_config().to_yaml();
        assert!(text.contains("TCP") && !text.contains("HBONE"), "{text}");
        let cfg = zmesh_core::state::LocalConfig::parse(&text).unwrap();
        assert_eq!(cfg.workloads.len(), 1);
    }
}
