//! Logging a function's stdout and stderr: read line by line in a background task and
//! emitted as `tracing` events with target `function`. Lines are cut at [`MAX_LINE`] bytes
//! (the rest of the line is skipped) so that a function cannot make the runner buffer
//! without bound, and at most [`MAX_LINES_PER_SECOND`] lines of one instance are logged in a
//! second (the rest are counted, and the count logged), so that one function cannot flood
//! the runner's log, its disk and its CPU with it. Output keeps being read either way, up to
//! [`MAX_BYTES_PER_SECOND`] of a stream: beyond it, reading pauses until the second is over,
//! and a function that floods its output waits on its own full pipe. Read and dropped, a
//! flood took about half a core of the thread that serves the runner's calls.
//!
//! Each line carries the id of the call the instance took last (the one that started it,
//! until it takes another): with one call at a time, the call the line belongs to.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Most lines of one instance's output logged in a second (both streams together).
pub(crate) const MAX_LINES_PER_SECOND: u32 = 1000;

/// Most bytes of one output stream read in a second: [`MAX_LINES_PER_SECOND`] lines of
/// 1 KiB. A function that writes more loses most of it to the line budget anyway; the bound
/// keeps the cost of reading and splitting what is dropped (a flood of empty lines is a
/// million lines a megabyte) to a small share of the runner's thread.
pub(crate) const MAX_BYTES_PER_SECOND: usize = 1024 * 1024;

/// What identifies an instance in logs, and the budget its output is logged within.
#[derive(Debug)]
pub(crate) struct Labels {
    pub(crate) app: String,
    pub(crate) function: String,
    pub(crate) instance: String,
    /// The call the instance took last; at first, the call that started it.
    call_id: Mutex<String>,
    budget: Mutex<LineBudget>,
}

impl Labels {
    pub(crate) fn new(app: String, function: String, instance: String, call_id: &str) -> Self {
        Labels {
            app,
            function,
            instance,
            call_id: Mutex::new(call_id.to_owned()),
            budget: Mutex::new(LineBudget::new(MAX_LINES_PER_SECOND, Instant::now())),
        }
    }

    /// Notes that the instance takes call `call_id`: its output is logged under it from now.
    pub(crate) fn took_call(&self, call_id: &str) {
        // Written in place: the allocation is kept (ids are all of a length).
        let mut current = self.call_id.lock().unwrap_or_else(PoisonError::into_inner);
        current.clear();
        current.push_str(call_id);
    }

    /// Whether one more line may be logged now; logs how many were dropped before it.
    fn admit(&self) -> bool {
        let verdict = self
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now());
        match verdict {
            Verdict::Log { dropped } => {
                if dropped > 0 {
                    self.log_dropped(dropped);
                }
                true
            }
            Verdict::Drop => false,
        }
    }

    /// Logs the count of lines still held back (the output has ended).
    pub(crate) fn flush_dropped(&self) {
        let dropped = self
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_dropped();
        if dropped > 0 {
            self.log_dropped(dropped);
        }
    }

    fn log_dropped(&self, dropped: u64) {
        tracing::warn!(
            app = %self.app,
            function = %self.function,
            instance = %self.instance,
            dropped,
            limit = MAX_LINES_PER_SECOND,
            "function output over the limit of lines per second; lines dropped"
        );
    }
}

/// Lines allowed per one-second window; what is over it is counted.
#[derive(Debug)]
struct LineBudget {
    limit: u32,
    window_start: Instant,
    in_window: u32,
    dropped: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Log the line; `dropped` lines were dropped since the last one logged.
    Log {
        dropped: u64,
    },
    Drop,
}

impl LineBudget {
    fn new(limit: u32, now: Instant) -> Self {
        LineBudget {
            limit,
            window_start: now,
            in_window: 0,
            dropped: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Verdict {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < self.limit {
            self.in_window += 1;
            Verdict::Log {
                dropped: self.take_dropped(),
            }
        } else {
            self.dropped += 1;
            Verdict::Drop
        }
    }

    fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// Longest line kept, in bytes; longer lines are truncated.
pub(crate) const MAX_LINE: usize = 4096;

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Reads `reader` to its end, logging each line. Ends when the function (and everything it
/// started that holds the pipe) has exited.
pub(crate) async fn log_lines<R>(reader: R, stream: Stream, labels: Arc<Labels>)
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::new(reader);
    let mut lines = LineSplitter::new(MAX_LINE);
    let emit = |line: &[u8], truncated: bool| log_line(&labels, stream, line, truncated);
    let mut rate = ReadRate::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::debug!(instance = %labels.instance, stream = stream.as_str(), error = %e, "cannot read function output");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        lines.push(chunk, emit);
        reader.consume(n);
        rate.read(n).await;
    }
    lines.finish(emit);
    labels.flush_dropped();
}

/// The bytes of an output read in the current second: past [`MAX_BYTES_PER_SECOND`], the
/// reader waits for the next.
#[derive(Debug)]
pub(crate) struct ReadRate {
    window: tokio::time::Instant,
    read: usize,
}

impl ReadRate {
    pub(crate) fn new() -> Self {
        ReadRate {
            window: tokio::time::Instant::now(),
            read: 0,
        }
    }

    /// Notes `n` bytes read; returns once more may be read.
    pub(crate) async fn read(&mut self, n: usize) {
        self.read += n;
        let now = tokio::time::Instant::now();
        if now >= self.window + Duration::from_secs(1) {
            self.window = now;
            self.read = 0;
        } else if self.read > MAX_BYTES_PER_SECOND {
            self.window += Duration::from_secs(1);
            tokio::time::sleep_until(self.window).await;
            self.read = 0;
        }
    }
}

/// Logs one line of a function's output, within the instance's budget.
pub(crate) fn log_line(labels: &Labels, stream: Stream, line: &[u8], truncated: bool) {
    if !labels.admit() {
        return;
    }
    let call_id = labels
        .call_id
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    tracing::info!(
        target: "function",
        app = %labels.app,
        function = %labels.function,
        instance = %labels.instance,
        call_id = %call_id,
        stream = stream.as_str(),
        truncated,
        "{}",
        String::from_utf8_lossy(line)
    );
}

/// Splits bytes into lines of at most `max` bytes, keeping no more than that in memory.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    truncated: bool,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        LineSplitter {
            max,
            line: Vec::new(),
            truncated: false,
        }
    }

    /// Feeds `chunk`; calls `emit(line, truncated)` for every completed line (without its
    /// `\n` or `\r\n`).
    pub(crate) fn push(&mut self, mut chunk: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.keep(&chunk[..end]);
            self.emit(&mut emit);
            chunk = &chunk[end + 1..];
        }
        self.keep(chunk);
    }

    /// Emits a last line that had no newline.
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() || self.truncated {
            self.emit(&mut emit);
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = self.max - self.line.len();
        if bytes.len() > room {
            self.truncated = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        emit(line, self.truncated);
        self.line.clear();
        self.truncated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(max);
        for chunk in chunks {
            splitter.push(chunk, |l, t| {
                out.push((String::from_utf8_lossy(l).into_owned(), t))
            });
        }
        splitter.finish(|l, t| out.push((String::from_utf8_lossy(l).into_owned(), t)));
        out
    }

    #[test]
    fn splits_across_chunks() {
        assert_eq!(
            split(100, &[b"hel", b"lo\nwor", b"ld\r\n\nlast"]),
            [
                ("hello".to_owned(), false),
                ("world".to_owned(), false),
                (String::new(), false),
                ("last".to_owned(), false)
            ]
        );
        assert!(split(100, &[b""]).is_empty());
        assert_eq!(split(100, &[b"a\n"]), [("a".to_owned(), false)]);
    }

    #[test]
    fn a_second_takes_the_limit_of_lines_and_the_rest_are_counted() {
        let start = Instant::now();
        let mut budget = LineBudget::new(3, start);
        for _ in 0..3 {
            assert_eq!(budget.admit(start), Verdict::Log { dropped: 0 });
        }
        for _ in 0..5 {
            assert_eq!(
                budget.admit(start + Duration::from_millis(500)),
                Verdict::Drop
            );
        }
        // The next second: the first line logged tells how many were dropped.
        let next = start + Duration::from_millis(1000);
        assert_eq!(budget.admit(next), Verdict::Log { dropped: 5 });
        assert_eq!(budget.admit(next), Verdict::Log { dropped: 0 });
        assert_eq!(budget.admit(next), Verdict::Log { dropped: 0 });
        assert_eq!(budget.admit(next), Verdict::Drop);
        assert_eq!(
            budget.take_dropped(),
            1,
            "what the end of the output reports"
        );
        assert_eq!(budget.take_dropped(), 0);
    }

    /// Counts the events of target `function` and sums the `dropped` fields of the others.
    #[derive(Default)]
    struct Tally {
        lines: std::sync::atomic::AtomicU64,
        dropped: std::sync::atomic::AtomicU64,
    }

    struct TallyLayer(Arc<Tally>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TallyLayer {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Dropped(u64);
            impl tracing::field::Visit for Dropped {
                fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                    if field.name() == "dropped" {
                        self.0 = value;
                    }
                }
                fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
            }
            use std::sync::atomic::Ordering::Relaxed;
            if event.metadata().target() == "function" {
                self.0.lines.fetch_add(1, Relaxed);
            } else {
                let mut dropped = Dropped(0);
                event.record(&mut dropped);
                self.0.dropped.fetch_add(dropped.0, Relaxed);
            }
        }
    }

    /// A function that writes without end is read at most [`MAX_BYTES_PER_SECOND`] a
    /// second (before, as fast as the runner's thread could go).
    #[tokio::test]
    async fn a_flood_of_output_is_read_at_a_bounded_rate() {
        use tracing_subscriber::layer::SubscriberExt;
        struct Counted<R>(R, Arc<std::sync::atomic::AtomicUsize>);
        impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let before = buf.filled().len();
                let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
                let read = buf.filled().len() - before;
                self.1.fetch_add(read, std::sync::atomic::Ordering::Relaxed);
                polled
            }
        }
        // A subscriber of its own, as the tally test beside it has: the first to reach a
        // callsite with none caches it as disabled, and the tally's lines went unseen.
        let _guard = fn_test_support::logs::scoped_subscriber(
            tracing_subscriber::registry().with(TallyLayer(Arc::default())),
        );
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let flood = Counted(tokio::io::repeat(b'\n'), Arc::clone(&read));
        let labels = Arc::new(Labels::new("a".into(), "f".into(), "i".into(), "c"));
        let reading = tokio::spawn(log_lines(flood, Stream::Stdout, labels));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        reading.abort();
        let read = read.load(std::sync::atomic::Ordering::Relaxed);
        // Two windows begun in 1.5 s, each read to its bound and one buffer more.
        assert!(
            read <= 2 * (MAX_BYTES_PER_SECOND + 64 * 1024),
            "{read} bytes read in 1.5 s"
        );
        assert!(read >= 64 * 1024, "{read} bytes read in 1.5 s: it is read");
    }

    #[tokio::test]
    async fn a_flood_of_output_is_logged_up_to_the_limit_and_the_rest_counted() {
        use std::sync::atomic::Ordering::Relaxed;
        use tracing_subscriber::layer::SubscriberExt;
        let tally = Arc::new(Tally::default());
        let subscriber = tracing_subscriber::registry().with(TallyLayer(Arc::clone(&tally)));
        let _guard = fn_test_support::logs::scoped_subscriber(subscriber);
        let written = 3 * u64::from(MAX_LINES_PER_SECOND);
        let text: Vec<u8> = (0..written)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let labels = Arc::new(Labels::new("a".into(), "f".into(), "i-1".into(), "c"));
        log_lines(&text[..], Stream::Stdout, labels).await;
        let (lines, dropped) = (tally.lines.load(Relaxed), tally.dropped.load(Relaxed));
        assert_eq!(lines + dropped, written, "every line logged or counted");
        // Within a second, or two on a slow machine: at most two windows' worth logged.
        assert!(
            lines <= 2 * u64::from(MAX_LINES_PER_SECOND),
            "{lines} logged"
        );
        assert!(
            dropped >= u64::from(MAX_LINES_PER_SECOND),
            "{dropped} dropped"
        );
    }

    #[test]
    fn output_is_logged_under_the_call_the_instance_took_last() {
        let labels = Labels::new("a".into(), "f".into(), "i-1".into(), "call-1");
        assert_eq!(*labels.call_id.lock().expect("lock"), "call-1");
        labels.took_call("call-2");
        assert_eq!(*labels.call_id.lock().expect("lock"), "call-2");
    }

    #[test]
    fn truncates_long_lines_and_recovers() {
        let long = vec![b'x'; 10_000];
        let out = split(8, &[&long, &long, b"\nshort\n"]);
        assert_eq!(
            out,
            [("xxxxxxxx".to_owned(), true), ("short".to_owned(), false)]
        );
        let mut splitter = LineSplitter::new(8);
        splitter.push(&long, |_, _| {});
        assert!(splitter.line.capacity() < 1024, "memory stays bounded");
    }
}
