//! Placement policies for the lb-agent: given a function call and the LB group's runner list, in
//! which order should the runners be asked to take the call?
//!
//! # What this crate owns
//!
//! Pure policy. A [`Placer`] turns a [`PlacementKey`] and a list length `n` into an [`Order`]: a
//! permutation of `0..n`, the runner indices to try during **one pass**. It opens no connections,
//! does no I/O and never blocks. The placement loop (calling runners, backing off between passes,
//! the placer deadline, answering 503) belongs to the lb-agent; [`select`] shows the same walk
//! over an in-memory list so the semantics can be tested without I/O.
//!
//! # The three policies
//!
//! - [`NaivePlacer`] (`FN_PLACER=naive`): round-robin. Every call to [`Placer::order`] starts one
//!   runner further along and walks the list circularly. The key is ignored, so load spreads
//!   evenly, but a function's warm containers are scattered over all runners.
//! - [`ConsistentHashPlacer`] (`FN_PLACER=ch`): the key is hashed with SipHash under fixed keys,
//!   the hash is mapped to a runner index with jump consistent hashing (Lamping & Veach, 2014),
//!   and the walk starts there. The same function lands on the same runner (where its containers
//!   are warm) from every LB, and when a runner is appended only about `1/(n+1)` of the functions
//!   move — all of them to the new runner.
//! - [`WarmPlacer`] (`FN_PLACER=warm`): the `ch` ring, reordered per call by what the runners
//!   report ([`RunnerView`]): runners with a warm instance of the function first, then runners
//!   with room, skipping runners known to be full or draining, and moving a runner whose load
//!   is over `(1 + ε)` times the mean behind the others (consistent hashing with bounded
//!   loads). With no reports it is `ch`.
//!
//! # A refusal walks to the next index
//!
//! A runner that refuses a call (no capacity, draining, unreachable) is not retried within the
//! pass: the caller moves on to the next index of the [`Order`], i.e. the next runner in the list,
//! wrapping around at the end. After a full pass with no taker the caller backs off and asks for
//! a fresh order.
//!
//! # The list must be identical on every LB
//!
//! Consistent hashing maps a key to an *index*, so two LBs agree on a function's runner only if
//! their lists hold the same runners in the same order. The lb-agent therefore uses the npm's
//! order unchanged, and a runner it cannot reach **keeps its slot** as a placeholder that always
//! refuses, instead of being removed. Removing it would shift every later index and re-home most
//! functions on this LB only. Which value is a placeholder is the caller's business: this crate
//! only ever sees indices, and `select`'s `accept` closure is where a caller skips placeholders.
//! The npm, for its part, appends a runner that joins a group and puts the group's last runner
//! in the place of one that leaves (`fn_poolmanager::order`), the two changes after which jump
//! hashing moves few keys.
//!
//! # Example
//!
//! One pass over a list in which runner 1 is unreachable (a placeholder) and the others are
//! asked in turn; the lb-agent does the same with real calls and repeats passes until its
//! deadline.
//!
//! ```
//! use fn_placement::{PlacementKey, PlacerKind, select};
//!
//! # fn main() -> Result<(), fn_placement::UnknownPlacer> {
//! let placer = "ch".parse::<PlacerKind>()?.build();
//! let runners = [Some("10.0.0.1:9190"), None, Some("10.0.0.3:9190")];
//! let key = PlacementKey::new("billing", "charge-card");
//!
//! let chosen = select(&*placer, &key, &runners, |_idx, runner| match runner {
//!     None => false,                // placeholder: refuse without calling
//!     Some(_addr) => true,          // here the lb-agent would try the call
//! });
//! assert!(matches!(chosen, Some(0 | 2)));
//! # Ok(())
//! # }
//! ```

mod consistent_hash;
mod kind;
mod naive;
mod order;
#[cfg(test)]
mod properties;
mod warm;

use std::fmt;

pub use consistent_hash::{ConsistentHashPlacer, jump_consistent_hash};
pub use kind::{PlacerKind, UnknownPlacer};
pub use naive::NaivePlacer;
pub use order::Order;
pub use warm::{DEFAULT_EPSILON, RunnerLoad, RunnerView, WarmPlacer};

/// A placement policy: the order in which to try the runners for one pass.
///
/// Implementations are shared by all in-flight calls of an LB (`Arc<dyn Placer>`), hence
/// `Send + Sync`; any state they keep (the round-robin counter) must be interior and lock-free.
pub trait Placer: Send + Sync + fmt::Debug {
    /// The runner indices to try for one pass over a list of `n` runners: every index in `0..n`
    /// exactly once (empty for `n == 0`). The first index is the preferred runner; after a
    /// refusal the caller moves to the next.
    fn order(&self, key: &PlacementKey, n: usize) -> Order;

    /// The policy's short name, as accepted by [`PlacerKind`]'s `FromStr` (`naive`, `ch`,
    /// `warm`); for logs and metrics labels.
    fn name(&self) -> &'static str;

    /// Whether [`Placer::rank`] looks at the views: callers gather them only then.
    fn uses_reports(&self) -> bool {
        false
    }

    /// The runner indices to try for one pass, given what is known of each runner
    /// (`views[i]` for runner `i`): each index at most once. Unlike [`Placer::order`], it may
    /// leave out runners known unable to take the call, so it may be empty when every runner
    /// is; the caller then waits for fresher views. The default ignores the views.
    fn rank(&self, key: &PlacementKey, views: &[RunnerView]) -> Vec<usize> {
        self.order(key, views.len()).collect()
    }
}

/// What a call is placed by: the identity of the function being called.
///
/// Built from the app and function names. Hash-based placers hash both names with an unambiguous,
/// platform-independent encoding (see [`ConsistentHashPlacer`]), so `("ab", "c")` and `("a", "bc")`
/// are different keys and every LB derives the same hash from the same names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlacementKey {
    /// The application the function belongs to.
    app: String,
    /// The function's name within the app.
    function: String,
}

impl PlacementKey {
    /// The key of function `function` in application `app`.
    pub fn new(app: impl Into<String>, function: impl Into<String>) -> Self {
        Self {
            app: app.into(),
            function: function.into(),
        }
    }

    /// The application name.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The function name.
    pub fn function(&self) -> &str {
        &self.function
    }
}

impl fmt::Display for PlacementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.function)
    }
}

/// Walks `runners` in `placer`'s order for `key` and returns the index of the first runner that
/// `accept` takes, or `None` if every runner refused during this one pass.
///
/// `accept(index, runner)` is called at most once per runner, in order, and not again after it
/// first returns `true`. It is where a caller tries the runner, and where it refuses
/// placeholders (runners it cannot reach) without trying them: placeholders must stay in
/// `runners` so the other runners' indices, and with them consistent hashing, stay put.
///
/// This is the same walk the lb-agent performs asynchronously; it exists to document and test
/// the semantics without I/O.
pub fn select<R>(
    placer: &dyn Placer,
    key: &PlacementKey,
    runners: &[R],
    mut accept: impl FnMut(usize, &R) -> bool,
) -> Option<usize> {
    placer
        .order(key, runners.len())
        .find(|&idx| runners.get(idx).is_some_and(|runner| accept(idx, runner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner in a test list: either reachable, or a placeholder keeping an unreachable
    /// runner's slot.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fake {
        Up,
        Placeholder,
    }

    fn keys(count: usize) -> impl Iterator<Item = PlacementKey> {
        (0..count).map(|i| PlacementKey::new(format!("app-{}", i % 37), format!("fn-{i}")))
    }

    fn placers() -> Vec<Box<dyn Placer>> {
        vec![
            Box::new(NaivePlacer::new()),
            Box::new(ConsistentHashPlacer::new()),
        ]
    }

    #[test]
    fn select_takes_the_first_runner_that_accepts() {
        let key = PlacementKey::new("app", "fn");
        let runners = [Fake::Up; 5];
        for placer in placers() {
            let first = placer.order(&key, runners.len()).next();
            let mut tried = Vec::new();
            let chosen = select(&*placer, &key, &runners, |idx, _| {
                tried.push(idx);
                true
            });
            assert_eq!(
                tried.len(),
                1,
                "{}: only the first runner is tried",
                placer.name()
            );
            assert_eq!(chosen, tried.first().copied());
            if placer.name() == "ch" {
                // Deterministic: the walk starts where `order` says it does.
                assert_eq!(chosen, first);
            }
        }
    }

    #[test]
    fn a_refusal_walks_to_the_next_index() {
        let placer = ConsistentHashPlacer::new();
        let runners = [Fake::Up; 7];
        for key in keys(200) {
            let first = placer.order(&key, runners.len()).next();
            let Some(first) = first else {
                panic!("a non-empty list has a first runner");
            };
            let mut tried = Vec::new();
            let chosen = select(&placer, &key, &runners, |idx, _| {
                tried.push(idx);
                idx != first
            });
            let next = (first + 1) % runners.len();
            assert_eq!(tried, vec![first, next]);
            assert_eq!(chosen, Some(next));
        }
    }

    #[test]
    fn when_everyone_refuses_every_runner_is_tried_once_and_none_is_chosen() {
        let key = PlacementKey::new("app", "fn");
        let runners = [Fake::Up; 6];
        for placer in placers() {
            let mut tried = Vec::new();
            let chosen = select(&*placer, &key, &runners, |idx, _| {
                tried.push(idx);
                false
            });
            assert_eq!(chosen, None);
            tried.sort_unstable();
            assert_eq!(tried, (0..runners.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn an_empty_list_places_nothing() {
        let key = PlacementKey::new("app", "fn");
        for placer in placers() {
            assert_eq!(placer.order(&key, 0).next(), None);
            let chosen = select(&*placer, &key, &[] as &[Fake], |_, _| true);
            assert_eq!(chosen, None);
        }
    }

    #[test]
    fn placeholders_are_never_called_and_keep_everyone_elses_slot() {
        let placer = ConsistentHashPlacer::new();
        let all_up = [Fake::Up; 8];
        let mut with_holes = all_up;
        with_holes[2] = Fake::Placeholder;
        with_holes[3] = Fake::Placeholder;
        with_holes[7] = Fake::Placeholder;

        let mut landed_on_hole = 0;
        for key in keys(2_000) {
            let mut called = Vec::new();
            let chosen = select(&placer, &key, &with_holes, |idx, runner| {
                if *runner == Fake::Placeholder {
                    return false;
                }
                called.push(idx);
                true
            });
            assert!(
                called.iter().all(|&idx| with_holes[idx] == Fake::Up),
                "{key}: a placeholder was called: {called:?}"
            );
            let Some(chosen) = chosen else {
                panic!("{key}: live runners exist, the call must be placed");
            };

            let preferred = select(&placer, &key, &all_up, |_, _| true);
            let Some(preferred) = preferred else {
                panic!("{key}: a full list always places");
            };
            match preferred {
                // A key whose runner is reachable stays exactly where it was.
                0 | 1 | 4 | 5 | 6 => assert_eq!(chosen, preferred, "{key}"),
                // A key whose runner is missing walks on to the next live one.
                2 | 3 => {
                    landed_on_hole += 1;
                    assert_eq!(chosen, 4, "{key}");
                }
                7 => {
                    landed_on_hole += 1;
                    assert_eq!(chosen, 0, "{key}");
                }
                other => panic!("{key}: index {other} out of range"),
            }
        }
        // Three of eight slots are placeholders: the walk-on path was actually exercised.
        assert!(
            landed_on_hole > 500,
            "only {landed_on_hole} keys hit a placeholder"
        );
    }

    #[test]
    fn keys_display_as_app_slash_function() {
        let key = PlacementKey::new("app", "fn");
        assert_eq!(key.to_string(), "app/fn");
        assert_eq!((key.app(), key.function()), ("app", "fn"));
    }
}
