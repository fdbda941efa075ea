//! Istio's L7 authorization tasks, transcribed for the lab's real waypoint (`zmesh-lab up
//! --world gamma`: the consumer pod calls the mesh namespace's `echo` Service, which is bound
//! to the waypoint Gateway `namespace`). Policies attach with `targetRefs` as in Istio's
//! ambient variants; each step names its source page. Every step is a `zmesh-lab` command from
//! another "shell", as a user drives it; one lab serves every step, in order.
//! Needs root and `cargo build --workspace --bins`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use zmesh_tests::gamma::driver::RunningLab;

const LAB: &str = env!("CARGO_BIN_EXE_zmesh-lab");
const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
/// Bringing up two nodes, the pods, their apps and the waypoint on a loaded machine.
const UP_DEADLINE: Duration = Duration::from_secs(300);
/// A policy change reaching the waypoint.
const PUSH_DEADLINE: Duration = Duration::from_secs(90);

struct World {
    lab: RunningLab,
    /// The consumer's pod, `NS/NAME`.
    from: String,
}

/// What one request got: status and body.
#[derive(Debug, PartialEq)]
struct Answer {
    code: u16,
    body: String,
}

impl World {
    /// `curl` from the consumer's pod to the `echo` Service at `path`, with `method` and
    /// `headers`.
    fn call(&self, method: &str, path: &str, headers: &[&str]) -> Answer {
        let url = format!("http://echo.{MESH}:80{path}");
        let mut args = vec![
            "exec",
            &self.from,
            "--",
            "curl",
            "-sS",
            "-m",
            "30",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let out = self.lab.ok(&args, None);
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        Answer {
            code: code
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("no code in {out:?}")),
            body: body.to_owned(),
        }
    }

    /// Polls until `method path` answers `code` (a policy change reached the waypoint).
    fn until(&self, method: &str, path: &str, headers: &[&str], code: u16) -> Answer {
        let deadline = Instant::now() + PUSH_DEADLINE;
        loop {
            let a = self.call(method, path, headers);
            if a.code == code {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{method} {path} still answers {a:?}, not {code}; waypoint log:\n{}",
                tail(&plain(&self.lab.process_logs("waypoint")))
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn apply(&self, yaml: &str) {
        self.lab.ok(&["apply", "-f", "-"], Some(yaml));
    }

    fn delete(&self, yaml: &str) {
        self.lab.ok(&["delete", "-f", "-"], Some(yaml));
    }
}

/// `log` without its terminal colour codes (`ESC [ ... m`).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// An AuthorizationPolicy in the mesh namespace attached to `target` (`Service echo` or the
/// waypoint `Gateway namespace`), with `annotations` and the rest of the spec.
fn policy(name: &str, target: &str, annotations: &str, spec: &str) -> String {
    let target = match target {
        "service" => "{kind: Service, group: \"\", name: echo}",
        _ => "{kind: Gateway, group: gateway.networking.k8s.io, name: namespace}",
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {MESH}\n  annotations: {{{annotations}}}\nspec:\n  targetRefs: [{target}]\n{spec}"
    )
}

const DENIED: &str = "RBAC: access denied";

#[test]
fn istio_l7_authorization_tasks_through_the_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    let lab = RunningLab::start(Path::new(LAB), dir.path(), UP_DEADLINE);
    let v: Value = serde_json::from_str(&lab.ok(&["get", "pods", "-o", "json"], None)).unwrap();
    let consumer = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == CONSUMER)
        .cloned()
        .expect("the consumer pod");
    let w = World {
        from: format!("{CONSUMER}/{}", consumer["name"].as_str().unwrap()),
        lab,
    };
    let client = format!("cluster.local/ns/{CONSUMER}/sa/default");
    assert_eq!(w.until("GET", "/", &[], 200).code, 200);

    // https://istio.io/latest/docs/tasks/security/authorization/authz-http/ : "allow-nothing"
    // denies every request; then an ALLOW for GET from the client's identity lets GETs
    // through and nothing else.
    let allow_nothing = policy("allow-nothing", "service", "", "");
    w.apply(&allow_nothing);
    let a = w.until("GET", "/", &[], 403);
    assert_eq!(a.body, DENIED);
    let viewer = policy(
        "echo-viewer",
        "service",
        "",
        &format!(
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{client}\"]\n    \
             to:\n    - operation:\n        methods: [GET]\n"
        ),
    );
    w.apply(&viewer);
    w.until("GET", "/", &[], 200);
    let a = w.call("POST", "/", &[]);
    assert_eq!((a.code, a.body.as_str()), (403, DENIED));
    w.delete(&allow_nothing);
    w.delete(&viewer);
    w.until("POST", "/", &[], 200);

    // https://istio.io/latest/docs/tasks/security/authorization/authz-deny/ : "deny-method-get"
    // denies GET; then a DENY of GET unless `x-token: admin`.
    let deny_get = policy(
        "deny-method-get",
        "service",
        "",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n",
    );
    w.apply(&deny_get);
    assert_eq!(w.until("GET", "/", &[], 403).body, DENIED);
    assert_eq!(w.call("POST", "/", &[]).code, 200, "only GET is denied");
    let deny_get = policy(
        "deny-method-get",
        "service",
        "",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n    \
         when:\n    - key: request.headers[x-token]\n      notValues: [admin]\n",
    );
    w.apply(&deny_get);
    w.until("GET", "/", &["x-token: admin"], 200);
    assert_eq!(w.call("GET", "/", &["x-token: guest"]).code, 403);
    assert_eq!(w.call("GET", "/", &[]).code, 403);
    w.delete(&deny_get);
    w.until("GET", "/", &[], 200);

    // https://istio.io/latest/docs/tasks/security/authorization/authz-dry-run/ : a DENY of
    // `/headers` with `istio.io/dry-run: "true"` is only logged; removing the annotation
    // enforces it.
    let dry = |dry_run: &str| {
        policy(
            "deny-path-headers",
            "gateway",
            &format!("istio.io/dry-run: \"{dry_run}\""),
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/headers\"]\n",
        )
    };
    w.apply(&dry("true"));
    let deadline = Instant::now() + PUSH_DEADLINE;
    loop {
        assert_eq!(
            w.call("GET", "/headers", &[]).code,
            200,
            "dry-run never denies"
        );
        let log = plain(&w.lab.process_logs("waypoint"));
        if log.contains("dry-run AuthorizationPolicy") && log.contains("deny-path-headers") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no dry-run log line:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    w.apply(&dry("false"));
    assert_eq!(w.until("GET", "/headers", &[], 403).body, DENIED);
    assert_eq!(w.call("GET", "/", &[]).code, 200);
    w.delete(&dry("false"));
    w.until("GET", "/headers", &[], 200);

    // https://istio.io/latest/docs/ambient/usage/l7-features/ and the getting-started step
    // https://istio.io/latest/docs/ambient/getting-started/secure-and-visualize/ : an L7 ALLOW on
    // the waypoint for the client's identity and GET; another identity and another method are
    // denied, and the waypoint's access log names the deciding policy.
    let l7 = policy(
        "echo-viewer-l7",
        "gateway",
        "",
        &format!(
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{client}\"]\n    \
             to:\n    - operation:\n        methods: [GET]\n        paths: [\"/api/{{*}}\", \"/\"]\n"
        ),
    );
    w.apply(&l7);
    let a = w.until("DELETE", "/", &[], 403);
    assert_eq!(a.body, DENIED);
    assert_eq!(w.call("GET", "/api/v1", &[]).code, 200);
    assert_eq!(
        w.call("GET", "/api/v1/x", &[]).code,
        403,
        "{{*}} is one segment"
    );
    let other = policy(
        "echo-viewer-l7",
        "gateway",
        "",
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/other/sa/default\"]\n",
    );
    w.apply(&other);
    w.until("GET", "/", &[], 403);
    let log = plain(&w.lab.process_logs("waypoint"));
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("policy={MESH}/echo-viewer-l7:rules[0]"))),
        "the access log names the deciding policy:\n{}",
        tail(&log)
    );
    assert!(
        log.lines()
            .any(|l| l.contains("response_flags=\"RBAC\"") && l.contains("response_code=403")),
        "denials are logged with flag RBAC:\n{}",
        tail(&log)
    );
    w.delete(&other);
    w.until("GET", "/", &[], 200);
}
