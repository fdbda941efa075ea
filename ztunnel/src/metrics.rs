//! Traffic telemetry named and labelled like Istio's, so existing dashboards work:
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`; and one access-log line
//! (tracing target `access`) per connection.
//!
//! Byte directions are upstream ztunnel's (istio/ztunnel `src/copy.rs` `copy_bidirectional`
//! counts the client-to-server half with `increment_recv` and the other with
//! `increment_send`; `src/proxy/metrics.rs` `ConnectionResult::record_internal` logs them):
//! the counters keep Envoy's meaning for both reporters, `received` = from the client towards
//! the server, `sent` = back to the client. The access log flips the source side only
//! (istio/istio#32399): an outbound line's `bytes_sent` is what the client sent, an inbound
//! line's `bytes_sent` is what went back to the client. An upload of N bytes is thus
//! `received` N for both reporters, `bytes_sent=N` outbound and `bytes_recv=N` inbound.
//!
//! A connection refused by AuthorizationPolicy is counted, opened and closed, with
//! `response_flags="DENY"` (as Istio's ztunnel does); one closed later because a policy change
//! denies it is counted closed with `DENY`. Its access-log line names the deciding policy
//! (`policy=<namespace>/<name>`), as does the line of a connection an ALLOW policy admitted.
//!
//! A connection refused because the waypoint in front of its destination cannot be reached is
//! counted in `zmesh_waypoint_unavailable_total{destination, waypoint}`, so a missing waypoint
//! is visible, never a silent bypass: whether the waypoint has no healthy endpoint (closed with
//! `response_flags="UH"`) or is published ready but its tunnel cannot be opened, e.g. its
//! process died before its readiness probe noticed (closed with the tunnel's failure flag).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use zmesh_core::telemetry::TrafficLabels;

/// Bytes of one proxied connection, in Istio's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    /// From the client towards the destination (request direction).
    pub received: u64,
    /// From the destination back to the client (response direction).
    pub sent: u64,
}

/// Logs a connection that failed before it had a destination (WARN "connection failed").
pub fn connection_failed(
    direction: &'static str,
    src: std::net::SocketAddr,
    dst: Option<std::net::SocketAddr>,
    error: &dyn std::fmt::Display,
) {
    let dst = dst.map(|d| d.to_string());
    // Failure reasons can carry what a peer sent (a header, a TLS alert's text): bounded, so a
    // peer cannot make each refused attempt cost a huge log line.
    let error =
        zmesh_core::peer_text::PeerText::display(error, zmesh_core::peer_text::PEER_ERROR_MAX);
    tracing::warn!(
        target: "access",
        direction,
        "src.addr" = %src,
        "dst.addr" = dst.as_deref().unwrap_or("-"),
        %error,
        "connection failed"
    );
}

/// The traffic metric families.
#[derive(Clone, Default)]
pub struct Metrics {
    pub opened: Family<TrafficLabels, Counter>,
    pub closed: Family<TrafficLabels, Counter>,
    pub sent: Family<TrafficLabels, Counter>,
    pub received: Family<TrafficLabels, Counter>,
    /// Connections refused because their destination's waypoint cannot be reached.
    pub waypoint_unavailable: Family<WaypointLabels, Counter>,
    /// The label sets of open connections, one copy each (see [`Metrics::intern`]).
    interned: Arc<Mutex<HashSet<Shared>>>,
}

/// One label set of open connections and its counters, looked up in the families once for
/// all the connections that share it (each lookup hashes and compares ~20 strings).
struct Interned {
    labels: TrafficLabels,
    opened: Counter,
    /// Made at the first close under these labels: a set whose connections all close with a
    /// response flag of their own (counted under labels of their own) shows no series for it.
    closing: OnceLock<Closing>,
}

/// The close counters of an [`Interned`] label set.
struct Closing {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// An [`Interned`] in the set, found by its labels.
struct Shared(Arc<Interned>);

impl Borrow<TrafficLabels> for Shared {
    fn borrow(&self) -> &TrafficLabels {
        &self.0.labels
    }
}

impl Hash for Shared {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.labels.hash(state)
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Self) -> bool {
        self.0.labels == other.0.labels
    }
}

impl Eq for Shared {}

/// Labels of [`Metrics::waypoint_unavailable`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaypointLabels {
    /// The Service (`<namespace>/<hostname>`) or address the connection was for.
    pub destination: String,
    /// The waypoint's address as published.
    pub waypoint: String,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received.clone(),
        );
        registry.sub_registry_with_prefix("zmesh").register(
            "waypoint_unavailable",
            "Connections refused because the waypoint in front of their destination cannot be reached",
            m.waypoint_unavailable.clone(),
        );
        m
    }

    /// One shared copy of `labels` with its counters: the connections between the same two
    /// workloads have the same ~20 label values, and each open connection holds a pointer to
    /// them instead of its own strings (about 1 KiB per connection) and counts without
    /// looking its labels up again. Released by [`Metrics::release`].
    fn intern(&self, labels: TrafficLabels) -> Arc<Interned> {
        let mut set = lock(&self.interned);
        if let Some(shared) = set.get(&labels) {
            return shared.0.clone();
        }
        let shared = Arc::new(Interned {
            opened: self.opened.get_or_create(&labels).clone(),
            closing: OnceLock::new(),
            labels,
        });
        set.insert(Shared(shared.clone()));
        shared
    }

    /// Gives back a connection's reference to interned labels; the set forgets them with
    /// their last connection, and its table shrinks after a burst of connections ends. (The
    /// families keep their series, as they always have: forgetting only drops this copy.)
    fn release(&self, labels: Arc<Interned>) {
        let mut set = lock(&self.interned);
        // Under the lock, as every clone from the set is made: 2 = the set's and this one.
        if Arc::strong_count(&labels) == 2 {
            set.remove(&labels.labels);
            if set.capacity() > 2 * set.len() + 16 {
                set.shrink_to_fit();
            }
        }
        drop(labels);
    }

    /// Label sets held for open connections now (for tests).
    #[cfg(test)]
    fn interned_len(&self) -> usize {
        lock(&self.interned).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's telemetry: counts it opened now, and closed (with bytes and the access
/// log line) when `finish` is called or, failing that, when dropped.
pub struct ConnectionRecord {
    metrics: Metrics,
    /// Shared with the other open connections that have the same labels; `None` once closed.
    labels: Option<Arc<Interned>>,
    /// Istio's `response_flags` for the close, when it differs from the labels' own.
    response_flag: Option<&'static str>,
    start: Instant,
    direction: &'static str,
    src_addr: std::net::SocketAddr,
    dst_addr: std::net::SocketAddr,
    hbone_target: Option<std::net::SocketAddr>,
    /// The AuthorizationPolicy that decided, for the access log.
    policy: Option<Box<str>>,
}

impl ConnectionRecord {
    pub fn open(
        metrics: &Metrics,
        labels: TrafficLabels,
        direction: &'static str,
        src_addr: std::net::SocketAddr,
        dst_addr: std::net::SocketAddr,
        hbone_target: Option<std::net::SocketAddr>,
    ) -> Self {
        let labels = metrics.intern(labels);
        labels.opened.inc();
        ConnectionRecord {
            metrics: metrics.clone(),
            labels: Some(labels),
            response_flag: None,
            start: Instant::now(),
            direction,
            src_addr,
            dst_addr,
            hbone_target,
            policy: None,
        }
    }

    /// Names the AuthorizationPolicy (`<namespace>/<name>`) that decided, for the access log.
    pub fn set_policy(&mut self, policy: Option<String>) {
        self.policy = policy.map(String::into_boxed_str);
    }

    /// Sets Istio's `response_flags` for the close (e.g. `CONNECT`, `DENY`, `TLS_FAILURE`).
    pub fn set_response_flag(&mut self, flag: &'static str) {
        self.response_flag = Some(flag);
    }

    /// Records the close with the connection's bytes (their directions: [`Bytes`]).
    pub fn finish(mut self, bytes: Bytes, error: Option<&dyn std::fmt::Display>) {
        self.close(bytes, error);
    }

    fn close(&mut self, bytes: Bytes, error: Option<&dyn std::fmt::Display>) {
        let Some(shared) = self.labels.take() else {
            return;
        };
        let changed = self
            .response_flag
            .filter(|f| *f != shared.labels.response_flags)
            .map(|f| TrafficLabels {
                response_flags: f,
                ..shared.labels.clone()
            });
        let l = match &changed {
            // A flag of its own (a failure, a denial): counted under labels of its own.
            Some(l) => {
                self.metrics.closed.get_or_create(l).inc();
                self.metrics.sent.get_or_create(l).inc_by(bytes.sent);
                self.metrics
                    .received
                    .get_or_create(l)
                    .inc_by(bytes.received);
                l
            }
            None => {
                let m = &self.metrics;
                let c = shared.closing.get_or_init(|| Closing {
                    closed: m.closed.get_or_create(&shared.labels).clone(),
                    sent: m.sent.get_or_create(&shared.labels).clone(),
                    received: m.received.get_or_create(&shared.labels).clone(),
                });
                c.closed.inc();
                c.sent.inc_by(bytes.sent);
                c.received.inc_by(bytes.received);
                &shared.labels
            }
        };
        let (log_sent, log_recv) = log_bytes(l.reporter, bytes);
        // Formatted only if the line is written (tracing evaluates fields then).
        let duration = self.start.elapsed().as_millis();
        macro_rules! line {
            ($lvl:ident, $($extra:tt)*) => {
                tracing::$lvl!(
                    target: "access",
                    direction = self.direction,
                    src.addr = %self.src_addr,
                    src.workload = %l.source_workload,
                    src.namespace = %l.source_workload_namespace,
                    src.identity = %l.source_principal,
                    dst.addr = %self.dst_addr,
                    dst.hbone_addr = self
                        .hbone_target
                        .map(|a| a.to_string())
                        .as_deref()
                        .unwrap_or("-"),
                    dst.service = %l.destination_service,
                    dst.workload = %l.destination_workload,
                    dst.namespace = %l.destination_workload_namespace,
                    dst.identity = %l.destination_principal,
                    bytes_sent = log_sent,
                    bytes_recv = log_recv,
                    duration = format_args!("{duration}ms"),
                    policy = self.policy.as_deref().map(tracing::field::display),
                    $($extra)*
                )
            };
        }
        match error {
            None => line!(info, "connection complete"),
            Some(e) => line!(error, error = %e, "connection complete"),
        }
        drop(changed);
        self.metrics.release(shared);
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        self.close(
            Bytes::default(),
            Some(&"connection dropped before completion"),
        );
    }
}

/// The access log's `(bytes_sent, bytes_recv)` for a `reporter`: as the counters on the
/// destination side, flipped on the source side (see the module's documentation).
fn log_bytes(reporter: &str, bytes: Bytes) -> (u64, u64) {
    if reporter == "source" {
        (bytes.received, bytes.sent)
    } else {
        (bytes.sent, bytes.received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zmesh_core::state::Workload;

    #[test]
    fn exposition_uses_istio_names_and_labels() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let w: Workload = serde_yaml::from_str(
            "{name: client, namespace: default, serviceAccount: sa, canonicalRevision: v1}",
        )
        .unwrap();
        let labels = TrafficLabels::new("source").source(&w);
        let rec = ConnectionRecord::open(
            &m,
            labels,
            "outbound",
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:15008".parse().unwrap(),
            None,
        );
        rec.finish(
            Bytes {
                sent: 100,
                received: 42,
            },
            None,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for needle in [
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\"",
            "istio_tcp_connections_closed_total{",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sa\"",
            "source_version=\"v1\"",
            "destination_workload=\"unknown\"",
            "connection_security_policy=\"unknown\"",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        assert!(
            out.contains("istio_tcp_sent_bytes_total{") && out.contains("} 100"),
            "{out}"
        );
        assert!(
            out.contains("istio_tcp_received_bytes_total{") && out.contains("} 42"),
            "{out}"
        );
    }

    /// Open connections with the same labels share one copy of them (issue 9: ~20 strings
    /// per connection), forgotten with the last; a close with its own response flag is
    /// counted under that flag.
    #[test]
    fn open_connections_share_their_labels() {
        let m = Metrics::register(&mut Registry::default());
        let w: Workload =
            serde_yaml::from_str("{name: client, namespace: default, serviceAccount: sa}").unwrap();
        let open = || {
            ConnectionRecord::open(
                &m,
                TrafficLabels::new("source").source(&w),
                "outbound",
                "10.0.0.1:1".parse().unwrap(),
                "10.0.0.2:15008".parse().unwrap(),
                None,
            )
        };
        let (a, mut b) = (open(), open());
        assert!(
            Arc::ptr_eq(a.labels.as_ref().unwrap(), b.labels.as_ref().unwrap()),
            "two connections with the same labels hold two copies"
        );
        assert_eq!(m.interned_len(), 1);
        a.finish(
            Bytes {
                sent: 1,
                received: 2,
            },
            None,
        );
        assert_eq!(m.interned_len(), 1, "still used by the other connection");
        b.set_response_flag("CONNECT");
        drop(b);
        assert_eq!(
            m.interned_len(),
            0,
            "labels kept after their last connection"
        );
        let mut out = String::new();
        let mut reg = Registry::default();
        let m2 = Metrics::register(&mut reg);
        let mut c = ConnectionRecord::open(
            &m2,
            TrafficLabels::new("source"),
            "outbound",
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:15008".parse().unwrap(),
            None,
        );
        c.set_response_flag("CONNECT");
        c.finish(Bytes::default(), Some(&"refused"));
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("response_flags=\"CONNECT\"")),
            "{out}"
        );
        // Only the open is counted under the labels it opened with.
        assert!(
            out.lines()
                .filter(|l| l.contains("response_flags=\"-\""))
                .all(|l| l.starts_with("istio_tcp_connections_opened_total{")),
            "close series for labels no connection closed with:\n{out}"
        );
    }

    /// A tracing writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 14: an upload of 1000 bytes answered by 7, as upstream ztunnel counts it: the
    /// counters say `received` 1000 for both reporters; the access log says `bytes_sent=1000`
    /// on the source (outbound) side and `bytes_recv=1000` on the destination (inbound) side.
    #[test]
    fn byte_directions_are_upstreams_in_counters_and_access_log() {
        let upload = Bytes {
            received: 1000,
            sent: 7,
        };
        let peer = "10.0.0.9:15008".parse().unwrap();
        for (reporter, direction, hbone, logged) in [
            (
                "source",
                "outbound",
                Some(peer),
                "dst.hbone_addr=\"10.0.0.9:15008\"",
            ),
            ("destination", "inbound", None, "dst.hbone_addr=\"-\""),
        ] {
            let bytes = match reporter {
                "source" => "bytes_sent=1000 bytes_recv=7",
                _ => "bytes_sent=7 bytes_recv=1000",
            };
            let mut reg = Registry::default();
            let m = Metrics::register(&mut reg);
            let out = Captured::default();
            let writer = out.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                ConnectionRecord::open(
                    &m,
                    TrafficLabels::new(reporter),
                    direction,
                    "10.0.0.1:1".parse().unwrap(),
                    "10.0.0.2:80".parse().unwrap(),
                    hbone,
                )
                .finish(upload, None);
            });
            let log = String::from_utf8(lock(&out.0).clone()).unwrap();
            for expected in [bytes, logged] {
                assert!(
                    log.contains("connection complete") && log.contains(expected),
                    "{reporter}: the access log should say {expected}:\n{log}"
                );
            }
            let duration = log.split("duration=").nth(1).unwrap_or_default();
            let digits = duration.bytes().take_while(u8::is_ascii_digit).count();
            assert!(
                digits > 0
                    && duration[digits..].starts_with("ms")
                    && duration[digits + 2..].starts_with(char::is_whitespace),
                "{reporter}: duration=<n>ms expected:\n{log}"
            );
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
            let value = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit_once(' '))
                    .map(|(_, v)| v.to_owned())
            };
            assert_eq!(
                (
                    value("istio_tcp_received_bytes_total{").as_deref(),
                    value("istio_tcp_sent_bytes_total{").as_deref()
                ),
                (Some("1000"), Some("7")),
                "{reporter}: counters\n{text}"
            );
        }
    }
}
