//! One call end to end: capacity accounting, placement, request body out, response back.
//!
//! After placement the call is driven by its own task, which owns the committed stream, the
//! client's request body and the capacity guard. The HTTP handler waits for the response
//! head; the response body is fed by the task frame by frame. Whoever goes away first ends
//! the call: a client that disconnects drops the head receiver or the body, which stops the
//! task, which drops the Engage stream, which makes the runner abort the function.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fn_nodepool::client::{BodySender, Engaged};
use fn_nodepool::{CapacityGuard, CapacityTracker};
use fn_protocol::CallSpec;
use fn_protocol::runner::{CallFinished, ErrorKind, HttpRespMeta, runner_msg};
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Body, Frame};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::catalog::Function;
use crate::dispatch::Dispatcher;
use crate::error::CallError;
use crate::front::{BodyError, ResponseBody};
use crate::metrics::{CallOutcome, CallRecord, LbMetrics};

/// Largest data frame sent to a runner; larger client chunks are split.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Time the runner gets past the deadline to report the timeout itself.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// How long the trailers may take after `CallFinished` (they come in the same write).
const FINISH_BOUND: Duration = Duration::from_secs(1);

/// Request headers that describe the connection, not the request: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn forwardable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH && name != header::HOST
}

/// Runs calls: accounts capacity, places, streams.
#[derive(Debug, Clone)]
pub struct Invoker {
    dispatcher: Dispatcher,
    capacity: CapacityTracker,
    max_request_body: u64,
    metrics: LbMetrics,
}

impl Invoker {
    /// An invoker whose call metrics ([`LbMetrics`]) are registered in `registry`.
    pub fn new(
        dispatcher: Dispatcher,
        capacity: CapacityTracker,
        max_request_body: u64,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        Invoker {
            dispatcher,
            capacity,
            max_request_body,
            metrics: LbMetrics::register(registry),
        }
    }

    /// The call metrics, for requests refused before they reach the invoker.
    pub(crate) fn metrics(&self) -> &LbMetrics {
        &self.metrics
    }

    /// Runs `function` for the client request `req`.
    ///
    /// # Errors
    /// [`CallError`] for every failure before the response head; failures after it end the
    /// response body with an error.
    pub async fn invoke<B>(
        &self,
        function: Arc<Function>,
        call_id: String,
        req: Request<B>,
    ) -> Result<Response<ResponseBody>, CallError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        // In flight from here; the record goes with the call to its driver task.
        let record = self.metrics.call_started();
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|len| len > self.max_request_body) {
            return Err(record.failed(CallError::TooLarge {
                limit: self.max_request_body,
            }));
        }
        let (parts, body) = req.into_parts();
        let spec = call_spec(&function, call_id, &parts);
        let timeout = spec.timeout;
        let deadline = Instant::now() + timeout;

        // The call counts towards its group's demand from arrival to the last byte.
        let guard = self.capacity.assign(&spec.lb_group, spec.memory_mb);
        let placed = match self.dispatcher.place(&spec).await {
            Ok(placed) => placed,
            Err(err) => {
                if let CallError::NoCapacity { attempts, .. } = &err {
                    self.metrics.not_placed(*attempts);
                }
                return Err(record.failed(err));
            }
        };
        self.metrics.placed(placed.attempts, placed.waited);
        tracing::info!(
            runner = %placed.engaged.runner,
            attempts = placed.attempts,
            placement_ms = placed.waited.as_millis() as u64,
            slot_us = placed.engaged.slot_latency.as_micros() as u64,
            "call placed"
        );

        let (head_tx, head_rx) = oneshot::channel();
        let (frames_tx, frames_rx) = mpsc::channel(8);
        let driver = CallDriver {
            runner: placed.engaged.runner.clone(),
            timeout,
            deadline,
            max_request_body: self.max_request_body,
            _guard: guard,
            record,
        };
        // The driver's log lines belong to the call's span (call id, function, group).
        tokio::spawn(
            driver
                .run(placed.engaged, body, head_tx, frames_tx)
                .instrument(tracing::Span::current()),
        );
        let head = head_rx.await.map_err(|_| CallError::RunnerFailed {
            runner: "unknown".into(),
            details: "the call ended without an answer".into(),
        })??;
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(
            frames_rx,
        ))));
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }
}

/// Builds the wire call from the catalog entry and the client's request.
fn call_spec(function: &Function, id: String, parts: &http::request::Parts) -> CallSpec {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(http::uri::Authority::as_str))
        .unwrap_or("localhost");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if forwardable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    CallSpec {
        id,
        app: function.app.clone(),
        function: function.name.clone(),
        route: function.route.clone(),
        method: parts.method.clone(),
        request_url: format!("http://{host}{path}"),
        headers,
        memory_mb: function.memory_mb,
        timeout: function.timeout,
        idle_timeout: function.idle_timeout,
        command: function.command.clone(),
        image: function.image.clone(),
        config: function.config.clone(),
        lb_group: function.lb_group.clone(),
        deadline: SystemTime::now() + function.timeout,
    }
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, BodyError>>;

/// How the request body pump ended early.
#[derive(Debug)]
enum PumpError {
    TooLarge,
    Client(String),
}

/// Owns one committed call until it ends.
struct CallDriver {
    runner: String,
    timeout: Duration,
    deadline: Instant,
    max_request_body: u64,
    /// Released when the call ends, however it ends.
    _guard: CapacityGuard,
    /// The call's metrics record: finished with the outcome [`CallDriver::drive`] returns.
    record: CallRecord,
}

/// Aborts the wrapped task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CallDriver {
    fn failed(&self, details: impl Into<String>) -> CallError {
        CallError::RunnerFailed {
            runner: self.runner.clone(),
            details: details.into(),
        }
    }

    fn finished_error(&self, f: &CallFinished) -> CallError {
        match f.kind() {
            ErrorKind::Timeout => CallError::Timeout(self.timeout),
            kind => self.failed(format!("{kind:?}: {}", f.details)),
        }
    }

    /// Drives the call to its end and records how it ended.
    async fn run<B>(
        self,
        engaged: Engaged,
        body: B,
        head_tx: oneshot::Sender<Result<Head, CallError>>,
        frames: FrameTx,
    ) where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let mut engaged = engaged;
        let (outcome, runner_finished) = self.drive(&mut engaged, body, head_tx, &frames).await;
        self.record.finish(outcome);
        // Only now does the client's response body end: a client that has read the whole
        // answer finds the call already counted.
        drop(frames);
        if runner_finished {
            // Read the runner's trailers, so the stream closes instead of being reset.
            engaged.finish(FINISH_BOUND).await;
        }
    }

    /// Drives the call until it ends; returns how it ended and whether the runner ended it
    /// with `CallFinished` (so that only its trailers are left to read).
    async fn drive<B>(
        &self,
        engaged: &mut Engaged,
        body: B,
        head_tx: oneshot::Sender<Result<Head, CallError>>,
        frames: &FrameTx,
    ) -> (CallOutcome, bool)
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let Some(to_runner) = engaged.take_body_sender() else {
            let err = self.failed("the request body sender was already taken");
            let outcome = CallOutcome::from(&err);
            let _unread = head_tx.send(Err(err));
            return (outcome, false);
        };
        let mut pump = AbortOnDrop(tokio::spawn(pump_request(
            body,
            to_runner,
            self.max_request_body,
        )));
        let mut pump_done = false;
        let give_up = self.deadline + DEADLINE_GRACE;
        let mut head_tx = head_tx;

        // Phase 1: until the response head, or until the client gives up waiting.
        // Set when the runner answers with `CallFinished` instead of a head.
        let mut head_finished = false;
        let head = tokio::select! {
            head = self.await_head(engaged, &mut pump, &mut pump_done, &mut head_finished, give_up) => head,
            () = head_tx.closed() => {
                tracing::info!("client went away before the response; cancelling the call");
                return (CallOutcome::ClientGone, false);
            }
        };
        let failed = head.as_ref().err().map(CallOutcome::from);
        if head_tx.send(head).is_err() {
            tracing::info!("client went away before the response; cancelling the call");
            return (CallOutcome::ClientGone, false);
        }
        if let Some(outcome) = failed {
            return (outcome, head_finished);
        }

        // Phase 2: the response body. Sends block on a slow client but never past the deadline.
        let mut eof = false;
        loop {
            tokio::select! {
                pumped = &mut pump.0, if !pump_done => {
                    pump_done = true;
                    if let Ok(Err(e)) = pumped {
                        let (why, outcome) = match e {
                            PumpError::TooLarge => (format!("request body over the limit of {} bytes", self.max_request_body), CallOutcome::TooLarge),
                            PumpError::Client(e) => (format!("reading the request body: {e}"), CallOutcome::BadRequest),
                        };
                        abort_body(frames, &why).await;
                        return (outcome, false);
                    }
                }
                msg = engaged.next() => {
                    let body_msg = match msg {
                        Ok(Some(m)) => m.body,
                        Ok(None) => {
                            abort_body(frames, "the runner ended the stream before CallFinished").await;
                            return (CallOutcome::RunnerFailed, false);
                        }
                        Err(status) => {
                            abort_body(frames, &format!("runner {} failed: {}", self.runner, status.message())).await;
                            return (CallOutcome::RunnerFailed, false);
                        }
                    };
                    match body_msg {
                        Some(runner_msg::Body::Data(frame)) if !eof => {
                            eof = frame.eof;
                            if !frame.data.is_empty() {
                                let sent = tokio::time::timeout_at(give_up, frames.send(Ok(Frame::data(frame.data)))).await;
                                if !matches!(sent, Ok(Ok(()))) {
                                    tracing::info!("client stopped reading the response; cancelling the call");
                                    return (CallOutcome::ClientGone, false);
                                }
                            }
                        }
                        Some(runner_msg::Body::Finished(f)) if f.success && eof => return (CallOutcome::Success, true),
                        Some(runner_msg::Body::Finished(f)) => {
                            let err = self.finished_error(&f);
                            tracing::info!(error = %err, "call failed after its response started");
                            abort_body(frames, &err.to_string()).await;
                            return (CallOutcome::from(&err), true);
                        }
                        _ => {
                            abort_body(frames, "protocol error: unexpected message in the response").await;
                            return (CallOutcome::RunnerFailed, false);
                        }
                    }
                }
                () = frames.closed() => {
                    // Hyper dropped the response body: the client went away. Returning drops
                    // the Engage stream, which makes the runner abort the function.
                    tracing::info!("client went away during the response; cancelling the call");
                    return (CallOutcome::ClientGone, false);
                }
                () = tokio::time::sleep_until(give_up) => {
                    abort_body(frames, "the call passed its timeout").await;
                    return (CallOutcome::Timeout, false);
                }
            }
        }
    }
}

impl CallDriver {
    /// Waits for `CallResultStart` while the request body streams out.
    async fn await_head(
        &self,
        engaged: &mut Engaged,
        pump: &mut AbortOnDrop<Result<(), PumpError>>,
        pump_done: &mut bool,
        finished: &mut bool,
        give_up: Instant,
    ) -> Result<Head, CallError> {
        loop {
            tokio::select! {
                pumped = &mut pump.0, if !*pump_done => {
                    *pump_done = true;
                    match pumped {
                        Ok(Ok(())) => {}
                        Ok(Err(PumpError::TooLarge)) => {
                            return Err(CallError::TooLarge { limit: self.max_request_body });
                        }
                        Ok(Err(PumpError::Client(e))) => {
                            return Err(CallError::BadRequest(format!("reading the request body: {e}")));
                        }
                        Err(join) => return Err(self.failed(format!("request body task failed: {join}"))),
                    }
                }
                msg = engaged.next() => {
                    let m = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Err(self.failed("the runner ended the stream without a result")),
                        Err(status) => {
                            return Err(self.failed(format!("{}: {}", status.code(), status.message())));
                        }
                    };
                    return match m.body {
                        Some(runner_msg::Body::ResultStart(start)) => {
                            head_of(start.http).map_err(|details| self.failed(details))
                        }
                        Some(runner_msg::Body::Finished(f)) => {
                            *finished = true;
                            Err(self.finished_error(&f))
                        }
                        _ => Err(self.failed("protocol error: expected CallResultStart")),
                    };
                }
                () = tokio::time::sleep_until(give_up) => return Err(CallError::Timeout(self.timeout)),
            }
        }
    }
}

/// Ends the client's response body with an error: hyper then cuts the response off rather
/// than ending it cleanly, so a client can tell.
async fn abort_body(frames: &FrameTx, why: &str) {
    tracing::info!(reason = why, "aborting the response body");
    if frames.send(Err(why.to_owned().into())).await.is_err() {
        tracing::debug!("client already gone");
    }
}

/// Translates the runner's response head; `Err` when it is unusable.
fn head_of(meta: Option<HttpRespMeta>) -> Result<Head, String> {
    let meta = meta.ok_or("CallResultStart without a status")?;
    let status = u16::try_from(meta.status_code)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("invalid status {} from the function", meta.status_code))?;
    let mut headers = HeaderMap::with_capacity(meta.headers.len());
    for h in meta.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) else {
            tracing::debug!(header = %h.name, "dropping an invalid response header");
            continue;
        };
        if forwardable(&name) {
            headers.append(name, value);
        }
    }
    Ok(Head { status, headers })
}

/// Streams the client's request body to the runner: exactly the bytes read, split at
/// [`MAX_FRAME_BYTES`], then `eof`. Stops at `max` bytes.
async fn pump_request<B>(body: B, to_runner: BodySender, max: u64) -> Result<(), PumpError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let mut frames = BodyStream::new(body);
    let mut total: u64 = 0;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| PumpError::Client(e.to_string()))?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers are not forwarded
        };
        total += data.len() as u64;
        if total > max {
            return Err(PumpError::TooLarge);
        }
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_FRAME_BYTES));
            if to_runner.send(chunk, false).await.is_err() {
                // The runner stopped reading (it answered early or failed); the outcome
                // arrives on the response stream.
                return Ok(());
            }
        }
    }
    if to_runner.send(Bytes::new(), true).await.is_err() {
        tracing::debug!("runner no longer reads the request body");
    }
    Ok(())
}
