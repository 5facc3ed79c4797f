//! What the views of one placement pass cost: the lb-agent's `warm` pass reads, for each
//! runner of the call's LB group, what its latest report says of the call
//! ([`Reports::view`]): a lock, a staleness check against the clock, a search of the
//! runner's warm functions. Two ways side by side, in one run:
//! - `clock-per-view`: [`Reports::view`], a clock read per runner;
//! - `clock-per-pass`: [`Reports::view_at`] with one clock read for the pass.
//!
//! Over groups of 10, 100 and 300 runners, each with a fresh report of 64 warm functions.
//! Each case is warmed up, then timed in batches of about 50 ms, ten batches; the table
//! shows the median batch in ns per pass, and the fastest and slowest. The two ways
//! alternate, batch by batch, so that a noisy moment falls on both.
//!
//! Run: `cargo bench -p fn-nodepool --bench views`. The bench builds with the crate's
//! dev-dependencies, whose tokio has `test-util`: its clock read looks for a paused clock
//! first, so a clock read costs more here than in the daemons.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fn_nodepool::reports::{ReportSignal, Reports};
use fn_protocol::runner::{RunnerState, WarmFunction};

const GROUPS: [usize; 3] = [10, 100, 300];
const WARM: usize = 64;
const BATCHES: usize = 10;
const BATCH_TIME: Duration = Duration::from_millis(50);

/// A runner's report: 64 functions warm, some with an idle slot.
fn report(runner: usize) -> RunnerState {
    let mut warm: Vec<WarmFunction> = (0..WARM)
        .map(|f| WarmFunction {
            app: "app".into(),
            function: format!("fn-{f:03}"),
            idle_slots: u32::from((f + runner).is_multiple_of(3)),
            instances: 1,
        })
        .collect();
    warm.sort_by(|a, b| (&a.app, &a.function).cmp(&(&b.app, &b.function)));
    RunnerState {
        version: 1,
        capacity_total_mb: 4096,
        capacity_free_mb: 1024,
        capacity_idle_mb: 512,
        calls_in_flight: (runner % 16) as u64,
        draining: false,
        warm,
    }
}

/// One pass's views, the clock read per view or once.
fn pass(group: &[Reports], function: &str, per_pass: bool) -> usize {
    let now = tokio::time::Instant::now();
    group
        .iter()
        .map(|reports| {
            let view = if per_pass {
                reports.view_at(now, "app", function, 128)
            } else {
                reports.view("app", function, 128)
            };
            usize::from(matches!(view, fn_placement::RunnerView::Known(load) if load.warm))
        })
        .sum()
}

fn timed(group: &[Reports], functions: &[String], per_pass: bool, passes: u64) -> Duration {
    let start = Instant::now();
    for i in 0..passes {
        let function = &functions[(i as usize) % functions.len()];
        black_box(pass(black_box(group), function, per_pass));
    }
    start.elapsed()
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let functions: Vec<String> = (0..WARM * 2).map(|f| format!("fn-{f:03}")).collect();
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "case", "median ns", "fastest", "slowest"
    );
    for size in GROUPS {
        let name = |way: &str| format!("views/{size}/{way}");
        if !filters.is_empty() && !filters.iter().any(|f| name("").contains(f.as_str())) {
            continue;
        }
        let group: Vec<Reports> = (0..size)
            .map(|runner| {
                let reports = Reports::with_signal(ReportSignal::default());
                reports.update(report(runner));
                reports
            })
            .collect();
        // Sized from a warm-up of both ways.
        let mut passes = 1u64;
        while timed(&group, &functions, false, passes) < BATCH_TIME / 4 {
            passes *= 2;
        }
        black_box(timed(&group, &functions, true, passes));
        passes *= 4;
        let mut batches = [Vec::new(), Vec::new()];
        for _ in 0..BATCHES {
            for (way, per_pass) in [(0, false), (1, true)] {
                let took = timed(&group, &functions, per_pass, passes);
                batches[way].push(took.as_nanos() as f64 / passes as f64);
            }
        }
        for (way, label) in [(0, "clock-per-view"), (1, "clock-per-pass")] {
            let mut ns = batches[way].clone();
            ns.sort_by(f64::total_cmp);
            println!(
                "{:<28} {:>12.0} {:>12.0} {:>12.0}",
                name(label),
                ns[ns.len() / 2],
                ns[0],
                ns[ns.len() - 1]
            );
        }
    }
}
