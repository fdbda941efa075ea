//! One HTTP/1.1 `GET` to a pod's port through the API server's port-forward (WebSocket,
//! kube-rs `Api::<Pod>::portforward`), as `istioctl ztunnel-config` reaches ztunnel's admin
//! port (localhost-only inside the pod) and `istioctl` reaches istiod's debug port.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;

use crate::error::Error;

/// How long one forwarded request may take, connect included.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// `GET path` on `port` of the pod `namespace/pod`; the status and the body. A forward the
/// API server or the kubelet refuses (pod gone, port closed) is an [`Error::Forward`].
pub async fn get(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<(StatusCode, Bytes), Error> {
    let what = format!("{namespace}/{pod} port {port}");
    let fail = |reason: String| Error::Forward {
        target: what.clone(),
        reason,
    };
    let run = async {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let mut pf = api
            .portforward(pod, &[port])
            .await
            .map_err(|e| fail(e.to_string()))?;
        let stream = pf
            .take_stream(port)
            .ok_or_else(|| fail("no stream for the port".into()))?;
        let port_error = pf
            .take_error(port)
            .ok_or_else(|| fail("no error channel for the port".into()))?;
        let request = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, "localhost")
                .body(Empty::<Bytes>::new())
                .map_err(|e| fail(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            Ok::<_, Error>((status, body))
        };
        tokio::pin!(request);
        // A message on the error channel (connect refused...) ends the port: report it rather
        // than the request's broken pipe.
        let out = tokio::select! {
            r = &mut request => r,
            Some(message) = port_error => Err(fail(message)),
        };
        pf.abort();
        out
    };
    match tokio::time::timeout(TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!("no answer within {}s", TIMEOUT.as_secs()))),
    }
}

/// [`get`] a JSON document (a non-200 answer is an error with its body).
pub async fn get_json(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    path: &str,
) -> Result<serde_json::Value, Error> {
    let (status, body) = get(client, namespace, pod, port, path).await?;
    let target = format!("{namespace}/{pod} port {port}");
    if status != StatusCode::OK {
        return Err(Error::Forward {
            target,
            reason: format!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        });
    }
    serde_json::from_slice(&body).map_err(|e| Error::Forward {
        target,
        reason: format!("GET {path}: the answer is not JSON: {e}"),
    })
}
