//! Partition: the lb-agent cut off from one of three runners, with packets silently dropped
//! (no reset, no ICMP error), must move each call on within its bounded connect /
//! acknowledge timeout (`FN_RUNNER_CONNECT_TIMEOUT`, `FN_RUNNER_ACK_TIMEOUT`), not the whole
//! call deadline (30 s here) or the placer timeout (20 s here).
//!
//! The cut-off runner runs inside a network namespace the test makes (`ip netns add`, a veth
//! pair with a private /30; see `fn_system_tests::netns`); dropping is a blackhole route
//! inside that namespace for the host's address. Traffic only flows between the host and
//! that namespace. The namespace, its veth and anything still running in it are removed when
//! the test ends, also when it fails. Needs root and `ip` (iproute2).
//!
//! Phases, each with every call checked:
//! 1. partitioned before the LB ever connected: the first call to that runner waits for the
//!    connect timeout, then goes elsewhere; later calls skip it at once (placeholder);
//! 2. healed: the LB's probe finds the runner and calls land on it again;
//! 3. partitioned with the connection up and a call in flight on it: the next `TryCall` on
//!    that connection gets no acknowledgement and moves on after the ack timeout; the call
//!    in flight ends (502) once HTTP/2 keepalive gives up on the connection, well before its
//!    own 30 s deadline;
//! 4. healed again: the runner is used again.

use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, ensure};
use bytes::Bytes;
use fn_system_tests::cluster::{Cluster, Setup};
use fn_system_tests::env;
use fn_system_tests::http;
use fn_system_tests::netns::Netns;
use fn_system_tests::report::{Ledger, Report};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const ACK_TIMEOUT: Duration = Duration::from_millis(500);
/// Most a call may take while a runner is cut off: one connect + acknowledge bound (the
/// LB's handshake bound) plus the call itself and scheduling slack on a busy debug build.
const MOVE_ON_BOUND: Duration = Duration::from_millis(2500);
/// Bound for a call in flight on a cut-off connection to end: the LB's HTTP/2 keepalive
/// (10 s interval, 5 s timeout) plus slack — far below the function's 30 s timeout.
const DEAD_CONNECTION_BOUND: Duration = Duration::from_secs(22);

const CATALOG: &str = r#"
[[functions]]
app = "part"
name = "echo"
route = "/echo"
command = ["fn-echo"]
memory_mb = 64
timeout = "30s"

[[functions]]
app = "part"
name = "sleep"
route = "/sleep"
command = ["fn-sleep"]
memory_mb = 64
timeout = "30s"
"#;

/// One echo call: checks the body, returns the runner that served it and the latency.
async fn echo(cluster: &Cluster, i: usize) -> anyhow::Result<(usize, Duration)> {
    let body = format!("partition call {i}");
    let started = Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(35),
        http::request(
            &cluster.http,
            Method::POST,
            "/r/part/echo",
            &[],
            Bytes::from(body.clone()),
        ),
    )
    .await
    .context("echo call hung")??;
    let took = started.elapsed();
    ensure!(
        reply.status == 200 && reply.text() == body,
        "call {i}: {} {:?} after {took:?}",
        reply.status,
        reply.text()
    );
    let pid = reply.fn_pid()?;
    Ok((cluster.runner_of(pid)?, took))
}

/// `calls` echo calls, `concurrency` at a time; all must succeed. Enters them in `ledger`.
async fn burst(
    cluster: &Cluster,
    calls: usize,
    concurrency: usize,
    ledger: &mut Ledger,
) -> anyhow::Result<Vec<(usize, Duration)>> {
    let mut results = Vec::new();
    for chunk in (0..calls).collect::<Vec<_>>().chunks(concurrency) {
        let batch = chunk.iter().map(|i| echo(cluster, *i));
        for (i, result) in futures::future::join_all(batch)
            .await
            .into_iter()
            .enumerate()
        {
            ledger.sent();
            match result {
                Ok((runner, took)) => {
                    ledger.ok(took);
                    results.push((runner, took));
                }
                Err(e) => {
                    ledger.error("failed", Duration::ZERO);
                    return Err(e.context(format!("call {} of the burst", chunk[i])));
                }
            }
        }
    }
    Ok(results)
}

/// Calls until one lands on runner `target`, at most `bound`.
async fn wait_used(
    cluster: &Cluster,
    target: usize,
    bound: Duration,
    ledger: &mut Ledger,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut i = 0;
    loop {
        i += 1;
        ledger.sent();
        let (runner, took) = echo(cluster, i).await?;
        ledger.ok(took);
        if runner == target {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < bound,
            "runner {target} not used again within {bound:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_moves_on_within_the_connect_and_ack_timeouts_when_a_runner_is_cut_off()
-> anyhow::Result<()> {
    let mut netns = Netns::new()?;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let cluster = Cluster::start_with_netns(
        Setup {
            runners: 3,
            runner_memory_mb: 1024,
            placer: "naive".into(),
            catalog: CATALOG.into(),
            lb_env: env(&[
                ("FN_RUNNER_CONNECT_TIMEOUT", &ms(CONNECT_TIMEOUT)),
                ("FN_RUNNER_ACK_TIMEOUT", &ms(ACK_TIMEOUT)),
                ("FN_PLACER_TIMEOUT", "20s"),
            ]),
            ..Setup::default()
        },
        Some(&netns),
    )
    .await?;
    let cut = 0; // the runner inside the namespace
    let mut report = Report::new("partition", "runner_cut_off");

    // 1. Cut off before the LB ever dialled it.
    netns.drop_packets()?;
    let mut first = Ledger::new();
    let results = burst(&cluster, 30, 6, &mut first).await?;
    report.case("cut off before connecting", &first);
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    ensure!(
        results.iter().all(|(runner, _)| *runner != cut),
        "a call was served by the cut-off runner"
    );
    ensure!(
        slowest <= MOVE_ON_BOUND,
        "a call took {slowest:?} with a runner cut off (bound {MOVE_ON_BOUND:?})\n{}",
        cluster.lb.log()
    );
    ensure!(
        cluster
            .lb
            .logs_within("runner unreachable", Duration::from_secs(2))
            .await,
        "the LB never tried the cut-off runner\n{}",
        cluster.lb.log()
    );

    // 2. Healed: used again once the probe answers.
    netns.restore()?;
    let mut healed = Ledger::new();
    let back = wait_used(&cluster, cut, Duration::from_secs(15), &mut healed).await?;
    report.case("healed", &healed);

    // 3. Cut off with the connection up and a slow call in flight on it. With the naive
    // placer and nothing else running, consecutive calls go round the three runners, so
    // one of three slow calls lands on the namespace's runner.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let address = cluster.http.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let reply = tokio::time::timeout(
                    Duration::from_secs(40),
                    http::request(&address, Method::POST, "/r/part/sleep", &[], "6000".into()),
                )
                .await;
                (reply, started.elapsed())
            })
        })
        .collect();
    let start = Instant::now();
    while cluster.status(cut).await?.calls_in_flight == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "no slow call reached the runner in the namespace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    netns.drop_packets()?;
    let cut_at = Instant::now();
    let mut again = Ledger::new();
    let results = burst(&cluster, 30, 6, &mut again).await?;
    report.case("cut off with the connection up", &again);
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    ensure!(
        results.iter().all(|(runner, _)| *runner != cut),
        "a call was served by the cut-off runner"
    );
    ensure!(
        slowest <= MOVE_ON_BOUND,
        "a call took {slowest:?} with the runner cut off mid-connection (bound \
         {MOVE_ON_BOUND:?})\n{}",
        cluster.lb.log()
    );

    let mut in_flight = Ledger::new();
    let mut statuses = Vec::new();
    for call in slow {
        let (reply, took) = call.await?;
        in_flight.sent();
        match reply {
            Ok(Ok(r)) if r.status == 200 && r.text() == "slept 6000ms" => in_flight.ok(took),
            Ok(Ok(r)) => {
                in_flight.error(format!("http {}", r.status), took);
                statuses.push((r.status, Instant::now().duration_since(cut_at)));
            }
            Ok(Err(e)) => {
                in_flight.error("request failed", took);
                statuses.push((0, Instant::now().duration_since(cut_at)));
                eprintln!("slow call: {e:#}");
            }
            Err(_) => in_flight.error("hung", took),
        }
    }
    report.case("slow calls in flight at the cut", &in_flight);
    // Two slow calls ran on connected runners and must succeed. The one on the cut-off
    // runner must end with 502 within the keepalive bound — unless its answer had already
    // got through when the packets started to drop (a race with the cut, seen once in CI):
    // then it succeeded too, and only "nothing hung, nothing else failed" can be checked.
    ensure!(
        in_flight.ok_count() + statuses.len() as u64 == 3 && statuses.len() <= 1,
        "expected the slow calls on connected runners to succeed and at most the one on the \
         cut-off runner to fail: {:?}\n{}",
        in_flight.errors(),
        cluster.logs()
    );
    if let Some(&(status, after)) = statuses.first() {
        ensure!(
            status == 502 && after <= DEAD_CONNECTION_BOUND,
            "the call on the cut-off connection ended with {status} {after:?} after the cut"
        );
    } else {
        report.note("the slow call on the cut-off runner answered before the cut took effect");
    }

    // 4. Healed again.
    netns.restore()?;
    let mut healed_again = Ledger::new();
    let back_again = wait_used(&cluster, cut, Duration::from_secs(15), &mut healed_again).await?;
    report.case("healed again", &healed_again);
    report.note(format!(
        "connect timeout {CONNECT_TIMEOUT:?}, ack timeout {ACK_TIMEOUT:?}; function timeout 30 \
         s, placer timeout 20 s; runner used again {back:?} and {back_again:?} after healing; \
         the call in flight on the cut connection ended {:?} after the cut",
        statuses.first()
    ));
    report.publish();
    drop(cluster);
    drop(netns);
    Ok(())
}
