//! One lab node's mesh daemons: the node agent (`zmesh-cni-agent`, in the node's netns, as a
//! host-network DaemonSet pod runs) and its ztunnel (a pod of `istio-system`, set up by the
//! node's CNI runtime like any pod, running `ztunnel` in shared mode).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bin_path;
use crate::controller::ControllerAccess;
use crate::http;
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

/// Starts the node agent in `node`'s netns and waits until it has chained `zmesh-cni` into
/// the primary conflist.
pub fn spawn_agent(sb: &Sandbox, node: &str, dirs: &NodeDirs, pods_dir: &Path) -> Result<Process> {
    spawn_agent_with(sb, node, dirs, pods_dir, &[])
}

/// [`spawn_agent`] with extra environment (e.g. the agent's fault-injection variables).
pub fn spawn_agent_with(
    sb: &Sandbox,
    node: &str,
    dirs: &NodeDirs,
    pods_dir: &Path,
    env: &[(&str, &str)],
) -> Result<Process> {
    let p = |p: &Path| p.display().to_string();
    let args = [
        "--pods-dir".to_owned(),
        p(pods_dir),
        "--node-name".to_owned(),
        node.to_owned(),
        "--run-dir".to_owned(),
        p(&dirs.run_dir),
        "--ztunnel-socket".to_owned(),
        p(&dirs.zds_socket()),
        "--rules-backend".to_owned(),
        "nftables".to_owned(),
        "--cni-conf-dir".to_owned(),
        p(&dirs.conf_dir),
        "--cni-bin-dir".to_owned(),
        p(&dirs.bin_dir),
        "--plugin-log-file".to_owned(),
        p(&dirs.plugin_log),
        "--log".to_owned(),
        std::env::var("ZMESH_AGENT_LOG").unwrap_or_else(|_| "info".to_owned()),
    ];
    let mut cmd = sb.command(Some(node), bin_path("zmesh-cni-agent"), &args);
    cmd.env("NO_COLOR", "1");
    cmd.envs(env.iter().copied());
    let agent = sb.spawn(&format!("agent-{node}"), cmd)?;
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

/// The environment of a shared-mode ztunnel fed by the node's agent (pods) and the
/// controller (config and certificates).
pub fn ztunnel_env(
    dirs: &NodeDirs,
    controller: &ControllerAccess,
    pod: &ZtunnelPod<'_>,
) -> Vec<(String, String)> {
    crate::mesh::shared_controller_env(&dirs.zds_socket(), controller, pod)
}

/// Stops a process: SIGTERM, SIGKILL after `grace`.
pub fn stop(proc: &Process, grace: Duration) -> Result<()> {
    proc.terminate(grace)
        .with_context(|| format!("stopping {}", proc.name()))
        .map(drop)
}

/// Starts the node's ztunnel in `netns` (its pod's) and waits until it is ready (which it is
/// only after the agent's snapshot).
pub fn spawn_ztunnel(
    sb: &Sandbox,
    netns: &str,
    dirs: &NodeDirs,
    controller: &ControllerAccess,
    pod: &ZtunnelPod<'_>,
    extra_env: &[(String, String)],
) -> Result<Ztunnel> {
    let mut env = ztunnel_env(dirs, controller, pod);
    env.extend_from_slice(extra_env);
    Ztunnel::spawn(sb, netns, &env, &bin_path("ztunnel"))
}

/// How long a stopped agent gets to exit on SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
