//! A synthetic cluster as the controller's YAML directory: deterministic (seeded) Namespaces,
//! Pods, Services and AuthorizationPolicies, written the way `kubectl get -o yaml` shapes them,
//! plus the edits the benchmark times (one Pod's IP, one policy's rule), each written
//! atomically (a hidden temporary file renamed over the old one).
//!
//! Layout: `namespaces.yaml`; one `pod-<ns>-<name>.yaml` per Pod (so one Pod's change rewrites
//! one small file, as a watch event would carry one object); `services-<ns>.yaml` and
//! `authz-<ns>.yaml` per namespace.
//!
//! Shape: namespaces `ns-000..`, even ones enrolled (`istio.io/dataplane-mode=ambient`); Service
//! `app-<k>` lives in namespace `k mod namespaces` and selects `app=app-<k>`; Pod `i` belongs to
//! app `i mod services`, so every Service selects about `pods / services` Pods; Pods sit on
//! nodes `node-000..` at random. Policies: a few in the root namespace (mesh-wide and
//! selector), otherwise 60% selector-scoped (one app of the namespace) and 40% namespace-wide;
//! 80% ALLOW, 20% DENY; rules over principals, namespaces, ipBlocks and ports.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::write_atomic;

/// The mesh's root namespace (its policies without a selector apply mesh-wide).
pub const ROOT_NAMESPACE: &str = "istio-system";
/// First Pod IP (Pod `i` gets this plus `i`).
const POD_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// First Service VIP.
const SERVICE_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Where moved Pods go (one new address per edit).
const MOVED_BASE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Every this-many-th policy lives in the root namespace.
const ROOT_POLICY_EVERY: usize = 250;

/// How big the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSpec {
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
    pub namespaces: usize,
    pub nodes: usize,
    pub seed: u64,
}

/// One generated Pod, as the benchmark needs to find and edit it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub app: usize,
    pub node: String,
    pub ip: Ipv4Addr,
    uid: String,
    version: u8,
}

impl PodInfo {
    /// The xDS name of its Workload (`<cluster>//Pod/<namespace>/<name>`).
    pub fn workload_uid(&self) -> String {
        format!("Kubernetes//Pod/{}/{}", self.namespace, self.name)
    }

    fn file_name(&self) -> String {
        format!("pod-{}-{}.yaml", self.namespace, self.name)
    }
}

/// One generated AuthorizationPolicy.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    /// Bumped by [`Cluster::edit_policy`]; it is one of the rule's ports (20000 + revision).
    pub revision: u32,
    body: PolicyBody,
}

impl PolicyInfo {
    /// The xDS name of its Authorization (`<namespace>/<name>`).
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone)]
struct PolicyBody {
    selector: Option<String>,
    deny: bool,
    principal: String,
    from_namespace: String,
    ip_block: Option<String>,
    port: u16,
}

/// The generated cluster and its directory.
#[derive(Debug)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub dir: PathBuf,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<PolicyInfo>,
    moved: u32,
    /// Total YAML bytes written at generation.
    pub yaml_bytes: u64,
    /// Files written at generation.
    pub files: usize,
}

/// xorshift64*: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

fn ip_add(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(n as u32))
}

fn namespace_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

/// The node names of a cluster of `nodes` nodes.
pub fn node_names(nodes: usize) -> Vec<String> {
    (0..nodes).map(node_name).collect()
}

impl Cluster {
    /// Generates the cluster into `dir` (created if missing).
    pub fn generate(spec: ClusterSpec, dir: &Path) -> Result<Cluster> {
        anyhow::ensure!(
            spec.namespaces > 0 && spec.nodes > 0 && spec.services > 0,
            "namespaces, nodes and services must be at least 1"
        );
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut rng = Rng::new(spec.seed);
        let mut cluster = Cluster {
            spec,
            dir: dir.to_owned(),
            pods: Vec::with_capacity(spec.pods),
            policies: Vec::with_capacity(spec.policies),
            moved: 0,
            yaml_bytes: 0,
            files: 0,
        };

        let mut ns_yaml = namespace_yaml(ROOT_NAMESPACE, false);
        for n in 0..spec.namespaces {
            ns_yaml.push_str(&namespace_yaml(&namespace_name(n), n.is_multiple_of(2)));
        }
        cluster.write_new("namespaces.yaml", &ns_yaml)?;

        let mut services: Vec<String> = vec![String::new(); spec.namespaces];
        for k in 0..spec.services {
            let ns = k % spec.namespaces;
            services[ns].push_str(&service_yaml(k, &namespace_name(ns)));
        }
        for (n, text) in services.iter().enumerate() {
            if !text.is_empty() {
                cluster.write_new(&format!("services-{}.yaml", namespace_name(n)), text)?;
            }
        }

        for i in 0..spec.pods {
            let app = i % spec.services;
            let pod = PodInfo {
                namespace: namespace_name(app % spec.namespaces),
                name: format!("app-{app}-{i:x}"),
                app,
                node: node_name(rng.below(spec.nodes)),
                ip: ip_add(POD_BASE, i),
                uid: format!("{:016x}-{:08x}", rng.next_u64(), i),
                version: 1 + rng.below(2) as u8,
            };
            cluster.write_new(&pod.file_name(), &pod_yaml(&pod))?;
            cluster.pods.push(pod);
        }

        for j in 0..spec.policies {
            let root = j.is_multiple_of(ROOT_POLICY_EVERY);
            let ns = rng.below(spec.namespaces);
            // Apps of namespace `ns` are k = ns, ns + N, ns + 2N, ...
            let apps_in_ns = spec.services.saturating_sub(ns).div_ceil(spec.namespaces);
            let app = if apps_in_ns > 0 {
                ns + spec.namespaces * rng.below(apps_in_ns)
            } else {
                rng.below(spec.services)
            };
            let selector = if root {
                (!(j / ROOT_POLICY_EVERY).is_multiple_of(2))
                    .then(|| format!("app-{}", rng.below(spec.services)))
            } else {
                rng.chance(60).then(|| format!("app-{app}"))
            };
            let from_ns = rng.below(spec.namespaces);
            let body = PolicyBody {
                selector,
                deny: if root {
                    (j / ROOT_POLICY_EVERY).is_multiple_of(2)
                } else {
                    rng.chance(20)
                },
                principal: format!(
                    "cluster.local/ns/{}/sa/sa-app-{}",
                    namespace_name(from_ns),
                    from_ns + spec.namespaces * rng.below(spec.services.div_ceil(spec.namespaces))
                ),
                from_namespace: namespace_name(rng.below(spec.namespaces)),
                ip_block: rng
                    .chance(50)
                    .then(|| format!("10.{}.0.0/16", 128 + rng.below(64))),
                port: [8080, 9090, 443][rng.below(3)],
            };
            cluster.policies.push(PolicyInfo {
                namespace: if root {
                    ROOT_NAMESPACE.to_owned()
                } else {
                    namespace_name(ns)
                },
                name: format!("policy-{j}"),
                revision: 0,
                body,
            });
        }
        let mut by_ns: std::collections::BTreeMap<&str, String> = Default::default();
        for p in &cluster.policies {
            by_ns
                .entry(&p.namespace)
                .or_default()
                .push_str(&policy_yaml(p));
        }
        let files: Vec<(String, String)> = by_ns
            .into_iter()
            .map(|(ns, text)| (format!("authz-{ns}.yaml"), text))
            .collect();
        for (name, text) in files {
            cluster.write_new(&name, &text)?;
        }
        Ok(cluster)
    }

    fn write_new(&mut self, name: &str, text: &str) -> Result<()> {
        let path = self.dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        self.yaml_bytes += text.len() as u64;
        self.files += 1;
        Ok(())
    }

    /// Moves Pod `i` to a fresh IP (rewriting its file atomically); returns the new IP.
    pub fn move_pod(&mut self, i: usize) -> Result<Ipv4Addr> {
        let ip = ip_add(MOVED_BASE, self.moved as usize);
        self.moved += 1;
        let pod = &mut self.pods[i];
        pod.ip = ip;
        write_atomic(&self.dir.join(pod.file_name()), &pod_yaml(pod))?;
        Ok(ip)
    }

    /// Changes one port of policy `j`'s rule (rewriting its namespace's policy file
    /// atomically; the other policies of the file are unchanged).
    pub fn edit_policy(&mut self, j: usize) -> Result<()> {
        self.policies[j].revision += 1;
        let ns = self.policies[j].namespace.clone();
        let text: String = self
            .policies
            .iter()
            .filter(|p| p.namespace == ns)
            .map(policy_yaml)
            .collect();
        write_atomic(&self.dir.join(format!("authz-{ns}.yaml")), &text)
    }

    /// Address resources (Workloads + Services) the controller should serve.
    pub fn expected_addresses(&self) -> usize {
        self.pods.len() + self.spec.services
    }
}

fn namespace_yaml(name: &str, ambient: bool) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/metadata.name: {name}\n"
    );
    if ambient {
        y.push_str("    istio.io/dataplane-mode: ambient\n");
    }
    y
}

fn service_yaml(k: usize, ns: &str) -> String {
    let vip = ip_add(SERVICE_BASE, k);
    // Every third Service targets a numeric port, the others the container port's name.
    let http_target = if k.is_multiple_of(3) { "8080" } else { "http" };
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: app-{k}
  namespace: {ns}
  labels:
    app: app-{k}
spec:
  type: ClusterIP
  selector:
    app: app-{k}
  clusterIP: {vip}
  clusterIPs:
  - {vip}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: {http_target}
  - name: grpc
    port: 9090
    protocol: TCP
    targetPort: 9090
"
    )
}

fn pod_yaml(p: &PodInfo) -> String {
    let PodInfo {
        namespace,
        name,
        app,
        node,
        ip,
        uid,
        version,
    } = p;
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  uid: '{uid}'
  labels:
    app: app-{app}
    version: v{version}
    pod-template-hash: '{hash:08x}'
  ownerReferences:
  - apiVersion: apps/v1
    kind: ReplicaSet
    name: app-{app}-{hash:08x}
    uid: rs-{app}
    controller: true
spec:
  nodeName: {node}
  serviceAccountName: sa-app-{app}
  containers:
  - name: app
    image: registry.example/app-{app}:1.{version}
    ports:
    - name: http
      containerPort: 8080
      protocol: TCP
    - name: grpc
      containerPort: 9090
      protocol: TCP
status:
  phase: Running
  hostIP: 172.18.0.{host}
  podIP: {ip}
  podIPs:
  - ip: {ip}
  conditions:
  - type: Initialized
    status: 'True'
  - type: Ready
    status: 'True'
  - type: ContainersReady
    status: 'True'
  - type: PodScheduled
    status: 'True'
",
        hash = (*app as u32).wrapping_mul(2_654_435_761),
        host = 2 + node
            .trim_start_matches("node-")
            .parse::<usize>()
            .unwrap_or(0)
            % 250,
    )
}

fn policy_yaml(p: &PolicyInfo) -> String {
    let b = &p.body;
    let mut y = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n",
        p.name, p.namespace
    );
    if let Some(app) = &b.selector {
        let _ = write!(y, "  selector:\n    matchLabels:\n      app: {app}\n");
    }
    let _ = write!(
        y,
        "  action: {}\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n    - source:\n        namespaces: [\"{}\"]\n    to:\n    - operation:\n        ports: [\"{}\", \"{}\"]\n",
        if b.deny { "DENY" } else { "ALLOW" },
        b.principal,
        b.from_namespace,
        b.port,
        20000 + p.revision,
    );
    if let Some(block) = &b.ip_block {
        let _ = write!(
            y,
            "  - from:\n    - source:\n        ipBlocks: [\"{block}\"]\n        notIpBlocks: [\"{}\"]\n",
            block.replace(".0.0/16", ".0.0/24")
        );
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cluster_translates_completely() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ClusterSpec {
            pods: 200,
            services: 20,
            policies: 40,
            namespaces: 5,
            nodes: 7,
            seed: 1,
        };
        let c = Cluster::generate(spec, dir.path()).unwrap();
        let objects = zmesh_controller::source::files::FileSource::new(dir.path())
            .unwrap()
            .load();
        assert_eq!(objects.pods.len(), 200);
        let t = zmesh_controller::translate::translate(
            &objects,
            &zmesh_controller::translate::MeshConfig::default(),
        );
        assert_eq!(t.workloads.len() + t.services.len(), c.expected_addresses());
        assert_eq!(t.authorizations.len(), 40);
        assert!(t.issues.is_empty(), "{:?}", t.issues);
        // Every Service selects its pods, with named ports resolved.
        let w = &t.workloads[&c.pods[1].workload_uid()];
        assert_eq!(w.services.len(), 1);
        let ports = &w.services.values().next().unwrap().ports;
        assert!(
            ports
                .iter()
                .all(|p| p.target_port == 8080 || p.target_port == 9090)
        );
        assert_eq!(ports.len(), 2);
    }
}
