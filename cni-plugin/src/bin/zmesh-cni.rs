//! `zmesh-cni`: the chained CNI plugin binary. The container runtime executes it with
//! the `CNI_*` environment and the request on stdin; the result (or error) JSON goes to
//! stdout and nothing else does. All logic lives in [`zmesh_cni::plugin::run`].

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let output =
        zmesh_cni::plugin::run(|name| std::env::var_os(name), &mut std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(&output.stdout)
        .and_then(|()| stdout.flush())
    {
        // The only channel left; runtimes show stderr when stdout is empty.
        eprintln!("zmesh-cni: cannot write the result to stdout: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::from(output.exit_code)
}
