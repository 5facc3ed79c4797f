//! The HTTP front end: accepts connections (HTTP/1.1 and h2c), routes requests, stamps
//! every response with `Fn-Call-Id`, and turns failures into JSON errors.
//!
//! Routes (DESIGN.md, fixed):
//! - `ANY /r/{app}/{route...}`: the function bound to that route;
//! - `POST /invoke/{app}/{function}`: a function by name;
//! - `GET /health`: 200 while serving, 503 while draining.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fn_lifecycle::Health;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::catalog::{CatalogHandle, Function};
use crate::error::{CallError, json_error};
use crate::invoke::Invoker;
use crate::metrics::CallOutcome;

/// Error type of response bodies: a body that fails is cut off.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body.
pub type ResponseBody = UnsyncBoxBody<Bytes, BodyError>;

/// The call id header on every response.
pub const CALL_ID_HEADER: &str = "fn-call-id";

/// How long a client may take to send a request head (HTTP/1.1), and how long an idle
/// keep-alive connection stays open. Without it a client that trickles its head byte by
/// byte (slowloris), or opens connections and sends nothing, holds a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to a client may make no progress before the connection is closed (as
/// nginx's `send_timeout`). A client that stops reading its answer is cut off, which drops
/// the call's response body and cancels the call on the runner.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Routes requests to functions.
#[derive(Debug)]
pub struct Front {
    catalog: Arc<CatalogHandle>,
    invoker: Invoker,
    health: Health,
}

enum Route {
    Health,
    Function(Arc<Function>),
}

impl Front {
    pub fn new(catalog: Arc<CatalogHandle>, invoker: Invoker, health: Health) -> Arc<Self> {
        Arc::new(Front {
            catalog,
            invoker,
            health,
        })
    }

    /// Answers one request. Never fails: errors become JSON responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let call_id = uuid::Uuid::new_v4().to_string();
        let mut response = match self.route(&req) {
            Ok(Route::Health) if self.health.is_serving() => plain(StatusCode::OK, "ok\n"),
            Ok(Route::Health) => json_error(StatusCode::SERVICE_UNAVAILABLE, "draining"),
            Ok(Route::Function(_)) if !self.health.is_serving() => {
                self.invoker.metrics().refused(CallOutcome::ShuttingDown);
                CallError::ShuttingDown.to_response()
            }
            Ok(Route::Function(function)) => {
                let span = tracing::info_span!(
                    "call",
                    call_id = %call_id,
                    app = %function.app,
                    function = %function.name,
                    lb_group = %function.lb_group,
                );
                let started = std::time::Instant::now();
                let result = self
                    .invoker
                    .invoke(function, call_id.clone(), req)
                    .instrument(span.clone())
                    .await;
                let _entered = span.enter();
                match result {
                    Ok(response) => {
                        tracing::debug!(
                            status = response.status().as_u16(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "call answered"
                        );
                        response
                    }
                    Err(e) => {
                        tracing::info!(status = e.status().as_u16(), error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "call failed");
                        e.to_response()
                    }
                }
            }
            Err(e) => {
                self.invoker.metrics().refused(CallOutcome::from(&e));
                e.to_response()
            }
        };
        if let Ok(value) = HeaderValue::from_str(&call_id) {
            response.headers_mut().insert(CALL_ID_HEADER, value);
        }
        response
    }

    fn route<B>(&self, req: &Request<B>) -> Result<Route, CallError> {
        let path = req.uri().path();
        if path == "/health" {
            return match *req.method() {
                Method::GET | Method::HEAD => Ok(Route::Health),
                _ => Err(CallError::MethodNotAllowed {
                    method: req.method().to_string(),
                    path: path.to_owned(),
                    allow: "GET",
                }),
            };
        }
        let not_found = || CallError::NotFound(path.to_owned());
        if let Some(rest) = path.strip_prefix("/r/") {
            let (app, route) = rest.split_once('/').ok_or_else(not_found)?;
            let route = format!("/{route}");
            return self
                .catalog
                .current()
                .by_route(app, &route)
                .map(Route::Function)
                .ok_or_else(not_found);
        }
        if let Some(rest) = path.strip_prefix("/invoke/") {
            let (app, name) = rest.split_once('/').ok_or_else(not_found)?;
            let function = self
                .catalog
                .current()
                .by_name(app, name)
                .ok_or_else(not_found)?;
            if req.method() != Method::POST {
                return Err(CallError::MethodNotAllowed {
                    method: req.method().to_string(),
                    path: path.to_owned(),
                    allow: "POST",
                });
            }
            return Ok(Route::Function(function));
        }
        Err(not_found())
    }

    /// Serves connections from `listener` until `cancel`, then stops accepting and waits
    /// for open connections to finish their requests.
    ///
    /// # Errors
    /// Never: accept errors are logged and retried.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> Result<(), Infallible> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let front = Arc::clone(&self);
            let service = service_fn(move |req: Request<Incoming>| {
                let front = Arc::clone(&front);
                async move { Ok::<_, Infallible>(front.handle(req).await) }
            });
            let io = TokioIo::new(WriteStallTimeout::new(stream, SEND_TIMEOUT));
            let conn = builder.serve_connection_with_upgrades(io, service);
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        tracing::info!("HTTP front stopped accepting; waiting for open requests");
        graceful.shutdown().await;
        Ok(())
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

/// A client connection whose writes fail with `TimedOut` once one has been pending for
/// `limit` without progress. The timer is armed only while a write is blocked.
struct WriteStallTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStallTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteStallTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes a write's result through, turning a stall past the limit into an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStallTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStallTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_the_limit_fails() {
        let (client, _server) = tokio::io::duplex(8);
        let mut guarded = WriteStallTimeout::new(client, Duration::from_secs(30));
        guarded.write_all(b"12345678").await.expect("fits the pipe");
        // Nobody reads: the next write waits, then fails 30 s later.
        let started = tokio::time::Instant::now();
        let err = guarded.write_all(b"more").await.expect_err("stalls");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (client, mut server) = tokio::io::duplex(8);
        let mut guarded = WriteStallTimeout::new(client, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            while got.len() < 40 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let n = server.read(&mut buf).await.expect("reads");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let started = tokio::time::Instant::now();
        guarded
            .write_all(&[7u8; 40])
            .await
            .expect("progress every 20 s is enough");
        assert!(
            started.elapsed() >= Duration::from_secs(60),
            "it did wait for the reader"
        );
        assert_eq!(reader.await.expect("reader"), vec![7u8; 40]);
    }
}
