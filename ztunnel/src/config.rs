//! ztunnel's configuration: one typed, serialisable struct, read from an optional YAML file
//! (`--config` or `ZTUNNEL_CONFIG`), then overridden by the environment variables upstream
//! ztunnel uses, validated once at start and shown at admin `/config_dump`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zmesh_core::hbone::{H2Settings, PoolConfig};
use zmesh_core::serve::Limits;

use crate::grpc::{AuthHeaders, AuthToken, Target};

/// Where Kubernetes mounts the mesh root (`XDS_ROOT_CA`, `CA_ROOT_CA` default).
pub const DEFAULT_ROOT_CA: &str = "./var/run/secrets/istio/root-cert.pem";
/// Where Kubernetes mounts ztunnel's projected token (`AUTH_TOKEN` default).
pub const DEFAULT_AUTH_TOKEN: &str = "./var/run/secrets/tokens/istio-token";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// One workload; ztunnel runs inside that workload's network namespace.
    #[default]
    Dedicated,
    /// Many pods on a node, handed over by the node agent (ZDS).
    Shared,
}

/// `<namespace>/<name>/<service-account>`, the workload a dedicated ztunnel serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
    pub admin: u16,
    pub stats: u16,
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
            admin: 15000,
            stats: 15020,
            readiness: 15021,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct Config {
    pub proxy_mode: ProxyMode,
    /// The workload served in dedicated mode (`PROXY_WORKLOAD_INFO`).
    pub workload: Option<WorkloadInfo>,
    /// The node agent's ZDS socket, in shared mode (`INPOD_UDS`).
    pub inpod_uds: PathBuf,
    /// Upstream ztunnel's local-config YAML, watched and reloaded on change (`LOCAL_XDS_PATH`).
    pub local_xds_path: Option<PathBuf>,
    /// Controller (xDS) address, `https://host:port`; empty: no xDS, the local config file
    /// only (`XDS_ADDRESS`).
    pub xds_address: String,
    /// The root the controller's certificate must chain to (`XDS_ROOT_CA`).
    pub xds_root_ca: PathBuf,
    /// Name to verify in the controller's certificate instead of the address's host
    /// (`ALT_XDS_HOSTNAME`).
    pub alt_xds_hostname: Option<String>,
    /// Remote CA address (`CA_ADDRESS`). Unset: the same as `xds_address` (upstream's
    /// default); empty: the local CA below signs certificates. Resolved at load, so the
    /// loaded config always has `Some`.
    pub ca_address: Option<String>,
    /// The root the CA's certificate must chain to (`CA_ROOT_CA`).
    pub ca_root_ca: PathBuf,
    /// (`ALT_CA_HOSTNAME`).
    pub alt_ca_hostname: Option<String>,
    /// ztunnel's credential for the controller: a file re-read on every call, or the token
    /// itself (`AUTH_TOKEN`). A literal token is not shown at `/config_dump`.
    #[serde(serialize_with = "redact_token")]
    pub auth_token: String,
    pub local_ca_cert: Option<PathBuf>,
    pub local_ca_key: Option<PathBuf>,
    pub node_name: String,
    pub trust_domain: String,
    pub cluster_id: String,
    /// ztunnel's own pod, for its xDS node identity (`POD_NAME`, `POD_NAMESPACE`,
    /// `INSTANCE_IP`, `SERVICE_ACCOUNT`).
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
    pub service_account: String,
    /// Extra xDS node metadata: every `ISTIO_META_<KEY>` variable, as `<KEY>`.
    pub node_metadata: BTreeMap<String, String>,
    /// Data-plane worker threads (`ZTUNNEL_WORKER_THREADS`).
    pub worker_threads: usize,
    pub ports: Ports,
    /// Address the traffic listeners bind to.
    pub bind_ip: IpAddr,
    /// Mark on ztunnel's own sockets, so the capture rules skip them; 0 disables marking.
    pub packet_mark: u32,
    /// How long open connections may finish after SIGTERM (`TERMINATION_GRACE_PERIOD_SECONDS`).
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Lifetime of workload certificates: what the local CA issues and what is asked of the
    /// remote CA (`SECRET_TTL`).
    #[serde(with = "humantime_serde")]
    pub cert_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The largest buffer one direction of a proxied connection grows to under bulk traffic
    /// (it starts at 1 KiB, steps to 16 KiB, then to this, and is given back while the
    /// connection is idle).
    pub copy_buffer: usize,
    pub h2: H2Settings,
    pub pool: PoolConfig,
    /// The limits of each listener against clients that hold connections.
    pub listeners: Listeners,
}

/// The limits of ztunnel's listeners (see `zmesh_core::serve`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct Listeners {
    /// Inbound HBONE (15008): mTLS + HTTP/2 preface deadline, an idle timeout longer than the
    /// client pool's (`pool.idle_timeout`) so that clients close idle pooled connections first.
    pub hbone: Limits,
    /// Outbound capture (15001): the app is the only peer; a proxied TCP connection is never
    /// idle in the sense of the idle timeout.
    pub outbound: Limits,
    /// Inbound plaintext (15006).
    pub inbound_plaintext: Limits,
    /// Admin (15000), metrics (15020) and readiness (15021), HTTP/1.1.
    pub admin: Limits,
    /// Listeners stop accepting at this fraction of the descriptor limit (RLIMIT_NOFILE).
    pub fd_headroom: f64,
}

impl Default for Listeners {
    fn default() -> Self {
        let base = Limits::default();
        Listeners {
            hbone: Limits {
                idle_timeout: Duration::from_secs(600),
                ..base
            },
            outbound: Limits {
                max_connections: 65536,
                max_connections_per_peer: 65536,
                idle_timeout: Duration::ZERO,
                ..base
            },
            inbound_plaintext: Limits {
                idle_timeout: Duration::ZERO,
                ..base
            },
            admin: Limits {
                max_connections: 256,
                max_connections_per_peer: 64,
                idle_timeout: Duration::from_secs(60),
                ..base
            },
            fd_headroom: 0.9,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy_mode: ProxyMode::Dedicated,
            workload: None,
            inpod_uds: PathBuf::from(zmesh_core::zds::DEFAULT_SOCKET_PATH),
            local_xds_path: None,
            xds_address: String::new(),
            xds_root_ca: PathBuf::from(DEFAULT_ROOT_CA),
            alt_xds_hostname: None,
            ca_address: None,
            ca_root_ca: PathBuf::from(DEFAULT_ROOT_CA),
            alt_ca_hostname: None,
            auth_token: DEFAULT_AUTH_TOKEN.into(),
            local_ca_cert: None,
            local_ca_key: None,
            node_name: String::new(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            pod_name: String::new(),
            pod_namespace: String::new(),
            instance_ip: String::new(),
            service_account: String::new(),
            node_metadata: BTreeMap::new(),
            worker_threads: default_worker_threads(),
            ports: Ports::default(),
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            packet_mark: zmesh_core::socket::ZMESH_MARK,
            drain_deadline: Duration::from_secs(5),
            cert_ttl: Duration::from_secs(24 * 3600),
            connect_timeout: Duration::from_secs(10),
            copy_buffer: 256 << 10,
            h2: H2Settings::default(),
            pool: PoolConfig::default(),
            listeners: Listeners::default(),
        }
    }
}

/// A node proxy shares the node with its workloads: a quarter of the cores, at least one.
/// On small nodes one worker also avoids cross-thread wake-ups on every hop.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

/// A configuration mistake, named so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is not valid: {1}")]
    File(PathBuf, serde_yaml::Error),
    #[error("environment variable {var}={value:?} is not valid: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn redact_token<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    match AuthToken::from_env_value(v) {
        AuthToken::File(p) => s.collect_str(&p.display()),
        AuthToken::Literal(_) => s.serialize_str("<literal token, not shown>"),
    }
}

fn env_err(var: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Env {
        var,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// A controller address must be `https://host:port`.
fn check_address(var: &str, v: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        Err(ConfigError::Invalid(format!(
            "{var}={v:?} is not a URL like https://istiod.istio-system.svc:15012: {why}"
        )))
    };
    match v.parse::<http::Uri>() {
        Err(e) => bad(&e.to_string()),
        Ok(u) if u.scheme_str() != Some("https") => {
            bad("the controller is only reached over TLS: use https://")
        }
        Ok(u) if u.host().is_none_or(str::is_empty) => bad("no host in it"),
        Ok(u) if u.port_u16().is_none() => bad("no port in it (the controller listens on 15012)"),
        Ok(_) => Ok(()),
    }
}

impl Config {
    /// Reads the file (if any), applies the environment, validates.
    pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.to_owned(), e))?;
                serde_yaml::from_str(&text).map_err(|e| ConfigError::File(p.to_owned(), e))?
            }
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        if cfg.ca_address.is_none() {
            cfg.ca_address = Some(cfg.xds_address.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |k: &str| env.get(k).map(String::as_str);
        if let Some(v) = get("PROXY_MODE") {
            self.proxy_mode = match v.to_ascii_lowercase().as_str() {
                "dedicated" => ProxyMode::Dedicated,
                "shared" => ProxyMode::Shared,
                _ => return Err(env_err("PROXY_MODE", v, "expected `dedicated` or `shared`")),
            };
        }
        if let Some(v) = get("PROXY_WORKLOAD_INFO") {
            let parts: Vec<&str> = v.split('/').collect();
            match parts.as_slice() {
                [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
                    self.workload = Some(WorkloadInfo {
                        namespace: (*ns).into(),
                        name: (*name).into(),
                        service_account: (*sa).into(),
                    })
                }
                _ => {
                    return Err(env_err(
                        "PROXY_WORKLOAD_INFO",
                        v,
                        "expected <namespace>/<name>/<service-account>",
                    ));
                }
            }
        }
        let path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
        if let Some(v) = get("LOCAL_XDS_PATH") {
            self.local_xds_path = path(v);
        }
        if let Some(v) = get("INPOD_UDS")
            && let Some(p) = path(v)
        {
            self.inpod_uds = p;
        }
        if let Some(v) = get("LOCAL_CA_CERT") {
            self.local_ca_cert = path(v);
        }
        if let Some(v) = get("LOCAL_CA_KEY") {
            self.local_ca_key = path(v);
        }
        if let Some(v) = get("XDS_ROOT_CA")
            && let Some(p) = path(v)
        {
            self.xds_root_ca = p;
        }
        if let Some(v) = get("CA_ROOT_CA")
            && let Some(p) = path(v)
        {
            self.ca_root_ca = p;
        }
        if let Some(v) = get("CA_ADDRESS") {
            self.ca_address = Some(v.to_owned());
        }
        let name = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        if let Some(v) = get("ALT_XDS_HOSTNAME") {
            self.alt_xds_hostname = name(v);
        }
        if let Some(v) = get("ALT_CA_HOSTNAME") {
            self.alt_ca_hostname = name(v);
        }
        // Upstream also takes the cluster id from ISTIO_META_CLUSTER_ID.
        if let Some(v) = get("ISTIO_META_CLUSTER_ID") {
            self.cluster_id = v.to_owned();
        }
        for (var, field) in [
            ("XDS_ADDRESS", &mut self.xds_address),
            ("NODE_NAME", &mut self.node_name),
            ("TRUST_DOMAIN", &mut self.trust_domain),
            ("CLUSTER_ID", &mut self.cluster_id),
            ("POD_NAME", &mut self.pod_name),
            ("POD_NAMESPACE", &mut self.pod_namespace),
            ("INSTANCE_IP", &mut self.instance_ip),
            ("SERVICE_ACCOUNT", &mut self.service_account),
        ] {
            if let Some(v) = get(var) {
                *field = v.to_owned();
            }
        }
        if let Some(v) = get("AUTH_TOKEN")
            && !v.is_empty()
        {
            self.auth_token = v.to_owned();
        }
        for (k, v) in env {
            if let Some(key) = k.strip_prefix("ISTIO_META_")
                && !key.is_empty()
            {
                self.node_metadata.insert(key.to_owned(), v.clone());
            }
        }
        if let Some(v) = get("SECRET_TTL") {
            self.cert_ttl = humantime_serde::re::humantime::parse_duration(v)
                .map_err(|e| env_err("SECRET_TTL", v, e))?;
        }
        if let Some(v) = get("ZTUNNEL_WORKER_THREADS") {
            self.worker_threads = v
                .parse()
                .map_err(|e| env_err("ZTUNNEL_WORKER_THREADS", v, e))?;
        }
        if let Some(v) = get("TERMINATION_GRACE_PERIOD_SECONDS") {
            let secs: u64 = v
                .parse()
                .map_err(|e| env_err("TERMINATION_GRACE_PERIOD_SECONDS", v, e))?;
            self.drain_deadline = Duration::from_secs(secs);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if self.proxy_mode == ProxyMode::Dedicated && self.workload.is_none() {
            return invalid(
                "dedicated mode needs the workload it serves: set \
                 PROXY_WORKLOAD_INFO=<namespace>/<name>/<service-account>"
                    .into(),
            );
        }
        if !self.xds_address.is_empty() {
            check_address("XDS_ADDRESS", &self.xds_address)?;
            if let Some(p) = &self.local_xds_path {
                return invalid(format!(
                    "XDS_ADDRESS={:?} and LOCAL_XDS_PATH={} are both set; the config comes \
                     from one of them: unset LOCAL_XDS_PATH to use the controller, or set \
                     XDS_ADDRESS= (empty) to use the file",
                    self.xds_address,
                    p.display()
                ));
            }
        }
        if self.ca_address().is_empty() {
            if self.local_ca_cert.is_none() || self.local_ca_key.is_none() {
                return invalid(
                    "with CA_ADDRESS empty, the local CA signs certificates: set LOCAL_CA_CERT \
                     and LOCAL_CA_KEY to the CA certificate and key PEM files"
                        .into(),
                );
            }
        } else {
            check_address("CA_ADDRESS", self.ca_address())?;
            if self.local_ca_cert.is_some() || self.local_ca_key.is_some() {
                return invalid(format!(
                    "CA_ADDRESS={:?} (the remote CA{}) signs certificates, yet LOCAL_CA_CERT/\
                     LOCAL_CA_KEY are set: unset them, or set CA_ADDRESS= (empty) to sign \
                     with the local CA",
                    self.ca_address(),
                    if self.xds_address == self.ca_address() {
                        "; CA_ADDRESS defaults to XDS_ADDRESS"
                    } else {
                        ""
                    }
                ));
            }
        }
        if !self.instance_ip.is_empty() && self.instance_ip.parse::<IpAddr>().is_err() {
            return invalid(format!(
                "INSTANCE_IP={:?} is not an IP address",
                self.instance_ip
            ));
        }
        if zmesh_core::identity::SpiffeId::new(&self.trust_domain, "ns", "sa").is_err() {
            return invalid(format!(
                "TRUST_DOMAIN {:?} is not a valid trust domain",
                self.trust_domain
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 1024 {
            return invalid(format!(
                "worker_threads={} must be between 1 and 1024",
                self.worker_threads
            ));
        }
        let p = self.ports;
        let all = [
            p.outbound,
            p.inbound_plaintext,
            p.hbone,
            p.admin,
            p.stats,
            p.readiness,
        ];
        for (i, a) in all.iter().enumerate() {
            if *a == 0 || all[i + 1..].contains(a) {
                return invalid(format!("ports must be non-zero and distinct, got {p:?}"));
            }
        }
        if self.copy_buffer < 1024 || self.copy_buffer > (16 << 20) {
            return invalid(format!(
                "copy_buffer={} must be between 1 KiB and 16 MiB",
                self.copy_buffer
            ));
        }
        if self.cert_ttl < Duration::from_secs(10)
            || self.cert_ttl > Duration::from_secs(366 * 24 * 3600)
        {
            return invalid(format!(
                "cert_ttl={:?} must be between 10s and 366d",
                self.cert_ttl
            ));
        }
        if self.connect_timeout < Duration::from_millis(10)
            || self.connect_timeout > Duration::from_secs(300)
        {
            return invalid(format!(
                "connect_timeout={:?} must be between 10ms and 5m",
                self.connect_timeout
            ));
        }
        if self.pool.max_streams == 0
            || self.pool.max_streams as u64 > self.h2.server_max_streams as u64
        {
            return invalid(format!(
                "pool.max_streams={} must be between 1 and h2.server_max_streams ({})",
                self.pool.max_streams, self.h2.server_max_streams
            ));
        }
        let l = &self.listeners;
        for (name, limits) in [
            ("hbone", &l.hbone),
            ("outbound", &l.outbound),
            ("inbound_plaintext", &l.inbound_plaintext),
            ("admin", &l.admin),
        ] {
            limits
                .validate(&format!("listeners.{name}"))
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if !(l.fd_headroom > 0.0 && l.fd_headroom <= 1.0) {
            return invalid(format!(
                "listeners.fd_headroom={} must be a fraction in (0, 1], like 0.9",
                l.fd_headroom
            ));
        }
        if !l.hbone.idle_timeout.is_zero()
            && !self.pool.idle_timeout.is_zero()
            && l.hbone.idle_timeout <= self.pool.idle_timeout
        {
            return invalid(format!(
                "listeners.hbone.idle_timeout={:?} must exceed pool.idle_timeout={:?}: a client \
                 should close its idle pooled connections before servers do",
                l.hbone.idle_timeout, self.pool.idle_timeout
            ));
        }
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if self.h2.connection_window < self.h2.stream_window
            || self.h2.connection_window > MAX_WINDOW
            || self.h2.stream_window < 65_535
            || !(16384..=16_777_215).contains(&self.h2.max_frame_size)
            || self.h2.server_max_streams == 0
            || self.h2.keepalive_interval < Duration::from_secs(1)
            || self.h2.keepalive_timeout < Duration::from_secs(1)
        {
            return invalid(format!(
                "h2: need 65535 <= stream_window <= connection_window <= 2^31-1, max_frame_size \
                 within 16384..=16777215, server_max_streams >= 1, keepalives >= 1s; got {:?}",
                self.h2
            ));
        }
        Ok(())
    }

    /// The remote CA's address; empty when the local CA signs.
    pub fn ca_address(&self) -> &str {
        self.ca_address
            .as_deref()
            .unwrap_or(self.xds_address.as_str())
    }

    /// The controller's xDS endpoint, when `XDS_ADDRESS` is set.
    pub fn xds_target(&self) -> Option<Target> {
        (!self.xds_address.is_empty()).then(|| Target {
            var: "XDS_ADDRESS",
            address: self.xds_address.clone(),
            root_ca: self.xds_root_ca.clone(),
            alt_hostname: self.alt_xds_hostname.clone(),
            root_var: "XDS_ROOT_CA",
        })
    }

    /// The remote CA's endpoint, when `CA_ADDRESS` is not empty.
    pub fn ca_target(&self) -> Option<Target> {
        (!self.ca_address().is_empty()).then(|| Target {
            var: "CA_ADDRESS",
            address: self.ca_address().to_owned(),
            root_ca: self.ca_root_ca.clone(),
            alt_hostname: self.alt_ca_hostname.clone(),
            root_var: "CA_ROOT_CA",
        })
    }

    /// The headers every call to the controller carries.
    pub fn auth_headers(&self) -> AuthHeaders {
        AuthHeaders {
            token: AuthToken::from_env_value(&self.auth_token),
            cluster_id: self.cluster_id.clone(),
        }
    }

    /// Ports a connection may never be aimed at: they would loop back into ztunnel.
    pub fn illegal_ports(&self) -> [u16; 3] {
        [
            self.ports.outbound,
            self.ports.inbound_plaintext,
            self.ports.hbone,
        ]
    }

    pub fn mark(&self) -> Option<u32> {
        (self.packet_mark != 0).then_some(self.packet_mark)
    }

    pub fn bind(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bind_ip, port)
    }
}

#[cfg(test)]
mod manifest;

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = [
            ("PROXY_WORKLOAD_INFO", "default/client/client-sa"),
            ("LOCAL_CA_CERT", "/ca.pem"),
            ("LOCAL_CA_KEY", "/ca.key"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("z.yaml");
        std::fs::write(&f, "worker_threads: 3\ntrust_domain: corp.example\npool:\n  max_streams: 7\n  idle_timeout: 0s\n").unwrap();
        let cfg = Config::load(Some(&f), &env(&[("ZTUNNEL_WORKER_THREADS", "4")])).unwrap();
        assert_eq!(cfg.worker_threads, 4);
        assert_eq!(cfg.trust_domain, "corp.example");
        assert_eq!(cfg.pool.max_streams, 7);
        assert_eq!(cfg.pool.idle_timeout, Duration::ZERO);
        assert_eq!(
            cfg.workload,
            Some(WorkloadInfo {
                namespace: "default".into(),
                name: "client".into(),
                service_account: "client-sa".into()
            })
        );
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("z.yaml");
        std::fs::write(&f, "worker_thread: 3\n").unwrap();
        let e = Config::load(Some(&f), &env(&[])).unwrap_err().to_string();
        assert!(e.contains("worker_thread"), "{e}");
        // Values that would panic or spin at run time are refused at start.
        for (yaml, needle) in [
            ("h2:\n  connection_window: 4294967295\n", "h2"),
            ("h2:\n  keepalive_interval: 0s\n", "h2"),
            ("connect_timeout: 0s\n", "connect_timeout"),
            ("cert_ttl: 100years\n", "cert_ttl"),
            ("pool:\n  max_streams: 500\n", "pool.max_streams"),
            ("copy_buffer: 10\n", "copy_buffer"),
            (
                "listeners:\n  hbone:\n    handshake_timeout: 0s\n",
                "listeners.hbone.handshake_timeout",
            ),
            (
                "listeners:\n  hbone:\n    idle_timeout: 4s\n",
                "must exceed pool.idle_timeout",
            ),
            (
                "listeners:\n  admin:\n    max_connections_per_peer: 0\n",
                "listeners.admin.max_connections_per_peer",
            ),
            ("listeners:\n  fd_headroom: 1.5\n", "listeners.fd_headroom"),
        ] {
            std::fs::write(&f, yaml).unwrap();
            let e = Config::load(Some(&f), &env(&[])).unwrap_err().to_string();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
        for (k, v, needle) in [
            (
                "PROXY_WORKLOAD_INFO",
                "default/client",
                "PROXY_WORKLOAD_INFO",
            ),
            ("PROXY_MODE", "sidecar", "PROXY_MODE"),
            ("XDS_ADDRESS", "http://istiod:15012", "https://"),
            ("XDS_ADDRESS", "https://istiod", "no port"),
            ("CA_ADDRESS", "https://istiod:15012", "unset them"),
            ("INSTANCE_IP", "ten", "INSTANCE_IP"),
            ("SECRET_TTL", "a day", "SECRET_TTL"),
            ("LOCAL_CA_KEY", "", "LOCAL_CA_KEY"),
            ("ZTUNNEL_WORKER_THREADS", "many", "ZTUNNEL_WORKER_THREADS"),
            ("TRUST_DOMAIN", "Bad Domain", "TRUST_DOMAIN"),
            (
                "TERMINATION_GRACE_PERIOD_SECONDS",
                "soon",
                "TERMINATION_GRACE_PERIOD_SECONDS",
            ),
        ] {
            let e = Config::load(None, &env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(needle), "{k}={v}: {e}");
        }
    }

    /// The controller: XDS_ADDRESS replaces the local file, CA_ADDRESS follows it unless set,
    /// and the two sources of certificates exclude each other.
    #[test]
    fn controller_addresses() {
        let remote = |pairs: &[(&str, &str)]| {
            let mut e = env(pairs);
            e.remove("LOCAL_CA_CERT");
            e.remove("LOCAL_CA_KEY");
            Config::load(None, &e)
        };
        let cfg = remote(&[
            ("XDS_ADDRESS", "https://istiod.istio-system.svc:15012"),
            ("POD_NAME", "ztunnel-abc"),
            ("POD_NAMESPACE", "istio-system"),
            ("INSTANCE_IP", "10.0.0.1"),
            ("SERVICE_ACCOUNT", "ztunnel"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("AUTH_TOKEN", "s3cret"),
            ("SECRET_TTL", "12h"),
        ])
        .unwrap();
        assert_eq!(cfg.ca_address(), "https://istiod.istio-system.svc:15012");
        let xds = cfg.xds_target().unwrap();
        assert_eq!(xds.root_ca, PathBuf::from(DEFAULT_ROOT_CA));
        assert_eq!(cfg.ca_target().unwrap().root_var, "CA_ROOT_CA");
        assert_eq!(cfg.cluster_id, "east");
        assert_eq!(cfg.node_metadata["DNS_CAPTURE"], "true");
        assert_eq!(cfg.cert_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(
            cfg.auth_headers().token,
            AuthToken::Literal("s3cret".into())
        );
        // A literal token never reaches /config_dump.
        let dump = serde_json::to_string(&cfg).unwrap();
        assert!(!dump.contains("s3cret"), "{dump}");
        // Defaults: no xDS, and the token file.
        let cfg = Config::load(None, &env(&[])).unwrap();
        assert!(cfg.xds_target().is_none() && cfg.ca_target().is_none());
        assert_eq!(
            cfg.auth_headers().token,
            AuthToken::File(DEFAULT_AUTH_TOKEN.into())
        );

        // xDS from the controller, certificates from the local CA: CA_ADDRESS= (empty).
        let cfg = Config::load(
            None,
            &env(&[
                ("XDS_ADDRESS", "https://127.0.0.1:15012"),
                ("CA_ADDRESS", ""),
                ("XDS_ROOT_CA", "/root.pem"),
                ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc"),
            ]),
        )
        .unwrap();
        assert!(cfg.ca_target().is_none());
        let t = cfg.xds_target().unwrap();
        assert_eq!(t.root_ca, PathBuf::from("/root.pem"));
        assert_eq!(t.alt_hostname.as_deref(), Some("istiod.istio-system.svc"));

        // A remote CA with LOCAL_CA_* left set, the default CA_ADDRESS named in the error.
        let e = Config::load(None, &env(&[("XDS_ADDRESS", "https://istiod:15012")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LOCAL_CA_CERT") && e.contains("defaults to XDS_ADDRESS"),
            "{e}"
        );
        // Both config sources.
        let e = remote(&[
            ("XDS_ADDRESS", "https://istiod:15012"),
            ("LOCAL_XDS_PATH", "/etc/z.yaml"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("unset LOCAL_XDS_PATH"), "{e}");
        // No CA at all.
        let e = remote(&[]).unwrap_err().to_string();
        assert!(e.contains("LOCAL_CA_CERT"), "{e}");
        // The typed file form takes the same fields.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("z.yaml");
        std::fs::write(
            &f,
            "xds_address: https://istiod:15012\nca_address: ''\nxds_root_ca: /r.pem\n\
             node_metadata:\n  FOO: bar\npod_name: z\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&f), &env(&[])).unwrap();
        assert_eq!(cfg.xds_target().unwrap().root_ca, PathBuf::from("/r.pem"));
        assert_eq!(cfg.node_metadata["FOO"], "bar");
        assert!(cfg.ca_target().is_none());
    }
}
