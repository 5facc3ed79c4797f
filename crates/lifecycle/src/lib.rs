//! Running a daemon: the pieces every `main.rs` strings together.
//!
//! - [`config`]: options shared by all daemons (logging, listen address, shutdown bound) and
//!   [`config::parse_or_exit`], which turns any configuration error into one line naming the
//!   `FN_*` variable and exit status 2.
//! - [`logging`]: `tracing` subscriber setup, text or JSON.
//! - [`health`]: one readiness switch feeding both the standard gRPC health service and the
//!   lb-agent's `GET /health`.
//! - [`services`]: named services run together under one cancellation token, stopped by a
//!   shutdown future (a signal in production, anything in tests) within a bound.
//! - [`signal`]: the SIGTERM/SIGINT future for production.
//!
//! Shutdown order, for every daemon: health NOT_SERVING → services see their token cancelled
//! and stop accepting → in-flight work drains within `FN_SHUTDOWN_TIMEOUT` → exit 0.

pub mod config;
pub mod health;
pub mod logging;
pub mod services;
pub mod signal;

pub use health::Health;
pub use services::{ServiceError, Services};
pub use tokio_util::sync::CancellationToken;
