//! File-system chores that must not run on the async runtime.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    use super::*;

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
