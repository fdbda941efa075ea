//! L4 authorization: Istio's AuthorizationPolicy as ztunnel enforces it on every inbound
//! connection (`istio.security.Authorization`, upstream ztunnel's `rbac.rs` semantics).
//!
//! # Which policies apply
//! For a connection to a destination workload: every `GLOBAL` policy (whatever its
//! namespace), the `NAMESPACE` policies of the destination's namespace, and the
//! `WORKLOAD_SELECTOR` policies the destination workload names in its
//! `authorization_policies` (keys `"<namespace>/<name>"`; keys naming no known policy, or a
//! policy of another scope, are skipped).
//!
//! # Decision
//! Dry-run policies never decide; they are reported in [`Decision::dry_run`] with whether
//! they matched. Of the others: any matching `DENY` denies; else, when no `ALLOW` applies,
//! the connection is allowed; else a matching `ALLOW` allows; else it is denied.
//!
//! # Matching
//! A policy matches when any of its rules does; a policy with no rules never matches (an
//! `ALLOW` without rules denies everything it applies to). A rule matches when all its clauses
//! do (a rule without clauses matches everything); a clause matches when any of its matches
//! does, and a clause without matches is true. A [`Match`] matches when every field that is set
//! matches (values OR-ed within a field) and no value of any `not_*` field matches; a match with
//! no field set never matches.
//!
//! Principals are compared without `spiffe://` (`cluster.local/ns/a/sa/b`; a leading
//! `spiffe://` in a policy's exact or prefix principal is dropped when the [`PolicySet`] is
//! built), namespaces against the source identity's namespace, service accounts against its
//! (namespace, service account). IP fields are CIDRs (an IPv4-mapped IPv6 peer address also
//! matches as its IPv4 form), ports compare exactly.
//!
//! # No source identity (plaintext inbound)
//! As in Istio and upstream ztunnel, a connection without a peer identity matches *no value*
//! of `principals`, `namespaces` or `service_accounts` — not even `Presence` (`"*"`). So a
//! positive field of those fails, and a `not_*` field of those is satisfied (it excludes
//! nothing). This is what makes Istio's documented `DENY` with `notPrincipals: ["*"]` deny all
//! plaintext traffic; an `ALLOW` whose only source condition is a `not_*` identity field does
//! allow plaintext traffic, exactly as in Istio.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

mod proto;
#[cfg(test)]
mod tests;

pub use proto::PolicyError;

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

/// Which destinations a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every workload of the mesh.
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// The workloads that name the policy in their `authorization_policies`.
    WorkloadSelector,
}

/// A string condition. In YAML: `!Exact x`, `!Prefix x`, `!Suffix x`, `!Presence` (also
/// `!Presence []`, how it is written back).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        self.matches_parts(&[s])
    }

    /// Whether the concatenation of `parts` matches, without building it.
    fn matches_parts(&self, parts: &[&str]) -> bool {
        match self {
            StringMatch::Exact(m) => {
                parts.iter().map(|p| p.len()).sum::<usize>() == m.len()
                    && parts_start_with(parts, m)
            }
            StringMatch::Prefix(m) => parts_start_with(parts, m),
            StringMatch::Suffix(m) => parts_end_with(parts, m),
            StringMatch::Presence => parts.iter().any(|p| !p.is_empty()),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTupleVariant;
        match self {
            StringMatch::Exact(v) => s.serialize_newtype_variant("StringMatch", 0, "Exact", v),
            StringMatch::Prefix(v) => s.serialize_newtype_variant("StringMatch", 1, "Prefix", v),
            StringMatch::Suffix(v) => s.serialize_newtype_variant("StringMatch", 2, "Suffix", v),
            StringMatch::Presence => s
                .serialize_tuple_variant("StringMatch", 3, "Presence", 0)?
                .end(),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        enum Tagged {
            Exact(String),
            Prefix(String),
            Suffix(String),
            Presence(NoValue),
        }
        Ok(match Tagged::deserialize(d)? {
            Tagged::Exact(v) => StringMatch::Exact(v),
            Tagged::Prefix(v) => StringMatch::Prefix(v),
            Tagged::Suffix(v) => StringMatch::Suffix(v),
            Tagged::Presence(NoValue) => StringMatch::Presence,
        })
    }
}

/// The value of `!Presence`: nothing (null, empty, `[]`).
struct NoValue;

impl<'de> Deserialize<'de> for NoValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NoValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("no value (`!Presence` takes none)")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<NoValue, E> {
                Ok(NoValue)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<NoValue, E> {
                Ok(NoValue)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NoValue, E> {
                if v.is_empty() {
                    Ok(NoValue)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<NoValue, A::Error> {
                match a.next_element::<serde::de::IgnoredAny>()? {
                    None => Ok(NoValue),
                    Some(_) => Err(serde::de::Error::invalid_length(1, &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn parts_start_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix.as_bytes();
    for p in parts {
        if rest.is_empty() {
            break;
        }
        let p = p.as_bytes();
        let n = p.len().min(rest.len());
        if p[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
    }
    rest.is_empty()
}

fn parts_end_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix.as_bytes();
    for p in parts.iter().rev() {
        if rest.is_empty() {
            break;
        }
        let p = p.as_bytes();
        let n = p.len().min(rest.len());
        if p[p.len() - n..] != rest[rest.len() - n..] {
            return false;
        }
        rest = &rest[..rest.len() - n];
    }
    rest.is_empty()
}

/// A CIDR block. In YAML: `"10.0.0.0/8"` (a bare address is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    /// A block, if `prefix_len` fits the address family (at most 32 or 128).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpNet, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!(
                "prefix length {prefix_len} is longer than the {max} bits of {addr}"
            ));
        }
        Ok(IpNet { addr, prefix_len })
    }

    /// Whether `ip` is inside the block (same family only; an IPv4-mapped IPv6 address is
    /// also tried as its IPv4 form).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.contains_exact(ip) || (ip.is_ipv6() && self.contains_exact(ip.to_canonical()))
    }

    fn contains_exact(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let bad = || format!("{s:?} is not a CIDR block (<ip>/<prefix length>) or an IP address");
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let len = match len {
            Some(len) => len.parse().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpNet::new(addr, len).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A service account: `(namespace, service account)` of the source identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// A set of conditions on a connection (see the module docs for how it matches).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// `positive` is empty or one of its values matches, and none of `negative` matches.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

impl Match {
    /// Whether no field is set (such a match never matches).
    pub fn is_empty(&self) -> bool {
        self == &Match::default()
    }

    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let id = conn.src_identity;
        field(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == conn.dst_port
        }) && field(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(conn.dst_ip)
        }) && field(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(conn.src_ip)
        }) && field(&self.namespaces, &self.not_namespaces, |m| {
            id.is_some_and(|id| m.matches(id.namespace()))
        }) && field(&self.principals, &self.not_principals, |m| {
            id.is_some_and(|id| {
                m.matches_parts(&[
                    id.trust_domain(),
                    "/ns/",
                    id.namespace(),
                    "/sa/",
                    id.service_account(),
                ])
            })
        }) && field(&self.service_accounts, &self.not_service_accounts, |sa| {
            id.is_some_and(|id| {
                sa.namespace == id.namespace() && sa.service_account == id.service_account()
            })
        })
    }
}

/// Matches OR-ed; no matches: true.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Clause {
    pub matches: Vec<Match>,
}

impl Clause {
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(conn))
    }
}

/// Clauses AND-ed; no clauses: true.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

impl Rule {
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.clauses.iter().all(|c| c.matches(conn))
    }
}

/// One AuthorizationPolicy, in upstream ztunnel's local-config shape (`rules` is a list of
/// rules, each a list of clauses, each a list of matches).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    #[serde(default)]
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Converts the xDS form. The error names the offending field, e.g.
    /// `rules[0].clauses[1].matches[0].source_ips[2].address: 5 bytes; ...`.
    pub fn from_proto(a: &xds_proto::istio::security::Authorization) -> Result<Policy, String> {
        proto::convert(a).map_err(|e| e.to_string())
    }

    /// Like [`Policy::from_proto`], with the field and the reason apart.
    pub fn try_from_proto(
        a: &xds_proto::istio::security::Authorization,
    ) -> Result<Policy, PolicyError> {
        proto::convert(a)
    }

    /// `"<namespace>/<name>"`: how workloads name it and how decisions report it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy matches (any rule; no rules: never).
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }

    /// Principals carry no `spiffe://`; a policy written with it still means the identity.
    fn normalize(&mut self) {
        let strip = |v: &mut Vec<StringMatch>| {
            for m in v {
                if let StringMatch::Exact(s) | StringMatch::Prefix(s) = m
                    && let Some(rest) = s.strip_prefix("spiffe://")
                {
                    *s = rest.to_owned();
                }
            }
        };
        for m in self
            .rules
            .iter_mut()
            .flat_map(|r| &mut r.clauses)
            .flat_map(|c| &mut c.matches)
        {
            strip(&mut m.principals);
            strip(&mut m.not_principals);
        }
    }
}

/// What `check` looks at in an inbound connection.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub src_ip: IpAddr,
    /// The peer's verified identity; `None` for plaintext inbound.
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The outcome of [`PolicySet::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy's key: the matching DENY, or the matching ALLOW. `None` when no
    /// ALLOW applies (allowed) or when ALLOWs apply and none matched (denied).
    pub policy: Option<String>,
    /// The dry-run policies that apply, with whether they matched (none decides).
    pub dry_run: Vec<DryRunVerdict>,
}

/// [`Decision`] by reference, as [`PolicySet::evaluate`] returns it: it allocates nothing
/// unless dry-run policies apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The deciding policy, as in [`Decision::policy`].
    pub policy: Option<&'a Policy>,
    /// The dry-run policies that apply, with whether they matched.
    pub dry_run: Vec<(&'a Policy, bool)>,
}

impl Verdict<'_> {
    pub fn to_decision(&self) -> Decision {
        Decision {
            allowed: self.allowed,
            policy: self.policy.map(Policy::key),
            dry_run: self
                .dry_run
                .iter()
                .map(|&(p, matched)| DryRunVerdict {
                    policy: p.key(),
                    action: p.action,
                    matched,
                })
                .collect(),
        }
    }
}

/// What a dry-run policy would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunVerdict {
    /// The policy's key.
    pub policy: String,
    pub action: Action,
    pub matched: bool,
}

/// The policies of one scope bucket, split the way `check` walks them (indexes into
/// `Inner::policies`).
#[derive(Debug, Default)]
struct Bucket {
    deny: Vec<usize>,
    allow: Vec<usize>,
    dry_run: Vec<usize>,
}

impl Bucket {
    fn add(&mut self, i: usize, p: &Policy) {
        match (p.dry_run, p.action) {
            (true, _) => self.dry_run.push(i),
            (false, Action::Deny) => self.deny.push(i),
            (false, Action::Allow) => self.allow.push(i),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    policies: Vec<Policy>,
    by_key: HashMap<String, usize>,
    global: Bucket,
    by_namespace: HashMap<String, Bucket>,
}

/// An immutable, indexed set of policies: the cost of a check depends on the policies that
/// apply to the destination, not on the others. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

impl PolicySet {
    /// Indexes `policies`. A later policy with the key of an earlier one replaces it.
    pub fn new(policies: impl IntoIterator<Item = Policy>) -> PolicySet {
        let mut inner = Inner::default();
        for mut p in policies {
            p.normalize();
            let key = p.key();
            match inner.by_key.get(&key) {
                Some(&i) => inner.policies[i] = p,
                None => {
                    inner.by_key.insert(key, inner.policies.len());
                    inner.policies.push(p);
                }
            }
        }
        for (i, p) in inner.policies.iter().enumerate() {
            match p.scope {
                Scope::Global => inner.global.add(i, p),
                Scope::Namespace => inner
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .add(i, p),
                Scope::WorkloadSelector => {}
            }
        }
        PolicySet {
            inner: Arc::new(inner),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.policies.is_empty()
    }

    /// Every policy, in the order given (for `/config_dump`).
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.inner.policies.iter()
    }

    /// A policy by key `"<namespace>/<name>"`.
    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.inner.by_key.get(key).map(|&i| &self.inner.policies[i])
    }

    /// Decides a connection to a workload of namespace `dst_namespace` whose
    /// `authorization_policies` are `dst_policies` (keys `"<namespace>/<name>"`).
    pub fn check(
        &self,
        dst_namespace: &str,
        dst_policies: &[String],
        conn: &Connection<'_>,
    ) -> Decision {
        self.evaluate(dst_namespace, dst_policies, conn)
            .to_decision()
    }

    /// Like [`PolicySet::check`], naming policies by reference: no allocation (not even the
    /// deciding policy's key) unless dry-run policies apply.
    pub fn evaluate(
        &self,
        dst_namespace: &str,
        dst_policies: &[String],
        conn: &Connection<'_>,
    ) -> Verdict<'_> {
        self.check_counted(dst_namespace, dst_policies, conn, &mut 0)
    }

    /// [`PolicySet::evaluate`], counting in `evaluated` the policies it matched against the
    /// connection (the index at work: unrelated policies are never evaluated).
    fn check_counted(
        &self,
        dst_namespace: &str,
        dst_policies: &[String],
        conn: &Connection<'_>,
        evaluated: &mut usize,
    ) -> Verdict<'_> {
        let inner = &*self.inner;
        let ns = inner.by_namespace.get(dst_namespace);
        // The selector policies the workload names, each once.
        let selected = dst_policies
            .iter()
            .enumerate()
            .filter(|&(i, k)| !dst_policies[..i].contains(k))
            .filter_map(|(_, k)| inner.by_key.get(k.as_str()))
            .map(|&i| (i, &inner.policies[i]))
            .filter(|(_, p)| p.scope == Scope::WorkloadSelector);
        let buckets = || [Some(&inner.global), ns].into_iter().flatten();
        let mut matches = |i: usize| {
            *evaluated += 1;
            inner.policies[i].matches(conn)
        };

        let mut dry_run = Vec::new();
        let dry = buckets()
            .flat_map(|b| b.dry_run.iter().copied())
            .chain(selected.clone().filter(|(_, p)| p.dry_run).map(|(i, _)| i));
        for i in dry {
            dry_run.push((&inner.policies[i], matches(i)));
        }

        let enforced = selected.filter(|(_, p)| !p.dry_run);
        let deny = buckets().flat_map(|b| b.deny.iter().copied()).chain(
            enforced
                .clone()
                .filter(|(_, p)| p.action == Action::Deny)
                .map(|(i, _)| i),
        );
        for i in deny {
            if matches(i) {
                return Verdict {
                    allowed: false,
                    policy: Some(&inner.policies[i]),
                    dry_run,
                };
            }
        }

        let mut any_allow = false;
        let allow = buckets().flat_map(|b| b.allow.iter().copied()).chain(
            enforced
                .filter(|(_, p)| p.action == Action::Allow)
                .map(|(i, _)| i),
        );
        for i in allow {
            any_allow = true;
            if matches(i) {
                return Verdict {
                    allowed: true,
                    policy: Some(&inner.policies[i]),
                    dry_run,
                };
            }
        }
        Verdict {
            allowed: !any_allow,
            policy: None,
            dry_run,
        }
    }
}
