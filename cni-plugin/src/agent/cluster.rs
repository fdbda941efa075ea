//! The facts the node agent needs about pods and namespaces, and the loader that reads them
//! from a directory of Kubernetes YAML.
//!
//! Only `kind: Pod` and `kind: Namespace` (`apiVersion: v1`) documents are read; any other kind
//! (Services, policies, ...: the controller reads the same directory) is skipped. Of those, only
//! the fields enrolment needs are kept: `metadata.{name, namespace, uid, labels}`,
//! `spec.{nodeName, hostNetwork, serviceAccountName}` and `status.{podIP, podIPs}`.
//!
//! A directory that cannot be read in full is an error that names the file and the document
//! ([`LoadError`]); the caller keeps its last good [`Cluster`] (see [`super::source`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The namespace of a pod whose YAML names none (as `kubectl apply` would).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The service account of a pod whose YAML names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the agent knows about one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` ([`DEFAULT_NAMESPACE`] when absent).
    pub namespace: String,
    /// `metadata.uid` (empty when the YAML has none).
    pub uid: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.nodeName` (empty when not scheduled, or not written in the YAML).
    pub node_name: String,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `spec.serviceAccountName` ([`DEFAULT_SERVICE_ACCOUNT`] when absent).
    pub service_account: String,
    /// `status.podIPs` (or `status.podIP`), possibly empty: the API server learns them late.
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// The value of a label, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// `namespace/name`, for logs and errors.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the agent knows about one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// The value of a label, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// A consistent snapshot of the pods and namespaces the agent watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Pods by (namespace, name).
    pods: BTreeMap<(String, String), Pod>,
    /// Namespaces by name.
    namespaces: BTreeMap<String, Namespace>,
}

impl Cluster {
    /// A snapshot of exactly these objects; a later duplicate replaces an earlier one.
    pub fn new(
        pods: impl IntoIterator<Item = Pod>,
        namespaces: impl IntoIterator<Item = Namespace>,
    ) -> Cluster {
        Cluster {
            pods: pods
                .into_iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                .collect(),
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
        }
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The pod with this uid (a linear search: uids are not the index).
    pub fn pod_by_uid(&self, uid: &str) -> Option<&Pod> {
        self.pods.values().find(|p| !uid.is_empty() && p.uid == uid)
    }

    /// The namespace `name`.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    /// Every pod, ordered by namespace then name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// Every namespace, ordered by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// The names of the namespaces whose labels differ between `old` and `self` (including
    /// namespaces that appeared or went away).
    pub fn namespaces_relabelled(&self, old: &Cluster) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self
            .namespaces
            .keys()
            .chain(old.namespaces.keys())
            .filter(|n| self.namespace(n).map(|x| &x.labels) != old.namespace(n).map(|x| &x.labels))
            .collect();
        names.into_iter().cloned().collect()
    }
}

/// Why a directory of YAML could not be loaded. Nothing of it is used then.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory could not be listed.
    #[error("cannot list the pods directory {}: {source} (does it exist, and may the agent read it?)", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", file.display())]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A document is not valid YAML, or not a valid Pod or Namespace.
    #[error("{}, document {document}: {reason}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The document's position in the file, from 1.
        document: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The same object is defined twice.
    #[error("{kind} {key} is defined twice: {first} and {second}; keep one")]
    Duplicate {
        /// `Pod` or `Namespace`.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
        /// Where it was first seen (`file, document n`).
        first: String,
        /// Where it was seen again.
        second: String,
    },
}

/// Loads every `*.yaml` / `*.yml` file of `dir` (not recursively; hidden files skipped), in
/// name order.
pub fn load_dir(dir: &Path) -> Result<Cluster, LoadError> {
    let read_dir = |source| LoadError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if is_yaml_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    let mut loader = Loader::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::ReadFile {
            file: file.clone(),
            source,
        })?;
        loader.add_text(&file, &text)?;
    }
    Ok(loader.finish())
}

/// Whether `path` is a file the loader reads: `*.yaml` / `*.yml`, not hidden (editors' swap
/// and backup files are hidden or carry another extension).
pub fn is_yaml_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "yaml" || e == "yml");
    !hidden && yaml && path.is_file()
}

/// Parses the documents of one YAML text, as if it were the only file (`file` names it in
/// errors).
pub fn parse_text(file: &Path, text: &str) -> Result<Cluster, LoadError> {
    let mut loader = Loader::default();
    loader.add_text(file, text)?;
    Ok(loader.finish())
}

/// Accumulates objects and remembers where each came from.
#[derive(Default)]
struct Loader {
    pods: BTreeMap<(String, String), (Pod, String)>,
    namespaces: BTreeMap<String, (Namespace, String)>,
}

impl Loader {
    fn add_text(&mut self, file: &Path, text: &str) -> Result<(), LoadError> {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            let invalid = |reason: String| LoadError::Invalid {
                file: file.to_owned(),
                document,
                reason,
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| invalid(e.to_string()))?;
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("object")
                .to_owned();
            let object: RawObject = serde_yaml::from_value(value)
                .map_err(|e| invalid(format!("not a valid {kind}: {e}")))?;
            let at = format!("{}, document {document}", file.display());
            match object.kind.as_str() {
                "Pod" => {
                    let pod = object.into_pod().map_err(invalid)?;
                    let key = (pod.namespace.clone(), pod.name.clone());
                    if let Some((_, first)) = self.pods.get(&key) {
                        return Err(LoadError::Duplicate {
                            kind: "Pod",
                            key: pod.key(),
                            first: first.clone(),
                            second: at,
                        });
                    }
                    self.pods.insert(key, (pod, at));
                }
                "Namespace" => {
                    let ns = object.into_namespace().map_err(invalid)?;
                    if let Some((_, first)) = self.namespaces.get(&ns.name) {
                        return Err(LoadError::Duplicate {
                            kind: "Namespace",
                            key: ns.name,
                            first: first.clone(),
                            second: at,
                        });
                    }
                    self.namespaces.insert(ns.name.clone(), (ns, at));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn finish(self) -> Cluster {
        Cluster {
            pods: self.pods.into_iter().map(|(k, (p, _))| (k, p)).collect(),
            namespaces: self
                .namespaces
                .into_iter()
                .map(|(k, (n, _))| (k, n))
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<RawPodSpec>,
    #[serde(default)]
    status: Option<RawPodStatus>,
}

#[derive(Default, Deserialize)]
struct RawMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    service_account_name: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: String,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<RawPodIp>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

impl RawObject {
    fn check_common(&self, kind: &str) -> Result<(), String> {
        if self.api_version != "v1" {
            return Err(format!(
                "{kind} must have apiVersion v1, not {:?}",
                self.api_version
            ));
        }
        if self.metadata.name.is_empty() {
            return Err(format!("{kind} has no metadata.name"));
        }
        Ok(())
    }

    fn into_pod(self) -> Result<Pod, String> {
        self.check_common("Pod")?;
        let spec = self.spec.unwrap_or_default();
        let status = self.status.unwrap_or_default();
        let mut texts: Vec<String> = status.pod_ips.into_iter().map(|p| p.ip).collect();
        if texts.is_empty() && !status.pod_ip.is_empty() {
            texts.push(status.pod_ip);
        }
        let ips = texts
            .iter()
            .map(|t| {
                t.parse::<IpAddr>()
                    .map_err(|_| format!("status pod IP {t:?} is not an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let or = |s: String, default: &str| if s.is_empty() { default.to_owned() } else { s };
        Ok(Pod {
            name: self.metadata.name,
            namespace: or(self.metadata.namespace, DEFAULT_NAMESPACE),
            uid: self.metadata.uid,
            labels: self.metadata.labels.unwrap_or_default(),
            node_name: spec.node_name,
            host_network: spec.host_network,
            service_account: or(spec.service_account_name, DEFAULT_SERVICE_ACCOUNT),
            ips,
        })
    }

    fn into_namespace(self) -> Result<Namespace, String> {
        self.check_common("Namespace")?;
        Ok(Namespace {
            name: self.metadata.name,
            labels: self.metadata.labels.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: u-web
  labels: {app: web}
spec:
  nodeName: node1
  serviceAccountName: web-sa
status:
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: bare}
spec: {hostNetwork: true}
---
"#;

    #[test]
    fn reads_pods_and_namespaces_and_skips_other_kinds() {
        let c = parse_text(Path::new("a.yaml"), GOOD).unwrap();
        let web = c.pod("shop", "web").unwrap();
        assert_eq!(web.uid, "u-web");
        assert_eq!(web.node_name, "node1");
        assert_eq!(web.service_account, "web-sa");
        assert_eq!(web.label("app"), Some("web"));
        assert_eq!(web.ips.len(), 2);
        assert_eq!(
            c.pod_by_uid("u-web").map(Pod::key).as_deref(),
            Some("shop/web")
        );
        let bare = c.pod("default", "bare").unwrap();
        assert!(bare.host_network);
        assert_eq!(bare.service_account, "default");
        assert!(bare.ips.is_empty());
        assert_eq!(
            c.namespace("shop")
                .unwrap()
                .label("istio.io/dataplane-mode"),
            Some("ambient")
        );
        assert_eq!(c.pods().count(), 2);
    }

    #[test]
    fn invalid_documents_are_named() {
        let cases = [
            (
                "kind: Pod\napiVersion: v1\nmetadata: {name: [x]}\n",
                1,
                "not a valid Pod",
            ),
            (
                "---\nkind: Namespace\napiVersion: v1\nmetadata: {}\n",
                1,
                "no metadata.name",
            ),
            (
                "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Pod\napiVersion: v2\nmetadata: {name: p}\n",
                2,
                "apiVersion v1",
            ),
            (
                "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nstatus: {podIP: nope}\n",
                1,
                "not an IP",
            ),
            ("a: [\n", 1, ""),
        ];
        for (text, doc, needle) in cases {
            let err = parse_text(Path::new("bad.yaml"), text).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, LoadError::Invalid { document, .. } if document == doc),
                "{text}: {msg}"
            );
            assert!(msg.starts_with("bad.yaml, document"), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn directory_loading_names_the_file_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join(".swp.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "garbage: [").unwrap();
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(c.pods().count(), 2);

        std::fs::write(
            dir.path().join("b.yml"),
            "kind: Pod\napiVersion: v1\nmetadata: {name: web, namespace: shop}\n",
        )
        .unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("Pod shop/web is defined twice"), "{err}");
        assert!(err.contains("b.yml, document 1"), "{err}");

        std::fs::write(dir.path().join("b.yml"), "kind: Pod\n  bad: indentation\n").unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("b.yml, document 1"), "{err}");

        let err = load_dir(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot list the pods directory"), "{err}");
    }

    proptest::proptest! {
        /// Whatever the files hold, the loader answers with a snapshot or an error, never a
        /// panic; YAML-looking noise included.
        #[test]
        fn arbitrary_text_never_panics(
            text in "(kind: (Pod|Namespace)\n|apiVersion: v1\n|metadata: \\{name: [a-z\\[\\]]{0,3}\\}\n|status: \\{podIP: [0-9.:a-z]{0,8}\\}\n|---\n|[ -~]{0,12}\n){0,8}"
        ) {
            let _ = parse_text(Path::new("fuzz.yaml"), &text);
        }
    }

    #[test]
    fn relabelled_namespaces_are_found() {
        let ns = |name: &str, mode: Option<&str>| Namespace {
            name: name.into(),
            labels: mode
                .map(|m| [("istio.io/dataplane-mode".to_owned(), m.to_owned())].into())
                .unwrap_or_default(),
        };
        let old = Cluster::new([], [ns("a", None), ns("b", Some("ambient")), ns("c", None)]);
        let new = Cluster::new([], [ns("a", Some("ambient")), ns("b", None), ns("d", None)]);
        let mut got = new.namespaces_relabelled(&old);
        got.sort();
        assert_eq!(got, ["a", "b", "c", "d"]);
        assert!(new.namespaces_relabelled(&new).is_empty());
    }
}
