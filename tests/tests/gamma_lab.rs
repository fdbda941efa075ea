//! `zmesh-lab up --world gamma` driven from "another shell": the lab runs as a child process
//! (the binary, as a user starts it), and every check is a separate `zmesh-lab` process
//! talking to it through its control socket: `get pods|services -o json`, `exec` (curl from
//! the consumer namespace's pod to the mesh namespace's Service, answered by an echo pod with
//! Istio echo's `Key=Value` body), `apply -f -` and `delete -f -` of a Service. Finally SIGTERM
//! tears the lab down and removes the socket.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use zmesh_tests::gamma::driver::RunningLab;

const LAB: &str = env!("CARGO_BIN_EXE_zmesh-lab");
const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
/// Bringing up two nodes, three pods and their apps on a loaded machine.
const UP_DEADLINE: Duration = Duration::from_secs(300);
/// A Service's VIP reaching every ztunnel after it was written.
const PUSH_DEADLINE: Duration = Duration::from_secs(60);

fn field<'a>(body: &'a str, key: &str) -> Vec<&'a str> {
    body.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

const EXTRA: &str = "apiVersion: v1
kind: Service
metadata:
  name: extra
  namespace: gateway-conformance-mesh
spec:
  selector:
    version: v2
  ports:
  - name: http
    port: 81
    targetPort: 8080
";

#[test]
fn gamma_world_is_driven_from_another_shell() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = RunningLab::spawn(Path::new(LAB), dir.path(), &[]);
    lab.wait_answering(UP_DEADLINE);

    // get pods: the fixture's echo pods, each with an IP and a node, enrolled.
    let pods = items(&lab, "pods");
    let names = |ns: &str, prefix: &str| -> Vec<String> {
        pods.iter()
            .filter(|p| p["namespace"] == ns)
            .filter_map(|p| p["name"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(names(MESH, "echo-v1-").len(), 1, "{pods:#?}");
    assert_eq!(names(MESH, "echo-v2-").len(), 1, "{pods:#?}");
    let consumer = names(CONSUMER, "echo-v1-");
    assert_eq!(consumer.len(), 1, "{pods:#?}");
    for node in ["n1", "n2"] {
        assert!(
            pods.iter()
                .any(|p| p["namespace"] == "istio-system" && p["name"] == format!("ztunnel-{node}")),
            "no ztunnel pod of {node}: {pods:#?}"
        );
    }
    for p in pods.iter().filter(|p| p["namespace"] != "istio-system") {
        let ip: std::net::Ipv4Addr = p["ip"].as_str().unwrap().parse().unwrap();
        assert_eq!(ip.octets()[..2], [10, 244], "{p}");
        assert!(p["node"] == "n1" || p["node"] == "n2", "{p}");
        // Every pod is enrolled but the waypoint's, which opts out (it owns 15008 itself).
        let waypoint = p["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller";
        assert_eq!(p["enrolled"], !waypoint, "{p}");
    }

    // get services: the fixture's ports, target ports and app protocols.
    let services = items(&lab, "services");
    for name in ["echo", "echo-v1", "echo-v2"] {
        let svc = services
            .iter()
            .find(|s| s["namespace"] == MESH && s["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}: {services:#?}"));
        let ports: Vec<(String, u64, u64, Option<String>)> = svc["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["port"].as_u64().unwrap(),
                    p["targetPort"].as_u64().unwrap(),
                    p["appProtocol"].as_str().map(str::to_owned),
                )
            })
            .collect();
        let want: Vec<(String, u64, u64, Option<String>)> = [
            ("http", 80, 8080, Some("http")),
            ("http-alt", 8080, 8080, Some("http")),
            ("https", 443, 8443, None),
            ("tcp", 9090, 9090, None),
            ("grpc", 7070, 7070, Some("grpc")),
        ]
        .iter()
        .map(|(n, p, t, a)| (n.to_string(), *p, *t, a.map(str::to_owned)))
        .collect();
        assert_eq!(ports, want, "{svc}");
        assert!(
            svc["clusterIP"].as_str().unwrap().starts_with("10.96."),
            "{svc}"
        );
    }

    // exec: curl from the consumer's pod to the mesh Service, by name; an echo pod answers.
    let from = format!("{CONSUMER}/{}", consumer[0]);
    let body = curl(&lab, &from, &format!("http://echo.{MESH}:80/hello?x=1"));
    let hostname = field(&body, "Hostname");
    let backends = [names(MESH, "echo-v1-"), names(MESH, "echo-v2-")].concat();
    assert!(
        hostname.len() == 1 && backends.iter().any(|b| b == hostname[0]),
        "Hostname not one of {backends:?}:\n{body}"
    );
    assert_eq!(field(&body, "URL"), ["/hello?x=1"], "{body}");
    assert_eq!(field(&body, "Method"), ["GET"], "{body}");
    assert_eq!(field(&body, "Namespace"), [MESH], "{body}");
    assert!(
        field(&body, "RequestHeader").contains(&format!("Host:echo.{MESH}").as_str()),
        "{body}"
    );

    // It went through the mesh and the waypoint bound to the mesh namespace: the waypoint
    // counted the request from the consumer's identity (its HBONE peer, mutual TLS), and the
    // backend's ztunnel counted an inbound connection from the waypoint's identity (the
    // waypoint opens its own tunnel to the pod, as Istio's does).
    let waypoint_pod = pods
        .iter()
        .find(|p| p["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller")
        .unwrap_or_else(|| panic!("no waypoint pod: {pods:#?}"));
    let waypoint_metrics = lab.ok(
        &[
            "exec",
            &format!("{MESH}/{}", waypoint_pod["name"].as_str().unwrap()),
            "--",
            "curl",
            "-sS",
            "http://127.0.0.1:15020/metrics",
        ],
        None,
    );
    let consumer_principal =
        format!("source_principal=\"spiffe://cluster.local/ns/{CONSUMER}/sa/default\"");
    assert!(
        waypoint_metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"waypoint\"")
                && l.contains(&consumer_principal)
                && l.contains("response_code=\"200\"")),
        "the waypoint counted no request from {consumer_principal}:\n{waypoint_metrics}"
    );
    let node = pods
        .iter()
        .find(|p| p["name"] == hostname[0])
        .and_then(|p| p["node"].as_str())
        .unwrap()
        .to_owned();
    let metrics = lab.ok(
        &[
            "exec",
            &format!("istio-system/ztunnel-{node}"),
            "--",
            "curl",
            "-sS",
            "http://127.0.0.1:15020/metrics",
        ],
        None,
    );
    let principal = format!("source_principal=\"spiffe://cluster.local/ns/{MESH}/sa/namespace\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&principal)),
        "ztunnel-{node} saw no connection from the waypoint ({principal}):\n{metrics}"
    );

    // exec passes arguments without a shell and returns the command's exit code.
    assert_eq!(
        lab.ok(&["exec", &from, "--", "printf", "%s", "a b;$c"], None),
        "a b;$c"
    );
    assert_eq!(
        lab.ok(&["exec", &from, "--", "hostname"], None).trim(),
        consumer[0]
    );
    let out = lab.cli(&["exec", &from, "--", "sh", "-c", "exit 7"], None);
    assert_eq!(out.status.code(), Some(7));
    let out = lab.cli(&["exec", "nowhere/none", "--", "true"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no pod nowhere/none"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // apply -f -: a new Service gets a cluster IP, resolves by name and routes to echo-v2.
    let out = lab.ok(&["apply", "-f", "-"], Some(EXTRA));
    assert_eq!(out.trim(), format!("service {MESH}/extra created"));
    let services = items(&lab, "services");
    let extra = services
        .iter()
        .find(|s| s["name"] == "extra")
        .unwrap_or_else(|| panic!("applied Service missing: {services:#?}"));
    assert!(
        extra["clusterIP"].as_str().unwrap().starts_with("10.96."),
        "{extra}"
    );
    let body = curl(
        &lab,
        &from,
        &format!("http://extra.{MESH}.svc.cluster.local:81/"),
    );
    assert_eq!(field(&body, "Hostname"), names(MESH, "echo-v2-"), "{body}");

    // Bad input: a clear error, nothing changed.
    let before = items(&lab, "services");
    let out = lab.cli(&["apply", "-f", "-"], Some("kind: Service\n"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no `metadata.name`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(items(&lab, "services"), before);

    // delete -f -: gone from `get services`; deleting it again says it is not there.
    let out = lab.ok(&["delete", "-f", "-"], Some(EXTRA));
    assert_eq!(out.trim(), format!("service {MESH}/extra deleted"));
    assert!(!items(&lab, "services").iter().any(|s| s["name"] == "extra"));
    let out = lab.cli(&["delete", "-f", "-"], Some(EXTRA));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    // SIGTERM: the lab tears down, exits 0 and removes its socket.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.child().id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = lab.child().try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the lab did not stop:\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "{status}:\n{}", lab.log());
    assert!(lab.log().contains("lab torn down"));
    assert!(!lab.socket().exists());
}

/// The waypoint hook: with a `waypoint` binary among the binaries (here a stand-in script that
/// records its environment), the lab creates the waypoint's pod and Service in the mesh
/// namespace, runs the binary there with the controller's address and the pod's identity, and
/// labels the namespace `istio.io/use-waypoint=namespace`.
#[test]
fn the_waypoint_hook_runs_a_waypoint_binary_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let bins = dir.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    let built = Path::new(LAB).parent().unwrap();
    for entry in std::fs::read_dir(built).unwrap() {
        let path = entry.unwrap().path();
        let is_exe = path.is_file()
            && std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions())
                & 0o111
                != 0;
        if is_exe && path.file_name().unwrap() != "waypoint" {
            std::os::unix::fs::symlink(&path, bins.join(path.file_name().unwrap())).unwrap();
        }
    }
    let env_out = dir.path().join("waypoint.env");
    let script = bins.join("waypoint");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv > {}.tmp\nmv {0}.tmp {0}\nexec sleep 600\n",
            env_out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let mut lab = RunningLab::spawn(Path::new(LAB), dir.path(), &[("ZMESH_BIN_DIR", &bins)]);
    lab.wait_answering(UP_DEADLINE);
    let pods = items(&lab, "pods");
    let waypoint = pods
        .iter()
        .find(|p| {
            p["namespace"] == MESH
                && p["labels"]["gateway.networking.k8s.io/gateway-name"] == "namespace"
        })
        .unwrap_or_else(|| panic!("no waypoint pod: {pods:#?}"));
    assert_eq!(waypoint["enrolled"], false, "{waypoint}");
    let services = items(&lab, "services");
    let svc = services
        .iter()
        .find(|s| s["namespace"] == MESH && s["name"] == "namespace")
        .unwrap_or_else(|| panic!("no waypoint Service: {services:#?}"));
    assert_eq!(svc["ports"][0]["port"], 15008, "{svc}");

    let deadline = Instant::now() + Duration::from_secs(60);
    while !env_out.exists() {
        assert!(
            Instant::now() < deadline,
            "the waypoint binary never ran:\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let env = std::fs::read_to_string(&env_out).unwrap();
    for want in [
        format!("POD_NAME={}", waypoint["name"].as_str().unwrap()),
        format!("POD_NAMESPACE={MESH}"),
        format!("INSTANCE_IP={}", waypoint["ip"].as_str().unwrap()),
        "SERVICE_ACCOUNT=namespace".to_owned(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in:\n{env}");
    }
    assert!(
        env.lines().any(|l| l.starts_with("XDS_ADDRESS=https://")),
        "{env}"
    );
    let log = lab.log();
    assert!(log.contains("waypoint: running"), "{log}");
    let files = log
        .split("files in ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .unwrap();
    let ns =
        std::fs::read_to_string(Path::new(files).join(format!("pods/ns-{MESH}.yaml"))).unwrap();
    assert!(ns.contains("istio.io/use-waypoint: namespace"), "{ns}");
}

fn items(lab: &RunningLab, what: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&lab.ok(&["get", what, "-o", "json"], None)).unwrap();
    v["items"].as_array().unwrap().clone()
}

/// Polls `exec POD -- curl URL` until it succeeds; returns the body.
fn curl(lab: &RunningLab, pod: &str, url: &str) -> String {
    let deadline = Instant::now() + PUSH_DEADLINE;
    loop {
        let out = lab.cli(&["exec", pod, "--", "curl", "-sS", "-m", "10", url], None);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "curl {url} from {pod} kept failing: {}\nlab log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
