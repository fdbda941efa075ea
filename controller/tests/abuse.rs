//! The controller binary under abuse from an unauthenticated client (issue 9, problem 1):
//! TLS connections to the gRPC port that never speak HTTP/2 and idle TCP connections to the
//! monitoring port must neither stay open forever nor push the process to its descriptor
//! limit; a legitimate ztunnel's CA calls and ADS stream keep working throughout.
//!
//! The controller runs as its own process (the real binary, `RLIMIT_NOFILE` lowered to 256),
//! so the attacker in this test process does not share its descriptor table.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use xds_proto::envoy::config::core::v3::Node;
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_controller::ca::impersonation;
use zmesh_controller::reconcile::ADDRESS_TYPE;
use zmesh_core::tls::LocalCa;

const TOKEN: &str = "n1-0123456789abcdef0123456789abcdef";
/// The controller's descriptor limit in this test.
const NOFILE: u64 = 256;
/// Generous: the machine is shared and loaded.
const WAIT: Duration = Duration::from_secs(60);

struct Controller {
    child: Child,
    grpc: SocketAddr,
    monitoring: SocketAddr,
    root_pem: String,
    _dir: tempfile::TempDir,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn controller(extra: &[&str]) -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate("mesh-root").unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    std::fs::write(
        objects.join("a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, uid: u-p1}\n\
         spec: {nodeName: n1, serviceAccountName: sa1, containers: [{name: c}]}\n\
         status: {phase: Running, podIP: 10.0.0.1, conditions: [{type: Ready, status: 'True'}]}\n",
    )
    .unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("n1 {TOKEN}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zmesh-controller"));
    cmd.args(["--listen", "127.0.0.1:0", "--monitoring", "127.0.0.1:0"])
        .arg("--config-dir")
        .arg(&objects)
        .arg("--ca-cert")
        .arg(&cert)
        .arg("--ca-key")
        .arg(&key)
        .arg("--node-tokens")
        .arg(&tokens)
        .args(extra)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                NOFILE,
                NOFILE,
            )
            .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let field = |line: &str, name: &str| -> Option<SocketAddr> {
        let rest = line.split(&format!("{name}=")).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    let (grpc, monitoring) = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the controller exited");
            if line.contains("started") {
                return (
                    field(&line, "addr").unwrap(),
                    field(&line, "monitoring").unwrap(),
                );
            }
        }
    })
    .await
    .expect("the controller did not start");
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Controller {
        child,
        grpc,
        monitoring,
        root_pem: ca.cert_pem().to_owned(),
        _dir: dir,
    }
}

fn raise_own_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// A TCP connection from `src` (a loopback address), so that attackers can come from many.
async fn tcp_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))?;
    s.connect(to).await
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection (handshake done, ALPN h2) that never sends a byte of HTTP/2.
async fn silent_tls(c: &Controller, src: [u8; 4]) -> Option<TlsStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(&c.root_pem) {
        roots.add(cert).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(zmesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::time::timeout(Duration::from_secs(5), tcp_from(src, c.grpc))
        .await
        .ok()?
        .ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    zmesh_core::tls::certs_from_pem("root", pem).unwrap()
}

/// Whether the server closed `s` (EOF or an error) within `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    // Whatever the server sends (its own HTTP/2 SETTINGS) is read past: only the end counts.
    let mut b = [0u8; 256];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn channel(c: &Controller) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.root_pem))
        .domain_name("localhost");
    Channel::from_shared(format!("https://127.0.0.1:{}", c.grpc.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    r
}

/// A CA call on a fresh connection (a new TLS handshake, as a restarting ztunnel makes).
async fn ca_call(c: &Controller) -> Result<(), String> {
    let id = "spiffe://cluster.local/ns/a/sa/sa1";
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.root_pem))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://127.0.0.1:{}", c.grpc.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    IstioCertificateServiceClient::new(ch)
        .create_certificate(authed(IstioCertificateRequest {
            csr,
            validity_duration: 3600,
            metadata: Some(impersonation(id)),
        }))
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Retries the CA call until it succeeds (the CA may still be loading), within `WAIT`.
async fn ca_works(c: &Controller) {
    let end = Instant::now() + WAIT;
    loop {
        match ca_call(c).await {
            Ok(()) => return,
            Err(e) if Instant::now() > end => panic!("a valid CA call failed: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn http_ready(addr: SocketAddr) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_cannot_exhaust_the_controller() {
    zmesh_core::tls::install_default_provider();
    raise_own_nofile();
    let c = controller(&[]).await;
    ca_works(&c).await;
    // A legitimate ztunnel's ADS stream, open before the attack.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(&c).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe()).await.unwrap();
    let mut stream = ads
        .delta_aggregated_resources(authed(tokio_stream_from(rx)))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "ADS answered: {first:?}");

    // The attack, from two addresses: more silent TLS connections to 15012 and idle TCP
    // connections to 15014 than the process has descriptors.
    let (mut tls, mut tcp) = attack(&c, 2).await;
    eprintln!(
        "attacker holds {} TLS and {} TCP connections",
        tls.len(),
        tcp.len()
    );
    let fds = open_fds(&c);
    assert!(
        fds < NOFILE * 95 / 100,
        "the controller holds {fds} of its {NOFILE} descriptors"
    );
    // While the attacker holds what it got: a valid CA call (a new connection) works at
    // once, as does a new ADS stream; the monitoring port still answers.
    let started = Instant::now();
    ca_call(&c)
        .await
        .expect("a valid CA call during the attack");
    let mut ads2 = AggregatedDiscoveryServiceClient::new(channel(&c).await);
    let mut stream2 = ads2
        .delta_aggregated_resources(authed(
            futures::stream::iter([subscribe()]).chain(futures::stream::pending()),
        ))
        .await
        .expect("a new ADS stream during the attack")
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream2.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(_)))),
        "ADS answered during the attack: {first:?}"
    );
    let ready = http_ready(c.monitoring).await;
    assert!(
        ready
            .as_deref()
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
        "the monitoring port answered during the attack: {ready:?}"
    );
    eprintln!(
        "legitimate calls during the attack took {:?}",
        started.elapsed()
    );
    // The silent connections are closed by the server (handshake + first-bytes deadline of
    // 10 s on 15012, request-head deadline on 15014).
    let start = Instant::now();
    for s in tls.iter_mut() {
        assert!(
            closed_within(s, WAIT.saturating_sub(start.elapsed())).await,
            "a TLS connection that never sent HTTP/2 was kept open"
        );
    }
    for s in tcp.iter_mut() {
        assert!(
            closed_within(s, WAIT.saturating_sub(start.elapsed())).await,
            "an idle TCP connection to the monitoring port was kept open"
        );
    }
    drop((tls, tcp));

    // From many addresses the per-peer caps do not bind: the descriptor headroom does. The
    // process stays under its limit, and once the deadlines free the attacker's connections a
    // valid CA call works again.
    let (tls, tcp) = attack(&c, 64).await;
    eprintln!(
        "attacker (64 addresses) holds {} TLS and {} TCP connections",
        tls.len(),
        tcp.len()
    );
    let fds = open_fds(&c);
    assert!(
        fds < NOFILE * 95 / 100,
        "the controller holds {fds} of its {NOFILE} descriptors"
    );
    ca_works(&c).await;

    // The ADS stream opened before the attack survived it.
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        response_nonce: "after".into(),
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .expect("the ADS stream opened before the attack is still open");
    drop((tls, tcp, tx));
    let end = tokio::time::timeout(WAIT, stream.message()).await;
    assert!(
        !matches!(end, Ok(Err(_))),
        "the ADS stream failed during the attack: {end:?}"
    );
}

fn subscribe() -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
            ..Node::default()
        }),
        type_url: ADDRESS_TYPE.into(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn open_fds(c: &Controller) -> u64 {
    std::fs::read_dir(format!("/proc/{}/fd", c.child.id()))
        .unwrap()
        .count() as u64
}

/// Opens `NOFILE` silent TLS connections to the gRPC port and as many idle TCP connections to
/// the monitoring port, all at once, from `addresses` loopback addresses; returns those that
/// got through (a refused one is reset or times out).
async fn attack(c: &Controller, addresses: usize) -> (Vec<TlsStream>, Vec<TcpStream>) {
    let src = |i: usize| [127, 0, 1, (i % addresses) as u8 + 1];
    let tls = futures::future::join_all((0..NOFILE as usize).map(|i| silent_tls(c, src(i))));
    let tcp = futures::future::join_all((0..NOFILE as usize).map(|i| async move {
        tokio::time::timeout(Duration::from_secs(5), tcp_from(src(i), c.monitoring))
            .await
            .ok()?
            .ok()
    }));
    let (tls, tcp) = tokio::join!(tls, tcp);
    let mut tls: Vec<_> = tls.into_iter().flatten().collect();
    let mut tcp: Vec<_> = tcp.into_iter().flatten().collect();
    // Refused connections were reset: keep only those still open.
    let mut open_tls = Vec::new();
    for mut s in tls.drain(..) {
        if !closed_within(&mut s, Duration::from_millis(50)).await {
            open_tls.push(s);
        }
    }
    let mut open_tcp = Vec::new();
    for mut s in tcp.drain(..) {
        if !closed_within(&mut s, Duration::from_millis(50)).await {
            open_tcp.push(s);
        }
    }
    (open_tls, open_tcp)
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}
