//! Issue 4's rebalancing bound, read strictly: when a runner is appended to a list of `n`, the
//! fraction of functions whose preferred runner changes is within 5 % *of* `1/(n+1)` (a
//! relative bound), and every function that moves goes to the new runner.
//!
//! The unit test next to the placer checks the looser absolute reading (±0.05) for large `n`,
//! where `1/(n+1)` is itself below 0.05 and "no key moved" would pass; this one would not.

use fn_placement::{ConsistentHashPlacer, PlacementKey, Placer};

/// Enough keys that sampling noise stays well inside 5 % for every `n` below.
const KEYS: usize = 100_000;

#[test]
fn appending_a_runner_moves_one_in_n_plus_one_keys_within_5_percent_relative() {
    let placer = ConsistentHashPlacer::new();
    let keys: Vec<PlacementKey> = (0..KEYS)
        .map(|i| PlacementKey::new(format!("app-{}", i % 211), format!("function-{i}")))
        .collect();
    let first = |key: &PlacementKey, n: usize| {
        placer
            .order(key, n)
            .next()
            .expect("a non-empty list has a first runner")
    };
    for n in [1, 2, 4, 9, 19] {
        let mut moved = 0usize;
        for key in &keys {
            let before = first(key, n);
            let after = first(key, n + 1);
            if before != after {
                assert_eq!(
                    after, n,
                    "{key} moved between old runners {before} -> {after}"
                );
                moved += 1;
            }
        }
        let fraction = moved as f64 / KEYS as f64;
        let ideal = 1.0 / (n + 1) as f64;
        assert!(
            (fraction - ideal).abs() <= 0.05 * ideal,
            "{n} -> {} runners: {fraction:.4} of keys moved, ideal {ideal:.4}",
            n + 1
        );
    }
}
