//! The two steps that put a pod into the mesh and take it out, behind a small trait so the
//! API can be tested without root: [`Dataplane`], and the real one, [`RulesAndZds`]:
//! redirection rules in the pod netns ([`crate::rules`]) plus the hand-over to ztunnel
//! ([`ZdsServer`]).

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;

use tracing::warn;
use zmesh_core::zds::{ZdsError, ZdsServer};

use super::state::PodRecord;
use crate::rules::{self, Backend, HostConfig, RuleConfig, RulesError};

/// Why a pod could not be enrolled or released.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The redirection rules could not be installed or removed.
    #[error("redirection rules in the pod's netns: {0}")]
    Rules(#[from] RulesError),
    /// ztunnel did not take (or let go of) the pod.
    #[error("handing the pod to ztunnel: {0}")]
    Zds(#[from] ZdsError),
    /// The blocking work could not run to its end.
    #[error("the rules worker thread failed: {0}")]
    Worker(String),
}

/// Puts pods into the mesh and takes them out.
pub trait Dataplane: Send + Sync + 'static {
    /// Captures the pod's traffic and hands it to ztunnel; returns once ztunnel has
    /// acknowledged it. `netns` is the open file of `pod.netns`. On error, the caller
    /// rolls back with [`Dataplane::unenrol`].
    fn enrol(
        &self,
        pod: &PodRecord,
        netns: &File,
    ) -> impl Future<Output = Result<(), DataplaneError>> + Send;

    /// Releases the pod: tells ztunnel, and removes the rules if the netns still exists.
    /// Idempotent; attempts every step and returns the first failure.
    fn unenrol(&self, pod: &PodRecord) -> impl Future<Output = Result<(), DataplaneError>> + Send;

    /// Whether ADDs can be served now (a ztunnel is connected).
    fn ready(&self) -> bool;
}

/// The real dataplane: [`rules::apply`] / [`rules::remove`] and a [`ZdsServer`].
#[derive(Clone)]
pub struct RulesAndZds {
    zds: ZdsServer,
    backend: Backend,
    rules: RuleConfig,
    probes: Option<ProbeSnat>,
}

/// Host-side kubelet probe SNAT: node-local TCP to an enrolled pod leaves from the probe
/// address, which the pod's rules let through to the app instead of ztunnel.
#[derive(Clone, Debug)]
struct ProbeSnat {
    /// The node's network namespace (`None`: the agent's own, as on a real node).
    node_netns: Option<std::path::PathBuf>,
    cfg: HostConfig,
}

impl std::fmt::Debug for RulesAndZds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesAndZds")
            .field("zds", &self.zds.path())
            .field("backend", &self.backend)
            .field("rules", &self.rules)
            .finish()
    }
}

impl RulesAndZds {
    /// A dataplane writing rules with `backend` and `rules` (its `ipv6` is switched on per pod
    /// that has an IPv6 address) and handing pods to `zds`.
    pub fn new(zds: ZdsServer, backend: Backend, rules: RuleConfig) -> RulesAndZds {
        RulesAndZds {
            zds,
            backend,
            rules,
            probes: None,
        }
    }

    /// Installs the host-side probe SNAT in `node_netns` (`None`: the agent's own network
    /// namespace) and keeps each enrolled pod's addresses in it from now on.
    pub fn with_probe_snat(
        mut self,
        node_netns: Option<std::path::PathBuf>,
        cfg: HostConfig,
    ) -> Result<RulesAndZds, RulesError> {
        rules::apply_host(node_netns.as_deref(), self.backend, &cfg)?;
        self.probes = Some(ProbeSnat { node_netns, cfg });
        Ok(self)
    }

    /// Adds (`add`) or removes the pod's addresses from the probe SNAT set.
    async fn probe_snat(&self, pod: &PodRecord, add: bool) -> Result<(), DataplaneError> {
        let Some(p) = self.probes.clone() else {
            return Ok(());
        };
        let (backend, ips) = (self.backend, pod.ips.clone());
        tokio::task::spawn_blocking(move || {
            for ip in ips.into_iter().filter(|ip| ip.is_ipv4() || p.cfg.ipv6) {
                if add {
                    rules::add_probe_pod(p.node_netns.as_deref(), backend, &p.cfg, ip)?;
                } else {
                    rules::remove_probe_pod(p.node_netns.as_deref(), backend, &p.cfg, ip)?;
                }
            }
            Ok::<_, RulesError>(())
        })
        .await
        .map_err(|e| DataplaneError::Worker(e.to_string()))?
        .map_err(DataplaneError::from)
    }

    /// The ZDS server.
    pub fn zds(&self) -> &ZdsServer {
        &self.zds
    }

    /// The rule configuration for one pod.
    fn config_for(&self, pod: &PodRecord) -> RuleConfig {
        RuleConfig {
            ipv6: self.rules.ipv6 || pod.ips.iter().any(std::net::IpAddr::is_ipv6),
            ..self.rules.clone()
        }
    }

    async fn blocking(
        &self,
        pod: &PodRecord,
        f: fn(Option<&std::path::Path>, Backend, &RuleConfig) -> Result<(), RulesError>,
    ) -> Result<(), DataplaneError> {
        let (netns, backend, cfg) = (pod.netns.clone(), self.backend, self.config_for(pod));
        tokio::task::spawn_blocking(move || f(Some(&netns), backend, &cfg))
            .await
            .map_err(|e| DataplaneError::Worker(e.to_string()))?
            .map_err(DataplaneError::from)
    }
}

impl Dataplane for RulesAndZds {
    async fn enrol(&self, pod: &PodRecord, netns: &File) -> Result<(), DataplaneError> {
        self.blocking(pod, rules::apply).await?;
        self.probe_snat(pod, true).await?;
        super::fault::pause_add(super::fault::AddPoint::AfterRules).await;
        self.zds
            .add(&pod.uid, pod.workload_info(), netns.as_fd())
            .await?;
        Ok(())
    }

    async fn unenrol(&self, pod: &PodRecord) -> Result<(), DataplaneError> {
        let zds = self.zds.del(&pod.uid).await.map_err(DataplaneError::from);
        if let Err(e) = &zds {
            warn!(pod = %pod.key(), uid = pod.uid, "{e}");
        }
        let probes = self.probe_snat(pod, false).await;
        let rules = if pod.netns.exists() {
            self.blocking(pod, rules::remove).await
        } else {
            Ok(())
        };
        zds.and(probes).and(rules)
    }

    fn ready(&self) -> bool {
        self.zds.connected() > 0
    }
}
