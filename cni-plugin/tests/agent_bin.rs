//! The `zmesh-cni-agent` binary end to end, without root: it serves the plugin API on
//! `<run-dir>/agent.sock`, is ready only while a ztunnel is connected over ZDS, answers a
//! non-mesh pod without touching it and records it in the state file, refuses to start
//! on an invalid pods directory, naming the file, and answers `GET /readyz` from its chain and
//! its ztunnel.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zmesh_cni::api::{ADD_PATH, AddRequest, AgentClient, READY_PATH};
use zmesh_core::zds::{Event, ZdsClient};

const PODS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n\
    apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: plain, uid: u-db}\n\
    spec: {nodeName: n1}\n";

/// The agent process; killed when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(pods: &Path, run: &Path, zds: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zmesh-cni-agent"));
    cmd.arg("--pods-dir")
        .arg(pods)
        .arg("--run-dir")
        .arg(run)
        .arg("--ztunnel-socket")
        .arg(zds)
        // These tests run on the host: no host-side rules (the lab tests cover them), and
        // the health endpoint on a free loopback port rather than the node's 8000.
        .arg("--no-probe-snat")
        .arg("--health-addr=127.0.0.1:0")
        .env("NODE_NAME", "n1")
        .env("ZMESH_LOG", "debug")
        .stdin(Stdio::null());
    cmd
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready(client: &AgentClient) -> Option<u16> {
    client
        .get(READY_PATH, Duration::from_secs(5))
        .ok()
        .map(|r| r.status)
}

#[test]
fn serves_the_plugin_api_and_follows_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (pods, run) = (dir.path().join("pods"), dir.path().join("run"));
    std::fs::create_dir(&pods).unwrap();
    std::fs::write(pods.join("pods.yaml"), PODS).unwrap();
    let zds: PathBuf = dir.path().join("zt").join("ztunnel.sock");
    let _agent = AgentProcess(
        command(&pods, &run, &zds)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = AgentClient::new(run.join("agent.sock"));
    wait_until("the API socket", || ready(&client).is_some());
    assert_eq!(ready(&client), Some(503));

    // A ztunnel connects: ready.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ztunnel = rt.spawn(async move {
        let mut client = ZdsClient::new(zds);
        loop {
            let event = client.next().await;
            if event.is_request() {
                client.reply(Ok(())).await;
            }
            if let Event::Disconnected { reason } = event {
                eprintln!("test ztunnel disconnected: {reason}");
            }
        }
    });
    wait_until("readiness", || ready(&client) == Some(200));

    let add = AddRequest {
        container_id: "c-db".into(),
        netns: "/var/run/netns/does-not-matter".into(),
        ifname: "eth0".into(),
        pod_name: "db".into(),
        pod_namespace: "plain".into(),
        pod_uid: "u-db".into(),
        ips: vec!["10.244.1.9/24".into()],
    };
    let answer = client
        .post_json(ADD_PATH, &add, Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &br#"{"enrolled":false}"#[..])
    );
    let state = std::fs::read_to_string(run.join("pods.json")).unwrap();
    assert!(state.contains("\"u-db\""), "{state}");

    // ztunnel goes away: not ready.
    ztunnel.abort();
    drop(rt);
    wait_until("unreadiness", || ready(&client) == Some(503));
}

/// `GET /readyz` on `addr`: the status and the JSON body.
fn readyz(addr: &str) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

#[test]
fn readyz_reports_the_chain_it_installed_and_its_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (pods, run) = (dir.path().join("pods"), dir.path().join("run"));
    let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    for d in [&pods, &conf, &bin] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(pods.join("pods.yaml"), PODS).unwrap();
    let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(conf.join("10-k8s.conflist"), list).unwrap();
    let plugin = dir.path().join("plugin-build");
    std::fs::write(&plugin, b"binary").unwrap();
    let zds: PathBuf = dir.path().join("zt").join("ztunnel.sock");
    let log = dir.path().join("agent.log");
    let _agent = AgentProcess(
        command(&pods, &run, &zds)
            .arg("--cni-conf-dir")
            .arg(&conf)
            .arg("--cni-bin-dir")
            .arg(&bin)
            .arg("--plugin-binary")
            .arg(&plugin)
            .arg("--plugin-log-file")
            .arg(dir.path().join("plugin.log"))
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The port it picked, from its log line `serving GET /readyz addr=127.0.0.1:<port>`.
    let mut addr = String::new();
    wait_until("the health endpoint's address in the log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.contains("serving GET /readyz")) else {
            return false;
        };
        let at = line.find("127.0.0.1:").unwrap();
        let port: String = line[at + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        addr = format!("127.0.0.1:{port}");
        true
    });
    // Chained (the agent installed it) but no ztunnel yet: 503, for that reason only.
    wait_until("the entry to be chained", || {
        readyz(&addr).is_some_and(|(_, h)| h["chain"]["chained"] == true)
    });
    let (status, h) = readyz(&addr).unwrap();
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["ztunnel_connected"], false, "{h}");
    let reasons = h["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{h}");
    assert!(
        reasons[0]
            .as_str()
            .unwrap()
            .starts_with("ztunnel not connected"),
        "{h}"
    );
    assert_eq!(
        h["chain"]["primary"].as_str(),
        conf.join("10-k8s.conflist").to_str()
    );

    // A ztunnel connects: 200.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _ztunnel = rt.spawn(async move {
        let mut client = ZdsClient::new(zds);
        loop {
            if client.next().await.is_request() {
                client.reply(Ok(())).await;
            }
        }
    });
    wait_until("readiness", || {
        readyz(&addr).is_some_and(|(status, _)| status == 200)
    });
    let (_, h) = readyz(&addr).unwrap();
    assert_eq!(h["ready"], true, "{h}");
    assert_eq!(h["reasons"], serde_json::json!([]), "{h}");
}

#[test]
fn an_invalid_pods_directory_stops_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "kind: Pod\napiVersion: v1\n",
    )
    .unwrap();
    let out = command(
        dir.path(),
        &dir.path().join("run"),
        &dir.path().join("z.sock"),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.yaml, document 1"), "{stderr}");
}

#[test]
fn uninstall_removes_only_our_entry_and_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","x-vendor":{"keep":true}},{"type":"zmesh-cni","agent_socket":"/var/run/zmesh/agent.sock"}]}"#;
    std::fs::write(conf.join("10-k8s.conflist"), list).unwrap();
    std::fs::write(bin.join("zmesh-cni"), b"binary").unwrap();
    std::fs::write(bin.join("bridge"), b"theirs").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh-cni-agent"))
        .arg("--uninstall")
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conf.join("10-k8s.conflist")).unwrap()).unwrap();
    let plugins = after["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 1, "{after}");
    assert_eq!(plugins[0]["type"], "bridge");
    assert_eq!(plugins[0]["x-vendor"]["keep"], true);
    assert!(!bin.join("zmesh-cni").exists());
    assert!(bin.join("bridge").exists(), "another plugin was removed");
    // Running it again changes nothing and still succeeds.
    let again = Command::new(env!("CARGO_BIN_EXE_zmesh-cni-agent"))
        .args(["--uninstall", "--cni-conf-dir"])
        .arg(&conf)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .status()
        .unwrap();
    assert!(again.success());
}
