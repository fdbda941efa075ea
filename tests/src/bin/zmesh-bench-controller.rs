//! `zmesh-bench-controller`: the control-plane benchmark; see `zmesh_tests::ctlbench` and
//! `docs/bench-controller-2026-11-23.md`. Generates a synthetic cluster (YAML directory), times
//! the translation in process, runs the real `zmesh-controller` on loopback with many delta ADS
//! clients over TLS (startup, initial push, one-Pod and one-policy change latency to every
//! client, controller memory), and the real `ztunnel` against it (memory per known workload).
//!
//! ```text
//! cargo build --profile bench-lto -p zmesh-controller -p ztunnel -p zmesh-tests --bins
//! sudo target/bench-lto/zmesh-bench-controller --report controller.md
//! ```
//!
//! Root is needed only for the ztunnel part (a private network namespace, so its fixed ports
//! cannot clash with the host's); without it, or with `--no-ztunnel`, that part is skipped.

fn main() -> anyhow::Result<()> {
    zmesh_tests::ctlbench::run::main()
}
