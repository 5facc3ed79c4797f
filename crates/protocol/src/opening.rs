//! The message that opens an Engage stream, `ClientMsg { try_call: TryCall { call } }`,
//! encoded straight from a [`CallSpec`].
//!
//! Building the prost `Call` first copies every string of the spec (the function's names,
//! command and config, the client's headers) only to encode the copies and drop them. This
//! writes the same bytes from the spec's own fields: the lb-agent ran 4.9% fewer
//! instructions per 1 KiB call for it (`bench_instructions.py`, session 25). It follows prost's encoding exactly
//! (fields in number order, proto3's defaults left out, every element of a repeated field
//! written), so that a test can hold it to `proto/runner.proto`: for any call, the bytes here
//! are the bytes prost encodes for `runner::Call::from(&spec)` inside the same messages.
//!
//! Each message is visited twice, by a [`Sink`] that measures and by one that writes, so
//! the lengths written ahead of a message and of its sub-messages are those of what follows.

use bytes::BufMut;

use crate::call::{CallSpec, SendTimes, millis};

/// Field numbers of `proto/runner.proto`.
mod field {
    pub const CLIENT_MSG_TRY_CALL: u32 = 1;
    pub const TRY_CALL_CALL: u32 = 1;

    pub const ID: u32 = 1;
    pub const APP: u32 = 2;
    pub const FUNCTION: u32 = 3;
    pub const ROUTE: u32 = 4;
    pub const METHOD: u32 = 5;
    pub const REQUEST_URL: u32 = 6;
    pub const HEADERS: u32 = 7;
    pub const MEMORY_MB: u32 = 8;
    pub const TIMEOUT_MS: u32 = 9;
    pub const IDLE_TIMEOUT_MS: u32 = 10;
    pub const COMMAND: u32 = 11;
    pub const IMAGE: u32 = 12;
    pub const CONFIG: u32 = 13;
    pub const LB_GROUP: u32 = 14;
    pub const DEADLINE_UNIX_MS: u32 = 15;
    pub const CONCURRENCY: u32 = 16;

    /// `Header.name`, `Header.value`; a map entry's key and value.
    pub const FIRST: u32 = 1;
    pub const SECOND: u32 = 2;
}

const WIRE_VARINT: u32 = 0;
const WIRE_LEN: u32 = 2;

fn varint_len(value: u64) -> usize {
    // 7 bits per byte; zero takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn key(field: u32, wire_type: u32) -> u64 {
    u64::from((field << 3) | wire_type)
}

/// Where a visit's fields go: measured or written.
trait Sink {
    /// The key of a length-delimited field and its length; its `len` bytes follow.
    fn open(&mut self, field: u32, len: usize);
    fn bytes(&mut self, bytes: &[u8]);
    fn varint(&mut self, field: u32, value: u64);
    /// A sub-message of `len` bytes behind its key and length; `visit` visits its fields.
    fn message(&mut self, field: u32, len: usize, visit: impl FnOnce(&mut Self)) {
        self.open(field, len);
        visit(self);
    }
}

/// Counts the bytes a visit would write.
#[derive(Default)]
struct Measure(usize);

impl Sink for Measure {
    fn open(&mut self, field: u32, len: usize) {
        self.0 += varint_len(key(field, WIRE_LEN)) + varint_len(len as u64);
    }
    fn bytes(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn varint(&mut self, field: u32, value: u64) {
        self.0 += varint_len(key(field, WIRE_VARINT)) + varint_len(value);
    }
    fn message(&mut self, field: u32, len: usize, _: impl FnOnce(&mut Self)) {
        // Its length is already known: no second visit.
        self.open(field, len);
        self.0 += len;
    }
}

struct Write<'a, B>(&'a mut B);

impl<B: BufMut> Sink for Write<'_, B> {
    fn open(&mut self, field: u32, len: usize) {
        put_varint(self.0, key(field, WIRE_LEN));
        put_varint(self.0, len as u64);
    }
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.put_slice(bytes);
    }
    fn varint(&mut self, field: u32, value: u64) {
        put_varint(self.0, key(field, WIRE_VARINT));
        put_varint(self.0, value);
    }
}

/// A `bytes` or `string` element of a repeated field: written even when empty.
fn element(s: &mut impl Sink, field: u32, value: &[u8]) {
    s.open(field, value.len());
    s.bytes(value);
}

/// A singular `bytes` or `string` field: left out when empty, proto3's default.
fn text(s: &mut impl Sink, field: u32, value: &[u8]) {
    if !value.is_empty() {
        element(s, field, value);
    }
}

/// A singular integer field: left out when zero, proto3's default.
fn uint(s: &mut impl Sink, field: u32, value: u64) {
    if value != 0 {
        s.varint(field, value);
    }
}

/// A `Header`, or an entry of a `map<string, string>`: two length-delimited fields.
fn pair(s: &mut impl Sink, first: &[u8], second: &[u8]) {
    text(s, field::FIRST, first);
    text(s, field::SECOND, second);
}

/// A sub-message of two length-delimited fields, behind its key and length: measured once,
/// then visited only to be written.
fn pair_message<S: Sink>(s: &mut S, field: u32, first: &[u8], second: &[u8]) {
    let mut len = Measure::default();
    pair(&mut len, first, second);
    s.message(field, len.0, |s| pair(s, first, second));
}

fn call(s: &mut impl Sink, spec: &CallSpec, times: SendTimes) {
    text(s, field::ID, spec.id.as_bytes());
    text(s, field::APP, spec.app.as_bytes());
    text(s, field::FUNCTION, spec.function.as_bytes());
    text(s, field::ROUTE, spec.route.as_bytes());
    text(s, field::METHOD, spec.method.as_str().as_bytes());
    text(s, field::REQUEST_URL, spec.request_url.as_bytes());
    for (name, value) in &spec.headers {
        pair_message(
            s,
            field::HEADERS,
            name.as_str().as_bytes(),
            value.as_bytes(),
        );
    }
    uint(s, field::MEMORY_MB, spec.memory_mb);
    uint(s, field::TIMEOUT_MS, times.timeout_ms);
    uint(s, field::IDLE_TIMEOUT_MS, millis(spec.idle_timeout));
    for arg in &spec.command {
        element(s, field::COMMAND, arg.as_bytes());
    }
    text(
        s,
        field::IMAGE,
        spec.image.as_deref().unwrap_or("").as_bytes(),
    );
    for (k, v) in &spec.config {
        pair_message(s, field::CONFIG, k.as_bytes(), v.as_bytes());
    }
    text(s, field::LB_GROUP, spec.lb_group.as_bytes());
    uint(s, field::DEADLINE_UNIX_MS, times.deadline_unix_ms);
    uint(s, field::CONCURRENCY, u64::from(spec.concurrency));
}

/// The `ClientMsg` that offers `spec` to a runner, sent at `times`.
pub(crate) struct Opening<'a> {
    spec: &'a CallSpec,
    times: SendTimes,
    /// The encoded `Call`'s length.
    call_len: usize,
    /// The encoded `TryCall`'s length.
    try_call_len: usize,
}

impl<'a> Opening<'a> {
    pub(crate) fn new(spec: &'a CallSpec, times: SendTimes) -> Self {
        let mut call_len = Measure::default();
        call(&mut call_len, spec, times);
        let mut try_call_len = Measure::default();
        try_call_len.open(field::TRY_CALL_CALL, call_len.0);
        Opening {
            spec,
            times,
            call_len: call_len.0,
            try_call_len: try_call_len.0 + call_len.0,
        }
    }

    /// The encoded message's length.
    pub(crate) fn len(&self) -> usize {
        let mut head = Measure::default();
        head.open(field::CLIENT_MSG_TRY_CALL, self.try_call_len);
        head.0 + self.try_call_len
    }

    /// Writes the message: [`Self::len`] bytes.
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        let mut out = Write(buf);
        out.open(field::CLIENT_MSG_TRY_CALL, self.try_call_len);
        out.open(field::TRY_CALL_CALL, self.call_len);
        call(&mut out, self.spec, self.times);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runner::{ClientMsg, TryCall, client_msg};
    use prost::Message;

    #[test]
    fn varints_are_as_long_as_protobuf_writes_them() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "{value}");
            assert_eq!(
                buf.len(),
                prost::length_delimiter_len(value as usize),
                "{value}"
            );
            let mut expected = Vec::new();
            prost::encode_length_delimiter(value as usize, &mut expected).expect("room");
            assert_eq!(buf, expected, "{value}");
        }
    }

    /// What prost encodes for the same call sent at `times`.
    pub(crate) fn prost_opening(spec: &CallSpec, times: SendTimes) -> Vec<u8> {
        ClientMsg {
            body: Some(client_msg::Body::TryCall(Box::new(TryCall {
                call: Some(crate::call::wire_call(spec, times)),
            }))),
        }
        .encode_to_vec()
    }

    pub(crate) fn opening(spec: &CallSpec, times: SendTimes) -> Vec<u8> {
        let opening = Opening::new(spec, times);
        let mut buf = Vec::new();
        opening.encode(&mut buf);
        assert_eq!(buf.len(), opening.len());
        buf
    }

    fn spec() -> CallSpec {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().expect("valid"));
        headers.append("x-many", "a".parse().expect("valid"));
        headers.append("x-many", "".parse().expect("valid"));
        CallSpec {
            id: "0192-call".into(),
            app: "demo".into(),
            function: "echo".into(),
            route: "/echo".into(),
            method: http::Method::PUT,
            request_url: "http://lb/r/demo/echo?x=1".into(),
            headers,
            memory_mb: 128,
            concurrency: 16,
            timeout: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_millis(1_500),
            command: vec!["fn-echo".into(), String::new(), "--flag".into()],
            image: Some("registry/echo:1".into()),
            config: [
                ("GREETING".to_string(), "hi".to_string()),
                ("EMPTY".to_string(), String::new()),
            ]
            .into(),
            lb_group: "default".into(),
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(30),
        }
    }

    // Every field set, the field number above 15 included (a two-byte key), and the empty
    // values proto3 leaves out of a message but keeps in a list.
    #[test]
    fn a_call_with_every_field_encodes_as_prost_encodes_it() {
        let times = SendTimes {
            timeout_ms: 29_999,
            deadline_unix_ms: 1_764_086_531_123,
        };
        let spec = spec();
        assert_eq!(opening(&spec, times), prost_opening(&spec, times));
        let decoded = ClientMsg::decode(opening(&spec, times).as_slice()).expect("decodes");
        let Some(client_msg::Body::TryCall(try_call)) = decoded.body else {
            panic!("not a TryCall: {decoded:?}");
        };
        let call = try_call.call.expect("a call");
        assert_eq!(call, crate::call::wire_call(&spec, times));
        assert_eq!(call.concurrency, 16);
        assert_eq!(call.command, ["fn-echo", "", "--flag"]);
        assert_eq!(call.headers.len(), 3);
    }

    // A call with nothing but its defaults still opens with both messages' keys.
    #[test]
    fn a_call_of_defaults_encodes_as_prost_encodes_it() {
        let mut spec = spec();
        spec.id.clear();
        spec.app.clear();
        spec.function.clear();
        spec.route.clear();
        spec.request_url.clear();
        spec.headers.clear();
        spec.memory_mb = 0;
        spec.concurrency = 0;
        spec.idle_timeout = std::time::Duration::ZERO;
        spec.command.clear();
        spec.image = None;
        spec.config.clear();
        spec.lb_group.clear();
        spec.method = http::Method::GET;
        let times = SendTimes {
            timeout_ms: 0,
            deadline_unix_ms: 0,
        };
        assert_eq!(opening(&spec, times), prost_opening(&spec, times));
    }
}
