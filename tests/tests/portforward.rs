//! The API-server double's pod port-forward, driven by kube-rs's own client
//! (`Api::<Pod>::portforward`, WebSocket `v4.channel.k8s.io`): bytes both ways on several
//! ports of one forward, and the errors as the real server gives them (404 for a missing pod,
//! 400 for one not running, a refused connect as a message on the port's error channel).

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zmesh_tests::apiserver::ApiServer;

fn pod(name: &str, phase: &str, ip: Option<&str>) -> serde_json::Value {
    let mut status = json!({"phase": phase});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "istio-system"},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
           "status": status})
}

/// A server on 127.0.0.1 that answers each connection's first read with `<tag>:` and what it
/// read, then closes.
async fn tagged_echo(tag: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap();
                let mut out = format!("{tag}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                s.write_all(&out).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    port
}

/// A loopback port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn bytes_flow_both_ways_on_each_forwarded_port() {
    let api = ApiServer::start().await;
    api.apply(pod("ztunnel-n1", "Running", Some("127.0.0.1")))
        .unwrap();
    let (a, b) = (tagged_echo("a").await, tagged_echo("b").await);
    let pods: Api<Pod> = Api::namespaced(api.client(), "istio-system");
    let mut pf = pods.portforward("ztunnel-n1", &[a, b]).await.unwrap();
    // (A port's stream ends only when the whole forward does: v4 has no per-port close.)
    let mut streams = Vec::new();
    for (port, tag) in [(b, "b"), (a, "a")] {
        let mut s = pf.take_stream(port).unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 7];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), format!("{tag}:hello"));
        streams.push(s);
    }
    // Both pod connections ended: the server closes the WebSocket, and each stream ends.
    for mut s in streams {
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut rest))
            .await
            .expect("the stream ends once every port's connection has")
            .unwrap();
        assert!(rest.is_empty());
    }
    assert!(
        api.requests()
            .iter()
            .any(|r| r
                .starts_with("GET /api/v1/namespaces/istio-system/pods/ztunnel-n1/portforward")),
        "{:?}",
        api.requests()
    );
}

#[tokio::test]
async fn a_refused_connect_is_reported_on_the_error_channel() {
    let api = ApiServer::start().await;
    api.apply(pod("ztunnel-n1", "Running", Some("127.0.0.1")))
        .unwrap();
    let port = closed_port().await;
    let pods: Api<Pod> = Api::namespaced(api.client(), "istio-system");
    let mut pf = pods.portforward("ztunnel-n1", &[port]).await.unwrap();
    let error = pf.take_error(port).unwrap().await;
    let error = error.expect("an error message on the error channel");
    assert!(
        error.contains(&format!("error forwarding port {port} to pod ztunnel-n1"))
            && error.to_lowercase().contains("refused"),
        "{error}"
    );
}

#[tokio::test]
async fn missing_and_not_running_pods_are_refused_before_the_upgrade() {
    let api = ApiServer::start().await;
    api.apply(pod("pending", "Pending", None)).unwrap();
    let pods: Api<Pod> = Api::namespaced(api.client(), "istio-system");
    let code = |r: Result<_, kube::Error>| match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        Err(e) => panic!("not an API error: {e}"),
        Ok(_) => panic!("the forward was accepted"),
    };
    let (c, m) = code(pods.portforward("nope", &[15000]).await);
    assert_eq!(c, 404, "{m}");
    assert!(m.contains("nope"), "{m}");
    let (c, m) = code(pods.portforward("pending", &[15000]).await);
    assert_eq!(c, 400, "{m}");
    assert!(m.contains("not running") && m.contains("Pending"), "{m}");
}
