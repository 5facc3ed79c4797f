//! A dataplane on this machine: pure-runners, an lb-agent in front of them and, optionally,
//! an npm between them (`static` control plane over the runners' addresses), all over mutual
//! TLS with certificates made for the test.
//!
//! A runner can be killed (`SIGKILL`) and restarted on the same address, and one runner can
//! be started inside a [`Netns`] so that the test can cut it off. Everything is killed on
//! drop (the [`Daemon`] handles), and the temporary directories go with the cluster.

use std::path::PathBuf;
use std::time::Duration;

use ::http::Method;
use anyhow::{Context, ensure};
use bytes::Bytes;
use fn_protocol::runner::RunnerStatus;
use nix::sys::signal::Signal;

use crate::http::{self, Reply};
use crate::netns::Netns;
use crate::{Certs, Daemon, Stderr, env, free_port, merge};

/// Bound for a daemon to become ready.
pub const READY: Duration = Duration::from_secs(20);

/// What to start.
#[derive(Debug, Clone)]
pub struct Setup {
    /// How many pure-runners.
    pub runners: usize,
    /// Each runner's `FN_MAX_MEMORY_MB`.
    pub runner_memory_mb: u64,
    /// `FN_PLACER` of the lb-agent: `warm` unless a test needs another (the lb-agent's own
    /// default, so that the system tests run what a deployment runs).
    pub placer: String,
    /// The function catalog (TOML).
    pub catalog: String,
    /// `FN_MAX_REQUEST_BODY` of the lb-agent, when not the default.
    pub max_request_body: Option<u64>,
    /// Put an npm (static control plane over the runners) between the LB and the runners.
    pub npm: bool,
    /// More environment for the lb-agent (timeouts and such); wins over the defaults.
    pub lb_env: Vec<(String, String)>,
    /// More environment for the npm.
    pub npm_env: Vec<(String, String)>,
    /// More environment for every runner.
    pub runner_env: Vec<(String, String)>,
    /// Give every daemon its own `FN_METRICS_PORT` (addresses in [`Cluster::lb_metrics`],
    /// [`Npm::metrics`] and [`Runner::metrics`]).
    pub metrics: bool,
    /// Where the lb-agent's stderr goes.
    pub lb_stderr: Stderr,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            runners: 3,
            runner_memory_mb: 512,
            placer: "warm".into(),
            catalog: String::new(),
            max_request_body: None,
            npm: false,
            lb_env: Vec::new(),
            npm_env: Vec::new(),
            runner_env: Vec::new(),
            metrics: false,
            lb_stderr: Stderr::Log,
        }
    }
}

/// One pure-runner: its address stays when it is restarted.
#[derive(Debug)]
pub struct Runner {
    /// `None` while killed.
    daemon: Option<Daemon>,
    /// `host:port` the LB dials.
    pub address: String,
    /// `host:port` of its metrics endpoint (when [`Setup::metrics`]).
    pub metrics: Option<String>,
    env: Vec<(String, String)>,
    /// The network namespace it runs in, if any.
    netns: Option<String>,
    _sockets: tempfile::TempDir,
}

impl Runner {
    /// The running daemon.
    ///
    /// # Errors
    /// When the runner has been killed.
    pub fn daemon(&self) -> anyhow::Result<&Daemon> {
        self.daemon
            .as_ref()
            .with_context(|| format!("runner {} is not running", self.address))
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map_or_else(|| "(killed)".to_owned(), Daemon::log)
    }
}

/// The npm of a cluster (when [`Setup::npm`]).
#[derive(Debug)]
pub struct Npm {
    pub daemon: Daemon,
    /// `host:port` of its gRPC services.
    pub address: String,
    /// `host:port` of its metrics endpoint (when [`Setup::metrics`]).
    pub metrics: Option<String>,
}

/// Runners, an lb-agent and maybe an npm. Everything is killed on drop; field order is drop
/// order (the LB first, so that it does not see runners vanish).
#[derive(Debug)]
pub struct Cluster {
    pub lb: Daemon,
    pub npm: Option<Npm>,
    pub runners: Vec<Runner>,
    /// `host:port` of the lb-agent's HTTP front.
    pub http: String,
    /// `host:port` of the lb-agent's metrics endpoint (when [`Setup::metrics`]).
    pub lb_metrics: Option<String>,
    pub catalog: PathBuf,
    pub certs: Certs,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `setup.runners` runners on loopback, then the npm (if asked) and the LB, and
    /// waits until all of them are ready.
    ///
    /// # Errors
    /// When a daemon does not start or become ready, with its log.
    pub async fn start(setup: Setup) -> anyhow::Result<Cluster> {
        Self::start_with_netns(setup, None).await
    }

    /// Like [`Cluster::start`], with runner 0 inside `netns` (listening on its address).
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub async fn start_with_netns(setup: Setup, netns: Option<&Netns>) -> anyhow::Result<Cluster> {
        let ns_addr = netns.map(|n| n.address().to_string());
        let sans: Vec<&str> = ns_addr.iter().map(String::as_str).collect();
        let certs = Certs::with_sans(&sans)?;
        let client = certs.client()?;
        let dir = tempfile::tempdir()?;
        let functions_dir = fn_test_support::functions_dir().display().to_string();
        // One table of function uids for the cluster's runners, as for the runners of one
        // host; kept across a runner's restart.
        let uid_table = dir
            .path()
            .join("uids")
            .join("function-uids")
            .display()
            .to_string();
        let mut runners = Vec::new();
        for i in 0..setup.runners {
            let port = free_port()?;
            let (host, ns) = match (i, netns) {
                (0, Some(n)) => (n.address().to_string(), Some(n.name().to_owned())),
                _ => ("127.0.0.1".to_owned(), None),
            };
            // Short paths: unix socket names are limited to about 100 bytes.
            let sockets = tempfile::Builder::new().prefix("fnst").tempdir_in("/tmp")?;
            // Functions reach their own directory in it, and may not list the others.
            std::fs::set_permissions(
                sockets.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )?;
            let metrics_port = metrics_port(&setup)?;
            let vars = merge(&[
                &metrics_env(metrics_port),
                &certs.env(),
                &env(&[
                    ("FN_GRPC_PORT", &port.to_string()),
                    ("FN_LISTEN_ADDR", &host),
                    ("FN_FUNCTIONS_DIR", &functions_dir),
                    ("FN_SOCKET_DIR", &sockets.path().display().to_string()),
                    (
                        "FN_DOCKER_IOFS_DIR",
                        &sockets.path().join("iofs").display().to_string(),
                    ),
                    ("FN_MAX_MEMORY_MB", &setup.runner_memory_mb.to_string()),
                    ("FN_SHUTDOWN_TIMEOUT", "2s"),
                    ("FN_FUNCTION_UID_TABLE", &uid_table),
                    // Tests tell instances apart by the pid functions report (X-Fn-Pid) and
                    // find them in /proc by it; in a PID namespace of its own every instance
                    // is pid 2. The isolation tests turn namespaces on.
                    ("FN_FUNCTION_NAMESPACES", "false"),
                ]),
                &setup.runner_env,
            ]);
            let daemon = Daemon::spawn_in(ns.as_deref(), "pure-runner", &vars)?;
            runners.push(Runner {
                daemon: Some(daemon),
                address: format!("{host}:{port}"),
                metrics: metrics_port.map(|p| format!("{host}:{p}")),
                env: vars,
                netns: ns,
                _sockets: sockets,
            });
        }
        for runner in &mut runners {
            let address = runner.address.clone();
            if let Some(daemon) = runner.daemon.as_mut() {
                daemon.wait_grpc_serving(&client, &address, READY).await?;
            }
        }
        let addresses: Vec<&str> = runners.iter().map(|r| r.address.as_str()).collect();
        let addresses = addresses.join(",");

        let npm = if setup.npm {
            let port = free_port()?;
            let address = format!("127.0.0.1:{port}");
            let metrics_port = metrics_port(&setup)?;
            let vars = merge(&[
                &metrics_env(metrics_port),
                &certs.env(),
                &env(&[
                    ("FN_GRPC_PORT", &port.to_string()),
                    ("FN_LISTEN_ADDR", "127.0.0.1"),
                    ("FN_CONTROL_PLANE", "static"),
                    ("FN_RUNNER_ADDRESSES", &addresses),
                    ("FN_RUNNER_MEMORY_MB", &setup.runner_memory_mb.to_string()),
                    ("FN_MIN_RUNNERS", &setup.runners.to_string()),
                    ("FN_MAX_RUNNERS", &setup.runners.to_string()),
                    ("FN_SCALE_INTERVAL", "200ms"),
                    ("FN_SHUTDOWN_TIMEOUT", "5s"),
                ]),
                &setup.npm_env,
            ]);
            let mut daemon = Daemon::spawn("npm", &vars)?;
            daemon.wait_grpc_serving(&client, &address, READY).await?;
            Some(Npm {
                daemon,
                address,
                metrics: metrics_port.map(|p| format!("127.0.0.1:{p}")),
            })
        } else {
            None
        };

        let catalog = dir.path().join("functions.toml");
        std::fs::write(&catalog, &setup.catalog)?;
        let port = free_port()?;
        let http = format!("127.0.0.1:{port}");
        let upstream = match &npm {
            Some(npm) => ("FN_NPM_ADDRESS", npm.address.clone()),
            None => ("FN_RUNNER_ADDRESSES", addresses.clone()),
        };
        let mut defaults = env(&[
            ("FN_PORT", &port.to_string()),
            ("FN_LISTEN_ADDR", "127.0.0.1"),
            ("FN_FUNCTIONS_FILE", &catalog.display().to_string()),
            (upstream.0, &upstream.1),
            ("FN_PLACER", &setup.placer),
            ("FN_PLACER_TIMEOUT", "10s"),
            ("FN_SHUTDOWN_TIMEOUT", "2s"),
            // Tests that stop the LB want it gone at once; the drain delay has its own test.
            ("FN_DRAIN_DELAY", "0s"),
            ("FN_ADVERTISE_INTERVAL", "200ms"),
        ]);
        if let Some(max) = setup.max_request_body {
            defaults.push(("FN_MAX_REQUEST_BODY".into(), max.to_string()));
        }
        let lb_metrics_port = metrics_port(&setup)?;
        let vars = merge(&[
            &metrics_env(lb_metrics_port),
            &certs.env(),
            &defaults,
            &setup.lb_env,
        ]);
        let mut lb = Daemon::spawn_with(None, "lb-agent", &vars, setup.lb_stderr)?;
        lb.wait_http_health(&http, READY).await?;
        Ok(Cluster {
            lb,
            npm,
            runners,
            http,
            lb_metrics: lb_metrics_port.map(|p| format!("127.0.0.1:{p}")),
            catalog,
            certs,
            _dir: dir,
        })
    }

    /// `POST path` with `body` through the LB.
    ///
    /// # Errors
    /// On connection or protocol failure.
    pub async fn call(&self, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        http::request(&self.http, Method::POST, path, &[], body.into()).await
    }

    /// Index of the runner whose child process `pid` is.
    ///
    /// # Errors
    /// When `pid` is gone or not a runner's child.
    pub fn runner_of(&self, pid: u32) -> anyhow::Result<usize> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("function instance {pid} is gone"))?;
        // Fields after the parenthesised command name: state, ppid, ...
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("stat format")?;
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .context("no ppid")?
            .parse()?;
        self.runners
            .iter()
            .position(|r| r.pid() == Some(ppid))
            .with_context(|| format!("instance {pid} has parent {ppid}, not a runner"))
    }

    /// Logs of every daemon, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("--- lb-agent\n{}", self.lb.log());
        if let Some(npm) = &self.npm {
            out.push_str(&format!("--- npm\n{}", npm.daemon.log()));
        }
        for (i, r) in self.runners.iter().enumerate() {
            out.push_str(&format!("--- runner {i} ({})\n{}", r.address, r.log()));
        }
        out
    }

    /// Runner `i`'s `Status`.
    ///
    /// # Errors
    /// When it does not answer within 2 s.
    pub async fn status(&self, i: usize) -> anyhow::Result<RunnerStatus> {
        let tls = self.certs.client()?;
        let runner = self.runners.get(i).context("no such runner")?;
        crate::runner_status(&tls, &runner.address).await
    }

    /// Calls in flight on each runner, from its `Status`.
    ///
    /// # Errors
    /// When a runner does not answer.
    pub async fn in_flight(&self) -> anyhow::Result<Vec<u64>> {
        let mut counts = Vec::new();
        for i in 0..self.runners.len() {
            counts.push(self.status(i).await?.calls_in_flight);
        }
        Ok(counts)
    }

    /// Waits until no runner has a call in flight, at most `bound`.
    ///
    /// # Errors
    /// When calls are still in flight after `bound`.
    pub async fn wait_idle(&self, bound: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let counts = self.in_flight().await?;
            if counts.iter().all(|n| *n == 0) {
                return Ok(());
            }
            ensure!(
                start.elapsed() < bound,
                "calls still in flight after {bound:?}: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` runner `i` and waits for it to be gone.
    ///
    /// # Errors
    /// When it is not running or does not die within 5 s.
    pub async fn kill_runner(&mut self, i: usize) -> anyhow::Result<()> {
        let runner = self.runners.get_mut(i).context("no such runner")?;
        let mut daemon = runner
            .daemon
            .take()
            .with_context(|| format!("runner {i} is not running"))?;
        daemon.signal(Signal::SIGKILL)?;
        daemon.wait_exit(Duration::from_secs(5)).await?;
        Ok(())
    }

    /// Stops runner `i` with `SIGTERM` (it drains) and waits at most `bound` for it to exit.
    ///
    /// # Errors
    /// When it is not running or does not exit within `bound`.
    pub async fn stop_runner(
        &mut self,
        i: usize,
        bound: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let runner = self.runners.get_mut(i).context("no such runner")?;
        let mut daemon = runner
            .daemon
            .take()
            .with_context(|| format!("runner {i} is not running"))?;
        daemon.signal(Signal::SIGTERM)?;
        daemon.wait_exit(bound).await
    }

    /// Starts runner `i` again, on the same address with the same environment, and waits
    /// until it serves.
    ///
    /// # Errors
    /// When it is still running, or does not become ready.
    pub async fn restart_runner(&mut self, i: usize) -> anyhow::Result<()> {
        let client = self.certs.client()?;
        let runner = self.runners.get_mut(i).context("no such runner")?;
        ensure!(runner.daemon.is_none(), "runner {i} is still running");
        let mut daemon = Daemon::spawn_in(runner.netns.as_deref(), "pure-runner", &runner.env)?;
        daemon
            .wait_grpc_serving(&client, &runner.address, READY)
            .await?;
        runner.daemon = Some(daemon);
        Ok(())
    }
}

/// A metrics port for one daemon, when the setup asks for metrics.
fn metrics_port(setup: &Setup) -> anyhow::Result<Option<u16>> {
    setup.metrics.then(free_port).transpose()
}

/// `FN_METRICS_PORT` for `port`, or nothing.
fn metrics_env(port: Option<u16>) -> Vec<(String, String)> {
    port.map(|p| ("FN_METRICS_PORT".to_owned(), p.to_string()))
        .into_iter()
        .collect()
}
