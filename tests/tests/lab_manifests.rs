//! The lab runs the components as the install (`manifests/rendered/zmesh.yaml`) says: each
//! running process of a [`Cluster`] has exactly the capabilities its container adds (read from
//! `/proc/<pid>/status`), a read-only `/` where the container has `readOnlyRootFilesystem`,
//! and the flags and environment of its container; a capability taken
//! out of the YAML is missing in the lab, and the component fails where it needs it. Needs
//! root, containernetworking-plugins, util-linux's `setpriv` and
//! `cargo build --workspace --bins`.

use std::time::Duration;

use serde_json::Value;
use zmesh_tests::Sandbox;
use zmesh_tests::cluster::Cluster;
use zmesh_tests::manifests::{
    Component, EnvSource, Manifests, capability_names, lab, process_capabilities,
};
use zmesh_tests::poll;

/// `/proc/<pid>/cmdline` and `/proc/<pid>/environ` as strings.
fn cmdline_and_environ(pid: u32) -> (Vec<String>, Vec<String>) {
    let split = |file: &str| -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/{file}"))
            .unwrap()
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    (split("cmdline"), split("environ"))
}

/// (mount point, per-mount options) of each line of `/proc/<pid>/mountinfo`, in order.
fn mount_options(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[4].to_owned(), f[5].to_owned())
        })
        .collect()
}

#[test]
fn every_lab_process_has_exactly_its_containers_capabilities_flags_and_env() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1"]).unwrap();
    let manifests = Manifests::rendered().unwrap();
    let procs = [
        (Component::Controller, cluster.controller().unwrap().pid()),
        (Component::Ztunnel, cluster.ztunnel("n1").unwrap().pid()),
        (
            Component::Agent,
            cluster.agent("n1").unwrap().unwrap().pid(),
        ),
    ];
    for (component, pid) in procs {
        let spec = manifests.container(component).unwrap();
        let mut want = spec.security.capabilities.clone();
        want.sort();
        let [inh, prm, eff, bnd, _amb] = process_capabilities(pid).unwrap();
        for (set, mask) in [("CapEff", eff), ("CapPrm", prm), ("CapBnd", bnd)] {
            assert_eq!(
                capability_names(mask),
                want,
                "{component:?} (pid {pid}): {set} is not the container's capabilities.add"
            );
        }
        assert!(
            inh & !bnd == 0,
            "{component:?}: inheritable capabilities outside the bounding set"
        );
        // no_new_privs, as allowPrivilegeEscalation: false.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(
            status.contains("NoNewPrivs:\t1"),
            spec.security.no_new_privs,
            "{component:?}: NoNewPrivs"
        );

        // readOnlyRootFilesystem: `/` is read-only for it, the sandbox's directory (the
        // lab's hostPath volumes) writable.
        let mounts = mount_options(pid);
        let opts = |at: &str| {
            mounts
                .iter()
                .rev()
                .find(|(m, _)| m == at)
                .map(|(_, o)| o.clone())
                .unwrap_or_else(|| panic!("{component:?}: no mount at {at}: {mounts:?}"))
        };
        assert_eq!(
            opts("/").split(',').any(|o| o == "ro"),
            spec.security.read_only_root,
            "{component:?}: / is {}",
            opts("/")
        );
        let dir = sb.dir().display().to_string();
        assert!(
            opts(&dir).split(',').any(|o| o == "rw"),
            "{component:?}: {dir} is {}",
            opts(&dir)
        );

        // The container's flags, except the substituted ones, are on the command line, and
        // its plain variables, except the substituted ones, are in the environment.
        let (cmdline, environ) = cmdline_and_environ(pid);
        let substituted = |name: &str| lab::substitutes(component, name);
        for arg in &spec.args {
            let name = arg.split('=').next().unwrap();
            if !substituted(name) {
                assert!(
                    cmdline.contains(arg),
                    "{component:?}: {arg} missing in {cmdline:?}"
                );
            }
        }
        for e in &spec.env {
            if let EnvSource::Value(v) = &e.source
                && !substituted(&e.name)
            {
                let kv = format!("{}={v}", e.name);
                assert!(environ.contains(&kv), "{component:?}: {kv} missing");
            }
        }
    }
    // fieldRefs resolved for the ztunnel's pod.
    let pod = cluster.ztunnel_pod("n1").unwrap();
    let (_, environ) = cmdline_and_environ(procs[1].1);
    for kv in [
        format!("NODE_NAME={}", pod.node),
        format!("POD_NAME={}", pod.name),
        format!("POD_NAMESPACE={}", pod.namespace),
        format!("INSTANCE_IP={}", pod.ip),
        format!("SERVICE_ACCOUNT={}", pod.service_account),
    ] {
        assert!(
            environ.contains(&kv),
            "ztunnel: {kv} missing in {environ:?}"
        );
    }
}

/// Without `SYS_ADMIN` in the ztunnel's container, ztunnel cannot enter an enrolled pod's
/// network namespace: the pod gets no proxy, and ztunnel's log says why.
#[test]
fn a_capability_taken_out_of_the_manifest_is_missing_in_the_lab() {
    let sb = Sandbox::new().unwrap();
    let mut manifests = Manifests::rendered().unwrap();
    manifests.edit(|o| {
        if o["kind"] == "DaemonSet" && o["metadata"]["name"] == "ztunnel" {
            let caps = &mut o["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["capabilities"]["add"];
            let kept: Vec<Value> = caps
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| *c != "SYS_ADMIN")
                .cloned()
                .collect();
            *caps = Value::Array(kept);
        }
    });
    let cluster = Cluster::up_from(&sb, &["n1"], &[], manifests).unwrap();
    let zt = cluster.ztunnel("n1").unwrap();
    let [_, _, eff, _, _] = process_capabilities(zt.pid()).unwrap();
    assert_eq!(capability_names(eff), ["NET_ADMIN"]);

    cluster
        .set_namespace_label("shop", Some("ambient"))
        .unwrap();
    // ztunnel refuses the pod the agent hands it, so the agent fails the ADD (rolled back);
    // ztunnel's log names the capability.
    let err = cluster
        .try_create_pod("n1", "shop", "web", "web", &[])
        .unwrap_err();
    poll(
        "ztunnel to log that it cannot enter the pod's network namespace",
        Duration::from_secs(30),
        || {
            zt.log()
                .contains("cannot enter the pod's network namespace (needs CAP_SYS_ADMIN)")
        },
    );
    assert!(
        format!("{err:#}").contains("CAP_SYS_ADMIN"),
        "the ADD's error does not name the capability: {err:#}"
    );
}
