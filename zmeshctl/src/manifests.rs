//! The install manifests, built into the binary (`manifests/rendered/zmesh.yaml`, which
//! `scripts/render-manifests` makes from the kustomization), and their rendering with the
//! install options. Only the `image:` fields (and the controller's `--waypoint-image`) change
//! with `--hub` and `--tag`, the way `kustomize edit set image` changes them; everything else is the checked-in file byte for
//! byte, so `zmeshctl install --dry-run` is `kubectl kustomize manifests/`.

use serde::Deserialize;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use crate::error::Error;

/// The rendered manifests, as checked in.
pub const RENDERED: &str = include_str!("../../manifests/rendered/zmesh.yaml");

/// The namespace everything lives in (Istio's, where its clients look).
pub const NAMESPACE: &str = "istio-system";

/// The images the manifests run (`<hub>/<name>:<tag>`).
pub const IMAGES: [&str; 3] = ["zmesh-controller", "zmesh-ztunnel", "zmesh-cni"];

/// Install options that change the YAML.
#[derive(Debug, Clone, Default)]
pub struct Values {
    /// Image repository prefix (`<hub>/zmesh-controller:<tag>`); the manifests' when `None`.
    pub hub: Option<String>,
    /// Image tag; the manifests' when `None`.
    pub tag: Option<String>,
}

/// One object of the manifests, ready to apply.
#[derive(Debug, Clone)]
pub struct Object {
    /// Where the API serves its kind.
    pub resource: ApiResource,
    /// Whether the kind is namespaced.
    pub namespaced: bool,
    /// The object.
    pub object: DynamicObject,
}

impl Object {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or("")
    }

    /// `Kind namespace/name` or `Kind name`, for progress lines.
    pub fn describe(&self) -> String {
        match (&self.object.metadata.namespace, self.namespaced) {
            (Some(ns), true) => format!("{} {ns}/{}", self.resource.kind, self.name()),
            _ => format!("{} {}", self.resource.kind, self.name()),
        }
    }
}

/// The kinds the manifests hold: (apiVersion, kind, plural, namespaced). A static table, as
/// the manifests are built in; a test checks that it covers all of them.
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    (
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("v1", "Service", "services", true),
    ("apps/v1", "Deployment", "deployments", true),
    (
        "policy/v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
    ),
    ("apps/v1", "DaemonSet", "daemonsets", true),
    (
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "gatewayclasses",
        false,
    ),
];

/// The API resource of `apiVersion`/`kind`, and whether it is namespaced.
pub fn resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let &(_, _, plural, namespaced) = KINDS
        .iter()
        .find(|(v, k, _, _)| *v == api_version && *k == kind)?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

/// The hub and tag the checked-in manifests use (of their first image).
pub fn defaults() -> Result<(String, String), Error> {
    let image = image_lines(RENDERED)
        .next()
        .ok_or_else(|| Error::Embedded("no image: field".into()))?;
    let (repo, tag) = image
        .rsplit_once(':')
        .ok_or_else(|| Error::Embedded(format!("image {image:?} has no tag")))?;
    let (hub, _) = repo
        .rsplit_once('/')
        .ok_or_else(|| Error::Embedded(format!("image {image:?} has no hub")))?;
    Ok((hub.to_owned(), tag.to_owned()))
}

/// The values of the `image:` fields, in order.
fn image_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("image: "))
        .map(str::trim)
}

/// Whether `hub` is a plausible image repository prefix (a registry host with an optional
/// port, then path components), as container image references define them.
fn valid_hub(hub: &str) -> bool {
    let mut parts = hub.split('/');
    let host = parts.next().unwrap_or("");
    let (host, port) = host.split_once(':').unwrap_or((host, "0"));
    let component = |c: &str| {
        !c.is_empty()
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    component(host) && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) && {
        let rest: Vec<&str> = parts.collect();
        rest.iter().all(|c| component(c))
    }
}

/// Whether `tag` is an image tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The manifests with `values` applied, as YAML: the checked-in file with its `image:` fields
/// rewritten.
pub fn render(values: &Values) -> Result<String, Error> {
    let (default_hub, default_tag) = defaults()?;
    let hub = values.hub.as_deref().unwrap_or(&default_hub);
    let tag = values.tag.as_deref().unwrap_or(&default_tag);
    if !valid_hub(hub) {
        return Err(Error::BadHub(hub.to_owned()));
    }
    if !valid_tag(tag) {
        return Err(Error::BadTag(tag.to_owned()));
    }
    let mut out = String::with_capacity(RENDERED.len());
    for line in RENDERED.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let indent = &body[..body.len() - body.trim_start().len()];
        let image = body.trim_start().strip_prefix("image: ").map(str::trim);
        let name = image.and_then(|i| {
            IMAGES
                .iter()
                .find(|n| i == format!("{default_hub}/{n}:{default_tag}"))
        });
        // The controller's flag naming the waypoints' image follows the same hub and tag.
        let waypoint = format!("- --waypoint-image={default_hub}/zmesh-waypoint:{default_tag}");
        if body.trim_start() == waypoint {
            out.push_str(&format!(
                "{indent}- --waypoint-image={hub}/zmesh-waypoint:{tag}\n"
            ));
            continue;
        }
        match (image, name) {
            (Some(_), Some(name)) => {
                out.push_str(&format!("{indent}image: {hub}/{name}:{tag}\n"));
            }
            (Some(i), None) => {
                return Err(Error::Embedded(format!(
                    "image {i:?} is not {default_hub}/<one of {IMAGES:?}>:{default_tag}"
                )));
            }
            _ => out.push_str(line),
        }
    }
    Ok(out)
}

/// The objects of rendered manifests, in file order (the order to apply them in).
pub fn objects(yaml: &str) -> Result<Vec<Object>, Error> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Embedded(format!("YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(value)
            .map_err(|e| Error::Embedded(format!("an object: {e}")))?;
        let types = object
            .types
            .clone()
            .ok_or_else(|| Error::Embedded("an object without apiVersion/kind".into()))?;
        let (resource, namespaced) =
            resource(&types.api_version, &types.kind).ok_or_else(|| {
                Error::Embedded(format!(
                    "kind {} {} is not in zmeshctl's table",
                    types.api_version, types.kind
                ))
            })?;
        out.push(Object {
            resource,
            namespaced,
            object,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_values_render_the_checked_in_file_and_every_kind_is_known() {
        assert_eq!(render(&Values::default()).unwrap(), RENDERED);
        let objects = objects(RENDERED).unwrap();
        let kinds: Vec<String> = objects.iter().map(|o| o.resource.kind.clone()).collect();
        for kind in [
            "Namespace",
            "CustomResourceDefinition",
            "Deployment",
            "DaemonSet",
        ] {
            assert!(
                kinds.iter().any(|k| k == kind),
                "{kind} missing in {kinds:?}"
            );
        }
        for o in &objects {
            assert_eq!(
                o.object.metadata.namespace.as_deref(),
                o.namespaced.then_some(NAMESPACE),
                "{}",
                o.describe()
            );
        }
        assert_eq!(image_lines(RENDERED).count(), IMAGES.len());
    }

    #[test]
    fn bad_hubs_and_tags_are_refused() {
        for hub in ["", "Reg/x", "reg/x/", "reg:/x", "a b", "reg//x", "-reg"] {
            let values = Values {
                hub: Some(hub.into()),
                tag: None,
            };
            assert!(matches!(render(&values), Err(Error::BadHub(_))), "{hub:?}");
        }
        for tag in ["", ".x", "-x", "a:b", "a/b", &"x".repeat(129)] {
            let values = Values {
                hub: None,
                tag: Some(tag.into()),
            };
            assert!(matches!(render(&values), Err(Error::BadTag(_))), "{tag:?}");
        }
        for hub in ["localhost:5000/zmesh", "ghcr.io/a-b/c_d", "registry"] {
            let values = Values {
                hub: Some(hub.into()),
                tag: Some("v1.2.3-rc.1".into()),
            };
            assert!(render(&values).is_ok(), "{hub:?}");
        }
    }

    #[test]
    fn the_waypoint_image_follows_hub_and_tag() {
        let values = Values {
            hub: Some("reg.example/m".into()),
            tag: Some("9.9.9".into()),
        };
        let yaml = render(&values).unwrap();
        assert!(
            yaml.contains("- --waypoint-image=reg.example/m/zmesh-waypoint:9.9.9\n"),
            "{yaml}"
        );
        assert!(RENDERED.contains("- --waypoint-image="));
    }
}
