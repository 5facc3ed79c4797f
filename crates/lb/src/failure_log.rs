//! The LB's log line for a call that failed before its answer started ("call failed").
//!
//! A call a runner took and failed is logged once, with its details: each is news. A
//! failure the LB answers itself before any runner took the call (no room, no runner
//! reachable, none large enough, every runner refusing the function, the call's time gone
//! on the way) is the same news for every call while it lasts: during an outage a client
//! sending thousands of calls a second made as many INFO lines, past what the log's queue
//! holds. Those go through a [`Throttle`] per kind: one line a second at INFO, naming the
//! call it came with and `held_back`, the count of that kind logged only at DEBUG since.
//! The metrics count every failure whatever the log says. A client's own errors are logged
//! at DEBUG ([`CallError::is_clients`]).
//!
//! Not here: a failure after the answer started (`invoke` logs it); refusals before a call
//! starts (404, 405, shutting down, a connection being closed to make room), which are
//! counted and not logged.

use std::time::Duration;

use fn_lifecycle::logging::Throttle;

use crate::error::CallError;

/// How often a failure the LB answered itself is logged at INFO, per kind.
pub const UNPLACED_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The throttles of the failures the LB answers without a runner having taken the call,
/// one per kind, so that one kind's flood does not hide another's first line.
#[derive(Debug)]
pub struct FailureLog {
    no_capacity: Throttle,
    no_runner_reachable: Throttle,
    no_runner_large_enough: Throttle,
    unrunnable: Throttle,
    timed_out_unplaced: Throttle,
}

impl Default for FailureLog {
    fn default() -> Self {
        let throttle = || Throttle::new(UNPLACED_LOG_INTERVAL);
        Self {
            no_capacity: throttle(),
            no_runner_reachable: throttle(),
            no_runner_large_enough: throttle(),
            unrunnable: throttle(),
            timed_out_unplaced: throttle(),
        }
    }
}

impl FailureLog {
    /// Logs the failure `error` of a call, answered with `status` after `elapsed_ms`, in
    /// the call's span.
    pub fn failed(&self, error: &CallError, status: u16, elapsed_ms: u64) {
        if error.is_clients() {
            tracing::debug!(status, error = %error, elapsed_ms, "call refused");
            return;
        }
        let Some(throttle) = self.throttle(error) else {
            tracing::info!(status, error = %error, elapsed_ms, "call failed");
            return;
        };
        match throttle.admit() {
            Some(held_back) => {
                tracing::info!(status, error = %error, elapsed_ms, held_back, "call failed");
            }
            None => tracing::debug!(status, error = %error, elapsed_ms, "call failed"),
        }
    }

    /// The throttle of a failure no runner took the call for; `None` for one a runner took
    /// (each such line stays).
    fn throttle(&self, error: &CallError) -> Option<&Throttle> {
        match error {
            CallError::NoCapacity { .. } => Some(&self.no_capacity),
            CallError::NoRunnerReachable { .. } => Some(&self.no_runner_reachable),
            CallError::NoRunnerLargeEnough { .. } => Some(&self.no_runner_large_enough),
            CallError::Unrunnable { .. } => Some(&self.unrunnable),
            CallError::TimedOutUnplaced { .. } => Some(&self.timed_out_unplaced),
            CallError::Timeout(..) | CallError::RunnerFailed { .. } => None,
            // Refused before a call starts (never met here), or the client's own.
            CallError::NotFound(_)
            | CallError::NoTunnel { .. }
            | CallError::MethodNotAllowed { .. }
            | CallError::TooLarge { .. }
            | CallError::BadRequest(_)
            | CallError::UserinfoInTarget
            | CallError::UnsupportedScheme(_)
            | CallError::AsteriskNotOptions(_)
            | CallError::UriTooLong { .. }
            | CallError::BodyStalled(_)
            | CallError::UnsupportedTransferCoding(_)
            | CallError::TooManyHeaders { .. }
            | CallError::ShuttingDown
            | CallError::ConnectionClosing => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_no_runner_took_are_throttled_each_kind_apart() {
        let log = FailureLog::default();
        let unplaced = [
            CallError::NoCapacity {
                waited: Duration::ZERO,
                attempts: 0,
                draining: false,
            },
            CallError::NoRunnerReachable {
                group: "g".into(),
                why: "it has none".into(),
                waited: Duration::ZERO,
            },
            CallError::NoRunnerLargeEnough {
                memory_mb: 1,
                group: "g".into(),
            },
            CallError::Unrunnable {
                runner: "r".into(),
                details: "d".into(),
            },
            CallError::TimedOutUnplaced {
                timeout: Duration::ZERO,
                attempts: 0,
            },
        ];
        let mut seen = Vec::new();
        for e in &unplaced {
            let throttle = log.throttle(e).unwrap_or_else(|| panic!("{e:?}"));
            assert!(
                !seen.iter().any(|t| std::ptr::eq(*t, throttle)),
                "{e:?} has a throttle of its own"
            );
            seen.push(throttle);
        }
        let taken = [
            CallError::Timeout(Duration::ZERO, String::new()),
            CallError::RunnerFailed {
                runner: "r".into(),
                details: "d".into(),
            },
        ];
        for e in &taken {
            assert!(log.throttle(e).is_none(), "{e:?} is logged each time");
        }
    }
}
