//! A scripted fake pure-runner: a real tonic `RunnerProtocol` server on loopback (mutual TLS
//! or plaintext) whose answer to each `TryCall` is chosen by the test.
//!
//! Each call takes the next [`Behaviour`] from the runner's script, or its default when the
//! script is empty. Every `TryCall` is recorded ([`FakeRunner::seen`]), with how its stream
//! ended ([`Ending`]), so a test can assert, say, that no second runner ever saw a call that
//! the first one committed, or that a client that went away cancelled the Engage stream.
//!
//! What it does not do: run functions, account memory, or validate calls the way the real
//! runner does (`fn-runner` owns that). Its `WatchState` reports are what the test sets with
//! [`FakeRunner::report_state`], and nothing until then.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use fn_protocol::runner::runner_protocol_server::{RunnerProtocol, RunnerProtocolServer};
use fn_protocol::runner::{
    CallAcknowledged, CallFinished, CallResultStart, ClientMsg, DataFrame, ErrorKind, Header,
    HttpRespMeta, RefusalReason, RunnerMsg, RunnerState, RunnerStatus, client_msg, runner_msg,
};
use fn_tls::TlsMode;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Largest data frame the fake sends back (the LB's own frame limit).
const MAX_FRAME: usize = 1024 * 1024;

/// How long a completed echo call waits for the LB to end its half of the stream.
const REQUEST_END_BOUND: Duration = Duration::from_secs(5);

/// How the fake answers one `TryCall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Commit, read the whole request body, then answer 200 with that body, its
    /// `Content-Length`, the request's `Content-Type` and `X-Echo-*` headers, and
    /// `X-Fake-Runner: <name>`. A request's `X-Fake-Status: <code>` sets the status (any
    /// number, as a misbehaving runner might send), `X-Fake-Headers: <n>` adds `n` headers
    /// `X-Filler: a`, and `X-Fake-Length: <n>` claims a `Content-Length` of `n` whatever the
    /// body's.
    Echo,
    /// Refuse as busy (`committed = false`).
    Refuse,
    /// Refuse as too large: the call needs more memory than this runner has in all.
    RefuseTooLarge,
    /// Refuse as invalid, for a reason of this runner's own (it has no container engine).
    RefuseInvalid,
    /// Refuse as draining (the runner is stopping).
    RefuseDraining,
    /// Refuse as invalid, with [`VERBOSE_DETAILS_BYTES`] of details.
    RefuseInvalidVerbosely,
    /// Commit, then end the call as crashed before any result, with
    /// [`VERBOSE_DETAILS_BYTES`] of details.
    CommitThenFailVerbosely,
    /// Commit, then fail the stream with an error status before any result.
    CommitThenFail,
    /// Commit, then end the stream cleanly without a result or `CallFinished`.
    CommitThenHangUp,
    /// Commit, read the body, send the response head and a first body chunk, then fail the
    /// stream with an error status.
    CommitThenDieMidResponse,
    /// Commit and never answer; waits until the LB goes away.
    CommitThenStall,
    /// Never acknowledge the `TryCall`; waits until the LB goes away.
    NeverAcknowledge,
    /// End the stream cleanly at once, without acknowledging the `TryCall` (a runner whose
    /// call service is broken while its health check answers).
    HangUpUnacknowledged,
    /// Commit, read the body, send the response head and a first body chunk, then wait
    /// until the LB goes away.
    AnswerHeadThenStall,
    /// Like [`Behaviour::Echo`], but the stream's end (the gRPC trailers) follows
    /// `CallFinished` only after [`LATE_TRAILERS`], and the fake records whether the LB
    /// reset the stream in between ([`SeenCall::reset_before_trailers`]) instead of reading
    /// it to its end.
    EchoLateTrailers,
    /// Commit and answer 200 `unread` at once, without reading the request body (a function
    /// that ignores its input).
    AnswerUnread,
    /// Commit, send the response head and a first body chunk at once, then read the request
    /// body until the LB goes away (a function that streams its answer while its input
    /// arrives).
    AnswerHeadFirst,
}

/// How long the details of [`Behaviour::RefuseInvalidVerbosely`] and
/// [`Behaviour::CommitThenFailVerbosely`] are: `€` (3 bytes) over and over.
pub const VERBOSE_DETAILS_BYTES: usize = 900_000;

/// The details a verbose behaviour sends.
fn verbose_details() -> String {
    "\u{20ac}".repeat(VERBOSE_DETAILS_BYTES / 3)
}

/// The cold start a fake runner reports for the first call of each function.
pub const FAKE_COLD_START: Duration = Duration::from_millis(25);

/// How long [`Behaviour::EchoLateTrailers`] holds the trailers back.
pub const LATE_TRAILERS: Duration = Duration::from_millis(20);

/// How the LB ended the request half of a completed call's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    /// Not known yet, or the behaviour does not wait for it.
    Unknown,
    /// Half-closed cleanly (`END_STREAM`) once the body was sent.
    Closed,
    /// Reset or broken off instead.
    Reset,
}

/// How a call's stream ended on the fake's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Still running.
    Open,
    /// Refused (not committed).
    Refused,
    /// Answered with `CallFinished{success}`.
    Completed,
    /// The fake failed it on purpose (error status or hang-up after commit).
    Failed,
    /// The LB cancelled the stream (or stopped reading) before the fake was done.
    LbWentAway,
    /// The LB broke the Engage sequence.
    Protocol,
}

/// One `TryCall` as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenCall {
    pub id: String,
    pub app: String,
    pub function: String,
    /// The URL the client asked for, as the LB spelled it.
    pub request_url: String,
    pub memory_mb: u64,
    pub behaviour: Behaviour,
    /// Request body bytes received (only counted while the behaviour reads the body).
    pub body_bytes: u64,
    pub ending: Ending,
    /// For completed echo calls: how the LB ended its half of the stream.
    pub request_end: RequestEnd,
    /// For [`Behaviour::EchoLateTrailers`]: whether the LB reset the stream after
    /// `CallFinished` rather than waiting for its end.
    pub reset_before_trailers: Option<bool>,
}

#[derive(Debug)]
struct State {
    name: String,
    /// `std::sync::Mutex`: every section is a push, pop or clone; never held across an await.
    default: Mutex<Behaviour>,
    script: Mutex<VecDeque<Behaviour>>,
    seen: Mutex<Vec<SeenCall>>,
    /// Woken whenever `seen` changes, for the `wait_*` helpers.
    changed: Notify,
    /// TCP connections accepted; one per LB unless a connection was torn down.
    connections: AtomicU64,
    /// What `WatchState` streams report; nothing while `None`.
    reported: watch::Sender<Option<RunnerState>>,
    /// Cancelled when the server stops: `WatchState` streams end with it.
    stopping: tokio_util::sync::CancellationToken,
    /// The pool version the last commit or finish gave; 0 while the fake gives none (see
    /// [`FakeRunner::give_pool_versions`]).
    pool_version: AtomicU64,
    /// `WatchState` calls still to be left without an answer (not even the response head)
    /// until the server stops; see [`FakeRunner::hold_report_opens`].
    held_report_opens: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    /// The pool version a commit or a finish now gives: the next one, once the fake gives
    /// versions, else 0 (a runner that does not say).
    fn next_pool_version(&self) -> u64 {
        let mut current = self.pool_version.load(Ordering::Acquire);
        while current != 0 {
            match self.pool_version.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return current + 1,
                Err(now) => current = now,
            }
        }
        0
    }

    /// As a real runner reports it: [`FAKE_COLD_START`] for the first call of a function
    /// this fake has seen, 0 (warm) for the later ones.
    fn cold_start_us(&self, index: usize) -> u64 {
        let seen = lock(&self.seen);
        let Some(call) = seen.get(index) else {
            return 0;
        };
        let first = seen[..index]
            .iter()
            .all(|c| c.app != call.app || c.function != call.function);
        if first {
            u64::try_from(FAKE_COLD_START.as_micros()).unwrap_or(u64::MAX)
        } else {
            0
        }
    }

    fn next_behaviour(&self) -> Behaviour {
        lock(&self.script)
            .pop_front()
            .unwrap_or(*lock(&self.default))
    }

    fn record(&self, call: SeenCall) -> usize {
        let mut seen = lock(&self.seen);
        seen.push(call);
        self.changed.notify_waiters();
        seen.len() - 1
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut SeenCall)) {
        if let Some(call) = lock(&self.seen).get_mut(index) {
            f(call);
        }
        self.changed.notify_waiters();
    }
}

/// A running fake runner. The server stops when this is dropped.
#[derive(Debug)]
pub struct FakeRunner {
    address: String,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl FakeRunner {
    /// Starts a fake runner named `name` on `127.0.0.1:0` answering with `behaviour` unless
    /// scripted otherwise. It accepts connections as soon as this returns.
    ///
    /// # Errors
    /// When the port cannot be bound or the TLS configuration is rejected.
    pub async fn start(name: &str, tls: &TlsMode, behaviour: Behaviour) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", name, tls, behaviour).await
    }

    /// Like [`FakeRunner::start`], on a given `address` (e.g. one a test found closed, to
    /// bring a runner "back").
    ///
    /// # Errors
    /// When the address cannot be bound or the TLS configuration is rejected.
    pub async fn start_on(
        address: &str,
        name: &str,
        tls: &TlsMode,
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding a fake runner on {address}"))?;
        let address = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            name: name.to_owned(),
            default: Mutex::new(behaviour),
            script: Mutex::new(VecDeque::new()),
            seen: Mutex::new(Vec::new()),
            changed: Notify::new(),
            connections: AtomicU64::new(0),
            reported: watch::Sender::new(None),
            stopping: tokio_util::sync::CancellationToken::new(),
            pool_version: AtomicU64::new(0),
            held_report_opens: AtomicU64::new(0),
        });
        let service = RunnerProtocolServer::new(Service {
            state: Arc::clone(&state),
        });
        let mut server = fn_tls::grpc_server();
        let router = server.add_service(service);
        let (stop, stopped) = oneshot::channel::<()>();
        let counted = Arc::clone(&state);
        let stopping = state.stopping.clone();
        let incoming = fn_tls::grpc_incoming(tls, listener)
            .context("fake runner TLS")?
            .map(move |accepted| {
                if accepted.is_ok() {
                    counted.connections.fetch_add(1, Ordering::Relaxed);
                }
                accepted
            });
        tokio::spawn(async move {
            let shutdown = async {
                // Either a stop signal or the handle dropped: both mean stop.
                let _stopped = stopped.await;
                stopping.cancel();
            };
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                eprintln!("fake runner stopped with an error: {e}");
            }
        });
        Ok(FakeRunner {
            address,
            state,
            _stop: stop,
        })
    }

    /// `host:port` of the server.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The name given at start (sent back as `X-Fake-Runner` by [`Behaviour::Echo`]).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Changes the default behaviour for calls not covered by the script.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.state.default) = behaviour;
    }

    /// Appends behaviours for the next calls, in order; the default applies after them.
    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        lock(&self.state.script).extend(behaviours);
    }

    /// Every `TryCall` seen so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenCall> {
        lock(&self.state.seen).clone()
    }

    /// Sends `state` on every `WatchState` stream, open or opened later, as a real runner
    /// reports its pool.
    pub fn report_state(&self, state: RunnerState) {
        self.state.reported.send_replace(Some(state));
    }

    /// Leaves the next `opens` `WatchState` calls unanswered, head and all, as a runner
    /// whose connection answers pings but whose service is stuck would.
    pub fn hold_report_opens(&self, opens: u64) {
        self.state.held_report_opens.store(opens, Ordering::Release);
    }

    /// From now on, each committed call's acknowledgement and each `CallFinished{success}`
    /// carry the next pool version after the last report's (at least 1), as a runner's do
    /// when its pool changes and no new report has reached the LB; before, they carry 0 (a
    /// runner that does not say).
    pub fn give_pool_versions(&self) {
        let reported = self
            .state
            .reported
            .borrow()
            .as_ref()
            .map_or(0, |state| state.version);
        self.state
            .pool_version
            .store(reported.max(1), Ordering::Release);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Whether a `TryCall` with this call id arrived here.
    pub fn saw(&self, call_id: &str) -> bool {
        lock(&self.state.seen).iter().any(|c| c.id == call_id)
    }

    /// Waits until `done` holds for the recorded calls.
    ///
    /// # Errors
    /// When it does not within `timeout`, with what was seen.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[SeenCall]) -> bool,
    ) -> anyhow::Result<Vec<SeenCall>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so a change in between is not missed.
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let seen = lock(&self.state.seen);
                if done(&seen) {
                    return Ok(seen.clone());
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "fake runner {}: condition not met within {timeout:?}; seen: {:?}",
                    self.state.name,
                    self.seen()
                );
            }
        }
    }

    /// Waits until the call `call_id` has ended with something other than [`Ending::Open`].
    ///
    /// # Errors
    /// When it does not within `timeout`.
    pub async fn wait_ended(&self, call_id: &str, timeout: Duration) -> anyhow::Result<Ending> {
        let seen = self
            .wait_until(timeout, |seen| {
                seen.iter()
                    .any(|c| c.id == call_id && c.ending != Ending::Open)
            })
            .await?;
        seen.iter()
            .find(|c| c.id == call_id)
            .map(|c| c.ending)
            .context("call vanished from the record")
    }
}

#[derive(Debug)]
struct Service {
    state: Arc<State>,
}

type EngageStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<RunnerMsg, Status>> + Send>>;
type WatchStateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<RunnerState, Status>> + Send>>;

#[tonic::async_trait]
impl RunnerProtocol for Service {
    type EngageStream = EngageStream;
    type WatchStateStream = WatchStateStream;

    async fn engage(
        &self,
        request: Request<Streaming<ClientMsg>>,
    ) -> Result<Response<Self::EngageStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let state = Arc::clone(&self.state);
        tokio::spawn(handle_stream(state, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _request: Request<()>) -> Result<Response<RunnerStatus>, Status> {
        Ok(Response::new(RunnerStatus::default()))
    }

    async fn watch_state(
        &self,
        _request: Request<()>,
    ) -> Result<Response<Self::WatchStateStream>, Status> {
        let held = self.state.held_report_opens.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |left| left.checked_sub(1),
        );
        if held.is_ok() {
            self.state.stopping.cancelled().await;
            return Err(Status::unavailable("fake runner: stopping"));
        }
        let mut reported = self.state.reported.subscribe();
        reported.mark_changed();
        let stopping = self.state.stopping.clone();
        let stream = futures::stream::unfold(reported, move |mut reported| {
            let stopping = stopping.clone();
            async move {
                loop {
                    tokio::select! {
                        () = stopping.cancelled() => return None,
                        changed = reported.changed() => changed.ok()?,
                    }
                    let current = reported.borrow_and_update().clone();
                    if let Some(state) = current {
                        return Some((Ok(state), reported));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

type Tx = mpsc::Sender<Result<RunnerMsg, Status>>;

/// The LB went away (a send to it failed).
struct Gone;

async fn send(tx: &Tx, body: runner_msg::Body) -> Result<(), Gone> {
    tx.send(Ok(RunnerMsg { body: Some(body) }))
        .await
        .map_err(|_| Gone)
}

fn ack(committed: bool, pool_version: u64) -> runner_msg::Body {
    runner_msg::Body::Acknowledged(CallAcknowledged {
        committed,
        details: if committed {
            String::new()
        } else {
            "fake runner: busy".into()
        },
        slot_allocation_latency_us: 1,
        pool_version,
        refusal: if committed {
            RefusalReason::Unspecified as i32
        } else {
            RefusalReason::Busy as i32
        },
    })
}

/// The request body as read by the fake.
enum Body {
    Complete(Vec<u8>),
    LbWentAway,
    Protocol,
}

async fn read_body(inbound: &mut Streaming<ClientMsg>, state: &State, index: usize) -> Body {
    let mut body = Vec::new();
    loop {
        match inbound.message().await {
            Ok(Some(ClientMsg {
                body: Some(client_msg::Body::Data(frame)),
            })) => {
                body.extend_from_slice(&frame.data);
                let len = body.len() as u64;
                state.update(index, |c| c.body_bytes = len);
                if frame.eof {
                    return Body::Complete(body);
                }
            }
            Ok(Some(_)) => return Body::Protocol,
            Ok(None) | Err(_) => return Body::LbWentAway,
        }
    }
}

async fn handle_stream(state: Arc<State>, mut inbound: Streaming<ClientMsg>, tx: Tx) {
    let call = match inbound.message().await {
        Ok(Some(ClientMsg {
            body: Some(client_msg::Body::TryCall(t)),
        })) => t.call.unwrap_or_default(),
        _ => {
            let finished = runner_msg::Body::Finished(CallFinished {
                success: false,
                details: "fake runner: the first message must be TryCall".into(),
                kind: ErrorKind::Protocol as i32,
                pool_version: 0,
            });
            // The LB may be gone already; nothing else to tell it.
            let _sent = send(&tx, finished).await;
            return;
        }
    };
    let behaviour = state.next_behaviour();
    let index = state.record(SeenCall {
        id: call.id.clone(),
        app: call.app.clone(),
        function: call.function.clone(),
        request_url: call.request_url.clone(),
        memory_mb: call.memory_mb,
        behaviour,
        body_bytes: 0,
        ending: Ending::Open,
        request_end: RequestEnd::Unknown,
        reset_before_trailers: None,
    });
    let ending = run(&state, index, behaviour, &call.headers, &mut inbound, &tx).await;
    state.update(index, |c| c.ending = ending);
}

async fn run(
    state: &State,
    index: usize,
    behaviour: Behaviour,
    request_headers: &[Header],
    inbound: &mut Streaming<ClientMsg>,
    tx: &Tx,
) -> Ending {
    if behaviour == Behaviour::NeverAcknowledge {
        stall(inbound, tx).await;
        return Ending::LbWentAway;
    }
    if behaviour == Behaviour::HangUpUnacknowledged {
        return Ending::Protocol;
    }
    if let Some((reason, details)) = match behaviour {
        Behaviour::RefuseTooLarge => Some((
            RefusalReason::TooLarge,
            "fake runner: call needs more memory than this runner has",
        )),
        Behaviour::RefuseInvalid => Some((
            RefusalReason::Invalid,
            "fake runner: this runner has no container engine",
        )),
        Behaviour::RefuseDraining => Some((RefusalReason::Draining, "fake runner: draining")),
        Behaviour::RefuseInvalidVerbosely => Some((RefusalReason::Invalid, "")),
        _ => None,
    } {
        let details = if behaviour == Behaviour::RefuseInvalidVerbosely {
            verbose_details()
        } else {
            details.into()
        };
        let refusal = runner_msg::Body::Acknowledged(CallAcknowledged {
            committed: false,
            details,
            slot_allocation_latency_us: 1,
            refusal: reason as i32,
            pool_version: 0,
        });
        return match send(tx, refusal).await {
            Ok(()) => Ending::Refused,
            Err(Gone) => Ending::LbWentAway,
        };
    }
    if behaviour == Behaviour::Refuse {
        return match send(tx, ack(false, 0)).await {
            Ok(()) => Ending::Refused,
            Err(Gone) => Ending::LbWentAway,
        };
    }
    if send(tx, ack(true, state.next_pool_version()))
        .await
        .is_err()
    {
        return Ending::LbWentAway;
    }
    match behaviour {
        Behaviour::Refuse
        | Behaviour::RefuseTooLarge
        | Behaviour::RefuseInvalid
        | Behaviour::RefuseDraining
        | Behaviour::RefuseInvalidVerbosely
        | Behaviour::NeverAcknowledge
        | Behaviour::HangUpUnacknowledged => Ending::Refused,
        Behaviour::CommitThenFail => {
            // An error status ends the stream; the dropped inbound half goes with it.
            match tx.send(Err(Status::unavailable("fake runner died"))).await {
                Ok(()) => Ending::Failed,
                Err(_) => Ending::LbWentAway,
            }
        }
        Behaviour::CommitThenHangUp => Ending::Failed, // dropping `tx` ends the stream
        Behaviour::CommitThenFailVerbosely => {
            let finished = runner_msg::Body::Finished(CallFinished {
                success: false,
                details: verbose_details(),
                kind: ErrorKind::Crashed as i32,
                pool_version: state.next_pool_version(),
            });
            match send(tx, finished).await {
                Ok(()) => Ending::Failed,
                Err(Gone) => Ending::LbWentAway,
            }
        }
        Behaviour::AnswerUnread => {
            let answer = [
                runner_msg::Body::ResultStart(CallResultStart {
                    cold_start_us: state.cold_start_us(index),
                    http: Some(HttpRespMeta {
                        status_code: 200,
                        headers: vec![Header {
                            name: "content-length".into(),
                            value: "6".into(),
                        }],
                    }),
                }),
                runner_msg::Body::Data(DataFrame {
                    data: b"unread".as_slice().into(),
                    eof: true,
                }),
                runner_msg::Body::Finished(CallFinished {
                    success: true,
                    details: String::new(),
                    kind: ErrorKind::None as i32,
                    pool_version: state.next_pool_version(),
                }),
            ];
            for msg in answer {
                if send(tx, msg).await.is_err() {
                    return Ending::LbWentAway;
                }
            }
            Ending::Completed
        }
        Behaviour::CommitThenStall => {
            stall(inbound, tx).await;
            Ending::LbWentAway
        }
        Behaviour::AnswerHeadFirst => {
            let answer = [
                runner_msg::Body::ResultStart(CallResultStart {
                    cold_start_us: state.cold_start_us(index),
                    http: Some(HttpRespMeta {
                        status_code: 200,
                        headers: Vec::new(),
                    }),
                }),
                runner_msg::Body::Data(DataFrame {
                    data: b"partial".as_slice().into(),
                    eof: false,
                }),
            ];
            for msg in answer {
                if send(tx, msg).await.is_err() {
                    return Ending::LbWentAway;
                }
            }
            stall(inbound, tx).await;
            Ending::LbWentAway
        }
        Behaviour::Echo
        | Behaviour::EchoLateTrailers
        | Behaviour::CommitThenDieMidResponse
        | Behaviour::AnswerHeadThenStall => {
            let body = match read_body(inbound, state, index).await {
                Body::Complete(body) => body,
                Body::LbWentAway => return Ending::LbWentAway,
                Body::Protocol => return Ending::Protocol,
            };
            let mut headers = vec![Header {
                name: "x-fake-runner".into(),
                value: state.name.clone().into(),
            }];
            let asked = |name: &[u8]| {
                request_headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse::<u32>().ok())
            };
            let status_code = asked(b"x-fake-status").unwrap_or(200);
            // A 204 or a 304 says nothing of a length, as a function that answers one would.
            if matches!(behaviour, Behaviour::Echo | Behaviour::EchoLateTrailers)
                && !matches!(status_code, 204 | 304)
            {
                // The length of the whole answer, as a function that knows it gives it.
                let length = asked(b"x-fake-length").map_or(body.len(), |n| n as usize);
                headers.push(Header {
                    name: "content-length".into(),
                    value: length.to_string().into(),
                });
            }
            headers.extend(
                request_headers
                    .iter()
                    .filter(|h| {
                        let name = h.name.to_ascii_lowercase();
                        name == b"content-type" || name.starts_with(b"x-echo-")
                    })
                    .cloned(),
            );
            let filler = Header {
                name: "x-filler".into(),
                value: "a".into(),
            };
            let fillers = asked(b"x-fake-headers").unwrap_or(0) as usize;
            headers.extend(std::iter::repeat_n(filler, fillers));
            let start = runner_msg::Body::ResultStart(CallResultStart {
                cold_start_us: state.cold_start_us(index),
                http: Some(HttpRespMeta {
                    status_code,
                    headers,
                }),
            });
            if send(tx, start).await.is_err() {
                return Ending::LbWentAway;
            }
            if !matches!(behaviour, Behaviour::Echo | Behaviour::EchoLateTrailers) {
                let partial = runner_msg::Body::Data(DataFrame {
                    data: b"partial".as_slice().into(),
                    eof: false,
                });
                if send(tx, partial).await.is_err() {
                    return Ending::LbWentAway;
                }
            }
            if behaviour == Behaviour::AnswerHeadThenStall {
                stall(inbound, tx).await;
                return Ending::LbWentAway;
            }
            if behaviour == Behaviour::CommitThenDieMidResponse {
                return match tx
                    .send(Err(Status::unavailable("fake runner died mid-response")))
                    .await
                {
                    Ok(()) => Ending::Failed,
                    Err(_) => Ending::LbWentAway,
                };
            }
            for chunk in body.chunks(MAX_FRAME) {
                let frame = runner_msg::Body::Data(DataFrame {
                    data: chunk.to_vec().into(),
                    eof: false,
                });
                if send(tx, frame).await.is_err() {
                    return Ending::LbWentAway;
                }
            }
            let eof = runner_msg::Body::Data(DataFrame {
                data: Vec::new().into(),
                eof: true,
            });
            let finished = runner_msg::Body::Finished(CallFinished {
                success: true,
                details: String::new(),
                kind: ErrorKind::None as i32,
                pool_version: state.next_pool_version(),
            });
            if send(tx, eof).await.is_err() || send(tx, finished).await.is_err() {
                return Ending::LbWentAway;
            }
            // The LB's half: it should end once the body is sent, not be reset later.
            let request_end = match tokio::time::timeout(REQUEST_END_BOUND, inbound.message()).await
            {
                Ok(Ok(None)) => RequestEnd::Closed,
                _ => RequestEnd::Reset,
            };
            state.update(index, |c| c.request_end = request_end);
            if behaviour == Behaviour::EchoLateTrailers {
                // A reset drops the response stream, which closes `tx`.
                let reset = tokio::time::timeout(LATE_TRAILERS, tx.closed())
                    .await
                    .is_ok();
                state.update(index, |c| c.reset_before_trailers = Some(reset));
            }
            Ending::Completed
        }
    }
}

/// Holds the stream open until the LB cancels it or stops listening. An LB that has sent
/// its whole request (half-closed) is still there.
async fn stall(inbound: &mut Streaming<ClientMsg>, tx: &Tx) {
    let lb_broke_off = async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => {}
                Ok(None) => std::future::pending::<()>().await,
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        () = tx.closed() => {}
        () = lb_broke_off => {}
    }
}
