//! Everything the lab runs differently from the install, in one table ([`SUBSTITUTIONS`]),
//! and the command lines built from a container of the install plus those substitutions
//! ([`LabValues`]): a flag or variable the lab replaces or adds must be in the table, so the
//! YAML and the lab cannot drift apart silently.

use super::{Component, ContainerSpec, PodFacts};
use anyhow::{Result, bail};

/// What is substituted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A flag of `args` (the part before `=`), replaced by the lab's value.
    Arg(&'static str),
    /// A flag the lab adds.
    AddedArg(&'static str),
    /// A variable of `env`, replaced by the lab's value.
    Env(&'static str),
    /// A variable the lab adds.
    AddedEnv(&'static str),
    /// `runAsUser` / `runAsGroup`.
    RunAs,
    /// `readOnlyRootFilesystem`: how the lab applies it.
    ReadOnlyRoot,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Substitution {
    /// The container.
    pub component: Component,
    /// What.
    pub item: Item,
    /// What the lab uses instead, and why.
    pub why: &'static str,
}

const fn row(component: Component, item: Item, why: &'static str) -> Substitution {
    Substitution {
        component,
        item,
        why,
    }
}

use Component::{Agent, Controller, Ztunnel};
use Item::{AddedArg, AddedEnv, Arg, Env, ReadOnlyRoot, RunAs};

const RO_ROOT: &str = "`/` remounted read-only in the process's own mount namespace \
    (`unshare --mount --propagation slave`, as HostToContainer), except the sandbox's \
    directory, where the lab keeps what the hostPath volumes hold";

/// Every difference between the install and the lab's processes (`Cluster`,
/// `tests/src/cluster.rs`). Anything else in the containers' `args`, `env` and
/// `securityContext` is run as written.
pub const SUBSTITUTIONS: &[Substitution] = &[
    row(
        Controller,
        Arg("--kube"),
        "`--config-dir <sandbox>/pods`: the lab's API server is a directory of YAML files (the controller's file source)",
    ),
    row(
        Controller,
        Arg("--token-review"),
        "`--node-tokens <file>`: no API server to review tokens; each node's ztunnel has its own random token",
    ),
    row(
        Controller,
        Arg("--ca-cert"),
        "the lab's CA certificate (the Secret `cacerts`)",
    ),
    row(
        Controller,
        Arg("--ca-key"),
        "the lab's CA key (the Secret `cacerts`)",
    ),
    row(
        Controller,
        Arg("--listen"),
        "the sandbox bridge's address, port 15012 (the Service `istiod`)",
    ),
    row(
        Controller,
        AddedArg("--serving-name"),
        "the bridge address and `istiod.istio-system.svc`: ztunnels reach it by address (no cluster DNS)",
    ),
    row(
        Controller,
        AddedArg("--debounce"),
        "20 ms, so pushes follow a test's edits quickly",
    ),
    row(
        Controller,
        Env("RUST_LOG"),
        "`ZMESH_CONTROLLER_LOG` of the test's environment, when set",
    ),
    row(Controller, AddedEnv("NO_COLOR"), "plain log files"),
    row(
        Controller,
        AddedEnv("PATH"),
        "the host's (a container's comes from its image)",
    ),
    row(
        Controller,
        RunAs,
        "uid and gid 0 with no capability: the sandbox's user namespace maps only root (`unshare --map-root-user`)",
    ),
    row(Controller, ReadOnlyRoot, RO_ROOT),
    row(
        Ztunnel,
        Env("INPOD_UDS"),
        "`<sandbox>/<node>/run/ztunnel.sock`: the node's directory shared with its agent (hostPath /var/run/ztunnel)",
    ),
    row(
        Ztunnel,
        Env("XDS_ADDRESS"),
        "`https://<bridge address>:15012`: no cluster DNS",
    ),
    row(
        Ztunnel,
        Env("XDS_ROOT_CA"),
        "the lab's CA certificate (the ConfigMap `istio-ca-root-cert`)",
    ),
    row(
        Ztunnel,
        Env("CA_ROOT_CA"),
        "the lab's CA certificate (the ConfigMap `istio-ca-root-cert`)",
    ),
    row(
        Ztunnel,
        Env("AUTH_TOKEN"),
        "the node's token file (the projected `istio-token`)",
    ),
    row(
        Ztunnel,
        Env("RUST_LOG"),
        "`RUST_LOG` of the test's environment, when set",
    ),
    row(
        Ztunnel,
        AddedEnv("PATH"),
        "the host's (a container's comes from its image)",
    ),
    row(
        Ztunnel,
        AddedEnv("RUST_BACKTRACE"),
        "1, or the test's environment's",
    ),
    row(Ztunnel, AddedEnv("NO_COLOR"), "plain log files"),
    row(
        Ztunnel,
        AddedEnv("*"),
        "a test's own variables (`Cluster::up_with`, e.g. a short SECRET_TTL), over the install's",
    ),
    row(
        Ztunnel,
        RunAs,
        "gid 0 (uid 0 as written): the sandbox's user namespace maps only root",
    ),
    row(Ztunnel, ReadOnlyRoot, RO_ROOT),
    row(
        Agent,
        Arg("--kube"),
        "`--pods-dir <sandbox>/pods`: the lab's API server is a directory of YAML files (the agent's file source)",
    ),
    row(
        Agent,
        Arg("--cni-conf-dir"),
        "`<sandbox>/<node>/net.d` (hostPath /etc/cni/net.d)",
    ),
    row(
        Agent,
        Arg("--cni-bin-dir"),
        "`<sandbox>/<node>/bin` (hostPath /opt/cni/bin)",
    ),
    row(
        Agent,
        Arg("--run-dir"),
        "`<sandbox>/<node>/run` (hostPath /var/run/zmesh)",
    ),
    row(
        Agent,
        Arg("--ztunnel-socket"),
        "`<sandbox>/<node>/run/ztunnel.sock` (hostPath /var/run/ztunnel)",
    ),
    row(
        Agent,
        AddedArg("--plugin-log-file"),
        "`<sandbox>/<node>/zmesh-cni.log`, not the host's /var/log",
    ),
    row(
        Agent,
        Env("ZMESH_LOG"),
        "`ZMESH_AGENT_LOG` of the test's environment, when set",
    ),
    row(Agent, AddedEnv("NO_COLOR"), "plain log files"),
    row(
        Agent,
        AddedEnv("PATH"),
        "the host's (a container's comes from its image): the agent runs `nft`",
    ),
    row(
        Agent,
        AddedEnv("*"),
        "a test's own variables (`Cluster::start_agent_with`: the agent's fault injection)",
    ),
    row(Agent, ReadOnlyRoot, RO_ROOT),
];

fn listed(component: Component, wanted: impl Fn(Item) -> bool) -> bool {
    SUBSTITUTIONS
        .iter()
        .any(|s| s.component == component && wanted(s.item))
}

/// Whether the table replaces the flag or variable `name` of `component`'s container.
pub fn substitutes(component: Component, name: &str) -> bool {
    listed(component, |i| matches!(i, Arg(n) | Env(n) if n == name))
}

/// The lab's values for one container's substitutions; [`LabValues::args`] and
/// [`LabValues::env`] refuse any that [`SUBSTITUTIONS`] does not list.
#[derive(Debug, Clone)]
pub struct LabValues {
    component: Component,
    args: Vec<(&'static str, Vec<String>)>,
    added_args: Vec<(&'static str, String)>,
    env: Vec<(String, String)>,
    added_env: Vec<(String, String)>,
    writable: Option<std::path::PathBuf>,
}

impl LabValues {
    /// No substitution yet.
    pub fn new(component: Component) -> LabValues {
        LabValues {
            component,
            args: Vec::new(),
            added_args: Vec::new(),
            env: Vec::new(),
            added_env: Vec::new(),
            writable: None,
        }
    }

    /// The directory that stays writable under `readOnlyRootFilesystem` (the sandbox's).
    pub fn writable(mut self, dir: &std::path::Path) -> Self {
        self.writable = Some(dir.to_owned());
        self
    }

    /// Replaces the manifest's flag `name` (`--name` or `--name=value`) with `with`.
    pub fn arg(mut self, name: &'static str, with: Vec<String>) -> Self {
        self.args.push((name, with));
        self
    }

    /// Adds `--name=value`.
    pub fn add_arg(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.added_args.push((name, value.into()));
        self
    }

    /// Replaces the manifest's variable `name`.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Adds (or, for a test's own variables, overrides) a variable.
    pub fn add_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.added_env.push((name.to_owned(), value.into()));
        self
    }

    /// The container's `args` with the substitutions, then the added flags. Fails on a
    /// substitution the table does not list, or one for a flag the manifest does not have.
    pub fn args(&self, spec: &ContainerSpec) -> Result<Vec<String>> {
        for (name, _) in &self.args {
            if !listed(self.component, |i| i == Arg(name)) {
                bail!(
                    "the lab replaces {name} of {:?}, which tests/src/manifests/lab.rs SUBSTITUTIONS does not list",
                    self.component
                );
            }
            if !spec.args.iter().any(|a| flag_name(a) == *name) {
                bail!(
                    "the lab replaces {name}, which the {:?} container's args do not have",
                    self.component
                );
            }
        }
        let mut out = Vec::new();
        for a in &spec.args {
            match self.args.iter().find(|(n, _)| *n == flag_name(a)) {
                Some((_, with)) => out.extend(with.iter().cloned()),
                None => out.push(a.clone()),
            }
        }
        for (name, value) in &self.added_args {
            if !listed(self.component, |i| i == AddedArg(name)) {
                bail!(
                    "the lab adds {name} to {:?}, which tests/src/manifests/lab.rs SUBSTITUTIONS does not list",
                    self.component
                );
            }
            out.push(format!("{name}={value}"));
        }
        Ok(out)
    }

    /// The container's environment for `pod` (kubelet's resolution), with the substitutions,
    /// then the added variables. Fails like [`LabValues::args`].
    pub fn env_for(&self, spec: &ContainerSpec, pod: &PodFacts) -> Result<Vec<(String, String)>> {
        let mut out = spec.resolve_env(pod)?;
        for (name, value) in &self.env {
            if !listed(self.component, |i| matches!(i, Env(n) if n == name)) {
                bail!(
                    "the lab replaces env {name} of {:?}, which tests/src/manifests/lab.rs SUBSTITUTIONS does not list",
                    self.component
                );
            }
            let Some(slot) = out.iter_mut().find(|(n, _)| n == name) else {
                bail!(
                    "the lab replaces env {name}, which the {:?} container does not set",
                    self.component
                );
            };
            slot.1 = value.clone();
        }
        for (name, value) in &self.added_env {
            if !listed(
                self.component,
                |i| matches!(i, AddedEnv(n) if n == name || n == "*"),
            ) {
                bail!(
                    "the lab adds env {name} to {:?}, which tests/src/manifests/lab.rs SUBSTITUTIONS does not list",
                    self.component
                );
            }
            out.retain(|(n, _)| n != name);
            out.push((name.clone(), value.clone()));
        }
        Ok(out)
    }

    /// The user and group the lab runs the container as: the manifest's when it is root,
    /// else 0 if the table lists `RunAs` for the container (the sandbox maps only root).
    pub fn ids(&self, spec: &ContainerSpec) -> Result<(u32, u32)> {
        let uid = spec.security.run_as_user.unwrap_or(0);
        let gid = spec.security.run_as_group.unwrap_or(uid);
        if (uid, gid) != (0, 0) && !listed(self.component, |i| i == RunAs) {
            bail!(
                "{:?} runs as {uid}:{gid}, which the lab's sandbox does not map; list it in tests/src/manifests/lab.rs SUBSTITUTIONS",
                self.component
            );
        }
        Ok((0, 0))
    }

    /// `setpriv` with the container's capabilities and user, then `program` and its args:
    /// the argv the lab starts (each wrapper execs the next, so its pid is the program's).
    /// With `readOnlyRootFilesystem`, first `unshare --mount` and a remount of `/` read-only
    /// with the [`LabValues::writable`] directory bound writable over it.
    pub fn argv(&self, spec: &ContainerSpec, program: &std::path::Path) -> Result<Vec<String>> {
        let (uid, gid) = self.ids(spec)?;
        let mut argv = Vec::new();
        if spec.security.read_only_root {
            let Some(dir) = &self.writable else {
                bail!(
                    "{:?} has readOnlyRootFilesystem: the lab must name its writable directory \
                     (LabValues::writable)",
                    self.component
                );
            };
            argv.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "slave",
                    "--",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" "$0" && mount -o remount,bind,ro / && exec "$@""#,
                ]
                .map(str::to_owned),
            );
            argv.push(dir.display().to_string());
        }
        argv.push("setpriv".to_owned());
        argv.extend(spec.security.setpriv_args(uid, gid));
        argv.push("--".to_owned());
        argv.push(program.display().to_string());
        argv.extend(self.args(spec)?);
        Ok(argv)
    }
}

/// `--name` of `--name=value` (or of `--name`).
fn flag_name(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(n, _)| n)
}

/// The table as Markdown (`| component | item | in the lab |`), for docs and reports.
pub fn table() -> String {
    let mut s = String::from("| component | item | in the lab |\n|---|---|---|\n");
    for r in SUBSTITUTIONS {
        let item = match r.item {
            Arg(n) => format!("arg `{n}`"),
            AddedArg(n) => format!("added arg `{n}`"),
            Env(n) => format!("env `{n}`"),
            AddedEnv("*") => "added env (a test's)".to_owned(),
            AddedEnv(n) => format!("added env `{n}`"),
            RunAs => "runAsUser/runAsGroup".to_owned(),
            ReadOnlyRoot => "readOnlyRootFilesystem".to_owned(),
        };
        s.push_str(&format!("| {:?} | {item} | {} |\n", r.component, r.why));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Manifests, PodFacts};
    use super::*;

    /// The table names only what the install has: a flag or variable removed from the YAML
    /// must leave the table too.
    #[test]
    fn every_substitution_is_in_the_install() {
        let m = Manifests::rendered().unwrap();
        for r in SUBSTITUTIONS {
            let c = m.container(r.component).unwrap();
            match r.item {
                Arg(n) => assert!(
                    c.args.iter().any(|a| flag_name(a) == n),
                    "{:?} has no arg {n}",
                    r.component
                ),
                Env(n) => assert!(
                    c.env.iter().any(|e| e.name == n),
                    "{:?} has no env {n}",
                    r.component
                ),
                AddedArg(n) => assert!(
                    !c.args.iter().any(|a| flag_name(a) == n),
                    "{:?} already has {n}: substitute it instead",
                    r.component
                ),
                AddedEnv(n) => assert!(
                    !c.env.iter().any(|e| e.name == n),
                    "{:?} already sets {n}: substitute it instead",
                    r.component
                ),
                RunAs => assert!(
                    c.security.run_as_user.unwrap_or(0) != 0
                        || c.security.run_as_group.unwrap_or(0) != 0,
                    "{:?} runs as root already",
                    r.component
                ),
                ReadOnlyRoot => assert!(
                    c.security.read_only_root,
                    "{:?} is not readOnlyRootFilesystem",
                    r.component
                ),
            }
        }
    }

    #[test]
    fn substitutes_only_listed_items_and_keeps_the_rest() {
        let m = Manifests::rendered().unwrap();
        let c = m.container(Controller).unwrap();
        let v = LabValues::new(Controller)
            .arg("--kube", vec!["--config-dir".into(), "/lab/pods".into()])
            .add_arg("--debounce", "20ms");
        let args = v.args(&c).unwrap();
        assert_eq!(&args[..2], ["--config-dir", "/lab/pods"]);
        assert!(args.contains(&"--root-namespace=istio-system".to_owned()));
        assert_eq!(args.last().unwrap(), "--debounce=20ms");
        let err = LabValues::new(Controller)
            .arg("--root-namespace", vec![])
            .args(&c)
            .unwrap_err();
        assert!(err.to_string().contains("does not list"), "{err}");
        let err = LabValues::new(Controller)
            .add_arg("--trust-domain", "x")
            .args(&c)
            .unwrap_err();
        assert!(err.to_string().contains("does not list"), "{err}");

        let z = m.container(Ztunnel).unwrap();
        let pod = PodFacts {
            name: "ztunnel-n1".into(),
            namespace: "istio-system".into(),
            node_name: "n1".into(),
            service_account: "ztunnel".into(),
            pod_ip: "10.244.1.2".parse().unwrap(),
        };
        let env = LabValues::new(Ztunnel)
            .env("XDS_ADDRESS", "https://10.200.0.1:15012")
            .add_env("SECRET_TTL", "10s")
            .env_for(&z, &pod)
            .unwrap();
        assert!(env.contains(&("XDS_ADDRESS".into(), "https://10.200.0.1:15012".into())));
        assert!(env.contains(&("PROXY_MODE".into(), "shared".into())));
        assert!(env.contains(&("SECRET_TTL".into(), "10s".into())));
        let err = LabValues::new(Ztunnel)
            .env("PROXY_MODE", "dedicated")
            .env_for(&z, &pod)
            .unwrap_err();
        assert!(err.to_string().contains("does not list"), "{err}");
        assert_eq!(LabValues::new(Controller).ids(&c).unwrap(), (0, 0));
        assert!(table().contains("| Agent | arg `--kube` |"));
    }
}
