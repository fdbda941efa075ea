//! `prefer_vector_copies`: the same process starts over with glibc's tunable set, on AMD CPUs
//! with glibc only. Run for real: this test binary starts itself as the child, which calls it.

use std::process::Command;

use zmesh_core::process::{REP_MOVSB_TUNABLE, prefer_vector_copies};

const CHILD: &str = "ZMESH_TEST_VECTOR_COPIES_CHILD";
const TEST: &str = "the_same_process_starts_over_with_vector_copies_on_amd";

#[test]
fn the_same_process_starts_over_with_vector_copies_on_amd() {
    if std::env::var_os(CHILD).is_some() {
        // The child: on AMD this does not return; the program starts over, runs this test
        // again, and then it returns (the tunable is set).
        prefer_vector_copies().expect("the exec failed");
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        println!("child: pid={} tunables={tunables}", std::process::id());
        return;
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("GLIBC_TUNABLES")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the child failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("child: ").map(|(_, said)| said))
        .unwrap_or_else(|| panic!("the child said nothing: {stdout}"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let amd = cpuinfo.contains("AuthenticAMD");
    let glibc = cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    ));
    // The same PID: the program was started over in place, not spawned beside itself.
    assert!(line.starts_with(&format!("pid={pid} ")), "{line}");
    let tunables = line.split_once("tunables=").unwrap().1.trim();
    if amd && glibc {
        assert!(
            tunables.starts_with(&format!("{REP_MOVSB_TUNABLE}=")),
            "not started over with the tunable: {line}"
        );
        // glibc takes the value (ld.so lists a tunable it rejected with its default).
        let listed = Command::new("/lib64/ld-linux-x86-64.so.2")
            .arg("--list-tunables")
            .env("GLIBC_TUNABLES", tunables)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        let value = tunables.split_once('=').unwrap().1;
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(&format!("{REP_MOVSB_TUNABLE}: {value} "))),
            "glibc did not take {tunables}: {listed}"
        );
    } else {
        assert_eq!(tunables, "", "started over on a CPU or libc it is not for");
    }
}
