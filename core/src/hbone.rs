//! HBONE: HTTP/2 CONNECT over mutual TLS 1.3 to port 15008. This module holds the pieces both
//! ends share (HTTP/2 tuning, the CONNECT request and its headers) and the client with its
//! connection pool. The server side lives with each proxy, which decides what a CONNECT may reach.

mod pool;
mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::peer_text::PeerText;

pub use pool::{Pool, PoolConfig, PoolKey, PoolStats, StreamGuard};
pub use tunnel::{H2Tunnel, keepalive};

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// A tunnel: the byte stream of one CONNECT, after the 200, on h2's stream handles (what the
/// pool opens and ztunnel's inbound serves).
pub type Tunnel = H2Tunnel;

/// A CONNECT accepted by a hyper server (the waypoint's), after the 200.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// HTTP/2 settings, tuned for throughput: large windows so one stream can fill a fast link,
/// the connection window a multiple of the stream window so one slow stream cannot stall others.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams a server accepts on one connection.
    pub server_max_streams: u32,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            server_max_streams: 200,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

impl H2Settings {
    pub fn server(&self) -> hyper::server::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.server_max_streams)
            .max_send_buf_size(self.max_frame_size as usize)
            .max_header_list_size(64 << 10)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .auto_date_header(false);
        b
    }

    /// The HBONE client's HTTP/2 settings, for h2 itself (the pool's connections).
    pub fn h2_client(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buffer_size(self.stream_window as usize)
            .max_header_list_size(16 << 10)
            .enable_push(false);
        b
    }

    /// The HBONE server's HTTP/2 settings, for h2 itself (ztunnel's inbound).
    pub fn h2_server(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.server_max_streams)
            .max_send_buffer_size(self.max_frame_size as usize)
            .max_header_list_size(64 << 10);
        b
    }

    pub fn client(&self) -> hyper::client::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buf_size(self.stream_window as usize)
            .max_header_list_size(16 << 10)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true);
        b
    }
}

/// What the source tells the destination about itself, as request headers.
#[derive(Clone, Debug, Default)]
pub struct SourceInfo {
    /// The client's address (`forwarded: for="ip:port"`).
    pub addr: Option<SocketAddr>,
    /// The intended service hostname (`forwarded: ...;host=`).
    pub service_host: Option<String>,
    pub cluster: String,
    pub namespace: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
}

impl SourceInfo {
    /// W3C-baggage-style `key=value` list with the keys Istio uses.
    pub fn baggage(&self) -> String {
        let kind = match self.workload_type.as_str() {
            "" => "deployment",
            other => other,
        };
        // One string, written in place: this runs per connection.
        let mut out = String::with_capacity(160);
        let mut put = |k: &[&str], v: &str| {
            if !v.is_empty() {
                if !out.is_empty() {
                    out.push(',');
                }
                k.iter().for_each(|k| out.push_str(k));
                out.push('=');
                out.push_str(v);
            }
        };
        put(&["k8s.cluster.name"], &self.cluster);
        put(&["k8s.namespace.name"], &self.namespace);
        put(&["k8s.", kind, ".name"], &self.workload_name);
        put(&["service.name"], &self.canonical_name);
        put(&["service.version"], &self.canonical_revision);
        out
    }

    pub fn forwarded(&self) -> Option<String> {
        let addr = self.addr?;
        Some(match &self.service_host {
            Some(h) => format!("for=\"{addr}\";host={h}"),
            None => format!("for=\"{addr}\""),
        })
    }
}

/// A fresh W3C `traceparent` (version 00, random trace and parent ids, not sampled).
pub fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let parent: u64 = rand::random::<u64>() | 1;
    // Per connection: hex digits written by hand, not through the formatter's padding.
    fn hex(out: &mut String, v: u128, digits: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for i in (0..digits).rev() {
            out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    hex(&mut out, trace, 32);
    out.push('-');
    hex(&mut out, u128::from(parent), 16);
    out.push_str("-00");
    out
}

/// Builds the CONNECT request for `target` (the inner `ip:port`). Header values come from
/// config (workload names, revisions, service hostnames); one that is not a valid header value
/// is left out rather than failing the connection.
pub fn connect_request<B: Default>(target: SocketAddr, src: &SourceInfo) -> Request<B> {
    let mut req = Request::new(B::default());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = http::Uri::from_maybe_shared(target.to_string())
        .expect("ip:port is a valid authority-form URI");
    let headers = req.headers_mut();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    put("traceparent", traceparent());
    if let Some(f) = src.forwarded() {
        put("forwarded", f);
    }
    let baggage = src.baggage();
    if !baggage.is_empty() {
        put("baggage", baggage);
    }
    req
}

/// Parses the client address out of a `forwarded` header (`for="ip:port"`).
pub fn forwarded_for(value: &str) -> Option<SocketAddr> {
    value.split([';', ',']).find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        let v = v.trim_matches('"');
        v.parse()
            .ok()
            .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)))
    })
}

/// The service hostname in a `forwarded` header (`...;host=<hostname>`), a hint only.
pub fn forwarded_host(value: &str) -> Option<String> {
    value
        .split([';', ','])
        .find_map(|part| part.trim().strip_prefix("host="))
        .map(|h| h.trim_matches('"').to_owned())
        .filter(|h| !h.is_empty())
}

/// Why a CONNECT request was refused before anything was connected (the server answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefused {
    /// The method, as the peer sent it (bounded: it goes into log lines).
    #[error("method {0} is not CONNECT")]
    Method(PeerText),
    /// The request target, as the peer sent it (bounded: it goes into log lines).
    #[error("authority \"{0}\" is not ip:port")]
    Authority(PeerText),
    #[error("refused: destination port {0} is one of ztunnel's own ports (a loop)")]
    Loop(u16),
}

/// What an accepted CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    /// The inner destination, `ip:port` from the request's authority.
    pub target: SocketAddr,
    /// The service hostname the client named in `forwarded` (a hint only).
    pub host_hint: Option<String>,
}

/// The checks a server makes on an HBONE request before it looks at config: the method is
/// CONNECT, the authority is `ip:port`, and the port is none of `illegal_ports` (ztunnel's own).
pub fn parse_connect<B>(
    req: &Request<B>,
    illegal_ports: &[u16],
) -> Result<ConnectTarget, ConnectRefused> {
    if req.method() != Method::CONNECT {
        return Err(ConnectRefused::Method(PeerText::new(req.method().as_str())));
    }
    let target = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or_else(|| ConnectRefused::Authority(PeerText::new(&req.uri().to_string())))?;
    if illegal_ports.contains(&target.port()) {
        return Err(ConnectRefused::Loop(target.port()));
    }
    let host_hint = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_host);
    Ok(ConnectTarget { target, host_hint })
}

/// Why an HBONE connection or request failed, and whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "cannot open TCP to {0}: {1} (is the destination node reachable, and does a \
         NetworkPolicy allow port 15008?)"
    )]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("peer {0} did not negotiate ALPN h2")]
    Alpn(SocketAddr),
    #[error("HTTP/2 handshake with {0} failed: {1}")]
    H2Handshake(SocketAddr, h2::Error),
    #[error("CONNECT to {target} via {peer} failed: {source}")]
    Request {
        peer: SocketAddr,
        target: SocketAddr,
        source: h2::Error,
    },
    /// The pooled connection closed before the CONNECT was sent (safe to send again).
    #[error("CONNECT to {target} via {peer} not sent: the connection closed ({source})")]
    Closed {
        peer: SocketAddr,
        target: SocketAddr,
        source: h2::Error,
    },
    #[error("CONNECT to {target} via {peer} was answered {status}")]
    Status {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("cannot reach {0}: {1} (a concurrent attempt just failed)")]
    PeerFailed(SocketAddr, String),
    #[error("local TLS setup failed: {0}")]
    Local(#[from] crate::tls::TlsError),
}

impl HboneError {
    /// Istio's `response_flags` value for this failure.
    pub fn response_flag(&self) -> &'static str {
        match self {
            HboneError::Connect(..) => "CONNECT",
            HboneError::Tls(..) | HboneError::Alpn(_) => "TLS_FAILURE",
            HboneError::H2Handshake(..) => "H2_HANDSHAKE_FAILURE",
            HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => "DENY",
            HboneError::Request { .. }
            | HboneError::Closed { .. }
            | HboneError::Status { .. }
            | HboneError::PeerFailed(..) => "CONNECT",
            HboneError::Local(_) => "IDENTITY_ERROR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let src = SourceInfo {
            addr: Some("10.0.0.1:4000".parse().unwrap()),
            service_host: Some("echo.default.svc.cluster.local".into()),
            cluster: "Kubernetes".into(),
            namespace: "default".into(),
            workload_name: "client".into(),
            canonical_name: "client".into(),
            canonical_revision: "v1".into(),
            ..Default::default()
        };
        let req = connect_request::<()>("10.0.0.2:8080".parse().unwrap(), &src);
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.2:8080");
        let h = req.headers();
        assert_eq!(
            h["forwarded"],
            "for=\"10.0.0.1:4000\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(
            h["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1"
        );
        // Empty values are left out, with their commas.
        let partial = SourceInfo {
            namespace: "default".into(),
            workload_type: "job".into(),
            workload_name: "j".into(),
            ..Default::default()
        };
        assert_eq!(
            partial.baggage(),
            "k8s.namespace.name=default,k8s.job.name=j"
        );
        assert_eq!(SourceInfo::default().baggage(), "");
        let tp = h["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        assert_ne!(traceparent(), traceparent());
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        assert!(lower_hex(parts[1]) && lower_hex(parts[2]), "{tp}");
        assert!(
            parts[1].ends_with(['1', '3', '5', '7', '9', 'b', 'd', 'f']),
            "{tp}"
        );
        assert_eq!(
            forwarded_for(h["forwarded"].to_str().unwrap()),
            Some("10.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(
            forwarded_host(h["forwarded"].to_str().unwrap()).as_deref(),
            Some("echo.default.svc.cluster.local")
        );
    }

    #[test]
    fn connect_checks() {
        let req = |method: Method, uri: &str, forwarded: Option<&str>| {
            let mut b = Request::builder().method(method).uri(uri);
            if let Some(f) = forwarded {
                b = b.header("forwarded", f);
            }
            b.body(()).unwrap()
        };
        let ports = [15001, 15006, 15008];
        let ok = parse_connect(
            &req(
                Method::CONNECT,
                "10.0.0.2:8080",
                Some("for=\"10.0.0.1:4000\";host=echo.default.svc.cluster.local"),
            ),
            &ports,
        )
        .unwrap();
        assert_eq!(ok.target, "10.0.0.2:8080".parse().unwrap());
        assert_eq!(
            ok.host_hint.as_deref(),
            Some("echo.default.svc.cluster.local")
        );
        let v6 = parse_connect(&req(Method::CONNECT, "[fd00::2]:80", None), &ports).unwrap();
        assert_eq!(v6.target, "[fd00::2]:80".parse().unwrap());
        assert_eq!(v6.host_hint, None);
        assert_eq!(
            parse_connect(&req(Method::GET, "10.0.0.2:8080", None), &ports),
            Err(ConnectRefused::Method(PeerText::new("GET")))
        );
        assert_eq!(
            parse_connect(&req(Method::CONNECT, "echo:80", None), &ports),
            Err(ConnectRefused::Authority(PeerText::new("echo:80")))
        );
        assert_eq!(
            parse_connect(&req(Method::CONNECT, "10.0.0.2:15008", None), &ports),
            Err(ConnectRefused::Loop(15008))
        );
    }

    proptest::proptest! {
        #[test]
        fn forwarded_parser_never_panics(s in "\\PC*") {
            let _ = forwarded_for(&s);
        }

        /// Config text ends up in headers: whatever it holds, building the request never
        /// panics and the CONNECT target is always there.
        #[test]
        fn connect_request_never_panics(name in "\\PC{0,20}", rev in ".{0,10}", host in ".{0,20}") {
            let src = SourceInfo {
                addr: Some("10.0.0.1:1".parse().unwrap()),
                service_host: Some(host),
                canonical_name: name.clone(),
                canonical_revision: rev,
                workload_name: name,
                ..Default::default()
            };
            let req = connect_request::<()>("10.0.0.2:80".parse().unwrap(), &src);
            proptest::prop_assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.2:80");
            proptest::prop_assert!(req.headers().contains_key("traceparent"));
        }
    }
}
