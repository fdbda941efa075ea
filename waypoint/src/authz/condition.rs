//! `rules[].when[]` at the waypoint: the condition keys of Istio's reference
//! (https://istio.io/latest/docs/reference/config/security/conditions/ ) a waypoint can read.

use http::HeaderName;
use serde_json::Value;
use zmesh_core::policy::{IpNet, StringMatch};

use super::Attributes;
use super::matcher::{ip_block, port, string_match};

/// Which attribute a condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `request.headers[<name>]` (name case-insensitive; repeated headers joined by `,`).
    Header(HeaderName),
    /// `source.ip`: the client's address (the CONNECT's `forwarded`).
    SourceIp,
    /// `remote.ip`: the same as `source.ip` (X-Forwarded-For is not trusted, as with Istio's
    /// default `numTrustedProxies: 0`).
    RemoteIp,
    /// `source.namespace`, from the peer's SPIFFE id.
    SourceNamespace,
    /// `source.principal`: `<td>/ns/<ns>/sa/<sa>`.
    SourcePrincipal,
    /// `destination.ip`: the Service VIP the client connected to.
    DestinationIp,
    /// `destination.port`: the Service port.
    DestinationPort,
    /// `connection.sni`: the requests reach the waypoint as plaintext HTTP inside HBONE, so
    /// there is no SNI; the key has no value (matches no value, excluded by no `notValues`).
    Sni,
    /// `request.auth.principal` (`<iss>/<sub>` of a validated JWT).
    AuthPrincipal,
    /// `request.auth.audiences`.
    AuthAudiences,
    /// `request.auth.presenter` (`azp`).
    AuthPresenter,
    /// `request.auth.claims[a][b]...`: a string claim, or each string of a list claim.
    AuthClaims(Vec<String>),
}

/// How the values of a condition are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    Strings(Vec<StringMatch>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
}

/// One compiled `when` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: Key,
    pub values: Values,
    pub not_values: Values,
}

/// Parses a condition key; the error names what is wrong.
pub fn parse_key(k: &str) -> Result<Key, String> {
    Ok(match k {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        "connection.sni" => Key::Sni,
        "request.auth.principal" => Key::AuthPrincipal,
        "request.auth.audiences" => Key::AuthAudiences,
        "request.auth.presenter" => Key::AuthPresenter,
        _ => {
            if let Some(name) = k
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
            {
                let h = HeaderName::try_from(name)
                    .map_err(|_| format!("key {k:?}: {name:?} is not a header name"))?;
                Key::Header(h)
            } else if let Some(path) = k
                .strip_prefix("request.auth.claims[")
                .and_then(|r| r.strip_suffix(']'))
            {
                let parts: Vec<String> = path.split("][").map(str::to_owned).collect();
                if parts.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
                    return Err(format!("key {k:?}: malformed claim name"));
                }
                Key::AuthClaims(parts)
            } else {
                return Err(format!(
                    "key {k:?} is not supported at the waypoint (supported: request.headers[..], \
                     source.ip, remote.ip, source.namespace, source.principal, destination.ip, \
                     destination.port, connection.sni, request.auth.principal, \
                     request.auth.audiences, request.auth.presenter, request.auth.claims[..])"
                ));
            }
        }
    })
}

fn parse_values(key: &Key, vs: &[String]) -> Result<Values, String> {
    Ok(match key {
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
            Values::Ips(vs.iter().map(|v| ip_block(v)).collect::<Result<_, _>>()?)
        }
        Key::DestinationPort => {
            Values::Ports(vs.iter().map(|v| port(v)).collect::<Result<_, _>>()?)
        }
        // Principals are compared without `spiffe://`, as in `principals` and at ztunnel.
        Key::SourcePrincipal => Values::Strings(
            vs.iter()
                .map(|v| string_match(v.strip_prefix("spiffe://").unwrap_or(v)))
                .collect::<Result<_, _>>()?,
        ),
        _ => Values::Strings(
            vs.iter()
                .map(|v| string_match(v))
                .collect::<Result<_, _>>()?,
        ),
    })
}

impl Condition {
    /// Whether its key is an attribute of an HTTP request (`request.*`).
    pub fn is_http(&self) -> bool {
        matches!(
            self.key,
            Key::Header(_)
                | Key::AuthPrincipal
                | Key::AuthAudiences
                | Key::AuthPresenter
                | Key::AuthClaims(_)
        )
    }

    /// Compiles one `when` entry: a known key and at least one value or notValue.
    pub fn compile(key: &str, values: &[String], not_values: &[String]) -> Result<Self, String> {
        let key = parse_key(key)?;
        if values.is_empty() && not_values.is_empty() {
            return Err("a condition needs values or notValues".into());
        }
        Ok(Condition {
            values: parse_values(&key, values)?,
            not_values: parse_values(&key, not_values)?,
            key,
        })
    }

    /// Whether the request satisfies it: some value matches (or none is listed) and no
    /// notValue matches. An attribute the request does not have matches no value.
    pub fn matches(&self, a: &Attributes<'_>) -> bool {
        let hit = |vals: &Values| -> bool {
            match vals {
                Values::Ips(nets) => {
                    let ip = match self.key {
                        Key::SourceIp | Key::RemoteIp => a.source_ip,
                        _ => a.destination_ip,
                    };
                    nets.iter().any(|n| n.contains(ip))
                }
                Values::Ports(ps) => ps.contains(&a.destination_port),
                Values::Strings(ms) => {
                    let subject = self.strings(a);
                    ms.iter().any(|m| subject.iter().any(|s| m.matches(s)))
                }
            }
        };
        let empty = |vals: &Values| match vals {
            Values::Ips(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
            Values::Strings(v) => v.is_empty(),
        };
        (empty(&self.values) || hit(&self.values)) && !hit(&self.not_values)
    }

    /// The string values of the attribute (none when the request does not have it).
    fn strings(&self, a: &Attributes<'_>) -> Vec<String> {
        match &self.key {
            Key::Header(h) => {
                let vals: Vec<&str> = a
                    .headers
                    .get_all(h)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if vals.is_empty() {
                    Vec::new()
                } else {
                    vec![vals.join(",")]
                }
            }
            Key::SourceNamespace => a
                .peer
                .map(|p| p.namespace().to_owned())
                .into_iter()
                .collect(),
            Key::SourcePrincipal => a.peer.map(|p| p.principal()).into_iter().collect(),
            Key::AuthPrincipal => a.auth.map(|r| r.principal.clone()).into_iter().collect(),
            Key::AuthAudiences => a.auth.map(|r| r.audiences.clone()).unwrap_or_default(),
            Key::AuthPresenter => a
                .auth
                .and_then(|r| r.presenter.clone())
                .into_iter()
                .collect(),
            Key::AuthClaims(path) => {
                let Some(auth) = a.auth else {
                    return Vec::new();
                };
                let mut v: Option<&Value> = None;
                for (i, p) in path.iter().enumerate() {
                    v = if i == 0 {
                        auth.claims.get(p)
                    } else {
                        v.and_then(|x| x.get(p))
                    };
                }
                match v {
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(xs)) => xs
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect(),
                    _ => Vec::new(),
                }
            }
            Key::Sni
            | Key::SourceIp
            | Key::RemoteIp
            | Key::DestinationIp
            | Key::DestinationPort => Vec::new(),
        }
    }
}
