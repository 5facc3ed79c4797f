//! Running a daemon: the pieces every `main.rs` strings together.
//!
//! - [`config`]: options shared by all daemons (logging, listen address, shutdown bound) and
//!   [`config::parse_or_exit`], which turns any configuration error into one line naming the
//!   `FN_*` variable and exit status 2.
//! - [`logging`]: `tracing` subscriber setup, text or JSON, and a throttle for repeated warnings.
//! - [`health`]: one readiness switch feeding both the standard gRPC health service and the
//!   lb-agent's `GET /health`.
//! - [`services`]: named services run together under one cancellation token, stopped by a
//!   shutdown future (a signal in production, anything in tests) within a bound.
//! - [`signal`]: the SIGTERM/SIGINT future for production.
//! - [`limits`]: the open-file limit, raised at start, and the one children should get back.
//! - [`metrics`]: the Prometheus scrape endpoint (`GET /metrics` on `FN_METRICS_PORT`) over
//!   a registry each daemon creates and passes to the code that registers its metrics.
//! - [`ports`]: a free port for a child process to listen on, without racing outgoing
//!   connections for it.
//! - [`retry`]: [`retry::Backoff`], the growing pause of every retry and poll loop (the one
//!   place that uses the `backoff` crate).
//! - [`shards`]: `FN_SHARDS`, a daemon's connections spread over current-thread runtimes.
//! - [`fs`]: file-system work kept off the runtime: removing trees, and reads of files on
//!   mounts that may hang, bounded in time ([`fs::BoundedReads`]).
//!
//! Shutdown order, for every daemon: health NOT_SERVING → services see their token cancelled
//! and stop accepting → in-flight work drains within `FN_SHUTDOWN_TIMEOUT` → exit 0.

pub mod config;
pub mod fs;
pub mod health;
pub mod limits;
mod log_queue;
pub mod logging;
pub mod metrics;
pub mod ports;
pub mod retry;
pub mod services;
pub mod shards;
pub mod signal;

pub use health::Health;
pub use services::{ServiceError, Services};
pub use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;
use std::process::ExitCode;

/// A listener that could not be bound, naming the variable that chose the port.
#[derive(Debug, thiserror::Error)]
#[error("{var}: cannot listen on {addr}: {source}")]
pub struct BindError {
    var: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds a TCP listener; the error names `var` (e.g. `FN_GRPC_PORT`).
///
/// # Errors
/// When the address is in use or not available.
pub async fn bind(
    addr: SocketAddr,
    var: &'static str,
) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { var, addr, source })
}

/// Runs a daemon's `main` future on a runtime with `FN_WORKER_THREADS` worker threads (the
/// CPUs available when unset) and returns its exit status; 1 when the runtime cannot be
/// built.
///
/// With one thread the runtime is tokio's current-thread one: the daemon's own thread runs
/// every task, where a multi-thread runtime of one worker keeps a second thread for them and
/// pays for a scheduler built to share work between threads (a LIFO slot, an injection
/// queue, idle and search bookkeeping) on every wake-up.
pub fn run_daemon(
    common: &config::CommonArgs,
    daemon: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    let threads = match common.runtime_threads() {
        Ok(threads) => threads,
        Err(e) => config::exit_config_error(e),
    };
    let mut builder = runtime_builder(threads);
    match builder.build() {
        Ok(runtime) => {
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(daemon)));
            // What its tasks logged as the runtime ended them, then the lines still queued
            // (those before a panic too).
            drop(runtime);
            logging::flush();
            ran.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime for `FN_WORKER_THREADS`: current-thread for 1, else multi-thread with that
/// many workers (the CPUs available when unset).
fn runtime_builder(threads: Option<std::num::NonZeroUsize>) -> tokio::runtime::Builder {
    let mut builder = match threads {
        Some(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.get());
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    builder
}

/// The process exit status for how a daemon ended: 0 after a clean shutdown, 1 (with the
/// reason logged) otherwise.
pub fn exit_status(result: Result<(), impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "exiting with failure");
            // The log's lines first, then this one; a stderr that takes nothing would hold
            // it, and the exit, for ever (the log has the error).
            if logging::flush() {
                eprintln!("error: {err}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runtime_builder;
    use std::num::NonZeroUsize;
    use tokio::runtime::RuntimeFlavor;

    fn built(threads: Option<usize>) -> tokio::runtime::Runtime {
        runtime_builder(threads.and_then(NonZeroUsize::new))
            .build()
            .expect("runtime")
    }

    #[test]
    fn one_worker_thread_is_the_daemon_s_own_thread() {
        let runtime = built(Some(1));
        assert_eq!(
            runtime.handle().runtime_flavor(),
            RuntimeFlavor::CurrentThread
        );
        // Timers and I/O are enabled as on the multi-thread runtime.
        let slept = runtime.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::net::TcpListener::bind("127.0.0.1:0").await.is_ok()
        });
        assert!(slept);
        // A spawned task runs on the thread that runs the daemon.
        let here = std::thread::current().id();
        let there = runtime
            .block_on(async { tokio::spawn(async { std::thread::current().id() }).await })
            .expect("task");
        assert_eq!(here, there);
    }

    #[test]
    fn more_threads_or_none_given_make_a_multi_thread_runtime() {
        let two = built(Some(2));
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(two.metrics().num_workers(), 2);
        let default = built(None);
        assert_eq!(
            default.handle().runtime_flavor(),
            RuntimeFlavor::MultiThread
        );
    }
}
