//! Shared mode: the node agent hands ztunnel each enrolled pod's network namespace over ZDS,
//! and ztunnel runs one proxy per pod whose listeners (15001, 15006, 15008) and outbound
//! connections are created inside that namespace. Upstream ztunnel's rules apply: an Add for a
//! known pod with the same namespace is a no-op, with another namespace the proxy restarts; a
//! pod the snapshot does not name, or a Del, is drained; ready once a snapshot arrived.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use zmesh_core::netns::Netns;
use zmesh_core::zds::{Event, WorkloadInfo as ZdsWorkload, ZdsClient};

use crate::config::WorkloadInfo;
use crate::proxy::{Node, Proxy};
use crate::registry::Proxies;

/// Serves ZDS until the process ends.
pub async fn run(node: Arc<Node>, proxies: Arc<Proxies>, ready: Arc<AtomicBool>, uds: PathBuf) {
    let mut zds = ZdsClient::new(uds.clone());
    // Uids the current snapshot named; `None` outside a snapshot.
    let mut snapshot: Option<HashSet<String>> = None;
    tracing::info!(socket = %uds.display(), "shared mode: waiting for the node agent");
    loop {
        match zds.next().await {
            Event::Connected => {
                tracing::info!("connected to the node agent; receiving its snapshot");
                snapshot = Some(HashSet::new());
            }
            Event::Add { uid, info, netns } => {
                if let Some(seen) = snapshot.as_mut() {
                    seen.insert(uid.clone());
                }
                let outcome = add(&node, &proxies, &uid, info, netns).await;
                if let Err(e) = &outcome {
                    tracing::error!(uid = uid.as_str(), error = %e, "cannot start the pod's proxy");
                }
                zds.reply(outcome).await;
            }
            Event::Keep { uid } => {
                if let Some(seen) = snapshot.as_mut() {
                    seen.insert(uid.clone());
                }
                zds.reply(Ok(())).await;
            }
            Event::SnapshotSent => {
                let seen = snapshot.take().unwrap_or_default();
                for (uid, _) in proxies.snapshot() {
                    if !seen.contains(&uid) {
                        tracing::info!(
                            uid = uid.as_str(),
                            "pod not in the agent's snapshot: draining its proxy"
                        );
                        remove(&node, &proxies, &uid);
                    }
                }
                ready.store(true, Ordering::Release);
                tracing::info!(
                    pods = seen.len(),
                    "snapshot applied; ztunnel ready (shared mode)"
                );
                zds.reply(Ok(())).await;
            }
            Event::Del { uid } => {
                remove(&node, &proxies, &uid);
                zds.reply(Ok(())).await;
            }
            Event::Disconnected { reason } => {
                // Proxies keep running; new pods cannot be enrolled until the agent is back.
                tracing::warn!(%reason, "lost the node agent; reconnecting");
                snapshot = None;
            }
        }
    }
}

async fn add(
    node: &Arc<Node>,
    proxies: &Proxies,
    uid: &str,
    info: ZdsWorkload,
    netns: std::os::fd::OwnedFd,
) -> Result<(), String> {
    let netns = Netns::from_fd(netns).map_err(|e| format!("the netns fd is unusable: {e}"))?;
    if let Some(existing) = proxies.get(uid) {
        if existing.sockets.netns.as_ref() == Some(&netns) {
            return Ok(());
        }
        tracing::info!(uid, "pod's network namespace changed: restarting its proxy");
        remove(node, proxies, uid);
    }
    let workload = WorkloadInfo {
        namespace: info.namespace,
        name: info.name,
        service_account: info.service_account,
    };
    let proxy = Proxy::new(node, workload, Some(netns)).map_err(|e| e.to_string())?;
    proxy.start().map_err(|e| e.to_string())?;
    tracing::info!(uid, identity = %proxy.identity, "pod enrolled: proxy listening in its network namespace");
    proxies.insert(uid.to_owned(), proxy.clone());
    // Fetch the certificate now so the pod's first connection does not wait for it; a failure
    // is retried on first use.
    tokio::spawn(async move {
        if let Err(e) = proxy.node.certs.get(&proxy.identity).await {
            tracing::warn!(identity = %proxy.identity, error = %e, "certificate prefetch failed");
        }
    });
    Ok(())
}

fn remove(node: &Node, proxies: &Proxies, uid: &str) {
    if let Some(proxy) = proxies.remove(uid) {
        let deadline = node.cfg.drain_deadline;
        tokio::spawn(async move {
            if !proxy.drain_connections(deadline).await {
                tracing::warn!(identity = %proxy.identity, "pod proxy drain deadline passed");
            }
        });
    }
}
