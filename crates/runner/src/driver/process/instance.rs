//! [`ProcessInstance`]: one running function process and the HTTP/1 connection to it.
//!
//! A reaper task owns the `Child`: it waits for the process to exit (or for a kill request,
//! which it carries out while the process is still unreaped, so the process group id cannot
//! have been reused), publishes the exit status, kills what is left of the process group
//! and of the cgroups, removes the instance directory and only then the cgroups: what the
//! function wrote into its directory (a tmpfs in namespaces, see `tmpfs`; the page cache of
//! its files otherwise) is charged to its memory cgroup, and a cgroup removed while those
//! pages live stays in the kernel, dying, until they are freed. The directory's removal also
//! takes the copies of its tmpfs out of the mount namespaces of instances started later.
//! Everything else reads the exit status from a `watch` channel, so "has it exited?" is an
//! event, not a poll. If the runtime drops the reaper first (shutdown), a drop guard does the
//! same cleanup in the same order, best effort: made with the instance and moved into the
//! reaper's task, so that a task dropped without ever being polled (spawned by a set-up on
//! the blocking pool after the scheduler closed) cleans up too.
//!
//! The instance also holds the wrapper shell's *lifeline* (its stdin pipe): when that closes
//! — the instance is dropped, or the runner dies — the wrapper's watchdog kills the process
//! group, so functions never outlive their runner as orphans.
//!
//! Calls go over the instance's socket through the drivers' shared [`SocketClient`].

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cgroup::InstanceCgroup;
use crate::driver::output::{self, Labels, Stream as OutputStream};
use crate::driver::socket::{
    Liveness, PROCESS_END_GRACE, SocketClient, remove_instance_dir, set_instance_dir_aside,
};
use crate::driver::{BodyStream, DriverError, FunctionRequest, FunctionResponse, Instance};

/// How the process ended.
#[derive(Debug, Clone)]
enum Exit {
    Status(ExitStatus),
    /// `wait` itself failed; the process is treated as gone.
    Unknown(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(status) => match (status.code(), status.signal()) {
                (Some(code), _) => write!(f, "exited with status {code}"),
                (None, Some(signal)) => match Signal::try_from(signal) {
                    Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                    Err(_) => write!(f, "killed by signal {signal}"),
                },
                (None, None) => write!(f, "exited ({status})"),
            },
            Exit::Unknown(e) => write!(f, "exited (wait failed: {e})"),
        }
    }
}

/// How the process ended, for the call's error and the log: with the OOM killer named
/// when it killed a process in the instance's cgroup (`oom_kills`), where "killed by signal
/// 9" left the operator to guess.
fn exit_message(exit: &Exit, oom_kills: u64) -> String {
    if oom_kills == 0 {
        return exit.to_string();
    }
    let killed =
        matches!(exit, Exit::Status(status) if status.signal() == Some(Signal::SIGKILL as i32));
    if killed {
        format!("{exit}: it used more than its memory limit (the kernel's OOM killer)")
    } else {
        format!(
            "{exit}, after the kernel's OOM killer killed a process of it for using more than \
             its memory limit"
        )
    }
}

/// A freshly spawned child and what belongs to it.
pub(super) struct Spawned {
    pub(super) child: Child,
    pub(super) labels: Labels,
    pub(super) dir: PathBuf,
    pub(super) socket: PathBuf,
    pub(super) cgroup: Option<InstanceCgroup>,
    /// The wrapper shell's stdin (see `WRAPPER_SCRIPT`); `None` for an unwrapped child.
    pub(super) lifeline: Option<ChildStdin>,
    /// Calls the instance takes at once: it keeps up to this many connections.
    pub(super) concurrency: u32,
}

/// State shared by the instance handle and its reaper task.
#[derive(Debug)]
struct Shared {
    labels: Arc<Labels>,
    pid: u32,
    dir: PathBuf,
    cgroup: Option<InstanceCgroup>,
    /// Killed by the runner, and how the process ended once it has been reaped.
    liveness: Arc<Liveness>,
    /// Asks the reaper to kill the process group.
    kill: CancellationToken,
    /// Cancelled when the reaper has finished cleaning up (cgroup and directory removed).
    gone: CancellationToken,
}

/// A function instance running as a child process. Killed when dropped.
pub struct ProcessInstance {
    shared: Arc<Shared>,
    client: SocketClient,
    /// Held for the instance's lifetime: when it closes (the instance is dropped, or the
    /// runner dies) the wrapper's watchdog kills the process group.
    lifeline: Option<ChildStdin>,
}

impl fmt::Debug for ProcessInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessInstance")
            .field("id", &self.shared.labels.instance)
            .field("pid", &self.shared.pid)
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl ProcessInstance {
    /// Takes over a spawned child: moves it into its cgroup, starts the output loggers and
    /// the reaper. Called on a blocking thread of the runtime (see `setup`), where
    /// `tokio::spawn` reaches the runtime that started it.
    ///
    /// # Errors
    /// A message when the child has no pid (already reaped) or cannot join its cgroup; the
    /// child is killed and cleaned up then.
    pub(super) fn spawned(spawned: Spawned) -> Result<Self, String> {
        let Spawned {
            mut child,
            labels,
            dir,
            socket,
            cgroup,
            lifeline,
            concurrency,
        } = spawned;
        let labels = Arc::new(labels);
        let Some(pid) = child.id() else {
            remove_instance_dir(&dir);
            // Nothing joined it.
            if let Some(cgroup) = &cgroup {
                cgroup.remove_now();
            }
            return Err("the process exited before it could be watched".into());
        };
        let join_error = cgroup.as_ref().and_then(|cgroup| cgroup.add(pid).err());

        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(output::log_lines(
                stdout,
                OutputStream::Stdout,
                labels.clone(),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(output::log_lines(
                stderr,
                OutputStream::Stderr,
                labels.clone(),
            ));
        }

        let (liveness, exit_tx) = Liveness::new(PROCESS_END_GRACE);
        let shared = Arc::new(Shared {
            labels: labels.clone(),
            pid,
            dir,
            cgroup,
            liveness: liveness.clone(),
            kill: CancellationToken::new(),
            gone: CancellationToken::new(),
        });
        // The guard before the task: a task spawned while the runtime shuts down (this runs
        // on the blocking pool, which outlives the scheduler) is dropped without ever being
        // polled, and the guard still cleans up then.
        let charge = Reaped {
            shared: Arc::clone(&shared),
            child,
            finished: false,
        };
        tokio::spawn(reap(charge, exit_tx));
        let instance = ProcessInstance {
            shared,
            client: SocketClient::new(
                socket,
                labels.instance.as_str().into(),
                liveness,
                concurrency,
            ),
            lifeline,
        };
        if let Some(e) = join_error {
            instance.kill();
            return Err(e);
        }
        Ok(instance)
    }

    /// Lets a wrapped child exec its program (it has joined its cgroup by now). A failed
    /// write means the child is already gone, which waiting for its listener reports.
    pub(super) async fn open_gate(&mut self) {
        if let Some(lifeline) = self.lifeline.as_mut()
            && let Err(e) = lifeline.write_all(b"go\n").await
        {
            tracing::debug!(instance = %self.id(), error = %e, "cannot open the gate");
        }
    }

    /// The instance id (also the name of its directory and cgroup).
    pub fn id(&self) -> &str {
        &self.shared.labels.instance
    }

    /// The instance's private directory, holding its socket.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The listener socket path (`<dir>/lsnr.sock`).
    pub fn socket_path(&self) -> &Path {
        self.client.socket()
    }

    /// The instance's cgroups (the memory one first, when it has one): one on cgroup v2, one
    /// per hierarchy on v1; none when no limit is enforced.
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.shared
            .cgroup
            .as_ref()
            .map_or(&[], InstanceCgroup::dirs)
    }

    /// Waits until the process has been reaped and its cgroup and directory removed.
    pub async fn wait_gone(&self) {
        self.shared.gone.cancelled().await;
    }

    pub(super) fn client(&self) -> &SocketClient {
        &self.client
    }
}

impl Instance for ProcessInstance {
    fn call(
        &self,
        request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        self.shared.labels.took_call(&request.call_id);
        Box::pin(self.client.send(request, body))
    }

    fn is_alive(&self) -> bool {
        self.shared.liveness.is_alive()
    }

    fn kill(&self) {
        if self.shared.liveness.mark_killed() {
            return;
        }
        // The reaper signals the group while the leader is unreaped (see `reap`).
        self.shared.kill.cancel();
        // The socket goes now, so nothing can connect to a dying instance; the reaper
        // removes the directory (and what the process wrote into it while dying) and the
        // cgroup once the process is gone.
        set_instance_dir_aside(&self.shared.dir);
    }

    fn pid(&self) -> Option<u32> {
        Some(self.shared.pid)
    }

    fn wait_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(ProcessInstance::wait_gone(self))
    }
}

impl Drop for ProcessInstance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs the instance's process group, whose id is the leader's pid (`process_group(0)`).
fn signal_group(shared: &Shared) {
    match killpg(Pid::from_raw(shared.pid as i32), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            instance = %shared.labels.instance,
            error = %e,
            "cannot kill function process group"
        ),
    }
}

/// The reaper's charge: the child and what belongs to it. Made where the instance is
/// spawned, before the reaper's task, and moved into it, so that it cleans up whenever the
/// reaper is dropped before it finished — the runtime shutting down with the instance still
/// around, the task polled or not (a task spawned once the scheduler has closed never is).
/// Synchronous and best effort: kill the group, remove the directory, and leave the cgroup
/// removal (which must wait for the kernel) to a thread.
struct Reaped {
    shared: Arc<Shared>,
    /// Dropped after [`Drop::drop`] has signalled the group (a struct's fields are dropped
    /// after its `drop`): tokio's `Child`, dropped, kills its leader (`kill_on_drop`) and
    /// reaps it if it has exited, and from then on its pid, the group's id, could name
    /// another process group.
    child: Child,
    finished: bool,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.shared.liveness.ended().borrow().is_none() {
            // Not reaped (the child is dropped after this), so the pid is still ours.
            signal_group(&self.shared);
        }
        if let Some(cgroup) = &self.shared.cgroup {
            cgroup.kill_members();
        }
        // The directory first, the cgroup once it is gone (see `reap`).
        let dir_removed = remove_instance_dir(&self.shared.dir);
        if let Some(cgroup) = &self.shared.cgroup {
            cgroup.remove_in_background(dir_removed);
        }
    }
}

/// Owns the child (in `charge`) until it is reaped, then cleans up after it.
async fn reap(mut charge: Reaped, exit_tx: watch::Sender<Option<String>>) {
    let shared = Arc::clone(&charge.shared);
    let (exit, killed_here) = tokio::select! {
        status = charge.child.wait() => (status, false),
        () = shared.kill.cancelled() => {
            // The leader is not reaped yet, so its pid still names this process group.
            signal_group(&shared);
            (charge.child.wait().await, true)
        }
    };
    let exit = match exit {
        Ok(status) => Exit::Status(status),
        Err(e) => Exit::Unknown(e.to_string()),
    };
    // The count covers the instance's whole life: a process the OOM killer took earlier
    // is no reason for an end the runner brought about.
    let oom_kills = match &shared.cgroup {
        Some(cgroup) if !killed_here => cgroup.oom_kills(),
        _ => 0,
    };
    let exit = exit_message(&exit, oom_kills);
    tracing::debug!(instance = %shared.labels.instance, pid = shared.pid, %exit, "function process ended");
    exit_tx.send_replace(Some(exit));
    // The leader exited on its own: kill what it left in its group. Its pid cannot be
    // reused while any member remains; if none does this finds nothing (ESRCH). Then what
    // left the group, so that nothing writes into the directory while it is removed.
    signal_group(&shared);
    if let Some(cgroup) = &shared.cgroup {
        cgroup.kill_all_members().await;
    }
    // The directory (its tmpfs) before the cgroup its pages are charged to (see the module
    // docs). Gone means gone: a runner shutting down waits for this. An error only says the
    // removal's thread is gone, which `remove_tree` logs.
    let _ = remove_instance_dir(&shared.dir).await;
    if let Some(cgroup) = &shared.cgroup {
        cgroup.remove().await;
    }
    charge.finished = true;
    shared.gone.cancel();
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use super::super::cgroup::CgroupMode;
    use super::*;

    /// Whether process `pid` runs (a zombie does not: it only waits to be reaped).
    fn runs(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    }

    /// A reaper whose task never ran — spawned by a set-up on the blocking pool after the
    /// scheduler closed (a runner shutting down), and dropped with the scheduler — leaves no
    /// process, directory or cgroup: its guard goes with the task.
    #[test]
    fn a_reaper_dropped_before_it_ran_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = "deadbeef-1";
        let dir = tmp.path().join(id);
        std::fs::create_dir(&dir).expect("the instance directory");
        // A fake cgroupfs: a plain directory under a v1 parent.
        let parent = tmp.path().join("memory");
        let cgroup_dir = parent.join(id);
        std::fs::create_dir_all(&cgroup_dir).expect("the cgroup");
        let cgroup = InstanceCgroup::existing(
            &CgroupMode::V1 { parent },
            &CgroupMode::Unenforced {
                reason: "test".into(),
            },
            id,
        )
        .expect("the cgroup");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let entered = runtime.enter();
        // A process group of two: the leader, and a member only the group's signal reaches.
        let member_file = tmp.path().join("member");
        let child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "sleep 600 & echo $! > {0}.new && mv {0}.new {0}; exec sleep 600",
                member_file.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let leader = child.id().expect("the leader's pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let member = loop {
            if let Ok(pid) = std::fs::read_to_string(&member_file) {
                break pid.trim().parse::<u32>().expect("the member's pid");
            }
            assert!(Instant::now() < deadline, "the member never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let instance = ProcessInstance::spawned(Spawned {
            child,
            labels: Labels::new("a".into(), "f".into(), id.into(), "call"),
            dir: dir.clone(),
            socket: dir.join("lsnr.sock"),
            cgroup: Some(cgroup),
            lifeline: None,
            concurrency: 1,
        })
        .expect("spawned");
        // The fake's cgroup.procs is a plain file, which would keep the fake cgroup from
        // being removed; the kernel's goes with its cgroup.
        let procs = cgroup_dir.join("cgroup.procs");
        assert_eq!(
            std::fs::read_to_string(&procs).expect("procs"),
            leader.to_string()
        );
        std::fs::remove_file(&procs).expect("procs removed");
        drop(entered);
        // The reaper's task is queued, never polled: the scheduler drops it as it shuts down.
        drop(runtime);
        drop(instance);

        let removing = tmp.path().join(format!("{id}.removing"));
        let left = || {
            let mut left: Vec<String> = [&dir, &removing, &cgroup_dir]
                .into_iter()
                .filter(|path| path.exists())
                .map(|path| path.display().to_string())
                .collect();
            left.extend(
                [leader, member]
                    .into_iter()
                    .filter(|pid| runs(*pid))
                    .map(|pid| format!("process {pid}")),
            );
            left
        };
        let mut remaining = left();
        while !remaining.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            remaining = left();
        }
        if runs(member) {
            // Not the test's child: nothing else reaps it.
            let _ = nix::sys::signal::kill(Pid::from_raw(member as i32), Signal::SIGKILL);
        }
        assert!(remaining.is_empty(), "left behind: {remaining:?}");
    }

    #[test]
    fn an_exit_names_the_oom_killer_when_it_struck() {
        let killed = Exit::Status(ExitStatus::from_raw(9));
        let failed = Exit::Status(ExitStatus::from_raw(1 << 8));
        assert_eq!(exit_message(&killed, 0), "killed by signal 9 (SIGKILL)");
        assert_eq!(
            exit_message(&killed, 1),
            "killed by signal 9 (SIGKILL): it used more than its memory limit (the kernel's OOM \
             killer)"
        );
        assert_eq!(exit_message(&failed, 0), "exited with status 1");
        assert_eq!(
            exit_message(&failed, 2),
            "exited with status 1, after the kernel's OOM killer killed a process of it for using \
             more than its memory limit"
        );
    }
}
