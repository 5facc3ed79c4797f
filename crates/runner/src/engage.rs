//! The `RunnerProtocol` gRPC service: one function call per `Engage` stream.
//!
//! Sequence (see `proto/runner.proto`): `TryCall` → `CallAcknowledged` → request body
//! `DataFrame`s (last with `eof`) → `CallResultStart` → response body `DataFrame`s →
//! `CallFinished`. Each stream is handled by its own task, tracked so that a drain can wait
//! for it. Everything from the LB is untrusted: a wrong first message, data after `eof`, a
//! stream that breaks off or a message too large all end that stream with a clear
//! `CallFinished{kind: PROTOCOL}` (or nothing, when the LB is gone) and never disturb other
//! streams.
//!
//! The service is served by [`RunnerServer`]: tonic's generated server for every method but
//! `Engage`, whose stream it frames itself with [`fn_protocol::framing`] (the same bytes on
//! the wire; body chunks are not copied on their way through).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fn_protocol::CallSpec;
use fn_protocol::batch::{Batch, Batches, batches, batches_after};
use fn_protocol::framing::{Decoded, ENGAGE_PATH, EncodeBody};
use fn_protocol::runner::{
    self, CallAcknowledged, CallFinished, CallResultStart, ClientMsg, DataFrame, ErrorKind,
    HttpRespMeta, RefusalReason, RunnerMsg, RunnerState, RunnerStatus, WarmFunction, client_msg,
    runner_msg,
};
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::driver::{DriverError, FunctionRequest, InstanceSpec};
use crate::metrics::RunnerMetrics;
use crate::pool::{Pool, PoolState, Refusal, Reservation};

/// Largest data frame the runner sends; larger function output is split.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Most streams one connection may have open on the runner at once (HTTP/2's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; tonic sets none unless asked, and h2 then allows any
/// number). A stream costs the runner its task (some 20 KB) from its opening, and one that
/// sends nothing holds it for the first-message timeout (10 s): without a bound one peer
/// holding a valid certificate could open streams until the runner ran out of memory. This
/// one bounds such a connection at some 330 MB.
///
/// An honest LB opens one Engage stream per call it has in flight on this runner, over one
/// connection (one per shard under its `FN_SHARDS`, each with its share), beside one
/// `WatchState`, a `Status` probe and offers refused within a millisecond. A stream past the
/// limit waits for a slot: its offer's acknowledgement would be late and the runner look
/// unreachable, so the limit sits far above what a runner runs. Its calls in flight are its
/// hot instances times their `concurrency` (1 by default, as in Fn), its instances at most
/// `FN_MAX_MEMORY_MB` over the functions' memory: at Fn's default of 128 MB a runner of
/// 1 TiB holds 8,192 one-call instances, and the npm's default runner (1024 MB) holds 1,024
/// calls only of functions given 1 MB each. Only functions that take hundreds of calls per
/// instance at once on many instances of one runner, all from one LB, come near it; such an
/// LB spreads them over more connections with `FN_SHARDS`. (`FN_FUNCTION_UIDS` bounds the
/// functions a runner holds, not their instances or calls.)
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16_384;

/// The runner's gRPC server: the dataplane's HTTP/2 settings ([`fn_tls::grpc_server`]) with
/// [`MAX_STREAMS_PER_CONNECTION`]. Feed it [`fn_tls::grpc_incoming`]; put [`EngageFirst`]
/// in front of its router, as the pure-runner does.
pub fn grpc_server() -> fn_tls::GrpcServer {
    fn_tls::grpc_server().max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
}

/// How long a stream still waiting for its `TryCall` when a drain starts may take to send it.
const DRAINING_FIRST_MESSAGE_GRACE: Duration = Duration::from_millis(500);

/// Tunables of the Engage service.
#[derive(Debug, Clone)]
pub struct EngageConfig {
    /// How long a new stream may take to send its `TryCall`.
    pub first_message_timeout: Duration,
    /// How long the runner waits for the LB to take the last message of a stream (a
    /// refusal or `CallFinished`) when the place kept for it is gone (it is kept from the
    /// stream's start, so this is a backstop). The call's own messages are bounded by its
    /// deadline; this bounds what comes after, so an LB that stopped reading cannot hold a
    /// stream task — and with it a drain — forever.
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
    /// Cancelled when the drain has ended: `WatchState` streams end with it, so that they do
    /// not hold the server's graceful shutdown.
    drained: CancellationToken,
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
            drained: CancellationToken::new(),
            config,
            metrics,
        }
    }

    /// The pool behind the service.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Refuses new calls from now on, then waits until every call in flight has finished
    /// and every stream's task has ended. A stream that has not sent its `TryCall` yet is
    /// refused as draining; a stream's last message never waits for its LB (a place in its
    /// channel is kept for it), so an LB that stopped reading holds no stream task. What the
    /// channel still holds for such an LB is the server's to end (its own graceful stop).
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
        self.drained.cancel();
        tracing::info!("drained: no calls in flight");
    }

    /// The gRPC server for this service (see the module docs).
    pub fn into_server(self) -> RunnerServer {
        RunnerServer {
            generated: runner::runner_protocol_server::RunnerProtocolServer::new(self.clone()),
            service: self,
        }
    }

    /// Starts the task of an Engage stream whose LB half is `inbound`; returns the
    /// runner's half once its first batch is ready.
    async fn open_stream<S: Inbound>(&self, inbound: S) -> Batches<RunnerMsg> {
        let (tx, rx) = mpsc::channel(8);
        let out = Outbound::new(tx, self.config.final_send_timeout, self.metrics.clone());
        let this = self.clone();
        // Boxed: the stream's future is some 20 KB, which spawning would copy several times
        // over (into the task, then again when its output replaces it). Written into a box
        // allocated first, it is built in place: `Box::pin(future)` builds it on the stack
        // and copies it (8,500 of 185,000 instructions per call, callgrind).
        let task = Box::write(Box::new_uninit(), this.handle_stream(inbound, out));
        self.tracker.spawn(Box::into_pin(task));
        // The response headers go out with the stream's first messages rather than ahead of
        // them: one write, one wake-up of the LB. The stream's task sends its first batch
        // soon: an empty one at once when the TryCall did not come with the stream's headers
        // (a client may wait for ours before it sends), else the acknowledgement within
        // `ACK_COALESCE`, or a refusal. No timer here: one set on every call costs the
        // runtime a wake-up of its I/O driver (an `eventfd` write, seen with strace).
        let mut rx = rx;
        match rx.recv().await {
            Some(first) => batches_after(first, rx),
            None => batches(rx),
        }
    }
}

/// The LB's half of an Engage stream: decoded by tonic (the generated server's
/// `Streaming`) or by [`fn_protocol::framing`] ([`RunnerServer`]'s route).
trait Inbound: Stream<Item = Result<ClientMsg, Status>> + Unpin + Send + 'static {}

impl<S: Stream<Item = Result<ClientMsg, Status>> + Unpin + Send + 'static> Inbound for S {}

/// The next message of `inbound`; `Ok(None)` when it ended. Cancel-safe.
async fn message<S: Inbound>(inbound: &mut S) -> Result<Option<ClientMsg>, Status> {
    inbound.next().await.transpose()
}

/// The runner's gRPC service: tonic's generated server, but for `Engage`, which is framed
/// by [`fn_protocol::framing`] (see the module docs). Mount it with `add_service`.
#[derive(Clone)]
pub struct RunnerServer {
    service: RunnerService,
    generated: runner::runner_protocol_server::RunnerProtocolServer<RunnerService>,
}

impl std::fmt::Debug for RunnerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerServer").finish_non_exhaustive()
    }
}

impl NamedService for RunnerServer {
    const NAME: &'static str = runner::runner_protocol_server::SERVICE_NAME;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for RunnerServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != ENGAGE_PATH {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        Box::pin(async move {
            let inbound = Decoded::<ClientMsg, _>::request(request.into_body());
            let stream = service.open_stream(inbound).await;
            let mut response =
                http::Response::new(tonic::body::Body::new(EncodeBody::with_ok_trailers(stream)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(response)
        })
    }
}

/// A layer for the runner's tonic server that serves `Engage` ahead of the router, with
/// the [`RunnerServer`] it holds; every other request goes on to the router it wraps.
///
/// Every call is an `Engage` stream, and tonic's router (axum's, matching
/// `/<service>/{*rest}`, allocating the parameter and cloning a boxed service) cost 2.1% of
/// the runner's instructions per call (`make bench-instructions`, session 24). Mount the
/// same server with `add_service` too, for the service's other methods and its name in the
/// router.
#[derive(Clone)]
pub struct EngageFirst(RunnerServer);

impl EngageFirst {
    /// A layer that serves `Engage` with `server`.
    pub fn new(server: RunnerServer) -> Self {
        EngageFirst(server)
    }
}

impl std::fmt::Debug for EngageFirst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngageFirst").finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for EngageFirst {
    type Service = EngageFirstService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EngageFirstService {
            engage: self.0.clone(),
            inner,
        }
    }
}

/// The service of [`EngageFirst`] around `S`, the router.
#[derive(Clone)]
pub struct EngageFirstService<S> {
    engage: RunnerServer,
    inner: S,
}

impl<S> std::fmt::Debug for EngageFirstService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngageFirstService").finish_non_exhaustive()
    }
}

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for EngageFirstService<S>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::Either<
        <RunnerServer as tonic::codegen::Service<http::Request<tonic::body::Body>>>::Future,
        S::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        // The runner's server is always ready; the router decides.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == ENGAGE_PATH {
            futures::future::Either::Left(self.engage.call(request))
        } else {
            futures::future::Either::Right(self.inner.call(request))
        }
    }
}

type EngageStream = Pin<Box<dyn Stream<Item = Result<RunnerMsg, Status>> + Send>>;
type WatchStateStream = Pin<Box<dyn Stream<Item = Result<RunnerState, Status>> + Send>>;

/// `WatchState` sends at most one report per this long: a burst of calls becomes one report.
pub const STATE_MIN_GAP: Duration = Duration::from_millis(20);
/// `WatchState` sends a report at least this often, changed or not, so that an LB can tell a
/// live report from a stale one.
pub const STATE_HEARTBEAT: Duration = Duration::from_secs(1);

/// One `WatchState` stream: the pool's state after each change, coalesced.
struct StateWatch {
    pool: Arc<Pool>,
    changes: tokio::sync::watch::Receiver<u64>,
    ended: CancellationToken,
    first: bool,
    /// The last report (the drained state) has been sent.
    finished: bool,
    last_sent: tokio::time::Instant,
}

impl StateWatch {
    /// The next report; after the drain, one last report and then `None`.
    async fn next(&mut self) -> Option<RunnerState> {
        if self.finished {
            return None;
        }
        if !self.first {
            tokio::select! {
                () = self.ended.cancelled() => {}
                () = tokio::time::sleep_until(self.last_sent + STATE_MIN_GAP) => {
                    tokio::select! {
                        () = self.ended.cancelled() => {}
                        changed = self.changes.changed() => changed.ok()?,
                        () = tokio::time::sleep(STATE_HEARTBEAT) => {}
                    }
                }
            }
        }
        self.first = false;
        self.finished = self.ended.is_cancelled();
        // Marked seen before the state is read: a change after this is reported next time.
        self.changes.borrow_and_update();
        self.last_sent = tokio::time::Instant::now();
        Some(report(self.pool.state()))
    }
}

/// The wire form of a pool's state.
fn report(state: PoolState) -> RunnerState {
    RunnerState {
        version: state.version,
        capacity_total_mb: state.total_mb,
        capacity_free_mb: state.free_mb,
        capacity_idle_mb: state.idle_mb,
        calls_in_flight: state.calls_in_flight,
        draining: state.draining,
        warm: state
            .warm
            .into_iter()
            .map(|w| WarmFunction {
                app: w.app,
                function: w.function,
                idle_slots: w.idle_slots,
                instances: w.instances,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl runner::runner_protocol_server::RunnerProtocol for RunnerService {
    type EngageStream = EngageStream;
    type WatchStateStream = WatchStateStream;

    async fn engage(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::EngageStream>, Status> {
        let stream = self.open_stream(request.into_inner()).await;
        Ok(Response::new(Box::pin(stream.map(Ok))))
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

    async fn watch_state(
        &self,
        _request: Request<()>,
    ) -> Result<Response<Self::WatchStateStream>, Status> {
        let watch = StateWatch {
            pool: Arc::clone(&self.pool),
            changes: self.pool.subscribe(),
            ended: self.drained.clone(),
            first: true,
            finished: false,
            last_sent: tokio::time::Instant::now(),
        };
        let stream = futures::stream::unfold(watch, |mut watch| async move {
            let state = watch.next().await?;
            Some((Ok(state), watch))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Largest amount of response body gathered into one batch before it is sent.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// The runner's half of the stream. Messages are *queued* into a batch and go out when the
/// call would otherwise wait ([`Outbound::flush`]), so what is ready together is written
/// together. A failed send means the LB went away.
struct Outbound {
    tx: mpsc::Sender<Batch<RunnerMsg>>,
    /// A place in the channel kept for the stream's last message from the start, so that it
    /// never waits behind the answer: a client reading a large answer slowly (or pausing
    /// near its end) frees a place only as it reads a batch, and the last message, given up
    /// after `final_send_timeout`, lost the answer's tail, its `eof` and `CallFinished`
    /// while the LB still read. What the channel holds then waits for the LB, whose own
    /// send timeout (or its connection's keepalive) ends a stream nobody reads.
    last_slot: std::sync::Mutex<Option<mpsc::OwnedPermit<Batch<RunnerMsg>>>>,
    /// Messages queued since the last flush. `std::sync::Mutex`: only this call's task
    /// touches it, never across an await.
    batch: std::sync::Mutex<Vec<RunnerMsg>>,
    /// A queued `CallAcknowledged` not yet flushed: when the whole request body came with the
    /// `TryCall`, the acknowledgement waits (at most [`ACK_COALESCE`]) to leave with the
    /// answer's first messages.
    ack_pending: AtomicBool,
    /// Bound for the stream's last message; see [`EngageConfig::final_send_timeout`].
    final_send_timeout: Duration,
    /// Counts refusals (here, where every refusal passes) and call outcomes.
    metrics: RunnerMetrics,
}

#[derive(Debug)]
struct LbGone;

impl Outbound {
    /// The runner's half of a stream whose batches go into `tx`, still empty.
    fn new(
        tx: mpsc::Sender<Batch<RunnerMsg>>,
        final_send_timeout: Duration,
        metrics: RunnerMetrics,
    ) -> Self {
        Outbound {
            // A fresh channel has room: the reservation fails only if it has no receiver,
            // and then `send_last` finds the LB gone anyway.
            last_slot: std::sync::Mutex::new(tx.clone().try_reserve_owned().ok()),
            tx,
            batch: std::sync::Mutex::new(Vec::new()),
            ack_pending: AtomicBool::new(false),
            final_send_timeout,
            metrics,
        }
    }

    fn batch(&self) -> std::sync::MutexGuard<'_, Vec<RunnerMsg>> {
        // Pushes and takes only: a panic cannot leave the batch half-updated.
        self.batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends an empty first batch: the stream's response headers go now, alone.
    fn open(&self) {
        // Nothing was sent yet, so the channel has room; if the receiver is gone, so is the
        // LB, and the first read of its stream says so.
        let _ = self.tx.try_send(Batch {
            messages: Vec::new(),
            last: false,
        });
    }

    /// Adds a message to the batch; it goes out with the next flush.
    fn queue(&self, body: runner_msg::Body) {
        self.batch().push(RunnerMsg { body: Some(body) });
    }

    /// Bytes of response body in the batch.
    fn queued_bytes(&self) -> usize {
        self.batch()
            .iter()
            .map(|m| match &m.body {
                Some(runner_msg::Body::Data(frame)) => frame.data.len(),
                _ => 0,
            })
            .sum()
    }

    /// Queues the acknowledgement without sending it: it leaves with the next flush.
    fn defer_ack(&self, ack: runner_msg::Body) {
        self.queue(ack);
        self.ack_pending.store(true, Ordering::Relaxed);
    }

    fn ack_pending(&self) -> bool {
        self.ack_pending.load(Ordering::Relaxed)
    }

    async fn send_batch(&self, last: bool) -> Result<(), LbGone> {
        let messages = std::mem::take(&mut *self.batch());
        self.ack_pending.store(false, Ordering::Relaxed);
        if messages.is_empty() && !last {
            return Ok(());
        }
        self.tx
            .send(Batch { messages, last })
            .await
            .map_err(|_| LbGone)
    }

    /// Sends what is queued.
    async fn flush(&self) -> Result<(), LbGone> {
        self.send_batch(false).await
    }

    /// Queues `body` and sends the batch.
    async fn send(&self, body: runner_msg::Body) -> Result<(), LbGone> {
        self.queue(body);
        self.flush().await
    }

    /// Resolves when the LB is gone: its stream was cancelled or reset, so nobody will read
    /// the call's answer.
    async fn lb_gone(&self) {
        self.tx.closed().await;
    }

    /// Whether the LB has gone already (see [`Outbound::lb_gone`]).
    fn is_gone(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends the stream's last message with whatever is queued, and ends the stream: into the
    /// place kept for it (see `last_slot`), else waiting at most `final_send_timeout` for
    /// the LB to make room. An LB that reads nothing for that long is treated as gone.
    async fn send_last(&self, body: runner_msg::Body) -> Result<(), LbGone> {
        self.queue(body);
        let kept = self
            .last_slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(slot) = kept {
            if self.tx.is_closed() {
                return Err(LbGone);
            }
            let messages = std::mem::take(&mut *self.batch());
            self.ack_pending.store(false, Ordering::Relaxed);
            drop(slot.send(Batch {
                messages,
                last: true,
            }));
            return Ok(());
        }
        match tokio::time::timeout(self.final_send_timeout, self.send_batch(true)).await {
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

    /// Ends the call with `CallFinished`, giving the pool's version once the call has let go
    /// of its instance (0 for a stream that never had a call). If the LB is gone there is
    /// nobody to tell; the outcome is in the log either way.
    async fn finish(&self, kind: ErrorKind, details: impl Into<String>, pool_version: u64) {
        let msg = runner_msg::Body::Finished(CallFinished {
            success: kind == ErrorKind::None,
            details: details.into(),
            kind: kind as i32,
            pool_version,
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
            pool_version: 0,
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
    /// The instance answered as its contract says (its FDK reported the function's
    /// failure or timeout): it takes the next call.
    serves_on: bool,
}

impl Outcome {
    fn ok() -> Self {
        Outcome::of(ErrorKind::None, String::new())
    }
    fn of(kind: ErrorKind, details: impl Into<String>) -> Self {
        Outcome {
            kind,
            details: details.into(),
            serves_on: false,
        }
    }
}

impl From<DriverError> for Outcome {
    fn from(err: DriverError) -> Self {
        let kind = match &err {
            DriverError::Invalid(_) | DriverError::Start(_) => ErrorKind::Start,
            DriverError::Crashed(_) => ErrorKind::Crashed,
            DriverError::Function(_) | DriverError::Failed(_) => ErrorKind::Function,
            DriverError::TimedOut(_) => ErrorKind::Timeout,
            DriverError::Runner(_) => ErrorKind::Internal,
        };
        Outcome {
            serves_on: err.instance_serves_on(),
            ..Outcome::of(kind, err.to_string())
        }
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

impl InboundError {
    /// What an error reading the LB's stream means: an oversize (tonic says `OUT_OF_RANGE`
    /// past the decoding limit) or undecodable message is the LB breaking the contract; a
    /// cancelled or reset stream means it is gone.
    fn of(status: &Status) -> Self {
        let reason = format!("{}: {}", status.code(), status.message());
        match status.code() {
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal => {
                InboundError::Protocol(reason)
            }
            _ => InboundError::Gone(reason),
        }
    }
}

impl RunnerService {
    async fn handle_stream<S: Inbound>(self, mut inbound: S, out: Outbound) {
        // 1. The first message must be a TryCall, and must come soon. Once a drain starts,
        // a stream gets only a short grace for it (its TryCall is then refused as draining,
        // as the answer to it), so that a silent stream does not hold the drain.
        let first_message = self.config.first_message_timeout;
        // An LB's TryCall comes in the same write as the stream's headers. When it has not
        // arrived, the response headers go now, alone (see `engage`).
        let first = if let Some(first) = message(&mut inbound).now_or_never() {
            Ok(first)
        } else {
            out.open();
            tokio::select! {
                biased;
                first = tokio::time::timeout(first_message, message(&mut inbound)) => first,
                () = self.draining.cancelled() => {
                    // `message` is cancel-safe: nothing read above is lost.
                    let grace = DRAINING_FIRST_MESSAGE_GRACE;
                    match tokio::time::timeout(grace, message(&mut inbound)).await {
                        Ok(first) => Ok(first),
                        Err(_elapsed) => {
                            let details = Refusal::Draining.to_string();
                            out.refuse(RefusalReason::Draining, details).await;
                            return;
                        }
                    }
                }
            }
        };
        let call = match first {
            Err(_) => {
                out.metrics.refused_without_a_call();
                tracing::debug!("no TryCall within the first-message timeout");
                out.finish(
                    ErrorKind::Protocol,
                    "no TryCall within the first-message timeout",
                    0,
                )
                .await;
                return;
            }
            Ok(Err(status)) => match InboundError::of(&status) {
                InboundError::Protocol(reason) => {
                    // Said to the LB, not only dropped: it would otherwise see a stream
                    // ended without an answer, and no cause.
                    out.metrics.refused_without_a_call();
                    tracing::debug!(error = %reason, "an Engage stream's first message is unreadable");
                    out.finish(ErrorKind::Protocol, format!("protocol error: {reason}"), 0)
                        .await;
                    return;
                }
                InboundError::Gone(reason) => {
                    tracing::debug!(error = %reason, "engage stream failed before TryCall");
                    return;
                }
            },
            Ok(Ok(None)) => return,
            Ok(Ok(Some(ClientMsg {
                body: Some(client_msg::Body::TryCall(try_call)),
            }))) => try_call.call,
            Ok(Ok(Some(_))) => {
                out.metrics.refused_without_a_call();
                tracing::debug!("an Engage stream opened with another message than TryCall");
                out.finish(
                    ErrorKind::Protocol,
                    "protocol error: the first message must be TryCall",
                    0,
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

    async fn run_call<S: Inbound>(&self, mut spec: CallSpec, mut inbound: S, out: Outbound) {
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

        // An LB that gave up its offer while the TryCall waited in the stream's buffer (its
        // handshake timed out, its client left) waits for nothing: no instance is taken for
        // the call, and none evicted to make room for it.
        if out.is_gone() {
            tracing::debug!("LB went away before the call was admitted");
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
                    Refusal::TooLarge { .. } => RefusalReason::TooLarge,
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
            pool_version: self.pool.version(),
        });
        // A small body comes with the TryCall: take what has arrived without waiting.
        let early = read_ready(&mut inbound);
        if early.eof {
            // The function has everything it needs: the acknowledgement can leave with the
            // answer (one write, one wake-up of the LB) unless that takes long.
            out.defer_ack(ack);
        } else if out.send(ack).await.is_err() {
            // LB gone before it learnt of the commit; the reservation drops.
            out.metrics.call_ended(None);
            return;
        }
        tracing::debug!(reused = reservation.reused(), "call committed");

        // 4. Run the call while pumping the request body, under the call's deadline.
        // A body that came whole with the TryCall needs no channel for the rest.
        let arrived = futures::stream::iter(early.chunks.into_iter().map(Ok));
        let (body, body_tx): (crate::driver::BodyStream<std::io::Error>, _) = if early.eof {
            (Box::pin(arrived), None)
        } else {
            let (feed, fed) = body_feed();
            (Box::pin(arrived.chain(fed)), Some(feed))
        };
        let pump = pump_inbound(inbound, early.trouble, body_tx);
        let deadline = tokio::time::Instant::now() + spec.remaining();
        let ack_by = tokio::time::Instant::now() + ACK_COALESCE;
        let timeout = spec.timeout;
        let entry = reservation.entry();
        let execute =
            tokio::time::timeout_at(deadline, execute(reservation, &mut spec, body, &out));
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
                    // Any HTTP client can cause it at every call (it hangs up): DEBUG, as
                    // the LB logs it; counted as `lb_went_away`.
                    Err(InboundError::Gone(msg)) => {
                        tracing::debug!(reason = %msg, "LB stream ended mid-call; aborting the call");
                        break None;
                    }
                },
                // The LB's going away (cancelled call, client gone) shows as the answer's
                // receiver closing. Not only once the body is in: a pump waiting for the
                // function to take the body it has reads nothing from the LB meanwhile.
                () = out.lb_gone() => {
                    tracing::debug!("LB went away mid-call; aborting the call");
                    break None;
                }
                // The answer is taking long: the acknowledgement goes alone.
                () = tokio::time::sleep_until(ack_by), if out.ack_pending() => {
                    if out.flush().await.is_err() {
                        break None;
                    }
                }
                executed = &mut execute => break match executed {
                    Err(_elapsed) => {
                        // Before the reservation drops with `execute`. The details reach
                        // the client after the LB's own words on the timeout.
                        let starting = self.pool.retire(entry);
                        Some(Outcome::of(ErrorKind::Timeout, if starting {
                            STILL_STARTING
                        } else {
                            ""
                        }))
                    }
                    Ok(Ok(Executed { reservation, outcome })) => {
                        if outcome.kind == ErrorKind::None || outcome.serves_on {
                            reservation.finish_ok();
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
                kind => {
                    tracing::info!(?kind, details = %outcome.details, ?timeout, "call failed");
                }
            }
            // Read now: the reservation was let go of above.
            let pool_version = self.pool.version();
            out.finish(outcome.kind, outcome.details, pool_version)
                .await;
        }
    }
}

/// Why a call timed out while its instance was starting (as Fn's "Container initialization
/// timed out").
const STILL_STARTING: &str = "its instance was still starting: it had not opened its \
    listener (FN_LISTENER) yet; a start that takes longer than the function's timeout, or \
    fails, is in the function's output in the runner's log";

/// How long a deferred acknowledgement waits for the answer to leave with.
const ACK_COALESCE: Duration = Duration::from_millis(2);

struct Executed {
    reservation: Reservation,
    outcome: Outcome,
}

/// Starts or reuses the instance, sends the call and streams the answer to the LB. The
/// answer's messages are queued and flushed only when the function's body makes the call
/// wait, so a small answer leaves in one write; the last data frame carries `eof` when the
/// body is known to have ended with it.
async fn execute(
    mut reservation: Reservation,
    spec: &mut CallSpec,
    body: crate::driver::BodyStream<std::io::Error>,
    out: &Outbound,
) -> Result<Executed, LbGone> {
    let failed = |reservation, e: DriverError| {
        Ok(Executed {
            reservation,
            outcome: e.into(),
        })
    };
    let cold = !reservation.reused();
    let starting = Instant::now();
    let instance = match reservation.instance(&spec.id).await {
        Ok(i) => i,
        Err(e) => return failed(reservation, e),
    };
    // Never 0 for a cold call: 0 means warm on the wire.
    let cold_start_us = if cold {
        u64::try_from(starting.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    } else {
        0
    };
    let response = match instance.call(FunctionRequest::take_from(spec), body).await {
        Ok(r) => r,
        Err(e) => return failed(reservation, e),
    };
    let headers = fn_protocol::call::wire_headers(&response.headers);
    out.queue(runner_msg::Body::ResultStart(CallResultStart {
        cold_start_us,
        http: Some(HttpRespMeta {
            status_code: u32::from(response.status.as_u16()),
            headers,
        }),
    }));
    let mut body = response.body;
    let mut next = match next_soon(&mut body).await {
        Some(item) => item,
        None => {
            out.flush().await?;
            body.next().await
        }
    };
    loop {
        let mut bytes = match next {
            None => {
                out.queue(data_frame(Bytes::new(), true));
                break;
            }
            Some(Err(e)) => return failed(reservation, e),
            Some(Ok(bytes)) => bytes,
        };
        // Look ahead without waiting: a body that has already ended lets this chunk carry eof.
        let after = next_soon(&mut body).await;
        let ended = matches!(after, Some(None));
        while !bytes.is_empty() {
            let frame = bytes.split_to(bytes.len().min(MAX_FRAME_BYTES));
            out.queue(data_frame(frame, ended && bytes.is_empty()));
        }
        if ended {
            break;
        }
        next = match after {
            Some(item) if out.queued_bytes() < MAX_BATCH_BYTES => item,
            Some(item) => {
                out.flush().await?;
                item
            }
            None => {
                out.flush().await?;
                body.next().await
            }
        };
    }
    Ok(Executed {
        reservation,
        outcome: Outcome::ok(),
    })
}

/// The body's next item if it is ready now or once the tasks already woken have run (the
/// function's connection task decodes what it has read only when it runs); `None` when the
/// body has to wait for the function.
async fn next_soon(
    body: &mut crate::driver::BodyStream<DriverError>,
) -> Option<Option<Result<Bytes, DriverError>>> {
    if let Some(item) = body.next().now_or_never() {
        return Some(item);
    }
    yield_to_woken().await;
    body.next().now_or_never()
}

/// Lets the tasks already woken run before this one goes on. Unlike
/// `tokio::task::yield_now`, it does not make the runtime poll its I/O driver first (one
/// `epoll_wait` returning nothing per call, seen with strace): what [`next_soon`] waits for
/// is a task's turn with data it has already read, not new I/O.
async fn yield_to_woken() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        // Rescheduled behind the tasks already in the run queue.
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

fn data_frame(data: Bytes, eof: bool) -> runner_msg::Body {
    runner_msg::Body::Data(DataFrame { data, eof })
}

/// Request body frames that had arrived when the call was committed.
struct Early {
    chunks: Vec<Bytes>,
    /// The body is complete: its `eof` is among them.
    eof: bool,
    /// Something other than a data frame was read (the stream's end, an error, a wrong
    /// message): [`pump_inbound`] deals with it first.
    trouble: Option<Result<Option<ClientMsg>, Status>>,
}

/// Takes the messages that have already arrived, without waiting, up to the body's `eof`.
fn read_ready<S: Inbound>(inbound: &mut S) -> Early {
    let mut early = Early {
        chunks: Vec::new(),
        eof: false,
        trouble: None,
    };
    while let Some(read) = message(inbound).now_or_never() {
        match read {
            Ok(Some(ClientMsg {
                body: Some(client_msg::Body::Data(frame)),
            })) => {
                if !frame.data.is_empty() {
                    early.chunks.push(frame.data);
                }
                if frame.eof {
                    early.eof = true;
                    break;
                }
            }
            other => {
                early.trouble = Some(other);
                break;
            }
        }
    }
    early
}

/// The pump's end of a call's request body: [`FedBody`] is the function's. The body ends
/// cleanly only through [`BodyFeed::complete`]; a feed dropped before it (the call ended
/// first, the LB went away, the pump was dropped) ends the body with an error, so a body cut
/// short never reaches the function as complete (over chunked encoding a clean end is the
/// terminating chunk).
struct BodyFeed {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    complete: Arc<AtomicBool>,
}

impl BodyFeed {
    async fn send(&self, data: Bytes) -> Result<(), ()> {
        self.tx.send(Ok(data)).await.map_err(drop)
    }

    /// The body's `eof` arrived: the body ends cleanly once the chunks before it are taken.
    fn complete(self) {
        self.complete.store(true, Ordering::Release);
    }

    /// Makes the body fail with `why`. Never waits: if the body buffer is full, dropping the
    /// feed fails the body all the same, with a less specific reason.
    fn abort(self, why: &str) {
        let err = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why.to_owned());
        if self.tx.try_send(Err(err)).is_err() {
            tracing::debug!("request body buffer full or closed; dropping it instead");
        }
    }
}

/// A call's request body as its [`BodyFeed`] sends it.
struct FedBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    complete: Arc<AtomicBool>,
    ended: bool,
}

fn body_feed() -> (BodyFeed, FedBody) {
    let (tx, rx) = mpsc::channel(4);
    let complete = Arc::new(AtomicBool::new(false));
    let feed = BodyFeed {
        tx,
        complete: complete.clone(),
    };
    let fed = FedBody {
        rx,
        complete,
        ended: false,
    };
    (feed, fed)
}

impl Stream for FedBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let item = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(data)) => return std::task::Poll::Ready(Some(Ok(data))),
            Some(Err(e)) => Some(Err(e)),
            // Every sender is gone: the flag was set, if at all, before the last one went.
            None if self.complete.load(Ordering::Acquire) => None,
            None => Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the request body was cut short: the call ended before the body's eof",
            ))),
        };
        self.ended = true;
        std::task::Poll::Ready(item)
    }
}

/// Feeds the LB's data frames into the function's request body (`None` when the body is
/// already complete). Returns `Ok` once the body is complete and the LB half-closed the
/// stream; errors on a protocol violation or when the LB goes away. Keeps reading after
/// `eof` to notice both. `first` is a message [`read_ready`] already took.
async fn pump_inbound<S: Inbound>(
    mut inbound: S,
    mut first: Option<Result<Option<ClientMsg>, Status>>,
    body: Option<BodyFeed>,
) -> Result<(), InboundError> {
    let mut body = body;
    let abort_body = |body: Option<BodyFeed>, why: &str| {
        if let Some(feed) = body {
            feed.abort(why);
        }
    };
    loop {
        let read = match first.take() {
            Some(read) => read,
            None => message(&mut inbound).await,
        };
        let msg = match read {
            Ok(Some(msg)) => msg,
            Ok(None) if body.is_none() => return Ok(()),
            Ok(None) => {
                abort_body(body.take(), "the LB ended the stream before the body's eof");
                return Err(InboundError::Gone(
                    "stream ended before the request body's eof".into(),
                ));
            }
            Err(status) => {
                abort_body(body.take(), "the LB stream failed");
                return Err(InboundError::of(&status));
            }
        };
        match (msg.body, &body) {
            (Some(client_msg::Body::Data(frame)), Some(feed)) => {
                if !frame.data.is_empty() && feed.send(frame.data).await.is_err() {
                    // The function stopped reading its body; drop the rest quietly.
                    tracing::debug!("function no longer reads its request body");
                }
                if frame.eof
                    && let Some(feed) = body.take()
                {
                    feed.complete(); // ends the function's request body
                }
            }
            (Some(client_msg::Body::Data(_)), None) => {
                return Err(InboundError::Protocol("data frame after eof".into()));
            }
            (Some(client_msg::Body::TryCall(_)), _) => {
                abort_body(body.take(), "protocol error");
                return Err(InboundError::Protocol(
                    "a second TryCall on one stream".into(),
                ));
            }
            (None, _) => {
                abort_body(body.take(), "protocol error");
                return Err(InboundError::Protocol("an empty message".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tonic::codegen::Service;
    use tower_layer::Layer;

    use super::*;
    use crate::testing::FakeDriver;

    /// Stands for the router: counts the requests it is given and answers each empty.
    #[derive(Clone, Default)]
    struct CountingRouter(Arc<AtomicUsize>);

    impl Service<http::Request<tonic::body::Body>> for CountingRouter {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(
            &mut self,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<tonic::body::Body>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    fn request(path: &str) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .body(tonic::body::Body::empty())
            .expect("a request")
    }

    #[tokio::test]
    async fn engage_is_served_ahead_of_the_router_and_every_other_path_goes_to_it() {
        let pool = Pool::new(
            Arc::new(FakeDriver::default()),
            1024,
            Duration::from_secs(1),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let service = RunnerService::new(pool, EngageConfig::default(), &mut registry);
        let router = CountingRouter::default();
        let mut layered = EngageFirst::new(service.into_server()).layer(router.clone());

        let response =
            tokio::time::timeout(Duration::from_secs(5), layered.call(request(ENGAGE_PATH)))
                .await
                .expect("Engage answers its head")
                .expect("infallible");
        assert_eq!(
            response.headers().get(http::header::CONTENT_TYPE),
            Some(&http::HeaderValue::from_static("application/grpc")),
            "the runner's own framing answered"
        );
        assert_eq!(
            router.0.load(Ordering::SeqCst),
            0,
            "Engage never reached the router"
        );

        for path in [
            "/dataplane.runner.v1.RunnerProtocol/Status",
            "/grpc.health.v1.Health/Check",
            "/dataplane.runner.v1.RunnerProtocol/EngageX",
        ] {
            let _ = layered.call(request(path)).await;
        }
        assert_eq!(router.0.load(Ordering::SeqCst), 3, "everything else did");
    }

    /// However full the answer has made the channel (a client reading slowly), the stream's
    /// last message goes at once into the place kept for it, and nothing is lost.
    #[tokio::test]
    async fn the_last_message_never_waits_behind_the_answer() {
        let pool = Pool::new(
            Arc::new(FakeDriver::default()),
            1024,
            Duration::from_secs(1),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = RunnerMetrics::register(&mut registry, &pool);
        let (tx, mut rx) = mpsc::channel(8);
        let out = Outbound::new(tx, Duration::from_secs(30), metrics);
        // Answer batches until the channel takes no more (nobody reads it).
        let mut sent = 0;
        loop {
            out.queue(runner_msg::Body::Data(DataFrame {
                data: Bytes::from(vec![7u8; 1024]),
                eof: false,
            }));
            match tokio::time::timeout(Duration::from_millis(50), out.flush()).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(LbGone)) => panic!("the receiver is here"),
                Err(_full) => break,
            }
        }
        assert!(sent >= 1, "no answer batch went");
        // The tail and CallFinished: at once, although no batch was read.
        out.queue(runner_msg::Body::Data(DataFrame {
            data: Bytes::from_static(b"tail"),
            eof: true,
        }));
        tokio::time::timeout(Duration::from_secs(1), out.finish(ErrorKind::None, "", 0))
            .await
            .expect("the last message waited for room");
        drop(out);
        let mut batches = Vec::new();
        while let Some(batch) = rx.recv().await {
            batches.push(batch);
        }
        assert_eq!(batches.len(), sent + 1, "every answer batch, then the last");
        let last = batches.last().expect("a last batch");
        assert!(last.last);
        assert!(
            matches!(
                last.messages.last().and_then(|m| m.body.as_ref()),
                Some(runner_msg::Body::Finished(f)) if f.success
            ),
            "{:?}",
            last.messages
        );
    }
}
