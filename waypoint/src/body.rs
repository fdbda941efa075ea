//! Body wrappers: bodies are streamed frame by frame (never buffered whole), counted as they
//! pass, and the request is recorded when the response body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::telemetry::RequestRecord;
use crate::upstream::{H1Checkout, InFlight, Upstreams};

pin_project_lite::pin_project! {
    /// A body whose data bytes are added to a shared counter as they pass.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        bytes: Arc<AtomicU64>,
    }
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        CountedBody { inner, bytes }
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body sent upstream: the client's, streamed; or one kept whole so it can be sent
/// again (retries, mirrors).
pub enum ReqBody {
    Stream(Incoming),
    Kept {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

/// A request body read whole (at most [`KEEP_LIMIT`] bytes).
#[derive(Clone, Debug, Default)]
pub struct KeptBody {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// The largest request body kept for retries and mirrors: a body is kept only when it is
/// empty or declares its length (`content-length`) up to this; others are streamed once.
pub const KEEP_LIMIT: u64 = 64 << 10;

impl KeptBody {
    /// A fresh body with the kept bytes.
    pub fn body(&self) -> ReqBody {
        ReqBody::Kept {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
    }

    /// Reads `body` whole when its length is known to be at most [`KEEP_LIMIT`]; otherwise
    /// gives it back untouched ([`Keep::Streamed`]). A body that ends in an error (the client
    /// reset the stream or closed the connection mid-body) is [`Keep::Aborted`]: the request
    /// must fail, never go upstream (or be retried, or mirrored) with what arrived of it.
    pub async fn keep(body: Incoming) -> Keep {
        let small =
            body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= KEEP_LIMIT);
        if !small {
            return Keep::Streamed(body);
        }
        use http_body_util::BodyExt;
        match body.collect().await {
            Ok(c) => {
                let trailers = c.trailers().cloned();
                Keep::Whole(KeptBody {
                    data: c.to_bytes(),
                    trailers,
                })
            }
            Err(e) => Keep::Aborted(e),
        }
    }
}

/// What [`KeptBody::keep`] made of a request body.
#[derive(Debug)]
pub enum Keep {
    /// Read whole: it can be sent again.
    Whole(KeptBody),
    /// Too large or of unknown length: streamed once, untouched.
    Streamed(Incoming),
    /// The client went away before the body ended (the error hyper saw).
    Aborted(hyper::Error),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Kept { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Kept { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Kept { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// What a response body holds until it ends: the record, the endpoint's in-flight count and
/// the HTTP/1.1 connection to give back.
pub struct Finish {
    pub record: RequestRecord,
    pub in_flight: Option<InFlight>,
    pub h1: Option<(Arc<Upstreams>, H1Checkout)>,
}

/// Why a response body sent to the client ended in an error (hyper then resets the HTTP/2
/// stream or closes the HTTP/1.1 connection: the client sees an incomplete response).
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The upstream's body failed (reset, connection lost).
    #[error("upstream response body: {0}")]
    Upstream(#[from] hyper::Error),
    /// The route's timeout (`timeouts.request`, or `timeouts.backendRequest` of the attempt
    /// that answered) ran out before the response ended.
    #[error("response not complete within the route's timeout {0:?}")]
    Timeout(Duration),
}

/// The response body sent to the client: the upstream's (or none, for a local answer).
pub struct ResponseBody {
    inner: Option<Incoming>,
    finish: Option<Finish>,
    /// Ends the body with [`ResponseBodyError::Timeout`] when it fires: the route's timeouts
    /// cover the whole response (Gateway API `HTTPRouteTimeouts`), not only its head.
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl ResponseBody {
    /// The upstream's body, recorded when it ends; cut at `deadline` (the instant, and the
    /// timeout it comes from, for the record) when one applies.
    pub fn upstream(
        inner: Incoming,
        finish: Finish,
        deadline: Option<(Instant, Duration)>,
    ) -> Self {
        ResponseBody {
            inner: Some(inner),
            finish: Some(finish),
            deadline: deadline.map(|(at, d)| (Box::pin(tokio::time::sleep_until(at)), d)),
        }
    }

    /// An empty body (local answers; an upgrade, whose record ends with its connection); the
    /// record given, if any, is finished now.
    pub fn empty(finish: Option<Finish>) -> Self {
        if let Some(mut f) = finish {
            f.record.finish();
        }
        ResponseBody {
            inner: None,
            finish: None,
            deadline: None,
        }
    }

    fn end(&mut self, clean: bool) {
        if let Some(mut f) = self.finish.take() {
            f.record.finish();
            if clean && let Some((ups, c)) = f.h1.take() {
                ups.give_back(c);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(fin) = self.finish.as_mut() {
                    if let Some(d) = f.data_ref() {
                        fin.record.response_bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                    {
                        fin.record.labels.grpc_response_status = s.to_owned();
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(fin) = self.finish.as_mut() {
                    fin.record.error = Some(e.to_string());
                    fin.record.labels.traffic.response_flags = "UPE";
                }
                self.end(false);
            }
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {
                if let Some((sleep, d)) = self.deadline.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    let d = *d;
                    if let Some(fin) = self.finish.as_mut() {
                        fin.record.error =
                            Some(format!("response not complete within the timeout {d:?}"));
                        fin.record.labels.traffic.response_flags = "UT";
                    }
                    // The upstream's stream or connection is dropped with it (never reused).
                    self.inner = None;
                    self.deadline = None;
                    self.end(false);
                    return Poll::Ready(Some(Err(ResponseBodyError::Timeout(d))));
                }
            }
        }
        r.map_err(ResponseBodyError::Upstream)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (the connection is not reused),
        // unless nothing was left to read.
        let clean = self.inner.as_ref().is_some_and(|b| b.is_end_stream());
        self.end(clean);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::{Request, Response};
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::oneshot;

    use super::*;

    /// What `keep` makes of the body of one HTTP/1.1 request written raw, then the client's
    /// write side closed (half-close kept by the server, so the handler keeps running and
    /// sees the body's end or its error).
    async fn keep_of(raw: &str) -> Keep {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (tx, rx) = oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let svc = service_fn(move |req: Request<Incoming>| {
            let tx = tx.clone();
            async move {
                let k = KeptBody::keep(req.into_body()).await;
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(k);
                }
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(server), svc),
        );
        client.write_all(raw.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let k = rx.await.expect("the handler ran");
        drop(client);
        k
    }

    #[tokio::test]
    async fn keep_reads_whole_streams_large_and_fails_an_aborted_body() {
        let head =
            |len: usize| format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
        match keep_of(&format!("{}0123456789", head(10))).await {
            Keep::Whole(k) => assert_eq!(k.data, "0123456789"),
            other => panic!("{other:?}"),
        }
        match keep_of(&format!("{}0123456789", head(1000))).await {
            Keep::Aborted(_) => {}
            other => panic!("a body 990 bytes short was kept as {other:?}"),
        }
        match keep_of(&head(KEEP_LIMIT as usize + 1)).await {
            Keep::Streamed(_) => {}
            other => panic!("{other:?}"),
        }
    }
}
