//! Real tonic gRPC services for the test app (generated code from `xds-proto`, no test
//! codegen): a bidirectional stream (delta ADS, each request echoed as a response) and a unary
//! call (CreateCertificate, the CSR echoed back).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use xds_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use xds_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct Echo;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Echo {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let out = req.into_inner().map(|r| {
            r.map(|r| DeltaDiscoveryResponse {
                type_url: r.type_url,
                nonce: format!("echo:{}", r.response_nonce),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Echo {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let csr = req.into_inner().csr;
        if csr == "fail" {
            return Err(Status::permission_denied("asked to fail"));
        }
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![csr],
            ..Default::default()
        }))
    }
}

/// The routes the app serves gRPC paths with.
pub fn routes() -> tonic::service::Routes {
    tonic::service::Routes::new(AggregatedDiscoveryServiceServer::new(Echo))
        .add_service(IstioCertificateServiceServer::new(Echo))
}
