//! [`CallSpec`]: one function call as the daemons see it, validated at the wire edge.
//!
//! The LB builds a `CallSpec` from its catalog and the HTTP request and sends it as a wire
//! [`crate::runner::Call`]; the runner turns the wire message back into a
//! `CallSpec` with [`TryFrom`], which is where untrusted input is checked. Nothing past this
//! module looks at prost types for a call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::runner;

/// Longest id, app, function, route or group name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// Longest request URL accepted.
pub const MAX_URL_LEN: usize = 8 * 1024;
/// Most request headers accepted on one call.
pub const MAX_HEADERS: usize = 256;
/// Most config entries accepted on one call.
pub const MAX_CONFIG_ENTRIES: usize = 256;
/// Most words in a function's command (the program and its arguments).
pub const MAX_COMMAND_ARGS: usize = 1024;
/// Longest call timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most calls one instance may take at once.
pub const MAX_CONCURRENCY: u32 = 1000;
/// Most memory in MB anything is said to have or need: a function (the catalog's
/// `memory_mb`, a call's), a runner (`FN_MAX_MEMORY_MB`). 2^40 MB, an exabyte, is more than
/// any machine has, and sums of a runner's reservations stay far from `u64::MAX`.
pub const MAX_MEMORY_MB: u64 = 1 << 40;

/// A validated function call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallSpec {
    /// Unique id, echoed to the client as `Fn-Call-Id`.
    pub id: String,
    pub app: String,
    pub function: String,
    pub route: String,
    pub method: Method,
    pub request_url: String,
    /// The client's request headers.
    pub headers: HeaderMap,
    /// Memory of one instance of the function, which the first call on an instance
    /// reserves on a runner.
    pub memory_mb: u64,
    /// Calls one instance takes at once (1 ..= [`MAX_CONCURRENCY`]).
    pub concurrency: u32,
    /// The call's time budget when this spec was made: the function's timeout at the LB;
    /// at the runner, the budget the LB had left when it sent the call.
    pub timeout: Duration,
    /// How long a hot instance of this function may stay idle.
    pub idle_timeout: Duration,
    /// Process driver: the command and its arguments, relative to the functions directory.
    pub command: Vec<String>,
    /// Docker driver: the container image.
    pub image: Option<String>,
    /// Passed to the function as environment variables.
    pub config: BTreeMap<String, String>,
    pub lb_group: String,
    /// When the budget runs out, on this process's own monotonic clock: arrival plus the
    /// timeout at the LB, receipt plus the budget at the runner. Budgets travel as durations
    /// (as gRPC's `grpc-timeout` does), so no two machines' clocks ever need to agree.
    pub deadline: Instant,
}

impl CallSpec {
    /// The identity used for hot-instance reuse and consistent hashing: calls with the same
    /// key can share an instance.
    pub fn function_key(&self) -> String {
        format!("{}/{}", self.app, self.function)
    }

    /// Time left until the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The deadline as a wall-clock time on this machine's clock (for `Fn-Deadline`).
    pub fn wall_deadline(&self) -> SystemTime {
        SystemTime::now() + self.remaining()
    }
}

/// Why a wire `Call` was rejected. The call is the client's (the LB's) fault; retrying the
/// same call elsewhere will fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCall {
    #[error("field `{0}` is missing or empty")]
    Missing(&'static str),
    #[error("field `{field}` is too long ({len} > {max})")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn name(field: &'static str, value: String, max: usize) -> Result<String, InvalidCall> {
    check_name(field, &value, max)?;
    Ok(value)
}

fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), InvalidCall> {
    if value.is_empty() {
        return Err(InvalidCall::Missing(field));
    }
    if value.len() > max {
        return Err(InvalidCall::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    // ASCII (nearly every name) needs no UTF-8 decoding: its controls are its C0 and DEL.
    let control = if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err(InvalidCall::Invalid {
            field,
            reason: "contains control characters".into(),
        });
    }
    Ok(())
}

/// The parts of a call that come from its function's definition, as the catalog holds them.
#[derive(Debug, Clone, Copy)]
pub struct Definition<'a> {
    /// Empty: the function has no route (called by name only).
    pub route: &'a str,
    pub command: &'a [String],
    pub image: Option<&'a str>,
    pub config: &'a BTreeMap<String, String>,
}

impl Definition<'_> {
    /// Checks a function's definition as a runner checks every call of it: the LB's catalog
    /// refuses at load what every runner would refuse on every call (each call would fail).
    ///
    /// # Errors
    /// The field at fault and why.
    pub fn check(&self) -> Result<(), InvalidCall> {
        if !self.route.is_empty() {
            check_name("route", self.route, MAX_NAME_LEN)?;
        }
        if self.command.is_empty() && self.image.is_none_or(str::is_empty) {
            return Err(InvalidCall::Missing("command or image"));
        }
        if self.command.len() > MAX_COMMAND_ARGS {
            return Err(InvalidCall::TooLong {
                field: "command",
                len: self.command.len(),
                max: MAX_COMMAND_ARGS,
            });
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid("command", "contains a NUL byte"));
        }
        if let Some(program) = self.command.first() {
            if program.is_empty() {
                return Err(invalid("command", "the program name is empty"));
            }
            // A runner resolves the program inside its functions directory and refuses any
            // other path on every call.
            if program.starts_with('/') {
                return Err(invalid(
                    "command",
                    format!(
                        "{program:?} is an absolute path; give a path relative to the \
                         functions directory"
                    ),
                ));
            }
            if program.split('/').any(|part| part == "..") {
                return Err(invalid(
                    "command",
                    format!(
                        "{program:?} contains `..`; it must stay inside the functions directory"
                    ),
                ));
            }
        }
        if let Some(image) = self.image
            && !image.is_empty()
        {
            check_name("image", image, MAX_NAME_LEN)?;
        }
        if self.config.len() > MAX_CONFIG_ENTRIES {
            return Err(InvalidCall::TooLong {
                field: "config",
                len: self.config.len(),
                max: MAX_CONFIG_ENTRIES,
            });
        }
        for (k, v) in self.config {
            if !valid_env_name(k) {
                return Err(invalid(
                    "config",
                    format!("{k:?} is not a valid variable name"),
                ));
            }
            if v.contains('\0') {
                return Err(invalid(
                    "config",
                    format!("value of {k} contains a NUL byte"),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidCall {
    InvalidCall::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks an environment variable name: what a POSIX shell would accept.
fn valid_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl TryFrom<runner::Call> for CallSpec {
    type Error = InvalidCall;

    fn try_from(call: runner::Call) -> Result<Self, Self::Error> {
        let id = name("id", call.id, MAX_NAME_LEN)?;
        let app = name("app", call.app, MAX_NAME_LEN)?;
        let function = name("function", call.function, MAX_NAME_LEN)?;
        Definition {
            route: &call.route,
            command: &call.command,
            image: Some(call.image.as_str()),
            config: &call.config,
        }
        .check()?;
        let method = Method::from_bytes(call.method.as_bytes())
            .map_err(|_| invalid("method", format!("not an HTTP method: {:?}", call.method)))?;
        let request_url = name("request_url", call.request_url, MAX_URL_LEN)?;

        if call.headers.len() > MAX_HEADERS {
            return Err(InvalidCall::TooLong {
                field: "headers",
                len: call.headers.len(),
                max: MAX_HEADERS,
            });
        }
        let mut headers = HeaderMap::with_capacity(call.headers.len());
        // The values are copied into one buffer of their own: as slices of the received
        // message they would hold the whole receive buffer (and any body that came with the
        // call) for as long as the call runs.
        let mut copy = packer(call.headers.iter().map(|h| h.value.len()).sum());
        for h in call.headers {
            let hname = HeaderName::from_bytes(&h.name).map_err(|_| {
                let shown = String::from_utf8_lossy(&h.name);
                invalid("headers", format!("bad header name {shown:?}"))
            })?;
            let hvalue = HeaderValue::from_maybe_shared(copy(&h.value))
                .map_err(|_| invalid("headers", format!("bad value for header {hname}")))?;
            headers.append(hname, hvalue);
        }

        if call.memory_mb == 0 {
            return Err(InvalidCall::Missing("memory_mb"));
        }
        if call.memory_mb > MAX_MEMORY_MB {
            return Err(invalid(
                "memory_mb",
                format!("{} is more than {MAX_MEMORY_MB}", call.memory_mb),
            ));
        }
        if call.timeout_ms == 0 {
            return Err(InvalidCall::Missing("timeout_ms"));
        }
        // The budget left when the LB sent the call; it starts counting now, on this clock.
        let timeout = Duration::from_millis(call.timeout_ms);
        if timeout > MAX_TIMEOUT {
            return Err(invalid(
                "timeout_ms",
                format!("longer than {MAX_TIMEOUT:?}"),
            ));
        }
        // An instance idle this long is stopped; the catalog allows at most an hour, and a
        // longer one would hold the instance's memory as good as for ever.
        let idle_timeout = Duration::from_millis(call.idle_timeout_ms);
        if idle_timeout > MAX_TIMEOUT {
            return Err(invalid(
                "idle_timeout_ms",
                format!("longer than {MAX_TIMEOUT:?}"),
            ));
        }
        let concurrency = match call.concurrency {
            0 => 1,
            n if n > MAX_CONCURRENCY => {
                return Err(invalid(
                    "concurrency",
                    format!("{n} is more than {MAX_CONCURRENCY}"),
                ));
            }
            n => n,
        };

        let image = (!call.image.is_empty()).then_some(call.image);
        let lb_group = name("lb_group", call.lb_group, MAX_NAME_LEN)?;
        // `deadline_unix_ms` is the LB's clock: information only, never a bound here.
        let deadline = Instant::now() + timeout;

        Ok(CallSpec {
            id,
            app,
            function,
            route: call.route,
            method,
            request_url,
            headers,
            memory_mb: call.memory_mb,
            concurrency,
            timeout,
            idle_timeout,
            command: call.command,
            image,
            config: call.config,
            lb_group,
            deadline,
        })
    }
}

/// Copies values, `total` bytes in all, into one buffer, handing each out as its own `Bytes`:
/// one allocation for all of them, and clones that count a reference instead of allocating.
fn packer(total: usize) -> impl FnMut(&[u8]) -> bytes::Bytes {
    let mut buffer = bytes::BytesMut::with_capacity(total);
    move |value| {
        buffer.extend_from_slice(value);
        buffer.split().freeze()
    }
}

/// `headers` for the wire, in order, their names and values in one buffer (see `packer`:
/// encoding a value clones it).
pub fn wire_headers(headers: &HeaderMap) -> Vec<runner::Header> {
    let names: usize = headers.iter().map(|(name, _)| name.as_str().len()).sum();
    let mut copy = packer(names + headers.values().map(HeaderValue::len).sum::<usize>());
    headers
        .iter()
        .map(|(name, value)| runner::Header {
            name: copy(name.as_str().as_bytes()),
            value: copy(value.as_bytes()),
        })
        .collect()
}

/// `d` in whole milliseconds, as the wire's durations and times are (saturating).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a call is sent with that depends on the moment it leaves: the budget left and the
/// deadline on this machine's wall clock, from one reading of the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendTimes {
    pub(crate) timeout_ms: u64,
    pub(crate) deadline_unix_ms: u64,
}

impl SendTimes {
    pub(crate) fn now(spec: &CallSpec) -> Self {
        let left = spec.remaining();
        SendTimes {
            // Rounded up, so that a call with time left is never sent as one without; and at
            // least 1 ms, since 0 on the wire means "missing": a call whose time ran out
            // on the way then times out at the runner (504) rather than being refused as
            // malformed.
            timeout_ms: millis(left.saturating_add(Duration::from_nanos(999_999))).max(1),
            deadline_unix_ms: millis(
                (SystemTime::now() + left)
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO),
            ),
        }
    }
}

/// The wire `Call` of `spec`, sent at `times`.
pub(crate) fn wire_call(spec: &CallSpec, times: SendTimes) -> runner::Call {
    runner::Call {
        id: spec.id.clone(),
        app: spec.app.clone(),
        function: spec.function.clone(),
        route: spec.route.clone(),
        method: spec.method.to_string(),
        request_url: spec.request_url.clone(),
        headers: wire_headers(&spec.headers),
        memory_mb: spec.memory_mb,
        timeout_ms: times.timeout_ms,
        idle_timeout_ms: millis(spec.idle_timeout),
        command: spec.command.clone(),
        image: spec.image.clone().unwrap_or_default(),
        config: spec.config.clone(),
        lb_group: spec.lb_group.clone(),
        deadline_unix_ms: times.deadline_unix_ms,
        concurrency: spec.concurrency,
    }
}

/// The wire `Call` of a spec sent now. The LB does not build one: it encodes the spec
/// straight into the stream ([`crate::framing::EncodeBody::opening_with`]), to the same
/// bytes as prost's encoding of this.
impl From<&CallSpec> for runner::Call {
    fn from(spec: &CallSpec) -> Self {
        wire_call(spec, SendTimes::now(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire() -> runner::Call {
        runner::Call {
            id: "01J".into(),
            app: "demo".into(),
            function: "echo".into(),
            route: "/echo".into(),
            method: "POST".into(),
            request_url: "http://lb/r/demo/echo?x=1".into(),
            headers: vec![runner::Header {
                name: "content-type".into(),
                value: "text/plain".into(),
            }],
            memory_mb: 128,
            timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            command: vec!["fn-echo".into()],
            image: String::new(),
            config: [("GREETING".to_string(), "hi".to_string())].into(),
            lb_group: "default".into(),
            deadline_unix_ms: 1_900_000_000_000,
            concurrency: 1,
        }
    }

    #[test]
    fn concurrency_0_is_one_call_per_instance_and_travels_as_given_otherwise() {
        let mut call = wire();
        call.concurrency = 0;
        let spec = CallSpec::try_from(call).expect("valid");
        assert_eq!(
            spec.concurrency, 1,
            "an LB without the field means Fn's semantics"
        );
        let mut call = wire();
        call.concurrency = 8;
        let spec = CallSpec::try_from(call).expect("valid");
        assert_eq!(spec.concurrency, 8);
        assert_eq!(runner::Call::from(&spec).concurrency, 8);
    }

    #[test]
    fn memory_over_the_bound_is_invalid() {
        let mut call = wire();
        call.memory_mb = MAX_MEMORY_MB;
        assert!(CallSpec::try_from(call).is_ok());
        let mut call = wire();
        call.memory_mb = 1 << 63;
        let refused = CallSpec::try_from(call).expect_err("more than any runner has");
        assert!(
            matches!(
                refused,
                InvalidCall::Invalid {
                    field: "memory_mb",
                    ..
                }
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn wire_headers_carry_every_value_in_order_and_back() {
        let mut headers = HeaderMap::new();
        headers.append("x-many", HeaderValue::from_static("a"));
        headers.append("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-many", HeaderValue::from_static(""));
        headers.append("x-many", HeaderValue::from_static("ccc"));
        let wired = wire_headers(&headers);
        let got: Vec<(&[u8], &[u8])> = wired.iter().map(|h| (&h.name[..], &h.value[..])).collect();
        assert_eq!(
            got,
            [
                (&b"x-many"[..], &b"a"[..]),
                (&b"x-many"[..], &b""[..]),
                (&b"x-many"[..], &b"ccc"[..]),
                (&b"content-type"[..], &b"text/plain"[..]),
            ]
        );
        let mut call = wire();
        call.headers = wired;
        let spec = CallSpec::try_from(call).expect("valid");
        assert_eq!(spec.headers, headers);
    }

    #[test]
    fn a_spec_holds_no_slice_of_the_message_it_came_in() {
        let message = bytes::Bytes::from(vec![b'v'; 64 * 1024]);
        let mut call = wire();
        call.headers = vec![runner::Header {
            name: "x-big".into(),
            value: message.slice(..16),
        }];
        let spec = CallSpec::try_from(call).expect("valid");
        assert_eq!(spec.headers["x-big"].as_bytes(), &message[..16]);
        assert!(
            message.is_unique(),
            "the spec keeps the whole received buffer alive"
        );
    }

    #[test]
    fn valid_call_round_trips() {
        let spec = CallSpec::try_from(wire()).expect("valid call");
        assert_eq!(spec.function_key(), "demo/echo");
        assert_eq!(spec.headers["content-type"], "text/plain");
        let mut back = runner::Call::from(&spec);
        // The budget sent on is what is left of it: at most what came, barely less.
        assert!(
            back.timeout_ms <= 30_000 && back.timeout_ms > 29_000,
            "{back:?}"
        );
        back.timeout_ms = 30_000;
        // The wall-clock deadline is this machine's own reading of the budget.
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        assert!(
            back.deadline_unix_ms.abs_diff(now_ms + 30_000) < 1_000,
            "{back:?}"
        );
        back.deadline_unix_ms = wire().deadline_unix_ms;
        assert_eq!(back, wire());
    }

    /// A call whose budget ran out before it was sent goes out with the least budget the
    /// wire can carry, so the runner times it out rather than refusing it as malformed.
    #[test]
    fn a_call_sent_with_no_time_left_carries_one_millisecond() {
        let mut spec = CallSpec::try_from(wire()).expect("valid");
        spec.deadline = Instant::now()
            .checked_sub(Duration::from_millis(5))
            .unwrap_or_else(Instant::now);
        assert_eq!(spec.remaining(), Duration::ZERO);
        let sent = runner::Call::from(&spec);
        assert_eq!(sent.timeout_ms, 1);
        let received = CallSpec::try_from(sent).expect("still a valid call");
        assert!(received.timeout <= Duration::from_millis(1));
    }

    /// The LB's clock does not bound the call: a minute behind, a minute ahead, the year
    /// 2099 or nothing at all, the budget is `timeout_ms` from receipt.
    #[test]
    fn the_budget_counts_from_receipt_whatever_the_senders_clock_says() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        for deadline_unix_ms in [now_ms - 60_000, now_ms + 60_000, 4_070_908_800_000, 0] {
            let mut call = wire();
            call.timeout_ms = 500;
            call.deadline_unix_ms = deadline_unix_ms;
            let spec = CallSpec::try_from(call).expect("valid whatever the clock says");
            let left = spec.remaining();
            assert!(
                left <= Duration::from_millis(500) && left > Duration::from_millis(400),
                "deadline_unix_ms {deadline_unix_ms}: {left:?} left"
            );
            let wall = spec
                .wall_deadline()
                .duration_since(UNIX_EPOCH)
                .expect("after 1970");
            assert!(wall.as_millis().abs_diff(u128::from(now_ms) + 500) < 200);
        }
    }

    #[test]
    fn rejects_each_broken_field() {
        type Breaker = fn(&mut runner::Call);
        let cases: Vec<(Breaker, &str)> = vec![
            (|c| c.id.clear(), "id"),
            (|c| c.app = "a\nb".into(), "app"),
            (|c| c.method = "GE T".into(), "method"),
            (|c| c.memory_mb = 0, "memory_mb"),
            (|c| c.timeout_ms = 0, "timeout_ms"),
            (|c| c.timeout_ms = 10 * 3600 * 1000, "timeout_ms"),
            (|c| c.idle_timeout_ms = u64::MAX, "idle_timeout_ms"),
            (|c| c.concurrency = MAX_CONCURRENCY + 1, "concurrency"),
            (|c| c.command.clear(), "command or image"),
            (|c| c.command = vec![String::new()], "command"),
            (|c| c.command = vec!["/usr/bin/env".into()], "command"),
            (|c| c.command = vec!["bin/../../x".into()], "command"),
            (
                |c| c.command = vec!["fn-echo".into(); MAX_COMMAND_ARGS + 1],
                "command",
            ),
            (
                |c| {
                    c.config.insert("1BAD".into(), "x".into());
                },
                "config",
            ),
            (|c| c.lb_group.clear(), "lb_group"),
            (
                |c| {
                    c.headers.push(runner::Header {
                        name: "bad name".into(),
                        value: bytes::Bytes::new(),
                    })
                },
                "headers",
            ),
        ];
        for (breaker, field) in cases {
            let mut call = wire();
            breaker(&mut call);
            let err = CallSpec::try_from(call).expect_err(field);
            assert!(
                err.to_string().contains(field),
                "error {err} should name {field}"
            );
        }
    }

    /// Text of every kind a peer might send: plausible names, arbitrary Unicode (control
    /// characters included), and lengths around the limits.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9/_.-]{0,16}",
            2 => ".{0,24}",
            1 => "[a-z]{250,260}",
            1 => Just(String::new()),
        ]
    }

    fn wire_header() -> impl Strategy<Value = runner::Header> {
        (
            prop_oneof![
                4 => "[a-z][a-z0-9-]{0,12}".prop_map(String::into_bytes),
                1 => ".{0,12}".prop_map(String::into_bytes),
                1 => prop::collection::vec(any::<u8>(), 0..12),
            ],
            prop_oneof![
                4 => "[ -~]{0,16}".prop_map(String::into_bytes),
                1 => prop::collection::vec(any::<u8>(), 0..16),
            ],
        )
            .prop_map(|(name, value)| runner::Header {
                name: name.into(),
                value: value.into(),
            })
    }

    /// Mostly `valid`, sometimes anything.
    fn mostly(valid: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![4 => Just(valid.to_owned()), 1 => text()]
    }

    /// Any wire call, valid or not: each field is usually a valid value and sometimes
    /// anything, so both branches of validation are exercised on every field.
    fn any_wire_call() -> impl Strategy<Value = runner::Call> {
        let names = (
            mostly("01J"),
            mostly("demo"),
            mostly("echo"),
            mostly("/echo"),
            mostly("http://lb/r/demo/echo"),
            prop_oneof![3 => Just(String::new()), 1 => text()],
            mostly("default"),
        );
        let numbers = (
            prop_oneof![4 => 1u64..5000, 1 => Just(0u64), 1 => any::<u64>()],
            prop_oneof![4 => 1u64..=3_600_000, 1 => Just(0u64), 1 => any::<u64>()],
            prop_oneof![4 => 0u64..=3_600_000, 1 => any::<u64>()],
            prop_oneof![4 => 1u64..4_000_000_000_000, 1 => Just(0u64), 1 => any::<u64>()],
            prop_oneof![4 => 0u32..=4, 1 => any::<u32>()],
        );
        let lists = (
            prop::collection::vec(wire_header(), 0..3),
            prop_oneof![
                3 => Just(vec!["fn-echo".to_owned()]),
                1 => prop::collection::vec(prop_oneof!["[a-z-]{0,8}", ".{0,8}"], 0..3),
            ],
            prop::collection::btree_map(
                prop_oneof![6 => "[A-Z_][A-Z0-9_]{0,6}", 1 => ".{0,6}"],
                prop_oneof![6 => "[ -~]{0,8}", 1 => ".{0,8}"],
                0..3,
            ),
            prop_oneof![3 => Just("POST".to_owned()), 1 => "[A-Z]{1,8}", 1 => ".{0,6}"],
        );
        (names, numbers, lists).prop_map(
            |(
                (id, app, function, route, request_url, image, lb_group),
                (memory_mb, timeout_ms, idle_timeout_ms, deadline_unix_ms, concurrency),
                (headers, command, config, method),
            )| runner::Call {
                id,
                app,
                function,
                route,
                method,
                request_url,
                headers,
                memory_mb,
                timeout_ms,
                idle_timeout_ms,
                command,
                image,
                config: config.into_iter().collect(),
                lb_group,
                deadline_unix_ms,
                concurrency,
            },
        )
    }

    fn valid_name(s: &str, max: usize) -> bool {
        !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
    }

    proptest! {
        // About one generated call in seven is valid: run enough to cover both branches well.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        // Whatever a peer sends, validation never panics; what it accepts keeps every
        // documented bound, and converting it back to the wire and validating again gives
        // the same spec (no information is lost or invented on the way).
        #[test]
        fn any_wire_call_is_rejected_or_accepted_within_the_bounds(call in any_wire_call()) {
            if let Ok(spec) = CallSpec::try_from(call) {
                for (field, value, max) in [
                    ("id", &spec.id, MAX_NAME_LEN),
                    ("app", &spec.app, MAX_NAME_LEN),
                    ("function", &spec.function, MAX_NAME_LEN),
                    ("lb_group", &spec.lb_group, MAX_NAME_LEN),
                    ("request_url", &spec.request_url, MAX_URL_LEN),
                ] {
                    prop_assert!(valid_name(value, max), "{field} {value:?} accepted");
                }
                prop_assert!(spec.route.is_empty() || valid_name(&spec.route, MAX_NAME_LEN));
                prop_assert!(spec.memory_mb > 0);
                prop_assert!((1..=MAX_CONCURRENCY).contains(&spec.concurrency));
                prop_assert!(!spec.timeout.is_zero() && spec.timeout <= MAX_TIMEOUT);
                prop_assert!(spec.remaining() <= spec.timeout);
                prop_assert!(spec.idle_timeout <= MAX_TIMEOUT);
                prop_assert!(!spec.command.is_empty() || spec.image.is_some());
                prop_assert!(spec.command.iter().all(|a| !a.contains('\0')));
                prop_assert!(spec.command.first().is_none_or(|p| !p.is_empty()));
                prop_assert!(spec.command.first().is_none_or(|p| !p.starts_with('/')
                    && !p.split('/').any(|part| part == "..")));
                prop_assert!(spec.image.as_ref().is_none_or(|i| valid_name(i, MAX_NAME_LEN)));
                prop_assert!(spec.headers.len() <= MAX_HEADERS);
                prop_assert!(spec.config.len() <= MAX_CONFIG_ENTRIES);
                for (k, v) in &spec.config {
                    prop_assert!(valid_env_name(k) && !v.contains('\0'), "config {k:?}={v:?}");
                }
                // The budget shrinks by the time the round trip took; all else is equal.
                let mut again = CallSpec::try_from(runner::Call::from(&spec));
                if let Ok(again) = again.as_mut() {
                    prop_assert!(again.timeout <= spec.timeout);
                    prop_assert!(spec.timeout - again.timeout < Duration::from_secs(1));
                    again.timeout = spec.timeout;
                    again.deadline = spec.deadline;
                }
                prop_assert_eq!(again, Ok(spec));
            }
        }

        // Whatever call is accepted, the LB's encoding of the message that opens its stream
        // is byte for byte prost's encoding of the same call (the same moment's times).
        #[test]
        fn any_accepted_call_opens_its_stream_as_prost_encodes_it(
            call in any_wire_call(),
            timeout_ms in any::<u64>(),
            deadline_unix_ms in any::<u64>(),
        ) {
            if let Ok(spec) = CallSpec::try_from(call) {
                let times = SendTimes { timeout_ms, deadline_unix_ms };
                prop_assert_eq!(
                    crate::opening::tests::opening(&spec, times),
                    crate::opening::tests::prost_opening(&spec, times)
                );
            }
        }

        // A control character anywhere in a name field is rejected, and the error names the
        // field.
        #[test]
        fn control_characters_in_names_are_rejected_naming_the_field(
            field in 0usize..5,
            at in 0usize..8,
            control in prop_oneof![Just('\n'), Just('\r'), Just('\0'), Just('\u{7f}'), Just('\u{85}')],
        ) {
            let mut call = wire();
            let (name, target): (&str, &mut String) = match field {
                0 => ("id", &mut call.id),
                1 => ("app", &mut call.app),
                2 => ("function", &mut call.function),
                3 => ("request_url", &mut call.request_url),
                _ => ("lb_group", &mut call.lb_group),
            };
            let at = target.char_indices().nth(at).map_or(target.len(), |(i, _)| i);
            target.insert(at, control);
            let err = CallSpec::try_from(call).expect_err("a control character was accepted");
            prop_assert!(err.to_string().contains(name), "{err} should name {name}");
        }
    }

    proptest! {
        // Any wire call either validates into a spec that converts back losslessly, or is
        // rejected with an error; it never panics.
        #[test]
        fn validation_never_panics_and_round_trips(
            id in ".{0,300}",
            app in "[a-z]{0,5}",
            method in "[A-Z]{0,8}",
            memory_mb in 0u64..5000,
            timeout_ms in 0u64..10_000_000,
            env_key in "[A-Za-z0-9_]{0,6}",
        ) {
            let mut call = wire();
            call.id = id;
            call.app = app;
            call.method = method;
            call.memory_mb = memory_mb;
            call.timeout_ms = timeout_ms;
            call.config = [(env_key, "v".to_string())].into();
            if let Ok(spec) = CallSpec::try_from(call.clone()) {
                prop_assert!(spec.memory_mb > 0);
                prop_assert!(!spec.id.is_empty() && spec.id.len() <= MAX_NAME_LEN);
                // The budget and the wall-clock deadline are re-read at sending time: the
                // budget can only have shrunk (by less than the test's own run time).
                let mut back = runner::Call::from(&spec);
                prop_assert!(back.timeout_ms <= call.timeout_ms);
                prop_assert!(call.timeout_ms - back.timeout_ms < 1_000);
                back.timeout_ms = call.timeout_ms;
                back.deadline_unix_ms = call.deadline_unix_ms;
                prop_assert_eq!(back, call);
            }
        }
    }
}
