//! The translation input: Kubernetes objects, and their loading from multi-document YAML.

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

/// Errors loading objects from YAML. Each names the document (0-based, in file order) so an
/// operator can find the offending object.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
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

/// The Kubernetes objects the translation reads. Order does not matter: the output is sorted.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// `v1` Namespaces (their labels enrol pods and bind waypoints).
    pub namespaces: Vec<Namespace>,
    /// `v1` Pods.
    pub pods: Vec<Pod>,
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices (used for Services without a selector).
    pub endpoint_slices: Vec<EndpointSlice>,
}

impl Objects {
    /// Parses multi-document YAML. Documents of other kinds are skipped, as are empty
    /// documents; a `v1` `List` contributes its items. Kinds are matched with their `apiVersion`
    /// (`v1`, `discovery.k8s.io/v1`), so a CRD that reuses a kind name is skipped too.
    pub fn from_yaml(text: &str) -> Result<Self, TranslateError> {
        let mut objects = Self::default();
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .map_err(|source| TranslateError::Yaml { index, source })?;
            objects.add(index, value)?;
        }
        Ok(objects)
    }

    fn add(&mut self, index: usize, value: serde_yaml::Value) -> Result<(), TranslateError> {
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
        let err = |source| TranslateError::Object {
            index,
            kind: kind.clone(),
            source,
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => self
                .namespaces
                .push(serde_yaml::from_value(value).map_err(err)?),
            ("v1", "Pod") => self.pods.push(serde_yaml::from_value(value).map_err(err)?),
            ("v1", "Service") => self
                .services
                .push(serde_yaml::from_value(value).map_err(err)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => self
                .endpoint_slices
                .push(serde_yaml::from_value(value).map_err(err)?),
            ("v1", "List") => {
                if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
                    for item in items {
                        self.add(index, item.clone())?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
