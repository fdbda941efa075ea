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
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
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
/// again (retries, mirrors); or the client's streamed while mirrors get a copy of each frame
/// (a body that could not be kept: too large or of unknown length, as a gRPC call's).
pub enum ReqBody {
    Stream(Incoming),
    Kept {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// The client's body; each frame also goes to every copy. A copy that falls
    /// [`TEE_FRAMES`] frames behind (a slow mirror) has its mirror aborted (a mirror never
    /// slows the original, and never sends a truncated body as if it were whole); so does
    /// every copy when the client's body fails.
    Tee {
        inner: Incoming,
        copies: Copies,
    },
    /// A mirror's copy of a [`ReqBody::Tee`], ended when the original ends.
    Copy(mpsc::Receiver<Frame<Bytes>>),
}

/// How many frames a mirror's copy may lag behind the original before it is given up.
pub const TEE_FRAMES: usize = 64;

/// The mirrors' copies of a [`ReqBody::Tee`]: each a channel to the mirror's body and the
/// mirror's task. Dropped before the original body ended (the attempt failed, the client went
/// away), the mirrors still running are aborted: a copy is sent whole or not at all.
#[derive(Default)]
pub struct Copies(pub Vec<(mpsc::Sender<Frame<Bytes>>, AbortHandle)>);

impl Drop for Copies {
    fn drop(&mut self) {
        for (_, abort) in self.0.drain(..) {
            abort.abort();
        }
    }
}

/// A copy of a data or trailers frame.
fn copy_frame(f: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    f.data_ref()
        .map(|d| Frame::data(d.clone()))
        .or_else(|| f.trailers_ref().map(|t| Frame::trailers(t.clone())))
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
            ReqBody::Tee { inner, copies } => {
                let r = Pin::new(inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => copies.0.retain(|(tx, abort)| {
                        let Some(c) = copy_frame(f) else {
                            return true;
                        };
                        match tx.try_send(c) {
                            Ok(()) => true,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                abort.abort();
                                false
                            }
                            // The mirror is done (it failed or answered early).
                            Err(mpsc::error::TrySendError::Closed(_)) => false,
                        }
                    }),
                    Poll::Ready(Some(Err(_))) => {
                        for (_, abort) in copies.0.drain(..) {
                            abort.abort();
                        }
                    }
                    // The end: dropping the senders (not aborting) ends the copies whole.
                    Poll::Ready(None) => copies.0.clear(),
                    Poll::Pending => {}
                }
                r
            }
            ReqBody::Copy(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
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
            ReqBody::Stream(b) | ReqBody::Tee { inner: b, .. } => b.is_end_stream(),
            ReqBody::Copy(_) => false,
            ReqBody::Kept { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) | ReqBody::Tee { inner: b, .. } => b.size_hint(),
            ReqBody::Copy(_) => SizeHint::default(),
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
    /// A local answer's text, sent once.
    text: Option<Bytes>,
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
            text: None,
            finish: Some(finish),
            deadline: deadline.map(|(at, d)| (Box::pin(tokio::time::sleep_until(at)), d)),
        }
    }

    /// A local answer's fixed text (e.g. `RBAC: access denied`); recorded when sent.
    pub fn text(text: &'static str, finish: Finish) -> Self {
        ResponseBody {
            inner: None,
            text: Some(Bytes::from_static(text.as_bytes())),
            finish: Some(finish),
            deadline: None,
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
            text: None,
            finish: None,
            deadline: None,
        }
    }

    fn end(&mut self, clean: bool) {
        if let Some(f) = self.finish.take() {
            f.record.finish_after_writes();
            if clean && let Some((ups, c)) = f.h1 {
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
            if let Some(t) = self.text.take() {
                if let Some(fin) = self.finish.as_mut() {
                    fin.record.response_bytes += t.len() as u64;
                }
                return Poll::Ready(Some(Ok(Frame::data(t))));
            }
            self.end(true);
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(fin) = self.finish.as_mut() {
                    if let Some(d) = f.data_ref() {
                        fin.record.response_bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t
                            .get("grpc-status")
                            .and_then(crate::telemetry::grpc_status_label)
                    {
                        fin.record.labels.grpc_response_status = s;
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
        self.text.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(
            || SizeHint::with_exact(self.text.as_ref().map_or(0, |t| t.len() as u64)),
            |b| b.size_hint(),
        )
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

    /// A teed body dropped before its end aborts the mirrors still sending (a copy is never
    /// ended early as if it were whole); its copy ends only when the senders go.
    #[tokio::test]
    async fn copies_dropped_early_abort_their_mirrors() {
        let (tx, rx) = mpsc::channel(TEE_FRAMES);
        let mirror = tokio::spawn(async move {
            use http_body_util::BodyExt;
            ReqBody::Copy(rx).collect().await.map(|c| c.to_bytes())
        });
        tx.send(Frame::data(Bytes::from_static(b"half")))
            .await
            .unwrap();
        drop(Copies(vec![(tx, mirror.abort_handle())]));
        assert!(mirror.await.unwrap_err().is_cancelled());

        let (tx, rx) = mpsc::channel(TEE_FRAMES);
        let mirror = tokio::spawn(async move {
            use http_body_util::BodyExt;
            ReqBody::Copy(rx).collect().await.map(|c| c.to_bytes())
        });
        let mut copies = Copies(vec![(tx.clone(), mirror.abort_handle())]);
        tx.send(Frame::data(Bytes::from_static(b"whole")))
            .await
            .unwrap();
        drop(tx);
        // The original's end: the senders dropped, not aborted.
        copies.0.clear();
        drop(copies);
        assert_eq!(mirror.await.unwrap().unwrap(), Bytes::from_static(b"whole"));
    }

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

    /// A response body's end records its request only once the tasks its last bytes woke
    /// (the writers of the HBONE stream and of the socket) have run: not before this task
    /// yields.
    #[tokio::test]
    async fn a_bodys_end_records_its_request_after_this_task_yields() {
        use http_body_util::BodyExt;
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(crate::telemetry::Metrics::new(&mut reg));
        let src = "10.0.0.1:1".parse().unwrap();
        let record = RequestRecord::new(metrics, Default::default(), src, "GET", "/", "echo");
        let finish = Finish {
            record,
            in_flight: None,
            h1: None,
        };
        let body = ResponseBody::text("ok", finish).collect().await.unwrap();
        assert_eq!(&body.to_bytes()[..], b"ok");
        use crate::telemetry::{counted, counted_after_yields};
        assert_eq!(counted(&reg), 0, "recorded before the task yielded");
        assert_eq!(counted_after_yields(&reg, 1).await, 1);
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
