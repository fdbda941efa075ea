//! The `zmesh-lab` commands of the gamma world: `up --world gamma` (the lab process) and
//! `apply`, `delete`, `get`, `exec` (clients of its control socket, from any shell).

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::World;
use super::control::{self, ControlServer};
use crate::cluster::Cluster;
use crate::sandbox::Sandbox;

/// The nodes of the gamma world.
pub const NODES: [&str; 2] = ["n1", "n2"];

/// `zmesh-lab up --world gamma`: builds the world, prints how to drive it, serves the control
/// socket until SIGINT/SIGTERM, then tears everything down.
pub fn up(socket: &Path) -> Result<()> {
    control::install_stop_handlers()?;
    // Bound first, so a second lab on the same socket fails before building anything.
    let server = ControlServer::bind(socket)?;
    let sb = Sandbox::new()?;
    // The waypoint authenticates as its Gateway's service account, as on a cluster.
    let waypoint_id = super::waypoint_identity();
    let cluster = Cluster::up_with_identities(
        &sb,
        &NODES,
        &[],
        crate::manifests::Manifests::rendered()?,
        &[(NODES[0], &waypoint_id)],
    )?;
    let mut world = World::gamma(&cluster)?;
    print_summary(&world, socket);
    server.serve(&mut world)?;
    println!("stopping: tearing the lab down");
    drop(world);
    drop(cluster);
    drop(sb);
    println!("lab torn down");
    Ok(())
}

fn print_summary(world: &World<'_, '_>, socket: &Path) {
    let sb = world.cluster().sandbox();
    println!(
        "gamma lab up: nodes {}, sandbox anchor pid {}, files in {}",
        NODES.join(", "),
        sb.pid(),
        sb.dir().display()
    );
    print!("{}", pods_table(&world.pods_json()));
    print!("{}", services_table(&world.services_json()));
    if world.waypoint_running() {
        println!(
            "waypoint: running, {} labelled istio.io/use-waypoint",
            super::fixture::MESH_NS
        );
    } else {
        println!(
            "waypoint: Gateway {}/{} applied; no `waypoint` binary next to zmesh-lab, so none \
             runs and traffic is L4 through ztunnel",
            super::fixture::MESH_NS,
            super::fixture::WAYPOINT_NAME
        );
    }
    let s = if socket == Path::new(control::DEFAULT_SOCKET) {
        String::new()
    } else {
        format!(" --socket {}", socket.display())
    };
    println!("drive it from another shell:");
    println!("  zmesh-lab{s} get pods -o wide");
    println!("  zmesh-lab{s} get services -o json");
    println!("  zmesh-lab{s} apply -f FILE   (or -f - for stdin)");
    println!("  zmesh-lab{s} delete -f FILE");
    println!("  zmesh-lab{s} exec NAMESPACE/POD -- curl -s echo.gateway-conformance-mesh");
    println!("stop with Ctrl-C or SIGTERM (pid {})", std::process::id());
}

/// Reads `-f FILE` (`-` = stdin).
fn read_input(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    }
}

/// `zmesh-lab apply|delete -f FILE`: prints one line per object.
pub fn apply(socket: &Path, op: &str, file: &Path) -> Result<()> {
    let yaml = read_input(file)?;
    let answer = control::request(socket, &json!({"op": op, "yaml": yaml}))?;
    for line in answer["lines"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    Ok(())
}

/// `zmesh-lab waypoint stop|start`: prints what changed.
pub fn waypoint(socket: &Path, action: &str) -> Result<()> {
    let answer = control::request(socket, &json!({"op": "waypoint", "action": action}))?;
    println!("{}", answer["line"].as_str().unwrap_or_default());
    Ok(())
}

/// `zmesh-lab get pods|services [-n NS] -o json|wide`.
pub fn get(socket: &Path, what: &str, namespace: Option<&str>, output: &str) -> Result<()> {
    if !matches!(output, "json" | "wide") {
        bail!("-o {output}: use json or wide");
    }
    let answer = control::request(socket, &json!({"op": "get", "what": what}))?;
    let items: Vec<Value> = answer["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| namespace.is_none_or(|ns| i["namespace"] == ns))
        .cloned()
        .collect();
    let items = Value::Array(items);
    let text = if output == "json" {
        serde_json::to_string_pretty(&json!({"items": items}))? + "\n"
    } else if what.starts_with('s') {
        services_table(&items)
    } else {
        pods_table(&items)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn pods_table(items: &Value) -> String {
    let mut out = format!(
        "{:<34} {:<24} {:<12} {:<5} {:<9} {}\n",
        "NAMESPACE", "NAME", "IP", "NODE", "ENROLLED", "APP"
    );
    for p in items.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<34} {:<24} {:<12} {:<5} {:<9} {}\n",
            p["namespace"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default(),
            p["ip"].as_str().unwrap_or_default(),
            p["node"].as_str().unwrap_or_default(),
            p["enrolled"].to_string(),
            p["app"].as_str().unwrap_or("-"),
        ));
    }
    out
}

fn services_table(items: &Value) -> String {
    let mut out = format!(
        "{:<34} {:<10} {:<14} {}\n",
        "NAMESPACE", "NAME", "CLUSTER-IP", "PORTS"
    );
    for s in items.as_array().into_iter().flatten() {
        let ports: Vec<String> = s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let target = match &p["targetPort"] {
                    Value::Null => String::new(),
                    t => format!("->{}", t.as_str().map_or(t.to_string(), str::to_owned)),
                };
                format!(
                    "{}:{}{target}{}",
                    p["name"].as_str().unwrap_or("-"),
                    p["port"],
                    p["appProtocol"]
                        .as_str()
                        .map(|a| format!("/{a}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<34} {:<10} {:<14} {}\n",
            s["namespace"].as_str().unwrap_or_default(),
            s["name"].as_str().unwrap_or_default(),
            s["clusterIP"].as_str().unwrap_or_default(),
            ports.join(",")
        ));
    }
    out
}

/// `zmesh-lab exec NS/POD -- CMD...`: runs CMD in the pod; returns its exit code.
pub fn exec(socket: &Path, target: &str, cmd: &[String]) -> Result<i32> {
    let status = control::exec_command(socket, target, cmd)?
        .status()
        .context("running nsenter (util-linux)")?;
    Ok(status.code().unwrap_or(128))
}
