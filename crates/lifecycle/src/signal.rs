//! The production shutdown trigger. Only `main` uses it; everything else receives shutdown
//! as a future or a cancellation token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long after the signal that started a shutdown a further signal is taken as part of
/// the same stop, never as an operator's second Ctrl-C. A terminal's Ctrl-C reaches every
/// process of its foreground group, and a script in that group that passes the stop on
/// (`trap 'kill $pids' INT`) signals the daemons again: a shell runs its trap's `kill`
/// within milliseconds, and the daemon may even see the script's signal before the
/// terminal's, which both arrive in one turn of its signal driver. Half a second is ten
/// times what a loaded machine adds to that, and shorter than a person takes to see that
/// the drain goes on and press Ctrl-C again; a double tap inside it is logged, saying to
/// press again.
pub const SAME_STOP_WINDOW: Duration = Duration::from_millis(500);

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
    /// Within [`SAME_STOP_WINDOW`] of the signal that started the shutdown: the same stop,
    /// delivered again.
    SameStop,
    /// A shutdown is under way already: keep draining.
    KeepDraining,
    /// End the process at once, without finishing the drain.
    Exit,
}

/// The rule: the first signal starts the graceful shutdown; any signal within
/// [`SAME_STOP_WINDOW`] of it is the same stop. After that, and during a shutdown a service
/// that failed started, SIGINT, an operator's second Ctrl-C, ends the process at once, and
/// SIGTERM does not. A SIGTERM comes twice in ordinary stops: a terminal's Ctrl-C or a
/// service manager (systemd's `KillMode=control-group`) signals every process of a group,
/// and then a script, or the npm stopping its runners, signals them again; taking that for
/// an operator's second signal cut every call in flight. Whoever sends SIGTERM forces a stop
/// with SIGKILL after its own grace.
///
/// `since_first` is the time since the signal that started the shutdown (none before one,
/// or when a failed service started it).
fn action(under_way: bool, since_first: Option<Duration>, received: Received) -> Action {
    match (under_way, since_first, received) {
        (false, _, _) => Action::Shutdown,
        (true, Some(since), _) if since < SAME_STOP_WINDOW => Action::SameStop,
        (true, _, Received::Int) => Action::Exit,
        (true, _, Received::Term) => Action::KeepDraining,
    }
}

/// The signals seen so far, for [`action`].
struct Stops {
    /// Whether a shutdown is under way: set by the first signal, or by [`Requested`]'s drop
    /// when a failed service began it. Shared with [`Requested`].
    under_way: Arc<AtomicBool>,
    /// When the signal that started the shutdown arrived, for [`SAME_STOP_WINDOW`].
    first: Option<Instant>,
}

impl Stops {
    /// What to do with `received`, arriving at `now`.
    fn on(&mut self, received: Received, now: Instant) -> Action {
        let under_way = self.under_way.swap(true, Ordering::AcqRel);
        let since_first = self.first.map(|first| now.saturating_duration_since(first));
        let action = action(under_way, since_first, received);
        if action == Action::Shutdown {
            self.first = Some(now);
        }
        action
    }
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that completes on the
/// first of them. Install before reporting healthy, so that an early signal starts a
/// graceful shutdown instead of killing the process. During the shutdown, SIGINT (Ctrl-C
/// again, [`SAME_STOP_WINDOW`] or more after the first signal) ends the process at once
/// (status 130), as an operator expects: the handlers stay installed, so without this only
/// SIGKILL cut a drain short. The handlers are watched for the process's whole life, so this
/// holds as well when the shutdown began because a service failed (the future is then
/// dropped unfinished).
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
    let mut stops = Stops {
        under_way: Arc::clone(&under_way),
        first: None,
    };
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
            match stops.on(received, Instant::now()) {
                Action::Shutdown => {
                    tracing::info!(signal = name, "shutdown requested");
                    signalled.cancel();
                }
                Action::SameStop => tracing::info!(
                    signal = name,
                    window = ?SAME_STOP_WINDOW,
                    "shutdown signal within the window after the first: taken as part of \
                     the same stop (a terminal's Ctrl-C reaches every process of its group, \
                     and a script may pass it on); still draining, Ctrl-C again to exit at once"
                ),
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

    fn stops() -> Stops {
        Stops {
            under_way: Arc::new(AtomicBool::new(false)),
            first: None,
        }
    }

    #[test]
    fn sigint_during_a_shutdown_exits_and_sigterm_again_keeps_draining() {
        let later = Some(SAME_STOP_WINDOW);
        assert_eq!(action(false, None, Received::Term), Action::Shutdown);
        assert_eq!(action(false, None, Received::Int), Action::Shutdown);
        assert_eq!(action(true, later, Received::Int), Action::Exit);
        assert_eq!(action(true, later, Received::Term), Action::KeepDraining);
    }

    /// A terminal's Ctrl-C and a script's SIGTERM passing it on, in either order and
    /// milliseconds apart, are one stop: neither ends the drain. SIGINT a window later, an
    /// operator's second Ctrl-C, still does.
    #[test]
    fn a_signal_within_the_window_is_the_same_stop_and_sigint_after_it_exits() {
        let start = Instant::now();
        let just_inside = start + SAME_STOP_WINDOW - Duration::from_millis(1);
        for (first, second) in [
            (Received::Term, Received::Int),
            (Received::Int, Received::Term),
            (Received::Int, Received::Int),
        ] {
            let mut stops = stops();
            assert_eq!(stops.on(first, start), Action::Shutdown);
            let soon = start + Duration::from_millis(5);
            assert_eq!(
                stops.on(second, soon),
                Action::SameStop,
                "{first:?}, {second:?}"
            );
            assert_eq!(stops.on(Received::Int, just_inside), Action::SameStop);
            // The window runs from the first signal, not from the last one.
            assert_eq!(
                stops.on(Received::Term, start + SAME_STOP_WINDOW),
                Action::KeepDraining
            );
            assert_eq!(
                stops.on(Received::Int, start + SAME_STOP_WINDOW),
                Action::Exit
            );
        }
    }

    /// A shutdown a failed service began has no first signal: SIGINT exits at once, as
    /// before, and SIGTERM keeps draining.
    #[test]
    fn without_a_first_signal_there_is_no_window() {
        let now = Instant::now();
        let mut stops = stops();
        stops.under_way.store(true, Ordering::Release);
        assert_eq!(stops.on(Received::Term, now), Action::KeepDraining);
        assert_eq!(stops.on(Received::Int, now), Action::Exit);
    }
}
