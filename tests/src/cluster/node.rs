//! One lab node's mesh daemons: the node agent (`zmesh-cni-agent`, in the node's netns, as a
//! host-network DaemonSet pod runs) and its ztunnel (a pod of `istio-system`, set up by the
//! node's CNI runtime like any pod, running `ztunnel` in shared mode).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bin_path;
use crate::controller::ControllerAccess;
use crate::http;
use crate::manifests::lab::LabValues;
use crate::manifests::{Component, Manifests, PodFacts};
use crate::mesh::ZtunnelPod;
use crate::process::Process;
use crate::sandbox::Sandbox;
use crate::ztunnel::Ztunnel;

/// How long the lab waits for an agent to chain its plugin and to see a ztunnel.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The files of one node, all under `<sandbox dir>/<node>/`.
#[derive(Clone, Debug)]
pub struct NodeDirs {
    /// `<node>/`.
    pub root: PathBuf,
    /// `net.d/`: the CNI conf dir (`10-lab.conflist`).
    pub conf_dir: PathBuf,
    /// `bin/`: where the agent installs `zmesh-cni`.
    pub bin_dir: PathBuf,
    /// `run/`: `agent.sock`, `pods.json` and the ZDS socket `ztunnel.sock`.
    pub run_dir: PathBuf,
    /// `zmesh-cni.log`: the plugin's log.
    pub plugin_log: PathBuf,
    /// `ipam/`: host-local's leases.
    pub ipam_dir: PathBuf,
}

impl NodeDirs {
    /// The layout under `sandbox_dir/node`, created.
    pub fn create(sandbox_dir: &Path, node: &str) -> Result<NodeDirs> {
        let root = sandbox_dir.join(node);
        let dirs = NodeDirs {
            conf_dir: root.join("net.d"),
            bin_dir: root.join("bin"),
            run_dir: root.join("run"),
            plugin_log: root.join("zmesh-cni.log"),
            ipam_dir: root.join("ipam"),
            root,
        };
        for d in [&dirs.conf_dir, &dirs.bin_dir, &dirs.run_dir, &dirs.ipam_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(dirs)
    }

    /// The agent's plugin API socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// The ZDS socket (the agent listens, ztunnel connects).
    pub fn zds_socket(&self) -> PathBuf {
        self.run_dir.join("ztunnel.sock")
    }

    /// The primary network's conflist.
    pub fn conflist(&self) -> PathBuf {
        self.conf_dir.join("10-lab.conflist")
    }
}

/// Writes the node's primary network: bridge `cni0` (the pods' gateway) with host-local
/// addresses from `pod_cidr` and a default route through it. Debian's plugins speak CNI up to 1.0.0.
pub fn write_primary_network(dirs: &NodeDirs, pod_cidr: &str) -> Result<()> {
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "plugins": [{
            "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dirs.ipam_dir},
        }],
    });
    std::fs::write(dirs.conflist(), serde_json::to_string_pretty(&conflist)?)
        .with_context(|| format!("writing {}", dirs.conflist().display()))
}

/// The variables the lab adds to every node component (the table's `PATH`, `NO_COLOR`; the
/// host's `PATH` stands for the image's), and the sandbox's directory as the one writable
/// under `readOnlyRootFilesystem`.
fn common_env(sb: &Sandbox, v: LabValues) -> LabValues {
    v.add_env("PATH", std::env::var("PATH").unwrap_or_default())
        .add_env("NO_COLOR", "1")
        .writable(sb.dir())
}

/// Starts `argv` (from [`LabValues::argv`]) in `netns` (`None`: the sandbox's root) with
/// exactly `env`.
pub fn spawn_component(
    sb: &Sandbox,
    name: &str,
    netns: Option<&str>,
    argv: &[String],
    env: &[(String, String)],
) -> Result<Process> {
    let (program, args) = argv.split_first().context("an empty command line")?;
    let mut cmd = sb.command(netns, program, args);
    cmd.env_clear();
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    sb.spawn(name, cmd)
}

/// Starts the node agent in `node`'s netns as the install's DaemonSet runs it (its `args`,
/// `env` and capabilities, with the lab's substitutions of [`crate::manifests::lab`]) and
/// waits until it has chained `zmesh-cni` into the primary conflist. `env` is the test's own
/// (e.g. the agent's fault-injection variables).
pub fn spawn_agent(
    sb: &Sandbox,
    manifests: &Manifests,
    node: &str,
    node_ip: IpAddr,
    dirs: &NodeDirs,
    pods_dir: &Path,
    env: &[(&str, &str)],
) -> Result<Process> {
    let spec = manifests.container(Component::Agent)?;
    let p = |p: &Path| p.display().to_string();
    let mut values = LabValues::new(Component::Agent)
        .arg("--kube", vec!["--pods-dir".to_owned(), p(pods_dir)])
        .arg(
            "--cni-conf-dir",
            vec![format!("--cni-conf-dir={}", p(&dirs.conf_dir))],
        )
        .arg(
            "--cni-bin-dir",
            vec![format!("--cni-bin-dir={}", p(&dirs.bin_dir))],
        )
        .arg("--run-dir", vec![format!("--run-dir={}", p(&dirs.run_dir))])
        .arg(
            "--ztunnel-socket",
            vec![format!("--ztunnel-socket={}", p(&dirs.zds_socket()))],
        )
        .add_arg("--plugin-log-file", p(&dirs.plugin_log));
    values = common_env(sb, values);
    if let Ok(level) = std::env::var("ZMESH_AGENT_LOG") {
        values = values.env("ZMESH_LOG", level);
    }
    for (k, v) in env {
        values = values.add_env(k, *v);
    }
    // A host-network pod: its IP is the node's.
    let pod = PodFacts {
        name: format!("zmesh-cni-agent-{node}"),
        namespace: spec.namespace.clone(),
        node_name: node.to_owned(),
        service_account: spec.service_account.clone(),
        pod_ip: node_ip,
    };
    let argv = values.argv(&spec, &bin_path("zmesh-cni-agent"))?;
    let env = values.env_for(&spec, &pod)?;
    let agent = spawn_component(sb, &format!("agent-{node}"), Some(node), &argv, &env)?;
    agent.wait_until(
        "the agent to chain zmesh-cni into the conflist",
        AGENT_TIMEOUT,
        || Ok(std::fs::read_to_string(dirs.conflist())?.contains("\"zmesh-cni\"")),
    )?;
    Ok(agent)
}

/// `GET /v1/ready` on the agent's socket: the HTTP status.
pub fn agent_ready_status(socket: &Path) -> Result<u16> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /v1/ready HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(http::parse(&raw)?.status)
}

/// Waits until the agent answers `GET /v1/ready` with 200 (a ztunnel is connected).
pub fn wait_agent_ready(agent: &Process, dirs: &NodeDirs) -> Result<()> {
    agent.wait_until("the agent's /v1/ready to answer 200", AGENT_TIMEOUT, || {
        Ok(agent_ready_status(&dirs.agent_socket())? == 200)
    })
}

/// Stops a process: SIGTERM, SIGKILL after `grace`.
pub fn stop(proc: &Process, grace: Duration) -> Result<()> {
    proc.terminate(grace)
        .with_context(|| format!("stopping {}", proc.name()))
        .map(drop)
}

/// Starts the node's ztunnel in `netns` (its pod's) as the install's DaemonSet runs it
/// (its `args`, `env` resolved for `pod`, and capabilities, with the lab's substitutions of
/// [`crate::manifests::lab`]) and waits until it is ready (which it is only after the
/// agent's snapshot). `extra_env` is the test's own.
pub fn spawn_ztunnel(
    sb: &Sandbox,
    manifests: &Manifests,
    netns: &str,
    dirs: &NodeDirs,
    controller: &ControllerAccess,
    pod: &ZtunnelPod<'_>,
    extra_env: &[(String, String)],
) -> Result<Ztunnel> {
    let spec = manifests.container(Component::Ztunnel)?;
    let p = |p: &Path| p.display().to_string();
    let mut values = LabValues::new(Component::Ztunnel)
        .env("INPOD_UDS", p(&dirs.zds_socket()))
        .env("XDS_ADDRESS", controller.address.clone())
        .env("XDS_ROOT_CA", p(&controller.root))
        .env("CA_ROOT_CA", p(&controller.root))
        .env("AUTH_TOKEN", p(pod.token))
        .add_env(
            "RUST_BACKTRACE",
            std::env::var("RUST_BACKTRACE").unwrap_or_else(|_| "1".to_owned()),
        );
    values = common_env(sb, values);
    if let Ok(level) = std::env::var("RUST_LOG") {
        values = values.env("RUST_LOG", level);
    }
    for (k, v) in extra_env {
        values = values.add_env(k, v.clone());
    }
    let facts = PodFacts {
        name: pod.name.to_owned(),
        namespace: pod.namespace.to_owned(),
        node_name: pod.node.to_owned(),
        service_account: spec.service_account.clone(),
        pod_ip: pod.ip,
    };
    let argv = values.argv(&spec, &bin_path("ztunnel"))?;
    let env = values.env_for(&spec, &facts)?;
    Ztunnel::spawn_argv(sb, netns, &argv, &env)
}

/// How long a stopped agent gets to exit on SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
