//! The lb-agent's view of the runners.
//!
//! - [`client`]: [`RunnerClient`], one per runner address: one HTTP/2 connection over mutual TLS,
//!   the `TryCall` handshake, and an availability flag that turns an unreachable runner into
//!   a placeholder (it keeps its slot in the list, refuses at once, and is probed with
//!   backoff until it answers again).
//! - [`pool`]: the [`RunnerPool`] trait (the runner list of an LB group, in a stable order)
//!   and the [`StaticPool`] from `FN_RUNNER_ADDRESSES`.
//! - [`capacity`]: per-LB-group accounting of the memory of calls in flight or waiting, for
//!   the capacity adverts to the npm.
//! - [`reports`]: [`Reports`], what a runner last reported of itself, for the `warm` placer.
//! - [`npm_pool`]: the [`NpmPool`], runner lists polled from the npm per LB group.
//! - [`advertiser`]: the [`Advertiser`], sending each group's demand to the npm.

pub mod advertiser;
pub mod capacity;
pub mod client;
pub mod npm_pool;
pub mod pool;
pub mod reports;

pub use advertiser::Advertiser;
pub use capacity::{CapacityGuard, CapacityTracker};
pub use client::{
    ClientConfig, EarlyBody, EjectionMetrics, Engaged, FAIR_ACK_WAIT, RunnerClient,
    SHORT_OFFERS_DOWN, TryCallError,
};
pub use npm_pool::NpmPool;
pub use pool::{RunnerList, RunnerPool, StaticPool};
pub use reports::{OfferedCall, ReportMetrics, ReportSignal, Reports, STALE_AFTER, Waiting};
