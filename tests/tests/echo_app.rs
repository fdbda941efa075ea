//! `zmesh-echo`, the gamma world's echo app, on loopback: it answers like Istio's echo server
//! on every listener the fixture's Services target (HTTP/1.1 and h2c on 8080's stand-in, HTTPS
//! with ALPN, gRPC `proto.EchoTestService/Echo`, TCP echo), and what the mesh's L7 tests use
//! (streamed bodies, a trailer, gRPC streaming, a WebSocket). Needs no root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use zmesh_tests::echo::{client, grpc_echo};

struct Echo(Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> String {
    let out: Output = Command::new("curl")
        .args(["-sS", "-m", "20"])
        .args(args)
        .output()
        .expect("curl (scripts/tools.txt)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn has(body: &str, line: &str) {
    assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
}

#[test]
fn echo_answers_like_istio_echo_on_every_protocol() {
    let [http, tls, grpc, tcp] = zmesh_tests::free_loopback_ports()
        .unwrap()
        .map(|a| a.port());
    let _echo = Echo(
        Command::new(env!("CARGO_BIN_EXE_zmesh-echo"))
            .args([
                "--hostname",
                "echo-v1-abcde",
                "--namespace",
                "ns",
                "--version",
                "v1",
            ])
            .args(["--port", &http.to_string(), "--tls-port", &tls.to_string()])
            .args(["--grpc", &grpc.to_string(), "--tcp", &tcp.to_string()])
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", tcp)).is_err() {
        assert!(Instant::now() < deadline, "zmesh-echo never listened");
        std::thread::sleep(Duration::from_millis(50));
    }

    let body = curl(&[
        "-H",
        "X-Test: yes",
        &format!("http://127.0.0.1:{http}/p?q=1"),
    ]);
    for line in [
        "ServiceVersion=v1",
        &format!("ServicePort={http}"),
        "StatusCode=200",
        "URL=/p?q=1",
        &format!("Host=127.0.0.1:{http}"),
        "Method=GET",
        "Proto=HTTP/1.1",
        "IP=127.0.0.1",
        "RequestHeader=X-Test:yes",
        "Hostname=echo-v1-abcde",
        "Namespace=ns",
    ] {
        has(&body, line);
    }
    assert!(!body.contains("Alpn="), "{body}");

    let body = curl(&[
        "--http2-prior-knowledge",
        "-X",
        "POST",
        &format!("http://127.0.0.1:{http}/"),
    ]);
    has(&body, "Proto=HTTP/2.0");
    has(&body, "Method=POST");

    let body = curl(&["-k", "--http2", &format!("https://127.0.0.1:{tls}/")]);
    has(&body, "Alpn=h2");
    has(&body, &format!("ServicePort={tls}"));
    let body = curl(&["-k", "--http1.1", &format!("https://127.0.0.1:{tls}/")]);
    has(&body, "Alpn=http/1.1");

    let reply = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", grpc))
            .await
            .unwrap();
        grpc_echo(s, &format!("echo:{grpc}"), "hello")
            .await
            .unwrap()
    });
    has(&reply, "Hostname=echo-v1-abcde");
    has(&reply, &format!("ServicePort={grpc}"));
    has(&reply, "Echo=hello");

    // Ours, for the mesh's L7 tests: bodies counted and generated as streams, a trailer
    // echoed from a request header, gRPC streaming, a WebSocket.
    let big = 8 << 20;
    let got = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{http_code}",
        &format!("http://127.0.0.1:{http}/?size={big}"),
    ]);
    assert_eq!(got, format!("{big} 200"));
    let body = curl(&[
        "--data-binary",
        "0123456789",
        &format!("http://127.0.0.1:{http}/up"),
    ]);
    has(&body, "BodyLength=10");
    assert!(!curl(&[&format!("http://127.0.0.1:{http}/")]).contains("BodyLength="));
    let head = curl(&[
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "x-echo-trailer: t1",
        &format!("http://127.0.0.1:{http}/"),
    ]);
    assert!(
        head.lines().any(|l| l.trim() == "x-echo-trailer: t1"),
        "{head}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://127.0.0.1:{grpc}");
    let msgs = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let report = rt
        .block_on(client::grpc(
            &url,
            false,
            &msgs(&["u"]),
            Some("t2"),
            &msgs(&["x-extra: one"]),
        ))
        .unwrap();
    for line in [
        "Echo=u",
        "RequestHeader=X-Extra:one",
        "Replies=1",
        "Trailer=grpc-status:0",
        "Trailer=x-echo-trailer:t2",
    ] {
        has(&report, line);
    }
    let report = rt
        .block_on(client::grpc(
            &url,
            true,
            &msgs(&["a", "b", "c"]),
            Some("t3"),
            &[],
        ))
        .unwrap();
    let echoed: Vec<&str> = report.lines().filter(|l| l.starts_with("Echo=")).collect();
    assert_eq!(echoed, ["Echo=a", "Echo=b", "Echo=c"], "{report}");
    for line in [
        "Replies=3",
        "Trailer=grpc-status:0",
        "Trailer=x-echo-trailer:t3",
    ] {
        has(&report, line);
    }
    let report = rt
        .block_on(client::websocket(
            &format!("ws://127.0.0.1:{http}/ws"),
            &msgs(&["hello", "again"]),
        ))
        .unwrap();
    for line in ["Status=101", "Received=hello", "Received=again"] {
        has(&report, line);
    }

    let mut s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    s.write_all(b"ping over tcp").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping over tcp");
}
