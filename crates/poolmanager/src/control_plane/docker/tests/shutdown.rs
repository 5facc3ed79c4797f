//! The npm's shutdown with provisionings under way, through the control loop and the docker
//! plane over the fake engine (the swarm plane is the same plane over another engine: a
//! service created is what a container created is here).

use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::*;
use crate::manager::{ControlLoop, ManagerConfig, RunnerProbe, Shared};

/// Every runner is idle.
#[derive(Debug)]
struct Idle;

impl RunnerProbe for Idle {
    fn calls_in_flight<'a>(
        &'a self,
        _runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async { Ok(0) })
    }
}

/// A control loop over `cp` running beside the test, with demand for one runner.
fn run_loop(
    cp: Arc<dyn ControlPlane>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let shared = Arc::new(Shared::default());
    let control = ControlLoop::new(
        Arc::clone(&shared),
        cp,
        Arc::new(Idle),
        ManagerConfig::default(),
        &mut Registry::default(),
    );
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

/// A provisioning waiting for its runner to answer health stops at once when cancelled (it
/// would wait out the start timeout, 30 s, past the npm's shutdown bound); its runners stay
/// in the engine for the shutdown to remove.
#[tokio::test(start_paused = true)]
async fn a_provisioning_waiting_for_health_stops_and_leaves_its_runner_to_the_shutdown() {
    let engine = Arc::new(FakeEngine::default());
    let cp = Arc::new(control_plane(&engine, false));
    let cancel = CancellationToken::new();
    let provisioning = tokio::spawn({
        let (cp, cancel) = (Arc::clone(&cp), cancel.clone());
        async move { cp.provision("g", 2, &cancel).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(engine.names().len(), 2, "both runners are starting");

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
    assert_eq!(engine.names().len(), 2, "left to the shutdown");
    cp.shutdown().await;
    assert!(
        engine.names().is_empty(),
        "left behind: {:?}",
        engine.names()
    );

    // Asked for after the cancellation, no runner is made.
    let result = cp.provision("g", 1, &cancel).await;
    assert!(
        matches!(result, Err(ControlPlaneError::Cancelled)),
        "{result:?}"
    );
    assert!(engine.names().is_empty());
}
