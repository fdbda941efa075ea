//! The inbound allow/deny decision, one pure function that HBONE inbound (15008, after TLS and
//! the CONNECT checks) and plaintext inbound (15006, after the original destination was read)
//! share: [`decide`]. It reads one config snapshot and the connection's facts, and does no
//! I/O: the callers answer, record and log (the dry-run lines: [`log_dry_run`]).
//!
//! In order:
//! 1. The destination must be this workload's address: the one the connection arrived on, or
//!    one of the workload's IPs in the config. Anything else is refused and never relayed
//!    (plaintext capture matches any destination; a CONNECT names any authority).
//! 2. The workload must be in the config: without it no policy can be evaluated, so the
//!    connection is denied (fail closed).
//! 3. AuthorizationPolicy (`zmesh_core::policy`): DENY before ALLOW; ALLOW policies that apply
//!    and none matching deny; dry-run policies never decide. A peer without a verified
//!    identity (plaintext, or a certificate without a SPIFFE id) matches no identity
//!    condition, so an ALLOW that names principals or namespaces denies it.
//!
//! A waypoint-bound workload reached not through its waypoint is admitted, as upstream
//! ztunnel does (see `inbound.rs`): making traversal mandatory is an ALLOW policy's job.

use std::net::IpAddr;
use std::sync::Arc;

use zmesh_core::policy::{Action, DryRunVerdict};
use zmesh_core::state::{State, Workload};

use super::policy::{Denial, Peer};

/// What an inbound connection is decided on.
#[derive(Clone, Copy, Debug)]
pub struct InboundFacts<'a> {
    /// The proxied workload's key in the config (`<namespace>/<name>/<service account>`).
    pub workload_key: &'a str,
    /// The local address the connection arrived on (in the workload's network namespace),
    /// when it could be read.
    pub arrived_on: Option<IpAddr>,
    /// Source, verified identity (`None` for plaintext) and destination.
    pub peer: &'a Peer,
}

/// What happens to an inbound connection.
#[derive(Debug, PartialEq)]
pub enum Outcome<'s> {
    /// Delivered to `workload`; `policy`: the ALLOW policy that admitted it, if one did.
    Admit {
        workload: &'s Arc<Workload>,
        policy: Option<String>,
    },
    /// The destination is not this workload's address: refused, never relayed.
    NotLocal,
    /// Denied. `workload`: the destination as the config knows it; `None` when it does not
    /// (then `denial` is [`Denial::UnknownDestination`]).
    Deny {
        workload: Option<&'s Arc<Workload>>,
        denial: Denial,
    },
}

/// [`decide`]'s answer.
#[derive(Debug)]
pub struct InboundDecision<'s> {
    pub outcome: Outcome<'s>,
    /// The dry-run policies that apply, with whether they matched (they never decide).
    pub dry_run: Vec<DryRunVerdict>,
}

/// Decides an inbound connection from `facts` and one config snapshot (see the module's
/// documentation for the rules). Allocates only what the policy evaluation does (the
/// deciding policy's key, dry-run verdicts).
pub fn decide<'s>(facts: &InboundFacts<'_>, state: &'s State) -> InboundDecision<'s> {
    let local = state.workload_by_key(facts.workload_key);
    let dst = facts.peer.dst.ip();
    let ours =
        facts.arrived_on == Some(dst) || local.is_some_and(|w| w.workload_ips.contains(&dst));
    let outcome = if !ours {
        Outcome::NotLocal
    } else if let Some(w) = local {
        let decision = state.authorize(w, &facts.peer.connection());
        let outcome = match Denial::of(&decision) {
            Some(denial) => Outcome::Deny {
                workload: Some(w),
                denial,
            },
            None => Outcome::Admit {
                workload: w,
                policy: decision.policy,
            },
        };
        return InboundDecision {
            outcome,
            dry_run: decision.dry_run,
        };
    } else {
        Outcome::Deny {
            workload: None,
            denial: Denial::UnknownDestination,
        }
    };
    InboundDecision {
        outcome,
        dry_run: Vec::new(),
    }
}

/// Logs what each dry-run policy of `decision` would have done (info, target `policy`).
pub fn log_dry_run(decision: &InboundDecision<'_>, peer: &Peer, direction: &'static str) {
    let enforced = match decision.outcome {
        Outcome::Admit { .. } => "allow",
        _ => "deny",
    };
    for v in &decision.dry_run {
        // A matching DENY would deny; a matching ALLOW would allow; an ALLOW that does not
        // match would leave the connection without an ALLOW (denied, unless another allows);
        // a DENY that does not match would not deny.
        let would = match (v.action, v.matched) {
            (Action::Deny, true) | (Action::Allow, false) => "deny",
            (Action::Allow, true) | (Action::Deny, false) => "allow",
        };
        let identity = peer.src_identity.as_ref().map(|i| i.to_string());
        tracing::info!(
            target: "policy",
            direction,
            src.addr = %peer.src_ip,
            src.identity = identity.as_deref().unwrap_or("-"),
            dst.addr = %peer.dst,
            policy = %v.policy,
            action = ?v.action,
            matched = v.matched,
            enforced,
            "dry-run policy {} would {would}",
            v.policy
        );
    }
}

#[cfg(test)]
mod tests;
