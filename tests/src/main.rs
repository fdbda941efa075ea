//! `zmesh-lab`: builds the namespace lab by hand, for exploration and for checking that a
//! machine can run the namespace tests. Needs root. Everything it builds vanishes when it
//! exits, however it exits.

use std::io::BufRead;
use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::mesh::{self, LocalConfig, ServiceSpec, WorkloadSpec};
use zmesh_tests::ztunnel::{Ztunnel, metric_value};
use zmesh_tests::{Sandbox, bin_path, pattern, unique_marker};

#[derive(Parser)]
#[command(name = "zmesh-lab", about = "zmesh network-namespace lab")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check that this machine can run the lab: sandbox, bridge, transfer, capture, nftables.
    Check,
    /// Two hosts, two ztunnels: a client reaches a service VIP over HBONE, and a capture on
    /// the wire shows no plaintext. Needs the binaries (cargo build --workspace --bins).
    Demo {
        /// Keep the lab up until Enter, to explore it.
        #[arg(long)]
        wait: bool,
    },
    /// Build a lab and keep it until Enter (or EOF, or Ctrl-C), printing how to enter it.
    Up {
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Check => check(),
        Cmd::Demo { wait } => demo(wait),
        Cmd::Up {
            hosts,
            echo,
            redirect,
        } => up(&hosts, &echo, &redirect),
    }
}

fn check() -> Result<()> {
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
    let bin = bin_path("ztunnel");
    let sb = Sandbox::new()?;
    let topo = Topology::build(&sb, &["client", "server"])?;
    println!(
        "1. hosts: client {} and server {} on bridge br0 (sandbox anchor pid {})",
        topo.host_ip("client"),
        topo.host_ip("server"),
        sb.pid()
    );
    let ca = mesh::write_ca(sb.dir(), "demo-root")?;
    let client = WorkloadSpec::new("client", topo.host_ip("client"));
    let server = WorkloadSpec::new("echo", topo.host_ip("server")).backs("echo", &[(80, 8080)]);
    let xds = sb.dir().join("mesh.yaml");
    let cfg = LocalConfig::default()
        .workload(client.clone())
        .workload(server.clone())
        .service(ServiceSpec::new("echo", "10.96.0.10").port(80, 8080));
    cfg.write(&xds)?;
    println!(
        "2. mesh config ({}):\n{}",
        xds.display(),
        indent(&cfg.to_yaml())
    );
    let _app = EchoServer::start(&sb, "server", 8080, "echo-1")?;
    let zt_server = Ztunnel::spawn(
        &sb,
        "server",
        &mesh::dedicated_env(&server, &xds, &ca),
        &bin,
    )?;
    let zt_client = Ztunnel::spawn(
        &sb,
        "client",
        &mesh::dedicated_env(&client, &xds, &ca),
        &bin,
    )?;
    println!(
        "3. ztunnels ready: server pid {}, client pid {}",
        zt_server.pid(),
        zt_client.pid()
    );
    let rules = redirect_outbound(&sb, "client")?;
    println!(
        "4. client's outbound TCP redirected to its ztunnel:\n{}",
        indent(&rules)
    );

    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    println!(
        "5. client -> {vip} (service echo): answered by {:?}",
        identify(&sb, "client", vip)?
    );
    let marker = unique_marker();
    let mut payload = marker.clone().into_bytes();
    payload.extend(pattern(1 << 20, 5));
    let cap = Capture::start(&sb, &topo.veth("client"))?;
    let got = transfer(&sb, "client", vip, &payload)?;
    let seen = cap.stop()?;
    ensure!(
        got == payload,
        "the echo through the mesh came back altered"
    );
    println!(
        "6. 1 MiB echoed intact through HBONE; capture on {}: {} frames, {} drops, plaintext \
         marker {:?} on the wire: {}",
        topo.veth("client"),
        seen.frames,
        seen.drops,
        marker,
        if seen.contains(marker.as_bytes()) {
            "SEEN (bad)"
        } else {
            "not seen"
        }
    );
    ensure!(!seen.contains(marker.as_bytes()), "plaintext on the wire");
    let m = zt_client.metrics()?;
    println!(
        "7. client ztunnel: istio_tcp_connections_opened_total {}, istio_tcp_sent_bytes_total {}",
        metric_value(&m, "istio_tcp_connections_opened_total", &[]),
        metric_value(&m, "istio_tcp_sent_bytes_total", &[])
    );
    let log = zt_client.log();
    if let Some(line) = log
        .lines()
        .rev()
        .find(|l| l.contains("connection complete"))
    {
        println!("8. client ztunnel access log:\n   {line}");
    }
    if wait {
        println!(
            "lab up; files in {}; press Enter to tear down",
            sb.dir().display()
        );
        std::io::stdin().lock().read_line(&mut String::new())?;
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
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
