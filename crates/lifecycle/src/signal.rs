//! The production shutdown trigger. Only `main` uses it; everything else receives shutdown
//! as a future or a cancellation token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A shutdown signal as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    Term,
    Int,
}

/// What to do with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Start the graceful shutdown.
    Shutdown,
    /// A shutdown is under way already: keep draining.
    KeepDraining,
    /// End the process at once, without finishing the drain.
    Exit,
}

/// The rule: the first signal starts the graceful shutdown; during a shutdown (started by a
/// signal, or by a service that failed) SIGINT, an operator's second Ctrl-C, ends the
/// process at once, and SIGTERM does not. A SIGTERM comes twice in ordinary stops: a
/// terminal's Ctrl-C or a service manager (systemd's `KillMode=control-group`) signals every
/// process of a group, and then a script, or the npm stopping its runners, signals them
/// again; taking that for an operator's second signal cut every call in flight. Whoever
/// sends SIGTERM forces a stop with SIGKILL after its own grace.
fn action(under_way: bool, received: Received) -> Action {
    match (under_way, received) {
        (false, _) => Action::Shutdown,
        (true, Received::Int) => Action::Exit,
        (true, Received::Term) => Action::KeepDraining,
    }
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that completes on the
/// first of them. Install before reporting healthy, so that an early signal starts a
/// graceful shutdown instead of killing the process. During the shutdown, SIGINT (Ctrl-C
/// again) ends the process at once (status 130), as an operator expects: the handlers stay
/// installed, so without this only SIGKILL cut a drain short. The handlers are watched for
/// the process's whole life, so this holds as well when the shutdown began because a
/// service failed (the future is then dropped unfinished).
///
/// # Errors
/// When the signal handlers cannot be installed.
///
/// # Panics
/// When called outside a tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let requested = CancellationToken::new();
    let under_way = Arc::new(AtomicBool::new(false));
    let signalled = requested.clone();
    let draining = Arc::clone(&under_way);
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                Some(()) = term.recv() => Received::Term,
                Some(()) = int.recv() => Received::Int,
                else => return,
            };
            let name = match received {
                Received::Term => "SIGTERM",
                Received::Int => "SIGINT",
            };
            match action(draining.swap(true, Ordering::AcqRel), received) {
                Action::Shutdown => {
                    tracing::info!(signal = name, "shutdown requested");
                    signalled.cancel();
                }
                Action::KeepDraining => tracing::info!(
                    signal = name,
                    "shutdown signal during the shutdown: still draining (SIGINT, a second \
                     Ctrl-C, exits at once)"
                ),
                Action::Exit => {
                    tracing::warn!(
                        signal = name,
                        "second shutdown signal: exiting now, without finishing the drain"
                    );
                    let _written = crate::logging::flush();
                    std::process::exit(130);
                }
            }
        }
    });
    Ok(Requested {
        signalled: Box::pin(requested.cancelled_owned()),
        under_way,
    })
}

/// Completes when a shutdown signal arrives; dropped unfinished, it marks a shutdown under
/// way all the same (a service failed), so that SIGINT then exits at once.
struct Requested {
    signalled: Pin<Box<WaitForCancellationFutureOwned>>,
    under_way: Arc<AtomicBool>,
}

impl Future for Requested {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.signalled.as_mut().poll(cx)
    }
}

impl Drop for Requested {
    fn drop(&mut self) {
        self.under_way.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigint_during_a_shutdown_exits_and_sigterm_again_keeps_draining() {
        assert_eq!(action(false, Received::Term), Action::Shutdown);
        assert_eq!(action(false, Received::Int), Action::Shutdown);
        assert_eq!(action(true, Received::Int), Action::Exit);
        assert_eq!(action(true, Received::Term), Action::KeepDraining);
    }
}
