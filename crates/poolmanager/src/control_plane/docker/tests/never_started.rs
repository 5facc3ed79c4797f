//! Runner containers created and never started (an npm killed between create and start left
//! them): removed once twice the start timeout old, by their created label or by how long
//! this npm has seen them so.

use std::time::Duration;

use super::*;

/// A runner container never started whose created label is a year ahead of the npm's wall
/// clock (the clock stepped back since it was made: NTP, a VM restored) is removed once the
/// npm has seen it for more than twice the start timeout, not at its first sight. Timed by
/// its label alone, it never looked old, and stayed until the wall clock caught up.
#[tokio::test(start_paused = true)]
async fn a_runner_never_started_labelled_in_the_future_goes_at_twice_the_start_timeout() {
    let engine = Arc::new(FakeEngine::default());
    let cp = control_plane(&engine, true);
    let bound = config().start_timeout * 2;
    let a_year_ahead = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
    let created_ms = a_year_ahead
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis()
        .to_string();
    let npm_id = placement().npm_id;
    let name = "stack-backend-runner-ahead";
    engine.add(
        name,
        ContainerState::Created,
        &[
            (LABEL_NPM, npm_id.as_str()),
            (LABEL_ROLE, "runner"),
            (LABEL_GROUP, "g"),
            (LABEL_CREATED, created_ms.as_str()),
            (LABEL_PORT, "9190"),
        ],
    );
    assert!(cp.list().await.expect("lists").is_empty());
    assert_eq!(
        engine.names(),
        vec![name.to_owned()],
        "kept at its first sight"
    );
    tokio::time::advance(bound).await;
    cp.list().await.expect("lists");
    assert_eq!(
        engine.names(),
        vec![name.to_owned()],
        "kept while seen for twice the start timeout"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    cp.list().await.expect("lists");
    assert!(
        engine.names().is_empty(),
        "left behind {:?} after {:?} seen",
        engine.names(),
        bound + Duration::from_secs(1)
    );
    assert_eq!(
        *engine.removed.lock().expect("removed lock"),
        vec![name.to_owned()]
    );
}
