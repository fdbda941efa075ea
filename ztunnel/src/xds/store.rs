//! What the xDS client holds: every accepted Address resource with its version, in arrival
//! order, every accepted Authorization resource (converted to a [`Policy`]) with its version,
//! and the rule for each response: good resources applied, bad ones refused with a reason
//! naming them (the previous good version, if any, stays), removals applied. Free of gRPC so
//! it can be tested directly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use xds_proto::envoy::service::discovery::v3::Resource;
use xds_proto::istio::security::Authorization;
use xds_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use zmesh_core::policy::{Policy, PolicySet};
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
    /// The NACK message: the reasons, `; `-joined (as upstream ztunnel does), bounded
    /// ([`zmesh_core::grpc::nack_detail`]).
    pub fn nack_message(&self) -> Option<String> {
        (!self.errors.is_empty()).then(|| zmesh_core::grpc::nack_detail(&self.errors))
    }
}

/// The client's resources.
#[derive(Debug, Default)]
pub struct Store {
    addresses: HashMap<String, Held>,
    next_seq: u64,
    /// Authorization resources by resource name: version and policy.
    policies: BTreeMap<String, (String, Policy)>,
    /// `policies` indexed, rebuilt only when they change (every `State` shares it).
    policy_set: PolicySet,
}

impl Store {
    /// What the client has of `type_url`, for `initial_resource_versions` on (re)connect.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE_URL => self
                .addresses
                .iter()
                .map(|(n, h)| (n.clone(), h.version.clone()))
                .collect(),
            AUTHORIZATION_TYPE_URL => self
                .policies
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => HashMap::new(),
        }
    }

    /// Number of policies held.
    pub fn policy_count(&self) -> usize {
        self.policies.len()
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
            out.changed |= self.policies.remove(name).is_some();
        }
        for r in resources {
            let converted = match &r.resource {
                None => Err(format!("resource {:?}: no resource in it", r.name)),
                Some(any) if !any.type_url.is_empty() && any.type_url != AUTHORIZATION_TYPE_URL => {
                    Err(format!(
                        "resource {:?}: packed as {:?}, expected {AUTHORIZATION_TYPE_URL}",
                        r.name, any.type_url
                    ))
                }
                Some(any) => Authorization::decode(any.value.as_slice())
                    .map_err(|e| {
                        format!(
                            "resource {:?}: not an istio.security.Authorization: {e}",
                            r.name
                        )
                    })
                    .and_then(|a| {
                        Policy::from_proto(&a)
                            .map_err(|e| format!("resource {:?}: policy not enforced: {e}", r.name))
                    }),
            };
            match converted {
                Ok(p) => {
                    let same = self
                        .policies
                        .get(&r.name)
                        .is_some_and(|(_, held)| *held == p);
                    self.policies.insert(r.name, (r.version, p));
                    out.changed |= !same;
                }
                // The previous good version (if any) stays enforced.
                Err(e) => out.errors.push(e),
            }
        }
        if out.changed {
            self.policy_set = PolicySet::new(self.policies.values().map(|(_, p)| p.clone()));
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
        let (st, conflicts) = State::from_resources(workloads, services);
        (st.with_policies(self.policy_set.clone()), conflicts)
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

    fn authorization(name: &str, namespace: &str, action: i32, rules: usize) -> Resource {
        use xds_proto::istio::security as sec;
        let m = sec::Match {
            destination_ports: vec![8080],
            ..Default::default()
        };
        let p = Authorization {
            name: name.into(),
            namespace: namespace.into(),
            scope: sec::Scope::Namespace as i32,
            action,
            rules: (0..rules)
                .map(|_| sec::Rule {
                    clauses: vec![sec::Clause {
                        matches: vec![m.clone()],
                    }],
                })
                .collect(),
            ..Default::default()
        };
        Resource {
            name: format!("{namespace}/{name}"),
            version: format!("v{rules}"),
            resource: Some(prost_types::Any {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn authorization_applied_bad_one_nacked_removals_applied() {
        use xds_proto::istio::security as sec;
        let mut s = Store::default();
        let mut bad = authorization("bad", "prod", sec::Action::Deny as i32, 1);
        bad.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        let out = s.apply(
            AUTHORIZATION_TYPE_URL,
            vec![
                authorization("deny-all", "prod", sec::Action::Deny as i32, 1),
                bad,
            ],
            &[],
        );
        assert!(out.changed);
        let nack = out.nack_message().unwrap();
        assert!(nack.contains("\"prod/bad\""), "{nack}");
        assert!(!nack.contains("deny-all"), "{nack}");
        let (st, _) = s.state();
        let keys: Vec<String> = st.policies().policies().map(|p| p.key()).collect();
        assert_eq!(keys, vec!["prod/deny-all"]);
        assert_eq!(s.versions(AUTHORIZATION_TYPE_URL)["prod/deny-all"], "v1");

        // The same policy again: nothing changes (no re-check of open connections is due).
        let out = s.apply(
            AUTHORIZATION_TYPE_URL,
            vec![authorization(
                "deny-all",
                "prod",
                sec::Action::Deny as i32,
                1,
            )],
            &[],
        );
        assert_eq!(out, Outcome::default());
        // An updated one replaces it; an Address change keeps the policies.
        let out = s.apply(
            AUTHORIZATION_TYPE_URL,
            vec![authorization(
                "deny-all",
                "prod",
                sec::Action::Deny as i32,
                2,
            )],
            &[],
        );
        assert!(out.changed && out.errors.is_empty());
        s.apply(
            ADDRESS_TYPE_URL,
            vec![workload("w", vec![10, 0, 0, 1])],
            &[],
        );
        let (st, _) = s.state();
        assert_eq!(st.policies().get("prod/deny-all").unwrap().rules.len(), 2);

        let out = s.apply(AUTHORIZATION_TYPE_URL, vec![], &["prod/deny-all".into()]);
        assert!(out.changed);
        assert!(s.state().0.policies().is_empty());
        assert!(s.versions(AUTHORIZATION_TYPE_URL).is_empty());
    }
}
