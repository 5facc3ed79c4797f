//! The pure-runner: admits calls that fit, runs them in hot function instances, streams
//! the results back over the `Engage` protocol.
//!
//! Layout:
//! - [`engage`]: the `RunnerProtocol` gRPC service (the Engage sequence, Status, drain).
//! - [`pool`]: the capacity gate and the hot-instance pool (one lock, one source of truth).
//! - [`driver`]: the `Driver`/`Instance` traits, the `process` driver (commands) and the
//!   `docker` driver (images), both on the Fn `http-stream` contract, and [`driver::Drivers`],
//!   which picks one per function.
//! - [`metrics`]: the Prometheus metric families (calls by outcome, refusals, memory, hot
//!   instances), registered into the registry passed to [`RunnerService::new`].
//! - [`memory`]: detection of the machine's memory for the default capacity.
//! - [`terminal`]: whether the runner has a controlling terminal, which instances outside
//!   namespaces inherit.
//!
//! The runner is stateless: everything it needs about a call arrives in the call.

pub mod driver;
pub mod engage;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod terminal;

#[cfg(test)]
mod testing;

pub use engage::{
    EngageConfig, EngageFirst, MAX_STREAMS_PER_CONNECTION, RunnerService, grpc_server,
};
pub use metrics::RunnerMetrics;
pub use pool::{Pool, PoolStats, Refusal};
