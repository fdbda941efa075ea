//! The CustomResourceDefinition `requestauthentications.security.istio.io`, generated from
//! the Rust types (kube's `CustomResource` derive on
//! [`RequestAuthenticationSpec`](super::RequestAuthenticationSpec)), served as `v1` and
//! `v1beta1` with one schema and stored as `v1beta1`, like Istio's own CRD
//! (`manifests/charts/base/files/crd-all.gen.yaml`) and like zmesh's AuthorizationPolicy CRD.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;

use super::RequestAuthenticationResource;
use crate::translate::authorization_policy::crd::{SERVED_VERSIONS, STORAGE_VERSION, as_read};

/// The CRD's file, relative to the repository root.
pub const CRD_FILE: &str = "manifests/crds/requestauthentications.security.istio.io.yaml";

/// The CRD zmesh installs.
pub fn crd() -> CustomResourceDefinition {
    let mut v1 = RequestAuthenticationResource::crd();
    for version in &mut v1.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            as_read(schema);
            schema.required = None;
            schema.title = None;
        }
    }
    let per_version = SERVED_VERSIONS.map(|name| {
        let mut one = v1.clone();
        one.spec.versions[0].name = name.to_owned();
        one
    });
    let mut crd = merge_crds(per_version.into(), STORAGE_VERSION)
        .expect("the per-version CRDs differ only in their version name");
    crd.spec.versions.sort_by(|a, b| a.name.cmp(&b.name));
    crd
}

/// [`crd`] as the YAML checked in at [`CRD_FILE`].
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD serialises to YAML");
    format!(
        "# Generated from controller/src/translate/request_authentication.rs (kube's\n\
         # CustomResource derive); do not edit. Regenerate with:\n\
         #   ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller --test crd\n\
         {body}"
    )
}
