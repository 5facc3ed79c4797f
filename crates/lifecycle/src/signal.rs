//! The production shutdown trigger. Only `main` uses it; everything else receives shutdown
//! as a future or a cancellation token.

use std::future::Future;

/// Installs SIGTERM and SIGINT handlers now and returns a future that completes on the
/// first of them. Install before reporting healthy, so that an early signal starts a
/// graceful shutdown instead of killing the process.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}
