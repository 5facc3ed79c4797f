//! [`RunnerClient`]: the LB's connection to one runner.
//!
//! One HTTP/2 connection per runner address ([`DirectChannel`]: every call is a stream on
//! it), dialled on first use and again once it has closed. The client is *available* until a
//! call finds the runner unreachable (connect failure, transport error, no acknowledgement in
//! time); it then becomes a placeholder: [`RunnerClient::try_call`] refuses at once, without
//! touching the network, while a background probe calls `Status` with backoff and makes the
//! client available again when the runner answers. The placeholder keeps its slot in the
//! runner list, so consistent hashing keeps every other runner's index.
//!
//! **Outlier ejection.** A runner that answers its health check but keeps failing calls
//! (it never acknowledges, its connection breaks) would come back after every probe and
//! cost the next call again. After [`ClientConfig::eject_after`] failures in a row without
//! an acknowledged call in between (the offers that fail together when it goes down count
//! as one), it is *ejected*: its first health check waits
//! `eject_initial`, doubled at each ejection in a row up to `eject_max`. An acknowledged
//! call (committed or refused) ends the streak. Ejections are logged and counted
//! ([`EjectionMetrics`]).
//!
//! **Reports.** With [`ClientConfig::watch_reports`] (the `warm` placer), the client keeps a
//! `WatchState` stream open to the runner and holds its latest report ([`Reports`]),
//! reconnecting with the probe's backoff when the stream fails or stays silent past
//! [`STALE_AFTER`](crate::reports::STALE_AFTER); a runner that does not
//! implement the RPC is never asked again, and placement treats it as unknown.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fn_lifecycle::retry::Backoff;
use fn_protocol::CallSpec;
use fn_protocol::batch::{self, Batch, Batches};
use fn_protocol::framing::{self, Decoded, ENGAGE_PATH, EncodeBody, Head};
use fn_protocol::runner::runner_protocol_client::RunnerProtocolClient;
use fn_protocol::runner::{
    ClientMsg, DataFrame, RefusalReason, RunnerMsg, RunnerStatus, client_msg, runner_msg,
};
use fn_tls::TlsMode;
use fn_tls::{DirectChannel, WithoutStatusDetails};
use futures::{FutureExt, Stream, StreamExt};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Service;

use crate::reports::{OfferedCall, Releaser, ReportMetrics, ReportSignal, Reports, STALE_AFTER};

/// The shortest wait for an acknowledgement that, passed in silence, marks the runner down
/// (a runner acknowledges in about a millisecond). An offer given a shorter bound (the
/// call's own wait was nearly over) is given up without blaming the runner.
pub const FAIR_ACK_WAIT: Duration = Duration::from_millis(200);

/// Offers under [`FAIR_ACK_WAIT`] given up in a row that mark a runner down.
pub const SHORT_OFFERS_DOWN: u32 = 3;

/// Timeouts of runner clients.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bound for opening a connection to a runner.
    pub connect_timeout: Duration,
    /// Bound from sending `TryCall` to receiving `CallAcknowledged`; past it the runner is
    /// treated as unreachable and the call is placed elsewhere.
    pub ack_timeout: Duration,
    /// First pause between probes of an unreachable runner; doubles up to `probe_max`.
    pub probe_initial: Duration,
    pub probe_max: Duration,
    /// Failures in a row (connect, transport, no acknowledgement in time) that eject a
    /// runner; see the module docs.
    pub eject_after: u32,
    /// How long a first ejection lasts before the runner's health check; doubles with each
    /// ejection in a row, up to `eject_max`.
    pub eject_initial: Duration,
    pub eject_max: Duration,
    /// Where ejections are counted.
    pub ejection_metrics: EjectionMetrics,
    /// Keep the runner's `WatchState` reports (see the module docs).
    pub watch_reports: bool,
    /// Woken by every report of every client built with this configuration, and by the
    /// ends of their calls. A pool gives each LB group its own ([`RunnerPool::report_signal`]).
    ///
    /// [`RunnerPool::report_signal`]: crate::RunnerPool::report_signal
    pub report_signal: ReportSignal,
    /// Where reports and report streams are counted.
    pub report_metrics: ReportMetrics,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(5),
            probe_initial: Duration::from_millis(100),
            probe_max: Duration::from_secs(5),
            eject_after: 5,
            eject_initial: Duration::from_secs(5),
            eject_max: Duration::from_secs(60),
            ejection_metrics: EjectionMetrics::default(),
            watch_reports: false,
            report_signal: ReportSignal::default(),
            report_metrics: ReportMetrics::default(),
        }
    }
}

/// `fn_lb_runner_ejections_total` and `fn_lb_runners_ejected`, shared by every client of
/// an LB (clones share the values).
#[derive(Debug, Clone, Default)]
pub struct EjectionMetrics {
    ejections: prometheus_client::metrics::counter::Counter,
    ejected: prometheus_client::metrics::gauge::Gauge,
}

impl EjectionMetrics {
    /// Metrics registered in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = EjectionMetrics::default();
        registry.register(
            "fn_lb_runner_ejections",
            "Runners ejected after failing calls too many times in a row",
            metrics.ejections.clone(),
        );
        registry.register(
            "fn_lb_runners_ejected",
            "Runners ejected now, waiting for their health check",
            metrics.ejected.clone(),
        );
        metrics
    }

    /// Ejections so far.
    pub fn ejections(&self) -> u64 {
        self.ejections.get()
    }

    /// Runners ejected now.
    pub fn ejected(&self) -> i64 {
        self.ejected.get()
    }
}

/// Why a call was not committed on a runner. Before a commit, every variant is safe to try
/// on another runner.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TryCallError {
    #[error("runner {address} refused the call ({reason:?}): {details}")]
    Refused {
        address: String,
        reason: RefusalReason,
        details: String,
    },
    #[error("runner {address} is unavailable (probing until it answers)")]
    Unavailable { address: String },
    #[error("runner {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("runner {address} broke the protocol before committing: {reason}")]
    Protocol { address: String, reason: String },
    /// The offer's bound, cut short by the call's own wait, passed before the runner
    /// answered; the runner is not blamed (see [`FAIR_ACK_WAIT`]).
    #[error("gave up on runner {address} after {bound:?}: the call's wait was over")]
    GaveUp { address: String, bound: Duration },
    /// The call cannot be offered to any runner (its opening message is larger than runners
    /// accept); found before anything was sent.
    #[error("the call cannot be sent to runner {address}: {reason}")]
    Unsendable { address: String, reason: String },
}

impl TryCallError {
    /// Whether the runner said the call itself is invalid (so no runner will take it).
    pub fn is_invalid_call(&self) -> bool {
        matches!(
            self,
            TryCallError::Refused {
                reason: RefusalReason::Invalid,
                ..
            } | TryCallError::Unsendable { .. }
        )
    }

    /// Whether the runner refused the call because it drains (it is stopping, or scaled
    /// down).
    pub fn is_draining(&self) -> bool {
        matches!(
            self,
            TryCallError::Refused {
                reason: RefusalReason::Draining,
                ..
            }
        )
    }

    /// The runner's address and what it said of a refused call; `None` for the other
    /// failures.
    pub fn refusal(&self) -> Option<(&str, &str)> {
        match self {
            TryCallError::Refused {
                address, details, ..
            }
            | TryCallError::Unsendable {
                address,
                reason: details,
            } => Some((address, details)),
            _ => None,
        }
    }

    /// Whether the runner said the call needs more memory than it has in all.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            TryCallError::Refused {
                reason: RefusalReason::TooLarge,
                ..
            }
        )
    }
}

/// A connection to one runner.
#[derive(Debug)]
pub struct RunnerClient {
    id: String,
    address: String,
    /// `Status` and `WatchState` (see [`WithoutStatusDetails`]).
    client: RunnerProtocolClient<WithoutStatusDetails<DirectChannel>>,
    /// The connection under `client`, for Engage (see [`RunnerClient::engage`]).
    channel: DirectChannel,
    /// `http://host:port/<Engage's path>`.
    engage_uri: http::Uri,
    config: ClientConfig,
    available: AtomicBool,
    /// Set while a probe task runs, so a burst of failures starts only one.
    probing: AtomicBool,
    /// Failures since the last acknowledged call.
    failures: AtomicU32,
    /// Offers given up in a row without an acknowledgement, each under [`FAIR_ACK_WAIT`]:
    /// a runner that answers none of [`SHORT_OFFERS_DOWN`] is marked down all the same.
    gave_up: AtomicU32,
    /// Ejections since the last acknowledged call: the next ejection lasts longer.
    ejections: AtomicU32,
    /// Set while ejected (counted in `fn_lb_runners_ejected`).
    ejected: AtomicBool,
    /// No health check before this while ejected.
    ejected_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The runner's latest `WatchState` report, when watched.
    reports: Arc<Reports>,
    /// Stops the probe and the report watch when the client is dropped from every list.
    cancel: CancellationToken,
}

impl RunnerClient {
    /// A client for the runner at `address` (`host:port`). Connects lazily.
    ///
    /// # Errors
    /// When the address is not a valid `host:port`.
    pub fn new(
        id: impl Into<String>,
        address: impl Into<String>,
        tls: &TlsMode,
        config: ClientConfig,
    ) -> Result<Arc<Self>, tonic::codegen::http::uri::InvalidUri> {
        let address = address.into();
        // Straight to hyper's HTTP/2 connection: tonic's `Channel` would put a buffer task
        // in the way of every call (see `DirectChannel`).
        let channel = DirectChannel::new(tls, &address, config.connect_timeout)?;
        let reports = Arc::new(Reports::with_signal(config.report_signal.clone()));
        let engage_uri = format!("http://{address}{ENGAGE_PATH}").parse()?;
        let client = Arc::new(RunnerClient {
            id: id.into(),
            address,
            client: RunnerProtocolClient::with_origin(
                WithoutStatusDetails(channel.clone()),
                channel.origin(),
            ),
            channel,
            engage_uri,
            config,
            available: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            gave_up: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            ejected_until: std::sync::Mutex::new(None),
            reports,
            cancel: CancellationToken::new(),
        });
        if client.config.watch_reports {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(watch_reports(
                        client.address.clone(),
                        client.client.clone(),
                        Arc::clone(&client.reports),
                        Backoff::new(client.config.probe_initial, client.config.probe_max),
                        client.config.report_metrics.clone(),
                        client.cancel.clone(),
                    ));
                }
                Err(_) => {
                    tracing::warn!(runner = %client.address, "no async runtime: this runner's reports are not watched");
                }
            }
        }
        Ok(client)
    }

    /// The runner's latest report (empty unless [`ClientConfig::watch_reports`]).
    pub fn reports(&self) -> &Reports {
        &self.reports
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// False while the runner is a placeholder (unreachable, being probed).
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    /// Offers `call` to the runner, with the request body when `early` holds all of it (the
    /// runner discards it if it refuses; the caller keeps it for the next runner). On commit,
    /// the call belongs to this runner: the caller streams the rest of the body, if any,
    /// through the returned [`Engaged`] and must never place it again.
    ///
    /// # Errors
    /// [`TryCallError`] when the call was not committed (refused, unreachable, ...).
    pub async fn try_call(
        self: &Arc<Self>,
        call: &CallSpec,
        early: &EarlyBody,
    ) -> Result<Engaged, TryCallError> {
        let bound = self.config.connect_timeout + self.config.ack_timeout;
        self.try_call_within(call, early, bound).await
    }

    /// [`RunnerClient::try_call`], waiting at most `bound` (and never longer than the
    /// connect and acknowledgement timeouts together) for the runner's acknowledgement. A
    /// runner that gives none in time is marked down, as one that cannot be reached, unless
    /// `bound` was under [`FAIR_ACK_WAIT`]: the call was not committed, and its stream is
    /// reset, so the caller may offer it to another runner.
    ///
    /// # Errors
    /// As [`RunnerClient::try_call`].
    pub async fn try_call_within(
        self: &Arc<Self>,
        call: &CallSpec,
        early: &EarlyBody,
        bound: Duration,
    ) -> Result<Engaged, TryCallError> {
        if !self.is_available() {
            return Err(TryCallError::Unavailable {
                address: self.address.clone(),
            });
        }
        // Counted in the runner's view until a report shows it, or until it is refused or
        // given up (dropped).
        let offered = self.config.watch_reports.then(|| OfferedCall::of(call));
        let offer = offered.as_ref().map(|c| self.reports.offer(c));
        // The stream opens with the TryCall, which the request body encodes first; then the
        // body's messages.
        let (requests, sender) = if early.complete {
            // The whole call in one write: TryCall, the body, its eof and the request
            // half's end; no channel for more.
            let mut first = Vec::with_capacity(early.chunks.len() + 1);
            first.extend(
                early
                    .chunks
                    .iter()
                    .map(|chunk| data_msg(chunk.clone(), false)),
            );
            first.push(data_msg(Bytes::new(), true));
            (batch::only(first), None)
        } else {
            let (tx, rx) = mpsc::channel::<Batch<ClientMsg>>(4);
            (batch::batches(rx), Some(tx))
        };
        let requests = EncodeBody::opening_with(call, requests).map_err(|status| {
            TryCallError::Unsendable {
                address: self.address.clone(),
                reason: status.message().to_owned(),
            }
        })?;
        // Fair or not as the caller gave it: the client's own bound may be shorter.
        let fair = bound >= FAIR_ACK_WAIT;
        let bound = bound.min(self.config.connect_timeout + self.config.ack_timeout);
        let handshake = async {
            let mut responses = self
                .engage(requests)
                .await
                .map_err(|status| self.unreachable(&status))?;
            let first = responses
                .next()
                .await
                .transpose()
                .map_err(|status| self.unreachable(&status))?;
            Ok::<_, TryCallError>((first, responses))
        };
        let (first, responses) = match tokio::time::timeout(bound, handshake).await {
            Ok(result) => result?,
            Err(_) if !fair => {
                // The call's wait ran out, not the runner's fair chance to answer; but a
                // runner that answers none of several such offers is down all the same (a
                // group of short calls only would never find it out).
                if self.gave_up.fetch_add(1, Ordering::Relaxed) + 1 >= SHORT_OFFERS_DOWN {
                    self.gave_up.store(0, Ordering::Relaxed);
                    return Err(self.mark_down(format!(
                        "no acknowledgement to {SHORT_OFFERS_DOWN} short offers in a row"
                    )));
                }
                return Err(TryCallError::GaveUp {
                    address: self.address.clone(),
                    bound,
                });
            }
            Err(_) => {
                return Err(self.mark_down(format!("no acknowledgement within {bound:?}")));
            }
        };
        let first = first.and_then(|m| m.body);
        if matches!(first, Some(runner_msg::Body::Acknowledged(_))) {
            // The runner answers calls: the streak of failures is over.
            self.failures.store(0, Ordering::Relaxed);
            self.gave_up.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
        }
        match first {
            Some(runner_msg::Body::Acknowledged(ack)) if ack.committed => {
                if let Some(offer) = offer {
                    offer.taken(ack.pool_version);
                }
                Ok(Engaged {
                    runner: self.address.clone(),
                    slot_latency: Duration::from_micros(ack.slot_allocation_latency_us),
                    sender: sender.map(BodySender),
                    responses,
                    release: offered
                        .is_none()
                        .then(|| self.reports.signal().releaser(&call.app, &call.function)),
                    report: offered.map(|c| (Arc::clone(&self.reports), c)),
                    finished: None,
                    clean: false,
                })
            }
            Some(runner_msg::Body::Acknowledged(ack)) => {
                if let Some(offer) = offer
                    && matches!(
                        ack.refusal(),
                        RefusalReason::TooLarge | RefusalReason::Invalid
                    )
                {
                    offer.refused_as_unfit();
                }
                Err(TryCallError::Refused {
                    address: self.address.clone(),
                    reason: ack.refusal(),
                    details: fn_protocol::cut_details(ack.details),
                })
            }
            Some(runner_msg::Body::Finished(f)) => Err(self.unanswered(format!(
                "finished before acknowledging: {}",
                fn_protocol::cut_details(f.details)
            ))),
            Some(_) => Err(self.unanswered("first message was not CallAcknowledged")),
            None => Err(self.unanswered("stream ended without an acknowledgement")),
        }
    }

    /// An offer the runner answered with something other than an acknowledgement: a
    /// protocol breach, and a failure like no answer at all. The runner is marked down
    /// (its probe brings it back) and the failure counts towards its ejection; otherwise a
    /// runner whose health check passes but whose call service is broken would cost every
    /// call a round trip for as long as it ran.
    fn unanswered(self: &Arc<Self>, reason: impl Into<String>) -> TryCallError {
        let reason = reason.into();
        let _down = self.mark_down(format!("protocol: {reason}"));
        self.protocol(reason)
    }

    /// The runner's `Status`, bounded by the connect and ack timeouts.
    ///
    /// # Errors
    /// The gRPC status, or `DeadlineExceeded` when the runner does not answer in time.
    pub async fn status(&self) -> Result<RunnerStatus, tonic::Status> {
        let mut client = self.client.clone();
        let bound = self.config.connect_timeout + self.config.ack_timeout;
        match tokio::time::timeout(bound, client.status(())).await {
            Ok(reply) => reply.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "runner {} did not answer Status within {bound:?}",
                self.address
            ))),
        }
    }

    /// Opens the Engage stream with `requests` as its request half, in
    /// [`fn_protocol::framing`]'s framing rather than tonic's codec: the same bytes on the
    /// wire, without copying the body's chunks at either end of the LB.
    async fn engage(
        &self,
        requests: EncodeBody<Batches<ClientMsg>>,
    ) -> Result<Decoded<RunnerMsg, Incoming>, tonic::Status> {
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.engage_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(tonic::body::Body::new(requests))
            .map_err(|e| {
                tonic::Status::internal(format!("cannot build the Engage request: {e}"))
            })?;
        let response = self.channel.clone().call(request).await?;
        let (head, body) = response.into_parts();
        Ok(
            match framing::check_response_head(head.status, &head.headers)? {
                Head::Stream => Decoded::response(body),
                Head::TrailersOnly => Decoded::empty(body),
            },
        )
    }

    fn protocol(&self, reason: impl Into<String>) -> TryCallError {
        TryCallError::Protocol {
            address: self.address.clone(),
            reason: reason.into(),
        }
    }

    fn unreachable(self: &Arc<Self>, status: &tonic::Status) -> TryCallError {
        // The message is the peer's words: cut and on one line.
        let words = fn_protocol::cut_details(status.message().to_owned());
        self.mark_down(format!("{}: {words}", status.code()))
    }

    /// Probes the runner until it answers, then makes the client available again (nothing
    /// else does). Called with `probing` just set. A probe task that ends by a panic clears
    /// `probing` and starts the next probe ([`Probing`]), so that one probe gone wrong cannot
    /// leave the runner out of service for good.
    fn probe(self: &Arc<Self>) {
        self.probe_with(Backoff::new(
            self.config.probe_initial,
            self.config.probe_max,
        ));
    }

    /// [`RunnerClient::probe`], the first probe `backoff`'s first delay away.
    fn probe_with(self: &Arc<Self>, backoff: Backoff) {
        let this = Arc::downgrade(self);
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let mut probing = Probing(Some(this.clone()));
            probe_until_up(this, cancel, backoff).await;
            probing.0 = None; // ended as it should
        });
    }

    fn ejected_until(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.ejected_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the runner is ejected now (see the module docs).
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// How long an ejection lasts after `earlier` ejections in a row.
    fn ejection_time(&self, earlier: u32) -> Duration {
        let factor = 2u32.saturating_pow(earlier.min(16));
        self.config
            .eject_initial
            .saturating_mul(factor)
            .min(self.config.eject_max)
    }

    /// Turns the client into a placeholder and starts probing the runner; ejects it after
    /// `eject_after` failures in a row.
    fn mark_down(self: &Arc<Self>, reason: String) -> TryCallError {
        let was_available = self.available.swap(false, Ordering::AcqRel);
        // One incident fails every offer in flight on the runner together (calls queued
        // behind one failed dial, say): only the one that took the runner down counts, so
        // the streak counts the times it went down, not how busy it was then.
        let failures = if was_available {
            self.failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        if failures >= self.config.eject_after.max(1) {
            self.failures.store(0, Ordering::Relaxed);
            let ejection = self.ejection_time(self.ejections.fetch_add(1, Ordering::Relaxed));
            *self.ejected_until() = Some(tokio::time::Instant::now() + ejection);
            let metrics = &self.config.ejection_metrics;
            metrics.ejections.inc();
            if !self.ejected.swap(true, Ordering::AcqRel) {
                metrics.ejected.inc();
            }
            tracing::warn!(
                runner = %self.address, %reason, failures, ejected_for = ?ejection,
                "runner ejected: its calls failed too many times in a row; it returns after its health check passes"
            );
        } else if was_available {
            tracing::warn!(runner = %self.address, %reason, "runner unreachable; probing until it answers");
        }
        if !self.probing.swap(true, Ordering::AcqRel) {
            self.probe();
        }
        TryCallError::Unreachable {
            address: self.address.clone(),
            reason,
        }
    }
}

/// Keeps the runner's `WatchState` stream open and its latest report in `reports`, until
/// `cancel`; see the module docs.
async fn watch_reports(
    address: String,
    mut client: RunnerProtocolClient<WithoutStatusDetails<DirectChannel>>,
    reports: Arc<Reports>,
    mut backoff: Backoff,
    metrics: ReportMetrics,
    cancel: CancellationToken,
) {
    loop {
        // A runner that answers pings but never the RPC is asked again after the backoff.
        let opened = tokio::select! {
            () = cancel.cancelled() => return,
            opened = tokio::time::timeout(STALE_AFTER, client.watch_state(())) => opened,
        };
        let opened = opened.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {STALE_AFTER:?}"
            )))
        });
        match opened {
            Ok(stream) => {
                tracing::debug!(runner = %address, "runner report stream open");
                let _open = metrics.stream_open();
                let mut stream = stream.into_inner();
                loop {
                    // A runner reports at least once a second: a stream silent for longer
                    // than a report stays fresh has stalled, and is opened anew.
                    let next = tokio::select! {
                        () = cancel.cancelled() => return,
                        next = tokio::time::timeout(STALE_AFTER, stream.message()) => next,
                    };
                    let Ok(next) = next else {
                        tracing::debug!(runner = %address, silent_for = ?STALE_AFTER, "runner report stream silent; opening it again");
                        break;
                    };
                    match next {
                        Ok(Some(state)) => {
                            metrics.received();
                            reports.update(state);
                            backoff.reset();
                        }
                        Ok(None) => {
                            tracing::debug!(runner = %address, "runner ended its report stream");
                            break;
                        }
                        Err(status) => {
                            tracing::debug!(runner = %address, error = %status, "runner report stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(runner = %address, "runner sends no reports (an older version): placing on it as ch does");
                reports.clear();
                return;
            }
            Err(status) => {
                tracing::debug!(runner = %address, error = %status, "runner report stream not opened");
            }
        }
        reports.clear();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

impl Drop for RunnerClient {
    fn drop(&mut self) {
        self.cancel.cancel();
        if self.ejected.load(Ordering::Acquire) {
            self.config.ejection_metrics.ejected.dec();
        }
    }
}

/// A call committed on a runner: the body goes out through it, the result comes back.
///
/// The stream ends cleanly only when both halves do: the request half when the
/// [`BodySender`] taken with [`Engaged::take_body_sender`] is dropped after the body's `eof`,
/// the response half when [`Engaged::next`] has returned `Ok(None)` (the runner's trailers).
/// Dropping an `Engaged` before that resets the stream (`RST_STREAM`), which is how a call
/// is cancelled; resetting finished calls as well would make h2 count every late frame of
/// a forgotten stream against the connection's reset budget and tear the connection down.
#[derive(Debug)]
pub struct Engaged {
    /// Address of the runner that owns the call.
    pub runner: String,
    /// The runner's time to reserve capacity.
    pub slot_latency: Duration,
    sender: Option<BodySender>,
    responses: Decoded<RunnerMsg, Incoming>,
    /// Where the call's end is counted until the runner's next report, when reports are
    /// watched.
    report: Option<(Arc<Reports>, OfferedCall)>,
    /// When reports are not watched: what wakes a call of the function waiting for room
    /// (with a `ch` or `naive` placer, one pausing between passes) once this call leaves its
    /// instance idle.
    release: Option<Releaser>,
    /// The `pool_version` of the runner's `CallFinished{success}`, once seen.
    finished: Option<u64>,
    /// The stream ended after a `CallFinished{success}`: the runner keeps the instance.
    clean: bool,
}

impl Drop for Engaged {
    fn drop(&mut self) {
        let version = self.finished.filter(|_| self.clean);
        if let Some((reports, call)) = self.report.take() {
            reports.finished(&call, version);
        }
        if let Some(release) = self.release.take()
            && version.is_some()
        {
            release.release();
        }
    }
}

/// The runner stopped reading the request body (it finished or failed the call); the
/// outcome arrives on the response stream.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the runner no longer reads the request body")]
pub struct BodyClosed;

impl Engaged {
    /// The request body's sender; `None` when it was already taken, or when the whole
    /// body went with the `TryCall`. Sending `eof` closes the request half of the stream.
    pub fn take_body_sender(&mut self) -> Option<BodySender> {
        self.sender.take()
    }

    /// Notes what the runner sent: its `CallFinished{success}`, then the stream's end. Every
    /// message the caller reads passes here, whichever way it is read.
    fn observe(&mut self, msg: Option<&Result<RunnerMsg, tonic::Status>>) {
        match msg {
            Some(Ok(RunnerMsg {
                body: Some(runner_msg::Body::Finished(f)),
            })) if f.success => self.finished = Some(f.pool_version),
            None => self.clean = self.finished.is_some(),
            Some(_) => {}
        }
    }

    /// The next message from the runner, for callers that poll (a response body).
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<RunnerMsg, tonic::Status>>> {
        let polled = std::pin::Pin::new(&mut self.responses).poll_next(cx);
        if let std::task::Poll::Ready(msg) = &polled {
            self.observe(msg.as_ref());
        }
        polled
    }

    /// The next message from the runner; `None` when the stream ended.
    ///
    /// # Errors
    /// The gRPC status when the stream failed (runner died, connection lost).
    pub async fn next(&mut self) -> Result<Option<RunnerMsg>, tonic::Status> {
        let msg = self.responses.next().await;
        self.observe(msg.as_ref());
        msg.transpose()
    }

    /// After `CallFinished`: reads the rest of the response stream (the runner's trailers)
    /// so that the stream closes cleanly rather than being reset. Gives up after `bound`.
    /// Returns whether the stream ended cleanly; anything else has been logged.
    pub async fn finish(&mut self, bound: Duration) -> bool {
        match tokio::time::timeout(bound, self.next()).await {
            Ok(end) => self.ended(end),
            Err(_elapsed) => {
                tracing::debug!(runner = %self.runner, ?bound, "no end of stream after CallFinished");
                false
            }
        }
    }

    /// [`Engaged::finish`] without waiting: `None` when nothing has arrived yet, else
    /// whether the stream ended cleanly.
    pub fn finish_now(&mut self) -> Option<bool> {
        let end = self.next().now_or_never()?;
        Some(self.ended(end))
    }

    /// What followed `CallFinished`: the stream's end is clean, anything else is logged.
    fn ended(&mut self, end: Result<Option<RunnerMsg>, tonic::Status>) -> bool {
        match end {
            Ok(None) => self.clean,
            Ok(Some(_)) => {
                tracing::warn!(runner = %self.runner, "protocol error: a message after CallFinished");
                false
            }
            Err(status) => {
                tracing::debug!(runner = %self.runner, error = %status, "stream failed after CallFinished");
                false
            }
        }
    }
}

/// Sends request body frames of an [`Engaged`] call.
#[derive(Debug)]
pub struct BodySender(mpsc::Sender<Batch<ClientMsg>>);

impl BodySender {
    /// Sends one chunk; `eof` marks the last and ends the request half of the stream with it.
    ///
    /// # Errors
    /// [`BodyClosed`] when the runner's side is gone.
    pub async fn send(&self, data: Bytes, eof: bool) -> Result<(), BodyClosed> {
        let batch = Batch {
            messages: vec![data_msg(data, eof)],
            last: eof,
        };
        self.0.send(batch).await.map_err(|_| BodyClosed)
    }
}

fn data_msg(data: Bytes, eof: bool) -> ClientMsg {
    ClientMsg {
        body: Some(client_msg::Body::Data(DataFrame { data, eof })),
    }
}

/// Request body bytes read before placement, without waiting for more.
#[derive(Debug, Clone, Default)]
pub struct EarlyBody {
    pub chunks: Vec<Bytes>,
    /// The body ends with these chunks: it goes with the `TryCall`.
    pub complete: bool,
}

/// The loop of [`RunnerClient::probe`]: health checks with backoff (none while ejected)
/// until one passes, the client is dropped, or `cancel`.
async fn probe_until_up(this: Weak<RunnerClient>, cancel: CancellationToken, mut backoff: Backoff) {
    loop {
        let mut wake = tokio::time::Instant::now() + backoff.next_delay();
        loop {
            // Read again after each sleep: an ejection may have begun during it.
            if let Some(client) = this.upgrade()
                && let Some(until) = *client.ejected_until()
            {
                wake = wake.max(until);
            }
            if tokio::time::Instant::now() >= wake {
                break;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        let Some(client) = this.upgrade() else { return };
        #[cfg(test)]
        tests::panic_if_asked(&client.address);
        match client.status().await {
            Ok(_) => {
                // Clear `probing` first: a failure right after `available`
                // flips must be able to start a new probe.
                client.probing.store(false, Ordering::Release);
                *client.ejected_until() = None;
                client.available.store(true, Ordering::Release);
                if client.ejected.swap(false, Ordering::AcqRel) {
                    client.config.ejection_metrics.ejected.dec();
                    tracing::info!(runner = %client.address, "ejected runner passed its health check; back in service");
                } else {
                    tracing::info!(runner = %client.address, "runner reachable again");
                }
                return;
            }
            Err(status) => {
                tracing::debug!(runner = %client.address, error = %status, "probe failed");
            }
        }
    }
}

/// Held by a probe task. Dropped with its `Weak` still in it, the task ended other than by
/// its loop's end: by a panic (then `probing` is cleared and the next probe starts, at
/// `probe_max`, where the client would stay a placeholder with `probing` set, taking no
/// call and probed by no one), or with its runtime (then `probing` is only cleared).
struct Probing(Option<Weak<RunnerClient>>);

impl Drop for Probing {
    fn drop(&mut self) {
        let Some(client) = self.0.take().and_then(|this| this.upgrade()) else {
            return;
        };
        client.probing.store(false, Ordering::Release);
        if std::thread::panicking()
            && !client.cancel.is_cancelled()
            && !client.is_available()
            && tokio::runtime::Handle::try_current().is_ok()
            && !client.probing.swap(true, Ordering::AcqRel)
        {
            // At the slowest pace: a probe that panics every time (one runner's malformed
            // answer, say) probes, and logs this, once every `probe_max`, not at the first
            // delay over and over.
            let slowest = client.config.probe_max;
            tracing::error!(runner = %client.address, again_in = ?slowest, "a probe of the runner panicked; probing it again");
            client.probe_with(Backoff::new(slowest, slowest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fn_test_support::TestPki;
    use fn_test_support::fake_runner::{Behaviour, FakeRunner};

    /// Addresses whose next probe panics.
    static PANIC_NEXT_PROBE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    /// The test seam of [`probe_until_up`]: panics if a test asked that `address`'s next probe
    /// panic.
    pub(super) fn panic_if_asked(address: &str) {
        let mut asked = PANIC_NEXT_PROBE.lock().expect("lock");
        if let Some(i) = asked.iter().position(|a| a == address) {
            asked.remove(i);
            drop(asked);
            panic!("test: the probe of {address} panics");
        }
    }

    /// Waits until `client` is available again, failing with `why` after 5 s.
    async fn available_within_5s(client: &RunnerClient, why: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !client.is_available() {
            assert!(tokio::time::Instant::now() < deadline, "{why}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A probe that panics does not leave its runner a placeholder for good: the next probe
    /// finds the runner up and makes it available again.
    #[tokio::test]
    async fn a_probe_that_panics_is_followed_by_another() {
        let pki = TestPki::new();
        let runner = FakeRunner::start("up", &pki.mode(), Behaviour::Echo)
            .await
            .expect("a fake runner");
        let config = ClientConfig {
            probe_initial: Duration::from_millis(10),
            probe_max: Duration::from_millis(50),
            ..ClientConfig::default()
        };
        let client =
            RunnerClient::new("r", runner.address(), &pki.mode(), config).expect("a client");
        PANIC_NEXT_PROBE
            .lock()
            .expect("lock")
            .push(runner.address().to_owned());
        drop(client.mark_down("test: down".into()));
        assert!(!client.is_available());
        available_within_5s(&client, "still a placeholder 5 s after a probe panicked").await;
        assert!(
            !PANIC_NEXT_PROBE
                .lock()
                .expect("lock")
                .iter()
                .any(|a| a == runner.address()),
            "the first probe panicked"
        );
    }

    /// Probes that panic every time come once every `probe_max`, not at the first delay
    /// over and over; the runner is back once one does not.
    #[tokio::test]
    async fn probes_that_keep_panicking_come_at_the_slowest_pace() {
        let pki = TestPki::new();
        let runner = FakeRunner::start("up", &pki.mode(), Behaviour::Echo)
            .await
            .expect("a fake runner");
        let probe_max = Duration::from_millis(200);
        let config = ClientConfig {
            probe_initial: Duration::from_millis(10),
            probe_max,
            ..ClientConfig::default()
        };
        let client =
            RunnerClient::new("r", runner.address(), &pki.mode(), config).expect("a client");
        let address = runner.address().to_owned();
        let asked = 1000;
        PANIC_NEXT_PROBE
            .lock()
            .expect("lock")
            .extend(std::iter::repeat_n(address.clone(), asked));
        drop(client.mark_down("test: down".into()));
        let watched = Duration::from_millis(1200);
        tokio::time::sleep(watched).await;
        let panicked = {
            let mut left = PANIC_NEXT_PROBE.lock().expect("lock");
            let remaining = left.iter().filter(|a| **a == address).count();
            left.retain(|a| *a != address);
            asked - remaining
        };
        // The first at 10 ms, then one every 140-260 ms (probe_max with its jitter).
        assert!(
            (1..=12).contains(&panicked),
            "{panicked} probes panicked in {watched:?}"
        );
        available_within_5s(
            &client,
            "still a placeholder 5 s after the probes stopped panicking",
        )
        .await;
    }
}
