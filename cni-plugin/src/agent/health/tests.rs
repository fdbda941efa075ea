use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const PRIMARY: &str = r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network",
  "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]}"#;

/// A node's CNI directories: `net.d` with the primary CNI's `10-foo.conflist`, and `bin`.
struct Node {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&bin).unwrap();
    Node {
        _dir: dir,
        conf,
        bin,
    }
}

impl Node {
    /// What the agent does at start: the primary CNI's file, then our binary and entry.
    fn installed() -> Node {
        let n = node();
        std::fs::write(n.conf.join("10-foo.conflist"), PRIMARY).unwrap();
        let plugin = n._dir.path().join("zmesh-cni-build");
        std::fs::write(&plugin, b"#!/bin/sh\n").unwrap();
        install::install_binary(&plugin, &n.bin).unwrap();
        install::chain(
            &n.conf,
            json!({"type": PLUGIN_TYPE, "agent_socket": "/a.sock"}),
        )
        .unwrap();
        n
    }

    fn state(&self) -> ChainState {
        chain_state(&self.conf, &self.bin, None)
    }

    /// The primary CNI rewrites its file as it knows it (without our entry).
    fn rewrite_primary(&self) {
        std::fs::write(self.conf.join("10-foo.conflist"), PRIMARY).unwrap();
    }
}

#[test]
fn chained_when_the_loaded_file_has_the_entry_and_the_binary_is_there() {
    let n = Node::installed();
    let s = n.state();
    assert!(s.chained, "{s:?}");
    assert_eq!(s.primary, Some(n.conf.join("10-foo.conflist")));
    assert_eq!(
        s.detail,
        format!("chained in {}", n.conf.join("10-foo.conflist").display())
    );
}

#[test]
fn no_config_at_all_is_not_chained_and_says_so() {
    let n = node();
    let s = n.state();
    assert!(!s.chained);
    assert_eq!(s.primary, None);
    assert!(
        s.detail
            .starts_with(&format!("no CNI network config in {} (", n.conf.display())),
        "{}",
        s.detail
    );
    // An invalid file is no config either, and is named.
    std::fs::write(n.conf.join("10-foo.conflist"), "{not json").unwrap();
    let s = n.state();
    assert!(!s.chained);
    assert!(
        s.detail.contains("skipped as invalid") && s.detail.contains("10-foo.conflist"),
        "{}",
        s.detail
    );
}

#[test]
fn another_cni_rewriting_its_file_unchains_us_and_the_repair_error_is_given() {
    let n = Node::installed();
    n.rewrite_primary();
    let s = n.state();
    assert!(!s.chained);
    assert_eq!(
        s.detail,
        format!(
            "zmesh-cni missing from 10-foo.conflist, the file the container runtime loads from {}",
            n.conf.display()
        )
    );
    let s = chain_state(
        &n.conf,
        &n.bin,
        Some("cannot write x: Permission denied".into()),
    );
    assert!(
        s.detail
            .ends_with("; the agent cannot put it back: cannot write x: Permission denied"),
        "{}",
        s.detail
    );
    // Chained again (the installer's repair): the old error is not shown.
    install::chain(&n.conf, json!({"type": PLUGIN_TYPE})).unwrap();
    let s = chain_state(&n.conf, &n.bin, Some("stale".into()));
    assert!(s.chained && !s.detail.contains("stale"), "{s:?}");
}

#[test]
fn a_new_file_that_sorts_first_is_what_counts() {
    let n = Node::installed();
    std::fs::write(n.conf.join("05-new.conflist"), PRIMARY).unwrap();
    let s = n.state();
    assert!(!s.chained);
    assert_eq!(s.primary, Some(n.conf.join("05-new.conflist")));
    assert!(
        s.detail
            .starts_with("zmesh-cni missing from 05-new.conflist, ")
            && s.detail
                .ends_with("(it is in 10-foo.conflist, which sorts after it and is not loaded)"),
        "{}",
        s.detail
    );
}

#[test]
fn a_missing_plugin_binary_is_not_chained() {
    let n = Node::installed();
    std::fs::remove_file(n.bin.join(PLUGIN_TYPE)).unwrap();
    let s = n.state();
    assert!(!s.chained);
    assert!(
        s.detail
            .starts_with("the plugin binary zmesh-cni is missing from "),
        "{}",
        s.detail
    );
}

fn source(n: &Node, ztunnel: Arc<AtomicBool>) -> HealthSource {
    HealthSource {
        chain: Some(ChainSource {
            conf_dir: n.conf.clone(),
            bin_dir: n.bin.clone(),
            repairs: RepairStats::new(),
        }),
        ztunnel_connected: Arc::new(move || ztunnel.load(Ordering::Relaxed)),
    }
}

#[tokio::test]
async fn ready_needs_the_chain_and_a_ztunnel_and_no_chain_dir_skips_the_chain() {
    let n = Node::installed();
    let ztunnel = Arc::new(AtomicBool::new(false));
    let src = source(&n, ztunnel.clone());
    let h = src.health().await;
    assert!(!h.ready && h.chain.as_ref().unwrap().chained && !h.ztunnel_connected);
    assert_eq!(h.reasons.len(), 1);
    assert!(h.reasons[0].starts_with("ztunnel not connected"), "{h:?}");
    ztunnel.store(true, Ordering::Relaxed);
    let h = src.health().await;
    assert!(h.ready && h.reasons.is_empty(), "{h:?}");
    n.rewrite_primary();
    let h = src.health().await;
    assert!(!h.ready && !h.chain.as_ref().unwrap().chained);
    assert!(h.reasons[0].starts_with("zmesh-cni missing from"), "{h:?}");

    let unmanaged = HealthSource { chain: None, ..src };
    let h = unmanaged.health().await;
    assert!(h.ready && h.chain.is_none(), "{h:?}");
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[tokio::test]
async fn readyz_over_a_socket_follows_the_conflist_live() {
    let n = Node::installed();
    let ztunnel = Arc::new(AtomicBool::new(true));
    let server = HealthServer::bind("127.0.0.1:0".parse().unwrap(), source(&n, ztunnel))
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let (status, body) = request(addr, "GET", READYZ_PATH).await;
    assert_eq!(status, 200, "{body}");
    let h: Health = serde_json::from_str(&body).unwrap();
    assert!(h.ready && h.chain.unwrap().chained);

    // Another CNI rewrites the file: the next probe sees it, no restart or event needed.
    n.rewrite_primary();
    let (status, body) = request(addr, "GET", READYZ_PATH).await;
    assert_eq!(status, 503, "{body}");
    let h: Health = serde_json::from_str(&body).unwrap();
    assert!(!h.ready);
    assert!(
        h.reasons[0].starts_with("zmesh-cni missing from 10-foo.conflist"),
        "{h:?}"
    );
    install::chain(&n.conf, json!({"type": PLUGIN_TYPE})).unwrap();
    assert_eq!(request(addr, "GET", READYZ_PATH).await.0, 200);

    assert_eq!(request(addr, "POST", READYZ_PATH).await.0, 405);
    let (status, body) = request(addr, "GET", "/healthz").await;
    assert_eq!(status, 404);
    assert!(body.contains("GET /readyz"), "{body}");

    // A taken address is a clear error.
    let err = HealthServer::bind(addr, source(&n, Arc::new(AtomicBool::new(true))))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--health-addr"), "{err}");
}
