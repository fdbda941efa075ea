//! The agent's record of the pods it has seen through CNI ADD: in memory (with each enrolled
//! pod's open netns, which feeds the ZDS snapshot) and in a JSON state file rewritten
//! atomically (temporary file, `fsync`, `rename`) on every change, so that a restarted agent
//! can give a reconnecting ztunnel the same pods.
//!
//! # What a restart trusts and what it checks again
//!
//! [`StateStore::open`] reads the file and, for each record:
//! - **re-checks** that the netns path still exists (else the pod is gone: dropped);
//! - **re-checks**, by entering the netns on a thread and listing its addresses
//!   (`getifaddrs`), that it holds one of the recorded pod IPs (else the path now belongs to
//!   another sandbox: dropped). A record without IPs skips this check;
//! - **trusts** the pod's identity (uid, name, namespace, service account) and whether it was
//!   enrolled: the running pod's labels are checked again by the agent's reconciliation when the
//!   pod source is read, not here;
//! - a netns that exists but cannot be opened is kept **without** a descriptor: ztunnel is
//!   sent `KeepWorkload` for it (so it keeps serving the pod) instead of `AddWorkload`; one that
//!   opens but cannot be entered (missing `CAP_SYS_ADMIN`) is kept unverified, with a warning.
//!
//! The in-pod rules are not inspected: they live in the pod netns and survive the agent.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zmesh_core::zds::{SnapshotEntry, WorkloadInfo};

/// The name of the state file in the agent's run directory.
pub const STATE_FILE: &str = "pods.json";
/// The version written in the state file.
const VERSION: u32 = 1;

/// One pod the agent has seen through CNI ADD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// `metadata.uid`: the pod's name towards ztunnel.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Service account (the pod's identity with the namespace).
    pub service_account: String,
    /// The pod's network namespace file (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from the CNI result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The sandbox id (`CNI_CONTAINERID`), to match a DEL without a uid.
    #[serde(default)]
    pub container_id: String,
    /// Whether the pod is enrolled (rules in place, ztunnel acknowledged). Pods that were
    /// skipped are kept too, so that a namespace gaining the label can enrol them.
    pub enrolled: bool,
}

impl PodRecord {
    /// Who the pod is, as ZDS says it.
    pub fn workload_info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    pods: Vec<PodRecord>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading failed (other than "does not exist", which is an empty state).
    #[error("cannot read the agent state file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a state file of this version.
    #[error(
        "the agent state file {} is corrupt ({reason}); move it away to start with no pods \
         (running pods are then only enrolled again by their next CNI ADD)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing failed.
    #[error(
        "cannot write the agent state file {}: {source} (is the run directory writable and \
         the disk not full?)",
        path.display()
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

struct Entry {
    record: PodRecord,
    /// The open netns of an enrolled pod; `None`: unknown (snapshot sends Keep).
    netns: Option<Arc<File>>,
}

/// The pods the agent has seen, persisted to a state file (or not: [`StateStore::in_memory`]).
pub struct StateStore {
    path: Option<PathBuf>,
    pods: Mutex<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .field("pods", &self.lock().len())
            .finish()
    }
}

impl StateStore {
    /// A store that is never written to disk.
    pub fn in_memory() -> StateStore {
        StateStore {
            path: None,
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reads the state file at `path` (missing: empty), re-checks every record as the module
    /// docs say, and writes back what remains.
    pub fn open(path: &Path) -> Result<StateStore, StateError> {
        let records = match std::fs::read(path) {
            Ok(bytes) => {
                let file: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                if file.version != VERSION {
                    return Err(StateError::Corrupt {
                        path: path.to_owned(),
                        reason: format!("version {} (this agent reads {VERSION})", file.version),
                    });
                }
                file.pods
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut pods = BTreeMap::new();
        for record in records {
            if let Some(netns) = recheck(&record) {
                pods.insert(record.uid.clone(), Entry { record, netns });
            }
        }
        info!(path = %path.display(), pods = pods.len(), "restored the agent state");
        let store = StateStore {
            path: Some(path.to_owned()),
            pods: Mutex::new(pods),
        };
        store.persist()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record of pod `uid`.
    pub fn get(&self, uid: &str) -> Option<PodRecord> {
        self.lock().get(uid).map(|e| e.record.clone())
    }

    /// The record that matches a CNI DEL: by uid if given, else by sandbox id, else by
    /// namespace and name.
    pub fn find(
        &self,
        uid: &str,
        container_id: &str,
        namespace: &str,
        name: &str,
    ) -> Option<PodRecord> {
        let pods = self.lock();
        if !uid.is_empty() {
            return pods.get(uid).map(|e| e.record.clone());
        }
        pods.values()
            .map(|e| &e.record)
            .find(|r| {
                if container_id.is_empty() {
                    r.namespace == namespace && r.name == name
                } else {
                    r.container_id == container_id
                }
            })
            .cloned()
    }

    /// Every record, by uid.
    pub fn records(&self) -> Vec<PodRecord> {
        self.lock().values().map(|e| e.record.clone()).collect()
    }

    /// The open netns of pod `uid`, if the agent holds it.
    pub fn netns(&self, uid: &str) -> Option<Arc<File>> {
        self.lock().get(uid).and_then(|e| e.netns.clone())
    }

    /// Adds or replaces a record (in memory; [`StateStore::persist`] writes it).
    pub fn insert(&self, record: PodRecord, netns: Option<Arc<File>>) {
        self.lock()
            .insert(record.uid.clone(), Entry { record, netns });
    }

    /// Removes a record (in memory).
    pub fn remove(&self, uid: &str) -> Option<PodRecord> {
        self.lock().remove(uid).map(|e| e.record)
    }

    /// Writes every record to the state file atomically (no-op for an in-memory store).
    pub fn persist(&self) -> Result<(), StateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let pods = self.lock();
        let file = StateFile {
            version: VERSION,
            pods: pods.values().map(|e| e.record.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Write {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomically(path, &json).map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }

    /// The ZDS snapshot: every enrolled pod, `Add` with a duplicate of its netns descriptor,
    /// or `Keep` when the agent holds none (or cannot duplicate it).
    pub fn snapshot(&self) -> Vec<SnapshotEntry> {
        let pods = self.lock();
        pods.values()
            .filter(|e| e.record.enrolled)
            .map(|e| {
                let uid = e.record.uid.clone();
                match e.netns.as_ref().map(|f| f.as_fd().try_clone_to_owned()) {
                    Some(Ok(netns)) => SnapshotEntry::Add {
                        uid,
                        info: e.record.workload_info(),
                        netns,
                    },
                    Some(Err(err)) => {
                        warn!(uid, "cannot duplicate the pod's netns descriptor: {err}");
                        SnapshotEntry::Keep { uid }
                    }
                    None => SnapshotEntry::Keep { uid },
                }
            })
            .collect()
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Re-checks a restored record: `None` drops it; `Some(fd)` keeps it, with the netns if it
/// could be opened.
fn recheck(record: &PodRecord) -> Option<Option<Arc<File>>> {
    let pod = record.key();
    if !record.netns.exists() {
        info!(%pod, netns = %record.netns.display(), "forgetting a pod whose netns is gone");
        return None;
    }
    let file = match File::open(&record.netns) {
        Ok(f) => f,
        Err(e) => {
            warn!(%pod, netns = %record.netns.display(), "cannot open the pod's netns ({e}); ztunnel will be told to keep it");
            return Some(None);
        }
    };
    if record.ips.is_empty() {
        return Some(Some(Arc::new(file)));
    }
    match netns_addresses(&file) {
        Ok(addrs) if record.ips.iter().any(|ip| addrs.contains(ip)) => Some(Some(Arc::new(file))),
        Ok(addrs) => {
            info!(
                %pod, netns = %record.netns.display(), ?addrs, ips = ?record.ips,
                "forgetting a pod: its netns path now holds none of its IPs"
            );
            None
        }
        Err(e) => {
            warn!(%pod, netns = %record.netns.display(), "cannot list the addresses in the pod's netns ({e}); keeping it unverified");
            Some(Some(Arc::new(file)))
        }
    }
}

/// The addresses configured in the network namespace `netns`, listed from a thread that
/// enters it (needs `CAP_SYS_ADMIN`).
pub fn netns_addresses(netns: &File) -> std::io::Result<Vec<IpAddr>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut out = Vec::new();
            for ifa in nix::ifaddrs::getifaddrs()? {
                let Some(addr) = ifa.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    out.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    out.push(IpAddr::V6(v6.ip()));
                }
            }
            Ok(out)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the address listing thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str, netns: &Path, enrolled: bool) -> PodRecord {
        PodRecord {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            service_account: "sa".into(),
            netns: netns.to_owned(),
            ips: Vec::new(),
            container_id: format!("c-{uid}"),
            enrolled,
        }
    }

    #[test]
    fn persists_and_restores_only_pods_whose_netns_exists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let alive = dir.path().join("netns-alive");
        std::fs::write(&alive, "").unwrap();
        let store = StateStore::open(&path).unwrap();
        assert!(store.records().is_empty());
        store.insert(record("a", &alive, true), None);
        store.insert(record("b", &dir.path().join("gone"), true), None);
        store.insert(record("c", &alive, false), None);
        store.persist().unwrap();
        assert!(!dir.path().join("pods.json.tmp").exists());

        let restored = StateStore::open(&path).unwrap();
        let uids: Vec<String> = restored.records().into_iter().map(|r| r.uid).collect();
        assert_eq!(uids, ["a", "c"]);
        assert!(restored.netns("a").is_some());
        // Only enrolled pods are in the snapshot, with their netns.
        let snap = restored.snapshot();
        assert_eq!(snap.len(), 1);
        assert!(matches!(&snap[0], SnapshotEntry::Add { uid, .. } if uid == "a"));
        // The file was rewritten without the gone pod.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"b\""), "{text}");

        assert_eq!(restored.find("", "c-c", "", "").unwrap().uid, "c");
        assert_eq!(restored.find("", "", "shop", "pod-a").unwrap().uid, "a");
        assert_eq!(restored.find("a", "c-c", "", "").unwrap().uid, "a");
        assert!(restored.find("zz", "", "", "").is_none());
        assert_eq!(restored.remove("a").unwrap().uid, "a");
        assert!(restored.snapshot().is_empty());
    }

    #[test]
    fn pods_without_a_netns_descriptor_are_kept() {
        let store = StateStore::in_memory();
        store.insert(record("a", Path::new("/nonexistent"), true), None);
        let snap = store.snapshot();
        assert!(matches!(&snap[0], SnapshotEntry::Keep { uid } if uid == "a"));
        store.persist().unwrap();
    }

    #[test]
    fn corrupt_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, "{not json").unwrap();
        let err = StateStore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("is corrupt") && err.contains("move it away"),
            "{err}"
        );
        std::fs::write(&path, r#"{"version": 9, "pods": []}"#).unwrap();
        let err = StateStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn own_netns_lists_loopback_when_permitted() {
        let own = File::open("/proc/self/ns/net").unwrap();
        // Entering one's own netns needs CAP_SYS_ADMIN; without it, the error is reported.
        match netns_addresses(&own) {
            Ok(addrs) => assert!(addrs.iter().any(IpAddr::is_loopback), "{addrs:?}"),
            Err(e) => assert!(e.kind() == std::io::ErrorKind::PermissionDenied, "{e}"),
        }
    }
}
