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
//! Run: `make load LOAD_ARGS='--payload small'`, which builds the workspace in release and
//! runs `FN_TEST_BIN_DIR=target/release target/release/fn-load $(LOAD_ARGS)`.
//!
//! The load generator shares the machine with the daemons and the functions: on a small
//! machine it takes a good part of the CPU, and the figures are those of the whole system.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use fn_system_tests::calls::{self, Calls, SIZE_CLASSES};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::load::{Client, Payloads, Rng};
use fn_system_tests::report::{Ledger, Report};
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
    /// Calls in flight at once (one keep-alive connection each).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Pure-runners behind the lb-agent.
    #[arg(long, default_value_t = 3)]
    runners: usize,
    /// Payload sizes: `uniform` (0 B-1 MiB), `small` (0-4 KiB), or a fixed size (`64k`).
    #[arg(long, default_value = "uniform", value_parser = parse_mix)]
    payload: Mix,
    /// The lb-agent's placer.
    #[arg(long, default_value = "ch", value_parser = ["naive", "ch"])]
    placer: String,
    /// Sequential `fn-hello` calls measured before the load (0: none).
    #[arg(long, default_value_t = 1000)]
    hello_calls: u64,
    /// Echo calls sent before the measured ones, not counted.
    #[arg(long, default_value_t = 256)]
    warmup: u64,
    /// Each runner's `FN_MAX_MEMORY_MB` (echo instances take 64 MB each).
    #[arg(long, default_value_t = 1536)]
    runner_memory_mb: u64,
    /// Seed of the payloads (printed, to replay a run).
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.calls > 0, "--calls must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
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

    let cluster = Cluster::start(Setup {
        runners: args.runners,
        runner_memory_mb: args.runner_memory_mb,
        placer: args.placer.clone(),
        catalog: CATALOG.into(),
        max_request_body: Some((args.payload.max() + MIB) as u64),
        ..Setup::default()
    })
    .await
    .context("starting the cluster")?;

    let mut report = Report::new(
        "load",
        &format!(
            "{}-c{}-r{}-{}",
            args.payload.to_string().replace(' ', "_"),
            args.concurrency,
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
        concurrency: args.concurrency,
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
        args.calls, args.payload, args.concurrency, args.runners, args.placer
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
    report.reconcile()?;
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
