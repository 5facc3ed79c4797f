//! Property tests of the placement policies, through the public API only.

use std::num::NonZeroUsize;

use proptest::prelude::*;

use crate::{ConsistentHashPlacer, NaivePlacer, Order, PlacementKey, Placer, jump_consistent_hash};

/// Whether `order` yields every index of `0..n` exactly once, and says so up front.
fn is_permutation(order: Order, n: usize) -> bool {
    if order.len() != n {
        return false;
    }
    let mut seen = vec![false; n];
    for idx in order {
        match seen.get_mut(idx) {
            Some(slot) if !*slot => *slot = true,
            _ => return false,
        }
    }
    seen.into_iter().all(|s| s)
}

proptest! {
    #[test]
    fn naive_order_is_a_permutation(
        n in 0usize..64,
        app in ".*",
        function in ".*",
        earlier_calls in 0usize..200,
    ) {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new(app, function);
        for _ in 0..earlier_calls {
            let _rotate = placer.order(&key, n);
        }
        prop_assert!(is_permutation(placer.order(&key, n), n));
    }

    #[test]
    fn ch_order_is_a_permutation(n in 0usize..64, app in ".*", function in ".*") {
        let key = PlacementKey::new(app, function);
        prop_assert!(is_permutation(ConsistentHashPlacer::new().order(&key, n), n));
    }

    #[test]
    fn jump_hash_is_in_range(key in any::<u64>(), n in 1usize..1_000_000) {
        let buckets = NonZeroUsize::new(n).ok_or_else(|| TestCaseError::fail("n > 0"))?;
        prop_assert!(jump_consistent_hash(key, buckets) < n);
    }

    #[test]
    fn adding_a_bucket_moves_keys_only_to_the_new_bucket(
        key in any::<u64>(),
        n in 1usize..100_000,
    ) {
        let before = NonZeroUsize::new(n).ok_or_else(|| TestCaseError::fail("n > 0"))?;
        let after = before.saturating_add(1);
        let (old, new) = (jump_consistent_hash(key, before), jump_consistent_hash(key, after));
        prop_assert!(new == old || new == n, "moved from {old} to {new} when adding bucket {n}");
    }

    #[test]
    fn adding_a_runner_moves_functions_only_to_the_new_runner(
        n in 1usize..64,
        app in ".*",
        function in ".*",
    ) {
        let placer = ConsistentHashPlacer::new();
        let key = PlacementKey::new(app, function);
        let old = placer.order(&key, n).next();
        let new = placer.order(&key, n + 1).next();
        prop_assert!(new == old || new == Some(n), "moved from {old:?} to {new:?}");
    }
}

/// The circular walk over `0..n` starting at `first`.
fn circular(first: usize, n: usize) -> Vec<usize> {
    (first..n).chain(0..first).collect()
}

proptest! {
    #[test]
    fn ch_walks_the_list_circularly_from_the_same_home_on_every_lb(
        n in 1usize..64,
        app in ".*",
        function in ".*",
    ) {
        let key = PlacementKey::new(app, function);
        let order: Vec<usize> = ConsistentHashPlacer::new().order(&key, n).collect();
        let home = order[0];
        prop_assert_eq!(&order, &circular(home, n));
        // Another LB (another placer instance) derives the same walk.
        let other: Vec<usize> = ConsistentHashPlacer::new().order(&key, n).collect();
        prop_assert_eq!(order, other);
    }

    #[test]
    fn naive_gives_every_runner_the_first_turn_once_per_round(
        n in 1usize..64,
        earlier_calls in 0usize..200,
    ) {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new("app", "fn");
        for _ in 0..earlier_calls {
            let _rotate = placer.order(&key, n);
        }
        let mut firsts = Vec::new();
        for _ in 0..n {
            let order: Vec<usize> = placer.order(&key, n).collect();
            prop_assert_eq!(&order, &circular(order[0], n));
            firsts.push(order[0]);
        }
        firsts.sort_unstable();
        prop_assert_eq!(firsts, (0..n).collect::<Vec<_>>());
    }

    // For any list with placeholders (unreachable runners) and any set of refusals, `select`
    // asks reachable runners only, each at most once, in the placer's order, and takes the
    // first that accepts; with `ch`, that is the first reachable and willing runner walking
    // on from the key's home, so keys whose home is fine never move.
    #[test]
    fn select_takes_the_first_willing_reachable_runner_in_order(
        runners in prop::collection::vec((any::<bool>(), any::<bool>()), 0..24),
        app in "[a-z]{0,6}",
        function in "[a-z]{0,6}",
        naive in any::<bool>(),
    ) {
        let key = PlacementKey::new(app, function);
        let placer: Box<dyn Placer> = if naive {
            Box::new(NaivePlacer::new())
        } else {
            Box::new(ConsistentHashPlacer::new())
        };
        // (reachable, willing)
        let mut asked = Vec::new();
        let chosen = crate::select(&*placer, &key, &runners, |idx, (reachable, willing)| {
            if !reachable {
                return false; // a placeholder refuses without being asked
            }
            asked.push(idx);
            *willing
        });
        let mut unique = asked.clone();
        unique.sort_unstable();
        unique.dedup();
        prop_assert_eq!(unique.len(), asked.len(), "a runner was asked twice: {:?}", asked);
        prop_assert!(asked.iter().all(|i| runners[*i].0), "a placeholder was asked");
        let takers = runners.iter().filter(|(r, w)| *r && *w).count();
        prop_assert_eq!(chosen.is_some(), takers > 0);
        if let Some(c) = chosen {
            prop_assert_eq!(asked.last().copied(), Some(c));
            prop_assert!(runners[c].0 && runners[c].1);
            prop_assert!(asked[..asked.len() - 1].iter().all(|i| !runners[*i].1));
        }
        if !naive && !runners.is_empty() {
            let home = ConsistentHashPlacer::new().order(&key, runners.len()).next();
            let expected = home.and_then(|h| {
                circular(h, runners.len()).into_iter().find(|i| runners[*i].0 && runners[*i].1)
            });
            prop_assert_eq!(chosen, expected);
        }
    }
}
