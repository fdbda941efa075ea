//! Waypoints in the routing model: where a Service's or a workload's waypoint is
//! (`GatewayAddress`), and [`State::route`], which sends traffic for what a waypoint fronts to
//! the waypoint.
//!
//! Rules (upstream ztunnel's, istio/ztunnel @ `62d82653` `src/proxy/outbound.rs`):
//! - traffic addressed to a Service VIP goes to the Service's waypoint when it has one;
//!   traffic addressed to a workload's IP goes to the workload's waypoint when it has one (the
//!   controller publishes a workload's waypoint only for waypoints that take workload traffic,
//!   `istio.io/waypoint-for: workload|all`);
//! - the waypoint is reached over HBONE at one of its healthy endpoints (the workloads behind
//!   the waypoint's Service, or the workload with that IP) on `hbone_mtls_port`, its identity
//!   verified; the CONNECT names the original destination (`VIP:port` or `pod IP:port`);
//! - traffic from the waypoint itself is never sent back to it;
//! - a waypoint that cannot be reached (its Service unknown, no healthy endpoint) refuses the
//!   traffic: [`Resolved::WaypointNotReady`]. It is never sent around the waypoint.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{HealthStatus, NetworkAddress, Resolved, State, Workload};
use crate::identity::SpiffeId;

/// Istio's default HBONE port of a waypoint.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

fn default_hbone_port() -> u16 {
    DEFAULT_HBONE_PORT
}

/// Where a waypoint is reached (`istio.workload.GatewayAddress`), in upstream ztunnel's
/// local-config shape: `{destination: "<network>/<ip>" | {namespace, hostname}, hboneMtlsPort}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

/// The waypoint's address: its Service's VIP (or a workload IP), or its Service's hostname.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

/// A Service named by namespace and hostname.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            GatewayDestination::Address(a) => write!(f, "{a}:{}", self.hbone_mtls_port),
            GatewayDestination::Hostname(h) => {
                write!(f, "{}/{}:{}", h.namespace, h.hostname, self.hbone_mtls_port)
            }
        }
    }
}

/// Traffic for a waypoint: where to open HBONE, whom to expect, what to ask for.
#[derive(Clone, Debug)]
pub struct WaypointUpstream {
    /// The waypoint endpoint chosen.
    pub workload: Arc<Workload>,
    /// `<waypoint endpoint IP>:<hbone_mtls_port>`: where the HBONE connection goes.
    pub hbone: SocketAddr,
    /// Identities the waypoint may present: the endpoint's, plus its Service's SANs.
    pub identities: Vec<SpiffeId>,
    /// The CONNECT target: the original destination (`VIP:port` or `pod IP:port`).
    pub target: SocketAddr,
    /// The Service the traffic was addressed to (service-addressed traffic).
    pub service: Option<Arc<super::Service>>,
    /// The waypoint, for logs and metrics.
    pub waypoint: GatewayAddress,
}

impl State {
    /// Like [`State::resolve`], but traffic for what a waypoint fronts goes to the waypoint
    /// ([`Resolved::Waypoint`]), or is refused while the waypoint cannot be reached
    /// ([`Resolved::WaypointNotReady`]). `source` is the workload the traffic comes from: a
    /// waypoint's own traffic is not sent back to it.
    pub fn route(
        &self,
        dst: SocketAddr,
        source: Option<&Workload>,
        mut pick: impl FnMut(usize) -> usize,
    ) -> Resolved {
        let (waypoint, service) = if let Some(svc) = self.by_vip.get(&dst.ip()) {
            (svc.waypoint.as_ref(), Some(svc))
        } else if let Some(w) = self.by_ip.get(&dst.ip()) {
            (w.waypoint.as_deref(), None)
        } else {
            (None, None)
        };
        let Some(waypoint) = waypoint else {
            return self.resolve(dst, pick);
        };
        let endpoints = self.waypoint_endpoints(waypoint);
        if source.is_some_and(|s| endpoints.iter().any(|e| same_workload(e, s))) {
            return self.resolve(dst, pick);
        }
        let healthy =
            |w: &&Arc<Workload>| w.status == HealthStatus::Healthy && !w.workload_ips.is_empty();
        let n = endpoints.iter().filter(healthy).count();
        if n == 0 {
            return Resolved::WaypointNotReady {
                destination: service.map_or_else(|| dst.to_string(), |s| s.key()),
                waypoint: waypoint.to_string(),
                reason: if endpoints.is_empty() {
                    "the waypoint is unknown or has no endpoint"
                } else {
                    "the waypoint has no healthy endpoint"
                },
            };
        }
        let Some(w) = endpoints.iter().filter(healthy).nth(pick(n) % n) else {
            unreachable!("{n} healthy endpoints were counted in the same snapshot");
        };
        let mut identities: Vec<SpiffeId> = w.identity().into_iter().collect();
        if let Some(s) = self.waypoint_service(waypoint) {
            identities.extend(
                s.subject_alt_names
                    .iter()
                    .filter_map(|s| s.parse::<SpiffeId>().ok()),
            );
        }
        Resolved::Waypoint(WaypointUpstream {
            workload: w.clone(),
            hbone: SocketAddr::new(w.workload_ips[0], waypoint.hbone_mtls_port),
            identities,
            target: dst,
            service: service.cloned(),
            waypoint: waypoint.clone(),
        })
    }

    /// The waypoint's Service, when it is addressed by one.
    fn waypoint_service(&self, waypoint: &GatewayAddress) -> Option<&Arc<super::Service>> {
        match &waypoint.destination {
            GatewayDestination::Address(a) => self.by_vip.get(&a.address),
            GatewayDestination::Hostname(h) => self
                .services
                .get(&format!("{}/{}", h.namespace, h.hostname)),
        }
    }

    /// Every workload that is the waypoint: the endpoints of its Service, or the workload at
    /// its address.
    fn waypoint_endpoints(&self, waypoint: &GatewayAddress) -> &[Arc<Workload>] {
        if let Some(svc) = self.waypoint_service(waypoint) {
            return self.endpoints(&svc.key());
        }
        match &waypoint.destination {
            GatewayDestination::Address(a) => {
                self.by_ip.get(&a.address).map_or(&[], std::slice::from_ref)
            }
            GatewayDestination::Hostname(_) => &[],
        }
    }

    /// Whether `peer` (an inbound connection's authenticated identity, from `ip`) is the
    /// waypoint of `dst`: one of its endpoints at that IP with that identity.
    pub fn from_waypoint(&self, dst: &Workload, peer: &SpiffeId, ip: IpAddr) -> bool {
        let Some(waypoint) = &dst.waypoint else {
            return false;
        };
        self.waypoint_endpoints(waypoint)
            .iter()
            .any(|w| w.workload_ips.contains(&ip) && w.identity().is_ok_and(|id| id == *peer))
    }
}

fn same_workload(a: &Workload, b: &Workload) -> bool {
    a.namespace == b.namespace && a.name == b.name && a.uid == b.uid
}

#[cfg(test)]
mod tests;
