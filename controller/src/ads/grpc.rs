//! The gRPC service of the ADS server ([`AdsService`]): requests are decoded by tonic, and the
//! responses are written as gRPC frames built from the cache's pre-encoded resources
//! ([`Reply`]), instead of tonic's per-message encoding (which would copy every resource
//! into a per-stream message, encode it again, and keep an encode buffer as big as the
//! largest response for the life of the stream).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::codec::Codec;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};
use xds_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::reply::Frames;
use super::{AdsServer, MAX_MESSAGE_SIZE, MAX_REQUEST_SIZE};
use super::{Held, Opened, PeerSlot, Queued};

/// Full gRPC name of the service.
const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
/// The gRPC path of `DeltaAggregatedResources`.
pub const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// The `AggregatedDiscoveryService` gRPC service of an [`AdsServer`] (delta only), ready for
/// `tonic::transport::Server::serve` or `tonic::service::Routes`.
#[derive(Clone, Debug)]
pub struct AdsService {
    server: AdsServer,
}

impl AdsService {
    pub(super) fn new(server: AdsServer) -> Self {
        Self { server }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

impl Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let server = self.server.clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            Ok(match path.as_str() {
                DELTA_PATH => match delta(server, req).await {
                    Ok(resp) => resp,
                    Err(status) => status.into_http(),
                },
                SOTW_PATH => Status::unimplemented(
                    "zmesh serves only delta xDS (DeltaAggregatedResources); \
                     state-of-the-world ADS is not supported",
                )
                .into_http(),
                other => Status::unimplemented(format!(
                    "{other} is not a method of the zmesh controller's {SERVICE}"
                ))
                .into_http(),
            })
        })
    }
}

/// Opens a delta stream: decodes the requests with tonic, writes the replies as gRPC frames.
async fn delta(
    server: AdsServer,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    if let Some(enc) = req.headers().get("grpc-encoding")
        && enc.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "request compression {enc:?} is not supported by the zmesh controller; send \
             uncompressed delta xDS requests"
        )));
    }
    let (parts, body) = req.into_parts();
    let mut codec =
        tonic_prost::ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default();
    let requests =
        tonic::Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST_SIZE));
    let request = tonic::Request::from_http(http::Request::from_parts(parts, requests));
    let opened = server.open(request).await?;
    let mut resp = http::Response::new(Body::new(StreamBody::new(frames(opened))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

struct BodyState {
    replies: mpsc::Receiver<Result<Queued, Status>>,
    /// The stream's place among its address's streams, given back when the body is dropped.
    _slot: Arc<PeerSlot>,
    current: Option<Frames>,
    /// The current reply's share of its stream's and its address's budget, given back once
    /// it is written.
    held: Held,
    done: bool,
}

/// The response body: each reply's frame in chunks, then the trailers (`grpc-status` of the
/// error that ended the stream, or OK when the server ended it).
fn frames(
    opened: Opened,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    let state = BodyState {
        replies: opened.replies,
        _slot: opened.slot,
        current: None,
        held: Held::default(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if let Some(chunk) = st.current.as_mut().and_then(Frames::next_chunk) {
                return Some((Ok(Frame::data(chunk)), st));
            }
            st.current = None;
            st.held = Held::default();
            let status = match st.replies.recv().await {
                Some(Ok(Queued { reply, held })) => {
                    let len = reply.encoded_len();
                    if len <= MAX_MESSAGE_SIZE {
                        st.current = Some(Frames::new(reply));
                        st.held = held;
                        continue;
                    }
                    Status::resource_exhausted(format!(
                        "a delta xDS response of {len} bytes exceeds the limit of \
                         {MAX_MESSAGE_SIZE}; subscribe to fewer resources"
                    ))
                }
                Some(Err(status)) => status,
                None => Status::new(Code::Ok, ""),
            };
            st.done = true;
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
            }
            return Some((Ok(Frame::trailers(trailers)), st));
        }
    })
}
