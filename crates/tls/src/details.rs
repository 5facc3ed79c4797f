//! [`WithoutStatusDetails`]: a gRPC client channel that removes `grpc-status-details-bin`
//! from what the server sends.
//!
//! tonic's generated clients read a call's status with `Status::from_header_map`, which
//! panics (`expect`) when that header is not valid base64: one bad header from a peer (or
//! from a proxy between) killed the task that made the call. For the lb-agent that was its
//! probe of a runner marked down (the runner then stayed a placeholder until the LB
//! restarted) or its report watch. Nothing in the dataplane reads the details, so they go,
//! valid or not, from the response head (a trailers-only answer) and from the trailers.
//! The Engage stream does not need this: its own framing reads the status without them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderName;
use hyper::body::{Body, Frame, SizeHint};
use tonic::codegen::Service;

const DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// A client channel `S` whose responses carry no `grpc-status-details-bin`; see the module
/// docs. Wrap the channel a tonic generated client is built on.
#[derive(Debug, Clone)]
pub struct WithoutStatusDetails<S>(pub S);

impl<S, Req, B> Service<http::Request<Req>> for WithoutStatusDetails<S>
where
    S: Service<http::Request<Req>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<StrippedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Req>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            response.headers_mut().remove(DETAILS);
            Ok(response.map(StrippedBody))
        })
    }
}

/// A response body whose trailers carry no `grpc-status-details-bin`.
#[derive(Debug)]
pub struct StrippedBody<B>(B);

impl<B> Body for StrippedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.0).poll_frame(cx);
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        trailers.remove(DETAILS);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
