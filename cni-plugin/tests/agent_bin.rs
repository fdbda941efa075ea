//! The `zmesh-cni-agent` binary end to end, without root: it serves the plugin API on
//! `<run-dir>/agent.sock`, is ready only while a ztunnel is connected over ZDS, answers a
//! non-mesh pod without touching it and records it in the state file, and refuses to start
//! on an invalid pods directory, naming the file.

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
        // These tests run on the host: no host-side rules (the lab tests cover them).
        .arg("--no-probe-snat")
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
