//! `zmesh-lab waypoint stop|start`: the gamma world's waypoint taken down and brought back while
//! the namespace stays bound, as a crashed and restarted waypoint pod would be (kubelet reports
//! the pod not ready once its container exited, and ready again once its readiness probe
//! passes).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{APP_READY, World, sibling_binary};
use crate::process::Process;

impl World<'_, '_> {
    /// `zmesh-lab waypoint stop`: stops the waypoint's process, and its pod turns not ready
    /// (as kubelet reports a pod whose container exited). The namespace stays bound, so
    /// traffic for its Services is refused, never sent around the waypoint.
    pub fn stop_waypoint(&mut self) -> Result<String> {
        let pod = self.waypoint_pod()?;
        let proc = self
            .waypoint
            .take()
            .filter(Process::is_running)
            .context("the waypoint is not running (`zmesh-lab waypoint start` runs it)")?;
        let _ = proc.terminate(Duration::from_secs(5));
        self.cluster
            .set_pod_ready(&pod.namespace, &pod.name, false)?;
        Ok(format!(
            "waypoint {}/{} stopped; the pod is not ready",
            pod.namespace, pod.name
        ))
    }

    /// `zmesh-lab waypoint start`: runs the waypoint's process again in its pod; once its
    /// readiness endpoint answers (what kubelet probes, `:15020/healthz/ready`), the pod is
    /// ready again.
    pub fn restart_waypoint(&mut self) -> Result<String> {
        if self.waypoint.as_ref().is_some_and(Process::is_running) {
            bail!("the waypoint is already running (`zmesh-lab waypoint stop` stops it)");
        }
        let pod = self.waypoint_pod()?;
        let bin = sibling_binary("waypoint")
            .context("no `waypoint` binary next to zmesh-lab: cargo build --workspace --bins")?;
        let proc = self.spawn_waypoint(&bin, &pod)?;
        let deadline = Instant::now() + APP_READY;
        let probe = [
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "-m",
            "2",
            "http://127.0.0.1:15020/healthz/ready",
        ];
        while self.cluster.sandbox().run_in(&pod.netns, &probe).is_err() {
            if !proc.is_running() || Instant::now() > deadline {
                let log = crate::process::tail(&proc.log(), 20);
                let _ = proc.terminate(Duration::from_secs(2));
                bail!("the waypoint did not become ready; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.waypoint = Some(proc);
        self.cluster
            .set_pod_ready(&pod.namespace, &pod.name, true)?;
        Ok(format!(
            "waypoint {}/{} started; the pod is ready",
            pod.namespace, pod.name
        ))
    }
}
