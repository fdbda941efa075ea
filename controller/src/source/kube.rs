//! The Kubernetes source: one kube-rs [`watcher`](kube::runtime::watcher()) per
//! [`Kind`], feeding the [`Store`].
//!
//! Each watcher lists its kind (paged), then watches from the list's `resourceVersion`, with
//! bookmarks. Its events map onto the store like this:
//!
//! - `Init` starts a buffer, `InitApply` fills it, and `InitDone` hands the whole buffer to
//!   [`Store::replace`]: the kind is replaced atomically and marked synced. A re-list (after a
//!   `410 Gone`, or a continue token that expired) goes through the same steps, so objects
//!   deleted while the watch was down disappear, and readers never see a half-listed kind;
//! - `Apply` is an [`Store::upsert`], `Delete` a [`Store::remove`].
//!
//! Errors never stop a watcher: each is logged with its reason (the first at once, then at
//! most one line per [`ERROR_LOG_INTERVAL`] per kind, with the count of those held back), and
//! the watcher retries with kube-rs' default backoff (0.8 s doubling to 30 s, jittered).
//!
//! The CRD kinds (AuthorizationPolicy and the Gateway API kinds) may not be installed: a
//! `404` on their list marks the kind synced and empty ("treating as none"), so the
//! controller serves the rest of the cluster, and the watcher keeps retrying in the
//! background; once the CRD is installed, its objects arrive. A `404` on a built-in kind is
//! only an error: its kind stays unsynced (the API server is not what we expect).

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Store;
use crate::translate::{AuthorizationPolicy, Kind, KubeObject, key_of};

/// At most one error line per kind in this interval (after the first).
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Watcher settings per kind; kinds without their own take `watcher::Config::default()`
/// (list pages of 500, bookmarks on, server-side watch timeout 290 s).
#[derive(Debug, Clone, Default)]
pub struct Options {
    configs: HashMap<Kind, watcher::Config>,
}

impl Options {
    /// Uses `config` for `kind` (selectors, page size, timeout).
    pub fn config(mut self, kind: Kind, config: watcher::Config) -> Self {
        self.configs.insert(kind, config);
        self
    }

    /// Watches only the pods scheduled on `node` (`fieldSelector=spec.nodeName=<node>`), as a
    /// node agent does.
    pub fn pods_on_node(self, node: &str) -> Self {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        self.config(Kind::Pod, config)
    }

    /// The watcher settings of `kind`.
    pub fn for_kind(&self, kind: Kind) -> watcher::Config {
        self.configs.get(&kind).cloned().unwrap_or_default()
    }
}

/// The running watchers; dropping it stops them.
#[derive(Debug)]
pub struct KubeSource {
    tasks: JoinSet<()>,
}

impl KubeSource {
    /// Starts one watcher per kind in `kinds`, writing into `store`. Must be called inside a
    /// tokio runtime. Wait for [`Store::is_synced`] before serving.
    pub fn spawn(client: Client, store: Store, kinds: &[Kind], options: &Options) -> KubeSource {
        let mut tasks = JoinSet::new();
        for &kind in kinds {
            let config = options.for_kind(kind);
            tasks.spawn(watch_kind(client.clone(), store.clone(), kind, config));
        }
        KubeSource { tasks }
    }

    /// Runs until every watcher has stopped, which they never do on their own (they retry
    /// every error); for a `main` that has nothing else to wait on.
    pub async fn join(mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                tracing::error!("a Kubernetes watcher panicked: {e}");
            }
        }
    }
}

/// Watches `kinds` with default settings into `store`, forever.
pub async fn run(client: Client, store: Store, kinds: &[Kind]) {
    KubeSource::spawn(client, store, kinds, &Options::default())
        .join()
        .await;
}

/// The CRD behind a kind, for kinds that come from a CRD (`None` for built-in kinds).
pub fn crd_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::AuthorizationPolicy => Some("authorizationpolicies.security.istio.io"),
        Kind::Gateway => Some("gateways.gateway.networking.k8s.io"),
        Kind::HttpRoute => Some("httproutes.gateway.networking.k8s.io"),
        Kind::GrpcRoute => Some("grpcroutes.gateway.networking.k8s.io"),
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice => None,
    }
}

async fn watch_kind(client: Client, store: Store, kind: Kind, config: watcher::Config) {
    match kind {
        Kind::Namespace => {
            follow(
                Api::<Namespace>::all(client),
                config,
                kind,
                store,
                KubeObject::Namespace,
            )
            .await
        }
        Kind::Pod => {
            follow(
                Api::<Pod>::all(client),
                config,
                kind,
                store,
                KubeObject::Pod,
            )
            .await
        }
        Kind::Service => {
            follow(
                Api::<Service>::all(client),
                config,
                kind,
                store,
                KubeObject::Service,
            )
            .await
        }
        Kind::EndpointSlice => {
            let api = Api::<EndpointSlice>::all(client);
            follow(api, config, kind, store, KubeObject::EndpointSlice).await
        }
        Kind::AuthorizationPolicy => {
            let api = Api::<AuthorizationPolicy>::all(client);
            follow(api, config, kind, store, KubeObject::AuthorizationPolicy).await
        }
        Kind::Gateway => {
            let api = gateway_api(client, kind, "gateways");
            follow(api, config, kind, store, KubeObject::Gateway).await
        }
        Kind::HttpRoute => {
            let api = gateway_api(client, kind, "httproutes");
            follow(api, config, kind, store, KubeObject::HttpRoute).await
        }
        Kind::GrpcRoute => {
            let api = gateway_api(client, kind, "grpcroutes");
            follow(api, config, kind, store, KubeObject::GrpcRoute).await
        }
    }
}

/// An `Api` for a `gateway.networking.k8s.io/v1` kind, read as `DynamicObject`s.
fn gateway_api(client: Client, kind: Kind, plural: &str) -> Api<DynamicObject> {
    let (_, kind_name) = kind.api();
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind_name);
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, plural))
}

/// Applies one watcher's events to the store, forever.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    store: Store,
    wrap: fn(K) -> KubeObject,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let (_, kind_name) = kind.api();
    let mut errors = ErrorLog::default();
    // `Some` from `Init` to `InitDone`: the objects of a (re-)list being collected.
    let mut listing: Option<Vec<KubeObject>> = None;
    let mut synced_once = false;
    // Whether the kind currently stands synced-as-empty because its CRD is missing.
    let mut absent = false;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(object)) => listing.get_or_insert_default().push(wrap(object)),
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                let count = objects.len();
                store.replace(kind, objects);
                if synced_once {
                    info!(kind = kind_name, objects = count, "re-listed");
                } else {
                    info!(kind = kind_name, objects = count, "initial list done");
                }
                if absent {
                    info!(
                        kind = kind_name,
                        crd = crd_name(kind),
                        "the CRD is installed now"
                    );
                }
                synced_once = true;
                absent = false;
                errors.recovered(kind_name);
            }
            Ok(Event::Apply(object)) => {
                debug!(kind = kind_name, name = ?object.meta().name, "applied");
                store.upsert(wrap(object));
            }
            Ok(Event::Delete(object)) => {
                debug!(kind = kind_name, name = ?object.meta().name, "deleted");
                store.remove(kind, &key_of(kind, object.meta()));
            }
            // A list that fails restarts with `Init` (which drops the partial buffer); an
            // error inside a streaming initial watch does not end it, so the buffer stays.
            Err(e) => {
                if let Some(crd) = crd_name(kind)
                    && is_not_found(&e)
                {
                    if !absent {
                        warn!(
                            kind = kind_name,
                            crd,
                            "{kind_name} CRD not installed; treating as none (retrying in the \
                             background: install {crd} and its objects will be read)"
                        );
                        store.replace(kind, Vec::new());
                        absent = true;
                    }
                    continue;
                }
                errors.log(kind_name, &e);
            }
        }
    }
}

/// Is this the API server saying the resource type does not exist (`404` on list or watch)?
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// What an operator should check for a watcher error.
fn hint(e: &watcher::Error) -> &'static str {
    if let watcher::Error::InitialListFailed(kube::Error::SerdeError(_))
    | watcher::Error::WatchFailed(kube::Error::SerdeError(_)) = e
    {
        return "an object of this kind does not parse as the controller reads it (a field it \
                does not know, from a newer CRD version?); until it is fixed or deleted, this \
                kind is not updated";
    }
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    match code {
        401 => "check the controller's service account token",
        403 => "check that the controller's ClusterRole allows list and watch on this resource",
        404 => "is this resource served by the API server?",
        410 => "the watch fell behind the API server's history; re-listing",
        _ => "retrying with backoff; check that the API server is reachable",
    }
}

/// Rate-limited error logging for one watcher.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn log(&mut self, kind: &str, e: &watcher::Error) {
        // An expired watch is routine (the API server keeps a few minutes of history).
        if let watcher::Error::WatchError(s) = e
            && s.code == 410
        {
            info!(kind, reason = %s.message, "watch expired (410 Gone); re-listing");
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            kind,
            error = %e,
            hint = hint(e),
            similar_errors_not_logged = self.suppressed,
            "watching Kubernetes failed"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }

    fn recovered(&mut self, kind: &str) {
        if self.last.take().is_some() {
            info!(kind, "watching Kubernetes works again");
        }
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_and_override() {
        let o = Options::default().pods_on_node("n1");
        assert_eq!(
            o.for_kind(Kind::Pod).field_selector.as_deref(),
            Some("spec.nodeName=n1")
        );
        assert_eq!(o.for_kind(Kind::Service), watcher::Config::default());
    }

    #[test]
    fn only_crd_kinds_may_be_absent() {
        let crds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| crd_name(*k).is_some())
            .collect();
        assert_eq!(
            crds,
            [
                Kind::AuthorizationPolicy,
                Kind::Gateway,
                Kind::HttpRoute,
                Kind::GrpcRoute
            ]
        );
    }

    #[test]
    fn not_found_is_list_or_watch_start_404() {
        let status = |code| {
            Box::new(kube::core::Status {
                code,
                ..Default::default()
            })
        };
        let list404 = watcher::Error::InitialListFailed(kube::Error::Api(status(404)));
        assert!(is_not_found(&list404));
        let list403 = watcher::Error::InitialListFailed(kube::Error::Api(status(403)));
        assert!(!is_not_found(&list403));
        assert!(hint(&list403).contains("ClusterRole"));
        let gone = watcher::Error::WatchError(status(410));
        assert!(!is_not_found(&gone));
    }
}
