//! A multi-node cluster as on real Kubernetes, inside one [`Sandbox`]: nodes on a bridge, each
//! with its pod network (a real primary CNI: Debian's `bridge` + `host-local`), its node agent
//! (`zmesh-cni-agent`, which chains `zmesh-cni` into the node's conflist) and its ztunnel,
//! itself a pod set up through the node's CNI runtime; pods are created the way kubelet does
//! it: the API object first, then the runtime's CNI ADD.
//!
//! ```text
//!  sandbox root netns: br0 10.200.0.1/24 ── v-n1 ── v-n2        (node links: Cluster::node_link)
//!    zmesh-controller on 10.200.0.1:15012: watches pods/, serves delta xDS and the CA
//!                                            ║        ║
//!  netns n1: eth0 10.200.0.2 ════════════════╝        ╚═══ netns n2: eth0 10.200.0.3
//!    ip_forward=1; 10.244.2.0/24 via 10.200.0.3              (the same; 10.244.1.0/24 via .2)
//!    zmesh-cni-agent (host network): pods dir, agent.sock, ZDS socket
//!    cni0 10.244.1.1/24 (bridge plugin, pods' gateway)
//!      ├── netns pod-ztunnel-n1  10.244.1.2  istio-system/ztunnel-n1: `ztunnel` in shared
//!      │                                     mode, INPOD_UDS = the agent's ZDS socket, config
//!      │                                     and certificates from the controller
//!      ├── netns pod-client      10.244.1.3  an enrolled pod: nft tables zmesh-*, and
//!      │                                     ztunnel's 15001/15006/15008 listening inside it
//!      └── netns pod-plain       10.244.1.4  an unenrolled pod: untouched
//! ```
//!
//! Files, under the sandbox's directory:
//!
//! ```text
//!  pods/ns-<ns>.yaml, pods/pod-<ns>-<name>.yaml,  the "API server": watched by every agent
//!  pods/svc-<ns>-<name>.yaml                      and by the controller
//!  cluster-root-ca.{pem,key}                      the mesh's CA (the controller signs with it)
//!  controller/node-tokens, controller/token-<node> per-node credentials (controller, ztunnel)
//!  controller.log
//!  <node>/net.d/10-lab.conflist                   primary network; the agent chains zmesh-cni
//!  <node>/bin/zmesh-cni                           installed there by the agent
//!  <node>/run/{agent.sock,ztunnel.sock,pods.json} the agent's API, ZDS socket and state
//!  <node>/ipam/, <node>/zmesh-cni.log             host-local leases, the plugin's log
//!  agent-<node>.log, ztunnel-pod-ztunnel-<node>.log, cni-cache-<node>/
//! ```
//!
//! Node `i` (from 0) gets the pod CIDR `10.244.<i+1>.0/24`; every node routes every other
//! node's pod CIDR via that node's address, so pod traffic between nodes crosses the bridge
//! unencapsulated and unmasqueraded (as with a flat pod network), and a [`Capture`] on
//! [`Cluster::node_link`] shows exactly what went over the wire.
//!
//! Pod names must be unique across namespaces (the pod netns is `pod-<name>`).
//!
//! [`Capture`]: crate::capture::Capture

mod node;
mod objects;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use self::node::{AGENT_TIMEOUT, NodeDirs, agent_ready_status};
pub use self::objects::{DATAPLANE_MODE, MESH_NAMESPACE};
use self::objects::{Objects, PodObject};
use crate::controller::{self, CONTROLLER_PORT, ControllerSpec, NodeTokens};
use crate::lab::Topology;
use crate::manifests::Manifests;
use crate::mesh::{self, CaFiles, TRUST_DOMAIN, ZtunnelPod};
use crate::process::Process;
use crate::runtime::{DEBIAN_CNI_BIN, PluginError, PodSandbox, Runtime};
use crate::sandbox::Sandbox;
use crate::ztunnel::Ztunnel;

/// How long [`Cluster::create_pod`] retries an ADD that failed with CNI code 11.
pub const ADD_RETRY: Duration = Duration::from_secs(15);

/// A running pod.
#[derive(Clone, Debug)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The node it runs on.
    pub node: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// Its address on the pod network (from the CNI result).
    pub ip: IpAddr,
    /// Its network namespace (a netns name in the sandbox: `pod-<name>`).
    pub netns: String,
    /// Whether, by its labels and its namespace's, the mesh captures it (at creation).
    pub enrolled: bool,
    /// The runtime's view of it (uid, container id).
    pub sandbox: PodSandbox,
}

impl Pod {
    /// Its SPIFFE identity, `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// `ip:port`.
    pub fn addr(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, port)
    }
}

/// One node: its files, CNI runtime and mesh daemons.
struct Node<'s> {
    name: String,
    dirs: NodeDirs,
    runtime: Runtime<'s>,
    agent: Option<Process>,
    ztunnel: Option<Ztunnel>,
    ztunnel_pod: Pod,
}

/// The cluster; see the module docs. Everything lives as long as the [`Sandbox`].
pub struct Cluster<'s> {
    sb: &'s Sandbox,
    topo: Topology<'s>,
    ca: CaFiles,
    pods_dir: PathBuf,
    controller_spec: ControllerSpec,
    controller: Option<Process>,
    tokens: NodeTokens,
    /// Extra environment of every ztunnel (e.g. `SECRET_TTL`).
    ztunnel_env: Vec<(String, String)>,
    objects: Mutex<Objects>,
    nodes: Vec<Node<'s>>,
    /// The install the components run as (flags, environment, capabilities).
    manifests: Manifests,
}

impl std::fmt::Debug for Cluster<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
            )
            .field("pods_dir", &self.pods_dir)
            .finish_non_exhaustive()
    }
}

/// Whether a pod creation failed with CNI code 11 ("try again later").
fn is_try_again(e: &anyhow::Error) -> bool {
    e.downcast_ref::<PluginError>()
        .is_some_and(|p| p.code == 11)
}

/// The (first address, protocol) of every workload of a local config or a config dump.
fn workload_set(doc: &serde_json::Value) -> std::collections::BTreeSet<(String, String)> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    doc["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| (text(&w["workloadIps"][0]), text(&w["protocol"])))
        .collect()
}

/// The pod CIDR of the node at `index`.
pub fn pod_cidr(index: usize) -> String {
    format!("10.244.{}.0/24", index + 1)
}

impl<'s> Cluster<'s> {
    /// Builds the cluster (see the module docs) and waits until every node's agent has chained
    /// its plugin, its ztunnel is ready and the agent sees it (`/v1/ready` is 200).
    pub fn up(sb: &'s Sandbox, nodes: &[&str]) -> Result<Cluster<'s>> {
        Self::up_with(sb, nodes, &[])
    }

    /// [`Cluster::up`] with extra environment for every ztunnel (e.g. a short `SECRET_TTL`).
    pub fn up_with(
        sb: &'s Sandbox,
        nodes: &[&str],
        ztunnel_env: &[(&str, &str)],
    ) -> Result<Cluster<'s>> {
        Self::up_from(sb, nodes, ztunnel_env, Manifests::rendered()?)
    }

    /// [`Cluster::up_with`] running the components as `manifests` (instead of the checked-in
    /// install) says: a test that takes a capability or a flag out sees its effect.
    pub fn up_from(
        sb: &'s Sandbox,
        nodes: &[&str],
        ztunnel_env: &[(&str, &str)],
        manifests: Manifests,
    ) -> Result<Cluster<'s>> {
        Self::up_with_identities(sb, nodes, ztunnel_env, manifests, &[])
    }

    /// [`Cluster::up_from`] that also gives the controller a credential for each `(node,
    /// spiffe id)` of `identities` (e.g. a waypoint's), see [`Cluster::identity_token`].
    pub fn up_with_identities(
        sb: &'s Sandbox,
        nodes: &[&str],
        ztunnel_env: &[(&str, &str)],
        manifests: Manifests,
        identities: &[(&str, &str)],
    ) -> Result<Cluster<'s>> {
        if nodes.len() > 200 {
            bail!("at most 200 nodes (one 10.244.x.0/24 each)");
        }
        let topo = Topology::build(sb, nodes)?;
        for (i, node) in nodes.iter().enumerate() {
            // The controller, in the sandbox's root netns, answers ztunnel pods on every node.
            let via = topo.host_ip(node).to_string();
            sb.run(&["ip", "route", "add", &pod_cidr(i), "via", &via])?;
            sb.run_in(node, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
            for (j, other) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                let via = topo.host_ip(other).to_string();
                sb.run_in(node, &["ip", "route", "add", &pod_cidr(j), "via", &via])?;
            }
        }
        let ca = mesh::write_ca(sb.dir(), "cluster-root")?;
        let pods_dir = sb.dir().join("pods");
        let mut objects = Objects::new(&pods_dir)?;
        objects.ensure_namespace(MESH_NAMESPACE)?;
        let tokens = NodeTokens::generate_with(&sb.dir().join("controller"), nodes, identities)?;
        let controller_spec = ControllerSpec {
            netns: None,
            listen: std::net::SocketAddr::new(topo.bridge_ip().into(), CONTROLLER_PORT),
            config_dir: pods_dir.clone(),
            tokens: tokens.file.clone(),
            ca_cert: ca.cert.clone(),
            ca_key: ca.key.clone(),
            debounce: Duration::from_millis(20),
        };
        let controller = controller::spawn(sb, &manifests, &controller_spec)?;
        let mut cluster = Cluster {
            sb,
            topo,
            ca,
            pods_dir,
            controller_spec,
            controller: Some(controller),
            tokens,
            ztunnel_env: ztunnel_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            objects: Mutex::new(objects),
            nodes: Vec::new(),
            manifests,
        };
        for (i, node) in nodes.iter().enumerate() {
            let n = cluster
                .start_node(node, i)
                .with_context(|| format!("bringing up node {node}"))?;
            cluster.nodes.push(n);
        }
        Ok(cluster)
    }

    /// Brings one node up: network config, agent, ztunnel pod, ztunnel.
    fn start_node(&self, name: &str, index: usize) -> Result<Node<'s>> {
        let dirs = NodeDirs::create(self.sb.dir(), name)?;
        node::write_primary_network(&dirs, &pod_cidr(index))?;
        let agent = node::spawn_agent(
            self.sb,
            &self.manifests,
            name,
            self.topo.host_ip(name).into(),
            &dirs,
            &self.pods_dir,
            &[],
        )?;
        let runtime = Runtime::new(
            self.sb,
            name,
            &dirs.conf_dir,
            &[Path::new(DEBIAN_CNI_BIN), &dirs.bin_dir],
        )?;
        // The ztunnel pod is excluded from the plugin: its ADD needs no agent or ztunnel.
        let labels = BTreeMap::from([("app".to_owned(), "ztunnel".to_owned())]);
        let pod_name = format!("ztunnel-{name}");
        let ztunnel_pod =
            self.run_pod(&runtime, name, MESH_NAMESPACE, &pod_name, "ztunnel", labels)?;
        let ztunnel = self.spawn_ztunnel(name, &dirs, &ztunnel_pod)?;
        node::wait_agent_ready(&agent, &dirs)?;
        Ok(Node {
            name: name.to_owned(),
            dirs,
            runtime,
            agent: Some(agent),
            ztunnel: Some(ztunnel),
            ztunnel_pod,
        })
    }

    /// Starts a ztunnel in `pod` (the node's ztunnel pod) against the controller, with the
    /// node's credential.
    fn spawn_ztunnel(&self, node: &str, dirs: &NodeDirs, pod: &Pod) -> Result<Ztunnel> {
        node::spawn_ztunnel(
            self.sb,
            &self.manifests,
            &pod.netns,
            dirs,
            &self.controller_spec.access(),
            &ZtunnelPod {
                node,
                namespace: &pod.namespace,
                name: &pod.name,
                ip: pod.ip,
                token: self.tokens.of(node)?,
            },
            &self.ztunnel_env,
        )
    }

    fn objects(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node(&self, name: &str) -> Result<&Node<'s>> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in this cluster"))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut Node<'s>> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in this cluster"))
    }

    /// Creates a pod as kubelet does: writes its object (with `nodeName`, the uid the runtime
    /// will pass, the service account and labels) first, then runs the node's CNI ADD, then
    /// records its IP in the object's status and in the mesh config (HBONE if the mesh
    /// enrols it, TCP otherwise), and waits until every ztunnel has loaded that config.
    ///
    /// Like kubelet, it retries an ADD that failed with "try again later" (CNI code 11), for
    /// up to [`ADD_RETRY`]: an agent may not have read the new object yet. See
    /// [`Cluster::try_create_pod`] for a single attempt.
    pub fn create_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let deadline = Instant::now() + ADD_RETRY;
        loop {
            match self.try_create_pod(node, namespace, name, service_account, labels) {
                Err(e) if Instant::now() < deadline && is_try_again(&e) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// [`Cluster::create_pod`] with exactly one CNI ADD: a failed ADD (e.g.
    /// [`PluginError`] code 11 while the agent is down) is returned, leaving the object
    /// without an IP; calling again retries.
    pub fn try_create_pod(
        &self,
        node: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let runtime = &self.node(node)?.runtime;
        self.run_pod(runtime, node, namespace, name, service_account, labels)
    }

    fn run_pod(
        &self,
        runtime: &Runtime<'s>,
        node: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Pod> {
        let mut object = PodObject {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            service_account: service_account.to_owned(),
            labels,
            ip: None,
            ready: true,
        };
        self.objects().put_pod(object.clone())?;
        let sandbox = PodSandbox::new(namespace, name);
        let result = runtime.add(&sandbox)?;
        let cidr = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("CNI result without an address: {result}"))?;
        let ip: IpAddr = cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("CNI result address {cidr:?}"))?;
        object.ip = Some(ip);
        let mut objects = self.objects();
        let enrolled = objects.enrolled(&object);
        objects.put_pod(object)?;
        drop(objects);
        self.wait_mesh_synced()?;
        Ok(Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            service_account: service_account.to_owned(),
            ip,
            netns: sandbox.netns.clone(),
            enrolled,
            sandbox,
        })
    }

    /// Deletes a pod as kubelet does: CNI DEL (which releases it from the mesh and removes
    /// its netns), then its object and workload entry.
    pub fn delete_pod(&self, pod: &Pod) -> Result<()> {
        let del = self.node(&pod.node)?.runtime.del(&pod.sandbox);
        self.objects().delete_pod(&pod.namespace, &pod.name)?;
        self.wait_mesh_synced()?;
        del
    }

    /// Sets the pod's `Ready` condition, as kubelet reports it when a container stops or
    /// passes its readiness probe again; the controller publishes the workload unhealthy or
    /// healthy accordingly.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) -> Result<()> {
        let mut objects = self.objects();
        let mut pod = objects
            .pod(namespace, name)
            .cloned()
            .ok_or_else(|| anyhow!("no pod {namespace}/{name} in this cluster"))?;
        pod.ready = ready;
        objects.put_pod(pod)
    }

    /// Sets (`Some("ambient")`, `Some("none")`) or removes the namespace's
    /// `istio.io/dataplane-mode` label; the agents react to the change, and the mesh config
    /// follows it.
    pub fn set_namespace_label(&self, namespace: &str, mode: Option<&str>) -> Result<()> {
        self.objects().set_namespace_mode(namespace, mode)?;
        self.wait_mesh_synced()
    }

    /// Sets (`Some`) or removes (`None`) any label of a namespace (created if new), e.g.
    /// `istio.io/use-waypoint`; the controller follows the change.
    pub fn label_namespace(&self, namespace: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.objects().set_namespace_label(namespace, key, value)?;
        self.wait_mesh_synced()
    }

    /// Waits until every running ztunnel has loaded the current mesh config (the same
    /// workload addresses and protocols in its `/config_dump`), as a test would wait for an
    /// xDS push: a connection to a pod its ztunnel does not know yet is passed through in
    /// plaintext.
    pub fn wait_mesh_synced(&self) -> Result<()> {
        let want = workload_set(&serde_json::to_value(self.objects().local_config())?);
        for node in &self.nodes {
            let Some(zt) = &node.ztunnel else { continue };
            let deadline = Instant::now() + AGENT_TIMEOUT;
            loop {
                let dump: serde_json::Value = serde_json::from_str(&zt.config_dump()?)?;
                let have = workload_set(&dump);
                if have == want {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the ztunnel of {} did not load the mesh config: has {have:?}, want {want:?}",
                        node.name
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Whether the mesh enrols `namespace/name` according to the current objects.
    pub fn is_enrolled(&self, namespace: &str, name: &str) -> bool {
        let objects = self.objects();
        objects
            .pod(namespace, name)
            .is_some_and(|p| objects.enrolled(p))
    }

    /// The sandbox the cluster lives in.
    pub fn sandbox(&self) -> &'s Sandbox {
        self.sb
    }

    /// The node names, in order.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    /// A node's address on the bridge.
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.topo.host_ip(node)
    }

    /// The bridge-side end of a node's link, where a capture sees everything the node's pods
    /// exchange with other nodes. Panics on an unknown node.
    pub fn node_link(&self, node: &str) -> String {
        self.topo.veth(node)
    }

    /// The install the components run as.
    pub fn manifests(&self) -> &Manifests {
        &self.manifests
    }

    /// The shared pods directory (the "API server").
    pub fn pods_dir(&self) -> &Path {
        &self.pods_dir
    }

    /// The controller process (`None` while stopped).
    pub fn controller(&self) -> Option<&Process> {
        self.controller.as_ref()
    }

    /// The file holding a node's credential for the controller.
    pub fn node_token(&self, node: &str) -> Result<&Path> {
        self.tokens.of(node)
    }

    /// The file holding the credential of a workload identity given to
    /// [`Cluster::up_with_identities`].
    pub fn identity_token(&self, id: &str) -> Result<&Path> {
        self.tokens.of_identity(id)
    }

    /// The controller's address and the root to verify it with.
    pub fn controller_access(&self) -> controller::ControllerAccess {
        self.controller_spec.access()
    }

    /// Stops the controller (SIGTERM). The ztunnels keep their last config and certificates.
    pub fn stop_controller(&mut self) -> Result<()> {
        if let Some(c) = self.controller.take() {
            node::stop(&c, node::STOP_GRACE)?;
        }
        Ok(())
    }

    /// Kills the controller with SIGKILL, as a crash or an OOM kill does: no drain, its
    /// streams end without a goodbye. The ztunnels keep their last config and certificates.
    pub fn kill_controller(&mut self) -> Result<()> {
        if let Some(c) = self.controller.take() {
            c.kill().context("killing the controller")?;
        }
        Ok(())
    }

    /// Starts the controller again (same directory, CA and credentials) and waits until it
    /// listens.
    pub fn start_controller(&mut self) -> Result<()> {
        if self.controller.is_some() {
            bail!("the controller is already running");
        }
        self.controller = Some(controller::spawn(
            self.sb,
            &self.manifests,
            &self.controller_spec,
        )?);
        Ok(())
    }

    /// Writes a Service (selector, cluster IP, (port, target port) pairs) into the "API
    /// server" directory. Returns at once: the controller pushes it to the ztunnels shortly
    /// after (poll for the effect).
    pub fn put_service(
        &self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        vip: IpAddr,
        ports: &[(u16, u16)],
    ) -> Result<()> {
        let selector = selector
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.objects()
            .put_service(namespace, name, &selector, vip, ports)
    }

    /// Writes Kubernetes YAML (e.g. AuthorizationPolicies) as `<stem>.yaml` into the "API
    /// server" directory; the controller picks it up shortly after (poll for the effect).
    pub fn apply_yaml(&self, stem: &str, text: &str) -> Result<()> {
        self.objects().put_yaml(stem, text)
    }

    /// Deletes what [`Cluster::apply_yaml`] wrote under `stem`.
    pub fn delete_yaml(&self, stem: &str) -> Result<()> {
        self.objects().delete_yaml(stem)
    }

    /// Deletes a Service's object (the controller pushes the removal).
    pub fn delete_service(&self, namespace: &str, name: &str) -> Result<()> {
        self.objects().delete_service(namespace, name)
    }

    /// The mesh's CA.
    pub fn ca(&self) -> &CaFiles {
        &self.ca
    }

    /// A node's directories.
    pub fn dirs(&self, node: &str) -> Result<&NodeDirs> {
        Ok(&self.node(node)?.dirs)
    }

    /// A node's agent process (`None` while stopped).
    pub fn agent(&self, node: &str) -> Result<Option<&Process>> {
        Ok(self.node(node)?.agent.as_ref())
    }

    /// A node's ztunnel. Fails while it is stopped.
    pub fn ztunnel(&self, node: &str) -> Result<&Ztunnel> {
        self.node(node)?
            .ztunnel
            .as_ref()
            .ok_or_else(|| anyhow!("the ztunnel of {node} is stopped"))
    }

    /// A node's ztunnel pod.
    pub fn ztunnel_pod(&self, node: &str) -> Result<&Pod> {
        Ok(&self.node(node)?.ztunnel_pod)
    }

    /// The agent's `GET /v1/ready` status (an error while it is down).
    pub fn agent_ready(&self, node: &str) -> Result<u16> {
        agent_ready_status(&self.node(node)?.dirs.agent_socket())
    }

    /// Stops a node's agent (SIGTERM). Rules, state and the conflist entry stay; new mesh
    /// pods fail ADD until it is back.
    pub fn stop_agent(&mut self, node: &str) -> Result<()> {
        if let Some(agent) = self.node_mut(node)?.agent.take() {
            node::stop(&agent, node::STOP_GRACE)?;
        }
        Ok(())
    }

    /// Starts a node's agent again with the same directories, and waits until its plugin
    /// entry is chained and a ztunnel has reconnected to it.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        self.start_agent_with(node, &[])
    }

    /// [`Cluster::start_agent`] with extra environment for the agent (e.g. the fault
    /// injection of `cni-plugin/src/agent/fault.rs`).
    pub fn start_agent_with(&mut self, node: &str, env: &[(&str, &str)]) -> Result<()> {
        let n = self.node(node)?;
        if n.agent.is_some() {
            bail!("the agent of {node} is already running");
        }
        let agent = node::spawn_agent(
            self.sb,
            &self.manifests,
            node,
            self.topo.host_ip(node).into(),
            &n.dirs,
            &self.pods_dir,
            env,
        )?;
        let n = self.node_mut(node)?;
        let ready = node::wait_agent_ready(&agent, &n.dirs);
        n.agent = Some(agent);
        ready
    }

    /// [`Cluster::stop_agent`] then [`Cluster::start_agent`].
    pub fn restart_agent(&mut self, node: &str) -> Result<()> {
        self.stop_agent(node)?;
        self.start_agent(node)
    }

    /// Stops a node's ztunnel (SIGTERM; it drains first). The pods' rules stay: their
    /// traffic fails (closed) until a ztunnel is back.
    pub fn stop_ztunnel(&mut self, node: &str) -> Result<()> {
        if let Some(zt) = self.node_mut(node)?.ztunnel.take() {
            zt.stop()?;
        }
        Ok(())
    }

    /// Kills a node's ztunnel with SIGKILL: no drain; its listeners in the pods vanish with
    /// it, the pods' rules stay, so their traffic fails (closed) until a ztunnel is back.
    pub fn kill_ztunnel(&mut self, node: &str) -> Result<()> {
        if let Some(zt) = self.node_mut(node)?.ztunnel.take() {
            zt.kill()
                .with_context(|| format!("killing the ztunnel of {node}"))?;
        }
        Ok(())
    }

    /// Starts a node's ztunnel again in its pod, and waits until it is ready (it has the
    /// agent's snapshot, so every enrolled pod's proxy is back) and the agent sees it.
    pub fn start_ztunnel(&mut self, node: &str) -> Result<()> {
        let n = self.node(node)?;
        if n.ztunnel.is_some() {
            bail!("the ztunnel of {node} is already running");
        }
        let zt = self.spawn_ztunnel(node, &n.dirs, &n.ztunnel_pod)?;
        let n = self.node_mut(node)?;
        n.ztunnel = Some(zt);
        if let Some(agent) = &n.agent {
            node::wait_agent_ready(agent, &n.dirs)?;
        }
        Ok(())
    }

    /// [`Cluster::stop_ztunnel`] then [`Cluster::start_ztunnel`].
    pub fn restart_ztunnel(&mut self, node: &str) -> Result<()> {
        self.stop_ztunnel(node)?;
        self.start_ztunnel(node)
    }

    /// Rolls a node's ztunnel as a DaemonSet update does: a new ztunnel pod
    /// (`ztunnel-<node>-<n>`) is created through the node's runtime and its ztunnel started
    /// against the same agent; once it is ready (it got the agent's snapshot, so it listens in
    /// every enrolled pod beside the old one, both with SO_REUSEPORT), it becomes the node's
    /// ztunnel. The old one is returned still running: the caller stops it (SIGTERM: it
    /// drains its open connections) or drops it.
    pub fn upgrade_ztunnel(&mut self, node: &str) -> Result<Ztunnel> {
        let n = self.node(node)?;
        let generation = self
            .sb
            .run(&["ip", "netns", "list"])?
            .lines()
            .filter(|l| l.starts_with(&format!("pod-ztunnel-{node}")))
            .count()
            + 1;
        let labels = BTreeMap::from([("app".to_owned(), "ztunnel".to_owned())]);
        let name = format!("ztunnel-{node}-{generation}");
        let pod = self.run_pod(&n.runtime, node, MESH_NAMESPACE, &name, "ztunnel", labels)?;
        let zt = self.spawn_ztunnel(node, &n.dirs, &pod)?;
        let n = self.node_mut(node)?;
        n.ztunnel_pod = pod;
        n.ztunnel
            .replace(zt)
            .ok_or_else(|| anyhow!("the ztunnel of {node} was stopped; nothing to upgrade"))
    }

    /// Whether the agent's nftables tables (`inet zmesh-nat`) are in a netns.
    pub fn has_rules(&self, netns: &str) -> Result<bool> {
        Ok(self
            .sb
            .run_in(netns, &["nft", "list", "tables"])?
            .contains("zmesh-nat"))
    }

    /// Whether something listens on TCP `port` in a netns.
    pub fn listening(&self, netns: &str, port: u16) -> Result<bool> {
        let out = self
            .sb
            .run_in(netns, &["ss", "-Hltn", &format!("sport = :{port}")])?;
        Ok(!out.trim().is_empty())
    }
}
