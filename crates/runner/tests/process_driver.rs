//! Service tests of the `process` driver against the real example functions (`fn-echo`,
//! `fn-hello`, `fn-sleep`, `fn-crash`, built by `cargo build --workspace --bins`).
//!
//! As root, functions run as `nobody`, so the test directories are made traversable for it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use fn_runner::driver::process::{
    FunctionUser, FunctionUsers, Isolation, MemoryLimitMode, MemoryLimits, ProcessDriver,
    ProcessDriverConfig, UidRange,
};
use fn_runner::driver::{
    BodyStream, Driver, DriverError, FunctionRequest, FunctionResponse, Instance, InstanceSpec,
};
use futures::TryStreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

const START: Duration = Duration::from_secs(10);

struct Fixture {
    driver: ProcessDriver,
    sockets: PathBuf,
    user: Option<FunctionUser>,
    _tmp: tempfile::TempDir,
}

fn function_user() -> Option<FunctionUser> {
    nix::unistd::geteuid()
        .is_root()
        .then(|| FunctionUser::lookup("nobody").expect("user nobody"))
}

/// A temporary directory the function user can traverse.
fn tempdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tmp
}

fn fixture_with(functions_dir: &Path, memory_limits: MemoryLimits) -> Fixture {
    let tmp = tempdir();
    let sockets = tmp.path().join("sockets");
    let user = function_user();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(functions_dir, &sockets)
            .with_function_user(user)
            .with_memory_limits(memory_limits),
    )
    .expect("driver");
    Fixture {
        driver,
        sockets,
        user,
        _tmp: tmp,
    }
}

fn fixture() -> Fixture {
    // Every example function must be there, or the tests would fail confusingly later.
    fixture_with(&fn_test_support::functions_dir(), MemoryLimits::Off)
}

fn spec(program: &str) -> InstanceSpec {
    InstanceSpec {
        app: "demo".into(),
        function: program.trim_start_matches("fn-").into(),
        command: vec![program.into()],
        image: None,
        memory_mb: 64,
        concurrency: 1,
        idle_timeout: Duration::from_secs(30),
        config: BTreeMap::new(),
    }
}

fn request(headers: HeaderMap) -> FunctionRequest {
    FunctionRequest {
        call_id: "test-call".into(),
        method: Method::POST,
        request_url: "http://lb.test/r/demo/fn".into(),
        headers,
        deadline: SystemTime::now() + Duration::from_secs(30),
        deadline_at: std::time::Instant::now() + Duration::from_secs(30),
    }
}

/// `data` as a request body in chunks of at most 64 KiB.
fn body(data: Bytes) -> BodyStream<std::io::Error> {
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..data.len())
        .step_by(64 * 1024)
        .map(|at| Ok(data.slice(at..data.len().min(at + 64 * 1024))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// One call; the response body read to its end.
async fn call(
    instance: &dyn Instance,
    headers: HeaderMap,
    data: impl Into<Bytes>,
) -> Result<(StatusCode, HeaderMap, Bytes), DriverError> {
    let FunctionResponse {
        status,
        headers,
        body,
    } = instance.call(request(headers), body(data.into())).await?;
    let data = body
        .try_fold(BytesMut::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await?;
    Ok((status, headers, data.freeze()))
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn header(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

/// Nothing in `dir`, a socket root, but the runner's lock on it.
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .all(|entry| entry.file_name() == ".runner.lock")
}

#[tokio::test]
async fn echo_is_byte_exact_and_reuses_one_process() {
    let fx = fixture();
    let instance = fx
        .driver
        .start(&spec("fn-echo"), "first-call", START)
        .await
        .expect("start");
    let pid = instance.pid().expect("pid");
    for size in [0, 1, 64 * 1024, 8 * 1024 * 1024] {
        let sent = pattern(size);
        let (status, headers, received) = call(instance.as_ref(), HeaderMap::new(), sent.clone())
            .await
            .unwrap_or_else(|e| panic!("{size} B: {e}"));
        assert_eq!(status, StatusCode::OK, "{size} B");
        assert_eq!(received.len(), sent.len(), "{size} B");
        assert!(received == sent, "{size} B: body differs");
        assert_eq!(header(&headers, "x-fn-pid"), [pid.to_string()], "{size} B");
    }
    assert_eq!(instance.pid(), Some(pid));
    assert!(instance.is_alive());
}

/// A function is the OOM killer's pick before the runner it shares a memory cgroup with:
/// the wrapper raises the instance's `oom_score_adj` to the most (1000) before the program
/// runs, where it had the runner's.
#[tokio::test]
async fn a_function_is_the_oom_killers_pick_before_the_runner() {
    let fx = fixture();
    let instance = fx
        .driver
        .start(&spec("fn-echo"), "c", START)
        .await
        .expect("start");
    let pid = instance.pid().expect("pid");
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("read");
    assert_eq!(adj.trim(), "1000", "the instance's oom_score_adj");
    let own = std::fs::read_to_string("/proc/self/oom_score_adj").expect("read");
    assert_ne!(own.trim(), "1000", "the test's own was raised");
    instance.kill();
}

#[tokio::test]
async fn headers_translate_both_ways() {
    let fx = fixture();
    let instance = fx
        .driver
        .start(&spec("fn-echo"), "c", START)
        .await
        .expect("start");
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-test"),
    );
    headers.append("x-echo-multi", HeaderValue::from_static("one"));
    headers.append("x-echo-multi", HeaderValue::from_static("two"));
    headers.insert("x-not-echoed", HeaderValue::from_static("nope"));
    let (status, headers, received) = call(instance.as_ref(), headers, "hi").await.expect("call");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(received, "hi");
    assert_eq!(header(&headers, "content-type"), ["application/x-test"]);
    // One line reaches the function (FDKs keep one line of a name), its values joined.
    assert_eq!(header(&headers, "x-echo-multi"), ["one, two"]);
    assert!(!headers.contains_key("x-not-echoed"));
    for name in headers.keys() {
        let name = name.as_str();
        assert!(!name.starts_with("fn-"), "contract header leaked: {name}");
        assert!(
            !["content-length", "transfer-encoding", "connection"].contains(&name),
            "framing header leaked: {name}"
        );
    }
}

/// The variable `name` of process `pid`'s environment.
fn environ_var(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let prefix = format!("{name}=");
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// A function's config `PATH` replaces the default one (as under the docker driver, where
/// config replaces the image's), and so do its `FN_APP_ID` and `FN_FN_ID` (else the app's
/// name and `app/name`), while the contract's variables are the runner's whatever the config
/// says.
#[tokio::test]
async fn a_config_path_and_ids_replace_the_defaults_and_the_contract_is_the_runners() {
    let fx = fixture();
    let mut hello = spec("fn-hello");
    hello
        .config
        .insert("PATH".into(), "/opt/fn-test/bin:/usr/bin:/bin".into());
    hello.config.insert("FN_LISTENER".into(), "tcp:evil".into());
    // Fn's ids: an Fn deployment's own, from config, else the names.
    hello.config.insert("FN_APP_ID".into(), "01HAPPID".into());
    let plain = spec("fn-hello");
    let with_path = fx
        .driver
        .start_process(&hello, "p", START)
        .await
        .expect("start");
    let without = fx
        .driver
        .start_process(&plain, "q", START)
        .await
        .expect("start");
    for instance in [&with_path, &without] {
        let (status, _, body) = call(instance, HeaderMap::new(), "Ann").await.expect("call");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"Hello, Ann!\n"[..]));
    }
    let pid = |i: &dyn Instance| i.pid().expect("pid");
    assert_eq!(
        environ_var(pid(&with_path), "PATH").as_deref(),
        Some("/opt/fn-test/bin:/usr/bin:/bin")
    );
    assert_eq!(
        environ_var(pid(&without), "PATH").as_deref(),
        Some("/usr/local/bin:/usr/bin:/bin")
    );
    let listener = environ_var(pid(&with_path), "FN_LISTENER").expect("FN_LISTENER");
    assert!(listener.starts_with("unix:"), "{listener}");
    let ids = |i: &dyn Instance| {
        (
            environ_var(pid(i), "FN_APP_ID").expect("FN_APP_ID"),
            environ_var(pid(i), "FN_FN_ID").expect("FN_FN_ID"),
        )
    };
    let app = &plain.app;
    let named = format!("{app}/{}", plain.function);
    assert_eq!(ids(&with_path), ("01HAPPID".to_owned(), named.clone()));
    assert_eq!(ids(&without), (app.clone(), named));
}

#[tokio::test]
async fn config_status_and_user_reach_the_function() {
    let fx = fixture();
    let mut hello = spec("fn-hello");
    hello.config.insert("GREETING".into(), "Howdy".into());
    let instance = fx
        .driver
        .start_process(&hello, "c", START)
        .await
        .expect("start");
    let (status, _, received) = call(&instance, HeaderMap::new(), "Ann")
        .await
        .expect("call");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(received, "Howdy, Ann!\n");

    // The instance directory is private to the function (and the runner).
    let meta = std::fs::metadata(instance.dir()).expect("instance dir");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let status = std::fs::read_to_string(format!("/proc/{}/status", instance.pid().expect("pid")))
        .expect("proc status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line")
        .to_owned();
    match fx.user {
        Some(user) => {
            assert_eq!(meta.uid(), user.uid);
            assert!(
                uid_line
                    .split_whitespace()
                    .skip(1)
                    .all(|uid| uid == user.uid.to_string()),
                "{uid_line}"
            );
        }
        None => println!("not root: functions run as the test's own user ({uid_line})"),
    }

    // A function status other than 200 comes from Fn-Http-Status.
    let sleeper = fx
        .driver
        .start(&spec("fn-sleep"), "c", START)
        .await
        .expect("start");
    let (status, _, _) = call(sleeper.as_ref(), HeaderMap::new(), "not a number")
        .await
        .expect("call");
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The soft "Max open files" of process `pid`.
fn open_file_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|soft| soft.parse().ok())
        .unwrap_or_else(|| panic!("no soft limit in {line:?}"))
}

#[tokio::test]
async fn functions_get_the_open_file_limit_they_are_given() {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    // Below the test's own, so that an instance showing it shows it was set.
    let given = soft.min(4096) - 1;
    let tmp = tempdir();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("sockets"))
            .with_function_user(function_user())
            .with_memory_limits(MemoryLimits::Off)
            .with_function_open_files(Some(given)),
    )
    .expect("driver");
    let limited = driver
        .start_process(&spec("fn-hello"), "c", START)
        .await
        .expect("start");
    let (status, _, _) = call(&limited, HeaderMap::new(), "Ann").await.expect("call");
    assert_eq!(status, StatusCode::OK, "the function runs under the limit");
    assert_eq!(open_file_limit(limited.pid().expect("pid")), given);

    // Without one, a function has the runner's.
    let fx = fixture();
    let inheriting = fx
        .driver
        .start_process(&spec("fn-hello"), "c", START)
        .await
        .expect("start");
    assert_eq!(open_file_limit(inheriting.pid().expect("pid")), soft);
}

#[tokio::test]
async fn kill_stops_the_instance_and_removes_its_directory() {
    let fx = fixture();
    let instance = fx
        .driver
        .start_process(&spec("fn-sleep"), "c", START)
        .await
        .expect("start");
    let pid = instance.pid().expect("pid");
    assert!(instance.is_alive());
    assert!(instance.socket_path().exists());

    // Kill while a call is in flight: the call fails at once instead of sleeping on.
    let started = Instant::now();
    let (outcome, ()) = tokio::join!(call(&instance, HeaderMap::new(), "30000"), async {
        instance.kill()
    });
    assert!(
        matches!(outcome, Err(DriverError::Crashed(_))),
        "{:?}",
        outcome.map(|(status, _, _)| status)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!instance.is_alive());
    assert!(!instance.dir().exists(), "socket directory removed by kill");
    instance.kill(); // idempotent

    instance.wait_gone().await;
    assert_eq!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None),
        Err(nix::errno::Errno::ESRCH),
        "process {pid} is gone"
    );
    assert!(is_empty_dir(&fx.sockets));
    assert!(matches!(
        call(&instance, HeaderMap::new(), "1").await,
        Err(DriverError::Crashed(_))
    ));
}

/// Records one field (`call_id`, or `message`: the line itself) of every event of target
/// `function`: a function's output.
struct FunctionOutput {
    field: &'static str,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for FunctionOutput {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Visit(&'static str, Option<String>);
        impl tracing::field::Visit for Visit {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == self.0 {
                    self.1 = Some(format!("{value:?}"));
                }
            }
        }
        if event.metadata().target() == "function" {
            let mut visit = Visit(self.field, None);
            event.record(&mut visit);
            self.seen
                .lock()
                .expect("lock")
                .push(visit.1.unwrap_or_default());
        }
    }
}

#[tokio::test]
async fn a_hot_instance_logs_its_output_under_the_call_it_is_taking() {
    use tracing_subscriber::layer::SubscriberExt;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(FunctionOutput {
        field: "call_id",
        seen: Arc::clone(&seen),
    });
    // The test's runtime has one thread: the instance's output task logs on it.
    let _guard = fn_test_support::logs::scoped_subscriber(subscriber);
    let fx = fixture();
    let instance = fx
        .driver
        .start_process(&spec("fn-crash"), "the-call-that-started-it", START)
        .await
        .expect("start");
    // fn-crash writes "crashing" to stderr when it takes a call.
    let _ = call(&instance, HeaderMap::new(), "boom").await;
    instance.wait_gone().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().expect("lock").is_empty() {
        assert!(Instant::now() < deadline, "no output logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*seen.lock().expect("lock"), ["test-call"]);
}

/// A tenant's `LD_PRELOAD` reaches its program, but not the wrapper shell that runs before
/// the instance is in its cgroups: the dynamic loader (which says so on stderr for a
/// library it cannot find) reads it once, for the program, not also for the shell.
#[tokio::test]
async fn a_tenants_loader_variables_reach_the_program_not_the_shell_before_the_gate() {
    use tracing_subscriber::layer::SubscriberExt;
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(FunctionOutput {
        field: "message",
        seen: Arc::clone(&lines),
    });
    // The test's runtime has one thread: the instance's output task logs on it.
    let _guard = fn_test_support::logs::scoped_subscriber(subscriber);
    let fx = fixture();
    let mut echo = spec("fn-echo");
    echo.config.insert(
        "LD_PRELOAD".into(),
        "/nonexistent/fn-test-preload.so".into(),
    );
    let instance = fx
        .driver
        .start_process(&echo, "c", START)
        .await
        .expect("start");
    let (status, _, body) = call(&instance, HeaderMap::new(), "hi")
        .await
        .expect("the program runs");
    assert_eq!((status, body.as_ref()), (StatusCode::OK, b"hi".as_slice()));
    let mentions = || {
        lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains("fn-test-preload.so"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while mentions() == 0 {
        assert!(
            Instant::now() < deadline,
            "the program never saw LD_PRELOAD"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        mentions(),
        1,
        "read for the program alone: {:?}",
        lines.lock().expect("lock")
    );
    instance.kill();
    instance.wait_gone().await;
}

#[tokio::test]
async fn a_crash_mid_call_is_reported_as_crashed() {
    let fx = fixture();
    let instance = fx
        .driver
        .start_process(&spec("fn-crash"), "c", START)
        .await
        .expect("start");
    match call(&instance, HeaderMap::new(), "boom").await {
        Err(DriverError::Crashed(message)) => {
            assert!(message.contains("exited with status 3"), "{message}")
        }
        other => panic!(
            "expected Crashed, got {:?}",
            other.map(|(status, _, _)| status)
        ),
    }
    assert!(!instance.is_alive());
    instance.wait_gone().await;
    assert!(
        is_empty_dir(&fx.sockets),
        "the reaper removed the instance directory"
    );
}

#[tokio::test]
async fn commands_are_confined_to_the_functions_dir() {
    let functions = script_dir("fn-ok", "#!/bin/sh\nsleep 30\n");
    let dir = functions.path();
    std::os::unix::fs::symlink("/bin/sh", dir.join("escape")).expect("symlink");
    std::fs::write(dir.join("data.txt"), "not a program").expect("write");
    let fx = fixture_with(dir, MemoryLimits::Off);
    let cases = [
        ("/bin/sh", "absolute"),
        ("../fn-ok", ".."),
        ("sub/../fn-ok", ".."),
        ("escape", "outside the functions directory"),
        ("fn-does-not-exist", "not found"),
        ("data.txt", "not executable"),
    ];
    for (program, why) in cases {
        let spec = spec(program);
        match fx.driver.check(&spec) {
            Err(DriverError::Invalid(message)) => assert!(message.contains(why), "{message}"),
            other => panic!("check {program:?}: expected Invalid, got {other:?}"),
        }
        match fx.driver.start(&spec, "c", START).await {
            Err(DriverError::Invalid(_)) => {}
            other => panic!("start {program:?}: expected Invalid, got {other:?}"),
        }
    }
    let mut empty = spec("fn-ok");
    empty.command.clear();
    assert!(matches!(
        fx.driver.check(&empty),
        Err(DriverError::Invalid(_))
    ));
    empty.image = Some("fnproject/hello".into());
    match fx.driver.check(&empty) {
        Err(DriverError::Invalid(message)) => assert!(
            message.contains("\"fnproject/hello\"") && message.contains("does not run images"),
            "{message}"
        ),
        other => panic!("image only: expected Invalid, got {other:?}"),
    }
    assert!(fx.driver.check(&spec("fn-ok")).is_ok());
    assert!(is_empty_dir(&fx.sockets), "nothing was started");
}

fn script_dir(name: &str, script: &str) -> tempfile::TempDir {
    let dir = tempdir();
    let path = dir.path().join(name);
    std::fs::write(&path, script).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[tokio::test]
async fn a_function_that_never_listens_fails_to_start_in_time() {
    let functions = script_dir("fn-mute", "#!/bin/sh\nsleep 30\n");
    let fx = fixture_with(functions.path(), MemoryLimits::Off);
    let started = Instant::now();
    let timeout = Duration::from_millis(500);
    match fx.driver.start(&spec("fn-mute"), "c", timeout).await {
        Err(DriverError::Start(message)) => {
            assert!(message.contains("did not open its listener"), "{message}")
        }
        other => panic!("expected Start, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(4),
        "{took:?}"
    );
    // Removed off the runtime, on a thread of its own, at once.
    let removing = Instant::now();
    while !is_empty_dir(&fx.sockets) {
        assert!(
            removing.elapsed() < Duration::from_secs(2),
            "the instance directory was not removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_function_that_exits_at_start_reports_its_status() {
    let functions = script_dir("fn-quit", "#!/bin/sh\necho bye >&2\nexit 7\n");
    let fx = fixture_with(functions.path(), MemoryLimits::Off);
    match fx.driver.start(&spec("fn-quit"), "c", START).await {
        Err(DriverError::Start(message)) => {
            assert!(message.contains("exited with status 7"), "{message}")
        }
        other => panic!("expected Start, got {other:?}"),
    }
}

#[tokio::test]
async fn memory_limit_in_the_real_cgroup() {
    let fx = fixture_with(&fn_test_support::functions_dir(), MemoryLimits::default());
    let limit_file = match fx.driver.memory_limit_mode() {
        MemoryLimitMode::V1 { .. } => "memory.limit_in_bytes",
        MemoryLimitMode::V2 { .. } => "memory.max",
        MemoryLimitMode::Unenforced { reason } => {
            fn_test_support::skip_or_fail(&format!(
                "memory limits cannot be enforced here: {reason}"
            ));
            return;
        }
    };
    println!("memory limits: {}", fx.driver.memory_limit_mode());
    let instance = fx
        .driver
        .start_process(&spec("fn-echo"), "c", START)
        .await
        .expect("start");
    let cgroups = instance.cgroup_dirs().to_vec();
    let cgroup = cgroups.first().expect("instance cgroup").clone();
    let limit = std::fs::read_to_string(cgroup.join(limit_file)).expect("read limit");
    assert_eq!(limit.trim(), (64u64 * 1024 * 1024).to_string());
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).expect("read procs");
    let pid = instance.pid().expect("pid").to_string();
    assert!(
        procs.lines().any(|p| p.trim() == pid),
        "{pid} not in {procs:?}"
    );
    let (_, _, echoed) = call(&instance, HeaderMap::new(), "in a cgroup")
        .await
        .expect("call");
    assert_eq!(echoed, "in a cgroup");

    instance.kill();
    instance.wait_gone().await;
    for cgroup in cgroups {
        assert!(
            !cgroup.exists(),
            "instance cgroup {} removed",
            cgroup.display()
        );
    }
}

/// A function killed at its memory limit says so, where "killed by signal 9" left the
/// operator to guess.
#[tokio::test]
async fn a_function_killed_at_its_memory_limit_is_said_to_be() {
    let fx = fixture_with(&fn_test_support::functions_dir(), MemoryLimits::default());
    if let MemoryLimitMode::Unenforced { reason } = fx.driver.memory_limit_mode() {
        fn_test_support::skip_or_fail(&format!("memory limits cannot be enforced here: {reason}"));
        return;
    }
    let instance = fx
        .driver
        .start_process(&spec("fn-hostile"), "c", START)
        .await
        .expect("start");
    // Four times its 64 MB.
    let err = call(&instance, HeaderMap::new(), "allocate_mb=256\n")
        .await
        .expect_err("killed");
    let message = err.to_string();
    assert!(
        message.contains("it used more than its memory limit (the kernel's OOM killer)"),
        "{message}"
    );
    instance.wait_gone().await;
}

/// Pids of live processes whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

#[tokio::test]
async fn a_fork_bomb_is_held_to_the_pids_limit_and_what_left_the_group_dies_with_it() {
    // Up to 200 processes that each leave the instance's process group (`setsid`), so only
    // the cgroup still knows them; a refused fork ends the subshell with an error.
    let functions = script_dir(
        "fn-forks",
        "#!/bin/sh\n\
         ( i=0; while [ $i -lt 200 ]; do setsid sleep 3617 & i=$((i+1)); done ) 2>/dev/null\n\
         [ $? -eq 0 ] && exit 8\n\
         exit 9\n",
    );
    let tmp = tempdir();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(functions.path(), tmp.path().join("sockets"))
            .with_function_user(function_user())
            .with_pids_limit(16),
    )
    .expect("driver");
    if let MemoryLimitMode::Unenforced { reason } = driver.pids_limit_mode() {
        fn_test_support::skip_or_fail(&format!("pids limits cannot be enforced here: {reason}"));
        return;
    }
    match driver
        .start(&spec("fn-forks"), "c", Duration::from_secs(20))
        .await
    {
        Err(DriverError::Start(message)) => assert!(
            message.contains("exited with status 9"),
            "every fork was allowed: {message}"
        ),
        other => panic!("expected Start, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_running(&["sleep", "3617"]);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes that left the process group outlived their instance: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_limit_is_enforced_in_the_real_cgroup() {
    // `tail` keeps the current line in memory, and /dev/zero has no newline: 300 MB cannot
    // fit in 64 MB, so the kernel kills `tail` and the script exits 9 before listening.
    let functions = script_dir(
        "fn-hog",
        "#!/bin/sh\nhead -c 300000000 /dev/zero | tail >/dev/null || exit 9\nsleep 30\n",
    );
    let fx = fixture_with(functions.path(), MemoryLimits::default());
    if let MemoryLimitMode::Unenforced { reason } = fx.driver.memory_limit_mode() {
        fn_test_support::skip_or_fail(&format!("memory limits cannot be enforced here: {reason}"));
        return;
    }
    match fx
        .driver
        .start(&spec("fn-hog"), "c", Duration::from_secs(20))
        .await
    {
        Err(DriverError::Start(message)) => {
            assert!(message.contains("exited with status 9"), "{message}")
        }
        other => panic!("expected Start, got {other:?}"),
    }
}

/// The runner half of [`instances_die_with_their_runner`], run in a copy of this test binary:
/// starts `fn-sleep`, prints its pid and aborts — a runner dying without running any
/// destructor, as under `SIGKILL`.
#[tokio::test]
#[ignore = "helper process of instances_die_with_their_runner"]
async fn helper_runner_that_dies() {
    let Some(sockets) = std::env::var_os("FN_TEST_HELPER_SOCKETS") else {
        return;
    };
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), sockets)
            .with_function_user(function_user())
            .with_memory_limits(MemoryLimits::Off),
    )
    .expect("driver");
    let instance = driver
        .start_process(&spec("fn-sleep"), "c", START)
        .await
        .expect("start");
    println!("pid={}", instance.pid().expect("pid"));
    std::process::abort();
}

fn is_running(pid: u32) -> bool {
    // Gone, or a zombie waiting for init to reap it: either way no longer running.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[test]
fn instances_die_with_their_runner() {
    fn_test_support::workspace_bin("fn-sleep");
    let tmp = tempdir();
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "helper_runner_that_dies",
            "--ignored",
            "--nocapture",
        ])
        .env("FN_TEST_HELPER_SOCKETS", tmp.path().join("s"))
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "the helper runner aborts: {stdout}"
    );
    let pid: u32 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("pid="))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no pid from the helper: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    // The orphan is not our child, so there is no exit to await: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(pid) {
        assert!(
            Instant::now() < deadline,
            "instance {pid} outlived its runner"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn setup_errors_name_what_is_wrong() {
    let missing = Path::new("/nonexistent/functions");
    let err = ProcessDriver::new(ProcessDriverConfig::new(missing, "/tmp/x"))
        .expect_err("missing functions dir");
    let message = err.to_string();
    assert!(message.contains("FN_FUNCTIONS_DIR"), "{message}");
    assert!(message.contains("/nonexistent/functions"), "{message}");

    let tmp = tempdir();
    let long = tmp.path().join("s".repeat(80));
    let err = ProcessDriver::new(
        ProcessDriverConfig::new(tmp.path(), long).with_memory_limits(MemoryLimits::Off),
    )
    .expect_err("socket root too long");
    assert!(err.to_string().contains("too long"), "{err}");

    let sockets = tmp.path().join("new/sockets");
    ProcessDriver::new(
        ProcessDriverConfig::new(tmp.path(), &sockets).with_memory_limits(MemoryLimits::Off),
    )
    .expect("driver");
    let mode = std::fs::metadata(&sockets)
        .expect("socket root")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o711);

    // Another user's directory, or a link: refused, saying why.
    if nix::unistd::geteuid().is_root() {
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let err = ProcessDriver::new(
            ProcessDriverConfig::new(tmp.path(), &theirs).with_memory_limits(MemoryLimits::Off),
        )
        .expect_err("another user's socket root");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&sockets, &link).expect("symlink");
    let err = ProcessDriver::new(
        ProcessDriverConfig::new(tmp.path(), &link).with_memory_limits(MemoryLimits::Off),
    )
    .expect_err("a link");
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

/// A table of function uids that others could write is refused at start (its writer could
/// give one tenant's uid to another), and so is a uid per function without a table.
#[test]
fn an_unsafe_or_missing_uid_table_is_refused_at_start() {
    let tmp = tempdir();
    let table = tmp.path().join("uids/function-uids");
    let config = |table: Option<&Path>| {
        let config =
            ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("s"))
                .with_function_users(FunctionUsers::PerFunction(UidRange {
                    first: 150_000,
                    last: 150_009,
                }))
                .with_memory_limits(MemoryLimits::Off);
        match table {
            Some(path) => config.with_uid_table(path),
            None => config,
        }
    };
    ProcessDriver::new(config(Some(&table))).expect("driver");
    std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let err = ProcessDriver::new(config(Some(&table))).expect_err("a 0666 table");
    let message = err.to_string();
    assert!(message.contains("FN_FUNCTION_UID_TABLE"), "{message}");
    assert!(message.contains("writable by other users"), "{message}");

    let err = ProcessDriver::new(config(None)).expect_err("no table");
    assert!(err.to_string().contains("FN_FUNCTION_UID_TABLE"), "{err}");
}

/// A first start that finds the host's uid table locked by a process that does not let go
/// (a stalled runner of the host) fails once the start timeout passes, naming the table,
/// and the runtime thread serves other tasks meanwhile: the lock is waited for on a
/// blocking thread.
#[test]
fn a_uid_table_held_locked_fails_the_start_in_time_and_blocks_no_runtime_thread() {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail("giving functions uids of their own needs root");
        return;
    }
    let tmp = tempdir();
    let table = tmp.path().join("uids/function-uids");
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("s"))
            .with_function_users(FunctionUsers::PerFunction(UidRange {
                first: 150_000,
                last: 150_009,
            }))
            .with_uid_table(&table)
            .with_memory_limits(MemoryLimits::Off),
    )
    .expect("driver");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(&table)
        .expect("table");
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .expect("lock");

    // On a runtime of one thread, in a thread of its own: a start that blocked the runtime
    // thread would stop the ticker, and the test would fail here rather than hang.
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let ticker = tokio::spawn({
                let ticks = Arc::clone(&ticks);
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            let started = Instant::now();
            let result = driver
                .start_process(&spec("fn-hello"), "a", Duration::from_millis(500))
                .await;
            ticker.abort();
            drop(done.send((
                result.map(|_| ()),
                started.elapsed(),
                ticks.load(std::sync::atomic::Ordering::Relaxed),
            )));
        });
    });
    let outcome = outcome.recv_timeout(Duration::from_secs(10));
    drop(held);
    let (result, took, ticks) = outcome.expect("the start ended within 10 s");
    let Err(DriverError::Start(said)) = result else {
        panic!("a start with the uid table locked: {result:?}");
    };
    assert!(
        said.contains("FN_FUNCTION_UID_TABLE") && said.contains("still locked"),
        "{said}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        ticks >= 5,
        "the runtime thread served other tasks {ticks} times"
    );
}

/// The real uid of process `pid`, from `/proc`.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    line.split_whitespace()
        .nth(1)
        .and_then(|uid| uid.parse().ok())
        .expect("a numeric uid")
}

/// With a uid range (the default on a root runner), each function runs as a uid of its own,
/// kept for every instance of it; its instance directory and private `TMPDIR` belong to that
/// uid alone; a function past the end of the range cannot start.
#[tokio::test]
async fn each_function_runs_as_a_uid_of_its_own_with_a_private_tmpdir() {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail("giving functions uids of their own needs root");
        return;
    }
    let tmp = tempdir();
    let range = UidRange {
        first: 150_000,
        last: 150_001,
    };
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("s"))
            .with_function_users(FunctionUsers::PerFunction(range))
            .with_uid_table(tmp.path().join("uids/function-uids"))
            .with_memory_limits(MemoryLimits::Off),
    )
    .expect("driver");
    let hello = spec("fn-hello");
    let other = InstanceSpec {
        function: "hello-again".into(),
        ..spec("fn-hello")
    };
    let first = driver
        .start_process(&hello, "a", START)
        .await
        .expect("start");
    let second = driver
        .start_process(&hello, "b", START)
        .await
        .expect("start");
    let stranger = driver
        .start_process(&other, "c", START)
        .await
        .expect("start");
    let uid = |i: &dyn Instance| uid_of(i.pid().expect("pid"));
    assert_eq!(uid(&first), uid(&second), "one function keeps its uid");
    assert_ne!(uid(&first), uid(&stranger), "two functions never share one");
    assert!(
        [uid(&first), uid(&stranger)]
            .iter()
            .all(|u| (range.first..=range.last).contains(u))
    );

    for instance in [&first, &stranger] {
        let owner = uid(instance);
        let tmpdir = instance.dir().join("tmp");
        for dir in [instance.dir(), tmpdir.as_path()] {
            let meta = std::fs::metadata(dir).expect("instance dir");
            assert_eq!(
                (meta.uid(), meta.gid()),
                (owner, owner),
                "{}",
                dir.display()
            );
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o700,
                "{}",
                dir.display()
            );
        }
        let environ = std::fs::read(format!("/proc/{}/environ", instance.pid().expect("pid")))
            .expect("environ");
        let expected = format!("TMPDIR={}", tmpdir.display());
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|var| var == expected.as_bytes()),
            "TMPDIR is the instance's own"
        );
    }
    let (status, _, body) = call(&first, HeaderMap::new(), "Ann").await.expect("call");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"Hello, Ann!\n"[..]));

    let third = InstanceSpec {
        function: "one-too-many".into(),
        ..spec("fn-hello")
    };
    let err = driver
        .start_process(&third, "d", START)
        .await
        .expect_err("the range is used up");
    assert!(err.to_string().contains("FN_FUNCTION_UIDS"), "{err}");
    for instance in [first, second, stranger] {
        instance.kill();
        instance.wait_gone().await;
    }
}

/// What an earlier run left in its socket root (killed with SIGKILL: instance directories
/// and ones set aside for removal) is removed when a runner takes the root again; anything
/// else there stays, and a root another live runner holds is not swept.
#[tokio::test]
async fn a_runner_sweeps_what_an_earlier_run_left_in_its_socket_root() {
    let tmp = tempdir();
    let sockets = tmp.path().join("sockets");
    std::fs::create_dir(&sockets).expect("mkdir");
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let left = [
        sockets.join("deadbeef-1"),
        sockets.join("deadbeef-2.removing"),
    ];
    for dir in &left {
        std::fs::create_dir_all(dir.join("tmp")).expect("mkdir");
        std::fs::write(dir.join("tmp/x"), "data").expect("write");
    }
    std::fs::create_dir(sockets.join("not-ours")).expect("mkdir");
    let driver = |root: &Path| {
        ProcessDriver::new(
            ProcessDriverConfig::new(fn_test_support::functions_dir(), root)
                .with_memory_limits(MemoryLimits::Off),
        )
        .expect("driver")
    };
    let first = driver(&sockets);
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.iter().any(|d| d.exists()) {
        assert!(Instant::now() < deadline, "leftovers not swept: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sockets.join("not-ours").is_dir(),
        "only instance directories go"
    );

    // Held by a live runner: another one on the same root sweeps nothing.
    std::fs::create_dir(&left[0]).expect("mkdir");
    let second = driver(&sockets);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(left[0].is_dir(), "swept a root another runner holds");
    drop((first, second));
}

/// The mount on `dir` in the test's (the runner's) mount namespace, if any: its file system
/// type and its options, from `/proc/self/mountinfo`.
fn mount_on(dir: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mounts.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let after = fields.iter().position(|f| *f == "-")?;
        if Path::new(fields.get(4)?) != dir {
            return None;
        }
        Some((
            (*fields.get(after + 1)?).to_owned(),
            (*fields.get(after + 3)?).to_owned(),
        ))
    })
}

/// A root runner whose instances run in namespaces (`fn-isolate`) as `nobody`; `None` where
/// this machine cannot make them and skips are allowed.
fn isolated_fixture() -> Option<Fixture> {
    isolated_fixture_with(MemoryLimits::Off)
}

/// [`isolated_fixture`] with `memory_limits`.
fn isolated_fixture_with(memory_limits: MemoryLimits) -> Option<Fixture> {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail("namespaces per instance need a root runner");
        return None;
    }
    let helper = fn_test_support::workspace_bin("fn-isolate");
    let probe = std::process::Command::new(&helper)
        .arg("--probe")
        .output()
        .expect("fn-isolate --probe");
    if !probe.status.success() {
        fn_test_support::skip_or_fail(&format!(
            "namespaces: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
        return None;
    }
    let tmp = tempdir();
    let sockets = tmp.path().join("sockets");
    let user = function_user();
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), &sockets)
            .with_function_user(user)
            .with_memory_limits(memory_limits)
            .with_isolation(Some(Isolation {
                helper,
                network_none: false,
            })),
    )
    .expect("driver");
    Some(Fixture {
        driver,
        sockets,
        user,
        _tmp: tmp,
    })
}

/// In namespaces an instance's directory is a tmpfs of its own, the size of its memory:
/// what the function writes there (beside its socket) stops with ENOSPC at its memory limit
/// and never reaches the host's disk under the socket root; the function still binds and
/// serves its socket there; the tmpfs goes with the instance, at its kill already.
#[tokio::test]
async fn in_namespaces_what_a_function_writes_into_its_directory_is_bounded_by_its_memory() {
    let Some(fx) = isolated_fixture() else {
        return;
    };
    let hostile = InstanceSpec {
        memory_mb: 16,
        ..spec("fn-hostile")
    };
    let instance = fx
        .driver
        .start_process(&hostile, "c", START)
        .await
        .expect("start");
    let (status, _, answer) = call(&instance, HeaderMap::new(), "fill_mb=64")
        .await
        .expect("call");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let wrote: u64 = answer
        .strip_prefix("wrote ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(
        wrote <= 16 && answer.contains("No space left on device"),
        "the function wrote past its 16 MiB: {answer}"
    );
    let fill = std::fs::metadata(instance.dir().join("fill")).expect("the function's file");
    let root = std::fs::metadata(&fx.sockets).expect("socket root");
    assert!(fill.len() <= 16 * 1024 * 1024, "{} bytes", fill.len());
    assert_ne!(
        fill.dev(),
        root.dev(),
        "written on the socket root's file system"
    );
    let (fstype, options) = mount_on(instance.dir()).expect("a mount on the instance directory");
    assert_eq!(fstype, "tmpfs");
    let user = fx.user.expect("root runs functions as nobody");
    for option in [
        "size=16384k".to_owned(),
        "nr_inodes=4096".to_owned(),
        "mode=700".to_owned(),
        format!("uid={}", user.uid),
    ] {
        assert!(
            options.split(',').any(|o| o == option),
            "{option} in {options}"
        );
    }

    let hello = fx
        .driver
        .start_process(&spec("fn-hello"), "d", START)
        .await
        .expect("start");
    let (status, _, body) = call(&hello, HeaderMap::new(), "Ann").await.expect("call");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"Hello, Ann!\n"[..]));
    // The mount namespace of an instance started later began with a copy of the first
    // one's tmpfs, hidden under its private /tmp: once the first instance's directory is
    // removed, the copy goes too (the kernel detaches every mount on a directory removed),
    // and keeps none of its pages alive for as long as the later instance lives.
    let first = instance.dir().to_path_buf();
    let first_text = first.display().to_string();
    let holds_first = |later: &fn_runner::driver::process::ProcessInstance| {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", later.pid().expect("pid")))
            .expect("mountinfo")
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(first_text.as_str()))
    };
    assert!(
        holds_first(&hello),
        "the later instance's namespace began with a copy of {first_text}"
    );
    for (instance, later) in [(&instance, Some(&hello)), (&hello, None)] {
        let dir = instance.dir().to_path_buf();
        instance.kill();
        assert!(
            !dir.exists(),
            "{} stays in place at the kill",
            dir.display()
        );
        instance.wait_gone().await;
        assert_eq!(mount_on(&dir), None, "{} still mounted", dir.display());
        if let Some(later) = later {
            assert!(
                !holds_first(later),
                "{first_text} is still mounted in another instance's namespace"
            );
        }
    }
    assert!(is_empty_dir(&fx.sockets), "instance directories left");
}

/// Watches, in one inotify queue (so in the order they happen), the end of the tmpfs on
/// `instance`'s directory (`IN_UNMOUNT`: the file system is gone, its pages freed) and the
/// removal of each of its cgroups (`IN_DELETE` of its id in the cgroup's parent).
struct CleanupWatch {
    inotify: nix::sys::inotify::Inotify,
    tmpfs: nix::sys::inotify::WatchDescriptor,
    cgroup_parents: Vec<nix::sys::inotify::WatchDescriptor>,
    id: std::ffi::OsString,
}

impl CleanupWatch {
    fn new(instance: &fn_runner::driver::process::ProcessInstance) -> Self {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let inotify =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
        // `IN_UNMOUNT` comes whatever the mask; the root of a tmpfs is never deleted.
        let tmpfs = inotify
            .add_watch(instance.dir(), AddWatchFlags::IN_DELETE_SELF)
            .expect("watch the instance directory");
        let cgroup_parents = instance
            .cgroup_dirs()
            .iter()
            .map(|dir| {
                let parent = dir.parent().expect("a cgroup's parent");
                inotify
                    .add_watch(parent, AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR)
                    .expect("watch a cgroup's parent")
            })
            .collect();
        CleanupWatch {
            inotify,
            tmpfs,
            cgroup_parents,
            id: instance.id().into(),
        }
    }

    /// What happened so far, in order: `"tmpfs gone"` and `"cgroup removed"` (one per
    /// cgroup).
    fn happened(&self) -> Vec<&'static str> {
        use nix::sys::inotify::AddWatchFlags;
        let mut seen = Vec::new();
        loop {
            match self.inotify.read_events() {
                Ok(events) => {
                    for event in events {
                        if event.wd == self.tmpfs && event.mask.contains(AddWatchFlags::IN_UNMOUNT)
                        {
                            seen.push("tmpfs gone");
                        } else if self.cgroup_parents.contains(&event.wd)
                            && event.mask.contains(AddWatchFlags::IN_DELETE)
                            && event.name.as_deref() == Some(self.id.as_os_str())
                        {
                            seen.push("cgroup removed");
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return seen,
                Err(e) => panic!("inotify: {e}"),
            }
        }
    }
}

/// In namespaces an instance's directory goes before its cgroup, killed or ended on its own:
/// the pages of its tmpfs, charged to its memory cgroup, are freed before that cgroup is
/// removed (removed first, it stayed in the kernel, dying, until the unmount) — even where
/// an instance started later holds a copy of that tmpfs in its mount namespace.
#[tokio::test]
async fn in_namespaces_an_instances_tmpfs_is_gone_before_its_cgroup_is_removed() {
    let Some(fx) = isolated_fixture_with(MemoryLimits::default()) else {
        return;
    };
    if let MemoryLimitMode::Unenforced { reason } = fx.driver.memory_limit_mode() {
        fn_test_support::skip_or_fail(&format!("memory limits cannot be enforced here: {reason}"));
        return;
    }
    let hostile = InstanceSpec {
        memory_mb: 16,
        ..spec("fn-hostile")
    };
    let killed = fx
        .driver
        .start_process(&hostile, "c", START)
        .await
        .expect("start");
    let (status, _, answer) = call(&killed, HeaderMap::new(), "fill_mb=4")
        .await
        .expect("call");
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Started later: its mount namespace holds a copy of the first one's tmpfs.
    let crashing = fx
        .driver
        .start_process(&spec("fn-crash"), "d", START)
        .await
        .expect("start");
    let cgroups = killed.cgroup_dirs().len();
    assert!(cgroups > 0, "no cgroup for an instance with a memory limit");

    let watch = CleanupWatch::new(&killed);
    killed.kill();
    killed.wait_gone().await;
    let mut expected = vec!["tmpfs gone"];
    expected.extend(std::iter::repeat_n("cgroup removed", cgroups));
    assert_eq!(watch.happened(), expected, "a kill's clean-up");

    // Ended on its own: the reaper's clean-up, with the runner's own mount still on.
    let watch = CleanupWatch::new(&crashing);
    assert!(
        call(&crashing, HeaderMap::new(), "x").await.is_err(),
        "fn-crash answered"
    );
    crashing.wait_gone().await;
    assert_eq!(watch.happened(), expected, "the clean-up after an exit");
    assert!(is_empty_dir(&fx.sockets), "instance directories left");
}

/// The live descendants of `root` (not `root` itself), from the parent ids in `/proc`.
fn descendants(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        at += 1;
    }
    found.remove(0);
    found
}

/// In namespaces a function has no controlling terminal: the namespace's first process
/// leads a session of its own, so nothing the function runs can open `/dev/tty` to reach
/// the terminal a runner was started from (write to it, read it, or push keystrokes into
/// the operator's shell with `TIOCSTI`). It was in the runner's session, led from outside
/// its PID namespace (session 0 seen from inside). Killed, the instance still leaves no
/// process, though they left its process group with the session.
#[tokio::test]
async fn in_namespaces_a_function_is_in_a_session_of_its_own_and_dies_with_its_instance() {
    let Some(fx) = isolated_fixture() else {
        return;
    };
    let instance = fx
        .driver
        .start_process(&spec("fn-hostile"), "c", START)
        .await
        .expect("start");
    let (status, _, answer) = call(&instance, HeaderMap::new(), "session=1")
        .await
        .expect("call");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer.contains(" sid 1 "),
        "not in the session of its namespace's first process: {answer}"
    );
    assert!(!answer.contains("tty: opened"), "{answer}");
    // Seen from the host: neither the namespace's first process nor the function is in
    // this process's (the runner's) session. (The wrapper shell's watchdog, root and
    // outside the namespace, stays in it.)
    let leader = i32::try_from(instance.pid().expect("pid")).expect("pid");
    let pid_namespace = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let own_namespace = pid_namespace(leader);
    let family: Vec<i32> = descendants(leader)
        .into_iter()
        .filter(|pid| pid_namespace(*pid) != own_namespace)
        .collect();
    assert!(family.len() >= 2, "the namespace's processes: {family:?}");
    let own = nix::unistd::getsid(None).expect("own session");
    for pid in &family {
        let session = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(*pid)));
        assert_ne!(session, Ok(own), "process {pid} is in the runner's session");
    }

    instance.kill();
    instance.wait_gone().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while family.iter().any(|pid| is_running(*pid as u32)) {
        assert!(
            Instant::now() < deadline,
            "still running after the kill: {:?}",
            family
                .iter()
                .filter(|pid| is_running(**pid as u32))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(is_empty_dir(&fx.sockets), "instance directories left");
}

/// An instance directory a runner killed outright left with its tmpfs mounted is unmounted
/// and removed when a runner takes the socket root again (a mount point cannot be removed).
#[tokio::test]
async fn a_runner_sweeps_an_instance_directory_an_earlier_run_left_mounted() {
    if !nix::unistd::geteuid().is_root() {
        fn_test_support::skip_or_fail("mounting a tmpfs needs root");
        return;
    }
    let tmp = tempdir();
    let sockets = tmp.path().join("sockets");
    std::fs::create_dir(&sockets).expect("mkdir");
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let left = sockets.join("deadbeef-3");
    std::fs::create_dir(&left).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &left,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount");
    // Not to leave a mount behind a failing test (its temporary directory could not go).
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            if self.0.exists() {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let _unmount = Unmount(&left);
    std::fs::write(left.join("data"), "left").expect("write");
    let canonical = std::fs::canonicalize(&left).expect("canonical");
    let driver = ProcessDriver::new(
        ProcessDriverConfig::new(fn_test_support::functions_dir(), &sockets)
            .with_memory_limits(MemoryLimits::Off),
    )
    .expect("driver");
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.exists() {
        if Instant::now() > deadline {
            panic!("the leftover {} was not swept", left.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mount_on(&canonical), None, "still mounted");
    drop(driver);
}
