//! The runners' logs in the state directory (`<id>.log`, and `<id>.log.1` once rotated):
//! how they are opened, bounded while their runner writes them, and how many of them are
//! kept once their runner failed.
//!
//! A runner writes its log itself: the file is its stdout and stderr, so that it outlives
//! the npm (a restarted npm adopts it) and costs the npm no copy per line. The npm cannot
//! reopen the file for it, so the log is opened with `O_APPEND` and bounded as logrotate's
//! `copytruncate` does it: past the bound, the npm copies it to `<id>.log.1` (replacing the
//! previous one), truncates it and writes a line saying so, and the runner's next write lands
//! at the new end. Lines written between the copy and the truncation are lost.
//!
//! Not here: when a log is kept or removed with its runner (the plane's `RunnerLog`).

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Size past which a runner's log is rotated ([`super::ProcessConfig::log_bound`]): a
/// runner's log and its `.1` hold at most twice this, and what the runner writes between two
/// checks (one a control-loop tick).
pub const LOG_BOUND: u64 = 16 * 1024 * 1024;

/// Logs of runners that failed (or ended on their own) kept in the state directory
/// ([`super::ProcessConfig::kept_logs`]): a group whose runner cannot start is retried
/// every minute, and each try left one more.
pub const KEPT_LOGS: usize = 16;

const LOG_EXT: &str = "log";

/// Where runner `id`'s stdout and stderr go: its own log and its functions' output.
pub(super) fn log_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(format!("{id}.{LOG_EXT}"))
}

/// Where the log at `log` is copied when rotated: `<id>.log.1`.
pub(super) fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Creates (or empties) a runner's log for its runner to append to, readable by the npm's
/// user alone (its functions' output is in it); a previous rotation of it is removed.
pub(super) fn create(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        // Written at its end, wherever that is: after the npm truncates it, the runner's
        // next line lands at its start, not at its old offset (which left a hole as large
        // as the bound). Emptied below: `O_TRUNC` does not go with `O_APPEND` here.
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(0)?;
    super::remove_quietly(&rotated_path(path));
    Ok(file)
}

/// Rotates the log at `path` when it is larger than `bound`: copies it to `<id>.log.1`,
/// truncates it and writes a line saying where the earlier lines are. Whether it was
/// rotated; a log that is gone is not an error (its runner was forgotten meanwhile).
///
/// # Errors
/// The copy, truncation or note that failed.
pub(super) fn rotate_if_over(path: &Path, bound: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= bound {
        return Ok(false);
    }
    let rotated = rotated_path(path);
    // Copies the mode (0600) with the contents.
    std::fs::copy(path, &rotated)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.set_len(0)?;
    let name = rotated.file_name().map_or_else(
        || rotated.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    writeln!(
        file,
        "fn-npm: this log passed {bound} bytes ({size}): the lines before are in {name}, \
         earlier ones are dropped"
    )?;
    Ok(true)
}

/// Removes a runner's log and its rotation, off the runtime (a log may be large), in the
/// background.
pub(super) fn remove_in_background(log: &Path) {
    super::remove_in_background(&rotated_path(log));
    super::remove_in_background(log);
}

/// Both of a runner's log files, removed off the runtime and waited for (the npm's
/// shutdown).
pub(super) async fn remove_and_wait(log: PathBuf) {
    let rotated = fn_lifecycle::fs::remove_tree(rotated_path(&log));
    let log = fn_lifecycle::fs::remove_tree(log);
    // A removal that could not start said so.
    let _ = futures::future::join(log, rotated).await;
}

/// The rotation of the live runners' logs, at most one pass at a time, off the runtime.
#[derive(Debug, Default)]
pub(super) struct Rotation {
    /// Set while a pass runs: a slow disk makes the next check wait for it, not pile up
    /// passes on the blocking pool.
    busy: Arc<AtomicBool>,
}

impl Rotation {
    /// Starts a pass over `logs` on the blocking pool unless one is under way (or there is no
    /// runtime); the handle of the pass started.
    pub(super) fn start(
        &self,
        logs: Vec<PathBuf>,
        bound: u64,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if logs.is_empty() {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if self.busy.swap(true, Ordering::AcqRel) {
            return None;
        }
        let busy = Arc::clone(&self.busy);
        Some(runtime.spawn_blocking(move || {
            for log in logs {
                match rotate_if_over(&log, bound) {
                    Ok(true) => {
                        tracing::info!(log = %log.display(), bound, "runner log rotated");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        log = %log.display(),
                        error = %e,
                        "cannot rotate a runner's log; it grows until the next check"
                    ),
                }
            }
            busy.store(false, Ordering::Release);
        }))
    }
}

/// The logs kept of runners that are gone (failed to start, ended on their own), oldest
/// first, at most a bound of them: the oldest is removed when one more is kept.
#[derive(Debug)]
pub(super) struct Kept {
    logs: Mutex<VecDeque<PathBuf>>,
    max: usize,
}

impl Kept {
    /// The logs in `state_dir` that are not those of the runners `live` (adopted), oldest
    /// first: left by earlier npms. Those past `max` are removed, the oldest first.
    pub(super) fn scan(state_dir: &Path, live: &[&str], max: usize) -> Kept {
        let mut found: Vec<(SystemTime, PathBuf)> = Vec::new();
        let mut orphans = Vec::new();
        let entries = std::fs::read_dir(state_dir).into_iter().flatten().flatten();
        for path in entries.map(|e| e.path()) {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".log.1") {
                // A rotation whose log is gone (removed while it was copied).
                if super::is_runner_id(id) && !log_path(state_dir, id).exists() {
                    orphans.push(path);
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".log") else {
                continue;
            };
            if !super::is_runner_id(id) || live.contains(&id) {
                continue;
            }
            let modified = path
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, path));
        }
        for orphan in orphans {
            super::remove_in_background(&orphan);
        }
        found.sort();
        let kept = Kept {
            logs: Mutex::new(found.into_iter().map(|(_, path)| path).collect()),
            max,
        };
        kept.prune();
        kept
    }

    /// Keeps the log at `log` (its runner is gone), removing the oldest kept past the bound.
    pub(super) fn keep(&self, log: PathBuf) {
        self.lock().push_back(log);
        self.prune();
    }

    fn prune(&self) {
        let removed: Vec<PathBuf> = {
            let mut logs = self.lock();
            let over = logs.len().saturating_sub(self.max);
            logs.drain(..over).collect()
        };
        for log in removed {
            tracing::info!(log = %log.display(), kept = self.max, "removing the oldest kept runner log");
            remove_in_background(&log);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PathBuf>> {
        self.logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::super::tests::{config_in, failed_provisioning, runner_script};
    use super::super::{ControlPlane, ControlPlaneError, ProcessConfig, ProcessControlPlane};
    use super::*;

    /// A plane's configuration in `dir` (its state in `dir/state`) whose runner binary is the
    /// shell script `script`.
    fn config_running(dir: &Path, script: &str) -> ProcessConfig {
        config_in(dir, runner_script(dir, script))
    }

    /// The names in `state` that end with `suffix`, sorted.
    fn names(state: &Path, suffix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(state)
            .expect("state dir")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(suffix))
            .collect();
        names.sort();
        names
    }

    /// Waits (5 s at most) until `done` holds: removals run on threads of their own.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A runner writing 1 MB at ~200 KB/s (never answering health) past a 256 KiB bound:
    /// the lists rotate its log, and neither file passes twice the bound (a list may come
    /// a second late on a loaded machine); the runner's writes after a truncation land at
    /// the file's start (no hole: without `O_APPEND` the file keeps its size).
    #[tokio::test]
    async fn a_runners_log_is_rotated_past_its_bound() {
        const BOUND: u64 = 256 * 1024;
        let dir = tempfile::tempdir().expect("tempdir");
        let line = "x".repeat(96);
        let script = format!(
            "#!/bin/sh\ni=0\nwhile [ $i -lt 100 ]; do\n  j=0\n  while [ $j -lt 100 ]; do echo \"$i {line}\" >&2; j=$((j+1)); done\n  sleep 0.04\n  i=$((i+1))\ndone\necho 'all written' >&2\nexec sleep 30\n"
        );
        let mut config = config_running(dir.path(), &script);
        config.log_bound = BOUND;
        config.start_timeout = Duration::from_secs(60);
        let state = config.state_dir.clone();
        let plane = std::sync::Arc::new(ProcessControlPlane::new(config).await.expect("plane"));
        let cancel = CancellationToken::new();
        let provisioning = tokio::spawn({
            let (plane, cancel) = (std::sync::Arc::clone(&plane), cancel.clone());
            async move { plane.provision("g", 1, &cancel).await }
        });
        // The control loop's lists, every 20 ms here, until the runner has written it all.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let log = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the runner wrote it all"
            );
            plane.list().await.expect("lists");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let logs = names(&state, ".log");
            let Some(log) = logs.first().map(|n| state.join(n)) else {
                continue;
            };
            let written = |path: &Path| {
                std::fs::read_to_string(path).is_ok_and(|t| t.contains("all written"))
            };
            if written(&log) || written(&rotated_path(&log)) {
                break log;
            }
        };
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        let rotated = rotated_path(&log);
        assert!(size(&log) < 2 * BOUND, "log of {} bytes", size(&log));
        assert!(rotated.exists(), "rotated at least once");
        assert!(
            size(&rotated) < 2 * BOUND,
            "rotation of {} bytes",
            size(&rotated)
        );
        let text = std::fs::read_to_string(&rotated).expect("rotation");
        // The runner may write a line between the truncation and the note.
        assert!(
            text.contains("fn-npm: this log passed 262144 bytes"),
            "the rotation has the npm's note: {:?}",
            &text[..text.len().min(120)]
        );
        assert!(!text.contains('\0'), "no hole");

        cancel.cancel();
        let _ = provisioning.await;
        plane.shutdown().await;
        assert!(
            !log.exists() && !rotated.exists(),
            "the shutdown removed both"
        );
    }

    /// Twenty runners that exit before answering health keep 16 logs, the newest; a plane
    /// started over 20 logs left by earlier npms keeps the 16 newest.
    #[tokio::test]
    async fn at_most_16_logs_of_failed_runners_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_running(dir.path(), "#!/bin/sh\necho 'cannot start' >&2\nexit 2\n");
        let state = config.state_dir.clone();
        let plane = ProcessControlPlane::new(config.clone())
            .await
            .expect("plane");
        let mut failed = Vec::new();
        for _ in 0..20 {
            let message = failed_provisioning(&plane).await;
            let id = message.split_whitespace().nth(1).expect("a runner id");
            failed.push(format!("{id}.log"));
        }
        let newest: Vec<String> = {
            let mut newest = failed[4..].to_vec();
            newest.sort();
            newest
        };
        until("16 logs kept", || names(&state, ".log") == newest).await;
        drop(plane);

        // Twenty left by earlier npms, a second apart: the 16 newest stay.
        for name in names(&state, ".log") {
            std::fs::remove_file(state.join(name)).expect("remove");
        }
        let base = SystemTime::now() - Duration::from_secs(100);
        let mut planted = Vec::new();
        for i in 0..20u64 {
            let name = format!("r-{i:012x}.log");
            let file = std::fs::File::create(state.join(&name)).expect("plant");
            file.set_modified(base + Duration::from_secs(i))
                .expect("mtime");
            planted.push(name);
        }
        let plane = ProcessControlPlane::new(config).await.expect("plane");
        let newest = planted[4..].to_vec();
        until("the 16 newest kept at start", || {
            names(&state, ".log") == newest
        })
        .await;
        drop(plane);
    }

    /// A runner that cannot be started leaves no log behind.
    #[tokio::test]
    async fn a_failed_spawn_leaves_no_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_running(dir.path(), "#!/nonexistent/interpreter\n");
        let state = config.state_dir.clone();
        let plane = ProcessControlPlane::new(config).await.expect("plane");
        let result = plane.provision("g", 1, &CancellationToken::new()).await;
        let Err(ControlPlaneError::Failed(message)) = result else {
            panic!("the provisioning failed: {result:?}");
        };
        assert!(message.contains("starting "), "{message}");
        assert_eq!(names(&state, ".log"), Vec::<String>::new());
    }
}
