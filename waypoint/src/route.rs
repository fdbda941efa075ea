//! The waypoint's router: Gateway API HTTPRoute/GRPCRoute rules attached to a bound Service
//! (GAMMA), as the controller sends them in `zmesh.waypoint.v1.ServiceRoutes` — already
//! flattened to (rule, match) pairs and sorted in the spec's precedence order. Here they are
//! compiled once per config (regexes included; a resource that does not compile is refused
//! whole) and a request takes the FIRST applying rule that matches.
//!
//! Which rules apply (GEP-1294 namespace boundaries): rules for the request's Service port or
//! for all ports; of those, the consumer rules of the caller's namespace (its SPIFFE id) when
//! there are any, else the producer rules. Rules apply but none matches: 404. No rule applies:
//! the request goes to the Service itself, as without routes.

mod compile;
pub mod filter;
pub mod local;
pub mod matching;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::bound::Binding;
use filter::Filter;
use matching::{Match, PathMatch, RequestView};

pub use compile::compile;

/// Why a `ServiceRoutes` resource was refused (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("routes {resource}: {field}: {reason}")]
    Invalid {
        resource: String,
        /// The field, e.g. `rules[3].match.path.value` (route `default/r` rule 0).
        field: String,
        reason: String,
    },
}

/// A backend the rule may pick.
#[derive(Debug, Clone)]
pub struct Backend {
    pub weight: u32,
    /// The Service (as a binding, for the upstream side), or why it did not resolve.
    pub target: Result<Binding, String>,
    pub filters: Vec<Filter>,
}

/// HTTPRouteTimeouts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

/// HTTPRouteRetry.
#[derive(Debug, Clone, Default)]
pub struct Retry {
    pub codes: Vec<StatusCode>,
    /// Retries after the first attempt.
    pub attempts: u32,
    pub backoff: Duration,
}

/// One compiled (rule, match) pair.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `HTTPRoute default/name rule 0 match 0`, for logs.
    pub name: Arc<str>,
    /// 0: every port.
    pub port: u16,
    /// None: a producer rule.
    pub consumer_namespace: Option<String>,
    pub matcher: Match,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    total_weight: u64,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

impl Rule {
    /// The matched PathPrefix (for `ReplacePrefixMatch`), empty when the rule has none.
    pub fn matched_prefix(&self) -> &str {
        match &self.matcher.path {
            Some(PathMatch::Prefix(p)) => p,
            _ => "",
        }
    }

    /// A backend by weight (weight 0 never); None when every weight is 0.
    pub fn pick(&self) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut n = rand::random_range(0..self.total_weight);
        for b in &self.backends {
            if n < u64::from(b.weight) {
                return Some(b);
            }
            n -= u64::from(b.weight);
        }
        None
    }
}

/// What the router decided for a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No rule applies: proxy to the Service.
    NoRoute,
    /// Rules apply, none matched: 404.
    NotFound,
    Rule(&'a Rule),
}

/// The compiled routes of one Service.
#[derive(Debug, Default)]
pub struct ServiceRoutes {
    /// `<namespace>/<hostname>` of the parent Service.
    pub key: String,
    pub rules: Vec<Rule>,
    /// `(namespace, port)` pairs that have consumer rules (port 0: every port).
    consumers: HashSet<(String, u16)>,
    /// Ports with producer rules (0: every port).
    producer_ports: HashSet<u16>,
    /// Rules whose Exact or PathPrefix path fixes the request path's first segment, by that
    /// segment (indexes in precedence order): only these and `any_path` can match a path.
    by_segment: HashMap<String, Vec<u32>>,
    /// The other rules (regex path, no path, prefix `/`), in precedence order.
    any_path: Vec<u32>,
}

/// The first segment of a path: `a` for `/a/b`, `/a` or `/a?x`; empty for `/`.
fn first_segment(path: &str) -> &str {
    let p = path.strip_prefix('/').unwrap_or(path);
    p.split(['/', '?']).next().unwrap_or("")
}

impl ServiceRoutes {
    /// Builds the index over rules already in precedence order.
    pub fn new(key: String, rules: Vec<Rule>) -> ServiceRoutes {
        let mut consumers = HashSet::new();
        let mut producer_ports = HashSet::new();
        let mut by_segment: HashMap<String, Vec<u32>> = HashMap::new();
        let mut any_path = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            match &r.matcher.path {
                Some(PathMatch::Exact(p)) => by_segment
                    .entry(first_segment(p).to_owned())
                    .or_default()
                    .push(i),
                Some(PathMatch::Prefix(p)) if !p.is_empty() => by_segment
                    .entry(first_segment(p).to_owned())
                    .or_default()
                    .push(i),
                _ => any_path.push(i),
            }
            match &r.consumer_namespace {
                Some(ns) => {
                    consumers.insert((ns.clone(), r.port));
                }
                None => {
                    producer_ports.insert(r.port);
                }
            }
        }
        ServiceRoutes {
            key,
            rules,
            consumers,
            producer_ports,
            by_segment,
            any_path,
        }
    }

    /// The decision for a request on Service port `port` from a caller in `caller_ns`.
    pub fn select<'a>(
        &'a self,
        port: u16,
        caller_ns: Option<&str>,
        req: &RequestView<'_>,
    ) -> Decision<'a> {
        let consumer = caller_ns.filter(|ns| {
            // Without allocating: look the pair up by scanning only when consumer rules exist.
            !self.consumers.is_empty()
                && self
                    .consumers
                    .iter()
                    .any(|(n, p)| n == ns && (*p == 0 || *p == port))
        });
        if consumer.is_none()
            && !self.producer_ports.contains(&0)
            && !self.producer_ports.contains(&port)
        {
            return Decision::NoRoute;
        }
        // Some rule applies (checked above): a request no rule matches gets 404. Only the
        // rules that can match this path's first segment are looked at, in precedence order.
        let keyed = self
            .by_segment
            .get(first_segment(req.path))
            .map_or(&[][..], Vec::as_slice);
        let (mut a, mut b) = (keyed.iter().peekable(), self.any_path.iter().peekable());
        loop {
            let i = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => return Decision::NotFound,
            };
            let r = &self.rules[*i.expect("peeked") as usize];
            if (r.port == 0 || r.port == port)
                && r.consumer_namespace.as_deref() == consumer
                && r.matcher.matches(req)
            {
                return Decision::Rule(r);
            }
        }
    }
}

#[cfg(test)]
mod tests;
