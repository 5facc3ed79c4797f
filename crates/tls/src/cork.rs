//! Writes that leave together: a writer under HTTP/2 that holds small writes until the tasks
//! already woken have had their turn.
//!
//! HTTP/2 in hyper and h2 is split across tasks: the connection task writes frames, while a
//! request's body is fed by another task (the body pipe), which may wait for the connection
//! task to grant it flow-control capacity before each frame. So the frames of one call reach
//! the connection task over several turns, and it flushes after each: the LB sent a call's
//! request headers, its body and the end of its stream as three TLS records in three
//! `writev`s (`strace` at c=1), and the runner its answer and its trailers as two. Each
//! write costs a syscall, a TLS record to seal and open, and possibly a wake-up of the peer.
//!
//! [`Corked`] keeps small writes in a buffer. On flush it yields once, so that the tasks
//! already woken (the pipe the connection task has just granted capacity, the call whose
//! answer is ready) run first and add their frames; then it writes everything in one go. It
//! yields again only while the buffer grew in the meantime, at most [`MAX_YIELDS`] times in a
//! row, and only while less than [`YIELD_BELOW`] is held. It never holds more than
//! [`CORK_LIMIT`] bytes: a large write goes straight through, after what is held. Nothing waits for a timer or for the peer: a flush is delayed by
//! turns of tasks that were already runnable, never by idleness.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held back; a write that would take the buffer past this goes out at once
/// (after what is held). Larger than a call's frames at c=1, smaller than a body chunk, so
/// bulk data is never copied here.
pub const CORK_LIMIT: usize = 8 * 1024;

/// Most turns one flush yields for while the buffer keeps growing. The LB's call takes
/// three: its request's headers, its body, and the end of its stream each come from a
/// separate turn of hyper's tasks.
pub const MAX_YIELDS: u8 = 3;

/// A flush yields only while less than this is held. More is worth a write of its own;
/// under load (many calls' frames already held) waiting longer only delays the peer: at 64
/// calls in flight (bench-compare, three runs each) yielding whatever was held carried
/// 4,531–4,700 calls/s, this bound 4,627–5,024.
pub const YIELD_BELOW: usize = 4 * 1024;

/// An [`AsyncWrite`] that gathers small writes until a flush, and lets the tasks already
/// woken add to them before writing; see the module documentation. Reads pass through.
#[derive(Debug)]
pub struct Corked<S> {
    inner: S,
    held: Vec<u8>,
    /// How much was held when this flush last yielded, and how often it has yielded.
    yielded: Option<(usize, u8)>,
}

impl<S> Corked<S> {
    /// `inner` with its small writes gathered.
    pub fn new(inner: S) -> Self {
        Corked {
            inner,
            held: Vec::new(),
            yielded: None,
        }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// Writes everything held to the stream underneath.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = 0;
        let result = loop {
            if written == self.held.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &self.held[written..]) {
                Poll::Ready(Ok(0)) => {
                    break Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the connection took no bytes",
                    )));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.held.drain(..written);
        result
    }

    /// Whether the flush should give the woken tasks a turn first: there is something held,
    /// and it grew since the last turn given (or none was given yet), within the bound.
    fn should_yield(&mut self) -> bool {
        if self.held.is_empty() || self.held.len() >= YIELD_BELOW {
            return false;
        }
        let turns = match self.yielded {
            None => 0,
            Some((len, turns)) if len < self.held.len() && turns < MAX_YIELDS => turns,
            Some(_) => return false,
        };
        self.yielded = Some((self.held.len(), turns + 1));
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() + buf.len() <= CORK_LIMIT {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        std::task::ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held.len() + len <= CORK_LIMIT {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(len));
        }
        std::task::ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.should_yield() {
            // Scheduled behind the tasks already runnable; they may add to what is held.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(this.poll_write_held(cx))?;
        this.yielded = None;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A stream that records each write it is given, whole.
    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let len = whole.len();
            self.get_mut().writes.push(whole);
            Poll::Ready(Ok(len))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn write(corked: &mut Corked<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        let written = Pin::new(corked).poll_write(cx, bytes);
        assert!(
            matches!(written, Poll::Ready(Ok(n)) if n == bytes.len()),
            "{written:?}"
        );
    }

    fn flush(corked: &mut Corked<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(corked).poll_flush(cx)
    }

    #[test]
    fn small_writes_leave_in_one_write_after_one_turn() {
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut corked = Corked::new(Recorder::default());

        write(&mut corked, &mut cx, b"headers;");
        write(&mut corked, &mut cx, b"data;");
        assert!(corked.get_ref().writes.is_empty(), "held until a flush");

        // The first flush gives the runnable tasks a turn: pending, and woken at once.
        assert!(flush(&mut corked, &mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(corked.get_ref().writes.is_empty());

        // Another task added its frame meanwhile: one more turn.
        write(&mut corked, &mut cx, b"end");
        assert!(flush(&mut corked, &mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);

        // Nothing new: everything goes, in one write, and the stream is flushed.
        assert!(matches!(flush(&mut corked, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(corked.get_ref().writes, vec![b"headers;data;end".to_vec()]);
        assert_eq!(corked.get_ref().flushes, 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);

        // The next flush with nothing held does not yield.
        assert!(matches!(flush(&mut corked, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(corked.get_ref().writes.len(), 1);
    }

    #[test]
    fn a_flush_yields_at_most_max_yields_times_however_the_buffer_grows() {
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut corked = Corked::new(Recorder::default());
        let mut turns = 0;
        loop {
            write(&mut corked, &mut cx, b"x");
            match flush(&mut corked, &mut cx) {
                Poll::Pending => turns += 1,
                Poll::Ready(result) => {
                    assert!(result.is_ok());
                    break;
                }
            }
            assert!(turns <= usize::from(MAX_YIELDS), "yielded {turns} times");
        }
        assert_eq!(turns, usize::from(MAX_YIELDS));
        let held = usize::from(MAX_YIELDS) + 1;
        assert_eq!(corked.get_ref().writes, vec![vec![b'x'; held]]);
    }

    #[test]
    fn a_flush_with_enough_held_writes_at_once() {
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut corked = Corked::new(Recorder::default());
        let frames = vec![1u8; YIELD_BELOW];
        write(&mut corked, &mut cx, &frames);
        assert!(matches!(flush(&mut corked, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(corked.get_ref().writes, vec![frames]);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "no turn given");
    }

    #[test]
    fn a_large_write_goes_straight_through_after_what_is_held() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut corked = Corked::new(Recorder::default());
        write(&mut corked, &mut cx, b"frame header");
        let big = vec![7u8; CORK_LIMIT];
        write(&mut corked, &mut cx, &big);
        // In order, the big one not copied into the held buffer.
        assert_eq!(
            corked.get_ref().writes,
            vec![b"frame header".to_vec(), big.clone()]
        );
        assert!(corked.held.is_empty());

        // Vectored the same way.
        let slices = [IoSlice::new(b"hdr"), IoSlice::new(&big)];
        let written = Pin::new(&mut corked).poll_write_vectored(&mut cx, &slices);
        assert!(matches!(written, Poll::Ready(Ok(n)) if n == 3 + big.len()));
        assert_eq!(corked.get_ref().writes.len(), 3);
        assert_eq!(corked.get_ref().writes[2].len(), 3 + big.len());
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held_first() {
        let mut corked = Corked::new(Recorder::default());
        corked.write_all(b"last words").await.expect("held");
        corked.shutdown().await.expect("shut down");
        assert_eq!(corked.get_ref().writes, vec![b"last words".to_vec()]);
        assert!(corked.get_ref().shut);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_from_a_task_already_woken_leave_in_the_same_write() {
        // Two tasks on one thread, as the connection task and a body pipe are: the writer
        // flushes while the other task, already runnable, still has a frame to add.
        let corked = Arc::new(tokio::sync::Mutex::new(Corked::new(Recorder::default())));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let other = {
            let corked = Arc::clone(&corked);
            tokio::spawn(async move {
                rx.await.expect("the writer signals");
                corked
                    .lock()
                    .await
                    .write_all(b" + body")
                    .await
                    .expect("held");
            })
        };
        let writer = {
            let corked = Arc::clone(&corked);
            tokio::spawn(async move {
                let mut guard = corked.lock().await;
                guard.write_all(b"headers").await.expect("held");
                tx.send(()).expect("the other task waits"); // the other task is runnable from here
                drop(guard);
                std::future::poll_fn(|cx| {
                    let Ok(mut guard) = corked.try_lock() else {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    };
                    Pin::new(&mut *guard).poll_flush(cx)
                })
                .await
                .expect("flushed");
            })
        };
        writer.await.expect("writer task");
        other.await.expect("other task");
        assert_eq!(
            corked.lock().await.get_ref().writes,
            vec![b"headers + body".to_vec()]
        );
    }
}
