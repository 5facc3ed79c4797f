//! A small FDK for writing Fn functions in Rust, speaking the `http-stream` contract — the
//! contract of the official Fn FDKs (e.g. `fdk` for Python), so a runner cannot tell them apart.
//!
//! A function is a handler from a call's [`Context`] and request [`Body`] to a [`Response`]:
//!
//! ```no_run
//! use fn_fdk::{Body, Context, Response};
//!
//! fn main() -> std::process::ExitCode {
//!     fn_fdk::run(|ctx: Context, body: Body| async move {
//!         let name = body.bytes().await?;
//!         let name = String::from_utf8_lossy(&name);
//!         Ok(Response::new(format!("Hello from {}, {name}!\n", ctx.fn_name())))
//!     })
//! }
//! ```
//!
//! Bodies stream both ways: read the request with [`Body::chunk`], answer with a stream, the
//! request body itself, or a channel written while the response is already going out:
//!
//! ```no_run
//! use fn_fdk::{Body, Context, Response, ResponseBody};
//!
//! async fn ticks(_ctx: Context, _body: Body) -> Result<Response, fn_fdk::BoxError> {
//!     let (tx, body) = ResponseBody::channel(4);
//!     tokio::spawn(async move {
//!         for n in 0..3 {
//!             if tx.send(format!("tick {n}\n")).await.is_err() {
//!                 return; // the caller went away
//!             }
//!             tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//!         }
//!     });
//!     Ok(Response::new(body))
//! }
//! ```
//!
//! # Layout
//!
//! - [`env`]: the environment a runner starts a function with (`FN_FORMAT`, `FN_LISTENER`, ...),
//!   validated once.
//! - [`context`]: one call as the function sees it (call id, deadline, client headers, config).
//! - [`body`]: streamed request and response bodies.
//! - [`response`]: status, headers and body of an answer.
//! - [`headers`]: the `Fn-Http-H-` translation and the contract's header names.
//! - `server`: socket set-up (private socket, then the `lsnr.sock` link) and `POST /call`.
//!
//! # Entry points
//!
//! [`run`] for a plain `main` (builds the runtime, stops on SIGTERM/SIGINT, reports startup
//! errors on stderr), [`serve`] for an async `main`, [`serve_with`] when the environment and the
//! shutdown come from the caller (tests).
//!
//! # Deadline
//!
//! Each call comes with a deadline (`Fn-Deadline`, see [`Context::deadline`]), and the FDK
//! holds the handler to it, as Fn's Go FDK cancels its handler's `context.Context` then:
//!
//! - a handler still running at the deadline is stopped: its future is dropped (at its next
//!   `.await`: a handler that computes without awaiting cannot be stopped, and should use
//!   `spawn_blocking` and check [`Context::remaining`]);
//! - a call that comes with its deadline already past does not reach the handler;
//! - an answer already under way (its status and headers sent) whose body still streams at
//!   the deadline is stopped too (a [`BodySender`] gets [`Closed`]): at the deadline while
//!   the runner reads it, else when the runner next reads (the FDK's server polls the body
//!   only when it has room to write; the runner's own timeout ends the call then anyway);
//! - a call without `Fn-Deadline`, or with one that is not RFC 3339, has no limit here (the
//!   latter is reported on stderr).
//!
//! The runner cuts the call off at the same deadline, and its timeout is what the client
//! sees. The FDK answers only if the runner has not done so a second after the
//! deadline: HTTP 504, also as `Fn-Http-Status`, with a one-line body, or, for an answer
//! already under way, by breaking it off (the connection closed mid-body), so that it shows
//! as incomplete rather than complete and short. Were the FDK to answer at the deadline
//! itself, its 504 and the runner's timeout would race, and which one the client got (and
//! whether the call counted as timed out) would be chance.
//!
//! Tasks a handler spawns are its own and are not stopped: bound them with
//! [`Context::remaining`], or stop when a [`BodySender`] reports [`Closed`].
//!
//! Decisions where the contract is silent: a handler error or panic answers HTTP 502 (also as
//! `Fn-Http-Status`) with a one-line body and the FDK keeps serving; the 504 above (Fn's Go FDK
//! sends what a late handler writes once its context is cancelled; 504 is the status the
//! runner's own timeout gives the client, as it does for an FDK's 504); requests
//! other than `POST /call` get 404/405.

pub mod body;
pub mod context;
pub mod env;
mod error;
pub mod headers;
pub mod response;
mod server;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

pub use body::{Body, BodyError, BodySender, BoxError, Closed, ResponseBody};
pub use bytes::Bytes;
pub use context::Context;
pub use env::FnEnv;
pub use error::Error;
pub use http;
pub use response::Response;

/// `Fn-Fdk-Version` of every reply.
pub const FDK_VERSION: &str = concat!("fdk-rust/", env!("CARGO_PKG_VERSION"));

/// `Fn-Fdk-Runtime` of every reply: the language, as Fn's FDKs name theirs (`go1.22.1`,
/// `python/3.11.4 final`, `node/20.11.0`), without its version: Cargo tells a crate the
/// compiler's version only through a build script, which this one does without.
pub const FDK_RUNTIME: &str = "rust";

/// Worker threads of [`run`]'s runtime. An instance takes one call at a time unless its
/// catalog entry sets `concurrency`, and with an instance per concurrent call every thread is
/// one more for the kernel to schedule: a second worker was woken by each call to look for
/// work and found none (without it, fn-echo's CPU per call through the runner fell by 40% at
/// c=1 and 17% at c=64; docs/performance-log.md, session 22). A multi-threaded runtime all
/// the same, so that `block_in_place` works in handlers; CPU-heavy work belongs in
/// `spawn_blocking`, whose threads are not counted here.
const WORKER_THREADS: usize = 1;

/// How long [`run`], once the calls have ended, waits for blocking work handlers left.
const BLOCKING_LEFT_BOUND: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs a function: reads the environment, builds a runtime, serves calls until SIGTERM or
/// SIGINT. Startup errors are printed on stderr and give a failure exit code, so a `main` is
/// `fn main() -> ExitCode { fn_fdk::run(handler) }`.
pub fn run<F, Fut>(handler: F) -> ExitCode
where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let result = FnEnv::from_env().and_then(|env| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let served = runtime.block_on(async move {
            let shutdown = termination()?;
            serve_with(env, handler, shutdown).await
        });
        // The calls have ended; blocking work a handler left behind (a `spawn_blocking` it
        // stopped waiting for at its deadline) is not waited for: dropping the runtime
        // would wait for it without a bound, with the signal handlers still installed and
        // so a second signal swallowed.
        runtime.shutdown_timeout(BLOCKING_LEFT_BOUND);
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fn-fdk: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Serves calls with the process environment until SIGTERM or SIGINT.
///
/// On a runtime of the caller's choosing, with its I/O and time drivers enabled (the
/// deadline of each call is a timer; `#[tokio::main]` enables both): a function whose
/// handlers never call `block_in_place` may run it on a current-thread runtime
/// (`#[tokio::main(flavor = "current_thread")]`), which [`run`] does not use for that
/// reason. Measured with fn-echo
/// behind a runner, one instance per call: 4% less CPU per call at c=1, 10% at c=64
/// (docs/performance-log.md, session 29).
///
/// # Errors
///
/// A bad environment (see [`FnEnv::from_vars`]), a socket that cannot be set up, or signal
/// handlers that cannot be installed.
pub async fn serve<F, Fut>(handler: F) -> Result<(), Error>
where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let env = FnEnv::from_env()?;
    serve_with(env, handler, termination()?).await
}

/// Serves calls on `env`'s listener until `shutdown` completes, then lets in-flight calls finish
/// and removes the socket files. Returns once the socket is gone. As [`serve`], on a runtime
/// with its I/O and time drivers enabled.
///
/// # Errors
///
/// [`Error::Socket`] when the socket cannot be set up (stale files that cannot be removed, a
/// missing directory, ...).
pub async fn serve_with<F, Fut>(
    env: FnEnv,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let listener = server::bind(env.listener())?;
    let shared = Arc::new(server::Shared {
        handler,
        env: Arc::new(env),
    });
    server::serve(listener, shared, shutdown).await;
    Ok(())
}

/// Completes on the first SIGTERM (the runner stopping the instance) or SIGINT. A second
/// one while the calls in flight finish ends the process at once, with 128 + the signal (the
/// handlers stay installed: without this, only SIGKILL stopped a function whose handler
/// hangs).
fn termination() -> Result<impl Future<Output = ()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            let number = tokio::select! {
                _ = term.recv() => 15,
                _ = int.recv() => 2,
            };
            std::process::exit(128 + number);
        });
    })
}
