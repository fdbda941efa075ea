//! The echo app's gRPC service: Istio echo's unary `proto.EchoTestService/Echo`, and our own
//! bidirectional `proto.EchoTestService/EchoStream` (not in Istio's `echo.proto`), which answers
//! each `EchoRequest` as soon as it has arrived, so a test sees messages cross a proxy in both
//! directions while the call is open. Both end with the `grpc-status` trailer (and
//! `x-echo-trailer` when the request had that header).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

use super::{Body, EchoMessage, GRPC_ECHO_PATH, TRAILER_HEADER, grpc_frame};

/// Our bidirectional streaming method (not in Istio's `echo.proto`).
pub const GRPC_STREAM_PATH: &str = "/proto.EchoTestService/EchoStream";

/// The largest message accepted (gRPC's default receive limit, 4 MiB).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Why a gRPC body could not be read as `EchoRequest`s.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("compressed gRPC messages are not supported (send them uncompressed)")]
    Compressed,
    #[error("a gRPC message of {0} bytes is larger than the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("the message is not an EchoRequest: {0}")]
    Decode(String),
    #[error("the body ended inside a gRPC message")]
    Truncated,
}

impl FrameError {
    /// The gRPC status code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::Compressed => "12",
            FrameError::TooLarge(_) => "8",
            FrameError::Decode(_) | FrameError::Truncated => "3",
        }
    }
}

/// Splits a stream of body bytes into gRPC messages, holding at most one message.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Adds bytes as they arrived.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, `None` until one has arrived.
    pub fn next_message(&mut self) -> Result<Option<EchoMessage>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(FrameError::Compressed);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = len as usize;
        if len > MAX_MESSAGE {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let msg = self.buf.split_to(len);
        prost::Message::decode(msg.freeze())
            .map(Some)
            .map_err(|e| FrameError::Decode(e.to_string()))
    }

    /// Checks that nothing is left over once the body ended.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

/// A body fed from a channel (the streaming reply).
pub(super) struct ChannelBody(pub(super) mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn trailers(status: &'static str, message: Option<String>, echo: Option<HeaderValue>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(m) = message.and_then(|m| HeaderValue::try_from(m).ok()) {
        t.insert("grpc-message", m);
    }
    if let Some(v) = echo {
        t.insert(TRAILER_HEADER, v);
    }
    t
}

fn reply(lines: &str, msg: &EchoMessage) -> Bytes {
    grpc_frame(&EchoMessage {
        message: format!("{lines}Echo={}\n", msg.message),
    })
}

/// Serves one gRPC call (`lines`: the request's `Key=Value` fields).
pub async fn serve(
    parts: &http::request::Parts,
    mut body: Incoming,
    lines: String,
    echo: Option<HeaderValue>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
    match parts.uri.path() {
        GRPC_ECHO_PATH => {
            let mut d = Decoder::default();
            let mut first = None;
            let mut failed = None;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => {
                        if let Some(data) = f.data_ref() {
                            d.push(data);
                        }
                    }
                    Err(e) => {
                        failed = Some(FrameError::Decode(e.to_string()));
                        break;
                    }
                }
                match d.next_message() {
                    Ok(Some(m)) if first.is_none() => first = Some(m),
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let t = match (failed, first) {
                (Some(e), _) => trailers(e.code(), Some(e.to_string()), echo),
                (None, Some(m)) => {
                    let _ = tx.try_send(Frame::data(reply(&lines, &m)));
                    trailers("0", None, echo)
                }
                (None, None) => trailers("3", Some("no EchoRequest in the call".into()), echo),
            };
            let _ = tx.try_send(Frame::trailers(t));
        }
        GRPC_STREAM_PATH => {
            tokio::spawn(async move {
                let mut d = Decoder::default();
                let end = loop {
                    let Some(f) = body.frame().await else {
                        break d.finish().err();
                    };
                    match f {
                        Ok(f) => {
                            if let Some(data) = f.data_ref() {
                                d.push(data);
                            }
                        }
                        Err(e) => break Some(FrameError::Decode(e.to_string())),
                    }
                    let mut failed = None;
                    loop {
                        match d.next_message() {
                            Ok(Some(m)) => {
                                if tx.send(Frame::data(reply(&lines, &m))).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if failed.is_some() {
                        break failed;
                    }
                };
                let t = match end {
                    Some(e) => trailers(e.code(), Some(e.to_string()), echo),
                    None => trailers("0", None, echo),
                };
                let _ = tx.send(Frame::trailers(t)).await;
            });
        }
        other => {
            let t = trailers(
                "12",
                Some(format!(
                    "{other} is not served: call {GRPC_ECHO_PATH} or {GRPC_STREAM_PATH}"
                )),
                echo,
            );
            let _ = tx.try_send(Frame::trailers(t));
        }
    }
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_splits_messages_across_pushes() {
        let a = grpc_frame(&EchoMessage {
            message: "one".into(),
        });
        let b = grpc_frame(&EchoMessage {
            message: "two".into(),
        });
        let all = [a.as_ref(), b.as_ref()].concat();
        let mut d = Decoder::default();
        d.push(&all[..3]);
        assert_eq!(d.next_message(), Ok(None));
        d.push(&all[3..a.len() + 2]);
        assert_eq!(d.next_message().unwrap().unwrap().message, "one");
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
        d.push(&all[a.len() + 2..]);
        assert_eq!(d.next_message().unwrap().unwrap().message, "two");
        assert_eq!(d.finish(), Ok(()));

        let mut d = Decoder::default();
        d.push(&[1, 0, 0, 0, 0]);
        assert_eq!(d.next_message(), Err(FrameError::Compressed));
        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0, 0, 0]);
        assert!(matches!(d.next_message(), Err(FrameError::TooLarge(_))));
    }
}
