//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The identity of a workload, as carried in the URI SAN of its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("identity {id:?} has an invalid {part}: {reason}")]
    Segment {
        id: String,
        part: &'static str,
        reason: &'static str,
    },
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each one.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        Self::check(trust_domain, namespace, service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Whether the parts make an identity, without building it.
    pub fn check(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), IdentityError> {
        // The whole id only for an error's text: this runs per connection.
        let id = || format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_trust_domain(id, trust_domain)?;
        check_segment(id, "namespace", namespace)?;
        check_segment(id, "service account", service_account)
    }

    /// The URI form of the identity the parts make (`spiffe://<td>/ns/<ns>/sa/<sa>`), as
    /// [`SpiffeId`]'s `Display` writes it, in one allocation.
    pub fn uri(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<String, IdentityError> {
        Self::check(trust_domain, namespace, service_account)?;
        let parts = [
            "spiffe://",
            trust_domain,
            "/ns/",
            namespace,
            "/sa/",
            service_account,
        ];
        let mut uri = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        parts.iter().for_each(|p| uri.push_str(p));
        Ok(uri)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The form Istio uses in AuthorizationPolicy principals: the id without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn check_trust_domain(id: impl Fn() -> String, td: &str) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::Segment {
        id: id(),
        part: "trust domain",
        reason,
    };
    if td.is_empty() {
        return Err(err("it is empty"));
    }
    if td.len() > 255 {
        return Err(err("it is longer than 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(err(
            "only lowercase letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

fn check_segment(
    id: impl Fn() -> String,
    part: &'static str,
    seg: &str,
) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::Segment {
        id: id(),
        part,
        reason,
    };
    if seg.is_empty() {
        return Err(err("it is empty"));
    }
    if seg == "." || seg == ".." {
        return Err(err("'.' and '..' are not allowed"));
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(err("only letters, digits, '.', '-' and '_' are allowed"));
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "client");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "cluster.local/ns/default/sa/client",
            "http://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/default/sa",
            "spiffe://cluster.local/ns/default/sa/client/extra",
            "spiffe://cluster.local/sa/default/ns/client",
            "spiffe:///ns/default/sa/client",
            "spiffe://Cluster.Local/ns/default/sa/client",
            "spiffe://cluster.local/ns//sa/client",
            "spiffe://cluster.local/ns/../sa/client",
            "spiffe://cluster.local/ns/default/sa/cli%20ent",
            "spiffe://cluster.local:8080/ns/default/sa/client",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} was accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_roundtrips(s in "\\PC*") {
            if let Ok(id) = s.parse::<SpiffeId>() {
                proptest::prop_assert_eq!(id.to_string(), s);
            }
        }

        /// `uri` is `new` then `to_string`, errors included, from any parts.
        #[test]
        fn uri_is_the_displayed_identity(td in "[a-z.]{0,6}|\\PC{0,6}", ns in "[a-z.]{0,6}|\\PC{0,6}", sa in "[a-z.]{0,6}|\\PC{0,6}") {
            proptest::prop_assert_eq!(
                SpiffeId::uri(&td, &ns, &sa),
                SpiffeId::new(&td, &ns, &sa).map(|id| id.to_string())
            );
        }
    }
}
