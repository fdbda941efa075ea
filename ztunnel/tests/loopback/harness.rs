//! A dedicated-mode ztunnel started in process (`ztunnel::app::start`) as a user without
//! privileges would run it: a local CA and a local config file in a temporary directory, its
//! listeners on a loopback address of its own (`127.77.<pid>.<n>`) with free ports, no packet
//! mark, no capture rules. Beside it an echo app (the workload) on the same address, and HBONE
//! clients using zmesh's own pool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh_core::hbone::{
    H2Settings, HboneError, Pool, PoolConfig, PoolKey, SourceInfo, StreamGuard, Tunnel,
};
use zmesh_core::identity::SpiffeId;
use zmesh_core::socket::SocketOptions;
use zmesh_core::tls::{LocalCa, WorkloadCertificate};
use ztunnel::app::{self, Running};
use ztunnel::config::Config;

/// Generous: the machine running the tests may be loaded.
pub const WAIT: Duration = Duration::from_secs(30);

/// The workload the ztunnel serves: `default/server`, service account `server`.
pub const WORKLOAD: &str = "default/server/server";

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// A loopback address no other test of this process uses (the whole 127/8 is local on Linux).
fn unique_ip() -> IpAddr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(127, 77, std::process::id() as u8, n))
}

/// The local config: the workload at `ip`, then `extra` (e.g. `policies:`) as YAML.
pub fn local_config(ip: IpAddr, extra: &str) -> String {
    format!(
        "workloads:\n- name: server\n  namespace: default\n  serviceAccount: server\n  \
         workloadIps: [{ip}]\n  protocol: HBONE\n  canonicalName: server\n  \
         canonicalRevision: v1\n  workloadName: server\n{extra}"
    )
}

/// A namespace-wide policy of `action` whose one rule matches the principal of `sa`.
pub fn policy(name: &str, action: &str, sa: &str) -> String {
    format!(
        "policies:\n- name: {name}\n  namespace: default\n  scope: Namespace\n  action: {action}\n  \
         rules:\n  - - - principals: [!Exact cluster.local/ns/default/sa/{sa}]\n"
    )
}

/// A TCP echo server that counts the connections it accepted.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    async fn start(ip: IpAddr) -> Echo {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Echo { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A ztunnel running in this process for the workload `default/server` at its own address.
pub struct Ztunnel {
    /// `None` once shut down.
    running: Option<Running>,
    pub ip: IpAddr,
    /// The inbound HBONE listener (15008 in a pod).
    pub hbone: SocketAddr,
    pub ca: LocalCa,
    pub app: Echo,
    /// The local config file (`LOCAL_XDS_PATH`), watched by the ztunnel.
    pub local_config: PathBuf,
    _dir: tempfile::TempDir,
}

/// Five ports free on `ip` and one on 127.0.0.1 for the admin listener, all distinct numbers
/// (ztunnel's config requires it): all six are held while they are read, and a set with a
/// number twice (possible across two addresses) is drawn again.
async fn free_ports(ip: IpAddr) -> [u16; 6] {
    loop {
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(TcpListener::bind((ip, 0)).await.unwrap());
        }
        held.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        if distinct.len() == ports.len() {
            return ports.try_into().unwrap();
        }
    }
}

impl Ztunnel {
    /// Starts one whose local config is the workload plus `extra` (see [`local_config`]).
    pub async fn start(extra: &str) -> Ztunnel {
        let ip = unique_ip();
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::generate("loopback-test-root").unwrap();
        let (ca_cert, ca_key) = (
            dir.path().join("ca-cert.pem"),
            dir.path().join("ca-key.pem"),
        );
        std::fs::write(&ca_cert, ca.cert_pem()).unwrap();
        std::fs::write(&ca_key, ca.key_pem()).unwrap();
        let local = dir.path().join("local-config.yaml");
        std::fs::write(&local, local_config(ip, extra)).unwrap();
        let app = Echo::start(ip).await;
        let env: std::collections::HashMap<String, String> = [
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", WORKLOAD),
            ("XDS_ADDRESS", ""),
            ("CA_ADDRESS", ""),
            ("LOCAL_XDS_PATH", local.to_str().unwrap()),
            ("LOCAL_CA_CERT", ca_cert.to_str().unwrap()),
            ("LOCAL_CA_KEY", ca_key.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        // Ports picked free and released, then bound by ztunnel: another process may take one
        // in between, so a bind failure is retried with new ports.
        let mut last_err = None;
        for _ in 0..10 {
            let p = free_ports(ip).await;
            let admin = p[5];
            let file = dir.path().join("ztunnel.yaml");
            std::fs::write(
                &file,
                format!(
                    "bind_ip: {ip}\npacket_mark: 0\ndrain_deadline: 2s\nports:\n  \
                     outbound: {}\n  inbound_plaintext: {}\n  hbone: {}\n  stats: {}\n  \
                     readiness: {}\n  admin: {admin}\n",
                    p[0], p[1], p[2], p[3], p[4]
                ),
            )
            .unwrap();
            let cfg = Config::load(Some(&file), &env).unwrap();
            let hbone = SocketAddr::new(ip, cfg.ports.hbone);
            let log: ztunnel::admin::LogControl = Arc::new(|_| Ok("info".to_owned()));
            match app::start(cfg, log).await {
                Ok(running) => {
                    let zt = Ztunnel {
                        running: Some(running),
                        ip,
                        hbone,
                        ca,
                        app,
                        local_config: local,
                        _dir: dir,
                    };
                    zt.wait_ready().await;
                    return zt;
                }
                Err(e) if format!("{e:#}").contains("bind") => last_err = Some(e),
                Err(e) => panic!("ztunnel did not start: {e:#}"),
            }
        }
        panic!("ztunnel could not bind its ports: {last_err:?}");
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// Waits for `/healthz/ready` to answer 200.
    async fn wait_ready(&self) {
        let addr = self.running().readiness_addr;
        eventually("ztunnel ready", || async {
            get(addr, "/healthz/ready")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        })
        .await;
    }

    /// The Prometheus text at the metrics endpoint.
    pub async fn metrics(&self) -> String {
        get(self.running().stats_addr, "/metrics").await.unwrap()
    }

    /// Replaces the local config file (atomically: a new file renamed over it).
    pub fn write_local_config(&self, extra: &str) {
        let tmp = self.local_config.with_extension("new");
        std::fs::write(&tmp, local_config(self.ip, extra)).unwrap();
        std::fs::rename(&tmp, &self.local_config).unwrap();
    }

    /// Drains and stops.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown("test done").await;
        }
    }
}

/// Polls `f` until it holds; panics after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET; the whole response (head and body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit_once("} "))
        .filter(|(set, _)| {
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.trim().parse::<u64>().unwrap())
        .sum()
}

/// A workload certificate for `sa` signed by `signer`, trusting `trusted`'s root.
pub fn cert(signer: &LocalCa, sa: &str, trusted: &LocalCa) -> WorkloadCertificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = signer
        .sign(&id(sa), &key, Duration::from_secs(3600))
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    WorkloadCertificate::new(vec![leaf], key, vec![trusted.root().clone()]).unwrap()
}

/// An HBONE client with one certificate: every tunnel on a connection of its own.
pub struct Client {
    pool: Arc<Pool>,
    cert: WorkloadCertificate,
}

impl Client {
    /// A mesh workload `default/<sa>` with a certificate from the ztunnel's CA.
    pub fn new(zt: &Ztunnel, sa: &str) -> Client {
        Client::with_cert(cert(&zt.ca, sa, &zt.ca))
    }

    pub fn with_cert(cert: WorkloadCertificate) -> Client {
        let sockets = SocketOptions {
            mark: None,
            ..SocketOptions::default()
        };
        let pool = PoolConfig {
            idle_timeout: Duration::ZERO,
            ..PoolConfig::default()
        };
        Client {
            pool: Pool::new(pool, H2Settings::default(), sockets),
            cert,
        }
    }

    /// A tunnel through `zt`'s HBONE listener to its app, the peer verified as the workload.
    pub async fn connect(&self, zt: &Ztunnel) -> Result<(Tunnel, StreamGuard), HboneError> {
        let key = PoolKey::new(
            self.cert.identity().clone(),
            vec![id("server")],
            zt.hbone,
            None,
        );
        let src = SourceInfo::default();
        let connect = self.pool.connect(key, &self.cert, zt.app.addr, &src);
        tokio::time::timeout(WAIT, connect)
            .await
            .expect("the HBONE connect neither succeeded nor failed")
    }
}

impl Client {
    /// Connects and expects the refusal; returns it.
    pub async fn refused(&self, zt: &Ztunnel) -> HboneError {
        match self.connect(zt).await {
            Ok(_) => panic!(
                "{} connected; it should have been refused",
                self.cert.identity()
            ),
            Err(e) => e,
        }
    }
}

/// Sends `msg` and reads the same bytes back.
pub async fn echo(tunnel: &mut Tunnel, msg: &[u8]) {
    tunnel.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(back, msg);
}
