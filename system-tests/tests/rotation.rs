//! Certificate rotation with the real daemons: an lb-agent, an npm (`static` control plane)
//! and two pure-runners share one certificate directory, as a compose stack shares its
//! volume. Under steady load through the LB, the node certificate is replaced, then the CA
//! is rolled over in three steps, each daemon reloading on its own (`FN_TLS_RELOAD_INTERVAL`).
//! No call may fail, and each daemon retires the connections opened under the old CA; after
//! the rollover a client of the new CA alone is served by every gRPC daemon and a client of
//! the old CA alone is refused. A bad replacement is rejected and logged while service goes
//! on, and a later good one is picked up. The expiry gauge of every daemon matches the
//! certificate's notAfter to the second. SIGHUP reloads at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::{Certs, Daemon, env, free_port, http, merge};
use fn_tls::dev::RolloverStep;
use fn_tls::{NodeTls, TlsMode};
use nix::sys::signal::Signal;

const ECHO: &str = r#"
[[functions]]
app = "demo"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 64
"#;

/// Bound for every daemon to pick up a change.
const RELOAD_BOUND: Duration = Duration::from_secs(15);
/// Calls one load worker makes at most (a rotation takes seconds; this is minutes of calls).
const MAX_CALLS_PER_WORKER: u64 = 20_000;

/// The value of the sample `series` in a scrape of `address`.
async fn sample(address: &str, series: &str) -> anyhow::Result<f64> {
    let text = fn_system_tests::metrics::scrape(address).await?;
    fn_system_tests::metrics::sample(&text, series)
        .with_context(|| format!("{address}: no {series} in\n{text}"))
}

/// Calls through the LB from `workers` loops until stopped; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(address: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_failure = Arc::new(std::sync::Mutex::new(None));
        let tasks = (0..workers)
            .map(|w| {
                let (address, stop, ok, failed, first_failure) = (
                    address.to_owned(),
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    Arc::clone(&first_failure),
                );
                tokio::spawn(async move {
                    let mut i = 0u64;
                    // Bounded in count as well as by `stop`: the loop ends whatever happens.
                    while !stop.load(Ordering::Relaxed) && i < MAX_CALLS_PER_WORKER {
                        let body = format!("worker {w} call {i}");
                        i += 1;
                        let reply = http::request(
                            &address,
                            ::http::Method::POST,
                            "/r/demo/echo",
                            &[],
                            body.clone().into(),
                        )
                        .await;
                        match reply {
                            Ok(r) if r.status == 200 && r.body == body.as_bytes() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut first = first_failure
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                                first.get_or_insert_with(|| format!("{other:?}"));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            first_failure,
            tasks,
        }
    }

    /// Stops the loops; returns (succeeded, failed, the first failure).
    ///
    /// # Errors
    /// When a worker panicked or did not stop within one call's bound.
    async fn stop(self) -> anyhow::Result<(u64, u64, Option<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(http::REQUEST_BOUND + Duration::from_secs(5), task)
                .await
                .context("a load worker did not stop")?
                .context("a load worker panicked")?;
        }
        let first = self
            .first_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok((
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        ))
    }
}

/// The metrics address of every daemon, named.
fn metrics_of(cluster: &Cluster) -> anyhow::Result<Vec<(String, String)>> {
    let mut all = vec![(
        "lb-agent".to_owned(),
        cluster.lb_metrics.clone().context("LB metrics")?,
    )];
    let npm = cluster.npm.as_ref().context("npm")?;
    all.push(("npm".into(), npm.metrics.clone().context("npm metrics")?));
    for (i, runner) in cluster.runners.iter().enumerate() {
        all.push((
            format!("runner {i}"),
            runner.metrics.clone().context("runner metrics")?,
        ));
    }
    Ok(all)
}

/// The gRPC address of every server daemon (the npm and the runners), named.
fn servers_of(cluster: &Cluster) -> anyhow::Result<Vec<(String, String)>> {
    let mut all = vec![(
        "npm".to_owned(),
        cluster.npm.as_ref().context("npm")?.address.clone(),
    )];
    for (i, runner) in cluster.runners.iter().enumerate() {
        all.push((format!("runner {i}"), runner.address.clone()));
    }
    Ok(all)
}

/// Waits until every daemon has put `reloads` sets in use, or fails with the logs.
async fn wait_reloads(cluster: &Cluster, reloads: f64, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    for (name, address) in metrics_of(cluster)? {
        loop {
            let seen = sample(&address, "fn_tls_certificate_reloads_total").await?;
            if seen >= reloads {
                ensure!(
                    seen == reloads,
                    "{what}: {name} reloaded {seen} times, not {reloads}"
                );
                break;
            }
            ensure!(
                start.elapsed() < RELOAD_BOUND,
                "{what}: {name} did not reload (seen {seen} of {reloads})\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Checks that every gRPC daemon presents the certificate now in the files.
async fn presents_the_files(cluster: &Cluster, what: &str) -> anyhow::Result<()> {
    let files = node_tls(&cluster.certs.client()?)?;
    for (name, address) in servers_of(cluster)? {
        let presented = fn_tls::peer_certificate(&files, &address)
            .await
            .with_context(|| format!("{what}: handshake with {name}"))?;
        ensure!(
            presented == files.cert_der(),
            "{what}: {name} presents another certificate than the files hold"
        );
    }
    Ok(())
}

fn node_tls(mode: &TlsMode) -> anyhow::Result<NodeTls> {
    mode.node().cloned().context("mutual TLS expected")
}

/// Checks that each daemon's expiry gauge matches the notAfter of the certificate in the
/// files, to within a second.
async fn gauges_match(cluster: &Cluster) -> anyhow::Result<()> {
    let end = node_tls(&cluster.certs.client()?)?.not_after();
    for (name, address) in metrics_of(cluster)? {
        let gauge = sample(&address, "fn_tls_certificate_expiry_seconds").await?;
        let exact = end
            .duration_since(SystemTime::now())
            .context("the certificate has ended")?
            .as_secs_f64();
        ensure!(
            (gauge - exact).abs() <= 1.0,
            "{name}: the gauge says {gauge} s, notAfter is {exact} s away"
        );
    }
    Ok(())
}

#[tokio::test]
async fn certificates_rotate_and_the_ca_rolls_over_under_load_with_no_failed_call()
-> anyhow::Result<()> {
    let fast = env(&[("FN_TLS_RELOAD_INTERVAL", "200ms")]);
    let mut cluster = Cluster::start(Setup {
        runners: 2,
        npm: true,
        metrics: true,
        placer: "naive".into(),
        catalog: ECHO.into(),
        lb_env: fast.clone(),
        npm_env: fast.clone(),
        runner_env: fast,
        ..Setup::default()
    })
    .await?;
    let old_ca = cluster.certs.ca()?;
    gauges_match(&cluster).await?;
    let load = Load::start(&cluster.http, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A new node certificate from the same CA, then the three steps of a CA rollover.
    cluster.certs.rotate()?;
    wait_reloads(&cluster, 1.0, "rotation").await?;
    presents_the_files(&cluster, "rotation").await?;
    let steps = [
        RolloverStep::Begin,
        RolloverStep::Switch,
        RolloverStep::Finish,
    ];
    for (i, step) in steps.into_iter().enumerate() {
        cluster.certs.rollover(step)?;
        let what = format!("{step:?}");
        wait_reloads(&cluster, 2.0 + i as f64, &what).await?;
        presents_the_files(&cluster, &what).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, failed, first) = load.stop().await?;
    ensure!(
        failed == 0,
        "{failed} of {} calls failed during rotation; the first: {first:?}\n{}",
        ok + failed,
        cluster.logs()
    );
    ensure!(ok > 40, "too few calls to mean anything: {ok}");
    gauges_match(&cluster).await?;
    // The LB's connection to the npm (a tonic channel, which does not move off a connection
    // on its own) carried the old CA's certificates to the end: both ends retired it. Its
    // connections to the runners it left at the switch, when its own certificate changed,
    // so the runners may have none left to retire; no call failed either way.
    for (name, address) in &metrics_of(&cluster)?[..2] {
        let retired = sample(address, "fn_tls_connections_retired_total").await?;
        ensure!(
            retired >= 1.0,
            "{name} retired no connection of the old CA\n{}",
            cluster.logs()
        );
    }

    // After the rollover: a client of the new CA alone is served by every gRPC daemon; a
    // certificate of the old CA is refused by each, from a client that trusts the new CA (so
    // that the refusal can only be the daemon's).
    let new_ca = cluster.certs.ca()?;
    let new_ca_client = TlsMode::Mutual(new_ca.node_tls(&[])?);
    let old_cert = old_ca.node(&[])?;
    let old_cert_client = TlsMode::Mutual(NodeTls::from_pem(
        old_cert.cert_pem.into_bytes(),
        old_cert.key_pem.into_bytes(),
        new_ca.cert_pem().as_bytes().to_vec(),
    )?);
    for (name, address) in servers_of(&cluster)? {
        fn_test_support::health_status(&new_ca_client, &address)
            .await
            .with_context(|| format!("a client of the new CA, to {name}"))?;
        // (The client may see the daemon's alert or only the connection it then closes.)
        ensure!(
            fn_test_support::health_status(&old_cert_client, &address)
                .await
                .is_err(),
            "{name} served a client whose certificate is the old CA's"
        );
    }
    // A bad replacement: rejected, logged with the file, service goes on with the old set.
    let key = cluster.certs.dir().join("node-key.pem");
    let good_key = std::fs::read(&key)?;
    std::fs::write(&key, "garbage")?;
    let start = Instant::now();
    for (name, address) in metrics_of(&cluster)? {
        while sample(&address, "fn_tls_certificate_reload_rejections_total").await? < 1.0 {
            ensure!(
                start.elapsed() < RELOAD_BOUND,
                "{name} did not reject the garbage key\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let logs = cluster.logs();
    ensure!(
        logs.matches("certificate replacement rejected").count() >= 4
            && logs.contains(&format!("FN_NODE_CERT_KEY: {}", key.display())),
        "each daemon logs the rejection with the file\n{logs}"
    );
    let reply = cluster.call("/r/demo/echo", "still").await?;
    ensure!(reply.status == 200 && reply.body == "still", "{reply:?}");
    std::fs::write(&key, good_key)?;
    cluster.certs.rotate()?;
    wait_reloads(&cluster, 5.0, "a good replacement after a bad one").await?;
    presents_the_files(&cluster, "a good replacement after a bad one").await?;
    gauges_match(&cluster).await?;
    // The LB dials with the new material: a runner restarted now gets new connections
    // only, and calls still reach it.
    cluster.kill_runner(1).await?;
    cluster.restart_runner(1).await?;
    let runner_pid = cluster.runners[1].pid().context("runner 1 pid")?;
    let mut reached = false;
    for _ in 0..40 {
        // A call may meet the LB's old connection to the killed runner; the next ones may not.
        let reply = cluster.call("/r/demo/echo", "after").await?;
        if reply.status == 200 && cluster.runner_of(reply.fn_pid()?).ok() == Some(1) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        reached,
        "no call reached the restarted runner (pid {runner_pid})\n{}",
        cluster.logs()
    );

    let reply = cluster.call("/r/demo/echo", "done").await?;
    ensure!(reply.status == 200 && reply.body == "done", "{reply:?}");
    Ok(())
}

#[tokio::test]
async fn sighup_reloads_the_certificates_of_npm_and_runner_at_once() -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let functions = tempfile::tempdir()?;
    // The function user must be able to reach the functions directory.
    std::fs::set_permissions(
        functions.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let sockets = tempfile::tempdir()?;
    let mut started: Vec<(&str, Daemon, String)> = Vec::new();
    for bin in ["npm", "pure-runner"] {
        let port = free_port()?;
        let address = format!("127.0.0.1:{port}");
        let own = match bin {
            "npm" => env(&[
                ("FN_GRPC_PORT", &port.to_string()),
                ("FN_CONTROL_PLANE", "static"),
                ("FN_RUNNER_ADDRESSES", "127.0.0.1:1"),
            ]),
            _ => env(&[
                ("FN_GRPC_PORT", &port.to_string()),
                ("FN_FUNCTIONS_DIR", &functions.path().display().to_string()),
                ("FN_SOCKET_DIR", &sockets.path().display().to_string()),
                ("FN_MAX_MEMORY_MB", "256"),
            ]),
        };
        // Only SIGHUP reloads: the files are not watched.
        let daemon_env = merge(&[
            &certs.env(),
            &own,
            &env(&[
                ("FN_LISTEN_ADDR", "127.0.0.1"),
                ("FN_SHUTDOWN_TIMEOUT", "5s"),
                ("FN_TLS_RELOAD_INTERVAL", "0s"),
                ("FN_LOG_LEVEL", "info"),
            ]),
        ]);
        let mut daemon = Daemon::spawn(bin, &daemon_env)?;
        daemon
            .wait_grpc_serving(&certs.client()?, &address, Duration::from_secs(20))
            .await?;
        started.push((bin, daemon, address));
    }
    let before = node_tls(&certs.client()?)?;
    certs.rotate()?;
    let after = node_tls(&certs.client()?)?;
    ensure!(
        before.cert_der() != after.cert_der(),
        "rotation wrote a new certificate"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (bin, _, address) in &started {
        let presented = fn_tls::peer_certificate(&after, address).await?;
        ensure!(
            presented == before.cert_der(),
            "{bin}: without polling, nothing changes before SIGHUP"
        );
    }
    for (bin, daemon, address) in &started {
        daemon.signal(Signal::SIGHUP)?;
        let start = Instant::now();
        loop {
            let presented = fn_tls::peer_certificate(&after, address).await?;
            if presented == after.cert_der() {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "{bin}: SIGHUP did not reload\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            daemon
                .logs_within("new certificates in use", Duration::from_secs(2))
                .await,
            "{bin} logs the reload\n{}",
            daemon.log()
        );
    }
    for (bin, mut daemon, _) in started {
        daemon.signal(Signal::SIGTERM)?;
        let status = daemon.wait_exit(Duration::from_secs(20)).await?;
        ensure!(
            status.success(),
            "{bin} survived SIGHUP and stops cleanly: {status}"
        );
    }
    Ok(())
}
