//! Black-box tests of the `zmesh-cni` binary: each test executes it the way a container
//! runtime does (environment cleared, then only `CNI_*` and `PATH`; the request on
//! stdin) and checks stdout, the exit code, what a fake node agent received, and the log.
//! The fake agent is a thread serving HTTP/1.1 on a unix socket in a temporary
//! directory. No root needed; nothing is left behind.

#[path = "plugin/agent.rs"]
mod agent;
#[path = "plugin/answers.rs"]
mod answers;
#[path = "plugin/harness.rs"]
mod harness;

use serde_json::json;

use harness::{Node, POD_ARGS, SYSTEM_POD_ARGS, VERSIONS, attachment_env, bridge_result, exec};

#[test]
fn version_answers_every_version() {
    for requested in VERSIONS {
        let run = exec(
            &[("CNI_COMMAND", "VERSION")],
            &json!({"cniVersion": requested}).to_string(),
        );
        assert_eq!(run.code, Some(0));
        assert_eq!(
            run.json(),
            json!({"cniVersion": requested, "supportedVersions": VERSIONS})
        );
    }
    for stdin in [r#"{"cniVersion":"9.9.9"}"#, "{}", ""] {
        let run = exec(&[("CNI_COMMAND", "VERSION")], stdin);
        assert_eq!(
            run.json(),
            json!({"cniVersion": "1.1.0", "supportedVersions": VERSIONS})
        );
    }
}

#[test]
fn add_echoes_prev_result_converted_to_every_version_without_the_agent() {
    let node = Node::new(); // no agent listening: skipped pods must not need one
    for from in VERSIONS {
        let prev = bridge_result(from, from == "1.1.0");
        for to in VERSIONS {
            let expected = bridge_result(to, from == "1.1.0" && !to.starts_with("0."));
            for args in [SYSTEM_POD_ARGS, "", "IgnoreUnknown=1"] {
                let run = node.run("ADD", args, &node.conf(to, Some(prev.clone())));
                assert_eq!(run.code, Some(0), "{from} -> {to}: {run:?}");
                assert_eq!(
                    run.json(),
                    expected,
                    "{from} -> {to} with CNI_ARGS {args:?}"
                );
            }
        }
    }
    // The two conversions called out by the spec, spelled out.
    let conf = node.conf("0.3.1", Some(bridge_result("1.0.0", false)));
    let out = node.run("ADD", SYSTEM_POD_ARGS, &conf).json();
    assert_eq!(
        (
            out["ips"][0]["version"].as_str(),
            out["ips"][1]["version"].as_str()
        ),
        (Some("4"), Some("6"))
    );
    let out = node
        .run(
            "ADD",
            SYSTEM_POD_ARGS,
            &node.conf("1.1.0", Some(bridge_result("0.4.0", false))),
        )
        .json();
    assert!(
        out["ips"]
            .as_array()
            .unwrap()
            .iter()
            .all(|ip| ip.get("version").is_none()),
        "{out}"
    );
    assert!(
        node.log()
            .contains("skipped: namespace kube-system is excluded"),
        "{}",
        node.log()
    );
}

#[test]
fn add_keeps_fields_it_does_not_know() {
    let node = Node::new();
    let mut prev = bridge_result("1.0.0", false);
    prev["interfaces"][2]["vendor.example/queue"] = json!(4);
    prev["ips"][0]["vendor.example/pool"] = json!("blue");
    prev["routes"][0]["table"] = json!(100);
    prev["routes"][0]["vendor.example/hint"] = json!([1, 2]);
    prev["dns"] =
        json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "vendor": {"x": 1}});
    prev["vendorTop"] = json!({"y": true});
    for to in ["1.0.0", "1.1.0"] {
        let mut expected = prev.clone();
        expected["cniVersion"] = json!(to);
        assert_eq!(
            node.run("ADD", SYSTEM_POD_ARGS, &node.conf(to, Some(prev.clone())))
                .json(),
            expected
        );
    }
    let out = node
        .run(
            "ADD",
            SYSTEM_POD_ARGS,
            &node.conf("0.4.0", Some(prev.clone())),
        )
        .json();
    assert_eq!(out["ips"][0]["vendor.example/pool"], "blue");
    assert_eq!(out["routes"], prev["routes"]);
    assert_eq!(out["dns"], prev["dns"]);
    assert_eq!(out["vendorTop"], prev["vendorTop"]);
}

#[test]
fn malformed_stdin_is_a_decode_failure() {
    let node = Node::new();
    // Standard keys of the wrong type (with our log_file, so the log stays in the tempdir).
    let mut bad_version = node.conf("1.0.0", None);
    bad_version["cniVersion"] = json!(1);
    let bad_prev = node.conf("1.0.0", Some(json!([])));
    let typed = [bad_version.to_string(), bad_prev.to_string()];
    for stdin in ["{", "", "[1,2]", "null"]
        .into_iter()
        .chain(typed.iter().map(String::as_str))
    {
        for command in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
            let err = exec(&attachment_env(command, POD_ARGS), stdin).assert_error(6);
            assert!(
                err["msg"].as_str().unwrap().starts_with("cannot decode"),
                "{err}"
            );
        }
    }
    assert!(
        node.log().contains("cannot decode prevResult"),
        "{}",
        node.log()
    );
    let mut prev = bridge_result("1.0.0", false);
    prev["ips"][0]["address"] = json!("10.244.1.5");
    node.run("ADD", POD_ARGS, &node.conf("1.0.0", Some(prev)))
        .assert_error(6);
    let mut conf = node.conf("1.0.0", Some(bridge_result("1.0.0", false)));
    conf["exclude_namespaces"] = json!("kube-system");
    node.run("ADD", POD_ARGS, &conf).assert_error(7);
}

#[test]
fn missing_or_bad_environment_is_code_4() {
    let node = Node::new();
    let conf = node
        .conf("1.0.0", Some(bridge_result("1.0.0", false)))
        .to_string();
    let full = attachment_env("ADD", POD_ARGS);
    let without = |name: &str| -> Vec<(&str, &str)> {
        full.iter().copied().filter(|(k, _)| *k != name).collect()
    };
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let err = exec(&without(missing), &conf).assert_error(4);
        assert!(err["msg"].as_str().unwrap().contains(missing), "{err}");
    }
    let mut del = attachment_env("DEL", POD_ARGS);
    del.retain(|(k, _)| *k != "CNI_IFNAME");
    exec(&del, &conf).assert_error(4);
    for (name, value) in [
        ("CNI_COMMAND", "FROB"),
        ("CNI_CONTAINERID", "-bad id"),
        ("CNI_IFNAME", "eth0/1"),
        ("CNI_ARGS", "K8S_POD_NAME=web-0;SURPRISE=1"),
        ("CNI_ARGS", "garbage"),
    ] {
        let mut env = full.clone();
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
        exec(&env, &conf).assert_error(4);
    }
}

#[test]
fn unsupported_versions_are_code_1() {
    let node = Node::new();
    for version in ["0.1.0", "0.2.0", "9.9.9", "1.0"] {
        let conf = node.conf(version, Some(bridge_result("1.0.0", false)));
        let err = node.run("ADD", SYSTEM_POD_ARGS, &conf).assert_error(1);
        assert_eq!(err["cniVersion"], version);
        assert!(err["details"].as_str().unwrap().contains("1.1.0"), "{err}");
        node.run("DEL", POD_ARGS, &conf).assert_error(1);
    }
    let mut conf = node.conf("1.0.0", Some(bridge_result("1.0.0", false)));
    conf.as_object_mut().unwrap().remove("cniVersion");
    node.run("ADD", SYSTEM_POD_ARGS, &conf).assert_error(1);
    let old_prev = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.244.1.5/24"}});
    node.run("ADD", SYSTEM_POD_ARGS, &node.conf("1.0.0", Some(old_prev)))
        .assert_error(1);
}
