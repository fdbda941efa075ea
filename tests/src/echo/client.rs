//! Clients for what curl cannot do from a pod (`zmesh-echo-client`, the stand-in for Istio's
//! echo `client`): gRPC over h2c (unary and the bidirectional `EchoStream`, trailers read) and
//! a WebSocket round trip. Each returns a report of `Key=Value` lines, like the echo app's own
//! answers, for a test to read.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Uri};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::grpc::{ChannelBody, Decoder, GRPC_STREAM_PATH};
use super::{EchoMessage, GRPC_ECHO_PATH, TRAILER_HEADER, grpc_frame};

/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP connection to `host:port` with `TCP_NODELAY`, as Go's (the echo app's and grpc-go's)
/// are by default: each frame goes at once, not held by Nagle's algorithm behind the peer's
/// delayed ACK.
async fn dial(host: &str, port: u16) -> Result<TcpStream> {
    let tcp = TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// `host`, `port` and `authority` of an `http://` or `ws://` URL.
fn target(url: &str) -> Result<(String, u16, String)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    let default = match uri.scheme_str() {
        Some("http" | "ws") => 80,
        _ => bail!("{url:?}: use an http:// (gRPC) or ws:// (WebSocket) URL"),
    };
    let auth = uri
        .authority()
        .with_context(|| format!("{url:?} names no host"))?;
    Ok((
        auth.host().to_owned(),
        auth.port_u16().unwrap_or(default),
        auth.as_str().to_owned(),
    ))
}

fn trailer_lines(out: &mut String, t: Option<&HeaderMap>) {
    let Some(t) = t else {
        out.push_str("Trailers=none\n");
        return;
    };
    let mut names: Vec<(String, String)> = t
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    names.sort();
    for (k, v) in names {
        out.push_str(&format!("Trailer={k}:{v}\n"));
    }
}

/// One gRPC call to `url` (`http://host:port`, h2c) over `GRPC_ECHO_PATH` (unary) or
/// `GRPC_STREAM_PATH` (`messages` sent one at a time, each reply awaited before the next is
/// sent). `trailer`: the `x-echo-trailer` header to send; `headers`: more request headers, each
/// `name:value`. The report: each reply's lines, `Replies=<n>`, then one `Trailer=name:value`
/// per trailer.
pub async fn grpc(
    url: &str,
    stream: bool,
    messages: &[String],
    trailer: Option<&str>,
    headers: &[String],
) -> Result<String> {
    let mut extra = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?}: write it as name:value"))?;
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .with_context(|| format!("header {h:?}: {k:?} is not a header name"))?;
        let value = http::HeaderValue::from_str(v.trim())
            .with_context(|| format!("header {h:?}: the value is not a header value"))?;
        extra.push((name, value));
    }
    ensure!(!messages.is_empty(), "give at least one --message");
    ensure!(
        stream || messages.len() == 1,
        "a unary call sends one message: use --stream for more"
    );
    let (host, port, authority) = target(url)?;
    let tcp = dial(&host, port).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .context("the HTTP/2 handshake")?;
    tokio::spawn(conn);
    let path = if stream {
        GRPC_STREAM_PATH
    } else {
        GRPC_ECHO_PATH
    };
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(1);
    let mut req = Request::post(format!("http://{authority}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    if let Some(t) = trailer {
        req = req.header(TRAILER_HEADER, t);
    }
    for (k, v) in extra {
        req = req.header(k, v);
    }
    let req = req.body(ChannelBody(rx))?;
    let frame = |m: &String| Frame::data(grpc_frame(&EchoMessage { message: m.clone() }));
    let mut tx = Some(tx);
    if !stream {
        // The whole request goes at once: the message, then the end of the stream.
        if let Some(t) = tx.take() {
            t.send(frame(&messages[0])).await?;
        }
    }
    let resp = tokio::time::timeout(REPLY_TIMEOUT, send.send_request(req))
        .await
        .context("no response headers in time")??;
    ensure!(
        resp.status() == http::StatusCode::OK,
        "HTTP status {}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut d = Decoder::default();
    let mut out = String::new();
    let mut replies = 0;
    let mut trailers = None;
    let mut pending = messages.iter();
    if !stream {
        pending.next();
    }
    loop {
        // The next message goes once the previous reply is in.
        if stream && replies == messages.len() - pending.len() {
            match pending.next() {
                Some(m) => tx
                    .as_ref()
                    .expect("the request stream is open while messages are pending")
                    .send(frame(m))
                    .await
                    .context("the request stream closed early")?,
                None => tx = None,
            }
        }
        let Some(f) = tokio::time::timeout(REPLY_TIMEOUT, body.frame())
            .await
            .context("no reply in time")?
        else {
            break;
        };
        let f = f.context("reading the response")?;
        if let Some(data) = f.data_ref() {
            d.push(data);
            while let Some(m) = d.next_message()? {
                out.push_str(&m.message);
                replies += 1;
            }
        } else if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    drop(tx);
    out.push_str(&format!("Replies={replies}\n"));
    trailer_lines(&mut out, trailers.as_ref());
    Ok(out)
}

/// A WebSocket to `url` (`ws://host:port/path`): each message sent and its echo awaited. The
/// report: `Upgraded=true`, one `Received=<text>` per echo.
pub async fn websocket(url: &str, messages: &[String]) -> Result<String> {
    let (host, port, _) = target(url)?;
    let tcp = dial(&host, port).await?;
    let (mut ws, resp) =
        tokio::time::timeout(REPLY_TIMEOUT, tokio_tungstenite::client_async(url, tcp))
            .await
            .context("no WebSocket handshake in time")?
            .context("the WebSocket handshake")?;
    let mut out = format!("Upgraded=true\nStatus={}\n", resp.status().as_u16());
    for m in messages {
        ws.send(Message::text(m.as_str())).await?;
        let echo = tokio::time::timeout(REPLY_TIMEOUT, ws.next())
            .await
            .context("no echo in time")?
            .context("the WebSocket closed before the echo")??;
        match echo {
            Message::Text(t) => out.push_str(&format!("Received={}\n", t.as_str())),
            other => bail!("expected a text echo, got {other:?}"),
        }
    }
    ws.close(None).await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target("http://echo.ns:7070").unwrap(),
            ("echo.ns".into(), 7070, "echo.ns:7070".into())
        );
        assert_eq!(target("ws://e/x").unwrap().1, 80);
        assert!(target("https://e").is_err());
        assert!(target("e:80").is_err());
    }
}
