//! zmesh's Kubernetes watching, shared by the controller (`zmesh-controller`) and the node
//! agent (`zmesh-cni-agent`): the kube-rs watcher loop with its list/re-list semantics, error
//! logging and CRD-absent handling ([`watch`]), and the key objects are stored under
//! ([`ObjectKey`]).
//!
//! It holds no object types of its own and nothing of the control plane (no CA, no xDS, no
//! tonic), so the node agent links only this and kube-rs. What each component keeps of the
//! objects, and which kinds it watches, stays with the component.

pub mod watch;

pub use watch::{Sink, Watched, Watchers};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Key of an object within its kind: `(namespace, name)`; the namespace is empty for
/// cluster-scoped kinds (Namespace) and `default` when a namespaced object leaves it out.
pub type ObjectKey = (String, String);

/// The key of an object with metadata `meta`, of a namespaced kind or not.
pub fn object_key(meta: &ObjectMeta, namespaced: bool) -> ObjectKey {
    let ns = if namespaced {
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    } else {
        String::new()
    };
    (ns, meta.name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_default_the_namespace_only_for_namespaced_kinds() {
        let meta = ObjectMeta {
            name: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(object_key(&meta, true), ("default".into(), "a".into()));
        assert_eq!(object_key(&meta, false), (String::new(), "a".into()));
        let meta = ObjectMeta {
            name: Some("b".into()),
            namespace: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(object_key(&meta, true), ("x".into(), "b".into()));
    }
}
