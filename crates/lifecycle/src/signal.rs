//! The production shutdown trigger. Only `main` uses it; everything else receives shutdown
//! as a future or a cancellation token.

use std::future::Future;

/// Installs SIGTERM and SIGINT handlers now and returns a future that completes on the
/// first of them. Install before reporting healthy, so that an early signal starts a
/// graceful shutdown instead of killing the process. A second signal during the shutdown
/// ends the process at once (status 128 + the signal), as an operator pressing Ctrl-C again
/// expects: the handlers stay installed, so without this it did nothing, and only SIGKILL
/// cut a drain short.
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
        tokio::spawn(async move {
            let (name, number) = tokio::select! {
                _ = term.recv() => ("SIGTERM", 15),
                _ = int.recv() => ("SIGINT", 2),
            };
            tracing::warn!(
                signal = name,
                "second shutdown signal: exiting now, without finishing the drain"
            );
            let _written = crate::logging::flush();
            std::process::exit(128 + number);
        });
    })
}
