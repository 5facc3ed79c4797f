//! What a function knows about the call it is handling.
//!
//! The runner describes each call in the headers of its `POST /call`: `Fn-Call-Id`,
//! `Fn-Deadline`, `Fn-Http-Method`, `Fn-Http-Request-Url`, and the client's headers as
//! `Fn-Http-H-<name>`. [`Context`] gives them back in plain form, beside the function's
//! environment. The FDK enforces the deadline (see the crate's docs, "Deadline"): a handler
//! still running at [`Context::deadline`] is stopped; [`Context::remaining`] tells it how long
//! it has, to bound work it does outside its own future (spawned tasks, blocking threads).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::env::FnEnv;
use crate::headers;

/// One call, as the function sees it.
#[derive(Debug, Clone)]
pub struct Context {
    call_id: String,
    deadline: Option<SystemTime>,
    method: String,
    request_url: String,
    headers: HeaderMap,
    /// Shared by every call of the process: it is read once at startup.
    env: Arc<FnEnv>,
}

impl Context {
    /// Builds the context from the runner's request headers (wire form), as the FDK does for
    /// every call. Public so that handlers can be tested without a socket.
    ///
    /// Missing or unreadable contract headers give empty strings (and no deadline). The client
    /// headers are the `Fn-Http-H-` ones with the prefix removed; a plain `Content-Type` from the
    /// runner counts as the client's when no prefixed one is present.
    #[must_use]
    pub fn from_fn_headers(env: Arc<FnEnv>, wire: &HeaderMap) -> Self {
        let text = |name| {
            wire.get(name)
                .map(|value: &HeaderValue| String::from_utf8_lossy(value.as_bytes()))
                .map(Cow::into_owned)
                .unwrap_or_default()
        };
        let deadline = wire
            .get(headers::FN_DEADLINE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| OffsetDateTime::parse(value.trim(), &Rfc3339).ok())
            .map(SystemTime::from);
        let mut client_headers = headers::from_fn(wire);
        let plain_content_type = wire
            .get(CONTENT_TYPE)
            .filter(|_| !client_headers.contains_key(CONTENT_TYPE))
            .cloned();
        if let Some(content_type) = plain_content_type {
            client_headers.insert(CONTENT_TYPE, content_type);
        }
        Self {
            call_id: text(headers::FN_CALL_ID),
            deadline,
            method: text(headers::FN_HTTP_METHOD),
            request_url: text(headers::FN_HTTP_REQUEST_URL),
            headers: client_headers,
            env,
        }
    }

    /// `Fn-Call-Id`: the call's id, for logs.
    #[must_use]
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// `Fn-Deadline`: when the runner gives up on the call, and the FDK stops the handler;
    /// `None` if absent or not RFC 3339 (the call then has no limit in the FDK).
    #[must_use]
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline
    }

    /// The time left until the deadline (zero once it has passed).
    #[must_use]
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|deadline| {
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// `Fn-Http-Method`: the method of the client's request, e.g. `GET`.
    #[must_use]
    pub fn method(&self) -> &str {
        &self.method
    }

    /// `Fn-Http-Request-Url`: the URL of the client's request.
    #[must_use]
    pub fn request_url(&self) -> &str {
        &self.request_url
    }

    /// The client's request headers (multi-valued headers keep every value).
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// `FN_APP_NAME`.
    #[must_use]
    pub fn app_name(&self) -> &str {
        self.env.app_name()
    }

    /// `FN_FN_NAME`.
    #[must_use]
    pub fn fn_name(&self) -> &str {
        self.env.fn_name()
    }

    /// One config value of the function (any environment variable it was started with).
    #[must_use]
    pub fn config(&self, key: &str) -> Option<&str> {
        self.env.var(key)
    }

    /// The whole environment the function was started with.
    #[must_use]
    pub fn env(&self) -> &FnEnv {
        &self.env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Arc<FnEnv> {
        Arc::new(
            FnEnv::from_vars([
                ("FN_FORMAT", "http-stream"),
                ("FN_LISTENER", "unix:/tmp/lsnr.sock"),
                ("FN_APP_NAME", "app"),
                ("FN_FN_NAME", "fn"),
                ("COLOUR", "blue"),
            ])
            .expect("valid environment"),
        )
    }

    #[test]
    fn reads_the_call_from_the_runner_headers() {
        let mut wire = HeaderMap::new();
        wire.insert(headers::FN_CALL_ID, HeaderValue::from_static("01CALL"));
        wire.insert(
            headers::FN_DEADLINE,
            HeaderValue::from_static("2030-01-02T03:04:05.250Z"),
        );
        wire.insert(headers::FN_HTTP_METHOD, HeaderValue::from_static("PUT"));
        wire.insert(
            headers::FN_HTTP_REQUEST_URL,
            HeaderValue::from_static("http://lb/r/app/fn?x=1"),
        );
        wire.insert(headers::FN_INTENT, HeaderValue::from_static("httprequest"));
        wire.append("fn-http-h-accept", HeaderValue::from_static("a/b"));
        wire.append("fn-http-h-accept", HeaderValue::from_static("c/d"));
        wire.insert(CONTENT_TYPE, HeaderValue::from_static("text/csv"));

        let ctx = Context::from_fn_headers(env(), &wire);
        assert_eq!(ctx.call_id(), "01CALL");
        assert_eq!(ctx.method(), "PUT");
        assert_eq!(ctx.request_url(), "http://lb/r/app/fn?x=1");
        let expected =
            OffsetDateTime::parse("2030-01-02T03:04:05.250+00:00", &Rfc3339).expect("timestamp");
        assert_eq!(ctx.deadline(), Some(SystemTime::from(expected)));
        assert!(ctx.remaining().is_some_and(|left| left > Duration::ZERO));
        let accept: Vec<_> = ctx.headers().get_all("accept").iter().collect();
        assert_eq!(accept, ["a/b", "c/d"]);
        assert_eq!(ctx.headers()[CONTENT_TYPE], "text/csv");
        assert_eq!(ctx.headers().len(), 3);
        assert_eq!((ctx.app_name(), ctx.fn_name()), ("app", "fn"));
        assert_eq!(ctx.config("COLOUR"), Some("blue"));
    }

    #[test]
    fn prefixed_content_type_wins_and_bad_deadlines_are_none() {
        let mut wire = HeaderMap::new();
        wire.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        wire.insert(
            "fn-http-h-content-type",
            HeaderValue::from_static("text/csv"),
        );
        wire.insert(headers::FN_DEADLINE, HeaderValue::from_static("tomorrow"));
        let ctx = Context::from_fn_headers(env(), &wire);
        assert_eq!(ctx.headers()[CONTENT_TYPE], "text/csv");
        assert_eq!(ctx.deadline(), None);
        assert_eq!(ctx.call_id(), "");
    }

    #[test]
    fn deadlines_with_offsets_are_understood() {
        let mut wire = HeaderMap::new();
        wire.insert(
            headers::FN_DEADLINE,
            HeaderValue::from_static("2001-01-01T02:00:00+02:00"),
        );
        let ctx = Context::from_fn_headers(env(), &wire);
        let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(978_307_200);
        assert_eq!(ctx.deadline(), Some(expected));
        assert_eq!(ctx.remaining(), Some(Duration::ZERO));
    }
}
