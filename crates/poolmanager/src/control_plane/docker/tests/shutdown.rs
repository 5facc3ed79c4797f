//! The npm's shutdown with provisionings and removals under way, through the control loop
//! and the docker plane over the fake engine (the swarm plane is the same plane over another
//! engine: a service created is what a container created is here).

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::manager::ManagerConfig;

/// A control loop over `cp` running beside the test, with demand for one runner.
fn run_loop(
    cp: Arc<dyn ControlPlane>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let (shared, control) = control_loop(cp, ManagerConfig::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(control.run(cancel.clone()));
    shared
        .record_advert(
            "lb1",
            vec![("g".into(), config().runner_memory_mb)],
            Instant::now(),
        )
        .expect("recorded");
    (cancel, task)
}

/// The engine has taken the request that makes a runner (a container create, a
/// `create_service`) when the npm is told to stop, and makes the runner tens of
/// milliseconds later: the provisioning is not dropped with the request in flight, so the
/// shutdown lists the runner once it is made, and removes it. Dropped, the runner came after
/// the shutdown's list and stayed.
#[tokio::test(start_paused = true)]
async fn a_runner_the_engine_makes_after_the_shutdown_began_is_removed() {
    let engine = Arc::new(FakeEngine::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *engine.held_runs.lock().expect("lock") = Some(Arc::clone(&gate));
    let (cancel, control) = run_loop(Arc::new(control_plane(&engine, true)));
    engine.run_held.notified().await;

    cancel.cancel();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.add_permits(1);
    });
    control.await.expect("the loop ends").expect("infallible");
    // Whatever the engine was still doing is done by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
    assert_eq!(engine.removed.lock().expect("lock").len(), 1);
}

/// A plane over `engine` that sweeps what its runners leave; `keep` is
/// `FN_DOCKER_KEEP_RUNNERS`.
fn plane(engine: &Arc<FakeEngine>, ready: bool, keep: bool) -> DockerControlPlane {
    let mut config = config();
    config.keep_runners = keep;
    DockerControlPlane::with_engine(
        config,
        placement(),
        Arc::clone(engine) as Arc<dyn Engine>,
        Arc::new(FakeReady {
            ready: AtomicBool::new(ready),
        }),
    )
    .with_function_engine(Arc::clone(engine) as _)
}

/// A provisioning waiting for its runner to answer health stops at once when cancelled (it
/// would wait out the start timeout, 30 s, past the npm's shutdown bound), and removes the
/// runners it made, even where the shutdown keeps the others (`FN_DOCKER_KEEP_RUNNERS`):
/// left there, a runner that never answered health was listed by the next npm as a ready
/// one, and given to the LBs.
#[tokio::test(start_paused = true)]
async fn a_provisioning_cancelled_while_waiting_for_health_removes_its_runners() {
    let engine = Arc::new(FakeEngine::default());
    let cp = Arc::new(plane(&engine, false, true));
    let cancel = CancellationToken::new();
    let provisioning = tokio::spawn({
        let (cp, cancel) = (Arc::clone(&cp), cancel.clone());
        async move { cp.provision("g", 2, &cancel).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let starting = engine.names();
    assert_eq!(starting.len(), 2, "both runners are starting");

    let stopping = Instant::now();
    cancel.cancel();
    let result = provisioning.await.expect("task");
    assert!(
        matches!(result, Err(ControlPlaneError::Cancelled)),
        "{result:?}"
    );
    assert!(
        stopping.elapsed() < Duration::from_millis(100),
        "{:?}",
        stopping.elapsed()
    );
    cp.shutdown().await;
    let next = plane(&engine, true, true);
    let adopted = next.list().await.expect("lists");
    assert!(adopted.is_empty(), "the next npm adopted {adopted:?}");
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );
    let mut removed = engine.removed.lock().expect("lock").clone();
    removed.sort();
    let mut made = starting;
    made.sort();
    assert_eq!(removed, made, "removed by their provisioning");

    // Asked for after the cancellation, no runner is made.
    let result = cp.provision("g", 1, &cancel).await;
    assert!(
        matches!(result, Err(ControlPlaneError::Cancelled)),
        "{result:?}"
    );
    assert!(engine.names().is_empty());
}

/// A removal cut short (the control loop drops its removals under way when the npm stops)
/// after its runner stopped, while it removes the function containers the runner left,
/// leaves nothing for good: the runner container is still there, stopped, and whoever
/// lists it next removes what it left: the shutdown, or, with the runners kept, the next
/// npm. A removal that took the runner container first left its function containers to
/// nobody.
#[tokio::test(start_paused = true)]
async fn a_removal_cut_short_leaves_no_function_container_behind() {
    for keep in [false, true] {
        let engine = Arc::new(FakeEngine::default());
        let cp = plane(&engine, true, keep);
        let runner = runner_with_a_function(&cp, &engine, "g").await;
        engine.function_removal_hangs.store(true, Ordering::SeqCst);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), cp.remove(&runner))
                .await
                .is_err(),
            "the removal is cut short"
        );
        engine.function_removal_hangs.store(false, Ordering::SeqCst);
        cp.shutdown().await;
        if keep {
            let next = plane(&engine, true, true);
            let adopted = next.list().await.expect("lists");
            assert!(adopted.is_empty(), "the next npm adopted {adopted:?}");
        }
        assert!(
            engine.names().is_empty(),
            "runners kept: {keep}; left behind: {:?}",
            engine.names()
        );
    }
}

/// While a removal sweeps what its stopped runner left, a tick's list leaves the runner to
/// it (it is not an exited runner to warn of and remove a second time).
#[tokio::test(start_paused = true)]
async fn a_runner_being_removed_is_its_removals_not_lists() {
    let engine = Arc::new(FakeEngine::default());
    let cp = Arc::new(plane(&engine, true, false));
    let runner = runner_with_a_function(&cp, &engine, "g").await;
    engine.function_removal_hangs.store(true, Ordering::SeqCst);
    let removal = tokio::spawn({
        let (cp, runner) = (Arc::clone(&cp), runner.clone());
        async move { cp.remove(&runner).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = tokio::time::timeout(Duration::from_secs(1), cp.list())
        .await
        .expect("the list does not sweep in the removal's stead")
        .expect("lists");
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(engine.names().len(), 2, "{:?}", engine.names());
    assert!(engine.removed.lock().expect("lock").is_empty());
    removal.abort();
}

/// Under swarm, an engine that cannot say at the npm's shutdown whether the npm's own
/// service is still there (a manager electing a leader, or timing out) is asked again a
/// few times, within the runners' stop grace at shutdown: what it then says decides; still
/// unsure, or silent, the runners stay. Removed on an error, as if the stack were going,
/// every call was cut and every group started from zero at a rolling update of the npm.
#[tokio::test(start_paused = true)]
async fn an_npm_unsure_whether_its_service_stays_asks_again_then_keeps_its_runners() {
    let grace = config().shutdown_grace;
    // (scripted answers, hangs, runners left, checks made)
    let cases: [(&[Option<bool>], bool, usize, usize); 5] = [
        (&[None, None, Some(false)], false, 0, 3),
        (&[None, Some(true)], false, 2, 2),
        (&[None, None, None, None, Some(false)], false, 2, 4),
        (&[], true, 2, 1),
        (&[Some(false)], false, 0, 1),
    ];
    for (answers, hangs, left, checks) in cases {
        let engine = Arc::new(FakeEngine::default());
        *engine.service_answers.lock().expect("lock") = answers.iter().copied().collect();
        engine.service_hangs.store(hangs, Ordering::SeqCst);
        let cp = control_plane(&engine, true).with_own_service(Some("npm-service-id".into()));
        cp.provision("default", 2, &CancellationToken::new())
            .await
            .expect("provisioned");
        let stopping = Instant::now();
        cp.shutdown().await;
        let took = stopping.elapsed();
        let case = format!("answers {answers:?}, hangs: {hangs}");
        assert_eq!(engine.names().len(), left, "{case}");
        assert_eq!(
            engine.service_checks.load(Ordering::SeqCst),
            checks,
            "{case}"
        );
        assert!(took <= grace, "{case}: took {took:?}");
    }
}
