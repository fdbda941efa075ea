//! `zmesh-lab check` on a machine that lacks tools: it names each missing one with the package
//! that provides it and exits non-zero, before it needs root or builds anything. The machine
//! is faked with `PATH` and `--cni-bin-dir` pointing at directories of stand-in executables.

use std::os::unix::fs::symlink;
use std::process::Command;

use zmesh_tests::tools::{self, Location};

#[test]
fn check_names_each_missing_tool_and_its_package() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let cni = dir.path().join("cni");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&cni).unwrap();
    // Every tool of scripts/tools.txt is there (a stand-in) except nft and host-local.
    for tool in tools::tools() {
        if tool.name == "nft" || tool.name == "host-local" {
            continue;
        }
        let place = match tool.location {
            Location::Path => &bin,
            Location::CniBin => &cni,
        };
        symlink("/bin/true", place.join(&tool.name)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_zmesh-lab"))
        .arg("check")
        .arg("--cni-bin-dir")
        .arg(&cni)
        .env("PATH", &bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let missing: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("MISSING"))
        .collect();
    assert_eq!(
        missing,
        [
            "MISSING  nft                       not found on PATH: install the package nftables"
                .to_owned(),
            format!(
                "MISSING  host-local                not found in {}: install the package \
                 containernetworking-plugins",
                cni.display()
            ),
        ],
        "stdout:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "ok       ip                        {}\n",
            bin.join("ip").display()
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("missing tools: install containernetworking-plugins nftables"),
        "{stderr}"
    );
}
