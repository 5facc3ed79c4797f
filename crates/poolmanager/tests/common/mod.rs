//! Fakes behind the npm's traits, shared by its service tests.

#![allow(dead_code)] // Each test file uses a different part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fn_poolmanager::control_plane::{ControlPlane, ControlPlaneError, RunnerInfo};
use fn_poolmanager::manager::{HealthReports, RunnerProbe};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub const RUNNER_MB: u64 = 1024;

/// A control plane that hands out made-up runners and records what it was asked.
#[derive(Debug, Default)]
pub struct FakeControlPlane {
    runners: Mutex<Vec<RunnerInfo>>,
    /// Size of every provisioning request, in order.
    batches: Mutex<Vec<usize>>,
    removed: Mutex<Vec<String>>,
    next: Mutex<u64>,
    /// Calls of `list`.
    lists: Mutex<usize>,
    /// While set, `list` fails (a control plane that cannot be reached).
    pub list_fails: Mutex<bool>,
    /// While set, `list` never answers (an engine that hangs).
    pub list_hangs: Mutex<bool>,
    /// When set, a provisioning reports its runners this long after it made them (a swarm
    /// service starting); `list` shows none before (the control planes' contract).
    pub provision_delay: Mutex<Option<Duration>>,
    /// When set, the runners of one provisioning are ready one after another, this long
    /// apart, each listed as it is; the provisioning reports them all with the last.
    pub provision_stagger: Mutex<Option<Duration>>,
    /// Runners made and not ready yet: not listed.
    starting: Mutex<Vec<RunnerInfo>>,
    /// When set, a removal takes this long (a busy runner given its stop grace).
    pub remove_delay: Mutex<Option<Duration>>,
    /// A provisioning for this group panics (a control plane's bug).
    pub panics_for: Mutex<Option<String>>,
    /// While set, every provisioning fails and makes nothing (a runner that cannot start).
    pub provision_fails: Mutex<bool>,
    /// While set, a provisioning never ends, cancelled or not (an engine that does not
    /// answer the request that makes its runner).
    pub provision_hangs: Mutex<bool>,
    /// Provisionings under way, and their stops at the npm's shutdown.
    provisionings: Mutex<usize>,
    stopped: Mutex<usize>,
    /// Provisionings under way when `shutdown` was called, if it was.
    at_shutdown: Mutex<Option<usize>>,
    /// Removals under way: begun, and neither ended nor dropped.
    removals: Mutex<usize>,
    /// Removals under way when `shutdown` was called, if it was.
    removals_at_shutdown: Mutex<Option<usize>>,
}

/// Counts a removal under way for as long as it lives, however it ends.
struct UnderWay<'a>(&'a Mutex<usize>);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
    }
}

impl FakeControlPlane {
    /// A control plane that already runs `n` runners of `group` (an npm restart).
    pub fn with_runners(group: &str, n: usize) -> Self {
        let cp = FakeControlPlane::default();
        for _ in 0..n {
            let info = cp.make(group);
            cp.runners.lock().expect("lock").push(info);
        }
        cp
    }

    fn make(&self, group: &str) -> RunnerInfo {
        let mut next = self.next.lock().expect("lock");
        *next += 1;
        RunnerInfo {
            id: format!("r{next}"),
            address: format!("127.0.0.1:{}", 10_000 + *next),
            group: group.to_owned(),
            created: UNIX_EPOCH + Duration::from_secs(*next),
        }
    }

    /// Runners provisioned in all.
    pub fn provisioned(&self) -> usize {
        self.batches.lock().expect("lock").iter().sum()
    }

    /// Size of every provisioning request, in order.
    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().expect("lock").clone()
    }

    /// The runner disappears without being removed (its host died).
    pub fn vanish(&self, id: &str) {
        self.runners.lock().expect("lock").retain(|r| r.id != id);
    }

    /// Runners of `group` the control plane has, starting or running.
    pub fn runners_of(&self, group: &str) -> usize {
        let of_group = |list: &Mutex<Vec<RunnerInfo>>| {
            list.lock()
                .expect("lock")
                .iter()
                .filter(|r| r.group == group)
                .count()
        };
        of_group(&self.runners) + of_group(&self.starting)
    }

    /// A runner made by a provisioning is ready: listed from now on.
    fn ready(&self, id: &str) {
        let mut starting = self.starting.lock().expect("lock");
        if let Some(pos) = starting.iter().position(|r| r.id == id) {
            let info = starting.remove(pos);
            self.runners.lock().expect("lock").push(info);
        }
    }

    pub fn removed(&self) -> Vec<String> {
        self.removed.lock().expect("lock").clone()
    }

    /// Provisionings under way (not ended, nor stopped by cancellation).
    pub fn provisionings(&self) -> usize {
        *self.provisionings.lock().expect("lock")
    }

    /// Provisionings that ended because they were cancelled.
    pub fn stopped(&self) -> usize {
        *self.stopped.lock().expect("lock")
    }

    /// Provisionings under way when the npm's shutdown reached the control plane, if it
    /// did.
    pub fn provisionings_at_shutdown(&self) -> Option<usize> {
        *self.at_shutdown.lock().expect("lock")
    }

    /// Removals under way (begun, and neither ended nor dropped).
    pub fn removals(&self) -> usize {
        *self.removals.lock().expect("lock")
    }

    /// Removals under way when the npm's shutdown reached the control plane, if it did.
    pub fn removals_at_shutdown(&self) -> Option<usize> {
        *self.removals_at_shutdown.lock().expect("lock")
    }

    /// Calls of `list` so far (one per control-loop tick).
    pub fn lists(&self) -> usize {
        *self.lists.lock().expect("lock")
    }
}

impl ControlPlane for FakeControlPlane {
    fn runner_memory_mb(&self) -> u64 {
        RUNNER_MB
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        *self.lists.lock().expect("lock") += 1;
        if *self.list_hangs.lock().expect("lock") {
            return Box::pin(std::future::pending());
        }
        let result = if *self.list_fails.lock().expect("lock") {
            Err(ControlPlaneError::Failed(
                "fake control plane is down".into(),
            ))
        } else {
            Ok(self.runners.lock().expect("lock").clone())
        };
        Box::pin(async move { result })
    }

    fn provision<'a>(
        &'a self,
        group: &'a str,
        count: usize,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        self.batches.lock().expect("lock").push(count);
        if *self.provision_hangs.lock().expect("lock") {
            return Box::pin(std::future::pending());
        }
        if *self.provision_fails.lock().expect("lock") {
            return Box::pin(async {
                Err(ControlPlaneError::Failed(
                    "the runner exited at start".into(),
                ))
            });
        }
        let panics = self.panics_for.lock().expect("lock").as_deref() == Some(group);
        let delay = *self.provision_delay.lock().expect("lock");
        let stagger = *self.provision_stagger.lock().expect("lock");
        let mut new: Vec<RunnerInfo> = (0..count).map(|_| self.make(group)).collect();
        if delay.is_some() || stagger.is_some() {
            // Stamped as the docker and swarm planes stamp it: now, in whole milliseconds.
            let now = std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            for info in &mut new {
                info.created = UNIX_EPOCH + Duration::from_millis(millis);
            }
        }
        self.starting
            .lock()
            .expect("lock")
            .extend(new.iter().cloned());
        *self.provisionings.lock().expect("lock") += 1;
        Box::pin(async move {
            assert!(!panics, "the fake control plane was told to panic");
            // Its waits end at cancellation, as the real planes' do; what it made stays
            // made (starting, not listed).
            let waits = async {
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                for info in &new {
                    if let Some(stagger) = stagger {
                        tokio::time::sleep(stagger).await;
                    }
                    self.ready(&info.id);
                }
            };
            let done = cancel.run_until_cancelled(waits).await;
            *self.provisionings.lock().expect("lock") -= 1;
            if done.is_none() {
                *self.stopped.lock().expect("lock") += 1;
                return Err(ControlPlaneError::Cancelled);
            }
            Ok(new)
        })
    }

    fn remove<'a>(
        &'a self,
        runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        let delay = *self.remove_delay.lock().expect("lock");
        *self.removals.lock().expect("lock") += 1;
        let under_way = UnderWay(&self.removals);
        Box::pin(async move {
            let _under_way = under_way;
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            self.removed.lock().expect("lock").push(runner.id.clone());
            self.runners
                .lock()
                .expect("lock")
                .retain(|r| r.id != runner.id);
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        *self.at_shutdown.lock().expect("lock") = Some(self.provisionings());
        *self.removals_at_shutdown.lock().expect("lock") = Some(self.removals());
        Box::pin(async {})
    }
}

/// A probe that reports the configured calls in flight (0 unless set); a wedged runner
/// never answers. Runners' health is what the test says ([`FakeProbe::say_draining`]).
#[derive(Debug, Default)]
pub struct FakeProbe {
    in_flight: Mutex<HashMap<String, u64>>,
    wedged: Mutex<Vec<String>>,
    /// Where the control loop takes in runners' health, once it has watched one.
    reports: Mutex<Option<Arc<HealthReports>>>,
    /// Runners watched and not forgotten since.
    watched: Mutex<Vec<String>>,
}

impl FakeProbe {
    /// Runner `id`'s health watch says it drains (NOT_SERVING), or that it serves again.
    pub fn say_draining(&self, id: &str, draining: bool) {
        let reports = self.reports.lock().expect("lock").clone();
        reports
            .expect("the control loop watches its runners' health")
            .report(id, draining);
    }

    /// Runners whose health is followed now.
    pub fn watched(&self) -> Vec<String> {
        self.watched.lock().expect("lock").clone()
    }

    pub fn set(&self, id: &str, n: u64) {
        self.in_flight
            .lock()
            .expect("lock")
            .insert(id.to_owned(), n);
    }

    /// `id`'s status never comes.
    pub fn wedge(&self, id: &str) {
        self.wedged.lock().expect("lock").push(id.to_owned());
    }
}

impl RunnerProbe for FakeProbe {
    fn calls_in_flight<'a>(&'a self, runner: &'a RunnerInfo) -> BoxFuture<'a, Result<u64, String>> {
        if self.wedged.lock().expect("lock").contains(&runner.id) {
            return Box::pin(std::future::pending());
        }
        let n = self
            .in_flight
            .lock()
            .expect("lock")
            .get(&runner.id)
            .copied()
            .unwrap_or(0);
        Box::pin(async move { Ok(n) })
    }

    fn watch(&self, runner: &RunnerInfo, reports: &Arc<HealthReports>) {
        *self.reports.lock().expect("lock") = Some(Arc::clone(reports));
        let mut watched = self.watched.lock().expect("lock");
        if !watched.contains(&runner.id) {
            watched.push(runner.id.clone());
        }
    }

    fn forget(&self, runner: &RunnerInfo) {
        self.watched
            .lock()
            .expect("lock")
            .retain(|id| *id != runner.id);
    }
}
