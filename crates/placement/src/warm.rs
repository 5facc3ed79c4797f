//! [`WarmPlacer`] (`FN_PLACER=warm`): the `ch` ring, reordered by what the runners report.

use crate::{ConsistentHashPlacer, Order, PlacementKey, Placer};

/// What the caller knows of one runner, for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerView {
    /// No fresh report: the runner is asked where `ch` would ask it.
    Unknown,
    /// A fresh report says the runner's whole memory is smaller than the call needs: it is
    /// asked last (it refuses, and a group whose every runner refuses so answers at once
    /// that none is large enough), never before a runner that may take the call.
    TooSmall,
    /// A fresh report.
    Known(RunnerLoad),
}

/// A runner's report, as it concerns one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunnerLoad {
    /// A running instance of the call's function has room for the call: no cold start.
    pub warm: bool,
    /// Running instances of the call's function, busy or idle.
    pub instances: u32,
    /// A new instance of the call's function fits in the runner's memory, counting what its
    /// idle instances would give up.
    pub fits: bool,
    /// It fits only by evicting idle instances (of other functions): their next calls would
    /// start cold.
    pub evicts: bool,
    /// The runner takes no new calls.
    pub draining: bool,
    /// Calls running on the runner.
    pub calls_in_flight: u64,
}

/// Warmth- and load-aware placement over the consistent-hash ring.
///
/// The ring order is [`ConsistentHashPlacer`]'s, so a function keeps a home runner and every
/// LB agrees on it. Within one pass, runners are tried in six tiers, each in ring order:
/// 1. runners with a warm instance of the function that has room for the call;
/// 2. runners where a new instance fits in free memory, and runners with no fresh report
///    (asked as `ch` would ask them: missing information never refuses a call);
/// 3. runners with a warm instance whose load is over the bound below;
/// 4. runners where a new instance fits only by evicting idle instances of other functions
///    (their next calls would start cold);
/// 5. runners where a new instance fits but whose load is over the bound;
/// 6. runners reported to be smaller in all than the call needs ([`RunnerView::TooSmall`]);
///
/// and runners known to be draining, or to have neither a warm instance nor room, are not
/// asked at all: the caller waits for the next report instead of collecting a refusal.
///
/// **Bounded loads** (Mirrokni, Thorup and Zadimoghaddam, *Consistent Hashing with Bounded
/// Loads*, 2018): a runner is over the bound when taking the call would put its calls in
/// flight above `⌈(1 + ε) · (m + 1) / k⌉`, where `m` is the calls in flight on the `k`
/// runners with a fresh report that are not draining (and never below [`MIN_LOAD_BOUND`]).
/// So a popular function stays on its home
/// runner until that runner carries more than its share, and only the excess moves on along
/// the ring: to the next runners, in the same order from every LB.
#[derive(Debug, Default)]
pub struct WarmPlacer {
    ring: ConsistentHashPlacer,
    epsilon: f64,
}

/// No runner is over the bound with fewer calls in flight than this: at loads that small
/// the bound would only trade a warm instance for a cold start elsewhere.
pub const MIN_LOAD_BOUND: u64 = 4;

/// ε when `FN_PLACER_EPSILON` is not set: a runner may carry 25% more than the mean.
pub const DEFAULT_EPSILON: f64 = 0.25;

impl WarmPlacer {
    /// A placer that lets a runner carry up to `(1 + epsilon)` times the mean load
    /// (negative or non-finite values count as 0).
    pub fn new(epsilon: f64) -> Self {
        WarmPlacer {
            ring: ConsistentHashPlacer::new(),
            epsilon: if epsilon.is_finite() {
                epsilon.max(0.0)
            } else {
                0.0
            },
        }
    }

    /// The ε this placer bounds loads with.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The most calls in flight a runner may carry after taking one more call, given the
    /// views; `None` when no runner has a fresh report.
    fn bound(&self, views: &[RunnerView]) -> Option<u64> {
        let (runners, calls) = views
            .iter()
            .filter_map(|view| match view {
                RunnerView::Known(load) if !load.draining => Some(load.calls_in_flight),
                _ => None,
            })
            .fold((0u64, 0u64), |(n, sum), calls| {
                (n + 1, sum.saturating_add(calls))
            });
        if runners == 0 {
            return None;
        }
        let mean = (calls as f64 + 1.0) / runners as f64;
        // ⌈(1 + ε) · mean⌉, where a product that should be whole may come out a rounding
        // error above it (1.1 × 50 is 55.000000000000007): that error is taken off first.
        let raw = (1.0 + self.epsilon) * mean;
        Some(((raw - raw * 1e-12).ceil() as u64).max(MIN_LOAD_BOUND))
    }
}

impl Placer for WarmPlacer {
    fn order(&self, key: &PlacementKey, n: usize) -> Order {
        self.ring.order(key, n)
    }

    fn name(&self) -> &'static str {
        "warm"
    }

    fn uses_reports(&self) -> bool {
        true
    }

    fn rank(&self, key: &PlacementKey, views: &[RunnerView]) -> Vec<usize> {
        let bound = self.bound(views);
        // The six tiers, each in ring order, without a sort: a first walk counts each tier's
        // runners (the order of counting does not matter), which gives where each tier starts
        // in the answer; a walk in ring order then puts each runner at the next place of its
        // tier. The same order as a stable sort by tier of the ring order, in one allocation
        // (the answer's) and no comparison, where a pass of a group of hundreds of runners
        // sorted a list of them.
        let mut starts = [0usize; TIERS];
        for view in views {
            if let Some(tier) = tier(view, bound) {
                starts[usize::from(tier)] += 1;
            }
        }
        let mut next = 0;
        for start in &mut starts {
            let count = *start;
            *start = next;
            next += count;
        }
        let mut ranked = vec![0; next];
        for idx in self.ring.order(key, views.len()) {
            let Some(tier) = views.get(idx).and_then(|view| tier(view, bound)) else {
                continue;
            };
            // Each tier's places were counted above from the same views, so its cursor
            // stays within them.
            let place = &mut starts[usize::from(tier)];
            if let Some(slot) = ranked.get_mut(*place) {
                *slot = idx;
            }
            *place += 1;
        }
        ranked
    }
}

/// How many tiers [`tier`] ranks runners in.
const TIERS: usize = 6;

/// The tier a runner is asked in (see [`WarmPlacer`]), 0 first; `None` when it is not asked.
/// `bound`: [`WarmPlacer::bound`] of the pass's views.
fn tier(view: &RunnerView, bound: Option<u64>) -> Option<u8> {
    let load = match view {
        RunnerView::Unknown => return Some(1),
        RunnerView::TooSmall => return Some(5),
        RunnerView::Known(load) => load,
    };
    if load.draining || !(load.warm || load.fits) {
        return None;
    }
    // Reported by the runner: saturating, so a report of u64::MAX ranks it last.
    let over = bound.is_some_and(|bound| load.calls_in_flight.saturating_add(1) > bound);
    Some(match (over, load.warm, load.evicts) {
        (false, true, _) => 0,
        (false, false, false) => 1,
        (true, true, _) => 2,
        (false, false, true) => 3,
        (true, false, _) => 4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PlacementKey {
        PlacementKey::new("app", "fn")
    }

    #[test]
    fn the_load_bound_is_exact_where_floating_point_is_not() {
        // ε = 0.1, 49 calls on one runner, one more coming: ⌈1.1 × 50⌉ = 55, not 56.
        let placer = WarmPlacer::new(0.1);
        assert_eq!(placer.bound(&[known(false, true, 49)]), Some(55));
        // And a bound that is not whole still rounds up: ⌈1.1 × 51⌉ = ⌈56.1⌉ = 57.
        assert_eq!(placer.bound(&[known(false, true, 50)]), Some(57));
        // 0.25 over two runners with 10 calls: ⌈1.25 × 5.5⌉ = ⌈6.875⌉ = 7.
        let placer = WarmPlacer::new(0.25);
        assert_eq!(
            placer.bound(&[known(false, true, 4), known(false, true, 6)]),
            Some(7)
        );
    }

    fn known(warm: bool, fits: bool, calls_in_flight: u64) -> RunnerView {
        RunnerView::Known(RunnerLoad {
            warm,
            instances: u32::from(warm),
            fits,
            evicts: false,
            draining: false,
            calls_in_flight,
        })
    }

    /// The ring order of `key()` over `n` runners.
    fn ring(n: usize) -> Vec<usize> {
        ConsistentHashPlacer::new().order(&key(), n).collect()
    }

    #[test]
    fn without_reports_it_is_the_consistent_hash_order() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        for n in [0, 1, 3, 10] {
            let views = vec![RunnerView::Unknown; n];
            assert_eq!(placer.rank(&key(), &views), ring(n), "n = {n}");
        }
    }

    #[test]
    fn a_warm_runner_comes_before_a_cold_home() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(4);
        let mut views = vec![known(false, true, 1); 4];
        // The last runner of the ring is the only warm one.
        views[order[3]] = known(true, true, 1);
        let ranked = placer.rank(&key(), &views);
        assert_eq!(ranked[0], order[3]);
        assert_eq!(&ranked[1..], &order[..3], "then the ring order");
    }

    #[test]
    fn a_runner_reporting_a_huge_load_is_ranked_last_not_first() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(3);
        let mut views = vec![known(true, true, 1); 3];
        views[order[0]] = known(true, true, u64::MAX);
        let ranked = placer.rank(&key(), &views);
        assert_eq!(ranked.last(), Some(&order[0]), "{ranked:?}");
    }

    #[test]
    fn full_and_draining_runners_are_not_asked() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(3);
        let mut views = vec![known(false, true, 0); 3];
        views[order[0]] = known(false, false, 4); // full, nothing warm
        views[order[1]] = RunnerView::Known(RunnerLoad {
            draining: true,
            warm: true,
            instances: 1,
            fits: true,
            evicts: false,
            calls_in_flight: 0,
        });
        assert_eq!(placer.rank(&key(), &views), vec![order[2]]);
        // Full but warm: a call still runs there without a new instance.
        views[order[0]] = known(true, false, 1);
        assert_eq!(placer.rank(&key(), &views), vec![order[0], order[2]]);
        // Every runner full: nobody is asked.
        let all_full = vec![known(false, false, 5); 3];
        assert!(placer.rank(&key(), &all_full).is_empty());
    }

    #[test]
    fn a_runner_without_a_report_is_asked_like_one_with_room() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(3);
        let mut views = vec![known(false, true, 0); 3];
        views[order[0]] = RunnerView::Unknown;
        views[order[2]] = known(true, true, 0);
        assert_eq!(
            placer.rank(&key(), &views),
            vec![order[2], order[0], order[1]]
        );
    }

    #[test]
    fn a_runner_too_small_for_the_call_is_asked_after_every_other() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(4);
        let mut views = vec![known(false, true, 0); 4];
        views[order[0]] = RunnerView::TooSmall;
        // Over the bound and evicting: still before the one that cannot hold the call.
        views[order[1]] = RunnerView::Known(RunnerLoad {
            fits: true,
            evicts: true,
            calls_in_flight: 100,
            ..RunnerLoad::default()
        });
        views[order[3]] = RunnerView::Unknown;
        assert_eq!(
            placer.rank(&key(), &views),
            vec![order[2], order[3], order[1], order[0]]
        );
        // A group of runners all too small: each is still asked (and says so).
        let all_small = vec![RunnerView::TooSmall; 3];
        assert_eq!(placer.rank(&key(), &all_small), ring(3));
    }

    #[test]
    fn evicting_warm_instances_comes_after_free_memory() {
        let placer = WarmPlacer::new(DEFAULT_EPSILON);
        let order = ring(3);
        let mut views = vec![known(false, true, 0); 3];
        views[order[0]] = RunnerView::Known(RunnerLoad {
            evicts: true,
            ..RunnerLoad {
                fits: true,
                ..RunnerLoad::default()
            }
        });
        assert_eq!(
            placer.rank(&key(), &views),
            vec![order[1], order[2], order[0]]
        );
    }

    /// Loads above [`MIN_LOAD_BOUND`], at the bound and one past it, for two values of ε:
    /// the home stays first while taking the call keeps it at `⌈(1 + ε)(m + 1)/k⌉`, and goes
    /// last (warm or not) one call later. An ε ignored, or `>=` for `>`, fails a row.
    #[test]
    fn bounded_load_moves_the_homes_excess_along_the_ring() {
        let order = ring(3);
        // (ε, the home's calls, whether it is over): the others carry 10 each.
        for (epsilon, home, over) in [
            (0.25, 14, false), // m = 34: bound ⌈1.25 · 35/3⌉ = 15, and 14 + 1 = 15
            (0.25, 15, true),  // m = 35: bound ⌈1.25 · 36/3⌉ = 15, and 16 > 15
            (0.5, 20, false),  // m = 40: bound ⌈1.5 · 41/3⌉ = 21, and 21
            (0.5, 21, true),   // m = 41: bound ⌈1.5 · 42/3⌉ = 21, and 22 > 21
        ] {
            let placer = WarmPlacer::new(epsilon);
            let mut views = vec![known(false, true, 10); 3];
            views[order[0]] = known(true, true, home);
            let ranked = placer.rank(&key(), &views);
            let expected = if over {
                vec![order[1], order[2], order[0]]
            } else {
                vec![order[0], order[1], order[2]]
            };
            assert_eq!(ranked, expected, "ε {epsilon}, home at {home}");
        }
    }

    #[test]
    fn epsilon_is_sane() {
        assert_eq!(WarmPlacer::new(-1.0).epsilon(), 0.0);
        assert_eq!(WarmPlacer::new(f64::NAN).epsilon(), 0.0);
        assert_eq!(WarmPlacer::new(0.5).epsilon(), 0.5);
    }

    #[test]
    fn every_index_at_most_once() {
        let placer = WarmPlacer::new(0.0);
        let views: Vec<_> = (0..50)
            .map(|i| match i % 4 {
                0 => RunnerView::Unknown,
                1 => known(true, false, i),
                2 => known(false, true, 50 - i),
                _ => known(false, false, i),
            })
            .collect();
        let mut ranked = placer.rank(&key(), &views);
        let asked = ranked.len();
        ranked.sort_unstable();
        ranked.dedup();
        assert_eq!(ranked.len(), asked);
        let full = (0..50).filter(|i| i % 4 == 3).count();
        assert_eq!(asked, 50 - full, "the full ones are left out");
    }
}

/// The ranking checked against the stable sort it replaced.
#[cfg(test)]
mod same_as_the_sort {
    use proptest::prelude::*;

    use super::*;

    /// `rank` as it was before the tiers were counted (every pass sorted): the six tiers'
    /// definition, inline, then a stable sort by tier of the ring order. The reference.
    fn sorted_rank(placer: &WarmPlacer, key: &PlacementKey, views: &[RunnerView]) -> Vec<usize> {
        let bound = placer.bound(views);
        let tier = |view: &RunnerView| -> Option<u8> {
            let load = match view {
                RunnerView::Unknown => return Some(1),
                RunnerView::TooSmall => return Some(5),
                RunnerView::Known(load) => load,
            };
            if load.draining || !(load.warm || load.fits) {
                return None;
            }
            let over = bound.is_some_and(|bound| load.calls_in_flight.saturating_add(1) > bound);
            Some(match (over, load.warm, load.evicts) {
                (false, true, _) => 0,
                (false, false, false) => 1,
                (true, true, _) => 2,
                (false, false, true) => 3,
                (true, false, _) => 4,
            })
        };
        let mut ranked: Vec<(u8, usize)> = placer
            .ring
            .order(key, views.len())
            .filter_map(|idx| Some((tier(views.get(idx)?)?, idx)))
            .collect();
        ranked.sort_by_key(|(tier, _)| *tier);
        ranked.into_iter().map(|(_, idx)| idx).collect()
    }

    /// Any view: loads mostly around a few calls (so that some are over the bound and some
    /// not), sometimes anything a runner could report.
    fn view() -> impl Strategy<Value = RunnerView> {
        let load = (
            any::<bool>(),
            0u32..4,
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.1),
            prop_oneof![9 => 0u64..24, 1 => any::<u64>()],
        )
            .prop_map(
                |(warm, instances, fits, evicts, draining, calls_in_flight)| {
                    RunnerView::Known(RunnerLoad {
                        warm,
                        instances,
                        fits,
                        evicts,
                        draining,
                        calls_in_flight,
                    })
                },
            );
        prop_oneof![
            1 => Just(RunnerView::Unknown),
            1 => Just(RunnerView::TooSmall),
            8 => load,
        ]
    }

    proptest! {
        #[test]
        fn the_counted_tiers_give_the_stable_sorts_order(
            views in prop::collection::vec(view(), 0..120),
            epsilon in prop_oneof![Just(0.0), Just(DEFAULT_EPSILON), 0.0f64..3.0],
            function in "[a-z]{1,12}",
        ) {
            let placer = WarmPlacer::new(epsilon);
            let key = PlacementKey::new("app", function);
            prop_assert_eq!(placer.rank(&key, &views), sorted_rank(&placer, &key, &views));
        }
    }
}
