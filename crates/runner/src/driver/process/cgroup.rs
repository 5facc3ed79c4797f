//! Memory and process-count limits for function instances through cgroups.
//!
//! At driver construction [`detect`] decides, once per controller (`memory`, `pids`), how
//! its limit is enforced:
//! - **cgroup v2**: the runner's own cgroup (the `0::<path>` line of `/proc/self/cgroup`) on
//!   the unified hierarchy (`<root>` itself, or `<root>/unified` on hybrid systems) offers the
//!   controller, and it can be enabled for children (`+memory`, `+pids` in
//!   `cgroup.subtree_control`). Because v2 forbids processes in a cgroup whose children use
//!   controllers, when enabling fails with `EBUSY` the runner moves itself into a `runner`
//!   leaf below its own cgroup first (the usual pattern for a delegated cgroup, e.g. systemd
//!   `Delegate=yes` or a container's cgroup namespace). Instances get `memory.max`,
//!   `memory.swap.max = 0` and `pids.max`, all in one cgroup.
//! - **cgroup v1**: `<root>/<controller>/<own path of that hierarchy>/` accepts new
//!   sub-cgroups. Instances get `memory.limit_in_bytes` and, where swap accounting exists,
//!   the same `memory.memsw.limit_in_bytes` (so swap does not extend the limit), and
//!   `pids.max` in a cgroup of the pids hierarchy.
//! - otherwise that limit is **unenforced**; the driver logs one warning at start.
//!
//! The pids limit counts processes and threads: without it one function's fork bomb takes
//! every pid of the host, and the runner and every other tenant with it.
//!
//! Each instance gets its own cgroup `<parent>/<instance id>` (one per v1 hierarchy); the
//! child joins it by a write of its pid to `cgroup.procs` right after spawn. A child that
//! runs meanwhile could start processes that stay outside the limit — and that is not
//! hypothetical: a shell script forks its first pipeline within that moment. Joining before
//! `exec` needs a `pre_exec` hook or `clone3(CLONE_INTO_CGROUP)`, both `unsafe`, which this
//! workspace forbids. So every child starts under a wrapper shell whose first act is to wait
//! for a line on its stdin, which the runner writes only once the child is in its cgroup;
//! then it execs the program (same pid, process group and user; see `WRAPPER_SCRIPT` in the
//! parent module). Only where there is no `/bin/sh` does the child start unwrapped, and the
//! driver warns once about the remaining race. When the instance ends, whatever is left in
//! its cgroup is killed (`cgroup.kill` where the kernel has it: a process that left the
//! instance's process group with `setsid` goes too) and the cgroup removed.
//!
//! The cgroupfs root and the membership file are configurable ([`CgroupPaths`]) so tests can
//! point the driver at a fake cgroupfs made of plain files. Writes to cgroupfs are small
//! synchronous file operations on a pseudo file system, mostly quick but now and then some
//! milliseconds on v1: an instance's are made on a blocking thread with the rest of its
//! set-up (see `setup`).

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fn_lifecycle::retry::Backoff;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How the driver should limit instance memory and processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimits {
    /// No cgroups: neither memory nor the number of processes is limited (for example where
    /// another layer enforces them).
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
    /// `unified/` below it; the v1 hierarchies are `memory/` and `pids/` below it.
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

/// The cgroup controllers the driver limits instances with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Controller {
    /// `memory.max` (v2) or `memory.limit_in_bytes` (v1).
    Memory,
    /// `pids.max`: processes and threads.
    Pids,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }
}

/// How one limit (memory, or the number of processes) is enforced, as detected once when
/// the driver is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2: instance cgroups are created under `parent`.
    V2 { parent: PathBuf },
    /// cgroup v1, the controller's own hierarchy: instance cgroups are created under `parent`.
    V1 { parent: PathBuf },
    /// Not enforced; `reason` says why (also logged once at start).
    Unenforced { reason: String },
}

/// How instance memory limits are enforced.
pub type MemoryLimitMode = CgroupMode;

/// How the most processes an instance may have is enforced.
pub type PidsLimitMode = CgroupMode;

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupMode::V2 { parent } => write!(f, "cgroup v2 under {}", parent.display()),
            CgroupMode::V1 { parent } => write!(f, "cgroup v1 under {}", parent.display()),
            CgroupMode::Unenforced { reason } => write!(f, "not enforced: {reason}"),
        }
    }
}

impl CgroupMode {
    fn parent(&self) -> Option<(&Path, Version)> {
        match self {
            CgroupMode::V2 { parent } => Some((parent, Version::V2)),
            CgroupMode::V1 { parent } => Some((parent, Version::V1)),
            CgroupMode::Unenforced { .. } => None,
        }
    }
}

/// Decides how `controller`'s limit is enforced. Never fails: anything unusable degrades to
/// [`CgroupMode::Unenforced`] with the reasons collected.
pub(super) fn detect(limits: &MemoryLimits, controller: Controller) -> CgroupMode {
    let paths = match limits {
        MemoryLimits::Off => {
            return CgroupMode::Unenforced {
                reason: "cgroup limits are switched off".into(),
            };
        }
        MemoryLimits::Cgroup(paths) => paths,
    };
    let membership = match std::fs::read_to_string(&paths.membership) {
        Ok(text) => Membership::parse(&text),
        Err(e) => {
            return CgroupMode::Unenforced {
                reason: format!("cannot read {}: {e}", paths.membership.display()),
            };
        }
    };
    let v2 = match try_v2(&paths.root, membership.unified.as_deref(), controller) {
        Ok(parent) => return CgroupMode::V2 { parent },
        Err(reason) => reason,
    };
    let own_v1 = match controller {
        Controller::Memory => membership.memory.as_deref(),
        Controller::Pids => membership.pids.as_deref(),
    };
    let v1 = match try_v1(&paths.root, own_v1, controller) {
        Ok(parent) => return CgroupMode::V1 { parent },
        Err(reason) => reason,
    };
    CgroupMode::Unenforced {
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
    /// The v1 path of the hierarchy that has the pids controller.
    pids: Option<String>,
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
            } else {
                for controller in controllers.split(',') {
                    match controller {
                        "memory" => found.memory = Some(path.to_owned()),
                        "pids" => found.pids = Some(path.to_owned()),
                        _ => {}
                    }
                }
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

fn try_v2(root: &Path, own: Option<&str>, controller: Controller) -> Result<PathBuf, String> {
    let own = own.ok_or("the runner is in no v2 cgroup")?;
    let unified = [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|dir| dir.join("cgroup.controllers").is_file())
        .ok_or_else(|| format!("no cgroup2 hierarchy at {}", root.display()))?;
    let parent = below(&unified, own)?;
    let controllers = read(&parent.join("cgroup.controllers"))?;
    if !has_word(&controllers, controller.name()) {
        return Err(format!(
            "the {} controller is not available in {} (controllers: {:?})",
            controller.name(),
            parent.display(),
            controllers.trim()
        ));
    }
    enable_for_children(&parent, controller)?;
    probe(&parent)?;
    Ok(parent)
}

fn enable_for_children(parent: &Path, controller: Controller) -> Result<(), String> {
    let name = controller.name();
    let subtree = parent.join("cgroup.subtree_control");
    if has_word(&read(&subtree)?, name) {
        return Ok(());
    }
    let enable = format!("+{name}");
    match std::fs::write(&subtree, &enable) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {}
        Err(e) => {
            return Err(format!(
                "cannot enable {name} in {}: {e}",
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
    std::fs::write(&subtree, &enable).map_err(|e| {
        format!(
            "cannot enable {name} in {} even with the runner in a leaf (other processes \
             share its cgroup?): {e}",
            subtree.display()
        )
    })?;
    tracing::info!(leaf = %leaf.display(), controller = name, "moved the runner into a leaf cgroup to delegate limits");
    Ok(())
}

fn try_v1(root: &Path, own: Option<&str>, controller: Controller) -> Result<PathBuf, String> {
    let name = controller.name();
    let own = own.ok_or_else(|| format!("the runner is in no v1 {name} cgroup"))?;
    let parent = below(&root.join(name), own)?;
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

/// One instance's cgroups: one on v2, one per hierarchy (memory, pids) on v1.
#[derive(Debug)]
pub(super) struct InstanceCgroup {
    /// The instance's cgroup directories, the memory one first when there is one.
    dirs: Vec<PathBuf>,
}

impl InstanceCgroup {
    /// Creates the cgroups of instance `id`, with a limit of `memory_mb` (0: none asked for)
    /// and of `pids_max` processes (0: none). `None` when neither limit is asked for or can
    /// be enforced.
    ///
    /// # Errors
    /// A message when a cgroup cannot be created or a limit cannot be written (what was
    /// made is removed).
    pub(super) fn create(
        memory: &CgroupMode,
        pids: &CgroupMode,
        id: &str,
        memory_mb: u64,
        pids_max: u32,
    ) -> Result<Option<Self>, String> {
        let mut cgroup = InstanceCgroup { dirs: Vec::new() };
        let made = cgroup
            .limit_memory(memory, id, memory_mb)
            .and_then(|()| match pids.parent() {
                Some((parent, _)) if pids_max > 0 => {
                    let dir = cgroup.join(parent, id)?;
                    write_limit(&dir, "pids.max", &pids_max.to_string())
                }
                _ => Ok(()),
            });
        if let Err(e) = made {
            cgroup.remove_now();
            return Err(e);
        }
        Ok((!cgroup.dirs.is_empty()).then_some(cgroup))
    }

    /// The cgroups of instance `id` that exist under the parents of `memory` and `pids`
    /// (those an earlier run of the runner left, for the sweep at start); `None` when there
    /// is none. `id` must be an instance id, a plain name.
    pub(super) fn existing(memory: &CgroupMode, pids: &CgroupMode, id: &str) -> Option<Self> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (parent, _) in [memory, pids].into_iter().filter_map(CgroupMode::parent) {
            let dir = parent.join(id);
            if !dirs.contains(&dir) && std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                dirs.push(dir);
            }
        }
        (!dirs.is_empty()).then_some(InstanceCgroup { dirs })
    }

    fn limit_memory(&mut self, mode: &CgroupMode, id: &str, memory_mb: u64) -> Result<(), String> {
        let Some((parent, version)) = mode.parent() else {
            return Ok(());
        };
        if memory_mb == 0 {
            return Ok(());
        }
        let bytes = memory_mb.saturating_mul(1024 * 1024).to_string();
        let dir = self.join(parent, id)?;
        let (limit, swap, swap_value) = match version {
            Version::V2 => ("memory.max", "memory.swap.max", "0"),
            Version::V1 => (
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                bytes.as_str(),
            ),
        };
        write_limit(&dir, limit, &bytes)?;
        // Only where swap accounting exists; without it there is nothing to limit.
        let swap = dir.join(swap);
        if swap.exists()
            && let Err(e) = std::fs::write(&swap, swap_value)
        {
            tracing::debug!(file = %swap.display(), error = %e, "cannot limit swap");
        }
        Ok(())
    }

    /// The instance's cgroup `<parent>/<id>`, created unless it already is (on v2 both
    /// limits share one).
    fn join(&mut self, parent: &Path, id: &str) -> Result<PathBuf, String> {
        let dir = parent.join(id);
        if !self.dirs.contains(&dir) {
            std::fs::create_dir(&dir)
                .map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
            self.dirs.push(dir.clone());
        }
        Ok(dir)
    }

    /// Moves process `pid` into the instance's cgroups.
    ///
    /// # Errors
    /// When a `cgroup.procs` cannot be written.
    pub(super) fn add(&self, pid: u32) -> Result<(), String> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .map_err(|e| format!("cannot add pid {pid} to {}: {e}", procs.display()))?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process in the instance's memory
    /// cgroup: `oom_kill` of `memory.events` (v2) or `memory.oom_control` (v1, kernels from
    /// 4.13); 0 when neither says.
    pub(super) fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .flat_map(|dir| ["memory.events", "memory.oom_control"].map(|f| dir.join(f)))
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .find_map(|text| {
                text.lines().find_map(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0)
    }

    /// The cgroup directories, the memory one first when there is one.
    pub(super) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Kills whatever is in the cgroups now (processes that left the instance's process
    /// group): one round, which [`InstanceCgroup::remove`] repeats for what forked meanwhile
    /// where the kernel has no `cgroup.kill`.
    pub(super) fn kill_members(&self) {
        for dir in &self.dirs {
            kill_members(dir);
        }
    }

    /// Kills whatever is in the cgroups until none is listed, retrying briefly: where the
    /// kernel has no `cgroup.kill`, a round reads `cgroup.procs` and signals each pid, and a
    /// process forked after the read lives on to the next round. The reaper waits for this
    /// before it removes the instance directory, which a live member could keep filling.
    /// Gives up after the same bounded retries as [`InstanceCgroup::remove`], which tries
    /// again.
    pub(super) async fn kill_all_members(&self) {
        for dir in &self.dirs {
            let mut backoff = removal_backoff();
            for _ in 0..12 {
                if !has_members(dir) {
                    break;
                }
                kill_members(dir);
                backoff.sleep().await;
            }
        }
    }

    /// Kills whatever is left in the cgroups (processes that left the instance's process
    /// group) and removes them, retrying briefly while the kernel still counts dying tasks.
    pub(super) async fn remove(&self) {
        for dir in &self.dirs {
            let mut backoff = removal_backoff();
            for attempt in 1..=REMOVAL_ATTEMPTS {
                if try_remove(dir, attempt) {
                    break;
                }
                backoff.sleep().await;
            }
        }
    }

    /// [`InstanceCgroup::remove`] on a thread of its own, for when there is no runtime left
    /// to run it (the runner is shutting down with instances still around), once `after`
    /// (the instance directory's removal) has completed or been dropped.
    pub(super) fn remove_in_background(&self, after: tokio::sync::oneshot::Receiver<()>) {
        let dirs = self.dirs.clone();
        let spawned = std::thread::Builder::new()
            .name("fn-cgroup-cleanup".into())
            .spawn(move || {
                // Dropped unsent: the removal could not start, and there is nothing to wait for.
                drop(after.blocking_recv());
                for dir in dirs {
                    let mut backoff = removal_backoff();
                    for attempt in 1..=REMOVAL_ATTEMPTS {
                        if try_remove(&dir, attempt) {
                            break;
                        }
                        std::thread::sleep(backoff.next_delay());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(cgroups = ?self.dirs, error = %e, "cannot remove instance cgroups");
        }
    }

    /// Best-effort synchronous removal, for error paths before any process joined.
    pub(super) fn remove_now(&self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::debug!(cgroup = %dir.display(), error = %e, "cannot remove instance cgroup");
            }
        }
    }
}

/// How many times a busy cgroup's removal is tried (over about a second and a half).
const REMOVAL_ATTEMPTS: u32 = 12;

/// One try, the `attempt`th, at removing cgroup `dir`: whether it is over (removed, gone, or
/// given up with a warning naming it). A cgroup still busy (dying tasks) has its members
/// killed again and is worth another try, but the last.
fn try_remove(dir: &Path, attempt: u32) -> bool {
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
            if attempt >= REMOVAL_ATTEMPTS {
                tracing::warn!(cgroup = %dir.display(), "instance cgroup still busy; left in place");
                return true;
            }
            kill_members(dir);
            false
        }
        Err(e) => {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove instance cgroup");
            true
        }
    }
}

fn write_limit(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| format!("cannot set {file} in {}: {e}", dir.display()))
}

/// Kills every process in cgroup `dir`: through `cgroup.kill` where the kernel has it (v2,
/// 5.14 on: atomic, so a process forking meanwhile cannot slip out), otherwise one
/// `SIGKILL` per listed process (each round of the caller's retries catches what forked
/// since; the pids limit bounds how many there can be).
/// Whether cgroup `dir` lists a process (one that cannot be read lists none: there is
/// nothing this runner could kill in it either).
fn has_members(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|text| text.split_ascii_whitespace().next().is_some())
}

fn kill_members(dir: &Path) {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.is_file() {
        match std::fs::write(&kill_file, "1") {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup.kill failed; killing one by one");
            }
        }
    }
    let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // ESRCH: already gone. Nothing else is expected for our own children.
        if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
            tracing::debug!(pid, error = %e, "cannot kill process left in instance cgroup");
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

    /// What a removal step logs at WARN, as text.
    #[derive(Clone, Default)]
    struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Warnings {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A cgroup that cannot be removed is named in a warning, by the removal that runs on
    /// the runtime and by the one on a thread of its own alike (both take this step; the
    /// thread's gave up in silence): a cgroup gone or removed says nothing.
    #[test]
    fn a_cgroup_left_in_place_is_named_in_a_warning() {
        let warnings = Warnings::default();
        let out = warnings.clone();
        let _guard = fn_test_support::logs::scoped_subscriber(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .with_writer(move || out.clone())
                .finish(),
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let (gone, empty, kept) = (
            tmp.path().join("gone"),
            tmp.path().join("empty"),
            tmp.path().join("kept"),
        );
        mkdirs(&empty);
        mkdirs(&kept);
        // A plain file in the fake: not a cgroup's, so the directory cannot be removed.
        std::fs::write(kept.join("cgroup.procs"), "42").expect("write");
        for dir in [&gone, &empty, &kept] {
            assert!(try_remove(dir, 1), "{} is over", dir.display());
        }
        assert!(!empty.exists());
        let text = String::from_utf8_lossy(
            &warnings
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("cannot remove instance cgroup")
                && text.contains(&*kept.to_string_lossy()),
            "{text}"
        );
    }

    const HYBRID: &str =
        "9:name=systemd:/\n8:pids:/runners/p1\n4:memory:/runners/r1\n1:cpu,cpuacct:/\n0::/\n";

    fn unenforced() -> CgroupMode {
        CgroupMode::Unenforced {
            reason: "test".into(),
        }
    }

    #[test]
    fn counts_the_oom_kills_of_v2_and_v1() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cgroup = |dir: &str, file: &str, text: &str| {
            let dir = tmp.path().join(dir);
            mkdirs(&dir);
            std::fs::write(dir.join(file), text).expect("write");
            InstanceCgroup { dirs: vec![dir] }
        };
        let v2 = cgroup(
            "v2",
            "memory.events",
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n",
        );
        assert_eq!(v2.oom_kills(), 2);
        let v1 = cgroup(
            "v1",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        );
        assert_eq!(v1.oom_kills(), 1);
        let none = cgroup("none", "memory.events", "low 0\noom 0\noom_kill 0\n");
        assert_eq!(none.oom_kills(), 0);
        let missing = InstanceCgroup {
            dirs: vec![tmp.path().join("gone")],
        };
        assert_eq!(missing.oom_kills(), 0);
    }

    #[test]
    fn parses_membership() {
        assert_eq!(
            Membership::parse(HYBRID),
            Membership {
                unified: Some("/".into()),
                memory: Some("/runners/r1".into()),
                pids: Some("/runners/p1".into()),
            }
        );
        assert_eq!(
            Membership::parse("0::/system.slice/runner.service\n"),
            Membership {
                unified: Some("/system.slice/runner.service".into()),
                memory: None,
                pids: None,
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
        let mode = detect(&MemoryLimits::Cgroup(paths.clone()), Controller::Memory);
        assert_eq!(
            mode,
            MemoryLimitMode::V1 {
                parent: parent.clone()
            }
        );
        // The probe cleaned up after itself.
        assert_eq!(std::fs::read_dir(&parent).expect("read_dir").count(), 0);

        let cgroup = InstanceCgroup::create(&mode, &unenforced(), "inst-1", 128, 64)
            .expect("create")
            .expect("enforced");
        assert_eq!(cgroup.dirs(), [parent.join("inst-1")]);
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
        let limits = MemoryLimits::Cgroup(paths);
        let mode = detect(&limits, Controller::Memory);
        assert_eq!(
            mode,
            MemoryLimitMode::V2 {
                parent: parent.clone()
            }
        );
        let subtree = parent.join("cgroup.subtree_control");
        assert_eq!(std::fs::read_to_string(&subtree).expect("read"), "+memory");
        let pids = detect(&limits, Controller::Pids);
        assert_eq!(pids, mode, "both limits in one v2 cgroup");
        assert_eq!(std::fs::read_to_string(&subtree).expect("read"), "+pids");

        let cgroup = InstanceCgroup::create(&mode, &pids, "inst-3", 256, 100)
            .expect("create")
            .expect("enforced");
        assert_eq!(cgroup.dirs(), [parent.join("inst-3")]);
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-3/memory.max")).expect("read"),
            (256u64 * 1024 * 1024).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("inst-3/pids.max")).expect("read"),
            "100"
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
        match detect(&MemoryLimits::Cgroup(paths), Controller::Memory) {
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
            detect(&MemoryLimits::Cgroup(paths), Controller::Pids),
            MemoryLimitMode::Unenforced { .. }
        ));
        assert!(matches!(
            detect(&MemoryLimits::Off, Controller::Memory),
            MemoryLimitMode::Unenforced { .. }
        ));
    }

    #[test]
    fn no_limit_asked_means_no_cgroup() {
        let mode = MemoryLimitMode::V1 {
            parent: PathBuf::from("/nonexistent"),
        };
        assert!(
            InstanceCgroup::create(&mode, &mode, "x", 0, 0)
                .expect("no-op")
                .is_none()
        );
    }

    #[test]
    fn v1_limits_processes_in_the_pids_hierarchy() {
        let (_tmp, paths) = fake(HYBRID);
        let memory_parent = paths.root.join("memory/runners/r1");
        let pids_parent = paths.root.join("pids/runners/p1");
        mkdirs(&memory_parent);
        mkdirs(&pids_parent);
        let limits = MemoryLimits::Cgroup(paths);
        let memory = detect(&limits, Controller::Memory);
        let pids = detect(&limits, Controller::Pids);
        assert_eq!(
            pids,
            PidsLimitMode::V1 {
                parent: pids_parent.clone()
            }
        );

        let cgroup = InstanceCgroup::create(&memory, &pids, "inst-2", 128, 64)
            .expect("create")
            .expect("enforced");
        assert_eq!(
            cgroup.dirs(),
            [memory_parent.join("inst-2"), pids_parent.join("inst-2")]
        );
        assert_eq!(
            std::fs::read_to_string(pids_parent.join("inst-2/pids.max")).expect("read"),
            "64"
        );
        cgroup.add(99).expect("add");
        for dir in cgroup.dirs() {
            assert_eq!(
                std::fs::read_to_string(dir.join("cgroup.procs")).expect("read"),
                "99"
            );
        }

        // No memory asked for: the process limit still gets its cgroup.
        let only_pids = InstanceCgroup::create(&memory, &pids, "inst-4", 0, 32)
            .expect("create")
            .expect("enforced");
        assert_eq!(only_pids.dirs(), [pids_parent.join("inst-4")]);
        assert!(!memory_parent.join("inst-4").exists());
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
