//! Stress with a ledger: 20,000 echo calls, 64 at a time, random payloads from 0 B to 1 MiB,
//! through the lb-agent and three pure-runners to `fn-echo`. Every response is checked by
//! SHA-256 (every body is unique, so an answer that belongs to another call is caught), every
//! call must be sent within the run's bound and get a call id no other call got, and in a
//! healthy cluster there must be no error at all.
//!
//! Payload sizes are uniform in 0 B–1 MiB (about 512 KiB per call on average, some 20 GB of
//! checked traffic in all), and the first calls of every run carry the edge sizes 0 B, 1 B,
//! 8 B, 9 B, 64 KiB, 1 MiB - 1 and exactly 1 MiB. With debug builds on a 2-core machine this
//! runs at about 130 calls/s: some 2.5 minutes for 20,000 calls.
//!
//! The calls are sent by [`fn_system_tests::calls`], which the `fn-load` tool shares.
//!
//! `FN_STRESS_CALLS` scales the run (CI runs the full 20,000); `FN_STRESS_SEED` replays one.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use fn_system_tests::calls::{self, Calls, SIZE_CLASSES, uniform_size};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::load::{Payloads, Rng};
use fn_system_tests::report::Report;

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

fn env_u64(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.trim().parse().with_context(|| format!("{name}={v:?}"))?,
        )),
        Err(_) => Ok(None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_echo_calls_each_answered_exactly_with_no_error() -> anyhow::Result<()> {
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
        uniform_size,
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

    let outcomes = calls::run(Calls {
        address: cluster.http.clone(),
        path: "/r/stress/echo".into(),
        calls,
        concurrency: CONCURRENCY,
        payloads,
        seed,
        call_bound: CALL_BOUND,
        run_bound: RUN_BOUND,
    })
    .await?;
    let by_class = &outcomes.by_class;
    let failures = &outcomes.failures;
    let elapsed = outcomes.elapsed;
    let bytes = 2 * outcomes.payload_bytes;

    let mut report = Report::new("stress", "echo_ledger");
    let total = outcomes.total();
    for (class, ledger) in SIZE_CLASSES.iter().zip(by_class) {
        report.case(class.name, ledger);
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
        outcomes.call_ids as u64 == calls,
        "{} distinct call ids for {calls} calls",
        outcomes.call_ids
    );
    for (class, ledger) in SIZE_CLASSES.iter().zip(by_class) {
        ensure!(
            calls < 1000 || ledger.sent_count() > 0,
            "no call of payload class {}",
            class.name
        );
    }
    // Nothing is left running on the runners.
    cluster.wait_idle(Duration::from_secs(10)).await?;
    Ok(())
}
