//! Process set-up both proxies do first in `main`, before they start their runtime.

/// Busy nodes run out of descriptors at the default soft limit; take the hard limit.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`, prctl(2)).
///
/// mimalloc reserves a 1 GiB arena and, unless built with its `no_thp` feature, asks for huge
/// pages on it when the kernel allows THP (`madvise` or `always` in
/// `/sys/kernel/mm/transparent_hugepage/enabled`): the first small allocations in each 2 MiB
/// of it then make 2 MiB resident. Measured on an idle ztunnel with 10 known workloads: 21 MiB
/// RSS, 8 MiB of it huge pages, against 12 MiB with THP off (with the smaller log queue). A
/// proxy's working set is buffers and small records, not large arrays that would gain from
/// fewer TLB misses; `zmesh-bench` measured no speed change beyond the machine's run-to-run
/// spread, and a quarter less peak RSS under load (docs/bench-2026-12-06.md).
///
/// Both layers are kept. The workspace builds mimalloc with `no_thp`, so it never asks, not
/// even in its start-up before `main`, which this call comes too late for: with the advice
/// set there, an idle ztunnel kept 1.7 MiB more anonymous memory (12.4 against 10.7 MiB RSS,
/// though no huge page was left when it was read). And this call keeps a node whose THP
/// setting is `always` from giving huge pages to any other mapping. It applies to pages
/// touched from then on: call it before the runtime starts. The caller logs a failure once
/// logging is set up (this runs before it).
pub fn disable_transparent_huge_pages() -> nix::Result<()> {
    nix::sys::prctl::set_thp_disable(true)
}

/// glibc's tunable for the size from which `memcpy` and `memmove` copy with `rep movsb`
/// (glibc manual, "Hardware Capability Tunables").
pub const REP_MOVSB_TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// The threshold set: above any copy a proxy makes (a TLS record is 16 KiB, a read at most
/// 16 MiB), so its copies use glibc's vector loop.
const REP_MOVSB_THRESHOLD: &str = "0x40000000";

/// Set in the environment of the program started over, to `PID:NAME`, the process's ID and
/// the name it had: the kernel names a process after the file it runs (here `exe`), and the
/// program takes its name back. With its own PID in it, the program never starts over twice.
pub const STARTED_OVER: &str = "ZMESH_STARTED_OVER";

/// Has glibc copy with vector instructions instead of `rep movsb` on AMD CPUs, by starting
/// this program again at once with [`REP_MOVSB_TUNABLE`] raised in `GLIBC_TUNABLES` (glibc
/// reads its tunables only as a program starts). Call it first in `main`: on success it does
/// not return, and the same process (same PID, arguments, environment plus the tunable and
/// [`STARTED_OVER`], descriptors, name) starts over.
///
/// Why: on AMD Zen, `rep movsb` copies about 30 times slower when the destination lies a few
/// bytes past the source modulo 4 KiB (16 KiB copies on this project's test machine: 2.7
/// GB/s, against 50-95 GB/s with the vector loop). rustls copies each TLS record's plaintext
/// from the proxy's read buffer into a new record buffer, five bytes past its start; where the
/// allocator places both at the same offset in a page, every record's copy is that case.
/// Under bulk load those copies were a fifth of a sending ztunnel's CPU, and 7 % with the
/// vector loop (`docs/bench-2026-12-06.md`, ninth sitting). glibc 2.36, which Debian 12 and
/// the images' distroless base ship, copies with `rep movsb` from about 2 KiB up on such CPUs.
///
/// Does nothing on other CPUs (AMD's and Hygon's Zen cores are the ones it is for) and C
/// libraries; when `GLIBC_TUNABLES` already names the tunable (an operator's own choice); in
/// secure mode (set-user-ID or file capabilities), where glibc ignores the tunable; when
/// `/proc/self/exe` cannot be read, or is the dynamic loader run as the program
/// (`ld.so PROGRAM`: no program interpreter in the auxiliary vector). Tools that run
/// the program themselves (valgrind) would lose it at the exec: give them the tunable. Returns
/// the exec's error if it failed (the caller logs it once logging is set up; the program runs
/// on unchanged).
pub fn prefer_vector_copies() -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::CommandExt;
        let pid = std::process::id();
        if let Some(marker) = std::env::var_os(STARTED_OVER) {
            // `PID:NAME`, set by this process before its exec; a child that inherited it (its
            // own PID differs) starts over on its own.
            let marker = marker.as_bytes();
            let ours = format!("{pid}:");
            if let Some(name) = marker.strip_prefix(ours.as_bytes()) {
                take_name(name);
                return Ok(());
            }
        }
        // SAFETY: getauxval only reads the auxiliary vector the kernel gave this process.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return Ok(());
        }
        // No program interpreter: the dynamic loader run as the program (`ld.so PROGRAM`),
        // whose /proc/self/exe is the loader, not the program.
        // SAFETY: as above.
        if unsafe { libc::getauxval(libc::AT_BASE) } == 0 {
            return Ok(());
        }
        if std::fs::read_link("/proc/self/exe").is_err() {
            return Ok(());
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let current = std::env::var("GLIBC_TUNABLES").ok();
        if let Some(tunables) = tunables_for(cpu_vendor(&cpuinfo), current.as_deref()) {
            let mut marker = format!("{pid}:").into_bytes();
            let name = std::fs::read("/proc/self/comm").unwrap_or_default();
            marker.extend_from_slice(name.strip_suffix(b"\n").unwrap_or(&name));
            let mut args = std::env::args_os();
            let mut cmd = std::process::Command::new("/proc/self/exe");
            if let Some(arg0) = args.next() {
                cmd.arg0(arg0);
            }
            return Err(cmd
                .args(args)
                .env("GLIBC_TUNABLES", tunables)
                .env(STARTED_OVER, std::ffi::OsStr::from_bytes(&marker))
                .exec());
        }
    }
    Ok(())
}

/// Gives the process back its name: the main thread's (proc(5), `/proc/pid/comm`), from
/// whichever thread; where /proc is read-only, the calling thread's (the main thread, called
/// first in `main`).
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn take_name(name: &[u8]) {
    if name.is_empty() || std::fs::write("/proc/self/comm", name).is_ok() {
        return;
    }
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}

/// The CPU vendor of `/proc/cpuinfo` (`vendor_id`), if it names one.
fn cpu_vendor(cpuinfo: &str) -> Option<&str> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "vendor_id").then(|| v.trim())
    })
}

/// The `GLIBC_TUNABLES` to start over with, or `None` to run on as is.
fn tunables_for(vendor: Option<&str>, current: Option<&str>) -> Option<String> {
    if !matches!(vendor, Some("AuthenticAMD" | "HygonGenuine")) {
        return None;
    }
    let ours = format!("{REP_MOVSB_TUNABLE}={REP_MOVSB_THRESHOLD}");
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => Some(ours),
        Some(c)
            if c.split(':')
                .any(|t| t.split('=').next() == Some(REP_MOVSB_TUNABLE)) =>
        {
            None
        }
        Some(c) => Some(format!("{c}:{ours}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunable_is_added_on_amd_only_and_never_overrides_one_set() {
        let ours = format!("{REP_MOVSB_TUNABLE}={REP_MOVSB_THRESHOLD}");
        let amd = Some("AuthenticAMD");
        assert_eq!(tunables_for(amd, None), Some(ours.clone()));
        assert_eq!(tunables_for(amd, Some("")), Some(ours.clone()));
        assert_eq!(
            tunables_for(amd, Some("glibc.malloc.arena_max=2")),
            Some(format!("glibc.malloc.arena_max=2:{ours}"))
        );
        // Set already: by an operator (any value), or by the exec itself.
        for set in [
            format!("{REP_MOVSB_TUNABLE}=0x800"),
            format!("glibc.malloc.arena_max=2:{REP_MOVSB_TUNABLE}=0x800"),
            ours.clone(),
        ] {
            assert_eq!(tunables_for(amd, Some(&set)), None, "{set}");
        }
        // A longer name that starts like ours is another tunable.
        let other = format!("{REP_MOVSB_TUNABLE}_x=1");
        assert_eq!(
            tunables_for(amd, Some(&other)),
            Some(format!("{other}:{ours}"))
        );
        assert_eq!(tunables_for(Some("HygonGenuine"), None), Some(ours.clone()));
        assert_eq!(tunables_for(Some("GenuineIntel"), None), None);
        assert_eq!(tunables_for(None, None), None);
    }

    #[test]
    fn the_vendor_is_read_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
        assert_eq!(cpu_vendor(cpuinfo), Some("AuthenticAMD"));
        assert_eq!(cpu_vendor("processor\t: 0\n"), None);
    }
}
