//! gRPC end to end with tonic on both sides (a tonic client over an HBONE tunnel to the
//! waypoint, a tonic server behind it): unary, bidirectional streaming, and an error status
//! in trailers, on the port declared GRPC and on the sniffed one.

use tonic::transport::Endpoint;
use xds_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_proto::istio::v1::auth::IstioCertificateRequest;
use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_waypoint::upstream::LbPolicy;

use crate::harness::*;

#[tokio::test]
async fn tonic_client_and_server_through_the_waypoint() {
    let mesh = std::sync::Arc::new(Mesh::new(&["echo-a"], &[]).await);
    let wp = mesh.waypoint(LbPolicy::RoundRobin).await;
    for port in [81, 82] {
        // Each connection tonic opens is a new tunnel to VIP:port through the waypoint.
        let m = mesh.clone();
        let hbone = wp.hbone_addr;
        let channel = Endpoint::from_shared(format!("http://{HOST}"))
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let m = m.clone();
                async move {
                    m.tunnel(hbone, port)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                        .map_err(std::io::Error::other)
                }
            }))
            .await
            .unwrap();
        let mut ca = IstioCertificateServiceClient::new(channel.clone());
        let answer = ca
            .create_certificate(IstioCertificateRequest {
                csr: "csr-pem".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.cert_chain, ["csr-pem"], "port {port}");
        let err = ca
            .create_certificate(IstioCertificateRequest {
                csr: "fail".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "port {port}");
        assert_eq!(err.message(), "asked to fail");

        // Bidirectional: each response arrives before the next request is sent.
        let mut ads = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(1);
        let out =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut inbound = ads
            .delta_aggregated_resources(out)
            .await
            .unwrap()
            .into_inner();
        for i in 0..5 {
            tx.send(DeltaDiscoveryRequest {
                response_nonce: format!("n{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
            let r = inbound.message().await.unwrap().expect("a response");
            assert_eq!(r.nonce, format!("echo:n{i}"));
        }
        drop(tx);
        // The server's OK status comes in the trailers after the last message.
        assert!(inbound.message().await.unwrap().is_none());
    }
    eventually("the calls counted with their gRPC status", async || {
        let m = admin_get(wp.admin_addr, "/metrics").await.1;
        requests_total(
            &m,
            &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""],
        ) == 4
            && requests_total(
                &m,
                &["request_protocol=\"grpc\"", "grpc_response_status=\"7\""],
            ) == 2
    })
    .await;
}
