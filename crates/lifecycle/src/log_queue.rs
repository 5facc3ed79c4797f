//! The queue between the threads that log and the one thread that writes to stderr.
//!
//! A thread that logs only queues its line ([`QueueWriter`]); a thread of the queue's own
//! writes the lines out in order. Written in place, a line blocked the thread that logged it
//! whenever stderr did (a pipe nobody reads, a container engine's log driver that stalls, a
//! terminal held with Ctrl-S), and with it every call on that thread's runtime. The queue is
//! bounded in lines and in bytes (a function's output is logged, up to 4 KiB a line, and more
//! once escaped): past either bound a line is dropped and counted. Nothing here ever blocks
//! a logging thread, and [`Queue::flush`] waits a bounded time.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

enum Msg {
    Line(Vec<u8>),
    /// Everything queued before it has been written: answer on the channel.
    Flushed(SyncSender<()>),
}

/// A bounded queue of log lines and the thread that writes them.
#[derive(Debug)]
pub(crate) struct Queue {
    tx: SyncSender<Msg>,
    /// Bytes queued and not written yet.
    bytes: AtomicUsize,
    max_bytes: usize,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Line(line) => write!(f, "Line({} bytes)", line.len()),
            Msg::Flushed(_) => f.write_str("Flushed"),
        }
    }
}

impl Queue {
    /// A queue of at most `max_lines` lines and `max_bytes` bytes, written to `out` by a
    /// thread named `fn-log`.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub(crate) fn start(
        out: Box<dyn Write + Send>,
        max_lines: usize,
        max_bytes: usize,
    ) -> std::io::Result<Arc<Queue>> {
        let (tx, rx) = sync_channel(max_lines);
        let queue = Arc::new(Queue {
            tx,
            bytes: AtomicUsize::new(0),
            max_bytes,
            dropped: AtomicU64::new(0),
        });
        let writer = Arc::clone(&queue);
        std::thread::Builder::new()
            .name("fn-log".into())
            .spawn(move || writer.write_out(rx, out))?;
        Ok(queue)
    }

    /// The thread: writes each line as it comes, in one write (a panic's message on the same
    /// stderr never lands inside a line), until every sender is gone.
    fn write_out(&self, rx: Receiver<Msg>, mut out: Box<dyn Write + Send>) {
        for msg in rx {
            match msg {
                Msg::Line(line) => {
                    // A failed write (stderr closed) loses the line, as a direct write did.
                    let _ = out.write_all(&line);
                    self.bytes.fetch_sub(line.len(), Ordering::AcqRel);
                }
                Msg::Flushed(done) => {
                    let _ = out.flush();
                    let _ = done.try_send(());
                }
            }
        }
    }

    /// Queues `line`, or drops and counts it when the queue is full; whether it was queued.
    pub(crate) fn push(&self, line: &[u8]) -> bool {
        let len = line.len();
        if self.bytes.fetch_add(len, Ordering::AcqRel) + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send(Msg::Line(line.to_vec())).is_err() {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues `line` past the byte bound (a panic's message, once a flush has made room in
    /// the channel); whether it was queued.
    pub(crate) fn push_past_the_bound(&self, line: &[u8]) -> bool {
        self.bytes.fetch_add(line.len(), Ordering::AcqRel);
        if self.tx.try_send(Msg::Line(line.to_vec())).is_err() {
            self.bytes.fetch_sub(line.len(), Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Lines dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until the lines queued before it are written, at most `bound` (a stderr that
    /// does not take them leaves them queued); whether they were.
    pub(crate) fn flush(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let (done_tx, done_rx) = sync_channel(1);
        let mut msg = Msg::Flushed(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// What the subscriber writes each event to: queues it whole.
#[derive(Debug, Clone)]
pub(crate) struct QueueWriter(pub(crate) Arc<Queue>);

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _queued = self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueueWriter {
    type Writer = QueueWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_a_flush_waits_for_them() {
        let sink = Sink::default();
        let queue = Queue::start(Box::new(sink.clone()), 1024, 1 << 20).expect("thread");
        let mut writer = QueueWriter(Arc::clone(&queue));
        for i in 0..500 {
            writer
                .write_all(format!("line {i}\n").as_bytes())
                .expect("queued");
        }
        assert!(queue.flush(Duration::from_secs(5)), "flushed");
        let written = String::from_utf8(sink.0.lock().expect("sink").clone()).expect("text");
        let expected: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(written, expected);
        assert_eq!(queue.dropped(), 0);
    }

    /// A stderr nobody reads: logging never blocks, lines past the bounds are dropped and
    /// counted, and a flush gives up after its bound.
    #[test]
    fn a_stalled_output_drops_and_counts_and_never_blocks() {
        let (reader, stalled) = std::io::pipe().expect("pipe");
        let queue = Queue::start(Box::new(stalled), 64, 1 << 20).expect("thread");
        let mut writer = QueueWriter(Arc::clone(&queue));
        // Each line more than the pipe holds (64 KiB): the writer thread stalls on the first
        // it takes, whenever it starts, and the queue holds 1 MiB of the rest at most.
        let line = vec![b'x'; 128 * 1024];
        let started = Instant::now();
        for _ in 0..200 {
            writer.write_all(&line).expect("never fails");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "logging blocked: {:?}",
            started.elapsed()
        );
        assert!(queue.dropped() >= 190, "dropped {}", queue.dropped());
        let flushing = Instant::now();
        assert!(
            !queue.flush(Duration::from_millis(200)),
            "not written: stalled"
        );
        assert!(flushing.elapsed() < Duration::from_secs(2));
        drop(reader);
    }

    /// The bytes bound holds however few the lines: long lines (a function's output, once
    /// escaped) cannot fill memory through a queue counted in lines.
    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (reader, stalled) = std::io::pipe().expect("pipe");
        let queue = Queue::start(Box::new(stalled), 8192, 256 * 1024).expect("thread");
        let mut writer = QueueWriter(Arc::clone(&queue));
        let line = vec![b'y'; 16 * 1024];
        for _ in 0..200 {
            writer.write_all(&line).expect("never fails");
        }
        assert!(
            queue.bytes.load(Ordering::Acquire) <= 256 * 1024,
            "{} bytes queued",
            queue.bytes.load(Ordering::Acquire)
        );
        assert!(queue.dropped() > 150, "dropped {}", queue.dropped());
        drop(reader);
    }
}
