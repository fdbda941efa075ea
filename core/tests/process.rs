//! `prefer_vector_copies`: the same process starts over with glibc's tunable set, on AMD CPUs
//! with glibc only. Run for real: this test binary starts itself as the child, which calls it.

use std::process::Command;

use zmesh_core::process::{REP_MOVSB_TUNABLE, STARTED_OVER, prefer_vector_copies};

const CHILD: &str = "ZMESH_TEST_VECTOR_COPIES_CHILD";
const TEST: &str = "the_same_process_starts_over_with_vector_copies_on_amd";

/// `name` of the environment this process was started with (not what it changed since).
fn started_with(name: &str) -> String {
    let environ = std::fs::read("/proc/self/environ").unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_same_process_starts_over_with_vector_copies_on_amd() {
    if std::env::var_os(CHILD).is_some() {
        // The child: on AMD this does not return the first time; the program starts over,
        // runs this test again, and then it returns.
        println!("start: pid={}", std::process::id());
        prefer_vector_copies().expect("the exec failed");
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        println!(
            "child: pid={} comm={} tunables={}",
            std::process::id(),
            comm.trim(),
            started_with("GLIBC_TUNABLES")
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(&exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("GLIBC_TUNABLES")
        // Inherited from another process (PID 1 is never this test's): not this one's marker.
        .env(STARTED_OVER, "1:inherited")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the child failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let said = |what: &str| -> Vec<String> {
        stdout
            .lines()
            .filter_map(|l| l.split_once(what).map(|(_, said)| said.trim().to_owned()))
            .collect()
    };
    let starts = said("start: ");
    let ends = said("child: ");
    assert_eq!(ends.len(), 1, "{stdout}");
    let line = &ends[0];
    // The same PID: the program was started over in place, not spawned beside itself; and
    // under the name it had (the kernel's is the file's: `exe`).
    assert!(line.starts_with(&format!("pid={pid} ")), "{line}");
    let name: String = exe
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .take(15)
        .collect();
    assert!(line.contains(&format!(" comm={name} ")), "{line}");
    let tunables = line.split_once("tunables=").unwrap().1;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let amd = cpuinfo.contains("AuthenticAMD") || cpuinfo.contains("HygonGenuine");
    let glibc = cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    ));
    if amd && glibc {
        assert_eq!(
            starts,
            [format!("pid={pid}"), format!("pid={pid}")],
            "{stdout}"
        );
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
        assert_eq!(starts, [format!("pid={pid}")], "started over: {stdout}");
        assert_eq!(tunables, "", "started over on a CPU or libc it is not for");
    }
}
