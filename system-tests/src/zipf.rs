//! The placement workload of `fn-load --workload zipf`: many functions of skewed popularity
//! on a few runners too small to keep all of them warm.
//!
//! The catalog has `functions` echo functions (`zipf/f000`, `zipf/f001`, ...), each of
//! [`MEMORY_MB`]. Each call picks its function on its own: with probability `hot_share` the
//! hottest one, `f000`; otherwise one of the others by a Zipf law of exponent `s` (the
//! function of rank `k` among them, `f00k`, has weight `k^-s`). Calls carry a small body that
//! the function echoes, checked by hash; an answer whose `Server-Timing` has a `start` entry
//! counted as a cold start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::load::{Client, Rng};
use crate::report::Ledger;

/// Memory of each function of the workload.
pub const MEMORY_MB: u64 = 64;

/// The app the functions belong to.
pub const APP: &str = "zipf";

/// The name of function `index`.
pub fn name(index: usize) -> String {
    format!("f{index:03}")
}

/// A catalog of `functions` echo functions named by [`name`], in app [`APP`].
pub fn catalog(functions: usize) -> String {
    (0..functions)
        .map(|i| {
            format!(
                "[[functions]]\napp = \"{APP}\"\nname = \"{n}\"\nroute = \"/{n}\"\n\
                 command = [\"fn-echo\"]\nmemory_mb = {MEMORY_MB}\ntimeout = \"60s\"\n\n",
                n = name(i)
            )
        })
        .collect()
}

/// Which function a call goes to; see the module docs.
#[derive(Debug, Clone)]
pub struct Popularity {
    hot_share: f64,
    /// Cumulative weights of functions 1.. (normalised to end at 1).
    tail: Vec<f64>,
}

impl Popularity {
    /// `functions` functions (at least 1), the first taking `hot_share` of the calls (0 to 1)
    /// and the others Zipf-distributed with exponent `s`.
    pub fn new(functions: usize, s: f64, hot_share: f64) -> Self {
        let weights: Vec<f64> = (1..functions.max(1))
            .map(|rank| (rank as f64).powf(-s))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let tail = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Popularity {
            hot_share: if functions > 1 {
                hot_share.clamp(0.0, 1.0)
            } else {
                1.0
            },
            tail,
        }
    }

    /// How many functions there are.
    pub fn functions(&self) -> usize {
        self.tail.len() + 1
    }

    /// The expected share of calls of function `index`.
    pub fn share(&self, index: usize) -> f64 {
        if index == 0 {
            return self.hot_share;
        }
        let upper = self.tail.get(index - 1).copied().unwrap_or(0.0);
        let lower = if index >= 2 {
            self.tail.get(index - 2).copied().unwrap_or(0.0)
        } else {
            0.0
        };
        (1.0 - self.hot_share) * (upper - lower)
    }

    /// A function index drawn from `rng`.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        let unit = |rng: &mut Rng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if self.tail.is_empty() || unit(rng) < self.hot_share {
            return 0;
        }
        let u = unit(rng);
        let pos = self.tail.partition_point(|&c| c <= u);
        1 + pos.min(self.tail.len() - 1)
    }
}

/// One run of the workload.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The LB's `host:port`.
    pub address: String,
    pub calls: u64,
    /// Workers, each on its own keep-alive connection.
    pub concurrency: usize,
    pub popularity: Arc<Popularity>,
    pub seed: u64,
    /// Bound for one call.
    pub call_bound: Duration,
}

/// What a run saw.
#[derive(Debug)]
pub struct Outcome {
    pub ledger: Ledger,
    /// Calls answered with a cold start.
    pub cold_starts: u64,
    /// Calls sent per function.
    pub per_function: Vec<u64>,
    /// Cold starts per function.
    pub cold_per_function: Vec<u64>,
    /// The first few failures, for messages.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

/// Sends `spec.calls` calls, `spec.concurrency` at a time, each to a function drawn from
/// `spec.popularity`, every answer checked.
///
/// # Errors
/// When a worker panicked. Failed calls are in the ledger.
pub async fn run(spec: Spec) -> anyhow::Result<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|w| {
            let next = Arc::clone(&next);
            let spec = spec.clone();
            let mut rng = Rng::new(spec.seed ^ ((w as u64 + 1) << 32));
            tokio::spawn(async move {
                let mut ledger = Ledger::new();
                let mut cold_starts = 0u64;
                let mut per_function = vec![0u64; spec.popularity.functions()];
                let mut cold_per_function = vec![0u64; spec.popularity.functions()];
                let mut failures = Vec::new();
                let mut client = Client::new(&spec.address);
                loop {
                    let call = next.fetch_add(1, Ordering::Relaxed);
                    if call >= spec.calls {
                        break;
                    }
                    let function = spec.popularity.pick(&mut rng);
                    per_function[function] += 1;
                    let body = Bytes::from(format!("zipf call {call} to {}", name(function)));
                    let hash: [u8; 32] = Sha256::digest(&body).into();
                    let path = format!("/r/{APP}/{}", name(function));
                    ledger.sent();
                    let outcome = client.echo(&path, body, hash, spec.call_bound).await;
                    cold_starts += u64::from(outcome.cold_start);
                    cold_per_function[function] += u64::from(outcome.cold_start);
                    match &outcome.error {
                        None => ledger.ok(outcome.latency),
                        Some(kind) => {
                            ledger.error(kind.clone(), outcome.latency);
                            if failures.len() < 5 {
                                failures.push(format!(
                                    "call {call} to {path}: {kind}: {}",
                                    outcome.detail
                                ));
                            }
                        }
                    }
                }
                (
                    ledger,
                    cold_starts,
                    per_function,
                    cold_per_function,
                    failures,
                )
            })
        })
        .collect();
    let mut outcome = Outcome {
        ledger: Ledger::new(),
        cold_starts: 0,
        per_function: vec![0; spec.popularity.functions()],
        cold_per_function: vec![0; spec.popularity.functions()],
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (ledger, cold, per_function, cold_per_function, failures) =
            worker.await.context("a worker panicked")?;
        outcome.ledger.merge(&ledger);
        outcome.cold_starts += cold;
        for (total, n) in outcome.per_function.iter_mut().zip(per_function) {
            *total += n;
        }
        for (total, n) in outcome.cold_per_function.iter_mut().zip(cold_per_function) {
            *total += n;
        }
        outcome.failures.extend(failures);
    }
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_function_and_the_zipf_tail_get_their_shares() {
        let popularity = Popularity::new(100, 1.1, 0.4);
        assert_eq!(popularity.functions(), 100);
        let total: f64 = (0..100).map(|i| popularity.share(i)).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        assert!(popularity.share(1) > popularity.share(2));
        let ratio = popularity.share(1) / popularity.share(2);
        assert!((ratio - 2f64.powf(1.1)).abs() < 1e-9, "{ratio}");

        let mut rng = Rng::new(7);
        let mut counts = [0u64; 100];
        let draws = 200_000;
        for _ in 0..draws {
            counts[popularity.pick(&mut rng)] += 1;
        }
        for i in [0, 1, 2, 10, 99] {
            let seen = counts[i] as f64 / draws as f64;
            let expected = popularity.share(i);
            assert!(
                (seen - expected).abs() < 0.01 + expected * 0.1,
                "function {i}: {seen} against {expected}"
            );
        }
    }

    #[test]
    fn one_function_takes_every_call() {
        let popularity = Popularity::new(1, 1.1, 0.4);
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| popularity.pick(&mut rng) == 0));
        assert_eq!(popularity.share(0), 1.0);
    }

    #[test]
    fn the_catalog_names_every_function() {
        let text = catalog(3);
        for i in 0..3 {
            assert!(
                text.contains(&format!("route = \"/{}\"", name(i))),
                "{text}"
            );
        }
        assert_eq!(text.matches("[[functions]]").count(), 3);
    }
}
