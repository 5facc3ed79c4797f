//! What the runner's pool costs a call: [`Pool::admit`], the reservation's instance, and its
//! release, with the pool already holding hot instances. The pool is one mutex and a scan
//! of its instances, taken twice per call, so the cost depends on how many instances it
//! holds: of the call's own function (one per concurrent call, Fn's default) and of others.
//!
//! Cases, each over 1, 64 and 512 idle running instances:
//! - `same`: all of them instances of the called function;
//! - `others`: one instance of the called function and the rest of other functions
//!   (one instance each);
//! - `state`: not a call but one read of [`Pool::state`], as each `WatchState` report
//!   takes, over a pool like `others`' (one instance per function).
//!
//! Each case is warmed up, then timed in batches sized for about 50 ms each, ten batches;
//! the table shows the median batch in ns per call, and the fastest and slowest batch.
//! The instances are stand-ins that are never called (the pool never calls them).
//!
//! Run: `cargo bench -p fn-runner --bench pool` (also part of `make bench`). Extra
//! arguments are substrings that select cases, e.g. `cargo bench -p fn-runner --bench pool
//! -- same/64`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fn_runner::Pool;
use fn_runner::driver::{
    BodyStream, Driver, DriverError, FunctionRequest, FunctionResponse, Instance, InstanceSpec,
};
use futures::future::BoxFuture;

/// Hot instances in the pool before the timed calls.
const SIZES: [usize; 3] = [1, 64, 512];
/// Timed batches per case; the median is reported.
const BATCHES: usize = 10;
/// Target duration of one batch.
const BATCH_TIME: Duration = Duration::from_millis(50);
/// Warm-up duration per case (also sizes the batches).
const WARM_UP: Duration = Duration::from_millis(100);

/// Starts [`Idle`] instances at once.
#[derive(Debug)]
struct AtOnce;

/// An instance that is alive until killed and is never called.
#[derive(Debug, Default)]
struct Idle;

impl Instance for Idle {
    fn call(
        &self,
        _request: FunctionRequest,
        _body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        Box::pin(async { Err(DriverError::Function("a benchmark instance".into())) })
    }

    fn is_alive(&self) -> bool {
        true
    }

    fn kill(&self) {}

    fn pid(&self) -> Option<u32> {
        None
    }
}

impl Driver for AtOnce {
    fn start(
        &self,
        _spec: &InstanceSpec,
        _call_id: &str,
        _start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        Box::pin(async { Ok(Box::new(Idle) as Box<dyn Instance>) })
    }
}

/// A spec like the catalog's: a command, a little configuration.
fn spec(function: &str) -> InstanceSpec {
    InstanceSpec {
        app: "bench-app".into(),
        function: function.into(),
        command: vec![format!("fn-{function}"), "--serve".into()],
        image: None,
        memory_mb: 64,
        concurrency: 1,
        idle_timeout: Duration::from_secs(1800),
        config: [("GREETING", "hello"), ("LOG_LEVEL", "info")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

/// A pool holding `n` idle running instances: all of `called` (`same`), or one of it and
/// the rest of other functions.
async fn hot_pool(n: usize, same: bool, called: &InstanceSpec) -> Arc<Pool> {
    let pool = Pool::new(Arc::new(AtOnce), 1 << 40, Duration::from_secs(5));
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let s = if same || i == 0 {
            called.clone()
        } else {
            spec(&format!("other-{i}"))
        };
        let mut r = pool.admit(s).expect("an unbounded pool admits");
        r.instance("warm-up").await.expect("the stand-in starts");
        held.push(r);
    }
    for r in held {
        r.finish_ok();
    }
    assert_eq!(pool.stats().hot_instances, n as u64);
    pool
}

/// One timed run of `iterations` calls; returns the elapsed time.
async fn run(pool: &Arc<Pool>, called: &InstanceSpec, iterations: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        // The spec arrives with each call, decoded from its message.
        let mut r = pool.admit(called.clone()).expect("admitted");
        std::hint::black_box(r.instance("call").await.expect("hot").pid());
        r.finish_ok();
    }
    start.elapsed()
}

/// Median, fastest and slowest batch of a case, in ns per iteration; `run(n)` times `n`
/// iterations.
fn measure(mut run: impl FnMut(u64) -> Duration) -> (f64, f64, f64) {
    let mut iterations = 1u64;
    let warm_start = Instant::now();
    let per_call = loop {
        let elapsed = run(iterations);
        if warm_start.elapsed() >= WARM_UP && elapsed > Duration::from_millis(1) {
            break (elapsed.as_secs_f64() / iterations as f64).max(1e-10);
        }
        iterations = iterations.saturating_mul(2);
    };
    let batch = ((BATCH_TIME.as_secs_f64() / per_call) as u64).max(1);
    let mut samples = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        samples.push(run(batch).as_secs_f64() * 1e9 / batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
    )
}

/// Times `iterations` reads of the pool's state, as each `WatchState` report takes one.
fn run_state(pool: &Pool, iterations: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(pool.state().warm.len());
    }
    start.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-` selects cases.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let called = spec("echo");
    println!(
        "{:<8} {:>9} {:>14} {:>12} {:>12}",
        "hot", "instances", "ns/call (med)", "fastest", "slowest"
    );
    for kind in ["same", "others", "state"] {
        for n in SIZES {
            let case = format!("{kind}/{n}");
            if !filters.is_empty() && !filters.iter().any(|f| case.contains(f.as_str())) {
                continue;
            }
            // `state` reads a pool of one instance per function, the costliest to group.
            let pool = runtime.block_on(hot_pool(n, kind == "same", &called));
            let (median, fastest, slowest) = if kind == "state" {
                measure(|iterations| run_state(&pool, iterations))
            } else {
                measure(|iterations| runtime.block_on(run(&pool, &called, iterations)))
            };
            println!("{kind:<8} {n:>9} {median:>14.1} {fastest:>12.1} {slowest:>12.1}");
        }
    }
}
