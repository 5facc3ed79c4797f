//! The pure-runner's Prometheus metric families, registered into the registry `main` passes
//! to [`RunnerService::new`](crate::RunnerService::new).
//!
//! Owns the families and the mapping of a call's end to a small fixed label; does not own
//! the scrape endpoint (`fn_lifecycle::metrics`). Call counters are updated by the Engage
//! service where calls end; the pool's figures are read from [`Pool::stats`] at scrape time
//! by a collector, so they can never drift from what `Status` reports.
//!
//! - `fn_runner_calls_total{outcome}`: committed calls by how they ended (`success`,
//!   `timeout`, `function_error`, `crashed`, `start_failed`, `protocol`, `internal`,
//!   `lb_went_away`).
//! - `fn_runner_refusals_total{reason}`: calls not committed (`busy`, `draining`,
//!   `too_large`, `invalid`, and `protocol`: an Engage stream that did not open with a
//!   `TryCall`, or not in time).
//! - `fn_runner_memory_total_mb`, `fn_runner_memory_committed_mb`: capacity and the memory of
//!   calls in flight and of instances starting.
//! - `fn_runner_hot_instances`: function instances in the pool: starting, busy or idle.
//! - `fn_runner_instance_starts_total`: function instances started.

use std::sync::Arc;

use fn_protocol::runner::{ErrorKind, RefusalReason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::pool::Pool;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The Engage service's counters. Cheap to clone: clones share the same values.
#[derive(Debug, Clone)]
pub struct RunnerMetrics {
    calls: Family<OutcomeLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
}

impl RunnerMetrics {
    /// Creates the families, plus a collector reading `pool` at scrape time, and registers
    /// them in `registry` (once per registry).
    pub fn register(registry: &mut Registry, pool: &Arc<Pool>) -> Self {
        let metrics = RunnerMetrics {
            calls: Family::default(),
            refusals: Family::default(),
        };
        registry.register(
            "fn_runner_calls",
            "Committed calls, by how they ended",
            metrics.calls.clone(),
        );
        registry.register(
            "fn_runner_refusals",
            "Calls refused instead of committed, by reason",
            metrics.refusals.clone(),
        );
        registry.register_collector(Box::new(PoolCollector {
            pool: Arc::clone(pool),
        }));
        metrics
    }

    /// A committed call ended with `kind`, or without telling the LB (`None`: it went away).
    pub(crate) fn call_ended(&self, kind: Option<ErrorKind>) {
        let outcome = match kind {
            None => "lb_went_away",
            Some(ErrorKind::None) => "success",
            Some(ErrorKind::Timeout) => "timeout",
            Some(ErrorKind::Function) => "function_error",
            Some(ErrorKind::Crashed) => "crashed",
            Some(ErrorKind::Start) => "start_failed",
            Some(ErrorKind::Internal) => "internal",
            // Unspecified is never sent; count it with the contract breaches.
            Some(ErrorKind::Protocol | ErrorKind::Unspecified) => "protocol",
        };
        self.calls.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A call was refused with `reason`.
    pub(crate) fn refused(&self, reason: RefusalReason) {
        let reason = match reason {
            RefusalReason::Busy => "busy",
            RefusalReason::Draining => "draining",
            RefusalReason::TooLarge => "too_large",
            RefusalReason::Invalid | RefusalReason::Unspecified => "invalid",
        };
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An Engage stream did not open with a `TryCall` (or not in time): no call to commit or
    /// refuse, but an LB breaking the contract, which the operator should see.
    pub(crate) fn refused_without_a_call(&self) {
        self.refusals
            .get_or_create(&ReasonLabel { reason: "protocol" })
            .inc();
    }
}

/// Reads the pool's figures at scrape time.
#[derive(Debug)]
struct PoolCollector {
    pool: Arc<Pool>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.pool.stats();
        let gauges = [
            (
                "fn_runner_memory_total_mb",
                "Memory this runner hands out to calls, in MB",
                stats.total_mb,
            ),
            (
                "fn_runner_memory_committed_mb",
                "Memory of the calls in flight and of instances starting, in MB",
                stats.committed_mb,
            ),
            (
                "fn_runner_hot_instances",
                "Function instances in the pool: starting, busy or idle",
                stats.hot_instances,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let starts = ConstCounter::new(stats.instances_started);
        starts.encode(encoder.encode_descriptor(
            "fn_runner_instance_starts",
            "Function instances started",
            None,
            starts.metric_type(),
        )?)?;
        Ok(())
    }
}
