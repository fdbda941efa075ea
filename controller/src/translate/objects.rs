//! The translation input: Kubernetes objects, and their loading from multi-document YAML.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use serde::Deserialize;

use super::AuthorizationPolicy;

/// Errors loading objects from YAML. Each names the document (0-based, in file order) so an
/// operator can find the offending object.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// The file is too large or too deeply nested to parse (checked before parsing).
    #[error("refused before parsing: {0}")]
    Limits(#[from] zmesh_core::yaml::YamlLimitError),
    /// The document is not valid YAML.
    #[error("YAML document {index} is not valid YAML: {source}")]
    Yaml {
        /// 0-based document index.
        index: usize,
        /// Parser error (with line and column).
        source: serde_yaml::Error,
    },
    /// The document is not a mapping with a string `kind`.
    #[error("YAML document {index} has no `kind`; every document must be a Kubernetes object")]
    MissingKind {
        /// 0-based document index.
        index: usize,
    },
    /// The document has a known kind but does not match its schema.
    #[error("YAML document {index} (kind {kind}) is not a valid {kind}: {source}")]
    Object {
        /// 0-based document index.
        index: usize,
        /// The document's `kind`.
        kind: String,
        /// Schema error (field and expected type).
        source: serde_yaml::Error,
    },
}

/// Key of an object within its kind: `(namespace, name)`; the namespace is empty for
/// cluster-scoped kinds (Namespace) and `default` when a namespaced document leaves it out.
pub use zmesh_k8s::ObjectKey;

/// The Kubernetes objects the translation reads, per kind and keyed by [`ObjectKey`], so a
/// source can upsert and delete single objects (the watch) or replace a kind wholesale (the
/// YAML directory, a re-list). Order does not matter: the output is sorted.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// `v1` Namespaces (their labels enrol pods and bind waypoints).
    pub namespaces: BTreeMap<ObjectKey, Namespace>,
    /// `v1` Pods.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// `v1` Services.
    pub services: BTreeMap<ObjectKey, Service>,
    /// `discovery.k8s.io/v1` EndpointSlices (used for Services without a selector).
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// `security.istio.io/v1` (or `v1beta1`) AuthorizationPolicies.
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
    /// `gateway.networking.k8s.io/v1` Gateways (kept for waypoints; not translated yet).
    pub gateways: BTreeMap<ObjectKey, DynamicObject>,
    /// `gateway.networking.k8s.io/v1` HTTPRoutes (mesh routes, see `translate::route`).
    pub http_routes: BTreeMap<ObjectKey, DynamicObject>,
    /// `gateway.networking.k8s.io/v1` GRPCRoutes (mesh routes, see `translate::route`).
    pub grpc_routes: BTreeMap<ObjectKey, DynamicObject>,
    /// `gateway.networking.k8s.io/v1beta1` ReferenceGrants (cross-namespace backendRefs).
    pub reference_grants: BTreeMap<ObjectKey, DynamicObject>,
    /// `security.istio.io/v1` (or `v1beta1`) RequestAuthentications (their spec is read
    /// strictly by `translate::request_authentication`).
    pub request_authentications: BTreeMap<ObjectKey, DynamicObject>,
}

/// The kinds a source delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    Gateway,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    RequestAuthentication,
}

impl Kind {
    /// Every kind, in the order sources start them.
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::AuthorizationPolicy,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::ReferenceGrant,
        Kind::RequestAuthentication,
    ];

    /// `(apiVersion group/version, kind)` as in YAML (the preferred version).
    pub fn api(self) -> (&'static str, &'static str) {
        match self {
            Kind::Namespace => ("v1", "Namespace"),
            Kind::Pod => ("v1", "Pod"),
            Kind::Service => ("v1", "Service"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Kind::AuthorizationPolicy => ("security.istio.io/v1", "AuthorizationPolicy"),
            Kind::Gateway => ("gateway.networking.k8s.io/v1", "Gateway"),
            Kind::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            Kind::GrpcRoute => ("gateway.networking.k8s.io/v1", "GRPCRoute"),
            Kind::ReferenceGrant => ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
            Kind::RequestAuthentication => ("security.istio.io/v1", "RequestAuthentication"),
        }
    }

    /// The kind for a document's `apiVersion` and `kind`, if we read it.
    pub fn from_api(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("v1", "Namespace") => Kind::Namespace,
            ("v1", "Pod") => Kind::Pod,
            ("v1", "Service") => Kind::Service,
            ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                Kind::AuthorizationPolicy
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
                Kind::Gateway
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                Kind::HttpRoute
            }
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => Kind::GrpcRoute,
            (
                "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1",
                "ReferenceGrant",
            ) => Kind::ReferenceGrant,
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "RequestAuthentication") => {
                Kind::RequestAuthentication
            }
            _ => return None,
        })
    }

    fn namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

/// One object of a kind the translation reads.
// Transient: an object is moved through this once on its way into the store's maps, so the
// size difference between variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum KubeObject {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    AuthorizationPolicy(AuthorizationPolicy),
    Gateway(DynamicObject),
    HttpRoute(DynamicObject),
    GrpcRoute(DynamicObject),
    ReferenceGrant(DynamicObject),
    RequestAuthentication(DynamicObject),
}

impl KubeObject {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            KubeObject::Namespace(_) => Kind::Namespace,
            KubeObject::Pod(_) => Kind::Pod,
            KubeObject::Service(_) => Kind::Service,
            KubeObject::EndpointSlice(_) => Kind::EndpointSlice,
            KubeObject::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            KubeObject::Gateway(_) => Kind::Gateway,
            KubeObject::HttpRoute(_) => Kind::HttpRoute,
            KubeObject::GrpcRoute(_) => Kind::GrpcRoute,
            KubeObject::ReferenceGrant(_) => Kind::ReferenceGrant,
            KubeObject::RequestAuthentication(_) => Kind::RequestAuthentication,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            KubeObject::Namespace(o) => &o.metadata,
            KubeObject::Pod(o) => &o.metadata,
            KubeObject::Service(o) => &o.metadata,
            KubeObject::EndpointSlice(o) => &o.metadata,
            KubeObject::AuthorizationPolicy(o) => &o.metadata,
            KubeObject::Gateway(o)
            | KubeObject::HttpRoute(o)
            | KubeObject::GrpcRoute(o)
            | KubeObject::ReferenceGrant(o)
            | KubeObject::RequestAuthentication(o) => &o.metadata,
        }
    }

    /// The object's key within its kind.
    pub fn key(&self) -> ObjectKey {
        key_of(self.kind(), self.metadata())
    }

    /// Parses one YAML (or JSON) value as the object its `apiVersion` and `kind` name; `None`
    /// for kinds we do not read.
    pub fn from_value(value: serde_yaml::Value) -> Result<Option<KubeObject>, serde_yaml::Error> {
        let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        let Some(kind) = Kind::from_api(api_version.unwrap_or_default(), kind.unwrap_or_default())
        else {
            return Ok(None);
        };
        Ok(Some(match kind {
            Kind::Namespace => KubeObject::Namespace(serde_yaml::from_value(value)?),
            Kind::Pod => KubeObject::Pod(serde_yaml::from_value(value)?),
            Kind::Service => KubeObject::Service(serde_yaml::from_value(value)?),
            Kind::EndpointSlice => KubeObject::EndpointSlice(serde_yaml::from_value(value)?),
            Kind::AuthorizationPolicy => {
                KubeObject::AuthorizationPolicy(serde_yaml::from_value(value)?)
            }
            Kind::Gateway => KubeObject::Gateway(serde_yaml::from_value(value)?),
            Kind::HttpRoute => KubeObject::HttpRoute(serde_yaml::from_value(value)?),
            Kind::GrpcRoute => KubeObject::GrpcRoute(serde_yaml::from_value(value)?),
            Kind::ReferenceGrant => KubeObject::ReferenceGrant(serde_yaml::from_value(value)?),
            Kind::RequestAuthentication => {
                KubeObject::RequestAuthentication(serde_yaml::from_value(value)?)
            }
        }))
    }
}

/// The key of an object of `kind` with metadata `meta`.
pub fn key_of(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    zmesh_k8s::object_key(meta, kind.namespaced())
}

impl Objects {
    /// Parses multi-document YAML. Documents of other kinds are skipped, as are empty
    /// documents; a `v1` `List` contributes its items. Kinds are matched with their `apiVersion`
    /// (`v1`, `discovery.k8s.io/v1`, ...), so a CRD that reuses a kind name is skipped too. A
    /// later document with the same kind, namespace and name replaces an earlier one.
    pub fn from_yaml(text: &str) -> Result<Self, TranslateError> {
        let mut objects = Self::default();
        for object in parse_yaml(text)? {
            objects.upsert(object);
        }
        Ok(objects)
    }

    /// Inserts or replaces one object.
    pub fn upsert(&mut self, object: KubeObject) {
        let key = object.key();
        match object {
            KubeObject::Namespace(o) => drop(self.namespaces.insert(key, o)),
            KubeObject::Pod(o) => drop(self.pods.insert(key, o)),
            KubeObject::Service(o) => drop(self.services.insert(key, o)),
            KubeObject::EndpointSlice(o) => drop(self.endpoint_slices.insert(key, o)),
            KubeObject::AuthorizationPolicy(o) => drop(self.authorization_policies.insert(key, o)),
            KubeObject::Gateway(o) => drop(self.gateways.insert(key, o)),
            KubeObject::HttpRoute(o) => drop(self.http_routes.insert(key, o)),
            KubeObject::GrpcRoute(o) => drop(self.grpc_routes.insert(key, o)),
            KubeObject::ReferenceGrant(o) => drop(self.reference_grants.insert(key, o)),
            KubeObject::RequestAuthentication(o) => {
                drop(self.request_authentications.insert(key, o))
            }
        }
    }

    /// Removes one object; true if it was there.
    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        match kind {
            Kind::Namespace => self.namespaces.remove(key).is_some(),
            Kind::Pod => self.pods.remove(key).is_some(),
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(key).is_some(),
            Kind::AuthorizationPolicy => self.authorization_policies.remove(key).is_some(),
            Kind::Gateway => self.gateways.remove(key).is_some(),
            Kind::HttpRoute => self.http_routes.remove(key).is_some(),
            Kind::GrpcRoute => self.grpc_routes.remove(key).is_some(),
            Kind::ReferenceGrant => self.reference_grants.remove(key).is_some(),
            Kind::RequestAuthentication => self.request_authentications.remove(key).is_some(),
        }
    }

    /// Drops every object of `kind` (before a re-list fills it again).
    pub fn clear(&mut self, kind: Kind) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Pod => self.pods.clear(),
            Kind::Service => self.services.clear(),
            Kind::EndpointSlice => self.endpoint_slices.clear(),
            Kind::AuthorizationPolicy => self.authorization_policies.clear(),
            Kind::Gateway => self.gateways.clear(),
            Kind::HttpRoute => self.http_routes.clear(),
            Kind::GrpcRoute => self.grpc_routes.clear(),
            Kind::ReferenceGrant => self.reference_grants.clear(),
            Kind::RequestAuthentication => self.request_authentications.clear(),
        }
    }

    /// How many objects of `kind` there are.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Namespace => self.namespaces.len(),
            Kind::Pod => self.pods.len(),
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.endpoint_slices.len(),
            Kind::AuthorizationPolicy => self.authorization_policies.len(),
            Kind::Gateway => self.gateways.len(),
            Kind::HttpRoute => self.http_routes.len(),
            Kind::GrpcRoute => self.grpc_routes.len(),
            Kind::ReferenceGrant => self.reference_grants.len(),
            Kind::RequestAuthentication => self.request_authentications.len(),
        }
    }
}

/// Parses multi-document YAML into the objects we read, in document order (see
/// [`Objects::from_yaml`]).
pub fn parse_yaml(text: &str) -> Result<Vec<KubeObject>, TranslateError> {
    // Bounded first: deep nesting costs the parser quadratic time.
    zmesh_core::yaml::check_limits(text)?;
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| TranslateError::Yaml { index, source })?;
        add(&mut out, index, value)?;
    }
    Ok(out)
}

fn add(
    out: &mut Vec<KubeObject>,
    index: usize,
    value: serde_yaml::Value,
) -> Result<(), TranslateError> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .ok_or(TranslateError::MissingKind { index })?
        .to_owned();
    let api_version = value
        .get("apiVersion")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
            for item in items {
                add(out, index, item.clone())?;
            }
        }
        return Ok(());
    }
    let object = KubeObject::from_value(value).map_err(|source| TranslateError::Object {
        index,
        kind: kind.clone(),
        source,
    })?;
    out.extend(object);
    Ok(())
}
