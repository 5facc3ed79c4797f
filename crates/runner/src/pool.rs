//! The capacity gate and the hot-instance pool, as one piece of state.
//!
//! Memory is the runner's only admission currency, counted per instance. Two kinds of memory
//! are held:
//! - *committed*: memory of instances running at least one call, and of instances still
//!   starting, with or without a call left waiting (what `Status` reports and what the npm
//!   drains on);
//! - *idle*: memory of running instances waiting for their next call: what eviction can
//!   take back.
//!
//! An instance takes up to its function's `concurrency` calls at once (1 by default: Fn's one
//! call per instance); a call on an instance that is already running costs no memory.
//!
//! [`Pool::admit`] is an atomic check-and-reserve under one short lock (never held across an
//! await): a running instance of the same [`InstanceSpec`] with a free slot is used (busy ones
//! first, so calls pack onto few instances); otherwise the call's memory is reserved, evicting
//! idle instances lowest priority first when that makes room; a call that would not fit
//! even with every idle instance gone is refused as busy and evicts nothing.
//!
//! **Eviction order** is Greedy-Dual with frequency, as FaasCache (Fuerst and Sharma, ASPLOS
//! 2021) keeps functions warm: each call sets its instance's priority to the pool's clock plus
//! the calls its function has had while it held instances here, and an eviction takes the
//! idle instance of lowest priority (the least recently used of equals) and moves the clock
//! up to it. A function called often keeps its instances through bursts of rare ones, and an
//! instance no call has used for long still ages out, where least-recently-used evicts the
//! instance of a popular function that happened to finish first.
//!
//! A new instance is in the pool from the moment its memory is reserved, *starting*: calls
//! that arrive while it starts join it (up to its concurrency) and wait for it instead of
//! starting instances of their own, so a burst at a cold function with `concurrency = N`
//! starts one instance per N calls. The start runs in a task of its own, launched by the first
//! call that needs the instance, so a caller that goes away does not cancel it for the others;
//! an instance that finishes starting with no call left becomes idle.
//!
//! A [`Reservation`] holds the call's slot and (once started) its instance. Dropping it
//! releases the slot exactly once on every path — success, error, timeout, cancellation,
//! panic. Only [`Reservation::finish_ok`], called when a call completed cleanly, keeps a
//! one-call instance once the call had it: one whose call was cut off in an unknown state is
//! killed and never reused (a call given up before it had its instance sent it nothing, and
//! leaves it as it was). An instance that takes several calls at once is kept when one of them fails (its
//! other calls are not to be cut off for it) unless it has died; when its last call ends it
//! becomes idle like any other.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fn_protocol::call::MAX_MEMORY_MB;
use futures::FutureExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, DriverError, Instance, InstanceSpec};

/// Why a call was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("busy: {needed_mb} MB needed, {free_mb} MB free of {total_mb} MB")]
    Busy {
        needed_mb: u64,
        free_mb: u64,
        total_mb: u64,
    },
    #[error("draining: this runner takes no new calls")]
    Draining,
    #[error("call needs {needed_mb} MB, more than this runner's total of {total_mb} MB")]
    TooLarge { needed_mb: u64, total_mb: u64 },
}

/// A point-in-time view of the pool, for `Status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub calls_in_flight: u64,
    pub total_mb: u64,
    pub committed_mb: u64,
    pub idle_mb: u64,
    pub hot_instances: u64,
    pub draining: bool,
    /// Instances started since the pool was created.
    pub instances_started: u64,
}

/// What the pool holds, for placement: the runner's `WatchState` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolState {
    /// [`Pool::subscribe`]'s version when the state was read.
    pub version: u64,
    pub total_mb: u64,
    /// Memory a new instance can have now: idle instances give theirs up when needed.
    pub free_mb: u64,
    /// The part of `free_mb` that idle instances hold.
    pub idle_mb: u64,
    pub calls_in_flight: u64,
    pub draining: bool,
    /// Per function with a running instance, the calls its running instances could take
    /// now and how many there are; by app, then function.
    pub warm: Vec<WarmFunction>,
}

/// A function [`PoolState`] holds warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmFunction {
    pub app: String,
    pub function: String,
    pub idle_slots: u32,
    pub instances: u32,
}

/// How an instance's start ended, for the calls waiting on it.
type Started = Option<Result<Arc<dyn Instance>, DriverError>>;

/// A pooled instance: starting or running.
enum Slot {
    Starting {
        /// Set once the start has ended.
        ready: watch::Receiver<Started>,
        /// Taken by the first call that needs the instance, which launches the start.
        launch: Option<watch::Sender<Started>>,
    },
    Running(Arc<dyn Instance>),
}

/// An instance in the pool, starting or running, busy or idle.
struct HotInstance {
    id: u64,
    /// Shared by every instance of an equal spec, so that a scan compares it once per call.
    spec: Arc<InstanceSpec>,
    /// Hashes of the spec, compared before the spec itself.
    key: SpecKey,
    slot: Slot,
    /// Calls on it now (running or waiting for it to start), at most `spec.concurrency`.
    calls: u32,
    /// Takes no more calls; killed when its last call ends.
    retired: bool,
    /// When its last call ended (meaningful while idle).
    last_used: Instant,
    /// Calls admitted to it.
    uses: u64,
    /// Its eviction priority, set at each call: see the module docs.
    priority: u64,
    /// The shard whose call started it (`FN_SHARDS`): its first connection lives there, and
    /// calls on that shard prefer it among equals.
    shard: usize,
}

/// Hashes of an [`InstanceSpec`]: a scan of the pool compares these first, so instances of
/// other functions cost one comparison each. Equal specs have equal keys; equal keys are
/// confirmed by comparing the specs. The spec's key leaves out its command and configuration
/// (hashing them cost more than the scan saves): versions of one function that differ only
/// there are told apart by that comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpecKey {
    /// Of the app and function: what the eviction priority counts by.
    function: u64,
    /// Of the whole spec: what instances are shared by.
    spec: u64,
}

impl SpecKey {
    fn of(spec: &InstanceSpec) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (&spec.app, &spec.function).hash(&mut h);
        let function = h.finish();
        (spec.memory_mb, spec.concurrency, spec.idle_timeout).hash(&mut h);
        SpecKey {
            function,
            spec: h.finish(),
        }
    }
}

impl HotInstance {
    /// Whether this instance runs `spec`'s function (not necessarily the same spec).
    fn same_function(&self, key: SpecKey, spec: &InstanceSpec) -> bool {
        self.key.function == key.function
            && self.spec.app == spec.app
            && self.spec.function == spec.function
    }

    fn idle(&self) -> bool {
        self.calls == 0
    }

    /// The instance, once it runs.
    fn running(&self) -> Option<&Arc<dyn Instance>> {
        match &self.slot {
            Slot::Running(instance) => Some(instance),
            Slot::Starting { .. } => None,
        }
    }

    /// Idle and running: what eviction and expiry may take.
    fn idle_running(&self) -> bool {
        self.idle() && self.running().is_some()
    }

    /// Can take calls: starting, or running and alive.
    fn usable(&self) -> bool {
        !self.retired && self.running().is_none_or(|i| i.is_alive())
    }
}

#[derive(Default)]
struct State {
    committed_mb: u64,
    idle_mb: u64,
    calls_in_flight: u64,
    instances_started: u64,
    next_id: u64,
    /// The eviction clock: the priority of the last instance evicted.
    clock: u64,
    /// Every instance, starting or running: one per call in flight for a function without
    /// `concurrency`. Scanned once per admission ([`State::find`]), where an instance of
    /// another function costs one comparison of hashes and one of the call's own spec the
    /// comparison of an `Arc` (`cargo bench -p fn-runner --bench pool`).
    hot: Vec<HotInstance>,
}

impl State {
    /// Removes the idle running instances `pick` selects; their memory leaves the idle count.
    fn take_idle_where(&mut self, mut pick: impl FnMut(&HotInstance) -> bool) -> Vec<HotInstance> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.hot)
            .into_iter()
            .partition(|h| h.idle_running() && pick(h));
        self.hot = kept;
        self.idle_mb -= taken.iter().map(|h| h.spec.memory_mb).sum::<u64>();
        taken
    }

    /// The priority a call of `spec`'s function gives its instance: the clock plus the
    /// calls of the function while it held instances here, this one included.
    fn priority(&self, key: SpecKey, spec: &InstanceSpec) -> u64 {
        let calls: u64 = self
            .hot
            .iter()
            .filter(|h| h.same_function(key, spec))
            .map(|h| h.uses)
            .sum();
        self.clock.saturating_add(calls).saturating_add(1)
    }

    /// One pass over the pool for a call of `spec`: the instance to join (busy ones with room
    /// first, then the most recently used idle one), the spec as the pool already shares it,
    /// and the calls `spec`'s function has had here.
    fn find(&self, key: SpecKey, spec: &InstanceSpec) -> Found {
        let mut found = Found {
            join: None,
            shared: None,
            function_uses: 0,
        };
        let mut best = (false, false, None);
        let here = fn_lifecycle::shards::current();
        for (pos, h) in self.hot.iter().enumerate() {
            if h.key.function != key.function {
                continue;
            }
            // Compared once per distinct `Arc`: instances of one spec share theirs.
            let same_spec = h.key.spec == key.spec
                && match &found.shared {
                    Some(shared) if Arc::ptr_eq(shared, &h.spec) => true,
                    _ => *h.spec == *spec,
                };
            if same_spec {
                found.shared.get_or_insert_with(|| Arc::clone(&h.spec));
                found.function_uses += h.uses;
                if h.calls < spec.concurrency {
                    // The last of equals, as `Iterator::max_by_key` picks.
                    let rank = (h.calls > 0, h.shard == here, Some(h.last_used));
                    if rank >= best && h.usable() {
                        best = rank;
                        found.join = Some(pos);
                    }
                }
            } else if h.same_function(key, spec) {
                found.function_uses += h.uses;
            }
        }
        found
    }

    /// Removes the idle instance of lowest priority, the least recently used of equals, and
    /// moves the clock up to its priority.
    fn evict_one(&mut self) -> Option<HotInstance> {
        let pos = self
            .hot
            .iter()
            .enumerate()
            .filter(|(_, h)| h.idle_running())
            .min_by_key(|(_, h)| (h.priority, h.last_used))
            .map(|(pos, _)| pos)?;
        let old = self.hot.swap_remove(pos);
        self.idle_mb -= old.spec.memory_mb;
        self.clock = self.clock.max(old.priority);
        Some(old)
    }
}

/// What [`State::find`] found for a call.
struct Found {
    /// Where the instance the call joins is in `hot`.
    join: Option<usize>,
    /// An instance's `Arc` of a spec equal to the call's, for a new instance to share.
    shared: Option<Arc<InstanceSpec>>,
    /// Calls of the call's function on the instances here (for its eviction priority).
    function_uses: u64,
}

/// Capacity gate and hot instances of one runner. Shared as `Arc<Pool>`.
pub struct Pool {
    driver: Arc<dyn Driver>,
    total_mb: u64,
    start_timeout: Duration,
    draining: AtomicBool,
    /// `std::sync::Mutex`: every critical section is a few comparisons and a `Vec` edit,
    /// never an await, so an async mutex would only add cost.
    state: Mutex<State>,
    /// Woken whenever a call ends, for [`Pool::wait_idle`].
    call_ended: Notify,
    /// Bumped after every change of what [`Pool::state`] reports.
    changes: watch::Sender<u64>,
    /// Instances killed and not seen gone yet (a container's removal, a cgroup's, under
    /// way), for [`Pool::shutdown`] to wait for.
    dying: Mutex<Vec<Arc<dyn Instance>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool with `total_mb` of memory to hand out, starting instances with `driver`; at
    /// most [`MAX_MEMORY_MB`] (more is taken as that), so that no sum of reservations
    /// overflows (see [`crate::memory::total_mb`], which refuses more).
    pub fn new(driver: Arc<dyn Driver>, total_mb: u64, start_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            driver,
            total_mb: total_mb.min(MAX_MEMORY_MB),
            start_timeout,
            draining: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            call_ended: Notify::new(),
            changes: watch::Sender::new(0),
            dying: Mutex::default(),
        })
    }

    /// Kills `instance` and keeps it until it is gone, for [`Pool::shutdown`]. A killed
    /// container is removed by a task of the driver's: a runner that exited before it ran
    /// left the container running.
    fn bury(&self, instance: &Arc<dyn Instance>) {
        instance.kill();
        let mut dying = self.dying.lock().unwrap_or_else(PoisonError::into_inner);
        // Those gone by now leave: the list holds clean-ups under way only.
        dying.retain(|i| i.wait_gone().now_or_never().is_none());
        dying.push(Arc::clone(instance));
    }

    /// [`Pool::bury`] for an instance of the pool, once it runs.
    fn bury_hot(&self, hot: &HotInstance) {
        if let Some(instance) = hot.running() {
            self.bury(instance);
        }
    }

    /// Tells [`Pool::subscribe`]rs that the state changed.
    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees a new version after every change of [`Pool::state`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The pool's version: grows by one with each change of what [`Pool::state`] reports.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    /// What the pool holds now, for placement.
    ///
    /// Under the pool's lock it only takes each running instance's spec (a reference
    /// count) and free slots; the grouping by function and the sort run after the lock is
    /// released, so a report over many instances of many functions holds up no admission
    /// (every `WatchState` stream builds one, up to every 20 ms).
    pub fn state(&self) -> PoolState {
        let st = self.lock();
        let mut running: Vec<(Arc<InstanceSpec>, u32)> = st
            .hot
            .iter()
            .filter(|hot| hot.running().is_some() && hot.usable())
            .map(|hot| {
                let free = hot.spec.concurrency.saturating_sub(hot.calls);
                (Arc::clone(&hot.spec), free)
            })
            .collect();
        let free_mb = self.total_mb.saturating_sub(st.committed_mb);
        let idle_mb = st.idle_mb;
        let calls_in_flight = st.calls_in_flight;
        drop(st);
        // Read after the snapshot: a change that lands in between gives the report a version
        // newer than its contents, so an LB may count that change late, never twice (see
        // `CallFinished.pool_version`).
        let version = self.version();
        running
            .sort_unstable_by(|(a, _), (b, _)| (&a.app, &a.function).cmp(&(&b.app, &b.function)));
        let mut warm: Vec<WarmFunction> = Vec::new();
        for (spec, free) in running {
            match warm.last_mut() {
                Some(w) if w.app == spec.app && w.function == spec.function => {
                    w.idle_slots = w.idle_slots.saturating_add(free);
                    w.instances = w.instances.saturating_add(1);
                }
                _ => warm.push(WarmFunction {
                    app: spec.app.clone(),
                    function: spec.function.clone(),
                    idle_slots: free,
                    instances: 1,
                }),
            }
        }
        PoolState {
            version,
            total_mb: self.total_mb,
            free_mb,
            idle_mb,
            calls_in_flight,
            draining: self.draining.load(Ordering::Acquire),
            warm,
        }
    }

    /// The driver behind this pool.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters half-updated (each
        // section updates them together before any call that could panic), so recover.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Atomically reserves a slot for a call of `spec`: on a running instance of the same
    /// spec with room for another call, or else memory for a new instance.
    ///
    /// # Errors
    /// [`Refusal`] when draining, or when the memory does not fit even after evicting idle
    /// instances.
    pub fn admit(self: &Arc<Self>, spec: InstanceSpec) -> Result<Reservation, Refusal> {
        // From the network (the LB's offer): checked against the total before any sum, and
        // the total is at most MAX_MEMORY_MB, so no sum below nears u64::MAX; saturating all
        // the same.
        let needed_mb = spec.memory_mb;
        if needed_mb > self.total_mb {
            return Err(Refusal::TooLarge {
                needed_mb,
                total_mb: self.total_mb,
            });
        }
        let mut evicted = Vec::new();
        let result = {
            let mut st = self.lock();
            let st = &mut *st;
            // Checked under the lock that `wait_idle` reads `calls_in_flight` under: a call
            // is either admitted before a drain starts (and waited for) or refused.
            if self.draining.load(Ordering::Acquire) {
                return Err(Refusal::Draining);
            }
            let key = SpecKey::of(&spec);
            let found = st.find(key, &spec);
            let priority = st
                .clock
                .saturating_add(found.function_uses)
                .saturating_add(1);
            if let Some(hot) = found.join.map(|pos| &mut st.hot[pos]) {
                // A starting instance's memory is committed, with or without calls.
                if hot.idle_running() {
                    st.idle_mb -= needed_mb;
                    st.committed_mb += needed_mb;
                }
                hot.calls += 1;
                hot.uses += 1;
                hot.priority = priority;
                st.calls_in_flight += 1;
                Ok((hot.id, hot.running().is_some()))
            } else {
                // Evict only when that makes room: a call that cannot fit even with every
                // idle instance gone is refused without killing any of them.
                let fits_after_eviction =
                    st.committed_mb.saturating_add(needed_mb) <= self.total_mb;
                while fits_after_eviction
                    && st
                        .committed_mb
                        .saturating_add(st.idle_mb)
                        .saturating_add(needed_mb)
                        > self.total_mb
                {
                    match st.evict_one() {
                        Some(old) => evicted.push(old),
                        None => break,
                    }
                }
                let used = st.committed_mb.saturating_add(st.idle_mb);
                if used.saturating_add(needed_mb) <= self.total_mb {
                    st.committed_mb += needed_mb;
                    st.calls_in_flight += 1;
                    // In the pool at once, starting, so that calls arriving meanwhile join it.
                    let id = st.next_id;
                    st.next_id += 1;
                    let (launch, ready) = watch::channel(None);
                    // Counted after the evictions, which may have moved the clock.
                    let priority = if evicted.is_empty() {
                        priority
                    } else {
                        st.priority(key, &spec)
                    };
                    st.hot.push(HotInstance {
                        id,
                        spec: found.shared.unwrap_or_else(|| Arc::new(spec.clone())),
                        key,
                        slot: Slot::Starting {
                            ready,
                            launch: Some(launch),
                        },
                        calls: 1,
                        retired: false,
                        last_used: Instant::now(),
                        uses: 1,
                        priority,
                        shard: fn_lifecycle::shards::current(),
                    });
                    Ok((id, false))
                } else {
                    Err(Refusal::Busy {
                        needed_mb,
                        free_mb: self.total_mb.saturating_sub(used),
                        total_mb: self.total_mb,
                    })
                }
            }
        };
        // Kill outside the lock: killing sends signals and removes files.
        for old in evicted {
            tracing::debug!(app = %old.spec.app, function = %old.spec.function, "evicting idle instance for memory");
            self.bury_hot(&old);
        }
        let (id, reused) = result?;
        self.changed();
        Ok(Reservation {
            pool: Arc::clone(self),
            reused,
            spec,
            id,
            instance: None,
            handed_over: false,
            released: false,
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            calls_in_flight: st.calls_in_flight,
            total_mb: self.total_mb,
            committed_mb: st.committed_mb,
            idle_mb: st.idle_mb,
            hot_instances: st.hot.len() as u64,
            draining: self.draining.load(Ordering::Acquire),
            instances_started: st.instances_started,
        }
    }

    /// Stops admitting calls: every later [`Pool::admit`] is refused as draining.
    pub fn drain(&self) {
        // Under the lock, like the check in `admit`, so no admission straddles the switch.
        {
            let _st = self.lock();
            self.draining.store(true, Ordering::Release);
        }
        self.changed();
    }

    /// Completes when no call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let ended = self.call_ended.notified();
            tokio::pin!(ended);
            // Register before checking, so a call ending in between is not missed.
            ended.as_mut().enable();
            if self.lock().calls_in_flight == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Kills idle instances whose idle timeout has passed; returns how many.
    pub fn reap_expired(&self, now: Instant) -> usize {
        let expired = self.lock().take_idle_where(|h| {
            now.duration_since(h.last_used) >= h.spec.idle_timeout || !h.usable()
        });
        for old in &expired {
            tracing::debug!(app = %old.spec.app, function = %old.spec.function, "idle instance expired");
            self.bury_hot(old);
        }
        if !expired.is_empty() {
            self.changed();
        }
        expired.len()
    }

    /// Kills every idle instance without waiting for their clean-up.
    pub fn kill_idle(&self) {
        let killed = self.lock().take_idle_where(|_| true);
        for old in &killed {
            self.bury_hot(old);
        }
        if !killed.is_empty() {
            self.changed();
        }
    }

    /// Kills every idle instance and waits until each is gone and cleaned up (see
    /// [`Instance::wait_gone`]): what the reaper does as the drain begins. Calls in flight go
    /// on; [`Pool::shutdown`] takes what they leave.
    pub async fn stop_idle(&self) {
        let idle = self.lock().take_idle_where(|_| true);
        for old in &idle {
            self.bury_hot(old);
        }
        self.changed();
        futures::future::join_all(
            idle.iter()
                .filter_map(HotInstance::running)
                .map(|instance| instance.wait_gone()),
        )
        .await;
    }

    /// Kills every instance and waits until each is gone and cleaned up (see
    /// [`Instance::wait_gone`]), with those killed before and not gone yet, and until the
    /// driver has ended the starts under way and its own clean-up ([`Driver::shutdown`]: a
    /// start that had not ended left its container running): the last step of a shutdown,
    /// once the drain has ended (an instance still busy then had its calls cut off by the
    /// drain's bound). Bound it with a timeout.
    pub async fn shutdown(&self) {
        let idle = self.lock().take_idle_where(|_| true);
        for old in &idle {
            self.bury_hot(old);
        }
        let busy: Vec<Arc<dyn Instance>> = self
            .lock()
            .hot
            .iter()
            .filter_map(|h| h.running().cloned())
            .collect();
        for instance in &busy {
            self.bury(instance);
        }
        self.changed();
        let dying = std::mem::take(&mut *self.dying.lock().unwrap_or_else(PoisonError::into_inner));
        let gone = futures::future::join_all(dying.iter().map(|instance| instance.wait_gone()));
        futures::future::join(gone, self.driver.shutdown()).await;
    }

    /// Background task: expires idle instances until cancelled (the drain begins), then
    /// kills the idle ones and waits for their clean-up; busy ones finish their calls.
    ///
    /// # Errors
    /// Never; the signature fits the lifecycle's service runner.
    pub async fn run_reaper(
        self: Arc<Self>,
        tick: Duration,
        cancel: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = interval.tick() => { self.reap_expired(Instant::now()); }
            }
        }
        self.stop_idle().await;
        Ok(())
    }

    /// A call on `entry`'s instance ran past its deadline while the instance ran (before
    /// its reservation drops): the function may still be at the call, so the instance takes
    /// no new calls, whatever its concurrency (one that takes several is otherwise kept when
    /// a call is cut off), and is killed once its calls have ended. A call that timed out
    /// while its instance was still starting never reached the function: nothing changes.
    /// Returns whether the instance was still starting (its listener not open yet).
    pub fn retire(&self, entry: EntryId) -> bool {
        let mut st = self.lock();
        match st.hot.iter_mut().find(|h| h.id == entry.0) {
            Some(hot) if hot.running().is_some() => {
                hot.retired = true;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Ends one call's hold on the pool; see [`Reservation`].
    fn release(&self, reservation: &Reservation, clean: bool) {
        let memory_mb = reservation.spec.memory_mb;
        let mut doomed = None;
        {
            let mut st = self.lock();
            let st = &mut *st;
            st.calls_in_flight -= 1;
            if let Some(pos) = st.hot.iter().position(|h| h.id == reservation.id) {
                let hot = &mut st.hot[pos];
                hot.calls -= 1;
                match hot.running() {
                    // One call per instance, cut off in an unknown state: never reused. A
                    // call given up before it had its instance (the LB gave up its offer,
                    // its client left) sent nothing to it: the instance serves on.
                    Some(_)
                        if !clean
                            && reservation.handed_over
                            && reservation.spec.concurrency <= 1 =>
                    {
                        hot.retired = true;
                    }
                    Some(instance) if !instance.is_alive() => hot.retired = true,
                    _ => {}
                }
                if hot.calls == 0 {
                    let never_launched = matches!(
                        hot.slot,
                        Slot::Starting {
                            launch: Some(_),
                            ..
                        }
                    );
                    if never_launched
                        || hot.retired
                        || (hot.running().is_some() && reservation.spec.idle_timeout.is_zero())
                    {
                        st.committed_mb -= memory_mb;
                        doomed = Some(st.hot.swap_remove(pos));
                    } else if hot.running().is_some() {
                        hot.last_used = Instant::now();
                        st.committed_mb -= memory_mb;
                        st.idle_mb += memory_mb;
                    } else {
                        // Still starting: its memory stays committed (no eviction can take
                        // it back) until the start ends and it runs idle, or fails.
                        hot.last_used = Instant::now();
                    }
                }
            } else {
                // Never: an entry leaves the pool only with no call on it (evicted or
                // expired idle, a failed start with no call left, or here, at its last
                // call's release), and this call's is still counted in it. Its memory went
                // with the entry, so none is given back here: doing so would free it twice.
                debug_assert!(false, "a reservation outlived its pool entry");
                tracing::error!(
                    entry = reservation.id,
                    "a call ended on an instance no longer in the pool; its memory went with it"
                );
            }
        }
        if let Some(old) = doomed {
            self.bury_hot(&old);
        }
        self.changed();
        self.call_ended.notify_waiters();
    }

    /// The start of instance `id`, in a task of its own: no call's cancellation stops it.
    /// Publishes the outcome to the calls waiting for it.
    async fn start_instance(
        self: Arc<Self>,
        id: u64,
        spec: InstanceSpec,
        call_id: String,
        launch: watch::Sender<Started>,
    ) {
        // A driver that panics fails this start, not every later call of the function (which
        // would join an entry whose start never ends) nor the memory it holds.
        let started = AssertUnwindSafe(self.driver.start(&spec, &call_id, self.start_timeout))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(app = %spec.app, function = %spec.function, panic = %what, "the driver panicked while starting an instance");
                Err(DriverError::Start(format!("the driver panicked: {what}")))
            })
            .map(Arc::<dyn Instance>::from);
        let mut orphan = None;
        let mut unheard = false;
        {
            let mut st = self.lock();
            let st = &mut *st;
            match (st.hot.iter().position(|h| h.id == id), &started) {
                (Some(pos), Ok(instance)) => {
                    st.instances_started += 1;
                    let hot = &mut st.hot[pos];
                    hot.slot = Slot::Running(Arc::clone(instance));
                    if hot.idle() {
                        // Its calls left while it started: now it is idle memory.
                        hot.last_used = Instant::now();
                        let memory_mb = hot.spec.memory_mb;
                        st.committed_mb -= memory_mb;
                        st.idle_mb += memory_mb;
                    }
                }
                (Some(pos), Err(_)) => {
                    let hot = &mut st.hot[pos];
                    hot.retired = true;
                    if hot.idle() {
                        unheard = true;
                        st.committed_mb -= hot.spec.memory_mb;
                        st.hot.swap_remove(pos);
                    }
                }
                // Nobody wants it any more (its last call was cut off before it ran).
                (None, Ok(instance)) => orphan = Some(Arc::clone(instance)),
                (None, Err(_)) => unheard = true,
            }
        }
        // A call of the instance hears of a failed start (and the runner logs it with the
        // call); once its calls have gone (their timeout was shorter than the start's),
        // nobody would. Not a start the runner's own stop ended (it drains first).
        if let Err(e) = &started
            && unheard
            && !self.draining.load(Ordering::Acquire)
        {
            tracing::warn!(
                app = %spec.app,
                function = %spec.function,
                error = %e,
                "an instance failed to start after its calls had gone (their timeout was \
                 shorter than the start's): look at the function's output for why"
            );
        }
        if let Some(instance) = orphan {
            self.bury(&instance);
        }
        self.changed();
        launch.send_replace(Some(started));
    }
}

/// One call's hold on the pool: its slot on an instance (starting or running), and the
/// instance once it runs. See the module docs for the release rules.
pub struct Reservation {
    pool: Arc<Pool>,
    spec: InstanceSpec,
    /// The pool entry of the call's instance.
    id: u64,
    instance: Option<Arc<dyn Instance>>,
    reused: bool,
    /// The call was given its instance to send the call to (see [`Reservation::instance`]):
    /// from then on a call cut off leaves a one-call instance in a state nobody knows.
    handed_over: bool,
    released: bool,
}

/// Which pool entry a call holds a slot on; see [`Pool::retire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryId(u64);

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("spec", &self.spec)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Whether the call got an instance that was already running (a warm call).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The pool entry of the call's instance, for [`Pool::retire`].
    pub fn entry(&self) -> EntryId {
        EntryId(self.id)
    }

    /// The call's instance: at once when it runs, else once its start ends (the first
    /// call to ask launches the start).
    ///
    /// # Errors
    /// What the driver reported when the instance could not start.
    pub async fn instance(&mut self, call_id: &str) -> Result<&dyn Instance, DriverError> {
        if self.instance.is_none() {
            let (mut ready, launch) = {
                let mut st = self.pool.lock();
                let hot = st
                    .hot
                    .iter_mut()
                    .find(|h| h.id == self.id)
                    .ok_or_else(|| DriverError::Start("the instance is gone".into()))?;
                match &mut hot.slot {
                    Slot::Running(instance) => {
                        self.instance = Some(Arc::clone(instance));
                        (None, None)
                    }
                    Slot::Starting { ready, launch } => (Some(ready.clone()), launch.take()),
                }
            };
            if let Some(launch) = launch {
                tokio::spawn(Arc::clone(&self.pool).start_instance(
                    self.id,
                    self.spec.clone(),
                    call_id.to_owned(),
                    launch,
                ));
            }
            if let Some(ready) = ready.as_mut() {
                let started = ready
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| DriverError::Start("the instance's start was abandoned".into()))?
                    .clone();
                match started {
                    Some(Ok(instance)) => self.instance = Some(instance),
                    Some(Err(e)) => return Err(e),
                    None => return Err(DriverError::Start("no start outcome".into())),
                }
            }
        }
        match &self.instance {
            Some(instance) => {
                self.handed_over = true;
                Ok(instance.as_ref())
            }
            None => Err(DriverError::Start("instance vanished".into())),
        }
    }

    /// The call completed cleanly: the instance stays hot for its spec's idle timeout once
    /// its last call has ended.
    pub fn finish_ok(mut self) {
        self.released = true;
        let pool = Arc::clone(&self.pool);
        pool.release(&self, true);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            let pool = Arc::clone(&self.pool);
            pool.release(self, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeDriver;

    fn spec(function: &str, memory_mb: u64) -> InstanceSpec {
        InstanceSpec {
            app: "app".into(),
            function: function.into(),
            command: vec![function.into()],
            image: None,
            memory_mb,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: Default::default(),
        }
    }

    fn pool(total_mb: u64) -> (Arc<Pool>, Arc<FakeDriver>) {
        let driver = Arc::new(FakeDriver::default());
        (
            Pool::new(driver.clone(), total_mb, Duration::from_secs(1)),
            driver,
        )
    }

    /// Memory from the network (a call's) or from the configuration (the total) never
    /// overflows a sum: a pool given more than MAX_MEMORY_MB hands out that much, a call
    /// needing more is too large, and one that does not fit beside another is busy.
    #[tokio::test]
    async fn huge_memory_figures_are_refused_not_summed_past_u64() {
        let (pool, _) = pool(u64::MAX);
        assert_eq!(pool.stats().total_mb, MAX_MEMORY_MB);
        let refused = pool
            .admit(spec("f", 1 << 63))
            .expect_err("more than the total");
        assert!(matches!(refused, Refusal::TooLarge { .. }), "{refused}");
        let first = pool
            .admit(spec("f", MAX_MEMORY_MB))
            .expect("the whole total fits");
        let refused = pool
            .admit(spec("g", MAX_MEMORY_MB))
            .expect_err("no room beside it");
        assert!(
            matches!(refused, Refusal::Busy { free_mb: 0, .. }),
            "{refused}"
        );
        drop(first);
        assert_eq!(pool.stats().committed_mb, 0);
    }

    #[tokio::test]
    async fn admits_until_full_then_refuses_busy_and_releases_on_drop() {
        let (pool, _) = pool(256);
        let a = pool.admit(spec("f", 128)).expect("first fits");
        let b = pool.admit(spec("f", 128)).expect("second fits");
        let refused = pool.admit(spec("f", 128)).expect_err("third does not");
        assert!(
            matches!(refused, Refusal::Busy { free_mb: 0, .. }),
            "{refused}"
        );
        assert_eq!(pool.stats().committed_mb, 256);
        drop(a);
        drop(b);
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.calls_in_flight), (0, 0));
    }

    #[tokio::test]
    async fn clean_calls_keep_instances_hot_and_reuse_them() {
        let (pool, driver) = pool(256);
        let mut r = pool.admit(spec("f", 128)).expect("fits");
        let pid = r.instance("c1").await.expect("starts").pid();
        r.finish_ok();
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.hot_instances), (0, 128, 1));

        let mut r = pool.admit(spec("f", 128)).expect("fits");
        assert!(r.reused());
        assert_eq!(r.instance("c2").await.expect("hot").pid(), pid);
        r.finish_ok();
        assert_eq!(driver.started(), 1);
    }

    /// Shutdown waits for the clean-up of every instance killed and not gone yet: one whose
    /// call failed just before (a container's removal takes the engine a while) and one
    /// still busy when the drain's bound ran out. It waited for the idle ones only, and the
    /// runner exited with their containers running.
    #[tokio::test]
    async fn shutdown_waits_for_every_instance_being_removed() {
        let (pool, driver) = pool(512);
        driver.end_after_kill(Duration::from_millis(200));
        let mut failed = pool.admit(spec("f", 128)).expect("fits");
        failed.instance("c1").await.expect("starts");
        drop(failed); // cut off: its instance is killed, its removal under way
        let mut idle = pool.admit(spec("g", 128)).expect("fits");
        idle.instance("c2").await.expect("starts");
        idle.finish_ok();
        let mut busy = pool.admit(spec("h", 128)).expect("fits");
        busy.instance("c3").await.expect("starts");
        assert_eq!(driver.killed(), 1);
        pool.shutdown().await;
        assert_eq!(driver.killed(), 3, "the idle and the busy one killed too");
        assert_eq!(
            driver.gone(),
            3,
            "shutdown returned before every removal ended"
        );
        drop(busy);
    }

    /// The reaper stops as the drain begins: it kills idle instances, never one whose call
    /// is still running (the drain lets calls in flight finish).
    #[tokio::test]
    async fn the_reaper_stopping_for_the_drain_leaves_calls_in_flight_alone() {
        let (pool, driver) = pool(256);
        let mut idle = pool.admit(spec("f", 128)).expect("fits");
        idle.instance("c1").await.expect("starts");
        idle.finish_ok();
        let mut busy = pool.admit(spec("g", 128)).expect("fits");
        busy.instance("c2").await.expect("starts");
        let cancel = CancellationToken::new();
        cancel.cancel();
        Arc::clone(&pool)
            .run_reaper(Duration::from_secs(60), cancel)
            .await
            .expect("never fails");
        assert_eq!(driver.killed(), 1, "the idle one only");
        busy.finish_ok();
        assert_eq!(
            pool.stats().hot_instances,
            1,
            "the busy one finished its call"
        );
    }

    #[tokio::test]
    async fn a_dropped_reservation_kills_its_instance() {
        let (pool, driver) = pool(256);
        let mut r = pool.admit(spec("f", 128)).expect("fits");
        r.instance("c1").await.expect("starts");
        drop(r); // a timeout, a cancellation or a panic
        assert_eq!(driver.killed(), 1);
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.hot_instances), (0, 0, 0));
    }

    /// A call given up after it was admitted on a warm instance but before it had the
    /// instance (an LB that gave up its offer, a client gone while the acknowledgement was on
    /// its way) sent the function nothing: the instance stays warm for the next call.
    #[tokio::test]
    async fn a_call_given_up_before_it_had_its_instance_leaves_it_warm() {
        let (pool, driver) = pool(256);
        run_once(&pool, "f").await;
        let r = pool.admit(spec("f", 128)).expect("fits");
        assert!(r.reused());
        drop(r); // the LB went away before the call reached the instance
        assert_eq!(driver.killed(), 0, "the warm instance was killed");
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.hot_instances), (0, 128, 1));
        let again = pool.admit(spec("f", 128)).expect("fits");
        assert!(again.reused(), "the next call found no warm instance");
    }

    #[tokio::test]
    async fn idle_instances_are_evicted_lru_first_for_memory() {
        let (pool, driver) = pool(256);
        for f in ["old", "new"] {
            let mut r = pool.admit(spec(f, 128)).expect("fits");
            r.instance(f).await.expect("starts");
            r.finish_ok();
        }
        // A third function needs 128 MB: "old" goes, "new" stays hot.
        let _r = pool.admit(spec("third", 128)).expect("evicts to fit");
        assert_eq!(driver.killed(), 1);
        let again = pool.admit(spec("new", 128)).expect("new still hot");
        assert!(again.reused());
    }

    /// One 128 MB call of `function`, from admission to a clean finish.
    async fn run_once(pool: &Arc<Pool>, function: &str) {
        let mut r = pool.admit(spec(function, 128)).expect("fits");
        r.instance(function).await.expect("starts");
        r.finish_ok();
    }

    #[tokio::test]
    async fn a_frequently_called_function_keeps_its_instance_over_a_more_recent_rare_one() {
        let (pool, driver) = pool(256);
        for _ in 0..5 {
            run_once(&pool, "popular").await;
        }
        run_once(&pool, "rare").await; // used last
        // A third function needs 128 MB: least-recently-used would take "popular".
        run_once(&pool, "third").await;
        assert_eq!(driver.killed(), 1);
        assert!(pool.admit(spec("popular", 128)).expect("hot").reused());
    }

    /// `function` at 128 MB with one configuration entry: versions of one function that
    /// the pool's hash of a spec does not tell apart.
    fn version(function: &str, greeting: &str) -> InstanceSpec {
        InstanceSpec {
            config: [("GREETING".to_owned(), greeting.to_owned())].into(),
            ..spec(function, 128)
        }
    }

    #[tokio::test]
    async fn versions_of_a_function_that_differ_only_in_configuration_get_their_own_instances() {
        let (pool, driver) = pool(512);
        let mut r = pool.admit(version("f", "hello")).expect("fits");
        let hello = r.instance("c1").await.expect("starts").pid();
        r.finish_ok();
        let mut r = pool.admit(version("f", "bonjour")).expect("fits");
        assert!(
            !r.reused(),
            "an instance of another configuration is not shared"
        );
        let bonjour = r.instance("c2").await.expect("starts").pid();
        r.finish_ok();
        assert_ne!(hello, bonjour);
        for (greeting, pid) in [("hello", hello), ("bonjour", bonjour), ("hello", hello)] {
            let mut r = pool.admit(version("f", greeting)).expect("fits");
            assert!(r.reused(), "{greeting}");
            assert_eq!(
                r.instance("c3").await.expect("hot").pid(),
                pid,
                "{greeting}"
            );
            r.finish_ok();
        }
        assert_eq!(driver.started(), 2);
    }

    #[tokio::test]
    async fn a_function_s_priority_counts_the_calls_of_all_its_versions() {
        let (pool, driver) = pool(384);
        for _ in 0..3 {
            let mut r = pool.admit(version("popular", "v1")).expect("fits");
            r.instance("c").await.expect("starts");
            r.finish_ok();
        }
        let mut r = pool.admit(version("popular", "v2")).expect("fits");
        r.instance("c").await.expect("starts");
        r.finish_ok();
        run_once(&pool, "rare").await; // used last, as few calls as v2 on its own
        // The pool is full; a third function evicts the lowest priority: "rare", since v2's
        // instance counts v1's three calls too.
        run_once(&pool, "third").await;
        assert_eq!(driver.killed(), 1);
        assert!(pool.admit(version("popular", "v2")).expect("hot").reused());
    }

    #[tokio::test]
    async fn an_instance_no_call_uses_ages_out_of_its_priority() {
        let (pool, driver) = pool(256);
        for _ in 0..3 {
            run_once(&pool, "once-popular").await;
        }
        // One-off functions, one after another, each evicting the other's instance: every
        // eviction moves the clock up, until the old favourite is the lowest.
        for f in ["a", "b", "c", "d", "e"] {
            run_once(&pool, f).await;
        }
        assert!(driver.killed() >= 4);
        let again = pool.admit(spec("once-popular", 128)).expect("fits");
        assert!(!again.reused(), "it aged out");
    }

    #[tokio::test]
    async fn a_call_that_cannot_fit_even_after_eviction_evicts_nothing() {
        let (pool, driver) = pool(384);
        let mut idle = pool.admit(spec("idle", 128)).expect("fits");
        idle.instance("c").await.expect("starts");
        idle.finish_ok();
        let _busy = pool.admit(spec("busy", 128)).expect("fits");
        // 128 committed + 128 idle of 384: a 384 MB call cannot fit even with the idle
        // instance gone, so the hot instance must survive the refusal.
        let refused = pool.admit(spec("big", 384)).expect_err("does not fit");
        assert!(matches!(refused, Refusal::Busy { .. }), "{refused}");
        assert_eq!(driver.killed(), 0, "no instance killed for a refused call");
        assert_eq!(pool.stats().idle_mb, 128);
        assert!(pool.admit(spec("idle", 128)).expect("hot").reused());
    }

    #[tokio::test]
    async fn draining_refuses_and_wait_idle_waits_for_calls() {
        let (pool, _) = pool(256);
        let r = pool.admit(spec("f", 128)).expect("fits");
        pool.drain();
        assert_eq!(
            pool.admit(spec("f", 1)).expect_err("draining"),
            Refusal::Draining
        );
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(r);
        waiter.await.expect("wait_idle returns once the call ended");
    }

    #[tokio::test]
    async fn too_large_is_refused_up_front() {
        let (pool, _) = pool(256);
        assert!(matches!(
            pool.admit(spec("f", 512)),
            Err(Refusal::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn idle_timeout_expires_instances() {
        let (pool, driver) = pool(256);
        let short = InstanceSpec {
            idle_timeout: Duration::from_secs(5),
            ..spec("f", 128)
        };
        let mut r = pool.admit(short).expect("fits");
        r.instance("c").await.expect("starts");
        r.finish_ok();
        assert_eq!(pool.reap_expired(Instant::now()), 0);
        assert_eq!(
            pool.reap_expired(Instant::now() + Duration::from_secs(6)),
            1
        );
        assert_eq!(driver.killed(), 1);
        assert_eq!(pool.stats().idle_mb, 0);
    }

    fn concurrent(function: &str, memory_mb: u64, concurrency: u32) -> InstanceSpec {
        InstanceSpec {
            concurrency,
            ..spec(function, memory_mb)
        }
    }

    #[tokio::test]
    async fn an_instance_takes_up_to_its_concurrency_and_memory_counts_once() {
        let (pool, driver) = pool(256);
        let mut first = pool.admit(concurrent("f", 128, 3)).expect("fits");
        let pid = first.instance("c1").await.expect("starts").pid();
        let mut shared = Vec::new();
        for call in ["c2", "c3"] {
            let mut r = pool.admit(concurrent("f", 128, 3)).expect("a free slot");
            assert!(r.reused());
            assert_eq!(r.instance(call).await.expect("running").pid(), pid);
            shared.push(r);
        }
        let s = pool.stats();
        assert_eq!(
            (s.calls_in_flight, s.committed_mb, s.hot_instances),
            (3, 128, 1),
            "three calls, one instance's memory"
        );
        // The fourth call needs a second instance, and its memory.
        let mut fourth = pool
            .admit(concurrent("f", 128, 3))
            .expect("room for one more");
        assert!(!fourth.reused());
        assert_ne!(fourth.instance("c4").await.expect("starts").pid(), pid);
        assert_eq!(pool.stats().committed_mb, 256);
        assert!(
            matches!(
                pool.admit(concurrent("f", 128, 3)),
                Ok(r) if r.reused()
            ),
            "the second instance has free slots"
        );
        assert_eq!(driver.started(), 2);
    }

    #[tokio::test]
    async fn a_shared_instance_becomes_idle_when_its_last_call_ends() {
        let (pool, driver) = pool(256);
        let mut a = pool.admit(concurrent("f", 128, 2)).expect("fits");
        a.instance("a").await.expect("starts");
        let mut b = pool.admit(concurrent("f", 128, 2)).expect("shares");
        b.instance("b").await.expect("running");
        a.finish_ok();
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb), (128, 0), "still busy with b");
        b.finish_ok();
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.calls_in_flight), (0, 128, 0));
        assert!(pool.admit(concurrent("f", 128, 2)).expect("hot").reused());
        assert_eq!(driver.killed(), 0);
    }

    #[tokio::test]
    async fn a_failed_call_does_not_kill_a_shared_instance_but_does_kill_a_one_call_instance() {
        let (pool, driver) = pool(512);
        let mut a = pool.admit(concurrent("shared", 128, 2)).expect("fits");
        a.instance("a").await.expect("starts");
        let mut b = pool.admit(concurrent("shared", 128, 2)).expect("shares");
        b.instance("b").await.expect("running");
        drop(a); // cut off: a timeout, a cancellation
        assert_eq!(driver.killed(), 0, "b is still running on it");
        b.finish_ok();
        assert!(
            pool.admit(concurrent("shared", 128, 2))
                .expect("kept")
                .reused()
        );

        let mut one = pool.admit(spec("single", 128)).expect("fits");
        one.instance("x").await.expect("starts");
        drop(one);
        assert_eq!(driver.killed(), 1, "a one-call instance cut off is killed");
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_retires_a_shared_instance_once_its_other_calls_end() {
        let (pool, driver) = pool(512);
        let mut a = pool.admit(concurrent("shared", 128, 3)).expect("fits");
        a.instance("a").await.expect("starts");
        let mut b = pool.admit(concurrent("shared", 128, 3)).expect("shares");
        b.instance("b").await.expect("running");
        pool.retire(a.entry());
        drop(a);
        assert_eq!(driver.killed(), 0, "b is still running on it");
        let fresh = pool.admit(concurrent("shared", 128, 3)).expect("fits");
        assert!(!fresh.reused(), "a new call joined the retired instance");
        b.finish_ok();
        assert_eq!(driver.killed(), 1, "killed once its last call ended");
    }

    #[tokio::test]
    async fn a_busy_shared_instance_is_never_evicted() {
        let (pool, driver) = pool(256);
        let mut busy = pool.admit(concurrent("busy", 128, 4)).expect("fits");
        busy.instance("b").await.expect("starts");
        let mut idle = pool.admit(spec("idle", 128)).expect("fits");
        idle.instance("i").await.expect("starts");
        idle.finish_ok();
        // Another function needs 128 MB: only the idle instance may go.
        let _other = pool.admit(spec("other", 128)).expect("evicts the idle one");
        assert_eq!(driver.killed(), 1);
        assert!(
            pool.admit(concurrent("busy", 128, 4))
                .expect("slot")
                .reused()
        );
        assert!(matches!(
            pool.admit(spec("third", 128)),
            Err(Refusal::Busy { .. })
        ));
    }

    #[tokio::test]
    async fn calls_arriving_while_an_instance_starts_join_it_up_to_its_concurrency() {
        let (pool, driver) = pool(256);
        // A burst: five calls admitted before any instance runs.
        let mut burst: Vec<_> = (0..5)
            .map(|_| pool.admit(concurrent("f", 128, 4)).expect("room"))
            .collect();
        assert!(
            burst.iter().all(|r| !r.reused()),
            "all cold: nothing ran yet"
        );
        assert_eq!(
            pool.stats().committed_mb,
            256,
            "two instances' memory: four calls share the first, the fifth needs another"
        );
        let mut pids = Vec::new();
        for (i, r) in burst.iter_mut().enumerate() {
            pids.push(r.instance(&format!("c{i}")).await.expect("starts").pid());
        }
        assert_eq!(driver.started(), 2, "one start per four calls");
        assert!(pids[..4].iter().all(|p| *p == pids[0]));
        assert_ne!(pids[4], pids[0]);
        for r in burst {
            r.finish_ok();
        }
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.hot_instances), (0, 256, 2));
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_before_the_start_does_not_strand_the_others() {
        let (pool, driver) = pool(256);
        let first = pool.admit(concurrent("f", 128, 2)).expect("room");
        let mut second = pool.admit(concurrent("f", 128, 2)).expect("joins");
        drop(first); // gone before anyone launched the start
        second
            .instance("second")
            .await
            .expect("the start still happens");
        assert_eq!(driver.started(), 1);
        second.finish_ok();
        assert_eq!(pool.stats().idle_mb, 128);

        // A one-call instance whose call is cut off after it ran is killed, as before.
        let mut cut = pool.admit(spec("g", 128)).expect("room");
        cut.instance("cut").await.expect("starts");
        drop(cut);
        assert_eq!(driver.killed(), 1);
    }

    #[tokio::test]
    async fn a_start_its_calls_left_holds_its_memory_and_evicts_nothing_in_vain() {
        let (pool, driver) = pool(256);
        run_once(&pool, "b").await; // idle, running: 128 MB eviction can take
        let mut a = pool.admit(spec("a", 128)).expect("room");
        // Its start is launched (a task of its own, not yet run), then its caller leaves.
        assert!(a.instance("a").now_or_never().is_none());
        drop(a);
        let s = pool.stats();
        assert_eq!(
            (s.committed_mb, s.idle_mb),
            (128, 128),
            "the start is committed"
        );
        assert_eq!(pool.state().free_mb, 128, "the start's memory is not free");
        // Before: counted as idle, so this call evicted b, found no room, and was refused.
        let refused = pool
            .admit(spec("c", 256))
            .expect_err("no room while a starts");
        assert!(matches!(refused, Refusal::Busy { .. }), "{refused}");
        assert_eq!(
            driver.killed(),
            0,
            "nothing evicted for a call that was refused"
        );
        // Once it runs, it is idle memory like any other, and eviction can take both.
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.stats().committed_mb != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the start ends");
        assert_eq!(pool.stats().idle_mb, 256);
        let _c = pool.admit(spec("c", 256)).expect("room once both are idle");
        assert_eq!(driver.killed(), 2);
    }

    /// Asserts that `pool` holds no memory, instance or call.
    fn assert_holds_nothing(pool: &Pool) {
        let s = pool.stats();
        assert_eq!(
            (
                s.committed_mb,
                s.idle_mb,
                s.hot_instances,
                s.calls_in_flight
            ),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }

    /// Starts that panic.
    #[derive(Debug)]
    struct PanickingDriver;

    impl Driver for PanickingDriver {
        fn start(
            &self,
            _spec: &InstanceSpec,
            _call_id: &str,
            _start_timeout: Duration,
        ) -> futures::future::BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
            Box::pin(async { panic!("a driver bug") })
        }
    }

    #[tokio::test]
    async fn a_driver_that_panics_fails_that_start_only() {
        let pool = Pool::new(Arc::new(PanickingDriver), 256, Duration::from_secs(1));
        for call in ["first", "second"] {
            let mut r = pool.admit(spec("f", 128)).expect("room");
            // Before: the second call joined the first's entry, whose start never ended.
            assert!(!r.reused(), "{call}: a new start, not the panicked one");
            let error = r.instance(call).await.expect_err("the start panics");
            assert!(
                error
                    .to_string()
                    .contains("the driver panicked: a driver bug"),
                "{call}: {error}"
            );
        }
        assert_holds_nothing(&pool);
        pool.admit(spec("g", 256))
            .expect("all the memory is free again");
    }

    #[tokio::test]
    async fn a_failed_start_reaches_every_waiting_call_and_frees_the_memory() {
        let (pool, driver) = pool(256);
        driver.fail_starts(true);
        let mut a = pool.admit(concurrent("f", 128, 3)).expect("room");
        let mut b = pool.admit(concurrent("f", 128, 3)).expect("joins");
        let err_a = a.instance("a").await.expect_err("start fails");
        let err_b = b.instance("b").await.expect_err("the same failure");
        assert_eq!(err_a.to_string(), err_b.to_string());
        drop(a);
        drop(b);
        assert_holds_nothing(&pool);
        driver.fail_starts(false);
        let mut c = pool.admit(concurrent("f", 128, 3)).expect("room again");
        assert!(!c.reused(), "the failed instance is not joined");
        c.instance("c").await.expect("starts now");
    }
}
