//! The tmpfs an instance in namespaces gets as its instance directory.
//!
//! In namespaces the function's `/tmp` is a tmpfs of its own, but its instance directory
//! (where it binds its socket) is bound in from the runner's side: on the host's disk, a
//! function could write into it without bound and fill the file system of the socket root.
//! So the runner mounts a fresh tmpfs on the directory, in its own mount namespace, before
//! it starts the instance: the runner reaches the socket by the same path, `fn-isolate`
//! binds the directory back into the instance's private `/tmp` with the tmpfs on it, and
//! what the function writes there is memory, charged to the function's memory cgroup (a
//! tmpfs page counts against the cgroup of the process that writes it) and bounded by the
//! size below besides.
//!
//! This module mounts; the directory's removal unmounts (`socket::unmount_instance_dir`),
//! wherever an instance directory is removed or set aside. The pure-runner mounts in a
//! mount namespace of its own, so what a runner killed outright left mounted goes with its
//! namespace; where it could not make one, the socket root's sweep at start unmounts it.

use std::path::Path;

use nix::mount::{MsFlags, mount};

use super::FunctionUser;

/// Most files, directories and links the instance's directory may hold. The contract needs
/// a handful (the socket, an FDK's private socket and the link to it); 4,096 leaves a
/// function ample room for scratch files while bounding what inodes and dentries, kernel
/// memory outside the byte size, a function can make there (about 1 KiB each: some 4 MiB).
const MAX_INODES: u32 = 4096;

/// Mounts a fresh tmpfs on the empty directory `dir`: owned by `user`, mode 0700, `memory_mb`
/// MiB at most (the function's memory limit; 0, no limit asked for, leaves the kernel's
/// default of half the RAM, as the private `/tmp` has), [`MAX_INODES`] entries, no setuid
/// programs or devices.
///
/// Mounted owned by `user` at once: nothing is in it yet, so there is no entry a link could
/// replace before it is given away. The directory under it stays root's, 0700.
///
/// # Errors
/// A message naming the directory and the system's error (a runner without `CAP_SYS_ADMIN`,
/// a security profile that refuses mounts).
pub(super) fn mount_on(dir: &Path, memory_mb: u64, user: FunctionUser) -> Result<(), String> {
    let mut options = format!(
        "mode=0700,uid={},gid={},nr_inodes={MAX_INODES}",
        user.uid, user.gid
    );
    if memory_mb > 0 {
        options.push_str(&format!(",size={memory_mb}m"));
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| {
        format!(
            "cannot mount a tmpfs on instance directory {} ({options}): {e}; the runner needs \
             CAP_SYS_ADMIN and a security profile that allows mounts, as fn-isolate does",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mount that fails says on which directory and why, as the start's error does.
    #[test]
    fn a_failed_mount_names_the_directory_and_the_error() {
        let root = tempfile::tempdir().expect("tempdir");
        let missing = root.path().join("gone");
        let user = FunctionUser {
            uid: 65534,
            gid: 65534,
        };
        let err = mount_on(&missing, 64, user).expect_err("no directory to mount on");
        assert!(
            err.contains(&missing.display().to_string())
                && err.contains("size=64m")
                && err.contains(nix::errno::Errno::ENOENT.desc()),
            "{err}"
        );
    }
}
