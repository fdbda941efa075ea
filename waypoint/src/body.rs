//! Body wrappers: bodies are streamed frame by frame (never buffered whole), counted as they
//! pass, and the request is recorded when the response body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

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
    /// gives it back untouched.
    pub async fn keep(body: Incoming) -> Result<KeptBody, Incoming> {
        let small =
            body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= KEEP_LIMIT);
        if !small {
            return Err(body);
        }
        use http_body_util::BodyExt;
        match body.collect().await {
            Ok(c) => {
                let trailers = c.trailers().cloned();
                Ok(KeptBody {
                    data: c.to_bytes(),
                    trailers,
                })
            }
            // The client went away mid-body: what is kept is empty (the attempt fails upstream).
            Err(e) => {
                tracing::debug!(error = %e, "request body ended early");
                Ok(KeptBody::default())
            }
        }
    }
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

/// The response body sent to the client: the upstream's (or none, for a local answer).
pub struct ResponseBody {
    inner: Option<Incoming>,
    finish: Option<Finish>,
    /// A local answer's text, sent once.
    text: Option<Bytes>,
}

impl ResponseBody {
    /// The upstream's body, recorded when it ends.
    pub fn upstream(inner: Incoming, finish: Finish) -> Self {
        ResponseBody {
            inner: Some(inner),
            finish: Some(finish),
            text: None,
        }
    }

    /// A local answer with a text body; `record` counts it and is finished now.
    pub fn text(text: Bytes, mut record: RequestRecord) -> Self {
        record.response_bytes += text.len() as u64;
        record.finish();
        ResponseBody {
            inner: None,
            finish: None,
            text: Some(text),
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
            text: None,
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(t) = self.text.take() {
            return Poll::Ready(Some(Ok(Frame::data(t))));
        }
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
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.text.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(t) = &self.text {
            return SizeHint::with_exact(t.len() as u64);
        }
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
