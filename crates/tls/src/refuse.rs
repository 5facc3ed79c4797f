//! [`RefuseRetired`]: a server takes no new call on a connection it accepted once that
//! connection is retired, its client's certificate no longer trusted
//! ([`NodeTls::recheck_connections`](crate::NodeTls::recheck_connections)).
//!
//! Retiring a connection lets the calls on it finish within the grace; without this layer
//! the client could also start new calls on it for the whole grace (10 minutes by default),
//! though its CA had been withdrawn. tonic serves each connection in a task of its own and
//! gives no handle to it, so the server cannot send HTTP/2's GOAWAY on one connection;
//! instead each new call on a retired connection is answered at once with `UNAVAILABLE`,
//! before any service sees it. Calls already on the connection (a stream started before)
//! go on; the socket is shut down when the grace ends, as before.

use std::task::{Context, Poll};

use futures::future::Either;
use tonic::Status;
use tonic::codegen::Service;

use crate::transport::GrpcConnectInfo;

/// What [`crate::grpc_server`] puts in front of every service; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseRetiredLayer;

impl<S> tower_layer::Layer<S> for RefuseRetiredLayer {
    type Service = RefuseRetired<S>;

    fn layer(&self, inner: S) -> RefuseRetired<S> {
        RefuseRetired { inner }
    }
}

/// A server's services behind [`RefuseRetiredLayer`].
#[derive(Debug, Clone)]
pub struct RefuseRetired<S> {
    inner: S,
}

/// What a new call on a retired connection is answered.
pub(crate) fn refusal() -> Status {
    Status::unavailable(
        "this server no longer trusts the certificate this connection was opened with (its CA \
         left FN_NODE_CERT_AUTHORITY, or it expired): the connection takes no new calls and \
         closes when FN_TLS_RETIRE_GRACE ends; connect again with a certificate the server's \
         CA bundle trusts",
    )
}

impl<S, B, R> Service<http::Request<B>> for RefuseRetired<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<R>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let retired = request
            .extensions()
            .get::<GrpcConnectInfo>()
            .is_some_and(GrpcConnectInfo::is_retired);
        if retired {
            tracing::debug!(
                path = request.uri().path(),
                "a new call on a retired gRPC connection refused"
            );
            return Either::Right(std::future::ready(Ok(refusal().into_http())));
        }
        Either::Left(self.inner.call(request))
    }
}
