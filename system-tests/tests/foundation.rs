//! Foundation: each daemon refuses to start without certificates (exit 2, naming the
//! variable), serves health over mutual TLS, and exits 0 on SIGTERM within the bound.

use std::time::Duration;

use fn_system_tests::{Certs, Daemon, env, free_port, merge, run_to_exit};
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(20);
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn every_daemon_without_certificates_exits_2_naming_fn_node_cert() -> anyhow::Result<()> {
    let functions = tempfile::tempdir()?;
    let catalog = functions.path().join("functions.toml");
    std::fs::write(&catalog, "")?;
    let extra = env(&[
        ("FN_FUNCTIONS_DIR", &functions.path().display().to_string()),
        ("FN_FUNCTIONS_FILE", &catalog.display().to_string()),
        ("FN_RUNNER_ADDRESSES", "127.0.0.1:1"),
    ]);
    for bin in ["npm", "pure-runner", "lb-agent"] {
        let (status, stderr) = run_to_exit(bin, &extra).await?;
        assert_eq!(status.code(), Some(2), "{bin}: {stderr}");
        assert!(
            stderr.contains("FN_NODE_CERT"),
            "{bin} must name FN_NODE_CERT: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{bin}: one-line error: {stderr}"
        );
    }
    Ok(())
}

/// `FN_SHARDS` is the lb-agent's and the runner's: npm, which has no shards, starts as it
/// would without it (here it gets as far as its certificates), rather than refusing a
/// worker-thread count that only conflicts with shards it does not have.
#[tokio::test]
async fn npm_ignores_fn_shards() -> anyhow::Result<()> {
    let extra = env(&[("FN_SHARDS", "2"), ("FN_WORKER_THREADS", "4")]);
    let (status, stderr) = run_to_exit("npm", &extra).await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("FN_NODE_CERT") && !stderr.contains("FN_SHARDS"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_values_exit_2_naming_the_variable() -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let (status, stderr) = run_to_exit(
        "npm",
        &merge(&[&certs.env(), &env(&[("FN_GRPC_PORT", "http")])]),
    )
    .await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("FN_GRPC_PORT"), "{stderr}");
    // Port 0 would be a port the kernel picks, which no peer could find.
    for (bin, var) in [
        ("lb-agent", "FN_PORT"),
        ("pure-runner", "FN_GRPC_PORT"),
        ("npm", "FN_GRPC_PORT"),
    ] {
        let (status, stderr) =
            run_to_exit(bin, &merge(&[&certs.env(), &env(&[(var, "0")])])).await?;
        assert_eq!(status.code(), Some(2), "{bin}: {stderr}");
        assert!(stderr.contains(&format!("{var}: ")), "{bin}: {stderr}");
    }
    let (status, stderr) = run_to_exit(
        "npm",
        &env(&[
            ("FN_NODE_CERT", "/nonexistent/x.pem"),
            ("FN_NODE_CERT_KEY", "/k"),
            ("FN_NODE_CERT_AUTHORITY", "/c"),
        ]),
    )
    .await?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("FN_NODE_CERT: file not found: /nonexistent/x.pem"),
        "{stderr}"
    );
    // Function containers given a uid from FN_FUNCTION_UIDS, where each function of the
    // process driver gets its own (a root runner's).
    if nix::unistd::geteuid().is_root() {
        let (status, stderr) = run_to_exit(
            "pure-runner",
            &merge(&[
                &certs.env(),
                &env(&[
                    ("FN_FUNCTION_UIDS", "100000-165535"),
                    ("FN_DOCKER_FUNCTION_USER", "100001"),
                    ("FN_FUNCTIONS_DIR", "/tmp"),
                    ("FN_MAX_MEMORY_MB", "256"),
                ]),
            ]),
        )
        .await?;
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("FN_DOCKER_FUNCTION_USER: uid 100001 is in FN_FUNCTION_UIDS"),
            "{stderr}"
        );
    }
    Ok(())
}

/// What loading the certificates warns of reaches the log: every daemon loaded them before
/// its log was set up, so a node certificate its own CA bundle does not trust (the wrong
/// `ca.pem` mounted) started without a word. Each daemon here stops at a later setting.
#[tokio::test]
async fn a_node_certificate_its_own_bundle_does_not_trust_is_warned_of_at_start()
-> anyhow::Result<()> {
    let ours = Certs::new()?;
    let other = Certs::new()?;
    let mut vars = ours.env();
    for (name, value) in &mut vars {
        if name == "FN_NODE_CERT_AUTHORITY" {
            *value = other.dir().join("ca.pem").display().to_string();
        }
    }
    for bin in ["lb-agent", "pure-runner", "npm"] {
        // Each stops at a setting it reads after its certificates.
        let stop = match bin {
            "npm" => env(&[("FN_MAX_RUNNERS", "0")]),
            _ => Vec::new(),
        };
        let (status, stderr) = run_to_exit(bin, &merge(&[&vars, &stop])).await?;
        assert_eq!(status.code(), Some(2), "{bin}: {stderr}");
        assert!(
            stderr.contains("not valid under this node's own CA bundle"),
            "{bin}: {stderr}"
        );
    }
    Ok(())
}

async fn grpc_daemon_serves_health_and_stops_on_sigterm(
    bin: &str,
    extra: &[(String, String)],
) -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let vars = merge(&[
        &certs.env(),
        extra,
        &env(&[
            ("FN_GRPC_PORT", &port.to_string()),
            ("FN_LISTEN_ADDR", "127.0.0.1"),
            ("FN_SHUTDOWN_TIMEOUT", "5s"),
        ]),
    ]);
    let mut daemon = Daemon::spawn(bin, &vars)?;
    daemon
        .wait_grpc_serving(&certs.client()?, &address, READY)
        .await?;

    // A client whose certificate is another CA's is refused by the daemon (it trusts the
    // daemon's CA, so the refusal is the daemon's), and the daemon keeps serving.
    let other = fn_tls::dev::DevCa::new("other")?.node(&[])?;
    let stranger = fn_tls::TlsMode::Mutual(fn_tls::NodeTls::from_pem(
        other.cert_pem.into_bytes(),
        other.key_pem.into_bytes(),
        certs.ca()?.cert_pem().as_bytes().to_vec(),
    )?);
    // (The client may see the daemon's alert or only the connection it then closes.)
    let refused = fn_test_support::health_status(&stranger, &address).await;
    assert!(
        refused.is_err(),
        "{bin:?} served a client whose certificate is another CA's: {refused:?}"
    );
    assert!(
        fn_test_support::health_status(&certs.client()?, &address)
            .await
            .is_ok()
    );

    daemon.signal(Signal::SIGTERM)?;
    let status = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    let log = daemon.log();
    assert_eq!(status.code(), Some(0), "{bin} exit on SIGTERM; log:\n{log}");
    // Its stderr is a pipe, not a terminal: plain text, no colour codes.
    assert!(log.contains("serving"), "{bin} logged nothing: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "{bin} logged ANSI escapes into a pipe:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn npm_serves_health_over_mtls_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    grpc_daemon_serves_health_and_stops_on_sigterm(
        "npm",
        &env(&[
            ("FN_CONTROL_PLANE", "static"),
            ("FN_RUNNER_ADDRESSES", "127.0.0.1:1"),
        ]),
    )
    .await
}

#[tokio::test]
async fn pure_runner_serves_health_over_mtls_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let functions = tempfile::tempdir()?;
    // The function user must be able to reach the functions directory.
    std::fs::set_permissions(
        functions.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let sockets = tempfile::tempdir()?;
    grpc_daemon_serves_health_and_stops_on_sigterm(
        "pure-runner",
        &env(&[
            ("FN_FUNCTIONS_DIR", &functions.path().display().to_string()),
            ("FN_SOCKET_DIR", &sockets.path().display().to_string()),
            ("FN_MAX_MEMORY_MB", "512"),
        ]),
    )
    .await
}

/// An lb-agent with one function (`demo/echo`) and a runner no one listens at, started
/// with `extra` settings and healthy; its address, and the files it reads (kept alive).
async fn lb_agent(
    extra: &[(&str, &str)],
) -> anyhow::Result<(Daemon, String, (Certs, tempfile::TempDir))> {
    let certs = Certs::new()?;
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("functions.toml");
    std::fs::write(
        &catalog,
        "[[functions]]\napp = \"demo\"\nname = \"echo\"\ncommand = [\"fn-echo\"]\n",
    )?;
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let vars = merge(&[
        &certs.env(),
        &env(&[
            ("FN_PORT", &port.to_string()),
            ("FN_LISTEN_ADDR", "127.0.0.1"),
            ("FN_FUNCTIONS_FILE", &catalog.display().to_string()),
            ("FN_RUNNER_ADDRESSES", "127.0.0.1:1"),
        ]),
        &env(extra),
    ]);
    let mut daemon = Daemon::spawn("lb-agent", &vars)?;
    daemon.wait_http_health(&address, READY).await?;
    Ok((daemon, address, (certs, dir)))
}

#[tokio::test]
async fn lb_agent_answers_health_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let (mut daemon, address, _files) =
        lb_agent(&[("FN_SHUTDOWN_TIMEOUT", "5s"), ("FN_DRAIN_DELAY", "0s")]).await?;
    let reply = fn_system_tests::http::get(&address, "/health").await?;
    assert_eq!(reply.status, 200);
    assert!(
        reply.header("fn-call-id").is_some(),
        "every response carries Fn-Call-Id"
    );
    let missing = fn_system_tests::http::get(&address, "/r/demo/nope").await?;
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("\"error\""), "{}", missing.text());

    daemon.signal(Signal::SIGTERM)?;
    let status = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
    Ok(())
}

/// Signals `daemon` (an lb-agent listening at `address`) with SIGTERM and waits until its
/// health says it is draining.
async fn draining(daemon: &fn_system_tests::Daemon, address: &str) -> anyhow::Result<()> {
    daemon.signal(Signal::SIGTERM)?;
    let start = std::time::Instant::now();
    while fn_system_tests::http::get(address, "/health").await?.status != 503 {
        anyhow::ensure!(start.elapsed() < READY, "never reported draining");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A second Ctrl-C (SIGINT) during the drain, once the window that groups the signals of
/// one stop has passed, ends the daemon at once (before, it did nothing, and a 60 s drain
/// delay could only be cut short with SIGKILL).
#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() -> anyhow::Result<()> {
    let (mut daemon, address, _files) = lb_agent(&[("FN_DRAIN_DELAY", "60s")]).await?;
    draining(&daemon, &address).await?;
    // The subject is a span of time: a person's second Ctrl-C comes after it.
    tokio::time::sleep(fn_lifecycle::signal::SAME_STOP_WINDOW + Duration::from_millis(100)).await;
    daemon.signal(Signal::SIGINT)?;
    let status = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    assert_eq!(status.code(), Some(130), "log:\n{}", daemon.log());
    assert!(
        daemon.log().contains("second shutdown signal"),
        "log:\n{}",
        daemon.log()
    );
    Ok(())
}

/// A terminal's Ctrl-C reaches a script and the daemons of its process group at once, and
/// a script that passes the stop on (`trap 'kill $pids' INT`) signals them again within
/// milliseconds, often before the daemon has taken the terminal's SIGINT: SIGTERM then
/// SIGINT. Within the window they are one stop, and the daemon drains and exits 0 (before,
/// the SIGINT counted as an operator's second Ctrl-C and cut every call in flight, 130).
#[tokio::test]
async fn sigint_right_after_sigterm_is_the_same_stop() -> anyhow::Result<()> {
    // The SIGINT must come well inside the window, after the health checks that show the
    // SIGTERM taken: a stall of the loaded machine there says nothing of the daemon, so a
    // fresh daemon tries again (a few times at most) rather than the test failing.
    const TRIES: usize = 3;
    let mut tries = 0;
    let (mut daemon, _files) = loop {
        tries += 1;
        let (daemon, address, files) = lb_agent(&[("FN_DRAIN_DELAY", "1s")]).await?;
        let sent = std::time::Instant::now();
        // The daemon has taken the SIGTERM (it reports draining) when the SIGINT arrives.
        draining(&daemon, &address).await?;
        daemon.signal(Signal::SIGINT)?;
        let between = sent.elapsed();
        if between < fn_lifecycle::signal::SAME_STOP_WINDOW / 2 {
            break (daemon, files);
        }
        anyhow::ensure!(
            tries < TRIES,
            "the SIGINT went {between:?} after the SIGTERM {TRIES} times in a row, too late \
             to test the window (a machine this slow cannot run this test)"
        );
        // This daemon is killed on drop.
        eprintln!("the SIGINT went {between:?} after the SIGTERM: trying again");
    };
    let status = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    let log = daemon.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(
        log.contains("same stop") && log.contains("shutdown complete"),
        "log:\n{log}"
    );
    Ok(())
}

/// SIGTERM again during the drain is the same stop delivered twice (a terminal's Ctrl-C or
/// a service manager signals the whole group, then a script or the npm signals again), not
/// an operator's second signal: the drain goes on and the daemon exits cleanly.
#[tokio::test]
async fn sigterm_again_during_the_drain_keeps_draining() -> anyhow::Result<()> {
    let (mut daemon, address, _files) = lb_agent(&[("FN_DRAIN_DELAY", "3s")]).await?;
    draining(&daemon, &address).await?;
    // After the window, where a SIGINT would end the drain.
    tokio::time::sleep(fn_lifecycle::signal::SAME_STOP_WINDOW + Duration::from_millis(100)).await;
    daemon.signal(Signal::SIGTERM)?;
    let status = daemon.wait_exit(SHUTDOWN_BOUND).await?;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
    assert!(
        daemon.log().contains("during the shutdown: still draining")
            && daemon.log().contains("shutdown complete"),
        "log:\n{}",
        daemon.log()
    );
    Ok(())
}
