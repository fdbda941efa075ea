//! The zmesh end-to-end lab: a whole mesh on one machine, with nodes and pods as network
//! namespaces, the real binaries, and real TCP apps — and nothing left behind on the host.
//!
//! zmesh is tested in three tiers (see `tests/README.md`):
//!
//! 1. **Unit tests** next to the code in each crate (`cargo test -p zmesh-core`).
//! 2. **In-process tests**: a ztunnel or waypoint with a local CA and a local config file,
//!    on loopback, inside one test process. No privileges needed.
//! 3. **Namespace lab** (this crate): every test builds a private [`sandbox::Sandbox`] — a user,
//!    network and mount namespace of its own, anchored by one child process — and inside it a
//!    [`lab::Topology`] of hosts (one netns each) joined by veth pairs to a bridge. The real
//!    `ztunnel` binary runs in a host netns ([`ztunnel::Ztunnel`]), redirection rules are
//!    installed with nftables ([`lab::redirect_outbound`]), apps are plain Rust threads whose
//!    sockets were opened inside a netns ([`apps`]), and a pure-Rust AF_PACKET capture on the
//!    bridge side ([`capture::Capture`]) shows what went over the wire. These tests need root.
//!
//! Cleanup is by construction: every namespace, interface, rule, mount and process lives
//! inside the sandbox, and the sandbox dies with its anchor process, which exits when the
//! sandbox is dropped, when the thread that created it exits (`PR_SET_PDEATHSIG`) and when the
//! test process exits in any way, even by SIGKILL (its stdin pipe reaches EOF). The anchor is
//! pid 1 of the sandbox's pid namespace, so the kernel kills every process the lab started
//! (and their children) when it exits; it also removes the sandbox's temporary directory.
//!
//! The `zmesh-lab` binary builds the same lab by hand for exploration (`zmesh-lab up`) and
//! checks that a machine can run the lab (`zmesh-lab check`: the tools of [`tools`], then a
//! sandbox, a transfer, a capture and an nftables redirect).

pub mod apiserver;
pub mod apps;
pub mod bench;
pub mod capture;
pub mod cluster;
pub mod conformance;
pub mod controller;
pub mod ctlbench;
pub mod echo;
pub mod gamma;
pub mod hbone_peer;
pub mod http;
pub mod l7bench;
pub mod lab;
pub mod manifests;
pub mod mesh;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod sandbox;
pub mod soak;
pub mod tools;
pub mod ztunnel;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use sandbox::Sandbox;

/// Path of a workspace binary (`ztunnel`, later `waypoint`, ...) next to the running test.
///
/// Tests run from `target/<profile>/deps/`, so binaries built by `cargo build --workspace --bins`
/// sit one directory up; `zmesh-lab` itself runs from `target/<profile>/`. `ZMESH_BIN_DIR`
/// overrides the directory. Panics with instructions when the binary is missing, because a
/// namespace test cannot do anything useful without it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ZMESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("the path of the running test executable");
            let mut dir = exe
                .parent()
                .expect("the test executable lives in a directory")
                .to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: build the binaries first: cargo build --workspace --bins \
             (same profile as the tests), or set ZMESH_BIN_DIR",
            path.display()
        );
    }
    path
}

/// Writes `text` to `path` atomically: a hidden temporary file next to it (which the
/// directory sources and loaders skip) renamed over it, so a watcher never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a file path without a name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// `N` free addresses on 127.0.0.1 with distinct ports: all are held while they are read.
pub fn free_loopback_ports<const N: usize>() -> std::io::Result<[std::net::SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = held
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(addrs.try_into().expect("N addresses"))
}

/// A 1-in-2^64 unique ASCII marker (`zmesh-marker-<hex>`), for payloads that a capture must
/// (or must not) find on the wire.
pub fn unique_marker() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("zmesh-marker-{:016x}", h.finish())
}

/// `len` bytes of deterministic pseudo-random data (xorshift), for transfers whose integrity a
/// test checks; differs by `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Calls `f` every 100 ms until it returns `Some`, and returns that value; panics with
/// "timed out waiting for `what`" once `deadline` has passed. For tests that wait for the
/// mesh to converge.
pub fn poll_some<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`poll_some`] for a condition: returns once `f` is true.
pub fn poll(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    poll_some(what, deadline, || f().then_some(()))
}
