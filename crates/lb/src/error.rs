//! Call failures and their HTTP statuses: the lb-agent's one edge mapping.
//!
//! Each variant says who is to blame and whether the client may retry: `Retry-After` is
//! only sent where trying again later can succeed.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::body::ResponseBody;

/// Why a call did not produce the function's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No function at this path (client).
    #[error(
        "no function at {0}: calls go to /r/{{app}}/{{route}} or /invoke/{{app}}/{{function}}, as the catalog names them"
    )]
    NotFound(String),
    /// An authority-form target (`host:port`): CONNECT's, a request for a tunnel, which only
    /// a proxy makes, and the lb-agent is none; with any other method, a target no client
    /// should send. A 404 as any target of no function (client).
    #[error(
        "no function at {authority}: {}; calls go to /r/{{app}}/{{route}} or \
         /invoke/{{app}}/{{function}}",
        authority_form_reason(method)
    )]
    NoTunnel { method: String, authority: String },
    /// Wrong method on a fixed route (client).
    #[error("method {method} not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allow: &'static str,
    },
    /// Request body over `FN_MAX_REQUEST_BODY` (client).
    #[error("request body larger than the limit of {limit} bytes (FN_MAX_REQUEST_BODY)")]
    TooLarge { limit: u64 },
    /// The client's request could not be read or is malformed (client).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request target names a user (`http://user:pw@host/...`): RFC 9110 (4.2.4) asks a
    /// recipient to take userinfo in an http(s) URI as an error, and dropping it served a
    /// request whose credentials went nowhere (client). The message does not repeat them.
    #[error(
        "bad request: the request target carries userinfo (user@host), which an http or \
         https URI must not (RFC 9110, 4.2.4); send credentials in a header such as \
         Authorization, not in the URL"
    )]
    UserinfoInTarget,
    /// An absolute-form target (or HTTP/2 `:scheme`) of a scheme other than http and https:
    /// the LB is no proxy, and the function's request URL would carry it (client).
    #[error(
        "bad request: the request target's scheme {0:?} is not http or https; send the \
         path alone (/r/...) or an http or https URL"
    )]
    UnsupportedScheme(String),
    /// The asterisk-form target (`*`) with a method other than OPTIONS: it names no
    /// resource, only the server, and only OPTIONS asks about the server (client; RFC 9112,
    /// 3.2.4).
    #[error(
        "bad request: the request target * is for OPTIONS only (RFC 9112, 3.2.4), not \
         {0}; calls go to /r/{{app}}/{{route}} or /invoke/{{app}}/{{function}}"
    )]
    AsteriskNotOptions(String),
    /// The request URL (scheme + `://` + host + path and query) is longer than a runner
    /// takes (client).
    #[error("request URL of {len} bytes is longer than the limit of {max}")]
    UriTooLong { len: usize, max: usize },
    /// The client stopped sending its request body before its end (client).
    #[error(
        "the request body stalled: nothing arrived for {0:?}; send the body without pauses that long"
    )]
    BodyStalled(Duration),
    /// A transfer coding other than `chunked` (`gzip, chunked`): hyper takes the chunking
    /// off, and the rest would reach the function still encoded with nothing to say so
    /// (client; RFC 9112, 6.1).
    #[error(
        "transfer coding {0:?} is not supported; send the body with chunked alone, or name its \
         encoding in Content-Encoding"
    )]
    UnsupportedTransferCoding(String),
    /// More request headers than a runner takes (client).
    #[error("{count} request headers are more than the limit of {max}")]
    TooManyHeaders { count: usize, max: usize },
    /// No runner took the call before the placer deadline (capacity; retry later).
    /// `draining`: every runner of the group that could be asked was draining (stopping, or
    /// scaled down), which says more than "room" (a rolling restart of a group's last
    /// runners, say).
    #[error(
        "no runner had room for the call within {waited:?} ({attempts} attempts){}; retry later",
        if *.draining { ": every runner of its group is draining (stopping or scaled down)" } else { "" }
    )]
    NoCapacity {
        waited: Duration,
        attempts: u32,
        draining: bool,
    },
    /// When the placer deadline came, no runner of the group could be asked: it has none,
    /// or every one is unreachable or ejected (runners or the network; retry later).
    #[error("no runner of LB group {group} is reachable after {waited:?}: {why}; retry later")]
    NoRunnerReachable {
        group: String,
        why: String,
        waited: Duration,
    },
    /// No runner of the group could ever hold the function's memory (configuration).
    #[error(
        "the function needs {memory_mb} MB and no runner of LB group {group} has that much \
         memory in all; lower its memory_mb or give the group larger runners"
    )]
    NoRunnerLargeEnough { memory_mb: u64, group: String },
    /// A runner says the call itself is invalid, so none will run it (configuration).
    #[error("runner {runner} refuses this function: {details}")]
    Unrunnable { runner: String, details: String },
    /// The call passed its timeout (function); with the runner's word on why, when it has
    /// one (the instance was still starting, the FDK said the deadline passed).
    #[error("the function did not answer within its timeout of {0:?}{why}", why = why_suffix(.1))]
    Timeout(Duration, String),
    /// The call's timeout passed before a runner could start it: a runner refused it for
    /// its deadline had passed on the way (a function whose timeout is a few milliseconds,
    /// or `FN_PLACER_WAIT_SHARE` 1). Not the function's definition, which a 500 would blame.
    #[error(
        "the call's timeout of {timeout:?} passed before a runner could start it ({attempts} \
         attempts); give the function a longer timeout"
    )]
    TimedOutUnplaced { timeout: Duration, attempts: u32 },
    /// The runner failed after committing the call (function or runner); never re-placed.
    #[error("the call failed on runner {runner}: {details}")]
    RunnerFailed { runner: String, details: String },
    /// The lb-agent is shutting down.
    #[error("shutting down; retry on another LB")]
    ShuttingDown,
    /// The request arrived on a connection being closed to make room for new ones.
    #[error(
        "this connection is being closed to make room for new ones (FN_MAX_CONNECTIONS); \
         retry on a new connection"
    )]
    ConnectionClosing,
}

/// `: why`, or nothing for no reason given.
fn why_suffix(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(": {why}")
    }
}

/// Why a target of the form `host:port` names no function: CONNECT's asks for a tunnel;
/// with another method it is a malformed request (RFC 9112, 3.2.3: the form is CONNECT's).
fn authority_form_reason(method: &str) -> String {
    if method == "CONNECT" {
        "CONNECT host:port asks for a tunnel, and the lb-agent is no proxy".to_owned()
    } else {
        format!("a target of the form host:port is CONNECT's alone, and {method} needs a path")
    }
}

impl CallError {
    pub fn status(&self) -> StatusCode {
        match self {
            CallError::NotFound(_) | CallError::NoTunnel { .. } => StatusCode::NOT_FOUND,
            CallError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            CallError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            CallError::BadRequest(_)
            | CallError::UserinfoInTarget
            | CallError::UnsupportedScheme(_)
            | CallError::AsteriskNotOptions(_) => StatusCode::BAD_REQUEST,
            CallError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            CallError::BodyStalled(_) => StatusCode::REQUEST_TIMEOUT,
            CallError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            CallError::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            CallError::NoCapacity { .. }
            | CallError::NoRunnerReachable { .. }
            | CallError::ShuttingDown
            | CallError::ConnectionClosing
            | CallError::NoRunnerLargeEnough { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Unrunnable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            CallError::Timeout(..) | CallError::TimedOutUnplaced { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            CallError::RunnerFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The client's own doing (a request too large or malformed, a body that stalled): its
    /// answer says so, and a metric counts it; the log keeps it at debug level, where a
    /// client sending such requests by the thousand cannot fill it.
    pub fn is_clients(&self) -> bool {
        matches!(
            self,
            CallError::TooLarge { .. }
                | CallError::BadRequest(_)
                | CallError::UserinfoInTarget
                | CallError::UnsupportedScheme(_)
                | CallError::AsteriskNotOptions(_)
                | CallError::UnsupportedTransferCoding(_)
                | CallError::UriTooLong { .. }
                | CallError::TooManyHeaders { .. }
                | CallError::BodyStalled(_)
        )
    }

    /// Seconds after which a retry can succeed, where one can.
    fn retry_after(&self) -> Option<u64> {
        match self {
            CallError::NoCapacity { .. }
            | CallError::NoRunnerReachable { .. }
            | CallError::ShuttingDown
            | CallError::ConnectionClosing => Some(1),
            _ => None,
        }
    }

    /// What the client is told: the `Display` text (what the LB logs), less the runner's
    /// address, which is the operator's to know and not the caller's.
    pub fn client_message(&self) -> String {
        match self {
            CallError::Unrunnable { details, .. } => {
                format!("runners refuse this function: {details}")
            }
            CallError::RunnerFailed { details, .. } => {
                format!("the call failed after a runner took it: {details}")
            }
            other => other.to_string(),
        }
    }

    /// The JSON error response: `{"error": {"message": "..."}}`.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut response = json_error(self.status(), &self.client_message());
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let CallError::MethodNotAllowed { allow, .. } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// A JSON error body with `status`.
pub fn json_error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = format!("{{\"error\":{{\"message\":{}}}}}\n", json_string(message));
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Encodes `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_clients_own_errors_are_the_clients() {
        assert!(CallError::TooLarge { limit: 1 }.is_clients());
        assert!(CallError::BodyStalled(Duration::from_secs(1)).is_clients());
        assert!(!CallError::Timeout(Duration::from_secs(1), String::new()).is_clients());
        assert!(!CallError::ShuttingDown.is_clients());
        let failed = CallError::RunnerFailed {
            runner: "r".into(),
            details: "d".into(),
        };
        assert!(!failed.is_clients());
    }

    #[test]
    fn statuses_and_retry_after() {
        let busy = CallError::NoCapacity {
            waited: Duration::from_secs(1),
            attempts: 3,
            draining: false,
        }
        .to_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        let timeout = CallError::Timeout(Duration::from_secs(1), String::new()).to_response();
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(timeout.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(
            CallError::TooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    /// A 504 carries the runner's word on why, when it gives one (its instance was still
    /// starting), after the LB's own.
    #[test]
    fn a_timeout_says_why_when_the_runner_does() {
        let plain = CallError::Timeout(Duration::from_secs(2), String::new());
        assert_eq!(
            plain.client_message(),
            "the function did not answer within its timeout of 2s"
        );
        let starting = CallError::Timeout(Duration::from_secs(2), "it was starting".into());
        assert_eq!(
            starting.client_message(),
            "the function did not answer within its timeout of 2s: it was starting"
        );
    }

    /// A 503 for want of room says when every runner that could be asked drains.
    #[test]
    fn no_capacity_says_when_every_runner_drains() {
        let message = |draining| {
            CallError::NoCapacity {
                waited: Duration::from_secs(1),
                attempts: 0,
                draining,
            }
            .to_string()
        };
        assert_eq!(
            message(false),
            "no runner had room for the call within 1s (0 attempts); retry later"
        );
        assert_eq!(
            message(true),
            "no runner had room for the call within 1s (0 attempts): every runner of its \
             group is draining (stopping or scaled down); retry later"
        );
    }

    #[tokio::test]
    async fn a_client_is_not_told_the_runners_address() {
        let failures = [
            (
                CallError::RunnerFailed {
                    runner: "10.0.0.7:9190".into(),
                    details: "Crashed: exit status 3".into(),
                },
                "Crashed: exit status 3",
            ),
            (
                CallError::Unrunnable {
                    runner: "10.0.0.7:9190".into(),
                    details: "command not found".into(),
                },
                "command not found",
            ),
        ];
        for (failure, details) in failures {
            assert!(failure.to_string().contains("10.0.0.7:9190"), "logged");
            let body = failure
                .to_response()
                .into_body()
                .collect()
                .await
                .expect("an in-memory body")
                .to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(!body.contains("10.0.0.7"), "{body}");
            assert!(body.contains(details), "{body} should say {details}");
        }
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
