//! [`NaivePlacer`]: round-robin over the runner list, ignoring the key.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{ConsistentHashPlacer, Order, PlacementKey, Placer};

/// Round-robin placement (`FN_PLACER=naive`): each call to [`Placer::order`] for a function
/// starts one runner further along than the previous one for it, and walks the list
/// circularly from there.
///
/// Spreads each function's calls evenly over the runners, at the cost of warm containers: a
/// function's calls visit every runner in turn. The rotation is kept per function (in one of
/// [`ROTATIONS`], by the key's hash), not once for the LB: with one rotation, calls of two
/// functions (or groups) in turn over two runners each always started on the same runner.
#[derive(Debug)]
pub struct NaivePlacer {
    /// How many orders have been handed out for the functions of each slot; a pass starts
    /// at `next % n`.
    ///
    /// Atomics rather than a mutex: the placer is shared by all in-flight calls and only needs
    /// a roughly fair start, so `Relaxed` increments suffice (no other memory is published
    /// through them). Each wraps at `usize::MAX`, which only skews one pass in 2^64.
    next: [AtomicUsize; ROTATIONS],
}

/// Rotations a [`NaivePlacer`] keeps; functions whose keys hash to the same one share it.
pub const ROTATIONS: usize = 64;

impl Default for NaivePlacer {
    fn default() -> Self {
        NaivePlacer {
            next: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }
}

impl NaivePlacer {
    /// A round-robin placer whose first pass starts at runner 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Placer for NaivePlacer {
    fn order(&self, key: &PlacementKey, n: usize) -> Order {
        if n == 0 {
            // Nothing to place on; do not advance the rotation for an empty list.
            return Order::circular(0, 0);
        }
        let slot = usize::try_from(ConsistentHashPlacer::hash_key(key) % ROTATIONS as u64)
            .unwrap_or_default();
        let start = self.next[slot].fetch_add(1, Ordering::Relaxed);
        Order::circular(start, n)
    }

    fn name(&self) -> &'static str {
        "naive"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_permutation(order: Order, n: usize) {
        let mut seen = vec![false; n];
        for idx in order {
            assert!(idx < n, "index {idx} out of range for {n} runners");
            assert!(!seen[idx], "index {idx} yielded twice");
            seen[idx] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "not every runner was yielded: {seen:?}"
        );
    }

    /// Calls of two functions in turn over two runners: each function's calls start on
    /// each runner equally often (with one rotation for all, one function's always started
    /// on runner 0 and the other's on runner 1).
    #[test]
    fn functions_called_in_turn_each_rotate_over_every_runner() {
        let placer = NaivePlacer::new();
        let slot = |key: &PlacementKey| ConsistentHashPlacer::hash_key(key) % ROTATIONS as u64;
        let a = PlacementKey::new("app", "a");
        let Some(b) = (0..1000)
            .map(|i| PlacementKey::new("app", format!("b{i}")))
            .find(|b| slot(b) != slot(&a))
        else {
            panic!("no key in another rotation among 1000");
        };
        let mut firsts = [[0usize; 2]; 2];
        for _ in 0..50 {
            for (i, key) in [&a, &b].into_iter().enumerate() {
                let first = placer.order(key, 2).next().unwrap_or(usize::MAX);
                firsts[i][first] += 1;
            }
        }
        assert_eq!(firsts, [[25, 25], [25, 25]]);
    }

    #[test]
    fn every_runner_is_first_equally_often() {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new("app", "fn");
        for n in [1, 2, 3, 7, 16] {
            let k = 25;
            let mut firsts = vec![0usize; n];
            for _ in 0..k * n {
                let order = placer.order(&key, n);
                let Some(first) = order.clone().next() else {
                    panic!("a non-empty list has a first runner");
                };
                firsts[first] += 1;
                assert_permutation(order, n);
            }
            assert_eq!(firsts, vec![k; n], "n = {n}");
        }
    }

    #[test]
    fn consecutive_orders_start_one_further_along() {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new("app", "fn");
        let firsts: Vec<_> = (0..6)
            .filter_map(|_| placer.order(&key, 4).next())
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 3, 0, 1]);
        assert_eq!(placer.order(&key, 4).collect::<Vec<_>>(), vec![2, 3, 0, 1]);
    }

    #[test]
    fn an_empty_list_is_empty_and_does_not_advance() {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new("app", "fn");
        assert_eq!(placer.order(&key, 0).next(), None);
        assert_eq!(placer.order(&key, 3).next(), Some(0));
    }
}
