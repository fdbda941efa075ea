//! HBONE requests as ztunnel's inbound listener (15008) sees them after HTTP/2 decoding: the
//! method, the `:authority`, and the `forwarded` header, through `hbone::parse_connect` (the
//! checks `ztunnel/src/proxy/inbound.rs` makes before it looks at config). Also the headers a
//! client builds (`connect_request`: `forwarded`, `baggage`, `traceparent`).
//!
//! Input: the request as text, `METHOD AUTHORITY` on the first line and `name: value` header
//! lines after it (values are any bytes; what HTTP/2 cannot carry the `http` crate refuses, as
//! hyper does before the service). The same bytes, read by `arbitrary`, make a client's
//! `SourceInfo` and target.
//!
//! Invariants: an accepted request is a CONNECT to exactly the `ip:port` of its authority, on
//! no illegal port, and a refused one says why; what a client writes in `forwarded` reads back
//! as the same address and service host; `traceparent` is a W3C version-00 header.
#![no_main]

use std::net::SocketAddr;

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use zmesh_core::hbone::{
    ConnectRefused, SourceInfo, connect_request, forwarded_for, forwarded_host, parse_connect,
};

/// ztunnel's own ports with the default config.
const ILLEGAL_PORTS: [u16; 3] = [15001, 15006, 15008];

#[derive(Debug, Arbitrary)]
struct Client {
    target: SocketAddr,
    addr: Option<SocketAddr>,
    /// The service hostname, cut down to DNS characters (config carries DNS names).
    host_label: Option<String>,
    namespace: String,
    workload_name: String,
    workload_type: String,
    canonical_name: String,
    canonical_revision: String,
}

fn server(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let (method, authority) = match first.iter().position(|b| *b == b' ') {
        Some(i) => (&first[..i], &first[i + 1..]),
        None => (first, &[][..]),
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(authority);
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            builder = builder.header(n, v);
        }
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    match parse_connect(&req, &ILLEGAL_PORTS) {
        Ok(c) => {
            assert_eq!(req.method(), Method::CONNECT);
            assert!(!ILLEGAL_PORTS.contains(&c.target.port()));
            let authority = req.uri().authority().expect("accepted with an authority");
            assert_eq!(
                authority.as_str().parse::<SocketAddr>().ok(),
                Some(c.target)
            );
            if let Some(host) = &c.host_hint {
                assert!(!host.is_empty());
            }
        }
        Err(ConnectRefused::Method(m)) => assert_ne!(req.method(), Method::CONNECT, "{m}"),
        Err(ConnectRefused::Loop(p)) => assert!(ILLEGAL_PORTS.contains(&p)),
        Err(ConnectRefused::Authority(_)) => {}
    }
}

/// A hostname as config carries it: DNS labels only.
fn hostname(label: &str) -> Option<String> {
    let host: String = label
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .collect();
    (!host.is_empty()).then_some(host)
}

fn client(c: &Client) {
    let src = SourceInfo {
        addr: c.addr,
        service_host: c.host_label.as_deref().and_then(hostname),
        cluster: "Kubernetes".into(),
        namespace: c.namespace.clone(),
        workload_name: c.workload_name.clone(),
        workload_type: c.workload_type.clone(),
        canonical_name: c.canonical_name.clone(),
        canonical_revision: c.canonical_revision.clone(),
    };
    let req = connect_request::<()>(c.target, &src);
    assert_eq!(req.method(), Method::CONNECT);
    let headers = req.headers();
    if let Some(f) = headers.get("forwarded") {
        let f = f.to_str().expect("forwarded is ASCII");
        let addr = src.addr.expect("forwarded only with an address");
        // The port and IP come back; an IPv6 scope or flow label is not carried.
        assert_eq!(
            forwarded_for(f).map(|a| (a.ip(), a.port())),
            Some((addr.ip(), addr.port())),
            "{f}"
        );
        assert_eq!(forwarded_host(f), src.service_host, "{f}");
    }
    let tp = headers
        .get("traceparent")
        .expect("traceparent is always set")
        .to_str()
        .expect("ASCII");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!((parts[0], parts[3]), ("00", "00"), "{tp}");
    assert!(parts[1].len() == 32 && parts[2].len() == 16, "{tp}");
    assert!(
        parts[1..3]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()) && p.bytes().any(|b| b != b'0')),
        "{tp}"
    );
    // A request the client builds passes the server's checks unless it names a loop port.
    match parse_connect(&req, &ILLEGAL_PORTS) {
        Ok(accepted) => {
            assert_eq!(accepted.target.ip(), c.target.ip());
            assert_eq!(accepted.target.port(), c.target.port());
            // The host travels in `forwarded`, which is sent only with the client's address.
            let host = src.addr.and(src.service_host.clone());
            assert_eq!(accepted.host_hint, host);
        }
        Err(ConnectRefused::Loop(p)) => assert_eq!(p, c.target.port()),
        Err(e) => panic!("a client's own request is refused: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    server(data);
    if let Ok(c) = Client::arbitrary(&mut Unstructured::new(data)) {
        client(&c);
    }
});
