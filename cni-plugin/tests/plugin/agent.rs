//! Everything that involves the node agent (real requests to a fake one, or none).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    CONTAINER, FakeAgent, NETNS, Node, POD_ARGS, SYSTEM_POD_ARGS, VERSIONS, attachment_env,
    bridge_result, exec,
};

#[test]
fn add_enrols_through_the_agent() {
    for (version, enrolled) in [("0.3.1", true), ("1.0.0", false), ("1.1.0", true)] {
        let node = Node::new();
        let answer = format!(r#"{{"enrolled": {enrolled}}}"#);
        let agent = FakeAgent::start(&node.socket(), move |_| Some((200, answer.clone())));
        let prev = bridge_result(version, false);
        let run = node.run("ADD", POD_ARGS, &node.conf(version, Some(prev.clone())));
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.json(), prev);
        let received = agent.received();
        assert_eq!(received.len(), 1);
        assert_eq!(
            (received[0].method.as_str(), received[0].path.as_str()),
            ("POST", "/v1/cni/add")
        );
        assert_eq!(
            received[0].body,
            json!({
                "container_id": CONTAINER, "netns": NETNS, "ifname": "eth0",
                "pod_name": "web-0", "pod_namespace": "shop",
                "pod_uid": "0e9c3c1a-5b7d-4f2e-8a6b-1d2c3e4f5a6b",
                "ips": ["10.244.1.5/24", "fd00:10:244:1::5/64"]
            })
        );
        let log = node.log();
        let outcome = if enrolled {
            "outcome=enrolled"
        } else {
            "not enrolled"
        };
        assert!(
            log.contains("cmd=ADD") && log.contains("pod=shop/web-0") && log.contains(outcome),
            "{log}"
        );
        assert!(
            log.contains(&format!("container={CONTAINER}")) && log.contains("duration_ms="),
            "{log}"
        );
    }
}

#[test]
fn add_fails_with_try_again_when_the_agent_is_not_ready_or_missing() {
    let node = Node::new();
    let conf = node.conf("1.0.0", Some(bridge_result("1.0.0", false)));
    let err = node.run("ADD", POD_ARGS, &conf).assert_error(11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("not reachable") && msg.contains("retry"),
        "{msg}"
    );
    assert!(msg.contains(node.socket().to_str().unwrap()), "{msg}");
    assert_eq!(err["cniVersion"], "1.0.0");

    let agent = FakeAgent::start(&node.socket(), |_| {
        Some((503, r#"{"error": "ztunnel not connected"}"#.into()))
    });
    let err = node.run("ADD", POD_ARGS, &conf).assert_error(11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("cannot enrol the pod now") && msg.contains("ztunnel not connected"),
        "{err}"
    );
    assert_eq!(err["details"], "ztunnel not connected");
    assert_eq!(agent.received().len(), 1);
    assert!(node.log().contains("code=11"), "{}", node.log());
}

#[test]
fn add_maps_a_rejected_request_to_invalid_config() {
    let node = Node::new();
    let _agent = FakeAgent::start(&node.socket(), |_| {
        Some((400, r#"{"error": "netns missing"}"#.into()))
    });
    let err = node
        .run(
            "ADD",
            POD_ARGS,
            &node.conf("1.1.0", Some(bridge_result("1.1.0", false))),
        )
        .assert_error(7);
    assert_eq!(err["details"], "netns missing");
    // A plugin chained first (no prevResult) is a broken conflist.
    let err = node
        .run("ADD", SYSTEM_POD_ARGS, &node.conf("1.1.0", None))
        .assert_error(7);
    assert!(err["msg"].as_str().unwrap().contains("chained"), "{err}");
}

#[test]
fn del_always_succeeds_and_is_idempotent() {
    let node = Node::new();
    let conf = node.conf("1.0.0", Some(bridge_result("1.0.0", false)));
    let mut env = attachment_env("DEL", POD_ARGS);
    // Without an agent, with and without a netns.
    for netns in [NETNS, ""] {
        env[2] = ("CNI_NETNS", netns);
        for _ in 0..2 {
            exec(&env, &conf.to_string()).assert_empty_success();
        }
    }
    assert!(
        node.log().contains("ignored, DEL is best-effort"),
        "{}",
        node.log()
    );
    // With an agent: both calls reach it.
    let agent = FakeAgent::ready(&node.socket());
    for netns in [NETNS, ""] {
        env[2] = ("CNI_NETNS", netns);
        for _ in 0..2 {
            exec(&env, &conf.to_string()).assert_empty_success();
        }
    }
    let received = agent.received();
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|r| r.method == "POST" && r.path == "/v1/cni/del")
    );
    assert_eq!(
        received[2].body,
        json!({"container_id": CONTAINER, "netns": "", "pod_name": "web-0", "pod_namespace": "shop",
               "pod_uid": "0e9c3c1a-5b7d-4f2e-8a6b-1d2c3e4f5a6b"})
    );
    assert_eq!(received[0].body["netns"], NETNS);
    // Excluded pods never reach the agent; an empty prevResult is fine.
    exec(
        &attachment_env("DEL", SYSTEM_POD_ARGS),
        &node.conf("1.0.0", None).to_string(),
    )
    .assert_empty_success();
    assert_eq!(agent.received().len(), 4);
}

#[test]
fn del_gives_up_on_a_hung_agent() {
    let node = Node::new();
    let _agent = FakeAgent::start(&node.socket(), |_| None);
    let started = Instant::now();
    node.run("DEL", POD_ARGS, &node.conf("1.1.0", None))
        .assert_empty_success();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(
        node.log().contains("no complete answer within 5s"),
        "{}",
        node.log()
    );
}

#[test]
fn check_asks_the_agent_for_mesh_pods_only() {
    let node = Node::new();
    let conf = node.conf("1.0.0", Some(bridge_result("1.0.0", false)));
    node.run("CHECK", SYSTEM_POD_ARGS, &conf)
        .assert_empty_success();
    node.run("CHECK", POD_ARGS, &conf).assert_error(11);
    let agent = FakeAgent::ready(&node.socket());
    node.run("CHECK", POD_ARGS, &conf).assert_empty_success();
    let received = agent.received();
    assert_eq!(
        (received[0].method.as_str(), received[0].path.as_str()),
        ("GET", "/v1/ready")
    );
    drop(agent);
    std::fs::remove_file(node.socket()).expect("remove socket");
    let _busy = FakeAgent::start(&node.socket(), |_| {
        Some((503, r#"{"error":"no ztunnel"}"#.into()))
    });
    assert_eq!(
        node.run("CHECK", POD_ARGS, &conf).assert_error(11)["details"],
        "no ztunnel"
    );
    // CHECK does not exist before 0.4.0.
    let err = node
        .run("CHECK", POD_ARGS, &node.conf("0.3.1", None))
        .assert_error(1);
    assert_eq!(err["msg"], "config version does not allow CHECK");
}

#[test]
fn status_reports_the_agent() {
    let node = Node::new();
    let env = [("CNI_COMMAND", "STATUS")];
    let conf = node.conf("1.1.0", None).to_string();
    let err = exec(&env, &conf).assert_error(50);
    assert!(
        err["msg"].as_str().unwrap().contains("not available"),
        "{err}"
    );
    let agent = FakeAgent::ready(&node.socket());
    exec(&env, &conf).assert_empty_success();
    assert_eq!(agent.received()[0].path, "/v1/ready");
    assert!(node.log().contains("debug zmesh-cni["), "{}", node.log());
    assert!(
        node.log().contains("cmd=STATUS outcome=available"),
        "{}",
        node.log()
    );
    drop(agent);
    std::fs::remove_file(node.socket()).expect("remove socket");
    let _down = FakeAgent::start(&node.socket(), |_| {
        Some((503, r#"{"error":"ztunnel gone"}"#.into()))
    });
    let err = exec(&env, &conf).assert_error(50);
    assert!(
        err["details"].as_str().unwrap().contains("ztunnel gone"),
        "{err}"
    );
    exec(&env, &node.conf("1.0.0", None).to_string()).assert_error(1);
}

#[test]
fn gc_succeeds_with_valid_attachments() {
    let node = Node::new();
    let mut conf = node.conf("1.1.0", None);
    conf["cni.dev/valid-attachments"] = json!([
        {"containerID": CONTAINER, "ifname": "eth0"},
        {"containerID": "b1c2d3", "ifname": "eth0"}
    ]);
    let env = [("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")];
    exec(&env, &conf.to_string()).assert_empty_success();
    assert!(
        node.log()
            .contains("nothing to collect (2 valid attachments)"),
        "{}",
        node.log()
    );
    exec(&env[..1], &conf.to_string()).assert_error(4);
    conf["cniVersion"] = json!("1.0.0");
    exec(&env, &conf.to_string()).assert_error(1);
}

#[test]
fn every_command_at_every_version() {
    let node = Node::new();
    let _agent = FakeAgent::ready(&node.socket());
    for version in VERSIONS {
        let conf = node.conf(version, Some(bridge_result(version, false)));
        let run = node.run("ADD", POD_ARGS, &conf);
        assert_eq!(run.json(), bridge_result(version, false), "ADD {version}");
        node.run("DEL", POD_ARGS, &conf).assert_empty_success();
        let check = node.run("CHECK", POD_ARGS, &conf);
        let status = node.run("STATUS", POD_ARGS, &conf);
        let gc = node.run("GC", POD_ARGS, &conf);
        if version.starts_with("0.3") {
            check.assert_error(1);
        } else {
            check.assert_empty_success();
        }
        for run in [status, gc] {
            if version == "1.1.0" {
                run.assert_empty_success();
            } else {
                assert_eq!(run.assert_error(1)["cniVersion"], version);
            }
        }
    }
}
