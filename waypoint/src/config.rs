//! The waypoint's configuration, from environment variables named like upstream ztunnel's
//! where they mean the same thing (`LOCAL_XDS_PATH`, `LOCAL_CA_CERT`, `POD_NAMESPACE`, ...).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zmesh_core::hbone::{H2Settings, PoolConfig};
use zmesh_core::identity::SpiffeId;
use zmesh_core::serve::Limits;
use zmesh_core::socket::SocketOptions;

use crate::upstream::LbPolicy;
use zmesh_core::grpc::{AuthHeaders, AuthToken, Target};

/// Where Kubernetes mounts the mesh root (`XDS_ROOT_CA`, `CA_ROOT_CA` default).
pub const DEFAULT_ROOT_CA: &str = "./var/run/secrets/istio/root-cert.pem";
/// Where the projected `istio-ca` token is mounted (`AUTH_TOKEN` default).
pub const DEFAULT_AUTH_TOKEN: &str = "./var/run/secrets/tokens/istio-token";

/// Everything the waypoint needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The waypoint's own identity (`TRUST_DOMAIN`, `POD_NAMESPACE`, `SERVICE_ACCOUNT`): the
    /// certificate it serves HBONE with and opens upstream tunnels under.
    pub identity: SpiffeId,
    /// Its pod name (`POD_NAME`) and cluster (`CLUSTER_ID`), sent in `baggage`.
    pub pod_name: String,
    pub cluster_id: String,
    /// The HBONE listener (`WAYPOINT_HBONE_ADDR`, default `[::]:15008`).
    pub hbone_addr: SocketAddr,
    /// Metrics (`/metrics`) and readiness (`/healthz/ready`) (`WAYPOINT_ADMIN_ADDR`,
    /// default `[::]:15020`).
    pub admin_addr: SocketAddr,
    /// The port endpoints' node tunnels accept HBONE on (`WAYPOINT_UPSTREAM_HBONE_PORT`,
    /// default 15008; only a test on one loopback needs another).
    pub upstream_hbone_port: u16,
    /// The local config file (`LOCAL_XDS_PATH`): workloads, services and bound services.
    pub local_config: Option<PathBuf>,
    /// The controller's delta ADS (`XDS_ADDRESS`, root `XDS_ROOT_CA`), instead of a file.
    pub xds: Option<Target>,
    /// The controller's CA (`CA_ADDRESS`, default `XDS_ADDRESS`; root `CA_ROOT_CA`).
    pub ca: Option<Target>,
    /// The credential for both (`AUTH_TOKEN`: a file re-read per call, or the token).
    pub auth_token: String,
    /// The local CA that signs the waypoint's certificate (`LOCAL_CA_CERT`, `LOCAL_CA_KEY`).
    pub local_ca: Option<(PathBuf, PathBuf)>,
    /// Certificate lifetime asked for (`SECRET_TTL`, default 24h).
    pub cert_ttl: Duration,
    /// Load balancing (`WAYPOINT_LB_POLICY`: `round-robin`, the default, or `least-request`).
    pub lb: LbPolicy,
    /// How long a tunnel on a port of unknown protocol may stay silent before it is taken
    /// for opaque TCP (`WAYPOINT_SNIFF_TIMEOUT`, default 1s; a server-first protocol waits
    /// this long once per connection).
    pub sniff_timeout: Duration,
    pub hbone_limits: Limits,
    pub admin_limits: Limits,
    /// Fraction of `RLIMIT_NOFILE` at which listeners shed new connections.
    pub fd_headroom: f64,
    pub h2: H2Settings,
    pub pool: PoolConfig,
    pub sockets: SocketOptions,
    /// How long draining waits for requests in flight (`TERMINATION_GRACE_PERIOD_SECONDS`).
    pub drain_deadline: Duration,
    /// Worker runtimes (`WAYPOINT_WORKER_THREADS`; the binary's default is one per core). Each
    /// is a thread with a runtime of its own, its own HBONE socket (SO_REUSEPORT: the kernel
    /// spreads connections over them) and its own upstream pool, so a connection and every
    /// request on it stay on one thread. [`crate::Waypoint::start_with`] serves on the
    /// calling runtime; [`crate::Running::serve_on`] adds the others. With more than one, the
    /// port is bound with SO_REUSEPORT, so another process of the same user in the same
    /// network namespace could bind it too (in Kubernetes the namespace is the pod's own).
    pub workers: usize,
}

/// The most worker runtimes `WAYPOINT_WORKER_THREADS` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// One worker runtime per core the process may use (cgroup quota included), at least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

/// A setting that cannot be used; the message names the variable and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {var}={value:?} is not valid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Missing(String),
}

fn invalid(var: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

impl Config {
    /// The headers that authenticate calls to the controller.
    pub fn auth(&self) -> AuthHeaders {
        AuthHeaders {
            token: AuthToken::from_env_value(&self.auth_token),
            cluster_id: self.cluster_id.clone(),
        }
    }

    /// A config for `identity` with defaults everywhere else.
    pub fn new(identity: SpiffeId) -> Config {
        Config {
            identity,
            pod_name: String::new(),
            cluster_id: "Kubernetes".into(),
            hbone_addr: "[::]:15008".parse().expect("static address"),
            admin_addr: "[::]:15020".parse().expect("static address"),
            upstream_hbone_port: zmesh_core::hbone::HBONE_PORT,
            local_config: None,
            xds: None,
            ca: None,
            auth_token: DEFAULT_AUTH_TOKEN.into(),
            local_ca: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            lb: LbPolicy::RoundRobin,
            sniff_timeout: Duration::from_secs(1),
            hbone_limits: Limits::default(),
            admin_limits: Limits {
                max_connections: 64,
                max_connections_per_peer: 16,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
            },
            fd_headroom: 0.9,
            h2: H2Settings::default(),
            pool: PoolConfig::default(),
            // The waypoint's pod is not captured: no mark needed.
            sockets: SocketOptions {
                mark: None,
                ..Default::default()
            },
            drain_deadline: Duration::from_secs(5),
            workers: 1,
        }
    }

    /// Reads the environment (`env`: the process's, or a test's).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let ns = get("POD_NAMESPACE").ok_or_else(|| {
            ConfigError::Missing(
                "POD_NAMESPACE is not set: the waypoint's identity is \
                 spiffe://<TRUST_DOMAIN>/ns/<POD_NAMESPACE>/sa/<SERVICE_ACCOUNT>"
                    .into(),
            )
        })?;
        let sa = get("SERVICE_ACCOUNT").unwrap_or("default");
        let td = get("TRUST_DOMAIN").unwrap_or("cluster.local");
        let identity = SpiffeId::new(td, ns, sa)
            .map_err(|e| invalid("POD_NAMESPACE/SERVICE_ACCOUNT/TRUST_DOMAIN", ns, e))?;
        let mut cfg = Config::new(identity);
        if let Some(v) = get("POD_NAME") {
            cfg.pod_name = v.to_owned();
        }
        if let Some(v) = get("CLUSTER_ID") {
            cfg.cluster_id = v.to_owned();
        }
        let addr = |var: &'static str, v: &str| {
            v.parse::<SocketAddr>()
                .map_err(|e| invalid(var, v, format!("{e}; expected ip:port, e.g. [::]:15008")))
        };
        if let Some(v) = get("WAYPOINT_HBONE_ADDR") {
            cfg.hbone_addr = addr("WAYPOINT_HBONE_ADDR", v)?;
        }
        if let Some(v) = get("WAYPOINT_ADMIN_ADDR") {
            cfg.admin_addr = addr("WAYPOINT_ADMIN_ADDR", v)?;
        }
        if let Some(v) = get("WAYPOINT_UPSTREAM_HBONE_PORT") {
            cfg.upstream_hbone_port = v
                .parse()
                .map_err(|e| invalid("WAYPOINT_UPSTREAM_HBONE_PORT", v, e))?;
        }
        cfg.local_config = get("LOCAL_XDS_PATH").map(PathBuf::from);
        match (get("LOCAL_CA_CERT"), get("LOCAL_CA_KEY")) {
            (Some(c), Some(k)) => cfg.local_ca = Some((c.into(), k.into())),
            (None, None) => {}
            _ => {
                return Err(ConfigError::Missing(
                    "set both LOCAL_CA_CERT and LOCAL_CA_KEY (the CA certificate and key PEM \
                     files), or neither"
                        .into(),
                ));
            }
        }
        if let Some(v) = get("SECRET_TTL") {
            cfg.cert_ttl = humantime_serde::re::humantime::parse_duration(v)
                .map_err(|e| invalid("SECRET_TTL", v, e))?;
        }
        if let Some(v) = get("WAYPOINT_LB_POLICY") {
            cfg.lb = v.parse().map_err(|e| invalid("WAYPOINT_LB_POLICY", v, e))?;
        }
        if let Some(v) = get("WAYPOINT_SNIFF_TIMEOUT") {
            cfg.sniff_timeout = humantime_serde::re::humantime::parse_duration(v)
                .map_err(|e| invalid("WAYPOINT_SNIFF_TIMEOUT", v, e))?;
        }
        cfg.workers = match get("WAYPOINT_WORKER_THREADS") {
            None => default_workers(),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
                Ok(_) => {
                    return Err(invalid(
                        "WAYPOINT_WORKER_THREADS",
                        v,
                        format!("must be from 1 to {MAX_WORKERS}"),
                    ));
                }
                Err(e) => return Err(invalid("WAYPOINT_WORKER_THREADS", v, e)),
            },
        };
        if let Some(v) = get("TERMINATION_GRACE_PERIOD_SECONDS") {
            let s: u64 = v
                .parse()
                .map_err(|e| invalid("TERMINATION_GRACE_PERIOD_SECONDS", v, e))?;
            cfg.drain_deadline = Duration::from_secs(s);
        }
        if let Some(v) = get("AUTH_TOKEN") {
            cfg.auth_token = v.to_owned();
        }
        let xds_address = get("XDS_ADDRESS");
        let xds_root = get("XDS_ROOT_CA").unwrap_or(DEFAULT_ROOT_CA);
        cfg.xds = xds_address.map(|a| Target {
            var: "XDS_ADDRESS",
            address: a.to_owned(),
            root_ca: xds_root.into(),
            alt_hostname: get("ALT_XDS_HOSTNAME").map(str::to_owned),
            root_var: "XDS_ROOT_CA",
        });
        // CA_ADDRESS defaults to XDS_ADDRESS; set but empty means no remote CA.
        let (ca_var, ca_address) = match env.get("CA_ADDRESS") {
            Some(v) => ("CA_ADDRESS", Some(v.as_str()).filter(|v| !v.is_empty())),
            None => ("XDS_ADDRESS", xds_address),
        };
        cfg.ca = ca_address.map(|a| Target {
            var: ca_var,
            address: a.to_owned(),
            root_ca: get("CA_ROOT_CA").unwrap_or(xds_root).into(),
            alt_hostname: get("ALT_CA_HOSTNAME").map(str::to_owned),
            root_var: "CA_ROOT_CA",
        });
        match (&cfg.local_config, &cfg.xds) {
            (None, None) => {
                return Err(ConfigError::Missing(
                    "no config source: set XDS_ADDRESS (the controller, e.g. \
                     https://istiod.istio-system.svc:15012) or LOCAL_XDS_PATH (a local file)"
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Missing(
                    "both LOCAL_XDS_PATH and XDS_ADDRESS are set: choose one config source".into(),
                ));
            }
            _ => {}
        }
        match (&cfg.local_ca, &cfg.ca) {
            (None, None) => {
                return Err(ConfigError::Missing(
                    "no certificate source: set CA_ADDRESS (or XDS_ADDRESS) for the \
                     controller's CA, or LOCAL_CA_CERT and LOCAL_CA_KEY"
                        .into(),
                ));
            }
            (Some(_), Some(t)) => {
                return Err(ConfigError::Missing(format!(
                    "{}={:?} (the remote CA) and LOCAL_CA_CERT/LOCAL_CA_KEY are both set: unset \
                     one (CA_ADDRESS= with an empty value keeps XDS_ADDRESS for config only)",
                    t.var, t.address
                )));
            }
            _ => {}
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: [(&str, &str); 5] = [
        ("POD_NAMESPACE", "default"),
        ("SERVICE_ACCOUNT", "waypoint"),
        ("LOCAL_XDS_PATH", "/etc/waypoint.yaml"),
        ("LOCAL_CA_CERT", "/ca.pem"),
        ("LOCAL_CA_KEY", "/ca.key"),
    ];

    #[test]
    fn controller_for_config_and_certificates() {
        let e = env(&[
            ("POD_NAMESPACE", "default"),
            ("XDS_ADDRESS", "https://istiod:15012"),
            ("AUTH_TOKEN", "/var/run/token"),
        ]);
        let c = Config::from_env(&e).unwrap();
        let ca = c.ca.unwrap();
        assert_eq!(
            (ca.var, ca.address.as_str()),
            ("XDS_ADDRESS", "https://istiod:15012")
        );
        assert_eq!(ca.root_ca, PathBuf::from(DEFAULT_ROOT_CA));
        assert_eq!(c.auth_token, "/var/run/token");
    }

    #[test]
    fn reads_env() {
        let mut e = env(&BASE);
        e.insert("WAYPOINT_LB_POLICY".into(), "least-request".into());
        let c = Config::from_env(&e).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
        assert_eq!(c.lb, LbPolicy::LeastRequest);
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.workers, default_workers());
        e.insert("WAYPOINT_WORKER_THREADS".into(), "3".into());
        assert_eq!(Config::from_env(&e).unwrap().workers, 3);
    }

    #[test]
    fn worker_threads_from_one_to_the_bound() {
        for bad in ["0", "1025", "many", "-1"] {
            let mut e = env(&BASE);
            e.insert("WAYPOINT_WORKER_THREADS".into(), bad.into());
            let err = Config::from_env(&e).unwrap_err().to_string();
            assert!(
                err.contains("WAYPOINT_WORKER_THREADS") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let mut e = env(&BASE);
        e.insert("WAYPOINT_LB_POLICY".into(), "random".into());
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("WAYPOINT_LB_POLICY"), "{err}");
        let mut e = env(&BASE);
        e.remove("LOCAL_CA_KEY");
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("LOCAL_CA_KEY"), "{err}");
        let mut e = env(&BASE);
        e.remove("POD_NAMESPACE");
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("POD_NAMESPACE"), "{err}");
        let mut e = env(&BASE);
        e.insert("XDS_ADDRESS".into(), "https://istiod:15012".into());
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("choose one"), "{err}");
        e.remove("LOCAL_XDS_PATH");
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("LOCAL_CA_CERT"), "{err}");
        e.insert("CA_ADDRESS".into(), String::new());
        let c = Config::from_env(&e).unwrap();
        assert_eq!(c.xds.unwrap().address, "https://istiod:15012");
        assert!(c.ca.is_none());
        let mut e = env(&BASE);
        e.insert("WAYPOINT_HBONE_ADDR".into(), "15008".into());
        let err = Config::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("WAYPOINT_HBONE_ADDR"), "{err}");
    }
}
