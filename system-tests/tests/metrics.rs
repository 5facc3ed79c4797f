//! The Prometheus endpoints of the real daemons (`FN_METRICS_PORT`): an lb-agent, an npm
//! (`static` control plane) and two pure-runners, each with its own metrics port. After a
//! few calls and one 404, each endpoint is scraped over plain HTTP and its counters must
//! match what was sent. A metrics port that cannot be bound stops the daemon with one line
//! naming `FN_METRICS_PORT`.

use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, ensure};
use bytes::Bytes;
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::metrics::sample;
use fn_system_tests::{Certs, Stderr, env, free_port, http, merge, run_to_exit};

const ECHO: &str = r#"
[[functions]]
app = "demo"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 128
"#;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes `address` and checks the answer is the OpenMetrics text.
async fn scrape(address: &str) -> anyhow::Result<String> {
    let reply = http::get(address, "/metrics")
        .await
        .with_context(|| format!("scraping {address}"))?;
    ensure!(reply.status == 200, "{address}: {reply:?}");
    ensure!(
        reply.header("content-type").as_deref() == Some(CONTENT_TYPE),
        "{address}: {reply:?}"
    );
    let text = reply.text();
    ensure!(text.ends_with("# EOF\n"), "{address}: {text}");
    Ok(text)
}

#[tokio::test]
async fn every_daemon_exposes_its_counters_on_its_metrics_port() -> anyhow::Result<()> {
    const CALLS: usize = 4;
    let cluster = Cluster::start(Setup {
        runners: 2,
        npm: true,
        metrics: true,
        catalog: ECHO.into(),
        ..Setup::default()
    })
    .await?;
    for i in 0..CALLS {
        let reply = cluster.call("/r/demo/echo", format!("call {i}")).await?;
        ensure!(reply.status == 200, "{reply:?}\n{}", cluster.logs());
    }
    let reply = cluster.call("/r/demo/nope", "").await?;
    ensure!(reply.status == 404, "{reply:?}");

    // lb-agent: counted before the answer's end reached the client.
    let lb = cluster
        .lb_metrics
        .as_deref()
        .context("LB metrics address")?;
    let text = scrape(lb).await?;
    let calls = |outcome: &str| {
        sample(
            &text,
            &format!("fn_lb_calls_total{{outcome=\"{outcome}\"}}"),
        )
    };
    ensure!(calls("success") == Some(CALLS as f64), "{text}");
    ensure!(calls("not_found") == Some(1.0), "{text}");
    ensure!(
        sample(&text, "fn_lb_call_duration_seconds_count") == Some(CALLS as f64),
        "{text}"
    );
    ensure!(
        sample(&text, "fn_lb_calls_in_flight") == Some(0.0),
        "{text}"
    );

    // pure-runners: together they ran every call.
    let mut ran = 0.0;
    for runner in &cluster.runners {
        let address = runner
            .metrics
            .as_deref()
            .context("runner metrics address")?;
        let text = scrape(address).await?;
        ran += sample(&text, "fn_runner_calls_total{outcome=\"success\"}").unwrap_or(0.0);
        ensure!(
            sample(&text, "fn_runner_memory_total_mb") == Some(512.0),
            "{text}"
        );
        ensure!(
            sample(&text, "fn_runner_memory_committed_mb") == Some(0.0),
            "{text}"
        );
    }
    ensure!(
        ran == CALLS as f64,
        "runners counted {ran} successful calls"
    );

    // npm: both runners active in the default group (the gauges follow each tick).
    let npm = cluster.npm.as_ref().context("npm")?;
    let address = npm.metrics.as_deref().context("npm metrics address")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(address).await?;
        let active = sample(
            &text,
            "fn_npm_runners{lb_group=\"default\",state=\"active\"}",
        );
        let provisioned = sample(&text, "fn_npm_provisions_total{result=\"ok\"}");
        if active == Some(2.0) && provisioned == Some(2.0) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "npm gauges never settled:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every daemon shows the time left on its certificate (a year, in the test PKI).
    let mut addresses = vec![lb.to_owned(), address.to_owned()];
    addresses.extend(cluster.runners.iter().filter_map(|r| r.metrics.clone()));
    for address in &addresses {
        let text = scrape(address).await?;
        let left = sample(&text, "fn_tls_certificate_expiry_seconds")
            .with_context(|| format!("{address}: no certificate expiry gauge\n{text}"))?;
        ensure!(
            (360.0 * 86_400.0..=366.0 * 86_400.0).contains(&left),
            "{address}: {left} s left on a one-year certificate"
        );
    }

    // Only GET /metrics is served.
    let other = http::get(lb, "/").await?;
    ensure!(other.status == 404, "{other:?}");
    let post = http::request(lb, Method::POST, "/metrics", &[], Bytes::new()).await?;
    ensure!(post.status == 405, "{post:?}");
    Ok(())
}

/// An lb-agent whose stderr nobody reads (a log driver that stalls, a pipe into a pager
/// left waiting) keeps answering calls: once its log lines fill the pipe, and then its
/// queue, further lines are dropped and counted in `fn_log_lines_dropped_total`. Written
/// in place, a line blocked the thread that logged it, and every call on that thread.
#[tokio::test]
async fn an_lb_whose_stderr_nobody_reads_keeps_answering_and_counts_the_lines_dropped()
-> anyhow::Result<()> {
    // At DEBUG every call logs several lines (the call's own, hyper's, h2's frames): the
    // pipe's 64 KiB fill within tens of calls, the queue's 8,192 lines within some hundreds.
    const MOST_CALLS: usize = 5000;
    const CALL_BOUND: Duration = Duration::from_secs(10);
    let cluster = Cluster::start(Setup {
        runners: 1,
        metrics: true,
        catalog: ECHO.into(),
        lb_env: env(&[("FN_LOG_LEVEL", "debug")]),
        lb_stderr: Stderr::Unread,
        ..Setup::default()
    })
    .await?;
    let metrics = cluster
        .lb_metrics
        .clone()
        .context("lb-agent metrics port")?;
    let started = Instant::now();
    let mut dropped = 0.0;
    let mut calls = 0;
    while dropped == 0.0 {
        ensure!(
            calls < MOST_CALLS && started.elapsed() < Duration::from_secs(120),
            "{calls} calls in {:?} and no log line dropped: is stderr read after all?",
            started.elapsed()
        );
        for _ in 0..50 {
            let reply = tokio::time::timeout(CALL_BOUND, cluster.call("/r/demo/echo", "x"))
                .await
                .with_context(|| {
                    format!("call {calls} not answered within {CALL_BOUND:?}: stopped by its log?")
                })??;
            ensure!(reply.status == 200, "call {calls}: {reply:?}");
            calls += 1;
        }
        dropped = sample(&scrape(&metrics).await?, "fn_log_lines_dropped_total").unwrap_or(0.0);
    }
    // Still serving with its queue full.
    for _ in 0..50 {
        let reply = tokio::time::timeout(CALL_BOUND, cluster.call("/r/demo/echo", "x"))
            .await
            .context("a call with the log queue full")??;
        ensure!(reply.status == 200, "{reply:?}");
    }
    let later = sample(&scrape(&metrics).await?, "fn_log_lines_dropped_total").unwrap_or(0.0);
    ensure!(
        later > dropped,
        "dropped {dropped}, then {later}: not counted"
    );
    Ok(())
}

#[tokio::test]
async fn a_metrics_port_in_use_stops_the_daemon_naming_fn_metrics_port() -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_port = taken.local_addr()?.port();
    let functions_dir = fn_test_support::functions_dir().display().to_string();
    let (status, stderr) = run_to_exit(
        "pure-runner",
        &merge(&[
            &certs.env(),
            &env(&[
                ("FN_LISTEN_ADDR", "127.0.0.1"),
                ("FN_GRPC_PORT", &free_port()?.to_string()),
                ("FN_METRICS_PORT", &taken_port.to_string()),
                ("FN_FUNCTIONS_DIR", &functions_dir),
                ("FN_MAX_MEMORY_MB", "256"),
            ]),
        ]),
    )
    .await?;
    ensure!(status.code() == Some(1), "{status:?}: {stderr}");
    ensure!(
        stderr.contains("error: FN_METRICS_PORT: cannot listen on 127.0.0.1:"),
        "{stderr}"
    );
    drop(taken);
    Ok(())
}
