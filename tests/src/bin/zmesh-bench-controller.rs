//! `zmesh-bench-controller`: the control-plane benchmark; see `zmesh_tests::ctlbench` and
//! `docs/bench-controller-2026-11-23.md`.

fn main() -> anyhow::Result<()> {
    zmesh_tests::ctlbench::run::main()
}
