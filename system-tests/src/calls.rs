//! A fixed number of echo calls, checked by SHA-256, sent by concurrent workers and entered
//! in one [`Ledger`] per payload size class: what the stress test and the `fn-load` tool
//! both run.
//!
//! Each worker holds one keep-alive connection ([`Client`]) and takes the next call number
//! from a shared counter until `calls` are sent or the run bound has passed. Every call id
//! the LB hands out must be new (a repeated one fails the run).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::load::{Client, Payloads, Rng};
use crate::report::Ledger;

const MIB: usize = 1024 * 1024;

/// A payload size class of the report: a name and the sizes it holds (inclusive).
#[derive(Debug, Clone, Copy)]
pub struct SizeClass {
    pub name: &'static str,
    pub min: usize,
    pub max: usize,
}

/// The classes the stress test and the load tool report by.
pub const SIZE_CLASSES: [SizeClass; 4] = [
    SizeClass {
        name: "0 B",
        min: 0,
        max: 0,
    },
    SizeClass {
        name: "1 B-16 KiB",
        min: 1,
        max: 16 * 1024,
    },
    SizeClass {
        name: "16 KiB-256 KiB",
        min: 16 * 1024 + 1,
        max: 256 * 1024,
    },
    SizeClass {
        name: "over 256 KiB",
        min: 256 * 1024 + 1,
        max: usize::MAX,
    },
];

/// Index in [`SIZE_CLASSES`] of a body of `len` bytes.
pub fn class_of(len: usize) -> usize {
    SIZE_CLASSES
        .iter()
        .position(|c| (c.min..=c.max).contains(&len))
        .unwrap_or(SIZE_CLASSES.len() - 1)
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Calls {
    /// The LB's `host:port`.
    pub address: String,
    /// `POST` path of an echo function.
    pub path: String,
    /// How many calls in all.
    pub calls: u64,
    /// Workers, each with its own connection: calls in flight at once.
    pub concurrency: usize,
    pub payloads: Arc<Payloads>,
    /// Seeds the workers' choice of payloads.
    pub seed: u64,
    /// Bound for one call; past it the call counts as `hung`.
    pub call_bound: Duration,
    /// Bound for the whole run; workers stop taking calls past it.
    pub run_bound: Duration,
}

/// What a run saw.
#[derive(Debug)]
pub struct Outcomes {
    /// One ledger per [`SIZE_CLASSES`] entry.
    pub by_class: Vec<Ledger>,
    /// Distinct call ids the LB answered with.
    pub call_ids: usize,
    /// The first few failures, for messages.
    pub failures: Vec<String>,
    /// Payload bytes of the successful calls, one way (each was also echoed back).
    pub payload_bytes: u64,
    /// From the first call sent to the last answer.
    pub elapsed: Duration,
}

impl Outcomes {
    /// All classes merged.
    pub fn total(&self) -> Ledger {
        let mut total = Ledger::new();
        for ledger in &self.by_class {
            total.merge(ledger);
        }
        total
    }
}

/// What one worker saw.
struct WorkerResult {
    ledgers: Vec<Ledger>,
    call_ids: Vec<String>,
    failures: Vec<String>,
    bytes: u64,
}

/// Sends `spec.calls` echo calls, `spec.concurrency` at a time, and ledgers every one.
///
/// # Errors
/// When a worker panicked, or the LB gave the same call id to two calls. Failed calls are
/// not errors: they are in the ledgers.
pub async fn run(spec: Calls) -> anyhow::Result<Outcomes> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|w| {
            let next = Arc::clone(&next);
            let spec = spec.clone();
            let mut rng = Rng::new(spec.seed ^ ((w as u64 + 1) << 32));
            tokio::spawn(async move {
                let mut result = WorkerResult {
                    ledgers: vec![Ledger::new(); SIZE_CLASSES.len()],
                    call_ids: Vec::new(),
                    failures: Vec::new(),
                    bytes: 0,
                };
                let mut client = Client::new(&spec.address);
                loop {
                    let call = next.fetch_add(1, Ordering::Relaxed);
                    if call >= spec.calls || started.elapsed() > spec.run_bound {
                        break;
                    }
                    let (body, hash) = spec.payloads.body(&mut rng, call);
                    let len = body.len();
                    let ledger = &mut result.ledgers[class_of(len)];
                    ledger.sent();
                    let outcome = client.echo(&spec.path, body, hash, spec.call_bound).await;
                    match &outcome.error {
                        None => {
                            ledger.ok(outcome.latency);
                            result.bytes += len as u64;
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

    let mut by_class = vec![Ledger::new(); SIZE_CLASSES.len()];
    let mut ids = HashSet::new();
    let mut failures = Vec::new();
    let mut payload_bytes = 0u64;
    for worker in workers {
        let result = worker.await.context("a worker panicked")?;
        for (total, ledger) in by_class.iter_mut().zip(&result.ledgers) {
            total.merge(ledger);
        }
        for id in result.call_ids {
            ensure!(ids.insert(id.clone()), "call id {id} seen twice");
        }
        failures.extend(result.failures);
        payload_bytes += result.bytes;
    }
    Ok(Outcomes {
        by_class,
        call_ids: ids.len(),
        failures,
        payload_bytes,
        elapsed: started.elapsed(),
    })
}

/// A size uniform in 0 B–1 MiB, both ends included: the stress test's payloads.
pub fn uniform_size(rng: &mut Rng) -> usize {
    usize::try_from(rng.range(0, MIB as u64)).unwrap_or(MIB)
}
