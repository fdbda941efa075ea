//! Log lines as tracing-subscriber writes them, with less work per line: the fields of a text
//! line without colours ([`PlainFields`]), its time ([`Rfc3339Micros`]) and a JSON line
//! ([`JsonLine`], `LOG_FORMAT=json`).
//!
//! An access-log line has about twenty fields. tracing-subscriber's `DefaultFields` writes each
//! through one `write!` of three arguments, two of them `nu_ansi_term` styles that are plain
//! when colours are off; with the waypoint's access log on (its default), formatting its line
//! took about a quarter of the instructions the waypoint spends per request
//! (`core/benches/log_line.rs` compares each formatter here with tracing-subscriber's).
//! [`PlainFields`] writes a field's separator, name and `=` as strings and formats only the
//! value.
//!
//! What it must match, from tracing-subscriber 0.3's `fmt/format/mod.rs` (`DefaultVisitor`) and
//! `fmt/format/escape.rs`: fields separated by one space; `message` without its name, its
//! text with ANSI and C1 control characters escaped; a raw identifier's `r#` dropped; string
//! values in Rust's `Debug` form (quoted), others as their `Debug` (`%value` fields: their
//! `Display`); an error followed by `NAME.sources=[...]` when it has sources; fields named
//! `log.*` (the `log` crate's metadata, written elsewhere by the formatter) skipped. The
//! tests compare the output of each formatter here with tracing-subscriber's.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// A [`tracing_subscriber::fmt::FormatFields`] for text without ANSI colours (see the
/// module's documentation). On a writer with colours, or without the sanitising of control
/// characters, it formats as tracing-subscriber's `DefaultFields` does, by its visitor.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainFields;

impl<'w> MakeVisitor<Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> PlainVisitor<'w> {
        if target.has_ansi_escapes() || !target.sanitizes_ansi_escapes() {
            return PlainVisitor(Inner::Default(DefaultVisitor::new(target, true)));
        }
        PlainVisitor(Inner::Plain(Plain {
            writer: target,
            first: true,
            result: Ok(()),
        }))
    }
}

/// [`PlainFields`]'s visitor: writes one event's (or span's) fields.
pub struct PlainVisitor<'w>(Inner<'w>);

enum Inner<'w> {
    Plain(Plain<'w>),
    Default(DefaultVisitor<'w>),
}

/// The fields of a line without colours, control characters sanitised.
struct Plain<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn inner(&mut self) -> &mut dyn Visit {
        match &mut self.0 {
            Inner::Plain(p) => p,
            Inner::Default(d) => d,
        }
    }
}

// `Visit`'s other methods (integers, floats, booleans, bytes) call `record_debug`, as they do
// for `Plain` and `DefaultVisitor`, which override only these three.
impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.inner().record_str(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.inner().record_error(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.inner().record_debug(field, value);
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        match self.0 {
            Inner::Plain(p) => p.result,
            Inner::Default(d) => d.finish(),
        }
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        match &mut self.0 {
            Inner::Plain(p) => &mut p.writer,
            Inner::Default(d) => d.writer(),
        }
    }
}

impl Plain<'_> {
    /// The separator before a field (none before the first).
    fn pad(&mut self) -> fmt::Result {
        if std::mem::take(&mut self.first) {
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// The separator and `name=` (a raw identifier's `r#` dropped).
    fn key(&mut self, name: &str) -> fmt::Result {
        self.pad()?;
        self.writer
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.writer.write_char('=')
    }

    /// `name=` then `value` in its `Debug` form.
    fn named(&mut self, name: &str, value: &dyn fmt::Debug) -> fmt::Result {
        self.key(name)?;
        write!(self.writer, "{value:?}")
    }

    /// The message: its `Debug` form (a string's text, unquoted, for `format_args!`), control
    /// characters escaped.
    fn message(&mut self, value: &dyn fmt::Debug) -> fmt::Result {
        self.pad()?;
        write!(Escaping(&mut self.writer), "{value:?}")
    }

    fn record(&mut self, field: &Field, f: impl FnOnce(&mut Self, &str) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        self.result = f(self, name);
    }
}

impl Visit for Plain<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, |v, name| match name {
            "message" => v.message(&format_args!("{value}")),
            // Printable ASCII without `"` or `\` is its own `Debug` form between quotes.
            _ if value
                .bytes()
                .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\') =>
            {
                v.key(name)?;
                v.writer.write_char('"')?;
                v.writer.write_str(value)?;
                v.writer.write_char('"')
            }
            _ => v.named(name, &value),
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record(field, |v, name| {
            let write = |v: &mut Self, args: fmt::Arguments<'_>| match name {
                "message" => v.message(&args),
                _ => v.named(name, &args),
            };
            match value.source() {
                Some(source) => write(
                    v,
                    format_args!("{} {name}.sources={}", Escaped(value), Sources(source)),
                ),
                None => write(v, format_args!("{}", Escaped(value))),
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, |v, name| match name {
            "message" => v.message(value),
            _ => v.named(name, value),
        });
    }
}

/// Writes through to the inner writer, ANSI and C1 control characters escaped as
/// tracing-subscriber's `EscapingWriter` does.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let ch = rest[at..].chars().next().expect("found at a char boundary");
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + ch.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// An error's `Display`, control characters escaped, in `Debug` position (as
/// tracing-subscriber's `EscapeGuard` over `format_args!("{}", error)`).
struct Escaped<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Escaping(f), "{}", self.0)
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An error and its sources as a list, each escaped (tracing-subscriber's `ErrorSourceList`).
struct Sources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&Escaped(e));
            next = e.source();
        }
        list.finish()
    }
}

/// A line's time as tracing-subscriber's default timer (`fmt::time::SystemTime`) writes it,
/// RFC 3339 in UTC with microseconds (`2026-12-07T09:16:51.123456Z`), through `humantime`,
/// which fills the digits itself where the default makes seven `core::fmt` calls. A clock
/// outside the years humantime writes (1970 to 9999) is written by the default timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rfc3339Micros;

/// 10000-01-01T00:00:00Z, seconds after the Unix epoch: the first instant humantime does not
/// write.
const YEAR_10000: u64 = 253_402_300_800;

/// Whether humantime writes `t` (it panics before the epoch and fails from the year 10000).
fn humantime_writes(t: std::time::SystemTime) -> bool {
    t.duration_since(std::time::UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() < YEAR_10000)
}

impl tracing_subscriber::fmt::time::FormatTime for Rfc3339Micros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now();
        if humantime_writes(now) {
            write!(w, "{}", humantime::format_rfc3339_micros(now))
        } else {
            tracing_subscriber::fmt::time::SystemTime.format_time(w)
        }
    }
}

/// A JSON log line (`LOG_FORMAT=json`): the bytes of tracing-subscriber's JSON formatter
/// (`fmt::layer().json()`: `timestamp`, `level`, `fields`, `target`, in that order, the
/// fields by tracing-serde as there), written by serde_json into a buffer of the thread's and
/// handed to the line's writer once. tracing-subscriber's own writes each of serde_json's
/// small pieces through an `io::Write` adaptor that checks it is UTF-8 again, about half of
/// its work per line (`core/benches/log_line.rs`). An event inside a span, or from the `log`
/// crate, is formatted by tracing-subscriber's own (`span`, `spans`, the log's metadata).
pub struct JsonLine {
    fallback: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
}

impl Default for JsonLine {
    fn default() -> Self {
        JsonLine {
            fallback: tracing_subscriber::fmt::format().json(),
        }
    }
}

thread_local! {
    /// [`JsonLine`]'s buffer, kept between lines.
    static JSON_LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A JSON line buffer larger than this is not kept for the next line.
const JSON_LINE_KEEP: usize = 16 << 10;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        use serde::ser::{SerializeMap, Serializer as _};
        use tracing_log::NormalizeEvent;
        use tracing_serde::AsSerde;
        use tracing_serde::fields::AsMap;

        // tracing-subscriber's names the event's parent, else the current span.
        let in_span = event.parent().is_some() || ctx.lookup_current().is_some();
        if in_span || event.is_log() {
            return self.fallback.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        let line = |buf: &mut Vec<u8>| -> Result<(), serde_json::Error> {
            let mut ser = serde_json::Serializer::new(buf);
            let mut map = ser.serialize_map(None)?;
            // As tracing-subscriber does, formatted first: serde_json panics if a value's
            // `Display` fails on its own.
            let mut time = String::with_capacity(32);
            let _ = tracing_subscriber::fmt::time::FormatTime::format_time(
                &Rfc3339Micros,
                &mut Writer::new(&mut time),
            );
            map.serialize_entry("timestamp", &time)?;
            map.serialize_entry("level", &meta.level().as_serde())?;
            map.serialize_entry("fields", &event.field_map())?;
            map.serialize_entry("target", meta.target())?;
            map.end()
        };
        let mut written = |buf: &mut Vec<u8>| {
            buf.clear();
            line(buf).map_err(|_| fmt::Error)?;
            buf.push(b'\n');
            // serde_json writes UTF-8: `str`s as they are, escapes in ASCII.
            writer.write_str(std::str::from_utf8(buf).map_err(|_| fmt::Error)?)
        };
        let kept = JSON_LINE.try_with(|b| match b.try_borrow_mut() {
            Ok(mut buf) => {
                let r = written(&mut buf);
                if buf.capacity() > JSON_LINE_KEEP {
                    *buf = Vec::new();
                }
                Some(r)
            }
            // A line formatted while formatting one (a field's `Debug` that logs).
            Err(_) => None,
        });
        match kept {
            Ok(Some(r)) => r,
            // That, or the thread's buffer already dropped (a line at the thread's exit).
            Ok(None) | Err(_) => written(&mut Vec::new()),
        }
    }
}

/// A log field's value: `Some`'s `Display`, or `-` for `None`; written where it is logged,
/// with no string made first.
pub struct OrDash<T>(pub Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    /// A `MakeWriter` appending to a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    struct Failure(&'static str, Option<Box<Failure>>);

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Runs `events` under two text layers, with colours or without, tracing-subscriber's
    /// default fields and [`super::PlainFields`], and gives both outputs.
    fn both(ansi: bool, events: impl FnOnce()) -> (String, String) {
        let (default, plain) = (Buf::default(), Buf::default());
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .without_time()
                    .with_writer(default.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .without_time()
                    .fmt_fields(super::PlainFields)
                    .with_writer(plain.clone()),
            );
        tracing::subscriber::with_default(subscriber, events);
        (default.text(), plain.text())
    }

    /// humantime writes the years 1970 to 9999; the timer leaves the others to
    /// tracing-subscriber's.
    #[test]
    fn the_years_humantime_writes() {
        use std::time::{Duration, UNIX_EPOCH};
        let micro = Duration::from_micros(1);
        let last = UNIX_EPOCH + Duration::from_secs(super::YEAR_10000) - micro;
        assert!(super::humantime_writes(UNIX_EPOCH));
        assert!(super::humantime_writes(last));
        assert!(!super::humantime_writes(last + micro));
        assert!(!super::humantime_writes(UNIX_EPOCH - micro));
        assert_eq!(
            humantime::format_rfc3339_micros(UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            humantime::format_rfc3339_micros(last).to_string(),
            "9999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn the_time_is_written_as_tracing_subscribers_default_timer_writes_it() {
        use tracing_subscriber::fmt::time::FormatTime;
        let time = |t: &dyn FormatTime| {
            let mut s = String::new();
            t.format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut s))
                .unwrap();
            s
        };
        let shape = |s: &str| {
            s.chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c })
                .collect::<String>()
        };
        for _ in 0..1000 {
            let before = time(&tracing_subscriber::fmt::time::SystemTime);
            let ours = time(&super::Rfc3339Micros);
            let after = time(&tracing_subscriber::fmt::time::SystemTime);
            // The same form, so the strings order as the times do.
            assert_eq!(shape(&ours), "0000-00-00T00:00:00.000000Z");
            assert_eq!(shape(&before), shape(&ours));
            assert!(before <= ours && ours <= after, "{before} {ours} {after}");
        }
    }

    /// Runs `events` under two JSON layers, tracing-subscriber's and one with
    /// [`super::JsonLine`], and gives both outputs.
    fn both_json(events: impl FnOnce()) -> (String, String) {
        let (default, ours) = (Buf::default(), Buf::default());
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(default.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(super::JsonLine::default())
                    .with_writer(ours.clone()),
            );
        tracing::subscriber::with_default(subscriber, events);
        (default.text(), ours.text())
    }

    /// The events of both tests.
    fn events() {
        let addr: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
        tracing::info!(
            target: "access",
            reporter = "waypoint",
            src.addr = %addr,
            dst.workload = %"echo-v1",
            protocol = "HTTP",
            response_code = %200,
            duration_ms = format_args!("{:.1}", 1.25),
            bytes_received = 12u64,
            bytes_sent = 64u64,
            error = "-",
            "request"
        );
        tracing::warn!("only a message");
        tracing::warn!("other controls: \x08 \x0c \x7f \x00 \u{9f} end");
        tracing::info!(raw_bytes = &b"ab\x00\xff"[..], "bytes");
        tracing::warn!(
            "a message {} with \x1b[31mcolour\x07 and \u{85}C1 {:?}",
            1,
            "q\""
        );
        tracing::info!(quoted = "a \"b\"\n\x1b[0m\u{85}", apostrophe = "it's", tab = "a\tb", accent = "é", back = "a\\b", shown = %"x\x1by", dbg = ?("t", 1));
        tracing::info!(
            n = -3i64,
            u = 7u64,
            b = true,
            f = 1.5f64,
            g = f64::NAN,
            big = 1u128 << 100,
            neg = -(1i128 << 100)
        );
        tracing::info!(r#type = "raw", r#loop = 1, "raw identifiers");
        tracing::info!(log.file = "skipped.rs", kept = 1, "log metadata");
        tracing::info!(no_message = 1);
        tracing::debug!(target: "other::target", "a debug line");
        let inner = Failure("inner \x1b gone", None);
        let outer = Failure(
            "outer",
            Some(Box::new(Failure("middle", Some(Box::new(inner))))),
        );
        let alone = Failure("alone\u{9b}", None);
        tracing::error!(
            error = &outer as &(dyn std::error::Error + 'static),
            other = &alone as &(dyn std::error::Error + 'static),
            "failed"
        );
        tracing::error!(message = &outer as &(dyn std::error::Error + 'static));
        tracing::error!(
            message = &alone as &(dyn std::error::Error + 'static),
            after = 2
        );
        let span = tracing::info_span!("conn", peer = %"10.0.0.2", id = 4u64, late = tracing::field::Empty);
        {
            let _in = span.enter();
            span.record("late", "set later");
            tracing::info!(in_span = true, "inside");
        }
        tracing::info!(parent: &span, explicit = true, "a parent named");
        tracing::info!(after_span = true, "outside again");
        // A record of the `log` crate, as tracing-log's `LogTracer` passes it on.
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("from the log crate: {}", 7))
                .level(log::Level::Warn)
                .target("a::log::target")
                .module_path_static(Some("a::log"))
                .file_static(Some("src/log.rs"))
                .line(Some(42))
                .build(),
        )
        .unwrap();
    }

    /// How many lines [`events`] logs.
    const EVENTS: usize = 18;

    #[test]
    fn json_lines_are_written_as_tracing_subscribers_json_writes_them() {
        let (default, ours) = both_json(events);
        // The lines' times differ: compared apart, the rest byte for byte.
        let split = |line: &str| {
            let line = line.strip_prefix("{\"timestamp\":\"").expect(line);
            let end = line.find('"').expect(line);
            (line[..end].to_owned(), line[end..].to_owned())
        };
        assert_eq!(default.lines().count(), EVENTS, "{default}");
        assert_eq!(ours.lines().count(), EVENTS, "{ours}");
        let mut last = String::new();
        for (d, o) in default.lines().zip(ours.lines()) {
            let ((dt, d), (ot, o)) = (split(d), split(o));
            assert_eq!(o, d);
            // Ours was written after the default's line, and before the next.
            assert_eq!(ot.len(), dt.len(), "{ot} {dt}");
            assert!(last <= dt && dt <= ot, "{last} {dt} {ot}");
            last = ot;
        }
        assert!(ours.contains(r#""spans":[{"#), "{ours}");
    }

    #[test]
    fn fields_are_written_as_tracing_subscribers_default_writes_them() {
        for ansi in [false, true] {
            let (default, plain) = both(ansi, events);
            assert_eq!(default.lines().count(), EVENTS, "{default}");
            // Field names in italics with colours.
            assert_eq!(default.contains("\x1b[3m"), ansi, "{default}");
            for (d, p) in default.lines().zip(plain.lines()) {
                assert_eq!(p, d);
            }
            assert_eq!(plain, default);
        }
    }
}
