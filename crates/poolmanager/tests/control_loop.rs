//! Control-loop tests through the crate's public API, with a fake control plane and tokio's
//! paused clock: what a restarted npm does before the LBs have advertised again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeControlPlane, FakeProbe, RUNNER_MB};
use fn_poolmanager::manager::RunnerState;
use fn_poolmanager::{ControlLoop, ManagerConfig, Shared};
use tokio::time::Instant;

fn config() -> ManagerConfig {
    ManagerConfig {
        min_runners: 0,
        max_runners: 10,
        scale_down_delay: Duration::from_secs(10),
        max_drain_time: Duration::from_secs(60),
        lb_purge_after: Duration::from_secs(5),
        provision_batch: 2,
        tick: Duration::from_secs(1),
        drain_settle: Duration::from_secs(2),
    }
}

fn members(shared: &Shared, group: &str) -> Vec<String> {
    shared.group(group).iter().map(|r| r.id.clone()).collect()
}

fn draining(control: &ControlLoop) -> Vec<String> {
    control
        .runner_states()
        .into_iter()
        .filter(|(_, s)| matches!(s, RunnerState::Draining { .. }))
        .map(|(r, _)| r.id)
        .collect()
}

/// An npm restarted next to three running runners ticks at once, before any LB has
/// advertised again: it must not drain the runners it just adopted (the LBs would lose
/// every runner of the group), only scale down once demand stayed low for a whole window.
#[tokio::test(start_paused = true)]
async fn a_restarted_npm_keeps_adopted_runners_until_demand_stayed_low_for_the_window() {
    let shared = Arc::new(Shared::default());
    let cp = Arc::new(FakeControlPlane::with_runners("g", 3));
    let mut control = ControlLoop::new(
        Arc::clone(&shared),
        cp.clone(),
        Arc::new(FakeProbe::default()),
        config(),
    );

    // No advert yet: the adopted runners are all published, none drains.
    control.tick().await;
    assert_eq!(members(&shared, "g"), ["r1", "r2", "r3"]);
    assert!(draining(&control).is_empty());

    // The LB comes back and needs one runner: inside the window nothing drains.
    for _ in 0..8 {
        tokio::time::advance(Duration::from_secs(1)).await;
        shared.record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now());
        control.tick().await;
        assert_eq!(members(&shared, "g"), ["r1", "r2", "r3"]);
        assert!(draining(&control).is_empty());
    }
    // Past the window the newest two drain.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(1)).await;
        shared.record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now());
        control.tick().await;
    }
    assert_eq!(members(&shared, "g"), ["r1"]);
    assert_eq!(cp.provisioned(), 0, "a restarted npm provisions nothing");
}

/// Without any demand for a whole window, adopted runners do drain and are removed.
#[tokio::test(start_paused = true)]
async fn adopted_runners_without_demand_drain_after_the_window() {
    let shared = Arc::new(Shared::default());
    let cp = Arc::new(FakeControlPlane::with_runners("g", 2));
    let mut control = ControlLoop::new(
        Arc::clone(&shared),
        cp.clone(),
        Arc::new(FakeProbe::default()),
        config(),
    );
    control.tick().await;
    assert_eq!(members(&shared, "g"), ["r1", "r2"]);
    for _ in 0..15 {
        tokio::time::advance(Duration::from_secs(1)).await;
        control.tick().await;
    }
    assert!(members(&shared, "g").is_empty());
    let mut removed = cp.removed();
    removed.sort();
    assert_eq!(removed, ["r1", "r2"]);
    assert_eq!(cp.provisioned(), 0);
}
