//! Which running runner containers the docker plane lists: those it has seen answer health
//! without asking again, the others (kept by an npm before it, one whose removal was cut
//! short while it drained, one whose npm stopped before it answered) once they answer, and
//! one that stays silent past the bound is removed.

use std::time::Duration;

use super::*;

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

/// A running runner that never answers (a draining one that does not exit, one stuck
/// starting when its npm was killed) is left for the start timeout or the stop grace,
/// whichever is longer, then killed and removed, with what it left.
#[tokio::test(start_paused = true)]
async fn a_running_runner_silent_past_the_bound_is_removed() {
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
