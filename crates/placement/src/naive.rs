//! [`NaivePlacer`]: round-robin over the runner list, ignoring the key.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Order, PlacementKey, Placer};

/// Round-robin placement (`FN_PLACER=naive`): each call to [`Placer::order`] starts one runner
/// further along than the previous one and walks the list circularly from there. The key is
/// ignored.
///
/// Spreads calls evenly over the runners regardless of which function they belong to, at the
/// cost of warm containers: a function's calls visit every runner in turn.
#[derive(Debug, Default)]
pub struct NaivePlacer {
    /// How many orders have been handed out; the next pass starts at `next % n`.
    ///
    /// An atomic rather than a mutex: the placer is shared by all in-flight calls and only needs
    /// a roughly fair start, so `Relaxed` increments suffice (no other memory is published through
    /// it). It wraps at `usize::MAX`, which only skews one pass in 2^64.
    next: AtomicUsize,
}

impl NaivePlacer {
    /// A round-robin placer whose first pass starts at runner 0.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Placer for NaivePlacer {
    fn order(&self, _key: &PlacementKey, n: usize) -> Order {
        if n == 0 {
            // Nothing to place on; do not advance the rotation for an empty list.
            return Order::circular(0, 0);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
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
    fn the_key_does_not_matter() {
        let a = NaivePlacer::new();
        let b = NaivePlacer::new();
        for i in 0..10 {
            let ka = PlacementKey::new("app", format!("fn-{i}"));
            let kb = PlacementKey::new("other", "x");
            assert!(a.order(&ka, 5).eq(b.order(&kb, 5)));
        }
    }

    #[test]
    fn an_empty_list_is_empty_and_does_not_advance() {
        let placer = NaivePlacer::new();
        let key = PlacementKey::new("app", "fn");
        assert_eq!(placer.order(&key, 0).next(), None);
        assert_eq!(placer.order(&key, 3).next(), Some(0));
    }
}
