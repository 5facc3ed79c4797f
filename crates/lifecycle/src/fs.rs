//! File-system chores that must not run on the async runtime: removing trees
//! ([`remove_tree`]), and reads bounded in time on a thread of their own ([`BoundedReads`]).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, RenameFlags};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

/// Names listed from a directory at a time: the listing is taken whole, then acted on (a
/// directory read while entries are removed and renamed may skip some).
const LIST_BATCH: usize = 1024;

/// Removes the tree at `path` on a thread of its own (never on the runtime: a wide or deep
/// tree takes seconds), logging a failure other than "not found". The receiver completes
/// when the removal has ended; dropping it leaves the removal to finish in the background.
///
/// The trees removed here hold what functions wrote (their `TMPDIR`), so their shape is a
/// tenant's choice: 20,000 levels take under a second to make. `std::fs::remove_dir_all`
/// descends a stack frame and holds a descriptor per level, so such a tree overflowed a
/// worker's stack (aborting the process) and a deeper one than the descriptor limit stayed on
/// disk. [`remove_tree_flat`] holds two descriptors and no recursion whatever the depth.
pub fn remove_tree(path: PathBuf) -> tokio::sync::oneshot::Receiver<()> {
    let (done, removed) = tokio::sync::oneshot::channel();
    let shown = path.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("fn-remove-tree".into())
        .spawn(move || {
            match remove_tree_flat(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot remove directory"
                ),
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::warn!(path = %shown, error = %e, "cannot start removing a directory; it is left in place");
    }
    removed
}

/// Reads of files on a mount that may hang (network, FUSE, secrets), each run on a thread of
/// its own and waited for a bound at most ([`BoundedReads::read`]), so that neither a
/// runtime thread (with `FN_WORKER_THREADS=1`, the one carrying every call) nor the task
/// waiting is held by one. A read that outlives its bound is left running, and none other
/// is started until it returns: a mount that hangs costs one thread, not one per attempt.
///
/// A thread of its own rather than tokio's blocking pool: the runtime waits for that pool's
/// tasks when it shuts down, so a read that never returns would keep the daemon from exiting.
/// A read that cannot be made so (no thread can be started, or it panicked) is an error,
/// never made on the caller's thread instead.
#[derive(Debug)]
pub struct BoundedReads {
    /// The threads' name.
    thread_name: &'static str,
    /// What is read, for the log line when a read that hung returns.
    what: String,
    bound: Duration,
    /// The read that outlived its bound, while it runs.
    stuck: Option<std::thread::JoinHandle<()>>,
    /// Tests: starting a thread fails, as it does when the process is out of them.
    #[cfg(test)]
    no_threads: bool,
}

/// Why [`BoundedReads::read`] has no outcome.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    /// The read did not return within the bound; it is left running.
    #[error(
        "it has not finished after {}, and is left running",
        humantime::format_duration(*waited)
    )]
    TimedOut { waited: Duration },
    /// An earlier read, given up after the bound, has still not returned: none other is
    /// started.
    #[error(
        "an earlier read of it, given up after {}, has still not finished",
        humantime::format_duration(*waited)
    )]
    StillRunning { waited: Duration },
    /// No thread could be started for it (the process is out of them).
    #[error("no thread could be started for it ({0})")]
    NoThread(std::io::Error),
    /// It panicked (and said so on stderr).
    #[error("it panicked")]
    Panicked,
}

impl Unfinished {
    /// Whether the read has not returned (rather than not been made, or not to its end).
    pub fn is_stalled(&self) -> bool {
        matches!(
            self,
            Unfinished::TimedOut { .. } | Unfinished::StillRunning { .. }
        )
    }
}

impl BoundedReads {
    /// Reads on threads named `thread_name`, waited for `bound`; `what` names what is read
    /// in the log ("the certificate files").
    pub fn new(thread_name: &'static str, what: impl Into<String>, bound: Duration) -> Self {
        BoundedReads {
            thread_name,
            what: what.into(),
            bound,
            stuck: None,
            #[cfg(test)]
            no_threads: false,
        }
    }

    /// How long a read is waited for.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Whether a read given up after the bound is still running.
    pub fn is_stuck(&self) -> bool {
        self.stuck.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// What `read` returns, run on a thread of its own.
    ///
    /// # Errors
    /// [`Unfinished`]: it has not returned within the bound (or an earlier read still has
    /// not), no thread could be started for it, or it panicked.
    pub async fn read<T: Send + 'static>(
        &mut self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Unfinished> {
        if let Some(stuck) = &self.stuck {
            if !stuck.is_finished() {
                return Err(Unfinished::StillRunning { waited: self.bound });
            }
            tracing::info!("the read of {} that hung has returned", self.what);
            self.stuck = None;
        }
        let (sender, answer) = std::sync::mpsc::sync_channel(1);
        let abandon = sender.clone();
        let thread = self
            .start(move || {
                // Caught to be told: the waiter's channel stays open while it waits.
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
                // The caller may have stopped waiting (the bound passed, or it was dropped):
                // nothing to tell.
                let _ = sender.try_send(read.map_or(Answer::Panicked, Answer::Read));
            })
            .map_err(Unfinished::NoThread)?;
        // Dropped before the answer (the caller is shutting down), this ends the wait and
        // keeps the read as stuck.
        let mut waiting = Waiting {
            stuck: &mut self.stuck,
            thread: Some(thread),
            abandon,
        };
        // Waited for on the blocking pool, for `bound` at most: tokio's paused clock (tests)
        // does not jump ahead while a blocking task runs, as it would over an async wait.
        let bound = self.bound;
        let answered = tokio::task::spawn_blocking(move || answer.recv_timeout(bound)).await;
        let thread = waiting.thread.take();
        match answered {
            Ok(Ok(Answer::Read(outcome))) => Ok(outcome),
            // `read` panicked (and said so on stderr).
            Ok(Ok(Answer::Panicked)) => Err(Unfinished::Panicked),
            // The bound passed, or the runtime is shutting down: the read is left running.
            // (`Abandoned` is sent only once this future is dropped: not seen here.)
            Ok(Ok(Answer::Abandoned) | Err(_)) | Err(_) => {
                *waiting.stuck = thread;
                Err(Unfinished::TimedOut { waited: bound })
            }
        }
    }

    /// Starts `read` on a thread of its own.
    fn start(
        &self,
        read: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        #[cfg(test)]
        if self.no_threads {
            return Err(std::io::Error::from_raw_os_error(nix::libc::EAGAIN));
        }
        std::thread::Builder::new()
            .name(self.thread_name.into())
            .spawn(read)
    }
}

/// What a read's thread, or its dropped caller, tells the waiter.
enum Answer<T> {
    Read(T),
    Panicked,
    /// The caller was dropped: no one waits for the answer any more.
    Abandoned,
}

/// A [`BoundedReads::read`] waiting for its answer. Dropped with the caller's future (a
/// shutdown that does not wait for a read on a hung mount), it tells the waiter on the
/// blocking pool to stop, where the waiter went on for the bound and held the runtime's
/// shutdown as long (the runtime waits for its blocking pool's tasks), and keeps the read's
/// thread as stuck, so that no other read starts while it runs.
struct Waiting<'a, T> {
    stuck: &'a mut Option<std::thread::JoinHandle<()>>,
    /// The read's thread, until its answer (or the bound) was waited for.
    thread: Option<std::thread::JoinHandle<()>>,
    abandon: std::sync::mpsc::SyncSender<Answer<T>>,
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Full: the read answered first, and the waiter returns with it.
            let _ = self.abandon.try_send(Answer::Abandoned);
            *self.stuck = Some(thread);
        }
    }
}

/// Removes the tree at `path` (a symlink or file there is removed itself, never followed)
/// without recursion: files are unlinked, empty directories removed, and the entries of a
/// directory that is not empty are moved up into the tree's top directory (under names of
/// this function's own) until it is. Each entry moves up at most once per level it sat
/// below the top; at most two descriptors are open at any time.
///
/// # Errors
/// The first failure other than an entry vanishing meanwhile.
pub fn remove_tree_flat(path: &Path) -> io::Result<()> {
    if !std::fs::symlink_metadata(path)?.is_dir() {
        return std::fs::remove_file(path);
    }
    let top = open_dir(AT_FDCWD, path.as_os_str())?;
    let mut moved: u64 = 0;
    loop {
        let entries = list(&top)?;
        if entries.is_empty() {
            break;
        }
        for (name, kind) in entries {
            let is_dir = match kind {
                Some(kind) => kind == Type::Directory,
                None => nix::sys::stat::fstatat(
                    &top,
                    name.as_c_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR)
                .or_else(gone_is(false))?,
            };
            if !is_dir {
                nix::unistd::unlinkat(&top, name.as_c_str(), UnlinkatFlags::NoRemoveDir)
                    .or_else(gone_is(()))?;
                continue;
            }
            match nix::unistd::unlinkat(&top, name.as_c_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                    hoist(&top, &name, &mut moved)?;
                    // Emptied now (what appeared meanwhile goes in the next round).
                    match nix::unistd::unlinkat(&top, name.as_c_str(), UnlinkatFlags::RemoveDir) {
                        Ok(()) | Err(Errno::ENOENT | Errno::ENOTEMPTY | Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    drop(top);
    std::fs::remove_dir(path)
}

/// Moves every entry of directory `name` (in `top`) up into `top`.
fn hoist(top: &OwnedFd, name: &CString, moved: &mut u64) -> io::Result<()> {
    let dir = match open_dir(top.as_fd(), OsStr::from_bytes(name.as_bytes())) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    loop {
        let entries = list(&dir)?;
        if entries.is_empty() {
            return Ok(());
        }
        for (child, _) in entries {
            loop {
                *moved += 1;
                let new = CString::new(format!(".fn-removing-{moved}"))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                match nix::fcntl::renameat2(
                    &dir,
                    child.as_c_str(),
                    top,
                    new.as_c_str(),
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) | Err(Errno::ENOENT) => break,
                    Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Opens directory `path` (relative to `at`) for listing, never through a symlink.
fn open_dir<Fd: AsFd>(at: Fd, path: &OsStr) -> io::Result<OwnedFd> {
    nix::fcntl::openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Up to [`LIST_BATCH`] entries of `dir` (not `.` and `..`), with their type when the file
/// system tells it.
fn list(dir: &OwnedFd) -> io::Result<Vec<(CString, Option<Type>)>> {
    let fresh = open_dir(dir.as_fd(), OsStr::new("."))?;
    let mut listing = Dir::from_fd(fresh).map_err(io::Error::from)?;
    let mut entries = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        entries.push((name.to_owned(), entry.file_type()));
        if entries.len() == LIST_BATCH {
            break;
        }
    }
    Ok(entries)
}

/// Maps "no such entry" (it went meanwhile) to `value`.
fn gone_is<T: Copy>(value: T) -> impl Fn(Errno) -> Result<T, Errno> {
    move |e| {
        if e == Errno::ENOENT {
            Ok(value)
        } else {
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A read that counts itself in `started` and hangs until `released` (30 s at most).
    fn hanging_read(
        released: &Arc<AtomicBool>,
        started: &Arc<AtomicUsize>,
    ) -> impl FnOnce() -> &'static str + Send + 'static {
        let (released, started) = (Arc::clone(released), Arc::clone(started));
        move || {
            started.fetch_add(1, Ordering::SeqCst);
            let start = std::time::Instant::now();
            while !released.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            "read"
        }
    }

    /// A read that hangs (a hung NFS or FUSE mount) is given up after the bound, and no
    /// other is started while it still hangs (each attempt would leave a thread blocked);
    /// once it returns, the next attempt reads again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_that_hangs_is_bounded_and_not_started_again_until_it_returns() {
        let released = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let hanging = || hanging_read(&released, &started);
        let bound = Duration::from_millis(200);
        let mut reads = BoundedReads::new("test-read", "a test file", bound);

        let start = std::time::Instant::now();
        let first = reads.read(hanging()).await;
        let waited = start.elapsed();
        assert!(
            matches!(first, Err(Unfinished::TimedOut { .. })),
            "{first:?}"
        );
        assert!(
            waited >= bound && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(reads.is_stuck());

        let start = std::time::Instant::now();
        let again = reads.read(hanging()).await;
        let Err(e @ Unfinished::StillRunning { .. }) = &again else {
            panic!("{again:?}");
        };
        assert!(e.is_stalled());
        assert!(start.elapsed() < bound, "{:?}", start.elapsed());
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "a second read started while the first hangs"
        );

        released.store(true, Ordering::SeqCst);
        let returned = std::time::Instant::now();
        while reads.is_stuck() {
            assert!(
                returned.elapsed() < Duration::from_secs(5),
                "the read never returned"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let after = reads.read(hanging()).await;
        assert!(matches!(after, Ok("read")), "{after:?}");
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    /// A read dropped by its caller while it hangs (a shutdown that does not wait for it)
    /// ends its wait on the blocking pool, which held the runtime's shutdown for the bound,
    /// and is kept as stuck: no other read starts while it runs.
    #[test]
    fn a_read_dropped_while_it_hangs_holds_not_the_runtime_s_shutdown() {
        let released = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicUsize::new(0));
        let hanging = || hanging_read(&released, &started);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut reads = BoundedReads::new("test-read", "a test file", Duration::from_secs(10));
        runtime.block_on(async {
            tokio::select! {
                read = reads.read(hanging()) => panic!("answered: {read:?}"),
                () = async {
                    while started.load(Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                } => {}
            }
            assert!(reads.is_stuck(), "the dropped read is not kept");
            let again = reads.read(hanging()).await;
            assert!(
                matches!(again, Err(Unfinished::StillRunning { .. })),
                "{again:?}"
            );
            assert_eq!(started.load(Ordering::SeqCst), 1);
        });
        let start = std::time::Instant::now();
        drop(runtime);
        let waited = start.elapsed();
        released.store(true, Ordering::SeqCst);
        assert!(
            waited < Duration::from_secs(2),
            "the runtime's shutdown waited {waited:?} for a read no one waits for"
        );
    }

    /// A read whose thread cannot be started, or that panics, is an error, never made (again)
    /// on the caller's thread: a runtime thread, which a hung mount would hold with every
    /// call on it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_without_a_thread_or_that_panics_is_an_error_not_made_on_the_runtime() {
        let mut reads = BoundedReads::new("test-read", "a test file", Duration::from_secs(5));
        let made = Arc::new(AtomicUsize::new(0));
        let panicking = {
            let made = Arc::clone(&made);
            move || -> &'static str {
                made.fetch_add(1, Ordering::SeqCst);
                panic!("a read that panics (test)");
            }
        };
        let panicked = reads.read(panicking).await;
        assert!(
            matches!(panicked, Err(Unfinished::Panicked)),
            "{panicked:?}"
        );
        assert_eq!(made.load(Ordering::SeqCst), 1, "read again after its panic");
        assert!(!reads.is_stuck());

        let caller = std::thread::current().id();
        let on_caller = Arc::new(AtomicBool::new(false));
        let counting = || {
            let on_caller = Arc::clone(&on_caller);
            move || {
                if std::thread::current().id() == caller {
                    on_caller.store(true, Ordering::SeqCst);
                }
                "read"
            }
        };
        reads.no_threads = true;
        let refused = reads.read(counting()).await;
        assert!(
            !on_caller.load(Ordering::SeqCst),
            "read on the caller's thread"
        );
        let Err(e @ Unfinished::NoThread(_)) = &refused else {
            panic!("{refused:?}");
        };
        assert!(!e.is_stalled());
        assert!(
            e.to_string()
                .starts_with("no thread could be started for it"),
            "{e}"
        );

        reads.no_threads = false;
        let read = reads.read(counting()).await;
        assert!(matches!(read, Ok("read")), "{read:?}");
        assert!(!on_caller.load(Ordering::SeqCst));
    }

    /// `depth` nested directories `d/d/d/...` under `root`, made through relative paths.
    fn chain(root: &Path, depth: usize) {
        let mut at = open_dir(AT_FDCWD, root.as_os_str()).expect("open root");
        for _ in 0..depth {
            nix::sys::stat::mkdirat(&at, "d", Mode::S_IRWXU).expect("mkdirat");
            at = open_dir(&at, OsStr::new("d")).expect("open level");
        }
        nix::sys::stat::mkdirat(&at, "leaf", Mode::S_IRWXU).expect("leaf");
    }

    #[test]
    fn a_tree_deeper_than_a_small_stack_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let tree = root.path().join("tree");
        std::fs::create_dir(&tree).expect("mkdir");
        chain(&tree, 2_000);
        // A 32 KiB stack: remove_dir_all's recursion (a frame and a descriptor per level)
        // overflows it long before 2,000 levels.
        let target = tree.clone();
        let removal = std::thread::Builder::new()
            .stack_size(32 * 1024)
            .spawn(move || remove_tree_flat(&target))
            .expect("spawn");
        removal.join().expect("no crash").expect("removed");
        assert!(!tree.exists());
    }

    #[test]
    fn files_and_symlinks_go_and_what_a_symlink_points_to_stays() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");
        let tree = root.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b/c")).expect("mkdir");
        std::fs::write(tree.join("a/b/c/file"), b"x").expect("write");
        std::fs::write(tree.join("a/.fn-removing-1"), b"a name the removal uses").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("a/b/link")).expect("symlink");
        std::os::unix::fs::symlink(&outside, tree.join("toplink")).expect("symlink");
        for i in 0..3000 {
            std::fs::write(tree.join(format!("a/b/f{i}")), b"").expect("write");
        }
        remove_tree_flat(&tree).expect("removed");
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "a symlink was followed");

        // A symlink given as the tree is removed, not followed.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        remove_tree_flat(&link).expect("removed");
        assert!(!link.exists() && outside.join("keep").exists());
        assert_eq!(
            remove_tree_flat(&root.path().join("missing"))
                .expect_err("missing")
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
