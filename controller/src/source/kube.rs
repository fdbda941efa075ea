//! The Kubernetes source: one watcher per [`Kind`] (the shared machinery in
//! [`zmesh_k8s::watch`]: list, watch, re-list after `410 Gone`, rate-limited errors with
//! hints, retries with backoff), feeding the [`Store`].
//!
//! A kind's (re-)list replaces it atomically in the store and marks it synced ([`Store::replace`]);
//! a watch `Apply` is a [`Store::upsert`], a `Delete` a [`Store::remove`].
//!
//! The CRD kinds (AuthorizationPolicy and the Gateway API kinds) may not be installed: a
//! `404` on their list marks the kind synced and empty ("treating as none"), so the
//! controller serves the rest of the cluster, and the watcher keeps retrying in the
//! background; once the CRD is installed, its objects arrive. A `404` on a built-in kind is
//! only an error: its kind stays unsynced (the API server is not what we expect).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Client, Resource};
use zmesh_k8s::{Sink, Watched, Watchers};

use super::Store;
use crate::translate::{AuthorizationPolicy, Kind, KubeObject, key_of};

pub use zmesh_k8s::watch::ERROR_LOG_INTERVAL;

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
        self.config(Kind::Pod, zmesh_k8s::watch::pods_on_node(node))
    }

    /// The watcher settings of `kind`.
    pub fn for_kind(&self, kind: Kind) -> watcher::Config {
        self.configs.get(&kind).cloned().unwrap_or_default()
    }
}

/// The running watchers; dropping it stops them.
#[derive(Debug)]
pub struct KubeSource {
    watchers: Watchers,
}

impl KubeSource {
    /// Starts one watcher per kind in `kinds`, writing into `store`. Must be called inside a
    /// tokio runtime. Wait for [`Store::is_synced`] before serving.
    pub fn spawn(client: Client, store: Store, kinds: &[Kind], options: &Options) -> KubeSource {
        let mut watchers = Watchers::new();
        for &kind in kinds {
            watch_kind(
                &mut watchers,
                client.clone(),
                store.clone(),
                kind,
                options.for_kind(kind),
            );
        }
        KubeSource { watchers }
    }

    /// Runs until every watcher has stopped, which they never do on their own (they retry
    /// every error); for a `main` that has nothing else to wait on.
    pub async fn join(self) {
        self.watchers.join().await;
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
        Kind::ReferenceGrant => Some("referencegrants.gateway.networking.k8s.io"),
        Kind::RequestAuthentication => Some("requestauthentications.security.istio.io"),
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice => None,
    }
}

/// Writes one kind's watch events into the store.
struct StoreSink<K> {
    store: Store,
    kind: Kind,
    wrap: fn(K) -> KubeObject,
}

impl<K: Resource + Send + 'static> Sink<K> for StoreSink<K> {
    fn replace(&mut self, objects: Vec<K>) {
        let objects = objects.into_iter().map(self.wrap).collect();
        self.store.replace(self.kind, objects);
    }

    fn upsert(&mut self, object: K) {
        self.store.upsert((self.wrap)(object));
    }

    fn remove(&mut self, object: &K) {
        self.store
            .remove(self.kind, &key_of(self.kind, object.meta()));
    }
}

fn watch_kind(
    watchers: &mut Watchers,
    client: Client,
    store: Store,
    kind: Kind,
    config: watcher::Config,
) {
    let watched = Watched {
        kind: kind.api().1,
        crd: crd_name(kind),
    };
    match kind {
        Kind::Namespace => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::Namespace,
            };
            watchers.watch(Api::<Namespace>::all(client), config, watched, sink);
        }
        Kind::Pod => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::Pod,
            };
            watchers.watch(Api::<Pod>::all(client), config, watched, sink);
        }
        Kind::Service => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::Service,
            };
            watchers.watch(Api::<Service>::all(client), config, watched, sink);
        }
        Kind::EndpointSlice => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::EndpointSlice,
            };
            watchers.watch(Api::<EndpointSlice>::all(client), config, watched, sink);
        }
        Kind::AuthorizationPolicy => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::AuthorizationPolicy,
            };
            let api = Api::<AuthorizationPolicy>::all(client);
            watchers.watch(api, config, watched, sink);
        }
        Kind::Gateway | Kind::HttpRoute | Kind::GrpcRoute | Kind::ReferenceGrant => {
            let (plural, wrap): (&str, fn(DynamicObject) -> KubeObject) = match kind {
                Kind::Gateway => ("gateways", KubeObject::Gateway),
                Kind::HttpRoute => ("httproutes", KubeObject::HttpRoute),
                Kind::ReferenceGrant => ("referencegrants", KubeObject::ReferenceGrant),
                _ => ("grpcroutes", KubeObject::GrpcRoute),
            };
            let sink = StoreSink { store, kind, wrap };
            watchers.watch(gateway_api(client, kind, plural), config, watched, sink);
        }
        Kind::RequestAuthentication => {
            let sink = StoreSink {
                store,
                kind,
                wrap: KubeObject::RequestAuthentication,
            };
            let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "RequestAuthentication");
            let ar = ApiResource::from_gvk_with_plural(&gvk, "requestauthentications");
            watchers.watch(Api::all_with(client, &ar), config, watched, sink);
        }
    }
}

/// An `Api` for a `gateway.networking.k8s.io` kind (at the version [`Kind::api`] names),
/// read as `DynamicObject`s.
fn gateway_api(client: Client, kind: Kind, plural: &str) -> Api<DynamicObject> {
    let (api_version, kind_name) = kind.api();
    let version = api_version.rsplit('/').next().unwrap_or("v1");
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", version, kind_name);
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, plural))
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
                Kind::GrpcRoute,
                Kind::ReferenceGrant,
                Kind::RequestAuthentication
            ]
        );
    }
}
