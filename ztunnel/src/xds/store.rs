//! What the xDS client holds: every accepted Address resource with its version, in arrival
//! order, and the rule for each response: good resources applied, bad ones refused with a
//! reason naming them, removals applied. Free of gRPC so it can be tested directly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use xds_proto::envoy::service::discovery::v3::Resource;
use xds_proto::istio::security::Authorization;
use xds_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use zmesh_core::state::xds::{AddressResource, decode_address};
use zmesh_core::state::{Service, State, Workload};

/// One accepted Address resource.
#[derive(Debug)]
struct Held {
    version: String,
    /// Arrival order: on an IP or VIP conflict the later one wins.
    seq: u64,
    item: Item,
}

#[derive(Debug)]
enum Item {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// The result of applying one response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// One reason per refused resource, each naming it; empty: ACK.
    pub errors: Vec<String>,
    /// Whether what the data path sees changed (a new `State` is due).
    pub changed: bool,
}

impl Outcome {
    /// The NACK message: the reasons, `; `-joined (as upstream ztunnel does).
    pub fn nack_message(&self) -> Option<String> {
        (!self.errors.is_empty()).then(|| self.errors.join("; "))
    }
}

/// The message every Authorization resource is refused with until L4 policy is enforced.
pub fn authorization_refusal(namespace: &str, name: &str) -> String {
    format!(
        "AuthorizationPolicy enforcement is not implemented in this ztunnel build; policy \
         {namespace}/{name} is NOT enforced"
    )
}

/// The client's resources. Authorization resources are never held: they are refused.
#[derive(Debug, Default)]
pub struct Store {
    addresses: HashMap<String, Held>,
    next_seq: u64,
    /// Authorization resources already logged as not enforced (by resource name), so each
    /// policy is logged once, not on every resend or reconnect.
    authz_logged: HashSet<String>,
}

impl Store {
    /// What the client has of `type_url`, for `initial_resource_versions` on (re)connect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        if type_url != ADDRESS_TYPE_URL {
            return HashMap::new();
        }
        self.addresses
            .iter()
            .map(|(n, h)| (n.clone(), h.version.clone()))
            .collect()
    }

    /// Number of workloads and services held.
    pub fn counts(&self) -> (usize, usize) {
        let w = self
            .addresses
            .values()
            .filter(|h| matches!(h.item, Item::Workload(_)))
            .count();
        (w, self.addresses.len() - w)
    }

    /// Applies one response of `type_url`.
    pub fn apply(
        &mut self,
        type_url: &str,
        resources: Vec<Resource>,
        removed: &[String],
    ) -> Outcome {
        match type_url {
            ADDRESS_TYPE_URL => self.apply_addresses(resources, removed),
            AUTHORIZATION_TYPE_URL => self.apply_authorizations(resources, removed),
            other => Outcome {
                errors: vec![format!(
                    "type {other:?} was not subscribed to; ztunnel only handles \
                     {ADDRESS_TYPE_URL} and {AUTHORIZATION_TYPE_URL}"
                )],
                changed: false,
            },
        }
    }

    fn apply_addresses(&mut self, resources: Vec<Resource>, removed: &[String]) -> Outcome {
        let mut out = Outcome::default();
        for name in removed {
            out.changed |= self.addresses.remove(name).is_some();
        }
        for r in resources {
            let converted = match &r.resource {
                None => Err(format!("resource {:?}: no resource in it", r.name)),
                Some(any) if !any.type_url.is_empty() && any.type_url != ADDRESS_TYPE_URL => {
                    Err(format!(
                        "resource {:?}: packed as {:?}, expected {ADDRESS_TYPE_URL}",
                        r.name, any.type_url
                    ))
                }
                Some(any) => decode_address(&r.name, &any.value).map_err(|e| e.to_string()),
            };
            match converted {
                Ok(res) => {
                    let item = match res {
                        AddressResource::Workload(w) => Item::Workload(Arc::new(w)),
                        AddressResource::Service(s) => Item::Service(Arc::new(s)),
                    };
                    self.next_seq += 1;
                    self.addresses.insert(
                        r.name,
                        Held {
                            version: r.version,
                            seq: self.next_seq,
                            item,
                        },
                    );
                    out.changed = true;
                }
                // The previous good version (if any) stays: a NACK keeps the last good config.
                Err(e) => out.errors.push(e),
            }
        }
        out
    }

    fn apply_authorizations(&mut self, resources: Vec<Resource>, removed: &[String]) -> Outcome {
        let mut out = Outcome::default();
        for name in removed {
            self.authz_logged.remove(name);
        }
        for r in resources {
            let policy = r
                .resource
                .as_ref()
                .and_then(|any| Authorization::decode(any.value.as_slice()).ok());
            let msg = match &policy {
                Some(p) => authorization_refusal(&p.namespace, &p.name),
                None => format!(
                    "resource {:?}: not a valid istio.security.Authorization; and \
                     AuthorizationPolicy enforcement is not implemented in this ztunnel build",
                    r.name
                ),
            };
            if self.authz_logged.insert(r.name.clone()) {
                tracing::error!(resource = %r.name, "{msg}; the controller is told (NACK)");
            }
            out.errors.push(msg);
        }
        out
    }

    /// A snapshot of everything held, resources in arrival order, with its conflicts.
    pub fn state(&self) -> (State, Vec<String>) {
        let mut held: Vec<&Held> = self.addresses.values().collect();
        held.sort_by_key(|h| h.seq);
        let workloads = held.iter().filter_map(|h| match &h.item {
            Item::Workload(w) => Some(w.clone()),
            Item::Service(_) => None,
        });
        let services = held.iter().filter_map(|h| match &h.item {
            Item::Service(s) => Some(s.clone()),
            Item::Workload(_) => None,
        });
        State::from_resources(workloads, services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_proto::istio::workload as pb;

    pub(crate) fn workload(uid: &str, ip: Vec<u8>) -> Resource {
        let a = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                addresses: vec![ip],
                ..Default::default()
            })),
        };
        Resource {
            name: uid.into(),
            version: format!("v-{uid}"),
            resource: Some(prost_types::Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: a.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn good_applied_bad_named_removals_applied() {
        let mut s = Store::default();
        let out = s.apply(
            ADDRESS_TYPE_URL,
            vec![
                workload("good", vec![10, 0, 0, 1]),
                workload("bad", vec![1, 2, 3]),
            ],
            &[],
        );
        assert!(out.changed);
        let nack = out.nack_message().unwrap();
        assert!(
            nack.contains("\"bad\"") && nack.contains("3 bytes"),
            "{nack}"
        );
        assert!(!nack.contains("good"), "{nack}");
        assert_eq!(s.versions(ADDRESS_TYPE_URL).len(), 1);
        let (st, _) = s.state();
        assert!(st.workload_by_ip("10.0.0.1".parse().unwrap()).is_some());

        // A bad update keeps the last good version.
        let out = s.apply(ADDRESS_TYPE_URL, vec![workload("good", vec![0; 5])], &[]);
        assert!(!out.changed && out.errors.len() == 1);
        assert_eq!(s.versions(ADDRESS_TYPE_URL)["good"], "v-good");

        let out = s.apply(ADDRESS_TYPE_URL, vec![], &["good".into(), "unknown".into()]);
        assert_eq!(
            out,
            Outcome {
                errors: vec![],
                changed: true
            }
        );
        assert!(s.state().0.workloads().is_empty());
    }

    #[test]
    fn authorization_is_refused_and_never_held() {
        let mut s = Store::default();
        let p = Authorization {
            name: "deny-all".into(),
            namespace: "prod".into(),
            ..Default::default()
        };
        let r = Resource {
            name: "prod/deny-all".into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Default::default()
        };
        let out = s.apply(AUTHORIZATION_TYPE_URL, vec![r], &[]);
        assert_eq!(
            out.nack_message().unwrap(),
            "AuthorizationPolicy enforcement is not implemented in this ztunnel build; \
             policy prod/deny-all is NOT enforced"
        );
        assert!(!out.changed);
        assert!(s.versions(AUTHORIZATION_TYPE_URL).is_empty());
    }
}
