//! L4 AuthorizationPolicy on inbound connections.
//!
//! - [`Denial`]: why a connection is denied. The decision when a connection arrives, before
//!   the app is connected, is `super::decide` (shared by HBONE and plaintext inbound).
//! - [`Registry`]: every open inbound connection is registered for its lifetime (source,
//!   identity, destination, the proxied workload) with a cancellation handle. When a new
//!   config is published (`crate::state::Publisher`) with other policies, every registered connection is
//!   checked again against them and those now denied are closed; when only workloads changed,
//!   only the connections of a workload whose namespace or selector policies changed are.
//!   Registration happens before the connection's own decision reads the config, so a change
//!   published in between is never missed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use zmesh_core::identity::SpiffeId;
use zmesh_core::policy::{Connection, Decision};
use zmesh_core::state::{State, Workload};

use crate::state::Publisher;

/// Why a connection is denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// This DENY policy (`<namespace>/<name>`) matched.
    Policy(String),
    /// ALLOW policies apply to the destination and none matched.
    NoAllowMatched,
    /// The destination workload is not in the config, so no policy can be evaluated.
    UnknownDestination,
}

impl Denial {
    /// The deciding policy, for the access log.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Denial::Policy(p) => Some(p),
            _ => None,
        }
    }

    /// The denial in `decision`, if it denies.
    pub fn of(decision: &Decision) -> Option<Denial> {
        match (&decision.policy, decision.allowed) {
            (_, true) => None,
            (Some(p), false) => Some(Denial::Policy(p.clone())),
            (None, false) => Some(Denial::NoAllowMatched),
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Policy(p) => write!(f, "DENY policy {p} matches"),
            Denial::NoAllowMatched => {
                f.write_str("ALLOW policies apply to the destination and none matches")
            }
            Denial::UnknownDestination => f.write_str(
                "the destination workload is not in the mesh config (no policy can be evaluated)",
            ),
        }
    }
}

/// What policy looks at in an inbound connection, kept for its lifetime.
#[derive(Clone, Debug)]
pub struct Peer {
    pub src_ip: IpAddr,
    /// The client certificate's SPIFFE id (HBONE); `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    /// The destination (`ip:port` of the local app).
    pub dst: SocketAddr,
}

impl Peer {
    /// What policy evaluation reads of it.
    pub(super) fn connection(&self) -> Connection<'_> {
        Connection {
            src_ip: self.src_ip,
            src_identity: self.src_identity.as_ref(),
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
        }
    }
}

/// One registered connection.
#[derive(Debug)]
struct Entry {
    peer: Peer,
    cancel: CancellationToken,
    /// Why it was closed, set before `cancel`.
    revoked_by: Mutex<Option<Denial>>,
}

/// A destination workload's namespace and selector policies, as a re-check last saw them;
/// `None`: unknown to the config.
type Binding = Option<(String, Box<[String]>)>;

fn binding(w: Option<&Workload>) -> Binding {
    w.map(|w| (w.namespace.clone(), w.authorization_policies.clone()))
}

/// The open connections of one proxied workload.
#[derive(Debug, Default)]
struct Group {
    /// What the last re-check saw; `None` until one ran since the group appeared.
    seen: Option<Binding>,
    conns: HashMap<u64, Arc<Entry>>,
}

/// The open inbound connections of every proxy of this ztunnel, by proxied workload
/// (`<namespace>/<name>/<service account>`).
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    groups: Mutex<HashMap<String, Group>>,
    policy_generation: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered connection; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    workload: String,
    id: u64,
    entry: Arc<Entry>,
}

impl Registration {
    pub fn peer(&self) -> &Peer {
        &self.entry.peer
    }

    /// Completes when a policy change denies the connection, with why.
    pub async fn revoked(&self) -> Denial {
        self.entry.cancel.cancelled().await;
        lock(&self.entry.revoked_by)
            .clone()
            .unwrap_or(Denial::UnknownDestination)
    }

    /// Whether a policy change already denied it.
    pub fn is_revoked(&self) -> bool {
        self.entry.cancel.is_cancelled()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut groups = lock(&self.registry.groups);
        if let Some(g) = groups.get_mut(&self.workload) {
            g.conns.remove(&self.id);
            if g.conns.is_empty() {
                groups.remove(&self.workload);
            }
        }
    }
}

impl Registry {
    /// Registers a connection to the workload `workload_key` for as long as the returned
    /// handle lives. Register before reading the config the connection is decided with.
    pub fn register(self: &Arc<Self>, workload_key: &str, peer: Peer) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            peer,
            cancel: CancellationToken::new(),
            revoked_by: Mutex::new(None),
        });
        lock(&self.groups)
            .entry(workload_key.to_owned())
            .or_default()
            .conns
            .insert(id, entry.clone());
        Registration {
            registry: self.clone(),
            workload: workload_key.to_owned(),
            id,
            entry,
        }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        lock(&self.groups).values().map(|g| g.conns.len()).sum()
    }

    /// Whether no connection is registered now.
    pub fn is_empty(&self) -> bool {
        lock(&self.groups).is_empty()
    }

    /// Checks open connections against `state`: all of them when `policies_changed`, else
    /// only those of a workload whose namespace or selector policies changed since the last
    /// re-check. Closes (cancels) those now denied, logging each; returns how many.
    pub fn recheck(&self, state: &State, policies_changed: bool) -> usize {
        // Decide outside the lock: registrations and drops go on meanwhile.
        let mut due: Vec<(Arc<Workload>, Vec<Arc<Entry>>)> = Vec::new();
        let mut unknown: Vec<Arc<Entry>> = Vec::new();
        {
            let mut groups = lock(&self.groups);
            for (key, g) in groups.iter_mut() {
                let w = state.workload_by_key(key);
                let now = binding(w.map(|w| &**w));
                if !policies_changed && g.seen.as_ref() == Some(&now) {
                    continue;
                }
                g.seen = Some(now);
                let conns = g.conns.values().cloned();
                match w {
                    Some(w) => due.push((w.clone(), conns.collect())),
                    None => unknown.extend(conns),
                }
            }
        }
        let mut closed = 0;
        for (w, conns) in due {
            for e in conns {
                if let Some(d) = Denial::of(&state.authorize(&w, &e.peer.connection())) {
                    closed += usize::from(revoke(&e, d, &w.key()));
                }
            }
        }
        for e in unknown {
            closed += usize::from(revoke(&e, Denial::UnknownDestination, "-"));
        }
        closed
    }
}

/// Closes one connection; false if it already was.
fn revoke(e: &Entry, denial: Denial, workload: &str) -> bool {
    if e.cancel.is_cancelled() {
        return false;
    }
    let identity = e.peer.src_identity.as_ref().map(|i| i.to_string());
    tracing::warn!(
        target: "access",
        direction = "inbound",
        src.addr = %e.peer.src_ip,
        src.identity = identity.as_deref().unwrap_or("-"),
        dst.addr = %e.peer.dst,
        dst.workload = workload,
        policy = denial.policy().map(tracing::field::display),
        "policy change: closing a connection that is now denied: {denial}"
    );
    *lock(&e.revoked_by) = Some(denial);
    e.cancel.cancel();
    true
}

/// Re-checks `registry` whenever `publisher` publishes a state, until `stop`.
pub async fn recheck_on_change(
    publisher: Publisher,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = publisher.changed() => {}
        }
        // The generation is bumped after the store: a bump seen here comes with its state.
        let generation = publisher.policy_generation();
        let state = publisher.current();
        let policies_changed = registry
            .policy_generation
            .swap(generation, Ordering::SeqCst)
            != generation;
        let closed = registry.recheck(&state, policies_changed);
        if policies_changed {
            tracing::info!(
                target: "policy",
                policies = state.policies().len(),
                open = registry.len(),
                closed,
                "policies changed: open inbound connections re-checked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arc_swap::ArcSwap;
    use zmesh_core::state::LocalConfig;

    fn state(yaml: &str) -> State {
        State::from_local(LocalConfig::parse(yaml).unwrap()).unwrap()
    }

    const WORKLOADS: &str = "workloads:\n- {name: server, namespace: default, serviceAccount: server, workloadIps: [10.0.0.2]}\n";
    const KEY: &str = "default/server/server";

    fn deny_client() -> String {
        format!(
            "{WORKLOADS}policies:\n- name: deny-client\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [!Exact cluster.local/ns/default/sa/client]\n"
        )
    }

    fn peer(sa: Option<&str>) -> Peer {
        Peer {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: sa.map(|sa| SpiffeId::new("cluster.local", "default", sa).unwrap()),
            dst: "10.0.0.2:8080".parse().unwrap(),
        }
    }

    #[test]
    fn a_policy_change_closes_only_connections_now_denied() {
        let reg = Arc::new(Registry::default());
        let client = reg.register(KEY, peer(Some("client")));
        let other = reg.register(KEY, peer(Some("other")));
        let plaintext = reg.register(KEY, peer(None));
        assert_eq!(reg.len(), 3);
        assert_eq!(reg.recheck(&state(WORKLOADS), true), 0);
        assert_eq!(reg.recheck(&state(&deny_client()), true), 1);
        assert!(client.is_revoked() && !other.is_revoked() && !plaintext.is_revoked());
        let why = futures::executor::block_on(client.revoked());
        assert_eq!(why, Denial::Policy("default/deny-client".into()));
        // Already closed: not counted twice.
        assert_eq!(reg.recheck(&state(&deny_client()), true), 0);
        drop((client, other, plaintext));
        assert!(reg.is_empty());
    }

    #[test]
    fn without_a_policy_change_only_a_rebound_workload_is_checked() {
        let reg = Arc::new(Registry::default());
        let sel = format!(
            "{}policies:\n- name: deny-client\n  namespace: default\n  scope: WorkloadSelector\n  action: Deny\n  rules:\n  - - - principals: [!Exact cluster.local/ns/default/sa/client]\n",
            WORKLOADS.replace(
                "[10.0.0.2]}",
                "[10.0.0.2], authorizationPolicies: [default/deny-client]}"
            )
        );
        let unbound = sel.replace(", authorizationPolicies: [default/deny-client]", "");
        let c = reg.register(KEY, peer(Some("client")));
        assert_eq!(reg.recheck(&state(&unbound), true), 0);
        // Same policies, same binding: nothing is evaluated, nothing closed.
        assert_eq!(reg.recheck(&state(&unbound), false), 0);
        // The workload now lists the selector policy: its connections are checked.
        assert_eq!(reg.recheck(&state(&sel), false), 1);
        assert!(c.is_revoked());
    }

    #[test]
    fn a_workload_gone_from_the_config_loses_its_connections() {
        let reg = Arc::new(Registry::default());
        let c = reg.register(KEY, peer(Some("client")));
        assert_eq!(reg.recheck(&state("workloads: []\n"), true), 1);
        assert!(c.is_revoked());
        assert_eq!(
            futures::executor::block_on(c.revoked()),
            Denial::UnknownDestination
        );
    }

    #[tokio::test]
    async fn publishing_other_policies_wakes_the_recheck() {
        let publisher = Publisher::new(Arc::new(ArcSwap::from_pointee(state(WORKLOADS))));
        let reg = Arc::new(Registry::default());
        let stop = CancellationToken::new();
        tokio::spawn(recheck_on_change(
            publisher.clone(),
            reg.clone(),
            stop.clone(),
        ));
        let c = reg.register(KEY, peer(Some("client")));
        // Same policies (none): nothing to close.
        publisher.publish(state(WORKLOADS), None);
        publisher.publish(state(&deny_client()), None);
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), c.revoked())
            .await
            .expect("the connection was closed");
        assert_eq!(why.policy(), Some("default/deny-client"));
        stop.cancel();
    }
}
