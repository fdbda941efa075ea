//! ADD fails closed: only a well-formed, positive answer from the node agent lets a pod
//! start (docs/CNI.md "Plugin -> agent API"); every other answer fails the ADD with a CNI
//! error that names what to check, and the runtime retries.

use serde_json::json;

use crate::harness::{FakeAgent, Node, POD_ARGS, bridge_result};

/// An HTTP/1.1 answer with `head` lines (no trailing CRLF) and `body`.
fn answer(status_line: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut out = format!("{status_line}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A JSON answer with the right Content-Type and Content-Length.
fn json_answer(status: u16, body: &str) -> Vec<u8> {
    answer(
        &format!("HTTP/1.1 {status} X"),
        &[
            "Content-Type: application/json",
            &format!("Content-Length: {}", body.len()),
        ],
        body,
    )
}

/// Every answer a broken, confused or dying agent might give to `POST /v1/cni/add`.
fn bad_answers() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("200, empty body", json_answer(200, "")),
        ("200, body not JSON", json_answer(200, "OK")),
        ("200, JSON null", json_answer(200, "null")),
        ("200, empty object", json_answer(200, "{}")),
        (
            "200, enrolled a string",
            json_answer(200, r#"{"enrolled":"true"}"#),
        ),
        (
            "200, enrolled null",
            json_answer(200, r#"{"enrolled":null}"#),
        ),
        ("200, JSON truncated", json_answer(200, r#"{"enrolled":tr"#)),
        (
            "200, trailing bytes",
            json_answer(200, r#"{"enrolled":true}}"#),
        ),
        (
            "200, duplicate key",
            json_answer(200, r#"{"enrolled":false,"enrolled":true}"#),
        ),
        (
            "200, an error beside the answer",
            json_answer(200, r#"{"enrolled":true,"error":"rules not installed"}"#),
        ),
        (
            "200, unknown field",
            json_answer(200, r#"{"enrolled":true,"pending":true}"#),
        ),
        (
            "200, text/plain",
            answer(
                "HTTP/1.1 200 OK",
                &["Content-Type: text/plain", "Content-Length: 17"],
                r#"{"enrolled":true}"#,
            ),
        ),
        (
            "200, no Content-Type",
            answer(
                "HTTP/1.1 200 OK",
                &["Content-Length: 17"],
                r#"{"enrolled":true}"#,
            ),
        ),
        (
            "200, body cut short",
            answer(
                "HTTP/1.1 200 OK",
                &["Content-Type: application/json", "Content-Length: 17"],
                r#"{"enrolled":"#,
            ),
        ),
        (
            "200, HTML",
            answer(
                "HTTP/1.1 200 OK",
                &["Content-Type: text/html", "Content-Length: 13"],
                "<html></html>",
            ),
        ),
        ("201", json_answer(201, r#"{"enrolled":true}"#)),
        ("202", json_answer(202, r#"{"enrolled":true}"#)),
        ("204", answer("HTTP/1.1 204 No Content", &[], "")),
        ("302", json_answer(302, r#"{"enrolled":true}"#)),
        ("404", json_answer(404, r#"{"error":"no such endpoint"}"#)),
        ("500", json_answer(500, "")),
        (
            "head cut short",
            b"HTTP/1.1 200 OK\r\nContent-Type: app".to_vec(),
        ),
        ("nothing at all", Vec::new()),
    ]
}

#[test]
fn add_fails_closed_on_every_answer_but_a_well_formed_positive_one() {
    let conf_prev = bridge_result("1.0.0", false);
    for (what, bytes) in bad_answers() {
        let node = Node::new();
        let agent = FakeAgent::raw(&node.socket(), move |_| Some(bytes.clone()));
        let run = node.run(
            "ADD",
            POD_ARGS,
            &node.conf("1.0.0", Some(conf_prev.clone())),
        );
        assert_ne!(run.code, Some(0), "{what}: the pod would start: {run:?}");
        let err = run.assert_error(11);
        let msg = err["msg"].as_str().unwrap();
        assert!(
            msg.contains(node.socket().to_str().unwrap()) && msg.contains("retry"),
            "{what}: {err}"
        );
        assert!(
            !err["details"].as_str().unwrap().is_empty(),
            "{what}: {err}"
        );
        assert_eq!(agent.received().len(), 1, "{what}");
        let log = node.log();
        assert!(
            log.contains("cmd=ADD") && log.contains("code=11") && !log.contains("outcome=enrolled"),
            "{what}: {log}"
        );
    }
}

#[test]
fn add_names_what_to_check_for_a_garbled_answer() {
    let node = Node::new();
    let _agent = FakeAgent::raw(&node.socket(), |_| Some(json_answer(200, "")));
    let err = node
        .run(
            "ADD",
            POD_ARGS,
            &node.conf("1.1.0", Some(bridge_result("1.1.0", false))),
        )
        .assert_error(11);
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("not confirmed") && msg.contains("same zmesh release"),
        "{err}"
    );
    assert!(
        err["details"].as_str().unwrap().contains("enrolled"),
        "{err}"
    );
    let _ = std::fs::remove_file(node.socket());
    let node = Node::new();
    let _agent = FakeAgent::raw(&node.socket(), |_| {
        Some(answer(
            "HTTP/1.1 200 OK",
            &["Content-Type: text/plain", "Content-Length: 17"],
            r#"{"enrolled":true}"#,
        ))
    });
    let err = node
        .run(
            "ADD",
            POD_ARGS,
            &node.conf("1.1.0", Some(bridge_result("1.1.0", false))),
        )
        .assert_error(11);
    assert!(
        err["details"].as_str().unwrap().contains("text/plain"),
        "{err}"
    );
}

#[test]
fn add_accepts_the_well_formed_answers() {
    for (bytes, outcome) in [
        (json_answer(200, r#"{"enrolled":true}"#), "outcome=enrolled"),
        (
            json_answer(200, " {\"enrolled\" : false}\n"),
            "outcome=\"not enrolled (agent: not a mesh pod)\"",
        ),
        (
            answer(
                "HTTP/1.1 200 OK",
                &[
                    "Content-Type: application/json; charset=utf-8",
                    "Transfer-Encoding: chunked",
                ],
                "9\r\n{\"enrolle\r\n8\r\nd\":true}\r\n0\r\n\r\n",
            ),
            "outcome=enrolled",
        ),
    ] {
        let node = Node::new();
        let _agent = FakeAgent::raw(&node.socket(), move |_| Some(bytes.clone()));
        let prev = bridge_result("1.0.0", false);
        let run = node.run("ADD", POD_ARGS, &node.conf("1.0.0", Some(prev.clone())));
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.json(), prev);
        assert!(node.log().contains(outcome), "{}", node.log());
    }
}

#[test]
fn prev_result_of_an_unknown_version_is_code_1() {
    let node = Node::new();
    let _agent = FakeAgent::ready(&node.socket());
    for declared in [
        "7.0.0",
        "1.2.0",
        "0.5.0",
        "1.0",
        "v1.0.0",
        "0.1.0",
        "0.2.0",
        "1.0.0-rc1",
    ] {
        let mut prev = bridge_result("1.0.0", false);
        prev["cniVersion"] = json!(declared);
        for args in [POD_ARGS, crate::harness::SYSTEM_POD_ARGS] {
            let run = node.run("ADD", args, &node.conf("1.0.0", Some(prev.clone())));
            let err = run.assert_error(1);
            assert_eq!(err["cniVersion"], "1.0.0", "{declared}");
            let msg = err["msg"].as_str().unwrap();
            assert!(msg.contains(declared), "{declared}: {err}");
            assert!(
                err["details"].as_str().unwrap().contains("1.1.0"),
                "{declared}: {err}"
            );
        }
    }
    // Absent or empty: the configuration's version, as the reference reads it.
    for declared in [None, Some("")] {
        let mut prev = bridge_result("1.0.0", false);
        match declared {
            None => {
                prev.as_object_mut().unwrap().remove("cniVersion");
            }
            Some(v) => prev["cniVersion"] = json!(v),
        }
        let run = node.run("ADD", POD_ARGS, &node.conf("1.0.0", Some(prev)));
        assert_eq!(run.code, Some(0), "{run:?}");
        assert_eq!(run.json()["cniVersion"], "1.0.0");
    }
}
