//! The control loop: keeps each LB group's runner set sized to its demand.
//!
//! One task owns the runner set ([`ControlLoop`]); the gRPC services share only the demand
//! book (written by adverts) and the published membership (read by `GetLBGroup`), both in
//! [`Shared`]. Every tick:
//!
//! 1. list the control plane's runners: the first successful list loads the runner set
//!    (nothing is scaled before it, so a restarted npm never provisions twice); later lists
//!    drop runners the control plane no longer reports; an active runner that says it
//!    drains on its own (stopped by someone else: an operator's SIGTERM, `docker stop`, a
//!    service removed) leaves its group's runners and the LBs' lists at once (see
//!    [`RunnerState::Stopping`]), and comes back if it answers SERVING again;
//! 2. purge LBs that went silent — unless the loop itself stalled (the npm was stopped or
//!    starved for longer than the purge interval): then the LBs' silence was the npm's, so
//!    they get a fresh purge interval instead of having their demand dropped, and each group
//!    holds its runners for a scale-down window (the demand of the stalled time was never
//!    seen), which would otherwise drain runners under load;
//! 3. per group, ask the predictor for the desired runner count (bounded by min/max):
//!    scale up by re-activating draining runners (newest first), then provisioning a
//!    bounded batch (runners being provisioned count as coming); scale down by moving the
//!    active runners at the end of the group's published list (the newest, unless a leave
//!    moved one there) to draining. Provisioning runs beside the loop: a tick waits for
//!    it at most one tick interval, and each runner that is ready later joins at a later
//!    tick, when the control plane lists it (none lists a runner before it answers), not
//!    with the slowest of its batch; so a slow control plane (a swarm service takes seconds
//!    to start) stalls neither the other groups nor the drains. A group's
//!    predictor starts out holding the runners the group already has, so the runners a
//!    restarted npm adopts stay until demand has been low for a whole window (the first
//!    tick comes before the LBs have advertised to the new process);
//! 4. remove draining runners that have no calls in flight, or that overran the maximum
//!    drain time;
//! 5. publish each group's active runners in the group's own order ([`PublishedOrder`]: a
//!    runner that joins is appended, one that leaves gets the last in its place), shared by
//!    all LBs. Until the first publication the services answer `GetLBGroup` with
//!    `UNAVAILABLE`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fn_lifecycle::logging::Throttle;
use fn_protocol::poolmanager::MAX_GROUPS_NAMED;

use crate::control_plane::{ControlPlane, ControlPlaneError, RunnerInfo};
use crate::demand::DemandBook;
use crate::metrics::{GroupFigures, NpmMetrics};
use crate::order::PublishedOrder;
use crate::predictor::{Predictor, WindowPredictor};

/// The group of functions that name none; it keeps `min_runners` whatever LBs advertise.
const DEFAULT_GROUP: &str = "default";

/// Least time between the starts of two ticks, whatever wakes the loop (at most the tick
/// interval): an LB whose adverts keep raising its demand (alternating 0 and 1) would
/// otherwise run a tick, and a control-plane list, per advert.
const MIN_TICK_GAP: Duration = Duration::from_millis(200);

/// How often the loop's [`Pulse`] beats while it runs.
const PULSE: Duration = Duration::from_millis(250);

/// Longest wait for the control plane's list in one tick: an engine that hangs on it (a
/// `docker ps` that never answers) must not hold every tick for its own timeout, with
/// new runners unpublished and drained ones not removed meanwhile.
pub const LIST_BOUND: Duration = Duration::from_secs(10);

/// Longest wait for a draining runner's status in one tick.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Scaling knobs (`FN_MIN_RUNNERS`, `FN_MAX_RUNNERS`, ...).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Runners `default` and every retained group keep even with no demand.
    pub min_runners: usize,
    /// A group no LB has advertised for this long is no longer retained: it keeps no
    /// `min_runners`, and once its runners are gone it is forgotten.
    pub group_retention: Duration,
    /// Most runners per group.
    pub max_runners: usize,
    /// Most runners in all groups together, draining ones, those being provisioned, those
    /// the control plane holds from the LBs ([`ControlPlane::held_out`]) and those it has
    /// removed that still run ([`ControlPlane::leaving`]) included.
    pub max_total_runners: usize,
    /// How long demand must stay low before runners drain.
    pub scale_down_delay: Duration,
    /// A draining runner is removed after this even with calls in flight.
    pub max_drain_time: Duration,
    /// An LB silent for this long is forgotten with its demand.
    pub lb_purge_after: Duration,
    /// Most runners provisioned per group per tick.
    pub provision_batch: usize,
    /// Time between ticks.
    pub tick: Duration,
    /// Minimum time a runner stays draining before removal, so that LBs polling the
    /// membership have dropped it (they poll every 500 ms).
    pub drain_settle: Duration,
    /// Longest wait, at the npm's shutdown, for the provisionings under way to stop before
    /// the control plane removes the runners: see [`provisioning_stop_bound`].
    pub provisioning_stop_bound: Duration,
}

/// The longest an npm waits at its shutdown for a provisioning to stop: it stops at once
/// unless it is inside a request to the engine (a container or a service being created),
/// which takes a second or less.
pub const PROVISIONING_STOP_BOUND: Duration = Duration::from_millis(2500);

/// The wait for provisionings to stop at the shutdown of an npm whose own bound is
/// `npm_bound` (`FN_SHUTDOWN_TIMEOUT`): [`PROVISIONING_STOP_BOUND`], but at most half of what
/// the bound leaves beyond the runners' stop grace (at least 5 s for a bound of 6 s or
/// more: see [`crate::control_plane::shutdown_stop_grace`]), so that the control plane's
/// shutdown that follows keeps the other half.
pub fn provisioning_stop_bound(npm_bound: Duration) -> Duration {
    let beyond_grace =
        npm_bound.saturating_sub(crate::control_plane::shutdown_stop_grace(npm_bound));
    PROVISIONING_STOP_BOUND.min(beyond_grace / 2)
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            min_runners: 0,
            group_retention: Duration::from_secs(24 * 60 * 60),
            max_runners: 10,
            max_total_runners: 100,
            scale_down_delay: Duration::from_secs(30),
            max_drain_time: Duration::from_secs(300),
            lb_purge_after: Duration::from_secs(5),
            provision_batch: 4,
            tick: Duration::from_secs(1),
            drain_settle: Duration::from_secs(2),
            provisioning_stop_bound: PROVISIONING_STOP_BOUND,
        }
    }
}

/// How the control loop learns whether a draining runner still has calls.
pub trait RunnerProbe: Send + Sync + std::fmt::Debug {
    /// Calls in flight on `runner`.
    fn calls_in_flight<'a>(&'a self, runner: &'a RunnerInfo) -> BoxFuture<'a, Result<u64, String>>;

    /// Follows `runner`'s own health from now on, reporting each change of whether it
    /// drains into `reports` until the runner is forgotten; a runner already followed is
    /// left as it is (the control loop calls this for every runner at every tick). The
    /// default follows nothing: its runners are never taken for draining on their own.
    fn watch(&self, _runner: &RunnerInfo, _reports: &Arc<HealthReports>) {}

    /// `runner` is gone (removed, or no longer reported): release what was kept for it.
    fn forget(&self, _runner: &RunnerInfo) {}
}

/// What the runners' health watches ([`RunnerProbe::watch`]) last said of each runner: that
/// it drains on its own (NOT_SERVING after SERVING: a runner says so from its SIGTERM on, and
/// also while it starts, which does not count), or that it serves. Written by the watches,
/// read by the control loop at each tick.
#[derive(Debug, Default)]
pub struct HealthReports {
    /// Runner id → whether it said it drains.
    draining: Mutex<HashMap<String, bool>>,
    /// Woken when a runner's report changes: the control loop acts at once (a runner that
    /// began draining is replaced without waiting for the tick).
    changed: tokio::sync::Notify,
}

impl HealthReports {
    /// Records what runner `id` said: that it drains (`true`) or that it serves.
    pub fn report(&self, id: &str, draining: bool) {
        let before = self.lock().insert(id.to_owned(), draining);
        if before != Some(draining) {
            self.changed.notify_one();
        }
    }

    /// Whether runner `id` last said it drains; `None` before its first report.
    pub fn draining(&self, id: &str) -> Option<bool> {
        self.lock().get(id).copied()
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.draining
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Each group's active runners, in LB order.
pub type Membership = BTreeMap<String, Arc<Vec<RunnerInfo>>>;

/// State shared with the gRPC services.
#[derive(Debug, Default)]
pub struct Shared {
    demand: Mutex<DemandBook>,
    /// Woken when an advert raises a group's demand: the control loop acts at once instead
    /// of at its next tick (scale from zero without waiting).
    demand_rose: tokio::sync::Notify,
    /// `None` until the control loop has loaded the runner set and published it once: until
    /// then the npm does not know the lists, and an empty answer would make the LBs drop
    /// every runner they use (the Fn 2018 bug class "an npm error emptied the LB's lists").
    membership: RwLock<Option<Arc<Membership>>>,
    /// The version of the published membership, bumped when it changes; `WatchMembership`
    /// streams follow it.
    changes: tokio::sync::watch::Sender<u64>,
    /// The groups each of the last [`CHANGES_REMEMBERED`] versions changed (`None`: too
    /// many to name, or the first publication), oldest first: a watch names the groups
    /// changed since its previous message, and the LBs fetch only those.
    changed_groups: Mutex<std::collections::VecDeque<(u64, Option<BTreeSet<String>>)>>,
    /// Cancelled when the npm stops: membership watches end, so the graceful shutdown does
    /// not wait for streams that would never end.
    watches_closed: tokio_util::sync::CancellationToken,
    /// Until when, after the runner set was loaded, a group absent from the membership is
    /// answered as not known yet rather than as empty: a restarted npm whose control plane
    /// keeps no record of its groups (`static`) learns them again from the LBs' adverts,
    /// and until every LB has advertised and a tick has assigned runners for it, an empty
    /// answer would make each LB drop every runner it uses.
    relearning_until: std::sync::OnceLock<Instant>,
}

impl Shared {
    /// Records an LB's advert.
    ///
    /// # Errors
    /// When the advert is refused (see [`crate::demand::AdvertRefused`]).
    pub fn record_advert(
        &self,
        lb_id: &str,
        groups: Vec<(String, u64)>,
        now: Instant,
    ) -> Result<(), crate::demand::AdvertRefused> {
        let names: Vec<String> = groups.iter().map(|(g, _)| g.clone()).collect();
        let rose = {
            let mut book = self
                .demand
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before: Vec<u64> = names.iter().map(|g| book.wanted_mb(g)).collect();
            book.record(lb_id, groups, now)?;
            names
                .iter()
                .zip(before)
                .any(|(g, before)| book.wanted_mb(g) > before)
        };
        if rose {
            self.demand_rose.notify_one();
        }
        Ok(())
    }

    /// The LB `lb_id` sent its last advert: it is forgotten now, with its demand.
    pub fn lb_left(&self, lb_id: &str) {
        self.with_demand(|d| {
            d.leave(lb_id);
        });
    }

    /// The active runners of `group` in LB order (empty when unknown or not yet loaded).
    pub fn group(&self, group: &str) -> Arc<Vec<RunnerInfo>> {
        self.membership().get(group).cloned().unwrap_or_default()
    }

    /// The active runners of `group` in LB order, or `None` while the runner set has not
    /// been loaded from the control plane yet.
    ///
    /// `None` also for a group absent from the membership while the npm relearns its
    /// groups after the runner set was loaded (see `relearning_until`).
    pub fn published_group(&self, group: &str) -> Option<Arc<Vec<RunnerInfo>>> {
        let membership = self.published()?;
        if let Some(list) = membership.get(group) {
            return Some(Arc::clone(list));
        }
        let relearning = self
            .relearning_until
            .get()
            .is_some_and(|until| Instant::now() < *until);
        (!relearning).then(Arc::default)
    }

    /// Whether the runner set has been loaded and published.
    pub fn is_loaded(&self) -> bool {
        self.published().is_some()
    }

    /// The whole published membership (empty until loaded).
    pub fn membership(&self) -> Arc<Membership> {
        self.published().unwrap_or_default()
    }

    fn published(&self) -> Option<Arc<Membership>> {
        self.membership
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, membership: Membership) {
        let changed = {
            let mut published = self
                .membership
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let changed = match published.as_deref() {
                None => Some(None),
                Some(before) if *before == membership => None,
                Some(before) => Some(groups_changed(before, &membership)),
            };
            *published = Some(Arc::new(membership));
            changed
        };
        if let Some(groups) = changed {
            // Noted before the version is bumped: a watch that reads the new version finds
            // its groups.
            let version = *self.changes.borrow() + 1;
            {
                let mut noted = self
                    .changed_groups
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                noted.push_back((version, groups));
                while noted.len() > CHANGES_REMEMBERED {
                    noted.pop_front();
                }
            }
            self.changes.send_modify(|v| *v = version);
        }
    }

    /// The groups changed by the versions after `after` up to `upto`, in name order; empty
    /// when the LB should fetch every group (a version no longer remembered, or one that
    /// changed too many to name, or more than [`MAX_GROUPS_NAMED`] together).
    pub fn changed_groups(&self, after: u64, upto: u64) -> Vec<String> {
        let noted = self
            .changed_groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let remembered = noted
            .front()
            .is_some_and(|(oldest, _)| *oldest <= after.saturating_add(1));
        if !remembered {
            return Vec::new();
        }
        let mut groups = BTreeSet::new();
        for (_, changed) in noted.iter().filter(|(v, _)| *v > after && *v <= upto) {
            let Some(changed) = changed else {
                return Vec::new();
            };
            groups.extend(changed.iter().cloned());
            if groups.len() > MAX_GROUPS_NAMED {
                return Vec::new();
            }
        }
        groups.into_iter().collect()
    }

    /// Follows the version of the published membership (see `WatchMembership`), and the
    /// token that ends the watches.
    pub fn watch_membership(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio_util::sync::CancellationToken,
    ) {
        (self.changes.subscribe(), self.watches_closed.clone())
    }

    /// Ends every membership watch (the npm is stopping).
    pub fn close_watches(&self) {
        self.watches_closed.cancel();
    }

    fn with_demand<T>(&self, f: impl FnOnce(&mut DemandBook) -> T) -> T {
        f(&mut self
            .demand
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Publications whose changed groups the npm remembers for the membership watches (a watch
/// that fell further behind has its LB fetch every group).
const CHANGES_REMEMBERED: usize = 64;

/// The groups whose lists differ between two publications (`None` past
/// [`MAX_GROUPS_NAMED`]).
fn groups_changed(before: &Membership, after: &Membership) -> Option<BTreeSet<String>> {
    let mut changed = BTreeSet::new();
    for group in before.keys().chain(after.keys()) {
        if before.get(group) != after.get(group) && !changed.contains(group) {
            if changed.len() == MAX_GROUPS_NAMED {
                return None;
            }
            changed.insert(group.clone());
        }
    }
    Some(changed)
}

/// A runner's place in the life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    Active,
    /// The npm drains it (scale-down): out of the LBs' lists, removed once idle.
    Draining {
        since: Instant,
    },
    /// It said it drains on its own (NOT_SERVING), stopped by someone else than the npm:
    /// out of its group's runners (a replacement is provisioned when the group needs one)
    /// and of the LBs' lists, still counted against `max_total_runners` until the control
    /// plane no longer lists it (it exits by itself, and is not removed unless it stays so
    /// past `max_drain_time`). Active again if it answers SERVING again.
    Stopping {
        since: Instant,
    },
}

/// A group's runners at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct GroupCount {
    active: usize,
    /// Draining or stopping.
    other: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    info: RunnerInfo,
    state: RunnerState,
}

/// What a provisioning task brings back.
#[derive(Debug)]
struct Provisioned {
    group: String,
    batch: usize,
    result: Result<Vec<RunnerInfo>, ControlPlaneError>,
}

/// Provisioning under way, beside the loop.
#[derive(Debug, Default)]
struct InFlight {
    tasks: tokio::task::JoinSet<Provisioned>,
    /// Runners asked for and not yet back, per group.
    runners: HashMap<String, usize>,
    /// What each task was asked for, so that a task that panics takes back only its own.
    asked: HashMap<tokio::task::Id, (String, usize)>,
    /// Runners that joined from the list before their provisioning came back, with their
    /// group: they count as active, and no longer as coming.
    joined_early: HashMap<String, String>,
    /// Groups whose last provisioning failed whole: how many times in a row, and not before
    /// when to ask again (a runner that cannot start is not asked for every tick).
    failing: HashMap<String, (u32, Instant)>,
}

/// The first pause after a failed provisioning; it doubles with each failure in a row.
const PROVISION_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between provisionings of a group that keep failing.
const PROVISION_RETRY_MAX: Duration = Duration::from_secs(60);

/// The pause after `failures` failed provisionings in a row.
fn provision_pause(failures: u32) -> Duration {
    PROVISION_RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(PROVISION_RETRY_MAX)
}

impl InFlight {
    /// Takes back what a batch of `batch` runners for `group` counted.
    fn settle(&mut self, group: &str, batch: usize) {
        if let Some(coming) = self.runners.get_mut(group) {
            *coming = coming.saturating_sub(batch);
            if *coming == 0 {
                self.runners.remove(group);
                // None of the group's is coming: any still noted joined with a batch that
                // did not say so (it panicked).
                self.joined_early.retain(|_, g| g != group);
            }
        }
    }

    /// A listed runner of `group` joined: one of the group's coming runners, if any are, no
    /// longer counts as coming (it counted twice until its batch came back, and the group
    /// was asked for that many fewer).
    fn joined(&mut self, group: &str, id: &str) {
        if let Some(coming) = self.runners.get_mut(group)
            && *coming > 0
        {
            *coming -= 1;
            if *coming == 0 {
                self.runners.remove(group);
            }
            // Kept until its batch comes back, which then takes off only the others.
            self.joined_early.insert(id.to_owned(), group.to_owned());
        }
    }
}

/// The control loop's own state. Owned by one task.
#[derive(Debug)]
pub struct ControlLoop {
    shared: Arc<Shared>,
    control_plane: Arc<dyn ControlPlane>,
    probe: Arc<dyn RunnerProbe>,
    /// What the runners' health watches say (see [`RunnerProbe::watch`]).
    health: Arc<HealthReports>,
    config: ManagerConfig,
    /// Ordered by (created, id): oldest first.
    runners: Vec<Entry>,
    /// Each group's list as the LBs get it: not `runners`' order, so that a runner leaving
    /// from the middle does not shift the others' indices (the LBs' consistent hashing).
    order: PublishedOrder,
    predictors: HashMap<String, WindowPredictor>,
    loaded: bool,
    /// Start of the previous tick, to keep ticks apart.
    last_tick: Option<Instant>,
    /// End of the previous tick, to notice the loop itself stalling (not running between
    /// ticks, as opposed to a tick that took long over its own work).
    last_tick_end: Option<Instant>,
    /// Beats beside the loop while it runs ([`ControlLoop::run`]), to notice a stall that
    /// fell inside a tick.
    pulse: Arc<Pulse>,
    /// Removals under way, beside the loop (a busy runner may take its stop grace to go).
    removing: tokio::task::JoinSet<(RunnerInfo, Result<(), ControlPlaneError>)>,
    /// The runners in `removing`.
    removing_ids: std::collections::HashSet<String>,
    in_flight: InFlight,
    /// Cancelled when the loop stops: provisionings end at their next safe point (see
    /// [`ControlPlane::provision`]).
    provisioning: CancellationToken,
    metrics: NpmMetrics,
    /// Warns when `max_total_runners` keeps a group short.
    at_total_cap: Throttle,
}

impl ControlLoop {
    /// A control loop whose metrics ([`NpmMetrics`]) are registered in `registry`.
    pub fn new(
        shared: Arc<Shared>,
        control_plane: Arc<dyn ControlPlane>,
        probe: Arc<dyn RunnerProbe>,
        config: ManagerConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        ControlLoop {
            shared,
            control_plane,
            probe,
            health: Arc::default(),
            config,
            runners: Vec::new(),
            order: PublishedOrder::default(),
            predictors: HashMap::new(),
            loaded: false,
            last_tick: None,
            last_tick_end: None,
            pulse: Arc::default(),
            removing: tokio::task::JoinSet::new(),
            removing_ids: std::collections::HashSet::new(),
            in_flight: InFlight::default(),
            provisioning: CancellationToken::new(),
            metrics: NpmMetrics::register(registry),
            at_total_cap: Throttle::new(Duration::from_secs(60)),
        }
    }

    /// Ticks until cancelled, then asks the control plane to release its runners.
    ///
    /// # Errors
    /// Never; the signature fits the lifecycle's service runner.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut interval = tokio::time::interval(self.config.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let _pulse = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self.pulse).beat_every(PULSE, self.stall_bound()),
        ));
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = interval.tick() => {}
                // New demand: act now, not at the next tick.
                () = self.shared.demand_rose.notified() => interval.reset(),
                // A runner began draining on its own (or serves again): act now.
                () = self.health.changed.notified() => interval.reset(),
                // A runner came up: publish it now, not at the next tick.
                Some(done) = self.in_flight.tasks.join_next_with_id(), if !self.in_flight.tasks.is_empty() => {
                    self.provisioned(done);
                    interval.reset();
                }
            }
            if let Some(last) = self.last_tick {
                let earliest = last + MIN_TICK_GAP.min(self.config.tick);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep_until(earliest) => {}
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.tick() => {}
            }
        }
        // Removals under way are dropped, not waited for: a removal waits for its runner's
        // drain, up to the control plane's stop grace (40 s on docker), past the npm's own
        // bound, and the shutdown stops that runner anyway, with its shorter grace. Every
        // plane leaves a removal cut short at any point where its shutdown (or, for runners
        // kept, the next npm) finishes it (see `ControlPlane::remove`): docker removes the
        // runner container last, after what it left; process keeps the runner in its table
        // until it has exited; swarm makes one request. Provisionings are not cut short:
        // one inside an engine request would make its runner after the shutdown's list,
        // and leave it behind; they stop at their next safe point.
        self.removing.abort_all();
        // Gone before the shutdown begins: an aborted task ends only when it is next polled.
        while self.removing.join_next().await.is_some() {}
        self.stop_provisioning().await;
        self.control_plane.shutdown().await;
        Ok(())
    }

    /// Stops the provisionings under way and waits, at most `provisioning_stop_bound`, for
    /// them to end, so that every runner they made is the control plane's shutdown's to
    /// remove. Those still running at the bound (an engine that does not answer) are
    /// dropped, and logged: a runner such a request makes later is left behind.
    async fn stop_provisioning(&mut self) {
        self.provisioning.cancel();
        if self.in_flight.tasks.is_empty() {
            return;
        }
        let bound = self.config.provisioning_stop_bound;
        let stopped = tokio::time::timeout(bound, async {
            while let Some(done) = self.in_flight.tasks.join_next_with_id().await {
                let (id, outcome) = match done {
                    Ok((id, done)) => (id, done.result.map(|new| new.len())),
                    Err(e) => (e.id(), Err(ControlPlaneError::Failed(e.to_string()))),
                };
                let (group, batch) = self.in_flight.asked.remove(&id).unwrap_or_default();
                match outcome {
                    Ok(ready) => tracing::debug!(%group, batch, ready, "a provisioning ended at shutdown"),
                    Err(e) => tracing::debug!(%group, batch, error = %e, "a provisioning stopped at shutdown"),
                }
            }
        })
        .await;
        if stopped.is_err() {
            let left: Vec<String> = self
                .in_flight
                .asked
                .values()
                .map(|(group, batch)| format!("{batch} of {group}"))
                .collect();
            tracing::error!(
                ?bound,
                provisionings = ?left,
                "provisionings still waiting on the control plane at shutdown; dropped: a \
                 runner the engine makes for them now is left behind (list the runners \
                 carrying the npm's label and remove them by hand)"
            );
            self.in_flight.tasks.abort_all();
        }
    }

    /// The state of every runner the loop knows (tests and logs).
    pub fn runner_states(&self) -> Vec<(RunnerInfo, RunnerState)> {
        self.runners
            .iter()
            .map(|e| (e.info.clone(), e.state))
            .collect()
    }

    /// One pass of the control loop.
    pub async fn tick(&mut self) {
        let now = Instant::now();
        let stalled = self.stalled(now);
        self.last_tick = Some(now);
        while let Some(done) = self.in_flight.tasks.try_join_next_with_id() {
            self.provisioned(done);
        }
        while let Some(done) = self.removing.try_join_next() {
            self.removed(done);
        }
        if !self.sync_with_control_plane().await {
            self.last_tick_end = Some(Instant::now());
            return;
        }
        self.follow_health(now);
        if let Some(gap) = stalled {
            tracing::warn!(
                ?gap,
                purge_after = ?self.config.lb_purge_after,
                "the control loop did not run for longer than the LB purge interval (npm \
                 stopped or starved); LBs get a fresh purge interval and groups hold their \
                 runners for a scale-down window"
            );
            self.shared.with_demand(|d| d.forgive_silence(now));
            // The demand history of the stalled window was never observed: each group holds
            // its runners for a scale-down window, as after a restart, instead of acting on
            // the last (momentary) advert alone.
            let window = self.config.scale_down_delay;
            let counts = self.counts();
            for (group, predictor) in &mut self.predictors {
                let active = counts.get(group).map_or(0, |c| c.active);
                *predictor = WindowPredictor::holding(window, active, now);
            }
        }
        let retention = self.config.group_retention;
        let (purged, forgotten) = self.shared.with_demand(|d| {
            (
                d.purge(now, self.config.lb_purge_after),
                d.forget_groups(now, retention),
            )
        });
        self.metrics.purged(purged.len());
        for group in forgotten {
            tracing::info!(%group, ?retention, "no LB advertised this group for the retention; it keeps no minimum of runners");
        }
        let groups = self.known_groups();
        // A group with no demand, no retention, no runners and none coming is forgotten,
        // with its failed provisionings (a group name comes from the network: kept, they
        // would add up for as long as the npm runs).
        self.predictors.retain(|group, _| groups.contains(group));
        self.in_flight
            .failing
            .retain(|group, _| groups.contains(group));
        // Counted once for all groups: a group's scaling changes only its own runners'
        // states, and adds none (a provisioning's runners join later).
        let counts = self.counts();
        for group in &groups {
            let active = counts.get(group).map_or(0, |c| c.active);
            self.scale_group(group, active, now);
        }
        self.await_provisioned(now + self.config.tick).await;
        self.remove_drained(now).await;
        self.publish();
        // A drain's settling time runs from when the LBs were told, not from the tick's
        // start (the awaits above can take a tick and the probes' bound).
        let published = Instant::now();
        for entry in &mut self.runners {
            if entry.state == (RunnerState::Draining { since: now }) {
                entry.state = RunnerState::Draining { since: published };
            }
        }
        self.show_figures();
        self.last_tick_end = Some(Instant::now());
    }

    /// Updates the per-group gauges.
    fn show_figures(&self) {
        let counts = self.counts();
        let figures: Vec<(String, GroupFigures)> = self
            .known_groups()
            .into_iter()
            .map(|group| {
                let (wanted_mb, lbs) = self
                    .shared
                    .with_demand(|d| (d.wanted_mb(&group), d.lbs_in(&group)));
                let count = counts.get(&group).copied().unwrap_or_default();
                let figures = GroupFigures {
                    active: count.active,
                    draining: count.other,
                    wanted_mb,
                    lbs,
                };
                (group, figures)
            })
            .collect();
        self.metrics.show(figures);
    }

    /// The time since the previous tick ended, when it is longer than an LB may stay silent
    /// (and at least two ticks): the loop was not running, so it cannot tell silent LBs
    /// apart. A tick that took long over its own work (a slow control plane) is no stall:
    /// adverts went on being recorded meanwhile.
    ///
    /// A stall that fell inside a tick (the process stopped while the tick awaited the
    /// control plane, say) ends that tick after it, and the next one starts at once: the
    /// gap between them is short, and the LBs' silence during the stall would be taken for
    /// theirs. The loop's [`Pulse`], which beats beside it, sees that one.
    fn stalled(&mut self, now: Instant) -> Option<Duration> {
        let bound = self.stall_bound();
        let between_ticks = self
            .last_tick_end
            .map(|previous| now.saturating_duration_since(previous))
            .filter(|gap| *gap > bound);
        between_ticks.max(self.pulse.stall(now, bound))
    }

    /// The longest the loop may not run before its LBs' silence may be its own: half the
    /// purge interval (at least two ticks). An LB's silence at a tick after a stall is the
    /// stall and the time from its last advert to the stall, up to its advert interval
    /// (which README asks to keep well under the purge interval): a stall shorter than the
    /// whole purge interval already made live LBs look dead. Forgiving a stall that was
    /// not one costs a dead LB one purge interval more.
    fn stall_bound(&self) -> Duration {
        (self.config.lb_purge_after / 2).max(self.config.tick * 2)
    }

    /// Returns false while the runner set has never been loaded.
    async fn sync_with_control_plane(&mut self) -> bool {
        let listed = match tokio::time::timeout(LIST_BOUND, self.control_plane.list()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list the control plane's runners");
                return self.loaded;
            }
            Err(_) => {
                tracing::warn!(bound = ?LIST_BOUND, "the control plane did not list its runners in time; the tick goes on with the runners known");
                return self.loaded;
            }
        };
        if !self.loaded {
            tracing::info!(
                runners = listed.len(),
                "loaded the runner set from the control plane"
            );
            self.loaded = true;
            // Every live LB advertises within the purge interval; a tick later its groups
            // have runners again.
            let relearn = self.config.lb_purge_after + self.config.tick * 2;
            let _ = self.shared.relearning_until.set(Instant::now() + relearn);
            // The groups of adopted runners are retained as if just advertised: a restart
            // must not take their minimum away before the LBs advertise again (an LB
            // advertises a group only while it has calls for it). So are those of the
            // runners the control plane holds from the LBs: the minimum is provisioned in
            // their place, and would otherwise be lost with them.
            let held_out = self.control_plane.held_out();
            let groups: BTreeSet<String> = listed
                .iter()
                .chain(&held_out)
                .map(|r| r.group.clone())
                .collect();
            let now = Instant::now();
            self.shared.with_demand(|d| d.retain_groups(groups, now));
        }
        let listed_ids: BTreeSet<&str> = listed.iter().map(|r| r.id.as_str()).collect();
        let probe = &self.probe;
        let health = &self.health;
        let removing = &self.removing_ids;
        self.runners.retain(|e| {
            let keep = listed_ids.contains(e.info.id.as_str());
            if !keep {
                if !removing.contains(&e.info.id) {
                    tracing::warn!(runner = %e.info.id, address = %e.info.address, "runner no longer reported by the control plane; dropped");
                }
                probe.forget(&e.info);
                health.forget(&e.info.id);
            }
            keep
        });
        // A runner being provisioned is not listed before it answers (the control plane's
        // contract): each joins when it is ready, not when the slowest of its batch is.
        let mut known: HashSet<String> = self.runners.iter().map(|e| e.info.id.clone()).collect();
        for info in listed {
            if known.insert(info.id.clone()) {
                tracing::info!(runner = %info.id, address = %info.address, group = %info.group, "runner joined");
                self.in_flight.joined(&info.group, &info.id);
                self.runners.push(Entry {
                    info,
                    state: RunnerState::Active,
                });
            }
        }
        self.sort();
        true
    }

    /// Takes in what the runners' health watches said: an active runner that drains on its
    /// own (stopped by someone else than the npm) is `Stopping` from now on, out of its
    /// group's runners and of the LBs' lists; one that serves again is active again.
    /// Runners the npm is removing are left as they are (they say NOT_SERVING because the
    /// npm stopped them). Every runner is followed (see [`RunnerProbe::watch`]).
    fn follow_health(&mut self, now: Instant) {
        for entry in &mut self.runners {
            self.probe.watch(&entry.info, &self.health);
            if self.removing_ids.contains(&entry.info.id) {
                continue;
            }
            let id = &entry.info.id;
            let group = &entry.info.group;
            match (entry.state, self.health.draining(id)) {
                // One the npm drains itself stays so: its removal goes on (and is retried
                // if it fails), and it is not re-activated while it says it drains.
                (RunnerState::Active, Some(true)) => {
                    tracing::warn!(
                        runner = %id,
                        address = %entry.info.address,
                        %group,
                        "runner drains on its own (health NOT_SERVING: stopped by someone \
                         else than the npm); out of its group and the LBs' lists, counted \
                         against FN_MAX_TOTAL_RUNNERS until it has exited"
                    );
                    entry.state = RunnerState::Stopping { since: now };
                }
                (RunnerState::Stopping { .. }, Some(false)) => {
                    tracing::info!(runner = %id, %group, "runner answers SERVING again; active again");
                    entry.state = RunnerState::Active;
                }
                _ => {}
            }
        }
    }

    fn sort(&mut self) {
        self.runners
            .sort_by(|a, b| (a.info.created, &a.info.id).cmp(&(b.info.created, &b.info.id)));
    }

    /// The groups to scale: those live LBs advertise or that are retained, those with
    /// runners or runners coming, and `default` when it keeps a minimum.
    fn known_groups(&self) -> BTreeSet<String> {
        let mut groups: BTreeSet<String> = self
            .shared
            .with_demand(|d| d.groups().chain(d.retained_groups()).cloned().collect());
        for entry in &self.runners {
            if !groups.contains(&entry.info.group) {
                groups.insert(entry.info.group.clone());
            }
        }
        groups.extend(
            self.in_flight
                .runners
                .iter()
                .filter(|(_, coming)| **coming > 0)
                .map(|(group, _)| group.clone()),
        );
        if self.config.min_runners > 0 {
            groups.insert(DEFAULT_GROUP.to_owned());
        }
        groups
    }

    /// The runners `group` keeps without demand: `min_runners` for `default` and the
    /// retained groups, none for the others.
    fn floor(&self, group: &str) -> usize {
        if group == DEFAULT_GROUP || self.shared.with_demand(|d| d.is_retained(group)) {
            self.config.min_runners
        } else {
            0
        }
    }

    /// Scales `group`, which has `active` active runners.
    fn scale_group(&mut self, group: &str, active: usize, now: Instant) {
        let wanted = self.shared.with_demand(|d| d.wanted_mb(group));
        let runner_mb = self.control_plane.runner_memory_mb();
        let window = self.config.scale_down_delay;
        // A group seen for the first time keeps the runners it has (adopted after a
        // restart) until its demand has been watched for a whole window.
        let predicted = self
            .predictors
            .entry(group.to_owned())
            .or_insert_with(|| WindowPredictor::holding(window, active, now))
            .desired(wanted, runner_mb, now);
        let desired = predicted
            .max(self.floor(group))
            .min(self.config.max_runners);

        let coming = self.in_flight.runners.get(group).copied().unwrap_or(0);
        if desired > active {
            let mut short = desired - active;
            // Newest draining runners first: they are the most recently warmed. Not one whose
            // removal has begun, nor one that says it drains (stopped by someone else): it
            // is stopping, and would leave the group short (counted active, nothing
            // provisioned) when it goes.
            for entry in self.runners.iter_mut().rev() {
                if short == 0 {
                    break;
                }
                if entry.info.group == group
                    && matches!(entry.state, RunnerState::Draining { .. })
                    && !self.removing_ids.contains(&entry.info.id)
                    && self.health.draining(&entry.info.id) != Some(true)
                {
                    entry.state = RunnerState::Active;
                    short -= 1;
                    tracing::info!(runner = %entry.info.id, group, "re-activated a draining runner");
                }
            }
            let short = short.saturating_sub(coming);
            // Runners of every group count, draining ones (they still run), those coming,
            // those the control plane runs but holds from the LBs, and those it removed that
            // still run: the cap bounds what the control plane runs.
            let all_coming: usize = self.in_flight.runners.values().sum();
            let held_out = self.control_plane.held_out().len();
            let leaving = self.control_plane.leaving();
            let room = self
                .config
                .max_total_runners
                .saturating_sub(self.runners.len() + all_coming + held_out + leaving);
            if short > room {
                let max_total = self.config.max_total_runners;
                fn_lifecycle::warn_throttled!(
                    self.at_total_cap,
                    group,
                    short,
                    room,
                    max_total,
                    held_out,
                    leaving,
                    "FN_MAX_TOTAL_RUNNERS reached: the group gets fewer runners than its demand asks for"
                );
            }
            let short = short.min(room);
            let paused = self
                .in_flight
                .failing
                .get(group)
                .is_some_and(|(_, not_before)| now < *not_before);
            if short > 0 && paused {
                tracing::debug!(group, short, "provisioning paused after failures");
            } else if short > 0 {
                let batch = short.min(self.config.provision_batch);
                tracing::info!(
                    group,
                    wanted_mb = wanted,
                    desired,
                    active,
                    coming,
                    provisioning = batch,
                    "scaling up"
                );
                let control_plane = Arc::clone(&self.control_plane);
                let group = group.to_owned();
                *self.in_flight.runners.entry(group.clone()).or_default() += batch;
                let task = self.in_flight.tasks.spawn({
                    let group = group.clone();
                    let cancel = self.provisioning.clone();
                    async move {
                        let result = control_plane.provision(&group, batch, &cancel).await;
                        Provisioned {
                            group,
                            batch,
                            result,
                        }
                    }
                });
                self.in_flight.asked.insert(task.id(), (group, batch));
            }
        } else if desired < active {
            let excess = active - desired;
            tracing::info!(
                group,
                wanted_mb = wanted,
                desired,
                active,
                draining = excess,
                "scaling down"
            );
            // The last of the group's list: the LBs' consistent hashing then moves only the
            // functions of the runners that leave.
            let members = self
                .runners
                .iter()
                .filter(|e| e.info.group == group && e.state == RunnerState::Active)
                .map(|e| e.info.id.as_str());
            let leaving: Vec<String> = self
                .order
                .update(group, members)
                .iter()
                .rev()
                .take(excess)
                .cloned()
                .collect();
            for id in leaving {
                if let Some(entry) = self.runners.iter_mut().find(|e| e.info.id == id) {
                    entry.state = RunnerState::Draining { since: now };
                    tracing::info!(runner = %id, group, "runner draining");
                }
            }
        }
    }

    /// Waits for the provisioning under way until `deadline` at most, adding what is ready.
    async fn await_provisioned(&mut self, deadline: Instant) {
        while !self.in_flight.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.tasks.join_next_with_id()).await
            {
                Ok(Some(done)) => self.provisioned(done),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Adds the runners a provisioning task brought back.
    fn provisioned(
        &mut self,
        done: Result<(tokio::task::Id, Provisioned), tokio::task::JoinError>,
    ) {
        let Provisioned {
            group,
            batch,
            result,
        } = match done {
            Ok((id, done)) => {
                self.in_flight.asked.remove(&id);
                done
            }
            Err(e) => {
                // A panic in a control plane (or an abort): that task's runners no longer
                // count as coming (the list shows what it left); the others' still do.
                tracing::error!(error = %e, "a provisioning task failed");
                if let Some((group, batch)) = self.in_flight.asked.remove(&e.id()) {
                    self.in_flight.settle(&group, batch);
                    self.metrics.provisioning_failed(batch);
                }
                return;
            }
        };
        // Those of the batch that joined from the list were taken off as they did.
        let early = match &result {
            Ok(new) => new
                .iter()
                .filter(|info| self.in_flight.joined_early.remove(&info.id).is_some())
                .count(),
            Err(_) => 0,
        };
        self.in_flight.settle(&group, batch.saturating_sub(early));
        match result {
            Ok(new) => {
                self.in_flight.failing.remove(&group);
                self.metrics.provisioned(new.len());
                // The rest of the batch failed (each logged by the control plane).
                let failed = batch.saturating_sub(new.len());
                if failed > 0 {
                    self.metrics.provisioning_failed(failed);
                }
                for info in new {
                    if !self.runners.iter().any(|e| e.info.id == info.id) {
                        tracing::info!(runner = %info.id, address = %info.address, group = %info.group, "runner provisioned");
                        self.runners.push(Entry {
                            info,
                            state: RunnerState::Active,
                        });
                    }
                }
                self.sort();
            }
            Err(e) => {
                self.metrics.provisioning_failed(batch);
                let failures = self
                    .in_flight
                    .failing
                    .get(&group)
                    .map_or(1, |(n, _)| n.saturating_add(1));
                let pause = provision_pause(failures);
                tracing::error!(%group, error = %e, failures, ?pause, "provisioning failed; asking again after the pause");
                self.in_flight
                    .failing
                    .insert(group, (failures, Instant::now() + pause));
            }
        }
    }

    /// Each group's runners, active or not, in one pass over them (a count per group
    /// scanned every runner once per group, each tick).
    fn counts(&self) -> HashMap<String, GroupCount> {
        let mut counts: HashMap<&str, GroupCount> = HashMap::new();
        for entry in &self.runners {
            let count = counts.entry(entry.info.group.as_str()).or_default();
            if entry.state == RunnerState::Active {
                count.active += 1;
            } else {
                count.other += 1;
            }
        }
        counts
            .into_iter()
            .map(|(group, count)| (group.to_owned(), count))
            .collect()
    }

    async fn remove_drained(&mut self, now: Instant) {
        let draining: Vec<(RunnerInfo, Instant)> = self
            .runners
            .iter()
            .filter(|e| !self.removing_ids.contains(&e.info.id))
            .filter_map(|e| match e.state {
                RunnerState::Draining { since } => Some((e.info.clone(), since)),
                // It exits by itself; removed only once it overran the drain time (a runner
                // stuck saying NOT_SERVING would hold its place under the bound for ever).
                RunnerState::Stopping { since }
                    if now.duration_since(since) >= self.config.max_drain_time =>
                {
                    Some((e.info.clone(), since))
                }
                RunnerState::Stopping { .. } | RunnerState::Active => None,
            })
            .collect();
        // Probed together, each for at most PROBE_TIMEOUT: a runner that does not answer
        // stays draining until the next tick, and does not hold up the tick (a tick that
        // overran the LB purge interval would look like the npm's own stall).
        let probes = draining.into_iter().filter_map(|(info, since)| {
            let drained_for = now.duration_since(since);
            if drained_for < self.config.drain_settle {
                return None;
            }
            let overran = drained_for >= self.config.max_drain_time;
            let probe = &self.probe;
            Some(async move {
                if overran {
                    return (info, true, true);
                }
                let idle = match tokio::time::timeout(PROBE_TIMEOUT, probe.calls_in_flight(&info))
                    .await
                {
                    Ok(Ok(n)) => n == 0,
                    Ok(Err(e)) => {
                        tracing::debug!(runner = %info.id, error = %e, "cannot read a draining runner's status");
                        false
                    }
                    Err(_) => {
                        tracing::debug!(runner = %info.id, timeout = ?PROBE_TIMEOUT, "a draining runner's status did not come in time");
                        false
                    }
                };
                (info, idle, false)
            })
        });
        let mut to_remove = Vec::new();
        for (info, idle, overran) in futures::future::join_all(probes).await {
            if overran {
                tracing::warn!(runner = %info.id, max = ?self.config.max_drain_time, "runner overran the maximum drain time; removing it");
            }
            if idle || overran {
                to_remove.push(info);
            }
        }
        // Removals run beside the loop: a runner that overran its drain time may take its
        // control plane's stop grace to go (tens of seconds), and meanwhile other groups
        // scale and the runner lists are published. Each is taken in at a later tick.
        for info in to_remove {
            self.removing_ids.insert(info.id.clone());
            let control_plane = Arc::clone(&self.control_plane);
            self.removing.spawn(async move {
                let result = control_plane.remove(&info).await;
                (info, result)
            });
        }
    }

    /// Takes in a removal that ended.
    fn removed(
        &mut self,
        done: Result<(RunnerInfo, Result<(), ControlPlaneError>), tokio::task::JoinError>,
    ) {
        let (info, result) = match done {
            Ok(done) => done,
            Err(e) => {
                // A panic in a control plane: which runner is unknown, so each is asked
                // again (a removal of a runner already gone succeeds).
                tracing::error!(error = %e, "a removal task failed");
                self.removing_ids.clear();
                return;
            }
        };
        self.removing_ids.remove(&info.id);
        match result {
            Ok(()) => {
                tracing::info!(runner = %info.id, group = %info.group, "drained runner removed");
                self.metrics.removed();
                self.runners.retain(|e| e.info.id != info.id);
                self.probe.forget(&info);
                self.health.forget(&info.id);
            }
            Err(e) => {
                tracing::error!(runner = %info.id, error = %e, "removing a runner failed; retrying next tick")
            }
        }
    }

    fn publish(&mut self) {
        // Each group's active runners, oldest first: the order in which those that join
        // together are appended.
        let mut active: BTreeMap<&str, Vec<&RunnerInfo>> = BTreeMap::new();
        for entry in self
            .runners
            .iter()
            .filter(|e| e.state == RunnerState::Active)
        {
            active
                .entry(&entry.info.group)
                .or_default()
                .push(&entry.info);
        }
        self.order.retain(|group| active.contains_key(group));
        let membership = active
            .into_iter()
            .map(|(group, runners)| {
                let by_id: HashMap<&str, &RunnerInfo> =
                    runners.iter().map(|r| (r.id.as_str(), *r)).collect();
                let list = self
                    .order
                    .update(group, runners.iter().map(|r| r.id.as_str()))
                    .iter()
                    .filter_map(|id| by_id.get(id.as_str()).map(|r| (*r).clone()))
                    .collect();
                (group.to_owned(), Arc::new(list))
            })
            .collect();
        self.shared.publish(membership);
    }
}

/// The control loop's own pulse: a task that beats every [`PULSE`] beside the loop while it
/// runs. A gap between two beats longer than the stall bound is a time when the process did
/// not run (stopped, starved of CPU): the loop was not waiting on anything, so a slow
/// control plane is no stall.
#[derive(Debug, Default)]
struct Pulse {
    beats: Mutex<Beats>,
}

#[derive(Debug, Default)]
struct Beats {
    /// The last beat (or stall taken).
    last: Option<Instant>,
    /// The longest gap over the bound seen since a stall was last taken.
    stall: Option<Duration>,
}

impl Pulse {
    fn beats(&self) -> std::sync::MutexGuard<'_, Beats> {
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Beats at `now`: a gap since the last beat over `bound` is a stall.
    fn beat(&self, now: Instant, bound: Duration) {
        let mut beats = self.beats();
        if let Some(last) = beats.last {
            let gap = now.saturating_duration_since(last);
            if gap > bound {
                beats.stall = beats.stall.max(Some(gap));
            }
        }
        beats.last = Some(now);
    }

    /// Beats every `every` until dropped (aborted).
    async fn beat_every(self: Arc<Self>, every: Duration, bound: Duration) {
        loop {
            self.beat(Instant::now(), bound);
            tokio::time::sleep(every).await;
        }
    }

    /// The stall seen since the last call, if any, taken: a gap between beats over
    /// `bound`, or no beat for longer than `bound` up to `now` (the process runs again and
    /// the pulse has not beaten yet). Counts as a beat at `now`. Nothing without beats (a
    /// loop ticked by hand).
    fn stall(&self, now: Instant, bound: Duration) -> Option<Duration> {
        let mut beats = self.beats();
        let last = beats.last?;
        let silent = Some(now.saturating_duration_since(last)).filter(|gap| *gap > bound);
        let stall = beats.stall.take().max(silent);
        beats.last = Some(now.max(last));
        stall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gap between two beats over the bound is a stall, taken once; so is a silence over
    /// the bound up to the tick that asks (the process runs again, the pulse not yet);
    /// beats close together, or no beats at all, are none.
    #[test]
    fn the_pulse_sees_the_process_stop_whether_or_not_it_beat_since() {
        let bound = Duration::from_secs(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let pulse = Pulse::default();
        assert_eq!(
            pulse.stall(at(100), bound),
            None,
            "no beats: a loop ticked by hand"
        );

        pulse.beat(at(0), bound);
        pulse.beat(at(1), bound);
        assert_eq!(pulse.stall(at(2), bound), None);
        // Stopped for 30 s: the pulse beats first, then the tick asks.
        pulse.beat(at(32), bound);
        assert_eq!(pulse.stall(at(32), bound), Some(Duration::from_secs(30)));
        assert_eq!(pulse.stall(at(33), bound), None, "taken once");

        // Stopped again: the tick asks before the pulse has beaten, and its late beat is
        // no second stall.
        assert_eq!(pulse.stall(at(63), bound), Some(Duration::from_secs(30)));
        pulse.beat(at(63), bound);
        assert_eq!(pulse.stall(at(64), bound), None);
    }

    /// A watch behind by some versions is told the groups of them all; one behind by more
    /// than are remembered, or past a publication that named none, is told none (fetch all).
    #[test]
    fn a_watch_is_told_the_groups_changed_since_its_last_message() {
        let shared = Shared::default();
        let runner = |id: &str| RunnerInfo {
            id: id.to_owned(),
            address: format!("{id}:1"),
            group: String::new(),
            created: std::time::SystemTime::UNIX_EPOCH,
        };
        let membership = |lists: &[(&str, &[&str])]| -> Membership {
            lists
                .iter()
                .map(|(group, ids)| {
                    let list = ids.iter().map(|id| runner(id)).collect();
                    ((*group).to_owned(), Arc::new(list))
                })
                .collect()
        };
        shared.publish(membership(&[("a", &["1"]), ("b", &["2"])]));
        shared.publish(membership(&[("a", &["1", "3"]), ("b", &["2"])]));
        shared.publish(membership(&[("a", &["1", "3"]), ("b", &["2"])]));
        shared.publish(membership(&[("a", &["1", "3"]), ("c", &["4"])]));
        assert_eq!(
            *shared.changes.borrow(),
            3,
            "an unchanged publication is no version"
        );
        assert!(
            shared.changed_groups(0, 1).is_empty(),
            "the first publication"
        );
        assert_eq!(shared.changed_groups(1, 2), ["a"]);
        assert_eq!(shared.changed_groups(2, 3), ["b", "c"]);
        assert_eq!(shared.changed_groups(1, 3), ["a", "b", "c"]);
        assert_eq!(shared.changed_groups(1, 2), ["a"], "up to the version sent");
        for i in 0..CHANGES_REMEMBERED {
            let id = i.to_string();
            shared.publish(membership(&[("a", &[id.as_str()])]));
        }
        let latest = *shared.changes.borrow();
        assert_eq!(
            shared.changed_groups(3, latest),
            ["a", "c"],
            "the oldest remembered"
        );
        assert!(
            shared.changed_groups(2, latest).is_empty(),
            "no longer remembered"
        );
        assert_eq!(shared.changed_groups(latest - 2, latest), ["a"]);
    }

    #[tokio::test]
    async fn an_advert_that_raises_demand_wakes_the_control_loop() {
        let shared = Shared::default();
        let soon = Duration::from_millis(20);
        let now = Instant::now();
        shared
            .record_advert("lb-1", vec![("g".into(), 128)], now)
            .expect("recorded");
        tokio::time::timeout(soon, shared.demand_rose.notified())
            .await
            .expect("new demand: woken");
        shared
            .record_advert("lb-1", vec![("g".into(), 128)], now)
            .expect("recorded");
        shared
            .record_advert("lb-1", vec![("g".into(), 64)], now)
            .expect("recorded");
        assert!(
            tokio::time::timeout(soon, shared.demand_rose.notified())
                .await
                .is_err(),
            "the same or less demand waits for the tick"
        );
        shared
            .record_advert("lb-2", vec![("g".into(), 64)], now)
            .expect("recorded");
        tokio::time::timeout(soon, shared.demand_rose.notified())
            .await
            .expect("another LB's demand adds up: woken");
    }
}
