//! The install manifests as the lab reads them: the checked-in one-file install
//! (`manifests/rendered/zmesh.yaml`, which `scripts/validate-manifests` keeps equal to
//! `kubectl kustomize manifests/`), so the lab's processes get their flags, environment and
//! capabilities from the YAML a cluster runs, and the API-server double its RBAC
//! ([`crate::apiserver::rbac`]).
//!
//! Per component container ([`Component`]): its `args`, its `env` (with `valueFrom.fieldRef`
//! resolved as kubelet does, for the pod the lab runs it as: [`PodFacts`]) and its
//! `securityContext` (pod-level fields merged under the container's, as the Kubernetes API
//! defines them). What the lab must run differently (paths, addresses, the API server being a
//! YAML directory) is listed in one table, [`lab::SUBSTITUTIONS`], never rewritten silently.

pub mod lab;

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

/// The rendered install, as checked in.
pub const RENDERED: &str = include_str!("../../manifests/rendered/zmesh.yaml");

/// A zmesh container of the install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `Deployment/zmesh-controller`, container `controller`.
    Controller,
    /// `DaemonSet/ztunnel`, container `ztunnel`.
    Ztunnel,
    /// `DaemonSet/zmesh-cni-agent`, container `agent`.
    Agent,
}

impl Component {
    /// Every component.
    pub const ALL: [Component; 3] = [Component::Controller, Component::Ztunnel, Component::Agent];

    /// (workload kind, workload name, container name).
    pub fn workload(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Component::Controller => ("Deployment", "zmesh-controller", "controller"),
            Component::Ztunnel => ("DaemonSet", "ztunnel", "ztunnel"),
            Component::Agent => ("DaemonSet", "zmesh-cni-agent", "agent"),
        }
    }
}

/// The objects of a multi-document YAML install.
#[derive(Debug, Clone)]
pub struct Manifests {
    objects: Vec<Value>,
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// `value`.
    Value(String),
    /// `valueFrom.fieldRef.fieldPath`.
    Field(String),
}

/// One `env` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// `name`.
    pub name: String,
    /// Its value or where it comes from.
    pub source: EnvSource,
}

/// The effective `securityContext` of a container (the container's fields over the pod's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `runAsUser`.
    pub run_as_user: Option<u32>,
    /// `runAsGroup`.
    pub run_as_group: Option<u32>,
    /// The capabilities the process keeps: `capabilities.add` (upper case, without `CAP_`);
    /// the manifests drop `ALL`, which [`Manifests::container`] requires.
    pub capabilities: Vec<String>,
    /// `allowPrivilegeEscalation: false` (no_new_privs).
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem` (the lab remounts `/` read-only for the process; see
    /// [`lab::SUBSTITUTIONS`]).
    pub read_only_root: bool,
}

/// A container of the install, as its pod template says.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// Which one.
    pub component: Component,
    /// The workload's namespace.
    pub namespace: String,
    /// The pod template's `serviceAccountName`.
    pub service_account: String,
    /// `args`.
    pub args: Vec<String>,
    /// `env`, in order.
    pub env: Vec<EnvVar>,
    /// The effective security context.
    pub security: Security,
}

/// The pod a container runs in, for `fieldRef`s (the fields kubelet resolves from the pod).
#[derive(Debug, Clone)]
pub struct PodFacts {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `status.podIP` (for a host-network pod, the node's address).
    pub pod_ip: IpAddr,
}

impl PodFacts {
    /// The value of a `fieldRef.fieldPath`, as kubelet gives it; the paths the lab's pods
    /// cannot answer (labels, annotations, `status.hostIP`...) are an error naming the path.
    pub fn field(&self, path: &str) -> Result<String> {
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.to_string(),
            other => bail!(
                "fieldRef {other:?} is not resolved by the lab (tests/src/manifests.rs, \
                 PodFacts::field): add it there"
            ),
        })
    }
}

impl Manifests {
    /// The checked-in rendered install ([`RENDERED`]).
    pub fn rendered() -> Result<Manifests> {
        Self::parse(RENDERED).context("parsing manifests/rendered/zmesh.yaml")
    }

    /// Parses a multi-document YAML install.
    pub fn parse(text: &str) -> Result<Manifests> {
        let mut objects = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).with_context(|| format!("document {}", i + 1))?;
            if !v.is_null() {
                objects.push(v);
            }
        }
        Ok(Manifests { objects })
    }

    /// Every object, in order.
    pub fn objects(&self) -> &[Value] {
        &self.objects
    }

    /// The objects of one kind.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    /// Removes objects and parts of objects: `edit` sees each object and may change it
    /// (tests that take a rule out of the RBAC, a capability out of a container).
    pub fn edit(&mut self, mut edit: impl FnMut(&mut Value)) {
        self.objects.iter_mut().for_each(&mut edit);
    }

    /// The container of `component`. Fails (naming what) when the workload or container is
    /// missing, when a field has an unexpected shape, or when the container does not drop
    /// `ALL` capabilities (the lab grants exactly the added ones).
    pub fn container(&self, component: Component) -> Result<ContainerSpec> {
        let (kind, name, container) = component.workload();
        let workload = self
            .of_kind(kind)
            .find(|o| o["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("the install has no {kind}/{name}"))?;
        let pod = &workload["spec"]["template"]["spec"];
        let c = pod["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .ok_or_else(|| anyhow!("{kind}/{name} has no container {container:?}"))?;
        let what = format!("{kind}/{name} container {container}");
        let strings = |v: &Value, field: &str| -> Result<Vec<String>> {
            match v {
                Value::Null => Ok(Vec::new()),
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| anyhow!("{what}: {field} holds a non-string {x}"))
                    })
                    .collect(),
                other => bail!("{what}: {field} is not a list: {other}"),
            }
        };
        if c["command"] != Value::Null {
            bail!("{what}: sets `command`; the lab runs the image's binary with `args` only");
        }
        let args = strings(&c["args"], "args")?;
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"]
                .as_str()
                .ok_or_else(|| anyhow!("{what}: an env entry without a name: {e}"))?
                .to_owned();
            let source = if let Some(v) = e["value"].as_str() {
                EnvSource::Value(v.to_owned())
            } else if let Some(p) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                EnvSource::Field(p.to_owned())
            } else if e["valueFrom"] != Value::Null {
                bail!(
                    "{what}: env {name} takes its value from {} which the lab does not resolve \
                     (fieldRef only; see tests/src/manifests.rs)",
                    e["valueFrom"]
                );
            } else {
                EnvSource::Value(String::new())
            };
            env.push(EnvVar { name, source });
        }
        let security = security(&what, &pod["securityContext"], &c["securityContext"])?;
        Ok(ContainerSpec {
            component,
            namespace: workload["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            service_account: pod["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            args,
            env,
            security,
        })
    }
}

/// The effective security context: the container's fields over the pod's (`runAsUser`,
/// `runAsGroup`), and the container's capabilities, which must drop `ALL`.
fn security(what: &str, pod: &Value, container: &Value) -> Result<Security> {
    let id = |field: &str| -> Result<Option<u32>> {
        let v = if container[field] != Value::Null {
            &container[field]
        } else {
            &pod[field]
        };
        match v {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| anyhow!("{what}: {field} is not a user or group id: {v}")),
        }
    };
    let caps = &container["capabilities"];
    let names = |field: &str| -> Vec<String> {
        caps[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase())
            .collect()
    };
    if !names("drop").iter().any(|c| c == "ALL") {
        bail!(
            "{what}: securityContext.capabilities.drop does not hold ALL; the lab (and this \
             project's install) grants exactly the added capabilities"
        );
    }
    if container["privileged"] == Value::Bool(true) {
        bail!("{what}: is privileged; the install grants capabilities, never privileged");
    }
    Ok(Security {
        run_as_user: id("runAsUser")?,
        run_as_group: id("runAsGroup")?,
        capabilities: names("add"),
        no_new_privs: container["allowPrivilegeEscalation"] == Value::Bool(false),
        read_only_root: container["readOnlyRootFilesystem"] == Value::Bool(true),
    })
}

impl ContainerSpec {
    /// The environment kubelet would give the container in `pod`: values as written,
    /// `fieldRef`s resolved from the pod.
    pub fn resolve_env(&self, pod: &PodFacts) -> Result<Vec<(String, String)>> {
        self.env
            .iter()
            .map(|e| {
                let v = match &e.source {
                    EnvSource::Value(v) => v.clone(),
                    EnvSource::Field(path) => pod
                        .field(path)
                        .with_context(|| format!("env {} of {:?}", e.name, self.component))?,
                };
                Ok((e.name.clone(), v))
            })
            .collect()
    }
}

impl Security {
    /// `setpriv` arguments (util-linux) that leave the program with exactly
    /// [`Security::capabilities`]: bounding and inheritable sets reduced to them (a root
    /// process's permitted and effective sets become its bounding set at exec), and for a
    /// non-root `uid` the ambient set too (what it keeps across exec), `--no-new-privs` for
    /// `allowPrivilegeEscalation: false`, and `--reuid`/`--regid` for `uid`/`gid` when not
    /// root. The caller puts the program after them (setpriv execs it).
    pub fn setpriv_args(&self, uid: u32, gid: u32) -> Vec<String> {
        let list: String = self
            .capabilities
            .iter()
            .map(|c| format!(",+{}", c.to_ascii_lowercase()))
            .collect();
        let mut args = vec![
            format!("--bounding-set=-all{list}"),
            format!("--inh-caps=-all{list}"),
        ];
        if uid != 0 {
            args.push(format!("--ambient-caps=-all{list}"));
        }
        if uid != 0 || gid != 0 {
            args.push(format!("--reuid={uid}"));
            args.push(format!("--regid={gid}"));
            args.push("--clear-groups".to_owned());
        }
        if self.no_new_privs {
            args.push("--no-new-privs".to_owned());
        }
        args
    }
}

/// The capability names of a `CapEff`/`CapBnd`/... mask from `/proc/<pid>/status` (upper
/// case, without `CAP_`), for the capabilities the install uses or might: the others are
/// named `CAP_<bit>`.
pub fn capability_names(mask: u64) -> Vec<String> {
    // linux/capability.h
    const NAMES: [(u32, &str); 10] = [
        (0, "CHOWN"),
        (1, "DAC_OVERRIDE"),
        (2, "DAC_READ_SEARCH"),
        (3, "FOWNER"),
        (7, "SETUID"),
        (12, "NET_ADMIN"),
        (13, "NET_RAW"),
        (19, "SYS_PTRACE"),
        (21, "SYS_ADMIN"),
        (10, "NET_BIND_SERVICE"),
    ];
    let mut out: Vec<String> = (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .iter()
                .find(|(bit, _)| *bit == b)
                .map_or_else(|| format!("CAP_{b}"), |(_, n)| (*n).to_owned())
        })
        .collect();
    out.sort();
    out
}

/// A process's capability sets from `/proc/<pid>/status`: (`CapInh`, `CapPrm`, `CapEff`,
/// `CapBnd`, `CapAmb`) masks.
pub fn process_capabilities(pid: u32) -> Result<[u64; 5]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut out = [0u64; 5];
    for (i, key) in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .enumerate()
    {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or_else(|| anyhow!("/proc/{pid}/status has no {key}"))?;
        out[i] = u64::from_str_radix(line[key.len()..].trim(), 16)
            .with_context(|| format!("/proc/{pid}/status: {line}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodFacts {
        PodFacts {
            name: "ztunnel-n1".into(),
            namespace: "istio-system".into(),
            node_name: "n1".into(),
            service_account: "ztunnel".into(),
            pod_ip: "10.244.1.2".parse().unwrap(),
        }
    }

    #[test]
    fn reads_each_components_args_env_and_security() {
        let m = Manifests::rendered().unwrap();
        let c = m.container(Component::Controller).unwrap();
        assert_eq!(c.namespace, "istio-system");
        assert_eq!(c.service_account, "zmesh-controller");
        assert!(c.args.iter().any(|a| a == "--kube"));
        // Pod-level runAsUser, no capabilities.
        assert_eq!(c.security.run_as_user, Some(1337));
        assert!(c.security.capabilities.is_empty());
        assert!(c.security.no_new_privs && c.security.read_only_root);

        let z = m.container(Component::Ztunnel).unwrap();
        assert_eq!(z.args, ["proxy"]);
        assert_eq!(z.security.run_as_user, Some(0));
        assert_eq!(z.security.capabilities, ["SYS_ADMIN", "NET_ADMIN"]);
        let env = z.resolve_env(&pod()).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("NODE_NAME"), Some("n1"));
        assert_eq!(get("INSTANCE_IP"), Some("10.244.1.2"));
        assert_eq!(get("POD_NAMESPACE"), Some("istio-system"));
        assert_eq!(get("SERVICE_ACCOUNT"), Some("ztunnel"));
        assert_eq!(get("PROXY_MODE"), Some("shared"));

        let a = m.container(Component::Agent).unwrap();
        assert_eq!(
            a.security.capabilities,
            ["SYS_ADMIN", "NET_ADMIN", "NET_RAW"]
        );
    }

    #[test]
    fn unknown_field_refs_and_missing_drop_all_are_errors() {
        let mut m = Manifests::rendered().unwrap();
        m.edit(|o| {
            if o["metadata"]["name"] == "ztunnel" && o["kind"] == "DaemonSet" {
                let c = &mut o["spec"]["template"]["spec"]["containers"][0];
                c["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}));
                c["securityContext"]["capabilities"]["drop"] = serde_json::json!([]);
            }
        });
        let err = m.container(Component::Ztunnel).unwrap_err().to_string();
        assert!(err.contains("drop does not hold ALL"), "{err}");
        m.edit(|o| {
            if o["metadata"]["name"] == "ztunnel" && o["kind"] == "DaemonSet" {
                let c = &mut o["spec"]["template"]["spec"]["containers"][0];
                c["securityContext"]["capabilities"]["drop"] = serde_json::json!(["ALL"]);
            }
        });
        let z = m.container(Component::Ztunnel).unwrap();
        let err = format!("{:#}", z.resolve_env(&pod()).unwrap_err());
        assert!(
            err.contains("status.hostIP") && err.contains("HOST"),
            "{err}"
        );
    }

    #[test]
    fn setpriv_keeps_exactly_the_listed_capabilities() {
        let s = Security {
            capabilities: vec!["SYS_ADMIN".into(), "NET_ADMIN".into()],
            no_new_privs: true,
            ..Security::default()
        };
        assert_eq!(
            s.setpriv_args(0, 0),
            [
                "--bounding-set=-all,+sys_admin,+net_admin",
                "--inh-caps=-all,+sys_admin,+net_admin",
                "--no-new-privs"
            ]
        );
        let none = Security::default().setpriv_args(1337, 1337);
        assert_eq!(none[0], "--bounding-set=-all");
        assert!(none.contains(&"--reuid=1337".to_owned()));
    }

    #[test]
    fn names_capability_masks() {
        assert_eq!(
            capability_names((1 << 12) | (1 << 21)),
            ["NET_ADMIN", "SYS_ADMIN"]
        );
        assert_eq!(capability_names(1 << 40), ["CAP_40"]);
    }
}
