//! The CustomResourceDefinition `requestauthentications.security.istio.io`, generated from
//! the Rust types (kube's `CustomResource` derive on
//! [`RequestAuthenticationSpec`](super::RequestAuthenticationSpec)), served as `v1` and
//! `v1beta1` with one schema and stored as `v1beta1`, like Istio's own CRD
//! (`manifests/charts/base/files/crd-all.gen.yaml`) and like zmesh's AuthorizationPolicy CRD.

use super::RequestAuthenticationResource;
use crate::translate::authorization_policy::crd::istio_security_crd;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The CRD's file, relative to the repository root.
pub const CRD_FILE: &str = "manifests/crds/requestauthentications.security.istio.io.yaml";

/// The CRD zmesh installs.
pub fn crd() -> CustomResourceDefinition {
    istio_security_crd::<RequestAuthenticationResource>()
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
