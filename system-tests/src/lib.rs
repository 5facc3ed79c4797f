//! Harness for system tests: start the real binaries (built by `cargo build --workspace
//! --bins`) on loopback with generated certificates, wait for readiness, talk HTTP and
//! gRPC to them, stop them with signals.
//!
//! Every daemon is killed when its [`Daemon`] handle drops, so a failing test leaves no
//! process behind.
//!
//! Layout: [`cluster`] starts an lb-agent with pure-runners (and optionally an npm) and
//! kills or restarts them; [`netns`] makes a network namespace a runner can be cut off in;
//! [`load`] sends echo calls checked by hash; [`calls`] runs a fixed number of them from
//! concurrent workers, ledgered by payload size (the stress test and the `fn-load` tool);
//! [`report`] keeps the ledger of a reliability suite and prints its summary table;
//! [`http`] is a small HTTP/1.1 client, [`metrics`] reads Prometheus endpoints, [`zipf`] is
//! the placement workload of `fn-load --workload zipf`.

pub mod calls;
pub mod cluster;
pub mod hostile;
pub mod http;
pub mod load;
pub mod metrics;
pub mod netns;
pub mod report;
pub mod zipf;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fn_tls::dev::DevCa;
use fn_tls::{NodeTls, TlsMode};
use tokio::process::{Child, Command};

/// Certificates on disk for one test, and the matching in-process client identity.
#[derive(Debug)]
pub struct Certs {
    dir: tempfile::TempDir,
    /// The node certificate's extra names, for rotations.
    sans: Vec<String>,
}

impl Certs {
    /// A new CA and node certificate in a temporary directory.
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_sans(&[])
    }

    /// A new CA and a node certificate valid for `sans` (host names or IP addresses) besides
    /// the loopback names.
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn with_sans(sans: &[&str]) -> anyhow::Result<Self> {
        fn_tls::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        // The node key is readable by the daemons (root here) only, as an operator keeps a
        // key: functions run as other users and must not read it.
        fn_tls::dev::write_dev_pki(dir.path(), sans)?;
        let certs = Certs {
            dir,
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
        };
        Ok(certs)
    }

    /// The CA that signs node certificates now.
    ///
    /// # Errors
    /// When its files cannot be read.
    pub fn ca(&self) -> anyhow::Result<DevCa> {
        let read = |f: &str| {
            std::fs::read_to_string(self.dir.path().join(f)).with_context(|| f.to_owned())
        };
        Ok(DevCa::from_pem(
            &read(fn_tls::dev::files::ISSUER)?,
            &read(fn_tls::dev::files::ISSUER_KEY)?,
        )?)
    }

    /// Replaces the node certificate and key in place with new ones from the same CA.
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn rotate(&self) -> anyhow::Result<()> {
        Ok(fn_tls::dev::rotate_node(self.dir.path(), &self.sans())?)
    }

    /// Runs one step of a CA rollover in place.
    ///
    /// # Errors
    /// When generation or writing fails.
    pub fn rollover(&self, step: fn_tls::dev::RolloverStep) -> anyhow::Result<()> {
        Ok(fn_tls::dev::ca_rollover(
            self.dir.path(),
            step,
            &self.sans(),
        )?)
    }

    fn sans(&self) -> Vec<&str> {
        self.sans.iter().map(String::as_str).collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node's private key (`FN_NODE_CERT_KEY`), which functions must not read.
    pub fn key_path(&self) -> String {
        self.dir.path().join("node-key.pem").display().to_string()
    }

    /// The `FN_NODE_CERT*` variables pointing at these files.
    pub fn env(&self) -> Vec<(String, String)> {
        let p = |f: &str| self.dir.path().join(f).display().to_string();
        vec![
            ("FN_NODE_CERT".into(), p("node.pem")),
            ("FN_NODE_CERT_KEY".into(), self.key_path()),
            ("FN_NODE_CERT_AUTHORITY".into(), p("ca.pem")),
        ]
    }

    /// A client identity from the same files.
    ///
    /// # Errors
    /// When the files cannot be read.
    pub fn client(&self) -> anyhow::Result<TlsMode> {
        let read = |f: &str| std::fs::read(self.dir.path().join(f)).with_context(|| f.to_owned());
        Ok(TlsMode::Mutual(NodeTls::from_pem(
            read("node.pem")?,
            read("node-key.pem")?,
            read("ca.pem")?,
        )?))
    }
}

/// A free loopback port for a daemon to take, outside the range outgoing connections use
/// (see [`fn_lifecycle::ports`]).
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(fn_lifecycle::ports::free_port(
        std::net::Ipv4Addr::LOCALHOST.into(),
    )?)
}

/// Where a daemon's stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stderr {
    /// A log file ([`Daemon::log`]).
    #[default]
    Log,
    /// A pipe nobody reads, which fills as a stalled log driver's does ([`Daemon::log`] is
    /// then empty).
    Unread,
}

/// A running daemon. Killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts binary `bin` from the workspace's target directory with `env` (on top of a
    /// minimal environment: no inherited `FN_*` variables). Its stderr goes to a log file.
    /// A `pure-runner` gets a table of function uids (`FN_FUNCTION_UID_TABLE`) of its own,
    /// next to its log, unless `env` names one.
    ///
    /// # Errors
    /// When the binary cannot be started.
    pub fn spawn(bin: &str, env: &[(String, String)]) -> anyhow::Result<Daemon> {
        Self::spawn_in(None, bin, env)
    }

    /// Like [`Daemon::spawn`], inside network namespace `netns` when given (through `ip
    /// netns exec`, which execs the binary: the pid is the daemon's own).
    ///
    /// # Errors
    /// When the binary cannot be started.
    pub fn spawn_in(
        netns: Option<&str>,
        bin: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Daemon> {
        Self::spawn_with(netns, bin, env, Stderr::Log)
    }

    /// Like [`Daemon::spawn_in`], with its stderr going where `stderr` says.
    ///
    /// # Errors
    /// When the binary cannot be started.
    pub fn spawn_with(
        netns: Option<&str>,
        bin: &str,
        env: &[(String, String)],
        stderr: Stderr,
    ) -> anyhow::Result<Daemon> {
        let path = fn_test_support::workspace_bin(bin);
        let log_dir = tempfile::tempdir()?;
        let log = log_dir.path().join(format!("{bin}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new(netns::IP);
                cmd.args(["netns", "exec", ns]).arg(&path);
                cmd
            }
            None => Command::new(&path),
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("FN_LOG_LEVEL", "info");
        // The daemons' runtime follows the test run's `FN_WORKER_THREADS` and `FN_SHARDS`
        // when set (`FN_WORKER_THREADS=1 make test-system` runs them on the current-thread
        // runtime the compose stack uses, `FN_SHARDS=2` on two shards); a test's own
        // setting wins.
        for var in ["FN_WORKER_THREADS", "FN_SHARDS"] {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        if bin == "pure-runner" {
            // As root, a runner keeps the uid of each function in the host's table, in /run
            // unless told: one of the daemon's own, so that a test leaves nothing there and
            // shares nothing with another. A test's own setting wins (a cluster's runners
            // share one, as runners of a host do).
            cmd.env(
                "FN_FUNCTION_UID_TABLE",
                log_dir.path().join("uids").join("function-uids"),
            );
        }
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match stderr {
                Stderr::Log => Stdio::from(log_file),
                // The read end stays in the child handle, never read.
                Stderr::Unread => Stdio::piped(),
            })
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        Ok(Daemon {
            name: bin.to_owned(),
            child,
            log,
            _log_dir: log_dir,
        })
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the daemon logs `text` within `bound`: its lines reach the log file from a
    /// thread of their own, a moment after the event they tell of.
    pub async fn logs_within(&self, text: &str, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if self.log().contains(text) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to the daemon.
    ///
    /// # Errors
    /// When the daemon is gone.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("daemon already exited")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Waits for the daemon to exit, at most `bound`.
    ///
    /// # Errors
    /// When it does not exit in time (it is then killed).
    pub async fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                bail!(
                    "{} did not exit within {bound:?}; log:\n{}",
                    self.name,
                    self.log()
                )
            }
        }
    }

    /// Waits for the gRPC health service at `address` to report SERVING.
    ///
    /// # Errors
    /// When it does not within `bound`, with the daemon's log.
    pub async fn wait_grpc_serving(
        &mut self,
        tls: &TlsMode,
        address: &str,
        bound: Duration,
    ) -> anyhow::Result<()> {
        let ready = fn_test_support::wait_serving(tls, address, bound).await;
        self.check_ready(ready)
    }

    /// Waits for `GET /health` at `address` to answer 200.
    ///
    /// # Errors
    /// When it does not within `bound`, with the daemon's log.
    pub async fn wait_http_health(&mut self, address: &str, bound: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        let mut last = String::new();
        while start.elapsed() < bound {
            // Each check within what is left (at most 2 s): an LB that accepts and never
            // answers (a deadlock) must fail here, not hang the test.
            let left = bound.saturating_sub(start.elapsed());
            let check = left.clamp(Duration::from_millis(100), Duration::from_secs(2));
            match http::get_within(address, "/health", check).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("status {}", r.status),
                Err(e) => last = format!("{e:#}"),
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited with {status}; log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "{} /health not 200 after {bound:?}: {last}; log:\n{}",
            self.name,
            self.log()
        )
    }

    fn check_ready(&mut self, ready: anyhow::Result<()>) -> anyhow::Result<()> {
        if let Err(e) = ready {
            let exited = self.child.try_wait().ok().flatten();
            bail!(
                "{} not ready ({e:#}); exited: {exited:?}; log:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }
}

/// Runs `bin` to completion with `env` and returns its exit status and stderr.
///
/// # Errors
/// When it cannot be started or does not exit within 10 s.
pub async fn run_to_exit(
    bin: &str,
    env: &[(String, String)],
) -> anyhow::Result<(ExitStatus, String)> {
    let mut daemon = Daemon::spawn(bin, env)?;
    let status = daemon.wait_exit(Duration::from_secs(10)).await?;
    Ok((status, daemon.log()))
}

/// An executable in `dir` that runs `runner_binary` with a table of function uids in `dir`
/// (`FN_FUNCTION_UID_TABLE`), for runners an npm starts: it gives them none of the test's
/// environment, and the default table is the host's, in /run. The npm's runners share it,
/// as runners of one host do.
///
/// # Errors
/// When the executable cannot be written.
pub fn runner_with_uid_table(dir: &Path, runner_binary: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("runner");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh
FN_FUNCTION_UID_TABLE='{}'
export FN_FUNCTION_UID_TABLE
exec '{}' \"$@\"\n",
            dir.join("uids").join("function-uids").display(),
            runner_binary.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Environment pairs from string slices.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Helper to merge environment lists (later wins).
pub fn merge(lists: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut map = BTreeMap::new();
    for list in lists {
        for (k, v) in *list {
            map.insert(k.clone(), v.clone());
        }
    }
    map.into_iter().collect()
}

/// A gRPC channel to a daemon at `address`, connected now, each call bounded by 2 s.
///
/// # Errors
/// When it cannot be connected within 2 s.
pub async fn grpc_channel(
    tls: &TlsMode,
    address: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    Ok(fn_tls::grpc_endpoint(tls, address)?
        .with(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2))
        })
        .connect()
        .await?)
}

/// The `Status` of the runner at `address`.
///
/// # Errors
/// When it does not answer within 2 s.
pub async fn runner_status(
    tls: &TlsMode,
    address: &str,
) -> anyhow::Result<fn_protocol::runner::RunnerStatus> {
    use fn_protocol::runner::runner_protocol_client::RunnerProtocolClient;
    let channel = grpc_channel(tls, address).await?;
    Ok(RunnerProtocolClient::new(channel)
        .status(())
        .await?
        .into_inner())
}

/// The ids of the runners the npm at `npm_address` publishes for `group`, in its order.
///
/// # Errors
/// When the npm cannot be reached or answers with an error.
pub async fn published_runners(
    tls: &TlsMode,
    npm_address: &str,
    group: &str,
) -> anyhow::Result<Vec<String>> {
    use fn_protocol::poolmanager::LbGroupId;
    use fn_protocol::poolmanager::runner_manager_client::RunnerManagerClient;
    let reply = RunnerManagerClient::new(grpc_channel(tls, npm_address).await?)
        .get_lb_group(LbGroupId {
            id: group.to_owned(),
        })
        .await?
        .into_inner();
    Ok(reply.runners.into_iter().map(|r| r.id).collect())
}
