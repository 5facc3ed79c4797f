//! How long a placer takes to compute a call's [`Order`] — the placement work the lb-agent
//! does on every call, before any runner is asked.
//!
//! For `naive` and `ch`, over lists of 3, 10, 100 and 1000 runners, two operations:
//! - `first`: `order(&key, n)` and its first index (the common case: the preferred runner
//!   takes the call);
//! - `walk`: `order(&key, n)` walked to the end (every runner refused: one full pass).
//!
//! And for `warm`, over 10, 100 and 300 runners, `rank`: `rank(&key, &views)`, the ranking one
//! placement pass makes, over views built once outside the timed loop (a mix as a pass sees
//! it: mostly runners with room, some warm, some evicting, full, draining, too small or
//! without a report, and loads spread around the mean).
//!
//! Each case is warmed up, then timed in batches sized for about 50 ms each, ten batches
//! (about 0.5 s per case); the table shows the median batch in ns per operation, and the
//! spread (fastest and slowest batch). Keys cycle through 1024 distinct functions so `ch`
//! hashes varied names, as it does in production.
//!
//! Run: `cargo bench -p fn-placement` (or `make bench`). Extra arguments are substrings that
//! select cases, e.g. `cargo bench -p fn-placement -- ch`.
//!
//! A hand-written harness rather than criterion: CI compiles every target, and a benchmark
//! framework would add its dependencies to every build.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fn_placement::{
    ConsistentHashPlacer, DEFAULT_EPSILON, NaivePlacer, Order, PlacementKey, Placer, RunnerLoad,
    RunnerView, WarmPlacer,
};

/// Runner-list lengths measured.
const POOLS: [usize; 4] = [3, 10, 100, 1000];
/// Runner-list lengths measured for `warm`'s `rank` (an LB group of a few to hundreds).
const RANKED_POOLS: [usize; 3] = [10, 100, 300];
/// Distinct keys cycled through.
const KEYS: usize = 1024;
/// Timed batches per case; the median is reported.
const BATCHES: usize = 10;
/// Target duration of one batch.
const BATCH_TIME: Duration = Duration::from_millis(50);
/// Warm-up duration per case (also sizes the batches).
const WARM_UP: Duration = Duration::from_millis(100);

/// What is done with the order.
#[derive(Clone, Copy)]
enum Op {
    /// Take the first index only.
    First,
    /// Walk every index.
    Walk,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::First => "first",
            Op::Walk => "walk",
        }
    }

    fn consume(self, mut order: Order) -> usize {
        match self {
            Op::First => order.next().unwrap_or(usize::MAX),
            // Sum the indices so the walk cannot be optimised away.
            Op::Walk => order.fold(0usize, |acc, i| acc.wrapping_add(black_box(i))),
        }
    }
}

/// One timed run of `iterations` operations; returns the elapsed time.
fn run(placer: &dyn Placer, keys: &[PlacementKey], n: usize, op: Op, iterations: u64) -> Duration {
    let start = Instant::now();
    let mut k = 0usize;
    for _ in 0..iterations {
        let key = black_box(&keys[k]);
        let order = placer.order(key, black_box(n));
        black_box(op.consume(order));
        k = (k + 1) % keys.len();
    }
    start.elapsed()
}

/// One timed run of `iterations` rankings over `views`; returns the elapsed time.
fn run_rank(
    placer: &dyn Placer,
    keys: &[PlacementKey],
    views: &[RunnerView],
    iterations: u64,
) -> Duration {
    let start = Instant::now();
    let mut k = 0usize;
    for _ in 0..iterations {
        let key = black_box(&keys[k]);
        let ranked = placer.rank(key, black_box(views));
        black_box(ranked.first().copied());
        k = (k + 1) % keys.len();
    }
    start.elapsed()
}

/// Median, fastest and slowest batch of a case, in ns per operation; `run(iterations)` times
/// one batch.
fn measure(mut run: impl FnMut(u64) -> Duration) -> (f64, f64, f64) {
    // Warm up, doubling the iteration count until the warm-up time is spent; the last
    // round's rate sizes the batches.
    let mut iterations = 1u64;
    let warm_start = Instant::now();
    let mut per_op = loop {
        let elapsed = run(iterations);
        if warm_start.elapsed() >= WARM_UP && elapsed > Duration::from_millis(1) {
            break elapsed.as_secs_f64() / iterations as f64;
        }
        iterations = iterations.saturating_mul(2);
    };
    per_op = per_op.max(1e-10);
    let batch = ((BATCH_TIME.as_secs_f64() / per_op) as u64).max(1);
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| run(batch).as_secs_f64() * 1e9 / batch as f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    (median, samples[0], samples[samples.len() - 1])
}

/// `n` runners' views as one pass of a busy group sees them, the same on every run (a fixed
/// linear congruential sequence): about 10% warm, 55% with room (a fifth of them only by
/// evicting), 10% full, 5% draining, 5% too small, 15% without a fresh report; loads 0 to 15
/// calls in flight, so the bound (ε = 0.25, mean about 7) puts some over it.
fn views(n: usize) -> Vec<RunnerView> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..n)
        .map(|_| {
            let kind = next() % 100;
            let calls_in_flight = next() % 16;
            let load = RunnerLoad {
                calls_in_flight,
                ..RunnerLoad::default()
            };
            match kind {
                0..10 => RunnerView::Known(RunnerLoad {
                    warm: true,
                    instances: 1,
                    fits: true,
                    ..load
                }),
                10..54 => RunnerView::Known(RunnerLoad { fits: true, ..load }),
                54..65 => RunnerView::Known(RunnerLoad {
                    fits: true,
                    evicts: true,
                    ..load
                }),
                65..75 => RunnerView::Known(load),
                75..80 => RunnerView::Known(RunnerLoad {
                    fits: true,
                    draining: true,
                    ..load
                }),
                80..85 => RunnerView::TooSmall,
                _ => RunnerView::Unknown,
            }
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-` selects cases.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let keys: Vec<PlacementKey> = (0..KEYS)
        .map(|i| PlacementKey::new(format!("app-{}", i % 37), format!("function-{i}")))
        .collect();
    let placers: [(&str, Box<dyn Placer>); 2] = [
        ("naive", Box::new(NaivePlacer::new())),
        ("ch", Box::new(ConsistentHashPlacer::new())),
    ];
    println!(
        "{:<6} {:>6} {:<6} {:>12} {:>12} {:>12}",
        "placer", "pool", "op", "ns/op (med)", "fastest", "slowest"
    );
    for (name, placer) in &placers {
        for n in POOLS {
            for op in [Op::First, Op::Walk] {
                let case = format!("{name}/{n}/{}", op.name());
                if !filters.is_empty() && !filters.iter().any(|f| case.contains(f.as_str())) {
                    continue;
                }
                let (median, fastest, slowest) =
                    measure(|iterations| run(placer.as_ref(), &keys, n, op, iterations));
                println!(
                    "{name:<6} {n:>6} {:<6} {median:>12.1} {fastest:>12.1} {slowest:>12.1}",
                    op.name()
                );
            }
        }
    }
    let warm = WarmPlacer::new(DEFAULT_EPSILON);
    for n in RANKED_POOLS {
        let case = format!("warm/{n}/rank");
        if !filters.is_empty() && !filters.iter().any(|f| case.contains(f.as_str())) {
            continue;
        }
        let views = views(n);
        let (median, fastest, slowest) =
            measure(|iterations| run_rank(&warm, &keys, &views, iterations));
        println!("warm   {n:>6} rank   {median:>12.1} {fastest:>12.1} {slowest:>12.1}");
    }
}
