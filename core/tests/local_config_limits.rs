//! The local config parser refuses deeply nested documents quickly, naming the limit
//! (100,000 nested levels used to cost libyaml more than half a minute of CPU).

use zmesh_core::state::LocalConfig;

#[test]
fn hundred_thousand_nested_levels_are_refused_naming_the_limit() {
    let flow = format!(
        "workloads: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let block = format!("workloads:\n{}x\n", "- ".repeat(100_000));
    for doc in [flow, block] {
        let err = LocalConfig::parse(&doc).unwrap_err().to_string();
        assert!(
            err.contains("nested more than 128 levels"),
            "not refused for its depth: {err}"
        );
    }
}
