//! `tracing` subscriber setup, and [`Throttle`] for warnings that can repeat in a loop.
//!
//! Log lines go to stderr through a thread of their own (`log_queue`): a thread that logs
//! only queues its line. Written in place, a line blocked the thread whenever stderr did (a
//! pipe nobody reads, a container engine's log driver that stalls, a terminal held with
//! Ctrl-S), and with it every call on that thread's runtime. When [`BUFFERED_LINES`] lines
//! or [`BUFFERED_BYTES`] bytes are waiting, further lines are dropped and counted
//! (`fn_log_lines_dropped_total`, [`register_metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::config::LogFormat;
use crate::log_queue::{Queue, QueueWriter};

/// Error for an unusable `FN_LOG_LEVEL`.
#[derive(Debug, thiserror::Error)]
#[error("FN_LOG_LEVEL: invalid filter {filter:?}: {reason} (use a level such as info or debug)")]
pub struct LogLevelError {
    filter: String,
    reason: String,
}

/// Most log lines waiting for stderr before new ones are dropped.
pub const BUFFERED_LINES: usize = 8192;

/// Most bytes of log lines waiting for stderr before new ones are dropped (a function's
/// output is logged, up to 4 KiB a line before escaping).
pub const BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// How long [`flush`] waits for a stderr that does not take the lines.
const FLUSH_BOUND: Duration = Duration::from_secs(1);

/// The process's queue of log lines, once [`init`] has installed it.
static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Installs the global subscriber, writing to stderr through a writer thread: coloured only
/// when stderr is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>), so
/// logs redirected to a file or collected by a container engine carry no escape codes. A
/// path that ends the process calls [`flush`] first. A panic's message goes through the same
/// queue ([`init_writing_to`]).
///
/// # Errors
/// When `level` is not a valid filter. A second call in one process is ignored.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogLevelError> {
    let colour = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    install(level, format, Box::new(std::io::stderr()), colour)
}

/// [`init`], writing to `out` without colour instead of stderr: for a process whose log goes
/// elsewhere, and for tests of what reaches the log.
///
/// Also replaces the panic hook: the standard one writes a panic's message to stderr in
/// place, so a panicking task on a runtime thread would block that thread, and every call
/// on it, for as long as stderr does. The message now takes its turn in the queue after the
/// lines before it, and the panicking thread waits at most a second for it to be written (a
/// panic that ends the process is then not lost).
///
/// # Errors
/// When `level` is not a valid filter. A second call in one process is ignored.
pub fn init_writing_to(
    level: &str,
    format: LogFormat,
    out: Box<dyn std::io::Write + Send>,
) -> Result<(), LogLevelError> {
    install(level, format, out, false)
}

fn install(
    level: &str,
    format: LogFormat,
    out: Box<dyn std::io::Write + Send>,
    colour: bool,
) -> Result<(), LogLevelError> {
    let filter = filter(level)?;
    let queue = Queue::start(out, BUFFERED_LINES, BUFFERED_BYTES);
    let writer = match &queue {
        Ok(queue) => BoxMakeWriter::new(QueueWriter(Arc::clone(queue))),
        // No thread to be had: written in place, as before.
        Err(_) => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    // try_init fails only when a subscriber is already set (tests); keep that one.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    match queue {
        Ok(queue) if installed.is_ok() => {
            if QUEUE.set(queue).is_ok() {
                std::panic::set_hook(Box::new(queue_panic));
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "no thread for writing log lines: they are written in place")
        }
    }
    Ok(())
}

/// The panic hook: the standard hook's text (thread, place, message and, as
/// `RUST_LIB_BACKTRACE` or `RUST_BACKTRACE` ask, a backtrace) queued as one line, then a
/// bounded wait for it to be written.
fn queue_panic(info: &std::panic::PanicHookInfo<'_>) {
    let Some(queue) = QUEUE.get() else {
        return;
    };
    let text = panic_text(info);
    if queue.push(text.as_bytes()) {
        queue.flush(FLUSH_BOUND);
        return;
    }
    // The queue was full: once what it held is written, the message goes next, past the
    // bound (if stderr took nothing, nothing would take it).
    if queue.flush(FLUSH_BOUND) && queue.push_past_the_bound(text.as_bytes()) {
        queue.flush(FLUSH_BOUND);
    }
}

fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    use std::fmt::Write as _;
    let thread = std::thread::current();
    let mut text = format!("thread '{}' panicked", thread.name().unwrap_or("<unnamed>"));
    if let Some(place) = info.location() {
        let _ = write!(text, " at {place}");
    }
    let message = info.payload_as_str().unwrap_or("Box<dyn Any>");
    let _ = writeln!(text, ":\n{message}");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v == "full") {
            let _ = writeln!(text, "stack backtrace:\n{backtrace:#}");
        } else {
            let _ = writeln!(text, "stack backtrace:\n{backtrace}");
        }
    }
    text
}

/// Waits until the log lines queued so far are written, at most a second (a stderr that
/// does not take them leaves them). For the paths that end the process: `false` when stderr
/// did not take them, and a line written to it directly would block for ever.
pub fn flush() -> bool {
    QUEUE.get().is_none_or(|queue| queue.flush(FLUSH_BOUND))
}

/// Registers `fn_log_lines_dropped_total`: log lines dropped because stderr was not taking
/// them (see [`BUFFERED_LINES`]).
pub fn register_metrics(registry: &mut Registry) {
    registry.register_collector(Box::new(DroppedLines));
}

/// Log lines dropped so far.
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, |queue| queue.dropped())
}

#[derive(Debug)]
struct DroppedLines;

impl Collector for DroppedLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(dropped_lines());
        let help = format!(
            "Log lines dropped because stderr was not taking them (a pipe nobody reads, a log \
             driver that stalls) while {BUFFERED_LINES} lines or {BUFFERED_BYTES} bytes were \
             waiting"
        );
        counter.encode(encoder.encode_descriptor(
            "fn_log_lines_dropped",
            &help,
            None,
            counter.metric_type(),
        )?)
    }
}

/// The filter `level` names. A directive without `=` must be a level: `EnvFilter` reads any
/// other bare word as a target to trace, so `warning` or `inf0` turned every log line off,
/// errors included, without a word.
fn filter(level: &str) -> Result<EnvFilter, LogLevelError> {
    let invalid = |reason: String| LogLevelError {
        filter: level.to_owned(),
        reason,
    };
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=')
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(invalid(format!(
                "{directive:?} is not a level (off, error, warn, info, debug, trace) nor \
                 target=level"
            )));
        }
    }
    EnvFilter::try_new(level).map_err(|e| invalid(e.to_string()))
}

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to a non-empty value.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// Lets a warning that a peer or the system can repeat many times a second (a refused
/// handshake, a failing `accept`) through at most once per interval, so it stays visible
/// without flooding the log. The occurrences in between are counted, and the next warning
/// says how many there were; log them at DEBUG.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    origin: Instant,
    /// Milliseconds after `origin` before which no warning is let through.
    next_ms: AtomicU64,
    /// Occurrences held back since the last warning.
    held: AtomicU64,
}

impl Throttle {
    /// A throttle letting one warning through per `interval`; the first one passes at once.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether to warn about this occurrence: `Some(n)` when it is the first of its interval,
    /// with `n` the occurrences held back since the last warning; `None` (log it at DEBUG)
    /// otherwise.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let now_ms = millis(now.saturating_duration_since(self.origin));
        let next = self.next_ms.load(Ordering::Relaxed);
        let through = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(millis(self.interval)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if through {
            Some(self.held.swap(0, Ordering::Relaxed))
        } else {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs a warning through a [`Throttle`]: at WARN with `held_back` when the throttle lets
/// it through, else at DEBUG. The arguments after the throttle are `tracing`'s fields and
/// message.
///
/// ```
/// # let throttle = fn_lifecycle::logging::Throttle::new(std::time::Duration::from_secs(1));
/// # let error = "EMFILE";
/// fn_lifecycle::warn_throttled!(throttle, %error, "accept failed");
/// ```
#[macro_export]
macro_rules! warn_throttled {
    ($throttle:expr, $($fields_and_message:tt)+) => {
        match $throttle.admit() {
            Some(held_back) => ::tracing::warn!(held_back, $($fields_and_message)+),
            None => ::tracing::debug!($($fields_and_message)+),
        }
    };
}

/// `error` with the errors it came from, `outer: inner: innermost`, each said once: hyper's
/// and tonic's own text is short ("connection error"), and the cause an operator needs
/// ("received fatal alert: UnknownCA", "connection refused") is in a source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("connection error")]
        struct Outer(#[source] std::io::Error);
        let alert = std::io::Error::other("received fatal alert: UnknownCA");
        assert_eq!(
            error_chain(&Outer(alert)),
            "connection error: received fatal alert: UnknownCA"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("cannot dial: {0}")]
        struct SaysItsSource(#[source] std::io::Error);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = error_chain(&SaysItsSource(refused));
        assert_eq!(text.matches("refused").count(), 1, "{text}");
    }

    #[test]
    fn a_level_that_is_no_level_is_refused_not_read_as_a_target() {
        for good in ["info", "WARN", "debug,h2=info", "fn_lb=trace", "off"] {
            assert!(filter(good).is_ok(), "{good}");
        }
        for typo in ["warning", "inf0", "information", "info,warnn"] {
            let err = filter(typo).expect_err(typo).to_string();
            assert!(
                err.starts_with("FN_LOG_LEVEL: invalid filter") && err.contains("is not a level"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_throttle_lets_one_warning_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(1));
        let start = throttle.origin;
        assert_eq!(throttle.admit_at(start), Some(0), "the first passes");
        assert_eq!(throttle.admit_at(start + Duration::from_millis(10)), None);
        assert_eq!(throttle.admit_at(start + Duration::from_millis(999)), None);
        assert_eq!(
            throttle.admit_at(start + Duration::from_millis(1000)),
            Some(2),
            "one interval on, with the two held back"
        );
        assert_eq!(throttle.admit_at(start + Duration::from_millis(1500)), None);
        assert_eq!(
            throttle.admit_at(start + Duration::from_secs(60)),
            Some(1),
            "a quiet spell lets the next one through"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            use_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None), "a file or a pipe gets no colour");
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }
}
