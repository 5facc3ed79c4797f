//! The bad-input matrix: hostile or broken input at every boundary of the real dataplane —
//! the lb-agent's HTTP front, the runner's and the npm's gRPC services, and their mutual TLS.
//! Each case must get a clear error (a status, a refusal or a rejected handshake that says
//! what was wrong, or a closed connection where HTTP allows nothing else), and a normal call
//! right after it must succeed: an echo call through LB → npm-fed list → runner, the npm's
//! runner list, and the runner's `Status`.
//!
//! The cluster: one pure-runner, an npm with the `static` control plane over it, an lb-agent
//! fed by the npm with `FN_MAX_REQUEST_BODY` = 64 KiB. The summary table has one row per
//! case: its bad input (the clear error it got, under "errors by kind") and the normal call
//! after it.

use std::future::Future;
use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fn_protocol::CallSpec;
use fn_protocol::poolmanager::node_pool_scaler_client::NodePoolScalerClient;
use fn_protocol::poolmanager::runner_manager_client::RunnerManagerClient;
use fn_protocol::poolmanager::{CapacitySnapshot, CapacitySnapshotList, LbGroupId};
use fn_protocol::runner::runner_protocol_client::RunnerProtocolClient;
use fn_protocol::runner::{
    ClientMsg, DataFrame, ErrorKind, RefusalReason, RunnerMsg, TryCall, client_msg, runner_msg,
};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::http;
use fn_system_tests::report::{Ledger, Report};
use fn_system_tests::{env, merge};
use fn_tls::{NodeTls, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const MAX_BODY: usize = 64 * 1024;
/// Daemon log filter that includes the report of each rejected TLS handshake (past the
/// first in a second, they are logged at debug level).
const TLS_LOG: &str = "info,fn_tls::transport=debug";
/// Bound for any one case.
const CASE_BOUND: Duration = Duration::from_secs(40);
/// The LB closes a connection whose request head has not arrived within this
/// (`fn_lb::front::HEADER_READ_TIMEOUT`), plus slack.
const HEADER_TIMEOUT_BOUND: Duration = Duration::from_secs(13);

const CATALOG: &str = r#"
[[functions]]
app = "bad"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 64

[[functions]]
app = "bad"
name = "slow"
route = "/slow"
command = ["fn-sleep"]
memory_mb = 64
timeout = "2s"

[[functions]]
app = "bad"
name = "sleep"
route = "/sleep"
command = ["fn-sleep"]
memory_mb = 64
timeout = "30s"

[[functions]]
app = "bad"
name = "orphan"
route = "/orphan"
command = ["fn-echo"]
memory_mb = 64
lb_group = "nobody-serves-this"
"#;

/// The matrix: runs cases, each followed by a normal call, and keeps their ledgers.
struct Matrix<'c> {
    cluster: &'c Cluster,
    report: Report,
    failures: Vec<String>,
    cases: usize,
}

impl Matrix<'_> {
    /// Runs one case: `bad` sends the bad input, checks that the answer is the clear error
    /// expected, and returns its kind; then a normal call must succeed.
    async fn case<F>(&mut self, name: &str, bad: F)
    where
        F: Future<Output = anyhow::Result<String>>,
    {
        self.cases += 1;
        let mut ledger = Ledger::new();
        ledger.sent();
        let started = Instant::now();
        match tokio::time::timeout(CASE_BOUND, bad).await {
            Ok(Ok(kind)) => ledger.error(kind, started.elapsed()),
            Ok(Err(e)) => {
                ledger.error("WRONG ANSWER", started.elapsed());
                self.failures.push(format!("{name}: {e:#}"));
            }
            Err(_) => {
                ledger.error("HUNG", started.elapsed());
                self.failures
                    .push(format!("{name}: no answer within {CASE_BOUND:?}"));
            }
        }
        ledger.sent();
        let started = Instant::now();
        match normal_call(self.cluster, self.cases).await {
            Ok(()) => ledger.ok(started.elapsed()),
            Err(e) => {
                ledger.error("NORMAL CALL FAILED", started.elapsed());
                self.failures
                    .push(format!("{name}: the normal call after it failed: {e:#}"));
            }
        }
        self.report.case(name, &ledger);
    }
}

/// An echo call through the LB, the npm's list and the runner's `Status`.
async fn normal_call(cluster: &Cluster, n: usize) -> anyhow::Result<()> {
    let body = format!("normal call {n} ").repeat(64);
    let reply = http::request(
        &cluster.http,
        Method::POST,
        "/r/bad/echo",
        &[],
        Bytes::from(body.clone()),
    )
    .await?;
    ensure!(
        reply.status == 200 && reply.text() == body,
        "echo: {} {}",
        reply.status,
        reply.text()
    );
    let tls = cluster.certs.client()?;
    let npm = cluster.npm.as_ref().context("no npm")?;
    let list = RunnerManagerClient::new(channel(&tls, &npm.address).await?)
        .get_lb_group(LbGroupId {
            id: "default".into(),
        })
        .await
        .context("npm GetLBGroup")?
        .into_inner();
    ensure!(list.runners.len() == 1, "npm list: {list:?}");
    cluster.status(0).await.context("runner Status")?;
    Ok(())
}

async fn channel(tls: &TlsMode, address: &str) -> anyhow::Result<Channel> {
    Ok(fn_tls::grpc_endpoint(tls, address)?
        .with(|e| {
            e.connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(5))
        })
        .connect()
        .await?)
}

// ---------------------------------------------------------------------------------------
// HTTP front

/// What came back on a raw connection.
#[derive(Debug)]
struct Raw {
    status: Option<u16>,
    text: String,
    bytes: Vec<u8>,
    /// The server closed the connection.
    closed: bool,
}

/// Writes `request` (then `more` after `pause`, if given) and reads until a whole response
/// head arrived or the server closed the connection, at most `bound`.
async fn raw(address: &str, request: &[u8], bound: Duration) -> anyhow::Result<Raw> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    // The server may answer and close before reading everything; what it answers counts.
    if let Err(e) = stream.write_all(request).await {
        eprintln!("raw request: write failed ({e}); reading the answer");
    }
    read_answer(&mut stream, bound).await
}

async fn read_answer(stream: &mut tokio::net::TcpStream, bound: Duration) -> anyhow::Result<Raw> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + bound;
    let mut closed = false;
    loop {
        let head_done = got.windows(4).any(|w| w == b"\r\n\r\n");
        if head_done && got.len() > 64 {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok());
    Ok(Raw {
        status,
        text,
        bytes: got,
        closed,
    })
}

fn expect_status(raw: &Raw, status: u16) -> anyhow::Result<String> {
    ensure!(
        raw.status == Some(status),
        "expected {status}, got {:?}: {:?}",
        raw.status,
        raw.text.chars().take(300).collect::<String>()
    );
    Ok(format!("http {status}"))
}

/// A JSON error from the LB itself: the status, `Fn-Call-Id`, `{"error":{"message":...}}`.
fn expect_json_error(reply: &http::Reply, status: u16, mentions: &str) -> anyhow::Result<String> {
    ensure!(
        reply.status == status,
        "expected {status}, got {} {}",
        reply.status,
        reply.text()
    );
    ensure!(reply.header("fn-call-id").is_some(), "no Fn-Call-Id");
    ensure!(
        reply.text().starts_with("{\"error\":{\"message\":") && reply.text().contains(mentions),
        "error body should mention {mentions:?}: {}",
        reply.text()
    );
    Ok(format!("http {status}"))
}

fn request_head(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: lb\r\n{extra}\r\n")
}

/// Waits until the runner has no call in flight, at most `bound`; returns how long.
async fn runner_idle(cluster: &Cluster, bound: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if cluster.status(0).await?.calls_in_flight == 0 {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < bound,
            "the runner still has a call in flight after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the runner has a call in flight, at most 10 s.
async fn runner_busy(cluster: &Cluster) -> anyhow::Result<()> {
    let start = Instant::now();
    while cluster.status(0).await?.calls_in_flight == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the call never reached the runner"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn http_cases(m: &mut Matrix<'_>) {
    let lb = m.cluster.http.clone();
    let lb = lb.as_str();
    let second = Duration::from_secs(5);

    m.case("http: header block over the size limit (512 KiB)", async {
        let head = request_head(
            "POST",
            "/r/bad/echo",
            &format!("X-Big: {}\r\n", "a".repeat(512 * 1024)),
        );
        expect_status(&raw(lb, head.as_bytes(), second).await?, 431)
    })
    .await;
    m.case("http: 200 request headers", async {
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        expect_status(
            &raw(
                lb,
                request_head("POST", "/r/bad/echo", &many).as_bytes(),
                second,
            )
            .await?,
            431,
        )
    })
    .await;
    m.case("http: Content-Length over FN_MAX_REQUEST_BODY", async {
        let reply = http::request(
            lb,
            Method::POST,
            "/r/bad/echo",
            &[],
            Bytes::from(vec![b'x'; MAX_BODY + 1]),
        )
        .await?;
        expect_json_error(&reply, 413, "FN_MAX_REQUEST_BODY")
    })
    .await;
    m.case("http: chunked body growing over the limit", async {
        let mut req =
            request_head("POST", "/r/bad/slow", "Transfer-Encoding: chunked\r\n").into_bytes();
        for _ in 0..3 {
            req.extend_from_slice(format!("{:x}\r\n", 40 * 1024).as_bytes());
            req.extend_from_slice(&vec![b'1'; 40 * 1024]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let answer = raw(lb, &req, second).await?;
        expect_status(&answer, 413)?;
        ensure!(
            answer.text.contains("FN_MAX_REQUEST_BODY"),
            "{}",
            answer.text
        );
        Ok("http 413".into())
    })
    .await;
    m.case(
        "http: Expect 100-continue with an oversize Content-Length",
        async {
            // The body is never sent: the LB must answer from the head alone.
            let head = request_head(
                "POST",
                "/r/bad/echo",
                &format!(
                    "Content-Length: {}\r\nExpect: 100-continue\r\n",
                    10 * MAX_BODY
                ),
            );
            expect_status(&raw(lb, head.as_bytes(), second).await?, 413)
        },
    )
    .await;
    m.case("http: GET on /invoke", async {
        let reply = http::request(lb, Method::GET, "/invoke/bad/echo", &[], Bytes::new()).await?;
        ensure!(
            reply.header("allow").as_deref() == Some("POST"),
            "Allow: {:?}",
            reply.header("allow")
        );
        expect_json_error(&reply, 405, "POST")
    })
    .await;
    m.case("http: DELETE on /health", async {
        let reply = http::request(lb, Method::DELETE, "/health", &[], Bytes::new()).await?;
        ensure!(reply.header("allow").as_deref() == Some("GET, HEAD"));
        expect_json_error(&reply, 405, "GET")
    })
    .await;
    m.case("http: unknown route", async {
        expect_json_error(
            &http::request(lb, Method::POST, "/r/bad/nope", &[], Bytes::new()).await?,
            404,
            "no function",
        )
    })
    .await;
    m.case("http: path outside the API", async {
        expect_json_error(
            &http::request(lb, Method::GET, "/etc/passwd", &[], Bytes::new()).await?,
            404,
            "no function",
        )
    })
    .await;
    m.case(
        "http: dot segments in the route (/r/bad/../bad/echo)",
        async {
            let answer = raw(
                lb,
                request_head("POST", "/r/bad/../bad/echo", "Content-Length: 0\r\n").as_bytes(),
                second,
            )
            .await?;
            expect_status(&answer, 404)
        },
    )
    .await;
    m.case("http: percent-encoded invalid UTF-8 in the path", async {
        let answer = raw(
            lb,
            request_head("POST", "/r/bad/%FF%FE%00", "Content-Length: 0\r\n").as_bytes(),
            second,
        )
        .await?;
        expect_status(&answer, 404)
    })
    .await;
    m.case("http: URI over 64 KiB", async {
        let path = format!("/r/bad/{}", "a".repeat(70 * 1024));
        expect_status(
            &raw(lb, request_head("GET", &path, "").as_bytes(), second).await?,
            414,
        )
    })
    .await;
    m.case("http: invalid method token", async {
        expect_status(
            &raw(lb, b"GE(T /r/bad/echo HTTP/1.1\r\nHost: lb\r\n\r\n", second).await?,
            400,
        )
    })
    .await;
    m.case("http: binary garbage instead of a request line", async {
        let garbage: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let answer = raw(lb, &[&garbage[..], b"\r\n\r\n"].concat(), second).await?;
        expect_status(&answer, 400)
    })
    .await;
    m.case("http: Content-Length not a number", async {
        let head = request_head("POST", "/r/bad/echo", "Content-Length: abc\r\n");
        expect_status(&raw(lb, head.as_bytes(), second).await?, 400)
    })
    .await;
    m.case("http: Content-Length and Transfer-Encoding both", async {
        // RFC 9112 6.3: Transfer-Encoding wins, and the server must close the connection
        // after answering (no request smuggling through a second request on it).
        let head = request_head(
            "POST",
            "/r/bad/echo",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        );
        let answer = raw(
            lb,
            &[
                head.as_bytes(),
                b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            ]
            .concat(),
            second,
        )
        .await?;
        expect_status(&answer, 200)?;
        ensure!(
            answer.text.to_lowercase().contains("connection: close"),
            "connection not closed: {}",
            answer.text
        );
        Ok("chunked wins, connection: close".into())
    })
    .await;
    m.case("http: invalid chunk size", async {
        let head = request_head("POST", "/r/bad/slow", "Transfer-Encoding: chunked\r\n");
        let answer = raw(
            lb,
            &[head.as_bytes(), b"zz\r\nhello\r\n0\r\n\r\n"].concat(),
            second,
        )
        .await?;
        expect_status(&answer, 400)?;
        ensure!(
            answer.text.contains("reading the request body"),
            "{}",
            answer.text
        );
        Ok("http 400".into())
    })
    .await;
    m.case("http: control character in a header value", async {
        let head = request_head(
            "POST",
            "/r/bad/echo",
            "X-Bad: a\x01b\r\nContent-Length: 0\r\n",
        );
        expect_status(&raw(lb, head.as_bytes(), second).await?, 400)
    })
    .await;
    m.case("http: NUL byte in the path", async {
        expect_status(
            &raw(
                lb,
                b"GET /r/bad/e\0cho HTTP/1.1\r\nHost: lb\r\n\r\n",
                second,
            )
            .await?,
            400,
        )
    })
    .await;
    m.case("http: HTTP/2 preface followed by garbage", async {
        let mut req = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        req.extend_from_slice(&[0xff; 64]);
        let answer = raw(lb, &req, second).await?;
        ensure!(answer.closed, "connection left open: {answer:?}");
        // A GOAWAY frame header from the server's HTTP/2 stack: length 8, type 7.
        ensure!(
            answer.bytes.windows(4).any(|w| w == [0, 0, 8, 7]),
            "no GOAWAY: {:?}",
            answer.text
        );
        Ok("h2 GOAWAY, closed".into())
    })
    .await;
    m.case(
        "http: request head trickled one byte a second (slowloris)",
        async {
            let mut stream = tokio::net::TcpStream::connect(lb).await?;
            let started = Instant::now();
            let head = request_head("POST", "/r/bad/echo", "Content-Length: 0\r\n");
            let mut closed = None;
            for byte in head.as_bytes().iter().take(40) {
                if stream.write_all(&[*byte]).await.is_err() {
                    closed = Some(started.elapsed());
                    break;
                }
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed = Some(started.elapsed());
                        break;
                    }
                    Ok(Ok(_)) => bail!("an answer to half a request head"),
                    Err(_) => {}
                }
                ensure!(
                    started.elapsed() < HEADER_TIMEOUT_BOUND + Duration::from_secs(5),
                    "still open"
                );
            }
            let closed = closed.context("the LB still waits for a head trickled over 40 s")?;
            ensure!(
                closed <= HEADER_TIMEOUT_BOUND,
                "closed only after {closed:?}"
            );
            Ok(format!("closed after {}s", closed.as_secs()))
        },
    )
    .await;
    let cluster = m.cluster;
    m.case("http: body stalls mid-way (slow sender)", async {
        let mut stream = tokio::net::TcpStream::connect(lb).await?;
        let head = request_head("POST", "/r/bad/slow", "Content-Length: 100\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(b"12").await?;
        let started = Instant::now();
        let answer = read_answer(&mut stream, Duration::from_secs(10)).await?;
        let took = started.elapsed();
        expect_status(&answer, 504)?;
        ensure!(
            took < Duration::from_secs(8),
            "504 only after {took:?} (function timeout 2 s)"
        );
        ensure!(answer.text.contains("timeout"), "{}", answer.text);
        runner_idle(cluster, Duration::from_secs(3)).await?;
        Ok("http 504".into())
    })
    .await;
    m.case("http: client disconnects mid-body", async {
        let mut stream = tokio::net::TcpStream::connect(lb).await?;
        let head = request_head("POST", "/r/bad/sleep", "Content-Length: 100\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(b"5").await?;
        runner_busy(cluster).await?;
        drop(stream);
        let idle = runner_idle(cluster, Duration::from_secs(3)).await?;
        Ok(format!("call cancelled in {}ms", idle.as_millis()))
    })
    .await;
    m.case("http: client disconnects while the function runs", async {
        let mut stream = tokio::net::TcpStream::connect(lb).await?;
        let head = request_head("POST", "/r/bad/sleep", "Content-Length: 5\r\n");
        stream.write_all(format!("{head}10000").as_bytes()).await?;
        runner_busy(cluster).await?;
        drop(stream);
        // The function would sleep 10 s; the call must be cancelled long before.
        let idle = runner_idle(cluster, Duration::from_secs(3)).await?;
        Ok(format!("call cancelled in {}ms", idle.as_millis()))
    })
    .await;
    m.case("http: client-supplied Fn-Call-Id", async {
        let reply = http::request(
            lb,
            Method::POST,
            "/r/bad/echo",
            &[("fn-call-id", "forged")],
            Bytes::from("x"),
        )
        .await?;
        ensure!(reply.status == 200, "{}", reply.status);
        let id = reply.header("fn-call-id").context("no Fn-Call-Id")?;
        ensure!(id != "forged", "the LB echoed a client-chosen call id");
        Ok("ignored, own id".into())
    })
    .await;
    m.case("http: function in an LB group no runner serves", async {
        let started = Instant::now();
        let reply = http::request(lb, Method::POST, "/r/bad/orphan", &[], Bytes::from("x")).await?;
        ensure!(reply.header("retry-after").is_some(), "no Retry-After");
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "503 after {:?}",
            started.elapsed()
        );
        expect_json_error(&reply, 503, "retry later")
    })
    .await;
    m.case("http: 200 idle connections held open", async {
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(tokio::net::TcpStream::connect(lb).await?);
        }
        // Served while they are open.
        normal_call(cluster, 0).await?;
        Ok("served alongside".into())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// gRPC to the runner

/// The request stream of an Engage call, fed through `rx`.
fn requests(
    rx: mpsc::Receiver<ClientMsg>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = ClientMsg> + Send>> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    }))
}

/// A valid call of `bad/sleep` as the LB would send it.
fn wire_call(id: &str) -> fn_protocol::runner::Call {
    let now = std::time::Instant::now();
    let spec = CallSpec {
        id: id.into(),
        app: "bad".into(),
        function: "sleep".into(),
        route: "/sleep".into(),
        method: Method::POST,
        request_url: "http://lb/r/bad/sleep".into(),
        headers: ::http::HeaderMap::new(),
        memory_mb: 64,
        concurrency: 1,
        timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        command: vec!["fn-sleep".into()],
        image: None,
        config: Default::default(),
        lb_group: "default".into(),
        deadline: now + Duration::from_secs(30),
    };
    (&spec).into()
}

fn try_call(call: Option<fn_protocol::runner::Call>) -> ClientMsg {
    ClientMsg {
        body: Some(client_msg::Body::TryCall(Box::new(TryCall { call }))),
    }
}

fn data(bytes: impl Into<Bytes>, eof: bool) -> ClientMsg {
    ClientMsg {
        body: Some(client_msg::Body::Data(DataFrame {
            data: bytes.into(),
            eof,
        })),
    }
}

/// What a raw Engage stream got back.
#[derive(Debug)]
struct Engaged {
    messages: Vec<runner_msg::Body>,
    /// The stream's final error status, if it failed.
    status: Option<tonic::Status>,
}

impl Engaged {
    fn refusal(&self) -> Option<(RefusalReason, String)> {
        self.messages.iter().find_map(|m| match m {
            runner_msg::Body::Acknowledged(a) if !a.committed => {
                Some((a.refusal(), a.details.clone()))
            }
            _ => None,
        })
    }

    fn committed(&self) -> bool {
        self.messages
            .iter()
            .any(|m| matches!(m, runner_msg::Body::Acknowledged(a) if a.committed))
    }

    fn finished(&self) -> Option<(ErrorKind, String)> {
        self.messages.iter().find_map(|m| match m {
            runner_msg::Body::Finished(f) => Some((f.kind(), f.details.clone())),
            _ => None,
        })
    }
}

/// Opens an Engage stream to the runner, sends `messages` (then half-closes unless
/// `keep_open`), and collects what comes back until the stream ends, at most 15 s.
async fn engage(
    cluster: &Cluster,
    messages: Vec<ClientMsg>,
    keep_open: bool,
) -> anyhow::Result<Engaged> {
    let tls = cluster.certs.client()?;
    let address = &cluster.runners.first().context("no runner")?.address;
    let mut client = RunnerProtocolClient::new(channel(&tls, address).await?)
        .max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<ClientMsg>(16);
    for m in messages {
        tx.send(m).await.context("request stream closed")?;
    }
    let hold = keep_open.then(|| tx.clone());
    drop(tx);
    let exchange = async {
        let mut out = Engaged {
            messages: Vec::new(),
            status: None,
        };
        let mut stream = match client.engage(requests(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                out.status = Some(status);
                return out;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(RunnerMsg { body: Some(body) })) => out.messages.push(body),
                Ok(Some(RunnerMsg { body: None })) => {}
                Ok(None) => break,
                Err(status) => {
                    out.status = Some(status);
                    break;
                }
            }
        }
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .context("the Engage stream did not end")?;
    drop(hold);
    Ok(out)
}

fn expect_refused(e: &Engaged, mentions: &str) -> anyhow::Result<String> {
    let (reason, details) = e.refusal().with_context(|| format!("not refused: {e:?}"))?;
    ensure!(
        reason == RefusalReason::Invalid,
        "refused as {reason:?}: {details}"
    );
    ensure!(
        details.contains(mentions),
        "refusal should mention {mentions:?}: {details}"
    );
    Ok("refused INVALID".into())
}

fn expect_protocol(e: &Engaged, mentions: &str) -> anyhow::Result<String> {
    let (kind, details) = e
        .finished()
        .with_context(|| format!("no CallFinished: {e:?}"))?;
    ensure!(
        kind == ErrorKind::Protocol,
        "finished as {kind:?}: {details}"
    );
    ensure!(
        details.contains(mentions),
        "details should mention {mentions:?}: {details}"
    );
    Ok("CallFinished PROTOCOL".into())
}

async fn runner_cases(m: &mut Matrix<'_>) {
    let cluster = m.cluster;
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("bad-input-{n}")
    };
    let ids: Vec<String> = (0..20).map(|_| id()).collect();
    let call = |i: usize| wire_call(&ids[i]);

    m.case("runner: DataFrame before TryCall", async {
        expect_protocol(
            &engage(cluster, vec![data("x", true)], false).await?,
            "must be TryCall",
        )
    })
    .await;
    m.case("runner: empty message before TryCall", async {
        expect_protocol(
            &engage(cluster, vec![ClientMsg { body: None }], false).await?,
            "must be TryCall",
        )
    })
    .await;
    m.case("runner: TryCall without a call", async {
        expect_refused(
            &engage(cluster, vec![try_call(None)], false).await?,
            "without a call",
        )
    })
    .await;
    m.case("runner: call spec with memory_mb = 0", async {
        let mut c = call(0);
        c.memory_mb = 0;
        expect_refused(
            &engage(cluster, vec![try_call(Some(c))], false).await?,
            "memory_mb",
        )
    })
    .await;
    m.case("runner: call spec with an invalid header name", async {
        let mut c = call(1);
        c.headers.push(fn_protocol::runner::Header {
            name: "bad name\n".into(),
            value: "v".into(),
        });
        expect_refused(
            &engage(cluster, vec![try_call(Some(c))], false).await?,
            "headers",
        )
    })
    .await;
    m.case("runner: call spec without an LB group", async {
        let mut c = call(2);
        c.lb_group.clear();
        expect_refused(
            &engage(cluster, vec![try_call(Some(c))], false).await?,
            "lb_group",
        )
    })
    .await;
    m.case("runner: timeout over an hour", async {
        let mut c = call(3);
        c.timeout_ms = 2 * 3600 * 1000;
        expect_refused(
            &engage(cluster, vec![try_call(Some(c))], false).await?,
            "timeout_ms",
        )
    })
    .await;
    m.case("runner: command escaping FN_FUNCTIONS_DIR (../)", async {
        let mut c = call(4);
        c.command = vec!["../../../../bin/sh".into(), "-c".into(), "id".into()];
        let e = engage(cluster, vec![try_call(Some(c))], false).await?;
        ensure!(!e.committed(), "committed: {e:?}");
        let (reason, details) = e.refusal().context("not refused")?;
        ensure!(reason == RefusalReason::Invalid, "{reason:?}: {details}");
        Ok("refused INVALID".into())
    })
    .await;
    m.case("runner: absolute command path", async {
        let mut c = call(5);
        c.command = vec!["/bin/sh".into()];
        let e = engage(cluster, vec![try_call(Some(c))], false).await?;
        let (reason, details) = e.refusal().with_context(|| format!("not refused: {e:?}"))?;
        ensure!(reason == RefusalReason::Invalid, "{reason:?}: {details}");
        Ok("refused INVALID".into())
    })
    .await;
    m.case("runner: a budget over the maximum", async {
        let mut c = call(6);
        c.timeout_ms = 10 * 3600 * 1000;
        expect_refused(
            &engage(cluster, vec![try_call(Some(c))], false).await?,
            "timeout_ms",
        )
    })
    .await;
    m.case("runner: memory over the runner's total", async {
        let mut c = call(7);
        c.memory_mb = 1_000_000;
        let e = engage(cluster, vec![try_call(Some(c))], false).await?;
        let (reason, details) = e.refusal().with_context(|| format!("not refused: {e:?}"))?;
        ensure!(
            reason == RefusalReason::TooLarge,
            "refused as {reason:?}: {details}"
        );
        Ok("refused TOO_LARGE".into())
    })
    .await;
    m.case("runner: data after eof", async {
        let e = engage(
            cluster,
            vec![
                try_call(Some(call(8))),
                data("1000", true),
                data("more", false),
            ],
            false,
        )
        .await?;
        ensure!(e.committed(), "not committed: {e:?}");
        expect_protocol(&e, "after eof")
    })
    .await;
    m.case("runner: a second TryCall on one stream", async {
        let e = engage(
            cluster,
            vec![try_call(Some(call(9))), try_call(Some(call(10)))],
            false,
        )
        .await?;
        expect_protocol(&e, "second TryCall")
    })
    .await;
    m.case(
        "runner: a 5 MiB frame (over the 4 MiB message limit)",
        async {
            let e = engage(
                cluster,
                vec![
                    try_call(Some(call(11))),
                    data(vec![b'9'; 5 * 1024 * 1024], false),
                ],
                false,
            )
            .await?;
            ensure!(e.committed(), "not committed: {e:?}");
            let kind = match (e.finished(), &e.status) {
                (Some((ErrorKind::Protocol, details)), _) => {
                    ensure!(details.contains("message"), "{details}");
                    "CallFinished PROTOCOL"
                }
                (None, Some(status))
                    if status.code() == tonic::Code::ResourceExhausted
                        || status.code() == tonic::Code::OutOfRange =>
                {
                    "status RESOURCE_EXHAUSTED"
                }
                _ => bail!("neither a protocol error nor a size status: {e:?}"),
            };
            runner_idle(cluster, Duration::from_secs(3)).await?;
            Ok(kind.into())
        },
    )
    .await;
    m.case("runner: stream half-closed before the body's eof", async {
        let e = engage(
            cluster,
            vec![try_call(Some(call(12))), data("10", false)],
            false,
        )
        .await?;
        ensure!(e.committed(), "not committed: {e:?}");
        ensure!(
            e.messages
                .iter()
                .all(|m| !matches!(m, runner_msg::Body::ResultStart(_))),
            "{e:?}"
        );
        runner_idle(cluster, Duration::from_secs(3)).await?;
        Ok("call aborted".into())
    })
    .await;
    m.case("runner: 20 streams that never send TryCall", async {
        let tls = cluster.certs.client()?;
        let address = cluster.runners[0].address.clone();
        let mut held = Vec::new();
        for _ in 0..20 {
            let mut client = RunnerProtocolClient::new(channel(&tls, &address).await?);
            let (tx, rx) = mpsc::channel::<ClientMsg>(1);
            let stream = client.engage(requests(rx)).await?;
            held.push((tx, stream));
        }
        normal_call(cluster, 0).await?;
        Ok("others unaffected".into())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// gRPC to the npm

async fn advertise(cluster: &Cluster, advert: CapacitySnapshotList) -> Result<(), tonic::Status> {
    let tls = cluster
        .certs
        .client()
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let npm = cluster
        .npm
        .as_ref()
        .ok_or_else(|| tonic::Status::internal("no npm"))?;
    let channel = channel(&tls, &npm.address)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    NodePoolScalerClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .advertise_capacity(advert)
        .await
        .map(|_| ())
}

async fn get_group(cluster: &Cluster, id: String) -> Result<Vec<String>, tonic::Status> {
    let tls = cluster
        .certs
        .client()
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let npm = cluster
        .npm
        .as_ref()
        .ok_or_else(|| tonic::Status::internal("no npm"))?;
    let channel = channel(&tls, &npm.address)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = RunnerManagerClient::new(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .get_lb_group(LbGroupId { id })
        .await?;
    Ok(reply
        .into_inner()
        .runners
        .into_iter()
        .map(|r| r.address)
        .collect())
}

fn advert(lb: &str, groups: &[(&str, u64)]) -> CapacitySnapshotList {
    CapacitySnapshotList {
        ts_unix_ms: 0,
        lb_id: lb.into(),
        leaving: false,
        snapshots: groups
            .iter()
            .map(|(g, mb)| CapacitySnapshot {
                group_id: (*g).into(),
                mem_mb_total: *mb,
            })
            .collect(),
    }
}

fn expect_code(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    mentions: &str,
) -> anyhow::Result<String> {
    match result {
        Ok(v) => bail!("accepted: {v:?}"),
        Err(s) => {
            ensure!(
                s.code() == code,
                "expected {code:?}, got {:?}: {}",
                s.code(),
                s.message()
            );
            ensure!(
                s.message().contains(mentions),
                "message should mention {mentions:?}: {}",
                s.message()
            );
            Ok(format!("{code:?}"))
        }
    }
}

async fn npm_cases(m: &mut Matrix<'_>) {
    let cluster = m.cluster;
    m.case("npm: advert without an LB id", async {
        expect_code(
            advertise(cluster, advert("", &[("default", 1)])).await,
            tonic::Code::InvalidArgument,
            "lb_id",
        )
    })
    .await;
    m.case("npm: advert with a 300-character LB id", async {
        expect_code(
            advertise(cluster, advert(&"l".repeat(300), &[("default", 1)])).await,
            tonic::Code::InvalidArgument,
            "lb_id",
        )
    })
    .await;
    m.case(
        "npm: advert with a control character in a group id",
        async {
            expect_code(
                advertise(cluster, advert("lb-x", &[("de\nfault", 1)])).await,
                tonic::Code::InvalidArgument,
                "group_id",
            )
        },
    )
    .await;
    m.case("npm: advert with 2,000 groups", async {
        let names: Vec<String> = (0..2000).map(|i| format!("g{i}")).collect();
        let groups: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        expect_code(
            advertise(cluster, advert("lb-x", &groups)).await,
            tonic::Code::InvalidArgument,
            "groups",
        )
    })
    .await;
    m.case("npm: advert over the 4 MiB message limit", async {
        let result = advertise(cluster, advert(&"l".repeat(5 * 1024 * 1024), &[])).await;
        let status = result.err().context("a 5 MiB advert was accepted")?;
        ensure!(
            matches!(
                status.code(),
                tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            ),
            "{:?}: {}",
            status.code(),
            status.message()
        );
        Ok(format!("{:?}", status.code()))
    })
    .await;
    m.case(
        "npm: adverts whose totals overflow (u64::MAX from two LBs)",
        async {
            advertise(cluster, advert("lb-huge-1", &[("default", u64::MAX)])).await?;
            advertise(cluster, advert("lb-huge-2", &[("default", u64::MAX)])).await?;
            // Several control-loop ticks with that demand, then the demand is withdrawn.
            let npm = cluster.npm.as_ref().context("no npm")?;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                ensure!(
                    get_group(cluster, "default".into()).await?.len() == 1,
                    "the list changed"
                );
            }
            advertise(cluster, advert("lb-huge-1", &[("default", 0)])).await?;
            advertise(cluster, advert("lb-huge-2", &[("default", 0)])).await?;
            ensure!(
                !npm.daemon.log().contains("panicked"),
                "the npm panicked:\n{}",
                npm.daemon.log()
            );
            Ok("accepted, capped at FN_MAX_RUNNERS".into())
        },
    )
    .await;
    m.case("npm: GetLBGroup with an empty id", async {
        expect_code(
            get_group(cluster, String::new()).await,
            tonic::Code::InvalidArgument,
            "group id",
        )
    })
    .await;
    m.case("npm: GetLBGroup with a 10 KB id", async {
        expect_code(
            get_group(cluster, "g".repeat(10_000)).await,
            tonic::Code::InvalidArgument,
            "group id",
        )
    })
    .await;
    m.case("npm: GetLBGroup for a group never advertised", async {
        let list = get_group(cluster, "never-advertised".into()).await?;
        ensure!(list.is_empty(), "{list:?}");
        Ok("empty list".into())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// TLS

/// A `Status` RPC (runner) or `GetLBGroup` (npm) over a client TLS config; the error chain.
async fn rpc_with(
    address: &str,
    scheme: &str,
    tls: Option<ClientTlsConfig>,
    npm: bool,
) -> anyhow::Result<()> {
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await?;
    if npm {
        RunnerManagerClient::new(channel)
            .get_lb_group(LbGroupId {
                id: "default".into(),
            })
            .await?;
    } else {
        RunnerProtocolClient::new(channel).status(()).await?;
    }
    Ok(())
}

/// The RPC must fail, and its error chain must mention one of `mentions`.
fn expect_rejected(result: anyhow::Result<()>, mentions: &[&str]) -> anyhow::Result<String> {
    let err = match result {
        Ok(()) => bail!("the connection was accepted"),
        Err(e) => e,
    };
    let chain: Vec<String> = err.chain().map(|e| format!("{e:?}")).collect();
    let text = chain.join(" / ");
    ensure!(
        mentions
            .iter()
            .any(|m| text.to_lowercase().contains(&m.to_lowercase())),
        "error should mention one of {mentions:?}: {text}"
    );
    // The most precise reason the client got: the server's TLS alert when it arrived (the
    // server may close before the client reads it), else what the transport saw.
    let kind = if let Some(at) = text.find("fatal alert: ") {
        let alert: String = text[at + 13..]
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        format!("TLS alert {alert}")
    } else if text.contains("UnknownIssuer") {
        "server certificate: unknown issuer".to_owned()
    } else if text.contains("GoAway") {
        "h2 GOAWAY".to_owned()
    } else {
        "connection closed by the server".to_owned()
    };
    Ok(format!("rejected: {kind}"))
}

/// The daemon's log (runner 0 or the npm).
fn daemon_log(cluster: &Cluster, npm: bool) -> String {
    match (&cluster.npm, npm) {
        (Some(n), true) => n.daemon.log(),
        _ => cluster.runners.first().map(|r| r.log()).unwrap_or_default(),
    }
}

/// Runs `attempt`, then waits until the daemon has logged one more rejected handshake whose
/// reason contains `reason` (see [`TLS_LOG`]).
async fn rejected_and_logged(
    cluster: &Cluster,
    npm: bool,
    reason: &str,
    attempt: impl Future<Output = anyhow::Result<String>>,
) -> anyhow::Result<String> {
    let count = |log: &str| {
        log.lines()
            .filter(|l| l.contains("TLS handshake failed") && l.contains(reason))
            .count()
    };
    let before = count(&daemon_log(cluster, npm));
    let kind = attempt.await?;
    let start = Instant::now();
    while count(&daemon_log(cluster, npm)) <= before {
        ensure!(
            start.elapsed() < Duration::from_secs(6),
            "the server logged no rejected handshake mentioning {reason:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(format!("{kind}; server log: {reason}"))
}

async fn tls_cases(m: &mut Matrix<'_>) {
    let cluster = m.cluster;
    let ca_pem = match std::fs::read(cluster.certs.dir().join("ca.pem")) {
        Ok(pem) => pem,
        Err(e) => {
            m.failures.push(format!("reading the CA: {e}"));
            return;
        }
    };
    let own = |cert: &str, key: &str| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .identity(Identity::from_pem(cert, key))
            .domain_name("localhost")
    };
    let foreign = fn_tls::dev::DevCa::new("a foreign CA");
    let expired = cluster.certs.ca().and_then(|ca| Ok(ca.expired_node(&[])?));
    let (foreign, expired) = match (foreign, expired) {
        (Ok(f), Ok(e)) => (f, e),
        _ => {
            m.failures
                .push("generating test certificates failed".into());
            return;
        }
    };
    let foreign_node = match foreign.node(&[]) {
        Ok(n) => n,
        Err(e) => {
            m.failures.push(format!("foreign node certificate: {e}"));
            return;
        }
    };
    let npm_address = cluster
        .npm
        .as_ref()
        .map(|n| n.address.clone())
        .unwrap_or_default();
    let runner_address = cluster.runners[0].address.clone();
    let rejected = [
        "alert",
        "certificate",
        "handshake",
        "tls",
        "reset",
        "closed",
        "broken pipe",
        "eof",
        // TLS 1.3 rejects a client certificate after the client's handshake completed; when
        // the server's close wins the race with the client's first request, hyper reports
        // the connection as "not ready". The server's log (checked too) names the reason.
        "not ready",
    ];
    let plaintext = ["transport", "connection", "frame", "h2", "protocol"];
    // What the server logs for a plaintext client: bytes that are no TLS record.
    let not_tls = "InvalidContentType";

    for (daemon, address, npm) in [
        ("runner", runner_address.as_str(), false),
        ("npm", npm_address.as_str(), true),
    ] {
        m.case(&format!("tls: plaintext HTTP/2 to the {daemon}"), async {
            rejected_and_logged(cluster, npm, not_tls, async {
                expect_rejected(rpc_with(address, "http", None, npm).await, &plaintext)
            })
            .await
        })
        .await;
        m.case(
            &format!("tls: plaintext HTTP/1.1 bytes to the {daemon}"),
            async {
                rejected_and_logged(cluster, npm, not_tls, async {
                    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
                    let answer = raw(address, request, Duration::from_secs(5)).await?;
                    ensure!(answer.closed, "connection left open: {answer:?}");
                    ensure!(answer.status.is_none(), "answered plaintext: {answer:?}");
                    Ok("closed".into())
                })
                .await
            },
        )
        .await;
        m.case(
            &format!("tls: client certificate from another CA ({daemon})"),
            async {
                rejected_and_logged(cluster, npm, "UnknownIssuer", async {
                    let tls = own(&foreign_node.cert_pem, &foreign_node.key_pem);
                    expect_rejected(rpc_with(address, "https", Some(tls), npm).await, &rejected)
                })
                .await
            },
        )
        .await;
        m.case(&format!("tls: no client certificate ({daemon})"), async {
            rejected_and_logged(cluster, npm, "peer sent no certificates", async {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca_pem))
                    .domain_name("localhost");
                expect_rejected(rpc_with(address, "https", Some(tls), npm).await, &rejected)
            })
            .await
        })
        .await;
        m.case(
            &format!("tls: expired client certificate ({daemon})"),
            async {
                rejected_and_logged(cluster, npm, "certificate expired", async {
                    let tls = own(&expired.cert_pem, &expired.key_pem);
                    expect_rejected(rpc_with(address, "https", Some(tls), npm).await, &rejected)
                })
                .await
            },
        )
        .await;
    }
    m.case(
        "tls: a client that trusts another CA rejects the runner",
        async {
            rejected_and_logged(cluster, false, "UnknownCA", async {
                let ours = std::fs::read(cluster.certs.dir().join("node.pem"))?;
                let key = std::fs::read(cluster.certs.dir().join("node-key.pem"))?;
                let foreign_ca = foreign.cert_pem().as_bytes().to_vec();
                let mode = TlsMode::Mutual(NodeTls::from_pem(ours, key, foreign_ca)?);
                let result = async {
                    let channel = fn_tls::grpc_endpoint(&mode, &runner_address)?
                        .with(|e| {
                            e.connect_timeout(Duration::from_secs(3))
                                .timeout(Duration::from_secs(3))
                        })
                        .connect()
                        .await?;
                    RunnerProtocolClient::new(channel).status(()).await?;
                    Ok(())
                }
                .await;
                expect_rejected(result, &["certificate", "unknown issuer", "invalid peer"])
            })
            .await
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_boundary_answers_bad_input_clearly_and_keeps_serving() -> anyhow::Result<()> {
    let cluster = Cluster::start(Setup {
        runners: 1,
        runner_memory_mb: 1024,
        npm: true,
        catalog: CATALOG.into(),
        max_request_body: Some(MAX_BODY as u64),
        lb_env: env(&[("FN_PLACER_TIMEOUT", "2s")]),
        // Rejected TLS handshakes are reported with the reason, beyond one a second at debug
        // level.
        npm_env: merge(&[&env(&[
            ("FN_LB_PURGE_AFTER", "3s"),
            ("FN_LOG_LEVEL", TLS_LOG),
        ])]),
        runner_env: env(&[("FN_LOG_LEVEL", TLS_LOG)]),
        ..Setup::default()
    })
    .await?;
    normal_call(&cluster, 0).await.context("before any case")?;
    let mut m = Matrix {
        cluster: &cluster,
        report: Report::new("bad_input", "matrix"),
        failures: Vec::new(),
        cases: 0,
    };
    let started = Instant::now();
    http_cases(&mut m).await;
    runner_cases(&mut m).await;
    npm_cases(&mut m).await;
    tls_cases(&mut m).await;
    m.report
        .note(format!("{} cases in {:.1?}", m.cases, started.elapsed()));
    m.report.publish();
    ensure!(
        m.failures.is_empty(),
        "{} of {} cases failed:\n{}\n{}",
        m.failures.len(),
        m.cases,
        m.failures.join("\n"),
        m.cluster
            .logs()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panic"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(m.cases >= 30, "only {} cases", m.cases);
    Ok(())
}
