//! Memory limits for function instances through memory cgroups.
//!
//! At driver construction [`detect`] decides, once, how limits are enforced:
//! - **cgroup v2**: the runner's own cgroup (the `0::<path>` line of `/proc/self/cgroup`) on
//!   the unified hierarchy (`<root>` itself, or `<root>/unified` on hybrid systems) offers the
//!   `memory` controller, and it can be enabled for children (`+memory` in
//!   `cgroup.subtree_control`). Because v2 forbids processes in a cgroup whose children use
//!   controllers, when enabling fails with `EBUSY` the runner moves itself into a `runner`
//!   leaf below its own cgroup first (the usual pattern for a delegated cgroup, e.g. systemd
//!   `Delegate=yes` or a container's cgroup namespace). Instances get `memory.max` and
//!   `memory.swap.max = 0`.
//! - **cgroup v1**: `<root>/memory/<own memory path>/` accepts new sub-cgroups. Instances get
//!   `memory.limit_in_bytes` and, where swap accounting exists, the same
//!   `memory.memsw.limit_in_bytes` (so swap does not extend the limit).
//! - otherwise limits are **unenforced**; the driver logs one warning at start.
//!
//! Each instance gets its own cgroup `<parent>/<instance id>`; the child joins it by a write
//! of its pid to `cgroup.procs` right after spawn. A child that runs meanwhile could start
//! processes that stay outside the limit — and that is not hypothetical: a shell script
//! forks its first pipeline within that moment. Joining before `exec` needs a `pre_exec` hook
//! or `clone3(CLONE_INTO_CGROUP)`, both `unsafe`, which this workspace forbids. So every child
//! starts under a wrapper shell whose first act is to wait for a line on its stdin, which the
//! runner writes only once the child is in its cgroup; then it execs the program (same pid,
//! process group and user; see `WRAPPER_SCRIPT` in the parent module). Only where there is no
//! `/bin/sh` does the child start unwrapped, and the driver warns once about the remaining
//! race. When the instance ends, whatever is left in its cgroup is killed and the cgroup
//! removed.
//!
//! The cgroupfs root and the membership file are configurable ([`CgroupPaths`]) so tests can
//! point the driver at a fake cgroupfs made of plain files. Writes to cgroupfs are small
//! synchronous file operations on a pseudo file system; they do not block meaningfully.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fn_lifecycle::retry::Backoff;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How the driver should limit instance memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimits {
    /// Never limit (for example where another layer enforces memory).
    Off,
    /// Detect cgroup support at these paths and enforce limits when possible.
    Cgroup(CgroupPaths),
}

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits::Cgroup(CgroupPaths::default())
    }
}

/// Where to find the cgroup file systems and the runner's place in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPaths {
    /// The cgroupfs mount root (`/sys/fs/cgroup`): the v2 hierarchy is the root itself or
    /// `unified/` below it; the v1 memory hierarchy is `memory/` below it.
    pub root: PathBuf,
    /// The file naming the runner's own cgroups (`/proc/self/cgroup`), in its format.
    pub membership: PathBuf,
}

impl Default for CgroupPaths {
    fn default() -> Self {
        CgroupPaths {
            root: PathBuf::from("/sys/fs/cgroup"),
            membership: PathBuf::from("/proc/self/cgroup"),
        }
    }
}

/// How memory limits are enforced, as detected once when the driver is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimitMode {
    /// cgroup v2: instance cgroups are created under `parent`.
    V2 { parent: PathBuf },
    /// cgroup v1 memory controller: instance cgroups are created under `parent`.
    V1 { parent: PathBuf },
    /// Not enforced; `reason` says why (also logged once at start).
    Unenforced { reason: String },
}

impl fmt::Display for MemoryLimitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimitMode::V2 { parent } => write!(f, "cgroup v2 under {}", parent.display()),
            MemoryLimitMode::V1 { parent } => {
                write!(f, "cgroup v1 memory under {}", parent.display())
            }
            MemoryLimitMode::Unenforced { reason } => write!(f, "not enforced: {reason}"),
        }
    }
}

/// Decides how memory limits are enforced. Never fails: anything unusable degrades to
/// [`MemoryLimitMode::Unenforced`] with the reasons collected.
pub(super) fn detect(limits: &MemoryLimits) -> MemoryLimitMode {
    let paths = match limits {
        MemoryLimits::Off => {
            return MemoryLimitMode::Unenforced {
                reason: "memory limits are switched off".into(),
            };
        }
        MemoryLimits::Cgroup(paths) => paths,
    };
    let membership = match std::fs::read_to_string(&paths.membership) {
        Ok(text) => Membership::parse(&text),
        Err(e) => {
            return MemoryLimitMode::Unenforced {
                reason: format!("cannot read {}: {e}", paths.membership.display()),
            };
        }
    };
    let v2 = match try_v2(&paths.root, membership.unified.as_deref()) {
        Ok(parent) => return MemoryLimitMode::V2 { parent },
        Err(reason) => reason,
    };
    let v1 = match try_v1(&paths.root, membership.memory.as_deref()) {
        Ok(parent) => return MemoryLimitMode::V1 { parent },
        Err(reason) => reason,
    };
    MemoryLimitMode::Unenforced {
        reason: format!("cgroup v2: {v2}; cgroup v1: {v1}"),
    }
}

/// The runner's own cgroup paths, from `/proc/self/cgroup`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Membership {
    /// The v2 path (the `0::<path>` line).
    unified: Option<String>,
    /// The v1 path of the hierarchy that has the memory controller.
    memory: Option<String>,
}

impl Membership {
    fn parse(text: &str) -> Self {
        let mut found = Membership::default();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                found.unified = Some(path.to_owned());
            } else if controllers.split(',').any(|c| c == "memory") {
                found.memory = Some(path.to_owned());
            }
        }
        found
    }
}

/// `<base>/<own path>`, refusing paths that would climb out of `base`.
fn below(base: &Path, own: &str) -> Result<PathBuf, String> {
    let relative = Path::new(own.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!("unexpected cgroup path {own:?}"));
    }
    Ok(base.join(relative))
}

fn try_v2(root: &Path, own: Option<&str>) -> Result<PathBuf, String> {
    let own = own.ok_or("the runner is in no v2 cgroup")?;
    let unified = [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|dir| dir.join("cgroup.controllers").is_file())
        .ok_or_else(|| format!("no cgroup2 hierarchy at {}", root.display()))?;
    let parent = below(&unified, own)?;
    let controllers = read(&parent.join("cgroup.controllers"))?;
    if !has_word(&controllers, "memory") {
        return Err(format!(
            "the memory controller is not available in {} (controllers: {:?})",
            parent.display(),
            controllers.trim()
        ));
    }
    enable_memory_for_children(&parent)?;
    probe(&parent)?;
    Ok(parent)
}

fn enable_memory_for_children(parent: &Path) -> Result<(), String> {
    let subtree = parent.join("cgroup.subtree_control");
    if has_word(&read(&subtree)?, "memory") {
        return Ok(());
    }
    match std::fs::write(&subtree, "+memory") {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {}
        Err(e) => {
            return Err(format!(
                "cannot enable memory in {}: {e}",
                subtree.display()
            ));
        }
    }
    // "No internal processes": move the runner into a leaf, then enable for the children.
    let leaf = parent.join("runner");
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", leaf.display())),
    }
    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot move the runner into {}: {e}", leaf.display()))?;
    std::fs::write(&subtree, "+memory").map_err(|e| {
        format!(
            "cannot enable memory in {} even with the runner in a leaf (other processes \
             share its cgroup?): {e}",
            subtree.display()
        )
    })?;
    tracing::info!(leaf = %leaf.display(), "moved the runner into a leaf cgroup to delegate memory limits");
    Ok(())
}

fn try_v1(root: &Path, own: Option<&str>) -> Result<PathBuf, String> {
    let own = own.ok_or("the runner is in no v1 memory cgroup")?;
    let parent = below(&root.join("memory"), own)?;
    if !parent.is_dir() {
        return Err(format!("{} is not a directory", parent.display()));
    }
    probe(&parent)?;
    Ok(parent)
}

/// Checks that sub-cgroups can be created under `parent` by creating and removing one.
fn probe(parent: &Path) -> Result<(), String> {
    let dir = parent.join(format!("fn-probe-{}", std::process::id()));
    std::fs::create_dir(&dir)
        .map_err(|e| format!("cannot create cgroups under {}: {e}", parent.display()))?;
    if let Err(e) = std::fs::remove_dir(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup probe");
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn has_word(text: &str, word: &str) -> bool {
    text.split_whitespace().any(|w| w == word)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Pauses between attempts to remove a cgroup the kernel still counts dying tasks in.
fn removal_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(2), Duration::from_millis(200))
}

/// One instance's memory cgroup.
#[derive(Debug)]
pub(super) struct InstanceCgroup {
    dir: PathBuf,
}

impl InstanceCgroup {
    /// Creates the cgroup of instance `id` with a limit of `memory_mb`. `None` when limits
    /// are unenforced or `memory_mb` is 0 (no limit asked for).
    ///
    /// # Errors
    /// A message when the cgroup cannot be created or the limit cannot be written (the
    /// half-made cgroup is removed).
    pub(super) fn create(
        mode: &MemoryLimitMode,
        id: &str,
        memory_mb: u64,
    ) -> Result<Option<Self>, String> {
        let (parent, version) = match mode {
            MemoryLimitMode::V2 { parent } => (parent, Version::V2),
            MemoryLimitMode::V1 { parent } => (parent, Version::V1),
            MemoryLimitMode::Unenforced { .. } => return Ok(None),
        };
        if memory_mb == 0 {
            return Ok(None);
        }
        let bytes = memory_mb.saturating_mul(1024 * 1024).to_string();
        let dir = parent.join(id);
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create memory cgroup {}: {e}", dir.display()))?;
        let cgroup = InstanceCgroup { dir };
        let (limit, swap, swap_value) = match version {
            Version::V2 => ("memory.max", "memory.swap.max", "0"),
            Version::V1 => (
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                bytes.as_str(),
            ),
        };
        if let Err(e) = std::fs::write(cgroup.dir.join(limit), &bytes) {
            cgroup.remove_now();
            return Err(format!(
                "cannot set {limit} in {}: {e}",
                cgroup.dir.display()
            ));
        }
        // Only where swap accounting exists; without it there is nothing to limit.
        let swap = cgroup.dir.join(swap);
        if swap.exists()
            && let Err(e) = std::fs::write(&swap, swap_value)
        {
            tracing::debug!(file = %swap.display(), error = %e, "cannot limit swap");
        }
        Ok(Some(cgroup))
    }

    /// Moves process `pid` into this cgroup.
    ///
    /// # Errors
    /// When `cgroup.procs` cannot be written.
    pub(super) fn add(&self, pid: u32) -> Result<(), String> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| format!("cannot add pid {pid} to {}: {e}", procs.display()))
    }

    /// The cgroup's directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills whatever is left in the cgroup (processes that left the instance's process
    /// group) and removes it, retrying briefly while the kernel still counts dying tasks.
    pub(super) async fn remove(&self) {
        let mut backoff = removal_backoff();
        for _ in 0..12 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                    self.kill_members();
                    backoff.sleep().await;
                }
                Err(e) => {
                    tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove instance cgroup");
                    return;
                }
            }
        }
        tracing::warn!(cgroup = %self.dir.display(), "instance cgroup still busy; left in place");
    }

    /// [`InstanceCgroup::remove`] on a thread of its own, for when there is no runtime left
    /// to run it (the runner is shutting down with instances still around).
    pub(super) fn remove_in_background(&self) {
        let cgroup = InstanceCgroup {
            dir: self.dir.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("fn-cgroup-cleanup".into())
            .spawn(move || {
                let mut backoff = removal_backoff();
                for _ in 0..12 {
                    match std::fs::remove_dir(&cgroup.dir) {
                        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                            cgroup.kill_members();
                            std::thread::sleep(backoff.next_delay());
                        }
                        _ => return,
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove instance cgroup");
        }
    }

    /// Best-effort synchronous removal, for error paths before any process joined.
    fn remove_now(&self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(cgroup = %self.dir.display(), error = %e, "cannot remove instance cgroup");
        }
    }

    fn kill_members(&self) {
        let procs = self.dir.join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(&procs) else {
            return;
        };
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // ESRCH: already gone. Nothing else is expected for our own children.
            if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
                tracing::debug!(pid, error = %e, "cannot kill process left in instance cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(membership: &str) -> (tempfile::TempDir, CgroupPaths) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths = CgroupPaths {
            root: tmp.path().join("cgroup"),
            membership: tmp.path().join("self-cgroup"),
        };
        std::fs::create_dir(&paths.root).expect("mkdir");
        std::fs::write(&paths.membership, membership).expect("write");
        (tmp, paths)
    }

    fn mkdirs(dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
    }

    const HYBRID: &str = "9:name=systemd:/\n4:memory:/runners/r1\n1:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn parses_membership() {
        assert_eq!(
            Membership::parse(HYBRID),
            Membership {
                unified: Some("/".into()),
                memory: Some("/runners/r1".into())
            }
        );
        assert_eq!(
            Membership::parse("0::/system.slice/runner.service\n"),
            Membership {
                unified: Some("/system.slice/runner.service".into()),
                memory: None
            }
        );
        assert_eq!(Membership::parse("garbage\n"), Membership::default());
    }

    #[test]
    fn detects_v1_when_v2_has_no_memory() {
        let (_tmp, paths) = fake(HYBRID);
        // A hybrid system: a unified mount without controllers, v1 memory for the runner.
        mkdirs(&paths.root.join("unified"));
        std::fs::write(paths.root.join("unified/cgroup.controllers"), "hugetlb\n").expect("write");
        let parent = paths.root.join("memory/runners/r1");
        mkdirs(&parent);
        let mode = detect(&MemoryLimits::Cgroup(paths.clone()));
        assert_eq!(
            mode,
            MemoryLimitMode::V1 {
                parent: parent.clone()
            }
        );
        // The probe cleaned up after itself.
        assert_eq!(std::fs::read_dir(&parent).expect("read_dir").count(), 0);

        let cgroup = InstanceCgroup::create(&mode, "inst-1", 128)
            .expect("create")
            .expect("enforced");
        assert_eq!(cgroup.dir(), parent.join("inst-1"));
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-1/memory.limit_in_bytes")).expect("read"),
            (128u64 * 1024 * 1024).to_string()
        );
        // No swap accounting in this fake: nothing written for it.
        assert!(!parent.join("inst-1/memory.memsw.limit_in_bytes").exists());
        cgroup.add(4242).expect("add");
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-1/cgroup.procs")).expect("read"),
            "4242"
        );
    }

    #[test]
    fn detects_v2_and_enables_memory_for_children() {
        let (_tmp, paths) = fake("0::/system.slice/runner.service\n");
        std::fs::write(
            paths.root.join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .expect("write");
        let parent = paths.root.join("system.slice/runner.service");
        mkdirs(&parent);
        std::fs::write(parent.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        std::fs::write(parent.join("cgroup.subtree_control"), "").expect("write");
        let mode = detect(&MemoryLimits::Cgroup(paths));
        assert_eq!(
            mode,
            MemoryLimitMode::V2 {
                parent: parent.clone()
            }
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).expect("read"),
            "+memory"
        );

        let cgroup = InstanceCgroup::create(&mode, "inst-3", 256)
            .expect("create")
            .expect("enforced");
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-3/memory.max")).expect("read"),
            (256u64 * 1024 * 1024).to_string()
        );
        cgroup.add(7).expect("add");
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-3/cgroup.procs")).expect("read"),
            "7"
        );
    }

    #[test]
    fn v2_without_memory_controller_and_no_v1_is_unenforced() {
        let (_tmp, paths) = fake("0::/\n");
        std::fs::write(paths.root.join("cgroup.controllers"), "cpu pids\n").expect("write");
        match detect(&MemoryLimits::Cgroup(paths)) {
            MemoryLimitMode::Unenforced { reason } => {
                assert!(
                    reason.contains("memory controller is not available"),
                    "{reason}"
                );
                assert!(reason.contains("no v1 memory cgroup"), "{reason}");
            }
            other => panic!("expected Unenforced, got {other:?}"),
        }
    }

    #[test]
    fn unreadable_membership_and_off_are_unenforced() {
        let paths = CgroupPaths {
            root: PathBuf::from("/nonexistent"),
            membership: PathBuf::from("/nonexistent/cgroup"),
        };
        assert!(matches!(
            detect(&MemoryLimits::Cgroup(paths)),
            MemoryLimitMode::Unenforced { .. }
        ));
        assert!(matches!(
            detect(&MemoryLimits::Off),
            MemoryLimitMode::Unenforced { .. }
        ));
    }

    #[test]
    fn no_limit_asked_means_no_cgroup() {
        let mode = MemoryLimitMode::V1 {
            parent: PathBuf::from("/nonexistent"),
        };
        assert!(
            InstanceCgroup::create(&mode, "x", 0)
                .expect("no-op")
                .is_none()
        );
    }

    #[test]
    fn refuses_cgroup_paths_that_climb() {
        assert!(below(Path::new("/sys/fs/cgroup/memory"), "/../etc").is_err());
        assert_eq!(
            below(Path::new("/r"), "/a/b").ok(),
            Some(PathBuf::from("/r/a/b"))
        );
        assert_eq!(below(Path::new("/r"), "/").ok(), Some(PathBuf::from("/r")));
    }
}
