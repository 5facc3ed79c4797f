//! An instance's synchronous set-up, on a blocking thread: its directory, its cgroups, the
//! fork and exec of its process and the move into the cgroups ([`Setup::run`]).
//!
//! These are system calls that take the time they take, and on the runtime thread that
//! carries the start every other call of that thread waited for them (with
//! `FN_WORKER_THREADS=1`, every call of the runner). Measured with `cargo bench -p fn-runner
//! --bench cold_start` (median of 50 starts): a tmpfs mount for an instance in namespaces
//! (the default on a root runner) held the thread 2.7 ms; a fork (a function user without
//! namespaces: the standard library cannot use `posix_spawn` then) copies the runner's page
//! tables, 0.8 ms at a few MiB, 3–5 ms at 32 MiB more, about 50 ms at 256 MiB more.
//! [`set_up_off_the_runtime_thread`] runs them on tokio's blocking pool, which leaves the
//! thread under 0.2 ms of its own work per start; the start goes on (the gate, waiting for
//! the listener) on the runtime as before. What remains: a fork locks the runner's whole
//! address space while it copies it, so a runtime thread that faults a page in meanwhile
//! still waits for it.
//!
//! It owns nothing of the driver: what the set-up needs is copied into [`Setup`], so the
//! blocking task can outlive a start that was given up.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::cgroup::{self, CgroupMode};
use super::instance::{ProcessInstance, Spawned};
use super::{FunctionUser, INSTANCE_TMP, tmpfs};
use crate::driver::DriverError;
use crate::driver::output::Labels;
use crate::driver::socket::remove_instance_dir;

/// What one instance's set-up needs, owned.
pub(super) struct Setup {
    /// The instance id: the name of its cgroups.
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) socket: PathBuf,
    pub(super) labels: Labels,
    /// Who the function runs as (`None`: the runner's own user).
    pub(super) user: Option<FunctionUser>,
    /// In namespaces of its own (then its directory is a tmpfs of its own).
    pub(super) namespaced: bool,
    pub(super) memory_mb: u64,
    pub(super) concurrency: u32,
    pub(super) memory: CgroupMode,
    pub(super) pids: CgroupMode,
    pub(super) pids_limit: u32,
    /// The child's command, built on the runtime thread.
    pub(super) cmd: Command,
    /// The program, for the error when it cannot run.
    pub(super) program: PathBuf,
    /// A test's hold inside the set-up (see the tests).
    #[cfg(test)]
    pub(super) hold: Option<tests::Hold>,
}

/// Runs `setup` on tokio's blocking pool and returns its instance.
///
/// If the start is given up (its future dropped) while the set-up runs, the set-up still
/// finishes, and tokio drops its outcome where nobody waits for it: an instance dropped is
/// an instance killed (`ProcessInstance`'s `Drop`), whose reaper removes its directory and
/// cgroups, as for any instance. The blocking pool outlives the scheduler: a set-up that
/// ends after the runtime began shutting down spawns a reaper that never runs, and the
/// reaper's guard, made before its task, cleans up then (see `instance`). A set-up that
/// fails removes what it made itself.
///
/// # Errors
/// What [`Setup::run`] reports; [`DriverError::Runner`] when the blocking pool has no
/// thread to give and can start none (tokio panics then: caught here, as a start the
/// runner could not make), or the set-up panicked.
pub(super) async fn set_up_off_the_runtime_thread(
    setup: Setup,
) -> Result<ProcessInstance, DriverError> {
    let id = setup.id.clone();
    let task = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::spawn_blocking(move || setup.run())
    }))
    .map_err(|panic| {
        DriverError::Runner(format!(
            "instance {id}: no thread for its set-up: {}",
            panic_message(&*panic)
        ))
    })?;
    task.await.map_err(|e| {
        DriverError::Runner(format!("instance {id}: its set-up did not finish: {e}"))
    })?
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

impl Setup {
    /// Creates the instance's directory and cgroups, starts its process and moves it into
    /// the cgroups. Blocking: see [`set_up_off_the_runtime_thread`].
    ///
    /// # Errors
    /// [`DriverError::Start`] when any step fails; what the earlier ones made is removed (a
    /// process that started is killed and cleaned up by its reaper).
    pub(super) fn run(self) -> Result<ProcessInstance, DriverError> {
        let Setup {
            id,
            dir,
            socket,
            labels,
            user,
            namespaced,
            memory_mb,
            concurrency,
            memory,
            pids,
            pids_limit,
            mut cmd,
            program,
            #[cfg(test)]
            hold,
        } = self;
        create_instance_dir(&dir, user, memory_mb, namespaced)?;
        let cgroup =
            match cgroup::InstanceCgroup::create(&memory, &pids, &id, memory_mb, pids_limit) {
                Ok(cgroup) => cgroup,
                Err(e) => {
                    remove_instance_dir(&dir);
                    return Err(DriverError::Start(e));
                }
            };

        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                // Nothing ran, so neither holds anything: no order to keep, and nothing to
                // wait for (a wait cut short by a shutdown would leave the cgroup).
                remove_instance_dir(&dir);
                if let Some(cgroup) = cgroup {
                    cgroup.remove_now();
                }
                return Err(DriverError::Start(format!(
                    "cannot run {}: {e}",
                    program.display()
                )));
            }
        };

        let lifeline = child.stdin.take();
        // Joins the cgroup; on failure the lifeline is dropped, so the wrapper exits without
        // running the program.
        let instance = ProcessInstance::spawned(Spawned {
            child,
            labels,
            dir,
            socket,
            cgroup,
            lifeline,
            concurrency,
        })
        .map_err(DriverError::Start)?;
        #[cfg(test)]
        if let Some(hold) = hold {
            hold.wait();
        }
        Ok(instance)
    }
}

/// Creates the instance's private directory (mode 0700), owned by `user`; it goes with
/// the instance.
///
/// In namespaces (`namespaced`, with a `user`) the directory is a tmpfs of its own, at most
/// `memory_mb` MiB (see `tmpfs`): made root's, mode 0700, then the tmpfs mounted on it owned
/// by the user.
///
/// Outside them it holds `tmp`, the function's `TMPDIR`. Both are made first and given
/// away after, `tmp` before the directory holding it: once the directory is the user's,
/// the user's code (another instance of the function) could swap `tmp` for a link, and a
/// root `chown` by path would follow it to any file. Until its own `chown` the directory
/// is root's, mode 0700, and nobody else can enter it; `lchown` follows no link either
/// way.
///
/// # Errors
/// [`DriverError::Start`] naming the directory and the error; nothing is left behind.
fn create_instance_dir(
    dir: &Path,
    user: Option<FunctionUser>,
    memory_mb: u64,
    namespaced: bool,
) -> Result<(), DriverError> {
    let make = |path: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| {
                remove_instance_dir(dir);
                DriverError::Start(format!(
                    "cannot create instance directory {}: {e}",
                    path.display()
                ))
            })
    };
    make(dir)?;
    if let Some(user) = user.filter(|_| namespaced) {
        return tmpfs::mount_on(dir, memory_mb, user).map_err(|e| {
            remove_instance_dir(dir);
            DriverError::Start(e)
        });
    }
    let tmp = dir.join(INSTANCE_TMP);
    make(&tmp)?;
    if let Some(user) = user {
        for path in [tmp.as_path(), dir] {
            if let Err(e) = std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)) {
                remove_instance_dir(dir);
                return Err(DriverError::Start(format!(
                    "cannot give instance directory {} to uid {}: {e}",
                    path.display(),
                    user.uid
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures::TryStreamExt;

    use super::super::{MemoryLimits, ProcessDriver, ProcessDriverConfig};
    use crate::driver::{FunctionRequest, Instance, InstanceSpec};

    /// Longest a [`Hold`] holds a set-up when nobody releases it.
    const HOLD_MAX: Duration = Duration::from_secs(3);
    const START: Duration = Duration::from_secs(10);

    /// Holds a set-up at its end (its process started) until released (at most [`HOLD_MAX`]): says when it got
    /// there (`entered`) and when it went on (`left`).
    #[derive(Debug)]
    pub(in crate::driver::process) struct Hold {
        entered: Option<tokio::sync::oneshot::Sender<()>>,
        release: std::sync::mpsc::Receiver<()>,
        left: Arc<AtomicBool>,
    }

    impl Hold {
        pub(in crate::driver::process) fn wait(mut self) {
            // A test gone, or one that never releases: the hold lets go by itself.
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
            }
            let _ = self.release.recv_timeout(HOLD_MAX);
            self.left.store(true, Ordering::SeqCst);
        }
    }

    /// The test's ends of a [`Hold`] put into `driver`'s next set-up.
    struct Held {
        entered: tokio::sync::oneshot::Receiver<()>,
        release: std::sync::mpsc::Sender<()>,
        left: Arc<AtomicBool>,
    }

    fn hold_next_setup(driver: &ProcessDriver) -> Held {
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let left = Arc::new(AtomicBool::new(false));
        *driver.setup_hold.lock().expect("lock") = Some(Hold {
            entered: Some(entered_tx),
            release: release_rx,
            left: Arc::clone(&left),
        });
        Held {
            entered,
            release,
            left,
        }
    }

    /// A driver over the example functions (as `nobody` when root), its socket root in a
    /// temporary directory.
    fn driver(limits: MemoryLimits) -> (Arc<ProcessDriver>, tempfile::TempDir) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let user = nix::unistd::geteuid()
            .is_root()
            .then(|| super::FunctionUser::lookup("nobody").expect("user nobody"));
        let driver = ProcessDriver::new(
            ProcessDriverConfig::new(fn_test_support::functions_dir(), tmp.path().join("s"))
                .with_function_user(user)
                .with_memory_limits(limits),
        )
        .expect("driver");
        (Arc::new(driver), tmp)
    }

    fn echo() -> InstanceSpec {
        InstanceSpec {
            app: "a".into(),
            function: "echo".into(),
            command: vec!["fn-echo".into()],
            image: None,
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: std::collections::BTreeMap::new(),
        }
    }

    /// One call of `instance` with `body`; the response body.
    async fn call(instance: &dyn Instance, body: &'static str) -> bytes::Bytes {
        let request = FunctionRequest {
            call_id: "warm".into(),
            method: http::Method::POST,
            request_url: "http://lb.test/r/a/echo".into(),
            headers: http::HeaderMap::new(),
            deadline: std::time::SystemTime::now() + Duration::from_secs(30),
            deadline_at: std::time::Instant::now() + Duration::from_secs(30),
        };
        let sent = Box::pin(futures::stream::iter([Ok(bytes::Bytes::from(body))]));
        let response = instance.call(request, sent).await.expect("the warm call");
        response
            .body
            .try_fold(bytes::BytesMut::new(), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await
            .expect("the warm call's body")
            .freeze()
    }

    /// On a runtime of one thread (`FN_WORKER_THREADS=1`), a warm call is answered while a
    /// cold start's set-up (directory, cgroups, fork, cgroup move) is held, where it waited
    /// for the whole set-up.
    #[test]
    fn a_warm_call_is_answered_while_a_cold_start_is_being_set_up() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (driver, _tmp) = driver(MemoryLimits::Off);
            let warm = driver
                .start_process(&echo(), "warm", START)
                .await
                .expect("the warm instance");
            let held = hold_next_setup(&driver);
            let cold = tokio::spawn({
                let driver = Arc::clone(&driver);
                async move { driver.start_process(&echo(), "cold", START).await }
            });
            held.entered.await.expect("the cold start's set-up began");
            let echoed = call(&warm, "warm").await;
            let waited = held.left.load(Ordering::SeqCst);
            let _ = held.release.send(()); // the hold may have let go by itself
            assert_eq!(echoed, "warm");
            assert!(
                !waited,
                "the warm call was answered only once the cold start's set-up went on"
            );
            let cold = cold
                .await
                .expect("the cold start's task")
                .expect("the cold start");
            for instance in [warm, cold] {
                instance.kill();
                instance.wait_gone().await;
            }
        });
    }

    /// A start given up while its set-up runs on the blocking pool leaves nothing behind:
    /// the process its set-up started is killed, its directory and cgroups removed.
    #[tokio::test]
    async fn a_start_given_up_during_its_set_up_leaves_nothing_behind() {
        let (driver, tmp) = driver(MemoryLimits::default());
        let held = hold_next_setup(&driver);
        let start = tokio::spawn({
            let driver = Arc::clone(&driver);
            async move { driver.start_process(&echo(), "given up", START).await }
        });
        held.entered.await.expect("the set-up began");
        // The driver's first instance: its directory and process are there.
        let id = format!("{}-1", driver.id_prefix);
        let sockets = tmp.path().join("s");
        assert!(sockets.join(&id).is_dir(), "the set-up made no directory");
        // Its cgroups, memory and pids (one, on v2), where limits are enforced here.
        let cgroups: Vec<_> = [&driver.memory, &driver.pids]
            .into_iter()
            .filter_map(|mode| match mode {
                super::CgroupMode::V1 { parent } | super::CgroupMode::V2 { parent } => {
                    Some(parent.join(&id))
                }
                super::CgroupMode::Unenforced { .. } => None,
            })
            .collect();
        let pids: Vec<String> = cgroups
            .first()
            .into_iter()
            .flat_map(|c| {
                std::fs::read_to_string(c.join("cgroup.procs"))
                    .expect("procs")
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            cgroups.is_empty() || !pids.is_empty(),
            "nothing in the cgroup"
        );
        start.abort();
        assert!(start.await.is_err_and(|e| e.is_cancelled()));
        let _ = held.release.send(()); // the hold may have let go by itself

        // The reaper removes the directory once the process is reaped, the cgroup after.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let left = || {
            let mut left: Vec<String> = std::fs::read_dir(&sockets)
                .expect("the socket root")
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&id))
                .collect();
            left.extend(
                cgroups
                    .iter()
                    .filter(|c| c.exists())
                    .map(|c| c.display().to_string()),
            );
            left.extend(
                pids.iter()
                    .filter(|pid| Path::new("/proc").join(pid).exists())
                    .map(|pid| format!("process {pid}")),
            );
            left
        };
        let mut remaining = left();
        while !remaining.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            remaining = left();
        }
        assert!(remaining.is_empty(), "left behind: {remaining:?}");
    }
}
