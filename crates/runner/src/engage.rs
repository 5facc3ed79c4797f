//! The `RunnerProtocol` gRPC service: one function call per `Engage` stream.
//!
//! Sequence (see `proto/runner.proto`): `TryCall` → `CallAcknowledged` → request body
//! `DataFrame`s (last with `eof`) → `CallResultStart` → response body `DataFrame`s →
//! `CallFinished`. Each stream is handled by its own task, tracked so that a drain can wait
//! for it. Everything from the LB is untrusted: a wrong first message, data after `eof`, a
//! stream that breaks off or a message too large all end that stream with a clear
//! `CallFinished{kind: PROTOCOL}` (or nothing, when the LB is gone) and never disturb other
//! streams.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fn_protocol::CallSpec;
use fn_protocol::runner::{
    self, CallAcknowledged, CallFinished, CallResultStart, ClientMsg, DataFrame, ErrorKind,
    HttpRespMeta, RefusalReason, RunnerMsg, RunnerStatus, client_msg, runner_msg,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::driver::{DriverError, FunctionRequest, InstanceSpec};
use crate::metrics::RunnerMetrics;
use crate::pool::{Pool, Refusal, Reservation};

/// Largest data frame the runner sends; larger function output is split.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// How long a stream still waiting for its `TryCall` when a drain starts may take to send it.
const DRAINING_FIRST_MESSAGE_GRACE: Duration = Duration::from_millis(500);

/// Tunables of the Engage service.
#[derive(Debug, Clone)]
pub struct EngageConfig {
    /// How long a new stream may take to send its `TryCall`.
    pub first_message_timeout: Duration,
    /// How long the runner waits for the LB to take the last message of a stream (a
    /// refusal or `CallFinished`). The call's own messages are bounded by its deadline; this
    /// bounds what comes after, so an LB that stopped reading cannot hold a stream task —
    /// and with it a drain — forever.
    pub final_send_timeout: Duration,
}

impl Default for EngageConfig {
    fn default() -> Self {
        EngageConfig {
            first_message_timeout: Duration::from_secs(10),
            final_send_timeout: Duration::from_secs(10),
        }
    }
}

/// The runner's gRPC service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RunnerService {
    pool: Arc<Pool>,
    tracker: TaskTracker,
    /// Cancelled when the drain starts, so that streams still waiting for their `TryCall`
    /// are refused after a short grace instead of holding the drain until their
    /// first-message timeout.
    draining: CancellationToken,
    config: EngageConfig,
    metrics: RunnerMetrics,
}

impl RunnerService {
    /// The service over `pool`; its metrics ([`RunnerMetrics`], including the pool's
    /// figures) are registered in `registry`.
    pub fn new(
        pool: Arc<Pool>,
        config: EngageConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let metrics = RunnerMetrics::register(registry, &pool);
        RunnerService {
            pool,
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            config,
            metrics,
        }
    }

    /// The pool behind the service.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Refuses new calls from now on, then waits until every call in flight has finished
    /// and every stream has ended. A stream that has not sent its `TryCall` yet is refused
    /// as draining; one whose LB stopped reading is given up on after
    /// [`EngageConfig::final_send_timeout`].
    pub async fn drain(&self) {
        self.pool.drain();
        self.draining.cancel();
        tracing::info!(
            in_flight = self.pool.stats().calls_in_flight,
            "draining: refusing new calls"
        );
        self.pool.wait_idle().await;
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!("drained: no calls in flight");
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> runner::runner_protocol_server::RunnerProtocolServer<Self> {
        runner::runner_protocol_server::RunnerProtocolServer::new(self)
    }
}

type EngageStream = Pin<Box<dyn Stream<Item = Result<RunnerMsg, Status>> + Send>>;

#[tonic::async_trait]
impl runner::runner_protocol_server::RunnerProtocol for RunnerService {
    type EngageStream = EngageStream;

    async fn engage(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::EngageStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let out = Outbound {
            tx,
            final_send_timeout: self.config.final_send_timeout,
            metrics: self.metrics.clone(),
        };
        let this = self.clone();
        self.tracker
            .spawn(async move { this.handle_stream(inbound, out).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _request: Request<()>) -> Result<Response<RunnerStatus>, Status> {
        let s = self.pool.stats();
        Ok(Response::new(RunnerStatus {
            calls_in_flight: s.calls_in_flight,
            capacity_total_mb: s.total_mb,
            capacity_committed_mb: s.committed_mb,
            hot_instances: s.hot_instances,
            draining: s.draining,
        }))
    }
}

/// The runner's half of the stream. A failed send means the LB went away.
struct Outbound {
    tx: mpsc::Sender<Result<RunnerMsg, Status>>,
    /// Bound for the stream's last message; see [`EngageConfig::final_send_timeout`].
    final_send_timeout: Duration,
    /// Counts refusals (here, where every refusal passes) and call outcomes.
    metrics: RunnerMetrics,
}

#[derive(Debug)]
struct LbGone;

impl Outbound {
    async fn send(&self, body: runner_msg::Body) -> Result<(), LbGone> {
        self.tx
            .send(Ok(RunnerMsg { body: Some(body) }))
            .await
            .map_err(|_| LbGone)
    }

    /// Resolves when the LB is gone: its stream was cancelled or reset, so nobody will read
    /// the call's answer.
    async fn lb_gone(&self) {
        self.tx.closed().await;
    }

    /// Sends the stream's last message, waiting at most `final_send_timeout` for the LB to
    /// make room for it. An LB that reads nothing for that long is treated as gone.
    async fn send_last(&self, body: runner_msg::Body) -> Result<(), LbGone> {
        match tokio::time::timeout(self.final_send_timeout, self.send(body)).await {
            Ok(sent) => sent,
            Err(_elapsed) => {
                tracing::info!(
                    bound = ?self.final_send_timeout,
                    "the LB does not read the stream; giving up on its last message"
                );
                Err(LbGone)
            }
        }
    }

    /// Ends the call with `CallFinished`. If the LB is gone there is nobody to tell; the
    /// outcome is in the log either way.
    async fn finish(&self, kind: ErrorKind, details: impl Into<String>) {
        let msg = runner_msg::Body::Finished(CallFinished {
            success: kind == ErrorKind::None,
            details: details.into(),
            kind: kind as i32,
        });
        if self.send_last(msg).await.is_err() {
            tracing::debug!(?kind, "LB gone before CallFinished");
        }
    }

    /// Answers `CallAcknowledged{committed: false}`.
    async fn refuse(&self, reason: RefusalReason, details: String) {
        tracing::debug!(?reason, %details, "call refused");
        self.metrics.refused(reason);
        let msg = runner_msg::Body::Acknowledged(CallAcknowledged {
            committed: false,
            details,
            slot_allocation_latency_us: 0,
            refusal: reason as i32,
        });
        if self.send_last(msg).await.is_err() {
            tracing::debug!("LB gone before the refusal");
        }
    }
}

/// How a committed call ended, as reported in `CallFinished`.
#[derive(Debug)]
struct Outcome {
    kind: ErrorKind,
    details: String,
}

impl Outcome {
    fn ok() -> Self {
        Outcome {
            kind: ErrorKind::None,
            details: String::new(),
        }
    }
    fn of(kind: ErrorKind, details: impl Into<String>) -> Self {
        Outcome {
            kind,
            details: details.into(),
        }
    }
}

impl From<DriverError> for Outcome {
    fn from(err: DriverError) -> Self {
        let kind = match &err {
            DriverError::Invalid(_) | DriverError::Start(_) => ErrorKind::Start,
            DriverError::Crashed(_) => ErrorKind::Crashed,
            DriverError::Function(_) => ErrorKind::Function,
        };
        Outcome::of(kind, err.to_string())
    }
}

/// What the inbound half of a stream did wrong or how it ended early.
#[derive(Debug)]
enum InboundError {
    /// The LB broke the sequence; tell it so.
    Protocol(String),
    /// The LB cancelled the stream or its connection broke; nobody to tell.
    Gone(String),
}

impl RunnerService {
    async fn handle_stream(self, mut inbound: Streaming<ClientMsg>, out: Outbound) {
        // 1. The first message must be a TryCall, and must come soon. Once a drain starts,
        // a stream gets only a short grace for it (its TryCall is then refused as draining,
        // as the answer to it), so that a silent stream does not hold the drain.
        let first_message = self.config.first_message_timeout;
        let first = tokio::select! {
            biased;
            first = tokio::time::timeout(first_message, inbound.message()) => first,
            () = self.draining.cancelled() => {
                // `Streaming::message` is cancel-safe: nothing read above is lost.
                let grace = DRAINING_FIRST_MESSAGE_GRACE;
                match tokio::time::timeout(grace, inbound.message()).await {
                    Ok(first) => Ok(first),
                    Err(_elapsed) => {
                        let details = Refusal::Draining.to_string();
                        out.refuse(RefusalReason::Draining, details).await;
                        return;
                    }
                }
            }
        };
        let call = match first {
            Err(_) => {
                out.finish(
                    ErrorKind::Protocol,
                    "no TryCall within the first-message timeout",
                )
                .await;
                return;
            }
            Ok(Err(status)) => {
                tracing::debug!(error = %status, "engage stream failed before TryCall");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(ClientMsg {
                body: Some(client_msg::Body::TryCall(try_call)),
            }))) => try_call.call,
            Ok(Ok(Some(_))) => {
                out.finish(
                    ErrorKind::Protocol,
                    "protocol error: the first message must be TryCall",
                )
                .await;
                return;
            }
        };
        let Some(call) = call else {
            out.refuse(
                RefusalReason::Invalid,
                "invalid call: TryCall without a call".into(),
            )
            .await;
            return;
        };

        // 2. Validate; refuse what can never run here.
        let spec = match CallSpec::try_from(call) {
            Ok(spec) => spec,
            Err(e) => {
                out.refuse(RefusalReason::Invalid, format!("invalid call: {e}"))
                    .await;
                return;
            }
        };
        let span = tracing::info_span!("call", call_id = %spec.id, app = %spec.app, function = %spec.function, lb_group = %spec.lb_group);
        self.run_call(spec, inbound, out).instrument(span).await;
    }

    async fn run_call(&self, spec: CallSpec, inbound: Streaming<ClientMsg>, out: Outbound) {
        let instance_spec = InstanceSpec::from(&spec);
        if let Err(e) = self.pool.driver().check(&instance_spec) {
            out.refuse(RefusalReason::Invalid, e.to_string()).await;
            return;
        }
        if spec.remaining().is_zero() {
            out.refuse(
                RefusalReason::Invalid,
                "invalid call: its deadline has passed".into(),
            )
            .await;
            return;
        }

        // 3. Capacity gate.
        let started = Instant::now();
        let reservation = match self.pool.admit(instance_spec) {
            Ok(r) => r,
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::Busy { .. } => RefusalReason::Busy,
                    Refusal::Draining => RefusalReason::Draining,
                    Refusal::TooLarge { .. } => RefusalReason::Invalid,
                };
                out.refuse(reason, refusal.to_string()).await;
                return;
            }
        };
        let latency = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let ack = runner_msg::Body::Acknowledged(CallAcknowledged {
            committed: true,
            details: String::new(),
            slot_allocation_latency_us: latency,
            refusal: RefusalReason::Unspecified as i32,
        });
        if out.send(ack).await.is_err() {
            // LB gone before it learnt of the commit; the reservation drops.
            out.metrics.call_ended(None);
            return;
        }
        tracing::debug!(reused = reservation.reused(), "call committed");

        // 4. Run the call while pumping the request body, under the call's deadline.
        let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let pump = pump_inbound(inbound, body_tx);
        let deadline = tokio::time::Instant::now() + spec.remaining();
        let idle_timeout = spec.idle_timeout;
        let execute = tokio::time::timeout_at(
            deadline,
            execute(reservation, &spec, ReceiverStream::new(body_rx), &out),
        );
        tokio::pin!(pump);
        // Boxed, not stack-pinned, so that it can be dropped before the outcome is sent.
        let mut execute = Box::pin(execute);
        let mut pump_done = false;
        let outcome = loop {
            tokio::select! {
                pumped = &mut pump, if !pump_done => match pumped {
                    Ok(()) => pump_done = true,
                    Err(InboundError::Protocol(msg)) => {
                        break Some(Outcome::of(ErrorKind::Protocol, format!("protocol error: {msg}")));
                    }
                    Err(InboundError::Gone(msg)) => {
                        tracing::info!(reason = %msg, "LB stream ended mid-call; aborting the call");
                        break None;
                    }
                },
                // Once the body is in, nothing is read from the LB any more: its going away
                // (cancelled call, client gone) shows as the answer's receiver closing.
                () = out.lb_gone(), if pump_done => {
                    tracing::info!("LB went away mid-call; aborting the call");
                    break None;
                }
                executed = &mut execute => break match executed {
                    Err(_elapsed) => Some(Outcome::of(
                        ErrorKind::Timeout,
                        format!("call exceeded its timeout of {:?}", spec.timeout),
                    )),
                    Ok(Ok(Executed { reservation, outcome })) => {
                        if outcome.kind == ErrorKind::None {
                            reservation.finish_ok(idle_timeout);
                        }
                        Some(outcome)
                    }
                    Ok(Err(LbGone)) => None,
                },
            }
        };
        // Whatever `execute` still holds (a reservation of an aborted call) drops here,
        // killing the instance and releasing the memory, before the LB hears the outcome.
        drop(execute);
        // Counted before the LB hears the outcome, so what it saw is already in the figures.
        out.metrics
            .call_ended(outcome.as_ref().map(|outcome| outcome.kind));
        if let Some(outcome) = outcome {
            match outcome.kind {
                ErrorKind::None => tracing::debug!("call finished"),
                kind => tracing::info!(?kind, details = %outcome.details, "call failed"),
            }
            out.finish(outcome.kind, outcome.details).await;
        }
    }
}

struct Executed {
    reservation: Reservation,
    outcome: Outcome,
}

/// Starts or reuses the instance, sends the call and streams the answer to the LB.
async fn execute(
    mut reservation: Reservation,
    spec: &CallSpec,
    body: ReceiverStream<Result<Bytes, std::io::Error>>,
    out: &Outbound,
) -> Result<Executed, LbGone> {
    let instance = match reservation.instance(&spec.id).await {
        Ok(i) => i,
        Err(e) => {
            return Ok(Executed {
                reservation,
                outcome: e.into(),
            });
        }
    };
    let response = match instance
        .call(FunctionRequest::from(spec), Box::pin(body))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Ok(Executed {
                reservation,
                outcome: e.into(),
            });
        }
    };
    let headers = response
        .headers
        .iter()
        .map(|(name, value)| runner::Header {
            name: name.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
        })
        .collect();
    out.send(runner_msg::Body::ResultStart(CallResultStart {
        http: Some(HttpRespMeta {
            status_code: u32::from(response.status.as_u16()),
            headers,
        }),
    }))
    .await?;
    let mut body = response.body;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(mut bytes) => {
                while !bytes.is_empty() {
                    let frame = bytes.split_to(bytes.len().min(MAX_FRAME_BYTES));
                    out.send(runner_msg::Body::Data(DataFrame {
                        data: frame,
                        eof: false,
                    }))
                    .await?;
                }
            }
            Err(e) => {
                return Ok(Executed {
                    reservation,
                    outcome: e.into(),
                });
            }
        }
    }
    out.send(runner_msg::Body::Data(DataFrame {
        data: Bytes::new(),
        eof: true,
    }))
    .await?;
    Ok(Executed {
        reservation,
        outcome: Outcome::ok(),
    })
}

/// Feeds the LB's data frames into the function's request body. Returns `Ok` once the
/// body is complete and the LB half-closed the stream; errors on a protocol violation or
/// when the LB goes away. Keeps reading after `eof` to notice both.
async fn pump_inbound(
    mut inbound: Streaming<ClientMsg>,
    body: mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), InboundError> {
    let mut body = Some(body);
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) if body.is_none() => return Ok(()),
            Ok(None) => {
                abort_body(body.take(), "the LB ended the stream before the body's eof").await;
                return Err(InboundError::Gone(
                    "stream ended before the request body's eof".into(),
                ));
            }
            Err(status) => {
                let reason = format!("{}: {}", status.code(), status.message());
                abort_body(body.take(), "the LB stream failed").await;
                // An oversize (tonic says OUT_OF_RANGE past the decoding limit) or
                // undecodable message is the LB breaking the contract; a cancelled or reset
                // stream means it is gone.
                return Err(match status.code() {
                    tonic::Code::ResourceExhausted
                    | tonic::Code::OutOfRange
                    | tonic::Code::Internal => InboundError::Protocol(reason),
                    _ => InboundError::Gone(reason),
                });
            }
        };
        match (msg.body, &body) {
            (Some(client_msg::Body::Data(frame)), Some(tx)) => {
                if !frame.data.is_empty() && tx.send(Ok(frame.data)).await.is_err() {
                    // The function stopped reading its body; drop the rest quietly.
                    tracing::debug!("function no longer reads its request body");
                }
                if frame.eof {
                    body = None; // closes the function's request body
                }
            }
            (Some(client_msg::Body::Data(_)), None) => {
                return Err(InboundError::Protocol("data frame after eof".into()));
            }
            (Some(client_msg::Body::TryCall(_)), _) => {
                abort_body(body.take(), "protocol error").await;
                return Err(InboundError::Protocol(
                    "a second TryCall on one stream".into(),
                ));
            }
            (None, _) => {
                abort_body(body.take(), "protocol error").await;
                return Err(InboundError::Protocol("an empty message".into()));
            }
        }
    }
}

/// Makes the function's request body fail rather than end cleanly. Never waits: if the
/// body buffer is full, dropping the sender (which the call then sees as a truncated body
/// failing in the driver) is as good.
async fn abort_body(body: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>, why: &str) {
    if let Some(tx) = body {
        let err = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why.to_owned());
        if tx.try_send(Err(err)).is_err() {
            tracing::debug!("request body buffer full or closed; dropping it instead");
        }
    }
}
