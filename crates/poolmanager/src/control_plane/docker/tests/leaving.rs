//! A runner removed that still runs (a swarm service deleted, whose task drains on its node
//! after the deletion has returned) counts against `FN_MAX_TOTAL_RUNNERS` until it stops,
//! or until the runners' stop grace has passed since the plane first saw it so (its node
//! has killed it by then, or is lost).

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::manager::ManagerConfig;

/// At the bound on all runners (1), a group asking for a runner gets none while a runner
/// removed still drains: once its task has stopped (10 s in), or, when its node is lost and
/// Swarm keeps reporting it running, once the stop grace (40 s) has passed. Before, the
/// group got its runner at once, one beside the bound for as long as the other drained.
#[tokio::test(start_paused = true)]
async fn a_removed_runner_still_draining_counts_against_the_bound_on_all_runners() {
    let grace = config().stop_grace;
    let drains_for = 10;
    for lost in [false, true] {
        let engine = Arc::new(FakeEngine::default());
        engine.remove_leaves.store(true, Ordering::SeqCst);
        let cp = Arc::new(control_plane(&engine, true));
        let old = cp
            .provision("old", 1, &CancellationToken::new())
            .await
            .expect("provisioned")
            .remove(0);
        cp.remove(&old).await.expect("removed");
        let (shared, mut control) = control_loop(
            Arc::clone(&cp) as Arc<dyn ControlPlane>,
            ManagerConfig {
                max_runners: 1,
                max_total_runners: 1,
                ..ManagerConfig::default()
            },
        );
        let of_g = || {
            engine
                .lock()
                .iter()
                .filter(|(c, _)| c.labels.get(LABEL_GROUP).map(String::as_str) == Some("g"))
                .count()
        };
        let mut provisioned_at = None;
        for second in 0..grace.as_secs() + 5 {
            shared
                .record_advert(
                    "lb1",
                    vec![("g".into(), config().runner_memory_mb)],
                    Instant::now(),
                )
                .expect("recorded");
            control.tick().await;
            if second == 0 {
                assert_eq!(cp.leaving(), 1, "lost: {lost}");
                assert!(
                    cp.held_out().is_empty(),
                    "not held out: its group is not retained"
                );
            }
            if !lost && second == drains_for {
                // Its task has stopped: Swarm forgets it.
                engine.lock().retain(|(c, _)| c.name != old.id);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            if provisioned_at.is_none() && of_g() > 0 {
                provisioned_at = Some(second);
            }
        }
        let expected = if lost {
            grace.as_secs()
        } else {
            drains_for + 1
        };
        assert_eq!(provisioned_at, Some(expected), "lost: {lost}");
        assert_eq!(of_g(), 1, "lost: {lost}");
    }
}
