//! The `CNI_*` environment (SPEC.md §2 "Parameters") and `CNI_ARGS`.

use std::ffi::OsString;
use std::path::PathBuf;

use super::{CniError, Command};

/// Names the operation.
pub const CNI_COMMAND: &str = "CNI_COMMAND";
/// The runtime's id of the container (sandbox).
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
/// Path of the container's network namespace.
pub const CNI_NETNS: &str = "CNI_NETNS";
/// Interface name inside the container.
pub const CNI_IFNAME: &str = "CNI_IFNAME";
/// `K=V;K=V` extras (Kubernetes pod identity).
pub const CNI_ARGS: &str = "CNI_ARGS";
/// `:`-separated plugin search path.
pub const CNI_PATH: &str = "CNI_PATH";

/// Longest Linux interface name (`IFNAMSIZ - 1`).
const MAX_IFNAME_LEN: usize = 15;

/// The parsed, validated environment of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_CONTAINERID` (required for ADD, CHECK, DEL).
    pub container_id: Option<String>,
    /// `CNI_NETNS` (required for ADD, CHECK; optional on DEL, where the netns may be gone).
    pub netns: Option<String>,
    /// `CNI_IFNAME` (required for ADD, CHECK, DEL).
    pub ifname: Option<String>,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// `CNI_PATH`, split (required for GC).
    pub path: Vec<PathBuf>,
}

/// Reads one variable; unset and empty are the same (as in the reference `skel`).
fn var(
    lookup: &impl Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<Option<String>, CniError> {
    match lookup(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.into_string().map(Some).map_err(|_| CniError::InvalidEnv {
            var: name,
            reason: "not valid UTF-8".into(),
        }),
    }
}

impl Command {
    /// Reads and parses `CNI_COMMAND` (code 4 when missing or unknown).
    pub fn from_env(lookup: &impl Fn(&str) -> Option<OsString>) -> Result<Self, CniError> {
        let raw = var(lookup, CNI_COMMAND)?.ok_or_else(|| CniError::MissingEnv {
            vars: vec![CNI_COMMAND],
        })?;
        Self::parse(&raw).ok_or(CniError::UnknownCommand(raw))
    }
}

impl CniEnv {
    /// Reads the variables `command` needs, reporting every missing one at once.
    pub fn from_env(
        command: Command,
        lookup: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, CniError> {
        let env = Self {
            container_id: var(lookup, CNI_CONTAINERID)?,
            netns: var(lookup, CNI_NETNS)?,
            ifname: var(lookup, CNI_IFNAME)?,
            args: CniArgs::parse(var(lookup, CNI_ARGS)?.as_deref().unwrap_or(""))?,
            path: var(lookup, CNI_PATH)?
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        };
        let mut missing = Vec::new();
        let attachment = matches!(command, Command::Add | Command::Check | Command::Del);
        if attachment && env.container_id.is_none() {
            missing.push(CNI_CONTAINERID);
        }
        if matches!(command, Command::Add | Command::Check) && env.netns.is_none() {
            missing.push(CNI_NETNS);
        }
        if attachment && env.ifname.is_none() {
            missing.push(CNI_IFNAME);
        }
        if command == Command::Gc && env.path.is_empty() {
            missing.push(CNI_PATH);
        }
        if !missing.is_empty() {
            return Err(CniError::MissingEnv { vars: missing });
        }
        if let Some(id) = &env.container_id {
            validate_container_id(id)?;
        }
        if let Some(ifname) = &env.ifname {
            validate_ifname(ifname)?;
        }
        Ok(env)
    }
}

/// `CNI_CONTAINERID` must match `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::InvalidEnv {
            var: CNI_CONTAINERID,
            reason: format!("{id:?} must match [A-Za-z0-9][A-Za-z0-9_.-]*"),
        })
    }
}

/// `CNI_IFNAME` must be a usable Linux interface name.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let reason = if name.len() > MAX_IFNAME_LEN {
        Some(format!("{name:?} is longer than {MAX_IFNAME_LEN} bytes"))
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not an interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some(format!("{name:?} contains '/', ':' or whitespace"))
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(CniError::InvalidEnv {
            var: CNI_IFNAME,
            reason,
        }),
    }
}

/// `CNI_ARGS` as Kubernetes runtimes fill it
/// (`IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub pod_infra_container_id: Option<String>,
    /// `IgnoreUnknown`: unknown keys are accepted only when this is true.
    pub ignore_unknown: bool,
}

/// The Kubernetes pod an invocation is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// UID (empty when the runtime did not pass one).
    pub uid: &'a str,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Empty segments are skipped; a segment without `=` is an error;
    /// unknown keys are an error unless `IgnoreUnknown` is true (order-independent), as
    /// in the reference `types.LoadArgs`.
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let invalid = |reason: String| CniError::InvalidEnv {
            var: CNI_ARGS,
            reason,
        };
        let mut args = Self::default();
        let mut unknown = Vec::new();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("invalid pair {pair:?} (want KEY=VALUE)")))?;
            let owned = || (!value.is_empty()).then(|| value.to_owned());
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = owned(),
                "K8S_POD_NAME" => args.pod_name = owned(),
                "K8S_POD_UID" => args.pod_uid = owned(),
                "K8S_POD_INFRA_CONTAINER_ID" => args.pod_infra_container_id = owned(),
                "IgnoreUnknown" => {
                    args.ignore_unknown = match value.to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" | "" => false,
                        other => {
                            return Err(invalid(format!("IgnoreUnknown={other:?} is not a bool")));
                        }
                    }
                }
                other => unknown.push(other.to_owned()),
            }
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(invalid(format!(
                "unknown keys {unknown:?} (runtimes pass IgnoreUnknown=1 to allow them)"
            )));
        }
        Ok(args)
    }

    /// The pod, when both namespace and name are present (otherwise this is not a
    /// Kubernetes pod and the plugin has nothing to do).
    pub fn pod(&self) -> Option<PodRef<'_>> {
        Some(PodRef {
            namespace: self.pod_namespace.as_deref()?,
            name: self.pod_name.as_deref()?,
            uid: self.pod_uid.as_deref().unwrap_or(""),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn required_vars_per_command() {
        let none = lookup(&[]);
        let err = CniEnv::from_env(Command::Add, &none).unwrap_err();
        assert!(
            matches!(&err, CniError::MissingEnv { vars } if vars == &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME])
        );
        let del = lookup(&[
            (CNI_CONTAINERID, "abc"),
            (CNI_IFNAME, "eth0"),
            (CNI_NETNS, ""),
        ]);
        assert_eq!(CniEnv::from_env(Command::Del, &del).unwrap().netns, None);
        assert!(CniEnv::from_env(Command::Check, &del).is_err());
        assert!(CniEnv::from_env(Command::Status, &none).is_ok());
        assert_eq!(CniEnv::from_env(Command::Gc, &none).unwrap_err().code(), 4);
        let gc = lookup(&[(CNI_PATH, "/opt/cni/bin:/usr/lib/cni")]);
        assert_eq!(CniEnv::from_env(Command::Gc, &gc).unwrap().path.len(), 2);
        assert_eq!(Command::from_env(&none).unwrap_err().code(), 4);
        let bogus = lookup(&[(CNI_COMMAND, "FROB")]);
        assert_eq!(Command::from_env(&bogus).unwrap_err().code(), 4);
    }

    #[test]
    fn container_id_and_ifname_syntax() {
        for ok in ["a", "0abc", "abc_def.ghi-jkl", "cnitool-0123456789abcdef"] {
            assert!(validate_container_id(ok).is_ok(), "{ok}");
        }
        for bad in ["-abc", "_a", ".a", "a b", "a/b", "a;b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["a/b", "a:b", "a b", ".", "..", "sixteen-chars-xx"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cni_args_kubernetes_style() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;FOO=bar",
        )
        .unwrap();
        let pod = a.pod().unwrap();
        assert_eq!(
            (pod.namespace, pod.name, pod.uid),
            ("default", "web-0", "u-1")
        );
        // Unknown keys need IgnoreUnknown, wherever it appears.
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=true").is_ok());
        assert_eq!(CniArgs::parse("FOO=bar").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("K8S_POD_NAME").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("IgnoreUnknown=maybe").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert!(CniArgs::parse("K8S_POD_NAME=x;").unwrap().pod().is_none());
        // A value may contain '='.
        let a = CniArgs::parse("K8S_POD_NAMESPACE=a=b;K8S_POD_NAME=n").unwrap();
        assert_eq!(a.pod().unwrap().namespace, "a=b");
    }
}
