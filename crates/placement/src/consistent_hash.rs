//! [`ConsistentHashPlacer`]: SipHash of the function's identity, jump consistent hash onto the
//! runner list, then a circular walk from there.
//!
//! Owns the hash (its fixed keys and the byte encoding of a [`PlacementKey`]) and the jump
//! consistent hash function. Both are part of the contract between LBs: every LB in a group, of
//! every version running at the same time, must compute the same index for the same key and
//! list, or a function's calls would be split across runners.

use std::hash::Hasher;
use std::num::NonZeroUsize;

use siphasher::sip::SipHasher;

use crate::{Order, PlacementKey, Placer};

/// First half of the SipHash key: ASCII `"fn-place"`, read big-endian.
///
/// The keys are fixed, not random: SipHash is used here as a well-mixing, stable hash, not as a
/// defence against hash flooding, and every LB must compute the same hash for the same function.
/// Changing either constant re-homes nearly every function, so it has to happen on all LBs of a
/// group at once.
const SIP_KEY_0: u64 = 0x666e_2d70_6c61_6365;

/// Second half of the SipHash key: ASCII `"ment-v01"`, read big-endian. See [`SIP_KEY_0`].
const SIP_KEY_1: u64 = 0x6d65_6e74_2d76_3031;

/// The multiplier of the 64-bit linear congruential generator that drives the jump hash (Lamping
/// & Veach, 2014); the increment is 1.
const LCG_MULTIPLIER: u64 = 2_862_933_555_777_941_757;

/// 2^31: the jump hash draws 31-bit random numbers from the top bits of the generator's state.
const TWO_POW_31: f64 = (1u64 << 31) as f64;

/// Consistent-hash placement (`FN_PLACER=ch`).
///
/// The key is hashed with SipHash-2-4 under fixed keys ([`ConsistentHashPlacer::hash_key`]), the
/// hash is mapped onto `0..n` with [`jump_consistent_hash`], and the pass starts at that index and
/// walks the list circularly, so a refusal goes to the next runner in the list.
///
/// For a fixed list the same function always prefers the same runner, on every LB, which keeps
/// its containers warm. When a runner is appended to a list of `n`, only about `1/(n+1)` of the
/// functions change their preferred runner, and all of those move to the new one. Removing a
/// runner from the middle of the list, by contrast, would shift every later index: the caller
/// keeps unreachable runners in place as placeholders that refuse (see the crate docs).
///
/// Stateless; construct as many as you like, they all agree.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsistentHashPlacer {
    /// Keeps construction going through [`ConsistentHashPlacer::new`] (or `Default`), so adding
    /// configuration later is not a breaking change.
    _private: (),
}

impl ConsistentHashPlacer {
    /// A consistent-hash placer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The 64-bit hash the placer derives from `key`.
    ///
    /// SipHash-2-4 under the fixed keys above, over an encoding that does not depend on the
    /// platform or on `std`'s `Hash` implementations (which are not guaranteed stable across Rust
    /// releases): for the app and then the function name, the name's length in bytes as a
    /// little-endian `u64`, followed by its UTF-8 bytes. The length prefix keeps `("ab", "c")` and
    /// `("a", "bc")` apart.
    pub fn hash_key(key: &PlacementKey) -> u64 {
        let mut hasher = SipHasher::new_with_keys(SIP_KEY_0, SIP_KEY_1);
        for part in [key.app(), key.function()] {
            hasher.write(&(part.len() as u64).to_le_bytes());
            hasher.write(part.as_bytes());
        }
        hasher.finish()
    }
}

impl Placer for ConsistentHashPlacer {
    fn order(&self, key: &PlacementKey, n: usize) -> Order {
        let first = NonZeroUsize::new(n).map_or(0, |buckets| {
            jump_consistent_hash(Self::hash_key(key), buckets)
        });
        Order::circular(first, n)
    }

    fn name(&self) -> &'static str {
        "ch"
    }
}

/// Jump consistent hash (John Lamping and Eric Veach, "A Fast, Minimal Memory, Consistent Hash
/// Algorithm", 2014): maps `key` to a bucket in `0..buckets`.
///
/// Buckets are numbered, not named. As the number of buckets grows from `b` to `b + 1`, a key
/// either keeps its bucket or moves to the new bucket `b`, each key moving with probability
/// `1/(b + 1)`, so every bucket ends up with an equal share of keys. The function follows a key's
/// bucket through that growth without visiting every step: with the key seeding a pseudo-random
/// generator, it repeatedly draws where the key's *next* jump would happen, `j = (b + 1) / r` for
/// a uniform `r` in `(0, 1]`, and stops at the last jump below `buckets`. That takes
/// `O(ln buckets)` steps and no memory.
///
/// The generator and arithmetic are the paper's (a 64-bit LCG, 31-bit draws, IEEE-754 doubles), so
/// results match other implementations of it and are the same on every platform.
pub fn jump_consistent_hash(key: u64, buckets: NonZeroUsize) -> usize {
    // `usize` is at most 64 bits on every target Rust supports, so this is lossless.
    let buckets = buckets.get() as u64;
    let mut state = key;
    // The current bucket; every key starts in bucket 0 of a one-bucket table.
    let mut bucket: u64 = 0;
    // The bucket count at which the key next jumps; the first draw happens at once.
    let mut next_jump: u64 = 0;
    while next_jump < buckets {
        bucket = next_jump;
        state = state.wrapping_mul(LCG_MULTIPLIER).wrapping_add(1);
        // A draw in 1..=2^31, so `TWO_POW_31 / draw` is `1/r` for a uniform `r` in (0, 1].
        let draw = ((state >> 33) + 1) as f64;
        // Saturating float-to-int conversion: a jump past `u64::MAX` still ends the loop.
        next_jump = ((bucket + 1) as f64 * (TWO_POW_31 / draw)) as u64;
    }
    // `bucket < buckets`, which came from a `usize`: lossless.
    bucket as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(n: usize) -> NonZeroUsize {
        let Some(n) = NonZeroUsize::new(n) else {
            panic!("test bucket counts are non-zero");
        };
        n
    }

    /// Distinct, unremarkable keys, spread over a few dozen apps the way real ones are.
    fn keys(count: usize) -> Vec<PlacementKey> {
        (0..count)
            .map(|i| PlacementKey::new(format!("app-{}", i % 97), format!("fn-{i}")))
            .collect()
    }

    fn first(placer: &ConsistentHashPlacer, key: &PlacementKey, n: usize) -> usize {
        let Some(first) = placer.order(key, n).next() else {
            panic!("a non-empty list has a first runner");
        };
        first
    }

    fn assert_permutation(order: Order, n: usize) {
        let mut seen = vec![false; n];
        for idx in order {
            assert!(idx < n, "index {idx} out of range for {n} runners");
            assert!(!seen[idx], "index {idx} yielded twice");
            seen[idx] = true;
        }
        assert!(seen.iter().all(|&s| s), "not every runner was yielded");
    }

    /// Values computed with the paper's C++ reference implementation: placements must not change
    /// between releases, or LBs of different versions would disagree during a rolling upgrade.
    #[test]
    fn jump_hash_matches_the_reference_implementation() {
        let counts = [1, 2, 10, 100, 1_000, 65_536, 1_000_000];
        let expected: [(u64, [usize; 7]); 7] = [
            (0x0000_0000_0000_0000, [0, 0, 0, 0, 0, 0, 0]),
            (0x0000_0000_0000_0001, [0, 0, 6, 55, 549, 21_134, 985_611]),
            (0x0000_0000_0000_0002, [0, 0, 6, 62, 338, 3_927, 152_951]),
            (0x0000_0000_dead_beef, [0, 1, 5, 87, 285, 64_244, 479_362]),
            (0x0123_4567_89ab_cdef, [0, 0, 0, 57, 194, 33_301, 352_229]),
            (0xffff_ffff_ffff_ffff, [0, 1, 9, 92, 313, 18_311, 589_430]),
            (0x8000_0000_0000_0000, [0, 1, 5, 84, 453, 53_854, 802_256]),
        ];
        for (key, want) in expected {
            let got = counts.map(|n| jump_consistent_hash(key, buckets(n)));
            assert_eq!(got, want, "key {key:#018x}");
        }
    }

    /// The reference test vector of the SipHash paper (key 00..0f, empty message), so the hasher
    /// cannot silently be swapped for another variant (e.g. SipHash-1-3).
    #[test]
    fn the_hasher_is_siphash_2_4() {
        let hasher = SipHasher::new_with_keys(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        assert_eq!(hasher.finish(), 0x726f_db47_dd0e_0e31);
    }

    #[test]
    fn key_hash_is_unambiguous() {
        let a = ConsistentHashPlacer::hash_key(&PlacementKey::new("ab", "c"));
        let b = ConsistentHashPlacer::hash_key(&PlacementKey::new("a", "bc"));
        assert_ne!(a, b);
    }

    /// Pinned like the jump hash vectors, with values from an independent SipHash-2-4 and the
    /// reference jump hash: changing the keys, the encoding or the mapping re-homes nearly every
    /// function, which must be a deliberate, fleet-wide decision.
    #[test]
    fn placements_are_pinned() {
        let placer = ConsistentHashPlacer::new();
        let pinned = [
            (("app", "fn"), 0xae86_82ea_50e1_486d, [0, 5, 55]),
            (
                ("billing", "charge-card"),
                0xac7b_6153_f65a_3758,
                [1, 4, 59],
            ),
            (("images", "resize"), 0x9fd2_61cd_b086_35aa, [0, 9, 56]),
        ];
        for ((app, function), hash, firsts) in pinned {
            let key = PlacementKey::new(app, function);
            assert_eq!(ConsistentHashPlacer::hash_key(&key), hash, "{key}");
            assert_eq!(
                [3, 10, 64].map(|n| first(&placer, &key, n)),
                firsts,
                "{key}"
            );
        }
    }

    #[test]
    fn same_key_same_list_same_runner_on_independent_placers() {
        let a = ConsistentHashPlacer::new();
        let b = ConsistentHashPlacer::new();
        for n in [1, 2, 3, 10, 33] {
            for key in keys(500) {
                let order = a.order(&key, n);
                assert!(order.clone().eq(b.order(&key, n)), "{key}, n = {n}");
                assert!(order.clone().eq(a.order(&key, n)), "{key}, n = {n}");
                assert_permutation(order, n);
            }
        }
    }

    #[test]
    fn growing_the_list_moves_about_one_in_n_plus_one_keys_all_to_the_new_runner() {
        let placer = ConsistentHashPlacer::new();
        let keys = keys(10_000);
        for n in [10, 20, 50] {
            let mut moved = 0usize;
            for key in &keys {
                let before = first(&placer, key, n);
                let after = first(&placer, key, n + 1);
                if before != after {
                    moved += 1;
                    assert_eq!(after, n, "{key} moved from {before} to an old runner");
                }
            }
            let fraction = moved as f64 / keys.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "n = {n} -> {}: moved {moved} keys = {fraction:.4} (ideal {ideal:.4})",
                n + 1
            );
            assert!(
                (fraction - ideal).abs() <= 0.05,
                "n = {n}: moved {fraction:.4}, ideal {ideal:.4}"
            );
        }
    }

    #[test]
    fn keys_spread_evenly_over_the_runners() {
        let placer = ConsistentHashPlacer::new();
        let n = 10;
        let keys = keys(10_000);
        let mut counts = vec![0usize; n];
        for key in &keys {
            counts[first(&placer, key, n)] += 1;
        }
        let mean = keys.len() as f64 / n as f64;
        println!("10 runners, {} keys: {counts:?}", keys.len());
        for (runner, &count) in counts.iter().enumerate() {
            let deviation = (count as f64 - mean).abs() / mean;
            assert!(
                deviation <= 0.30,
                "runner {runner} got {count} keys, mean {mean}: {counts:?}"
            );
        }
    }

    #[test]
    fn the_walk_continues_circularly_from_the_hashed_runner() {
        let placer = ConsistentHashPlacer::new();
        for key in keys(100) {
            let start = first(&placer, &key, 9);
            let want: Vec<_> = (0..9).map(|i| (start + i) % 9).collect();
            assert_eq!(placer.order(&key, 9).collect::<Vec<_>>(), want);
        }
    }
}
