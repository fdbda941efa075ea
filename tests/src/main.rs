//! `zmesh-lab`: builds the namespace lab by hand, for exploration and for checking that a
//! machine can run the namespace tests. Needs root. Everything it builds vanishes when it
//! exits, however it exits.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::cluster::{self, Cluster};
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::runtime::DEBIAN_CNI_BIN;
use zmesh_tests::ztunnel::metric_value;
use zmesh_tests::{Sandbox, pattern, unique_marker};
use zmesh_tests::{gamma, tools};

#[derive(Parser)]
#[command(name = "zmesh-lab", about = "zmesh network-namespace lab")]
struct Cli {
    /// The running lab's control socket (`up --world gamma` listens there; apply, delete,
    /// get and exec talk to it).
    #[arg(long, global = true, env = "ZMESH_LAB_SOCKET", default_value = gamma::control::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that this machine can run the lab: every tool it runs (naming the package of each
    /// missing one; exits 1 if any is missing), then sandbox, bridge, transfer, capture, nftables.
    Check {
        /// Where the CNI plugins (bridge, host-local) are.
        #[arg(long, default_value = DEBIAN_CNI_BIN)]
        cni_bin_dir: PathBuf,
    },
    /// A two-node cluster (the controller, node agents, ztunnel pods in shared mode fed by the
    /// controller, pods through each node's CNI runtime): an enrolled pair talks mutual TLS
    /// across the node link (no plaintext on the wire), an unenrolled pair in plaintext, and a
    /// Service added as YAML starts answering on its VIP. Needs the binaries (cargo build --workspace
    /// --bins) and containernetworking-plugins.
    Demo {
        /// Keep the lab up until Enter, to explore it.
        #[arg(long)]
        wait: bool,
    },
    /// Build a lab and keep it until Enter (or EOF, or Ctrl-C), printing how to enter it.
    /// With `--world gamma`: the Gateway API mesh conformance world (a two-node cluster with
    /// the fixture's namespaces, Services and echo pods, enrolled in ambient, and the waypoint
    /// Gateway), driven from other shells with apply, delete, get and exec; it stays up until
    /// Ctrl-C or SIGTERM.
    Up {
        /// A prepared world instead of bare hosts: `gamma`.
        #[arg(long, value_parser = ["gamma"], conflicts_with_all = ["hosts", "echo", "redirect"])]
        world: Option<String>,
        /// Host names (one netns each), in address order from 10.200.0.2.
        #[arg(long, value_delimiter = ',', default_value = "client,server")]
        hosts: Vec<String>,
        /// Start an echo server: HOST:PORT (repeatable).
        #[arg(long)]
        echo: Vec<String>,
        /// Install the outbound redirection (to :15001) in HOST (repeatable).
        #[arg(long)]
        redirect: Vec<String>,
    },
    /// Apply Kubernetes YAML to the running lab (Pods and Deployments become lab pods).
    Apply {
        /// The YAML file; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects a Kubernetes YAML names from the running lab.
    Delete {
        /// The YAML file; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List the running lab's pods or services.
    Get {
        /// `pods` or `services`.
        #[arg(value_parser = ["pods", "pod", "po", "services", "service", "svc"])]
        what: String,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// `json` or `wide`.
        #[arg(short = 'o', long, default_value = "wide")]
        output: String,
    },
    /// Run CMD in a pod's network namespace (no shell; the exit code is CMD's).
    Exec {
        /// NAMESPACE/POD.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Stop or start the gamma world's waypoint (`stop`: its process ends and its pod is not
    /// ready, so traffic bound to it is refused; `start`: it runs again, and its pod is ready
    /// once its readiness endpoint answers).
    Waypoint {
        /// `stop` or `start`.
        #[arg(value_parser = ["stop", "start"])]
        action: String,
    },
    /// (internal) What `exec` runs inside the sandbox.
    #[command(hide = true)]
    PodExec {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        hosts: PathBuf,
        #[arg(long)]
        hostname: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let socket = cli.socket.as_path();
    match cli.command {
        Cmd::Check { cni_bin_dir } => check(&cni_bin_dir),
        Cmd::Demo { wait } => demo(wait),
        Cmd::Up { world: Some(_), .. } => gamma::cli::up(socket),
        Cmd::Up {
            world: None,
            hosts,
            echo,
            redirect,
        } => up(&hosts, &echo, &redirect),
        Cmd::Apply { file } => gamma::cli::apply(socket, "apply", &file),
        Cmd::Delete { file } => gamma::cli::apply(socket, "delete", &file),
        Cmd::Get {
            what,
            namespace,
            output,
        } => gamma::cli::get(socket, &what, namespace.as_deref(), &output),
        Cmd::Waypoint { action } => gamma::cli::waypoint(socket, &action),
        Cmd::Exec { pod, cmd } => std::process::exit(gamma::cli::exec(socket, &pod, &cmd)?),
        Cmd::PodExec {
            netns,
            hosts,
            hostname,
            cmd,
        } => {
            let e = gamma::control::pod_exec(&netns, &hosts, &hostname, &cmd);
            eprintln!("zmesh-lab exec: {e:#}");
            std::process::exit(127)
        }
    }
}

fn check(cni_bin_dir: &Path) -> Result<()> {
    let search = tools::Search::from_env(cni_bin_dir);
    let report = tools::check(&tools::tools(), &search);
    print!("{}", report.render(&search));
    if !report.missing.is_empty() {
        bail!(
            "missing tools: install {} (scripts/setup does)",
            report.missing_packages().join(" ")
        );
    }
    let sb = Sandbox::new()?;
    println!("sandbox: anchor pid {}, userns {}", sb.pid(), sb.userns());
    let topo = Topology::build(&sb, &["client", "server"])?;
    println!(
        "topology: client {}, server {}",
        topo.host_ip("client"),
        topo.host_ip("server")
    );
    let _echo = EchoServer::start(&sb, "server", 8080, "server")?;
    let dst = SocketAddr::from((topo.host_ip("server"), 8080));

    let payload = pattern(1 << 20, 7);
    let got = transfer(&sb, "client", dst, &payload)?;
    ensure!(
        got == payload,
        "1 MiB echo came back altered ({} bytes)",
        got.len()
    );
    println!("transfer: 1 MiB echoed intact");

    let marker = unique_marker();
    let cap = Capture::start(&sb, &topo.veth("client"))?;
    transfer(&sb, "client", dst, marker.as_bytes())?;
    let seen = cap.stop()?;
    ensure!(
        seen.contains(marker.as_bytes()),
        "capture missed the plaintext marker"
    );
    println!(
        "capture: {} frames, marker seen, {} drops",
        seen.frames, seen.drops
    );

    redirect_outbound(&sb, "client")?;
    let _local = EchoServer::start(&sb, "client", 15001, "outbound")?;
    let who = identify(&sb, "client", "10.96.0.10:80".parse()?)?;
    ensure!(who == "outbound", "redirected connection reached {who:?}");
    println!("nftables: a VIP connection was redirected to :15001");
    println!("ok");
    Ok(())
}

fn demo(wait: bool) -> Result<()> {
    let sb = Sandbox::new()?;
    let cluster = Cluster::up(&sb, &["n1", "n2"])?;
    println!(
        "1. cluster up (sandbox anchor pid {}): nodes n1 {} and n2 {} on bridge br0, pod \
         networks {} and {}",
        sb.pid(),
        cluster.node_ip("n1"),
        cluster.node_ip("n2"),
        cluster::pod_cidr(0),
        cluster::pod_cidr(1)
    );
    println!(
        "   controller pid {} at {} (delta xDS + CA), watching {}",
        cluster.controller().map_or(0, |c| c.pid()),
        cluster.controller_access().address,
        cluster.pods_dir().display()
    );
    for node in ["n1", "n2"] {
        let zt = cluster.ztunnel_pod(node)?;
        println!(
            "   {node}: node agent pid {}, ztunnel pod {}/{} at {} (pid {}, shared mode)",
            cluster.agent(node)?.map_or(0, |a| a.pid()),
            zt.namespace,
            zt.name,
            zt.ip,
            cluster.ztunnel(node)?.pid()
        );
    }
    let conflist = cluster.dirs("n1")?.conflist();
    let list: serde_json::Value = serde_json::from_slice(&std::fs::read(&conflist)?)?;
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    let types: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
    println!(
        "2. the agent chained zmesh-cni into {}: plugins {types:?}\n   {}",
        conflist.display(),
        plugins.last().map(|p| p.to_string()).unwrap_or_default()
    );

    cluster.set_namespace_label("shop", Some("ambient"))?;
    let client = cluster.create_pod("n1", "shop", "client", "client", &[])?;
    let server = cluster.create_pod("n2", "shop", "echo", "echo", &[("app", "echo")])?;
    let plain_client = cluster.create_pod("n1", "legacy", "plain-client", "default", &[])?;
    let plain_server = cluster.create_pod("n2", "legacy", "plain-echo", "default", &[])?;
    let apps = [
        EchoServer::start(&sb, &server.netns, 8080, "shop/echo")?,
        EchoServer::start(&sb, &plain_server.netns, 8080, "legacy/plain-echo")?,
    ];
    println!("3. pods created through each node's CNI runtime (bridge + host-local + zmesh-cni):");
    for p in [&client, &server, &plain_client, &plain_server] {
        println!(
            "   {:<20} on {} at {:<11} {}",
            format!("{}/{}", p.namespace, p.name),
            p.node,
            p.ip.to_string(),
            if p.enrolled {
                "enrolled (namespace labelled istio.io/dataplane-mode=ambient)"
            } else {
                "not enrolled"
            }
        );
    }

    let link = cluster.node_link("n1");
    for (n, (from, to)) in [(&client, &server), (&plain_client, &plain_server)]
        .into_iter()
        .enumerate()
    {
        let marker = unique_marker();
        let mut payload = marker.clone().into_bytes();
        payload.extend(pattern(256 << 10, 5));
        let cap = Capture::start(&sb, &link)?;
        let got = transfer(&sb, &from.netns, to.addr(8080), &payload)?;
        let seen = cap.stop()?;
        ensure!(got == payload, "the echo came back altered");
        let plaintext = seen.contains(marker.as_bytes());
        println!(
            "{}. {}/{} -> {}/{}: 256 KiB echoed intact; capture on {link}: {} frames, {} drops, \
             plaintext marker {}",
            4 + n,
            from.namespace,
            from.name,
            to.namespace,
            to.name,
            seen.frames,
            seen.drops,
            if plaintext {
                "SEEN"
            } else {
                "not seen: ciphertext only"
            }
        );
        ensure!(
            plaintext != from.enrolled,
            "unexpected wire contents for {}/{}",
            from.namespace,
            from.name
        );
    }

    let metrics = cluster.ztunnel("n2")?.metrics()?;
    println!("6. identities n2's ztunnel saw on its pods' inbound (mutual TLS):");
    for principal in label_values(&metrics, "source_principal") {
        let opened = metric_value(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_principal", &principal),
            ],
        );
        println!("   {principal}: {opened} connection(s)");
    }
    for app in &apps {
        println!("   the app {} accepted from {:?}", app.name(), app.peers());
    }
    println!("   (legacy/plain-echo's client has no identity: plain TCP, nothing to verify)");
    if let Some(line) = cluster
        .ztunnel("n2")?
        .log()
        .lines()
        .find(|l| l.contains("connection complete"))
    {
        println!("7. n2 ztunnel access log:\n   {line}");
    }
    let vip: SocketAddr = "10.96.0.20:80".parse()?;
    cluster.put_service("shop", "echo", &[("app", "echo")], vip.ip(), &[(80, 8080)])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        match identify(&sb, &client.netns, vip) {
            Ok(who) => break who,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context("the Service added as YAML never answered on its VIP"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    ensure!(answer == "shop/echo", "the VIP reached {answer:?}");
    println!(
        "8. Service shop/echo written to {}: the controller pushed it, and {vip} from \
         shop/client reaches {answer} through the mesh",
        cluster.pods_dir().display()
    );
    if wait {
        println!(
            "lab up; files in {}; press Enter to tear down",
            sb.dir().display()
        );
        std::io::stdin().lock().read_line(&mut String::new())?;
    }
    Ok(())
}

/// The distinct values of `label` on `istio_tcp_connections_opened_total` samples reported by
/// the destination.
fn label_values(metrics: &str, label: &str) -> Vec<String> {
    let key = format!("{label}=\"");
    let mut values: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains("reporter=\"destination\""))
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .filter(|v| !v.is_empty() && v != "unknown")
        .collect();
    values.sort();
    values.dedup();
    values
}

fn up(hosts: &[String], echo: &[String], redirect: &[String]) -> Result<()> {
    let sb = Sandbox::new()?;
    let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let topo = Topology::build(&sb, &names)?;
    let mut servers = Vec::new();
    for e in echo {
        let (host, port) = e.rsplit_once(':').context("--echo wants HOST:PORT")?;
        servers.push(EchoServer::start(&sb, host, port.parse()?, host)?);
    }
    for host in redirect {
        print!("{}", redirect_outbound(&sb, host)?);
    }
    let enter = sb.nsenter_args().join(" ");
    println!(
        "lab up: anchor pid {}, files in {}",
        sb.pid(),
        sb.dir().display()
    );
    println!("  bridge br0 {}: {enter} -- bash", topo.bridge_ip());
    for h in topo.hosts() {
        println!(
            "  {h:<13} {:<12} veth {:<15} {enter} -- ip netns exec {h} bash",
            topo.host_ip(h).to_string(),
            topo.veth(h)
        );
    }
    for s in &servers {
        println!("  echo server {:?} on port {}", s.name(), s.port());
    }
    println!("press Enter to tear down");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    drop(servers);
    drop(sb);
    println!("lab torn down");
    Ok(())
}
