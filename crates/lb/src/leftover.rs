//! What an answer leaves of its request body, read and thrown away so that the client's
//! connection stays usable.
//!
//! The LB answers some requests before it has read their body: a 404 or a 405, a 413 from
//! the declared length, a 503 when no runner has room, or a function that answers without
//! reading its input. HTTP/1.1 cannot skip the rest of a body, so hyper closes such a
//! connection after the answer, and without saying so in the answer: a keep-alive client
//! that sends its next request on that connection finds it closed (oha, 1 MiB bodies to a
//! missing route, one connection: 39 of 100 calls failed with "connection closed before
//! message completed").
//!
//! So, as nginx discards an unread body, a request body dropped before its end is read and
//! thrown away in a task of its own, while the answer goes out: at most [`DRAIN_BYTES`],
//! for at most [`DRAIN_TIME`]. Read to its end, it leaves the connection open for the next
//! request; over those bounds the task drops it and hyper closes the connection. Two bodies
//! are not read at all, and their answer says `Connection: close` when it has not left
//! yet: one declared longer than [`DRAIN_BYTES`], and one whose client sent
//! `Expect: 100-continue` and was never asked for it (reading it would send a
//! `100 Continue` after the final answer). The lingering close in [`crate::client_io`]
//! still lets such a client read its answer. An answer that leaves while more than
//! [`DRAIN_BYTES`] of its body are still to come, a 408, or a 413 to a body of unknown
//! length, says `Connection: close` too ([`Leftover::closes_after`]): the connection would
//! close after it all the same.
//!
//! HTTP/1.x only: HTTP/2 ends a request stream the server no longer reads with a
//! `RST_STREAM`, and the connection carries on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Buf, Frame, SizeHint};

/// Most bytes of an unread request body read and thrown away.
pub const DRAIN_BYTES: u64 = 4 * 1024 * 1024;

/// Longest time spent reading the rest of an unread request body.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// What became of a [`Tracked`] body, for its answer.
#[derive(Debug, Clone, Default)]
pub struct Leftover {
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// HTTP/1.x: a body left unread costs the connection (HTTP/2 resets the stream).
    http1: bool,
    /// Dropped unread where it cannot be drained: the connection will close.
    closes: AtomicBool,
    /// Read to its end or failed.
    finished: AtomicBool,
    /// The least the body still holds (its declared length less what was read; 0 for a
    /// chunked body).
    remaining: AtomicU64,
    /// Chunked: how much is left cannot be known.
    unknown_length: AtomicBool,
}

impl Leftover {
    /// Whether the body was dropped without being read and its connection will close after
    /// the answer (which should then say `Connection: close`).
    pub fn closes_connection(&self) -> bool {
        self.state.closes.load(Ordering::Acquire)
    }

    /// Whether an answer with `status` that leaves now should say `Connection: close`,
    /// because the connection will close after it: the body was dropped where it cannot be
    /// drained; or it is not read to its end yet and more than [`DRAIN_BYTES`] of it are still
    /// to come (an early answer: whether the function reads the rest is not known yet, and
    /// the drain would give up on it); or the answer is a 408 (the body stalled: a drain
    /// would wait in vain) or a 413 to a body of unknown length (it went on past the limit).
    pub fn closes_after(&self, status: http::StatusCode) -> bool {
        let state = &self.state;
        if state.closes.load(Ordering::Acquire) {
            return true;
        }
        if !state.http1 || state.finished.load(Ordering::Acquire) {
            return false;
        }
        state.remaining.load(Ordering::Acquire) > DRAIN_BYTES
            || status == http::StatusCode::REQUEST_TIMEOUT
            || (status == http::StatusCode::PAYLOAD_TOO_LARGE
                && state.unknown_length.load(Ordering::Acquire))
    }
}

/// A request body that, dropped before its end, reads the rest in a task of its own (see
/// the module docs).
#[derive(Debug)]
pub struct Tracked<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Send,
{
    body: Option<B>,
    /// Read to its end or failed: nothing left to read.
    finished: bool,
    /// Polled at least once (so a `100 Continue` has gone out if one was asked for).
    polled: bool,
    /// HTTP/1.x (HTTP/2 needs none of this).
    http1: bool,
    expects_continue: bool,
    leftover: Leftover,
}

/// `body` of a request with these `version` and `headers`, tracked; and where its answer
/// learns whether the connection will close.
pub fn track<B>(body: B, version: Version, headers: &HeaderMap) -> (Tracked<B>, Leftover)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Send,
{
    let hint = body.size_hint();
    let leftover = Leftover {
        state: Arc::new(State {
            http1: version <= Version::HTTP_11,
            remaining: AtomicU64::new(hint.lower()),
            unknown_length: AtomicBool::new(hint.exact().is_none()),
            ..State::default()
        }),
    };
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let tracked = Tracked {
        body: Some(body),
        finished: false,
        polled: false,
        http1: version <= Version::HTTP_11,
        expects_continue,
        leftover: leftover.clone(),
    };
    (tracked, leftover)
}

impl<B> Body for Tracked<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Send,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let polled = Pin::new(&mut *body).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => {
                this.finished = true;
                this.leftover.state.finished.store(true, Ordering::Release);
            }
            Poll::Ready(Some(Ok(_))) if this.http1 => {
                let state = &this.leftover.state;
                state
                    .remaining
                    .store(body.size_hint().lower(), Ordering::Release);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map(B::size_hint).unwrap_or_default()
    }
}

impl<B> Drop for Tracked<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Send,
{
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if self.finished || body.is_end_stream() || !self.http1 {
            return;
        }
        let unasked = self.expects_continue && !self.polled;
        let too_long = body.size_hint().lower() > DRAIN_BYTES;
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if !unasked && !too_long => {
                runtime.spawn(drain(body));
            }
            _ => self.leftover.state.closes.store(true, Ordering::Release),
        }
    }
}

/// Reads `body` to its end and drops it, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn drain<B: Body + Unpin>(mut body: B) {
    let mut read: u64 = 0;
    let to_end = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return false; // the client broke off: hyper closes the connection
            };
            if let Some(data) = frame.data_ref() {
                read += data.remaining() as u64;
                if read > DRAIN_BYTES {
                    return false;
                }
            }
        }
        true
    };
    match tokio::time::timeout(DRAIN_TIME, to_end).await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(
            "an unread request body broke off or ran over {DRAIN_BYTES} bytes; the connection closes"
        ),
        Err(_) => tracing::debug!(
            "an unread request body was still coming after {DRAIN_TIME:?}; the connection closes"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;
    use http_body_util::{Full, StreamBody};
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type Chunks = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
    type Feed = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

    /// A request body fed by hand, and its feed.
    fn request_body() -> (Chunks, Feed) {
        let (tx, rx) = mpsc::channel(4);
        (StreamBody::new(ReceiverStream::new(rx)), tx)
    }

    /// Feeds 64 KiB chunks until the body is dropped or `max` bytes went; how many went.
    async fn feed(tx: Feed, max: u64) -> u64 {
        let mut sent = 0;
        while sent < max
            && tx
                .send(Ok(Frame::data(Bytes::from(vec![0; 64 * 1024]))))
                .await
                .is_ok()
        {
            sent += 64 * 1024;
        }
        sent
    }

    fn http1() -> (Version, HeaderMap) {
        (Version::HTTP_11, HeaderMap::new())
    }

    /// A body of an HTTP/1.1 request with `headers`, tracked, with a first chunk read from
    /// it (so it has been asked for); the body, its leftover and its feed.
    async fn tracked_after_a_chunk(headers: &HeaderMap) -> (Tracked<Chunks>, Leftover, Feed) {
        let (body, tx) = request_body();
        let (mut tracked, leftover) = track(body, Version::HTTP_11, headers);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("alive");
        assert!(tracked.frame().await.is_some());
        (tracked, leftover, tx)
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_read_to_its_end_in_the_background() {
        let (version, headers) = http1();
        let (tracked, leftover, tx) = tracked_after_a_chunk(&headers).await;
        drop(tracked); // answered without reading the rest
        assert!(!leftover.closes_connection());
        // Someone keeps reading: the whole megabyte goes, then the body's end.
        let sent = feed(tx.clone(), 1024 * 1024).await;
        assert_eq!(sent, 1024 * 1024);
        drop(tx);
        // And not more than the bound: a fresh body fed past it is dropped there.
        let (body, tx) = request_body();
        drop(track(body, version, &headers).0);
        let sent = tokio::time::timeout(Duration::from_secs(10), feed(tx, 64 * DRAIN_BYTES))
            .await
            .expect("the drain stops reading");
        assert!(
            (DRAIN_BYTES..DRAIN_BYTES + 8 * 64 * 1024).contains(&sent),
            "read about the bound, then dropped: {sent}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_is_dropped_after_the_drain_time() {
        let (body, tx) = request_body();
        let (version, headers) = http1();
        drop(track(body, version, &headers).0);
        let started = tokio::time::Instant::now();
        tx.closed().await;
        assert_eq!(started.elapsed(), DRAIN_TIME);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_or_of_http2_leaves_nothing_to_do() {
        let (body, tx) = request_body();
        let (version, headers) = http1();
        let (mut tracked, leftover) = track(body, version, &headers);
        drop(tx);
        assert!(tracked.frame().await.is_none());
        drop(tracked);
        assert!(!leftover.closes_connection());

        let (body, tx) = request_body();
        let (tracked, leftover) = track(body, Version::HTTP_2, &HeaderMap::new());
        drop(tracked);
        assert!(tx.is_closed(), "HTTP/2: dropped at once, not read");
        assert!(!leftover.closes_connection());
    }

    #[tokio::test]
    async fn bodies_too_long_or_never_asked_for_are_not_read_and_the_connection_closes() {
        let (version, mut headers) = http1();
        let long = Full::new(Bytes::from(vec![0; DRAIN_BYTES as usize + 1]));
        let (tracked, leftover) = track(long, version, &headers);
        drop(tracked);
        assert!(leftover.closes_connection(), "declared over the bound");

        headers.insert(header::EXPECT, HeaderValue::from_static("100-Continue"));
        let (body, tx) = request_body();
        let (tracked, leftover) = track(body, version, &headers);
        drop(tracked);
        assert!(
            leftover.closes_connection(),
            "expects 100-continue, never polled"
        );
        assert!(tx.is_closed(), "not read");

        let (tracked, leftover, tx) = tracked_after_a_chunk(&headers).await;
        drop(tracked);
        assert!(!leftover.closes_connection(), "asked for: drained");
        assert_eq!(feed(tx, 256 * 1024).await, 256 * 1024);
    }
}
