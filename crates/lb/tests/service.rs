//! Service tests of the lb-agent: the real HTTP front, invoker and dispatcher, in process,
//! over a [`StaticPool`] of scripted fake runners (tonic servers on loopback with mutual TLS),
//! driven by a real HTTP/1.1 client.
//!
//! Covered: at-most-once after commit (502, no second runner sees the call); 503 with
//! `Retry-After` when every runner refuses until the placer deadline; a refusal moves the call
//! to the next runner; an unreachable runner becomes a placeholder without costing later
//! calls anything; 404 / 405 / 413 as JSON; `Fn-Call-Id` on every response; a client that
//! goes away cancels the Engage stream; the metrics count each call by how it ended
//! (success, 404, 503, client gone), its placement attempts and its duration.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fn_lb::catalog::Catalog;
use fn_lb::dispatch::MAX_WARM_WAIT;
use fn_lb::{CatalogHandle, ClientLimits, DispatchConfig, Dispatcher, Front, Invoker};
use fn_lifecycle::{CancellationToken, Health};
use fn_nodepool::{CapacityTracker, ClientConfig, EjectionMetrics, RunnerPool, StaticPool};
use fn_placement::{
    ConsistentHashPlacer, NaivePlacer, PlacementKey, Placer, RunnerView, WarmPlacer,
};
use fn_protocol::runner::{RunnerState, WarmFunction};
use fn_test_support::TestPki;
use fn_test_support::fake_runner::{Behaviour, Ending, FakeRunner, RequestEnd};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio_stream::wrappers::ReceiverStream;

/// Bound for anything a test waits on.
const BOUND: Duration = Duration::from_secs(5);

const CATALOG: &str = r#"
[[functions]]
app = "demo"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 128
timeout = "30s"

[[functions]]
app = "demo"
name = "quick"
route = "/quick"
command = ["fn-echo"]
memory_mb = 128
timeout = "2s"
"#;

/// How the LB under test is built.
struct Options {
    placer: Arc<dyn Placer>,
    placer_timeout: Duration,
    max_request_body: u64,
    client: ClientConfig,
    limits: ClientLimits,
    warm_wait: Duration,
    catalog: String,
    body_idle_timeout: Duration,
    /// The first pause between two passes of a call no runner took.
    retry_initial: Duration,
    /// How long before the placer deadline the last pass starts at most.
    last_pass: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            placer: Arc::new(NaivePlacer::new()),
            placer_timeout: Duration::from_secs(10),
            max_request_body: 1024 * 1024,
            client: ClientConfig::default(),
            limits: ClientLimits::default(),
            warm_wait: DispatchConfig::default().warm_wait,
            catalog: CATALOG.to_owned(),
            body_idle_timeout: fn_lb::invoke::BODY_IDLE_TIMEOUT,
            retry_initial: DispatchConfig::default().retry_initial,
            last_pass: DispatchConfig::default().last_pass,
        }
    }
}

/// An LB serving HTTP on loopback; stops when dropped.
struct Lb {
    address: String,
    pool: Arc<StaticPool>,
    capacity: CapacityTracker,
    /// Where the LB's metrics are registered.
    registry: Registry,
    /// The LB's health: set NOT_SERVING, it drains (as during `FN_DRAIN_DELAY`).
    health: Health,
    cancel: CancellationToken,
}

impl Lb {
    /// Dials every runner of the group (each answers `Status` on the connection its calls
    /// will use), so that a test whose timing matters does not spend its short placer or
    /// connect timeout on a first TCP, TLS and HTTP/2 handshake in a debug build on a busy
    /// machine.
    async fn dial_runners(&self) {
        for runner in self.pool.runners("default").iter() {
            runner
                .status()
                .await
                .unwrap_or_else(|e| panic!("{} answers Status: {e}", runner.address()));
        }
    }

    /// The LB's metrics scrape.
    fn metrics(&self) -> String {
        fn_lifecycle::metrics::encode(&self.registry).expect("encodes")
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start_lb(pki: &TestPki, runners: &[&str], options: Options) -> Lb {
    let addresses: Vec<String> = runners.iter().map(|a| (*a).to_owned()).collect();
    let pool = Arc::new(StaticPool::new(&addresses, &pki.mode(), &options.client).expect("pool"));
    let dispatcher = Dispatcher::new(
        Arc::clone(&pool) as Arc<dyn RunnerPool>,
        options.placer,
        DispatchConfig {
            placer_timeout: options.placer_timeout,
            warm_wait: options.warm_wait,
            retry_initial: options.retry_initial,
            last_pass: options.last_pass,
            retry_max: options
                .retry_initial
                .max(DispatchConfig::default().retry_max),
            ..DispatchConfig::default()
        },
    );
    let capacity = CapacityTracker::new();
    let mut registry = Registry::default();
    let invoker = Invoker::new(
        dispatcher,
        capacity.clone(),
        options.max_request_body,
        &mut registry,
    )
    .with_body_idle_timeout(options.body_idle_timeout);
    let catalog = Catalog::parse(Path::new("test.toml"), &options.catalog).expect("catalog");
    let catalog = Arc::new(CatalogHandle::from_catalog("test.toml", catalog));
    let (health, _grpc) = Health::new(&[]);
    health.set_serving().await;
    let front = Front::with_limits(catalog, invoker, health.clone(), options.limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let cancel = CancellationToken::new();
    tokio::spawn(front.serve(listener, cancel.clone()));
    Lb {
        address,
        pool,
        capacity,
        registry,
        health,
        cancel,
    }
}

async fn fakes(pki: &TestPki, behaviours: &[Behaviour]) -> Vec<FakeRunner> {
    let mut runners = Vec::new();
    for (i, b) in behaviours.iter().enumerate() {
        runners.push(
            FakeRunner::start(&format!("fake-{i}"), &pki.mode(), *b)
                .await
                .expect("fake runner"),
        );
    }
    runners
}

fn addresses(runners: &[FakeRunner]) -> Vec<&str> {
    runners.iter().map(FakeRunner::address).collect()
}

/// A response; the body is `Err` when it was cut off.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    fn call_id(&self) -> &str {
        self.header("fn-call-id")
    }

    fn text(&self) -> String {
        let body = self.body.as_ref().expect("a complete body");
        String::from_utf8_lossy(body).into_owned()
    }

    /// Asserts a JSON error body `{"error": {"message": "..."}}` and returns the message.
    fn json_error(&self) -> String {
        assert_eq!(
            self.headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(b"application/json".as_slice()),
            "{self:?}"
        );
        let text = self.text();
        let message = text
            .trim_end()
            .strip_prefix("{\"error\":{\"message\":\"")
            .and_then(|rest| rest.strip_suffix("\"}}"))
            .unwrap_or_else(|| panic!("not a JSON error body: {text}"));
        assert!(!message.is_empty());
        message.to_owned()
    }
}

/// Sends `req` on a new connection and reads the whole response, bounded.
async fn send<B>(address: &str, req: Request<B>) -> Reply
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    on_one_connection(address, vec![req])
        .await
        .pop()
        .expect("one reply")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends the requests one after the other on one keep-alive connection; the replies, or
/// why one failed.
async fn on_one_connection<B>(
    address: &str,
    requests: Vec<Request<B>>,
) -> Vec<Result<Reply, String>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut replies = Vec::new();
        for req in requests {
            let reply = async {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("not reusable: {e}"))?;
                let response = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("no response: {e}"))?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(http_body_util::Collected::to_bytes)
                    .map_err(|e| e.to_string());
                Ok(Reply {
                    status,
                    headers,
                    body,
                })
            };
            replies.push(reply.await);
        }
        replies
    };
    tokio::time::timeout(BOUND * 2, exchange)
        .await
        .expect("the LB answers in time")
}

/// An HTTP/2 (prior knowledge) connection to `address`, driven by a task of its own.
async fn h2c(address: &str) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// Sends an empty-bodied `method` request to `uri` on `sender` and returns the answer's
/// head, failing the test when none comes within [`BOUND`].
async fn h2_empty(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    method: Method,
    uri: http::Uri,
) -> http::Response<hyper::body::Incoming> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response")
}

/// [`h2c`] with the client's own flow-control windows (`None`: hyper's), and the task that
/// drives the connection (it ends when the connection does).
async fn h2c_windows<B>(
    address: &str,
    stream_window: u32,
    connection_window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.initial_stream_window_size(stream_window);
    if let Some(window) = connection_window {
        builder.initial_connection_window_size(window);
    }
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

fn request(method: Method, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "lb.test")
        .body(Full::new(body.into()))
        .expect("request")
}

async fn post(lb: &Lb, path: &str, body: impl Into<Bytes>) -> Reply {
    send(&lb.address, request(Method::POST, path, body)).await
}

#[tokio::test]
async fn echo_through_a_fake_runner_is_byte_exact_and_the_runner_sees_the_lbs_call_id() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    // Not a multiple of the frame size, every byte value present.
    let body: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    let mut req = request(Method::POST, "/r/demo/echo", body.clone());
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-test".parse().expect("hv"),
    );
    let reply = send(&lb.address, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body.as_deref().ok(), Some(body.as_slice()));
    assert_eq!(reply.header("content-type"), "application/x-test");
    assert_eq!(reply.header("x-fake-runner"), "fake-0");
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, reply.call_id(), "Fn-Call-Id is the call's id");
    let id = uuid::Uuid::parse_str(reply.call_id()).expect("the call id is a UUID");
    assert_eq!(
        id.hyphenated().to_string(),
        reply.call_id(),
        "in its lower-case hyphenated form"
    );
    assert_eq!(id.get_version_num(), 4, "a random one");
    assert_eq!(seen[0].request_url, "http://lb.test/r/demo/echo");
    assert_eq!(
        (seen[0].app.as_str(), seen[0].function.as_str()),
        ("demo", "echo")
    );
    assert_eq!(seen[0].memory_mb, 128);
    assert_eq!(
        lb.capacity.snapshot().get("default"),
        Some(&0),
        "the call's memory is released when it ends"
    );
}

// A function whose config makes the message offering a call larger than any runner accepts
// (4 MiB): the LB says so without sending it, and a runner never sees it. The function next
// to it is served as before.
#[tokio::test]
async fn a_call_too_large_to_offer_gets_500_naming_the_config_and_reaches_no_runner() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let big = "x".repeat(fn_protocol::framing::MAX_MESSAGE_BYTES);
    let catalog = format!(
        "{CATALOG}\n[[functions]]\napp = \"demo\"\nname = \"big\"\nroute = \"/big\"\n\
         command = [\"fn-echo\"]\nmemory_mb = 128\ntimeout = \"30s\"\n\
         [functions.config]\nBIG = \"{big}\"\n"
    );
    let options = Options {
        catalog,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let reply = post(&lb, "/r/demo/big", "hello").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    let text = String::from_utf8_lossy(reply.body.as_deref().expect("a whole body"));
    assert!(
        text.contains("over the 4194304 a runner accepts: shorten the function's config"),
        "{text}"
    );
    assert!(runners[0].seen().is_empty(), "no runner saw the call");
    let reply = post(&lb, "/r/demo/echo", "hello").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(runners[0].seen().len(), 1);
    assert_eq!(
        lb.capacity.snapshot().get("default"),
        Some(&0),
        "the refused call's memory was released"
    );
}

#[tokio::test]
async fn a_runner_failing_after_commit_gives_502_and_no_other_runner_sees_the_call() {
    for dies in [Behaviour::CommitThenFail, Behaviour::CommitThenHangUp] {
        let pki = TestPki::new();
        // Naive order starts at index 0: the dying runner is offered the call first, and the
        // two healthy runners are next in line if the LB ever (wrongly) re-placed it.
        let runners = fakes(&pki, &[dies, Behaviour::Echo, Behaviour::Echo]).await;
        let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
        let reply = post(&lb, "/r/demo/echo", "hello").await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{dies:?}: {reply:?}");
        let message = reply.json_error();
        // What failed, not where: the runner's address is in the LB's log, not the answer.
        assert!(
            message.contains("failed after a runner took it")
                && !message.contains(runners[0].address()),
            "{message}"
        );
        assert!(reply.headers.get(header::RETRY_AFTER).is_none());
        assert!(runners[0].saw(reply.call_id()), "{dies:?}");
        assert_eq!(runners[0].seen().len(), 1, "{dies:?}: offered once");
        for other in &runners[1..] {
            assert!(
                other.seen().is_empty(),
                "{dies:?}: {} saw a committed call: {:?}",
                other.name(),
                other.seen()
            );
        }
        assert_eq!(lb.capacity.snapshot().get("default"), Some(&0));
    }
}

/// A call that fails once its answer has started is logged once, with its call id (the
/// client holds that id in `Fn-Call-Id`): the body is polled outside the call's span, so the
/// line names the id itself.
#[tokio::test]
async fn a_call_cut_off_mid_response_is_logged_once_under_its_call_id() {
    // This test's runtime has one thread: the LB's tasks log on it.
    let (captured, _subscriber) = capture_logs(tracing::Level::INFO);
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::CommitThenDieMidResponse]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    // tracing caches whether an event is wanted when a thread first meets it; another test's
    // thread meeting it just as this test's subscriber came in may have cached "never" for
    // every thread (tracing-core registers the callsite, then reads the subscribers).
    // Worked out again now, with this subscriber in place.
    tracing::callsite::rebuild_interest_cache();
    let (conn, response) =
        start_request(&lb.address, request(Method::POST, "/r/demo/echo", "hello")).await;
    // Whether hyper flushed the head before the cut or not, the answer is broken.
    let outcome = async {
        let response = response.await.expect("task")?;
        response.into_body().collect().await.map(|_| ())
    };
    let outcome = tokio::time::timeout(BOUND, outcome)
        .await
        .expect("the LB ends the response in time");
    assert!(outcome.is_err(), "the answer is cut off");
    conn.abort();
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 1);
    let call_id = seen[0].id.clone();
    let line = the_cut_off_line(&captured);
    assert!(
        line.contains(&format!("call_id={call_id}")),
        "under the call's id {call_id}: {}",
        line
    );
}

/// A client's own error after its answer started (its body went over the limit) is logged
/// at debug level, as its errors before the answer are: a client sending such requests by
/// the thousand cannot fill the log at INFO.
#[tokio::test]
async fn a_body_over_the_limit_after_the_answer_started_is_logged_at_debug() {
    // This test's runtime has one thread: the LB's tasks log on it.
    let (captured, _subscriber) = capture_logs(tracing::Level::DEBUG);
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::AnswerHeadFirst]).await;
    let options = Options {
        max_request_body: 10,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    // As in the test above: worked out again with this subscriber in place.
    tracing::callsite::rebuild_interest_cache();
    let (tx, req) = fed("/r/demo/echo");
    tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
        .await
        .expect("send");
    let stream = tokio::net::TcpStream::connect(&lb.address)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("the head in time")
        .expect("a head");
    assert_eq!(response.status(), StatusCode::OK);
    // Past the limit of 10 once the answer has started.
    tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 64]))))
        .await
        .expect("send");
    let outcome = tokio::time::timeout(BOUND, response.into_body().collect())
        .await
        .expect("the LB ends the response in time");
    assert!(outcome.is_err(), "the answer is cut off");
    conn.abort();
    let line = the_cut_off_line(&captured);
    assert!(line.contains("over the limit of 10 bytes"), "{}", line);
    assert!(
        line.contains(" DEBUG ") && !line.contains(" INFO "),
        "at debug level: {}",
        line
    );
}

/// The one line `captured` holds of a call cut off after its answer started.
fn the_cut_off_line(captured: &std::sync::Mutex<Vec<u8>>) -> String {
    let text = String::from_utf8_lossy(&captured.lock().expect("lock")).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("call failed after its response started"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once:\n{text}");
    lines[0].to_owned()
}

/// A log sink for the tests of the LB's log lines.
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

/// Captures this thread's log lines up to `level`, as text, until the guard drops.
fn capture_logs(
    level: tracing::Level,
) -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    let captured = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = {
        let captured = Arc::clone(&captured);
        move || Capture(Arc::clone(&captured))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    (
        captured,
        fn_test_support::logs::scoped_subscriber(subscriber),
    )
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_runner_dying_mid_response_cuts_the_response_and_the_call_is_not_replaced() {
    let pki = TestPki::new();
    let runners = fakes(
        &pki,
        &[
            Behaviour::CommitThenDieMidResponse,
            Behaviour::Echo,
            Behaviour::Echo,
        ],
    )
    .await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let (conn, response) =
        start_request(&lb.address, request(Method::POST, "/r/demo/echo", "hello")).await;
    let outcome = async {
        let response = response.await.expect("task")?;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "only a 200 head can precede a cut"
        );
        response.into_body().collect().await.map(|_| ())
    };
    let outcome = tokio::time::timeout(BOUND, outcome)
        .await
        .expect("the LB ends the response in time");
    // Whether hyper flushed the head before the cut or not, the client must see a broken
    // response, never a clean end.
    assert!(outcome.is_err(), "the response ended cleanly");
    conn.abort();
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].ending, Ending::Failed);
    assert!(
        runners[1].seen().is_empty() && runners[2].seen().is_empty(),
        "a committed call was offered again"
    );
    wait_released(&lb).await;
}

/// A 503 says why: a group whose runners are all unreachable is not told "no room" (which
/// sends operators after capacity), and neither is one with no runner at all.
#[tokio::test]
async fn a_group_with_no_reachable_runner_gets_a_503_that_says_so() {
    let pki = TestPki::new();
    let closed = |_| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let addresses: Vec<String> = (0..2).map(closed).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let options = || Options {
        placer_timeout: Duration::from_millis(600),
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses, options()).await;
    let reply = post(&lb, "/r/demo/echo", "anyone").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(reply.headers.get("retry-after").is_some(), "{reply:?}");
    let message = reply.json_error();
    assert!(
        message.contains("no runner of LB group default is reachable")
            && message.contains("all 2 of its runners are unreachable or ejected"),
        "{message}"
    );
    assert!(
        lb.metrics()
            .contains("fn_lb_calls_total{outcome=\"no_runner_reachable\"} 1\n")
    );

    let empty = start_lb(&pki, &[], options()).await;
    let reply = post(&empty, "/r/demo/echo", "anyone").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(reply.json_error().contains("it has none"), "{reply:?}");
}

/// During an outage the LB's own answers (here: a group with no runner) are logged through
/// a throttle, one line a second, and the next line says how many it held back: a client
/// sending thousands of calls a second made as many INFO lines. Every call is counted.
#[tokio::test]
async fn failures_no_runner_took_are_logged_at_most_once_a_second_with_the_count_held_back() {
    // This test's runtime has one thread: the LB's tasks log on it.
    let (captured, _subscriber) = capture_logs(tracing::Level::INFO);
    let pki = TestPki::new();
    let options = Options {
        placer_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let lb = start_lb(&pki, &[], options).await;
    // As in the cut-off tests: worked out again with this subscriber in place.
    tracing::callsite::rebuild_interest_cache();
    let interval = fn_lb::failure_log::UNPLACED_LOG_INTERVAL;
    let started = Instant::now();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let address = lb.address.clone();
            tokio::spawn(async move {
                send(&address, request(Method::POST, "/r/demo/echo", "anyone")).await
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("task");
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    }
    // One interval on, the next failure's line says how many were held back.
    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    let reply = post(&lb, "/r/demo/echo", "anyone").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    let text = String::from_utf8_lossy(&captured.lock().expect("lock")).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("call failed"))
        .collect();
    // At most one a second from the first, however the 201 spread over the test's time.
    let seconds = started.elapsed().as_secs_f64() / interval.as_secs_f64();
    assert!(
        lines.len() as f64 <= seconds.ceil() + 1.0,
        "{} lines for 201 failures in {seconds:.1} s:\n{}",
        lines.len(),
        lines[..lines.len().min(5)].join("\n")
    );
    // Each line stands for itself and those it held back: all 201 are accounted for.
    let held_back: Vec<u64> = lines
        .iter()
        .map(|l| {
            l.split_once("held_back=")
                .and_then(|(_, n)| n.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no held_back count in {l}"))
        })
        .collect();
    assert_eq!(
        held_back.iter().sum::<u64>() + lines.len() as u64,
        201,
        "{}",
        lines.join("\n")
    );
    assert!(held_back.iter().any(|&n| n > 0), "{}", lines.join("\n"));
    assert!(
        lb.metrics()
            .contains("fn_lb_calls_total{outcome=\"no_runner_reachable\"} 201\n"),
        "every failure is counted"
    );
}

#[tokio::test]
async fn refusal_by_every_runner_until_the_placer_deadline_gives_503_with_retry_after() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Refuse, Behaviour::Refuse]).await;
    let placer_timeout = Duration::from_millis(300);
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer_timeout,
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "hello").await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    let retry_after: u64 = reply
        .header("retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    reply.json_error();
    // The deadline was waited out (the last pass starts just before it), not more.
    assert!(
        elapsed >= placer_timeout - Duration::from_millis(100)
            && elapsed < placer_timeout + Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    for runner in &runners {
        let offers = runner
            .seen()
            .iter()
            .filter(|c| c.id == reply.call_id())
            .count();
        assert!(
            offers >= 2,
            "{}: whole passes are retried; offered {offers} times",
            runner.name()
        );
        assert!(runner.seen().iter().all(|c| c.ending == Ending::Refused));
    }
    assert_eq!(lb.capacity.snapshot().get("default"), Some(&0));
    let text = lb.metrics();
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"no_capacity\"} 1\n"),
        "{text}"
    );
    let offers: usize = runners.iter().map(|r| r.seen().len()).sum();
    assert!(
        text.contains(&format!("fn_lb_placement_attempts_total {offers}\n")),
        "{offers} offers: {text}"
    );
    assert!(text.contains("fn_lb_placement_seconds_count 0\n"), "{text}");
}

#[tokio::test]
async fn a_refusing_runner_moves_the_call_to_the_next_in_the_placers_order() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo; 4]).await;
    // With `ch`, the function's home runner refuses: the call walks to the next index.
    let key = PlacementKey::new("demo", "echo");
    let home = ConsistentHashPlacer::new()
        .order(&key, runners.len())
        .next()
        .expect("non-empty");
    let next = (home + 1) % runners.len();
    runners[home].set_behaviour(Behaviour::Refuse);
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer: Arc::new(ConsistentHashPlacer::new()),
            ..Options::default()
        },
    )
    .await;
    for _ in 0..3 {
        let reply = post(&lb, "/r/demo/echo", "hello").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.text(), "hello");
        assert_eq!(reply.header("x-fake-runner"), runners[next].name());
        assert!(
            runners[home].saw(reply.call_id()),
            "the home runner is asked first"
        );
    }
    for (i, runner) in runners.iter().enumerate() {
        if i != home && i != next {
            assert!(
                runner.seen().is_empty(),
                "{}: {:?}",
                runner.name(),
                runner.seen()
            );
        }
    }
    // Once the home runner has room again, the function goes back to it.
    runners[home].set_behaviour(Behaviour::Echo);
    let reply = post(&lb, "/r/demo/echo", "back").await;
    assert_eq!(reply.header("x-fake-runner"), runners[home].name());
}

#[tokio::test]
async fn unreachable_runners_become_placeholders_and_calls_succeed_on_the_others_quickly() {
    let pki = TestPki::new();
    // A closed port (connection refused) and a port that accepts TCP but never speaks TLS.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_address = silent.local_addr().expect("addr").to_string();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let client = ClientConfig {
        connect_timeout: Duration::from_millis(200),
        ack_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let lb = start_lb(
        &pki,
        &[&closed, &silent_address, runners[0].address()],
        Options {
            client,
            ..Options::default()
        },
    )
    .await;

    // The first call meets both dead runners (naive starts at index 0) and pays at most
    // their connect/ack bounds, far below the call's 30 s deadline and the 10 s placer timeout.
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "first").await;
    let first = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "first");
    // The placer timeout paid (10 s) would be twice this.
    assert!(first < Duration::from_secs(5), "first call took {first:?}");
    let list = lb.pool.runners("default");
    assert!(!list[0].is_available(), "refused connection: placeholder");
    assert!(!list[1].is_available(), "no answer in time: placeholder");
    assert!(list[2].is_available());
    assert_eq!(list.len(), 3, "placeholders keep their slots");

    // Later calls skip the placeholders without offering them anything: each is offered to
    // the live runner alone, once (a timing bound here would be a throughput target on a
    // loaded machine).
    let attempts = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("fn_lb_placement_attempts_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no attempts counter in {text}"))
    };
    let before = attempts(lb.metrics());
    for i in 0..6 {
        let reply = post(&lb, "/r/demo/echo", format!("call {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.text(), format!("call {i}"));
    }
    assert_eq!(runners[0].seen().len(), 7);
    assert_eq!(
        attempts(lb.metrics()) - before,
        6,
        "a call was offered to a placeholder"
    );
    drop(silent);
}

#[tokio::test]
async fn calls_are_counted_by_outcome_and_timed() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    const CALLS: usize = 3;
    for i in 0..CALLS {
        let reply = post(&lb, "/r/demo/echo", format!("call {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let reply = post(&lb, "/r/demo/nope", "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let text = lb.metrics();
    assert!(
        text.contains(&format!(
            "fn_lb_calls_total{{outcome=\"success\"}} {CALLS}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"not_found\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("fn_lb_call_duration_seconds_count {CALLS}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("fn_lb_placement_seconds_count {CALLS}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("fn_lb_placement_attempts_total {CALLS}\n")),
        "{text}"
    );
    assert!(text.contains("fn_lb_calls_in_flight 0\n"), "{text}");
}

#[tokio::test]
async fn unknown_functions_and_paths_get_404_json() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for (method, path) in [
        (Method::GET, "/r/demo/nope"),
        (Method::POST, "/r/other/echo"),
        (Method::POST, "/r/demo/echo/extra"),
        (Method::POST, "/r/demo"),
        (Method::POST, "/invoke/demo/nope"),
        (Method::POST, "/invoke/demo"),
        (Method::GET, "/"),
        (Method::GET, "/nothing/here"),
    ] {
        let reply = send(&lb.address, request(method.clone(), path, "")).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method} {path}");
        let message = reply.json_error();
        assert!(message.contains(path), "{path}: {message}");
        // And says where calls go.
        assert!(message.contains("/r/{app}/{route}"), "{path}: {message}");
        reply.call_id();
    }
    assert!(runners[0].seen().is_empty());
}

#[tokio::test]
async fn invoke_takes_post_only_and_get_gets_405_with_allow() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let reply = send(
            &lb.address,
            request(method.clone(), "/invoke/demo/echo", ""),
        )
        .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.header("allow"), "POST");
        reply.json_error();
        reply.call_id();
    }
    assert!(runners[0].seen().is_empty(), "rejected before placement");
    let reply = post(&lb, "/invoke/demo/echo", "by name").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "by name");
    // A query string does not change the route.
    let reply = post(&lb, "/r/demo/echo?a=b&c", "query").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "query");
    // The route form takes any method...
    let reply = send(&lb.address, request(Method::PUT, "/r/demo/echo", "put")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "put");
    // ...but CONNECT, whose 2xx answer would make the connection a tunnel.
    let head = raw_head(
        &lb.address,
        "CONNECT /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.contains("\r\nallow: GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH\r\n"),
        "{head}"
    );
    let seen = runners[0].seen().len();
    assert_eq!(seen, 3, "CONNECT reached no runner");
    let reply = post(&lb, "/health", "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), "GET, HEAD");
}

/// Writes `request` on a new connection; the response head that comes back, bounded.
async fn raw_head(address: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("the LB answers in time")
}

#[tokio::test]
async fn a_content_length_over_the_limit_gets_413_without_reaching_a_runner() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let limit = 1024;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            max_request_body: limit,
            ..Options::default()
        },
    )
    .await;
    let reply = post(&lb, "/r/demo/echo", vec![b'x'; limit as usize + 1]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    assert!(reply.json_error().contains("FN_MAX_REQUEST_BODY"));
    reply.call_id();
    assert!(runners[0].seen().is_empty());
    // Exactly at the limit is fine.
    let at_limit = vec![b'y'; limit as usize];
    let reply = post(&lb, "/r/demo/echo", at_limit.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body.as_deref().ok(), Some(at_limit.as_slice()));
}

/// What a runner would refuse in a client's request is the client's error (4xx), found
/// before placement, not the function's (500 "runners refuse this function").
#[tokio::test]
async fn requests_beyond_what_a_runner_takes_get_4xx_without_reaching_a_runner() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let max = fn_protocol::call::MAX_URL_LEN;
    let prefix = "http://lb.test/r/demo/echo?q=";
    let path_at = |len: usize| format!("/r/demo/echo?q={}", "x".repeat(len - prefix.len()));

    let reply = post(&lb, &path_at(max + 1), "").await;
    assert_eq!(reply.status, StatusCode::URI_TOO_LONG, "{reply:?}");
    assert!(reply.json_error().contains("request URL"), "{reply:?}");
    reply.call_id();

    let mut tabbed = request(Method::POST, "/r/demo/echo", "");
    tabbed
        .headers_mut()
        .insert(header::HOST, HeaderValue::from_static("lb\ttest"));
    let reply = send(&lb.address, tabbed).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert!(reply.json_error().contains("Host"), "{reply:?}");

    // 300 headers: HTTP/1.1 stops at 100, so over h2.
    let mut sender = h2c(&lb.address).await;
    let mut many = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address));
    for i in 0..300 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let many = many.body(Full::new(Bytes::new())).expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(many))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert!(runners[0].seen().is_empty(), "no runner saw any of them");

    // At the limit, the call goes through.
    let reply = post(&lb, &path_at(max), "at the limit").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body.as_deref().ok(), Some(b"at the limit".as_slice()));
}

/// A streamed request body, sent with chunked encoding.
type ChunkedBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A request whose body is sent in `chunks`, without a Content-Length (chunked encoding).
fn chunked(path: &str, chunks: Vec<Bytes>) -> Request<ChunkedBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
    for chunk in chunks {
        tx.try_send(Ok(Frame::data(chunk)))
            .expect("room for every chunk");
    }
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, "lb.test")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request")
}

#[tokio::test]
async fn a_chunked_body_growing_over_the_limit_gets_413_and_the_runner_is_cancelled() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let limit = 4096u64;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            max_request_body: limit,
            ..Options::default()
        },
    )
    .await;
    let chunks = vec![Bytes::from(vec![b'z'; 1500]); 4]; // 6000 bytes > 4096
    let reply = send(&lb.address, chunked("/r/demo/echo", chunks)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");
    reply.json_error();
    let id = reply.call_id().to_owned();
    assert_eq!(
        runners[0].wait_ended(&id, BOUND).await.expect("ends"),
        Ending::LbWentAway,
        "the committed call is cancelled on the runner"
    );
    let seen = runners[0].seen();
    assert!(seen[0].body_bytes <= limit, "{seen:?}");
    // A chunked body within the limit streams through whole.
    let chunks = vec![Bytes::from(vec![b'w'; 1000]); 4];
    let reply = send(&lb.address, chunked("/r/demo/echo", chunks)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.body.as_deref().ok(),
        Some(vec![b'w'; 4000].as_slice())
    );
}

/// A chunked POST to the echo function whose body the returned sender feeds.
fn fed(
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    Request<ChunkedBody>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, "lb.test")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request");
    (tx, req)
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_gets_408_and_a_slow_steady_one_goes_through() {
    // Seconds, so that a stall of the loaded machine between two chunks of the steady
    // body (IDLE / 6 apart) is not a pause as long as the limit.
    const IDLE: Duration = Duration::from_secs(2);
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let options = Options {
        body_idle_timeout: IDLE,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;

    // Twelve bytes a sixth of the limit apart: twice the limit in all, no pause as long
    // (nor near it: a thread stalled on a busy machine must not make one).
    let (tx, req) = fed("/r/demo/echo");
    let feeding = tokio::spawn(async move {
        for i in 0..12 {
            let chunk = Bytes::from(format!("{:x}", i));
            tx.send(Ok(Frame::data(chunk))).await.expect("send");
            tokio::time::sleep(IDLE / 6).await;
        }
    });
    let reply = send(&lb.address, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "0123456789ab");
    feeding.await.expect("fed");

    // One byte, then nothing (the sender stays open).
    let (tx, req) = fed("/r/demo/echo");
    tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
        .await
        .expect("send");
    let started = Instant::now();
    let reply = send(&lb.address, req).await;
    assert_eq!(reply.status, StatusCode::REQUEST_TIMEOUT, "{reply:?}");
    let message = reply.json_error();
    assert!(message.contains("stalled"), "{message}");
    assert!(started.elapsed() >= IDLE, "{:?}", started.elapsed());
    drop(tx);
    let seen = runners[0]
        .wait_until(BOUND, |seen| {
            seen.len() == 2 && seen.iter().all(|c| c.ending != Ending::Open)
        })
        .await
        .expect("both calls ended on the runner");
    assert_eq!(seen[1].ending, Ending::LbWentAway, "{seen:?}");
    assert!(
        lb.metrics().contains(r#"outcome="bad_request""#),
        "{}",
        lb.metrics()
    );
}

#[tokio::test]
async fn every_response_carries_a_distinct_fn_call_id() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo, Behaviour::Echo]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer_timeout: Duration::from_millis(100),
            max_request_body: 10,
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    let mut ids = Vec::new();
    let mut check = |reply: Reply, status: StatusCode| {
        assert_eq!(reply.status, status, "{reply:?}");
        let id = reply.call_id().to_owned();
        assert_eq!(id.len(), 36, "a UUID: {id}");
        ids.push(id);
    };
    check(
        send(&lb.address, request(Method::GET, "/health", "")).await,
        StatusCode::OK,
    );
    check(post(&lb, "/r/demo/echo", "ok").await, StatusCode::OK);
    check(post(&lb, "/r/demo/nope", "").await, StatusCode::NOT_FOUND);
    check(
        send(&lb.address, request(Method::GET, "/invoke/demo/echo", "")).await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    check(
        send(&lb.address, request(Method::POST, "/health", "")).await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    check(
        post(&lb, "/r/demo/echo", "far too long").await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    runners[0].set_behaviour(Behaviour::CommitThenFail);
    runners[1].set_behaviour(Behaviour::CommitThenFail);
    check(
        post(&lb, "/r/demo/echo", "x").await,
        StatusCode::BAD_GATEWAY,
    );
    runners[0].set_behaviour(Behaviour::Refuse);
    runners[1].set_behaviour(Behaviour::Refuse);
    check(
        post(&lb, "/r/demo/echo", "x").await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat: {ids:?}");
}

/// Starts a request on its own connection; returns the connection task (abort it to make the
/// client go away) and the response head, once it arrives.
async fn start_request(
    address: &str,
    req: Request<Full<Bytes>>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>,
) {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("client connection: {e}");
        }
    });
    let response = tokio::spawn(async move { sender.send_request(req).await });
    (conn, response)
}

#[tokio::test]
async fn a_client_that_goes_away_before_the_response_cancels_the_engage_stream() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::CommitThenStall]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let (conn, response) =
        start_request(&lb.address, request(Method::POST, "/r/demo/echo", "hi")).await;
    let seen = runners[0]
        .wait_until(BOUND, |seen| !seen.is_empty())
        .await
        .expect("the call reaches the runner");
    conn.abort();
    response.abort();
    let ending = runners[0]
        .wait_ended(&seen[0].id, BOUND)
        .await
        .expect("cancelled in time");
    assert_eq!(ending, Ending::LbWentAway);
    wait_released(&lb).await;
    let text = lb.metrics();
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"client_gone\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("fn_lb_calls_in_flight 0\n"), "{text}");
}

/// The offers made for a call whose client leaves while it waits for room are counted
/// (`fn_lb_placement_attempts_total` is counted as each offer goes, not when placement
/// returns, which such a call never does).
#[tokio::test]
async fn offers_for_a_call_whose_client_leaves_during_placement_are_counted() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Refuse]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let (conn, response) =
        start_request(&lb.address, request(Method::POST, "/r/demo/echo", "hi")).await;
    runners[0]
        .wait_until(BOUND, |seen| seen.len() >= 2)
        .await
        .expect("the call is offered and refused twice");
    conn.abort();
    response.abort();
    wait_released(&lb).await;
    let offered = runners[0].seen().len() as u64;
    let text = lb.metrics();
    let counted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fn_lb_placement_attempts_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempts counter in {text}"));
    // One more where the client left just as an offer went out, before the runner had it.
    assert!(
        counted == offered || counted == offered + 1,
        "{counted} counted for {offered} offers the runner saw"
    );
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"client_gone\"} 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_mid_response_cancels_the_engage_stream() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::AnswerHeadThenStall]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let (conn, response) =
        start_request(&lb.address, request(Method::POST, "/r/demo/echo", "hi")).await;
    let mut response = tokio::time::timeout(BOUND, response)
        .await
        .expect("head in time")
        .expect("task")
        .expect("head");
    assert_eq!(response.status(), StatusCode::OK);
    let first = tokio::time::timeout(BOUND, response.body_mut().frame())
        .await
        .expect("first chunk in time")
        .expect("a frame")
        .expect("data");
    assert_eq!(
        first.into_data().ok().as_deref(),
        Some(b"partial".as_slice())
    );
    let id = runners[0].seen()[0].id.clone();
    drop(response);
    conn.abort();
    // The call's deadline is 30 s: the stream must end because the client left, not later.
    let ending = runners[0]
        .wait_ended(&id, BOUND)
        .await
        .expect("cancelled in time");
    assert_eq!(ending, Ending::LbWentAway);
    wait_released(&lb).await;
}

/// Waits until the LB has released every call's memory.
async fn wait_released(lb: &Lb) {
    let deadline = Instant::now() + BOUND;
    while lb.capacity.snapshot().get("default").copied().unwrap_or(0) != 0 {
        assert!(
            Instant::now() < deadline,
            "capacity not released: {:?}",
            lb.capacity.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_like_http1() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let mut sender = h2c(&lb.address).await;
    let body = vec![7u8; 100_000];
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let id = response
        .headers()
        .get("fn-call-id")
        .expect("Fn-Call-Id")
        .to_str()
        .expect("ascii")
        .to_owned();
    let echoed = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(echoed.as_ref(), body.as_slice());
    assert!(runners[0].saw(&id));
}

/// Over HTTP/2, a call whose body is not being read (here: while its placement waits for
/// an acknowledgement) holds only its own stream's window: the client's other calls on the
/// connection still send their bodies and are answered. The connection's window was
/// hyper's default, the size of one stream's, so one such call stopped every upload beside
/// it.
#[tokio::test]
async fn an_h2_call_whose_body_is_not_read_does_not_stop_the_others_on_its_connection() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    runners[0].script([Behaviour::NeverAcknowledge]);
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            max_request_body: 16 * 1024 * 1024,
            // The first call stays in placement for the whole test.
            placer_timeout: Duration::from_secs(30),
            client: ClientConfig {
                ack_timeout: Duration::from_secs(30),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let stream = tokio::net::TcpStream::connect(&lb.address)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&taken);
    let chunks = (0..16).map(move |_| {
        counter.fetch_add(256 * 1024, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![1u8; 256 * 1024])))
    });
    let waiting = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .header(header::CONTENT_LENGTH, 16 * 256 * 1024)
        .body(http_body_util::Either::Left(StreamBody::new(
            futures::stream::iter(chunks),
        )))
        .expect("request");
    let held = tokio::spawn(sender.send_request(waiting));
    let deadline = Instant::now() + BOUND;
    while runners[0].seen().is_empty() {
        assert!(Instant::now() < deadline, "the first call was not offered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its body has filled its stream's window at the LB (hyper's client reads ahead).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let far = taken.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (256 * 1024..16 * 256 * 1024).contains(&far),
        "the first body went {far} bytes"
    );
    // More than the rest of a connection window the size of a stream's.
    let body = vec![7u8; 300_000];
    let other = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(http_body_util::Either::Right(Full::new(Bytes::from(
            body.clone(),
        ))))
        .expect("request");
    let answer = async {
        let response = sender.send_request(other).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    };
    let echoed = tokio::time::timeout(BOUND, answer)
        .await
        .expect("the second call's body stalled behind the first's");
    assert_eq!(echoed.as_ref(), body.as_slice());
    assert!(!held.is_finished(), "the first call ended");
    held.abort();
}

#[tokio::test]
async fn an_h2_client_that_answers_no_ping_is_closed_and_a_huge_h2_head_reaches_no_runner() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    // The interval between pings and the wait for an answer: a client whose answer is late
    // by more than this (its thread stalled on a busy machine) is closed too.
    let ping = Duration::from_millis(500);
    let limits = ClientLimits {
        ping,
        ..ClientLimits::default()
    };
    let options = Options {
        limits,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;

    // The preface and an empty SETTINGS frame, then silence: no ping is answered.
    let mut silent = tokio::net::TcpStream::connect(&lb.address)
        .await
        .expect("connect");
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let started = Instant::now();
    let closed = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // SETTINGS, PING, GOAWAY
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after {BOUND:?}");
    assert!(started.elapsed() >= ping);

    // A head of 60 KiB goes through, as it would over HTTP/1.1 (hyper's h2 default took
    // 16 KiB), and one of 300 KiB reaches no runner (the LB takes 128 KiB). HPACK sends a
    // repeated header as a one-byte reference, so its block on the wire is small.
    let mut sender = h2c(&lb.address).await;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from_static(b"large")))
        .expect("request");
    let value = HeaderValue::from_str(&"c".repeat(3000)).expect("value");
    for _ in 0..20 {
        req.headers_mut().append(header::COOKIE, value.clone());
    }
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    assert_eq!(
        runners[0].seen().len(),
        1,
        "the large head reached the runner"
    );
    let mut sender = h2c(&lb.address).await;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from_static(b"big")))
        .expect("request");
    let value = HeaderValue::from_str(&"a".repeat(3000)).expect("value");
    for _ in 0..100 {
        req.headers_mut().append("x-big", value.clone());
    }
    let answered = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time");
    if let Ok(response) = &answered {
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{response:?}"
        );
    }
    assert_eq!(runners[0].seen().len(), 1, "no call for the huge head");
    // A client that answers pings stays, and its calls go through.
    let mut sender = h2c(&lb.address).await;
    tokio::time::sleep(ping * 3).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from_static(b"pinged")))
        .expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("the connection is still open");
    assert_eq!(response.status(), StatusCode::OK);
}

/// An HTTP/2 client that never opens a stream's flow-control window gets the answer's head
/// and no byte of its body: hyper stops polling the body, and without a send timeout of its
/// own the call held its capacity (and the runner's stream) until the client went away.
#[tokio::test]
async fn an_h2_stream_whose_window_stays_shut_is_given_up_after_the_send_timeout() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let limits = ClientLimits {
        send_timeout: Duration::from_millis(500),
        ..ClientLimits::default()
    };
    let options = Options {
        limits,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let (mut sender, _conn) = h2c_windows(&lb.address, 0, None).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from_static(b"held")))
        .expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("the head needs no window");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        lb.capacity.snapshot().get("default"),
        Some(&128),
        "in flight"
    );
    let deadline = Instant::now() + BOUND;
    while lb
        .capacity
        .snapshot()
        .get("default")
        .is_some_and(|mb| *mb > 0)
    {
        assert!(
            Instant::now() < deadline,
            "the call still holds its capacity after {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection itself stays usable.
    drop(response);
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/health", lb.address))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let health = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("the connection still serves");
    assert_eq!(health.status(), StatusCode::OK);

    // An answer waiting for the function, not for the client, is not given up.
    let runners = fakes(&pki, &[Behaviour::AnswerHeadThenStall]).await;
    let options = Options {
        limits: ClientLimits {
            send_timeout: Duration::from_millis(500),
            ..ClientLimits::default()
        },
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let mut sender = h2c(&lb.address).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from_static(b"slow")))
        .expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("head");
    let mut body = response.into_body();
    let first = tokio::time::timeout(BOUND, body.frame())
        .await
        .expect("in time")
        .expect("a first chunk")
        .expect("no error");
    assert!(first.is_data());
    let next = tokio::time::timeout(Duration::from_millis(1500), body.frame()).await;
    assert!(
        next.is_err(),
        "the answer was cut while the function worked: {next:?}"
    );
    assert_eq!(lb.capacity.snapshot().get("default"), Some(&128));
}

/// An HTTP/2 client reading a large answer slowly but steadily is not taken for one that
/// reads nothing: the send timeout counts from each piece of at most 64 KiB handed to
/// hyper, where it counted from each of the runner's frames (up to 1 MiB), whose draining
/// alone took longer than the timeout at such a rate.
#[tokio::test]
async fn an_h2_client_reading_a_large_answer_slowly_but_steadily_gets_all_of_it() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let options = Options {
        limits: ClientLimits {
            send_timeout: Duration::from_millis(500),
            ..ClientLimits::default()
        },
        max_request_body: 4 * 1024 * 1024,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let (mut sender, _conn) = h2c_windows(&lb.address, 16 * 1024, Some(16 * 1024)).await;
    let body: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/r/demo/echo", lb.address))
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    let response = tokio::time::timeout(BOUND, sender.send_request(req))
        .await
        .expect("in time")
        .expect("head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut answer = response.into_body();
    let mut got = Vec::new();
    // About 16 KiB every 25 ms: some 650 KB/s, a 1 MiB frame's worth in over a second.
    while let Some(frame) = tokio::time::timeout(BOUND, answer.frame())
        .await
        .expect("a frame in time")
    {
        let frame = frame.expect("the answer was not cut off");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the echo is exact");
}

/// A request body given whole, or fed a frame at a time.
type FullOrFed = http_body_util::Either<
    Full<Bytes>,
    StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>,
>;

/// hyper holds the frame it took from a given-up stream's body until the client opens the
/// window, and asks for nothing meanwhile, so it never resets the stream: a client that
/// keeps it shut (and answers pings) would hold the stream and its connection for ever.
/// A send timeout after the give-up, the connection refuses new requests (503) and closes
/// once its other calls have ended (however many streams are stuck); a call beside the
/// stuck ones still completes.
#[tokio::test]
async fn an_h2_stream_kept_shut_after_it_was_given_up_closes_its_connection() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let send_timeout = Duration::from_millis(500);
    let options = Options {
        limits: ClientLimits {
            send_timeout,
            ..ClientLimits::default()
        },
        max_request_body: 4 * 1024 * 1024,
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let started = Instant::now();
    let (sender, conn) = h2c_windows(&lb.address, 64 * 1024, Some(16 * 1024 * 1024)).await;
    let post = |body: FullOrFed| {
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/r/demo/echo", lb.address))
            .body(body)
            .expect("request")
    };
    // The stuck calls: two answers of 1 MiB whose bodies this client never reads (a client
    // that stops reading holds every stream it has an answer on).
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let answer = tokio::time::timeout(
            BOUND,
            sender
                .clone()
                .send_request(post(http_body_util::Either::Left(Full::new(Bytes::from(
                    vec![1u8; 1024 * 1024],
                ))))),
        )
        .await
        .expect("in time")
        .expect("head");
        assert_eq!(answer.status(), StatusCode::OK);
        stuck.push(answer);
    }
    // A call beside it whose body arrives over 3 s, read in full.
    let (feed, chunks) = tokio::sync::mpsc::channel(4);
    let healthy = tokio::spawn(
        sender
            .clone()
            .send_request(post(http_body_util::Either::Right(StreamBody::new(
                ReceiverStream::new(chunks),
            )))),
    );
    let feeder = tokio::spawn(async move {
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if feed
                .send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // Once the stuck stream is found, new requests on the connection are refused.
    let mut refused = false;
    while !feeder.is_finished() {
        let health = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/r/demo/echo", lb.address))
            .body(http_body_util::Either::Left(Full::new(Bytes::from_static(
                b"probe",
            ))))
            .expect("request");
        let reply = tokio::time::timeout(BOUND, sender.clone().send_request(health))
            .await
            .expect("in time")
            .expect("an answer");
        if reply.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "no request was refused while the stuck stream was held"
    );
    let response = tokio::time::timeout(BOUND, healthy)
        .await
        .expect("in time")
        .expect("task")
        .expect("the call beside the stuck one was answered");
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = tokio::time::timeout(BOUND, response.into_body().collect())
        .await
        .expect("in time")
        .expect("the call beside the stuck one was not cut off")
        .to_bytes();
    assert_eq!(echoed.len(), 150);
    // Then the connection closes: the client's connection task ends.
    let ended = tokio::time::timeout(BOUND, conn)
        .await
        .expect("the connection was not closed");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(
        started.elapsed() >= 2 * send_timeout,
        "closed after {:?}, before the streams were given up and held a send timeout more",
        started.elapsed()
    );
    drop(stuck);
}

/// The silent first runner of `lb`'s list was left: the uncommitted offer of `reply`'s call
/// is withdrawn (its stream cancelled, not left open), and the runner is probed, not
/// offered the next call.
async fn silent_runner_was_left(lb: &Lb, silent: &FakeRunner, reply: &Reply) {
    assert_eq!(
        silent
            .wait_ended(reply.call_id(), BOUND)
            .await
            .expect("ends"),
        Ending::LbWentAway
    );
    assert!(!lb.pool.runners("default")[0].is_available());
}

#[tokio::test]
async fn a_runner_that_never_acknowledges_is_left_after_the_ack_timeout() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::NeverAcknowledge, Behaviour::Echo]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            client: ClientConfig {
                connect_timeout: Duration::from_millis(200),
                ack_timeout: Duration::from_millis(300),
                // The silent runner answers health, so a probe would soon put it back in
                // service; none comes while this test looks.
                probe_initial: Duration::from_secs(60),
                probe_max: Duration::from_secs(60),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "hi").await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-fake-runner"), "fake-1");
    // The placer timeout paid (10 s) would be twice this.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        took >= Duration::from_millis(300),
        "the silent runner was waited for"
    );
    silent_runner_was_left(&lb, &runners[0], &reply).await;
}

/// With a placer deadline shorter than the client's own connect and acknowledgement bound
/// (7 s), a runner that accepts the call and never acknowledges it used to take the whole
/// wait: 503, the next runner never asked, the silent one never marked down. An attempt
/// now gets at most half of the wait left (a wait of 6 s, so that the bounds below leave a
/// loaded machine seconds).
#[tokio::test]
async fn a_silent_runner_takes_half_the_wait_not_all_of_it_and_the_call_moves_on() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::NeverAcknowledge, Behaviour::Echo]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer_timeout: Duration::from_secs(6),
            client: ClientConfig {
                probe_initial: Duration::from_secs(60),
                probe_max: Duration::from_secs(60),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "hi").await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-fake-runner"), "fake-1");
    // Half the wait (3 s) for the silent runner, then fake-1 at once; all of it would be 503.
    assert!(
        took >= Duration::from_millis(2700) && took < Duration::from_millis(5400),
        "took {took:?}"
    );
    silent_runner_was_left(&lb, &runners[0], &reply).await;
}

#[tokio::test]
async fn a_placeholder_takes_calls_again_once_its_runner_answers() {
    let pki = TestPki::new();
    let address = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let lb = start_lb(
        &pki,
        &[&address],
        Options {
            placer_timeout: Duration::from_millis(200),
            client: ClientConfig {
                connect_timeout: Duration::from_millis(200),
                ack_timeout: Duration::from_millis(300),
                probe_initial: Duration::from_millis(20),
                probe_max: Duration::from_millis(100),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let reply = post(&lb, "/r/demo/echo", "nobody home").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    let client = Arc::clone(&lb.pool.runners("default")[0]);
    assert!(!client.is_available());

    let runner = FakeRunner::start_on(&address, "back", &pki.mode(), Behaviour::Echo)
        .await
        .expect("the port is free again");
    let deadline = Instant::now() + BOUND;
    while !client.is_available() {
        assert!(Instant::now() < deadline, "the probe never saw the runner");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = post(&lb, "/r/demo/echo", "welcome back").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "welcome back");
    assert!(runner.saw(reply.call_id()));
}

/// A runner that answers its health check but never acknowledges a call comes back after
/// every probe, and would cost every other call its ack timeout. After `eject_after`
/// failures in a row it is ejected: no call touches it until its health check passes, not
/// before `eject_initial`; then it takes calls again.
#[tokio::test]
async fn a_runner_failing_calls_in_a_row_is_ejected_gets_no_calls_and_comes_back() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::NeverAcknowledge, Behaviour::Echo]).await;
    let metrics = EjectionMetrics::default();
    let eject_initial = Duration::from_millis(1500);
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            client: ClientConfig {
                connect_timeout: Duration::from_millis(200),
                ack_timeout: Duration::from_millis(150),
                probe_initial: Duration::from_millis(10),
                probe_max: Duration::from_millis(20),
                eject_after: 3,
                eject_initial,
                eject_max: Duration::from_secs(3),
                ejection_metrics: metrics.clone(),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let silent = Arc::clone(&lb.pool.runners("default")[0]);

    // Every call succeeds on the healthy runner; the silent one fails the calls offered to
    // it first, and after each failure its probe soon puts it back.
    // No later than when the call that ejected it started: the ejection's time counts from
    // within that call.
    let ejected_at = call_until_ejected(&lb, &silent, &metrics).await;
    assert!(silent.is_ejected() && !silent.is_available());
    assert_eq!(metrics.ejected(), 1);

    // While ejected: no offer reaches it (so no call waits for its acknowledgement).
    for i in 0..6 {
        let reply = post(&lb, "/r/demo/echo", format!("ejected {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), "fake-1");
        assert!(
            !runners[0].saw(reply.call_id()),
            "call {i} was offered to it"
        );
    }

    // It heals; after the ejection time its health check passes and it takes calls again.
    runners[0].set_behaviour(Behaviour::Echo);
    let deadline = Instant::now() + BOUND;
    while !silent.is_available() {
        assert!(
            Instant::now() < deadline,
            "the ejected runner never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ejected_at.elapsed() >= eject_initial - Duration::from_millis(100),
        "back after {:?}, before its ejection ended",
        ejected_at.elapsed()
    );
    assert!(!silent.is_ejected());
    assert_eq!(metrics.ejected(), 0);
    let mut reached = false;
    for i in 0..4 {
        let reply = post(&lb, "/r/demo/echo", format!("back {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reached |= reply.header("x-fake-runner") == "fake-0";
    }
    assert!(reached, "the runner took no call after coming back");
}

/// Calls `lb` until `failing` (the first runner; `fake-1` is healthy) is ejected: each call
/// succeeds on `fake-1`, and after each failure the probe is let bring `failing` back, so
/// the next offer goes to it again. Returns when the call that ejected it started.
async fn call_until_ejected(
    lb: &Lb,
    failing: &fn_nodepool::RunnerClient,
    metrics: &EjectionMetrics,
) -> Instant {
    let mut calls = 0;
    let mut started = Instant::now();
    while metrics.ejections() == 0 {
        calls += 1;
        assert!(calls <= 30, "not ejected after {calls} calls");
        started = Instant::now();
        let reply = post(lb, "/r/demo/echo", format!("call {calls}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), "fake-1");
        if metrics.ejections() == 0 {
            let back = Instant::now() + BOUND;
            while !failing.is_available() && Instant::now() < back {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    started
}

/// A runner that ends every call's stream without acknowledging it (its call service broken,
/// its health check passing) is ejected like one that never answers, instead of being
/// offered every call first for as long as it runs.
#[tokio::test]
async fn a_runner_that_hangs_up_on_every_offer_is_ejected() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::HangUpUnacknowledged, Behaviour::Echo]).await;
    let metrics = EjectionMetrics::default();
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            client: ClientConfig {
                probe_initial: Duration::from_millis(10),
                probe_max: Duration::from_millis(20),
                eject_after: 3,
                eject_initial: Duration::from_secs(30),
                eject_max: Duration::from_secs(30),
                ejection_metrics: metrics.clone(),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let broken = Arc::clone(&lb.pool.runners("default")[0]);
    call_until_ejected(&lb, &broken, &metrics).await;
    assert!(broken.is_ejected());
    let offered = runners[0].seen().len();
    assert_eq!(offered, 3, "ejected after eject_after offers");
    for i in 0..4 {
        let reply = post(&lb, "/r/demo/echo", format!("ejected {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert_eq!(runners[0].seen().len(), offered, "offered while ejected");
}

/// Offers that fail together when a runner goes down count as one failure: a burst of calls
/// to a runner that stopped acknowledging does not eject it (before, each concurrent offer
/// counted, and one incident ejected it, doubling its next ejection each time).
#[tokio::test]
async fn offers_failing_together_count_once_towards_ejection() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::NeverAcknowledge]).await;
    let metrics = EjectionMetrics::default();
    let lb = Arc::new(
        start_lb(
            &pki,
            &addresses(&runners),
            Options {
                placer_timeout: Duration::from_millis(1500),
                client: ClientConfig {
                    connect_timeout: Duration::from_millis(200),
                    ack_timeout: Duration::from_millis(300),
                    // The probe stays away for the test: one round of offers only.
                    probe_initial: Duration::from_secs(30),
                    probe_max: Duration::from_secs(30),
                    eject_after: 3,
                    ejection_metrics: metrics.clone(),
                    ..ClientConfig::default()
                },
                ..Options::default()
            },
        )
        .await,
    );
    lb.dial_runners().await;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let lb = Arc::clone(&lb);
            tokio::spawn(async move { post(&lb, "/r/demo/echo", format!("burst {i}")).await })
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("call task");
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    }
    assert!(
        runners[0].seen().len() >= 3,
        "fewer than eject_after offers reached the runner: the test proves nothing"
    );
    let silent = Arc::clone(&lb.pool.runners("default")[0]);
    assert!(!silent.is_available(), "marked down");
    assert_eq!(metrics.ejections(), 0, "one incident ejected the runner");
    assert!(!silent.is_ejected());
}

/// An offer whose wait was cut short by the call's own (less than 200 ms left) and passed
/// in silence gives up without marking the runner down: the call's budget ran out, not the
/// runner's chance to answer (before, a function with a short timeout took runners down).
/// Several in a row do.
#[tokio::test]
async fn an_offer_cut_short_by_the_calls_wait_does_not_mark_the_runner_down() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::NeverAcknowledge]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer_timeout: Duration::from_millis(150),
            client: ClientConfig {
                // Once marked down, it stays down while the test looks.
                probe_initial: Duration::from_secs(60),
                probe_max: Duration::from_secs(60),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    let reply = post(&lb, "/r/demo/echo", "short").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(runners[0].seen().len() <= 1, "offered more than once");
    let silent = Arc::clone(&lb.pool.runners("default")[0]);
    assert!(
        silent.is_available(),
        "marked down for the call's short wait"
    );
    // But a runner that answers none of several short offers in a row is down: with only
    // short calls, nothing else would find it out. (Counted in offers, not calls: on a
    // loaded machine a call's 150 ms may pass before its offer goes.)
    let deadline = Instant::now() + BOUND;
    let mut calls = 1;
    while silent.is_available() {
        assert!(
            Instant::now() < deadline && calls < 10 * fn_nodepool::SHORT_OFFERS_DOWN,
            "silent to {} short offers in {calls} calls, still up",
            runners[0].seen().len()
        );
        let reply = post(&lb, "/r/demo/echo", "short").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
        calls += 1;
    }
    assert!(
        calls >= fn_nodepool::SHORT_OFFERS_DOWN,
        "marked down after {calls} short offers"
    );
}

#[tokio::test]
async fn a_runner_that_goes_away_between_calls_costs_no_call() {
    let pki = TestPki::new();
    let mut runners = fakes(&pki, &[Behaviour::Echo, Behaviour::Echo]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            client: ClientConfig {
                connect_timeout: Duration::from_millis(200),
                ack_timeout: Duration::from_millis(300),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    // Naive order: the first call goes to runner 0, the second to runner 1; both connected.
    for expected in ["fake-0", "fake-1"] {
        let reply = post(&lb, "/r/demo/echo", "warm").await;
        assert_eq!(reply.header("x-fake-runner"), expected);
    }
    drop(runners.remove(0));
    // Runner 0 is first in line again: its connection is gone, the call goes to runner 1.
    for i in 0..4 {
        let started = Instant::now();
        let reply = post(&lb, "/r/demo/echo", format!("after {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), "fake-1");
        // The placer timeout paid (10 s) would be twice this.
        assert!(started.elapsed() < Duration::from_secs(5), "call {i}");
    }
    assert!(!lb.pool.runners("default")[0].is_available());
}

/// The soak failure: every finished call's Engage stream was reset by the LB (it dropped the
/// stream on `CallFinished`, before the trailers). Past h2's queue of 50 remembered resets,
/// trailers that were already on their way find a forgotten stream and count as a protocol
/// error of the LB's own; after 1,024 of them h2 tears the whole connection down, failing
/// every call on it. A call must end its stream cleanly: the request half closed once the
/// body is sent, the response read to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_calls_end_their_streams_cleanly_and_the_connection_survives_them() {
    const CALLS: usize = 200;
    const CONCURRENCY: usize = 16;
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::EchoLateTrailers]).await;
    let lb = Arc::new(start_lb(&pki, &addresses(&runners), Options::default()).await);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (lb, next) = (Arc::clone(&lb), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CALLS {
                let reply = post(&lb, "/r/demo/echo", "soak").await;
                if reply.status != StatusCode::OK || reply.body.as_deref().ok() != Some(b"soak") {
                    failures.push(format!("{reply:?}"));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("worker"));
    }
    assert!(
        failures.is_empty(),
        "{} calls failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let seen = runners[0]
        .wait_until(BOUND, |seen| {
            seen.len() == CALLS && seen.iter().all(|c| c.reset_before_trailers.is_some())
        })
        .await
        .expect("every call ended on the runner");
    let unclean: Vec<_> = seen
        .iter()
        .filter(|c| c.request_end != RequestEnd::Closed || c.reset_before_trailers != Some(false))
        .collect();
    assert!(
        unclean.is_empty(),
        "{} of {CALLS} streams did not end cleanly, first: {:?}",
        unclean.len(),
        unclean.first()
    );
    assert_eq!(
        runners[0].connections(),
        1,
        "the LB's connection to the runner was torn down and reopened"
    );
}

/// POSTs to `path` over a raw connection, declaring `declared` body bytes and writing
/// `sent` of them before it reads; the whole answer, read to the connection's end, bounded.
async fn raw_post(address: &str, path: &str, declared: usize, sent: usize) -> String {
    raw_post_with(address, path, "", declared, sent).await
}

/// [`raw_post`] with `extra` header lines (each ending in CRLF).
async fn raw_post_with(
    address: &str,
    path: &str,
    extra: &str,
    declared: usize,
    sent: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: lb.test\r\n{extra}Content-Length: {declared}\r\n\r\n"
    );
    let exchange = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&vec![b'x'; sent]).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(BOUND * 2, exchange)
        .await
        .expect("in time")
        .expect("the body is taken in and the answer read, with no reset");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A client that writes its whole request body before it reads anything (Python's
/// `http.client`, `requests`) gets the 413, not a connection reset: the LB answers at once,
/// then reads and throws away the rest of the body before it closes.
#[tokio::test]
async fn a_client_that_sends_its_whole_oversize_body_first_still_reads_the_413() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let body_len = 8 * 1024 * 1024; // 8 x the limit: more than the socket buffers hold
    let text = raw_post(&lb.address, "/r/demo/echo", body_len, body_len).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(runners[0].seen().is_empty(), "no runner saw the call");
}

/// The same from a client that also asks for an upgrade (`curl --http2` sends `Upgrade:
/// h2c`): hyper hands such a connection over at its end instead of shutting it down, and
/// the LB now shuts it down itself, with the lingering close.
#[tokio::test]
async fn a_client_asking_for_an_upgrade_that_sends_its_whole_oversize_body_first_still_reads_the_413()
 {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let body_len = 8 * 1024 * 1024;
    let upgrade = "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
    let text = raw_post_with(&lb.address, "/r/demo/echo", upgrade, body_len, body_len).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(runners[0].seen().is_empty(), "no runner saw the call");
}

/// An answer that comes before the request body was read (a 404, a 413 from the declared
/// length, a function that ignores its input) leaves the connection usable: the LB reads
/// and drops the rest of the body after the answer, so a keep-alive client's next request
/// on the same connection is served instead of finding it closed.
#[tokio::test]
async fn answers_before_the_body_is_read_keep_the_connection_for_the_next_request() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let big = || vec![b'b'; 1024 * 1024];
    let mut over = request(Method::POST, "/r/demo/echo", vec![b'o'; 2 * 1024 * 1024]);
    over.headers_mut()
        .insert(header::CONTENT_LENGTH, (2 * 1024 * 1024).into());
    let replies = on_one_connection(
        &lb.address,
        vec![
            request(Method::POST, "/r/demo/nope", big()),
            request(Method::POST, "/r/demo/echo", "after a 404"),
            over,
            request(Method::POST, "/r/demo/echo", "after a 413"),
        ],
    )
    .await;
    let statuses: Vec<_> = replies
        .iter()
        .map(|r| r.as_ref().map(|r| r.status.as_u16()))
        .collect();
    assert_eq!(
        statuses,
        [Ok(404), Ok(200), Ok(413), Ok(200)],
        "{replies:?}"
    );
    let texts: Vec<_> = replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == StatusCode::OK)
        .map(Reply::text)
        .collect();
    assert_eq!(texts, ["after a 404", "after a 413"]);
    for reply in replies.iter().flatten() {
        assert!(
            reply.headers.get(header::CONNECTION).is_none(),
            "drained, not closed: {reply:?}"
        );
    }

    // A function that answers without reading its 1 MiB input: the same.
    runners[0].script([Behaviour::AnswerUnread, Behaviour::AnswerUnread]);
    let replies = on_one_connection(
        &lb.address,
        vec![
            request(Method::POST, "/r/demo/echo", big()),
            request(Method::POST, "/r/demo/echo", big()),
            request(Method::POST, "/r/demo/echo", "read"),
        ],
    )
    .await;
    let texts: Vec<_> = replies
        .iter()
        .map(|r| r.as_ref().map(Reply::text).map_err(String::clone))
        .collect();
    assert_eq!(
        texts,
        [
            Ok("unread".to_owned()),
            Ok("unread".into()),
            Ok("read".into())
        ]
    );
}

/// A body declared longer than the LB will read after an early answer gets
/// `Connection: close` on that answer: the client learns not to reuse the connection, and
/// still reads the answer (the lingering close).
#[tokio::test]
async fn an_early_answer_to_a_body_too_long_to_drain_says_connection_close() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let declared = fn_lb::leftover::DRAIN_BYTES as usize + 1;
    for path in ["/r/demo/nope", "/r/demo/echo"] {
        let text = raw_post(&lb.address, path, declared, 64 * 1024)
            .await
            .to_ascii_lowercase();
        assert!(
            text.starts_with("http/1.1 404") || text.starts_with("http/1.1 413"),
            "{text}"
        );
        assert!(text.contains("\r\nconnection: close\r\n"), "{path}: {text}");
    }
    assert!(runners[0].seen().is_empty(), "no runner saw either call");
}

/// Connections that never send a byte are closed after the first-byte limit (hyper's own
/// header timer starts only with a request), and the LB keeps serving.
#[tokio::test]
async fn connections_that_send_nothing_are_closed_and_calls_go_on() {
    use tokio::io::AsyncReadExt;
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let limits = ClientLimits {
        first_byte: Duration::from_millis(300),
        ..ClientLimits::default()
    };
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            limits,
            ..Options::default()
        },
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(
            tokio::net::TcpStream::connect(&lb.address)
                .await
                .expect("connect"),
        );
    }
    let started = Instant::now();
    for stream in &mut silent {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(BOUND, stream.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "closed by the LB: {read:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the limit: {:?}",
        started.elapsed()
    );
    let reply = post(&lb, "/r/demo/echo", "still serving").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "still serving");
}

/// The function's length reaches the client: a response with a `Content-Length` is sent
/// with it, not chunked; a HEAD request gets the same head with no body, and its call still
/// ends normally on the runner.
#[tokio::test]
async fn content_length_is_kept_end_to_end_and_head_gets_the_head_alone() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let reply = post(&lb, "/r/demo/echo", vec![b'a'; 5000]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("content-length"), "5000");
    assert!(
        !reply.headers.contains_key("transfer-encoding"),
        "{reply:?}"
    );
    assert_eq!(reply.body.as_ref().map(Bytes::len).ok(), Some(5000));

    let head = send(&lb.address, request(Method::HEAD, "/r/demo/echo", "")).await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-length"), "0");
    assert_eq!(head.body.as_deref().ok(), Some(b"".as_slice()));
    let id = head.call_id().to_owned();
    assert_eq!(
        runners[0].wait_ended(&id, BOUND).await.expect("ends"),
        Ending::Completed,
        "the HEAD call ran to its end on the runner"
    );
    let seen = runners[0].seen();
    assert!(
        seen.iter().all(|c| c.ending == Ending::Completed),
        "{seen:?}"
    );
}

/// A POST of `body` to the echo function asking the fake runner for `header: value`.
fn asking(header: &'static str, value: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut req = request(Method::POST, "/r/demo/echo", body);
    req.headers_mut().insert(
        header,
        http::HeaderValue::from_str(value).expect("header value"),
    );
    req
}

#[tokio::test]
async fn answers_that_cannot_go_to_a_client_get_502_and_the_lb_keeps_serving() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for (header, value, named) in [
        ("x-fake-status", "101", "status 101"),
        ("x-fake-status", "103", "status 103"),
        // RFC 9110's statuses end at 599; http's StatusCode takes up to 999.
        ("x-fake-status", "600", "invalid status 600"),
        ("x-fake-status", "999", "invalid status 999"),
        ("x-fake-status", "99", "invalid status 99"),
        // Past http's HeaderMap limit (32,768): building the map would panic. Refused
        // before prost decodes them (`fn_protocol::wire`).
        (
            "x-fake-headers",
            "40000",
            "more than 256 response headers in one message",
        ),
        // Fewer, in a message too short to be counted first: refused once decoded.
        (
            "x-fake-headers",
            "300",
            "response headers from the function; at most 256",
        ),
    ] {
        let reply = send(&lb.address, asking(header, value, "x")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_GATEWAY,
            "{header}: {value}: {reply:?}"
        );
        let message = reply.json_error();
        assert!(message.contains(named), "{message}");
    }
    // Headers within the bound still go through (90: the test's client takes 100).
    let reply = send(&lb.address, asking("x-fake-headers", "90", "x")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.headers.get_all("x-filler").iter().count(), 90);
    assert_eq!(post(&lb, "/r/demo/echo", "on").await.text(), "on");
}

#[tokio::test]
async fn an_answer_whose_body_does_not_match_its_content_length_is_a_runner_failure() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    // Short of its length, then longer than it: the client's answer is cut either way.
    // (Over it, the head may not have left yet: then there is no answer at all.)
    for claimed in ["10", "1"] {
        let request = asking("x-fake-length", claimed, "abc");
        let replies = on_one_connection(&lb.address, vec![request]).await;
        match &replies[..] {
            [Ok(reply)] => {
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                assert!(reply.body.is_err(), "claimed {claimed}: {reply:?}");
            }
            [Err(no_answer)] => assert!(no_answer.contains("closed"), "{no_answer}"),
            other => panic!("{other:?}"),
        }
    }
    let metrics = lb.metrics();
    let failed = metrics
        .lines()
        .find(|l| l.contains(r#"outcome="runner_failed""#) && l.starts_with("fn_lb_calls_total"))
        .unwrap_or_else(|| panic!("no runner_failed count in {metrics}"));
    assert!(failed.ends_with(" 2"), "{failed}");
    // A HEAD's Content-Length describes a body that is not sent: that is no mismatch, and
    // the client gets it as the function gave it.
    let mut head = request(Method::HEAD, "/r/demo/echo", "");
    head.headers_mut()
        .insert("x-fake-length", HeaderValue::from_static("1234"));
    let head = send(&lb.address, head).await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-length"), "1234");
    assert_eq!(head.body.as_deref().ok(), Some(b"".as_slice()));
}

/// hyper sends no body with a 204 or a 304 and drops the one it is given unread: the call
/// must still end as a finished call, not be cancelled on the runner.
#[tokio::test]
async fn a_204_or_304_answer_ends_its_call_cleanly_on_the_runner() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::EchoLateTrailers]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
        let reply = send(&lb.address, asking("x-fake-status", status.as_str(), "")).await;
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.body.as_deref().ok(), Some(b"".as_slice()));
        let id = reply.call_id().to_owned();
        assert_eq!(
            runners[0].wait_ended(&id, BOUND).await.expect("ends"),
            Ending::Completed
        );
    }
    let seen = runners[0]
        .wait_until(BOUND, |seen| {
            seen.len() == 2 && seen.iter().all(|c| c.reset_before_trailers.is_some())
        })
        .await
        .expect("both calls ended on the runner");
    assert!(
        seen.iter().all(|c| c.reset_before_trailers == Some(false)),
        "the LB reset a finished call's stream: {seen:?}"
    );
}

/// At `max_connections`, idle sockets make room oldest first, and a connection in the middle
/// of a call is never the one closed: its call ends whole, and new calls go on.
#[tokio::test]
async fn at_the_connection_cap_the_oldest_idle_connections_go_and_busy_ones_stay() {
    use tokio::io::AsyncReadExt;
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let cap = 4;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            limits: ClientLimits {
                max_connections: cap,
                ..ClientLimits::default()
            },
            ..Options::default()
        },
    )
    .await;
    // A call whose request body is still arriving: busy for as long as the client holds it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tx.send(Ok(Frame::data(Bytes::from_static(b"first half, "))))
        .await
        .expect("room");
    let busy_call = Request::builder()
        .method(Method::POST)
        .uri("/r/demo/echo")
        .header(header::HOST, "lb.test")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request");
    let address = lb.address.clone();
    let busy = tokio::spawn(async move { send(&address, busy_call).await });
    runners[0]
        .wait_until(BOUND, |seen| !seen.is_empty())
        .await
        .expect("the busy call reaches the runner");

    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(
            tokio::net::TcpStream::connect(&lb.address)
                .await
                .expect("connect"),
        );
    }
    // One busy connection plus the three youngest idle ones fit; the 17 oldest idle go.
    for (i, stream) in idle.iter_mut().enumerate().take(17) {
        let read = tokio::time::timeout(BOUND, stream.read(&mut [0u8; 16]))
            .await
            .unwrap_or_else(|_| panic!("idle socket {i} closed in time"));
        assert!(matches!(read, Ok(0) | Err(_)), "socket {i}: {read:?}");
    }
    for (i, stream) in idle.iter_mut().enumerate().skip(17) {
        let read =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut [0u8; 16])).await;
        assert!(
            read.is_err(),
            "the younger idle socket {i} stays open: {read:?}"
        );
    }

    let reply = post(&lb, "/r/demo/echo", "a new call").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "a new call");

    tx.send(Ok(Frame::data(Bytes::from_static(b"second half"))))
        .await
        .expect("the busy call's body is still wanted");
    drop(tx);
    let busy = tokio::time::timeout(BOUND * 3, busy)
        .await
        .expect("the busy call ends")
        .expect("task");
    assert_eq!(busy.status, StatusCode::OK, "{busy:?}");
    assert_eq!(busy.text(), "first half, second half");

    let text = lb.metrics();
    assert!(
        text.contains("fn_lb_client_connections_shed_total{reason=\"idle_over_cap\"} 18\n"),
        "{text}"
    );
    assert!(!text.contains("reason=\"refused_over_cap\""), "{text}");
}

/// Every answer carries `Server-Timing` with `placement` and `exec`, and `start` exactly
/// when the call started an instance (the fake runner reports a cold start for the first call
/// of each function); the same figures feed the histograms, and no runner name leaks.
#[tokio::test]
async fn server_timing_has_start_exactly_when_the_call_started_an_instance() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;

    let parse = |reply: &Reply| -> Vec<(String, f64)> {
        reply
            .header("server-timing")
            .split(", ")
            .map(|metric| {
                let (name, dur) = metric.split_once(";dur=").expect("name;dur=ms");
                (name.to_owned(), dur.parse::<f64>().expect("milliseconds"))
            })
            .collect()
    };
    let cold = post(&lb, "/r/demo/echo", "first").await;
    assert_eq!(cold.status, StatusCode::OK, "{cold:?}");
    let timings = parse(&cold);
    let names: Vec<&str> = timings.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["placement", "start", "exec"], "{timings:?}");
    let start_ms = fn_test_support::fake_runner::FAKE_COLD_START.as_secs_f64() * 1000.0;
    assert!((timings[1].1 - start_ms).abs() < 0.001, "{timings:?}");
    assert!(timings.iter().all(|(_, ms)| *ms >= 0.0 && *ms < 10_000.0));

    let warm = post(&lb, "/r/demo/echo", "second").await;
    let names: Vec<String> = parse(&warm).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["placement", "exec"], "a warm call has no start");
    assert!(
        !warm.header("server-timing").contains("fake"),
        "no runner name goes to the client"
    );

    let text = lb.metrics();
    for line in [
        "fn_lb_cold_starts_total{app=\"demo\",function=\"echo\"} 1\n",
        "fn_lb_cold_start_seconds_count{app=\"demo\",function=\"echo\"} 1\n",
        "fn_lb_execution_seconds_count 2\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
}

/// A call waits for a runner at most half its own timeout (`wait_share`), then gets 503
/// with `Retry-After`: a 504 is left to mean that the function ran too long. A timeout of
/// 6 s, so that the wait (3 s) is seconds away from the whole budget (6 s) and the placer
/// timeout (10 s) on a loaded machine.
#[tokio::test]
async fn waiting_for_a_runner_is_bounded_by_half_the_call_s_timeout_and_ends_in_503() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Refuse]).await;
    let options = Options {
        catalog: with_short("6s"),
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/short", "x").await; // timeout 6 s, placer timeout 10 s
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.header("retry-after"), "1");
    assert!(
        reply.json_error().contains("no runner had room"),
        "{reply:?}"
    );
    assert!(
        waited >= Duration::from_millis(2700) && waited < Duration::from_millis(5400),
        "waited {waited:?}: half of the 6 s timeout, not the placer timeout nor the whole budget"
    );
}

/// The catalog with `demo/short`, whose timeout is `timeout`.
fn with_short(timeout: &str) -> String {
    format!(
        "{CATALOG}\n[[functions]]\napp = \"demo\"\nname = \"short\"\nroute = \"/short\"\n\
         command = [\"fn-echo\"]\ntimeout = \"{timeout}\"\n"
    )
}

/// A short wait gets more than one pass: its last pass starts a quarter of the wait before
/// its end, not the whole last-pass time (50 ms by default, 2 s here, which would leave a
/// wait of 500 ms no pass after the first), so the runner that refused its first offer
/// takes the second. A function with a timeout of 100 ms (a wait of 50 ms) had one pass and
/// its 503 some 2 ms later, where the README promises retries until half its timeout; the
/// times are scaled up here so that a loaded machine keeps the test's margin.
#[tokio::test]
async fn a_short_wait_gets_a_second_pass() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let catalog = with_short("1s");
    let options = Options {
        catalog,
        last_pass: Duration::from_secs(2),
        ..Options::default()
    };
    let lb = start_lb(&pki, &addresses(&runners), options).await;
    lb.dial_runners().await;
    runners[0].script([Behaviour::Refuse, Behaviour::Echo]);
    let reply = post(&lb, "/r/demo/short", "x").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let offers = runners[0]
        .seen()
        .iter()
        .filter(|c| c.id == reply.call_id())
        .count();
    assert_eq!(offers, 2, "refused, then taken");
}

/// A call whose last pass is refused waits out the rest of its wait (the last-pass time,
/// 500 ms here) for a call of its function to end, and is placed on the instance that call
/// leaves; it used to get its 503 at once after its last pass.
#[tokio::test]
async fn a_call_ending_after_the_last_pass_still_serves_a_waiting_call() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer_timeout: Duration::from_secs(2),
            last_pass: Duration::from_millis(500),
            // No pause ends before the last pass but by a call's end or a report.
            retry_initial: Duration::from_secs(10),
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    // A call in flight until its body ends.
    let (body, first) = fed("/r/demo/echo");
    let address = lb.address.clone();
    let first = tokio::spawn(async move { send(&address, first).await });
    runners[0]
        .wait_until(BOUND, |seen| seen.len() == 1)
        .await
        .expect("the first call reaches the runner");
    // The waiting call's first pass (at once) and last pass (500 ms before its deadline)
    // are refused; the first call ends after the last.
    runners[0].script([Behaviour::Refuse, Behaviour::Refuse]);
    let end_first = async {
        runners[0]
            .wait_until(BOUND, |seen| seen.len() == 3)
            .await
            .expect("the waiting call's two passes");
        body.send(Ok(Frame::data(Bytes::from_static(b"done"))))
            .await
            .expect("the first call's body is read");
        drop(body);
    };
    let (reply, ()) = tokio::join!(post(&lb, "/r/demo/echo", "waiting"), end_first);
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "waiting");
    let offers = runners[0]
        .seen()
        .iter()
        .filter(|c| c.id == reply.call_id())
        .count();
    assert_eq!(
        offers, 3,
        "two passes refused, then one more after the first call's end"
    );
    let first = first.await.expect("join");
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
}

/// Runners found unreachable by a call's last pass make its 503 say that no runner of the
/// group is reachable, as placeholders do: it used to say that no runner had room, counting
/// only the runners that were placeholders when the pass began.
#[tokio::test]
async fn runners_lost_during_the_last_pass_give_a_503_that_says_they_are_unreachable() {
    let pki = TestPki::new();
    let runners = fakes(
        &pki,
        &[Behaviour::NeverAcknowledge, Behaviour::NeverAcknowledge],
    )
    .await;
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            // A wait of 500 ms: 250 ms for the first silent runner, 200 for the second (each
            // at least FAIR_ACK_WAIT, so each is marked down), and no pass after.
            catalog: with_short("1s"),
            client: ClientConfig {
                probe_initial: Duration::from_secs(60),
                probe_max: Duration::from_secs(60),
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    lb.dial_runners().await;
    let reply = post(&lb, "/r/demo/short", "x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    let message = reply.json_error();
    assert!(
        message.contains("no runner of LB group default is reachable")
            && message.contains("all 2 of its runners are unreachable or ejected"),
        "{message}"
    );
    for runner in &runners {
        assert_eq!(runner.seen().len(), 1, "{}: one pass", runner.name());
    }
}

/// A function larger than every runner of its group gets 503 at once, saying so; a runner
/// too small for it does not stop a larger one from taking it.
#[tokio::test]
async fn a_function_no_runner_can_hold_gets_503_at_once_and_a_larger_runner_still_takes_it() {
    let pki = TestPki::new();
    let small = fakes(
        &pki,
        &[Behaviour::RefuseTooLarge, Behaviour::RefuseTooLarge],
    )
    .await;
    let lb = start_lb(&pki, &addresses(&small), Options::default()).await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "big").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after the placer timeout (10 s): {:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(
        reply.headers.get("retry-after").is_none(),
        "retrying cannot help"
    );
    let message = reply.json_error();
    assert!(
        message.contains("128 MB") && message.contains("default"),
        "{message}"
    );
    let text = lb.metrics();
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"no_runner_large_enough\"} 1\n"),
        "{text}"
    );
    // Both runners were offered the call: the refusals count as attempts.
    assert!(
        text.contains("\nfn_lb_placement_attempts_total 2\n"),
        "{text}"
    );

    let mixed = fakes(&pki, &[Behaviour::RefuseTooLarge, Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&mixed), Options::default()).await;
    let reply = post(&lb, "/r/demo/echo", "fits elsewhere").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.text(), "fits elsewhere");

    // A runner that cannot be asked may be the large one: the small one's refusal alone is
    // not "no runner large enough", and the call waits for room as any other.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let small = fakes(&pki, &[Behaviour::RefuseTooLarge]).await;
    let options = Options {
        placer_timeout: Duration::from_millis(500),
        ..Options::default()
    };
    let lb = start_lb(&pki, &[closed.as_str(), small[0].address()], options).await;
    let reply = post(&lb, "/r/demo/echo", "big").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert!(
        reply.headers.get("retry-after").is_some(),
        "no capacity now, not never: {reply:?}"
    );
}

/// A runner that refuses a call as invalid for a reason of its own (no container engine)
/// does not fail the call: the next runner takes it. Only when every runner of the group
/// refuses it so is the answer 500 at once, with the runner's reason (before, the first
/// such refusal was the answer).
#[tokio::test]
async fn one_runners_invalid_refusal_moves_the_call_on_and_everyones_is_a_500() {
    let pki = TestPki::new();
    let mixed = fakes(&pki, &[Behaviour::RefuseInvalid, Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&mixed), Options::default()).await;
    for i in 0..4 {
        let reply = post(&lb, "/r/demo/echo", format!("call {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), "fake-1");
    }
    assert!(
        !mixed[0].seen().is_empty(),
        "the refusing runner was never asked: the test proves nothing"
    );

    let refusing = fakes(&pki, &[Behaviour::RefuseInvalid, Behaviour::RefuseInvalid]).await;
    let lb = start_lb(&pki, &addresses(&refusing), Options::default()).await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "nowhere").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after the placer timeout (10 s): {:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    assert!(
        reply.json_error().contains("no container engine"),
        "{reply:?}"
    );
    let text = lb.metrics();
    assert!(
        text.contains("fn_lb_calls_total{outcome=\"unrunnable\"} 1\n")
            && text.contains("\nfn_lb_placement_attempts_total 2\n"),
        "both refusals count as attempts: {text}"
    );

    // One refuses it as invalid, the other cannot be reached: no runner refused it for want
    // of room, so the answer at the deadline is the refusal, not "no room".
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let refusing = fakes(&pki, &[Behaviour::RefuseInvalid]).await;
    let lb = start_lb(
        &pki,
        &[refusing[0].address(), closed.as_str()],
        Options {
            placer_timeout: Duration::from_millis(500),
            ..Options::default()
        },
    )
    .await;
    let reply = post(&lb, "/r/demo/echo", "nowhere").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    assert!(
        reply.json_error().contains("no container engine"),
        "{reply:?}"
    );
}

/// What a runner says of a call it refused or failed (up to 4 MiB on the wire) reaches the
/// client, and the LB's log, cut to a few KiB, and says it was cut.
#[tokio::test]
async fn a_runners_long_details_reach_the_client_cut_to_a_few_kib() {
    use fn_protocol::MAX_DETAILS_SHOWN;
    use fn_test_support::fake_runner::VERBOSE_DETAILS_BYTES;
    let pki = TestPki::new();
    for (behaviour, status, said) in [
        (
            Behaviour::RefuseInvalidVerbosely,
            StatusCode::INTERNAL_SERVER_ERROR,
            "runners refuse this function: \u{20ac}",
        ),
        (
            Behaviour::CommitThenFailVerbosely,
            StatusCode::BAD_GATEWAY,
            "the call failed after a runner took it: Crashed: \u{20ac}",
        ),
    ] {
        let runners = fakes(&pki, &[behaviour]).await;
        let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
        let reply = post(&lb, "/r/demo/echo", "x").await;
        assert_eq!(reply.status, status, "{behaviour:?}");
        let message = reply.json_error();
        assert!(
            message.len() < MAX_DETAILS_SHOWN + 200,
            "{behaviour:?}: a message of {} bytes",
            message.len()
        );
        assert!(message.starts_with(said), "{behaviour:?}: {message}");
        assert!(
            message.ends_with(&format!(" of {VERBOSE_DETAILS_BYTES} bytes)")),
            "{behaviour:?}: {message}"
        );
    }
}

/// A runner's report as the warm placer tests need it: `free_mb` free of 1024, `in_flight`
/// calls, and `demo/echo` warm with one idle slot when `warm`.
fn report(free_mb: u64, in_flight: u64, warm: bool) -> RunnerState {
    RunnerState {
        version: 1,
        capacity_total_mb: 1024,
        capacity_free_mb: free_mb,
        capacity_idle_mb: 0,
        calls_in_flight: in_flight,
        draining: false,
        warm: if warm {
            vec![WarmFunction {
                app: "demo".into(),
                function: "echo".into(),
                idle_slots: 1,
                instances: 1,
            }]
        } else {
            Vec::new()
        },
    }
}

/// Three echo fakes in the `ch` ring order of `demo/echo` (the home first), each reporting
/// what `reports` gives for its ring position, and an LB with the warm placer that has
/// received every report.
async fn warm_lb(pki: &TestPki, reports: [RunnerState; 3]) -> (Vec<FakeRunner>, Lb) {
    warm_lb_waiting(pki, reports, DispatchConfig::default().warm_wait).await
}

/// [`warm_lb`] with the dispatcher's `warm_wait`.
async fn warm_lb_waiting(
    pki: &TestPki,
    reports: [RunnerState; 3],
    warm_wait: Duration,
) -> (Vec<FakeRunner>, Lb) {
    warm_lb_with(pki, reports, warm_wait, ClientConfig::default()).await
}

/// [`warm_lb_waiting`] with runner clients configured as `client` (its reports watched).
async fn warm_lb_with(
    pki: &TestPki,
    reports: [RunnerState; 3],
    warm_wait: Duration,
    client: ClientConfig,
) -> (Vec<FakeRunner>, Lb) {
    let runners = fakes(pki, &[Behaviour::Echo; 3]).await;
    let ring: Vec<usize> = ConsistentHashPlacer::new()
        .order(&PlacementKey::new("demo", "echo"), runners.len())
        .collect();
    let mut by_ring: Vec<Option<FakeRunner>> = runners.into_iter().map(Some).collect();
    let runners: Vec<FakeRunner> = ring
        .iter()
        .map(|&i| by_ring[i].take().expect("each index once"))
        .collect();
    for (runner, state) in runners.iter().zip(reports) {
        runner.report_state(state);
    }
    let report_metrics = fn_nodepool::ReportMetrics::default();
    // The LB's list is in the original order, so the ring puts `runners[0]` first.
    let mut listed: Vec<&str> = vec![""; 3];
    for (pos, &idx) in ring.iter().enumerate() {
        listed[idx] = runners[pos].address();
    }
    let lb = start_lb(
        pki,
        &listed,
        Options {
            placer: Arc::new(WarmPlacer::new(0.25)),
            placer_timeout: Duration::from_secs(5),
            warm_wait,
            client: ClientConfig {
                watch_reports: true,
                report_metrics: report_metrics.clone(),
                ..client
            },
            ..Options::default()
        },
    )
    .await;
    let deadline = Instant::now() + BOUND;
    while !lb
        .pool
        .runners("default")
        .iter()
        .all(|r| r.reports().is_fresh())
    {
        assert!(Instant::now() < deadline, "no reports within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(report_metrics.streams(), 3, "one report stream per runner");
    assert!(report_metrics.reports() >= 3);
    (runners, lb)
}

/// A report stream that stays open but sends nothing (the fakes report only changes) is
/// opened again once a report would be stale, so the runner's report is fresh again without
/// the runner changing anything, and offers do not pile up on a report that never comes.
#[tokio::test]
async fn a_silent_report_stream_is_opened_again() {
    let pki = TestPki::new();
    let (_runners, lb) = warm_lb(&pki, std::array::from_fn(|_| report(1024, 0, false))).await;
    // Reopened at STALE_AFTER, answered with the current report at once.
    tokio::time::sleep(fn_nodepool::STALE_AFTER + Duration::from_millis(1500)).await;
    for runner in lb.pool.runners("default").iter() {
        assert!(
            runner.reports().is_fresh(),
            "{}: the silent stream was not opened again",
            runner.address()
        );
    }
}

/// A runner that never answers the opening of its report stream (its connection alive, its
/// service stuck) is asked again once a report would be stale, and its reports reach the LB
/// from the stream opened then.
#[tokio::test]
async fn a_report_stream_whose_opening_is_never_answered_is_asked_again() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    runners[0].hold_report_opens(1);
    runners[0].report_state(report(1024, 0, false));
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            placer: Arc::new(WarmPlacer::new(0.25)),
            client: ClientConfig {
                watch_reports: true,
                ..ClientConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    // Asked again at STALE_AFTER, then after the first pause of the probe's backoff.
    let deadline = Instant::now() + fn_nodepool::STALE_AFTER + BOUND;
    while !lb.pool.runners("default")[0].reports().is_fresh() {
        assert!(
            Instant::now() < deadline,
            "no report: the unanswered opening was not given up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The warm placer takes a runner with a warm instance over the function's cold home, and
/// asks neither the home nor the runner between.
#[tokio::test]
async fn warm_placer_takes_a_warm_runner_over_a_cold_home() {
    let pki = TestPki::new();
    let (runners, lb) = warm_lb(
        &pki,
        [
            report(1024, 0, false),
            report(1024, 0, false),
            report(1024, 0, true),
        ],
    )
    .await;
    let reply = post(&lb, "/r/demo/echo", "warm").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-fake-runner"), runners[2].name());
    assert!(runners[0].seen().is_empty() && runners[1].seen().is_empty());
    assert!(lb.metrics().contains("fn_lb_placement_attempts_total 1\n"));
}

/// A call that ends cleanly leaves its instance idle in the LB's view of the runner until
/// the runner's next report, however the LB read the stream's end (here it comes with the
/// answer's last message): the next call of the function finds it warm without waiting for
/// a report. The fake runner reports once, so only the LB's own count can make it warm again.
#[tokio::test]
async fn a_call_that_ends_cleanly_leaves_its_instance_warm_in_the_lbs_view() {
    let pki = TestPki::new();
    let (runners, lb) = warm_lb(
        &pki,
        [
            report(1024, 0, true),
            report(1024, 0, false),
            report(1024, 0, false),
        ],
    )
    .await;
    let runners_in_pool = lb.pool.runners("default");
    let home = runners_in_pool
        .iter()
        .find(|r| r.address() == runners[0].address())
        .expect("the home is in the pool");
    let view = || match home.reports().view("demo", "echo", 64) {
        RunnerView::Known(load) => load,
        RunnerView::Unknown | RunnerView::TooSmall => panic!("the home's report is fresh"),
    };
    assert!(view().warm);
    for i in 0..3 {
        let reply = post(&lb, "/r/demo/echo", format!("call {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), runners[0].name());
        // The LB counts the call's end when it lets go of the stream, just after the answer.
        // (Bounded below the 3 s after which the one report goes stale.)
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(view().warm && view().calls_in_flight == 0) {
            assert!(
                Instant::now() < deadline,
                "call {i}: the ended call is not counted: {:?}",
                view()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert!(runners[1].seen().is_empty() && runners[2].seen().is_empty());
}

/// A runner known to be full (no warm instance, no room) is skipped without a `TryCall`;
/// one known to drain too.
#[tokio::test]
async fn warm_placer_skips_full_and_draining_runners_without_asking_them() {
    let pki = TestPki::new();
    let draining = RunnerState {
        draining: true,
        ..report(1024, 0, true)
    };
    let (runners, lb) = warm_lb(
        &pki,
        [report(64, 3, false), draining, report(1024, 0, false)],
    )
    .await;
    for i in 0..3 {
        let reply = post(&lb, "/r/demo/echo", format!("call {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.header("x-fake-runner"), runners[2].name());
    }
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
    assert!(runners[1].seen().is_empty(), "{:?}", runners[1].seen());
    assert!(lb.metrics().contains("fn_lb_placement_attempts_total 3\n"));
}

/// When every runner of the group drains (a rolling restart of its last runners), the 503
/// says so, not only that no runner had room; when one is busy instead, it says room alone.
#[tokio::test]
async fn a_503_says_when_every_runner_of_the_group_drains() {
    let pki = TestPki::new();
    for (behaviours, says_draining) in [
        ([Behaviour::RefuseDraining, Behaviour::RefuseDraining], true),
        ([Behaviour::RefuseDraining, Behaviour::Refuse], false),
    ] {
        let runners = fakes(&pki, &behaviours).await;
        let lb = start_lb(
            &pki,
            &addresses(&runners),
            Options {
                placer_timeout: Duration::from_millis(500),
                ..Options::default()
            },
        )
        .await;
        let reply = post(&lb, "/r/demo/echo", "nowhere").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
        assert_eq!(
            reply
                .json_error()
                .contains("every runner of its group is draining"),
            says_draining,
            "{behaviours:?}: {reply:?}"
        );
        assert!(runners.iter().all(|r| !r.seen().is_empty()), "each asked");
    }
}

/// The home runner keeps its function until its load is over (1 + ε) times the mean; then
/// the call goes to the next runner of the ring, even though the home is warm.
#[tokio::test]
async fn warm_placer_moves_the_homes_excess_load_along_the_ring() {
    let pki = TestPki::new();
    // 9 + 0 + 0 calls: one more may bring a runner to ceil(1.25 * 10 / 3) = 5 at most.
    let (runners, lb) = warm_lb(
        &pki,
        [
            report(1024, 9, true),
            report(1024, 0, false),
            report(1024, 0, false),
        ],
    )
    .await;
    let reply = post(&lb, "/r/demo/echo", "excess").await;
    assert_eq!(
        reply.header("x-fake-runner"),
        runners[1].name(),
        "{reply:?}"
    );
    assert!(runners[0].seen().is_empty());

    // Within the bound, the warm home takes it.
    runners[0].report_state(report(1024, 2, true));
    let deadline = Instant::now() + BOUND;
    loop {
        let reply = post(&lb, "/r/demo/echo", "home").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        if reply.header("x-fake-runner") == runners[0].name() {
            break;
        }
        assert!(Instant::now() < deadline, "the home never took a call back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// When every runner is known to be full, a call asks nobody and waits; it is placed as soon
/// as a report shows room, well before the placer timeout.
#[tokio::test]
async fn warm_placer_waits_for_a_report_with_room_instead_of_asking_full_runners() {
    let pki = TestPki::new();
    let (runners, lb) = warm_lb(
        &pki,
        [
            report(0, 8, false),
            report(0, 8, false),
            report(0, 8, false),
        ],
    )
    .await;
    let reply = held_call(&lb, &runners, report(512, 7, false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-fake-runner"), runners[1].name());
    assert!(runners[0].seen().is_empty() && runners[2].seen().is_empty());
}

/// A runner's report: its memory all held by idle instances of other functions (a new
/// instance fits by evicting).
fn full_of_idle() -> RunnerState {
    RunnerState {
        capacity_idle_mb: 1024,
        ..report(1024, 0, false)
    }
}

/// [`full_of_idle`], and running one instance of `demo/<function>`, busy.
fn busy_one(function: &str) -> RunnerState {
    RunnerState {
        calls_in_flight: 1,
        warm: vec![WarmFunction {
            app: "demo".into(),
            function: function.into(),
            idle_slots: 0,
            instances: 1,
        }],
        ..full_of_idle()
    }
}

/// A call whose function has busy instances, and which could start a new one only by
/// evicting, waits for one of its own to free up (here: a report showing one warm) instead
/// of evicting at once; a call of a function with no instance anywhere does not wait.
#[tokio::test]
async fn warm_placer_waits_for_a_busy_functions_instance_rather_than_evict() {
    let pki = TestPki::new();
    // Every runner is full of idle instances of other functions (evicting fits), and
    // runner 1 runs demo/echo's one instance, busy.
    let busy_echo = busy_one("echo");
    let (runners, lb) = warm_lb_waiting(
        &pki,
        [full_of_idle(), busy_echo, full_of_idle()],
        Duration::from_secs(3),
    )
    .await;

    let started = Instant::now();
    let quick = post(&lb, "/r/demo/quick", "no instance anywhere").await;
    assert_eq!(quick.status, StatusCode::OK, "{quick:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no wait: {:?}",
        started.elapsed()
    );

    // Its instance frees up.
    let reply = held_call(&lb, &runners, report(1024, 0, true)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-fake-runner"), runners[1].name());
}

/// [`warm_lb_waiting`] with a 3 s warm wait, and runner `ejected` ejected while its report
/// stays fresh: it reports an idle `demo/quick` besides `reports[ejected]`, so that a quick
/// call asks it first, and it hangs up on that offer (one failure ejects).
async fn warm_lb_ejecting(
    pki: &TestPki,
    mut reports: [RunnerState; 3],
    ejected: usize,
) -> (Vec<FakeRunner>, Lb) {
    reports[ejected].warm.push(WarmFunction {
        app: "demo".into(),
        function: "quick".into(),
        idle_slots: 1,
        instances: 1,
    });
    let (runners, lb) = warm_lb_with(
        pki,
        reports,
        Duration::from_secs(3),
        ClientConfig {
            eject_after: 1,
            eject_initial: Duration::from_secs(30),
            eject_max: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    )
    .await;
    lb.dial_runners().await;
    runners[ejected].set_behaviour(Behaviour::HangUpUnacknowledged);
    let ejecting = post(&lb, "/r/demo/quick", "asks the ejected runner first").await;
    assert_eq!(ejecting.status, StatusCode::OK, "{ejecting:?}");
    assert_ne!(ejecting.header("x-fake-runner"), runners[ejected].name());
    let client = lb
        .pool
        .runners("default")
        .iter()
        .find(|r| r.address() == runners[ejected].address())
        .map(Arc::clone)
        .expect("listed");
    assert!(client.is_ejected(), "runner {ejected} was not ejected");
    assert!(client.reports().is_fresh(), "its report stays fresh");
    (runners, lb)
}

/// How long a `demo/echo` call takes, answered by another runner than [`warm_lb_ejecting`]'s
/// ejected one, when runner 1 runs demo/echo's one instance, busy, and every runner fits a
/// new instance only by evicting.
async fn echo_beside_ejected(ejected: usize) -> Duration {
    let pki = TestPki::new();
    let (runners, lb) = warm_lb_ejecting(
        &pki,
        [full_of_idle(), busy_one("echo"), full_of_idle()],
        ejected,
    )
    .await;
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/echo", "beside an ejected runner").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_ne!(reply.header("x-fake-runner"), runners[ejected].name());
    started.elapsed()
}

/// A runner ejected (or marked down) takes no call whatever its reports say: a call does not
/// wait for its busy instances to free up, and is placed at once where it fits by evicting
/// (it waited the whole warm wait before, [`MAX_WARM_WAIT`] here).
#[tokio::test]
async fn warm_placer_waits_for_no_instance_of_an_ejected_runner() {
    let took = echo_beside_ejected(1).await;
    assert!(
        took < MAX_WARM_WAIT / 2,
        "it waited for the ejected runner's instance: {took:?}"
    );
}

/// An ejected runner, which ranks where a runner without a report does, is not the one a
/// call's warm wait looks at: the call still waits for its function's busy instance on a
/// runner that takes calls (runner 1; the ejected one is the ring's first) rather than
/// evict at once.
#[tokio::test]
async fn warm_placer_still_waits_for_a_warm_instance_beside_an_ejected_runner() {
    let took = echo_beside_ejected(0).await;
    assert!(took >= MAX_WARM_WAIT / 2, "it evicted at once: {took:?}");
}

/// A call whose warm wait would last to its placement deadline (a short function timeout, a
/// long expected cold start) ends the wait a last pass early and is offered: it waited to
/// the deadline and got 503 with every runner able to take it by evicting.
#[tokio::test]
async fn warm_placer_ends_a_warm_wait_in_time_for_a_last_offer() {
    let pki = TestPki::new();
    let busy_quick = busy_one("quick");
    let (_runners, lb) = warm_lb_waiting(
        &pki,
        [full_of_idle(), busy_quick, full_of_idle()],
        Duration::from_secs(3),
    )
    .await;
    lb.dial_runners().await;
    // demo/quick: a 2 s timeout, so 1 s to be placed, all of which its warm wait would take.
    let started = Instant::now();
    let reply = post(&lb, "/r/demo/quick", "placed at last").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it did not wait for a warm instance first: {:?}",
        started.elapsed()
    );
}

/// A `demo/echo` call placed on a runner whose body stays open until [`HeldCall::end`].
struct HeldCall {
    feed: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    reply: tokio::task::JoinHandle<Reply>,
}

impl HeldCall {
    /// Starts it and waits until `runner` has seen it.
    async fn start(lb: &Lb, runner: &FakeRunner) -> Self {
        let (feed, req) = fed("/r/demo/echo");
        let address = lb.address.clone();
        let reply = tokio::spawn(async move { send(&address, req).await });
        feed.send(Ok(Frame::data(Bytes::from_static(b"held "))))
            .await
            .expect("fed");
        runner
            .wait_until(BOUND, |seen| !seen.is_empty())
            .await
            .expect("the held call placed");
        HeldCall { feed, reply }
    }

    /// Ends its body; returns when it ended, once it is answered 200.
    async fn end(self) -> Instant {
        self.feed
            .send(Ok(Frame::data(Bytes::from_static(b"done"))))
            .await
            .expect("fed");
        drop(self.feed);
        let ended = Instant::now();
        let reply = answer(self.reply).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        ended
    }
}

/// A `demo/echo` POST of `body`, in the background.
fn spawn_post(lb: &Lb, body: &'static str) -> tokio::task::JoinHandle<Reply> {
    let address = lb.address.clone();
    tokio::spawn(async move { send(&address, request(Method::POST, "/r/demo/echo", body)).await })
}

/// The reply of a call in the background, within [`BOUND`].
async fn answer(call: tokio::task::JoinHandle<Reply>) -> Reply {
    tokio::time::timeout(BOUND, call)
        .await
        .expect("answered")
        .expect("joined")
}

/// With a placer that keeps no reports (`naive`), a call refused for want of room pauses
/// before it asks again; a call of its function ending on a runner of the group ends the
/// pause, and the paused call asks again at once rather than when its backoff runs out.
#[tokio::test]
async fn a_paused_call_asks_again_as_soon_as_a_call_of_its_function_ends() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    // A pause of 2.1 s at least (3 s less the backoff's jitter).
    let lb = start_lb(
        &pki,
        &addresses(&runners),
        Options {
            retry_initial: Duration::from_secs(3),
            ..Options::default()
        },
    )
    .await;
    // The first call is served; the second refused once, then served.
    runners[0].script([Behaviour::Echo, Behaviour::Refuse]);
    let first = HeldCall::start(&lb, &runners[0]).await;
    let second = spawn_post(&lb, "second");
    runners[0]
        .wait_until(BOUND, |seen| seen.len() == 2)
        .await
        .expect("the second call refused");
    let refused = Instant::now();

    first.end().await;
    let second = answer(second).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(runners[0].seen().len(), 3, "{:?}", runners[0].seen());
    assert!(
        refused.elapsed() < Duration::from_millis(1500),
        "asked again only when its pause ran out, {:?} after the refusal",
        refused.elapsed()
    );
}

/// A runner full of busy instances is short of memory: when one of its calls ends, a call of
/// the same function waiting for room takes the instance at once, without waiting for the
/// runner's next report (the fakes report only once, so here none comes before the report
/// goes stale). Before, every waiting call waited for that report: a runner carried one call
/// per instance per report.
#[tokio::test]
async fn a_waiting_call_takes_the_instance_its_functions_ended_call_left_without_a_report() {
    let pki = TestPki::new();
    // The home: its only memory held by an idle instance of demo/echo (a new instance would
    // evict). The others: full, nothing warm.
    let home = RunnerState {
        capacity_idle_mb: 64,
        ..report(64, 0, true)
    };
    let (runners, lb) = warm_lb(&pki, [home, report(0, 8, false), report(0, 8, false)]).await;
    let reports_taken = Instant::now();
    // As a real runner: the call's acknowledgement and end carry pool versions the report
    // does not show, so the LB keeps counting the call until its end.
    runners[0].give_pool_versions();

    // The first call takes the idle instance and holds it while its body streams.
    let first = HeldCall::start(&lb, &runners[0]).await;

    // The second waits: every runner is known to be full.
    let second = spawn_post(&lb, "second");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked: usize = runners.iter().map(|r| r.seen().len()).sum();
    assert_eq!(asked, 1, "nobody is asked while the call waits");

    // The first call ends: its instance is idle, and the waiting call takes it.
    let ended = first.end().await;
    let second = answer(second).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(second.header("x-fake-runner"), runners[0].name());
    // Before, only the report going stale (3 s after it came) let the call go.
    assert!(
        ended.elapsed() < Duration::from_secs(1),
        "placed {:?} after the first call's end ({:?} after the reports came)",
        ended.elapsed(),
        reports_taken.elapsed()
    );
    assert!(runners[1].seen().is_empty() && runners[2].seen().is_empty());
}

/// A `demo/echo` call that the warm placer holds back: after 300 ms no runner has seen an
/// echo call; then runner 1 reports `freed`, and the call's reply comes within [`BOUND`].
async fn held_call(lb: &Lb, runners: &[FakeRunner], freed: RunnerState) -> Reply {
    let address = lb.address.clone();
    let call = tokio::spawn(async move {
        send(&address, request(Method::POST, "/r/demo/echo", "patient")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        runners
            .iter()
            .all(|r| !r.seen().iter().any(|c| c.function == "echo")),
        "nobody is asked while the call is held"
    );
    runners[1].report_state(freed);
    tokio::time::timeout(BOUND, call)
        .await
        .expect("placed")
        .expect("joined")
}

/// Reads what the LB sends on one raw connection after writing `request`: everything until
/// it closes (`<EOF>` is appended then) or `wait` has passed.
async fn raw_exchange(address: &str, request: Vec<u8>, wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    // Written in the background: the LB may answer (and close) before it has all of it.
    let writing = tokio::spawn(async move {
        for chunk in request.chunks(64 * 1024) {
            if writer.write_all(chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(BOUND).await;
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    got.extend_from_slice(b"<EOF>");
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writing.abort();
    String::from_utf8_lossy(&got).into_owned()
}

/// The head of the first answer in `text`, lower-cased.
fn first_head(text: &str) -> String {
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn chunked_bytes(total: usize) -> Vec<u8> {
    let chunk = vec![b'c'; 64 * 1024];
    let mut out = Vec::new();
    for _ in 0..total.div_ceil(chunk.len()) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// An answer after which the connection closes says so: a 413 to a chunked body that went
/// past the limit, a 408 to a body that stalled, and an early answer to a body of more
/// than the LB drains. Before, each went out as keep-alive, and a client's next request on
/// the connection found it closed.
#[tokio::test]
async fn answers_after_which_the_connection_closes_say_connection_close() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo, Behaviour::AnswerUnread]).await;
    let next = "GET /health HTTP/1.1\r\nHost: lb.test\r\n\r\n";

    // 413: 8 MiB of chunks against a 1 MiB limit.
    let lb = start_lb(&pki, &addresses(&runners[..1]), Options::default()).await;
    let mut request =
        b"POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    request.extend(chunked_bytes(8 * 1024 * 1024));
    request.extend_from_slice(next.as_bytes());
    let text = raw_exchange(&lb.address, request, BOUND).await;
    let head = first_head(&text);
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("connection: close"), "{head}");

    // 408: 1,000 bytes of 200,000, then nothing.
    let lb = start_lb(
        &pki,
        &addresses(&runners[..1]),
        Options {
            body_idle_timeout: Duration::from_millis(300),
            ..Options::default()
        },
    )
    .await;
    let mut request =
        b"POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 200000\r\n\r\n".to_vec();
    request.extend(vec![b'a'; 1000]);
    let text = raw_exchange(&lb.address, request, BOUND).await;
    let head = first_head(&text);
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("connection: close"), "{head}");

    // An early answer to 16 MiB the function does not read.
    let lb = start_lb(
        &pki,
        &addresses(&runners[1..]),
        Options {
            max_request_body: 64 * 1024 * 1024,
            ..Options::default()
        },
    )
    .await;
    let len = 16 * 1024 * 1024;
    let mut request =
        format!("POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: {len}\r\n\r\n")
            .into_bytes();
    request.extend(vec![b'u'; len]);
    request.extend_from_slice(next.as_bytes());
    let text = raw_exchange(&lb.address, request, BOUND).await;
    let head = first_head(&text);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");

    // A small body the function does not read is drained: the connection stays, and the
    // answer says nothing of closing.
    let mut request =
        b"POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 100000\r\n\r\n".to_vec();
    request.extend(vec![b'u'; 100_000]);
    request.extend_from_slice(next.as_bytes());
    let text = raw_exchange(&lb.address, request, Duration::from_secs(3)).await;
    let head = first_head(&text);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert!(
        text.contains("ok\n"),
        "the next request is answered: {text}"
    );
}

#[tokio::test]
async fn headers_the_clients_connection_header_names_do_not_reach_the_function() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let mut req = request(Method::POST, "/r/demo/echo", "x");
    let headers = req.headers_mut();
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Echo-Secret"),
    );
    headers.insert("x-echo-secret", HeaderValue::from_static("hop"));
    headers.insert("x-echo-other", HeaderValue::from_static("end to end"));
    let reply = send(&lb.address, req).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("x-echo-other"), "end to end");
    assert!(
        reply.headers.get("x-echo-secret").is_none(),
        "a connection-nominated header reached the function: {reply:?}"
    );
}

/// hyper takes the chunking off a `gzip, chunked` body and nothing else: the function would
/// get gzip with nothing to say so. A transfer coding other than `chunked` gets 501 and
/// reaches no runner (RFC 9112, 6.1); `chunked` alone is served.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for coding in ["gzip, chunked", "GZIP,chunked", "x-custom, chunked"] {
        let head = raw_head(
            &lb.address,
            &format!(
                "POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 501"), "{coding}: {head}");
    }
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
    let head = raw_head(
        &lb.address,
        "POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(runners[0].seen().len(), 1);
}

/// The `Host` header becomes part of the URL the function sees, so it must be a host and
/// an optional port: one that would reshape the URL (`x/admin?a=` made the path `/admin`),
/// or none at all on HTTP/1.1, gets 400 and reaches no runner (RFC 9112, 3.2).
#[tokio::test]
async fn a_host_that_is_no_host_or_none_on_http11_gets_400() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for host in [
        "Host: x/admin?a=\r\n",
        "Host: x#y\r\n",
        "Host: user@x\r\n",
        "Host: a b\r\n",
        "Host: \r\n",
        "",
    ] {
        let head = raw_head(
            &lb.address,
            &format!("POST /r/demo/echo HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "{host:?}: {head}");
    }
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
    // A host with a port, and HTTP/1.0 without a Host, are served.
    let head = raw_head(
        &lb.address,
        "POST /r/demo/echo?q=1 HTTP/1.1\r\nHost: lb.test:8080\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let head = raw_head(
        &lb.address,
        "POST /r/demo/echo HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let urls: Vec<String> = runners[0]
        .seen()
        .into_iter()
        .map(|c| c.request_url)
        .collect();
    assert_eq!(
        urls,
        [
            "http://lb.test:8080/r/demo/echo?q=1",
            "http://localhost/r/demo/echo"
        ]
    );
}

/// An HTTP/1.0 client that asks to keep its connection is told so only where the answer's
/// length is known: an answer of unknown length ends with the connection (HTTP/1.0 has no
/// chunked coding), and must not first say `keep-alive`.
#[tokio::test]
async fn an_http10_answer_of_unknown_length_does_not_promise_keep_alive() {
    let pki = TestPki::new();
    let request =
        "POST /r/demo/echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    let streaming = fakes(&pki, &[Behaviour::AnswerHeadThenStall]).await;
    let lb = start_lb(&pki, &addresses(&streaming), Options::default()).await;
    let head = raw_head(&lb.address, request).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    // With a length, keep-alive stands.
    let sized = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&sized), Options::default()).await;
    let head = raw_head(&lb.address, request).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("content-length: 0"), "{head}");
    assert!(head.contains("connection: keep-alive"), "{head}");
    // An answer after which the connection closes (a body left unread) says `close` alone.
    let head = raw_head(
        &lb.address,
        "POST /nothing HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 100000000\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 404"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
}

/// RFC 9112 (3.2) asks for a 400 to any HTTP/1.1 request without a `Host`, or with one
/// that is no host, whatever its target: a target in absolute form (whose authority the
/// function then sees), `/health` and a path of no function included. HTTP/1.0 needs none.
#[tokio::test]
async fn every_http11_request_needs_a_host_whatever_its_target() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for request in [
        "POST http://abs.test/r/demo/echo HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "POST http://abs.test/r/demo/echo HTTP/1.1\r\nHost: a/admin?x\r\nContent-Length: 0\r\n\r\n",
        "GET /health HTTP/1.1\r\n\r\n",
        "GET /health HTTP/1.1\r\nHost: x#y\r\n\r\n",
        "GET /nothing/here HTTP/1.1\r\n\r\n",
        "CONNECT /r/demo/echo HTTP/1.1\r\n\r\n",
    ] {
        let head = raw_head(&lb.address, request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{request:?}: {head}");
        assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
    }
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
    for (request, status) in [
        (
            "GET /health HTTP/1.1\r\nHost: lb.test\r\n\r\n",
            "HTTP/1.1 200",
        ),
        ("GET /health HTTP/1.0\r\n\r\n", "HTTP/1.0 200"),
        ("GET /nothing/here HTTP/1.0\r\n\r\n", "HTTP/1.0 404"),
    ] {
        let head = raw_head(&lb.address, request).await;
        assert!(head.starts_with(status), "{request:?}: {head}");
    }
}

#[tokio::test]
async fn two_host_headers_get_400_an_absolute_target_names_the_host_and_escapes_route() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let head = raw_head(
        &lb.address,
        "POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nHost: other.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
    let head = raw_head(
        &lb.address,
        "POST http://abs.test/r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].request_url, "http://abs.test/r/demo/echo");
    // Escaped unreserved characters reach the same function (RFC 3986, 6.2.2.2).
    for path in ["/invoke/demo/ech%6F", "/r/demo/%65cho"] {
        let head = raw_head(
            &lb.address,
            &format!("POST {path} HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }
}

/// `OPTIONS *` asks about the server, not a resource (RFC 9110, 9.3.7): 200 with
/// `Content-Length: 0` and an `Allow`, as Go's `net/http` answers it, with the call id.
/// `*` with any other method is a 400 (RFC 9112, 3.2.4), and it still needs its Host.
#[tokio::test]
async fn options_asterisk_is_answered_and_asterisk_with_another_method_gets_400() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for request in [
        "OPTIONS * HTTP/1.1\r\nHost: lb.test\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 5\r\n\r\nhello",
        "OPTIONS * HTTP/1.0\r\n\r\n",
    ] {
        let head = raw_head(&lb.address, request).await.to_ascii_lowercase();
        assert_eq!(head.split(' ').nth(1), Some("200"), "{request:?}: {head}");
        assert!(head.contains("\r\ncontent-length: 0\r\n"), "{head}");
        assert!(
            head.contains("\r\nallow: get, head, post, put, delete, options, trace, patch\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nfn-call-id: "), "{head}");
    }
    for method in ["GET", "POST", "DELETE", "PROPFIND"] {
        let request = format!("{method} * HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n");
        let (head, body) = raw_answer(&lb.address, &request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{method}: {head}");
        assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
        assert!(body.contains("is for OPTIONS only"), "{method}: {body}");
        assert!(body.contains(method), "{method}: {body}");
    }
    let head = raw_head(&lb.address, "OPTIONS * HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "no Host: {head}");

    // Over HTTP/2, `:path` `*`.
    let mut sender = h2c(&lb.address).await;
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(lb.address.as_str())
        .path_and_query("*")
        .build()
        .expect("uri");
    let response = h2_empty(&mut sender, Method::OPTIONS, uri).await;
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    assert!(
        response.headers().contains_key(header::ALLOW),
        "{response:?}"
    );
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
}

/// Writes `request` on a new connection; the response head and its body (as long as its
/// `Content-Length` says), bounded.
async fn raw_answer(address: &str, request: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                let length = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&got[end + 4..end + 4 + length]);
                    return (head, body.into_owned());
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    return (String::from_utf8_lossy(&got).into_owned(), String::new());
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("the LB answers in time")
}

/// A 405's `Allow` lists what the target takes (RFC 9110, 10.2.1): on a route, every method
/// but CONNECT, TRACE and extension methods included, which do reach the function. CONNECT
/// to a path of no function is a 404, as any method there is; to `/invoke/...`, a 405 with
/// `Allow: POST` as any other method but POST; to `host:port` (a tunnel), a 404 that says so.
#[tokio::test]
async fn a_405_allow_lists_what_the_target_takes_and_connect_elsewhere_gets_404() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let (head, body) = raw_answer(
        &lb.address,
        "CONNECT /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let allow: Vec<String> = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("allow"))
        .map(|(_, value)| value.split(',').map(|m| m.trim().to_owned()).collect())
        .unwrap_or_else(|| panic!("no Allow: {head}"));
    assert!(body.contains("TRACE"), "{body}");
    // Each method the Allow lists reaches the function, and so does one it cannot list.
    for method in allow.iter().map(String::as_str).chain(["PROPFIND"]) {
        let head = raw_head(
            &lb.address,
            &format!(
                "{method} /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n"
            ),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{method}: {head}");
    }
    let expected = allow.len() + 1;
    assert_eq!(runners[0].seen().len(), expected, "each reached a runner");
    assert!(allow.iter().any(|m| m == "TRACE"), "{allow:?}");
    assert!(!allow.iter().any(|m| m == "CONNECT"), "{allow:?}");

    for (request, status, allow) in [
        ("CONNECT /r/demo/nope HTTP/1.1", "HTTP/1.1 404", None),
        ("CONNECT /nothing/here HTTP/1.1", "HTTP/1.1 404", None),
        ("CONNECT /invoke/demo/nope HTTP/1.1", "HTTP/1.1 404", None),
        (
            "CONNECT /invoke/demo/echo HTTP/1.1",
            "HTTP/1.1 405",
            Some("POST"),
        ),
        (
            "CONNECT /health HTTP/1.1",
            "HTTP/1.1 405",
            Some("GET, HEAD"),
        ),
    ] {
        let head = raw_head(&lb.address, &format!("{request}\r\nHost: lb.test\r\n\r\n")).await;
        assert!(head.starts_with(status), "{request}: {head}");
        assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
        if let Some(allow) = allow {
            assert!(
                head.contains(&format!("\r\nallow: {allow}\r\n")),
                "{request}: {head}"
            );
        }
    }
    // The authority form asks for a tunnel: a 404 that says the LB is no proxy, naming the
    // authority it was asked for.
    let (head, body) = raw_answer(
        &lb.address,
        "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(
        body.contains("no function at example.test:443: CONNECT host:port asks for a tunnel"),
        "{body}"
    );
    // Any other method with that form gets the same 404, saying the form is CONNECT's.
    let (head, body) = raw_answer(
        &lb.address,
        "GET example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(
        body.contains(
            "no function at example.test:443: a target of the form host:port is CONNECT's \
             alone, and GET needs a path"
        ),
        "{body}"
    );
    assert_eq!(
        runners[0].seen().len(),
        expected,
        "no CONNECT reached a runner"
    );
}

/// The URL the function sees carries the client's scheme: an absolute-form target's
/// (`https` from a proxy that ended TLS), or HTTP/2's `:scheme`, as Fn's Go server kept it;
/// `http` otherwise. Its length counts that scheme against what a runner takes. A scheme
/// other than http and https gets 400.
#[tokio::test]
async fn the_function_sees_the_clients_scheme_and_other_schemes_get_400() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for request in [
        "POST https://abs.test/r/demo/echo?q=1 HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "POST HTTPS://abs.test/r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "POST http://abs.test/r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
    ] {
        let head = raw_head(&lb.address, request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{request:?}: {head}");
    }
    let mut sender = h2c(&lb.address).await;
    // An HTTP/2 `:scheme` goes as the client spells it (the builder keeps `HTTPS`, where
    // parsing a whole URI would spell it in lower case).
    for scheme in ["https", "http", "HTTPS"] {
        let uri = http::Uri::builder()
            .scheme(scheme)
            .authority("h2.test")
            .path_and_query("/r/demo/echo")
            .build()
            .expect("uri");
        let response = h2_empty(&mut sender, Method::POST, uri).await;
        assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    }
    let urls: Vec<String> = runners[0]
        .seen()
        .into_iter()
        .map(|c| c.request_url)
        .collect();
    assert_eq!(
        urls,
        [
            "https://abs.test/r/demo/echo?q=1",
            "https://abs.test/r/demo/echo",
            "http://abs.test/r/demo/echo",
            "http://lb.test/r/demo/echo",
            "https://h2.test/r/demo/echo",
            "http://h2.test/r/demo/echo",
            "https://h2.test/r/demo/echo",
        ]
    );

    // The length of the URL counts `https`: at the limit it is served, one byte over it
    // is a 414, though the same target would fit as `http`.
    let max = fn_protocol::call::MAX_URL_LEN;
    let prefix = "https://abs.test/r/demo/echo?q=";
    let target_of = |len: usize| format!("{prefix}{}", "x".repeat(len - prefix.len()));
    for (len, status) in [(max, "HTTP/1.1 200"), (max + 1, "HTTP/1.1 414")] {
        let head = raw_head(
            &lb.address,
            &format!(
                "POST {} HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
                target_of(len)
            ),
        )
        .await;
        assert!(head.starts_with(status), "{len}: {head}");
    }
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert_eq!(seen[7].request_url.len(), max);

    for request in [
        "POST ftp://abs.test/r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "GET ws://abs.test/health HTTP/1.1\r\nHost: lb.test\r\n\r\n",
    ] {
        let (head, body) = raw_answer(&lb.address, request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{request:?}: {head}");
        assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
        assert!(body.contains("is not http or https"), "{body}");
    }
    assert_eq!(runners[0].seen().len(), 8, "no runner saw them");
}

/// A target with userinfo (`http://user:pw@host/...`) gets 400 saying so, on every path:
/// RFC 9110 (4.2.4) asks a recipient to take it as an error, and the LB dropped it and
/// served the call. The answer does not repeat the credentials.
#[tokio::test]
async fn a_target_with_userinfo_gets_400_naming_it() {
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    for request in [
        "POST http://user:s3cret@abs.test/r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "POST https://user@abs.test/invoke/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
        "GET http://user:s3cret@abs.test/health HTTP/1.1\r\nHost: lb.test\r\n\r\n",
        "GET http://user:s3cret@abs.test/nothing/here HTTP/1.1\r\nHost: lb.test\r\n\r\n",
    ] {
        let (head, body) = raw_answer(&lb.address, request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{request:?}: {head}");
        assert!(head.to_ascii_lowercase().contains("fn-call-id:"), "{head}");
        assert!(body.contains("userinfo"), "{body}");
        assert!(body.contains("Authorization"), "says what to do: {body}");
        assert!(!body.contains("s3cret"), "{body}");
    }
    // Over HTTP/2, in `:authority`.
    let mut sender = h2c(&lb.address).await;
    let uri = http::Uri::from_static("http://user:s3cret@h2.test/r/demo/echo");
    let response = h2_empty(&mut sender, Method::POST, uri).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{response:?}");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("userinfo"),
        "{body:?}"
    );
    assert!(runners[0].seen().is_empty(), "{:?}", runners[0].seen());
    // An `@` further on, in the path or the query, is no userinfo.
    let head = raw_head(
        &lb.address,
        "POST http://abs.test/r/demo/echo?to=a@b HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = runners[0].seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].request_url, "http://abs.test/r/demo/echo?to=a@b");
}

/// While the LB drains (health NOT_SERVING, the listener still open), every HTTP/1 answer
/// says `Connection: close` and the connection closes after it, so that a client takes its
/// next request elsewhere now: kept alive until the drain delay ends, an idle connection
/// was closed then under a request the client had just sent, which was lost without an
/// answer. HTTP/2 is served as before (it gets GOAWAY when the delay ends).
#[tokio::test]
async fn a_draining_lb_closes_each_http1_connection_after_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let runners = fakes(&pki, &[Behaviour::Echo]).await;
    let lb = start_lb(&pki, &addresses(&runners), Options::default()).await;
    let call = "POST /r/demo/echo HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 2\r\n\r\nhi";
    let mut stream = tokio::net::TcpStream::connect(&lb.address)
        .await
        .expect("connect");
    stream.write_all(call.as_bytes()).await.expect("write");
    let before = echo_answer(&mut stream).await;
    assert!(before.starts_with("http/1.1 200"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");

    lb.health.set_not_serving().await;
    stream.write_all(call.as_bytes()).await.expect("write");
    let during = echo_answer(&mut stream).await;
    assert!(
        during.starts_with("http/1.1 200"),
        "served while draining: {during}"
    );
    assert!(during.contains("\r\nconnection: close\r\n"), "{during}");
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(BOUND, stream.read(&mut rest))
        .await
        .expect("the LB closes the connection in time");
    assert!(
        matches!(closed, Ok(0)),
        "closed after the answer: {closed:?}"
    );

    // HTTP/1.0 asking to be kept alive is not.
    let head = raw_head(
        &lb.address,
        "GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 503"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");

    // HTTP/2 is served on as it was.
    let mut sender = h2c(&lb.address).await;
    let uri: http::Uri = format!("http://{}/r/demo/echo", lb.address)
        .parse()
        .expect("uri");
    let answer = h2_empty(&mut sender, Method::POST, uri.clone()).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(answer.headers().get(header::CONNECTION).is_none());
    let again = h2_empty(&mut sender, Method::POST, uri).await;
    assert_eq!(
        again.status(),
        StatusCode::OK,
        "the h2 connection stays open"
    );
}

/// One answer of the echo runner to `hi` on `stream`, read to its end (or until the LB
/// closes or stalls), lower-cased.
async fn echo_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"hi")) {
        match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).to_ascii_lowercase()
}
