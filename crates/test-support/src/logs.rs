//! A test's own log subscriber that sees every event of its thread, whatever the other tests
//! of the binary do ([`scoped_subscriber`]).

use std::sync::Once;

use tracing::Subscriber;
use tracing::subscriber::DefaultGuard;

/// Makes `subscriber` this thread's default until the guard is dropped, for a test that
/// reads what its code logs.
///
/// tracing keeps, per callsite and for the whole process, whether any subscriber wants its
/// events, worked out once, by the first thread to reach it, against that thread's
/// subscriber. A test running beside this one with no subscriber of its own that reached a
/// callsite first pinned it to "never", and the event was not even built on this thread:
/// the test saw no line (one run in about fifteen of the npm's adoption tests, under load).
/// So a global default that takes every event and writes none (a bare registry) is set
/// once, and no thread works interest out against no subscriber; and the cache is worked
/// out again once `subscriber` is in place.
pub fn scoped_subscriber(subscriber: impl Subscriber + Send + Sync + 'static) -> DefaultGuard {
    static ANCHOR: Once = Once::new();
    ANCHOR.call_once(|| {
        // Fails only when the binary set a global default already: that one takes the place.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    guard
}
