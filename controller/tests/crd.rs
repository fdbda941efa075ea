//! The checked-in CRD (`manifests/crds/`) is exactly what the Rust types generate.
//! `ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller --test crd` rewrites it.

use std::path::PathBuf;

use zmesh_controller::translate::authorization_policy_crd as crd;

fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

#[test]
fn checked_in_crd_equals_the_generated_one() {
    let path = repo_file(crd::CRD_FILE);
    let generated = crd::crd_yaml();
    if std::env::var_os("ZMESH_UPDATE_MANIFESTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        checked_in == generated,
        "{} differs from what the types in controller/src/translate/authorization_policy.rs \
         generate; regenerate it with ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller \
         --test crd\n--- generated ---\n{generated}",
        path.display()
    );
}

#[test]
fn serves_v1_and_v1beta1_with_one_schema_and_stores_v1beta1_like_istio() {
    let crd = crd::crd();
    let versions: Vec<(&str, bool, bool)> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(versions, [("v1", true, false), ("v1beta1", true, true)]);
    assert_eq!(crd.spec.versions[0].schema, crd.spec.versions[1].schema);
    let subresources = crd.spec.versions[1].subresources.as_ref().unwrap();
    assert!(
        subresources.status.is_some(),
        "status is written through /status"
    );
}

#[test]
fn schema_has_no_defaults_and_does_not_require_spec() {
    let schema = serde_json::to_value(&crd::crd().spec.versions[0].schema).unwrap();
    let text = schema.to_string();
    assert!(!text.contains("\"default\""), "{text}");
    assert!(!text.contains("\"nullable\""), "{text}");
    assert!(
        schema["openAPIV3Schema"].get("required").is_none(),
        "{schema}"
    );
}

#[test]
fn checked_in_request_authentication_crd_equals_the_generated_one() {
    use zmesh_controller::translate::request_authentication_crd as ra;
    let path = repo_file(ra::CRD_FILE);
    let generated = ra::crd_yaml();
    if std::env::var_os("ZMESH_UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        checked_in == generated,
        "{} differs from what controller/src/translate/request_authentication.rs generates; \
         regenerate it with ZMESH_UPDATE_MANIFESTS=1 cargo test -p zmesh-controller --test crd",
        path.display()
    );
    let crd = ra::crd();
    let versions: Vec<(&str, bool, bool)> = crd
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(versions, [("v1", true, false), ("v1beta1", true, true)]);
}
