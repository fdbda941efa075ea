//! The echo app's WebSocket (RFC 6455), as Istio's echo server has one on its HTTP ports: a
//! request with `Upgrade: websocket` is answered `101 Switching Protocols`, then every text or
//! binary message is sent back as it came, until the client closes.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::Body;

/// Whether the request asks for a WebSocket.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers the upgrade and echoes messages on the upgraded connection.
pub fn upgrade(req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(
            Full::new(Bytes::from_static(
                b"a WebSocket upgrade needs a Sec-WebSocket-Key header\n",
            ))
            .boxed(),
        );
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgraded = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(io) = upgraded.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            // Pings are answered by the protocol layer; data messages go back as they came.
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
        let _ = ws.close(None).await;
    });
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::try_from(accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
