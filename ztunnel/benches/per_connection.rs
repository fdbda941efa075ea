//! The bookkeeping ztunnel does for every proxied connection besides moving bytes, in a
//! plain bench binary (`cargo bench -p ztunnel --bench per_connection`; no criterion in the
//! workspace): the metric labels of both workloads, the connection's telemetry record opened
//! and closed (counters, access log off as at `RUST_LOG=warn`), the HBONE CONNECT request's
//! headers, and the source's SPIFFE id. Prints nanoseconds per connection; run it under
//! `valgrind --tool=callgrind` for instruction counts that a busy machine does not move.
//! `PER_CONNECTION_N` sets the number of connections (default 200,000).

use std::hint::black_box;
use std::time::Instant;

use prometheus_client::registry::Registry;
use zmesh_core::hbone::{SourceInfo, connect_request};
use zmesh_core::state::Workload;
use ztunnel::metrics::{Bytes, ConnectionRecord, Metrics, TrafficLabels};

// ztunnel's allocator (src/main.rs), so allocations cost what they cost there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn workload(name: &str, ns: &str) -> Workload {
    serde_yaml::from_str(&format!(
        "{{name: {name}-7d9c6b8f4-x2x9q, namespace: {ns}, serviceAccount: {name}, \
          workloadName: {name}, canonicalName: {name}, canonicalRevision: v1, \
          clusterId: Kubernetes, workloadIps: [10.1.2.3]}}"
    ))
    .expect("a valid workload")
}

fn main() {
    let n: u32 = std::env::var("PER_CONNECTION_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let metrics = Metrics::register(&mut Registry::default());
    let (client, server) = (workload("client", "shop"), workload("server", "shop"));
    let src = SourceInfo {
        addr: Some("10.1.2.3:40000".parse().unwrap()),
        service_host: Some("server.shop.svc.cluster.local".into()),
        cluster: client.cluster_id.clone(),
        namespace: client.namespace.clone(),
        workload_name: client.workload_name.clone(),
        workload_type: "deployment".into(),
        canonical_name: client.canonical_name.clone(),
        canonical_revision: client.canonical_revision.clone(),
    };
    let (from, to, peer) = (
        "10.1.2.3:40000".parse().unwrap(),
        "10.1.2.4:8080".parse().unwrap(),
        "10.1.2.4:15008".parse().unwrap(),
    );
    // Another connection of the same pair stays open throughout, as under load.
    let _open = ConnectionRecord::open(
        &metrics,
        TrafficLabels::new("source")
            .source(&client)
            .destination(&server),
        "outbound",
        from,
        to,
        Some(peer),
    );
    let start = Instant::now();
    for _ in 0..n {
        let id = client.identity().expect("a valid identity");
        let labels = TrafficLabels::new("source")
            .source(&client)
            .destination(&server);
        let record = ConnectionRecord::open(&metrics, labels, "outbound", from, to, Some(peer));
        let request = connect_request::<()>(to, &src);
        record.finish(
            Bytes {
                received: 64,
                sent: 64,
            },
            None,
        );
        black_box((id, request));
    }
    let per = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!("per-connection bookkeeping: {per:.0} ns per connection ({n} connections)");
}
