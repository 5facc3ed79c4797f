//! pure-runner: SIGTERM drains. With a call in flight the real binary reports NOT_SERVING,
//! refuses new calls as draining (on existing and new connections alike), lets the call in
//! flight finish, exits 0 within the bound, and leaves no function process, memory cgroup or
//! socket directory behind.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use fn_protocol::runner::runner_protocol_client::RunnerProtocolClient;
use fn_protocol::runner::{
    self, CallAcknowledged, ClientMsg, DataFrame, ErrorKind, RefusalReason, RunnerMsg, TryCall,
    client_msg, runner_msg,
};
use fn_system_tests::{Certs, Daemon, env, free_port, merge};
use fn_tls::TlsMode;
use futures::SinkExt;
use futures::channel::mpsc;
use nix::sys::signal::Signal;
use tonic::Streaming;
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(20);
const RECV_BOUND: Duration = Duration::from_secs(20);
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);
/// `grpc.health.v1.HealthCheckResponse.ServingStatus` values (this crate does not depend on
/// `tonic-health`; `fn_test_support::health_status` returns its enum).
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;
/// How long the call in flight runs: long enough for the checks made during the drain
/// (health polled over new TLS connections, two Engage streams, a new connection and two
/// Status calls), with room for a loaded machine.
const SLEEP_MS: u64 = 5000;

async fn connect(tls: &TlsMode, address: &str) -> anyhow::Result<RunnerProtocolClient<Channel>> {
    let channel = fn_tls::grpc_endpoint(tls, address)?
        .with(|e| e.connect_timeout(Duration::from_secs(5)))
        .connect()
        .await?;
    Ok(RunnerProtocolClient::new(channel))
}

/// One Engage stream, client side.
struct Engage {
    tx: mpsc::Sender<ClientMsg>,
    rx: Streaming<RunnerMsg>,
}

impl Engage {
    async fn open(client: &RunnerProtocolClient<Channel>) -> anyhow::Result<Engage> {
        let (tx, rx) = mpsc::channel(16);
        let response = client.clone().engage(rx).await?;
        Ok(Engage {
            tx,
            rx: response.into_inner(),
        })
    }

    async fn send(&mut self, body: client_msg::Body) -> anyhow::Result<()> {
        self.tx.send(ClientMsg { body: Some(body) }).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Option<runner_msg::Body>> {
        let msg = tokio::time::timeout(RECV_BOUND, self.rx.message()).await??;
        Ok(msg.and_then(|m| m.body))
    }

    async fn try_call(&mut self, call: runner::Call) -> anyhow::Result<CallAcknowledged> {
        let sent = self
            .send(client_msg::Body::TryCall(Box::new(TryCall {
                call: Some(call),
            })))
            .await;
        // A runner may answer and close its side before reading the TryCall; its answer
        // is what counts, so read it even when the send failed.
        let answer = self.recv().await?;
        match answer {
            Some(runner_msg::Body::Acknowledged(ack)) => Ok(ack),
            other => anyhow::bail!("expected CallAcknowledged, got {other:?} (send: {sent:?})"),
        }
    }
}

/// From each log line containing `message`, the word that follows `key`.
fn logged_values(log: &str, message: &str, key: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains(message))
        .filter_map(|line| {
            let (_, rest) = line.split_once(key)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie (a zombie of an orphan waits for init).
fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn sleep_call(id: &str) -> runner::Call {
    let timeout = Duration::from_secs(30);
    let deadline = SystemTime::now() + timeout;
    runner::Call {
        id: id.into(),
        app: "demo".into(),
        function: "sleep".into(),
        route: "/sleep".into(),
        method: "POST".into(),
        request_url: "http://lb.test/r/demo/sleep".into(),
        headers: Vec::new(),
        memory_mb: 128,
        timeout_ms: 30_000,
        idle_timeout_ms: 30_000,
        command: vec!["fn-sleep".into()],
        image: String::new(),
        config: Default::default(),
        lb_group: "default".into(),
        deadline_unix_ms: deadline
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default(),
        concurrency: 1,
    }
}

#[tokio::test]
async fn sigterm_finishes_the_call_in_flight_refuses_new_calls_as_draining_and_exits_0()
-> anyhow::Result<()> {
    fn_test_support::workspace_bin("fn-sleep");
    let certs = Certs::new()?;
    let tls = certs.client()?;
    let sockets = tempfile::tempdir()?;
    // As root the runner runs functions as `nobody`, who must reach the socket directory.
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o755))?;
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let vars = merge(&[
        &certs.env(),
        &env(&[
            (
                "FN_FUNCTIONS_DIR",
                &fn_test_support::functions_dir().display().to_string(),
            ),
            (
                "FN_SOCKET_DIR",
                &sockets.path().join("s").display().to_string(),
            ),
            ("FN_MAX_MEMORY_MB", "512"),
            ("FN_GRPC_PORT", &port.to_string()),
            ("FN_LISTEN_ADDR", "127.0.0.1"),
            ("FN_SHUTDOWN_TIMEOUT", "10s"),
            // Debug: the log names every instance started, for the clean-up check at the end.
            ("FN_LOG_LEVEL", "info,fn_runner=debug"),
            // The clean-up check finds the function by the pid it reports (X-Fn-Pid), which
            // in a PID namespace of its own is not its pid on the host.
            ("FN_FUNCTION_NAMESPACES", "false"),
        ]),
    ]);
    let mut daemon = Daemon::spawn("pure-runner", &vars)?;
    daemon.wait_grpc_serving(&tls, &address, READY).await?;
    let client = connect(&tls, &address).await?;

    // A call committed before the signal, its body sent: it runs for SLEEP_MS.
    let mut in_flight = Engage::open(&client).await?;
    let ack = in_flight.try_call(sleep_call("in-flight")).await?;
    anyhow::ensure!(ack.committed, "call before the signal refused: {ack:?}");
    in_flight
        .send(client_msg::Body::Data(DataFrame {
            data: Bytes::from(SLEEP_MS.to_string()),
            eof: true,
        }))
        .await?;
    let signalled = Instant::now();
    daemon.signal(Signal::SIGTERM)?;

    // Health turns NOT_SERVING while the call still runs.
    loop {
        match fn_test_support::health_status(&tls, &address)
            .await
            .map(|s| s as i32)
        {
            Ok(NOT_SERVING) => break,
            Ok(SERVING) => {}
            other => anyhow::bail!("health during the drain: {other:?}; log:\n{}", daemon.log()),
        }
        anyhow::ensure!(
            signalled.elapsed() < SHUTDOWN_BOUND,
            "health still SERVING {:?} after SIGTERM; log:\n{}",
            signalled.elapsed(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // New calls are refused as draining, on the existing connection and on a new one.
    for (what, client) in [
        ("existing connection", client.clone()),
        ("new connection", connect(&tls, &address).await?),
    ] {
        let mut late = Engage::open(&client).await?;
        let ack = late.try_call(sleep_call(&format!("late-{what}"))).await?;
        assert!(!ack.committed, "{what}: a call after SIGTERM was committed");
        assert_eq!(ack.refusal(), RefusalReason::Draining, "{what}: {ack:?}");
        let status = client.clone().status(()).await?.into_inner();
        assert!(status.draining, "{what}: Status says draining: {status:?}");
        // Still during the drain: the call in flight has not ended yet.
        assert_eq!(status.calls_in_flight, 1, "{what}: {status:?}");
    }

    // The call in flight completes normally.
    let mut status = None;
    let mut pid = None;
    let mut body = Vec::new();
    let finished = loop {
        match in_flight.recv().await? {
            Some(runner_msg::Body::ResultStart(start)) => {
                let http = start.http.unwrap_or_default();
                status = Some(http.status_code);
                pid = http
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(b"x-fn-pid"))
                    .and_then(|h| std::str::from_utf8(&h.value).ok()?.parse::<i32>().ok());
            }
            Some(runner_msg::Body::Data(frame)) => body.extend_from_slice(&frame.data),
            Some(runner_msg::Body::Finished(finished)) => break finished,
            other => anyhow::bail!("call in flight: unexpected {other:?}"),
        }
    };
    assert!(
        finished.success && finished.kind() == ErrorKind::None,
        "the call in flight finishes: {finished:?}; log:\n{}",
        daemon.log()
    );
    assert_eq!(status, Some(200));
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("slept {SLEEP_MS}ms")
    );
    drop(in_flight);
    drop(client);

    let exit = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status after the drain; log:\n{}",
        daemon.log()
    );
    // The runner leaves nothing of its function instances behind: no process, no memory
    // cgroup (where it enforces memory limits), no socket directory.
    // Plain text: a daemon whose stderr is not a terminal writes no colour codes.
    let log = daemon.log();
    let instances = logged_values(&log, "function instance started", "instance=");
    anyhow::ensure!(!instances.is_empty(), "no instance in the log:\n{log}");
    let cgroup_parent = logged_values(&log, "function memory limits enforced", " under ")
        .into_iter()
        .next();
    for id in &instances {
        if let Some(parent) = &cgroup_parent {
            let cgroup = std::path::Path::new(parent).join(id);
            anyhow::ensure!(
                !cgroup.exists(),
                "instance {id}: memory cgroup {} left behind; log:\n{log}",
                cgroup.display()
            );
        }
        let dir = sockets.path().join("s").join(id);
        let aside = sockets.path().join("s").join(format!("{id}.removing"));
        anyhow::ensure!(
            !dir.exists() && !aside.exists(),
            "instance {id}: {} left behind",
            dir.display()
        );
    }
    let pid = pid.context("X-Fn-Pid of the call in flight")?;
    let gone_by = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) {
        anyhow::ensure!(
            Instant::now() < gone_by,
            "function process {pid} outlived the runner; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
