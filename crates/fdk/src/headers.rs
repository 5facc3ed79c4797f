//! Header names of the `http-stream` contract, and the translation of HTTP headers to and from
//! their wire form.
//!
//! Between the runner and the FDK, every header of the client's request and of the function's
//! response travels as `Fn-Http-H-<name>`, so that it cannot be confused with the contract's own
//! headers (`Fn-Call-Id`, `Fn-Http-Status`, ...). [`to_fn`] adds that prefix (to a name that
//! lacks it: one already in wire form goes as it is, as with Fn's Go FDK) and [`from_fn`]
//! removes it. Header names are case-insensitive: [`http::HeaderName`] stores them in lower
//! case, so `FN-HTTP-H-Foo`, `fn-http-h-foo` and `Fn-Http-H-FOO` are the same header. A header
//! with several values keeps all of them, in order.
//!
//! This module does not decide which other headers a reply carries (status, FDK version and
//! runtime, plain `Content-Type`); that is the server's part of the contract.

use http::{HeaderMap, HeaderName};

/// The prefix that marks a client or function header on the wire (lower case, as stored).
pub const PREFIX: &str = "fn-http-h-";

/// The call's id, set by the runner on every call.
pub const FN_CALL_ID: HeaderName = HeaderName::from_static("fn-call-id");
/// The call's deadline, an RFC 3339 timestamp.
pub const FN_DEADLINE: HeaderName = HeaderName::from_static("fn-deadline");
/// The method of the client's request.
pub const FN_HTTP_METHOD: HeaderName = HeaderName::from_static("fn-http-method");
/// The URL of the client's request.
pub const FN_HTTP_REQUEST_URL: HeaderName = HeaderName::from_static("fn-http-request-url");
/// Why the runner calls the function; `httprequest` for HTTP invocations.
pub const FN_INTENT: HeaderName = HeaderName::from_static("fn-intent");
/// The status the function answered, which the runner gives the client.
pub const FN_HTTP_STATUS: HeaderName = HeaderName::from_static("fn-http-status");
/// Which FDK answered, e.g. `fdk-rust/0.1.0`.
pub const FN_FDK_VERSION: HeaderName = HeaderName::from_static("fn-fdk-version");
/// Which language the FDK runs on, e.g. `rust` (`go1.22.1` from Fn's Go FDK).
pub const FN_FDK_RUNTIME: HeaderName = HeaderName::from_static("fn-fdk-runtime");

/// Puts every header into its wire form: `X` becomes `Fn-Http-H-X`, all values kept in order.
///
/// A header already named `Fn-Http-H-X` (in any case) goes as it is, as Fn's Go FDK sends it:
/// prefixed again, it reached the client as `Fn-Http-H-X` rather than `X`. Its values join
/// those of a plain `X`, if the same answer has one too.
///
/// A name too long to carry the prefix (beyond [`http::HeaderName`]'s limit) is left out.
#[must_use]
pub fn to_fn(headers: &HeaderMap) -> HeaderMap {
    let mut wire = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if name.as_str().starts_with(PREFIX) {
            wire.append(name.clone(), value.clone());
            continue;
        }
        let mut prefixed = String::with_capacity(PREFIX.len() + name.as_str().len());
        prefixed.push_str(PREFIX);
        prefixed.push_str(name.as_str());
        if let Ok(prefixed) = HeaderName::from_bytes(prefixed.as_bytes()) {
            wire.append(prefixed, value.clone());
        }
    }
    wire
}

/// Takes the prefixed headers out of their wire form: `Fn-Http-H-X` becomes `X`, all values kept
/// in order. Headers without the prefix (the contract's own, transport headers) are left out, as
/// is a bare `Fn-Http-H-` with no name after it.
#[must_use]
pub fn from_fn(wire: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in wire {
        let Some(rest) = name.as_str().strip_prefix(PREFIX) else {
            continue;
        };
        if let Ok(name) = HeaderName::from_bytes(rest.as_bytes()) {
            headers.append(name, value.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::{CONTENT_TYPE, SET_COOKIE};
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        map
    }

    #[test]
    fn to_fn_prefixes_every_header_and_keeps_all_values() {
        let headers = map(&[
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]);
        let wire = to_fn(&headers);
        assert_eq!(wire.len(), 3);
        assert_eq!(wire["fn-http-h-content-type"], "text/plain");
        let cookies: Vec<_> = wire.get_all("fn-http-h-set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(!wire.contains_key(CONTENT_TYPE));
    }

    #[test]
    fn from_fn_strips_the_prefix_in_any_case_and_drops_other_headers() {
        let wire = map(&[
            ("Fn-Call-Id", "01ABC"),
            ("FN-HTTP-H-Set-Cookie", "a=1"),
            ("fn-http-h-set-cookie", "b=2"),
            ("Fn-Http-H-X-Custom", "yes"),
            ("Content-Type", "application/json"),
            ("Fn-Http-H-", "nameless"),
        ]);
        let headers = from_fn(&wire);
        assert_eq!(headers.len(), 3);
        let cookies: Vec<_> = headers.get_all(SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(headers["x-custom"], "yes");
        assert!(!headers.contains_key(CONTENT_TYPE));
        assert!(!headers.contains_key(FN_CALL_ID));
    }

    /// fdk-go's `encapHeaders` passes a header that already carries the prefix; prefixing it
    /// again sent `Fn-Http-H-Fn-Http-H-X`, which the runner gave the client as `Fn-Http-H-X`.
    #[test]
    fn to_fn_leaves_headers_already_in_wire_form_as_they_are() {
        let headers = map(&[
            ("Fn-Http-H-X-Trace", "t1"),
            ("FN-HTTP-H-Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Plain", "p"),
        ]);
        let wire = to_fn(&headers);
        assert_eq!(wire.len(), 4);
        assert_eq!(wire["fn-http-h-x-trace"], "t1");
        assert_eq!(wire["fn-http-h-x-plain"], "p");
        let cookies: Vec<_> = wire.get_all("fn-http-h-set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(
            wire.keys()
                .all(|name| !name.as_str().starts_with("fn-http-h-fn-http-h-")),
            "{wire:?}"
        );
        let client = from_fn(&wire);
        assert_eq!(client["x-trace"], "t1");
        assert_eq!(client.get_all(SET_COOKIE).iter().count(), 2);
    }

    #[test]
    fn names_too_long_for_the_prefix_are_left_out() {
        let long = "a".repeat(u16::MAX as usize - 2);
        let headers = map(&[(long.as_str(), "v"), ("short", "w")]);
        let wire = to_fn(&headers);
        assert_eq!(wire.len(), 1);
        assert_eq!(wire["fn-http-h-short"], "w");
    }

    /// Header names in mixed case, drawn often from a small set so that names repeat.
    fn header_name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            "[a-cA-C]",
            "[A-Za-z][A-Za-z0-9_-]{0,24}",
            "(Fn-Http-H-|fn-call-)[a-z]{1,4}",
        ]
        .prop_map(|name| HeaderName::from_bytes(name.as_bytes()).expect("token characters"))
    }

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        "[ -~\t]{0,40}".prop_map(|value| HeaderValue::from_str(&value).expect("visible ASCII"))
    }

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec((header_name(), header_value()), 0..12).prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(name, value);
            }
            map
        })
    }

    /// `headers` as the client gets them: every name without the prefix, if it has one.
    fn unprefixed(headers: &HeaderMap) -> HeaderMap {
        let mut plain = HeaderMap::new();
        for (name, value) in headers {
            let name = name.as_str();
            let name = name.strip_prefix(PREFIX).unwrap_or(name);
            plain.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a name"),
                value.clone(),
            );
        }
        plain
    }

    proptest! {
        /// The client gets back every header, under its name without the prefix (which a
        /// header already in wire form loses once, not twice).
        #[test]
        fn from_fn_undoes_to_fn(headers in header_map()) {
            let wire = to_fn(&headers);
            prop_assert_eq!(wire.len(), headers.len());
            prop_assert!(wire.keys().all(|name| name.as_str().starts_with(PREFIX)));
            prop_assert_eq!(from_fn(&wire), unprefixed(&headers));
        }

        #[test]
        fn contract_headers_beside_the_wire_form_do_not_leak(
            headers in header_map(),
            call_id in "[0-9A-Z]{1,26}",
        ) {
            let mut wire = to_fn(&headers);
            wire.insert(FN_CALL_ID, HeaderValue::from_str(&call_id).expect("ASCII"));
            wire.insert(FN_INTENT, HeaderValue::from_static("httprequest"));
            wire.append(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            prop_assert_eq!(from_fn(&wire), unprefixed(&headers));
        }
    }
}
