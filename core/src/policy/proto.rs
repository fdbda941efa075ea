//! `istio.security.Authorization` to [`Policy`], refusing what the model cannot hold
//! faithfully (the error names the field), so that an xDS client can NACK it by name.
//!
//! Refused: an unknown `scope` or `action`, an empty `name`, an address that is not 4 or 16
//! bytes or a prefix length longer than its family, a port above 65535, a `StringMatch`
//! without a match type, and `extensions` anywhere (a condition ztunnel does not understand
//! must not be silently dropped: that would widen an ALLOW or narrow a DENY).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xds_proto::istio::security as pb;
use xds_proto::istio::security::string_match::MatchType;

use super::{Action, Clause, IpNet, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

/// Why an `Authorization` was refused: the offending field (`rules[0].clauses[1].matches[0].
/// source_ips[2].address`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for PolicyError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

pub(super) fn convert(a: &pb::Authorization) -> Result<Policy, PolicyError> {
    if a.name.is_empty() {
        return Err(err("name", "empty; a policy needs a name"));
    }
    let scope = match pb::Scope::try_from(a.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(err("scope", format!("unknown value {}", a.scope))),
    };
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => return Err(err("action", format!("unknown value {}", a.action))),
    };
    if !a.extensions.is_empty() {
        return Err(err("extensions", "not supported by this ztunnel"));
    }
    let mut rules = Vec::with_capacity(a.rules.len());
    for (i, r) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for (j, c) in r.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(c.matches.len());
            for (k, m) in c.matches.iter().enumerate() {
                matches.push(convert_match(
                    &format!("rules[{i}].clauses[{j}].matches[{k}]"),
                    m,
                )?);
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Policy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        dry_run: a.dry_run,
        rules,
    })
}

fn convert_match(at: &str, m: &pb::Match) -> Result<Match, PolicyError> {
    if !m.extensions.is_empty() {
        return Err(err(
            format!("{at}.extensions"),
            "not supported by this ztunnel",
        ));
    }
    Ok(Match {
        namespaces: strings(at, "namespaces", &m.namespaces)?,
        not_namespaces: strings(at, "not_namespaces", &m.not_namespaces)?,
        principals: strings(at, "principals", &m.principals)?,
        not_principals: strings(at, "not_principals", &m.not_principals)?,
        source_ips: nets(at, "source_ips", &m.source_ips)?,
        not_source_ips: nets(at, "not_source_ips", &m.not_source_ips)?,
        destination_ips: nets(at, "destination_ips", &m.destination_ips)?,
        not_destination_ips: nets(at, "not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports(at, "destination_ports", &m.destination_ports)?,
        not_destination_ports: ports(at, "not_destination_ports", &m.not_destination_ports)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    })
}

fn strings(
    at: &str,
    name: &str,
    list: &[pb::StringMatch],
) -> Result<Vec<StringMatch>, PolicyError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| match &s.match_type {
            Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
            Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
            Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
            Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
            None => Err(err(
                format!("{at}.{name}[{i}]"),
                "no match type (exact, prefix, suffix or presence)",
            )),
        })
        .collect()
}

fn nets(at: &str, name: &str, list: &[pb::Address]) -> Result<Vec<IpNet>, PolicyError> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let addr = match a.address.len() {
                4 => IpAddr::V4(Ipv4Addr::from(
                    <[u8; 4]>::try_from(&a.address[..]).expect("length checked"),
                )),
                16 => IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&a.address[..]).expect("length checked"),
                )),
                n => {
                    return Err(err(
                        format!("{at}.{name}[{i}].address"),
                        format!("{n} bytes; an address is 4 (IPv4) or 16 (IPv6) bytes"),
                    ));
                }
            };
            u8::try_from(a.length)
                .map_err(|_| format!("prefix length {} is out of range", a.length))
                .and_then(|len| IpNet::new(addr, len))
                .map_err(|reason| err(format!("{at}.{name}[{i}].length"), reason))
        })
        .collect()
}

fn ports(at: &str, name: &str, list: &[u32]) -> Result<Vec<u16>, PolicyError> {
    list.iter()
        .enumerate()
        .map(|(i, &p)| {
            u16::try_from(p).map_err(|_| {
                err(
                    format!("{at}.{name}[{i}]"),
                    format!("{p} is not a port (0-65535)"),
                )
            })
        })
        .collect()
}

fn accounts(list: &[pb::ServiceAccountMatch]) -> Vec<ServiceAccountMatch> {
    list.iter()
        .map(|s| ServiceAccountMatch {
            namespace: s.namespace.clone(),
            service_account: s.service_account.clone(),
        })
        .collect()
}
