//! `zmesh-cni-agent`: the node agent. Reads pods and namespaces from the Kubernetes API
//! (`--kube`) or from a directory of Kubernetes YAML (`--pods-dir`), serves the plugin API on `<run-dir>/agent.sock`, installs the redirection
//! rules in enrolled pods and hands them to the local ztunnel over ZDS. Every flag has an
//! environment override (`ZMESH_*`, `NODE_NAME`). See `zmesh_cni::agent`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use tracing::info;
use zmesh_cni::agent::fault::Faults;
use zmesh_cni::agent::health::{self, ChainSource, HealthServer, HealthSource};
use zmesh_cni::agent::server::SOCKET_FILE;
use zmesh_cni::agent::source::DEFAULT_DEBOUNCE;
use zmesh_cni::agent::state::STATE_FILE;
use zmesh_cni::agent::{
    Agent, AgentConfig, ApiServer, DirSource, KubePodSource, PodSource, RulesAndZds, StateStore,
};
use zmesh_cni::install;
use zmesh_cni::rules::{Backend, HostConfig, RuleConfig};
use zmesh_core::zds::{DEFAULT_SOCKET_PATH, ServerOptions, ZdsServer};

/// The node agent's configuration, validated once at start and logged.
#[derive(Debug, Parser)]
#[command(name = "zmesh-cni-agent", version, about)]
struct Config {
    /// Directory of Kubernetes YAML (Pods, Namespaces) to read and watch (this or `--kube`).
    #[arg(long, env = "ZMESH_PODS_DIR", conflicts_with = "kube")]
    pods_dir: Option<PathBuf>,
    /// Watch this node's pods and the namespaces through the Kubernetes API (this or
    /// `--pods-dir`): in-cluster config, or `KUBECONFIG`, or `--kubeconfig`.
    #[arg(long, env = "ZMESH_KUBE")]
    kube: bool,
    /// The kubeconfig file to use with `--kube` (default: in-cluster, then `KUBECONFIG`).
    #[arg(long, env = "ZMESH_KUBECONFIG", requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: pods scheduled elsewhere are never enrolled (required to run).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// Remove our entry from the CNI configuration in `--cni-conf-dir` (leaving everything
    /// else as it was) and the plugin from `--cni-bin-dir`, then exit. For uninstalling the
    /// mesh from a node; an agent stopping for an upgrade leaves both in place.
    #[arg(long)]
    uninstall: bool,
    /// Directory of the plugin socket (`agent.sock`) and the state file (`pods.json`).
    #[arg(long, env = "ZMESH_RUN_DIR", default_value = "/var/run/zmesh")]
    run_dir: PathBuf,
    /// Where ztunnel connects (ZDS; the agent listens).
    #[arg(long, env = "ZMESH_ZTUNNEL_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
    ztunnel_socket: PathBuf,
    /// How rules are written: nftables, iptables-legacy or iptables-nft.
    #[arg(long, env = "ZMESH_RULES_BACKEND", default_value = "nftables")]
    rules_backend: Backend,
    /// Redirect pods' DNS to ztunnel's DNS proxy (15053).
    #[arg(long, env = "ZMESH_DNS_CAPTURE")]
    dns_capture: bool,
    /// Where `GET /readyz` is served over TCP (the DaemonSet's readinessProbe, `zmeshctl
    /// check`): 200 while the plugin is chained into the conflist the runtime loads and a
    /// ztunnel is connected, else 503 with the reasons. Port 0 picks a free port (logged).
    #[arg(long, env = "ZMESH_HEALTH_ADDR", default_value = health::DEFAULT_ADDR)]
    health_addr: std::net::SocketAddr,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "ZMESH_LOG", default_value = "info")]
    log: String,
    /// Do not SNAT the kubelet's probes to enrolled pods (then probes go through ztunnel's
    /// inbound listener, as any plaintext client's would).
    #[arg(long, env = "ZMESH_NO_PROBE_SNAT")]
    no_probe_snat: bool,
    /// SNAT only probes from sockets of this user (the kubelet's); default: any node-local
    /// socket.
    #[arg(long, env = "ZMESH_KUBELET_UID")]
    kubelet_uid: Option<u32>,
    /// The node's CNI configuration directory (e.g. /etc/cni/net.d). When given, the agent
    /// installs the plugin binary and chains its entry into the primary CNI's configuration,
    /// and keeps it there (repairing it when the primary CNI rewrites its file). Without it,
    /// the agent installs nothing (someone else did).
    #[arg(long, env = "ZMESH_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// Where the runtime finds CNI plugins (e.g. /opt/cni/bin).
    #[arg(long, env = "ZMESH_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The plugin binary to install; default: `zmesh-cni` next to this executable.
    #[arg(long, env = "ZMESH_PLUGIN_BINARY")]
    plugin_binary: Option<PathBuf>,
    /// The plugin's log file (its `log_file` key).
    #[arg(
        long,
        env = "ZMESH_PLUGIN_LOG_FILE",
        default_value = "/var/log/zmesh-cni.log"
    )]
    plugin_log_file: PathBuf,
    /// Namespaces whose pods start without asking the agent (its `exclude_namespaces`).
    #[arg(
        long,
        env = "ZMESH_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,istio-system"
    )]
    exclude_namespaces: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid --log filter {:?}", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    if config.uninstall {
        return uninstall(&config);
    }
    anyhow::ensure!(
        !config.node_name.is_empty(),
        "--node-name (or NODE_NAME) must be set"
    );
    anyhow::ensure!(
        config.pods_dir.is_some() || config.kube,
        "say where pods come from: --kube (the Kubernetes API) or --pods-dir (ZMESH_PODS_DIR)"
    );
    let faults = Faults::install_from_env()?;
    info!(?config, "starting the node agent");
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(run(config, faults))
}

async fn run(config: Config, faults: Faults) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.run_dir).with_context(|| {
        format!(
            "cannot create the run directory {}",
            config.run_dir.display()
        )
    })?;
    if let Some(dir) = config.ztunnel_socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the ZDS socket directory {}", dir.display()))?;
    }
    let state = Arc::new(StateStore::open(&config.run_dir.join(STATE_FILE))?);
    let source: Box<dyn PodSource> = match &config.pods_dir {
        Some(dir) => Box::new(DirSource::start(dir, DEFAULT_DEBOUNCE)?),
        None => {
            let client = kube_client(config.kubeconfig.as_deref()).await?;
            Box::new(KubePodSource::start(client, &config.node_name).await)
        }
    };
    let zds_options = ServerOptions {
        fault_drop_mid_snapshot: faults.zds_drop_after,
        ..ServerOptions::default()
    };
    let zds = ZdsServer::bind_with(&config.ztunnel_socket, zds_options, {
        let state = state.clone();
        move || state.snapshot()
    })?;
    let rules = RuleConfig {
        dns_capture: config.dns_capture,
        ..RuleConfig::default()
    };
    let mut dataplane = RulesAndZds::new(zds.clone(), config.rules_backend, rules);
    if !config.no_probe_snat {
        let host = HostConfig {
            kubelet_uid: config.kubelet_uid,
            ..HostConfig::default()
        };
        dataplane = dataplane.with_probe_snat(None, host).context(
            "cannot install the host's kubelet-probe SNAT rules (or pass --no-probe-snat)",
        )?;
    }
    let agent = Arc::new(Agent::new(
        AgentConfig::new(&config.node_name),
        &*source,
        dataplane,
        state,
    ));
    let api = ApiServer::bind(&config.run_dir.join(SOCKET_FILE), agent.clone())?;
    let reconciler = tokio::spawn(agent.clone().run_reconciler());
    let repairs = install::RepairStats::new();
    let health = HealthServer::bind(
        config.health_addr,
        HealthSource {
            chain: config.cni_conf_dir.as_ref().map(|conf_dir| ChainSource {
                conf_dir: conf_dir.clone(),
                bin_dir: config.cni_bin_dir.clone(),
                repairs: repairs.clone(),
            }),
            ztunnel_connected: {
                let agent = agent.clone();
                Arc::new(move || agent.ready())
            },
        },
    )
    .await?;
    info!(addr = %health.local_addr(), "serving GET {}", health::READYZ_PATH);
    // Installed only once the API answers: from then on a pod's ADD reaches us (and fails,
    // to be retried, until a ztunnel connects), never an agent that is not there yet.
    let (stop_install, stop_rx) = tokio::sync::watch::channel(false);
    let installer = match &config.cni_conf_dir {
        Some(conf_dir) => Some(install(&config, conf_dir, api.path(), repairs, stop_rx)?),
        None => {
            info!("no --cni-conf-dir: not installing the CNI plugin");
            None
        }
    };
    info!(
        api = %api.path().display(),
        zds = %zds.path().display(),
        "node agent ready for ztunnel; ADDs are served once a ztunnel connects"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
        _ = term.recv() => info!("SIGTERM; stopping"),
    }
    // Rules in pods, the state file and our conflist entry stay: a restarted agent carries
    // on from them, and until it is back new mesh pods fail ADD (retried) rather than start
    // uncaptured.
    reconciler.abort();
    let _ = stop_install.send(true);
    if let Some(task) = installer {
        let _ = task.await;
    }
    drop(health);
    drop(api);
    zds.shutdown().await;
    Ok(())
}

/// A client of the Kubernetes API: from `kubeconfig` when given, else in-cluster config or
/// `KUBECONFIG`.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a cluster and no KUBECONFIG; pass \
             --kubeconfig or use --pods-dir",
        )?,
    };
    // The watchers back off on errors themselves (0.8 s doubling to 30 s); kube's own retry of
    // 429/503/504 (15 tries, doubling to minutes) would only delay their recovery.
    config.default_retry = false;
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// Installs the plugin binary, chains our entry into the primary CNI's configuration and
/// keeps it there.
fn install(
    config: &Config,
    conf_dir: &std::path::Path,
    agent_socket: &std::path::Path,
    stats: install::RepairStats,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let plugin = match &config.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable to locate zmesh-cni beside it")?
            .with_file_name("zmesh-cni"),
    };
    std::fs::create_dir_all(&config.cni_bin_dir)
        .with_context(|| format!("cannot create {}", config.cni_bin_dir.display()))?;
    let replaced = install::install_binary(&plugin, &config.cni_bin_dir).with_context(|| {
        format!(
            "cannot install {} into {}",
            plugin.display(),
            config.cni_bin_dir.display()
        )
    })?;
    info!(plugin = %plugin.display(), bin_dir = %config.cni_bin_dir.display(), replaced, "CNI plugin binary installed");
    let entry = serde_json::json!({
        "type": "zmesh-cni",
        "agent_socket": agent_socket,
        "log_file": config.plugin_log_file,
        "exclude_namespaces": config.exclude_namespaces,
    });
    let conf_dir = conf_dir.to_owned();
    Ok(tokio::spawn(async move {
        if let Err(e) = install::watch_and_repair(
            conf_dir.clone(),
            entry,
            install::WatchOptions::default(),
            stats,
            stop,
        )
        .await
        {
            tracing::error!(conf_dir = %conf_dir.display(), error = %e, "CNI configuration watch stopped");
        }
    }))
}

/// Takes the mesh off this node's CNI configuration.
fn uninstall(config: &Config) -> anyhow::Result<()> {
    let conf_dir = config
        .cni_conf_dir
        .as_deref()
        .context("--uninstall needs --cni-conf-dir")?;
    let changed = install::unchain(conf_dir)
        .with_context(|| format!("cannot remove our entry from {}", conf_dir.display()))?;
    for f in &changed {
        info!(file = %f.display(), "removed the zmesh-cni entry");
    }
    let plugin = config.cni_bin_dir.join("zmesh-cni");
    match std::fs::remove_file(&plugin) {
        Ok(()) => info!(plugin = %plugin.display(), "removed the plugin binary"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", plugin.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;
    use serde::Deserialize as _;
    use serde_yaml::Value;

    fn doc(text: &str, kind: &str) -> Value {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    }

    /// The host path behind the container path `path` (a mount of a hostPath volume).
    fn host_path(pod: &Value, container: &Value, path: &std::path::Path) -> String {
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == path.to_str())
            .unwrap_or_else(|| panic!("{} is not a mount", path.display()));
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        volume["hostPath"]["path"].as_str().unwrap().to_owned()
    }

    #[test]
    fn the_manifest_flags_and_env_are_this_binarys_and_match_the_mounts() {
        let ds = doc(
            include_str!("../../../manifests/cni/daemonset.yaml"),
            "DaemonSet",
        );
        let pod = &ds["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let config = Config::try_parse_from(std::iter::once("zmesh-cni-agent").chain(args))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.kube);

        // The readiness probe asks the agent's health endpoint, on its port.
        let probe = &container["readinessProbe"]["httpGet"];
        assert_eq!(probe["path"].as_str(), Some(health::READYZ_PATH));
        assert_eq!(
            probe["port"].as_u64(),
            Some(u64::from(config.health_addr.port()))
        );
        assert!(config.health_addr.ip().is_unspecified());
        assert!(
            container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["containerPort"] == probe["port"] && p["name"] == "http-health")
        );

        // Every variable the DaemonSet sets is one of the agent's.
        let known: Vec<String> = Config::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        for e in container["env"].as_sequence().unwrap() {
            let name = e["name"].as_str().unwrap();
            assert!(known.iter().any(|k| k == name), "{name} is not read");
        }

        // The CNI directories are the node's.
        let conf_dir = config.cni_conf_dir.as_deref().unwrap();
        assert_eq!(host_path(pod, container, conf_dir), "/etc/cni/net.d");
        assert_eq!(
            host_path(pod, container, &config.cni_bin_dir),
            "/opt/cni/bin"
        );
        // The plugin, on the host, reads the agent's socket path from its CNI entry: the run
        // directory is mounted at its host path.
        assert_eq!(
            host_path(pod, container, &config.run_dir),
            config.run_dir.to_str().unwrap()
        );
        // The ZDS socket is in the directory ztunnel mounts, where ztunnel looks for it.
        let socket_dir = config.ztunnel_socket.parent().unwrap();
        let ztunnel = doc(
            include_str!("../../../manifests/ztunnel/daemonset.yaml"),
            "DaemonSet",
        );
        let ztunnel_pod = &ztunnel["spec"]["template"]["spec"];
        let ztunnel_container = &ztunnel_pod["containers"][0];
        let inpod_uds = ztunnel_container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "INPOD_UDS")
            .and_then(|e| e["value"].as_str())
            .unwrap();
        assert_eq!(std::path::Path::new(inpod_uds), config.ztunnel_socket);
        assert_eq!(
            host_path(pod, container, socket_dir),
            host_path(ztunnel_pod, ztunnel_container, socket_dir)
        );
        // The mesh's own pods start without the agent (ztunnel must, before it can serve).
        let namespace = ds["metadata"]["namespace"].as_str().unwrap();
        assert!(config.exclude_namespaces.iter().any(|n| n == namespace));
        // Without the flag (the lab, a hand-run agent) the defaults are the manifest's, and the
        // namespace the enrolment decision treats as the mesh's own is the one it runs in.
        let defaults = Config::try_parse_from(["zmesh-cni-agent", "--kube"]).unwrap();
        assert_eq!(defaults.exclude_namespaces, config.exclude_namespaces);
        assert_eq!(
            zmesh_cni::spec::DEFAULT_EXCLUDE_NAMESPACES,
            config.exclude_namespaces.as_slice()
        );
        assert_eq!(zmesh_cni::agent::decision::MESH_NAMESPACE, namespace);
        // Pods' namespaces created after the agent started must be visible to it.
        let netns = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/var/run/netns")
            .unwrap();
        assert_eq!(netns["mountPropagation"], "HostToContainer");
    }
}
