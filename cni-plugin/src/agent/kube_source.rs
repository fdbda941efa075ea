//! The Kubernetes API as the agent's [`PodSource`]: watchers ([`zmesh_k8s::watch`], the
//! machinery the controller uses too) for Namespaces and for the Pods of this node only
//! (`fieldSelector=spec.nodeName=<node>`), into a mirror whose every change is turned into a
//! new [`Cluster`] snapshot.
//!
//! [`KubePodSource::start`] returns only once both kinds have had their initial list, so the
//! agent never decides on a half-loaded cluster (a pod missing from the snapshot would be
//! answered "unknown pod" and retried, but a missing namespace label would skip the pod). The
//! watchers re-list after `410 Gone` and retry every error with backoff, logging the reason.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1 as k8s;
use kube::Resource;
use kube::api::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use zmesh_k8s::{ObjectKey, Sink, Watched, Watchers, object_key};

use super::cluster::{Cluster, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT, Namespace, Pod};
use super::source::PodSource;

/// How often [`KubePodSource::start`] reports that it is still waiting for the initial list.
const WAITING_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A [`PodSource`] fed by the Kubernetes API. Stops watching when dropped.
pub struct KubePodSource {
    tx: Arc<watch::Sender<Arc<Cluster>>>,
    _watchers: Watchers,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for KubePodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodSource").finish_non_exhaustive()
    }
}

impl KubePodSource {
    /// Watches the namespaces and `node`'s pods through `client`, and returns once both have
    /// had their initial list (waiting as long as that takes; the watchers log why it does
    /// not happen, and so does this every 10 s).
    pub async fn start(client: kube::Client, node: &str) -> KubePodSource {
        let mirror = Mirror::default();
        let mut watchers = Watchers::new();
        watchers.watch(
            Api::<k8s::Namespace>::all(client.clone()),
            Default::default(),
            Watched {
                kind: "Namespace",
                crd: None,
            },
            KindSink {
                mirror: mirror.clone(),
                part: |o| (&mut o.namespaces, &mut o.namespaces_listed),
                namespaced: false,
            },
        );
        watchers.watch(
            Api::<k8s::Pod>::all(client),
            zmesh_k8s::watch::pods_on_node(node),
            Watched {
                kind: "Pod",
                crd: None,
            },
            KindSink {
                mirror: mirror.clone(),
                part: |o| (&mut o.pods, &mut o.pods_listed),
                namespaced: true,
            },
        );
        let mut changes = mirror.changes.subscribe();
        let started = tokio::time::Instant::now();
        while !mirror.read(|o| o.namespaces_listed && o.pods_listed) {
            if tokio::time::timeout(WAITING_LOG_INTERVAL, changes.changed())
                .await
                .is_err()
            {
                warn!(
                    node,
                    waited_s = started.elapsed().as_secs(),
                    "still waiting for the first list of pods and namespaces from the \
                     Kubernetes API (see the watcher errors above)"
                );
            }
        }
        changes.borrow_and_update();
        let first = mirror.read(snapshot);
        info!(
            node,
            pods = first.pods().count(),
            namespaces = first.namespaces().count(),
            "listed this node's pods and the namespaces from the Kubernetes API"
        );
        let tx = Arc::new(watch::Sender::new(Arc::new(first)));
        let task = tokio::spawn(follow(mirror, changes, tx.clone()));
        KubePodSource {
            tx,
            _watchers: watchers,
            task,
        }
    }
}

impl Drop for KubePodSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodSource for KubePodSource {
    fn subscribe(&self) -> watch::Receiver<Arc<Cluster>> {
        self.tx.subscribe()
    }
}

/// The namespaces and this node's pods as the watchers last reported them.
#[derive(Debug, Default)]
struct Objects {
    namespaces: BTreeMap<ObjectKey, k8s::Namespace>,
    pods: BTreeMap<ObjectKey, k8s::Pod>,
    /// Whether each kind has had its initial list.
    namespaces_listed: bool,
    pods_listed: bool,
}

/// [`Objects`] shared by the two watchers (writers) and [`follow`] (reader), with a counter
/// bumped on every change.
#[derive(Clone)]
struct Mirror {
    objects: Arc<Mutex<Objects>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Mirror {
    fn default() -> Self {
        Mirror {
            objects: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Mirror {
    fn read<T>(&self, f: impl FnOnce(&Objects) -> T) -> T {
        f(&self.objects.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn write(&self, f: impl FnOnce(&mut Objects)) {
        f(&mut self.objects.lock().unwrap_or_else(|e| e.into_inner()));
        self.changes.send_modify(|g| *g += 1);
    }
}

/// The map and the listed flag of one kind in [`Objects`].
type Part<K> = for<'a> fn(&'a mut Objects) -> (&'a mut BTreeMap<ObjectKey, K>, &'a mut bool);

/// Writes one watcher's events into its part of the mirror.
struct KindSink<K> {
    mirror: Mirror,
    part: Part<K>,
    namespaced: bool,
}

impl<K: Resource + Send + 'static> Sink<K> for KindSink<K> {
    fn replace(&mut self, objects: Vec<K>) {
        let namespaced = self.namespaced;
        self.mirror.write(|o| {
            let (map, listed) = (self.part)(o);
            *map = objects
                .into_iter()
                .map(|x| (object_key(x.meta(), namespaced), x))
                .collect();
            *listed = true;
        });
    }

    fn upsert(&mut self, object: K) {
        let key = object_key(object.meta(), self.namespaced);
        self.mirror
            .write(|o| drop((self.part)(o).0.insert(key, object)));
    }

    fn remove(&mut self, object: &K) {
        let key = object_key(object.meta(), self.namespaced);
        self.mirror.write(|o| drop((self.part)(o).0.remove(&key)));
    }
}

/// Publishes a new snapshot whenever the mirror changes it.
async fn follow(
    mirror: Mirror,
    mut changes: watch::Receiver<u64>,
    tx: Arc<watch::Sender<Arc<Cluster>>>,
) {
    while changes.changed().await.is_ok() {
        changes.borrow_and_update();
        let new = mirror.read(snapshot);
        tx.send_if_modified(|current| {
            if **current == new {
                return false;
            }
            *current = Arc::new(new);
            true
        });
    }
}

/// The agent's view of the mirrored objects.
fn snapshot(objects: &Objects) -> Cluster {
    Cluster::new(
        objects.pods.values().map(pod),
        objects.namespaces.values().map(|ns| Namespace {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        }),
    )
}

/// The facts the agent keeps of a Kubernetes pod (as [`super::cluster`] reads them from YAML).
pub fn pod(p: &k8s::Pod) -> Pod {
    let meta = &p.metadata;
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let mut texts: Vec<String> = status
        .pod_ips
        .unwrap_or_default()
        .into_iter()
        .map(|ip| ip.ip)
        .collect();
    if texts.is_empty() {
        texts.extend(status.pod_ip.filter(|ip| !ip.is_empty()));
    }
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let ips = texts
        .iter()
        .filter_map(|t| match t.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                warn!(pod = %format!("{namespace}/{name}"), ip = %t, "ignoring a pod IP that is not an IP address");
                None
            }
        })
        .collect();
    Pod {
        name,
        namespace,
        uid: meta.uid.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        node_name: spec.node_name.unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
        service_account: spec
            .service_account_name
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
        ips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_convert_like_the_yaml_loader_reads_them() {
        let p: k8s::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": []},
            "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}, {"ip": "bad"}]}
        }))
        .unwrap();
        let got = pod(&p);
        assert_eq!(got.key(), "default/web");
        assert_eq!(got.uid, "u1");
        assert_eq!(got.node_name, "n1");
        assert!(got.host_network);
        assert_eq!(got.service_account, "default");
        assert_eq!(got.label("app"), Some("web"));
        assert_eq!(
            got.ips,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        // Only podIP: used.
        let p: k8s::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x"},
            "spec": {"serviceAccountName": "sa", "containers": []},
            "status": {"podIP": "10.0.0.6"}
        }))
        .unwrap();
        let got = pod(&p);
        assert_eq!(got.service_account, "sa");
        assert_eq!(got.ips, ["10.0.0.6".parse::<IpAddr>().unwrap()]);
        assert!(pod(&k8s::Pod::default()).ips.is_empty());
    }
}
