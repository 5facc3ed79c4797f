//! The FDK out of file descriptors with a connection waiting: each `accept` fails (one per
//! 50 ms pause), and the function's stderr gets the first failure and then at most one line
//! every 5 s with the count since, where it got every one, 20 lines a second.
//!
//! A test binary of its own: it lowers the process's `RLIMIT_NOFILE`, which would fail any
//! other test running beside it. The FDK prints on the process's stderr, which the test
//! harness captures out of reach, so the test runs itself again as a child process (with
//! `FN_FDK_TEST_CHILD` set) and reads the child's stderr.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fn_fdk::{Body, BoxError, Context, FnEnv, Response};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const TEST: &str = "accept_failures_are_printed_at_most_once_per_interval_with_a_count";
const CHILD: &str = "FN_FDK_TEST_CHILD";
const FAILED: &str = "fn-fdk: accepting a connection failed";

#[test]
fn accept_failures_are_printed_at_most_once_per_interval_with_a_count() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("the test runs as a child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the child failed:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(FAILED)).collect();
    // 12 s of failures, one per 50 ms: about 240. At 0, 5 and 10 s: three lines.
    assert!(
        (2..=4).contains(&lines.len()),
        "{} lines:\n{}",
        lines.len(),
        lines[..lines.len().min(5)].join("\n")
    );
    assert!(
        lines[0].contains("Too many open files") && !lines[0].contains("more failures"),
        "the first says the error alone: {}",
        lines[0]
    );
    assert!(
        lines[1].contains("more failures since the last line"),
        "the next says how many went unsaid: {}",
        lines[1]
    );
}

async fn echo(_: Context, body: Body) -> Result<Response, BoxError> {
    Ok(Response::new(body.bytes().await?))
}

/// The lowest descriptor number free now: the next one the kernel hands out. A soft
/// `RLIMIT_NOFILE` of it leaves no descriptor to open.
fn lowest_free_descriptor() -> u64 {
    use std::os::fd::AsRawFd;
    let probe = std::fs::File::open("/dev/null").expect("open /dev/null");
    u64::try_from(probe.as_raw_fd()).expect("a descriptor is not negative")
}

fn env_for(link: &Path) -> FnEnv {
    FnEnv::from_vars([
        ("FN_FORMAT", "http-stream".to_owned()),
        ("FN_LISTENER", format!("unix:{}", link.display())),
        ("FN_APP_NAME", "shop".to_owned()),
        ("FN_FN_NAME", "cart".to_owned()),
        ("FN_MEMORY", "128".to_owned()),
        ("FN_TYPE", "sync".to_owned()),
    ])
    .expect("valid environment")
}

/// Serves with a connection waiting and no descriptor to accept it for 12 s of paused
/// tokio time (the FDK's pauses and its report interval are tokio timers).
fn child() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let link = dir.path().join("lsnr.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(fn_fdk::serve_with(env_for(&link), echo, async {
            drop(stopped.await);
        }));
        while !link.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Queued in the listener's backlog before the server task runs again.
        let waiting = std::os::unix::net::UnixStream::connect(&link).expect("connect");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, lowest_free_descriptor(), hard).expect("setrlimit");
        tokio::time::sleep(Duration::from_secs(12)).await;
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit back");
        drop(waiting);
        stop.send(()).expect("server running");
        server.await.expect("server task").expect("clean shutdown");
    });
}
