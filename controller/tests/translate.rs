//! Golden tests of the Kubernetes → workload API translation: every
//! `golden/translate/<case>.in.yaml` is translated with the default mesh config and compared
//! with `<case>.out.json`. Run with `ZMESH_UPDATE_GOLDEN=1` to rewrite the expected files
//! (then review the diff by hand).

use std::fs;
use std::path::{Path, PathBuf};

use zmesh_controller::translate::{MeshConfig, Objects, to_json, translate};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/translate")
}

fn check(case: &str) {
    let dir = golden_dir();
    let input = fs::read_to_string(dir.join(format!("{case}.in.yaml")))
        .unwrap_or_else(|e| panic!("read {case}.in.yaml: {e}"));
    let objects = Objects::from_yaml(&input).unwrap_or_else(|e| panic!("{case}: {e}"));
    let translated = translate(&objects, &MeshConfig::default());
    let actual = serde_json::to_string_pretty(&to_json(&translated)).unwrap() + "\n";
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
    };
}

golden!(
    enrolled_service,
    unenrolled_namespace,
    opted_out_pod,
    skipped_pods,
    headless_service,
    waypoints,
    canonical_labels,
    endpoint_slices,
);

#[test]
fn every_golden_input_has_a_test() {
    let known = [
        "enrolled_service",
        "unenrolled_namespace",
        "opted_out_pod",
        "skipped_pods",
        "headless_service",
        "waypoints",
        "canonical_labels",
        "endpoint_slices",
    ];
    for entry in fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(case) = name.strip_suffix(".in.yaml") {
            assert!(known.contains(&case), "golden input {name} has no test");
        }
    }
}
