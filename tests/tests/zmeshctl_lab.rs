//! The real `zmeshctl` against a real mesh: a two-node lab cluster (the controller, each
//! node's agent and ztunnel as real processes in network namespaces), seen through the
//! API-server double as Kubernetes would show it. The test installs with `zmeshctl install`,
//! then plays the kubelet: a Node per lab node and a Pod per mesh process, in `istio-system`,
//! with the DaemonSets' and Deployment's labels, its IP, and its Ready condition from the
//! process's own readiness (ztunnel's `/healthz/ready`, the agent's `/readyz` on 8000, the
//! controller's `/ready`), probed just before each check. The double forwards ports into the
//! pods' network namespaces, as the kubelet does, so `check` and `ztunnel-config` read the
//! real ztunnels' admin ports, the real agents' `/readyz` and the real controller's
//! `/debug/status`.
//!
//! Then n2's conflist loses our entry (the primary CNI rewrites it) while the agent cannot
//! write the conf dir: `check` must report n2 not chained with the agent's reason and exit 1;
//! once the directory is writable again the agent puts the entry back and `check` passes.
//! Last, n2's agent is stopped: `check` must fail the agent line, name the node, give its hint
//! and exit 1. The outputs are written to `$ZMESH_CHECK_OUT_DIR` when set.
//!
//! Needs root and `cargo build --workspace --bins` first.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use zmesh_tests::apiserver::ApiServer;
use zmesh_tests::bin_path;
use zmesh_tests::cluster::Cluster;
use zmesh_tests::sandbox::Sandbox;

const NS: &str = "istio-system";
const NODES: [&str; 2] = ["n1", "n2"];

/// A kubeconfig for the double.
fn kubeconfig(server: &ApiServer) -> Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
         users:\n- name: tester\n  user: {{}}\ncontexts:\n- name: double\n  context:\n    \
         cluster: double\n    user: tester\ncurrent-context: double\n",
        server.url()
    );
    std::fs::write(file.path(), text)?;
    Ok(file)
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn zmeshctl(kubeconfig: &Path, args: &[&str]) -> Result<Run> {
    let out = Command::new(bin_path("zmeshctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1")
        .output()
        .context("run zmeshctl")?;
    let run = Run {
        code: out.status.code().context("zmeshctl was killed")?,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ zmeshctl {}  (exit {})\n{}{}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    Ok(run)
}

/// The Gateway API CRDs, as the upstream install stores them.
fn install_gateway_api(server: &ApiServer) -> Result<()> {
    for (kind, plural, scope) in [
        ("GatewayClass", "gatewayclasses", "Cluster"),
        ("Gateway", "gateways", "Namespaced"),
        ("HTTPRoute", "httproutes", "Namespaced"),
        ("GRPCRoute", "grpcroutes", "Namespaced"),
    ] {
        server.apply(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.gateway.networking.k8s.io")},
            "spec": {"group": "gateway.networking.k8s.io", "scope": scope,
                     "names": {"kind": kind, "plural": plural},
                     "versions": [{"name": "v1", "served": true, "storage": true}]},
        }))?;
    }
    Ok(())
}

fn pod(name: &str, app: &str, node: &str, ip: &str, ready: bool) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": app, "image": app}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": ready}]},
    })
}

/// Probes every mesh process of the lab and writes what the kubelet would: Nodes, Pods with
/// their Ready condition, the controller Deployment's status (scaled to the one controller
/// the lab runs).
fn kubelet(api: &ApiServer, cluster: &Cluster<'_>, sb: &Sandbox) -> Result<()> {
    for node in NODES {
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))?;
        let node_ip = cluster.node_ip(node);
        // The DaemonSet's readinessProbe: GET /readyz on 8000 at the pod IP (the node's).
        let agent_ready = zmesh_tests::http::get(
            &sb.netns(Some(node)),
            std::net::SocketAddr::new(node_ip.into(), 8000),
            "/readyz",
        )
        .is_ok_and(|r| r.status == 200);
        let agent_pod = format!("zmesh-cni-agent-{node}");
        api.apply(pod(
            &agent_pod,
            "zmesh-cni-agent",
            node,
            &node_ip.to_string(),
            agent_ready,
        ))?;
        // Host network: the agent's ports are in the node's netns.
        api.set_pod_netns(NS, &agent_pod, &sb.netns_path(Some(node)));
        let zpod = cluster.ztunnel_pod(node)?;
        let zready = cluster
            .ztunnel(node)?
            .ready_status()
            .is_ok_and(|s| s == 200);
        api.apply(pod(
            &zpod.name,
            "ztunnel",
            node,
            &zpod.ip.to_string(),
            zready,
        ))?;
        api.set_pod_netns(NS, &zpod.name, &sb.netns_path(Some(&zpod.netns)));
    }
    // The controller runs in the sandbox's root netns, monitoring on 0.0.0.0:15014.
    let root = sb.netns(None);
    let ready = zmesh_tests::http::get(&root, "127.0.0.1:15014".parse()?, "/ready")
        .is_ok_and(|r| r.status == 200);
    let address = cluster.controller_access().address;
    let ip = address
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(address.as_str(), |(ip, _)| ip);
    api.apply(pod(
        "zmesh-controller-0",
        "zmesh-controller",
        NODES[0],
        ip,
        ready,
    ))?;
    api.set_pod_netns(NS, "zmesh-controller-0", &sb.netns_path(None));
    let mut d = api
        .get("apps/v1", "Deployment", NS, "zmesh-controller")
        .context("the controller Deployment was installed")?;
    d["spec"]["replicas"] = json!(1);
    let n = i32::from(ready);
    d["status"] = json!({"replicas": 1, "readyReplicas": n, "updatedReplicas": 1,
                         "availableReplicas": n});
    api.apply(d)?;
    Ok(())
}

/// Runs `kubelet` and `check` until `done` holds for the run or `secs` pass; the last run.
fn check_until(
    api: &ApiServer,
    cluster: &Cluster<'_>,
    sb: &Sandbox,
    kc: &Path,
    secs: u64,
    done: impl Fn(&Run) -> bool,
) -> Result<Run> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        kubelet(api, cluster, sb)?;
        let run = zmeshctl(kc, &["check"])?;
        if done(&run) || std::time::Instant::now() > deadline {
            return Ok(run);
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn save(name: &str, run: &Run) {
    if let Some(dir) = std::env::var_os("ZMESH_CHECK_OUT_DIR") {
        let text = format!("$ zmeshctl check\n{}(exit {})\n", run.stdout, run.code);
        let _ = std::fs::write(Path::new(&dir).join(name), text);
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

#[test]
fn check_passes_on_a_healthy_lab_names_an_unchained_node_and_a_stopped_agent() -> Result<()> {
    let sb = Sandbox::new()?;
    let mut cluster = Cluster::up(&sb, &NODES)?;
    cluster.set_namespace_label("demo", Some("ambient"))?;
    let app = cluster.create_pod("n1", "demo", "app", "app", &[])?;
    cluster.create_pod("n2", "demo", "peer", "peer", &[])?;
    cluster.wait_mesh_synced()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let api = rt.block_on(ApiServer::start());
    install_gateway_api(&api)?;
    let kc = kubeconfig(&api)?;
    let run = zmeshctl(kc.path(), &["install"])?;
    ensure!(run.code == 0, "install failed: {}", run.stderr);

    // Healthy: every line passes (ztunnels may still be fetching certificates: poll).
    let healthy = check_until(&api, &cluster, &sb, kc.path(), 60, |r| r.code == 0)?;
    save("Z-check-healthy.txt", &healthy);
    assert_eq!(healthy.code, 0, "{}", healthy.stdout);
    assert!(!healthy.stdout.contains('✘'), "{}", healthy.stdout);
    for line in [
        "✔ node agent ready on every node: 2/2 nodes",
        "✔ CNI plugin chained on every node: 2/2 nodes, in 10-lab.conflist\n",
        "✔ ztunnel ready on every node: 2/2 nodes",
        "✔ workload certificates valid: ",
        "✔ ztunnel xDS in sync with the controller: 2 ztunnels hold the ",
        "all checks passed",
    ] {
        assert!(
            healthy.stdout.contains(line),
            "no {line:?} in\n{}",
            healthy.stdout
        );
    }

    // ztunnel-config reads the real ztunnel on n1 through the double's port-forward.
    let run = zmeshctl(kc.path(), &["ztunnel-config", "workloads", "--node", "n1"])?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let row = run
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("app"))
        .unwrap_or_else(|| panic!("no row for pod app in\n{}", run.stdout));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        ["demo", "app", &app.ip.to_string(), "n1", "None", "HBONE"]
    );
    let run = zmeshctl(
        kc.path(),
        &["ztunnel-config", "certificates", "ztunnel-n1", "-o", "json"],
    )?;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let certs: Value = serde_json::from_str(&run.stdout)?;
    let cert = certs
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == app.spiffe_id()))
        .unwrap_or_else(|| panic!("no certificate of {} in {certs}", app.spiffe_id()));
    let serial = cert["serial"].as_str().unwrap_or("");
    assert!(
        !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_hexdigit()),
        "{cert}"
    );
    let run = zmeshctl(kc.path(), &["ztunnel-config", "certificates", "ztunnel-n1"])?;
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&app.spiffe_id()))
        .unwrap_or_else(|| panic!("no row for {} in\n{}", app.spiffe_id(), run.stdout));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..5], ["Leaf", "Available", "true", serial], "{row}");

    // n2's primary CNI rewrites its conflist without our entry, and the agent cannot put it
    // back: the conf dir is not writable for it (it runs as the DaemonSet does, as root
    // without CAP_DAC_OVERRIDE; the test, as real root, still writes).
    let dirs = cluster.dirs("n2")?.clone();
    let conflist = dirs.conflist();
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&conflist)?)?;
    doc["plugins"]
        .as_array_mut()
        .context("plugins")?
        .retain(|p| p["type"] != "zmesh-cni");
    set_mode(&dirs.conf_dir, 0o555)?;
    std::fs::write(&conflist, serde_json::to_vec_pretty(&doc)?)?;
    let unchained = check_until(&api, &cluster, &sb, kc.path(), 60, |r| {
        r.stdout.contains("the agent cannot put it back")
    })?;
    save("Z-check-unchained.txt", &unchained);
    assert_eq!(unchained.code, 1, "{}", unchained.stdout);
    let line = unchained
        .stdout
        .lines()
        .find(|l| l.starts_with("✘ CNI plugin chained on every node: "))
        .unwrap_or_else(|| panic!("no failed chain line in\n{}", unchained.stdout));
    let reason = format!(
        "✘ CNI plugin chained on every node: 1/2 nodes; not on n2 (zmesh-cni missing from \
         10-lab.conflist, the file the container runtime loads from {}; the agent cannot put \
         it back: cannot write ",
        dirs.conf_dir.display()
    );
    assert!(line.starts_with(&reason), "{line}");
    assert!(line.contains("Permission denied"), "{line}");
    // The kubelet's probe fails too: the agent line names n2 as well; nothing else fails.
    let failed: Vec<&str> = unchained
        .stdout
        .lines()
        .filter(|l| l.starts_with('✘'))
        .collect();
    assert_eq!(failed.len(), 2, "{}", unchained.stdout);
    assert!(
        failed[0].starts_with("✘ node agent ready on every node: 1/2 nodes; not on n2"),
        "{}",
        unchained.stdout
    );

    // Writable again: the agent sees the change and chains itself back; check passes.
    set_mode(&dirs.conf_dir, 0o755)?;
    let repaired = check_until(&api, &cluster, &sb, kc.path(), 60, |r| r.code == 0)?;
    assert_eq!(repaired.code, 0, "{}", repaired.stdout);
    assert!(std::fs::read_to_string(&conflist)?.contains("\"zmesh-cni\""));

    // A broken node: n2's agent stops.
    cluster.stop_agent("n2")?;
    kubelet(&api, &cluster, &sb)?;
    let broken = zmeshctl(kc.path(), &["check"])?;
    save("Z-check-broken.txt", &broken);
    assert_eq!(broken.code, 1, "{}", broken.stdout);
    assert!(
        broken.stdout.contains(
            "✘ node agent ready on every node: 1/2 nodes; not on n2 \
             (pod zmesh-cni-agent-n2 not ready)\n    hint: kubectl -n istio-system get pods \
             -l app=zmesh-cni-agent -o wide"
        ),
        "{}",
        broken.stdout
    );
    // Its health port is gone too: the chain line cannot tell, and says so.
    assert!(
        broken.stdout.contains(
            "✘ CNI plugin chained on every node: 1/2 nodes; not on n2 (cannot ask its agent \
             zmesh-cni-agent-n2: port 8000: "
        ),
        "{}",
        broken.stdout
    );
    let failed: Vec<&str> = broken
        .stdout
        .lines()
        .filter(|l| l.starts_with('✘'))
        .collect();
    assert_eq!(failed.len(), 2, "{}", broken.stdout);
    drop(api);
    drop(rt);
    Ok(())
}
