//! The FDK as a runner sees it: a socket that appears in a directory, and `POST /call` over it.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fn_fdk::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use fn_fdk::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use fn_fdk::{Body, BoxError, Context, Error, FnEnv, Response, ResponseBody};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Bound on every wait, so a broken FDK fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

/// An FDK server on a socket in its own temporary directory.
struct Running {
    _dir: tempfile::TempDir,
    link: PathBuf,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), Error>>,
}

fn env_for(link: &Path) -> FnEnv {
    FnEnv::from_vars([
        ("FN_FORMAT", "http-stream".to_owned()),
        ("FN_LISTENER", format!("unix:{}", link.display())),
        ("FN_APP_NAME", "shop".to_owned()),
        ("FN_FN_NAME", "cart".to_owned()),
        ("FN_MEMORY", "128".to_owned()),
        ("FN_TYPE", "sync".to_owned()),
        ("COLOUR", "blue".to_owned()),
    ])
    .expect("valid environment")
}

async fn start<F, Fut>(handler: F, prepare: impl FnOnce(&Path)) -> Running
where
    F: Fn(Context, Body) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("lsnr.sock");
    prepare(dir.path());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(fn_fdk::serve_with(env_for(&link), handler, async {
        // A dropped sender stops the server too.
        drop(stopped.await);
    }));
    wait_for_socket(&link).await;
    Running {
        _dir: dir,
        link,
        stop,
        server,
    }
}

/// Polls for the socket the way a runner does: ready once the path resolves to a socket (a
/// stale regular file left by an earlier instance does not count).
impl Running {
    /// Stops the server and checks that it shut down cleanly.
    async fn stop_cleanly(self) {
        self.stop.send(()).expect("server running");
        self.server
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

async fn wait_for_socket(link: &Path) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let is_socket =
        |path: &Path| std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
    while !is_socket(link) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear",
            link.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn connect<B>(link: &Path) -> SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = UnixStream::connect(link).await.expect("connect to the FDK");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("client connection: {err}");
        }
    });
    sender
}

/// A call the way the runner sends it.
fn call<B>(body: B) -> Request<B> {
    Request::post("/call")
        .header(HOST, "fn")
        .header("Fn-Call-Id", "01CALL")
        .header("Fn-Deadline", "2099-01-02T03:04:05Z")
        .header("Fn-Http-Method", "PUT")
        .header("Fn-Http-Request-Url", "http://lb:8080/r/shop/cart?x=1")
        .header("Fn-Intent", "httprequest")
        .header("Fn-Http-H-Accept", "text/a")
        .header("Fn-Http-H-Accept", "text/b")
        .header("Fn-Http-H-Content-Type", "text/plain")
        .header(CONTENT_TYPE, "text/plain")
        .body(body)
        .expect("valid request")
}

/// Feeds a [`streamed`] request body; dropping it ends the body.
type Feed = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type Streamed = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A request body the test sends chunk by chunk.
fn streamed() -> (Streamed, Feed) {
    let (tx, rx) = mpsc::channel(1);
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    (StreamBody::new(futures::StreamExt::boxed(chunks)), tx)
}

/// Starts a call whose body streams, sends `first`, and waits for the answer's head, which
/// must come before the body ends; the head and what feeds the rest of the body.
async fn head_after(
    client: &mut SendRequest<Streamed>,
    first: &'static [u8],
) -> (hyper::Response<Incoming>, Feed) {
    let (body, tx) = streamed();
    let responding = tokio::spawn(client.send_request(call(body)));
    tx.send(Ok(Frame::data(Bytes::from_static(first))))
        .await
        .expect("request open");
    let response = tokio::time::timeout(PATIENCE, responding)
        .await
        .expect("response head before the request ended")
        .expect("client task")
        .expect("a response");
    (response, tx)
}

async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    let frame = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("a frame in time")?
        .expect("a readable frame");
    Some(frame.into_data().expect("a data frame"))
}

async fn text(response: hyper::Response<Incoming>) -> String {
    let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body in time")
        .expect("a readable body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("UTF-8 body")
}

fn header(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// Answers 201 with what it saw of the call in `X-*` headers; the body is `first\n`, then —
/// once the test releases it — the request body.
fn reporting_handler(
    release: Arc<Notify>,
) -> impl Fn(Context, Body) -> std::pin::Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>
+ Send
+ Sync
+ 'static {
    move |ctx: Context, mut body: Body| {
        let release = Arc::clone(&release);
        Box::pin(async move {
            let (tx, out) = ResponseBody::channel(1);
            tokio::spawn(async move {
                tx.send("first\n").await?;
                release.notified().await;
                while let Some(chunk) = body.chunk().await {
                    tx.send(chunk?).await?;
                }
                Ok::<_, BoxError>(())
            });
            let mut response = Response::new(out)
                .with_status(StatusCode::CREATED)
                .with_header(CONTENT_TYPE, HeaderValue::from_static("application/x-test"));
            let seen = [
                ("x-call-id", ctx.call_id().to_owned()),
                ("x-method", ctx.method().to_owned()),
                ("x-url", ctx.request_url().to_owned()),
                ("x-app", format!("{}/{}", ctx.app_name(), ctx.fn_name())),
                (
                    "x-colour",
                    ctx.config("COLOUR").unwrap_or("none").to_owned(),
                ),
                ("x-deadline", ctx.deadline().is_some().to_string()),
                ("x-header-count", ctx.headers().len().to_string()),
            ];
            for (name, value) in seen {
                response = response.with_header(header(name), HeaderValue::try_from(value)?);
            }
            for accept in ctx.headers().get_all("accept") {
                response = response.with_header(header("x-accept"), accept.clone());
            }
            Ok(response)
        })
    }
}

#[tokio::test]
async fn a_call_is_translated_both_ways_and_the_response_streams() {
    let release = Arc::new(Notify::new());
    let running = start(reporting_handler(Arc::clone(&release)), |_| {}).await;
    let mut client = connect(&running.link).await;

    let response = client
        .send_request(call(Full::new(Bytes::from_static(b"payload"))))
        .await
        .expect("a response");

    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the function's status travels in a header"
    );
    let headers = response.headers();
    assert_eq!(headers["fn-http-status"], "201");
    let version = headers["fn-fdk-version"].to_str().expect("ASCII");
    assert!(version.starts_with("fdk-rust/"), "{version}");
    assert_eq!(headers["fn-fdk-runtime"], "rust");
    assert_eq!(headers[CONTENT_TYPE], "application/x-test");
    assert!(
        !headers.contains_key("fn-http-h-content-type"),
        "the content type travels plainly only"
    );
    assert_eq!(headers["fn-http-h-x-call-id"], "01CALL");
    assert_eq!(headers["fn-http-h-x-method"], "PUT");
    assert_eq!(headers["fn-http-h-x-url"], "http://lb:8080/r/shop/cart?x=1");
    assert_eq!(headers["fn-http-h-x-app"], "shop/cart");
    assert_eq!(headers["fn-http-h-x-colour"], "blue");
    assert_eq!(headers["fn-http-h-x-deadline"], "true");
    assert_eq!(
        headers["fn-http-h-x-header-count"], "3",
        "accept twice, content-type"
    );
    let accepts: Vec<_> = headers.get_all("fn-http-h-x-accept").iter().collect();
    assert_eq!(accepts, ["text/a", "text/b"]);
    assert!(
        !headers.contains_key("x-call-id"),
        "function headers travel prefixed only"
    );
    assert_eq!(headers[TRANSFER_ENCODING], "chunked");

    let mut body = response.into_body();
    assert_eq!(
        next_chunk(&mut body).await.as_deref(),
        Some(&b"first\n"[..]),
        "the first chunk arrives while the function is still writing"
    );
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"payload");

    running.stop_cleanly().await;
}

/// The function's `Content-Type` goes plainly only, every value in order, as fdk-go sends it
/// (its `encapHeaders` passes it over); the runner gives the plain one to the client.
#[tokio::test]
async fn the_functions_content_type_goes_plainly_only() {
    let running = start(
        |_ctx: Context, _body: Body| async move {
            Ok(Response::new("{}")
                .with_header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .with_header(CONTENT_TYPE, HeaderValue::from_static("text/plain")))
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let response = client
        .send_request(call(Empty::<Bytes>::new()))
        .await
        .expect("a response");
    let headers = response.headers();
    let plain: Vec<_> = headers.get_all(CONTENT_TYPE).iter().collect();
    assert_eq!(plain, ["application/json", "text/plain"]);
    assert!(
        !headers.contains_key("fn-http-h-content-type"),
        "{headers:?}"
    );
    assert_eq!(text(response).await, "{}");
    running.stop_cleanly().await;
}

/// A header the handler already names `Fn-Http-H-X` goes as it is, as fdk-go sends it, and
/// so reaches the client as `X` (prefixed again, the client got `Fn-Http-H-X`).
#[tokio::test]
async fn a_header_already_in_wire_form_is_not_prefixed_again() {
    let running = start(
        |_ctx: Context, _body: Body| async move {
            Ok(Response::new("")
                .with_header(header("fn-http-h-x-trace"), HeaderValue::from_static("t1"))
                .with_header(header("x-plain"), HeaderValue::from_static("p")))
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let response = client
        .send_request(call(Empty::<Bytes>::new()))
        .await
        .expect("a response");
    let headers = response.headers();
    assert_eq!(headers["fn-http-h-x-trace"], "t1");
    assert_eq!(headers["fn-http-h-x-plain"], "p");
    assert!(
        !headers.contains_key("fn-http-h-fn-http-h-x-trace"),
        "{headers:?}"
    );
    running.stop_cleanly().await;
}

/// A call carrying as many client headers as the dataplane passes (256) is served: hyper's
/// default limit of 100 header lines refused one with about 93 with 431.
#[tokio::test]
async fn a_call_with_every_header_the_runner_passes_is_served() {
    let release = Arc::new(Notify::new());
    release.notify_one();
    let running = start(reporting_handler(Arc::clone(&release)), |_| {}).await;
    let mut client = connect(&running.link).await;
    let mut request = call(Full::new(Bytes::from_static(b"many")));
    for i in 0..253 {
        request.headers_mut().append(
            hyper::header::HeaderName::try_from(format!("fn-http-h-x-n{i}")).expect("name"),
            HeaderValue::from_static("v"),
        );
    }
    let response = client.send_request(request).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["fn-http-h-x-header-count"],
        "256",
        "accept twice, content-type and 253 more"
    );
    running.stop_cleanly().await;
}

#[tokio::test]
async fn a_request_body_streams_through_an_echo_while_it_is_being_sent() {
    let running = start(
        |_ctx: Context, body: Body| async move { Ok(Response::new(body)) },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let (response, tx) = head_after(&mut client, b"ping").await;
    assert_eq!(response.headers()["fn-http-status"], "200");
    let mut body = response.into_body();
    assert_eq!(next_chunk(&mut body).await.as_deref(), Some(&b"ping"[..]));
    tx.send(Ok(Frame::data(Bytes::from_static(b"pong"))))
        .await
        .expect("request open");
    assert_eq!(next_chunk(&mut body).await.as_deref(), Some(&b"pong"[..]));
    drop(tx);
    assert_eq!(next_chunk(&mut body).await, None);
}

/// `Body::bytes` gathers a body that arrives in many chunks, whole and in order, whether it
/// declared its length (`Content-Length`, set aside at once) or not (chunked, grown as it
/// comes), and a declared length above what it sets aside at once.
#[tokio::test]
async fn a_body_in_many_chunks_is_read_whole_with_or_without_its_length() {
    let running = start(
        |_ctx: Context, body: Body| async move {
            let all = body.bytes().await?;
            let sum: u64 = all.iter().map(|&b| u64::from(b)).sum();
            Ok(Response::new(format!("{} {sum}", all.len())))
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    for (declared, total) in [(false, 1 << 20), (true, 1 << 20), (true, (17 << 20) + 3)] {
        let (body, tx) = streamed();
        let mut request = call(body);
        if declared {
            request
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(total));
        }
        let responding = tokio::spawn(client.send_request(request));
        let (mut sent, mut sum, mut size) = (0usize, 0u64, 1usize);
        while sent < total {
            let len = size.min(total - sent);
            let chunk: Vec<u8> = (sent..sent + len).map(|i| (i % 251) as u8).collect();
            sum += chunk.iter().map(|&b| u64::from(b)).sum::<u64>();
            tx.send(Ok(Frame::data(Bytes::from(chunk))))
                .await
                .expect("request open");
            sent += len;
            size = size * 3 % 70_001 + 1;
        }
        drop(tx);
        let response = tokio::time::timeout(PATIENCE, responding)
            .await
            .expect("an answer in time")
            .expect("client task")
            .expect("a response");
        assert_eq!(response.headers()["fn-http-status"], "200");
        assert_eq!(
            text(response).await,
            format!("{total} {sum}"),
            "declared length: {declared}"
        );
    }
}

/// A handler that answers without reading its input leaves the connection usable: the FDK
/// reads the rest of the body after the answer, while the runner is still sending it, and
/// the next call on the same connection is served. (hyper would otherwise close the
/// connection, and the runner, still writing the body, could see the call fail.)
#[tokio::test]
async fn a_body_the_handler_leaves_unread_is_read_and_the_connection_serves_the_next_call() {
    let running = start(
        |_ctx: Context, _body: Body| async move { Ok(Response::new("ignored")) },
        |_| {},
    )
    .await;
    let send = |tx: Feed, len: usize| async move {
        for _ in 0..len / (64 * 1024) {
            tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
                .await
                .map_err(|_| "the request body is no longer read")?;
        }
        Ok::<_, &str>(())
    };
    let mut client = connect(&running.link).await;
    for call_no in 0..3 {
        tokio::time::timeout(PATIENCE, client.ready())
            .await
            .expect("in time")
            .unwrap_or_else(|e| panic!("call {call_no}: the connection is gone: {e}"));
        let (response, tx) = head_after(&mut client, b"first").await;
        assert_eq!(text(response).await, "ignored", "call {call_no}");
        // The answer is in; the rest of the body (1 MiB) still goes, then its end.
        send(tx, 1024 * 1024)
            .await
            .unwrap_or_else(|e| panic!("call {call_no}: {e}"));
    }
}

/// A handler that panics when it is called, before it returns its future (an `unwrap` of
/// a missing config value, say), answers 502 like one whose future panics, and the
/// connection serves the next call: it broke the connection, and the runner saw the call
/// fail with no answer, then retired the instance.
#[tokio::test]
async fn a_handler_that_panics_before_its_future_answers_502_and_serving_goes_on() {
    let running = start(
        |ctx: Context, _body: Body| {
            assert!(
                ctx.call_id() != "panic-now",
                "handler panicked on purpose, before its future"
            );
            async move { Ok(Response::new("fine")) }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let mut request = call(Full::new(Bytes::from_static(b"x")));
    request
        .headers_mut()
        .insert("fn-call-id", http::HeaderValue::from_static("panic-now"));
    let response = client
        .send_request(request)
        .await
        .expect("a response, not a broken connection");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        text(response).await,
        "function failed: the handler panicked\n"
    );
    tokio::time::timeout(PATIENCE, client.ready())
        .await
        .expect("in time")
        .expect("the same connection still serves");
    let response = client
        .send_request(call(Full::new(Bytes::from_static(b"ok"))))
        .await
        .expect("the same connection still serves");
    assert_eq!(text(response).await, "fine");
}

/// `call(body)` with `Fn-Deadline` set to `deadline` (none when `None`).
fn call_with_deadline<B>(body: B, deadline: Option<&str>) -> Request<B> {
    let mut request = call(body);
    request.headers_mut().remove("fn-deadline");
    if let Some(deadline) = deadline {
        request.headers_mut().insert(
            "fn-deadline",
            HeaderValue::from_str(deadline).expect("a header value"),
        );
    }
    request
}

/// `Fn-Deadline` `after` from now, as the runner writes it.
/// A deadline the handler of a call reaches, not the FDK's reading of it: on a loaded
/// machine a deadline of a few hundred milliseconds could pass before the call is read, and
/// the handler would not be called at all.
const IN_TIME: Duration = Duration::from_millis(1500);

fn deadline_in(after: Duration) -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now() + after).to_string()
}

/// Tells, when dropped, that the handler holding it has been stopped (or has ended).
struct Dropped(Option<oneshot::Sender<()>>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take()
            && tx.send(()).is_err()
        {
            eprintln!("the test no longer waits for the handler's end");
        }
    }
}

/// A handler still at work at its deadline is stopped then (its future dropped), and the
/// call answers 504 a moment later (a runner cutting the call off at the deadline would have
/// answered first); the connection serves the next call. The handler ran on until its end,
/// or until the runner hung up.
#[tokio::test]
async fn a_handler_still_running_at_its_deadline_is_stopped_and_the_call_answers_504() {
    let (stopped_tx, mut stopped) = oneshot::channel();
    let stopped_tx = Arc::new(std::sync::Mutex::new(Some(stopped_tx)));
    let running = start(
        move |_ctx: Context, body: Body| {
            let guard = Dropped(stopped_tx.lock().expect("not poisoned").take());
            async move {
                let guard = guard;
                if &body.bytes().await?[..] == b"slow" {
                    tokio::time::sleep(PATIENCE * 2).await;
                }
                drop(guard);
                Ok(Response::new("in time"))
            }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let started = std::time::Instant::now();
    let request = call_with_deadline(
        Full::new(Bytes::from_static(b"slow")),
        Some(&deadline_in(IN_TIME)),
    );
    let response = tokio::time::timeout(PATIENCE, client.send_request(request))
        .await
        .expect("an answer at the deadline, not the handler's end")
        .expect("a response");
    let answered = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.headers()["fn-http-status"], "504");
    assert_eq!(
        text(response).await,
        "function timed out: the call's deadline passed\n"
    );
    assert!(
        answered >= IN_TIME + Duration::from_millis(900),
        "the runner's moment after the deadline was left to it: {answered:?}"
    );
    assert_eq!(
        stopped.try_recv(),
        Ok(()),
        "the handler was stopped at the deadline, before the answer"
    );

    tokio::time::timeout(PATIENCE, client.ready())
        .await
        .expect("in time")
        .expect("the same connection still serves");
    let request = call_with_deadline(
        Full::new(Bytes::from_static(b"quick")),
        Some(&deadline_in(Duration::from_secs(60))),
    );
    let response = client.send_request(request).await.expect("a response");
    assert_eq!(response.headers()["fn-http-status"], "200");
    assert_eq!(text(response).await, "in time");
    running.stop_cleanly().await;
}

/// A call that comes after its deadline answers 504 at once, and the handler is not called.
#[tokio::test]
async fn a_call_that_comes_after_its_deadline_answers_504_without_the_handler() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let running = start(
        move |_ctx: Context, _body: Body| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(Response::new("called")) }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    for (past, body) in [
        ("2001-01-01T00:00:00Z", &b""[..]),
        ("2020-05-06T07:08:09.5+02:00", b"unread"),
    ] {
        let request = call_with_deadline(Full::new(Bytes::from_static(body)), Some(past));
        let response = client.send_request(request).await.expect("a response");
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{past}");
        assert_eq!(response.headers()["fn-http-status"], "504", "{past}");
        text(response).await;
        tokio::time::timeout(PATIENCE, client.ready())
            .await
            .expect("in time")
            .expect("the same connection still serves");
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    running.stop_cleanly().await;
}

/// A call without `Fn-Deadline`, or with one that is not RFC 3339, has no limit in the FDK
/// (as in fdk-go): a handler that takes a while answers.
#[tokio::test]
async fn a_call_without_a_readable_deadline_runs_without_a_limit() {
    let running = start(
        |_ctx: Context, _body: Body| async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok(Response::new("done"))
        },
        |_| {},
    )
    .await;
    let calls = [None, Some("soon"), Some("2001-01-01 00:00:00")].map(|deadline| {
        let link = running.link.clone();
        tokio::spawn(async move {
            let mut client = connect(&link).await;
            let request = call_with_deadline(Empty::<Bytes>::new(), deadline);
            let response = client.send_request(request).await.expect("a response");
            (
                deadline,
                response.headers()["fn-http-status"].clone(),
                text(response).await,
            )
        })
    });
    for call in calls {
        let (deadline, status, body) = call.await.expect("client task");
        assert_eq!(
            (status.to_str().expect("ASCII"), body.as_str()),
            ("200", "done"),
            "{deadline:?}"
        );
    }
    running.stop_cleanly().await;
}

/// An answer whose head went in time but whose body still streams at the deadline is stopped
/// then (its writer sees `Closed`) and broken off a moment later: the runner sees a broken
/// reply, not a complete short one. The body streamed on for as long as the writer wrote.
#[tokio::test]
async fn an_answer_still_streaming_at_the_deadline_is_broken_off() {
    let (closed_tx, mut closed) = oneshot::channel();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let running = start(
        move |_ctx: Context, _body: Body| {
            let closed_tx = closed_tx.lock().expect("not poisoned").take();
            async move {
                let (tx, out) = ResponseBody::channel(1);
                tokio::spawn(async move {
                    while tx.send("tick\n").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if let Some(closed_tx) = closed_tx
                        && closed_tx.send(()).is_err()
                    {
                        eprintln!("the test no longer waits for the writer's end");
                    }
                });
                Ok(Response::new(out))
            }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let request = call_with_deadline(Empty::<Bytes>::new(), Some(&deadline_in(IN_TIME)));
    let response = client.send_request(request).await.expect("a response");
    assert_eq!(response.headers()["fn-http-status"], "200");
    let mut body = response.into_body();
    assert_eq!(next_chunk(&mut body).await.as_deref(), Some(&b"tick\n"[..]));
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => break Err(err),
                None => break Ok(()),
            }
        }
    })
    .await
    .expect("the answer ends at the deadline");
    assert!(
        ended.is_err(),
        "the answer is broken off, not ended cleanly"
    );
    assert_eq!(
        closed.try_recv(),
        Ok(()),
        "the writer saw Closed at the deadline, before the answer was broken off"
    );
    running.stop_cleanly().await;
}

#[tokio::test]
async fn handler_errors_and_panics_answer_502_and_serving_goes_on() {
    let running = start(
        |_ctx: Context, body: Body| async move {
            match &body.bytes().await?[..] {
                b"fail" => Err("boom".into()),
                b"panic" => panic!("handler panicked on purpose"),
                _ => Ok(Response::new("fine")),
            }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;

    for (input, message) in [
        ("fail", "function failed: boom\n"),
        ("panic", "function failed: the handler panicked\n"),
    ] {
        let response = client
            .send_request(call(Full::new(Bytes::from_static(input.as_bytes()))))
            .await
            .expect("a response");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{input}");
        assert_eq!(response.headers()["fn-http-status"], "502", "{input}");
        assert_eq!(response.headers()["fn-fdk-runtime"], "rust", "{input}");
        assert_eq!(text(response).await, message);
    }

    let response = client
        .send_request(call(Full::new(Bytes::from_static(b"ok"))))
        .await
        .expect("the same connection still serves");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["fn-http-status"], "200");
    assert_eq!(text(response).await, "fine");

    let mut wrong_path = call(Empty::<Bytes>::new());
    *wrong_path.uri_mut() = "/invoke".parse().expect("URI");
    let mut wrong_method = call(Empty::<Bytes>::new());
    *wrong_method.method_mut() = Method::GET;
    let mut client = connect(&running.link).await;
    for (request, status) in [
        (wrong_path, StatusCode::NOT_FOUND),
        (wrong_method, StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let response = client.send_request(request).await.expect("a response");
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["fn-fdk-runtime"], "rust", "{status}");
    }
}

/// A connection whose first request head never ends does not hold up a stop: hyper waits
/// for the rest of the head for ever (the FDK sets no header timer), and a graceful
/// shutdown closes a connection only between requests.
#[tokio::test]
async fn a_connection_that_never_sent_a_whole_request_does_not_hold_up_the_stop() {
    let running = start(
        |_ctx: Context, _body: Body| async move { Ok(Response::new("")) },
        |_| {},
    )
    .await;
    let mut silent = tokio::net::UnixStream::connect(&running.link)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut silent, b"POST /call HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("a head begun");
    // Served by now: the connection's task is waiting for the rest of the head.
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.stop.send(()).expect("server running");
    tokio::time::timeout(PATIENCE, running.server)
        .await
        .expect("shutdown in time, a half-sent head does not hold it up")
        .expect("server task")
        .expect("clean shutdown");
    drop(silent);
}

#[tokio::test]
async fn the_socket_replaces_stale_files_is_world_writable_and_goes_away_on_shutdown() {
    let running = start(
        |_ctx: Context, _body: Body| async move { Ok(Response::new("")) },
        |dir| {
            std::fs::write(dir.join("lsnr.sock"), "stale").expect("stale link");
            std::fs::write(dir.join("phonylsnr.sock"), "stale").expect("stale socket");
        },
    )
    .await;
    let dir = running.link.parent().expect("socket dir").to_owned();
    let phony = dir.join("phonylsnr.sock");
    assert_eq!(
        std::fs::read_link(&running.link).expect("lsnr.sock is a link"),
        Path::new("phonylsnr.sock"),
        "the link target is relative"
    );
    let mode = std::fs::metadata(&phony)
        .expect("phony socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);

    let mut client = connect(&running.link).await;
    let response = client
        .send_request(call(Empty::<Bytes>::new()))
        .await
        .expect("a response");
    assert_eq!(response.headers()["fn-http-status"], "200");
    assert_eq!(response.headers()["content-length"], "0");

    running.stop.send(()).expect("server running");
    tokio::time::timeout(PATIENCE, running.server)
        .await
        .expect("shutdown in time, an idle connection does not hold it up")
        .expect("server task")
        .expect("clean shutdown");
    assert!(
        std::fs::symlink_metadata(&running.link).is_err(),
        "link removed"
    );
    assert!(std::fs::symlink_metadata(&phony).is_err(), "socket removed");
    drop(client);
}

#[tokio::test]
async fn a_missing_socket_directory_is_a_startup_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("missing").join("lsnr.sock");
    let result = fn_fdk::serve_with(
        env_for(&link),
        |_ctx: Context, _body: Body| async move { Ok(Response::new("")) },
        std::future::pending(),
    )
    .await;
    assert!(matches!(result, Err(Error::Socket { .. })), "{result:?}");
}

/// A runner that hangs up mid-call (as it does at the deadline) stops the handler at once.
#[tokio::test]
async fn a_runner_that_hangs_up_stops_the_handler() {
    let (stopped_tx, stopped) = oneshot::channel();
    let stopped_tx = Arc::new(std::sync::Mutex::new(Some(stopped_tx)));
    let (started_tx, started) = oneshot::channel();
    let started_tx = Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let running = start(
        move |_ctx: Context, body: Body| {
            let guard = Dropped(stopped_tx.lock().expect("not poisoned").take());
            let started_tx = started_tx.lock().expect("not poisoned").take();
            async move {
                let _guard = guard;
                body.bytes().await?;
                if let Some(tx) = started_tx {
                    let _ = tx.send(());
                }
                tokio::time::sleep(PATIENCE * 2).await;
                Ok(Response::new("too late"))
            }
        },
        |_| {},
    )
    .await;
    let mut client = connect(&running.link).await;
    let request = call_with_deadline(Full::new(Bytes::from_static(b"slow")), None);
    // The runner hangs up once the handler runs (it has read the body).
    let running_call = async {
        tokio::select! {
            answer = client.send_request(request) => panic!("an answer: {answer:?}"),
            started = started => started.expect("the handler says it started"),
        }
    };
    tokio::time::timeout(PATIENCE, running_call)
        .await
        .expect("the handler started in time");
    drop(client);
    tokio::time::timeout(PATIENCE, stopped)
        .await
        .expect("the handler stopped in time")
        .expect("the guard sent its word");
    running.stop_cleanly().await;
}
