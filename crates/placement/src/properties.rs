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
