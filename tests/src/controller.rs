//! Runs the real `zmesh-controller` binary in the lab: the YAML-directory source (the lab's
//! "API server" directory), the mesh CA from the lab's files, and one random credential per
//! node (`<node> <token>` lines in its token file, each node's token in its own file), so one
//! node's ztunnel cannot pass as another.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::bin_path;
use crate::manifests::lab::LabValues;
use crate::manifests::{Component, Manifests, PodFacts};
use crate::process::Process;
use crate::sandbox::Sandbox;

pub mod in_process;

/// The gRPC port of the controller (xDS and CA), as istiod's.
pub const CONTROLLER_PORT: u16 = 15012;

/// A name in the controller's serving certificate, as istiod's.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// How long the controller gets to listen after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a ztunnel needs to reach the controller.
#[derive(Clone, Debug)]
pub struct ControllerAccess {
    /// `https://<ip>:15012`.
    pub address: String,
    /// The mesh root (the controller's serving certificate chains to it).
    pub root: PathBuf,
}

/// The lab's per-node credentials.
#[derive(Debug)]
pub struct NodeTokens {
    /// The controller's `--node-tokens` file.
    pub file: PathBuf,
    /// Node name -> the file holding its token (its ztunnel's `AUTH_TOKEN`).
    pub per_node: Vec<(String, PathBuf)>,
    /// SPIFFE id -> the file holding the token of a workload that authenticates as itself.
    pub per_identity: Vec<(String, PathBuf)>,
}

impl NodeTokens {
    /// Makes a random 32-byte token per node, under `dir`.
    pub fn generate(dir: &Path, nodes: &[&str]) -> Result<NodeTokens> {
        Self::generate_with(dir, nodes, &[])
    }

    /// [`NodeTokens::generate`], plus a token for each `(node, spiffe id)` of `identities`: a
    /// workload that authenticates as itself (a waypoint, whose Gateway's service account is
    /// its identity), as a projected service-account token does on a real cluster. The
    /// controller reads the file once, at start, so these are minted up front.
    pub fn generate_with(
        dir: &Path,
        nodes: &[&str],
        identities: &[(&str, &str)],
    ) -> Result<NodeTokens> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lines = String::new();
        let mut per_node = Vec::new();
        for node in nodes {
            let token = random_token()?;
            let path = dir.join(format!("token-{node}"));
            write_private(&path, &token)?;
            lines.push_str(&format!("{node} {token}\n"));
            per_node.push(((*node).to_owned(), path));
        }
        let mut per_identity = Vec::new();
        for (i, (node, id)) in identities.iter().enumerate() {
            let token = random_token()?;
            let path = dir.join(format!("token-identity-{i}"));
            write_private(&path, &token)?;
            lines.push_str(&format!("{node} {token} {id}\n"));
            per_identity.push(((*id).to_owned(), path));
        }
        let file = dir.join("node-tokens");
        write_private(&file, &lines)?;
        Ok(NodeTokens {
            file,
            per_node,
            per_identity,
        })
    }

    /// The token file of `node`.
    pub fn of(&self, node: &str) -> Result<&Path> {
        self.per_node
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, p)| p.as_path())
            .with_context(|| format!("no token for node {node}"))
    }

    /// The token file of a workload identity minted by [`NodeTokens::generate_with`].
    pub fn of_identity(&self, id: &str) -> Result<&Path> {
        self.per_identity
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, p)| p.as_path())
            .with_context(|| format!("no token for identity {id}"))
    }
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// How to start the controller.
#[derive(Debug, Clone)]
pub struct ControllerSpec {
    /// Network namespace to run in (`None`: the sandbox's root netns).
    pub netns: Option<String>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The watched YAML directory.
    pub config_dir: PathBuf,
    /// The `--node-tokens` file.
    pub tokens: PathBuf,
    /// The CA certificate PEM (also the root ztunnels verify the controller with).
    pub ca_cert: PathBuf,
    /// The CA key PEM.
    pub ca_key: PathBuf,
    /// Debounce, short in tests so pushes follow edits quickly.
    pub debounce: Duration,
}

impl ControllerSpec {
    /// What ztunnels need to reach this controller.
    pub fn access(&self) -> ControllerAccess {
        ControllerAccess {
            address: format!("https://{}", self.listen),
            root: self.ca_cert.clone(),
        }
    }
}

/// A gRPC endpoint for a controller at `uri` (`https://...`) whose serving certificate for
/// `server_name` chains to `root_pem`; connect it with `.connect().await`.
pub fn endpoint(uri: String, root_pem: &str, server_name: &str) -> Result<Endpoint> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(server_name);
    Ok(Channel::from_shared(uri)?.tls_config(tls)?)
}

/// Starts the controller as the install's Deployment runs it (its `args`, `env` and
/// capabilities, with the lab's substitutions of [`crate::manifests::lab`]: the YAML
/// directory for `--kube`, per-node tokens for `--token-review`, the lab's CA and address)
/// and waits until it accepts connections.
pub fn spawn(sb: &Sandbox, manifests: &Manifests, spec: &ControllerSpec) -> Result<Process> {
    let container = manifests.container(Component::Controller)?;
    let p = |p: &Path| p.display().to_string();
    let mut values = LabValues::new(Component::Controller)
        .arg(
            "--kube",
            vec!["--config-dir".to_owned(), p(&spec.config_dir)],
        )
        .arg(
            "--token-review",
            vec!["--node-tokens".to_owned(), p(&spec.tokens)],
        )
        .arg("--ca-cert", vec![format!("--ca-cert={}", p(&spec.ca_cert))])
        .arg("--ca-key", vec![format!("--ca-key={}", p(&spec.ca_key))])
        .arg("--listen", vec![format!("--listen={}", spec.listen)])
        .add_arg("--serving-name", spec.listen.ip().to_string())
        .add_arg("--serving-name", SERVER_NAME)
        .add_arg("--debounce", format!("{}ms", spec.debounce.as_millis()))
        .add_env("PATH", std::env::var("PATH").unwrap_or_default())
        .add_env("NO_COLOR", "1")
        .writable(sb.dir());
    if let Ok(level) = std::env::var("ZMESH_CONTROLLER_LOG") {
        values = values.env("RUST_LOG", level);
    }
    let pod = PodFacts {
        name: "zmesh-controller-0".to_owned(),
        namespace: container.namespace.clone(),
        node_name: String::new(),
        service_account: container.service_account.clone(),
        pod_ip: spec.listen.ip(),
    };
    let argv = values.argv(&container, &bin_path("zmesh-controller"))?;
    let env = values.env_for(&container, &pod)?;
    let (program, args) = argv.split_first().context("an empty command line")?;
    let mut cmd = sb.command(spec.netns.as_deref(), program, args);
    cmd.env_clear();
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // The log is appended across restarts: only this run's lines count.
    let earlier = std::fs::metadata(sb.dir().join("controller.log")).map_or(0, |m| m.len());
    let proc = sb.spawn("controller", cmd)?;
    proc.wait_until("the controller to listen", START_TIMEOUT, || {
        let log = std::fs::read(proc.log_path())?;
        let ours = log.get(earlier as usize..).unwrap_or_default();
        Ok(crate::capture::contains(
            ours,
            b"controller serving delta xDS and the CA",
        ))
    })?;
    Ok(proc)
}
