//! Golden tests of the AuthorizationPolicy → `istio.security.Authorization` translation: every
//! `golden/authz/<case>.in.yaml` is translated with the default mesh config (root namespace
//! `istio-system`) and compared with `<case>.out.json`, which holds the Authorizations keyed by
//! resource name and the issues reported. Run with `ZMESH_UPDATE_GOLDEN=1` to rewrite the
//! expected files (then review the diff by hand).

#[macro_use]
mod common;

use serde_json::{Map, Value, json};
use zmesh_controller::translate::{
    MeshConfig, Objects, authorization_json, translate, translate_policies,
};

const SET: &str = "authz";

fn render(objects: &Objects) -> Value {
    let (authorizations, issues) = translate_policies(objects, &MeshConfig::default());
    let authorizations: Map<String, Value> = authorizations
        .iter()
        .map(|(k, a)| (k.clone(), authorization_json(a)))
        .collect();
    json!({ "authorizations": authorizations, "issues": issues })
}

fn check(case: &str) {
    let objects = common::input(SET, case);
    let actual = render(&objects);

    // The full translation carries the same Authorizations and issues.
    let translated = translate(&objects, &MeshConfig::default());
    let (authorizations, issues) = translate_policies(&objects, &MeshConfig::default());
    assert_eq!(translated.authorizations, authorizations, "{case}");
    assert_eq!(translated.issues, issues, "{case}");

    common::compare(SET, case, &actual);
}

golden!(
    SET;
    scopes,
    allow_deny,
    source_fields,
    operation_fields,
    when_keys,
    l7_allow,
    l7_deny,
    audit_custom,
    dry_run,
    bad_values_allow,
    bad_values_deny,
    target_refs,
    empty_rules,
    unknown_fields,
);
