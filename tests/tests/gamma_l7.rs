//! Issue 11's must-show, in the lab, as a user drives it: `zmesh-lab up --world gamma` runs as
//! a child process, and every step is a `zmesh-lab` command from another "shell", calling the
//! mesh namespace's Services by name (their VIPs) from the consumer namespace's pod, through
//! the real waypoint bound to the namespace:
//! - HTTP/1.1 keep-alive (two requests, one connection), HTTP/2 (h2c prior knowledge), gRPC
//!   unary and bidirectional streaming with their trailers, a WebSocket, and 100 MiB up and
//!   down with the waypoint's peak memory read from `/proc/<pid>/status` and bounded; each
//!   counted in the waypoint's `istio_requests_total{reporter="waypoint"}` with its
//!   `request_protocol`, `response_code` and `grpc_response_status`;
//! - binding the namespace to `none` takes the waypoint out of the path: requests still work,
//!   the waypoint's count stops;
//! - consumer and producer HTTPRoutes (`gamma_l7/routes.rs`): each client namespace gets the
//!   routes GEP-1426 gives it;
//! - a bound waypoint that is not ready (`zmesh-lab waypoint stop`) makes ztunnel refuse the
//!   traffic (never answered by the echo pod directly), saying why in its log and counting it in
//!   `zmesh_waypoint_unavailable_total`; `zmesh-lab waypoint start` brings it back.
//!
//! One lab serves every step, in order.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use zmesh_tests::gamma::driver::RunningLab;

#[path = "gamma_l7/routes.rs"]
mod routes;

const LAB: &str = env!("CARGO_BIN_EXE_zmesh-lab");
const CLIENT: &str = env!("CARGO_BIN_EXE_zmesh-echo-client");
const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";
/// Bringing up two nodes, the pods, their apps and the waypoint on a loaded machine.
const UP_DEADLINE: Duration = Duration::from_secs(300);
/// A config change (binding, readiness) reaching every ztunnel and the waypoint.
const PUSH_DEADLINE: Duration = Duration::from_secs(90);
/// 100 MiB.
const BIG: u64 = 100 << 20;
/// The bound on the waypoint's peak memory growth while 100 MiB cross it (generous: the
/// waypoint streams bodies frame by frame, so its growth is flow-control windows and buffers).
const PEAK_GROWTH_BOUND: u64 = 64 << 20;

/// The sum of the samples of `name` whose labels include every `k="v"` of `want`.
fn sum(metrics: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn has(body: &str, line: &str) {
    assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
}

/// Polls `f` until it returns `Some`, failing with `what` after `PUSH_DEADLINE`.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PUSH_DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct World {
    lab: RunningLab,
    /// The consumer's pod, `NS/NAME`.
    from: String,
    /// The waypoint's pod, `NS/NAME`.
    waypoint: String,
    /// The consumer's node.
    node: String,
    /// An echo pod's IP in the mesh namespace.
    echo_ip: String,
}

impl World {
    fn waypoint_metrics(&self) -> String {
        self.lab.exec_ok(
            &self.waypoint,
            &["curl", "-sS", "-m", "10", "http://127.0.0.1:15020/metrics"],
        )
    }

    /// The waypoint's `istio_requests_total` from the consumer to the `echo` Service, with
    /// `labels`.
    fn counted(&self, labels: &[(&str, &str)]) -> f64 {
        let principal = format!("spiffe://cluster.local/ns/{CONSUMER}/sa/default");
        let mut want = vec![
            ("reporter", "waypoint"),
            ("source_principal", principal.as_str()),
            ("destination_service_name", "echo"),
        ];
        want.extend_from_slice(labels);
        sum(&self.waypoint_metrics(), "istio_requests_total", &want)
    }

    /// `curl ARGS...` from the consumer's pod.
    fn curl(&self, args: &[&str]) -> Output {
        let mut all = vec!["curl", "-sS", "-m", "60"];
        all.extend_from_slice(args);
        self.lab.exec(&self.from, &all)
    }

    fn curl_ok(&self, args: &[&str]) -> String {
        let out = self.curl(args);
        assert!(
            out.status.success(),
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// POSTs `BIG` bytes to `url` (streamed from `head`, chunked on HTTP/1.1) with curl's
    /// `proto` flag; returns the echo's answer and curl's seconds.
    fn upload(&self, proto: &str, url: &str) -> (String, f64) {
        let out = self.lab.exec_ok(
            &self.from,
            &[
                "sh",
                "-c",
                &format!(
                    "head -c {BIG} /dev/zero | curl -sS -m 300 {proto} -X POST -T - \
                     -w 'Seconds=%{{time_total}}\n' {url}"
                ),
            ],
        );
        let secs = out
            .lines()
            .find_map(|l| l.strip_prefix("Seconds=")?.parse().ok())
            .unwrap_or_else(|| panic!("no time in curl's output:\n{out}"));
        (out, secs)
    }

    /// GETs `url` with curl's `proto` flag; returns the size, status and seconds.
    fn download(&self, proto: &str, url: &str) -> (u64, u16, f64) {
        let out = self.curl_ok(&[
            proto,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code} %{time_total}",
            url,
        ]);
        let f: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{out}");
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }

    /// `VmRSS` and `VmHWM` of the waypoint process, in bytes.
    fn waypoint_memory(&self) -> (u64, u64) {
        let status = self.lab.exec_ok(
            &self.waypoint,
            &["sh", "-c", "cat /proc/$(pidof waypoint)/status"],
        );
        let kb = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {key} in the waypoint's status:\n{status}"))
                * 1024
        };
        (kb("VmRSS:"), kb("VmHWM:"))
    }

    /// The consumer node's ztunnel metrics.
    fn ztunnel_metrics(&self) -> String {
        self.lab.exec_ok(
            &format!("istio-system/ztunnel-{}", self.node),
            &["curl", "-sS", "-m", "10", "http://127.0.0.1:15020/metrics"],
        )
    }

    /// Binds the mesh namespace to `waypoint` (`none` unbinds it), as a user applies it.
    fn bind(&self, waypoint: &str) {
        let ns = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESH}\n  labels:\n    \
             istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: {waypoint}\n"
        );
        let out = self.lab.ok(&["apply", "-f", "-"], Some(&ns));
        assert_eq!(out.trim(), format!("namespace /{MESH} configured"));
    }
}

fn http(path: &str) -> String {
    format!("http://echo.{MESH}:80{path}")
}

#[test]
fn every_protocol_goes_through_the_waypoint_and_only_while_bound() {
    let dir = tempfile::tempdir().unwrap();
    let lab = RunningLab::start(Path::new(LAB), dir.path(), UP_DEADLINE);
    let v: Value = serde_json::from_str(&lab.ok(&["get", "pods", "-o", "json"], None)).unwrap();
    let pods = v["items"].as_array().unwrap().clone();
    let find = |pred: &dyn Fn(&Value) -> bool| -> Value {
        pods.iter()
            .find(|p| pred(p))
            .cloned()
            .unwrap_or_else(|| panic!("pod missing: {pods:#?}"))
    };
    let consumer = find(&|p| p["namespace"] == CONSUMER);
    let echo = find(&|p| p["namespace"] == MESH && p["app"] == "zmesh-echo");
    let waypoint = find(&|p| p["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller");
    let w = World {
        from: format!("{CONSUMER}/{}", consumer["name"].as_str().unwrap()),
        waypoint: format!("{MESH}/{}", waypoint["name"].as_str().unwrap()),
        node: consumer["node"].as_str().unwrap().to_owned(),
        echo_ip: echo["ip"].as_str().unwrap().to_owned(),
        lab,
    };

    let t0 = Instant::now();
    let mark = |step: &str| eprintln!("[{:>6.1?}] {step} done", t0.elapsed());
    // The mesh is up and the waypoint in the path once one request is counted there.
    poll("a first request through the waypoint", || {
        let ok = w.curl(&[&http("/ready")]).status.success();
        (ok && w.counted(&[]) >= 1.0).then_some(())
    });

    mark("up");
    // HTTP/1.1 keep-alive: two requests on one connection (curl reuses it: 0 new connects).
    let before = w.counted(&[("request_protocol", "http"), ("response_code", "200")]);
    let out = w.curl_ok(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code} %{num_connects}\n",
        &http("/keepalive/1"),
        &http("/keepalive/2"),
    ]);
    assert_eq!(
        out, "1.1 200 1\n1.1 200 0\n",
        "two requests, one connection"
    );
    let after = w.counted(&[("request_protocol", "http"), ("response_code", "200")]);
    assert_eq!(after - before, 2.0, "both keep-alive requests counted");

    mark("http/1.1 keep-alive");
    // HTTP/2 with prior knowledge (h2c), HTTP/2 end to end; a response trailer comes through
    // (curl prints HTTP/2 trailers with the headers).
    let body = w.curl_ok(&["--http2-prior-knowledge", &http("/h2")]);
    has(&body, "Proto=HTTP/2.0");
    has(&body, "URL=/h2");
    let head = w.curl_ok(&[
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "x-echo-trailer: t-h2",
        &http("/h2-trailer"),
    ]);
    assert!(
        head.lines().any(|l| l.trim() == "x-echo-trailer: t-h2"),
        "no trailer through the waypoint:\n{head}"
    );
    assert_eq!(
        w.counted(&[("request_protocol", "http"), ("response_code", "200")]) - after,
        2.0
    );

    mark("http/2");
    // gRPC unary and bidirectional streaming, trailers through: grpc-status and ours.
    let grpc_ok = [
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "0"),
    ];
    let before = w.counted(&grpc_ok);
    let grpc_url = format!("http://echo.{MESH}:7070");
    let report = w.lab.exec_ok(
        &w.from,
        &[
            CLIENT,
            "grpc",
            &grpc_url,
            "-m",
            "unary",
            "--trailer",
            "t-unary",
        ],
    );
    for line in [
        "Echo=unary",
        "Replies=1",
        "Trailer=grpc-status:0",
        "Trailer=x-echo-trailer:t-unary",
    ] {
        has(&report, line);
    }
    let report = w.lab.exec_ok(
        &w.from,
        &[
            CLIENT,
            "grpc",
            "--stream",
            &grpc_url,
            "-m",
            "one",
            "-m",
            "two",
            "-m",
            "three",
            "--trailer",
            "t-stream",
        ],
    );
    let echoed: Vec<&str> = report.lines().filter(|l| l.starts_with("Echo=")).collect();
    assert_eq!(echoed, ["Echo=one", "Echo=two", "Echo=three"], "{report}");
    for line in [
        "Replies=3",
        "Trailer=grpc-status:0",
        "Trailer=x-echo-trailer:t-stream",
    ] {
        has(&report, line);
    }
    assert_eq!(
        w.counted(&grpc_ok) - before,
        2.0,
        "unary and stream counted"
    );

    mark("grpc");
    // A WebSocket: upgraded through the waypoint, messages echoed both ways; recorded (as
    // Envoy records an upgrade) when the connection ends, its bytes and duration included.
    let ws_bytes = |name: &str| {
        let labels = [("reporter", "waypoint"), ("response_code", "101")];
        sum(&w.waypoint_metrics(), name, &labels)
    };
    let (up_before, down_before) = (
        ws_bytes("istio_request_bytes_sum"),
        ws_bytes("istio_response_bytes_sum"),
    );
    let before = w.counted(&[("response_code", "101")]);
    let report = w.lab.exec_ok(
        &w.from,
        &[
            CLIENT,
            "ws",
            &format!("ws://echo.{MESH}:80/ws"),
            "-m",
            "hello",
            "-m",
            "again",
        ],
    );
    for line in ["Status=101", "Received=hello", "Received=again"] {
        has(&report, line);
    }
    poll("the WebSocket recorded once closed", || {
        (w.counted(&[("response_code", "101")]) - before == 1.0).then_some(())
    });
    // Two text messages each way ("hello", "again"), framed: at least their 10 bytes.
    let up = ws_bytes("istio_request_bytes_sum") - up_before;
    let down = ws_bytes("istio_response_bytes_sum") - down_before;
    assert!(
        up >= 10.0 && down >= 10.0,
        "the WebSocket's bytes were not recorded: {up} up, {down} down"
    );

    mark("websocket");
    // 100 MiB up and down, each over HTTP/1.1 (chunked up) and HTTP/2, the waypoint's memory
    // bounded: its peak (VmHWM) stays within PEAK_GROWTH_BOUND of its resident size before.
    let (rss_before, hwm_before) = w.waypoint_memory();
    let m = w.waypoint_metrics();
    let up_before = sum(&m, "istio_request_bytes_sum", &[("reporter", "waypoint")]);
    let down_before = sum(&m, "istio_response_bytes_sum", &[("reporter", "waypoint")]);
    let before = w.counted(&[("response_code", "200")]);
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let (body, secs) = w.upload(proto, &http("/upload"));
        has(&body, &format!("BodyLength={BIG}"));
        let (size, code, down_secs) = w.download(proto, &http(&format!("/download?size={BIG}")));
        assert_eq!((size, code), (BIG, 200), "{proto}");
        eprintln!("100 MiB via the waypoint {proto}: up {secs:.2} s, down {down_secs:.2} s");
    }
    let (_, hwm_after) = w.waypoint_memory();
    let growth = hwm_after.saturating_sub(rss_before);
    eprintln!(
        "waypoint memory: VmRSS before {} KiB, VmHWM before {} KiB, VmHWM after 4 x 100 MiB {} KiB \
         (peak growth {} KiB, bound {} KiB)",
        rss_before >> 10,
        hwm_before >> 10,
        hwm_after >> 10,
        growth >> 10,
        PEAK_GROWTH_BOUND >> 10
    );
    assert!(
        growth < PEAK_GROWTH_BOUND,
        "the waypoint's peak grew by {growth} bytes while 100 MiB bodies crossed it"
    );
    let m = w.waypoint_metrics();
    let up = sum(&m, "istio_request_bytes_sum", &[("reporter", "waypoint")]) - up_before;
    let down = sum(&m, "istio_response_bytes_sum", &[("reporter", "waypoint")]) - down_before;
    assert!(up >= 2.0 * BIG as f64, "request bytes counted: {up}");
    assert!(down >= 2.0 * BIG as f64, "response bytes counted: {down}");
    assert_eq!(w.counted(&[("response_code", "200")]) - before, 4.0);

    // For comparison, the same transfers to an echo pod's own address: through ztunnel only
    // (the waypoint takes Service traffic: `istio.io/waypoint-for` defaults to `service`).
    let before = w.counted(&[]);
    let pod = format!("http://{}:8080", w.echo_ip);
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let (body, secs) = w.upload(proto, &format!("{pod}/upload"));
        has(&body, &format!("BodyLength={BIG}"));
        let (size, code, down_secs) = w.download(proto, &format!("{pod}/download?size={BIG}"));
        assert_eq!((size, code), (BIG, 200), "{proto}");
        eprintln!("100 MiB via ztunnel only {proto}: up {secs:.2} s, down {down_secs:.2} s");
    }
    assert_eq!(
        w.counted(&[]),
        before,
        "pod-addressed traffic went to the waypoint"
    );

    mark("100 MiB");
    // Unbound (`istio.io/use-waypoint: none`): requests still work, straight through
    // ztunnel; the waypoint's count stops.
    w.bind("none");
    poll("the binding removed from ztunnel's path", || {
        let before = w.counted(&[]);
        let ok = w.curl(&[&http("/unbound")]).status.success();
        (ok && w.counted(&[]) == before).then_some(())
    });
    let before = w.counted(&[]);
    for i in 0..3 {
        let body = w.curl_ok(&[&http(&format!("/direct/{i}"))]);
        has(&body, &format!("URL=/direct/{i}"));
    }
    assert_eq!(
        w.counted(&[]),
        before,
        "the unbound waypoint saw no request"
    );

    mark("unbound");
    // Bound again: back through the waypoint.
    w.bind("namespace");
    poll("the waypoint back in the path", || {
        let before = w.counted(&[]);
        let ok = w.curl(&[&http("/rebound")]).status.success();
        (ok && w.counted(&[]) > before).then_some(())
    });

    mark("rebound");
    // Consumer and producer routes, from the consumer namespace and the mesh namespace.
    let producer_pod = format!("{MESH}/{}", echo["name"].as_str().unwrap());
    routes::consumer_and_producer_routes(&w, &producer_pod);

    mark("consumer and producer routes");
    // Bound but not ready: refused by ztunnel, not answered by the echo pod around it.
    let unavailable = |m: &str| sum(m, "zmesh_waypoint_unavailable_total", &[]);
    let refused_before = unavailable(&w.ztunnel_metrics());
    let out = w.lab.ok(&["waypoint", "stop"], None);
    assert!(out.contains("stopped"), "{out}");
    let failure = poll("ztunnel refusing for the unready waypoint", || {
        let out = w.curl(&[&http("/while-down")]);
        let refused = unavailable(&w.ztunnel_metrics()) > refused_before;
        (!out.status.success() && refused).then_some(out)
    });
    assert!(
        failure.stdout.is_empty(),
        "something answered while the waypoint was down: {}",
        String::from_utf8_lossy(&failure.stdout)
    );
    // Every request is refused while it stays down.
    for _ in 0..3 {
        let out = w.curl(&[&http("/still-down")]);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "answered around the stopped waypoint: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let ztunnel_log = ztunnel_logs(&w.lab.files());
    assert!(
        ztunnel_log.lines().any(|l| l.contains("behind waypoint")
            && l.contains("has no healthy endpoint")
            && l.contains(&format!("dst.service=echo.{MESH}.svc.cluster.local"))),
        "ztunnel's log does not say why it refused (and for which Service):\n{}",
        tail(&ztunnel_log)
    );

    mark("stopped");
    // Started again: ready, in the path, counting.
    let out = w.lab.ok(&["waypoint", "start"], None);
    assert!(out.contains("started"), "{out}");
    poll("requests through the restarted waypoint", || {
        let ok = w.curl(&[&http("/back")]).status.success();
        (ok && w.counted(&[]) >= 1.0).then_some(())
    });

    mark("started");
    // Crashed: its process killed while the pod is still reported ready (before kubelet's
    // probe notices). ztunnel cannot reach it: refused, counted and said all the same.
    let refused_before = unavailable(&w.ztunnel_metrics());
    w.lab
        .exec_ok(&w.waypoint, &["sh", "-c", "kill -9 $(pidof waypoint)"]);
    let failure = poll("ztunnel refusing for the crashed waypoint", || {
        let out = w.curl(&[&http("/crashed")]);
        let refused = unavailable(&w.ztunnel_metrics()) > refused_before;
        if out.status.success() || !refused {
            eprintln!(
                "crashed waypoint: curl {} ({}), unavailable counted: {refused}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        (!out.status.success() && refused).then_some(out)
    });
    assert!(
        failure.stdout.is_empty(),
        "something answered while the waypoint was crashed: {}",
        String::from_utf8_lossy(&failure.stdout)
    );
    let ztunnel_log = ztunnel_logs(&w.lab.files());
    assert!(
        ztunnel_log.lines().any(|l| l.contains("behind waypoint")
            && l.contains("cannot be reached")
            && !l.contains("healthy endpoint")),
        "ztunnel's log does not say it could not reach the waypoint:\n{}",
        tail(&ztunnel_log)
    );
    let out = w.lab.ok(&["waypoint", "start"], None);
    assert!(out.contains("started"), "{out}");
    poll(
        "requests through the waypoint started after its crash",
        || {
            let ok = w.curl(&[&http("/after-crash")]).status.success();
            (ok && w.counted(&[]) >= 1.0).then_some(())
        },
    );
    mark("crashed and started");
}

/// The ztunnels' logs (`ztunnel-*.log` among the lab's files).
fn ztunnel_logs(files: &Path) -> String {
    std::fs::read_dir(files)
        .unwrap_or_else(|e| panic!("{}: {e}", files.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ztunnel") && n.ends_with(".log"))
        })
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
