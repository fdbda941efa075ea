//! The CustomResourceDefinition `authorizationpolicies.security.istio.io`, generated from the
//! Rust types (kube's `CustomResource` derive on
//! [`AuthorizationPolicySpec`](super::AuthorizationPolicySpec)).
//!
//! Like Istio's own CRD it serves `v1` and `v1beta1` with one schema and stores `v1beta1`, so
//! it can replace Istio's CRD, or be replaced by it, without touching stored objects (Istio's
//! `manifests/charts/base/files/crd-all.gen.yaml`: `v1` `storage: false`, `v1beta1`
//! `storage: true`). The checked-in copy is [`CRD_FILE`]; a test keeps it equal to [`crd_yaml`]
//! (`ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller --test crd` rewrites it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;
use kube::core::crd::merge_crds;

use super::AuthorizationPolicyResource;

/// The CRD's file, relative to the repository root.
pub const CRD_FILE: &str = "manifests/crds/authorizationpolicies.security.istio.io.yaml";
/// The version objects are stored as (Istio's choice, kept for compatibility).
pub const STORAGE_VERSION: &str = "v1beta1";
/// The versions served, all with the same schema (no conversion is needed).
pub const SERVED_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// The CRD zmesh installs: `v1` and `v1beta1` served, `v1beta1` stored.
pub fn crd() -> CustomResourceDefinition {
    istio_security_crd::<AuthorizationPolicyResource>()
}

/// The CRD of an Istio `security.istio.io` kind from its Rust type `K`, as Istio ships them:
/// every [`SERVED_VERSIONS`] with one schema, stored as [`STORAGE_VERSION`], the schema as zmesh
/// reads objects ([`as_read`]).
pub(crate) fn istio_security_crd<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut v1 = K::crd();
    for version in &mut v1.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            as_read(schema);
            // Like Istio's: an object without `spec` is valid (read as an empty spec; for an
            // AuthorizationPolicy an ALLOW that matches nothing), and the root has no title (the
            // derive names its Rust type).
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

/// Makes the schema describe objects as zmesh reads them, as Istio's CRD does: no `default`s
/// (schemars writes one for each `#[serde(default)]` field, and the API server would then
/// store objects other than those applied) and no `nullable` (a `null` is pruned, i.e. read
/// as absent, which is what the types do with it).
pub(crate) fn as_read(schema: &mut JSONSchemaProps) {
    schema.default = None;
    schema.nullable = None;
    let children = schema.properties.iter_mut().flat_map(|p| p.values_mut());
    let items = match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(one)) => vec![&mut **one],
        Some(JSONSchemaPropsOrArray::Schemas(many)) => many.iter_mut().collect(),
        None => Vec::new(),
    };
    let additional = match &mut schema.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(one)) => Some(&mut **one),
        _ => None,
    };
    let combined = [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flat_map(|list| list.iter_mut().flatten());
    let not = schema.not.as_deref_mut();
    for child in children
        .chain(items)
        .chain(additional)
        .chain(combined)
        .chain(not)
    {
        as_read(child);
    }
}

/// [`crd`] as the YAML checked in at [`CRD_FILE`], with a header saying where it comes from.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD serialises to YAML");
    format!(
        "# Generated from controller/src/translate/authorization_policy.rs (kube's CustomResource\n\
         # derive); do not edit. Regenerate with:\n\
         #   ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller --test crd\n\
         {body}"
    )
}

/// The schema of `spec.provider` (the external authorizer of a `CUSTOM` policy), as Istio's
/// CRD has it.
pub(super) fn provider_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The external authorizer of a `CUSTOM` policy.",
        "type": "object",
        "properties": {
            "name": {
                "description": "The name of the extension provider (in the mesh config).",
                "type": "string",
            },
        },
    })
}
