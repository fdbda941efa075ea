//! `GET`/`POST /api/v1/namespaces/{ns}/pods/{name}/portforward?ports=N[,M...]`: the pod
//! port-forward subresource over WebSocket, as the API server proxies it to the kubelet
//! (kubernetes/kubernetes `pkg/kubelet/cri/streaming/portforward/websocket.go`, and the
//! client side in kube-rs `kube-client/src/api/portforward.rs`):
//!
//! - the upgrade offers sub-protocols in `Sec-WebSocket-Protocol`; the server picks
//!   `v4.channel.k8s.io` (binary frames, first byte the channel) or the unversioned
//!   `portforward.k8s.io`, and answers `101` with `Sec-WebSocket-Accept`;
//! - port `i` of `ports` owns channel `2i` (data) and `2i+1` (error); the first frame the
//!   server sends on each is the port as two little-endian bytes;
//! - the server connects to the port in the pod; a failure is one text message on the
//!   error channel (`error forwarding port N to pod NAME, uid UID: ...`), the port then
//!   unusable; bytes flow both ways on the data channel, and the socket closes when every
//!   port's connection has ended or the client sends Close.
//!
//! Before the upgrade, as the real server: a pod that does not exist is `404 NotFound`; one
//! without a node, not `Running`, or without a `podIP` is `400 BadRequest`; no or bad `ports`
//! is `400`.
//!
//! Where it connects: like the kubelet, to `localhost:<port>` inside the pod's network
//! namespace when the test registered one ([`ApiServer::set_pod_netns`]: the lab's pods),
//! else to `status.podIP:<port>`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{ApiServer, Body, Shared, bad_request, status};

/// The sub-protocols served, in the order of preference.
const PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];

/// How long a connect to the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `(namespace, pod)` of a port-forward path.
pub(super) fn target(path: &str) -> Option<(String, String)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, "portforward"] => {
            Some(((*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

impl ApiServer {
    /// From now on, port-forwards to the pod `namespace/name` connect to `localhost:<port>`
    /// inside the network namespace at `netns` (a path such as `/run/netns/<name>`), as the
    /// kubelet does, instead of to its `status.podIP`.
    pub fn set_pod_netns(&self, namespace: &str, name: &str, netns: &Path) {
        self.shared
            .lock()
            .pod_netns
            .insert((namespace.to_owned(), name.to_owned()), netns.to_owned());
    }
}

/// Where one port of the pod is reached.
#[derive(Clone, Debug)]
enum Dial {
    InNetns(PathBuf),
    Ip(IpAddr),
}

/// Handles the port-forward request for `namespace/name`.
pub(super) async fn serve(
    shared: &Arc<Shared>,
    (namespace, name): (String, String),
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != http::Method::GET && req.method() != http::Method::POST {
        return super::method_not_allowed();
    }
    let (pod, netns) = {
        let st = shared.lock();
        let pod = st
            .type_of("v1", "Pod")
            .and_then(|ty| st.objects.get(&(ty, namespace.clone(), name.clone())))
            .cloned();
        let netns = st
            .pod_netns
            .get(&(namespace.clone(), name.clone()))
            .cloned();
        (pod, netns)
    };
    let Some(pod) = pod else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods {name:?} not found"),
            json!({"name": name, "kind": "pods"}),
        );
    };
    let ports = match ports(req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return bad_request(&e),
    };
    let dial = match dial_of(&pod, &name, netns) {
        Ok(d) => d,
        Err(e) => return bad_request(&e),
    };
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (true, Some(key)) = (upgrade, key) else {
        return bad_request(
            "Upgrade request required: port-forward is served over WebSocket \
             (Upgrade: websocket, Sec-WebSocket-Key)",
        );
    };
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return bad_request(&format!(
            "none of the offered WebSocket sub-protocols {offered:?} is served; \
             port-forward speaks {PROTOCOLS:?}"
        ));
    };
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        forward(ws, &ports, &dial, &name, &uid).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .header(header::SEC_WEBSOCKET_PROTOCOL, *protocol)
        .body(Empty::new().boxed())
        .expect("a valid response")
}

/// The `ports` of the query (`ports=1,2` or `ports=1&ports=2`).
fn ports(query: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "ports" {
            continue;
        }
        let v = v.replace("%2C", ",").replace("%2c", ",");
        for p in v.split(',').filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => out.push(n),
                _ => return Err(format!("invalid port {p:?}: ports are 1-65535")),
            }
        }
    }
    if out.is_empty() {
        return Err("at least one port must be given in `ports`".into());
    }
    Ok(out)
}

fn dial_of(pod: &Value, name: &str, netns: Option<PathBuf>) -> Result<Dial, String> {
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
        return Err(format!("pod {name} does not have a host assigned"));
    }
    let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
    if phase != "Running" {
        return Err(format!(
            "pod {name} is not running and cannot forward ports; current phase is {phase}"
        ));
    }
    if let Some(path) = netns {
        return Ok(Dial::InNetns(path));
    }
    pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .map(Dial::Ip)
        .ok_or_else(|| format!("pod {name} has no IP address yet"))
}

async fn connect(dial: &Dial, port: u16) -> std::io::Result<TcpStream> {
    let (socket, addr) = match dial {
        Dial::Ip(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            (socket, SocketAddr::new(*ip, port))
        }
        Dial::InNetns(path) => {
            let netns = zmesh_core::netns::Netns::open(path)?;
            let socket = netns.run(tokio::net::TcpSocket::new_v4)??;
            (socket, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out"),
        )),
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

/// What the per-port readers tell the WebSocket loop.
enum FromPod {
    Data(u8, Bytes),
    Closed,
}

async fn forward<S>(ws: WebSocketStream<S>, ports: &[u16], dial: &Dial, name: &str, uid: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    // The port on each channel first, data and error alike.
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            if sink.send(frame(ch, &port.to_le_bytes())).await.is_err() {
                return;
            }
        }
    }
    let (tx, mut rx) = mpsc::channel::<FromPod>(16);
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        let ch = 2 * i as u8;
        match connect(dial, *port).await {
            Ok(tcp) => {
                let (mut r, w) = tcp.into_split();
                writers.push(Some(w));
                open += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let data = Bytes::copy_from_slice(&buf[..n]);
                                if tx.send(FromPod::Data(ch, data)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(FromPod::Closed).await;
                });
            }
            Err(e) => {
                writers.push(None);
                let message = format!("error forwarding port {port} to pod {name}, uid {uid}: {e}");
                if sink.send(frame(ch + 1, message.as_bytes())).await.is_err() {
                    return;
                }
            }
        }
    }
    drop(tx);
    while open > 0 {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let index = usize::from(b[0] / 2);
                    // Data for a port's data channel; anything on an error channel or for
                    // a port that failed is dropped, as the kubelet does.
                    if b[0] % 2 == 0
                        && let Some(Some(w)) = writers.get_mut(index)
                        && w.write_all(&b[1..]).await.is_err()
                    {
                        writers[index] = None;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            from = rx.recv() => match from {
                Some(FromPod::Data(ch, data)) => {
                    if sink.send(frame(ch, &data)).await.is_err() {
                        return;
                    }
                }
                Some(FromPod::Closed) => open -= 1,
                None => break,
            },
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_ports_parse_as_the_real_server_reads_them() {
        assert_eq!(
            target("/api/v1/namespaces/istio-system/pods/ztunnel-a/portforward"),
            Some(("istio-system".into(), "ztunnel-a".into()))
        );
        assert_eq!(target("/api/v1/namespaces/x/pods/y/exec"), None);
        assert_eq!(ports("&ports=80%2C1234").unwrap(), vec![80, 1234]);
        assert_eq!(ports("ports=1&ports=2").unwrap(), vec![1, 2]);
        assert!(ports("").is_err());
        assert!(ports("ports=0").is_err());
        assert!(ports("ports=70000").is_err());
    }
}
