//! How long one `process` driver cold start holds the runtime thread that runs it: the
//! synchronous part of [`ProcessDriver::start_process`] (instance directory, cgroups, fork
//! and exec, the move into the cgroups), during which every other task of that thread
//! (warm calls among them) waits.
//!
//! Each start is polled through [`Timed`], which times every poll of the start's future: the
//! longest poll is how long the start held the thread at once. The table shows, over the
//! starts of each case, the median and the slowest of that longest poll, and the median of
//! the whole start (until the function's listener is up, which the thread is free during).
//! The longest poll is split into the thread's time on a CPU, waiting for one (a busy
//! machine) and asleep (on a lock or I/O), from the thread's `schedstat`.
//! Starts run one after another, each instance killed and gone before the next.
//!
//! Cases: functions as the runner's own user (no uid to set: the standard library can use
//! `posix_spawn`), as `nobody` (a uid to set: it forks), and as `nobody` in memory and pids
//! cgroups, and that in namespaces of its own (the default on a root runner: a tmpfs as its
//! directory, `fn-isolate` sets the uid, so no fork); cgroup and `nobody` cases need root and are left out, with a line, where they
//! cannot run. `--ballast-mib N` first touches N MiB of heap, as a runner holding more
//! memory would (a fork copies the page tables).
//!
//! Needs the example functions: `cargo build --workspace --bins` first. Run:
//! `cargo bench -p fn-runner --bench cold_start` (`-- --starts 50 --ballast-mib 256`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fn_runner::driver::process::{
    FunctionUser, Isolation, MemoryLimitMode, MemoryLimits, ProcessDriver, ProcessDriverConfig,
};
use fn_runner::driver::{Instance, InstanceSpec};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A future whose polls are timed.
struct Timed<F> {
    inner: Pin<Box<F>>,
    longest: Duration,
    /// Of the longest poll: the thread's time on a CPU and waiting for one.
    longest_split: (Duration, Duration),
    first: Option<Duration>,
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = schedstat();
        let began = Instant::now();
        let polled = self.inner.as_mut().poll(cx);
        let took = began.elapsed();
        let after = schedstat();
        if took > self.longest {
            self.longest = took;
            self.longest_split = (
                after.0.saturating_sub(before.0),
                after.1.saturating_sub(before.1),
            );
        }
        self.first.get_or_insert(took);
        polled
    }
}

/// This thread's time on a CPU and waiting for one so far (`/proc/thread-self/schedstat`;
/// zero where it cannot be read). What a poll took beyond both, the thread slept: on a lock
/// (a fork holds the process's address space while it copies it) or on I/O.
fn schedstat() -> (Duration, Duration) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|f| Duration::from_nanos(f.parse().unwrap_or(0)));
    (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    )
}

struct Sample {
    longest: Duration,
    on_cpu: Duration,
    runnable: Duration,
    first: Duration,
    total: Duration,
}

fn spec(memory_mb: u64) -> InstanceSpec {
    InstanceSpec {
        app: "bench".into(),
        function: "echo".into(),
        command: vec!["fn-echo".into()],
        image: None,
        memory_mb,
        concurrency: 1,
        idle_timeout: Duration::from_secs(30),
        config: std::collections::BTreeMap::new(),
    }
}

async fn run_case(
    name: &str,
    user: Option<FunctionUser>,
    limits: MemoryLimits,
    isolation: Option<Isolation>,
    starts: usize,
) -> anyhow::Result<()> {
    let sockets = tempfile::tempdir()?;
    std::fs::set_permissions(
        sockets.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let cgroups = !matches!(limits, MemoryLimits::Off);
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), sockets.path().join("s"))
            .with_function_user(user)
            .with_memory_limits(limits)
            .with_isolation(isolation),
    )?;
    if cgroups
        && matches!(
            driver.memory_limit_mode(),
            MemoryLimitMode::Unenforced { .. }
        )
    {
        println!("{name:<28} skipped: {}", driver.memory_limit_mode());
        return Ok(());
    }
    let spec = spec(64);
    // One start first, not counted: the first fork of the process, page cache.
    for counted in std::iter::once(false).chain(std::iter::repeat_n(true, starts)) {
        let began = Instant::now();
        let mut timed = Timed {
            inner: Box::pin(driver.start_process(&spec, "bench", START_TIMEOUT)),
            longest: Duration::ZERO,
            longest_split: (Duration::ZERO, Duration::ZERO),
            first: None,
        };
        let instance = (&mut timed).await?;
        let total = began.elapsed();
        instance.kill();
        instance.wait_gone().await;
        if counted {
            SAMPLES.with_borrow_mut(|samples| {
                samples.push(Sample {
                    longest: timed.longest,
                    on_cpu: timed.longest_split.0,
                    runnable: timed.longest_split.1,
                    first: timed.first.unwrap_or_default(),
                    total,
                });
            });
        }
    }
    let mut samples = SAMPLES.take();
    let median = |samples: &mut Vec<Sample>, key: fn(&Sample) -> Duration| {
        samples.sort_by_key(key);
        let median = key(&samples[samples.len() / 2]);
        let max = samples.last().map(key).unwrap_or_default();
        (median, max)
    };
    let (longest, longest_max) = median(&mut samples, |s| s.longest);
    let (first, _) = median(&mut samples, |s| s.first);
    let (total, _) = median(&mut samples, |s| s.total);
    let (on_cpu, _) = median(&mut samples, |s| s.on_cpu);
    let (runnable, _) = median(&mut samples, |s| s.runnable);
    let (asleep, _) = median(&mut samples, |s| {
        s.longest.saturating_sub(s.on_cpu + s.runnable)
    });
    println!(
        "{name:<28} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        ms(longest),
        ms(longest_max),
        ms(on_cpu),
        ms(runnable),
        ms(asleep),
        ms(first),
        ms(total)
    );
    Ok(())
}

thread_local! {
    static SAMPLES: std::cell::RefCell<Vec<Sample>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let mut starts = 50;
    let mut ballast_mib = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--starts" => starts = args.next().unwrap_or_default().parse()?,
            "--ballast-mib" => ballast_mib = args.next().unwrap_or_default().parse()?,
            // cargo bench passes --bench
            _ => {}
        }
    }
    let ballast: Vec<u8> = vec![1; ballast_mib * 1024 * 1024];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let root = nix::unistd::geteuid().is_root();
    println!(
        "{starts} starts per case, ballast {ballast_mib} MiB; ms: longest poll (median, max; \
         medians of its time on a CPU, waiting for one, asleep), first poll (median), whole \
         start (median)"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "case", "held", "held max", "on cpu", "runnable", "asleep", "first", "start"
    );
    runtime.block_on(async {
        run_case(
            "runner's user, no cgroups",
            None,
            MemoryLimits::Off,
            None,
            starts,
        )
        .await?;
        if !root {
            println!("(not root: the cases as nobody and in cgroups are left out)");
            return Ok(());
        }
        let nobody = FunctionUser::lookup("nobody")?;
        run_case(
            "nobody, no cgroups",
            Some(nobody),
            MemoryLimits::Off,
            None,
            starts,
        )
        .await?;
        run_case(
            "nobody, memory+pids cgroups",
            Some(nobody),
            MemoryLimits::default(),
            None,
            starts,
        )
        .await?;
        // The default on a root runner: namespaces of its own (a tmpfs for its directory;
        // `fn-isolate` sets the uid, so no fork).
        let helper = fn_test_support::workspace_bin("fn-isolate");
        let probe = std::process::Command::new(&helper)
            .arg("--probe")
            .output()?;
        if !probe.status.success() {
            println!(
                "(no namespaces here: {})",
                String::from_utf8_lossy(&probe.stderr).trim()
            );
            return Ok(());
        }
        run_case(
            "nobody, cgroups, namespaces",
            Some(nobody),
            MemoryLimits::default(),
            Some(Isolation {
                helper,
                network_none: false,
            }),
            starts,
        )
        .await
    })?;
    drop(std::hint::black_box(ballast));
    Ok(())
}
