//! Stand-ins for the pods' ports that `zmeshctl` reads through the double's port-forward:
//! ztunnel's admin `/config_dump`, the controller's `/debug/status`, the agent's `/readyz`.

use serde_json::{Value, json};

/// A stand-in for a pod's HTTP port, on its own loopback address (the double forwards to
/// `status.podIP`): answers `GET path` with `status` and `body` (JSON), anything else with 404.
pub struct FakePort {
    /// The loopback address it listens on (the pod's `status.podIP`).
    pub ip: String,
}

/// A loopback address no other test uses: 127.<pid>.<n>.1-ish, tried until a bind works.
pub fn fake_port(port: u16, routes: Vec<(&'static str, u16, Value)>) -> FakePort {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let pid = std::process::id();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = format!(
            "127.{}.{}.{}",
            1 + pid % 250,
            1 + (n / 250) % 250,
            1 + n % 250
        );
        let Ok(l) = std::net::TcpListener::bind((ip.as_str(), port)) else {
            continue;
        };
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let (code, body) = match routes.iter().find(|(p, _, _)| *p == path) {
                        Some((_, status, b)) => (format!("{status} Whatever"), b.to_string()),
                        None => ("404 Not Found".to_owned(), "{}".to_owned()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {code}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        return FakePort { ip };
    }
}

/// What an agent's `GET /readyz` answers (cni-plugin/src/agent/health.rs): chained into the
/// primary conflist or not (then the reason), a ztunnel connected or not.
pub fn agent_health(chained: bool, ztunnel: bool) -> Value {
    let conflist = "/host/etc/cni/net.d/10-calico.conflist";
    let detail = if chained {
        format!("chained in {conflist}")
    } else {
        "zmesh-cni missing from 10-calico.conflist, the file the container runtime loads from \
         /host/etc/cni/net.d"
            .to_owned()
    };
    let mut reasons = Vec::new();
    if !chained {
        reasons.push(detail.clone());
    }
    if !ztunnel {
        reasons.push("ztunnel not connected: ...".to_owned());
    }
    json!({"ready": reasons.is_empty(),
           "chain": {"chained": chained, "primary": conflist, "detail": detail},
           "ztunnel_connected": ztunnel, "reasons": reasons})
}

/// An agent's health port answering [`agent_health`] (200 when ready, else 503).
pub fn agent_port(chained: bool, ztunnel: bool) -> FakePort {
    let status = if chained && ztunnel { 200 } else { 503 };
    fake_port(
        8000,
        vec![("/readyz", status, agent_health(chained, ztunnel))],
    )
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What a ztunnel's `/config_dump` holds in these tests: two workloads, one service, and a
/// certificate issued `age` ago for 24 hours.
pub fn ztunnel_dump(node: &str, age: std::time::Duration, workloads: u64) -> Value {
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    json!({
        "workloads": [
            {"namespace": "demo", "name": format!("app-{node}"), "workloadIps": ["10.244.1.5"],
             "node": node, "protocol": "HBONE", "status": "Healthy",
             "services": {"demo/web.demo.svc.cluster.local": {"80": 8080}}},
            {"namespace": "demo", "name": "other", "workloadIps": ["10.244.2.5"],
             "node": "elsewhere", "protocol": "TCP", "status": "Healthy", "services": {}}],
        "services": [{"namespace": "demo", "name": "web",
                      "hostname": "web.demo.svc.cluster.local", "vips": ["/10.96.0.10"]}],
        "policies": [],
        "certificates": [{"identity": "spiffe://cluster.local/ns/demo/sa/app",
                          "not_before": rfc3339(now - age), "not_after": rfc3339(now - age + day)}],
        "xds": {"connected": true, "first_config_applied": true,
                "workloads": workloads, "services": 1, "policies": 0},
    })
}
