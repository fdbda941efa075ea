//! The container runtime's CNI side, as libcni does it: pick the node's network configuration
//! (the lexicographically first valid file in its conf dir), exec each plugin of the list in
//! order with the `CNI_*` environment and the plugin's config plus `prevResult` on stdin, cache
//! the final result for CHECK and DEL, and run DEL in reverse order. Plugins run in the node's
//! network namespace, found through `CNI_PATH`, exactly as binaries on a real node are.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::Sandbox;

/// Where Debian's containernetworking-plugins live.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// A pod as the runtime sees it when it sets up the sandbox.
#[derive(Clone, Debug)]
pub struct PodSandbox {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The sandbox (infra container) id: `CNI_CONTAINERID`.
    pub container_id: String,
    /// The pod's network namespace name (under `/run/netns` in the lab sandbox).
    pub netns: String,
}

impl PodSandbox {
    pub fn new(namespace: &str, name: &str) -> PodSandbox {
        PodSandbox {
            name: name.into(),
            namespace: namespace.into(),
            uid: format!("uid-{namespace}-{name}"),
            container_id: format!("c0ffee{:x}", fxhash(&format!("{namespace}/{name}"))),
            netns: format!("pod-{name}"),
        }
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A plugin failure as the runtime receives it: the exit code and the error JSON on stdout.
#[derive(Debug, thiserror::Error)]
#[error("plugin {plugin} failed {command} (code {code}): {msg}")]
pub struct PluginError {
    pub plugin: String,
    pub command: String,
    pub code: i64,
    pub msg: String,
    pub stdout: String,
}

/// One node's CNI runtime.
pub struct Runtime<'s> {
    sb: &'s Sandbox,
    node: String,
    conf_dir: PathBuf,
    cni_path: String,
    cache_dir: PathBuf,
}

impl<'s> Runtime<'s> {
    /// A runtime on `node` (a lab host netns) reading `conf_dir`, finding plugins in `bin_dirs`.
    pub fn new(sb: &'s Sandbox, node: &str, conf_dir: &Path, bin_dirs: &[&Path]) -> Result<Self> {
        let cache_dir = sb.dir().join(format!("cni-cache-{node}"));
        std::fs::create_dir_all(&cache_dir)?;
        std::fs::create_dir_all(conf_dir)?;
        let cni_path = bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        Ok(Runtime {
            sb,
            node: node.into(),
            conf_dir: conf_dir.into(),
            cni_path,
            cache_dir,
        })
    }

    /// The network list the runtime would use now: the first valid file, as libcni picks it
    /// (`.conflist` lists; `.conf`/`.json` single plugins wrapped into a list).
    pub fn network(&self) -> Result<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        for f in files {
            let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&f)?) else {
                continue;
            };
            if f.extension().is_some_and(|e| e == "conflist") {
                if v["plugins"].as_array().is_some_and(|p| !p.is_empty()) {
                    return Ok(v);
                }
            } else if v["type"].is_string() {
                return Ok(
                    json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]}),
                );
            }
        }
        bail!("no valid CNI configuration in {}", self.conf_dir.display())
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        list: &Value,
        pod: &PodSandbox,
        prev: Option<&Value>,
    ) -> Result<Option<Value>> {
        let kind = plugin["type"]
            .as_str()
            .ok_or_else(|| anyhow!("plugin without type: {plugin}"))?;
        let exe = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("plugin {kind} not found in CNI_PATH {}", self.cni_path))?;
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.container_id, pod.uid
        );
        let mut cmd = self.sb.command(Some(&self.node), &exe, Vec::<&str>::new());
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("exec {}", exe.display()))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
            return Err(PluginError {
                plugin: kind.into(),
                command: command.into(),
                code: err["code"].as_i64().unwrap_or(-1),
                msg: err["msg"].as_str().map(str::to_owned).unwrap_or_else(|| {
                    format!(
                        "{} {}",
                        stdout.trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }),
                stdout,
            }
            .into());
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&stdout).with_context(|| {
            format!("{kind} {command} printed {stdout:?}")
        })?))
    }

    fn cache_file(&self, list: &Value, pod: &PodSandbox) -> PathBuf {
        let net = list["name"].as_str().unwrap_or("net");
        self.cache_dir
            .join(format!("{net}-{}-eth0", pod.container_id))
    }

    /// Creates the pod's netns and runs ADD through the list; the result is cached. On a
    /// failure the runtime tears the sandbox down (DEL, then removes the netns), as kubelet's
    /// runtime does before retrying.
    pub fn add(&self, pod: &PodSandbox) -> Result<Value> {
        self.sb.run(&["ip", "netns", "add", &pod.netns])?;
        self.sb
            .run_in(&pod.netns, &["ip", "link", "set", "lo", "up"])?;
        let list = self.network()?;
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().expect("validated") {
            match self.exec("ADD", plugin, &list, pod, prev.as_ref()) {
                Ok(r) => prev = r.or(prev),
                Err(e) => {
                    let _ = self.del(pod);
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        std::fs::write(self.cache_file(&list, pod), result.to_string())?;
        Ok(result)
    }

    /// CHECK with the cached result, every plugin in order.
    pub fn check(&self, pod: &PodSandbox) -> Result<()> {
        let list = self.network()?;
        let cached: Value = serde_json::from_slice(&std::fs::read(self.cache_file(&list, pod))?)?;
        for plugin in list["plugins"].as_array().expect("validated") {
            self.exec("CHECK", plugin, &list, pod, Some(&cached))?;
        }
        Ok(())
    }

    /// DEL in reverse order with the cached result (if any), then removes the netns.
    /// Like a runtime, it keeps going past plugin failures and reports the first.
    pub fn del(&self, pod: &PodSandbox) -> Result<()> {
        let list = self.network()?;
        let cache = self.cache_file(&list, pod);
        let cached: Option<Value> = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut first_err = None;
        for plugin in list["plugins"].as_array().expect("validated").iter().rev() {
            if let Err(e) = self.exec("DEL", plugin, &list, pod, cached.as_ref()) {
                first_err.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_file(cache);
        let _ = self.sb.run(&["ip", "netns", "del", &pod.netns]);
        first_err.map_or(Ok(()), Err)
    }
}
