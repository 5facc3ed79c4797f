//! A client connection below HTTP: the timers and the close that hyper does not do itself.
//!
//! - **First byte from accept.** A new connection must send its first byte within
//!   [`ClientLimits::first_byte`] of being accepted. hyper's header timer starts only once a
//!   request begins, so a connection that never sends a byte would otherwise stay open for
//!   ever (as nginx's `client_header_timeout`, counted from accept). Bytes that begin the
//!   HTTP/2 preface (`PRI * HTTP/2.0...`) do not count until it is whole: hyper waits for
//!   the rest of it to choose the protocol, with no timer of its own, so a client that sent
//!   `P` and nothing more held its connection for ever.
//! - **Send timeout.** A write that makes no progress for [`ClientLimits::send_timeout`]
//!   fails, so a client that stops reading its answer is cut off (nginx's `send_timeout`); the
//!   call's response body is dropped with the connection, which cancels the call.
//! - **Lingering close.** When hyper closes a connection it shuts the write side down first,
//!   then reads and throws away what the client still sends (at most
//!   [`ClientLimits::linger_bytes`], for at most [`ClientLimits::linger_time`], giving up
//!   after [`ClientLimits::linger_idle`] without a byte) before the socket closes (nginx's
//!   lingering close). A client that writes its whole request body before it reads
//!   (Python's `http.client`, `requests`) then reads the answer, a 413 say, instead of a
//!   connection reset: closing a socket with unread data makes the kernel send RST, which
//!   throws away the answer still waiting in the client's receive buffer.
//!
//! - **Send timeout per HTTP/2 stream** ([`stream_send_timeout`]). An HTTP/2 client
//!   throttles each stream with its flow-control window, and one that never opens a
//!   stream's window blocks no write on the connection: the send timer above never fires.
//!   hyper then stops polling that answer's body, so nothing the body holds (the call, its
//!   capacity, the buffered answer) is ever let go, not even at the call's deadline, whose
//!   timer lives in the body. A stream whose body has a frame taken and is then not asked
//!   for the next within the send timeout is given up: its body is dropped, which ends the
//!   call as a client gone. hyper, though, holds the frame it took until the window opens
//!   and asks the body for nothing meanwhile, so it never learns of it and never resets the
//!   stream: the stream, its frame and the connection's place stay. A stream still held a
//!   send timeout after it was given up closes its connection (as the send timer above
//!   closes an HTTP/1.1 one): new requests on it are refused (503, `Retry-After`), and it
//!   closes once its other calls have ended (hyper offers no GOAWAY for one connection
//!   from outside it).
//!
//! Each timer is armed only while it can fire: the first-byte timer until the first byte,
//! the send timer while a write is blocked, the linger timers while closing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{BodyError, ResponseBody};
use crate::connections::{Registered, Stuck, StuckStream};

/// The bounds of a client connection; see the module docs.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// From accept to the first byte of the first request.
    pub first_byte: Duration,
    /// How long a write may make no progress.
    pub send_timeout: Duration,
    /// Most bytes read and discarded while closing.
    pub linger_bytes: u64,
    /// Longest time spent closing.
    pub linger_time: Duration,
    /// Longest wait for the next byte while closing.
    pub linger_idle: Duration,
    /// HTTP/2: how often a connection's client is pinged, and how long its answer may take
    /// before the connection is closed. A client that vanished without closing (a crashed
    /// host, a partition) is then found even when no answer is being written to it, which
    /// HTTP/1's idle timeout does for HTTP/1.
    pub ping: Duration,
    /// Most client connections open at once (`FN_MAX_CONNECTIONS`); see
    /// [`crate::connections`]. lb-agent sizes it from its descriptor limit.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            first_byte: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            linger_bytes: 64 * 1024 * 1024,
            linger_time: Duration::from_secs(30),
            linger_idle: Duration::from_secs(5),
            ping: Duration::from_secs(10),
            max_connections: crate::connections::default_cap(1024),
        }
    }
}

/// A client connection with the [`ClientLimits`] applied.
#[derive(Debug)]
pub struct ClientIo<S> {
    inner: S,
    limits: ClientLimits,
    /// Armed from accept until the first byte arrives that is not part of the HTTP/2
    /// preface, or the preface is whole.
    first_byte: Option<Pin<Box<Sleep>>>,
    /// Bytes of the HTTP/2 preface read so far, while the first timer is armed.
    preface_read: usize,
    /// Armed while a write is blocked.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Set once the close has begun.
    linger: Option<Linger>,
    /// Told of every completed flush, so that a request whose answer has left stops
    /// keeping the connection busy ([`crate::connections`]).
    registered: Option<Arc<Registered>>,
}

#[derive(Debug)]
struct Linger {
    /// The write side is shut down; what is left is draining the read side.
    write_shut: bool,
    until: Pin<Box<Sleep>>,
    idle: Pin<Box<Sleep>>,
    drained: u64,
}

/// `body` as the answer of an HTTP/2 stream, given up when hyper, having taken a frame of
/// it, asks for none for `limit` (see the module docs). Costs a task per stream, aborted
/// with the body.
pub fn stream_send_timeout(body: ResponseBody, limit: Duration, stuck: Stuck) -> ResponseBody {
    let shared = Arc::new(StreamShared {
        body: Mutex::new(Some(body)),
        held: Mutex::new(None),
        started: Instant::now(),
        waiting_since: AtomicU64::new(NOT_WAITING),
    });
    let watchdog = tokio::spawn(watch_stream(Arc::downgrade(&shared), limit, stuck));
    StreamTimed {
        shared,
        watchdog: watchdog.abort_handle(),
        limit,
        given_up: false,
        rest: Bytes::new(),
    }
    .boxed_unsync()
}

/// Most bytes handed to hyper at once on an HTTP/2 stream. The send timeout runs from one
/// frame handed over until hyper asks for the next, which it does once its send buffer has
/// room again: with a runner's 1 MiB frames whole, a client reading steadily below some
/// 35 KB/s was cut off as if it read nothing. In pieces of 64 KiB, the timeout fires only
/// when the client takes less than that in the whole timeout, as over HTTP/1.1 where any
/// progress counts.
const STREAM_PIECE: usize = 64 * 1024;

/// `StreamShared::waiting_since` when hyper is not expected to ask for a frame.
const NOT_WAITING: u64 = u64::MAX;

struct StreamShared {
    /// `None` once the watchdog gave the stream up.
    body: Mutex<Option<ResponseBody>>,
    /// Set once the given-up stream is found still held: counts it stuck until the stream
    /// is dropped, at once with its body (not later, with the watchdog's abort), so that the
    /// count never stays up after the stream's `Busy` is released.
    held: Mutex<Option<StuckStream>>,
    started: Instant,
    /// Milliseconds after `started` at which the body last handed hyper a frame, while
    /// hyper has not asked for the next one yet; [`NOT_WAITING`] otherwise.
    waiting_since: AtomicU64,
}

impl StreamShared {
    fn body(&self) -> std::sync::MutexGuard<'_, Option<ResponseBody>> {
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NOT_WAITING - 1)
    }
}

struct StreamTimed {
    shared: Arc<StreamShared>,
    watchdog: tokio::task::AbortHandle,
    limit: Duration,
    /// The give-up was reported to hyper: nothing more to say.
    given_up: bool,
    /// What is left of a data frame larger than [`STREAM_PIECE`], handed to hyper next.
    rest: Bytes,
}

impl Drop for StreamTimed {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Body for StreamTimed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut body = this.shared.body();
        let Some(inner) = body.as_mut() else {
            if std::mem::replace(&mut this.given_up, true) {
                return Poll::Ready(None);
            }
            let limit = this.limit;
            return Poll::Ready(Some(Err(format!(
                "the client took no data of this stream for {limit:?}"
            )
            .into())));
        };
        let polled = if this.rest.is_empty() {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) if data.len() > STREAM_PIECE => {
                        this.rest = data.split_off(STREAM_PIECE);
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        } else {
            let piece = this.rest.split_to(this.rest.len().min(STREAM_PIECE));
            Poll::Ready(Some(Ok(Frame::data(piece))))
        };
        let waiting = match &polled {
            Poll::Ready(Some(Ok(_))) => this.shared.now_ms(),
            _ => NOT_WAITING,
        };
        this.shared.waiting_since.store(waiting, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.shared.body().as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self
            .shared
            .body()
            .as_ref()
            .map(Body::size_hint)
            .unwrap_or_default();
        let rest = self.rest.len() as u64;
        if rest > 0 {
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(rest));
            }
            hint.set_lower(hint.lower().saturating_add(rest));
        }
        hint
    }
}

/// Gives the stream up once it has waited `limit` for hyper to take its next frame; reports
/// it `stuck` (its connection is to close) if hyper still holds it `limit` after that, until
/// the stream is dropped.
async fn watch_stream(weak: Weak<StreamShared>, limit: Duration, stuck: Stuck) {
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    let mut next_look = limit;
    loop {
        tokio::time::sleep(next_look).await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let since = shared.waiting_since.load(Ordering::Relaxed);
        let waited = shared.now_ms().saturating_sub(since);
        if since == NOT_WAITING || waited < limit_ms {
            next_look = Duration::from_millis(limit_ms.saturating_sub(waited).max(1)).min(limit);
            continue;
        }
        tracing::debug!(
            ?limit,
            "an HTTP/2 client took no data of a stream for the send timeout; giving its call up"
        );
        // Dropped outside the lock: a call's body lets go of its runner stream when dropped.
        let body = shared.body().take();
        drop(body);
        drop(shared);
        break;
    }
    // Were hyper to ask the body for a frame, it would get the error, reset the stream and
    // drop it, and this task with it. Still here after `limit`: hyper holds a frame for a
    // window the client keeps shut (see the module docs).
    tokio::time::sleep(limit).await;
    if let Some(shared) = weak.upgrade() {
        tracing::debug!(
            ?limit,
            "an HTTP/2 client kept a given-up stream's window shut; closing its connection"
        );
        *shared.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(stuck.hold());
    }
}

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn timer(after: Duration) -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep(after))
}

impl<S> ClientIo<S> {
    /// `inner`, just accepted.
    pub fn new(inner: S, limits: ClientLimits) -> Self {
        ClientIo {
            first_byte: Some(timer(limits.first_byte)),
            preface_read: 0,
            inner,
            limits,
            stalled: None,
            linger: None,
            registered: None,
        }
    }

    /// Tells `registered` of every completed flush.
    #[must_use]
    pub fn reporting_flushes(mut self, registered: Arc<Registered>) -> Self {
        self.registered = Some(registered);
        self
    }

    /// Passes a write's result through, turning a stall past the limit into an error.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limits.send_timeout;
        let stalled = self.stalled.get_or_insert_with(|| timer(limit));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(first_byte) = this.first_byte.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let read = &buf.filled()[before..];
                let rest = H2_PREFACE.get(this.preface_read..).unwrap_or_default();
                if read.len() < rest.len() && rest.starts_with(read) {
                    // Still a part of the preface: hyper waits for the rest, untimed.
                    this.preface_read += read.len();
                } else {
                    this.first_byte = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if first_byte.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no request within {:?} of the connection",
                        this.limits.first_byte
                    ),
                )))
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        // hyper flushes its socket only once its own buffer is empty: all it was given has
        // been written.
        if let (Poll::Ready(Ok(())), Some(registered)) = (&polled, &this.registered) {
            registered.flushed();
        }
        this.watch_write(cx, polled)
    }

    /// Shuts the write side down, then drains the read side within the linger bounds. Never
    /// fails: a client that has gone leaves nothing to drain.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limits = &this.limits;
        let linger = this.linger.get_or_insert_with(|| Linger {
            write_shut: false,
            until: timer(limits.linger_time),
            idle: timer(limits.linger_idle),
            drained: 0,
        });
        if !linger.write_shut {
            match Pin::new(&mut this.inner).poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())), // already gone
                Poll::Ready(Ok(())) => linger.write_shut = true,
            }
        }
        let mut scratch = [0u8; 8192];
        loop {
            if linger.drained >= this.limits.linger_bytes {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    linger.drained += buf.filled().len() as u64;
                    let idle = this.limits.linger_idle;
                    linger
                        .idle
                        .as_mut()
                        .reset(tokio::time::Instant::now() + idle);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    let expired = linger.until.as_mut().poll(cx).is_ready()
                        || linger.idle.as_mut().poll(cx).is_ready();
                    return if expired {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> ClientLimits {
        ClientLimits::default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_limit() {
        let (server, _client) = tokio::io::duplex(64);
        let mut io = ClientIo::new(server, limits());
        let started = tokio::time::Instant::now();
        let err = io.read(&mut [0u8; 16]).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_of_the_http2_preface_does_not_stop_the_first_byte_limit() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut io = ClientIo::new(server, limits());
        let started = tokio::time::Instant::now();
        client.write_all(b"PRI * HTTP").await.expect("writes");
        assert_eq!(io.read(&mut [0u8; 16]).await.expect("reads"), 10);
        let err = tokio::time::timeout(Duration::from_secs(60), io.read(&mut [0u8; 16]))
            .await
            .expect("the read ends at the first-byte limit")
            .expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        // The whole preface, or a byte that is not part of it, ends this layer's timing.
        for first in [H2_PREFACE, b"PRI * HTTX"] {
            let (server, mut client) = tokio::io::duplex(64);
            let mut io = ClientIo::new(server, limits());
            client.write_all(first).await.expect("writes");
            let mut read = vec![0u8; first.len()];
            io.read_exact(&mut read).await.expect("reads");
            let late = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                client.write_all(b"x").await.expect("writes");
                client
            });
            assert_eq!(io.read(&mut [0u8; 16]).await.expect("reads"), 1);
            drop(late.await);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_first_byte_reads_wait_as_long_as_they_need() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut io = ClientIo::new(server, limits());
        client.write_all(b"G").await.expect("writes");
        assert_eq!(io.read(&mut [0u8; 16]).await.expect("reads"), 1);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            client.write_all(b"ET").await.expect("writes");
            client
        });
        // hyper's own header and idle timers govern from here; this layer adds none.
        assert_eq!(io.read(&mut [0u8; 16]).await.expect("reads"), 2);
        drop(late.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_past_the_send_timeout_fails() {
        let (server, mut client) = tokio::io::duplex(8);
        client.write_all(b"x").await.expect("writes");
        let mut io = ClientIo::new(server, limits());
        io.read_exact(&mut [0u8; 1]).await.expect("first byte");
        io.write_all(b"12345678").await.expect("fits the pipe");
        let started = tokio::time::Instant::now();
        let err = io.write_all(b"more").await.expect_err("stalls");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (server, mut client) = tokio::io::duplex(8);
        let mut io = ClientIo::new(server, limits());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            while got.len() < 40 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let n = client.read(&mut buf).await.expect("reads");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let started = tokio::time::Instant::now();
        io.write_all(&[7u8; 40])
            .await
            .expect("progress every 20 s is enough");
        assert!(started.elapsed() >= Duration::from_secs(60));
        assert_eq!(reader.await.expect("reader"), vec![7u8; 40]);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_drains_what_the_client_still_sends_then_ends() {
        let (server, mut client) = tokio::io::duplex(1024);
        let mut io = ClientIo::new(server, limits());
        // The client is still sending a body nobody will read.
        let sender = tokio::spawn(async move {
            for _ in 0..100 {
                client
                    .write_all(&[1u8; 1000])
                    .await
                    .expect("drained, not refused");
            }
            let mut answer = Vec::new();
            client
                .read_to_end(&mut answer)
                .await
                .expect("the answer, then EOF");
            answer
        });
        io.write_all(b"413").await.expect("answer");
        io.shutdown().await.expect("closes");
        assert_eq!(sender.await.expect("sender"), b"413");
    }

    #[tokio::test(start_paused = true)]
    async fn closing_gives_up_on_a_client_that_neither_sends_nor_closes() {
        let (server, _client) = tokio::io::duplex(64);
        let mut io = ClientIo::new(server, limits());
        let started = tokio::time::Instant::now();
        io.shutdown().await.expect("closes");
        assert_eq!(started.elapsed(), Duration::from_secs(5), "the idle bound");
    }
}
