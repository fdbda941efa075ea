//! Serving HTTP on an accepted connection with the listener's limits: the first bytes under
//! the handshake deadline, requests (HTTP/1) and streams (HTTP/2) in flight counted, and a
//! connection with nothing in flight for the idle timeout closed (HTTP/2: a graceful GOAWAY).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{Limits, ServeError, preface::read_h2_start};

/// Counts the requests or streams in flight on one connection, and tells when it has had none
/// for a while. Cheap to clone (one per connection, shared with its requests).
#[derive(Clone, Debug)]
pub struct Activity(Arc<ActivityInner>);

#[derive(Debug)]
struct ActivityInner {
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection began), ms since `epoch`.
    last: AtomicU64,
    epoch: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A connection with nothing in flight yet, idle from now.
    pub fn new() -> Activity {
        Activity(Arc::new(ActivityInner {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }))
    }

    /// Marks a request or stream in flight until the guard is dropped.
    pub fn begin(&self) -> ActiveGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    /// Requests or streams in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    fn idle_for(&self) -> Duration {
        let now = self.0.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.0.last.load(Ordering::Acquire)))
    }

    /// Resolves once nothing has been in flight for `timeout`; never when `timeout` is zero.
    pub async fn idle(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            if self.in_flight() > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }
}

/// A request or stream in flight (see [`Activity::begin`]).
#[derive(Debug)]
pub struct ActiveGuard(Activity);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let inner = &self.0.0;
        inner
            .last
            .store(inner.epoch.elapsed().as_millis() as u64, Ordering::Release);
        inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it has been sent (a
    /// streaming gRPC response, like an ADS stream, for as long as the stream lives).
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<ActiveGuard>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.guard.take();
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

/// A hyper service whose requests are counted in `activity` until their response body ends.
#[derive(Clone, Debug)]
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    /// Wraps `inner`, counting its requests in `activity`.
    pub fn new(inner: S, activity: Activity) -> Self {
        Tracked { inner, activity }
    }
}

pin_project_lite::pin_project! {
    /// [`Tracked`]'s response future: the inner service's future, unboxed and not moved into
    /// an `async` block (which would hold it twice: a proxy's request future is kilobytes, and
    /// every byte of it is copied when the future moves).
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<ActiveGuard>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|inner| TrackedBody { inner, guard })))
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    B: Body,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        TrackedFuture {
            guard: Some(self.activity.begin()),
            inner: self.inner.call(req),
        }
    }
}

/// Serves HTTP/1.1 on `io`: the request head must arrive within the handshake timeout, and
/// the connection is closed once no request has been in flight for the idle timeout, or when
/// `stop` is cancelled (after the request in flight).
pub async fn serve_http1<I, S, B>(
    io: I,
    svc: S,
    limits: &Limits,
    stop: &CancellationToken,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Activity::new();
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Every request head, the first one included, within the deadline.
        .header_read_timeout(limits.handshake_timeout)
        .serve_connection(TokioIo::new(io), Tracked::new(svc, activity.clone()));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(ServeError::Http),
        _ = stop.cancelled() => {}
        _ = activity.idle(limits.idle_timeout) => {}
    }
    conn.as_mut().graceful_shutdown();
    bounded(conn, limits.handshake_timeout).await
}

/// Serves HTTP/2 on `io` with `builder`: the client preface and SETTINGS must arrive by
/// `deadline`; streams are counted in `activity` (a handler may hold [`Activity::begin`]
/// longer, as an HBONE tunnel does); once none has been in flight for the idle timeout, or when
/// `stop` is cancelled, the connection is shut down gracefully (GOAWAY, open streams finish).
pub async fn serve_h2<I, S, B>(
    io: I,
    builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
    svc: S,
    activity: Activity,
    limits: &Limits,
    deadline: tokio::time::Instant,
    stop: &CancellationToken,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = h2_start(io, limits, deadline).await?;
    let conn = builder.serve_connection(TokioIo::new(io), Tracked::new(svc, activity.clone()));
    tokio::pin!(conn);
    let idle = tokio::select! {
        r = conn.as_mut() => return r.map_err(ServeError::Http),
        _ = stop.cancelled() => false,
        _ = activity.idle(limits.idle_timeout) => true,
    };
    conn.as_mut().graceful_shutdown();
    if idle {
        // Nothing in flight: the GOAWAY exchange is all that is left.
        tracing::debug!(idle = ?limits.idle_timeout, "closing an idle HTTP/2 connection");
        return bounded(conn, goaway_grace(limits)).await;
    }
    conn.await.map_err(ServeError::Http)
}

/// Reads an HTTP/2 connection's preface and first SETTINGS by `deadline` (both HTTP/2 servers).
pub(super) async fn h2_start<I: AsyncRead + Unpin>(
    io: I,
    limits: &Limits,
    deadline: tokio::time::Instant,
) -> Result<super::Prefixed<I>, ServeError> {
    match tokio::time::timeout_at(deadline, read_h2_start(io)).await {
        Ok(Ok(io)) => Ok(io),
        Ok(Err(e)) => Err(ServeError::Preface(e)),
        Err(_) => Err(ServeError::FirstBytesTimeout(limits.handshake_timeout)),
    }
}

/// How long an idle connection's GOAWAY exchange may take before the connection is dropped.
pub(super) fn goaway_grace(limits: &Limits) -> Duration {
    limits.handshake_timeout.max(Duration::from_secs(1))
}

/// Waits for a connection shutting down, at most `limit`.
async fn bounded<F>(conn: Pin<&mut F>, limit: Duration) -> Result<(), ServeError>
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    match tokio::time::timeout(limit, conn).await {
        Ok(r) => r.map_err(ServeError::Http),
        Err(_) => Ok(()),
    }
}
