//! One call end to end: capacity accounting, placement, request body out, response back.
//!
//! A call has no task of its own: it runs in the client's connection task, where hyper polls
//! it. The handler reads what has already arrived of the request body (a small body is then
//! complete and travels with the `TryCall`: the whole request in one write), places the call,
//! and waits for the response head while it pumps the rest of the body, if any. The response
//! body is a [`CallBody`], which reads the runner's messages as hyper asks for frames (and
//! keeps pumping the request body, for full-duplex calls), so a small answer that arrives in
//! one read leaves in one write, with no hop between tasks.
//!
//! Whoever goes away first ends the call. A client that disconnects makes hyper drop the
//! handler future or the body, which drops the Engage stream (a reset), which makes the
//! runner abort the function. A call the runner has finished instead ends its stream
//! cleanly (see [`Engaged`]). A client that stops reading is cut off by its connection's
//! send timeout ([`crate::client_io`]), which drops the body the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fn_nodepool::client::{BodySender, EarlyBody, Engaged};
use fn_nodepool::{CapacityGuard, CapacityTracker};
use fn_protocol::CallSpec;
use fn_protocol::call::{MAX_HEADERS, MAX_URL_LEN};
use fn_protocol::runner::{CallFinished, ErrorKind, HttpRespMeta, RunnerMsg, runner_msg};
use futures::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::{BodyError, ResponseBody};
use crate::catalog::Function;
use crate::dispatch::Dispatcher;
use crate::error::CallError;
use crate::metrics::{CallOutcome, CallRecord, LbMetrics};

/// Largest data frame sent to a runner; larger client chunks are split.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest declared request body read before placement: complete on arrival, it goes with
/// the `TryCall`; a longer one streams once a runner has committed.
pub const EARLY_BODY_MAX: usize = 64 * 1024;

/// Time the runner gets past the deadline to report the timeout itself.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// How long the end of a finished call's stream (the runner's trailers) may take when it
/// did not come with `CallFinished`, as it normally does.
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

/// Whether a header goes on between the client and the function: not the hop-by-hop ones
/// nor `Host`. `Content-Length` does, both ways: the body is forwarded byte for byte.
fn forwardable(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str()) && name != header::HOST
}

/// Runs calls: accounts capacity, places, streams.
#[derive(Debug, Clone)]
pub struct Invoker {
    dispatcher: Dispatcher,
    capacity: CapacityTracker,
    max_request_body: u64,
    /// Longest pause in a request body still arriving ([`BODY_IDLE_TIMEOUT`] by default).
    body_idle_timeout: Duration,
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
        let metrics = LbMetrics::register(registry);
        Invoker {
            dispatcher: dispatcher.count_attempts_in(metrics.placement_attempts()),
            capacity,
            max_request_body,
            body_idle_timeout: BODY_IDLE_TIMEOUT,
            metrics,
        }
    }

    /// Sets the longest pause in a request body that is still arriving
    /// (`FN_CLIENT_BODY_TIMEOUT`); past it the call ends with 408.
    #[must_use]
    pub fn with_body_idle_timeout(mut self, timeout: Duration) -> Self {
        self.body_idle_timeout = timeout;
        self
    }

    /// The call metrics, for requests refused before they reach the invoker.
    pub fn metrics(&self) -> &LbMetrics {
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
        // In flight from here; the record goes with the call to its response body.
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
        let (parts, mut body) = req.into_parts();
        let spec = match call_spec(&function, call_id, &parts) {
            Ok(spec) => spec,
            Err(e) => return Err(record.failed(e)),
        };
        let give_up = Instant::now() + spec.timeout + DEADLINE_GRACE;

        // The call counts towards its group's demand from arrival to the last byte, with its
        // share of an instance: one instance of a function with `concurrency = N` carries N.
        let share_mb = spec.memory_mb.div_ceil(u64::from(spec.concurrency.max(1)));
        let guard = self.capacity.assign(&spec.lb_group, share_mb);
        // A small body (declared, at most EARLY_BODY_MAX) is read now if it has arrived, to
        // go with the TryCall. A larger one streams once a runner has committed: holding
        // early chunks of it (slices of hyper's read buffer, which grows for large uploads)
        // cost the LB a fifth more memory under 0-1 MiB payloads, for no gain.
        let small = declared_len.is_some_and(|len| len <= EARLY_BODY_MAX as u64);
        let early = if small {
            match read_early(&mut body, self.max_request_body) {
                Ok(early) => early,
                Err(e) => return Err(record.failed(e.into_call_error(self.max_request_body))),
            }
        } else {
            EarlyBody {
                chunks: Vec::new(),
                complete: body.is_end_stream(),
            }
        };
        let placed = match self.dispatcher.place(&spec, &early).await {
            Ok(placed) => placed,
            Err(err) => return Err(record.failed(err)),
        };
        self.metrics.placed(placed.waited);
        let committed = Instant::now();
        tracing::debug!(
            runner = %placed.engaged.runner,
            attempts = placed.attempts,
            placement_ms = placed.waited.as_millis() as u64,
            slot_us = placed.engaged.slot_latency.as_micros() as u64,
            "call placed"
        );

        let mut engaged = placed.engaged;
        // Without a sender the whole body went with the TryCall.
        let pump = engaged.take_body_sender().map(|to_runner| {
            let limits = PumpLimits {
                max: self.max_request_body,
                idle: self.body_idle_timeout,
            };
            Box::pin(pump_request(body, to_runner, early, limits)) as Pump
        });
        let mut call = CallBody {
            runner: engaged.runner.clone(),
            engaged: Some(engaged),
            pump,
            timeout: spec.timeout,
            give_up,
            timer: None,
            max_request_body: self.max_request_body,
            record: Some(record),
            _guard: guard,
            eof: false,
            length: None,
            delivered: 0,
            finished: false,
            done: false,
            call_id: spec.id.clone(),
        };
        match call.await_head().await {
            Ok(mut head) => {
                let exec = committed
                    .elapsed()
                    .saturating_sub(head.cold_start.unwrap_or_default());
                self.metrics
                    .answered(&spec.app, &spec.function, exec, head.cold_start);
                if let Some(took) = head.cold_start {
                    self.dispatcher
                        .observe_cold_start(&spec.app, &spec.function, took);
                }
                // From the `String` itself: no copy.
                if let Ok(value) =
                    HeaderValue::try_from(server_timing(placed.waited, head.cold_start, exec))
                {
                    head.headers.append(SERVER_TIMING, value);
                }
                let bodiless = parts.method == http::Method::HEAD
                    || matches!(
                        head.status,
                        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
                    );
                // The length of the body the client gets: none after a bodiless head, whose
                // Content-Length describes a body that is not sent.
                call.length = head
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .filter(|_| !bodiless)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let body = if bodiless {
                    // The head is the answer (HEAD, 204, 304: hyper sends no body and would
                    // drop this one unread, cancelling the call); the function's body is read
                    // and dropped, so that the call ends as it would for GET (bounded by its
                    // deadline).
                    tokio::spawn(discard(call));
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync()
                } else {
                    BodyExt::boxed_unsync(call)
                };
                let mut response = Response::new(body);
                *response.status_mut() = head.status;
                *response.headers_mut() = head.headers;
                Ok(response)
            }
            Err(err) => Err(call.fail_head(err)),
        }
    }
}

/// Builds the wire call from the catalog entry and the client's request.
///
/// # Errors
/// What a runner would refuse in the client's request, as the client's error rather than
/// the function's: a request URL over [`MAX_URL_LEN`] (414), more headers than
/// [`MAX_HEADERS`] (431), a `Host` with control characters (400; a tab passes HTTP's own
/// checks), a target of a scheme other than http and https or with userinfo (400).
fn call_spec(
    function: &Function,
    id: String,
    parts: &http::request::Parts,
) -> Result<CallSpec, CallError> {
    // The request target's authority when it has one (absolute form, HTTP/2's
    // `:authority`), which a Host header must not override (RFC 9112, 3.2.2); else Host.
    let header_host = request_host(parts.version, &parts.headers)?;
    let (scheme, target_host) = request_target(&parts.uri)?;
    // HTTP/1.0 needs no Host; HTTP/2 without `:authority` is left to its `Host`.
    let host = target_host.or(header_host).unwrap_or("localhost");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    for value in parts.headers.get_all(header::TRANSFER_ENCODING) {
        let codings = value.to_str().unwrap_or("(not text)").split(',');
        if let Some(other) = codings
            .map(str::trim)
            .find(|c| !c.eq_ignore_ascii_case("chunked"))
        {
            return Err(CallError::UnsupportedTransferCoding(other.to_owned()));
        }
    }
    let url_len = scheme.len() + "://".len() + host.len() + path.len();
    if url_len > MAX_URL_LEN {
        return Err(CallError::UriTooLong {
            len: url_len,
            max: MAX_URL_LEN,
        });
    }
    // Headers the client's `Connection` names are about its connection to the LB, not for
    // the function (RFC 9110, 7.6.1).
    let nominated: Vec<HeaderName> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if forwardable(name) && !nominated.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if headers.len() > MAX_HEADERS {
        return Err(CallError::TooManyHeaders {
            count: headers.len(),
            max: MAX_HEADERS,
        });
    }
    Ok(CallSpec {
        id,
        app: function.app.clone(),
        function: function.name.clone(),
        route: function.route.clone(),
        method: parts.method.clone(),
        request_url: [scheme, "://", host, path].concat(),
        headers,
        memory_mb: function.memory_mb,
        concurrency: function.concurrency,
        timeout: function.timeout,
        idle_timeout: function.idle_timeout,
        command: function.command.clone(),
        image: function.image.clone(),
        config: function.config.clone(),
        lb_group: function.lb_group.clone(),
        deadline: std::time::Instant::now() + function.timeout,
    })
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    /// How long the call waited for a new instance; `None` when it ran warm.
    cold_start: Option<Duration>,
}

/// The request body still to send, as the call's pump.
type Pump = Pin<Box<dyn Future<Output = Result<(), PumpError>> + Send>>;

/// How the request body ended early.
#[derive(Debug)]
enum PumpError {
    TooLarge,
    Client(String),
    /// Nothing arrived for this long.
    Stalled(Duration),
}

/// The bounds of a request body's pump.
#[derive(Debug, Clone, Copy)]
struct PumpLimits {
    /// Most bytes.
    max: u64,
    /// Longest pause.
    idle: Duration,
}

/// Default longest pause in a request body that is still arriving (`FN_CLIENT_BODY_TIMEOUT`,
/// as nginx's `client_body_timeout`):
/// a client that stops sending would otherwise hold its call, and the function's instance,
/// until the call's own timeout, and be answered as if the function were slow. Time spent
/// waiting for the runner to take what has arrived does not count.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl PumpError {
    fn into_call_error(self, limit: u64) -> CallError {
        match self {
            PumpError::TooLarge => CallError::TooLarge { limit },
            PumpError::Client(e) => CallError::BadRequest(format!("reading the request body: {e}")),
            PumpError::Stalled(idle) => CallError::BodyStalled(idle),
        }
    }

    fn outcome(&self) -> CallOutcome {
        match self {
            PumpError::TooLarge => CallOutcome::TooLarge,
            PumpError::Client(_) | PumpError::Stalled(_) => CallOutcome::BadRequest,
        }
    }
}

/// One committed call from the response head on: the response body hyper sends to the
/// client. It reads the runner's messages when hyper asks for a frame, pumps what is left of
/// the request body, and enforces the call's deadline (one timer, armed only when the body
/// has to wait). Its outcome is recorded before the body's end reaches the client, so a
/// client that has read the whole answer finds the call already counted; a body dropped
/// before its end is a client gone, and resets the stream so the runner aborts the call.
struct CallBody {
    runner: String,
    /// `None` once handed to [`close`] at the end.
    engaged: Option<Engaged>,
    /// The rest of the request body, while it is being sent.
    pump: Option<Pump>,
    timeout: Duration,
    /// Past this the call is given up (the runner reports its own timeout before).
    give_up: Instant,
    /// The deadline's timer, armed the first time the body waits.
    timer: Option<Pin<Box<Sleep>>>,
    max_request_body: u64,
    /// Finished with the call's outcome; dropped unfinished, it counts a client gone.
    record: Option<CallRecord>,
    /// Released when the call ends, however it ends.
    _guard: CapacityGuard,
    /// The response body's last data frame has arrived.
    eof: bool,
    /// The response's `Content-Length`, when it has one: hyper stops reading the body once
    /// it has that many bytes.
    length: Option<u64>,
    /// Body bytes handed to hyper so far.
    delivered: u64,
    /// The runner sent `CallFinished`: only the stream's end is left.
    finished: bool,
    /// The body has ended (cleanly or not); nothing more is read.
    done: bool,
    /// The call's id, for what is logged from here on: hyper polls the body outside the
    /// call's span.
    call_id: String,
}

impl std::fmt::Debug for CallBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBody")
            .field("runner", &self.runner)
            .field("eof", &self.eof)
            .field("finished", &self.finished)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// What woke the call while it waits for the response head.
enum HeadEvent {
    Message(Result<Option<RunnerMsg>, tonic::Status>),
    Pumped(Result<(), PumpError>),
    Expired,
}

impl CallBody {
    fn failed(&self, details: impl Into<String>) -> CallError {
        CallError::RunnerFailed {
            runner: self.runner.clone(),
            details: details.into(),
        }
    }

    /// What the runner said of a call it ended, its words cut to a few KiB
    /// ([`fn_protocol::cut_details`]): they go to the client and the log.
    fn finished_error(&self, f: CallFinished) -> CallError {
        let kind = f.kind();
        let details = fn_protocol::cut_details(f.details);
        match kind {
            ErrorKind::Timeout => CallError::Timeout(self.timeout, details),
            kind => self.failed(format!("{kind:?}: {details}")),
        }
    }

    /// Waits for `CallResultStart` while the request body streams out.
    async fn await_head(&mut self) -> Result<Head, CallError> {
        loop {
            let Some(engaged) = self.engaged.as_mut() else {
                return Err(self.failed("the call's stream is gone"));
            };
            let pump = &mut self.pump;
            let pumping = pump.is_some();
            let event = tokio::select! {
                biased;
                msg = engaged.next() => HeadEvent::Message(msg),
                pumped = async {
                    match pump.as_mut() {
                        Some(pump) => pump.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if pumping => HeadEvent::Pumped(pumped),
                () = tokio::time::sleep_until(self.give_up) => HeadEvent::Expired,
            };
            match event {
                HeadEvent::Pumped(pumped) => {
                    self.pump = None;
                    pumped.map_err(|e| e.into_call_error(self.max_request_body))?;
                }
                HeadEvent::Expired => return Err(CallError::Timeout(self.timeout, String::new())),
                HeadEvent::Message(Ok(Some(m))) => {
                    return match m.body {
                        Some(runner_msg::Body::ResultStart(start)) => {
                            let cold = (start.cold_start_us > 0)
                                .then(|| Duration::from_micros(start.cold_start_us));
                            head_of(start.http)
                                .map(|head| Head {
                                    cold_start: cold,
                                    ..head
                                })
                                .map_err(|details| self.failed(details))
                        }
                        Some(runner_msg::Body::Finished(f)) => {
                            self.finished = true;
                            Err(self.finished_error(f))
                        }
                        _ => Err(self.failed("protocol error: expected CallResultStart")),
                    };
                }
                HeadEvent::Message(Ok(None)) => {
                    return Err(self.failed("the runner ended the stream without a result"));
                }
                HeadEvent::Message(Err(status)) => {
                    return Err(self.failed(format!("{}: {}", status.code(), words(&status))));
                }
            }
        }
    }

    /// Records a call that failed before its head and hands the error back.
    fn fail_head(mut self, err: CallError) -> CallError {
        self.done = true;
        match self.record.take() {
            Some(record) => record.failed(err),
            None => err,
        }
    }

    /// Ends the body with `outcome`; `why` cuts the client's response off (hyper ends it
    /// without its terminator, so the client can tell).
    fn end(
        &mut self,
        outcome: CallOutcome,
        why: Option<String>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.done = true;
        self.pump = None;
        if let Some(record) = self.record.take() {
            record.finish(outcome);
        }
        match why {
            Some(why) => {
                // The client's own errors at debug, where a client making them by the
                // thousand cannot fill the log (README, "Errors").
                if outcome.is_clients() {
                    tracing::debug!(call_id = %self.call_id, runner = %self.runner, reason = %why, "call failed after its response started; the answer is cut off");
                } else {
                    tracing::info!(call_id = %self.call_id, runner = %self.runner, reason = %why, "call failed after its response started; the answer is cut off");
                }
                Poll::Ready(Some(Err(why.into())))
            }
            None => Poll::Ready(None),
        }
    }

    /// The next frame for the client, or what ends the body.
    fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(pump) = self.pump.as_mut()
            && let Poll::Ready(pumped) = pump.as_mut().poll(cx)
        {
            self.pump = None;
            if let Err(e) = pumped {
                let why = match &e {
                    PumpError::TooLarge => format!(
                        "request body over the limit of {} bytes",
                        self.max_request_body
                    ),
                    PumpError::Client(e) => format!("reading the request body: {e}"),
                    PumpError::Stalled(idle) => format!("the request body stalled for {idle:?}"),
                };
                return self.end(e.outcome(), Some(why));
            }
        }
        loop {
            let Some(engaged) = self.engaged.as_mut() else {
                return self.end(
                    CallOutcome::RunnerFailed,
                    Some("the call's stream is gone".into()),
                );
            };
            let msg = match engaged.poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(msg))) => msg,
                // The stream's end after `CallFinished{success}` and the body's eof.
                Poll::Ready(None) if self.finished => return self.end(CallOutcome::Success, None),
                Poll::Ready(None) => {
                    let why = "the runner ended the stream before CallFinished".to_owned();
                    return self.end(CallOutcome::RunnerFailed, Some(why));
                }
                Poll::Ready(Some(Err(status))) => {
                    let why = format!("runner {} failed: {}", self.runner, words(&status));
                    return self.end(CallOutcome::RunnerFailed, Some(why));
                }
            };
            match msg.body {
                Some(runner_msg::Body::Data(frame)) if !self.eof && !self.finished => {
                    self.eof = frame.eof;
                    self.delivered += frame.data.len() as u64;
                    if let Some(length) = self.length
                        && (self.delivered > length || self.eof && self.delivered < length)
                    {
                        // hyper would cut the client's answer off at either; say why.
                        let why = format!(
                            "the answer's body ({}{} bytes) does not match its Content-Length of {length}",
                            if self.eof { "" } else { "at least " },
                            self.delivered
                        );
                        return self.end(CallOutcome::RunnerFailed, Some(why));
                    }
                    if !frame.data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(frame.data))));
                    }
                }
                Some(runner_msg::Body::Finished(f)) if f.success && self.eof && !self.finished => {
                    // Only the stream's end is left; it normally came with this message.
                    self.finished = true;
                }
                Some(runner_msg::Body::Finished(f)) if !self.finished => {
                    self.finished = true;
                    let err = self.finished_error(f);
                    return self.end(CallOutcome::from(&err), Some(err.to_string()));
                }
                _ => {
                    let why = "protocol error: unexpected message in the response".to_owned();
                    return self.end(CallOutcome::RunnerFailed, Some(why));
                }
            }
        }
        if self.finished {
            // The answer is complete; the stream's end is late. Don't hold the client for
            // it: `close` reads it in the background.
            return self.end(CallOutcome::Success, None);
        }
        let give_up = self.give_up;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(give_up)));
        if timer.as_mut().poll(cx).is_ready() {
            return self.end(
                CallOutcome::Timeout,
                Some("the call passed its timeout".into()),
            );
        }
        Poll::Pending
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        this.poll_call(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for CallBody {
    fn drop(&mut self) {
        let Some(engaged) = self.engaged.take() else {
            return;
        };
        match self.record.take() {
            // hyper stops reading a body framed by its Content-Length at its last byte: the
            // client has the whole answer, and the runner's `CallFinished` (normally already
            // here) settles how the call ended.
            Some(record) if !self.done && (self.eof || self.length == Some(self.delivered)) => {
                let call_id = std::mem::take(&mut self.call_id);
                let mut settling = Box::pin(settle(engaged, record, call_id));
                if settling.as_mut().now_or_never().is_none() {
                    tokio::spawn(settling);
                }
            }
            // Otherwise an unfinished record counts the client as gone when it drops.
            _ => close(engaged, self.finished, &self.call_id),
        }
    }
}

/// Reads what follows a delivered body (an empty `eof` frame, `CallFinished`, the stream's
/// end), bounded by [`FINISH_BOUND`], and records the call's outcome.
async fn settle(mut engaged: Engaged, record: CallRecord, call_id: String) {
    let next = async {
        loop {
            match engaged.next().await {
                Ok(Some(RunnerMsg {
                    body: Some(runner_msg::Body::Data(frame)),
                })) if frame.data.is_empty() => {}
                other => return other,
            }
        }
    };
    let outcome = match tokio::time::timeout(FINISH_BOUND, next).await {
        Ok(Ok(Some(RunnerMsg {
            body: Some(runner_msg::Body::Finished(f)),
        }))) if f.success => CallOutcome::Success,
        Ok(Ok(Some(RunnerMsg {
            body: Some(runner_msg::Body::Finished(f)),
        }))) if f.kind() == ErrorKind::Timeout => CallOutcome::Timeout,
        other => {
            tracing::info!(call_id, runner = %engaged.runner, answer = %instead_of_finished(&other), "no CallFinished after the body's end");
            record.finish(CallOutcome::RunnerFailed);
            return; // dropping the stream resets it
        }
    };
    record.finish(outcome);
    engaged.finish(FINISH_BOUND).await;
}

/// What came instead of `CallFinished` after a body's end, for the log: a message's kind
/// (a data frame's length, a failure's kind), never its contents, which may be a 4 MiB data
/// frame; a status's message is cut and escaped ([`words`]).
fn instead_of_finished(
    got: &Result<Result<Option<RunnerMsg>, tonic::Status>, tokio::time::error::Elapsed>,
) -> String {
    match got {
        Err(_) => format!("nothing within {FINISH_BOUND:?}"),
        Ok(Err(status)) => format!("error status {}: {}", status.code(), words(status)),
        Ok(Ok(None)) => "the stream's end".into(),
        Ok(Ok(Some(msg))) => match &msg.body {
            None => "a message without a body".into(),
            Some(runner_msg::Body::Acknowledged(_)) => "CallAcknowledged".into(),
            Some(runner_msg::Body::ResultStart(_)) => "CallResultStart".into(),
            Some(runner_msg::Body::Data(frame)) => format!(
                "a data frame of {} bytes (eof {})",
                frame.data.len(),
                frame.eof
            ),
            Some(runner_msg::Body::Finished(f)) => {
                format!("CallFinished without success ({:?})", f.kind())
            }
        },
    }
}

/// Lets go of a call's stream. A call the runner finished ends its stream cleanly: the
/// stream's end is read now if it has arrived, else in the background (bounded). Any other
/// call is cancelled: dropping the stream resets it, and the runner aborts the function.
fn close(mut engaged: Engaged, finished: bool, call_id: &str) {
    if !finished {
        tracing::debug!(call_id, runner = %engaged.runner, "cancelling the call's stream");
        return;
    }
    if engaged.finish_now().is_none() {
        tokio::spawn(async move { engaged.finish(FINISH_BOUND).await });
    }
}

/// The `Server-Timing` header every answer carries.
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// `placement;dur=<ms>, start;dur=<ms>, exec;dur=<ms>` (W3C Server Timing): the wait for a
/// runner's commit, the cold start (only when the call started an instance), and the time
/// from the commit to the function's response head without the cold start. Names no runner.
fn server_timing(placement: Duration, cold_start: Option<Duration>, exec: Duration) -> String {
    let mut out = String::with_capacity(80);
    // Milliseconds to the microsecond, in integers and without `write!`: float formatting
    // cost as much as the rest of building the response head, and the formatter's
    // machinery as much again as these few digits.
    let mut metric = |name: &str, d: Duration| {
        let us = d.as_micros();
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str(";dur=");
        out.push_str(itoa::Buffer::new().format(us / 1000));
        out.push('.');
        let micros = us % 1000;
        out.push_str(match micros {
            0..10 => "00",
            10..100 => "0",
            _ => "",
        });
        out.push_str(itoa::Buffer::new().format(micros));
    };
    metric("placement", placement);
    if let Some(start) = cold_start {
        metric("start", start);
    }
    metric("exec", exec);
    out
}

/// A runner's error status's message, cut to a few KiB ([`fn_protocol::cut_details`]).
fn words(status: &tonic::Status) -> String {
    fn_protocol::cut_details(status.message().to_owned())
}

/// Translates the runner's response head; `Err` when it is unusable.
fn head_of(meta: Option<HttpRespMeta>) -> Result<Head, String> {
    let meta = meta.ok_or("CallResultStart without a status")?;
    // 100 to 599 (RFC 9110 15): `StatusCode` takes up to 999, which no client expects
    // (the runner holds FDKs to 200-599; a runner that sends more breaks the contract).
    let status = u16::try_from(meta.status_code)
        .ok()
        .filter(|s| (100..600).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("invalid status {} from the function", meta.status_code))?;
    if status.is_informational() {
        // hyper would send a bare 1xx (or an empty 500 in its place) and close.
        return Err(format!(
            "status {} from the function: an informational status cannot be a call's answer",
            status.as_u16()
        ));
    }
    if meta.headers.len() > MAX_HEADERS {
        // As many as a request may carry; a map this size is also far below http's limit,
        // past which building it would panic.
        return Err(format!(
            "{} response headers from the function; at most {MAX_HEADERS}",
            meta.headers.len()
        ));
    }
    // Room for the two the lb-agent adds, `Server-Timing` and `Fn-Call-Id`: a full map
    // would grow (rehash) for them.
    let mut headers = HeaderMap::with_capacity(meta.headers.len() + 2);
    for h in meta.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&h.name),
            // A slice of the runner's message: no copy.
            HeaderValue::from_maybe_shared(h.value),
        ) else {
            tracing::debug!(header = %String::from_utf8_lossy(&h.name), "dropping an invalid response header");
            continue;
        };
        if name == header::CONTENT_LENGTH {
            // Framing for the client: one valid length (digits alone: hyper writes a
            // HEAD's as it is), or none (then chunked).
            if fn_protocol::content_length(value.as_bytes()).is_some() {
                headers.insert(name, value);
            }
            continue;
        }
        if forwardable(&name) {
            headers.append(name, value);
        }
    }
    Ok(Head {
        status,
        headers,
        cold_start: None,
    })
}

/// Reads a call's response body to its end and drops it (a HEAD request's call).
async fn discard(mut call: CallBody) {
    while let Some(frame) = call.frame().await {
        if frame.is_err() {
            break;
        }
    }
}

/// Takes what has already arrived of the request body, without waiting: at most
/// [`EARLY_BODY_MAX`] bytes, and the whole body when it is complete within them.
fn read_early<B>(body: &mut B, max: u64) -> Result<EarlyBody, PumpError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut early = EarlyBody::default();
    let mut total: u64 = 0;
    loop {
        if body.is_end_stream() {
            early.complete = true;
            break;
        }
        if total >= EARLY_BODY_MAX as u64 {
            break;
        }
        match body.frame().now_or_never() {
            None => break,
            Some(None) => {
                early.complete = true;
                break;
            }
            Some(Some(Err(e))) => return Err(PumpError::Client(e.to_string())),
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not forwarded
                };
                total += data.len() as u64;
                if total > max {
                    return Err(PumpError::TooLarge);
                }
                if !data.is_empty() {
                    early.chunks.push(data);
                }
            }
        }
    }
    Ok(early)
}

/// What the request target says of the URL the function sees (Fn's
/// `Fn-Http-Request-Url`): its scheme, and its host and port where it names them (an
/// absolute-form target, HTTP/2's `:scheme` and `:authority`).
///
/// The scheme is the one the target names (`https` where a proxy that ended TLS says so),
/// as Fn's Go server kept an HTTP/1.1 absolute-form target's; else `http`, since the LB
/// itself takes no TLS. HTTP/2 gives `:scheme` only with `:authority` (the h2 crate drops
/// it otherwise).
///
/// # Errors
/// A scheme other than http and https (400: the LB is no proxy for it); an authority with
/// userinfo (`user:pw@host`, 400: RFC 9110, 4.2.4).
pub(crate) fn request_target(uri: &http::Uri) -> Result<(&'static str, Option<&str>), CallError> {
    let scheme = match uri.scheme() {
        None => "http",
        // In any case (RFC 9110, 4.2.3): an HTTP/1.1 target's is spelt in lower case as it
        // is parsed, an HTTP/2 `:scheme` is kept as the client sent it.
        Some(scheme) if scheme.as_str().eq_ignore_ascii_case("http") => "http",
        Some(scheme) if scheme.as_str().eq_ignore_ascii_case("https") => "https",
        Some(other) => return Err(CallError::UnsupportedScheme(other.as_str().to_owned())),
    };
    let host = match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            return Err(CallError::UserinfoInTarget);
        }
        authority => authority.map(http::uri::Authority::as_str),
    };
    Ok((scheme, host))
}

/// The request's `Host` header, checked as RFC 9112 (3.2) asks of a server whatever the
/// request's target: at most one, a host and port, and present on HTTP/1.1 (also in the
/// absolute form, whose authority then wins: see `call_spec`). `None` where there is none
/// and none is needed (HTTP/1.0, HTTP/2).
///
/// # Errors
/// A 400 naming what is wrong.
pub(crate) fn request_host(
    version: http::Version,
    headers: &HeaderMap,
) -> Result<Option<&str>, CallError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(CallError::BadRequest(
            "more than one Host header (RFC 9112, 3.2)".into(),
        ));
    }
    match first {
        Some(value) => host_of(value).map(Some),
        None if version == http::Version::HTTP_11 => Err(CallError::BadRequest(
            "no Host header: an HTTP/1.1 request must name its host (RFC 9112, 3.2)".into(),
        )),
        None => Ok(None),
    }
}

/// The host a `Host` header names, as the function's request URL will carry it: a host and
/// an optional port (RFC 9110, 7.2), nothing else. A value holding `/`, `?`, `#`, `@` or
/// spaces would otherwise reshape that URL (`Host: x/admin?a=` made the function see the
/// path `/admin`), so it is refused with 400, as RFC 9112 (3.2) asks for an invalid Host.
fn host_of(value: &HeaderValue) -> Result<&str, CallError> {
    // The characters of a registered name or an IP literal (RFC 3986, 3.2.2), and `:` for
    // the port; checked by hand, where parsing an `Authority` would copy the value per call.
    const ALLOWED: &[u8] = b"-._~!$&'()*+,;=:[]%";
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || ALLOWED.contains(b))
    {
        return Err(CallError::BadRequest(
            "the Host header is not a host and port".into(),
        ));
    }
    // ASCII throughout, so this cannot fail.
    value
        .to_str()
        .map_err(|_| CallError::BadRequest("the Host header is not a host and port".into()))
}

/// Streams the client's request body to the runner: the `early` chunks, then exactly the
/// bytes read, split at [`MAX_FRAME_BYTES`], then `eof`. Stops at `max` bytes.
async fn pump_request<B>(
    mut body: B,
    to_runner: BodySender,
    early: EarlyBody,
    limits: PumpLimits,
) -> Result<(), PumpError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let mut total: u64 = 0;
    for chunk in early.chunks {
        total += chunk.len() as u64;
        if to_runner.send(chunk, false).await.is_err() {
            return Ok(()); // the runner answered early or failed: its outcome says which
        }
    }
    if !early.complete {
        // Armed once per pause allowed, not per frame: when it fires it checks when the
        // body last moved, and sleeps again for what is left.
        let mut moved = tokio::time::Instant::now();
        let mut stall = Box::pin(tokio::time::sleep_until(moved + limits.idle));
        loop {
            let frame = tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = stall.as_mut() => {
                    if moved.elapsed() >= limits.idle {
                        return Err(PumpError::Stalled(limits.idle));
                    }
                    stall.as_mut().reset(moved + limits.idle);
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| PumpError::Client(e.to_string()))?;
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            total += data.len() as u64;
            if total > limits.max {
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
            moved = tokio::time::Instant::now();
        }
    }
    if to_runner.send(Bytes::new(), true).await.is_err() {
        tracing::debug!("runner no longer reads the request body");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use std::path::Path;

    /// A runner's 4 MiB data frame where `CallFinished` should be is logged as its kind and
    /// length, not its contents (its Debug was some 20 MB of text in one log line).
    #[test]
    fn what_came_instead_of_call_finished_is_logged_in_a_few_words() {
        let frame = RunnerMsg {
            body: Some(runner_msg::Body::Data(fn_protocol::runner::DataFrame {
                data: vec![b'\n'; 4 * 1024 * 1024].into(),
                eof: false,
            })),
        };
        let shown = instead_of_finished(&Ok(Ok(Some(frame))));
        assert_eq!(shown, "a data frame of 4194304 bytes (eof false)");
        let status = tonic::Status::unavailable(format!("gone\n{}", "x".repeat(1 << 20)));
        let shown = instead_of_finished(&Ok(Err(status)));
        assert!(
            shown.len() < 2 * fn_protocol::MAX_DETAILS_SHOWN,
            "{}",
            shown.len()
        );
        assert!(!shown.contains('\n'), "{shown}");
    }

    /// What the catalog takes at its limits, a runner takes on every call; one step past a
    /// limit, the catalog refuses it at load instead of every call failing with 500.
    #[test]
    fn a_function_the_catalog_accepts_is_a_call_the_runner_accepts() {
        let config: String = (0..fn_protocol::call::MAX_CONFIG_ENTRIES)
            .map(|i| format!("K{i} = \"v{i} \\t tab\"\n"))
            .collect();
        // A function given as an image, or (image "-") as a command: one or the other.
        let entry = |route: &str, image: &str, config: &str| {
            let source = if image == "-" {
                "command = [\"fn-x\", \"--flag=\\u00e9\"]".to_owned()
            } else {
                format!("image = \"{image}\"")
            };
            format!(
                "[[functions]]\napp = \"a\"\nname = \"f\"\nroute = \"{route}\"\n\
                 {source}\n[functions.config]\n{config}"
            )
        };
        let longest_route = format!("/{}", "r".repeat(fn_protocol::call::MAX_NAME_LEN - 1));
        let longest_image = format!("reg.example/{}:1", "i".repeat(256 - 14));
        let text = entry(&longest_route, &longest_image, &config);
        let catalog = Catalog::parse(Path::new("c.toml"), &text).expect("at the limits");
        let function = catalog.by_name("a", "f").expect("function");
        let request = http::Request::post("http://lb.test/r/a/x?q=1")
            .header(header::HOST, "lb.test")
            .body(())
            .expect("request");
        let (parts, ()) = request.into_parts();
        let spec = call_spec(&function, "01J0000000000000000000000".into(), &parts).expect("spec");
        let wire = fn_protocol::runner::Call::from(&spec);
        let received = CallSpec::try_from(wire).expect("the runner takes it");
        assert_eq!(received.route, longest_route);
        assert_eq!(received.image.as_deref(), Some(longest_image.as_str()));
        assert_eq!(received.config.len(), fn_protocol::call::MAX_CONFIG_ENTRIES);
        let catalog = Catalog::parse(Path::new("c.toml"), &entry("/y", "-", &config))
            .expect("a command at the limits");
        let function = catalog.by_name("a", "f").expect("function");
        let spec = call_spec(&function, "01J0000000000000000000001".into(), &parts).expect("spec");
        let received = CallSpec::try_from(fn_protocol::runner::Call::from(&spec))
            .expect("the runner takes it");
        assert_eq!(received.command, ["fn-x", "--flag=\u{e9}"]);

        let one_more = format!("{config}K_EXTRA = \"x\"\n");
        let past = [
            (
                entry(&format!("{longest_route}r"), "img", ""),
                "field `route`",
            ),
            (
                entry("/x", &format!("{longest_image}1"), ""),
                "field `image`",
            ),
            (entry("/x", "", ""), "field `image`"),
            (entry("/x", "img", &one_more), "field `config`"),
            (entry("/x", "img", "K = \"a\\u0000b\"\n"), "field `config`"),
            (
                entry("/x", "-", "").replace("--flag=", "--fl\\u0000ag="),
                "field `command`",
            ),
            (entry("/x", "im\\u0007g", ""), "field `image`"),
        ];
        for (text, field) in past {
            let err = Catalog::parse(Path::new("c.toml"), &text).expect_err(field);
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn a_target_gives_its_scheme_and_host_and_no_userinfo() {
        let target = |uri: &str| {
            let uri: http::Uri = uri.parse().expect("a URI");
            request_target(&uri).map(|(scheme, host)| (scheme, host.map(str::to_owned)))
        };
        assert_eq!(target("/r/a/x").ok(), Some(("http", None)));
        assert_eq!(
            target("https://h.test:8443/r/a/x").ok(),
            Some(("https", Some("h.test:8443".into())))
        );
        assert_eq!(
            target("HTTP://h.test/r/a/x?to=a@b").ok(),
            Some(("http", Some("h.test".into())))
        );
        assert!(matches!(
            target("http://u:pw@h.test/r/a/x"),
            Err(CallError::UserinfoInTarget)
        ));
        assert!(matches!(
            target("https://u@h.test/"),
            Err(CallError::UserinfoInTarget)
        ));
        assert!(matches!(
            target("ftp://h.test/r/a/x"),
            Err(CallError::UnsupportedScheme(s)) if s == "ftp"
        ));
    }

    /// A runner's answer head with `status` and `headers`.
    fn meta(status: u32, headers: &[(&str, &str)]) -> Option<HttpRespMeta> {
        Some(HttpRespMeta {
            status_code: status,
            headers: headers
                .iter()
                .map(|(name, value)| fn_protocol::runner::Header {
                    name: Bytes::copy_from_slice(name.as_bytes()),
                    value: Bytes::copy_from_slice(value.as_bytes()),
                })
                .collect(),
        })
    }

    /// A runner's `Content-Length` reaches the client only as digits: hyper writes a HEAD's
    /// as it is, and `"+5".parse::<u64>()` succeeds.
    #[test]
    fn a_content_length_from_a_runner_is_digits_alone() {
        let length = |value: &str| {
            let head = head_of(meta(200, &[("content-length", value)])).expect("a head");
            head.headers
                .get(header::CONTENT_LENGTH)
                .map(|v| v.to_str().expect("ascii").to_owned())
        };
        assert_eq!(length("5").as_deref(), Some("5"));
        for bad in ["+5", "-5", " 5", "5 ", "five", ""] {
            assert_eq!(length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_timing_spells_milliseconds_to_the_microsecond() {
        let placement = Duration::from_micros(1_500);
        let exec = Duration::from_nanos(12_345_678);
        assert_eq!(
            server_timing(placement, None, exec),
            "placement;dur=1.500, exec;dur=12.345"
        );
        assert_eq!(
            server_timing(Duration::ZERO, Some(Duration::from_secs(2)), exec),
            "placement;dur=0.000, start;dur=2000.000, exec;dur=12.345"
        );
        // The microseconds keep their three places.
        assert_eq!(
            server_timing(
                Duration::from_micros(7),
                Some(Duration::from_micros(1_042)),
                Duration::from_micros(20_010)
            ),
            "placement;dur=0.007, start;dur=1.042, exec;dur=20.010"
        );
    }
}
