//! The elastic dataplane with real binaries: an npm with the `process` control plane (it
//! spawns local pure-runners) and an lb-agent fed by it, starting with no runners.
//!
//! - calls arrive → runners are spawned → every call succeeds;
//! - load stops → runners drain and are removed, with no failed call on the way;
//! - the npm is killed during load → the LB keeps serving from its last known list;
//! - the npm is restarted on the same state directory → it adopts the runners and spawns
//!   none;
//! - the npm is stopped while it is still starting runners → none of them is left behind;
//! - the npm is killed while it is starting runners and restarted → the restarted npm takes
//!   them over (none is left running unrecorded).
//!
//! The npm's runners are found through its state directory (one `<id>.runner` record per
//! runner) and through their environment: a runner carries the test's certificate paths and
//! `FN_SOCKET_DIR=/tmp/fn-<id>`, its functions `FN_LISTENER=unix:/tmp/fn-<id>/...`. Each test
//! checks that none of them, and no socket directory, is left at its end, and a [`Reaper`]
//! stops whatever a failing test left.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fn_system_tests::{Certs, Daemon, env, free_port, http, merge, runner_with_uid_table};
use fn_tls::TlsMode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const READY: Duration = Duration::from_secs(20);
/// Bound for the npm to stop (it stops its runners first).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(20);
/// Bound for any scaling step to be seen.
const SCALE_BOUND: Duration = Duration::from_secs(20);
const MAX_RUNNERS: usize = 4;
const SCALE_DOWN_DELAY: &str = "2s";

/// One npm + lb-agent setup on loopback. Field order is drop order: the daemons are
/// killed first, then the reaper stops what they left, then the directories go.
struct Cluster {
    lb: Daemon,
    npm: Daemon,
    reaper: Reaper,
    npm_env: Vec<(String, String)>,
    npm_address: String,
    lb_address: String,
    tls: TlsMode,
    _catalog_dir: tempfile::TempDir,
    _state_dir: tempfile::TempDir,
    /// The runner executable the npm starts, and the runners' table of function uids.
    _runner_dir: tempfile::TempDir,
    _certs: Certs,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        Self::start_with(&fn_test_support::workspace_bin("pure-runner")).await
    }

    /// A cluster whose npm spawns `runner_binary` as its runners.
    async fn start_with(runner_binary: &Path) -> anyhow::Result<Cluster> {
        Self::start_with_intervals(runner_binary, "200ms", "200ms").await
    }

    /// Like [`Cluster::start_with`], with the npm's `FN_SCALE_INTERVAL` and the LB's
    /// `FN_ADVERTISE_INTERVAL`.
    async fn start_with_intervals(
        runner_binary: &Path,
        scale_interval: &str,
        advertise_interval: &str,
    ) -> anyhow::Result<Cluster> {
        let certs = Certs::new()?;
        let tls = certs.client()?;
        let state_dir = tempfile::tempdir()?;
        let state = state_dir.path().to_path_buf();
        let runner_dir = tempfile::tempdir()?;
        let runner_binary = runner_with_uid_table(runner_dir.path(), runner_binary)?;
        let reaper = Reaper {
            state: state.clone(),
            certs: certs.dir().display().to_string(),
            seen: Mutex::new(BTreeSet::new()),
        };

        let npm_port = free_port()?;
        let npm_address = format!("127.0.0.1:{npm_port}");
        let npm_env = merge(&[
            &certs.env(),
            &env(&[
                ("FN_GRPC_PORT", &npm_port.to_string()),
                ("FN_LISTEN_ADDR", "127.0.0.1"),
                ("FN_CONTROL_PLANE", "process"),
                ("FN_RUNNER_BINARY", &runner_binary.display().to_string()),
                (
                    "FN_RUNNER_FUNCTIONS_DIR",
                    &fn_test_support::functions_dir().display().to_string(),
                ),
                ("FN_RUNNER_STATE_DIR", &state.display().to_string()),
                ("FN_RUNNER_MEMORY_MB", "256"),
                ("FN_MAX_RUNNERS", &MAX_RUNNERS.to_string()),
                ("FN_SCALE_DOWN_DELAY", SCALE_DOWN_DELAY),
                ("FN_SCALE_INTERVAL", scale_interval),
                ("FN_LB_PURGE_AFTER", "3s"),
                ("FN_MAX_DRAIN_TIME", "20s"),
                ("FN_SHUTDOWN_TIMEOUT", "15s"),
            ]),
        ]);
        let npm = start_npm(&npm_env, &tls, &npm_address).await?;

        let catalog_dir = tempfile::tempdir()?;
        let catalog = catalog_dir.path().join("functions.toml");
        std::fs::write(
            &catalog,
            r#"
[[functions]]
app = "t"
name = "sleep"
route = "/sleep"
command = ["fn-sleep"]
memory_mb = 128
timeout = "30s"
idle_timeout = "30s"
"#,
        )?;
        let lb_port = free_port()?;
        let lb_address = format!("127.0.0.1:{lb_port}");
        let mut lb = Daemon::spawn(
            "lb-agent",
            &merge(&[
                &certs.env(),
                &env(&[
                    ("FN_PORT", &lb_port.to_string()),
                    ("FN_LISTEN_ADDR", "127.0.0.1"),
                    ("FN_NPM_ADDRESS", &npm_address),
                    ("FN_FUNCTIONS_FILE", &catalog.display().to_string()),
                    ("FN_ADVERTISE_INTERVAL", advertise_interval),
                    ("FN_PLACER_TIMEOUT", "15s"),
                    ("FN_SHUTDOWN_TIMEOUT", "5s"),
                    ("FN_DRAIN_DELAY", "0s"),
                ]),
            ]),
        )?;
        lb.wait_http_health(&lb_address, READY).await?;
        Ok(Cluster {
            lb,
            npm,
            reaper,
            npm_env,
            npm_address,
            lb_address,
            tls,
            _catalog_dir: catalog_dir,
            _state_dir: state_dir,
            _runner_dir: runner_dir,
            _certs: certs,
        })
    }

    /// `POST /r/t/sleep` sleeping `millis`; the status (0 when the request itself failed).
    async fn call(address: &str, millis: u64) -> u16 {
        match http::request(
            address,
            ::http::Method::POST,
            "/r/t/sleep",
            &[],
            Bytes::from(millis.to_string()),
        )
        .await
        {
            Ok(reply) if reply.status == 200 && reply.text() == format!("slept {millis}ms") => 200,
            Ok(reply) if reply.status == 200 => {
                eprintln!("200 with a wrong body: {:?}", reply.text());
                1
            }
            Ok(reply) => {
                eprintln!("call failed: {} {}", reply.status, reply.text());
                reply.status
            }
            Err(e) => {
                eprintln!("call failed: {e:#}");
                0
            }
        }
    }

    async fn call_owned(address: String, millis: u64) -> u16 {
        Self::call(&address, millis).await
    }

    /// `n` concurrent calls; their statuses.
    async fn burst(&self, n: usize, millis: u64) -> Vec<u16> {
        let calls = (0..n).map(|_| Self::call(&self.lb_address, millis));
        futures::future::join_all(calls).await
    }

    /// Starts `workers` loops of back-to-back calls, until [`Trickle::stop`].
    fn trickle(&self, workers: usize, millis: u64) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let ok = Arc::clone(&ok);
                let address = self.lb_address.clone();
                tokio::spawn(async move {
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match Self::call(&address, millis).await {
                            200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            status => failed.push(status),
                        }
                    }
                    failed
                })
            })
            .collect();
        Trickle { stop, ok, tasks }
    }

    /// The runners the npm has recorded.
    fn records(&self) -> anyhow::Result<Vec<Record>> {
        self.reaper.records()
    }

    /// Waits until `done` holds for the records, at most `bound`; returns how long it took.
    async fn wait_records(
        &self,
        what: &str,
        bound: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let records = self.records()?;
            if done(&records) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > bound {
                bail!(
                    "{what}: not after {bound:?}; records {records:?}; npm log:\n{}",
                    self.npm.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The runner list the npm publishes for the `default` group.
    async fn published(&self) -> anyhow::Result<Vec<String>> {
        fn_system_tests::published_runners(&self.tls, &self.npm_address, "default").await
    }

    /// SIGTERMs the lb-agent and expects exit 0.
    async fn stop_lb(&mut self) -> anyhow::Result<()> {
        self.lb.signal(Signal::SIGTERM)?;
        let status = self.lb.wait_exit(SHUTDOWN_BOUND).await?;
        ensure!(
            status.success(),
            "lb-agent exited with {status}; log:\n{}",
            self.lb.log()
        );
        Ok(())
    }

    /// SIGTERMs the npm, expects exit 0, and checks that it stopped every runner.
    async fn stop_npm(&mut self) -> anyhow::Result<()> {
        self.npm.signal(Signal::SIGTERM)?;
        let status = self.npm.wait_exit(SHUTDOWN_BOUND).await?;
        ensure!(
            status.success(),
            "npm exited with {status}; log:\n{}",
            self.npm.log()
        );
        self.reaper.assert_none_left(Duration::from_secs(5)).await
    }
}

async fn start_npm(
    npm_env: &[(String, String)],
    tls: &TlsMode,
    address: &str,
) -> anyhow::Result<Daemon> {
    let mut npm = Daemon::spawn("npm", npm_env)?;
    npm.wait_grpc_serving(tls, address, READY).await?;
    Ok(npm)
}

/// Back-to-back calls running in the background.
struct Trickle {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Trickle {
    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `more` further calls have succeeded (the LB is serving), at most `bound`.
    async fn wait_ok(&self, more: usize, bound: Duration) -> anyhow::Result<()> {
        let target = self.ok() + more;
        let start = Instant::now();
        while self.ok() < target {
            ensure!(
                start.elapsed() < bound,
                "only {} of {target} calls succeeded within {bound:?}",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the workers; the statuses of the calls that did not succeed, and the count of
    /// those that did.
    async fn stop(self) -> anyhow::Result<(Vec<u16>, usize)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut failed = Vec::new();
        for task in self.tasks {
            failed.extend(
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .context("trickle worker did not stop")??,
            );
        }
        Ok((failed, self.ok.load(Ordering::SeqCst)))
    }
}

/// One `<id>.runner` record: `id address group created_unix_ms pid`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Record {
    id: String,
    pid: u32,
}

fn read_records(state: &Path) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("runner") {
            continue;
        }
        // A record being written may be empty for an instant; skip it this time.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        if let [id, _address, _group, _created, pid] = fields[..] {
            out.push(Record {
                id: id.to_owned(),
                pid: pid.parse()?,
            });
        }
    }
    out.sort();
    Ok(out)
}

/// The addresses of the runners recorded in `state` (`id address group created pid`).
fn runner_addresses(state: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("runner")
            && let Ok(text) = std::fs::read_to_string(&path)
            && let Some(address) = text.split_whitespace().nth(1)
        {
            out.push(address.to_owned());
        }
    }
    Ok(out)
}

/// The calls in flight on the runners at `addresses`, from their `Status`.
async fn calls_in_flight(tls: &TlsMode, addresses: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for address in addresses {
        total += fn_system_tests::runner_status(tls, address)
            .await?
            .calls_in_flight;
    }
    Ok(total)
}

fn ids(records: &[Record]) -> BTreeSet<String> {
    records.iter().map(|r| r.id.clone()).collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// A runner's socket directory (the npm runs with no `TMPDIR`).
fn socket_dir(id: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/fn-{id}"))
}

/// Finds and stops every process the npm of one test started: runners and their function
/// instances. Used at the end of each test (which then asserts that there was none) and on
/// drop (a failing test leaves nothing behind).
struct Reaper {
    state: PathBuf,
    /// The test's certificate directory: runners get `FN_NODE_CERT=<certs>/node.pem`.
    certs: String,
    /// Every runner id seen (records or processes), to find their functions and socket
    /// directories after the runner itself is gone.
    seen: Mutex<BTreeSet<String>>,
}

impl Reaper {
    fn records(&self) -> anyhow::Result<Vec<Record>> {
        let records = read_records(&self.state)?;
        let mut seen = self.seen.lock().expect("lock");
        seen.extend(records.iter().map(|r| r.id.clone()));
        // Every runner the npm spawns gets a log file `<id>.log` before it starts, and the
        // file stays after the runner is removed.
        for entry in std::fs::read_dir(&self.state)?.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("log")
                && let Some(id) = path.file_stem().and_then(|s| s.to_str())
            {
                seen.insert(id.to_owned());
            }
        }
        Ok(records)
    }

    /// Live runner and function processes of this test's npm.
    fn processes(&self) -> Vec<u32> {
        // Records first: they name runners that may already have left the process table.
        self.records().ok();
        let cert = format!("FN_NODE_CERT={}/node.pem", self.certs);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let environs: Vec<(u32, Vec<String>)> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != std::process::id() && alive(*pid))
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                let vars = raw
                    .split(|b| *b == 0)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect();
                Some((pid, vars))
            })
            .collect();
        let mut found = Vec::new();
        let mut seen = self.seen.lock().expect("lock");
        // Runners: this test's certificates and a socket directory (the npm and the LB
        // have the certificates but no socket directory).
        for (pid, vars) in &environs {
            let dir = vars
                .iter()
                .find_map(|v| v.strip_prefix("FN_SOCKET_DIR=/tmp/fn-"));
            if let Some(id) = dir
                && vars.contains(&cert)
            {
                seen.insert(id.to_owned());
                found.push(*pid);
            }
        }
        // Functions: listening in the socket directory of one of those runners.
        for (pid, vars) in &environs {
            let listener = vars
                .iter()
                .find_map(|v| v.strip_prefix("FN_LISTENER=unix:/tmp/fn-"));
            if let Some(path) = listener
                && seen.iter().any(|id| path.starts_with(&format!("{id}/")))
            {
                found.push(*pid);
            }
        }
        found
    }

    /// Checks that no such process, record or socket directory is left (waiting up to
    /// `bound` for exits under way).
    async fn assert_none_left(&self, bound: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let left = self.processes();
            let records = self.records()?;
            let dirs: Vec<PathBuf> = self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .map(|id| socket_dir(id))
                .filter(|d| d.exists())
                .collect();
            if left.is_empty() && records.is_empty() && dirs.is_empty() {
                return Ok(());
            }
            if start.elapsed() > bound {
                let logs: Vec<String> = records
                    .iter()
                    .map(|r| {
                        let log = self.state.join(format!("{}.log", r.id));
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        format!("{} (pid {}, alive {}):\n{text}", r.id, r.pid, alive(r.pid))
                    })
                    .collect();
                bail!(
                    "left behind: processes {left:?}, records {records:?}, socket dirs \
                     {dirs:?}; runner logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to everything left, SIGKILL to what ignores it for 10 s; then the socket
    /// directories go.
    fn reap(&self) {
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            eprintln!("reaper: {signal} to {left:?}");
            for pid in left {
                if let Ok(raw) = i32::try_from(pid) {
                    // Gone already is fine.
                    kill(Pid::from_raw(raw), signal).ok();
                }
            }
            let start = Instant::now();
            while !self.processes().is_empty() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for id in self.seen.lock().expect("lock").iter() {
            // Already removed by the npm, normally.
            std::fs::remove_dir_all(socket_dir(id)).ok();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.reap();
    }
}

fn assert_all_ok(statuses: &[u16]) {
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
}

/// Scale from zero is event-driven: with the LB's adverts and the npm's control loop both
/// 30 s apart, the first call after zero is still answered within seconds. The LB tells the
/// npm as soon as demand rises from zero, and the npm acts on it at once; waiting for the
/// ticks would take at least 30 s and end in 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_call_after_zero_waits_for_no_tick() -> anyhow::Result<()> {
    let mut cluster =
        Cluster::start_with_intervals(&fn_test_support::workspace_bin("pure-runner"), "30s", "30s")
            .await?;
    assert!(cluster.records()?.is_empty(), "no runners at start");
    let start = Instant::now();
    let status = Cluster::call(&cluster.lb_address, 10).await;
    let took = start.elapsed();
    eprintln!("first call after zero answered after {took:?}");
    assert_eq!(status, 200, "npm log:\n{}", cluster.npm.log());
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}: the path waited for a tick\nnpm log:\n{}",
        cluster.npm.log()
    );
    cluster.stop_npm().await
}

/// A service manager that stops the npm's whole group (systemd's `KillMode=control-group`,
/// a terminal's Ctrl-C) signals each runner, and then the npm stopping its runners signals
/// them again: a call in flight still finishes. Before, a runner took the npm's SIGTERM for
/// an operator's second signal and exited at once, cutting the call.
#[tokio::test]
async fn a_call_in_flight_finishes_when_the_npm_and_its_runners_are_stopped_together()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // A first call spawns a runner and warms it; the second is the one in flight.
    assert_all_ok(&cluster.burst(1, 0).await);
    let records = cluster.records()?;
    ensure!(!records.is_empty(), "no runner after a call");
    let addresses = runner_addresses(&cluster.reaper.state)?;
    let in_flight = tokio::spawn(Cluster::call_owned(cluster.lb_address.clone(), 3000));
    // The call is at a runner (not still on its way, to be refused by a draining one).
    let start = Instant::now();
    while calls_in_flight(&cluster.tls, &addresses).await? == 0 {
        ensure!(start.elapsed() < READY, "the call never reached a runner");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for record in &records {
        let pid = i32::try_from(record.pid).context("pid")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    }
    // Each runner has taken the first signal (tokio merges deliveries it has not read yet,
    // and the npm's must come as a second one).
    for record in &records {
        let log = cluster.reaper.state.join(format!("{}.log", record.id));
        let start = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("shutdown requested")) {
            ensure!(
                start.elapsed() < READY,
                "{} never began its shutdown",
                record.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    cluster.npm.signal(Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(20), in_flight)
        .await
        .context("the call in flight never ended")??;
    assert_eq!(status, 200, "npm log:\n{}", cluster.npm.log());
    let exited = cluster.npm.wait_exit(SHUTDOWN_BOUND).await?;
    ensure!(
        exited.success(),
        "npm exited with {exited}; log:\n{}",
        cluster.npm.log()
    );
    cluster
        .reaper
        .assert_none_left(Duration::from_secs(5))
        .await?;
    cluster.stop_lb().await
}

#[tokio::test]
async fn calls_with_no_runners_at_start_get_runners_spawned_and_all_succeed() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start().await?;
    assert!(cluster.records()?.is_empty(), "no runners at start");
    assert!(cluster.reaper.processes().is_empty());

    // 20 calls at once, each 300 ms: 2560 MB wanted of 256 MB runners.
    let start = Instant::now();
    let first_ok = Arc::new(std::sync::Mutex::new(None));
    let calls = (0..20).map(|_| {
        let first_ok = Arc::clone(&first_ok);
        let address = cluster.lb_address.clone();
        async move {
            let status = Cluster::call(&address, 300).await;
            if status == 200 {
                first_ok
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(|| start.elapsed());
            }
            status
        }
    });
    let statuses = futures::future::join_all(calls).await;
    let all_done = start.elapsed();
    assert_all_ok(&statuses);
    let first_ok = first_ok.lock().expect("lock").unwrap_or_default();
    eprintln!("cold start: first call answered after {first_ok:?}, all 20 after {all_done:?}");

    let records = cluster.records()?;
    assert!(
        (1..=MAX_RUNNERS).contains(&records.len()),
        "runners spawned within the bounds: {records:?}"
    );
    for r in &records {
        assert!(alive(r.pid), "recorded runner {r:?} is not running");
    }
    // The reaper sees them (so its final "none left" means something), and the hot
    // function instances that served the calls.
    let processes = cluster.reaper.processes();
    for r in &records {
        assert!(processes.contains(&r.pid), "{r:?} not in {processes:?}");
    }
    assert!(
        processes.len() > records.len(),
        "no function instance found: {processes:?}"
    );
    let published = cluster.published().await?;
    assert_eq!(
        published.iter().cloned().collect::<BTreeSet<_>>(),
        ids(&records),
        "the npm publishes the runners it spawned"
    );

    cluster.stop_lb().await?;
    cluster.stop_npm().await
}

#[tokio::test]
async fn load_stops_runners_drain_and_are_removed_with_no_failed_call() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;

    // A burst scales the group to its maximum.
    let statuses = cluster.burst(16, 500).await;
    assert_all_ok(&statuses);
    cluster
        .wait_records("scaled up to the maximum", SCALE_BOUND, |r| {
            r.len() == MAX_RUNNERS
        })
        .await?;
    let at_peak = cluster.records()?;

    // A steady trickle needs one runner: the others drain and are removed under it.
    let trickle = cluster.trickle(2, 50);
    let down = cluster
        .wait_records("scaled down under a trickle", SCALE_BOUND, |r| r.len() == 1)
        .await?;
    eprintln!("scale-down from {MAX_RUNNERS} to 1 runner under load took {down:?}");
    trickle.wait_ok(20, SCALE_BOUND).await?;
    let (failed, ok) = trickle.stop().await?;
    assert!(
        failed.is_empty(),
        "failed calls while scaling down: {failed:?}"
    );
    assert!(ok >= 20, "the trickle kept running: {ok} calls");
    let kept = cluster.records()?;
    for gone in at_peak.iter().filter(|r| !kept.contains(r)) {
        assert!(!alive(gone.pid), "removed runner {gone:?} still runs");
    }

    // No load at all: the last runner goes too, and nothing of it is left.
    let to_zero = cluster
        .wait_records("scaled down to zero", SCALE_BOUND, <[Record]>::is_empty)
        .await?;
    eprintln!("scale-down from 1 to 0 runners without load took {to_zero:?}");
    cluster
        .reaper
        .assert_none_left(Duration::from_secs(5))
        .await?;
    assert!(cluster.published().await?.is_empty());
    // Nor the logs of the runners it removed (each with every line its functions wrote):
    // an npm that scaled up and down for long filled its state directory with them. (One
    // that failed to start keeps its log, named in the error.)
    let logs: Vec<PathBuf> = at_peak
        .iter()
        .map(|r| cluster.reaper.state.join(format!("{}.log", r.id)))
        .filter(|log| log.exists())
        .collect();
    assert!(
        at_peak.len() == MAX_RUNNERS && logs.is_empty(),
        "logs of removed runners left: {logs:?}"
    );

    // Demand again: the group scales back up from zero.
    assert_all_ok(&cluster.burst(4, 100).await);
    cluster.stop_lb().await?;
    cluster.stop_npm().await
}

#[tokio::test]
async fn npm_killed_during_load_lb_keeps_serving_and_a_restarted_npm_adopts_the_runners()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    assert_all_ok(&cluster.burst(12, 300).await);
    let trickle = cluster.trickle(2, 50);
    trickle.wait_ok(10, SCALE_BOUND).await?;

    // The npm dies (no shutdown: its runners stay up); the LB keeps its last list.
    cluster.npm.signal(Signal::SIGKILL)?;
    cluster.npm.wait_exit(SHUTDOWN_BOUND).await?;
    let before = cluster.records()?;
    assert!(!before.is_empty());
    for r in &before {
        assert!(alive(r.pid), "runner {r:?} died with the npm");
    }
    trickle.wait_ok(40, SCALE_BOUND).await?;
    assert_eq!(
        cluster.records()?,
        before,
        "nothing changes without the npm"
    );

    // Restarted on the same state directory: it adopts the runners, publishes all of them
    // (no drain before the LBs have advertised again) and spawns none.
    cluster.npm = start_npm(&cluster.npm_env, &cluster.tls, &cluster.npm_address).await?;
    let start = Instant::now();
    let published = loop {
        match cluster.published().await {
            Ok(list) => break list,
            Err(e) if start.elapsed() < READY => {
                eprintln!("restarted npm not answering GetLBGroup yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    };
    assert_eq!(
        published.iter().cloned().collect::<BTreeSet<_>>(),
        ids(&before),
        "the restarted npm's first list holds every adopted runner; log:\n{}",
        cluster.npm.log()
    );
    // Through a whole scale-down window and beyond, with the LB advertising again.
    trickle.wait_ok(40, SCALE_BOUND).await?;
    let window_end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < window_end {
        let now = cluster.records()?;
        assert!(
            ids(&now).is_subset(&ids(&before)),
            "the restarted npm spawned runners: before {before:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (failed, ok) = trickle.stop().await?;
    assert!(
        failed.is_empty(),
        "failed calls around the npm outage: {failed:?}"
    );
    eprintln!("{ok} calls succeeded across the npm kill and restart");
    assert_eq!(
        cluster.npm.log().matches("adopted a runner").count(),
        before.len(),
        "{}",
        cluster.npm.log()
    );

    cluster.stop_lb().await?;
    cluster.stop_npm().await
}

/// A runner executable that waits a second before it becomes the real `pure-runner` (same
/// process, same environment), so that the npm sees it alive but not answering health.
fn slow_runner(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("slow-runner");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nsleep 1\nexec '{}'\n",
            fn_test_support::workspace_bin("pure-runner").display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[tokio::test]
async fn npm_stopped_while_runners_start_leaves_none_behind() -> anyhow::Result<()> {
    let tools = tempfile::tempdir()?;
    let mut cluster = Cluster::start_with(&slow_runner(tools.path())?).await?;
    // Demand for every runner the group may have; stop the npm as soon as the first one
    // has been spawned (recorded), before it can answer health.
    let address = cluster.lb_address.clone();
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(Cluster::call_owned(address.clone(), 100)))
        .collect();
    cluster
        .wait_records("a runner spawned", SCALE_BOUND, |r| !r.is_empty())
        .await?;
    cluster.stop_npm().await?;
    for call in calls {
        call.abort();
    }
    cluster.stop_lb().await
}

#[tokio::test]
async fn npm_killed_while_runners_start_then_restarted_leaves_none_behind() -> anyhow::Result<()> {
    // Runners that take a second to answer health, so that the restarted npm finds them
    // alive but not yet serving.
    let tools = tempfile::tempdir()?;
    let mut cluster = Cluster::start_with(&slow_runner(tools.path())?).await?;

    let address = cluster.lb_address.clone();
    let calls: Vec<_> = (0..2)
        .map(|_| tokio::spawn(Cluster::call_owned(address.clone(), 100)))
        .collect();
    cluster
        .wait_records("a runner spawned", SCALE_BOUND, |r| !r.is_empty())
        .await?;
    cluster.npm.signal(Signal::SIGKILL)?;
    cluster.npm.wait_exit(SHUTDOWN_BOUND).await?;
    cluster.npm = start_npm(&cluster.npm_env, &cluster.tls, &cluster.npm_address).await?;
    for call in calls {
        assert_eq!(call.await?, 200);
    }
    cluster.stop_lb().await?;
    cluster.stop_npm().await
}
