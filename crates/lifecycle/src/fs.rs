//! File-system chores that must not run on the async runtime.

use std::path::PathBuf;

/// Stack of the threads that remove directory trees. `std::fs::remove_dir_all` descends one
/// frame per level, and the trees removed here hold what functions wrote (their `TMPDIR`):
/// 20,000 levels, made in under a second, overflowed a 2 MiB worker stack and aborted the
/// process. The stack is reserved, not used, until a tree that deep comes; a deeper one than
/// it holds runs out of descriptors first (one is held per level), an error, not a crash.
const REMOVAL_STACK: usize = 512 * 1024 * 1024;

/// Removes the tree at `path` on a thread of its own (never on the runtime: a wide or deep
/// tree takes seconds), logging a failure other than "not found". The receiver completes
/// when the removal has ended; dropping it leaves the removal to finish in the background.
pub fn remove_tree(path: PathBuf) -> tokio::sync::oneshot::Receiver<()> {
    let (done, removed) = tokio::sync::oneshot::channel();
    let shown = path.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("fn-remove-tree".into())
        .stack_size(REMOVAL_STACK)
        .spawn(move || {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
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
