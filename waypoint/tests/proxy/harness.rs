//! A small mesh on loopback for the waypoint: a CA, fake node tunnels for the endpoints
//! (real HBONE servers: mutual TLS 1.3, HTTP/2 CONNECT) that serve a test app on each tunnel,
//! the waypoint in process, and a client using zmesh's HBONE pool.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use zmesh_core::certs::LocalCaSource;
use zmesh_core::hbone::{H2Settings, Pool, PoolConfig, PoolKey, SourceInfo, Tunnel};
use zmesh_core::identity::SpiffeId;
use zmesh_core::socket::SocketOptions;
use zmesh_core::tls::{LocalCa, WorkloadCertificate, connection_peer};
use zmesh_waypoint::sniff::{Detected, detect};
use zmesh_waypoint::upstream::LbPolicy;
use zmesh_waypoint::{Config, Running, Waypoint};

pub type Body = BoxBody<Bytes, Infallible>;

/// Tokens `/flaky/<token>` already answered (503 the first time).
static FLAKY: Mutex<std::collections::BTreeSet<String>> =
    Mutex::new(std::collections::BTreeSet::new());
type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const VIP: &str = "10.96.0.10";
pub const HOST: &str = "echo.default.svc.cluster.local";

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// What a fake node tunnel saw of each CONNECT.
#[derive(Debug, Clone)]
pub struct Connect {
    pub authority: String,
    pub peer: Option<SpiffeId>,
    /// The HBONE connection it came on (its source address).
    pub conn: SocketAddr,
}

/// A fake node tunnel for one endpoint.
pub struct Node {
    pub ip: IpAddr,
    pub connects: Arc<Mutex<Vec<Connect>>>,
}

/// The pieces of a test mesh.
pub struct Mesh {
    pub ca: LocalCa,
    pub nodes: Vec<Node>,
    pub hbone_port: u16,
    pub client: WorkloadCertificate,
    pub pool: Arc<Pool>,
    /// Releases the app's `/slow` requests.
    pub release: Arc<Notify>,
    pub yaml: String,
}

/// Endpoint IPs: `127.0.0.11`, `.12`, ... (one loopback, one HBONE port for all).
pub fn endpoint_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 11 + i as u8])
}

/// The waypoint's local config: endpoints `names` (`dead` ones get no node tunnel), the
/// client at 127.0.0.1, and the bound service with ports 80 (HTTP), 81 (GRPC), 82 (sniffed),
/// 83 (TCP).
fn yaml(names: &[&str]) -> String {
    let mut y = String::from(
        "workloads:\n- name: client\n  namespace: default\n  serviceAccount: client\n  \
         workloadIps: [127.0.0.1]\n  protocol: HBONE\n  canonicalName: client\n  \
         canonicalRevision: v1\n  workloadName: client\n",
    );
    for (i, n) in names.iter().enumerate() {
        y.push_str(&format!(
            "- name: {n}\n  namespace: default\n  serviceAccount: echo\n  workloadIps: [{ip}]\n  \
             protocol: HBONE\n  canonicalName: echo\n  canonicalRevision: v1\n  \
             workloadName: {n}\n  services:\n    default/{HOST}: {{80: 8080, 81: 8081, 82: 8082, 83: 8083}}\n",
            ip = endpoint_ip(i)
        ));
    }
    y.push_str(&format!(
        "boundServices:\n- name: echo\n  namespace: default\n  hostname: {HOST}\n  vips: [/{VIP}]\n  \
         ports:\n  - {{port: 80, targetPort: 8080, protocol: HTTP}}\n  - {{port: 81, protocol: GRPC}}\n  \
         - {{port: 82}}\n  - {{port: 83, protocol: TCP}}\n"
    ));
    y
}

/// Binds the same free port on each of `ips`.
async fn listeners(ips: &[IpAddr]) -> (u16, Vec<TcpListener>) {
    'again: for _ in 0..50 {
        let first = TcpListener::bind((ips[0], 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut ls = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)).await {
                Ok(l) => ls.push(l),
                Err(_) => continue 'again,
            }
        }
        return (port, ls);
    }
    panic!("no port free on all of {ips:?}");
}

impl Mesh {
    /// Endpoints named `names`; those in `dead` have no node tunnel (connects are refused).
    pub async fn new(names: &[&str], dead: &[&str]) -> Mesh {
        zmesh_core::tls::install_default_provider();
        Mesh::with_ca(names, dead, LocalCa::generate("waypoint-test").unwrap()).await
    }

    /// Like [`Mesh::new`], with certificates from `ca` (the controller's root).
    pub async fn with_ca(names: &[&str], dead: &[&str], ca: LocalCa) -> Mesh {
        let release = Arc::new(Notify::new());
        let ips: Vec<IpAddr> = (0..names.len()).map(endpoint_ip).collect();
        let (port, ls) = listeners(&ips).await;
        let mut nodes = Vec::new();
        for ((name, ip), l) in names.iter().zip(&ips).zip(ls) {
            let connects = Arc::new(Mutex::new(Vec::new()));
            if !dead.contains(name) {
                let cert = ca.issue(&id("echo"), Duration::from_secs(3600)).unwrap();
                tokio::spawn(node(
                    l,
                    cert,
                    name.to_string(),
                    connects.clone(),
                    release.clone(),
                ));
            }
            nodes.push(Node { ip: *ip, connects });
        }
        let client = ca.issue(&id("client"), Duration::from_secs(3600)).unwrap();
        let pool = client_pool();
        Mesh {
            ca,
            nodes,
            hbone_port: port,
            client,
            pool,
            release,
            yaml: yaml(names),
        }
    }

    /// A waypoint config for this mesh (loopback ports, short sniff timeout).
    pub fn config(&self, lb: LbPolicy) -> Config {
        let mut cfg = Config::new(id("waypoint"));
        cfg.hbone_addr = "127.0.0.1:0".parse().unwrap();
        cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
        cfg.upstream_hbone_port = self.hbone_port;
        cfg.sniff_timeout = Duration::from_millis(300);
        cfg.lb = lb;
        cfg
    }

    /// Starts the waypoint in process.
    pub async fn waypoint(&self, lb: LbPolicy) -> Running {
        let snapshot = zmesh_waypoint::bound::Snapshot::from_yaml(&self.yaml).unwrap();
        self.waypoint_with(lb, snapshot).await
    }

    /// Starts the waypoint in process with `cfg` and this mesh's bound services.
    pub async fn waypoint_cfg(&self, cfg: Config) -> Running {
        let snapshot = zmesh_waypoint::bound::Snapshot::from_yaml(&self.yaml).unwrap();
        self.start(cfg, snapshot).await
    }

    /// Starts the waypoint in process with `snapshot` (e.g. one with routes).
    pub async fn waypoint_with(
        &self,
        lb: LbPolicy,
        snapshot: zmesh_waypoint::bound::Snapshot,
    ) -> Running {
        self.start(self.config(lb), snapshot).await
    }

    async fn start(&self, cfg: Config, snapshot: zmesh_waypoint::bound::Snapshot) -> Running {
        let source = Arc::new(LocalCaSource {
            ca: LocalCa::from_pem(self.ca.cert_pem(), self.ca.key_pem()).unwrap(),
            ttl: Duration::from_secs(3600),
        });
        Waypoint::start_with(cfg, source, snapshot).await.unwrap()
    }

    /// A tunnel to `VIP:port` through the waypoint at `wp`, as a client's ztunnel opens it.
    pub async fn tunnel(&self, wp: SocketAddr, port: u16) -> Result<Tunnel, String> {
        self.tunnel_on(&self.pool, wp, port).await
    }

    /// Like [`Mesh::tunnel`], through `pool` (another client node: its own HBONE connection).
    pub async fn tunnel_on(
        &self,
        pool: &Pool,
        wp: SocketAddr,
        port: u16,
    ) -> Result<Tunnel, String> {
        let key = PoolKey::new(id("client"), vec![id("waypoint")], wp, None);
        let src = SourceInfo {
            addr: Some("127.0.0.1:40000".parse().unwrap()),
            service_host: Some(HOST.into()),
            namespace: "default".into(),
            workload_name: "client".into(),
            ..Default::default()
        };
        let target = SocketAddr::new(VIP.parse().unwrap(), port);
        pool.connect(key, &self.client, target, &src)
            .await
            .map(|(t, guard)| {
                // The tunnel lives as long as the test needs it.
                std::mem::forget(guard);
                t
            })
            .map_err(|e| e.to_string())
    }

    /// Every CONNECT the node tunnels saw, in order per node.
    pub fn connects(&self) -> Vec<(IpAddr, Connect)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                let ip = n.ip;
                n.connects
                    .lock()
                    .unwrap()
                    .clone()
                    .into_iter()
                    .map(move |c| (ip, c))
            })
            .collect()
    }
}

/// A client node's HBONE pool.
pub fn client_pool() -> Arc<Pool> {
    Pool::new(
        PoolConfig::default(),
        H2Settings::default(),
        SocketOptions {
            mark: None,
            ..Default::default()
        },
    )
}

/// A fake node tunnel: HBONE server that serves the test app on each CONNECT.
async fn node(
    l: TcpListener,
    cert: WorkloadCertificate,
    name: String,
    connects: Arc<Mutex<Vec<Connect>>>,
    release: Arc<Notify>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    loop {
        let Ok((tcp, conn)) = l.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let (name, connects, release) = (name.clone(), connects.clone(), release.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let peer = connection_peer(tls.get_ref().1);
            let svc = service_fn(move |req: Request<Incoming>| {
                connects.lock().unwrap().push(Connect {
                    authority: req.uri().authority().unwrap().to_string(),
                    peer: peer.clone(),
                    conn,
                });
                let (name, release) = (name.clone(), release.clone());
                tokio::spawn(async move {
                    let up = hyper::upgrade::on(req).await.unwrap();
                    app(TokioIo::new(up), name, release).await;
                });
                async { Ok::<_, Infallible>(Response::new(full(Bytes::new()))) }
            });
            let _ = H2Settings::default()
                .server()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// The test app on a tunnel: HTTP/1.1 or HTTP/2 (sniffed), else a TCP echo.
async fn app<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    name: String,
    release: Arc<Notify>,
) {
    let (kind, mut io) = detect(io, Duration::from_millis(300)).await.unwrap();
    let routes = crate::grpc_app::routes();
    // gRPC services' paths go to tonic; everything else to `handle`.
    let svc = service_fn(move |req: Request<Incoming>| {
        let (name, release, routes) = (name.clone(), release.clone(), routes.clone());
        async move {
            let p = req.uri().path();
            if p.starts_with("/envoy.") || p.starts_with("/istio.") {
                let r = tower::ServiceExt::oneshot(routes, req).await.unwrap();
                Ok::<_, Infallible>(r.map(|b| b.map_err(BoxError::from).boxed_unsync()))
            } else {
                let r = handle(req, name, release).await.unwrap();
                Ok(r.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
            }
        }
    });
    match kind {
        Detected::Http1 => {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await;
        }
        Detected::Http2 => {
            let _ = H2Settings::default()
                .server()
                .serve_connection(TokioIo::new(io), svc)
                .await;
        }
        Detected::Tcp => {
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    }
}

/// One gRPC message (uncompressed): flag, length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Splits complete gRPC messages off the front of `buf`.
pub fn grpc_messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

/// A body fed from a channel (streamed frame by frame).
pub fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

async fn handle(
    mut req: Request<Incoming>,
    name: String,
    release: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    let ok = |body: Body| {
        Response::builder()
            .header("x-backend", name.as_str())
            .body(body)
            .unwrap()
    };
    if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on.await.unwrap());
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("x-backend", name.as_str())
            .body(full(Bytes::new()))
            .unwrap());
    }
    match req.uri().path() {
        "/hello" => Ok(ok(full(format!(
            "hello from {name} via {:?}",
            req.version()
        )))),
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    n += d.len() as u64;
                }
            }
            Ok(ok(full(n.to_string())))
        }
        // A streamed response of `n` bytes, in 64 KiB frames.
        p if p.starts_with("/bytes/") => {
            let mut n: u64 = p["/bytes/".len()..].parse().unwrap();
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                while n > 0 {
                    let k = n.min(chunk.len() as u64) as usize;
                    if tx.send(Frame::data(chunk.slice(..k))).await.is_err() {
                        return;
                    }
                    n -= k as u64;
                }
            });
            Ok(ok(body))
        }
        "/slow" => {
            release.notified().await;
            Ok(ok(full("slow")))
        }
        // The head and a first chunk at once, the rest of the body only when released.
        p if p.starts_with("/stall") => {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from_static(b"first"))).await;
                release.notified().await;
                let _ = tx.send(Frame::data(Bytes::from_static(b"rest"))).await;
            });
            Ok(ok(body))
        }
        // Bidirectional streaming: each request message echoed as it arrives; trailers at
        // the end of the request.
        "/test.Echo/Chat" | "/test.Echo/Unary" => {
            let (tx, body) = channel_body();
            let mut reqb = req.into_body();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while let Some(Ok(f)) = reqb.frame().await {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                        for m in grpc_messages(&mut buf) {
                            let mut echo = b"echo:".to_vec();
                            echo.extend_from_slice(&m);
                            if tx.send(Frame::data(grpc_frame(&echo))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("x-trailer", "done".parse().unwrap());
                let _ = tx.send(Frame::trailers(t)).await;
            });
            Ok(Response::builder()
                .header("content-type", "application/grpc")
                .header("x-backend", name.as_str())
                .body(body)
                .unwrap())
        }
        // Answers 503 the first time a token is seen, then 200 (retries).
        p if p.starts_with("/flaky/") => {
            let first = FLAKY.lock().unwrap().insert(p.to_owned());
            Ok(Response::builder()
                .status(if first {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                })
                .header("x-backend", name.as_str())
                .body(full(Bytes::new()))
                .unwrap())
        }
        // Anything else: 404 saying what arrived (routes' rewrites and header filters).
        _ => {
            let seen = |h: &str| {
                req.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let host = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| seen("host"));
            Ok(Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("x-backend", name.as_str())
                .header("x-seen-path", req.uri().path_and_query().unwrap().as_str())
                .header("x-seen-host", host)
                .header("x-seen-added", seen("x-added"))
                .body(full(Bytes::new()))
                .unwrap())
        }
    }
}

/// An HTTP/1.1 client connection on `io`.
pub async fn h1(io: Tunnel) -> hyper::client::conn::http1::SendRequest<Body> {
    let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(c.with_upgrades());
    s
}

/// An HTTP/2 client connection on `io`.
pub async fn h2(io: Tunnel) -> hyper::client::conn::http2::SendRequest<Body> {
    let (s, c) = H2Settings::default()
        .client()
        .handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(c);
    s
}

/// Reads a whole (small) response body as text.
pub async fn text(r: Response<Incoming>) -> String {
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// GET `path` on an admin listener.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(c);
    let r = s
        .send_request(
            Request::get(path)
                .header("host", "admin")
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let code = r.status();
    (code, text(r).await)
}

/// The value of `istio_requests_total` lines of `metrics` that contain every one of `labels`.
pub fn requests_total(metrics: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Polls `f` until it returns true, for up to 30 s (the machine may be loaded).
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
