//! Placement of one call on a runner of its LB group.
//!
//! One pass tries the group's runners in the placer's order, skipping placeholders
//! (unreachable runners, which keep their slot). A refusal moves on to the next runner. When
//! a pass ends with no commit, the whole list is tried again after a backoff, until the
//! placer deadline (`FN_PLACER_TIMEOUT`, never past the call's own deadline); the last pause
//! is shortened so that a last pass starts just before the deadline (a quarter of the wait
//! before it at most, so that a short wait gets more than one pass). After the last pass the
//! call waits out the rest of its wait for a call of its function to end or a report, and is
//! offered once more if one comes, then answered. A committed call is
//! returned at once and never offered to another runner. One offer waits for its runner's
//! acknowledgement at most half of the wait left (see [`attempt_bound`]): a runner that
//! accepts calls and never acknowledges them is marked down and the next one asked.
//!
//! A runner that refuses the call as invalid is passed over like a busy one: the reason may
//! be its own (no container engine, a command missing from its functions directory). The
//! answer is 500 when every runner of the group said so in one pass, or at the deadline when
//! no runner refused the call for want of room (the others unreachable, say).
//!
//! The wait is bounded by the call too: at most a share of its timeout (half by default, as
//! Fn's slot deadline was), so that a call that waited in vain gets 503 with time to retry,
//! and a 504 means that the function itself ran too long, or (a share of 1, a function with a
//! timeout of a few milliseconds) that the call's time ran out before a runner could start
//! it: a runner then refuses it as invalid, and the LB, whose deadline has passed as well,
//! answers 504, not 500. What is left of the budget goes to the runner. When every runner
//! of the group refuses the call as larger than its whole memory, no wait can help: the
//! answer is 503 at once.
//!
//! The pause between two passes ends early at a report of a runner of the group, or when a
//! call of the function ends on one and leaves its instance idle (one paused call is woken
//! per instance, by function), so that a full group serves its waiting calls as
//! instances free up rather than as their backoffs run out.
//!
//! A placer that uses the runners' reports (`warm`) gets a view of each runner for this call at
//! every pass, and may leave runners out. A pass that asked nobody because every runner was
//! known to be full or draining waits the same way, at most [`REPORT_WAIT`], rather than the
//! backoff. Then, if the call would start an instance by evicting idle ones, it waits
//! [`COLD_DEFER`] more, so that a call a freed instance is warm for takes it first. Each offer
//! is counted in the runner's view until its next report.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fn_lifecycle::retry::Backoff;
use fn_nodepool::{EarlyBody, Engaged, ReportSignal, RunnerPool, TryCallError, Waiting};
use fn_placement::{Order, PlacementKey, Placer, RunnerView};
use fn_protocol::CallSpec;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::error::CallError;

/// The least wait an offer after a call's first is made with: less is no chance for a
/// runner to answer (it may hold its acknowledgement 2 ms for the answer to leave with, and
/// there is the round trip), and an offer given up unanswered counts against the runner
/// (see [`attempt_bound`]).
const MIN_OFFER: Duration = Duration::from_millis(10);

/// The last pass starts no later than this before the placer deadline: room for a round
/// trip to a runner that has capacity (the default of [`DispatchConfig::last_pass`]). A wait
/// shorter than four times it gives its last pass a quarter of it (see [`last_pass`]).
pub const LAST_PASS: Duration = Duration::from_millis(50);

/// How long before the placer deadline the last pass starts when the call may wait `wait`
/// in all: `most` ([`LAST_PASS`] by default), or a quarter of the wait when that is less, so
/// that a short wait (a function with a timeout of 100 ms waits 50 ms) has room for a pass
/// after a refusal.
fn last_pass(most: Duration, wait: Duration) -> Duration {
    most.min(wait / 4)
}

/// What ended a wait for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    /// A report of a runner of the group.
    Report,
    /// A call of the function ended and left its instance idle: this call holds that wake.
    Released,
    /// Neither came before the wait's end.
    Timeout,
}

/// The shortest wait for one runner's acknowledgement while the placer deadline allows it
/// (see [`attempt_bound`]); a runner acknowledges in about a millisecond. A shorter wait
/// that passes in silence does not mark the runner down.
const MIN_ATTEMPT: Duration = fn_nodepool::FAIR_ACK_WAIT;

/// How long one offer may wait for its runner's acknowledgement when `left` is the wait
/// left: half of it (at least [`MIN_ATTEMPT`], at most all of it), so that a runner that
/// accepts the call and never acknowledges it leaves time for the next runner. The
/// client's own bound (connect and acknowledgement timeouts, 7 s) still holds when it is
/// shorter. An offer given up so is not committed; its runner is marked down when it had
/// at least [`MIN_ATTEMPT`].
fn attempt_bound(left: Duration) -> Duration {
    (left / 2).max(MIN_ATTEMPT.min(left))
}

/// The longest pause after a pass that asked nobody because the reports said no runner could
/// take the call; the next report of any runner ends it sooner.
pub const REPORT_WAIT: Duration = Duration::from_millis(50);

/// The longest a call waits for a warm instance (see [`DispatchConfig::warm_wait`]).
pub const MAX_WARM_WAIT: Duration = Duration::from_secs(1);

/// How long a waiting call that would start an instance by evicting idle ones lets calls
/// that those instances are warm for go first.
pub const COLD_DEFER: Duration = Duration::from_millis(1);

/// What a call does with a pass ranked from reports; see [`Dispatcher::hold`].
enum Hold {
    /// Offer the call to the ranked runners now.
    Offer,
    /// Wait for the next report, at most until then (never past the placer deadline), for
    /// a warm instance.
    ForWarm(Instant),
    /// Let calls a freed instance is warm for go first, for [`COLD_DEFER`].
    Defer,
}

/// One pass's runner indices: the placer's ring order, or its ranking from reports.
enum Pass {
    Ring(Order),
    Ranked(std::vec::IntoIter<usize>),
}

impl Iterator for Pass {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Pass::Ring(order) => order.next(),
            Pass::Ranked(ranked) => ranked.next(),
        }
    }
}

/// Waits for the next report of a runner of the call's group (`report`), for a call of its
/// function to end and leave an instance idle (once the call holds its place among the
/// waiting calls, `queued`, which it takes at its first wait: an end while it was not
/// waiting on it is kept for it), or until `until`. Returns what woke it.
async fn wait_for_room(
    signal: &ReportSignal,
    call: &CallSpec,
    report: Pin<&mut Notified<'_>>,
    queued: &mut Option<Waiting>,
    until: Instant,
) -> Woken {
    let waiting = queued.get_or_insert_with(|| signal.waiting(&call.app, &call.function));
    // A wake it held took it through a pass, and it waits again: spent.
    waiting.spend_wake();
    tokio::select! {
        () = report => Woken::Report,
        // Held: passed on if the call goes away before its next pass ends (its client left).
        () = waiting.take_release() => Woken::Released,
        () = tokio::time::sleep_until(until) => Woken::Timeout,
    }
}

/// What a runner's refusal of `call` as invalid (`refused`) answers, after `attempts`
/// offers: the runner's reason ([`CallError::Unrunnable`]), or, when the call's own deadline
/// has passed, [`CallError::TimedOutUnplaced`]. A runner's deadline for the call is its
/// receipt of the offer plus the time the LB had left, so the LB's own has passed when a
/// runner refuses the call because its deadline has ("invalid call: its deadline has
/// passed", heard when the LB's wait for the answer was late to end): the call's time ran
/// out on the way, which no runner will change, and no fault of the function's definition.
fn invalid_refusal(call: &CallSpec, refused: &TryCallError, attempts: u32) -> CallError {
    if call.remaining().is_zero() {
        return CallError::TimedOutUnplaced {
            timeout: call.timeout,
            attempts,
        };
    }
    let (runner, details) = refused.refusal().unwrap_or_default();
    CallError::Unrunnable {
        runner: runner.to_owned(),
        details: details.to_owned(),
    }
}

/// Placement tunables.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// How long a call may wait for a runner with room.
    pub placer_timeout: Duration,
    /// The share of a call's timeout it may spend waiting for a runner (0 < share <= 1).
    pub wait_share: f64,
    /// First pause between passes; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long a call may wait for a warm instance, from the moment a new instance could
    /// start only by evicting idle instances of other functions, when its function has busy
    /// instances, until the function's own cold starts have been seen; then their moving
    /// average (waiting never costs much more than starting would), at most
    /// [`MAX_WARM_WAIT`].
    pub warm_wait: Duration,
    /// How long before the placer deadline the last pass starts at most ([`LAST_PASS`]; a
    /// short wait gives it a quarter of the wait).
    pub last_pass: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            placer_timeout: Duration::from_secs(10),
            wait_share: 0.5,
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(500),
            warm_wait: Duration::from_millis(25),
            last_pass: LAST_PASS,
        }
    }
}

/// A committed call and how it got there.
#[derive(Debug)]
pub struct Placed {
    pub engaged: Engaged,
    pub attempts: u32,
    pub waited: Duration,
}

/// Places calls with a placer over a runner pool.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pool: Arc<dyn RunnerPool>,
    placer: Arc<dyn Placer>,
    config: DispatchConfig,
    cold_starts: Arc<ColdStarts>,
    /// `TryCall`s sent (a counter of the caller's metrics, or of none).
    attempts: Counter,
}

/// Functions whose cold starts [`ColdStarts`] remembers at most; past it, it starts over.
const COLD_STARTS_KEPT: usize = 10_000;

/// How long each function's instances take to start, as calls report it: a moving average,
/// so that a call waits for a warm instance about as long as starting one would take.
#[derive(Debug, Default)]
struct ColdStarts {
    /// `std::sync::Mutex`: a lookup or an insert, never held across an await.
    by_function: std::sync::Mutex<std::collections::HashMap<PlacementKey, Duration>>,
}

impl ColdStarts {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<PlacementKey, Duration>> {
        // A map of plain values edited in one step: a panic elsewhere cannot tear it.
        self.by_function
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The expected cold start of `key`'s function; `prior` until one was seen.
    fn expected(&self, key: &PlacementKey, prior: Duration) -> Duration {
        self.lock().get(key).copied().unwrap_or(prior)
    }

    /// Adds a cold start of `key`'s function to its average (a quarter of the weight).
    fn observe(&self, key: PlacementKey, took: Duration, prior: Duration) {
        let mut map = self.lock();
        if map.len() >= COLD_STARTS_KEPT && !map.contains_key(&key) {
            map.clear();
        }
        let average = map.entry(key).or_insert(prior);
        *average = average.mul_f64(0.75) + took.mul_f64(0.25);
    }
}

impl Dispatcher {
    pub fn new(pool: Arc<dyn RunnerPool>, placer: Arc<dyn Placer>, config: DispatchConfig) -> Self {
        Dispatcher {
            pool,
            placer,
            config,
            cold_starts: Arc::default(),
            attempts: Counter::default(),
        }
    }

    /// Counts every `TryCall` sent in `attempts` (`fn_lb_placement_attempts_total`), as it
    /// is sent: a call whose client leaves while it is being placed has its offers counted
    /// too.
    #[must_use]
    pub fn count_attempts_in(mut self, attempts: Counter) -> Self {
        self.attempts = attempts;
        self
    }

    /// Whether a call whose pass would first offer it to the runner seen as `first` (of
    /// `views`) offers it now, or holds back for a warm instance (see the module docs).
    /// `waiting`: the call's last pass found no runner able to take it; `evicting_since`:
    /// when it first could only have started an instance by evicting, set here.
    fn hold(
        &self,
        key: &PlacementKey,
        views: &[RunnerView],
        first: Option<&RunnerView>,
        waiting: bool,
        evicting_since: &mut Option<Instant>,
        last_pass_at: Instant,
    ) -> Hold {
        let evicts_first = first.is_some_and(
            |view| matches!(view, RunnerView::Known(load) if !load.warm && load.evicts),
        );
        if !evicts_first {
            return Hold::Offer;
        }
        let since = *evicting_since.get_or_insert_with(Instant::now);
        // Runners' reports: saturating, as any sum of figures from the network. A draining
        // runner's instances free up for nobody: its calls' ends wake no waiting call.
        let instances: u32 = views
            .iter()
            .map(|view| match view {
                RunnerView::Known(load) if !load.draining => load.instances,
                RunnerView::Known(_) | RunnerView::Unknown | RunnerView::TooSmall => 0,
            })
            .fold(0, u32::saturating_add);
        let wait = self.cold_starts.expected(key, self.config.warm_wait);
        // Never into the last pass's time: a wait to the deadline left no offer.
        let until = (since + wait.min(MAX_WARM_WAIT)).min(last_pass_at);
        if instances > 0 && Instant::now() < until {
            // Its function runs elsewhere, busy: one of those instances is likely to free
            // up before a new one would have started.
            Hold::ForWarm(until)
        } else if waiting {
            Hold::Defer
        } else {
            Hold::Offer
        }
    }

    /// A call of `app`/`function` waited `took` for its new instance to start: how long the
    /// next calls of the function wait for a warm instance follows it.
    pub fn observe_cold_start(&self, app: &str, function: &str, took: Duration) {
        if self.placer.uses_reports() {
            let key = PlacementKey::new(app, function);
            self.cold_starts.observe(key, took, self.config.warm_wait);
        }
    }

    /// Finds a runner that commits to `call`, offering `early` with it (see
    /// [`fn_nodepool::RunnerClient::try_call`]).
    ///
    /// # Errors
    /// [`CallError::NoCapacity`] when no runner committed before the placer deadline;
    /// [`CallError::NoRunnerLargeEnough`] when every runner of the group is too small for it;
    /// [`CallError::Unrunnable`] when a runner says the call itself is invalid;
    /// [`CallError::NoRunnerReachable`] when none could be asked;
    /// [`CallError::TimedOutUnplaced`] when a runner refused the call for its deadline passed
    /// on the way. Each `TryCall` sent is
    /// counted at once (see [`Dispatcher::count_attempts_in`]), whatever the call's end.
    pub async fn place(&self, call: &CallSpec, early: &EarlyBody) -> Result<Placed, CallError> {
        let key = PlacementKey::new(call.app.as_str(), call.function.as_str());
        let started = Instant::now();
        let share = call
            .remaining()
            .mul_f64(self.config.wait_share.clamp(0.0, 1.0));
        let wait = self.config.placer_timeout.min(share);
        let deadline = started + wait;
        let last_pass = last_pass(self.config.last_pass, wait);
        let last_pass_at = deadline.checked_sub(last_pass).unwrap_or(deadline);
        // Whether the call has had its pass after the last one, when a call of its function
        // ended or a report came in the last stretch of its wait: one at most.
        let mut had_last_chance = false;
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_max);
        let mut attempts = 0u32;
        let no_capacity = |attempts, draining| CallError::NoCapacity {
            waited: started.elapsed(),
            attempts,
            draining,
        };
        let informed = self.placer.uses_reports();
        // The last refusal of the call as invalid, and whether any runner refused it for
        // want of room (or was known to be full): at the deadline, a call only runners that
        // refuse it as invalid (or cannot be reached) looked at gets their answer, not "no
        // room".
        let mut refused_as_invalid: Option<CallError> = None;
        let mut refused_for_room = false;
        // Set after a pass that found no runner able to take the call: the call is waiting
        // for room, and when room appears, a cold start it would make by evicting an idle
        // instance first gives calls that instance is warm for a moment to take it.
        let mut waiting = false;
        // When the call first could have started an instance only by evicting idle ones.
        let mut evicting_since: Option<Instant> = None;
        let signal = self.pool.report_signal(&call.lb_group);
        // The call's place among those waiting for an instance of its function, from its
        // first wait on.
        let mut queued: Option<Waiting> = None;
        loop {
            // Armed before the views are read, so that no report in between is missed. (An
            // ended call in between leaves its wake-up for the call's next wait.)
            let report = signal.next_report();
            tokio::pin!(report);
            report.as_mut().enable();
            let runners = self.pool.runners(&call.lb_group);
            let (mut asked, mut too_small, mut invalid) = (0u32, 0u32, 0u32);
            // Placeholders, and runners found unreachable by this pass's offers.
            let mut unavailable = 0usize;
            // Runners known to drain (their reports), or that refused the call as draining.
            let mut draining = 0usize;
            let pass = if informed {
                // A runner marked down or ejected takes no call whatever it reports: its
                // load is no part of the group's (the load bound), and its busy instances
                // free up for nobody (the warm wait). It is skipped below, as with `ch`.
                // The draining ones counted on the way (one walk of the group, not two), and
                // the clock read once for the pass.
                let now = Instant::now();
                let views: Vec<RunnerView> = runners
                    .iter()
                    .map(|r| {
                        if !r.is_available() {
                            return RunnerView::Unknown;
                        }
                        let view =
                            r.reports()
                                .view_at(now, &call.app, &call.function, call.memory_mb);
                        if matches!(view, RunnerView::Known(load) if load.draining) {
                            draining += 1;
                        }
                        view
                    })
                    .collect();
                let ranked = self.placer.rank(&key, &views);
                // The first runner the pass would offer the call to: one marked down is
                // skipped (it ranks where a runner without a report does).
                let first = ranked
                    .iter()
                    .find(|&&i| runners.get(i).is_some_and(|r| r.is_available()))
                    .and_then(|&i| views.get(i));
                let hold = self.hold(
                    &key,
                    &views,
                    first,
                    waiting,
                    &mut evicting_since,
                    last_pass_at,
                );
                match hold {
                    Hold::Offer => {}
                    Hold::ForWarm(until) => {
                        wait_for_room(&signal, call, report, &mut queued, until).await;
                        continue;
                    }
                    Hold::Defer => {
                        waiting = false;
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(COLD_DEFER.min(left)).await;
                        continue;
                    }
                }
                Pass::Ranked(ranked.into_iter())
            } else {
                Pass::Ring(self.placer.order(&key, runners.len()))
            };
            let mut offered = 0usize;
            for idx in pass {
                offered += 1;
                let Some(runner) = runners.get(idx) else {
                    continue;
                };
                if !runner.is_available() {
                    unavailable += 1;
                    continue; // a placeholder never takes a call
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // The call's first offer goes whatever is left (a function with a timeout
                // of a few milliseconds has no more to wait); later ones need a chance.
                if left.is_zero() || (left < MIN_OFFER && attempts > 0) {
                    break; // the deadline has come: what follows the pass answers the call
                }
                attempts += 1;
                asked += 1;
                self.attempts.inc();
                // Bounded by the offer itself, never past the deadline; not cut from outside
                // as well, or an offer given up at the deadline would not be counted against
                // a runner that answers no short offer (the two timers fire in either order).
                let tried = runner
                    .try_call_within(call, early, attempt_bound(left))
                    .await;
                match tried {
                    Ok(engaged) => {
                        if let Some(waiting) = &queued {
                            waiting.spend_wake();
                        }
                        return Ok(Placed {
                            engaged,
                            attempts,
                            waited: started.elapsed(),
                        });
                    }
                    Err(TryCallError::Unsendable { address, reason }) => {
                        // The call's own: no runner can take it.
                        return Err(CallError::Unrunnable {
                            runner: address,
                            details: reason,
                        });
                    }
                    Err(e) if e.is_invalid_call() => {
                        let refusal = invalid_refusal(call, &e, attempts);
                        if matches!(refusal, CallError::TimedOutUnplaced { .. }) {
                            tracing::debug!(error = %e, "the call's time ran out on the way");
                            return Err(refusal);
                        }
                        invalid += 1;
                        tracing::debug!(error = %e, "runner refused the call as invalid; trying the next");
                        refused_as_invalid = Some(refusal);
                    }
                    Err(e) if e.is_too_large() => {
                        too_small += 1;
                        tracing::debug!(error = %e, "runner too small for the call; trying the next");
                    }
                    Err(e) => {
                        refused_for_room |= matches!(e, TryCallError::Refused { .. });
                        unavailable += usize::from(matches!(
                            e,
                            TryCallError::Unreachable { .. } | TryCallError::Unavailable { .. }
                        ));
                        draining += usize::from(e.is_draining());
                        tracing::debug!(error = %e, "not placed; trying the next runner");
                    }
                }
            }
            // Only when every runner of the group said so: one that could not be asked
            // (unreachable for a moment, or full as the warm placer sees it) may be large.
            let everyone =
                |n: u32| asked > 0 && usize::try_from(n).is_ok_and(|n| n == runners.len());
            if everyone(too_small) {
                return Err(CallError::NoRunnerLargeEnough {
                    memory_mb: call.memory_mb,
                    group: call.lb_group.clone(),
                });
            }
            if everyone(invalid)
                && let Some(unrunnable) = refused_as_invalid.take()
            {
                return Err(unrunnable);
            }
            if informed && offered < runners.len() {
                refused_for_room = true; // the reports said some were full
            }
            // The last pass starts just before the deadline rather than one pause early.
            let left = deadline.saturating_duration_since(Instant::now());
            if left <= last_pass {
                let unrunnable = refused_as_invalid.is_some() && !refused_for_room;
                if !unrunnable && !had_last_chance && left >= MIN_OFFER {
                    // The rest of the wait, for a call of the function that ends on a runner
                    // of the group or a report that follows the pass (as the pauses below):
                    // one more pass if one comes, never two.
                    had_last_chance = true;
                    let after = signal.next_report();
                    tokio::pin!(after);
                    let woken = wait_for_room(&signal, call, after, &mut queued, deadline).await;
                    let room = deadline.saturating_duration_since(Instant::now()) >= MIN_OFFER;
                    if woken != Woken::Timeout && room {
                        continue;
                    }
                    if woken == Woken::Released
                        && let Some(waiting) = &queued
                    {
                        // Too late to use it: another call waiting for the function may.
                        waiting.pass_on();
                    }
                }
                if let Some(unrunnable) = refused_as_invalid.take()
                    && !refused_for_room
                {
                    return Err(unrunnable);
                }
                if unavailable == runners.len() {
                    // Not a matter of room: say so, the operator has runners to look at.
                    return Err(CallError::NoRunnerReachable {
                        group: call.lb_group.clone(),
                        why: match runners.len() {
                            0 => self
                                .pool
                                .list_trouble(&call.lb_group)
                                .unwrap_or_else(|| "it has none".to_owned()),
                            n => format!("all {n} of its runners are unreachable or ejected"),
                        },
                        waited: started.elapsed(),
                    });
                }
                // Every runner that could be asked drains: not a matter of room either.
                let all_draining = draining > 0 && draining + unavailable >= runners.len();
                return Err(no_capacity(attempts, all_draining));
            }
            if informed && offered < runners.len() && asked == 0 {
                // Every runner is known to be unable to take it: wait for the next report.
                waiting = true;
                let until = Instant::now() + REPORT_WAIT.min(left - last_pass);
                wait_for_room(&signal, call, report, &mut queued, until).await;
            } else {
                // Refused for want of room, say: a call of its function ending on a runner of
                // the group, or a report that follows the refusals, may show an instance it
                // can take. (Not the reports during the offers, which any group with calls
                // in flight has: the pause would end at once.)
                let until = Instant::now() + backoff.next_delay().min(left - last_pass);
                let after = signal.next_report();
                tokio::pin!(after);
                wait_for_room(&signal, call, after, &mut queued, until).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_waits_half_the_wait_left_within_the_floor_and_the_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(attempt_bound(ms(2_000)), ms(1_000));
        assert_eq!(attempt_bound(ms(300)), ms(200), "the floor");
        assert_eq!(attempt_bound(ms(120)), ms(120), "never past the deadline");
        assert_eq!(attempt_bound(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_short_wait_keeps_a_quarter_of_it_for_its_last_pass() {
        let ms = Duration::from_millis;
        assert_eq!(last_pass(LAST_PASS, ms(10_000)), LAST_PASS);
        assert_eq!(last_pass(LAST_PASS, ms(200)), LAST_PASS);
        assert_eq!(last_pass(LAST_PASS, ms(50)), Duration::from_micros(12_500));
        assert_eq!(last_pass(LAST_PASS, Duration::ZERO), Duration::ZERO);
        assert_eq!(last_pass(ms(2_000), ms(500)), ms(125));
    }

    /// A call of `group` whose deadline is `left` away.
    fn call(group: &str, left: Duration) -> CallSpec {
        CallSpec {
            id: "c1".into(),
            app: "demo".into(),
            function: "f".into(),
            route: "/f".into(),
            method: http::Method::POST,
            request_url: "http://lb/r/demo/f".into(),
            headers: http::HeaderMap::new(),
            memory_mb: 128,
            concurrency: 1,
            timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(30),
            command: vec!["f".into()],
            image: None,
            config: std::collections::BTreeMap::new(),
            lb_group: group.into(),
            deadline: std::time::Instant::now() + left,
        }
    }

    /// A runner that refuses a call whose deadline passed on the way says it is invalid; the
    /// LB's own deadline has passed then too, and the answer is the call's time that ran
    /// out (504), not the function's definition (500).
    #[test]
    fn an_invalid_refusal_after_the_deadline_is_the_calls_time_running_out() {
        let refused = TryCallError::Refused {
            address: "10.0.0.7:9190".into(),
            reason: fn_protocol::runner::RefusalReason::Invalid,
            details: "invalid call: its deadline has passed".into(),
        };
        let late = invalid_refusal(&call("g", Duration::ZERO), &refused, 2);
        assert!(
            matches!(late, CallError::TimedOutUnplaced { attempts: 2, .. }),
            "{late:?}"
        );
        assert_eq!(late.status(), http::StatusCode::GATEWAY_TIMEOUT);
        let early = invalid_refusal(&call("g", Duration::from_secs(5)), &refused, 1);
        assert!(matches!(early, CallError::Unrunnable { .. }), "{early:?}");
    }

    /// A pool whose one group's runner list never came: the npm cannot be reached.
    #[derive(Debug, Default)]
    struct Unlisted {
        signal: ReportSignal,
    }

    impl RunnerPool for Unlisted {
        fn runners(&self, _group: &str) -> fn_nodepool::RunnerList {
            Arc::new(Vec::new())
        }

        fn report_signal(&self, _group: &str) -> ReportSignal {
            self.signal.clone()
        }

        fn list_trouble(&self, _group: &str) -> Option<String> {
            Some("the npm (FN_NPM_ADDRESS) has not given its runner list for 3s".into())
        }
    }

    /// A group without runners because its list could not be fetched says why, not that
    /// the group has none.
    #[tokio::test]
    async fn a_group_without_a_list_says_why_it_has_no_runners() {
        let dispatcher = Dispatcher::new(
            Arc::new(Unlisted::default()),
            Arc::new(fn_placement::NaivePlacer::new()),
            DispatchConfig {
                placer_timeout: Duration::from_millis(40),
                ..DispatchConfig::default()
            },
        );
        let placed = dispatcher
            .place(&call("g", Duration::from_secs(5)), &EarlyBody::default())
            .await;
        let Err(CallError::NoRunnerReachable { why, .. }) = placed else {
            panic!("expected NoRunnerReachable, got {placed:?}");
        };
        assert!(why.contains("FN_NPM_ADDRESS"), "{why}");
        assert!(!why.contains("it has none"), "{why}");
    }
}
