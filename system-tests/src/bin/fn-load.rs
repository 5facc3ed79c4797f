//! `fn-load`: throughput, latency and memory of the dataplane under load, measured on this
//! machine with the binaries of one build (release, for figures worth quoting).
//!
//! It starts a cluster like the system tests do (an lb-agent and `--runners` pure-runners on
//! loopback, mutual TLS with certificates generated for the run, binaries from
//! `FN_TEST_BIN_DIR`), then:
//! 1. `--hello-calls` sequential calls of `fn-hello` on one keep-alive connection: the
//!    LB + runner overhead of one call with nothing else running;
//! 2. `--warmup` echo calls, not counted (function instances start);
//! 3. `--calls` echo calls, `--concurrency` at a time, payload sizes from `--payload`, every
//!    answer checked by SHA-256 and entered in a ledger (the stress test's [`calls`] module).
//!
//! It prints calls/s, MB/s of payload, p50/p90/p99/max latency, errors by kind and the peak
//! RSS (`VmHWM`) of the lb-agent and of each runner, and writes the table to
//! `target/reliability/load.<case>.txt`. Exits 1 when a call failed.
//!
//! Run: `make load LOAD_ARGS='--payload small'`, which builds the workspace in the `dist`
//! profile (release with thin LTO) and runs `FN_TEST_BIN_DIR=target/dist target/dist/fn-load
//! $(LOAD_ARGS)`.
//!
//! Soak mode, `--soak 10m`: no hello or warm-up round and no fixed number of calls; instead
//! echo calls, `--concurrency` at a time (16 unless given), every answer checked, until the
//! duration has passed (calls in flight then get at most their usual bound to finish). The
//! daemons log at `warn` (so that their logs do not grow with every call). Every
//! `--soak-interval` (60 s unless given) one line: elapsed time, calls completed in the
//! interval and calls/s, latency p50/p99, errors in the interval by kind, errors so far, the
//! RSS (`VmRSS`) and open file descriptors of the lb-agent and of each runner, and the
//! "teardowns": lb-agent log lines so far that show an LB → runner connection torn down or a
//! runner marked unreachable (see [`load::is_teardown_line`]). Then a summary (totals, RSS of
//! the first, second and last interval with the change from the second to the last, fds
//! first and last; the daemons' figures of the last line are taken at the end of the
//! duration, before the calls in flight drain and the load's connections close). The lines
//! and the summary are also appended, as they come, to
//! `target/reliability/load.soak-<case>.txt`. Exits 1 when any call failed, any teardown was
//! seen or a daemon went away; 0 otherwise.
//!
//! The load generator shares the machine with the daemons and the functions: on a small
//! machine it takes a good part of the CPU, and the figures are those of the whole system.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use fn_system_tests::calls::{self, Calls, SIZE_CLASSES};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::load::{
    self, Client, Payloads, ProcSample, Rng, Tally, clock, count_teardowns, parse_duration,
    per_second, rss_change, soak_failure, strip_ansi, teardown_lines,
};
use fn_system_tests::report::{Ledger, Report};
use fn_system_tests::{metrics, zipf};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Distinct base payloads at most (each call makes its own unique body from one).
const BASES: usize = 256;
/// Bytes all base payloads may take together (fewer bases for large fixed sizes).
const BASES_BYTES: usize = 256 * MIB;
/// Bound for one call; past it the call counts as `hung`.
const CALL_BOUND: Duration = Duration::from_secs(60);
/// The body of the hello calls, and what `fn-hello` answers to it.
const HELLO_NAME: &str = "Ada";
const HELLO_ANSWER: &str = "Hello, Ada!\n";
/// Calls in flight at once unless `--concurrency` says otherwise.
const CONCURRENCY: usize = 64;
/// The same for a soak: a steady load, not a saturating one.
const SOAK_CONCURRENCY: usize = 16;
/// `FN_LOG_LEVEL` of the daemons of a soak: warnings (runner unreachable, h2's reset limit)
/// stay, the lb-agent's two info lines per call go.
const SOAK_LOG_LEVEL: &str = "warn";
/// Failed calls whose details a soak keeps for its summary.
const SOAK_FAILURES_KEPT: usize = 10;

/// Each runner's memory for the echo workload unless `--runner-memory-mb` says otherwise.
const ECHO_RUNNER_MEMORY_MB: u64 = 1536;
/// The same for the zipf workload: room for 12 instances.
const ZIPF_RUNNER_MEMORY_MB: u64 = 12 * zipf::MEMORY_MB;

const CATALOG: &str = r#"
[[functions]]
app = "load"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 64
timeout = "60s"

[[functions]]
app = "load"
name = "hello"
route = "/hello"
command = ["fn-hello"]
memory_mb = 64
timeout = "10s"
"#;

/// Payload sizes of the echo calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Uniform in 0 B–1 MiB.
    Uniform,
    /// Uniform in 0–4 KiB.
    Small,
    /// Always this many bytes.
    Fixed(usize),
}

impl Mix {
    fn size(self, rng: &mut Rng) -> usize {
        let (lo, hi) = match self {
            Mix::Uniform => return calls::uniform_size(rng),
            Mix::Small => (0, 4 * KIB),
            Mix::Fixed(n) => (n, n),
        };
        usize::try_from(rng.range(lo as u64, hi as u64)).unwrap_or(hi)
    }

    fn max(self) -> usize {
        match self {
            Mix::Uniform => MIB,
            Mix::Small => 4 * KIB,
            Mix::Fixed(n) => n,
        }
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mix::Uniform => f.write_str("uniform 0 B-1 MiB"),
            Mix::Small => f.write_str("small 0-4 KiB"),
            Mix::Fixed(n) => write!(f, "fixed {n} B"),
        }
    }
}

/// `uniform`, `small`, or a size: bytes, or with a `k` (KiB) or `m` (MiB) suffix.
fn parse_mix(s: &str) -> Result<Mix, String> {
    match s {
        "uniform" => return Ok(Mix::Uniform),
        "small" => return Ok(Mix::Small),
        _ => {}
    }
    let lower = s.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, KIB),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, MIB),
            None => (lower.as_str(), 1),
        },
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected uniform, small, or a size such as 100, 64k or 1m"))?;
    n.checked_mul(unit)
        .filter(|n| *n <= 64 * MIB)
        .map(Mix::Fixed)
        .ok_or_else(|| format!("{s:?}: at most 64m"))
}

/// Drives echo calls through a local cluster and reports throughput, latency and memory.
#[derive(Debug, Parser)]
#[command(name = "fn-load")]
struct Args {
    /// Echo calls to measure.
    #[arg(long, default_value_t = 20_000)]
    calls: u64,
    /// Calls in flight at once (one keep-alive connection each) [default: 64; 16 with
    /// --soak].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Pure-runners behind the lb-agent.
    #[arg(long, default_value_t = 3)]
    runners: usize,
    /// Payload sizes: `uniform` (0 B-1 MiB), `small` (0-4 KiB), or a fixed size (`64k`).
    #[arg(long, default_value = "uniform", value_parser = parse_mix)]
    payload: Mix,
    /// The lb-agent's placer (echo workload).
    #[arg(long, default_value = "warm", value_parser = ["naive", "ch", "warm"])]
    placer: String,
    /// `echo` (calls of one echo function, by payload size) or `zipf` (the placement
    /// workload: `--functions` functions of skewed popularity, run once per placer of
    /// `--zipf-placers`, each on a fresh cluster).
    #[arg(long, default_value = "echo", value_parser = ["echo", "zipf"])]
    workload: String,
    /// Zipf workload: functions in the catalog (64 MB each).
    #[arg(long, default_value_t = 100)]
    functions: usize,
    /// Zipf workload: the Zipf exponent of the functions other than the hottest.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    /// Zipf workload: the share of all calls that go to the hottest function.
    #[arg(long, default_value_t = 0.4)]
    hot_share: f64,
    /// Zipf workload: the placers to compare, comma-separated.
    #[arg(long, default_value = "ch,naive,warm", value_delimiter = ',')]
    zipf_placers: Vec<String>,
    /// Sequential `fn-hello` calls measured before the load (0: none).
    #[arg(long, default_value_t = 1000)]
    hello_calls: u64,
    /// Echo calls sent before the measured ones, not counted.
    #[arg(long, default_value_t = 256)]
    warmup: u64,
    /// Each runner's `FN_MAX_MEMORY_MB` (instances take 64 MB each) [default: 1536; 768,
    /// room for 12 instances, with `--workload zipf`].
    #[arg(long)]
    runner_memory_mb: Option<u64>,
    /// Seed of the payloads (printed, to replay a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Soak: echo calls for this long (`90s`, `10m`, `1h30m`) instead of `--calls`, with a
    /// line of throughput, errors, RSS, open fds and runner-connection teardowns every
    /// `--soak-interval`; exits 1 on any failed call or teardown.
    #[arg(
        long,
        value_parser = parse_duration,
        conflicts_with_all = ["calls", "hello_calls", "warmup"]
    )]
    soak: Option<Duration>,
    /// Soak: time between two lines (`60s`, `10s`, ...).
    #[arg(long, default_value = "60s", value_parser = parse_duration, requires = "soak")]
    soak_interval: Duration,
    /// Extra environment of the lb-agent, `KEY=VALUE` (repeatable): to try a setting
    /// (`--lb-env FN_PLACER_EPSILON=0.5`).
    #[arg(long = "lb-env", value_parser = parse_env_pair)]
    lb_env: Vec<(String, String)>,
    /// Extra environment of each pure-runner, `KEY=VALUE` (repeatable).
    #[arg(long = "runner-env", value_parser = parse_env_pair)]
    runner_env: Vec<(String, String)>,
}

/// `KEY=VALUE`, for `--lb-env` and `--runner-env`.
fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::select! {
        result = run(args) => result,
        signal = stop_signal() => {
            // `run` is dropped by now, and with it the cluster it started: its daemons are
            // killed on drop (exiting from the signal's default action would skip that).
            bail!("stopped by {signal}; the cluster's daemons were stopped")
        }
    }
}

/// The first SIGINT, SIGTERM or SIGHUP; never, when they cannot be caught.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.calls > 0, "--calls must be at least 1");
    let concurrency = args.concurrency.unwrap_or(if args.soak.is_some() {
        SOAK_CONCURRENCY
    } else {
        CONCURRENCY
    });
    ensure!(concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.runners > 0, "--runners must be at least 1");
    let bin_dir = fn_test_support::bin_dir();
    for bin in ["lb-agent", "pure-runner", "fn-echo", "fn-hello"] {
        ensure!(
            bin_dir.join(bin).is_file(),
            "{} not found: build with `cargo build --release --workspace --bins` and set \
             FN_TEST_BIN_DIR (make load does both)",
            bin_dir.join(bin).display()
        );
    }
    let seed = match args.seed {
        Some(seed) => seed,
        None => {
            u64::from(std::process::id()) ^ (std::time::UNIX_EPOCH.elapsed()?.as_nanos() as u64)
        }
    };
    eprintln!("fn-load: binaries from {}", bin_dir.display());
    eprintln!("fn-load: load average at start: {}", load_average());
    if args.workload == "zipf" {
        return zipf(&args, concurrency, seed).await;
    }
    if let Some(duration) = args.soak {
        // The verdict is printed; the cluster is gone by now (exit skips destructors).
        if !soak(&args, duration, concurrency, seed).await? {
            std::process::exit(1);
        }
        return Ok(());
    }

    let cluster = Cluster::start(setup(&args))
        .await
        .context("starting the cluster")?;

    let mut report = Report::new(
        "load",
        &format!(
            "{}-c{}-r{}-{}",
            args.payload.to_string().replace(' ', "_"),
            concurrency,
            args.runners,
            args.placer
        ),
    );

    let hello = if args.hello_calls > 0 {
        let hello = hello_calls(&cluster, args.hello_calls).await?;
        report.case("hello, sequential", &hello);
        Some(hello)
    } else {
        None
    };

    let mut rng = Rng::new(seed);
    let mix = args.payload;
    let bases = (BASES_BYTES / mix.max().max(1)).clamp(1, BASES);
    let payloads = Arc::new(Payloads::new(&mut rng, bases, &[], |rng| mix.size(rng)));
    let mean = payloads.sizes().sum::<usize>() / bases;
    let spec = Calls {
        address: cluster.http.clone(),
        path: "/r/load/echo".into(),
        calls: args.warmup,
        concurrency,
        payloads,
        seed: seed ^ 0x5741_524d,
        call_bound: CALL_BOUND,
        run_bound: Duration::from_secs(600),
    };
    if args.warmup > 0 {
        let warm = calls::run(spec.clone()).await.context("warm-up")?;
        let errors = warm.total().error_count();
        if errors > 0 {
            eprintln!("fn-load: {errors} of {} warm-up calls failed", args.warmup);
        }
    }
    let outcomes = calls::run(Calls {
        calls: args.calls,
        seed,
        run_bound: Duration::from_secs(3600),
        ..spec
    })
    .await
    .context("the measured calls")?;
    let load_after = load_average();

    let total = outcomes.total();
    for (class, ledger) in SIZE_CLASSES.iter().zip(&outcomes.by_class) {
        if ledger.sent_count() > 0 {
            report.case(&format!("echo {}", class.name), ledger);
        }
    }
    let secs = outcomes.elapsed.as_secs_f64();
    report.note(format!(
        "{} echo calls ({} payloads, mean {mean} B), {} concurrent, {} runners, placer {}, \
         seed {seed}",
        args.calls, args.payload, concurrency, args.runners, args.placer
    ));
    report.note(format!(
        "echo: {:.1?}: {:.0} calls/s, {:.1} MB/s of payload each way; latency p50 {} p90 {} \
         p99 {} max {}",
        outcomes.elapsed,
        total.sent_count() as f64 / secs,
        outcomes.payload_bytes as f64 / 1e6 / secs,
        ms(total.quantile(0.50)),
        ms(total.quantile(0.90)),
        ms(total.quantile(0.99)),
        ms(total.max_latency())
    ));
    if let Some(hello) = &hello {
        report.note(format!(
            "hello, 1 at a time: latency p50 {} p90 {} p99 {} max {}",
            ms(hello.quantile(0.50)),
            ms(hello.quantile(0.90)),
            ms(hello.quantile(0.99)),
            ms(hello.max_latency())
        ));
    }
    report.note(format!(
        "peak RSS (VmHWM): lb-agent {}; runners {}",
        peak_rss(cluster.lb.pid()),
        cluster
            .runners
            .iter()
            .map(|r| peak_rss(r.pid()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.note(format!(
        "binaries from {}; load average after the run: {load_after}",
        bin_dir.display()
    ));
    report.publish();
    if total.error_count() > 0 {
        bail!(
            "{} of {} calls failed: {:?}; first failures:\n{}",
            total.error_count(),
            total.sent_count(),
            total.errors(),
            outcomes.failures.join("\n")
        );
    }
    Ok(())
}

/// `count` `fn-hello` calls one after the other on one keep-alive connection, after one
/// call that starts the instance (not counted).
async fn hello_calls(cluster: &Cluster, count: u64) -> anyhow::Result<Ledger> {
    let expected: [u8; 32] = Sha256::digest(HELLO_ANSWER.as_bytes()).into();
    let mut client = Client::new(&cluster.http);
    let path = "/r/load/hello";
    let first = client
        .echo(path, HELLO_NAME.into(), expected, CALL_BOUND)
        .await;
    if let Some(kind) = &first.error {
        bail!("the first hello call failed: {kind}: {}", first.detail);
    }
    let mut ledger = Ledger::new();
    let started = Instant::now();
    for _ in 0..count {
        ledger.sent();
        let outcome = client
            .echo(path, HELLO_NAME.into(), expected, CALL_BOUND)
            .await;
        match outcome.error {
            None => ledger.ok(outcome.latency),
            Some(kind) => ledger.error(kind, outcome.latency),
        }
    }
    eprintln!(
        "fn-load: {count} sequential hello calls in {:.1?}",
        started.elapsed()
    );
    Ok(ledger)
}

/// `VmHWM` (peak resident set) of process `pid`, as `/proc` writes it, or why not.
fn peak_rss(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "(exited)".to_owned();
    };
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .map_or_else(|| "(no VmHWM)".to_owned(), |v| v.trim().to_owned()),
        Err(e) => format!("(/proc/{pid}/status: {e})"),
    }
}

/// The 1, 5 and 15 minute load averages of the machine.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("(/proc/loadavg: {e})"))
}

/// A latency in milliseconds, for the notes.
fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.2} ms", d.as_secs_f64() * 1e3),
    )
}

/// What the soak's workers share with its sampler: the calls of the current interval and the
/// first failures.
#[derive(Debug, Default)]
struct SoakShared {
    interval: Tally,
    failures: Vec<String>,
}

/// One daemon watched by a soak: its name, pid and a sample per interval.
#[derive(Debug)]
struct Watched {
    name: String,
    pid: Option<u32>,
    samples: Vec<ProcSample>,
}

/// The soak's output: each line to stderr and appended to its report file as it comes, so
/// that an interrupted soak leaves what it saw.
#[derive(Debug)]
struct SoakLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl SoakLog {
    fn create(path: PathBuf) -> SoakLog {
        let file = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(&path));
        let file = match file {
            Ok(file) => Some(file),
            Err(e) => {
                eprintln!("fn-load: could not write {}: {e}", path.display());
                None
            }
        };
        SoakLog { path, file }
    }

    fn line(&mut self, text: &str) {
        eprintln!("{text}");
        if let Some(file) = &mut self.file
            && writeln!(file, "{text}").is_err()
        {
            eprintln!("fn-load: could not append to {}", self.path.display());
            self.file = None;
        }
    }
}

/// The cluster the flags ask for: an lb-agent and `--runners` runners over the catalog.
fn setup(args: &Args) -> Setup {
    Setup {
        runners: args.runners,
        runner_memory_mb: args.runner_memory_mb.unwrap_or(ECHO_RUNNER_MEMORY_MB),
        placer: args.placer.clone(),
        catalog: CATALOG.into(),
        max_request_body: Some((args.payload.max() + MIB) as u64),
        lb_env: args.lb_env.clone(),
        runner_env: args.runner_env.clone(),
        ..Setup::default()
    }
}

/// `--soak`: echo calls for `duration`, a line every `--soak-interval`, a summary and the
/// verdict: false when a call failed, a teardown was seen or a daemon went away.
///
/// # Errors
/// When the cluster does not start or a load worker panicked.
async fn soak(
    args: &Args,
    duration: Duration,
    concurrency: usize,
    seed: u64,
) -> anyhow::Result<bool> {
    let every = args.soak_interval;
    ensure!(duration > Duration::ZERO, "--soak must be longer than 0s");
    ensure!(
        every >= Duration::from_secs(1),
        "--soak-interval must be at least 1s"
    );
    let quiet = fn_system_tests::env(&[("FN_LOG_LEVEL", SOAK_LOG_LEVEL), ("NO_COLOR", "1")]);
    let cluster = Cluster::start(Setup {
        lb_env: fn_system_tests::merge(&[&quiet, &args.lb_env]),
        runner_env: fn_system_tests::merge(&[&quiet, &args.runner_env]),
        ..setup(args)
    })
    .await
    .context("starting the cluster")?;

    let case = format!(
        "soak-{}-c{concurrency}-r{}-{}",
        args.payload.to_string().replace(' ', "_"),
        args.runners,
        args.placer
    );
    let mut out = SoakLog::create(reliability_dir().join(format!("load.{case}.txt")));
    let mut rng = Rng::new(seed);
    let mix = args.payload;
    let bases = (BASES_BYTES / mix.max().max(1)).clamp(1, BASES);
    let payloads = Arc::new(Payloads::new(&mut rng, bases, &[], |rng| mix.size(rng)));
    let mean = payloads.sizes().sum::<usize>() / bases;
    out.line(&format!(
        "== soak: load / {case} ==\n  {duration:?} of echo calls ({} payloads, mean {mean} B), \
         {concurrency} concurrent, {} runners, placer {}, seed {seed}, daemons at \
         FN_LOG_LEVEL={SOAK_LOG_LEVEL}; a line every {every:?}",
        args.payload, args.runners, args.placer
    ));

    let mut watched = vec![Watched {
        name: "lb-agent".to_owned(),
        pid: cluster.lb.pid(),
        samples: Vec::new(),
    }];
    for (i, runner) in cluster.runners.iter().enumerate() {
        watched.push(Watched {
            name: format!("runner {i}"),
            pid: runner.pid(),
            samples: Vec::new(),
        });
    }

    let shared = Arc::new(Mutex::new(SoakShared::default()));
    // Set at the deadline, once the daemons have been looked at under load.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            let payloads = Arc::clone(&payloads);
            let address = cluster.http.clone();
            let mut rng = Rng::new(seed ^ ((w as u64 + 1) << 32));
            tokio::spawn(async move {
                let mut client = Client::new(&address);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Unique across workers, so that every body is different.
                    let call = ((w as u64 + 1) << 40) | n;
                    n += 1;
                    let (body, hash) = payloads.body(&mut rng, call);
                    let len = body.len();
                    let outcome = client.echo("/r/load/echo", body, hash, CALL_BOUND).await;
                    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    shared
                        .interval
                        .record(outcome.error.as_deref(), len, outcome.latency);
                    if let Some(kind) = &outcome.error
                        && shared.failures.len() < SOAK_FAILURES_KEPT
                    {
                        shared.failures.push(format!(
                            "[{}] call {call} ({len} B): {kind}: {}",
                            clock(started.elapsed()),
                            outcome.detail
                        ));
                    }
                }
            })
        })
        .collect();

    let mut total = Tally::default();
    let mut last_sample = started;
    let probe = |watched: &[Watched]| -> Vec<ProcSample> {
        watched.iter().map(|d| ProcSample::read(d.pid)).collect()
    };
    // One line: the calls completed since the last one, the daemons as `procs` found them.
    let mut sample =
        |total: &mut Tally, watched: &mut [Watched], procs: Vec<ProcSample>, out: &mut SoakLog| {
            let now = Instant::now();
            let interval = std::mem::take(
                &mut shared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .interval,
            );
            let span = now - last_sample;
            last_sample = now;
            total.merge(&interval);
            let teardowns = count_teardowns(&cluster.lb.log());
            let daemons: Vec<String> = watched
                .iter_mut()
                .zip(procs)
                .map(|(d, s)| {
                    d.samples.push(s);
                    format!("{} {}", d.name, s.show())
                })
                .collect();
            out.line(&format!(
                "[{}] {} calls, {:.1} calls/s, p50 {} p99 {}; errors {} ({}), total errors {}; {}; \
             teardowns {teardowns}",
                clock(now - started),
                interval.calls,
                per_second(interval.calls, span),
                ms(interval.quantile(0.50)),
                ms(interval.quantile(0.99)),
                interval.error_count(),
                interval.errors_by_kind(),
                total.error_count(),
                daemons.join("; ")
            ));
            teardowns
        };

    for k in 1u32.. {
        let tick = started + every.saturating_mul(k);
        tokio::time::sleep_until(tick.min(deadline).into()).await;
        if tick >= deadline {
            break;
        }
        let procs = probe(&watched);
        sample(&mut total, &mut watched, procs, &mut out);
    }
    // The daemons as the load left them (once the workers are done, their connections to the
    // lb-agent are closed and its fds are fewer).
    let procs = probe(&watched);
    // No call starts past the deadline; the ones in flight have their bound.
    stop.store(true, Ordering::SeqCst);
    let drain = tokio::time::Instant::from_std(deadline + CALL_BOUND + Duration::from_secs(5));
    let mut stuck = 0usize;
    for worker in &mut workers {
        match tokio::time::timeout_at(drain, &mut *worker).await {
            Ok(joined) => joined.context("a soak worker panicked")?,
            Err(_) => {
                worker.abort();
                stuck += 1;
            }
        }
    }
    let teardowns = sample(&mut total, &mut watched, procs, &mut out);
    let elapsed = last_sample - started;

    // The summary.
    out.line(&format!(
        "== soak summary: {} calls in {elapsed:.1?}: {:.1} calls/s, {:.2} MB/s of payload \
         each way",
        total.calls,
        per_second(total.calls, elapsed),
        total.payload_bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
    ));
    out.line(&format!(
        "  errors: {} ({}); teardowns (lb-agent log lines): {teardowns}",
        total.error_count(),
        total.errors_by_kind()
    ));
    out.line(
        "  RSS MiB, interval 1 / 2 / last, change from interval 2 to the last; open fds, \
         interval 1 / last:",
    );
    let mut problems = Vec::new();
    for d in &watched {
        let rss = |s: Option<&ProcSample>| {
            s.and_then(|s| s.rss_kib)
                .map_or_else(|| "?".to_owned(), load::mib)
        };
        let fds = |s: Option<&ProcSample>| {
            s.and_then(|s| s.fds)
                .map_or_else(|| "?".to_owned(), |n| n.to_string())
        };
        let (first, second, last) = (d.samples.first(), d.samples.get(1), d.samples.last());
        let change = match (second.and_then(|s| s.rss_kib), last.and_then(|s| s.rss_kib)) {
            _ if d.samples.len() < 3 => "(fewer than 3 intervals)".to_owned(),
            (Some(from), Some(to)) => rss_change(from, to),
            _ => "?".to_owned(),
        };
        out.line(&format!(
            "    {:<9} RSS {} / {} / {}  {change}; fds {} / {}",
            d.name,
            rss(first),
            rss(second),
            rss(last),
            fds(first),
            fds(last)
        ));
        if d.samples.iter().any(|s| s.rss_kib.is_none()) {
            problems.push(format!("{} went away", d.name));
        }
    }
    out.line(&format!(
        "  binaries from {}; load average at the end: {}",
        fn_test_support::bin_dir().display(),
        load_average()
    ));
    let failures = std::mem::take(
        &mut shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures,
    );
    if !failures.is_empty() {
        out.line(&format!(
            "  first failed calls:\n    {}",
            failures.join("\n    ")
        ));
    }
    if teardowns > 0 {
        let log = cluster.lb.log();
        let lines: Vec<String> = teardown_lines(&log).take(10).map(strip_ansi).collect();
        out.line(&format!(
            "  teardown lines (first {}):\n    {}",
            lines.len(),
            lines.join("\n    ")
        ));
    }
    if stuck > 0 {
        problems.push(format!("{stuck} load workers stuck past the call bound"));
    }
    let verdict = soak_failure(total.error_count(), teardowns, &problems);
    out.line(&match &verdict {
        None => "  PASS: no failed call, no teardown".to_owned(),
        Some(why) => format!("  FAIL: {why}"),
    });
    eprintln!("  (also in {})", out.path.display());
    Ok(verdict.is_none())
}

/// `target/reliability` next to the binaries' directory, where [`Report::publish`] writes.
fn reliability_dir() -> PathBuf {
    let bin_dir = fn_test_support::bin_dir();
    let target = bin_dir.canonicalize().unwrap_or(bin_dir);
    target
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("reliability")
}

/// Cold starts per 1,000 calls by popularity band (`0`, `1-3`, `4-10`, `11-30`, `31-`), with
/// each band's share of the calls: where cold starts are, for the zipf report.
fn bands(calls: &[u64], cold: &[u64]) -> String {
    let total = calls.iter().sum::<u64>().max(1) as f64;
    [(0, 1), (1, 4), (4, 11), (11, 31), (31, usize::MAX)]
        .into_iter()
        .filter(|&(from, _)| from < calls.len())
        .map(|(from, to)| {
            let to = to.min(calls.len());
            let sent: u64 = calls[from..to].iter().sum();
            let started: u64 = cold.get(from..to).map_or(0, |c| c.iter().sum());
            let label = match to - from {
                1 => format!("{from}"),
                _ if to == calls.len() => format!("{from}-"),
                _ => format!("{from}-{}", to - 1),
            };
            format!(
                "{label}: {:.0} ({:.0}% of calls)",
                started as f64 * 1000.0 / sent.max(1) as f64,
                sent as f64 * 100.0 / total
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one placer did on the zipf workload.
struct ZipfRow {
    placer: String,
    outcome: zipf::Outcome,
    /// Placement attempts that did not commit (refusals, unreachable runners).
    refusals: f64,
    /// Instances the runners started.
    instances_started: f64,
    /// Mean cold start as the LB saw it (`Server-Timing` `start`).
    mean_cold_start: Option<Duration>,
}

/// `--workload zipf`: the placement workload once per placer, each on a fresh cluster, then
/// one table. Exits 1 when a call failed.
///
/// # Errors
/// When a cluster does not start or its metrics cannot be read.
async fn zipf(args: &Args, concurrency: usize, seed: u64) -> anyhow::Result<()> {
    ensure!(args.functions > 0, "--functions must be at least 1");
    ensure!(
        (0.0..=1.0).contains(&args.hot_share),
        "--hot-share must be from 0 to 1"
    );
    let popularity = Arc::new(zipf::Popularity::new(
        args.functions,
        args.zipf_s,
        args.hot_share,
    ));
    let memory = args.runner_memory_mb.unwrap_or(ZIPF_RUNNER_MEMORY_MB);
    let mut rows = Vec::new();
    for placer in &args.zipf_placers {
        ensure!(
            ["naive", "ch", "warm"].contains(&placer.as_str()),
            "--zipf-placers: unknown placer {placer:?} (naive, ch, warm)"
        );
        let quiet = fn_system_tests::env(&[("FN_LOG_LEVEL", SOAK_LOG_LEVEL), ("NO_COLOR", "1")]);
        let cluster = Cluster::start(Setup {
            runners: args.runners,
            runner_memory_mb: memory,
            placer: placer.clone(),
            catalog: zipf::catalog(args.functions),
            metrics: true,
            lb_env: fn_system_tests::merge(&[&quiet, &args.lb_env]),
            runner_env: fn_system_tests::merge(&[&quiet, &args.runner_env]),
            ..Setup::default()
        })
        .await
        .context("starting the cluster")?;
        let lb_metrics = cluster.lb_metrics.clone().context("LB metrics address")?;
        let attempts = |text: &str| {
            metrics::sum(text, "fn_lb_placement_attempts_total")
                - metrics::sum(text, "fn_lb_placement_seconds_count")
        };
        let before = attempts(&metrics::scrape(&lb_metrics).await?);
        eprintln!(
            "fn-load: zipf, placer {placer}: {} calls, {concurrency} concurrent",
            args.calls
        );
        let outcome = zipf::run(zipf::Spec {
            address: cluster.http.clone(),
            calls: args.calls,
            concurrency,
            popularity: Arc::clone(&popularity),
            seed,
            call_bound: CALL_BOUND,
        })
        .await?;
        let after = metrics::scrape(&lb_metrics).await?;
        let refusals = attempts(&after) - before;
        let starts = metrics::sum(&after, "fn_lb_cold_start_seconds_count");
        let mean_cold_start = (starts > 0.0).then(|| {
            Duration::from_secs_f64(metrics::sum(&after, "fn_lb_cold_start_seconds_sum") / starts)
        });
        let mut instances_started = 0.0;
        for runner in &cluster.runners {
            let address = runner
                .metrics
                .as_deref()
                .context("runner metrics address")?;
            instances_started += metrics::sum(
                &metrics::scrape(address).await?,
                "fn_runner_instance_starts_total",
            );
        }
        rows.push(ZipfRow {
            placer: placer.clone(),
            outcome,
            refusals,
            instances_started,
            mean_cold_start,
        });
    }

    let mut report = Report::new(
        "load",
        &format!(
            "zipf-f{}-c{concurrency}-r{}-m{memory}",
            args.functions, args.runners
        ),
    );
    for row in &rows {
        report.case(&format!("placer {}", row.placer), &row.outcome.ledger);
    }
    report.note(format!(
        "{} calls per placer, {concurrency} concurrent, {} runners of {memory} MB ({} instances \
         of {} MB each), {} functions: {:.0}% to the hottest, the rest Zipf s = {}; seed {seed}",
        args.calls,
        args.runners,
        memory / zipf::MEMORY_MB,
        zipf::MEMORY_MB,
        args.functions,
        args.hot_share * 100.0,
        args.zipf_s
    ));
    report.note(
        "| placer | calls/s | cold starts per 1,000 calls | the hottest's, per 1,000 of its calls | mean cold start | instances started | refusals per call | p50 | p99 | errors |"
            .to_owned(),
    );
    report.note("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|".to_owned());
    let mut failed = 0;
    for row in &rows {
        let ledger = &row.outcome.ledger;
        let calls = ledger.sent_count().max(1) as f64;
        failed += ledger.error_count();
        let hottest = |v: &[u64]| v.first().copied().unwrap_or(0) as f64;
        report.note(format!(
            "| {} | {:.0} | {:.1} | {:.1} | {} | {:.0} | {:.3} | {} | {} | {} |",
            row.placer,
            ledger.sent_count() as f64 / row.outcome.elapsed.as_secs_f64(),
            row.outcome.cold_starts as f64 * 1000.0 / calls,
            hottest(&row.outcome.cold_per_function) * 1000.0
                / hottest(&row.outcome.per_function).max(1.0),
            ms(row.mean_cold_start),
            row.instances_started,
            row.refusals / calls,
            ms(ledger.quantile(0.50)),
            ms(ledger.quantile(0.99)),
            ledger.error_count()
        ));
    }
    report.note(
        "cold starts per 1,000 calls of each popularity band (function indices by rank: 0 is \
         the hottest, 1.. the Zipf tail), and the band's share of the calls:"
            .to_owned(),
    );
    for row in &rows {
        report.note(format!(
            "  {}: {}",
            row.placer,
            bands(&row.outcome.per_function, &row.outcome.cold_per_function)
        ));
    }
    report.publish();
    if failed > 0 {
        let firsts: Vec<_> = rows
            .iter()
            .flat_map(|r| r.outcome.failures.clone())
            .collect();
        bail!(
            "{failed} calls failed; first failures:\n{}",
            firsts.join("\n")
        );
    }
    Ok(())
}
