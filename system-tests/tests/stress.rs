//! Stress with a ledger: 20,000 echo calls, 64 at a time, random payloads from 0 B to 1 MiB,
//! through the lb-agent and three pure-runners to `fn-echo`. Every response is checked by
//! SHA-256 (every body is unique, so an answer that belongs to another call is caught), and
//! the ledger must reconcile exactly: calls sent = successes + classified errors. In a
//! healthy cluster there must be no error at all.
//!
//! Payload sizes: the system tests run debug builds on a 2-core machine, where SHA-256 alone
//! runs at about 30 MB/s: sizes uniform in 0 B–1 MiB (512 KiB on average, 20 GB of traffic)
//! measured 71 calls/s, almost 5 minutes for 20,000 calls. The mix is mostly small with a
//! tail up to 1 MiB: 70% log-uniform in 1 B–16 KiB, 22% log-uniform in 16–256 KiB, 8%
//! uniform in 256 KiB–1 MiB (about 70 KiB per call on average), and the first calls of every
//! run carry the edge sizes 0 B, 1 B, 8 B, 9 B, 64 KiB, 1 MiB - 1 and exactly 1 MiB.
//!
//! `FN_STRESS_CALLS` scales the run (CI runs the full 20,000); `FN_STRESS_SEED` replays one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::load::{Client, Payloads, Rng};
use fn_system_tests::report::{Ledger, Report};

const DEFAULT_CALLS: u64 = 20_000;
const CONCURRENCY: usize = 64;
/// Bound for one call; past it the call counts as hung.
const CALL_BOUND: Duration = Duration::from_secs(60);
/// Bound for the whole run; workers stop taking calls past it (and the test fails).
const RUN_BOUND: Duration = Duration::from_secs(20 * 60);
const MIB: usize = 1024 * 1024;
/// Distinct base payloads (each call makes its own unique body from one).
const BASES: usize = 1024;

const CATALOG: &str = r#"
[[functions]]
app = "stress"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 64
timeout = "60s"
"#;

/// The payload classes of the table, by size.
const CLASSES: [(&str, usize, usize); 4] = [
    ("0 B", 0, 0),
    ("1 B-16 KiB", 1, 16 * 1024),
    ("16 KiB-256 KiB", 16 * 1024 + 1, 256 * 1024),
    ("256 KiB-1 MiB", 256 * 1024 + 1, MIB),
];

fn class_of(len: usize) -> usize {
    CLASSES
        .iter()
        .position(|(_, lo, hi)| (*lo..=*hi).contains(&len))
        .unwrap_or(CLASSES.len() - 1)
}

fn size(rng: &mut Rng) -> usize {
    let roll = rng.range(0, 99);
    let len = if roll < 70 {
        rng.log_range(1, 16 * 1024)
    } else if roll < 92 {
        rng.log_range(16 * 1024 + 1, 256 * 1024)
    } else {
        rng.range(256 * 1024 + 1, MIB as u64)
    };
    usize::try_from(len).unwrap_or(MIB)
}

fn env_u64(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.trim().parse().with_context(|| format!("{name}={v:?}"))?,
        )),
        Err(_) => Ok(None),
    }
}

/// What one worker saw.
struct WorkerResult {
    ledgers: Vec<Ledger>,
    call_ids: Vec<String>,
    failures: Vec<String>,
    bytes: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_echo_calls_reconcile_with_no_error() -> anyhow::Result<()> {
    let calls = env_u64("FN_STRESS_CALLS")?
        .unwrap_or(DEFAULT_CALLS)
        .clamp(1, 1_000_000);
    let seed = match env_u64("FN_STRESS_SEED")? {
        Some(seed) => seed,
        None => {
            u64::from(std::process::id()) ^ (std::time::UNIX_EPOCH.elapsed()?.as_nanos() as u64)
        }
    };
    let mut rng = Rng::new(seed);
    let payloads = Arc::new(Payloads::new(
        &mut rng,
        BASES,
        &[0, 1, 8, 9, 64 * 1024, MIB - 1, MIB],
        size,
    ));
    let mean = payloads.sizes().sum::<usize>() / BASES;

    // 64 calls of 64 MB each need 4 GB: 1536 MB per runner makes the home runner of `ch`
    // fill up and spill to the others, so refusals are part of the run.
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 1536,
        catalog: CATALOG.into(),
        max_request_body: Some(2 * MIB as u64),
        ..Setup::default()
    })
    .await?;

    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let next = Arc::clone(&next);
            let payloads = Arc::clone(&payloads);
            let address = cluster.http.clone();
            let mut rng = Rng::new(seed ^ ((w as u64 + 1) << 32));
            tokio::spawn(async move {
                let mut result = WorkerResult {
                    ledgers: vec![Ledger::new(); CLASSES.len()],
                    call_ids: Vec::new(),
                    failures: Vec::new(),
                    bytes: 0,
                };
                let mut client = Client::new(&address);
                loop {
                    let call = next.fetch_add(1, Ordering::Relaxed);
                    if call >= calls || started.elapsed() > RUN_BOUND {
                        break;
                    }
                    let (body, hash) = payloads.body(&mut rng, call);
                    let len = body.len();
                    let ledger = &mut result.ledgers[class_of(len)];
                    ledger.sent();
                    let outcome = client.echo("/r/stress/echo", body, hash, CALL_BOUND).await;
                    match &outcome.error {
                        None => {
                            ledger.ok(outcome.latency);
                            result.bytes += 2 * len as u64;
                        }
                        Some(kind) => {
                            ledger.error(kind.clone(), outcome.latency);
                            if result.failures.len() < 5 {
                                result.failures.push(format!(
                                    "call {call} ({len} B): {kind}: {}",
                                    outcome.detail
                                ));
                            }
                        }
                    }
                    if let Some(id) = outcome.call_id {
                        result.call_ids.push(id);
                    }
                }
                result
            })
        })
        .collect();

    let mut by_class = vec![Ledger::new(); CLASSES.len()];
    let mut ids = HashSet::new();
    let mut failures = Vec::new();
    let mut bytes = 0u64;
    for worker in workers {
        let result = worker.await.context("a worker panicked")?;
        for (total, ledger) in by_class.iter_mut().zip(&result.ledgers) {
            total.merge(ledger);
        }
        for id in result.call_ids {
            ensure!(ids.insert(id.clone()), "call id {id} seen twice");
        }
        failures.extend(result.failures);
        bytes += result.bytes;
    }
    let elapsed = started.elapsed();

    let mut report = Report::new("stress", "echo_ledger");
    let mut total = Ledger::new();
    for ((name, _, _), ledger) in CLASSES.iter().zip(&by_class) {
        report.case(name, ledger);
        total.merge(ledger);
    }
    report.note(format!(
        "{calls} calls, {CONCURRENCY} concurrent, {} base payloads (mean {mean} B), seed {seed}",
        BASES
    ));
    report.note(format!(
        "ran {elapsed:.1?}: {:.0} calls/s, {:.1} MB/s of checked echo traffic (both ways)",
        total.sent_count() as f64 / elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64()
    ));
    report.publish();

    report.reconcile()?;
    ensure!(
        total.sent_count() == calls,
        "only {} of {calls} calls were sent within {RUN_BOUND:?}",
        total.sent_count()
    );
    ensure!(
        total.error_count() == 0,
        "{} errors in a healthy cluster: {:?}; first failures:\n{}\n{}",
        total.error_count(),
        total.errors(),
        failures.join("\n"),
        cluster
            .logs()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        ids.len() as u64 == calls,
        "{} distinct call ids for {calls} calls",
        ids.len()
    );
    for (name, _, _) in CLASSES {
        let ledger = &by_class[CLASSES.iter().position(|c| c.0 == name).unwrap_or(0)];
        ensure!(
            calls < 1000 || ledger.sent_count() > 0,
            "no call of payload class {name}"
        );
    }
    // Nothing is left running on the runners.
    cluster.wait_idle(Duration::from_secs(10)).await?;
    Ok(())
}
