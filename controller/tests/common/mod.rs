//! The golden-file harness shared by `tests/authz.rs` and `tests/translate.rs`: a set is the
//! directory `tests/golden/<set>/`, a case its `<case>.in.yaml` (Kubernetes objects) and
//! `<case>.out.json` (the expected rendering). Run with `ZMESH_UPDATE_GOLDEN=1` to rewrite the
//! expected files (then review the diff by hand).

use std::fs;
use std::path::{Path, PathBuf};

use zmesh_controller::translate::Objects;

fn golden_dir(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(set)
}

/// The objects of `<case>.in.yaml`.
pub fn input(set: &str, case: &str) -> Objects {
    let input = fs::read_to_string(golden_dir(set).join(format!("{case}.in.yaml")))
        .unwrap_or_else(|e| panic!("read {case}.in.yaml: {e}"));
    Objects::from_yaml(&input).unwrap_or_else(|e| panic!("{case}: {e}"))
}

/// Compares `actual`, pretty-printed, with `<case>.out.json` (or rewrites the file).
pub fn compare(set: &str, case: &str, actual: &serde_json::Value) {
    let actual = serde_json::to_string_pretty(actual).unwrap() + "\n";
    let out = golden_dir(set).join(format!("{case}.out.json"));
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

/// Fails on an input of `set` that is not in `known` (a case nobody runs).
pub fn every_input_has_a_test(set: &str, known: &[&str]) {
    for entry in fs::read_dir(golden_dir(set)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(case) = name.strip_suffix(".in.yaml") {
            assert!(known.contains(&case), "golden input {name} has no test");
        }
    }
}

/// One `#[test]` per case, each calling the file's `check(case)`, and a test that every input
/// of the set has one.
macro_rules! golden {
    ($set:expr; $($name:ident),* $(,)?) => {
        $(#[test]
        fn $name() {
            check(stringify!($name));
        })*

        #[test]
        fn every_golden_input_has_a_test() {
            common::every_input_has_a_test($set, &[$(stringify!($name)),*]);
        }
    };
}
