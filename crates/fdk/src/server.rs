//! The `http-stream` server: the socket dance, and `POST /call` translated both ways.
//!
//! Socket: the runner waits for `FN_LISTENER` (`<dir>/lsnr.sock`) to appear and connects to it.
//! So that it appears only once it accepts, the FDK removes stale files, binds
//! `<dir>/phony<name>`, makes it world-writable (0666, the runner may run as another user),
//! starts accepting and only then links `<name>` → `phony<name>` (a relative target, so the
//! directory may be mounted elsewhere, e.g. in a container). Both files are removed on shutdown.
//!
//! Calls: every connection is HTTP/1.1. `POST /call` runs the handler in its own task (a panic
//! fails the call, not the server) and answers HTTP 200 with the function's status in
//! `Fn-Http-Status`, its headers as `Fn-Http-H-*` but for `Content-Type`, which goes plainly
//! only (as Fn's Go FDK sends it), and `Fn-Fdk-Version` and `Fn-Fdk-Runtime` (as every answer
//! does); the body streams. A handler `Err` or panic answers HTTP 502 (also in
//! `Fn-Http-Status`) with a one-line message, and serving goes on. Other paths answer 404,
//! other methods on `/call` 405.
//!
//! Deadline: a handler still running at the call's `Fn-Deadline` is aborted (its future
//! dropped), and a call whose deadline has passed when it comes does not reach the handler;
//! both answer 504 (also in `Fn-Http-Status`), [`RUNNER_FIRST`] after the deadline, unless the
//! runner has cut the call off by then. An answer whose head has gone and whose body still
//! streams at the deadline is stopped then (or, when the runner is not reading, at its next
//! read: the body is polled only when there is room to write) and broken off as late (the
//! connection is closed mid-body), so the runner sees it incomplete. Without a readable
//! deadline, no limit.
//!
//! Accept: a failed `accept` (out of descriptors) is tried again after 50 ms; the first is
//! printed on stderr, then at most one line every 5 s with the count since.
//!
//! Shutdown: when the shutdown future completes the FDK stops accepting, lets in-flight calls
//! finish (idle connections close at once), and removes its socket files.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::body::{Body, BoxError, ResponseBody};
use crate::context::Context;
use crate::env::FnEnv;
use crate::headers;
use crate::response::Response;
use crate::{Error, FDK_RUNTIME, FDK_VERSION};

/// The only path of the contract.
const CALL_PATH: &str = "/call";

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Most one line about failed `accept`s per this long on the function's stderr: out of
/// descriptors, each pause ([`ACCEPT_BACKOFF`]) printed one, 20 lines a second.
const ACCEPT_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// What the function's stderr is told of failed `accept`s: the first at once, then at most
/// one line per [`ACCEPT_REPORT_INTERVAL`], saying how many failed unsaid since the last
/// line. Owned by the accept loop alone. (The daemons' `fn_lifecycle::logging::Throttle`
/// is the same idea; the FDK, linked into every function, does not take that crate's
/// tonic and tracing for it.)
#[derive(Debug, Default)]
struct AcceptFailures {
    /// When the next line may be printed; `None` before the first failure.
    next_line: Option<Instant>,
    /// Failures not printed since the last line.
    unsaid: u64,
}

impl AcceptFailures {
    /// The line to print for the failure `err` at `now`, if one is due.
    fn failed(&mut self, err: &io::Error, now: Instant) -> Option<String> {
        if self.next_line.is_some_and(|next| now < next) {
            self.unsaid += 1;
            return None;
        }
        self.next_line = Some(now + ACCEPT_REPORT_INTERVAL);
        let line = match std::mem::take(&mut self.unsaid) {
            0 => format!("fn-fdk: accepting a connection failed: {err}"),
            unsaid => format!(
                "fn-fdk: accepting a connection failed: {err} ({unsaid} more failures since \
                 the last line, at most one line per {ACCEPT_REPORT_INTERVAL:?})"
            ),
        };
        Some(line)
    }
}

/// What every connection task shares.
pub(crate) struct Shared<F> {
    pub(crate) handler: F,
    pub(crate) env: Arc<FnEnv>,
}

/// The bound socket; dropping it stops accepting and removes both files.
pub(crate) struct Listener {
    socket: UnixListener,
    link: PathBuf,
    phony: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for path in [&self.link, &self.phony] {
            if let Err(err) = remove_if_present(path) {
                eprintln!("fn-fdk: cannot remove {}: {err}", path.display());
            }
        }
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Binds the private socket beside `link` and links `link` to it. Must run inside a tokio
/// runtime.
pub(crate) fn bind(link: &Path) -> Result<Listener, Error> {
    let socket_error = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Socket { path, source }
    };
    // FnEnv guarantees a file name; the fallback keeps this total.
    let name = link.file_name().unwrap_or_default();
    let mut phony_name = std::ffi::OsString::from("phony");
    phony_name.push(name);
    let phony = link.with_file_name(&phony_name);

    remove_if_present(link).map_err(socket_error(link))?;
    remove_if_present(&phony).map_err(socket_error(&phony))?;
    let socket = UnixListener::bind(&phony).map_err(socket_error(&phony))?;
    // From here on, dropping `listener` cleans up whatever exists.
    let listener = Listener {
        socket,
        link: link.to_owned(),
        phony,
    };
    std::fs::set_permissions(&listener.phony, std::fs::Permissions::from_mode(0o666))
        .map_err(socket_error(&listener.phony))?;
    // The socket is listening since `bind`: connections queue until `serve` accepts them.
    symlink(&phony_name, link).map_err(socket_error(link))?;
    Ok(listener)
}

/// Accepts connections until `shutdown`, then drains them.
pub(crate) async fn serve<F, Fut>(
    listener: Listener,
    shared: Arc<Shared<F>>,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut accept_failures = AcceptFailures::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.socket.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared), stop_rx.clone()));
                }
                Err(err) => {
                    if let Some(line) = accept_failures.failed(&err, Instant::now()) {
                        eprintln!("{line}");
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    while connections.join_next().await.is_some() {}
}

/// Most header lines a call from the runner may carry: the runner passes up to 256 of the
/// client's (as `Fn-Http-H-*`) and a few of the contract's; hyper's default of 100 refused
/// calls with more than about 93 client headers with 431, which no Fn FDK does. hyper sets
/// up this many slots for every request it parses (once set, on the heap), so no more.
const MAX_REQUEST_HEADERS: usize = 300;

async fn serve_connection<F, Fut>(
    stream: UnixStream,
    shared: Arc<Shared<F>>,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    // Whether a request came on the connection: one whose first request never arrived
    // whole (a head begun and not finished) is closed at a stop rather than waited for;
    // hyper closes a connection at a graceful shutdown only between requests, and the FDK
    // sets no header timer, so it waited for that head for ever.
    let used = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let marks = Arc::clone(&used);
    let service = service_fn(move |request| {
        marks.store(true, std::sync::atomic::Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(dispatch(shared, request).await) }
    });
    let connection = http1::Builder::new()
        .max_headers(MAX_REQUEST_HEADERS)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let stopping = async move {
        // Ok (told to stop) and Err (the server is gone) both mean stop; the guard on the
        // value is not `Send`, so it is dropped here rather than carried across an await.
        drop(stop.wait_for(|stop| *stop).await);
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopping => {
            if !used.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        eprintln!("fn-fdk: connection from the runner failed: {err}");
    }
}

async fn dispatch<F, Fut>(
    shared: Arc<Shared<F>>,
    request: Request<Incoming>,
) -> http::Response<ResponseBody>
where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    if request.uri().path() != CALL_PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: this function serves POST /call only\n",
        );
    }
    if request.method() != Method::POST {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST /call\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let (parts, body) = request.into_parts();
    let context = Context::from_fn_headers(Arc::clone(&shared.env), &parts.headers);
    let call_id = context.call_id().to_owned();
    // Dropped unread (a call already late), the body is read to its end in the background.
    let body = Body::incoming(body);
    let deadline = match Limit::of(&context, &parts.headers) {
        Limit::Passed(deadline) => {
            eprintln!("fn-fdk: call {call_id} came after its deadline; the handler is not called");
            tokio::time::sleep_until(runner_first(deadline)).await;
            return timed_out();
        }
        Limit::None => None,
        Limit::At(deadline) => Some(deadline),
    };
    // The handler is called inside the task: a panic in its synchronous part (before the
    // future it returns) is then the task's too, and answered 502 like one in the future,
    // rather than unwinding through the connection and breaking it.
    let call = AbortOnDrop(tokio::spawn(async move {
        (shared.handler)(context, body).await
    }));
    let finished = match deadline {
        None => call.await,
        // At the deadline the handler's task is aborted as `call` drops: its future is
        // dropped at its next await, which is how Rust cancels.
        Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
            Ok(finished) => finished,
            Err(_) => {
                eprintln!("fn-fdk: call {call_id} ran past its deadline; the handler is stopped");
                tokio::time::sleep_until(runner_first(deadline)).await;
                return timed_out();
            }
        },
    };
    match finished {
        Ok(Ok(response)) => to_wire(response, deadline),
        Ok(Err(err)) => {
            eprintln!("fn-fdk: call {call_id} failed: {err}");
            failure(format!("function failed: {err}\n"))
        }
        Err(err) => {
            eprintln!("fn-fdk: call {call_id} failed: {err}");
            failure(String::from("function failed: the handler panicked\n"))
        }
    }
}

/// How long after a call's deadline the FDK, having stopped the handler at the deadline,
/// answers 504 (or breaks off an answer still streaming). The runner cuts the call off at the
/// same deadline, and its timeout is to be what the client sees: its own 504, the call
/// counted as timed out, the instance retired. Answering at the same instant would race it
/// (the two clocks agree to a millisecond, and a busy runner's timer may fire late): which
/// of the two the client got, and whether the call counted as timed out, would be chance.
/// A runner that does not cut calls off gets the FDK's answer this much after the deadline.
const RUNNER_FIRST: Duration = Duration::from_secs(1);

/// When the FDK answers a call stopped at `deadline`.
fn runner_first(deadline: Instant) -> Instant {
    deadline.checked_add(RUNNER_FIRST).unwrap_or(deadline)
}

/// How long a call may run, on tokio's clock.
enum Limit {
    /// No deadline: the call came without `Fn-Deadline`, or with one that is not RFC 3339.
    None,
    /// The deadline, already past when the call came.
    Passed(Instant),
    /// The deadline: the handler is stopped then, and a body still streaming too.
    At(Instant),
}

impl Limit {
    /// The limit of the call `context` describes, read at its arrival. The wall-clock
    /// deadline becomes a time on tokio's (monotonic) clock once, so that a wall clock set
    /// back or forth during the call does not move it. An unreadable `Fn-Deadline` is
    /// reported on stderr and, as with Fn's Go FDK, leaves the call without a limit (the
    /// runner still bounds it).
    fn of(context: &Context, wire: &http::HeaderMap) -> Self {
        let now = Instant::now();
        match context
            .deadline()
            .map(|at| at.duration_since(SystemTime::now()))
        {
            Some(Ok(left)) if !left.is_zero() => {
                // Beyond tokio's clock (a deadline thousands of years ahead): no limit.
                now.checked_add(left).map_or(Self::None, Self::At)
            }
            Some(Ok(_)) => Self::Passed(now),
            Some(Err(late)) => Self::Passed(now.checked_sub(late.duration()).unwrap_or(now)),
            None => {
                if let Some(value) = wire.get(headers::FN_DEADLINE) {
                    eprintln!(
                        "fn-fdk: call {}: Fn-Deadline {value:?} is not an RFC 3339 time; the \
                         call runs without a deadline",
                        context.call_id()
                    );
                }
                Self::None
            }
        }
    }
}

/// The function's answer in wire form; a body still streaming at `deadline` is stopped then
/// and broken off [`RUNNER_FIRST`] later.
fn to_wire(response: Response, deadline: Option<Instant>) -> http::Response<ResponseBody> {
    let (status, mut function_headers, body) = response.into_parts();
    let body = match deadline {
        Some(deadline) => body.until(deadline, runner_first(deadline)),
        None => body,
    };
    // The function's `Content-Type` goes plainly only, every value, as Fn's Go FDK sends it
    // (its `encapHeaders` passes it over); the runner gives it to the client.
    let content_types: Vec<HeaderValue> = match function_headers.entry(CONTENT_TYPE) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => Vec::new(),
    };
    let mut wire = http::Response::new(body);
    let headers = wire.headers_mut();
    *headers = headers::to_fn(&function_headers);
    for content_type in content_types {
        headers.append(CONTENT_TYPE, content_type);
    }
    headers.insert(headers::FN_HTTP_STATUS, HeaderValue::from(status.as_u16()));
    name_the_fdk(headers);
    wire
}

/// `Fn-Fdk-Version` and `Fn-Fdk-Runtime`, on every reply as Fn's FDKs send them.
fn name_the_fdk(headers: &mut http::HeaderMap) {
    headers.insert(
        headers::FN_FDK_VERSION,
        HeaderValue::from_static(FDK_VERSION),
    );
    headers.insert(
        headers::FN_FDK_RUNTIME,
        HeaderValue::from_static(FDK_RUNTIME),
    );
}

/// A failed call: HTTP 502, also as the function's status.
fn failure(message: String) -> http::Response<ResponseBody> {
    let mut response = plain(StatusCode::BAD_GATEWAY, message);
    response.headers_mut().insert(
        headers::FN_HTTP_STATUS,
        HeaderValue::from(StatusCode::BAD_GATEWAY.as_u16()),
    );
    response
}

/// A call stopped at its deadline (or that came after it): HTTP 504, also as the function's
/// status, which the runner gives the client as it is.
fn timed_out() -> http::Response<ResponseBody> {
    let mut response = plain(
        StatusCode::GATEWAY_TIMEOUT,
        "function timed out: the call's deadline passed\n",
    );
    response.headers_mut().insert(
        headers::FN_HTTP_STATUS,
        HeaderValue::from(StatusCode::GATEWAY_TIMEOUT.as_u16()),
    );
    response
}

fn plain(status: StatusCode, message: impl Into<ResponseBody>) -> http::Response<ResponseBody> {
    let mut response = http::Response::new(message.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    name_the_fdk(headers);
    response
}

/// A spawned handler that is aborted when the call is dropped (the runner hung up).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
