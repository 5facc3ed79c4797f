//! Counts of a message's repeated fields, read from its wire bytes before prost decodes it.
//!
//! prost decodes a repeated field whole before anything can count it, and an entry that is
//! two bytes on the wire (a key and a zero length) becomes a struct of its own: a `Header`
//! of two `Bytes` is 64 bytes, a `String` of `command` 24, and their `Vec` doubles as it
//! grows. A 4 MiB message ([`crate::framing::MAX_MESSAGE_BYTES`]) of empty headers decoded
//! into some 2 million of them, 128–192 MiB held at once before the call's own check
//! ([`crate::call::MAX_HEADERS`]) refused it. [`WireLimits::check_wire`] counts those
//! fields first, over the bytes as received, and refuses a message over a limit before any
//! of it is decoded; [`crate::framing::Decoded`] calls it for every message long enough to
//! matter ([`CHECKED_FROM`]), and so does the codec of the generated clients and servers
//! ([`crate::codec`]) for the messages of the other calls: a runner's reports, an npm's
//! runner lists and membership messages, an LB's adverts.
//!
//! The walk follows prost's rules where they decide a count: every occurrence of a
//! submessage field counts toward the same total (prost merges them into one), except
//! that a member of a oneof followed by another member of it is replaced (prost keeps the
//! last member's value: a `TryCall`, then a data frame, then a `TryCall` decode as the
//! second `TryCall` alone), so what was counted under it goes; and groups are skipped as
//! prost skips them. The one count above prost's is a map's: an entry whose key came
//! before replaces the earlier one in prost's map, and counts again here (an honest peer
//! encodes a map, with each key once). Bytes it cannot read (a truncated length, a field
//! number 0, a reserved wire type) end the walk of the message they are in, without an
//! error (the walk of an enclosing message goes on past it): prost refuses the same bytes
//! with its own message.

use bytes::Buf;

use crate::call::{MAX_COMMAND_ARGS, MAX_CONFIG_ENTRIES, MAX_HEADERS};
use crate::poolmanager::{CapacitySnapshotList, LbGroupId, LbGroupMembership, MembershipChanged};
use crate::runner::{ClientMsg, RunnerMsg, RunnerState, RunnerStatus};

/// Messages shorter than this are decoded unchecked: their repeated fields cannot take
/// more than some 512 KiB once decoded, and the call's own checks refuse them after.
pub const CHECKED_FROM: usize = 16 * 1024;

/// Limits on the repeated fields of a message type, checked on its wire bytes.
pub trait WireLimits {
    /// Refuses a message whose repeated fields hold more entries than their limits.
    ///
    /// # Errors
    /// Which field, and its limit.
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany>;
}

/// Most entries of a runner's report's `warm` list (`RunnerState`, 56 bytes each decoded,
/// at most 14 MiB): four times the 65,536 an LB keeps (it ignores the rest, as before for
/// any list up to this).
pub const MAX_WARM_ENTRIES: usize = 4 * 65_536;

/// Most runners in an npm's list of a group (`LBGroupMembership`, 48 bytes each decoded,
/// 768 KiB): sixteen times the 1,024 an LB keeps (it warns and keeps the first ones, as
/// before for any list up to this).
pub const MAX_LISTED_RUNNERS: usize = 16 * 1024;

/// Most groups in an LB's advert (`CapacitySnapshotList`, 32 bytes each decoded, 512 KiB):
/// sixteen times the [`crate::poolmanager::MAX_GROUPS_PER_ADVERT`] an npm accepts (it
/// refuses a longer advert itself, as before for any advert up to this).
pub const MAX_ADVERTISED_GROUPS: usize = 16 * crate::poolmanager::MAX_GROUPS_PER_ADVERT;

/// Most groups named in a membership message (`MembershipChanged`, 24 bytes each decoded,
/// 96 KiB): sixteen times the [`crate::poolmanager::MAX_GROUPS_NAMED`] an npm names.
pub const MAX_CHANGED_GROUPS: usize = 16 * crate::poolmanager::MAX_GROUPS_NAMED;

/// A repeated field over its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more than {max} {field} in one message")]
pub struct TooMany {
    pub field: &'static str,
    pub max: usize,
}

/// A repeated field to count: its number in the message at the end of a path.
#[derive(Debug, Clone, Copy)]
struct Counted {
    number: u32,
    field: &'static str,
    max: usize,
}

/// One step of a path to the counted fields: a submessage field.
struct Step {
    number: u32,
    /// The members of the oneof the field is a member of (itself among them); empty when
    /// it is in none. Another member replaces it in prost's decoding.
    oneof: &'static [u32],
}

/// `ClientMsg.try_call` (1, in the oneof `body` with `data`, 2) → `TryCall.call` (1).
const CALL_PATH: [Step; 2] = [
    Step {
        number: 1,
        oneof: &[1, 2],
    },
    Step {
        number: 1,
        oneof: &[],
    },
];

/// `Call`'s headers (7), command (11) and config (13).
const CALL_FIELDS: [Counted; 3] = [
    Counted {
        number: 7,
        field: "request headers",
        max: MAX_HEADERS,
    },
    Counted {
        number: 11,
        field: "command arguments",
        max: MAX_COMMAND_ARGS,
    },
    Counted {
        number: 13,
        field: "config entries",
        max: MAX_CONFIG_ENTRIES,
    },
];

/// `RunnerMsg.result_start` (2, in the oneof `body` with `acknowledged`, `data` and
/// `finished`: 1, 3, 4) → `CallResultStart.http` (1).
const META_PATH: [Step; 2] = [
    Step {
        number: 2,
        oneof: &[1, 2, 3, 4],
    },
    Step {
        number: 1,
        oneof: &[],
    },
];

/// `HttpRespMeta`'s headers (2).
const META_FIELDS: [Counted; 1] = [Counted {
    number: 2,
    field: "response headers",
    max: MAX_HEADERS,
}];

impl WireLimits for ClientMsg {
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        count(bytes, &CALL_PATH, &CALL_FIELDS).map(drop)
    }
}

impl WireLimits for RunnerMsg {
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        count(bytes, &META_PATH, &META_FIELDS).map(drop)
    }
}

impl WireLimits for RunnerState {
    /// `warm` (6).
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        const WARM: [Counted; 1] = [Counted {
            number: 6,
            field: "warm functions",
            max: MAX_WARM_ENTRIES,
        }];
        count(bytes, &[], &WARM).map(drop)
    }
}

impl WireLimits for LbGroupMembership {
    /// `runners` (2).
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        const RUNNERS: [Counted; 1] = [Counted {
            number: 2,
            field: "runners",
            max: MAX_LISTED_RUNNERS,
        }];
        count(bytes, &[], &RUNNERS).map(drop)
    }
}

impl WireLimits for CapacitySnapshotList {
    /// `snapshots` (3).
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        const SNAPSHOTS: [Counted; 1] = [Counted {
            number: 3,
            field: "capacity snapshots",
            max: MAX_ADVERTISED_GROUPS,
        }];
        count(bytes, &[], &SNAPSHOTS).map(drop)
    }
}

impl WireLimits for MembershipChanged {
    /// `groups` (2).
    fn check_wire(bytes: impl Buf) -> Result<(), TooMany> {
        const GROUPS: [Counted; 1] = [Counted {
            number: 2,
            field: "changed groups",
            max: MAX_CHANGED_GROUPS,
        }];
        count(bytes, &[], &GROUPS).map(drop)
    }
}

/// Messages with no repeated field: nothing to count.
macro_rules! nothing_repeated {
    ($($message:ty),*) => {
        $(impl WireLimits for $message {
            fn check_wire(_: impl Buf) -> Result<(), TooMany> {
                Ok(())
            }
        })*
    };
}

// `()` is `google.protobuf.Empty`.
nothing_repeated!((), RunnerStatus, LbGroupId);

impl From<TooMany> for tonic::Status {
    /// `OUT_OF_RANGE`, as a message over the size limit.
    fn from(too_many: TooMany) -> Self {
        tonic::Status::out_of_range(format!("a message refused before decoding: {too_many}"))
    }
}

/// Most fields counted in one message type.
const MAX_COUNTED: usize = 4;

/// Counts `counted` in the submessage at `path` within `bytes`, as prost decodes it: the
/// counts of what prost holds at the end (in `counted`'s order), or the first field over
/// its limit at any point of the decoding.
fn count(
    mut bytes: impl Buf,
    path: &[Step],
    counted: &[Counted],
) -> Result<[usize; MAX_COUNTED], TooMany> {
    let mut counts = [0usize; MAX_COUNTED];
    debug_assert!(counted.len() <= counts.len());
    // Stopped early or not: what was not read is for prost to refuse.
    let _read = walk(&mut bytes, 0, path, counted, &mut counts)?;
    Ok(counts)
}

/// The walk stopped at bytes it cannot read (prost refuses them).
struct Unreadable;

/// Walks the fields of one message: `buf`'s bytes until `end` of them remain. The
/// submessages at `path` are walked in place (their end is another `end`), so that every
/// level reads the same `buf`. `Ok(Err(Unreadable))` when it stopped early.
fn walk<B: Buf>(
    buf: &mut B,
    end: usize,
    path: &[Step],
    counted: &[Counted],
    counts: &mut [usize],
) -> Result<Result<(), Unreadable>, TooMany> {
    while buf.remaining() > end {
        let Some((number, wire_type)) = key(buf, end) else {
            return Ok(Err(Unreadable));
        };
        if let Some(step) = path.first()
            && number != step.number
            && step.oneof.contains(&number)
        {
            // Another member of the oneof: prost decodes it and replaces the one counted
            // so far with it (or refuses the message, if it cannot), so everything counted
            // goes: it was all under that member.
            counts.fill(0);
        }
        let read = match wire_type {
            0 => varint(buf, end).map(drop).ok_or(Unreadable),
            1 => skip(buf, end, 8),
            5 => skip(buf, end, 4),
            3 => skip_group(buf, end, number, 0),
            2 => {
                let Some(len) = length(buf, end) else {
                    return Ok(Err(Unreadable));
                };
                match path.split_first() {
                    Some((next, deeper)) if number == next.number => {
                        let inner_end = buf.remaining() - len;
                        match walk(buf, inner_end, deeper, counted, counts)? {
                            // What the inner walk left unread, for the walk to go on.
                            Ok(()) => Ok(()),
                            Err(Unreadable) => skip(buf, end, buf.remaining() - inner_end),
                        }
                    }
                    Some(_) => skip(buf, end, len),
                    None => {
                        for (c, count) in counted.iter().zip(counts.iter_mut()) {
                            if c.number == number {
                                *count += 1;
                                if *count > c.max {
                                    return Err(TooMany {
                                        field: c.field,
                                        max: c.max,
                                    });
                                }
                            }
                        }
                        skip(buf, end, len)
                    }
                }
            }
            // An end of group with no start, or a reserved wire type.
            _ => Err(Unreadable),
        };
        if let Err(unreadable) = read {
            return Ok(Err(unreadable));
        }
    }
    Ok(Ok(()))
}

/// Deepest nesting of groups skipped (prost's own recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

/// Skips a group's fields up to its end (the end group of the same number).
fn skip_group(buf: &mut impl Buf, end: usize, number: u32, depth: u32) -> Result<(), Unreadable> {
    if depth >= MAX_GROUP_DEPTH {
        return Err(Unreadable);
    }
    loop {
        let (inner, wire_type) = key(buf, end).ok_or(Unreadable)?;
        match wire_type {
            0 => varint(buf, end).map(drop).ok_or(Unreadable)?,
            1 => skip(buf, end, 8)?,
            5 => skip(buf, end, 4)?,
            2 => {
                let len = length(buf, end).ok_or(Unreadable)?;
                skip(buf, end, len)?;
            }
            3 => skip_group(buf, end, inner, depth + 1)?,
            4 if inner == number => return Ok(()),
            _ => return Err(Unreadable),
        }
    }
}

/// A field's number and wire type; `None` for a number 0 or past `u32`.
fn key(buf: &mut impl Buf, end: usize) -> Option<(u32, u8)> {
    let key = varint(buf, end)?;
    let number = u32::try_from(key >> 3).ok().filter(|&n| n > 0)?;
    // Three bits: the cast keeps them all.
    #[allow(clippy::cast_possible_truncation)]
    let wire_type = (key & 7) as u8;
    Some((number, wire_type))
}

/// A length-delimited field's length, when that many bytes follow before `end`.
fn length(buf: &mut impl Buf, end: usize) -> Option<usize> {
    let len = usize::try_from(varint(buf, end)?).ok()?;
    (len <= buf.remaining() - end).then_some(len)
}

/// Skips `len` bytes, when that many come before `end`.
fn skip(buf: &mut impl Buf, end: usize, len: usize) -> Result<(), Unreadable> {
    if len > buf.remaining().saturating_sub(end) {
        return Err(Unreadable);
    }
    buf.advance(len);
    Ok(())
}

/// A base-128 varint of at most 10 bytes, all before `end`.
fn varint(buf: &mut impl Buf, end: usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        if buf.remaining() <= end {
            return None;
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// A `ClientMsg` opening a call of `n` empty headers, 2 bytes each on the wire (as no
/// honest LB sends them: prost would decode them all).
#[cfg(test)]
pub(crate) fn empty_headers(n: usize) -> Vec<u8> {
    // ClientMsg.try_call → TryCall.call → Call with headers (field 7) each `3a 00`.
    let call: Vec<u8> = std::iter::repeat_n([0x3a, 0x00], n).flatten().collect();
    let mut try_call = vec![0x0a];
    prost::encoding::encode_varint(call.len() as u64, &mut try_call);
    try_call.extend_from_slice(&call);
    let mut msg = vec![0x0a];
    prost::encoding::encode_varint(try_call.len() as u64, &mut msg);
    msg.extend_from_slice(&try_call);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{
        Call, CallFinished, CallResultStart, DataFrame, Header, HttpRespMeta, TryCall, client_msg,
        runner_msg,
    };
    use prost::Message;

    fn opening(call: Call) -> Vec<u8> {
        ClientMsg {
            body: Some(client_msg::Body::TryCall(Box::new(TryCall {
                call: Some(call),
            }))),
        }
        .encode_to_vec()
    }

    fn headers(n: usize) -> Vec<Header> {
        (0..n)
            .map(|i| Header {
                name: format!("x-h{i}").into_bytes().into(),
                value: bytes::Bytes::from_static(b"v"),
            })
            .collect()
    }

    /// The walk's counts of a call's headers, command words and config entries, with no
    /// limit.
    fn call_counts(bytes: &[u8]) -> [usize; 3] {
        let unlimited = CALL_FIELDS.map(|c| Counted {
            max: usize::MAX,
            ..c
        });
        let counts = count(bytes, &CALL_PATH, &unlimited).expect("no limit");
        [counts[0], counts[1], counts[2]]
    }

    /// The same counts of what prost decoded.
    fn held_by(msg: &ClientMsg) -> [usize; 3] {
        match &msg.body {
            Some(client_msg::Body::TryCall(try_call)) => {
                try_call.call.as_ref().map_or([0; 3], |call| {
                    [call.headers.len(), call.command.len(), call.config.len()]
                })
            }
            _ => [0; 3],
        }
    }

    /// The walk's count of an answer's headers, with no limit.
    fn meta_count(bytes: &[u8]) -> usize {
        let unlimited = META_FIELDS.map(|c| Counted {
            max: usize::MAX,
            ..c
        });
        count(bytes, &META_PATH, &unlimited).expect("no limit")[0]
    }

    /// One message of the opening of a stream: a `TryCall` with some entries, or a data
    /// frame.
    #[derive(Debug, Clone)]
    enum Part {
        Call {
            headers: usize,
            command: usize,
            config: usize,
        },
        Data,
    }

    impl Part {
        /// The message, the `i`th of its stream (its config keys are its own).
        fn encode(&self, i: usize, id: &str) -> Vec<u8> {
            match *self {
                Part::Call {
                    headers: h,
                    command,
                    config,
                } => opening(Call {
                    id: id.to_owned(),
                    headers: headers(h),
                    command: vec!["a".into(); command],
                    config: (0..config)
                        .map(|j| (format!("K{i}_{j}"), "v".into()))
                        .collect(),
                    ..Call::default()
                }),
                Part::Data => data_frame(),
            }
        }
    }

    fn arb_part() -> impl proptest::strategy::Strategy<Value = Part> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (
                0..MAX_HEADERS + 8,
                0..MAX_COMMAND_ARGS + 8,
                0..MAX_CONFIG_ENTRIES + 8,
                // A call whole in one message, or a part of it.
                1usize..4,
            )
                .prop_map(|(h, c, k, d)| Part::Call {
                    headers: h / d,
                    command: c / d,
                    config: k / d,
                }),
            1 => Just(Part::Data),
        ]
    }

    fn data_frame() -> Vec<u8> {
        ClientMsg {
            body: Some(client_msg::Body::Data(DataFrame {
                data: bytes::Bytes::from_static(b"body"),
                eof: false,
            })),
        }
        .encode_to_vec()
    }

    /// prost keeps the last member of a oneof: a `TryCall` followed by a data frame is
    /// gone, and the next `TryCall` starts afresh. Its entries are counted afresh too.
    #[test]
    fn a_call_replaced_by_a_data_frame_is_counted_afresh() {
        let part = opening(Call {
            headers: headers(MAX_HEADERS - 10),
            ..Call::default()
        });
        let bytes = [part.clone(), data_frame(), part.clone()].concat();
        let decoded = ClientMsg::decode(&bytes[..]).expect("decodes");
        assert_eq!(
            held_by(&decoded),
            [MAX_HEADERS - 10, 0, 0],
            "the last alone"
        );
        assert_eq!(call_counts(&bytes), held_by(&decoded));
        assert_eq!(ClientMsg::check_wire(&bytes[..]), Ok(()));
        // Without the data frame between them, prost merges the two.
        let twice = [part.clone(), part].concat();
        let decoded = ClientMsg::decode(&twice[..]).expect("decodes");
        assert_eq!(call_counts(&twice), held_by(&decoded));
        assert!(ClientMsg::check_wire(&twice[..]).is_err());
    }

    /// The same for an answer: a `CallResultStart`, then another member of the oneof,
    /// then a `CallResultStart` hold the last one's headers alone.
    #[test]
    fn an_answer_replaced_by_another_message_is_counted_afresh() {
        let start = RunnerMsg {
            body: Some(runner_msg::Body::ResultStart(CallResultStart {
                http: Some(HttpRespMeta {
                    status_code: 200,
                    headers: headers(MAX_HEADERS - 10),
                }),
                cold_start_us: 0,
            })),
        }
        .encode_to_vec();
        let finished = RunnerMsg {
            body: Some(runner_msg::Body::Finished(CallFinished::default())),
        }
        .encode_to_vec();
        let held = |bytes: &[u8]| match RunnerMsg::decode(bytes).expect("decodes").body {
            Some(runner_msg::Body::ResultStart(start)) => {
                start.http.map_or(0, |http| http.headers.len())
            }
            _ => 0,
        };
        let replaced = [start.clone(), finished, start.clone()].concat();
        assert_eq!(held(&replaced), MAX_HEADERS - 10);
        assert_eq!(meta_count(&replaced), held(&replaced));
        assert_eq!(RunnerMsg::check_wire(&replaced[..]), Ok(()));
        let merged = [start.clone(), start].concat();
        assert_eq!(held(&merged), 2 * (MAX_HEADERS - 10));
        assert_eq!(meta_count(&merged), held(&merged));
        assert!(RunnerMsg::check_wire(&merged[..]).is_err());
    }

    /// The oneofs the paths list are prost's: after the counted member, a field that
    /// replaces it in prost's decoding resets the walk's counts, and no other field does
    /// (each field number tried as an empty submessage, valid for any message member).
    #[test]
    fn the_paths_list_the_oneof_members_prost_replaces() {
        let call = opening(Call {
            headers: headers(3),
            ..Call::default()
        });
        let start = RunnerMsg {
            body: Some(runner_msg::Body::ResultStart(CallResultStart {
                http: Some(HttpRespMeta {
                    status_code: 200,
                    headers: headers(3),
                }),
                cold_start_us: 0,
            })),
        }
        .encode_to_vec();
        for n in 1..64 {
            let mut bytes = call.clone();
            prost::encoding::encode_key(n, prost::encoding::WireType::LengthDelimited, &mut bytes);
            bytes.push(0);
            let decoded = ClientMsg::decode(&bytes[..]).expect("decodes");
            assert_eq!(
                call_counts(&bytes),
                held_by(&decoded),
                "ClientMsg field {n}"
            );

            let mut bytes = start.clone();
            prost::encoding::encode_key(n, prost::encoding::WireType::LengthDelimited, &mut bytes);
            bytes.push(0);
            let held = match RunnerMsg::decode(&bytes[..]).expect("decodes").body {
                Some(runner_msg::Body::ResultStart(start)) => {
                    start.http.map_or(0, |http| http.headers.len())
                }
                _ => 0,
            };
            assert_eq!(meta_count(&bytes), held, "RunnerMsg field {n}");
        }
    }

    #[test]
    fn a_call_within_the_limits_passes_and_one_over_them_is_refused() {
        let at_limit = Call {
            headers: headers(MAX_HEADERS),
            command: vec!["a".into(); MAX_COMMAND_ARGS],
            config: (0..MAX_CONFIG_ENTRIES)
                .map(|i| (format!("K{i}"), "v".into()))
                .collect(),
            ..Call::default()
        };
        assert_eq!(
            ClientMsg::check_wire(&opening(at_limit.clone())[..]),
            Ok(())
        );

        let mut over = at_limit.clone();
        over.headers = headers(MAX_HEADERS + 1);
        let err = ClientMsg::check_wire(&opening(over)[..]).expect_err("headers");
        assert_eq!(err.field, "request headers");
        let mut over = at_limit.clone();
        over.command.push("b".into());
        let err = ClientMsg::check_wire(&opening(over)[..]).expect_err("command");
        assert_eq!(err.field, "command arguments");
        let mut over = at_limit;
        over.config.insert("extra".into(), String::new());
        let err = ClientMsg::check_wire(&opening(over)[..]).expect_err("config");
        assert_eq!(err.field, "config entries");
    }

    /// Empty entries, the cheapest on the wire and the dearest decoded, are counted.
    #[test]
    fn two_million_empty_headers_are_refused_before_decoding() {
        let msg = empty_headers(2_000_000);
        let err = ClientMsg::check_wire(&msg[..]).expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!("more than {MAX_HEADERS} request headers in one message")
        );
    }

    /// prost merges every occurrence of a submessage field into one, so their entries add up.
    #[test]
    fn entries_spread_over_repeated_submessages_add_up() {
        let half = opening(Call {
            headers: headers(MAX_HEADERS / 2 + 1),
            ..Call::default()
        });
        let twice = [half.clone(), half].concat();
        let decoded = ClientMsg::decode(&twice[..]).expect("prost merges them");
        let Some(client_msg::Body::TryCall(try_call)) = decoded.body else {
            panic!("not a TryCall");
        };
        let call = try_call.call.expect("a call");
        assert_eq!(call.headers.len(), MAX_HEADERS + 2, "merged by prost");
        assert!(ClientMsg::check_wire(&twice[..]).is_err());
    }

    /// A group (which prost skips) before the call does not hide the call's fields.
    #[test]
    fn a_group_before_the_call_is_skipped_not_a_stop() {
        let over = opening(Call {
            headers: headers(MAX_HEADERS + 1),
            ..Call::default()
        });
        // Field 9 as a group holding a varint field and a nested group, then its end.
        let mut msg = vec![0x4b, 0x08, 0x01, 0x53, 0x54, 0x4c];
        msg.extend_from_slice(&over);
        let decoded = ClientMsg::decode(&msg[..]).expect("prost skips the group");
        assert!(decoded.body.is_some());
        assert!(ClientMsg::check_wire(&msg[..]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The walk counts what prost holds once it has decoded the messages, and refuses
        /// exactly those whose decoding holds more entries than a limit at some point: the
        /// call's entries spread over `TryCall`s (which prost merges), data frames between
        /// them (after which prost holds the data frame alone).
        #[test]
        fn counts_what_prost_holds_and_refuses_exactly_what_is_over_a_limit(
            parts in proptest::collection::vec(arb_part(), 1..5),
            id in "[a-z0-9]{0,40}",
        ) {
            let mut bytes = Vec::new();
            let mut over = false;
            let mut held = [0; 3];
            for (i, part) in parts.into_iter().enumerate() {
                bytes.extend(part.encode(i, &id));
                // Within a message, prost's counts only grow: their most is at its end.
                held = held_by(&ClientMsg::decode(&bytes[..]).expect("decodes"));
                over |= held[0] > MAX_HEADERS
                    || held[1] > MAX_COMMAND_ARGS
                    || held[2] > MAX_CONFIG_ENTRIES;
            }
            proptest::prop_assert_eq!(call_counts(&bytes), held);
            proptest::prop_assert_eq!(ClientMsg::check_wire(&bytes[..]).is_err(), over);
        }

        /// Any bytes at all: the walk ends, without a panic.
        #[test]
        fn any_bytes_are_walked_without_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = ClientMsg::check_wire(&bytes[..]);
            let _ = RunnerMsg::check_wire(&bytes[..]);
        }
    }

    #[test]
    fn a_response_with_too_many_headers_is_refused() {
        let start = |n| {
            RunnerMsg {
                body: Some(runner_msg::Body::ResultStart(CallResultStart {
                    http: Some(HttpRespMeta {
                        status_code: 200,
                        headers: headers(n),
                    }),
                    cold_start_us: 0,
                })),
            }
            .encode_to_vec()
        };
        assert_eq!(RunnerMsg::check_wire(&start(MAX_HEADERS)[..]), Ok(()));
        let err = RunnerMsg::check_wire(&start(MAX_HEADERS + 1)[..]).expect_err("over");
        assert_eq!(err.field, "response headers");
    }

    #[test]
    fn data_and_unreadable_bytes_pass_to_prost() {
        let data = RunnerMsg {
            body: Some(runner_msg::Body::Data(DataFrame {
                data: vec![0x3a; 100_000].into(),
                eof: false,
            })),
        }
        .encode_to_vec();
        assert_eq!(RunnerMsg::check_wire(&data[..]), Ok(()));
        for bytes in [
            &[0x0a, 0x05, 0x0a][..], // a length past the end
            &[0x00, 0x01][..],       // field number 0
            &[0x0e][..],             // wire type 6
            &[0x0c][..],             // an end group with no start
            &[0xff; 11][..],         // a varint of 11 bytes
            &[0x0b, 0x08, 0x01][..], // a group with no end
        ] {
            assert_eq!(ClientMsg::check_wire(bytes), Ok(()), "{bytes:02x?}");
            assert!(
                ClientMsg::decode(bytes).is_err(),
                "prost refuses {bytes:02x?}"
            );
        }
    }
}
