//! Istio's standard traffic labels (`istio_tcp_*` at ztunnel, `istio_requests_total` and the
//! request histograms at the waypoint): one label set for both, built from the workload model.
//! Unknown values render as `unknown`, as Istio's do.

use std::sync::{Arc, LazyLock, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

use crate::identity::SpiffeId;
use crate::logsink::DropCount;
use crate::state::{Service, Workload};

/// Istio's traffic labels. Unknown values render as `unknown` ([`TrafficLabels::new`]);
/// `Default` is every label empty, a placeholder.
///
/// Values are shared strings ([`Label`]): a label set is built from parts made once (per
/// workload, per endpoint, per connection) and cloned per connection or request without
/// copying or allocating a string.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
    pub destination_service: Label,
    pub destination_service_namespace: Label,
    pub destination_service_name: Label,
    pub destination_workload: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_cluster: Label,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Where a proxy's log lines go: stdout through a writer thread (`thread_name`), in batches
/// ([`crate::logsink`]). The data path formats a line and appends it, never waiting on a
/// write(2); under overload (more than [`crate::logsink::LOG_QUEUE_BYTES`] waiting) lines are
/// dropped and counted rather than stalling traffic. Keep the guard for the process's life:
/// dropped at exit, it writes out what is waiting.
pub fn log_writer(
    thread_name: &str,
) -> std::io::Result<(crate::logsink::LogWriter, crate::logsink::LogGuard)> {
    let (writer, guard) = crate::logsink::sink(
        thread_name,
        crate::logsink::LOG_QUEUE_BYTES,
        std::io::stdout(),
    )?;
    let _ = PROCESS_LOG_DROPS.set(writer.drop_count());
    Ok((writer, guard))
}

/// The drop count of the process's log writer (the first [`log_writer`] made).
static PROCESS_LOG_DROPS: OnceLock<DropCount> = OnceLock::new();

/// `zmesh_log_lines_dropped_total`: log lines (access-log lines included) the log writer
/// dropped because [`crate::logsink::LOG_QUEUE_BYTES`] were already waiting (stdout slow or stalled). Read at
/// each scrape, from the given writer's count or (`None`) the process's [`log_writer`]'s.
#[derive(Debug)]
pub struct DroppedLogLines(Option<DropCount>);

impl DroppedLogLines {
    /// Registers the process's count in `registry` (0 while no [`log_writer`] was made, as in
    /// tests).
    pub fn register(registry: &mut Registry) {
        registry.register_collector(Box::new(DroppedLogLines(None)));
    }
}

impl Collector for DroppedLogLines {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let dropped = self
            .0
            .as_ref()
            .or_else(|| PROCESS_LOG_DROPS.get())
            .map_or(0, DropCount::dropped);
        let counter = ConstCounter::new(dropped);
        let metric = encoder.encode_descriptor(
            "zmesh_log_lines_dropped",
            "Log lines (access log included) dropped because the log writer's buffer was full",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// The log-line formatter both proxies use, writing to `writer`: JSON with `LOG_FORMAT=json`,
/// else text (with colours only on a terminal); both as tracing-subscriber writes them, with
/// less work per line ([`crate::logline`]).
pub fn fmt_layer<S>(
    writer: crate::logsink::LogWriter,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt::layer()
            .json()
            .event_format(crate::logline::JsonLine::default())
            .with_writer(writer)
            .boxed()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .fmt_fields(crate::logline::PlainFields)
            .with_timer(crate::logline::Rfc3339Micros)
            .with_writer(writer)
            .boxed()
    }
}

/// What an unknown label value renders as.
pub const UNKNOWN: &str = "unknown";

/// A label value: a shared string, cheap to clone.
pub type Label = Arc<str>;

static UNKNOWN_LABEL: LazyLock<Label> = LazyLock::new(|| Label::from(UNKNOWN));

/// [`UNKNOWN`] as a label value (shared: no allocation).
pub fn unknown() -> Label {
    UNKNOWN_LABEL.clone()
}

/// `s`, or [`UNKNOWN`] when it is empty.
pub fn or_unknown(s: &str) -> Label {
    if s.is_empty() {
        unknown()
    } else {
        Label::from(s)
    }
}

/// What is known of a workload, as label values (`unknown` when not known): from the workload
/// model ([`WorkloadMeta::from_workload`]) or another source (the waypoint reads a client's
/// from the CONNECT's `baggage`). Made once per workload, connection or endpoint set and shared
/// by the label sets built from it.
#[derive(Clone, Debug)]
pub struct WorkloadMeta {
    pub workload: Label,
    pub namespace: Label,
    /// Also the `app` label.
    pub canonical_service: Label,
    /// Also the `version` label.
    pub canonical_revision: Label,
    pub cluster: Label,
    /// The SPIFFE id.
    pub principal: Label,
}

impl Default for WorkloadMeta {
    fn default() -> Self {
        WorkloadMeta {
            workload: unknown(),
            namespace: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
            cluster: unknown(),
            principal: unknown(),
        }
    }
}

impl WorkloadMeta {
    /// Istio's labels of `w`: its workload name (else its name), its canonical service (else
    /// its name), and its identity as the principal.
    pub fn from_workload(w: &Workload) -> WorkloadMeta {
        let principal = SpiffeId::uri(&w.trust_domain, &w.namespace, &w.service_account)
            .map_or_else(|_| unknown(), Label::from);
        Self::from_workload_as(w, principal)
    }

    /// [`WorkloadMeta::from_workload`] with the principal known already (the proxy's own
    /// identity label, a verified peer's): the workload's is not worked out then.
    pub fn from_workload_as(w: &Workload, principal: Label) -> WorkloadMeta {
        let or_name = |s: &str| or_unknown(if s.is_empty() { &w.name } else { s });
        WorkloadMeta {
            workload: or_name(&w.workload_name),
            namespace: or_unknown(&w.namespace),
            canonical_service: or_name(&w.canonical_name),
            canonical_revision: or_unknown(&w.canonical_revision),
            cluster: or_unknown(&w.cluster_id),
            principal,
        }
    }
}

/// The label slots of one side of a [`TrafficLabels`] (`source_*` or `destination_*`).
struct Side<'a> {
    workload: &'a mut Label,
    namespace: &'a mut Label,
    canonical_service: &'a mut Label,
    app: &'a mut Label,
    canonical_revision: &'a mut Label,
    version: &'a mut Label,
    cluster: &'a mut Label,
    principal: &'a mut Label,
}

impl Side<'_> {
    fn set(self, m: &WorkloadMeta) {
        *self.workload = m.workload.clone();
        *self.namespace = m.namespace.clone();
        *self.canonical_service = m.canonical_service.clone();
        *self.app = m.canonical_service.clone();
        *self.canonical_revision = m.canonical_revision.clone();
        *self.version = m.canonical_revision.clone();
        *self.cluster = m.cluster.clone();
        *self.principal = m.principal.clone();
    }
}

impl TrafficLabels {
    /// Every label unknown, for `reporter`, over TCP.
    pub fn new(reporter: &'static str) -> Self {
        let u = unknown;
        TrafficLabels {
            reporter,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: UNKNOWN,
        }
    }

    /// The `source_*` labels of workload `w`.
    pub fn source(mut self, w: &Workload) -> Self {
        self.set_source(&WorkloadMeta::from_workload(w));
        self
    }

    /// The `destination_*` workload labels of `w`.
    pub fn destination(mut self, w: &Workload) -> Self {
        self.set_destination(&WorkloadMeta::from_workload(w));
        self
    }

    /// The `source_*` labels of workload `w` when it is known, and `principal` (known already:
    /// the proxy's own identity, a verified peer's) whether or not it is.
    pub fn source_as(mut self, w: Option<&Workload>, principal: Label) -> Self {
        match w {
            Some(w) => self.set_source(&WorkloadMeta::from_workload_as(w, principal)),
            None => self.source_principal = principal,
        }
        self
    }

    /// The `destination_*` workload labels of `w` when it is known, and `principal` whether or
    /// not it is.
    pub fn destination_as(mut self, w: Option<&Workload>, principal: Label) -> Self {
        match w {
            Some(w) => self.set_destination(&WorkloadMeta::from_workload_as(w, principal)),
            None => self.destination_principal = principal,
        }
        self
    }

    /// Sets the `source_*` labels to `m`'s values (shared: no string is copied).
    pub fn set_source(&mut self, m: &WorkloadMeta) {
        Side {
            workload: &mut self.source_workload,
            namespace: &mut self.source_workload_namespace,
            canonical_service: &mut self.source_canonical_service,
            app: &mut self.source_app,
            canonical_revision: &mut self.source_canonical_revision,
            version: &mut self.source_version,
            cluster: &mut self.source_cluster,
            principal: &mut self.source_principal,
        }
        .set(m);
    }

    /// Sets the `destination_*` workload labels to `m`'s values (shared).
    pub fn set_destination(&mut self, m: &WorkloadMeta) {
        Side {
            workload: &mut self.destination_workload,
            namespace: &mut self.destination_workload_namespace,
            canonical_service: &mut self.destination_canonical_service,
            app: &mut self.destination_app,
            canonical_revision: &mut self.destination_canonical_revision,
            version: &mut self.destination_version,
            cluster: &mut self.destination_cluster,
            principal: &mut self.destination_principal,
        }
        .set(m);
    }

    /// The `destination_service*` labels of `s`.
    pub fn service(mut self, s: &Service) -> Self {
        self.destination_service = or_unknown(&s.hostname);
        self.destination_service_namespace = or_unknown(&s.namespace);
        self.destination_service_name = or_unknown(&s.name);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn scrape(c: DroppedLogLines) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn dropped_lines_are_counted_in_the_metric() {
        // No room at all: every line is dropped, never blocking the caller.
        let (writer, guard) = crate::logsink::sink("test-log", 0, std::io::sink()).unwrap();
        let metric = DroppedLogLines(Some(writer.drop_count()));
        assert!(
            scrape(DroppedLogLines(Some(writer.drop_count())))
                .contains("zmesh_log_lines_dropped_total 0\n")
        );
        for i in 0..20 {
            (&writer)
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        assert!(
            scrape(metric).contains("zmesh_log_lines_dropped_total 20\n"),
            "the scrape shows the writer's count"
        );
        drop(guard);
    }
}
