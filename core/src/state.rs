//! The workload model proxies route on: workloads, services and their indexes, built from
//! xDS or from upstream ztunnel's local-config YAML (`workloads`, `services`, `policies`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use litemap::LiteMap;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId};
use crate::policy::{Connection, Decision, Policy, PolicySet};

pub mod waypoint;
pub mod xds;

pub use waypoint::{GatewayAddress, GatewayDestination, NamespacedHostname, WaypointUpstream};

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// HBONE on port 15008: the workload is in the mesh.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Plain TCP: the workload is outside the mesh.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// `<network>/<ip>`, the way Istio names an address (the network may be empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (network, ip) = s.rsplit_once('/').unwrap_or(("", s));
        let address = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an address of the form <network>/<ip>"))?;
        Ok(NetworkAddress {
            network: network.to_owned(),
            address,
        })
    }
}

impl std::fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl Serialize for NetworkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Service port -> target port.
pub type PortMap = SmallMap<u16, u16>;

/// A small map kept as a sorted vector of pairs (`litemap`), read and written as a map.
///
/// For a workload's `services` and for [`PortMap`]: these hold one to a few entries, and a
/// `BTreeMap` allocates a node for eleven on its first insert. Per known workload, its
/// `services` map (one Service, one port) took 640 bytes as `BTreeMap`s and takes about 90
/// as `SmallMap`s (`zmesh-bench-controller`: 2.6-2.7 -> 2.0-2.1 KiB per workload in ztunnel).
///
/// Serde reads and writes it exactly as a `BTreeMap`: always a map (an empty one too), an
/// empty YAML value is an empty map, a repeated key keeps its last value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmallMap<K, V>(LiteMap<K, V>);

impl<K: Ord, V> SmallMap<K, V> {
    pub fn with_capacity(n: usize) -> Self {
        SmallMap(LiteMap::with_capacity(n))
    }

    /// Gives back spare capacity (a map built by `insert` grows its vector by doubling).
    fn shrunk(self) -> Self {
        let mut v = self.0.into_tuple_vec();
        v.shrink_to_fit();
        // Sorted without duplicates: it comes from a map.
        SmallMap(LiteMap::from_sorted_store_unchecked(v))
    }
}

impl<K, V> std::ops::Deref for SmallMap<K, V> {
    type Target = LiteMap<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<K, V> std::ops::DerefMut for SmallMap<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        SmallMap(iter.into_iter().collect::<LiteMap<K, V>>()).shrunk()
    }
}

impl<K: Serialize, V: Serialize> Serialize for SmallMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter())
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SmallMap<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> serde::de::Visitor<'de>
            for Entries<K, V>
        {
            type Value = SmallMap<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                // The hint comes from the input: bounded, so a forged one cannot reserve much.
                let mut m = SmallMap::with_capacity(a.size_hint().unwrap_or(0).min(16));
                while let Some((k, v)) = a.next_entry()? {
                    m.insert(k, v);
                }
                Ok(m.shrunk())
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// A workload (a pod, usually), in upstream ztunnel's local-config shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    #[serde(default)]
    pub workload_type: String,
    #[serde(default)]
    pub status: HealthStatus,
    /// Services this workload backs: `"<namespace>/<hostname>"` -> service port -> target port.
    #[serde(default)]
    pub services: SmallMap<String, PortMap>,
    /// The `WORKLOAD_SELECTOR` AuthorizationPolicies that select this workload, by key
    /// `"<namespace>/<name>"`.
    ///
    /// A boxed slice and a boxed waypoint (both are often empty) keep a workload with its
    /// `Arc` within mimalloc's 384-byte size class instead of its 448-byte one: at 10k pods
    /// that is 0.6 MiB.
    #[serde(default, skip_serializing_if = "<[String]>::is_empty")]
    pub authorization_policies: Box<[String]>,
    /// The waypoint traffic addressed to this workload's IP goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Box<GatewayAddress>>,
}

impl Workload {
    pub fn identity(&self) -> Result<SpiffeId, IdentityError> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// `<namespace>/<name>`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service, in upstream ztunnel's local-config shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// Service port -> target port (0: use the workload's own mapping).
    #[serde(default)]
    pub ports: PortMap,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint traffic addressed to this service's VIPs goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// `"<namespace>/<hostname>"`, the key workloads use to name the services they back.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Upstream ztunnel's local-config file (`LOCAL_XDS_PATH`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// AuthorizationPolicies (L4), enforced on inbound connections.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// Why a local-config file was refused. Nothing of it is applied then.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("local config is not valid: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("local config refused before parsing: {0}")]
    Limits(#[from] crate::yaml::YamlLimitError),
    #[error("workload {workload}: {source}")]
    Identity {
        workload: String,
        source: IdentityError,
    },
    #[error("workloads {0} and {1} both claim IP {2}; each workload IP must be unique")]
    DuplicateIp(String, String, IpAddr),
    #[error("services {0} and {1} both claim VIP {2}")]
    DuplicateVip(String, String, NetworkAddress),
    #[error("AuthorizationPolicy {0} is listed twice under `policies:`; each key must be unique")]
    DuplicatePolicy(String),
}

impl LocalConfig {
    pub fn parse(yaml: &str) -> Result<Self, ConfigError> {
        let cfg: LocalConfig = if yaml.trim().is_empty() {
            LocalConfig::default()
        } else {
            // Bounded first: deep nesting costs the parser quadratic time.
            crate::yaml::check_limits(yaml)?;
            serde_yaml::from_str(yaml)?
        };
        Ok(cfg)
    }
}

/// The lookup key of a workload by namespace, name and service account.
pub fn workload_key(namespace: &str, name: &str, sa: &str) -> String {
    format!("{namespace}/{name}/{sa}")
}

/// An endpoint chosen for a connection: the workload and the port to reach it on.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub workload: Arc<Workload>,
    pub address: SocketAddr,
    /// Identities the destination may present: the workload's plus the service's SANs.
    pub identities: Vec<SpiffeId>,
    pub service: Option<Arc<Service>>,
}

/// An immutable, indexed snapshot of what the proxy knows. Replaced whole on change.
#[derive(Debug, Default)]
pub struct State {
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// `<namespace>/<name>/<service-account>` -> workload.
    by_name: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Service key -> workloads backing it, in config order.
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: PolicySet,
}

impl State {
    pub fn from_local(cfg: LocalConfig) -> Result<Self, ConfigError> {
        let mut st = State::default();
        for w in cfg.workloads {
            w.identity().map_err(|source| ConfigError::Identity {
                workload: w.key(),
                source,
            })?;
            let w = Arc::new(w);
            for ip in &w.workload_ips {
                if let Some(prev) = st.by_ip.insert(*ip, w.clone()) {
                    return Err(ConfigError::DuplicateIp(prev.key(), w.key(), *ip));
                }
            }
            st.by_name.insert(
                workload_key(&w.namespace, &w.name, &w.service_account),
                w.clone(),
            );
            for svc in w.services.keys() {
                st.endpoints.entry(svc.clone()).or_default().push(w.clone());
            }
            st.workloads.push(w);
        }
        for s in cfg.services {
            let s = Arc::new(s);
            for vip in &s.vips {
                if let Some(prev) = st.by_vip.insert(vip.address, s.clone()) {
                    return Err(ConfigError::DuplicateVip(prev.key(), s.key(), vip.clone()));
                }
            }
            st.services.insert(s.key(), s);
        }
        let mut keys = std::collections::HashSet::new();
        for p in &cfg.policies {
            if !keys.insert(p.key()) {
                return Err(ConfigError::DuplicatePolicy(p.key()));
            }
        }
        st.policies = PolicySet::new(cfg.policies);
        Ok(st)
    }

    /// Builds a snapshot from resources that were validated one by one (xDS, see [`xds`]).
    /// Unlike a local file, which is refused whole, a conflict does not refuse anything:
    /// when two workloads claim an IP, or two services a VIP, the later one in the given
    /// order wins (give them in arrival order: a pod IP reused by a new pod belongs to the
    /// newer). The conflicts are returned, described, for the caller to log.
    pub fn from_resources(
        workloads: impl IntoIterator<Item = Arc<Workload>>,
        services: impl IntoIterator<Item = Arc<Service>>,
    ) -> (Self, Vec<String>) {
        let mut st = State::default();
        let mut conflicts = Vec::new();
        for w in workloads {
            for ip in &w.workload_ips {
                if let Some(prev) = st.by_ip.insert(*ip, w.clone()) {
                    conflicts.push(format!(
                        "workloads {} and {} both claim IP {ip}; {} (the later) is used",
                        prev.uid, w.uid, w.uid
                    ));
                }
            }
            st.by_name.insert(
                workload_key(&w.namespace, &w.name, &w.service_account),
                w.clone(),
            );
            for svc in w.services.keys() {
                st.endpoints.entry(svc.clone()).or_default().push(w.clone());
            }
            st.workloads.push(w);
        }
        for s in services {
            for vip in &s.vips {
                if let Some(prev) = st.by_vip.insert(vip.address, s.clone())
                    && prev.key() != s.key()
                {
                    conflicts.push(format!(
                        "services {} and {} both claim VIP {vip}; {} (the later) is used",
                        prev.key(),
                        s.key(),
                        s.key()
                    ));
                }
            }
            st.services.insert(s.key(), s);
        }
        (st, conflicts)
    }

    /// This snapshot with `policies` in place of its AuthorizationPolicies (xDS delivers them
    /// apart from workloads and services: `State::from_resources(..).0.with_policies(set)`).
    pub fn with_policies(mut self, policies: PolicySet) -> State {
        self.policies = policies;
        self
    }

    /// The AuthorizationPolicies (cheap to clone).
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Decides an inbound connection to `dst` with this snapshot's policies.
    pub fn authorize(&self, dst: &Workload, conn: &Connection<'_>) -> Decision {
        self.policies
            .check(&dst.namespace, &dst.authorization_policies, conn)
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// A service by `"<namespace>/<hostname>"`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The service an inbound connection to `w` was meant for: the one named by the
    /// client's `host` hint if `w` backs it, else `w`'s only service, else none.
    pub fn inbound_service(&self, w: &Workload, host_hint: Option<&str>) -> Option<&Arc<Service>> {
        let backed = || w.services.keys().filter_map(|k| self.services.get(k));
        if let Some(host) = host_hint
            && let Some(s) = backed().find(|s| s.hostname == host)
        {
            return Some(s);
        }
        let mut it = backed();
        match (it.next(), it.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    }

    /// The workloads backing the service `"<namespace>/<hostname>"`, in config order (all of
    /// them: the caller filters on health and ports).
    pub fn endpoints(&self, service_key: &str) -> &[Arc<Workload>] {
        self.endpoints.get(service_key).map_or(&[], Vec::as_slice)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Finds a workload by namespace, name and service account (how ZDS and dedicated mode
    /// name the proxied workload).
    pub fn find_workload(&self, namespace: &str, name: &str, sa: &str) -> Option<&Arc<Workload>> {
        self.workload_by_key(&workload_key(namespace, name, sa))
    }

    /// Like [`State::find_workload`], with the key made once by [`workload_key`].
    pub fn workload_by_key(&self, key: &str) -> Option<&Arc<Workload>> {
        self.by_name.get(key)
    }

    /// Resolves an original destination to where the connection should go.
    /// `pick` chooses among healthy endpoints of a service (load balancing).
    pub fn resolve(&self, dst: SocketAddr, pick: impl FnOnce(usize) -> usize) -> Resolved {
        if let Some(svc) = self.by_vip.get(&dst.ip()) {
            let Some(&svc_target) = svc.ports.get(&dst.port()) else {
                return Resolved::NoPort {
                    service: svc.key(),
                    port: dst.port(),
                };
            };
            let key = svc.key();
            let candidates: Vec<(&Arc<Workload>, u16)> = self
                .endpoints
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|w| w.status == HealthStatus::Healthy && !w.workload_ips.is_empty())
                .filter_map(|w| {
                    let target = if svc_target != 0 {
                        svc_target
                    } else {
                        *w.services.get(&key)?.get(&dst.port())?
                    };
                    Some((w, target))
                })
                .collect();
            if candidates.is_empty() {
                return Resolved::NoEndpoints { service: key };
            }
            let (w, port) = candidates[pick(candidates.len()) % candidates.len()];
            let mut identities = Vec::new();
            if let Ok(id) = w.identity() {
                identities.push(id);
            }
            identities.extend(
                svc.subject_alt_names
                    .iter()
                    .filter_map(|s| s.parse::<SpiffeId>().ok()),
            );
            return Resolved::Upstream(Upstream {
                address: SocketAddr::new(w.workload_ips[0], port),
                workload: w.clone(),
                identities,
                service: Some(svc.clone()),
            });
        }
        if let Some(w) = self.by_ip.get(&dst.ip()) {
            return Resolved::Upstream(Upstream {
                address: dst,
                identities: w.identity().into_iter().collect(),
                workload: w.clone(),
                service: None,
            });
        }
        Resolved::Passthrough
    }
}

/// Where a connection goes.
#[derive(Debug)]
pub enum Resolved {
    Upstream(Upstream),
    /// Not known to the mesh: forwarded as is.
    Passthrough,
    /// A service VIP on a port the service does not expose.
    NoPort {
        service: String,
        port: u16,
    },
    /// A service with no healthy endpoint.
    NoEndpoints {
        service: String,
    },
    /// Traffic for what a waypoint fronts, to the waypoint.
    Waypoint(WaypointUpstream),
    /// Traffic for what a waypoint fronts while the waypoint cannot be reached: refused.
    WaypointNotReady {
        /// The Service (`<namespace>/<hostname>`) or address the traffic was for.
        destination: String,
        /// The waypoint's address.
        waypoint: String,
        /// Why it cannot be reached.
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_with_its_arc_fits_the_384_byte_size_class() {
        // An `Arc`'s allocation is its two counts and the value. At 10k pods each 64 bytes
        // over is 0.6 MiB of ztunnel memory: a new field should be small or boxed.
        let arc = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Workload>();
        assert!(arc <= 384, "Arc<Workload> allocates {arc} bytes");
    }

    #[test]
    fn small_maps_read_and_write_as_btree_maps_did() {
        // An empty YAML value is an empty map; keys come back sorted; integer keys stay
        // integers.
        let w: Workload = serde_yaml::from_str(
            "name: a\nnamespace: default\nservices:\n  ns/z.svc:\n  ns/b.svc: {90: 9090, 80: 8080}\n",
        )
        .unwrap();
        assert_eq!(
            w.services.keys().cloned().collect::<Vec<_>>(),
            ["ns/b.svc", "ns/z.svc"]
        );
        assert!(w.services.get("ns/z.svc").unwrap().is_empty());
        assert_eq!(
            w.services.get("ns/b.svc"),
            Some(&PortMap::from_iter([(90, 9090), (80, 8080)]))
        );
        let empty: Workload =
            serde_yaml::from_str("name: a\nnamespace: default\nservices:\n").unwrap();
        assert!(empty.services.is_empty());
        // Written as maps, an empty one too (not as a list of pairs), and read back the same.
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(
            json["services"],
            serde_json::json!({"ns/b.svc": {"80": 8080, "90": 9090}, "ns/z.svc": {}})
        );
        assert_eq!(
            serde_json::to_value(&empty).unwrap()["services"],
            serde_json::json!({})
        );
        assert_eq!(serde_json::from_value::<Workload>(json).unwrap(), w);
        // A repeated key keeps its last value; a list is not a map.
        let dup: PortMap = serde_json::from_str(r#"{"80": 1, "80": 2}"#).unwrap();
        assert_eq!(dup, PortMap::from_iter([(80, 2)]));
        let e = serde_json::from_str::<PortMap>("[[80, 8080]]").unwrap_err();
        assert!(e.to_string().contains("expected a map"), "{e}");
    }

    const CFG: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
- name: server-a
  namespace: default
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local":
      80: 8080
- name: server-b
  namespace: default
  serviceAccount: server
  workloadIps: ["10.0.0.3"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local":
      80: 8081
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports:
    80: 0
    90: 9090
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo-extra"]
"#;

    fn state() -> State {
        State::from_local(LocalConfig::parse(CFG).unwrap()).unwrap()
    }

    #[test]
    fn vip_maps_ports_and_balances() {
        let st = state();
        let dst: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let a = match st.resolve(dst, |_| 0) {
            Resolved::Upstream(u) => u,
            other => panic!("{other:?}"),
        };
        let b = match st.resolve(dst, |_| 1) {
            Resolved::Upstream(u) => u,
            other => panic!("{other:?}"),
        };
        // Target port 0 in the service: each workload's own mapping applies.
        assert_eq!(a.address, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(b.address, "10.0.0.3:8081".parse().unwrap());
        assert_eq!(
            a.identities
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
            vec![
                "spiffe://cluster.local/ns/default/sa/server",
                "spiffe://cluster.local/ns/default/sa/echo-extra"
            ]
        );
        // An explicit target port in the service wins.
        match st.resolve("10.96.0.10:90".parse().unwrap(), |_| 1) {
            Resolved::Upstream(u) => assert_eq!(u.address, "10.0.0.3:9090".parse().unwrap()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            st.resolve("10.96.0.10:81".parse().unwrap(), |_| 0),
            Resolved::NoPort { port: 81, .. }
        ));
    }

    #[test]
    fn pod_ip_and_passthrough() {
        let st = state();
        match st.resolve("10.0.0.2:7000".parse().unwrap(), |_| 0) {
            Resolved::Upstream(u) => {
                assert_eq!(u.address, "10.0.0.2:7000".parse().unwrap());
                assert_eq!(u.workload.name, "server-a");
                assert!(u.service.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            st.resolve("192.0.2.1:80".parse().unwrap(), |_| 0),
            Resolved::Passthrough
        ));
        assert_eq!(
            st.find_workload("default", "client", "client").unwrap().uid,
            "cluster1//v1/Pod/default/client"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = LocalConfig::parse("workloads:\n- name: a\n  namespace: b\n  workloadIPs: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloadIPs"), "{err}");
        let err = LocalConfig::parse("workload: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `workload`"), "{err}");
    }

    #[test]
    fn bad_input_is_refused_with_reason() {
        let dup = "workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n- {name: b, namespace: n, workloadIps: [10.0.0.1]}\n";
        let err = State::from_local(LocalConfig::parse(dup).unwrap()).unwrap_err();
        assert!(err.to_string().contains("both claim IP 10.0.0.1"), "{err}");
        let bad_sa = "workloads:\n- {name: a, namespace: n, serviceAccount: 'a b'}\n";
        let err = State::from_local(LocalConfig::parse(bad_sa).unwrap()).unwrap_err();
        assert!(err.to_string().contains("service account"), "{err}");
        let pol =
            "policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[]]}\n";
        let twice = format!("{pol}{}", &pol["policies:\n".len()..]);
        let err = State::from_local(LocalConfig::parse(&twice).unwrap()).unwrap_err();
        assert!(
            matches!(err, ConfigError::DuplicatePolicy(ref k) if k == "n/p"),
            "{err}"
        );
        let st = State::from_local(LocalConfig::parse(pol).unwrap()).unwrap();
        assert_eq!(st.policies().len(), 1);
    }

    #[test]
    fn local_policies_are_parsed_and_enforced() {
        let cfg = r#"
workloads:
- name: server
  namespace: shop
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  authorizationPolicies: ["shop/only-frontend"]
- name: other
  namespace: shop
  workloadIps: ["10.0.0.3"]
policies:
- name: only-frontend
  namespace: shop
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals:
        - !Exact cluster.local/ns/shop/sa/frontend
        destinationPorts: [8080]
- name: deny-evil
  namespace: istio-system
  scope: Global
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [!Prefix evil]
"#;
        let st = State::from_local(LocalConfig::parse(cfg).unwrap()).unwrap();
        assert_eq!(st.policies().len(), 2);
        let server = st
            .find_workload("shop", "server", "server")
            .unwrap()
            .clone();
        assert_eq!(*server.authorization_policies, ["shop/only-frontend"]);
        let other = st
            .workload_by_ip("10.0.0.3".parse().unwrap())
            .unwrap()
            .clone();
        assert!(other.authorization_policies.is_empty());
        let frontend = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
        let evil = SpiffeId::new("cluster.local", "evil-ns", "frontend").unwrap();
        let conn = |id, port| Connection {
            src_ip: "10.0.0.9".parse().unwrap(),
            src_identity: Some(id),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        };
        let d = st.authorize(&server, &conn(&frontend, 8080));
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("shop/only-frontend"));
        assert!(!d.dry_run[0].matched);
        assert!(!st.authorize(&server, &conn(&frontend, 9090)).allowed);
        let d = st.authorize(&server, &conn(&evil, 8080));
        assert!(!d.allowed);
        assert_eq!(d.policy, None);
        assert!(
            d.dry_run[0].matched,
            "the dry-run DENY reports, does not decide"
        );
        // The selector policy does not apply to the other workload.
        assert!(st.authorize(&other, &conn(&evil, 9090)).allowed);

        // with_policies replaces them.
        let st = st.with_policies(PolicySet::default());
        assert!(st.policies().is_empty());
        assert!(st.authorize(&server, &conn(&frontend, 9090)).allowed);
    }

    #[test]
    fn bad_policies_are_refused_naming_the_field() {
        for (yaml, needle) in [
            (
                "policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{destinationPort: [1]}]]]}\n",
                "unknown field `destinationPort`",
            ),
            (
                "policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [], selector: {}}\n",
                "unknown field `selector`",
            ),
            (
                "policies:\n- {name: p, namespace: n, scope: Global, action: Deny, rules: [[[{principals: [{Exact: a}]}]]]}\n",
                "principals",
            ),
            (
                "policies:\n- {name: p, namespace: n, scope: Global, rules: []}\n",
                "missing field `action`",
            ),
            (
                "workloads:\n- {name: a, namespace: n, authorizationPolicy: []}\n",
                "unknown field `authorizationPolicy`",
            ),
        ] {
            let err = LocalConfig::parse(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    proptest::proptest! {
        /// Outside input: whatever the file holds, parsing and indexing never panic, and a
        /// state is built only from input that parsed.
        #[test]
        fn arbitrary_config_never_panics(s in "\\PC{0,400}") {
            if let Ok(cfg) = LocalConfig::parse(&s) {
                let _ = State::from_local(cfg);
            }
        }

        #[test]
        fn yaml_shaped_config_never_panics(
            name in "[a-z.-]{0,12}",
            ip in proptest::prelude::any::<[u8; 4]>(),
            port in proptest::prelude::any::<u16>(),
            target in proptest::prelude::any::<u16>(),
        ) {
            let yaml = format!(
                "workloads:\n- {{name: '{name}', namespace: '{name}', serviceAccount: '{name}', workloadIps: ['{}.{}.{}.{}'], services: {{'{name}/{name}': {{{port}: {target}}}}}}}\nservices:\n- {{name: '{name}', namespace: '{name}', hostname: '{name}', vips: ['/{}.{}.{}.{}'], ports: {{{port}: {target}}}}}\n",
                ip[0], ip[1], ip[2], ip[3], ip[3], ip[2], ip[1], ip[0]
            );
            if let Ok(cfg) = LocalConfig::parse(&yaml)
                && let Ok(st) = State::from_local(cfg)
            {
                let dst = SocketAddr::new(std::net::Ipv4Addr::from([ip[3], ip[2], ip[1], ip[0]]).into(), port);
                let _ = st.resolve(dst, |n| n.saturating_sub(1));
            }
        }
    }
}
