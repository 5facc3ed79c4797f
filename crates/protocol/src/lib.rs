//! The wire contract of the dataplane (`proto/`), compiled at build time, plus the domain
//! types that the daemons use instead of the generated ones.
//!
//! Layout:
//! - [`runner`] / [`poolmanager`]: generated prost messages and tonic clients/servers.
//! - [`call`]: [`CallSpec`], a validated function call, and its conversion from and to
//!   the wire `Call`.
//! - [`batch`]: messages gathered into batches that leave in one write.
//! - [`framing`]: gRPC's message framing for the Engage stream, without copying body chunks,
//!   and (`opening`) the message that opens it, encoded straight from a [`CallSpec`].
//! - [`wire`]: counts of a received message's repeated fields, checked before prost
//!   decodes it, and [`codec`]: the generated clients' and servers' codec, which checks
//!   them.
//!
//! This crate depends on no daemon; daemons meet only through it.

pub mod batch;
pub mod call;
pub mod codec;
pub mod framing;
mod opening;
pub mod wire;

/// Generated types of `proto/runner.proto` (package `dataplane.runner.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod runner {
    tonic::include_proto!("dataplane.runner.v1");
}

/// Generated types of `proto/poolmanager.proto` (package `dataplane.poolmanager.v1`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod poolmanager {
    tonic::include_proto!("dataplane.poolmanager.v1");

    /// Most groups an npm accepts in one `AdvertiseCapacity`. An advert replaces the LB's
    /// previous one, so an LB with demand in more groups sends those with the most.
    pub const MAX_GROUPS_PER_ADVERT: usize = 1024;

    /// Most groups an npm names in one `MembershipChanged`: past it, it names none, and the
    /// LBs fetch every group they use.
    pub const MAX_GROUPS_NAMED: usize = 256;
}

pub use call::{CallSpec, InvalidCall};

/// The length a `Content-Length` value gives: one or more ASCII digits (RFC 9110 8.6), at
/// most `u64::MAX`. `str::parse` would also take a leading `+` (`+5`), which no HTTP peer
/// need accept, and the value is passed on to clients as it came.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Most bytes of a peer's own words (a refusal's or a `CallFinished`'s `details`) a receiver
/// passes on to a client or logs ([`cut_details`]). A message may carry 4 MiB of them.
pub const MAX_DETAILS_SHOWN: usize = 2048;

/// `details` as a peer sent them, or, past [`MAX_DETAILS_SHOWN`] bytes, their first ones (cut
/// at a character's boundary) and a note that says so, so that what a runner says cannot
/// fill a client's error answer or the LB's log. Control characters but tab (C1's NEL,
/// U+0085, among them) and the line and paragraph separators U+2028 and U+2029 (which some
/// log viewers break lines at) are escaped as Rust writes them (a line feed as the two
/// characters `\n`, a carriage return as `\r`, ESC as `\u{1b}`, U+2028 as `\u{2028}`), so
/// that what is returned is one line: a log line that shows it cannot be made to look like
/// several (tracing's text format writes them as they are). The bytes counted are those
/// shown, escapes included; the note's N counts the peer's. Details within the bound and
/// with none of those characters are handed back as they are.
pub fn cut_details(details: String) -> String {
    let escaped = |c: char| (c.is_control() && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}');
    if details.len() <= MAX_DETAILS_SHOWN && !details.chars().any(escaped) {
        return details;
    }
    let mut shown = String::with_capacity(details.len().min(MAX_DETAILS_SHOWN));
    let mut taken = 0;
    for c in details.chars() {
        let before = shown.len();
        if escaped(c) {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
        if shown.len() > MAX_DETAILS_SHOWN {
            shown.truncate(before);
            break;
        }
        taken += c.len_utf8();
    }
    if taken < details.len() {
        shown.push_str(&format!(" ... (cut at {taken} of {} bytes)", details.len()));
    }
    shown
}

/// Most bytes of a name ([`valid_name`]).
pub const MAX_NAME_LEN: usize = 128;

/// Whether `name` may name an app, a function or an LB group: 1 to [`MAX_NAME_LEN`] of
/// `[A-Za-z0-9._-]`, and not `.` or `..` (path segments that clients remove from
/// `/invoke/<app>/<name>`). The catalog holds its names to it, and the npm every group an
/// advert names (its process control plane keeps a runner's group in a record of
/// blank-separated fields).
pub fn valid_name(name: &str) -> bool {
    !matches!(name, "" | "." | "..")
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_details_are_cut_at_a_char_boundary_and_say_so() {
        let short = "x".repeat(MAX_DETAILS_SHOWN);
        assert_eq!(cut_details(short.clone()), short);
        let long = "\u{20ac}".repeat(1000);
        let kept = MAX_DETAILS_SHOWN / 3 * 3;
        assert_eq!(
            cut_details(long.clone()),
            format!("{} ... (cut at {kept} of 3000 bytes)", &long[..kept])
        );
    }

    #[test]
    fn details_are_one_line_with_their_control_characters_escaped() {
        let forged = "refused\n2026-01-01T00:00:00Z  INFO forged line\r\x1b[2J\x7f\tend";
        let shown = cut_details(forged.to_owned());
        assert!(
            !shown.chars().any(|c| c.is_control() && c != '\t'),
            "{shown:?}"
        );
        assert_eq!(
            shown,
            "refused\\n2026-01-01T00:00:00Z  INFO forged line\\r\\u{1b}[2J\\u{7f}\tend"
        );
        // The bound counts the escapes: 2,000 line feeds show as 1,024 `\n`, 2,048 bytes.
        assert_eq!(
            cut_details("\n".repeat(2000)),
            format!("{} ... (cut at 1024 of 2000 bytes)", "\\n".repeat(1024))
        );
    }

    /// Line breaks outside ASCII: NEL (a C1 control) and the Unicode line and paragraph
    /// separators, which some log viewers show as new lines.
    #[test]
    fn unicode_line_breaks_in_details_are_escaped_too() {
        let forged = "refused\u{2028}WARN forged\u{2029}para\u{85}nel \u{20ac}";
        assert_eq!(
            cut_details(forged.to_owned()),
            "refused\\u{2028}WARN forged\\u{2029}para\\u{85}nel \u{20ac}"
        );
    }

    #[test]
    fn a_content_length_is_digits_alone() {
        for (value, length) in [
            ("0", Some(0)),
            ("5", Some(5)),
            ("007", Some(7)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("+5", None),
            ("-5", None),
            ("", None),
            (" 5", None),
            ("5 ", None),
            ("5,5", None),
            ("0x5", None),
            ("٥", None),
        ] {
            assert_eq!(content_length(value.as_bytes()), length, "{value:?}");
        }
    }
}
