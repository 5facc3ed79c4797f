//! The lb-agent with three real pure-runners on loopback over mutual TLS, driven over HTTP:
//! byte-exact echo up to 8 MiB; 50 concurrent calls; `ch` keeps a function on one runner while
//! it has room and spills to the next runner in the list when it is full; 404 / 413 / 502 /
//! 504; SIGHUP adds a function without failing a call in flight; SIGTERM keeps serving calls
//! for the drain delay while `/health` says 503; a flood of idle sockets past
//! `FN_MAX_CONNECTIONS` does not stop calls.

use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::http::{self, Reply};
use hyper::body::Frame;
use nix::sys::signal::Signal;

const ECHO: &str = r#"
[[functions]]
app = "demo"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 128
"#;

const SLEEP: &str = r#"
[[functions]]
app = "demo"
name = "sleep"
route = "/sleep"
command = ["fn-sleep"]
memory_mb = 128
timeout = "10s"
"#;

/// fn-sleep with a 1 s timeout, for 504.
const SLOW: &str = r#"
[[functions]]
app = "demo"
name = "slow"
route = "/slow"
command = ["fn-sleep"]
memory_mb = 64
timeout = "1s"
"#;

const CRASH: &str = r#"
[[functions]]
app = "demo"
name = "crash"
route = "/crash"
command = ["fn-crash"]
memory_mb = 64
"#;

const HELLO: &str = r#"
[[functions]]
app = "demo"
name = "hello"
route = "/hello"
command = ["fn-hello"]
memory_mb = 64
"#;

/// `count` echo calls at once, call `i` with a body of `len + i` bytes from seed `seed + i`:
/// each must answer 200 with its body back byte for byte. Their `Fn-Call-Id`s, in order.
async fn concurrent_echoes(
    cluster: &Cluster,
    count: u32,
    len: usize,
    seed: u32,
) -> anyhow::Result<Vec<Option<String>>> {
    let calls = (0..count).map(|i| {
        let body = pattern(len + i as usize, seed + i);
        let http = cluster.http.clone();
        tokio::spawn(async move {
            let reply = http::request(
                &http,
                Method::POST,
                "/r/demo/echo",
                &[],
                Bytes::from(body.clone()),
            )
            .await?;
            ensure!(
                reply.status == 200,
                "call {i}: status {} {}",
                reply.status,
                reply.text()
            );
            ensure!(reply.body[..] == body[..], "call {i}: echo differs");
            Ok::<_, anyhow::Error>(reply.header("fn-call-id"))
        })
    });
    let mut ids = Vec::new();
    for call in futures::future::join_all(calls).await {
        match call? {
            Ok(id) => ids.push(id),
            Err(e) => bail!("{e:#}\n{}", cluster.logs()),
        }
    }
    Ok(ids)
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_is_byte_exact_up_to_8_mib_and_50_concurrent_calls_succeed() -> anyhow::Result<()> {
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 2048,
        placer: "naive".into(),
        catalog: ECHO.into(),
        max_request_body: None,
        ..Setup::default()
    })
    .await?;
    for (i, len) in [0usize, 1024, 1024 * 1024, 8 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let body = pattern(len, i as u32);
        let reply = http::request(
            &cluster.http,
            Method::POST,
            "/r/demo/echo",
            &[("content-type", "application/octet-stream")],
            Bytes::from(body.clone()),
        )
        .await?;
        ensure!(
            reply.status == 200,
            "{len} B: status {} {}\n{}",
            reply.status,
            reply.text(),
            cluster.logs()
        );
        ensure!(
            reply.body.len() == len && reply.body[..] == body[..],
            "{len} B: echo differs (got {} B)",
            reply.body.len()
        );
        ensure!(reply.header("content-type").as_deref() == Some("application/octet-stream"));
        ensure!(reply.header("fn-call-id").is_some());
    }

    let mut ids = Vec::new();
    for id in concurrent_echoes(&cluster, 50, 10 * 1024, 1000).await? {
        ids.push(id.context("no Fn-Call-Id")?);
    }
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == 50, "call ids repeat");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ch_keeps_a_function_on_one_runner_while_it_has_room_then_spills_to_the_next()
-> anyhow::Result<()> {
    // 256 MB per runner, 128 MB per call: two calls fit on a runner at a time.
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 256,
        placer: "ch".into(),
        catalog: format!("{ECHO}{SLEEP}"),
        max_request_body: None,
        ..Setup::default()
    })
    .await?;

    // Sequential calls: one runner, one hot instance, the same pid every time.
    let mut pids = Vec::new();
    for i in 0..5 {
        let reply = cluster.call("/r/demo/echo", format!("seq {i}")).await?;
        ensure!(reply.status == 200, "{}\n{}", reply.text(), cluster.logs());
        pids.push(reply.fn_pid()?);
    }
    ensure!(
        pids.iter().all(|p| *p == pids[0]),
        "sequential calls moved between instances: {pids:?}"
    );
    let mut home = None;
    for _ in 0..3 {
        let reply = cluster.call("/r/demo/sleep", "0").await?;
        ensure!(reply.status == 200, "{}\n{}", reply.text(), cluster.logs());
        let runner = cluster.runner_of(reply.fn_pid()?)?;
        ensure!(
            home.is_none_or(|h| h == runner),
            "sequential sleep calls on runners {home:?} and {runner}"
        );
        home = Some(runner);
    }
    let home = home.context("no sleep call")?;

    // Four overlapping calls: the home runner takes two, the next runner in the list the rest.
    let calls = (0..4).map(|i| {
        let http = cluster.http.clone();
        tokio::spawn(async move {
            let reply = http::request(
                &http,
                Method::POST,
                "/r/demo/sleep",
                &[],
                Bytes::from("1500"),
            )
            .await?;
            ensure!(
                reply.status == 200 && reply.text() == "slept 1500ms",
                "call {i}: {} {}",
                reply.status,
                reply.text()
            );
            reply.fn_pid()
        })
    });
    let mut per_runner = [0usize; 3];
    let mut distinct = Vec::new();
    for call in futures::future::join_all(calls).await {
        let pid = call??;
        per_runner[cluster.runner_of(pid)?] += 1;
        distinct.push(pid);
    }
    distinct.sort_unstable();
    distinct.dedup();
    ensure!(
        distinct.len() == 4,
        "overlapping calls shared an instance: {distinct:?}"
    );
    let next = (home + 1) % 3;
    let mut expected = [0usize; 3];
    expected[home] = 2;
    expected[next] = 2;
    ensure!(
        per_runner == expected,
        "calls per runner {per_runner:?}, expected {expected:?} (home {home})\n{}",
        cluster.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_functions_404_large_bodies_413_crashes_502_and_timeouts_504() -> anyhow::Result<()>
{
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 512,
        placer: "ch".into(),
        catalog: format!("{ECHO}{SLOW}{CRASH}"),
        max_request_body: Some(1024),
        ..Setup::default()
    })
    .await?;
    let json_error = |reply: &Reply, status: u16| -> anyhow::Result<()> {
        ensure!(
            reply.status == status,
            "expected {status}, got {} {}",
            reply.status,
            reply.text()
        );
        ensure!(reply.header("content-type").as_deref() == Some("application/json"));
        ensure!(
            reply.text().starts_with("{\"error\":{\"message\":"),
            "{}",
            reply.text()
        );
        ensure!(reply.header("fn-call-id").is_some());
        Ok(())
    };

    json_error(&cluster.call("/r/demo/nope", "").await?, 404)?;
    json_error(&cluster.call("/invoke/demo/nope", "").await?, 404)?;
    json_error(&cluster.call("/r/other/echo", "").await?, 404)?;

    json_error(&cluster.call("/r/demo/echo", vec![b'a'; 1025]).await?, 413)?;
    let at_limit = cluster.call("/r/demo/echo", vec![b'a'; 1024]).await?;
    ensure!(at_limit.status == 200 && at_limit.body.len() == 1024);

    // A chunked body has no Content-Length; it is cut off once it grows past the limit. The
    // function reads its whole body before answering, so the LB can still answer 413.
    let status = chunked_post(&cluster.http, "/r/demo/slow", &[&[b'1'; 800], &[b'2'; 800]]).await?;
    ensure!(
        status == 413,
        "chunked over the limit: {status}\n{}",
        cluster.logs()
    );
    let status = chunked_post(&cluster.http, "/r/demo/slow", &[b"1", b"0"]).await?;
    ensure!(
        status == 200,
        "chunked within the limit: {status}\n{}",
        cluster.logs()
    );

    let crashed = cluster.call("/r/demo/crash", "x").await?;
    json_error(&crashed, 502)?;
    // The client learns what failed, not where: runner addresses are the operator's.
    let told = crashed.text();
    ensure!(
        !told.contains("127.0.0.1"),
        "the 502 names a runner: {told}"
    );

    let started = Instant::now();
    let timed_out = cluster.call("/r/demo/slow", "3000").await?;
    let took = started.elapsed();
    json_error(&timed_out, 504)?;
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2900),
        "504 after {took:?}, the timeout is 1s"
    );
    // The function answers normally within its timeout afterwards.
    let fine = cluster.call("/r/demo/slow", "10").await?;
    ensure!(
        fine.status == 200,
        "{} {}\n{}",
        fine.status,
        fine.text(),
        cluster.logs()
    );
    Ok(())
}

/// Sends a request with a chunked body over a raw connection; returns the response status.
async fn chunked_post(address: &str, path: &str, chunks: &[&[u8]]) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in chunks {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        // The LB may answer and close before reading everything; the status is what counts.
        if let Err(e) = stream.write_all(&request).await {
            eprintln!("writing the chunked request: {e}");
        }
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "connection closed before a status line");
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head).into_owned();
        let status = line
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        Ok::<_, anyhow::Error>(status)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_adds_a_function_without_failing_a_call_in_flight() -> anyhow::Result<()> {
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 512,
        placer: "ch".into(),
        catalog: format!("{SLEEP}{ECHO}"),
        max_request_body: None,
        metrics: true,
        ..Setup::default()
    })
    .await?;
    // SIGHUP at once after /health says 200: the handler must already be installed (SIGHUP's
    // default action terminates the process).
    cluster.lb.signal(Signal::SIGHUP)?;
    ensure!(
        cluster.call("/r/demo/hello", "").await?.status == 404,
        "{}",
        cluster.logs()
    );

    // A call that stays in flight until this test ends its request body: an event, not a
    // race against the reload's duration.
    let (body_tx, mut body_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let frames = futures::stream::poll_fn(move |cx| {
        body_rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))))
    });
    let stream = tokio::net::TcpStream::connect(&cluster.http).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let held = ::http::Request::post("/r/demo/echo")
        .header("host", cluster.http.as_str())
        .body(http_body_util::StreamBody::new(frames))?;
    let held = tokio::spawn(async move {
        let response = sender.send_request(held).await?;
        let status = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    });
    body_tx.send(Bytes::from_static(b"held ")).await?;
    // Wait until the call is running on a runner.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.in_flight().await?.iter().sum::<u64>() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the held call never started\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    std::fs::write(&cluster.catalog, format!("{SLEEP}{ECHO}{HELLO}"))?;
    cluster.lb.signal(Signal::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let hello = loop {
        let reply = cluster.call("/r/demo/hello", "reload").await?;
        if reply.status == 200 {
            break reply;
        }
        ensure!(
            reply.status == 404 && Instant::now() < deadline,
            "hello: {} {}\n{}",
            reply.status,
            reply.text(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ensure!(hello.text() == "Hello, reload!\n", "{}", hello.text());
    ensure!(
        !held.is_finished(),
        "the held call cannot end before its body does"
    );

    // Only now does the call in flight since before the reload end.
    body_tx.send(Bytes::from_static(b"open")).await?;
    drop(body_tx);
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), held).await???;
    ensure!(
        status == 200 && body.as_ref() == b"held open",
        "call in flight: {status} {body:?}\n{}",
        cluster.logs()
    );

    // A bad catalog is rejected and the current one stays.
    std::fs::write(&cluster.catalog, "[[functions]]\napp = 1\n")?;
    cluster.lb.signal(Signal::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.lb.log().contains("catalog reload rejected") {
        ensure!(
            Instant::now() < deadline,
            "no rejection logged\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(cluster.call("/r/demo/hello", "").await?.status == 200);
    ensure!(cluster.call("/r/demo/sleep", "1").await?.status == 200);
    // Counted, for what sends the SIGHUP to see.
    let text = fn_system_tests::metrics::scrape(&cluster.lb_metrics.clone().context("LB metrics")?)
        .await?;
    let rejected = fn_system_tests::metrics::sum(&text, "fn_lb_catalog_reload_rejections_total");
    ensure!(rejected == 1.0, "{rejected} rejections counted:\n{text}");
    Ok(())
}

/// A rolling restart: on SIGTERM the LB answers `/health` with 503 for `FN_DRAIN_DELAY`
/// while it still takes new connections and calls, so that an upstream balancer can notice
/// before anything is refused; then it stops accepting and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_keeps_serving_calls_for_the_drain_delay_while_health_says_503()
-> anyhow::Result<()> {
    let delay = Duration::from_secs(4);
    let mut cluster = Cluster::start(Setup {
        runners: 1,
        catalog: ECHO.into(),
        lb_env: vec![
            ("FN_DRAIN_DELAY".into(), "4s".into()),
            ("FN_SHUTDOWN_TIMEOUT".into(), "10s".into()),
        ],
        ..Setup::default()
    })
    .await?;
    let warm = cluster.call("/r/demo/echo", "warm").await?;
    ensure!(warm.status == 200, "warm-up: {warm:?}");

    let signalled = Instant::now();
    cluster.lb.signal(Signal::SIGTERM)?;
    loop {
        let health = http::get(&cluster.http, "/health").await?;
        if health.status == 503 {
            break;
        }
        ensure!(
            signalled.elapsed() < Duration::from_secs(2),
            "/health still {} after SIGTERM; log:\n{}",
            health.status,
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every call is on a new connection, as from a balancer that has not noticed yet. None
    // starts in the second half of the delay: a call and a health check on a loaded machine
    // must end before it does.
    let mut during = 0;
    while signalled.elapsed() < delay / 2 {
        let body = format!("during the drain delay, call {during}");
        let reply = cluster.call("/r/demo/echo", body.clone()).await?;
        ensure!(
            reply.status == 200 && reply.text() == body,
            "call {during}, {:?} after SIGTERM: {reply:?}; log:\n{}",
            signalled.elapsed(),
            cluster.logs()
        );
        let health = http::get(&cluster.http, "/health").await?;
        ensure!(health.status == 503, "/health during the delay: {health:?}");
        during += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several, not a rate: each is a new connection and a health check on a loaded machine.
    ensure!(during >= 3, "only {during} calls during the delay");

    let status = cluster.lb.wait_exit(Duration::from_secs(15)).await?;
    ensure!(
        status.code() == Some(0),
        "exit {status}; log:\n{}",
        cluster.logs()
    );
    ensure!(
        signalled.elapsed() >= delay,
        "exited {:?} after SIGTERM, before the drain delay",
        signalled.elapsed()
    );
    ensure!(
        tokio::net::TcpStream::connect(&cluster.http).await.is_err(),
        "the listener is closed after the drain"
    );
    Ok(())
}

/// 5,000 idle sockets against an LB capped at 1,000 connections: the oldest idle ones are
/// closed to make room, the LB's descriptors stay bounded, and a normal call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_idle_sockets_do_not_stop_a_call() -> anyhow::Result<()> {
    let cap = 1000;
    let cluster = Cluster::start(Setup {
        runners: 1,
        catalog: ECHO.into(),
        lb_env: vec![("FN_MAX_CONNECTIONS".into(), cap.to_string())],
        ..Setup::default()
    })
    .await?;
    raise_own_open_file_limit(6000)?;
    let mut idle = Vec::with_capacity(5000);
    for i in 0..5000 {
        let stream = tokio::net::TcpStream::connect(&cluster.http)
            .await
            .with_context(|| format!("idle socket {i}"))?;
        idle.push(stream);
    }
    let pid = cluster.lb.pid().context("lb-agent pid")?;
    // Connections the kernel has queued are accepted and shed a moment later (on a busy
    // machine, some time later): the count must come down to the cap, not stay above it.
    let start = std::time::Instant::now();
    loop {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        if fds <= cap + 100 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "lb-agent holds {fds} descriptors with a cap of {cap} connections"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = cluster.call("/r/demo/echo", "past the idle flood").await?;
    ensure!(
        reply.status == 200 && reply.text() == "past the idle flood",
        "{reply:?}; log:\n{}",
        cluster.logs()
    );
    // The youngest idle sockets are still open: the oldest were the ones closed.
    let mut newest = idle.pop().context("sockets")?;
    let read = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::io::AsyncReadExt::read(&mut newest, &mut [0u8; 1]),
    )
    .await;
    ensure!(read.is_err(), "the newest idle socket was closed: {read:?}");
    let mut oldest = idle.swap_remove(0);
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut oldest, &mut [0u8; 1]),
    )
    .await;
    ensure!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the oldest idle socket is closed: {read:?}"
    );
    Ok(())
}

/// Raises this test process's soft open-file limit to at least `wanted` (within the hard
/// limit), for tests that hold thousands of sockets.
fn raise_own_open_file_limit(wanted: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= wanted {
        return Ok(());
    }
    ensure!(
        hard >= wanted,
        "this test needs {wanted} open files; the hard limit is {hard}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)?;
    Ok(())
}

/// `FN_PLACER=warm` on real runners: a function's calls go to its warm instance, a runner
/// that its reports show full is skipped without being asked (no refusal in the LB's
/// counters), and a call after the busy ones ends runs warm again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_placer_uses_the_runners_reports_and_never_asks_a_full_runner() -> anyhow::Result<()> {
    // 256 MB per runner, 128 MB per call: two instances fit on a runner.
    let cluster = Cluster::start(Setup {
        runner_memory_mb: 256,
        placer: "warm".into(),
        catalog: format!("{ECHO}{SLEEP}"),
        metrics: true,
        ..Setup::default()
    })
    .await?;
    let lb_metrics = cluster.lb_metrics.clone().context("LB metrics")?;
    let call = |body: &'static str| {
        let http = cluster.http.clone();
        async move {
            let reply =
                http::request(&http, Method::POST, "/r/demo/sleep", &[], Bytes::from(body)).await?;
            ensure!(reply.status == 200, "{} {}", reply.status, reply.text());
            anyhow::Ok(reply)
        }
    };
    let cold = |reply: &Reply| {
        reply
            .header("server-timing")
            .is_some_and(|t| t.contains("start;"))
    };

    let first = call("0").await?;
    ensure!(cold(&first), "the first call starts an instance");
    let home = cluster.runner_of(first.fn_pid()?)?;
    let second = call("0").await?;
    ensure!(!cold(&second), "the second runs warm");
    ensure!(second.fn_pid()? == first.fn_pid()?);

    // Two long calls fill the home runner; once its report says so, a third long call goes
    // elsewhere without asking it. The second starts once the first is under way: an offer
    // not yet acknowledged is counted on top of any report (which may already show it), so
    // a call placed in the instant between such a report and the acknowledgement may see
    // the home full and start elsewhere.
    // Long: the third must be placed while the first two still run, seconds away on a
    // loaded machine (the function's timeout is 10 s).
    let mut long = vec![tokio::spawn(call("5000"))];
    in_flight_at(&cluster, home, 1).await?;
    // And the LB has its acknowledgement (the runner counts the call a moment before): the
    // third placed call.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fn_system_tests::metrics::scrape(&lb_metrics).await?;
        let placed = fn_system_tests::metrics::sum(&text, "fn_lb_placement_seconds_count");
        if placed >= 3.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{placed} calls placed, not 3, after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    long.push(tokio::spawn(call("5000")));
    in_flight_at(&cluster, home, 2).await?;
    // Time for the report that shows it full to reach the LB.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let third = tokio::spawn(call("5000"));
    let mut runners = Vec::new();
    for task in long.into_iter().chain([third]) {
        runners.push(cluster.runner_of(task.await??.fn_pid()?)?);
    }
    ensure!(
        runners[..2] == [home, home] && runners[2] != home,
        "long calls on runners {runners:?}, home {home}"
    );
    let after = call("0").await?;
    ensure!(!cold(&after), "a call after the busy ones ends runs warm");

    let text = fn_system_tests::metrics::scrape(&lb_metrics).await?;
    let attempts = fn_system_tests::metrics::sum(&text, "fn_lb_placement_attempts_total");
    let placed = fn_system_tests::metrics::sum(&text, "fn_lb_placement_seconds_count");
    ensure!(
        attempts == placed && placed == 6.0,
        "{attempts} offers for {placed} placed calls: a runner was asked in vain\n{}",
        cluster.logs()
    );
    Ok(())
}

/// The voluntary context switches of `pid`'s thread named `name`, if it has one: each is
/// the thread going to sleep for work, so a thread that served calls has many.
fn thread_switches(pid: u32, name: &str) -> anyhow::Result<Option<u64>> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        if std::fs::read_to_string(dir.join("comm"))?.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status"))?;
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .context("no voluntary_ctxt_switches")?
            .trim()
            .parse()?;
        return Ok(Some(switches));
    }
    Ok(None)
}

/// `FN_SHARDS=2` on the lb-agent and the runner: each has a second shard thread, calls on
/// many client connections all succeed byte for byte with both shards of both daemons
/// serving some of them, and SIGTERM still drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_shards_in_each_daemon_serve_calls_on_both() -> anyhow::Result<()> {
    let sharded = vec![
        ("FN_SHARDS".to_owned(), "2".to_owned()),
        ("FN_WORKER_THREADS".to_owned(), "1".to_owned()),
    ];
    let mut cluster = Cluster::start(Setup {
        runners: 1,
        runner_memory_mb: 4096,
        placer: "naive".into(),
        catalog: ECHO.into(),
        lb_env: sharded.clone(),
        runner_env: sharded,
        ..Setup::default()
    })
    .await?;
    let lb_pid = cluster.lb.pid().context("lb-agent pid")?;
    let runner_pid = cluster.runners[0].pid().context("runner pid")?;
    let before = (
        thread_switches(lb_pid, "fn-shard-1")?.context("no fn-shard-1 thread in the lb-agent")?,
        thread_switches(runner_pid, "fn-shard-1")?.context("no fn-shard-1 thread in the runner")?,
    );
    ensure!(
        thread_switches(lb_pid, "fn-shard-2")?.is_none(),
        "a third shard"
    );

    // Rounds of concurrent calls: the client opens several connections, which the lb-agent
    // hands to its shards in turn; each lb shard dials the runner, whose shards take them
    // in turn.
    for round in 0..4u32 {
        concurrent_echoes(&cluster, 32, 4096, round * 100).await?;
    }
    let after = (
        thread_switches(lb_pid, "fn-shard-1")?.context("lb-agent's fn-shard-1 gone")?,
        thread_switches(runner_pid, "fn-shard-1")?.context("runner's fn-shard-1 gone")?,
    );
    // An idle shard sleeps once; one that served calls sleeps at least once per call it
    // saw arrive.
    ensure!(
        after.0 >= before.0 + 10 && after.1 >= before.1 + 10,
        "a second shard did not serve calls: lb-agent {before:?} -> {after:?} (lb, runner)"
    );

    cluster.lb.signal(Signal::SIGTERM)?;
    let status = cluster.lb.wait_exit(Duration::from_secs(20)).await?;
    ensure!(
        status.success(),
        "lb-agent exited with {status}\n{}",
        cluster.logs()
    );
    let status = cluster.stop_runner(0, Duration::from_secs(20)).await?;
    ensure!(
        status.success(),
        "runner exited with {status}\n{}",
        cluster.logs()
    );
    Ok(())
}

/// Waits (at most 10 s) until runner `i` has `n` calls in flight.
async fn in_flight_at(cluster: &Cluster, i: usize, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = cluster.status(i).await?.calls_in_flight;
        if now == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "runner {i} has {now} calls in flight, not {n}, after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
