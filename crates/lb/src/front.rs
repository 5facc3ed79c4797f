//! The HTTP front end: accepts connections (HTTP/1.1 and h2c), routes requests, stamps
//! every response with `Fn-Call-Id`, and turns failures into JSON errors.
//!
//! Routes (DESIGN.md, fixed):
//! - `ANY /r/{app}/{route...}`: the function bound to that route;
//! - `POST /invoke/{app}/{function}`: a function by name;
//! - `GET /health`: 200 while serving, 503 while draining;
//! - `OPTIONS *`: 200 with `Allow`, a question about the server (RFC 9110, 9.3.7), answered
//!   as Go's `net/http` server answers it; `*` with any other method is a 400.
//!
//! Shutdown comes in two steps. First health goes NOT_SERVING (`GET /health` answers 503)
//! while calls are still taken, for `FN_DRAIN_DELAY`, so that an upstream balancer notices
//! before the listener goes away. Then [`Front::serve`] is cancelled: it stops accepting,
//! refuses new requests on open connections with 503, and waits for the calls in flight.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fn_lifecycle::Health;
use fn_lifecycle::logging::Throttle;
use fn_lifecycle::shards::Shards;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::body::BodyError;
use crate::body::ResponseBody;
use crate::catalog::{CatalogHandle, Function};
use crate::client_io::{ClientIo, ClientLimits, stream_send_timeout};
use crate::connections::{Busy, Connections};
use crate::error::{CallError, json_error};
use crate::failure_log::FailureLog;
use crate::invoke::Invoker;
use crate::leftover;
use crate::metrics::CallOutcome;

/// The call id header on every response.
pub const CALL_ID_HEADER: HeaderName = HeaderName::from_static("fn-call-id");

/// The methods a route (`/r/...`) takes, for an `Allow`: RFC 9110's and PATCH (RFC 5789),
/// all but CONNECT. Any other (extension) method goes to the function as well; an `Allow`
/// cannot list every token.
pub const ROUTE_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// How long a client may take to send a request head (HTTP/1.1), and how long an idle
/// keep-alive connection stays open. Without it a client that trickles its head byte by
/// byte (slowloris), or opens connections and sends nothing, holds a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes read ahead from one client connection (hyper's read buffer grows to this).
/// Request bodies leave in chunks of at most this size, and each chunk is held until the
/// runner's stream takes it: hyper's default (about 400 KiB) cost the LB 40% more memory
/// under 0-1 MiB bodies at 64 connections, for no throughput. It also bounds a request
/// head: 128 KiB leaves room for a URI just over hyper's 64 KiB limit to get its 414
/// rather than a 431.
const CLIENT_READ_BUFFER: usize = 128 * 1024;

/// Most bytes of an HTTP/2 request's header list (as HTTP/2 counts it: each field's name
/// and value and 32 more), advertised in the connection's SETTINGS: the head HTTP/1.1 takes
/// ([`CLIENT_READ_BUFFER`]). Up to [`CLIENT_MAX_STREAMS`] such heads can be held at once per
/// connection, half of what its window lets its bodies hold.
#[allow(clippy::cast_possible_truncation)]
const CLIENT_HEAD_LIMIT: u32 = CLIENT_READ_BUFFER as u32;

/// HTTP/2 flow-control window of one client stream (one call's request body): what a call
/// whose body is not being read (placement still waiting, a function that ignores its
/// input) holds at the LB. A quarter of hyper's default, so that a connection's worth
/// ([`CLIENT_CONNECTION_WINDOW`]) stays small; an HTTP/1.1 connection holds at most its read
/// buffer (128 KiB).
pub const CLIENT_STREAM_WINDOW: u32 = 256 * 1024;

/// Most calls one HTTP/2 client connection carries at once (hyper's default is 200).
pub const CLIENT_MAX_STREAMS: u32 = 100;

/// HTTP/2 flow-control window of a whole client connection: room for every stream's window
/// at once (25 MiB), the most request bytes one connection can leave unread at the LB. With
/// hyper's default (1 MiB, one stream's), one call whose body was not being read stopped
/// the uploads of every other call on the connection (an h2c proxy's calls from many users,
/// say), and they ended in 408.
pub const CLIENT_CONNECTION_WINDOW: u32 = CLIENT_STREAM_WINDOW * CLIENT_MAX_STREAMS;

/// Routes requests to functions.
#[derive(Debug)]
pub struct Front {
    catalog: Arc<CatalogHandle>,
    invoker: Invoker,
    health: Health,
    /// Bounds of every client connection below HTTP.
    limits: ClientLimits,
    /// The open client connections, at most `limits.max_connections`.
    connections: Arc<Connections>,
    /// Set when [`Front::serve`] is cancelled: new requests are refused from then on.
    stopping: AtomicBool,
    /// "Connections at the cap" warnings: one a minute.
    cap_warnings: Throttle,
    /// Failed `accept`s (out of descriptors): one warning a second.
    accept_warnings: Throttle,
    /// The "call failed" lines: those the LB answered itself, throttled per kind.
    failures: FailureLog,
}

enum Route {
    Health,
    /// `OPTIONS *`: what the server takes.
    Server,
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
            connections: Connections::new(limits.max_connections),
            limits,
            stopping: AtomicBool::new(false),
            cap_warnings: Throttle::new(Duration::from_secs(60)),
            accept_warnings: Throttle::new(Duration::from_secs(1)),
            failures: FailureLog::default(),
        })
    }

    /// Answers one request. Never fails: errors become JSON responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let call_id = new_call_id();
        let mut response = match self.route(&req) {
            Ok(Route::Health) if self.health.is_serving() => plain(StatusCode::OK, "ok\n"),
            Ok(Route::Health) => json_error(StatusCode::SERVICE_UNAVAILABLE, "draining"),
            Ok(Route::Server) => server_options(),
            Ok(Route::Function(_)) if self.stopping.load(Ordering::Acquire) => {
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
                        let elapsed_ms = started.elapsed().as_millis() as u64;
                        self.failures.failed(&e, e.status().as_u16(), elapsed_ms);
                        e.to_response()
                    }
                }
            }
            Err(e) => {
                self.invoker.metrics().refused(CallOutcome::from(&e));
                e.to_response()
            }
        };
        stamp_call_id(&mut response, &call_id);
        response
    }

    /// The request's route. A request that goes to no function has its `Host` and its
    /// target's scheme and authority checked here (a call's are checked as its spec is
    /// built, once).
    fn route<B>(&self, req: &Request<B>) -> Result<Route, CallError> {
        let routed = self.route_path(req);
        if !matches!(routed, Ok(Route::Function(_))) {
            crate::invoke::request_host(req.version(), req.headers())?;
            crate::invoke::request_target(req.uri())?;
        }
        routed
    }

    fn route_path<B>(&self, req: &Request<B>) -> Result<Route, CallError> {
        // The asterisk form (RFC 9112, 3.2.4): hyper hands it over as the path `*`, which no
        // other form can have (an origin-form path starts with `/`).
        if req.uri().path() == "*" {
            return if req.method() == Method::OPTIONS {
                Ok(Route::Server)
            } else {
                Err(CallError::AsteriskNotOptions(req.method().to_string()))
            };
        }
        // The authority form (RFC 9112, 3.2.3): CONNECT's `host:port`, which hyper hands over
        // with no path at all, whatever the method.
        if req.uri().path().is_empty()
            && let Some(authority) = req.uri().authority()
        {
            return Err(CallError::NoTunnel {
                method: req.method().to_string(),
                authority: authority.to_string(),
            });
        }
        let normalized = decode_route_escapes(req.uri().path());
        let path = normalized.as_ref();
        if path == "/health" {
            return match *req.method() {
                Method::GET | Method::HEAD => Ok(Route::Health),
                _ => Err(CallError::MethodNotAllowed {
                    method: req.method().to_string(),
                    path: path.to_owned(),
                    allow: "GET, HEAD",
                }),
            };
        }
        let not_found = || CallError::NotFound(path.to_owned());
        // A path that names no function is a 404 whatever the method, CONNECT included: a
        // 405 says the resource exists, and its `Allow` would have no methods to list.
        if let Some(rest) = path.strip_prefix("/r/") {
            let (app, _) = rest.split_once('/').ok_or_else(not_found)?;
            // The route with its leading slash, as the catalog spells it: a slice of the path.
            let route = &rest[app.len()..];
            let function = self
                .catalog
                .current()
                .by_route(app, route)
                .ok_or_else(not_found)?;
            if req.method() == Method::CONNECT {
                // A 2xx answer to CONNECT turns the connection into a tunnel: hyper would
                // send no body, or no answer at all.
                return Err(CallError::MethodNotAllowed {
                    method: req.method().to_string(),
                    path: path.to_owned(),
                    allow: ROUTE_METHODS,
                });
            }
            return Ok(Route::Function(function));
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

    /// Serves connections from `listener` until `cancel`, then stops accepting, refuses new
    /// requests and waits for open connections to finish the ones they have.
    ///
    /// # Errors
    /// Never: accept errors are logged and retried.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> Result<(), Infallible> {
        self.serve_sharded(listener, None, cancel).await
    }

    /// [`Front::serve`], each connection served by one of `shards`, the one with the fewest
    /// open (`FN_SHARDS`):
    /// its socket moves to that shard's runtime, so the connection, its calls and the runner
    /// connections they use stay on that shard's thread. The accept loop runs where this
    /// future runs. `None` (or one shard) serves every connection here.
    ///
    /// # Errors
    /// Never: accept errors are logged and retried.
    pub async fn serve_sharded(
        self: Arc<Self>,
        listener: TcpListener,
        shards: Option<Arc<Shards>>,
        cancel: CancellationToken,
    ) -> Result<(), Infallible> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(CLIENT_READ_BUFFER);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.limits.ping)
            .keep_alive_timeout(self.limits.ping)
            .initial_stream_window_size(CLIENT_STREAM_WINDOW)
            .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
            .max_concurrent_streams(CLIENT_MAX_STREAMS)
            // A request head as large as HTTP/1.1's (hyper's default is 16 KiB, so a
            // cookie an HTTP/1.1 client may send got a 431 through an h2c proxy).
            .max_header_list_size(CLIENT_HEAD_LIMIT);
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    fn_lifecycle::warn_throttled!(self.accept_warnings, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registered = match self.connections.admit() {
                Ok(admitted) => {
                    if admitted.evicted_idle {
                        self.invoker.metrics().connection_shed("idle_over_cap");
                    }
                    admitted.registered
                }
                Err(full) => {
                    self.invoker.metrics().connection_shed("refused_over_cap");
                    self.warn_at_cap(full.cap);
                    continue; // drops the socket: the client sees the connection close
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let front = Arc::clone(&self);
            let registered = Arc::new(registered);
            let on_conn = Arc::clone(&registered);
            let service = service_fn(move |mut req: Request<Incoming>| {
                if let Some(upgrade) = req.extensions_mut().remove::<OnUpgrade>() {
                    tokio::spawn(close_after_upgrade(upgrade));
                }
                let front = Arc::clone(&front);
                let busy = on_conn.busy();
                let stuck = on_conn.stuck();
                async move {
                    let version = req.version();
                    if busy.is_closing() {
                        // The connection is being closed to make room; start nothing on it.
                        let error = CallError::ConnectionClosing;
                        front.invoker.metrics().refused(CallOutcome::from(&error));
                        let mut response = error.to_response();
                        stamp_call_id(&mut response, &new_call_id());
                        if version == Version::HTTP_2 {
                            // Given up like any answer the client does not take: a refusal
                            // held for a shut window would keep a closing connection open.
                            let limit = front.limits.send_timeout;
                            response = response.map(|body| stream_send_timeout(body, limit, stuck));
                        }
                        return Ok::<_, Infallible>(
                            response.map(|body| Guarded { body, _busy: busy }),
                        );
                    }
                    let (parts, body) = req.into_parts();
                    let (body, leftover) = leftover::track(body, version, &parts.headers);
                    let mut response = front.handle(Request::from_parts(parts, body)).await;
                    if version == Version::HTTP_2 {
                        let limit = front.limits.send_timeout;
                        response = response.map(|body| stream_send_timeout(body, limit, stuck));
                    }
                    // Answered with the body unread, and it will not be read; or the LB is
                    // draining (its drain delay: health says NOT_SERVING, the listener still
                    // takes connections), and tells each HTTP/1 client to take its next
                    // request elsewhere now. Kept alive, an idle connection is closed when the
                    // drain delay ends, and a request the client sends at that moment is
                    // lost without an answer (a POST is not retried by clients). HTTP/2 gets
                    // GOAWAY then, which tells the client which streams were not taken.
                    let closes = leftover.closes_after(response.status())
                        || (version != Version::HTTP_2 && front.draining());
                    if closes {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    if version == Version::HTTP_10 {
                        http10_answer(&mut response, closes);
                    }
                    Ok::<_, Infallible>(response.map(|body| Guarded { body, _busy: busy }))
                }
            });
            // The shard that serves it, and that shard's runtime when it is not this one.
            let (shard, elsewhere, load) = match shards.as_deref().map(Shards::assign) {
                Some((shard, runtime, load)) => {
                    let here = shard == fn_lifecycle::shards::current();
                    (shard, (!here).then_some(runtime), Some(load))
                }
                None => (0, None, None),
            };
            let client = Client {
                peer,
                builder: builder.clone(),
                limits: self.limits.clone(),
                graceful: graceful.watcher(),
                registered,
                metrics: self.invoker.metrics().clone(),
                load,
            };
            match elsewhere {
                Some(runtime) => {
                    // Registered with the accepting runtime's driver until moved: its events
                    // must wake the shard that serves it, not this one.
                    match stream.into_std() {
                        Ok(stream) => drop(runtime.spawn(async move {
                            match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => client.serve(stream, service).await,
                                Err(e) => tracing::debug!(%peer, shard, error = %e, "connection lost moving to its shard"),
                            }
                        })),
                        Err(e) => {
                            tracing::debug!(%peer, shard, error = %e, "connection lost moving to its shard");
                        }
                    }
                }
                None => drop(tokio::spawn(client.serve(stream, service))),
            }
        }
        self.stopping.store(true, Ordering::Release);
        drop(listener);
        tracing::info!("HTTP front stopped accepting; waiting for open requests");
        graceful.shutdown().await;
        Ok(())
    }

    /// Whether the LB is draining: health says NOT_SERVING (the drain delay, before the
    /// listener closes), so that load balancers and clients move off it.
    fn draining(&self) -> bool {
        !self.health.is_serving()
    }

    /// Logs that connections are refused at the cap, at most once a minute.
    fn warn_at_cap(&self, cap: usize) {
        fn_lifecycle::warn_throttled!(
            self.cap_warnings,
            max_connections = cap,
            "client connections at FN_MAX_CONNECTIONS and every one is answering a request; \
             refusing new connections (raise FN_MAX_CONNECTIONS and the descriptor limit, or add lb-agents)"
        );
    }
}

/// One accepted client connection and what serving it needs, wherever it is served.
struct Client {
    peer: std::net::SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    limits: ClientLimits,
    graceful: hyper_util::server::graceful::Watcher,
    registered: Arc<crate::connections::Registered>,
    metrics: crate::metrics::LbMetrics,
    /// Under `FN_SHARDS`: counts the connection on its shard while it is served.
    load: Option<fn_lifecycle::shards::ShardLoad>,
}

impl Client {
    /// Serves the connection until it ends, the server's graceful shutdown has ended it, or
    /// the connection cap closed it to make room.
    async fn serve<S>(self, stream: tokio::net::TcpStream, service: S)
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Guarded>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Client {
            peer,
            builder,
            limits,
            graceful,
            registered,
            metrics,
            load: _load,
        } = self;
        let io =
            TokioIo::new(ClientIo::new(stream, limits).reporting_flushes(Arc::clone(&registered)));
        let conn = graceful.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        metrics.connection_opened();
        tokio::select! {
            ended = conn => if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            },
            () = registered.evicted() => {
                tracing::debug!(%peer, "idle connection closed to make room (FN_MAX_CONNECTIONS)");
            }
            () = async {
                registered.stuck_closes().await;
                tracing::info!(%peer, "an HTTP/2 client kept a given-up stream's window shut; \
                    refusing new requests on its connection and closing it once its other calls end");
                registered.refuse_new_requests();
                registered.only_stuck_left().await;
            } => {
                tracing::info!(%peer, "HTTP/2 connection closed: its client kept a stream's window shut past twice the send timeout");
            }
        }
        metrics.connection_closed();
    }
}

/// Shuts down, with the lingering close, a connection hyper hands over at its end.
///
/// hyper takes a request with `Upgrade:` (`curl --http2` sends `Upgrade: h2c`) or a CONNECT
/// as one that may take the connection over, and at the connection's end hands the socket
/// to whoever holds the request's [`OnUpgrade`] instead of shutting it down. The LB upgrades
/// to nothing, so the socket was dropped unshut: the lingering close never ran, and a
/// client still sending its body (a 413, a 404) got a reset instead of the answer.
async fn close_after_upgrade(upgrade: OnUpgrade) {
    use tokio::io::AsyncWriteExt;
    // An error: the connection ended otherwise (hyper shut it down itself), nothing to do.
    if let Ok(upgraded) = upgrade.await {
        let mut io = TokioIo::new(upgraded);
        if let Err(e) = io.shutdown().await {
            tracing::debug!(error = %e, "closing a connection after an Upgrade request");
        }
    }
}

/// A response body that keeps its connection marked busy until the body ends or is dropped
/// and what hyper took of it has been flushed, so that the connection cap never closes a
/// connection in the middle of an answer.
struct Guarded {
    body: ResponseBody,
    _busy: Busy,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `path` with the escapes of every character a route may hold but `/` decoded: a client
/// that encodes one reaches the same function as one that sends it raw. Clients differ: curl
/// and browsers send `|^[]` raw, Python's `requests` encodes `|` and `^`, Go's
/// `url.PathEscape` encodes `[]`, `;` and `,`. For unreserved characters RFC 3986
/// (6.2.2.2) makes the two forms equivalent; for the others nothing else can tell them apart
/// here, since a route holds no `%` and a path is matched only against routes. Every other
/// escape is kept: `%2F` is not a path separator. Borrowed, at no cost, when the path holds
/// no `%`.
fn decode_route_escapes(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
            && byte != b'/'
            && crate::catalog::is_path_char(char::from(byte))
        {
            out.push(char::from(byte));
            i += 3;
            continue;
        }
        // Copied a character at a time: `path` is a URI's, so ASCII, but never split one.
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    std::borrow::Cow::Owned(out)
}

/// A new call id: a UUID in its hyphenated form, by the UUID's own encoder (`to_string`
/// goes through the formatter, which cost more than the rest of the id; session 24).
fn new_call_id() -> String {
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

/// Marks the answer to an HTTP/1.0 request as HTTP/1.0 where the connection ends with it,
/// so that it does not promise a connection it will not keep: where it says `close`, and
/// where its length is not known (HTTP/1.0 has no chunked coding: such an answer ends when
/// the connection closes). hyper, answering a keep-alive HTTP/1.0 request with an answer
/// left as HTTP/1.1, adds `connection: keep-alive` unless the answer already says it (so
/// `close, keep-alive`), then closes anyway; with an HTTP/1.0 answer it adds nothing, and
/// closes.
fn http10_answer<B: Body>(response: &mut Response<B>, closes: bool) {
    let unknown_length = response.body().size_hint().exact().is_none()
        && !response.headers().contains_key(header::CONTENT_LENGTH);
    if closes || unknown_length {
        *response.version_mut() = Version::HTTP_10;
    }
}

/// Gives `response` its `Fn-Call-Id`.
fn stamp_call_id<B>(response: &mut Response<B>, call_id: &str) {
    if let Ok(value) = HeaderValue::from_str(call_id) {
        response.headers_mut().insert(CALL_ID_HEADER, value);
    }
}

/// The answer to `OPTIONS *`, as Go's `net/http` server gives it (Fn's Go dataplane ran
/// on it): 200 with `Content-Length: 0`, plus the `Allow` of the methods the server takes
/// on some resource. A body the request may carry is read and dropped as any unread body is.
fn server_options() -> Response<ResponseBody> {
    let mut response = plain(StatusCode::OK, "");
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert(header::ALLOW, HeaderValue::from_static(ROUTE_METHODS));
    response
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn escapes_of_route_characters_are_decoded_and_others_kept() {
        assert!(matches!(
            decode_route_escapes("/r/demo/echo"),
            std::borrow::Cow::Borrowed("/r/demo/echo")
        ));
        assert_eq!(decode_route_escapes("/r/demo/%65ch%6F"), "/r/demo/echo");
        assert_eq!(
            decode_route_escapes("/invoke/de%6do/a%2Db%7E"),
            "/invoke/demo/a-b~"
        );
        // Reserved and malformed escapes stay as they are.
        assert_eq!(
            decode_route_escapes("/r/demo/a%2Fb%20c"),
            "/r/demo/a%2Fb%20c"
        );
        assert_eq!(
            decode_route_escapes("/r/demo/a%7Cb%5Ec%5B%5d%24%40%3a"),
            "/r/demo/a|b^c[]$@:"
        );
        // Nor what a route may not hold: `%`, `?`, `#`, `"`, non-ASCII.
        assert_eq!(
            decode_route_escapes("/r/demo/%25%3F%23%22%C3%A9"),
            "/r/demo/%25%3F%23%22%C3%A9"
        );
        assert_eq!(decode_route_escapes("/r/x%zz%4"), "/r/x%zz%4");
        assert_eq!(decode_route_escapes("%"), "%");
    }

    /// A body of one frame that says when it has been dropped.
    struct Watched {
        frame: Option<Bytes>,
        dropped: Arc<AtomicBool>,
    }

    impl Body for Watched {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            Poll::Ready(self.frame.take().map(|data| Ok(Frame::data(data))))
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Release);
        }
    }

    /// hyper drops a body once it has taken its last frame, while up to its write buffer of
    /// it still waits for a slow client: the connection must stay busy until that has left.
    #[tokio::test]
    async fn a_connection_stays_busy_until_its_answer_has_left() {
        const ANSWER: usize = 64 * 1024;
        let table = Connections::new(1);
        let registered = Arc::new(table.admit().expect("room").registered);
        let (mut client, server) = tokio::io::duplex(1024);
        let io = TokioIo::new(
            ClientIo::new(server, ClientLimits::default())
                .reporting_flushes(Arc::clone(&registered)),
        );
        let dropped = Arc::new(AtomicBool::new(false));
        let (on_conn, body_dropped) = (Arc::clone(&registered), Arc::clone(&dropped));
        let service = service_fn(move |_req: Request<Incoming>| {
            let body = Watched {
                frame: Some(Bytes::from(vec![7u8; ANSWER])),
                dropped: Arc::clone(&body_dropped),
            };
            let busy = on_conn.busy();
            async move {
                Ok::<_, Infallible>(Response::new(Guarded {
                    body: body.boxed_unsync(),
                    _busy: busy,
                }))
            }
        });
        let served = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .max_buf_size(CLIENT_READ_BUFFER)
                .serve_connection(io, service),
        );
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: lb.test\r\n\r\n")
            .await
            .expect("request");
        for _ in 0..500 {
            if dropped.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(dropped.load(Ordering::Acquire), "hyper took the whole body");
        assert!(
            table.admit().is_err(),
            "the answer has not left: the connection is not idle"
        );
        let mut received = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while !received.ends_with(&[7u8; 64]) || received.len() < ANSWER {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("the answer comes")
                .expect("read");
            assert!(n > 0, "cut off after {} bytes", received.len());
            received.extend_from_slice(&buf[..n]);
        }
        // The server's flush follows its last write: give it its turn.
        let mut admitted = table.admit();
        for _ in 0..500 {
            if admitted.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            admitted = table.admit();
        }
        let admitted = admitted.expect("idle once the answer has left");
        assert!(admitted.evicted_idle);
        drop(served);
    }
}
