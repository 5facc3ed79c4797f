//! The capacity gate and the hot-instance pool, as one piece of state.
//!
//! Memory is the runner's only admission currency. Two kinds of memory are held:
//! - *committed*: memory of calls in flight (what `Status` reports and what the npm drains on);
//! - *idle*: memory of hot instances waiting for their next call.
//!
//! [`Pool::admit`] is an atomic check-and-reserve under one short lock (never held across an
//! await): an idle instance of the same [`InstanceSpec`] is reused; otherwise the call's memory
//! is reserved, evicting idle instances least recently used first when that makes room; a call
//! that would not fit even with every idle instance gone is refused as busy and evicts nothing.
//!
//! A [`Reservation`] owns the call's memory and (once started) its instance. Dropping it
//! releases the memory exactly once on every path — success, error, timeout, cancellation,
//! panic. By default the instance is killed on drop: only [`Reservation::finish_ok`], called
//! when a call completed cleanly, returns the instance to the idle set. So an instance whose
//! call was cut off in an unknown state is never reused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
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

struct IdleInstance {
    spec: InstanceSpec,
    instance: Box<dyn Instance>,
    last_used: Instant,
    idle_timeout: Duration,
}

#[derive(Default)]
struct State {
    committed_mb: u64,
    idle_mb: u64,
    calls_in_flight: u64,
    busy_instances: u64,
    instances_started: u64,
    /// Idle instances, oldest use first (eviction takes from the front).
    idle: Vec<IdleInstance>,
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
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool with `total_mb` of memory to hand out, starting instances with `driver`.
    pub fn new(driver: Arc<dyn Driver>, total_mb: u64, start_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            driver,
            total_mb,
            start_timeout,
            draining: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            call_ended: Notify::new(),
        })
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

    /// Atomically reserves memory for a call of `spec`, reusing an idle instance of the same
    /// spec when there is one.
    ///
    /// # Errors
    /// [`Refusal`] when draining, or when the memory does not fit even after evicting idle
    /// instances.
    pub fn admit(self: &Arc<Self>, spec: InstanceSpec) -> Result<Reservation, Refusal> {
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
            // Checked under the lock that `wait_idle` reads `calls_in_flight` under: a call
            // is either admitted before a drain starts (and waited for) or refused.
            if self.draining.load(Ordering::Acquire) {
                return Err(Refusal::Draining);
            }
            if let Some(pos) = st
                .idle
                .iter()
                .rposition(|i| i.spec == spec && i.instance.is_alive())
            {
                let hot = st.idle.remove(pos);
                st.idle_mb -= needed_mb;
                st.committed_mb += needed_mb;
                st.calls_in_flight += 1;
                st.busy_instances += 1;
                Ok(Some(hot.instance))
            } else {
                // Evict only when that makes room: a call that cannot fit even with every
                // idle instance gone is refused without killing any of them.
                let fits_after_eviction = st.committed_mb + needed_mb <= self.total_mb;
                while fits_after_eviction
                    && st.committed_mb + st.idle_mb + needed_mb > self.total_mb
                    && !st.idle.is_empty()
                {
                    let old = st.idle.remove(0);
                    st.idle_mb -= old.spec.memory_mb;
                    evicted.push(old);
                }
                let used = st.committed_mb + st.idle_mb;
                if used + needed_mb <= self.total_mb {
                    st.committed_mb += needed_mb;
                    st.calls_in_flight += 1;
                    Ok(None)
                } else {
                    Err(Refusal::Busy {
                        needed_mb,
                        free_mb: self.total_mb - used,
                        total_mb: self.total_mb,
                    })
                }
            }
        };
        // Kill outside the lock: killing sends signals and removes files.
        for old in evicted {
            tracing::debug!(app = %old.spec.app, function = %old.spec.function, "evicting idle instance for memory");
            old.instance.kill();
        }
        let instance = result?;
        let reused = instance.is_some();
        Ok(Reservation {
            pool: Arc::clone(self),
            spec,
            instance,
            reused,
            returned: false,
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
            hot_instances: st.busy_instances + st.idle.len() as u64,
            draining: self.draining.load(Ordering::Acquire),
            instances_started: st.instances_started,
        }
    }

    /// Stops admitting calls: every later [`Pool::admit`] is refused as draining.
    pub fn drain(&self) {
        // Under the lock, like the check in `admit`, so no admission straddles the switch.
        let _st = self.lock();
        self.draining.store(true, Ordering::Release);
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
        let expired: Vec<IdleInstance> = {
            let mut st = self.lock();
            let (expired, keep): (Vec<_>, Vec<_>) =
                std::mem::take(&mut st.idle).into_iter().partition(|i| {
                    now.duration_since(i.last_used) >= i.idle_timeout || !i.instance.is_alive()
                });
            st.idle = keep;
            st.idle_mb -= expired.iter().map(|i| i.spec.memory_mb).sum::<u64>();
            expired
        };
        for old in &expired {
            tracing::debug!(app = %old.spec.app, function = %old.spec.function, "idle instance expired");
            old.instance.kill();
        }
        expired.len()
    }

    /// Kills every idle instance without waiting for their clean-up.
    pub fn kill_idle(&self) {
        for old in self.take_idle() {
            old.instance.kill();
        }
    }

    /// Kills every idle instance and waits until each is gone and cleaned up (see
    /// [`Instance::wait_gone`]): the last step of a shutdown, after the drain. Bound it with
    /// a timeout.
    pub async fn shutdown(&self) {
        let idle = self.take_idle();
        for old in &idle {
            old.instance.kill();
        }
        futures::future::join_all(idle.iter().map(|old| old.instance.wait_gone())).await;
    }

    fn take_idle(&self) -> Vec<IdleInstance> {
        let mut st = self.lock();
        st.idle_mb = 0;
        std::mem::take(&mut st.idle)
    }

    /// Background task: expires idle instances until cancelled, then kills the rest and
    /// waits for their clean-up.
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
        self.shutdown().await;
        Ok(())
    }
}

/// Memory reserved for one call, and the instance that runs it. See the module docs for
/// the release rules.
pub struct Reservation {
    pool: Arc<Pool>,
    spec: InstanceSpec,
    instance: Option<Box<dyn Instance>>,
    reused: bool,
    returned: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("spec", &self.spec)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Whether the call got an already-hot instance.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The call's instance, started now if the reservation has none.
    ///
    /// # Errors
    /// What the driver reports when the instance cannot start.
    pub async fn instance(&mut self, call_id: &str) -> Result<&dyn Instance, DriverError> {
        if self.instance.is_none() {
            let started = self
                .pool
                .driver
                .start(&self.spec, call_id, self.pool.start_timeout)
                .await?;
            // Count it as busy only once it exists.
            let mut st = self.pool.lock();
            st.busy_instances += 1;
            st.instances_started += 1;
            drop(st);
            self.instance = Some(started);
        }
        match &self.instance {
            Some(instance) => Ok(instance.as_ref()),
            None => Err(DriverError::Start("instance vanished".into())),
        }
    }

    /// The call completed cleanly: keep the instance hot for `idle_timeout`.
    pub fn finish_ok(mut self, idle_timeout: Duration) {
        if let Some(instance) = self.instance.take() {
            if instance.is_alive() && !idle_timeout.is_zero() {
                let mut st = self.pool.lock();
                st.committed_mb -= self.spec.memory_mb;
                st.idle_mb += self.spec.memory_mb;
                st.calls_in_flight -= 1;
                st.busy_instances -= 1;
                st.idle.push(IdleInstance {
                    spec: self.spec.clone(),
                    instance,
                    last_used: Instant::now(),
                    idle_timeout,
                });
                drop(st);
                self.returned = true;
                self.pool.call_ended.notify_waiters();
            } else {
                self.instance = Some(instance);
            }
        }
        // Otherwise Drop releases the memory and kills the instance.
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        {
            let mut st = self.pool.lock();
            st.committed_mb -= self.spec.memory_mb;
            st.calls_in_flight -= 1;
            if self.instance.is_some() {
                st.busy_instances -= 1;
            }
        }
        if let Some(instance) = self.instance.take() {
            instance.kill();
        }
        self.pool.call_ended.notify_waiters();
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
        r.finish_ok(Duration::from_secs(30));
        let s = pool.stats();
        assert_eq!((s.committed_mb, s.idle_mb, s.hot_instances), (0, 128, 1));

        let mut r = pool.admit(spec("f", 128)).expect("fits");
        assert!(r.reused());
        assert_eq!(r.instance("c2").await.expect("hot").pid(), pid);
        r.finish_ok(Duration::from_secs(30));
        assert_eq!(driver.started(), 1);
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

    #[tokio::test]
    async fn idle_instances_are_evicted_lru_first_for_memory() {
        let (pool, driver) = pool(256);
        for f in ["old", "new"] {
            let mut r = pool.admit(spec(f, 128)).expect("fits");
            r.instance(f).await.expect("starts");
            r.finish_ok(Duration::from_secs(30));
        }
        // A third function needs 128 MB: "old" goes, "new" stays hot.
        let _r = pool.admit(spec("third", 128)).expect("evicts to fit");
        assert_eq!(driver.killed(), 1);
        let again = pool.admit(spec("new", 128)).expect("new still hot");
        assert!(again.reused());
    }

    #[tokio::test]
    async fn a_call_that_cannot_fit_even_after_eviction_evicts_nothing() {
        let (pool, driver) = pool(384);
        let mut idle = pool.admit(spec("idle", 128)).expect("fits");
        idle.instance("c").await.expect("starts");
        idle.finish_ok(Duration::from_secs(30));
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
        let mut r = pool.admit(spec("f", 128)).expect("fits");
        r.instance("c").await.expect("starts");
        r.finish_ok(Duration::from_secs(5));
        assert_eq!(pool.reap_expired(Instant::now()), 0);
        assert_eq!(
            pool.reap_expired(Instant::now() + Duration::from_secs(6)),
            1
        );
        assert_eq!(driver.killed(), 1);
        assert_eq!(pool.stats().idle_mb, 0);
    }
}
