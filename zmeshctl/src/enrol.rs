//! `enrol` and `unenrol`: the namespace label the node agent captures pods by, as Istio
//! ambient's `istio.io/dataplane-mode=ambient`.

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::error::{Error, is_not_found};

/// The label.
pub const LABEL: &str = "istio.io/dataplane-mode";
/// Its value for an enrolled namespace.
pub const AMBIENT: &str = "ambient";
/// Namespaces the node agent never captures (its `--exclude-namespaces` in the manifests).
pub const EXCLUDED: [&str; 2] = ["kube-system", "istio-system"];

/// Labels (`enrol`) or unlabels the namespace `name`; other labels are left alone.
pub async fn set(client: &Client, name: &str, enrol: bool) -> Result<(), Error> {
    if enrol && EXCLUDED.contains(&name) {
        return Err(Error::NamespaceExcluded(name.to_owned()));
    }
    let api: Api<Namespace> = Api::all(client.clone());
    let before = match api.get(name).await {
        Ok(ns) => ns,
        Err(e) if is_not_found(&e) => return Err(Error::NamespaceNotFound(name.to_owned())),
        Err(e) => return Err(Error::api(format!("reading namespace {name}"))(e)),
    };
    let current = before
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL))
        .cloned();
    let (wanted, done) = if enrol {
        (Some(AMBIENT), "enrolled")
    } else {
        (None, "unenrolled")
    };
    if current.as_deref() == wanted {
        println!("namespace {name} is already {done}");
        return Ok(());
    }
    // A JSON merge patch of the one label, as `kubectl label` sends it.
    let patch = json!({"metadata": {"labels": {LABEL: wanted}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            if is_not_found(&e) {
                Error::NamespaceNotFound(name.to_owned())
            } else {
                Error::api(format!("labelling namespace {name}"))(e)
            }
        })?;
    if enrol {
        println!(
            "namespace {name} enrolled ({LABEL}={AMBIENT}): the node agent captures its pods, \
             running and new, into ztunnel"
        );
    } else {
        println!("namespace {name} unenrolled: the node agent releases its pods from ztunnel");
    }
    Ok(())
}
