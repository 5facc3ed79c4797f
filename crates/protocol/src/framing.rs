//! gRPC's message framing for the Engage stream, without copying body chunks.
//!
//! tonic's codec copies every message once more at each end: prost encodes it, body chunk
//! included, into tonic's buffer, and the receiving side gathers the frames it receives into
//! a buffer of its own before prost decodes them. On bench-compare's 1 MiB row those two
//! copies were about 8% of the lb-agent's CPU (`perf record`, session 17). This module
//! writes and reads the same wire format itself (per message: a compression flag byte, a
//! 4-byte big-endian length, the protobuf encoding), so either end can use it against a peer
//! that uses tonic's codec:
//! - [`EncodeBody`]: an HTTP body of messages. A data message's chunk goes out as an HTTP/2
//!   DATA frame of its own, behind the few bytes of protobuf header that precede it, and is
//!   never copied; other messages are encoded by prost, those that are ready together into
//!   one frame (so that they leave in one write, as [`crate::batch`] intends).
//! - [`Decoded`]: the messages of a received HTTP body, decoded from the DATA frames that
//!   hold them as they came: a chunk that arrived in frames of its own (as [`EncodeBody`]
//!   sends it) or inside one frame is a slice of that frame, not a copy. Only a chunk cut
//!   across frames by the sender's flow control is gathered.
//!
//! Everything received is checked as tonic checks it: compressed or oversize messages, a
//! body that ends inside a message, and a stream that ends without `grpc-status` are errors
//! (a [`tonic::Status`]), and the stream ends after the first. So is a message whose
//! repeated fields hold more entries than a call may have ([`crate::wire`]), counted before
//! prost decodes them.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderName, StatusCode};
use http_body::{Body, Frame};
use tonic::{Code, Status};

use crate::call::{CallSpec, SendTimes};
use crate::opening::Opening;
use crate::runner::{ClientMsg, DataFrame, RunnerMsg, client_msg, runner_msg};
use crate::wire::{CHECKED_FROM, WireLimits};

/// The Engage method's HTTP/2 path (`/<package>.<service>/<method>`), for the client and
/// the server that frame its stream with this module.
pub const ENGAGE_PATH: &str = "/dataplane.runner.v1.RunnerProtocol/Engage";

/// Largest message accepted, as tonic's default receive limit.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Data chunks at least this long leave as a frame of their own; shorter ones are copied
/// into the shared frame, which costs less than one more frame.
const OWN_FRAME_MIN: usize = 4 * 1024;

/// Received frames a [`Decoded`] keeps as they came (slices of the connection's read
/// buffer, no copy) before it copies short ones into a buffer of its own; see
/// [`Decoded::receive`].
const KEPT_FRAMES: usize = 16;

/// A frame of encoded messages is handed on once it holds this much (tonic's yield
/// threshold), so that a long run of ready messages does not grow it without bound.
const FRAME_TARGET: usize = 32 * 1024;

/// The gRPC message header: compression flag and length.
const HEADER_BYTES: usize = 5;

/// The most a data message takes around its chunk: the gRPC header, then the `body`
/// field's key and length, the chunk's key and length (varints of at most five bytes for
/// a length under 4 GiB) and `eof`'s key and value.
const DATA_OVERHEAD: usize = HEADER_BYTES + 1 + 5 + 1 + 5 + 2;

/// When the encoding buffer must grow, it grows by at least this much, so that a small
/// call's messages (its head, a body shorter than [`OWN_FRAME_MIN`], its end) are encoded
/// into one allocation rather than grown into, one reallocation per field.
const ENCODE_RESERVE: usize = 2 * OWN_FRAME_MIN;

/// Protobuf wire types used in the keys written here.
const WIRE_VARINT: u8 = 0;
const WIRE_LEN: u8 = 2;

/// A message type of the Engage stream whose data messages carry a body chunk.
pub trait DataMessage: prost::Message + Sized {
    /// Field number of the `DataFrame` variant in the message's `body` oneof.
    const DATA_FIELD: u8;

    /// The message's chunk and `eof`, when it is a data message; else the message back.
    fn into_data(self) -> Result<(Bytes, bool), Self>;
}

impl DataMessage for ClientMsg {
    const DATA_FIELD: u8 = 2;

    fn into_data(self) -> Result<(Bytes, bool), Self> {
        match self.body {
            Some(client_msg::Body::Data(DataFrame { data, eof })) => Ok((data, eof)),
            body => Err(ClientMsg { body }),
        }
    }
}

impl DataMessage for RunnerMsg {
    const DATA_FIELD: u8 = 3;

    fn into_data(self) -> Result<(Bytes, bool), Self> {
        match self.body {
            Some(runner_msg::Body::Data(DataFrame { data, eof })) => Ok((data, eof)),
            body => Err(RunnerMsg { body }),
        }
    }
}

/// A protobuf key of one byte (field numbers below 16).
fn key(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

/// The gRPC header of a message of `len` bytes.
fn put_header(buf: &mut BytesMut, len: usize) -> Result<(), Status> {
    let len = u32::try_from(len)
        .map_err(|_| Status::internal(format!("message of {len} bytes: too large to frame")))?;
    buf.put_u8(0);
    buf.put_u32(len);
    Ok(())
}

/// Encodes a data message as prost does (`data` when not empty, then `eof` when set), up to
/// its `eof`, which the caller adds ([`put_eof`]). A chunk long enough to go as a frame of
/// its own is left out of `buf` and returned: `buf` then ends just before it.
fn encode_data(
    field: u8,
    data: Bytes,
    eof: bool,
    buf: &mut BytesMut,
) -> Result<Option<Bytes>, Status> {
    let n = data.len();
    let data_part = if n > 0 {
        1 + prost::length_delimiter_len(n) + n
    } else {
        0
    };
    let inner = data_part + if eof { 2 } else { 0 };
    put_header(buf, 1 + prost::length_delimiter_len(inner) + inner)?;
    buf.put_u8(key(field, WIRE_LEN));
    // A varint into a BytesMut, which grows as needed: cannot fail.
    let _ = prost::encode_length_delimiter(inner, buf);
    if n == 0 {
        return Ok(None);
    }
    buf.put_u8(key(1, WIRE_LEN));
    let _ = prost::encode_length_delimiter(n, buf);
    if n >= OWN_FRAME_MIN {
        return Ok(Some(data));
    }
    buf.put_slice(&data);
    Ok(None)
}

/// The end of a data message whose `eof` is set.
fn put_eof(buf: &mut BytesMut) {
    buf.put_u8(key(2, WIRE_VARINT));
    buf.put_u8(1);
}

/// An HTTP body of the messages of `source`, in gRPC's framing (see the module docs). Ends
/// when `source` does.
#[derive(Debug)]
pub struct EncodeBody<S> {
    source: Option<S>,
    /// Frames ready to go, in order.
    ready: VecDeque<Bytes>,
    /// Encoded bytes not yet in a frame.
    buf: BytesMut,
    /// Sent after the last message, when set.
    trailers: Option<HeaderMap>,
}

impl<S> EncodeBody<S> {
    /// A request body (a client's): it ends with the last message.
    pub fn new(source: S) -> Self {
        EncodeBody {
            source: Some(source),
            ready: VecDeque::new(),
            buf: BytesMut::new(),
            trailers: None,
        }
    }

    /// A client's request body that opens with the `TryCall` of `call`, then the messages
    /// of `source`. The `TryCall` is encoded straight from the spec (the module `opening`),
    /// with the budget the call has left now.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the message is larger than a runner accepts
    /// ([`MAX_MESSAGE_BYTES`]): no runner can take the call.
    pub fn opening_with(call: &CallSpec, source: S) -> Result<Self, Status> {
        let mut body = EncodeBody::new(source);
        let opening = Opening::new(call, SendTimes::now(call));
        let len = opening.len();
        if len > MAX_MESSAGE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the call's TryCall message is {len} bytes, over the {MAX_MESSAGE_BYTES} a \
                 runner accepts: shorten the function's config or the request's headers"
            )));
        }
        body.reserve(HEADER_BYTES + len);
        put_header(&mut body.buf, len)?;
        opening.encode(&mut body.buf);
        Ok(body)
    }

    /// A response body (a server's): after the last message, trailers with an OK
    /// `grpc-status`.
    pub fn with_ok_trailers(source: S) -> Self {
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
        EncodeBody {
            trailers: Some(trailers),
            ..EncodeBody::new(source)
        }
    }

    /// Moves the encoded bytes into a frame of their own.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.ready.push_back(self.buf.split().freeze());
        }
    }

    /// Room for `needed` more bytes, in one allocation of at least [`ENCODE_RESERVE`] when
    /// the buffer has to grow.
    fn reserve(&mut self, needed: usize) {
        if self.buf.capacity() - self.buf.len() < needed {
            self.buf.reserve(needed.max(ENCODE_RESERVE));
        }
    }

    fn encode<M: DataMessage>(&mut self, message: M) -> Result<(), Status> {
        match message.into_data() {
            Ok((data, eof)) => {
                let copied = if data.len() < OWN_FRAME_MIN {
                    data.len()
                } else {
                    0
                };
                self.reserve(DATA_OVERHEAD + copied);
                if let Some(chunk) = encode_data(M::DATA_FIELD, data, eof, &mut self.buf)? {
                    self.seal();
                    self.ready.push_back(chunk);
                }
                if eof {
                    put_eof(&mut self.buf);
                }
            }
            Err(message) => {
                let len = message.encoded_len();
                self.reserve(HEADER_BYTES + len);
                put_header(&mut self.buf, len)?;
                message
                    .encode(&mut self.buf)
                    .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))?;
            }
        }
        Ok(())
    }
}

impl<S, M> Body for EncodeBody<S>
where
    S: Stream<Item = M> + Unpin,
    M: DataMessage,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(frame) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        // Everything ready now, up to a frame's worth.
        while let Some(source) = this.source.as_mut() {
            match Pin::new(source).poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    if let Err(status) = this.encode(message) {
                        this.source = None;
                        return Poll::Ready(Some(Err(status)));
                    }
                    if this.buf.len() >= FRAME_TARGET || !this.ready.is_empty() {
                        break;
                    }
                }
                Poll::Ready(None) => this.source = None,
                Poll::Pending => break,
            }
        }
        this.seal();
        match this.ready.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(Frame::data(frame)))),
            None if this.source.is_none() => {
                Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.source.is_none()
            && self.ready.is_empty()
            && self.buf.is_empty()
            && self.trailers.is_none()
    }
}

/// A constant, not a string: a lookup or an insertion by `&str` parses the name first.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// What a gRPC response's head says before its body is read.
///
/// # Errors
/// The call's status when the response is an error: a `grpc-status` other than OK in the
/// head (a trailers-only response) or an HTTP status other than 200.
pub fn check_response_head(status: StatusCode, headers: &HeaderMap) -> Result<Head, Status> {
    if let Some(grpc) = grpc_status(headers) {
        return if grpc.code() == Code::Ok {
            Ok(Head::TrailersOnly)
        } else {
            Err(grpc)
        };
    }
    if status != StatusCode::OK {
        return Err(status_of_http(status));
    }
    Ok(Head::Stream)
}

/// The status of a stream that broke under its messages (reset, or its connection lost):
/// `Cancelled` or `DeadlineExceeded` as they came, anything else `Unavailable`. tonic gives an
/// HTTP/2 reset such as `INTERNAL_ERROR` (or `NO_ERROR`) the code `Internal`, which is also
/// the code of a message that breaks the framing here; a reader tells a peer that went away
/// from one that broke the contract by the code, so a broken stream never takes
/// `Internal`, `OutOfRange` or `ResourceExhausted`.
fn broken_stream(error: Box<dyn std::error::Error + Send + Sync>) -> Status {
    let status = Status::from_error(error);
    match status.code() {
        Code::Cancelled | Code::DeadlineExceeded => status,
        _ => Status::unavailable(format!("the stream broke: {}", status.message())),
    }
}

/// The `grpc-status` (and `grpc-message`) in `headers`, if any, without the
/// `grpc-status-details-bin` the peer may have sent: tonic's
/// [`Status::from_header_map`] panics when that value is not valid base64, and nothing
/// here reads the details. The map is copied only when the header is there.
fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    const DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
    let code = headers.get(GRPC_STATUS)?;
    // Every call that ends well: tonic's parse would copy the whole map for the status's
    // other headers, which nothing here reads.
    if code.as_bytes() == b"0" {
        return Some(Status::new(Code::Ok, ""));
    }
    if !headers.contains_key(DETAILS) {
        return Status::from_header_map(headers);
    }
    let mut without = headers.clone();
    without.remove(DETAILS);
    Status::from_header_map(&without)
}

/// A response head that is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Messages follow, then trailers with the status.
    Stream,
    /// The head held an OK status: nothing follows.
    TrailersOnly,
}

/// The gRPC status of an HTTP status without one of its own (gRPC's mapping, as tonic).
fn status_of_http(status: StatusCode) -> Status {
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status} without a grpc-status"))
}

/// The messages of a gRPC body (see the module docs), then its status: a stream that ends
/// with an OK status ends with `None`; any other end is one `Err` and then `None`.
#[derive(Debug)]
pub struct Decoded<M, B> {
    body: B,
    /// Received bytes not yet decoded, in order; none empty. `tail` follows them.
    chunks: VecDeque<Bytes>,
    /// Short frames received while `chunks` already held [`KEPT_FRAMES`], copied: received
    /// after everything in `chunks`, before any frame pushed later.
    tail: BytesMut,
    /// Bytes in `chunks` and `tail`.
    buffered: usize,
    /// Length of the message being received, once its header is in.
    message_len: Option<usize>,
    done: bool,
    /// A response's body must end with trailers that carry its status; a request's body
    /// ends without them.
    trailers_required: bool,
    max_message: usize,
    _message: PhantomData<fn() -> M>,
}

impl<M, B> Decoded<M, B> {
    /// The messages of a response's `body`, once [`check_response_head`] accepted its head
    /// (for [`Head::TrailersOnly`], use [`Decoded::empty`]). The stream ends OK only with
    /// trailers that say so.
    pub fn response(body: B) -> Self {
        Decoded {
            body,
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            buffered: 0,
            message_len: None,
            done: false,
            trailers_required: true,
            max_message: MAX_MESSAGE_BYTES,
            _message: PhantomData,
        }
    }

    /// The messages of a request's `body` (a server's side of a stream): the client's end
    /// of the body ends the stream OK.
    pub fn request(body: B) -> Self {
        Decoded {
            trailers_required: false,
            ..Decoded::response(body)
        }
    }

    /// A stream with no messages, that ends OK.
    pub fn empty(body: B) -> Self {
        let mut decoded = Decoded::response(body);
        decoded.done = true;
        decoded
    }

    /// Keeps a received frame (not empty) until its message is whole.
    ///
    /// A frame is kept as it came, a slice of the connection's read buffer: the slice holds
    /// that whole buffer, and a peer sending a message as frames of a byte each would make
    /// each byte hold ten or more of it, and an entry here, hundreds of MB for one message
    /// of 4 MiB. So once [`KEPT_FRAMES`] are kept, frames shorter than [`OWN_FRAME_MIN`]
    /// (which an honest sender copies into its own frames anyway) are copied into `tail`,
    /// and what is held stays near the message's own bytes. A long frame (a body chunk in a
    /// frame of its own) is still kept as it came, behind the tail.
    fn receive(&mut self, data: Bytes) {
        self.buffered += data.len();
        if data.len() < OWN_FRAME_MIN && (!self.tail.is_empty() || self.chunks.len() >= KEPT_FRAMES)
        {
            self.tail.extend_from_slice(&data);
            return;
        }
        self.flush_tail();
        self.chunks.push_back(data);
    }

    /// The copied frames join the kept ones, in order.
    fn flush_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks
                .push_back(std::mem::take(&mut self.tail).freeze());
        }
    }

    /// The next `n` buffered bytes (`n <= self.buffered`), as the slices of the received
    /// frames (or of the copied tail) that hold them: nothing is copied here.
    fn take(&mut self, n: usize) -> Received {
        self.buffered -= n;
        let mut received = Received::default();
        while received.remaining() < n {
            let Some(mut front) = self.chunks.pop_front() else {
                if self.tail.is_empty() {
                    break;
                }
                self.flush_tail();
                continue;
            };
            let want = n - received.remaining();
            if front.len() > want {
                received.push(front.split_to(want));
                self.chunks.push_front(front);
            } else {
                received.push(front);
            }
        }
        received
    }

    /// The next whole message's bytes, when they are all buffered.
    fn next_message(&mut self) -> Result<Option<Received>, Status> {
        let len = match self.message_len {
            Some(len) => len,
            None if self.buffered >= HEADER_BYTES => {
                let mut header = [0; HEADER_BYTES];
                self.take(HEADER_BYTES).copy_to_slice(&mut header);
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                match header[0] {
                    0 => {}
                    1 => {
                        return Err(Status::internal(
                            "a compressed message, but no compression was negotiated",
                        ));
                    }
                    flag => {
                        return Err(Status::internal(format!(
                            "invalid compression flag {flag} in a message header"
                        )));
                    }
                }
                if len > self.max_message {
                    return Err(Status::out_of_range(format!(
                        "a message of {len} bytes, over the limit of {} bytes",
                        self.max_message
                    )));
                }
                self.message_len = Some(len);
                len
            }
            None => return Ok(None),
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.message_len = None;
        Ok(Some(self.take(len)))
    }

    /// The stream's status from its trailers (or their absence), once the body has ended.
    fn end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Status> {
        self.done = true;
        if self.buffered > 0 || self.message_len.is_some() {
            return Err(Status::internal(format!(
                "the stream ended inside a message ({} bytes of it received)",
                self.buffered
            )));
        }
        if !self.trailers_required {
            return Ok(());
        }
        match trailers.and_then(grpc_status) {
            Some(status) if status.code() == Code::Ok => Ok(()),
            Some(status) => Err(status),
            None => Err(Status::unknown("the stream ended without a grpc-status")),
        }
    }
}

/// A received message's bytes: the slices of the frames that hold it, in order.
///
/// prost reads a message's keys and lengths across slices, and takes a `bytes` field that
/// lies within one slice as a slice of it ([`Buf::copy_to_bytes`]). The sender puts each
/// long body chunk in a frame of its own ([`EncodeBody`]), so a chunk arrives as one or a
/// few frames of its own and is handed on without being copied, though its message starts
/// in the frame before and ends in the frame after.
///
/// Not `Clone`: what reads a message without taking it (the walk of [`crate::wire`])
/// reads it through a [`Cursor`], which borrows the slices.
#[derive(Debug, Default)]
struct Received {
    /// The slice being read; empty only when everything is read.
    first: Bytes,
    /// The slices after it; none empty.
    rest: VecDeque<Bytes>,
    rest_len: usize,
}

impl Received {
    fn push(&mut self, part: Bytes) {
        if self.first.is_empty() {
            self.first = part;
        } else if !part.is_empty() {
            self.rest_len += part.len();
            self.rest.push_back(part);
        }
    }

    /// After `first` is used up: the next slice becomes `first`.
    fn refill(&mut self) {
        if self.first.is_empty()
            && let Some(next) = self.rest.pop_front()
        {
            self.rest_len -= next.len();
            self.first = next;
        }
    }

    /// A read of the same bytes that leaves these as they are.
    fn cursor(&self) -> Cursor<'_> {
        Cursor {
            chunk: &self.first,
            rest: self.rest.iter(),
            rest_len: self.rest_len,
        }
    }
}

/// A read of a [`Received`] message through borrowed slices, for the walk that counts its
/// repeated fields before prost takes the message ([`crate::wire`]): it allocates and copies
/// nothing, where a clone of the message allocated its list of slices.
#[derive(Debug)]
struct Cursor<'a> {
    /// The slice being read; empty only when everything is read.
    chunk: &'a [u8],
    /// The slices after it; none empty.
    rest: std::collections::vec_deque::Iter<'a, Bytes>,
    rest_len: usize,
}

impl Buf for Cursor<'_> {
    fn remaining(&self) -> usize {
        self.chunk.len() + self.rest_len
    }

    fn chunk(&self) -> &[u8] {
        self.chunk
    }

    /// Past the end, stops at the end, as [`Received`] does.
    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && !self.chunk.is_empty() {
            let step = cnt.min(self.chunk.len());
            self.chunk = &self.chunk[step..];
            cnt -= step;
            if self.chunk.is_empty()
                && let Some(next) = self.rest.next()
            {
                self.rest_len -= next.len();
                self.chunk = next;
            }
        }
    }
}

impl Buf for Received {
    fn remaining(&self) -> usize {
        self.first.len() + self.rest_len
    }

    fn chunk(&self) -> &[u8] {
        &self.first
    }

    /// Past the end, stops at the end (prost checks lengths against [`Buf::remaining`]
    /// before it advances, so this does not happen; received bytes must not panic).
    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && !self.first.is_empty() {
            let step = cnt.min(self.first.len());
            self.first.advance(step);
            cnt -= step;
            self.refill();
        }
    }

    /// Within the current slice, a slice of it; across slices, gathered (at most `len`:
    /// what remains).
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if self.first.len() >= len {
            let taken = self.first.split_to(len);
            self.refill();
            return taken;
        }
        let mut gathered = BytesMut::with_capacity(len.min(self.remaining()));
        while gathered.len() < len && !self.first.is_empty() {
            let step = (len - gathered.len()).min(self.first.len());
            gathered.put_slice(&self.first.split_to(step));
            self.refill();
        }
        gathered.freeze()
    }
}

impl<M, B> Stream for Decoded<M, B>
where
    M: prost::Message + Default + WireLimits,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<M, Status>>> {
        let this = self.get_mut();
        loop {
            if !this.done || this.buffered > 0 {
                match this.next_message() {
                    Ok(Some(bytes)) => {
                        // Counted before prost decodes them: see `crate::wire`.
                        if bytes.remaining() >= CHECKED_FROM
                            && let Err(too_many) = M::check_wire(bytes.cursor())
                        {
                            this.fail();
                            return Poll::Ready(Some(Err(too_many.into())));
                        }
                        return Poll::Ready(Some(M::decode(bytes).map_err(|e| {
                            this.fail();
                            Status::internal(format!("cannot decode a message: {e}"))
                        })));
                    }
                    Ok(None) => {}
                    Err(status) => {
                        this.fail();
                        return Poll::Ready(Some(Err(status)));
                    }
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            let end = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            this.receive(data);
                        }
                        continue;
                    }
                    Err(frame) => this.end(frame.trailers_ref()),
                },
                Some(Err(e)) => {
                    this.fail();
                    Err(broken_stream(e.into()))
                }
                None => this.end(None),
            };
            if let Err(status) = end {
                this.fail();
                return Poll::Ready(Some(Err(status)));
            }
        }
    }
}

impl<M, B> Decoded<M, B> {
    /// After an error: nothing more is read or returned.
    fn fail(&mut self) {
        self.done = true;
        self.chunks.clear();
        self.tail = BytesMut::new();
        self.buffered = 0;
        self.message_len = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::MAX_HEADERS;
    use crate::runner::{Call, TryCall};
    use futures::{FutureExt, StreamExt};
    use http_body_util::{BodyExt, StreamBody};
    use proptest::prelude::*;
    use prost::Message as _;

    fn data(bytes: Vec<u8>, eof: bool) -> ClientMsg {
        ClientMsg {
            body: Some(client_msg::Body::Data(DataFrame {
                data: Bytes::from(bytes),
                eof,
            })),
        }
    }

    fn try_call(id: &str) -> ClientMsg {
        ClientMsg {
            body: Some(client_msg::Body::TryCall(Box::new(TryCall {
                call: Some(Call {
                    id: id.to_owned(),
                    memory_mb: 128,
                    ..Call::default()
                }),
            }))),
        }
    }

    // The stream's one TryCall is boxed (build.rs), so the messages that carry the body,
    // moved through channels and encoders one by one, are not the size of a whole `Call`.
    #[test]
    fn a_client_message_is_about_the_size_of_its_data_frame() {
        let (msg, frame) = (size_of::<ClientMsg>(), size_of::<DataFrame>());
        assert!(msg <= 2 * frame, "ClientMsg {msg} bytes, DataFrame {frame}");
        assert!(
            size_of::<Call>() > 4 * frame,
            "the Call it no longer holds inline"
        );
    }

    /// What tonic's codec sends for `messages`: each prost-encoded behind its header.
    fn tonic_wire<M: prost::Message>(messages: &[M]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            let body = m.encode_to_vec();
            out.push(0);
            out.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    /// The frames an [`EncodeBody`] of `messages` yields.
    async fn frames_of<M: DataMessage + Unpin>(messages: Vec<M>) -> Vec<Bytes> {
        let mut body = EncodeBody::new(futures::stream::iter(messages));
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.expect("encodes").into_data().expect("a data frame"));
        }
        assert!(body.is_end_stream());
        frames
    }

    type TestBody =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Status>>>>;

    /// A received body: `wire` cut at `cuts`, then `trailers` when given.
    fn body_of(wire: &[u8], cuts: &[usize], trailers: Option<HeaderMap>) -> TestBody {
        let mut frames = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts.into_iter().chain([wire.len()]) {
            if cut > at {
                frames.push(Ok(Frame::data(Bytes::copy_from_slice(&wire[at..cut]))));
                at = cut;
            }
        }
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        StreamBody::new(futures::stream::iter(frames))
    }

    fn ok_trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        t
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    async fn decode_all<M: prost::Message + Default + WireLimits>(
        body: TestBody,
    ) -> Vec<Result<M, Status>> {
        Decoded::<M, _>::response(body).collect().await
    }

    /// `received`, a data message, holds `chunk`'s own memory: handed on without a copy.
    fn assert_handed_on(received: &ClientMsg, chunk: &Bytes) {
        let Some(client_msg::Body::Data(frame)) = &received.body else {
            panic!("a data message: {received:?}");
        };
        assert_eq!(
            frame.data.as_ptr(),
            chunk.as_ptr(),
            "the sent chunk's memory"
        );
    }

    #[test]
    fn the_engage_path_is_the_generated_services() {
        assert_eq!(
            ENGAGE_PATH,
            format!(
                "/{}/Engage",
                crate::runner::runner_protocol_server::SERVICE_NAME
            )
        );
    }

    #[test]
    fn a_long_chunk_leaves_as_its_own_frame_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let frames = block_on(frames_of(vec![
            try_call("c1"),
            ClientMsg {
                body: Some(client_msg::Body::Data(DataFrame {
                    data: chunk.clone(),
                    eof: true,
                })),
            },
        ]));
        assert!(
            frames
                .iter()
                .any(|f| f.as_ptr() == chunk.as_ptr() && f.len() == chunk.len()),
            "the chunk is one of the frames, the same memory"
        );
        assert_eq!(frames.len(), 3, "TryCall and headers, the chunk, the eof");
    }

    #[test]
    fn a_chunk_sent_as_its_own_frame_is_received_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let sent = ClientMsg {
            body: Some(client_msg::Body::Data(DataFrame {
                data: chunk.clone(),
                eof: true,
            })),
        };
        let frames = block_on(frames_of(vec![try_call("c1"), sent.clone()]));
        // The message starts in the frame before the chunk and ends in the one after.
        assert_eq!(frames.len(), 3);
        let body = StreamBody::new(futures::stream::iter(
            frames.into_iter().map(|f| Ok::<_, Status>(Frame::data(f))),
        ));
        let got: Vec<Result<ClientMsg, Status>> = block_on(Decoded::request(body).collect());
        assert_eq!(got.len(), 2, "{got:?}");
        let Ok(received) = &got[1] else {
            panic!("the data message: {got:?}");
        };
        assert_eq!(received, &sent);
        assert_handed_on(received, &chunk);
    }

    #[test]
    fn short_messages_ready_together_share_one_frame() {
        let frames = block_on(frames_of(vec![
            try_call("c1"),
            data(b"hello".to_vec(), false),
            data(Vec::new(), true),
        ]));
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn a_small_calls_messages_are_encoded_into_one_allocation() {
        let mut body = EncodeBody::new(futures::stream::empty::<ClientMsg>());
        body.encode(try_call("c1")).expect("encodes");
        let start = body.buf.as_ptr();
        // The longest chunk still copied into the shared frame, then the body's end.
        body.encode(data(vec![5u8; OWN_FRAME_MIN - 1], false))
            .expect("encodes");
        body.encode(data(Vec::new(), true)).expect("encodes");
        assert_eq!(body.buf.as_ptr(), start, "the buffer was not reallocated");
        let expected = tonic_wire(&[
            try_call("c1"),
            data(vec![5u8; OWN_FRAME_MIN - 1], false),
            data(Vec::new(), true),
        ]);
        assert_eq!(&body.buf[..], &expected[..]);
    }

    #[test]
    fn a_message_in_one_frame_is_decoded_as_a_slice_of_it() {
        let msg = RunnerMsg {
            body: Some(runner_msg::Body::Data(DataFrame {
                data: Bytes::from(vec![1u8; 10_000]),
                eof: false,
            })),
        };
        let wire = Bytes::from(tonic_wire(std::slice::from_ref(&msg)));
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        let body = StreamBody::new(futures::stream::iter(vec![
            Ok::<_, Status>(Frame::data(wire.clone())),
            Ok(Frame::trailers(ok_trailers())),
        ]));
        let got: Vec<Result<RunnerMsg, Status>> = block_on(Decoded::response(body).collect());
        assert_eq!(got.len(), 1);
        let Ok(RunnerMsg {
            body: Some(runner_msg::Body::Data(frame)),
        }) = &got[0]
        else {
            panic!("a data message: {got:?}");
        };
        assert_eq!(frame.data.len(), 10_000);
        assert!(
            range.contains(&(frame.data.as_ptr() as usize)),
            "not copied"
        );
    }

    /// A message sent as frames of a byte each (by a peer that means harm: kept as they
    /// came, each would hold a slice of the connection's read buffer and an entry) is held
    /// in a few chunks, the rest copied, and decodes as sent; a long chunk in a frame of its
    /// own that follows on the same stream is still handed on without a copy.
    #[test]
    fn a_message_sent_a_byte_a_frame_is_held_in_few_chunks_and_decodes_as_sent() {
        let sent = data(vec![3u8; 64 * 1024], false);
        let wire = tonic_wire(std::slice::from_ref(&sent));
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, Status>>();
        let mut decoded = Decoded::<ClientMsg, _>::request(StreamBody::new(rx));
        let send = |bytes: Bytes| tx.unbounded_send(Ok(Frame::data(bytes))).expect("open");
        let (last, rest) = wire.split_last().expect("a message");
        for byte in rest {
            send(Bytes::copy_from_slice(std::slice::from_ref(byte)));
        }
        assert!(decoded.next().now_or_never().is_none(), "not whole yet");
        assert!(
            decoded.chunks.len() <= KEPT_FRAMES,
            "{} frames kept for one message",
            decoded.chunks.len()
        );
        assert_eq!(
            decoded.buffered,
            rest.len() - HEADER_BYTES,
            "all but the header held"
        );
        send(Bytes::copy_from_slice(std::slice::from_ref(last)));
        let got = decoded.next().now_or_never().expect("whole");
        assert_eq!(got.expect("a message").expect("decodes"), sent);
        assert!(decoded.chunks.is_empty() && decoded.tail.is_empty());

        let chunk = Bytes::from(vec![7u8; OWN_FRAME_MIN]);
        let honest = ClientMsg {
            body: Some(client_msg::Body::Data(DataFrame {
                data: chunk.clone(),
                eof: true,
            })),
        };
        for frame in block_on(frames_of(vec![honest.clone()])) {
            send(frame);
        }
        drop(tx);
        let got = decoded.next().now_or_never().expect("whole");
        let received = got.expect("a message").expect("decodes");
        assert_eq!(received, honest);
        assert_handed_on(&received, &chunk);
        assert!(
            matches!(decoded.next().now_or_never(), Some(None)),
            "ends OK"
        );
    }

    fn status_of(results: &[Result<ClientMsg, Status>]) -> Option<Code> {
        results
            .iter()
            .find_map(|r| r.as_ref().err().map(Status::code))
    }

    #[test]
    fn a_stream_reset_under_its_messages_is_no_breach_of_the_framing() {
        let wire = tonic_wire(&[try_call("c1")]);
        let frames: Vec<Result<Frame<Bytes>, h2::Error>> = vec![
            Ok(Frame::data(Bytes::from(wire))),
            Err(h2::Error::from(h2::Reason::INTERNAL_ERROR)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let got: Vec<Result<ClientMsg, Status>> =
            block_on(Decoded::<ClientMsg, _>::request(body).collect());
        assert_eq!(got.len(), 2, "the message, then the error: {got:?}");
        assert!(got[0].is_ok());
        let Some(Err(status)) = got.last() else {
            panic!("no error: {got:?}");
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("broke"), "{status:?}");
    }

    /// A message of 2 million empty headers (4 MiB, within the size limit) is refused by
    /// their count before prost decodes them into some 128 MiB, however its frames are cut.
    #[test]
    fn a_message_of_too_many_headers_is_refused_before_it_is_decoded() {
        let msg = crate::wire::empty_headers(2_000_000);
        assert!(msg.len() < MAX_MESSAGE_BYTES);
        let mut wire = vec![0];
        wire.extend_from_slice(&u32::try_from(msg.len()).expect("small").to_be_bytes());
        wire.extend_from_slice(&msg);
        for cuts in [vec![], vec![3, 70_000, 1_000_000]] {
            let got: Vec<Result<ClientMsg, Status>> =
                block_on(Decoded::request(body_of(&wire, &cuts, None)).collect());
            assert_eq!(got.len(), 1, "the error alone: {} items", got.len());
            let Err(status) = &got[0] else {
                panic!("decoded: {cuts:?}");
            };
            assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
            assert!(
                status.message().contains("more than 256 request headers"),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_stream_without_grpc_status_is_an_error() {
        let wire = tonic_wire(&[try_call("c1")]);
        let got = block_on(decode_all::<ClientMsg>(body_of(&wire, &[], None)));
        assert_eq!(got.len(), 2, "the message, then the error: {got:?}");
        assert!(got[0].is_ok());
        assert_eq!(status_of(&got), Some(Code::Unknown));
    }

    #[test]
    fn a_request_body_ends_ok_without_trailers() {
        let messages = vec![try_call("c1"), data(b"body".to_vec(), true)];
        let wire = tonic_wire(&messages);
        let got: Vec<Result<ClientMsg, Status>> =
            block_on(Decoded::request(body_of(&wire, &[7], None)).collect());
        let got: Result<Vec<ClientMsg>, Status> = got.into_iter().collect();
        assert_eq!(got.map_err(|s| s.code()), Ok(messages));
        // Cut short, it is still an error.
        let got: Vec<Result<ClientMsg, Status>> =
            block_on(Decoded::request(body_of(&wire[..wire.len() - 1], &[], None)).collect());
        assert_eq!(status_of(&got), Some(Code::Internal));
    }

    #[test]
    fn an_error_status_in_the_trailers_ends_the_stream_with_it() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("14"));
        t.insert("grpc-message", http::HeaderValue::from_static("draining"));
        let got = block_on(decode_all::<ClientMsg>(body_of(&[], &[], Some(t))));
        assert_eq!(got.len(), 1);
        let err = got[0].as_ref().expect_err("an error");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "draining");
    }

    #[test]
    fn a_body_that_ends_inside_a_message_is_an_error() {
        let wire = tonic_wire(&[data(vec![5; 100], true)]);
        let got = block_on(decode_all::<ClientMsg>(body_of(
            &wire[..50],
            &[20],
            Some(ok_trailers()),
        )));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(status_of(&got), Some(Code::Internal));
    }

    #[test]
    fn compressed_oversize_and_undecodable_messages_are_errors_and_end_the_stream() {
        let mut compressed = tonic_wire(&[try_call("c1")]);
        compressed[0] = 1;
        let mut oversize = vec![0u8];
        oversize.extend_from_slice(
            &u32::try_from(MAX_MESSAGE_BYTES + 1)
                .expect("fits")
                .to_be_bytes(),
        );
        // A length-delimited field whose length runs past the message.
        let garbage = [0u8, 0, 0, 0, 2, 0x0a, 0x7f];
        for (wire, code) in [
            (compressed, Code::Internal),
            (oversize, Code::OutOfRange),
            (garbage.to_vec(), Code::Internal),
        ] {
            let mut wire = wire;
            // A good message after the bad one is never returned.
            wire.extend(tonic_wire(&[try_call("c2")]));
            let got = block_on(decode_all::<ClientMsg>(body_of(
                &wire,
                &[3],
                Some(ok_trailers()),
            )));
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(status_of(&got), Some(code));
        }
    }

    #[test]
    fn response_heads() {
        let mut ok = HeaderMap::new();
        assert_eq!(
            check_response_head(StatusCode::OK, &ok).ok(),
            Some(Head::Stream)
        );
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(
            check_response_head(StatusCode::OK, &ok).ok(),
            Some(Head::TrailersOnly)
        );
        let mut refused = HeaderMap::new();
        refused.insert("grpc-status", http::HeaderValue::from_static("12"));
        assert_eq!(
            check_response_head(StatusCode::OK, &refused).map_err(|s| s.code()),
            Err(Code::Unimplemented)
        );
        assert_eq!(
            check_response_head(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new())
                .map_err(|s| s.code()),
            Err(Code::Unavailable)
        );
        assert_eq!(
            check_response_head(StatusCode::IM_A_TEAPOT, &HeaderMap::new()).map_err(|s| s.code()),
            Err(Code::Unknown)
        );
    }

    #[test]
    fn status_details_that_are_not_base64_do_not_panic_and_the_status_stands() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("13"));
        t.insert("grpc-message", http::HeaderValue::from_static("broken"));
        t.insert(
            "grpc-status-details-bin",
            http::HeaderValue::from_static("!!!"),
        );
        // In a trailers-only head...
        let err = check_response_head(StatusCode::OK, &t).expect_err("an error status");
        assert_eq!((err.code(), err.message()), (Code::Internal, "broken"));
        // ...and in the trailers that end a stream.
        let wire = tonic_wire(&[try_call("c1")]);
        let got = block_on(decode_all::<ClientMsg>(body_of(&wire, &[2], Some(t))));
        assert_eq!(got.len(), 2, "the message, then the status: {got:?}");
        assert!(got[0].is_ok());
        assert_eq!(status_of(&got), Some(Code::Internal));
        // An OK status with such details still ends the stream cleanly.
        let mut ok = ok_trailers();
        ok.insert(
            "grpc-status-details-bin",
            http::HeaderValue::from_static("@@"),
        );
        let got = block_on(decode_all::<ClientMsg>(body_of(&wire, &[], Some(ok))));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].is_ok());
    }

    fn arb_client_msg() -> impl Strategy<Value = ClientMsg> {
        prop_oneof![
            "[a-z0-9]{0,12}".prop_map(|id| try_call(&id)),
            // Lengths around the own-frame threshold and the varint steps.
            (
                prop_oneof![
                    0usize..200,
                    4000usize..4200,
                    16_300usize..16_500,
                    70_000usize..70_100
                ],
                any::<bool>(),
                any::<u8>()
            )
                .prop_map(|(n, eof, b)| data(vec![b; n], eof)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Read as one buffer would be, however the bytes are sliced and read; reading past
        /// the end stops there.
        #[test]
        fn received_slices_read_as_one_buffer(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            steps in proptest::collection::vec((0usize..60, any::<bool>()), 0..12),
        ) {
            let whole: Vec<u8> = parts.concat();
            let mut received = Received::default();
            for part in parts {
                received.push(Bytes::from(part));
            }
            let mut at = 0;
            for (step, copy) in steps {
                prop_assert_eq!(received.remaining(), whole.len() - at);
                prop_assert_eq!(received.chunk().is_empty(), at == whole.len());
                let end = (at + step).min(whole.len());
                if copy {
                    prop_assert_eq!(&received.copy_to_bytes(step)[..], &whole[at..end]);
                } else {
                    received.advance(step);
                }
                at = end;
            }
            prop_assert_eq!(received.remaining(), whole.len() - at);
        }

        /// A cursor reads the slices as one buffer, as `Received` itself does, and leaves
        /// them unread.
        #[test]
        fn a_cursor_reads_the_slices_as_one_buffer_and_leaves_them(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            steps in proptest::collection::vec((0usize..60, any::<bool>()), 0..12),
        ) {
            let whole: Vec<u8> = parts.concat();
            let mut received = Received::default();
            for part in parts {
                received.push(Bytes::from(part));
            }
            let mut cursor = received.cursor();
            let mut at = 0;
            for (step, by_byte) in steps {
                prop_assert_eq!(cursor.remaining(), whole.len() - at);
                prop_assert_eq!(cursor.chunk().is_empty(), at == whole.len());
                let end = (at + step).min(whole.len());
                if by_byte {
                    for &expected in &whole[at..end] {
                        prop_assert_eq!(cursor.get_u8(), expected);
                    }
                } else {
                    cursor.advance(step);
                }
                at = end;
            }
            prop_assert_eq!(cursor.remaining(), whole.len() - at);
            prop_assert_eq!(&received.copy_to_bytes(whole.len())[..], &whole[..]);
        }

        /// The walk over a message received in several frames, read through a cursor, says
        /// what it says over the same bytes in one slice, around the limit and on any bytes.
        #[test]
        fn the_walk_over_slices_gives_the_verdict_of_one_slice(
            whole in prop_oneof![
                (MAX_HEADERS - 3..MAX_HEADERS + 3, 1usize..3, "[a-z]{0,20}").prop_map(
                    |(n, times, name)| {
                        let call = Call {
                            headers: vec![crate::runner::Header {
                                name: Bytes::from(name.into_bytes()),
                                value: Bytes::new(),
                            }; n / times],
                            ..Call::default()
                        };
                        let one = ClientMsg {
                            body: Some(client_msg::Body::TryCall(Box::new(TryCall {
                                call: Some(call),
                            }))),
                        }
                        .encode_to_vec();
                        one.repeat(times)
                    }
                ),
                proptest::collection::vec(any::<u8>(), 0..600),
            ],
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (whole.len() + 1)).collect();
            cuts.sort_unstable();
            let mut received = Received::default();
            let mut at = 0;
            for cut in cuts.into_iter().chain([whole.len()]) {
                received.push(Bytes::copy_from_slice(&whole[at..cut]));
                at = cut;
            }
            prop_assert_eq!(
                ClientMsg::check_wire(received.cursor()),
                ClientMsg::check_wire(&whole[..])
            );
            prop_assert_eq!(
                RunnerMsg::check_wire(received.cursor()),
                RunnerMsg::check_wire(&whole[..])
            );
            prop_assert_eq!(&received.copy_to_bytes(whole.len())[..], &whole[..]);
        }

        /// Byte for byte what tonic's codec sends, so that a peer on tonic reads it; and read
        /// back whole, however the bytes are cut into frames on the way.
        #[test]
        fn the_wire_is_tonics_and_reads_back_however_it_is_cut(
            messages in proptest::collection::vec(arb_client_msg(), 0..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let frames = block_on(frames_of(messages.clone()));
            let sent: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            let wire = tonic_wire(&messages);
            prop_assert_eq!(&sent, &wire);
            let got = block_on(decode_all::<ClientMsg>(body_of(&wire, &cuts, Some(ok_trailers()))));
            let got: Result<Vec<ClientMsg>, Status> = got.into_iter().collect();
            prop_assert_eq!(got.map_err(|s| s.code()), Ok(messages));
        }
    }

    #[test]
    fn a_response_body_ends_with_ok_trailers_and_reads_back_whole() {
        let messages = vec![try_call("c1"), data(vec![3u8; 9000], true)];
        let body = EncodeBody::with_ok_trailers(futures::stream::iter(messages.clone()));
        let got: Vec<Result<ClientMsg, Status>> = block_on(Decoded::response(body).collect());
        let got: Result<Vec<ClientMsg>, Status> = got.into_iter().collect();
        assert_eq!(got.map_err(|s| s.code()), Ok(messages));
        // Without trailers, the same body is a stream that never said how it ended.
        let body = EncodeBody::new(futures::stream::iter(vec![try_call("c1")]));
        let got: Vec<Result<ClientMsg, Status>> = block_on(Decoded::response(body).collect());
        assert_eq!(status_of(&got), Some(Code::Unknown));
    }

    #[test]
    fn runner_messages_encode_as_tonics_too() {
        let messages = vec![
            RunnerMsg {
                body: Some(runner_msg::Body::Data(DataFrame {
                    data: Bytes::from(vec![9u8; 5000]),
                    eof: true,
                })),
            },
            RunnerMsg::default(),
        ];
        let frames = block_on(frames_of(messages.clone()));
        let sent: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(sent, tonic_wire(&messages));
    }
}
