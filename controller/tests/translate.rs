//! Golden tests of the Kubernetes → workload API translation: every
//! `golden/translate/<case>.in.yaml` is translated with the default mesh config and compared
//! with `<case>.out.json`. Run with `ZMESH_UPDATE_GOLDEN=1` to rewrite the expected files
//! (then review the diff by hand).

#[macro_use]
mod common;

use zmesh_controller::translate::{MeshConfig, to_json, translate};

const SET: &str = "translate";

fn check(case: &str) {
    let objects = common::input(SET, case);
    let translated = translate(&objects, &MeshConfig::default());
    common::compare(SET, case, &to_json(&translated));
}

golden!(
    SET;
    enrolled_service,
    unenrolled_namespace,
    opted_out_pod,
    skipped_pods,
    headless_service,
    waypoints,
    canonical_labels,
    endpoint_slices,
);
