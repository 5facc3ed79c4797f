//! Request and response bodies, both streamed.
//!
//! [`Body`] is the client's request body as the runner forwards it: chunks arrive as the runner
//! sends them, nothing is buffered unless the function asks for it ([`Body::bytes`]).
//! [`ResponseBody`] is what the function answers: whole bytes, any stream of chunks, the request
//! body itself (an echo), or the receiving half of [`ResponseBody::channel`], whose
//! [`BodySender`] lets the function write chunks as it produces them. A streamed response goes
//! out with chunked encoding, each chunk as soon as it is produced.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, stream};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// The error type of handlers and of streamed response bodies: anything that is an error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body could not be read (the runner went away or broke the framing).
#[derive(Debug, thiserror::Error)]
#[error("cannot read the request body: {0}")]
pub struct BodyError(#[source] hyper::Error);

/// The request body of a call: a stream of byte chunks.
///
/// Read it chunk by chunk with [`Body::chunk`] (or as a [`Stream`]), all at once with
/// [`Body::bytes`], or hand it to [`ResponseBody`] to stream it back.
pub struct Body {
    inner: BodyInner,
}

enum BodyInner {
    /// From the runner, as it arrives; `None` once read to its end.
    Incoming(Option<Incoming>),
    /// Built in memory (tests); `None` once read.
    Bytes(Option<Bytes>),
}

/// Most bytes [`Body::bytes`] sets aside before they arrive, whatever length the body declares;
/// a longer body grows as it comes.
const RESERVE_AT_MOST: usize = 16 << 20;

impl Body {
    /// The length the body declared (its `Content-Length`), 0 when it did not.
    fn declared_length(&self) -> usize {
        match &self.inner {
            BodyInner::Incoming(Some(incoming)) => incoming
                .size_hint()
                .exact()
                .map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX)),
            BodyInner::Incoming(None) | BodyInner::Bytes(_) => 0,
        }
    }

    pub(crate) fn incoming(incoming: Incoming) -> Self {
        Self {
            inner: BodyInner::Incoming(Some(incoming)),
        }
    }

    /// An empty body.
    #[must_use]
    pub fn empty() -> Self {
        Self::from(Bytes::new())
    }

    /// The next chunk, or `None` at the end of the body.
    ///
    /// # Errors
    ///
    /// [`BodyError`] when the body cannot be read; the call is then broken.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        self.next().await
    }

    /// Reads the rest of the body into memory.
    ///
    /// # Errors
    ///
    /// [`BodyError`] when the body cannot be read; the call is then broken.
    pub async fn bytes(mut self) -> Result<Bytes, BodyError> {
        let declared = self.declared_length();
        let Some(first) = self.chunk().await.transpose()? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.chunk().await.transpose()? else {
            return Ok(first);
        };
        // Set aside the declared length at once rather than doubling towards it: a 1 MiB body
        // was half a dozen reallocations, each a copy and fresh pages to fault in.
        let read = first.len() + second.len();
        let mut all = BytesMut::with_capacity(declared.min(RESERVE_AT_MOST).max(read));
        all.extend_from_slice(&first);
        all.extend_from_slice(&second);
        while let Some(chunk) = self.chunk().await.transpose()? {
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }
}

/// A body the function did not read to its end is read to its end in the background and
/// thrown away, so that the runner's connection stays open for the next call. hyper closes a
/// connection whose request body was left unread, without saying so in the answer, and the
/// runner, still writing that body, could see the call fail ("error writing a body to
/// connection") or its next call meet a closed connection. Go's `net/http` server does the
/// same for bodies of up to 256 KiB; here the whole body is read: it comes from the runner,
/// bounded by the LB's `FN_MAX_REQUEST_BODY`, and ends with the call.
impl Drop for Body {
    fn drop(&mut self) {
        let BodyInner::Incoming(incoming) = &mut self.inner else {
            return;
        };
        let Some(mut incoming) = incoming.take() else {
            return;
        };
        if incoming.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while let Some(Ok(_)) =
                    std::future::poll_fn(|cx| Pin::new(&mut incoming).poll_frame(cx)).await
                {
                }
            });
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Self {
            inner: BodyInner::Bytes(Some(bytes)),
        }
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Self {
        Self::from(Bytes::from_static(text.as_bytes()))
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            BodyInner::Incoming(_) => f.write_str("Body(streaming)"),
            BodyInner::Bytes(bytes) => f.debug_tuple("Body").field(bytes).finish(),
        }
    }
}

impl Stream for Body {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            BodyInner::Bytes(bytes) => Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(Ok)),
            BodyInner::Incoming(None) => Poll::Ready(None),
            BodyInner::Incoming(Some(incoming)) => loop {
                match ready!(Pin::new(&mut *incoming).poll_frame(cx)) {
                    None => {
                        self.inner = BodyInner::Incoming(None);
                        return Poll::Ready(None);
                    }
                    Some(Err(err)) => {
                        self.inner = BodyInner::Incoming(None);
                        return Poll::Ready(Some(Err(BodyError(err))));
                    }
                    // Trailers carry nothing the contract uses; empty chunks carry nothing.
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) if !data.is_empty() => return Poll::Ready(Some(Ok(data))),
                        Ok(_) | Err(_) => {}
                    },
                }
            },
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// The body of a function's response.
///
/// Build it from bytes or text (`"hi".into()`, `String`, `Vec<u8>`, [`Bytes`]), from a stream
/// ([`ResponseBody::stream`]), from the request [`Body`] (streams it back), or as a channel
/// ([`ResponseBody::channel`]).
pub struct ResponseBody {
    inner: ResponseInner,
    /// For a body still streaming at the call's deadline: it is stopped then, and broken off
    /// a little later, as the status already sent cannot say the answer is cut short. Set by
    /// the server.
    cutoff: Option<Cutoff>,
}

/// When a streamed body is stopped, and when it is broken off.
struct Cutoff {
    /// Fires at the deadline, then, armed again, when the answer is broken off.
    timer: Pin<Box<Sleep>>,
    /// When the answer is broken off; `None` once the timer is armed for it.
    break_at: Option<Instant>,
}

enum ResponseInner {
    /// Known in full: sent with a `Content-Length`. `None` once sent.
    Full(Option<Bytes>),
    /// Produced over time: sent chunked, each chunk as it comes. An `Err` aborts the response.
    Stream(ChunkStream),
    /// A stream stopped at the call's deadline: nothing more comes, and the body does not end
    /// (which would tell the runner the answer is complete) until it is broken off.
    Stopped,
}

impl ResponseBody {
    /// An empty body.
    #[must_use]
    pub fn empty() -> Self {
        Self::from(Bytes::new())
    }

    /// A body streamed from `chunks`; an `Err` item aborts the response (the runner then sees a
    /// broken reply, not a short one).
    pub fn stream<S, E>(chunks: S) -> Self
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self {
            inner: ResponseInner::Stream(Box::pin(chunks.map(|chunk| chunk.map_err(Into::into)))),
            cutoff: None,
        }
    }

    /// A body the function writes through the returned [`BodySender`] while the response is
    /// already going out. At most `buffer` chunks (at least one) wait to be sent; `send` waits
    /// beyond that. The body ends when the sender is dropped.
    #[must_use]
    pub fn channel(buffer: usize) -> (BodySender, Self) {
        let (tx, mut rx) = mpsc::channel(buffer.max(1));
        let chunks = stream::poll_fn(move |cx| rx.poll_recv(cx));
        (BodySender { tx }, Self::stream(chunks))
    }

    /// Stops a streamed body at `stop_at` if it has not ended by then (its stream is dropped,
    /// so a [`BodySender`] sees [`Closed`]), and breaks it off at `break_at`: its next frame
    /// is then an error, which aborts the answer, so that the runner sees it incomplete
    /// rather than complete and short. A body known in full is complete and is left alone.
    pub(crate) fn until(mut self, stop_at: Instant, break_at: Instant) -> Self {
        if matches!(self.inner, ResponseInner::Stream(_)) {
            self.cutoff = Some(Cutoff {
                timer: Box::pin(tokio::time::sleep_until(stop_at)),
                break_at: Some(break_at),
            });
        }
        self
    }
}

/// What breaks off a response body still streaming at the call's deadline.
#[derive(Debug, thiserror::Error)]
#[error("the call's deadline passed before the answer ended; the answer is broken off")]
pub(crate) struct DeadlinePassed;

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self {
            inner: ResponseInner::Full(Some(bytes)),
            cutoff: None,
        }
    }
}

impl From<&'static str> for ResponseBody {
    fn from(text: &'static str) -> Self {
        Self::from(Bytes::from_static(text.as_bytes()))
    }
}

impl From<String> for ResponseBody {
    fn from(text: String) -> Self {
        Self::from(Bytes::from(text))
    }
}

impl From<Vec<u8>> for ResponseBody {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from(Bytes::from(bytes))
    }
}

impl From<Body> for ResponseBody {
    /// Streams the request body back, chunk by chunk as it arrives.
    fn from(mut body: Body) -> Self {
        match &mut body.inner {
            BodyInner::Bytes(bytes) => Self::from(bytes.take().unwrap_or_default()),
            BodyInner::Incoming(_) => Self::stream(body),
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            ResponseInner::Full(bytes) => f.debug_tuple("ResponseBody").field(bytes).finish(),
            ResponseInner::Stream(_) => f.write_str("ResponseBody(streaming)"),
            ResponseInner::Stopped => f.write_str("ResponseBody(stopped)"),
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(cutoff) = &mut this.cutoff {
            while cutoff.timer.as_mut().poll(cx).is_ready() {
                let Some(break_at) = cutoff.break_at.take() else {
                    return Poll::Ready(Some(Err(Box::new(DeadlinePassed))));
                };
                // The deadline: the stream is dropped, and its writer with it.
                this.inner = ResponseInner::Stopped;
                cutoff.timer.as_mut().reset(break_at);
            }
        }
        match &mut this.inner {
            ResponseInner::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ResponseInner::Stream(chunks) => chunks
                .as_mut()
                .poll_next(cx)
                .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data))),
            // The cutoff's timer wakes the body when it is to be broken off.
            ResponseInner::Stopped => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseInner::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            ResponseInner::Stream(_) | ResponseInner::Stopped => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseInner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseInner::Stream(_) | ResponseInner::Stopped => SizeHint::default(),
        }
    }
}

/// The response body went away before the function finished writing: the runner closed the
/// call (client gone, deadline passed). Stop producing output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the response body is closed: the caller went away")]
pub struct Closed;

/// Writes chunks into a [`ResponseBody::channel`] body.
#[derive(Debug, Clone)]
pub struct BodySender {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
}

impl BodySender {
    /// Sends one chunk, waiting while the channel is full.
    ///
    /// # Errors
    ///
    /// [`Closed`] when the response is no longer being sent.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> Result<(), Closed> {
        self.tx.send(Ok(chunk.into())).await.map_err(|_| Closed)
    }

    /// Aborts the response: the runner sees a broken reply instead of a complete one, so a
    /// failure half-way is not mistaken for a short answer.
    ///
    /// # Errors
    ///
    /// [`Closed`] when the response was no longer being sent anyway.
    pub async fn fail(self, error: impl Into<BoxError>) -> Result<(), Closed> {
        self.tx.send(Err(error.into())).await.map_err(|_| Closed)
    }
}
