//! From the [`Store`] to the xDS [`Cache`]: waits until every kind has had its initial list,
//! then, after each burst of changes (debounced), translates the objects and hands the cache
//! only the resources whose content changed and the names that disappeared. One pod change
//! therefore pushes only that pod's Workload (and whatever else really changed), however big
//! the cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use prost_types::Any;
use tracing::{debug, info, warn};
use xds_proto::istio::workload::{Address, Workload, address};
use xds_proto::{
    BOUND_SERVICE_TYPE_URL, SERVICE_AUTHN_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
};

use crate::ads::Cache;
use crate::deploy::WaypointDeployer;
use crate::source::{Changes, Store};
use crate::status::{StatusWriter, desired_updates};
use crate::translate::route::service_routes;
use crate::translate::{Kind, MeshConfig, Objects, Translated, translate, translate_pods};

/// Type URL of workloads and services.
pub const ADDRESS_TYPE: &str = xds_proto::ADDRESS_TYPE_URL;
/// Type URL of authorization policies.
pub const AUTHORIZATION_TYPE: &str = xds_proto::AUTHORIZATION_TYPE_URL;

/// Default quiet time after a change before translating (bursts become one push).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// What the last pass did (for logs, `/debug` and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Store generation the pass translated.
    pub generation: u64,
    /// Address resources (workloads + services) in force.
    pub addresses: usize,
    /// Authorization resources in force.
    pub authorizations: usize,
    /// Resources upserted into the cache (changed content).
    pub changed: usize,
    /// Resources removed from the cache.
    pub removed: usize,
    /// Time spent translating.
    pub translate: Duration,
    /// Time spent diffing and applying to the cache.
    pub apply: Duration,
    /// Only the changed Pods were translated (nothing but Pods changed since the last pass).
    pub incremental: bool,
}

/// Translates the store into the cache.
pub struct Reconciler {
    store: Store,
    cache: Cache,
    mesh: MeshConfig,
    debounce: Duration,
    /// What the cache holds, as last translated (diffed against the next translation).
    last: Translated,
    /// `last` is a translation of the store (false until the first pass).
    translated: bool,
    stats: Arc<Mutex<PassStats>>,
    /// Where policy status goes (Kubernetes source only).
    status: Option<StatusWriter>,
    /// What creates waypoints' objects (Kubernetes source only).
    deployer: Option<WaypointDeployer>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler from `store` into `cache`.
    pub fn new(store: Store, cache: Cache, mesh: MeshConfig) -> Self {
        Reconciler {
            store,
            cache,
            mesh,
            debounce: DEFAULT_DEBOUNCE,
            last: Translated::default(),
            translated: false,
            stats: Arc::default(),
            status: None,
            deployer: None,
        }
    }

    /// Sets the debounce (quiet time before translating).
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Writes each AuthorizationPolicy's `ZtunnelAccepted` condition through `writer`.
    pub fn with_status(mut self, writer: StatusWriter) -> Self {
        self.status = Some(writer);
        self
    }

    /// Creates each valid waypoint's ServiceAccount, Deployment and Service through
    /// `deployer`; its failures go to the Gateways' status.
    pub fn with_deployer(mut self, deployer: WaypointDeployer) -> Self {
        self.deployer = Some(deployer);
        self
    }

    /// A handle on the statistics of the latest pass.
    pub fn stats(&self) -> Arc<Mutex<PassStats>> {
        self.stats.clone()
    }

    /// Runs until the store is dropped.
    pub async fn run(mut self) {
        let mut changes = self.store.subscribe();
        let mut waiting_logged = false;
        loop {
            if !self.store.is_synced(&Kind::ALL) {
                if !waiting_logged {
                    info!("waiting for every kind's initial list before serving any config");
                    waiting_logged = true;
                }
            } else {
                tokio::time::sleep(self.debounce).await;
                changes.borrow_and_update();
                self.pass();
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waypoint objects and statuses for `translated` (a translation of `objects`).
    fn side_effects(&self, objects: &Objects, translated: &Translated) {
        if let Some(deployer) = &self.deployer {
            deployer.sync(objects, &translated.waypoints);
        }
        if let Some(writer) = &self.status {
            writer.write(objects, desired_updates(objects, translated));
            let failures = self
                .deployer
                .as_ref()
                .map(WaypointDeployer::failures)
                .unwrap_or_default();
            writer.write_gateways(objects, &translated.waypoints, &failures);
            writer.write_routes(objects, &translated.routes);
        }
    }

    /// One translation and cache update, now. Returns what it did.
    ///
    /// When nothing but Pods changed since the previous pass, only those Pods are translated
    /// ([`translate_pods`]: Pods feed nothing but their own workloads), and only their
    /// workloads are compared; otherwise everything is translated and compared.
    pub fn pass(&mut self) -> PassStats {
        let start = Instant::now();
        let (generation, next) = {
            let (objects, changes) = self.store.read_changes();
            if self.translated
                && changes.only_pods()
                && let Changes::Keys(keys) = &changes
            {
                let updates = translate_pods(
                    &objects,
                    &self.mesh,
                    &self.last,
                    keys.iter().map(|(_, k)| k),
                );
                // Nothing the side effects read changed; they still run, as after any pass.
                self.side_effects(&objects, &self.last);
                let generation = self.store.generation();
                drop(objects);
                return self.apply_pods(generation, updates, start);
            }
            let next = translate(&objects, &self.mesh);
            self.side_effects(&objects, &next);
            (self.store.generation(), next)
        };
        let translated_in = start.elapsed();
        let apply_start = Instant::now();
        let (mut changed, mut removed) = (0, 0);

        let addr = diff(&self.last.workloads, &next.workloads, |w| {
            address(address::Type::Workload(w.clone()))
        });
        let svc = diff(&self.last.services, &next.services, |s| {
            address(address::Type::Service(s.clone()))
        });
        let (mut upserts, mut removals) = addr;
        upserts.extend(svc.0);
        removals.extend(svc.1);
        changed += upserts.len();
        removed += removals.len();
        if let Err(e) = self.cache.apply(ADDRESS_TYPE, upserts, removals) {
            warn!(error = %e, "address resources not applied");
        }
        let (upserts, removals) = diff(&self.last.authorizations, &next.authorizations, |a| {
            pack(AUTHORIZATION_TYPE, a)
        });
        changed += upserts.len();
        removed += removals.len();
        if let Err(e) = self.cache.apply(AUTHORIZATION_TYPE, upserts, removals) {
            warn!(error = %e, "authorization resources not applied");
        }
        let (upserts, removals) = diff(&self.last.bound_services, &next.bound_services, |b| {
            pack(BOUND_SERVICE_TYPE_URL, b)
        });
        changed += upserts.len();
        removed += removals.len();
        if let Err(e) = self.cache.apply(BOUND_SERVICE_TYPE_URL, upserts, removals) {
            warn!(error = %e, "waypoint BoundService resources not applied");
        }
        let (c, r) = self.apply_routes(&next);
        changed += c;
        removed += r;
        let (c, r) = self.apply_authn(&next);
        changed += c;
        removed += r;
        for issue in &next.request_authn.issues {
            if !self.last.request_authn.issues.contains(issue) {
                warn!(policy = %format!("{}/{}", issue.namespace, issue.name),
                    issue = issue.message.as_str(), "RequestAuthentication not applied as written");
            }
        }
        // Waypoint L7 policies: the name carries the waypoint, so a policy whose waypoint
        // changed is removed from the old one and added to the new one.
        let (old_wp, new_wp) = (&self.last.waypoint_authz, &next.waypoint_authz);
        let (upserts, removals) = diff(&old_wp.resources, &new_wp.resources, |p| {
            pack(WAYPOINT_POLICY_TYPE_URL, p)
        });
        changed += upserts.len();
        removed += removals.len();
        if let Err(e) = self
            .cache
            .apply(WAYPOINT_POLICY_TYPE_URL, upserts, removals)
        {
            warn!(error = %e, "waypoint WaypointPolicy resources not applied");
        }
        for ((ns, name), place) in &new_wp.placements {
            let key = (ns.clone(), name.clone());
            if old_wp.placements.get(&key) != Some(place) && !place.messages.is_empty() {
                warn!(policy = %format!("{ns}/{name}"), waypoints = ?place.waypoints,
                    ztunnel = place.ztunnel, issues = place.messages.join("; ").as_str(),
                    "AuthorizationPolicy (targetRefs) not enforced as written");
            }
        }
        for (route, why) in &next.routes.refused {
            if self.last.routes.refused.get(route) != Some(why) {
                warn!(%route, reason = why.as_str(),
                    "route refused whole: nothing of it is applied (see its status)");
            }
        }
        for (key, reason) in &next.waypoints.rejected {
            if self.last.waypoints.rejected.get(key) != Some(reason) {
                warn!(gateway = %format!("{}/{}", key.0, key.1), reason = reason.message.as_str(),
                    "Gateway of class istio-waypoint rejected; nothing is bound to it");
            }
        }
        let stats = PassStats {
            generation,
            addresses: next.workloads.len() + next.services.len(),
            authorizations: next.authorizations.len(),
            changed,
            removed,
            translate: translated_in,
            apply: apply_start.elapsed(),
            incremental: false,
        };
        // Policies that are not enforced as written: say so once per change, as a policy
        // status would (AUDIT/CUSTOM, L7-only rules narrowed, invalid values).
        for issue in next.issues.iter().filter(|i| !self.last.issues.contains(i)) {
            warn!(policy = %format!("{}/{}", issue.namespace, issue.name),
                issue = issue.message.as_str(), "AuthorizationPolicy not enforced as written");
        }
        self.last = next;
        self.translated = true;
        self.finish(stats)
    }

    /// Applies the workloads of [`translate_pods`] to `last` and the cache.
    fn apply_pods(
        &mut self,
        generation: u64,
        updates: Vec<(String, Option<Workload>)>,
        start: Instant,
    ) -> PassStats {
        let translated_in = start.elapsed();
        let apply_start = Instant::now();
        let (mut upserts, mut removals) = (Vec::new(), Vec::new());
        for (uid, workload) in updates {
            match workload {
                Some(w) => {
                    if self.last.workloads.get(&uid) != Some(&w) {
                        upserts.push((uid.clone(), address(address::Type::Workload(w.clone()))));
                        self.last.workloads.insert(uid, w);
                    }
                }
                None => {
                    if self.last.workloads.remove(&uid).is_some() {
                        removals.push(uid);
                    }
                }
            }
        }
        let (changed, removed) = (upserts.len(), removals.len());
        if let Err(e) = self.cache.apply(ADDRESS_TYPE, upserts, removals) {
            warn!(error = %e, "address resources not applied");
        }
        let stats = PassStats {
            generation,
            addresses: self.last.workloads.len() + self.last.services.len(),
            authorizations: self.last.authorizations.len(),
            changed,
            removed,
            translate: translated_in,
            apply: apply_start.elapsed(),
            incremental: true,
        };
        self.finish(stats)
    }

    /// Logs and records a pass's statistics.
    fn finish(&mut self, stats: PassStats) -> PassStats {
        self.cache.mark_ready();
        if stats.changed + stats.removed > 0 {
            info!(
                generation = stats.generation,
                changed = stats.changed,
                removed = stats.removed,
                addresses = stats.addresses,
                authorizations = stats.authorizations,
                incremental = stats.incremental,
                translate_ms = stats.translate.as_secs_f64() * 1e3,
                apply_ms = stats.apply.as_secs_f64() * 1e3,
                "config pushed"
            );
        } else {
            debug!(generation = stats.generation, "no resource changed");
        }
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats.clone();
        stats
    }
}

fn address(t: address::Type) -> Any {
    pack(ADDRESS_TYPE, &Address { r#type: Some(t) })
}

fn pack(type_url: &str, m: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

impl Reconciler {
    /// Serves each bound Service's route table (`ServiceRoutes`) and removes those gone.
    /// Returns (changed, removed).
    fn apply_routes(&self, next: &Translated) -> (usize, usize) {
        self.apply_per_service(
            SERVICE_ROUTES_TYPE_URL,
            &self.last.routes.services,
            &next.routes.services,
            next,
            |s| pack(SERVICE_ROUTES_TYPE_URL, &service_routes(s)),
        )
    }

    /// Serves each bound Service's JWT rules (`ServiceAuthn`) and removes those gone.
    /// Returns (changed, removed).
    fn apply_authn(&self, next: &Translated) -> (usize, usize) {
        self.apply_per_service(
            SERVICE_AUTHN_TYPE_URL,
            &self.last.request_authn.services,
            &next.request_authn.services,
            next,
            |s| pack(SERVICE_AUTHN_TYPE_URL, s),
        )
    }

    /// Serves a per-bound-Service waypoint resource (keyed like `bound_services`) and removes
    /// those gone. One whose Service moved to another waypoint is removed first, then served
    /// again, so the old waypoint's stream drops it and the new one's gets it (the scope
    /// follows the `BoundService`, applied before). Returns (changed, removed).
    fn apply_per_service<T: PartialEq>(
        &self,
        type_url: &str,
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
        next: &Translated,
        pack: impl Fn(&T) -> Any,
    ) -> (usize, usize) {
        let waypoint =
            |t: &Translated, k: &str| t.bound_services.get(k).map(|b| b.waypoint.clone());
        let moved: Vec<String> = new
            .keys()
            .filter(|k| old.contains_key(*k) && waypoint(&self.last, k) != waypoint(next, k))
            .cloned()
            .collect();
        if !moved.is_empty()
            && let Err(e) = self.cache.apply(type_url, Vec::new(), moved.clone())
        {
            warn!(error = %e, type_url, "waypoint resources not moved");
        }
        let (mut upserts, removals) = diff(old, new, &pack);
        // The content of a moved one may not have changed: it is served again all the same.
        let again: Vec<(String, Any)> = moved
            .into_iter()
            .filter(|k| !upserts.iter().any(|(u, _)| u == k))
            .map(|k| {
                let any = pack(&new[&k]);
                (k, any)
            })
            .collect();
        upserts.extend(again);
        let counts = (upserts.len(), removals.len());
        if let Err(e) = self.cache.apply(type_url, upserts, removals) {
            warn!(error = %e, type_url, "waypoint resources not applied");
        }
        counts
    }
}

/// Upserts for names whose content changed (or are new) and removals for names gone.
fn diff<T: PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    encode: impl Fn(&T) -> Any,
) -> (Vec<(String, Any)>, Vec<String>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), encode(v)))
        .collect();
    let removals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (upserts, removals)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a}
spec: {selector: {app: x}, clusterIP: 10.96.0.1, ports: [{port: 80}]}
";

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: x}}}}\nspec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n"
        )
    }

    #[test]
    fn only_changes_reach_the_cache() {
        let store = Store::new();
        let cache = Cache::new();
        let mut r = Reconciler::new(store.clone(), cache.clone(), MeshConfig::default());
        let mut changes = cache.subscribe();
        let set_pods = |pods: &[(&str, &str)]| {
            let pods: String = pods.iter().map(|(name, ip)| pod(name, ip)).collect();
            store.replace_all(Objects::from_yaml(&format!("{BASE}{pods}")).unwrap());
        };
        set_pods(&[("p1", "10.0.0.1"), ("p2", "10.0.0.2")]);
        let s = r.pass();
        assert_eq!((s.addresses, s.changed, s.removed), (3, 3, 0));
        let first = changes.try_recv().unwrap();
        assert_eq!(first.names.len(), 3);

        // Same objects again: nothing.
        set_pods(&[("p1", "10.0.0.1"), ("p2", "10.0.0.2")]);
        let s = r.pass();
        assert_eq!((s.changed, s.removed), (0, 0));
        assert!(changes.try_recv().is_err());

        // One pod changes its IP: exactly its workload is pushed.
        set_pods(&[("p1", "10.0.0.1"), ("p2", "10.0.0.9")]);
        let s = r.pass();
        assert_eq!((s.changed, s.removed), (1, 0));
        let change = changes.try_recv().unwrap();
        assert_eq!(change.names, vec!["Kubernetes//Pod/a/p2".to_owned()]);

        // A pod goes away: exactly its removal.
        set_pods(&[("p1", "10.0.0.1")]);
        let s = r.pass();
        assert_eq!((s.changed, s.removed), (0, 1));
        assert_eq!(
            changes.try_recv().unwrap().names,
            vec!["Kubernetes//Pod/a/p2".to_owned()]
        );
        assert!(cache.get(ADDRESS_TYPE, "Kubernetes//Pod/a/p2").is_none());
        assert!(cache.get(ADDRESS_TYPE, "Kubernetes//Pod/a/p1").is_some());
    }

    /// Objects that Pods interact with: enrolled and plain namespaces, selecting Services
    /// with named ports, a waypoint, a selector-less Service with an EndpointSlice naming a
    /// Pod, and a policy selecting Pods by label.
    const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: a}
spec: {selector: {app: x}, clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: web}]}
---
apiVersion: v1
kind: Service
metadata: {name: t, namespace: b}
spec: {selector: {app: y}, clusterIP: 10.96.0.2, ports: [{port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: a}
spec: {clusterIP: 10.96.0.3, ports: [{port: 82}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: a, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{port: 9090}]
endpoints: [{addresses: [10.0.0.3], targetRef: {kind: Pod, name: p3, namespace: a}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: b}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-y, namespace: b}
spec: {selector: {matchLabels: {app: y}}, action: DENY, rules: [{from: [{source: {namespaces: [a]}}]}]}
";

    /// One Pod, as a change to the store: `None` deletes it.
    #[derive(Debug, Clone)]
    struct PodSpec {
        ns: &'static str,
        app: &'static str,
        ip: Option<u8>,
        host_network: bool,
        phase: &'static str,
        mode: &'static str,
    }

    fn pod_object(index: usize, p: &PodSpec) -> crate::translate::KubeObject {
        let ip =
            p.ip.map_or(String::new(), |ip| format!("podIP: 10.0.0.{ip}, "));
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{index}, namespace: {ns}, \
             labels: {{app: {app}, istio.io/dataplane-mode: {mode}}}}}\nspec: {{nodeName: n1, \
             hostNetwork: {hn}, containers: [{{name: c, ports: [{{name: web, containerPort: \
             8080}}]}}]}}\nstatus: {{{ip}phase: {phase}, conditions: [{{type: Ready, status: \
             'True'}}]}}\n",
            ns = p.ns,
            app = p.app,
            mode = p.mode,
            hn = p.host_network,
            phase = p.phase,
        );
        let objects = Objects::from_yaml(&yaml).unwrap();
        crate::translate::KubeObject::Pod(objects.pods.into_values().next().unwrap())
    }

    fn pod_spec() -> impl proptest::strategy::Strategy<Value = Option<PodSpec>> {
        use proptest::prelude::*;
        let spec = (
            prop::sample::select(vec!["a", "b"]),
            prop::sample::select(vec!["x", "y", "z"]),
            prop::option::weighted(0.9, 1u8..9),
            prop::bool::weighted(0.1),
            prop::sample::select(vec!["Running", "Running", "Pending", "Succeeded"]),
            prop::sample::select(vec!["ambient", "none", "other"]),
        )
            .prop_map(|(ns, app, ip, host_network, phase, mode)| PodSpec {
                ns,
                app,
                ip,
                host_network,
                phase,
                mode,
            });
        prop::option::weighted(0.8, spec)
    }

    /// Name → decoded resource of every cached Address. (Not the versions: a map field, such
    /// as a workload's `services`, encodes in hash order, so equal resources built apart may
    /// differ in bytes.)
    fn addresses(cache: &Cache) -> BTreeMap<String, Address> {
        cache
            .names(ADDRESS_TYPE)
            .into_iter()
            .map(|n| {
                let entry = cache.get(ADDRESS_TYPE, &n).unwrap();
                let address = Address::decode(entry.resource.value.as_slice()).unwrap();
                (n, address)
            })
            .collect()
    }

    proptest::proptest! {
        /// After any sequence of Pod changes, the incremental passes leave exactly what a full
        /// translation of the same objects gives: the same translation and the same cache.
        #[test]
        fn incremental_pod_passes_equal_a_full_translation(
            steps in proptest::collection::vec(
                proptest::collection::vec((0usize..6, pod_spec()), 1..4),
                1..8,
            ),
        ) {
            let mesh = MeshConfig::default();
            let store = Store::new();
            let cache = Cache::new();
            store.replace_all(Objects::from_yaml(WORLD).unwrap());
            let mut r = Reconciler::new(store.clone(), cache.clone(), mesh.clone());
            proptest::prop_assert!(!r.pass().incremental, "the first pass is a full one");
            for step in steps {
                let (mut upserts, mut removals) = (Vec::new(), Vec::new());
                for (i, spec) in step {
                    match spec {
                        Some(spec) => upserts.push(pod_object(i, &spec)),
                        None => {
                            let ns = ["a", "b"][i % 2].to_owned();
                            removals.push((Kind::Pod, (ns, format!("p{i}"))));
                        }
                    }
                }
                // Single upserts go through `Store::upsert`, like a watch event.
                if upserts.len() == 1 && removals.is_empty() {
                    store.upsert(upserts.pop().unwrap());
                } else {
                    store.apply(upserts, removals);
                }
                let stats = r.pass();
                proptest::prop_assert!(stats.incremental);
                let full = translate(&store.read(), &mesh);
                proptest::prop_assert_eq!(&r.last, &full);
                let fresh = Cache::new();
                let mut again = Reconciler::new(store.clone(), fresh.clone(), mesh.clone());
                again.pass();
                proptest::prop_assert_eq!(addresses(&cache), addresses(&fresh));
            }
        }
    }

    #[test]
    fn a_change_to_anything_but_pods_is_a_full_pass() {
        let store = Store::new();
        let cache = Cache::new();
        store.replace_all(Objects::from_yaml(WORLD).unwrap());
        let mut r = Reconciler::new(store.clone(), cache.clone(), MeshConfig::default());
        r.pass();
        let spec = PodSpec {
            ns: "b",
            app: "y",
            ip: Some(7),
            host_network: false,
            phase: "Running",
            mode: "ambient",
        };
        store.upsert(pod_object(7, &spec));
        let s = r.pass();
        assert!(s.incremental);
        assert_eq!((s.changed, s.removed), (1, 0));
        // The policy selecting the Pod goes: the Pod's workload changes through a full pass.
        store.remove(
            Kind::AuthorizationPolicy,
            &("b".to_owned(), "deny-y".to_owned()),
        );
        let s = r.pass();
        assert!(!s.incremental);
        assert!(s.changed >= 1, "{s:?}");
        assert_eq!(r.last, translate(&store.read(), &MeshConfig::default()));
        // Nothing changed since: an incremental pass that changes nothing.
        let s = r.pass();
        assert!(s.incremental);
        assert_eq!((s.changed, s.removed), (0, 0));
    }

    #[tokio::test]
    async fn nothing_is_served_before_every_kind_is_synced() {
        let store = Store::new();
        let cache = Cache::new();
        let r = Reconciler::new(store.clone(), cache.clone(), MeshConfig::default())
            .with_debounce(Duration::from_millis(1));
        let stats = r.stats();
        let task = tokio::spawn(r.run());
        let objects = Objects::from_yaml(&format!("{BASE}{}", pod("p1", "10.0.0.1"))).unwrap();
        for (_, o) in objects.pods.clone() {
            store.upsert(crate::translate::KubeObject::Pod(o));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            cache.get(ADDRESS_TYPE, "Kubernetes//Pod/a/p1").is_none(),
            "a partially listed cluster must not be served"
        );
        for kind in Kind::ALL {
            store.mark_synced(kind);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while cache.get(ADDRESS_TYPE, "Kubernetes//Pod/a/p1").is_none() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stats.lock().unwrap().generation > 0);
        task.abort();
    }
}
