//! `zmesh-echo`: an echo app that answers like Istio's echo server (istio/istio
//! `pkg/test/echo/`, the image behind the Gateway API mesh conformance suite's
//! `echo-advanced`), so what a mesh test learns from a response reads the same here as there.
//!
//! - HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on every `--port`; HTTP/1.1 and HTTP/2
//!   over TLS (ALPN, a self-signed certificate) on every `--tls-port`. The body is Istio
//!   echo's `Key=Value` lines (`pkg/test/echo/fields.go`): `ServiceVersion`, `ServicePort`,
//!   `StatusCode`, `URL`, `Host`, `Method`, `Proto`, `IP` (the caller's), `Alpn` (TLS only),
//!   one `RequestHeader=Name:value` per request header, `Hostname` (the pod's name),
//!   `Namespace`.
//! - gRPC `proto.EchoTestService/Echo` (`pkg/test/echo/proto/echo.proto`: `EchoRequest{string
//!   message = 1}` -> `EchoResponse{string message = 1}`) on every `--grpc` port; the reply's
//!   message is the same lines plus `Echo=<request message>`.
//! - plain TCP echo (every byte back, half-close after the client's) on every `--tcp` port.
//!
//! What the mesh's L7 tests need beyond that ([`grpc`], [`ws`]), Istio's way where Istio's echo
//! has it:
//! - a WebSocket on every HTTP port: a request with `Upgrade: websocket` is upgraded and every
//!   text or binary message is sent back (as Istio echo's HTTP handler does);
//! - request bodies are never held whole: a plain HTTP request's body is counted as it arrives
//!   and its size answered as `BodyLength=<bytes>` (when not empty), and `?size=<bytes>` makes
//!   the response body exactly that many filler bytes, streamed (both ours: Istio's echo has
//!   no sink or source);
//! - a request header `x-echo-trailer: <value>` comes back as a response trailer of the same
//!   name (ours), on gRPC and HTTP/2 responses;
//! - the Gateway API conformance backends' `?delay=` and retry simulation
//!   (`?responseCode=&succeedAfter=&uuid=`), and a request log on demand ([`simulate`]);
//! - gRPC `proto.EchoTestService/EchoStream` (ours, not in Istio's `echo.proto`): a
//!   bidirectional stream answering each `EchoRequest` as it arrives, then `grpc-status: 0`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod client;
pub mod grpc;
pub mod simulate;
pub mod ws;

/// The gRPC method path the echo app serves.
pub const GRPC_ECHO_PATH: &str = "/proto.EchoTestService/Echo";

/// The request header whose value comes back as a response trailer of the same name.
pub const TRAILER_HEADER: &str = "x-echo-trailer";

/// The largest `?size=` served (1 TiB): a bound, not a buffer (the body is streamed).
const MAX_SIZE: u64 = 1 << 40;

/// Who the echo app says it is, and where it listens.
#[derive(Clone, Debug, Default)]
pub struct EchoConfig {
    /// `Hostname=` (the pod's name).
    pub hostname: String,
    /// `Namespace=`.
    pub namespace: String,
    /// `ServiceVersion=` (the pod's `version` label).
    pub version: String,
    /// Plain HTTP ports (HTTP/1.1 and h2c).
    pub http_ports: Vec<u16>,
    /// HTTPS ports (self-signed certificate, ALPN h2 and http/1.1).
    pub tls_ports: Vec<u16>,
    /// gRPC ports (h2c).
    pub grpc_ports: Vec<u16>,
    /// TCP echo ports.
    pub tcp_ports: Vec<u16>,
}

/// `EchoRequest` / `EchoResponse` of Istio's `echo.proto`: both one string, field 1.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMessage {
    /// `message`.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// A response body of the echo app.
pub type Body = BoxBody<Bytes, Infallible>;

/// The `Key=Value` body for one request, as Istio's echo server writes it.
pub fn fields(
    cfg: &EchoConfig,
    port: u16,
    peer: SocketAddr,
    alpn: Option<&str>,
    req: &http::request::Parts,
) -> String {
    let mut out = String::new();
    let mut put = |k: &str, v: &str| {
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    };
    put("ServiceVersion", &cfg.version);
    put("ServicePort", &port.to_string());
    put("StatusCode", "200");
    put("URL", req.uri.path_and_query().map_or("/", |p| p.as_str()));
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    put("Host", host);
    put("Method", req.method.as_str());
    put("Proto", &format!("{:?}", req.version));
    put("IP", &peer.ip().to_string());
    if let Some(alpn) = alpn {
        put("Alpn", alpn);
    }
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                canonical(k.as_str()),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    // By name only: a stable sort keeps the values of one header in the order they came.
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in headers {
        put("RequestHeader", &format!("{k}:{v}"));
    }
    put("Hostname", &cfg.hostname);
    put("Namespace", &cfg.namespace);
    out
}

/// `x-request-id` -> `X-Request-Id` (Go's canonical header form, as Istio's echo prints).
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Frames one gRPC message (uncompressed).
pub fn grpc_frame(msg: &EchoMessage) -> Bytes {
    let body = prost::Message::encode_to_vec(msg);
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}

/// Decodes the first gRPC message of a request body.
pub fn grpc_unframe(mut data: &[u8]) -> Result<EchoMessage> {
    anyhow::ensure!(data.len() >= 5, "gRPC body shorter than a frame header");
    let compressed = data.get_u8();
    anyhow::ensure!(
        compressed == 0,
        "compressed gRPC messages are not supported"
    );
    let len = data.get_u32() as usize;
    anyhow::ensure!(data.len() >= len, "truncated gRPC message");
    Ok(prost::Message::decode(&data[..len])?)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn handle(
    cfg: Arc<EchoConfig>,
    port: u16,
    peer: SocketAddr,
    alpn: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if ws::is_websocket(&req) {
        return Ok(ws::upgrade(req));
    }
    let (parts, body) = req.into_parts();
    if let Some(id) = parts.headers.get(simulate::LOG_HEADER) {
        eprintln!(
            "logged {} {} {}",
            String::from_utf8_lossy(id.as_bytes()),
            parts.method,
            parts.uri.path()
        );
    }
    match simulate::delay(&parts.uri) {
        Ok(Some(d)) => tokio::time::sleep(d).await,
        Ok(None) => {}
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    }
    let mut lines = fields(&cfg, port, peer, alpn.as_deref(), &parts);
    let trailer = parts.headers.get(TRAILER_HEADER).cloned();
    let is_grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return Ok(grpc::serve(&parts, body, lines, trailer).await);
    }
    match simulate::failure(&parts.uri) {
        Ok(Some(code)) => return Ok(text(code, format!("StatusCode={}\n", code.as_u16()))),
        Ok(None) => {}
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    }
    let Ok(length) = count(body).await else {
        return Ok(text(StatusCode::BAD_REQUEST, "unreadable body\n".into()));
    };
    if length > 0 {
        lines.push_str(&format!("BodyLength={length}\n"));
    }
    let size = match requested_size(&parts.uri) {
        Ok(s) => s,
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    };
    let mut frames: Vec<Bytes> = Vec::new();
    let body = match size {
        Some(n) => filler(n, trailer),
        None if trailer.is_some() => {
            frames.push(Bytes::from(lines));
            with_trailer(futures::stream::iter(frames), trailer)
        }
        None => return Ok(text(StatusCode::OK, lines)),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(if size.is_some() {
            "application/octet-stream"
        } else {
            "text/plain"
        }),
    );
    if let Some(n) = size {
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(resp)
}

/// Reads a body to its end without keeping it; returns its length.
async fn count(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

/// `?size=<bytes>`, if the query asks for a body of that size.
fn requested_size(uri: &http::Uri) -> Result<Option<u64>, String> {
    let Some(v) = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("size="))
    else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(n) if n <= MAX_SIZE => Ok(Some(n)),
        _ => Err(format!(
            "size={v:?}: give the response size in bytes, at most {MAX_SIZE}"
        )),
    }
}

/// 64 KiB of filler, shared by every streamed body.
static FILLER: [u8; 64 << 10] = [b'x'; 64 << 10];

/// A body of exactly `n` filler bytes, streamed in 64 KiB frames.
fn filler(n: u64, trailer: Option<HeaderValue>) -> Body {
    let chunks = futures::stream::unfold(n, |left| async move {
        (left > 0).then(|| {
            let take = left.min(FILLER.len() as u64);
            (Bytes::from_static(&FILLER[..take as usize]), left - take)
        })
    });
    with_trailer(chunks, trailer)
}

/// `data` as a body, ended by the `x-echo-trailer` trailer when there is one.
fn with_trailer(
    data: impl futures::Stream<Item = Bytes> + Send + Sync + 'static,
    trailer: Option<HeaderValue>,
) -> Body {
    use futures::StreamExt;
    let trailers = trailer.map(|v| {
        let mut t = HeaderMap::new();
        t.insert(TRAILER_HEADER, v);
        Frame::trailers(t)
    });
    let frames = data
        .map(Frame::data)
        .chain(futures::stream::iter(trailers))
        .map(Ok);
    BodyExt::boxed(StreamBody::new(frames))
}

/// The next connection on `listener`, with `TCP_NODELAY` as Istio's echo app has it: Go sets
/// it on every TCP connection (`net.TCPConn.SetNoDelay`, on by default), so small responses
/// are not held back by Nagle's algorithm waiting for the peer's delayed ACK.
async fn accept(listener: &TcpListener) -> Option<(TcpStream, std::net::SocketAddr)> {
    let (stream, peer) = listener.accept().await.ok()?;
    let _ = stream.set_nodelay(true);
    Some((stream, peer))
}

/// Serves HTTP (1.1 or h2c, or over TLS when `tls` is set) on `listener`.
async fn serve_http(
    cfg: Arc<EchoConfig>,
    listener: TcpListener,
    port: u16,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Some((stream, peer)) = accept(&listener).await else {
            continue;
        };
        let (cfg, tls) = (cfg.clone(), tls.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(cfg.clone(), port, peer, None, req)
                    });
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let alpn = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map(|a| String::from_utf8_lossy(a).into_owned());
                    let svc = hyper::service::service_fn(move |req| {
                        handle(cfg.clone(), port, peer, alpn.clone(), req)
                    });
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                        .await;
                }
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener) {
    loop {
        let Some((mut stream, _)) = accept(&listener).await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// A TLS acceptor with a fresh self-signed certificate for `hostname`, offering h2 and
/// http/1.1.
fn tls_acceptor(hostname: &str) -> Result<tokio_rustls::TlsAcceptor> {
    let cert = rcgen::generate_simple_self_signed(vec![hostname.to_owned()])
        .context("generating the self-signed certificate")?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the generated key: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn bind(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}: is another app on that port?"))
}

/// Binds every port of `cfg`, then serves until the process ends.
pub async fn run(cfg: EchoConfig) -> Result<()> {
    let cfg = Arc::new(cfg);
    let mut tasks = tokio::task::JoinSet::new();
    for &port in cfg.http_ports.iter().chain(&cfg.grpc_ports) {
        let l = bind(port).await?;
        tasks.spawn(serve_http(cfg.clone(), l, port, None));
    }
    if !cfg.tls_ports.is_empty() {
        let acceptor = tls_acceptor(&cfg.hostname)?;
        for &port in &cfg.tls_ports {
            let l = bind(port).await?;
            tasks.spawn(serve_http(cfg.clone(), l, port, Some(acceptor.clone())));
        }
    }
    for &port in &cfg.tcp_ports {
        tasks.spawn(serve_tcp(bind(port).await?));
    }
    anyhow::ensure!(
        !tasks.is_empty(),
        "no port to serve: give --port, --tls-port, --grpc or --tcp"
    );
    eprintln!("zmesh-echo {} listening: {cfg:?}", cfg.hostname);
    tasks.join_next().await;
    Ok(())
}

/// A client-side helper for tests: one gRPC Echo call over h2c to `addr`; returns the reply's
/// message.
pub async fn grpc_echo(stream: TcpStream, authority: &str, message: &str) -> Result<String> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::post(format!("http://{authority}{GRPC_ECHO_PATH}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(&EchoMessage {
            message: message.to_owned(),
        })))?;
    let resp = send.send_request(req).await?;
    let body = resp.into_body().collect().await?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("missing")
        .to_owned();
    anyhow::ensure!(status == "0", "grpc-status {status}");
    Ok(grpc_unframe(&body.to_bytes())?.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_like_istio_echo() {
        let cfg = EchoConfig {
            hostname: "echo-v1-abcde".into(),
            namespace: "gateway-conformance-mesh".into(),
            version: "v1".into(),
            ..Default::default()
        };
        let (parts, ()) = Request::get("/a?b=c")
            .header("host", "echo:80")
            .header("x-request-id", "42")
            .body(())
            .unwrap()
            .into_parts();
        let body = fields(&cfg, 8080, "10.0.0.1:5".parse().unwrap(), None, &parts);
        for line in [
            "ServiceVersion=v1",
            "ServicePort=8080",
            "URL=/a?b=c",
            "Host=echo:80",
            "Method=GET",
            "Proto=HTTP/1.1",
            "IP=10.0.0.1",
            "RequestHeader=X-Request-Id:42",
            "Hostname=echo-v1-abcde",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
        }
        assert!(!body.contains("Alpn="));
    }

    #[test]
    fn grpc_frames_round_trip_and_reject_garbage() {
        let m = EchoMessage {
            message: "hi".into(),
        };
        assert_eq!(grpc_unframe(&grpc_frame(&m)).unwrap(), m);
        assert!(grpc_unframe(&[0, 0, 0, 0, 9, 1]).is_err());
        assert!(grpc_unframe(&[1, 0, 0, 0, 0]).is_err());
    }
}
