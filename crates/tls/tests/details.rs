//! A peer's invalid `grpc-status-details-bin` (not base64) makes tonic's generated clients
//! panic; through [`WithoutStatusDetails`] the call fails with the peer's status instead,
//! whether the status comes in the response head (trailers only) or in the trailers.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
mod common;

use fn_tls::WithoutStatusDetails;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A health service that fails every check with status 13 and details that are not base64:
/// in the head, or (`in_trailers`) in trailers after an empty body.
#[derive(Clone)]
struct BadDetails {
    in_trailers: bool,
}

impl tonic::server::NamedService for BadDetails {
    const NAME: &'static str = "grpc.health.v1.Health";
}

fn status_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-status", http::HeaderValue::from_static("13"));
    headers.insert("grpc-message", http::HeaderValue::from_static("broken"));
    headers.insert(
        "grpc-status-details-bin",
        http::HeaderValue::from_static("!!not base64!!"),
    );
    headers
}

impl Service<http::Request<Body>> for BadDetails {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
        let in_trailers = self.in_trailers;
        Box::pin(async move {
            let mut response = if in_trailers {
                let trailers = Frame::<Bytes>::trailers(status_headers());
                http::Response::new(Body::new(StreamBody::new(futures::stream::iter([Ok::<
                    _,
                    tonic::Status,
                >(
                    trailers,
                )]))))
            } else {
                let mut response = http::Response::new(Body::empty());
                response.headers_mut().extend(status_headers());
                response
            };
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(response)
        })
    }
}

async fn check(in_trailers: bool) -> tonic::Status {
    let channel = common::direct_to(|server| server.add_service(BadDetails { in_trailers })).await;
    let origin = channel.origin();
    let mut client = HealthClient::with_origin(WithoutStatusDetails(channel), origin);
    // In a task of its own, as the LB's probe is: a panic shows as a join error.
    let call = tokio::spawn(async move {
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("an answer within the bound")
        .expect("the call does not panic")
        .expect_err("the check fails")
}

#[tokio::test]
async fn invalid_details_in_a_trailers_only_answer_are_a_failed_call_not_a_panic() {
    let status = check(false).await;
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert_eq!(status.message(), "broken");
}

#[tokio::test]
async fn invalid_details_in_trailers_are_a_failed_call_not_a_panic() {
    let status = check(true).await;
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert_eq!(status.message(), "broken");
}
