//! The HTTP front end: accepts connections (HTTP/1.1 and h2c), routes requests, stamps
//! every response with `Fn-Call-Id`, and turns failures into JSON errors.
//!
//! Routes (DESIGN.md, fixed):
//! - `ANY /r/{app}/{route...}`: the function bound to that route;
//! - `POST /invoke/{app}/{function}`: a function by name;
//! - `GET /health`: 200 while serving, 503 while draining.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fn_lifecycle::Health;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::body::ResponseBody;
use crate::catalog::{CatalogHandle, Function};
use crate::client_io::{ClientIo, ClientLimits};
use crate::error::{CallError, json_error};
use crate::invoke::Invoker;
use crate::metrics::CallOutcome;

/// The call id header on every response.
pub const CALL_ID_HEADER: &str = "fn-call-id";

/// How long a client may take to send a request head (HTTP/1.1), and how long an idle
/// keep-alive connection stays open. Without it a client that trickles its head byte by
/// byte (slowloris), or opens connections and sends nothing, holds a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Routes requests to functions.
#[derive(Debug)]
pub struct Front {
    catalog: Arc<CatalogHandle>,
    invoker: Invoker,
    health: Health,
    /// Bounds of every client connection below HTTP.
    limits: ClientLimits,
}

enum Route {
    Health,
    Function(Arc<Function>),
}

impl Front {
    pub fn new(catalog: Arc<CatalogHandle>, invoker: Invoker, health: Health) -> Arc<Self> {
        Self::with_limits(catalog, invoker, health, ClientLimits::default())
    }

    /// Like [`Front::new`], with the client connection bounds given.
    pub fn with_limits(
        catalog: Arc<CatalogHandle>,
        invoker: Invoker,
        health: Health,
        limits: ClientLimits,
    ) -> Arc<Self> {
        Arc::new(Front {
            catalog,
            invoker,
            health,
            limits,
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
            let io = TokioIo::new(ClientIo::new(stream, self.limits.clone()));
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
