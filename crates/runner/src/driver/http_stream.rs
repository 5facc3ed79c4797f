//! The pure part of the Fn FDK `http-stream` contract: the headers of `POST /call` and how a
//! reply's status and headers map back to the client's response. No I/O here.
//!
//! Request: `Fn-Call-Id`, `Fn-Deadline` (RFC 3339, UTC, milliseconds), `Fn-Http-Method`,
//! `Fn-Http-Request-Url`, `Fn-Intent: httprequest`, every client header `X` as
//! `Fn-Http-H-X` (one line, its values joined), and the client's `Content-Type` plainly as
//! well.
//!
//! Reply: the client status is `Fn-Http-Status` of a 200 (200 without it). The FDK's own 502
//! and 504 ("function failed" / "function timed out") are no answer for the client: the call
//! failed or timed out, as under Fn's agent. `Fn-Http-H-X` becomes `X`; a plain
//! `Content-Type` is used when there is no `Fn-Http-H-Content-Type`, and the reply's own
//! `Content-Length` (its framing) is kept: the client gets the same length. Everything else —
//! other `Fn-*` headers, hop-by-hop and other framing headers — is dropped; hop-by-hop and
//! framing headers are dropped even when prefixed, since they describe a connection, not the
//! response.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, USER_AGENT,
};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::driver::{DriverError, FunctionRequest};

/// Prefix of translated client headers (header names are lowercase in `http`).
const FN_HTTP_H: &str = "fn-http-h-";

// The contract's names, made once: a name that is not one of `http`'s standard headers is
// otherwise parsed and allocated every time it is used (a tenth of the runner's
// instructions per call went into building these headers).
static FN_CALL_ID: HeaderName = HeaderName::from_static("fn-call-id");
static FN_DEADLINE: HeaderName = HeaderName::from_static("fn-deadline");
static FN_HTTP_METHOD: HeaderName = HeaderName::from_static("fn-http-method");
static FN_HTTP_REQUEST_URL: HeaderName = HeaderName::from_static("fn-http-request-url");
static FN_INTENT: HeaderName = HeaderName::from_static("fn-intent");
static FN_HTTP_STATUS: HeaderName = HeaderName::from_static("fn-http-status");

/// `Fn-Http-H-X` of the client headers most calls carry.
static PREFIXED_COMMON: [(HeaderName, HeaderName); 6] = [
    (
        CONTENT_TYPE,
        HeaderName::from_static("fn-http-h-content-type"),
    ),
    (
        CONTENT_LENGTH,
        HeaderName::from_static("fn-http-h-content-length"),
    ),
    (ACCEPT, HeaderName::from_static("fn-http-h-accept")),
    (
        ACCEPT_ENCODING,
        HeaderName::from_static("fn-http-h-accept-encoding"),
    ),
    (USER_AGENT, HeaderName::from_static("fn-http-h-user-agent")),
    (
        AUTHORIZATION,
        HeaderName::from_static("fn-http-h-authorization"),
    ),
];

/// `Fn-Http-H-` + `name`; `scratch` is reused between calls to spell the uncommon ones.
fn prefixed(name: &HeaderName, scratch: &mut String) -> Option<HeaderName> {
    if let Some((_, known)) = PREFIXED_COMMON.iter().find(|(plain, _)| plain == name) {
        return Some(known.clone());
    }
    scratch.clear();
    scratch.push_str(FN_HTTP_H);
    scratch.push_str(name.as_str());
    HeaderName::from_bytes(scratch.as_bytes()).ok()
}

/// Headers that describe one connection or the message framing, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// The headers of the `POST /call` for `request`.
///
/// # Errors
/// [`DriverError::Invalid`] when the call id or request URL cannot be a header value.
pub(crate) fn call_headers(request: &FunctionRequest) -> Result<HeaderMap, DriverError> {
    let value = |what: &str, text: &str| {
        HeaderValue::from_str(text).map_err(|_| {
            DriverError::Invalid(format!("{what} {text:?} is not a valid header value"))
        })
    };
    // Six of ours, and each client header once or twice.
    let mut headers = HeaderMap::with_capacity(6 + 2 * request.headers.keys_len());
    headers.insert(HOST, HeaderValue::from_static("localhost"));
    headers.insert(FN_CALL_ID.clone(), value("call id", &request.call_id)?);
    headers.insert(
        FN_DEADLINE.clone(),
        value("deadline", &rfc3339_millis(request.deadline))?,
    );
    headers.insert(
        FN_HTTP_METHOD.clone(),
        value("method", request.method.as_str())?,
    );
    headers.insert(
        FN_HTTP_REQUEST_URL.clone(),
        value("request URL", &request.request_url)?,
    );
    headers.insert(FN_INTENT.clone(), HeaderValue::from_static("httprequest"));
    client_to_fn(&request.headers, &mut headers);
    Ok(headers)
}

/// Adds each client header `X` to `out` as `Fn-Http-H-X`, and the `Content-Type` plainly
/// too. Hop-by-hop headers are left out. A valid client `Content-Length` also frames the
/// `POST /call` (the body is the client's, byte for byte), so the function sees a length
/// rather than a chunked body.
///
/// A header the client sent several times reaches the function as one line, its values
/// joined in order with `, ` (RFC 9110 5.3: the same field), and `Cookie` with `; ` (HTTP/2
/// sends each cookie as a field of its own, RFC 9113 8.2.3): FDKs keep one line of a name
/// (the Python FDK's `dict(headers)` the last), and would see one value.
///
/// One pass over the client's values: `HeaderMap::iter` yields a name's values together and
/// in order, so each name is translated once and no value is looked up again. A header
/// sent once is not copied.
pub(crate) fn client_to_fn(client: &HeaderMap, out: &mut HeaderMap) {
    let mut scratch = String::new();
    let mut length = OneLength::default();
    let mut last: Option<&HeaderName> = None;
    // The current name's translation, its first value and the rest joined to it.
    let mut target: Option<HeaderName> = None;
    let mut first: Option<&HeaderValue> = None;
    let mut joined: Vec<u8> = Vec::new();
    for (name, value) in client {
        if last != Some(name) {
            if let Some(previous) = last {
                emit(previous, target.take(), first.take(), &mut joined, out);
            }
            last = Some(name);
            // `None` for hop-by-hop names, and (unreachable for valid names) for a name
            // that cannot be prefixed: skipping is the safe answer either way.
            target = if is_hop_by_hop(name.as_str()) {
                None
            } else {
                prefixed(name, &mut scratch)
            };
        }
        if target.is_none() {
            continue;
        }
        if name == CONTENT_LENGTH {
            length.see(value);
        }
        match first {
            None => first = Some(value),
            Some(one) => {
                if joined.is_empty() {
                    joined.extend_from_slice(one.as_bytes());
                }
                joined.extend_from_slice(if name == COOKIE { b"; " } else { b", " });
                joined.extend_from_slice(value.as_bytes());
            }
        }
    }
    if let Some(previous) = last {
        emit(previous, target, first, &mut joined, out);
    }
    if let Some(length) = length.valid() {
        out.insert(CONTENT_LENGTH, length);
    }
}

/// Adds the client header `name`'s line to `out` as `target`: `first`, or all its values
/// `joined` when there were several (left empty for the next name).
fn emit(
    name: &HeaderName,
    target: Option<HeaderName>,
    first: Option<&HeaderValue>,
    joined: &mut Vec<u8>,
    out: &mut HeaderMap,
) {
    let (Some(target), Some(first)) = (target, first) else {
        return;
    };
    let value = if joined.is_empty() {
        first.clone()
    } else {
        // Valid values joined by valid bytes: always valid.
        match HeaderValue::from_bytes(joined) {
            Ok(value) => value,
            Err(_) => first.clone(),
        }
    };
    joined.clear();
    if name == CONTENT_TYPE {
        out.append(CONTENT_TYPE, value.clone());
    }
    out.append(target, value);
}

/// The `Content-Length` of a message whose values are seen one at a time: valid only when
/// there is exactly one and it is a length.
#[derive(Default)]
struct OneLength<'a> {
    first: Option<&'a HeaderValue>,
    more: bool,
}

impl<'a> OneLength<'a> {
    fn see(&mut self, value: &'a HeaderValue) {
        if self.first.is_some() {
            self.more = true;
        } else {
            self.first = Some(value);
        }
    }

    fn valid(&self) -> Option<HeaderValue> {
        let value = self.first.filter(|_| !self.more)?;
        fn_protocol::content_length(value.as_bytes()).map(|_| value.clone())
    }
}

/// The client's headers from a reply's headers. The reply's own `Content-Length` (its
/// framing, which the body forwarded to the client has exactly) is kept, so the client gets
/// a length whenever the function gave one; a function's `Fn-Http-H-Content-Length` is not
/// framing and is dropped.
pub(crate) fn fn_to_client(reply: &HeaderMap) -> HeaderMap {
    let mut client = HeaderMap::new();
    let mut length = OneLength::default();
    let mut plain_type = false;
    let mut last: Option<&HeaderName> = None;
    let mut original: Option<HeaderName> = None;
    for (name, value) in reply {
        if last != Some(name) {
            last = Some(name);
            original = name
                .as_str()
                .strip_prefix(FN_HTTP_H)
                .filter(|stripped| !is_hop_by_hop(stripped) && *stripped != "content-length")
                .and_then(|stripped| HeaderName::from_bytes(stripped.as_bytes()).ok());
        }
        if let Some(original) = &original {
            client.append(original.clone(), value.clone());
        } else if name == CONTENT_LENGTH {
            length.see(value);
        } else if name == CONTENT_TYPE {
            plain_type = true;
        }
    }
    if let Some(length) = length.valid() {
        client.insert(CONTENT_LENGTH, length);
    }
    if plain_type && !client.contains_key(CONTENT_TYPE) {
        for value in reply.get_all(CONTENT_TYPE) {
            client.append(CONTENT_TYPE, value.clone());
        }
    }
    client
}

/// The `Content-Length` the function declares for an answer to a HEAD: the length of the
/// body a GET would have had, which only the function knows and gives as
/// `Fn-Http-H-Content-Length` (the FDK frames its empty body with 0); `None` when it gave
/// none, or not one valid length.
pub(crate) fn declared_length(reply: &HeaderMap) -> Option<HeaderValue> {
    let mut length = OneLength::default();
    for value in reply.get_all(&PREFIXED_COMMON[1].1) {
        length.see(value);
    }
    length.valid()
}

/// What a reply that is not the function's answer says instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotAnswered {
    /// The FDK's own 502: the function failed (an exception in its handler).
    Failed,
    /// The FDK's own 504: it saw the call's deadline pass.
    TimedOut,
    /// A reply outside the contract: the FDK failing.
    Invalid(String),
}

/// The client status of a reply with HTTP status `http` and headers `reply`, as Fn's agent
/// holds an FDK to it ("Enforce 200/502/504 expectations"): 200 is the FDK's answer, with
/// the function's status in `Fn-Http-Status` (200 without it); 502 (the function failed)
/// and 504 (the FDK saw the deadline pass) are the FDK's report on the call, not an answer
/// for the client; any other status is the FDK failing.
///
/// # Errors
/// [`NotAnswered`] for a 502 or 504, for another status than 200, and for a
/// `Fn-Http-Status` that is present but not a status from 200 to 599.
pub(crate) fn client_status(
    http: StatusCode,
    reply: &HeaderMap,
) -> Result<StatusCode, NotAnswered> {
    if http == StatusCode::BAD_GATEWAY {
        return Err(NotAnswered::Failed);
    }
    if http == StatusCode::GATEWAY_TIMEOUT {
        return Err(NotAnswered::TimedOut);
    }
    if http != StatusCode::OK {
        return Err(NotAnswered::Invalid(format!(
            "the function's FDK answered HTTP status {}: the http-stream contract allows 200 \
             (with the function's status in Fn-Http-Status), 502 and 504",
            http.as_u16()
        )));
    }
    let Some(value) = reply.get(&FN_HTTP_STATUS) else {
        return Ok(http);
    };
    let text = value.to_str().unwrap_or_default().trim();
    match text.parse::<u16>().ok().map(StatusCode::from_u16) {
        Some(Ok(status)) if (200..600).contains(&status.as_u16()) => Ok(status),
        _ => Err(NotAnswered::Invalid(format!(
            "invalid Fn-Http-Status {value:?}: a status from 200 to 599"
        ))),
    }
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-11-25T16:02:11.123Z`. Times before the
/// epoch are written as the epoch.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t.max(UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use proptest::prelude::*;
    use std::time::Duration;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        headers
    }

    fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn call_headers_carry_the_contract() {
        let request = FunctionRequest {
            call_id: "01J-call".into(),
            method: Method::PUT,
            request_url: "http://lb/r/demo/echo?x=1".into(),
            headers: map(&[
                ("content-type", "text/plain"),
                ("content-length", "11"),
                ("x-many", "a"),
                ("x-many", "b"),
                ("connection", "keep-alive"),
            ]),
            deadline: UNIX_EPOCH + Duration::from_millis(1_764_086_531_123),
            deadline_at: std::time::Instant::now(),
        };
        let headers = call_headers(&request).expect("headers");
        assert_eq!(values(&headers, "fn-call-id"), ["01J-call"]);
        assert_eq!(
            values(&headers, "fn-deadline"),
            ["2025-11-25T16:02:11.123Z"]
        );
        assert_eq!(values(&headers, "fn-http-method"), ["PUT"]);
        assert_eq!(
            values(&headers, "fn-http-request-url"),
            ["http://lb/r/demo/echo?x=1"]
        );
        assert_eq!(values(&headers, "fn-intent"), ["httprequest"]);
        // One line, as FDKs keep one line of a name.
        assert_eq!(values(&headers, "fn-http-h-x-many"), ["a, b"]);
        assert_eq!(values(&headers, "fn-http-h-content-type"), ["text/plain"]);
        assert_eq!(values(&headers, "content-type"), ["text/plain"]);
        // The client's length frames the call too.
        assert_eq!(values(&headers, "content-length"), ["11"]);
        assert_eq!(values(&headers, "fn-http-h-content-length"), ["11"]);
        assert!(!headers.contains_key("fn-http-h-connection"));
    }

    #[test]
    fn only_one_valid_client_length_frames_the_call() {
        let framing = |pairs: &[(&str, &str)]| {
            let mut out = HeaderMap::new();
            client_to_fn(&map(pairs), &mut out);
            let prefixed = values(&out, "fn-http-h-content-length").len();
            (values(&out, "content-length").join(","), prefixed)
        };
        assert_eq!(framing(&[("content-length", "7")]), ("7".into(), 1));
        assert_eq!(
            framing(&[("content-length", "7"), ("content-length", "7")]),
            (String::new(), 1)
        );
        assert_eq!(framing(&[("content-length", "seven")]), (String::new(), 1));
        assert_eq!(framing(&[("content-length", "+7")]), (String::new(), 1));
        assert_eq!(framing(&[("x-other", "7")]), (String::new(), 0));
    }

    /// The length a function declares for a HEAD's answer goes to the client as it came,
    /// so it must be one: digits alone (`"+5".parse::<u64>()` succeeds).
    #[test]
    fn a_declared_length_is_digits_alone() {
        let declared = |value: &str| {
            declared_length(&map(&[("fn-http-h-content-length", value)]))
                .map(|v| v.to_str().expect("ascii").to_owned())
        };
        assert_eq!(declared("5").as_deref(), Some("5"));
        for bad in ["+5", "-5", " 5", "5 ", "five", ""] {
            assert_eq!(declared(bad), None, "{bad:?}");
        }
        let twice = map(&[
            ("fn-http-h-content-length", "5"),
            ("fn-http-h-content-length", "5"),
        ]);
        assert_eq!(declared_length(&twice), None);
    }

    #[test]
    fn prefixed_names_are_the_plain_ones_behind_the_prefix() {
        let mut scratch = String::new();
        let uncommon = HeaderName::from_static("x-request-id");
        let names = PREFIXED_COMMON
            .iter()
            .map(|(plain, _)| plain.clone())
            .chain([uncommon, HOST]);
        for name in names {
            let got = prefixed(&name, &mut scratch).expect("a valid name");
            assert_eq!(got.as_str(), format!("fn-http-h-{name}"));
        }
    }

    #[test]
    fn call_headers_reject_unsendable_ids() {
        let request = FunctionRequest {
            call_id: "bad\nid".into(),
            method: Method::GET,
            request_url: "/".into(),
            headers: HeaderMap::new(),
            deadline: UNIX_EPOCH,
            deadline_at: std::time::Instant::now(),
        };
        assert!(matches!(
            call_headers(&request),
            Err(DriverError::Invalid(_))
        ));
    }

    #[test]
    fn reply_headers_map_back() {
        let reply = map(&[
            ("fn-http-status", "201"),
            ("fn-http-h-x-one", "1"),
            ("fn-http-h-set-cookie", "a=1"),
            ("fn-http-h-set-cookie", "b=2"),
            ("fn-http-h-transfer-encoding", "chunked"),
            ("fn-http-h-content-length", "12"),
            ("fn-fdk-version", "fdk-python/0.1"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("content-type", "application/json"),
            ("date", "now"),
        ]);
        let client = fn_to_client(&reply);
        assert_eq!(values(&client, "x-one"), ["1"]);
        assert_eq!(values(&client, "set-cookie"), ["a=1", "b=2"]);
        assert_eq!(values(&client, "content-type"), ["application/json"]);
        // The reply's framing length, not the function's prefixed header.
        assert_eq!(values(&client, "content-length"), ["5"]);
        assert_eq!(client.len(), 5, "{client:?}");
    }

    #[test]
    fn cookie_fields_reach_the_function_as_one_header() {
        let mut out = HeaderMap::new();
        client_to_fn(
            &map(&[("cookie", "a=1"), ("x-other", "o"), ("cookie", "b=2; c=3")]),
            &mut out,
        );
        assert_eq!(values(&out, "fn-http-h-cookie"), ["a=1; b=2; c=3"]);
        assert_eq!(values(&out, "fn-http-h-x-other"), ["o"]);
        let mut out = HeaderMap::new();
        client_to_fn(&map(&[("cookie", "only=1")]), &mut out);
        assert_eq!(values(&out, "fn-http-h-cookie"), ["only=1"]);
        let mut out = HeaderMap::new();
        client_to_fn(&map(&[("x-other", "o")]), &mut out);
        assert!(!out.contains_key("fn-http-h-cookie"));
    }

    #[test]
    fn prefixed_content_type_wins_over_plain() {
        let reply = map(&[
            ("fn-http-h-content-type", "text/html"),
            ("content-type", "text/plain"),
        ]);
        assert_eq!(values(&fn_to_client(&reply), "content-type"), ["text/html"]);
    }

    #[test]
    fn status_mapping() {
        let ok = StatusCode::OK;
        assert_eq!(client_status(ok, &map(&[])), Ok(StatusCode::OK));
        assert!(
            client_status(
                StatusCode::SWITCHING_PROTOCOLS,
                &map(&[("fn-http-status", "200")])
            )
            .is_err()
        );
        assert_eq!(
            client_status(ok, &map(&[("fn-http-status", "404")])),
            Ok(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            client_status(ok, &map(&[("fn-http-status", " 201 ")])),
            Ok(StatusCode::CREATED)
        );
        for bad in ["abc", "99", "1000", "", "100", "600", "799"] {
            assert!(
                client_status(ok, &map(&[("fn-http-status", bad)])).is_err(),
                "{bad:?}"
            );
        }
        // The FDK's own failure statuses are its report on the call, whatever
        // Fn-Http-Status says (the Python FDK adds the function's 502 to its own).
        let failed = map(&[("fn-http-status", "200")]);
        assert_eq!(
            client_status(StatusCode::BAD_GATEWAY, &failed),
            Err(NotAnswered::Failed)
        );
        assert_eq!(
            client_status(StatusCode::GATEWAY_TIMEOUT, &map(&[])),
            Err(NotAnswered::TimedOut)
        );
        // Any other HTTP status is the FDK failing, whatever Fn-Http-Status says (fdk-java
        // answers 500 when it fails after the function's headers were added).
        for other in [201, 404, 500, 503] {
            let http = StatusCode::from_u16(other).expect("a status");
            match client_status(http, &failed) {
                Err(NotAnswered::Invalid(error)) => {
                    assert!(error.contains(&other.to_string()), "{error}");
                }
                other => panic!("not in the contract, yet {other:?}"),
            }
        }
    }

    #[test]
    fn formats_deadlines() {
        let at = |ms: u64| rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(1_709_164_800_007), "2024-02-29T00:00:00.007Z");
        assert_eq!(at(1_735_689_599_000), "2024-12-31T23:59:59.000Z");
        assert_eq!(at(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(253_402_300_799_000), "9999-12-31T23:59:59.000Z");
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    fn header_name() -> impl Strategy<Value = String> {
        // Hop-by-hop headers are not forwarded, and the client's Content-Length reaches the
        // function but is never taken from it (the body is re-framed).
        "[a-z][a-z0-9-]{0,24}".prop_filter("not carried both ways", |name| {
            !is_hop_by_hop(name) && name != "content-length"
        })
    }

    /// A header map of the pairs that are valid header names and values.
    fn headers_from(pairs: Vec<(String, String)>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.append(name, value);
            }
        }
        headers
    }

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        // Some names often, so that headers repeat.
        let name = prop_oneof![
            3 => header_name(),
            1 => prop::sample::select(vec!["cookie", "accept", "x-many"]).prop_map(str::to_owned),
        ];
        prop::collection::vec((name, "[!-~][ -~]{0,30}"), 0..12).prop_map(headers_from)
    }

    /// Names a function's reply might carry: prefixed client headers (hop-by-hop and framing
    /// ones too), other `Fn-*` headers, plain ones.
    fn reply_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-z][a-z0-9-]{0,12}".prop_map(|n| format!("{FN_HTTP_H}{n}")),
            2 => prop::sample::select(vec![
                "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                "content-length", "content-type", "proxy-authenticate", "fn-call-id",
            ])
            .prop_map(|n| format!("{FN_HTTP_H}{n}")),
            1 => "fn-[a-z-]{1,10}",
            1 => prop::sample::select(vec![
                "content-type", "content-length", "transfer-encoding", "connection", "date",
                "fn-http-status",
            ])
            .prop_map(str::to_owned),
            1 => "[a-z][a-z0-9-]{0,12}",
        ]
    }

    fn reply_map() -> impl Strategy<Value = HeaderMap> {
        let value = prop_oneof![3 => "[!-~][ -~]{0,20}", 1 => "[0-9]{1,6}"];
        prop::collection::vec((reply_name(), value), 0..16).prop_map(headers_from)
    }

    proptest! {
        // Whatever headers a function answers with, the client gets exactly the values of
        // its `Fn-Http-H-X` headers as `X` (in order), never a hop-by-hop header, the reply's
        // own `Content-Length` only when it is one valid length, and the plain
        // `Content-Type` only when no prefixed one was given.
        #[test]
        fn reply_headers_reach_the_client_exactly_as_prefixed(reply in reply_map()) {
            let client = fn_to_client(&reply);
            let lengths: Vec<&HeaderValue> = reply.get_all(CONTENT_LENGTH).iter().collect();
            let valid = lengths.len() == 1
                && fn_protocol::content_length(lengths[0].as_bytes()).is_some();
            let expected = if valid { lengths } else { Vec::new() };
            prop_assert_eq!(client.get_all(CONTENT_LENGTH).iter().collect::<Vec<_>>(), expected);
            for name in client.keys() {
                prop_assert!(!is_hop_by_hop(name.as_str()), "{name} leaked");
                if name == CONTENT_LENGTH {
                    continue;
                }
                let got: Vec<&HeaderValue> = client.get_all(name).iter().collect();
                let prefixed = format!("{FN_HTTP_H}{name}");
                let sent: Vec<&HeaderValue> = reply.get_all(prefixed.as_str()).iter().collect();
                if sent.is_empty() {
                    prop_assert_eq!(name, &CONTENT_TYPE);
                    let plain: Vec<&HeaderValue> = reply.get_all(CONTENT_TYPE).iter().collect();
                    prop_assert_eq!(got, plain);
                } else {
                    prop_assert_eq!(got, sent);
                }
            }
            for name in reply.keys() {
                if let Some(original) = name.as_str().strip_prefix(FN_HTTP_H)
                    && !is_hop_by_hop(original)
                    && original != "content-length"
                {
                    prop_assert!(client.contains_key(original), "{original} dropped");
                }
            }
        }

        // Any `Fn-Http-Status` on a 200 either maps to that status (200 to 599) or is
        // reported as invalid; the FDK's own 502/504 are always its report of a failure or a
        // timeout; any other reply status is an FDK failure; no header keeps the reply's 200.
        #[test]
        fn fn_http_status_maps_or_is_rejected(
            value in prop_oneof!["[0-9]{1,4}", " ?[1-9][0-9]{2} ?", "[ -~]{0,6}"],
            reply_status in prop::sample::select(vec![200u16, 201, 404, 500, 502, 504]),
            present in any::<bool>(),
        ) {
            let http = StatusCode::from_u16(reply_status).expect("valid status");
            let headers = if present { map(&[(FN_HTTP_STATUS.as_str(), &value)]) } else { map(&[]) };
            let result = client_status(http, &headers);
            if reply_status == 502 {
                prop_assert_eq!(result, Err(NotAnswered::Failed));
            } else if reply_status == 504 {
                prop_assert_eq!(result, Err(NotAnswered::TimedOut));
            } else if reply_status == 200 && !present {
                prop_assert_eq!(result, Ok(http));
            } else if reply_status != 200 {
                prop_assert!(matches!(result, Err(NotAnswered::Invalid(_))));
            } else {
                match result {
                    Ok(status) => {
                        prop_assert!((200..600).contains(&status.as_u16()));
                        prop_assert_eq!(Ok(status.as_u16()), value.trim().parse::<u16>());
                    }
                    Err(NotAnswered::Invalid(e)) => prop_assert!(e.contains("Fn-Http-Status")),
                    Err(other) => prop_assert!(false, "{other:?}"),
                }
            }
        }

        // Client headers can never replace or add to the contract's own headers: a client
        // header named `Fn-Call-Id` travels as `Fn-Http-H-Fn-Call-Id`.
        #[test]
        fn contract_headers_are_the_runners_whatever_the_client_sends(
            client in prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(vec![
                            "fn-call-id", "fn-deadline", "fn-http-method", "fn-intent",
                            "fn-http-request-url", "host",
                        ]).prop_map(str::to_owned),
                        "[a-z][a-z0-9-]{0,10}",
                    ],
                    "[!-~]{1,10}",
                ),
                0..8,
            ),
            call_id in "[0-9A-Za-z-]{1,20}",
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &client {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("token"),
                    HeaderValue::from_str(value).expect("visible ASCII"),
                );
            }
            let request = FunctionRequest {
                call_id: call_id.clone(),
                method: Method::POST,
                request_url: "http://lb/r/a/b".into(),
                headers,
                deadline: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                deadline_at: std::time::Instant::now(),
            };
            let wire = call_headers(&request).expect("valid request");
            prop_assert_eq!(values(&wire, "fn-call-id"), [call_id.as_str()]);
            prop_assert_eq!(values(&wire, "fn-intent"), ["httprequest"]);
            prop_assert_eq!(values(&wire, "fn-http-method"), ["POST"]);
            prop_assert_eq!(values(&wire, "fn-http-request-url"), ["http://lb/r/a/b"]);
            prop_assert_eq!(values(&wire, "host"), ["localhost"]);
            prop_assert_eq!(values(&wire, "fn-deadline").len(), 1);
        }
    }

    proptest! {
        // Whatever the client sends, the function's answer with the headers it got gives
        // the client the same headers, a header sent several times as one line of its
        // values (`; ` between cookies).
        #[test]
        fn client_headers_round_trip(client in header_map()) {
            let mut wire = HeaderMap::new();
            client_to_fn(&client, &mut wire);
            let mut joined = HeaderMap::new();
            for name in client.keys() {
                let separator = if name == COOKIE { "; " } else { ", " };
                let all: Vec<&str> = client
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().expect("visible ASCII"))
                    .collect();
                let value = HeaderValue::from_str(&all.join(separator)).expect("valid");
                joined.insert(name.clone(), value);
            }
            for name in wire.keys() {
                prop_assert_eq!(wire.get_all(name).iter().count(), 1, "{} repeated", name);
            }
            prop_assert_eq!(fn_to_client(&wire), joined);
        }
    }
}
