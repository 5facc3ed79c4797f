//! Which running runner containers the docker plane lists: those it has seen answer health
//! without asking again; the others (kept by an npm before it, one whose removal was cut
//! short while it drained, one whose npm stopped before it answered) by what they answer:
//! SERVING, listed from then on; no answer, listed all the same and never killed for it;
//! NOT_SERVING, held out, counted against the bound on all runners, their groups keeping
//! their minimum, and removed once held out past the bound. Their warnings, and the
//! removals a list makes.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::manager::ManagerConfig;

/// A plane over `engine` whose probe is `health` and that sweeps what its runners leave;
/// `keep` is `FN_DOCKER_KEEP_RUNNERS`.
fn plane(engine: &Arc<FakeEngine>, health: &Arc<EngineHealth>, keep: bool) -> DockerControlPlane {
    let mut config = config();
    config.keep_runners = keep;
    DockerControlPlane::with_engine(
        config,
        placement(),
        Arc::clone(engine) as Arc<dyn Engine>,
        Arc::clone(health) as Arc<dyn ReadyProbe>,
    )
    .with_function_engine(Arc::clone(engine) as _)
}

/// A function container `runner` started.
fn function_of(engine: &FakeEngine, runner: &str) {
    engine.add(
        &format!("fn-{runner}-1"),
        ContainerState::Running,
        &[(fn_docker::LABEL_RUNNER, runner)],
    );
}

fn set_state(engine: &FakeEngine, name: &str, state: ContainerState) {
    engine
        .lock()
        .iter_mut()
        .find(|(c, _)| c.name == name)
        .expect("container exists")
        .0
        .state = state;
}

fn ids(runners: &[RunnerInfo]) -> Vec<String> {
    let mut ids: Vec<String> = runners.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids
}

/// With `FN_DOCKER_KEEP_RUNNERS`, a removal the npm's shutdown cuts short while its runner
/// drains (the stop waits up to the stop grace) leaves the runner running, NOT_SERVING:
/// the next npm does not give it to the LBs, and once it exits removes it and what it
/// left. Before, the next npm listed it as a ready runner.
#[tokio::test(start_paused = true)]
async fn a_runner_whose_removal_was_cut_short_while_it_drained_is_not_adopted() {
    let engine = Arc::new(FakeEngine::default());
    let cp = plane(&engine, &EngineHealth::new(&engine), true);
    let runner = cp
        .provision("g", 1, &CancellationToken::new())
        .await
        .expect("provisioned")
        .remove(0);
    function_of(&engine, &runner.id);
    engine.stop_drains.store(true, Ordering::SeqCst);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), cp.remove(&runner))
            .await
            .is_err(),
        "the removal is cut short while the runner drains"
    );
    cp.shutdown().await;
    assert_eq!(engine.names().len(), 2, "kept: {:?}", engine.names());

    let next = plane(&engine, &EngineHealth::new(&engine), true);
    let listed = next.list().await.expect("lists");
    assert!(
        listed.is_empty(),
        "the next npm adopted a draining runner: {listed:?}"
    );
    // Drained, it exits: the next list removes it, and what it left.
    set_state(&engine, &runner.id, ContainerState::Stopped);
    assert!(next.list().await.expect("lists").is_empty());
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
}

/// A running runner that answers NOT_SERVING (a draining one that does not exit, one stuck
/// starting when its npm was killed) is kept from the LBs for the start timeout or the stop
/// grace, whichever is longer, then killed and removed, with what it left.
#[tokio::test(start_paused = true)]
async fn a_running_runner_not_serving_past_the_bound_is_removed() {
    let engine = Arc::new(FakeEngine::default());
    let first = plane(&engine, &EngineHealth::new(&engine), true);
    let runner = first
        .provision("g", 1, &CancellationToken::new())
        .await
        .expect("provisioned")
        .remove(0);
    function_of(&engine, &runner.id);
    drop(first);
    engine
        .not_serving
        .lock()
        .expect("lock")
        .insert(runner.id.clone());

    let next = plane(&engine, &EngineHealth::new(&engine), true);
    let bound = config().start_timeout.max(config().stop_grace);
    assert!(next.list().await.expect("lists").is_empty());
    tokio::time::advance(bound - Duration::from_secs(1)).await;
    assert!(next.list().await.expect("lists").is_empty());
    assert_eq!(engine.names().len(), 2, "left within the bound");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(next.list().await.expect("lists").is_empty());
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
    let events = engine.events.lock().expect("lock").clone();
    assert!(
        events.contains(&format!("stop {} 0ns", runner.id)),
        "killed: {events:?}"
    );
}

/// A running runner found silent joins once it answers; a runner seen answering, made by
/// this npm or adopted, is not probed again at each list.
#[tokio::test(start_paused = true)]
async fn a_found_runner_joins_once_it_answers_and_known_ones_are_not_probed_again() {
    let engine = Arc::new(FakeEngine::default());
    let first_health = EngineHealth::new(&engine);
    let first = plane(&engine, &first_health, true);
    let made = first
        .provision("g", 2, &CancellationToken::new())
        .await
        .expect("provisioned");
    let probed = first_health.probes.load(Ordering::SeqCst);
    assert_eq!(ids(&first.list().await.expect("lists")), ids(&made));
    assert_eq!(
        first_health.probes.load(Ordering::SeqCst),
        probed,
        "its own runners answered when they were made"
    );
    drop(first);
    // One is still starting when its npm goes.
    let late = made[1].id.clone();
    engine
        .not_serving
        .lock()
        .expect("lock")
        .insert(late.clone());

    let health = EngineHealth::new(&engine);
    let next = plane(&engine, &health, true);
    assert_eq!(
        ids(&next.list().await.expect("lists")),
        vec![made[0].id.clone()]
    );
    assert_eq!(health.probes.load(Ordering::SeqCst), 2);
    engine.not_serving.lock().expect("lock").remove(&late);
    assert_eq!(ids(&next.list().await.expect("lists")), ids(&made));
    assert_eq!(
        health.probes.load(Ordering::SeqCst),
        3,
        "only the one not seen answering"
    );
    assert_eq!(ids(&next.list().await.expect("lists")), ids(&made));
    assert_eq!(health.probes.load(Ordering::SeqCst), 3, "none");
}

/// The runner a first npm made, kept for the next one, which starts with nothing known.
async fn kept_runner(engine: &Arc<FakeEngine>) -> RunnerInfo {
    let first = plane(engine, &EngineHealth::new(engine), true);
    let runner = first
        .provision("g", 1, &CancellationToken::new())
        .await
        .expect("provisioned")
        .remove(0);
    function_of(engine, &runner.id);
    drop(first);
    runner
}

fn bound() -> Duration {
    config().start_timeout.max(config().stop_grace)
}

fn killed(engine: &FakeEngine, runner: &RunnerInfo) -> bool {
    let kill = format!("stop {} 0ns", runner.id);
    engine.events.lock().expect("lock").contains(&kill)
}

/// An npm restarted while it cannot reach its runners (a network fault, a certificate
/// problem) lists those the LBs may still reach, as before it probed them, and never kills
/// one for not answering. Before, each was hidden from the LBs and killed after the bound.
#[tokio::test(start_paused = true)]
async fn a_runner_the_npm_cannot_reach_is_listed_and_never_killed() {
    let engine = Arc::new(FakeEngine::default());
    let runner = kept_runner(&engine).await;
    engine
        .unreachable
        .lock()
        .expect("lock")
        .insert(runner.id.clone());

    let health = EngineHealth::new(&engine);
    let next = plane(&engine, &health, true);
    for _ in 0..3 {
        assert_eq!(
            ids(&next.list().await.expect("lists")),
            vec![runner.id.clone()]
        );
        tokio::time::advance(bound()).await;
    }
    assert_eq!(engine.names().len(), 2, "left: {:?}", engine.names());
    assert!(!killed(&engine, &runner));
    assert_eq!(
        health.probes.load(Ordering::SeqCst),
        3,
        "probed at each list"
    );
    // Reached at last, and SERVING: adopted, not probed again.
    engine.unreachable.lock().expect("lock").clear();
    assert_eq!(ids(&next.list().await.expect("lists")), vec![runner.id]);
    assert_eq!(ids(&next.list().await.expect("lists")).len(), 1);
    assert_eq!(health.probes.load(Ordering::SeqCst), 4);
}

/// A runner listed while it could not be reached that then answers NOT_SERVING (it
/// drains) is pulled out of the lists, and the bound starts then, not when it was found:
/// it stays out when it stops answering again (a draining runner does before it exits),
/// and is removed once held out past the bound.
#[tokio::test(start_paused = true)]
async fn a_runner_unreachable_then_not_serving_is_pulled_out_then_removed() {
    let engine = Arc::new(FakeEngine::default());
    let runner = kept_runner(&engine).await;
    let cut_off = |on: bool| {
        let mut unreachable = engine.unreachable.lock().expect("lock");
        if on {
            unreachable.insert(runner.id.clone());
        } else {
            unreachable.remove(&runner.id);
        }
    };
    cut_off(true);
    let next = plane(&engine, &EngineHealth::new(&engine), true);
    assert_eq!(ids(&next.list().await.expect("lists")).len(), 1);
    tokio::time::advance(Duration::from_secs(30)).await;

    cut_off(false);
    engine
        .not_serving
        .lock()
        .expect("lock")
        .insert(runner.id.clone());
    assert!(next.list().await.expect("lists").is_empty(), "pulled out");
    cut_off(true);
    tokio::time::advance(bound() - Duration::from_secs(1)).await;
    assert!(next.list().await.expect("lists").is_empty(), "stays out");
    assert!(!killed(&engine, &runner), "the bound runs from NOT_SERVING");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(next.list().await.expect("lists").is_empty());
    assert!(killed(&engine, &runner));
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
}

/// A runner whose provisioning sees it ready while a list waits for the engine (a swarm's
/// list takes seconds with many services) is not forgotten by that list, whose snapshot
/// was taken before the runner was there: forgotten, it was probed again at the next list,
/// and held out if it did not answer SERVING then.
#[tokio::test(start_paused = true)]
async fn a_runner_made_while_the_engine_lists_stays_known() {
    let engine = Arc::new(FakeEngine::default());
    let health = EngineHealth::new(&engine);
    let cp = Arc::new(plane(&engine, &health, true));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *engine.held_lists.lock().expect("lock") = Some(Arc::clone(&gate));
    let listing = tokio::spawn({
        let cp = Arc::clone(&cp);
        async move { cp.list().await }
    });
    engine.list_held.notified().await;
    let runner = cp
        .provision("g", 1, &CancellationToken::new())
        .await
        .expect("provisioned")
        .remove(0);
    gate.add_permits(1);
    assert!(listing.await.expect("task").expect("lists").is_empty());
    *engine.held_lists.lock().expect("lock") = None;

    // A moment it does not serve (it would be held out if probed now): it is known.
    engine
        .not_serving
        .lock()
        .expect("lock")
        .insert(runner.id.clone());
    let probes = health.probes.load(Ordering::SeqCst);
    assert_eq!(ids(&cp.list().await.expect("lists")), vec![runner.id]);
    assert_eq!(health.probes.load(Ordering::SeqCst), probes, "not probed");
}

/// A runner in its graceful removal (it says NOT_SERVING from its SIGTERM on) is its
/// removal's: a list neither holds it out nor kills it past the bound, whether the removal
/// sweeps what the runner left (docker with a function engine) or is one request (swarm, or
/// no engine given to runners). Before, a listed runner not yet reached by a probe was
/// probed while it drained, held out, and killed in the middle of its drain.
#[tokio::test(start_paused = true)]
async fn a_runner_being_removed_is_not_killed_by_a_list() {
    for sweeps in [true, false] {
        let engine = Arc::new(FakeEngine::default());
        let runner = kept_runner(&engine).await;
        engine
            .unreachable
            .lock()
            .expect("lock")
            .insert(runner.id.clone());
        let health = EngineHealth::new(&engine);
        let next = if sweeps {
            plane(&engine, &health, true)
        } else {
            DockerControlPlane::with_engine(
                config(),
                placement(),
                Arc::clone(&engine) as Arc<dyn Engine>,
                Arc::clone(&health) as Arc<dyn ReadyProbe>,
            )
        };
        let next = Arc::new(next);
        assert_eq!(ids(&next.list().await.expect("lists")).len(), 1);
        engine.unreachable.lock().expect("lock").clear();

        // The removal's request drains for ever, the runner NOT_SERVING meanwhile.
        engine.stop_drains.store(true, Ordering::SeqCst);
        engine.remove_drains.store(true, Ordering::SeqCst);
        let removal = tokio::spawn({
            let next = Arc::clone(&next);
            let runner = runner.clone();
            async move { next.remove(&runner).await }
        });
        tokio::task::yield_now().await;
        for _ in 0..3 {
            assert_eq!(
                ids(&next.list().await.expect("lists")),
                vec![runner.id.clone()],
                "listed as it was while its removal runs (sweeps: {sweeps})"
            );
            tokio::time::advance(bound()).await;
        }
        assert!(
            !killed(&engine, &runner),
            "killed in its drain (sweeps: {sweeps})"
        );
        removal.abort();
    }
}

/// Runners held out past the bound are removed together, and a removal that hangs (here
/// in the sweep of what the runner left) does not hold the list past its own bound: the
/// list still answers within the control loop's bound on it. Before, they were removed
/// one after another inside the list, which timed out at every tick. Nor does the next
/// list, which finds them killed (stopped) and removes them as exited runners: before,
/// one after another and unbounded, so that list and every one after it timed out.
#[tokio::test(start_paused = true)]
async fn removals_of_runners_held_out_run_together_within_a_bound() {
    let engine = Arc::new(FakeEngine::default());
    let first = plane(&engine, &EngineHealth::new(&engine), true);
    let made = first
        .provision("g", 2, &CancellationToken::new())
        .await
        .expect("provisioned");
    drop(first);
    for runner in &made {
        function_of(&engine, &runner.id);
        engine
            .not_serving
            .lock()
            .expect("lock")
            .insert(runner.id.clone());
    }
    engine.function_removal_hangs.store(true, Ordering::SeqCst);

    let next = plane(&engine, &EngineHealth::new(&engine), true);
    assert!(next.list().await.expect("lists").is_empty());
    tokio::time::advance(bound() + Duration::from_secs(1)).await;
    let listed = tokio::time::timeout(crate::manager::LIST_BOUND, next.list())
        .await
        .expect("the list answers within its bound");
    assert!(listed.expect("lists").is_empty());
    for runner in &made {
        assert!(killed(&engine, runner), "both removals began");
    }
    let listed = tokio::time::timeout(crate::manager::LIST_BOUND, next.list())
        .await
        .expect("the next list, which finds them stopped, answers within its bound");
    assert!(listed.expect("lists").is_empty());
    let sweeps = |runner: &RunnerInfo| {
        let sweep = format!("remove fn-{}-1", runner.id);
        let events = engine.events.lock().expect("lock");
        events.iter().filter(|e| **e == sweep).count()
    };
    for runner in &made {
        assert_eq!(sweeps(runner), 2, "each list began each removal");
    }
}

/// A runner kept from an npm that stopped, answering NOT_SERVING, and the next npm's plane
/// over the same engine, which holds it out.
async fn a_next_npm_holding_out_a_kept_runner(
    engine: &Arc<FakeEngine>,
) -> (RunnerInfo, Arc<DockerControlPlane>) {
    let held = kept_runner(engine).await;
    engine
        .not_serving
        .lock()
        .expect("lock")
        .insert(held.id.clone());
    let next = Arc::new(plane(engine, &EngineHealth::new(engine), true));
    (held, next)
}

/// A runner held out (it answers NOT_SERVING) still runs, and takes a machine's resources:
/// the control loop counts it against `FN_MAX_TOTAL_RUNNERS`, without giving it to the
/// LBs, so the engine never runs more runner containers than the bound, and the group gets
/// its runner once the held-out one is removed. Before, the loop provisioned beside it at
/// once, and for the 40 s it was held out there was one runner more than the bound.
#[tokio::test(start_paused = true)]
async fn runners_held_out_count_against_the_bound_on_all_runners() {
    let engine = Arc::new(FakeEngine::default());
    let (held, next) = a_next_npm_holding_out_a_kept_runner(&engine).await;
    let (shared, mut control) = control_loop(
        Arc::clone(&next) as Arc<dyn ControlPlane>,
        ManagerConfig {
            max_runners: 1,
            max_total_runners: 1,
            ..ManagerConfig::default()
        },
    );
    let running = || {
        engine
            .lock()
            .iter()
            .filter(|(c, _)| {
                c.state == ContainerState::Running
                    && c.labels.get(LABEL_ROLE).map(String::as_str) == Some("runner")
            })
            .count()
    };
    for second in 0..bound().as_secs() + 5 {
        shared
            .record_advert(
                "lb1",
                vec![("g".into(), config().runner_memory_mb)],
                Instant::now(),
            )
            .expect("recorded");
        control.tick().await;
        assert_eq!(running(), 1, "runner containers at {second} s");
        if second == 0 {
            assert_eq!(next.held_out().len(), 1);
            assert!(shared.group("g").is_empty(), "held out of the LBs' lists");
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(killed(&engine, &held), "held out past the bound");
    assert_eq!(next.held_out().len(), 0);
    let published = shared.group("g");
    assert_eq!(published.len(), 1, "the group got its runner");
    assert_ne!(published[0].id, held.id);
}

/// A runner held out past the bound whose container is gone when its removal comes (removed
/// by hand, or by anything else, between the engine's listing and the removal) is no longer
/// counted held out from that list on: its removal ends finding nothing (the engine's
/// removal of a container gone is no error), so the control loop, which reads the count
/// after the list, has the room at that same tick.
#[tokio::test(start_paused = true)]
async fn a_runner_held_out_found_gone_at_its_removal_is_no_longer_counted() {
    let engine = Arc::new(FakeEngine::default());
    let (held, next) = a_next_npm_holding_out_a_kept_runner(&engine).await;
    assert!(next.list().await.expect("lists").is_empty());
    assert_eq!(next.held_out().len(), 1);
    tokio::time::advance(bound() + Duration::from_secs(1)).await;

    // The engine lists it; it is gone before the list removes it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *engine.held_lists.lock().expect("lock") = Some(Arc::clone(&gate));
    let listing = tokio::spawn({
        let next = Arc::clone(&next);
        async move { next.list().await }
    });
    engine.list_held.notified().await;
    engine.lock().retain(|(c, _)| c.name != held.id);
    gate.add_permits(1);
    assert!(listing.await.expect("task").expect("lists").is_empty());
    assert!(killed(&engine, &held), "its removal came");
    assert_eq!(
        next.held_out().len(),
        0,
        "counted held out after its removal ended"
    );
}

/// A restarted npm keeps the minimum (`FN_MIN_RUNNERS`) of the group of a runner it holds
/// out, as it keeps the minimum of the groups of the runners it lists, though no LB
/// advertises the group (an LB advertises a group only while it has calls for it): the
/// minimum is provisioned in the held-out runner's place, and stays once that runner is
/// killed. Before, the group was not retained: nothing was provisioned for it, and once
/// its held-out runner was killed it had none, and was forgotten.
#[tokio::test(start_paused = true)]
async fn a_restarted_npm_keeps_the_minimum_of_the_group_of_a_runner_it_holds_out() {
    let engine = Arc::new(FakeEngine::default());
    let (held, next) = a_next_npm_holding_out_a_kept_runner(&engine).await;
    let (shared, mut control) = control_loop(
        Arc::clone(&next) as Arc<dyn ControlPlane>,
        ManagerConfig {
            min_runners: 1,
            ..ManagerConfig::default()
        },
    );
    for _ in 0..2 {
        control.tick().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(next.held_out().len(), 1);
    let published = shared.group(&held.group);
    assert_eq!(
        published.len(),
        1,
        "the group's minimum, in the held-out runner's place"
    );
    assert_ne!(published[0].id, held.id);
    for _ in 0..bound().as_secs() + 5 {
        control.tick().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(killed(&engine, &held), "held out past the bound");
    let published = shared.group(&held.group);
    assert_eq!(published.len(), 1, "the group keeps its minimum");
    assert_ne!(published[0].id, held.id);
}

/// Runner containers never started (an npm killed between create and start left them)
/// are removed together with the list's other removals, within their bound: one after
/// another, and unbounded, an engine that does not answer the first removal held that list
/// past the control loop's bound on it, and every list after it.
#[tokio::test(start_paused = true)]
async fn runner_containers_never_started_are_removed_together_within_the_bound() {
    let engine = Arc::new(FakeEngine::default());
    let cp = plane(&engine, &EngineHealth::new(&engine), true);
    let npm_id = placement().npm_id;
    let names = ["stack-backend-runner-a", "stack-backend-runner-b"];
    for name in names {
        engine.add(
            name,
            ContainerState::Created,
            &[
                (LABEL_NPM, npm_id.as_str()),
                (LABEL_ROLE, "runner"),
                (LABEL_GROUP, "g"),
                (LABEL_CREATED, "0"),
                (LABEL_PORT, "9190"),
            ],
        );
    }
    engine.created_removal_hangs.store(true, Ordering::SeqCst);
    let listed = tokio::time::timeout(crate::manager::LIST_BOUND, cp.list())
        .await
        .expect("the list answers within its bound");
    assert!(listed.expect("lists").is_empty());
    let events = engine.events.lock().expect("lock").clone();
    for name in names {
        assert!(
            events.contains(&format!("remove {name}")),
            "both removals began: {events:?}"
        );
    }
    // The engine answers again: the next list finishes.
    engine.created_removal_hangs.store(false, Ordering::SeqCst);
    assert!(cp.list().await.expect("lists").is_empty());
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
}

/// What the plane logs at WARN and above, as text.
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Logs to this until the guard is dropped (on this thread: the tests' runtime).
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let out = self.clone();
        fn_test_support::logs::scoped_subscriber(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .with_writer(move || out.clone())
                .finish(),
        )
    }

    /// The lines that name `runner` and say `what`.
    fn count(&self, runner: &RunnerInfo, what: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned();
        let named = format!("runner={} ", runner.id);
        text.lines()
            .filter(|l| l.contains(&named) && l.contains(what))
            .count()
    }
}

/// Each runner's warnings repeat at most once a minute, on their own: a second runner
/// that does not answer gets its repeats as the first does. Before, one throttle over all
/// runners let the first runner's repeat through and held back the second's.
#[tokio::test(start_paused = true)]
async fn each_runners_warnings_repeat_once_a_minute_of_their_own() {
    let captured = Captured::default();
    let _log = captured.install();
    let engine = Arc::new(FakeEngine::default());
    let first = plane(&engine, &EngineHealth::new(&engine), true);
    let made = first
        .provision("g", 2, &CancellationToken::new())
        .await
        .expect("provisioned");
    drop(first);
    for runner in &made {
        engine
            .unreachable
            .lock()
            .expect("lock")
            .insert(runner.id.clone());
    }
    let next = plane(&engine, &EngineHealth::new(&engine), true);
    let repeats = |runner| captured.count(runner, "still does not answer");
    assert_eq!(next.list().await.expect("lists").len(), 2);
    for runner in &made {
        assert_eq!(
            captured.count(runner, "does not answer its health probe"),
            1
        );
        assert_eq!(repeats(runner), 0, "the first warning only");
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(next.list().await.expect("lists").len(), 2);
    for runner in &made {
        assert_eq!(repeats(runner), 1, "each runner's repeat comes");
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(next.list().await.expect("lists").len(), 2);
    for runner in &made {
        assert_eq!(repeats(runner), 1, "held back within a minute of the last");
    }
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(next.list().await.expect("lists").len(), 2);
    for runner in &made {
        assert_eq!(repeats(runner), 2);
        assert_eq!(
            captured.count(runner, "held_back=1"),
            1,
            "with the one held back"
        );
    }
}
