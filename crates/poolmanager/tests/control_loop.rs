//! Control-loop tests through the crate's public API, with a fake control plane and probe
//! behind the real traits and tokio's paused clock as the controllable time: batch scale-up,
//! re-activation before provisioning, newest-first drain, LB purge, vanished runners, restart
//! adoption, no flapping, min/max bounds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeControlPlane, FakeProbe, RUNNER_MB};
use fn_poolmanager::manager::RunnerState;
use fn_poolmanager::{ControlLoop, ManagerConfig, Shared};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

fn config() -> ManagerConfig {
    ManagerConfig {
        min_runners: 0,
        group_retention: Duration::from_secs(120),
        max_runners: 10,
        max_total_runners: 100,
        scale_down_delay: Duration::from_secs(10),
        max_drain_time: Duration::from_secs(60),
        lb_purge_after: Duration::from_secs(5),
        provision_batch: 2,
        tick: Duration::from_secs(1),
        drain_settle: Duration::from_secs(2),
        provisioning_stop_bound: fn_poolmanager::manager::PROVISIONING_STOP_BOUND,
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
        &mut Registry::default(),
    );

    // No advert yet: the adopted runners are all published, none drains.
    control.tick().await;
    assert_eq!(members(&shared, "g"), ["r1", "r2", "r3"]);
    assert!(draining(&control).is_empty());

    // The LB comes back and needs one runner: inside the window nothing drains.
    for _ in 0..8 {
        tokio::time::advance(Duration::from_secs(1)).await;
        shared
            .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
            .expect("recorded");
        control.tick().await;
        assert_eq!(members(&shared, "g"), ["r1", "r2", "r3"]);
        assert!(draining(&control).is_empty());
    }
    // Past the window the newest two drain.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(1)).await;
        shared
            .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
            .expect("recorded");
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
        &mut Registry::default(),
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

struct Harness {
    shared: Arc<Shared>,
    cp: Arc<FakeControlPlane>,
    probe: Arc<FakeProbe>,
    control: ControlLoop,
    /// Where the control loop's metrics are registered.
    registry: Registry,
}

fn harness(cp: FakeControlPlane, config: ManagerConfig) -> Harness {
    let shared = Arc::new(Shared::default());
    let cp = Arc::new(cp);
    let probe = Arc::new(FakeProbe::default());
    let mut registry = Registry::default();
    let control = ControlLoop::new(
        shared.clone(),
        cp.clone(),
        probe.clone(),
        config,
        &mut registry,
    );
    Harness {
        shared,
        cp,
        probe,
        control,
        registry,
    }
}

impl Harness {
    fn advertise(&self, lb: &str, group: &str, runners: u64) {
        self.shared
            .record_advert(
                lb,
                vec![(group.to_owned(), runners * RUNNER_MB)],
                Instant::now(),
            )
            .expect("recorded");
    }

    /// Advances the clock by one tick and runs it.
    async fn tick(&mut self) {
        tokio::time::advance(Duration::from_secs(1)).await;
        self.control.tick().await;
    }

    /// Asserts every line in `lines` is in the metrics scrape.
    fn assert_metrics(&self, lines: &[&str]) {
        let text = fn_lifecycle::metrics::encode(&self.registry).expect("encodes");
        for line in lines {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line:?} missing from\n{text}"
            );
        }
    }

    fn members(&self, group: &str) -> Vec<String> {
        self.shared
            .group(group)
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    fn draining(&self) -> Vec<String> {
        draining(&self.control)
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_provisioning_runs_beside_the_loop_and_its_runner_joins_when_ready() {
    let cp = FakeControlPlane::default();
    *cp.provision_delay.lock().expect("lock") = Some(Duration::from_secs(5));
    let mut h = harness(cp, config());
    h.advertise("lb1", "g", 1);
    let began = Instant::now();
    h.tick().await;
    assert!(
        began.elapsed() <= Duration::from_secs(2),
        "a tick waits for a slow start at most one tick interval: {:?}",
        began.elapsed()
    );
    assert!(
        h.members("g").is_empty(),
        "a runner still starting is not published"
    );
    // Meanwhile another group scales, and the runner coming is not asked for again.
    *h.cp.provision_delay.lock().expect("lock") = None;
    h.advertise("lb1", "g", 1);
    h.advertise("lb2", "other", 1);
    h.tick().await;
    assert_eq!(h.members("other").len(), 1, "the other group did not wait");
    assert!(h.members("g").is_empty());
    for _ in 0..4 {
        h.advertise("lb1", "g", 1);
        h.advertise("lb2", "other", 1);
        h.tick().await;
    }
    assert_eq!(h.members("g"), vec!["r1"], "joined once ready");
    assert_eq!(h.cp.batches(), vec![1, 1], "one runner asked for per group");
}

/// Each runner of a batch joins once it is ready, not once the slowest of its batch is: a
/// runner the control plane lists (it answers) is published at the next tick while another
/// of its batch still starts. The npm held every runner created after the oldest batch under
/// way until that batch came back (up to the start timeout, 15 to 30 s), comparing wall
/// clocks to tell.
/// A group `g` with demand for two runners whose batch's runners are ready 10 s apart,
/// ticked until the first is published; with when the demand began.
async fn first_of_a_staggered_batch_published() -> (Harness, Instant) {
    let cp = FakeControlPlane::default();
    *cp.provision_stagger.lock().expect("lock") = Some(Duration::from_secs(10));
    let mut h = harness(cp, config());
    let asked = Instant::now();
    while h.members("g").is_empty() {
        assert!(asked.elapsed() < Duration::from_secs(40), "never published");
        h.advertise("lb1", "g", 2);
        h.tick().await;
    }
    (h, asked)
}

#[tokio::test(start_paused = true)]
async fn a_runner_ready_before_the_rest_of_its_batch_joins_at_once() {
    let (mut h, asked) = first_of_a_staggered_batch_published().await;
    assert_eq!(
        h.members("g"),
        vec!["r1"],
        "the first runner (ready after 10 s) waited for the second (20 s): {:?}",
        asked.elapsed()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "{:?}",
        asked.elapsed()
    );
    while h.members("g").len() < 2 {
        assert!(
            asked.elapsed() < Duration::from_secs(40),
            "the second never joined"
        );
        h.advertise("lb1", "g", 2);
        h.tick().await;
    }
    assert_eq!(h.members("g"), vec!["r1", "r2"]);
    assert_eq!(h.cp.batches(), vec![2], "nothing asked for twice meanwhile");
}

/// A runner that joined before its batch came back counts as active, and no longer as
/// coming: the group is asked for what it still lacks. Counted twice, it was asked for one
/// fewer until its batch came back.
#[tokio::test(start_paused = true)]
async fn a_runner_that_joined_early_is_not_counted_as_coming_too() {
    let (mut h, asked) = first_of_a_staggered_batch_published().await;
    assert_eq!(h.members("g"), vec!["r1"]);
    // Demand for four now: one active, one coming, two to ask for (a batch's most).
    h.advertise("lb1", "g", 4);
    h.tick().await;
    assert_eq!(h.cp.batches(), vec![2, 2], "asked for what the group lacks");
    while h.members("g").len() < 4 {
        assert!(
            asked.elapsed() < Duration::from_secs(90),
            "{:?}",
            h.members("g")
        );
        h.advertise("lb1", "g", 4);
        h.tick().await;
    }
    assert_eq!(
        h.cp.provisioned(),
        4,
        "none asked for twice: {:?}",
        h.cp.batches()
    );
}

#[tokio::test(start_paused = true)]
async fn scales_up_in_bounded_batches() {
    let mut h = harness(FakeControlPlane::default(), config());
    h.advertise("lb1", "g", 5);
    h.tick().await;
    assert_eq!(h.members("g").len(), 2, "first batch");
    h.advertise("lb1", "g", 5);
    h.tick().await;
    assert_eq!(h.members("g").len(), 4);
    h.advertise("lb1", "g", 5);
    h.tick().await;
    assert_eq!(
        h.members("g"),
        vec!["r1", "r2", "r3", "r4", "r5"],
        "oldest first"
    );
    let batches = h.cp.batches();
    assert!(batches.iter().all(|n| *n <= 2), "{batches:?}");
    assert_eq!(h.cp.provisioned(), 5);
    h.assert_metrics(&[
        "fn_npm_runners{lb_group=\"g\",state=\"active\"} 5",
        "fn_npm_runners{lb_group=\"g\",state=\"draining\"} 0",
        &format!("fn_npm_wanted_mb{{lb_group=\"g\"}} {}", 5 * RUNNER_MB),
        "fn_npm_lbs{lb_group=\"g\"} 1",
        "fn_npm_provisions_total{result=\"ok\"} 5",
    ]);
}

#[tokio::test(start_paused = true)]
async fn scales_down_newest_first_after_the_window_and_removes_drained() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 3);
    // Demand falls to one runner; inside the window nothing drains.
    for _ in 0..5 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert!(h.draining().is_empty());
    for _ in 0..7 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(
        h.members("g"),
        vec!["r1"],
        "the newest left the list at once"
    );
    // Drained runners (no calls in flight) are removed after the settle time.
    for _ in 0..3 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    let mut removed = h.cp.removed();
    removed.sort();
    assert_eq!(removed, vec!["r2", "r3"]);
    h.assert_metrics(&[
        "fn_npm_runners{lb_group=\"g\",state=\"active\"} 1",
        "fn_npm_runners{lb_group=\"g\",state=\"draining\"} 0",
        "fn_npm_removals_total 2",
    ]);
}

#[tokio::test(start_paused = true)]
async fn draining_runners_are_reactivated_newest_first_before_provisioning() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
    }
    // Keep them busy so they stay draining.
    for id in ["r1", "r2", "r3"] {
        h.probe.set(id, 1);
    }
    for _ in 0..12 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    let mut draining = h.draining();
    draining.sort();
    assert_eq!(draining, vec!["r2", "r3"]);
    let provisioned_before = h.cp.provisioned();

    h.advertise("lb1", "g", 2);
    h.tick().await;
    assert_eq!(
        h.members("g"),
        vec!["r1", "r3"],
        "the newest draining runner came back"
    );
    h.advertise("lb1", "g", 3);
    h.tick().await;
    assert_eq!(
        h.members("g"),
        vec!["r1", "r3", "r2"],
        "a runner that joins the list is appended"
    );
    assert_eq!(
        h.cp.provisioned(),
        provisioned_before,
        "no new runners asked for"
    );
}

#[tokio::test(start_paused = true)]
async fn busy_draining_runner_is_removed_after_the_maximum_drain_time() {
    let mut cfg = config();
    cfg.max_drain_time = Duration::from_secs(20);
    let mut h = harness(FakeControlPlane::default(), cfg);
    h.advertise("lb1", "g", 1);
    h.tick().await;
    h.probe.set("r1", 3);
    for _ in 0..15 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    assert_eq!(h.draining(), vec!["r1"]);
    assert!(h.cp.removed().is_empty(), "still has calls in flight");
    for _ in 0..21 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    assert_eq!(h.cp.removed(), vec!["r1"]);
}

/// A draining runner whose status never comes holds neither the tick nor the other drains:
/// probes run together, each bounded, and the wedged runner is asked again next tick.
#[tokio::test(start_paused = true)]
async fn a_draining_runner_that_does_not_answer_holds_up_neither_the_tick_nor_the_others() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 4);
        h.tick().await;
    }
    for id in ["r2", "r3", "r4"] {
        h.probe.wedge(id);
    }
    // All four drain after the window; each tick past the settle time probes them.
    for _ in 0..16 {
        h.advertise("lb1", "g", 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(3), h.control.tick())
            .await
            .expect("a tick is not held up by runners that do not answer");
        assert!(started.elapsed() <= Duration::from_millis(2100));
    }
    assert_eq!(h.cp.removed(), ["r1"]);
    let mut draining = h.draining();
    draining.sort();
    assert_eq!(draining, ["r2", "r3", "r4"], "asked again each tick");
}

#[tokio::test(start_paused = true)]
async fn a_silent_lb_is_purged_with_its_demand() {
    let mut cfg = config();
    cfg.scale_down_delay = Duration::from_secs(1);
    let mut h = harness(FakeControlPlane::default(), cfg);
    for _ in 0..2 {
        h.advertise("lb1", "g", 1);
        h.advertise("lb2", "g", 2);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 3);
    // lb2 goes silent; lb1 keeps advertising.
    for _ in 0..8 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 1, "lb2's demand left with it");
    h.assert_metrics(&["fn_npm_lbs_purged_total 1", "fn_npm_lbs{lb_group=\"g\"} 1"]);
}

#[tokio::test(start_paused = true)]
async fn a_runner_the_control_plane_no_longer_lists_is_dropped() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 2);
        h.tick().await;
    }
    assert_eq!(h.members("g"), vec!["r1", "r2"]);
    h.cp.vanish("r1");
    // Still wanted: the loop drops r1 and provisions a replacement.
    h.advertise("lb1", "g", 2);
    h.tick().await;
    assert_eq!(h.members("g"), vec!["r2", "r3"]);
}

/// A runner that leaves from the middle of its group's list (here: gone from the control
/// plane, as after a crash) gets the group's last runner in its place, and its replacement
/// is appended: the LBs' consistent hashing then moves the functions of two runners, not
/// those of every runner after it.
#[tokio::test(start_paused = true)]
async fn a_runner_leaving_from_the_middle_gets_the_last_in_its_place() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 4);
        h.tick().await;
    }
    assert_eq!(h.members("g"), ["r1", "r2", "r3", "r4"]);
    h.cp.vanish("r2");
    h.advertise("lb1", "g", 4);
    h.tick().await;
    assert_eq!(h.members("g"), ["r1", "r4", "r3", "r5"]);
    // The list is the npm's state, not a sort: later ticks keep it.
    h.advertise("lb1", "g", 4);
    h.tick().await;
    assert_eq!(h.members("g"), ["r1", "r4", "r3", "r5"]);
}

/// A scale-down drains the runners at the end of the group's list, which is not always the
/// newest: draining the newest from the middle would move the last one into its place, and
/// the functions of two runners with it.
#[tokio::test(start_paused = true)]
async fn a_scale_down_drains_the_end_of_the_list() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..2 {
        h.advertise("lb1", "g", 4);
        h.tick().await;
    }
    h.cp.vanish("r1");
    h.advertise("lb1", "g", 4);
    h.tick().await;
    assert_eq!(h.members("g"), ["r4", "r2", "r3", "r5"]);
    // Demand for three from now on: past the window one runner drains.
    for _ in 0..12 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
    }
    assert_eq!(h.members("g"), ["r4", "r2", "r3"]);
    // Two more: r4, the newest left, is not at the end of the list, and stays.
    for _ in 0..12 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(h.members("g"), ["r4"]);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_npm_adopts_running_runners_and_provisions_none() {
    let mut h = harness(FakeControlPlane::with_runners("g", 3), config());
    h.advertise("lb1", "g", 3);
    h.tick().await;
    assert_eq!(h.members("g"), vec!["r1", "r2", "r3"]);
    assert_eq!(h.cp.provisioned(), 0);
}

#[tokio::test(start_paused = true)]
async fn oscillating_demand_inside_the_window_does_not_flap() {
    let mut h = harness(FakeControlPlane::default(), config());
    for i in 0..30 {
        let runners = if i % 2 == 0 { 4 } else { 0 };
        h.advertise("lb1", "g", runners);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 4);
    assert!(h.draining().is_empty());
    assert!(h.cp.removed().is_empty());
    assert_eq!(h.cp.provisioned(), 4);
}

#[tokio::test(start_paused = true)]
async fn min_and_max_runners_bound_the_group() {
    let mut cfg = config();
    cfg.min_runners = 1;
    cfg.max_runners = 3;
    cfg.provision_batch = 10;
    let mut h = harness(FakeControlPlane::default(), cfg);
    h.tick().await;
    assert_eq!(h.members("default").len(), 1, "min runners without demand");
    h.advertise("lb1", "g", 8);
    h.tick().await;
    assert_eq!(h.members("g").len(), 3, "capped at max");
}

/// A group an LB named once (at zero demand) keeps the minimum only for the retention: then
/// its runner drains and goes, and the group is forgotten with its figures. `default` keeps
/// its minimum, and a group an LB keeps advertising keeps its own.
#[tokio::test(start_paused = true)]
async fn a_group_no_lb_advertises_for_the_retention_keeps_no_minimum_and_is_forgotten() {
    let mut cfg = config();
    cfg.min_runners = 1;
    cfg.group_retention = Duration::from_secs(30);
    let mut h = harness(FakeControlPlane::default(), cfg);
    h.advertise("lb1", "bogus", 0);
    h.tick().await;
    for _ in 0..29 {
        h.advertise("lb1", "busy", 1);
        h.tick().await;
    }
    assert_eq!(
        h.members("bogus").len(),
        1,
        "retained: it keeps the minimum"
    );
    for _ in 0..20 {
        h.advertise("lb1", "busy", 1);
        h.tick().await;
    }
    assert!(h.members("bogus").is_empty());
    assert_eq!(h.members("default").len(), 1);
    assert_eq!(h.members("busy").len(), 1);
    assert_eq!(
        h.cp.removed().len(),
        1,
        "the bogus group's runner is removed"
    );
    let text = fn_lifecycle::metrics::encode(&h.registry).expect("encodes");
    assert!(
        !text.contains("bogus"),
        "figures of a forgotten group:\n{text}"
    );
    h.assert_metrics(&["fn_npm_runners{lb_group=\"busy\",state=\"active\"} 1"]);
}

/// Demand in many groups gets no more runners in all than `max_total_runners`: the groups
/// first in order get room first, and a group gets what others leave when they drain.
#[tokio::test(start_paused = true)]
async fn the_total_cap_bounds_runners_across_groups() {
    let mut cfg = config();
    cfg.max_total_runners = 5;
    cfg.provision_batch = 10;
    let mut h = harness(FakeControlPlane::default(), cfg);
    let huge: Vec<(String, u64)> = (0..50).map(|i| (format!("g{i:02}"), u64::MAX)).collect();
    for _ in 0..3 {
        h.shared
            .record_advert("lb1", huge.clone(), Instant::now())
            .expect("recorded");
        h.tick().await;
    }
    assert_eq!(h.cp.provisioned(), 5, "{:?}", h.cp.batches());
    assert_eq!(h.members("g00").len(), 5, "the first group gets the room");
    // The demand moves to one other group: it gets the runners g00 gives up.
    for _ in 0..16 {
        h.advertise("lb1", "g07", 2);
        h.tick().await;
    }
    assert!(h.members("g00").is_empty());
    assert_eq!(h.members("g07").len(), 2);
    assert!(h.cp.provisioned() <= 7);
}

/// An LB whose adverts keep raising its demand (0, 1, 0, 1, ...) wakes the loop each time,
/// but ticks (each a control-plane list) stay at least 200 ms apart; a first rise is still
/// acted on at once.
#[tokio::test(start_paused = true)]
async fn adverts_that_keep_raising_demand_do_not_run_ticks_back_to_back() {
    let cp = Arc::new(FakeControlPlane::default());
    let (shared, cancel, loop_task) = running_loop(&cp);
    // The first tick, at once, and one advert raising demand from zero a second later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = cp.lists();
    shared
        .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
        .expect("recorded");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(cp.lists(), before + 1, "a rise is acted on at once");
    assert_eq!(members(&shared, "g").len(), 1);
    // One second of adverts every 10 ms, each a rise from zero.
    let before = cp.lists();
    for _ in 0..100 {
        shared
            .record_advert("lb1", vec![("g".into(), 0)], Instant::now())
            .expect("recorded");
        shared
            .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
            .expect("recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ticks = cp.lists() - before;
    assert!(ticks <= 6, "{ticks} ticks in one second of rising adverts");
    cancel.cancel();
    loop_task.await.expect("the loop ends").expect("infallible");
}

/// The npm process stopped (SIGSTOP, a long GC-like stall) for longer than the purge
/// interval: when it runs again, the LBs' silence was its own. It keeps their demand and the
/// runners (no drain under load), and only forgets an LB that stays silent afterwards.
#[tokio::test(start_paused = true)]
async fn a_stalled_npm_does_not_take_its_own_silence_for_the_lbs() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..3 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 3);
    // Demand dips for a moment (inside the scale-down window: nothing drains)...
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert_eq!(h.members("g").len(), 3);

    // ...and then 30 s pass without a tick and without an advert reaching the npm. Its
    // last advert is that dip; the demand of the 30 s was never seen.
    tokio::time::advance(Duration::from_secs(30)).await;
    h.control.tick().await;
    assert_eq!(h.members("g").len(), 3, "drained after its own stall");
    assert!(h.draining().is_empty());

    // The LB advertises again: nothing changes.
    for _ in 0..12 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
        assert_eq!(h.members("g").len(), 3);
    }

    // The same stall, but the LB really died meanwhile: it is purged a purge interval after
    // the stall, and the runners drain after the scale-down window.
    tokio::time::advance(Duration::from_secs(30)).await;
    h.control.tick().await;
    assert_eq!(h.members("g").len(), 3);
    for _ in 0..20 {
        h.tick().await;
    }
    assert!(
        h.members("g").is_empty(),
        "a dead LB's demand stays forever"
    );
}

/// A stall shorter than the purge interval, after an LB's usual silence between two adverts,
/// still made the LB look silent for longer than the interval: a stall over half the
/// interval is the npm's own, and the live LB is not purged.
#[tokio::test(start_paused = true)]
async fn a_stall_shorter_than_the_purge_interval_is_the_npms_own_too() {
    let mut h = harness(FakeControlPlane::default(), config());
    for _ in 0..3 {
        h.advertise("lb1", "g", 3);
        h.tick().await;
    }
    assert_eq!(h.members("g").len(), 3);
    // The LB's last advert, then 0.9 s of its usual silence and a tick...
    h.advertise("lb1", "g", 3);
    tokio::time::advance(Duration::from_millis(900)).await;
    h.control.tick().await;
    // ...then 4.5 s without a tick (the purge interval is 5 s): 5.4 s of silence.
    tokio::time::advance(Duration::from_millis(4500)).await;
    h.control.tick().await;
    h.assert_metrics(&["fn_npm_lbs_purged_total 0"]);
    h.advertise("lb1", "g", 3);
    for _ in 0..8 {
        h.tick().await;
        assert_eq!(h.members("g").len(), 3, "drained after the npm's own stall");
        h.advertise("lb1", "g", 3);
    }
}

/// A removal that takes the runner's whole stop grace (a busy runner that overran its
/// drain) runs beside the loop: another group's new demand is served at the next tick, not
/// after the removal; and the slow tick is not taken for the npm's own stall (a dead LB is
/// still purged).
#[tokio::test(start_paused = true)]
async fn a_slow_removal_holds_up_neither_other_groups_nor_the_purge_of_dead_lbs() {
    let mut cfg = config();
    cfg.max_drain_time = Duration::from_secs(5);
    let mut h = harness(FakeControlPlane::default(), cfg);
    h.advertise("lb1", "g", 1);
    h.tick().await;
    h.probe.set("r1", 3);
    *h.cp.remove_delay.lock().expect("lock") = Some(Duration::from_secs(30));
    // Demand for g goes; r1 drains, overruns its drain time, and its removal starts.
    for _ in 0..20 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    assert_eq!(h.draining(), vec!["r1"]);
    assert!(h.cp.removed().is_empty(), "the removal is still under way");

    // Another group's demand, from another LB: served at the next tick.
    h.advertise("lb2", "other", 1);
    let began = Instant::now();
    h.tick().await;
    assert!(
        began.elapsed() <= Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(h.members("other").len(), 1);

    // lb2 dies; lb1 goes on. lb2 is purged after the purge interval, removal or not.
    for _ in 0..8 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    let text = fn_lifecycle::metrics::encode(&h.registry).expect("encodes");
    assert!(text.contains("fn_npm_lbs_purged_total 1\n"), "{text}");

    // The removal ends at last, and is taken in.
    for _ in 0..25 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    assert_eq!(h.cp.removed(), vec!["r1"]);
    assert!(
        !h.draining().contains(&"r1".to_owned()),
        "{:?}",
        h.draining()
    );
}

#[tokio::test(start_paused = true)]
async fn a_runner_whose_removal_has_begun_is_not_reactivated_when_demand_returns() {
    let mut cfg = config();
    cfg.max_drain_time = Duration::from_secs(5);
    let mut h = harness(FakeControlPlane::default(), cfg);
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert_eq!(h.members("g"), vec!["r1"]);
    *h.cp.remove_delay.lock().expect("lock") = Some(Duration::from_secs(30));
    // Demand goes; r1 drains, is idle, and its (slow) removal begins.
    for _ in 0..20 {
        h.advertise("lb1", "g", 0);
        h.tick().await;
    }
    assert_eq!(h.draining(), vec!["r1"]);
    assert!(h.cp.removed().is_empty(), "the removal is still under way");
    let provisioned = h.cp.provisioned();

    // Demand returns while r1 stops: a new runner, not r1 (before: r1 was published again,
    // counted active, and nothing was provisioned until its removal took it away).
    for _ in 0..3 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(h.cp.provisioned(), provisioned + 1);
    assert_eq!(h.members("g"), vec!["r2"]);
}

/// A restarted npm whose control plane keeps no record of the groups (`static`) answers a
/// group it has not relearnt as not known yet, so that an LB keeps its list (before: empty,
/// and every LB dropped every runner until the adverts and a tick assigned them again).
#[tokio::test(start_paused = true)]
async fn after_a_restart_a_group_not_yet_relearnt_is_not_answered_empty() {
    let mut h = harness(FakeControlPlane::default(), config());
    h.tick().await; // loaded: nothing listed, no advert yet
    assert!(
        h.shared.published_group("g").is_none(),
        "g is not known yet: the LB keeps its list"
    );
    h.advertise("lb1", "g", 1);
    h.tick().await;
    let relearnt = h.shared.published_group("g").expect("g has runners again");
    assert_eq!(relearnt.len(), 1);
    assert!(h.shared.published_group("other").is_none());
    // Past the LBs' purge interval and two ticks, a group nobody advertised is empty.
    for _ in 0..7 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    let other = h.shared.published_group("other").expect("answered");
    assert!(other.is_empty());
}

/// A provisioning that keeps failing is asked for again after pauses that double (1 s up
/// to a minute), not at every tick; the first that succeeds ends the pauses.
#[tokio::test(start_paused = true)]
async fn a_provisioning_that_keeps_failing_is_retried_with_growing_pauses() {
    let mut h = harness(FakeControlPlane::default(), config());
    *h.cp.provision_fails.lock().expect("lock") = true;
    let mut asked_at = Vec::new();
    for second in 0..40 {
        h.advertise("lb1", "g", 1);
        let before = h.cp.batches().len();
        h.tick().await;
        if h.cp.batches().len() > before {
            asked_at.push(second);
        }
    }
    // Before: asked at every one of the 40 ticks.
    let gaps: Vec<i32> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(asked_at.len() <= 7, "asked at {asked_at:?}");
    assert!(
        gaps.windows(2).all(|g| g[1] >= g[0]),
        "pauses grow: {gaps:?}"
    );
    assert!(gaps.last().is_some_and(|g| *g >= 8), "{gaps:?}");
    h.assert_metrics(&[&format!(
        "fn_npm_provisions_total{{result=\"failed\"}} {}",
        asked_at.len()
    )]);

    // The control plane recovers: after the pause under way, the group gets its runner.
    *h.cp.provision_fails.lock().expect("lock") = false;
    for _ in 0..70 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(h.members("g"), vec!["r1"]);
}

/// A group whose provisionings kept failing and that was then forgotten (no demand for the
/// retention) starts afresh when it comes back: its runner is asked for at once, not after
/// the pause its failures had reached. Group names come from the network; what the npm
/// kept of each failing group was never let go.
#[tokio::test(start_paused = true)]
async fn a_forgotten_group_leaves_no_provisioning_pause_behind() {
    let mut cfg = config();
    cfg.group_retention = Duration::from_secs(2);
    let mut h = harness(FakeControlPlane::default(), cfg);
    *h.cp.provision_fails.lock().expect("lock") = true;
    for _ in 0..20 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    // Its pause is 16 s by now; the group goes (no demand for the retention).
    for _ in 0..5 {
        h.advertise("lb1", "other", 0);
        h.tick().await;
    }
    *h.cp.provision_fails.lock().expect("lock") = false;
    let before = h.cp.batches().len();
    h.advertise("lb1", "g", 1);
    h.tick().await;
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert!(
        h.cp.batches().len() > before,
        "not asked for: the forgotten group's pause still held"
    );
    assert_eq!(h.members("g").len(), 1);
}

/// LB ids are input from the network: past the cap of live LBs, a new one's adverts are
/// refused (the book, and each tick's work, stay bounded); one already known goes on.
#[tokio::test(start_paused = true)]
async fn adverts_under_more_lb_ids_than_the_cap_are_refused() {
    let shared = Shared::default();
    for i in 0..fn_poolmanager::demand::MAX_LBS {
        shared
            .record_advert(&format!("lb{i}"), vec![("g".into(), 1)], Instant::now())
            .expect("under the cap");
    }
    let refused = shared
        .record_advert("one-more", vec![("g".into(), 1)], Instant::now())
        .expect_err("over the cap");
    assert_eq!(refused, fn_poolmanager::demand::AdvertRefused::TooManyLbs);
    shared
        .record_advert("lb0", vec![("g".into(), 5)], Instant::now())
        .expect("a known LB");
}

/// A provisioning task that panics takes back only what it was asked for: another group's
/// runner still starting goes on counting as coming (not asked for again) and as starting
/// (not published before its provisioning reports it ready).
#[tokio::test(start_paused = true)]
async fn a_provisioning_that_panics_leaves_the_others_counted() {
    let cp = FakeControlPlane::default();
    *cp.provision_delay.lock().expect("lock") = Some(Duration::from_secs(5));
    let mut h = harness(cp, config());
    h.advertise("lb1", "slow", 1);
    h.tick().await;
    assert_eq!(h.cp.provisioned(), 1);
    *h.cp.panics_for.lock().expect("lock") = Some("boom".into());
    h.advertise("lb2", "boom", 1);
    h.tick().await;
    *h.cp.panics_for.lock().expect("lock") = None;
    h.advertise("lb1", "slow", 1);
    h.tick().await;
    assert_eq!(
        h.cp.runners_of("slow"),
        1,
        "the slow group's runner was asked for again: {:?}",
        h.cp.batches()
    );
    assert!(
        h.members("slow").is_empty(),
        "published while still starting: {:?}",
        h.members("slow")
    );
    // The panicked batch counts as failed provisions.
    h.assert_metrics(&["fn_npm_provisions_total{result=\"failed\"} 1"]);
}

/// A control plane whose list never answers (an engine that hangs on `docker ps`) holds a
/// tick for at most the list's bound, and the ticks go on with the runners known: one
/// provisioned meanwhile is published, and nothing known is dropped.
#[tokio::test(start_paused = true)]
async fn a_list_that_hangs_holds_a_tick_only_for_its_bound() {
    let mut h = harness(FakeControlPlane::with_runners("g", 1), config());
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert_eq!(h.members("g"), vec!["r1"]);

    *h.cp.list_hangs.lock().expect("lock") = true;
    let bound = fn_poolmanager::manager::LIST_BOUND + Duration::from_secs(1);
    for _ in 0..3 {
        h.advertise("lb1", "g", 2);
        let started = Instant::now();
        tokio::time::timeout(bound, h.tick())
            .await
            .expect("the tick ends within the list's bound");
        assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
    }
    assert_eq!(h.cp.provisioned(), 1, "the second runner was asked for");
    assert_eq!(h.members("g"), vec!["r1", "r2"]);
}

/// The task of a control loop over `cp` running beside the test.
type LoopTask = tokio::task::JoinHandle<Result<(), std::convert::Infallible>>;

/// A control loop over `cp` running beside the test: its shared state, the token that stops
/// it, and its task.
fn running_loop(
    cp: &Arc<FakeControlPlane>,
) -> (Arc<Shared>, tokio_util::sync::CancellationToken, LoopTask) {
    let shared = Arc::new(Shared::default());
    let control = ControlLoop::new(
        Arc::clone(&shared),
        cp.clone(),
        Arc::new(FakeProbe::default()),
        config(),
        &mut Registry::default(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let loop_task = tokio::spawn(control.run(cancel.clone()));
    (shared, cancel, loop_task)
}

/// A control loop over `cp` running beside the test, with demand for one runner of `g`
/// advertised; returns once the runner's provisioning is under way.
async fn running_with_a_provisioning(
    cp: &Arc<FakeControlPlane>,
) -> (tokio_util::sync::CancellationToken, LoopTask) {
    let (shared, cancel, loop_task) = running_loop(cp);
    shared
        .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
        .expect("recorded");
    while cp.batches().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (cancel, loop_task)
}

/// At the npm's shutdown a provisioning under way is stopped, not dropped, and the control
/// plane's shutdown (which removes the runners) comes only once it has ended: a provisioning
/// dropped inside an engine request made its runner after the shutdown had listed what to
/// remove, and the runner was left behind.
#[tokio::test(start_paused = true)]
async fn at_shutdown_provisionings_stop_before_the_control_plane_removes_its_runners() {
    let cp = Arc::new(FakeControlPlane::default());
    // A runner that takes a minute to come up.
    *cp.provision_delay.lock().expect("lock") = Some(Duration::from_secs(60));
    let (cancel, loop_task) = running_with_a_provisioning(&cp).await;
    assert_eq!(cp.provisionings(), 1);
    let stopping = Instant::now();
    cancel.cancel();
    loop_task.await.expect("the loop ends").expect("infallible");
    assert_eq!(cp.stopped(), 1, "the provisioning was stopped, not dropped");
    assert_eq!(
        cp.provisionings_at_shutdown(),
        Some(0),
        "the control plane's shutdown waited for it"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "stopped at its wait, not after it: {:?}",
        stopping.elapsed()
    );
}

/// A provisioning that does not stop (an engine that never answers the request making its
/// runner) holds the npm's shutdown for the bound only: the control plane's shutdown follows.
#[tokio::test(start_paused = true)]
async fn a_provisioning_that_does_not_stop_holds_the_shutdown_only_for_its_bound() {
    let cp = Arc::new(FakeControlPlane::default());
    *cp.provision_hangs.lock().expect("lock") = true;
    let (cancel, loop_task) = running_with_a_provisioning(&cp).await;
    let stopping = Instant::now();
    cancel.cancel();
    let bound = fn_poolmanager::manager::PROVISIONING_STOP_BOUND;
    tokio::time::timeout(bound * 2, loop_task)
        .await
        .expect("the shutdown ends after the bound")
        .expect("the loop ends")
        .expect("infallible");
    assert!(
        stopping.elapsed() >= bound,
        "it was waited for: {:?}",
        stopping.elapsed()
    );
    assert!(
        cp.provisionings_at_shutdown().is_some(),
        "the control plane's shutdown came"
    );
}

/// At the npm's shutdown a removal under way (its runner given its stop grace to drain) is
/// dropped, not waited for: each control plane leaves a removal cut short for its shutdown
/// to finish. And it is gone before the control plane's shutdown begins: an aborted task
/// ends only when it is next polled, and beside the shutdown it could still act on the
/// runner the shutdown removes.
#[tokio::test(start_paused = true)]
async fn at_shutdown_removals_under_way_end_before_the_control_plane_shuts_down() {
    let cp = Arc::new(FakeControlPlane::default());
    *cp.remove_delay.lock().expect("lock") = Some(Duration::from_secs(60));
    let (shared, cancel, loop_task) = running_loop(&cp);
    shared
        .record_advert("lb1", vec![("g".into(), RUNNER_MB)], Instant::now())
        .expect("recorded");
    // The runner comes; the demand goes; the runner drains and its removal begins.
    tokio::time::timeout(Duration::from_secs(120), async {
        while cp.runners_of("g") == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shared.lb_left("lb1");
        while cp.removals() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a removal began");

    let stopping = Instant::now();
    cancel.cancel();
    loop_task.await.expect("the loop ends").expect("infallible");
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "the removal was waited for: {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        cp.removals_at_shutdown(),
        Some(0),
        "a removal still alive beside the control plane's shutdown"
    );
    assert!(cp.removed().is_empty(), "{:?}", cp.removed());
}

fn stopping(control: &ControlLoop) -> Vec<String> {
    control
        .runner_states()
        .into_iter()
        .filter(|(_, s)| matches!(s, RunnerState::Stopping { .. }))
        .map(|(r, _)| r.id)
        .collect()
}

/// A runner stopped by someone else than the npm (an operator's SIGTERM, `docker stop`)
/// says NOT_SERVING and drains, while the control plane lists it until it has exited: it
/// leaves its group and the LBs' list at once, a replacement is provisioned within a tick
/// (before it exits), it still counts against FN_MAX_TOTAL_RUNNERS until it is gone, and the
/// npm does not remove it. Counted as active, it left a group of one without capacity for
/// its whole drain.
#[tokio::test(start_paused = true)]
async fn a_runner_draining_on_its_own_is_replaced_at_once_and_counts_against_the_total() {
    let mut cfg = config();
    cfg.min_runners = 1;
    cfg.max_total_runners = 2;
    let mut h = harness(FakeControlPlane::with_runners("default", 1), cfg);
    h.tick().await;
    assert_eq!(h.members("default"), ["r1"]);
    assert_eq!(h.probe.watched(), ["r1"], "the runner's health is followed");

    h.probe.say_draining("r1", true);
    h.tick().await;
    assert_eq!(stopping(&h.control), ["r1"]);
    assert_eq!(h.cp.provisioned(), 1, "a replacement at once");
    assert_eq!(
        h.members("default"),
        ["r2"],
        "the draining runner left the LBs' list"
    );
    assert_eq!(h.cp.runners_of("default"), 2, "r1 has not exited yet");

    // Demand for two: r1 still runs, so the total of two leaves no room.
    for _ in 0..5 {
        h.advertise("lb1", "default", 2);
        h.tick().await;
    }
    assert_eq!(h.cp.provisioned(), 1, "{:?}", h.cp.batches());
    assert!(
        h.cp.removed().is_empty(),
        "the npm does not remove it: it exits by itself"
    );
    assert_eq!(h.members("default"), ["r2"]);
    h.assert_metrics(&[
        "fn_npm_runners{lb_group=\"default\",state=\"active\"} 1",
        "fn_npm_runners{lb_group=\"default\",state=\"draining\"} 1",
    ]);

    // It exits: forgotten, and its room goes to the demand.
    h.cp.vanish("r1");
    h.advertise("lb1", "default", 2);
    h.tick().await;
    assert!(!h.probe.watched().contains(&"r1".to_owned()));
    assert_eq!(h.cp.provisioned(), 2);
    assert_eq!(h.members("default"), ["r2", "r3"]);
}

/// A runner that said NOT_SERVING and answers SERVING again (a blip) is active again, in its
/// group and the LBs' list.
#[tokio::test(start_paused = true)]
async fn a_runner_that_serves_again_comes_back() {
    let mut cfg = config();
    cfg.min_runners = 1;
    let mut h = harness(FakeControlPlane::with_runners("default", 1), cfg);
    h.tick().await;
    h.probe.say_draining("r1", true);
    h.tick().await;
    assert_eq!(h.members("default"), ["r2"]);
    h.probe.say_draining("r1", false);
    h.tick().await;
    assert!(stopping(&h.control).is_empty());
    // Active again, it would join the end of the LBs' list; the group's minimum of one
    // drains the end of that list, r1 itself, so the LBs' list does not change.
    assert_eq!(h.members("default"), ["r2"]);
    assert_eq!(h.draining(), ["r1"]);
}

/// A runner that keeps saying NOT_SERVING past the maximum drain time is removed: it would
/// otherwise hold its place under FN_MAX_TOTAL_RUNNERS for ever.
#[tokio::test(start_paused = true)]
async fn a_runner_draining_on_its_own_past_the_maximum_drain_time_is_removed() {
    let mut h = harness(FakeControlPlane::with_runners("g", 1), config());
    h.tick().await;
    h.probe.say_draining("r1", true);
    h.tick().await;
    let r1 = "r1".to_owned();
    for _ in 0..58 {
        h.tick().await;
        assert!(
            !h.cp.removed().contains(&r1),
            "removed before the maximum drain time"
        );
    }
    for _ in 0..3 {
        h.tick().await;
    }
    assert!(h.cp.removed().contains(&r1));
}

/// A runner saying it drains wakes the running loop: the replacement is asked for at once,
/// not at the next tick.
#[tokio::test(start_paused = true)]
async fn a_runner_draining_on_its_own_wakes_the_loop() {
    let cp = Arc::new(FakeControlPlane::with_runners("default", 1));
    let probe = Arc::new(FakeProbe::default());
    let mut cfg = config();
    cfg.min_runners = 1;
    cfg.tick = Duration::from_secs(10);
    let control = ControlLoop::new(
        Arc::new(Shared::default()),
        cp.clone(),
        probe.clone(),
        cfg,
        &mut Registry::default(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let loop_task = tokio::spawn(control.run(cancel.clone()));
    // The first tick, at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cp.provisioned(), 0);
    probe.say_draining("r1", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cp.provisioned(),
        1,
        "provisioned within the least gap between ticks"
    );
    cancel.cancel();
    loop_task.await.expect("the loop ends").expect("infallible");
}

/// A runner the npm drains itself that then says it drains (someone stopped it meanwhile)
/// is not re-activated when demand returns: a replacement is provisioned instead; and the
/// npm's removal of it goes on.
#[tokio::test(start_paused = true)]
async fn a_draining_runner_that_says_it_drains_is_not_reactivated() {
    let mut h = harness(FakeControlPlane::default(), config());
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert_eq!(h.members("g"), ["r1"]);
    // No demand for the window: r1 drains; busy, it is not removed yet.
    h.probe.set("r1", 1);
    for _ in 0..30 {
        h.tick().await;
        if !h.draining().is_empty() {
            break;
        }
    }
    assert_eq!(h.draining(), ["r1"]);
    h.probe.say_draining("r1", true);
    h.advertise("lb1", "g", 1);
    h.tick().await;
    assert_eq!(h.draining(), ["r1"], "still the npm's to remove");
    assert_eq!(h.cp.provisioned(), 2, "a replacement: {:?}", h.cp.batches());
    assert_eq!(h.members("g"), ["r2"]);
    h.probe.set("r1", 0);
    for _ in 0..3 {
        h.advertise("lb1", "g", 1);
        h.tick().await;
    }
    assert_eq!(h.cp.removed(), ["r1"]);
}
