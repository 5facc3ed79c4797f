//! What a runner reports of itself (`WatchState`), kept for the placer.
//!
//! A [`RunnerClient`](crate::RunnerClient) built with [`ClientConfig::watch_reports`]
//! (the `warm` placer) keeps one `WatchState` stream open to its runner and stores the latest
//! report here. The runner sends one after each change of its pool (at most one per 20 ms)
//! and one a second regardless, so a report older than [`STALE_AFTER`] means the stream has
//! stalled: it is then ignored, as is the report of a stream that failed. A runner without a
//! usable report is [`RunnerView::Unknown`], which the placer treats as `ch` does: it asks.
//!
//! Between two reports the LB counts the calls it offers the runner itself
//! ([`Reports::offer`]), so that a burst of calls arriving together does not all go to the
//! one warm instance or the last free megabytes that the previous report showed. An offer
//! refused as busy is not given back: the runner is fuller than its report said, and the
//! next report, at most 20 ms later, sets the record straight. One refused for what the call
//! is (too large for the runner, invalid there) is given back at once
//! ([`Offer::refused_as_unfit`]): the runner's pool did not change, so no report may come
//! before its heartbeat, a second later, and until then the runner would look full to every
//! other call.
//! An offer still on its way, or one the runner took after it took the report (the
//! acknowledgement carries the runner's pool version), is counted again on top of each new
//! report until a report shows it: a report and the offers cross on different streams, and a
//! report that does not show them yet would otherwise promise the same warm instance or
//! memory twice. An offer not yet acknowledged is counted on top even of a report that
//! may already show it; when the acknowledgement says the report did show it, that second
//! count is taken back (without it, a runner whose pool then stays unchanged would look
//! fuller than it is until its next report, up to a second later). For a runner short of
//! memory the take-back waits for its next report, at most [`LATE_TAKE_BACK`]: such a runner
//! evicts for new instances, and a call that waits that long for room finds a warm instance
//! more often than one sent at once to start an instance (fewer cold starts on the Zipf
//! workload, see the README).
//! It counts the calls that end as well ([`Reports::finished`]): a call whose stream ended
//! cleanly leaves its instance idle for the next call at once, unless the report already
//! shows it (reports and call streams carry the runner's pool version) or the runner is
//! short of memory and evicts, when only its next report can say which instances are left.
//!
//! Every new report wakes the calls waiting for room in the runner's LB group
//! ([`ReportSignal`]), and every call end that leaves an instance idle wakes one call of its
//! function waiting there, so that a call waiting for a runner learns of a freed instance as
//! soon as the LB does.
//!
//! [`ClientConfig::watch_reports`]: crate::ClientConfig::watch_reports

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fn_placement::{RunnerLoad, RunnerView};
use fn_protocol::runner::RunnerState;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A report older than this is ignored: the runner sends one at least every second.
pub const STALE_AFTER: Duration = Duration::from_secs(3);

/// The longest a second count of an offer is kept for a runner short of memory: two of its
/// report gaps, so that a runner whose pool then stays unchanged does not look full until
/// its next heartbeat.
pub const LATE_TAKE_BACK: Duration = Duration::from_millis(40);

/// Most functions a report may list; the rest of a larger list is ignored (a runner holds
/// far fewer instances than this).
const MAX_WARM_FUNCTIONS: usize = 65_536;

/// `fn_lb_runner_reports_total` and `fn_lb_runner_report_streams`, shared by every client
/// of an LB (clones share the values): whether the `warm` placer hears from the runners.
#[derive(Debug, Clone, Default)]
pub struct ReportMetrics {
    reports: prometheus_client::metrics::counter::Counter,
    streams: prometheus_client::metrics::gauge::Gauge,
}

impl ReportMetrics {
    /// Metrics registered in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = ReportMetrics::default();
        registry.register(
            "fn_lb_runner_reports",
            "Reports received from runners (WatchState), for the warm placer",
            metrics.reports.clone(),
        );
        registry.register(
            "fn_lb_runner_report_streams",
            "Runners whose report stream (WatchState) is open now",
            metrics.streams.clone(),
        );
        metrics
    }

    /// Reports received so far.
    pub fn reports(&self) -> u64 {
        self.reports.get()
    }

    /// Report streams open now.
    pub fn streams(&self) -> i64 {
        self.streams.get()
    }

    /// Counts a report.
    pub(crate) fn received(&self) {
        self.reports.inc();
    }

    /// Counts an open stream until the returned guard drops.
    pub(crate) fn stream_open(&self) -> impl Drop + use<> {
        struct Open(prometheus_client::metrics::gauge::Gauge);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.streams.inc();
        Open(self.streams.clone())
    }
}

/// A call as [`Reports::finished`] counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedCall {
    pub app: String,
    pub function: String,
    pub memory_mb: u64,
    pub concurrency: u32,
}

impl OfferedCall {
    /// The figures of `call` that reports count.
    pub fn of(call: &fn_protocol::CallSpec) -> Self {
        OfferedCall {
            app: call.app.clone(),
            function: call.function.clone(),
            memory_mb: call.memory_mb,
            concurrency: call.concurrency,
        }
    }
}

/// Woken whenever a runner of an LB group reports: the calls waiting for room look again; and
/// when a call ends and leaves its instance idle: one call of that function waiting for room
/// looks again ([`ReportSignal::waiting`]). Clones share the signal.
#[derive(Debug, Clone, Default)]
pub struct ReportSignal(Arc<Signals>);

#[derive(Debug, Default)]
struct Signals {
    report: Notify,
    /// A function's key ([`function_key`]) → what wakes its waiting calls, and how many
    /// [`Waiting`]s hold it; the entry goes with the last.
    released: Mutex<HashMap<u64, (Arc<Notify>, usize)>>,
    /// Entries in `released`: a call's end skips the lock while no call waits.
    waiting: AtomicUsize,
}

impl Signals {
    fn lock_released(&self) -> MutexGuard<'_, HashMap<u64, (Arc<Notify>, usize)>> {
        // Entries are inserted or removed in one step: a panic elsewhere cannot tear it.
        self.released.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether some call waits for an instance of some function. When none does, an end
    /// is not kept: a call's first wait begins after the pass that found no room, and an
    /// end between the two (microseconds) leaves it to its next report or pause.
    fn anyone_waits(&self) -> bool {
        self.waiting.load(Ordering::Acquire) != 0
    }

    /// Wakes one call waiting for an instance of the function `key`, or, while all of them
    /// are between two waits, the next one to wait.
    fn release(&self, key: u64) {
        if let Some((notify, _)) = self.lock_released().get(&key) {
            notify.notify_one();
        }
    }
}

/// A function's key among the waiting calls: 64-bit FNV-1a of its app and name (the
/// catalog's, not a client's), cheap enough for every call's end; two functions share one
/// only by a collision that costs a woken call one look.
fn function_key(app: &str, function: &str) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = app
        .bytes()
        .chain(std::iter::once(0))
        .chain(function.bytes());
    bytes.fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

impl ReportSignal {
    /// Completes at the next report of any runner sharing this signal after it is created
    /// (or, once [`Notified::enable`]d, after that), or the next change of the group's
    /// runner list.
    ///
    /// [`Notified::enable`]: tokio::sync::futures::Notified::enable
    pub fn next_report(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.report.notified()
    }

    /// A call of `app`/`function` waits for room: while it holds the returned [`Waiting`],
    /// each call of the function that ends and leaves its instance idle wakes one such call.
    /// Ends before this are not replayed: look at the runners again once it is held.
    pub fn waiting(&self, app: &str, function: &str) -> Waiting {
        let key = function_key(app, function);
        let mut released = self.0.lock_released();
        let (notify, holders) = released.entry(key).or_insert_with(|| (Arc::default(), 0));
        *holders += 1;
        let notify = Arc::clone(notify);
        self.0.waiting.store(released.len(), Ordering::Release);
        drop(released);
        Waiting {
            signals: Arc::clone(&self.0),
            key,
            notify,
            holds_wake: AtomicBool::new(false),
        }
    }

    /// What wakes one call of `app`/`function` waiting for room when a call of it ends
    /// without [`Reports::finished`] (a client that does not keep reports).
    pub(crate) fn releaser(&self, app: &str, function: &str) -> Releaser {
        Releaser {
            signals: Arc::clone(&self.0),
            key: function_key(app, function),
        }
    }

    /// Wakes every call waiting for a report: a runner reported, or the group's runner
    /// list changed (a new runner may have room, whatever the placer).
    pub(crate) fn report(&self) {
        self.0.report.notify_waiters();
    }

    fn release(&self, app: &str, function: &str) {
        if self.0.anyone_waits() {
            self.0.release(function_key(app, function));
        }
    }
}

/// A call's place among the calls waiting for an instance of its function (see
/// [`ReportSignal::waiting`]).
#[derive(Debug)]
pub struct Waiting {
    signals: Arc<Signals>,
    key: u64,
    notify: Arc<Notify>,
    /// A wake from [`Waiting::take_release`] not yet spent.
    holds_wake: AtomicBool,
}

impl Waiting {
    /// Completes when a call of the function ends and leaves its instance idle: one waiter
    /// per instance, the first armed ([`Notified::enable`]) first. One that ended while none
    /// was armed completes the next at once.
    ///
    /// [`Notified::enable`]: tokio::sync::futures::Notified::enable
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Hands a wake this waiter got from [`Waiting::released`] and cannot use (its call
    /// gives up) to the next waiter of the function, or to the next to arm.
    pub fn pass_on(&self) {
        self.holds_wake.store(false, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// [`Waiting::released`], and the wake it completes with held until this waiter spends
    /// it ([`Waiting::spend_wake`]): dropped before then (its client left while it looked for
    /// the instance), it passes the wake on, so that the instance the wake was for is not
    /// left idle while another call of the function waits.
    pub async fn take_release(&self) {
        self.notify.notified().await;
        self.holds_wake.store(true, Ordering::Relaxed);
    }

    /// The wake this waiter held was spent: its call was placed, or looked at the runners
    /// and waits again.
    pub fn spend_wake(&self) {
        self.holds_wake.store(false, Ordering::Relaxed);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if *self.holds_wake.get_mut() {
            self.notify.notify_one();
        }
        let mut released = self.signals.lock_released();
        let last = released.get_mut(&self.key).is_some_and(|(_, holders)| {
            *holders = holders.saturating_sub(1);
            *holders == 0
        });
        if last {
            released.remove(&self.key);
            self.signals
                .waiting
                .store(released.len(), Ordering::Release);
        }
    }
}

/// See [`ReportSignal::releaser`].
#[derive(Debug)]
pub(crate) struct Releaser {
    signals: Arc<Signals>,
    key: u64,
}

impl Releaser {
    /// The call left its instance idle: one call of its function waiting for room looks again.
    pub(crate) fn release(self) {
        if self.signals.anyone_waits() {
            self.signals.release(self.key);
        }
    }
}

/// The latest report of one runner; see the module docs.
#[derive(Debug, Default)]
pub struct Reports {
    /// `std::sync::Mutex`: every section is a lookup or a small edit, never an await.
    current: Mutex<Mirror>,
    signal: ReportSignal,
}

/// The latest report and the offers it may not show yet.
#[derive(Debug, Default)]
struct Mirror {
    observed: Option<Observed>,
    /// Offers not known to be in a report: on their way, or taken after the report.
    pending: Vec<PendingOffer>,
    /// Second counts of offers the held report already showed, kept for a runner short of
    /// memory until the next report or until they are due (see [`Offer::taken`]).
    late: Vec<LateTakeBack>,
    next_offer: u64,
}

/// A second count of an offer, taken back when due unless a new report comes first.
#[derive(Debug)]
struct LateTakeBack {
    due: Instant,
    call: OfferedCall,
    counted: Counted,
}

#[derive(Debug)]
struct PendingOffer {
    id: u64,
    call: OfferedCall,
    sent: Instant,
    /// The runner's pool version once it took the call; `None` while unanswered.
    taken_at: Option<u64>,
    /// What counting it changed in the held report, and that report's version.
    counted: Option<(u64, Counted)>,
}

/// What [`Observed::count_offer`] changed, to take it back.
#[derive(Debug, Clone, Copy)]
struct Counted {
    free_mb: u64,
    idle_mb: u64,
    idle_slot: bool,
    /// The slot was one of [`Held::ended_slots`].
    ended_slot: bool,
}

/// An offer counted in a runner's view (see [`Reports::offer`]): dropped unanswered or
/// refused, it is no longer counted on top of new reports; [`Offer::taken`] keeps it counted
/// until a report shows it.
#[derive(Debug)]
pub struct Offer {
    reports: Arc<Reports>,
    id: u64,
    /// Taken: the pending offer is the reports' to drop.
    taken: bool,
}

impl Offer {
    /// The runner refused the call for what it is (too large for it, invalid there): its
    /// pool did not change, so the count is taken back from the report it was counted on
    /// (see the module docs).
    pub fn refused_as_unfit(self) {
        let mut mirror = self.reports.lock();
        if let Some(pos) = mirror.pending.iter().position(|p| p.id == self.id) {
            let offer = mirror.pending.swap_remove(pos);
            if let (Some((version, counted)), Some(observed)) =
                (offer.counted, mirror.observed.as_mut())
                && observed.version == version
            {
                observed.uncount_offer(&offer.call, counted);
                drop(mirror);
                // Calls that saw the runner full while it was counted look again.
                self.reports.signal.report();
            }
        }
    }

    /// The runner took the call; `version`: its pool version right after (0: not given,
    /// when only the next report can tell).
    pub fn taken(mut self, version: u64) {
        self.taken = true;
        let mut mirror = self.reports.lock();
        let shown = version == 0
            || mirror
                .observed
                .as_ref()
                .is_some_and(|observed| observed.version >= version);
        if let Some(pos) = mirror.pending.iter().position(|p| p.id == self.id) {
            if shown {
                let offer = mirror.pending.swap_remove(pos);
                // Counted on top of a report that already shows it (the report came before
                // the acknowledgement): counted twice, so taken back once.
                if let (Some((version, counted)), Some(observed)) =
                    (offer.counted, mirror.observed.as_mut())
                    && observed.version == version
                {
                    if observed.reported_unheld_mb < offer.call.memory_mb {
                        // Short of memory, the runner evicts for new instances, and its next
                        // report (at most 20 ms away) says which are left: until then, a
                        // call that finds no room waits for it and more often finds a warm
                        // instance than one that starts an instance at once.
                        mirror.late.push(LateTakeBack {
                            due: Instant::now() + LATE_TAKE_BACK,
                            call: offer.call,
                            counted,
                        });
                    } else {
                        observed.uncount_offer(&offer.call, counted);
                    }
                }
            } else if let Some(pending) = mirror.pending.get_mut(pos) {
                pending.taken_at = Some(version);
            }
        }
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let mut mirror = self.reports.lock();
        if let Some(pos) = mirror.pending.iter().position(|p| p.id == self.id) {
            mirror.pending.swap_remove(pos);
        }
    }
}

#[derive(Debug)]
struct Observed {
    received: Instant,
    /// The runner's pool version the report was taken at.
    version: u64,
    /// Free memory no idle instance held, as reported.
    reported_unheld_mb: u64,
    total_mb: u64,
    free_mb: u64,
    /// The part of `free_mb` idle instances hold.
    idle_mb: u64,
    calls_in_flight: u64,
    draining: bool,
    /// The functions with running instances, sorted by app and function for binary search.
    held: Vec<Held>,
}

/// A function [`Observed`] holds instances of.
#[derive(Debug)]
struct Held {
    app: String,
    function: String,
    idle_slots: u32,
    instances: u32,
    /// Of `idle_slots`, those of one-call instances whose calls ended while the runner was
    /// short of memory: warm for this function, but their memory is not counted free (see
    /// [`Reports::finished`]).
    ended_slots: u32,
}

impl Observed {
    /// Counts `call` on a warm instance if one has room, else as a new instance's memory.
    fn count_offer(&mut self, call: &OfferedCall) -> Counted {
        self.calls_in_flight = self.calls_in_flight.saturating_add(1);
        let memory_mb = call.memory_mb;
        let unheld = self.free_mb - self.idle_mb;
        let (free_before, idle_before) = (self.free_mb, self.idle_mb);
        let (mut idle_slot, mut ended_slot) = (false, false);
        let (used_mb, evicted_mb) = match self.held(&call.app, &call.function) {
            Some(held) if held.idle_slots > 0 => {
                held.idle_slots -= 1;
                idle_slot = true;
                // A one-call instance with room was idle: its memory is in use now. One that
                // takes several calls may have been busy already; the report will tell. One
                // whose memory was never counted free takes none.
                if held.ended_slots > 0 {
                    held.ended_slots -= 1;
                    ended_slot = true;
                    (0, 0)
                } else if call.concurrency <= 1 {
                    (memory_mb, memory_mb)
                } else {
                    (0, 0)
                }
            }
            // A new instance: free memory first, then what idle instances give up.
            _ => (memory_mb, memory_mb.saturating_sub(unheld)),
        };
        self.free_mb = self.free_mb.saturating_sub(used_mb);
        self.idle_mb = self.idle_mb.saturating_sub(evicted_mb);
        self.idle_mb = self.idle_mb.min(self.free_mb);
        Counted {
            free_mb: free_before - self.free_mb,
            idle_mb: idle_before - self.idle_mb,
            idle_slot,
            ended_slot,
        }
    }

    /// `free_mb` more is free, `idle_mb` of it held by idle instances.
    fn free_again(&mut self, free_mb: u64, idle_mb: u64) {
        self.free_mb = self.free_mb.saturating_add(free_mb).min(self.total_mb);
        self.idle_mb = self.idle_mb.saturating_add(idle_mb).min(self.free_mb);
    }

    /// Takes back what [`Observed::count_offer`] counted for `call`.
    fn uncount_offer(&mut self, call: &OfferedCall, counted: Counted) {
        self.calls_in_flight = self.calls_in_flight.saturating_sub(1);
        self.free_again(counted.free_mb, counted.idle_mb);
        if counted.idle_slot
            && let Some(held) = self.held(&call.app, &call.function)
        {
            held.idle_slots = held.idle_slots.saturating_add(1);
            if counted.ended_slot {
                held.ended_slots = held.ended_slots.saturating_add(1);
            }
        }
    }

    fn held(&mut self, app: &str, function: &str) -> Option<&mut Held> {
        let idx = self
            .held
            .binary_search_by(|h| (h.app.as_str(), h.function.as_str()).cmp(&(app, function)))
            .ok()?;
        self.held.get_mut(idx)
    }
}

impl Reports {
    /// Reports that wake `signal`'s waiters on each update.
    pub fn with_signal(signal: ReportSignal) -> Self {
        Reports {
            current: Mutex::default(),
            signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mirror> {
        // A plain value replaced or edited in one step: a panic elsewhere cannot tear it.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What this runner's reports and call ends wake.
    pub(crate) fn signal(&self) -> &ReportSignal {
        &self.signal
    }

    /// Stores a report received now, replacing the previous one and the calls counted since.
    pub fn update(&self, state: RunnerState) {
        let mut held: Vec<Held> = state
            .warm
            .into_iter()
            .take(MAX_WARM_FUNCTIONS)
            .map(|w| Held {
                app: w.app,
                function: w.function,
                idle_slots: w.idle_slots,
                instances: w.instances,
                ended_slots: 0,
            })
            .collect();
        // The runner sends them sorted; a list that is not is sorted here rather than trusted.
        held.sort_unstable_by(|a, b| (&a.app, &a.function).cmp(&(&b.app, &b.function)));
        held.dedup_by(|b, a| {
            let same = a.app == b.app && a.function == b.function;
            if same {
                a.idle_slots = a.idle_slots.saturating_add(b.idle_slots);
                a.instances = a.instances.saturating_add(b.instances);
            }
            same
        });
        let mut observed = Observed {
            received: Instant::now(),
            version: state.version,
            reported_unheld_mb: state
                .capacity_free_mb
                .saturating_sub(state.capacity_idle_mb),
            total_mb: state.capacity_total_mb,
            free_mb: state.capacity_free_mb,
            idle_mb: state.capacity_idle_mb.min(state.capacity_free_mb),
            calls_in_flight: state.calls_in_flight,
            draining: state.draining,
            held,
        };
        let mut mirror = self.lock();
        let version = observed.version;
        mirror.pending.retain(|offer| {
            offer.sent.elapsed() <= STALE_AFTER && offer.taken_at.is_none_or(|v| v > version)
        });
        for offer in &mut mirror.pending {
            offer.counted = Some((version, observed.count_offer(&offer.call)));
        }
        mirror.observed = Some(observed);
        mirror.late.clear();
        drop(mirror);
        self.signal.report();
    }

    /// The stream ended or failed: forgets the report, unless it said the runner drains (a
    /// runner never stops draining; that report ages out like any other).
    pub fn clear(&self) {
        let mut mirror = self.lock();
        if !mirror.observed.as_ref().is_some_and(|o| o.draining) {
            mirror.observed = None;
        }
        // Versions of a runner that restarted start over: what a new stream reports is
        // taken as it is.
        mirror.pending.retain(|offer| offer.taken_at.is_none());
        mirror.late.clear();
    }

    /// What the report says of a call of `app`/`function` needing `memory_mb` for a new
    /// instance; [`RunnerView::Unknown`] without a report younger than [`STALE_AFTER`], and
    /// [`RunnerView::TooSmall`] for a call larger than the runner's whole memory (asked
    /// last, so that the runner says so, and a call no runner can ever hold gets its 503 at
    /// once).
    pub fn view(&self, app: &str, function: &str, memory_mb: u64) -> RunnerView {
        self.view_at(Instant::now(), app, function, memory_mb)
    }

    /// [`Reports::view`] as of `now`: a placement pass reads the clock once for all the
    /// runners of its group, not once per runner. A report received after `now` (during
    /// the pass) is fresh.
    pub fn view_at(&self, now: Instant, app: &str, function: &str, memory_mb: u64) -> RunnerView {
        let mut mirror = self.lock();
        let Mirror { observed, late, .. } = &mut *mirror;
        let Some(observed) = observed.as_mut() else {
            return RunnerView::Unknown;
        };
        if !late.is_empty() {
            late.retain(|l| {
                let due = l.due <= now;
                if due {
                    observed.uncount_offer(&l.call, l.counted);
                }
                !due
            });
        }
        if now.saturating_duration_since(observed.received) > STALE_AFTER {
            return RunnerView::Unknown;
        }
        if memory_mb > observed.total_mb {
            return RunnerView::TooSmall;
        }
        let (warm, instances) = observed
            .held(app, function)
            .map_or((false, 0), |h| (h.idle_slots > 0, h.instances));
        RunnerView::Known(RunnerLoad {
            warm,
            instances,
            fits: observed.free_mb >= memory_mb,
            evicts: observed.free_mb - observed.idle_mb < memory_mb,
            draining: observed.draining,
            calls_in_flight: observed.calls_in_flight,
        })
    }

    /// `call` is offered to the runner: until a report shows it, count it on a warm instance
    /// if the view shows one with room, else as a new instance's memory. The count holds
    /// until the next report; the returned [`Offer`] says whether it holds past that (see
    /// the module docs).
    pub fn offer(self: &Arc<Self>, call: &OfferedCall) -> Offer {
        let mut mirror = self.lock();
        let id = mirror.next_offer;
        mirror.next_offer = id.wrapping_add(1);
        // A stale report places nothing, and offers counted on it would pile up until a
        // report came.
        if let Some(observed) = mirror
            .observed
            .as_mut()
            .filter(|o| o.received.elapsed() <= STALE_AFTER)
        {
            let counted = (observed.version, observed.count_offer(call));
            mirror.pending.push(PendingOffer {
                id,
                call: call.clone(),
                sent: Instant::now(),
                taken_at: None,
                counted: Some(counted),
            });
        }
        Offer {
            reports: Arc::clone(self),
            id,
            taken: false,
        }
    }

    /// A call the runner committed has ended: `released` is the runner's pool version once
    /// the call let go of its instance, when its stream ended cleanly after
    /// `CallFinished{success}` (the runner keeps the instance), else `None`. Until the next
    /// report, count the call off the calls in flight and, when released, its instance's slot
    /// as free again, and wake one call of the function waiting for room
    /// ([`ReportSignal::released`]), unless the report held already shows that (a version
    /// at least `released`: the report and the call's end travel on different streams, in
    /// either order; a version of 0 is a runner that does not say, and the call is counted).
    ///
    /// When the report said the runner had no free memory that idle instances do not hold,
    /// the runner evicts idle instances for new ones, and only its next report (at most
    /// 20 ms away) says which are left: the instance is counted warm for calls of its own
    /// function, which the runner gives it before it evicts for anything, but its memory is
    /// not counted free. Counted free, calls of other functions would be sent to start
    /// instances in it, and the function's next calls would start cold; not counted at all,
    /// the calls waiting for the function would wait for that report, and a runner full of
    /// busy instances would carry one call per instance per report.
    pub fn finished(&self, call: &OfferedCall, released: Option<u64>) {
        let mut mirror = self.lock();
        let Some(observed) = mirror.observed.as_mut() else {
            return;
        };
        if released.is_some_and(|v| v != 0 && observed.version >= v) {
            return;
        }
        observed.calls_in_flight = observed.calls_in_flight.saturating_sub(1);
        if released.is_none() {
            return;
        }
        let one_call = call.concurrency <= 1;
        let short = observed.reported_unheld_mb < call.memory_mb;
        if one_call && !short {
            // Its instance is idle now: its memory is free again, held by an idle instance.
            observed.free_again(call.memory_mb, call.memory_mb);
        }
        let ended = u32::from(one_call && short);
        match observed.held(&call.app, &call.function) {
            Some(held) => {
                held.idle_slots = held.idle_slots.saturating_add(1);
                held.ended_slots = held.ended_slots.saturating_add(ended);
            }
            None => {
                let held = Held {
                    app: call.app.clone(),
                    function: call.function.clone(),
                    idle_slots: 1,
                    instances: 1,
                    ended_slots: ended,
                };
                let at = observed.held.partition_point(|h| {
                    (h.app.as_str(), h.function.as_str())
                        < (held.app.as_str(), held.function.as_str())
                });
                observed.held.insert(at, held);
            }
        }
        let draining = observed.draining;
        drop(mirror);
        if !draining {
            self.signal.release(&call.app, &call.function);
        }
    }

    /// Whether a report younger than [`STALE_AFTER`] is held.
    pub fn is_fresh(&self) -> bool {
        self.lock()
            .observed
            .as_ref()
            .is_some_and(|o| o.received.elapsed() <= STALE_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use fn_protocol::runner::WarmFunction;
    use futures::FutureExt as _;

    use super::*;

    fn state(free_mb: u64, warm: &[(&str, &str, u32)]) -> RunnerState {
        RunnerState {
            version: 1,
            capacity_total_mb: 1024,
            capacity_free_mb: free_mb,
            capacity_idle_mb: 0,
            calls_in_flight: 2,
            draining: false,
            warm: warm
                .iter()
                .map(|(app, function, idle_slots)| WarmFunction {
                    app: (*app).into(),
                    function: (*function).into(),
                    idle_slots: *idle_slots,
                    instances: 1,
                })
                .collect(),
        }
    }

    /// A call of `a/<function>`, 64 MB, `concurrency` calls per instance.
    fn offered_call(function: &str, concurrency: u32) -> OfferedCall {
        OfferedCall {
            app: "a".into(),
            function: function.into(),
            memory_mb: 64,
            concurrency,
        }
    }

    /// A one-call-per-instance call of `a/f`, 64 MB.
    fn call_of_f() -> OfferedCall {
        OfferedCall {
            app: "a".into(),
            function: "f".into(),
            memory_mb: 64,
            concurrency: 1,
        }
    }

    fn load(view: RunnerView) -> RunnerLoad {
        match view {
            RunnerView::Known(load) => load,
            RunnerView::Unknown | RunnerView::TooSmall => panic!("expected a known view"),
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
    fn calls_offered_between_reports_are_counted() {
        let reports = Arc::new(Reports::default());
        // 128 MB free, 64 of them held by the idle instance of a/f.
        reports.update(RunnerState {
            capacity_idle_mb: 64,
            ..state(128, &[("a", "f", 1)])
        });
        let before = load(reports.view("a", "g", 64));
        assert!(
            before.fits && !before.evicts,
            "64 MB are free without evicting"
        );
        let f = reports.offer(&offered_call("f", 1));
        let after_warm = load(reports.view("a", "f", 64));
        assert!(!after_warm.warm, "its one idle slot is taken");
        assert!(
            after_warm.fits && !after_warm.evicts,
            "and its memory, not the free 64 MB"
        );
        assert_eq!(after_warm.calls_in_flight, 3);
        drop(reports.offer(&offered_call("g", 1)));
        assert!(
            !load(reports.view("a", "g", 64)).fits,
            "a cold start uses up the rest"
        );
        // The runner took the call to a/f at version 2, and reports it.
        f.taken(2);
        reports.update(RunnerState {
            version: 2,
            capacity_idle_mb: 64,
            ..state(64, &[])
        });
        let evicting = load(reports.view("a", "h", 64));
        assert!(evicting.fits && evicting.evicts, "only by evicting");
        drop(reports.offer(&offered_call("h", 1)));
        assert!(!load(reports.view("a", "h", 64)).fits);
        reports.update(state(128, &[("a", "f", 2)]));
        let fresh = load(reports.view("a", "f", 64));
        assert!(fresh.warm && fresh.fits, "a new report replaces the count");
    }

    #[test]
    fn a_call_that_ends_cleanly_leaves_a_warm_instance_until_the_next_report() {
        let reports = Reports::default();
        reports.update(state(128, &[]));
        let call = call_of_f();
        // Released at pool version 2, after the report's version 1.
        reports.finished(&call, Some(2));
        let view = load(reports.view("a", "f", 64));
        assert!(view.warm && view.fits, "{view:?}");
        assert_eq!((view.calls_in_flight, view.instances), (1, 1));
        reports.finished(
            &OfferedCall {
                function: "g".into(),
                ..call
            },
            None,
        );
        let view = load(reports.view("a", "g", 64));
        assert!(!view.warm, "a call cut off leaves no instance");
        assert_eq!(view.calls_in_flight, 0);
    }

    #[test]
    fn a_call_end_the_report_already_shows_is_not_counted_twice() {
        let call = call_of_f();
        // The report (version 5) was taken after the call let go of its instance (version
        // 4): it shows the instance idle already, once.
        let reports = Arc::new(Reports::default());
        reports.update(RunnerState {
            version: 5,
            capacity_idle_mb: 64,
            ..state(128, &[("a", "f", 1)])
        });
        reports.finished(&call, Some(4));
        reports.finished(&call, Some(5));
        drop(reports.offer(&call));
        let view = load(reports.view("a", "f", 64));
        assert!(!view.warm, "one idle instance, taken: {view:?}");
        assert_eq!(view.calls_in_flight, 3, "2 in the report and the offer");
        // A runner that does not give the version (0): counted, as before versions.
        reports.finished(&call, Some(0));
        let view = load(reports.view("a", "f", 64));
        assert!(view.warm, "{view:?}");
        assert_eq!(view.calls_in_flight, 2);
    }

    #[test]
    fn a_runner_short_of_memory_keeps_an_ended_calls_instance_for_its_own_function() {
        let reports = Arc::new(Reports::default());
        // 64 MB free, all of it held by an idle instance of a/g: a new instance evicts.
        reports.update(RunnerState {
            capacity_idle_mb: 64,
            ..state(64, &[("a", "g", 1)])
        });
        let call = call_of_f();
        reports.finished(&call, Some(2));
        let view = load(reports.view("a", "f", 64));
        assert!(view.warm, "warm for its own function: {view:?}");
        assert_eq!(view.calls_in_flight, 1);
        // Its memory is not counted free: a call of another function still evicts a/g's.
        let other = load(reports.view("a", "h", 64));
        assert!(other.fits && other.evicts, "{other:?}");
        assert!(!load(reports.view("a", "h", 128)).fits);
        // A call of a/f takes it without taking memory the view never counted free.
        let _offer = reports.offer(&call);
        let view = load(reports.view("a", "f", 64));
        assert!(!view.warm, "taken: {view:?}");
        assert_eq!(view.calls_in_flight, 2);
        let other = load(reports.view("a", "h", 64));
        assert!(other.fits && other.evicts, "{other:?}");
        // The next report says what is left.
        reports.update(RunnerState {
            capacity_idle_mb: 64,
            ..state(64, &[("a", "g", 1)])
        });
        assert!(!load(reports.view("a", "f", 64)).warm);
    }

    #[test]
    fn functions_have_keys_of_their_own() {
        let keys = [
            function_key("a", "bc"),
            function_key("ab", "c"),
            function_key("a", "b"),
            function_key("b", "a"),
            function_key("", "ab"),
        ];
        for (i, key) in keys.iter().enumerate() {
            assert!(!keys[..i].contains(key), "{keys:?}");
        }
        assert_eq!(function_key("a", "bc"), function_key("a", "bc"));
    }

    #[tokio::test]
    async fn an_ended_call_wakes_one_call_waiting_for_its_function() {
        let signal = ReportSignal::default();
        let reports = Reports::with_signal(signal.clone());
        reports.update(state(0, &[("a", "f", 0)]));
        let (first_waiting, second_waiting) = (signal.waiting("a", "f"), signal.waiting("a", "f"));
        let other_waiting = signal.waiting("a", "g");
        {
            let first = first_waiting.released();
            let second = second_waiting.released();
            let other = other_waiting.released();
            tokio::pin!(first, second, other);
            first.as_mut().enable();
            second.as_mut().enable();
            other.as_mut().enable();
            let bound = Duration::from_secs(5);
            // A call cut off leaves no instance and wakes nobody.
            reports.finished(&call_of_f(), None);
            assert!(first.as_mut().now_or_never().is_none());
            reports.finished(&call_of_f(), Some(2));
            tokio::time::timeout(bound, first)
                .await
                .expect("the first woken");
            assert!(
                second.as_mut().now_or_never().is_none(),
                "one instance, one call"
            );
            assert!(
                other.as_mut().now_or_never().is_none(),
                "a call of another function"
            );
            reports.finished(&call_of_f(), Some(3));
            tokio::time::timeout(bound, second).await.expect("woken");
            // One left idle while a call waits but is not armed wakes its next wait at once.
            reports.finished(&call_of_f(), Some(4));
            tokio::time::timeout(bound, first_waiting.released())
                .await
                .expect("woken");
        }
        // Once no call waits for the function, an end is not kept for a later one: that
        // call looks at the runners after it takes its place.
        drop((first_waiting, second_waiting));
        assert_eq!(signal.0.lock_released().len(), 1, "a/g waits still");
        drop(other_waiting);
        assert!(!signal.0.anyone_waits() && signal.0.lock_released().is_empty());
        reports.finished(&call_of_f(), Some(5));
        let later = signal.waiting("a", "f");
        assert!(later.released().now_or_never().is_none());
        // A draining runner's ends wake nobody: it takes no new call.
        reports.update(RunnerState {
            draining: true,
            ..state(0, &[("a", "f", 0)])
        });
        let armed = later.released();
        tokio::pin!(armed);
        armed.as_mut().enable();
        reports.finished(&call_of_f(), Some(6));
        assert!(armed.as_mut().now_or_never().is_none());
    }

    /// A pass's views are as of its start: a report received during the pass is fresh, and
    /// one older than [`STALE_AFTER`] at the pass's time is unknown, whatever the clock says
    /// when each runner is looked at.
    #[tokio::test(start_paused = true)]
    async fn a_view_is_as_of_the_time_it_is_given() {
        let reports = Reports::with_signal(ReportSignal::default());
        let pass_started = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        reports.update(state(64, &[("a", "f", 1)]));
        let view = reports.view_at(pass_started, "a", "f", 64);
        assert!(
            matches!(view, RunnerView::Known(load) if load.warm),
            "{view:?}"
        );
        let later = Instant::now() + STALE_AFTER + Duration::from_millis(1);
        let view = reports.view_at(later, "a", "f", 64);
        assert_eq!(view, RunnerView::Unknown, "stale as of the pass's time");
        assert!(matches!(reports.view("a", "f", 64), RunnerView::Known(_)));
    }

    /// A call woken for an idle instance that goes away before it spent the wake (its client
    /// left during its offer) hands the wake to the next call waiting for the function; one
    /// that spent it does not.
    #[tokio::test]
    async fn a_wake_held_by_a_call_that_goes_away_passes_to_the_next_waiter() {
        let signal = ReportSignal::default();
        let reports = Reports::with_signal(signal.clone());
        reports.update(state(0, &[("a", "f", 0)]));
        let bound = Duration::from_secs(5);
        let (first, second) = (signal.waiting("a", "f"), signal.waiting("a", "f"));
        reports.finished(&call_of_f(), Some(2));
        tokio::time::timeout(bound, first.take_release())
            .await
            .expect("woken");
        drop(first); // its client left while it was being placed
        tokio::time::timeout(bound, second.take_release())
            .await
            .expect("the wake passed on to the next call");

        let third = signal.waiting("a", "f");
        second.spend_wake(); // placed
        drop(second);
        assert!(
            third.released().now_or_never().is_none(),
            "a spent wake woke another call"
        );
    }

    /// Report `version`: 64 MB free, all of it held by one idle instance of a/f.
    fn one_idle_f(version: u64) -> RunnerState {
        RunnerState {
            version,
            capacity_idle_mb: 64,
            ..state(64, &[("a", "f", 1)])
        }
    }

    #[test]
    fn an_offer_a_report_does_not_show_yet_stays_counted() {
        let reports = Arc::new(Reports::default());
        // Version 1: one idle instance of a/f.
        reports.update(one_idle_f(1));
        let on_its_way = reports.offer(&call_of_f());
        // A report taken before the offer arrived still shows the instance idle: the offer
        // on its way has it.
        reports.update(one_idle_f(2));
        let view = load(reports.view("a", "f", 64));
        assert!(!view.warm && !view.fits, "promised once: {view:?}");
        assert_eq!(view.calls_in_flight, 3);
        // Taken at version 4: a report of version 3 does not show it either.
        on_its_way.taken(4);
        reports.update(one_idle_f(3));
        assert!(!load(reports.view("a", "f", 64)).warm);
        // Version 4 shows it: the report alone counts.
        reports.update(one_idle_f(4));
        let view = load(reports.view("a", "f", 64));
        assert!(view.warm && view.fits, "{view:?}");
        assert_eq!(view.calls_in_flight, 2);
    }

    #[test]
    fn a_report_that_shows_an_offer_before_its_acknowledgement_counts_it_once_after_the_ack() {
        let reports = Arc::new(Reports::default());
        // Version 1: two idle instances of a/f, 256 MB free (128 held by them).
        reports.update(RunnerState {
            capacity_idle_mb: 128,
            ..state(256, &[("a", "f", 2)])
        });
        let offer = reports.offer(&call_of_f());
        // Version 2, taken after the runner took the call: one idle instance left. Until the
        // acknowledgement the LB cannot tell, and counts the offer on top.
        reports.update(RunnerState {
            version: 2,
            calls_in_flight: 3,
            capacity_idle_mb: 64,
            ..state(192, &[("a", "f", 1)])
        });
        assert!(
            !load(reports.view("a", "f", 64)).warm,
            "counted twice for now"
        );
        // The acknowledgement says version 2 shows it: counted once, one instance idle.
        offer.taken(2);
        let view = load(reports.view("a", "f", 64));
        assert!(view.warm && view.fits, "{view:?}");
        assert_eq!(view.calls_in_flight, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_runner_short_of_memory_keeps_a_second_count_until_its_next_report_or_briefly() {
        let reports = Arc::new(Reports::default());
        // Version 1: two idle instances of a/f hold all the free memory.
        let two_idle = RunnerState {
            capacity_idle_mb: 128,
            ..state(128, &[("a", "f", 2)])
        };
        // Version 2, the offer taken: one idle instance left.
        let one_idle = RunnerState {
            version: 2,
            calls_in_flight: 3,
            ..one_idle_f(2)
        };
        for next_report in [true, false] {
            reports.update(two_idle.clone());
            let offer = reports.offer(&call_of_f());
            reports.update(one_idle.clone());
            offer.taken(2);
            let view = load(reports.view("a", "f", 64));
            assert!(
                !view.warm && !view.fits,
                "counted twice until the next report: {view:?}"
            );
            assert_eq!(view.calls_in_flight, 4);
            if next_report {
                reports.update(RunnerState {
                    version: 3,
                    ..one_idle.clone()
                });
            } else {
                tokio::time::advance(LATE_TAKE_BACK).await;
            }
            let view = load(reports.view("a", "f", 64));
            assert!(view.warm && view.fits, "{view:?}");
            assert_eq!(view.calls_in_flight, 3);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offers_on_a_stale_report_are_not_kept() {
        let reports = Arc::new(Reports::default());
        reports.update(one_idle_f(1));
        tokio::time::advance(STALE_AFTER + Duration::from_millis(1)).await;
        // Taken after the report, which never comes: kept until a report shows them.
        for _ in 0..1000 {
            reports.offer(&call_of_f()).taken(2);
        }
        assert_eq!(reports.lock().pending.len(), 0);
        assert_eq!(reports.view("a", "f", 64), RunnerView::Unknown);
    }

    #[test]
    fn a_refused_or_given_up_offer_is_not_counted_past_the_next_report() {
        let reports = Arc::new(Reports::default());
        reports.update(one_idle_f(1));
        drop(reports.offer(&call_of_f()));
        assert!(
            !load(reports.view("a", "f", 64)).warm,
            "counted until the next report"
        );
        reports.update(one_idle_f(2));
        assert!(load(reports.view("a", "f", 64)).warm);
        // Taken, by a runner that gives no version: the next report decides.
        reports.offer(&call_of_f()).taken(0);
        reports.update(one_idle_f(3));
        assert!(load(reports.view("a", "f", 64)).warm);
    }

    #[test]
    fn an_offer_refused_as_unfit_is_taken_back_at_once() {
        let signal = ReportSignal::default();
        let reports = Arc::new(Reports::with_signal(signal.clone()));
        reports.update(one_idle_f(1));
        let before = load(reports.view("a", "f", 64));
        let woken = signal.next_report();
        tokio::pin!(woken);
        woken.as_mut().enable();
        reports.offer(&call_of_f()).refused_as_unfit();
        assert_eq!(load(reports.view("a", "f", 64)), before);
        assert!(
            woken.as_mut().now_or_never().is_some(),
            "calls waiting for room are told"
        );
        // A call larger than the whole runner, refused as too large: without the take-back,
        // the runner would look full to every call until its next report.
        let large = OfferedCall {
            memory_mb: 4096,
            ..call_of_f()
        };
        let offered = reports.offer(&large);
        assert!(
            !load(reports.view("a", "g", 64)).fits,
            "counted while offered"
        );
        offered.refused_as_unfit();
        let other = load(reports.view("a", "g", 64));
        assert!(other.fits, "{other:?}");
        assert_eq!(other.calls_in_flight, before.calls_in_flight);
        // An offer still on its way is counted again on a newer report, and taken back
        // from that one.
        let late = reports.offer(&call_of_f());
        reports.update(one_idle_f(2));
        assert!(
            !load(reports.view("a", "f", 64)).warm,
            "counted on the new report"
        );
        late.refused_as_unfit();
        assert!(load(reports.view("a", "f", 64)).warm);
    }

    #[test]
    fn a_shared_instance_keeps_its_memory_count() {
        let reports = Arc::new(Reports::default());
        reports.update(state(64, &[("a", "f", 4)]));
        let _offer = reports.offer(&offered_call("f", 4));
        let view = load(reports.view("a", "f", 64));
        assert!(
            view.warm && view.fits,
            "three slots and the free memory are left"
        );
    }

    #[tokio::test]
    async fn a_report_wakes_the_waiting_calls() {
        let signal = ReportSignal::default();
        let reports = Reports::with_signal(signal.clone());
        let waiting = signal.next_report();
        tokio::pin!(waiting);
        waiting.as_mut().enable();
        reports.update(state(64, &[]));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken");
    }

    #[test]
    fn a_call_larger_than_the_runner_is_left_to_the_runner() {
        let reports = Reports::default();
        reports.update(state(0, &[]));
        assert!(!load(reports.view("a", "f", 1024)).fits);
        assert_eq!(reports.view("a", "f", 1025), RunnerView::TooSmall);
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
