//! The FDK's `run` as a runner starts it: a function process (`fn-echo`) with the contract's
//! environment serves `POST /call` on its socket from one worker thread, and on SIGTERM takes
//! the socket away and exits 0.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use fn_system_tests::{Daemon, env};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::net::UnixStream;

const PATIENCE: Duration = Duration::from_secs(20);

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// Threads of process `pid` (its `/proc/PID/task` entries).
fn threads_of(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// One `POST /call` as the runner sends it; the status and body of the answer.
async fn call(socket: &Path, body: &'static str) -> anyhow::Result<(u16, Bytes)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::post("/call")
        .header(http::header::HOST, "fn")
        .header("Fn-Call-Id", "01FDKRUN")
        .header("Fn-Deadline", "2099-01-02T03:04:05Z")
        .header("Fn-Http-Method", "POST")
        .header("Fn-Http-Request-Url", "http://lb/r/app/echo")
        .header("Fn-Intent", "httprequest")
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// A `POST /call` of `body` sent over a connection of its own, returned once the function's
/// handler is reading the body: the request says `Expect: 100-continue`, the function
/// answers `100 Continue` when its handler first asks for the body, and only then does the
/// body go. The answer is left unread on the returned connection.
async fn call_in_flight(socket: &Path, body: &str) -> anyhow::Result<UnixStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = UnixStream::connect(socket).await?;
    let head = format!(
        "POST /call HTTP/1.1\r\nHost: fn\r\nFn-Call-Id: 01FDKRUN\r\n\
         Fn-Deadline: 2099-01-02T03:04:05Z\r\nFn-Http-Method: POST\r\n\
         Fn-Http-Request-Url: http://lb/r/app/echo\r\nFn-Intent: httprequest\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    let mut got = Vec::new();
    let read_continue = async {
        let mut buf = [0u8; 256];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "the function closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(PATIENCE, read_continue)
        .await
        .context("no 100 Continue: the handler never asked for the body")??;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 100 "),
        "not 100 Continue: {text}"
    );
    stream.write_all(body.as_bytes()).await?;
    Ok(stream)
}

/// The function `binary` started as a runner starts it, its socket `lsnr.sock` in the
/// returned directory, once the socket is there.
async fn function_started(binary: &str, name: &str) -> anyhow::Result<(tempfile::TempDir, Daemon)> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("lsnr.sock");
    let function = Daemon::spawn(
        binary,
        &env(&[
            ("FN_FORMAT", "http-stream"),
            ("FN_LISTENER", &format!("unix:{}", socket.display())),
            ("FN_APP_NAME", "app"),
            ("FN_FN_NAME", name),
            ("FN_MEMORY", "64"),
            ("FN_TYPE", "sync"),
        ]),
    )?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !is_socket(&socket) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear; log:\n{}",
            socket.display(),
            function.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((dir, function))
}

#[tokio::test]
async fn a_function_on_run_serves_from_one_worker_thread_and_leaves_on_sigterm()
-> anyhow::Result<()> {
    let (dir, mut function) = function_started("fn-echo", "echo").await?;
    let socket = dir.path().join("lsnr.sock");
    let pid = function.pid().context("fn-echo has a pid")?;

    for body in ["ping", "pong"] {
        let (status, answer) = call(&socket, body).await?;
        assert_eq!(status, 200, "log:\n{}", function.log());
        assert_eq!(answer, body.as_bytes());
    }
    // The thread that called `run` and one worker: an instance that takes one call at a time
    // has no use for a second worker, which every call would wake (with an instance per
    // concurrent call, that is a thread per call more to schedule).
    assert_eq!(
        threads_of(pid)?,
        2,
        "fn-echo's threads: the main thread and one runtime worker"
    );

    function.signal(Signal::SIGTERM)?;
    let status = function.wait_exit(PATIENCE).await?;
    assert_eq!(status.code(), Some(0), "log:\n{}", function.log());
    assert!(!socket.exists(), "the socket outlived the function");
    Ok(())
}

/// A second signal while a call is still running ends the function at once (the first waits
/// for the call; before, the second did nothing, and only SIGKILL stopped a hung handler).
#[tokio::test]
async fn a_second_signal_ends_a_function_whose_call_is_still_running() -> anyhow::Result<()> {
    let (dir, mut function) = function_started("fn-sleep", "sleep").await?;
    let socket = dir.path().join("lsnr.sock");
    // A call answered first: the function serves (its start on a busy machine is not left
    // to the pause below), so the long call is in flight when the first signal comes.
    let (status, _) = call(&socket, "0").await?;
    ensure!(status == 200, "the first call: {status}");
    // The long call's handler runs (it reads the body) when the first signal comes.
    let long = call_in_flight(&socket, "60000").await?;
    function.signal(Signal::SIGTERM)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        function
            .pid()
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()),
        "the first signal did not wait for the call"
    );
    function.signal(Signal::SIGINT)?;
    let status = function.wait_exit(Duration::from_secs(5)).await?;
    assert_eq!(status.code(), Some(130), "log:\n{}", function.log());
    drop(long);
    Ok(())
}
