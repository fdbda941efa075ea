//! Kubernetes mode only: every accepted waypoint Gateway (class `istio-waypoint`, see
//! `translate::waypoint`) gets its ServiceAccount, Deployment and Service ([`objects`]), and
//! its namespace the mesh root's ConfigMap `istio-ca-root-cert` its pod mounts, as
//! istiod's gateway deployment controller makes them: server-side apply with our field
//! manager and `force` (we own these objects' fields), re-applied whenever what they should
//! be changes (the Gateway's listener name, its `spec.infrastructure` labels, the controller's
//! waypoint flags). Nothing is deleted: the objects are owned by the Gateway, so the garbage
//! collector removes them with it. A Gateway that is rejected, or of another class, gets
//! nothing.
//!
//! A failed apply (a `403` because the ClusterRole lacks a grant, a `422` because the API
//! server refuses an object) is logged and kept as the Gateway's [`DeployError`], which its
//! status shows (`Programmed=False`, `status/gateway.rs`) with what to fix; it is retried on
//! the next change and every [`RETRY_AFTER`] until it succeeds.
//!
//! Not done (istiod does it): watching the created objects to undo others' edits (an apply
//! only follows a change of what they should be, or a controller restart); the root
//! ConfigMap is published only where a waypoint is (istiod: in every namespace).

pub mod objects;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub use objects::{
    GatewayInfo, WaypointTemplate, default_image, root_cert_config_map, waypoint_objects,
};

use crate::source::Store;
use crate::translate::{MeshConfig, Objects, Waypoints};

/// The field manager of our applies (istiod's is `istio.io/gateway-controller`).
pub const FIELD_MANAGER: &str = "zmesh-controller";
/// How soon a failed apply is retried without any change.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

type Key = (String, String);

/// Why a waypoint's objects are not (all) in place; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    /// RBAC refused the controller (`403`).
    #[error(
        "the controller may not create the waypoint's {kind} {name}: {message}; grant \
         zmesh-controller `create` and `patch` on it in its ClusterRole \
         (manifests/controller/rbac.yaml)"
    )]
    Forbidden {
        kind: String,
        name: String,
        message: String,
    },
    /// The API server refused the object (`422`, `400`, `409`).
    #[error(
        "the API server refused the waypoint's {kind} {name}: {message}; check the Gateway's \
         name and spec.infrastructure labels and annotations (they are copied to it)"
    )]
    Invalid {
        kind: String,
        name: String,
        message: String,
    },
    /// Anything else (the API server unreachable, `5xx`): retried.
    #[error("applying the waypoint's {kind} {name} failed: {message}; retrying")]
    Failed {
        kind: String,
        name: String,
        message: String,
    },
}

impl DeployError {
    /// The Gateway API reason of the `Programmed=False` condition it causes.
    pub fn reason(&self) -> &'static str {
        match self {
            DeployError::Forbidden { .. } => "NoResources",
            DeployError::Invalid { .. } => "Invalid",
            DeployError::Failed { .. } => "Pending",
        }
    }

    fn from_kube(object: &Value, e: kube::Error) -> DeployError {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = format!(
            "{}/{}",
            object["metadata"]["namespace"].as_str().unwrap_or_default(),
            object["metadata"]["name"].as_str().unwrap_or_default()
        );
        match e {
            kube::Error::Api(s) if s.code == 403 => DeployError::Forbidden {
                kind,
                name,
                message: s.message,
            },
            kube::Error::Api(s) if matches!(s.code, 400 | 409 | 422) => DeployError::Invalid {
                kind,
                name,
                message: s.message,
            },
            other => DeployError::Failed {
                kind,
                name,
                message: other.to_string(),
            },
        }
    }
}

/// What the deployer last queued and how each Gateway's last apply went.
#[derive(Default)]
struct Shared {
    /// The objects last queued per Gateway (a failed apply is forgotten, so it is retried).
    queued: BTreeMap<Key, Vec<Value>>,
    failures: BTreeMap<Key, DeployError>,
}

/// Applies each waypoint's objects through the Kubernetes API, on its own task.
#[derive(Clone)]
pub struct WaypointDeployer {
    template: WaypointTemplate,
    mesh: MeshConfig,
    /// The mesh root, PEM.
    root_pem: String,
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<(Key, Vec<Value>)>,
}

impl std::fmt::Debug for WaypointDeployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaypointDeployer")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl WaypointDeployer {
    /// Starts the apply task on `client`; `root_pem` is the mesh root the waypoints verify
    /// the controller with. An outcome that changes a Gateway's status bumps `store`, so the
    /// reconciler writes it.
    pub fn spawn(
        client: kube::Client,
        template: WaypointTemplate,
        mesh: MeshConfig,
        root_pem: String,
        store: Store,
    ) -> WaypointDeployer {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx, shared.clone(), store));
        WaypointDeployer {
            template,
            mesh,
            root_pem,
            shared,
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the applies whose objects differ from what was last queued, for every valid
    /// waypoint; forgets Gateways that are gone or no longer valid.
    pub fn sync(&self, objects: &Objects, waypoints: &Waypoints) {
        let mut shared = self.lock();
        shared.queued.retain(|k, _| waypoints.valid.contains_key(k));
        shared
            .failures
            .retain(|k, _| waypoints.valid.contains_key(k));
        for key in waypoints.valid.keys() {
            let Some(info) = objects
                .gateways
                .get(key)
                .and_then(GatewayInfo::from_gateway)
            else {
                continue;
            };
            let mut want = vec![root_cert_config_map(&info.namespace, &self.root_pem)];
            want.extend(waypoint_objects(&info, &self.template, &self.mesh));
            if shared.queued.get(key) != Some(&want) {
                shared.queued.insert(key.clone(), want.clone());
                let _ = self.tx.send((key.clone(), want));
            }
        }
    }

    /// The Gateways whose last apply failed, and why.
    pub fn failures(&self) -> BTreeMap<Key, DeployError> {
        self.lock().failures.clone()
    }
}

async fn run(
    client: kube::Client,
    mut rx: mpsc::UnboundedReceiver<(Key, Vec<Value>)>,
    shared: Arc<Mutex<Shared>>,
    store: Store,
) {
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((key, want)) = rx.recv().await {
        // A newer version of these objects is queued behind this one: apply that instead.
        if lock().queued.get(&key) != Some(&want) {
            continue;
        }
        let gateway = format!("{}/{}", key.0, key.1);
        let result = apply_all(&client, &want).await;
        let changed = {
            let mut s = lock();
            match result {
                Ok(()) => {
                    info!(%gateway, "waypoint ServiceAccount, Deployment and Service applied");
                    s.failures.remove(&key).is_some()
                }
                Err(e) => {
                    // Once per new error; its retries every RETRY_AFTER only at debug.
                    if s.failures.get(&key) != Some(&e) {
                        warn!(%gateway, error = %e, "creating the waypoint failed");
                    } else {
                        debug!(%gateway, error = %e, "creating the waypoint failed again");
                    }
                    if s.queued.get(&key) == Some(&want) {
                        s.queued.remove(&key);
                    }
                    let store = store.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RETRY_AFTER).await;
                        store.touch();
                    });
                    s.failures.insert(key, e.clone()) != Some(e)
                }
            }
        };
        if changed {
            store.touch();
        }
    }
}

/// Server-side applies the objects in order; the first failure stops.
async fn apply_all(client: &kube::Client, objects: &[Value]) -> Result<(), DeployError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for object in objects {
        let (group, version) = match object["apiVersion"].as_str().unwrap_or("v1") {
            gv if gv.contains('/') => gv.split_once('/').expect("checked"),
            v => ("", v),
        };
        let kind = object["kind"].as_str().unwrap_or_default();
        let plural = match kind {
            "ConfigMap" => "configmaps",
            "ServiceAccount" => "serviceaccounts",
            "Deployment" => "deployments",
            _ => "services",
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        api.patch(name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| DeployError::from_kube(object, e))?;
        debug!(kind, %namespace, name, "applied");
    }
    Ok(())
}
