//! The `waypoint` binary as its own process (so its memory can be read): 100 MiB up and
//! 100 MiB down through it, with its peak RSS (VmHWM) bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;

use crate::harness::*;

/// Kills the child on drop (a failing test leaves nothing running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmHWM` (peak resident set) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    zmesh_tests::bench::peak_rss_kib(pid).expect("VmHWM in /proc/<pid>/status")
}

const SIZE: u64 = 100 << 20;

#[tokio::test]
async fn body_of_100_mib_streams_with_bounded_memory() {
    let mesh = Mesh::new(&["echo-a"], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let [hbone, admin]: [SocketAddr; 2] = zmesh_tests::free_loopback_ports().unwrap();
    let env: HashMap<&str, String> = [
        ("POD_NAMESPACE", "default".to_owned()),
        ("SERVICE_ACCOUNT", "waypoint".to_owned()),
        ("LOCAL_XDS_PATH", file("config.yaml", &mesh.yaml)),
        ("LOCAL_CA_CERT", file("ca.pem", mesh.ca.cert_pem())),
        ("LOCAL_CA_KEY", file("ca.key", mesh.ca.key_pem())),
        ("WAYPOINT_HBONE_ADDR", hbone.to_string()),
        ("WAYPOINT_ADMIN_ADDR", admin.to_string()),
        ("WAYPOINT_UPSTREAM_HBONE_PORT", mesh.hbone_port.to_string()),
        ("RUST_LOG", "warn,access=info".to_owned()),
        ("LOG_FORMAT", "json".to_owned()),
    ]
    .into();
    let child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let pid = proc.0.id();
    eventually("the waypoint is ready", async || {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && admin_get(admin, "/healthz/ready").await.0 == StatusCode::OK
    })
    .await;
    let before = peak_rss_kib(pid);

    // Up: 100 MiB streamed in 64 KiB frames; the app answers with the count it read.
    let mut c = h1(mesh.tunnel(hbone, 80).await.unwrap()).await;
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; 64 << 10]);
        for _ in 0..SIZE / chunk.len() as u64 {
            tx.send(Frame::data(chunk.clone())).await.unwrap();
        }
    });
    let req = Request::post("/count")
        .header("host", HOST)
        .header("content-length", SIZE.to_string())
        .body(body)
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(text(r).await, SIZE.to_string());

    // Down: 100 MiB from the app, read frame by frame.
    let r = c
        .send_request(
            Request::get(format!("/bytes/{SIZE}"))
                .header("host", HOST)
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut b = r.into_body();
    let mut n = 0u64;
    while let Some(f) = b.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len() as u64;
        }
    }
    assert_eq!(n, SIZE);

    let peak = peak_rss_kib(pid);
    eprintln!(
        "waypoint peak RSS: {} KiB after start, {} KiB after 2 x 100 MiB",
        before, peak
    );
    // Generous: the bodies are 200 MiB in all; streaming keeps the waypoint to its HTTP/2
    // windows and buffers (a few MiB per connection) over its startup size.
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} KiB grew more than 64 MiB over {before} KiB: a body is being buffered"
    );
    eventually("both requests counted", async || {
        let m = admin_get(admin, "/metrics").await.1;
        requests_total(&m, &["reporter=\"waypoint\"", "response_code=\"200\""]) == 2
    })
    .await;
    let m = admin_get(admin, "/metrics").await.1;
    let sum = m
        .lines()
        .find(|l| l.starts_with("istio_request_bytes_sum{"))
        .unwrap();
    assert!(sum.ends_with(&format!(" {SIZE}.0")), "{sum}");

    // One JSON access-log line per request (LOG_FORMAT=json), read once the process exited
    // (SIGTERM: it drains and writes out its log; lines are written in batches).
    let mut proc = proc;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    proc.0.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut proc.0.stdout.take().unwrap(), &mut out).unwrap();
    let requests: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line"))
        .filter(|v| v["target"] == "access" && v["fields"]["message"] == "request")
        .collect();
    assert_eq!(requests.len(), 2, "{out}");
    assert_eq!(requests[0]["fields"]["method"], "POST");
    assert_eq!(requests[0]["fields"]["response_code"], "200");
    assert_eq!(requests[0]["fields"]["bytes_received"], SIZE);
    assert_eq!(requests[1]["fields"]["bytes_sent"], SIZE);
}
