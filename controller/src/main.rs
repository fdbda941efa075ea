//! `zmesh-controller`: watches Kubernetes (or a directory of YAML objects), serves delta xDS to
//! ztunnels and is their CA, on one gRPC-over-TLS port (15012), the way istiod does for ambient.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use zmesh_controller::ca::CaConfig;
use zmesh_controller::deploy::WaypointTemplate;
use zmesh_controller::server::{
    AuthConfig, ControllerConfig, ControllerLimits, SourceConfig, start,
};
use zmesh_controller::translate::MeshConfig;
use zmesh_core::identity::SpiffeId;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 100ms or 24h: {e}"))
}

/// zmesh control plane: Kubernetes (or YAML) to delta xDS, and the workload CA.
#[derive(Debug, Parser)]
#[command(name = "zmesh-controller", version)]
struct Args {
    /// Read objects from this directory of YAML files (watched) instead of Kubernetes.
    #[arg(long, env = "ZMESH_CONFIG_DIR", conflicts_with = "kube")]
    config_dir: Option<PathBuf>,
    /// Read objects from the Kubernetes API (in-cluster config or KUBECONFIG).
    #[arg(long)]
    kube: bool,
    /// Address of the monitoring port: /ready, /metrics, /debug/status (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring: SocketAddr,
    /// Address of the gRPC server (xDS and CA, over TLS).
    #[arg(long, env = "ZMESH_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// CA certificate PEM (a root, or an intermediate followed by its chain to the root).
    #[arg(long, env = "ZMESH_CA_CERT")]
    ca_cert: PathBuf,
    /// CA private key PEM.
    #[arg(long, env = "ZMESH_CA_KEY")]
    ca_key: PathBuf,
    /// A DNS name or IP address for the controller's serving certificate (repeatable).
    #[arg(long = "serving-name", default_values_t = [
        "istiod.istio-system.svc".to_owned(),
        "istiod.istio-system.svc.cluster.local".to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ])]
    serving_names: Vec<String>,
    /// Lifetime of the serving certificate (re-issued at half life).
    #[arg(long, default_value = "720h", value_parser = duration)]
    serving_ttl: Duration,
    /// SPIFFE trust domain of workloads.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster id (first segment of workload uids; callers' `clusterid` header must match).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// DNS suffix of Service hostnames.
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    /// The mesh's root namespace: its AuthorizationPolicies without a selector apply
    /// mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Per-node credentials (`<node> <token>` lines): the lab's authentication.
    #[arg(long, conflicts_with = "token_review")]
    node_tokens: Option<PathBuf>,
    /// Authenticate callers with Kubernetes TokenReview.
    #[arg(long)]
    token_review: bool,
    /// Service accounts (`namespace/name`) trusted to ask certificates for their node's pods.
    #[arg(long = "trusted-node-account", default_values_t = ["istio-system/ztunnel".to_owned()])]
    trusted_node_accounts: Vec<String>,
    /// Default workload certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = duration)]
    cert_ttl: Duration,
    /// Longest workload certificate lifetime issued.
    #[arg(long, default_value = "24h", value_parser = duration)]
    max_cert_ttl: Duration,
    /// Quiet time after a change before it is translated and pushed.
    #[arg(long, default_value = "100ms", value_parser = duration)]
    debounce: Duration,
    /// Connections the gRPC port holds at once.
    #[arg(long, default_value_t = ControllerLimits::default().grpc.max_connections)]
    max_connections: usize,
    /// Connections the gRPC port holds at once from one address; also the delta xDS streams
    /// one address may have open (a proxy holds one per connection).
    #[arg(long, default_value_t = ControllerLimits::default().grpc.max_connections_per_peer)]
    max_connections_per_peer: usize,
    /// Time a client has for the TLS handshake and its first HTTP/2 bytes (gRPC port), or for
    /// a request head (monitoring port).
    #[arg(long, default_value = "10s", value_parser = duration)]
    handshake_timeout: Duration,
    /// A gRPC connection with no call or stream in flight this long is closed (GOAWAY).
    #[arg(long, default_value = "5m", value_parser = duration)]
    idle_timeout: Duration,
    /// A monitoring connection with no request in flight this long is closed.
    #[arg(long, default_value = "60s", value_parser = duration)]
    monitoring_idle_timeout: Duration,
    /// Listeners stop accepting at this fraction of the descriptor limit (RLIMIT_NOFILE).
    #[arg(long, default_value_t = 0.9)]
    fd_headroom: f64,
    /// The image of the waypoints' Deployments (--kube: the controller creates one per
    /// waypoint Gateway).
    #[arg(long, env = "ZMESH_WAYPOINT_IMAGE", default_value_t = zmesh_controller::deploy::default_image())]
    waypoint_image: String,
    /// The controller's address as waypoints reach it (their XDS_ADDRESS).
    #[arg(long, default_value = "https://istiod.istio-system.svc:15012")]
    waypoint_xds_address: String,
}

fn config(args: Args) -> Result<ControllerConfig> {
    let source = match (args.config_dir, args.kube) {
        (Some(dir), false) => SourceConfig::Dir(dir),
        (None, true) => SourceConfig::Kube,
        _ => anyhow::bail!("say where objects come from: --config-dir <dir> or --kube"),
    };
    let auth = match (args.node_tokens, args.token_review) {
        (Some(path), false) => AuthConfig::NodeTokens(path),
        (None, true) => AuthConfig::TokenReview {
            trusted_node_accounts: args.trusted_node_accounts.clone(),
        },
        _ => anyhow::bail!(
            "say how callers are authenticated: --node-tokens <file> or --token-review"
        ),
    };
    let account = args
        .trusted_node_accounts
        .first()
        .context("--trusted-node-account must name ztunnel's service account")?;
    let (ns, sa) = account.split_once('/').with_context(|| {
        format!("--trusted-node-account {account:?} is not `namespace/serviceaccount`")
    })?;
    let ztunnel_identity = SpiffeId::new(&args.trust_domain, ns, sa)
        .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
    if args.cert_ttl > args.max_cert_ttl {
        anyhow::bail!("--cert-ttl must not exceed --max-cert-ttl");
    }
    if !(args.fd_headroom > 0.0 && args.fd_headroom <= 1.0) {
        anyhow::bail!("--fd-headroom must be a fraction in (0, 1], like 0.9");
    }
    let mut limits = ControllerLimits {
        fd_headroom: args.fd_headroom,
        ..ControllerLimits::default()
    };
    limits.grpc.max_connections = args.max_connections;
    limits.grpc.max_connections_per_peer = args.max_connections_per_peer;
    limits.grpc.handshake_timeout = args.handshake_timeout;
    limits.grpc.idle_timeout = args.idle_timeout;
    limits.monitoring.handshake_timeout = args.handshake_timeout;
    limits.monitoring.idle_timeout = args.monitoring_idle_timeout;
    Ok(ControllerConfig {
        listen: args.listen,
        ca_cert: args.ca_cert,
        ca_key: args.ca_key,
        serving_names: args.serving_names,
        serving_ttl: args.serving_ttl,
        mesh: MeshConfig {
            trust_domain: args.trust_domain.clone(),
            cluster_id: args.cluster_id.clone(),
            domain_suffix: args.domain_suffix,
            root_namespace: args.root_namespace,
        },
        ca: CaConfig {
            trust_domain: args.trust_domain,
            cluster_id: Some(args.cluster_id),
            default_ttl: args.cert_ttl,
            max_ttl: args.max_cert_ttl,
        },
        source,
        auth,
        ztunnel_identity,
        debounce: args.debounce,
        limits,
        waypoint: WaypointTemplate {
            image: args.waypoint_image,
            xds_address: args.waypoint_xds_address,
            ..WaypointTemplate::default()
        },
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    zmesh_core::tls::install_default_provider();
    let args = Args::parse();
    let monitoring = args.monitoring;
    let cfg = config(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop = CancellationToken::new();
        let running = start(cfg, stop.clone()).await?;
        let mon =
            zmesh_controller::monitor::serve(monitoring, running.clone(), stop.clone()).await?;
        tracing::info!(addr = %running.addr, monitoring = %mon, "started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;

    /// The controller Deployment in `manifests/`.
    fn deployment() -> serde_yaml::Value {
        let text = include_str!("../../manifests/controller/deployment.yaml");
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .find(|d| d["kind"] == "Deployment")
            .expect("manifests/controller/deployment.yaml has a Deployment")
    }

    #[test]
    fn the_manifest_args_are_this_binarys_flags_and_match_its_ports_and_mounts() {
        let deployment = deployment();
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let parsed = Args::try_parse_from(std::iter::once("zmesh-controller").chain(args))
            .unwrap_or_else(|e| panic!("{e}"));
        let monitoring = parsed.monitoring;
        let cfg = config(parsed).unwrap();
        assert!(matches!(cfg.source, SourceConfig::Kube));
        assert!(matches!(cfg.auth, AuthConfig::TokenReview { .. }));
        assert_eq!(
            cfg.ztunnel_identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel",
            "ztunnel's service account in manifests/ztunnel/daemonset.yaml"
        );

        let ports: Vec<u64> = container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        assert_eq!(
            ports,
            [u64::from(cfg.listen.port()), u64::from(monitoring.port())]
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"].as_u64(),
                Some(u64::from(monitoring.port())),
                "{probe}"
            );
        }
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");

        // The CA files are in the mounted `cacerts` Secret.
        let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
        assert_eq!(container["volumeMounts"][0]["name"], "cacerts");
        assert_eq!(pod["volumes"][0]["secret"]["secretName"], "cacerts");
        assert!(cfg.ca_cert.starts_with(mount), "{}", cfg.ca_cert.display());
        assert!(cfg.ca_key.starts_with(mount), "{}", cfg.ca_key.display());

        // The waypoints' image: the install's hub and tag (kustomization.yaml names the
        // controller's), and the flag's default.
        let kustomization: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../manifests/kustomization.yaml")).unwrap();
        let controller_image = kustomization["images"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "zmesh-controller")
            .expect("kustomization.yaml sets the zmesh-controller image");
        let expected = format!(
            "{}:{}",
            controller_image["newName"]
                .as_str()
                .unwrap()
                .replace("zmesh-controller", "zmesh-waypoint"),
            controller_image["newTag"].as_str().unwrap()
        );
        assert_eq!(cfg.waypoint.image, expected);
        assert_eq!(zmesh_controller::deploy::default_image(), expected);
        assert_eq!(
            cfg.waypoint.xds_address, "https://istiod.istio-system.svc:15012",
            "the Service below, on the gRPC port"
        );

        // The Service in front of it is the name ztunnel dials and the certificate covers.
        assert!(
            cfg.serving_names
                .iter()
                .any(|n| n == "istiod.istio-system.svc")
        );
    }
}
