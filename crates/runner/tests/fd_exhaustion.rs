//! The runner out of file descriptors when it connects to an instance: the call fails as the
//! runner's fault (`DriverError::Runner`, reported to the LB as an internal error), at once,
//! and the instance serves on, where it was blamed on the function and retired.
//!
//! A test binary of its own, with one test: it lowers the process's `RLIMIT_NOFILE` to the
//! descriptors in use, which would fail any other test running beside it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fn_runner::driver::process::{FunctionUser, ProcessDriver, ProcessDriverConfig};
use fn_runner::driver::{Driver, DriverError, FunctionRequest, Instance, InstanceSpec};
use futures::TryStreamExt;
use http::{HeaderMap, Method, StatusCode};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const START: Duration = Duration::from_secs(10);

fn spec() -> InstanceSpec {
    InstanceSpec {
        app: "demo".into(),
        function: "echo".into(),
        command: vec!["fn-echo".into()],
        image: None,
        memory_mb: 64,
        concurrency: 1,
        idle_timeout: Duration::from_secs(30),
        config: BTreeMap::new(),
    }
}

/// One call to `instance` with `data` as its body; the answer's status and body.
async fn call(
    instance: &dyn Instance,
    data: &'static [u8],
) -> Result<(StatusCode, Bytes), DriverError> {
    let request = FunctionRequest {
        call_id: "test-call".into(),
        method: Method::POST,
        request_url: "http://lb.test/r/demo/echo".into(),
        headers: HeaderMap::new(),
        deadline: SystemTime::now() + Duration::from_secs(30),
        deadline_at: std::time::Instant::now() + Duration::from_secs(30),
    };
    let body = Box::pin(futures::stream::iter([Ok(Bytes::from_static(data))]));
    let answer = instance.call(request, body).await?;
    let received = answer
        .body
        .try_fold(BytesMut::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await?;
    Ok((answer.status, received.freeze()))
}

/// The lowest descriptor number free now: the next one the kernel hands out. A soft
/// `RLIMIT_NOFILE` of it leaves no descriptor to open.
fn lowest_free_descriptor() -> u64 {
    use std::os::fd::AsRawFd;
    let probe = std::fs::File::open("/dev/null").expect("open /dev/null");
    u64::try_from(probe.as_raw_fd()).expect("a descriptor is not negative")
}

#[tokio::test(flavor = "current_thread")]
async fn a_connect_out_of_descriptors_is_the_runners_fault_and_keeps_the_instance() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| FunctionUser::lookup("nobody").expect("user nobody"));
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("sockets"))
            .with_function_user(user),
    )
    .expect("driver");
    // Started with descriptors to spare; no connection kept yet, so the call connects.
    let instance = driver.start(&spec(), "first", START).await.expect("start");
    let pid = instance.pid().expect("pid");

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, lowest_free_descriptor(), hard).expect("lower the limit");
    let refused = call(instance.as_ref(), b"refused").await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");

    match refused {
        Err(DriverError::Runner(why)) => {
            assert!(why.contains("Too many open files"), "{why}");
        }
        other => panic!("not the runner's fault: {other:?}"),
    }
    assert!(instance.is_alive(), "the instance was given up");

    // The same process serves the next call.
    let (status, received) = call(instance.as_ref(), b"served").await.expect("call");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(received, "served");
    assert_eq!(instance.pid(), Some(pid));
    instance.kill();
    instance.wait_gone().await;
}
