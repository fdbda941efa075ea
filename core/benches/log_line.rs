//! What an access-log line costs to format: the waypoint's request line and ztunnel's
//! connection line (the same fields as `waypoint/src/telemetry.rs` and
//! `ztunnel/src/metrics.rs` log), as text without colours (how the proxies log when stdout is
//! not a terminal) and as JSON (`LOG_FORMAT=json`): through tracing-subscriber's formatters and
//! through `zmesh_core::logline`'s (`PlainFields` and `Rfc3339Micros`; `JsonLine`), which write
//! the same bytes, alternated in one run. Lines go to `io::sink`; the time per line is the
//! event's dispatch through a registry and the fmt layer's formatting (what differs between
//! the two), not the copy into `zmesh_core::logsink`'s buffer that the proxies then make. The
//! waypoint's line lacks nothing of the proxy's; ztunnel's leaves out `policy`, which is
//! absent unless a policy allowed the connection.
//! `cargo bench -p zmesh-core --bench log_line`; `LOG_LINE_N` lines per round (default 200,000),
//! five rounds of each.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use tracing_subscriber::layer::SubscriberExt;

const CLIENT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 17), 51234));
const ENDPOINT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 8080));
const SERVICE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80));

fn waypoint_line(src: SocketAddr, upstream: SocketAddr, ms: f64) {
    tracing::info!(
        target: "access",
        reporter = "waypoint",
        src.addr = %src,
        src.workload = %"client-7d9c8b6f5-x2k4p",
        src.namespace = %"gateway-conformance-mesh-consumer",
        src.identity = %"spiffe://cluster.local/ns/gateway-conformance-mesh-consumer/sa/default",
        dst.service = %"echo.gateway-conformance-mesh.svc.cluster.local",
        dst.workload = %"echo-v1-6b8f7c9d4-abcde",
        dst.addr = %upstream,
        dst.identity = %"spiffe://cluster.local/ns/gateway-conformance-mesh/sa/default",
        method = %"GET",
        authority = %"echo.gateway-conformance-mesh:80",
        path = %"/",
        protocol = "HTTP",
        response_code = %200,
        grpc_status = %"-",
        response_flags = "-",
        duration_ms = format_args!("{ms:.1}"),
        bytes_received = 0u64,
        bytes_sent = 64u64,
        error = "-",
        policy = %"-",
        "request"
    );
}

fn ztunnel_line(src: SocketAddr, dst: SocketAddr, duration: u128) {
    tracing::info!(
        target: "access",
        direction = "outbound",
        src.addr = %src,
        src.workload = %"client-7d9c8b6f5-x2k4p",
        src.namespace = %"default",
        src.identity = %"spiffe://cluster.local/ns/default/sa/client",
        dst.addr = %dst,
        dst.hbone_addr = "10.244.1.9:8080",
        dst.service = %"echo.default.svc.cluster.local",
        dst.workload = %"echo-6b8f7c9d4-abcde",
        dst.namespace = %"default",
        dst.identity = %"spiffe://cluster.local/ns/default/sa/echo",
        bytes_sent = 64u64,
        bytes_recv = 64u64,
        duration = format_args!("{duration}ms"),
        "connection complete"
    );
}

/// A line's name and a function logging it (its argument varies the values).
type Line = (&'static str, fn(u32));

/// Nanoseconds per line for `n` lines of `line` under `dispatch`.
fn run(dispatch: &tracing::Dispatch, n: u32, line: fn(u32)) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let start = Instant::now();
        for i in 0..n {
            line(i);
        }
        start.elapsed().as_nanos() as f64 / f64::from(n)
    })
}

fn main() {
    let n: u32 = std::env::var("LOG_LINE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let sink = std::io::sink;
    let text = tracing_subscriber::fmt::layer().with_ansi(false);
    let formats = [
        (
            "text",
            tracing::Dispatch::new(tracing_subscriber::registry().with(text.with_writer(sink))),
            tracing::Dispatch::new(
                tracing_subscriber::registry().with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(false)
                        .fmt_fields(zmesh_core::logline::PlainFields)
                        .with_timer(zmesh_core::logline::Rfc3339Micros)
                        .with_writer(sink),
                ),
            ),
        ),
        (
            "JSON",
            tracing::Dispatch::new(
                tracing_subscriber::registry()
                    .with(tracing_subscriber::fmt::layer().json().with_writer(sink)),
            ),
            tracing::Dispatch::new(
                tracing_subscriber::registry().with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .event_format(zmesh_core::logline::JsonLine::default())
                        .with_writer(sink),
                ),
            ),
        ),
    ];
    let lines: [Line; 2] = [
        ("waypoint request (21 fields and the message)", |i| {
            waypoint_line(CLIENT, ENDPOINT, f64::from(i % 100) / 10.0)
        }),
        ("ztunnel connection (14 fields and the message)", |i| {
            ztunnel_line(CLIENT, SERVICE, u128::from(i % 100))
        }),
    ];
    println!("{n} lines per round, five rounds of each formatter, alternated");
    println!(
        "| line | format | tracing-subscriber's: ns per line (rounds) | zmesh_core::logline's: ns per line (rounds) | logline / tracing-subscriber (medians) |"
    );
    println!("|---|---|---|---|---|");
    for (name, line) in lines {
        for (format, default, ours) in &formats {
            // A warm-up round of each.
            run(default, n / 10, line);
            run(ours, n / 10, line);
            let (mut d, mut o) = (Vec::new(), Vec::new());
            for round in 0..5 {
                if round % 2 == 0 {
                    d.push(run(default, n, line));
                    o.push(run(ours, n, line));
                } else {
                    o.push(run(ours, n, line));
                    d.push(run(default, n, line));
                }
            }
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (sd, so) = (show(&d), show(&o));
            let ratio = median(&mut o) / median(&mut d);
            println!("| {name} | {format} | {sd} | {so} | {ratio:.2} |");
        }
    }
}
