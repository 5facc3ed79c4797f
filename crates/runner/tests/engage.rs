//! Service tests of the Engage protocol (issue 3, "Done when"): the [`RunnerService`] runs
//! in-process on `127.0.0.1:0` behind mutual TLS with the real `process` driver and the
//! example functions (`fn-echo`, `fn-hello`, `fn-sleep`, `fn-crash`, built by `cargo build
//! --workspace --bins`), and is driven through the generated gRPC client.
//!
//! As root, functions run as `nobody` (the runner's default), so every directory they need
//! is made traversable for it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use fn_protocol::runner::runner_protocol_client::RunnerProtocolClient;
use fn_protocol::runner::{
    self, CallAcknowledged, CallFinished, ClientMsg, DataFrame, ErrorKind, RefusalReason,
    RunnerMsg, RunnerStatus, TryCall, client_msg, runner_msg,
};
use fn_runner::driver::process::{FunctionUser, ProcessDriver, ProcessDriverConfig};
use fn_runner::driver::{
    BodyStream, Driver, DriverError, FunctionRequest, FunctionResponse, Instance, InstanceSpec,
};
use fn_runner::{EngageConfig, EngageFirst, Pool, RunnerService};
use fn_test_support::TestPki;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

/// Bound for any single message from the runner.
const RECV_BOUND: Duration = Duration::from_secs(20);
/// Bound for a condition polled through `Status` (capacity released, process gone).
const SETTLE_BOUND: Duration = Duration::from_secs(5);
const START_TIMEOUT: Duration = Duration::from_secs(10);
const MEMORY_MB: u64 = 128;

// ---------------------------------------------------------------------------------------
// Fixture: a runner in-process and a client.

/// A runner serving on loopback, and a client for it. Stops the server and kills idle
/// instances on drop.
struct Runner {
    client: RunnerProtocolClient<Channel>,
    address: String,
    pki: TestPki,
    service: RunnerService,
    pool: Arc<Pool>,
    /// Where the runner's metrics are registered.
    registry: Registry,
    stop: CancellationToken,
    _sockets: tempfile::TempDir,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop.cancel();
        self.pool.kill_idle();
    }
}

fn function_user() -> Option<FunctionUser> {
    nix::unistd::geteuid()
        .is_root()
        .then(|| FunctionUser::lookup("nobody").expect("user nobody"))
}

/// A temporary directory the function user can traverse and read.
fn shared_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tmp
}

/// The example functions' directory, checked to hold every one of them.
fn examples_dir() -> PathBuf {
    fn_test_support::functions_dir()
}

/// Starts a runner with `total_mb` of capacity running commands from `functions_dir`, and
/// waits until it answers `Status` over mutual TLS.
async fn start_runner(total_mb: u64, functions_dir: &Path) -> Runner {
    start_runner_with(total_mb, functions_dir, EngageConfig::default()).await
}

async fn start_runner_with(total_mb: u64, functions_dir: &Path, config: EngageConfig) -> Runner {
    let sockets = shared_tempdir();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(functions_dir, sockets.path().join("s"))
            .with_function_user(function_user()),
    )
    .expect("process driver");
    start_runner_on(Arc::new(driver), sockets, total_mb, config).await
}

/// A runner whose instances `driver` starts; `sockets` lives as long as the runner.
async fn start_runner_on(
    driver: Arc<dyn Driver>,
    sockets: tempfile::TempDir,
    total_mb: u64,
    config: EngageConfig,
) -> Runner {
    let pki = TestPki::new();
    let pool = Pool::new(driver, total_mb, START_TIMEOUT);
    let mut registry = Registry::default();
    let service = RunnerService::new(Arc::clone(&pool), config, &mut registry);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local address").to_string();
    let stop = CancellationToken::new();
    let incoming = fn_tls::grpc_incoming(&pki.mode(), listener).expect("tls server");
    // As the pure-runner serves it: Engage ahead of the router.
    let server = fn_runner::grpc_server()
        .layer(EngageFirst::new(service.clone().into_server()))
        .add_service(service.clone().into_server())
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(server);

    let mut client = connect(&pki, &address).await;
    // Readiness, and proof that mutual TLS works: an RPC answers.
    let status = client
        .status(())
        .await
        .expect("Status answers")
        .into_inner();
    assert_eq!(status.capacity_total_mb, total_mb);
    Runner {
        client,
        address,
        pki,
        service,
        pool,
        registry,
        stop,
        _sockets: sockets,
    }
}

/// A client on a new connection.
async fn connect(pki: &TestPki, address: &str) -> RunnerProtocolClient<Channel> {
    let channel = fn_tls::grpc_endpoint(&pki.mode(), address)
        .expect("endpoint")
        .with(|e| e.connect_timeout(Duration::from_secs(5)))
        .connect()
        .await
        .expect("connect");
    RunnerProtocolClient::new(channel)
}

impl Runner {
    /// Stops the server and waits for the idle instances to be cleaned up (their memory
    /// cgroups too), so that a passing test leaves nothing behind.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(SETTLE_BOUND, self.pool.shutdown())
            .await
            .expect("instances cleaned up");
    }

    async fn status(&self) -> RunnerStatus {
        self.client
            .clone()
            .status(())
            .await
            .expect("Status")
            .into_inner()
    }

    /// Polls `Status` until `done` holds, at most [`SETTLE_BOUND`].
    async fn status_until(&self, what: &str, done: impl Fn(&RunnerStatus) -> bool) -> RunnerStatus {
        let start = Instant::now();
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                start.elapsed() < SETTLE_BOUND,
                "{what}: not within {SETTLE_BOUND:?}; last status {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts that no call is in flight and, within [`SETTLE_BOUND`], no capacity is
    /// committed: an instance whose start a call launched before it ended holds its memory
    /// until the start ends.
    async fn assert_released(&self) {
        let s = self.status().await;
        assert_eq!(s.calls_in_flight, 0, "no call in flight: {s:?}");
        self.status_until("capacity released", |s| {
            (s.capacity_committed_mb, s.calls_in_flight) == (0, 0)
        })
        .await;
    }

    async fn open(&self) -> Engage {
        Engage::open(&self.client).await
    }

    /// A stream that sends `call` and its body's `frames` in one go, as the LB sends a call
    /// whose body it has whole, and ends its request half with them.
    async fn open_whole(&self, call: runner::Call, frames: Vec<DataFrame>) -> Engage {
        let mut messages = vec![ClientMsg {
            body: Some(client_msg::Body::TryCall(Box::new(TryCall {
                call: Some(call),
            }))),
        }];
        messages.extend(frames.into_iter().map(data_msg));
        let rx = self
            .client
            .clone()
            .engage(futures::stream::iter(messages))
            .await
            .expect("Engage stream opens")
            .into_inner();
        Engage { tx: None, rx }
    }

    /// One whole call: `TryCall`, the body in frames, the result read to `CallFinished`.
    async fn run(&self, call: runner::Call, body: Bytes) -> CallResult {
        let mut engage = self.open().await;
        engage.try_call(call).await;
        let ack = engage.ack().await;
        assert!(ack.committed, "call refused: {ack:?}");
        let sender = engage.sender();
        let feed = tokio::spawn(async move {
            for frame in frames(&body) {
                if sender.send(data_msg(frame)).await.is_err() {
                    break; // the runner ended the call; the result says why
                }
            }
        });
        let result = engage.result().await;
        feed.await.expect("body sender");
        result
    }
}

// ---------------------------------------------------------------------------------------
// One Engage stream, client side.

struct Engage {
    tx: Option<mpsc::Sender<ClientMsg>>,
    rx: Streaming<RunnerMsg>,
}

/// What the runner answered to a committed call.
#[derive(Debug, Default)]
struct CallResult {
    status: Option<u32>,
    headers: Vec<(String, Vec<u8>)>,
    body: BytesMut,
    saw_eof: bool,
    finished: Option<CallFinished>,
    /// `CallResultStart.cold_start_us`.
    cold_start_us: u64,
}

impl CallResult {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn kind(&self) -> ErrorKind {
        self.finished
            .as_ref()
            .map_or(ErrorKind::Unspecified, CallFinished::kind)
    }

    /// Asserts a successful call answered with `status`.
    fn assert_ok(&self, status: u32) {
        let finished = self.finished.as_ref().expect("CallFinished");
        assert!(
            finished.success && finished.kind() == ErrorKind::None,
            "call failed: {finished:?}"
        );
        assert_eq!(
            self.status,
            Some(status),
            "status; headers {:?}",
            self.headers
        );
        assert!(self.saw_eof, "the response body ends with an eof frame");
    }

    fn pid(&self) -> i32 {
        self.header("x-fn-pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("X-Fn-Pid header in {:?}", self.headers))
    }
}

fn data_msg(frame: DataFrame) -> ClientMsg {
    ClientMsg {
        body: Some(client_msg::Body::Data(frame)),
    }
}

impl Engage {
    async fn open(client: &RunnerProtocolClient<Channel>) -> Engage {
        let (tx, rx) = mpsc::channel(16);
        let response = client
            .clone()
            .engage(ReceiverStream::new(rx))
            .await
            .expect("Engage stream opens");
        Engage {
            tx: Some(tx),
            rx: response.into_inner(),
        }
    }

    fn sender(&self) -> mpsc::Sender<ClientMsg> {
        self.tx.clone().expect("stream not closed")
    }

    async fn send(&self, body: client_msg::Body) {
        self.sender()
            .send(ClientMsg { body: Some(body) })
            .await
            .expect("request stream open");
    }

    async fn try_call(&self, call: runner::Call) {
        self.send(client_msg::Body::TryCall(Box::new(TryCall {
            call: Some(call),
        })))
        .await;
    }

    async fn data(&self, data: impl Into<Bytes>, eof: bool) {
        self.send(client_msg::Body::Data(DataFrame {
            data: data.into(),
            eof,
        }))
        .await;
    }

    /// The next message from the runner; `None` when its half of the stream ended.
    async fn recv(&mut self) -> Option<runner_msg::Body> {
        let msg = tokio::time::timeout(RECV_BOUND, self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("no message from the runner within {RECV_BOUND:?}"))
            .expect("runner stream error");
        msg.map(|m| m.body.expect("RunnerMsg has a body"))
    }

    async fn ack(&mut self) -> CallAcknowledged {
        match self.recv().await {
            Some(runner_msg::Body::Acknowledged(ack)) => ack,
            other => panic!("expected CallAcknowledged, got {other:?}"),
        }
    }

    /// Reads `CallResultStart`, data frames and `CallFinished`.
    async fn result(&mut self) -> CallResult {
        let mut result = CallResult::default();
        self.result_into(&mut result).await;
        result
    }

    async fn result_into(&mut self, result: &mut CallResult) {
        loop {
            match self.recv().await {
                Some(runner_msg::Body::ResultStart(start)) => {
                    assert!(result.status.is_none(), "a second CallResultStart");
                    result.cold_start_us = start.cold_start_us;
                    let http = start.http.expect("CallResultStart has http");
                    result.status = Some(http.status_code);
                    result.headers = http
                        .headers
                        .into_iter()
                        .map(|h| {
                            (
                                String::from_utf8_lossy(&h.name).into_owned(),
                                h.value.to_vec(),
                            )
                        })
                        .collect();
                }
                Some(runner_msg::Body::Data(frame)) => {
                    assert!(result.status.is_some(), "data before CallResultStart");
                    assert!(!result.saw_eof, "data after the eof frame");
                    result.body.extend_from_slice(&frame.data);
                    result.saw_eof = frame.eof;
                }
                Some(runner_msg::Body::Finished(finished)) => {
                    result.finished = Some(finished);
                    return;
                }
                Some(runner_msg::Body::Acknowledged(ack)) => panic!("a second ack: {ack:?}"),
                None => panic!("stream ended without CallFinished: {result:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Calls and bodies.

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).expect("after the epoch");
    u64::try_from(since.as_millis()).expect("fits")
}

/// A valid call of `program` (one of the example functions) with `timeout`.
fn call(program: &str, timeout: Duration) -> runner::Call {
    let function = program.trim_start_matches("fn-").to_owned();
    runner::Call {
        id: format!("call-{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed)),
        app: "demo".into(),
        route: format!("/{function}"),
        request_url: format!("http://lb.test/r/demo/{function}"),
        function,
        method: "POST".into(),
        headers: Vec::new(),
        memory_mb: MEMORY_MB,
        timeout_ms: u64::try_from(timeout.as_millis()).expect("fits"),
        idle_timeout_ms: 30_000,
        command: vec![program.into()],
        image: String::new(),
        config: BTreeMap::new(),
        lb_group: "default".into(),
        deadline_unix_ms: unix_ms(SystemTime::now() + timeout),
        concurrency: 1,
    }
}

fn header(name: &str, value: &str) -> runner::Header {
    runner::Header {
        name: name.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
    }
}

/// `len` bytes of a pattern that does not repeat with any power-of-two period.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// `data` as several frames (at most 1 MiB each, so four or more for large bodies), the last
/// with `eof`. An empty body is one empty `eof` frame.
fn frames(data: &Bytes) -> Vec<DataFrame> {
    if data.is_empty() {
        return vec![DataFrame {
            data: Bytes::new(),
            eof: true,
        }];
    }
    let size = (data.len() / 4).clamp(1, 1024 * 1024);
    let mut out: Vec<DataFrame> = (0..data.len())
        .step_by(size)
        .map(|at| DataFrame {
            data: data.slice(at..data.len().min(at + size)),
            eof: false,
        })
        .collect();
    if let Some(last) = out.last_mut() {
        last.eof = true;
    }
    out
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Waits (bounded) until process `pid` no longer exists.
async fn assert_process_gone(pid: i32) {
    let start = Instant::now();
    while pid_alive(pid) {
        assert!(
            start.elapsed() < SETTLE_BOUND,
            "process {pid} still alive after {SETTLE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A valid echo call succeeds with `body` echoed.
async fn assert_echo_works(runner: &Runner, body: &'static str) {
    let result = runner
        .run(call("fn-echo", Duration::from_secs(30)), Bytes::from(body))
        .await;
    result.assert_ok(200);
    assert_eq!(&result.body[..], body.as_bytes());
}

// ---------------------------------------------------------------------------------------
// Tests.

/// As the LB sends a call whose body it has whole: the `TryCall`, the body and its `eof` in
/// one go, and the request half of the stream ends with them. The call runs to its end and
/// the runner's half then ends cleanly too (OK trailers, no reset).
#[tokio::test]
async fn a_call_sent_whole_with_its_request_half_closed_runs_to_its_end() {
    let runner = start_runner(MEMORY_MB, &examples_dir()).await;
    for len in [0, 5, 100 * 1024] {
        let body = pattern(len);
        let mut engage = runner
            .open_whole(call("fn-echo", Duration::from_secs(30)), frames(&body))
            .await;
        let ack = engage.ack().await;
        assert!(ack.committed, "call refused: {ack:?}");
        let mut result = CallResult::default();
        engage.result_into(&mut result).await;
        result.assert_ok(200);
        assert!(
            result.body[..] == body[..],
            "echoed bytes of a {len} B body"
        );
        assert!(
            engage.recv().await.is_none(),
            "the stream ends cleanly after CallFinished"
        );
    }
    runner.assert_released().await;
    runner.stop().await;
}

/// A call sent whole has its acknowledgement held to leave with the answer, but only for a
/// moment: an answer that takes long finds the acknowledgement already at the LB.
#[tokio::test]
async fn a_call_sent_whole_is_acknowledged_while_a_slow_function_still_runs() {
    let runner = start_runner(MEMORY_MB, &examples_dir()).await;
    let mut engage = runner
        .open_whole(
            call("fn-sleep", Duration::from_secs(30)),
            frames(&Bytes::from_static(b"1500")),
        )
        .await;
    let ack = engage.ack().await;
    let acknowledged = Instant::now();
    assert!(ack.committed, "call refused: {ack:?}");
    let mut result = CallResult::default();
    engage.result_into(&mut result).await;
    result.assert_ok(200);
    let answer_after = acknowledged.elapsed();
    assert!(
        answer_after >= Duration::from_millis(1000),
        "the acknowledgement came {answer_after:?} before the answer of a 1.5 s call: \
         it waited for the answer"
    );
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn echo_is_byte_exact_for_0_1_64k_and_8m_bodies() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    for len in [0, 1, 64 * 1024, 8 * 1024 * 1024] {
        let body = pattern(len);
        let mut echo = call("fn-echo", Duration::from_secs(30));
        echo.headers
            .push(header("content-type", "application/x-test-bytes"));
        let result = runner.run(echo, body.clone()).await;
        result.assert_ok(200);
        assert_eq!(result.body.len(), len, "echoed length for a {len} B body");
        assert!(
            result.body[..] == body[..],
            "echoed bytes differ for {len} B"
        );
        assert_eq!(
            result.header("content-type").as_deref(),
            Some("application/x-test-bytes")
        );
    }
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn a_streamed_body_is_answered_while_it_is_still_being_sent() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    assert!(engage.ack().await.committed);

    let first = pattern(100 * 1024);
    engage.data(first.clone(), false).await;
    // The answer starts, and the first part comes back, before the rest is sent.
    let mut result = CallResult::default();
    while result.body.len() < first.len() {
        match engage.recv().await {
            Some(runner_msg::Body::ResultStart(start)) => {
                result.status = start.http.map(|h| h.status_code);
            }
            Some(runner_msg::Body::Data(frame)) => {
                assert!(result.status.is_some(), "data before CallResultStart");
                assert!(!frame.eof, "eof before the request body ended");
                result.body.extend_from_slice(&frame.data);
            }
            other => panic!("expected the echo of the first part, got {other:?}"),
        }
    }
    assert_eq!(result.status, Some(200));
    assert!(result.body[..] == first[..], "first part echoed exactly");

    let rest = Bytes::from_static(b"and the rest");
    engage.data(rest.clone(), true).await;
    engage.result_into(&mut result).await;
    result.assert_ok(200);
    assert_eq!(&result.body[first.len()..], &rest[..]);
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn with_room_for_n_calls_n_plus_one_concurrent_calls_commit_n_and_refuse_one_as_busy() {
    const N: u64 = 3;
    let runner = start_runner(N * MEMORY_MB, &examples_dir()).await;
    // Every call holds its stream open (no eof yet), so all N+1 overlap.
    let attempts = futures::future::join_all((0..=N).map(|_| async {
        let mut engage = runner.open().await;
        engage
            .try_call(call("fn-echo", Duration::from_secs(30)))
            .await;
        let ack = engage.ack().await;
        (engage, ack)
    }))
    .await;
    let (committed, refused): (Vec<_>, Vec<_>) =
        attempts.into_iter().partition(|(_, ack)| ack.committed);
    assert_eq!(committed.len() as u64, N, "committed calls");
    assert_eq!(refused.len(), 1, "refused calls");
    let busy = &refused[0].1;
    assert_eq!(busy.refusal(), RefusalReason::Busy, "{busy:?}");
    assert!(busy.details.contains("busy"), "{busy:?}");

    let s = runner.status().await;
    assert_eq!(
        (s.capacity_committed_mb, s.calls_in_flight),
        (N * MEMORY_MB, N),
        "{s:?}"
    );

    for (i, (mut engage, _)) in committed.into_iter().enumerate() {
        let body = format!("call {i}");
        engage.data(body.clone(), true).await;
        let result = engage.result().await;
        result.assert_ok(200);
        assert_eq!(&result.body[..], body.as_bytes());
    }
    let s = runner.status().await;
    assert_eq!(
        (s.capacity_committed_mb, s.calls_in_flight),
        (0, 0),
        "{s:?}"
    );
    assert_eq!(s.hot_instances, N, "the instances stay hot: {s:?}");

    // The metrics tell the same story.
    let text = fn_lifecycle::metrics::encode(&runner.registry).expect("encodes");
    for line in [
        format!("fn_runner_calls_total{{outcome=\"success\"}} {N}\n"),
        "fn_runner_refusals_total{reason=\"busy\"} 1\n".to_owned(),
        format!("fn_runner_memory_total_mb {}\n", N * MEMORY_MB),
        "fn_runner_memory_committed_mb 0\n".to_owned(),
        format!("fn_runner_hot_instances {N}\n"),
        format!("fn_runner_instance_starts_total {N}\n"),
    ] {
        assert!(text.contains(&line), "{line:?} missing from\n{text}");
    }
    runner.stop().await;
}

#[tokio::test]
async fn sleep_past_its_timeout_ends_as_timeout_kills_the_instance_and_releases_capacity() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    // A short call first: it leaves its instance hot and tells us its pid. (The timeout is
    // not part of what makes instances shareable, so the slow call reuses this instance.)
    let quick = runner
        .run(
            call("fn-sleep", Duration::from_secs(30)),
            Bytes::from_static(b"1"),
        )
        .await;
    quick.assert_ok(200);
    let pid = quick.pid();
    assert!(pid_alive(pid));

    let started = Instant::now();
    let slow = runner
        .run(
            call("fn-sleep", Duration::from_millis(500)),
            Bytes::from_static(b"5000"),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(slow.kind(), ErrorKind::Timeout, "{slow:?}");
    assert!(!slow.finished.as_ref().is_some_and(|f| f.success));
    assert!(
        took < Duration::from_secs(4),
        "the timeout ended the call, not the function: {took:?}"
    );
    // The instance that ran it (the hot one) is killed, and nothing is left committed.
    let s = runner.status().await;
    assert_eq!(
        (s.capacity_committed_mb, s.calls_in_flight, s.hot_instances),
        (0, 0, 0),
        "{s:?}"
    );
    assert_process_gone(pid).await;
    runner.stop().await;
}

/// The budget is `timeout_ms` from the runner's receipt of the call, whatever the LB's clock
/// said in `deadline_unix_ms`: a minute behind or ahead, or in 2099, a call with budget left
/// runs, and a call past its budget ends as a timeout.
#[tokio::test]
async fn the_budget_counts_from_receipt_whatever_the_lbs_clock_says() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let now = SystemTime::now();
    let skews = [
        now - Duration::from_secs(60),
        now + Duration::from_secs(60),
        UNIX_EPOCH + Duration::from_secs(4_070_908_800), // 2099-01-01
    ];
    for (i, lb_clock) in skews.into_iter().enumerate() {
        let mut quick = call("fn-sleep", Duration::from_secs(5));
        quick.deadline_unix_ms = unix_ms(lb_clock);
        let result = runner.run(quick, Bytes::from_static(b"1")).await;
        result.assert_ok(200);

        let mut slow = call("fn-sleep", Duration::from_millis(400));
        slow.deadline_unix_ms = unix_ms(lb_clock);
        let started = Instant::now();
        let result = runner.run(slow, Bytes::from_static(b"3000")).await;
        let took = started.elapsed();
        assert_eq!(result.kind(), ErrorKind::Timeout, "skew {i}: {result:?}");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(2500),
            "skew {i}: the 400 ms budget ended the call after {took:?}"
        );
    }
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn an_instance_that_dies_mid_call_ends_it_as_crashed() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let result = runner
        .run(
            call("fn-crash", Duration::from_secs(30)),
            Bytes::from_static(b"boom"),
        )
        .await;
    assert_eq!(result.kind(), ErrorKind::Crashed, "{result:?}");
    let s = runner.status().await;
    assert_eq!(
        (s.capacity_committed_mb, s.calls_in_flight, s.hot_instances),
        (0, 0, 0),
        "{s:?}"
    );
    assert_echo_works(&runner, "still serving").await;
    runner.stop().await;
}

#[tokio::test]
async fn cancelling_the_stream_mid_call_releases_capacity_and_kills_the_instance() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    assert!(engage.ack().await.committed);
    engage.data("partial", false).await;
    // The call is running: its answer has started.
    let pid = match engage.recv().await {
        Some(runner_msg::Body::ResultStart(start)) => start
            .http
            .expect("http")
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(b"x-fn-pid"))
            .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse::<i32>().ok())
            .expect("X-Fn-Pid"),
        other => panic!("expected CallResultStart, got {other:?}"),
    };
    assert_eq!(runner.status().await.capacity_committed_mb, MEMORY_MB);

    drop(engage); // the LB cancels the stream: both halves go away without eof

    runner
        .status_until("capacity released after the cancel", |s| {
            s.capacity_committed_mb == 0 && s.calls_in_flight == 0
        })
        .await;
    assert_eq!(runner.status().await.hot_instances, 0);
    assert_process_gone(pid).await;
    assert_echo_works(&runner, "after a cancel").await;
    runner.stop().await;
}

#[tokio::test]
async fn a_message_out_of_order_ends_the_call_as_protocol_error_and_the_next_call_succeeds() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;

    // A data frame before any TryCall.
    let mut engage = runner.open().await;
    engage.data("too early", false).await;
    match engage.recv().await {
        Some(runner_msg::Body::Finished(f)) => {
            assert_eq!(f.kind(), ErrorKind::Protocol, "{f:?}");
            assert!(!f.success);
        }
        other => panic!("expected CallFinished, got {other:?}"),
    }
    runner.assert_released().await;
    assert_echo_works(&runner, "after data first").await;
    // Counted, though no call was committed or refused.
    let text = fn_lifecycle::metrics::encode(&runner.registry).expect("encodes");
    assert!(
        text.contains("fn_runner_refusals_total{reason=\"protocol\"} 1\n"),
        "{text}"
    );

    // A second TryCall on a committed stream.
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    assert!(engage.ack().await.committed);
    engage
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    let result = engage.result().await;
    assert_eq!(result.kind(), ErrorKind::Protocol, "{result:?}");
    runner.assert_released().await;
    assert_echo_works(&runner, "after a second TryCall").await;

    // Data after eof. fn-sleep answers only after sleeping, so the runner reads the stray
    // frame while the call is still running.
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-sleep", Duration::from_secs(30)))
        .await;
    assert!(engage.ack().await.committed);
    engage.data("3000", true).await;
    engage.data("stray", false).await;
    let result = engage.result().await;
    assert_eq!(result.kind(), ErrorKind::Protocol, "{result:?}");
    runner.assert_released().await;
    assert_echo_works(&runner, "after data after eof").await;

    // An empty message.
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    assert!(engage.ack().await.committed);
    engage
        .sender()
        .send(ClientMsg { body: None })
        .await
        .expect("send");
    let result = engage.result().await;
    assert_eq!(result.kind(), ErrorKind::Protocol, "{result:?}");
    runner.assert_released().await;
    assert_echo_works(&runner, "after an empty message").await;
    runner.stop().await;
}

/// A first message that is no protobuf at all gets a `CallFinished` of kind `Protocol`
/// naming it, not a stream ended without a word (the LB would see no cause).
#[tokio::test]
async fn an_undecodable_first_message_is_answered_as_a_protocol_error() {
    use tonic::codegen::Service as _;
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut channel = fn_tls::grpc_endpoint(&runner.pki.mode(), &runner.address)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    // One gRPC frame of three bytes: field 31 with a wire type that does not exist.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let request = http::Request::post(format!(
        "http://{}{}",
        runner.address,
        fn_protocol::framing::ENGAGE_PATH
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(tonic::body::Body::new(http_body_util::Full::new(frame)))
    .expect("a valid request");
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .expect("ready");
    let response = tokio::time::timeout(RECV_BOUND, channel.call(request))
        .await
        .expect("answered in time")
        .expect("an answer");
    let mut messages =
        fn_protocol::framing::Decoded::<RunnerMsg, _>::response(response.into_body());
    let first = tokio::time::timeout(RECV_BOUND, futures::StreamExt::next(&mut messages))
        .await
        .expect("answered in time");
    match first.map(|m| m.map(|m| m.body)) {
        Some(Ok(Some(runner_msg::Body::Finished(f)))) => {
            assert_eq!(f.kind(), ErrorKind::Protocol, "{f:?}");
            assert!(f.details.contains("cannot decode"), "{f:?}");
            assert!(!f.success);
        }
        other => panic!("expected CallFinished, got {other:?}"),
    }
    let text = fn_lifecycle::metrics::encode(&runner.registry).expect("encodes");
    assert!(
        text.contains("fn_runner_refusals_total{reason=\"protocol\"} 1\n"),
        "{text}"
    );
    assert_echo_works(&runner, "after an undecodable message").await;
    runner.stop().await;
}

/// `concurrency = 4`: one instance's memory holds four calls at once, all on the same
/// process, each answered byte-exact; a fifth waits for a slot (refused as busy here, with no
/// memory for a second instance).
#[tokio::test]
async fn a_function_with_concurrency_runs_that_many_calls_at_once_on_one_instance() {
    const N: usize = 4;
    let runner = start_runner(MEMORY_MB, &examples_dir()).await;
    let concurrent = |program: &str| runner::Call {
        concurrency: N as u32,
        ..call(program, Duration::from_secs(30))
    };
    // Warm: the instance exists before the calls arrive together.
    let warm = runner.run(concurrent("fn-echo"), Bytes::from("warm")).await;
    warm.assert_ok(200);
    let pid = warm.pid();

    let mut open = Vec::new();
    for _ in 0..N {
        let mut engage = runner.open().await;
        engage.try_call(concurrent("fn-echo")).await;
        let ack = engage.ack().await;
        assert!(ack.committed, "a free slot on the hot instance: {ack:?}");
        engage.data(pattern(10_000), false).await;
        open.push(engage);
    }
    let s = runner.status().await;
    assert_eq!(
        (s.calls_in_flight, s.capacity_committed_mb, s.hot_instances),
        (N as u64, MEMORY_MB, 1),
        "{N} calls on one instance's memory: {s:?}"
    );
    let mut fifth = runner.open().await;
    fifth.try_call(concurrent("fn-echo")).await;
    let refused = fifth.ack().await;
    assert!(
        !refused.committed,
        "no slot and no memory left: {refused:?}"
    );
    assert_eq!(refused.refusal(), RefusalReason::Busy);

    // Finish them in reverse order: each is its own exchange with the instance.
    for (i, mut engage) in open.into_iter().enumerate().rev() {
        let tail = format!(" and the end of call {i}");
        engage.data(tail.clone(), true).await;
        let result = engage.result().await;
        result.assert_ok(200);
        assert_eq!(result.pid(), pid, "call {i} ran on the shared instance");
        let mut expected = BytesMut::from(&pattern(10_000)[..]);
        expected.extend_from_slice(tail.as_bytes());
        assert!(result.body[..] == expected[..], "call {i} echoed exactly");
    }
    runner.assert_released().await;
    let s = runner.status().await;
    assert_eq!(s.hot_instances, 1, "{s:?}");
    runner.stop().await;
}

/// A call past its deadline on an instance that takes several calls at once: the function
/// may still be at it, so the instance takes no new call and goes once its calls have ended
/// (here at once: it had no other).
#[tokio::test]
async fn a_timed_out_call_retires_its_shared_instance() {
    let runner = start_runner(2 * MEMORY_MB, &examples_dir()).await;
    let shared = || runner::Call {
        concurrency: 2,
        ..call("fn-sleep", Duration::from_secs(1))
    };
    let warm = runner.run(shared(), Bytes::from("10")).await;
    warm.assert_ok(200);
    let pid = warm.pid();
    let late = runner.run(shared(), Bytes::from("5000")).await;
    assert_eq!(late.kind(), ErrorKind::Timeout, "{late:?}");
    assert_process_gone(pid).await;
    let next = runner.run(shared(), Bytes::from("10")).await;
    next.assert_ok(200);
    assert_ne!(next.pid(), pid, "a new call ran on the retired instance");
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn repeated_calls_to_one_function_reuse_one_hot_instance() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut pids = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let result = runner
            .run(call("fn-hello", Duration::from_secs(30)), Bytes::from(name))
            .await;
        result.assert_ok(200);
        if i == 0 {
            assert!(
                result.cold_start_us > 0,
                "the first call started the instance"
            );
        } else {
            assert_eq!(result.cold_start_us, 0, "call {i} ran warm");
        }
        assert_eq!(&result.body[..], format!("Hello, {name}!\n").as_bytes());
        pids.push(result.pid());
    }
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "one instance served all calls: pids {pids:?}"
    );
    assert!(pid_alive(pids[0]), "the instance stays hot");
    let s = runner.status().await;
    assert_eq!((s.hot_instances, s.capacity_committed_mb), (1, 0), "{s:?}");
    runner.stop().await;
}

#[tokio::test]
async fn invalid_calls_are_refused_as_invalid_with_a_clear_reason() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let valid = || call("fn-echo", Duration::from_secs(30));
    type Edit = fn(&mut runner::Call);
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("no id", |c| c.id.clear(), "`id`"),
        ("no app", |c| c.app.clear(), "`app`"),
        ("no memory", |c| c.memory_mb = 0, "`memory_mb`"),
        ("no timeout", |c| c.timeout_ms = 0, "`timeout_ms`"),
        ("no command", |c| c.command.clear(), "`command or image`"),
        (
            "bad method",
            |c| c.method = "NOT A METHOD".into(),
            "`method`",
        ),
        ("parent dir", |c| c.command = vec!["../x".into()], "`..`"),
        (
            "absolute path",
            |c| c.command = vec!["/bin/sh".into()],
            "absolute path",
        ),
        (
            "escaping path",
            |c| c.command = vec!["sub/../../../bin/sh".into()],
            "`..`",
        ),
        (
            "missing program",
            |c| c.command = vec!["fn-no-such-function".into()],
            "not found",
        ),
        (
            "budget over the maximum",
            |c| c.timeout_ms = 10 * 3600 * 1000,
            "timeout_ms",
        ),
    ];
    for (what, edit, expected) in cases {
        let mut bad = valid();
        edit(&mut bad);
        let mut engage = runner.open().await;
        engage.try_call(bad).await;
        let ack = engage.ack().await;
        assert!(!ack.committed, "{what}: {ack:?}");
        assert_eq!(ack.refusal(), RefusalReason::Invalid, "{what}: {ack:?}");
        assert!(
            ack.details.contains(expected),
            "{what}: details {:?} should mention {expected:?}",
            ack.details
        );
    }
    // More memory than the runner has in all: refused as too large (a larger runner may take
    // it), not as invalid.
    let mut too_large = valid();
    too_large.memory_mb = 1024 * 1024;
    let mut engage = runner.open().await;
    engage.try_call(too_large).await;
    let ack = engage.ack().await;
    assert!(!ack.committed, "{ack:?}");
    assert_eq!(ack.refusal(), RefusalReason::TooLarge, "{ack:?}");
    assert!(
        ack.details.contains("more than this runner's total"),
        "{ack:?}"
    );
    // A TryCall without a call.
    let mut engage = runner.open().await;
    engage
        .send(client_msg::Body::TryCall(Box::new(TryCall { call: None })))
        .await;
    let ack = engage.ack().await;
    assert!(!ack.committed);
    assert_eq!(ack.refusal(), RefusalReason::Invalid, "{ack:?}");

    runner.assert_released().await;
    assert_eq!(runner.status().await.hot_instances, 0, "nothing started");
    assert_echo_works(&runner, "valid after invalid").await;
    runner.stop().await;
}

/// Where `make test-deps` installs the Python FDK.
fn python_fdk_path() -> PathBuf {
    let path = std::env::var_os("FN_TEST_PYTHONPATH")
        .map_or_else(|| PathBuf::from("/opt/fn-test-python"), PathBuf::from);
    assert!(
        path.join("fdk").join("__init__.py").is_file(),
        "the Python FDK (`fdk` from PyPI) is not installed in {}: run `make test-deps`",
        path.display()
    );
    path
}

const PYTHON_FUNC: &str = r#"import io
import json

from fdk import response


def handler(ctx, data: io.BytesIO = None):
    body = data.getvalue().decode("utf-8")
    answer = {
        "got": body,
        "method": ctx.Method(),
        "x-in": ctx.HTTPHeaders().get("x-in"),
    }
    return response.Response(
        ctx,
        response_data=json.dumps(answer, sort_keys=True),
        headers={"Content-Type": "application/json", "X-Python-Fn": "yes"},
        status_code=201,
    )
"#;

/// The command an Fn Python image runs (`fdk func.py handler`), without the image.
const PYTHON_WRAPPER: &str = r#"#!/bin/sh
exec /usr/bin/python3 -c 'import sys; from fdk.scripts.fdk import main; sys.argv[0] = "fdk"; main()' "$(dirname "$0")/func.py" handler
"#;

#[tokio::test]
async fn an_unmodified_python_fdk_function_runs_with_its_status_headers_and_body() {
    let fdk = python_fdk_path();
    let functions = shared_tempdir();
    std::fs::write(functions.path().join("func.py"), PYTHON_FUNC).expect("write func.py");
    let wrapper = functions.path().join("py-func");
    std::fs::write(&wrapper, PYTHON_WRAPPER).expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let runner = start_runner(4 * MEMORY_MB, functions.path()).await;

    let mut py = call("py-func", Duration::from_secs(30));
    py.function = "python".into();
    py.headers.push(header("x-in", "from the client"));
    py.config
        .insert("PYTHONPATH".into(), fdk.display().to_string());
    for round in 0..2 {
        let result = runner
            .run(py.clone(), Bytes::from_static(b"hello python"))
            .await;
        result.assert_ok(201);
        assert_eq!(
            String::from_utf8_lossy(&result.body),
            r#"{"got": "hello python", "method": "POST", "x-in": "from the client"}"#,
            "round {round}"
        );
        assert_eq!(result.header("x-python-fn").as_deref(), Some("yes"));
        assert_eq!(
            result.header("content-type").as_deref(),
            Some("application/json")
        );
        assert!(
            result
                .headers
                .iter()
                .all(|(n, _)| !n.to_ascii_lowercase().starts_with("fn-")),
            "no contract headers leak to the client: {:?}",
            result.headers
        );
        py.id = format!("{}-again", py.id);
        py.deadline_unix_ms = unix_ms(SystemTime::now() + Duration::from_secs(30));
    }
    let s = runner.status().await;
    assert_eq!((s.hot_instances, s.capacity_committed_mb), (1, 0), "{s:?}");
    runner.stop().await;
}

#[tokio::test]
async fn a_drain_refuses_new_calls_waits_for_calls_in_flight_and_not_for_silent_streams() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut in_flight = runner.open().await;
    in_flight
        .try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    assert!(in_flight.ack().await.committed);
    in_flight.data("in flight", false).await;
    // An LB opened a stream but has not sent its TryCall yet.
    let mut silent = runner.open().await;

    let drain = tokio::spawn({
        let service = runner.service.clone();
        async move { service.drain().await }
    });
    runner.status_until("draining", |s| s.draining).await;

    let mut late = runner.open().await;
    late.try_call(call("fn-echo", Duration::from_secs(30)))
        .await;
    let ack = late.ack().await;
    assert!(!ack.committed);
    assert_eq!(ack.refusal(), RefusalReason::Draining, "{ack:?}");
    // The silent stream is told at once rather than kept until its first-message timeout.
    let started = Instant::now();
    let ack = silent.ack().await;
    assert!(!ack.committed);
    assert_eq!(ack.refusal(), RefusalReason::Draining, "{ack:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !drain.is_finished(),
        "the drain waits for the call in flight"
    );

    in_flight.data("", true).await;
    let result = in_flight.result().await;
    result.assert_ok(200);
    assert_eq!(&result.body[..], b"in flight");
    tokio::time::timeout(Duration::from_secs(3), drain)
        .await
        .expect("the drain ends once the call in flight has ended")
        .expect("drain task");
    runner.assert_released().await;
    runner.stop().await;
}

#[tokio::test]
async fn an_lb_that_stops_reading_holds_neither_capacity_nor_the_drain() {
    let config = EngageConfig {
        final_send_timeout: Duration::from_millis(300),
        ..EngageConfig::default()
    };
    let runner = start_runner_with(4 * MEMORY_MB, &examples_dir(), config).await;
    // On a connection of its own: the unread stream fills the connection's flow-control
    // window too, which would stall the `Status` calls below.
    let stuck_client = connect(&runner.pki, &runner.address).await;
    let engage = Engage::open(&stuck_client).await;
    engage
        .try_call(call("fn-echo", Duration::from_secs(1)))
        .await;
    // The LB sends a large body and never reads the echo: every buffer on the way back fills.
    let sender = engage.sender();
    let feed = tokio::spawn(async move {
        for frame in frames(&pattern(16 * 1024 * 1024)) {
            if sender.send(data_msg(frame)).await.is_err() {
                break;
            }
        }
    });
    // The call times out; its capacity is released although the LB reads nothing.
    runner
        .status_until("a call in flight", |s| s.calls_in_flight == 1)
        .await;
    let start = Instant::now();
    loop {
        let s = runner.status().await;
        if s.calls_in_flight == 0 && s.capacity_committed_mb == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not released: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its stream task gives up on the LB, so a drain completes.
    tokio::time::timeout(Duration::from_secs(3), runner.service.drain())
        .await
        .expect("the drain is not held by an LB that does not read");
    feed.abort();
    drop(engage);
    runner.stop().await;
}

/// `WatchState` reports at once, then after changes: a call in flight, then its function
/// warm with an idle slot and its memory free again; and, once the runner drains, the
/// draining flag, after which the stream ends.
#[tokio::test]
async fn watch_state_reports_calls_warm_functions_and_the_drain() {
    let runner = start_runner(4 * MEMORY_MB, &examples_dir()).await;
    let mut reports = runner
        .client
        .clone()
        .watch_state(())
        .await
        .expect("WatchState")
        .into_inner();
    let first = next(&mut reports).await.expect("a first report");
    assert_eq!(
        (
            first.capacity_total_mb,
            first.capacity_free_mb,
            first.calls_in_flight
        ),
        (4 * MEMORY_MB, 4 * MEMORY_MB, 0)
    );
    assert!(first.warm.is_empty() && !first.draining, "{first:?}");

    // The acknowledgement gives the pool's version once the call was taken: the first
    // report of at least that version shows it in flight (an LB counts its offer itself on
    // top of older reports).
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-hello", Duration::from_secs(30)))
        .await;
    let ack = engage.ack().await;
    assert!(ack.committed, "{ack:?}");
    assert!(
        ack.pool_version > first.version,
        "taken at {} after {}",
        ack.pool_version,
        first.version
    );
    let mut taken = next(&mut reports).await.expect("a report of the call");
    while taken.version < ack.pool_version {
        taken = next(&mut reports).await.expect("more reports");
    }
    assert_eq!(taken.calls_in_flight, 1, "{taken:?}");
    let sender = engage.sender();
    for frame in frames(&Bytes::from("x")) {
        sender.send(data_msg(frame)).await.expect("body");
    }
    let result = engage.result().await;
    result.assert_ok(200);
    // `CallFinished` gives the pool's version once the call let go of its instance: the
    // first report of at least that version shows the instance idle (an LB counts the call's
    // end itself only against older reports).
    let released = result.finished.as_ref().map_or(0, |f| f.pool_version);
    assert!(
        released > first.version,
        "{released} after {}",
        first.version
    );
    let first_version = first.version;
    let mut last = first;
    while last.version < released {
        last = next(&mut reports).await.expect("more reports");
        assert!(last.version > first_version);
    }
    assert!(
        last.calls_in_flight == 0 && !last.warm.is_empty(),
        "the report of version {} (call released at {released}): {last:?}",
        last.version
    );
    assert_eq!(
        last.capacity_free_mb,
        4 * MEMORY_MB,
        "an idle instance's memory is free"
    );
    assert_eq!(
        last.warm,
        vec![runner::WarmFunction {
            app: "demo".into(),
            function: "hello".into(),
            idle_slots: 1,
            instances: 1,
        }]
    );

    runner.service.drain().await;
    let mut saw_draining = false;
    while let Some(report) = next(&mut reports).await {
        saw_draining |= report.draining;
    }
    assert!(
        saw_draining,
        "the drain was reported before the stream ended"
    );
    runner.stop().await;
}

/// The next `WatchState` report, within [`SETTLE_BOUND`]; `None` when the stream ended.
async fn next(reports: &mut tonic::Streaming<runner::RunnerState>) -> Option<runner::RunnerState> {
    tokio::time::timeout(SETTLE_BOUND, reports.message())
        .await
        .expect("a report in time")
        .expect("stream ok")
}

// ---------------------------------------------------------------------------------------
// A function that answers before it has read its body.

/// Starts instances that answer `early` at once, then read their request body in the
/// background and report how it ended: `Ok(bytes)` for a clean end, `Err` for a failure.
/// A call with `x-read-first` has its body read before the answer; a call with `x-hold`
/// reads nothing and never answers, and reports `Err("dropped")` when the runner drops it.
#[derive(Debug)]
struct EarlyAnswer {
    ends: mpsc::UnboundedSender<Result<usize, String>>,
}

#[derive(Debug)]
struct EarlyInstance {
    ends: mpsc::UnboundedSender<Result<usize, String>>,
}

impl Driver for EarlyAnswer {
    fn start(
        &self,
        _spec: &InstanceSpec,
        _call_id: &str,
        _start_timeout: Duration,
    ) -> futures::future::BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        let instance = EarlyInstance {
            ends: self.ends.clone(),
        };
        Box::pin(async move { Ok(Box::new(instance) as Box<dyn Instance>) })
    }
}

impl Instance for EarlyInstance {
    fn call(
        &self,
        request: FunctionRequest,
        mut body: BodyStream<std::io::Error>,
    ) -> futures::future::BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        let ends = self.ends.clone();
        let read_body = async move {
            let mut read = 0;
            let end = loop {
                match futures::StreamExt::next(&mut body).await {
                    Some(Ok(chunk)) => read += chunk.len(),
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Ok(read),
                }
            };
            let _ = ends.send(end);
        };
        let read_first = request.headers.contains_key("x-read-first");
        if request.headers.contains_key("x-hold") {
            let dropped = DropReport(self.ends.clone());
            return Box::pin(async move {
                let _held = (dropped, read_body);
                std::future::pending().await
            });
        }
        Box::pin(async move {
            if read_first {
                read_body.await;
            } else {
                tokio::spawn(read_body);
            }
            Ok(FunctionResponse {
                status: http::StatusCode::OK,
                headers: http::HeaderMap::new(),
                body: Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"early"))])),
            })
        })
    }

    fn is_alive(&self) -> bool {
        true
    }

    fn kill(&self) {}

    fn pid(&self) -> Option<u32> {
        None
    }
}

/// A runner whose instances are [`EarlyAnswer`]'s, and the receiver of what they report.
async fn early_answer_runner() -> (Runner, mpsc::UnboundedReceiver<Result<usize, String>>) {
    let (ends, ended) = mpsc::unbounded_channel();
    let runner = start_runner_on(
        Arc::new(EarlyAnswer { ends }),
        shared_tempdir(),
        1024,
        EngageConfig::default(),
    )
    .await;
    (runner, ended)
}

/// Sends `Err("dropped")` when dropped.
struct DropReport(mpsc::UnboundedSender<Result<usize, String>>);

impl Drop for DropReport {
    fn drop(&mut self) {
        let _ = self.0.send(Err("dropped".into()));
    }
}

/// The LB going away mid-call (its client gone, any HTTP client can do so at every call) is
/// no news for the runner's log at INFO or above: it is counted
/// (`fn_runner_calls_total{outcome="lb_went_away"}`) and logged at DEBUG.
#[tokio::test]
async fn an_lb_that_cancels_while_the_function_leaves_its_body_unread_ends_the_call() {
    let (runner, mut ended) = early_answer_runner().await;
    let (logged, _guard) = record_events(tracing::Level::INFO);
    let mut engage = runner.open().await;
    let mut held = call("fn-held", Duration::from_secs(30));
    held.headers.push(header("x-hold", "1"));
    engage.try_call(held).await;
    assert!(engage.ack().await.committed);
    // More than the runner buffers for a function that reads nothing: its pump waits.
    for _ in 0..16 {
        engage.data(pattern(1000), false).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(runner.status().await.calls_in_flight, 1);

    drop(engage); // the LB cancels: before, the call held its memory until its deadline

    runner
        .status_until("capacity released after the cancel", |s| {
            s.capacity_committed_mb == 0 && s.calls_in_flight == 0
        })
        .await;
    let end = tokio::time::timeout(SETTLE_BOUND, ended.recv()).await;
    assert!(
        matches!(&end, Ok(Some(Err(e))) if e == "dropped"),
        "the function's call was not dropped: {end:?}"
    );
    let logged = logged.lock().expect("lock").clone();
    assert!(logged.is_empty(), "logged at INFO or above: {logged:?}");
    runner.stop().await;
}

#[tokio::test]
async fn a_body_cut_short_by_an_early_answer_never_reaches_the_function_as_complete() {
    let (runner, mut ended) = early_answer_runner().await;

    // The body's first half arrives, the function answers, the call ends: what the function
    // goes on reading must fail, not end as if the body were whole.
    let mut engage = runner.open().await;
    engage
        .try_call(call("fn-early", Duration::from_secs(10)))
        .await;
    // The call may be over before this arrives: the stream is closed then.
    let first_half = data_msg(DataFrame {
        data: pattern(1000),
        eof: false,
    });
    let _ = engage.sender().send(first_half).await;
    assert!(engage.ack().await.committed);
    let result = engage.result().await;
    result.assert_ok(200);
    assert_eq!(&result.body[..], b"early");
    let end = tokio::time::timeout(SETTLE_BOUND, ended.recv())
        .await
        .expect("the function's body ends")
        .expect("reported");
    match end {
        Err(e) => assert!(e.contains("cut short"), "{e}"),
        Ok(read) => panic!("a body cut short after {read} bytes ended cleanly"),
    }

    // A whole body read before the answer still ends cleanly.
    let mut engage = runner.open().await;
    let mut read_first = call("fn-early", Duration::from_secs(10));
    read_first.headers.push(header("x-read-first", "1"));
    engage.try_call(read_first).await;
    assert!(engage.ack().await.committed);
    engage.data(pattern(1000), false).await;
    engage.data(pattern(24), true).await;
    engage.result().await.assert_ok(200);
    let end = tokio::time::timeout(SETTLE_BOUND, ended.recv())
        .await
        .expect("the function's body ends")
        .expect("reported");
    assert!(matches!(end, Ok(1024)), "{end:?}");
    runner.stop().await;
}

// ---------------------------------------------------------------------------------------
// An FDK's own report on a call, and an instance that does not start in time.

/// Starts instances that answer `ok`, unless a call carries `x-report: failed` (the FDK's
/// own 502: the function raised), `x-report: timed-out` (its 504) or `x-report: exhausted`
/// (the runner out of descriptors to connect); counts its starts.
/// With `start_after`, a start takes that long and then fails.
#[derive(Debug, Default)]
struct Reporting {
    starts: AtomicU64,
    start_after: Option<Duration>,
}

#[derive(Debug)]
struct ReportingInstance;

impl Driver for Reporting {
    fn start(
        &self,
        _spec: &InstanceSpec,
        _call_id: &str,
        _start_timeout: Duration,
    ) -> futures::future::BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        let start_after = self.start_after;
        Box::pin(async move {
            if let Some(after) = start_after {
                tokio::time::sleep(after).await;
                return Err(DriverError::Start(
                    "did not open its listener within 1s".into(),
                ));
            }
            Ok(Box::new(ReportingInstance) as Box<dyn Instance>)
        })
    }
}

impl Instance for ReportingInstance {
    fn call(
        &self,
        request: FunctionRequest,
        _body: BodyStream<std::io::Error>,
    ) -> futures::future::BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        let report = request.headers.get("x-report").cloned();
        Box::pin(async move {
            match report.as_ref().map(http::HeaderValue::as_bytes) {
                Some(b"failed") => Err(DriverError::Failed(
                    "its FDK answered 502 (a body of 12 bytes, not passed on)".into(),
                )),
                Some(b"timed-out") => Err(DriverError::TimedOut(
                    "its FDK answered 504: it saw the call's deadline pass".into(),
                )),
                Some(b"exhausted") => Err(DriverError::Runner(
                    "cannot connect: Too many open files (os error 24)".into(),
                )),
                _ => Ok(FunctionResponse {
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    body: Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"ok"))])),
                }),
            }
        })
    }

    fn is_alive(&self) -> bool {
        true
    }

    fn kill(&self) {}

    fn pid(&self) -> Option<u32> {
        None
    }
}

/// An FDK's 502 (the function raised) ends the call as the function's failure, and its 504
/// as a timeout, with no answer for the client (the LB answers with its JSON error), and
/// the instance takes the next call, as under Fn's agent: before, the FDK's answer went to
/// the client, body and all, and the call counted as a success. The runner out of
/// descriptors to reach the instance ends the call as its own (internal) fault, and the
/// instance serves on: it was retired as a misbehaving function's.
#[tokio::test]
async fn an_fdks_report_of_a_failure_or_a_timeout_ends_the_call_so_and_keeps_the_instance() {
    let driver = Arc::new(Reporting::default());
    let runner = start_runner_on(
        Arc::clone(&driver) as Arc<dyn Driver>,
        shared_tempdir(),
        1024,
        EngageConfig::default(),
    )
    .await;
    let mut fresh = runner
        .run(call("fn-report", Duration::from_secs(10)), Bytes::new())
        .await;
    fresh.assert_ok(200);
    for (report, kind, said) in [
        ("failed", ErrorKind::Function, "function failed"),
        (
            "timed-out",
            ErrorKind::Timeout,
            "saw the call's deadline pass",
        ),
        ("exhausted", ErrorKind::Internal, "Too many open files"),
    ] {
        let mut reported = call("fn-report", Duration::from_secs(10));
        reported.headers.push(header("x-report", report));
        let result = runner.run(reported, Bytes::new()).await;
        assert_eq!(result.kind(), kind, "{result:?}");
        assert_eq!(
            result.status, None,
            "an answer went to the client: {result:?}"
        );
        let finished = result.finished.as_ref().expect("CallFinished");
        assert!(finished.details.contains(said), "{finished:?}");
        // The same instance takes the next call.
        fresh = runner
            .run(call("fn-report", Duration::from_secs(10)), Bytes::new())
            .await;
        fresh.assert_ok(200);
        assert_eq!(fresh.cold_start_us, 0, "a new instance after {report}");
    }
    assert_eq!(driver.starts.load(Ordering::SeqCst), 1);
    let text = fn_lifecycle::metrics::encode(&runner.registry).expect("encodes");
    for line in [
        "fn_runner_calls_total{outcome=\"success\"} 4\n",
        "fn_runner_calls_total{outcome=\"function_error\"} 1\n",
        "fn_runner_calls_total{outcome=\"timeout\"} 1\n",
        "fn_runner_calls_total{outcome=\"internal\"} 1\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
    runner.stop().await;
}

/// Records the fields (message and `error` among them) of every event at the level given
/// or a more severe one, each line led by its level and target.
struct Recorded(Arc<std::sync::Mutex<Vec<String>>>, tracing::Level);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Visit(String);
        impl tracing::field::Visit for Visit {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={value:?}", field.name()));
            }
        }
        // tracing orders levels from the most severe up: ERROR < WARN < INFO.
        let meta = event.metadata();
        if *meta.level() <= self.1 {
            let mut visit = Visit(format!("{} {}:", meta.level(), meta.target()));
            event.record(&mut visit);
            self.0.lock().expect("lock").push(visit.0);
        }
    }
}

/// Records every WARN event of this thread until the guard is dropped (the tests' runtime
/// has one thread: the runner's tasks log on it).
fn record_warnings() -> (
    Arc<std::sync::Mutex<Vec<String>>>,
    tracing::subscriber::DefaultGuard,
) {
    record_events(tracing::Level::WARN)
}

/// Records every event of this thread at `level` or a more severe one until the guard is
/// dropped.
fn record_events(
    level: tracing::Level,
) -> (
    Arc<std::sync::Mutex<Vec<String>>>,
    tracing::subscriber::DefaultGuard,
) {
    use tracing_subscriber::layer::SubscriberExt;
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Recorded(Arc::clone(&events), level));
    let guard = fn_test_support::logs::scoped_subscriber(subscriber);
    // tracing caches whether an event is wanted when a thread first meets it; another test's
    // thread meeting it just as this subscriber came in may have cached "never" for every
    // thread (tracing-core registers the callsite, then reads the subscribers). Worked out
    // again now, with this subscriber in place.
    tracing::callsite::rebuild_interest_cache();
    (events, guard)
}

/// A runner whose instances take 800 ms to start and then fail, and a call of 200 ms on it,
/// which has timed out while its instance starts.
async fn time_out_a_call_of_a_slow_start() -> (Runner, CallResult) {
    let driver = Arc::new(Reporting {
        start_after: Some(Duration::from_millis(800)),
        ..Reporting::default()
    });
    let runner = start_runner_on(driver, shared_tempdir(), 1024, EngageConfig::default()).await;
    let result = runner
        .run(
            call("fn-slow-start", Duration::from_millis(200)),
            Bytes::new(),
        )
        .await;
    assert_eq!(result.kind(), ErrorKind::Timeout, "{result:?}");
    (runner, result)
}

/// A call whose timeout passes while its instance is still starting gets a timeout that
/// says so (Fn: "Container initialization timed out"), and the start's failure after the
/// call has gone is logged as a warning naming the function and why.
#[tokio::test]
async fn a_call_that_times_out_while_its_instance_starts_says_so_and_the_start_failure_is_logged() {
    let (warnings, _guard) = record_warnings();
    let (runner, result) = time_out_a_call_of_a_slow_start().await;
    let finished = result.finished.as_ref().expect("CallFinished");
    assert!(
        finished.details.contains("had not opened its listener"),
        "{finished:?}"
    );
    runner
        .status_until("the start ended", |s| s.capacity_committed_mb == 0)
        .await;
    let warned = warnings.lock().expect("lock").clone();
    assert!(
        warned.iter().any(|w| w.contains("function=slow-start")
            && w.contains("did not open its listener within 1s")),
        "{warned:?}"
    );
    runner.stop().await;
}

/// A start the runner's own stop ends (it drains first) is no warning: the runner's stop
/// cut it short, not the function.
#[tokio::test]
async fn a_start_that_fails_while_the_runner_drains_is_no_warning() {
    let (warnings, _guard) = record_warnings();
    let (runner, _) = time_out_a_call_of_a_slow_start().await;
    runner.pool.drain();
    runner
        .status_until("the start ended", |s| s.capacity_committed_mb == 0)
        .await;
    let warned = warnings.lock().expect("lock").clone();
    assert!(
        !warned.iter().any(|w| w.contains("function=slow-start")),
        "{warned:?}"
    );
    runner.stop().await;
}

const PYTHON_MODES: &str = r#"import io
import json
import os

from fdk import response


def handler(ctx, data: io.BytesIO = None):
    mode = ctx.HTTPHeaders().get("x-mode")
    if mode == "raise":
        raise Exception("the password is hunter2")
    headers = {"X-Fn-Pid": str(os.getpid())}
    if mode == "headers":
        for i in range(90):
            headers["X-H%d" % i] = "v%d" % i
    return response.Response(
        ctx,
        response_data=json.dumps({"x-many": ctx.HTTPHeaders().get("x-many")}),
        headers=headers,
    )
"#;

/// An unmodified Python function as Fn runs it: an exception fails its call as the
/// function's failure, with no word of the exception to the client, and the instance takes
/// the next call; an answer of 90 headers reaches the client whole; a header the client
/// sent twice reaches the function with both values (the FDK keeps one line of a name).
#[tokio::test]
async fn a_python_function_that_raises_fails_its_call_and_serves_on() {
    let fdk = python_fdk_path();
    let functions = shared_tempdir();
    std::fs::write(functions.path().join("func.py"), PYTHON_MODES).expect("write func.py");
    let wrapper = functions.path().join("py-func");
    std::fs::write(&wrapper, PYTHON_WRAPPER).expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let runner = start_runner(4 * MEMORY_MB, functions.path()).await;
    let py = |mode: &str| {
        let mut py = call("py-func", Duration::from_secs(30));
        py.function = "python-modes".into();
        py.headers.push(header("x-mode", mode));
        py.headers.push(header("x-many", "a"));
        py.headers.push(header("x-many", "b"));
        py.config
            .insert("PYTHONPATH".into(), fdk.display().to_string());
        py
    };

    let first = runner.run(py("plain"), Bytes::new()).await;
    first.assert_ok(200);
    assert_eq!(&first.body[..], br#"{"x-many": "a, b"}"#);
    let pid = first.pid();

    let raised = runner.run(py("raise"), Bytes::new()).await;
    assert_eq!(raised.kind(), ErrorKind::Function, "{raised:?}");
    assert_eq!(raised.status, None, "the FDK's answer went to the client");
    let details = &raised.finished.as_ref().expect("CallFinished").details;
    assert!(details.contains("function failed"), "{details}");
    assert!(!details.contains("hunter2"), "{details}");

    let many = runner.run(py("headers"), Bytes::new()).await;
    many.assert_ok(200);
    assert_eq!(many.pid(), pid, "the instance that raised serves on");
    for i in [0, 89] {
        assert_eq!(many.header(&format!("x-h{i}")), Some(format!("v{i}")));
    }
    runner.stop().await;
}

/// The runner's server tells every connection how many streams it may have open at once
/// (HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`), where tonic's default sent no limit and
/// one peer could open any number of Engage streams, each a task held until its first
/// message's timeout.
#[tokio::test]
async fn the_server_bounds_the_streams_one_connection_may_open() {
    let dir = shared_tempdir();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(dir.path(), dir.path().join("s"))
            .with_function_user(function_user()),
    )
    .expect("process driver");
    let pool = Pool::new(Arc::new(driver), MEMORY_MB, START_TIMEOUT);
    let service = RunnerService::new(pool, EngageConfig::default(), &mut Registry::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local address");
    // Plaintext: the settings are the same under TLS, and an h2 client reads them here.
    let incoming = fn_tls::grpc_incoming(&fn_tls::TlsMode::Insecure, listener).expect("server");
    let stop = CancellationToken::new();
    let server = fn_runner::grpc_server()
        .layer(EngageFirst::new(service.clone().into_server()))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(server);

    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    // The answer to a request comes after the server's SETTINGS, which the client has
    // applied by then (any answer will do: this path has no service).
    let request = http::Request::post(format!("http://{address}/no.Such/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let mut client = client.ready().await.expect("ready");
    let (response, _) = client.send_request(request, true).expect("sent");
    tokio::time::timeout(RECV_BOUND, response)
        .await
        .expect("answered in time")
        .expect("an answer");
    assert_eq!(
        client.current_max_send_streams(),
        fn_runner::MAX_STREAMS_PER_CONNECTION as usize
    );
    stop.cancel();
}
