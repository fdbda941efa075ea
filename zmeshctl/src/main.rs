//! `zmeshctl`, zmesh's operator CLI, modelled on `linkerd` and `istioctl`: install and
//! uninstall the mesh (the manifests built into the binary, server-side applied through the
//! Kubernetes API), enrol namespaces, check a cluster before and after an install, show what
//! is in the mesh (`status`), manage waypoints, and read a ztunnel's view (`ztunnel-config`,
//! through a port-forward to its admin port).
//!
//! Exit codes: 0 success; 1 a check failed or a command could not do its work (the message
//! says what to fix); 2 bad usage (flags, or values such as `--hub` that are malformed).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

mod check;
mod enrol;
mod error;
mod forward;
mod install;
mod manifests;
mod progress;
mod status;
mod table;
mod waypoint;
mod ztunnel_config;

use error::Error;

#[derive(Parser, Debug)]
#[command(
    name = "zmeshctl",
    version,
    about = "Install, enrol and check zmesh, the sidecarless mesh, on a Kubernetes cluster",
    after_help = "Exit codes: 0 success, 1 a check failed or the command failed, 2 bad usage."
)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

/// Which cluster to talk to (as kubectl picks it).
#[derive(Args, Debug)]
struct ClusterArgs {
    /// Kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install zmesh into istio-system (server-side apply, field manager `zmeshctl`).
    Install {
        /// Image repository prefix: images are <hub>/zmesh-{controller,ztunnel,cni}:<tag>.
        #[arg(long)]
        hub: Option<String>,
        /// Image tag.
        #[arg(long)]
        tag: Option<String>,
        /// Print the manifests instead of applying them (no cluster needed).
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete what `install` created (except the namespace and the CRD, unless --purge).
    Uninstall {
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete the namespace istio-system (with the mesh CA's cacerts Secret) and
        /// the AuthorizationPolicy CRD (with every AuthorizationPolicy).
        #[arg(long)]
        purge: bool,
    },
    /// Put a namespace's pods in the mesh (label istio.io/dataplane-mode=ambient).
    Enrol {
        /// The namespace.
        namespace: String,
    },
    /// Take a namespace's pods out of the mesh (remove the label).
    Unenrol {
        /// The namespace.
        namespace: String,
    },
    /// Check the cluster: one line per check, a hint on each failure.
    Check {
        /// Only the checks that matter before an install.
        #[arg(long)]
        pre: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show the enrolled namespaces and their pods, and the waypoints with what uses them.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Manage waypoints (Gateways of class istio-waypoint).
    #[command(subcommand)]
    Waypoint(WaypointCommand),
    /// Show one ztunnel's view (read from its admin port through a port-forward).
    ZtunnelConfig {
        /// What to show.
        #[arg(value_enum)]
        section: ztunnel_config::Section,
        /// The ztunnel pod (`name` or `name.istio-system`); default: the one on --node, else
        /// the first running ztunnel.
        pod: Option<String>,
        /// The node whose ztunnel to read.
        #[arg(long, conflicts_with = "pod")]
        node: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum WaypointCommand {
    /// Create or update a waypoint (server-side apply).
    Apply {
        /// The namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// The waypoint's name.
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Which traffic it handles (label istio.io/waypoint-for).
        #[arg(long = "for", value_enum, default_value_t = waypoint::TrafficType::Service)]
        traffic: waypoint::TrafficType,
        /// Also label the namespace istio.io/use-waypoint=<name>.
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// List waypoints.
    List {
        /// The namespace.
        #[arg(
            short,
            long,
            default_value = "default",
            conflicts_with = "all_namespaces"
        )]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Delete waypoints by name, or all of a namespace.
    Delete {
        /// The waypoints' names.
        names: Vec<String>,
        /// The namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Every waypoint of the namespace.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    /// Lines for a person.
    Text,
    /// One JSON document for scripts.
    Json,
}

async fn client(args: &ClusterArgs) -> Result<(Client, String), Error> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| Error::Config(e.to_string()))?
        }
        None if args.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
    Ok((client, server))
}

async fn run(cli: Cli) -> Result<bool, Error> {
    match cli.command {
        Command::Install { hub, tag, dry_run } => {
            let values = manifests::Values { hub, tag };
            let (yaml, objects) = install::objects(&values)?;
            if dry_run {
                print!("{yaml}");
                return Ok(true);
            }
            let (client, _) = client(&cli.cluster).await?;
            install::install(&client, &objects).await?;
            println!("zmesh installed; `zmeshctl check` follows its rollout");
        }
        Command::Uninstall { dry_run, purge } => {
            let (_, objects) = install::objects(&manifests::Values::default())?;
            let client = match dry_run {
                true => None,
                false => Some(client(&cli.cluster).await?.0),
            };
            install::uninstall(client.as_ref(), &objects, purge).await?;
        }
        Command::Enrol { namespace } => {
            let (client, _) = client(&cli.cluster).await?;
            enrol::set(&client, &namespace, true).await?;
        }
        Command::Unenrol { namespace } => {
            let (client, _) = client(&cli.cluster).await?;
            enrol::set(&client, &namespace, false).await?;
        }
        Command::Check { pre, output } => {
            let (client, server) = client(&cli.cluster).await?;
            let checks = check::run(&client, &server, pre).await;
            return Ok(check::print(&checks, output == Output::Json));
        }
        Command::Status { output } => {
            let (client, _) = client(&cli.cluster).await?;
            let s = status::read(&client).await?;
            status::print(&s, output == Output::Json);
        }
        Command::Waypoint(w) => {
            let (client, _) = client(&cli.cluster).await?;
            match w {
                WaypointCommand::Apply {
                    namespace,
                    name,
                    traffic,
                    enroll_namespace,
                } => waypoint::apply(&client, &namespace, &name, traffic, enroll_namespace).await?,
                WaypointCommand::List {
                    namespace,
                    all_namespaces,
                    output,
                } => {
                    let ns = (!all_namespaces).then_some(namespace.as_str());
                    waypoint::list(&client, ns, output == Output::Json).await?
                }
                WaypointCommand::Delete {
                    names,
                    namespace,
                    all,
                } => waypoint::delete(&client, &namespace, &names, all).await?,
            }
        }
        Command::ZtunnelConfig {
            section,
            pod,
            node,
            output,
        } => {
            let (client, _) = client(&cli.cluster).await?;
            ztunnel_config::run(
                &client,
                section,
                pod.as_deref(),
                node.as_deref(),
                output == Output::Json,
            )
            .await?;
        }
    }
    Ok(true)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // kube's TLS uses rustls; one process-wide provider (a second install is harmless).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("zmeshctl: {e}");
            match e {
                Error::BadHub(_) | Error::BadTag(_) | Error::BadWaypoint(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
