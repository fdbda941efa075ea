//! Request telemetry named and labelled like Istio's, with `reporter="waypoint"`, so existing
//! dashboards work: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (label set of Istio's "Istio Standard Metrics"
//! reference, https://istio.io/latest/docs/reference/config/metrics/), and one access-log line
//! per request (tracing target `access`; JSON with `LOG_FORMAT=json`).
//!
//! A request is recorded once, when its response body ends (trailers included) or is dropped,
//! so a streamed body is counted with its real size and duration; the metrics and the log line
//! are written after the tasks that put the response's last bytes on the socket have run
//! (`finish_after_writes`).

use std::net::SocketAddr;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use zmesh_core::peer_text::PeerText;
use zmesh_core::telemetry::{TrafficLabels, WorkloadMeta, or_unknown, unknown};

/// Istio's request labels: the traffic labels ztunnel also reports, plus the response's codes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub response_code: u16,
    pub grpc_response_status: String,
}

impl Default for RequestLabels {
    fn default() -> Self {
        let mut traffic = TrafficLabels::new("waypoint");
        traffic.request_protocol = "http";
        traffic.connection_security_policy = "mutual_tls";
        RequestLabels {
            traffic,
            response_code: 0,
            grpc_response_status: String::new(),
        }
    }
}

/// What a CONNECT's `baggage` header says of the client, when the workload model does not
/// know its address: `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name`,
/// `service.name`, `service.version` (upstream ztunnel's `src/baggage.rs` keys).
///
/// The client writes these. A value is kept only as Kubernetes writes such names and label
/// values (at most 253 of ASCII letters, digits, `-`, `.` and `_`), else it is `unknown`: no
/// space, quote, `=` or control character reaches a label or the access-log line.
pub fn meta_from_baggage(value: &str) -> WorkloadMeta {
    let mut m = WorkloadMeta::default();
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = if v.len() <= BAGGAGE_VALUE_MAX
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            or_unknown(v)
        } else {
            unknown()
        };
        match k.trim() {
            "k8s.cluster.name" => m.cluster = v,
            "k8s.namespace.name" => m.namespace = v,
            "service.name" => m.canonical_service = v,
            "service.version" => m.canonical_revision = v,
            k if k.starts_with("k8s.") && k.ends_with(".name") => m.workload = v,
            _ => {}
        }
    }
    m
}

/// The longest `baggage` value kept: a Kubernetes object name's limit (DNS-1123 subdomain).
const BAGGAGE_VALUE_MAX: usize = 253;

/// A `grpc-status` header or trailer as the `grpc_response_status` label: the upstream's
/// decimal code when it has at most three digits (gRPC defines 0 to 16), else nothing. The
/// upstream writes it; so kept, it can neither add fields to the access-log line nor make
/// metric series without bound.
pub fn grpc_status_label(v: &http::HeaderValue) -> Option<String> {
    v.to_str()
        .ok()
        .filter(|s| (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
}

impl RequestLabels {
    /// Sets the `source_*` labels (shared values: no string is copied).
    pub fn source(&mut self, m: &WorkloadMeta) {
        self.traffic.set_source(m);
    }

    /// Sets the `destination_service*` labels.
    pub fn service(&mut self, hostname: &str, name: &str, namespace: &str) {
        let t = &mut self.traffic;
        t.destination_service = or_unknown(hostname);
        t.destination_service_name = or_unknown(name);
        t.destination_service_namespace = or_unknown(namespace);
    }

    /// Sets the `destination_*` workload labels from the endpoint picked (shared values).
    pub fn destination(&mut self, ep: &crate::upstream::Endpoint) {
        self.traffic.set_destination(&ep.meta);
    }
}

/// A request's label set with its hash computed once: each of the four request metrics looks
/// its series up by it, and hashing two dozen strings four times per request was about a sixth
/// of the waypoint's instructions per request (callgrind, `waypoint/benches/route.rs`).
#[derive(Clone, Debug)]
pub struct SeriesKey {
    labels: RequestLabels,
    hash: u64,
}

impl SeriesKey {
    fn new(labels: RequestLabels) -> SeriesKey {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one(&labels);
        SeriesKey { labels, hash }
    }
}

impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for SeriesKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl Eq for SeriesKey {}

impl EncodeLabelSet for SeriesKey {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.labels.encode(encoder)
    }
}

/// The request metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<SeriesKey, Counter>,
    duration: Family<SeriesKey, Histogram>,
    request_bytes: Family<SeriesKey, Histogram>,
    response_bytes: Family<SeriesKey, Histogram>,
}

/// Istio's duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            request_bytes: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 10.0, 10,
                ))
            }),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1.0, 10.0, 10,
                ))
            }),
        };
        // prometheus-client appends `_total` to counters.
        registry.register("istio_requests", "Requests handled", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        m
    }
}

/// One request, recorded (metrics + access log) when dropped or finished.
pub struct RequestRecord {
    metrics: std::sync::Arc<Metrics>,
    pub labels: RequestLabels,
    start: Instant,
    /// The request's method, path (normalized, as authorized and routed) and authority, all
    /// of a peer's choosing: kept bounded, escaped when written.
    pub method: PeerText,
    pub path: PeerText,
    pub authority: PeerText,
    pub src: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub request_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub response_bytes: u64,
    pub error: Option<String>,
    /// The AuthorizationPolicy that decided (`<namespace>/<name>:rules[<i>]`), if any.
    pub policy: Option<String>,
    /// Its end and the request bytes then, when it waits to be written
    /// ([`RequestRecord::finish_after_writes`]).
    ended: Option<(Instant, u64)>,
    done: bool,
}

impl RequestRecord {
    /// Starts the record of a request.
    pub fn new(
        metrics: std::sync::Arc<Metrics>,
        labels: RequestLabels,
        src: SocketAddr,
        method: &str,
        path: &str,
        authority: &str,
    ) -> RequestRecord {
        RequestRecord {
            metrics,
            labels,
            start: Instant::now(),
            method: PeerText::new(method),
            path: PeerText::new(path),
            authority: PeerText::new(authority),
            src,
            upstream: None,
            request_bytes: Default::default(),
            response_bytes: 0,
            error: None,
            policy: None,
            ended: None,
            done: false,
        }
    }

    /// Records it now (idempotent).
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (end, req) = self.ended.unwrap_or_else(|| {
            let req = self
                .request_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            (Instant::now(), req)
        });
        let ms = end.duration_since(self.start).as_secs_f64() * 1000.0;
        // The series key hashes the labels once for the four metrics; cloning them copies
        // no string (shared values).
        let key = SeriesKey::new(self.labels.clone());
        let m = &self.metrics;
        m.requests.get_or_create(&key).inc();
        m.duration.get_or_create(&key).observe(ms);
        m.request_bytes.get_or_create(&key).observe(req as f64);
        m.response_bytes
            .get_or_create(&key)
            .observe(self.response_bytes as f64);
        let (l, t) = (&key.labels, &key.labels.traffic);
        tracing::info!(
            target: "access",
            reporter = "waypoint",
            src.addr = %self.src,
            src.workload = %t.source_workload,
            src.namespace = %t.source_workload_namespace,
            src.identity = %t.source_principal,
            dst.service = %t.destination_service,
            dst.workload = %t.destination_workload,
            dst.addr = %zmesh_core::logline::OrDash(self.upstream),
            dst.identity = %t.destination_principal,
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = t.request_protocol,
            response_code = %l.response_code,
            grpc_status = %l.grpc_response_status,
            response_flags = t.response_flags,
            duration_ms = format_args!("{ms:.1}"),
            bytes_received = req,
            bytes_sent = self.response_bytes,
            // Errors can carry a client's text (a JWT's issuer or audiences, a Host).
            error = &*zmesh_core::peer_text::bounded(
                self.error.as_deref().unwrap_or("-"),
                zmesh_core::peer_text::PEER_ERROR_MAX
            ),
            policy = %self.policy.as_deref().unwrap_or("-"),
            "request"
        );
    }

    /// Records it, ended now, after the tasks woken by this task's writes so far have run
    /// once: the end of a response body, where hyper drops the body before it flushes the
    /// response's last bytes to the stream. The record (four metric updates and the access-log
    /// line: 10 us of a response's 38–45 us in the waypoint, one small request at a time)
    /// waits in its thread's batch, written by a task that first yields once: tokio runs a
    /// yielded task after it has polled for I/O, so the tasks that write the response into the
    /// HBONE stream and onto the TLS socket (which write what the socket takes) run first. The
    /// batch's first record starts that task; the records finished before it runs join the
    /// batch (one task per batch under load, not one per request). Out of a runtime, or at its
    /// shutdown (the task dropped unpolled), records are written at once (dropped).
    pub fn finish_after_writes(mut self) {
        if self.done {
            return;
        }
        let req = self
            .request_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        self.ended = Some((Instant::now(), req));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // At the thread's exit, when its batch is gone, the closure is dropped with the record.
        let _ = BATCH.try_with(move |batch| {
            let first = {
                let mut b = lock(batch);
                b.push(self);
                b.len() == 1
            };
            if first {
                let out = WriteOut(batch.clone());
                drop(rt.spawn(async move {
                    tokio::task::yield_now().await;
                    drop(out);
                }));
            }
        });
    }
}

/// Records this thread finished after their writes, not written yet
/// ([`RequestRecord::finish_after_writes`]).
type Batch = std::sync::Arc<std::sync::Mutex<Vec<RequestRecord>>>;

thread_local! {
    static BATCH: Batch = Batch::default();
}

fn lock(batch: &Batch) -> std::sync::MutexGuard<'_, Vec<RequestRecord>> {
    batch.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes out a batch's records when dropped: after its task's yield, or with the task at its
/// runtime's shutdown.
struct WriteOut(Batch);

impl Drop for WriteOut {
    fn drop(&mut self) {
        // Out of the lock: writing a record takes the metrics' and the log's locks.
        let records = std::mem::take(&mut *lock(&self.0));
        drop(records);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `istio_requests_total` summed over `reg`'s series (tests).
#[cfg(test)]
pub(crate) fn counted(reg: &Registry) -> u64 {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, reg).unwrap();
    out.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// [`counted`] once `want` requests are, or after this task yielded 100 times to the records
/// waiting for their writes ([`RequestRecord::finish_after_writes`]) (tests).
#[cfg(test)]
pub(crate) async fn counted_after_yields(reg: &Registry, want: u64) -> u64 {
    for _ in 0..100 {
        if counted(reg) >= want {
            break;
        }
        tokio::task::yield_now().await;
    }
    counted(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage() {
        let m = meta_from_baggage(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1",
        );
        assert_eq!(
            (
                &*m.cluster,
                &*m.namespace,
                &*m.workload,
                &*m.canonical_service,
                &*m.canonical_revision
            ),
            ("Kubernetes", "default", "client", "client", "v1")
        );
        // Nothing usable: every value is `unknown`.
        assert_eq!(&*meta_from_baggage("junk,=,a=").workload, "unknown");
        // Values not written as Kubernetes writes names: `unknown`, never part of the line.
        let long = "a".repeat(254);
        for bad in ["a b", "a\"b", "x=y", "a\tb", "é", long.as_str()] {
            let m = meta_from_baggage(&format!(
                "k8s.namespace.name=ok,k8s.pod.name={bad},service.version={bad}"
            ));
            assert_eq!(
                (&*m.namespace, &*m.workload, &*m.canonical_revision),
                ("ok", "unknown", "unknown"),
                "{bad:?}"
            );
        }
        let longest = "a".repeat(253);
        let m = meta_from_baggage(&format!("k8s.pod.name={longest},service.version=v1.2_3-x"));
        assert_eq!(
            (&*m.workload, &*m.canonical_revision),
            (&*longest, "v1.2_3-x")
        );
    }

    #[test]
    fn grpc_status_label_is_a_short_number_or_nothing() {
        let label = |v: &str| grpc_status_label(&http::HeaderValue::from_str(v).unwrap());
        assert_eq!(label("0").as_deref(), Some("0"));
        assert_eq!(label("16").as_deref(), Some("16"));
        assert_eq!(label("123").as_deref(), Some("123"));
        for bad in ["", "1234", "1 x=y", "-1", "0x1", "\"2\""] {
            assert_eq!(label(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn metric_names_and_labels() {
        let mut reg = Registry::default();
        let m = std::sync::Arc::new(Metrics::new(&mut reg));
        let labels = RequestLabels {
            response_code: 200,
            ..Default::default()
        };
        drop(RequestRecord::new(
            m.clone(),
            labels,
            "10.0.0.1:1".parse().unwrap(),
            "GET",
            "/",
            "echo",
        ));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for name in [
            "istio_requests_total{",
            "istio_request_duration_milliseconds_bucket{",
            "istio_request_bytes_bucket{",
            "istio_response_bytes_bucket{",
        ] {
            assert!(out.contains(name), "{name} missing:\n{out}");
        }
        assert!(out.contains("reporter=\"waypoint\""), "{out}");
        assert!(out.contains("response_code=\"200\""), "{out}");
    }

    fn record(m: &std::sync::Arc<Metrics>) -> RequestRecord {
        let src = "10.0.0.1:1".parse().unwrap();
        RequestRecord::new(m.clone(), RequestLabels::default(), src, "GET", "/", "echo")
    }

    /// hyper drops a response's body, which finishes its record, before it flushes the last
    /// bytes into the stream, which wakes the task that writes them: that task, woken after
    /// the record was finished, still runs before the record is written out.
    #[tokio::test]
    async fn a_record_finished_after_writes_waits_for_the_tasks_woken_after_it() {
        let mut reg = Registry::default();
        let m = std::sync::Arc::new(Metrics::new(&mut reg));
        let reg = std::sync::Arc::new(reg);
        let (wake, woken) = tokio::sync::oneshot::channel::<()>();
        let r2 = reg.clone();
        let writer = tokio::spawn(async move {
            woken.await.unwrap();
            counted(&r2)
        });
        // The writer waits on its channel.
        tokio::task::yield_now().await;
        record(&m).finish_after_writes();
        wake.send(()).unwrap();
        assert_eq!(writer.await.unwrap(), 0, "recorded before the writes");
        assert_eq!(counted_after_yields(&reg, 1).await, 1);
        // A record already finished is not recorded again.
        let mut again = record(&m);
        again.finish();
        again.finish_after_writes();
        tokio::task::yield_now().await;
        assert_eq!(counted(&reg), 2);
    }

    /// Nothing is lost: a record whose task never runs (its runtime shut down) is written out
    /// when the task is dropped, and one finished outside a runtime at once.
    #[test]
    fn a_record_finished_after_writes_is_kept_when_its_runtime_goes() {
        let mut reg = Registry::default();
        let m = std::sync::Arc::new(Metrics::new(&mut reg));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { record(&m).finish_after_writes() });
        assert_eq!(counted(&reg), 0, "the record's task has not run yet");
        drop(rt);
        assert_eq!(counted(&reg), 1);
        record(&m).finish_after_writes();
        assert_eq!(counted(&reg), 2);
    }

    /// Requests with the same labels count in one series, different labels in their own,
    /// whatever the precomputed hash does.
    #[test]
    fn equal_labels_share_a_series() {
        let mut reg = Registry::default();
        let m = std::sync::Arc::new(Metrics::new(&mut reg));
        for code in [200u16, 200, 503] {
            let labels = RequestLabels {
                response_code: code,
                ..Default::default()
            };
            let src = "10.0.0.1:1".parse().unwrap();
            drop(RequestRecord::new(
                m.clone(),
                labels,
                src,
                "GET",
                "/",
                "echo",
            ));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(series.len(), 2, "{out}");
        let count = |code: &str| {
            series
                .iter()
                .find(|l| l.contains(&format!("response_code=\"{code}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count("200").as_deref(), Some("2"), "{out}");
        assert_eq!(count("503").as_deref(), Some("1"), "{out}");
    }
}
