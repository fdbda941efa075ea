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
