//! `zmesh-lab up --world gamma`: a [`Cluster`] holding the Gateway API mesh conformance fixture
//! ([`fixture`]), enrolled in ambient, that anyone can drive from another shell through the
//! lab's control socket ([`control`]): apply and delete Kubernetes YAML, list pods and
//! Services, run commands in a pod's network namespace.
//!
//! [`World`] is the bookkeeping between the YAML a user applies and the cluster:
//! - a `Pod` becomes a lab pod on a node (`spec.nodeName`, else the nodes in turn), created
//!   through that node's CNI runtime; a `Deployment` becomes `spec.replicas` such pods named
//!   `<deployment>-<hash>` with the template's labels. A pod whose first container's image
//!   names `echo` runs `zmesh-echo` (HTTP 8080, HTTPS 8443, TCP 9090, gRPC 7070, `Hostname=`
//!   the pod's name); other pods run nothing (a network namespace to `exec` in).
//! - a `Namespace`'s labels are set on the lab's namespace object (enrolment follows
//!   `istio.io/dataplane-mode`).
//! - a `Service` gets a cluster IP from 10.96.100.0/24 unless it names one, and is written to
//!   the controller's directory; every other kind (AuthorizationPolicy, Gateway, HTTPRoute,
//!   ...) is written there as it came, for the controller to read or ignore.
//! - every change rewrites the `hosts` file that `exec` puts on the pod's `/etc/hosts`, so
//!   `<svc>.<ns>`, `<svc>.<ns>.svc` and `<svc>.<ns>.svc.cluster.local` resolve to cluster IPs.
//!
//! Input is checked whole before anything changes: a document without `kind` or
//! `metadata.name`, a Deployment without template labels, deleting what does not exist or a
//! Namespace, fail with nothing applied.
//!
//! The waypoint: [`World::start_waypoint`] is the hook that runs the `waypoint` binary as the
//! pod of the mesh namespace's waypoint Gateway when that binary is next to the other binaries;
//! only then is the namespace labelled `istio.io/use-waypoint`, so before the waypoint exists the
//! world is an L4 mesh through ztunnel. [`World::stop_waypoint`] and
//! [`World::restart_waypoint`] (`zmesh-lab waypoint stop|start`) take it down and bring it back
//! while the namespace stays bound, as a crashed and restarted waypoint pod would.

pub mod cli;
pub mod control;
pub mod driver;
pub mod fixture;
mod waypoint;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::cluster::{Cluster, DATAPLANE_MODE, Pod};
use crate::process::Process;

/// How long a new echo pod gets to listen.
pub const APP_READY: Duration = Duration::from_secs(60);

/// The label that binds a namespace to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";

/// A pod the world created, and its app.
#[derive(Debug)]
struct LabPod {
    pod: Pod,
    app: Option<Process>,
    /// The Deployment that made it (`None` for a bare Pod).
    owner: Option<String>,
    labels: BTreeMap<String, String>,
}

/// The lab world; see the module docs.
pub struct World<'c, 's> {
    cluster: &'c Cluster<'s>,
    pods: BTreeMap<(String, String), LabPod>,
    services: BTreeMap<(String, String), Value>,
    /// (kind, namespace, name) of the other objects written to the controller's directory.
    others: BTreeMap<(String, String, String), ()>,
    next_node: usize,
    next_vip: u8,
    hosts: PathBuf,
    waypoint: Option<Process>,
}

/// One parsed document: kind, namespace, name and the document.
struct Doc {
    kind: String,
    namespace: String,
    name: String,
    value: Value,
}

impl Doc {
    fn label(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind.to_lowercase(),
            self.namespace,
            self.name
        )
    }
}

/// The file stem an object is written under in the controller's directory.
fn stem(kind: &str, ns: &str, name: &str) -> String {
    match kind {
        "Service" => format!("svc-{ns}-{name}"),
        _ => format!("obj-{}-{ns}-{name}", kind.to_lowercase()),
    }
}

/// Parses Kubernetes YAML (one or more documents) and checks each names a kind and a name.
fn parse(text: &str) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <Value as serde::Deserialize>::deserialize(de)
            .with_context(|| format!("document {} is not valid YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"]
            .as_str()
            .ok_or_else(|| anyhow!("document {} has no `kind`", i + 1))?
            .to_owned();
        let name = value["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("document {} ({kind}) has no `metadata.name`", i + 1))?
            .to_owned();
        let namespace = match kind.as_str() {
            "Namespace" => String::new(),
            _ => value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
        };
        ensure!(
            !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric()),
            "document {}: kind {kind:?} is not a Kubernetes kind",
            i + 1
        );
        for (what, v) in [("metadata.name", &name), ("metadata.namespace", &namespace)] {
            ensure!(
                is_dns_name(v) || (what == "metadata.namespace" && v.is_empty()),
                "document {} ({kind}): {what} {v:?} is not a valid name (lowercase letters, \
                 digits, '-' and '.', at most 253 characters)",
                i + 1
            );
        }
        docs.push(Doc {
            kind,
            namespace,
            name,
            value,
        });
    }
    ensure!(!docs.is_empty(), "no Kubernetes object in the input");
    Ok(docs)
}

/// A Kubernetes object name (DNS subdomain): what the lab also uses in file and netns names.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// String labels at `v` (a `labels` map).
fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// A stable short suffix, as a ReplicaSet's pod-template hash plays in real pod names.
fn suffix(parts: &[&str]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    let mut n = h.finish();
    let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| {
            let c = alphabet[(n % alphabet.len() as u64) as usize] as char;
            n /= alphabet.len() as u64;
            c
        })
        .collect()
}

/// A binary next to the running one (`ZMESH_BIN_DIR` overrides), if it exists.
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("ZMESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let mut dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    Some(dir.join(name)).filter(|p| p.is_file())
}

impl<'c, 's> World<'c, 's> {
    /// An empty world on `cluster`.
    pub fn new(cluster: &'c Cluster<'s>) -> Result<World<'c, 's>> {
        let w = World {
            cluster,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            others: BTreeMap::new(),
            next_node: 0,
            next_vip: 10,
            hosts: cluster.sandbox().dir().join("hosts"),
            waypoint: None,
        };
        w.write_hosts()?;
        Ok(w)
    }

    /// Brings up the gamma world on `cluster`: the fixture, the waypoint Gateway, and the
    /// waypoint hook ([`World::start_waypoint`]).
    pub fn gamma(cluster: &'c Cluster<'s>) -> Result<World<'c, 's>> {
        let mut w = World::new(cluster)?;
        w.apply(&fixture::manifests())
            .context("applying the mesh conformance fixture")?;
        w.apply(&fixture::waypoint_gateway())
            .context("applying the waypoint Gateway")?;
        w.start_waypoint()?;
        Ok(w)
    }

    /// The cluster.
    pub fn cluster(&self) -> &'c Cluster<'s> {
        self.cluster
    }

    /// The file `exec` mounts on a pod's `/etc/hosts`.
    pub fn hosts_file(&self) -> &Path {
        &self.hosts
    }

    /// Whether the waypoint pod runs.
    pub fn waypoint_running(&self) -> bool {
        self.waypoint.is_some()
    }

    /// The hook that runs the waypoint: when a `waypoint` binary sits next to the other
    /// binaries, creates the waypoint's pod in the mesh namespace (labels
    /// `gateway.networking.k8s.io/gateway-name=namespace`, `gateway.istio.io/managed`, and
    /// `istio.io/dataplane-mode=none`: the waypoint terminates HBONE on 15008 itself, so no
    /// in-pod ztunnel may take that port), its
    /// Service `namespace` (port 15008), starts `waypoint` in the pod's netns with the
    /// controller's address, root and the node's credential in its environment
    /// (`XDS_ADDRESS`, `XDS_ROOT_CA`, `CA_ROOT_CA`, `AUTH_TOKEN`, `POD_NAME`,
    /// `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`, `NODE_NAME`), then labels the mesh
    /// namespace `istio.io/use-waypoint=namespace`. Without the binary it does nothing and
    /// returns `false`: traffic stays L4 through ztunnel.
    pub fn start_waypoint(&mut self) -> Result<bool> {
        let Some(bin) = sibling_binary("waypoint") else {
            return Ok(false);
        };
        let name = fixture::WAYPOINT_NAME;
        let ns = fixture::MESH_NS;
        let sfx = suffix(&[ns, name, "waypoint"]);
        let pod_yaml = format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}-{sfx}
  namespace: {ns}
  labels:
    gateway.networking.k8s.io/gateway-name: {name}
    gateway.istio.io/managed: istio.io-mesh-controller
    istio.io/dataplane-mode: none
spec:
  serviceAccountName: {name}
  containers:
  - name: istio-proxy
    image: zmesh-lab/waypoint
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
  labels:
    gateway.istio.io/managed: istio.io-mesh-controller
spec:
  selector:
    gateway.networking.k8s.io/gateway-name: {name}
  ports:
  - name: mesh
    port: 15008
    targetPort: 15008
"#
        );
        self.apply(&pod_yaml)
            .context("creating the waypoint's pod and Service")?;
        let pod = self.waypoint_pod()?;
        self.waypoint = Some(self.spawn_waypoint(&bin, &pod)?);
        self.cluster.label_namespace(ns, USE_WAYPOINT, Some(name))?;
        Ok(true)
    }

    /// The waypoint's pod.
    fn waypoint_pod(&self) -> Result<Pod> {
        let prefix = format!("{}-", fixture::WAYPOINT_NAME);
        self.pods
            .values()
            .find(|p| p.pod.namespace == fixture::MESH_NS && p.pod.name.starts_with(&prefix))
            .map(|p| p.pod.clone())
            .context("the gamma world has no waypoint pod (it needs the `waypoint` binary next to zmesh-lab: cargo build --workspace --bins)")
    }

    /// Runs `bin` as the waypoint in `pod` (see [`World::start_waypoint`]).
    fn spawn_waypoint(&self, bin: &Path, pod: &Pod) -> Result<Process> {
        let access = self.cluster.controller_access();
        let sb = self.cluster.sandbox();
        let mut cmd = sb.command(Some(&pod.netns), bin, std::iter::empty::<&str>());
        cmd.env("XDS_ADDRESS", &access.address)
            .env("XDS_ROOT_CA", &access.root)
            .env("CA_ROOT_CA", &access.root)
            // Its own credential (the controller sends a waypoint the Services bound to the
            // Gateway it authenticates as), else the node's (then it gets no Services).
            .env(
                "AUTH_TOKEN",
                self.cluster
                    .identity_token(&waypoint_identity())
                    .or_else(|_| self.cluster.node_token(&pod.node))?,
            )
            .env("POD_NAME", &pod.name)
            .env("POD_NAMESPACE", &pod.namespace)
            .env("INSTANCE_IP", pod.ip.to_string())
            .env("SERVICE_ACCOUNT", &pod.service_account)
            .env("NODE_NAME", &pod.node);
        sb.spawn(&format!("waypoint-{}", pod.name), cmd)
    }

    /// Applies Kubernetes YAML (see the module docs); returns one line per object.
    pub fn apply(&mut self, text: &str) -> Result<Vec<String>> {
        let docs = parse(text)?;
        for d in &docs {
            if d.kind == "Deployment" {
                let labels = labels_of(&d.value["spec"]["template"]["metadata"]["labels"]);
                ensure!(
                    !labels.is_empty(),
                    "{}: spec.template.metadata.labels is empty (pods need labels to be selected)",
                    d.label()
                );
            }
            if let Some(node) = d.value["spec"]["nodeName"]
                .as_str()
                .filter(|_| d.kind == "Pod")
            {
                ensure!(
                    self.cluster.nodes().any(|n| n == node),
                    "{}: no node {node:?} in this lab (nodes: {})",
                    d.label(),
                    self.cluster.nodes().collect::<Vec<_>>().join(", ")
                );
            }
        }
        let mut out = Vec::new();
        for d in docs {
            out.push(self.apply_one(d)?);
        }
        self.write_hosts()?;
        Ok(out)
    }

    fn apply_one(&mut self, d: Doc) -> Result<String> {
        let label = d.label();
        match d.kind.as_str() {
            "Namespace" => {
                for (k, v) in labels_of(&d.value["metadata"]["labels"]) {
                    self.cluster.label_namespace(&d.name, &k, Some(&v))?;
                }
                if d.value["metadata"]["labels"][DATAPLANE_MODE].is_null() {
                    self.cluster
                        .label_namespace(&d.name, DATAPLANE_MODE, None)?;
                }
                Ok(format!("{label} configured"))
            }
            "Pod" => {
                let key = (d.namespace.clone(), d.name.clone());
                if self.pods.contains_key(&key) {
                    return Ok(format!("{label} unchanged (pods are not updated in place)"));
                }
                let p = self.create_pod(
                    &d.namespace,
                    &d.name,
                    &d.value["spec"],
                    &d.value["metadata"]["labels"],
                    None,
                )?;
                self.pods.insert(key, p);
                Ok(format!("{label} created"))
            }
            "Deployment" => {
                let replicas = d.value["spec"]["replicas"].as_u64().unwrap_or(1);
                let template = &d.value["spec"]["template"];
                let existing = self.owned(&d.namespace, &d.name);
                if !existing.is_empty() {
                    return Ok(format!(
                        "{label} unchanged (deployments are not updated in place)"
                    ));
                }
                for i in 0..replicas {
                    let name = format!(
                        "{}-{}",
                        d.name,
                        suffix(&[&d.namespace, &d.name, &i.to_string()])
                    );
                    let p = self.create_pod(
                        &d.namespace,
                        &name,
                        &template["spec"],
                        &template["metadata"]["labels"],
                        Some(&d.name),
                    )?;
                    self.pods.insert((d.namespace.clone(), name), p);
                }
                Ok(format!("{label} created ({replicas} pod(s))"))
            }
            "Service" => {
                let key = (d.namespace.clone(), d.name.clone());
                let mut doc = d.value;
                let vip = match doc["spec"]["clusterIP"].as_str() {
                    Some(ip) => ip.to_owned(),
                    None => match self.services.get(&key) {
                        Some(old) => old["spec"]["clusterIP"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        None => self.allocate_vip()?.to_string(),
                    },
                };
                doc["metadata"]["namespace"] = json!(d.namespace);
                doc["spec"]["clusterIP"] = json!(vip);
                doc["spec"]["clusterIPs"] = json!([vip]);
                let existed = self.services.contains_key(&key);
                self.cluster.apply_yaml(
                    &stem("Service", &d.namespace, &d.name),
                    &serde_yaml::to_string(&doc)?,
                )?;
                self.services.insert(key, doc);
                Ok(format!(
                    "{label} {}",
                    if existed { "configured" } else { "created" }
                ))
            }
            kind => {
                let mut doc = d.value;
                if !d.namespace.is_empty() {
                    doc["metadata"]["namespace"] = json!(d.namespace);
                }
                self.cluster.apply_yaml(
                    &stem(kind, &d.namespace, &d.name),
                    &serde_yaml::to_string(&doc)?,
                )?;
                let existed = self
                    .others
                    .insert((kind.to_owned(), d.namespace, d.name), ())
                    .is_some();
                Ok(format!(
                    "{label} {}",
                    if existed { "configured" } else { "created" }
                ))
            }
        }
    }

    /// Deletes the objects the YAML names; returns one line per object.
    pub fn delete(&mut self, text: &str) -> Result<Vec<String>> {
        let docs = parse(text)?;
        for d in &docs {
            let (ns, name) = (d.namespace.clone(), d.name.clone());
            let exists = match d.kind.as_str() {
                "Namespace" => bail!(
                    "{}: the lab does not delete namespaces; delete the objects in it",
                    d.label()
                ),
                "Pod" => self.pods.contains_key(&(ns, name)),
                "Deployment" => !self.owned(&ns, &name).is_empty(),
                "Service" => self.services.contains_key(&(ns, name)),
                kind => self.others.contains_key(&(kind.to_owned(), ns, name)),
            };
            ensure!(exists, "{} not found: nothing deleted", d.label());
        }
        let mut out = Vec::new();
        for d in docs {
            let (ns, name) = (d.namespace.clone(), d.name.clone());
            match d.kind.as_str() {
                "Pod" => self.delete_pod(&ns, &name)?,
                "Deployment" => {
                    for pod in self.owned(&ns, &name) {
                        self.delete_pod(&ns, &pod)?;
                    }
                }
                "Service" => {
                    self.cluster.delete_yaml(&stem("Service", &ns, &name))?;
                    self.services.remove(&(ns, name));
                }
                kind => {
                    self.cluster.delete_yaml(&stem(kind, &ns, &name))?;
                    self.others.remove(&(kind.to_owned(), ns, name));
                }
            }
            out.push(format!("{} deleted", d.label()));
        }
        self.write_hosts()?;
        Ok(out)
    }

    /// The pods of a Deployment.
    fn owned(&self, ns: &str, deployment: &str) -> Vec<String> {
        self.pods
            .iter()
            .filter(|((n, _), p)| n == ns && p.owner.as_deref() == Some(deployment))
            .map(|((_, name), _)| name.clone())
            .collect()
    }

    fn delete_pod(&mut self, ns: &str, name: &str) -> Result<()> {
        if let Some(p) = self.pods.remove(&(ns.to_owned(), name.to_owned())) {
            if let Some(app) = p.app {
                let _ = app.terminate(Duration::from_secs(2));
            }
            self.cluster.delete_pod(&p.pod)?;
        }
        Ok(())
    }

    fn allocate_vip(&mut self) -> Result<IpAddr> {
        let used: Vec<String> = self
            .services
            .values()
            .filter_map(|s| s["spec"]["clusterIP"].as_str().map(str::to_owned))
            .collect();
        for _ in 0..250 {
            let ip = Ipv4Addr::new(10, 96, 100, self.next_vip);
            self.next_vip = if self.next_vip >= 250 {
                10
            } else {
                self.next_vip + 1
            };
            if !used.contains(&ip.to_string()) {
                return Ok(ip.into());
            }
        }
        bail!("no free cluster IP left in 10.96.100.0/24: delete a Service")
    }

    fn create_pod(
        &mut self,
        ns: &str,
        name: &str,
        spec: &Value,
        labels: &Value,
        owner: Option<&str>,
    ) -> Result<LabPod> {
        let nodes: Vec<&str> = self.cluster.nodes().collect();
        let node = match spec["nodeName"].as_str() {
            Some(n) => n.to_owned(),
            None => {
                self.next_node += 1;
                nodes[(self.next_node - 1) % nodes.len()].to_owned()
            }
        };
        let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
        let labels = labels_of(labels);
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let pod = self
            .cluster
            .create_pod(&node, ns, name, sa, &pairs)
            .with_context(|| format!("creating pod {ns}/{name} on {node}"))?;
        let image = spec["containers"][0]["image"].as_str().unwrap_or_default();
        let app = if image.contains("echo") {
            Some(self.start_echo(&pod, labels.get("version").map_or("", String::as_str))?)
        } else {
            None
        };
        Ok(LabPod {
            pod,
            app,
            owner: owner.map(str::to_owned),
            labels,
        })
    }

    /// Runs `zmesh-echo` in the pod and waits until it listens.
    fn start_echo(&self, pod: &Pod, version: &str) -> Result<Process> {
        let bin = sibling_binary("zmesh-echo")
            .context("zmesh-echo not found next to this binary: cargo build --workspace --bins")?;
        let sb = self.cluster.sandbox();
        let args = [
            "--hostname".to_owned(),
            pod.name.clone(),
            "--namespace".to_owned(),
            pod.namespace.clone(),
            "--version".to_owned(),
            version.to_owned(),
            "--port".to_owned(),
            fixture::ECHO_HTTP_PORT.to_string(),
            "--tls-port".to_owned(),
            fixture::ECHO_TLS_PORT.to_string(),
            "--tcp".to_owned(),
            fixture::ECHO_TCP_PORT.to_string(),
            "--grpc".to_owned(),
            fixture::ECHO_GRPC_PORT.to_string(),
        ];
        let proc = sb.spawn(
            &format!("echo-{}", pod.name),
            sb.command(Some(&pod.netns), &bin, &args),
        )?;
        let deadline = Instant::now() + APP_READY;
        while !self
            .cluster
            .listening(&pod.netns, fixture::ECHO_GRPC_PORT)?
        {
            if !proc.is_running() || Instant::now() > deadline {
                bail!(
                    "zmesh-echo in {}/{} did not start listening; its log:\n{}",
                    pod.namespace,
                    pod.name,
                    crate::process::tail(&proc.log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proc)
    }

    /// Rewrites the hosts file: every Service's names to its cluster IP.
    fn write_hosts(&self) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for ((ns, name), svc) in &self.services {
            if let Some(ip) = svc["spec"]["clusterIP"].as_str() {
                text.push_str(&format!(
                    "{ip} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}\n"
                ));
            }
        }
        crate::write_atomic(&self.hosts, &text)
    }

    /// The nodes' ztunnel pods (`istio-system/ztunnel-<node>`).
    fn ztunnel_pods(&self) -> Vec<&'c Pod> {
        self.cluster
            .nodes()
            .filter_map(|n| self.cluster.ztunnel_pod(n).ok())
            .collect()
    }

    /// `get pods`: namespace, name, IP, node, labels, enrolment and app of every pod, the
    /// nodes' ztunnel pods included.
    pub fn pods_json(&self) -> Value {
        let ztunnels = self.ztunnel_pods().into_iter().map(|p| {
            json!({
                "namespace": p.namespace,
                "name": p.name,
                "ip": p.ip.to_string(),
                "ips": [p.ip.to_string()],
                "node": p.node,
                "serviceAccount": p.service_account,
                "labels": {"app": "ztunnel"},
                "enrolled": false,
                "app": "ztunnel",
                "netns": p.netns,
            })
        });
        let apps = self.pods.values().map(|p| {
            json!({
                "namespace": p.pod.namespace,
                "name": p.pod.name,
                "ip": p.pod.ip.to_string(),
                "ips": [p.pod.ip.to_string()],
                "node": p.pod.node,
                "serviceAccount": p.pod.service_account,
                "labels": p.labels,
                "enrolled": self.cluster.is_enrolled(&p.pod.namespace, &p.pod.name),
                "app": p.app.as_ref().map(|_| "zmesh-echo"),
                "netns": p.pod.netns,
            })
        });
        ztunnels.chain(apps).collect()
    }

    /// `get services`: namespace, name, cluster IPs, ports and selector of every Service.
    pub fn services_json(&self) -> Value {
        self.services
            .iter()
            .map(|((ns, name), s)| {
                json!({
                    "namespace": ns,
                    "name": name,
                    "clusterIP": s["spec"]["clusterIP"],
                    "clusterIPs": s["spec"]["clusterIPs"],
                    "ports": s["spec"]["ports"],
                    "selector": s["spec"]["selector"],
                })
            })
            .collect()
    }

    /// The network namespace of `namespace/name`.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Result<String> {
        self.pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|p| p.pod.netns.clone())
            .or_else(|| {
                self.ztunnel_pods()
                    .into_iter()
                    .find(|p| p.namespace == namespace && p.name == name)
                    .map(|p| p.netns.clone())
            })
            .ok_or_else(|| {
                anyhow!("no pod {namespace}/{name}; `zmesh-lab get pods -o wide` lists them")
            })
    }
}

/// The SPIFFE identity of the world's waypoint: its Gateway's service account (Istio names
/// the waypoint's service account after the Gateway).
pub fn waypoint_identity() -> String {
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        crate::mesh::TRUST_DOMAIN,
        fixture::MESH_NS,
        fixture::WAYPOINT_NAME
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_documents_the_lab_cannot_name() {
        let ok = parse("kind: Service\nmetadata: {name: a, namespace: b}\n---\n").unwrap();
        assert_eq!((ok.len(), ok[0].namespace.as_str()), (1, "b"));
        let default = parse("kind: Pod\nmetadata: {name: p}\n").unwrap();
        assert_eq!(default[0].namespace, "default");
        for (bad, why) in [
            ("kind: Pod\nmetadata: {name: ../x}\n", "not a valid name"),
            (
                "kind: Pod\nmetadata: {name: x, namespace: A}\n",
                "not a valid name",
            ),
            ("kind: a/b\nmetadata: {name: x}\n", "not a Kubernetes kind"),
            ("kind: Pod\n", "no `metadata.name`"),
            ("metadata: {name: x}\n", "no `kind`"),
            ("---\n", "no Kubernetes object"),
            ("kind: [\n", "not valid YAML"),
        ] {
            let e = parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(why), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn suffixes_are_stable_and_distinct() {
        assert_eq!(suffix(&["a", "b"]), suffix(&["a", "b"]));
        assert_ne!(suffix(&["a", "b"]), suffix(&["b", "a"]));
        assert_eq!(suffix(&["x"]).len(), 5);
    }
}
