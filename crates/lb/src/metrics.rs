//! The lb-agent's Prometheus metric families, registered into the registry `main` passes in.
//!
//! Owns the families and the mapping of how a call ended to a small fixed `outcome` label;
//! does not own the scrape endpoint (`fn_lifecycle::metrics`). No label carries anything a
//! client chooses (no call ids, no paths): cardinality stays bounded.
//!
//! - `fn_lb_calls_total{outcome}`: requests for a function, by how they ended. A request
//!   refused before it became a call (404, 405, shutting down) is counted here too, but not in
//!   the duration histogram nor in flight.
//! - `fn_lb_call_duration_seconds`: arrival to the end of the call (last response byte, or
//!   the failure).
//! - `fn_lb_placement_seconds`: arrival at the placer to a runner's commit.
//! - `fn_lb_placement_attempts_total`: `TryCall`s sent to runners (committed or refused).
//! - `fn_lb_calls_in_flight`: calls between arrival and their end.
//! - `fn_lb_execution_seconds`: a runner's commit to the function's response head, without
//!   the cold start.
//! - `fn_lb_cold_start_seconds{app,function}` and `fn_lb_cold_starts_total{app,function}`:
//!   calls that waited for a new instance, and how long (functions come from the catalog, so
//!   these labels stay bounded too).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::error::CallError;

/// How a request for a function ended: the `outcome` label of `fn_lb_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallOutcome {
    /// The function's whole answer reached the client.
    Success,
    NotFound,
    MethodNotAllowed,
    TooLarge,
    /// The client's request body could not be read.
    BadRequest,
    /// No runner had room before the placer deadline (503).
    NoCapacity,
    /// 503: the group has no runner, or none could be asked.
    NoRunnerReachable,
    /// No runner of the group is large enough for the function (503 at once).
    NoRunnerLargeEnough,
    /// The runners refuse the function itself (a catalog problem).
    Unrunnable,
    /// The function passed its timeout (504).
    Timeout,
    /// The runner or the function failed after the runner committed (502 or a cut-off body).
    RunnerFailed,
    /// The client went away before the call ended.
    ClientGone,
    /// The lb-agent was shutting down.
    ShuttingDown,
    /// 503: the request came on a client connection being closed to make room at
    /// `FN_MAX_CONNECTIONS`.
    ConnectionShed,
}

impl CallOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Success => "success",
            CallOutcome::NotFound => "not_found",
            CallOutcome::MethodNotAllowed => "method_not_allowed",
            CallOutcome::TooLarge => "too_large",
            CallOutcome::BadRequest => "bad_request",
            CallOutcome::NoCapacity => "no_capacity",
            CallOutcome::NoRunnerReachable => "no_runner_reachable",
            CallOutcome::NoRunnerLargeEnough => "no_runner_large_enough",
            CallOutcome::Unrunnable => "unrunnable",
            CallOutcome::Timeout => "timeout",
            CallOutcome::RunnerFailed => "runner_failed",
            CallOutcome::ClientGone => "client_gone",
            CallOutcome::ShuttingDown => "shutting_down",
            CallOutcome::ConnectionShed => "connection_shed",
        }
    }

    /// The client's own doing (a request too large or malformed, a body that stalled, a
    /// client gone): logged at debug level, as [`CallError::is_clients`] is.
    pub fn is_clients(self) -> bool {
        matches!(
            self,
            CallOutcome::TooLarge | CallOutcome::BadRequest | CallOutcome::ClientGone
        )
    }
}

impl From<&CallError> for CallOutcome {
    fn from(err: &CallError) -> Self {
        match err {
            CallError::NotFound(_) | CallError::NoTunnel { .. } => CallOutcome::NotFound,
            CallError::MethodNotAllowed { .. } => CallOutcome::MethodNotAllowed,
            CallError::TooLarge { .. } => CallOutcome::TooLarge,
            CallError::BadRequest(_)
            | CallError::UserinfoInTarget
            | CallError::UnsupportedScheme(_)
            | CallError::AsteriskNotOptions(_)
            | CallError::UnsupportedTransferCoding(_)
            | CallError::UriTooLong { .. }
            | CallError::TooManyHeaders { .. }
            | CallError::BodyStalled(_) => CallOutcome::BadRequest,
            CallError::NoCapacity { .. } => CallOutcome::NoCapacity,
            CallError::NoRunnerReachable { .. } => CallOutcome::NoRunnerReachable,
            CallError::NoRunnerLargeEnough { .. } => CallOutcome::NoRunnerLargeEnough,
            CallError::Unrunnable { .. } => CallOutcome::Unrunnable,
            CallError::Timeout(..) | CallError::TimedOutUnplaced { .. } => CallOutcome::Timeout,
            CallError::RunnerFailed { .. } => CallOutcome::RunnerFailed,
            CallError::ShuttingDown => CallOutcome::ShuttingDown,
            CallError::ConnectionClosing => CallOutcome::ConnectionShed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The lb-agent's metric families. Cheap to clone: clones share the same values.
#[derive(Debug, Clone)]
pub struct LbMetrics {
    calls: Family<OutcomeLabel, Counter>,
    call_duration: Histogram,
    placement: Histogram,
    placement_attempts: Counter,
    in_flight: Gauge,
    connections: Gauge,
    connections_shed: Family<ShedLabel, Counter>,
    execution: Histogram,
    cold_start: HistogramFamily<FunctionLabel>,
    cold_starts: Family<FunctionLabel, Counter>,
    /// The functions the per-function families have series for, and those of the catalog.
    functions: Arc<Mutex<Functions>>,
}

/// Which functions may have per-function series. One lock over both sets, so that a
/// series is never created between a reload's removal of its function and its record.
#[derive(Debug, Default)]
struct Functions {
    /// Those the families have series for, so that those of functions gone from the
    /// catalog can be removed (a family cannot be listed).
    series: HashSet<FunctionLabel>,
    /// The catalog's, as of the last reload (`None` before one: any function). A call
    /// started before a reload still holds its function's old spec; when its answer comes,
    /// a function not among these gets no series back.
    catalog: Option<HashSet<FunctionLabel>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FunctionLabel {
    app: String,
    function: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn cold_start_histogram() -> Histogram {
    // 1 ms .. about 32 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShedLabel {
    reason: &'static str,
}

impl LbMetrics {
    /// Creates the families and registers them in `registry` (once per registry).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = LbMetrics {
            calls: Family::default(),
            // 5 ms .. about 80 s.
            call_duration: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 0.5 ms .. about 16 s (FN_PLACER_TIMEOUT is 10 s by default).
            placement: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            placement_attempts: Counter::default(),
            in_flight: Gauge::default(),
            connections: Gauge::default(),
            connections_shed: Family::default(),
            // 0.25 ms .. about 16 s.
            execution: Histogram::new(exponential_buckets(0.00025, 2.0, 17)),
            cold_start: Family::new_with_constructor(cold_start_histogram),
            cold_starts: Family::default(),
            functions: Arc::default(),
        };
        registry.register(
            "fn_lb_calls",
            "Requests for a function, by how they ended",
            metrics.calls.clone(),
        );
        registry.register_with_unit(
            "fn_lb_call_duration",
            "Time from a call's arrival to its end",
            Unit::Seconds,
            metrics.call_duration.clone(),
        );
        registry.register_with_unit(
            "fn_lb_placement",
            "Time from a call's arrival at the placer to a runner's commit",
            Unit::Seconds,
            metrics.placement.clone(),
        );
        registry.register(
            "fn_lb_placement_attempts",
            "Calls offered to runners (TryCall), committed or refused",
            metrics.placement_attempts.clone(),
        );
        registry.register(
            "fn_lb_calls_in_flight",
            "Calls between their arrival and their end",
            metrics.in_flight.clone(),
        );
        registry.register_with_unit(
            "fn_lb_execution",
            "Time from a runner's commit to the function's response head, cold start excluded",
            Unit::Seconds,
            metrics.execution.clone(),
        );
        registry.register_with_unit(
            "fn_lb_cold_start",
            "Time calls waited for a new instance of their function to start",
            Unit::Seconds,
            metrics.cold_start.clone(),
        );
        registry.register(
            "fn_lb_cold_starts",
            "Calls that started a new instance of their function",
            metrics.cold_starts.clone(),
        );
        registry.register(
            "fn_lb_client_connections",
            "Client connections open",
            metrics.connections.clone(),
        );
        registry.register(
            "fn_lb_client_connections_shed",
            "Client connections closed or refused at FN_MAX_CONNECTIONS: idle_over_cap (the \
             oldest idle one, to make room) or refused_over_cap (none was idle)",
            metrics.connections_shed.clone(),
        );
        metrics
    }

    /// A call's response head arrived: `exec` after the commit, with a cold start of
    /// `cold_start` if it started an instance.
    pub(crate) fn answered(
        &self,
        app: &str,
        function: &str,
        exec: Duration,
        cold_start: Option<Duration>,
    ) {
        self.execution.observe(exec.as_secs_f64());
        if let Some(cold) = cold_start {
            let label = FunctionLabel {
                app: app.to_owned(),
                function: function.to_owned(),
            };
            let mut functions = lock(&self.functions);
            if functions
                .catalog
                .as_ref()
                .is_some_and(|catalog| !catalog.contains(&label))
            {
                // Removed from the catalog while the call ran: its series stay gone.
                return;
            }
            self.cold_start
                .get_or_create(&label)
                .observe(cold.as_secs_f64());
            self.cold_starts.get_or_create(&label).inc();
            functions.series.insert(label);
        }
    }

    /// After a catalog reload, `current` being the catalog's functions (app, name): removes
    /// the per-function series of every other function, and keeps them from coming back for
    /// a call that was under way, so that an lb-agent's series follow its catalog rather
    /// than every function it ever had.
    pub fn forget_functions<'a>(&self, current: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let catalog: HashSet<FunctionLabel> = current
            .into_iter()
            .map(|(app, function)| FunctionLabel {
                app: app.to_owned(),
                function: function.to_owned(),
            })
            .collect();
        let mut functions = lock(&self.functions);
        functions.series.retain(|label| {
            let kept = catalog.contains(label);
            if !kept {
                self.cold_start.remove(label);
                self.cold_starts.remove(label);
            }
            kept
        });
        functions.catalog = Some(catalog);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    /// A connection closed or refused at the cap, for `reason`.
    pub(crate) fn connection_shed(&self, reason: &'static str) {
        self.connections_shed
            .get_or_create(&ShedLabel { reason })
            .inc();
    }

    /// Counts a request refused before it became a call (404, 405, shutting down).
    pub(crate) fn refused(&self, outcome: CallOutcome) {
        self.count(outcome);
    }

    /// A call arrived: in flight until the returned record is finished or dropped.
    pub(crate) fn call_started(&self) -> CallRecord {
        self.in_flight.inc();
        CallRecord {
            metrics: self.clone(),
            started: Instant::now(),
            finished: false,
        }
    }

    /// A runner committed `waited` after placement started.
    pub(crate) fn placed(&self, waited: Duration) {
        self.placement.observe(waited.as_secs_f64());
    }

    /// The counter of `TryCall`s sent, for the dispatcher to count each as it goes.
    pub(crate) fn placement_attempts(&self) -> Counter {
        self.placement_attempts.clone()
    }

    fn count(&self, outcome: CallOutcome) {
        self.calls
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

/// One call in flight. [`finish`](Self::finish) records how it ended; a record dropped
/// unfinished belongs to a call whose owner was dropped, which happens when the client's
/// connection goes away, and counts as `client_gone`.
#[derive(Debug)]
pub(crate) struct CallRecord {
    metrics: LbMetrics,
    started: Instant,
    finished: bool,
}

impl CallRecord {
    /// Records the call's end with `outcome`.
    pub(crate) fn finish(mut self, outcome: CallOutcome) {
        self.record(outcome);
    }

    /// Records the call's end with the outcome of `err` and hands `err` back.
    pub(crate) fn failed(self, err: CallError) -> CallError {
        self.finish(CallOutcome::from(&err));
        err
    }

    fn record(&mut self, outcome: CallOutcome) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.metrics.count(outcome);
        self.metrics
            .call_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record(CallOutcome::ClientGone);
        self.metrics.in_flight.dec();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A set of names: one a panicking holder left is still right.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(registry: &Registry) -> String {
        fn_lifecycle::metrics::encode(registry).expect("encodes")
    }

    #[test]
    fn outcomes_duration_and_in_flight_are_recorded_once() {
        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        let a = metrics.call_started();
        let b = metrics.call_started();
        assert!(scrape(&registry).contains("\nfn_lb_calls_in_flight 2\n"));
        a.finish(CallOutcome::Success);
        drop(b);
        metrics.refused(CallOutcome::NotFound);
        let text = scrape(&registry);
        assert!(text.contains("\nfn_lb_calls_in_flight 0\n"), "{text}");
        assert!(
            text.contains("fn_lb_calls_total{outcome=\"success\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fn_lb_calls_total{outcome=\"client_gone\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fn_lb_calls_total{outcome=\"not_found\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fn_lb_call_duration_seconds_count 2\n"),
            "{text}"
        );
    }

    #[test]
    fn placement_counts_attempts_and_times_commits_only() {
        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        metrics.placed(Duration::from_millis(3));
        metrics.placement_attempts().inc_by(7);
        let text = scrape(&registry);
        assert!(
            text.contains("\nfn_lb_placement_attempts_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfn_lb_placement_seconds_count 1\n"),
            "{text}"
        );
    }

    #[test]
    fn the_series_of_functions_gone_from_the_catalog_are_removed() {
        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        for function in ["gone", "kept"] {
            metrics.answered(
                "a",
                function,
                Duration::from_millis(1),
                Some(Duration::from_millis(5)),
            );
        }
        metrics.forget_functions([("a", "kept")]);
        let text = scrape(&registry);
        assert!(!text.contains("function=\"gone\""), "{text}");
        assert!(
            text.contains("fn_lb_cold_starts_total{app=\"a\",function=\"kept\"} 1\n"),
            "{text}"
        );
    }

    /// A call started before the reload that removed its function answers after it: its
    /// cold start brings no series of the function back.
    #[test]
    fn a_call_answered_after_its_function_was_removed_brings_no_series_back() {
        let mut registry = Registry::default();
        let metrics = LbMetrics::register(&mut registry);
        let cold = Some(Duration::from_millis(5));
        metrics.answered("a", "gone", Duration::from_millis(1), cold);
        metrics.forget_functions([("a", "kept")]);
        metrics.answered("a", "gone", Duration::from_millis(1), cold);
        metrics.answered("a", "kept", Duration::from_millis(1), cold);
        let text = scrape(&registry);
        assert!(!text.contains("function=\"gone\""), "{text}");
        assert!(
            text.contains("fn_lb_cold_starts_total{app=\"a\",function=\"kept\"} 1\n"),
            "{text}"
        );
        // The call's execution is counted all the same.
        assert!(
            text.contains("\nfn_lb_execution_seconds_count 3\n"),
            "{text}"
        );
    }

    #[test]
    fn every_call_error_has_an_outcome() {
        let err = CallError::NoCapacity {
            waited: Duration::from_secs(1),
            attempts: 1,
            draining: false,
        };
        assert_eq!(CallOutcome::from(&err).as_str(), "no_capacity");
        assert_eq!(
            CallOutcome::from(&CallError::Timeout(Duration::from_secs(1), String::new())).as_str(),
            "timeout"
        );
        // A request refused on a connection closed to make room is not a shutdown.
        assert_eq!(
            CallOutcome::from(&CallError::ConnectionClosing).as_str(),
            "connection_shed"
        );
        assert_eq!(
            CallOutcome::from(&CallError::ShuttingDown).as_str(),
            "shutting_down"
        );
    }
}
