//! What a runner reports of itself (`WatchState`), kept for the placer.
//!
//! A [`RunnerClient`](crate::RunnerClient) built with [`ClientConfig::watch_reports`]
//! (the `warm` placer) keeps one `WatchState` stream open to its runner and stores the latest
//! report here. The runner sends one after each change of its pool (at most one per 20 ms)
//! and one a second regardless, so a report older than [`STALE_AFTER`] means the stream has
//! stalled: it is then ignored, as is the report of a stream that failed. A runner without a
//! usable report is [`RunnerView::Unknown`], which the placer treats as `ch` does: it asks.
//!
//! Between two reports the LB counts the calls it commits on the runner itself
//! ([`Reports::placed`]), so that a burst of calls arriving together does not all go to the
//! one warm instance or the last free megabytes that the previous report showed.
//!
//! [`ClientConfig::watch_reports`]: crate::ClientConfig::watch_reports

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fn_placement::{RunnerLoad, RunnerView};
use fn_protocol::runner::RunnerState;
use tokio::time::Instant;

/// A report older than this is ignored: the runner sends one at least every second.
pub const STALE_AFTER: Duration = Duration::from_secs(3);

/// Most functions a report may list; the rest of a larger list is ignored (a runner holds
/// far fewer instances than this).
const MAX_WARM_FUNCTIONS: usize = 65_536;

/// The latest report of one runner; see the module docs.
#[derive(Debug, Default)]
pub struct Reports {
    /// `std::sync::Mutex`: every section is a lookup or a small edit, never an await.
    current: Mutex<Option<Observed>>,
}

#[derive(Debug)]
struct Observed {
    received: Instant,
    total_mb: u64,
    free_mb: u64,
    calls_in_flight: u64,
    draining: bool,
    /// `(app, function, idle slots)`, sorted, for binary search.
    warm: Vec<(String, String, u32)>,
}

impl Observed {
    fn warm_slot(&mut self, app: &str, function: &str) -> Option<&mut u32> {
        let idx = self
            .warm
            .binary_search_by(|(a, f, _)| (a.as_str(), f.as_str()).cmp(&(app, function)))
            .ok()?;
        self.warm.get_mut(idx).map(|(_, _, slots)| slots)
    }
}

impl Reports {
    fn lock(&self) -> MutexGuard<'_, Option<Observed>> {
        // A plain value replaced or edited in one step: a panic elsewhere cannot tear it.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a report received now, replacing the previous one and the calls counted since.
    pub fn update(&self, state: RunnerState) {
        let mut warm: Vec<_> = state
            .warm
            .into_iter()
            .take(MAX_WARM_FUNCTIONS)
            .filter(|w| w.idle_slots > 0)
            .map(|w| (w.app, w.function, w.idle_slots))
            .collect();
        // The runner sends them sorted; a list that is not is sorted here rather than trusted.
        warm.sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        warm.dedup_by(|b, a| {
            let same = a.0 == b.0 && a.1 == b.1;
            if same {
                a.2 = a.2.saturating_add(b.2);
            }
            same
        });
        *self.lock() = Some(Observed {
            received: Instant::now(),
            total_mb: state.capacity_total_mb,
            free_mb: state.capacity_free_mb,
            calls_in_flight: state.calls_in_flight,
            draining: state.draining,
            warm,
        });
    }

    /// The stream ended or failed: forgets the report, unless it said the runner drains (a
    /// runner never stops draining; that report ages out like any other).
    pub fn clear(&self) {
        let mut current = self.lock();
        if !current.as_ref().is_some_and(|o| o.draining) {
            *current = None;
        }
    }

    /// What the report says of a call of `app`/`function` needing `memory_mb` for a new
    /// instance; [`RunnerView::Unknown`] without a report younger than [`STALE_AFTER`], and
    /// for a call larger than the runner's whole memory (so that the runner is asked and
    /// says so, and a call no runner can ever hold gets its 503 at once).
    pub fn view(&self, app: &str, function: &str, memory_mb: u64) -> RunnerView {
        let mut current = self.lock();
        let Some(observed) = current.as_mut() else {
            return RunnerView::Unknown;
        };
        if observed.received.elapsed() > STALE_AFTER || memory_mb > observed.total_mb {
            return RunnerView::Unknown;
        }
        let warm = observed
            .warm_slot(app, function)
            .is_some_and(|slots| *slots > 0);
        RunnerView::Known(RunnerLoad {
            warm,
            fits: observed.free_mb >= memory_mb,
            draining: observed.draining,
            calls_in_flight: observed.calls_in_flight,
        })
    }

    /// The runner committed a call of `app`/`function`: until the next report, count it on
    /// a warm instance if the report showed one with room, else as a new instance's memory.
    pub fn placed(&self, app: &str, function: &str, memory_mb: u64) {
        let mut current = self.lock();
        let Some(observed) = current.as_mut() else {
            return;
        };
        observed.calls_in_flight = observed.calls_in_flight.saturating_add(1);
        match observed.warm_slot(app, function) {
            Some(slots) if *slots > 0 => *slots -= 1,
            _ => observed.free_mb = observed.free_mb.saturating_sub(memory_mb),
        }
    }

    /// Whether a report younger than [`STALE_AFTER`] is held.
    pub fn is_fresh(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|o| o.received.elapsed() <= STALE_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use fn_protocol::runner::WarmFunction;

    use super::*;

    fn state(free_mb: u64, warm: &[(&str, &str, u32)]) -> RunnerState {
        RunnerState {
            version: 1,
            capacity_total_mb: 1024,
            capacity_free_mb: free_mb,
            calls_in_flight: 2,
            draining: false,
            warm: warm
                .iter()
                .map(|(app, function, idle_slots)| WarmFunction {
                    app: (*app).into(),
                    function: (*function).into(),
                    idle_slots: *idle_slots,
                })
                .collect(),
        }
    }

    fn load(view: RunnerView) -> RunnerLoad {
        match view {
            RunnerView::Known(load) => load,
            RunnerView::Unknown => panic!("expected a known view"),
        }
    }

    #[test]
    fn no_report_is_unknown() {
        assert_eq!(Reports::default().view("a", "f", 64), RunnerView::Unknown);
    }

    #[test]
    fn a_report_answers_for_each_function() {
        let reports = Reports::default();
        // Unsorted and with a duplicate, as an untrusted runner might send it.
        reports.update(state(100, &[("b", "g", 1), ("a", "f", 1), ("a", "f", 1)]));
        let f = load(reports.view("a", "f", 128));
        assert!(f.warm && !f.fits && !f.draining);
        assert_eq!(f.calls_in_flight, 2);
        let h = load(reports.view("a", "h", 64));
        assert!(!h.warm && h.fits);
        assert!(load(reports.view("b", "g", 64)).warm);
    }

    #[test]
    fn calls_placed_between_reports_are_counted() {
        let reports = Reports::default();
        reports.update(state(128, &[("a", "f", 1)]));
        reports.placed("a", "f", 64);
        let after_warm = load(reports.view("a", "f", 64));
        assert!(!after_warm.warm, "its one idle slot is taken");
        assert!(after_warm.fits, "and no memory");
        assert_eq!(after_warm.calls_in_flight, 3);
        reports.placed("a", "f", 64);
        reports.placed("a", "f", 64);
        assert!(
            !load(reports.view("a", "f", 64)).fits,
            "two cold starts use it up"
        );
        reports.update(state(128, &[("a", "f", 2)]));
        let fresh = load(reports.view("a", "f", 64));
        assert!(fresh.warm && fresh.fits, "a new report replaces the count");
    }

    #[test]
    fn a_call_larger_than_the_runner_is_left_to_the_runner() {
        let reports = Reports::default();
        reports.update(state(0, &[]));
        assert!(!load(reports.view("a", "f", 1024)).fits);
        assert_eq!(reports.view("a", "f", 1025), RunnerView::Unknown);
    }

    #[test]
    fn a_failed_stream_forgets_the_report_unless_it_said_draining() {
        let reports = Reports::default();
        reports.update(state(128, &[]));
        reports.clear();
        assert_eq!(reports.view("a", "f", 64), RunnerView::Unknown);
        reports.update(RunnerState {
            draining: true,
            ..state(128, &[])
        });
        reports.clear();
        assert!(load(reports.view("a", "f", 64)).draining);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_report_is_unknown() {
        let reports = Reports::default();
        reports.update(state(128, &[]));
        assert!(reports.is_fresh());
        tokio::time::advance(STALE_AFTER + Duration::from_millis(1)).await;
        assert!(!reports.is_fresh());
        assert_eq!(reports.view("a", "f", 64), RunnerView::Unknown);
    }
}
