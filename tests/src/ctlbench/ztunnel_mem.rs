//! ztunnel's memory per known workload: the real `ztunnel` (dedicated mode) fed by the real
//! controller, both in a private sandbox (so ztunnel's fixed ports cannot clash with the
//! host's): the controller in the sandbox's root netns, ztunnel in a lab host behind the
//! bridge. Measured once with a cluster directory and once with another, so the difference
//! over the difference in Pods is the cost of one more workload (with its share of Services
//! and policies).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Credentials, Mem, controller_args, mem};
use crate::lab::Topology;
use crate::sandbox::Sandbox;
use crate::ztunnel::Ztunnel;

/// The lab host ztunnel runs in.
const HOST: &str = "zt";
/// The controller's ports on the bridge.
const PORT: u16 = 15012;
const MONITORING_PORT: u16 = 15014;
/// How long the controller may take to serve the cluster.
const CONTROLLER_READY: Duration = Duration::from_secs(300);
/// Quiet time after readiness before memory is read (the Authorization type may still be
/// applying; allocator caches settle).
const SETTLE: Duration = Duration::from_secs(3);

/// One ztunnel run.
#[derive(Debug, Clone)]
pub struct ZtunnelRun {
    /// From spawn to `/healthz/ready` (the first complete config applied).
    pub ready_after: Duration,
    /// Memory after the config was applied and settled.
    pub mem: Mem,
    /// Workloads and Services ztunnel reports holding (`/config_dump` xds status).
    pub workloads: u64,
    pub services: u64,
    /// Memory of the controller serving it (one client).
    pub controller: Option<Mem>,
}

/// The programs measured, and what ztunnel gets in its environment besides its config.
#[derive(Debug, Clone, Copy)]
pub struct Programs<'a> {
    pub controller: &'a Path,
    pub ztunnel: &'a Path,
    /// Extra `KEY=VALUE` pairs for ztunnel (e.g. allocator options), after its own.
    pub ztunnel_env: &'a [(String, String)],
}

/// Runs ztunnel against a controller serving `dir`.
pub fn measure(
    sb: &Sandbox,
    topo: &Topology<'_>,
    dir: &Path,
    creds: &Credentials,
    programs: Programs<'_>,
    label: &str,
) -> Result<ZtunnelRun> {
    let listen = std::net::SocketAddr::from((topo.bridge_ip(), PORT));
    let monitoring = std::net::SocketAddr::from((topo.bridge_ip(), MONITORING_PORT));
    let args = controller_args(dir, listen, monitoring, creds, Duration::from_millis(100));
    let mut cmd = sb.command(None, programs.controller, &args);
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "warn");
    let controller = sb.spawn(&format!("controller-{label}"), cmd)?;
    // ztunnel gets a bounded time to become ready; start it once the controller serves.
    controller.wait_until("the controller's /ready", CONTROLLER_READY, || {
        Ok(crate::http::get(&sb.netns(None), monitoring, "/ready").is_ok_and(|r| r.status == 200))
    })?;
    let node = "node-000";
    let token = creds.tokens.of(node)?;
    let p = |p: &Path| p.display().to_string();
    let address = format!("https://{listen}");
    let env: Vec<(String, String)> = [
        ("PROXY_MODE", "dedicated".to_owned()),
        (
            "PROXY_WORKLOAD_INFO",
            "istio-system/ztunnel-bench/ztunnel".to_owned(),
        ),
        ("XDS_ADDRESS", address.clone()),
        ("CA_ADDRESS", address),
        ("XDS_ROOT_CA", p(&creds.ca_cert)),
        ("CA_ROOT_CA", p(&creds.ca_cert)),
        ("AUTH_TOKEN", p(token)),
        ("CLUSTER_ID", "Kubernetes".to_owned()),
        ("TRUST_DOMAIN", "cluster.local".to_owned()),
        ("NODE_NAME", node.to_owned()),
        ("POD_NAME", "ztunnel-bench".to_owned()),
        ("POD_NAMESPACE", "istio-system".to_owned()),
        ("INSTANCE_IP", topo.host_ip(HOST).to_string()),
        ("SERVICE_ACCOUNT", "ztunnel".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(programs.ztunnel_env.iter().cloned())
    .collect();
    let started = Instant::now();
    let zt = Ztunnel::spawn(sb, HOST, &env, programs.ztunnel).with_context(|| {
        format!(
            "ztunnel against the {label} cluster; controller log tail:\n{}",
            crate::process::tail(&controller.log(), 20)
        )
    })?;
    let ready_after = started.elapsed();
    std::thread::sleep(SETTLE);
    let Some(zt_mem) = mem(zt.pid()) else {
        bail!("cannot read ztunnel's /proc status");
    };
    let controller_mem = mem(controller.pid());
    // Only now (the dump itself allocates): what ztunnel holds.
    let dump: serde_json::Value =
        serde_json::from_str(&zt.config_dump()?).context("ztunnel's /config_dump")?;
    let count = |k: &str| dump["xds"][k].as_u64().unwrap_or(0);
    let run = ZtunnelRun {
        ready_after,
        mem: zt_mem,
        workloads: count("workloads"),
        services: count("services"),
        controller: controller_mem,
    };
    zt.stop()?;
    controller.terminate(Duration::from_secs(2))?;
    Ok(run)
}

/// Both runs, small first, in one sandbox.
pub fn compare(
    full_dir: &Path,
    small_dir: &Path,
    creds: &Credentials,
    programs: Programs<'_>,
) -> Result<(ZtunnelRun, ZtunnelRun)> {
    let sb = Sandbox::new()?;
    let topo = Topology::build(&sb, &[HOST])?;
    let small = measure(&sb, &topo, small_dir, creds, programs, "small")?;
    let full = measure(&sb, &topo, full_dir, creds, programs, "full")?;
    Ok((small, full))
}
