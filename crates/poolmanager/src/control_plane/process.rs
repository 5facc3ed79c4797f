//! The `process` control plane: runners are local `pure-runner` processes, each on a free
//! loopback port. The one-machine default (`make demo`).
//!
//! - Provision: spawn the runner binary with the npm's TLS files, its memory and functions
//!   directory; report it only once it answers the gRPC health check.
//! - Remove: SIGTERM (the runner drains), SIGKILL if it has not exited in time.
//! - Every spawned runner is recorded as a small file in the state directory, so an npm that
//!   was killed and restarted adopts the runners still alive instead of spawning new ones.
//!   The record is written on the blocking pool; one still being written when its runner is
//!   removed (or the npm stops) is not put in place after the removal (see [`Record`]).
//! - On npm shutdown every runner is stopped and its record removed: ready ones, ones still
//!   starting and ones being removed alike. Each runner is in the table from its spawn to
//!   the end of its stop, in a [`Phase`], so a control-loop pass cut short by shutdown
//!   (a provisioning waiting for health, a removal waiting for the exit) leaves nothing
//!   behind. A provisioning cancelled at shutdown ends its wait for health at once and
//!   spawns nothing more. With `FN_PROCESS_KEEP_RUNNERS` the ready runners stay running
//!   instead, with their records, for the next npm to adopt (as after a SIGKILL); those
//!   starting or being removed are stopped all the same.
//! - Each runner writes its log (with its functions' output) in the state directory, rotated
//!   past a bound by the npm, and the logs of failed runners kept are bounded in number:
//!   see its `logs` module.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fn_lifecycle::retry::Backoff;
use fn_tls::TlsMode;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{ControlPlane, ControlPlaneError, RunnerInfo};

mod logs;
pub use logs::{KEPT_LOGS, LOG_BOUND};

/// What a runner needs after its drain, before the npm's stop grace runs out: the clean-up
/// of its instances (at most 5 s: memory cgroups, socket directories) and a second.
const RUNNER_CLEANUP: Duration = Duration::from_secs(6);

/// Settings of the process control plane.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The `pure-runner` executable (`FN_RUNNER_BINARY`).
    pub runner_binary: PathBuf,
    /// Passed to runners as `FN_FUNCTIONS_DIR` (`FN_RUNNER_FUNCTIONS_DIR`).
    pub functions_dir: PathBuf,
    /// Records of spawned runners and their logs (`FN_RUNNER_STATE_DIR`).
    pub state_dir: PathBuf,
    /// Each runner's `FN_MAX_MEMORY_MB` (`FN_RUNNER_MEMORY_MB`).
    pub runner_memory_mb: u64,
    /// Environment giving runners the npm's TLS identity (`FN_NODE_CERT*` or `FN_INSECURE`).
    pub tls_env: Vec<(String, String)>,
    /// How the npm itself talks to runners (health checks).
    pub tls: TlsMode,
    /// Address runners listen on.
    pub listen_ip: IpAddr,
    /// Bound for a new runner to answer health.
    pub start_timeout: Duration,
    /// Further environment for runners (log level and format, ...).
    pub extra_env: Vec<(String, String)>,
    /// How long a runner may drain at the npm's shutdown before it is killed
    /// ([`super::shutdown_stop_grace`] of the npm's own bound).
    pub stop_grace: Duration,
    /// Leave the ready runners running at npm shutdown, with their records, for the next
    /// npm to adopt (`FN_PROCESS_KEEP_RUNNERS`).
    pub keep_runners: bool,
    /// Size past which a runner's log is rotated to `<id>.log.1` ([`LOG_BOUND`]).
    pub log_bound: u64,
    /// Most logs kept of runners that failed or ended on their own ([`KEPT_LOGS`]).
    pub kept_logs: usize,
}

impl ProcessConfig {
    /// Each runner's `FN_SHUTDOWN_TIMEOUT`: its drain, then the clean-up of its instances,
    /// end inside [`ProcessConfig::stop_grace`] (when the grace is over 7 s: under that, the
    /// runner is told a second and may be killed during its clean-up). With a runner's own default (30 s) the npm
    /// killed it mid-drain, so its calls failed without a word and its instances' cgroups
    /// were left behind. A runner the npm removes has drained first (its calls ended), so
    /// this does not shorten a scale-down.
    pub fn runner_shutdown_timeout(&self) -> Duration {
        self.stop_grace
            .saturating_sub(RUNNER_CLEANUP)
            .max(Duration::from_secs(1))
    }
}

impl ProcessConfig {
    /// Defaults for everything but the paths and TLS.
    pub fn new(
        runner_binary: PathBuf,
        functions_dir: PathBuf,
        state_dir: PathBuf,
        tls: TlsMode,
    ) -> Self {
        ProcessConfig {
            runner_binary,
            functions_dir,
            state_dir,
            runner_memory_mb: 1024,
            tls_env: Vec::new(),
            tls,
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            start_timeout: Duration::from_secs(15),
            extra_env: Vec::new(),
            stop_grace: super::SHUTDOWN_STOP_GRACE,
            keep_runners: false,
            log_bound: LOG_BOUND,
            kept_logs: KEPT_LOGS,
        }
    }
}

/// Where a runner is in its life; only `Ready` runners are listed to the control loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Spawned, not yet answering health.
    Starting,
    /// Answering health; listed.
    Ready,
    /// Being stopped by `remove`.
    Stopping,
}

/// A runner this control plane started (or adopted after a restart).
#[derive(Debug)]
struct Spawned {
    info: RunnerInfo,
    pid: u32,
    /// `None` for runners adopted from a previous npm process, and while a stop that took
    /// the handle is waiting for the exit.
    child: Option<Child>,
    phase: Phase,
    /// Its record's write and removal, serialised: see [`Record`].
    record: Arc<Record>,
}

/// A runner's record file, written on tokio's blocking pool and removed once the runner is
/// gone. The write may outlive the provisioning that started it (dropped by a shutdown, or
/// the runner removed meanwhile): it stages and syncs the file, then renames it into place
/// under `removed`'s lock, which the removal takes to mark the record removed before it
/// deletes the file. So a write still running when its runner was removed puts nothing in
/// place after it (it deletes its staged file instead), where it renamed back a record of a
/// runner that no longer existed, whose pid a later npm could find reused.
#[derive(Debug, Default)]
struct Record {
    /// Whether the record was removed: no write puts it in place after that.
    removed: Mutex<bool>,
}

impl Record {
    fn removed(&self) -> std::sync::MutexGuard<'_, bool> {
        self.removed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the record at `path` whole (see [`write_whole`]) unless it has been removed;
    /// blocking, for the blocking pool. Whether it was put in place. One line:
    /// `id address group created_unix_ms pid`.
    fn write(&self, path: &Path, info: &RunnerInfo, pid: u32) -> std::io::Result<bool> {
        let created = info
            .created
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let line = format!(
            "{} {} {} {created} {pid}\n",
            info.id, info.address, info.group
        );
        write_whole(path, line.as_bytes(), || self.removed())
    }

    /// Removes the record at `path`, and any write of it still running from putting it
    /// back. Waits at most for a rename under way (the write itself is not under the lock).
    fn remove(&self, path: &Path) {
        *self.removed() = true;
        remove_quietly(path);
    }
}

/// Spawns local runner processes.
#[derive(Debug)]
pub struct ProcessControlPlane {
    config: ProcessConfig,
    runners: Mutex<Vec<Spawned>>,
    /// The state directory's lock, held for the plane's life: a second npm on the same
    /// directory would adopt this one's runners, or kill them as unhealthy.
    _state_lock: nix::fcntl::Flock<std::fs::File>,
    /// The rotation of the runners' logs, started by each list (a control-loop tick).
    rotation: logs::Rotation,
    /// The logs of gone runners kept for the operator, at most `kept_logs`.
    kept: logs::Kept,
    /// Tests: holds the next record write on its blocking thread.
    #[cfg(test)]
    record_gate: Mutex<Option<tests::RecordGate>>,
}

/// A setup problem of the process control plane (configuration: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ProcessSetupError {
    #[error("FN_RUNNER_BINARY: {} is not an executable file", .0.display())]
    Binary(PathBuf),
    #[error("FN_RUNNER_FUNCTIONS_DIR: {} is not a directory", .0.display())]
    FunctionsDir(PathBuf),
    #[error("FN_RUNNER_STATE_DIR: cannot use {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory is not this npm's alone: its records name directories the npm removes
    /// and processes it signals, so whoever can write them could steer it.
    #[error(
        "FN_RUNNER_STATE_DIR: {} {reason}: the npm keeps runner records there and acts on \
         them; remove it or choose a directory of the npm's user that no one else can write",
        path.display()
    )]
    StateDirUnsafe { path: PathBuf, reason: String },
    #[error(
        "FN_RUNNER_STATE_DIR: {} is in use by another npm: give each npm a state directory of \
         its own",
        .0.display()
    )]
    StateDirInUse(PathBuf),
}

const RECORD_EXT: &str = "runner";

impl ProcessControlPlane {
    /// Checks the configuration and adopts runners recorded by a previous npm process that
    /// are still alive and healthy; stale records are removed.
    ///
    /// A recorded runner that is alive but does not answer health within the start timeout
    /// (it was still starting when the previous npm died, or it hangs) is stopped: dropping
    /// its record alone would leave it running with nobody to stop it. A process is only
    /// taken for the recorded runner when its environment carries that runner's socket
    /// directory, so a reused pid is never signalled.
    ///
    /// # Errors
    /// [`ProcessSetupError`] naming the variable at fault.
    pub async fn new(config: ProcessConfig) -> Result<Self, ProcessSetupError> {
        if !config.runner_binary.is_file() {
            return Err(ProcessSetupError::Binary(config.runner_binary));
        }
        if !config.functions_dir.is_dir() {
            return Err(ProcessSetupError::FunctionsDir(config.functions_dir));
        }
        let state_lock = prepare_state_dir(&config.state_dir)?;
        let entries =
            std::fs::read_dir(&config.state_dir).map_err(|source| ProcessSetupError::StateDir {
                path: config.state_dir.clone(),
                source,
            })?;
        let mut records = Vec::new();
        let mut staged = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) == Some(RECORD_EXT) {
                records.push(path);
            } else if let Some(record) = staged_record(&path) {
                staged.push((path, record));
            }
        }
        // Records staged by an npm that died before renaming them (see `write_whole`).
        for (path, record) in staged {
            if put_staged_in_place(&path, &record) && !records.contains(&record) {
                records.push(record);
            }
        }
        let checks = records.iter().map(|path| adopt(&config, path));
        let adopted: Vec<Spawned> = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let live: Vec<&str> = adopted.iter().map(|s| s.info.id.as_str()).collect();
        let kept = logs::Kept::scan(&config.state_dir, &live, config.kept_logs);
        Ok(ProcessControlPlane {
            config,
            runners: Mutex::new(adopted),
            _state_lock: state_lock,
            rotation: logs::Rotation::default(),
            kept,
            #[cfg(test)]
            record_gate: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Spawned>> {
        self.runners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.config.state_dir.join(format!("{id}.{RECORD_EXT}"))
    }

    /// Where a runner's stdout and stderr go: its own log and its functions' output.
    fn log_path(&self, id: &str) -> PathBuf {
        logs::log_path(&self.config.state_dir, id)
    }

    /// Drops a runner that is gone from the table, with its record and socket directory,
    /// and its log unless it is to be kept (in the background: a log may be large).
    fn forget(&self, id: &str, log: RunnerLog) {
        let record = {
            let mut runners = self.lock();
            let at = runners.iter().position(|r| r.info.id == id);
            at.map(|at| runners.remove(at).record)
        };
        match record {
            Some(record) => record.remove(&self.record_path(id)),
            // Taken by the shutdown, which removes its record.
            None => remove_quietly(&self.record_path(id)),
        }
        remove_in_background(&socket_dir(id));
        match log {
            RunnerLog::Remove => logs::remove_in_background(&self.log_path(id)),
            RunnerLog::Keep => self.kept.keep(self.log_path(id)),
        }
    }

    /// Stops a runner (SIGTERM, SIGKILL after `grace`), then forgets it. It stays in the
    /// table as `Stopping` until it has exited, so that a shutdown cutting this short still
    /// finds it.
    async fn stop_and_forget(&self, id: &str, grace: Duration, log: RunnerLog) {
        let taken = {
            let mut runners = self.lock();
            runners.iter_mut().find(|r| r.info.id == id).map(|r| {
                r.phase = Phase::Stopping;
                (r.pid, r.child.take())
            })
        };
        if let Some((pid, mut child)) = taken {
            stop(pid, id, child.as_mut(), grace).await;
            tracing::info!(runner = %id, pid, "runner stopped");
        }
        self.forget(id, log);
    }

    /// The command that starts a runner on `port` with its function sockets under
    /// `sock_dir`: nothing of the npm's own environment but `PATH`.
    fn runner_command(&self, port: u16, sock_dir: &Path) -> Command {
        let mut cmd = Command::new(&self.config.runner_binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("FN_GRPC_PORT", port.to_string())
            .env("FN_LISTEN_ADDR", self.config.listen_ip.to_string())
            .env("FN_MAX_MEMORY_MB", self.config.runner_memory_mb.to_string())
            .env("FN_FUNCTIONS_DIR", &self.config.functions_dir)
            .env("FN_SOCKET_DIR", sock_dir)
            .env(
                "FN_SHUTDOWN_TIMEOUT",
                format!("{}s", self.config.runner_shutdown_timeout().as_secs()),
            )
            .envs(self.config.tls_env.iter().map(|(k, v)| (k, v)))
            .envs(self.config.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Spawns one runner and waits until it answers health. The runner is in the table
    /// (as `Starting`) from its spawn on, so a shutdown that cuts this short stops it;
    /// `cancel` ends the wait for health, and a spawn asked for after it is not made.
    async fn spawn_one(
        &self,
        group: &str,
        cancel: &CancellationToken,
    ) -> Result<RunnerInfo, ControlPlaneError> {
        if cancel.is_cancelled() {
            return Err(ControlPlaneError::Cancelled);
        }
        let failed = |what: String| ControlPlaneError::Failed(what);
        let port = fn_lifecycle::ports::free_port(self.config.listen_ip)
            .map_err(|e| failed(format!("no free port: {e}")))?;
        let id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let address = SocketAddr::new(self.config.listen_ip, port).to_string();
        let sock_dir = socket_dir(&id);
        let log_path = self.log_path(&id);
        let log = logs::create(&log_path)
            .map_err(|e| failed(format!("creating {}: {e}", log_path.display())))?;
        // No runner to keep a log of: the error says why.
        let no_runner = |what: String| {
            remove_quietly(&log_path);
            failed(what)
        };
        let log_err = log.try_clone().map_err(|e| no_runner(e.to_string()))?;
        let mut cmd = self.runner_command(port, &sock_dir);
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Survives an npm crash on purpose: a restarted npm adopts it.
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| {
            no_runner(format!(
                "starting {}: {e}",
                self.config.runner_binary.display()
            ))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| no_runner("runner exited at once".into()))?;
        let info = RunnerInfo {
            id: id.clone(),
            address: address.clone(),
            group: group.to_owned(),
            created: SystemTime::now(),
        };
        // In the table before anything is awaited: a shutdown that drops this future from
        // here on finds the runner and stops it.
        let record = Arc::new(Record::default());
        self.lock().push(Spawned {
            info: info.clone(),
            pid,
            child: Some(child),
            phase: Phase::Starting,
            record: Arc::clone(&record),
        });
        // Written (and synced) on the blocking pool, not on the runtime's thread, and waited
        // for: the record is on disk before the runner is reported provisioned. Dropped here,
        // the write goes on, but puts no record in place once the runner's is removed.
        let (path, recorded) = (self.record_path(&id), info.clone());
        #[cfg(test)]
        let gate = self.record_gate.lock().ok().and_then(|mut g| g.take());
        let written = tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            let _held = gate.map(tests::RecordGate::pass);
            record.write(&path, &recorded, pid)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the runner; a restarted npm will not adopt it");
        }

        // Ready only once it answers health.
        let started = tokio::time::Instant::now();
        let mut backoff = health_backoff();
        loop {
            let Some(healthy) = cancel
                .run_until_cancelled(super::answers_health(&self.config.tls, &address))
                .await
            else {
                return Err(ControlPlaneError::Cancelled);
            };
            if healthy {
                let mut runners = self.lock();
                let Some(entry) = runners.iter_mut().find(|r| r.info.id == id) else {
                    return Err(failed(format!("runner {id} was stopped while starting")));
                };
                entry.phase = Phase::Ready;
                tracing::info!(runner = %id, %address, pid, group, "runner ready");
                return Ok(info);
            }
            let exited = {
                let mut runners = self.lock();
                match runners.iter_mut().find(|r| r.info.id == id) {
                    None => return Err(failed(format!("runner {id} was stopped while starting"))),
                    Some(entry) => match entry.child.as_mut().map(Child::try_wait) {
                        Some(Ok(Some(status))) => Some(status.to_string()),
                        Some(Ok(None)) => None,
                        Some(Err(e)) => Some(format!("an unknown status ({e})")),
                        None => Some("an unknown status".to_owned()),
                    },
                }
            };
            if let Some(status) = exited {
                self.forget(&id, RunnerLog::Keep);
                // Its last words are why (a setting it refused, say): in the npm's log too.
                let said = last_line(&log_path)
                    .map(|line| format!(": {line}"))
                    .unwrap_or_default();
                return Err(failed(format!(
                    "runner {id} exited with {status} before answering health{said}; see {}",
                    log_path.display()
                )));
            }
            if started.elapsed() > self.config.start_timeout {
                self.stop_and_forget(&id, Duration::from_secs(1), RunnerLog::Keep)
                    .await;
                return Err(failed(format!(
                    "runner {id} did not answer health within {:?}; see {}",
                    self.config.start_timeout,
                    log_path.display()
                )));
            }
            if cancel.run_until_cancelled(backoff.sleep()).await.is_none() {
                return Err(ControlPlaneError::Cancelled);
            }
        }
    }
}

/// What becomes of a runner's log when the runner is forgotten. A runner stopped as asked
/// (removed after its drain, or at shutdown) takes its log with it: kept, the logs of every
/// runner a long-running npm ever scaled up (with every line its functions wrote) filled
/// `FN_RUNNER_STATE_DIR`. One that failed to start, or ended on its own, keeps it for the
/// operator (the error or warning names it), among the [`ProcessConfig::kept_logs`] newest
/// kept (a group whose runner cannot start is tried again every minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunnerLog {
    Keep,
    Remove,
}

/// Adopts the runner recorded at `path` if it is alive and answers health; otherwise stops
/// it (when it is still our runner) and removes its record and socket directory.
async fn adopt(config: &ProcessConfig, path: &Path) -> Option<Spawned> {
    let Some((info, pid)) = read_record(path) else {
        tracing::warn!(record = %path.display(), "removing an unreadable runner record");
        remove_quietly(path);
        return None;
    };
    let forget = |what: &str| {
        tracing::info!(runner = %info.id, pid, "{what}");
        remove_quietly(path);
        remove_in_background(&socket_dir(&info.id));
    };
    if !pid_alive(pid) || !is_runner_process(pid, &info.id) {
        forget("removing the record of a runner that is gone");
        return None;
    }
    let started = tokio::time::Instant::now();
    let mut backoff = health_backoff();
    loop {
        if super::answers_health(&config.tls, &info.address).await {
            tracing::info!(runner = %info.id, address = %info.address, pid, "adopted a runner from a previous npm process");
            return Some(Spawned {
                info,
                pid,
                child: None,
                phase: Phase::Ready,
                record: Arc::default(),
            });
        }
        if !is_runner_process(pid, &info.id) {
            forget("a recorded runner exited before answering health");
            return None;
        }
        if started.elapsed() > config.start_timeout {
            tracing::warn!(runner = %info.id, pid, timeout = ?config.start_timeout, "a recorded runner does not answer health; stopping it");
            stop(pid, &info.id, None, Duration::from_secs(10)).await;
            forget("stopped a recorded runner that never answered health");
            return None;
        }
        backoff.sleep().await;
    }
}

/// The record that the file at `path` was staged for, when it is one (`.NAME.new`, where
/// `NAME` is a record's: see [`write_whole`]).
fn staged_record(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let record = name.strip_prefix('.')?.strip_suffix(".new")?;
    let record = path.with_file_name(record);
    (record.extension().and_then(|e| e.to_str()) == Some(RECORD_EXT)).then_some(record)
}

/// Puts a record staged at `path` in place at `record` when it reads whole (the npm that
/// wrote it died between its sync and its rename), so that the runner it names is adopted or
/// cleaned up as any recorded one; otherwise (the npm died mid-write) removes it, with a
/// warning, as an unreadable record is. Whether there is a record at `record` now.
fn put_staged_in_place(path: &Path, record: &Path) -> bool {
    if read_record(path).is_none() {
        tracing::warn!(record = %path.display(), "removing a runner record cut short while it was written");
        remove_quietly(path);
        return false;
    }
    match std::fs::rename(path, record) {
        Ok(()) => {
            tracing::info!(record = %record.display(), "put in place a runner record written whole before the previous npm stopped");
            true
        }
        Err(e) => {
            tracing::warn!(record = %path.display(), error = %e, "removing a staged runner record that cannot be put in place");
            remove_quietly(path);
            false
        }
    }
}

/// Whether process `pid` is the runner `id` this control plane spawned: its environment
/// names the runner's socket directory (which holds the unique id).
fn is_runner_process(pid: u32, id: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("FN_SOCKET_DIR={}", socket_dir(id).display());
    environ
        .split(|b| *b == 0)
        .any(|var| var == wanted.as_bytes())
}

impl ControlPlane for ProcessControlPlane {
    fn runner_memory_mb(&self) -> u64 {
        self.config.runner_memory_mb
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        let mut runners = self.lock();
        // Ready runners that exited are no longer listed (starting and stopping ones are
        // watched by the task starting or stopping them).
        runners.retain_mut(|r| {
            if r.phase != Phase::Ready {
                return true;
            }
            let exited = match &mut r.child {
                Some(child) => !matches!(child.try_wait(), Ok(None)),
                // Adopted: not our child, and its pid may be another process's by now.
                None => !is_runner_process(r.pid, &r.info.id),
            };
            if exited {
                let log = self.log_path(&r.info.id);
                tracing::warn!(runner = %r.info.id, pid = r.pid, log = %log.display(), "runner process exited");
                r.record.remove(&self.record_path(&r.info.id));
                remove_in_background(&socket_dir(&r.info.id));
                self.kept.keep(log);
            }
            !exited
        });
        let listed = runners
            .iter()
            .filter(|r| r.phase == Phase::Ready)
            .map(|r| r.info.clone())
            .collect();
        // Every runner in the table writes its log, starting and stopping ones too.
        let logs = runners.iter().map(|r| self.log_path(&r.info.id)).collect();
        drop(runners);
        drop(self.rotation.start(logs, self.config.log_bound));
        Box::pin(async move { Ok(listed) })
    }

    fn provision<'a>(
        &'a self,
        group: &'a str,
        count: usize,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        Box::pin(async move {
            let spawns = (0..count).map(|_| self.spawn_one(group, cancel));
            let results = futures::future::join_all(spawns).await;
            super::gather_provisioned(results, "runner")
        })
    }

    fn remove<'a>(
        &'a self,
        runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        Box::pin(async move {
            // The grace its drain was sized for: a runner still draining (past
            // FN_MAX_DRAIN_TIME) ends its calls and cleans up its instances within it.
            // Cut short (the npm is stopping), the runner stays in the table, `Stopping`,
            // with its record, until the shutdown stops it again (a second SIGTERM does not
            // cut the runner's drain) and removes what it leaves: nothing to wait for.
            self.stop_and_forget(&runner.id, self.config.stop_grace, RunnerLog::Remove)
                .await;
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Every phase: a starting runner whose provisioning was cut short, a stopping one
            // whose removal was, are stopped like the ready ones; but for the ready ones
            // kept for the next npm, which adopts them from their records. Their child
            // handles are dropped, which leaves them running (`kill_on_drop(false)`).
            let mut all: Vec<Spawned> = std::mem::take(&mut *self.lock());
            if self.config.keep_runners {
                let kept = all.iter().filter(|s| s.phase == Phase::Ready).count();
                all.retain(|s| s.phase != Phase::Ready);
                tracing::info!(
                    runners = kept,
                    state_dir = %self.config.state_dir.display(),
                    "FN_PROCESS_KEEP_RUNNERS: leaving the ready runners running, with their \
                     records, for the next npm"
                );
            }
            let stops = all.into_iter().map(|mut s| async move {
                stop(s.pid, &s.info.id, s.child.as_mut(), self.config.stop_grace).await;
                s.record.remove(&self.record_path(&s.info.id));
                // Off the runtime (a log may be large, a socket directory deep), and waited
                // for: the npm exits next, and would leave the rest behind. A removal that
                // could not start said so.
                let log = logs::remove_and_wait(self.log_path(&s.info.id));
                let sockets = fn_lifecycle::fs::remove_tree(socket_dir(&s.info.id));
                let _ = futures::future::join(log, sockets).await;
            });
            futures::future::join_all(stops).await;
            if self.config.keep_runners {
                tracing::info!("the runners starting or being removed are stopped");
            } else {
                tracing::info!("all spawned runners stopped");
            }
        })
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. A runner adopted from an earlier npm (no
/// `child`) is signalled only while its pid is still runner `id`'s (see
/// [`is_runner_process`]): once it has exited, the pid may be another process's.
async fn stop(pid: u32, id: &str, child: Option<&mut Child>, grace: Duration) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let pid_t = Pid::from_raw(raw);
    if child.is_none() && !is_runner_process(pid, id) {
        return;
    }
    if let Err(e) = kill(pid_t, Signal::SIGTERM) {
        tracing::debug!(pid, error = %e, "SIGTERM failed; the runner is probably gone");
    }
    match child {
        Some(child) => {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                tracing::warn!(pid, "runner did not stop within {grace:?}; killing it");
                if let Err(e) = child.kill().await {
                    tracing::debug!(pid, error = %e, "kill failed");
                }
            }
        }
        None => {
            let deadline = tokio::time::Instant::now() + grace;
            while is_runner_process(pid, id) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if is_runner_process(pid, id) {
                tracing::warn!(pid, "runner did not stop within {grace:?}; killing it");
                if let Err(e) = kill(pid_t, Signal::SIGKILL) {
                    tracing::debug!(pid, error = %e, "SIGKILL failed");
                }
            }
        }
    }
}

/// Pauses between health checks of a runner that is starting.
fn health_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(250))
}

/// The runner's `FN_SOCKET_DIR`: short on purpose, since unix socket paths are limited to
/// 107 bytes and the runner nests instance directories in it.
fn socket_dir(id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fn-{id}"))
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence; a zombie still "exists", so look at /proc too.
    kill(Pid::from_raw(raw), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Writes `contents` to `path` whole or not at all: into a hidden sibling (`.NAME.new`),
/// synced, then renamed over `path`. A failure (a full disk) leaves whatever was at `path` as
/// it was and removes the sibling, where `std::fs::write` left an empty or cut record that a
/// restarted npm removes as unreadable, orphaning its still-running runner. A sibling left by
/// an npm killed before the rename is put in place by the next npm's scan when it reads whole,
/// and removed otherwise (see [`put_staged_in_place`]).
///
/// The rename is made under the lock `removed` takes, and not at all (the sibling removed)
/// when that says the file was removed meanwhile. Whether the file was put in place.
fn write_whole<G: std::ops::Deref<Target = bool>>(
    path: &Path,
    contents: &[u8],
    removed: impl FnOnce() -> G,
) -> std::io::Result<bool> {
    use std::io::Write as _;
    let Some(name) = path.file_name() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        ));
    };
    let mut staged = std::ffi::OsString::from(".");
    staged.push(name);
    staged.push(".new");
    let staged = path.with_file_name(staged);
    let written = std::fs::File::create(&staged)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| {
            let removed = removed();
            if *removed {
                return Ok(false);
            }
            std::fs::rename(&staged, path).map(|()| true)
        });
    if !matches!(written, Ok(true)) {
        remove_quietly(&staged);
    }
    written
}

fn read_record(path: &Path) -> Option<(RunnerInfo, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    let id = parts.next()?.to_owned();
    if !is_runner_id(&id) {
        return None;
    }
    let address = parts.next()?.to_owned();
    let group = parts.next()?.to_owned();
    let created_ms: u64 = parts.next()?.parse().ok()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    Some((
        RunnerInfo {
            id,
            address,
            group,
            created: UNIX_EPOCH + Duration::from_millis(created_ms),
        },
        pid,
    ))
}

/// Whether `id` is one this plane makes (`r-` and 12 hex digits). A record's id names the
/// socket directory the npm removes when the runner is gone: one such as `r/../../home/x`
/// must not be taken.
fn is_runner_id(id: &str) -> bool {
    id.strip_prefix("r-")
        .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Makes the state directory (mode 0700) when missing, checks that it is the npm user's
/// alone (a directory, not a link, owned by the npm's user, writable by no one else: another
/// user who made `/tmp/fn-npm-runners` first could plant records), and locks it.
fn prepare_state_dir(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ProcessSetupError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let io = |source| ProcessSetupError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    let unsafe_dir = |reason: String| ProcessSetupError::StateDirUnsafe {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory (a link?)".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by the npm's (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        // The npm's own, made under a umask of 002 by an earlier npm (or by hand): narrowed,
        // since removing it would lose the records of runners still running.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            unsafe_dir(format!(
                "is writable by other users (mode {:o}) and cannot be made 0700: {e}",
                meta.mode() & 0o7777
            ))
        })?;
        tracing::warn!(
            state_dir = %path.display(),
            mode = format!("{:o}", meta.mode() & 0o7777),
            "FN_RUNNER_STATE_DIR was writable by other users: made 0700"
        );
    }
    // Not through a link one could have planted while the directory was open to others.
    let file = std::os::unix::fs::OpenOptionsExt::custom_flags(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
        nix::libc::O_NOFOLLOW,
    )
    .open(path.join(".lock"))
    .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => ProcessSetupError::StateDirInUse(path.to_path_buf()),
            other => io(std::io::Error::from(other)),
        },
    )
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove file");
    }
}

/// Most of a runner's log read for its last line: an error line, with its fields.
const LAST_LINE_READ: u64 = 4096;

/// Longest last line given in an error, in characters.
const LAST_LINE_CHARS: usize = 600;

/// The last line of the log at `path` that is not blank, if it can be read: what a runner
/// said before it exited. Reads at most [`LAST_LINE_READ`] bytes from its end, and gives at
/// most [`LAST_LINE_CHARS`] characters of it.
fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LAST_LINE_READ)))
        .ok()?;
    let mut tail = Vec::new();
    file.take(LAST_LINE_READ).read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    let mut shown: String = line.chars().take(LAST_LINE_CHARS).collect();
    if shown.len() < line.len() {
        shown.push('…');
    }
    Some(shown)
}

/// Removes a runner's directory (its socket directory holds its functions' instance
/// directories, trees a function may have made deep), or its log (large: all that its
/// functions wrote), off the runtime, in the background.
fn remove_in_background(path: &Path) {
    drop(fn_lifecycle::fs::remove_tree(path.to_path_buf()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a record as a provisioning does, of a runner not removed.
    fn write_record(path: &Path, info: &RunnerInfo, pid: u32) -> std::io::Result<()> {
        Record::default().write(path, info, pid).map(drop)
    }

    /// Holds a record write on its blocking thread until released; `entered` is closed once
    /// the write has ended.
    #[derive(Debug)]
    pub(super) struct RecordGate {
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl RecordGate {
        /// Says the write is held, and waits to be released (or for the test to end): what
        /// it returns is held until the write has ended.
        pub(super) fn pass(self) -> Self {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            self
        }
    }

    /// A runner binary in `dir`: the shell script `script`.
    pub(super) fn runner_script(dir: &Path, script: &str) -> PathBuf {
        let binary = dir.join("pure-runner");
        std::fs::write(&binary, script).expect("write");
        std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        binary
    }

    /// The message of a provisioning in group `g` that must fail (its runner exits), seen
    /// within 10 s.
    pub(super) async fn failed_provisioning(plane: &ProcessControlPlane) -> String {
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            plane.provision("g", 1, &CancellationToken::new()),
        )
        .await
        .expect("the exit is seen within the bound");
        let Err(ControlPlaneError::Failed(message)) = result else {
            panic!("the provisioning failed: {result:?}");
        };
        message
    }

    /// A plane's configuration in `dir` (its state in `dir/state`), starting `binary`.
    pub(super) fn config_in(dir: &Path, binary: PathBuf) -> ProcessConfig {
        ProcessConfig::new(binary, dir.to_owned(), dir.join("state"), TlsMode::Insecure)
    }

    /// A health service answering SERVING in this process (runners' health, faked): its
    /// switch, held by the test, and its address.
    async fn health_answered_here() -> (fn_lifecycle::health::Health, String) {
        let (health, service) = fn_lifecycle::health::Health::new(&[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let address = listener.local_addr().expect("address").to_string();
        let incoming = fn_tls::grpc_incoming(&TlsMode::Insecure, listener).expect("incoming");
        tokio::spawn(
            fn_tls::grpc_server()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        health.set_serving().await;
        (health, address)
    }

    /// A plane's configuration over `state_dir`, with a runner binary that is never run.
    fn config_over(dir: &Path, state_dir: PathBuf) -> ProcessConfig {
        let binary = dir.join("pure-runner");
        std::fs::write(&binary, "").expect("write");
        ProcessConfig::new(binary, dir.to_owned(), state_dir, TlsMode::Insecure)
    }

    /// A record planted with an id that is no runner's cannot make the npm remove the
    /// directory it names: the record is dropped as unreadable.
    #[tokio::test]
    async fn a_record_whose_id_is_no_runners_removes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Where a runner's socket directory would be, `<tmp>/fn-<id>`, for an id with a
        // slash in it.
        let victim_parent = tempfile::Builder::new()
            .prefix("fn-")
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir");
        let victim = victim_parent.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::fs::write(victim.join("data"), "keep").expect("write");
        let suffix = victim_parent
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("fn-"))
            .expect("fn- prefix");
        assert_eq!(socket_dir(&format!("{suffix}/victim")), victim);
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        let record = state.join("planted.runner");
        std::fs::write(
            &record,
            format!("{suffix}/victim 127.0.0.1:1 default 0 4000000\n"),
        )
        .expect("write");
        let plane = ProcessControlPlane::new(config_over(dir.path(), state))
            .await
            .expect("plane");
        // Removals run in the background.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            victim.join("data").exists(),
            "the planted id's directory was removed"
        );
        assert!(!record.exists(), "the planted record stays");
        assert!(plane.lock().is_empty());
        assert!(is_runner_id("r-0123456789ab"));
        for bad in [
            "r-0123456789a",
            "r-0123456789abc",
            "r-../../etc/x",
            "x-0123456789ab",
        ] {
            assert!(!is_runner_id(bad), "{bad}");
        }
    }

    /// The state directory must be the npm user's alone, and one npm's at a time.
    #[tokio::test]
    async fn a_state_directory_others_can_write_or_another_npm_holds_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // The npm's own, writable by others (an earlier npm under umask 002): narrowed.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let plane = ProcessControlPlane::new(config_over(dir.path(), open.clone()))
            .await
            .expect("its own directory, narrowed");
        drop(plane);
        let mode = std::fs::metadata(&open)
            .expect("there")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
        let Err(err) = ProcessControlPlane::new(config_over(dir.path(), link)).await else {
            panic!("a link was taken for the state directory");
        };
        assert!(err.to_string().contains("not a directory"), "{err}");

        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).expect("mkdir");
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None)
                .expect("chown");
            let Err(err) = ProcessControlPlane::new(config_over(dir.path(), theirs)).await else {
                panic!("another user's state directory was taken");
            };
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }

        let state = dir.path().join("state");
        let first = ProcessControlPlane::new(config_over(dir.path(), state.clone()))
            .await
            .expect("the first npm");
        let made = std::fs::metadata(&state)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(made & 0o777, 0o700, "{made:o}");
        let Err(err) = ProcessControlPlane::new(config_over(dir.path(), state.clone())).await
        else {
            panic!("a second npm took the same state directory");
        };
        assert!(err.to_string().contains("in use by another npm"), "{err}");
        drop(first);
        ProcessControlPlane::new(config_over(dir.path(), state))
            .await
            .expect("free once the first is gone");
    }

    /// A runner is told to finish its drain and its clean-up before the npm's shutdown
    /// kills it, beside what the npm passes on (its log settings), for the default bound
    /// and for a short one.
    #[tokio::test]
    async fn a_runner_is_told_a_drain_that_ends_before_the_npm_kills_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("pure-runner");
        std::fs::write(&binary, "").expect("write");
        for npm_bound in [Duration::from_secs(30), Duration::from_secs(15)] {
            let mut config = config_in(dir.path(), binary.clone());
            config.extra_env = vec![("FN_LOG_LEVEL".into(), "debug".into())];
            config.stop_grace = super::super::shutdown_stop_grace(npm_bound);
            let grace = config.stop_grace;
            assert!(grace < npm_bound, "{grace:?} for {npm_bound:?}");
            let plane = ProcessControlPlane::new(config).await.expect("plane");
            let command = plane.runner_command(4000, Path::new("/run/fn-r-1"));
            let env: std::collections::HashMap<String, String> = command
                .as_std()
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
                .collect();
            let told = fn_lifecycle::config::parse_duration(&env["FN_SHUTDOWN_TIMEOUT"])
                .expect("a duration the runner reads");
            // The runner's own bound on its instances' clean-up is 5 s.
            assert!(
                told + Duration::from_secs(5) < grace,
                "{told:?} for a grace of {grace:?}"
            );
            assert_eq!(env["FN_LOG_LEVEL"], "debug");
            assert_eq!(env["FN_SOCKET_DIR"], "/run/fn-r-1");
        }
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = RunnerInfo {
            id: "r-00000000abcd".into(),
            address: "127.0.0.1:4000".into(),
            group: "default".into(),
            created: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let path = dir.path().join("r-00000000abcd.runner");
        write_record(&path, &info, 42).expect("write");
        assert_eq!(read_record(&path), Some((info, 42)));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read_record(&path), None);
    }

    /// A record written over one that is there is whole or not written: a write that fails
    /// leaves the previous record readable and no staged file behind, where
    /// `std::fs::write` truncated it first.
    #[test]
    fn a_record_that_cannot_be_written_leaves_the_previous_one_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r-00000000abcd.runner");
        let info = |address: &str| RunnerInfo {
            id: "r-00000000abcd".into(),
            address: address.into(),
            group: "default".into(),
            created: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        write_record(&path, &info("127.0.0.1:4000"), 42).expect("write");
        // The staged file cannot be created: a directory holds its name.
        let staged = dir.path().join(".r-00000000abcd.runner.new");
        std::fs::create_dir(&staged).expect("mkdir");
        assert!(write_record(&path, &info("127.0.0.1:5000"), 43).is_err());
        assert_eq!(read_record(&path), Some((info("127.0.0.1:4000"), 42)));
        std::fs::remove_dir(&staged).expect("rmdir");
        // The rename fails (a directory where the record goes): the staged file goes.
        let blocked = dir.path().join("r-00000000beef.runner");
        std::fs::create_dir_all(blocked.join("in")).expect("mkdir");
        assert!(write_record(&blocked, &info("127.0.0.1:5000"), 43).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        // A write that succeeds replaces the record whole.
        write_record(&path, &info("127.0.0.1:5000"), 43).expect("write");
        assert_eq!(read_record(&path), Some((info("127.0.0.1:5000"), 43)));
    }

    /// A record the previous npm synced but had not renamed into place when it was killed
    /// is taken as the record: its runner, alive, is adopted, and the staged file is gone.
    #[tokio::test]
    async fn a_record_staged_whole_is_put_in_place_and_its_runner_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_health, address) = health_answered_here().await;
        let id = "r-00000000f00d";
        let mut runner = std::process::Command::new("sleep")
            .arg("30")
            .env("FN_SOCKET_DIR", socket_dir(id))
            .spawn()
            .expect("spawn sleep");
        let pid = runner.id();
        // Until it has exec'd, the child's environment is still this process's.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_runner_process(pid, id) {
            assert!(
                std::time::Instant::now() < deadline,
                "the runner never exec'd"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let config = config_over(dir.path(), dir.path().join("state"));
        prepare_state_dir(&config.state_dir).expect("state dir");
        let record = config.state_dir.join(format!("{id}.{RECORD_EXT}"));
        let staged = config.state_dir.join(format!(".{id}.{RECORD_EXT}.new"));
        let info = RunnerInfo {
            id: id.to_owned(),
            address,
            group: "g".into(),
            created: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        // Written whole, then (as at a kill before the rename) left under its staged name.
        write_record(&record, &info, pid).expect("record");
        std::fs::rename(&record, &staged).expect("rename");

        let plane = ProcessControlPlane::new(config).await.expect("plane");
        let listed = plane.list().await.expect("lists");
        assert_eq!(listed, std::slice::from_ref(&info));
        assert_eq!(read_record(&record), Some((info, pid)));
        assert!(!staged.exists(), "the staged file stays");
        plane.shutdown().await;
        let status = tokio::task::spawn_blocking(move || runner.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(!status.success(), "stopped by the shutdown: {status:?}");
        assert!(!record.exists());
    }

    /// A record cut short while it was staged (the previous npm killed mid-write) is removed,
    /// and no record is made of it; a file that is no staged record is left alone.
    #[tokio::test]
    async fn a_record_cut_short_while_staged_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_over(dir.path(), dir.path().join("state"));
        prepare_state_dir(&config.state_dir).expect("state dir");
        let id = "r-00000000dead";
        let record = config.state_dir.join(format!("{id}.{RECORD_EXT}"));
        let staged = config.state_dir.join(format!(".{id}.{RECORD_EXT}.new"));
        std::fs::write(&staged, format!("{id} 127.0.0.1:1 g 17")).expect("write");
        let other = config.state_dir.join(".notes.new");
        std::fs::write(&other, "kept").expect("write");

        let plane = ProcessControlPlane::new(config).await.expect("plane");
        assert!(!staged.exists(), "the cut staged record stays");
        assert!(!record.exists(), "a record was made of it");
        assert!(other.exists(), "another file was removed");
        assert!(plane.lock().is_empty());
    }

    #[test]
    fn only_a_process_with_the_runners_socket_dir_is_taken_for_it() {
        // This test process has no FN_SOCKET_DIR of any runner.
        assert!(!is_runner_process(std::process::id(), "r-1"));
        assert!(!is_runner_process(u32::MAX - 1, "r-1"));
    }

    /// An adopted runner's pid that now belongs to another process is never signalled; the
    /// runner itself is stopped.
    #[tokio::test]
    async fn stopping_an_adopted_runner_signals_its_pid_only_while_it_is_that_runner() {
        let spawn = |env: Option<(&str, String)>| {
            let mut command = std::process::Command::new("sleep");
            command.arg("30");
            if let Some((key, value)) = env {
                command.env(key, value);
            }
            command.spawn().expect("spawn sleep")
        };
        // A process that took the pid of runner r-gone after it exited.
        let mut stranger = spawn(None);
        stop(stranger.id(), "r-gone", None, Duration::from_millis(200)).await;
        assert!(
            matches!(stranger.try_wait(), Ok(None)),
            "another process was signalled"
        );
        stranger.kill().expect("kill");
        stranger.wait().expect("reap");

        // The runner itself (its environment names its socket directory).
        let dir = socket_dir("r-adopted").display().to_string();
        let mut runner = spawn(Some(("FN_SOCKET_DIR", dir)));
        let pid = runner.id();
        // Until it has exec'd, the child's environment is still this process's.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_runner_process(pid, "r-adopted") {
            assert!(
                std::time::Instant::now() < deadline,
                "the runner never exec'd"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopping = tokio::spawn(async move {
            stop(pid, "r-adopted", None, Duration::from_secs(5)).await;
        });
        let status = tokio::task::spawn_blocking(move || runner.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(!status.success(), "stopped by a signal: {status:?}");
        stopping.await.expect("stop returns");
    }

    /// A runner that exits before it answers health fails its provisioning with its last
    /// words in the error (the npm's log), not only in its own log; the log is kept.
    #[tokio::test]
    async fn a_runner_that_exits_at_start_fails_its_provisioning_saying_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = runner_script(
            dir.path(),
            "#!/bin/sh\necho 'starting'\necho 'ERROR FN_SOCKET_DIR /x: too long' >&2\necho >&2\nexit 2\n",
        );
        let config = config_in(dir.path(), binary);
        let plane = ProcessControlPlane::new(config).await.expect("plane");
        let message = failed_provisioning(&plane).await;
        assert!(
            message.contains("before answering health: ERROR FN_SOCKET_DIR /x: too long; see "),
            "{message}"
        );
        assert!(plane.list().await.expect("lists").is_empty());
    }

    #[test]
    fn the_last_line_is_bounded_and_skips_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("runner.log");
        let long = "x".repeat(10_000);
        std::fs::write(&log, format!("first\n{long}\nlast words\n\n  \n")).expect("write");
        assert_eq!(last_line(&log).as_deref(), Some("last words"));
        std::fs::write(&log, format!("first\n{long}\n")).expect("write");
        let shown = last_line(&log).expect("a line");
        assert_eq!(shown.chars().count(), LAST_LINE_CHARS + 1, "{shown}");
        assert!(shown.ends_with('…'));
        std::fs::write(&log, "").expect("write");
        assert_eq!(last_line(&log), None);
        assert_eq!(last_line(&dir.path().join("none")), None);
    }

    /// A provisioning waiting for its runner to answer health stops at once when cancelled
    /// (the npm is stopping), instead of waiting out the start timeout; the runner stays in
    /// the table, unlisted, and the shutdown stops it.
    #[tokio::test]
    async fn a_provisioning_cancelled_while_its_runner_starts_leaves_it_to_the_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A runner that never answers health.
        let binary = runner_script(dir.path(), "#!/bin/sh\nexec sleep 30\n");
        let state = dir.path().join("state");
        let config = ProcessConfig::new(
            binary,
            dir.path().to_owned(),
            state.clone(),
            TlsMode::Insecure,
        );
        let plane = std::sync::Arc::new(ProcessControlPlane::new(config).await.expect("plane"));
        let cancel = CancellationToken::new();
        let provisioning = tokio::spawn({
            let (plane, cancel) = (std::sync::Arc::clone(&plane), cancel.clone());
            async move { plane.provision("g", 1, &cancel).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(2), provisioning)
            .await
            .expect("stopped at once")
            .expect("task");
        assert!(
            matches!(result, Err(ControlPlaneError::Cancelled)),
            "{result:?}"
        );
        assert!(plane.list().await.expect("lists").is_empty());
        let records: Vec<PathBuf> = std::fs::read_dir(&state)
            .expect("state dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(RECORD_EXT))
            .collect();
        let [record] = records.as_slice() else {
            panic!("one runner recorded: {records:?}");
        };
        let (_, pid) = read_record(record).expect("a runner's record");
        assert!(pid_alive(pid), "the runner is still starting");
        let log = record.with_extension("log");
        assert!(log.exists(), "its log: {}", log.display());

        plane.shutdown().await;
        assert!(!pid_alive(pid), "the shutdown stopped the runner");
        assert!(!record.exists());
        // Removed off the runtime, and waited for.
        assert!(!log.exists(), "the shutdown left its log");
    }

    /// A record write still running when its runner is removed (by the shutdown, its
    /// provisioning dropped; or by a removal) puts no record in place after the removal,
    /// where it renamed back the record of a runner that no longer existed.
    #[tokio::test]
    async fn a_record_written_after_its_runner_was_removed_is_not_put_in_place() {
        for by_shutdown in [true, false] {
            let left = record_write_held_while_removed(by_shutdown).await;
            assert!(
                left.is_empty(),
                "removed by {}: left {left:?}",
                if by_shutdown {
                    "the shutdown"
                } else {
                    "remove"
                }
            );
        }
    }

    /// Provisions a runner whose record write is held until its runner has been removed
    /// (`by_shutdown`: its provisioning dropped, then the plane shut down; or removed), then
    /// released. The records and staged records left once the write has ended.
    async fn record_write_held_while_removed(by_shutdown: bool) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        // A runner that never answers health.
        let binary = runner_script(dir.path(), "#!/bin/sh\nexec sleep 30\n");
        let plane = Arc::new(
            ProcessControlPlane::new(config_in(dir.path(), binary))
                .await
                .expect("plane"),
        );
        let (entered, entered_rx) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        *plane.record_gate.lock().expect("gate") = Some(RecordGate {
            entered,
            release: release_rx,
        });
        let cancel = CancellationToken::new();
        let provisioning = tokio::spawn({
            let (plane, cancel) = (Arc::clone(&plane), cancel.clone());
            async move { plane.provision("g", 1, &cancel).await }
        });
        let entered_rx = tokio::task::spawn_blocking(move || {
            entered_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the record write is held");
            entered_rx
        })
        .await
        .expect("waited");
        let info = match plane.lock().as_slice() {
            [runner] => runner.info.clone(),
            other => panic!("one runner starting: {other:?}"),
        };

        let provisioning = if by_shutdown {
            provisioning.abort();
            assert!(provisioning.await.is_err_and(|e| e.is_cancelled()));
            plane.shutdown().await;
            None
        } else {
            plane.remove(&info).await.expect("removed");
            Some(provisioning)
        };
        assert!(plane.lock().is_empty());
        release.send(()).expect("the write is held");
        let ended =
            tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(5)))
                .await
                .expect("waited");
        assert!(
            matches!(ended, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)),
            "the write has not ended: {ended:?}"
        );
        if let Some(provisioning) = provisioning {
            let result = provisioning.await.expect("provisioning");
            assert!(
                matches!(&result, Err(ControlPlaneError::Failed(m)) if m.contains("was stopped while starting")),
                "{result:?}"
            );
            plane.shutdown().await;
        }
        std::fs::read_dir(&plane.config.state_dir)
            .expect("state dir")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.contains(&info.id) && name.contains(RECORD_EXT))
            .collect()
    }

    /// A removal cut short while its runner drains (the control loop drops the removals
    /// under way when the npm stops, without waiting for them) leaves the runner in the
    /// table, stopping and unlisted, with its record: the shutdown stops it and removes
    /// the record.
    #[tokio::test]
    async fn a_removal_cut_short_leaves_its_runner_to_the_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A runner whose drain outlasts the grace: SIGTERM leaves it running.
        let binary = runner_script(dir.path(), "#!/bin/sh\ntrap '' TERM\nexec sleep 30\n");
        let mut config = config_in(dir.path(), binary);
        config.stop_grace = Duration::from_secs(1);
        let plane = ProcessControlPlane::new(config).await.expect("plane");
        // A ready runner, as its provisioning leaves it.
        let id = "r-00000000cafe".to_owned();
        let child = plane
            .runner_command(1, &socket_dir(&id))
            .stdin(Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("running");
        let info = RunnerInfo {
            id: id.clone(),
            address: "127.0.0.1:1".into(),
            group: "g".into(),
            created: SystemTime::now(),
        };
        let record = plane.record_path(&id);
        write_record(&record, &info, pid).expect("record");
        plane.lock().push(Spawned {
            info: info.clone(),
            pid,
            child: Some(child),
            phase: Phase::Ready,
            record: Arc::default(),
        });
        // Its trap is set once it runs the script's sleep.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.starts_with("sleep"))
        {
            assert!(std::time::Instant::now() < deadline, "the runner never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let cut = tokio::time::timeout(Duration::from_millis(300), plane.remove(&info)).await;
        assert!(cut.is_err(), "the removal ended: {cut:?}");
        assert!(pid_alive(pid), "the runner is still draining");
        let phases: Vec<(String, Phase)> = plane
            .lock()
            .iter()
            .map(|r| (r.info.id.clone(), r.phase))
            .collect();
        assert_eq!(phases, vec![(id.clone(), Phase::Stopping)]);
        assert!(plane.list().await.expect("lists").is_empty());
        assert!(record.exists());

        plane.shutdown().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the shutdown left the runner running"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!record.exists());
        assert!(plane.lock().is_empty());
    }

    /// With `FN_PROCESS_KEEP_RUNNERS`, the npm's shutdown leaves a ready runner running with
    /// its record (and stops one still starting), and the next npm adopts it.
    #[tokio::test]
    async fn kept_runners_outlive_the_shutdown_and_the_next_npm_adopts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = runner_script(dir.path(), "#!/bin/sh\nexec sleep 30\n");
        // The runners' health, answered in this process for both.
        let (_health, address) = health_answered_here().await;
        let mut config = config_in(dir.path(), binary);
        config.stop_grace = Duration::from_secs(2);
        config.keep_runners = true;
        let plane = ProcessControlPlane::new(config.clone())
            .await
            .expect("plane");
        // A ready runner and one still starting, as their provisionings leave them.
        let mut made = Vec::new();
        for (id, phase) in [
            ("r-00000000c0de", Phase::Ready),
            ("r-00000000beef", Phase::Starting),
        ] {
            let child = plane
                .runner_command(1, &socket_dir(id))
                .stdin(Stdio::null())
                .kill_on_drop(false)
                .spawn()
                .expect("spawn");
            let pid = child.id().expect("running");
            let info = RunnerInfo {
                id: id.to_owned(),
                address: address.clone(),
                group: "g".into(),
                created: SystemTime::now(),
            };
            write_record(&plane.record_path(id), &info, pid).expect("record");
            plane.lock().push(Spawned {
                info,
                pid,
                child: Some(child),
                phase,
                record: Arc::default(),
            });
            made.push((id, pid));
        }
        let [(kept, kept_pid), (starting, starting_pid)] = made[..] else {
            unreachable!("two runners made");
        };
        // Both past their script's last exec: while a process execs, its environment reads
        // empty, and it would not be taken for its runner.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for pid in [kept_pid, starting_pid] {
            while !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep"))
            {
                assert!(std::time::Instant::now() < deadline, "a runner never ran");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        plane.shutdown().await;
        assert!(
            is_runner_process(kept_pid, kept),
            "the ready runner still runs"
        );
        assert!(plane.record_path(kept).exists(), "with its record");
        assert!(
            !is_runner_process(starting_pid, starting),
            "the starting one is stopped"
        );
        assert!(!plane.record_path(starting).exists());
        drop(plane);

        // The next npm adopts it (and, not keeping them, stops it at its own shutdown).
        config.keep_runners = false;
        let next = ProcessControlPlane::new(config).await.expect("plane");
        let listed: Vec<String> = next
            .list()
            .await
            .expect("lists")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, [kept]);
        next.shutdown().await;
        assert!(!is_runner_process(kept_pid, kept));
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}
