//! Golden tests of the AuthorizationPolicy → `istio.security.Authorization` translation: every
//! `golden/authz/<case>.in.yaml` is translated with the default mesh config (root namespace
//! `istio-system`) and compared with `<case>.out.json`, which holds the Authorizations keyed by
//! resource name and the issues reported. Run with `ZMESH_UPDATE_GOLDEN=1` to rewrite the
//! expected files (then review the diff by hand).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use zmesh_controller::translate::{
    MeshConfig, Objects, authorization_json, translate, translate_policies,
};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/authz")
}

fn render(objects: &Objects) -> Value {
    let (authorizations, issues) = translate_policies(objects, &MeshConfig::default());
    let authorizations: Map<String, Value> = authorizations
        .iter()
        .map(|(k, a)| (k.clone(), authorization_json(a)))
        .collect();
    json!({ "authorizations": authorizations, "issues": issues })
}

fn check(case: &str) {
    let dir = golden_dir();
    let input = fs::read_to_string(dir.join(format!("{case}.in.yaml")))
        .unwrap_or_else(|e| panic!("read {case}.in.yaml: {e}"));
    let objects = Objects::from_yaml(&input).unwrap_or_else(|e| panic!("{case}: {e}"));
    let actual = serde_json::to_string_pretty(&render(&objects)).unwrap() + "\n";

    // The full translation carries the same Authorizations and issues.
    let translated = translate(&objects, &MeshConfig::default());
    let (authorizations, issues) = translate_policies(&objects, &MeshConfig::default());
    assert_eq!(translated.authorizations, authorizations, "{case}");
    assert_eq!(translated.issues, issues, "{case}");

    let out = dir.join(format!("{case}.out.json"));
    if std::env::var_os("ZMESH_UPDATE_GOLDEN").is_some() {
        fs::write(&out, &actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&out).unwrap_or_else(|e| {
        panic!("read {case}.out.json: {e} (run with ZMESH_UPDATE_GOLDEN=1 to create it)")
    });
    assert!(
        expected == actual,
        "{case}: translation differs from {case}.out.json \
         (ZMESH_UPDATE_GOLDEN=1 to update)\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

macro_rules! golden {
    ($($name:ident),* $(,)?) => {
        $(#[test]
        fn $name() {
            check(stringify!($name));
        })*

        #[test]
        fn every_golden_input_has_a_test() {
            let known = [$(stringify!($name)),*];
            for entry in fs::read_dir(golden_dir()).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                if let Some(case) = name.strip_suffix(".in.yaml") {
                    assert!(known.contains(&case), "golden input {name} has no test");
                }
            }
        }
    };
}

golden!(
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
