//! How long a placer takes to compute a call's [`Order`] — the placement work the lb-agent
//! does on every call, before any runner is asked.
//!
//! For `naive` and `ch`, over lists of 3, 10, 100 and 1000 runners, two operations:
//! - `first`: `order(&key, n)` and its first index (the common case: the preferred runner
//!   takes the call);
//! - `walk`: `order(&key, n)` walked to the end (every runner refused: one full pass).
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

use fn_placement::{ConsistentHashPlacer, NaivePlacer, Order, PlacementKey, Placer};

/// Runner-list lengths measured.
const POOLS: [usize; 4] = [3, 10, 100, 1000];
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

/// Median, fastest and slowest batch of a case, in ns per operation.
fn measure(placer: &dyn Placer, keys: &[PlacementKey], n: usize, op: Op) -> (f64, f64, f64) {
    // Warm up, doubling the iteration count until the warm-up time is spent; the last
    // round's rate sizes the batches.
    let mut iterations = 1u64;
    let warm_start = Instant::now();
    let mut per_op = loop {
        let elapsed = run(placer, keys, n, op, iterations);
        if warm_start.elapsed() >= WARM_UP && elapsed > Duration::from_millis(1) {
            break elapsed.as_secs_f64() / iterations as f64;
        }
        iterations = iterations.saturating_mul(2);
    };
    per_op = per_op.max(1e-10);
    let batch = ((BATCH_TIME.as_secs_f64() / per_op) as u64).max(1);
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| run(placer, keys, n, op, batch).as_secs_f64() * 1e9 / batch as f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    (median, samples[0], samples[samples.len() - 1])
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
                let (median, fastest, slowest) = measure(placer.as_ref(), &keys, n, op);
                println!(
                    "{name:<6} {n:>6} {:<6} {median:>12.1} {fastest:>12.1} {slowest:>12.1}",
                    op.name()
                );
            }
        }
    }
}
