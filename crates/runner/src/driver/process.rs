//! The `process` driver: function instances as child processes on the Fn FDK `http-stream`
//! contract.
//!
//! This module owns everything between "start an instance of this spec" and "the instance's
//! process is gone": resolving the command inside the functions directory, the instance's
//! private socket directory, the child's environment and user, its cgroups, logging its
//! output, waiting for its listener, the HTTP/1 connection over its unix socket, and killing and
//! cleaning up. It does *not* decide when to start or kill instances (the pool does), nor which
//! user functions run as by default (the runner's configuration does).
//!
//! Layout:
//! - this file: [`ProcessDriverConfig`], [`ProcessDriver`] and the start sequence;
//! - `command`: resolving and vetting the program, [`FunctionUser`];
//! - `uids`: the host's table of function uids (`FN_FUNCTION_UID_TABLE`);
//! - `cgroup`: detecting cgroup support and per-instance memory and pids cgroups;
//! - `instance`: [`ProcessInstance`]: the running child, its reaper, calls over its socket;
//! - `setup`: an instance's directory, cgroups and process, made on a blocking thread;
//! - `tmpfs`: the tmpfs an instance in namespaces gets as its directory;
//!
//! Shared with the other drivers (in `driver`): `socket` (calls over the instance's socket,
//! waiting for its listener), `http_stream` (the contract's header translation) and `output`
//! (bounded line logging of the function's stdout and stderr).
//!
//! Security model (function code is untrusted): the program must be an executable regular file
//! inside the functions directory (after resolving symlinks); the child gets a cleared
//! environment, its own process group, and — when a [`FunctionUser`] is configured — an
//! unprivileged uid/gid (the standard library drops supplementary groups when a root parent sets
//! a uid). Each instance's socket lives in its own `0700` directory owned by the function user,
//! under a `0711` socket root, so functions cannot reach each other's sockets (in namespaces
//! the directory is a tmpfs of its own, so what a function writes there is bounded memory,
//! not the host's disk). Every child
//! starts under a small `/bin/sh` wrapper (`WRAPPER_SCRIPT`) that holds it until it is in its
//! cgroups and kills its process group if the runner dies.

mod cgroup;
mod command;
mod instance;
mod setup;
mod tmpfs;
mod uids;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::process::Command;

pub use cgroup::{CgroupMode, CgroupPaths, MemoryLimitMode, MemoryLimits, PidsLimitMode};
pub(crate) use command::check_config;
pub use command::{FunctionUser, FunctionUsers, UidRange};
pub use instance::ProcessInstance;
pub use uids::DEFAULT_UID_TABLE;

use super::output::Labels;
use super::socket::{unmount_instance_dir, wait_for_listener};
use super::{Driver, DriverError, Instance, InstanceSpec};
use setup::{Setup, set_up_off_the_runtime_thread};

/// In namespaces, the prefix of the function's config variables until `fn-isolate` starts
/// the program (its `CONFIG_PREFIX`); see [`ProcessDriver::command`].
pub const ISOLATED_CONFIG_PREFIX: &str = "FN_ISOLATE_CONFIG_";

/// The shell that wraps every function process; see [`WRAPPER_SCRIPT`].
const WRAPPER_SHELL: &str = "/bin/sh";

/// What the wrapper shell runs (`$0` is the program, `$@` its arguments). Its stdin is a pipe
/// from the runner, the instance's *lifeline*:
/// 1. **gate**: it waits for one line, which the runner writes once the process has joined
///    its cgroups, so nothing the function starts escapes the limits (see `cgroup`);
/// 2. **watchdog**: it leaves a background subshell reading the lifeline, which kills the
///    whole process group when the lifeline closes — when the runner drops the instance or
///    dies, even by `SIGKILL` (the kernel closes its end). Without it a crashed runner would
///    leave its functions running as orphans. It starts before the config held back until
///    the gate is given back (see [`read_before_the_gate`]), so a function's `TMOUT`, which
///    bash takes as every `read`'s time limit, cannot end its wait and kill the instance;
/// 3. it raises its own `oom_score_adj` to 1000 (any process may raise its own; the
///    program and its children inherit it; the watchdog, started before, does not), so that
///    a function sharing the runner's memory cgroup is the OOM killer's pick before the
///    runner. A failure (no `/proc`) is ignored: the function runs as before;
/// 4. it execs the program with stdin from `/dev/null` and the lifeline closed: same pid,
///    process group and user, so the program is the instance's process.
///
/// If the runner goes away before the gate opens, `read` sees end-of-file and the program
/// never runs.
const WRAPPER_SCRIPT: &str = r#"read -r gate || exit 1
exec 3<&0 </dev/null
( read -r gone <&3; kill -9 0 ) >/dev/null 2>&1 &
for n in $FN_RESTORE_CONFIG; do eval "export $n=\"\${FN_ISOLATE_CONFIG_$n}\"; unset FN_ISOLATE_CONFIG_$n"; done
unset FN_RESTORE_CONFIG
{ echo 1000 >/proc/self/oom_score_adj; } 2>/dev/null || true
exec 3<&- "$0" "$@"
"#;

/// [`WRAPPER_SCRIPT`], first lowering the soft open-file limit to `open_files` when set.
/// Lowering a soft limit cannot be refused, so a failure is a broken shell: the instance
/// does not start.
fn wrapper_script(open_files: Option<u64>) -> String {
    match open_files {
        Some(limit) => format!("ulimit -S -n {limit} || exit 1\n{WRAPPER_SCRIPT}"),
        None => WRAPPER_SCRIPT.to_owned(),
    }
}

/// Whether a config variable is one the dynamic loader (`LD_*`) or a shell reads as the
/// wrapper shell starts, before its gate, to run code or change how it runs: `ENV` and,
/// where `/bin/sh` is bash (RHEL, Fedora, Arch), `BASH_ENV`, `PS4` (with `SHELLOPTS=xtrace`
/// bash runs what it expands), `BASH_XTRACEFD`, `POSIXLY_CORRECT`, `IFS` and `TMOUT` (the
/// time limit of the gate's and the watchdog's `read`: a function's `TMOUT=5` had every
/// instance killed 5 s after it started). Only plain
/// names: the wrapper restores them with `eval`, and the loader reads no other kind.
/// `SHELLOPTS` and `BASHOPTS` are not among them: bash makes them read-only, so the
/// restore would fail and end the wrapper; with `PS4` held back, they run nothing.
fn read_before_the_gate(name: &str) -> bool {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    plain
        && (name.starts_with("LD_")
            || matches!(
                name,
                "BASH_ENV" | "ENV" | "PS4" | "BASH_XTRACEFD" | "POSIXLY_CORRECT" | "IFS" | "TMOUT"
            ))
}

/// Whether a config name is a bash function import (`BASH_FUNC_<name>%%`): where `/bin/sh`
/// is bash, the wrapper shell would define it as it starts (one named `read` replaces the
/// gate's `read`), so tenant code would run before the instance joins its cgroups. Such a
/// name cannot be given back after the gate; a config holding one is refused.
fn shell_function_import(name: &str) -> bool {
    name.starts_with("BASH_FUNC_")
}

/// `PATH` of every function that sets none in its config: the usual system directories,
/// nothing of the runner's own.
const FUNCTION_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Name of the listener socket inside an instance directory (the FDK symlinks it into place).
const LISTENER_NAME: &str = "lsnr.sock";
/// The function's private `TMPDIR`, inside its instance directory, outside namespaces (in
/// them `TMPDIR` is the private `/tmp`).
const INSTANCE_TMP: &str = "tmp";

/// Room left in a unix socket path (at most 107 bytes on Linux) after the instance directory,
/// for the socket name the FDK binds privately before it symlinks `lsnr.sock` to it.
const FDK_SOCKET_NAME_ROOM: usize = 40;

/// Longest unix socket path on Linux (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Longest instance id this driver makes: `<8 hex digits>-<counter>`.
const MAX_INSTANCE_ID_LEN: usize = 8 + 1 + 20;

/// Most processes and threads of one instance unless configured: the docker driver's
/// default too (`FN_DOCKER_PIDS_LIMIT`).
pub const DEFAULT_PIDS_LIMIT: u32 = 256;

/// Settings of the `process` driver; built by the runner from its `FN_*` configuration.
#[derive(Debug, Clone)]
pub struct ProcessDriverConfig {
    /// `FN_FUNCTIONS_DIR`: the only place programs are started from. A spec's program is
    /// resolved inside it, and it is the working directory of every function.
    pub functions_dir: PathBuf,
    /// Where instance directories (one per instance, holding only its socket) are created.
    /// Created with mode `0711` if missing, so an unprivileged function user can reach its
    /// own subdirectory but not list the others. Must be short: unix socket paths are limited
    /// to 107 bytes.
    pub socket_root: PathBuf,
    /// Who functions run as; see [`FunctionUsers`].
    pub function_users: FunctionUsers,
    /// `FN_FUNCTION_UID_TABLE`: the host's table of the uid each function got, shared by
    /// every runner of the host. Required with [`FunctionUsers::PerFunction`] (no default
    /// here, so that a test cannot write the host's); unused otherwise.
    pub uid_table: Option<PathBuf>,
    /// How instance memory and process limits are enforced; see [`MemoryLimits`].
    pub memory_limits: MemoryLimits,
    /// `FN_FUNCTION_PIDS_LIMIT`: most processes and threads one instance may have, wrapper
    /// and helper included (0: no limit). Enforced through the pids cgroup controller.
    pub pids_limit: u32,
    /// Namespaces of its own for each instance, when the runner may make them.
    pub isolation: Option<Isolation>,
    /// The soft open-file limit every function gets, when it should be lower than the
    /// runner's: the limit the runner started with, before it raised its own. `None`:
    /// functions inherit the runner's. Set by the wrapper shell, so a runner without one
    /// (no `/bin/sh`) leaves functions with its own.
    pub function_open_files: Option<u64>,
}

/// Namespaces for every instance, made by the `fn-isolate` helper (it needs root or
/// `CAP_SYS_ADMIN`): a PID namespace (the function sees only its own processes), a mount
/// namespace with a private `/tmp` and `/proc`, and with `network_none` a network namespace
/// with nothing in it (the function reaches nothing but its own socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The `fn-isolate` program.
    pub helper: PathBuf,
    /// `FN_FUNCTION_NETWORK=none`.
    pub network_none: bool,
}

impl ProcessDriverConfig {
    /// A config with no function user and memory limits detected on the real cgroup
    /// filesystem.
    pub fn new(functions_dir: impl Into<PathBuf>, socket_root: impl Into<PathBuf>) -> Self {
        ProcessDriverConfig {
            functions_dir: functions_dir.into(),
            socket_root: socket_root.into(),
            function_users: FunctionUsers::Runner,
            uid_table: None,
            memory_limits: MemoryLimits::default(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            isolation: None,
            function_open_files: None,
        }
    }

    /// Limits every instance to `limit` processes and threads (0: no limit).
    #[must_use]
    pub fn with_pids_limit(mut self, limit: u32) -> Self {
        self.pids_limit = limit;
        self
    }

    /// Starts every instance in namespaces of its own (`None`: in the runner's).
    #[must_use]
    pub fn with_isolation(mut self, isolation: Option<Isolation>) -> Self {
        self.isolation = isolation;
        self
    }

    /// Runs every function as `user` (`None`: as the runner's own user).
    #[must_use]
    pub fn with_function_user(mut self, user: Option<FunctionUser>) -> Self {
        self.function_users = user.map_or(FunctionUsers::Runner, FunctionUsers::Shared);
        self
    }

    /// Sets who functions run as.
    #[must_use]
    pub fn with_function_users(mut self, users: FunctionUsers) -> Self {
        self.function_users = users;
        self
    }

    /// Keeps the uid of each function in the table file at `path` (with
    /// [`FunctionUsers::PerFunction`]).
    #[must_use]
    pub fn with_uid_table(mut self, path: impl Into<PathBuf>) -> Self {
        self.uid_table = Some(path.into());
        self
    }

    /// Gives every function the soft open-file limit `limit` (`None`: the runner's own).
    #[must_use]
    pub fn with_function_open_files(mut self, limit: Option<u64>) -> Self {
        self.function_open_files = limit;
        self
    }

    /// Sets how memory limits are enforced.
    #[must_use]
    pub fn with_memory_limits(mut self, limits: MemoryLimits) -> Self {
        self.memory_limits = limits;
        self
    }
}

/// Why the `process` driver cannot be set up. Configuration errors: nothing to retry.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `FN_FUNCTIONS_DIR` does not name a usable directory.
    #[error("FN_FUNCTIONS_DIR {}: {reason}", path.display())]
    FunctionsDir { path: PathBuf, reason: String },
    /// The socket root (`FN_SOCKET_DIR` of the pure-runner) cannot be created or is unusable.
    #[error("FN_SOCKET_DIR {}: {reason}", path.display())]
    SocketRoot { path: PathBuf, reason: String },
    /// The function user does not exist or cannot be looked up.
    #[error("function user {name:?}: {reason}")]
    FunctionUser { name: String, reason: String },
    /// The table of function uids is missing, cannot be made, or others could write it.
    #[error("FN_FUNCTION_UID_TABLE {}: {reason}", path.display())]
    UidTable { path: PathBuf, reason: String },
    /// A uid per function, and no table to keep them in.
    #[error(
        "FN_FUNCTION_UID_TABLE: required with a uid per function (FN_FUNCTION_UIDS); set it \
         to a file only root writes"
    )]
    UidTableUnset,
}

/// Runs function instances as child processes. See the module docs.
#[derive(Debug)]
pub struct ProcessDriver {
    /// Canonical functions directory: programs must resolve to a path under it.
    functions_dir: PathBuf,
    socket_root: PathBuf,
    function_users: FunctionUsers,
    /// With [`FunctionUsers::PerFunction`]: the host's table of the uid each function got.
    uids: Option<Arc<uids::UidTable>>,
    /// Detected once at construction; never re-probed per instance.
    memory: MemoryLimitMode,
    /// Likewise, for the pids limit.
    pids: PidsLimitMode,
    /// The pids limit of every instance (0: none).
    pids_limit: u32,
    isolation: Option<Isolation>,
    /// The shell that gates and watches every child ([`WRAPPER_SCRIPT`]); `None` when there
    /// is no shell (then children start unwrapped).
    wrapper: Option<PathBuf>,
    /// What the wrapper runs: [`WRAPPER_SCRIPT`], after setting the functions' open-file
    /// limit when there is one to set.
    wrapper_script: String,
    /// Distinguishes this driver's instance ids from those of an earlier runner that used
    /// the same socket root (and maybe the same pid).
    id_prefix: String,
    /// The socket root's lock, held for the driver's life when it got it (see
    /// [`claim_socket_root`]).
    /// Taken again when the root is made again (see [`ProcessDriver::check_socket_root`]).
    root_lock: std::sync::Mutex<Option<RootClaim>>,
    next_id: AtomicU64,
    /// Programs that [`Driver::check`] found valid, so that a call of a function already
    /// vetted costs no file-system calls. A start vets again and forgets a program that no
    /// longer passes; the functions directory is the operator's, so nothing else changes it.
    vetted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The socket root's device and inode as last checked (see
    /// [`ProcessDriver::check_socket_root`]).
    root_seen: std::sync::Mutex<Option<(u64, u64, u32, u32)>>,
    /// A test's hold inside the next instance's set-up (see `setup`'s tests).
    #[cfg(test)]
    setup_hold: std::sync::Mutex<Option<setup::tests::Hold>>,
}

/// Most programs remembered as vetted; past it the memory starts over.
const MAX_VETTED: usize = 4096;

impl ProcessDriver {
    /// Checks the functions directory, creates the socket root and detects memory-limit
    /// support (logging one warning when limits cannot be enforced).
    ///
    /// # Errors
    /// [`SetupError::FunctionsDir`] when the functions directory does not exist or is not a
    /// directory; [`SetupError::SocketRoot`] when the socket root cannot be created, is not
    /// valid UTF-8, or is too long for unix socket paths.
    pub fn new(config: ProcessDriverConfig) -> Result<Self, SetupError> {
        let functions_dir =
            std::fs::canonicalize(&config.functions_dir).map_err(|e| SetupError::FunctionsDir {
                path: config.functions_dir.clone(),
                reason: e.to_string(),
            })?;
        if !functions_dir.is_dir() {
            return Err(SetupError::FunctionsDir {
                path: config.functions_dir,
                reason: "not a directory".into(),
            });
        }

        let typical = typical_user(config.function_users);
        if let Some(user) = typical {
            reachable_by(&functions_dir, user).map_err(|reason| SetupError::FunctionsDir {
                path: config.functions_dir.clone(),
                reason,
            })?;
        }

        // Before anything is made: a table others could write is a configuration error.
        let uids = match (config.function_users, &config.uid_table) {
            (FunctionUsers::PerFunction(range), Some(path)) => {
                for clash in command::uids_in_use(range, &command::HostIds::read()) {
                    tracing::warn!(
                        range = format!("{}-{}", range.first, range.last),
                        "FN_FUNCTION_UIDS overlaps {clash}: a function given such a uid could \
                         signal its processes and use its files; choose a range nothing else \
                         on the host uses"
                    );
                }
                Some(Arc::new(uids::UidTable::open(path, range)?))
            }
            (FunctionUsers::PerFunction(_), None) => {
                return Err(SetupError::UidTableUnset);
            }
            _ => None,
        };

        let socket_root = prepare_socket_root(&config.socket_root, typical)?;
        let root_seen = std::sync::Mutex::new(dir_identity(&socket_root));
        let root_lock = claim_socket_root(&socket_root);

        let memory = cgroup::detect(&config.memory_limits, cgroup::Controller::Memory);
        match &memory {
            MemoryLimitMode::Unenforced { reason } => tracing::warn!(
                reason = %reason,
                "function memory limits cannot be enforced; instances run without a memory limit"
            ),
            mode => tracing::info!(mode = %mode, "function memory limits enforced"),
        }
        let pids = if config.pids_limit == 0 {
            PidsLimitMode::Unenforced {
                reason: "FN_FUNCTION_PIDS_LIMIT is 0".into(),
            }
        } else {
            cgroup::detect(&config.memory_limits, cgroup::Controller::Pids)
        };
        match &pids {
            PidsLimitMode::Unenforced { reason } if config.pids_limit > 0 => tracing::warn!(
                reason = %reason,
                "function process limits cannot be enforced: one function can take every pid \
                 of the host"
            ),
            PidsLimitMode::Unenforced { .. } => {}
            mode => {
                tracing::info!(mode = %mode, limit = config.pids_limit, "function process limits enforced")
            }
        }

        // Once the cgroups are known: a leftover instance's go with its directory.
        if root_lock.is_some() {
            sweep_leftovers(&socket_root, &memory, &pids);
        }

        let wrapper = command::wrapper_shell();
        if wrapper.is_none() {
            tracing::warn!(
                shell = WRAPPER_SHELL,
                "no shell to wrap functions: they outlive a runner that crashes, and processes \
                 they start in their first moments escape their memory limit"
            );
        }

        let id_prefix = format!("{:08x}", super::id_seed());
        Ok(ProcessDriver {
            functions_dir,
            socket_root,
            function_users: config.function_users,
            uids,
            memory,
            pids,
            pids_limit: config.pids_limit,
            isolation: config.isolation,
            wrapper,
            wrapper_script: wrapper_script(config.function_open_files),
            id_prefix,
            next_id: AtomicU64::new(1),
            vetted: std::sync::Mutex::new(std::collections::HashSet::new()),
            root_lock: std::sync::Mutex::new(root_lock),
            root_seen,
            #[cfg(test)]
            setup_hold: std::sync::Mutex::default(),
        })
    }

    /// Whether the users functions run as could read the file at `path` (every directory
    /// above it searchable and the file readable for them, by its mode bits): the pure-runner
    /// warns at start when its private key is. Always false when functions run as the
    /// runner's own user, who must read it anyway.
    pub fn exposes(&self, path: &Path) -> bool {
        let user = match self.function_users {
            FunctionUsers::Runner => return false,
            FunctionUsers::Shared(user) => user,
            FunctionUsers::PerFunction(range) => FunctionUser {
                uid: range.first,
                gid: range.first,
            },
        };
        readable_by(path, user)
    }

    /// How memory limits are enforced, as detected by [`ProcessDriver::new`].
    pub fn memory_limit_mode(&self) -> &MemoryLimitMode {
        &self.memory
    }

    /// How the pids limit is enforced, as detected at construction.
    pub fn pids_limit_mode(&self) -> &PidsLimitMode {
        &self.pids
    }

    /// The canonical functions directory.
    pub fn functions_dir(&self) -> &Path {
        &self.functions_dir
    }

    /// Starts an instance of `spec` and waits until its listener socket appears. Like
    /// [`Driver::start`], but returns the concrete instance (tests inspect its directory and
    /// cgroup).
    ///
    /// # Errors
    /// [`DriverError::Invalid`] when the spec cannot run here (see [`Driver::check`]);
    /// [`DriverError::Start`] when the instance directory, cgroup or process cannot be set
    /// up, when the process exits before opening its listener, or when it does not open it
    /// within `start_timeout` (it is then killed).
    pub async fn start_process(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> Result<ProcessInstance, DriverError> {
        let program = match self.vet(spec) {
            Ok(program) => program,
            Err(e) => {
                if let Some(name) = spec.command.first() {
                    self.vetted_set().remove(name);
                }
                return Err(e);
            }
        };
        let id = format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.socket_root.join(&id);
        let socket = dir.join(LISTENER_NAME);
        let labels = Labels::new(spec.app.clone(), spec.function.clone(), id.clone(), call_id);

        let user = self.user_for(spec, start_timeout).await?;
        self.check_socket_root()?;
        let cmd = self.command(spec, &program, &dir, &socket, user);
        let setup = Setup {
            id,
            dir,
            socket,
            labels,
            user,
            namespaced: self.namespaces_for(user).is_some(),
            memory_mb: spec.memory_mb,
            concurrency: spec.concurrency,
            memory: self.memory.clone(),
            pids: self.pids.clone(),
            pids_limit: self.pids_limit,
            cmd,
            program: program.clone(),
            #[cfg(test)]
            hold: self
                .setup_hold
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        };
        let mut instance = set_up_off_the_runtime_thread(setup).await?;
        instance.open_gate().await;
        tracing::debug!(
            instance = %instance.id(),
            pid = ?instance.pid(),
            program = %program.display(),
            "function instance started"
        );

        if let Err(e) = wait_for_listener(instance.client(), start_timeout).await {
            instance.kill();
            return Err(e);
        }
        Ok(instance)
    }

    fn vetted_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // A set of names: a panic elsewhere cannot leave it inconsistent.
        self.vetted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves the program and checks the config of `spec`.
    fn vet(&self, spec: &InstanceSpec) -> Result<PathBuf, DriverError> {
        let Some(program) = spec.command.first() else {
            let only_image = spec
                .image
                .as_deref()
                .map(|image| format!(", only the image {image:?}; this runner's process driver does not run images: give the function a command under FN_FUNCTIONS_DIR"))
                .unwrap_or_default();
            return Err(DriverError::Invalid(format!(
                "function {}/{} has no command{only_image}",
                spec.app, spec.function
            )));
        };
        let program = command::resolve_program(&self.functions_dir, program)?;
        self.check_config(&spec.config)?;
        Ok(program)
    }

    /// Checks that every config entry can be an environment variable and, where the wrapper
    /// shell runs with the config outside namespaces, that none is a shell function import.
    fn check_config(
        &self,
        config: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        command::check_config(config)?;
        if self.wrapper.is_some()
            && self.isolation.is_none()
            && let Some(name) = config.keys().find(|name| shell_function_import(name))
        {
            return Err(DriverError::Invalid(format!(
                "config key {name:?} is a shell function import, which the wrapper shell \
                 (bash as /bin/sh) would run before the instance is in its cgroups: remove it"
            )));
        }
        Ok(())
    }

    /// The user `spec`'s instances run as: with [`FunctionUsers::PerFunction`], the uid the
    /// function holds in the host's table, or a free one given to it now.
    ///
    /// A function this runner has started before costs a map lookup. Its first start reads
    /// the table under an `flock` other runners of the host take too: on a blocking thread,
    /// so that a holder that stalls (a frozen runner, a table on a network file system)
    /// holds no runtime thread, and for at most `within`.
    ///
    /// # Errors
    /// [`DriverError::Start`] when every uid of the range is held, the table cannot be read
    /// or written, or it stays locked for `within`.
    async fn user_for(
        &self,
        spec: &InstanceSpec,
        within: Duration,
    ) -> Result<Option<FunctionUser>, DriverError> {
        match self.function_users {
            FunctionUsers::Runner => return Ok(None),
            FunctionUsers::Shared(user) => return Ok(Some(user)),
            FunctionUsers::PerFunction(_) => {}
        }
        // `new` made sure of a table with a uid per function.
        let Some(uids) = &self.uids else {
            return Err(DriverError::Start(
                "FN_FUNCTION_UID_TABLE: no table of function uids".into(),
            ));
        };
        if let Some(user) = uids.known(&spec.app, &spec.function) {
            return Ok(Some(user));
        }
        let (table, app, function) = (Arc::clone(uids), spec.app.clone(), spec.function.clone());
        // The lookup gives up by itself at the deadline: a thread left waiting for the lock
        // would hold the runtime's shutdown (its blocking pool is waited for) and pile up.
        let deadline = std::time::Instant::now() + within;
        let (user, new) =
            tokio::task::spawn_blocking(move || table.user_for(&app, &function, deadline))
                .await
                .map_err(|e| {
                    DriverError::Start(format!("FN_FUNCTION_UID_TABLE: the lookup failed: {e}"))
                })??;
        if new {
            tracing::info!(app = %spec.app, function = %spec.function, uid = user.uid, "function gets a uid of its own");
        }
        Ok(Some(user))
    }

    /// Whether instances run as `user` get namespaces of their own, and which: only a
    /// function user can have them (`fn-isolate` never runs a program as root).
    fn namespaces_for(&self, user: Option<FunctionUser>) -> Option<(&Isolation, FunctionUser)> {
        self.isolation.as_ref().zip(user)
    }

    /// Checks, before an instance directory is made in it, that the socket root is still the
    /// directory checked at start. One removed while the runner runs (a /tmp cleaner) failed
    /// every start until a restart; one made again by another user (in a shared /tmp) would
    /// be a directory they could swap instance directories in. Either way it is prepared and
    /// checked again as at start: made anew, or refused when it is not the runner's own.
    fn check_socket_root(&self) -> Result<(), DriverError> {
        let mut seen = self
            .root_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = dir_identity(&self.socket_root);
        if now.is_some() && now == *seen {
            return Ok(());
        }
        prepare_socket_root(&self.socket_root, typical_user(self.function_users))
            .map_err(|e| DriverError::Start(format!("{e} (it changed while the runner ran)")))?;
        tracing::warn!(
            socket_root = %self.socket_root.display(),
            "the socket root was removed or replaced while the runner ran (a /tmp cleaner?): \
             made again and checked"
        );
        *seen = dir_identity(&self.socket_root);
        // The lock was on the old directory: without one in the new, another runner starting
        // on this root would take it and sweep this one's instance directories away.
        // Nothing is swept here: the new directory holds this runner's instances only.
        let claimed = claim_socket_root(&self.socket_root);
        *self
            .root_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = claimed;
        Ok(())
    }

    /// The child's command: the `wrapper` shell running [`WRAPPER_SCRIPT`] for the program,
    /// or the program itself when there is no shell.
    fn command(
        &self,
        spec: &InstanceSpec,
        program: &Path,
        dir: &Path,
        socket: &Path,
        user: Option<FunctionUser>,
    ) -> Command {
        // In namespaces, the helper starts as root and runs the program as the user.
        let isolated = self.namespaces_for(user);
        let start: &Path = isolated.map_or(program, |(isolation, _)| &isolation.helper);
        let mut cmd = match self.wrapper.as_deref() {
            Some(shell) => {
                let mut cmd = Command::new(shell);
                cmd.arg("-c").arg(&self.wrapper_script).arg(start);
                cmd.stdin(Stdio::piped());
                cmd
            }
            None => {
                let mut cmd = Command::new(start);
                if let Some(name) = spec.command.first()
                    && isolated.is_none()
                {
                    cmd.arg0(name);
                }
                cmd.stdin(Stdio::null());
                cmd
            }
        };
        if let Some((isolation, user)) = isolated {
            cmd.arg("--uid")
                .arg(user.uid.to_string())
                .arg("--gid")
                .arg(user.gid.to_string())
                .arg("--keep")
                .arg(dir)
                .arg("--keep")
                .arg(&self.functions_dir);
            if isolation.network_none {
                cmd.arg("--net-none");
            }
            cmd.arg("--").arg(program);
        }
        cmd.args(spec.command.iter().skip(1));
        cmd.env_clear();
        // The function's config first, so that the contract's variables below win. In
        // namespaces the wrapper shell and the helper run as root until the helper starts
        // the program: there the config goes under ISOLATED_CONFIG_PREFIX, so that the
        // dynamic loader and the shell read none of it (a tenant's `LD_PRELOAD` would run
        // its code as root), and the helper gives it back its names for the program alone.
        //
        // Without namespaces the shell runs as the user, but before the gate, that is before
        // the process is in its cgroups: config the dynamic loader or the shell reads at
        // once (`LD_PRELOAD`, `BASH_ENV`, ...) would run tenant code outside the limits, and
        // what it forked would stay outside them. Those few go under the prefix too, and the
        // wrapper gives them back their names after the gate (`FN_RESTORE_CONFIG` lists them;
        // set after the config, so a tenant's own value cannot add to it).
        match isolated {
            Some(_) => {
                cmd.envs(
                    spec.config
                        .iter()
                        .map(|(name, value)| (format!("{ISOLATED_CONFIG_PREFIX}{name}"), value)),
                );
            }
            None if self.wrapper.is_some() => {
                let (deferred, direct): (Vec<_>, Vec<_>) = spec
                    .config
                    .iter()
                    .partition(|(name, _)| read_before_the_gate(name));
                cmd.envs(direct);
                let mut restore = String::new();
                for (name, value) in deferred {
                    cmd.env(format!("{ISOLATED_CONFIG_PREFIX}{name}"), value);
                    restore.push_str(name);
                    restore.push(' ');
                }
                cmd.env("FN_RESTORE_CONFIG", restore.trim_end());
            }
            None => {
                cmd.envs(&spec.config);
            }
        }
        // A default the function's config may replace, as an image's `ENV` is under the
        // docker driver (the program and the wrapper are started by their full paths, and
        // under namespaces the config's PATH reaches the program alone, as the rest does).
        if !spec.config.contains_key("PATH") {
            cmd.env("PATH", FUNCTION_PATH);
        }
        cmd.envs(spec.default_ids());
        cmd.env("FN_FORMAT", "http-stream")
            .env("FN_LISTENER", format!("unix:{}", socket.display()))
            .env("FN_APP_NAME", &spec.app)
            .env("FN_FN_NAME", &spec.function)
            .env("FN_MEMORY", spec.memory_mb.to_string())
            .env("FN_TYPE", "sync");
        // In namespaces `/tmp` is the instance's own tmpfs, whose pages count in its memory
        // limit (the instance directory is a tmpfs too, see `tmpfs`, but holds the socket).
        if isolated.is_some() {
            cmd.env("HOME", "/tmp").env("TMPDIR", "/tmp");
        } else {
            cmd.env("HOME", dir).env("TMPDIR", dir.join(INSTANCE_TMP));
        }
        cmd.current_dir(&self.functions_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(user) = user
            && isolated.is_none()
        {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }
}

impl Driver for ProcessDriver {
    fn check(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        if let Some(name) = spec.command.first()
            && self.vetted_set().contains(name)
        {
            return self.check_config(&spec.config);
        }
        self.vet(spec)?;
        if let Some(name) = spec.command.first() {
            let mut vetted = self.vetted_set();
            if vetted.len() >= MAX_VETTED {
                vetted.clear();
            }
            vetted.insert(name.clone());
        }
        Ok(())
    }

    fn start(
        &self,
        spec: &InstanceSpec,
        call_id: &str,
        start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        let spec = spec.clone();
        let call_id = call_id.to_owned();
        Box::pin(async move {
            let instance = self.start_process(&spec, &call_id, start_timeout).await?;
            Ok(Box::new(instance) as Box<dyn Instance>)
        })
    }
}

/// Creates the socket root (mode `0711` when this creates it), checks it, and returns its
/// canonical path.
/// A user every function's uid stands for in the checks: with uids of their own, functions
/// are neither owner nor group of the directories they must reach.
fn typical_user(users: FunctionUsers) -> Option<FunctionUser> {
    match users {
        FunctionUsers::Runner => None,
        FunctionUsers::Shared(user) => Some(user),
        FunctionUsers::PerFunction(range) => Some(FunctionUser {
            uid: range.first,
            gid: range.first,
        }),
    }
}

/// The device, inode, owner and mode of the directory at `path` (not followed if a link);
/// `None` when there is none. With its owner and mode: an inode number is soon used again.
fn dir_identity(path: &Path) -> Option<(u64, u64, u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|meta| (meta.dev(), meta.ino(), meta.uid(), meta.mode()))
}

fn prepare_socket_root(root: &Path, user: Option<FunctionUser>) -> Result<PathBuf, SetupError> {
    let fail = |reason: String| SetupError::SocketRoot {
        path: root.to_path_buf(),
        reason,
    };
    if !root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)
            .map_err(|e| fail(format!("cannot create: {e}")))?;
        // The umask may have narrowed the mode; the function user needs the x bit.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| fail(format!("cannot set mode 0711: {e}")))?;
    }
    // Not through a link, and the runner's own: whoever owns the directory the instance
    // directories are made in can rename one and put a link in its place before the runner
    // gives it to the function's user, or put a socket of their own where calls go.
    let meta = std::fs::symlink_metadata(root).map_err(|e| fail(e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(fail(
            "is a symbolic link: point FN_SOCKET_DIR at the directory itself".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    {
        use std::os::unix::fs::MetadataExt as _;
        let own = nix::unistd::geteuid().as_raw();
        if meta.uid() != own {
            return Err(fail(format!(
                "owned by uid {}, not the runner's ({own}): another user could swap the \
                 instance directories made in it; remove it (the runner makes it) or point \
                 FN_SOCKET_DIR at a directory of the runner's own",
                meta.uid()
            )));
        }
    }
    let canonical = std::fs::canonicalize(root).map_err(|e| fail(e.to_string()))?;
    let Some(text) = canonical.to_str() else {
        return Err(fail("not valid UTF-8".into()));
    };
    let room = 1 + MAX_INSTANCE_ID_LEN + 1 + FDK_SOCKET_NAME_ROOM;
    if text.len() + room > MAX_SOCKET_PATH {
        return Err(fail(format!(
            "too long for unix socket paths: {} bytes, at most {} allowed",
            text.len(),
            MAX_SOCKET_PATH - room
        )));
    }
    let mode = meta.permissions().mode();
    if user.is_some() && mode & 0o004 != 0 {
        // Left as it is: the directory may be shared (never narrow /tmp's mode, say).
        tracing::warn!(
            socket_root = %root.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the socket root is listable by other users, so functions can see each other's \
             instance ids; give the runner a directory of its own (it creates a missing one \
             with mode 0711)"
        );
    }
    if mode & 0o022 != 0 {
        tracing::warn!(
            socket_root = %root.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the socket root is writable by other users; use a directory only the runner writes"
        );
    }
    if user.is_some() && mode & 0o001 == 0 {
        tracing::warn!(
            socket_root = %root.display(),
            mode = format!("{:o}", mode & 0o7777),
            "the function user cannot traverse the socket root; functions will fail to start"
        );
    }
    Ok(canonical)
}

/// The lock file in a socket root, which runners before the directory's own lock took
/// alone: still taken beside it, so that neither kind of runner sweeps the other's
/// instances while both share a root during an upgrade.
const ROOT_LOCK: &str = ".runner.lock";

/// The socket root's claim: an `flock` on the directory itself, and one on [`ROOT_LOCK`] in
/// it. The kernel lets both go when the runner dies, even by SIGKILL.
///
/// The directory's lock is the one that counts: a file nobody writes, `.runner.lock` ages
/// out under a `/tmp` cleaner (systemd-tmpfiles removes files unchanged for 10 days) while
/// its runner holds it, and a runner started later on the root would make a new one, take
/// it, and sweep the first runner's live instances. A directory in use is not removed: a
/// cleaner that removes an idle, empty root removes nothing of a runner's but the root
/// itself, which [`ProcessDriver::check_socket_root`] makes and claims again.
#[derive(Debug)]
struct RootClaim {
    _dir: nix::fcntl::Flock<std::fs::File>,
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the socket root's locks ([`RootClaim`]). `None` when another live runner holds
/// either, or they cannot be had: then this runner shares the root and must not sweep it.
fn claim_socket_root(root: &Path) -> Option<RootClaim> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let lock = |path: &Path, file: std::io::Result<std::fs::File>| {
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "cannot open the socket root's lock; what an earlier run left there is not swept");
                return None;
            }
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => Some(locked),
            Err((_, errno)) => {
                tracing::info!(socket_root = %root.display(), %errno, "another runner uses this socket root; what an earlier run left in it is not swept");
                None
            }
        }
    };
    let dir = lock(
        root,
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(root),
    )?;
    let path = root.join(ROOT_LOCK);
    let file = lock(
        &path,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path),
    )?;
    Some(RootClaim {
        _dir: dir,
        _file: file,
    })
}

/// Removes what an earlier run of a runner left in the socket root it now holds alone
/// (killed with SIGKILL, or past its shutdown timeout): instance directories (`<8 hex>-<n>`)
/// and those set aside for removal, the tmpfs on one unmounted first (an instance in
/// namespaces; its processes died with that runner), and the cgroups of the same names
/// under this runner's cgroup parents (`memory`, `pids`), whatever is in them killed first.
/// Only the names found here: another runner, with a socket root of its own, may share the
/// cgroup parents. In the background: a tenant's `TMPDIR` may be large, and a cgroup whose
/// members were just killed is removed once the kernel has finished with them (after its
/// directory, as the reaper does).
fn sweep_leftovers(root: &Path, memory: &CgroupMode, pids: &CgroupMode) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut ids = std::collections::HashSet::new();
    let mut dirs = 0_usize;
    let mut cgroups = 0_usize;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_dir = entry
            .file_type()
            .is_ok_and(|t| t.is_dir() && !t.is_symlink());
        if !is_dir || !is_instance_dir_name(name) {
            continue;
        }
        tracing::info!(dir = %entry.path().display(), "removing an instance directory an earlier run left");
        let id = name.strip_suffix(".removing").unwrap_or(name);
        // Once per id (an instance's directory and its set-aside one).
        let cgroup = ids
            .insert(id.to_owned())
            .then(|| cgroup::InstanceCgroup::existing(memory, pids, id))
            .flatten();
        // Nothing writes into the directory while it is removed.
        if let Some(cgroup) = &cgroup {
            cgroup.kill_members();
        }
        unmount_instance_dir(&entry.path());
        let removed = fn_lifecycle::fs::remove_tree(entry.path());
        dirs += 1;
        if let Some(cgroup) = cgroup {
            cgroup.remove_in_background(removed);
            cgroups += 1;
        }
    }
    if dirs > 0 {
        tracing::info!(
            directories = dirs,
            cgroups,
            socket_root = %root.display(),
            "swept the instance directories and cgroups an earlier run left"
        );
    }
}

/// `<8 hex>-<digits>`, with or without `.removing`: the names of instance directories.
fn is_instance_dir_name(name: &str) -> bool {
    let base = name.strip_suffix(".removing").unwrap_or(name);
    let Some((prefix, number)) = base.split_once('-') else {
        return false;
    };
    prefix.len() == 8
        && prefix.bytes().all(|b| b.is_ascii_hexdigit())
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// The permission bits that apply to `user` in `meta`'s mode, shifted to the owner's place.
fn bits_for(meta: &std::fs::Metadata, user: FunctionUser) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o700
    } else if meta.gid() == user.gid {
        (mode & 0o070) << 3
    } else {
        (mode & 0o007) << 6
    }
}

/// Whether `user` could read the file at `path` by the mode bits of it and its directories.
fn readable_by(path: &Path, user: FunctionUser) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if bits_for(&meta, user) & 0o400 == 0 {
        return false;
    }
    path.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|meta| bits_for(&meta, user) & 0o100 != 0))
}

/// Checks that `user` can traverse every directory down to `dir` (by the owner, group and
/// other bits), so that functions are not refused one call at a time with "permission
/// denied" because the functions directory sits under a private one.
fn reachable_by(dir: &Path, user: FunctionUser) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| format!("cannot inspect {}: {e}", ancestor.display()))?;
        let bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            return Err(format!(
                "the function user (uid {}) cannot reach it: {} is mode {:o}; allow it \
                 (chmod o+x) or put the functions in a directory it can reach",
                user.uid,
                ancestor.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver built without touching the machine (no checks, no cgroup detection).
    fn unprobed_driver(
        functions_dir: PathBuf,
        function_users: FunctionUsers,
        isolation: Option<Isolation>,
        wrapper: Option<PathBuf>,
    ) -> ProcessDriver {
        let unenforced = || CgroupMode::Unenforced {
            reason: "test".into(),
        };
        ProcessDriver {
            functions_dir,
            socket_root: PathBuf::new(),
            function_users,
            uids: None,
            memory: unenforced(),
            pids: unenforced(),
            pids_limit: 0,
            isolation,
            wrapper,
            wrapper_script: WRAPPER_SCRIPT.to_owned(),
            id_prefix: String::new(),
            next_id: AtomicU64::new(1),
            vetted: std::sync::Mutex::default(),
            root_lock: std::sync::Mutex::default(),
            root_seen: std::sync::Mutex::default(),
            setup_hold: std::sync::Mutex::default(),
        }
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_ancestor_makes_the_functions_dir_unreachable() {
        let outer = tempfile::tempdir().expect("tempdir");
        let dir = outer.path().join("functions");
        std::fs::create_dir(&dir).expect("mkdir");
        let stranger = FunctionUser {
            uid: 64_999,
            gid: 64_999,
        };
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let err = reachable_by(&dir, stranger).expect_err("0700 ancestor");
        assert!(err.contains("is mode 700"), "{err}");
        assert!(err.contains(&outer.path().display().to_string()), "{err}");
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        reachable_by(&dir, stranger).expect("traversable");
    }

    #[test]
    fn a_key_is_exposed_to_functions_only_when_its_mode_and_every_directory_let_them_read_it() {
        let outer = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let key = outer.path().join("node-key.pem");
        std::fs::write(&key, "key").expect("write");
        let stranger = FunctionUser {
            uid: 64_999,
            gid: 64_999,
        };
        let mode = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        mode(&key, 0o644);
        assert!(readable_by(&key, stranger), "0644 in a 0755 directory");
        mode(&key, 0o640);
        assert!(
            !readable_by(&key, stranger),
            "group-readable, another group"
        );
        mode(&key, 0o644);
        mode(outer.path(), 0o750);
        assert!(
            !readable_by(&key, stranger),
            "the directory is closed to others"
        );
        assert!(!readable_by(&outer.path().join("missing"), stranger));

        let driver = |users| unprobed_driver(PathBuf::new(), users, None, None);
        mode(outer.path(), 0o755);
        assert!(driver(FunctionUsers::PerFunction(UidRange::DEFAULT)).exposes(&key));
        assert!(driver(FunctionUsers::Shared(stranger)).exposes(&key));
        assert!(
            !driver(FunctionUsers::Runner).exposes(&key),
            "the runner's own user must read it anyway"
        );
    }

    /// In namespaces the wrapper shell and `fn-isolate` run as root: none of the tenant's
    /// config may reach them under its own name (`LD_PRELOAD` would run as root).
    #[test]
    fn in_namespaces_the_config_reaches_the_root_stages_only_under_the_prefix() {
        let user = FunctionUser {
            uid: 64_999,
            gid: 64_999,
        };
        let driver = |isolation| {
            unprobed_driver(
                PathBuf::from("/srv/f"),
                FunctionUsers::Shared(user),
                isolation,
                Some(PathBuf::from(WRAPPER_SHELL)),
            )
        };
        let spec = InstanceSpec {
            app: "a".into(),
            function: "f".into(),
            command: vec!["fn".into()],
            image: None,
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: [("LD_PRELOAD".to_owned(), "/dev/shm/x.so".to_owned())].into(),
        };
        let envs = |isolation| {
            let cmd = driver(isolation).command(
                &spec,
                Path::new("/srv/f/fn"),
                Path::new("/tmp/i"),
                Path::new("/tmp/i/s"),
                Some(user),
            );
            cmd.as_std()
                .get_envs()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.map(|v| v.to_os_string()),
                    )
                })
                .collect::<Vec<_>>()
        };
        let isolated = envs(Some(Isolation {
            helper: PathBuf::from("/bin/fn-isolate"),
            network_none: false,
        }));
        assert!(
            !isolated.iter().any(|(k, _)| k == "LD_PRELOAD"),
            "{isolated:?}"
        );
        assert!(
            isolated
                .iter()
                .any(|(k, v)| k == "FN_ISOLATE_CONFIG_LD_PRELOAD"
                    && v.as_deref() == Some("/dev/shm/x.so".as_ref())),
            "{isolated:?}"
        );
        // Without namespaces the shell runs as the function's user, but before its gate
        // (outside the cgroups): what the loader reads goes under the prefix too, and the
        // wrapper restores it after the gate.
        let plain = envs(None);
        assert!(!plain.iter().any(|(k, _)| k == "LD_PRELOAD"), "{plain:?}");
        assert!(
            plain
                .iter()
                .any(|(k, v)| k == "FN_RESTORE_CONFIG"
                    && v.as_deref() == Some("LD_PRELOAD".as_ref())),
            "{plain:?}"
        );
        assert!(
            plain
                .iter()
                .any(|(k, _)| k == "FN_ISOLATE_CONFIG_LD_PRELOAD"),
            "{plain:?}"
        );
        // A temporary directory that counts in the instance's memory limit in namespaces
        // (its own tmpfs `/tmp`); without them, the instance directory's.
        let var = |envs: &[(String, Option<std::ffi::OsString>)], name: &str| {
            envs.iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.clone())
        };
        for name in ["HOME", "TMPDIR"] {
            assert_eq!(var(&isolated, name), Some("/tmp".into()), "{name}");
        }
        assert_eq!(var(&plain, "HOME"), Some("/tmp/i".into()));
        assert_eq!(var(&plain, "TMPDIR"), Some("/tmp/i/tmp".into()));
    }

    /// Where `/bin/sh` is bash, what it reads as it starts (`SHELLOPTS=xtrace` with a `PS4`
    /// that runs a command) waits for the gate; a function import, which cannot be given
    /// back after it, is refused.
    #[tokio::test]
    async fn bash_as_the_wrapper_shell_runs_no_tenant_code_before_the_gate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let wrapped = unprobed_driver(
            dir.path().to_owned(),
            FunctionUsers::Runner,
            None,
            Some(PathBuf::from(WRAPPER_SHELL)),
        );
        let import = config(&[("BASH_FUNC_read%%", "() { touch /tmp/x; }")]);
        let Err(DriverError::Invalid(said)) = wrapped.check_config(&import) else {
            panic!("a function import was taken");
        };
        assert!(said.contains("BASH_FUNC_read%%"), "{said}");
        let isolated = unprobed_driver(
            dir.path().to_owned(),
            FunctionUsers::Runner,
            Some(Isolation {
                helper: PathBuf::from("/bin/fn-isolate"),
                network_none: false,
            }),
            Some(PathBuf::from(WRAPPER_SHELL)),
        );
        assert!(
            isolated.check_config(&import).is_ok(),
            "in namespaces all the config waits under the prefix"
        );

        let Some((driver, user)) = bash_wrapped_driver(dir.path()) else {
            return; // no bash here: nothing more to try
        };
        let marker = dir.path().join("ran-before-the-gate");
        let spec = InstanceSpec {
            app: "a".into(),
            function: "f".into(),
            command: vec!["true".into()],
            image: None,
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: config(&[
                ("SHELLOPTS", "xtrace"),
                ("PS4", &format!("$(touch {})", marker.display())),
            ]),
        };
        let mut child = driver
            .command(
                &spec,
                Path::new("/bin/true"),
                dir.path(),
                &dir.path().join("s"),
                user,
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let early = marker.exists();
        // The gate never opens: end-of-file ends the wrapper.
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        assert!(!early, "tenant code ran before the gate");

        // Through the gate, the program gets every name of its config: those bash makes
        // read-only (`SHELLOPTS`) as they came, the ones held back restored.
        let spec = InstanceSpec {
            config: config(&[
                ("SHELLOPTS", "errexit"),
                ("BASHOPTS", "extglob"),
                ("PS4", "+ "),
                ("IFS", ":"),
            ]),
            ..spec
        };
        let env = through_the_gate(
            &driver,
            &spec,
            Path::new("/usr/bin/env"),
            dir.path(),
            user,
            Duration::ZERO,
        )
        .await;
        for var in ["SHELLOPTS=", "PS4=+ ", "IFS=:"] {
            assert!(env.lines().any(|l| l.starts_with(var)), "{var} in {env}");
        }
    }

    /// A driver whose wrapper shell is bash named `sh` in `dir` (POSIX mode, as bash runs as
    /// /bin/sh), with the user its functions run as; `None` where there is no bash. As root
    /// bash ignores a PS4 from its environment: a root runner's functions run as another user.
    fn bash_wrapped_driver(dir: &Path) -> Option<(ProcessDriver, Option<FunctionUser>)> {
        let bash = ["/bin/bash", "/usr/bin/bash"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())?;
        let sh = dir.join("sh");
        std::fs::copy(bash, &sh).expect("copy bash");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let (users, user) = if nix::unistd::geteuid().is_root() {
            let nobody = FunctionUser {
                uid: 65534,
                gid: 65534,
            };
            (FunctionUsers::Shared(nobody), Some(nobody))
        } else {
            (FunctionUsers::Runner, None)
        };
        Some((unprobed_driver(dir.to_owned(), users, None, Some(sh)), user))
    }

    /// Where `/bin/sh` is bash, a function's `TMOUT` (bash's time limit for every `read`)
    /// reaches neither the gate's wait nor the watchdog's, which would end the instance
    /// `TMOUT` seconds after it started; the program still gets it.
    #[tokio::test]
    async fn a_function_tmout_times_out_neither_of_the_wrappers_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((driver, user)) = bash_wrapped_driver(dir.path()) else {
            return; // no bash here: nothing to try
        };
        let spec = InstanceSpec {
            app: "a".into(),
            function: "f".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "sleep 2; echo TMOUT=$TMOUT".into(),
            ],
            image: None,
            memory_mb: 64,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
            config: [("TMOUT".to_owned(), "1".to_owned())].into(),
        };
        // The gate opens after more than TMOUT seconds, as it may on a busy runner.
        let delay = Duration::from_millis(1500);
        let said = through_the_gate(
            &driver,
            &spec,
            Path::new("/bin/sh"),
            dir.path(),
            user,
            delay,
        )
        .await;
        assert_eq!(said.trim(), "TMOUT=1");
    }

    /// Starts `program` for `spec` wrapped in `dir`, opens its gate after `delay` and returns
    /// what the program wrote to stdout once it has exited, which it must have done
    /// successfully within 10 s.
    async fn through_the_gate(
        driver: &ProcessDriver,
        spec: &InstanceSpec,
        program: &Path,
        dir: &Path,
        user: Option<FunctionUser>,
        delay: Duration,
    ) -> String {
        let mut child = driver
            .command(spec, program, dir, &dir.join("s"), user)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut lifeline = child.stdin.take().expect("the lifeline");
        tokio::time::sleep(delay).await;
        tokio::io::AsyncWriteExt::write_all(&mut lifeline, b"open\n")
            .await
            .expect("open the gate");
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("in time")
            .expect("output");
        drop(lifeline);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{:?}: {said} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        said
    }

    /// The socket root's claim holds when a `/tmp` cleaner removes `.runner.lock` (a file
    /// nobody writes ages out): a runner started later on the root does not take it.
    #[test]
    fn a_socket_root_stays_claimed_when_its_lock_file_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let held = claim_socket_root(root.path()).expect("the first runner claims it");
        std::fs::remove_file(root.path().join(ROOT_LOCK)).expect("a cleaner removes the file");
        assert!(
            claim_socket_root(root.path()).is_none(),
            "a second runner claimed a root the first holds"
        );
        drop(held);
        assert!(
            claim_socket_root(root.path()).is_some(),
            "a root nobody holds is claimed"
        );
    }

    /// A socket root removed while the runner runs is made again at the next start; one
    /// another user made in its place is refused.
    #[test]
    fn a_socket_root_removed_or_replaced_is_prepared_again() {
        let outer = tempfile::tempdir().expect("tempdir");
        let root = outer.path().join("sockets");
        let mut driver =
            unprobed_driver(outer.path().to_owned(), FunctionUsers::Runner, None, None);
        driver.socket_root = prepare_socket_root(&root, None).expect("prepared");
        *driver.root_seen.lock().expect("lock") = dir_identity(&driver.socket_root);
        driver.check_socket_root().expect("unchanged");
        std::fs::remove_dir_all(&root).expect("a cleaner removes it");
        driver.check_socket_root().expect("made again");
        assert!(root.is_dir());
        // Its lock taken again: another runner on this root would not sweep it.
        assert!(
            claim_socket_root(&root).is_none(),
            "the made-again root's lock is held"
        );
        if nix::unistd::geteuid().is_root() {
            std::fs::remove_dir_all(&root).expect("removed");
            std::fs::create_dir(&root).expect("another user's");
            nix::unistd::chown(&root, Some(nix::unistd::Uid::from_raw(65534)), None)
                .expect("chown");
            let Err(DriverError::Start(said)) = driver.check_socket_root() else {
                panic!("another user's socket root was taken");
            };
            assert!(said.contains("owned by uid 65534"), "{said}");
        }
    }

    /// What a runner killed with SIGKILL left (instance directories, one set aside, and
    /// their cgroups, one with a process still in it) is swept at the next start; a cgroup
    /// of a name it did not leave is kept: another runner may share the cgroup parent.
    #[test]
    fn a_start_sweeps_the_cgroups_of_the_instance_directories_an_earlier_run_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A fake cgroupfs of plain directories, v1: the runner's memory and pids cgroups.
        let paths = CgroupPaths {
            root: tmp.path().join("cgroup"),
            membership: tmp.path().join("self-cgroup"),
        };
        std::fs::write(&paths.membership, "8:pids:/p\n4:memory:/m\n0::/\n").expect("membership");
        let memory = paths.root.join("memory/m");
        let pids = paths.root.join("pids/p");
        let sockets = tmp.path().join("s");
        let functions = tmp.path().join("f");
        for dir in [&memory, &pids, &sockets, &functions] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        for name in ["deadbeef-1", "deadbeef-2.removing", "deadbeef-3"] {
            let dir = sockets.join(name);
            std::fs::create_dir(&dir).expect("a leftover directory");
            std::fs::write(dir.join("written"), "by the function").expect("write");
        }
        let swept = [
            memory.join("deadbeef-1"),
            pids.join("deadbeef-1"),
            memory.join("deadbeef-2"),
        ];
        // Another runner's instance, with no directory in this socket root.
        let kept = memory.join("cafef00d-1");
        // A process still in a leftover cgroup (the fake's cgroup.procs, a plain file, keeps
        // that cgroup in place: only the kill is checked).
        let busy = pids.join("deadbeef-3");
        for dir in swept.iter().chain([&kept, &busy]) {
            std::fs::create_dir(dir).expect("a cgroup");
        }
        let mut member = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn");
        std::fs::write(busy.join("cgroup.procs"), member.id().to_string()).expect("procs");

        let driver = ProcessDriver::new(
            ProcessDriverConfig::new(&functions, &sockets)
                .with_memory_limits(MemoryLimits::Cgroup(paths)),
        )
        .expect("driver");
        assert_eq!(
            (driver.memory_limit_mode(), driver.pids_limit_mode()),
            (
                &CgroupMode::V1 {
                    parent: memory.clone()
                },
                &CgroupMode::V1 {
                    parent: pids.clone()
                }
            )
        );
        let left = |member: &mut std::process::Child| {
            let mut left: Vec<String> = std::fs::read_dir(&sockets)
                .expect("the socket root")
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("deadbeef"))
                .collect();
            left.extend(
                swept
                    .iter()
                    .filter(|dir| dir.exists())
                    .map(|dir| dir.display().to_string()),
            );
            if member.try_wait().expect("try_wait").is_none() {
                left.push(format!("process {}", member.id()));
            }
            left
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut remaining = left(&mut member);
        while !remaining.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            remaining = left(&mut member);
        }
        if member.try_wait().expect("try_wait").is_none() {
            let _ = member.kill();
            let _ = member.wait();
        }
        assert!(remaining.is_empty(), "left behind: {remaining:?}");
        assert!(kept.is_dir(), "another runner's cgroup was swept");
    }

    #[test]
    fn only_instance_directory_names_are_swept() {
        for name in ["deadbeef-1", "0123abcd-42.removing"] {
            assert!(is_instance_dir_name(name), "{name}");
        }
        for name in [
            "deadbeef-",
            "deadbeef-x",
            "deadbee-1",
            "not-ours",
            ".runner.lock",
            "deadbeefX-1",
        ] {
            assert!(!is_instance_dir_name(name), "{name}");
        }
    }

    #[test]
    fn only_plain_loader_and_shell_names_wait_for_the_gate() {
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "BASH_ENV",
            "ENV",
            "PS4",
            "IFS",
        ] {
            assert!(read_before_the_gate(name), "{name}");
        }
        for name in [
            "PATH_X",
            "LD_X;rm -rf",
            "ld_preload",
            "ENVIRONMENT",
            "LD_A B",
        ] {
            assert!(!read_before_the_gate(name), "{name}");
        }
    }

    #[test]
    fn uid_ranges_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(UidRange::parse("100000-165535"), Ok(UidRange::DEFAULT));
        assert_eq!(UidRange::DEFAULT.len(), 65_536);
        for bad in ["", "100000", "5-1", "0-10", "a-b", "1-4294967295"] {
            let err = UidRange::parse(bad).expect_err(bad);
            assert!(err.contains("range"), "{bad:?}: {err}");
        }
    }
}
